//! Slack Socket Mode end to end: a real server with `chat.slack.mode = "socket"` (no chat
//! listener) opens its WebSocket to a fake Slack on loopback (`apps.connections.open` with the
//! app-level token, then `hello`), receives envelopes shaped as Slack documents them, and
//! acknowledges each; the envelopes reach the same gateway as the HTTP routes. Asserts on the
//! acks, on what the fleet did (queued once, delivered to a WebSocket agent, audited with the
//! Slack identity and its `users.info` display name) and on what Slack was sent.

use std::time::Duration;

use flotilla_e2e::fake_slack::{
    event_body, events_api_envelope, interactive_envelope, slash_commands_envelope, Click,
    FakeSlack,
};
use flotilla_server::config::{Secret, SlackMode};
use serde_json::{json, Value};

use crate::chat_slack::{cmd, connected_agent};
use crate::support::TestServer;

const TOKEN: &str = "xoxb-socket-e2e";
const APP_TOKEN: &str = "xapp-1-A0FLOTILLA-1-socket-e2e";
const WAIT: Duration = Duration::from_secs(20);

struct Rig {
    server: TestServer,
    fake: FakeSlack,
    agent: uuid::Uuid,
}

async fn rig() -> Rig {
    let fake = FakeSlack::start(TOKEN).await;
    fake.accept_app_token(APP_TOKEN);
    // UOPS2 has a profile; UOPS is unknown to users.info (its name falls back to the payload's).
    fake.add_user("UOPS2", "bob", "Bob the Builder", "Robert Builder");
    let api_url = fake.api_url();
    let server = TestServer::start_with(|c| {
        c.chat.slack.enabled = true;
        c.chat.slack.mode = SlackMode::Socket;
        c.env_secrets.slack_bot_token = Some(Secret(TOKEN.into()));
        c.env_secrets.slack_app_token = Some(Secret(APP_TOKEN.into()));
        c.chat.slack.api_url = api_url.clone();
        let users = &mut c.chat.slack.access.users;
        users.insert("UOPS".into(), flotilla_chat::Role::Operator);
        users.insert("UOPS2".into(), flotilla_chat::Role::Operator);
    })
    .await;
    assert!(server.chat.is_none(), "Socket Mode serves no chat listener");
    let agent = connected_agent(&server).await;
    fake.wait_until(WAIT, "a Socket Mode connection", |f| f.sockets_open() >= 1)
        .await;
    Rig {
        server,
        fake,
        agent,
    }
}

/// An Events API body: `user` mentions the app with "restart web-ws-1" at `ts`.
fn mention(event_id: &str, user: &str, ts: &str) -> String {
    event_body(
        "T1",
        event_id,
        json!({"type": "app_mention", "user": user,
               "text": "<@U0FLOTILLA> restart web-ws-1",
               "ts": ts, "channel": "C1", "event_ts": ts}),
    )
}

impl Rig {
    async fn commands(&self) -> Vec<Value> {
        let (st, body) = self.server.rest().get("/api/v1/commands").await;
        assert_eq!(st, 200, "{body}");
        body["items"].as_array().cloned().unwrap_or_default()
    }

    /// The Confirm value of the `n`th preview posted (1-based), once it is there.
    async fn preview(&self, n: usize) -> (String, String) {
        let previews = |c: &[flotilla_e2e::fake_slack::Call]| {
            c.iter()
                .filter(|c| {
                    c.method == "chat.postMessage"
                        && c.body.to_string().contains("flotilla_confirm")
                })
                .count()
        };
        self.fake
            .wait_for(WAIT, "a preview", |c| previews(c) >= n)
            .await;
        let posts = self.fake.calls_of("chat.postMessage");
        let p = posts
            .iter()
            .filter(|c| c.body.to_string().contains("flotilla_confirm"))
            .nth(n - 1)
            .unwrap();
        let actions = p.body["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["type"] == "actions")
            .unwrap()
            .clone();
        (
            actions["elements"][0]["value"]
                .as_str()
                .unwrap()
                .to_string(),
            p.body["thread_ts"].as_str().unwrap_or("").to_string(),
        )
    }

    fn previews(&self) -> usize {
        self.fake
            .calls_of("chat.postMessage")
            .iter()
            .filter(|c| c.body.to_string().contains("flotilla_confirm"))
            .count()
    }

    /// Clicks Confirm over the socket and waits for the command to be queued.
    async fn confirm(&self, user: (&str, &str), value: &str, envelope: &str, trigger: &str) {
        let click = Click {
            team: "T1",
            channel: "C1",
            user,
            message_ts: "1700000000.000200",
            thread_ts: None,
            action_id: "flotilla_confirm",
            value,
            trigger_id: trigger,
        }
        .payload(&self.fake);
        self.fake
            .socket_send(&interactive_envelope(envelope, &click));
        self.fake.wait_ack(WAIT, envelope).await;
    }

    async fn wait_commands(&self, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let c = self.commands().await;
            if c.len() >= n || tokio::time::Instant::now() > deadline {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_status(&self, id: &str, want: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (st, c) = self
                .server
                .rest()
                .get(&format!("/api/v1/commands/{id}"))
                .await;
            assert_eq!(st, 200, "{c}");
            if c["status"] == want || tokio::time::Instant::now() > deadline {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn audit_actors(&self) -> Vec<String> {
        let (st, audit) = self.server.rest().get("/api/v1/audit?channel=slack").await;
        assert_eq!(st, 200, "{audit}");
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["actor"].as_str().map(str::to_string))
            .collect()
    }
}

#[tokio::test]
async fn socket_mode_slash_command_and_mention_are_acked_confirmed_delivered_once_and_audited() {
    let rig = rig().await;
    // The app token opened the connection; the bot token was never offered for it.
    let opens = rig.fake.calls_of("apps.connections.open");
    assert!(!opens.is_empty());
    assert!(opens
        .iter()
        .all(|c| c.authorization.as_deref() == Some(&format!("Bearer {APP_TOKEN}") as &str)));

    // A slash command: acknowledged by envelope id (no inline payload), previewed.
    rig.fake.socket_send(&slash_commands_envelope(
        "env-cmd-1",
        &rig.fake,
        &cmd("UOPS", "ada", "restart web-ws-1", "t-sock-1"),
    ));
    let ack = rig.fake.wait_ack(WAIT, "env-cmd-1").await;
    assert_eq!(ack.payload, None);
    let sent = rig.fake.sent_at("env-cmd-1").unwrap();
    assert!(
        ack.at.duration_since(sent) < Duration::from_secs(3),
        "ack took {:?}",
        ack.at.duration_since(sent)
    );
    let (confirm, _) = rig.preview(1).await;
    assert!(
        rig.commands().await.is_empty(),
        "nothing before the confirm"
    );

    // The button, over the socket: queued once and delivered to the WebSocket agent.
    rig.confirm(("UOPS", "ada"), &confirm, "env-click-1", "t-click-1")
        .await;
    let cmds = rig.wait_commands(1).await;
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(cmds[0]["kind"], "restart");
    assert_eq!(cmds[0]["agent_uid"], rig.agent.to_string());
    let done = rig
        .wait_status(cmds[0]["id"].as_str().unwrap(), "succeeded")
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");

    // An app mention carries only the user id: users.info gives the display name.
    let body = mention("Ev-mention-1", "UOPS2", "1700000100.000100");
    rig.fake
        .socket_send(&events_api_envelope("env-ev-1", &body, 0));
    rig.fake.wait_ack(WAIT, "env-ev-1").await;
    let (confirm2, thread) = rig.preview(2).await;
    assert_eq!(
        thread, "1700000100.000100",
        "answered in the mention's thread"
    );
    rig.confirm(("UOPS2", "bob"), &confirm2, "env-click-2", "t-click-2")
        .await;
    let cmds = rig.wait_commands(2).await;
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    let lookups = rig.fake.calls_of("users.info");
    assert!(
        lookups.iter().any(|c| c.body["user"] == "UOPS2"),
        "{lookups:?}"
    );

    // The audit trail: the slash command's user under the payload's name (users.info did not
    // know them), the mention's under their display name.
    let actors = rig.audit_actors().await;
    assert!(
        actors.iter().any(|a| a == "slack:T1/UOPS (ada)"),
        "{actors:?}"
    );
    assert!(
        actors
            .iter()
            .any(|a| a == "slack:T1/UOPS2 (Bob the Builder)"),
        "{actors:?}"
    );
    // users.info is asked once per user, then cached.
    let asked_bob = rig
        .fake
        .calls_of("users.info")
        .iter()
        .filter(|c| c.body["user"] == "UOPS2")
        .count();
    assert_eq!(asked_bob, 1);
    rig.server.stop().await;
}

#[tokio::test]
async fn a_duplicate_envelope_runs_once_and_a_disconnect_reconnects() {
    let rig = rig().await;
    let body = mention("Ev-dup-1", "UOPS", "1700000200.000100");
    rig.fake
        .socket_send(&events_api_envelope("env-dup-1", &body, 0));
    rig.fake.wait_ack(WAIT, "env-dup-1").await;
    rig.preview(1).await;
    // Slack's retry of the same event (a new envelope, retry_attempt 1) and the very same
    // envelope again: both acknowledged, neither run.
    rig.fake
        .socket_send(&events_api_envelope("env-dup-2", &body, 1));
    rig.fake
        .socket_send(&events_api_envelope("env-dup-1", &body, 0));
    rig.fake
        .wait_until(WAIT, "both duplicates acknowledged", |f| {
            let a = f.acks();
            a.iter().filter(|a| a.envelope_id == "env-dup-1").count() == 2
                && a.iter().any(|a| a.envelope_id == "env-dup-2")
        })
        .await;
    // A later, different command is answered: the duplicates (dispatched before it, and
    // refused before anything was spawned) posted no second preview.
    rig.fake.socket_send(&slash_commands_envelope(
        "env-cmd-2",
        &rig.fake,
        &cmd("UOPS", "ada", "restart web-ws-1", "t-sock-2"),
    ));
    rig.fake.wait_ack(WAIT, "env-cmd-2").await;
    rig.preview(2).await;
    assert_eq!(rig.previews(), 2);

    // Slack asks for a reconnect: a new apps.connections.open and WebSocket, and the
    // gateway still works over it.
    let opened = rig.fake.socket_opens();
    let old = rig.fake.socket_disconnect();
    rig.fake
        .wait_until(WAIT, "a new connection", |f| {
            f.socket_opens() > opened && f.sockets_open() >= 1
        })
        .await;
    let body = mention("Ev-after-1", "UOPS", "1700000300.000100");
    let via = rig
        .fake
        .socket_send(&events_api_envelope("env-after-1", &body, 0));
    assert_ne!(via, old);
    let ack = rig.fake.wait_ack(WAIT, "env-after-1").await;
    assert_eq!(ack.connection, via);
    rig.preview(3).await;
    assert!(rig.commands().await.is_empty());
    rig.server.stop().await;
}
