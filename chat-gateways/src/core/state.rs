//! [`ChatState`]: what the core keeps between messages — pending confirmations (which must
//! survive a restart, so the server implements this over its store), each thread's context,
//! platform delivery ids already handled, and fleet-alert [`Subscription`]s with their
//! [`Mute`]s. [`MemoryState`] serves tests and embedders without a store.

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

/// A channel's subscription to fleet alerts (`subscribe <query> [events]`): events of the
/// `events` kinds about agents matching `query` are posted to `conversation` (a channel: no
/// thread).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// Short id the channel types to remove it (`unsubscribe <id>`).
    pub id: String,
    pub conversation: ConversationRef,
    /// The search language, as typed.
    pub query: String,
    /// Event kinds (`unhealthy`, `offline`, `recovered`, `command_failed`, `config_failed`);
    /// resolved when subscribing, never empty.
    pub events: Vec<String>,
    pub created_by: ChatUser,
    pub created_at_ms: i64,
}

/// One agent silenced for one subscription until `until_ms` (the alert's Mute button).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mute {
    pub subscription: String,
    pub agent: String,
    pub until_ms: i64,
}

fn no_subscriptions<T>() -> Result<T, ChatError> {
    Err(ChatError::State(
        "alert subscriptions are not kept by this state".into(),
    ))
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

    // Fleet alerts. Subscribing, unsubscribing and muting change what the server does, so a
    // store-backed state audits them under `by`, with the change, in one transaction. The
    // defaults refuse, for states that do not keep subscriptions.

    /// Adds a subscription (made by `s.created_by`).
    async fn put_subscription(&self, _s: &Subscription) -> Result<(), ChatError> {
        no_subscriptions()
    }
    /// Every subscription, oldest first.
    async fn list_subscriptions(&self) -> Result<Vec<Subscription>, ChatError> {
        no_subscriptions()
    }
    /// Removes subscription `id` if it posts to `channel`'s channel (another channel's is
    /// left alone), with its mutes; the removed subscription.
    async fn remove_subscription(
        &self,
        _id: &str,
        _channel: &ConversationRef,
        _by: &ChatUser,
    ) -> Result<Option<Subscription>, ChatError> {
        no_subscriptions()
    }
    /// Mutes an agent for a subscription; false if the subscription does not exist.
    async fn mute(&self, _m: &Mute, _by: &ChatUser) -> Result<bool, ChatError> {
        no_subscriptions()
    }
    /// The mutes still in force at `now_ms` (expired ones are forgotten).
    async fn mutes(&self, _now_ms: i64) -> Result<Vec<Mute>, ChatError> {
        no_subscriptions()
    }
}

/// Whether two conversations are the same channel (threads aside).
pub fn same_channel(a: &ConversationRef, b: &ConversationRef) -> bool {
    a.platform == b.platform && a.workspace == b.workspace && a.channel == b.channel
}

/// [`ChatState`] in memory: lost on restart.
#[derive(Default)]
pub struct MemoryState {
    confirmations: Mutex<HashMap<String, PendingConfirmation>>,
    threads: Mutex<HashMap<String, ThreadState>>,
    deliveries: Mutex<HashMap<String, i64>>,
    subscriptions: Mutex<Vec<Subscription>>,
    mutes: Mutex<HashMap<(String, String), i64>>,
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

    async fn put_subscription(&self, s: &Subscription) -> Result<(), ChatError> {
        let mut subs = lock(&self.subscriptions);
        subs.retain(|x| x.id != s.id);
        subs.push(s.clone());
        Ok(())
    }
    async fn list_subscriptions(&self) -> Result<Vec<Subscription>, ChatError> {
        Ok(lock(&self.subscriptions).clone())
    }
    async fn remove_subscription(
        &self,
        id: &str,
        channel: &ConversationRef,
        _by: &ChatUser,
    ) -> Result<Option<Subscription>, ChatError> {
        let mut subs = lock(&self.subscriptions);
        let Some(i) = subs
            .iter()
            .position(|s| s.id == id && same_channel(&s.conversation, channel))
        else {
            return Ok(None);
        };
        lock(&self.mutes).retain(|(sub, _), _| sub != id);
        Ok(Some(subs.remove(i)))
    }
    async fn mute(&self, m: &Mute, _by: &ChatUser) -> Result<bool, ChatError> {
        if !lock(&self.subscriptions)
            .iter()
            .any(|s| s.id == m.subscription)
        {
            return Ok(false);
        }
        lock(&self.mutes).insert((m.subscription.clone(), m.agent.clone()), m.until_ms);
        Ok(true)
    }
    async fn mutes(&self, now_ms: i64) -> Result<Vec<Mute>, ChatError> {
        let mut mutes = lock(&self.mutes);
        mutes.retain(|_, until| *until > now_ms);
        Ok(mutes
            .iter()
            .map(|((s, a), until)| Mute {
                subscription: s.clone(),
                agent: a.clone(),
                until_ms: *until,
            })
            .collect())
    }
}
