//! The MCP server inside the Flotilla process: [`McpBackend`] implements
//! [`flotilla_mcp::FleetBackend`] over the [`Fleet`] service for one authenticated caller
//! (channel `mcp`), and [`routes`] mounts the MCP transports (`/mcp`, `/sse`, `/messages`) on
//! the operator listener behind the same bearer tokens as the REST API.
//!
//! Answers are shaped exactly like the REST API's (the backend contract): both adapters render
//! with [`crate::views`] and parse paging, kinds and times with it; `server/tests/it/mcp.rs`
//! also compares both channels' JSON for the same records.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use flotilla_mcp::{
    AuditFilter as McpAuditFilter, BackendError, BackendHandle, BackendResult, CommandsFilter,
    ConfirmStore, ExpectedTargets as McpExpected, FleetBackend, FlotillaMcp, HttpOptions,
    QueueTarget,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::model::{
    now_ms, AuditFilter, Caller, Channel, CommandFilter, CommandKind, CommandStatus, Millis,
};
use crate::rest::auth::Tokens;
use crate::service::{agent_view, ExpectedTargets, Fleet, FleetError, Queued, Target};
use crate::views;

/// How many of an agent's latest commands its view embeds (as `GET /api/v1/agents/{uid}`).
const RECENT_COMMANDS: usize = 10;

/// The fleet as one authenticated caller sees it through MCP.
pub struct McpBackend {
    fleet: Fleet,
    caller: Caller,
}

impl McpBackend {
    /// `caller` is re-channelled to `mcp`, so every command and audit record says where it
    /// came from whatever built the caller.
    pub fn new(fleet: Fleet, mut caller: Caller) -> McpBackend {
        caller.channel = Channel::Mcp;
        McpBackend { fleet, caller }
    }

    /// The same tools for a chat gateway's user: the caller keeps its chat channel (`slack`,
    /// `discord`, `teams`), so the audit trail says where the request came from.
    pub fn for_chat(fleet: Fleet, caller: Caller) -> McpBackend {
        McpBackend { fleet, caller }
    }
}

fn err(e: FleetError) -> BackendError {
    match &e {
        FleetError::Store(inner) => {
            // The detail (paths, SQL) is for the server log, not for MCP clients.
            tracing::error!(error = %inner, "store failed while serving an MCP request");
            BackendError::new(
                "storage_unavailable",
                "storage unavailable; try again later",
            )
        }
        _ => BackendError::new(e.code(), e.to_string()),
    }
}

fn bad(message: impl Into<String>) -> BackendError {
    BackendError::new("bad_request", message)
}

fn uuid(what: &str, s: &str) -> BackendResult<Uuid> {
    Uuid::parse_str(s.trim()).map_err(|_| bad(format!("{what} {s:?} is not a UUID")))
}

fn nonempty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn page_limit(limit: Option<usize>) -> BackendResult<usize> {
    views::page_limit(limit).map_err(bad)
}

use crate::views::fetch_size;

fn parse_kind(s: &str) -> BackendResult<CommandKind> {
    views::parse_kind(s, "commands_catalog").map_err(|m| BackendError::new("invalid_params", m))
}

fn parse_time(name: &str, s: &str) -> BackendResult<Millis> {
    views::parse_time(name, s).map_err(bad)
}

fn service_target(target: &QueueTarget) -> BackendResult<Target> {
    Ok(match target {
        QueueTarget::Agent(a) => Target::Agent(uuid("agent", a)?),
        QueueTarget::Query(q) => Target::Query(q.clone()),
    })
}

#[async_trait]
impl FleetBackend for McpBackend {
    fn identity(&self) -> String {
        format!("mcp:{}:{}", self.caller.actor, self.caller.role)
    }

    async fn search(
        &self,
        q: &str,
        limit: Option<usize>,
        cursor: Option<&str>,
        total: bool,
    ) -> BackendResult<Value> {
        let page = self
            .fleet
            .search(&self.caller, q, limit, cursor, total)
            .await
            .map_err(err)?;
        Ok(json!(page))
    }

    async fn resolve_agent(&self, reference: &str) -> BackendResult<String> {
        self.fleet
            .resolve_agent(&self.caller, reference)
            .await
            .map(|u| u.to_string())
            .map_err(err)
    }

    async fn agent(&self, uid: &str) -> BackendResult<Value> {
        let uid = uuid("agent uid", uid)?;
        let agent = self.fleet.get_agent(&self.caller, uid).await.map_err(err)?;
        let recent = self
            .fleet
            .commands(
                &self.caller,
                &CommandFilter {
                    agent: Some(uid),
                    limit: RECENT_COMMANDS,
                    ..Default::default()
                },
            )
            .await
            .map_err(err)?;
        let mut v = agent_view(&agent, now_ms());
        v["recent_commands"] = Value::Array(recent.iter().map(views::command).collect());
        Ok(v)
    }

    async fn summary(&self) -> BackendResult<Value> {
        self.fleet.summary(&self.caller).await.map_err(err)
    }

    async fn catalog(&self) -> BackendResult<Value> {
        Ok(json!({"kinds": self.fleet.catalog(&self.caller).await.map_err(err)?}))
    }

    async fn plan(&self, target: &QueueTarget, kind: &str, params: &Value) -> BackendResult<Value> {
        let kind = parse_kind(kind)?;
        let plan = self
            .fleet
            .plan(&self.caller, service_target(target)?, kind, params)
            .await
            .map_err(err)?;
        Ok(views::plan(&plan))
    }

    async fn queue(
        &self,
        target: &QueueTarget,
        kind: &str,
        params: &Value,
        expect: Option<&McpExpected>,
    ) -> BackendResult<Value> {
        let kind = parse_kind(kind)?;
        let target = service_target(target)?;
        let expect = expect.map(|e| ExpectedTargets {
            count: e.count,
            digest: e.digest.clone(),
        });
        Ok(
            match self
                .fleet
                .queue_expecting(&self.caller, target, kind, params, expect.as_ref())
                .await
                .map_err(err)?
            {
                Queued::One(c) => json!({"command_id": c.id, "command": views::command(&c)}),
                Queued::Batch(b, cmds) => {
                    let commands: Vec<Value> = cmds
                        .iter()
                        .map(|c| json!({"agent_uid": c.agent_uid, "command_id": c.id}))
                        .collect();
                    json!({"batch_id": b.id, "queued": cmds.len(), "skipped": b.skipped,
                           "commands": commands})
                }
            },
        )
    }

    async fn command(&self, id: &str) -> BackendResult<Value> {
        let id = uuid("command id", id)?;
        let c = self.fleet.command(&self.caller, id).await.map_err(err)?;
        Ok(views::command(&c))
    }

    async fn batch(&self, id: &str) -> BackendResult<Value> {
        let id = uuid("batch id", id)?;
        let p = self.fleet.batch(&self.caller, id).await.map_err(err)?;
        Ok(views::batch_progress(&p))
    }

    async fn commands(&self, f: &CommandsFilter) -> BackendResult<Value> {
        let limit = page_limit(f.limit)?;
        let status = match nonempty(&f.status) {
            None => None,
            Some(s) => Some(CommandStatus::parse(s).ok_or_else(|| {
                let all: Vec<&str> = CommandStatus::ALL.iter().map(|s| s.as_str()).collect();
                bad(format!("status {s:?} is not one of {}", all.join(", ")))
            })?),
        };
        let kind = match nonempty(&f.kind) {
            None => None,
            Some(k) => Some(CommandKind::parse(k).ok_or_else(|| {
                let all: Vec<&str> = CommandKind::ALL.iter().map(|k| k.as_str()).collect();
                bad(format!("kind {k:?} is not one of {}", all.join(", ")))
            })?),
        };
        let filter = CommandFilter {
            agent: nonempty(&f.agent).map(|a| uuid("agent", a)).transpose()?,
            status,
            batch: nonempty(&f.batch).map(|b| uuid("batch", b)).transpose()?,
            kind,
            before: nonempty(&f.cursor).map(|c| uuid("cursor", c)).transpose()?,
            limit: fetch_size(limit),
        };
        let items = self
            .fleet
            .commands(&self.caller, &filter)
            .await
            .map_err(err)?;
        Ok(views::page(
            items,
            limit,
            |x| x.id.to_string(),
            views::command,
        ))
    }

    async fn audit(&self, f: &McpAuditFilter) -> BackendResult<Value> {
        let limit = page_limit(f.limit)?;
        let channel = match nonempty(&f.channel) {
            None => None,
            Some(c) => Some(Channel::parse(c).ok_or_else(|| {
                bad(format!(
                    "channel {c:?} is not one of rest, mcp, slack, discord, teams, console, cli, system"
                ))
            })?),
        };
        let since = nonempty(&f.since)
            .map(|s| parse_time("since", s))
            .transpose()?;
        let until = nonempty(&f.until)
            .map(|s| parse_time("until", s))
            .transpose()?;
        if let (Some(a), Some(b)) = (since, until) {
            if a > b {
                return Err(bad("since is after until"));
            }
        }
        let before_id = match nonempty(&f.cursor) {
            None => None,
            Some(c) => Some(
                c.parse::<i64>()
                    .map_err(|_| bad(format!("cursor {c:?} is not valid")))?,
            ),
        };
        let filter = AuditFilter {
            actor: nonempty(&f.actor).map(str::to_string),
            channel,
            agent: nonempty(&f.agent)
                .map(|a| uuid("agent", a).map(|u| u.to_string()))
                .transpose()?,
            operation: nonempty(&f.operation).map(str::to_string),
            since,
            until,
            before_id,
            limit: fetch_size(limit),
        };
        let items = self.fleet.audit(&self.caller, &filter).await.map_err(err)?;
        Ok(views::page(
            items,
            limit,
            |x| x.id.to_string(),
            views::audit,
        ))
    }

    async fn cancel(&self, id: &str) -> BackendResult<Value> {
        let id = uuid("command id", id)?;
        let c = self.fleet.cancel(&self.caller, id).await.map_err(err)?;
        Ok(views::command(&c))
    }
}

struct AuthState {
    fleet: Fleet,
    tokens: Option<Tokens>,
}

/// Requires `Authorization: Bearer <token>` (the REST API's tokens) and puts the caller's
/// backend in the request, so every MCP message runs as the caller who sent it.
async fn authenticate(State(st): State<Arc<AuthState>>, mut req: Request, next: Next) -> Response {
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "unknown".into());
    let deny = |reason: &str, invalid: bool| {
        tracing::warn!(%remote, reason, "MCP authentication failed");
        unauthorized(reason, invalid)
    };
    let Some(tokens) = st.tokens.as_ref() else {
        return deny("API tokens could not be loaded (see the server log)", false);
    };
    let caller = match tokens.caller_from_headers(req.headers()) {
        Ok(c) => c,
        Err(e) => return deny(e.reason, e.invalid_token),
    };
    let backend = McpBackend::new(st.fleet.clone(), caller);
    req.extensions_mut()
        .insert(BackendHandle(Arc::new(backend)));
    next.run(req).await
}

/// The 401 of the MCP routes. MCP clients read the body as a JSON-RPC error (the official
/// SDKs show its message; a REST-shaped body left them with "Server returned an error
/// response"), and the challenge names no `resource_metadata`: Flotilla takes its own API
/// tokens and is not an OAuth resource server, so there is no authorization server to
/// discover (see [`oauth_discovery_routes`]).
fn unauthorized(reason: &str, invalid_token: bool) -> Response {
    let challenge = if invalid_token {
        // RFC 6750: error_description is a quoted string; reasons are fixed ASCII phrases.
        format!(r#"Bearer realm="flotilla", error="invalid_token", error_description="{reason}""#)
    } else {
        r#"Bearer realm="flotilla""#.to_string()
    };
    let body = json!({"jsonrpc": "2.0", "id": null, "error": {
        "code": UNAUTHORIZED_JSONRPC_CODE,
        "message": format!("Unauthorized: {reason}. {TOKEN_HINT}"),
    }});
    let mut resp = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// JSON-RPC has no standard code for "not authenticated"; -32001 is the one MCP servers use.
const UNAUTHORIZED_JSONRPC_CODE: i64 = -32001;

const TOKEN_HINT: &str = "Send Authorization: Bearer <token> with an API token of this \
    Flotilla server (a line of its api.tokens_file, or <data_dir>/admin.token); it does not \
    offer OAuth";

/// OAuth discovery and registration, answered for what they are: OAuth-capable MCP clients
/// (the MCP Inspector, SDK clients given an OAuth provider) react to any 401 by looking for
/// protected-resource and authorization-server metadata at these well-known paths and then
/// registering at `/register`. Each answers 404 with an OAuth-shaped error whose description
/// says to use an API token, so such a client ends with that sentence rather than a
/// half-started OAuth flow or an unparseable error.
fn oauth_discovery_routes() -> Router {
    async fn not_offered(method: Method, uri: Uri) -> Response {
        tracing::info!(%method, path = %uri.path(),
            "OAuth discovery refused: this server takes API tokens, not OAuth");
        let body = json!({
            "error": "oauth_not_supported",
            "error_description": format!(
                "This Flotilla server is not an OAuth resource server. {TOKEN_HINT}."
            ),
        });
        (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
    }
    let mut r = Router::new().route("/register", any(not_offered));
    for doc in [
        "oauth-protected-resource",
        "oauth-authorization-server",
        "openid-configuration",
    ] {
        r = r
            .route(&format!("/.well-known/{doc}"), any(not_offered))
            .route(&format!("/.well-known/{doc}/{{*rest}}"), any(not_offered));
    }
    r
}

/// The MCP routes for the operator listener (empty when `mcp.enabled` is false).
/// `shutdown` ends open streams and sessions so the listener can drain at shutdown.
pub fn routes(fleet: Fleet, cfg: &Config, shutdown: CancellationToken) -> Router {
    if !cfg.mcp.enabled {
        return Router::new();
    }
    let tokens = match Tokens::load(&cfg.api, &cfg.data_dir) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(error = %e, "API tokens could not be loaded; every MCP request will be refused");
            None
        }
    };
    let mcp = FlotillaMcp::new(None, cfg.mcp.read_only, Arc::new(ConfirmStore::default()));
    let opts = HttpOptions {
        allowed_hosts: cfg.mcp.allowed_hosts.clone(),
        allowed_origins: cfg.mcp.allowed_origins.clone(),
        shutdown,
    };
    tracing::info!(
        read_only = cfg.mcp.read_only,
        "MCP served on the operator listener at /mcp (streamable HTTP) and /sse (legacy)"
    );
    flotilla_mcp::router(mcp, opts)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(AuthState { fleet, tokens }),
            authenticate,
        ))
        .merge(oauth_discovery_routes())
}
