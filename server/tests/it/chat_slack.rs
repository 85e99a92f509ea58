//! Slack end to end: a real server with a WebSocket agent connected and the Slack gateway on
//! its own chat listener; requests signed exactly as Slack signs them; a fake Slack Web API on
//! loopback records what Slack was sent. Asserts on what the fleet did (commands queued,
//! delivered once, audit records with the Slack identity and channel `slack`) and on what
//! Slack was sent.

use std::time::Duration;

use flotilla_e2e::fake_slack::{Click, FakeSlack, SlackSigner, SlashCommand};
use flotilla_server::config::Secret;
use serde_json::Value;
use uuid::Uuid;

use crate::console_browser::ws_agent;
use crate::support::TestServer;

pub(crate) const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
pub(crate) const TOKEN: &str = "xoxb-e2e-token";
const WAIT: Duration = Duration::from_secs(20);

struct Rig {
    server: TestServer,
    fake: FakeSlack,
    slack: SlackSigner,
    agent: Uuid,
}

/// The text of the private answer posted to request `trigger`'s response_url, once there is one.
pub(crate) async fn private_answer(fake: &FakeSlack, trigger: &str) -> String {
    fake.wait_for(WAIT, "a private answer", |c| {
        c.iter()
            .any(|c| c.method == "response_url" && c.target.as_deref() == Some(trigger))
    })
    .await;
    let c = fake.calls_of("response_url");
    let c = c
        .iter()
        .find(|c| c.target.as_deref() == Some(trigger))
        .unwrap();
    c.body["text"].as_str().unwrap_or_default().to_string()
}

/// The Slack gateway on the chat listener, talking to the fake Web API at `api_url`.
pub(crate) fn configure(c: &mut flotilla_server::config::Config, api_url: &str) {
    let secret = c.data_dir.join("slack-signing-secret");
    flotilla_e2e::write_secret(&secret, format!("{SECRET}\n"));
    c.chat.listen = Some("127.0.0.1:0".into());
    c.chat.slack.enabled = true;
    c.chat.slack.signing_secret_file = Some(secret);
    c.env_secrets.slack_bot_token = Some(Secret(TOKEN.into()));
    c.chat.slack.api_url = api_url.to_string();
    let users = &mut c.chat.slack.access.users;
    users.insert("UOPS".into(), flotilla_chat::Role::Operator);
    users.insert("UOPS2".into(), flotilla_chat::Role::Operator);
    users.insert("UVIEW".into(), flotilla_chat::Role::Viewer);
}

/// A WebSocket agent (web-ws-1), once the server has stored its first status.
pub(crate) async fn connected_agent(server: &TestServer) -> Uuid {
    let agent = Uuid::now_v7();
    let _conn = ws_agent(server.opamp_ws_url(), agent).await;
    let rest = server.rest();
    for _ in 0..100 {
        if rest.get(&format!("/api/v1/agents/{agent}")).await.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent
}

async fn rig() -> Rig {
    let fake = FakeSlack::start(TOKEN).await;
    let api_url = fake.api_url();
    let server = TestServer::start_with(|c| configure(c, &api_url)).await;
    let agent = connected_agent(&server).await;
    let slack = SlackSigner::new(SECRET, &format!("http://{}", server.chat.unwrap()));
    Rig {
        server,
        fake,
        slack,
        agent,
    }
}

pub(crate) fn cmd<'a>(
    user: &'a str,
    name: &'a str,
    text: &'a str,
    trigger: &'a str,
) -> SlashCommand<'a> {
    SlashCommand {
        team: "T1",
        channel: "C1",
        user,
        user_name: name,
        text,
        trigger_id: trigger,
    }
}

impl Rig {
    async fn commands(&self) -> Vec<Value> {
        let (st, body) = self.server.rest().get("/api/v1/commands").await;
        assert_eq!(st, 200, "{body}");
        body["items"].as_array().cloned().unwrap_or_default()
    }

    /// The private answer posted to a request's response_url.
    async fn private_answer(&self, trigger: &str) -> String {
        private_answer(&self.fake, trigger).await
    }

    fn click<'a>(
        &self,
        user: (&'a str, &'a str),
        ts: &'a str,
        action: &'a str,
        value: &'a str,
        trigger: &'a str,
    ) -> Value {
        Click {
            team: "T1",
            channel: "C1",
            user,
            message_ts: ts,
            thread_ts: None,
            action_id: action,
            value,
            trigger_id: trigger,
        }
        .payload(&self.fake)
    }
}

#[tokio::test]
async fn a_slash_command_restart_is_previewed_confirmed_delivered_once_and_audited() {
    let rig = rig().await;
    // Read: answered in the channel.
    let a = rig
        .slack
        .command(
            &rig.fake,
            &cmd("UVIEW", "vic", "agents host.name:web-ws-1", "t-read"),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    rig.fake
        .wait_for(WAIT, "the search answer", |c| {
            c.iter().any(|c| c.method == "chat.postMessage")
        })
        .await;
    let answer = &rig.fake.calls_of("chat.postMessage")[0].body;
    assert!(answer.to_string().contains("web-ws-1"), "{answer}");

    // Unknown user and viewer: refused privately, nothing queued.
    rig.slack
        .command(
            &rig.fake,
            &cmd("USTRANGER", "eve", "restart web-ws-1", "t-unknown"),
        )
        .await;
    let why = rig.private_answer("t-unknown").await;
    assert!(why.contains("not mapped to a Flotilla role"), "{why}");
    rig.slack
        .command(
            &rig.fake,
            &cmd("UVIEW", "vic", "restart web-ws-1", "t-viewer"),
        )
        .await;
    let why = rig.private_answer("t-viewer").await;
    assert!(why.contains("operator"), "{why}");
    assert!(rig.commands().await.is_empty());

    // The operator's restart: a preview with Confirm / Cancel, nothing queued yet.
    rig.slack
        .command(
            &rig.fake,
            &cmd("UOPS", "ada", "restart web-ws-1", "t-restart"),
        )
        .await;
    rig.fake
        .wait_for(WAIT, "the preview", |c| {
            c.iter().any(|c| {
                c.method == "chat.postMessage" && c.body.to_string().contains("flotilla_confirm")
            })
        })
        .await;
    let posts = rig.fake.calls_of("chat.postMessage");
    let preview = posts
        .iter()
        .find(|c| c.body.to_string().contains("flotilla_confirm"))
        .unwrap();
    let buttons = &preview.body["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "actions")
        .unwrap()["elements"];
    let confirm_id = buttons[0]["value"].as_str().unwrap().to_string();
    assert_eq!(buttons[0]["action_id"], "flotilla_confirm");
    assert!(
        rig.commands().await.is_empty(),
        "nothing queued before the confirm"
    );
    // Another operator cannot confirm someone else's request.
    let other = rig.click(
        ("UOPS2", "bob"),
        "1700000000.000200",
        "flotilla_confirm",
        &confirm_id,
        "t-other",
    );
    assert_eq!(rig.slack.interaction(&other).await.status, 200);
    let why = rig.private_answer("t-other").await;
    assert!(why.to_lowercase().contains("only"), "{why}");
    assert!(rig.commands().await.is_empty());

    // The requester confirms: queued once, delivered to the WebSocket agent.
    let ok = rig.click(
        ("UOPS", "ada"),
        "1700000000.000200",
        "flotilla_confirm",
        &confirm_id,
        "t-confirm",
    );
    assert_eq!(rig.slack.interaction(&ok).await.status, 200);
    rig.fake
        .wait_for(WAIT, "the queued update", |c| {
            c.iter()
                .any(|c| c.method == "chat.update" && c.body.to_string().contains("Queued by ada"))
        })
        .await;
    // A double click (a new interaction): refused, still one command.
    let again = rig.click(
        ("UOPS", "ada"),
        "1700000000.000200",
        "flotilla_confirm",
        &confirm_id,
        "t-double",
    );
    assert_eq!(rig.slack.interaction(&again).await.status, 200);
    let why = rig.private_answer("t-double").await;
    assert!(!why.is_empty());
    let cmds = rig.commands().await;
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(cmds[0]["kind"], "restart");
    assert_eq!(
        cmds[0]["agent_uid"].as_str().map(str::to_string),
        Some(rig.agent.to_string())
    );

    // Live progress reaches a final summary once the agent has restarted.
    rig.fake
        .wait_for(WAIT, "the final summary", |c| {
            c.iter()
                .any(|c| c.method == "chat.update" && c.body.to_string().contains("Finished"))
        })
        .await;
    let (st, cmd) = rig
        .server
        .rest()
        .get(&format!(
            "/api/v1/commands/{}",
            cmds[0]["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(st, 200);
    assert_eq!(cmd["status"], "succeeded", "{cmd}");

    // The audit trail names the Slack user and the channel.
    let (st, audit) = rig.server.rest().get("/api/v1/audit?channel=slack").await;
    assert_eq!(st, 200, "{audit}");
    let items = audit["items"].as_array().unwrap();
    assert!(
        items
            .iter()
            .any(|r| r["actor"] == "slack:T1/UOPS (ada)" && r["channel"] == "slack"),
        "{audit}"
    );
    rig.server.stop().await;
}

/// The preview's Confirm button value, once the preview has been posted.
async fn preview_confirm_id(fake: &FakeSlack) -> String {
    fake.wait_for(WAIT, "the preview", |c| {
        c.iter().any(|c| {
            c.method == "chat.postMessage" && c.body.to_string().contains("flotilla_confirm")
        })
    })
    .await;
    let posts = fake.calls_of("chat.postMessage");
    let preview = posts
        .iter()
        .find(|c| c.body.to_string().contains("flotilla_confirm"))
        .unwrap();
    let actions = preview.body["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "actions")
        .unwrap()
        .clone();
    actions["elements"][0]["value"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_pending_confirmation_survives_a_server_restart() {
    let fake = FakeSlack::start(TOKEN).await;
    let api_url = fake.api_url();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path().to_path_buf(), |c| configure(c, &api_url)).await;
    let agent = connected_agent(&server).await;
    let slack = SlackSigner::new(SECRET, &format!("http://{}", server.chat.unwrap()));
    slack
        .command(&fake, &cmd("UOPS", "ada", "restart web-ws-1", "t-before"))
        .await;
    let confirm_id = preview_confirm_id(&fake).await;
    server.stop().await;

    // A new process on the same data directory: the preview can still be confirmed, once.
    let server = TestServer::start_in(dir.path().to_path_buf(), |c| configure(c, &api_url)).await;
    let slack = SlackSigner::new(SECRET, &format!("http://{}", server.chat.unwrap()));
    let click = Click {
        team: "T1",
        channel: "C1",
        user: ("UOPS", "ada"),
        message_ts: "1700000000.000200",
        thread_ts: None,
        action_id: "flotilla_confirm",
        value: &confirm_id,
        trigger_id: "t-after",
    }
    .payload(&fake);
    assert_eq!(slack.interaction(&click).await.status, 200);
    fake.wait_for(WAIT, "the queued update", |c| {
        c.iter()
            .any(|c| c.method == "chat.update" && c.body.to_string().contains("Queued by ada"))
    })
    .await;
    let (st, body) = server.rest().get("/api/v1/commands").await;
    assert_eq!(st, 200, "{body}");
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{body}");
    assert_eq!(items[0]["kind"], "restart");
    assert_eq!(items[0]["agent_uid"], agent.to_string());
    server.stop().await;
}
