//! Running the real `flotilla` binary: building it, a home (data dir, config, API tokens),
//! starting it on free ports, REST calls, graceful stop (SIGTERM) and `kill -9`.
//!
//! The binary is built by `cargo build -p flotilla-server --bin flotilla` once per test process
//! (see [`flotilla_bin`]) rather than taken from `target/debug` as found: `cargo test -p
//! flotilla-e2e` does not build `flotilla-server`'s binary, so a path lookup alone would
//! silently test a stale binary, or none. Cargo releases its build lock while tests run, so
//! the nested build works; when the binary is up to date it costs a fraction of a second.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};

use crate::workspace_root;

/// Path of the `flotilla` binary under test: `$FLOTILLA_BIN` if set (must exist), else the
/// workspace's own binary, built once per test process with the test binary's profile and
/// target directory. Panics with cargo's output if the build fails.
pub fn flotilla_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(build_flotilla) {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

fn build_flotilla() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("FLOTILLA_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "FLOTILLA_BIN={} does not exist or is not a file",
                p.display()
            ))
        };
    }
    build_bin("flotilla-server", "flotilla")
}

/// Path of the workspace binary `bin` of `package`, built once per test process like
/// [`flotilla_bin`] (the test binary's profile and target directory). Panics with cargo's
/// output if the build fails.
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<BTreeMap<String, Result<PathBuf, String>>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let r = built
        .entry(format!("{package}/{bin}"))
        .or_insert_with(|| build_bin(package, bin));
    match r {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

fn build_bin(package: &str, bin: &str) -> Result<PathBuf, String> {
    // This test binary is <target-dir>/<profile-dir>/deps/<name>-<hash>.
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test binary location {}", exe.display()))?
        .to_path_buf();
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("unexpected profile dir {}", profile_dir.display()))?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => return Err(format!("unexpected profile dir {}", profile_dir.display())),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(&cargo)
        .current_dir(workspace_root())
        .args(["build", "-p", package, "--bin", bin])
        .arg("--profile")
        .arg(&profile)
        .arg("--target-dir")
        .arg(target_dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cargo:?} to build {bin}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building {bin} ({package}) failed ({}):\n{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 8000)
        ));
    }
    let path = profile_dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        return Err(format!(
            "cargo built {package} but {} does not exist",
            path.display()
        ));
    }
    Ok(path)
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = s.len() - max;
    while !s.is_char_boundary(cut) {
        cut += 1;
    }
    &s[cut..]
}

/// A `flotilla` command with every inherited `FLOTILLA_*` variable removed, so the
/// developer's environment cannot change what a test runs.
pub fn flotilla_command() -> Command {
    let mut c = Command::new(flotilla_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLOTILLA_") {
            c.env_remove(k);
        }
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Runs `flotilla <args>` to completion (panics after `timeout`).
pub async fn run_flotilla(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Output {
    let mut c = flotilla_command();
    c.args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    let child = c
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run flotilla {args:?}: {e}"));
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("flotilla {args:?}: {e}"),
        Err(_) => panic!("flotilla {args:?} did not exit within {timeout:?}"),
    }
}

/// The result of `flotilla audit verify`.
#[derive(Debug)]
pub struct Verify {
    /// Exit code (None if killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Verify {
    /// N from "audit chain intact: N records verified"; panics unless it exited 0 with that.
    pub fn intact_count(&self) -> u64 {
        assert_eq!(self.code, Some(0), "audit verify should pass: {self:?}");
        self.stdout
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .strip_prefix("audit chain intact: ")
            .and_then(|s| s.strip_suffix(" records verified"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected `audit verify` output: {self:?}"))
    }

    /// `ID:HASH` from the "head: ID:HASH" line of an intact chain.
    pub fn head(&self) -> Option<String> {
        self.stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("head: "))
            .map(str::to_string)
    }

    /// (record id, reason) from "audit chain BROKEN at record N: reason"; panics unless it
    /// exited 1 with that.
    pub fn broken_at(&self) -> (i64, String) {
        assert_eq!(self.code, Some(1), "audit verify should fail: {self:?}");
        let rest = self
            .stdout
            .trim()
            .strip_prefix("audit chain BROKEN at record ")
            .unwrap_or_else(|| panic!("unexpected `audit verify` output: {self:?}"));
        let (id, reason) = rest
            .split_once(": ")
            .unwrap_or_else(|| panic!("unexpected `audit verify` output: {self:?}"));
        (
            id.parse()
                .unwrap_or_else(|_| panic!("record id in {self:?}")),
            reason.to_string(),
        )
    }
}

/// Runs `flotilla audit verify --data-dir <data_dir>`.
pub async fn audit_verify(data_dir: &Path) -> Verify {
    verify_with(data_dir, &[]).await
}

/// `flotilla audit verify --anchor ID:HASH` on `data_dir`.
pub async fn audit_verify_anchored(data_dir: &Path, anchor: &str) -> Verify {
    verify_with(data_dir, &["--anchor", anchor]).await
}

async fn verify_with(data_dir: &Path, extra: &[&str]) -> Verify {
    let dir = data_dir.to_str().expect("UTF-8 temp path");
    let mut args = vec!["audit", "verify", "--data-dir", dir];
    args.extend_from_slice(extra);
    let out = run_flotilla(&args, &[], Duration::from_secs(30)).await;
    Verify {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A port that was free a moment ago (bound on 127.0.0.1:0, read, released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// True if nothing listens on 127.0.0.1:`port` (we can bind it ourselves).
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Bearer tokens written to the home's tokens file (`name role token`).
#[derive(Debug, Clone)]
pub struct Tokens {
    /// Name `e2e-admin`, role admin.
    pub admin: String,
    /// Name `e2e-operator`, role operator (the default for [`Server`] requests).
    pub operator: String,
    /// Name `e2e-viewer`, role viewer.
    pub viewer: String,
}

/// Actor name of [`Tokens::operator`] (what audit records show).
pub const OPERATOR: &str = "e2e-operator";

/// A server's persistent home: a temp dir holding `data/`, `flotilla.toml` and `tokens`.
/// Outlives server processes, so a restarted server finds the same database.
pub struct Home {
    dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub tokens_file: PathBuf,
    pub tokens: Tokens,
}

impl Home {
    /// A home whose config sets `opamp.heartbeat_interval_s = 1` (so liveness moves quickly).
    pub fn new() -> Home {
        Home::with_config("[opamp]\nheartbeat_interval_s = 1\n")
    }

    /// A home whose config is `data_dir`, `api.tokens_file` and `log.level`, then `extra`
    /// (TOML; must not repeat the `[api]` or `[log]` tables).
    pub fn with_config(extra: &str) -> Home {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-e2e-")
            .tempdir()
            .expect("temp dir");
        let data_dir = dir.path().join("data");
        let tokens_file = dir.path().join("tokens");
        let tokens = Tokens {
            admin: random_token(),
            operator: random_token(),
            viewer: random_token(),
        };
        crate::write_secret(
            &tokens_file,
            format!(
                "# e2e tokens\ne2e-admin admin {}\n{OPERATOR} operator {}\ne2e-viewer viewer {}\n",
                tokens.admin, tokens.operator, tokens.viewer
            ),
        );
        let config = dir.path().join("flotilla.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {}\n[api]\ntokens_file = {}\n[log]\nlevel = \"info\"\n{extra}",
                toml_str(&data_dir),
                toml_str(&tokens_file)
            ),
        )
        .expect("write config");
        Home {
            dir,
            data_dir,
            config,
            tokens_file,
            tokens,
        }
    }

    /// The temp dir itself.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `<data_dir>/flotilla.db`.
    pub fn db(&self) -> PathBuf {
        self.data_dir.join("flotilla.db")
    }
}

impl Default for Home {
    fn default() -> Self {
        Home::new()
    }
}

fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// A path as a TOML basic string.
pub fn toml_str(p: &Path) -> String {
    let s = p.to_str().expect("UTF-8 temp path");
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// How long a server may take to answer `/healthz` after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `flotilla serve`. Killed (SIGKILL) when dropped.
pub struct Server {
    child: Child,
    pub opamp: SocketAddr,
    pub api: SocketAddr,
    pub data_dir: PathBuf,
    config: PathBuf,
    pub tokens: Tokens,
    stderr: Arc<Mutex<String>>,
    http: reqwest::Client,
    exited: Option<ExitStatus>,
}

/// What a REST call returned.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// The JSON body (`Value::Null` if empty; `{"_raw": text}` if not JSON).
    pub body: Value,
}

impl Reply {
    /// Panics unless the status is `want`; returns the body.
    pub fn expect(self, want: u16, what: &str) -> Value {
        assert_eq!(
            self.status, want,
            "{what}: expected HTTP {want}, got {} {}",
            self.status, self.body
        );
        self.body
    }
}

impl Server {
    /// Starts `flotilla serve` for `home` on free ports and waits for `/healthz`.
    pub async fn start(home: &Home) -> Server {
        Server::start_on(home, None).await
    }

    /// Starts on `ports` (opamp, api) if given, else on free ones. If a port turns out to be
    /// taken (another process grabbed it), retries with fresh ports, up to 5 times.
    pub async fn start_on(home: &Home, ports: Option<(u16, u16)>) -> Server {
        Server::start_flags(home, ports, &[]).await
    }

    /// [`Server::start`] with extra `serve` flags.
    pub async fn start_with_flags(home: &Home, flags: &[&str]) -> Server {
        Server::start_flags(home, None, flags).await
    }

    async fn start_flags(home: &Home, ports: Option<(u16, u16)>, flags: &[&str]) -> Server {
        let mut ports = ports.unwrap_or_else(distinct_free_ports);
        let mut last_err = String::new();
        for _ in 0..5 {
            match Server::try_start(home, ports, flags).await {
                Ok(s) => return s,
                Err((bind_failed, err)) => {
                    if !bind_failed {
                        panic!("flotilla serve did not start:\n{err}");
                    }
                    last_err = err;
                    ports = distinct_free_ports();
                }
            }
        }
        panic!("flotilla serve could not bind free ports 5 times; last stderr:\n{last_err}");
    }

    /// Err((true, stderr)) when it exited because a port was taken.
    async fn try_start(
        home: &Home,
        (op, ap): (u16, u16),
        flags: &[&str],
    ) -> Result<Server, (bool, String)> {
        let opamp: SocketAddr = ([127, 0, 0, 1], op).into();
        let api: SocketAddr = ([127, 0, 0, 1], ap).into();
        let mut cmd = flotilla_command();
        cmd.arg("serve")
            .arg("--config")
            .arg(&home.config)
            .arg("--opamp-listen")
            .arg(opamp.to_string())
            .arg("--api-listen")
            .arg(api.to_string())
            .args(flags)
            .stdout(Stdio::null());
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {}: {e}", flotilla_bin().display());
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        tokio::spawn(crate::collect_stderr(
            child.stderr.take().expect("stderr is piped"),
            stderr.clone(),
        ));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("reqwest client");
        let mut server = Server {
            child,
            opamp,
            api,
            data_dir: home.data_dir.clone(),
            config: home.config.clone(),
            tokens: home.tokens.clone(),
            stderr,
            http,
            exited: None,
        };
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                // Let the stderr reader catch up before reporting.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let err = format!("exited with {status}; stderr:\n{}", server.stderr());
                let bind_failed = server.stderr().contains("cannot listen");
                return Err((bind_failed, err));
            }
            if let Ok(r) = server
                .http
                .get(format!("http://{api}/healthz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if r.status().is_success() {
                    return Ok(server);
                }
            }
            if tokio::time::Instant::now() > deadline {
                let _ = server.child.start_kill();
                return Err((
                    false,
                    format!(
                        "no successful GET /healthz within {START_TIMEOUT:?}; stderr:\n{}",
                        server.stderr()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops this (already stopped) server's successor: a new process on the same data dir,
    /// config and ports (fresh ports only if those are taken meanwhile).
    pub async fn restart(&self, home: &Home) -> Server {
        assert!(
            self.exited.is_some(),
            "restart() needs the previous process stopped first"
        );
        assert_eq!(self.config, home.config, "restart with the same home");
        Server::start_on(home, Some((self.opamp.port(), self.api.port()))).await
    }

    /// The agent endpoint, `http://<opamp>/v1/opamp`.
    pub fn opamp_url(&self) -> String {
        format!("http://{}/v1/opamp", self.opamp)
    }

    /// `http://<api><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// OS process id (None once reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The server's stderr so far (last 16 KiB).
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// A REST call with `token` (`None`: no Authorization header).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let mut req = self.http.request(method.clone(), self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.unwrap_or_else(|e| {
            panic!(
                "{method} {path}: {e}\n--- server stderr ---\n{}",
                self.stderr()
            )
        });
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let body = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "_raw": text }))
        };
        Reply { status, body }
    }

    /// GET with the operator token.
    pub async fn get(&self, path: &str) -> Reply {
        let t = self.tokens.operator.clone();
        self.call(reqwest::Method::GET, path, Some(&t), None).await
    }

    /// POST JSON with the operator token.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        let t = self.tokens.operator.clone();
        self.call(reqwest::Method::POST, path, Some(&t), Some(body))
            .await
    }

    /// PUT JSON with the operator token.
    pub async fn put(&self, path: &str, body: &Value) -> Reply {
        let t = self.tokens.operator.clone();
        self.call(reqwest::Method::PUT, path, Some(&t), Some(body))
            .await
    }

    /// `GET /api/v1/agents/{uid}`, which must answer 200.
    pub async fn agent(&self, uid: &str) -> Value {
        self.get(&format!("/api/v1/agents/{uid}"))
            .await
            .expect(200, &format!("GET agent {uid}"))
    }

    /// Every audit record, by id (`GET /api/v1/audit`, all pages).
    pub async fn audit_records(&self) -> BTreeMap<i64, Value> {
        let mut out = BTreeMap::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                None => "/api/v1/audit?limit=1000".to_string(),
                Some(c) => format!("/api/v1/audit?limit=1000&cursor={c}"),
            };
            let page = self.get(&path).await.expect(200, "GET audit");
            for r in page["items"]
                .as_array()
                .unwrap_or_else(|| panic!("audit page without items: {page}"))
            {
                let id: i64 = r["id"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("audit id as a string: {r}"));
                out.insert(id, r.clone());
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
    }

    /// `GET /api/v1/commands/{id}`, which must answer 200.
    pub async fn command(&self, id: &str) -> Value {
        self.get(&format!("/api/v1/commands/{id}"))
            .await
            .expect(200, &format!("GET command {id}"))
    }

    /// Queues `kind` for one agent; expects 202 and returns the command id.
    pub async fn queue(&self, uid: &str, kind: &str, params: Value) -> String {
        let body = self
            .post(
                &format!("/api/v1/agents/{uid}/commands"),
                &serde_json::json!({"kind": kind, "params": params}),
            )
            .await
            .expect(202, &format!("queue {kind} for {uid}"));
        body["command_id"]
            .as_str()
            .unwrap_or_else(|| panic!("queue reply without command_id: {body}"))
            .to_string()
    }

    /// Polls `GET /api/v1/agents/{uid}` until `pred` holds; panics with the last view after
    /// `timeout`.
    pub async fn wait_agent(
        &self,
        uid: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let r = self.get(&format!("/api/v1/agents/{uid}")).await;
            if r.status == 200 && pred(&r.body) {
                return r.body;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "agent {uid}: {what} did not happen within {timeout:?}; last answer: HTTP {} {}",
                    r.status, r.body
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls `GET /api/v1/commands/{id}` until its `status` is `want`; panics (with the last
    /// view) after `timeout` or if it reaches another final status.
    pub async fn wait_command(&self, id: &str, want: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let c = self.command(id).await;
            let status = c["status"].as_str().unwrap_or_default().to_string();
            if status == want {
                return c;
            }
            let is_final = !matches!(status.as_str(), "queued" | "sent");
            if is_final || tokio::time::Instant::now() > deadline {
                panic!("command {id}: expected status {want:?} within {timeout:?}, got {c}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Graceful stop: SIGTERM, then waits for exit. Panics after `timeout`.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let pid = self.child.id().expect("server still running");
        let st = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("run kill -TERM");
        assert!(st.success(), "kill -TERM {pid} failed: {st}");
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("waiting for the server: {e}"),
            Err(_) => panic!(
                "server did not exit within {timeout:?} after SIGTERM; stderr:\n{}",
                self.stderr()
            ),
        };
        // Give the stderr reader a moment to drain the last lines.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.exited = Some(status);
        status
    }

    /// `kill -9`: SIGKILL and reap. Returns the exit status (terminated by signal 9).
    pub async fn kill9(&mut self) -> ExitStatus {
        self.child.kill().await.expect("SIGKILL the server");
        let status = self.child.wait().await.expect("reap the server");
        self.exited = Some(status);
        status
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn distinct_free_ports() -> (u16, u16) {
    loop {
        let (a, b) = (free_port(), free_port());
        if a != b {
            return (a, b);
        }
    }
}

/// Runs a Python 3 `script` with `args` (as `sys.argv[1:]`) and parses its stdout as JSON.
/// Used to edit SQLite files with Python's `sqlite3` module (no SQLite crate or CLI needed).
/// Panics if python3 is missing or the script fails.
pub fn python(script: &str, args: &[&str]) -> Value {
    let python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {python:?} (python3 with the sqlite3 module is required to edit the database): {e}")
        });
    assert!(
        out.status.success(),
        "python3 script failed ({}): {}\n--- script ---\n{script}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "python3 script printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs one SQL statement on an SQLite file and returns `{"rows": [...], "changes": n}`.
pub fn sqlite(db: &Path, sql: &str) -> Value {
    const SCRIPT: &str = r#"
import json, sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("PRAGMA foreign_keys = ON")
rows = c.execute(sys.argv[2]).fetchall()
c.commit()
print(json.dumps({"rows": rows, "changes": c.total_changes}))
c.close()
"#;
    python(SCRIPT, &[db.to_str().expect("UTF-8 temp path"), sql])
}
