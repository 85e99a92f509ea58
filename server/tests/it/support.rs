//! Test harness: a real server on port 0 with a temporary data directory, plus small clients.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use flotilla_server::config::{Config, Validated};
use flotilla_server::store::Store;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ADMIN_TOKEN: &str = "admin-secret-token-0123456789";
pub const OPERATOR_TOKEN: &str = "operator-secret-token-0123456789";
pub const VIEWER_TOKEN: &str = "viewer-secret-token-0123456789";

/// A running server. Dropping it does not stop it; call [`TestServer::stop`] for a graceful stop.
pub struct TestServer {
    pub opamp: SocketAddr,
    pub api: SocketAddr,
    /// The chat listener, when a chat gateway is enabled.
    pub chat: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub config: Config,
    /// The server's fleet service, for tests of its event bus.
    pub fleet: flotilla_server::service::Fleet,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    // Kept so the directory outlives the server; `None` when the caller owns the directory.
    _tmp: Option<Arc<tempfile::TempDir>>,
}

impl TestServer {
    /// Starts a server with default settings (tweaked by `f`) on fresh port-0 listeners.
    pub async fn start_with(f: impl FnOnce(&mut Config)) -> TestServer {
        let tmp = Arc::new(tempfile::tempdir().expect("tempdir"));
        let mut s = Self::start_in(tmp.path().to_path_buf(), f).await;
        s._tmp = Some(tmp);
        s
    }

    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server on an existing data directory (for restart tests).
    pub async fn start_in(data_dir: PathBuf, f: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_in_wrapped(data_dir, f, |s| s).await
    }

    /// Starts a server whose store is `wrap`ped (e.g. by a store that can be made to fail).
    pub async fn start_wrapped(
        f: impl FnOnce(&mut Config),
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
    ) -> TestServer {
        let tmp = Arc::new(tempfile::tempdir().expect("tempdir"));
        let mut s = Self::start_in_wrapped(tmp.path().to_path_buf(), f, wrap).await;
        s._tmp = Some(tmp);
        s
    }

    async fn start_in_wrapped(
        data_dir: PathBuf,
        f: impl FnOnce(&mut Config),
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
    ) -> TestServer {
        let tokens = data_dir.join("tokens.txt");
        std::fs::create_dir_all(&data_dir).expect("data dir");
        flotilla_e2e::write_secret(
            &tokens,
            format!(
                "# name role token\nadmin admin {ADMIN_TOKEN}\nops operator {OPERATOR_TOKEN}\nwatcher viewer {VIEWER_TOKEN}\n"
            ),
        );
        let mut config = Config {
            data_dir: data_dir.clone(),
            ..Config::default()
        };
        config.opamp.listen = "127.0.0.1:0".into();
        config.api.listen = "127.0.0.1:0".into();
        config.api.tokens_file = Some(tokens);
        f(&mut config);
        let v: Validated = config.validate().expect("valid test config");
        let opamp_l = TcpListener::bind(v.opamp_addr).await.expect("bind opamp");
        let api_l = TcpListener::bind(v.api_addr).await.expect("bind api");
        let opamp = opamp_l.local_addr().unwrap();
        let api = api_l.local_addr().unwrap();
        let chat_l = match v.chat_addr {
            Some(a) => Some(TcpListener::bind(a).await.expect("bind chat")),
            None => None,
        };
        let chat = chat_l.as_ref().map(|l| l.local_addr().unwrap());
        let store = wrap(flotilla_server::open_store(&v.config).await.expect("store"));
        let (tx, rx) = oneshot::channel::<()>();
        let (fleet_tx, fleet_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.await;
            };
            flotilla_server::run_observed_with_chat(
                v,
                store,
                opamp_l,
                api_l,
                chat_l,
                shutdown,
                |f| {
                    let _ = fleet_tx.send(f.clone());
                },
            )
            .await
            .expect("server run");
        });
        let fleet = fleet_rx.await.expect("the server started");
        TestServer {
            opamp,
            api,
            chat,
            data_dir,
            config,
            fleet,
            stop: Some(tx),
            task: Some(task),
            _tmp: None,
        }
    }

    /// Graceful stop; waits until the server has flushed its store.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task");
        }
    }

    pub fn opamp_http_url(&self) -> String {
        format!("http://{}{}", self.opamp, self.config.opamp.path)
    }

    pub fn opamp_ws_url(&self) -> String {
        format!("ws://{}{}", self.opamp, self.config.opamp.path)
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }

    /// A REST client that sends the admin token.
    pub fn rest(&self) -> Rest {
        Rest {
            base: format!("http://{}", self.api),
            token: Some(ADMIN_TOKEN.into()),
            http: reqwest::Client::new(),
        }
    }

    pub fn rest_as(&self, token: Option<&str>) -> Rest {
        Rest {
            base: format!("http://{}", self.api),
            token: token.map(str::to_string),
            http: reqwest::Client::new(),
        }
    }
}

/// A tiny JSON REST client: every call returns (status, body as JSON or Null).
pub struct Rest {
    pub base: String,
    pub token: Option<String>,
    pub http: reqwest::Client,
}

impl Rest {
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        (status, json)
    }
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }
}

// ---- third-party peers installed by tests/peers/install.sh ----

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where `tests/peers/install.sh` put the peers: `$FLOTILLA_PEERS_DIR` or `<repo>/.peers`.
pub fn peers_dir() -> PathBuf {
    std::env::var_os("FLOTILLA_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".peers"))
}

/// The peers' Python; fails loudly, naming `what` needed it, when it is not installed.
pub fn peers_python_in(what: &str) -> PathBuf {
    let py = peers_dir().join("venv/bin/python");
    assert!(
        py.is_file(),
        "{what} is not installed: {} is missing. Run `bash tests/peers/install.sh` first.",
        py.display()
    );
    py
}

// ---- OpAMP agents over plain HTTP (added for the REST tests) ----

/// Builds a full status report: `service.*` attributes are identifying, the rest
/// non-identifying; `custom_caps` is sent only when non-empty.
pub fn agent_status(
    uid: uuid::Uuid,
    seq: u64,
    attrs: &[(&str, &str)],
    caps: u64,
    custom_caps: &[&str],
) -> flotilla_proto::AgentToServer {
    let (ident, non_ident): (Vec<_>, Vec<_>) =
        attrs.iter().partition(|(k, _)| k.starts_with("service."));
    let kvs = |v: Vec<&(&str, &str)>| -> Vec<flotilla_proto::KeyValue> {
        v.into_iter()
            .map(|(k, v)| flotilla_proto::kv_str(k, v))
            .collect()
    };
    flotilla_proto::AgentToServer {
        instance_uid: uid.as_bytes().to_vec(),
        sequence_num: seq,
        agent_description: Some(flotilla_proto::AgentDescription {
            identifying_attributes: kvs(ident),
            non_identifying_attributes: kvs(non_ident),
        }),
        capabilities: caps,
        custom_capabilities: (!custom_caps.is_empty()).then(|| {
            flotilla_proto::CustomCapabilities {
                capabilities: custom_caps.iter().map(|s| s.to_string()).collect(),
            }
        }),
        ..Default::default()
    }
}

/// POSTs one `AgentToServer` to the plain-HTTP OpAMP endpoint and decodes the answer.
pub async fn opamp_post(
    server: &TestServer,
    msg: &flotilla_proto::AgentToServer,
) -> flotilla_proto::ServerToAgent {
    use flotilla_proto::Message;
    let resp = reqwest::Client::new()
        .post(server.opamp_http_url())
        .header("Content-Type", "application/x-protobuf")
        .body(msg.encode_to_vec())
        .send()
        .await
        .expect("OpAMP request");
    assert_eq!(resp.status().as_u16(), 200, "OpAMP HTTP status");
    let bytes = resp.bytes().await.expect("OpAMP body");
    flotilla_proto::ServerToAgent::decode(bytes.as_ref()).expect("ServerToAgent")
}

/// Registers a new agent through the real OpAMP HTTP endpoint; returns its uid.
pub async fn register_agent(
    server: &TestServer,
    attrs: &[(&str, &str)],
    caps: u64,
    custom_caps: &[&str],
) -> uuid::Uuid {
    let uid = uuid::Uuid::now_v7();
    opamp_post(server, &agent_status(uid, 0, attrs, caps, custom_caps)).await;
    uid
}

/// Like [`register_agent`], also reporting top-level health.
pub async fn register_agent_with_health(
    server: &TestServer,
    attrs: &[(&str, &str)],
    caps: u64,
    custom_caps: &[&str],
    healthy: bool,
) -> uuid::Uuid {
    let uid = uuid::Uuid::now_v7();
    let mut msg = agent_status(uid, 0, attrs, caps, custom_caps);
    msg.health = Some(flotilla_proto::ComponentHealth {
        healthy,
        start_time_unix_nano: 1,
        ..Default::default()
    });
    opamp_post(server, &msg).await;
    uid
}
