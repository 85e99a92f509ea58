//! Test harness: a real server on port 0 with a temporary data directory, plus small clients.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use flotilla_server::config::{Config, Validated};
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
    pub data_dir: PathBuf,
    pub config: Config,
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
        let tokens = data_dir.join("tokens.txt");
        std::fs::create_dir_all(&data_dir).expect("data dir");
        std::fs::write(
            &tokens,
            format!(
                "# name role token\nadmin admin {ADMIN_TOKEN}\nops operator {OPERATOR_TOKEN}\nwatcher viewer {VIEWER_TOKEN}\n"
            ),
        )
        .expect("tokens file");
        let mut config = Config::default();
        config.data_dir = data_dir.clone();
        config.opamp.listen = "127.0.0.1:0".into();
        config.api.listen = "127.0.0.1:0".into();
        config.api.tokens_file = Some(tokens);
        f(&mut config);
        let v: Validated = config.validate().expect("valid test config");
        let opamp_l = TcpListener::bind(v.opamp_addr).await.expect("bind opamp");
        let api_l = TcpListener::bind(v.api_addr).await.expect("bind api");
        let opamp = opamp_l.local_addr().unwrap();
        let api = api_l.local_addr().unwrap();
        let store = flotilla_server::open_store(&v.config).await.expect("store");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            flotilla_server::run(v, store, opamp_l, api_l, async move {
                let _ = rx.await;
            })
            .await
            .expect("server run");
        });
        TestServer {
            opamp,
            api,
            data_dir,
            config,
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
