//! Discord end to end: a real server with an agent connected and the Discord gateway on its
//! chat listener, driven by interactions signed with a test Ed25519 key exactly as Discord
//! signs them; a fake Discord REST API on loopback records the webhook edits, follow-ups and
//! channel posts. Asserts on what the fleet did (commands queued once, audit records with the
//! Discord identity and channel `discord`) and on what Discord was sent.

use std::time::Duration;

use flotilla_e2e::fake_discord::{
    custom_ids, now_s, text_of, Answer, DiscordSigner, FakeDiscord, Member,
};
use flotilla_server::config::Secret;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::chat_alerts::{agents, health};
use crate::chat_slack::connected_agent;
use crate::support::TestServer;

const APP: &str = "900000000000000077";
const TOKEN: &str = "e2e-discord-bot-token";
const SEED: [u8; 32] = [9u8; 32];
const WAIT: Duration = Duration::from_secs(20);

/// Mapped by user id, in guild G1 only.
const ADA: Member = Member {
    guild: "G1",
    channel: "C1",
    user: "U-ops",
    name: "Ada",
    roles: &[],
};
/// Another operator, through a guild role.
const BOB: Member = Member {
    guild: "G1",
    channel: "C1",
    user: "U-bob",
    name: "Bob",
    roles: &["R-ops"],
};
/// A viewer, through a guild role.
const VIC: Member = Member {
    guild: "G1",
    channel: "C1",
    user: "U-vic",
    name: "Vic",
    roles: &["R-view"],
};
/// Nobody mapped them.
const EVE: Member = Member {
    guild: "G1",
    channel: "C1",
    user: "U-eve",
    name: "Eve",
    roles: &["R-other"],
};

struct Rig {
    server: TestServer,
    fake: FakeDiscord,
    discord: DiscordSigner,
    agent: Uuid,
}

async fn rig() -> Rig {
    let fake = FakeDiscord::start(APP, TOKEN).await;
    let api_url = fake.api_url();
    let key = DiscordSigner::new(SEED, "http://unused").public_key_hex();
    let server = TestServer::start_with(|c| {
        c.chat.listen = Some("127.0.0.1:0".into());
        let d = &mut c.chat.discord;
        d.enabled = true;
        d.application_id = APP.into();
        d.public_key = key;
        d.api_url = api_url;
        d.access
            .users
            .insert("G1/U-ops".into(), flotilla_chat::Role::Operator);
        d.access
            .groups
            .insert("R-ops".into(), flotilla_chat::Role::Operator);
        d.access
            .groups
            .insert("R-view".into(), flotilla_chat::Role::Viewer);
        c.env_secrets.discord_bot_token = Some(Secret(TOKEN.into()));
    })
    .await;
    let agent = connected_agent(&server).await;
    let discord = DiscordSigner::new(SEED, &format!("http://{}", server.chat.unwrap()));
    Rig {
        server,
        fake,
        discord,
        agent,
    }
}

impl Rig {
    async fn commands(&self) -> Vec<Value> {
        let (st, body) = self.server.rest().get("/api/v1/commands").await;
        assert_eq!(st, 200, "{body}");
        body["items"].as_array().cloned().unwrap_or_default()
    }

    /// Sends `interaction` and returns the message it was answered with: the response's data
    /// when answered at once, else what completed it through its webhook.
    async fn reply(&self, interaction: &Value) -> Value {
        let a = self.discord.send(interaction).await;
        assert_eq!(a.status, 200, "{}", a.text);
        self.reply_of(interaction, &a).await
    }

    async fn reply_of(&self, interaction: &Value, a: &Answer) -> Value {
        match a.json["type"].as_u64() {
            Some(4) | Some(7) => a.json["data"].clone(),
            Some(5) | Some(6) => {
                let id = interaction["id"].as_str().unwrap().to_string();
                let done = |c: &[flotilla_e2e::fake_discord::Call]| {
                    c.iter().any(|c| {
                        c.target == id && (c.route == "edit_original" || c.route == "followup")
                    })
                };
                self.fake.wait_for(WAIT, "the deferred answer", done).await;
                self.fake
                    .calls()
                    .into_iter()
                    .find(|c| {
                        c.target == id && (c.route == "edit_original" || c.route == "followup")
                    })
                    .unwrap()
                    .body
            }
            _ => panic!("not an answer to a command: {}", a.text),
        }
    }
}

fn button(message: &Value, action: &str) -> String {
    custom_ids(message)
        .into_iter()
        .find(|c| c.starts_with(&format!("{action}:")))
        .unwrap_or_else(|| panic!("no {action} button in {message}"))
}

#[tokio::test]
async fn a_discord_restart_is_previewed_confirmed_once_followed_and_audited() {
    let rig = rig().await;

    // Discord checking the endpoint.
    let ping = rig
        .discord
        .send(&json!({"type": 1, "id": "1", "application_id": APP}))
        .await;
    assert_eq!((ping.status, ping.json.clone()), (200, json!({"type": 1})));

    // A read: answered in the channel.
    let found = rig
        .reply(&ADA.command(&rig.fake, "agents", &[("query", "host.name:web-ws-1")]))
        .await;
    assert!(text_of(&found).contains("web-ws-1"), "{found}");

    // A restart: previewed with Confirm (public), nothing queued.
    let preview = rig
        .reply(&ADA.command(&rig.fake, "restart", &[("target", "web-ws-1")]))
        .await;
    assert!(preview.get("flags").is_none(), "a preview is public");
    let confirm = button(&preview, "flotilla_confirm");
    assert!(rig.commands().await.is_empty());

    // The preview is a message of the bot's now; Ada clicks Confirm on it.
    let msg = rig.fake.new_message();
    let click = ADA.click(&rig.fake, &msg, &confirm);
    let first = rig.discord.send(&click).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert!(
        matches!(first.json["type"].as_u64(), Some(6) | Some(7)),
        "the button's message is updated: {}",
        first.text
    );
    // Discord redelivering the same interaction: answered privately, not run.
    let again = rig.discord.send(&click).await;
    assert_eq!(again.json["data"]["flags"], 64, "{}", again.text);
    assert!(again.text.contains("already handled"), "{}", again.text);
    // A double click is a second interaction: the single-use confirmation refuses it.
    let second_click = BOB.click(&rig.fake, &msg, &confirm);
    let second = rig.reply(&second_click).await;
    assert_eq!(second["flags"], 64, "{second}");
    assert!(text_of(&second).contains("already used"), "{second}");

    // Progress edits the button's message until it is done, through the webhook of a click
    // on it (either click's: each one's original response is that message).
    let clicks = [
        click["id"].as_str().unwrap().to_string(),
        second_click["id"].as_str().unwrap().to_string(),
    ];
    rig.fake
        .wait_for(WAIT, "progress to the end", |c| {
            c.iter().any(|c| {
                c.route == "edit_original"
                    && clicks.contains(&c.target)
                    && text_of(&c.body).contains("1/1 succeeded")
                    && text_of(&c.body).contains("done")
            })
        })
        .await;
    let cmds = rig.commands().await;
    assert_eq!(cmds.len(), 1, "queued once: {cmds:?}");
    assert_eq!(cmds[0]["kind"], "restart");
    assert_eq!(cmds[0]["agent_uid"], json!(rig.agent.to_string()));
    for c in rig.fake.calls_of("edit_original") {
        assert!(c.authorization.is_none(), "webhooks carry no bot token");
    }

    let (st, audit) = rig.server.rest().get("/api/v1/audit?channel=discord").await;
    assert_eq!(st, 200, "{audit}");
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["actor"] == "discord:G1/U-ops (Ada)" && r["channel"] == "discord"),
        "{audit}"
    );
}

#[tokio::test]
async fn refused_interactions_queue_nothing() {
    let rig = rig().await;
    let body = ADA
        .command(&rig.fake, "restart", &[("target", "web-ws-1")])
        .to_string();
    let ts = now_s().to_string();
    let stale = (now_s() - 600).to_string();
    let forger = DiscordSigner::new([7u8; 32], "http://unused");
    for (what, ts, sig, status) in [
        (
            "forged signature",
            Some(ts.clone()),
            Some(forger.sign(&ts, body.as_bytes())),
            401,
        ),
        (
            "stale timestamp",
            Some(stale.clone()),
            Some(rig.discord.sign(&stale, body.as_bytes())),
            401,
        ),
        (
            "missing timestamp",
            None,
            Some(rig.discord.sign(&ts, body.as_bytes())),
            401,
        ),
        ("missing signature", Some(ts.clone()), None, 401),
    ] {
        let a = rig
            .discord
            .send_raw(body.as_bytes(), ts.as_deref(), sig.as_deref())
            .await;
        assert_eq!(a.status, status, "{what}: {}", a.text);
    }
    // Malformed, though correctly signed: 400.
    for raw in [
        &b"not json"[..],
        br#"[1, 2]"#,
        br#"{"type": 2, "id": "5"}"#,
        br#"{"type": 9, "id": "5", "application_id": "1", "token": "t"}"#,
    ] {
        let sig = rig.discord.sign(&ts, raw);
        let a = rig.discord.send_raw(raw, Some(&ts), Some(&sig)).await;
        assert_eq!(
            a.status,
            400,
            "{}: {}",
            String::from_utf8_lossy(raw),
            a.text
        );
    }
    let unknown_sub = rig
        .discord
        .send(&ADA.command(&rig.fake, "rm", &[("x", "y")]))
        .await;
    assert_eq!(unknown_sub.status, 400, "{}", unknown_sub.text);

    // Signed but not allowed: answered privately.
    let eve = rig
        .reply(&EVE.command(&rig.fake, "restart", &[("target", "web-ws-1")]))
        .await;
    assert_eq!(eve["flags"], 64, "{eve}");
    assert!(text_of(&eve).contains("not mapped"), "{eve}");
    let vic = rig
        .reply(&VIC.command(&rig.fake, "restart", &[("target", "web-ws-1")]))
        .await;
    assert_eq!(vic["flags"], 64, "{vic}");
    assert!(text_of(&vic).contains("operator"), "{vic}");
    // A viewer's click on an operator's Confirm is refused too.
    let preview = rig
        .reply(&ADA.command(&rig.fake, "restart", &[("target", "web-ws-1")]))
        .await;
    let confirm = button(&preview, "flotilla_confirm");
    let msg = rig.fake.new_message();
    let vic_click = rig.reply(&VIC.click(&rig.fake, &msg, &confirm)).await;
    assert_eq!(vic_click["flags"], 64, "{vic_click}");

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rig.commands().await.is_empty(), "nothing was queued");
    assert!(
        rig.fake.calls_of("create_message").is_empty(),
        "nothing was posted in the channel"
    );
}

#[tokio::test]
async fn an_alert_posted_to_discord_has_buttons_that_work() {
    let rig = rig().await;
    let mut fleet = agents(&rig.server, "dc", 1).await;
    let sub = rig
        .reply(&ADA.command(&rig.fake, "subscribe", &[("query", "health:unhealthy")]))
        .await;
    assert!(text_of(&sub).contains("Subscribed this channel"), "{sub}");

    fleet[0].send(health(false)).await;
    rig.fake
        .wait_for(WAIT, "the alert", |c| {
            c.iter().any(|c| {
                c.route == "create_message" && text_of(&c.body).contains("became unhealthy")
            })
        })
        .await;
    let alert = rig
        .fake
        .calls_of("create_message")
        .into_iter()
        .find(|c| text_of(&c.body).contains("became unhealthy"))
        .unwrap();
    assert_eq!(alert.target, "C1", "posted in the subscribed channel");
    assert_eq!(
        alert.authorization.as_deref(),
        Some(format!("Bot {TOKEN}").as_str())
    );
    assert!(
        text_of(&alert.body).contains("dc-1-host"),
        "{:?}",
        alert.body
    );
    let msg = alert.message.clone().expect("the alert's message id");

    let shown = rig
        .reply(&VIC.click(
            &rig.fake,
            &msg,
            &button(&alert.body, "flotilla_alert_health"),
        ))
        .await;
    assert!(
        text_of(&shown).contains("output es.0 down"),
        "the agent's health: {shown}"
    );
    let preview = rig
        .reply(&ADA.click(
            &rig.fake,
            &msg,
            &button(&alert.body, "flotilla_alert_restart"),
        ))
        .await;
    button(&preview, "flotilla_confirm");
    assert!(rig.commands().await.is_empty(), "previewed, not queued");

    let (st, audit) = rig.server.rest().get("/api/v1/audit?channel=discord").await;
    assert_eq!(st, 200, "{audit}");
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["operation"] == "chat.subscribe" && r["actor"] == "discord:G1/U-ops (Ada)"),
        "{audit}"
    );
}
