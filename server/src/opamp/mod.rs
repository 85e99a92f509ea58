//! The OpAMP endpoint: HTTP and WebSocket transports and the per-agent protocol session.
//!
//! One route at `cfg.path`. Agent authentication (401) comes first; then, as in opamp-go, a
//! `POST` with `Content-Type: application/x-protobuf` exactly is plain HTTP ([`http`]) and
//! anything else is a WebSocket upgrade attempt ([`ws`]). Both feed the same protocol logic
//! ([`session`]); server-wide in-memory state lives in [`shared`].
//! See docs/protocol-conformance.md for the rules and the tests that prove them.

mod auth;
mod http;
mod merge;
mod session;
mod shared;
mod ws;

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, uri::Authority, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::routing::any;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::config::OpampConfig;
use crate::service::Fleet;

pub use session::SERVER_CAPABILITIES;

/// Everything the OpAMP endpoint needs.
pub struct OpampContext {
    pub fleet: Fleet,
    pub cfg: OpampConfig,
    /// Cancelled on graceful shutdown: sessions close their WebSockets with a Close frame.
    pub shutdown: CancellationToken,
    /// Every WebSocket session runs tracked here, so shutdown can wait for their Close frames.
    pub sessions: tokio_util::task::TaskTracker,
    /// Cancelled once both listeners have stopped: the heartbeat flusher writes what is left
    /// and ends, so nothing a session recorded during shutdown is lost.
    pub drain: CancellationToken,
}

/// The agent-facing router (mounted at `cfg.path`), and the task that writes batched
/// heartbeats; the task ends after a last flush once `ctx.drain` is cancelled, so the caller
/// awaits it before closing the store.
pub fn router(ctx: Arc<OpampContext>) -> (Router, tokio::task::JoinHandle<()>) {
    let path = ctx.cfg.path.clone();
    let sh = Arc::new(shared::Shared::new(ctx));
    let flusher = tokio::spawn(shared::flusher(sh.clone()));
    {
        // Summaries of suppressed malformed-message lines; a last one once both listeners
        // have stopped.
        let sh = sh.clone();
        tokio::spawn(async move {
            let stop = sh.ctx.drain.clone();
            tokio::join!(
                sh.malformed_log
                    .report("malformed OpAMP messages", stop.clone()),
                sh.refusal_log.report(
                    "refused agents: client certificate not the pinned one",
                    stop
                ),
            );
        });
    }
    (
        Router::new().route(&path, any(entry)).with_state(sh),
        flusher,
    )
}

async fn entry(State(sh): State<Arc<shared::Shared>>, req: Request) -> Response {
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let cert = req
        .extensions()
        .get::<crate::tls::PeerCert>()
        .map(|c| Box::new(c.clone()));
    if let Err(reason) = sh.auth.check(req.headers(), cert.as_deref()) {
        sh.ctx.fleet.metrics().reject("unauthorized");
        // Never log what was presented: a near-miss token is still a secret.
        tracing::warn!(mode = sh.auth.mode.as_str(), remote = ?remote, reason,
            "OpAMP agent authentication failed");
        let mut r = http::text(
            StatusCode::UNAUTHORIZED,
            match sh.auth.mode {
                crate::config::AgentAuthMode::Mtls => {
                    "agent authentication required: present a client certificate from the \
                     server's client CA"
                }
                _ => "agent authentication required: send Authorization: Bearer <token>",
            }
            .into(),
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let plain_http = req.method() == Method::POST
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == http::CONTENT_TYPE.as_bytes());
    let (mut parts, body) = req.into_parts();
    if plain_http {
        let endpoint = endpoint(&parts, &sh.ctx.cfg.path, false);
        return http::serve(sh, parts.headers, body, remote, endpoint, cert).await;
    }
    match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => {
            let endpoint = endpoint(&parts, &sh.ctx.cfg.path, true);
            ws::upgrade(sh, upgrade, remote, endpoint, cert)
        }
        // A POST is plain HTTP with the wrong content type: say that, not why it is no
        // WebSocket upgrade either ("method must be `GET`" read as if POST were wrong).
        Err(_) if parts.method == Method::POST => {
            let got = parts
                .headers
                .get(header::CONTENT_TYPE)
                .map(|v| format!("Content-Type {:?}", String::from_utf8_lossy(v.as_bytes())))
                .unwrap_or_else(|| "no Content-Type".into());
            tracing::warn!(remote = ?remote, content_type = %got,
                           "OpAMP POST refused: not Content-Type application/x-protobuf");
            http::text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "OpAMP over plain HTTP is a POST with Content-Type: {} exactly; this \
                     request had {got}.",
                    http::CONTENT_TYPE
                ),
            )
        }
        Err(rejection) => http::text(
            rejection.status(),
            format!(
                "not an OpAMP request ({}). OpAMP over plain HTTP is a POST with \
                 Content-Type: {} exactly; anything else must be a WebSocket upgrade.",
                rejection.body_text(),
                http::CONTENT_TYPE
            ),
        ),
    }
}

/// The URL the agent used to reach us, offered back as the OpAMP `destination_endpoint` (the
/// spec requires a non-empty one). A TLS-terminating proxy's `X-Forwarded-Proto: https` keeps
/// the agent on TLS. `None` without a usable Host.
fn endpoint(parts: &Parts, path: &str, websocket: bool) -> Option<String> {
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| Authority::from_str(h).ok())
        .or_else(|| parts.uri.authority().cloned())?;
    let tls = parts
        .headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"));
    let scheme = match (websocket, tls) {
        (true, false) => "ws",
        (true, true) => "wss",
        (false, false) => "http",
        (false, true) => "https",
    };
    Some(format!("{scheme}://{host}{path}"))
}
