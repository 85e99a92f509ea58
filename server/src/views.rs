//! JSON views of model records shared by every adapter (REST, MCP): timestamps as RFC 3339 strings and every id as
//! a string (audit ids are integers in the store; JavaScript clients lose precision past 2^53,
//! and one rule for all ids is easier to use).

use serde_json::{json, Value};

use crate::model::{rfc3339, AuditRecord, Batch, Command, CommandKind, Millis};
use crate::service::{BatchProgress, Plan};

fn opt_time(ms: Option<i64>) -> Value {
    ms.map(|m| Value::String(rfc3339(m))).unwrap_or(Value::Null)
}

pub fn command(c: &Command) -> Value {
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

pub fn batch(b: &Batch) -> Value {
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

pub fn batch_progress(p: &BatchProgress) -> Value {
    json!({
        "batch": batch(&p.batch),
        "counts": p.counts,
        "total": p.total,
        "done": p.done,
        // At most crate::service::BATCH_ITEMS, newest first; counts cover the whole batch.
        "commands": p.commands,
    })
}

/// Targets and skipped agents listed in a rendered plan; the counts and the digest cover all.
pub const PLAN_SAMPLE: usize = 100;

/// A dry run (`dry_run: true` on the queue endpoints; MCP previews): what would be queued.
/// `expect_targets` can be sent back with the real request so it is refused if the target set
/// changed in between.
pub fn plan(p: &Plan) -> Value {
    let destructive = crate::commands::catalog_entry(p.kind)["destructive"].clone();
    let target = match &p.query {
        Some(q) => json!({"query": q}),
        None => json!({"agent": p.targets.first().map(|t| t.uid)}),
    };
    json!({
        "dry_run": true,
        "kind": p.kind,
        "params": p.params,
        "destructive": destructive,
        "target": target,
        "matched": p.matched,
        "target_count": p.targets.len(),
        "targets": &p.targets[..p.targets.len().min(PLAN_SAMPLE)],
        "skipped_count": p.skipped.len(),
        "skipped": &p.skipped[..p.skipped.len().min(PLAN_SAMPLE)],
        "expect_targets": p.expected(),
    })
}

pub fn audit(r: &AuditRecord) -> Value {
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

/// The audit chain's state ([`crate::service::Fleet::verify_audit`]).
pub fn audit_verification(r: &Result<crate::audit::Verified, crate::audit::ChainBreak>) -> Value {
    match r {
        Ok(v) => json!({
            "intact": true,
            "records": v.count,
            "head": v.head.as_ref().map(|h| h.to_string()),
            "commands_verified": v.commands.verified,
            "commands_legacy": v.commands.legacy,
        }),
        Err(b) => json!({
            "intact": false,
            "broken_at": b.id.to_string(),
            "reason": b.reason,
        }),
    }
}

// ---- request parsing shared by the adapters; each wraps the message in its own error ----

/// Largest page of a listing; the service caps there too.
pub const MAX_PAGE: usize = 1000;
/// Default page of a listing.
pub const DEFAULT_PAGE: usize = 100;

/// Checks a listing's `limit` (1..=1000, default 100).
pub fn page_limit(limit: Option<usize>) -> Result<usize, String> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(format!("limit {n} must be between 1 and {MAX_PAGE}")),
    }
}

/// How many rows to ask the service for so a next page can be detected without an extra
/// round trip: one more than the page, unless that would exceed the service's cap.
pub fn fetch_size(limit: usize) -> usize {
    if limit < MAX_PAGE {
        limit + 1
    } else {
        limit
    }
}

/// Parses a command kind; the error lists the kinds and says where the catalog is (`hint`).
pub fn parse_kind(s: &str, hint: &str) -> Result<CommandKind, String> {
    CommandKind::parse(s).ok_or_else(|| {
        let kinds: Vec<&str> = CommandKind::ALL.iter().map(|k| k.as_str()).collect();
        format!(
            "unknown command kind {s:?} (kinds: {}; see {hint})",
            kinds.join(", ")
        )
    })
}

/// Parses a time bound: unix milliseconds, or RFC 3339. A `+` offset arrives as a space when
/// the client did not percent-encode it (form decoding), so a space is read back as `+`.
pub fn parse_time(name: &str, s: &str) -> Result<Millis, String> {
    use time::format_description::well_known::Rfc3339;
    use time::OffsetDateTime;
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    OffsetDateTime::parse(s, &Rfc3339)
        .or_else(|e| {
            if s.contains(' ') {
                OffsetDateTime::parse(&s.replace(' ', "+"), &Rfc3339)
            } else {
                Err(e)
            }
        })
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as Millis)
        .map_err(|_| {
            format!(
                "{name} {s:?} is neither RFC 3339 (e.g. 2025-01-31T12:00:00Z) nor unix milliseconds"
            )
        })
}

/// Cuts a listing fetched with [`fetch_size`] to `limit` and renders the page as
/// `{"items": [...], "next_cursor": ...}`; the cursor is the last item's id when more exist.
pub fn page<T>(
    mut items: Vec<T>,
    limit: usize,
    cursor_of: impl Fn(&T) -> String,
    render: impl Fn(&T) -> Value,
) -> Value {
    let more = items.len() > limit || (limit == MAX_PAGE && items.len() == limit);
    items.truncate(limit);
    let next_cursor = if more {
        items.last().map(&cursor_of)
    } else {
        None
    };
    json!({
        "items": items.iter().map(render).collect::<Vec<_>>(),
        "next_cursor": next_cursor,
    })
}
