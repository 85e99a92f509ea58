//! The `flotilla` command line: `--version`, `serve` and `config check` refusing invalid
//! configurations — exit non-zero, a message naming the offending setting, and nothing opened
//! or bound first (the listen ports are held by the test, so a server that bound before
//! validating would fail with "cannot listen" instead; the data directory must not have been
//! created) — and `audit verify` refusing to verify a database that does not exist.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use flotilla_e2e::run_flotilla;
use flotilla_e2e::server::{toml_str, OPERATOR};

/// A config must be refused well within this; a server that accepted it would run forever.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// A directory with a valid base config (data dir not yet created, a valid tokens file) and
/// two ports held by this test for the duration.
struct Case {
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    tokens_file: PathBuf,
    opamp: TcpListener,
    api: TcpListener,
}

impl Case {
    fn new() -> Case {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-cli-")
            .tempdir()
            .unwrap();
        let data_dir = dir.path().join("data");
        let tokens_file = dir.path().join("tokens");
        flotilla_e2e::write_secret(
            &tokens_file,
            format!("{OPERATOR} operator 0123456789abcdef0123456789abcdef\n"),
        );
        Case {
            data_dir,
            tokens_file,
            opamp: TcpListener::bind("127.0.0.1:0").unwrap(),
            api: TcpListener::bind("127.0.0.1:0").unwrap(),
            dir,
        }
    }

    fn opamp_addr(&self) -> String {
        self.opamp.local_addr().unwrap().to_string()
    }

    fn api_addr(&self) -> String {
        self.api.local_addr().unwrap().to_string()
    }

    /// The base config (valid apart from the held ports) followed by `extra` lines, which may
    /// open tables; `api_table` is inserted into `[api]` after `tokens_file`.
    fn config(&self, api_table: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join("flotilla.toml");
        std::fs::write(
            &path,
            format!(
                "data_dir = {}\n[api]\ntokens_file = {}\n{api_table}\n{extra}",
                toml_str(&self.data_dir),
                toml_str(&self.tokens_file)
            ),
        )
        .unwrap();
        path
    }

    /// `flotilla serve --config <config> <flags>` with the held ports unless `flags` names them.
    async fn serve(&self, config: &Path, flags: &[&str], env: &[(&str, &str)]) -> Output {
        let config = config.to_str().unwrap();
        let (op, ap) = (self.opamp_addr(), self.api_addr());
        let mut args = vec!["serve", "--config", config];
        if !flags.contains(&"--opamp-listen") {
            args.extend(["--opamp-listen", &op]);
        }
        if !flags.contains(&"--api-listen") {
            args.extend(["--api-listen", &ap]);
        }
        args.extend(flags);
        run_flotilla(&args, env, EXIT_TIMEOUT).await
    }

    /// Asserts a refused start: non-zero exit, every needle in stderr, no bind attempted,
    /// no data directory created.
    fn assert_refused(&self, out: &Output, needles: &[&str]) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "serve should have refused the configuration; exited {} with stderr:\n{stderr}",
            out.status
        );
        for n in needles {
            assert!(
                stderr.contains(n),
                "stderr should name {n:?}; got:\n{stderr}"
            );
        }
        assert!(
            !stderr.contains("cannot listen"),
            "validation must happen before any port is bound; got:\n{stderr}"
        );
        assert!(
            !self.data_dir.exists(),
            "the data directory must not be created for a refused configuration (stderr:\n{stderr})"
        );
    }
}

/// The commit the workspace is at, as `--version` shows it.
fn head_commit() -> String {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(flotilla_e2e::workspace_root())
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "the e2e tests run in a git checkout; git rev-parse failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn version_is_the_workspace_version_and_commit() {
    let out = run_flotilla(&["--version"], &[], EXIT_TIMEOUT).await;
    assert!(out.status.success(), "--version exited {}", out.status);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "flotilla {} (commit {})",
            env!("CARGO_PKG_VERSION"),
            head_commit()
        )
    );
}

/// A verifier must never create what it verifies: pointed at a data directory that does not
/// exist, or run where there is none, `audit verify` used to create an empty database and
/// report it "intact".
#[tokio::test]
async fn audit_verify_refuses_a_missing_database_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no").join("such").join("data");
    let v = flotilla_e2e::audit_verify(&missing).await;
    assert_eq!(
        v.code,
        Some(3),
        "exit code; stdout {} stderr {}",
        v.stdout,
        v.stderr
    );
    assert!(!v.stdout.contains("intact"), "{}", v.stdout);
    assert!(
        v.stderr.contains("no Flotilla database") && v.stderr.contains("no/such/data"),
        "{}",
        v.stderr
    );
    assert!(!dir.path().join("no").exists(), "the path was created");

    // The default data directory (`data` under the working directory) in an empty directory.
    let mut cmd = flotilla_e2e::server::flotilla_command();
    cmd.args(["audit", "verify"]).current_dir(dir.path());
    let out = tokio::time::timeout(EXIT_TIMEOUT, cmd.output())
        .await
        .expect("audit verify exits")
        .expect("run flotilla");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("data/flotilla.db"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing may be created in the working directory"
    );
}

/// `config check` as the issue met it: it must fail exactly when `serve` would.
async fn config_check(config: &Path, env: &[(&str, &str)]) -> Output {
    run_flotilla(
        &["config", "check", "--config", config.to_str().unwrap()],
        env,
        EXIT_TIMEOUT,
    )
    .await
}

fn assert_failed_naming(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "should have failed; stderr:\n{stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "stderr should name {n:?}; got:\n{stderr}"
        );
    }
}

#[tokio::test]
async fn a_log_level_that_logs_nothing_is_refused_by_check_and_serve() {
    let case = Case::new();
    let config = case.config("", "");
    let env = [("FLOTILLA_LOG", "verbose")];
    assert_failed_naming(
        &config_check(&config, &env).await,
        &["log.level", "verbose"],
    );
    let out = case.serve(&config, &[], &env).await;
    case.assert_refused(&out, &["log.level", "verbose"]);
}

#[tokio::test]
async fn unknown_and_empty_flotilla_variables_are_refused() {
    let case = Case::new();
    let config = case.config("", "");
    let env = [("FLOTILLA_LOG_LEVEL", "debug")];
    assert_failed_naming(
        &config_check(&config, &env).await,
        &["FLOTILLA_LOG_LEVEL", "did you mean FLOTILLA_LOG?"],
    );
    let out = case.serve(&config, &[], &env).await;
    case.assert_refused(&out, &["FLOTILLA_LOG_LEVEL"]);
    // An empty host list used to switch the MCP Host check off without a word.
    let env = [("FLOTILLA_MCP_ALLOWED_HOSTS", "")];
    let out = case.serve(&config, &[], &env).await;
    case.assert_refused(&out, &["FLOTILLA_MCP_ALLOWED_HOSTS is set but empty"]);
    // The client's variables are not the server's business.
    let out = config_check(&config, &[("FLOTILLA_SERVER", "http://x:1")]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An empty list written in the file is a choice, but never a silent one.
    let config = case.config("", "[mcp]\nallowed_hosts = []\n");
    let out = config_check(&config, &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: mcp.allowed_hosts is empty"),
        "{stderr}"
    );
}

#[tokio::test]
async fn config_check_reads_the_token_files_as_serve_does() {
    let case = Case::new();
    flotilla_e2e::write_secret(&case.tokens_file, "ops operator too-short\n");
    let config = case.config("", "");
    assert_failed_naming(
        &config_check(&config, &[]).await,
        &["api.tokens_file", "shorter than 16"],
    );
    let out = case.serve(&config, &[], &[]).await;
    case.assert_refused(&out, &["shorter than 16"]);

    // An agent tokens file without a token would refuse every agent.
    flotilla_e2e::write_secret(
        &case.tokens_file,
        format!("{OPERATOR} operator 0123456789abcdef0123456789abcdef\n"),
    );
    let agent_tokens = case.dir.path().join("agent-tokens");
    flotilla_e2e::write_secret(&agent_tokens, "# none yet\n");
    let config = case.config(
        "",
        &format!("[opamp]\nagent_tokens_file = {}\n", toml_str(&agent_tokens)),
    );
    assert_failed_naming(
        &config_check(&config, &[]).await,
        &["agent_tokens_file", "holds no token"],
    );
    let out = case.serve(&config, &[], &[]).await;
    case.assert_refused(&out, &["holds no token"]);
}

#[tokio::test]
async fn config_check_prints_the_effective_toml_which_reproduces_it() {
    let case = Case::new();
    let config = case.config("", "[commands]\nmax_fanout = 77\n");
    let out = config_check(&config, &[("FLOTILLA_HEARTBEAT_INTERVAL_S", "12")]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("Config {"), "a Rust debug dump:\n{stdout}");
    for needle in [
        "[opamp]",
        "heartbeat_interval_s = 12",
        "max_fanout = 77",
        "tokens_file = ",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 API token(s)"), "{stderr}");
    // The printed TOML, used as the config file, yields the same configuration.
    let effective = case.dir.path().join("effective.toml");
    std::fs::write(&effective, &stdout).unwrap();
    let again = config_check(&effective, &[]).await;
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&again.stdout), stdout);
    assert!(
        !case.data_dir.exists(),
        "config check must not create the data dir"
    );
}

#[tokio::test]
async fn a_missing_config_file_is_reported_once() {
    let out = run_flotilla(
        &["config", "check", "--config", "/nonexistent/flotilla.toml"],
        &[],
        EXIT_TIMEOUT,
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
    assert_eq!(
        stderr.matches("/nonexistent/flotilla.toml").count(),
        1,
        "{stderr}"
    );
}

/// Control for the refusal tests: the base config is valid, and a held port is detected — so
/// "no `cannot listen`" and "no data dir" in the other tests are not vacuous.
#[tokio::test]
async fn base_config_is_valid_and_a_held_port_is_reported() {
    let case = Case::new();
    let config = case.config("", "");
    let out = run_flotilla(
        &["config", "check", "--config", config.to_str().unwrap()],
        &[],
        EXIT_TIMEOUT,
    )
    .await;
    assert!(
        out.status.success(),
        "config check of the base config: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !case.data_dir.exists(),
        "config check must not create the data dir"
    );

    let out = case.serve(&config, &[], &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "serve on held ports must fail: {stderr}"
    );
    assert!(
        stderr.contains("cannot listen") && stderr.contains(&case.opamp_addr()),
        "a taken port must be reported with its address; got:\n{stderr}"
    );
}

#[tokio::test]
async fn bad_listen_address_flag_is_refused() {
    let case = Case::new();
    let config = case.config("", "");
    let out = case
        .serve(&config, &["--opamp-listen", "nowhere:port"], &[])
        .await;
    case.assert_refused(&out, &["opamp.listen", "nowhere:port"]);
}

#[tokio::test]
async fn bad_listen_address_in_file_is_refused() {
    let case = Case::new();
    let config = case.config("listen = \"127.0.0.1:99999\"", "");
    // No --api-listen flag: the file's value is the one in force.
    let out = run_flotilla(
        &[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--opamp-listen",
            &case.opamp_addr(),
        ],
        &[],
        EXIT_TIMEOUT,
    )
    .await;
    case.assert_refused(&out, &["api.listen", "127.0.0.1:99999"]);
}

#[tokio::test]
async fn bad_heartbeat_is_refused_from_file_and_env() {
    let case = Case::new();
    let config = case.config("", "[opamp]\nheartbeat_interval_s = 0\n");
    let out = case.serve(&config, &[], &[]).await;
    case.assert_refused(&out, &["opamp.heartbeat_interval_s"]);

    let config = case.config("", "");
    let out = case
        .serve(&config, &[], &[("FLOTILLA_HEARTBEAT_INTERVAL_S", "soon")])
        .await;
    case.assert_refused(&out, &["FLOTILLA_HEARTBEAT_INTERVAL_S", "soon"]);
}

#[tokio::test]
async fn unknown_toml_key_is_refused() {
    let case = Case::new();
    let config = case.config("", "[opamp]\nlisten_adress = \"0.0.0.0:4320\"\n");
    let out = case.serve(&config, &[], &[]).await;
    case.assert_refused(&out, &["listen_adress"]);
}

#[tokio::test]
async fn every_problem_is_reported_at_once() {
    let case = Case::new();
    let config = case.config(
        "max_body_bytes = 10",
        "[opamp]\nheartbeat_interval_s = 0\n[log]\nformat = \"xml\"\n",
    );
    let out = case.serve(&config, &[], &[]).await;
    case.assert_refused(
        &out,
        &[
            "opamp.heartbeat_interval_s",
            "api.max_body_bytes",
            "log.format",
        ],
    );
}

#[tokio::test]
async fn missing_or_unreadable_tokens_file_is_refused() {
    // Missing file, named in the config file.
    let case = Case::new();
    let missing = case.dir.path().join("no-such-tokens");
    let config = case.dir.path().join("missing-tokens.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {}\n[api]\ntokens_file = {}\n",
            toml_str(&case.data_dir),
            toml_str(&missing)
        ),
    )
    .unwrap();
    let out = case.serve(&config, &[], &[]).await;
    case.assert_refused(&out, &["api.tokens_file", "no-such-tokens"]);

    // A directory where the file should be (cannot be read as a file, even by root), named
    // through the environment, which overrides the file.
    let dir_as_file = case.dir.path().join("tokens.d");
    std::fs::create_dir(&dir_as_file).unwrap();
    let config = case.config("", "");
    let out = case
        .serve(
            &config,
            &[],
            &[("FLOTILLA_API_TOKENS_FILE", dir_as_file.to_str().unwrap())],
        )
        .await;
    case.assert_refused(&out, &["api.tokens_file", "tokens.d"]);
}

/// A secret file other users can read (the umask's 0644) or write is refused before any port
/// is bound, naming the file, its mode and the fix; the secret itself is never printed.
/// Group access stays allowed for a service group.
#[tokio::test]
async fn secret_files_other_users_can_read_or_write_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let case = Case::new();
    let config = case.config("", "");
    chmod(&case.tokens_file, 0o644);
    let out = case.serve(&config, &[], &[]).await;
    case.assert_refused(
        &out,
        &[
            "api.tokens_file",
            "readable by other users",
            "0644",
            "chmod 600",
        ],
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !all.contains("0123456789abcdef0123456789abcdef"),
        "the secret leaked: {all}"
    );

    chmod(&case.tokens_file, 0o602);
    let out = case.serve(&config, &[], &[]).await;
    case.assert_refused(&out, &["api.tokens_file", "writable by other users"]);

    // A chat signing secret goes through the same check (and names its own key).
    chmod(&case.tokens_file, 0o640);
    let secret = case.dir.path().join("slack-signing-secret");
    std::fs::write(&secret, "8f742231b10e8888abcd99yyyzzz85a5\n").unwrap();
    chmod(&secret, 0o604);
    let config = case.config(
        "",
        &format!(
            "[chat]\nlisten = \"127.0.0.1:0\"\n[chat.slack]\nenabled = true\nsigning_secret_file = {}\n",
            toml_str(&secret)
        ),
    );
    let out = case
        .serve(
            &config,
            &[],
            &[("FLOTILLA_SLACK_BOT_TOKEN", "xoxb-test-token")],
        )
        .await;
    case.assert_refused(
        &out,
        &["chat.slack.signing_secret_file", "readable by other users"],
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("8f742231b10e"));
}

#[tokio::test]
async fn malformed_tokens_file_is_refused_before_binding() {
    let case = Case::new();
    flotilla_e2e::write_secret(
        &case.tokens_file,
        "ok-user operator 0123456789abcdef0123456789abcdef\nbob superuser fedcba9876543210fedcba9876543210\n",
    );
    let config = case.config("", "");
    let out = case.serve(&config, &[], &[]).await;
    case.assert_refused(&out, &["superuser"]);
}

/// `serve --mcp-read-only` overrides the file: the MCP tool list over streamable HTTP no
/// longer offers anything that changes the fleet.
#[tokio::test]
async fn serve_mcp_read_only_flag_hides_state_changing_tools() {
    let home = flotilla_e2e::Home::new();
    let server = flotilla_e2e::Server::start_with_flags(&home, &["--mcp-read-only"]).await;
    let http = reqwest::Client::new();
    let rpc = |body: serde_json::Value, session: Option<String>| {
        let mut req = http
            .post(server.url("/mcp"))
            .bearer_auth(&home.tokens.operator)
            .header("Accept", "application/json, text/event-stream")
            .json(&body);
        if let Some(s) = session {
            req = req
                .header("Mcp-Session-Id", s)
                .header("MCP-Protocol-Version", "2025-06-18");
        }
        req.send()
    };
    let init = rpc(
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "cli-test", "version": "1"}}}),
        None,
    )
    .await
    .expect("initialize");
    assert!(init.status().is_success(), "{}", init.status());
    let session = init
        .headers()
        .get("mcp-session-id")
        .map(|v| v.to_str().unwrap().to_string());
    let _ = init.text().await;
    let ack = rpc(
        serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        session.clone(),
    )
    .await
    .expect("initialized");
    assert!(ack.status().is_success(), "{}", ack.status());
    let list = rpc(
        serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        session,
    )
    .await
    .expect("tools/list")
    .text()
    .await
    .unwrap();
    // JSON, or an SSE event carrying it (after an empty priming event).
    let json = list
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .find(|d| !d.is_empty())
        .unwrap_or(&list)
        .trim();
    let v: serde_json::Value = serde_json::from_str(json).expect(&list);
    let names: Vec<&str> = v["result"]["tools"]
        .as_array()
        .expect(&list)
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"agents_search"), "{names:?}");
    for hidden in ["command_queue", "command_cancel", "remote_config_push"] {
        assert!(
            !names.contains(&hidden),
            "{hidden} offered read-only: {names:?}"
        );
    }
}

/// `flotilla mcp --ca-file` names a CA file that cannot be read before it serves anything.
#[tokio::test]
async fn mcp_ca_file_that_cannot_be_read_is_refused() {
    let out = run_flotilla(
        &[
            "mcp",
            "--server",
            "https://127.0.0.1:1",
            "--ca-file",
            "/nonexistent/flotilla-ca.pem",
        ],
        &[],
        EXIT_TIMEOUT,
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("flotilla-ca.pem"), "{stderr}");
}
