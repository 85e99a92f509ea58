//! Fleet alerts into Slack end to end: a real server with the Slack gateway on its chat
//! listener, requests signed as Slack signs them, the fake Slack Web API recording what was
//! posted, and OpAMP agents over HTTP whose health and departures are the fleet events.
//! Subscriptions made, listed and removed from Slack; a storm of 1,000 agents going offline
//! reaching the channel as a handful of messages; one unhealthy agent's alert and its buttons.

use std::time::Duration;

use flotilla_e2e::agent::{now_ns, HttpAgent};
use flotilla_e2e::fake_slack::{Call, Click, FakeSlack, SlackSigner, SlashCommand};
use flotilla_proto::{AgentDisconnect, AgentToServer, ComponentHealth};
use serde_json::Value;
use tokio::task::JoinSet;

use crate::chat_slack::{configure, private_answer, SECRET, TOKEN};
use crate::support::TestServer;

const WAIT: Duration = Duration::from_secs(60);

struct Rig {
    server: TestServer,
    fake: FakeSlack,
    slack: SlackSigner,
}

async fn rig() -> Rig {
    let fake = FakeSlack::start(TOKEN).await;
    let api_url = fake.api_url();
    let server = TestServer::start_with(|c| configure(c, &api_url)).await;
    let slack = SlackSigner::new(SECRET, &format!("http://{}", server.chat.unwrap()));
    Rig {
        server,
        fake,
        slack,
    }
}

/// The text and blocks Slack was sent, as one searchable string.
fn text(c: &Call) -> String {
    c.body.to_string()
}

fn posts(fake: &FakeSlack, needle: &str) -> Vec<Call> {
    fake.calls_of("chat.postMessage")
        .into_iter()
        .filter(|c| text(c).contains(needle))
        .collect()
}

impl Rig {
    async fn say(&self, user: &str, name: &str, text: &str, trigger: &str) {
        let a = self
            .slack
            .command(
                &self.fake,
                &SlashCommand {
                    team: "T1",
                    channel: "C1",
                    user,
                    user_name: name,
                    text,
                    trigger_id: trigger,
                },
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }

    async fn click(&self, user: (&str, &str), ts: &str, action: &str, value: &str, trigger: &str) {
        let p = Click {
            team: "T1",
            channel: "C1",
            user,
            message_ts: ts,
            thread_ts: None,
            action_id: action,
            value,
            trigger_id: trigger,
        }
        .payload(&self.fake);
        assert_eq!(self.slack.interaction(&p).await.status, 200);
    }

    /// The first post containing `needle`, once there is one.
    async fn post_with(&self, what: &str, needle: &str) -> Call {
        self.fake
            .wait_for(WAIT, what, |c| {
                c.iter()
                    .any(|c| c.method == "chat.postMessage" && text(c).contains(needle))
            })
            .await;
        posts(&self.fake, needle).remove(0)
    }

    /// The private answer to a request.
    async fn private_answer(&self, trigger: &str) -> String {
        private_answer(&self.fake, trigger).await
    }

    /// Subscribes C1 as the operator; the subscription's id.
    async fn subscribe(&self, query: &str, trigger: &str) -> String {
        self.say("UOPS", "ada", &format!("subscribe {query}"), trigger)
            .await;
        let p = self
            .post_with("the subscription", "Subscribed this channel")
            .await;
        let t = text(&p);
        let i = t.find("(`s-").expect("an id in the answer") + 2;
        t[i..i + 10].to_string()
    }
}

/// Registers `n` healthy HTTP agents named `{prefix}-{i}` (host `{prefix}-{i}-host`), 50 at a
/// time.
pub(crate) async fn agents(server: &TestServer, prefix: &str, n: usize) -> Vec<HttpAgent> {
    let mut out = Vec::new();
    let mut set = JoinSet::new();
    for i in 1..=n {
        let url = server.opamp_http_url();
        let name = format!("{prefix}-{i}");
        set.spawn(async move {
            let mut a = HttpAgent::fluent_like(&url, &name);
            let msg = a.full_state();
            a.send(msg).await;
            a
        });
        if set.len() >= 50 {
            out.push(set.join_next().await.unwrap().unwrap());
        }
    }
    while let Some(a) = set.join_next().await {
        out.push(a.unwrap());
    }
    out
}

pub(crate) fn health(healthy: bool) -> AgentToServer {
    AgentToServer {
        health: Some(ComponentHealth {
            healthy,
            start_time_unix_nano: now_ns(),
            status: if healthy { "running" } else { "degraded" }.into(),
            last_error: if healthy { "" } else { "output es.0 down" }.into(),
            status_time_unix_nano: now_ns(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An alert's buttons, in order: Restart, Show health, Mute 1 h.
pub(crate) const ALERT_ACTIONS: [&str; 3] = [
    "flotilla_alert_restart",
    "flotilla_alert_health",
    "flotilla_alert_mute",
];

/// N of "N agents went offline" in a message's text, on any platform.
pub(crate) fn offline_count(text: &str) -> Option<u64> {
    let i = text.find(" agents went offline")?;
    let n: String = text[..i]
        .chars()
        .rev()
        .take_while(|ch| ch.is_ascii_digit() || *ch == ',')
        .filter(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    n.parse().ok()
}

/// The counts of "N agents went offline" in the summaries Slack got.
fn offline_counts(fake: &FakeSlack) -> Vec<u64> {
    fake.calls_of("chat.postMessage")
        .iter()
        .filter_map(|c| offline_count(c.body["text"].as_str()?))
        .collect()
}

/// Every agent in `fleet` says goodbye (agent_disconnect), 50 at a time: each goes offline
/// at once.
pub(crate) async fn goodbye(fleet: Vec<HttpAgent>) {
    let mut set = JoinSet::new();
    for mut a in fleet {
        set.spawn(async move {
            let bye = AgentToServer {
                agent_disconnect: Some(AgentDisconnect {}),
                ..Default::default()
            };
            a.send(bye).await;
        });
        if set.len() >= 50 {
            set.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

#[tokio::test]
async fn a_storm_of_1000_agents_going_offline_is_a_handful_of_messages() {
    let rig = rig().await;
    let fleet = agents(&rig.server, "web", 1000).await;
    rig.subscribe("state:offline", "t-sub").await;
    let before = rig.fake.calls_of("chat.postMessage").len();

    goodbye(fleet).await;
    rig.fake
        .wait_for(WAIT, "summaries covering all 1,000 agents", |_| {
            offline_counts(&rig.fake).iter().sum::<u64>() >= 1000
        })
        .await;
    let sent = rig.fake.calls_of("chat.postMessage").len() - before;
    let counts = offline_counts(&rig.fake);
    assert_eq!(counts.iter().sum::<u64>(), 1000, "{counts:?}");
    assert!(sent <= 5, "{sent} messages for one storm: {counts:?}");
    let summary = posts(&rig.fake, "agents went offline").remove(0);
    assert!(
        text(&summary).contains("web-") && text(&summary).contains("more"),
        "{summary:?}"
    );
    rig.server.stop().await;
}

#[tokio::test]
async fn an_unhealthy_agent_alerts_once_with_buttons_and_subscriptions_are_managed_from_slack() {
    let rig = rig().await;
    let mut fleet = agents(&rig.server, "db", 2).await;
    fleet.sort_by(|a, b| a.name.cmp(&b.name));
    let (a_host, b_host) = ("db-1-host", "db-2-host");

    // A viewer cannot subscribe; an operator can.
    rig.say("UVIEW", "vic", "subscribe health:unhealthy", "t-viewer")
        .await;
    let why = rig.private_answer("t-viewer").await;
    assert!(why.contains("operator"), "{why}");
    let id = rig.subscribe("health:unhealthy", "t-sub").await;
    rig.say("UVIEW", "vic", "subscriptions", "t-list").await;
    let list = rig.post_with("the list", "alert subscription").await;
    assert!(
        text(&list).contains(&id) && text(&list).contains("health:unhealthy"),
        "{list:?}"
    );

    // db-1 becomes unhealthy: one alert, with Restart, Show health and Mute 1 h.
    fleet[0].send(health(false)).await;
    let alert = rig.post_with("the alert", "became unhealthy").await;
    assert!(text(&alert).contains(a_host), "{alert:?}");
    let actions = alert.body["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "actions")
        .expect("buttons")["elements"]
        .clone();
    let ids: Vec<&str> = actions
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ALERT_ACTIONS);
    let value = |i: usize| actions[i]["value"].as_str().unwrap().to_string();
    let ts = alert.body["ts"].as_str().unwrap_or("1700000000.000900");

    // Show health: the agent's health, for anyone who may read the fleet.
    rig.click(
        ("UVIEW", "vic"),
        ts,
        "flotilla_alert_health",
        &value(1),
        "t-health",
    )
    .await;
    let h = rig.post_with("the health", "Health of").await;
    assert!(
        text(&h).contains("unhealthy") && text(&h).contains("output es.0 down"),
        "{h:?}"
    );

    // Restart: a preview to confirm, nothing queued.
    rig.click(
        ("UOPS", "ada"),
        ts,
        "flotilla_alert_restart",
        &value(0),
        "t-restart",
    )
    .await;
    let preview = rig.post_with("the preview", "flotilla_confirm").await;
    assert!(text(&preview).contains("restart"), "{preview:?}");
    let (st, cmds) = rig.server.rest().get("/api/v1/commands").await;
    assert_eq!(st, 200);
    assert_eq!(cmds["items"].as_array().map(Vec::len), Some(0), "{cmds}");

    // Mute (operator): db-1's recovery is not alerted; db-2's trouble still is.
    rig.click(
        ("UVIEW", "vic"),
        ts,
        "flotilla_alert_mute",
        &value(2),
        "t-mute-viewer",
    )
    .await;
    assert!(rig
        .private_answer("t-mute-viewer")
        .await
        .contains("operator"));
    rig.click(
        ("UOPS", "ada"),
        ts,
        "flotilla_alert_mute",
        &value(2),
        "t-mute",
    )
    .await;
    rig.post_with("the mute", "muted").await;
    fleet[0].send(health(true)).await;
    fleet[1].send(health(false)).await;
    let b_alert = rig.post_with("db-2's alert", b_host).await;
    assert!(text(&b_alert).contains("became unhealthy"), "{b_alert:?}");
    let a_recovered: Vec<Call> = posts(&rig.fake, "recovered")
        .into_iter()
        .filter(|c| text(c).contains(a_host))
        .collect();
    assert!(
        a_recovered.is_empty(),
        "a muted agent's recovery was alerted: {a_recovered:?}"
    );
    assert_eq!(posts(&rig.fake, "became unhealthy").len(), 2);

    // Subscribing, muting are in the audit trail under the Slack user.
    let (st, audit) = rig.server.rest().get("/api/v1/audit?channel=slack").await;
    assert_eq!(st, 200, "{audit}");
    let ops: Vec<(String, String)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["operation"].as_str().unwrap_or("").to_string(),
                r["actor"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for op in ["chat.subscribe", "chat.mute"] {
        assert!(
            ops.contains(&(op.to_string(), "slack:T1/UOPS (ada)".to_string())),
            "{op} not audited: {ops:?}"
        );
    }

    // Unsubscribe: removed, listed no more, and nothing more is alerted.
    rig.say("UOPS", "ada", &format!("unsubscribe {id}"), "t-unsub")
        .await;
    rig.post_with("the removal", "Unsubscribed").await;
    rig.say("UOPS", "ada", "subscriptions", "t-list2").await;
    rig.post_with("the empty list", "no alert subscriptions")
        .await;
    let before = rig.fake.calls_of("chat.postMessage").len();
    fleet[1].send(health(true)).await;
    // A real server and real sockets: a bounded look past the 1 s coalescing window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: Vec<Value> = rig.fake.calls_of("chat.postMessage")[before..]
        .iter()
        .map(|c| c.body.clone())
        .collect();
    assert!(after.is_empty(), "alerted after unsubscribing: {after:?}");
    rig.server.stop().await;
}
