//! Thread sessions without a fleet: idle threads are signed off and forgotten (so "them" no
//! longer means an old search), and the shutdown notice reaches every open thread while
//! keeping its state. Runs the core over `MemoryState` with a recording outbox.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use flotilla_chat::core::gateway::{thread_key, Core, CoreOptions};
use flotilla_chat::core::identity::IdentityConfig;
use flotilla_chat::core::planner::ThreadContext;
use flotilla_chat::core::state::{ChatState, MemoryState, ThreadState};
use flotilla_chat::{
    BackendFor, ChatError, ChatUser, ConversationRef, MessageRef, Outbox, Platform, Reply,
};

#[derive(Default)]
struct Posts(Mutex<Vec<(ConversationRef, String)>>);

#[async_trait]
impl Outbox for Posts {
    async fn post(&self, to: &ConversationRef, reply: &Reply) -> Result<MessageRef, ChatError> {
        self.0
            .lock()
            .unwrap()
            .push((to.clone(), reply.fallback_text()));
        Ok(MessageRef {
            conversation: to.clone(),
            id: "m".into(),
        })
    }
    async fn update(&self, _: &MessageRef, _: &Reply) -> Result<(), ChatError> {
        Ok(())
    }
    async fn ephemeral(
        &self,
        _: &ConversationRef,
        _: &ChatUser,
        _: &Reply,
    ) -> Result<(), ChatError> {
        Ok(())
    }
}

fn conv(thread: &str) -> ConversationRef {
    ConversationRef {
        platform: Platform::Slack,
        workspace: "T1".into(),
        channel: "C1".into(),
        thread: Some(thread.into()),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn idle_threads_are_signed_off_and_shutdown_is_announced() {
    let state = Arc::new(MemoryState::default());
    // No fleet call happens here: a backend factory that is never used.
    let backend_for: BackendFor = Arc::new(|_, _, _| unreachable!("no fleet call in this test"));
    let core = Core::new(
        IdentityConfig::default(),
        backend_for,
        state.clone(),
        CoreOptions {
            idle_after: Duration::from_secs(60),
            ..CoreOptions::default()
        },
    );
    let thread = |c: ConversationRef, at: i64| ThreadState {
        context: ThreadContext {
            last_query: Some("type:fluentd".into()),
            ..ThreadContext::default()
        },
        last_used_ms: at,
        conversation: Some(c),
    };
    let (old, fresh) = (conv("1.1"), conv("2.2"));
    state
        .put_thread(&thread_key(&old), &thread(old.clone(), now_ms() - 120_000))
        .await
        .unwrap();
    state
        .put_thread(&thread_key(&fresh), &thread(fresh.clone(), now_ms()))
        .await
        .unwrap();

    let posts = Posts::default();
    assert_eq!(core.sweep(&posts).await, 1);
    {
        let p = posts.0.lock().unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, old);
        assert!(p[0].1.contains("signing off"), "{}", p[0].1);
    }
    assert_eq!(state.get_thread(&thread_key(&old)).await.unwrap(), None);
    assert!(state
        .get_thread(&thread_key(&fresh))
        .await
        .unwrap()
        .is_some());

    assert_eq!(core.shutdown_notice(&posts).await, 1);
    {
        let p = posts.0.lock().unwrap();
        assert_eq!(p[1].0, fresh);
        assert!(p[1].1.contains("going to bed"), "{}", p[1].1);
    }
    // The thread is kept for after the restart.
    assert!(state
        .get_thread(&thread_key(&fresh))
        .await
        .unwrap()
        .is_some());
}
