//! The fake `fluent-bit`: command line, start-up and dry-run outcomes, the monitoring HTTP
//! server, hot reload (halted / aborted / done), signals and exit codes, as recorded from
//! a real Fluent Bit 5.1.1 in fixtures/fluent-bit-5.1.1/. Each behaviour names its recording.

pub mod config;
mod metrics;

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::common::{self, event, fb_ts, fb_ts_sec, recorded_body, recorded_streams};
use crate::http::{self, Request, Response};
use crate::json::Obj;
use config::{CliPlugin, Config, Kind, LoadError, Plugin};
use metrics::{InStat, OutStat, Posted, Route, Snapshot};

pub const VERSION: &str = "5.1.1";
const AGENT: &str = "fluent-bit";

const DRYRUN_OK: &str = include_str!("../../fixtures/fluent-bit-5.1.1/responses/C_dryrun_ok.txt");
const VERSION_REC: &str = include_str!("../../fixtures/fluent-bit-5.1.1/responses/C_version.txt");
const BOGUS_FLAG_REC: &str =
    include_str!("../../fixtures/fluent-bit-5.1.1/responses/C_bogus_flag.txt");
const ROOT_REC: &str = include_str!("../../fixtures/fluent-bit-5.1.1/responses/A_root.json");
const PLUGINS_REC: &str =
    include_str!("../../fixtures/fluent-bit-5.1.1/responses/A_v1_plugins.json");
/// The path the recordings were made with; replaced by our argv[0] where it is printed.
const RECORDED_ARGV0: &str = "/opt/fluent-bit/bin/fluent-bit";

/// The banner printed to stderr before anything else (C_dryrun_ok.txt, D3-SIGTERM.log).
fn banner() -> &'static str {
    let (_, err) = recorded_streams(DRYRUN_OK);
    err.strip_suffix("configuration test is successful\n")
        .unwrap_or(err)
}

#[derive(Default, Clone)]
struct Cli {
    config: Option<String>,
    dry_run: bool,
    http: bool,
    listen: Option<String>,
    port: Option<String>,
    hot_reload: bool,
    parsers: Option<String>,
    log_file: Option<String>,
    quiet: bool,
    flush: Option<String>,
    pipeline: Vec<CliPlugin>,
}

enum Parsed {
    Run(Cli),
    Exit(i32),
}

fn usage(argv0: &str) -> String {
    recorded_streams(BOGUS_FLAG_REC)
        .0
        .replace(RECORDED_ARGV0, argv0)
}

/// getopt_long-style parsing of the flags fluent-agents.md §2.1 lists. Unknown flags print
/// the error to stderr and the help to stdout, exit 1 (C_bogus_flag.txt).
fn parse_args(argv0: &str, args: &[String]) -> Parsed {
    const SHORT_ARG: &str = "bcfCiFmopRelwtPLs";
    const LONG_ARG: &[&str] = &[
        "storage_path",
        "config",
        "flush",
        "custom",
        "input",
        "filter",
        "match",
        "output",
        "prop",
        "parser",
        "plugin",
        "log_file",
        "tag",
        "workdir",
        "port",
        "http_port",
        "http_listen",
        "coro_stack_size",
        "trace-input",
        "trace-output",
        "trace-output-property",
        "trace",
    ];
    const LONG_FLAG: &[&str] = &[
        "daemon",
        "supervisor",
        "dry-run",
        "help",
        "http",
        "http_server",
        "quiet",
        "sosreport",
        "enable-hot-reload",
        "enable-fips",
        "disable-thread-safety-on-hot-reloading",
        "version",
        "verbose",
        "enable-chunk-trace",
    ];
    let fail = |msg: String| {
        eprintln!("{argv0}: {msg}");
        print!("{}", usage(argv0));
        Parsed::Exit(1)
    };
    let mut cli = Cli::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let (opt, inline): (String, Option<String>) = if let Some(long) = a.strip_prefix("--") {
            let (name, val) = match long.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (long.to_string(), None),
            };
            if LONG_ARG.contains(&name.as_str()) {
                (name, val)
            } else if LONG_FLAG.contains(&name.as_str()) {
                (name, None)
            } else {
                return fail(format!("unrecognized option '{a}'"));
            }
        } else if let Some(short) = a.strip_prefix('-').filter(|s| !s.is_empty()) {
            let c = short.chars().next().unwrap_or('?');
            let rest = &short[c.len_utf8()..];
            if SHORT_ARG.contains(c) {
                (c.to_string(), (!rest.is_empty()).then(|| rest.to_string()))
            } else if "dDhHJqSvVWYZ".contains(c) {
                (c.to_string(), None)
            } else {
                return fail(format!("invalid option -- '{c}'"));
            }
        } else {
            // Stray positional arguments are ignored by getopt's permutation.
            continue;
        };
        let takes_arg = opt.len() > 1 && LONG_ARG.contains(&opt.as_str())
            || opt.len() == 1 && SHORT_ARG.contains(&opt);
        let val = if takes_arg {
            match inline.or_else(|| {
                let v = args.get(i).cloned();
                i += 1;
                v
            }) {
                Some(v) => v,
                None => return fail(format!("option requires an argument -- '{opt}'")),
            }
        } else {
            String::new()
        };
        match opt.as_str() {
            "c" | "config" => cli.config = Some(val),
            "D" | "dry-run" => cli.dry_run = true,
            "V" | "version" => {
                // C_version.txt
                print!("{}", recorded_streams(VERSION_REC).0);
                return Parsed::Exit(0);
            }
            "h" | "help" => {
                print!("{}", usage(argv0));
                return Parsed::Exit(0);
            }
            "J" => {
                // C_help_json.txt (`fluent-bit -J`)
                print!("{}", recorded_streams(config::HELP_JSON_RECORDING).0);
                return Parsed::Exit(0);
            }
            "H" | "http" | "http_server" => cli.http = true,
            "L" | "http_listen" => cli.listen = Some(val),
            "P" | "port" | "http_port" => cli.port = Some(val),
            "Y" | "enable-hot-reload" => cli.hot_reload = true,
            "R" | "parser" => cli.parsers = Some(val),
            "l" | "log_file" => cli.log_file = Some(val),
            "q" | "quiet" => cli.quiet = true,
            "f" | "flush" => cli.flush = Some(val),
            "i" | "input" => cli.pipeline.push(CliPlugin {
                kind: Kind::Input,
                name: val,
                props: vec![],
            }),
            "o" | "output" => cli.pipeline.push(CliPlugin {
                kind: Kind::Output,
                name: val,
                props: vec![],
            }),
            "F" | "filter" => cli.pipeline.push(CliPlugin {
                kind: Kind::Filter,
                name: val,
                props: vec![],
            }),
            "p" | "prop" | "m" | "match" | "t" | "tag" => {
                let (k, v) = match opt.as_str() {
                    "m" | "match" => ("match".to_string(), val),
                    "t" | "tag" => ("tag".to_string(), val),
                    _ => match val.split_once('=') {
                        Some((k, v)) => (k.trim().to_ascii_lowercase(), v.trim().to_string()),
                        None => continue,
                    },
                };
                if let Some(last) = cli.pipeline.last_mut() {
                    last.props.push((k, v));
                }
            }
            "d" | "daemon" | "supervisor" => {
                // Not emulated: a supervisor must not use them (fluent-agents.md §2.5, §2.6).
                eprintln!("fake-fluent-bit: '{a}' is not supported by the fake");
                return Parsed::Exit(1);
            }
            _ => {} // accepted and ignored: -v, -W, -Z, -b, -w, -s, -e, -C, -S, traces
        }
    }
    Parsed::Run(cli)
}

/// Engine log lines: `[2026/11/22 02:53:22.584] [ info] message` to stderr (or `-l` file),
/// counted per level for `fluentbit_logger_logs_total` (B_v2_metrics.txt).
struct Logger {
    file: Mutex<Option<std::fs::File>>,
    counts: [AtomicU64; 5],
}

impl Logger {
    fn write(&self, text: &str) {
        let mut f = self.file.lock().expect("log lock");
        match f.as_mut() {
            Some(f) => {
                let _ = f.write_all(text.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(text.as_bytes());
            }
        }
    }

    fn line(&self, level: &str, msg: &str) {
        let idx = match level {
            "error" => 0,
            "warn" => 1,
            "debug" => 3,
            "trace" => 4,
            _ => 2,
        };
        self.counts[idx].fetch_add(1, Ordering::Relaxed);
        self.write(&format!("[{}] [{:>5}] {msg}\n", fb_ts(), level));
    }

    fn info(&self, msg: &str) {
        self.line("info", msg)
    }

    fn warn(&self, msg: &str) {
        self.line("warn", msg)
    }

    fn error(&self, msg: &str) {
        self.line("error", msg)
    }

    /// Lines that always go to stderr even with `-l` (fluent-agents.md §2.4).
    fn stderr(&self, text: &str) {
        let _ = std::io::stderr().write_all(text.as_bytes());
    }

    /// `[2026/11/22 02:56:06] [engine] caught signal (SIGTERM)` (D3-SIGTERM.log).
    fn caught(&self, sig: &str) {
        self.stderr(&format!(
            "[{}] [engine] caught signal ({sig})\n",
            fb_ts_sec()
        ));
    }

    fn counts(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }
}

/// Counters of the running pipeline ("context"); a hot reload replaces it, which is why
/// uptime resets (B_v1_uptime_after_reload.json) and metrics 404 again for a second.
struct Ctx {
    cfg: Config,
    start: Instant,
    ticks: u64,
    inputs: Vec<InStat>,
    outputs: Vec<OutStat>,
    routes: Vec<Route>,
    samples: VecDeque<(u64, u64)>,
    unhealthy_since: Option<Instant>,
    tasks: Vec<JoinHandle<()>>,
}

impl Ctx {
    fn new(cfg: Config) -> Ctx {
        let ins: Vec<&Plugin> = cfg.of(Kind::Input).collect();
        let outs: Vec<&Plugin> = cfg.of(Kind::Output).collect();
        let mut routes = Vec::new();
        for (i, inp) in ins.iter().enumerate() {
            for (o, out) in outs.iter().enumerate() {
                // The http input's records are routed one POST at a time by their own tag
                // (see `Posted`): every output with a Match may receive some.
                let tag_of_input = inp.name != "http";
                if out
                    .prop("match")
                    .is_some_and(|m| !tag_of_input || config::tag_match(m, &inp.tag()))
                {
                    routes.push(Route {
                        input: i,
                        output: o,
                        ..Route::default()
                    });
                }
            }
        }
        Ctx {
            inputs: vec![InStat::default(); ins.len()],
            outputs: vec![OutStat::default(); outs.len()],
            routes,
            cfg,
            start: Instant::now(),
            ticks: 0,
            samples: VecDeque::new(),
            unhealthy_since: None,
            tasks: Vec::new(),
        }
    }
}

struct State {
    ctx: Ctx,
    hot_reload_count: u64,
    reloading: bool,
    stopping: bool,
    http_addr: Option<String>,
    http_task: Option<JoinHandle<()>>,
}

struct Engine {
    argv0: String,
    cli: Cli,
    log: Logger,
    process_start: SystemTime,
    hostname: String,
    st: Mutex<State>,
    reload_tx: mpsc::UnboundedSender<&'static str>,
}

type Shared = Arc<Engine>;

fn ok_exit(code: i32) -> i32 {
    let _ = std::io::stdout().flush();
    event(AGENT, serde_json::json!({"event": "exit", "code": code}));
    code
}

pub fn main() -> i32 {
    let args: Vec<String> = std::env::args().collect();
    let argv0 = args.first().cloned().unwrap_or_else(|| "fluent-bit".into());
    let cli = match parse_args(&argv0, &args[1..]) {
        Parsed::Exit(c) => return c,
        Parsed::Run(c) => c,
    };
    let log = Logger {
        file: Mutex::new(None),
        counts: Default::default(),
    };
    // C_start_missing_parsers.txt: checked before the banner, exit 1.
    if let Some(p) = &cli.parsers {
        if std::fs::metadata(p).is_err() {
            log.error("could not open parser configuration file, aborting.");
            return ok_exit(1);
        }
    }
    if !cli.quiet {
        log.stderr(banner());
    }
    if let Some(path) = &cli.log_file {
        if let Ok(f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            *log.file.lock().expect("log lock") = Some(f);
        }
    }
    if cli.dry_run && common::dry_run_passes() {
        log.stderr("configuration test is successful\n");
        return ok_exit(0);
    }
    let cfg = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            // C_start_missing_file.txt / C_start_bad_syntax.txt / C_start_bad_plugin.txt /
            // C_start_bad_yaml.txt / C_start_cli_bad_input.txt (and the same for -D): exit 1.
            match e {
                LoadError::Open => log.error("could not open configuration file, aborting."),
                e => {
                    for l in e.config_lines() {
                        log.error(&l);
                    }
                    log.error("configuration file contains errors, aborting.");
                }
            }
            return ok_exit(1);
        }
    };
    if cli.dry_run {
        // C_dryrun_bad_prop.txt: the property check catches unknown keys; C_dryrun_ok.txt.
        if let Err(e) = config::check_properties(&cfg) {
            log.error(&e.message());
            log.line("help", &e.help(&argv0));
            log.stderr("\n");
            log.error(&format!(
                "[reload] check properties for {} plugins is failed",
                e.kind.word()
            ));
            return ok_exit(1);
        }
        log.stderr("configuration test is successful\n");
        return ok_exit(0);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(argv0, cli, cfg, log))
}

/// Loads `-c` plus the command-line pipeline and applies command-line service flags on
/// top, as the real one re-applies them on every reload (fluent-agents.md §2.3).
fn load(cli: &Cli) -> Result<Config, LoadError> {
    let mut cfg = config::load(cli.config.as_deref(), &cli.pipeline)?;
    if cli.http {
        cfg.service.push(("http_server".into(), "on".into()));
    }
    if let Some(l) = &cli.listen {
        cfg.service.push(("http_listen".into(), l.clone()));
    }
    if let Some(p) = &cli.port {
        cfg.service.push(("http_port".into(), p.clone()));
    }
    if cli.hot_reload {
        cfg.service.push(("hot_reload".into(), "on".into()));
    }
    if let Some(f) = &cli.flush {
        cfg.service.push(("flush".into(), f.clone()));
    }
    Ok(cfg)
}

fn grace(cfg: &Config) -> i64 {
    cfg.service_num("grace", 5)
}

async fn run(argv0: String, cli: Cli, cfg: Config, log: Logger) -> i32 {
    common::spawn_crash_hooks(AGENT);
    event(
        AGENT,
        serde_json::json!({"event": "start", "version": VERSION, "config": cli.config}),
    );
    let (reload_tx, mut reload_rx) = mpsc::unbounded_channel();
    let engine: Shared = Arc::new(Engine {
        argv0,
        cli,
        log,
        process_start: SystemTime::now(),
        hostname: common::hostname(),
        st: Mutex::new(State {
            ctx: Ctx::new(Config::default()),
            hot_reload_count: 0,
            reloading: false,
            stopping: false,
            http_addr: None,
            http_task: None,
        }),
        reload_tx,
    });
    // FAKE_START_DELAY_MS: the HTTP API comes up late (default 50 ms: "ready about 50 ms
    // after start", fluent-agents.md §2.2).
    tokio::time::sleep(common::env_ms("FAKE_START_DELAY_MS", 50)).await;
    if start_context(&engine, cfg).await.is_err() {
        return ok_exit(255);
    }

    let e = engine.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            engine_tick(&e);
        }
    });
    let e = engine.clone();
    tokio::spawn(async move {
        while let Some(trigger) = reload_rx.recv().await {
            reload(&e, trigger).await;
        }
    });

    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
    loop {
        let sig = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = quit.recv() => "SIGQUIT",
        };
        event(AGENT, serde_json::json!({"event": "signal", "signal": sig}));
        if sig == "SIGHUP" {
            request_reload(&engine, "signal");
            continue;
        }
        return shutdown(&engine, sig).await;
    }
}

/// SIGTERM/SIGINT/SIGQUIT: graceful stop, exit 0 (D3-SIGTERM.log, D3-SIGINT.log,
/// D3-SIGQUIT.log; A-cli.log). The wait is FAKE_SHUTDOWN_MS (default 500 ms, recorded
/// 0.3-0.9 s; 2000 ms while FAKE_UNHEALTHY_FILE exists, like D3-TERM-deadfwd.log).
async fn shutdown(engine: &Shared, sig: &str) -> i32 {
    let log = &engine.log;
    log.caught(sig);
    let (cfg, unhealthy) = {
        let mut st = engine.st.lock().expect("state");
        st.stopping = true;
        (st.ctx.cfg.clone(), st.ctx.unhealthy_since.is_some())
    };
    log.warn(&format!(
        "[engine] service will shutdown in max {} seconds",
        grace(&cfg)
    ));
    pause_inputs(log, &cfg);
    let wait = common::env_ms("FAKE_SHUTDOWN_MS", if unhealthy { 2000 } else { 500 });
    tokio::time::sleep(wait).await;
    log.info("[engine] service has stopped (0 pending tasks)");
    stop_pipeline(log, &cfg);
    ok_exit(0)
}

fn pause_inputs(log: &Logger, cfg: &Config) {
    log.info("[engine] pausing all inputs..");
    for p in cfg.of(Kind::Input) {
        log.info(&format!("[input] pausing {}", p.instance));
    }
}

/// Output worker threads per plugin as the recorded logs show them: forward runs 2
/// (B-conf.log), prometheus_exporter none, the rest 1.
fn workers(p: &Plugin) -> usize {
    if let Some(n) = p.prop("workers").and_then(|w| w.parse().ok()) {
        return n;
    }
    match p.name.as_str() {
        "forward" => 2,
        "prometheus_exporter" => 0,
        _ => 1,
    }
}

fn stop_pipeline(log: &Logger, cfg: &Config) {
    for p in cfg.of(Kind::Input) {
        log.info(&format!("[input] pausing {}", p.instance));
    }
    for p in cfg.of(Kind::Output) {
        for w in 0..workers(p) {
            log.info(&format!(
                "[output:{}:{}] thread worker #{w} stopping...",
                p.name, p.instance
            ));
            log.info(&format!(
                "[output:{}:{}] thread worker #{w} stopped",
                p.name, p.instance
            ));
        }
    }
}

/// The three lines of a failed bind (C_start_http_port_conflict.txt, B-conf.log).
fn bind_failed(log: &Logger, host: &str, port: &str) {
    log.error("Error binding socket");
    log.warn(&format!("Cannot listen on {host} port {port}"));
    log.error(&format!(
        "[downstream] could not bind address {host}:{port}. Aborting"
    ));
}

fn valid_port(p: &str) -> Option<u16> {
    p.trim().parse::<u16>().ok().filter(|p| *p > 0)
}

/// Starts a pipeline: the start-up lines of B-conf.log / A-cli.log, the plugins' own
/// listeners (forward and http inputs, prometheus_exporter), then the monitoring server.
/// Any failure here is a runtime init error: exit 255 after about 1 s (C_start_bad_prop.txt,
/// C_start_http_port_conflict.txt, C_start_http_port_invalid.txt, B-conf.log abort).
async fn start_context(engine: &Shared, cfg: Config) -> Result<(), ()> {
    match try_start(engine, cfg.clone()) {
        Ok(()) => Ok(()),
        Err((tasks, outputs_started)) => {
            // Errors are already logged; the engine winds down for about a second first.
            tokio::time::sleep(Duration::from_secs(1)).await;
            stop_tasks(tasks).await;
            // Once outputs run, their workers are stopped in the log too
            // (C_start_http_port_conflict.txt); an input failure ends the log right
            // there (C_start_bad_prop.txt).
            if outputs_started {
                stop_pipeline(&engine.log, &cfg);
            }
            Err(())
        }
    }
}

/// On failure: the listener tasks started so far (to be stopped) and whether the
/// outputs had been started.
type Started = Result<(), (Vec<JoinHandle<()>>, bool)>;

fn try_start(engine: &Shared, cfg: Config) -> Started {
    let log = &engine.log;
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    log.info(&format!(
        "[fluent bit] version={VERSION}, commit=, pid={}",
        std::process::id()
    ));
    let storage_type = if cfg.service("storage.path").is_some() {
        "memory+filesystem"
    } else {
        "memory"
    };
    log.info(&format!(
        "[storage] ver=1.5.4, type={storage_type}, sync=normal, checksum=off, max_chunks_up=128"
    ));
    log.info("[simd    ] SSE2");
    log.info("[cmetrics] version=2.2.1");
    log.info("[ctraces ] version=0.7.1");
    let prop_fail = |e: config::PropError| {
        log.error(&e.message());
        log.line("help", &e.help(&engine.argv0));
        log.stderr("\n");
        log.error(&format!("[engine] {} initialization failed", e.kind.word()));
    };
    for p in cfg.of(Kind::Input) {
        if let Err(e) = config::check_plugin(p) {
            prop_fail(e);
            return Err((tasks, false));
        }
        log.info(&format!("[input:{}:{}] initializing", p.name, p.instance));
        let fs = p
            .prop("storage.type")
            .is_some_and(|t| t.eq_ignore_ascii_case("filesystem"));
        log.info(&format!(
            "[input:{}:{}] storage_strategy='{}' ({})",
            p.name,
            p.instance,
            if fs { "filesystem" } else { "memory" },
            if fs {
                "memory + filesystem"
            } else {
                "memory only"
            }
        ));
        if matches!(p.name.as_str(), "forward" | "http") {
            let host = p
                .prop("listen")
                .or(p.prop("host"))
                .unwrap_or("0.0.0.0")
                .to_string();
            let port = p
                .prop("port")
                .unwrap_or(if p.name == "http" { "9880" } else { "24224" })
                .to_string();
            match http::bind(&format!("{host}:{port}"), false) {
                Ok(l) => {
                    // B-conf.log: `[input:forward:forward.2] listening on 127.0.0.1:2021 with 1 worker`
                    log.info(&format!(
                        "[input:{}:{}] listening on {host}:{port} with 1 worker",
                        p.name, p.instance
                    ));
                    tasks.push(if p.name == "http" {
                        http::serve(l, http_input_handler(engine.clone(), p.clone()))
                    } else {
                        accept_and_drop(l)
                    });
                }
                Err(_) => {
                    bind_failed(log, &host, &port);
                    log.error(&format!("[input] failed to initialize '{}' plugin", p.name));
                    log.error("[engine] input initialization failed");
                    return Err((tasks, false));
                }
            }
        }
    }
    for p in cfg.of(Kind::Filter) {
        if let Err(e) = config::check_plugin(p) {
            prop_fail(e);
            return Err((tasks, false));
        }
    }
    for p in cfg.of(Kind::Output) {
        if let Err(e) = config::check_plugin(p) {
            prop_fail(e);
            return Err((tasks, false));
        }
    }
    for p in cfg.of(Kind::Output) {
        for w in 0..workers(p) {
            log.info(&format!(
                "[output:{}:{}] worker #{w} started",
                p.name, p.instance
            ));
        }
        if p.name == "prometheus_exporter" {
            let host = p.prop("host").unwrap_or("0.0.0.0").to_string();
            let port = p.prop("port").unwrap_or("2021").to_string();
            match http::bind(&format!("{host}:{port}"), false) {
                Ok(l) => {
                    log.info(&format!(
                        "[output:prometheus_exporter:{}] listening iface={host} tcp_port={port}",
                        p.instance
                    ));
                    tasks.push(http::serve(l, exporter_handler(engine.clone())));
                }
                Err(_) => {
                    // B-conf.log, the reload that ends in "Reloading is aborted".
                    bind_failed(log, &host, &port);
                    log.error("[output] failed to initialize 'prometheus_exporter' plugin");
                    log.error("[engine] output initialization failed");
                    return Err((tasks, true));
                }
            }
        }
    }
    // Monitoring server (fluent-agents.md §2.2): off unless HTTP_Server On / -H; defaults
    // 0.0.0.0:2020. Kept running across reloads when its address does not change, so
    // polls see no refused connections (§2.3).
    let mut st = engine.st.lock().expect("state");
    if cfg.service_bool("http_server", false) {
        let host = cfg.service("http_listen").unwrap_or("0.0.0.0").to_string();
        let port_s = cfg.service("http_port").unwrap_or("2020").to_string();
        let Some(port) = valid_port(&port_s) else {
            // C_start_http_port_invalid.txt
            log.error(&format!(
                "[http_server] invalid monitoring tcp_port '{port_s}'"
            ));
            log.error("[engine] could not initialize HTTP server");
            return Err((tasks, true));
        };
        let addr = format!("{host}:{port}");
        if st.http_addr.as_deref() != Some(addr.as_str()) {
            if let Some(t) = st.http_task.take() {
                t.abort();
            }
            st.http_addr = None;
            match http::bind(&addr, false) {
                Ok(l) => {
                    st.http_task = Some(http::serve(l, monitor_handler(engine.clone())));
                    st.http_addr = Some(addr);
                }
                Err(_) => {
                    // C_start_http_port_conflict.txt
                    bind_failed(log, &host, &port_s);
                    log.error("[engine] could not start HTTP server");
                    return Err((tasks, true));
                }
            }
        }
        log.info(&format!(
            "[http_server] listen iface={host} tcp_port={port}"
        ));
    } else if let Some(t) = st.http_task.take() {
        t.abort();
        st.http_addr = None;
    }
    let g = grace(&cfg);
    log.info(&format!(
        "[engine] Shutdown Grace Period={g}, Shutdown Input Grace Period={}",
        g / 2
    ));
    let mut ctx = Ctx::new(cfg);
    ctx.tasks = tasks;
    st.ctx = ctx;
    Ok(())
}

/// Aborts listener tasks and waits until they are gone, so their ports are free again.
async fn stop_tasks(tasks: Vec<JoinHandle<()>>) {
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
}

fn accept_and_drop(l: tokio::net::TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if l.accept().await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    })
}

/// Once a second, like the engine's flush/collector timers: inputs produce records,
/// routes flush them to outputs, the unhealthy hook turns one output's flushes into
/// retries and abandoned chunks, and the health window takes a sample.
fn engine_tick(engine: &Shared) {
    let log = &engine.log;
    let mut st = engine.st.lock().expect("state");
    if st.reloading || st.stopping {
        return;
    }
    let ctx = &mut st.ctx;
    ctx.ticks += 1;
    let inputs: Vec<Plugin> = ctx.cfg.of(Kind::Input).cloned().collect();
    let outputs: Vec<Plugin> = ctx.cfg.of(Kind::Output).cloned().collect();
    let mut produced = vec![(0u64, 0u64); inputs.len()];
    let mut posted: Vec<Option<Vec<Posted>>> = vec![None; inputs.len()];
    for (i, p) in inputs.iter().enumerate() {
        let st_in = &mut ctx.inputs[i];
        let (n, b) = match p.name.as_str() {
            // dummy: Rate records per second of 28 bytes each (A_v1_metrics.json: 3 records, 84 bytes).
            "dummy" => {
                let rate = p.prop("rate").and_then(|r| r.parse().ok()).unwrap_or(1u64);
                (rate, rate * 28)
            }
            // fluentbit_metrics: one scrape every Scrape_Interval (B_v2_metrics.txt: 4 records,
            // 56626 bytes, 4 scrapes).
            "fluentbit_metrics" => {
                let every = p
                    .prop("scrape_interval")
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(2u64)
                    .max(1);
                if ctx.ticks.checked_rem(every) == Some(0) {
                    st_in.scrapes += 1;
                    (1, 14_156)
                } else {
                    (0, 0)
                }
            }
            // Records the http input received since the last flush.
            "http" => {
                let batch = std::mem::take(&mut st_in.pending);
                let sums = batch
                    .iter()
                    .fold((0, 0), |(n, b), p| (n + p.records, b + p.bytes));
                posted[i] = Some(batch);
                sums
            }
            "cpu" | "mem" | "disk" | "netif" | "random" | "health" => (1, 28),
            _ => (0, 0),
        };
        st_in.records += n;
        st_in.bytes += b;
        st_in.rate_records = n;
        st_in.rate_bytes = b;
        produced[i] = (n, b);
    }
    // FAKE_UNHEALTHY_FILE: while it exists, FAKE_UNHEALTHY_OUTPUT (alias or name.N; default
    // the first output) behaves like fwd_dead in B-conf.log / B_v1_metrics.json: flushes
    // fail and are retried; after FAKE_UNHEALTHY_DELAY_MS (default 5000, the recorded ~6 s
    // to the first "cannot be retried") each second also abandons a chunk.
    // A name that matches no output fails none (as the Fluentd fake does): a test can make
    // only an output that a new config adds fail.
    let failing = match std::env::var("FAKE_UNHEALTHY_OUTPUT") {
        Ok(name) => outputs
            .iter()
            .position(|o| o.instance == name || o.name == name),
        Err(_) => Some(0),
    };
    let unhealthy = common::unhealthy() && failing.is_some_and(|i| i < outputs.len());
    let failing = failing.unwrap_or(usize::MAX);
    if unhealthy {
        ctx.unhealthy_since.get_or_insert_with(Instant::now);
    } else {
        ctx.unhealthy_since = None;
    }
    let abandon = ctx
        .unhealthy_since
        .is_some_and(|t| t.elapsed() >= common::env_ms("FAKE_UNHEALTHY_DELAY_MS", 5000));
    let pid = std::process::id();
    // What one route carries this tick: all the input produced, or for the http input only
    // the POSTs whose tag its output's Match accepts (I_v1_metrics_after_flush.json).
    let carried = |r: &Route| -> (u64, u64) {
        match &posted[r.input] {
            None => produced[r.input],
            Some(batch) => {
                let m = outputs[r.output].prop("match").unwrap_or("");
                batch
                    .iter()
                    .filter(|p| config::tag_match(m, &p.tag))
                    .fold((0, 0), |(n, b), p| (n + p.records, b + p.bytes))
            }
        }
    };
    for r in ctx.routes.iter_mut() {
        let (n, b) = carried(r);
        if n == 0 {
            continue;
        }
        if unhealthy && r.output == failing {
            continue;
        }
        r.records += n;
        r.bytes += b;
        r.flushes += 1;
        let o = &mut ctx.outputs[r.output];
        o.proc_records += n;
        o.proc_bytes += b;
    }
    print_stdout_records(
        &ctx.routes,
        &produced,
        &posted,
        &inputs,
        &outputs,
        unhealthy.then_some(failing),
    );
    if unhealthy {
        let out = &outputs[failing];
        let route = ctx.routes.iter().position(|r| r.output == failing);
        let (n, b) = route.map(|r| carried(&ctx.routes[r])).unwrap_or((0, 0));
        let input_name = route
            .map(|r| inputs[ctx.routes[r].input].instance.clone())
            .unwrap_or_default();
        let o = &mut ctx.outputs[failing];
        o.retries += 1;
        o.retried_records += n;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let chunk = format!("{pid}-{}.{:09}.flb", now.as_secs(), now.subsec_nanos());
        log.error(&format!(
            "[output:{}:{}] no upstream connections available",
            out.name, out.instance
        ));
        log.warn(&format!(
            "[engine] failed to flush chunk '{chunk}', retry in 6 seconds: task_id={}, input={input_name} > output={} (out_id={failing})",
            o.retries % 8,
            out.instance
        ));
        if abandon {
            o.retries_failed += 1;
            o.dropped_records += n;
            if let Some(r) = route {
                ctx.routes[r].drop_records += n;
                ctx.routes[r].drop_bytes += b;
            }
            log.error(&format!(
                "[engine] chunk '{chunk}' cannot be retried: task_id={}, input={input_name} > output={}",
                o.retries % 8,
                out.instance
            ));
        }
    }
    let errors = ctx.outputs.iter().map(|o| o.errors).sum();
    let failed = ctx.outputs.iter().map(|o| o.retries_failed).sum();
    ctx.samples.push_back((errors, failed));
    let period = ctx.cfg.service_num("hc_period", 60).max(1) as usize;
    while ctx.samples.len() > period {
        ctx.samples.pop_front();
    }
}

/// The `stdout` output writes records to stdout, not stderr (fluent-agents.md §2.4):
/// `{"date":1795316305.957048,"message":"dummy"}` with `format json_lines`
/// (F-cli-hotreload.log), otherwise Fluent Bit's default
/// `[0] dummy.0: [[1795316305.957048000, {}], {"message"=>"dummy"}]`.
fn print_stdout_records(
    routes: &[Route],
    produced: &[(u64, u64)],
    posted: &[Option<Vec<Posted>>],
    inputs: &[Plugin],
    outputs: &[Plugin],
    failing: Option<usize>,
) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let mut out = String::new();
    for r in routes {
        let o = &outputs[r.output];
        if o.name != "stdout" || failing == Some(r.output) {
            continue;
        }
        let inp = &inputs[r.input];
        if let Some(batch) = &posted[r.input] {
            // I-http-input-stdout.txt: `[0] flush: [[1796392617.824443750, {}], {"msg"=>"posted-to-flush"}]`,
            // each POST under its own tag, only where the output's Match accepts that tag.
            let m = o.prop("match").unwrap_or("");
            for p in batch.iter().filter(|p| config::tag_match(m, &p.tag)) {
                out.push_str(&format!(
                    "[0] {}: [[{}.{:09}, {{}}], {}]\n",
                    p.tag,
                    now.as_secs(),
                    now.subsec_nanos(),
                    p.body.replace("\":", "\"=>")
                ));
            }
            continue;
        }
        let record = inp
            .prop("dummy")
            .filter(|_| inp.name == "dummy")
            .unwrap_or(r#"{"message":"dummy"}"#)
            .to_string();
        let json_format = o.prop("format").is_some_and(|f| f.starts_with("json"));
        for i in 0..produced[r.input].0 {
            if json_format {
                let body = record.trim().trim_start_matches('{');
                let date = format!("{}.{:06}", now.as_secs(), now.subsec_micros());
                let sep = if body.trim() == "}" { "" } else { "," };
                out.push_str(&format!("{{\"date\":{date}{sep}{body}\n"));
            } else {
                out.push_str(&format!(
                    "[{i}] {}: [[{}.{:09}, {{}}], {}]\n",
                    inp.tag(),
                    now.as_secs(),
                    now.subsec_nanos(),
                    record.replace("\":", "\"=>")
                ));
            }
        }
    }
    if !out.is_empty() {
        let mut so = std::io::stdout().lock();
        let _ = so.write_all(out.as_bytes());
        let _ = so.flush();
    }
}

/// SIGHUP and POST/PUT /api/v2/reload. POST does `kill(getpid(), SIGHUP)` in the real one,
/// so both paths log the caught signal. Returns the HTTP answer.
fn request_reload(engine: &Shared, trigger: &'static str) -> (u16, &'static str) {
    let mut st = engine.st.lock().expect("state");
    let enabled = st.ctx.cfg.service_bool("hot_reload", false);
    if !enabled {
        if trigger == "signal" {
            // A-cli.log: the process keeps running.
            engine.log.caught("SIGHUP");
            engine.log.warn("[reload] hot reloading is not enabled");
        }
        event(
            AGENT,
            serde_json::json!({"event": "reload", "trigger": trigger, "result": "not enabled"}),
        );
        // A_v2_reload_POST_disabled.json: 200 with status -1.
        return (200, r#"{"reload":"not enabled","status":-1}"#);
    }
    if st.reloading {
        if trigger == "signal" {
            engine.log.caught("SIGHUP");
        }
        event(
            AGENT,
            serde_json::json!({"event": "reload", "trigger": trigger, "result": "in progress"}),
        );
        // B_v2_reload_POST_second_b.json: 400 with status -2.
        return (400, r#"{"reload":"in progress","status":-2}"#);
    }
    st.reloading = true;
    let _ = engine.reload_tx.send(trigger);
    // B_v2_reload_POST_ok.json (and _badplugin, _badprop, _startfail: always "done").
    (200, r#"{"reload":"done","status":0}"#)
}

/// The reload itself (B-conf.log): re-read the same `-c` path; an invalid config is
/// HALTED (old pipeline keeps running, count unchanged); a valid one stops the old
/// pipeline (FAKE_RELOAD_MS, default 1000) and starts the new one; if that start fails
/// the process exits 255 ("Reloading is aborted").
async fn reload(engine: &Shared, trigger: &'static str) {
    let log = &engine.log;
    log.caught("SIGHUP");
    log.info(&format!(
        "reloading instance pid={} tid=0x7f1b4a0a5a00",
        std::process::id()
    ));
    let halted = |result: &str| {
        engine.st.lock().expect("state").reloading = false;
        event(
            AGENT,
            serde_json::json!({"event": "reload", "trigger": trigger, "result": result}),
        );
    };
    let cfg = match load(&engine.cli) {
        Ok(c) => c,
        Err(LoadError::Open) => {
            log.error("could not open configuration file, aborting.");
            log.error("[reload] reloaded config format is invalid. Reloading is halted");
            return halted("halted");
        }
        Err(e @ LoadError::Format(_)) => {
            // B-conf.log: `[config] error in live.conf:47: bad header definition`, nothing more.
            for l in e.config_lines() {
                log.error(&l);
            }
            return halted("halted");
        }
        Err(e) => {
            for l in e.config_lines() {
                log.error(&l);
            }
            log.error("[reload] reloaded config format is invalid. Reloading is halted");
            return halted("halted");
        }
    };
    if let Err(e) = config::check_properties(&cfg) {
        log.error(&e.message());
        log.error(&format!(
            "[reload] check properties for {} plugins is failed",
            e.kind.word()
        ));
        log.error("[reload] reloaded config is invalid. Reloading is halted");
        return halted("halted");
    }
    let old = engine.st.lock().expect("state").ctx.cfg.clone();
    log.info("[reload] stop everything of the old context");
    log.warn("[engine] service will shutdown when all remaining tasks are flushed");
    pause_inputs(log, &old);
    tokio::time::sleep(common::env_ms("FAKE_RELOAD_MS", 1000)).await;
    log.info("[engine] service has stopped (0 pending tasks)");
    stop_pipeline(log, &old);
    // The old plugin listeners must be closed before the new context binds the same ports.
    let old_tasks: Vec<JoinHandle<()>> = engine
        .st
        .lock()
        .expect("state")
        .ctx
        .tasks
        .drain(..)
        .collect();
    stop_tasks(old_tasks).await;
    log.info("[reload] start everything");
    if start_context(engine, cfg).await.is_err() {
        log.error("[reload] loaded configuration contains error(s). Reloading is aborted");
        log.stderr("reloading is aborted and exit\n");
        event(
            AGENT,
            serde_json::json!({"event": "reload", "trigger": trigger, "result": "aborted"}),
        );
        std::process::exit(ok_exit(255));
    }
    let count = {
        let mut st = engine.st.lock().expect("state");
        st.hot_reload_count += 1;
        st.reloading = false;
        st.hot_reload_count
    };
    log.info("[reload] successful reload done.");
    event(
        AGENT,
        serde_json::json!({"event": "reload", "trigger": trigger, "result": "done", "hot_reload_count": count}),
    );
}

/// Monkey's headers on every answer (fluent-agents.md §2.2; A_404.txt, A_root.json).
fn fb_response(status: u16, content_type: Option<&str>, body: impl Into<Vec<u8>>) -> Response {
    let body = body.into();
    let mut r = Response::new(status)
        .header("server", "Fluent Bit")
        .header("x-http-engine", "Monkey heritage");
    if let Some(ct) = content_type {
        r = r.header("content-type", ct);
    }
    r.header("content-length", &body.len().to_string())
        .body(body)
}

const JSON: Option<&str> = Some("application/json");
const PROM: Option<&str> = Some("text/plain; version=0.0.4");

fn monitor_handler(engine: Shared) -> http::Handler {
    Arc::new(move |req: Request| {
        // H_v2_reload_GET_raw.json: the monitoring server's status line has no reason phrase.
        let resp = monitor(&engine, &req).bare_status();
        // A request answered with nothing (a hang-up) is logged with status 0.
        event(
            AGENT,
            serde_json::json!({"event": "request", "method": req.method, "path": req.path, "status": resp.status}),
        );
        resp
    })
}

fn with_snapshot<T>(engine: &Shared, f: impl FnOnce(&Snapshot, &State) -> T) -> T {
    let st = engine.st.lock().expect("state");
    let snap = Snapshot {
        cfg: &st.ctx.cfg,
        inputs: &st.ctx.inputs,
        outputs: &st.ctx.outputs,
        routes: &st.ctx.routes,
        samples: &st.ctx.samples,
        uptime: st.ctx.start.elapsed().as_secs(),
        hot_reload_count: st.hot_reload_count,
        process_start: engine.process_start,
        logs: engine.log.counts(),
        hostname: &engine.hostname,
    };
    f(&snap, &st)
}

/// Metrics answer 404 for the first second of a pipeline: the first collection runs 1 s
/// after a start or reload (fluent-agents.md §2.2, §4.3).
fn metrics_ready(st: &State) -> bool {
    st.ctx.start.elapsed() >= Duration::from_secs(1)
}

fn monitor(engine: &Shared, req: &Request) -> Response {
    let not_found = || fb_response(404, None, "");
    let now = SystemTime::now();
    match req.path.as_str() {
        // A_root.json
        "/" => fb_response(200, JSON, recorded_body(ROOT_REC)),
        // A_v1_plugins.json (the plugins compiled into the recorded build)
        "/api/v1/plugins" => fb_response(200, JSON, recorded_body(PLUGINS_REC)),
        // A_v1_uptime.json, B_v1_uptime_after_reload.json (resets on reload)
        "/api/v1/uptime" => with_snapshot(engine, |s, _| {
            fb_response(200, JSON, metrics::uptime_json(s.uptime))
        }),
        // B_v1_metrics.json; 404 with an empty body for about the first second after a
        // start or reload (fluent-agents.md §2.2, §4.3), until the first 1 s collection.
        "/api/v1/metrics" => with_snapshot(engine, |s, st| {
            if !metrics_ready(st) {
                not_found()
            } else {
                fb_response(200, JSON, metrics::v1_json(s))
            }
        }),
        // A_v1_metrics_prometheus.txt, B_v1_metrics_prometheus.txt
        "/api/v1/metrics/prometheus" => with_snapshot(engine, |s, st| {
            if !metrics_ready(st) {
                not_found()
            } else {
                fb_response(200, PROM, metrics::v1_prometheus(s, now))
            }
        }),
        // B_v2_metrics.txt (no content-type in the recording)
        "/api/v2/metrics" => with_snapshot(engine, |s, st| {
            if !metrics_ready(st) {
                not_found()
            } else {
                fb_response(200, None, metrics::v2_text(s, now))
            }
        }),
        // B_v2_metrics_prometheus.txt
        "/api/v2/metrics/prometheus" => with_snapshot(engine, |s, st| {
            if !metrics_ready(st) {
                not_found()
            } else {
                fb_response(200, PROM, metrics::v2_prometheus(s))
            }
        }),
        // B_v1_health.txt (500 "error\n"), B_v1_health_early.txt (200 "ok\n");
        // A_v1_health.txt: 404 without Health_Check On.
        "/api/v1/health" => with_snapshot(engine, |s, _| {
            if !s.cfg.service_bool("health_check", false) {
                return not_found();
            }
            let h = metrics::health(
                s.samples,
                s.cfg.service_num("hc_errors_count", 5),
                s.cfg.service_num("hc_retry_failure_count", 5),
            );
            if h.ok {
                fb_response(200, None, "ok\n")
            } else {
                fb_response(500, None, "error\n")
            }
        }),
        // B_v2_health.json (500), B_v2_health_early.json and A_v2_health.json (200, defaults 5/5/60).
        "/api/v2/health" => with_snapshot(engine, |s, _| {
            let (el, rl, pl) = (
                s.cfg.service_num("hc_errors_count", 5),
                s.cfg.service_num("hc_retry_failure_count", 5),
                s.cfg.service_num("hc_period", 60),
            );
            let h = metrics::health(s.samples, el, rl);
            let body = Obj::new()
                .str("status", if h.ok { "ok" } else { "error" })
                .num("errors", h.errors)
                .num("retries_failed", h.retries_failed)
                .num("error_limit", el)
                .num("retry_failure_limit", rl)
                .num("period_limit", pl)
                .build();
            fb_response(if h.ok { 200 } else { 500 }, JSON, body)
        }),
        // B_v1_storage.json; A_v1_storage.json: 404 for about the first 5 s (the storage
        // collector runs every 5000 ms) and when storage.metrics is off.
        "/api/v1/storage" => with_snapshot(engine, |s, st| {
            if !s.cfg.service_bool("storage.metrics", true)
                || st.ctx.start.elapsed() < Duration::from_secs(5)
            {
                not_found()
            } else {
                fb_response(200, JSON, metrics::storage_json(s))
            }
        }),
        "/api/v2/reload" => match req.method.as_str() {
            // A_v2_reload_GET.json, B_v2_reload_GET_after1.json
            "GET" => {
                let n = engine.st.lock().expect("state").hot_reload_count;
                fb_response(200, JSON, format!("{{\"hot_reload_count\":{n}}}"))
            }
            // H_v2_reload_POST_no_content_length.txt, H_v2_reload_PUT_no_content_length.txt,
            // H_curl_POST_no_data.txt: without a Content-Length the connection is closed at
            // once with zero bytes; no reload, nothing logged, the count unchanged.
            "POST" | "PUT" if req.header("content-length").is_none() => Response::hang_up(),
            // H_v2_reload_POST_content_length_0.json, H_v2_reload_PUT_content_length_0.json
            "POST" | "PUT" => {
                let (code, body) = request_reload(engine, "http");
                fb_response(code, JSON, body)
            }
            // A_v2_reload_DELETE.txt
            _ => fb_response(405, None, "").header("allow", "GET, POST, PUT"),
        },
        // A_404.txt, A_v1_traces.txt: empty 404 for everything else.
        _ => not_found(),
    }
}

/// prometheus_exporter serves the v2 Prometheus layout at /metrics (B_prometheus_exporter_2021.txt).
fn exporter_handler(engine: Shared) -> http::Handler {
    Arc::new(move |req: Request| {
        if req.path != "/metrics" {
            return fb_response(404, None, "");
        }
        with_snapshot(&engine, |s, _| {
            fb_response(200, PROM, metrics::v2_prometheus(s))
        })
    })
}

/// The http input (ChatOps sink), as recorded in I_http_in_POST_*.txt: `201 Created` with
/// an empty body, and the URI path as the record's tag (the `Tag` property only for `/`);
/// the record is routed by that tag (see `Posted`). Not recorded: the 400 answers to a
/// method other than POST or a body that is not JSON follow in_http's source.
fn http_input_handler(engine: Shared, plugin: Plugin) -> http::Handler {
    Arc::new(move |req: Request| {
        let resp = |status: u16, body: &str| fb_response(status, None, body.to_string());
        if req.method != "POST" {
            return resp(400, "error: invalid HTTP method\n");
        }
        let Ok(body) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
            return resp(400, "error: invalid JSON message\n");
        };
        let path_tag = req.path.trim_start_matches('/');
        let tag = if path_tag.is_empty() {
            plugin.tag()
        } else {
            path_tag.to_string()
        };
        event(
            AGENT,
            serde_json::json!({"event": "http_input", "tag": tag, "body": body}),
        );
        {
            let mut st = engine.st.lock().expect("state");
            let idx = st
                .ctx
                .cfg
                .of(Kind::Input)
                .position(|p| p.instance == plugin.instance);
            if let Some(i) = idx {
                let n = if body.is_array() {
                    body.as_array().map_or(0, |a| a.len()) as u64
                } else {
                    1
                };
                st.ctx.inputs[i].pending.push(Posted {
                    tag,
                    records: n,
                    // I_v1_metrics_after_root.json: 25 body bytes counted as 37 (the record
                    // as msgpack with its timestamp); only the count is asserted anywhere.
                    bytes: req.body.len() as u64,
                    body: body.to_string(),
                });
            }
        }
        // I_http_in_POST_root.txt, _flush.txt, _chatops.txt: 201 Created, Monkey's headers,
        // an empty body.
        fb_response(201, None, "")
    })
}
