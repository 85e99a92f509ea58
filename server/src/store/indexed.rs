//! A [`Store`] that keeps the in-memory [`Registry`] index in step with the one it wraps:
//! every agent write is applied to the index after the wrapped store committed it, so the
//! index sees exactly the writes that happened, whichever path made them. Everything else is
//! passed through.

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use super::{ChatStore, Finish, Store, StoreResult, Touch};
use crate::model::{
    Agent, AuditFilter, AuditRecord, Batch, Command, CommandFilter, CommandStatus, DesiredConfig,
    Millis, NewAudit, Transport,
};
use crate::registry::Registry;

pub struct IndexedStore {
    inner: Arc<dyn Store>,
    registry: Arc<Registry>,
}

impl IndexedStore {
    pub fn new(inner: Arc<dyn Store>, registry: Arc<Registry>) -> IndexedStore {
        IndexedStore { inner, registry }
    }
}

#[async_trait]
impl Store for IndexedStore {
    async fn put_agent(&self, agent: &Agent) -> StoreResult<()> {
        self.inner.put_agent(agent).await?;
        self.registry.put_agent(agent);
        Ok(())
    }
    async fn set_desired_config(
        &self,
        uid: Uuid,
        desired: Option<&DesiredConfig>,
    ) -> StoreResult<()> {
        // Configuration bodies are not indexed.
        self.inner.set_desired_config(uid, desired).await
    }
    async fn get_agent(&self, uid: Uuid) -> StoreResult<Option<Agent>> {
        self.inner.get_agent(uid).await
    }
    async fn list_agents(&self, after: Option<Uuid>, limit: usize) -> StoreResult<Vec<Agent>> {
        self.inner.list_agents(after, limit).await
    }
    async fn list_agents_brief(
        &self,
        after: Option<Uuid>,
        limit: usize,
    ) -> StoreResult<Vec<Agent>> {
        self.inner.list_agents_brief(after, limit).await
    }
    async fn touch_agents(&self, touches: &[Touch]) -> StoreResult<()> {
        self.inner.touch_agents(touches).await?;
        self.registry.touch(touches);
        Ok(())
    }
    async fn set_connected(
        &self,
        uid: Uuid,
        connected: bool,
        transport: Option<Transport>,
        remote_addr: Option<String>,
        at: Millis,
    ) -> StoreResult<()> {
        self.inner
            .set_connected(uid, connected, transport, remote_addr.clone(), at)
            .await?;
        self.registry
            .set_connected(uid, connected, transport, remote_addr, at);
        Ok(())
    }
    async fn mark_all_disconnected(&self, at: Millis) -> StoreResult<u64> {
        let n = self.inner.mark_all_disconnected(at).await?;
        self.registry.mark_all_disconnected();
        Ok(n)
    }
    async fn start_replica(&self, id: &str, at: Millis, stale_before: Millis) -> StoreResult<u64> {
        // Called before the index is loaded (which then reads the result), or not at all.
        self.inner.start_replica(id, at, stale_before).await
    }
    async fn replica_heartbeat(
        &self,
        connections: u64,
        at: Millis,
        stale_before: Millis,
        forget_before: Millis,
    ) -> StoreResult<Vec<Uuid>> {
        let released = self
            .inner
            .replica_heartbeat(connections, at, stale_before, forget_before)
            .await?;
        for uid in &released {
            self.registry.set_connected(*uid, false, None, None, at);
        }
        Ok(released)
    }
    async fn replicas(&self) -> StoreResult<Vec<super::ReplicaRow>> {
        self.inner.replicas().await
    }
    async fn rename_agent(&self, old: Uuid, new: Uuid, audit: NewAudit) -> StoreResult<bool> {
        let done = self.inner.rename_agent(old, new, audit).await?;
        if done && old != new {
            self.registry.renamed(old, new);
        }
        Ok(done)
    }
    async fn same_identity(&self, key: &str, uid: Uuid, limit: usize) -> StoreResult<Vec<Uuid>> {
        self.inner.same_identity(key, uid, limit).await
    }
    async fn link_reregistration(
        &self,
        old: Uuid,
        new: Uuid,
        audit: NewAudit,
    ) -> StoreResult<bool> {
        let done = self.inner.link_reregistration(old, new, audit).await?;
        if done {
            self.registry.linked(old, new);
        }
        Ok(done)
    }
    async fn set_label(
        &self,
        uid: Uuid,
        key: &str,
        value: Option<&str>,
        audit: NewAudit,
    ) -> StoreResult<Option<AuditRecord>> {
        let rec = self.inner.set_label(uid, key, value, audit).await?;
        if rec.is_some() {
            self.registry.set_label(uid, key, value);
        }
        Ok(rec)
    }
    async fn enqueue(
        &self,
        batch: Option<&Batch>,
        commands: &[Command],
        audit: NewAudit,
    ) -> StoreResult<AuditRecord> {
        self.inner.enqueue(batch, commands, audit).await
    }
    async fn get_command(&self, id: Uuid) -> StoreResult<Option<Command>> {
        self.inner.get_command(id).await
    }
    async fn list_commands(&self, filter: &CommandFilter) -> StoreResult<Vec<Command>> {
        self.inner.list_commands(filter).await
    }
    async fn queued_for(&self, agent: Uuid, limit: usize) -> StoreResult<Vec<Command>> {
        self.inner.queued_for(agent, limit).await
    }
    async fn sent_for(&self, agent: Uuid) -> StoreResult<Vec<Command>> {
        self.inner.sent_for(agent).await
    }
    async fn claim_queued(
        &self,
        agents: &[Uuid],
        per_agent: usize,
        at: Millis,
    ) -> StoreResult<Vec<Command>> {
        self.inner.claim_queued(agents, per_agent, at).await
    }
    async fn unclaim(&self, claims: &[(Uuid, Millis)]) -> StoreResult<Vec<Uuid>> {
        self.inner.unclaim(claims).await
    }
    async fn agents_with_queued(
        &self,
        now: Millis,
        created_before: Millis,
        limit: usize,
    ) -> StoreResult<Vec<Uuid>> {
        self.inner
            .agents_with_queued(now, created_before, limit)
            .await
    }
    async fn batch_counts(&self, batch: Uuid) -> StoreResult<Vec<(CommandStatus, u64)>> {
        self.inner.batch_counts(batch).await
    }
    async fn finish_command(
        &self,
        id: Uuid,
        from: &[CommandStatus],
        finish: Finish,
        audit: Option<NewAudit>,
    ) -> StoreResult<Option<Command>> {
        self.inner.finish_command(id, from, finish, audit).await
    }
    async fn due_for_expiry(&self, now: Millis, sent_before: Millis) -> StoreResult<Vec<Command>> {
        self.inner.due_for_expiry(now, sent_before).await
    }
    async fn command_counts(&self) -> StoreResult<Vec<(CommandStatus, u64)>> {
        self.inner.command_counts().await
    }
    async fn get_batch(&self, id: Uuid) -> StoreResult<Option<Batch>> {
        self.inner.get_batch(id).await
    }
    async fn append_audit(&self, audit: NewAudit) -> StoreResult<AuditRecord> {
        self.inner.append_audit(audit).await
    }
    async fn query_audit(&self, filter: &AuditFilter) -> StoreResult<Vec<AuditRecord>> {
        self.inner.query_audit(filter).await
    }
    async fn audit_chain(&self, after: i64, limit: usize) -> StoreResult<Vec<AuditRecord>> {
        self.inner.audit_chain(after, limit).await
    }
    async fn audit_records(&self, ids: &[i64]) -> StoreResult<Vec<AuditRecord>> {
        self.inner.audit_records(ids).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
    fn chat_store(self: Arc<Self>) -> Option<Arc<dyn ChatStore>> {
        self.inner.clone().chat_store()
    }
    fn wake_feed(self: Arc<Self>) -> Option<tokio::sync::mpsc::Receiver<super::Wakeup>> {
        self.inner.clone().wake_feed()
    }
}
