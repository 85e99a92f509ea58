//! The fake Fluentd worker (`--under-supervisor`): configures the plugins, serves
//! monitor_agent (plugins.json, plugins.ltsv, config.json, config.ltsv) and the http input,
//! simulates buffer statistics, rebuilds in place on SIGUSR2 (graceful reload, same pid)
//! and stops on SIGTERM/SIGINT with the recorded shutdown lines (sig-SIGTERM.log).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;

use super::config::{self, Category, Element, Plugin};
use super::{plugin_config_lines, read_config, version, Cli, LoadError, Log, AGENT};
use crate::common::{self, event, fd_time};
use crate::http::{self, Request, Response};
use crate::json::{self, Obj};

#[derive(Clone, Default)]
struct PStat {
    emit_records: u64,
    write_count: u64,
    rollback_count: u64,
    retry_count: u64,
    queue_length: u64,
    queue_bytes: u64,
    stage_records: u64,
    since_flush: u64,
    retry_start: Option<SystemTime>,
    /// (tag, records) the http input received since the last tick.
    pending: Vec<(String, u64)>,
}

struct WState {
    root: Element,
    plugins: Vec<Plugin>,
    stats: Vec<PStat>,
    tasks: Vec<JoinHandle<()>>,
}

struct Worker {
    cli: Cli,
    log: Log,
    ppid: u32,
    st: Mutex<WState>,
}

type Shared = Arc<Worker>;

fn exit(code: i32) -> ! {
    event(
        AGENT,
        serde_json::json!({"event": "exit", "code": code, "role": "worker"}),
    );
    std::process::exit(code)
}

pub async fn run(cli: Cli, log: Log) -> i32 {
    if std::env::var("FAKE_CRASH_TARGET").as_deref() == Ok("worker") {
        common::spawn_crash_hooks(AGENT);
    }
    let ppid = std::os::unix::process::parent_id();
    // A worker whose supervisor is gone stops too, so tests never leak processes. Not
    // recorded; serverengine ties workers to their supervisor the same way.
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if std::os::unix::process::parent_id() != ppid {
                exit(0);
            }
        }
    });
    // FAKE_START_DELAY_MS (default 1000): "Startup to monitor_agent answering takes
    // 1.0–2.0 s" (fluent-agents.md §3.1).
    tokio::time::sleep(common::env_ms("FAKE_START_DELAY_MS", 1000)).await;
    log.info("#0 init worker0 logger path=nil rotate_age=nil rotate_size=nil");
    let root = match read_config(&cli.config) {
        Ok(r) => r,
        Err(e) => {
            let (class, msg) = match e {
                LoadError::Parse(p) => ("Fluent::ConfigParseError", p.headline()),
                LoadError::Missing(p) => (
                    "Errno::ENOENT",
                    format!("No such file or directory @ rb_sysopen - {p}"),
                ),
            };
            config_error(&log, &cli.config, class, &msg);
        }
    };
    let plugins = config::plugins(&root);
    if !adding_lines(&log, &plugins, &root) {
        if let Err((class, msg)) = config::validate(&root) {
            config_error(&log, &cli.config, &class, &msg);
        }
    }
    let pid = std::process::id();
    log.info(&format!(
        "#0 starting fluentd worker pid={pid} ppid={ppid} worker=0"
    ));
    let w: Shared = Arc::new(Worker {
        cli,
        log,
        ppid,
        st: Mutex::new(WState {
            stats: vec![PStat::default(); plugins.len()],
            root,
            plugins: plugins.clone(),
            tasks: Vec::new(),
        }),
    });
    match bind_listeners(&w, &plugins) {
        Ok(tasks) => w.st.lock().expect("state").tasks = tasks,
        Err(addr) => {
            // portconflict.log: logged twice, exit 1; the supervisor respawns us.
            for _ in 0..2 {
                w.log.error(&format!(
                    "#0 unexpected error error_class=Errno::EADDRINUSE error=\"Address already in use - bind(2) for {addr}\""
                ));
                let ts = fd_time(SystemTime::now());
                for frame in [
                    "/usr/lib/ruby/3.1.0/socket.rb:201:in `bind'",
                    "/usr/lib/ruby/3.1.0/socket.rb:201:in `listen'",
                    "/usr/lib/ruby/3.1.0/socket.rb:765:in `block in tcp_server_sockets'",
                ] {
                    w.log.raw(&format!("  {ts} [error]: #0 {frame}\n"));
                }
            }
            exit(1);
        }
    }
    w.log.info("#0 fluentd worker is now running worker=0");
    event(
        AGENT,
        serde_json::json!({"event": "worker_start", "role": "worker", "ppid": ppid}),
    );

    let t = w.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            worker_tick(&t);
        }
    });
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut usr1 = signal(SignalKind::user_defined1()).expect("SIGUSR1 handler");
    let mut usr2 = signal(SignalKind::user_defined2()).expect("SIGUSR2 handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => return stop(&w).await,
            _ = int.recv() => return stop(&w).await,
            _ = usr1.recv() => {
                // fluentd.log (plugins.flushBuffers): USR1 flushes buffers.
                w.log.info("#0 force flushing buffered events");
                w.log.info("#0 flushing all buffer forcedly");
            }
            _ = usr2.recv() => graceful_reload(&w).await,
            _ = hup.recv() => {}
        }
    }
}

/// fluentd.log: `[error]: #0 config error file="/etc/fluent/live.conf" error_class=...`,
/// then the worker exits 2, which the supervisor treats as unrecoverable.
fn config_error(log: &Log, path: &str, class: &str, msg: &str) -> ! {
    log.error(&format!(
        "#0 config error file={} error_class={class} error={}",
        json::quote(path),
        json::quote(msg)
    ));
    exit(2)
}

/// The configure-time lines (sig-SIGTERM.log): matches/filters with their plugin lines,
/// then sources. Returns false at the first unknown plugin, after its "adding" line
/// (fluentd.log: `adding match pattern="foo" type="no_such_plugin_xyz"` then the error).
fn adding_lines(log: &Log, plugins: &[Plugin], root: &Element) -> bool {
    let valid = config::validate(root).is_ok();
    for p in super::configure_order(plugins) {
        match p.category {
            Category::Output => log.info(&format!(
                "adding match pattern=\"{}\" type=\"{}\"",
                p.pattern, p.type_
            )),
            Category::Filter => log.info(&format!(
                "adding filter pattern=\"{}\" type=\"{}\"",
                p.pattern, p.type_
            )),
            Category::Input => log.info(&format!("adding source type=\"{}\"", p.type_)),
        }
        if !valid && config::validate(&single(&p)).is_err() {
            return false;
        }
        plugin_config_lines(log, std::slice::from_ref(&p), true);
    }
    valid
}

fn single(p: &Plugin) -> Element {
    Element {
        name: "ROOT".into(),
        children: vec![p.element.clone()],
        ..Element::default()
    }
}

/// Listening plugins: monitor_agent (default 0.0.0.0:24220, §3.2), http (9880), forward
/// (24224). SO_REUSEPORT lets a zero-downtime successor's worker listen on the same port
/// while this one still runs, as the real supervisors share sockets (zdr-serverengine-2.4.0.log).
fn bind_listeners(w: &Shared, plugins: &[Plugin]) -> Result<Vec<JoinHandle<()>>, String> {
    let mut tasks = Vec::new();
    for p in plugins.iter().filter(|p| p.category == Category::Input) {
        let port = match p.type_.as_str() {
            "monitor_agent" => "24220",
            "http" => "9880",
            "forward" => "24224",
            _ => continue,
        };
        let bind = p.element.param("bind").unwrap_or("0.0.0.0");
        let port = p.element.param("port").unwrap_or(port);
        let addr = format!("{bind}:{port}");
        let listener = match http::bind(&addr, true) {
            Ok(l) => l,
            Err(_) => {
                for t in tasks {
                    JoinHandle::abort(&t);
                }
                return Err(addr);
            }
        };
        tasks.push(match p.type_.as_str() {
            "monitor_agent" => http::serve(listener, monitor_handler(w.clone(), p.clone(), addr)),
            "http" => http::serve(listener, http_input_handler(w.clone(), p.plugin_id.clone())),
            _ => tokio::spawn(async move {
                loop {
                    let _ = listener.accept().await;
                }
            }),
        });
    }
    Ok(tasks)
}

/// sig-SIGTERM.log: stopping, inputs shut down, a flush attempt (FAKE_SHUTDOWN_MS,
/// default 500; recorded 2-5 s with a dead forward target), outputs shut down, exit 0.
async fn stop(w: &Shared) -> i32 {
    let log = &w.log;
    log.info("#0 fluentd worker is now stopping worker=0");
    let plugins = w.st.lock().expect("state").plugins.clone();
    shutdown_lines(log, &plugins, Some(common::env_ms("FAKE_SHUTDOWN_MS", 500))).await;
    exit(0)
}

async fn shutdown_lines(log: &Log, plugins: &[Plugin], flush: Option<Duration>) {
    log.info("#0 shutting down fluentd worker worker=0");
    for p in plugins.iter().filter(|p| p.category == Category::Input) {
        log.info(&format!(
            "#0 shutting down input plugin type=:{} plugin_id=\"{}\"",
            p.type_, p.plugin_id
        ));
    }
    if let Some(d) = flush {
        tokio::time::sleep(d).await;
    }
    for p in plugins.iter().filter(|p| p.category != Category::Input) {
        log.info(&format!(
            "#0 shutting down {} plugin type=:{} plugin_id=\"{}\"",
            p.category.word(),
            p.type_,
            p.plugin_id
        ));
    }
}

/// SIGUSR2 from the supervisor after it validated the new config (fluentd.log,
/// sigusr2.log on 1.16): the worker rebuilds in place, same pid; the monitor port is
/// closed for a moment while it does (fluent-agents.md §3.4).
async fn graceful_reload(w: &Shared) {
    let Ok(root) = read_config(&w.cli.config) else {
        return;
    };
    if config::validate(&root).is_err() {
        return;
    }
    let plugins = config::plugins(&root);
    for p in super::configure_order(&plugins) {
        match p.category {
            Category::Output => w.log.info(&format!(
                "adding match pattern=\"{}\" type=\"{}\"",
                p.pattern, p.type_
            )),
            Category::Filter => w.log.info(&format!(
                "adding filter pattern=\"{}\" type=\"{}\"",
                p.pattern, p.type_
            )),
            Category::Input => w.log.info(&format!("adding source type=\"{}\"", p.type_)),
        }
        plugin_config_lines(&w.log, std::slice::from_ref(&p), true);
    }
    let (old, tasks) = {
        let mut st = w.st.lock().expect("state");
        (st.plugins.clone(), st.tasks.drain(..).collect::<Vec<_>>())
    };
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    shutdown_lines(&w.log, &old, None).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bound = bind_listeners(w, &plugins);
    // graceful-reload-portclash.log: the restart line comes first whatever happens, and a
    // new pipeline that cannot start is only reported after it, in lowercase:
    // `[error]: #0 failed to reload config: Address already in use - bind(2) for ...`.
    // The worker keeps its pid but runs nothing: the old pipeline is gone and monitor_agent's
    // port stays closed (plugins_after_graceful_portclash.txt) until a reload that works.
    w.log.info("#0 restart fluentd worker worker=0");
    let failed = bound.is_err();
    let tasks = match bound {
        Ok(t) => t,
        Err(addr) => {
            w.log.error(&format!(
                "#0 failed to reload config: Address already in use - bind(2) for {addr}"
            ));
            Vec::new()
        }
    };
    {
        let mut st = w.st.lock().expect("state");
        st.stats = vec![PStat::default(); plugins.len()];
        st.plugins = plugins;
        st.root = root;
        st.tasks = tasks;
    }
    event(
        AGENT,
        serde_json::json!({"event": "worker_reload", "role": "worker", "result": if failed { "failed" } else { "ok" }}),
    );
}

fn flush_interval(p: &Plugin) -> u64 {
    let v = p
        .element
        .child("buffer")
        .and_then(|b| b.param("flush_interval"))
        .unwrap_or("60s");
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(60.0);
    let mult = match unit {
        "m" => 60.0,
        "h" => 3600.0,
        _ => 1.0,
    };
    ((n * mult) as u64).max(1)
}

/// Once a second: sources emit (sample/dummy at `rate`, http what it received), each
/// batch goes to the first matching `<match>` like Fluentd's router, buffered outputs
/// flush every `flush_interval`. While FAKE_UNHEALTHY_FILE exists the output named by
/// FAKE_UNHEALTHY_OUTPUT (@id or @type; default the first output) fails every second the
/// way fwd_out does in plugins.json / fluentd.log: retry_count, rollback_count and the
/// queue grow and a `retry` object appears.
fn worker_tick(w: &Shared) {
    let mut st = w.st.lock().expect("state");
    let plugins = st.plugins.clone();
    let unhealthy = common::unhealthy();
    let target = std::env::var("FAKE_UNHEALTHY_OUTPUT").ok();
    let failing = plugins.iter().position(|p| {
        p.category == Category::Output
            && target
                .as_deref()
                .is_none_or(|t| p.plugin_id == t || p.type_ == t)
    });
    for (i, p) in plugins.iter().enumerate() {
        if p.category != Category::Input {
            continue;
        }
        let batches: Vec<(String, u64)> = match p.type_.as_str() {
            "sample" | "dummy" => {
                let rate = p
                    .element
                    .param("rate")
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(1u64);
                vec![(p.element.param("tag").unwrap_or(&p.type_).to_string(), rate)]
            }
            "http" => std::mem::take(&mut st.stats[i].pending),
            _ => Vec::new(),
        };
        for (tag, n) in batches {
            for (f, fp) in plugins.iter().enumerate() {
                if fp.category == Category::Filter && config::tag_match(&fp.pattern, &tag) {
                    st.stats[f].emit_records += n;
                }
            }
            if let Some(o) = plugins.iter().position(|op| {
                op.category == Category::Output && config::tag_match(&op.pattern, &tag)
            }) {
                st.stats[o].emit_records += n;
                st.stats[o].stage_records += n;
            }
        }
    }
    let now = SystemTime::now();
    for (i, p) in plugins.iter().enumerate() {
        if p.category != Category::Output || !p.buffered() {
            continue;
        }
        let s = &mut st.stats[i];
        s.since_flush += 1;
        let failing_now = unhealthy && failing == Some(i);
        if !failing_now && s.since_flush < flush_interval(p) {
            continue;
        }
        s.since_flush = 0;
        if failing_now {
            s.write_count += 1;
            s.rollback_count += 1;
            s.retry_count += 1;
            s.queue_length = 1;
            s.queue_bytes += s.stage_records * 27;
            s.stage_records = 0;
            s.retry_start.get_or_insert(now);
            let server = p.element.child("server");
            let host = server.and_then(|e| e.param("host")).unwrap_or("127.0.0.1");
            let port = server.and_then(|e| e.param("port")).unwrap_or("24224");
            let next = now + Duration::from_secs(1);
            w.log.warn(&format!(
                "#0 {}failed to flush the buffer. retry_times={} next_retry_time={} chunk=\"{:032x}\" error_class=Errno::ECONNREFUSED error=\"Connection refused - connect(2) for \\\"{host}\\\" port {port}\"",
                p.log_prefix(),
                s.retry_count - 1,
                fd_time(next),
                common::unix_millis(now)
            ));
        } else {
            if s.stage_records > 0 || s.queue_length > 0 {
                s.write_count += 1;
            }
            s.stage_records = 0;
            s.queue_length = 0;
            s.queue_bytes = 0;
            s.retry_start = None;
        }
    }
}

/// One entry of /api/plugins.json in the recorded key order (plugins.json).
fn plugin_info(p: &Plugin, s: &PStat, with_config: bool, with_retry: bool) -> Obj {
    let mut o = Obj::new()
        .str("plugin_id", &p.plugin_id)
        .str("plugin_category", p.category.word())
        .str("type", &p.type_);
    if with_config {
        // Only the directive's own parameters, as strings (plugins.json: fwd_out's config
        // is {"@type":"forward","@id":"fwd_out"} without <server>/<buffer>).
        let mut c = Obj::new();
        for (k, v) in &p.element.params {
            c.push(k, json::quote(v));
        }
        o.push("config", c.build());
    }
    match p.category {
        Category::Input => o
            .raw("output_plugin", "false")
            .raw("retry_count", "null")
            .num("emit_records", 0)
            .num("emit_size", 0),
        Category::Filter => o
            .raw("output_plugin", "false")
            .raw("retry_count", "null")
            .num("emit_records", s.emit_records)
            .num("emit_size", 0),
        Category::Output if !p.buffered() => o
            .raw("output_plugin", "true")
            .num("retry_count", s.retry_count)
            .num("emit_records", s.emit_records)
            .num("emit_size", 0)
            .num("emit_count", s.emit_records)
            .num("write_count", 0)
            .num("rollback_count", 0)
            .num("slow_flush_count", 0)
            .num("flush_time_count", 0),
        Category::Output => {
            let stage_bytes = s.stage_records * 27;
            let mut o = o
                .raw("output_plugin", "true")
                .num("buffer_queue_length", s.queue_length)
                .raw("buffer_timekeys", "[]")
                .num("buffer_total_queued_size", stage_bytes + s.queue_bytes)
                .num("retry_count", s.retry_count)
                .num("emit_records", s.emit_records)
                .num("emit_size", 0)
                .num("emit_count", s.emit_records)
                .num("write_count", s.write_count)
                .num("rollback_count", s.rollback_count)
                .num("slow_flush_count", 0)
                .num("flush_time_count", 0)
                .num("buffer_stage_length", u64::from(s.stage_records > 0))
                .num("buffer_stage_byte_size", stage_bytes)
                .num("buffer_queue_byte_size", s.queue_bytes)
                .raw("buffer_available_buffer_space_ratios", "100.0");
            if p.type_ == "forward" {
                let n = p
                    .element
                    .children
                    .iter()
                    .filter(|c| c.name == "server")
                    .count();
                o = o
                    .num("healthy_nodes_count", n)
                    .num("registered_nodes_count", n);
            }
            if let (true, Some(start)) = (with_retry, s.retry_start) {
                let next = SystemTime::now() + Duration::from_secs(1);
                o.push(
                    "retry",
                    Obj::new()
                        .str("start", &fd_time(start))
                        .num("steps", s.retry_count.saturating_sub(1))
                        .str("next_time", &fd_time(next))
                        .build(),
                );
            }
            o
        }
    }
}

fn param_bool(v: Option<&str>, default: bool) -> bool {
    v.map(|v| v == "true").unwrap_or(default)
}

/// monitor_agent (fluent-agents.md §3.3): plugins.json with its query options
/// (plugins_id_fwd_out.json, plugins_type_forward.json, plugins_noconfig.json,
/// plugins_pretty_sample.json — compact despite pretty_json — and plugins_debug.json),
/// plugins.ltsv, config.json, config.ltsv; WEBrick's 404 page otherwise.
fn monitor_handler(w: Shared, me: Plugin, addr: String) -> http::Handler {
    Arc::new(move |req: Request| {
        let resp = monitor(&w, &me, &addr, &req);
        event(
            AGENT,
            serde_json::json!({"event": "request", "role": "worker", "method": req.method, "path": req.path, "status": resp.status}),
        );
        resp
    })
}

fn monitor(w: &Shared, me: &Plugin, addr: &str, req: &Request) -> Response {
    let q = req.query_params();
    let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let json_resp = |body: String| {
        Response::new(200)
            .header("Content-Type", "application/json")
            .body(body)
    };
    let text_resp = |body: String| {
        Response::new(200)
            .header("Content-Type", "text/plain")
            .body(body)
    };
    match req.path.as_str() {
        "/api/plugins.json" | "/api/plugins" => {
            let st = w.st.lock().expect("state");
            let with_config = param_bool(
                get("with_config"),
                param_bool(me.element.param("include_config"), true),
            );
            let with_retry = param_bool(
                get("with_retry"),
                param_bool(me.element.param("include_retry"), true),
            );
            let debug = get("debug").is_some();
            let mut items = Vec::new();
            for (p, s) in st.plugins.iter().zip(&st.stats) {
                if get("@id").is_some_and(|id| id != p.plugin_id)
                    || get("@type").or(get("type")).is_some_and(|t| t != p.type_)
                    || get("tag").is_some_and(|t| {
                        p.category == Category::Input || !config::tag_match(&p.pattern, t)
                    })
                {
                    continue;
                }
                let mut info = plugin_info(p, s, with_config, with_retry);
                if debug {
                    // plugins_debug.json lists Ruby instance variables; the fake has none
                    // worth showing, so the key is there with the parameters only.
                    let mut iv = Obj::new();
                    for (k, v) in p.element.params.iter().filter(|(k, _)| !k.starts_with('@')) {
                        iv.push(k, json::quote(v));
                    }
                    info.push("instance_variables", iv.build());
                }
                items.push(info);
            }
            if req.path == "/api/plugins" {
                // plugins.ltsv: hashes (config, retry) are skipped, arrays joined, null empty.
                let mut out = String::new();
                for info in &items {
                    let row: Vec<String> = info
                        .entries()
                        .iter()
                        .filter(|(_, v)| !v.starts_with('{'))
                        .map(|(k, v)| {
                            let v = match v.as_str() {
                                "null" => String::new(),
                                a if a.starts_with('[') => {
                                    let arr: Vec<serde_json::Value> =
                                        serde_json::from_str(a).unwrap_or_default();
                                    arr.iter().map(ltsv_value).collect::<Vec<_>>().join(",")
                                }
                                s => ltsv_value(&serde_json::from_str(s).unwrap_or_default()),
                            };
                            format!("{k}:{v}")
                        })
                        .collect();
                    out.push_str(&row.join("\t"));
                    out.push('\n');
                }
                return text_resp(out);
            }
            let body = Obj::new()
                .raw("plugins", json::array(items.iter().map(Obj::build)))
                .build();
            json_resp(if debug { json::pretty(&body) } else { body })
        }
        "/api/config.json" | "/api/config" => {
            // config.json: pid is the worker's, ppid the supervisor's.
            let info = Obj::new()
                .num("pid", std::process::id())
                .num("ppid", w.ppid)
                .str("version", &version())
                .str("config_path", &w.cli.config)
                .raw("pid_file", "null")
                .raw(
                    "plugin_dirs",
                    json::array([json::quote("/etc/fluent/plugin")]),
                )
                .raw(
                    "log_path",
                    w.cli.log_path.as_deref().map_or("null".into(), json::quote),
                )
                .raw("root_dir", "null");
            if req.path == "/api/config" {
                // config.ltsv
                let row: Vec<String> = info
                    .entries()
                    .iter()
                    .map(|(k, v)| {
                        let v: serde_json::Value = serde_json::from_str(v).unwrap_or_default();
                        let v = match &v {
                            serde_json::Value::Array(a) => {
                                a.iter().map(ltsv_value).collect::<Vec<_>>().join(",")
                            }
                            other => ltsv_value(other),
                        };
                        format!("{k}:{v}")
                    })
                    .collect();
                return text_resp(format!("{}\n", row.join("\t")));
            }
            json_resp(info.build())
        }
        _ => webrick_404(&req.path, addr),
    }
}

fn ltsv_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// WEBrick's Not Found page (fluent-agents.md §3.3 "404 HTML (WEBrick)"; the body is not
/// recorded, this is WEBrick's template).
pub fn webrick_404(path: &str, addr: &str) -> Response {
    let body = format!(
        "<!DOCTYPE HTML PUBLIC \"-//W3C//DTD HTML 4.01//EN\">\n<HTML>\n  <HEAD><TITLE>Not Found</TITLE></HEAD>\n  <BODY>\n    <H1>Not Found</H1>\n    `{path}' not found.\n    <HR>\n    <ADDRESS>\n     WEBrick/1.8.1 (Ruby/3.1.2/2022-04-12) at\n     {addr}\n    </ADDRESS>\n  </BODY>\n</HTML>\n"
    );
    Response::new(404)
        .header("Content-Type", "text/html; charset=ISO-8859-1")
        .header("Server", "WEBrick/1.8.1 (Ruby/3.1.2/2022-04-12)")
        .body(body)
}

/// Fluentd's in_http, the ChatOps sink. Not recorded: it follows in_http, which takes
/// `POST /<tag>` with a JSON body (or `json=` form field) and answers 200 with an empty
/// body; a body that is not JSON gets 400.
fn http_input_handler(w: Shared, plugin_id: String) -> http::Handler {
    Arc::new(move |req: Request| {
        if req.method != "POST" {
            return Response::new(400)
                .header("Content-Type", "text/plain")
                .body("400 Bad Request\n");
        }
        let raw = String::from_utf8_lossy(&req.body).into_owned();
        let json_text = if req
            .header("content-type")
            .is_some_and(|c| c.contains("json"))
        {
            raw
        } else {
            raw.split('&')
                .find_map(|kv| kv.strip_prefix("json="))
                .map(|v| {
                    Request {
                        method: String::new(),
                        path: String::new(),
                        query: format!("j={v}"),
                        headers: vec![],
                        body: vec![],
                    }
                    .query_params()
                    .remove(0)
                    .1
                })
                .unwrap_or(raw)
        };
        let Ok(body) = serde_json::from_str::<serde_json::Value>(&json_text) else {
            return Response::new(400)
                .header("Content-Type", "text/plain")
                .body("400 Bad Request\nunexpected token\n");
        };
        let tag = req.path.trim_start_matches('/').replace('/', ".");
        event(
            AGENT,
            serde_json::json!({"event": "http_input", "role": "worker", "tag": tag.clone(), "body": body}),
        );
        {
            let mut st = w.st.lock().expect("state");
            if let Some(i) = st.plugins.iter().position(|p| p.plugin_id == plugin_id) {
                let n = body.as_array().map_or(1, |a| a.len() as u64);
                st.stats[i].pending.push((tag, n));
            }
        }
        Response::new(200)
            .header("Content-Type", "text/plain")
            .body("")
    })
}
