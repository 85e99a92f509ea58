//! SQLite backend of [`Store`]: one `flotilla.db` file in WAL mode, via sqlx runtime queries.
//!
//! Scalars that callers filter or sort on have their own columns; nested structures are JSON
//! text. UUIDs are stored as canonical hyphenated lowercase text, so text order is uuid order
//! (and, for UUIDv7 command ids, creation order). u64 values are stored bit-cast to i64, which
//! round-trips exactly. All writes go through one in-process mutex plus `BEGIN IMMEDIATE`, so
//! SQLite's single writer never makes us see `SQLITE_BUSY` from our own pool.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite, Transaction};
use tokio::sync::Mutex;
use uuid::Uuid;

use super::codec::*;
use super::migrations::{self, MIGRATIONS};
use super::{ChatStore, ChatSubscriptionRow, Finish, Store, StoreError, StoreResult, Touch};
use crate::audit;
use crate::model::{
    now_ms, Agent, AuditFilter, AuditRecord, Batch, Command, CommandFilter, CommandStatus,
    DesiredConfig, Millis, NewAudit, Transport,
};

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "flotilla.db";

/// Agents per claim statement (one bound parameter each).
const CLAIM_CHUNK: usize = 500;

/// `flotilla.db-wal` and the like: SQLite's companion files, next to the database.
fn wal_path(db: &Path, suffix: &str) -> std::path::PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(suffix);
    p.into()
}

/// The SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    pool: SqlitePool,
    /// Serialises write transactions (SQLite has a single writer anyway).
    writer: Mutex<()>,
    /// This process's replica id ([`Store::start_replica`]), shown on the agents it holds.
    replica: std::sync::OnceLock<String>,
}

impl SqliteStore {
    /// Opens (creating if needed) `data_dir/flotilla.db` and brings its schema up to date.
    pub async fn open(data_dir: &Path) -> StoreResult<SqliteStore> {
        super::private_dir(data_dir)?;
        let db = data_dir.join(DB_FILE);
        super::private_file(&db)?;
        #[cfg(unix)]
        for suffix in ["-wal", "-shm"] {
            super::tighten(&wal_path(&db, suffix), 0o600, "database file");
        }
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join(DB_FILE))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL+WAL: a commit is in the WAL via write() before we return, so it survives a
            // process crash (kill -9); only OS crash/power loss can drop the last commits.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // Small pool: one writer at a time, a few concurrent readers.
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        migrate(&pool).await?;
        Ok(SqliteStore {
            pool,
            writer: Mutex::new(()),
            replica: std::sync::OnceLock::new(),
        })
    }

    /// The underlying pool, for administrative tools and tamper tests. Writing through it
    /// bypasses the audit chain, which is the point of a tamper test and nothing else.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// One page of agents in uid order, strictly after `after`, from `select` (`... FROM agents`).
    async fn agents_page(
        &self,
        select: &str,
        after: Option<Uuid>,
        limit: usize,
    ) -> StoreResult<Vec<Agent>> {
        let mut q = QueryBuilder::<Sqlite>::new(select);
        if let Some(after) = after {
            q.push(" WHERE uid > ").push_bind(uid(after));
        }
        q.push(" ORDER BY uid LIMIT ").push_bind(limit_to_db(limit));
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(agent_from_row)
            .collect()
    }

    async fn begin_write(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

async fn migrate(pool: &SqlitePool) -> StoreResult<()> {
    // IMMEDIATE so two processes opening a fresh file cannot both apply version 1.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_version (
            version INTEGER PRIMARY KEY NOT NULL,
            applied_at INTEGER NOT NULL
        )",
    )
    .execute(&mut *tx)
    .await?;
    let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
        .fetch_one(&mut *tx)
        .await?;
    let current = current.unwrap_or(0);
    let latest = migrations::latest();
    if current > latest {
        return Err(StoreError::Corrupt(format!(
            "database schema version {current} is newer than this server supports ({latest})"
        )));
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        for sql in m.sqlite {
            sqlx::query(sql).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)")
            .bind(m.version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

// ---- row decoding ----

/// One agent of a `list_agents_brief` page, in the column order of its `json_array`.
#[derive(serde::Deserialize)]
struct BriefRow(
    String,
    Vec<(String, String)>,
    Vec<(String, String)>,
    i64,
    Vec<String>,
    Option<crate::model::Health>,
    Option<crate::model::RemoteConfigState>,
    std::collections::BTreeMap<String, String>,
    Option<String>,
    Option<String>,
    Millis,
    Millis,
    i64,
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    Option<String>,
);

impl BriefRow {
    fn into_agent(self) -> StoreResult<Agent> {
        let what = format!("agent {}", self.0);
        Ok(Agent {
            uid: parse_uuid(&self.0, &what)?,
            identifying: self.1,
            non_identifying: self.2,
            capabilities: u64_from_db(self.3),
            custom_capabilities: self.4,
            health: self.5,
            effective_config: None,
            remote_config_status: self.6,
            desired_config: None,
            labels: self.7,
            transport: parse_transport(self.8, &what)?,
            remote_addr: self.9,
            first_seen: self.10,
            last_seen: self.11,
            connected: self.12 != 0,
            sequence_num: u64_from_db(self.13),
            heartbeat_interval_s: u64_from_db(self.14),
            previous_uid: opt_parse_uuid(self.15, &what)?,
            replaces: opt_parse_uuid(self.16, &what)?,
            replaced_by: opt_parse_uuid(self.17, &what)?,
            departed: self.18 != 0,
            client_cert: None,
            replica: self.19,
        })
    }
}

// ---- statements shared by several operations (run inside the caller's transaction) ----

/// Appends one audit record chained to the current last record.
async fn append_audit_in(conn: &mut SqliteConnection, a: NewAudit) -> StoreResult<AuditRecord> {
    let prev_hash: Option<String> =
        sqlx::query_scalar("SELECT hash FROM audit ORDER BY id DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let prev_hash = prev_hash.unwrap_or_else(|| audit::GENESIS.to_string());
    let targets_json = to_json(&a.targets, "audit targets")?;
    let params_json = to_json(&a.params, "audit params")?;
    // Hash what a later read will see: serde_json does not promise that every float survives
    // text and back bit-exactly, so re-parse the text we store rather than trust `a.params`.
    let params: serde_json::Value = from_json(&params_json, "audit params")?;
    let ts = now_ms();
    // The id is part of the hashed content and only known after the insert, hence the
    // placeholder hash, filled in before the transaction commits.
    let id = sqlx::query(
        "INSERT INTO audit (ts, actor, channel, operation, targets, params, outcome, ref_id,
                            prev_hash, hash)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, '')",
    )
    .bind(ts)
    .bind(&a.actor)
    .bind(a.channel.as_str())
    .bind(&a.operation)
    .bind(&targets_json)
    .bind(&params_json)
    .bind(&a.outcome)
    .bind(a.ref_id)
    .bind(&prev_hash)
    .execute(&mut *conn)
    .await?
    .last_insert_rowid();
    let mut rec = AuditRecord {
        id,
        ts,
        actor: a.actor,
        channel: a.channel,
        operation: a.operation,
        targets: a.targets,
        params,
        outcome: a.outcome,
        ref_id: a.ref_id,
        prev_hash,
        hash: String::new(),
    };
    rec.hash = audit::record_hash(&rec.prev_hash, &rec);
    sqlx::query("UPDATE audit SET hash = ? WHERE id = ?")
        .bind(&rec.hash)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    for t in &rec.targets {
        sqlx::query("INSERT OR IGNORE INTO audit_targets (target, audit_id) VALUES (?, ?)")
            .bind(t)
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(rec)
}

async fn insert_command(conn: &mut SqliteConnection, c: &Command) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO commands (id, agent_uid, batch_id, kind, params, status, created_at,
                               sent_at, finished_at, expires_at, result, error, actor, channel,
                               audit_id)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(uid(c.id))
    .bind(uid(c.agent_uid))
    .bind(opt_uid(c.batch_id))
    .bind(c.kind.as_str())
    .bind(to_json(&c.params, "command params")?)
    .bind(c.status.as_str())
    .bind(c.created_at)
    .bind(c.sent_at)
    .bind(c.finished_at)
    .bind(c.expires_at)
    .bind(opt_to_json(&c.result, "command result")?)
    .bind(&c.error)
    .bind(&c.actor)
    .bind(c.channel.as_str())
    .bind(c.audit_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn fetch_command(conn: &mut SqliteConnection, id: Uuid) -> StoreResult<Option<Command>> {
    sqlx::query("SELECT * FROM commands WHERE id = ?")
        .bind(uid(id))
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(command_from_row)
        .transpose()
}

#[async_trait]
impl Store for SqliteStore {
    async fn put_agent(&self, a: &Agent) -> StoreResult<()> {
        let _w = self.writer.lock().await;
        sqlx::query(
            "INSERT INTO agents (uid, identifying, non_identifying, capabilities,
                custom_capabilities, health, effective_config, remote_config_status,
                desired_config, labels, transport, remote_addr, first_seen, last_seen,
                connected, sequence_num, heartbeat_interval_s, previous_uid, identity_key,
                departed, client_cert, replica)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,
                     CASE WHEN ? THEN ? END)
             ON CONFLICT (uid) DO UPDATE SET
                identifying = excluded.identifying,
                non_identifying = excluded.non_identifying,
                capabilities = excluded.capabilities,
                custom_capabilities = excluded.custom_capabilities,
                health = excluded.health,
                effective_config = excluded.effective_config,
                remote_config_status = excluded.remote_config_status,
                transport = excluded.transport,
                remote_addr = excluded.remote_addr,
                first_seen = MIN(agents.first_seen, excluded.first_seen),
                last_seen = excluded.last_seen,
                connected = excluded.connected,
                sequence_num = excluded.sequence_num,
                heartbeat_interval_s = excluded.heartbeat_interval_s,
                previous_uid = COALESCE(excluded.previous_uid, agents.previous_uid),
                identity_key = excluded.identity_key,
                departed = excluded.departed,
                client_cert = excluded.client_cert,
                replica = CASE WHEN excluded.connected THEN excluded.replica
                    ELSE agents.replica END",
        )
        .bind(uid(a.uid))
        .bind(to_json(&a.identifying, "identifying attributes")?)
        .bind(to_json(&a.non_identifying, "non-identifying attributes")?)
        .bind(u64_to_db(a.capabilities))
        .bind(to_json(&a.custom_capabilities, "custom capabilities")?)
        .bind(opt_to_json(&a.health, "health")?)
        .bind(opt_to_json(&a.effective_config, "effective config")?)
        .bind(opt_to_json(
            &a.remote_config_status,
            "remote config status",
        )?)
        .bind(opt_to_json(&a.desired_config, "desired config")?)
        .bind(to_json(&a.labels, "labels")?)
        .bind(a.transport.map(Transport::as_str))
        .bind(&a.remote_addr)
        .bind(a.first_seen)
        .bind(a.last_seen)
        .bind(a.connected)
        .bind(u64_to_db(a.sequence_num))
        .bind(u64_to_db(a.heartbeat_interval_s))
        .bind(opt_uid(a.previous_uid))
        .bind(a.identity_key())
        .bind(a.departed)
        .bind(opt_to_json(&a.client_cert, "client certificate")?)
        .bind(a.connected)
        .bind(self.replica.get())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn set_desired_config(
        &self,
        id: Uuid,
        desired: Option<&DesiredConfig>,
    ) -> StoreResult<()> {
        let _w = self.writer.lock().await;
        sqlx::query("UPDATE agents SET desired_config = ? WHERE uid = ?")
            .bind(desired.map(|d| to_json(d, "desired config")).transpose()?)
            .bind(uid(id))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn get_agent(&self, id: Uuid) -> StoreResult<Option<Agent>> {
        sqlx::query("SELECT * FROM agents WHERE uid = ?")
            .bind(uid(id))
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(agent_from_row)
            .transpose()
    }

    async fn list_agents(&self, after: Option<Uuid>, limit: usize) -> StoreResult<Vec<Agent>> {
        self.agents_page("SELECT * FROM agents", after, limit).await
    }

    async fn list_agents_brief(
        &self,
        after: Option<Uuid>,
        limit: usize,
    ) -> StoreResult<Vec<Agent>> {
        // The whole page comes back as one JSON array text: sqlx hands rows from its worker
        // thread to the reading task one at a time, and at 1000 rows a page that handover was
        // much of a registry scan. The JSON columns are spliced in as stored (our own
        // `to_json` output) rather than through json(), which would parse and re-render them.
        // Configuration bodies are left out.
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT count(*), '[' || coalesce(group_concat('[' || json_quote(uid) || ',' || identifying
                || ',' || non_identifying || ',' || capabilities || ',' || custom_capabilities
                || ',' || coalesce(health, 'null') || ',' || coalesce(remote_config_status, 'null')
                || ',' || labels || ',' || json_quote(transport) || ',' || json_quote(remote_addr)
                || ',' || first_seen || ',' || last_seen || ',' || connected || ','
                || sequence_num || ',' || heartbeat_interval_s || ',' || json_quote(previous_uid)
                || ',' || json_quote(replaces) || ',' || json_quote(replaced_by) || ','
                || departed || ',' || json_quote(replica) || ']',
                ',' ORDER BY uid), '') || ']'
             FROM (SELECT * FROM agents",
        );
        if let Some(after) = after {
            q.push(" WHERE uid > ").push_bind(uid(after));
        }
        q.push(" ORDER BY uid LIMIT ")
            .push_bind(limit_to_db(limit))
            .push(")");
        let (n, page): (i64, String) = q.build_query_as().fetch_one(&self.pool).await?;
        let rows: Vec<BriefRow> = from_json(&page, "a page of agents")?;
        // A NULL in a spliced column would make group_concat skip that agent silently.
        if usize::try_from(n).ok() != Some(rows.len()) {
            return Err(StoreError::Corrupt(format!(
                "a page of {n} agents decoded to {} records",
                rows.len()
            )));
        }
        rows.into_iter().map(BriefRow::into_agent).collect()
    }

    async fn touch_agents(&self, touches: &[Touch]) -> StoreResult<()> {
        if touches.is_empty() {
            return Ok(());
        }
        let _w = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        // One set-based statement per chunk instead of one round trip per heartbeat: at 10k
        // heartbeats/s the per-row form held the writer lock for most of every second.
        for chunk in touches.chunks(2000) {
            let rows: Vec<serde_json::Value> = chunk
                .iter()
                .map(|t| {
                    serde_json::json!([
                        uid(t.uid),
                        t.last_seen,
                        u64_to_db(t.sequence_num),
                        t.heartbeat_interval_s.map(u64_to_db)
                    ])
                })
                .collect();
            // A touch batched before a full put_agent but flushed after it must not roll the
            // record's last_seen/sequence_num back.
            sqlx::query(
                "UPDATE agents SET last_seen = t.ls, sequence_num = t.seq,
                    heartbeat_interval_s = COALESCE(t.hb, agents.heartbeat_interval_s)
                 FROM (SELECT value ->> 0 AS uid, value ->> 1 AS ls, value ->> 2 AS seq,
                              value ->> 3 AS hb
                       FROM json_each(?)) AS t
                 WHERE agents.uid = t.uid AND agents.last_seen <= t.ls",
            )
            .bind(serde_json::Value::Array(rows).to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn set_connected(
        &self,
        id: Uuid,
        connected: bool,
        transport: Option<Transport>,
        remote_addr: Option<String>,
        at: Millis,
    ) -> StoreResult<()> {
        let _w = self.writer.lock().await;
        // `None` transport/address means "not known now", so keep what we had for display.
        // A connection is also a sign of life (and ends a goodbye); a disconnect is not.
        sqlx::query(
            "UPDATE agents SET connected = ?,
                departed = CASE WHEN ? THEN 0 ELSE departed END,
                transport = COALESCE(?, transport),
                remote_addr = COALESCE(?, remote_addr),
                last_seen = CASE WHEN ? THEN MAX(last_seen, ?) ELSE last_seen END,
                replica = CASE WHEN ? THEN ? ELSE replica END
             WHERE uid = ? AND (? OR last_seen <= ?)",
        )
        .bind(connected)
        .bind(connected)
        .bind(transport.map(Transport::as_str))
        .bind(remote_addr)
        .bind(connected)
        .bind(at)
        .bind(connected)
        .bind(self.replica.get())
        .bind(uid(id))
        .bind(connected)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn mark_all_disconnected(&self, _at: Millis) -> StoreResult<u64> {
        let _w = self.writer.lock().await;
        let done = sqlx::query("UPDATE agents SET connected = 0 WHERE connected <> 0")
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn start_replica(&self, id: &str, at: Millis, _stale_before: Millis) -> StoreResult<u64> {
        let _ = self.replica.set(id.to_string());
        let _w = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        // One process holds the file: every earlier row is a run that ended.
        sqlx::query("DELETE FROM replicas")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO replicas (id, started_at, heartbeat_at, connections) VALUES (?, ?, ?, 0)",
        )
        .bind(id)
        .bind(at)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query("UPDATE agents SET connected = 0 WHERE connected <> 0")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn replica_heartbeat(
        &self,
        connections: u64,
        at: Millis,
        _stale_before: Millis,
        _forget_before: Millis,
    ) -> StoreResult<Vec<Uuid>> {
        let Some(id) = self.replica.get() else {
            return Ok(Vec::new());
        };
        let _w = self.writer.lock().await;
        sqlx::query(
            "INSERT INTO replicas (id, started_at, heartbeat_at, connections) VALUES (?, ?, ?, ?)
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at,
                connections = excluded.connections",
        )
        .bind(id)
        .bind(at)
        .bind(at)
        .bind(u64_to_db(connections))
        .execute(&self.pool)
        .await?;
        Ok(Vec::new())
    }

    async fn replicas(&self) -> StoreResult<Vec<super::ReplicaRow>> {
        let rows = sqlx::query_as(
            "SELECT id, started_at, heartbeat_at, connections FROM replicas ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(replica_rows(rows))
    }

    async fn rename_agent(&self, old: Uuid, new: Uuid, audit: NewAudit) -> StoreResult<bool> {
        let _w = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM agents WHERE uid = ?")
            .bind(uid(old))
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() || old == new {
            return Ok(old == new && exists.is_some());
        }
        let taken: Option<i64> = sqlx::query_scalar("SELECT 1 FROM agents WHERE uid = ?")
            .bind(uid(new))
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            // Another agent's record: never overwritten by someone adopting its uid.
            return Ok(false);
        }
        sqlx::query("UPDATE agents SET uid = ?, previous_uid = ? WHERE uid = ?")
            .bind(uid(new))
            .bind(uid(old))
            .bind(uid(old))
            .execute(&mut *tx)
            .await?;
        // Finished commands stay with the old uid: they are history of that identity.
        sqlx::query(
            "UPDATE commands SET agent_uid = ? WHERE agent_uid = ? AND status IN ('queued', 'sent')",
        )
        .bind(uid(new))
        .bind(uid(old))
        .execute(&mut *tx)
        .await?;
        append_audit_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn same_identity(&self, key: &str, id: Uuid, limit: usize) -> StoreResult<Vec<Uuid>> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT uid FROM agents WHERE identity_key = ? AND uid != ? AND replaced_by IS NULL
             ORDER BY last_seen DESC LIMIT ?",
        )
        .bind(key)
        .bind(uid(id))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|u| parse_uuid(u, "agent with the same identity"))
            .collect()
    }

    async fn link_reregistration(
        &self,
        old: Uuid,
        new: Uuid,
        audit: NewAudit,
    ) -> StoreResult<bool> {
        let _w = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let old_free: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM agents WHERE uid = ? AND replaced_by IS NULL")
                .bind(uid(old))
                .fetch_optional(&mut *tx)
                .await?;
        let new_there: Option<i64> = sqlx::query_scalar("SELECT 1 FROM agents WHERE uid = ?")
            .bind(uid(new))
            .fetch_optional(&mut *tx)
            .await?;
        if old_free.is_none() || new_there.is_none() || old == new {
            return Ok(false);
        }
        // Its agent lives on under `new`: this record is offline from now on, not healthy for
        // another heartbeat interval beside its successor.
        sqlx::query("UPDATE agents SET replaced_by = ?, connected = 0, departed = 1 WHERE uid = ?")
            .bind(uid(new))
            .bind(uid(old))
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE agents SET replaces = ? WHERE uid = ?")
            .bind(uid(old))
            .bind(uid(new))
            .execute(&mut *tx)
            .await?;
        append_audit_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn set_label(
        &self,
        id: Uuid,
        key: &str,
        value: Option<&str>,
        audit: NewAudit,
    ) -> StoreResult<Option<AuditRecord>> {
        let _w = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let labels: Option<String> = sqlx::query_scalar("SELECT labels FROM agents WHERE uid = ?")
            .bind(uid(id))
            .fetch_optional(&mut *tx)
            .await?;
        let Some(labels) = labels else {
            return Ok(None);
        };
        let mut labels: std::collections::BTreeMap<String, String> =
            from_json(&labels, &format!("labels of agent {id}"))?;
        match value {
            Some(v) => {
                labels.insert(key.to_string(), v.to_string());
            }
            None => {
                labels.remove(key);
            }
        }
        sqlx::query("UPDATE agents SET labels = ? WHERE uid = ?")
            .bind(to_json(&labels, "labels")?)
            .bind(uid(id))
            .execute(&mut *tx)
            .await?;
        let rec = append_audit_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(Some(rec))
    }

    async fn enqueue(
        &self,
        batch: Option<&Batch>,
        commands: &[Command],
        audit: NewAudit,
    ) -> StoreResult<AuditRecord> {
        let _w = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let rec = append_audit_in(&mut tx, audit).await?;
        if let Some(b) = batch {
            sqlx::query(
                "INSERT INTO batches (id, query, kind, params, created_at, actor, channel, skipped)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(uid(b.id))
            .bind(&b.query)
            .bind(b.kind.as_str())
            .bind(to_json(&b.params, "batch params")?)
            .bind(b.created_at)
            .bind(&b.actor)
            .bind(b.channel.as_str())
            .bind(to_json(&b.skipped, "batch skipped targets")?)
            .execute(&mut *tx)
            .await?;
        }
        for c in commands {
            let mut c = c.clone();
            c.audit_id = Some(rec.id);
            insert_command(&mut tx, &c).await?;
        }
        tx.commit().await?;
        Ok(rec)
    }

    async fn get_command(&self, id: Uuid) -> StoreResult<Option<Command>> {
        let mut conn = self.pool.acquire().await?;
        fetch_command(&mut conn, id).await
    }

    async fn list_commands(&self, f: &CommandFilter) -> StoreResult<Vec<Command>> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM commands WHERE 1 = 1");
        if let Some(a) = f.agent {
            q.push(" AND agent_uid = ").push_bind(uid(a));
        }
        if let Some(s) = f.status {
            q.push(" AND status = ").push_bind(s.as_str());
        }
        if let Some(b) = f.batch {
            q.push(" AND batch_id = ").push_bind(uid(b));
        }
        if let Some(k) = f.kind {
            q.push(" AND kind = ").push_bind(k.as_str());
        }
        if let Some(before) = f.before {
            q.push(" AND id < ").push_bind(uid(before));
        }
        let limit = if f.limit == 0 { DEFAULT_LIMIT } else { f.limit };
        q.push(" ORDER BY id DESC LIMIT ")
            .push_bind(limit_to_db(limit));
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(command_from_row)
            .collect()
    }

    async fn queued_for(&self, agent: Uuid, limit: usize) -> StoreResult<Vec<Command>> {
        sqlx::query(
            "SELECT * FROM commands WHERE agent_uid = ? AND status = 'queued' ORDER BY id LIMIT ?",
        )
        .bind(uid(agent))
        .bind(limit_to_db(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(command_from_row)
        .collect()
    }

    async fn sent_for(&self, agent: Uuid) -> StoreResult<Vec<Command>> {
        sqlx::query("SELECT * FROM commands WHERE agent_uid = ? AND status = 'sent' ORDER BY id")
            .bind(uid(agent))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(command_from_row)
            .collect()
    }

    async fn claim_queued(
        &self,
        agents: &[Uuid],
        per_agent: usize,
        at: Millis,
    ) -> StoreResult<Vec<Command>> {
        if agents.is_empty() || per_agent == 0 {
            return Ok(Vec::new());
        }
        let _w = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let mut out = Vec::new();
        // Well under SQLite's bound-parameter limit per statement.
        for chunk in agents.chunks(CLAIM_CHUNK) {
            let mut q =
                QueryBuilder::<Sqlite>::new("UPDATE commands SET status = 'sent', sent_at = ");
            q.push_bind(at)
                .push(
                    " WHERE id IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER \
                     (PARTITION BY agent_uid ORDER BY id) AS n FROM commands \
                     WHERE status = 'queued' AND expires_at > ",
                )
                .push_bind(at)
                // A claim stamped `at` takes only commands that existed then: one queued while
                // this claim waited for the writer is left for the wake its enqueue sends, so
                // no record is ever sent before it was created.
                .push(" AND created_at <= ")
                .push_bind(at)
                .push(" AND agent_uid IN (");
            let mut list = q.separated(", ");
            for a in chunk {
                list.push_bind(uid(*a));
            }
            q.push(")) WHERE n <= ")
                .push_bind(limit_to_db(per_agent))
                .push(") RETURNING *");
            for row in q.build().fetch_all(&mut *tx).await? {
                out.push(command_from_row(&row)?);
            }
        }
        tx.commit().await?;
        // RETURNING has no defined order; uuid text order is queue order (UUIDv7).
        out.sort_by_key(|c| (c.agent_uid, c.id));
        Ok(out)
    }

    async fn unclaim(&self, claims: &[(Uuid, Millis)]) -> StoreResult<Vec<Uuid>> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let _w = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let mut moved = Vec::new();
        for (id, sent_at) in claims {
            let n = sqlx::query(
                "UPDATE commands SET status = 'queued', sent_at = NULL
                 WHERE id = ? AND status = 'sent' AND sent_at = ?",
            )
            .bind(uid(*id))
            .bind(sent_at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 1 {
                moved.push(*id);
            }
        }
        tx.commit().await?;
        Ok(moved)
    }

    async fn agents_with_queued(
        &self,
        now: Millis,
        created_before: Millis,
        limit: usize,
    ) -> StoreResult<Vec<Uuid>> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT agent_uid FROM commands
             WHERE status = 'queued' AND expires_at > ? AND created_at <= ? LIMIT ?",
        )
        .bind(now)
        .bind(created_before)
        .bind(limit_to_db(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|s| parse_uuid(s, "queued command's agent"))
            .collect()
    }

    async fn batch_counts(&self, batch: Uuid) -> StoreResult<Vec<(CommandStatus, u64)>> {
        let rows = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM commands WHERE batch_id = ? GROUP BY status",
        )
        .bind(uid(batch))
        .fetch_all(&self.pool)
        .await?;
        status_counts(&rows, "batch counts")
    }

    async fn finish_command(
        &self,
        id: Uuid,
        from: &[CommandStatus],
        finish: Finish,
        audit: Option<NewAudit>,
    ) -> StoreResult<Option<Command>> {
        if from.is_empty() {
            return Ok(None);
        }
        let _w = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let mut q = QueryBuilder::<Sqlite>::new("UPDATE commands SET status = ");
        q.push_bind(finish.to.as_str())
            .push(", result = ")
            .push_bind(opt_to_json(&finish.result, "command result")?)
            .push(", error = ")
            .push_bind(finish.error)
            .push(", finished_at = ")
            .push_bind(finish.at)
            .push(" WHERE id = ")
            .push_bind(uid(id))
            .push(" AND status IN (");
        let mut list = q.separated(", ");
        for s in from {
            list.push_bind(s.as_str());
        }
        q.push(")");
        let changed = q.build().execute(&mut *tx).await?.rows_affected();
        if changed != 1 {
            // Dropping the transaction rolls back; nothing was written anyway.
            return Ok(None);
        }
        if let Some(a) = audit {
            append_audit_in(&mut tx, a).await?;
        }
        let cmd = fetch_command(&mut tx, id).await?;
        tx.commit().await?;
        Ok(cmd)
    }

    async fn due_for_expiry(&self, now: Millis, sent_before: Millis) -> StoreResult<Vec<Command>> {
        sqlx::query(
            "SELECT * FROM commands
             WHERE (status = 'queued' AND expires_at <= ?) OR (status = 'sent' AND sent_at <= ?)
             ORDER BY id",
        )
        .bind(now)
        .bind(sent_before)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(command_from_row)
        .collect()
    }

    async fn command_counts(&self) -> StoreResult<Vec<(CommandStatus, u64)>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM commands GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        status_counts(&rows, "command counts")
    }

    async fn get_batch(&self, id: Uuid) -> StoreResult<Option<Batch>> {
        sqlx::query("SELECT * FROM batches WHERE id = ?")
            .bind(uid(id))
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(batch_from_row)
            .transpose()
    }

    async fn append_audit(&self, audit: NewAudit) -> StoreResult<AuditRecord> {
        let _w = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let rec = append_audit_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(rec)
    }

    async fn query_audit(&self, f: &AuditFilter) -> StoreResult<Vec<AuditRecord>> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM audit WHERE 1 = 1");
        if let Some(actor) = &f.actor {
            q.push(" AND actor = ").push_bind(actor.clone());
        }
        if let Some(ch) = f.channel {
            q.push(" AND channel = ").push_bind(ch.as_str());
        }
        if let Some(agent) = &f.agent {
            q.push(" AND id IN (SELECT audit_id FROM audit_targets WHERE target = ")
                .push_bind(agent.clone())
                .push(")");
        }
        if let Some(op) = &f.operation {
            q.push(" AND operation = ").push_bind(op.clone());
        }
        if let Some(since) = f.since {
            q.push(" AND ts >= ").push_bind(since);
        }
        if let Some(until) = f.until {
            q.push(" AND ts <= ").push_bind(until);
        }
        if let Some(before) = f.before_id {
            q.push(" AND id < ").push_bind(before);
        }
        let limit = if f.limit == 0 { DEFAULT_LIMIT } else { f.limit };
        q.push(" ORDER BY id DESC LIMIT ")
            .push_bind(limit_to_db(limit));
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(audit_from_row)
            .collect()
    }

    async fn audit_chain(&self, after: i64, limit: usize) -> StoreResult<Vec<AuditRecord>> {
        sqlx::query("SELECT * FROM audit WHERE id > ? ORDER BY id LIMIT ?")
            .bind(after)
            .bind(limit_to_db(limit))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(audit_from_row)
            .collect()
    }

    async fn audit_records(&self, ids: &[i64]) -> StoreResult<Vec<AuditRecord>> {
        let mut out = Vec::with_capacity(ids.len());
        // Well under SQLite's bound-parameter limit per statement.
        for chunk in ids.chunks(CLAIM_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM audit WHERE id IN (");
            let mut list = q.separated(", ");
            for id in chunk {
                list.push_bind(*id);
            }
            q.push(") ORDER BY id");
            for row in q.build().fetch_all(&self.pool).await? {
                out.push(audit_from_row(&row)?);
            }
        }
        Ok(out)
    }

    fn chat_store(self: Arc<Self>) -> Option<Arc<dyn ChatStore>> {
        Some(self)
    }

    async fn close(&self) {
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint at close failed");
        }
        self.pool.close().await;
    }
}

#[async_trait]
impl ChatStore for SqliteStore {
    async fn chat_put_confirmation(
        &self,
        id: &str,
        body: &str,
        expires_at: Millis,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT OR REPLACE INTO chat_confirmations (id, body, expires_at) VALUES (?, ?, ?)",
        )
        .bind(id)
        .bind(body)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn chat_take_confirmation(&self, id: &str) -> StoreResult<Option<String>> {
        // DELETE ... RETURNING is one statement: a double click cannot take it twice.
        let row: Option<(String,)> =
            sqlx::query_as("DELETE FROM chat_confirmations WHERE id = ? RETURNING body")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(b,)| b))
    }

    async fn chat_expire_confirmations(&self, now: Millis) -> StoreResult<u64> {
        let r = sqlx::query("DELETE FROM chat_confirmations WHERE expires_at <= ?")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    async fn chat_get_thread(&self, key: &str) -> StoreResult<Option<String>> {
        let row: Option<(String,)> = sqlx::query_as("SELECT body FROM chat_threads WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(b,)| b))
    }

    async fn chat_put_thread(&self, key: &str, body: &str, last_used: Millis) -> StoreResult<()> {
        sqlx::query("INSERT OR REPLACE INTO chat_threads (key, body, last_used) VALUES (?, ?, ?)")
            .bind(key)
            .bind(body)
            .bind(last_used)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn chat_take_idle_threads(&self, before: Millis) -> StoreResult<Vec<(String, String)>> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("DELETE FROM chat_threads WHERE last_used < ? RETURNING key, body")
                .bind(before)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows)
    }

    async fn chat_first_delivery(
        &self,
        id: &str,
        now: Millis,
        forget_before: Millis,
    ) -> StoreResult<bool> {
        sqlx::query("DELETE FROM chat_deliveries WHERE seen_at < ?")
            .bind(forget_before)
            .execute(&self.pool)
            .await?;
        let r = sqlx::query("INSERT OR IGNORE INTO chat_deliveries (id, seen_at) VALUES (?, ?)")
            .bind(id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn chat_put_subscription(
        &self,
        sub: &ChatSubscriptionRow,
        audit: NewAudit,
    ) -> StoreResult<AuditRecord> {
        let _w = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT OR REPLACE INTO chat_subscriptions
             (id, platform, workspace, channel, body, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&sub.id)
        .bind(&sub.platform)
        .bind(&sub.workspace)
        .bind(&sub.channel)
        .bind(&sub.body)
        .bind(sub.created_at)
        .execute(&mut *tx)
        .await?;
        let rec = append_audit_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(rec)
    }

    async fn chat_list_subscriptions(&self) -> StoreResult<Vec<String>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT body FROM chat_subscriptions ORDER BY created_at, id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|(b,)| b).collect())
    }

    async fn chat_remove_subscription(
        &self,
        id: &str,
        (platform, workspace, channel): (&str, &str, &str),
        audit: NewAudit,
    ) -> StoreResult<Option<String>> {
        let _w = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let row: Option<(String,)> = sqlx::query_as(
            "DELETE FROM chat_subscriptions
             WHERE id = ? AND platform = ? AND workspace = ? AND channel = ? RETURNING body",
        )
        .bind(id)
        .bind(platform)
        .bind(workspace)
        .bind(channel)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((body,)) = row else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM chat_mutes WHERE subscription = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        append_audit_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(Some(body))
    }

    async fn chat_mute(
        &self,
        subscription: &str,
        agent: &str,
        until: Millis,
        audit: NewAudit,
    ) -> StoreResult<bool> {
        let _w = self.writer.lock().await;
        let mut tx = self.begin_write().await?;
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM chat_subscriptions WHERE id = ?")
                .bind(subscription)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_none() {
            return Ok(false);
        }
        sqlx::query(
            "INSERT OR REPLACE INTO chat_mutes (subscription, agent, until) VALUES (?, ?, ?)",
        )
        .bind(subscription)
        .bind(agent)
        .bind(until)
        .execute(&mut *tx)
        .await?;
        append_audit_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn chat_mutes(&self, now: Millis) -> StoreResult<Vec<(String, String, Millis)>> {
        sqlx::query("DELETE FROM chat_mutes WHERE until <= ?")
            .bind(now)
            .execute(&self.pool)
            .await?;
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT subscription, agent, until FROM chat_mutes")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The migration's backfill computes the same key as `Agent::identity_key`. (PostgreSQL
    /// has no backfill: it never held agents before that version.)
    #[tokio::test]
    async fn identity_backfill_matches_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).await.unwrap();
        let mut old = Agent::new(Uuid::now_v7(), 1, 30);
        old.identifying = vec![("service.instance.id".into(), "node-7".into())];
        old.non_identifying = vec![("hostname".into(), "node-7".into())];
        s.put_agent(&old).await.unwrap();
        let mut other_host = old.clone();
        other_host.uid = Uuid::now_v7();
        other_host.non_identifying = vec![("hostname".into(), "node-8".into())];
        s.put_agent(&other_host).await.unwrap();
        let mut new = Agent::new(Uuid::now_v7(), 1, 30);
        new.non_identifying = vec![("hostname".into(), "node-9".into())];
        s.put_agent(&new).await.unwrap();
        let mut hosts = Agent::new(Uuid::now_v7(), 1, 30);
        hosts.identifying = vec![("service.instance.id".into(), "i-9".into())];
        hosts.non_identifying = vec![
            ("hostname".into(), "short".into()),
            ("host.name".into(), "long.example".into()),
        ];
        s.put_agent(&hosts).await.unwrap();
        sqlx::query("UPDATE agents SET identity_key = NULL")
            .execute(s.pool())
            .await
            .unwrap();
        let backfill = MIGRATIONS
            .iter()
            .find(|m| m.version == 2)
            .unwrap()
            .sqlite
            .last()
            .unwrap();
        sqlx::query(backfill).execute(s.pool()).await.unwrap();
        for a in [&old, &new, &other_host, &hosts] {
            let key: Option<String> =
                sqlx::query_scalar("SELECT identity_key FROM agents WHERE uid = ?")
                    .bind(a.uid.to_string())
                    .fetch_one(s.pool())
                    .await
                    .unwrap();
            assert_eq!(key, a.identity_key(), "{}", a.uid);
        }
    }

    #[tokio::test]
    async fn the_database_file_is_in_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        SqliteStore::open(dir.path()).await.unwrap().close().await;
        assert!(dir.path().join(DB_FILE).exists());
    }
}
