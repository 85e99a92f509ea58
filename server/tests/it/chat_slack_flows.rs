//! Slack flows end to end, beyond the slash-command path of `chat_slack.rs`: a real server with
//! WebSocket agents that count the commands they are sent, the Slack gateway on its chat
//! listener, requests signed as Slack signs them (`v0` HMAC) and a fake Slack Web API recording
//! `chat.postMessage` / `chat.update` / `chat.postEphemeral` / `response_url` posts. Covers
//! mentions answered in their thread, DMs, "restart them" after a search, live progress in
//! place, Cancel, and every refusal (forged, stale, replayed, retried, malformed, two-person
//! rule, changed target set, expired confirmation) with nothing queued.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flotilla_e2e::fake_slack::{
    event_body, interaction_body, Answer, Click, FakeSlack, SlackSigner, FORM,
};
use flotilla_proto::framing::{decode_ws, encode_ws};
use flotilla_proto::{
    kv_str, AgentCapabilities as Cap, AgentDescription, AgentToServer, ComponentHealth,
    ServerToAgent,
};
use flotilla_server::config::Config;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use uuid::Uuid;

use crate::chat_slack::{cmd, configure, SECRET, TOKEN};
use crate::net::LogBuf;
use crate::opamp::now_ns;
use crate::support::TestServer;

const WAIT: Duration = Duration::from_secs(20);

/// A Fluent Bit agent over WebSocket named `host`; `started_ns` is its start time, which is how
/// the server sees a restart happen.
fn status(uid: Uuid, host: &str, seq: u64, started_ns: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.as_bytes().to_vec(),
        sequence_num: seq,
        capabilities: Cap::ReportsStatus as u64
            | Cap::AcceptsRestartCommand as u64
            | Cap::ReportsHealth as u64
            | Cap::ReportsHeartbeat as u64,
        agent_description: Some(AgentDescription {
            identifying_attributes: vec![
                kv_str("service.name", "fluent-bit"),
                kv_str("service.instance.id", &uid.to_string()),
            ],
            non_identifying_attributes: vec![kv_str("host.name", host)],
        }),
        health: Some(ComponentHealth {
            healthy: true,
            start_time_unix_nano: started_ns,
            status: "running".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A connected WebSocket agent and how many commands it has been sent.
struct WsAgent {
    uid: Uuid,
    commands: Arc<AtomicUsize>,
}

impl WsAgent {
    fn sent(&self) -> usize {
        self.commands.load(Ordering::SeqCst)
    }
}

struct Flow {
    server: TestServer,
    fake: FakeSlack,
    slack: SlackSigner,
}

/// A posted message with buttons, as the test clicks it.
struct Preview {
    id: String,
    ts: String,
    body: Value,
}

async fn flow(tweak: impl FnOnce(&mut Config)) -> Flow {
    let fake = FakeSlack::start(TOKEN).await;
    let api_url = fake.api_url();
    let server = TestServer::start_with(|c| {
        configure(c, &api_url);
        tweak(c);
    })
    .await;
    let slack = SlackSigner::new(SECRET, &format!("http://{}", server.chat.unwrap()));
    Flow {
        server,
        fake,
        slack,
    }
}

/// Polls `f` until it gives a value; panics with `what` after [`WAIT`].
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// An `app_mention` in channel C1 at `ts`, as the Events API's `event` field carries it.
fn mention(user: &str, ts: &str, text: &str) -> Value {
    json!({"type": "app_mention", "user": user, "channel": "C1", "team": "T1",
        "text": format!("<@U0FLOTILLA> {text}"), "ts": ts, "event_ts": ts})
}

/// A `message.im` event in the DM D1.
fn dm(user: &str, ts: &str, text: &str) -> Value {
    json!({"type": "message", "channel_type": "im", "user": user, "channel": "D1",
        "team": "T1", "text": text, "ts": ts, "event_ts": ts})
}

/// `ev` as posted in the thread `thread`.
fn in_thread(mut ev: Value, thread: &str) -> Value {
    ev["thread_ts"] = json!(thread);
    ev
}

fn text_of(v: &Value) -> String {
    v.to_string()
}

impl Flow {
    /// Connects an agent named `host` that reports its restart `hold` after being told to.
    async fn agent(&self, host: &str, hold: Duration) -> WsAgent {
        let uid = Uuid::now_v7();
        let (ws, _) = tokio_tungstenite::connect_async(self.server.opamp_ws_url())
            .await
            .expect("WebSocket connect");
        let (mut tx, mut rx) = ws.split();
        tx.send(WsMessage::Binary(
            encode_ws(&status(uid, host, 0, now_ns())).into(),
        ))
        .await
        .unwrap();
        let commands = Arc::new(AtomicUsize::new(0));
        let (n, host2) = (commands.clone(), host.to_string());
        tokio::spawn(async move {
            let mut seq = 0;
            while let Some(Ok(m)) = rx.next().await {
                let WsMessage::Binary(b) = m else { continue };
                let Ok(msg) = decode_ws::<ServerToAgent>(&b) else {
                    continue;
                };
                let restart = msg.command.is_some();
                if restart {
                    n.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(hold).await;
                }
                if restart || msg.flags & 1 != 0 {
                    seq += 1;
                    let s = status(uid, &host2, seq, now_ns());
                    if tx
                        .send(WsMessage::Binary(encode_ws(&s).into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        eventually("the agent to be registered", || async move {
            let rest = self.server.rest();
            (rest.get(&format!("/api/v1/agents/{uid}")).await.0 == 200).then_some(())
        })
        .await;
        WsAgent { uid, commands }
    }

    async fn commands(&self) -> Vec<Value> {
        let (st, body) = self.server.rest().get("/api/v1/commands").await;
        assert_eq!(st, 200, "{body}");
        body["items"].as_array().cloned().unwrap_or_default()
    }

    async fn audit(&self) -> Vec<Value> {
        let (st, body) = self.server.rest().get("/api/v1/audit?channel=slack").await;
        assert_eq!(st, 200, "{body}");
        body["items"].as_array().cloned().unwrap_or_default()
    }

    /// Delivers the Events API callback `ev` (id `event_id`); Slack gets its 200 at once.
    async fn say(&self, event_id: &str, ev: Value) {
        let a = self.slack.event("T1", event_id, ev, &[]).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }

    /// The first posted message (after the first `skip`) whose body contains `needle`.
    async fn posted(&self, needle: &str, skip: usize) -> (Value, String) {
        eventually(&format!("a post containing {needle:?}"), || async move {
            self.fake
                .posted()
                .into_iter()
                .filter(|(b, _)| text_of(b).contains(needle))
                .nth(skip)
        })
        .await
    }

    /// The `n`th preview (0-based) with Confirm / Cancel.
    async fn preview(&self, n: usize) -> Preview {
        let (body, ts) = self.posted("flotilla_confirm", n).await;
        let id = body["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["type"] == "actions")
            .unwrap()["elements"][0]["value"]
            .as_str()
            .unwrap()
            .to_string();
        Preview { id, ts, body }
    }

    /// Clicks `action` on a preview as `user` (`(id, name)`), in `thread` if it is in one.
    async fn click(
        &self,
        user: (&str, &str),
        p: &Preview,
        action: &str,
        trigger: &str,
        thread: Option<&str>,
    ) -> Answer {
        let payload = self.click_payload(user, p, action, trigger, thread);
        self.slack.interaction(&payload).await
    }

    fn click_payload(
        &self,
        user: (&str, &str),
        p: &Preview,
        action: &str,
        trigger: &str,
        thread: Option<&str>,
    ) -> Value {
        Click {
            team: "T1",
            channel: p.body["channel"].as_str().unwrap(),
            user,
            message_ts: &p.ts,
            thread_ts: thread,
            action_id: action,
            value: &p.id,
            trigger_id: trigger,
        }
        .payload(&self.fake)
    }

    /// `body` as Slack re-sends it: signed afresh at its later send time (a second on).
    async fn resend(&self, path: &str, ct: &str, body: &str, extra: &[(&str, &str)]) -> Answer {
        let ts = (SlackSigner::now() + 1).to_string();
        let sig = self.slack.sign(&ts, body.as_bytes());
        self.slack
            .send_raw(path, ct, body.as_bytes(), &ts, Some(&sig), extra)
            .await
    }

    /// The private answer to the request with `trigger` (its `response_url`).
    async fn private_answer(&self, trigger: &str) -> String {
        eventually("a private answer", || async move {
            self.fake
                .calls_of("response_url")
                .into_iter()
                .find(|c| c.target.as_deref() == Some(trigger))
                .map(|c| text_of(&c.body))
        })
        .await
    }

    /// The `n`th ephemeral message (0-based) to `user`.
    async fn ephemeral_to(&self, user: &str, n: usize) -> Value {
        eventually("an ephemeral message", || async move {
            self.fake
                .calls_of("chat.postEphemeral")
                .into_iter()
                .filter(|c| c.body["user"] == user)
                .nth(n)
                .map(|c| c.body)
        })
        .await
    }

    /// `chat.update`s of the message `ts`, oldest first.
    fn updates_of(&self, ts: &str) -> Vec<Value> {
        self.fake
            .calls_of("chat.update")
            .into_iter()
            .filter(|c| c.body["ts"] == ts)
            .map(|c| c.body)
            .collect()
    }

    /// Waits for an update of `ts` containing `needle`.
    async fn update_with(&self, ts: &str, needle: &str) -> Value {
        eventually(
            &format!("an update of {ts} with {needle:?}"),
            || async move {
                self.updates_of(ts)
                    .into_iter()
                    .find(|b| text_of(b).contains(needle))
            },
        )
        .await
    }
}

/// No command exists and no agent was sent one.
async fn nothing_queued(f: &Flow, agents: &[&WsAgent]) {
    let cmds = f.commands().await;
    assert!(cmds.is_empty(), "{cmds:?}");
    for a in agents {
        assert_eq!(a.sent(), 0, "agent {} was sent a command", a.uid);
    }
}

const HOLD: Duration = Duration::from_millis(200);

#[tokio::test]
async fn a_mention_is_answered_in_its_thread_and_restart_them_restarts_that_search() {
    let f = flow(|_| {}).await;
    let pay1 = f.agent("pay-1", HOLD).await;
    let pay2 = f.agent("pay-2", HOLD).await;
    let web = f.agent("web-1", HOLD).await;

    // The mention is acknowledged at once and answered in a thread under it.
    f.say(
        "Ev1",
        mention("UOPS", "1700000100.000100", "agents host:pay-*"),
    )
    .await;
    let (answer, _) = f.posted("pay-1", 0).await;
    assert_eq!(answer["channel"], "C1");
    assert_eq!(answer["thread_ts"], "1700000100.000100", "{answer}");
    assert!(text_of(&answer).contains("pay-2"), "{answer}");
    assert!(!text_of(&answer).contains("web-1"), "{answer}");

    // "restart them" in the same thread: a preview of exactly that search's agents.
    f.say(
        "Ev2",
        in_thread(
            mention("UOPS", "1700000100.000300", "restart them"),
            "1700000100.000100",
        ),
    )
    .await;
    let p = f.preview(0).await;
    assert_eq!(p.body["thread_ts"], "1700000100.000100", "{}", p.body);
    let shown = text_of(&p.body);
    assert!(
        shown.contains("restart") && shown.contains("on 2 agents"),
        "{shown}"
    );
    nothing_queued(&f, &[&pay1, &pay2, &web]).await;

    // Confirmed on the preview in the thread: both pay agents restarted once, web-1 untouched.
    let a = f
        .click(
            ("UOPS", "ada"),
            &p,
            "flotilla_confirm",
            "t-them",
            Some("1700000100.000100"),
        )
        .await;
    assert_eq!(a.status, 200);
    f.update_with(&p.ts, "Finished").await;
    let cmds = f.commands().await;
    let mut targets: Vec<String> = cmds
        .iter()
        .map(|c| c["agent_uid"].as_str().unwrap().to_string())
        .collect();
    targets.sort();
    let mut want = vec![pay1.uid.to_string(), pay2.uid.to_string()];
    want.sort();
    assert_eq!(targets, want, "{cmds:?}");
    assert!(cmds
        .iter()
        .all(|c| c["kind"] == "restart" && c["status"] == "succeeded"));
    assert_eq!((pay1.sent(), pay2.sent(), web.sent()), (1, 1, 0));

    // Audited as the Slack user who confirmed, on channel slack, naming both agents.
    let audit = f.audit().await;
    let queued: Vec<&Value> = audit
        .iter()
        .filter(|r| r["actor"] == "slack:T1/UOPS (ada)" && r["channel"] == "slack")
        .collect();
    assert!(!queued.is_empty(), "{audit:?}");
    let named = text_of(&json!(queued));
    assert!(
        named.contains(&pay1.uid.to_string()) && named.contains(&pay2.uid.to_string()),
        "{audit:?}"
    );
    f.server.stop().await;
}

#[tokio::test]
async fn a_direct_message_is_answered_in_the_dm_and_refusals_there_are_ephemeral() {
    let f = flow(|_| {}).await;
    let web = f.agent("web-1", HOLD).await;

    f.say("Ev1", dm("UVIEW", "1700000200.000100", "agents host:web-*"))
        .await;
    let (answer, _) = f.posted("web-1", 0).await;
    assert_eq!(answer["channel"], "D1");
    assert!(
        answer.get("thread_ts").is_none_or(Value::is_null),
        "{answer}"
    );

    // A viewer asking for a restart: told privately which role it needs; nothing queued.
    f.say("Ev2", dm("UVIEW", "1700000200.000200", "restart web-1"))
        .await;
    let why = f.ephemeral_to("UVIEW", 0).await;
    assert_eq!(why["channel"], "D1");
    assert!(text_of(&why).contains("operator"), "{why}");
    // An unknown user (default role: none) mentioning the bot: refused privately, in the thread.
    f.say(
        "Ev3",
        mention("USTRANGER", "1700000200.000300", "restart web-1"),
    )
    .await;
    let why = f.ephemeral_to("USTRANGER", 0).await;
    assert!(
        text_of(&why).contains("not mapped to a Flotilla role"),
        "{why}"
    );
    assert_eq!(why["thread_ts"], "1700000200.000300", "{why}");
    nothing_queued(&f, &[&web]).await;
    assert_eq!(f.fake.posted().len(), 1, "only the search was answered");
    f.server.stop().await;
}

#[tokio::test]
async fn a_confirm_follows_the_command_in_place_from_queued_through_sent_to_succeeded() {
    let f = flow(|_| {}).await;
    // The agent takes a while to come back, so "sent" is seen before "succeeded".
    let web = f.agent("web-1", Duration::from_secs(5)).await;
    f.slack
        .command(&f.fake, &cmd("UOPS", "ada", "restart web-1", "t-restart"))
        .await;
    let p = f.preview(0).await;
    let a = f
        .click(("UOPS", "ada"), &p, "flotilla_confirm", "t-confirm", None)
        .await;
    assert_eq!(a.status, 200);
    f.update_with(&p.ts, "Finished").await;

    let updates = f.updates_of(&p.ts);
    let texts: Vec<String> = updates.iter().map(text_of).collect();
    let at = |needle: &str| {
        texts
            .iter()
            .position(|t| t.contains(needle))
            .unwrap_or_else(|| panic!("no update with {needle:?}: {texts:#?}"))
    };
    let (queued, sent, done) = (at("Queued by ada"), at("*sent*"), at("*succeeded*"));
    assert!(queued < sent && sent < done, "{texts:#?}");
    assert!(texts[done].contains("Finished"), "{}", texts[done]);
    assert!(
        texts.iter().all(|t| !t.contains("flotilla_confirm")),
        "buttons gone"
    );
    assert!(updates.iter().all(|u| u["channel"] == "C1"));
    assert_eq!(
        f.fake.posted().len(),
        1,
        "progress is in place, not new posts"
    );

    let cmds = f.commands().await;
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(cmds[0]["status"], "succeeded");
    assert_eq!(web.sent(), 1);
    f.server.stop().await;
}

#[tokio::test]
async fn cancel_replaces_the_preview_and_the_cancelled_confirmation_cannot_be_used() {
    let f = flow(|_| {}).await;
    let web = f.agent("web-1", HOLD).await;
    f.slack
        .command(&f.fake, &cmd("UOPS", "ada", "restart web-1", "t-restart"))
        .await;
    let p = f.preview(0).await;
    f.click(("UOPS", "ada"), &p, "flotilla_cancel", "t-cancel", None)
        .await;
    let done = f.update_with(&p.ts, "Cancelled by ada").await;
    assert!(!text_of(&done).contains("flotilla_confirm"), "{done}");
    f.click(("UOPS", "ada"), &p, "flotilla_confirm", "t-late", None)
        .await;
    let why = f.private_answer("t-late").await;
    assert!(why.contains("already used, cancelled"), "{why}");
    nothing_queued(&f, &[&web]).await;
    f.server.stop().await;
}

#[tokio::test]
async fn forged_stale_replayed_and_malformed_requests_are_refused_logged_and_run_nothing() {
    let (logs, _guard) = LogBuf::capture(tracing::Level::INFO);
    let f = flow(|_| {}).await;
    let web = f.agent("web-1", HOLD).await;
    let body = cmd("UOPS", "ada", "restart web-1", "t-1").body(&f.fake);
    let path = "/chat/slack/commands";
    let now = SlackSigner::now().to_string();

    // Signed with another secret.
    let forged = flotilla_e2e::fake_slack::sign("not-the-secret", &now, body.as_bytes());
    let a = f
        .slack
        .send_raw(path, FORM, body.as_bytes(), &now, Some(&forged), &[])
        .await;
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(a.body.contains("does not match"), "{}", a.body);
    // Correctly signed, six minutes ago.
    let old = (SlackSigner::now() - 360).to_string();
    let sig = f.slack.sign(&old, body.as_bytes());
    let a = f
        .slack
        .send_raw(path, FORM, body.as_bytes(), &old, Some(&sig), &[])
        .await;
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(a.body.contains("stale"), "{}", a.body);
    assert!(f.fake.calls().is_empty(), "{:?}", f.fake.calls());

    // The genuine request runs once; the same bytes again are a replay.
    let sig = f.slack.sign(&now, body.as_bytes());
    let a = f
        .slack
        .send_raw(path, FORM, body.as_bytes(), &now, Some(&sig), &[])
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let p = f.preview(0).await;
    let a = f
        .slack
        .send_raw(path, FORM, body.as_bytes(), &now, Some(&sig), &[])
        .await;
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(a.body.contains("replay"), "{}", a.body);

    // A replayed confirm click is refused too: one command.
    let click = interaction_body(&f.click_payload(
        ("UOPS", "ada"),
        &p,
        "flotilla_confirm",
        "t-click",
        None,
    ));
    let ts = SlackSigner::now().to_string();
    let sig = f.slack.sign(&ts, click.as_bytes());
    let ipath = "/chat/slack/interactions";
    let a = f
        .slack
        .send_raw(ipath, FORM, click.as_bytes(), &ts, Some(&sig), &[])
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = f
        .slack
        .send_raw(ipath, FORM, click.as_bytes(), &ts, Some(&sig), &[])
        .await;
    assert_eq!(a.status, 401, "{}", a.body);
    f.update_with(&p.ts, "Finished").await;
    assert_eq!(f.commands().await.len(), 1);
    assert_eq!(f.fake.posted().len(), 1, "one preview");

    // Malformed, though correctly signed: 400 with the reason, logged.
    let malformed: [(&str, &str, String, &str); 4] = [
        (
            path,
            FORM,
            body.replace("user_id=UOPS", "user_id="),
            "field user_id is missing or empty",
        ),
        (
            "/chat/slack/events",
            "application/json",
            "{\"type\": \"event_callback\", \"event\": ".into(),
            "malformed Slack event",
        ),
        (ipath, FORM, "token=abc".into(), "no payload field"),
        (
            ipath,
            FORM,
            interaction_body(&json!({"type": "block_actions", "user": {"id": "UOPS"},
                "team": {"id": "T1"}, "channel": {"id": "C1"}, "trigger_id": "t-x",
                "actions": []})),
            "block_actions without actions",
        ),
    ];
    for (route, ct, b, why) in &malformed {
        let a = f.slack.send(route, ct, b.as_bytes(), &[]).await;
        assert_eq!(a.status, 400, "{route} {b}: {}", a.body);
        assert!(a.body.contains(why), "{}", a.body);
    }
    let text = logs.text();
    for needle in [
        "refused a Slack request",
        "does not match",
        "stale",
        "replay",
        "refused a malformed Slack request",
        "field user_id is missing or empty",
        "block_actions without actions",
    ] {
        assert!(
            text.contains(needle),
            "no log line with {needle:?}:\n{text}"
        );
    }
    assert!(!text.contains(SECRET), "the secret was logged");
    assert_eq!(f.commands().await.len(), 1);
    assert_eq!(web.sent(), 1);
    f.server.stop().await;
}

#[tokio::test]
async fn slack_retries_of_an_event_or_a_confirm_that_already_ran_are_not_run_again() {
    let f = flow(|_| {}).await;
    let web = f.agent("web-1", HOLD).await;
    let ev = mention("UOPS", "1700000300.000100", "restart web-1");
    let a = f.slack.event("T1", "EvRetry", ev.clone(), &[]).await;
    assert_eq!(a.status, 200);
    let p = f.preview(0).await;
    // Slack's retry: the same event id, signed afresh, with the retry headers.
    let retry = [
        ("x-slack-retry-num", "1"),
        ("x-slack-retry-reason", "http_timeout"),
    ];
    let a = f
        .resend(
            "/chat/slack/events",
            "application/json",
            &event_body("T1", "EvRetry", ev),
            &retry,
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);

    // The confirm, and Slack delivering that same interaction again.
    let thread = Some("1700000300.000100");
    f.click(("UOPS", "ada"), &p, "flotilla_confirm", "t-once", thread)
        .await;
    let click = f.click_payload(("UOPS", "ada"), &p, "flotilla_confirm", "t-once", thread);
    let body = interaction_body(&click);
    let a = f
        .resend("/chat/slack/interactions", FORM, &body, &retry)
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    f.update_with(&p.ts, "Finished").await;
    assert_eq!(
        f.fake.posted().len(),
        1,
        "the retried mention made no second preview"
    );
    assert!(
        f.fake.calls_of("response_url").is_empty(),
        "the retried click was not even refused as a double click"
    );
    assert_eq!(f.commands().await.len(), 1);
    assert_eq!(web.sent(), 1);
    f.server.stop().await;
}

#[tokio::test]
async fn the_two_person_rule_needs_a_different_operator_above_its_size() {
    let f = flow(|c| {
        c.chat.slack.access.two_person.insert("C2".into(), 1);
    })
    .await;
    let pay1 = f.agent("pay-1", HOLD).await;
    let pay2 = f.agent("pay-2", HOLD).await;
    let mut c = cmd("UOPS", "ada", "restart host:pay-*", "t-fanout");
    c.channel = "C2";
    f.slack.command(&f.fake, &c).await;
    let p = f.preview(0).await;
    assert!(
        text_of(&p.body).contains("need another operator"),
        "{}",
        p.body
    );
    // The requester cannot approve their own fan-out, nor can a viewer.
    f.click(("UOPS", "ada"), &p, "flotilla_confirm", "t-self", None)
        .await;
    let why = f.private_answer("t-self").await;
    assert!(why.contains("different operator"), "{why}");
    f.click(("UVIEW", "vic"), &p, "flotilla_confirm", "t-viewer", None)
        .await;
    let why = f.private_answer("t-viewer").await;
    assert!(why.contains("operator"), "{why}");
    nothing_queued(&f, &[&pay1, &pay2]).await;

    // Another operator approves: queued once, under the approver's name.
    f.click(("UOPS2", "bob"), &p, "flotilla_confirm", "t-bob", None)
        .await;
    f.update_with(&p.ts, "Finished").await;
    let cmds = f.commands().await;
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    assert_eq!((pay1.sent(), pay2.sent()), (1, 1));
    let audit = f.audit().await;
    assert!(
        audit.iter().any(|r| r["actor"] == "slack:T1/UOPS2 (bob)"),
        "{audit:?}"
    );

    // At the size (one agent), the requester confirms alone.
    let mut c = cmd("UOPS", "ada", "restart pay-1", "t-one");
    c.channel = "C2";
    f.slack.command(&f.fake, &c).await;
    let p = f.preview(1).await;
    f.click(("UOPS", "ada"), &p, "flotilla_confirm", "t-own", None)
        .await;
    f.update_with(&p.ts, "Finished").await;
    assert_eq!(f.commands().await.len(), 3);
    assert_eq!(pay1.sent(), 2);
    f.server.stop().await;
}

#[tokio::test]
async fn a_confirm_after_the_target_set_changed_is_refused_and_queues_nothing() {
    let f = flow(|_| {}).await;
    let pay1 = f.agent("pay-1", HOLD).await;
    let pay2 = f.agent("pay-2", HOLD).await;
    f.slack
        .command(&f.fake, &cmd("UOPS", "ada", "restart host:pay-*", "t-plan"))
        .await;
    let p = f.preview(0).await;
    assert!(text_of(&p.body).contains("on 2 agents"), "{}", p.body);
    // An agent joins the query's set between the preview and the confirm.
    let pay3 = f.agent("pay-3", HOLD).await;
    f.click(("UOPS", "ada"), &p, "flotilla_confirm", "t-late", None)
        .await;
    let why = f.private_answer("t-late").await;
    assert!(why.contains("targets_changed"), "{why}");
    assert!(why.contains("Nothing was changed"), "{why}");
    nothing_queued(&f, &[&pay1, &pay2, &pay3]).await;
    f.server.stop().await;
}

#[tokio::test]
async fn an_expired_confirmation_is_refused_and_queues_nothing() {
    let f = flow(|c| c.chat.slack.confirm_expiry_s = 1).await;
    let web = f.agent("web-1", HOLD).await;
    f.slack
        .command(&f.fake, &cmd("UOPS", "ada", "restart web-1", "t-plan"))
        .await;
    let p = f.preview(0).await;
    assert!(text_of(&p.body).contains("Expires in 1 s"), "{}", p.body);
    // The expiry is on the wall clock the server keeps confirmations by.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    f.click(("UOPS", "ada"), &p, "flotilla_confirm", "t-late", None)
        .await;
    let why = f.private_answer("t-late").await;
    assert!(why.contains("expired"), "{why}");
    nothing_queued(&f, &[&web]).await;
    f.server.stop().await;
}
