//! `GET /api/v1/audit`: the audit trail filtered by actor, channel, agent, operation and time,
//! newest first, paged by record id; `GET /api/v1/audit/verify`: the hash chain's state;
//! `GET /api/v1/audit/export`: the whole trail in chain order with its hashes (admin).

use std::sync::Arc;

use axum::extract::State;
use serde::Deserialize;
use serde_json::Value;

use super::auth::Auth;
use super::commands::{fetch_size, page_limit};
use super::errors::{ApiError, Query};
use super::ApiState;
use crate::model::{AuditFilter, Channel, Millis};
use crate::views;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    #[serde(default)]
    actor: Option<String>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    operation: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
}

/// Parses a time bound (see [`views::parse_time`]).
pub fn parse_time(name: &str, s: &str) -> Result<Millis, ApiError> {
    views::parse_time(name, s).map_err(ApiError::bad_request)
}

/// `GET /api/v1/audit`: `{items, next_cursor}`.
pub async fn query(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
    Query(p): Query<AuditParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let limit = page_limit(p.limit)?;
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let channel = match nonempty(p.channel) {
        None => None,
        Some(c) => Some(Channel::parse(&c).ok_or_else(|| {
            ApiError::bad_request(format!(
                "channel {c:?} is not one of rest, mcp, slack, discord, teams, console, cli, system"
            ))
        })?),
    };
    let since = nonempty(p.since)
        .map(|s| parse_time("since", &s))
        .transpose()?;
    let until = nonempty(p.until)
        .map(|s| parse_time("until", &s))
        .transpose()?;
    if let (Some(a), Some(b)) = (since, until) {
        if a > b {
            return Err(ApiError::bad_request("since is after until"));
        }
    }
    let before_id = match nonempty(p.cursor) {
        None => None,
        Some(c) => Some(
            c.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("cursor {c:?} is not valid")))?,
        ),
    };
    let filter = AuditFilter {
        actor: nonempty(p.actor),
        channel,
        // Targets are stored as canonical hyphenated lowercase uids; a uid (of an agent, a
        // command or a batch) passes through, a host or service name is resolved.
        agent: match nonempty(p.agent) {
            Some(a) => Some(st.fleet.resolve_agent(&caller, &a).await?.to_string()),
            None => None,
        },
        operation: nonempty(p.operation),
        since,
        until,
        before_id,
        limit: fetch_size(limit),
    };
    let items = st.fleet.audit(&caller, &filter).await?;
    Ok(axum::Json(views::page(
        items,
        limit,
        |x| x.id.to_string(),
        views::audit,
    )))
}

/// `GET /api/v1/audit/verify`: `{intact, records, head}` or `{intact: false, broken_at, reason}`.
pub async fn verify(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(views::audit_verification(
        &st.fleet.verify_audit(&caller).await?,
    )))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportParams {
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

/// `GET /api/v1/audit/export`: `{items, next_after}`, oldest first from just after record
/// `after`; `next_after` is `null` at the end of the trail. Admin only.
pub async fn export(
    State(st): State<Arc<ApiState>>,
    Auth(caller): Auth,
    Query(p): Query<ExportParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let limit = page_limit(p.limit)?;
    let after = match p.after.filter(|s| !s.is_empty()) {
        None => 0,
        Some(a) => a
            .parse::<i64>()
            .ok()
            .filter(|a| *a >= 0)
            .ok_or_else(|| ApiError::bad_request(format!("after {a:?} is not a record id")))?,
    };
    let items = st.fleet.export_audit(&caller, after, limit).await?;
    let next_after = (items.len() == limit)
        .then(|| items.last().map(|r| r.id.to_string()))
        .flatten();
    Ok(axum::Json(serde_json::json!({
        "items": items.iter().map(views::audit).collect::<Vec<_>>(),
        "next_after": next_after,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse() {
        assert_eq!(
            parse_time("since", "1700000000000").unwrap(),
            1_700_000_000_000
        );
        assert_eq!(parse_time("since", "1970-01-01T00:00:01Z").unwrap(), 1000);
        assert_eq!(
            parse_time("since", "1970-01-01T01:00:01 01:00").unwrap(),
            1000
        );
        assert_eq!(
            parse_time("since", "1970-01-01T00:00:00.250Z").unwrap(),
            250
        );
        let e = parse_time("until", "yesterday").unwrap_err();
        assert_eq!(e.code, "bad_request");
        assert!(e.message.contains("until"));
    }
}
