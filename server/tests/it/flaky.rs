//! A `Store` that can be switched off or slowed down, wrapping the real SQLite store (every call
//! still reaches it): proves the server answers "try again later" (OpAMP UNAVAILABLE +
//! RetryInfo, HTTP 503 + Retry-After) when its storage fails, that nothing already stored is
//! lost, and (`latency`) that a slow store — calls that answer late, claims that commit and
//! then answer after the caller gave up — never strands or duplicates a command.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use flotilla_server::model::{
    Agent, AuditFilter, AuditRecord, Batch, Command, CommandFilter, CommandStatus, DesiredConfig,
    Millis, NewAudit, Transport,
};
use flotilla_server::store::{Finish, Store, StoreError, StoreResult, Touch};
use uuid::Uuid;

/// The real store, unless `down` is set: then every call fails as a lost database would.
/// `slow_get_ms` delays every `get_agent` (a store under load); `latency` slows every call.
pub struct FlakyStore {
    pub inner: Arc<dyn Store>,
    pub down: Arc<AtomicBool>,
    pub slow_get_ms: Arc<AtomicU64>,
    pub latency: Arc<Latency>,
}

/// Injected store latency, changeable while the server runs. Each call waits a random
/// 0..=`max_ms` before reaching the real store and again before answering; the first and
/// then every `stall_claim_every`-th claim that took something answers `stall_claim_ms` late
/// *after* its transaction
/// committed, which is how a claim that "timed out" can have taken effect.
#[derive(Default)]
pub struct Latency {
    pub max_ms: AtomicU64,
    pub stall_claim_every: AtomicU64,
    pub stall_claim_ms: AtomicU64,
    claims: AtomicU64,
    pub stalled_claims: AtomicU64,
}

impl Latency {
    async fn jitter(&self) {
        let max = self.max_ms.load(Ordering::Relaxed);
        if max > 0 {
            let ms = rand::random::<u64>() % (max + 1);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    }
}

impl FlakyStore {
    pub fn wrapping(inner: Arc<dyn Store>, down: Arc<AtomicBool>) -> FlakyStore {
        FlakyStore {
            inner,
            down,
            slow_get_ms: Arc::default(),
            latency: Arc::default(),
        }
    }

    /// A store that is never switched off, only slowed by `latency`.
    pub fn slow(inner: Arc<dyn Store>, latency: Arc<Latency>) -> FlakyStore {
        FlakyStore {
            latency,
            ..FlakyStore::wrapping(inner, Arc::default())
        }
    }

    /// Before a call reaches the real store: fails if switched off, else waits the jitter.
    async fn check(&self) -> StoreResult<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Io(std::io::Error::other(
                "test: storage switched off",
            )))
        } else {
            self.latency.jitter().await;
            Ok(())
        }
    }

    /// After the real store answered, before the caller sees it.
    async fn answer<T>(&self, r: T) -> T {
        self.latency.jitter().await;
        r
    }
}

#[async_trait]
impl Store for FlakyStore {
    async fn put_agent(&self, agent: &Agent) -> StoreResult<()> {
        self.check().await?;
        let r = self.inner.put_agent(agent).await;
        self.answer(r).await
    }
    async fn set_desired_config(
        &self,
        uid: Uuid,
        desired: Option<&DesiredConfig>,
    ) -> StoreResult<()> {
        self.check().await?;
        let r = self.inner.set_desired_config(uid, desired).await;
        self.answer(r).await
    }
    async fn get_agent(&self, uid: Uuid) -> StoreResult<Option<Agent>> {
        self.check().await?;
        let slow = self.slow_get_ms.load(Ordering::SeqCst);
        if slow > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(slow)).await;
        }
        let r = self.inner.get_agent(uid).await;
        self.answer(r).await
    }
    async fn list_agents(&self, after: Option<Uuid>, limit: usize) -> StoreResult<Vec<Agent>> {
        self.check().await?;
        let r = self.inner.list_agents(after, limit).await;
        self.answer(r).await
    }
    async fn list_agents_brief(
        &self,
        after: Option<Uuid>,
        limit: usize,
    ) -> StoreResult<Vec<Agent>> {
        self.check().await?;
        let r = self.inner.list_agents_brief(after, limit).await;
        self.answer(r).await
    }
    async fn touch_agents(&self, touches: &[Touch]) -> StoreResult<()> {
        self.check().await?;
        let r = self.inner.touch_agents(touches).await;
        self.answer(r).await
    }
    async fn set_connected(
        &self,
        uid: Uuid,
        connected: bool,
        transport: Option<Transport>,
        remote_addr: Option<String>,
        at: Millis,
    ) -> StoreResult<()> {
        self.check().await?;
        let r = self
            .inner
            .set_connected(uid, connected, transport, remote_addr, at)
            .await;
        self.answer(r).await
    }
    async fn mark_all_disconnected(&self, at: Millis) -> StoreResult<u64> {
        self.check().await?;
        let r = self.inner.mark_all_disconnected(at).await;
        self.answer(r).await
    }
    async fn start_replica(&self, id: &str, at: Millis, stale_before: Millis) -> StoreResult<u64> {
        self.check().await?;
        let r = self.inner.start_replica(id, at, stale_before).await;
        self.answer(r).await
    }
    async fn replica_heartbeat(
        &self,
        connections: u64,
        at: Millis,
        stale_before: Millis,
        forget_before: Millis,
    ) -> StoreResult<Vec<Uuid>> {
        self.check().await?;
        let r = self
            .inner
            .replica_heartbeat(connections, at, stale_before, forget_before)
            .await;
        self.answer(r).await
    }
    async fn replicas(&self) -> StoreResult<Vec<flotilla_server::store::ReplicaRow>> {
        self.check().await?;
        let r = self.inner.replicas().await;
        self.answer(r).await
    }
    async fn rename_agent(&self, old: Uuid, new: Uuid, audit: NewAudit) -> StoreResult<bool> {
        self.check().await?;
        let r = self.inner.rename_agent(old, new, audit).await;
        self.answer(r).await
    }
    async fn same_identity(&self, key: &str, uid: Uuid, limit: usize) -> StoreResult<Vec<Uuid>> {
        self.check().await?;
        let r = self.inner.same_identity(key, uid, limit).await;
        self.answer(r).await
    }
    async fn link_reregistration(
        &self,
        old: Uuid,
        new: Uuid,
        audit: NewAudit,
    ) -> StoreResult<bool> {
        self.check().await?;
        let r = self.inner.link_reregistration(old, new, audit).await;
        self.answer(r).await
    }
    async fn set_label(
        &self,
        uid: Uuid,
        key: &str,
        value: Option<&str>,
        audit: NewAudit,
    ) -> StoreResult<Option<AuditRecord>> {
        self.check().await?;
        let r = self.inner.set_label(uid, key, value, audit).await;
        self.answer(r).await
    }
    async fn enqueue(
        &self,
        batch: Option<&Batch>,
        commands: &[Command],
        audit: NewAudit,
    ) -> StoreResult<AuditRecord> {
        self.check().await?;
        let r = self.inner.enqueue(batch, commands, audit).await;
        self.answer(r).await
    }
    async fn get_command(&self, id: Uuid) -> StoreResult<Option<Command>> {
        self.check().await?;
        let r = self.inner.get_command(id).await;
        self.answer(r).await
    }
    async fn list_commands(&self, filter: &CommandFilter) -> StoreResult<Vec<Command>> {
        self.check().await?;
        let r = self.inner.list_commands(filter).await;
        self.answer(r).await
    }
    async fn queued_for(&self, agent: Uuid, limit: usize) -> StoreResult<Vec<Command>> {
        self.check().await?;
        let r = self.inner.queued_for(agent, limit).await;
        self.answer(r).await
    }
    async fn sent_for(&self, agent: Uuid) -> StoreResult<Vec<Command>> {
        self.check().await?;
        let r = self.inner.sent_for(agent).await;
        self.answer(r).await
    }
    async fn claim_queued(
        &self,
        agents: &[Uuid],
        per_agent: usize,
        at: Millis,
    ) -> StoreResult<Vec<Command>> {
        self.check().await?;
        let r = self.inner.claim_queued(agents, per_agent, at).await;
        let l = &self.latency;
        let every = l.stall_claim_every.load(Ordering::Relaxed);
        // Only claims that took something count, and the first of them stalls: claims of many
        // agents share one transaction, so a run may see only a few that took anything, and
        // counting every call let all of them miss the stall by chance.
        let took = r.as_ref().is_ok_and(|c| !c.is_empty());
        let n = if took {
            l.claims.fetch_add(1, Ordering::Relaxed)
        } else {
            u64::MAX
        };
        if every > 0 && took && n.is_multiple_of(every) {
            // Committed; the answer is what is late.
            l.stalled_claims.fetch_add(1, Ordering::Relaxed);
            let ms = l.stall_claim_ms.load(Ordering::Relaxed);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        self.answer(r).await
    }
    async fn unclaim(&self, claims: &[(Uuid, Millis)]) -> StoreResult<Vec<Uuid>> {
        self.check().await?;
        let r = self.inner.unclaim(claims).await;
        self.answer(r).await
    }
    async fn agents_with_queued(
        &self,
        now: Millis,
        created_before: Millis,
        limit: usize,
    ) -> StoreResult<Vec<Uuid>> {
        self.check().await?;
        let r = self
            .inner
            .agents_with_queued(now, created_before, limit)
            .await;
        self.answer(r).await
    }
    async fn batch_counts(&self, batch: Uuid) -> StoreResult<Vec<(CommandStatus, u64)>> {
        self.check().await?;
        let r = self.inner.batch_counts(batch).await;
        self.answer(r).await
    }
    async fn finish_command(
        &self,
        id: Uuid,
        from: &[CommandStatus],
        finish: Finish,
        audit: Option<NewAudit>,
    ) -> StoreResult<Option<Command>> {
        self.check().await?;
        let r = self.inner.finish_command(id, from, finish, audit).await;
        self.answer(r).await
    }
    async fn due_for_expiry(&self, now: Millis, sent_before: Millis) -> StoreResult<Vec<Command>> {
        self.check().await?;
        let r = self.inner.due_for_expiry(now, sent_before).await;
        self.answer(r).await
    }
    async fn command_counts(&self) -> StoreResult<Vec<(CommandStatus, u64)>> {
        self.check().await?;
        let r = self.inner.command_counts().await;
        self.answer(r).await
    }
    async fn get_batch(&self, id: Uuid) -> StoreResult<Option<Batch>> {
        self.check().await?;
        let r = self.inner.get_batch(id).await;
        self.answer(r).await
    }
    async fn append_audit(&self, audit: NewAudit) -> StoreResult<AuditRecord> {
        self.check().await?;
        let r = self.inner.append_audit(audit).await;
        self.answer(r).await
    }
    async fn query_audit(&self, filter: &AuditFilter) -> StoreResult<Vec<AuditRecord>> {
        self.check().await?;
        let r = self.inner.query_audit(filter).await;
        self.answer(r).await
    }
    async fn audit_chain(&self, after: i64, limit: usize) -> StoreResult<Vec<AuditRecord>> {
        self.check().await?;
        let r = self.inner.audit_chain(after, limit).await;
        self.answer(r).await
    }
    async fn audit_records(&self, ids: &[i64]) -> StoreResult<Vec<AuditRecord>> {
        self.check().await?;
        let r = self.inner.audit_records(ids).await;
        self.answer(r).await
    }
    fn chat_store(self: Arc<Self>) -> Option<Arc<dyn flotilla_server::store::ChatStore>> {
        self.inner.clone().chat_store()
    }

    async fn close(&self) {
        self.inner.close().await
    }
}
