//! The Discord interactions route on a real listener, driven by interactions signed with a test
//! Ed25519 key exactly as Discord signs them, answering through a fake Discord REST API; a
//! recording handler stands in for the conversation core (the server's tests run the real core
//! end to end). Covers PING, answers within the window, deferral completed by webhook, private
//! answers, redelivery, refusals before parsing, and the outbox's posts and edits.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use flotilla_chat::core::gateway::Handler;
use flotilla_chat::core::types::{
    Block, Button, ConversationRef, Incoming, IncomingKind, MessageRef, Outbox, Platform, Reply,
    Style,
};
use flotilla_chat::discord::client::{BotToken, DiscordApi};
use flotilla_chat::discord::gateway::{routes, DiscordGateway};
use flotilla_chat::discord::verify::{PublicKey, Verifier};
use flotilla_e2e::fake_discord::{now_s, DiscordSigner, FakeDiscord, Member};
use serde_json::{json, Value};

const APP: &str = "900000000000000001";
const TOKEN: &str = "bot-token-for-tests";
const SEED: [u8; 32] = [42u8; 32];
const WAIT: Duration = Duration::from_secs(10);

const ADA: Member = Member {
    guild: "G1",
    channel: "C1",
    user: "U1",
    name: "Ada",
    roles: &["R-ops"],
};

#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Incoming>>,
    replies: Mutex<Vec<Reply>>,
    delay: Mutex<Duration>,
    outbox: Mutex<Option<Arc<dyn Outbox>>>,
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, incoming: Incoming, outbox: Arc<dyn Outbox>) -> Vec<Reply> {
        self.seen.lock().unwrap().push(incoming);
        *self.outbox.lock().unwrap() = Some(outbox);
        let d = *self.delay.lock().unwrap();
        tokio::time::sleep(d).await;
        std::mem::take(&mut *self.replies.lock().unwrap())
    }
}

struct Rig {
    fake: FakeDiscord,
    discord: DiscordSigner,
    core: Arc<Recorder>,
}

async fn rig(answer_within: Duration) -> Rig {
    let fake = FakeDiscord::start(APP, TOKEN).await;
    let api =
        Arc::new(DiscordApi::new(&fake.api_url(), APP, BotToken::new(TOKEN).unwrap()).unwrap());
    let core = Arc::new(Recorder::default());
    let discord_key = DiscordSigner::new(SEED, "http://unused");
    let gw = DiscordGateway::with_answer_within(
        Verifier::new(PublicKey::from_hex(&discord_key.public_key_hex()).unwrap()),
        api,
        core.clone(),
        answer_within,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, routes(gw)).await.unwrap();
    });
    Rig {
        fake,
        discord: DiscordSigner::new(SEED, &base),
        core,
    }
}

fn preview() -> Reply {
    Reply::text("*Confirm `restart` on 1 agent?*").push(Block::Buttons(vec![Button {
        action_id: "flotilla_confirm".into(),
        label: "Confirm".into(),
        value: "c0ffee".into(),
        style: Style::Danger,
    }]))
}

#[tokio::test]
async fn ping_is_answered_pong() {
    let r = rig(Duration::from_secs(2)).await;
    let a = r
        .discord
        .send(&json!({"type": 1, "id": "1", "application_id": APP}))
        .await;
    assert_eq!((a.status, a.json.clone()), (200, json!({"type": 1})));
    assert!(r.core.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_command_answered_in_time_carries_the_reply_and_the_member() {
    let r = rig(Duration::from_secs(2)).await;
    r.core.replies.lock().unwrap().push(preview());
    let a = r
        .discord
        .send(&ADA.command(&r.fake, "restart", &[("target", "web-1")]))
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["type"], 4);
    assert_eq!(
        a.json["data"]["components"][0]["components"][0]["custom_id"],
        "flotilla_confirm:c0ffee"
    );
    assert!(a.json["data"].get("flags").is_none(), "a preview is public");
    let seen = r.core.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].kind,
        IncomingKind::Command {
            text: "restart web-1".into()
        }
    );
    assert_eq!(seen[0].user.groups, vec!["R-ops"]);
    assert_eq!(seen[0].conversation.workspace, "G1");
}

#[tokio::test]
async fn a_private_answer_is_ephemeral_and_a_redelivery_never_runs_twice() {
    let r = rig(Duration::from_secs(2)).await;
    r.core
        .replies
        .lock()
        .unwrap()
        .push(Reply::text("That needs the *operator* role").private());
    let body = ADA.command(&r.fake, "restart", &[("target", "web-1")]);
    let a = r.discord.send(&body).await;
    assert_eq!(a.json["type"], 4);
    assert_eq!(a.json["data"]["flags"], 64);
    let again = r.discord.send(&body).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json["data"]["flags"], 64);
    assert!(again.text.contains("already handled"), "{}", again.text);
    assert_eq!(r.core.seen.lock().unwrap().len(), 1, "run once");
}

#[tokio::test]
async fn a_slow_core_is_deferred_and_completed_through_the_webhook() {
    let r = rig(Duration::from_millis(100)).await;
    *r.core.delay.lock().unwrap() = Duration::from_millis(600);
    r.core.replies.lock().unwrap().push(preview());
    r.core
        .replies
        .lock()
        .unwrap()
        .push(Reply::text("only you").private());
    let body = ADA.command(&r.fake, "summary", &[]);
    let a = r.discord.send(&body).await;
    assert_eq!(a.json, json!({"type": 5}), "deferred: thinking…");
    r.fake
        .wait_for(WAIT, "the original edited and a follow-up", |c| {
            c.iter().any(|c| c.route == "edit_original") && c.iter().any(|c| c.route == "followup")
        })
        .await;
    let edit = &r.fake.calls_of("edit_original")[0];
    assert_eq!(
        edit.target,
        body["id"].as_str().unwrap(),
        "this interaction's webhook"
    );
    assert!(edit.body.to_string().contains("Confirm"));
    let follow = &r.fake.calls_of("followup")[0];
    assert_eq!(follow.body["flags"], 64, "the private reply is ephemeral");
    assert!(edit.authorization.is_none(), "webhooks carry no bot token");
}

#[tokio::test]
async fn a_button_updates_its_message_and_progress_edits_go_through_its_webhook() {
    let r = rig(Duration::from_secs(2)).await;
    let msg = r.fake.new_message();
    let conv = ConversationRef {
        platform: Platform::Discord,
        workspace: "G1".into(),
        channel: "C1".into(),
        thread: None,
    };
    let on = MessageRef {
        conversation: conv.clone(),
        id: msg.clone(),
    };
    r.core
        .replies
        .lock()
        .unwrap()
        .push(Reply::text("Queued by Ada").replacing(on.clone()));
    let click = ADA.click(&r.fake, &msg, "flotilla_confirm:c0ffee");
    let a = r.discord.send(&click).await;
    assert_eq!(a.json["type"], 7, "UPDATE_MESSAGE: {}", a.text);
    assert_eq!(a.json["data"]["components"], json!([]), "the buttons go");
    match &r.core.seen.lock().unwrap()[0].kind {
        IncomingKind::Action {
            action_id,
            value,
            message,
        } => {
            assert_eq!(
                (action_id.as_str(), value.as_str()),
                ("flotilla_confirm", "c0ffee")
            );
            assert_eq!(message.as_ref().unwrap().id, msg);
        }
        k => panic!("{k:?}"),
    }
    // Progress: the core updates the message it was given.
    let outbox = r.core.outbox.lock().unwrap().clone().unwrap();
    outbox
        .update(&on, &Reply::text("1/1 succeeded"))
        .await
        .unwrap();
    let edits = r.fake.calls_of("edit_original");
    assert_eq!(edits.len(), 1);
    assert_eq!(edits[0].target, click["id"].as_str().unwrap());
    // A message the gateway has no interaction for is edited as the bot.
    let posted = outbox.post(&conv, &Reply::text("alert")).await.unwrap();
    outbox
        .update(&posted, &Reply::text("alert, muted"))
        .await
        .unwrap();
    let bot_edit = &r.fake.calls_of("edit_message")[0];
    assert_eq!(bot_edit.message.as_deref(), Some(posted.id.as_str()));
    assert_eq!(
        bot_edit.authorization.as_deref(),
        Some(format!("Bot {TOKEN}").as_str())
    );
}

#[tokio::test]
async fn bad_requests_are_refused_before_the_core() {
    let r = rig(Duration::from_secs(2)).await;
    let body = ADA.command(&r.fake, "summary", &[]).to_string();
    let ts = now_s().to_string();
    let forger = DiscordSigner::new([7u8; 32], "http://unused");
    let cases: Vec<(&str, Option<String>, Option<String>, u16)> = vec![
        (
            "forged",
            Some(ts.clone()),
            Some(forger.sign(&ts, body.as_bytes())),
            401,
        ),
        ("no signature", Some(ts.clone()), None, 401),
        (
            "no timestamp",
            None,
            Some(r.discord.sign(&ts, body.as_bytes())),
            401,
        ),
        (
            "stale",
            Some((now_s() - 600).to_string()),
            Some(
                r.discord
                    .sign(&(now_s() - 600).to_string(), body.as_bytes()),
            ),
            401,
        ),
    ];
    for (what, ts, sig, status) in cases {
        let a = r
            .discord
            .send_raw(body.as_bytes(), ts.as_deref(), sig.as_deref())
            .await;
        assert_eq!(a.status, status, "{what}: {}", a.text);
    }
    let malformed = br#"{"type": 2, "id": "5"}"#;
    let sig = r.discord.sign(&ts, malformed);
    let a = r.discord.send_raw(malformed, Some(&ts), Some(&sig)).await;
    assert_eq!(a.status, 400, "{}", a.text);
    let a: Value = r
        .discord
        .send(&ADA.command(&r.fake, "rm", &[("x", "y")]))
        .await
        .json;
    assert_eq!(a, Value::Null, "unknown sub-command: 400, not JSON");
    assert!(
        r.core.seen.lock().unwrap().is_empty(),
        "nothing reached the core"
    );
}
