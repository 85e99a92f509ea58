//! The storage interface of the registry, command queue and audit trail.
//!
//! Invariant: only this module and its backends know SQL. Everything else talks to
//! [`Store`], so a PostgreSQL backend can be added without touching protocol or API code.
//! Operations that must not be half-done (a command and the audit record that queued it, a
//! command's final status and its outcome record) are single methods, each one transaction.

pub mod chat;
mod codec;
pub mod indexed;
mod migrations;
mod pg_wake;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod tests;

use async_trait::async_trait;
use uuid::Uuid;

use crate::model::{
    Agent, AuditFilter, AuditRecord, Batch, Command, CommandFilter, CommandStatus, Millis,
    NewAudit, Transport,
};

/// A storage failure. Callers treat it as "try again later"; it never means bad input.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Makes `dir` (created if missing, parents included) owner-only, 0700: it holds agents'
/// effective configs, which often carry output credentials. An existing directory open to
/// others is tightened with a warning; one we may not chmod (another owner) is warned about.
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        tighten(dir, 0o700, "data directory");
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)?;
    Ok(())
}

/// Creates `path` empty with mode 0600 if it does not exist, and tightens it if it does. SQLite
/// gives its `-wal` and `-shm` files the mode of the database file, so creating the database
/// owner-only keeps those owner-only too.
pub fn private_file(path: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                tighten(path, 0o600, "database file")
            }
            Err(e) => return Err(e),
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// If `path` exists and grants group or other users any access, sets it to `mode`.
#[cfg(unix)]
pub(crate) fn tighten(path: &std::path::Path, mode: u32, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(m) = std::fs::metadata(path) else {
        return;
    };
    let old = m.permissions().mode() & 0o777;
    if old & 0o077 == 0 {
        return;
    }
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        Ok(()) => tracing::warn!(path = %path.display(), old = format!("{old:o}"),
            new = format!("{mode:o}"), "the {what} was open to other users; made it owner-only"),
        Err(e) => tracing::warn!(path = %path.display(), old = format!("{old:o}"), error = %e,
            "the {what} is open to other users and could not be made owner-only; fix its mode"),
    }
}

/// A liveness update batched by the server and written periodically (heartbeats only; any
/// change of reported status is written at once with [`Store::put_agent`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Touch {
    pub uid: Uuid,
    pub last_seen: Millis,
    pub sequence_num: u64,
    /// A newly learnt heartbeat interval (agents we offer none), if it changed.
    pub heartbeat_interval_s: Option<u64>,
}

/// What another process sharing the store says about delivery (see [`Store::wake_feed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wakeup {
    /// Commands were queued (or put back) for these agents: wake those connected here.
    Agents(Vec<Uuid>),
    /// The feed was cut and is back: wake-ups may have been missed meanwhile, so look at
    /// every connected agent's queue.
    Resumed,
}

/// One replica's row: when it started, last wrote its heartbeat, and how many agent
/// connections it held then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRow {
    pub id: String,
    pub started_at: Millis,
    pub heartbeat_at: Millis,
    pub connections: u64,
}

/// How a command finishes, applied with a compare-and-set on its status.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub to: CommandStatus,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    pub at: Millis,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- agents ----
    /// Inserts the agent, or updates everything the agent itself reports plus connection
    /// state. Server-owned fields (`labels`, `desired_config`) are written only on insert;
    /// afterwards they change only through [`Store::set_label`] and
    /// [`Store::set_desired_config`], so a protocol session holding an older copy of the record
    /// can never undo an operator's change.
    async fn put_agent(&self, agent: &Agent) -> StoreResult<()>;
    /// Sets or clears the remote config the server wants the agent to run.
    async fn set_desired_config(
        &self,
        uid: Uuid,
        desired: Option<&crate::model::DesiredConfig>,
    ) -> StoreResult<()>;
    async fn get_agent(&self, uid: Uuid) -> StoreResult<Option<Agent>>;
    /// Agents ordered by uid, strictly after `after`, at most `limit`.
    async fn list_agents(&self, after: Option<Uuid>, limit: usize) -> StoreResult<Vec<Agent>>;
    /// Like [`Store::list_agents`] but without the configuration bodies: `effective_config`
    /// and `desired_config` are `None`. For whole-fleet scans (search, summary, catalog,
    /// fan-out), which never need them and would otherwise read and decode every agent's
    /// configuration files.
    async fn list_agents_brief(&self, after: Option<Uuid>, limit: usize)
        -> StoreResult<Vec<Agent>>;
    /// Writes heartbeat liveness for many agents in one transaction.
    async fn touch_agents(&self, touches: &[Touch]) -> StoreResult<()>;
    /// Records a connection state change. A connect at `at` is also a sign of life. A
    /// disconnect is written only if nothing newer than `at` (when the closing connection last
    /// heard the agent) was recorded: a newer message means the agent is already back on
    /// another connection, whose "connected" must not be undone by the old one's goodbye.
    async fn set_connected(
        &self,
        uid: Uuid,
        connected: bool,
        transport: Option<Transport>,
        remote_addr: Option<String>,
        at: Millis,
    ) -> StoreResult<()>;
    /// At start-up nothing is connected yet: marks every agent disconnected.
    async fn mark_all_disconnected(&self, at: Millis) -> StoreResult<u64>;
    /// Starts this process as replica `id`: later connected writes name it, its heartbeat row
    /// is written, and the agents it cannot be holding are marked disconnected — on a store
    /// only one process can open (SQLite) every agent; on a shared one only those recorded on
    /// `id` itself (an earlier run), on a replica silent since `stale_before`, or on none,
    /// never those of live replicas. Returns how many were marked.
    async fn start_replica(&self, id: &str, at: Millis, stale_before: Millis) -> StoreResult<u64>;
    /// Writes this replica's heartbeat with its live `connections`, marks disconnected the
    /// agents of replicas silent since `stale_before` (their process died: nobody else would),
    /// and forgets replicas silent since `forget_before`. Returns the agents it released.
    async fn replica_heartbeat(
        &self,
        connections: u64,
        at: Millis,
        stale_before: Millis,
        forget_before: Millis,
    ) -> StoreResult<Vec<Uuid>>;
    /// Every replica known, by id.
    async fn replicas(&self) -> StoreResult<Vec<ReplicaRow>>;
    /// Moves an agent (record, labels, queued and sent commands) to a new uid after it adopted
    /// `new_instance_uid`, and appends `audit`, in one transaction. The new record keeps
    /// `previous_uid = old`. Returns false (nothing written) if `old` is unknown or `new`
    /// already belongs to another agent.
    async fn rename_agent(&self, old: Uuid, new: Uuid, audit: NewAudit) -> StoreResult<bool>;
    /// Agents other than `uid` with identity key `key` (see `Agent::identity_key`) that no
    /// other record replaced yet, most recently seen first, at most `limit`.
    async fn same_identity(&self, key: &str, uid: Uuid, limit: usize) -> StoreResult<Vec<Uuid>>;
    /// Records that `new` re-registered in place of `old` (`old.replaced_by`, `new.replaces`,
    /// `old` no longer connected and departed) and appends `audit`, in one transaction. Returns false
    /// (nothing written) if either record is gone or `old` was already replaced.
    async fn link_reregistration(&self, old: Uuid, new: Uuid, audit: NewAudit)
        -> StoreResult<bool>;
    /// Sets (`Some`) or removes (`None`) a label and appends `audit`, in one transaction.
    /// Returns `None` if the agent is unknown (nothing written).
    async fn set_label(
        &self,
        uid: Uuid,
        key: &str,
        value: Option<&str>,
        audit: NewAudit,
    ) -> StoreResult<Option<AuditRecord>>;

    // ---- commands ----
    /// Inserts commands (and the batch, if any) and appends `audit`, in one transaction; each
    /// command's `audit_id` is set to the new record's id. Returns the record.
    async fn enqueue(
        &self,
        batch: Option<&Batch>,
        commands: &[Command],
        audit: NewAudit,
    ) -> StoreResult<AuditRecord>;
    async fn get_command(&self, id: Uuid) -> StoreResult<Option<Command>>;
    /// Newest first.
    async fn list_commands(&self, filter: &CommandFilter) -> StoreResult<Vec<Command>>;
    /// Queued commands of one agent in delivery order (oldest first).
    async fn queued_for(&self, agent: Uuid, limit: usize) -> StoreResult<Vec<Command>>;
    /// Commands of one agent in status `sent`, oldest first (awaiting a result).
    async fn sent_for(&self, agent: Uuid) -> StoreResult<Vec<Command>>;
    /// Claims for delivery, in one transaction, up to `per_agent` queued commands of each of
    /// `agents` that have not expired at `at` (oldest first): each moves `queued → sent` with
    /// `sent_at = at` and is returned, ordered by agent then queue order. A command is returned
    /// to exactly one claim, ever; the claim and its answer are one statement, so a caller never
    /// has to guess whether a claim it stopped waiting for took effect.
    async fn claim_queued(
        &self,
        agents: &[Uuid],
        per_agent: usize,
        at: Millis,
    ) -> StoreResult<Vec<Command>>;
    /// Puts claimed commands that were never written to their agent back in the queue, in one
    /// transaction: `sent → queued` with `sent_at` cleared, each only if it is still the claim
    /// identified by `(id, sent_at)`. Idempotent; returns the ids that moved.
    async fn unclaim(&self, claims: &[(Uuid, Millis)]) -> StoreResult<Vec<Uuid>>;
    /// Agents with a queued, unexpired command created at or before `created_before`, at most
    /// `limit` (for the delivery sweep: commands whose wake-up was lost).
    async fn agents_with_queued(
        &self,
        now: Millis,
        created_before: Millis,
        limit: usize,
    ) -> StoreResult<Vec<Uuid>>;
    /// Command counts of one batch by status, counted by the store (a batch's progress must not
    /// read all its commands).
    async fn batch_counts(&self, batch: Uuid) -> StoreResult<Vec<(CommandStatus, u64)>>;
    /// Moves a command from one of `from` to `finish.to`, and appends `audit` (with `ref_id`
    /// set by the caller) in the same transaction. Returns the updated command, or `None`
    /// if its status was not in `from` (nothing written).
    async fn finish_command(
        &self,
        id: Uuid,
        from: &[CommandStatus],
        finish: Finish,
        audit: Option<NewAudit>,
    ) -> StoreResult<Option<Command>>;
    /// Queued commands with `expires_at <= now`, and sent commands with `sent_at <= sent_before`.
    async fn due_for_expiry(&self, now: Millis, sent_before: Millis) -> StoreResult<Vec<Command>>;
    /// Command counts by status (for metrics).
    async fn command_counts(&self) -> StoreResult<Vec<(CommandStatus, u64)>>;
    async fn get_batch(&self, id: Uuid) -> StoreResult<Option<Batch>>;

    // ---- audit ----
    /// Appends one record, chaining its hash to the last one.
    async fn append_audit(&self, audit: NewAudit) -> StoreResult<AuditRecord>;
    async fn query_audit(&self, filter: &AuditFilter) -> StoreResult<Vec<AuditRecord>>;
    /// Records in id order with `id > after`, at most `limit` (for chain verification).
    async fn audit_chain(&self, after: i64, limit: usize) -> StoreResult<Vec<AuditRecord>>;
    /// The records with these ids (those that exist), in id order: a command's queuing record
    /// is read to check the command against it before delivery.
    async fn audit_records(&self, ids: &[i64]) -> StoreResult<Vec<AuditRecord>>;

    /// Flushes and closes (checkpoints the WAL on SQLite).
    async fn close(&self);

    /// Wake-ups from the other processes sharing this store: when one of them queues a command
    /// for an agent connected here, it is named on this feed, so delivery does not wait for
    /// the sweep. `None` for a store no other process can share (SQLite). The feed ends when
    /// the store closes; dropping the receiver stops it.
    fn wake_feed(self: std::sync::Arc<Self>) -> Option<tokio::sync::mpsc::Receiver<Wakeup>> {
        None
    }

    /// The same store's chat tables, when it has them: the chat gateways keep pending
    /// confirmations there so a restart does not void them.
    fn chat_store(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<dyn ChatStore>> {
        None
    }
}

/// What the chat gateways keep (`flotilla_chat::core::state::ChatState` over the store):
/// pending confirmations, so a server restart does not void a preview someone is about to
/// confirm; each thread's context; delivery ids already handled, so a platform retry after a
/// restart still runs nothing twice. Bodies are the chat crate's JSON: the store only keys,
/// times and atomic removal.
#[async_trait::async_trait]
pub trait ChatStore: Send + Sync {
    async fn chat_put_confirmation(
        &self,
        id: &str,
        body: &str,
        expires_at: Millis,
    ) -> StoreResult<()>;
    /// Removes and returns it: of two concurrent takers exactly one gets it.
    async fn chat_take_confirmation(&self, id: &str) -> StoreResult<Option<String>>;
    /// Deletes confirmations that expired at `now`; how many.
    async fn chat_expire_confirmations(&self, now: Millis) -> StoreResult<u64>;
    async fn chat_get_thread(&self, key: &str) -> StoreResult<Option<String>>;
    async fn chat_put_thread(&self, key: &str, body: &str, last_used: Millis) -> StoreResult<()>;
    /// Removes and returns threads last used before `before`.
    async fn chat_take_idle_threads(&self, before: Millis) -> StoreResult<Vec<(String, String)>>;
    /// Records a delivery id (forgetting those seen before `forget_before`); false if known.
    async fn chat_first_delivery(
        &self,
        id: &str,
        now: Millis,
        forget_before: Millis,
    ) -> StoreResult<bool>;
    /// Adds (or replaces) a fleet-alert subscription and appends `audit`, in one transaction.
    async fn chat_put_subscription(
        &self,
        sub: &ChatSubscriptionRow,
        audit: NewAudit,
    ) -> StoreResult<AuditRecord>;
    /// Every subscription's body, oldest first.
    async fn chat_list_subscriptions(&self) -> StoreResult<Vec<String>>;
    /// Removes subscription `id` if it belongs to `(platform, workspace, channel)`, with its
    /// mutes, and appends `audit`, in one transaction; its body, or None (nothing written).
    async fn chat_remove_subscription(
        &self,
        id: &str,
        channel: (&str, &str, &str),
        audit: NewAudit,
    ) -> StoreResult<Option<String>>;
    /// Mutes `agent` for `subscription` until `until` and appends `audit`, in one
    /// transaction; false (nothing written) if the subscription does not exist.
    async fn chat_mute(
        &self,
        subscription: &str,
        agent: &str,
        until: Millis,
        audit: NewAudit,
    ) -> StoreResult<bool>;
    /// Forgets mutes over by `now`; the rest as `(subscription, agent, until)`.
    async fn chat_mutes(&self, now: Millis) -> StoreResult<Vec<(String, String, Millis)>>;
}

/// A fleet-alert subscription as the store keeps it: the channel it posts to (for removal
/// by channel) and the chat crate's JSON.
#[derive(Debug, Clone)]
pub struct ChatSubscriptionRow {
    pub id: String,
    pub platform: String,
    pub workspace: String,
    pub channel: String,
    pub body: String,
    pub created_at: Millis,
}
