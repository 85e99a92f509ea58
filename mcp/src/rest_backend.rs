//! [`RestBackend`]: the fleet reached through a remote Flotilla's REST API with a bearer token.
//! `flotilla mcp` (the stdio server Claude Desktop and Codex launch) forwards every tool call
//! through it, so the remote server authorises and audits each call as that token's caller.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::backend::{
    AuditFilter, BackendError, BackendResult, CommandsFilter, FleetBackend, QueueTarget,
};

/// Header naming the adapter a REST call comes from.
pub const CHANNEL_HEADER: &str = "X-Flotilla-Channel";

/// How long one REST call may take before the tool call fails with `unavailable`.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A remote Flotilla's REST API.
#[derive(Clone)]
pub struct RestBackend {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    identity: String,
}

impl std::fmt::Debug for RestBackend {
    // Never print the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestBackend")
            .field("base", &self.base)
            .field("identity", &self.identity)
            .finish()
    }
}

impl RestBackend {
    /// `server` is the operator listener's base URL, e.g. `http://127.0.0.1:8080`.
    pub fn new(server: &str, token: Option<String>) -> Result<RestBackend, BackendError> {
        let base = server.trim().trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(BackendError::new(
                "bad_request",
                format!("server URL {server:?} must start with http:// or https://"),
            ));
        }
        if base.starts_with("https://") {
            // The workspace's reqwest is built without TLS; say so instead of failing later
            // with an obscure connector error.
            return Err(BackendError::new(
                "bad_request",
                "https:// is not supported by this build; reach the server over http:// on a \
                 trusted network or through a local TLS-terminating tunnel",
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| BackendError::new("internal", format!("HTTP client: {e}")))?;
        // The identity binds confirmations to this caller without ever holding the token in
        // clear: a digest prefix distinguishes tokens and reveals nothing useful.
        let identity = match &token {
            Some(t) => format!(
                "rest:{}@{base}",
                &hex::encode(Sha256::digest(t.as_bytes()))[..16]
            ),
            None => format!("rest:anonymous@{base}"),
        };
        Ok(RestBackend {
            base,
            token,
            http,
            identity,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> BackendResult<Value> {
        // Names the channel for servers that honour it in their audit records; the REST API
        // authenticates and authorises exactly as for any REST call either way.
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .header(CHANNEL_HEADER, "mcp")
            .query(query);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            BackendError::new(
                "unavailable",
                format!("cannot reach Flotilla at {}: {e}", self.base),
            )
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| {
            BackendError::new(
                "unavailable",
                format!("reading the answer from {}: {e}", self.base),
            )
        })?;
        let json: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text}))
        };
        if status.is_success() {
            return Ok(json);
        }
        let code = json["error"]["code"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| match status {
                StatusCode::UNAUTHORIZED => "unauthorized".into(),
                StatusCode::FORBIDDEN => "forbidden".into(),
                StatusCode::NOT_FOUND => "not_found".into(),
                _ => "internal".into(),
            });
        let message = json["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status} from {}{path}", self.base));
        Err(BackendError::new(code, message))
    }
}

fn push(q: &mut Vec<(&'static str, String)>, k: &'static str, v: &Option<String>) {
    if let Some(v) = v {
        q.push((k, v.clone()));
    }
}

fn seg(s: &str) -> String {
    // Path segments are uids in practice; refuse anything that could change the path.
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect()
}

#[async_trait]
impl FleetBackend for RestBackend {
    fn identity(&self) -> String {
        self.identity.clone()
    }

    async fn search(
        &self,
        q: &str,
        limit: Option<usize>,
        cursor: Option<&str>,
        total: bool,
    ) -> BackendResult<Value> {
        let mut query = vec![("q", q.to_string()), ("total", total.to_string())];
        if let Some(l) = limit {
            query.push(("limit", l.to_string()));
        }
        if let Some(c) = cursor {
            query.push(("cursor", c.to_string()));
        }
        self.call(Method::GET, "/api/v1/agents", &query, None).await
    }

    async fn agent(&self, uid: &str) -> BackendResult<Value> {
        self.call(
            Method::GET,
            &format!("/api/v1/agents/{}", seg(uid)),
            &[],
            None,
        )
        .await
    }

    async fn summary(&self) -> BackendResult<Value> {
        self.call(Method::GET, "/api/v1/fleet/summary", &[], None)
            .await
    }

    async fn catalog(&self) -> BackendResult<Value> {
        self.call(Method::GET, "/api/v1/catalog", &[], None).await
    }

    async fn queue(
        &self,
        target: &QueueTarget,
        kind: &str,
        params: &Value,
    ) -> BackendResult<Value> {
        let mut body = json!({"kind": kind, "params": params});
        match target {
            QueueTarget::Agent(a) => body["agent"] = json!(a),
            QueueTarget::Query(q) => body["query"] = json!(q),
        }
        self.call(Method::POST, "/api/v1/commands", &[], Some(body))
            .await
    }

    async fn command(&self, id: &str) -> BackendResult<Value> {
        self.call(
            Method::GET,
            &format!("/api/v1/commands/{}", seg(id)),
            &[],
            None,
        )
        .await
    }

    async fn batch(&self, id: &str) -> BackendResult<Value> {
        self.call(
            Method::GET,
            &format!("/api/v1/batches/{}", seg(id)),
            &[],
            None,
        )
        .await
    }

    async fn commands(&self, f: &CommandsFilter) -> BackendResult<Value> {
        let mut q = Vec::new();
        push(&mut q, "agent", &f.agent);
        push(&mut q, "status", &f.status);
        push(&mut q, "kind", &f.kind);
        push(&mut q, "batch", &f.batch);
        push(&mut q, "limit", &f.limit.map(|l| l.to_string()));
        push(&mut q, "cursor", &f.cursor);
        self.call(Method::GET, "/api/v1/commands", &q, None).await
    }

    async fn audit(&self, f: &AuditFilter) -> BackendResult<Value> {
        let mut q = Vec::new();
        push(&mut q, "actor", &f.actor);
        push(&mut q, "channel", &f.channel);
        push(&mut q, "agent", &f.agent);
        push(&mut q, "operation", &f.operation);
        push(&mut q, "since", &f.since);
        push(&mut q, "until", &f.until);
        push(&mut q, "limit", &f.limit.map(|l| l.to_string()));
        push(&mut q, "cursor", &f.cursor);
        self.call(Method::GET, "/api/v1/audit", &q, None).await
    }

    async fn cancel(&self, id: &str) -> BackendResult<Value> {
        self.call(
            Method::DELETE,
            &format!("/api/v1/commands/{}", seg(id)),
            &[],
            None,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_never_holds_the_token() {
        let b = RestBackend::new("http://h:1/", Some("secret-token-123456".into())).unwrap();
        assert!(!b.identity().contains("secret"));
        assert!(!format!("{b:?}").contains("secret"));
        assert_eq!(b.base, "http://h:1");
        assert!(RestBackend::new("ftp://x", None).is_err());
    }
}
