//! Operating Flotilla as a service: one JSON log shape for the server and the supervisor and
//! no colour codes off a terminal; `/metrics` with build info, process metrics and request
//! counts for REST and MCP; completions and the man page from the CLI definitions; and the
//! packaged systemd units and container health checks, whose commands are run here against
//! the real binaries (no container engine is needed for that).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use flotilla_e2e::server::{flotilla_bin, flotilla_command, free_port, workspace_bin};
use flotilla_e2e::{workspace_root, Home, Server};
use serde_json::Value;
use tokio::io::AsyncReadExt;

const T: Duration = Duration::from_secs(30);

fn supervisor_bin() -> PathBuf {
    workspace_bin("flotilla-supervisor", "flotilla-supervisor")
}

fn fake_fluent_bit() -> PathBuf {
    workspace_bin("flotilla-fake-agents", "fake-fluent-bit")
}

/// A command's stderr after it ran for `run` (then SIGTERM, then SIGKILL after 10 s).
async fn stderr_of(mut cmd: tokio::process::Command, run: Duration) -> String {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut err = child.stderr.take().unwrap();
    let reader = tokio::spawn(async move {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s).await;
        s
    });
    tokio::time::sleep(run).await;
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    reader.await.unwrap()
}

fn serve_cmd(home: &Home, env: &[(&str, &str)]) -> (tokio::process::Command, String) {
    let api = format!("127.0.0.1:{}", free_port());
    let mut cmd = flotilla_command();
    cmd.arg("serve")
        .arg("--config")
        .arg(&home.config)
        .args(["--opamp-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--api-listen", &api])
        .envs(env.iter().copied());
    (cmd, api)
}

/// A supervisor config for the fake Fluent Bit against an OpAMP URL that refuses connections.
fn supervisor_cmd(dir: &Path, format: &str) -> tokio::process::Command {
    let conf = dir.join("fluent-bit.conf");
    std::fs::write(&conf, "[SERVICE]\n    Flush 1\n[INPUT]\n    Name dummy\n    Tag app\n[OUTPUT]\n    Name null\n    Match app\n").unwrap();
    let toml = dir.join("supervisor.toml");
    std::fs::write(
        &toml,
        format!(
            "data_dir = {:?}\n[server]\nurl = \"ws://127.0.0.1:{}/v1/opamp\"\n[agent]\nkind = \"fluentbit\"\nexecutable = {:?}\nconfig_path = {:?}\nhttp_port = {}\nchat_ops_port = {}\n[log]\nformat = \"{format}\"\n",
            dir.join("data"),
            free_port(),
            fake_fluent_bit(),
            conf,
            free_port(),
            free_port(),
        ),
    )
    .unwrap();
    let mut cmd = tokio::process::Command::new(supervisor_bin());
    cmd.arg("--config").arg(toml);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLOTILLA_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Checks one JSON log line's shape; returns its keys.
fn json_line_keys(who: &str, line: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{who}: a log line that is not JSON ({e}): {line}"));
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{who}: not an object: {line}"));
    for key in ["timestamp", "level", "message", "target"] {
        assert!(
            obj.get(key).is_some_and(Value::is_string),
            "{who}: {key:?} missing or not a string: {line}"
        );
    }
    for nested in ["fields", "span", "spans"] {
        assert!(
            !obj.contains_key(nested),
            "{who}: nested {nested:?}: {line}"
        );
    }
    for (k, val) in obj {
        assert!(
            !val.is_object() && !val.is_array(),
            "{who}: field {k:?} is not flat: {line}"
        );
    }
    assert!(
        ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&obj["level"].as_str().unwrap()),
        "{who}: {line}"
    );
    obj.keys().cloned().collect()
}

#[tokio::test]
async fn logs_have_one_json_shape_and_no_colour_codes_off_a_terminal() {
    let home = Home::new();
    let (cmd, api) = serve_cmd(&home, &[("FLOTILLA_LOG_FORMAT", "json")]);
    // An unauthenticated call adds a warning with fields of its own.
    let poke = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let _ = reqwest::get(format!("http://{api}/api/v1/agents")).await;
    };
    let (server_log, ()) = tokio::join!(stderr_of(cmd, Duration::from_secs(3)), poke);
    let dir = tempfile::tempdir().unwrap();
    let supervisor_log =
        stderr_of(supervisor_cmd(dir.path(), "json"), Duration::from_secs(3)).await;

    let mut shapes = Vec::new();
    for (who, log, must) in [
        ("server", &server_log, "API authentication failed"),
        ("supervisor", &supervisor_log, "\"target\""),
    ] {
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 3, "{who} logged too little:\n{log}");
        assert!(log.contains(must), "{who}: {must:?} missing:\n{log}");
        for l in &lines {
            shapes.push((who, json_line_keys(who, l)));
        }
    }
    // Fields sit beside `message`, as in the supervisor's lines.
    assert!(
        server_log
            .lines()
            .any(|l| l.contains("\"message\":\"API authentication failed\"")
                && l.contains("\"reason\":")),
        "{server_log}"
    );

    // Text, to a pipe: no ANSI escapes from either.
    let (cmd, _) = serve_cmd(&home, &[]);
    let text = stderr_of(cmd, Duration::from_secs(2)).await;
    assert!(text.contains("flotilla serving"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let sup_text = stderr_of(supervisor_cmd(dir.path(), "text"), Duration::from_secs(2)).await;
    for (who, log) in [("server", &text), ("supervisor", &sup_text)] {
        assert!(
            !log.contains('\u{1b}'),
            "{who} wrote colour codes to a pipe:\n{log}"
        );
    }
}

#[tokio::test]
async fn metrics_show_build_info_process_and_rest_and_mcp_requests() {
    let home = Home::new();
    let server = Server::start(&home).await;
    server.get("/api/v1/agents").await.expect(200, "search");
    server.get("/api/v1/agents").await.expect(200, "search");
    let init = reqwest::Client::new()
        .post(server.url("/mcp"))
        .bearer_auth(&home.tokens.operator)
        .header("Accept", "application/json, text/event-stream")
        .json(
            &serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "metrics-test", "version": "1"}}}),
        )
        .send()
        .await
        .unwrap();
    assert!(init.status().is_success(), "{}", init.status());
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let commit = String::from_utf8(
        std::process::Command::new(flotilla_bin())
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let commit = commit
        .split("(commit ")
        .nth(1)
        .and_then(|s| s.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("--version without a commit: {commit}"))
        .to_string();
    for needle in [
        format!(
            "flotilla_build_info{{version=\"{}\",commit=\"{commit}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
        "flotilla_http_requests_total{api=\"rest\",method=\"GET\",route=\"/api/v1/agents\",status=\"200\"} 2".into(),
        "flotilla_http_request_duration_seconds_count{api=\"rest\",method=\"GET\",route=\"/api/v1/agents\"} 2".into(),
        "flotilla_http_requests_total{api=\"mcp\",method=\"POST\",route=\"/mcp\",status=\"200\"} 1".into(),
        "# TYPE process_cpu_seconds counter".into(),
        "process_open_fds ".into(),
    ] {
        assert!(text.contains(&needle), "{needle} missing from /metrics:\n{text}");
    }
    let rss: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no process_resident_memory_bytes:\n{text}"));
    assert!(rss > 1e6, "resident memory {rss}");
    assert_eq!(text.matches("# EOF").count(), 1, "{text}");
}

#[tokio::test]
async fn completions_and_the_man_page_come_from_the_cli() {
    let run = |args: &'static [&'static str]| async move {
        let out = flotilla_command().args(args).output().await.unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]).await;
    for word in ["agents", "queue", "labels", "--dry-run", "--output"] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    assert!(run(&["completions", "zsh"])
        .await
        .starts_with("#compdef flotilla"));
    assert!(run(&["completions", "fish"])
        .await
        .contains("complete -c flotilla"));
    let man = run(&["man"]).await;
    assert!(
        man.contains(".TH flotilla 1"),
        "{}",
        &man[..200.min(man.len())]
    );
    for word in ["queue", "audit", "Exit codes", "not confirmed"] {
        assert!(man.contains(word), "the man page lacks {word:?}");
    }
}

fn packaging(rel: &str) -> String {
    std::fs::read_to_string(workspace_root().join("packaging").join(rel)).unwrap()
}

/// The argument vector of a unit's `ExecStart=`.
fn exec_start(unit: &str) -> Vec<String> {
    unit.lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The JSON argument vector of a Containerfile's `HEALTHCHECK … CMD [...]`.
fn healthcheck(containerfile: &str) -> Vec<String> {
    let joined = containerfile.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("a HEALTHCHECK");
    let json = &line[line.find("CMD [").expect("exec-form CMD") + 4..];
    serde_json::from_str(json).expect("HEALTHCHECK CMD is a JSON array")
}

/// Static rules of a small non-root image: multi-stage, non-root USER, a health check.
fn assert_image_rules(name: &str, cf: &str) {
    assert!(
        cf.matches("\nFROM ").count() >= 2,
        "{name}: not multi-stage"
    );
    let user = cf
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .unwrap_or_else(|| panic!("{name}: no USER"));
    assert!(
        !["root", "0", "0:0"].contains(&user.trim()),
        "{name}: runs as root"
    );
    assert!(cf.contains("HEALTHCHECK"), "{name}: no HEALTHCHECK");
}

/// The `ENV` settings of a Containerfile's final stage (the image that runs).
fn image_env(cf: &str) -> Vec<(String, String)> {
    let joined = cf.replace("\\\n", " ");
    let last_stage = &joined[joined.rfind("\nFROM ").expect("a FROM")..];
    last_stage
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(|l| {
            l.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn server_unit_and_image_commands_run_and_their_health_check_passes() {
    let unit = packaging("systemd/flotilla.service");
    let cf = packaging("container/flotilla.Containerfile");
    assert_image_rules("flotilla.Containerfile", &cf);
    let home = Home::new();
    // ExecStart, as written, with the unit's paths pointed at this test's.
    let mut args = exec_start(&unit);
    assert_eq!(args[0], "/usr/local/bin/flotilla");
    for a in args.iter_mut() {
        if a == "/etc/flotilla/flotilla.toml" {
            *a = home.config.display().to_string();
        } else if a == "/var/lib/flotilla" {
            *a = home.data_dir.display().to_string();
        }
    }
    let api = format!("127.0.0.1:{}", free_port());
    let mut cmd = flotilla_command();
    cmd.args(&args[1..])
        // The unit's and the image's environment, with free ports.
        .env("FLOTILLA_LOG_FORMAT", "json")
        .env(
            "FLOTILLA_OPAMP_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("FLOTILLA_API_LISTEN", &api)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut server = cmd.spawn().unwrap();
    // The image's HEALTHCHECK command, aimed at this server.
    let mut probe = healthcheck(&cf);
    assert_eq!(probe[0], "/usr/local/bin/flotilla");
    for a in probe.iter_mut() {
        if a == "http://127.0.0.1:8080" {
            *a = format!("http://{api}");
        }
    }
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let out = flotilla_command().args(&probe[1..]).output().await.unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the image's health check never passed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = server.kill().await;
    // Down: the health check fails.
    let out = flotilla_command().args(&probe[1..]).output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The image's environment holds only variables the server reads.
    let out = flotilla_command()
        .args(["config", "check"])
        .envs(image_env(&cf))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn supervisor_unit_and_image_config_run_and_the_image_health_check_passes() {
    let unit = packaging("systemd/flotilla-supervisor.service");
    let cf = packaging("container/flotilla-supervisor.Containerfile");
    assert_image_rules("flotilla-supervisor.Containerfile", &cf);
    let args = exec_start(&unit);
    assert_eq!(
        args,
        [
            "/usr/local/bin/flotilla-supervisor",
            "--config",
            "/etc/flotilla/supervisor.toml"
        ]
    );
    // The image's supervisor.toml and fluent-bit.conf, with the fake Fluent Bit, free ports and
    // a temp data dir; everything else as shipped.
    let home = Home::new();
    let server = Server::start(&home).await;
    let dir = tempfile::tempdir().unwrap();
    let chat = free_port().to_string();
    let conf = dir.path().join("fluent-bit.conf");
    let shipped_conf = packaging("container/fluent-bit.conf");
    assert!(shipped_conf.contains("8888"));
    std::fs::write(&conf, shipped_conf.replace("8888", &chat)).unwrap();
    let shipped = packaging("container/supervisor.toml");
    assert!(shipped.contains("chat_ops_port = 8888") && shipped.contains("[agent]\n"));
    let toml = dir.path().join("supervisor.toml");
    std::fs::write(
        &toml,
        shipped.replace("8888", &chat).replace(
            "[agent]\n",
            &format!("[agent]\nhttp_port = {}\n", free_port()),
        ),
    )
    .unwrap();
    let healthz = format!("127.0.0.1:{}", free_port());
    let mut env: Vec<(String, String)> = image_env(&cf)
        .into_iter()
        .filter(|(k, _)| k != "FLOTILLA_SUPERVISOR_HEALTHZ_LISTEN")
        .collect();
    assert!(env.iter().any(|(k, _)| k == "FLOTILLA_SUPERVISOR_CONFIG"));
    env.retain(|(k, _)| k != "FLOTILLA_SUPERVISOR_CONFIG");
    env.extend([
        (
            "FLOTILLA_SUPERVISOR_CONFIG".into(),
            toml.display().to_string(),
        ),
        ("FLOTILLA_SUPERVISOR_HEALTHZ_LISTEN".into(), healthz.clone()),
        (
            "FLOTILLA_SUPERVISOR_SERVER_URL".into(),
            format!("ws://{}/v1/opamp", server.opamp),
        ),
        (
            "FLOTILLA_SUPERVISOR_AGENT_EXECUTABLE".into(),
            fake_fluent_bit().display().to_string(),
        ),
        (
            "FLOTILLA_SUPERVISOR_AGENT_CONFIG".into(),
            conf.display().to_string(),
        ),
        (
            "FLOTILLA_SUPERVISOR_DATA_DIR".into(),
            dir.path().join("data").display().to_string(),
        ),
    ]);
    let supervisor = |args: &[String]| {
        let mut c = tokio::process::Command::new(supervisor_bin());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FLOTILLA_") {
                c.env_remove(k);
            }
        }
        c.args(args).envs(env.clone()).kill_on_drop(true);
        c
    };
    let probe: Vec<String> = healthcheck(&cf);
    assert_eq!(probe[0], "/usr/local/bin/flotilla-supervisor");
    // Nothing runs yet: the probe fails.
    let out = supervisor(&probe[1..]).output().await.unwrap();
    assert!(!out.status.success(), "probe passed with nothing running");
    let mut running = supervisor(&[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let out = supervisor(&probe[1..]).output().await.unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the image's health check never passed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // And the agent it runs is in the fleet.
    let page = server
        .get("/api/v1/agents?q=type:fluentbit")
        .await
        .expect(200, "search");
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1), "{page}");
    let _ = running.kill().await;
}
