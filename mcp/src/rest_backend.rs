//! [`RestBackend`]: the fleet reached through a remote Flotilla's REST API with a bearer token.
//! `flotilla mcp` (the stdio server Claude Desktop and Codex launch) forwards every tool call
//! through it, so the remote server authorises and audits each call as that token's caller.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::backend::{
    AuditFilter, BackendError, BackendResult, CommandsFilter, ExpectedTargets, FleetBackend,
    QueueTarget,
};

/// Header naming the adapter a REST call comes from.
pub const CHANNEL_HEADER: &str = "X-Flotilla-Channel";
/// Header naming the chat user a gateway token acts for (percent-encoded chat identity).
pub const ACTING_FOR_HEADER: &str = "X-Flotilla-Acting-For";
/// Header with the role the gateway's identity mapping gave that chat user.
pub const ACTING_ROLE_HEADER: &str = "X-Flotilla-Acting-Role";

/// How long one REST call may take before the tool call fails with `unavailable`.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for the TCP (and TLS) connection: an unreachable server fails a tool call
/// in seconds, not after the whole-call timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How to reach the server beyond its URL and token.
#[derive(Debug, Clone, Default)]
pub struct RestOptions {
    /// PEM file of CA certificates trusted for `https://` besides the built-in web roots (a
    /// private CA, or a self-signed server certificate).
    pub ca_file: Option<std::path::PathBuf>,
}

/// A remote Flotilla's REST API.
#[derive(Clone)]
pub struct RestBackend {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    identity: String,
    /// Set by [`RestBackend::acting_for`].
    acting: Option<Acting>,
}

/// The chat user a gateway's calls are made for.
#[derive(Debug, Clone)]
struct Acting {
    /// The chat identity, percent-encoded for its header.
    encoded: String,
    role: String,
    /// The chat platform (`slack`, `discord`, `teams`), declared as the call's channel.
    channel: String,
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
    /// `server` is the operator listener's base URL, e.g. `http://127.0.0.1:8080` or
    /// `https://flotilla.example:8443`.
    pub fn new(server: &str, token: Option<String>) -> Result<RestBackend, BackendError> {
        RestBackend::with_options(server, token, &RestOptions::default())
    }

    /// [`RestBackend::new`] with [`RestOptions`].
    pub fn with_options(
        server: &str,
        token: Option<String>,
        opts: &RestOptions,
    ) -> Result<RestBackend, BackendError> {
        let bad = |m: String| BackendError::new("bad_request", m);
        let base = server.trim().trim_end_matches('/').to_string();
        let url = reqwest::Url::parse(&base)
            .map_err(|e| bad(format!("server URL {server:?} is not a URL: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" => {
                if token.is_some() && !is_loopback(&url) {
                    // Not refused: a trusted network without TLS is a deployment choice. But
                    // the token crosses it in clear, so say so where the operator will look.
                    tracing::warn!(server = %base,
                        "flotilla mcp: plain http:// to a host that is not loopback sends the API token in clear; use https://");
                }
            }
            _ => {
                return Err(bad(format!(
                    "server URL {server:?} must start with http:// or https://"
                )))
            }
        }
        let mut builder = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT);
        if let Some(path) = &opts.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| bad(format!("cannot read the CA file {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                bad(format!(
                    "the CA file {} is not PEM certificates: {e}",
                    path.display()
                ))
            })?;
            if certs.is_empty() {
                return Err(bad(format!(
                    "the CA file {} holds no certificate",
                    path.display()
                )));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
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
            acting: None,
        })
    }

    /// This server and token acting for a chat user (`flotilla chat` as its own process):
    /// every call carries `X-Flotilla-Acting-For: <identity>` (percent-encoded, e.g.
    /// `slack:T1/U1 (Alice)`) and `X-Flotilla-Acting-Role: <role>`. The server accepts them
    /// only from a token marked `gateway` and audits the call as `<token name> for <identity>`
    /// with the lower of the two roles.
    pub fn acting_for(&self, identity: &str, role: &str) -> RestBackend {
        let channel = identity
            .split_once(':')
            .map(|(p, _)| p.to_string())
            .unwrap_or_default();
        RestBackend {
            identity: format!("{} for {identity}", self.identity),
            acting: Some(Acting {
                encoded: percent_encoding::utf8_percent_encode(
                    identity,
                    percent_encoding::NON_ALPHANUMERIC,
                )
                .to_string(),
                role: role.to_string(),
                channel,
            }),
            ..self.clone()
        }
    }

    /// `GET /api/v1/whoami`: `{actor, channel, role, gateway}`, the caller as the server
    /// authorises and audits it.
    pub async fn whoami(&self) -> BackendResult<Value> {
        self.call(Method::GET, "/api/v1/whoami", &[], None).await
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
            .query(query);
        req = match &self.acting {
            Some(a) => req
                .header(CHANNEL_HEADER, &a.channel)
                .header(ACTING_FOR_HEADER, &a.encoded)
                .header(ACTING_ROLE_HEADER, &a.role),
            None => req.header(CHANNEL_HEADER, "mcp"),
        };
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

fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn push(q: &mut Vec<(&'static str, String)>, k: &'static str, v: &Option<String>) {
    if let Some(v) = v {
        q.push((k, v.clone()));
    }
}

/// The body of `POST /api/v1/commands`.
fn queue_body(target: &QueueTarget, kind: &str, params: &Value) -> Value {
    let mut body = json!({"kind": kind, "params": params});
    match target {
        QueueTarget::Agent(a) => body["agent"] = json!(a),
        QueueTarget::Query(q) => body["query"] = json!(q),
    }
    body
}

/// A path segment: every byte but RFC 3986's unreserved characters percent-encoded.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
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

    async fn resolve_agent(&self, reference: &str) -> BackendResult<String> {
        let r = reference.trim();
        if let Ok(u) = uuid::Uuid::parse_str(r) {
            return Ok(u.to_string());
        }
        // The server resolves names (one implementation); its agent view carries the uid.
        // "." and ".." cannot travel as a path segment, and no agent is called that.
        if r.is_empty() || r.chars().all(|c| c == '.') {
            return Err(BackendError::new(
                "not_found",
                format!("no agent has uid, host name or service name {r:?}"),
            ));
        }
        let v = self
            .call(
                Method::GET,
                &format!("/api/v1/agents/{}", percent_encode(r)),
                &[],
                None,
            )
            .await?;
        v["uid"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| BackendError::new("internal", "the agent view has no uid"))
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

    async fn plan(&self, target: &QueueTarget, kind: &str, params: &Value) -> BackendResult<Value> {
        let mut body = queue_body(target, kind, params);
        body["dry_run"] = json!(true);
        self.call(Method::POST, "/api/v1/commands", &[], Some(body))
            .await
    }

    async fn queue(
        &self,
        target: &QueueTarget,
        kind: &str,
        params: &Value,
        expect: Option<&ExpectedTargets>,
    ) -> BackendResult<Value> {
        let mut body = queue_body(target, kind, params);
        if let Some(e) = expect {
            body["expect_targets"] = json!(e);
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
        assert!(RestBackend::new("not a url", None).is_err());
    }

    #[test]
    fn acting_for_encodes_the_chat_identity_and_keeps_the_token() {
        let b = RestBackend::new("http://h:1/", Some("secret-token-123456".into())).unwrap();
        let a = b.acting_for("slack:T1/U1 (Alïce)", "operator");
        let acting = a.acting.as_ref().unwrap();
        assert_eq!(acting.encoded, "slack%3AT1%2FU1%20%28Al%C3%AFce%29");
        assert_eq!(
            (acting.channel.as_str(), acting.role.as_str()),
            ("slack", "operator")
        );
        assert_eq!(a.token, b.token);
        assert!(a.identity().ends_with(" for slack:T1/U1 (Alïce)"));
        assert!(a.identity().starts_with(&b.identity()));
        assert!(b.acting.is_none(), "the original is unchanged");
    }

    #[test]
    fn https_is_accepted_and_loopback_is_recognised() {
        // This build speaks TLS (rustls): an https URL is a valid server, token or not.
        let b = RestBackend::new("https://flotilla.example:8443/", Some("t0ken".into())).unwrap();
        assert_eq!(b.base, "https://flotilla.example:8443");
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(is_loopback(&u("http://127.0.0.1:8080")));
        assert!(is_loopback(&u("http://[::1]:8080")));
        assert!(is_loopback(&u("http://LOCALHOST:1")));
        assert!(!is_loopback(&u("http://10.0.0.5:8080")));
        let missing = RestOptions {
            ca_file: Some("/nonexistent/ca.pem".into()),
        };
        let e = RestBackend::with_options("https://h", None, &missing).unwrap_err();
        assert!(e.message.contains("CA file"), "{e}");
    }
}
