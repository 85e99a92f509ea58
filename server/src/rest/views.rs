//! JSON views of model records for the REST API: timestamps as RFC 3339 strings and every id as
//! a string (audit ids are integers in the store; JavaScript clients lose precision past 2^53,
//! and one rule for all ids is easier to use).

use serde_json::{json, Value};

use crate::model::{rfc3339, AuditRecord, Batch, Command};
use crate::service::BatchProgress;

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
        "commands": p.commands,
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
