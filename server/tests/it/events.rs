//! The fleet event bus seen by a subscriber of a real server: agents over real WebSockets and
//! HTTP, commands queued over REST, and the events in the order they happened.

use std::time::Duration;

use flotilla_proto::AgentCapabilities as AC;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::opamp::{beat, full, new_uid, now_ns, post, queue, Ws};
use crate::support::TestServer;

const WAIT: Duration = Duration::from_secs(10);
const REPORTS_STATUS: u64 = AC::ReportsStatus as u64;

/// The next event `pred` accepts (others are skipped), within [`WAIT`].
async fn next_where(
    rx: &mut broadcast::Receiver<std::sync::Arc<Value>>,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(v)) if pred(&v) => return (*v).clone(),
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => panic!("bus receiver failed waiting for {what}: {e}"),
            Err(_) => panic!("no {what} event within {WAIT:?}"),
        }
    }
}

/// Every event about `uid` (as agent or command target) until `stop` accepts one, inclusive.
async fn events_until(
    rx: &mut broadcast::Receiver<std::sync::Arc<Value>>,
    stop: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let v = match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(v)) => (*v).clone(),
            Ok(Err(e)) => panic!("bus receiver failed: {e}; seen so far: {seen:#?}"),
            Err(_) => panic!("the expected event never came; seen: {seen:#?}"),
        };
        let done = stop(&v);
        seen.push(v);
        if done {
            return seen;
        }
    }
}

fn ty(v: &Value) -> &str {
    v["type"].as_str().unwrap_or("")
}

fn about(uid: Uuid) -> impl Fn(&Value) -> bool {
    let u = uid.to_string();
    move |v: &Value| v["uid"] == json!(u) || v["agent_uid"] == json!(u)
}

#[tokio::test]
async fn a_websocket_agent_and_a_command_make_the_expected_sequence_of_events() {
    let server = TestServer::start().await;
    let mut rx = server.fleet.subscribe();
    let uid = new_uid();
    let caps = REPORTS_STATUS | AC::AcceptsRestartCommand as u64 | AC::ReportsHealth as u64;

    let mut ws = Ws::connect(&server).await;
    ws.request(&full(uid, 0, caps)).await;
    let id = queue(&server, uid, "restart", json!({})).await;
    let m = ws.recv().await;
    assert!(m.command.is_some(), "the restart is pushed: {m:?}");
    // The agent restarts: its connection drops, and it comes back reporting a later start.
    let mine = about(uid);
    let seen = events_until(&mut rx, |v| {
        ty(v) == "command.progress" && v["status"] == "sent"
    })
    .await;
    drop(ws);
    let mut seen2 = events_until(&mut rx, |v| ty(v) == "agent.disconnected").await;
    let mut ws = Ws::connect(&server).await;
    let mut m = full(uid, 1, caps);
    m.health.as_mut().unwrap().start_time_unix_nano = now_ns();
    ws.request(&m).await;
    let mut seen3 = events_until(&mut rx, |v| {
        ty(v) == "audit" && v["operation"] == "command.result"
    })
    .await;
    let mut all = seen;
    all.append(&mut seen2);
    all.append(&mut seen3);

    // Agent and command events, in order, each naming the agent without a lookup.
    let agent_side: Vec<String> = all
        .iter()
        .filter(|v| mine(v))
        .map(|v| match ty(v) {
            "command.progress" => format!("command.progress:{}", v["status"].as_str().unwrap()),
            t => t.to_string(),
        })
        .collect();
    assert_eq!(
        agent_side,
        [
            "agent.registered",
            "agent.connected",
            "agent.health",
            "command.progress:queued",
            "command.progress:sent",
            "agent.disconnected",
            "agent.connected",
            "command.progress:succeeded",
        ],
        "{all:#?}"
    );
    for v in all.iter().filter(|v| mine(v)) {
        assert_eq!(v["host"], "node-1", "{v}");
        assert_eq!(v["agent_type"], "fluentbit", "{v}");
        assert!(v["at"].as_i64().unwrap() > 1_700_000_000_000, "{v}");
    }
    let progress: Vec<&Value> = all.iter().filter(|v| ty(v) == "command.progress").collect();
    for p in &progress {
        assert_eq!(p["id"], json!(id));
        assert_eq!(p["kind"], "restart");
        assert_eq!(p["batch_id"], Value::Null);
    }
    assert_eq!(progress[0]["actor"], "admin");
    assert_eq!(progress[0]["channel"], "rest");
    assert_eq!(
        (progress[2]["old"].as_str(), progress[2]["status"].as_str()),
        (Some("sent"), Some("succeeded"))
    );
    let health = all.iter().find(|v| ty(v) == "agent.health").unwrap();
    assert_eq!(
        (health["old"].clone(), health["new"].clone()),
        (Value::Null, json!("healthy"))
    );
    let connected = all.iter().find(|v| ty(v) == "agent.connected").unwrap();
    assert_eq!(connected["transport"], "websocket");

    // Both audit records, queue then result, as they were appended.
    let audits: Vec<(&str, &str)> = all
        .iter()
        .filter(|v| ty(v) == "audit")
        .map(|v| {
            (
                v["operation"].as_str().unwrap(),
                v["channel"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        audits,
        [("command.queue", "rest"), ("command.result", "system")]
    );
    assert!(all.iter().all(|v| ty(v) != "command.failed"));
    server.stop().await;
}

#[tokio::test]
async fn fan_outs_failures_labels_and_cancels_are_on_the_bus() {
    let server = TestServer::start().await;
    let mut rx = server.fleet.subscribe();
    // Two HTTP agents that can restart; nothing is ever delivered (they do not poll again).
    let caps = REPORTS_STATUS | AC::AcceptsRestartCommand as u64 | AC::ReportsHealth as u64;
    let (a, b) = (new_uid(), new_uid());
    post(&server, &full(a, 0, caps)).await;
    post(&server, &full(b, 0, caps)).await;
    let rest = server.rest();
    let (status, body) = rest
        .post(
            "/api/v1/commands",
            json!({"query": "host:node-1", "kind": "restart"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let batch = next_where(&mut rx, "batch.queued", |v| ty(v) == "batch.queued").await;
    assert_eq!(batch["queued"], 2);
    assert_eq!(batch["query"], "host:node-1");
    let batch_id = batch["batch_id"].as_str().unwrap().to_string();
    for _ in 0..2 {
        let p = next_where(&mut rx, "queued progress", |v| ty(v) == "command.progress").await;
        assert_eq!(p["batch_id"], json!(batch_id));
        assert_eq!(p["status"], "queued");
    }
    // A cancel of one of them.
    let cmd = body["commands"][0]["command_id"]
        .as_str()
        .expect("command_id")
        .to_string();
    let (status, body) = rest.delete(&format!("/api/v1/commands/{cmd}")).await;
    assert_eq!(status, 200, "{body}");
    let c = next_where(&mut rx, "cancel", |v| {
        ty(v) == "command.progress" && v["status"] == "cancelled"
    })
    .await;
    assert_eq!(
        (c["id"].as_str(), c["old"].as_str()),
        (Some(cmd.as_str()), Some("queued"))
    );

    // A label edit names agent, key and value.
    let (status, _) = rest
        .put(
            &format!("/api/v1/agents/{a}/labels/env"),
            json!({"value": "prod"}),
        )
        .await;
    assert_eq!(status, 200);
    let l = next_where(&mut rx, "agent.labels", |v| ty(v) == "agent.labels").await;
    assert_eq!(l["uid"], json!(a.to_string()));
    assert_eq!(
        (l["key"].as_str(), l["value"].as_str()),
        (Some("env"), Some("prod"))
    );
    let au = next_where(&mut rx, "label audit", |v| {
        ty(v) == "audit" && v["operation"] == "agent.label.set"
    })
    .await;
    assert_eq!(au["actor"], "admin");

    // An agent turning unhealthy says why.
    let mut m = full(b, 1, caps);
    let h = m.health.as_mut().unwrap();
    h.healthy = false;
    h.last_error = "output es.0 unreachable".into();
    post(&server, &m).await;
    let h = next_where(&mut rx, "agent.health", |v| {
        ty(v) == "agent.health" && v["uid"] == json!(b.to_string())
    })
    .await;
    assert_eq!(
        (h["old"].as_str(), h["new"].as_str()),
        (Some("healthy"), Some("unhealthy"))
    );
    assert_eq!(h["last_error"], "output es.0 unreachable");
    server.stop().await;
}

#[tokio::test]
async fn expired_commands_are_failures_on_the_bus() {
    let server = TestServer::start_with(|c| c.commands.result_timeout_s = 1).await;
    let mut rx = server.fleet.subscribe();
    let uid = new_uid();
    // A restart nothing can confirm (no health reports): it expires after the result timeout.
    let caps = REPORTS_STATUS | AC::AcceptsRestartCommand as u64;
    let mut ws = Ws::connect(&server).await;
    ws.request(&full(uid, 0, caps)).await;
    let id = queue(&server, uid, "restart", json!({})).await;
    ws.recv().await;
    let f = next_where(&mut rx, "command.failed", |v| ty(v) == "command.failed").await;
    assert_eq!(f["id"], json!(id));
    assert_eq!(
        (f["old"].as_str(), f["status"].as_str()),
        (Some("sent"), Some("expired"))
    );
    assert!(f["error"].as_str().is_some_and(|e| !e.is_empty()), "{f}");
    assert_eq!(f["host"], "node-1");
    server.stop().await;
}

#[tokio::test]
async fn liveness_transitions_are_seen_without_any_write() {
    // Agents that take the offered 1 s heartbeat are late after 1.5 s and offline after 3 s.
    let server = TestServer::start_with(|c| c.opamp.heartbeat_interval_s = 1).await;
    let mut rx = server.fleet.subscribe();
    let caps =
        REPORTS_STATUS | AC::AcceptsOpAmpConnectionSettings as u64 | AC::ReportsHeartbeat as u64;
    let uid = new_uid();
    post(&server, &full(uid, 0, caps)).await;
    let t0 = tokio::time::Instant::now();
    let mine = about(uid);
    let late = next_where(&mut rx, "late", |v| ty(v) == "agent.liveness" && mine(v)).await;
    assert_eq!(
        (late["old"].as_str(), late["new"].as_str()),
        (Some("healthy"), Some("late"))
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t0.elapsed()
    );
    let off = next_where(&mut rx, "offline", |v| ty(v) == "agent.liveness" && mine(v)).await;
    assert_eq!(
        (off["old"].as_str(), off["new"].as_str()),
        (Some("late"), Some("offline"))
    );
    assert_eq!(off["host"], "node-1");
    // A heartbeat (batched, no record write on its own) brings it back at once.
    post(&server, &beat(uid, 1)).await;
    let back = next_where(&mut rx, "back", |v| ty(v) == "agent.liveness" && mine(v)).await;
    assert_eq!(
        (back["old"].as_str(), back["new"].as_str()),
        (Some("offline"), Some("healthy"))
    );
    server.stop().await;
}
