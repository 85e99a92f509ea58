//! PostgreSQL backend of [`Store`]: several `flotilla serve` replicas can share one database.
//!
//! Same columns and semantics as the SQLite backend (see `codec` and `migrations`). What
//! SQLite gets from its single writer is made explicit here, because writers may be other
//! processes: audit appends take a transaction-scoped advisory lock, so the chain has one
//! head whichever replica appends; claims re-check `status = 'queued'` on the row they
//! update, so of two concurrent claims of a command exactly one gets it; read-modify-write
//! operations lock the rows they read (`FOR UPDATE`).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Postgres, QueryBuilder, Transaction};
use uuid::Uuid;

use super::codec::*;
use super::migrations::{self, MIGRATIONS};
use super::pg_wake::{self, WakeChannel};
use super::{ChatStore, ChatSubscriptionRow, Finish, Store, StoreError, StoreResult, Touch};
use crate::audit;
use crate::model::{
    now_ms, Agent, AuditFilter, AuditRecord, Batch, Command, CommandFilter, CommandStatus,
    DesiredConfig, Millis, NewAudit, Transport,
};

/// First key of the advisory locks (ASCII "flot"); the second is the schema's hash, so two
/// deployments in one database (or parallel test runs) do not wait for each other.
const LOCK_SPACE: i32 = 0x666c_6f74;
/// Second-level lock names, combined with the schema: see [`lock`].
const AUDIT_LOCK: &str = "audit";
const MIGRATE_LOCK: &str = "migrate";
const REPLICAS_LOCK: &str = "replicas";

/// Commands per INSERT statement (15 bound parameters each, under PostgreSQL's 65535).
const INSERT_CHUNK: usize = 1000;

/// The PostgreSQL store. Cheap to share behind an `Arc`.
pub struct PgStore {
    pool: PgPool,
    wake: Arc<WakeChannel>,
    /// This process's replica id ([`Store::start_replica`]); `None` for tools and tests that
    /// never serve.
    replica: std::sync::OnceLock<String>,
}

/// `url` with its password replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
        None => url.to_string(),
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db?...`; `password`, when given, replaces
    /// any in the URL) and brings the schema up to date.
    pub async fn open(url: &str, password: Option<&str>) -> StoreResult<PgStore> {
        let store = Self::connect(url, password).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Like [`PgStore::open`] but never creates a schema: `None` if this database has no
    /// Flotilla tables (offline tools must not make an empty database that "verifies").
    pub async fn open_existing(url: &str, password: Option<&str>) -> StoreResult<Option<PgStore>> {
        let store = Self::connect(url, password).await?;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('schema_version') IS NOT NULL")
            .fetch_one(&store.pool)
            .await?;
        if !exists {
            store.pool.close().await;
            return Ok(None);
        }
        store.migrate().await?;
        Ok(Some(store))
    }

    async fn connect(url: &str, password: Option<&str>) -> StoreResult<PgStore> {
        let mut options = PgConnectOptions::from_str(url)?;
        if let Some(p) = password {
            options = options.password(p);
        }
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        let wake = Arc::new(WakeChannel::of(&pool).await?);
        Ok(PgStore {
            pool,
            wake,
            replica: std::sync::OnceLock::new(),
        })
    }

    /// The underlying pool, for administrative tools and tamper tests. Writing through it
    /// bypasses the audit chain, which is the point of a tamper test and nothing else.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn migrate(&self) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        // Replicas starting together: one applies the migrations, the others then see them.
        lock(&mut tx, MIGRATE_LOCK).await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_version (
                version BIGINT PRIMARY KEY NOT NULL,
                applied_at BIGINT NOT NULL
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
            for sql in m.postgres {
                sqlx::query(sql).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)")
                .bind(m.version)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn agents_page(
        &self,
        select: &str,
        after: Option<Uuid>,
        limit: usize,
    ) -> StoreResult<Vec<Agent>> {
        let mut q = QueryBuilder::<Postgres>::new(select);
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

    async fn begin(&self) -> StoreResult<Transaction<'static, Postgres>> {
        Ok(self.pool.begin().await?)
    }
}

/// Takes the transaction-scoped advisory lock `name` of this schema (released at commit or
/// rollback, after the commit is visible to the next holder's statements).
async fn lock(conn: &mut PgConnection, name: &str) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(current_schema() || '.' || $2))")
        .bind(LOCK_SPACE)
        .bind(name)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Appends one audit record chained to the current last record. The advisory lock makes
/// appends from every process one sequence: the head read here is the head when this
/// transaction commits.
async fn append_audit_in(conn: &mut PgConnection, a: NewAudit) -> StoreResult<AuditRecord> {
    lock(conn, AUDIT_LOCK).await?;
    let prev_hash: Option<String> =
        sqlx::query_scalar("SELECT hash FROM audit ORDER BY id DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let prev_hash = prev_hash.unwrap_or_else(|| audit::GENESIS.to_string());
    let targets_json = to_json(&a.targets, "audit targets")?;
    let params_json = to_json(&a.params, "audit params")?;
    // Hash what a later read will see (see the SQLite backend).
    let params: serde_json::Value = from_json(&params_json, "audit params")?;
    let ts = now_ms();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO audit (ts, actor, channel, operation, targets, params, outcome, ref_id,
                            prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, '') RETURNING id",
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
    .fetch_one(&mut *conn)
    .await?;
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
    sqlx::query("UPDATE audit SET hash = $1 WHERE id = $2")
        .bind(&rec.hash)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    if !rec.targets.is_empty() {
        sqlx::query(
            "INSERT INTO audit_targets (target, audit_id)
             SELECT t, $2 FROM UNNEST($1::text[]) AS t ON CONFLICT DO NOTHING",
        )
        .bind(&rec.targets)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(rec)
}

async fn insert_commands(conn: &mut PgConnection, commands: &[Command]) -> StoreResult<()> {
    for chunk in commands.chunks(INSERT_CHUNK) {
        let mut rows = Vec::with_capacity(chunk.len());
        for c in chunk {
            rows.push((
                c,
                to_json(&c.params, "command params")?,
                opt_to_json(&c.result, "command result")?,
            ));
        }
        let mut q = QueryBuilder::<Postgres>::new(
            "INSERT INTO commands (id, agent_uid, batch_id, kind, params, status, created_at,
                                   sent_at, finished_at, expires_at, result, error, actor,
                                   channel, audit_id) ",
        );
        q.push_values(rows, |mut b, (c, params, result)| {
            b.push_bind(uid(c.id))
                .push_bind(uid(c.agent_uid))
                .push_bind(opt_uid(c.batch_id))
                .push_bind(c.kind.as_str())
                .push_bind(params)
                .push_bind(c.status.as_str())
                .push_bind(c.created_at)
                .push_bind(c.sent_at)
                .push_bind(c.finished_at)
                .push_bind(c.expires_at)
                .push_bind(result)
                .push_bind(c.error.clone())
                .push_bind(c.actor.clone())
                .push_bind(c.channel.as_str())
                .push_bind(c.audit_id);
        });
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// An identity key as stored: PostgreSQL text cannot hold the NUL that separates its parts,
/// so it is kept JSON-quoted (`\u0000`), which is as unique and only ever compared whole.
fn identity_text(key: &str) -> String {
    serde_json::Value::from(key).to_string()
}

/// Whether a row with this uid exists, locking it for the rest of the transaction.
async fn agent_locked(conn: &mut PgConnection, id: Uuid, extra: &str) -> StoreResult<bool> {
    let found: Option<i32> = sqlx::query_scalar(&format!(
        "SELECT 1 FROM agents WHERE uid = $1{extra} FOR UPDATE"
    ))
    .bind(uid(id))
    .fetch_optional(&mut *conn)
    .await?;
    Ok(found.is_some())
}

#[async_trait]
impl Store for PgStore {
    async fn put_agent(&self, a: &Agent) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO agents (uid, identifying, non_identifying, capabilities,
                custom_capabilities, health, effective_config, remote_config_status,
                desired_config, labels, transport, remote_addr, first_seen, last_seen,
                connected, sequence_num, heartbeat_interval_s, previous_uid, identity_key,
                departed, client_cert, replica)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                     $17, $18, $19, $20, $21, CASE WHEN $15 THEN $22 END)
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
                first_seen = LEAST(agents.first_seen, excluded.first_seen),
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
        .bind(a.identity_key().as_deref().map(identity_text))
        .bind(a.departed)
        .bind(opt_to_json(&a.client_cert, "client certificate")?)
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
        sqlx::query("UPDATE agents SET desired_config = $1 WHERE uid = $2")
            .bind(desired.map(|d| to_json(d, "desired config")).transpose()?)
            .bind(uid(id))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn get_agent(&self, id: Uuid) -> StoreResult<Option<Agent>> {
        sqlx::query("SELECT * FROM agents WHERE uid = $1")
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
        // The configuration bodies stay in the database.
        self.agents_page(
            "SELECT uid, identifying, non_identifying, capabilities, custom_capabilities,
                health, NULL::text AS effective_config, remote_config_status,
                NULL::text AS desired_config, labels, transport, remote_addr, first_seen,
                last_seen, connected, sequence_num, heartbeat_interval_s, previous_uid,
                replaces, replaced_by, departed, NULL::text AS client_cert, replica
             FROM agents",
            after,
            limit,
        )
        .await
    }

    async fn touch_agents(&self, touches: &[Touch]) -> StoreResult<()> {
        if touches.is_empty() {
            return Ok(());
        }
        // Rows are locked in uid order, so two replicas flushing overlapping batches cannot
        // deadlock on each other.
        let mut sorted: Vec<&Touch> = touches.iter().collect();
        sorted.sort_by_key(|t| t.uid);
        let uids: Vec<String> = sorted.iter().map(|t| uid(t.uid)).collect();
        let seen: Vec<i64> = sorted.iter().map(|t| t.last_seen).collect();
        let seq: Vec<i64> = sorted.iter().map(|t| u64_to_db(t.sequence_num)).collect();
        let hb: Vec<Option<i64>> = sorted
            .iter()
            .map(|t| t.heartbeat_interval_s.map(u64_to_db))
            .collect();
        // A touch batched before a full put_agent but flushed after it must not roll the
        // record's last_seen/sequence_num back.
        sqlx::query(
            "UPDATE agents SET last_seen = t.ls, sequence_num = t.seq,
                heartbeat_interval_s = COALESCE(t.hb, agents.heartbeat_interval_s)
             FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[]) AS t(uid, ls, seq, hb)
             WHERE agents.uid = t.uid AND agents.last_seen <= t.ls",
        )
        .bind(uids)
        .bind(seen)
        .bind(seq)
        .bind(hb)
        .execute(&self.pool)
        .await?;
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
        // `None` transport/address means "not known now", so keep what we had for display.
        // A connection is also a sign of life (and ends a goodbye); a disconnect is not, and
        // is ours to write only while the agent is recorded on this replica: once another
        // holds it, a connection closing here says nothing about it.
        sqlx::query(
            "UPDATE agents SET connected = $1,
                departed = CASE WHEN $1 THEN FALSE ELSE departed END,
                transport = COALESCE($2, transport),
                remote_addr = COALESCE($3, remote_addr),
                last_seen = CASE WHEN $1 THEN GREATEST(last_seen, $4) ELSE last_seen END,
                replica = CASE WHEN $1 THEN $6 ELSE replica END
             WHERE uid = $5 AND ($1 OR (last_seen <= $4
                AND (replica IS NULL OR $6::text IS NULL OR replica = $6)))",
        )
        .bind(connected)
        .bind(transport.map(Transport::as_str))
        .bind(remote_addr)
        .bind(at)
        .bind(uid(id))
        .bind(self.replica.get())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn mark_all_disconnected(&self, _at: Millis) -> StoreResult<u64> {
        let done = sqlx::query("UPDATE agents SET connected = FALSE WHERE connected")
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn start_replica(&self, id: &str, at: Millis, stale_before: Millis) -> StoreResult<u64> {
        let _ = self.replica.set(id.to_string());
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO replicas (id, started_at, heartbeat_at, connections)
             VALUES ($1, $2, $2, 0)
             ON CONFLICT (id) DO UPDATE SET started_at = $2, heartbeat_at = $2, connections = 0",
        )
        .bind(id)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query(
            "UPDATE agents SET connected = FALSE
             WHERE connected AND (replica IS NULL OR replica = $1 OR replica NOT IN
                (SELECT id FROM replicas WHERE heartbeat_at >= $2))",
        )
        .bind(id)
        .bind(stale_before)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn replica_heartbeat(
        &self,
        connections: u64,
        at: Millis,
        stale_before: Millis,
        forget_before: Millis,
    ) -> StoreResult<Vec<Uuid>> {
        let Some(id) = self.replica.get() else {
            return Ok(Vec::new());
        };
        let mut tx = self.begin().await?;
        // One reaper at a time: two replicas releasing the same dead replica's agents would
        // only wait for each other's row locks.
        lock(&mut tx, REPLICAS_LOCK).await?;
        // Upsert: a row forgotten while this replica was partitioned away comes back.
        sqlx::query(
            "INSERT INTO replicas (id, started_at, heartbeat_at, connections)
             VALUES ($1, $2, $2, $3)
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = $2, connections = $3",
        )
        .bind(id)
        .bind(at)
        .bind(u64_to_db(connections))
        .execute(&mut *tx)
        .await?;
        let released: Vec<String> = sqlx::query_scalar(
            "UPDATE agents SET connected = FALSE
             WHERE connected AND replica IS NOT NULL AND replica <> $1 AND replica NOT IN
                (SELECT id FROM replicas WHERE heartbeat_at >= $2)
             RETURNING uid",
        )
        .bind(id)
        .bind(stale_before)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM replicas WHERE heartbeat_at < $1 AND id <> $2")
            .bind(forget_before)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        released
            .iter()
            .map(|u| parse_uuid(u, "released agent"))
            .collect()
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
        let mut tx = self.begin().await?;
        let exists = agent_locked(&mut tx, old, "").await?;
        if !exists || old == new {
            return Ok(old == new && exists);
        }
        if agent_locked(&mut tx, new, "").await? {
            // Another agent's record: never overwritten by someone adopting its uid.
            return Ok(false);
        }
        let moved = sqlx::query("UPDATE agents SET uid = $1, previous_uid = $2 WHERE uid = $2")
            .bind(uid(new))
            .bind(uid(old))
            .execute(&mut *tx)
            .await;
        match moved {
            Ok(_) => {}
            // `new` was inserted by another process since the check above: it is theirs.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        // Finished commands stay with the old uid: they are history of that identity.
        sqlx::query(
            "UPDATE commands SET agent_uid = $1
             WHERE agent_uid = $2 AND status IN ('queued', 'sent')",
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
            "SELECT uid FROM agents WHERE identity_key = $1 AND uid != $2 AND replaced_by IS NULL
             ORDER BY last_seen DESC LIMIT $3",
        )
        .bind(identity_text(key))
        .bind(uid(id))
        .bind(limit_to_db(limit))
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
        if old == new {
            return Ok(false);
        }
        let mut tx = self.begin().await?;
        // Locked in uid order (two replicas linking the same pair must not deadlock).
        let (first, second) = if old < new { (old, new) } else { (new, old) };
        let mut there = [false; 2];
        for (i, id) in [first, second].into_iter().enumerate() {
            there[i] = agent_locked(&mut tx, id, "").await?;
        }
        let old_free = agent_locked(&mut tx, old, " AND replaced_by IS NULL").await?;
        if !old_free || !there.iter().all(|t| *t) {
            return Ok(false);
        }
        // Its agent lives on under `new`: this record is offline from now on, not healthy for
        // another heartbeat interval beside its successor.
        sqlx::query(
            "UPDATE agents SET replaced_by = $1, connected = FALSE, departed = TRUE
             WHERE uid = $2",
        )
        .bind(uid(new))
        .bind(uid(old))
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE agents SET replaces = $1 WHERE uid = $2")
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
        let mut tx = self.begin().await?;
        let labels: Option<String> =
            sqlx::query_scalar("SELECT labels FROM agents WHERE uid = $1 FOR UPDATE")
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
        sqlx::query("UPDATE agents SET labels = $1 WHERE uid = $2")
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
        let mut tx = self.begin().await?;
        let rec = append_audit_in(&mut tx, audit).await?;
        if let Some(b) = batch {
            sqlx::query(
                "INSERT INTO batches (id, query, kind, params, created_at, actor, channel, skipped)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
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
        let commands: Vec<Command> = commands
            .iter()
            .map(|c| Command {
                audit_id: Some(rec.id),
                ..c.clone()
            })
            .collect();
        insert_commands(&mut tx, &commands).await?;
        self.wake
            .notify(&mut tx, commands.iter().map(|c| c.agent_uid))
            .await?;
        tx.commit().await?;
        Ok(rec)
    }

    async fn get_command(&self, id: Uuid) -> StoreResult<Option<Command>> {
        sqlx::query("SELECT * FROM commands WHERE id = $1")
            .bind(uid(id))
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(command_from_row)
            .transpose()
    }

    async fn list_commands(&self, f: &CommandFilter) -> StoreResult<Vec<Command>> {
        let mut q = QueryBuilder::<Postgres>::new("SELECT * FROM commands WHERE TRUE");
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
            "SELECT * FROM commands WHERE agent_uid = $1 AND status = 'queued'
             ORDER BY id LIMIT $2",
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
        sqlx::query("SELECT * FROM commands WHERE agent_uid = $1 AND status = 'sent' ORDER BY id")
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
        let agents: Vec<String> = agents.iter().map(|a| uid(*a)).collect();
        // The outer `status = 'queued'` is what makes a claim win at most once: a row another
        // transaction claimed meanwhile is re-checked against its committed version (READ
        // COMMITTED) and skipped, where the subquery alone would still list it. A claim
        // stamped `at` takes only commands that existed then (see the SQLite backend).
        let rows = sqlx::query(
            "UPDATE commands SET status = 'sent', sent_at = $1
             WHERE status = 'queued' AND id IN (
                SELECT id FROM (SELECT id, ROW_NUMBER() OVER
                    (PARTITION BY agent_uid ORDER BY id) AS n FROM commands
                    WHERE status = 'queued' AND expires_at > $1 AND created_at <= $1
                      AND agent_uid = ANY($2)) AS q
                WHERE n <= $3)
             RETURNING *",
        )
        .bind(at)
        .bind(agents)
        .bind(limit_to_db(per_agent))
        .fetch_all(&self.pool)
        .await?;
        let mut out = rows
            .iter()
            .map(command_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        // RETURNING has no defined order; uuid order is queue order (UUIDv7).
        out.sort_by_key(|c| (c.agent_uid, c.id));
        Ok(out)
    }

    async fn unclaim(&self, claims: &[(Uuid, Millis)]) -> StoreResult<Vec<Uuid>> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = claims.iter().map(|(id, _)| uid(*id)).collect();
        let sent: Vec<i64> = claims.iter().map(|(_, at)| *at).collect();
        let mut tx = self.begin().await?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "UPDATE commands AS c SET status = 'queued', sent_at = NULL
             FROM UNNEST($1::text[], $2::int8[]) AS u(id, sent_at)
             WHERE c.id = u.id AND c.status = 'sent' AND c.sent_at = u.sent_at
             RETURNING c.id, c.agent_uid",
        )
        .bind(ids)
        .bind(sent)
        .fetch_all(&mut *tx)
        .await?;
        let mut moved = Vec::with_capacity(rows.len());
        let mut agents = Vec::with_capacity(rows.len());
        for (id, agent) in &rows {
            moved.push(parse_uuid(id, "unclaimed command")?);
            agents.push(parse_uuid(agent, "unclaimed command's agent")?);
        }
        // The agent may have moved to another replica since it was claimed for it here.
        self.wake.notify(&mut tx, agents).await?;
        tx.commit().await?;
        // In the order asked, as the SQLite backend answers.
        moved.sort_by_key(|m| claims.iter().position(|(id, _)| id == m));
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
             WHERE status = 'queued' AND expires_at > $1 AND created_at <= $2 LIMIT $3",
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
            "SELECT status, COUNT(*) AS n FROM commands WHERE batch_id = $1 GROUP BY status",
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
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "UPDATE commands SET status = $1, result = $2, error = $3, finished_at = $4
             WHERE id = $5 AND status = ANY($6) RETURNING *",
        )
        .bind(finish.to.as_str())
        .bind(opt_to_json(&finish.result, "command result")?)
        .bind(finish.error)
        .bind(finish.at)
        .bind(uid(id))
        .bind(from)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            // Dropping the transaction rolls back; nothing was written anyway.
            return Ok(None);
        };
        let cmd = command_from_row(&row)?;
        if let Some(a) = audit {
            append_audit_in(&mut tx, a).await?;
        }
        tx.commit().await?;
        Ok(Some(cmd))
    }

    async fn due_for_expiry(&self, now: Millis, sent_before: Millis) -> StoreResult<Vec<Command>> {
        sqlx::query(
            "SELECT * FROM commands
             WHERE (status = 'queued' AND expires_at <= $1)
                OR (status = 'sent' AND sent_at <= $2)
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
        sqlx::query("SELECT * FROM batches WHERE id = $1")
            .bind(uid(id))
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(batch_from_row)
            .transpose()
    }

    async fn append_audit(&self, audit: NewAudit) -> StoreResult<AuditRecord> {
        let mut tx = self.begin().await?;
        let rec = append_audit_in(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(rec)
    }

    async fn query_audit(&self, f: &AuditFilter) -> StoreResult<Vec<AuditRecord>> {
        let mut q = QueryBuilder::<Postgres>::new("SELECT * FROM audit WHERE TRUE");
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
        sqlx::query("SELECT * FROM audit WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after)
            .bind(limit_to_db(limit))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(audit_from_row)
            .collect()
    }

    async fn audit_records(&self, ids: &[i64]) -> StoreResult<Vec<AuditRecord>> {
        sqlx::query("SELECT * FROM audit WHERE id = ANY($1) ORDER BY id")
            .bind(ids)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(audit_from_row)
            .collect()
    }

    fn chat_store(self: Arc<Self>) -> Option<Arc<dyn ChatStore>> {
        Some(self)
    }

    fn wake_feed(self: Arc<Self>) -> Option<tokio::sync::mpsc::Receiver<super::Wakeup>> {
        Some(pg_wake::feed(self.pool.clone(), self.wake.clone()))
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

#[async_trait]
impl ChatStore for PgStore {
    async fn chat_put_confirmation(
        &self,
        id: &str,
        body: &str,
        expires_at: Millis,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO chat_confirmations (id, body, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET body = excluded.body, expires_at = excluded.expires_at",
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
            sqlx::query_as("DELETE FROM chat_confirmations WHERE id = $1 RETURNING body")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(b,)| b))
    }

    async fn chat_expire_confirmations(&self, now: Millis) -> StoreResult<u64> {
        let r = sqlx::query("DELETE FROM chat_confirmations WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    async fn chat_get_thread(&self, key: &str) -> StoreResult<Option<String>> {
        let row: Option<(String,)> = sqlx::query_as("SELECT body FROM chat_threads WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(b,)| b))
    }

    async fn chat_put_thread(&self, key: &str, body: &str, last_used: Millis) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO chat_threads (key, body, last_used) VALUES ($1, $2, $3)
             ON CONFLICT (key) DO UPDATE SET body = excluded.body, last_used = excluded.last_used",
        )
        .bind(key)
        .bind(body)
        .bind(last_used)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn chat_take_idle_threads(&self, before: Millis) -> StoreResult<Vec<(String, String)>> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("DELETE FROM chat_threads WHERE last_used < $1 RETURNING key, body")
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
        sqlx::query("DELETE FROM chat_deliveries WHERE seen_at < $1")
            .bind(forget_before)
            .execute(&self.pool)
            .await?;
        let r = sqlx::query(
            "INSERT INTO chat_deliveries (id, seen_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
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
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO chat_subscriptions (id, platform, workspace, channel, body, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET platform = excluded.platform,
                workspace = excluded.workspace, channel = excluded.channel,
                body = excluded.body, created_at = excluded.created_at",
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
        let mut tx = self.begin().await?;
        let row: Option<(String,)> = sqlx::query_as(
            "DELETE FROM chat_subscriptions
             WHERE id = $1 AND platform = $2 AND workspace = $3 AND channel = $4 RETURNING body",
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
        sqlx::query("DELETE FROM chat_mutes WHERE subscription = $1")
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
        let mut tx = self.begin().await?;
        // Locked, so a concurrent unsubscribe cannot leave a mute of a removed subscription.
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM chat_subscriptions WHERE id = $1 FOR UPDATE")
                .bind(subscription)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_none() {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO chat_mutes (subscription, agent, until) VALUES ($1, $2, $3)
             ON CONFLICT (subscription, agent) DO UPDATE SET until = excluded.until",
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
        sqlx::query("DELETE FROM chat_mutes WHERE until <= $1")
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
    use super::redact_url;

    #[test]
    fn urls_are_logged_without_their_password() {
        assert_eq!(
            redact_url("postgres://flotilla:s3cr%40t@db:5432/fleet?sslmode=require"),
            "postgres://flotilla:***@db:5432/fleet?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://root@127.0.0.1/test"),
            "postgres://root@127.0.0.1/test"
        );
        assert_eq!(redact_url("postgresql://h/db"), "postgresql://h/db");
    }
}
