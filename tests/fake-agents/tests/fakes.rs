//! Runs both fakes as processes against the recorded configs and checks them against the
//! recordings in fixtures/: HTTP bodies, status codes and headers, dry-run and start-up
//! outcomes with their exit codes and log text, hot reload (done / halted / aborted with
//! 255), signals, the crash, unhealthy, event-log and http-input hooks, Fluentd's two
//! processes and v1.18's SIGUSR2 supervisor replacement.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flotilla_fake_agents::common::{recorded_body, recorded_streams};

const FB: &str = env!("CARGO_BIN_EXE_fake-fluent-bit");
const FD: &str = env!("CARGO_BIN_EXE_fake-fluentd");

fn fixture(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn fb_rec(name: &str) -> String {
    fixture(&format!("fluent-bit-5.1.1/responses/{name}"))
}

fn fd_rec(name: &str) -> String {
    fixture(&format!("fluentd-1.18.0/responses/{name}"))
}

/// Status code of a recorded response file ("HTTP 404").
fn rec_status(rec: &str) -> u16 {
    rec.lines()
        .find_map(|l| l.strip_prefix("HTTP "))
        .and_then(|s| s.trim().parse().ok())
        .expect("recorded status")
}

/// Exit code of a recorded command run ("exit=255").
fn rec_exit(rec: &str) -> i32 {
    rec.lines()
        .find_map(|l| l.strip_prefix("exit="))
        .and_then(|s| s.trim().parse().ok())
        .expect("recorded exit")
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "fake-agents-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        // Write then rename, like a supervisor pushing a config atomically.
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// A bare HTTP/1.1 client; None when the connection is refused or closed unanswered.
fn http(method: &str, port: u16, path: &str, body: Option<&str>) -> Option<Resp> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let body = body.unwrap_or("");
    let ct = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{ct}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Some(Resp {
        status,
        headers,
        body: body.to_string(),
    })
}

fn get(port: u16, path: &str) -> Option<Resp> {
    http("GET", port, path, None)
}

/// Waits until `/api/v1/metrics` answers 200: it is 404 for about the first second after a
/// start or reload (B_v1_metrics.json), and the counters are refreshed once it is up.
fn wait_metrics(port: u16) -> serde_json::Value {
    wait_until(Duration::from_secs(5), || {
        get(port, "/api/v1/metrics").filter(|r| r.status == 200)
    })
    .expect("/api/v1/metrics answers 200")
    .json()
}

/// Waits until `text()` (an agent's captured output) contains `needle`; panics with it if not.
fn wait_text(what: &str, needle: &str, text: impl Fn() -> String) {
    if wait_until(Duration::from_secs(5), || {
        text().contains(needle).then_some(())
    })
    .is_none()
    {
        panic!("{what}: {needle:?} not logged:\n{}", text());
    }
}

fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running fake, output captured to files; its process group is killed on drop.
struct Agent {
    child: Child,
    dir: TempDir,
}

impl Agent {
    fn spawn(bin: &str, args: &[&str], env: &[(&str, String)], dir: TempDir) -> Agent {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .current_dir(&dir.0)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path("stdout.log")).unwrap())
            .stderr(std::fs::File::create(dir.path("stderr.log")).unwrap())
            .env("FAKE_EVENT_LOG", dir.path("events.jsonl"))
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Agent {
            child: cmd.spawn().unwrap(),
            dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.child.try_wait().ok().flatten())
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path("stdout.log")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path("stderr.log")).unwrap_or_default()
    }

    fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn count(&self, event: &str) -> usize {
        self.events().iter().filter(|e| e["event"] == event).count()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        unsafe { libc::kill(-(self.pid() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn run(bin: &str, args: &[&str], dir: &TempDir) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .current_dir(&dir.0)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Fluent Bit log text without what differs between runs: timestamps, pids, our path.
fn fb_norm(text: &str, port: Option<u16>) -> Vec<String> {
    text.lines()
        .map(|l| {
            let mut l = l.to_string();
            if l.starts_with("[20") {
                if let Some(i) = l.find("] ") {
                    l = l[i + 2..].to_string();
                }
            }
            if let Some(i) = l.find("pid=") {
                let end = l[i + 4..]
                    .find(|c: char| !c.is_ascii_digit())
                    .map_or(l.len(), |e| i + 4 + e);
                l.replace_range(i + 4..end, "N");
            }
            if let Some(p) = port {
                l = l.replace(&p.to_string(), "2020");
            }
            l.replace(FB, "/opt/fluent-bit/bin/fluent-bit")
        })
        .collect()
}

/// Fluentd log lines without the `2026-11-22 02:51:58 +0000 ` prefix.
fn fd_norm(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| {
            if l.len() > 26 && l.as_bytes()[0].is_ascii_digit() && &l[19..26] == " +0000 " {
                l[26..].to_string()
            } else {
                l.to_string()
            }
        })
        .collect()
}

/// The recorded B config (fluent-bit.conf) on our ports.
fn fb_conf(http_port: u16, exporter_port: u16) -> String {
    fixture("fluent-bit-5.1.1/configs/fluent-bit.conf")
        .replace("2020", &http_port.to_string())
        .replace("2021", &exporter_port.to_string())
}

fn fb_start(conf: &str, env: &[(&str, String)]) -> Agent {
    let dir = TempDir::new();
    dir.write("live.conf", conf);
    Agent::spawn(FB, &["-c", "live.conf"], env, dir)
}

fn wait_http(port: u16) {
    wait_until(Duration::from_secs(10), || get(port, "/")).expect("HTTP server up");
}

fn json_keys(v: &serde_json::Value) -> Vec<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn fb_version_help_and_bad_flag() {
    let dir = TempDir::new();
    // C_version.txt
    let rec = fb_rec("C_version.txt");
    let (code, out, _) = run(FB, &["-V"], &dir);
    assert_eq!(code, rec_exit(&rec));
    assert_eq!(out, recorded_streams(&rec).0);
    // C_bogus_flag.txt
    let rec = fb_rec("C_bogus_flag.txt");
    let (code, out, err) = run(FB, &["--bogus-flag"], &dir);
    assert_eq!(code, rec_exit(&rec));
    let (rec_out, rec_err) = recorded_streams(&rec);
    assert_eq!(out.replace(FB, "/opt/fluent-bit/bin/fluent-bit"), rec_out);
    assert_eq!(
        err.replace(FB, "/opt/fluent-bit/bin/fluent-bit"),
        rec_err.trim_end_matches('\n').to_string() + "\n"
    );
}

#[test]
fn fb_dry_run_outcomes_match_recordings() {
    let dir = TempDir::new();
    for name in [
        "fluent-bit.conf",
        "fluent-bit.yaml",
        "bad-plugin.conf",
        "bad-prop.conf",
        "bad-syntax.conf",
        "wrong-ext.txt",
    ] {
        dir.write(name, &fixture(&format!("fluent-bit-5.1.1/configs/{name}")));
    }
    for (config, rec) in [
        ("fluent-bit.conf", "C_dryrun_ok.txt"),
        ("fluent-bit.yaml", "C_dryrun_ok_yaml.txt"),
        ("bad-plugin.conf", "C_dryrun_bad_plugin.txt"),
        ("bad-prop.conf", "C_dryrun_bad_prop.txt"),
        ("bad-syntax.conf", "C_dryrun_bad_syntax.txt"),
        ("wrong-ext.txt", "C_dryrun_yaml_with_txt_ext.txt"),
    ] {
        let rec = fb_rec(rec);
        let (code, out, err) = run(FB, &["-D", "-c", config], &dir);
        assert_eq!(code, rec_exit(&rec), "{config}: {err}");
        let (rec_out, rec_err) = recorded_streams(&rec);
        assert_eq!(out, rec_out, "{config}");
        assert_eq!(fb_norm(&err, None), fb_norm(rec_err, None), "{config}");
    }
}

#[test]
fn dry_run_passes_hook_accepts_what_the_live_load_refuses() {
    // FAKE_DRY_RUN_PASSES (not recorded): both dry runs say yes to a config with an
    // unknown plugin, which starting or reloading still refuses.
    let dir = TempDir::new();
    dir.write(
        "fb.conf",
        &fixture("fluent-bit-5.1.1/configs/bad-plugin.conf"),
    );
    dir.write(
        "fd.conf",
        &fixture("fluentd-1.18.0/configs/bad-plugin.conf"),
    );
    let with_hook = |bin: &str, args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .current_dir(&dir.0)
            .env("FAKE_DRY_RUN_PASSES", "1")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = with_hook(FB, &["-D", "-c", "fb.conf"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.ends_with("configuration test is successful\n"), "{err}");
    assert_eq!(with_hook(FD, &["--dry-run", "-c", "fd.conf"]).0, Some(0));
    // Without -D the config is still refused, hook or not.
    assert_eq!(with_hook(FB, &["-c", "fb.conf"]).0, Some(1));
    assert_eq!(with_hook(FD, &["-c", "fd.conf"]).0, Some(1));
}

#[test]
fn fb_start_failures_match_recordings() {
    let dir = TempDir::new();
    for name in [
        "bad-plugin.conf",
        "bad-plugin.yaml",
        "bad-prop.conf",
        "bad-syntax.conf",
        "bad.yaml",
    ] {
        dir.write(name, &fixture(&format!("fluent-bit-5.1.1/configs/{name}")));
    }
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["-c", "bad-plugin.conf"], "C_start_bad_plugin.txt"),
        (vec!["-c", "bad-plugin.yaml"], "C_start_bad_plugin_yaml.txt"),
        (vec!["-c", "bad-syntax.conf"], "C_start_bad_syntax.txt"),
        (vec!["-c", "bad.yaml"], "C_start_bad_yaml.txt"),
        (vec!["-c", "/nonexistent.conf"], "C_start_missing_file.txt"),
        (
            vec!["-i", "no_such_input", "-o", "null"],
            "C_start_cli_bad_input.txt",
        ),
        (
            vec![
                "-R",
                "/nonexistent-parsers.conf",
                "-i",
                "dummy",
                "-o",
                "null",
            ],
            "C_start_missing_parsers.txt",
        ),
        (vec!["-c", "bad-prop.conf"], "C_start_bad_prop.txt"),
    ];
    for (args, rec) in cases {
        let recorded = fb_rec(rec);
        let started = Instant::now();
        let (code, _, err) = run(FB, &args, &dir);
        assert_eq!(code, rec_exit(&recorded), "{rec}: {err}");
        assert_eq!(
            fb_norm(&err, None),
            fb_norm(recorded_streams(&recorded).1, None),
            "{rec}"
        );
        if code == 255 {
            // Runtime init errors exit 255 after about a second (fluent-agents.md §2.4).
            assert!(started.elapsed() >= Duration::from_millis(900), "{rec}");
        }
    }
    // C_start_http_port_conflict.txt: same error lines, exit 255.
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let p = port.to_string();
    let rec = fb_rec("C_start_http_port_conflict.txt");
    let (code, _, err) = run(
        FB,
        &[
            "-i",
            "dummy",
            "-o",
            "null",
            "-H",
            "-L",
            "127.0.0.1",
            "-P",
            &p,
        ],
        &dir,
    );
    assert_eq!(code, rec_exit(&rec));
    let ours = fb_norm(&err, Some(port));
    for line in fb_norm(recorded_streams(&rec).1, None)
        .iter()
        .filter(|l| l.contains("[error]") || l.contains("[ warn]"))
    {
        assert!(ours.contains(line), "missing {line:?} in {ours:#?}");
    }
    // C_start_http_port_invalid.txt
    let rec = fb_rec("C_start_http_port_invalid.txt");
    let (code, _, err) = run(
        FB,
        &[
            "-i",
            "dummy",
            "-o",
            "null",
            "-H",
            "-L",
            "127.0.0.1",
            "-P",
            "99999",
        ],
        &dir,
    );
    assert_eq!(code, rec_exit(&rec));
    assert!(err.contains("[http_server] invalid monitoring tcp_port '99999'"));
    assert!(err.contains("[engine] could not initialize HTTP server"));
}

#[test]
fn fb_endpoints_match_recordings() {
    let (port, exporter) = (free_port(), free_port());
    let agent = fb_start(&fb_conf(port, exporter), &[]);
    wait_http(port);
    let check = |path: &str, rec: &str| {
        let rec = fb_rec(rec);
        let r = get(port, path).unwrap();
        assert_eq!(r.status, rec_status(&rec), "{path}");
        assert_eq!(r.body, recorded_body(&rec), "{path}");
        for (k, v) in rec
            .lines()
            .skip(2)
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once(": "))
        {
            assert_eq!(r.header(k), Some(v), "{path} header {k}");
        }
        assert_eq!(
            r.headers.len(),
            rec.lines().skip(2).take_while(|l| !l.is_empty()).count(),
            "{path}"
        );
    };
    // Inside the first second: metrics 404, health healthy.
    check("/api/v1/metrics", "A_404.txt");
    check("/api/v1/storage", "A_v1_storage.json");
    check("/api/v1/health", "B_v1_health_early.txt");
    check("/api/v2/health", "B_v2_health_early.json");
    check("/", "B_root.json");
    check("/api/v1/plugins", "A_v1_plugins.json");
    check("/nonexistent", "A_404.txt");
    check("/api/v1/traces/", "A_v1_traces.txt");
    check("/api/v2/reload", "B_v2_reload_GET_before.json");
    let r = http("DELETE", port, "/api/v2/reload", None).unwrap();
    let rec = fb_rec("A_v2_reload_DELETE.txt");
    assert_eq!(r.status, rec_status(&rec));
    assert_eq!(r.header("allow"), Some("GET, POST, PUT"));

    wait_metrics(port);
    // B_v1_metrics.json: same plugin names (aliases and name.N) and counters.
    let ours = get(port, "/api/v1/metrics").unwrap();
    assert_eq!(ours.status, 200);
    assert_eq!(ours.header("content-type"), Some("application/json"));
    let rec: serde_json::Value =
        serde_json::from_str(recorded_body(&fb_rec("B_v1_metrics.json"))).unwrap();
    let ours = ours.json();
    assert_eq!(json_keys(&ours), json_keys(&rec));
    for section in ["input", "output"] {
        assert_eq!(
            json_keys(&ours[section]),
            json_keys(&rec[section]),
            "{section}"
        );
        for name in json_keys(&rec[section]) {
            assert_eq!(
                json_keys(&ours[section][&name]),
                json_keys(&rec[section][&name])
            );
        }
    }
    assert!(ours["input"]["dummy_in"]["records"].as_u64().unwrap() >= 5);
    // Uptime shape (B_v1_uptime.json).
    let up = get(port, "/api/v1/uptime").unwrap().json();
    assert!(up["uptime_hr"]
        .as_str()
        .unwrap()
        .starts_with("Fluent Bit has been running:  0 day, 0 hour, 0 minute and "));
    // v1 Prometheus: the recorded families (B_v1_metrics_prometheus.txt), names included.
    let prom = get(port, "/api/v1/metrics/prometheus").unwrap();
    assert_eq!(
        prom.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    let rec = fb_rec("B_v1_metrics_prometheus.txt");
    let fams = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with("# HELP"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(fams(&prom.body), fams(recorded_body(&rec)));
    assert!(prom
        .body
        .contains("fluentbit_output_retries_failed_total{name=\"fwd_dead\"} 0 "));
    // v2: same families, labels and order as B_v2_metrics_prometheus.txt / B_v2_metrics.txt.
    let v2p = get(port, "/api/v2/metrics/prometheus").unwrap();
    let rec = fb_rec("B_v2_metrics_prometheus.txt");
    for help in fams(recorded_body(&rec)) {
        // Drop families only present with dropped records / retries.
        if help.contains("drop_") || help.contains("backpressure") {
            continue;
        }
        assert!(v2p.body.contains(&help), "missing {help}");
    }
    let v2 = get(port, "/api/v2/metrics").unwrap();
    assert_eq!(v2.header("content-type"), None);
    let series = |t: &str| -> Vec<String> {
        t.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(_, rest)| {
                rest.split(" = ")
                    .next()
                    .unwrap()
                    .replace("hostname=\"vm\"", "hostname=\"H\"")
            })
            .collect()
    };
    let host = flotilla_fake_agents::common::hostname();
    let ours: Vec<String> = series(
        &v2.body
            .replace(&format!("hostname=\"{host}\""), "hostname=\"vm\""),
    );
    for s in series(recorded_body(&fb_rec("B_v2_metrics.txt"))) {
        if s.contains("drop_")
            || s.contains("backpressure")
            || s.contains("latency") && s.contains("fluentbit_metrics.1")
        {
            continue;
        }
        assert!(ours.contains(&s), "missing series {s}");
    }
    // prometheus_exporter output serves the v2 layout at /metrics (B_prometheus_exporter_2021.txt).
    let exp = get(exporter, "/metrics").unwrap();
    assert_eq!(exp.status, 200);
    assert!(exp.body.starts_with("# HELP fluentbit_uptime "));
    drop(agent);
}

#[test]
fn fb_hot_reload_done_halted_and_aborted() {
    let (port, exporter) = (free_port(), free_port());
    let good = fb_conf(port, exporter);
    let mut agent = fb_start(&good, &[("FAKE_RELOAD_MS", "300".into())]);
    wait_http(port);
    let count = || {
        get(port, "/api/v2/reload").unwrap().json()["hot_reload_count"]
            .as_u64()
            .unwrap()
    };
    let post = |path: &str| http("POST", port, path, None).unwrap();

    // B_v2_reload_POST_second_a.json then _second_b.json: back to back, the second is 400.
    let a = post("/api/v2/reload");
    let b = post("/api/v2/reload");
    assert_eq!(
        (a.status, a.body.as_str()),
        (
            200,
            recorded_body(&fb_rec("B_v2_reload_POST_second_a.json"))
        )
    );
    assert_eq!(
        (b.status, b.body.as_str()),
        (
            400,
            recorded_body(&fb_rec("B_v2_reload_POST_second_b.json"))
        )
    );
    assert_eq!(count(), 0, "the count only moves when the reload completes");
    wait_until(Duration::from_secs(5), || (count() == 1).then_some(())).expect("reload done");
    assert_eq!(
        get(port, "/api/v2/reload").unwrap().body,
        recorded_body(&fb_rec("B_v2_reload_GET_after1.json"))
    );
    // Uptime resets and metrics 404 again (B_v1_uptime_after_reload.json).
    assert_eq!(get(port, "/api/v1/uptime").unwrap().json()["uptime_sec"], 0);
    assert_eq!(get(port, "/api/v1/metrics").unwrap().status, 404);

    // Unknown plugin: "done", but HALTED; the process keeps running (B-conf.log).
    agent.dir.write(
        "live.conf",
        &format!("{good}\n[OUTPUT]\n    Name no_such_output\n    Match *\n"),
    );
    let r = post("/api/v2/reload");
    assert_eq!(
        r.body,
        recorded_body(&fb_rec("B_v2_reload_POST_badplugin.json"))
    );
    // The reload runs asynchronously; once it logged its verdict the count must not move.
    wait_text("halted reload", "Reloading is halted", || agent.stderr());
    assert_eq!(count(), 1);
    let err = fb_norm(&agent.stderr(), None);
    assert!(err.contains(
        &"[error] [config] section 'no_such_output' tried to instance a plugin name that doesn't exist"
            .to_string()
    ));
    assert!(err.contains(
        &"[error] [reload] reloaded config format is invalid. Reloading is halted".to_string()
    ));

    // Unknown property: halted too, with B-conf.log's lines.
    agent.dir.write(
        "live.conf",
        &good.replace("Retry_Limit 1", "Retry_Limit 1\n    no_such_prop 1"),
    );
    let r = post("/api/v2/reload");
    assert_eq!(
        r.body,
        recorded_body(&fb_rec("B_v2_reload_POST_badprop.json"))
    );
    wait_text(
        "halted reload",
        "check properties for output plugins is failed",
        || agent.stderr(),
    );
    assert_eq!(count(), 1);
    let recorded = fb_norm(&fb_rec("B-conf.log"), None);
    let prop_line = recorded
        .iter()
        .find(|l| l.contains("no_such_prop"))
        .unwrap();
    let err = fb_norm(&agent.stderr(), None);
    assert!(err.contains(prop_line), "missing {prop_line}");
    assert!(
        err.contains(&"[error] [reload] check properties for output plugins is failed".to_string())
    );

    // SIGHUP with a valid file reloads too (B_v2_reload_GET_after_sighup.json's path).
    agent.dir.write("live.conf", &good);
    agent.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(5), || (count() == 2).then_some(())).expect("SIGHUP reload");
    assert_eq!(
        agent
            .events()
            .iter()
            .filter(|e| e["event"] == "reload" && e["result"] == "done")
            .count(),
        2
    );

    // A config that validates but cannot start: "done", then exit 255
    // (B_v2_reload_POST_startfail.json, B-conf.log's last lines).
    agent.dir.write(
        "live.conf",
        &format!("{good}\n[INPUT]\n    Name forward\n    Listen 127.0.0.1\n    Port {exporter}\n"),
    );
    let r = post("/api/v2/reload");
    assert_eq!(
        (r.status, r.body.as_str()),
        (
            200,
            recorded_body(&fb_rec("B_v2_reload_POST_startfail.json"))
        )
    );
    let status = agent.wait(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(255));
    let err = agent.stderr();
    assert!(err
        .contains("[error] [reload] loaded configuration contains error(s). Reloading is aborted"));
    assert!(err.ends_with("reloading is aborted and exit\n"));
}

#[test]
fn fb_cli_pipeline_logs_match_a_cli_and_sigterm() {
    // A-cli.log: `-i dummy -o null -H -L 127.0.0.1 -P 2020`, SIGHUP without hot reload,
    // then SIGTERM: exit 0, same log lines.
    let port = free_port();
    let p = port.to_string();
    let dir = TempDir::new();
    let mut agent = Agent::spawn(
        FB,
        &[
            "-i",
            "dummy",
            "-o",
            "null",
            "-H",
            "-L",
            "127.0.0.1",
            "-P",
            &p,
        ],
        &[],
        dir,
    );
    wait_http(port);
    // A_v2_reload_POST_disabled.json
    let r = http("POST", port, "/api/v2/reload", None).unwrap();
    let rec = fb_rec("A_v2_reload_POST_disabled.json");
    assert_eq!(
        (r.status, r.body.as_str()),
        (rec_status(&rec), recorded_body(&rec))
    );
    // A_v2_health.json: defaults 5/5/60.
    assert_eq!(
        get(port, "/api/v2/health").unwrap().body,
        recorded_body(&fb_rec("A_v2_health.json"))
    );
    let m = wait_metrics(port);
    let rec: serde_json::Value =
        serde_json::from_str(recorded_body(&fb_rec("A_v1_metrics.json"))).unwrap();
    assert_eq!(json_keys(&m["input"]), json_keys(&rec["input"]));
    assert_eq!(json_keys(&m["output"]), json_keys(&rec["output"]));
    agent.signal(libc::SIGHUP);
    wait_text(
        "SIGHUP without hot reload",
        "[reload] hot reloading is not enabled",
        || agent.stderr(),
    );
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "SIGHUP without hot reload keeps it running"
    );
    agent.signal(libc::SIGTERM);
    let status = agent.wait(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        fb_norm(&agent.stderr(), Some(port)),
        fb_norm(&fb_rec("A-cli.log"), None)
    );
}

#[test]
fn fb_sigterm_sigint_sigquit_match_d3() {
    for (sig, rec) in [
        (libc::SIGTERM, "D3-SIGTERM.log"),
        (libc::SIGINT, "D3-SIGINT.log"),
        (libc::SIGQUIT, "D3-SIGQUIT.log"),
    ] {
        let port = free_port();
        let p = port.to_string();
        let mut agent = Agent::spawn(
            FB,
            &[
                "-i",
                "dummy",
                "-o",
                "null",
                "-H",
                "-L",
                "127.0.0.1",
                "-P",
                &p,
            ],
            &[],
            TempDir::new(),
        );
        wait_http(port);
        agent.signal(sig);
        let status = agent.wait(Duration::from_secs(5)).expect("exits");
        assert_eq!(status.code(), Some(0), "{rec}");
        assert_eq!(
            fb_norm(&agent.stderr(), Some(port)),
            fb_norm(&fb_rec(rec), None),
            "{rec}"
        );
    }
}

#[test]
fn fb_crash_hooks() {
    let port = free_port();
    let conf = fb_conf(port, free_port());
    let mut agent = fb_start(
        &conf,
        &[
            ("FAKE_CRASH_AFTER_MS", "400".into()),
            ("FAKE_CRASH_CODE", "7".into()),
        ],
    );
    assert_eq!(
        agent.wait(Duration::from_secs(5)).expect("crashes").code(),
        Some(7)
    );
    assert_eq!(agent.count("crash"), 1);

    let dir = TempDir::new();
    let flag = dir.path("crash-now");
    let port = free_port();
    dir.write("live.conf", &fb_conf(port, free_port()));
    let mut agent = Agent::spawn(
        FB,
        &["-c", "live.conf"],
        &[("FAKE_CRASH_FILE", flag.display().to_string())],
        dir,
    );
    // Up and serving, and no flag yet: still running.
    wait_http(port);
    assert!(agent.child.try_wait().unwrap().is_none());
    std::fs::write(&flag, "").unwrap();
    assert_eq!(
        agent.wait(Duration::from_secs(5)).expect("crashes").code(),
        Some(1)
    );
}

#[test]
fn fb_unhealthy_hook_turns_health_red_like_b_recordings() {
    let port = free_port();
    let dir = TempDir::new();
    let flag = dir.path("unhealthy");
    dir.write("live.conf", &fb_conf(port, free_port()));
    let agent = Agent::spawn(
        FB,
        &["-c", "live.conf"],
        &[
            ("FAKE_UNHEALTHY_FILE", flag.display().to_string()),
            ("FAKE_UNHEALTHY_OUTPUT", "fwd_dead".into()),
            ("FAKE_UNHEALTHY_DELAY_MS", "0".into()),
        ],
        dir,
    );
    // Samples are taken once the engine runs (metrics up): healthy before the flag exists.
    wait_metrics(port);
    assert_eq!(get(port, "/api/v2/health").unwrap().status, 200);
    std::fs::write(&flag, "").unwrap();
    let h = wait_until(Duration::from_secs(6), || {
        get(port, "/api/v2/health").filter(|r| r.status == 500)
    })
    .expect("unhealthy");
    let rec: serde_json::Value =
        serde_json::from_str(recorded_body(&fb_rec("B_v2_health.json"))).unwrap();
    let ours = h.json();
    assert_eq!(json_keys(&ours), json_keys(&rec));
    assert_eq!(ours["status"], "error");
    assert_eq!(
        (ours["error_limit"].clone(), ours["period_limit"].clone()),
        (rec["error_limit"].clone(), rec["period_limit"].clone())
    );
    let v1 = get(port, "/api/v1/health").unwrap();
    let rec = fb_rec("B_v1_health.txt");
    assert_eq!(
        (v1.status, v1.body.as_str()),
        (rec_status(&rec), recorded_body(&rec))
    );
    let m = get(port, "/api/v1/metrics").unwrap().json();
    let fwd = &m["output"]["fwd_dead"];
    assert!(fwd["retries"].as_u64().unwrap() > 0 && fwd["retries_failed"].as_u64().unwrap() > 0);
    assert!(m["output"]["null_out"]["proc_records"].as_u64().unwrap() > 0);
    assert!(agent
        .stderr()
        .contains("[output:forward:fwd_dead] no upstream connections available"));
}

#[test]
fn fb_yaml_config_and_http_input_sink() {
    let (port, sink) = (free_port(), free_port());
    // The recorded YAML config plus an http input in its inputs list.
    let yaml = fixture("fluent-bit-5.1.1/configs/fluent-bit.yaml")
        .replace("2020", &port.to_string())
        .replace(
            "  outputs:",
            &format!("    - name: http\n      listen: 127.0.0.1\n      port: {sink}\n      tag: chatops\n  outputs:"),
        );
    let dir = TempDir::new();
    dir.write("fluent-bit.yaml", &yaml);
    let agent = Agent::spawn(FB, &["-c", "fluent-bit.yaml"], &[], dir);
    wait_http(port);
    assert_eq!(
        get(port, "/").unwrap().body,
        recorded_body(&fb_rec("D_yaml_root.json"))
    );
    let r = http(
        "POST",
        sink,
        "/chatops.restart",
        Some(r#"{"command":"restart"}"#),
    )
    .unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(r.body, "");
    let ev = agent.events();
    let e = ev
        .iter()
        .find(|e| e["event"] == "http_input")
        .expect("http_input event");
    assert_eq!(e["tag"], "chatops.restart");
    assert_eq!(e["body"]["command"], "restart");
    // The counters are refreshed once a second: wait for the record to be counted.
    let m = wait_until(Duration::from_secs(5), || {
        get(port, "/api/v1/metrics")
            .filter(|r| r.status == 200)
            .map(|r| r.json())
            .filter(|m| m["input"]["http.1"]["records"] == 1)
    })
    .expect("the http input's record counted");
    assert_eq!(json_keys(&m["input"]), ["dummy_in", "http.1"]);
    assert!(agent.count("request") >= 3);
}

// ---------------------------------------------------------------- Fluentd

fn fd_conf(name: &str, monitor: u16, rpc: u16) -> String {
    fixture(&format!("fluentd-1.18.0/configs/{name}"))
        .replace("24220", &monitor.to_string())
        .replace("24444", &rpc.to_string())
}

fn fd_start(conf: &str, env: &[(&str, String)]) -> Agent {
    let dir = TempDir::new();
    dir.write("live.conf", conf);
    let mut env = env.to_vec();
    if !env.iter().any(|(k, _)| *k == "FAKE_START_DELAY_MS") {
        env.push(("FAKE_START_DELAY_MS", "200".into()));
    }
    env.push(("FAKE_SHUTDOWN_MS", "200".into()));
    Agent::spawn(FD, &["-c", "live.conf"], &env, dir)
}

fn worker_info(monitor: u16) -> Option<(u64, u64)> {
    let c = get(monitor, "/api/config.json")?.json();
    Some((c["pid"].as_u64()?, c["ppid"].as_u64()?))
}

#[test]
fn fd_version_dry_run_and_start_failures() {
    let dir = TempDir::new();
    for name in ["bad-plugin.conf", "bad-syntax.conf", "fluent-rich.conf"] {
        dir.write(name, &fixture(&format!("fluentd-1.18.0/configs/{name}")));
    }
    let (code, out, _) = run(FD, &["--version"], &dir);
    assert_eq!((code, out.as_str()), (0, "fluentd 1.18.0\n"));
    // dryrun-bad-plugin.log / startup-bad-plugin.log: logged, exit 1.
    let (code, out, _) = run(FD, &["--dry-run", "-c", "bad-plugin.conf"], &dir);
    assert_eq!(code, 1);
    assert_eq!(fd_norm(&out), fd_norm(&fd_rec("dryrun-bad-plugin.log")));
    let (code, out, _) = run(FD, &["-c", "bad-plugin.conf"], &dir);
    assert_eq!(code, 1);
    assert_eq!(fd_norm(&out), fd_norm(&fd_rec("startup-bad-plugin.log")));
    // dryrun-bad-syntax.log / startup-bad-syntax.log: an uncaught ConfigParseError, exit 1.
    for args in [
        vec!["--dry-run", "-c", "bad-syntax.conf"],
        vec!["-c", "bad-syntax.conf"],
    ] {
        let (code, out, err) = run(FD, &args, &dir);
        assert_eq!(code, 1);
        assert_eq!(out, "");
        assert_eq!(err, fd_rec("startup-bad-syntax.log"));
    }
    let (code, out, _) = run(FD, &["--dry-run", "-c", "fluent-rich.conf"], &dir);
    assert_eq!(code, 0);
    assert!(out.contains("starting fluentd-1.18.0 as dry run mode ruby=\"3.1.2\""));
}

#[test]
fn fd_two_processes_monitor_agent_and_rpc() {
    let (monitor, rpc) = (free_port(), free_port());
    let mut agent = fd_start(&fd_conf("fluent-rich.conf", monitor, rpc), &[]);
    let (worker, ppid) =
        wait_until(Duration::from_secs(10), || worker_info(monitor)).expect("monitor up");
    assert_eq!(
        ppid,
        u64::from(agent.pid()),
        "config.json: ppid is the supervisor"
    );
    assert_ne!(worker, ppid, "config.json: pid is the worker");

    // config.json / config.ltsv keys and values.
    let c = get(monitor, "/api/config.json").unwrap();
    assert_eq!(c.header("content-type"), Some("application/json"));
    let rec: serde_json::Value =
        serde_json::from_str(recorded_body(&fd_rec("config.json"))).unwrap();
    assert_eq!(json_keys(&c.json()), json_keys(&rec));
    assert_eq!(c.json()["version"], "1.18.0");
    let ltsv = get(monitor, "/api/config").unwrap();
    assert_eq!(ltsv.header("content-type"), Some("text/plain"));
    let cols = |t: &str| -> Vec<String> {
        t.lines()
            .flat_map(|l| l.split('\t'))
            .map(|c| c.split(':').next().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        cols(&ltsv.body),
        cols(recorded_body(&fd_rec("config.ltsv")))
    );
    assert!(ltsv.body.ends_with(":\n"));

    // plugins.json: the recorded entries; monitor and sample_in exactly (port aside).
    let ours = get(monitor, "/api/plugins.json").unwrap().json();
    let rec: serde_json::Value =
        serde_json::from_str(recorded_body(&fd_rec("plugins.json"))).unwrap();
    let (ours, rec) = (
        ours["plugins"].as_array().unwrap().clone(),
        rec["plugins"].as_array().unwrap().clone(),
    );
    assert_eq!(ours.len(), rec.len());
    let mut mon = ours[0].clone();
    mon["config"]["port"] = "24220".into();
    assert_eq!(mon, rec[0]);
    assert_eq!(ours[1], rec[1]);
    let mut rec_keys = json_keys(&rec[2]);
    rec_keys.retain(|k| k != "retry");
    let mut our_keys = json_keys(&ours[2]);
    our_keys.retain(|k| k != "retry");
    assert_eq!(our_keys, rec_keys);
    assert_eq!(ours[2]["config"], rec[2]["config"]);
    // LTSV columns (plugins.ltsv).
    let ltsv = get(monitor, "/api/plugins").unwrap();
    assert_eq!(
        cols(&ltsv.body),
        cols(recorded_body(&fd_rec("plugins.ltsv")))
    );
    // Query options (plugins_id_fwd_out.json, plugins_type_forward.json, plugins_noconfig.json,
    // plugins_pretty_sample.json).
    let one = |q: &str| get(monitor, &format!("/api/plugins.json{q}")).unwrap();
    assert_eq!(
        one("?@id=fwd_out").json()["plugins"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        one("?@type=forward").json()["plugins"][0]["plugin_id"],
        "fwd_out"
    );
    assert!(
        one("?with_config=false&with_retry=true").json()["plugins"][0]
            .get("config")
            .is_none()
    );
    assert_eq!(
        one("?pretty_json=true&@id=sample_in").body,
        recorded_body(&fd_rec("plugins_pretty_sample.json"))
    );
    assert!(one("?debug=1").body.starts_with("{\n  \"plugins\": ["));
    assert_eq!(get(monitor, "/nope").unwrap().status, 404);

    // RPC: getDump equals the recording (on our ports), dump and flushBuffers answer ok.
    let dump = get(rpc, "/api/config.getDump").unwrap();
    let expected = recorded_body(&fd_rec("rpc_config.getDump.json"))
        .replace("24220", &monitor.to_string())
        .replace("24444", &rpc.to_string());
    assert_eq!(dump.body, expected);
    for (path, rec) in [
        ("/api/config.dump", "rpc_config.dump.json"),
        ("/api/plugins.flushBuffers", "rpc_plugins.flushBuffers.json"),
    ] {
        let r = get(rpc, path).unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, recorded_body(&fd_rec(rec))),
            "{path}"
        );
    }

    // gracefulReload, valid (rate 5 -> 2, live.conf): same worker pid, new config applied
    // (plugins_after_graceful.json).
    agent
        .dir
        .write("live.conf", &fd_conf("live.conf", monitor, rpc));
    let r = http("POST", rpc, "/api/config.gracefulReload", None).unwrap();
    assert_eq!(
        r.body,
        recorded_body(&fd_rec("rpc_post_gracefulReload.json"))
    );
    let after = wait_until(Duration::from_secs(5), || {
        get(monitor, "/api/plugins.json?@id=sample_in")
            .filter(|r| r.body.contains("\"rate\":\"2\""))
    })
    .expect("reloaded");
    assert_eq!(
        after.body,
        recorded_body(&fd_rec("plugins_after_graceful.json"))
    );
    assert_eq!(worker_info(monitor).unwrap().0, worker);

    // gracefulReload with an unknown plugin / a syntax error: still {"ok":true}, old
    // pipeline kept, failure only in the log (fluentd.log).
    let live = fd_conf("live.conf", monitor, rpc);
    agent.dir.write(
        "live.conf",
        &format!("{live}\n<match foo>\n  @type no_such_plugin_xyz\n</match>\n"),
    );
    let r = get(rpc, "/api/config.gracefulReload").unwrap();
    assert_eq!(
        r.body,
        recorded_body(&fd_rec("rpc_config.gracefulReload_invalid.json"))
    );
    agent
        .dir
        .write("live.conf", &format!("{live}\n<match foo\n"));
    let r = get(rpc, "/api/config.gracefulReload").unwrap();
    assert_eq!(
        r.body,
        recorded_body(&fd_rec("rpc_config.gracefulReload_syntaxerr.json"))
    );
    wait_text(
        "refused graceful reload",
        "expected '>' at live.conf line",
        || agent.stdout(),
    );
    let log = fd_norm(&agent.stdout());
    assert!(log.contains(&"[error]: Failed to reload config file: Unknown output plugin 'no_such_plugin_xyz'. Run 'gem search -rd fluent-plugin' to find plugins".to_string()));
    assert!(log.iter().any(
        |l| l.starts_with("[error]: Failed to reload config file: expected '>' at live.conf line ")
    ));
    assert_eq!(worker_info(monitor).unwrap().0, worker);

    // config.reload: the worker is replaced (new pid), the supervisor stays.
    agent.dir.write("live.conf", &live);
    let r = get(rpc, "/api/config.reload").unwrap();
    assert_eq!(r.body, recorded_body(&fd_rec("rpc_config.reload.json")));
    let (new_worker, new_ppid) = wait_until(Duration::from_secs(8), || {
        worker_info(monitor).filter(|(w, _)| *w != worker)
    })
    .expect("new worker");
    assert_ne!(new_worker, worker);
    assert_eq!(new_ppid, u64::from(agent.pid()));
    assert!(fd_norm(&agent.stdout())
        .contains(&"[info]: Worker 0 finished unexpectedly with status 0".to_string()));

    // processes.killWorkers: no HTTP answer (rpc_processes.killWorkers.json), exit 0, both gone.
    assert!(get(rpc, "/api/processes.killWorkers").is_none());
    let status = agent.wait(Duration::from_secs(10)).expect("stops");
    assert_eq!(status.code(), Some(0));
    assert!(wait_until(Duration::from_secs(3), || (unsafe {
        libc::kill(new_worker as i32, 0)
    } != 0)
        .then_some(()))
    .is_some());
}

#[test]
fn fd_sigterm_stops_both_processes_like_recording() {
    let (monitor, rpc) = (free_port(), free_port());
    let mut agent = fd_start(&fd_conf("fluent-rich.conf", monitor, rpc), &[]);
    let (worker, _) = wait_until(Duration::from_secs(10), || worker_info(monitor)).expect("up");
    agent.signal(libc::SIGTERM);
    assert_eq!(
        agent.wait(Duration::from_secs(10)).expect("stops").code(),
        Some(0)
    );
    assert_ne!(unsafe { libc::kill(worker as i32, 0) }, 0, "worker gone");
    // sig-SIGTERM.log, from "Received graceful stop" on, minus the flush-failure warnings.
    let tail = |lines: Vec<String>| -> Vec<String> {
        lines
            .into_iter()
            .skip_while(|l| l != "[info]: Received graceful stop")
            .filter(|l| !l.starts_with("[warn]") && !l.starts_with("  "))
            .collect()
    };
    let mut rec = tail(fd_norm(&fd_rec("sig-SIGTERM.log")));
    let mut ours = tail(fd_norm(&agent.stdout()));
    // Plugin shutdown order is not significant.
    rec.sort();
    ours.sort();
    assert_eq!(ours, rec);
    // Start-up lines, pids aside, as recorded.
    let head: Vec<String> = fd_norm(&agent.stdout()).into_iter().take(5).collect();
    let rec_head: Vec<String> = fd_norm(&fd_rec("sig-SIGTERM.log"))
        .into_iter()
        .take(5)
        .collect();
    assert_eq!(head[0], rec_head[0]);
    assert_eq!(head[2..], rec_head[2..]);
}

#[test]
fn fd_sighup_with_bad_config_exits_2() {
    let (monitor, rpc) = (free_port(), free_port());
    let mut agent = fd_start(&fd_conf("fluent-rich.conf", monitor, rpc), &[]);
    wait_until(Duration::from_secs(10), || worker_info(monitor)).expect("up");
    let conf = fd_conf("fluent-rich.conf", monitor, rpc);
    agent.dir.write(
        "live.conf",
        &format!("{conf}\n<match foo>\n  @type no_such_plugin_xyz\n</match>\n"),
    );
    agent.signal(libc::SIGHUP);
    // fluentd.log's end, fluent-agents.md §4.9: the new worker exits 2, fluentd exits 2.
    assert_eq!(
        agent.wait(Duration::from_secs(10)).expect("exits").code(),
        Some(2)
    );
    let log = fd_norm(&agent.stdout());
    assert!(log.contains(&"[info]: Worker 0 finished unexpectedly with status 2".to_string()));
    assert!(log.iter().any(|l| l.starts_with(
        "[error]: #0 config error file=\"live.conf\" error_class=Fluent::NotFoundPluginError"
    )));
    assert_eq!(log.last().unwrap(), "[info]: Received graceful stop");
}

#[test]
fn fd_monitor_port_conflict_crash_loops_without_exiting() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let monitor = holder.local_addr().unwrap().port();
    let mut agent = fd_start(
        &fd_conf("fluent-rich.conf", monitor, free_port()),
        &[("FAKE_START_DELAY_MS", "50".into())],
    );
    let looped = wait_until(Duration::from_secs(8), || {
        (agent.count("worker_spawn") >= 3).then_some(())
    });
    assert!(looped.is_some(), "worker respawned");
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "portconflict.log: the supervisor keeps running"
    );
    let log = fd_norm(&agent.stdout());
    let err = format!("[error]: #0 unexpected error error_class=Errno::EADDRINUSE error=\"Address already in use - bind(2) for 127.0.0.1:{monitor}\"");
    assert!(log.contains(&err));
    assert!(log.contains(&"[info]: Worker 0 finished unexpectedly with status 1".to_string()));
    agent.signal(libc::SIGTERM);
    assert_eq!(
        agent.wait(Duration::from_secs(10)).expect("stops").code(),
        Some(0)
    );
}

#[test]
fn fd_sigusr2_on_118_replaces_the_supervisor() {
    let (monitor, rpc) = (free_port(), free_port());
    let mut agent = fd_start(
        &fd_conf("fluent-rich.conf", monitor, rpc),
        &[("FAKE_FLUENTD_ZDR_MS", "1000".into())],
    );
    let original = u64::from(agent.pid());
    wait_until(Duration::from_secs(10), || worker_info(monitor)).expect("up");
    agent.signal(libc::SIGUSR2);
    // zdr-serverengine-2.4.0.log / fluent-agents.md §4.8: the original exits 0 ...
    let status = agent.wait(Duration::from_secs(10)).expect("original exits");
    assert_eq!(status.code(), Some(0));
    // ... while a new supervisor (new pid) keeps serving.
    let (_, new_sup) = wait_until(Duration::from_secs(5), || {
        worker_info(monitor).filter(|(_, p)| *p != original)
    })
    .expect("still served");
    let zdr = agent
        .events()
        .into_iter()
        .find(|e| e["event"] == "zdr_start")
        .expect("zdr event");
    assert_eq!(zdr["new_pid"].as_u64(), Some(new_sup));
    let log = fd_norm(&agent.stdout());
    for line in [
        "[info]: start zero-downtime-restart sequence",
        "[info]: zero-downtime-restart: stop the old supervisor",
    ] {
        assert!(log.contains(&line.to_string()), "{line}");
    }
    assert!(
        get(rpc, "/api/config.dump").is_some(),
        "RPC moved to the new supervisor"
    );
    unsafe { libc::kill(new_sup as i32, libc::SIGTERM) };
    assert!(wait_until(Duration::from_secs(10), || (unsafe {
        libc::kill(new_sup as i32, 0)
    } != 0)
        .then_some(()))
    .is_some());
}

#[test]
fn fd_sigusr2_on_116_is_a_graceful_reload() {
    let (monitor, rpc) = (free_port(), free_port());
    let mut agent = fd_start(
        &fd_conf("fluent-rich.conf", monitor, rpc),
        &[("FAKE_FLUENTD_VERSION", "1.16.11".into())],
    );
    let (worker, _) = wait_until(Duration::from_secs(10), || worker_info(monitor)).expect("up");
    let c = get(monitor, "/api/config.json").unwrap().json();
    let rec: serde_json::Value = serde_json::from_str(recorded_body(&fixture(
        "fluentd-1.16.11/responses/config.json",
    )))
    .unwrap();
    assert_eq!(c["version"], rec["version"]);
    // 1.16 has no zeroDowntimeRestart RPC.
    assert_eq!(
        get(rpc, "/api/processes.zeroDowntimeRestart")
            .unwrap()
            .status,
        404
    );
    agent
        .dir
        .write("live.conf", &fd_conf("live.conf", monitor, rpc));
    agent.signal(libc::SIGUSR2);
    // sigusr2.log: "Reloading new config", same worker pid, same supervisor.
    wait_until(Duration::from_secs(5), || {
        get(monitor, "/api/plugins.json?@id=sample_in")
            .filter(|r| r.body.contains("\"rate\":\"2\""))
    })
    .expect("reloaded");
    assert_eq!(
        worker_info(monitor).unwrap(),
        (worker, u64::from(agent.pid()))
    );
    assert!(agent.child.try_wait().unwrap().is_none());
    assert!(fd_norm(&agent.stdout()).contains(&"[info]: Reloading new config".to_string()));
    assert_eq!(agent.count("zdr_start"), 0);
}

#[test]
fn fd_http_input_unhealthy_and_worker_crash_hooks() {
    let (monitor, rpc, sink) = (free_port(), free_port(), free_port());
    let dir = TempDir::new();
    let flag = dir.path("unhealthy");
    let conf = fd_conf("fluent-rich.conf", monitor, rpc)
        + &format!("<source>\n  @type http\n  bind 127.0.0.1\n  port {sink}\n</source>\n<match chatops.**>\n  @type null\n</match>\n");
    dir.write("live.conf", &conf);
    let agent = Agent::spawn(
        FD,
        &["-c", "live.conf"],
        &[
            ("FAKE_START_DELAY_MS", "200".into()),
            ("FAKE_UNHEALTHY_FILE", flag.display().to_string()),
            ("FAKE_UNHEALTHY_OUTPUT", "fwd_out".into()),
        ],
        dir,
    );
    wait_until(Duration::from_secs(10), || worker_info(monitor)).expect("up");
    let r = http(
        "POST",
        sink,
        "/chatops.restart",
        Some(r#"{"command":"restart"}"#),
    )
    .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    let e = agent
        .events()
        .into_iter()
        .find(|e| e["event"] == "http_input")
        .expect("event");
    assert_eq!(
        (e["tag"].as_str(), e["body"]["command"].as_str()),
        (Some("chatops.restart"), Some("restart"))
    );

    // Unhealthy: fwd_out retries like plugins.json (retry object, same keys).
    std::fs::write(&flag, "").unwrap();
    let p = wait_until(Duration::from_secs(5), || {
        let v = get(monitor, "/api/plugins.json?@id=fwd_out")?.json();
        let p = v["plugins"][0].clone();
        (p["retry_count"].as_u64()? >= 2).then_some(p)
    })
    .expect("retrying");
    let rec: serde_json::Value =
        serde_json::from_str(recorded_body(&fd_rec("plugins_id_fwd_out.json"))).unwrap();
    assert_eq!(json_keys(&p), json_keys(&rec["plugins"][0]));
    assert_eq!(
        json_keys(&p["retry"]),
        json_keys(&rec["plugins"][0]["retry"])
    );
    assert!(p["buffer_queue_length"].as_u64().unwrap() >= 1);
    let null = get(monitor, "/api/plugins.json?@type=null").unwrap().json();
    assert_eq!(
        null["plugins"][0]["emit_records"], 1,
        "the http record reached its <match>"
    );
    drop(agent);

    // FAKE_CRASH_TARGET=worker: the worker dies, the supervisor respawns it.
    let mut agent = fd_start(
        &fd_conf("fluent-rich.conf", monitor, rpc),
        &[
            ("FAKE_CRASH_TARGET", "worker".into()),
            ("FAKE_CRASH_AFTER_MS", "1500".into()),
            ("FAKE_CRASH_CODE", "3".into()),
        ],
    );
    let (first, _) = wait_until(Duration::from_secs(10), || worker_info(monitor)).expect("up");
    wait_until(Duration::from_secs(10), || {
        worker_info(monitor).filter(|(w, _)| *w != first)
    })
    .expect("respawned");
    assert!(fd_norm(&agent.stdout())
        .contains(&"[info]: Worker 0 finished unexpectedly with status 3".to_string()));
    assert!(agent.child.try_wait().unwrap().is_none());
}

/// Sends `raw` as is and returns every byte the server sent until it closed the connection
/// (or 3 s passed).
fn raw_exchange(port: u16, raw: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// The recorded http-input.conf (H_*, I_* recordings) on our ports.
fn http_input_conf(http_port: u16, input_port: u16, dir: &TempDir) -> String {
    fixture("fluent-bit-5.1.1/configs/http-input.conf")
        .replace("2020", &http_port.to_string())
        .replace("9880", &input_port.to_string())
        .replace("/var/log/fluent-bit", &dir.0.display().to_string())
}

#[test]
fn fb_reload_without_content_length_is_dropped_like_h_recordings() {
    let (port, input) = (free_port(), free_port());
    let dir = TempDir::new();
    let conf = http_input_conf(port, input, &dir);
    dir.write("live.conf", &conf);
    let agent = Agent::spawn(
        FB,
        &["-c", "live.conf"],
        &[("FAKE_RELOAD_MS", "300".into())],
        dir,
    );
    wait_http(port);
    let count = || get(port, "/api/v2/reload").unwrap().json()["hot_reload_count"].clone();
    // H_v2_reload_GET_raw.json: the exact bytes, a status line without a reason phrase.
    let got = raw_exchange(
        port,
        "GET /api/v2/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    let rec = fb_rec("H_v2_reload_GET_raw.json");
    let rec_bytes = rec
        .split("--- response bytes received (Python repr) ---\nb'")
        .nth(1)
        .and_then(|r| r.split("'\n").next())
        .unwrap()
        .replace("\\r\\n", "\r\n");
    assert_eq!(String::from_utf8_lossy(&got), rec_bytes);
    // H_v2_reload_POST_no_content_length.txt, H_v2_reload_PUT_no_content_length.txt: the
    // connection is closed with zero bytes, nothing is reloaded or logged.
    for method in ["POST", "PUT"] {
        let got = raw_exchange(
            port,
            &format!("{method} /api/v2/reload HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        );
        assert!(
            got.is_empty(),
            "{method}: {}",
            String::from_utf8_lossy(&got)
        );
        let rec = fb_rec(&format!("H_v2_reload_{method}_no_content_length.txt"));
        assert!(
            rec.contains("--- response bytes received (Python repr) ---\nb''\n"),
            "the recording has no answer either: {rec}"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(), 0);
    assert!(
        !agent.stderr().contains("reloading instance"),
        "{}",
        agent.stderr()
    );
    // H_v2_reload_POST_content_length_0.json: with `Content-Length: 0` it reloads.
    let got = raw_exchange(
        port,
        "POST /api/v2/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    let got = String::from_utf8_lossy(&got);
    let body = got.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    assert_eq!(
        body,
        recorded_body(&fb_rec("H_v2_reload_POST_content_length_0.json")),
        "{got}"
    );
    wait_until(Duration::from_secs(5), || (count() == 1).then_some(()))
        .expect("hot_reload_count 0 -> 1");
}

#[test]
fn fb_http_input_routes_by_url_path_like_i_recordings() {
    let (port, input) = (free_port(), free_port());
    let dir = TempDir::new();
    let conf = http_input_conf(port, input, &dir);
    dir.write("live.conf", &conf);
    let agent = Agent::spawn(FB, &["-c", "live.conf"], &[], dir);
    wait_http(port);
    let metrics = |records: u64| {
        wait_until(Duration::from_secs(5), || {
            get(port, "/api/v1/metrics")
                .filter(|r| r.status == 200)
                .map(|r| r.json())
                .filter(|m| m["input"]["chatops_in"]["records"] == records)
        })
        .unwrap_or_else(|| panic!("{records} records counted"))
    };
    let rec_metrics = |name: &str| -> serde_json::Value {
        serde_json::from_str(recorded_body(&fb_rec(name))).unwrap()
    };
    let outputs = |m: &serde_json::Value| {
        (
            m["output"]["chatops_file"]["proc_records"].clone(),
            m["output"]["all_echo"]["proc_records"].clone(),
        )
    };
    // Waits for the counters of the outputs to reach the recorded ones (the flush runs once
    // a second, after the input counted the record).
    let settle = |rec: &str, records: u64| {
        let want = outputs(&rec_metrics(rec));
        metrics(records);
        wait_until(Duration::from_secs(5), || {
            let m = wait_metrics(port);
            (outputs(&m) == want).then_some(())
        })
        .unwrap_or_else(|| panic!("{rec}: outputs {:?}", outputs(&wait_metrics(port))));
    };
    for (path, msg, rec, after) in [
        (
            "/",
            "posted-to-root",
            "I_http_in_POST_root.txt",
            "I_v1_metrics_after_root.json",
        ),
        (
            "/flush",
            "posted-to-flush",
            "I_http_in_POST_flush.txt",
            "I_v1_metrics_after_flush.json",
        ),
        (
            "/chatops",
            "posted-to-chatops",
            "I_http_in_POST_chatops.txt",
            "I_v1_metrics_after_chatops.json",
        ),
    ] {
        let body = format!("{{\"msg\": \"{msg}\"}}");
        let got = raw_exchange(
            input,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{input}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        let got = String::from_utf8_lossy(&got).replace(&input.to_string(), "9880");
        let want = fb_rec(rec);
        let head = got.split("\r\n\r\n").next().unwrap();
        assert!(
            head.starts_with("HTTP/1.1 201 Created\r\n"),
            "{path}: {got}"
        );
        for h in [
            "server: Fluent Bit",
            "x-http-engine: Monkey heritage",
            "content-length: 0",
        ] {
            assert!(head.contains(h), "{path}: {h} missing from {got}");
            assert!(want.contains(h), "{rec} says {h}");
        }
        let records = match path {
            "/" => 1,
            "/flush" => 2,
            _ => 3,
        };
        settle(after, records);
    }
    // I-http-input-stdout.txt: the stdout output (Match *) printed the tags in order.
    let tags: Vec<String> = agent
        .stdout()
        .lines()
        .filter_map(|l| {
            l.strip_prefix("[0] ")?
                .split(':')
                .next()
                .map(str::to_string)
        })
        .collect();
    let recorded: Vec<String> = fb_rec("I-http-input-stdout.txt")
        .lines()
        .filter_map(|l| {
            l.strip_prefix("[0] ")?
                .split(':')
                .next()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(tags, recorded, "{}", agent.stdout());
    assert!(
        agent.stdout().contains(r#"{"msg"=>"posted-to-flush"}"#),
        "{}",
        agent.stdout()
    );
}

#[test]
fn fd_graceful_reload_failing_in_the_worker_like_portclash_recording() {
    let (monitor, rpc) = (free_port(), free_port());
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().port();
    let base = fd_conf("graceful-base.conf", monitor, rpc);
    let agent = fd_start(&base, &[]);
    let (worker, _) = wait_until(Duration::from_secs(10), || worker_info(monitor)).expect("up");
    // graceful-portclash.conf adds an http source on a port another process holds; it
    // passes the dry run (dryrun-portclash.log) and the RPC still says ok.
    agent.dir.write(
        "live.conf",
        &fd_conf("graceful-portclash.conf", monitor, rpc).replace("9880", &taken.to_string()),
    );
    let r = get(rpc, "/api/config.gracefulReload").unwrap();
    assert_eq!(
        r.body,
        recorded_body(&fd_rec("rpc_config.gracefulReload_portclash.json"))
    );
    let failed = format!(
        "[error]: #0 failed to reload config: Address already in use - bind(2) for 127.0.0.1:{taken}"
    );
    wait_text("failed graceful reload", &failed, || agent.stdout());
    // graceful-reload-portclash.log: the restart line first, then the lowercase error.
    let rec = fd_norm(&fd_rec("graceful-reload-portclash.log"));
    let rec_restart = rec
        .iter()
        .position(|l| l == "[info]: #0 restart fluentd worker worker=0")
        .unwrap();
    assert!(rec[rec_restart + 1].starts_with("[error]: #0 failed to reload config: "));
    let log = fd_norm(&agent.stdout());
    let at = log.iter().position(|l| *l == failed).unwrap();
    assert_eq!(
        log[at - 1],
        "[info]: #0 restart fluentd worker worker=0",
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("Failed to reload config")),
        "the supervisor-side wording is for configs it refuses itself: {log:#?}"
    );
    // plugins_after_graceful_portclash.txt: same worker, nothing listening on monitor_agent.
    std::thread::sleep(Duration::from_millis(500));
    assert!(get(monitor, "/api/plugins.json").is_none());
    // rpc_config.gracefulReload_recover.json: a good config brings it back, same worker.
    agent
        .dir
        .write("live.conf", &fd_conf("graceful-good2.conf", monitor, rpc));
    get(rpc, "/api/config.gracefulReload").unwrap();
    let (after, _) = wait_until(Duration::from_secs(10), || worker_info(monitor)).expect("back");
    assert_eq!(after, worker);
}
