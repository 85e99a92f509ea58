//! Test plumbing: building and starting the real `flotilla` server and the fake agents, the
//! supervisor under test as a process, REST helpers, and small local endpoints (ChatOps sink,
//! fake OpAMP server, OAuth2 token endpoint). Every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use flotilla_proto::framing::{decode_ws, encode_ws};
use flotilla_proto::{AgentToServer, ServerToAgent};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// `target/debug` (the directory holding this test's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("supervisor/ has a parent")
        .to_path_buf()
}

static BUILT: OnceLock<()> = OnceLock::new();

/// Builds the server binary and the fake agents once per test run; fails loudly.
pub fn build_bins() {
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // One invocation: one feature resolution, so repeated runs do not rebuild shared deps.
        let args = [
            "build",
            "-p",
            "flotilla-fake-agents",
            "-p",
            "flotilla-server",
            "--bin",
            "fake-fluent-bit",
            "--bin",
            "fake-fluentd",
            "--bin",
            "flotilla",
        ];
        let out = std::process::Command::new(&cargo)
            .args(args)
            .current_dir(workspace_root())
            .output()
            .expect("run cargo");
        assert!(
            out.status.success(),
            "`cargo {}` failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

pub fn fake_fluent_bit() -> PathBuf {
    build_bins();
    bin_dir().join("fake-fluent-bit")
}

pub fn fake_fluentd() -> PathBuf {
    build_bins();
    bin_dir().join("fake-fluentd")
}

/// Where the real agents are: `FLOTILLA_REAL_AGENTS_DIR` (set by tests/run.sh), or
/// `<repo>/../shared/tools`, where CI lays them beside the checkout.
pub fn real_agents_dir() -> PathBuf {
    std::env::var_os("FLOTILLA_REAL_AGENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/tools"))
}

/// The real agent at `rel` in [`real_agents_dir`] for the test `test`, once it answered
/// `version_arg` with `expect`. `None` only when the agents' folder does not exist (a clone
/// without ../shared): the test then says on the terminal, by name, that it is skipped. An
/// agent missing from an existing folder, or one that cannot run (a library, Ruby or a gem
/// missing), fails the test: tests/run.sh installs what they need.
pub fn real_agent(test: &str, rel: &str, version_arg: &str, expect: &str) -> Option<PathBuf> {
    use std::io::Write;
    let dir = real_agents_dir();
    if !dir.is_dir() {
        // Straight to the terminal: the test harness captures what a passing test prints.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: ../shared/tools not found ({} does not exist; set FLOTILLA_REAL_AGENTS_DIR)",
            dir.display()
        );
        return None;
    }
    let exe = dir.join(rel);
    let out = std::process::Command::new(&exe)
        .arg(version_arg)
        .output()
        .unwrap_or_else(|e| panic!("{test}: cannot run {}: {e}", exe.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains(expect),
        "{test}: `{} {version_arg}` does not run ({}): {text}\n(tests/peers/install-agents.sh installs its packages)",
        exe.display(),
        out.status
    );
    Some(exe)
}

/// Writes a file the server reads as a secret (a tokens file) owner-only, as `flotilla serve`
/// requires of secret files, whatever the umask.
pub fn write_private(path: &Path, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 100 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A child's output, line by line, with the moment each line was read.
#[derive(Default)]
pub struct Captured {
    pub text: String,
    pub lines: Vec<(Instant, String)>,
}

pub type SharedLog = Arc<Mutex<Captured>>;

/// Collects a child's stderr/stdout (for waits, timing checks and failure messages).
fn capture(child: &mut Child) -> SharedLog {
    let buf: SharedLog = Arc::default();
    fn pump(r: impl tokio::io::AsyncRead + Unpin + Send + 'static, b: SharedLog, echo: bool) {
        tokio::spawn(async move {
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if echo && std::env::var_os("E2E_VERBOSE").is_some() {
                    eprintln!("{l}");
                }
                let mut c = b.lock().unwrap();
                c.text.push_str(&l);
                c.text.push('\n');
                c.lines.push((Instant::now(), l));
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        pump(err, buf.clone(), true);
    }
    if let Some(out) = child.stdout.take() {
        pump(out, buf.clone(), false);
    }
    buf
}

/// When each line containing `needle` was read.
fn times_of(log: &SharedLog, needle: &str) -> Vec<Instant> {
    log.lock()
        .unwrap()
        .lines
        .iter()
        .filter(|(_, l)| l.contains(needle))
        .map(|(t, _)| *t)
        .collect()
}

/// The real Flotilla server.
pub struct Server {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub opamp_port: u16,
    pub api_port: u16,
    token: String,
    http: reqwest::Client,
    log: SharedLog,
    env: Vec<(String, String)>,
    /// `[opamp]`-style TOML given to `flotilla serve --config`, if any.
    toml: Option<String>,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(vec![]).await
    }

    /// Starts with extra environment (e.g. `FLOTILLA_HEARTBEAT_INTERVAL_S`).
    pub async fn start_with(env: Vec<(&str, &str)>) -> Server {
        Self::start_full(env, None).await
    }

    /// Starts with a configuration file (settings that have no environment variable, such as
    /// `opamp.retry_after_s`).
    pub async fn start_with_toml(toml: &str) -> Server {
        Self::start_full(vec![], Some(toml.to_string())).await
    }

    async fn start_full(env: Vec<(&str, &str)>, toml: Option<String>) -> Server {
        build_bins();
        let dir = tempfile::tempdir().unwrap();
        let token = format!("t{}", uuid::Uuid::new_v4().simple());
        write_private(
            &dir.path().join("tokens"),
            &format!("admin admin {token}\n"),
        );
        let mut s = Server {
            child: None,
            dir,
            opamp_port: free_port(),
            api_port: free_port(),
            token,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            log: SharedLog::default(),
            env: env
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            toml,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let data = self.dir.path().join("data");
        let mut cmd = Command::new(bin_dir().join("flotilla"));
        if let Some(t) = &self.toml {
            let path = self.dir.path().join("flotilla.toml");
            std::fs::write(&path, t).unwrap();
            cmd.arg("--config").arg(path);
        }
        let mut child = cmd
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .arg("--opamp-listen")
            .arg(format!("127.0.0.1:{}", self.opamp_port))
            .arg("--api-listen")
            .arg(format!("127.0.0.1:{}", self.api_port))
            .env("FLOTILLA_API_TOKENS_FILE", self.dir.path().join("tokens"))
            .env("FLOTILLA_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start flotilla");
        self.log = capture(&mut child);
        self.child = Some(child);
        let url = format!("http://127.0.0.1:{}/healthz", self.api_port);
        let http = self.http.clone();
        let log = self.log.clone();
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if Instant::now() > end {
                panic!("flotilla did not come up:\n{}", log.lock().unwrap().text);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the server (an outage).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/opamp", self.opamp_port)
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/opamp", self.opamp_port)
    }

    #[allow(dead_code)]
    pub fn log(&self) -> String {
        self.log.lock().unwrap().text.clone()
    }

    /// The server's Prometheus metrics (`/metrics`, unauthenticated).
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("http://127.0.0.1:{}/metrics", self.api_port))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of one metric sample line, e.g.
    /// `flotilla_opamp_messages_total{kind="disconnect"}` (0 when absent).
    pub async fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn api(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/api/v1{path}", self.api_port)
    }

    pub async fn agent(&self, uid: &str) -> Option<Value> {
        let r = self
            .http
            .get(self.api(&format!("/agents/{uid}")))
            .bearer_auth(&self.token)
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// Waits until the agent record satisfies `pred`; returns it.
    pub async fn wait_agent(
        &self,
        uid: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let end = Instant::now() + timeout;
        loop {
            let a = self.agent(uid).await;
            if let Some(a) = &a {
                if pred(a) {
                    return a.clone();
                }
            }
            if Instant::now() > end {
                panic!(
                    "timed out after {timeout:?} waiting for agent {uid}: {what}\nlast record: {}",
                    a.map(|a| serde_json::to_string_pretty(&a).unwrap())
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Queues a command; returns its id.
    pub async fn command(&self, uid: &str, kind: &str, params: Value) -> String {
        let r = self
            .http
            .post(self.api(&format!("/agents/{uid}/commands")))
            .bearer_auth(&self.token)
            .json(&json!({"kind": kind, "params": params}))
            .send()
            .await
            .expect("queue command");
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(status.as_u16(), 202, "queue {kind}: {body}");
        body["command_id"]
            .as_str()
            .or_else(|| body["id"].as_str())
            .unwrap_or_else(|| panic!("no command_id in {body}"))
            .to_string()
    }

    /// Offers `files` (name → body, or → {body, content_type}) as a remote_config command
    /// and waits for the command to finish; returns it.
    pub async fn push_files(&self, uid: &str, files: Value) -> Value {
        let id = self
            .command(uid, "remote_config", json!({ "files": files }))
            .await;
        self.wait_command(&id, Duration::from_secs(60)).await
    }

    /// [`Server::push_files`] with one file.
    pub async fn push_config(&self, uid: &str, name: &str, body: &str) -> Value {
        self.push_files(uid, json!({ name: body })).await
    }

    pub async fn get_command(&self, id: &str) -> Value {
        self.http
            .get(self.api(&format!("/commands/{id}")))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("get command")
            .json()
            .await
            .expect("command json")
    }

    /// Waits until the command is finished (succeeded, failed or expired); returns it.
    pub async fn wait_command(&self, id: &str, timeout: Duration) -> Value {
        let end = Instant::now() + timeout;
        loop {
            let c = self.get_command(id).await;
            let st = c["status"].as_str().unwrap_or("");
            if matches!(st, "succeeded" | "failed" | "expired" | "cancelled") {
                return c;
            }
            if Instant::now() > end {
                panic!("timed out after {timeout:?} waiting for command {id}: {c}");
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
}

/// What a supervisor under test runs.
#[derive(Clone)]
pub struct SupOpts {
    pub server_url: String,
    pub kind: &'static str,
    pub agent_conf: String,
    pub http_port: u16,
    pub chat_ops_port: u16,
    pub agent_env: Vec<(String, String)>,
    /// Extra `[agent]` keys.
    pub extra_toml: String,
    /// Extra tables after `[server]` (e.g. `[server.auth]`).
    pub server_extra: String,
    /// Extra tables at the end (e.g. `[healthz]`).
    pub tail_toml: String,
    pub health_gate_s: u64,
    /// The agent's executable, if not the fake of `kind` (a real agent).
    pub executable: Option<PathBuf>,
    /// `agent.health_interval_s` (1 unless a test needs the real default's pace).
    pub health_interval_s: u64,
    pub heartbeat_s: u64,
    pub restart_backoff_initial_ms: u64,
}

impl SupOpts {
    pub fn fluent_bit(server_url: &str) -> SupOpts {
        SupOpts {
            server_url: server_url.to_string(),
            kind: "fluentbit",
            agent_conf: FB_CONF.to_string(),
            http_port: free_port(),
            chat_ops_port: free_port(),
            agent_env: vec![],
            extra_toml: String::new(),
            server_extra: String::new(),
            tail_toml: String::new(),
            health_gate_s: 3,
            executable: None,
            health_interval_s: 1,
            heartbeat_s: 30,
            restart_backoff_initial_ms: 200,
        }
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.agent_env.push((k.to_string(), v.to_string()));
        self
    }
}

/// A minimal Fluent Bit config: a dummy input and a null output, hot reload on.
pub const FB_CONF: &str = "[SERVICE]\n    Flush     1\n    Grace     1\n    Log_Level info\n\n[INPUT]\n    Name  dummy\n    Alias dummy_in\n    Tag   app.dummy\n\n[OUTPUT]\n    Name  null\n    Alias null_out\n    Match app.*\n";

/// The supervisor under test (a real process).
pub struct Sup {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub opts: SupOpts,
    log: SharedLog,
}

impl Sup {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    pub fn conf_path(&self) -> PathBuf {
        self.dir.path().join("etc").join(match self.opts.kind {
            "fluentd" => "fluent.conf",
            _ => "fluent-bit.conf",
        })
    }
    pub fn events_path(&self) -> PathBuf {
        self.dir.path().join("events.jsonl")
    }

    pub async fn start(opts: SupOpts) -> Sup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        let mut s = Sup {
            child: None,
            dir,
            opts,
            log: SharedLog::default(),
        };
        std::fs::write(s.conf_path(), &s.opts.agent_conf).unwrap();
        s.spawn();
        s
    }

    /// Starts the supervisor process (again) with the same data directory.
    pub fn spawn(&mut self) {
        let o = &self.opts;
        let exe = o.executable.clone().unwrap_or_else(|| match o.kind {
            "fluentd" => fake_fluentd(),
            _ => fake_fluent_bit(),
        });
        let mut env = o.agent_env.clone();
        env.push((
            "FAKE_EVENT_LOG".into(),
            self.events_path().display().to_string(),
        ));
        let env_toml: String = env.iter().map(|(k, v)| format!("{k} = {v:?}\n")).collect();
        let toml = format!(
            r#"data_dir = {data:?}
[server]
url = {url:?}
heartbeat_interval_s = {hb}
backoff_initial_ms = 200
backoff_max_s = 2
connect_timeout_s = 3
{server_extra}
[agent]
kind = {kind:?}
executable = {exe:?}
config_path = {conf:?}
http_port = {http_port}
monitor_url = "http://127.0.0.1:{http_port}"
chat_ops_port = {chat}
health_interval_s = {interval}
health_gate_s = {gate}
reload_timeout_s = 6
restart_backoff_initial_ms = {restart_ms}
restart_backoff_max_s = 2
crash_loop_threshold = 3
crash_loop_window_s = 20
stop_timeout_s = 5
{extra}
[agent.env]
{env_toml}
[log]
level = "info,flotilla_supervisor=debug"
{tail}
"#,
            data = self.data_dir().display().to_string(),
            url = o.server_url,
            hb = o.heartbeat_s,
            kind = o.kind,
            exe = exe.display().to_string(),
            conf = self.conf_path().display().to_string(),
            http_port = o.http_port,
            chat = o.chat_ops_port,
            gate = o.health_gate_s,
            interval = o.health_interval_s,
            restart_ms = o.restart_backoff_initial_ms,
            extra = o.extra_toml,
            server_extra = o.server_extra,
            tail = o.tail_toml,
        );
        let cfg = self.dir.path().join("supervisor.toml");
        std::fs::write(&cfg, toml).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-supervisor"))
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start supervisor");
        self.log = capture(&mut child);
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().text.clone()
    }

    /// When each supervisor log line containing `needle` was read.
    pub fn log_times(&self, needle: &str) -> Vec<Instant> {
        times_of(&self.log, needle)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().and_then(|c| c.id()).unwrap_or(0) as i32
    }

    /// The instance uid the supervisor persisted.
    pub async fn uid(&self) -> String {
        let p = self.data_dir().join("instance_uid");
        wait_for("instance_uid file", Duration::from_secs(20), || {
            let p = p.clone();
            async move {
                std::fs::read_to_string(&p)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| s.len() == 36)
            }
        })
        .await
    }

    /// Events the fake agent logged (`FAKE_EVENT_LOG`).
    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.events_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn count_events(&self, f: impl Fn(&Value) -> bool) -> usize {
        self.events().iter().filter(|e| f(e)).count()
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.pid();
        assert!(pid > 0);
        // SAFETY: plain syscall on our own child.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// Waits for the supervisor to exit; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut().expect("running");
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(st)) => {
                self.child = None;
                st.code()
            }
            _ => panic!(
                "supervisor did not exit within {timeout:?}; log:\n{}",
                self.log()
            ),
        }
    }

    /// Waits until the supervisor log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        while !self.log().contains(needle) {
            if Instant::now() > end {
                panic!(
                    "timed out waiting for {needle:?} in the supervisor log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Sup {
    fn drop(&mut self) {
        // Stop the supervisor cleanly so it takes its agent down (PDEATHSIG backs this up).
        if let Some(c) = &self.child {
            if let Some(pid) = c.id() {
                // SAFETY: plain syscall on our own child.
                unsafe {
                    libc::kill(pid as i32, libc::SIGTERM);
                }
                let end = Instant::now() + Duration::from_secs(8);
                while Instant::now() < end && Path::new(&format!("/proc/{pid}")).exists() {
                    let stat =
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    if stat.contains(") Z ") {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// A local HTTP listener standing in for the agent's ChatOps `http` input: records each
/// request (method, path, body) and answers 201, or 404 for paths starting with `/missing`.
/// Requests to paths starting with `/hold` are recorded at once but answered only after
/// [`ChatSink::release`] (a command still running when something else happens).
pub struct ChatSink {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<(String, String, String)>>>,
    held: Arc<tokio::sync::Semaphore>,
}

impl ChatSink {
    pub async fn start() -> ChatSink {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        let held = Arc::new(tokio::sync::Semaphore::new(0));
        let gate = held.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let reqs = reqs.clone();
                let gate = gate.clone();
                tokio::spawn(async move {
                    let Some((method, path, _headers, body)) = read_http(&mut s).await else {
                        return;
                    };
                    let missing = path.starts_with("/missing");
                    let hold = path.starts_with("/hold");
                    reqs.lock().unwrap().push((method, path, body));
                    if hold {
                        let _ = gate.acquire().await.map(|p| p.forget());
                    }
                    let resp = if missing {
                        "HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nconnection: close\r\n\r\nno route\n"
                    } else {
                        "HTTP/1.1 201 Created\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    };
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        ChatSink {
            port,
            requests,
            held,
        }
    }

    /// Lets one held request be answered.
    pub fn release(&self) {
        self.held.add_permits(1);
    }

    pub fn count(&self, path: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p, _)| p == path)
            .count()
    }
}

/// A Fluent Bit supervisor whose ChatOps port is a [`ChatSink`], connected to `server`:
/// (sink, supervisor, uid).
pub async fn chatops_setup(server: &Server) -> (ChatSink, Sup, String) {
    let sink = ChatSink::start().await;
    let mut opts = SupOpts::fluent_bit(&server.ws_url());
    opts.chat_ops_port = sink.port;
    let sup = Sup::start(opts).await;
    let uid = sup.uid().await;
    server
        .wait_agent(&uid, "connected", Duration::from_secs(30), |a| {
            a["connected"] == true
        })
        .await;
    (sink, sup, uid)
}

/// Reads one HTTP/1.1 request: (method, path, lower-cased headers, body).
pub async fn read_http(
    s: &mut tokio::net::TcpStream,
) -> Option<(String, String, Vec<(String, String)>, String)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
    Some((method, path, headers, body))
}

/// What a fake OpAMP WebSocket server saw on one connection.
#[derive(Debug)]
pub enum FakeEvent {
    Connected { headers: Vec<(String, String)> },
    Message(Box<AgentToServer>),
    Closed,
}

/// How a [`FakeOpamp`] answers.
#[derive(Clone, Default)]
pub struct FakeBehaviour {
    /// Custom capabilities declared in every reply (a Flotilla server declares
    /// `io.flotilla.command/v1`; fluent-opamp's declares its own).
    pub declare: Vec<String>,
    /// The reply to a message carrying a Flotilla result carries its ack, as Flotilla's does.
    pub ack: bool,
}

/// A fake OpAMP WebSocket server: reports every connection and message, and sends whatever
/// the test pushes on `push` to the current connection. It answers each message with a
/// ServerToAgent (instance_uid echoed, plus what its [`FakeBehaviour`] adds), as a server
/// must, except while `withhold` is set: then a message carrying a custom message (a result)
/// gets no answer, as from a server that died before it processed it.
pub struct FakeOpamp {
    pub url: String,
    pub events: mpsc::UnboundedReceiver<FakeEvent>,
    pub push: mpsc::UnboundedSender<ServerToAgent>,
    /// Closes the current connection (after everything pushed before it was sent).
    pub kick: mpsc::UnboundedSender<()>,
    pub withhold: Arc<std::sync::atomic::AtomicBool>,
    /// Frames sent after answering an agent_disconnect, before the agent's Close is read (a
    /// server pushing queued commands while the agent leaves).
    pub on_disconnect: Arc<Mutex<Vec<ServerToAgent>>>,
}

impl FakeOpamp {
    pub async fn start() -> FakeOpamp {
        Self::start_with(FakeBehaviour::default()).await
    }

    pub async fn start_with(behaviour: FakeBehaviour) -> FakeOpamp {
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/opamp", l.local_addr().unwrap());
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (push_tx, push_rx) = mpsc::unbounded_channel::<ServerToAgent>();
        let (kick_tx, kick_rx) = mpsc::unbounded_channel::<()>();
        // One connection at a time uses them: a reconnect waits until the old one is gone.
        let chans = Arc::new(tokio::sync::Mutex::new((push_rx, kick_rx)));
        let withhold = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let on_disconnect: Arc<Mutex<Vec<ServerToAgent>>> = Arc::default();
        let (hold2, bye2) = (withhold.clone(), on_disconnect.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let ev_tx = ev_tx.clone();
                let chans = chans.clone();
                let behaviour = behaviour.clone();
                let (withhold, on_disconnect) = (hold2.clone(), bye2.clone());
                tokio::spawn(async move {
                    let headers = Arc::new(Mutex::new(Vec::new()));
                    let h2 = headers.clone();
                    #[allow(clippy::result_large_err)]
                    let cb = move |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                                   resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                        let mut h: Vec<(String, String)> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                            .collect();
                        h.push((":path".into(), req.uri().path().to_string()));
                        *h2.lock().unwrap() = h;
                        Ok(resp)
                    };
                    let Ok(ws) = tokio_tungstenite::accept_hdr_async(s, cb).await else {
                        return;
                    };
                    let (mut sink, mut stream) = ws.split();
                    let mut chans = chans.lock().await;
                    let _ = ev_tx.send(FakeEvent::Connected {
                        headers: headers.lock().unwrap().clone(),
                    });
                    loop {
                        let (push, kick) = &mut *chans;
                        tokio::select! {
                            // Pushes before a kick: the test orders them.
                            biased;
                            f = stream.next() => match f {
                                Some(Ok(WsMessage::Binary(d))) => {
                                    let m: AgentToServer = decode_ws(&d).expect("AgentToServer");
                                    let mut reply = ServerToAgent { instance_uid: m.instance_uid.clone(), ..Default::default() };
                                    if !behaviour.declare.is_empty() {
                                        reply.custom_capabilities = Some(flotilla_proto::CustomCapabilities {
                                            capabilities: behaviour.declare.clone(),
                                        });
                                    }
                                    if behaviour.ack {
                                        if let Some((cap, ty, v)) = custom_json(&m) {
                                            if cap == "io.flotilla.command/v1" && ty == "result" {
                                                reply.custom_message = Some(flotilla_proto::CustomMessage {
                                                    capability: cap,
                                                    r#type: "ack".into(),
                                                    data: json!({"command_id": v["command_id"]}).to_string().into_bytes(),
                                                });
                                            }
                                        }
                                    }
                                    let silent = m.custom_message.is_some() && withhold.load(Ordering::SeqCst);
                                    let bye = m.agent_disconnect.is_some();
                                    let _ = ev_tx.send(FakeEvent::Message(Box::new(m)));
                                    if !silent {
                                        let _ = sink.send(WsMessage::binary(encode_ws(&reply))).await;
                                    }
                                    if bye {
                                        let frames = std::mem::take(&mut *on_disconnect.lock().unwrap());
                                        for f in frames {
                                            let _ = sink.send(WsMessage::binary(encode_ws(&f))).await;
                                        }
                                    }
                                }
                                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => {
                                    let _ = ev_tx.send(FakeEvent::Closed);
                                    return;
                                }
                                _ => {}
                            },
                            p = push.recv() => match p {
                                Some(m) => { let _ = sink.send(WsMessage::binary(encode_ws(&m))).await; }
                                None => return,
                            },
                            k = kick.recv() => {
                                if k.is_some() {
                                    let _ = sink.send(WsMessage::Close(None)).await;
                                }
                                let _ = ev_tx.send(FakeEvent::Closed);
                                return;
                            }
                        }
                    }
                });
            }
        });
        FakeOpamp {
            url,
            events: ev_rx,
            push: push_tx,
            kick: kick_tx,
            withhold,
            on_disconnect,
        }
    }

    /// Waits for the next connection.
    pub async fn wait_connected(&mut self, timeout: Duration) -> Vec<(String, String)> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(FakeEvent::Connected { headers })) => return headers,
                Ok(Some(_)) => {}
                _ => panic!("fake OpAMP server: no connection within {timeout:?}"),
            }
        }
    }

    /// Every message until one satisfying `pred` arrives (that one last).
    pub async fn messages_until(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&AgentToServer) -> bool,
    ) -> Vec<AgentToServer> {
        let end = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(FakeEvent::Message(m))) => {
                    let done = pred(&m);
                    seen.push(*m);
                    if done {
                        return seen;
                    }
                }
                Ok(Some(_)) => {}
                _ => panic!("fake OpAMP server: no message {what} within {timeout:?}"),
            }
        }
    }

    /// Next event, bounded.
    pub async fn next(&mut self, timeout: Duration) -> FakeEvent {
        tokio::time::timeout(timeout, self.events.recv())
            .await
            .expect("fake OpAMP server: no event in time")
            .expect("fake OpAMP server gone")
    }

    /// Skips events until a message satisfying `pred` arrives.
    pub async fn wait_message(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&AgentToServer) -> bool,
    ) -> AgentToServer {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("fake OpAMP server: no message {what} within {timeout:?}");
            }
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(FakeEvent::Message(m))) if pred(&m) => return *m,
                Ok(Some(_)) => {}
                _ => panic!("fake OpAMP server: no message {what} within {timeout:?}"),
            }
        }
    }
}

/// Custom message data as JSON.
pub fn custom_json(m: &AgentToServer) -> Option<(String, String, Value)> {
    let c = m.custom_message.as_ref()?;
    Some((
        c.capability.clone(),
        c.r#type.clone(),
        serde_json::from_slice(&c.data).unwrap_or(Value::Null),
    ))
}
