//! A `Store` that can be switched off, wrapping the real SQLite store: proves the server
//! answers "try again later" (OpAMP UNAVAILABLE + RetryInfo, HTTP 503 + Retry-After) when its
//! storage fails, and that nothing already stored is lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use flotilla_server::model::{
    Agent, AuditFilter, AuditRecord, Batch, Command, CommandFilter, CommandStatus, DesiredConfig,
    Millis, NewAudit, Transport,
};
use flotilla_server::store::{Finish, Store, StoreError, StoreResult, Touch};
use uuid::Uuid;

/// The real store, unless `down` is set: then every call fails as a lost database would.
/// `slow_get_ms` delays every `get_agent` (a store under load).
pub struct FlakyStore {
    pub inner: Arc<dyn Store>,
    pub down: Arc<AtomicBool>,
    pub slow_get_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl FlakyStore {
    pub fn wrapping(inner: Arc<dyn Store>, down: Arc<AtomicBool>) -> FlakyStore {
        FlakyStore {
            inner,
            down,
            slow_get_ms: Arc::default(),
        }
    }
}

impl FlakyStore {
    fn check(&self) -> StoreResult<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Io(std::io::Error::other(
                "test: storage switched off",
            )))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for FlakyStore {
    async fn put_agent(&self, agent: &Agent) -> StoreResult<()> {
        self.check()?;
        self.inner.put_agent(agent).await
    }
    async fn set_desired_config(
        &self,
        uid: Uuid,
        desired: Option<&DesiredConfig>,
    ) -> StoreResult<()> {
        self.check()?;
        self.inner.set_desired_config(uid, desired).await
    }
    async fn get_agent(&self, uid: Uuid) -> StoreResult<Option<Agent>> {
        self.check()?;
        let slow = self.slow_get_ms.load(Ordering::SeqCst);
        if slow > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(slow)).await;
        }
        self.inner.get_agent(uid).await
    }
    async fn list_agents(&self, after: Option<Uuid>, limit: usize) -> StoreResult<Vec<Agent>> {
        self.check()?;
        self.inner.list_agents(after, limit).await
    }
    async fn list_agents_brief(
        &self,
        after: Option<Uuid>,
        limit: usize,
    ) -> StoreResult<Vec<Agent>> {
        self.check()?;
        self.inner.list_agents_brief(after, limit).await
    }
    async fn touch_agents(&self, touches: &[Touch]) -> StoreResult<()> {
        self.check()?;
        self.inner.touch_agents(touches).await
    }
    async fn set_connected(
        &self,
        uid: Uuid,
        connected: bool,
        transport: Option<Transport>,
        remote_addr: Option<String>,
        at: Millis,
    ) -> StoreResult<()> {
        self.check()?;
        self.inner
            .set_connected(uid, connected, transport, remote_addr, at)
            .await
    }
    async fn mark_all_disconnected(&self, at: Millis) -> StoreResult<u64> {
        self.check()?;
        self.inner.mark_all_disconnected(at).await
    }
    async fn rename_agent(&self, old: Uuid, new: Uuid, audit: NewAudit) -> StoreResult<bool> {
        self.check()?;
        self.inner.rename_agent(old, new, audit).await
    }
    async fn same_identity(&self, key: &str, uid: Uuid, limit: usize) -> StoreResult<Vec<Uuid>> {
        self.check()?;
        self.inner.same_identity(key, uid, limit).await
    }
    async fn link_reregistration(
        &self,
        old: Uuid,
        new: Uuid,
        audit: NewAudit,
    ) -> StoreResult<bool> {
        self.check()?;
        self.inner.link_reregistration(old, new, audit).await
    }
    async fn set_label(
        &self,
        uid: Uuid,
        key: &str,
        value: Option<&str>,
        audit: NewAudit,
    ) -> StoreResult<Option<AuditRecord>> {
        self.check()?;
        self.inner.set_label(uid, key, value, audit).await
    }
    async fn enqueue(
        &self,
        batch: Option<&Batch>,
        commands: &[Command],
        audit: NewAudit,
    ) -> StoreResult<AuditRecord> {
        self.check()?;
        self.inner.enqueue(batch, commands, audit).await
    }
    async fn get_command(&self, id: Uuid) -> StoreResult<Option<Command>> {
        self.check()?;
        self.inner.get_command(id).await
    }
    async fn list_commands(&self, filter: &CommandFilter) -> StoreResult<Vec<Command>> {
        self.check()?;
        self.inner.list_commands(filter).await
    }
    async fn queued_for(&self, agent: Uuid, limit: usize) -> StoreResult<Vec<Command>> {
        self.check()?;
        self.inner.queued_for(agent, limit).await
    }
    async fn sent_for(&self, agent: Uuid) -> StoreResult<Vec<Command>> {
        self.check()?;
        self.inner.sent_for(agent).await
    }
    async fn mark_sent(&self, id: Uuid, at: Millis) -> StoreResult<bool> {
        self.check()?;
        self.inner.mark_sent(id, at).await
    }
    async fn finish_command(
        &self,
        id: Uuid,
        from: &[CommandStatus],
        finish: Finish,
        audit: Option<NewAudit>,
    ) -> StoreResult<Option<Command>> {
        self.check()?;
        self.inner.finish_command(id, from, finish, audit).await
    }
    async fn due_for_expiry(&self, now: Millis, sent_before: Millis) -> StoreResult<Vec<Command>> {
        self.check()?;
        self.inner.due_for_expiry(now, sent_before).await
    }
    async fn command_counts(&self) -> StoreResult<Vec<(CommandStatus, u64)>> {
        self.check()?;
        self.inner.command_counts().await
    }
    async fn get_batch(&self, id: Uuid) -> StoreResult<Option<Batch>> {
        self.check()?;
        self.inner.get_batch(id).await
    }
    async fn append_audit(&self, audit: NewAudit) -> StoreResult<AuditRecord> {
        self.check()?;
        self.inner.append_audit(audit).await
    }
    async fn query_audit(&self, filter: &AuditFilter) -> StoreResult<Vec<AuditRecord>> {
        self.check()?;
        self.inner.query_audit(filter).await
    }
    async fn audit_chain(&self, after: i64, limit: usize) -> StoreResult<Vec<AuditRecord>> {
        self.check()?;
        self.inner.audit_chain(after, limit).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}
