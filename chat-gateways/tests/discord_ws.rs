//! The Discord Gateway connection (mentions and DMs) against a fake Gateway on loopback that
//! speaks the documented protocol (HELLO, IDENTIFY/READY, heartbeats, RESUME, RECONNECT,
//! INVALID_SESSION), with replies posted to the fake REST API; a recording handler stands in
//! for the conversation core. Covers the IDENTIFY payload, a mention and a DM answered as
//! replies, the bot's own and unmentioned messages ignored, RECONNECT resumed on the resume
//! URL with the last sequence, an invalid session identified afresh, a zombie (no ACK)
//! resumed, and a refused token failing at start.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use flotilla_chat::core::gateway::Handler;
use flotilla_chat::core::types::{Incoming, IncomingKind, Outbox, Reply};
use flotilla_chat::discord::client::{BotToken, DiscordApi};
use flotilla_chat::discord::gateway::DiscordGateway;
use flotilla_chat::discord::verify::{PublicKey, Verifier};
use flotilla_chat::discord::ws::{DiscordWs, WsOptions, INTENTS};
use flotilla_e2e::fake_discord::{text_of, DiscordSigner, FakeDiscord, FakeGateway};
use serde_json::{json, Value};

const APP: &str = "900000000000000005";
const TOKEN: &str = "bot-token-for-ws-tests";
const BOT: &str = "800000000000000001";
const WAIT: Duration = Duration::from_secs(10);

/// Answers every message with "echo: <text>".
#[derive(Default)]
struct Echo {
    seen: Mutex<Vec<Incoming>>,
}

#[async_trait]
impl Handler for Echo {
    async fn handle(&self, incoming: Incoming, _outbox: Arc<dyn Outbox>) -> Vec<Reply> {
        let text = match &incoming.kind {
            IncomingKind::Mention { text } | IncomingKind::Direct { text } => text.clone(),
            k => format!("{k:?}"),
        };
        self.seen.lock().unwrap().push(incoming);
        vec![Reply::text(format!("echo: {text}"))]
    }
}

struct Rig {
    fake: FakeDiscord,
    gw: FakeGateway,
    core: Arc<Echo>,
    ws: DiscordWs,
}

fn options() -> WsOptions {
    WsOptions {
        invalid_session_wait: (Duration::from_millis(50), Duration::from_millis(100)),
        backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        hello_within: Duration::from_secs(5),
    }
}

async fn start(heartbeat_ms: u64) -> Rig {
    let fake = FakeDiscord::start(APP, TOKEN).await;
    let gw = FakeGateway::start(TOKEN, BOT, heartbeat_ms).await;
    fake.set_gateway(&gw.url());
    let api =
        Arc::new(DiscordApi::new(&fake.api_url(), APP, BotToken::new(TOKEN).unwrap()).unwrap());
    let core = Arc::new(Echo::default());
    let key = DiscordSigner::new([3u8; 32], "http://unused").public_key_hex();
    let interactions = DiscordGateway::new(
        Verifier::new(PublicKey::from_hex(&key).unwrap()),
        api.clone(),
        core.clone(),
    );
    let ws = DiscordWs::start(api, TOKEN, core.clone(), interactions.outbox(), options())
        .await
        .unwrap();
    Rig { fake, gw, core, ws }
}

fn guild_message(id: &str, author: &str, content: &str, mentions: &[&str]) -> Value {
    let mentions: Vec<Value> = mentions.iter().map(|m| json!({"id": m})).collect();
    json!({"id": id, "channel_id": "C1", "guild_id": "G1", "content": content, "type": 0,
        "author": {"id": author, "username": "ada", "global_name": "Ada"},
        "member": {"roles": ["R-ops"], "nick": null}, "mentions": mentions})
}

impl Rig {
    async fn ready(&self) {
        self.gw
            .wait_for(WAIT, "IDENTIFY", |f| f.iter().any(|f| f.op == 2))
            .await;
        // READY is dispatched right after IDENTIFY; give the client a heartbeat to read it.
        self.gw
            .wait_for(WAIT, "a heartbeat after READY", |f| {
                f.iter().any(|f| f.op == 1 && f.d.as_u64().is_some())
            })
            .await;
    }

    async fn replied(&self, needle: &str) -> Value {
        self.fake
            .wait_for(WAIT, needle, |c| {
                c.iter()
                    .any(|c| c.route == "create_message" && text_of(&c.body).contains(needle))
            })
            .await;
        self.fake
            .calls_of("create_message")
            .into_iter()
            .find(|c| text_of(&c.body).contains(needle))
            .unwrap()
            .body
    }
}

#[tokio::test]
async fn identify_then_mentions_and_dms_are_answered_as_replies() {
    let rig = start(100).await;
    rig.ready().await;
    let identify = rig.gw.frames_of(2)[0].d.clone();
    assert_eq!(identify["token"], TOKEN);
    assert_eq!(identify["intents"], json!(INTENTS));
    assert_eq!(INTENTS, (1 << 9) | (1 << 12) | (1 << 15));
    assert!(identify["properties"]["os"].is_string());
    assert_eq!(rig.gw.connections()[0].uri, "/?v=10&encoding=json");
    assert_eq!(rig.fake.calls_of("gateway_bot").len(), 1);

    // Ignored: a guild message without the mention, the bot's own, another bot's.
    rig.gw.dispatch(
        "MESSAGE_CREATE",
        guild_message("M0", "U1", "agents please", &[]),
    );
    rig.gw.dispatch(
        "MESSAGE_CREATE",
        guild_message("M00", BOT, &format!("<@{BOT}> echo: x"), &[BOT]),
    );
    let mut other_bot = guild_message("M000", "U9", &format!("<@{BOT}> hi"), &[BOT]);
    other_bot["author"]["bot"] = json!(true);
    rig.gw.dispatch("MESSAGE_CREATE", other_bot);

    // A mention: the mention stripped, answered as a reply to it in its channel.
    rig.gw.dispatch(
        "MESSAGE_CREATE",
        guild_message("M1", "U1", &format!("<@{BOT}> agents type:fluentd"), &[BOT]),
    );
    let reply = rig.replied("echo: agents type:fluentd").await;
    assert_eq!(reply["message_reference"]["message_id"], "M1");
    assert!(reply.get("flags").is_none());
    let posted = rig.fake.calls_of("create_message");
    assert_eq!(posted[0].target, "C1");
    assert_eq!(
        posted[0].authorization.as_deref(),
        Some(format!("Bot {TOKEN}").as_str())
    );

    // A DM: every message is for the bot.
    rig.gw.dispatch(
        "MESSAGE_CREATE",
        json!({"id": "M2", "channel_id": "D1", "content": "summary", "type": 0,
            "author": {"id": "U2", "username": "bob"}}),
    );
    let dm = rig.replied("echo: summary").await;
    assert_eq!(dm["message_reference"]["message_id"], "M2");

    let seen = rig.core.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "only the mention and the DM: {seen:?}");
    assert_eq!(seen[0].user.groups, vec!["R-ops"]);
    assert_eq!(seen[0].conversation.workspace, "G1");
    assert!(matches!(seen[1].kind, IncomingKind::Direct { .. }));
    assert_eq!(seen[1].conversation.workspace, "dm");
    rig.ws.shutdown().await;
}

#[tokio::test]
async fn reconnect_resumes_and_an_invalid_session_identifies_again() {
    let rig = start(100).await;
    rig.ready().await;
    rig.gw.dispatch(
        "MESSAGE_CREATE",
        guild_message("M1", "U1", &format!("<@{BOT}> one"), &[BOT]),
    );
    rig.replied("echo: one").await;
    let seq = rig.gw.seq();

    // RECONNECT: a new connection on the resume URL, RESUME with the session and last seq.
    rig.gw.send(json!({"op": 7, "d": null}));
    rig.gw
        .wait_for(WAIT, "RESUME", |f| f.iter().any(|f| f.op == 6))
        .await;
    let resume = rig.gw.frames_of(6)[0].clone();
    assert_eq!(resume.d["token"], TOKEN);
    assert_eq!(resume.d["session_id"], "session-1");
    assert_eq!(resume.d["seq"], json!(seq));
    assert_eq!(
        rig.gw.connections()[resume.conn].uri,
        "/resume/?v=10&encoding=json"
    );
    assert_eq!(
        rig.gw.frames_of(2).len(),
        1,
        "resumed, not identified again"
    );
    // Events keep flowing on the resumed connection.
    rig.gw.dispatch(
        "MESSAGE_CREATE",
        guild_message("M2", "U1", &format!("<@{BOT}> two"), &[BOT]),
    );
    rig.replied("echo: two").await;

    // INVALID_SESSION (not resumable): a fresh IDENTIFY, on the Gateway URL.
    rig.gw.forget_sessions();
    rig.gw.send(json!({"op": 9, "d": false}));
    rig.gw
        .wait_for(WAIT, "a second IDENTIFY", |f| {
            f.iter().filter(|f| f.op == 2).count() == 2
        })
        .await;
    let second = rig.gw.frames_of(2)[1].clone();
    assert_eq!(
        rig.gw.connections()[second.conn].uri,
        "/?v=10&encoding=json"
    );
    rig.gw
        .wait_for(WAIT, "a heartbeat on the new session", |f| {
            f.iter().any(|x| x.op == 1 && x.conn == second.conn)
        })
        .await;
    rig.gw.dispatch(
        "MESSAGE_CREATE",
        guild_message("M3", "U1", &format!("<@{BOT}> three"), &[BOT]),
    );
    rig.replied("echo: three").await;
    rig.ws.shutdown().await;
}

#[tokio::test]
async fn a_zombie_connection_is_closed_and_resumed() {
    let rig = start(80).await;
    rig.ready().await;
    rig.gw.set_ack(false);
    rig.gw
        .wait_for(WAIT, "a RESUME after unanswered heartbeats", |f| {
            f.iter().any(|f| f.op == 6)
        })
        .await;
    let resume = rig.gw.frames_of(6)[0].clone();
    assert_eq!(resume.d["session_id"], "session-1");
    assert!(resume.conn > 0, "on a new connection");
    rig.ws.shutdown().await;
}

#[tokio::test]
async fn a_refused_bot_token_fails_at_start() {
    let fake = FakeDiscord::start(APP, TOKEN).await;
    let api = Arc::new(
        DiscordApi::new(&fake.api_url(), APP, BotToken::new("wrong-token").unwrap()).unwrap(),
    );
    let core = Arc::new(Echo::default());
    let key = DiscordSigner::new([3u8; 32], "http://unused").public_key_hex();
    let interactions = DiscordGateway::new(
        Verifier::new(PublicKey::from_hex(&key).unwrap()),
        api.clone(),
        core.clone(),
    );
    let err =
        match DiscordWs::start(api, "wrong-token", core, interactions.outbox(), options()).await {
            Ok(_) => panic!("a refused token must fail the start"),
            Err(e) => e.to_string(),
        };
    assert!(err.contains("HTTP 401"), "{err}");
}
