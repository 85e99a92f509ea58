//! The HTTP transports, as one axum router to mount on the operator listener:
//!
//! - `/mcp`: streamable HTTP (rmcp's `StreamableHttpService`): the current 2026-07-28
//!   revision (stateless, per-request metadata) and, for clients that still use it, the
//!   session-based revision (`initialize`, `Mcp-Session-Id`).
//! - `GET /sse` + `POST /messages?sessionId=`: the legacy HTTP+SSE transport (2024-11-05).
//!   rmcp no longer ships a server for it, so this module adapts it: each SSE connection is a
//!   channel pair fed to the same [`FlotillaMcp`] service, so there is no second tool layer.
//!
//! Authentication is the embedding server's job: it puts a [`crate::BackendHandle`] in each
//! request's extensions; the handler reads it from the request parts this module (and rmcp)
//! attach to every message. A session (a `/mcp` session of the session-based revisions, or a
//! legacy SSE session) belongs to the caller who opened it: another valid token that learns
//! its id gets 403, so it can neither use the session nor answer its pending elicitation. Host and Origin are checked on every transport against an
//! allow-list (loopback by default) to stop DNS-rebinding attacks from a browser.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream::{self, Stream, StreamExt};
use rmcp::model::{ClientJsonRpcMessage, GetExtensions, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::ServiceExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, PollSender};

use crate::backend::BackendHandle;
use crate::server::FlotillaMcp;

/// Hosts accepted by default: loopback only.
pub const DEFAULT_ALLOWED_HOSTS: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// Most legacy SSE sessions open at once (each holds a task and two channels).
const MAX_SSE_SESSIONS: usize = 1024;
/// Most legacy SSE sessions one caller may hold open, so one caller cannot take every slot.
pub const MAX_SSE_SESSIONS_PER_CALLER: usize = 32;
/// Owners of `/mcp` sessions remembered before the closed ones are pruned.
const SESSION_OWNERS_PRUNE_AT: usize = 1024;
/// The streamable HTTP session header (rmcp's `HEADER_SESSION_ID`).
const SESSION_HEADER: &str = "mcp-session-id";
/// Messages buffered per direction of a legacy SSE session.
const SSE_CHANNEL: usize = 64;
/// Largest accepted JSON-RPC message on `/messages`.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Settings of the HTTP transports.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Accepted `Host` values: a host name or address (any port), or `host:port`. Empty
    /// disables the check (only behind a proxy that enforces it).
    pub allowed_hosts: Vec<String>,
    /// Accepted `Origin` values (`scheme://host[:port]`, `:*` for any port). Requests without
    /// an Origin (non-browser clients) always pass; with an empty list every browser origin is
    /// refused.
    pub allowed_origins: Vec<String>,
    /// Cancelled at server shutdown: ends open SSE streams and sessions so the listener can
    /// drain.
    pub shutdown: CancellationToken,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            allowed_hosts: DEFAULT_ALLOWED_HOSTS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            allowed_origins: Vec::new(),
            shutdown: CancellationToken::new(),
        }
    }
}

/// The `/mcp`, `/sse` and `/messages` routes serving `mcp`.
pub fn router(mcp: FlotillaMcp, opts: HttpOptions) -> Router {
    let mut cfg = StreamableHttpServerConfig::default()
        .with_cancellation_token(opts.shutdown.child_token())
        .with_allowed_origins(opts.allowed_origins.clone())
        .enforce_origin_validation();
    cfg = if opts.allowed_hosts.is_empty() {
        cfg.disable_allowed_hosts()
    } else {
        cfg.with_allowed_hosts(opts.allowed_hosts.clone())
    };
    let factory = {
        let mcp = mcp.clone();
        move || Ok(mcp.clone())
    };
    let manager = Arc::new(LocalSessionManager::default());
    let streamable = StreamableHttpService::new(factory, manager.clone(), cfg);
    let owners = Arc::new(SessionOwners {
        owners: Mutex::new(HashMap::new()),
        manager,
    });
    let sse = Arc::new(SseState {
        mcp,
        opts,
        sessions: Mutex::new(HashMap::new()),
    });
    let streamable = Router::new()
        .route_service("/mcp", streamable)
        .layer(axum::middleware::from_fn_with_state(owners, bind_session));
    Router::new()
        .route("/sse", get(sse_open))
        .route("/messages", post(sse_message))
        .with_state(sse)
        .merge(streamable)
}

// ---------------------------------------------------------------------------------------
// Owners of streamable HTTP sessions. rmcp's session manager knows sessions, not callers:
// this layer records who initialised each session (the `Mcp-Session-Id` of the initialize
// answer) and refuses the session to anyone else.

struct SessionOwners {
    owners: Mutex<HashMap<String, Option<String>>>,
    manager: Arc<LocalSessionManager>,
}

impl SessionOwners {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<String>>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets sessions rmcp has closed (idle timeout, shutdown) without a DELETE.
    async fn prune(&self) {
        let known: Vec<String> = self.lock().keys().cloned().collect();
        let live = self.manager.sessions.read().await;
        let dead: Vec<String> = known
            .into_iter()
            .filter(|id| !live.contains_key(id.as_str()))
            .collect();
        drop(live);
        let mut owners = self.lock();
        for id in dead {
            owners.remove(&id);
        }
    }
}

/// A 403 with a JSON-RPC error body (what an MCP client can show).
fn forbidden_jsonrpc(message: &str) -> Response {
    let body = serde_json::json!({"jsonrpc": "2.0", "id": null,
        "error": {"code": -32600, "message": message}});
    (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
}

async fn bind_session(State(st): State<Arc<SessionOwners>>, req: Request, next: Next) -> Response {
    let identity = identity_of(req.extensions());
    let sid = req
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let delete = req.method() == Method::DELETE;
    if let Some(sid) = &sid {
        let owner = st.lock().get(sid).cloned();
        if owner.is_some_and(|o| o != identity) {
            tracing::warn!(session = %sid, "MCP: request on another caller's session refused");
            return forbidden_jsonrpc("Forbidden: this MCP session belongs to another caller");
        }
    }
    let resp = next.run(req).await;
    match sid {
        None => {
            let created = resp
                .headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if let Some(new) = created {
                let n = {
                    let mut owners = st.lock();
                    owners.insert(new, identity);
                    owners.len()
                };
                if n >= SESSION_OWNERS_PRUNE_AT && n % 64 == 0 {
                    st.prune().await;
                }
            }
        }
        Some(sid) if delete && resp.status().is_success() => {
            st.lock().remove(&sid);
            // rmcp answers a session DELETE with 202, which the transport spec does not list
            // and the official Python SDK logs as "Session termination failed: 202" on every
            // close; the session is gone, so say so with 204 No Content.
            if resp.status() == StatusCode::ACCEPTED {
                return StatusCode::NO_CONTENT.into_response();
            }
        }
        Some(_) => {}
    }
    resp
}

// ---------------------------------------------------------------------------------------
// Host / Origin checks of the legacy SSE transport (same rules as rmcp's for /mcp).

fn host_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let host = host.trim().to_ascii_lowercase();
    // Split an optional port, minding bracketed IPv6 literals.
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("").to_string()
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h.to_string(),
            _ => host.clone(),
        }
    };
    allowed.iter().any(|a| {
        let a = a.trim().to_ascii_lowercase();
        let a_bare = a.trim_start_matches('[').trim_end_matches(']');
        a_bare == name || a == host
    })
}

fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim().to_ascii_lowercase();
    allowed.iter().any(|a| {
        let a = a.trim().to_ascii_lowercase();
        match a.strip_suffix(":*") {
            Some(prefix) => {
                origin == prefix
                    || origin
                        .strip_prefix(prefix)
                        .and_then(|rest| rest.strip_prefix(':'))
                        .is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
            }
            None => origin == a,
        }
    })
}

/// The refusal for a request failing the Host or Origin check, if it does.
fn check_headers(headers: &HeaderMap, opts: &HttpOptions) -> Option<Response> {
    if !host_allowed(headers, &opts.allowed_hosts) {
        tracing::warn!(host = ?headers.get(header::HOST), "MCP SSE: Host not allowed (possible DNS rebinding)");
        return Some(
            (
                StatusCode::FORBIDDEN,
                "Forbidden: Host header is not allowed",
            )
                .into_response(),
        );
    }
    if !origin_allowed(headers, &opts.allowed_origins) {
        tracing::warn!(origin = ?headers.get(header::ORIGIN), "MCP SSE: Origin not allowed");
        return Some(
            (
                StatusCode::FORBIDDEN,
                "Forbidden: Origin header is not allowed",
            )
                .into_response(),
        );
    }
    None
}

// ---------------------------------------------------------------------------------------
// Legacy HTTP+SSE transport.

struct SseSession {
    inbound: mpsc::Sender<ClientJsonRpcMessage>,
    /// Who opened the stream; every POST to the session must come from the same caller.
    identity: Option<String>,
}

struct SseState {
    mcp: FlotillaMcp,
    opts: HttpOptions,
    sessions: Mutex<HashMap<String, SseSession>>,
}

fn identity_of(req_ext: &axum::http::Extensions) -> Option<String> {
    req_ext.get::<BackendHandle>().map(|h| h.0.identity())
}

/// Removes the session when its SSE stream ends, however it ends.
struct SessionGuard {
    state: Arc<SseState>,
    id: String,
    ct: CancellationToken,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.ct.cancel();
        if let Ok(mut s) = self.state.sessions.lock() {
            s.remove(&self.id);
        }
        tracing::debug!(session = %self.id, "MCP SSE session closed");
    }
}

/// `GET /sse`: opens a session; the first event names the endpoint to POST messages to.
async fn sse_open(State(st): State<Arc<SseState>>, req: Request) -> Response {
    if let Some(r) = check_headers(req.headers(), &st.opts) {
        return r;
    }
    let identity = identity_of(req.extensions());
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (in_tx, mut in_rx) = mpsc::channel::<ClientJsonRpcMessage>(SSE_CHANNEL);
    let (out_tx, out_rx) = mpsc::channel::<ServerJsonRpcMessage>(SSE_CHANNEL);
    {
        let mut sessions = st.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions.len() >= MAX_SSE_SESSIONS {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many MCP SSE sessions open; retry later",
            )
                .into_response();
        }
        let mine = sessions.values().filter(|s| s.identity == identity).count();
        if mine >= MAX_SSE_SESSIONS_PER_CALLER {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "this caller already has {mine} MCP SSE sessions open; close one (end its \
                     event stream) first"
                ),
            )
                .into_response();
        }
        sessions.insert(
            id.clone(),
            SseSession {
                inbound: in_tx,
                identity,
            },
        );
    }
    let ct = st.opts.shutdown.child_token();
    let inbound = Box::pin(stream::poll_fn(move |cx| in_rx.poll_recv(cx)));
    let sink = PollSender::new(out_tx);
    let mcp = st.mcp.clone();
    let session_ct = ct.clone();
    let sid = id.clone();
    tokio::spawn(async move {
        match mcp.serve_with_ct((sink, inbound), session_ct).await {
            Ok(running) => {
                let _ = running.waiting().await;
            }
            Err(e) => {
                tracing::debug!(session = %sid, error = %e, "MCP SSE session ended before initialisation")
            }
        }
    });
    tracing::debug!(session = %id, "MCP SSE session opened");
    let guard = SessionGuard {
        state: st.clone(),
        id: id.clone(),
        ct: ct.clone(),
    };
    let endpoint = stream::once(async move {
        Ok::<_, Infallible>(
            Event::default()
                .event("endpoint")
                .data(format!("/messages?sessionId={id}")),
        )
    });
    let messages = stream::unfold((out_rx, guard), |(mut rx, guard)| async move {
        let msg = tokio::select! {
            m = rx.recv() => m,
            _ = guard.ct.cancelled() => None,
        }?;
        let data = serde_json::to_string(&msg).unwrap_or_default();
        Some((
            Ok(Event::default().event("message").data(data)),
            (rx, guard),
        ))
    });
    let body: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(endpoint.chain(messages));
    Sse::new(body)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[derive(Deserialize)]
struct SessionQuery {
    #[serde(rename = "sessionId", alias = "session_id")]
    session_id: String,
}

/// `POST /messages?sessionId=`: one JSON-RPC message for an open session; 202, the answer
/// goes out on the session's SSE stream.
async fn sse_message(
    State(st): State<Arc<SseState>>,
    Query(q): Query<SessionQuery>,
    req: Request,
) -> Response {
    if let Some(r) = check_headers(req.headers(), &st.opts) {
        return r;
    }
    let (parts, body) = req.into_parts();
    let (inbound, owner) = {
        let sessions = st.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match sessions.get(&q.session_id) {
            Some(s) => (s.inbound.clone(), s.identity.clone()),
            None => {
                return (StatusCode::NOT_FOUND, "Not Found: no such MCP SSE session")
                    .into_response()
            }
        }
    };
    if identity_of(&parts.extensions) != owner {
        tracing::warn!(session = %q.session_id, "MCP SSE: message from another caller refused");
        return (
            StatusCode::FORBIDDEN,
            "Forbidden: this session belongs to another caller",
        )
            .into_response();
    }
    let bytes: Bytes = match axum::body::to_bytes(body, MAX_MESSAGE_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                "message too large or unreadable",
            )
                .into_response()
        }
    };
    let mut msg: ClientJsonRpcMessage = match serde_json::from_slice(&bytes) {
        Ok(m) => m,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("Bad Request: not a JSON-RPC message: {e}"),
            )
                .into_response()
        }
    };
    // The handler finds the caller's backend in the request parts, as on /mcp.
    match &mut msg {
        ClientJsonRpcMessage::Request(r) => {
            r.request.extensions_mut().insert(parts);
        }
        ClientJsonRpcMessage::Notification(n) => {
            n.notification.extensions_mut().insert(parts);
        }
        _ => {}
    }
    match inbound.send(msg).await {
        Ok(()) => (StatusCode::ACCEPTED, "Accepted").into_response(),
        Err(_) => (StatusCode::GONE, "Gone: the MCP SSE session has closed").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn h(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            m.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        m
    }

    #[test]
    fn hosts_and_origins() {
        let allowed: Vec<String> = DEFAULT_ALLOWED_HOSTS
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(host_allowed(&h("127.0.0.1:8080", None), &allowed));
        assert!(host_allowed(&h("localhost", None), &allowed));
        assert!(host_allowed(&h("[::1]:8080", None), &allowed));
        assert!(!host_allowed(&h("evil.example:8080", None), &allowed));
        assert!(!host_allowed(&HeaderMap::new(), &allowed));
        assert!(host_allowed(
            &h("flotilla.internal:8080", None),
            &["flotilla.internal:8080".into()]
        ));
        assert!(!host_allowed(
            &h("flotilla.internal:9", None),
            &["flotilla.internal:8080".into()]
        ));
        assert!(host_allowed(&h("anything", None), &[]));

        assert!(origin_allowed(&h("x", None), &[]));
        assert!(!origin_allowed(&h("x", Some("http://evil.example")), &[]));
        let o = vec![
            "http://localhost:*".to_string(),
            "https://console.example".to_string(),
        ];
        assert!(origin_allowed(&h("x", Some("http://localhost:5173")), &o));
        assert!(origin_allowed(&h("x", Some("https://console.example")), &o));
        assert!(!origin_allowed(
            &h("x", Some("http://localhost.evil:1")),
            &o
        ));
        assert!(!origin_allowed(
            &h("x", Some("https://console.example:444")),
            &o
        ));
    }
}
