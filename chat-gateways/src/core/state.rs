//! [`ChatState`]: what the core keeps between messages — pending confirmations (which must
//! survive a restart, so the server implements this over its store), each thread's context,
//! and platform delivery ids already handled. [`MemoryState`] serves tests and embedders
//! without a store.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::planner::ThreadContext;
use super::types::{ChatError, ChatUser, ConversationRef};

/// A previewed state-changing call waiting for its Confirm button.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingConfirmation {
    /// Random id carried by the buttons.
    pub id: String,
    pub requester: ChatUser,
    pub conversation: ConversationRef,
    /// The MCP tool and its arguments, the target resolved (an agent by uid).
    pub tool: String,
    pub args: Value,
    /// The service's plan's `expect_targets`: queuing is refused if the set changed.
    pub expect_targets: Value,
    pub target_count: u64,
    /// Unix milliseconds after which it is void.
    pub expires_at_ms: i64,
}

/// A thread's remembered context and when it was last used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ThreadState {
    pub context: ThreadContext,
    pub last_used_ms: i64,
    /// Where the thread is, for the sign-off and the shutdown notice.
    #[serde(default)]
    pub conversation: Option<ConversationRef>,
}

/// The core's persistent state. `take_confirmation` removes atomically: of two concurrent
/// takers (a double click) exactly one gets it.
#[async_trait]
pub trait ChatState: Send + Sync {
    async fn put_confirmation(&self, c: &PendingConfirmation) -> Result<(), ChatError>;
    async fn take_confirmation(&self, id: &str) -> Result<Option<PendingConfirmation>, ChatError>;
    /// Drops confirmations expired at `now_ms`; how many.
    async fn expire_confirmations(&self, now_ms: i64) -> Result<usize, ChatError>;
    async fn get_thread(&self, key: &str) -> Result<Option<ThreadState>, ChatError>;
    async fn put_thread(&self, key: &str, state: &ThreadState) -> Result<(), ChatError>;
    /// Removes and returns threads idle since before `before_ms` (for the sign-off).
    async fn take_idle_threads(
        &self,
        before_ms: i64,
    ) -> Result<Vec<(String, ThreadState)>, ChatError>;
    /// Records a platform delivery id; false if it was seen before (a retry).
    async fn first_delivery(&self, id: &str, now_ms: i64) -> Result<bool, ChatError>;
}

/// [`ChatState`] in memory: lost on restart.
#[derive(Default)]
pub struct MemoryState {
    confirmations: Mutex<HashMap<String, PendingConfirmation>>,
    threads: Mutex<HashMap<String, ThreadState>>,
    deliveries: Mutex<HashMap<String, i64>>,
}

/// How long a delivery id is remembered (Slack retries within minutes).
pub const DELIVERY_MEMORY_MS: i64 = 60 * 60 * 1000;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl ChatState for MemoryState {
    async fn put_confirmation(&self, c: &PendingConfirmation) -> Result<(), ChatError> {
        lock(&self.confirmations).insert(c.id.clone(), c.clone());
        Ok(())
    }
    async fn take_confirmation(&self, id: &str) -> Result<Option<PendingConfirmation>, ChatError> {
        Ok(lock(&self.confirmations).remove(id))
    }
    async fn expire_confirmations(&self, now_ms: i64) -> Result<usize, ChatError> {
        let mut c = lock(&self.confirmations);
        let before = c.len();
        c.retain(|_, p| p.expires_at_ms > now_ms);
        Ok(before - c.len())
    }
    async fn get_thread(&self, key: &str) -> Result<Option<ThreadState>, ChatError> {
        Ok(lock(&self.threads).get(key).cloned())
    }
    async fn put_thread(&self, key: &str, state: &ThreadState) -> Result<(), ChatError> {
        lock(&self.threads).insert(key.to_string(), state.clone());
        Ok(())
    }
    async fn take_idle_threads(
        &self,
        before_ms: i64,
    ) -> Result<Vec<(String, ThreadState)>, ChatError> {
        let mut t = lock(&self.threads);
        let idle: Vec<String> = t
            .iter()
            .filter(|(_, s)| s.last_used_ms < before_ms)
            .map(|(k, _)| k.clone())
            .collect();
        Ok(idle
            .into_iter()
            .filter_map(|k| t.remove(&k).map(|s| (k, s)))
            .collect())
    }
    async fn first_delivery(&self, id: &str, now_ms: i64) -> Result<bool, ChatError> {
        let mut d = lock(&self.deliveries);
        d.retain(|_, at| *at > now_ms - DELIVERY_MEMORY_MS);
        Ok(d.insert(id.to_string(), now_ms).is_none())
    }
}
