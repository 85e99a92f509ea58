//! Helpers shared by the end-to-end tests: starting the `flotilla` binary, REST calls
//! ([`server`]), a scripted HTTP OpAMP agent ([`agent`]), and the third-party peers (here).
//!
//! Peers are the third-party OpAMP clients (Python `opentelemetry-opamp-client` 0.5b0 and Node
//! `@elastic/opamp-client-node` 0.5.0) driven by `tests/peers/{python/peer.py,node/peer.js}`.
//! They are installed by `tests/peers/install.sh` into `.peers/` (or `$FLOTILLA_PEERS_DIR`);
//! a missing install makes the tests panic, never skip. Each peer prints one JSON object per
//! line on stdout (`{"event": "...", ...}`); [`Peer::next_event`] waits for one of them.

pub mod agent;
pub mod fake_discord;
pub mod fake_llm;
pub mod fake_slack;
pub mod fake_teams;
pub mod mcp_client;
pub mod pg;
pub mod server;

pub use agent::HttpAgent;
pub use server::{
    audit_verify, audit_verify_anchored, flotilla_bin, python, run_flotilla, sqlite, Home, Server,
};

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Root of the Cargo workspace (the repository).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// Directory holding the installed peers: `$FLOTILLA_PEERS_DIR`, else `<workspace>/.peers`.
///
/// Panics with instructions when it does not exist.
pub fn peers_dir() -> PathBuf {
    let dir = std::env::var_os("FLOTILLA_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".peers"));
    if !dir.is_dir() {
        panic!(
            "OpAMP peers are not installed: {} does not exist.\n\
             Run `bash tests/peers/install.sh` (or `tests/run.sh`, which does it) first.",
            dir.display()
        );
    }
    dir
}

/// Which third-party client a [`Peer`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// `opentelemetry-opamp-client==0.5b0` (caps 0x3807 with the peer's ReportsHealth).
    Python,
    /// `@elastic/opamp-client-node@0.5.0` (caps 0x3003, cannot report health).
    Node,
}

/// Command-line options of a peer.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    /// OpAMP endpoint, e.g. `http://127.0.0.1:4320/v1/opamp`.
    pub endpoint: String,
    /// `service.name` (identifying) and `host.name` (non-identifying) attribute.
    pub name: String,
    /// Heartbeat / polling interval.
    pub heartbeat: Duration,
    /// The peer stops cleanly by itself after this long.
    pub run_for: Duration,
}

impl PeerOptions {
    /// Options with a one-hour run time (stop the peer with [`Peer::stop`]).
    pub fn new(endpoint: &str, name: &str, heartbeat: Duration) -> Self {
        Self {
            endpoint: endpoint.to_string(),
            name: name.to_string(),
            heartbeat,
            run_for: Duration::from_secs(3600),
        }
    }
}

/// Last part of a peer's stderr kept for failure messages.
const STDERR_KEEP: usize = 16 * 1024;

/// A running peer process. Killed (SIGKILL) when dropped.
pub struct Peer {
    kind: PeerKind,
    name: String,
    child: Child,
    lines: mpsc::UnboundedReceiver<Value>,
    pending: VecDeque<Value>,
    history: Vec<Value>,
    stderr: Arc<Mutex<String>>,
}

impl Peer {
    /// Starts the Python peer (runs for up to an hour; see [`Peer::stop`]).
    pub fn spawn_python(endpoint: &str, name: &str, heartbeat: Duration) -> Peer {
        Peer::spawn(
            PeerKind::Python,
            PeerOptions::new(endpoint, name, heartbeat),
        )
    }

    /// Starts the Node peer (runs for up to an hour; see [`Peer::stop`]).
    pub fn spawn_node(endpoint: &str, name: &str, heartbeat: Duration) -> Peer {
        Peer::spawn(PeerKind::Node, PeerOptions::new(endpoint, name, heartbeat))
    }

    /// Starts a peer. Must be called inside a Tokio runtime. Panics if the peer cannot start.
    pub fn spawn(kind: PeerKind, opts: PeerOptions) -> Peer {
        let peers = peers_dir();
        let scripts = workspace_root().join("tests").join("peers");
        let mut cmd = match kind {
            PeerKind::Python => {
                let python = peers.join("venv").join("bin").join("python");
                require_installed(&python);
                let mut c = Command::new(python);
                c.arg(scripts.join("python").join("peer.py"))
                    .env("PYTHONUNBUFFERED", "1");
                c
            }
            PeerKind::Node => {
                let modules = peers.join("node").join("node_modules");
                require_installed(&modules.join("@elastic").join("opamp-client-node"));
                let mut c = Command::new(std::env::var_os("NODE").unwrap_or_else(|| "node".into()));
                c.arg(scripts.join("node").join("peer.js"))
                    .env("NODE_PATH", modules);
                c
            }
        };
        cmd.arg("--endpoint")
            .arg(&opts.endpoint)
            .arg("--heartbeat")
            .arg(secs(opts.heartbeat))
            .arg("--name")
            .arg(&opts.name)
            .arg("--run-seconds")
            .arg(secs(opts.run_for))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {kind:?} peer {:?}: {e}", opts.name));

        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let value = serde_json::from_str::<Value>(&line)
                    .unwrap_or_else(|_| serde_json::json!({"event": "_raw", "line": line}));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        tokio::spawn(collect_stderr(
            child.stderr.take().expect("stderr is piped"),
            stderr.clone(),
        ));

        Peer {
            kind,
            name: opts.name,
            child,
            lines,
            pending: VecDeque::new(),
            history: Vec::new(),
            stderr,
        }
    }

    /// Which client this is.
    pub fn kind(&self) -> PeerKind {
        self.kind
    }

    /// The `--name` it was started with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// OS process id (None once reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the next not-yet-consumed event named `event` and returns it (consuming it).
    /// Events of other names received meanwhile stay available to later calls.
    /// Panics on timeout or if the peer exits first, with the events seen and its stderr.
    pub async fn next_event(&mut self, event: &str, timeout: Duration) -> Value {
        match self.try_next_event(event, timeout).await {
            Some(v) => v,
            None => {
                let msg = self.failure(&format!("no {event:?} event within {timeout:?}"));
                panic!("{msg}")
            }
        }
    }

    /// Like [`Peer::next_event`] but returns None on timeout or peer exit.
    pub async fn try_next_event(&mut self, event: &str, timeout: Duration) -> Option<Value> {
        if let Some(pos) = self.pending.iter().position(|v| v["event"] == event) {
            return self.pending.remove(pos);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(v)) => {
                    self.history.push(v.clone());
                    if v["event"] == event {
                        return Some(v);
                    }
                    self.pending.push_back(v);
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Waits for `started` and returns the instance uid as 32 lowercase hex digits.
    pub async fn started(&mut self, timeout: Duration) -> String {
        let v = self.next_event("started", timeout).await;
        v["instance_uid"]
            .as_str()
            .unwrap_or_else(|| panic!("started event without instance_uid: {v}"))
            .to_string()
    }

    /// Every event received so far (consumed or not), in order.
    pub fn history(&self) -> &[Value] {
        &self.history
    }

    /// Drains already-received output without waiting and returns the full history.
    pub fn drain(&mut self) -> &[Value] {
        while let Ok(v) = self.lines.try_recv() {
            self.history.push(v.clone());
            self.pending.push_back(v);
        }
        &self.history
    }

    /// The peer's stderr so far (last 16 KiB).
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// Asks the peer to stop cleanly (SIGTERM), waits for its `stopped` event and its exit.
    /// Panics if it does not stop within `timeout` or exits unsuccessfully.
    pub async fn stop(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        self.next_event("stopped", timeout).await;
        let status = self.wait_exit(timeout).await;
        if !status.success() {
            let msg = self.failure(&format!("exited with {status}"));
            panic!("{msg}");
        }
        status
    }

    /// Waits for the process to exit (e.g. after `--run-seconds`). Panics on timeout.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("waiting for {:?} peer {:?}: {e}", self.kind, self.name),
            Err(_) => {
                let msg = self.failure(&format!("did not exit within {timeout:?}"));
                panic!("{msg}")
            }
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// A failure message with the events seen and the stderr tail.
    fn failure(&mut self, what: &str) -> String {
        self.drain();
        let events: Vec<String> = self.history.iter().map(Value::to_string).collect();
        format!(
            "{:?} peer {:?}: {what}\n--- events seen ---\n{}\n--- stderr (tail) ---\n{}",
            self.kind,
            self.name,
            events.join("\n"),
            self.stderr()
        )
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // kill_on_drop also does this; be explicit so no peer outlives its test.
        let _ = self.child.start_kill();
    }
}

fn require_installed(path: &Path) {
    if !path.exists() {
        panic!(
            "OpAMP peer not installed: {} is missing.\n\
             Run `bash tests/peers/install.sh` (or `tests/run.sh`, which does it) first.",
            path.display()
        );
    }
}

fn secs(d: Duration) -> String {
    format!("{}", d.as_secs_f64())
}

/// Appends each line of `stream` to `buf` (a child process's stderr, for failure messages).
pub async fn collect_stderr(stream: impl AsyncRead + Unpin, buf: Arc<Mutex<String>>) {
    let mut reader = BufReader::new(stream).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        let mut b = buf.lock().expect("stderr lock");
        b.push_str(&line);
        b.push('\n');
        if b.len() > STDERR_KEEP {
            let mut cut = b.len() - STDERR_KEEP;
            while !b.is_char_boundary(cut) {
                cut += 1;
            }
            b.drain(..cut);
        }
    }
}

/// Writes a secret file (tokens, signing secrets) the way an operator must: readable by its
/// owner only, since `flotilla serve` refuses a secret file other users can read or write.
/// Created with mode 0600 whatever the umask; an existing file is truncated and re-moded.
pub fn write_secret(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = path.as_ref();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create secret file {}: {e}", path.display()));
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 600 {}: {e}", path.display()));
    f.write_all(contents.as_ref())
        .unwrap_or_else(|e| panic!("write secret file {}: {e}", path.display()));
}

#[cfg(test)]
mod self_test {
    //! Checks the peers and these helpers against a minimal in-process OpAMP/HTTP responder
    //! (no Flotilla server needed): connect, heartbeat, remote config → APPLIED, stop.

    use super::*;
    use flotilla_proto::{
        AgentConfigFile, AgentConfigMap, AgentRemoteConfig, AgentToServer, Message,
        RemoteConfigStatuses, ServerToAgent,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const HASH: [u8; 4] = [0xde, 0xad, 0xbe, 0xef];

    /// Serves keep-alive HTTP/1.1 POSTs; echoes instance_uid, offers a config on each
    /// connection's 2nd request, and forwards every decoded AgentToServer to `seen`.
    async fn responder(listener: TcpListener, seen: mpsc::UnboundedSender<AgentToServer>) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(serve_conn(stream, seen));
        }
    }

    async fn serve_conn(mut stream: TcpStream, seen: mpsc::UnboundedSender<AgentToServer>) {
        let mut buf = Vec::new();
        let mut n = 0;
        loop {
            let head_end = loop {
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p + 4;
                }
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            while buf.len() < head_end + len {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
            let msg = AgentToServer::decode(&buf[head_end..head_end + len]).unwrap();
            buf.drain(..head_end + len);
            n += 1;
            let mut reply = ServerToAgent {
                instance_uid: msg.instance_uid.clone(),
                capabilities: 0x7,
                ..Default::default()
            };
            let _ = seen.send(msg);
            if n == 2 {
                let mut files = std::collections::HashMap::new();
                files.insert(
                    "fluent-bit.conf".to_string(),
                    AgentConfigFile {
                        body: b"[INPUT]\n    Name dummy\n".to_vec(),
                        content_type: "text/plain".into(),
                    },
                );
                reply.remote_config = Some(AgentRemoteConfig {
                    config: Some(AgentConfigMap { config_map: files }),
                    config_hash: HASH.to_vec(),
                });
            }
            let body = reply.encode_to_vec();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            if stream.write_all(head.as_bytes()).await.is_err()
                || stream.write_all(&body).await.is_err()
            {
                return;
            }
        }
    }

    async fn round_trip(kind: PeerKind) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}/v1/opamp", listener.local_addr().unwrap());
        let (tx, mut seen) = mpsc::unbounded_channel();
        let server = tokio::spawn(responder(listener, tx));

        let t = Duration::from_secs(20);
        let mut opts = PeerOptions::new(&endpoint, "self-test", Duration::from_millis(300));
        opts.name = format!("self-test-{kind:?}");
        let mut peer = Peer::spawn(kind, opts);
        let uid = peer.started(t).await;
        assert_eq!(uid.len(), 32, "16-byte uid as hex");
        peer.next_event("connected", t).await;
        let rc = peer.next_event("remote_config", t).await;
        assert_eq!(rc["hash"], "deadbeef");
        assert_eq!(rc["files"]["fluent-bit.conf"], "[INPUT]\n    Name dummy\n");

        // The server must see APPLIED for that hash, from the same instance.
        let applied = tokio::time::timeout(t, async {
            while let Some(m) = seen.recv().await {
                assert_eq!(hex_of(&m.instance_uid), uid);
                if let Some(s) = &m.remote_config_status {
                    if s.status == RemoteConfigStatuses::Applied as i32 {
                        return s.last_remote_config_hash.clone();
                    }
                }
            }
            panic!("responder stopped");
        })
        .await
        .expect("APPLIED status reached the server");
        assert_eq!(applied, HASH.to_vec());

        peer.stop(t).await;
        server.abort();
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[tokio::test]
    async fn python_peer_round_trip() {
        round_trip(PeerKind::Python).await;
    }

    #[tokio::test]
    async fn node_peer_round_trip() {
        round_trip(PeerKind::Node).await;
    }
}
