//! Encoding shared by the store backends: how values become columns and rows become records.
//!
//! Both backends keep the same column layout (UUIDs as canonical hyphenated text, u64 bit-cast
//! to i64, nested structures as JSON text), so one decoder per record type serves both and a
//! record read from SQLite and from PostgreSQL is decoded by the same code.

use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::postgres::{PgRow, Postgres};
use sqlx::sqlite::{Sqlite, SqliteRow};
use sqlx::Row;
use uuid::Uuid;

use super::{StoreError, StoreResult};
use crate::model::{
    Agent, AuditRecord, Batch, Channel, Command, CommandKind, CommandStatus, Transport,
};

/// A column type both backends decode.
pub(super) trait ColType:
    sqlx::Type<Sqlite>
    + for<'r> sqlx::Decode<'r, Sqlite>
    + sqlx::Type<Postgres>
    + for<'r> sqlx::Decode<'r, Postgres>
{
}

impl<T> ColType for T where
    T: sqlx::Type<Sqlite>
        + for<'r> sqlx::Decode<'r, Sqlite>
        + sqlx::Type<Postgres>
        + for<'r> sqlx::Decode<'r, Postgres>
{
}

/// A result row of either backend, read by column name.
pub(super) trait Cols {
    fn col<T: ColType>(&self, name: &str) -> StoreResult<T>;

    fn text(&self, name: &str) -> StoreResult<String> {
        self.col(name)
    }
}

impl Cols for SqliteRow {
    fn col<T: ColType>(&self, name: &str) -> StoreResult<T> {
        Ok(self.try_get(name)?)
    }
}

impl Cols for PgRow {
    fn col<T: ColType>(&self, name: &str) -> StoreResult<T> {
        Ok(self.try_get(name)?)
    }
}

/// Default page size when a filter says `limit: 0`.
pub(super) const DEFAULT_LIMIT: usize = 100;

// ---- encoding helpers ----

pub(super) fn uid(u: Uuid) -> String {
    u.hyphenated().to_string()
}

pub(super) fn opt_uid(u: Option<Uuid>) -> Option<String> {
    u.map(uid)
}

/// Bit-cast so values above `i64::MAX` round-trip exactly through an INTEGER column.
pub(super) fn u64_to_db(v: u64) -> i64 {
    v as i64
}

pub(super) fn u64_from_db(v: i64) -> u64 {
    v as u64
}

pub(super) fn limit_to_db(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

pub(super) fn to_json<T: Serialize + ?Sized>(v: &T, what: &str) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("cannot encode {what}: {e}")))
}

pub(super) fn opt_to_json<T: Serialize>(v: &Option<T>, what: &str) -> StoreResult<Option<String>> {
    v.as_ref().map(|v| to_json(v, what)).transpose()
}

pub(super) fn from_json<T: DeserializeOwned>(s: &str, what: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("bad JSON in {what}: {e}")))
}

pub(super) fn opt_from_json<T: DeserializeOwned>(
    s: Option<String>,
    what: &str,
) -> StoreResult<Option<T>> {
    s.map(|s| from_json(&s, what)).transpose()
}

pub(super) fn parse_uuid(s: &str, what: &str) -> StoreResult<Uuid> {
    Uuid::from_str(s).map_err(|e| StoreError::Corrupt(format!("bad uuid in {what}: {s:?}: {e}")))
}

pub(super) fn opt_parse_uuid(s: Option<String>, what: &str) -> StoreResult<Option<Uuid>> {
    s.map(|s| parse_uuid(&s, what)).transpose()
}

pub(super) fn parse_channel(s: &str, what: &str) -> StoreResult<Channel> {
    Channel::parse(s).ok_or_else(|| StoreError::Corrupt(format!("bad channel in {what}: {s:?}")))
}

pub(super) fn parse_kind(s: &str, what: &str) -> StoreResult<CommandKind> {
    CommandKind::parse(s)
        .ok_or_else(|| StoreError::Corrupt(format!("bad command kind in {what}: {s:?}")))
}

pub(super) fn parse_status(s: &str, what: &str) -> StoreResult<CommandStatus> {
    CommandStatus::parse(s)
        .ok_or_else(|| StoreError::Corrupt(format!("bad command status in {what}: {s:?}")))
}

pub(super) fn parse_transport(s: Option<String>, what: &str) -> StoreResult<Option<Transport>> {
    match s.as_deref() {
        None => Ok(None),
        Some("http") => Ok(Some(Transport::Http)),
        Some("websocket") => Ok(Some(Transport::Websocket)),
        Some(other) => Err(StoreError::Corrupt(format!(
            "bad transport in {what}: {other:?}"
        ))),
    }
}

// ---- row decoding ----

pub(super) fn agent_from_row(row: &impl Cols) -> StoreResult<Agent> {
    let uid_s: String = row.col("uid")?;
    let what = format!("agent {uid_s}");
    Ok(Agent {
        uid: parse_uuid(&uid_s, &what)?,
        identifying: from_json(&row.text("identifying")?, &what)?,
        non_identifying: from_json(&row.text("non_identifying")?, &what)?,
        capabilities: u64_from_db(row.col("capabilities")?),
        custom_capabilities: from_json(&row.text("custom_capabilities")?, &what)?,
        health: opt_from_json(row.col("health")?, &what)?,
        effective_config: opt_from_json(row.col("effective_config")?, &what)?,
        remote_config_status: opt_from_json(row.col("remote_config_status")?, &what)?,
        desired_config: opt_from_json(row.col("desired_config")?, &what)?,
        labels: from_json(&row.text("labels")?, &what)?,
        transport: parse_transport(row.col("transport")?, &what)?,
        remote_addr: row.col("remote_addr")?,
        first_seen: row.col("first_seen")?,
        last_seen: row.col("last_seen")?,
        connected: row.col("connected")?,
        sequence_num: u64_from_db(row.col("sequence_num")?),
        heartbeat_interval_s: u64_from_db(row.col("heartbeat_interval_s")?),
        previous_uid: opt_parse_uuid(row.col("previous_uid")?, &what)?,
        replaces: opt_parse_uuid(row.col("replaces")?, &what)?,
        replaced_by: opt_parse_uuid(row.col("replaced_by")?, &what)?,
        departed: row.col("departed")?,
        client_cert: opt_from_json(row.col("client_cert")?, &what)?,
        replica: row.col("replica")?,
    })
}

/// `replicas` rows as `(id, started_at, heartbeat_at, connections)`.
pub(super) fn replica_rows(rows: Vec<(String, i64, i64, i64)>) -> Vec<super::ReplicaRow> {
    rows.into_iter()
        .map(|(id, started_at, heartbeat_at, c)| super::ReplicaRow {
            id,
            started_at,
            heartbeat_at,
            connections: u64_from_db(c),
        })
        .collect()
}

pub(super) fn command_from_row(row: &impl Cols) -> StoreResult<Command> {
    let id_s: String = row.col("id")?;
    let what = format!("command {id_s}");
    Ok(Command {
        id: parse_uuid(&id_s, &what)?,
        agent_uid: parse_uuid(&row.text("agent_uid")?, &what)?,
        batch_id: opt_parse_uuid(row.col("batch_id")?, &what)?,
        kind: parse_kind(&row.text("kind")?, &what)?,
        params: from_json(&row.text("params")?, &what)?,
        status: parse_status(&row.text("status")?, &what)?,
        created_at: row.col("created_at")?,
        sent_at: row.col("sent_at")?,
        finished_at: row.col("finished_at")?,
        expires_at: row.col("expires_at")?,
        result: opt_from_json(row.col("result")?, &what)?,
        error: row.col("error")?,
        actor: row.col("actor")?,
        channel: parse_channel(&row.text("channel")?, &what)?,
        audit_id: row.col("audit_id")?,
    })
}

/// `(status, n)` rows as a count for every status, zeros included, so metric series and
/// progress keys do not vanish.
pub(super) fn status_counts<R: Cols>(
    rows: &[R],
    what: &str,
) -> StoreResult<Vec<(CommandStatus, u64)>> {
    let mut counts: Vec<(CommandStatus, u64)> =
        CommandStatus::ALL.iter().map(|s| (*s, 0)).collect();
    for row in rows {
        let status = parse_status(&row.text("status")?, what)?;
        let n: i64 = row.col("n")?;
        if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == status) {
            slot.1 = u64::try_from(n).unwrap_or(0);
        }
    }
    Ok(counts)
}

pub(super) fn batch_from_row(row: &impl Cols) -> StoreResult<Batch> {
    let id_s: String = row.col("id")?;
    let what = format!("batch {id_s}");
    Ok(Batch {
        id: parse_uuid(&id_s, &what)?,
        query: row.col("query")?,
        kind: parse_kind(&row.text("kind")?, &what)?,
        params: from_json(&row.text("params")?, &what)?,
        created_at: row.col("created_at")?,
        actor: row.col("actor")?,
        channel: parse_channel(&row.text("channel")?, &what)?,
        skipped: from_json(&row.text("skipped")?, &what)?,
    })
}

pub(super) fn audit_from_row(row: &impl Cols) -> StoreResult<AuditRecord> {
    let id: i64 = row.col("id")?;
    let what = format!("audit record {id}");
    Ok(AuditRecord {
        id,
        ts: row.col("ts")?,
        actor: row.col("actor")?,
        channel: parse_channel(&row.text("channel")?, &what)?,
        operation: row.col("operation")?,
        targets: from_json(&row.text("targets")?, &what)?,
        params: from_json(&row.text("params")?, &what)?,
        outcome: row.col("outcome")?,
        ref_id: row.col("ref_id")?,
        prev_hash: row.col("prev_hash")?,
        hash: row.col("hash")?,
    })
}
