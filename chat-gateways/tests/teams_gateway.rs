//! The Teams gateway's messaging endpoint on a real listener, driven by activities carrying
//! JWTs signed with test RSA keys served from a local OpenID metadata + JWKS, answering through
//! a fake Bot Connector with a client-credentials token; a recording handler stands in for the
//! conversation core (the server's tests run the real core end to end).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use flotilla_chat::core::gateway::Handler;
use flotilla_chat::core::types::{Block, Button, Incoming, IncomingKind, Outbox, Reply, Style};
use flotilla_chat::teams::client::{AppPassword, Connector};
use flotilla_chat::teams::gateway::{routes, ServiceUrls, TeamsGateway, MESSAGES_PATH};
use flotilla_chat::teams::parse::{self, Parsed};
use flotilla_chat::teams::render::render;
use flotilla_chat::teams::verify::{KeyOptions, TokenVerifier};
use flotilla_e2e::fake_teams::{FakeTeams, KEY1, KEY2, ROGUE};
use serde_json::{json, Value};

const APP_ID: &str = "5e1c0a77-0000-4000-8000-00000000b07a";
const PASSWORD: &str = "test-app-password";
const ADA: (&str, &str) = ("aad-ada", "Ada Lovelace");

#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Incoming>>,
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, incoming: Incoming, _outbox: Arc<dyn Outbox>) -> Vec<Reply> {
        self.seen.lock().unwrap().push(incoming);
        vec![Reply::text("*pong*")]
    }
}

struct Rig {
    fake: FakeTeams,
    core: Arc<Recorder>,
    url: String,
    http: reqwest::Client,
}

async fn rig(min_refresh: Duration) -> Rig {
    let fake = FakeTeams::start(APP_ID, PASSWORD).await;
    let verifier = TokenVerifier::new(
        APP_ID,
        &fake.metadata_url(),
        KeyOptions {
            min_refresh,
            ..KeyOptions::default()
        },
    );
    let connector = Arc::new(Connector::new(
        APP_ID,
        AppPassword::new(PASSWORD).unwrap(),
        &fake.token_url(),
    ));
    let core = Arc::new(Recorder::default());
    let gw = TeamsGateway::new(
        verifier,
        connector,
        Arc::new(ServiceUrls::new(&fake.service_url())),
        core.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}{MESSAGES_PATH}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, routes(gw)).await.unwrap();
    });
    Rig {
        fake,
        core,
        url,
        http: reqwest::Client::new(),
    }
}

impl Rig {
    async fn send(&self, auth: Option<&str>, activity: &Value) -> (u16, String) {
        let mut r = self.http.post(&self.url).json(activity);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    fn seen(&self) -> Vec<Incoming> {
        self.core.seen.lock().unwrap().clone()
    }

    fn bearer_with(&self, key: &str, kid: &str, patch: Value) -> String {
        let mut c = self.fake.claims(&self.fake.service_url());
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        format!("Bearer {}", FakeTeams::sign(key, kid, &c))
    }
}

#[tokio::test]
async fn a_personal_chat_is_answered_in_its_conversation_with_a_cached_token() {
    let rig = rig(Duration::from_secs(60)).await;
    let a = rig
        .fake
        .message("personal", "act-1", ADA, "agents type:fluentd");
    assert_eq!(rig.send(Some(&rig.fake.bearer()), &a).await.0, 200);
    let calls = rig.fake.wait_calls(10, |c| !c.is_empty()).await;
    let seen = rig.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].kind,
        IncomingKind::Direct {
            text: "agents type:fluentd".into()
        }
    );
    assert_eq!(seen[0].user.id, "aad-ada");
    assert_eq!(seen[0].conversation.workspace, "tenant-1");
    assert_eq!(
        flotilla_chat::actor(&seen[0].user, &seen[0].conversation),
        "teams:tenant-1/aad-ada (Ada Lovelace)"
    );
    assert_eq!(calls[0].kind, "reply");
    assert_eq!(calls[0].conversation, "a:1personal-aad-ada");
    assert_eq!(calls[0].activity.as_deref(), Some("act-1"));
    assert_eq!(calls[0].body["text"], "**pong**");
    assert_eq!(calls[0].body["replyToId"], "act-1");

    // A second turn reuses the token.
    let b = rig.fake.message("personal", "act-2", ADA, "summary");
    assert_eq!(rig.send(Some(&rig.fake.bearer()), &b).await.0, 200);
    rig.fake.wait_calls(10, |c| c.len() == 2).await;
    let reqs = rig.fake.token_requests();
    assert_eq!(reqs.len(), 1, "the token is cached until near its expiry");
    assert_eq!(reqs[0]["client_id"], APP_ID);
    assert_eq!(reqs[0]["scope"], "https://api.botframework.com/.default");
}

#[tokio::test]
async fn a_channel_mention_is_stripped_and_answered_in_the_thread() {
    let rig = rig(Duration::from_secs(60)).await;
    let a = rig
        .fake
        .message("channel", "1733389200000", ADA, "restart  web-1");
    assert_eq!(rig.send(Some(&rig.fake.bearer()), &a).await.0, 200);
    let calls = rig.fake.wait_calls(10, |c| !c.is_empty()).await;
    let seen = rig.seen();
    assert_eq!(
        seen[0].kind,
        IncomingKind::Mention {
            text: "restart web-1".into()
        }
    );
    assert_eq!(seen[0].conversation.channel, "19:ops@thread.tacv2");
    assert_eq!(
        seen[0].conversation.thread.as_deref(),
        Some("1733389200000")
    );
    assert_eq!(
        calls[0].conversation,
        "19:ops@thread.tacv2;messageid=1733389200000"
    );
    // Group chats are mentions too.
    let g = rig.fake.message("groupChat", "g-1", ADA, "summary");
    assert_eq!(rig.send(Some(&rig.fake.bearer()), &g).await.0, 200);
    rig.fake.wait_calls(10, |c| c.len() == 2).await;
    assert_eq!(
        rig.seen()[1].kind,
        IncomingKind::Mention {
            text: "summary".into()
        }
    );
}

#[tokio::test]
async fn every_bad_token_is_refused_with_401_and_nothing_reaches_the_core() {
    let rig = rig(Duration::from_secs(60)).await;
    let a = rig.fake.message("personal", "act-x", ADA, "restart web-1");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let other_url = json!("https://evil.example/amer/");
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("unsigned", None, "no Authorization"),
        ("not bearer", Some("Basic YTpi".into()), "not `Bearer"),
        ("garbage", Some("Bearer not.a.jwt".into()), "not a JWT"),
        (
            "wrong issuer",
            Some(rig.bearer_with(KEY1, KEY1, json!({"iss": "https://sts.windows.net/x/"}))),
            "issuer",
        ),
        (
            "wrong audience",
            Some(rig.bearer_with(KEY1, KEY1, json!({"aud": "someone-else"}))),
            "audience",
        ),
        (
            "expired beyond the skew",
            Some(rig.bearer_with(KEY1, KEY1, json!({"exp": now - 400, "nbf": now - 4000}))),
            "expired",
        ),
        (
            "not yet valid",
            Some(rig.bearer_with(KEY1, KEY1, json!({"nbf": now + 900}))),
            "not valid yet",
        ),
        (
            "unknown key id",
            Some(rig.bearer_with(ROGUE, ROGUE, json!({}))),
            "not in the Bot Framework JWKS",
        ),
        (
            "a known kid, another key's signature",
            Some(rig.bearer_with(ROGUE, KEY1, json!({}))),
            "signature",
        ),
        (
            "serviceUrl mismatch",
            Some(rig.bearer_with(KEY1, KEY1, json!({"serviceUrl": other_url}))),
            "serviceUrl",
        ),
        (
            "no serviceUrl claim",
            Some(rig.bearer_with(KEY1, KEY1, json!({"serviceUrl": null}))),
            "serviceUrl",
        ),
    ];
    for (name, auth, why) in cases {
        let (status, body) = rig.send(auth.as_deref(), &a).await;
        assert_eq!(status, 401, "{name}: {body}");
        assert!(body.contains(why), "{name}: {body:?} should say {why:?}");
    }
    // HS256 with the app id as the secret: refused for its algorithm.
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &rig.fake.claims(&rig.fake.service_url()),
        &jsonwebtoken::EncodingKey::from_secret(APP_ID.as_bytes()),
    )
    .unwrap();
    let (status, body) = rig.send(Some(&format!("Bearer {hs}")), &a).await;
    assert_eq!((status, body.contains("RS256")), (401, true), "{body}");
    // The activity's serviceUrl changed under a good token.
    let mut moved = a.clone();
    moved["serviceUrl"] = json!("https://evil.example/amer/");
    assert_eq!(rig.send(Some(&rig.fake.bearer()), &moved).await.0, 401);

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rig.seen().is_empty(), "nothing reached the core");
    assert!(rig.fake.calls().is_empty(), "nothing was posted");
    // Expired within the five-minute skew is still good.
    let late = rig.bearer_with(KEY1, KEY1, json!({"exp": now - 120}));
    assert_eq!(rig.send(Some(&late), &a).await.0, 200);
}

#[tokio::test]
async fn a_rolled_key_is_fetched_on_its_first_use_and_unknown_kids_cannot_hammer_the_jwks() {
    let rig = rig(Duration::from_millis(500)).await;
    let a = rig.fake.message("personal", "act-r", ADA, "summary");
    assert_eq!(rig.send(Some(&rig.fake.bearer()), &a).await.0, 200);
    assert_eq!(rig.fake.key_fetches(), (1, 1));
    // Forged kids within the refresh interval: one refresh at most, then refused from cache.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for i in 0..5 {
        let t = rig.bearer_with(ROGUE, &format!("forged-{i}"), json!({}));
        assert_eq!(rig.send(Some(&t), &a).await.0, 401);
    }
    assert_eq!(
        rig.fake.key_fetches(),
        (2, 2),
        "one refresh for five unknown kids"
    );
    // Microsoft rolls key2 in; after the interval, its first token refreshes the cache.
    rig.fake.rotate();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let b = rig.fake.message("personal", "act-r2", ADA, "summary");
    let t = rig.bearer_with(KEY2, KEY2, json!({}));
    let (status, body) = rig.send(Some(&t), &b).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(rig.fake.key_fetches(), (3, 3));
    // key1 is still served and cached.
    let c = rig.fake.message("personal", "act-r3", ADA, "summary");
    assert_eq!(rig.send(Some(&rig.fake.bearer()), &c).await.0, 200);
    assert_eq!(rig.fake.key_fetches(), (3, 3));
}

#[tokio::test]
async fn non_messages_are_acknowledged_and_malformed_activities_refused() {
    let rig = rig(Duration::from_secs(60)).await;
    let typing = json!({"type": "typing", "id": "t1", "serviceUrl": rig.fake.service_url(), "channelId": "msteams"});
    assert_eq!(rig.send(Some(&rig.fake.bearer()), &typing).await.0, 200);
    let mut no_from = rig.fake.message("personal", "m1", ADA, "summary");
    no_from.as_object_mut().unwrap().remove("from");
    let (status, body) = rig.send(Some(&rig.fake.bearer()), &no_from).await;
    assert_eq!(status, 400, "{body}");
    let r = rig
        .http
        .post(&rig.url)
        .header("authorization", rig.fake.bearer())
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(rig.seen().is_empty());
}

#[test]
fn a_preview_renders_as_an_adaptive_card_whose_submit_comes_back_as_the_core_action() {
    let reply = Reply::text("Restart *web-1*?")
        .push(Block::Fields(vec![("Targets".into(), "1 agent".into())]))
        .push(Block::Table {
            columns: vec!["agent".into(), "type".into()],
            rows: vec![vec!["web-1".into(), "fluentbit".into()]],
            more: 2,
        })
        .push(Block::Buttons(vec![
            Button {
                action_id: "flotilla_confirm".into(),
                label: "Confirm".into(),
                value: "c0ffee".into(),
                style: Style::Primary,
            },
            Button {
                action_id: "flotilla_cancel".into(),
                label: "Cancel".into(),
                value: "c0ffee".into(),
                style: Style::Danger,
            },
        ]));
    let a = render(&reply);
    let card = &a["attachments"][0];
    assert_eq!(
        card["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    let c = &card["content"];
    assert_eq!(c["type"], "AdaptiveCard");
    assert_eq!(c["body"][0]["text"], "Restart **web-1**?");
    assert_eq!(c["body"][1]["type"], "FactSet");
    assert_eq!(c["body"][2]["type"], "Table");
    assert_eq!(
        c["body"][2]["rows"][1]["cells"][0]["items"][0]["text"],
        "web-1"
    );
    assert_eq!(c["body"][3]["text"], "… and 2 more");
    assert_eq!(c["actions"][0]["type"], "Action.Submit");
    assert_eq!(c["actions"][0]["style"], "positive");
    assert_eq!(c["actions"][1]["style"], "destructive");

    // Teams posts the button's data back as `value`, replying to the card.
    let fake_activity = json!({
        "type": "message", "id": "sub-1", "serviceUrl": "https://smba.trafficmanager.net/amer/",
        "channelId": "msteams",
        "from": {"id": "29:x", "name": "Ada", "aadObjectId": "aad-ada"},
        "conversation": {"id": "19:ops@thread.tacv2;messageid=root-1", "conversationType": "channel", "tenantId": "t"},
        "recipient": {"id": "28:bot", "name": "Flotilla"},
        "replyToId": "card-7",
        "value": c["actions"][0]["data"],
    });
    let Parsed::Message { incoming, .. } =
        parse::activity(fake_activity.to_string().as_bytes()).unwrap()
    else {
        panic!("a submit is a message")
    };
    let IncomingKind::Action {
        action_id,
        value,
        message,
    } = incoming.kind
    else {
        panic!("a submit is an action")
    };
    assert_eq!(
        (action_id.as_str(), value.as_str()),
        ("flotilla_confirm", "c0ffee")
    );
    let m = message.unwrap();
    assert_eq!(m.id, "card-7");
    assert_eq!(m.conversation.thread.as_deref(), Some("root-1"));
    assert_eq!(
        parse::conversation_id(&m.conversation),
        "19:ops@thread.tacv2;messageid=root-1"
    );
}
