//! Agent endpoints: search, one agent's full view, server-side labels, and the fleet summary.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Auth;
use super::errors::{ApiError, Json, Path, Query};
use super::ApiState;
use crate::model::{now_ms, CommandFilter};
use crate::service::agent_view;
use crate::views;

/// How many of an agent's latest commands its view embeds.
const RECENT_COMMANDS: usize = 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    #[serde(default)]
    q: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    total: Option<bool>,
}

/// `GET /api/v1/agents`
pub async fn search(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
    Query(p): Query<SearchParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let page = st
        .fleet
        .search(
            &caller,
            p.q.as_deref().unwrap_or(""),
            p.limit,
            p.cursor.as_deref(),
            p.total.unwrap_or(false),
        )
        .await?;
    Ok(axum::Json(json!(page)))
}

/// `GET /api/v1/agents/{uid}`
pub async fn get(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
    Path(uid): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let uid = st.fleet.resolve_agent(&caller, &uid).await?;
    let agent = st.fleet.get_agent(&caller, uid).await?;
    let recent = st
        .fleet
        .commands(
            &caller,
            &CommandFilter {
                agent: Some(uid),
                limit: RECENT_COMMANDS,
                ..Default::default()
            },
        )
        .await?;
    let mut v = agent_view(&agent, now_ms());
    v["recent_commands"] = Value::Array(recent.iter().map(views::command).collect());
    Ok(axum::Json(v))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelBody {
    value: String,
}

/// `PUT /api/v1/agents/{uid}/labels/{key}`: 200 with the agent's labels after the change.
pub async fn put_label(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
    Path((uid, key)): Path<(String, String)>,
    Json(body): Json<LabelBody>,
) -> Result<axum::Json<Value>, ApiError> {
    let uid = st.fleet.resolve_agent(&caller, &uid).await?;
    st.fleet
        .set_label(&caller, uid, &key, Some(&body.value))
        .await?;
    // Read back through the service so the answer shows the stored labels, including any set
    // concurrently by someone else.
    let agent = st.fleet.get_agent(&caller, uid).await?;
    Ok(axum::Json(json!({"uid": uid, "labels": agent.labels})))
}

/// `DELETE /api/v1/agents/{uid}/labels/{key}`: 204 (also when the label was not set).
pub async fn delete_label(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
    Path((uid, key)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let uid = st.fleet.resolve_agent(&caller, &uid).await?;
    st.fleet.set_label(&caller, uid, &key, None).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /api/v1/fleet/summary`
pub async fn summary(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(st.fleet.summary(&caller).await?))
}
