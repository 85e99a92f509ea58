//! The chat core over both of its backends against one real server: in-process (the gateways
//! of `flotilla serve`, straight into the service layer) and REST (`flotilla chat`, a gateway
//! token acting for the chat user). The same messages must get the same answers, so a
//! standalone gateway can never plan, resolve or refuse differently from an embedded one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use flotilla_chat::core::gateway::{Core, CoreOptions, ACTION_CONFIRM};
use flotilla_chat::core::identity::IdentityConfig;
use flotilla_chat::core::state::MemoryState;
use flotilla_chat::{
    BackendFor, Block, ChatError, ChatUser, ConversationRef, Incoming, IncomingKind, MessageRef,
    Outbox, Platform, Reply, Role,
};
use flotilla_proto::AgentCapabilities as Cap;

use crate::support::{register_agent, TestServer};

const GATEWAY_TOKEN: &str = "gateway-secret-token-0123456789";

/// Every reply the core sent besides its direct answers.
#[derive(Default)]
struct Sent {
    next: AtomicU64,
    replies: Mutex<Vec<Reply>>,
}

#[async_trait]
impl Outbox for Sent {
    async fn post(&self, to: &ConversationRef, reply: &Reply) -> Result<MessageRef, ChatError> {
        self.replies.lock().unwrap().push(reply.clone());
        Ok(MessageRef {
            conversation: to.clone(),
            id: format!("m{}", self.next.fetch_add(1, Ordering::SeqCst)),
        })
    }
    async fn update(&self, _: &MessageRef, reply: &Reply) -> Result<(), ChatError> {
        self.replies.lock().unwrap().push(reply.clone());
        Ok(())
    }
    async fn ephemeral(
        &self,
        _: &ConversationRef,
        _: &ChatUser,
        r: &Reply,
    ) -> Result<(), ChatError> {
        self.replies.lock().unwrap().push(r.clone());
        Ok(())
    }
}

fn core(backend_for: BackendFor, acting_as: Option<&str>) -> Core {
    let mut identity = IdentityConfig::default();
    identity.users.insert("UOPS".into(), Role::Operator);
    identity.users.insert("UVIEW".into(), Role::Viewer);
    Core::new(
        identity,
        backend_for,
        Arc::new(MemoryState::default()),
        CoreOptions {
            acting_as: acting_as.map(str::to_string),
            ..CoreOptions::default()
        },
    )
}

fn message(user: &str, thread: &str, text: &str) -> Incoming {
    Incoming {
        conversation: ConversationRef {
            platform: Platform::Slack,
            workspace: "T1".into(),
            channel: "C1".into(),
            thread: Some(thread.into()),
        },
        user: ChatUser {
            id: user.into(),
            name: user.to_lowercase(),
            groups: vec![],
        },
        kind: IncomingKind::Command { text: text.into() },
        delivery_id: None,
    }
}

/// A reply with what legitimately differs between two cores blanked: confirmation ids on
/// buttons (random per preview).
fn normalised(mut replies: Vec<Reply>) -> Vec<Reply> {
    for r in &mut replies {
        for b in &mut r.blocks {
            if let Block::Buttons(buttons) = b {
                for button in buttons {
                    button.value.clear();
                }
            }
        }
    }
    replies
}

fn text(replies: &[Reply]) -> String {
    format!("{replies:?}")
}

#[tokio::test]
async fn the_chat_core_answers_alike_in_process_and_over_rest() {
    let server = TestServer::start_with(|c| {
        let tokens = c.api.tokens_file.clone().unwrap();
        let mut text = std::fs::read_to_string(&tokens).unwrap();
        text.push_str(&format!("chatgw operator {GATEWAY_TOKEN} gateway\n"));
        flotilla_e2e::write_secret(&tokens, text);
    })
    .await;
    let caps = Cap::ReportsStatus as u64 | Cap::AcceptsRestartCommand as u64;
    for host in ["web-1", "web-2", "gw-web-host"] {
        register_agent(
            &server,
            &[("host.name", host), ("service.name", "fluent-bit")],
            caps,
            &[],
        )
        .await;
    }
    let embedded = core(
        flotilla_server::chat::Sources::fleet(&server.fleet).backend_for,
        None,
    );
    let rest =
        flotilla_mcp::RestBackend::new(&server.api_url(""), Some(GATEWAY_TOKEN.into())).unwrap();
    let me = rest.whoami().await.unwrap();
    assert_eq!(me["actor"], "chatgw", "{me}");
    assert_eq!(me["gateway"], true, "{me}");
    let standalone = core(
        flotilla_server::chat::rest_backend_for(rest),
        me["actor"].as_str(),
    );
    let outbox = Arc::new(Sent::default());

    // Read-only answers, previews (dry runs, nothing queued), asks-back and refusals.
    let cases = [
        ("UOPS", "agents"),
        ("UOPS", "agents host:web-*"),
        ("UOPS", "summary"),
        ("UOPS", "agent web-1"),
        ("UOPS", "agent gw-web-host"),
        ("UOPS", "agent nosuch-host"),
        ("UOPS", "restart web-1"),
        ("UOPS", "restart gw-web-host"),
        ("UOPS", "restart host:web-*"),
        ("UOPS", "restart nosuch-host"),
        ("UOPS", "restart the flaky ones"),
        ("UOPS", "subscriptions"),
        ("UVIEW", "restart web-1"),
        ("UNKNOWN", "agents"),
    ];
    for (i, (user, said)) in cases.iter().enumerate() {
        let thread = format!("t{i}");
        let a = embedded
            .handle(message(user, &thread, said), outbox.clone())
            .await;
        let b = standalone
            .handle(message(user, &thread, said), outbox.clone())
            .await;
        assert!(!a.is_empty(), "{said:?}: no answer");
        assert_eq!(
            normalised(a),
            normalised(b),
            "{user} {said:?}: in-process (left) and REST (right) answered differently"
        );
    }
    let (s, commands) = server.rest().get("/api/v1/commands").await;
    assert_eq!(s, 200);
    assert_eq!(
        commands["items"],
        serde_json::json!([]),
        "previews queue nothing"
    );

    // A confirmed restart through each, then "my last command" in a fresh thread: each finds
    // its own, though the server audits the REST one as `chatgw for slack:T1/UOPS (uops)`.
    for (n, c) in [(0, &embedded), (1, &standalone)] {
        let preview = c
            .handle(
                message("UOPS", &format!("q{n}"), "restart web-1"),
                outbox.clone(),
            )
            .await;
        let confirm = preview
            .iter()
            .flat_map(|r| &r.blocks)
            .find_map(|b| match b {
                Block::Buttons(bs) => bs.iter().find(|b| b.action_id == ACTION_CONFIRM).cloned(),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no confirm button in {preview:?}"));
        let mut click = message("UOPS", &format!("q{n}"), "");
        click.kind = IncomingKind::Action {
            action_id: ACTION_CONFIRM.into(),
            value: confirm.value,
            message: None,
        };
        c.handle(click, outbox.clone()).await;
        let last = c
            .handle(
                message(
                    "UOPS",
                    &format!("l{n}"),
                    "what happened to my last command?",
                ),
                outbox.clone(),
            )
            .await;
        assert!(
            text(&last).contains("command.queue") && text(&last).contains("restart"),
            "core {n}: my last command not found: {last:?}"
        );
    }
    let (_, commands) = server.rest().get("/api/v1/commands").await;
    assert_eq!(commands["items"].as_array().unwrap().len(), 2, "{commands}");
    let (_, audit) = server
        .rest()
        .get("/api/v1/audit?operation=command.queue")
        .await;
    let mut actors: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["actor"].as_str().unwrap())
        .collect();
    actors.sort();
    assert_eq!(
        actors,
        ["chatgw for slack:T1/UOPS (uops)", "slack:T1/UOPS (uops)"]
    );
}
