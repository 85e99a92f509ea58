//! Command endpoints: queue for one agent or fan out over a query, list, read, cancel, batch
//! progress, and the command catalog.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::auth::Auth;
use super::errors::{parse_uuid, ApiError, Json, Path, Query};
use super::ApiState;
use crate::model::{Caller, CommandFilter, CommandKind, CommandStatus};
use crate::service::{ExpectedTargets, Queued, Target};
use crate::views;

fn parse_kind(s: &str) -> Result<CommandKind, ApiError> {
    views::parse_kind(s, "GET /api/v1/catalog").map_err(|m| ApiError::new("invalid_params", m))
}

/// Checks a listing's `limit` (1..=1000, default 100).
pub fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    views::page_limit(limit).map_err(ApiError::bad_request)
}

pub use crate::views::fetch_size;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueOne {
    kind: String,
    #[serde(default)]
    params: Value,
    /// Answer 200 with what would be queued ([`views::plan`]); queue nothing.
    #[serde(default)]
    dry_run: bool,
    /// A dry run's `expect_targets`: refuse (409, nothing queued) if the targets changed.
    #[serde(default)]
    expect_targets: Option<ExpectedTargets>,
}

fn accepted(location: String, body: Value) -> Response {
    let mut resp = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

async fn queue_one(
    st: &ApiState,
    caller: &Caller,
    uid: Uuid,
    kind: CommandKind,
    params: &Value,
    expect: Option<&ExpectedTargets>,
) -> Result<Response, ApiError> {
    match st
        .fleet
        .queue_expecting(caller, Target::Agent(uid), kind, params, expect)
        .await?
    {
        Queued::One(c) => Ok(accepted(
            format!("/api/v1/commands/{}", c.id),
            json!({"command_id": c.id, "command": views::command(&c)}),
        )),
        // A single-agent target never yields a batch; answer honestly if it ever does.
        Queued::Batch(b, cmds) => Ok(batch_response(&b, &cmds)),
    }
}

fn batch_response(b: &crate::model::Batch, cmds: &[crate::model::Command]) -> Response {
    let commands: Vec<Value> = cmds
        .iter()
        .map(|c| json!({"agent_uid": c.agent_uid, "command_id": c.id}))
        .collect();
    accepted(
        format!("/api/v1/batches/{}", b.id),
        json!({
            "batch_id": b.id,
            "queued": cmds.len(),
            "skipped": b.skipped,
            "commands": commands,
        }),
    )
}

/// `POST /api/v1/agents/{uid}/commands`: 202 `{command_id, command}`.
pub async fn queue_for_agent(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
    Path(uid): Path<String>,
    Json(body): Json<QueueOne>,
) -> Result<Response, ApiError> {
    let uid = st.fleet.resolve_agent(&caller, &uid).await?;
    let kind = parse_kind(&body.kind)?;
    if body.dry_run {
        return dry_run(&st, &caller, Target::Agent(uid), kind, &body.params).await;
    }
    queue_one(
        &st,
        &caller,
        uid,
        kind,
        &body.params,
        body.expect_targets.as_ref(),
    )
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueMany {
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    agent: Option<String>,
    kind: String,
    #[serde(default)]
    params: Value,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    expect_targets: Option<ExpectedTargets>,
}

/// `dry_run: true` on either queue endpoint: 200 with the plan, the same checks as queuing
/// (they share [`crate::service::Fleet::plan`]), nothing queued or audited.
async fn dry_run(
    st: &ApiState,
    caller: &Caller,
    target: Target,
    kind: CommandKind,
    params: &Value,
) -> Result<Response, ApiError> {
    let plan = st.fleet.plan(caller, target, kind, params).await?;
    Ok(axum::Json(views::plan(&plan)).into_response())
}

/// `POST /api/v1/commands`: with `query`, a fan-out (202 `{batch_id, queued, skipped,
/// commands}`); with `agent`, the same as `POST /api/v1/agents/{uid}/commands`.
pub async fn queue(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
    Json(body): Json<QueueMany>,
) -> Result<Response, ApiError> {
    let kind = parse_kind(&body.kind)?;
    let target = match (body.query, body.agent) {
        (Some(q), None) => Target::Query(q),
        (None, Some(a)) => Target::Agent(st.fleet.resolve_agent(&caller, &a).await?),
        _ => return Err(ApiError::bad_request(
            "give exactly one of \"query\" (fan-out over matching agents) or \"agent\" (one uid)",
        )),
    };
    if body.dry_run {
        return dry_run(&st, &caller, target, kind, &body.params).await;
    }
    let expect = body.expect_targets.as_ref();
    match target {
        Target::Query(q) => {
            match st
                .fleet
                .queue_expecting(&caller, Target::Query(q), kind, &body.params, expect)
                .await?
            {
                Queued::Batch(b, cmds) => Ok(batch_response(&b, &cmds)),
                Queued::One(c) => Ok(accepted(
                    format!("/api/v1/commands/{}", c.id),
                    json!({"command_id": c.id, "command": views::command(&c)}),
                )),
            }
        }
        Target::Agent(uid) => queue_one(&st, &caller, uid, kind, &body.params, expect).await,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    batch: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
}

/// `GET /api/v1/commands`: newest first, `{items, next_cursor}`.
pub async fn list(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
    Query(p): Query<ListParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let limit = page_limit(p.limit)?;
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let status = match nonempty(p.status) {
        None => None,
        Some(s) => Some(CommandStatus::parse(&s).ok_or_else(|| {
            let all: Vec<&str> = CommandStatus::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::bad_request(format!("status {s:?} is not one of {}", all.join(", ")))
        })?),
    };
    let kind = match nonempty(p.kind) {
        None => None,
        Some(k) => Some(CommandKind::parse(&k).ok_or_else(|| {
            let all: Vec<&str> = CommandKind::ALL.iter().map(|k| k.as_str()).collect();
            ApiError::bad_request(format!("kind {k:?} is not one of {}", all.join(", ")))
        })?),
    };
    let filter = CommandFilter {
        agent: match nonempty(p.agent) {
            Some(a) => Some(st.fleet.resolve_agent(&caller, &a).await?),
            None => None,
        },
        status,
        batch: nonempty(p.batch)
            .map(|b| parse_uuid("batch", &b))
            .transpose()?,
        kind,
        before: nonempty(p.cursor)
            .map(|c| parse_uuid("cursor", &c))
            .transpose()?,
        limit: fetch_size(limit),
    };
    let items = st.fleet.commands(&caller, &filter).await?;
    Ok(axum::Json(views::page(
        items,
        limit,
        |x| x.id.to_string(),
        views::command,
    )))
}

/// `GET /api/v1/commands/{id}`
pub async fn get(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let id = parse_uuid("command id", &id)?;
    Ok(axum::Json(views::command(
        &st.fleet.command(&caller, id).await?,
    )))
}

/// `DELETE /api/v1/commands/{id}`: cancels a queued command (200 with it); 409 once sent.
pub async fn cancel(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let id = parse_uuid("command id", &id)?;
    Ok(axum::Json(views::command(
        &st.fleet.cancel(&caller, id).await?,
    )))
}

/// `GET /api/v1/batches/{id}`: per-agent progress of a fan-out.
pub async fn batch(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let id = parse_uuid("batch id", &id)?;
    Ok(axum::Json(views::batch_progress(
        &st.fleet.batch(&caller, id).await?,
    )))
}

/// `GET /api/v1/catalog`
pub async fn catalog(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(
        json!({"kinds": st.fleet.catalog(&caller).await?}),
    ))
}
