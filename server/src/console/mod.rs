//! The web console: server-rendered HTML on the operator listener (`/` and `/ui/...`).
//!
//! A thin adapter over [`Fleet`] like REST and MCP: it authenticates (an API token exchanged
//! once for a session cookie), builds a [`Caller`] with channel `console`, calls one service
//! method and renders the answer with maud. It never touches the store, so roles and audit
//! apply exactly as for the REST API. Every state change is a form POST carrying the session's
//! CSRF token; every response carries a CSP without `unsafe-inline` and `frame-ancestors
//! 'none'`. The stylesheet and the one small script are embedded in the binary
//! (`console/assets/`); the pages work without the script, which adds search-as-you-type and
//! live updates over Server-Sent Events (`live.rs`).

mod agent;
mod audit;
mod commands;
mod config;
mod fleet;
mod highlight;
mod layout;
mod live;
pub mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};

use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use maud::{html, Markup};
use serde::Deserialize;

use crate::config::{ApiConfig, ConsoleConfig};
use crate::model::{now_ms, Caller, Channel, Role};
use crate::rest::auth::Tokens;
use crate::service::{Fleet, FleetError};
use session::{Session, Sessions};

/// Everything the console needs from the server.
pub struct ConsoleContext {
    pub fleet: Fleet,
    pub api: ApiConfig,
    pub console: ConsoleConfig,
    pub data_dir: PathBuf,
    /// The operator listener speaks TLS (cookies are then always `Secure`).
    pub tls: bool,
}

/// State shared by the console's handlers.
pub struct ConsoleState {
    fleet: Fleet,
    /// `None` when the tokens could not be loaded: nobody can log in.
    tokens: Option<Tokens>,
    sessions: Sessions,
    /// The last audit-chain verification, reused while the trail's head is unchanged.
    audit_check: Mutex<Option<audit::Check>>,
}

type S = Arc<ConsoleState>;

/// Content-Security-Policy of every console response: nothing inline, nothing from elsewhere,
/// never framed.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; \
    frame-ancestors 'none'";

static CSS: &str = include_str!("assets/console.css");
static JS: &str = include_str!("assets/console.js");

/// Short content hashes that version the asset URLs, so they can be cached for a year.
static ASSET_VERSION: LazyLock<String> = LazyLock::new(|| {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(CSS);
    h.update(JS);
    hex::encode(&h.finalize()[..6])
});

pub fn css_url() -> String {
    format!("/ui/assets/console.css?v={}", *ASSET_VERSION)
}
pub fn js_url() -> String {
    format!("/ui/assets/console.js?v={}", *ASSET_VERSION)
}

impl ConsoleState {
    /// Builds the state: loads the API tokens (the same file as REST) and the session table.
    pub fn new(ctx: &ConsoleContext) -> ConsoleState {
        let tokens = match Tokens::load(&ctx.api, &ctx.data_dir) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "API tokens could not be loaded; nobody can log in to the console");
                None
            }
        };
        ConsoleState {
            fleet: ctx.fleet.clone(),
            tokens,
            sessions: Sessions::new(
                ctx.console.session_ttl_s,
                ctx.tls || ctx.console.secure_cookie,
            ),
            audit_check: Mutex::new(None),
        }
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }
}

/// The console's routes, or an empty router when `console.enabled` is false.
pub fn router(ctx: &ConsoleContext) -> Router {
    if !ctx.console.enabled {
        tracing::info!("web console disabled (console.enabled = false)");
        return Router::new();
    }
    build(Arc::new(ConsoleState::new(ctx)), ctx.api.max_body_bytes)
}

/// The routes over a given state (tests build the state themselves).
pub fn build(st: S, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/ui", get(home))
        .route("/ui/", get(home))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/assets/console.css", get(css))
        .route("/ui/assets/console.js", get(js))
        .route("/ui/fleet", get(fleet::page))
        .route("/ui/agents/{uid}", get(agent::page))
        .route("/ui/agents/{uid}/labels", post(agent::set_label))
        .route("/ui/agents/{uid}/labels/delete", post(agent::delete_label))
        .route("/ui/commands", get(commands::page))
        .route("/ui/commands/preview", post(commands::preview))
        .route("/ui/commands/queue", post(commands::queue))
        .route("/ui/commands/{id}", get(commands::command_page))
        .route("/ui/commands/{id}/cancel", post(commands::cancel))
        .route("/ui/batches/{id}", get(commands::batch_page))
        .route("/ui/config", get(config::page))
        .route("/ui/config/preview", post(config::preview))
        .route("/ui/config/push", post(config::push))
        .route("/ui/audit", get(audit::page))
        .route("/ui/approvals", get(approvals))
        .route("/ui/events", get(live::events))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn(security_headers))
        .with_state(st)
}

/// Adds the security headers to every console response.
async fn security_headers(req: Request, next: Next) -> Response {
    let is_asset = req.uri().path().starts_with("/ui/assets/");
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(), microphone=(), geolocation=()"),
    );
    if !is_asset && !h.contains_key(header::CACHE_CONTROL) {
        // Pages show fleet state and carry CSRF tokens: never from a shared or back cache.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

fn asset(ct: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, ct),
            // The URL carries the content hash.
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        body,
    )
        .into_response()
}

// ---- the signed-in operator ----

/// The signed-in operator of a request. Without a live session, pages redirect to the login
/// form and background requests (live updates, fragments) get 401.
pub struct Op {
    pub session: Session,
}

impl Op {
    pub fn caller(&self) -> &Caller {
        &self.session.caller
    }
    /// May queue commands, change labels and configs.
    pub fn can_change(&self) -> bool {
        self.session.caller.role >= Role::Operator
    }
}

/// Whether a request comes from the console's script rather than a page load.
fn is_background(parts: &Parts) -> bool {
    parts.headers.contains_key("x-flotilla-live")
        || parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/event-stream"))
}

impl FromRequestParts<S> for Op {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, Response> {
        if let Some(session) = st.sessions.lookup(&parts.headers, now_ms()) {
            return Ok(Op { session });
        }
        if is_background(parts) {
            return Err((StatusCode::UNAUTHORIZED, "session expired; log in again").into_response());
        }
        let next = local_path(parts.uri.path_and_query().map(|p| p.as_str()));
        let to = format!("/ui/login?next={}", urlencode(&next));
        let mut resp = Redirect::to(&to).into_response();
        // A browser holding an expired cookie drops it.
        if session::cookie(&parts.headers, st.sessions.cookie_name()).is_some() {
            resp.headers_mut()
                .insert(header::SET_COOKIE, st.sessions.clear_cookie());
        }
        Err(resp)
    }
}

/// A path inside the console to return to, or the fleet page: never another site.
pub fn local_path(p: Option<&str>) -> String {
    match p {
        Some(p) if p.starts_with("/ui/") && !p.starts_with("//") && !p.contains('\\') => {
            p.to_string()
        }
        _ => "/ui/fleet".to_string(),
    }
}

/// Percent-encodes a query-string value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Refuses a state-changing form whose CSRF token or origin is wrong: `Some(403 page)`, logged.
pub fn csrf(op: &Op, sent: Option<&str>, headers: &HeaderMap, what: &str) -> Option<Response> {
    let why = session::check_csrf(&op.session, sent, headers).err()?;
    tracing::warn!(actor = %op.caller().actor, what, reason = %why, "console request refused (CSRF)");
    Some(error_page(
        Some(op),
        StatusCode::FORBIDDEN,
        "Refused",
        &format!("{why}. Nothing was changed: reload the page and try again."),
    ))
}

/// A page saying what went wrong, with the status of the service's error code.
pub fn fleet_error(op: &Op, e: &FleetError) -> Response {
    let status = crate::rest::errors::status_of(e.code());
    if status.is_server_error() {
        tracing::warn!(error = %e, "console request failed");
    }
    let title = match status {
        StatusCode::FORBIDDEN => "Not allowed",
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::CONFLICT => "Conflict",
        s if s.is_server_error() => "Unavailable",
        _ => "Cannot do that",
    };
    error_page(Some(op), status, title, &e.to_string())
}

pub fn error_page(op: Option<&Op>, status: StatusCode, title: &str, message: &str) -> Response {
    let body = html! {
        h1 { (title) }
        p.error role="alert" { (message) }
        p { a href="/ui/fleet" { "Back to the fleet" } }
    };
    (status, layout::page(title, layout::Nav::None, op, body)).into_response()
}

// ---- pages outside the fleet ----

async fn home() -> Redirect {
    Redirect::to("/ui/fleet")
}

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

async fn login_form(
    State(st): State<S>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<NextQuery>,
) -> Response {
    if st.sessions.lookup(&headers, now_ms()).is_some() {
        return Redirect::to(&local_path(q.next.as_deref())).into_response();
    }
    login_page(&st, StatusCode::OK, q.next.as_deref(), None)
}

fn login_page(
    st: &ConsoleState,
    status: StatusCode,
    next: Option<&str>,
    error: Option<&str>,
) -> Response {
    let nonce = session::random_token();
    let next = local_path(next);
    let body = html! {
        div.login {
            h1 { "Flotilla" }
            p.muted { "Sign in with an API token (the same tokens as the REST API)." }
            @if let Some(e) = error {
                p.error #login-error role="alert" { (e) }
            }
            form method="post" action="/ui/login" {
                input type="hidden" name="login_csrf" value=(nonce);
                input type="hidden" name="next" value=(next);
                label for="token" { "API token" }
                input #token type="password" name="token" autocomplete="current-password"
                    required autofocus aria-describedby=[error.map(|_| "login-error")];
                button type="submit" { "Sign in" }
            }
        }
    };
    let mut resp = (
        status,
        layout::page("Sign in", layout::Nav::None, None, body),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, st.sessions.login_cookie(&nonce));
    resp
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    login_csrf: Option<String>,
    next: Option<String>,
}

async fn login(
    State(st): State<S>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let cookie = session::cookie(&headers, st.sessions.login_cookie_name());
    let csrf_ok = match (cookie, f.login_csrf.as_deref()) {
        (Some(c), Some(s)) => session::same(c, s),
        _ => false,
    };
    if let Err(why) = session::check_origin(&headers).and_then(|_| {
        if csrf_ok {
            Ok(())
        } else {
            Err("the login form expired or came from elsewhere".to_string())
        }
    }) {
        tracing::warn!(%remote, reason = %why, "console login refused (CSRF)");
        return login_page(
            &st,
            StatusCode::FORBIDDEN,
            f.next.as_deref(),
            Some("This sign-in form expired or did not come from this console; try again."),
        );
    }
    let Some(tokens) = st.tokens.as_ref() else {
        return login_page(
            &st,
            StatusCode::SERVICE_UNAVAILABLE,
            f.next.as_deref(),
            Some("The server could not load its API tokens (see its log); nobody can sign in."),
        );
    };
    let Some(caller) = tokens.authenticate(f.token.trim()) else {
        tracing::warn!(%remote, reason = "unknown token", "console login failed");
        return login_page(
            &st,
            StatusCode::UNAUTHORIZED,
            f.next.as_deref(),
            Some("That token is not valid."),
        );
    };
    let caller = Caller {
        channel: Channel::Console,
        ..caller
    };
    tracing::info!(%remote, actor = %caller.actor, role = %caller.role, "console login");
    let (id, _) = st.sessions.create(caller);
    let mut resp = Redirect::to(&local_path(f.next.as_deref())).into_response();
    let h = resp.headers_mut();
    h.append(header::SET_COOKIE, st.sessions.set_cookie(&id));
    h.append(header::SET_COOKIE, st.sessions.clear_login_cookie());
    resp
}

#[derive(Deserialize)]
struct CsrfOnly {
    csrf: Option<String>,
}

async fn logout(
    State(st): State<S>,
    op: Op,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Response {
    if let Some(r) = csrf(&op, f.csrf.as_deref(), &headers, "logout") {
        return r;
    }
    st.sessions.remove(&headers);
    tracing::info!(actor = %op.caller().actor, "console logout");
    let mut resp = Redirect::to("/ui/login").into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, st.sessions.clear_cookie());
    resp
}

/// Pending approvals. The service does not hold any kind of pending approval yet (agent
/// approval and two-person approval arrive with the guard-rails work); this page is where
/// they plug in: list them through the service and approve/reject with CSRF-checked forms.
async fn approvals(op: Op) -> Response {
    let body = html! {
        h1 { "Approvals" }
        section aria-labelledby="appr-h" {
            h2 #appr-h { "Pending" }
            p.muted {
                "Nothing waits for approval: this server has no approval policy. Pending agents "
                "and two-person requests appear here when agent approval or the two-person rule "
                "is configured."
            }
        }
    };
    layout::page("Approvals", layout::Nav::Approvals, Some(&op), body).into_response()
}

/// Renders a value as compact, readable JSON for the pages.
pub fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// For handlers that render a page with an inline error: the status of a service error.
pub fn status_of(e: &FleetError) -> StatusCode {
    crate::rest::errors::status_of(e.code())
}

pub(crate) fn markup_response(status: StatusCode, m: Markup) -> Response {
    (status, m).into_response()
}
