//! The chat gateways' [`ChatState`] over the store's [`ChatStore`]: pending confirmations,
//! thread contexts and handled delivery ids live in the database, so a restart neither voids
//! a preview someone is about to confirm nor lets a platform retry run an action twice.

use std::sync::Arc;

use async_trait::async_trait;
use flotilla_chat::core::state::{ChatState, PendingConfirmation, ThreadState, DELIVERY_MEMORY_MS};
use flotilla_chat::ChatError;

use super::{ChatStore, StoreError};

/// [`ChatState`] backed by the server's store.
pub struct StoreChatState(pub Arc<dyn ChatStore>);

fn err(e: StoreError) -> ChatError {
    ChatError::State(e.to_string())
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, body: &str) -> Result<T, ChatError> {
    serde_json::from_str(body)
        .map_err(|e| ChatError::State(format!("bad {what} in the store: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<String, ChatError> {
    serde_json::to_string(v).map_err(|e| ChatError::State(e.to_string()))
}

#[async_trait]
impl ChatState for StoreChatState {
    async fn put_confirmation(&self, c: &PendingConfirmation) -> Result<(), ChatError> {
        self.0
            .chat_put_confirmation(&c.id, &encode(c)?, c.expires_at_ms)
            .await
            .map_err(err)
    }

    async fn take_confirmation(&self, id: &str) -> Result<Option<PendingConfirmation>, ChatError> {
        match self.0.chat_take_confirmation(id).await.map_err(err)? {
            Some(body) => decode("confirmation", &body).map(Some),
            None => Ok(None),
        }
    }

    async fn expire_confirmations(&self, now_ms: i64) -> Result<usize, ChatError> {
        Ok(self
            .0
            .chat_expire_confirmations(now_ms)
            .await
            .map_err(err)? as usize)
    }

    async fn get_thread(&self, key: &str) -> Result<Option<ThreadState>, ChatError> {
        match self.0.chat_get_thread(key).await.map_err(err)? {
            Some(body) => decode("thread", &body).map(Some),
            None => Ok(None),
        }
    }

    async fn put_thread(&self, key: &str, state: &ThreadState) -> Result<(), ChatError> {
        self.0
            .chat_put_thread(key, &encode(state)?, state.last_used_ms)
            .await
            .map_err(err)
    }

    async fn take_idle_threads(
        &self,
        before_ms: i64,
    ) -> Result<Vec<(String, ThreadState)>, ChatError> {
        self.0
            .chat_take_idle_threads(before_ms)
            .await
            .map_err(err)?
            .into_iter()
            .map(|(k, body)| decode("thread", &body).map(|s| (k, s)))
            .collect()
    }

    async fn first_delivery(&self, id: &str, now_ms: i64) -> Result<bool, ChatError> {
        self.0
            .chat_first_delivery(id, now_ms, now_ms - DELIVERY_MEMORY_MS)
            .await
            .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::Store;
    use flotilla_chat::core::planner::ThreadContext;
    use flotilla_chat::{ChatUser, ConversationRef, Platform};
    use serde_json::json;

    fn pending(id: &str, expires_at_ms: i64) -> PendingConfirmation {
        PendingConfirmation {
            id: id.into(),
            requester: ChatUser {
                id: "U1".into(),
                name: "Ada".into(),
                groups: vec![],
            },
            conversation: ConversationRef {
                platform: Platform::Slack,
                workspace: "T1".into(),
                channel: "C1".into(),
                thread: None,
            },
            tool: "command_queue".into(),
            args: json!({"agent": "u-1", "kind": "restart"}),
            expect_targets: json!({"count": 1, "digest": "d"}),
            target_count: 1,
            expires_at_ms,
        }
    }

    #[tokio::test]
    async fn confirmations_threads_and_deliveries_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Arc::new(SqliteStore::open(dir.path()).await.unwrap());
            let s = StoreChatState(store.clone());
            s.put_confirmation(&pending("c1", 2_000)).await.unwrap();
            s.put_confirmation(&pending("c2", 500)).await.unwrap();
            let mut t = ThreadState {
                context: ThreadContext::default(),
                last_used_ms: 1_000,
                conversation: None,
            };
            t.context.last_query = Some("type:fluentd".into());
            s.put_thread("slack/T1/C1/-", &t).await.unwrap();
            assert!(s.first_delivery("Ev1", 1_000).await.unwrap());
            store.close().await;
        }
        let s = StoreChatState(Arc::new(SqliteStore::open(dir.path()).await.unwrap()));
        // A retry after the restart is still recognised.
        assert!(!s.first_delivery("Ev1", 1_500).await.unwrap());
        assert_eq!(s.expire_confirmations(1_000).await.unwrap(), 1);
        assert_eq!(
            s.take_confirmation("c1").await.unwrap(),
            Some(pending("c1", 2_000))
        );
        // Single use: the second take finds nothing.
        assert_eq!(s.take_confirmation("c1").await.unwrap(), None);
        assert_eq!(s.take_confirmation("c2").await.unwrap(), None);
        let t = s.get_thread("slack/T1/C1/-").await.unwrap().unwrap();
        assert_eq!(t.context.last_query.as_deref(), Some("type:fluentd"));
        let idle = s.take_idle_threads(1_001).await.unwrap();
        assert_eq!(idle.len(), 1);
        assert_eq!(s.get_thread("slack/T1/C1/-").await.unwrap(), None);
    }
}
