//! Interoperability with third-party OpAMP clients against the real `flotilla` binary: PyPI
//! `opentelemetry-opamp-client==0.5b0` and npm `@elastic/opamp-client-node@0.5.0`, driven by
//! `tests/peers/`. Each one registers (found by search, with its attributes, capability bits
//! and — Python only — health), heartbeats (sequence number and last-seen advance), reports
//! its full state when a `force_resync` command asks, applies a JSON remote config (hash and
//! body round-trip, APPLIED settles the command), and goes away: Python sends
//! `agent_disconnect` (offline at once), Node 0.5.0 sends nothing, so only liveness (3 missed
//! 1-second heartbeats) turns it offline.

use std::time::Duration;

use flotilla_e2e::{Home, Peer, PeerKind, PeerOptions, Server};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);
const HEARTBEAT: Duration = Duration::from_secs(1);

#[tokio::test]
async fn python_client_interop() {
    lifecycle(PeerKind::Python).await;
}

#[tokio::test]
async fn node_client_interop() {
    lifecycle(PeerKind::Node).await;
}

async fn lifecycle(kind: PeerKind) {
    let home = Home::new(); // opamp.heartbeat_interval_s = 1
    let server = Server::start(&home).await;
    let name = format!("{kind:?}-interop").to_lowercase();
    let mut opts = PeerOptions::new(&server.opamp_url(), &name, HEARTBEAT);
    opts.run_for = Duration::from_secs(120);
    let mut peer = Peer::spawn(kind, opts);
    let started = peer.next_event("started", T).await;
    let uid = started["uuid"]
        .as_str()
        .unwrap_or_else(|| panic!("started without uuid: {started}"))
        .to_string();
    let caps = match kind {
        PeerKind::Python => 0x3807,
        PeerKind::Node => 0x3003,
    };
    assert_eq!(started["capabilities"], caps, "the peer's own report");
    peer.next_event("connected", T).await;

    // --- register: search finds it by name, with what it reported ---
    let deadline = tokio::time::Instant::now() + T;
    let row = loop {
        let page = server
            .get(&format!("/api/v1/agents?q=name:{name}"))
            .await
            .expect(200, "search");
        let items = page["items"].as_array().cloned().unwrap_or_default();
        if let Some(r) = items.first() {
            assert_eq!(items.len(), 1, "one agent named {name}: {page}");
            break r.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "search name:{name} found nothing within {T:?}; server stderr:\n{}",
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(row["uid"], uid.as_str(), "{row}");
    assert_eq!(row["name"], name.as_str());
    assert_eq!(row["host"], name.as_str());

    let a = server
        .wait_agent(&uid, "full registration", T, |a| {
            a["capabilities"]["bits"] == caps && a["connected"] == true
        })
        .await;
    assert_eq!(a["identifying_attributes"], json!({"service.name": name}));
    assert_eq!(a["non_identifying_attributes"], json!({"host.name": name}));
    assert_eq!(a["transport"], "http");
    match kind {
        PeerKind::Python => {
            let a = server
                .wait_agent(&uid, "health recorded", T, |a| a["health"].is_object())
                .await;
            assert_eq!(a["health"]["healthy"], true, "{a}");
            assert_eq!(a["health"]["status"], "running", "{a}");
            assert!(a["health"]["start_time_unix_nano"].as_u64().unwrap_or(0) > 0);
        }
        PeerKind::Node => {
            assert!(
                a["health"].is_null(),
                "Node 0.5.0 cannot report health: {a}"
            );
        }
    }

    // --- heartbeat: sequence number and last-seen move on their own ---
    let seq0 = a["sequence_num"].as_u64().unwrap();
    let seen0 = a["last_seen"].clone();
    let a = server
        .wait_agent(&uid, "heartbeats recorded", T, |a| {
            a["sequence_num"].as_u64().unwrap_or(0) >= seq0 + 2 && a["last_seen"] != seen0
        })
        .await;
    assert_eq!(a["state"], "healthy", "{a}");

    // --- ReportFullState on request ---
    peer.drain();
    while peer
        .try_next_event("full_state_requested", Duration::ZERO)
        .await
        .is_some()
    {}
    let resync = server.queue(&uid, "force_resync", json!({})).await;
    peer.next_event("full_state_requested", T).await;
    let c = server.wait_command(&resync, "succeeded", T).await;
    assert_eq!(c["result"]["full_state_reported"], true, "{c}");

    // --- remote config (JSON: the only content the Python client parses) ---
    let body = r#"{"log_level":"debug","outputs":["stdout"]}"#;
    let rc = server
        .queue(
            &uid,
            "remote_config",
            json!({"files": {"app.json": {"body": body, "content_type": "application/json"}}}),
        )
        .await;
    let hash = server.command(&rc).await["params"]["hash"]
        .as_str()
        .expect("remote_config params carry the hash")
        .to_string();
    assert_eq!(hash.len(), 64, "SHA-256 hex: {hash}");
    let got = peer.next_event("remote_config", T).await;
    assert_eq!(got["hash"], hash.as_str(), "{got}");
    assert_eq!(got["files"], json!({ "app.json": body }), "{got}");
    peer.next_event("remote_config_applied", T).await;
    let c = server.wait_command(&rc, "succeeded", T).await;
    assert_eq!(c["result"]["status"], "applied", "{c}");
    let a = server
        .wait_agent(&uid, "remote config status recorded", T, |a| {
            a["remote_config_status"]["status"] == "applied"
        })
        .await;
    assert_eq!(a["remote_config_status"]["hash"], hash.as_str(), "{a}");
    assert_eq!(a["desired_config"]["hash"], hash.as_str(), "{a}");
    if kind == PeerKind::Python {
        // The Python client reports the applied files as its effective config in its next
        // full-state report; ask for one.
        let resync = server.queue(&uid, "force_resync", json!({})).await;
        server.wait_command(&resync, "succeeded", T).await;
        let a = server
            .wait_agent(&uid, "effective config recorded", T, |a| {
                a["effective_config"].is_object()
            })
            .await;
        // Same JSON document (the library re-serialises it with its own spacing).
        let reported: Value = a["effective_config"]["app.json"]["body"]
            .as_str()
            .and_then(|b| serde_json::from_str(b).ok())
            .unwrap_or_else(|| panic!("effective config body is JSON text: {a}"));
        assert_eq!(
            reported,
            serde_json::from_str::<Value>(body).unwrap(),
            "{a}"
        );
        assert_eq!(
            a["effective_config"]["app.json"]["content_type"],
            "application/json"
        );
    }

    // --- disconnect ---
    peer.stop(T).await;
    match kind {
        PeerKind::Python => {
            // agent_disconnect: `connected` is cleared (liveness alone never clears it).
            let a = server
                .wait_agent(&uid, "disconnected", T, |a| a["connected"] == false)
                .await;
            assert_eq!(a["state"], "offline", "{a}");
        }
        PeerKind::Node => {
            node_goes_offline_by_liveness(&server, &uid).await;
        }
    }
    assert_no_server_errors(peer.drain());
}

/// Node 0.5.0 sends no agent_disconnect: the record stays `connected` (HTTP has no connection
/// to lose) and liveness turns it late after 1.5 and offline after 3 missed intervals.
async fn node_goes_offline_by_liveness(server: &Server, uid: &str) {
    let a = server.agent(uid).await;
    assert_eq!(a["connected"], true, "nothing told the server it left: {a}");
    let a = server
        .wait_agent(uid, "offline by liveness", T, |a| a["state"] == "offline")
        .await;
    assert_eq!(a["connected"], true, "{a}");
}

fn assert_no_server_errors(events: &[Value]) {
    for e in events {
        assert!(
            !matches!(
                e["event"].as_str(),
                Some("server_error" | "connect_failed" | "send_failed")
            ),
            "the peer saw an error: {e}\nall events: {events:?}"
        );
    }
}
