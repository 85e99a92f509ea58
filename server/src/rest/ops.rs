//! Unauthenticated operational endpoints: `/healthz` (liveness), `/readyz` (the store answers)
//! and `/metrics` (Prometheus). They live on the operator listener, which binds to loopback by
//! default; expose that listener wider only behind something that guards `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::ApiState;
use crate::model::{Caller, CommandStatus};

/// How long `/readyz` and `/metrics` wait for the store before answering 503.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET /healthz`: 200 `ok` while the process serves requests.
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: 200 when the store answers a trivial query in time, else 503.
pub async fn readyz(State(st): State<Arc<ApiState>>) -> Response {
    match tokio::time::timeout(STORE_TIMEOUT, st.fleet.store().list_agents(None, 1)).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready").into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness check: store failed");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response()
        }
        Err(_) => {
            tracing::warn!("readiness check: store did not answer in time");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response()
        }
    }
}

/// `GET /metrics`: the Prometheus/OpenMetrics text exposition. Gauges of stored state are
/// computed now from the registry, so they cannot drift.
pub async fn metrics(State(st): State<Arc<ApiState>>) -> Response {
    let fleet = &st.fleet;
    let gather = async {
        let summary = fleet.summary(&Caller::system()).await?;
        let counts = fleet.store().command_counts().await?;
        Ok::<_, crate::service::FleetError>((summary, counts))
    };
    let (summary, counts) = match tokio::time::timeout(STORE_TIMEOUT, gather).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics: store failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response();
        }
        Err(_) => {
            tracing::warn!("metrics: store did not answer in time");
            return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response();
        }
    };
    // Every state and status is always exported, at 0 when absent, so rate() and alerts on
    // a series that appears later behave.
    let by_state = &summary["by_state"];
    let agents: Vec<(&str, u64)> = ["healthy", "late", "offline"]
        .into_iter()
        .map(|s| (s, by_state[s].as_u64().unwrap_or(0)))
        .collect();
    let commands: Vec<(&str, u64)> = CommandStatus::ALL
        .iter()
        .map(|s| {
            let n = counts
                .iter()
                .find(|(c, _)| c == s)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            (s.as_str(), n)
        })
        .collect();
    let ws = fleet.hub().counts().0 as u64;
    match fleet.replicas().await {
        Ok(r) => fleet
            .metrics()
            .set_replicas(&fleet.settings().replica_id, &r),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot read the replicas; their gauges are stale")
        }
    }
    let body = fleet.metrics().render(&agents, &commands, ws);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
