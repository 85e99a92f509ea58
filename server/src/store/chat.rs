//! The chat gateways' [`ChatState`] over the store's [`ChatStore`]: pending confirmations,
//! thread contexts and handled delivery ids live in the database, so a restart neither voids
//! a preview someone is about to confirm nor lets a platform retry run an action twice; and
//! fleet-alert subscriptions and mutes, each change audited under the chat user (operations
//! `chat.subscribe`, `chat.unsubscribe`, `chat.mute`) in the transaction that makes it.

use std::sync::Arc;

use async_trait::async_trait;
use flotilla_chat::core::state::{
    ChatState, Mute, PendingConfirmation, Subscription, ThreadState, DELIVERY_MEMORY_MS,
};
use flotilla_chat::{actor, ChatError, ChatUser, ConversationRef};
use serde_json::json;

use super::{ChatStore, ChatSubscriptionRow, StoreError};
use crate::model::NewAudit;

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

/// The audit record of a chat user's change to alerting.
fn audit(
    by: &ChatUser,
    conv: &ConversationRef,
    operation: &str,
    params: serde_json::Value,
) -> NewAudit {
    NewAudit {
        actor: actor(by, conv),
        channel: crate::chat::channel(conv.platform),
        operation: operation.into(),
        targets: Vec::new(),
        params,
        outcome: "ok".into(),
        ref_id: None,
    }
}

fn where_(c: &ConversationRef) -> String {
    format!("{}:{}/{}", c.platform, c.workspace, c.channel)
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

    async fn put_subscription(&self, s: &Subscription) -> Result<(), ChatError> {
        let c = &s.conversation;
        let row = ChatSubscriptionRow {
            id: s.id.clone(),
            platform: c.platform.as_str().into(),
            workspace: c.workspace.clone(),
            channel: c.channel.clone(),
            body: encode(s)?,
            created_at: s.created_at_ms,
        };
        let a = audit(
            &s.created_by,
            c,
            "chat.subscribe",
            json!({"subscription": s.id, "query": s.query, "events": s.events, "where": where_(c)}),
        );
        self.0.chat_put_subscription(&row, a).await.map_err(err)?;
        Ok(())
    }

    async fn list_subscriptions(&self) -> Result<Vec<Subscription>, ChatError> {
        self.0
            .chat_list_subscriptions()
            .await
            .map_err(err)?
            .iter()
            .map(|b| decode("subscription", b))
            .collect()
    }

    async fn remove_subscription(
        &self,
        id: &str,
        channel: &ConversationRef,
        by: &ChatUser,
    ) -> Result<Option<Subscription>, ChatError> {
        let a = audit(
            by,
            channel,
            "chat.unsubscribe",
            json!({"subscription": id, "where": where_(channel)}),
        );
        let key = (
            channel.platform.as_str(),
            channel.workspace.as_str(),
            channel.channel.as_str(),
        );
        match self
            .0
            .chat_remove_subscription(id, key, a)
            .await
            .map_err(err)?
        {
            Some(body) => decode("subscription", &body).map(Some),
            None => Ok(None),
        }
    }

    async fn mute(&self, m: &Mute, by: &ChatUser) -> Result<bool, ChatError> {
        // The actor's workspace is the subscription's; read it so the record says where.
        let subs = self.list_subscriptions().await?;
        let Some(sub) = subs.iter().find(|s| s.id == m.subscription) else {
            return Ok(false);
        };
        let mut a = audit(
            by,
            &sub.conversation,
            "chat.mute",
            json!({"subscription": m.subscription, "until": m.until_ms, "where": where_(&sub.conversation)}),
        );
        a.targets = vec![m.agent.clone()];
        self.0
            .chat_mute(&m.subscription, &m.agent, m.until_ms, a)
            .await
            .map_err(err)
    }

    async fn mutes(&self, now_ms: i64) -> Result<Vec<Mute>, ChatError> {
        Ok(self
            .0
            .chat_mutes(now_ms)
            .await
            .map_err(err)?
            .into_iter()
            .map(|(subscription, agent, until_ms)| Mute {
                subscription,
                agent,
                until_ms,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::Store;
    use flotilla_chat::core::planner::ThreadContext;
    use flotilla_chat::Platform;
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

    #[tokio::test]
    async fn subscriptions_and_mutes_are_kept_removed_by_channel_and_audited() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).await.unwrap());
        let s = StoreChatState(store.clone());
        let conv = pending("x", 0).conversation;
        let ada = pending("x", 0).requester;
        let sub = Subscription {
            id: "s-1".into(),
            conversation: conv.clone(),
            query: "state:offline".into(),
            events: vec!["offline".into(), "recovered".into()],
            created_by: ada.clone(),
            created_at_ms: 5,
        };
        s.put_subscription(&sub).await.unwrap();
        assert_eq!(s.list_subscriptions().await.unwrap(), vec![sub.clone()]);
        let m = Mute {
            subscription: "s-1".into(),
            agent: "u-1".into(),
            until_ms: 10_000,
        };
        assert!(s.mute(&m, &ada).await.unwrap());
        let unknown = Mute {
            subscription: "s-nope".into(),
            ..m.clone()
        };
        assert!(!s.mute(&unknown, &ada).await.unwrap());
        assert_eq!(s.mutes(9_999).await.unwrap(), vec![m.clone()]);
        assert!(s.mutes(10_000).await.unwrap().is_empty(), "expired");
        assert!(s.mute(&m, &ada).await.unwrap());
        // Another channel cannot remove it.
        let other = ConversationRef {
            channel: "C2".into(),
            ..conv.clone()
        };
        assert_eq!(
            s.remove_subscription("s-1", &other, &ada).await.unwrap(),
            None
        );
        assert_eq!(
            s.remove_subscription("s-1", &conv, &ada).await.unwrap(),
            Some(sub)
        );
        assert!(s.list_subscriptions().await.unwrap().is_empty());
        assert!(
            s.mutes(0).await.unwrap().is_empty(),
            "its mutes went with it"
        );
        let trail = store
            .query_audit(&crate::model::AuditFilter::default())
            .await
            .unwrap();
        let ops: Vec<(&str, &str)> = trail
            .iter()
            .map(|r| (r.operation.as_str(), r.actor.as_str()))
            .collect();
        for op in ["chat.subscribe", "chat.mute", "chat.unsubscribe"] {
            assert!(ops.contains(&(op, "slack:T1/U1 (Ada)")), "{op}: {ops:?}");
        }
        // The refused mute and removal wrote nothing.
        assert_eq!(ops.len(), 4, "{ops:?}");
        let mute = trail.iter().find(|r| r.operation == "chat.mute").unwrap();
        assert_eq!(mute.targets, vec!["u-1".to_string()]);
    }
}
