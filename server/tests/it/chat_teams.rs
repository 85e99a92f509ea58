//! Teams end to end: a real server with a WebSocket agent connected and the Teams gateway on
//! its chat listener; activities carry JWTs signed with test RSA keys served from a local
//! OpenID metadata + JWKS; a fake Bot Connector and token endpoint record what Teams was sent.
//! Asserts on what the fleet did (commands queued once, audit records with the Teams identity
//! and channel `teams`) and on the cards Teams was sent, alerts included (OpAMP agents over HTTP
//! going offline and unhealthy are the fleet events).

use std::time::Duration;

use flotilla_e2e::fake_teams::{ConnectorCall, FakeTeams};
use flotilla_server::config::Secret;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::chat_alerts::{agents, goodbye, health, offline_count, ALERT_ACTIONS};
use crate::chat_slack::connected_agent;
use crate::support::TestServer;

const APP_ID: &str = "7f5e1c0a-0000-4000-8000-0000000000b0";
const PASSWORD: &str = "e2e-teams-password";
const OPS: (&str, &str) = ("aad-ops", "Olu Ops");

struct Rig {
    server: TestServer,
    fake: FakeTeams,
    agent: Uuid,
    url: String,
    http: reqwest::Client,
}

async fn rig() -> Rig {
    let fake = FakeTeams::start(APP_ID, PASSWORD).await;
    let (meta, token) = (fake.metadata_url(), fake.token_url());
    let service = fake.service_url();
    let server = TestServer::start_with(|c| {
        c.chat.listen = Some("127.0.0.1:0".into());
        let t = &mut c.chat.teams;
        t.enabled = true;
        t.app_id = APP_ID.into();
        t.openid_metadata_url = meta;
        t.token_url = Some(token);
        t.service_url = service;
        // Granted in tenant-1 only, the tenant-qualified form.
        t.access
            .users
            .insert("tenant-1/aad-ops".into(), flotilla_chat::Role::Operator);
        c.env_secrets.teams_app_password = Some(Secret(PASSWORD.into()));
    })
    .await;
    let agent = connected_agent(&server).await;
    let url = format!("http://{}/chat/teams/messages", server.chat.unwrap());
    Rig {
        server,
        fake,
        agent,
        url,
        http: reqwest::Client::new(),
    }
}

impl Rig {
    async fn send(&self, auth: Option<&str>, activity: &Value) -> u16 {
        let mut r = self.http.post(&self.url).json(activity);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send().await.unwrap().status().as_u16()
    }

    async fn commands(&self) -> Vec<Value> {
        let (st, body) = self.server.rest().get("/api/v1/commands").await;
        assert_eq!(st, 200, "{body}");
        body["items"].as_array().cloned().unwrap_or_default()
    }
}

fn has(calls: &[ConnectorCall], kind: &str, needle: &str) -> bool {
    calls
        .iter()
        .any(|c| c.kind == kind && c.body.to_string().contains(needle))
}

#[tokio::test]
async fn a_teams_restart_is_previewed_as_a_card_confirmed_once_followed_and_audited() {
    let rig = rig().await;
    let bearer = rig.fake.bearer();

    // A channel mention is answered in its thread.
    let m = rig
        .fake
        .message("channel", "1001", OPS, "agents host.name:web-ws-1");
    assert_eq!(rig.send(Some(&bearer), &m).await, 200);
    let calls = rig
        .fake
        .wait_calls(20, |c| has(c, "reply", "web-ws-1"))
        .await;
    assert_eq!(calls[0].conversation, "19:ops@thread.tacv2;messageid=1001");

    // 1:1: the restart is previewed as an Adaptive Card with Confirm; nothing queued yet.
    let r = rig
        .fake
        .message("personal", "2001", OPS, "restart web-ws-1");
    assert_eq!(rig.send(Some(&bearer), &r).await, 200);
    let calls = rig
        .fake
        .wait_calls(20, |c| has(c, "reply", "flotilla_confirm"))
        .await;
    let preview = calls
        .iter()
        .find(|c| c.kind == "reply" && c.body.to_string().contains("flotilla_confirm"))
        .unwrap();
    let card = &preview.body["attachments"][0];
    assert_eq!(
        card["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    let confirm = card["content"]["actions"][0]["data"].clone();
    assert_eq!(confirm["flotilla_action"], "flotilla_confirm");
    assert!(rig.commands().await.is_empty());

    // Confirm, and Teams redelivering the same activity: queued once.
    let card_id = preview.id.clone().unwrap();
    let submit = rig
        .fake
        .submit("2002", OPS, &preview.conversation, &card_id, &confirm);
    assert_eq!(rig.send(Some(&bearer), &submit).await, 200);
    assert_eq!(rig.send(Some(&bearer), &submit).await, 200);
    // Progress replaces the card in place until the agent has restarted.
    rig.fake
        .wait_calls(30, |c| {
            c.iter().any(|c| {
                c.kind == "update"
                    && c.activity.as_deref() == Some(card_id.as_str())
                    && c.body.to_string().contains("Finished")
            })
        })
        .await;
    let cmds = rig.commands().await;
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(cmds[0]["kind"], "restart");
    assert_eq!(cmds[0]["agent_uid"], json!(rig.agent.to_string()));

    let (st, audit) = rig.server.rest().get("/api/v1/audit?channel=teams").await;
    assert_eq!(st, 200, "{audit}");
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["actor"] == "teams:tenant-1/aad-ops (Olu Ops)" && r["channel"] == "teams"),
        "{audit}"
    );
    // One client-credentials token served every call.
    assert_eq!(rig.fake.token_requests().len(), 1);
}

#[tokio::test]
async fn unauthenticated_or_foreign_tokens_are_refused_and_nothing_is_queued() {
    let rig = rig().await;
    let r = rig
        .fake
        .message("personal", "3001", OPS, "restart web-ws-1");
    let mut claims = rig.fake.claims(&rig.fake.service_url());
    claims["aud"] = json!("another-bot");
    let wrong_aud = format!("Bearer {}", FakeTeams::sign("key1", "key1", &claims));
    let mut claims = rig.fake.claims(&rig.fake.service_url());
    claims["iss"] = json!("https://sts.windows.net/x/");
    let wrong_iss = format!("Bearer {}", FakeTeams::sign("key1", "key1", &claims));
    let mut claims = rig.fake.claims(&rig.fake.service_url());
    claims["exp"] = json!(claims["nbf"].as_i64().unwrap() - 1000);
    claims["nbf"] = json!(claims["nbf"].as_i64().unwrap() - 4000);
    let expired = format!("Bearer {}", FakeTeams::sign("key1", "key1", &claims));
    let claims = rig.fake.claims("https://elsewhere.example/");
    let other_url = format!("Bearer {}", FakeTeams::sign("key1", "key1", &claims));
    let unknown_kid = format!(
        "Bearer {}",
        FakeTeams::sign("rogue", "rogue", &rig.fake.claims(&rig.fake.service_url()))
    );
    for (name, auth) in [
        ("unsigned", None),
        ("wrong audience", Some(wrong_aud)),
        ("wrong issuer", Some(wrong_iss)),
        ("expired", Some(expired)),
        ("serviceUrl mismatch", Some(other_url)),
        ("unknown key id", Some(unknown_kid)),
    ] {
        assert_eq!(rig.send(auth.as_deref(), &r).await, 401, "{name}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rig.commands().await.is_empty());
    assert!(rig.fake.calls().is_empty(), "nothing was posted");
}

/// The Connector calls of `kind` whose body contains `needle`.
fn calls_with(calls: &[ConnectorCall], kind: &str, needle: &str) -> Vec<ConnectorCall> {
    calls
        .iter()
        .filter(|c| c.kind == kind && c.body.to_string().contains(needle))
        .cloned()
        .collect()
}

#[tokio::test]
async fn teams_alerts_a_storm_as_one_summary_and_an_alert_restart_is_confirmed_once() {
    let rig = rig().await;
    let bearer = rig.fake.bearer();
    let storm = agents(&rig.server, "tm", 100).await;
    let mut sick = agents(&rig.server, "tx", 1).await;
    let sick_uid = sick[0].uid_str();

    // Subscriptions made by @mentions in the channel: alerts go to the channel itself.
    for (id, query) in [("5001", "state:offline"), ("5002", "health:unhealthy")] {
        let m = rig
            .fake
            .message("channel", id, OPS, &format!("subscribe {query}"));
        assert_eq!(rig.send(Some(&bearer), &m).await, 200);
    }
    rig.fake
        .wait_calls(20, |c| {
            calls_with(c, "reply", "Subscribed this channel").len() == 2
        })
        .await;

    // A storm: 100 agents go offline at once; the channel gets a summary, not 100 cards.
    goodbye(storm).await;
    let calls = rig
        .fake
        .wait_calls(60, |c| {
            calls_with(c, "post", "agents went offline")
                .iter()
                .filter_map(|c| offline_count(&c.body.to_string()))
                .sum::<u64>()
                >= 100
        })
        .await;
    let summaries = calls_with(&calls, "post", "agents went offline");
    let counts: Vec<u64> = summaries
        .iter()
        .filter_map(|c| offline_count(&c.body.to_string()))
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 100, "{counts:?}");
    // One coalescing window normally holds the whole storm; a loaded machine may split it.
    assert!(summaries.len() <= 2, "{counts:?}");
    assert_eq!(summaries[0].conversation, "19:ops@thread.tacv2");
    assert!(
        summaries[0].body.to_string().contains("tm-")
            && summaries[0].body.to_string().contains("more"),
        "{:?}",
        summaries[0].body
    );
    let offline_posts = calls
        .iter()
        .filter(|c| c.kind == "post" && c.body.to_string().contains("went offline"))
        .count();
    assert_eq!(
        offline_posts,
        summaries.len(),
        "no single alerts beside the summary"
    );

    // One agent turns unhealthy: an alert card with Restart, Show health and Mute 1 h.
    sick[0].send(health(false)).await;
    let calls = rig
        .fake
        .wait_calls(30, |c| {
            !calls_with(c, "post", "became unhealthy").is_empty()
        })
        .await;
    let alert = calls_with(&calls, "post", "became unhealthy").remove(0);
    assert!(
        alert.body.to_string().contains("tx-1-host"),
        "{:?}",
        alert.body
    );
    let actions = alert.body["attachments"][0]["content"]["actions"]
        .as_array()
        .cloned()
        .expect("the alert card's actions");
    let ids: Vec<&str> = actions
        .iter()
        .map(|a| {
            assert_eq!(a["type"], "Action.Submit");
            a["data"]["flotilla_action"].as_str().unwrap()
        })
        .collect();
    assert_eq!(ids, ALERT_ACTIONS);

    // Restart on the alert: Teams sends the card's data from the alert's own thread.
    let card_id = alert.id.clone().unwrap();
    let thread = format!("{};messageid={card_id}", alert.conversation);
    let restart = rig
        .fake
        .submit("5003", OPS, &thread, &card_id, &actions[0]["data"]);
    assert_eq!(rig.send(Some(&bearer), &restart).await, 200);
    let calls = rig
        .fake
        .wait_calls(20, |c| {
            !calls_with(c, "reply", "flotilla_confirm").is_empty()
        })
        .await;
    let preview = calls_with(&calls, "reply", "flotilla_confirm").remove(0);
    assert!(
        preview.body.to_string().contains("restart"),
        "{:?}",
        preview.body
    );
    assert!(rig.commands().await.is_empty(), "previewed, not queued");

    // Confirm, redelivered by Teams: queued exactly once, to the alerting agent.
    let confirm = preview.body["attachments"][0]["content"]["actions"][0]["data"].clone();
    assert_eq!(confirm["flotilla_action"], "flotilla_confirm");
    let preview_id = preview.id.clone().unwrap();
    let submit = rig
        .fake
        .submit("5004", OPS, &preview.conversation, &preview_id, &confirm);
    assert_eq!(rig.send(Some(&bearer), &submit).await, 200);
    assert_eq!(rig.send(Some(&bearer), &submit).await, 200);
    rig.fake
        .wait_calls(20, |c| {
            c.iter()
                .any(|c| c.kind == "update" && c.activity.as_deref() == Some(preview_id.as_str()))
        })
        .await;
    let cmds = rig.commands().await;
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(cmds[0]["kind"], "restart");
    assert_eq!(cmds[0]["agent_uid"], json!(sick_uid));

    let (st, audit) = rig.server.rest().get("/api/v1/audit?channel=teams").await;
    assert_eq!(st, 200, "{audit}");
    let by_ops = |op: &str| {
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["operation"] == op && r["actor"] == "teams:tenant-1/aad-ops (Olu Ops)")
            .count()
    };
    assert_eq!(by_ops("chat.subscribe"), 2, "{audit}");
    assert_eq!(by_ops("command.queue"), 1, "{audit}");
    rig.server.stop().await;
}
