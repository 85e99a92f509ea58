//! The Slack gateway's HTTP routes on a real listener, driven by requests signed exactly as
//! Slack signs them, answering through a fake Slack Web API; a recording handler stands in for
//! the conversation core (the server's tests run the real core end to end).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use flotilla_chat::core::types::{Block, Incoming, IncomingKind, MessageRef, Outbox, Reply};
use flotilla_chat::slack::client::{BotToken, SlackApi};
use flotilla_chat::slack::gateway::{routes, Handler, SlackGateway};
use flotilla_chat::slack::verify::{SigningSecret, Verifier};
use flotilla_e2e::fake_slack::{
    event_body, Answer, Click, FakeSlack, SlackSigner, SlashCommand, FORM,
};
use serde_json::{json, Value};

const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const TOKEN: &str = "xoxb-gateway-test";

/// Records what reached the core and answers with scripted replies; can be held to show the
/// ack does not wait for the core.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Incoming>>,
    replies: Mutex<Vec<Reply>>,
    hold: Mutex<Option<Arc<tokio::sync::Notify>>>,
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, incoming: Incoming, _outbox: Arc<dyn Outbox>) -> Vec<Reply> {
        self.seen.lock().unwrap().push(incoming);
        let hold = self.hold.lock().unwrap().clone();
        if let Some(n) = hold {
            n.notified().await;
        }
        std::mem::take(&mut *self.replies.lock().unwrap())
    }
}

struct Rig {
    fake: FakeSlack,
    slack: SlackSigner,
    core: Arc<Recorder>,
}

async fn rig() -> Rig {
    let fake = FakeSlack::start(TOKEN).await;
    let api = SlackApi::new(&fake.api_url(), BotToken::new(TOKEN).unwrap()).unwrap();
    let core = Arc::new(Recorder::default());
    let gw = SlackGateway::new(
        Verifier::new(SigningSecret::new(SECRET).unwrap()),
        api,
        core.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, routes(gw)).await.unwrap();
    });
    Rig {
        slack: SlackSigner::new(SECRET, &base),
        fake,
        core,
    }
}

fn cmd<'a>(text: &'a str, trigger: &'a str) -> SlashCommand<'a> {
    SlashCommand {
        team: "T1",
        channel: "C1",
        user: "U1",
        user_name: "ada",
        text,
        trigger_id: trigger,
    }
}

impl Rig {
    fn seen(&self) -> Vec<Incoming> {
        self.core.seen.lock().unwrap().clone()
    }
    fn answer(&self, r: Reply) {
        self.core.replies.lock().unwrap().push(r);
    }
}

#[tokio::test]
async fn a_slash_command_is_acked_at_once_and_answered_through_the_web_api() {
    let rig = rig().await;
    let hold = Arc::new(tokio::sync::Notify::new());
    *rig.core.hold.lock().unwrap() = Some(hold.clone());
    rig.answer(Reply::text("3 agents match"));
    rig.answer(Reply::text("only you can see this").private());
    let a = rig
        .slack
        .command(&rig.fake, &cmd("agents type:fluentd", "t1"))
        .await;
    // Acknowledged while the core is still working on it.
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.is_empty(), "{}", a.body);
    assert!(a.elapsed < Duration::from_secs(3), "{:?}", a.elapsed);
    // Nothing answered yet (the display-name lookup, users.info, may have run).
    let answers = |c: &[flotilla_e2e::fake_slack::Call]| {
        c.iter().filter(|c| c.method != "users.info").count()
    };
    assert_eq!(answers(&rig.fake.calls()), 0);
    hold.notify_one();
    rig.fake
        .wait_for(Duration::from_secs(10), "both answers", |c| answers(c) == 2)
        .await;
    let seen = rig.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].kind,
        IncomingKind::Command {
            text: "agents type:fluentd".into()
        }
    );
    assert_eq!(seen[0].user.name, "ada");
    let post = &rig.fake.calls_of("chat.postMessage")[0].body;
    assert_eq!(
        (post["channel"].as_str(), post["text"].as_str()),
        (Some("C1"), Some("3 agents match"))
    );
    let private = &rig.fake.calls_of("response_url")[0];
    assert_eq!(private.target.as_deref(), Some("t1"));
    assert_eq!(private.body["text"], "only you can see this");
}

#[tokio::test]
async fn url_verification_is_answered_with_its_challenge() {
    let rig = rig().await;
    let body = json!({"token": "x", "challenge": "3eZbrw1aBm2rZg", "type": "url_verification"})
        .to_string();
    let a = rig
        .slack
        .send(
            "/chat/slack/events",
            "application/json",
            body.as_bytes(),
            &[],
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&a.body).unwrap(),
        json!({"challenge": "3eZbrw1aBm2rZg"})
    );
}

/// Posts a slash-command body with the given timestamp and signature.
async fn post_command(rig: &Rig, body: &str, ts: &str, sig: Option<&str>) -> Answer {
    rig.slack
        .send_raw("/chat/slack/commands", FORM, body.as_bytes(), ts, sig, &[])
        .await
}

#[tokio::test]
async fn forged_stale_and_replayed_requests_are_refused_before_parsing() {
    let rig = rig().await;
    let body = cmd("restart web-1", "t-forged").body(&rig.fake);
    let now = SlackSigner::now().to_string();
    // Signed with another secret.
    let forged = SlackSigner::new("not-the-secret", "http://unused").sign(&now, body.as_bytes());
    let a = post_command(&rig, &body, &now, Some(&forged)).await;
    assert_eq!(a.status, 401);
    assert!(a.body.contains("does not match"), "{}", a.body);
    // No signature at all.
    let a = post_command(&rig, &body, &now, None).await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (401, "no X-Slack-Signature header")
    );
    // Correctly signed, but ten minutes old.
    let old = (SlackSigner::now() - 600).to_string();
    let sig = rig.slack.sign(&old, body.as_bytes());
    let a = post_command(&rig, &body, &old, Some(&sig)).await;
    assert_eq!(a.status, 401);
    assert!(a.body.contains("stale"), "{}", a.body);
    // A garbage body is refused as unsigned, never parsed.
    let a = rig
        .slack
        .send_raw(
            "/chat/slack/events",
            "application/json",
            b"{not json",
            &now,
            Some("v0=00"),
            &[],
        )
        .await;
    assert_eq!(a.status, 401);
    // Genuine, then the same bytes again.
    let sig = rig.slack.sign(&now, body.as_bytes());
    let first = post_command(&rig, &body, &now, Some(&sig)).await;
    assert_eq!(first.status, 200);
    let again = post_command(&rig, &body, &now, Some(&sig)).await;
    assert_eq!(again.status, 401);
    assert!(again.body.contains("replay"), "{}", again.body);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        rig.seen().len(),
        1,
        "only the genuine request reached the core"
    );
}

#[tokio::test]
async fn a_slack_retry_of_a_delivered_event_does_not_run_twice() {
    let rig = rig().await;
    let mention = json!({"type": "app_mention", "user": "U1", "text": "<@U0FLOTILLA> restart web-1",
                         "ts": "1700000000.000100", "channel": "C1"});
    let a = rig.slack.event("T1", "Ev01", mention.clone(), &[]).await;
    assert_eq!(a.status, 200);
    // Slack re-signs each retry (a new timestamp), with the same event_id.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let body = event_body("T1", "Ev01", mention);
    let a = rig
        .slack
        .send(
            "/chat/slack/events",
            "application/json",
            body.as_bytes(),
            &[
                ("x-slack-retry-num", "1"),
                ("x-slack-retry-reason", "http_timeout"),
            ],
        )
        .await;
    assert_eq!(a.status, 200, "acknowledged so Slack stops retrying");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = rig.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].kind,
        IncomingKind::Mention {
            text: "restart web-1".into()
        }
    );
    assert_eq!(
        seen[0].conversation.thread.as_deref(),
        Some("1700000000.000100")
    );
}

#[tokio::test]
async fn malformed_payloads_get_400_with_the_reason() {
    let rig = rig().await;
    for (path, ct, body, needle) in [
        (
            "/chat/slack/commands",
            FORM,
            "team_id=T1&user_id=U1".to_string(),
            "channel_id",
        ),
        (
            "/chat/slack/events",
            "application/json",
            "[1,2]".to_string(),
            "malformed Slack event",
        ),
        (
            "/chat/slack/interactions",
            FORM,
            "payload=%7Bnope".to_string(),
            "payload",
        ),
    ] {
        let a = rig.slack.send(path, ct, body.as_bytes(), &[]).await;
        assert_eq!(a.status, 400, "{path}: {}", a.body);
        assert!(a.body.contains(needle), "{path}: {}", a.body);
    }
    assert!(rig.seen().is_empty());
}

#[tokio::test]
async fn a_button_click_updates_its_message_in_place() {
    let rig = rig().await;
    let preview = MessageRef {
        conversation: flotilla_chat::core::types::ConversationRef {
            platform: flotilla_chat::core::types::Platform::Slack,
            workspace: "T1".into(),
            channel: "C1".into(),
            thread: Some("1700000000.000100".into()),
        },
        id: "1700000000.000200".into(),
    };
    rig.answer(
        Reply::text("Cancelled.")
            .push(Block::Context("by ada".into()))
            .replacing(preview),
    );
    let payload = Click {
        team: "T1",
        channel: "C1",
        user: ("U1", "ada"),
        message_ts: "1700000000.000200",
        thread_ts: Some("1700000000.000100"),
        action_id: "flotilla.cancel",
        value: "c-7",
        trigger_id: "trig-1",
    }
    .payload(&rig.fake);
    let a = rig.slack.interaction(&payload).await;
    assert_eq!(a.status, 200, "{}", a.body);
    rig.fake
        .wait_for(Duration::from_secs(10), "chat.update", |c| {
            c.iter().any(|c| c.method == "chat.update")
        })
        .await;
    let up = &rig.fake.calls_of("chat.update")[0].body;
    assert_eq!(up["ts"], "1700000000.000200");
    assert_eq!(up["text"], "Cancelled.\nby ada");
    let seen = rig.seen();
    let IncomingKind::Action {
        action_id,
        value,
        message,
    } = &seen[0].kind
    else {
        panic!("{:?}", seen[0])
    };
    assert_eq!(
        (action_id.as_str(), value.as_str()),
        ("flotilla.cancel", "c-7")
    );
    assert_eq!(message.as_ref().unwrap().id, "1700000000.000200");
    // The same delivery again (re-signed a second later, as a Slack retry would be) is
    // acknowledged and not run; a double click is a new interaction (its own trigger_id) and
    // reaches the core, whose confirmations are single-use.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let a = rig.slack.interaction(&payload).await;
    assert_eq!(a.status, 200, "{}", a.body);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rig.seen().len(), 1);
    let mut second = payload.clone();
    second["trigger_id"] = json!("trig-2");
    let a = rig.slack.interaction(&second).await;
    assert_eq!(a.status, 200, "{}", a.body);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rig.seen().len(), 2);
}
