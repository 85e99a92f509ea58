//! `Core::handle` end to end against the real `flotilla` binary (started by flotilla-e2e, with
//! simulated OpAMP agents), each chat user's calls going through `RestBackend` — the same
//! `FleetBackend` `flotilla mcp` uses. A recording `Outbox` stands in for the platform.
//! Asserts what the fleet did (commands queued once, or not at all) and what chat was sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use flotilla_chat::core::gateway::{Core, CoreOptions, ACTION_CANCEL, ACTION_CONFIRM};
use flotilla_chat::core::identity::IdentityConfig;
use flotilla_chat::core::state::MemoryState;
use flotilla_chat::{
    BackendFor, Block, ChatError, ChatUser, ConversationRef, Incoming, IncomingKind, MessageRef,
    Outbox, Platform, Reply, Role,
};
use flotilla_e2e::agent::{now_ns, HttpAgent};
use flotilla_e2e::{Home, Server};
use flotilla_mcp::{FleetBackend, RestBackend};
use serde_json::Value;

#[derive(Default)]
pub(crate) struct Recorder {
    next: AtomicU64,
    pub(crate) sent: Mutex<Vec<(String, Reply)>>,
}

#[async_trait]
impl Outbox for Recorder {
    async fn post(&self, to: &ConversationRef, reply: &Reply) -> Result<MessageRef, ChatError> {
        self.sent
            .lock()
            .unwrap()
            .push(("post".into(), reply.clone()));
        Ok(MessageRef {
            conversation: to.clone(),
            id: format!("m{}", self.next.fetch_add(1, Ordering::SeqCst)),
        })
    }
    async fn update(&self, _msg: &MessageRef, reply: &Reply) -> Result<(), ChatError> {
        self.sent
            .lock()
            .unwrap()
            .push(("update".into(), reply.clone()));
        Ok(())
    }
    async fn ephemeral(
        &self,
        _: &ConversationRef,
        _: &ChatUser,
        reply: &Reply,
    ) -> Result<(), ChatError> {
        self.sent
            .lock()
            .unwrap()
            .push(("ephemeral".into(), reply.clone()));
        Ok(())
    }
}

pub(crate) fn user(id: &str, name: &str) -> ChatUser {
    ChatUser {
        id: id.into(),
        name: name.into(),
        groups: vec![],
    }
}

pub(crate) fn conv() -> ConversationRef {
    ConversationRef {
        platform: Platform::Slack,
        workspace: "T1".into(),
        channel: "C1".into(),
        thread: Some("1700000000.000100".into()),
    }
}

pub(crate) struct Setup {
    _home: Home,
    pub(crate) server: Server,
    pub(crate) core: Core,
    pub(crate) outbox: Arc<Recorder>,
    backend_for: BackendFor,
    identity: IdentityConfig,
}

pub(crate) async fn setup(options: CoreOptions, two_person: Option<u64>) -> Setup {
    let home = Home::new();
    let server = Server::start(&home).await;
    let url = server.url("");
    let (op, viewer) = (home.tokens.operator.clone(), home.tokens.viewer.clone());
    let backend_for: BackendFor =
        Arc::new(move |_u: &ChatUser, _c: &ConversationRef, role: Role| {
            let token = if role >= Role::Operator {
                op.clone()
            } else {
                viewer.clone()
            };
            Arc::new(RestBackend::new(&url, Some(token)).unwrap()) as Arc<dyn FleetBackend>
        });
    let mut identity = IdentityConfig::default();
    identity.users.insert("U1".into(), Role::Operator);
    identity.users.insert("U2".into(), Role::Operator);
    identity.groups.insert("S-viewers".into(), Role::Viewer);
    if let Some(n) = two_person {
        identity.two_person.insert("C1".into(), n);
    }
    let core = Core::new(
        identity.clone(),
        backend_for.clone(),
        Arc::new(MemoryState::default()),
        options,
    );
    Setup {
        _home: home,
        server,
        core,
        outbox: Arc::new(Recorder::default()),
        backend_for,
        identity,
    }
}

pub(crate) fn fast() -> CoreOptions {
    CoreOptions {
        progress_every: Duration::from_millis(100),
        ..CoreOptions::default()
    }
}

impl Setup {
    /// A fresh core (fresh state) over the same server and users, with other options.
    pub(crate) fn rebuild(&mut self, options: CoreOptions) {
        self.core = Core::new(
            self.identity.clone(),
            self.backend_for.clone(),
            Arc::new(MemoryState::default()),
            options,
        );
    }

    pub(crate) async fn say(&self, who: &ChatUser, text: &str) -> Vec<Reply> {
        self.core
            .handle(
                Incoming {
                    conversation: conv(),
                    user: who.clone(),
                    kind: IncomingKind::Command { text: text.into() },
                    delivery_id: None,
                },
                self.outbox.clone(),
            )
            .await
    }
    pub(crate) async fn click(
        &self,
        who: &ChatUser,
        action: &str,
        id: &str,
        delivery: Option<&str>,
    ) -> Vec<Reply> {
        self.core
            .handle(
                Incoming {
                    conversation: conv(),
                    user: who.clone(),
                    kind: IncomingKind::Action {
                        action_id: action.into(),
                        value: id.into(),
                        message: Some(MessageRef {
                            conversation: conv(),
                            id: "preview-1".into(),
                        }),
                    },
                    delivery_id: delivery.map(str::to_string),
                },
                self.outbox.clone(),
            )
            .await
    }
    pub(crate) async fn commands(&self) -> Vec<Value> {
        let v = self
            .server
            .get("/api/v1/commands")
            .await
            .expect(200, "commands");
        v["items"].as_array().cloned().unwrap_or_default()
    }
}

pub(crate) async fn agent(server: &Server, name: &str) -> HttpAgent {
    let mut a = HttpAgent::fluent_like(&server.opamp_url(), name);
    let msg = a.full_state();
    a.send(msg).await;
    a
}

/// The confirmation id a preview's Confirm button carries.
pub(crate) fn confirm_id(r: &Reply) -> String {
    r.blocks
        .iter()
        .find_map(|b| match b {
            Block::Buttons(bs) => bs
                .iter()
                .find(|b| b.action_id == ACTION_CONFIRM)
                .map(|b| b.value.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Confirm button in {}", r.fallback_text()))
}

#[tokio::test]
async fn search_then_restart_it_confirmed_once_with_live_progress() {
    let s = setup(fast(), None).await;
    let mut a = agent(&s.server, "web-1").await;
    let _b = agent(&s.server, "web-2").await;
    let (ada, bob, vic) = (
        user("U1", "Ada"),
        user("U2", "Bob"),
        ChatUser {
            groups: vec!["S-viewers".into()],
            ..user("U3", "Vic")
        },
    );

    let r = s.say(&ada, "agents host:web-1-host").await;
    assert!(
        r[0].fallback_text().contains("*1* agent found"),
        "{}",
        r[0].fallback_text()
    );
    assert!(r[0].fallback_text().contains("web-1-host"));

    // "it" is the agent the search showed; the preview comes from the service's plan.
    let r = s.say(&ada, "restart it").await;
    let text = r[0].fallback_text();
    assert!(text.contains("Confirm `restart` on 1 agent?"), "{text}");
    assert!(text.contains("web-1-host"), "{text}");
    let id = confirm_id(&r[0]);
    assert!(s.commands().await.is_empty(), "nothing queued by a preview");

    // A viewer and another operator cannot spend it (and do not use it up).
    let r = s.click(&vic, ACTION_CONFIRM, &id, None).await;
    assert!(
        r[0].ephemeral && r[0].fallback_text().contains("Only Ada can confirm"),
        "{}",
        r[0].fallback_text()
    );
    let r = s.click(&bob, ACTION_CONFIRM, &id, None).await;
    assert!(r[0].ephemeral && r[0].fallback_text().contains("Only Ada"));
    assert!(s.commands().await.is_empty());

    // The requester confirms; a platform retry of the same delivery and a second click do nothing.
    let r = s.click(&ada, ACTION_CONFIRM, &id, Some("trigger-1")).await;
    assert!(
        r[0].fallback_text().contains("Queued by Ada for 1 agent"),
        "{}",
        r[0].fallback_text()
    );
    assert_eq!(
        r[0].replace.as_ref().map(|m| m.id.as_str()),
        Some("preview-1")
    );
    assert!(s
        .click(&ada, ACTION_CONFIRM, &id, Some("trigger-1"))
        .await
        .is_empty());
    let r = s.click(&ada, ACTION_CONFIRM, &id, Some("trigger-2")).await;
    assert!(r[0].ephemeral && r[0].fallback_text().contains("already used"));
    let cmds = s.commands().await;
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(cmds[0]["kind"], "restart");
    assert_eq!(cmds[0]["agent_uid"], a.uid_str());

    // The agent takes the command and comes back restarted: progress ends in a summary.
    let reply = a.send(a.heartbeat()).await;
    assert!(reply.command.is_some(), "the restart is delivered");
    a.start_time_unix_nano = now_ns();
    let mut msg = a.heartbeat();
    msg.health = Some(a.health());
    a.send(msg).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let done = s.outbox.sent.lock().unwrap().iter().any(|(how, r)| {
            how == "update"
                && r.blocks.iter().any(|b| {
                    matches!(
                        b,
                        Block::Progress {
                            done: true,
                            succeeded: 1,
                            ..
                        }
                    )
                })
        });
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no final progress: {:?}",
            s.outbox.sent.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // "what happened to my last command?" now means that command.
    let r = s.say(&ada, "what happened to my last command?").await;
    assert!(
        r[0].fallback_text().contains("succeeded"),
        "{}",
        r[0].fallback_text()
    );
}

#[tokio::test]
async fn refusals_queue_nothing() {
    let s = setup(
        CoreOptions {
            confirm_ttl: Duration::ZERO,
            ..fast()
        },
        None,
    )
    .await;
    let _a = agent(&s.server, "web-1").await;
    let ada = user("U1", "Ada");

    // Unknown user; viewer asking for a restart: private, naming the role needed.
    let r = s.say(&user("U9", "Eve"), "restart web-1-host").await;
    assert!(
        r[0].ephemeral
            && r[0]
                .fallback_text()
                .contains("not mapped to a Flotilla role")
    );
    let vic = ChatUser {
        groups: vec!["S-viewers".into()],
        ..user("U3", "Vic")
    };
    let r = s.say(&vic, "restart web-1-host").await;
    assert!(
        r[0].ephemeral && r[0].fallback_text().contains("needs the *operator* role"),
        "{}",
        r[0].fallback_text()
    );
    // The viewer may still read.
    let r = s.say(&vic, "how many agents are offline?").await;
    assert!(!r[0].ephemeral, "{}", r[0].fallback_text());

    // A guess is asked back, not planned.
    let r = s.say(&ada, "restart the flaky ones").await;
    assert!(
        r[0].fallback_text().contains("I understood"),
        "{}",
        r[0].fallback_text()
    );

    // An expired confirmation (TTL zero here).
    let r = s.say(&ada, "restart web-1-host").await;
    let id = confirm_id(&r[0]);
    let r = s.click(&ada, ACTION_CONFIRM, &id, None).await;
    assert!(
        r[0].fallback_text().contains("expired"),
        "{}",
        r[0].fallback_text()
    );
    assert!(s.commands().await.is_empty());
}

#[tokio::test]
async fn changed_targets_and_two_person_rule() {
    let s = setup(fast(), Some(1)).await;
    let _a = agent(&s.server, "web-1").await;
    let _b = agent(&s.server, "web-2").await;
    let (ada, bob) = (user("U1", "Ada"), user("U2", "Bob"));

    // Two agents > 1: the requester may not confirm alone; another operator may.
    let r = s.say(&ada, "restart type:fluentbit").await;
    assert!(
        r[0].fallback_text().contains("on 2 agents"),
        "{}",
        r[0].fallback_text()
    );
    let id = confirm_id(&r[0]);
    let r = s.click(&ada, ACTION_CONFIRM, &id, None).await;
    assert!(
        r[0].ephemeral && r[0].fallback_text().contains("different operator"),
        "{}",
        r[0].fallback_text()
    );
    assert!(s.commands().await.is_empty());

    // The set changes before the approval: refused, nothing queued.
    let _c = agent(&s.server, "web-3").await;
    let r = s.click(&bob, ACTION_CONFIRM, &id, None).await;
    assert!(
        r[0].fallback_text().contains("targets_changed"),
        "{}",
        r[0].fallback_text()
    );
    assert!(s.commands().await.is_empty());

    // A fresh preview approved by Bob fans out to all three, once.
    let r = s.say(&ada, "restart type:fluentbit").await;
    let id = confirm_id(&r[0]);
    let r = s.click(&bob, ACTION_CONFIRM, &id, None).await;
    assert!(
        r[0].fallback_text().contains("Queued by Bob for 3 agents"),
        "{}",
        r[0].fallback_text()
    );
    assert_eq!(s.commands().await.len(), 3);

    // Cancel by the requester spends it.
    let r = s.say(&ada, "resync web-1-host").await;
    let id = confirm_id(&r[0]);
    let r = s.click(&ada, ACTION_CANCEL, &id, None).await;
    assert!(r[0].fallback_text().contains("Cancelled by Ada"));
    let r = s.click(&ada, ACTION_CONFIRM, &id, None).await;
    assert!(r[0].fallback_text().contains("already used"));
    assert_eq!(s.commands().await.len(), 3);
}
