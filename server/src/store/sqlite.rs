//! SQLite backend of [`Store`]: one `flotilla.db` file in WAL mode, via sqlx runtime queries.
//!
//! Scalars that callers filter or sort on have their own columns; nested structures are JSON
//! text. UUIDs are stored as canonical hyphenated lowercase text, so text order is uuid order
//! (and, for UUIDv7 command ids, creation order). u64 values are stored bit-cast to i64, which
//! round-trips exactly. All writes go through one in-process mutex plus `BEGIN IMMEDIATE`, so
//! SQLite's single writer never makes us see `SQLITE_BUSY` from our own pool.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{ChatStore, ChatSubscriptionRow, Finish, Store, StoreError, StoreResult, Touch};
use crate::audit;
use crate::model::{
    now_ms, Agent, AuditFilter, AuditRecord, Batch, Channel, Command, CommandFilter, CommandKind,
    CommandStatus, DesiredConfig, Millis, NewAudit, Transport,
};

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "flotilla.db";

/// Default page size when a filter says `limit: 0`.
const DEFAULT_LIMIT: usize = 100;

/// Agents per claim statement (one bound parameter each).
const CLAIM_CHUNK: usize = 500;

/// Versioned schema changes, applied in order at open. Never edit a shipped entry: append.
const MIGRATIONS: &[(i64, &[&str])] = &[
    (
        1,
        &[
            "CREATE TABLE agents (
            uid TEXT PRIMARY KEY NOT NULL,
            identifying TEXT NOT NULL,
            non_identifying TEXT NOT NULL,
            capabilities INTEGER NOT NULL,
            custom_capabilities TEXT NOT NULL,
            health TEXT,
            effective_config TEXT,
            remote_config_status TEXT,
            desired_config TEXT,
            labels TEXT NOT NULL,
            transport TEXT,
            remote_addr TEXT,
            first_seen INTEGER NOT NULL,
            last_seen INTEGER NOT NULL,
            connected INTEGER NOT NULL,
            sequence_num INTEGER NOT NULL,
            heartbeat_interval_s INTEGER NOT NULL,
            previous_uid TEXT
        )",
            "CREATE TABLE batches (
            id TEXT PRIMARY KEY NOT NULL,
            query TEXT NOT NULL,
            kind TEXT NOT NULL,
            params TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            actor TEXT NOT NULL,
            channel TEXT NOT NULL,
            skipped TEXT NOT NULL
        )",
            "CREATE TABLE commands (
            id TEXT PRIMARY KEY NOT NULL,
            agent_uid TEXT NOT NULL,
            batch_id TEXT REFERENCES batches(id),
            kind TEXT NOT NULL,
            params TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            sent_at INTEGER,
            finished_at INTEGER,
            expires_at INTEGER NOT NULL,
            result TEXT,
            error TEXT,
            actor TEXT NOT NULL,
            channel TEXT NOT NULL,
            audit_id INTEGER
        )",
            "CREATE INDEX commands_agent_status ON commands(agent_uid, status, id)",
            "CREATE INDEX commands_status_expires ON commands(status, expires_at)",
            "CREATE INDEX commands_status_sent ON commands(status, sent_at)",
            "CREATE INDEX commands_batch ON commands(batch_id, id)",
            "CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts INTEGER NOT NULL,
            actor TEXT NOT NULL,
            channel TEXT NOT NULL,
            operation TEXT NOT NULL,
            targets TEXT NOT NULL,
            params TEXT NOT NULL,
            outcome TEXT NOT NULL,
            ref_id INTEGER,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )",
            "CREATE INDEX audit_actor ON audit(actor, id)",
            "CREATE INDEX audit_operation ON audit(operation, id)",
            "CREATE INDEX audit_channel ON audit(channel, id)",
            "CREATE INDEX audit_ts ON audit(ts)",
            // Denormalised copy of audit.targets for indexed "records about agent X" queries.
            // The hash covers audit.targets only; this table is an index, not evidence.
            // CASCADE so deleting an audit row (tampering, or a future retention job) still works.
            "CREATE TABLE audit_targets (
            target TEXT NOT NULL,
            audit_id INTEGER NOT NULL REFERENCES audit(id) ON DELETE CASCADE,
            PRIMARY KEY (target, audit_id)
        ) WITHOUT ROWID",
            "CREATE INDEX audit_targets_audit ON audit_targets(audit_id)",
        ],
    ),
    (
        2,
        &[
            // Re-registration: agents that make up a new uid on every start are linked to their
            // earlier record by `service.instance.id` + host (see `Agent::identity_key`).
            "ALTER TABLE agents ADD COLUMN identity_key TEXT",
            "ALTER TABLE agents ADD COLUMN replaces TEXT",
            "ALTER TABLE agents ADD COLUMN replaced_by TEXT",
            "CREATE INDEX agents_identity ON agents(identity_key, last_seen)",
            // Backfill exactly as `Agent::identity_key` computes it (attributes are JSON arrays
            // of [key, value], identifying ones first; host.name before hostname; empty values
            // give no key), so records from before the upgrade are candidates too.
            "UPDATE agents SET identity_key = (
                SELECT inst || char(0) || host FROM (SELECT
                    COALESCE((SELECT j.value ->> 1 FROM json_each(agents.identifying) j WHERE j.value ->> 0 = 'service.instance.id' LIMIT 1), (SELECT j.value ->> 1 FROM json_each(agents.non_identifying) j WHERE j.value ->> 0 = 'service.instance.id' LIMIT 1)) AS inst,
                    COALESCE((SELECT j.value ->> 1 FROM json_each(agents.identifying) j WHERE j.value ->> 0 = 'host.name' LIMIT 1), (SELECT j.value ->> 1 FROM json_each(agents.non_identifying) j WHERE j.value ->> 0 = 'host.name' LIMIT 1), (SELECT j.value ->> 1 FROM json_each(agents.identifying) j WHERE j.value ->> 0 = 'hostname' LIMIT 1), (SELECT j.value ->> 1 FROM json_each(agents.non_identifying) j WHERE j.value ->> 0 = 'hostname' LIMIT 1)) AS host)
                WHERE inst <> '' AND host <> ''
            )",
        ],
    ),
    (
        3,
        &[
            // Liveness comes from when an agent was last heard, not from its transport: only
            // a goodbye (`agent_disconnect`) or a re-registration makes it offline at once.
            // Existing records start as not departed, so they age out like any other.
            "ALTER TABLE agents ADD COLUMN departed INTEGER NOT NULL DEFAULT 0",
        ],
    ),
    (
        4,
        &[
            // The chat gateways' state (see `ChatStore`): bodies are the chat crate's JSON.
            "CREATE TABLE chat_confirmations (
            id TEXT PRIMARY KEY NOT NULL,
            body TEXT NOT NULL,
            expires_at INTEGER NOT NULL
        )",
            "CREATE TABLE chat_threads (
            key TEXT PRIMARY KEY NOT NULL,
            body TEXT NOT NULL,
            last_used INTEGER NOT NULL
        )",
            "CREATE INDEX chat_threads_last_used ON chat_threads(last_used)",
            "CREATE TABLE chat_deliveries (
            id TEXT PRIMARY KEY NOT NULL,
            seen_at INTEGER NOT NULL
        )",
        ],
    ),
    (
        5,
        &[
            // Fleet-alert subscriptions of chat channels (body: the chat crate's JSON) and the
            // agents muted per subscription (the alert's Mute button).
            "CREATE TABLE chat_subscriptions (
            id TEXT PRIMARY KEY NOT NULL,
            platform TEXT NOT NULL,
            workspace TEXT NOT NULL,
            channel TEXT NOT NULL,
            body TEXT NOT NULL,
            created_at INTEGER NOT NULL
        )",
            "CREATE TABLE chat_mutes (
            subscription TEXT NOT NULL,
            agent TEXT NOT NULL,
            until INTEGER NOT NULL,
            PRIMARY KEY (subscription, agent)
        ) WITHOUT ROWID",
        ],
    ),
];

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
    let latest = MIGRATIONS.last().map(|(v, _)| *v).unwrap_or(0);
    if current > latest {
        return Err(StoreError::Corrupt(format!(
            "database schema version {current} is newer than this server supports ({latest})"
        )));
    }
    for (version, statements) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        for sql in *statements {
            sqlx::query(sql).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)")
            .bind(version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

// ---- encoding helpers ----

fn uid(u: Uuid) -> String {
    u.hyphenated().to_string()
}

fn opt_uid(u: Option<Uuid>) -> Option<String> {
    u.map(uid)
}

/// Bit-cast so values above `i64::MAX` round-trip exactly through an INTEGER column.
fn u64_to_db(v: u64) -> i64 {
    v as i64
}

fn u64_from_db(v: i64) -> u64 {
    v as u64
}

fn limit_to_db(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn to_json<T: Serialize + ?Sized>(v: &T, what: &str) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("cannot encode {what}: {e}")))
}

fn opt_to_json<T: Serialize>(v: &Option<T>, what: &str) -> StoreResult<Option<String>> {
    v.as_ref().map(|v| to_json(v, what)).transpose()
}

fn from_json<T: DeserializeOwned>(s: &str, what: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("bad JSON in {what}: {e}")))
}

fn opt_from_json<T: DeserializeOwned>(s: Option<String>, what: &str) -> StoreResult<Option<T>> {
    s.map(|s| from_json(&s, what)).transpose()
}

fn parse_uuid(s: &str, what: &str) -> StoreResult<Uuid> {
    Uuid::from_str(s).map_err(|e| StoreError::Corrupt(format!("bad uuid in {what}: {s:?}: {e}")))
}

fn opt_parse_uuid(s: Option<String>, what: &str) -> StoreResult<Option<Uuid>> {
    s.map(|s| parse_uuid(&s, what)).transpose()
}

fn parse_channel(s: &str, what: &str) -> StoreResult<Channel> {
    Channel::parse(s).ok_or_else(|| StoreError::Corrupt(format!("bad channel in {what}: {s:?}")))
}

fn parse_kind(s: &str, what: &str) -> StoreResult<CommandKind> {
    CommandKind::parse(s)
        .ok_or_else(|| StoreError::Corrupt(format!("bad command kind in {what}: {s:?}")))
}

fn parse_status(s: &str, what: &str) -> StoreResult<CommandStatus> {
    CommandStatus::parse(s)
        .ok_or_else(|| StoreError::Corrupt(format!("bad command status in {what}: {s:?}")))
}

fn parse_transport(s: Option<String>, what: &str) -> StoreResult<Option<Transport>> {
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
        })
    }
}

fn agent_from_row(row: &SqliteRow) -> StoreResult<Agent> {
    let uid_s: String = row.try_get("uid")?;
    let what = format!("agent {uid_s}");
    Ok(Agent {
        uid: parse_uuid(&uid_s, &what)?,
        identifying: from_json(&row.try_get::<String, _>("identifying")?, &what)?,
        non_identifying: from_json(&row.try_get::<String, _>("non_identifying")?, &what)?,
        capabilities: u64_from_db(row.try_get("capabilities")?),
        custom_capabilities: from_json(&row.try_get::<String, _>("custom_capabilities")?, &what)?,
        health: opt_from_json(row.try_get("health")?, &what)?,
        effective_config: opt_from_json(row.try_get("effective_config")?, &what)?,
        remote_config_status: opt_from_json(row.try_get("remote_config_status")?, &what)?,
        desired_config: opt_from_json(row.try_get("desired_config")?, &what)?,
        labels: from_json(&row.try_get::<String, _>("labels")?, &what)?,
        transport: parse_transport(row.try_get("transport")?, &what)?,
        remote_addr: row.try_get("remote_addr")?,
        first_seen: row.try_get("first_seen")?,
        last_seen: row.try_get("last_seen")?,
        connected: row.try_get("connected")?,
        sequence_num: u64_from_db(row.try_get("sequence_num")?),
        heartbeat_interval_s: u64_from_db(row.try_get("heartbeat_interval_s")?),
        previous_uid: opt_parse_uuid(row.try_get("previous_uid")?, &what)?,
        replaces: opt_parse_uuid(row.try_get("replaces")?, &what)?,
        replaced_by: opt_parse_uuid(row.try_get("replaced_by")?, &what)?,
        departed: row.try_get("departed")?,
    })
}

fn command_from_row(row: &SqliteRow) -> StoreResult<Command> {
    let id_s: String = row.try_get("id")?;
    let what = format!("command {id_s}");
    Ok(Command {
        id: parse_uuid(&id_s, &what)?,
        agent_uid: parse_uuid(&row.try_get::<String, _>("agent_uid")?, &what)?,
        batch_id: opt_parse_uuid(row.try_get("batch_id")?, &what)?,
        kind: parse_kind(&row.try_get::<String, _>("kind")?, &what)?,
        params: from_json(&row.try_get::<String, _>("params")?, &what)?,
        status: parse_status(&row.try_get::<String, _>("status")?, &what)?,
        created_at: row.try_get("created_at")?,
        sent_at: row.try_get("sent_at")?,
        finished_at: row.try_get("finished_at")?,
        expires_at: row.try_get("expires_at")?,
        result: opt_from_json(row.try_get("result")?, &what)?,
        error: row.try_get("error")?,
        actor: row.try_get("actor")?,
        channel: parse_channel(&row.try_get::<String, _>("channel")?, &what)?,
        audit_id: row.try_get("audit_id")?,
    })
}

/// `(status, n)` rows as a count for every status, zeros included, so metric series and
/// progress keys do not vanish.
fn status_counts(rows: &[SqliteRow], what: &str) -> StoreResult<Vec<(CommandStatus, u64)>> {
    let mut counts: Vec<(CommandStatus, u64)> =
        CommandStatus::ALL.iter().map(|s| (*s, 0)).collect();
    for row in rows {
        let status = parse_status(&row.try_get::<String, _>("status")?, what)?;
        let n: i64 = row.try_get("n")?;
        if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == status) {
            slot.1 = u64::try_from(n).unwrap_or(0);
        }
    }
    Ok(counts)
}

fn batch_from_row(row: &SqliteRow) -> StoreResult<Batch> {
    let id_s: String = row.try_get("id")?;
    let what = format!("batch {id_s}");
    Ok(Batch {
        id: parse_uuid(&id_s, &what)?,
        query: row.try_get("query")?,
        kind: parse_kind(&row.try_get::<String, _>("kind")?, &what)?,
        params: from_json(&row.try_get::<String, _>("params")?, &what)?,
        created_at: row.try_get("created_at")?,
        actor: row.try_get("actor")?,
        channel: parse_channel(&row.try_get::<String, _>("channel")?, &what)?,
        skipped: from_json(&row.try_get::<String, _>("skipped")?, &what)?,
    })
}

fn audit_from_row(row: &SqliteRow) -> StoreResult<AuditRecord> {
    let id: i64 = row.try_get("id")?;
    let what = format!("audit record {id}");
    Ok(AuditRecord {
        id,
        ts: row.try_get("ts")?,
        actor: row.try_get("actor")?,
        channel: parse_channel(&row.try_get::<String, _>("channel")?, &what)?,
        operation: row.try_get("operation")?,
        targets: from_json(&row.try_get::<String, _>("targets")?, &what)?,
        params: from_json(&row.try_get::<String, _>("params")?, &what)?,
        outcome: row.try_get("outcome")?,
        ref_id: row.try_get("ref_id")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
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
                departed)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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
                departed = excluded.departed",
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
                || departed || ']',
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
                last_seen = CASE WHEN ? THEN MAX(last_seen, ?) ELSE last_seen END
             WHERE uid = ? AND (? OR last_seen <= ?)",
        )
        .bind(connected)
        .bind(connected)
        .bind(transport.map(Transport::as_str))
        .bind(remote_addr)
        .bind(connected)
        .bind(at)
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
    use std::collections::BTreeMap;

    use super::*;
    use crate::audit::{verify, VerifyError};
    use crate::model::{Caller, ConfigFile, Health, RemoteConfigState, Role, SkippedTarget};

    async fn open() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        (dir, store)
    }

    fn alice() -> Caller {
        Caller {
            actor: "alice".into(),
            channel: Channel::Rest,
            role: Role::Operator,
        }
    }

    fn full_agent() -> Agent {
        let mut components = BTreeMap::new();
        components.insert(
            "pipeline:in".to_string(),
            Health {
                healthy: false,
                last_error: "boom".into(),
                status_time_unix_nano: u64::MAX,
                ..Health::default()
            },
        );
        let mut files = BTreeMap::new();
        files.insert(
            "fluent-bit.conf".to_string(),
            ConfigFile {
                content_type: "text/plain".into(),
                body: "[INPUT]\n  Name cpu\n".into(),
                encoding: None,
            },
        );
        files.insert(
            "blob".to_string(),
            ConfigFile {
                content_type: "application/octet-stream".into(),
                body: "AAEC".into(),
                encoding: Some("base64".into()),
            },
        );
        Agent {
            uid: Uuid::now_v7(),
            identifying: vec![
                ("service.name".into(), "fluent-bit".into()),
                ("host.name".into(), "web-1".into()),
            ],
            non_identifying: vec![("os.type".into(), "linux".into())],
            capabilities: u64::MAX,
            custom_capabilities: vec!["io.fluent.chatops".into()],
            health: Some(Health {
                healthy: true,
                start_time_unix_nano: 1_700_000_000_000_000_000,
                last_error: String::new(),
                status: "running".into(),
                status_time_unix_nano: 42,
                components,
                attributes: [("k".to_string(), "v".to_string())].into(),
            }),
            effective_config: Some(files.clone()),
            remote_config_status: Some(RemoteConfigState {
                hash: "ab".repeat(32),
                status: "failed".into(),
                error: "bad config".into(),
            }),
            desired_config: Some(DesiredConfig {
                hash: "cd".repeat(32),
                files,
                command_id: Some(Uuid::now_v7()),
            }),
            labels: [("env".to_string(), "prod".to_string())].into(),
            transport: Some(Transport::Websocket),
            remote_addr: Some("10.0.0.1:5555".into()),
            first_seen: 1000,
            last_seen: 2000,
            connected: true,
            sequence_num: u64::MAX,
            heartbeat_interval_s: 30,
            previous_uid: Some(Uuid::now_v7()),
            replaces: None,
            replaced_by: None,
            departed: true,
        }
    }

    fn cmd(agent: Uuid, created_at: Millis, expires_at: Millis) -> Command {
        Command {
            id: Uuid::now_v7(),
            agent_uid: agent,
            batch_id: None,
            kind: CommandKind::Restart,
            params: serde_json::json!({"reason": "test"}),
            status: CommandStatus::Queued,
            created_at,
            sent_at: None,
            finished_at: None,
            expires_at,
            result: None,
            error: None,
            actor: "alice".into(),
            channel: Channel::Rest,
            audit_id: None,
        }
    }

    /// Marks one given command sent, as a claim of it would (claims pick the oldest).
    async fn mark_sent(s: &SqliteStore, id: Uuid, at: Millis) -> bool {
        sqlx::query(
            "UPDATE commands SET status = 'sent', sent_at = ? WHERE id = ? AND status = 'queued'",
        )
        .bind(at)
        .bind(uid(id))
        .execute(s.pool())
        .await
        .unwrap()
        .rows_affected()
            == 1
    }

    fn op(operation: &str, targets: &[Uuid]) -> NewAudit {
        let mut a = NewAudit::new(&alice(), operation);
        a.targets = targets.iter().map(|t| t.to_string()).collect();
        a
    }

    fn finish(to: CommandStatus) -> Finish {
        Finish {
            to,
            result: Some(serde_json::json!({"exit": 0})),
            error: None,
            at: 5000,
        }
    }

    #[tokio::test]
    async fn agent_round_trips_every_field() {
        let (_d, s) = open().await;
        let a = full_agent();
        s.put_agent(&a).await.unwrap();
        assert_eq!(s.get_agent(a.uid).await.unwrap(), Some(a.clone()));
        // An update rewrites what the agent reports but keeps the server-owned fields
        // (labels, desired config), the first sighting and the known previous uid.
        let mut b = Agent::new(a.uid, 7, 60);
        b.sequence_num = (i64::MAX as u64) + 1;
        s.put_agent(&b).await.unwrap();
        let mut expect = b.clone();
        expect.labels = a.labels.clone();
        expect.desired_config = a.desired_config.clone();
        expect.first_seen = 7;
        expect.previous_uid = a.previous_uid;
        assert_eq!(s.get_agent(a.uid).await.unwrap(), Some(expect));
        assert_eq!(s.list_agents(None, 10).await.unwrap().len(), 1);

        s.set_desired_config(a.uid, None).await.unwrap();
        assert_eq!(
            s.get_agent(a.uid).await.unwrap().unwrap().desired_config,
            None
        );
        s.set_desired_config(a.uid, a.desired_config.as_ref())
            .await
            .unwrap();
        assert_eq!(
            s.get_agent(a.uid).await.unwrap().unwrap().desired_config,
            a.desired_config
        );
        assert_eq!(s.get_agent(Uuid::now_v7()).await.unwrap(), None);
    }

    #[tokio::test]
    async fn list_agents_pages_in_uid_order() {
        let (_d, s) = open().await;
        let mut uids: Vec<Uuid> = (0..7).map(|_| Uuid::new_v4()).collect();
        for u in &uids {
            s.put_agent(&Agent::new(*u, 1, 30)).await.unwrap();
        }
        uids.sort();
        // The brief listing, built as one JSON array per page, must cut the same pages.
        for brief in [false, true] {
            let mut seen = Vec::new();
            let mut after = None;
            loop {
                let page = if brief {
                    s.list_agents_brief(after, 3).await.unwrap()
                } else {
                    s.list_agents(after, 3).await.unwrap()
                };
                if page.is_empty() {
                    break;
                }
                assert!(page.len() <= 3);
                after = page.last().map(|a| a.uid);
                seen.extend(page.into_iter().map(|a| a.uid));
            }
            assert_eq!(seen, uids, "brief: {brief}");
        }
    }

    #[tokio::test]
    async fn brief_listing_is_the_record_without_config_bodies() {
        let (_d, s) = open().await;
        let a = full_agent();
        s.put_agent(&a).await.unwrap();
        let brief = s.list_agents_brief(None, 10).await.unwrap();
        let mut expect = a.clone();
        expect.effective_config = None;
        expect.desired_config = None;
        assert_eq!(brief, vec![expect]);
        assert_eq!(s.list_agents(None, 10).await.unwrap(), vec![a]);
    }

    #[tokio::test]
    async fn a_corrupt_record_fails_a_brief_page_loudly() {
        let (_d, s) = open().await;
        for _ in 0..3 {
            s.put_agent(&Agent::new(Uuid::now_v7(), 1, 30))
                .await
                .unwrap();
        }
        sqlx::query("UPDATE agents SET labels = '{not json' WHERE rowid = 2")
            .execute(s.pool())
            .await
            .unwrap();
        let err = s.list_agents_brief(None, 10).await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    }

    #[tokio::test]
    async fn touches_span_several_statement_chunks() {
        let (_d, s) = open().await;
        let agents: Vec<Agent> = (0..4100)
            .map(|_| Agent::new(Uuid::now_v7(), 100, 30))
            .collect();
        for a in &agents {
            s.put_agent(a).await.unwrap();
        }
        let touches: Vec<Touch> = agents
            .iter()
            .enumerate()
            .map(|(i, a)| Touch {
                uid: a.uid,
                last_seen: 1_000 + i as i64,
                sequence_num: i as u64 + 7,
                heartbeat_interval_s: None,
            })
            .collect();
        s.touch_agents(&touches).await.unwrap();
        for i in [0usize, 1999, 2000, 4099] {
            let got = s.get_agent(agents[i].uid).await.unwrap().unwrap();
            assert_eq!(
                (got.last_seen, got.sequence_num),
                (1_000 + i as i64, i as u64 + 7)
            );
        }
    }

    #[tokio::test]
    async fn touch_and_connection_state() {
        let (_d, s) = open().await;
        let a = Agent::new(Uuid::now_v7(), 100, 30);
        let b = Agent::new(Uuid::now_v7(), 100, 30);
        s.put_agent(&a).await.unwrap();
        s.put_agent(&b).await.unwrap();
        s.touch_agents(&[
            Touch {
                uid: a.uid,
                last_seen: 500,
                sequence_num: u64::MAX,
                heartbeat_interval_s: None,
            },
            Touch {
                uid: b.uid,
                last_seen: 600,
                sequence_num: 9,
                heartbeat_interval_s: Some(7),
            },
            // Unknown agents are ignored, not an error.
            Touch {
                uid: Uuid::now_v7(),
                last_seen: 1,
                sequence_num: 1,
                heartbeat_interval_s: None,
            },
        ])
        .await
        .unwrap();
        let got = s.get_agent(a.uid).await.unwrap().unwrap();
        assert_eq!(
            (got.last_seen, got.sequence_num, got.heartbeat_interval_s),
            (500, u64::MAX, 30),
            "no learnt interval: the stored one stays"
        );
        let got = s.get_agent(b.uid).await.unwrap().unwrap();
        assert_eq!(
            (got.last_seen, got.sequence_num, got.heartbeat_interval_s),
            (600, 9, 7)
        );
        // A stale touch does not roll the record back.
        s.touch_agents(&[Touch {
            uid: b.uid,
            last_seen: 550,
            sequence_num: 8,
            heartbeat_interval_s: Some(99),
        }])
        .await
        .unwrap();
        let got = s.get_agent(b.uid).await.unwrap().unwrap();
        assert_eq!(
            (got.last_seen, got.sequence_num, got.heartbeat_interval_s),
            (600, 9, 7)
        );

        s.set_connected(
            a.uid,
            true,
            Some(Transport::Http),
            Some("1.2.3.4:1".into()),
            700,
        )
        .await
        .unwrap();
        let got = s.get_agent(a.uid).await.unwrap().unwrap();
        assert!(got.connected);
        assert_eq!(got.transport, Some(Transport::Http));
        assert_eq!(got.remote_addr.as_deref(), Some("1.2.3.4:1"));
        assert_eq!(got.last_seen, 700);
        s.set_connected(a.uid, false, None, None, 800)
            .await
            .unwrap();
        let got = s.get_agent(a.uid).await.unwrap().unwrap();
        assert!(!got.connected);
        assert_eq!(got.transport, Some(Transport::Http));
        assert_eq!(got.last_seen, 700);

        // A goodbye is undone by the next sign of life, and only by that.
        let mut gone = s.get_agent(a.uid).await.unwrap().unwrap();
        gone.departed = true;
        s.put_agent(&gone).await.unwrap();
        s.mark_all_disconnected(850).await.unwrap();
        assert!(s.get_agent(a.uid).await.unwrap().unwrap().departed);
        s.set_connected(a.uid, true, None, None, 900).await.unwrap();
        assert!(!s.get_agent(a.uid).await.unwrap().unwrap().departed);
        s.set_connected(b.uid, true, None, None, 900).await.unwrap();
        // The goodbye of a connection that last heard the agent before its newest message
        // (it is back on another one) is not written.
        s.set_connected(a.uid, false, None, None, 850)
            .await
            .unwrap();
        assert!(s.get_agent(a.uid).await.unwrap().unwrap().connected);
        assert_eq!(s.mark_all_disconnected(1000).await.unwrap(), 2);
        assert_eq!(s.mark_all_disconnected(1000).await.unwrap(), 0);
        for u in [a.uid, b.uid] {
            assert!(!s.get_agent(u).await.unwrap().unwrap().connected);
        }
    }

    #[tokio::test]
    async fn rename_moves_record_and_pending_commands() {
        let (_d, s) = open().await;
        let mut a = full_agent();
        a.previous_uid = None;
        s.put_agent(&a).await.unwrap();
        let new = Uuid::now_v7();
        // Another agent's record under the new uid is never overwritten: refused, both kept.
        let other_agent = Agent::new(Uuid::now_v7(), 1, 1);
        s.put_agent(&other_agent).await.unwrap();
        assert!(!s
            .rename_agent(a.uid, other_agent.uid, op("agent.rename", &[a.uid]))
            .await
            .unwrap());
        assert_eq!(
            s.get_agent(other_agent.uid).await.unwrap(),
            Some(other_agent.clone())
        );
        assert!(s.get_agent(a.uid).await.unwrap().is_some());
        let queued = cmd(a.uid, 10, 10_000);
        let sent = cmd(a.uid, 11, 10_000);
        let done = cmd(a.uid, 12, 10_000);
        let other = cmd(Uuid::now_v7(), 13, 10_000);
        s.enqueue(
            None,
            &[queued.clone(), sent.clone(), done.clone(), other.clone()],
            op("command.restart", &[a.uid]),
        )
        .await
        .unwrap();
        assert!(mark_sent(&s, sent.id, 20).await);
        assert!(s
            .finish_command(
                done.id,
                &[CommandStatus::Queued],
                finish(CommandStatus::Succeeded),
                None
            )
            .await
            .unwrap()
            .is_some());

        let audit_before = s.audit_chain(0, 100).await.unwrap().len();
        assert!(s
            .rename_agent(a.uid, new, op("agent.rename", &[a.uid, new]))
            .await
            .unwrap());
        let chain = s.audit_chain(0, 100).await.unwrap();
        assert_eq!(chain.len(), audit_before + 1, "the rename is audited");
        assert_eq!(chain.last().unwrap().operation, "agent.rename");
        assert_eq!(s.get_agent(a.uid).await.unwrap(), None);
        let moved = s.get_agent(new).await.unwrap().unwrap();
        let mut expect = a.clone();
        expect.uid = new;
        expect.previous_uid = Some(a.uid);
        assert_eq!(moved, expect);
        assert_eq!(s.list_agents(None, 10).await.unwrap().len(), 2);

        let q: Vec<Uuid> = s
            .queued_for(new, 10)
            .await
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(q, vec![queued.id]);
        let q: Vec<Uuid> = s
            .sent_for(new)
            .await
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(q, vec![sent.id]);
        assert!(s.queued_for(a.uid, 10).await.unwrap().is_empty());
        let d = s.get_command(done.id).await.unwrap().unwrap();
        assert_eq!(d.agent_uid, a.uid);
        assert_eq!(
            s.get_command(other.id).await.unwrap().unwrap().agent_uid,
            other.agent_uid
        );

        assert!(!s
            .rename_agent(Uuid::now_v7(), Uuid::now_v7(), op("agent.rename", &[]))
            .await
            .unwrap());
        assert!(s
            .rename_agent(new, new, op("agent.rename", &[]))
            .await
            .unwrap());
        assert!(s.get_agent(new).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn reregistrations_are_found_by_identity_and_linked_once() {
        let (_d, s) = open().await;
        let mut old = Agent::new(Uuid::now_v7(), 1, 30);
        old.identifying = vec![("service.instance.id".into(), "node-7".into())];
        old.non_identifying = vec![("hostname".into(), "node-7".into())];
        old.connected = true;
        s.put_agent(&old).await.unwrap();
        let mut other_host = old.clone();
        other_host.uid = Uuid::now_v7();
        other_host.non_identifying = vec![("hostname".into(), "node-8".into())];
        s.put_agent(&other_host).await.unwrap();
        let mut new = old.clone();
        new.uid = Uuid::now_v7();
        new.last_seen = 2;
        s.put_agent(&new).await.unwrap();
        let key = new.identity_key().unwrap();
        assert_eq!(
            s.same_identity(&key, new.uid, 4).await.unwrap(),
            vec![old.uid]
        );
        assert!(s
            .link_reregistration(
                old.uid,
                new.uid,
                op("agent.reregistered", &[old.uid, new.uid])
            )
            .await
            .unwrap());
        let o = s.get_agent(old.uid).await.unwrap().unwrap();
        assert_eq!(
            (o.replaced_by, o.connected, o.departed),
            (Some(new.uid), false, true)
        );
        assert_eq!(
            s.get_agent(new.uid).await.unwrap().unwrap().replaces,
            Some(old.uid)
        );
        // Replaced records are not candidates again, and a second link is refused.
        assert!(s.same_identity(&key, new.uid, 4).await.unwrap().is_empty());
        assert!(!s
            .link_reregistration(old.uid, other_host.uid, op("agent.reregistered", &[]))
            .await
            .unwrap());
        // put_agent by a session holding an old copy does not undo the link.
        s.put_agent(&old).await.unwrap();
        assert_eq!(
            s.get_agent(old.uid).await.unwrap().unwrap().replaced_by,
            Some(new.uid)
        );
        // No identity without both attributes.
        assert_eq!(Agent::new(Uuid::now_v7(), 1, 30).identity_key(), None);
        // The migration's backfill computes the same key as Agent::identity_key.
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
            .find(|(v, _)| *v == 2)
            .unwrap()
            .1
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
    async fn enqueue_links_commands_batch_and_audit() {
        let (_d, s) = open().await;
        let agents = [Uuid::now_v7(), Uuid::now_v7()];
        let batch = Batch {
            id: Uuid::now_v7(),
            query: "type:fluentbit".into(),
            kind: CommandKind::Restart,
            params: serde_json::json!({"reason": "test"}),
            created_at: 10,
            actor: "alice".into(),
            channel: Channel::Rest,
            skipped: vec![SkippedTarget {
                agent_uid: Uuid::now_v7(),
                reason: "offline".into(),
            }],
        };
        let mut cmds: Vec<Command> = agents.iter().map(|a| cmd(*a, 10, 1000)).collect();
        for c in &mut cmds {
            c.batch_id = Some(batch.id);
        }
        let first = s.append_audit(op("login", &[])).await.unwrap();
        let rec = s
            .enqueue(Some(&batch), &cmds, op("command.restart", &agents))
            .await
            .unwrap();
        assert_eq!(rec.id, first.id + 1);
        assert_eq!(rec.prev_hash, first.hash);
        assert_eq!(s.get_batch(batch.id).await.unwrap(), Some(batch.clone()));
        for c in &cmds {
            let mut expect = c.clone();
            expect.audit_id = Some(rec.id);
            assert_eq!(s.get_command(c.id).await.unwrap(), Some(expect));
        }
        let listed = s
            .list_commands(&CommandFilter {
                batch: Some(batch.id),
                ..CommandFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(listed.len(), 2);
        // The returned record is exactly what is stored.
        assert_eq!(s.audit_chain(first.id, 10).await.unwrap(), vec![rec]);

        // A failing enqueue (duplicate command id) writes neither commands nor audit.
        let err = s
            .enqueue(None, &[cmds[0].clone()], op("command.restart", &agents))
            .await;
        assert!(err.is_err());
        assert_eq!(s.audit_chain(0, 100).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_claim_wins_exactly_once_and_answers_with_the_rows() {
        let (_d, s) = open().await;
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        // a: three live and one expired; b: one live.
        let mut cmds = vec![
            cmd(a, 1, 1000),
            cmd(a, 2, 1000),
            cmd(a, 3, 1000),
            cmd(b, 4, 1000),
        ];
        cmds.push(cmd(a, 5, 50));
        let batch = Batch {
            id: Uuid::now_v7(),
            query: "type:fluentbit".into(),
            kind: CommandKind::Restart,
            params: serde_json::json!({}),
            created_at: 1,
            actor: "alice".into(),
            channel: Channel::Rest,
            skipped: vec![],
        };
        for c in &mut cmds {
            c.batch_id = Some(batch.id);
        }
        s.enqueue(Some(&batch), &cmds, op("batch.queue", &[a, b]))
            .await
            .unwrap();
        let s = std::sync::Arc::new(s);
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.claim_queued(&[a, b], 2, 100 + i).await
            }));
        }
        let mut got = Vec::new();
        for t in tasks {
            got.extend(t.await.unwrap().unwrap());
        }
        // Every live command once; per agent, the oldest first and at most 2 per claim.
        let mut ids: Vec<Uuid> = got.iter().map(|c| c.id).collect();
        ids.sort();
        assert_eq!(ids, vec![cmds[0].id, cmds[1].id, cmds[2].id, cmds[3].id]);
        for c in &got {
            assert_eq!(c.status, CommandStatus::Sent);
            let stored = s.get_command(c.id).await.unwrap().unwrap();
            assert_eq!(stored.sent_at, c.sent_at);
            assert!(stored.finished_at.is_none());
        }
        // Expired stays queued for the sweeper.
        assert_eq!(
            s.get_command(cmds[4].id).await.unwrap().unwrap().status,
            CommandStatus::Queued
        );
        assert!(s.claim_queued(&[a, b], 5, 200).await.unwrap().is_empty());
        let counts = s.batch_counts(batch.id).await.unwrap();
        let n = |st| counts.iter().find(|(x, _)| *x == st).unwrap().1;
        assert_eq!((n(CommandStatus::Sent), n(CommandStatus::Queued)), (4, 1));
        assert_eq!(n(CommandStatus::Failed), 0, "every status is listed");
    }

    #[tokio::test]
    async fn a_claim_never_takes_a_command_newer_than_itself() {
        // A claim stamped before a command was queued (it waited for the writer meanwhile)
        // would record it as sent before it was created.
        let (_d, s) = open().await;
        let a = Uuid::now_v7();
        let c = cmd(a, 500, 10_000);
        s.enqueue(None, std::slice::from_ref(&c), op("command.restart", &[a]))
            .await
            .unwrap();
        assert!(s.claim_queued(&[a], 1, 499).await.unwrap().is_empty());
        let got = s.claim_queued(&[a], 1, 500).await.unwrap();
        assert_eq!((got.len(), got[0].sent_at), (1, Some(500)));
    }

    #[tokio::test]
    async fn unclaim_restores_a_queued_record_once() {
        let (_d, s) = open().await;
        let a = Uuid::now_v7();
        let c = cmd(a, 1, 10_000);
        s.enqueue(None, std::slice::from_ref(&c), op("command.restart", &[a]))
            .await
            .unwrap();
        let claimed = s.claim_queued(&[a], 1, 100).await.unwrap();
        assert_eq!(claimed.len(), 1);
        // A stale claim (another sent_at) moves nothing.
        assert!(s.unclaim(&[(c.id, 99)]).await.unwrap().is_empty());
        assert_eq!(s.unclaim(&[(c.id, 100)]).await.unwrap(), vec![c.id]);
        assert!(
            s.unclaim(&[(c.id, 100)]).await.unwrap().is_empty(),
            "idempotent"
        );
        let back = s.get_command(c.id).await.unwrap().unwrap();
        assert_eq!(back.status, CommandStatus::Queued);
        assert_eq!((back.sent_at, back.finished_at), (None, None));
        assert_eq!(s.agents_with_queued(200, 1, 10).await.unwrap(), vec![a]);
        assert!(
            s.agents_with_queued(200, 0, 10).await.unwrap().is_empty(),
            "too new"
        );
        assert!(
            s.agents_with_queued(10_000, 1, 10)
                .await
                .unwrap()
                .is_empty(),
            "expired"
        );
        assert_eq!(
            s.claim_queued(&[a], 1, 300).await.unwrap()[0].sent_at,
            Some(300)
        );
    }

    #[tokio::test]
    async fn finish_command_is_compare_and_set() {
        let (_d, s) = open().await;
        let c = cmd(Uuid::now_v7(), 1, 1000);
        let q = s
            .enqueue(
                None,
                std::slice::from_ref(&c),
                op("command.restart", &[c.agent_uid]),
            )
            .await
            .unwrap();
        let mut outcome = op("command.result", &[c.agent_uid]);
        outcome.ref_id = Some(q.id);
        let from = [CommandStatus::Queued, CommandStatus::Sent];
        let done = s
            .finish_command(
                c.id,
                &from,
                finish(CommandStatus::Succeeded),
                Some(outcome.clone()),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.status, CommandStatus::Succeeded);
        assert_eq!(done.finished_at, Some(5000));
        assert_eq!(done.result, Some(serde_json::json!({"exit": 0})));
        let chain = s.audit_chain(0, 10).await.unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1].ref_id, Some(q.id));

        let again = s
            .finish_command(c.id, &from, finish(CommandStatus::Failed), Some(outcome))
            .await
            .unwrap();
        assert_eq!(again, None);
        assert_eq!(s.audit_chain(0, 10).await.unwrap().len(), 2);
        assert_eq!(
            s.get_command(c.id).await.unwrap().unwrap().status,
            CommandStatus::Succeeded
        );
        assert_eq!(
            s.finish_command(Uuid::now_v7(), &from, finish(CommandStatus::Failed), None)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            s.finish_command(c.id, &[], finish(CommandStatus::Failed), None)
                .await
                .unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn expiry_listing_and_counts() {
        let (_d, s) = open().await;
        let agent = Uuid::now_v7();
        let expired_q = cmd(agent, 1, 100);
        let fresh_q = cmd(agent, 2, 10_000);
        let old_sent = cmd(agent, 3, 10_000);
        let new_sent = cmd(agent, 4, 10_000);
        let finished = cmd(agent, 5, 100);
        let all = [
            expired_q.clone(),
            fresh_q.clone(),
            old_sent.clone(),
            new_sent.clone(),
            finished.clone(),
        ];
        s.enqueue(None, &all, op("command.restart", &[agent]))
            .await
            .unwrap();
        assert!(mark_sent(&s, old_sent.id, 200).await);
        assert!(mark_sent(&s, new_sent.id, 900).await);
        s.finish_command(
            finished.id,
            &[CommandStatus::Queued],
            finish(CommandStatus::Cancelled),
            None,
        )
        .await
        .unwrap()
        .unwrap();
        let due: Vec<Uuid> = s
            .due_for_expiry(500, 300)
            .await
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(due, vec![expired_q.id, old_sent.id]);

        let counts: BTreeMap<&str, u64> = s
            .command_counts()
            .await
            .unwrap()
            .into_iter()
            .map(|(st, n)| (st.as_str(), n))
            .collect();
        assert_eq!(counts.len(), CommandStatus::ALL.len());
        assert_eq!(counts["queued"], 2);
        assert_eq!(counts["sent"], 2);
        assert_eq!(counts["cancelled"], 1);
        assert_eq!(counts["failed"], 0);

        // Newest first, cursor and limit honoured.
        let ids: Vec<Uuid> = all.iter().rev().map(|c| c.id).collect();
        let page = s
            .list_commands(&CommandFilter {
                agent: Some(agent),
                limit: 2,
                ..CommandFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(page.iter().map(|c| c.id).collect::<Vec<_>>(), ids[..2]);
        let page = s
            .list_commands(&CommandFilter {
                before: Some(ids[1]),
                ..CommandFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(page.iter().map(|c| c.id).collect::<Vec<_>>(), ids[2..]);
        let page = s
            .list_commands(&CommandFilter {
                status: Some(CommandStatus::Sent),
                kind: Some(CommandKind::Restart),
                ..CommandFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(
            page.iter().map(|c| c.id).collect::<Vec<_>>(),
            vec![new_sent.id, old_sent.id]
        );
        let none = s
            .list_commands(&CommandFilter {
                kind: Some(CommandKind::Shutdown),
                ..CommandFilter::default()
            })
            .await
            .unwrap();
        assert!(none.is_empty());
        let q: Vec<Uuid> = s
            .queued_for(agent, 1)
            .await
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(q, vec![expired_q.id]);
    }

    #[tokio::test]
    async fn labels_are_set_and_audited_together() {
        let (_d, s) = open().await;
        let a = Agent::new(Uuid::now_v7(), 1, 30);
        s.put_agent(&a).await.unwrap();
        let rec = s
            .set_label(a.uid, "env", Some("prod"), op("label.set", &[a.uid]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.operation, "label.set");
        let got = s.get_agent(a.uid).await.unwrap().unwrap();
        assert_eq!(got.labels.get("env").map(String::as_str), Some("prod"));
        s.set_label(a.uid, "env", None, op("label.remove", &[a.uid]))
            .await
            .unwrap()
            .unwrap();
        assert!(s.get_agent(a.uid).await.unwrap().unwrap().labels.is_empty());
        let unknown = s
            .set_label(Uuid::now_v7(), "env", Some("x"), op("label.set", &[]))
            .await
            .unwrap();
        assert_eq!(unknown, None);
        assert_eq!(s.audit_chain(0, 10).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn audit_filters() {
        let (_d, s) = open().await;
        let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
        let r1 = s
            .append_audit(op("command.restart", &[x, y]))
            .await
            .unwrap();
        let mut a = op("label.set", &[y]);
        a.actor = "bob".into();
        a.channel = Channel::Slack;
        let r2 = s.append_audit(a).await.unwrap();
        let r3 = s.append_audit(op("command.restart", &[x])).await.unwrap();
        // Pin timestamps so the time filters are deterministic (hashes are not checked here).
        for (id, ts) in [(r1.id, 1000), (r2.id, 2000), (r3.id, 3000)] {
            sqlx::query("UPDATE audit SET ts = ? WHERE id = ?")
                .bind(ts)
                .bind(id)
                .execute(s.pool())
                .await
                .unwrap();
        }
        let ids = |f: AuditFilter| {
            let s = &s;
            async move {
                s.query_audit(&f)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.id)
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(ids(AuditFilter::default()).await, vec![r3.id, r2.id, r1.id]);
        let f = AuditFilter {
            actor: Some("bob".into()),
            ..AuditFilter::default()
        };
        assert_eq!(ids(f).await, vec![r2.id]);
        let f = AuditFilter {
            channel: Some(Channel::Rest),
            ..AuditFilter::default()
        };
        assert_eq!(ids(f).await, vec![r3.id, r1.id]);
        let f = AuditFilter {
            agent: Some(y.to_string()),
            ..AuditFilter::default()
        };
        assert_eq!(ids(f).await, vec![r2.id, r1.id]);
        let f = AuditFilter {
            agent: Some(x.to_string()),
            operation: Some("command.restart".into()),
            ..AuditFilter::default()
        };
        assert_eq!(ids(f).await, vec![r3.id, r1.id]);
        let f = AuditFilter {
            since: Some(1500),
            until: Some(3000),
            ..AuditFilter::default()
        };
        assert_eq!(ids(f).await, vec![r3.id, r2.id]);
        let f = AuditFilter {
            until: Some(2000),
            ..AuditFilter::default()
        };
        assert_eq!(ids(f).await, vec![r2.id, r1.id]);
        let f = AuditFilter {
            before_id: Some(r3.id),
            limit: 1,
            ..AuditFilter::default()
        };
        assert_eq!(ids(f).await, vec![r2.id]);
        let f = AuditFilter {
            agent: Some("nobody".into()),
            ..AuditFilter::default()
        };
        assert!(ids(f).await.is_empty());
    }

    async fn chain_of(n: usize) -> (tempfile::TempDir, SqliteStore, Vec<AuditRecord>) {
        let (d, s) = open().await;
        let mut recs = Vec::new();
        for i in 0..n {
            let mut a = op("command.restart", &[Uuid::now_v7()]);
            a.params = serde_json::json!({"n": i, "nested": {"z": 1, "a": [1.25, "x"]}});
            recs.push(s.append_audit(a).await.unwrap());
        }
        (d, s, recs)
    }

    #[tokio::test]
    async fn verify_accepts_intact_chain() {
        let (_d, s, recs) = chain_of(5).await;
        assert_eq!(recs[0].prev_hash, audit::GENESIS);
        for w in recs.windows(2) {
            assert_eq!(w[1].prev_hash, w[0].hash);
        }
        assert_eq!(verify(&s, None).await.unwrap().count, 5);
    }

    #[tokio::test]
    async fn verify_detects_updated_record() {
        let (_d, s, recs) = chain_of(5).await;
        sqlx::query("UPDATE audit SET outcome = 'error' WHERE id = ?")
            .bind(recs[2].id)
            .execute(s.pool())
            .await
            .unwrap();
        match verify(&s, None).await {
            Err(VerifyError::Broken(b)) => {
                assert_eq!(b.id, recs[2].id);
                assert!(b.reason.contains("does not match its hash"), "{b}");
            }
            other => panic!("expected a break, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn verify_detects_deleted_record() {
        let (_d, s, recs) = chain_of(5).await;
        sqlx::query("DELETE FROM audit WHERE id = ?")
            .bind(recs[2].id)
            .execute(s.pool())
            .await
            .unwrap();
        match verify(&s, None).await {
            Err(VerifyError::Broken(b)) => {
                assert_eq!(b.id, recs[3].id);
                assert!(
                    b.reason
                        .contains(&format!("does not link to record {}", recs[1].id))
                        && b.reason
                            .contains(&format!("record {} is missing", recs[2].id)),
                    "{b}"
                );
            }
            other => panic!("expected a break, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn data_survives_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = full_agent();
        let c = cmd(a.uid, 1, 1000);
        let rec = {
            let s = SqliteStore::open(dir.path()).await.unwrap();
            s.put_agent(&a).await.unwrap();
            let rec = s
                .enqueue(
                    None,
                    std::slice::from_ref(&c),
                    // As the service queues it (without a digest: a legacy record to verify).
                    op("command.queue", &[a.uid, c.id]),
                )
                .await
                .unwrap();
            s.close().await;
            rec
        };
        assert!(dir.path().join(DB_FILE).exists());
        let s = SqliteStore::open(dir.path()).await.unwrap();
        assert_eq!(s.get_agent(a.uid).await.unwrap(), Some(a));
        assert_eq!(
            s.get_command(c.id).await.unwrap().unwrap().audit_id,
            Some(rec.id)
        );
        assert_eq!(s.audit_chain(0, 10).await.unwrap(), vec![rec.clone()]);
        // Appending after reopen continues the same chain.
        let next = s.append_audit(op("login", &[])).await.unwrap();
        assert_eq!(next.prev_hash, rec.hash);
        assert_eq!(verify(&s, None).await.unwrap().count, 2);
        let version: i64 = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
            .fetch_one(s.pool())
            .await
            .unwrap();
        assert_eq!(version, MIGRATIONS.last().unwrap().0);
        s.close().await;
    }
}
