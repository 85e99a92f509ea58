//! The fake Fluentd supervisor process: spawns the worker (itself with
//! `--under-supervisor`), restarts it, serves the RPC endpoint, and handles signals per
//! version — including v1.18's SIGUSR2 zero-downtime restart, which replaces this process
//! with a new supervisor (zdr-serverengine-2.4.0.log, fluent-agents.md §4.8).

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::config::{self, Element};
use super::{plugin_config_lines, read_config, version, zdr_capable, Cli, LoadError, Log, AGENT};
use crate::common::{self, event, send_signal};
use crate::http::{self, Request, Response};
use crate::json::{self, Obj};

#[derive(Debug)]
enum Cmd {
    /// TERM/INT, or the processes.* RPCs: graceful stop.
    Stop {
        flush_first: bool,
    },
    /// HUP or config.reload: restart the worker, which re-reads the config.
    RestartWorker,
    /// config.gracefulReload, or USR2 before 1.18.
    GracefulReload,
    /// USR1 or plugins.flushBuffers.
    Flush,
    /// USR2 on 1.18+ or processes.zeroDowntimeRestart.
    ZeroDowntimeRestart,
    Spawn,
    WorkerExited(u32, ExitStatus),
    ZdrStopOld,
}

struct SupState {
    root: Element,
    worker: Option<u32>,
    stopping: bool,
    exit_code: i32,
    zdr_successor: Option<u32>,
    spawned_once: bool,
    rpc_task: Option<JoinHandle<()>>,
}

struct Sup {
    cli: Cli,
    log: Log,
    st: Mutex<SupState>,
    tx: mpsc::UnboundedSender<Cmd>,
}

type Shared = Arc<Sup>;

fn finish(code: i32) -> ! {
    event(
        AGENT,
        serde_json::json!({"event": "exit", "code": code, "role": "supervisor"}),
    );
    std::process::exit(code)
}

/// Start-up lines in the supervisor (sig-SIGTERM.log): plugin configure lines, the dump,
/// `starting fluentd-1.18.0 pid=... ruby="3.1.2"`.
fn startup_lines(log: &Log, root: &Element) {
    let plugins = config::plugins(root);
    plugin_config_lines(log, &super::configure_order(&plugins), false);
    log.info(&format!(
        "using configuration file: {}",
        config::dump(root).trim_end()
    ));
}

pub async fn run(cli: Cli, log: Log, root: Element) -> i32 {
    let zdr_from: Option<u32> = std::env::var("FAKE_FLUENTD_ZDR_FROM")
        .ok()
        .and_then(|v| v.parse().ok());
    if zdr_from.is_some() {
        // zdr-serverengine-2.4.0.log: the new supervisor starts with-source-only.
        log.info(&format!(
            "with-source-only: the emitted data will be stored in the buffer files under /var/lib/fluent/source-only-buffer/{:032x}. You can send SIGWINCH to the supervisor process to cancel with-source-only mode and process data.",
            common::unix_millis(SystemTime::now())
        ));
    }
    startup_lines(&log, &root);
    log.info(&format!(
        "starting fluentd-{} pid={} ruby=\"3.1.2\"",
        version(),
        std::process::id()
    ));
    if std::env::var("FAKE_CRASH_TARGET").as_deref() != Ok("worker") {
        common::spawn_crash_hooks(AGENT);
    }
    event(
        AGENT,
        serde_json::json!({"event": "start", "role": "supervisor", "version": version(), "config": cli.config, "zdr_from": zdr_from}),
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sup: Shared = Arc::new(Sup {
        cli,
        log,
        st: Mutex::new(SupState {
            root,
            worker: None,
            stopping: false,
            exit_code: 0,
            zdr_successor: None,
            spawned_once: false,
            rpc_task: None,
        }),
        tx,
    });
    start_rpc(&sup);
    spawn_worker(&sup);
    if let Some(old) = zdr_from {
        // zdr-serverengine-2.4.0.log: the successor takes the sockets over, then waits
        // for the old supervisor to go.
        sup.log.info(&format!(
            "zero-downtime-restart: took over the shared sockets path=\"/tmp/SERVERENGINE_SOCKETMANAGER_{}_{old}\"",
            common::fd_time(SystemTime::now()).replace(' ', "T")
        ));
        let s = sup.clone();
        tokio::spawn(async move {
            while common::alive(old) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            s.log.info(
                "zero-downtime-restart: done all sequences, now new processes start to work fully",
            );
            event(
                AGENT,
                serde_json::json!({"event": "zdr_done", "role": "supervisor", "old_pid": old}),
            );
        });
    }
    spawn_signal_forwarders(&sup);
    while let Some(cmd) = rx.recv().await {
        handle(&sup, cmd).await;
    }
    0
}

fn spawn_signal_forwarders(sup: &Shared) {
    let kinds: [(SignalKind, &'static str); 6] = [
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::interrupt(), "SIGINT"),
        (SignalKind::hangup(), "SIGHUP"),
        (SignalKind::user_defined1(), "SIGUSR1"),
        (SignalKind::user_defined2(), "SIGUSR2"),
        (SignalKind::window_change(), "SIGWINCH"),
    ];
    for (kind, name) in kinds {
        let s = sup.clone();
        let mut sig = signal(kind).expect("signal handler");
        tokio::spawn(async move {
            while sig.recv().await.is_some() {
                event(
                    AGENT,
                    serde_json::json!({"event": "signal", "role": "supervisor", "signal": name}),
                );
                let cmd = match name {
                    // sig-SIGTERM.log, sig-SIGINT.log: graceful stop, exit 0.
                    "SIGTERM" | "SIGINT" => Cmd::Stop { flush_first: false },
                    // sighup.log: the worker is restarted (new pid).
                    "SIGHUP" => Cmd::RestartWorker,
                    "SIGUSR1" => Cmd::Flush,
                    // zdr-serverengine-2.4.0.log (1.18) / sigusr2.log (1.16).
                    "SIGUSR2" if zdr_capable() => Cmd::ZeroDowntimeRestart,
                    "SIGUSR2" => Cmd::GracefulReload,
                    // SIGWINCH (1.18) cancels with-source-only mode: nothing to do here.
                    _ => continue,
                };
                let _ = s.tx.send(cmd);
            }
        });
    }
}

fn spawn_worker(sup: &Shared) {
    let exe = std::env::current_exe().unwrap_or_else(|_| "fake-fluentd".into());
    let mut args = sup.cli.args.clone();
    args.push("--under-supervisor".into());
    let first = {
        let mut st = sup.st.lock().expect("state");
        !std::mem::replace(&mut st.spawned_once, true)
    };
    if first {
        // sig-SIGTERM.log: `spawn command to main:  cmdline=[...]` (two spaces), once.
        let mut cmdline = vec![json::quote(&exe.to_string_lossy())];
        cmdline.extend(args.iter().map(|a| json::quote(a)));
        sup.log.info(&format!(
            "spawn command to main:  cmdline=[{}]",
            cmdline.join(", ")
        ));
    }
    let child = tokio::process::Command::new(&exe)
        .args(&args)
        .env_remove("FAKE_FLUENTD_ZDR_FROM")
        .stdin(std::process::Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            sup.log.error(&format!("failed to spawn worker: {e}"));
            finish(1);
        }
    };
    let pid = child.id().unwrap_or(0);
    sup.st.lock().expect("state").worker = Some(pid);
    event(
        AGENT,
        serde_json::json!({"event": "worker_spawn", "role": "supervisor", "worker_pid": pid}),
    );
    let tx = sup.tx.clone();
    tokio::spawn(async move {
        if let Ok(status) = child.wait().await {
            let _ = tx.send(Cmd::WorkerExited(pid, status));
        }
    });
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => return format!("SIG{sig}"),
    };
    name.into()
}

async fn handle(sup: &Shared, cmd: Cmd) {
    let log = &sup.log;
    match cmd {
        Cmd::Stop { flush_first } => {
            let worker = {
                let mut st = sup.st.lock().expect("state");
                if st.stopping {
                    return;
                }
                st.stopping = true;
                st.worker
            };
            log.info("Received graceful stop");
            match worker {
                Some(pid) => {
                    if flush_first {
                        // rpc-processes.flushBuffersAndKillWorkers.log: USR1, then TERM.
                        send_signal(pid, libc::SIGUSR1);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    send_signal(pid, libc::SIGTERM);
                }
                None => finish(sup.st.lock().expect("state").exit_code),
            }
        }
        Cmd::RestartWorker => {
            // sighup.log / fluentd.log (config.reload): the worker stops and is respawned;
            // its exit is logged as "finished unexpectedly with status 0".
            if let Some(pid) = sup.st.lock().expect("state").worker {
                send_signal(pid, libc::SIGTERM);
            }
        }
        Cmd::Flush => {
            if let Some(pid) = sup.st.lock().expect("state").worker {
                send_signal(pid, libc::SIGUSR1);
            }
        }
        Cmd::GracefulReload => graceful_reload(sup),
        Cmd::ZeroDowntimeRestart => zero_downtime_restart(sup),
        Cmd::Spawn => {
            if !sup.st.lock().expect("state").stopping {
                spawn_worker(sup);
            }
        }
        Cmd::WorkerExited(pid, status) => {
            let (stopping, exit_code, successor) = {
                let mut st = sup.st.lock().expect("state");
                if st.worker == Some(pid) {
                    st.worker = None;
                }
                (st.stopping, st.exit_code, st.zdr_successor)
            };
            let desc = match (status.code(), status.signal()) {
                (Some(c), _) => format!("status {c}"),
                (None, Some(s)) => format!("signal {}", signal_name(s)),
                _ => "status 0".into(),
            };
            event(
                AGENT,
                serde_json::json!({"event": "worker_exit", "role": "supervisor", "worker_pid": pid, "code": status.code(), "signal": status.signal()}),
            );
            if stopping {
                // sig-SIGTERM.log: "Worker 0 finished with status 0", exit 0.
                log.info(&format!("Worker 0 finished with {desc}"));
                if let Some(new) = successor {
                    log.info(&format!(
                        "zero-downtime-restart: notify the new supervisor (pid: {new}) that old one has stopped"
                    ));
                }
                finish(exit_code);
            }
            log.info(&format!("Worker 0 finished unexpectedly with {desc}"));
            if status.code() == Some(2) {
                // fluentd.log end / fluent-agents.md §4.9: exit status 2 is unrecoverable,
                // the whole fluentd stops with code 2.
                log.info("Received graceful stop");
                finish(2);
            }
            // portconflict.log: respawned about every 0.5 s, the supervisor never exits.
            let tx = sup.tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = tx.send(Cmd::Spawn);
            });
        }
        Cmd::ZdrStopOld => {
            log.info("zero-downtime-restart: stop the old supervisor");
            let _ = sup.tx.send(Cmd::Stop { flush_first: false });
        }
    }
}

/// config.gracefulReload (fluentd.log, 1.16 sigusr2.log): the supervisor validates the
/// file first; an invalid one is only logged ("Failed to reload config file: ...") and
/// the old pipeline keeps running; a valid one is handed to the worker with USR2.
fn graceful_reload(sup: &Shared) {
    let log = &sup.log;
    log.info("Reloading new config");
    let root = match read_config(&sup.cli.config) {
        Ok(r) => r,
        Err(LoadError::Parse(p)) => {
            log.error(&format!(
                "Failed to reload config file: {}\n{}\n",
                p.headline(),
                p.context()
            ));
            event(
                AGENT,
                serde_json::json!({"event": "graceful_reload", "role": "supervisor", "result": "failed"}),
            );
            return;
        }
        Err(LoadError::Missing(p)) => {
            log.error(&format!(
                "Failed to reload config file: No such file or directory @ rb_sysopen - {p}"
            ));
            event(
                AGENT,
                serde_json::json!({"event": "graceful_reload", "role": "supervisor", "result": "failed"}),
            );
            return;
        }
    };
    if let Err((_, msg)) = config::validate(&root) {
        log.error(&format!("Failed to reload config file: {msg}"));
        event(
            AGENT,
            serde_json::json!({"event": "graceful_reload", "role": "supervisor", "result": "failed"}),
        );
        return;
    }
    startup_lines(log, &root);
    for p in config::plugins(&root) {
        log.info(&format!(
            "shutting down {} plugin type=:{} plugin_id=\"{}\"",
            p.category.word(),
            p.type_,
            p.plugin_id
        ));
    }
    let worker = {
        let mut st = sup.st.lock().expect("state");
        st.root = root;
        st.worker
    };
    if let Some(pid) = worker {
        send_signal(pid, libc::SIGUSR2);
    }
    event(
        AGENT,
        serde_json::json!({"event": "graceful_reload", "role": "supervisor", "result": "ok"}),
    );
}

/// v1.18 SIGUSR2 (zdr-serverengine-2.4.0.log; fluent-agents.md §4.8): a new supervisor
/// starts (our child, re-parented when we exit) and takes the sockets over; this one
/// stops its worker after FAKE_FLUENTD_ZDR_MS (default 10000, as recorded) and exits 0,
/// while the new one keeps serving under a new pid. A supervisor that waits on this pid
/// sees a clean exit and loses track of the running fluentd: that is the trap.
fn zero_downtime_restart(sup: &Shared) {
    {
        let st = sup.st.lock().expect("state");
        if st.stopping || st.zdr_successor.is_some() {
            return;
        }
    }
    sup.log.info("start zero-downtime-restart sequence");
    let exe = std::env::current_exe().unwrap_or_else(|_| "fake-fluentd".into());
    let child = tokio::process::Command::new(exe)
        .args(&sup.cli.args)
        .env("FAKE_FLUENTD_ZDR_FROM", std::process::id().to_string())
        .stdin(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        sup.log
            .error("zero-downtime-restart: failed to start the new supervisor");
        return;
    };
    let new_pid = child.id().unwrap_or(0);
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    {
        let mut st = sup.st.lock().expect("state");
        st.zdr_successor = Some(new_pid);
        // The RPC endpoint moves to the new supervisor.
        if let Some(t) = st.rpc_task.take() {
            t.abort();
        }
    }
    event(
        AGENT,
        serde_json::json!({"event": "zdr_start", "role": "supervisor", "new_pid": new_pid}),
    );
    let tx = sup.tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(common::env_ms("FAKE_FLUENTD_ZDR_MS", 10_000)).await;
        let _ = tx.send(Cmd::ZdrStopOld);
    });
}

fn start_rpc(sup: &Shared) {
    let endpoint = {
        let st = sup.st.lock().expect("state");
        st.root
            .child("system")
            .and_then(|s| s.param("rpc_endpoint"))
            .map(str::to_string)
    };
    let Some(endpoint) = endpoint else { return };
    match http::bind(&endpoint, true) {
        Ok(l) => {
            let task = http::serve(l, rpc_handler(sup.clone(), endpoint));
            sup.st.lock().expect("state").rpc_task = Some(task);
        }
        Err(e) => sup
            .log
            .error(&format!("failed to start RPC server on {endpoint}: {e}")),
    }
}

fn ok_json() -> Response {
    // rpc_config.reload.json and the other RPC recordings: 200 {"ok":true}.
    Response::new(200)
        .header("Content-Type", "application/json")
        .body(r#"{"ok":true}"#)
}

/// The RPC endpoint (fluent-agents.md §3.4), GET or POST.
fn rpc_handler(sup: Shared, addr: String) -> http::Handler {
    Arc::new(move |req: Request| {
        let resp = rpc(&sup, &addr, &req);
        event(
            AGENT,
            serde_json::json!({"event": "rpc", "role": "supervisor", "method": req.method, "path": req.path, "status": resp.status, "answered": !resp.hang_up}),
        );
        resp
    })
}

fn rpc(sup: &Shared, addr: &str, req: &Request) -> Response {
    let send = |c: Cmd| {
        let _ = sup.tx.send(c);
    };
    match req.path.as_str() {
        // rpc_processes.killWorkers.json: the recorded caller got no HTTP answer
        // (connection refused) while fluentd stopped (exit 0), so the fake stops and
        // closes the connection without answering; callers must not depend on a reply.
        "/api/processes.killWorkers" | "/api/processes.interruptWorkers" => {
            send(Cmd::Stop { flush_first: false });
            Response::hang_up()
        }
        "/api/processes.flushBuffersAndKillWorkers" => {
            send(Cmd::Stop { flush_first: true });
            Response::hang_up()
        }
        // rpc_plugins.flushBuffers.json
        "/api/plugins.flushBuffers" => {
            send(Cmd::Flush);
            ok_json()
        }
        // rpc_config.reload.json: SIGHUP semantics, new worker pid.
        "/api/config.reload" => {
            send(Cmd::RestartWorker);
            ok_json()
        }
        // rpc_config.gracefulReload_valid.json, _invalid.json, _syntaxerr.json,
        // rpc_post_gracefulReload.json: always {"ok":true}.
        // The validation runs before the answer, so a caller that rewrites the file right
        // after the call cannot race it.
        "/api/config.gracefulReload" => {
            graceful_reload(sup);
            ok_json()
        }
        // rpc_config.dump.json: the dump goes to the log (fluentd.log "dump in-memory config").
        "/api/config.dump" => {
            let root = sup.st.lock().expect("state").root.clone();
            sup.log.info("dump in-memory config");
            sup.log.info(&config::dump(&root));
            ok_json()
        }
        // rpc_config.getDump.json; only mounted with `enable_get_dump true`.
        "/api/config.getDump" => {
            let root = sup.st.lock().expect("state").root.clone();
            let enabled = root
                .child("system")
                .and_then(|s| s.param("enable_get_dump"))
                .is_some_and(|v| v == "true");
            if !enabled {
                return super::worker::webrick_404(&req.path, addr);
            }
            sup.log.info("get dump in-memory config via HTTP");
            let body = Obj::new()
                .str("conf", &config::dump(&root))
                .raw("ok", "true")
                .build();
            Response::new(200)
                .header("Content-Type", "application/json")
                .body(body)
        }
        // 1.18+ only (fluent-agents.md §3.4).
        "/api/processes.zeroDowntimeRestart" if zdr_capable() => {
            send(Cmd::ZeroDowntimeRestart);
            ok_json()
        }
        _ => super::worker::webrick_404(&req.path, addr),
    }
}
