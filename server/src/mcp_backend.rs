//! The MCP server inside the Flotilla process: [`McpBackend`] implements
//! [`flotilla_mcp::FleetBackend`] over the [`Fleet`] service for one authenticated caller
//! (channel `mcp`), and [`routes`] mounts the MCP transports (`/mcp`, `/sse`, `/messages`) on
//! the operator listener behind the same bearer tokens as the REST API.
//!
//! Answers are shaped exactly like the REST API's (the backend contract). The few REST
//! renderers that live in private modules of `rest` (command, batch and audit views, list
//! paging, time parsing) are mirrored here; `server/tests/it/mcp.rs` compares both channels'
//! JSON for the same records so the copies cannot drift silently.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use flotilla_mcp::{
    AuditFilter as McpAuditFilter, BackendError, BackendHandle, BackendResult, CommandsFilter,
    ConfirmStore, FleetBackend, FlotillaMcp, HttpOptions, QueueTarget,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::model::{
    now_ms, rfc3339, AuditFilter, AuditRecord, Batch, Caller, Channel, Command, CommandFilter,
    CommandKind, CommandStatus, Millis,
};
use crate::rest::auth::Tokens;
use crate::rest::errors::ApiError;
use crate::service::{agent_view, BatchProgress, Fleet, FleetError, Queued, Target};

/// How many of an agent's latest commands its view embeds (as `GET /api/v1/agents/{uid}`).
const RECENT_COMMANDS: usize = 10;
/// Largest and default page of the command and audit listings (as REST).
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

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
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(bad(format!("limit {n} must be between 1 and {MAX_PAGE}"))),
    }
}

/// One more row than the page, to know whether a next page exists (as REST).
fn fetch_size(limit: usize) -> usize {
    if limit < MAX_PAGE {
        limit + 1
    } else {
        limit
    }
}

fn parse_kind(s: &str) -> BackendResult<CommandKind> {
    CommandKind::parse(s).ok_or_else(|| {
        let kinds: Vec<&str> = CommandKind::ALL.iter().map(|k| k.as_str()).collect();
        BackendError::new(
            "invalid_params",
            format!(
                "unknown command kind {s:?} (kinds: {}; see commands_catalog)",
                kinds.join(", ")
            ),
        )
    })
}

/// Unix milliseconds or RFC 3339 (as `GET /api/v1/audit`).
fn parse_time(name: &str, s: &str) -> BackendResult<Millis> {
    use time::format_description::well_known::Rfc3339;
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    time::OffsetDateTime::parse(s, &Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as Millis)
        .map_err(|_| {
            bad(format!(
                "{name} {s:?} is neither RFC 3339 (e.g. 2025-01-31T12:00:00Z) nor unix milliseconds"
            ))
        })
}

// ---- mirrors of the REST views (rest::views is private to the REST module) ----

fn opt_time(ms: Option<i64>) -> Value {
    ms.map(|m| Value::String(rfc3339(m))).unwrap_or(Value::Null)
}

/// `rest::views::command`.
pub fn command_view(c: &Command) -> Value {
    json!({
        "id": c.id,
        "agent_uid": c.agent_uid,
        "batch_id": c.batch_id,
        "kind": c.kind,
        "params": c.params,
        "status": c.status,
        "created_at": rfc3339(c.created_at),
        "sent_at": opt_time(c.sent_at),
        "finished_at": opt_time(c.finished_at),
        "expires_at": rfc3339(c.expires_at),
        "result": c.result,
        "error": c.error,
        "actor": c.actor,
        "channel": c.channel,
        "audit_id": c.audit_id.map(|i| i.to_string()),
    })
}

fn batch_view(b: &Batch) -> Value {
    json!({
        "id": b.id,
        "query": b.query,
        "kind": b.kind,
        "params": b.params,
        "created_at": rfc3339(b.created_at),
        "actor": b.actor,
        "channel": b.channel,
        "skipped": b.skipped,
    })
}

/// `rest::views::batch_progress`.
pub fn batch_progress_view(p: &BatchProgress) -> Value {
    json!({"batch": batch_view(&p.batch), "counts": p.counts, "commands": p.commands})
}

/// `rest::views::audit`.
pub fn audit_view(r: &AuditRecord) -> Value {
    json!({
        "id": r.id.to_string(),
        "ts": rfc3339(r.ts),
        "actor": r.actor,
        "channel": r.channel,
        "operation": r.operation,
        "targets": r.targets,
        "params": r.params,
        "outcome": r.outcome,
        "ref_id": r.ref_id.map(|i| i.to_string()),
        "prev_hash": r.prev_hash,
        "hash": r.hash,
    })
}

#[async_trait]
impl FleetBackend for McpBackend {
    fn identity(&self) -> String {
        format!("mcp:{}:{:?}", self.caller.actor, self.caller.role)
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
        v["recent_commands"] = Value::Array(recent.iter().map(command_view).collect());
        Ok(v)
    }

    async fn summary(&self) -> BackendResult<Value> {
        self.fleet.summary(&self.caller).await.map_err(err)
    }

    async fn catalog(&self) -> BackendResult<Value> {
        Ok(json!({"kinds": self.fleet.catalog(&self.caller).await.map_err(err)?}))
    }

    async fn queue(
        &self,
        target: &QueueTarget,
        kind: &str,
        params: &Value,
    ) -> BackendResult<Value> {
        let kind = parse_kind(kind)?;
        let target = match target {
            QueueTarget::Agent(a) => Target::Agent(uuid("agent", a)?),
            QueueTarget::Query(q) => Target::Query(q.clone()),
        };
        Ok(
            match self
                .fleet
                .queue(&self.caller, target, kind, params)
                .await
                .map_err(err)?
            {
                Queued::One(c) => json!({"command_id": c.id, "command": command_view(&c)}),
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
        Ok(command_view(&c))
    }

    async fn batch(&self, id: &str) -> BackendResult<Value> {
        let id = uuid("batch id", id)?;
        let p = self.fleet.batch(&self.caller, id).await.map_err(err)?;
        Ok(batch_progress_view(&p))
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
        let mut items = self
            .fleet
            .commands(&self.caller, &filter)
            .await
            .map_err(err)?;
        let more = items.len() > limit || (limit == MAX_PAGE && items.len() == limit);
        items.truncate(limit);
        let next_cursor = if more {
            items.last().map(|c| c.id.to_string())
        } else {
            None
        };
        Ok(json!({
            "items": items.iter().map(command_view).collect::<Vec<_>>(),
            "next_cursor": next_cursor,
        }))
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
        let mut items = self.fleet.audit(&self.caller, &filter).await.map_err(err)?;
        let more = items.len() > limit || (limit == MAX_PAGE && items.len() == limit);
        items.truncate(limit);
        let next_cursor = if more {
            items.last().map(|r| r.id.to_string())
        } else {
            None
        };
        Ok(json!({
            "items": items.iter().map(audit_view).collect::<Vec<_>>(),
            "next_cursor": next_cursor,
        }))
    }

    async fn cancel(&self, id: &str) -> BackendResult<Value> {
        let id = uuid("command id", id)?;
        let c = self.fleet.cancel(&self.caller, id).await.map_err(err)?;
        Ok(command_view(&c))
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
        ApiError::unauthorized(
            format!("{reason}; send Authorization: Bearer <token>"),
            invalid,
        )
        .into_response()
    };
    let Some(tokens) = st.tokens.as_ref() else {
        return deny("API tokens could not be loaded (see the server log)", false);
    };
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        })
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return deny("missing or malformed Authorization header", false);
    };
    let Some(caller) = tokens.authenticate(&token) else {
        return deny("unknown token", true);
    };
    let backend = McpBackend::new(st.fleet.clone(), caller);
    req.extensions_mut()
        .insert(BackendHandle(Arc::new(backend)));
    next.run(req).await
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
    flotilla_mcp::router(mcp, opts).layer(axum::middleware::from_fn_with_state(
        Arc::new(AuthState { fleet, tokens }),
        authenticate,
    ))
}
