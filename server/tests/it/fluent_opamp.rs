//! fluent-opamp supervisors as they really behave over WebSocket (see
//! shared/reference/fluent-opamp-compat.md): a new connection per message, exactly one frame
//! read and then closed, so nothing pushed on that connection is ever seen; uptime sent as
//! `health.start_time_unix_nano`; the host reported as `hostname`; the version inside a
//! sentence. Commands must ride in the reply, liveness must not depend on the connection,
//! uptime must not confirm a restart, and search must find these agents.

use std::time::{Duration, Instant};

use flotilla_proto::framing::{decode_ws, encode_ws};
use flotilla_proto::{
    kv_str, AgentDescription, AgentDisconnect, AgentToServer, ComponentHealth, CustomCapabilities,
    ServerToAgent,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::opamp::{
    assert_fluent_opamp_chatops, command_status, db, queue, wait_agent, wait_command,
};
use crate::support::TestServer;

const WAIT: Duration = Duration::from_secs(10);
const CHATOPS: &str = "org.mp3monster.opamp_provider.chatopcommand";
const SHUTDOWN: &str = "org.mp3monster.opamp_provider.command_shutdown_agent";
/// ReportsStatus | AcceptsRestartCommand | ReportsHealth, as fluent-opamp declares.
const CAPS: u64 = 0xC01;

/// fluent-opamp's consumer in `"transport": "websocket"` mode.
struct FluentOpamp {
    url: String,
    uid: Uuid,
    seq: u64,
    host: String,
    /// When this supervisor "started": its health carries the time since then.
    born: Instant,
}

/// One connection of [`FluentOpamp`] after it read its one frame.
struct OneShot(WebSocketStream<MaybeTlsStream<TcpStream>>);

impl FluentOpamp {
    fn new(server: &TestServer, host: &str) -> FluentOpamp {
        FluentOpamp {
            url: server.opamp_ws_url(),
            uid: Uuid::now_v7(),
            seq: 0,
            host: host.into(),
            born: Instant::now(),
        }
    }

    fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq += 1;
        s
    }

    /// Its health: top-level status "heartbeat", one component per Fluent Bit error counter,
    /// and the uptime (a few seconds, in nanoseconds) where OpAMP wants the start time.
    fn health(&self) -> ComponentHealth {
        let uptime = 3_000_000_000 + self.born.elapsed().as_nanos() as u64;
        ComponentHealth {
            healthy: true,
            start_time_unix_nano: uptime,
            status: "heartbeat".into(),
            component_health_map: [(
                "cpu.0".to_string(),
                ComponentHealth {
                    healthy: true,
                    status: "errors_total=0".into(),
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        }
    }

    /// Its first message: everything, in its attribute names.
    fn hello(&mut self) -> AgentToServer {
        AgentToServer {
            instance_uid: self.uid.as_bytes().to_vec(),
            sequence_num: self.next_seq(),
            capabilities: CAPS,
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![
                    kv_str("service.name", "fluentbit-agent"),
                    kv_str("service.namespace", "fluent"),
                    kv_str("service.type", "Fluent Bit"),
                    kv_str("service.instance.id", &self.host),
                    kv_str("service.version", "Fluent Bit - 5.1.1 (Community)"),
                ],
                non_identifying_attributes: vec![
                    kv_str("os_type", "linux"),
                    kv_str("os_version", "6.1.0"),
                    kv_str("hostname", &self.host),
                    kv_str("mac_address", "02:42:ac:11:00:02"),
                ],
            }),
            custom_capabilities: Some(CustomCapabilities {
                capabilities: vec![
                    format!("request:{CHATOPS}"),
                    format!("request:{SHUTDOWN}"),
                    "request:org.mp3monster.opamp_provider.nullcommand".into(),
                ],
            }),
            health: Some(self.health()),
            ..Default::default()
        }
    }

    /// A heartbeat: its health again, with the uptime grown.
    fn heartbeat(&mut self) -> AgentToServer {
        AgentToServer {
            instance_uid: self.uid.as_bytes().to_vec(),
            sequence_num: self.next_seq(),
            capabilities: CAPS,
            health: Some(self.health()),
            ..Default::default()
        }
    }

    /// Connects, sends `msg`, reads exactly one frame, and hands back the still-open connection.
    async fn open(&self, msg: &AgentToServer) -> (ServerToAgent, OneShot) {
        let (mut ws, resp) = tokio::time::timeout(WAIT, connect_async(self.url.as_str()))
            .await
            .expect("connect in time")
            .expect("WebSocket connect");
        assert_eq!(resp.status(), 101);
        ws.send(WsMessage::Binary(encode_ws(msg).into()))
            .await
            .expect("send");
        let reply = loop {
            let frame = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("a reply in time")
                .expect("a frame")
                .expect("a frame");
            match frame {
                WsMessage::Binary(b) => break decode_ws::<ServerToAgent>(&b).expect("decodes"),
                // Control frames are the library's business, as in any WebSocket client.
                WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
                other => panic!("expected the reply, got {other:?}"),
            }
        };
        (reply, OneShot(ws))
    }

    /// One message, one frame read, connection closed: the only way it talks.
    async fn exchange(&self, msg: &AgentToServer) -> ServerToAgent {
        let (reply, conn) = self.open(msg).await;
        conn.close().await;
        reply
    }
}

impl OneShot {
    /// Closes as a client library does: a Close frame, then whatever arrives until the
    /// server's Close is discarded unread by the application.
    async fn close(mut self) {
        let _ = self.0.close(None).await;
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = self.0.next().await {}
        })
        .await;
    }
}

/// The uids a search returns, over REST.
async fn search(server: &TestServer, q: &str) -> Vec<String> {
    let q = q.replace(' ', "%20").replace('"', "%22");
    let (status, body) = server.rest().get(&format!("/api/v1/agents?q={q}")).await;
    assert_eq!(status, 200, "{body}");
    body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| r["uid"].as_str().expect("uid").to_string())
        .collect()
}

/// The tag of the ChatOps command a reply carries (panics if it carries none).
fn chatops_tag(r: &ServerToAgent) -> String {
    let cm = r
        .custom_message
        .as_ref()
        .expect("a ChatOps command in the reply");
    assert_eq!(cm.capability, CHATOPS, "{cm:?}");
    let data: serde_json::Value = serde_json::from_slice(&cm.data).expect("JSON data");
    data["tag"].as_str().expect("a tag").to_string()
}

/// Reads a command's status for a while, and says whether it ever became `want`. Used where the
/// point is that something must NOT happen (it happened within milliseconds before the fix).
async fn becomes(server: &TestServer, id: &str, want: &str, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if command_status(server, id).await["status"] == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test]
async fn fluent_opamp_websocket_consumer_gets_each_command_in_the_reply() {
    let server = TestServer::start().await;
    let mut fo = FluentOpamp::new(&server, "web-7");
    let hello = fo.hello();
    let r = fo.exchange(&hello).await;
    assert!(r.command.is_none() && r.custom_message.is_none());

    // Queued while it has no connection: the reply to its next message carries it.
    let chat = queue(
        &server,
        fo.uid,
        "chatops",
        json!({"tag": "flush", "attributes": {"why": "disk"}}),
    )
    .await;
    let hb = fo.heartbeat();
    let r = fo.exchange(&hb).await;
    assert_fluent_opamp_chatops(
        r.custom_message
            .as_ref()
            .expect("the ChatOps command rides in the reply to its heartbeat"),
        r#"{"attributes":{"why":"disk"},"tag":"flush"}"#,
    );
    assert_eq!(r.instance_uid, fo.uid.as_bytes().to_vec());
    wait_command(&server, &chat, "sent").await;

    // A standard command too, alone in its reply as the spec wants.
    let restart = queue(&server, fo.uid, "restart", json!({})).await;
    let hb = fo.heartbeat();
    let r = fo.exchange(&hb).await;
    assert!(r.command.is_some(), "the restart rides in the reply: {r:?}");
    assert_eq!(r.flags, 0);
    assert!(r.custom_message.is_none() && r.custom_capabilities.is_none());
    wait_command(&server, &restart, "sent").await;

    // Two queued at once: one custom message per message, so each reply carries the next one,
    // in queue order, and nothing is left in a frame nobody reads.
    let first = queue(&server, fo.uid, "chatops", json!({"tag": "a"})).await;
    let second = queue(&server, fo.uid, "chatops", json!({"tag": "b"})).await;
    for (id, tag) in [(&first, "a"), (&second, "b")] {
        let hb = fo.heartbeat();
        assert_eq!(chatops_tag(&fo.exchange(&hb).await), tag);
        wait_command(&server, id, "sent").await;
    }
    let hb = fo.heartbeat();
    let r = fo.exchange(&hb).await;
    assert!(r.custom_message.is_none() && r.command.is_none(), "{r:?}");
    server.stop().await;
}

/// The window the issue describes: a command queued after the server answered but before the
/// one-shot connection closed. Pushed there, it is never read; it must stay queued instead and
/// ride in the next reply. Both on the agent's very first connection (nothing known about it
/// yet) and once it is known to use a connection per message.
#[tokio::test]
async fn a_command_queued_while_a_one_shot_connection_is_open_is_not_lost() {
    let server = TestServer::start().await;
    let mut fo = FluentOpamp::new(&server, "web-8");
    let hello = fo.hello();
    for round in ["first-connection", "known-one-shot-agent"] {
        let msg = if round == "first-connection" {
            hello.clone()
        } else {
            fo.heartbeat()
        };
        let (reply, conn) = fo.open(&msg).await;
        assert!(reply.custom_message.is_none(), "{round}: {reply:?}");
        let id = queue(&server, fo.uid, "chatops", json!({"tag": round})).await;
        // It reads no second frame. A push happens within milliseconds; a few hundred are
        // plenty to see one, and fluent-opamp closes much sooner than that.
        assert!(
            !becomes(&server, &id, "sent", Duration::from_millis(300)).await,
            "{round}: pushed on a connection that reads only its reply"
        );
        conn.close().await;
        assert_eq!(
            command_status(&server, &id).await["status"],
            "queued",
            "{round}"
        );
        let hb = fo.heartbeat();
        assert_eq!(
            chatops_tag(&fo.exchange(&hb).await),
            round,
            "the next reply"
        );
        wait_command(&server, &id, "sent").await;
    }
    server.stop().await;
}

#[tokio::test]
async fn per_message_websocket_agents_stay_online_between_messages() {
    let server = TestServer::start().await;
    let mut fo = FluentOpamp::new(&server, "web-9");
    let hello = fo.hello();
    fo.exchange(&hello).await;
    let hb = fo.heartbeat();
    fo.exchange(&hb).await;
    // Its connection is closed (and recorded as such) between messages...
    let db = db(&server).await;
    wait_agent(&db, fo.uid, |a| !a.connected && a.sequence_num == 1).await;
    // ...and it was heard a moment ago, well within its heartbeat interval: online everywhere.
    let rest = server.rest();
    let (_, view) = rest.get(&format!("/api/v1/agents/{}", fo.uid)).await;
    assert_eq!(view["state"], "healthy", "{view}");
    assert_eq!(view["connected"], false, "{view}");
    let me = vec![fo.uid.to_string()];
    assert_eq!(search(&server, "state:online").await, me);
    assert_eq!(search(&server, "state:healthy").await, me);
    assert!(search(&server, "state:offline").await.is_empty());
    let (_, summary) = rest.get("/api/v1/fleet/summary").await;
    assert_eq!(summary["by_state"]["healthy"], 1, "{summary}");
    let metrics = reqwest::get(server.api_url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("flotilla_agents{state=\"healthy\"} 1"),
        "{metrics}"
    );

    // Saying goodbye is what makes it offline at once.
    let mut bye = fo.heartbeat();
    bye.health = None;
    bye.agent_disconnect = Some(AgentDisconnect {});
    fo.exchange(&bye).await;
    let (_, view) = rest.get(&format!("/api/v1/agents/{}", fo.uid)).await;
    assert_eq!(view["state"], "offline", "{view}");
    assert!(search(&server, "state:online").await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn fluent_opamp_uptime_never_confirms_a_restart() {
    let server = TestServer::start_with(|c| c.commands.result_timeout_s = 1).await;
    let mut fo = FluentOpamp::new(&server, "web-10");
    let hello = fo.hello();
    fo.exchange(&hello).await;
    let id = queue(&server, fo.uid, "restart", json!({})).await;
    let hb = fo.heartbeat();
    assert!(fo.exchange(&hb).await.command.is_some());
    // Nothing restarts, yet its "start time" grows with every heartbeat.
    for _ in 0..3 {
        let hb = fo.heartbeat();
        fo.exchange(&hb).await;
    }
    let c = wait_command(&server, &id, "expired").await;
    let error = c["error"].as_str().unwrap_or_default();
    assert!(error.contains("uptime"), "says why it is unconfirmed: {c}");
    server.stop().await;
}

#[tokio::test]
async fn fluent_opamp_agents_are_found_by_host_and_version() {
    let server = TestServer::start().await;
    let mut fo = FluentOpamp::new(&server, "web-11");
    let hello = fo.hello();
    fo.exchange(&hello).await;
    let other = crate::support::register_agent(
        &server,
        &[
            ("service.name", "fluentd"),
            ("service.version", "1.18.0"),
            ("host.name", "db-1"),
        ],
        1,
        &[],
    )
    .await
    .to_string();
    let fo_uid = vec![fo.uid.to_string()];
    // The README's fan-out example, and its short form.
    assert_eq!(search(&server, "host.name:web-*").await, fo_uid);
    assert_eq!(search(&server, "host:web-11").await, fo_uid);
    assert_eq!(search(&server, "host:db-*").await, vec![other.clone()]);
    assert_eq!(
        search(&server, "-host.name:web-*").await,
        vec![other.clone()]
    );
    // The version inside "Fluent Bit - 5.1.1 (Community)", and the sentence itself.
    assert_eq!(search(&server, "version:5.1.*").await, fo_uid);
    assert_eq!(
        search(&server, "version:5.1.1 type:fluentbit").await,
        fo_uid
    );
    assert_eq!(
        search(&server, "version:\"Fluent Bit - 5.1.1 (Community)\"").await,
        fo_uid
    );
    assert!(search(&server, "version:5.2.*").await.is_empty());
    assert_eq!(search(&server, "version:1.18.*").await, vec![other]);
    server.stop().await;
}
