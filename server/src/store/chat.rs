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
