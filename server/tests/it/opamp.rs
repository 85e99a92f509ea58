//! OpAMP conformance tests: a real server on port 0, real HTTP (reqwest) and WebSocket
//! (tokio-tungstenite) clients. Each test proves one or more rows of
//! docs/protocol-conformance.md; the table names the test.

use std::io::{Read, Write};
use std::time::Duration;

use flotilla_proto::framing::{decode_ws, encode_ws};
use flotilla_proto::v1::ConnectionSettingsStatus;
use flotilla_proto::{
    kv_str, AgentCapabilities as AC, AgentConfigFile, AgentConfigMap, AgentDescription,
    AgentDisconnect, AgentToServer, ComponentHealth, EffectiveConfig, Message, RemoteConfigStatus,
    ServerToAgent,
};
use flotilla_server::model::Agent;
use flotilla_server::store::sqlite::SqliteStore;
use flotilla_server::store::Store;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::support::TestServer;

const WAIT: Duration = Duration::from_secs(10);
const REPORTS_STATUS: u64 = AC::ReportsStatus as u64;
const REPORT_FULL_STATE: u64 = 1;
const BAD_REQUEST: i32 = 1;
/// AcceptsStatus | OffersRemoteConfig | AcceptsEffectiveConfig | OffersConnectionSettings.
const SERVER_CAPS: u64 = 0x27;

// ---------------------------------------------------------------- message builders

pub(crate) fn new_uid() -> Uuid {
    Uuid::now_v7()
}

/// A full status report (the first message an agent sends).
pub(crate) fn full(uid: Uuid, seq: u64, caps: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.as_bytes().to_vec(),
        sequence_num: seq,
        capabilities: caps,
        agent_description: Some(AgentDescription {
            identifying_attributes: vec![
                kv_str("service.name", "fluent-bit"),
                kv_str("service.instance.id", &uid.to_string()),
            ],
            non_identifying_attributes: vec![kv_str("host.name", "node-1")],
        }),
        health: Some(ComponentHealth {
            healthy: true,
            start_time_unix_nano: 1_000,
            status: "running".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A heartbeat: uid and sequence number only.
pub(crate) fn beat(uid: Uuid, seq: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.as_bytes().to_vec(),
        sequence_num: seq,
        ..Default::default()
    }
}

fn full_state_asked(r: &ServerToAgent) -> bool {
    r.flags & REPORT_FULL_STATE != 0
}

// ---------------------------------------------------------------- HTTP client

/// A client that never adds or decodes gzip by itself, so tests see the wire.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_gzip()
        .build()
        .expect("client")
}

async fn post_raw(
    server: &TestServer,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = http()
        .post(server.opamp_http_url())
        .header("Content-Type", "application/x-protobuf")
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    tokio::time::timeout(WAIT, req.send())
        .await
        .expect("HTTP reply in time")
        .expect("HTTP request")
}

/// POSTs a message and decodes the 200 reply.
pub(crate) async fn post(server: &TestServer, msg: &AgentToServer) -> ServerToAgent {
    let resp = post_raw(server, msg.encode_to_vec(), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/x-protobuf"
    );
    let body = resp.bytes().await.expect("body");
    ServerToAgent::decode(body.as_ref()).expect("ServerToAgent")
}

// ---------------------------------------------------------------- WebSocket client

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket agent whose frames are read by a background task, as real agents do (opamp-go
/// and the supervisor read continuously), so the server's pings are answered at any time.
pub(crate) struct Ws {
    sink: futures_util::stream::SplitSink<WsStream, WsMessage>,
    frames: tokio::sync::mpsc::UnboundedReceiver<WsMessage>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Ws {
    /// Dropping the agent drops its connection (the reader holds the other half of it).
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Ws {
    pub(crate) async fn connect(server: &TestServer) -> Ws {
        Ws::answering(Ws::connect_raw(server).await)
    }

    /// An agent connected to any server's WebSocket endpoint (`ws://host:port/v1/opamp`).
    pub(crate) async fn connect_url(url: &str) -> Ws {
        Ws::answering(Ws::open(url).await)
    }

    /// A connection that nobody reads: the server's pings go unanswered, as with a host that
    /// vanished and left a half-open TCP connection behind.
    async fn connect_raw(server: &TestServer) -> WsStream {
        Ws::open(&server.opamp_ws_url()).await
    }

    async fn open(url: &str) -> WsStream {
        let (s, resp) = tokio::time::timeout(WAIT, connect_async(url))
            .await
            .expect("connect in time")
            .expect("WebSocket connect");
        assert_eq!(resp.status(), 101);
        s
    }

    fn answering(s: WsStream) -> Ws {
        let (sink, mut stream) = s.split();
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            // Reading is what makes tungstenite answer pings.
            while let Some(Ok(m)) = stream.next().await {
                if matches!(m, WsMessage::Ping(_) | WsMessage::Pong(_)) {
                    continue;
                }
                if tx.send(m).is_err() {
                    return;
                }
            }
        });
        Ws {
            sink,
            frames,
            reader,
        }
    }

    /// Sends with the 0x00 header, as the spec requires.
    async fn send(&mut self, msg: &AgentToServer) {
        self.send_raw(encode_ws(msg)).await;
    }

    async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.sink
            .send(WsMessage::Binary(bytes.into()))
            .await
            .expect("ws send");
    }

    /// The next frame of any kind (pings skipped); `None` once the connection ended.
    async fn frame(&mut self) -> Option<WsMessage> {
        tokio::time::timeout(WAIT, self.frames.recv())
            .await
            .expect("a frame in time")
    }

    /// The next ServerToAgent; checks the 0x00 header.
    pub(crate) async fn recv(&mut self) -> ServerToAgent {
        match self.frame().await {
            Some(WsMessage::Binary(b)) => {
                assert_eq!(
                    b.first(),
                    Some(&0u8),
                    "every server message starts with header 0"
                );
                decode_ws(&b).expect("ServerToAgent")
            }
            other => panic!("expected a binary message, got {other:?}"),
        }
    }

    /// Nothing arrives within `d` (used to prove "exactly once").
    pub(crate) async fn silent_for(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, self.frames.recv()).await.is_err()
    }

    pub(crate) async fn request(&mut self, msg: &AgentToServer) -> ServerToAgent {
        self.send(msg).await;
        self.recv().await
    }
}

// ---------------------------------------------------------------- registry access

/// A second handle on the server's database (SQLite WAL allows another reader).
pub(crate) async fn db(server: &TestServer) -> SqliteStore {
    SqliteStore::open(&server.data_dir).await.expect("open db")
}

/// Polls the registry until `pred` holds for the agent (background writes are batched).
pub(crate) async fn wait_agent(
    db: &SqliteStore,
    uid: Uuid,
    pred: impl Fn(&Agent) -> bool,
) -> Agent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(a) = db.get_agent(uid).await.expect("get_agent") {
            if pred(&a) {
                return a;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent {uid} never reached the expected state"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Queues a command through the REST API; returns its id.
pub(crate) async fn queue(
    server: &TestServer,
    uid: Uuid,
    kind: &str,
    params: serde_json::Value,
) -> String {
    let (status, body) = server
        .rest()
        .post(
            &format!("/api/v1/agents/{uid}/commands"),
            json!({"kind": kind, "params": params}),
        )
        .await;
    assert_eq!(status, 202, "queue {kind}: {body}");
    body["command_id"].as_str().expect("command_id").to_string()
}

/// Sets the server-side label `env=prod` on `uid` over REST; returns the HTTP status.
async fn label_env_prod(server: &TestServer, uid: Uuid) -> u16 {
    let (status, _) = server
        .rest()
        .put(
            &format!("/api/v1/agents/{uid}/labels/env"),
            json!({"value": "prod"}),
        )
        .await;
    status
}

pub(crate) async fn command_status(server: &TestServer, id: &str) -> serde_json::Value {
    let (status, body) = server.rest().get(&format!("/api/v1/commands/{id}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

pub(crate) async fn wait_command(server: &TestServer, id: &str, want: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let c = command_status(server, id).await;
        if c["status"] == want {
            return c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "command {id} is {} not {want}: {c}",
            c["status"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

// ================================================================ general / instance_uid

#[tokio::test]
async fn http_reply_echoes_uid_with_capabilities_every_time() {
    let server = TestServer::start().await;
    let uid = new_uid();
    for seq in 0..2 {
        let msg = if seq == 0 {
            full(uid, 0, REPORTS_STATUS)
        } else {
            beat(uid, 1)
        };
        let r = post(&server, &msg).await;
        assert_eq!(r.instance_uid, uid.as_bytes().to_vec());
        assert_eq!(r.capabilities, SERVER_CAPS);
        let custom = r
            .custom_capabilities
            .expect("custom capabilities in every HTTP reply");
        assert!(custom
            .capabilities
            .contains(&"org.mp3monster.opamp_provider.chatopcommand".to_string()));
        assert!(r.error_response.is_none());
    }
    server.stop().await;
}

#[tokio::test]
async fn ws_first_reply_has_capabilities_and_custom_capabilities() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let mut ws = Ws::connect(&server).await;
    let r = ws.request(&full(uid, 0, REPORTS_STATUS)).await;
    assert_eq!(r.instance_uid, uid.as_bytes().to_vec());
    assert_eq!(r.capabilities, SERVER_CAPS);
    assert!(r.custom_capabilities.is_some());
    let r = ws.request(&beat(uid, 1)).await;
    assert_eq!(r.instance_uid, uid.as_bytes().to_vec());
    assert!(
        r.custom_capabilities.is_none(),
        "custom capabilities only when they change (first reply)"
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_uid_gets_bad_request_echoing_what_was_sent() {
    let server = TestServer::start().await;
    let short = vec![1, 2, 3, 4, 5];
    let msg = AgentToServer {
        instance_uid: short.clone(),
        ..Default::default()
    };
    let r = post(&server, &msg).await;
    assert_eq!(r.instance_uid, short);
    // With an error, nothing but the echoed uid accompanies it.
    assert_eq!(r.capabilities, 0);
    assert!(r.custom_capabilities.is_none() && r.flags == 0);
    let err = r.error_response.expect("error response");
    assert_eq!(err.r#type, BAD_REQUEST);
    assert!(
        err.error_message.contains("16 bytes"),
        "{}",
        err.error_message
    );

    let mut ws = Ws::connect(&server).await;
    let r = ws.request(&msg).await;
    assert_eq!(r.instance_uid, short);
    assert_eq!(r.error_response.expect("error").r#type, BAD_REQUEST);

    // All zeros is 16 bytes but no identity: every careless agent would share one record.
    let nil = full(Uuid::nil(), 0, REPORTS_STATUS);
    let r = post(&server, &nil).await;
    assert_eq!(r.instance_uid, vec![0; 16]);
    let err = r.error_response.expect("error response");
    assert_eq!(err.r#type, BAD_REQUEST);
    assert!(
        err.error_message.contains("all zeros"),
        "{}",
        err.error_message
    );
    // …unless it asks for a uid, which is what the flag is for.
    let mut ask = nil.clone();
    ask.flags = 1;
    let r = post(&server, &ask).await;
    assert!(r.error_response.is_none());
    let given = r
        .agent_identification
        .expect("a uid is given")
        .new_instance_uid;
    assert_eq!(Uuid::from_slice(&given).unwrap().get_version_num(), 7);
    let db = db(&server).await;
    assert!(db.get_agent(Uuid::nil()).await.unwrap().is_none());
    server.stop().await;
}

#[tokio::test]
async fn http_garbage_is_400_and_the_stored_agent_survives() {
    let server = TestServer::start().await;
    let uid = new_uid();
    post(&server, &full(uid, 0, REPORTS_STATUS)).await;
    let resp = post_raw(&server, vec![0x0a, 0xff, 0xff, 0xff], &[]).await;
    assert_eq!(resp.status(), 400);
    let db = db(&server).await;
    let a = wait_agent(&db, uid, |_| true).await;
    assert_eq!(a.attr("service.name"), Some("fluent-bit"));
    let r = post(&server, &beat(uid, 1)).await;
    assert!(!full_state_asked(&r), "the record survived the garbage");
    server.stop().await;
}

#[tokio::test]
async fn ws_garbage_and_text_frames_get_bad_request_and_the_connection_stays() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let mut ws = Ws::connect(&server).await;
    ws.request(&full(uid, 0, REPORTS_STATUS)).await;

    ws.send_raw(vec![0, 0x0a, 0xff, 0xff]).await;
    let r = ws.recv().await;
    assert_eq!(r.error_response.expect("error").r#type, BAD_REQUEST);
    assert!(
        r.instance_uid.is_empty(),
        "nothing decoded, nothing to echo"
    );

    ws.sink.send(WsMessage::Text("hello".into())).await.unwrap();
    let r = ws.recv().await;
    assert_eq!(r.error_response.expect("error").r#type, BAD_REQUEST);

    let r = ws.request(&beat(uid, 1)).await;
    assert!(r.error_response.is_none());
    assert!(!full_state_asked(&r), "the record and sequence survived");
    server.stop().await;
}

#[tokio::test]
async fn ws_frames_with_and_without_header_and_nonzero_header() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let mut ws = Ws::connect(&server).await;
    // Legacy clients send the bare protobuf.
    ws.send_raw(full(uid, 0, REPORTS_STATUS).encode_to_vec())
        .await;
    let r = ws.recv().await;
    assert_eq!(r.instance_uid, uid.as_bytes().to_vec());
    let r = ws.request(&beat(uid, 1)).await;
    assert_eq!(r.instance_uid, uid.as_bytes().to_vec());
    // An empty message (header only) is valid protobuf, but has no uid.
    ws.send_raw(vec![0]).await;
    let r = ws.recv().await;
    assert_eq!(r.error_response.expect("error").r#type, BAD_REQUEST);
    // Header 5 is not defined in this protocol version.
    let mut bytes = vec![5];
    bytes.extend(beat(uid, 2).encode_to_vec());
    ws.send_raw(bytes).await;
    let r = ws.recv().await;
    let err = r.error_response.expect("error");
    assert_eq!(err.r#type, BAD_REQUEST);
    assert!(
        err.error_message.contains("header"),
        "{}",
        err.error_message
    );
    // An over-long encoding of header 0 is refused, and the session lives on (it once
    // panicked the session task).
    let mut bytes = vec![0x80, 0x00];
    bytes.extend(beat(uid, 3).encode_to_vec());
    ws.send_raw(bytes).await;
    assert_eq!(
        ws.recv().await.error_response.expect("error").r#type,
        BAD_REQUEST
    );
    let r = ws.request(&beat(uid, 3)).await;
    assert!(r.error_response.is_none());
    server.stop().await;
}

// ================================================================ sequence / ReportFullState

#[tokio::test]
async fn report_full_state_for_an_unknown_agent_only_until_it_reports() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let r = post(&server, &beat(uid, 7)).await;
    assert!(
        full_state_asked(&r),
        "unknown agent must be asked for full state"
    );
    let r = post(&server, &full(uid, 8, REPORTS_STATUS)).await;
    assert!(!full_state_asked(&r), "it just sent its full state");
    let r = post(&server, &beat(uid, 9)).await;
    assert!(!full_state_asked(&r));

    let other = new_uid();
    let mut ws = Ws::connect(&server).await;
    let r = ws.request(&beat(other, 0)).await;
    assert!(full_state_asked(&r));
    let r = ws.request(&full(other, 1, REPORTS_STATUS)).await;
    assert!(!full_state_asked(&r));
    server.stop().await;
}

#[tokio::test]
async fn report_full_state_on_sequence_gap_but_not_on_repeat() {
    let server = TestServer::start().await;
    let uid = new_uid();
    // Python starts at 0 and repeats a number when it retries.
    assert!(!full_state_asked(
        &post(&server, &full(uid, 0, REPORTS_STATUS)).await
    ));
    assert!(!full_state_asked(&post(&server, &beat(uid, 1)).await));
    assert!(
        !full_state_asked(&post(&server, &beat(uid, 1)).await),
        "repeat is not a gap"
    );
    assert!(
        full_state_asked(&post(&server, &beat(uid, 3)).await),
        "2 is missing"
    );
    assert!(!full_state_asked(
        &post(&server, &full(uid, 4, REPORTS_STATUS)).await
    ));
    assert!(
        !full_state_asked(&post(&server, &beat(uid, 5)).await),
        "no loop"
    );

    // Over WebSocket the same rules apply within a connection; Node starts at 1.
    let other = new_uid();
    let mut ws = Ws::connect(&server).await;
    assert!(!full_state_asked(
        &ws.request(&full(other, 1, REPORTS_STATUS)).await
    ));
    assert!(!full_state_asked(&ws.request(&beat(other, 2)).await));
    assert!(full_state_asked(&ws.request(&beat(other, 5)).await));
    server.stop().await;
}

#[tokio::test]
async fn sequence_gaps_are_found_across_reconnects_and_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(tmp.path().to_path_buf(), |_| {}).await;
    let (ws_uid, http_uid) = (new_uid(), new_uid());
    let mut ws = Ws::connect(&server).await;
    ws.request(&full(ws_uid, 0, REPORTS_STATUS)).await;
    ws.request(&beat(ws_uid, 1)).await;
    drop(ws);
    post(&server, &full(http_uid, 0, REPORTS_STATUS)).await;

    // A reconnect that goes on with the next number (opamp-go keeps counting across
    // reconnects and omits unchanged status): nothing was lost, nothing is asked.
    let mut ws = Ws::connect(&server).await;
    assert!(!full_state_asked(&ws.request(&beat(ws_uid, 2)).await));
    drop(ws);
    // A reconnect after messages were lost in between: the gap is seen although it is the
    // first message of the connection.
    let mut ws = Ws::connect(&server).await;
    assert!(full_state_asked(&ws.request(&beat(ws_uid, 40)).await));
    assert!(!full_state_asked(
        &ws.request(&full(ws_uid, 41, REPORTS_STATUS)).await
    ));
    drop(ws);
    server.stop().await;

    // After a restart the recorded numbers are the reference.
    let server = TestServer::start_in(tmp.path().to_path_buf(), |_| {}).await;
    assert!(
        !full_state_asked(&post(&server, &beat(http_uid, 1)).await),
        "known agent after a restart, next number: no gap"
    );
    assert!(
        !full_state_asked(&post(&server, &beat(http_uid, 1)).await),
        "a retried request repeats its number: no gap"
    );
    assert!(full_state_asked(&post(&server, &beat(http_uid, 3)).await));
    let mut ws = Ws::connect(&server).await;
    assert!(!full_state_asked(&ws.request(&beat(ws_uid, 42)).await));
    drop(ws);
    let mut ws = Ws::connect(&server).await;
    assert!(full_state_asked(&ws.request(&beat(ws_uid, 7)).await));
    server.stop().await;
}

// ================================================================ new uid / duplicates

#[tokio::test]
async fn request_instance_uid_assigns_a_uuid_v7_and_the_agent_lives_on_under_it() {
    let server = TestServer::start().await;
    let temp = new_uid();
    let mut msg = full(temp, 0, REPORTS_STATUS);
    msg.flags = 1; // RequestInstanceUid
    let r = post(&server, &msg).await;
    assert_eq!(
        r.instance_uid,
        temp.as_bytes().to_vec(),
        "reply still echoes the old uid"
    );
    let new = r
        .agent_identification
        .expect("agent_identification")
        .new_instance_uid;
    assert_eq!(new.len(), 16);
    let new = Uuid::from_slice(&new).unwrap();
    assert_eq!(new.get_version_num(), 7);
    assert_ne!(new, temp);

    let r = post(&server, &beat(new, 1)).await;
    assert_eq!(r.instance_uid, new.as_bytes().to_vec());
    assert!(
        !full_state_asked(&r),
        "the record was created under the new uid"
    );
    let db = db(&server).await;
    let a = wait_agent(&db, new, |_| true).await;
    assert_eq!(a.attr("service.name"), Some("fluent-bit"));
    assert!(
        db.get_agent(temp).await.unwrap().is_none(),
        "no ghost under the temporary uid"
    );
    server.stop().await;
}

#[tokio::test]
async fn request_instance_uid_from_a_known_agent_moves_its_record() {
    let server = TestServer::start().await;
    let old = new_uid();
    post(&server, &full(old, 0, REPORTS_STATUS)).await;
    let status = label_env_prod(&server, old).await;
    assert!(status == 200 || status == 204, "label set: {status}");
    let mut msg = beat(old, 1);
    msg.flags = 1;
    let r = post(&server, &msg).await;
    let new = Uuid::from_slice(&r.agent_identification.expect("new uid").new_instance_uid).unwrap();
    let r = post(&server, &beat(new, 2)).await;
    assert!(!full_state_asked(&r));
    let db = db(&server).await;
    let a = wait_agent(&db, new, |_| true).await;
    assert_eq!(a.previous_uid, Some(old));
    assert_eq!(a.labels.get("env").map(String::as_str), Some("prod"));
    assert!(db.get_agent(old).await.unwrap().is_none());
    server.stop().await;
}

#[tokio::test]
async fn duplicate_ws_uid_gives_the_newcomer_a_new_uid() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let mut first = Ws::connect(&server).await;
    first.request(&full(uid, 0, REPORTS_STATUS)).await;
    let status = label_env_prod(&server, uid).await;
    assert_eq!(status, 200);
    // A clone (copied VM image, copied data directory) with the same uid, while the first
    // agent is alive and answers the server's ping.
    let mut second = Ws::connect(&server).await;
    let r = second.request(&full(uid, 0, REPORTS_STATUS)).await;
    assert_eq!(r.instance_uid, uid.as_bytes().to_vec());
    let new = Uuid::from_slice(
        &r.agent_identification
            .as_ref()
            .expect("new uid")
            .new_instance_uid,
    )
    .unwrap();
    assert_ne!(new, uid);
    assert_eq!(new.get_version_num(), 7);
    assert!(
        full_state_asked(&r),
        "its status was not merged; ask again under the new uid"
    );
    // The newcomer adopts it and is a new agent of its own.
    let r = second.request(&full(new, 1, REPORTS_STATUS)).await;
    assert!(r.agent_identification.is_none());
    assert!(!full_state_asked(&r));
    // The first agent keeps its identity, record and labels, undisturbed.
    let r = first.request(&beat(uid, 1)).await;
    assert_eq!(r.instance_uid, uid.as_bytes().to_vec());
    assert!(r.agent_identification.is_none());
    assert!(!full_state_asked(&r));
    let db = db(&server).await;
    let a = wait_agent(&db, uid, |a| a.connected).await;
    assert_eq!(a.labels.get("env").map(String::as_str), Some("prod"));
    let b = wait_agent(&db, new, |a| a.connected).await;
    assert!(b.labels.is_empty(), "the clone inherits nothing");
    assert_eq!(b.previous_uid, None);
    server.stop().await;
}

#[tokio::test]
async fn a_silent_holder_of_the_uid_is_probed_and_the_agent_reconnects_under_it() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let db = db(&server).await;
    // The old connection of an agent whose host lost its network: open, but nobody reads it.
    let mut stale = Ws::connect_raw(&server).await;
    stale
        .send(WsMessage::Binary(
            encode_ws(&full(uid, 0, REPORTS_STATUS)).into(),
        ))
        .await
        .unwrap();
    wait_agent(&db, uid, |a| a.connected).await;
    // The same agent back on a new connection: the old one does not answer the ping, so it
    // is closed and the agent keeps its uid.
    let mut fresh = Ws::connect(&server).await;
    let r = fresh.request(&beat(uid, 1)).await;
    assert!(
        r.agent_identification.is_none(),
        "a dead holder does not make the agent a duplicate"
    );
    assert!(!full_state_asked(&r));
    // The server ended the stale connection. What this peer sees of that depends on TCP: a
    // Close frame, or (when its automatic pong reached the already closed socket) a reset that
    // discards the Close frame unread. Either way, after what was sent, the stream ends.
    tokio::time::timeout(WAIT, async {
        loop {
            match stale.next().await {
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the server ends the stale connection in time");
    let a = wait_agent(&db, uid, |a| a.connected).await;
    assert_eq!(a.sequence_num, 1);
    server.stop().await;
}

#[tokio::test]
async fn idle_connections_are_pinged_and_dead_ones_closed() {
    let server = TestServer::start_with(|c| {
        c.opamp.ws_idle_ping_s = 1;
        c.opamp.ws_pong_timeout_s = 1;
    })
    .await;
    let db = db(&server).await;
    let (dead_uid, live_uid) = (new_uid(), new_uid());
    let mut dead = Ws::connect_raw(&server).await;
    dead.send(WsMessage::Binary(
        encode_ws(&full(dead_uid, 0, REPORTS_STATUS)).into(),
    ))
    .await
    .unwrap();
    let mut live = Ws::connect(&server).await;
    live.request(&full(live_uid, 0, REPORTS_STATUS)).await;
    wait_agent(&db, dead_uid, |a| a.connected).await;
    // Neither sends anything more. The one that does not answer pings is closed and recorded
    // as disconnected; the one that answers stays.
    wait_agent(&db, dead_uid, |a| !a.connected).await;
    let a = wait_agent(&db, live_uid, |_| true).await;
    assert!(a.connected, "an agent that answers pings is not closed");
    let r = live.request(&beat(live_uid, 1)).await;
    assert!(r.error_response.is_none() && !full_state_asked(&r));
    let metrics = reqwest::get(server.api_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("flotilla_websocket_connections 1"),
        "{metrics}"
    );
    server.stop().await;
}

// ================================================================ HTTP transport

#[tokio::test]
async fn http_gzip_request_is_honoured() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let body = gzip(&full(uid, 0, REPORTS_STATUS).encode_to_vec());
    let resp = post_raw(&server, body, &[("Content-Encoding", "gzip")]).await;
    assert_eq!(resp.status(), 200);
    let r = ServerToAgent::decode(resp.bytes().await.unwrap().as_ref()).unwrap();
    assert_eq!(r.instance_uid, uid.as_bytes().to_vec());
    assert!(!full_state_asked(&r), "the gzipped full report was read");
    server.stop().await;
}

#[tokio::test]
async fn http_gzip_response_only_when_accept_encoding_allows() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let body = full(uid, 0, REPORTS_STATUS).encode_to_vec();
    for (ae, want_gzip) in [
        (None, false),
        (Some("gzip, deflate"), true),
        (Some("gzip;q=0"), false),
        (Some("gzip;q=0, *;q=1"), false),
        (Some("*"), true),
        (Some("identity"), false),
    ] {
        let headers: Vec<(&str, &str)> = ae.map(|v| ("Accept-Encoding", v)).into_iter().collect();
        let resp = post_raw(&server, body.clone(), &headers).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/x-protobuf");
        let gz = resp
            .headers()
            .get("content-encoding")
            .is_some_and(|v| v == "gzip");
        assert_eq!(gz, want_gzip, "Accept-Encoding {ae:?}");
        let raw = resp.bytes().await.unwrap().to_vec();
        let plain = if gz {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(raw.as_slice())
                .read_to_end(&mut out)
                .unwrap();
            out
        } else {
            raw
        };
        let r = ServerToAgent::decode(plain.as_slice()).expect("decodes");
        assert_eq!(r.instance_uid, uid.as_bytes().to_vec());
    }
    server.stop().await;
}

#[tokio::test]
async fn wrong_content_type_is_a_websocket_attempt_and_gets_a_clear_4xx() {
    let server = TestServer::start().await;
    let body = full(new_uid(), 0, REPORTS_STATUS).encode_to_vec();
    for ct in [
        "application/octet-stream",
        "application/x-protobuf; charset=utf-8",
    ] {
        let resp = http()
            .post(server.opamp_http_url())
            .header("Content-Type", ct)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_client_error(), "{ct}: {}", resp.status());
        assert!(resp
            .text()
            .await
            .unwrap()
            .contains("application/x-protobuf"));
    }
    let resp = http().get(server.opamp_http_url()).send().await.unwrap();
    assert!(resp.status().is_client_error(), "{}", resp.status());
    server.stop().await;
}

#[tokio::test]
async fn http_oversize_body_is_413_also_after_decompression() {
    let server = TestServer::start_with(|c| c.opamp.max_message_bytes = 1024).await;
    let uid = new_uid();
    let mut big = full(uid, 0, REPORTS_STATUS);
    big.effective_config = Some(EffectiveConfig {
        config_map: Some(AgentConfigMap {
            config_map: [(
                "fluent-bit.conf".to_string(),
                AgentConfigFile {
                    body: vec![b'x'; 4096],
                    content_type: "text/plain".into(),
                },
            )]
            .into_iter()
            .collect(),
        }),
    });
    let raw = big.encode_to_vec();
    let resp = post_raw(&server, raw.clone(), &[]).await;
    assert_eq!(resp.status(), 413);
    // 4 KiB of 'x' compresses to a few dozen bytes: the limit applies to what it inflates to.
    let z = gzip(&raw);
    assert!(z.len() < 1024);
    let resp = post_raw(&server, z, &[("Content-Encoding", "gzip")]).await;
    assert_eq!(resp.status(), 413);
    // The server is fine afterwards.
    let r = post(&server, &full(uid, 0, REPORTS_STATUS)).await;
    assert!(r.error_response.is_none());
    server.stop().await;
}

#[tokio::test]
async fn ws_oversize_message_closes_with_1009() {
    let server = TestServer::start_with(|c| c.opamp.max_message_bytes = 1024).await;
    let uid = new_uid();
    let mut ws = Ws::connect(&server).await;
    ws.request(&full(uid, 0, REPORTS_STATUS)).await;
    let mut big = beat(uid, 1);
    big.custom_message = Some(flotilla_proto::CustomMessage {
        capability: "x".into(),
        r#type: "y".into(),
        data: vec![7; 4096],
    });
    ws.send(&big).await;
    match ws.frame().await {
        Some(WsMessage::Close(Some(f))) => assert_eq!(u16::from(f.code), 1009),
        other => panic!("expected Close 1009, got {other:?}"),
    }
    server.stop().await;
}

// ================================================================ disconnect

#[tokio::test]
async fn agent_disconnect_over_http_is_answered_and_marks_disconnected() {
    let server = TestServer::start().await;
    let uid = new_uid();
    post(&server, &full(uid, 0, REPORTS_STATUS)).await;
    let db = db(&server).await;
    wait_agent(&db, uid, |a| a.connected).await;
    let mut bye = beat(uid, 1);
    bye.agent_disconnect = Some(AgentDisconnect {});
    let r = post(&server, &bye).await;
    assert_eq!(r.instance_uid, uid.as_bytes().to_vec());
    assert!(r.error_response.is_none());
    wait_agent(&db, uid, |a| !a.connected).await;
    // Coming back reconnects it.
    post(&server, &beat(uid, 2)).await;
    wait_agent(&db, uid, |a| a.connected).await;
    server.stop().await;
}

#[tokio::test]
async fn ws_close_marks_disconnected() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let db = db(&server).await;
    let mut ws = Ws::connect(&server).await;
    ws.request(&full(uid, 0, REPORTS_STATUS)).await;
    wait_agent(&db, uid, |a| a.connected).await;
    ws.sink.close().await.unwrap();
    wait_agent(&db, uid, |a| !a.connected).await;

    // agent_disconnect over WebSocket does the same while the socket is still open.
    let mut ws = Ws::connect(&server).await;
    ws.request(&full(uid, 1, REPORTS_STATUS)).await;
    wait_agent(&db, uid, |a| a.connected).await;
    let mut bye = beat(uid, 2);
    bye.agent_disconnect = Some(AgentDisconnect {});
    let r = ws.request(&bye).await;
    assert!(r.error_response.is_none());
    wait_agent(&db, uid, |a| !a.connected).await;
    server.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_sends_a_close_frame() {
    let server = TestServer::start().await;
    let mut ws = Ws::connect(&server).await;
    ws.request(&full(new_uid(), 0, REPORTS_STATUS)).await;
    server.stop().await;
    match ws.frame().await {
        Some(WsMessage::Close(Some(f))) => {
            let code = u16::from(f.code);
            assert!(code == 1000 || code == 1001, "close code {code}");
        }
        other => panic!("expected a Close frame, got {other:?}"),
    }
}

// ================================================================ overload

#[tokio::test]
async fn too_many_websockets_get_503_with_retry_after() {
    let server = TestServer::start_with(|c| {
        c.opamp.max_connections = 1;
        c.opamp.retry_after_s = 42;
    })
    .await;
    let mut first = Ws::connect(&server).await;
    first.request(&full(new_uid(), 0, REPORTS_STATUS)).await;
    match connect_async(server.opamp_ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            assert_eq!(resp.headers()["retry-after"], "42");
        }
        other => panic!("expected 503, got {:?}", other.map(|(_, r)| r.status())),
    }
    // The slot frees when the first connection closes.
    first.sink.close().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if connect_async(server.opamp_ws_url()).await.is_ok() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn storage_failure_is_answered_unavailable_with_retry_info_and_nothing_is_lost() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let down = Arc::new(AtomicBool::new(false));
    let switch = down.clone();
    let server = TestServer::start_wrapped(
        |c| c.opamp.retry_after_s = 7,
        move |inner| Arc::new(crate::flaky::FlakyStore::wrapping(inner, switch)),
    )
    .await;
    let (ws_uid, http_uid) = (new_uid(), new_uid());
    let mut ws = Ws::connect(&server).await;
    ws.request(&full(ws_uid, 0, REPORTS_STATUS)).await;
    post(&server, &full(http_uid, 0, REPORTS_STATUS)).await;

    down.store(true, Ordering::SeqCst);
    // WebSocket: UNAVAILABLE with RetryInfo carrying opamp.retry_after_s, uid echoed.
    let mut status = beat(ws_uid, 1);
    status.health = Some(ComponentHealth {
        healthy: false,
        last_error: "output down".into(),
        ..Default::default()
    });
    let r = ws.request(&status).await;
    assert_eq!(r.instance_uid, ws_uid.as_bytes().to_vec());
    let err = r.error_response.expect("error response");
    assert_eq!(err.r#type, 2, "UNAVAILABLE");
    match err.details {
        Some(flotilla_proto::v1::server_error_response::Details::RetryInfo(ri)) => {
            assert_eq!(ri.retry_after_nanoseconds, 7_000_000_000)
        }
        other => panic!("expected RetryInfo, got {other:?}"),
    }
    // Plain HTTP: 503 with Retry-After (the clients that ignore RetryInfo honour this).
    let mut http_status = beat(http_uid, 1);
    http_status.health = status.health.clone();
    let resp = post_raw(&server, http_status.encode_to_vec(), &[]).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "7");

    // Storage back: the retried messages are processed; what was stored before is intact.
    down.store(false, Ordering::SeqCst);
    let r = ws.request(&status).await;
    assert!(r.error_response.is_none(), "{r:?}");
    assert!(post(&server, &http_status).await.error_response.is_none());
    let db = db(&server).await;
    for uid in [ws_uid, http_uid] {
        let a = wait_agent(&db, uid, |a| a.health.as_ref().is_some_and(|h| !h.healthy)).await;
        assert_eq!(a.attr("service.name"), Some("fluent-bit"), "{uid}");
        assert_eq!(a.sequence_num, 1);
    }
    server.stop().await;
}

/// An agent that hangs up while its poll is being answered (a client timeout under a slow
/// store) does not leave the command it was about to get marked `sent` forever: the claim is
/// undone and the next poll delivers it.
#[tokio::test]
async fn a_poll_abandoned_mid_delivery_puts_its_command_back() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let slow = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let knob = slow.clone();
    let server = TestServer::start_wrapped(
        |_| {},
        move |inner| {
            let mut s = crate::flaky::FlakyStore::wrapping(inner, Arc::new(AtomicBool::new(false)));
            s.slow_get_ms = knob;
            Arc::new(s)
        },
    )
    .await;
    let uid = new_uid();
    post(
        &server,
        &full(uid, 0, REPORTS_STATUS | AC::AcceptsRestartCommand as u64),
    )
    .await;
    let id = queue(&server, uid, "restart", json!({})).await;
    slow.store(1500, Ordering::SeqCst);
    let gave_up = http()
        .post(server.opamp_http_url())
        .header("Content-Type", "application/x-protobuf")
        .timeout(Duration::from_millis(300))
        .body(beat(uid, 1).encode_to_vec())
        .send()
        .await;
    assert!(gave_up.is_err(), "the agent hung up before the answer");
    slow.store(0, Ordering::SeqCst);
    wait_command(&server, &id, "queued").await;
    let r = post(&server, &beat(uid, 2)).await;
    assert!(r.command.is_some(), "delivered on the next poll: {r:?}");
    wait_command(&server, &id, "sent").await;
    server.stop().await;
}

#[tokio::test]
async fn too_many_http_requests_in_flight_get_429_with_retry_after() {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    let slow = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let knob = slow.clone();
    let server = TestServer::start_wrapped(
        |c| {
            c.opamp.max_in_flight = 1;
            c.opamp.retry_after_s = 31;
        },
        move |inner| {
            let mut s = crate::flaky::FlakyStore::wrapping(inner, Arc::default());
            s.slow_get_ms = knob;
            Arc::new(s)
        },
    )
    .await;
    // A request being processed (a slow store) holds the only slot. (A request whose body is
    // still arriving holds none: see net.rs, stalled uploads.)
    slow.store(3_000, Ordering::SeqCst);
    let body = full(new_uid(), 0, REPORTS_STATUS).encode_to_vec();
    let busy = {
        let url = server.opamp_http_url();
        let body = body.clone();
        tokio::spawn(async move {
            http()
                .post(url)
                .header("Content-Type", "application/x-protobuf")
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let resp = loop {
        let resp = post_raw(
            &server,
            full(new_uid(), 0, REPORTS_STATUS).encode_to_vec(),
            &[],
        )
        .await;
        if resp.status() == 429 {
            break resp;
        }
        assert!(tokio::time::Instant::now() < deadline, "never got 429");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(resp.headers()["retry-after"], "31");
    slow.store(0, Ordering::SeqCst);
    assert_eq!(busy.await.unwrap().unwrap(), 200);
    assert_eq!(
        post_raw(&server, body, &[]).await.status(),
        200,
        "slot returned"
    );
    server.stop().await;
}

// ================================================================ heartbeat / connection settings

#[tokio::test]
async fn heartbeat_interval_is_offered_only_to_agents_that_accept_connection_settings() {
    let server = TestServer::start_with(|c| c.opamp.heartbeat_interval_s = 17).await;
    let able =
        REPORTS_STATUS | AC::AcceptsOpAmpConnectionSettings as u64 | AC::ReportsHeartbeat as u64;

    let plain = new_uid();
    let r = post(
        &server,
        &full(plain, 0, REPORTS_STATUS | AC::ReportsHeartbeat as u64),
    )
    .await;
    assert!(
        r.connection_settings.is_none(),
        "not declared AcceptsOpAMPConnectionSettings"
    );

    let uid = new_uid();
    let r = post(&server, &full(uid, 0, able)).await;
    let offer = r.connection_settings.expect("offered");
    let opamp = offer.opamp.expect("opamp settings");
    assert_eq!(opamp.heartbeat_interval_seconds, 17);
    assert_eq!(opamp.destination_endpoint, server.opamp_http_url());
    assert!(!offer.hash.is_empty());
    // Not again on every poll…
    let r = post(&server, &beat(uid, 1)).await;
    assert!(r.connection_settings.is_none());
    // …nor when the agent reports our hash…
    let mut m = beat(uid, 2);
    m.connection_settings_status = Some(ConnectionSettingsStatus {
        last_connection_settings_hash: offer.hash.clone(),
        status: 1,
        error_message: String::new(),
    });
    assert!(post(&server, &m).await.connection_settings.is_none());
    // …but again when it reports another one.
    let mut m = beat(uid, 3);
    m.connection_settings_status = Some(ConnectionSettingsStatus {
        last_connection_settings_hash: vec![1, 2, 3],
        status: 1,
        error_message: String::new(),
    });
    let again = post(&server, &m)
        .await
        .connection_settings
        .expect("re-offered");
    assert_eq!(again.hash, offer.hash, "the hash is stable");

    // Over WebSocket: in the first reply of each connection, ws:// endpoint.
    let mut ws = Ws::connect(&server).await;
    let r = ws.request(&full(new_uid(), 0, able)).await;
    let opamp = r.connection_settings.expect("offered").opamp.unwrap();
    assert_eq!(opamp.destination_endpoint, server.opamp_ws_url());
    let db = db(&server).await;
    let a = wait_agent(&db, uid, |_| true).await;
    assert_eq!(a.heartbeat_interval_s, 17);
    // An agent offered nothing keeps its own interval, which we cannot know: liveness assumes
    // the spec's recommended 30 s, not our offer.
    let a = wait_agent(&db, plain, |_| true).await;
    assert_eq!(a.heartbeat_interval_s, 30);
    server.stop().await;
}

#[tokio::test]
async fn heartbeat_interval_of_agents_offered_none_is_learnt_from_their_heartbeats() {
    let server = TestServer::start_with(|c| c.opamp.heartbeat_interval_s = 17).await;
    let db = db(&server).await;
    let uid = new_uid();
    // ReportsHeartbeat but not AcceptsOpAMPConnectionSettings (the Python and Node clients):
    // it heartbeats at an interval of its own that nobody told us.
    post(
        &server,
        &full(uid, 0, REPORTS_STATUS | AC::ReportsHeartbeat as u64),
    )
    .await;
    let a = wait_agent(&db, uid, |_| true).await;
    assert_eq!(
        a.heartbeat_interval_s, 30,
        "until learnt: the spec's default"
    );
    for seq in 1..=2 {
        // The agent's own pace (the scenario, not a wait for the server).
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // As the Node client does: capabilities repeated in every heartbeat.
        let mut m = beat(uid, seq);
        m.capabilities = REPORTS_STATUS | AC::ReportsHeartbeat as u64;
        post(&server, &m).await;
    }
    let a = wait_agent(&db, uid, |a| a.heartbeat_interval_s != 30).await;
    assert_eq!(
        a.heartbeat_interval_s, 2,
        "1.1 s between heartbeats, rounded up"
    );
    server.stop().await;
}

// ================================================================ status compression

#[tokio::test]
async fn omitted_status_parts_and_zero_capabilities_keep_stored_values() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let caps = REPORTS_STATUS | AC::ReportsHealth as u64 | AC::ReportsEffectiveConfig as u64;
    post(&server, &full(uid, 0, caps)).await;
    // Only the effective config changed; capabilities omitted (0).
    let mut m = beat(uid, 1);
    m.effective_config = Some(EffectiveConfig {
        config_map: Some(AgentConfigMap {
            config_map: [(
                "fluent-bit.conf".to_string(),
                AgentConfigFile {
                    body: b"[INPUT]\n  Name cpu\n".to_vec(),
                    content_type: "text/plain".into(),
                },
            )]
            .into_iter()
            .collect(),
        }),
    });
    let r = post(&server, &m).await;
    assert!(!full_state_asked(&r));
    let db = db(&server).await;
    let a = wait_agent(&db, uid, |a| a.effective_config.is_some()).await;
    assert_eq!(a.capabilities, caps, "capabilities 0 means unchanged");
    let h = a.health.clone().expect("health kept");
    assert!(h.healthy);
    assert_eq!(h.status, "running");
    assert_eq!(a.attr("host.name"), Some("node-1"), "description kept");
    assert_eq!(
        a.effective_config.unwrap()["fluent-bit.conf"].body,
        "[INPUT]\n  Name cpu\n"
    );
    // A full report that sets capabilities replaces them.
    post(&server, &full(uid, 2, REPORTS_STATUS)).await;
    wait_agent(&db, uid, |a| a.capabilities == REPORTS_STATUS).await;
    server.stop().await;
}

// ================================================================ remote config

#[tokio::test]
async fn remote_config_is_sent_and_reoffered_while_the_reported_hash_differs() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let caps = REPORTS_STATUS | AC::AcceptsRemoteConfig as u64 | AC::ReportsRemoteConfig as u64;
    post(&server, &full(uid, 0, caps)).await;
    let id = queue(
        &server,
        uid,
        "remote_config",
        json!({"files": {"fluent-bit.conf": "[SERVICE]\n  Flush 1\n"}}),
    )
    .await;
    let r = post(&server, &beat(uid, 1)).await;
    let rc = r.remote_config.expect("config delivered on the next poll");
    assert!(!rc.config_hash.is_empty());
    let files = rc.config.expect("config map").config_map;
    assert_eq!(files["fluent-bit.conf"].body, b"[SERVICE]\n  Flush 1\n");

    // The agent says it still runs something else: the server MUST send the config again.
    let mut m = beat(uid, 2);
    m.remote_config_status = Some(RemoteConfigStatus {
        last_remote_config_hash: vec![0xde, 0xad],
        status: 1,
        error_message: String::new(),
    });
    let r = post(&server, &m).await;
    assert_eq!(
        r.remote_config.expect("re-offered").config_hash,
        rc.config_hash
    );

    // Applied with our hash: settled, and not offered again.
    let mut m = beat(uid, 3);
    m.remote_config_status = Some(RemoteConfigStatus {
        last_remote_config_hash: rc.config_hash.clone(),
        status: 1,
        error_message: String::new(),
    });
    let r = post(&server, &m).await;
    assert!(r.remote_config.is_none());
    wait_command(&server, &id, "succeeded").await;
    server.stop().await;
}

// ================================================================ commands

#[tokio::test]
async fn ws_command_is_delivered_at_once_and_exactly_once() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let caps = REPORTS_STATUS | AC::AcceptsRestartCommand as u64 | AC::ReportsHealth as u64;
    let mut ws = Ws::connect(&server).await;
    ws.request(&full(uid, 0, caps)).await;
    let id = queue(&server, uid, "restart", json!({})).await;
    // No heartbeat: the queue wakes the session.
    let m = ws.recv().await;
    assert!(m.command.is_some(), "restart command: {m:?}");
    assert_eq!(m.instance_uid, uid.as_bytes().to_vec());
    assert_eq!(m.flags, 0, "a command travels alone");
    assert!(m.remote_config.is_none() && m.custom_message.is_none());
    assert!(
        ws.silent_for(Duration::from_millis(500)).await,
        "delivered once"
    );
    wait_command(&server, &id, "sent").await;
    // The agent restarts, dropping its connection without a goodbye right after the command
    // (one message on it, like a client that reads one frame): pushed once its connection had
    // outlived a one-shot client's, it stays delivered and is not sent again.
    drop(ws);
    let mut ws = Ws::connect(&server).await;
    let mut m = full(uid, 1, caps);
    // Its health reports a start time later than the queue time, which settles the command.
    m.health.as_mut().unwrap().start_time_unix_nano = now_ns();
    let r = ws.request(&m).await;
    assert!(r.command.is_none(), "delivered once: {r:?}");
    let c = wait_command(&server, &id, "succeeded").await;
    assert_eq!(
        c["result"]["evidence"],
        "health.start_time_unix_nano is later than the queue time"
    );
    assert!(ws.silent_for(Duration::from_millis(200)).await);
    server.stop().await;
}

pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A fluent-opamp supervisor (shared/reference/fluent-opamp-compat.md) as it registers and
/// answers: `request:`-prefixed custom capabilities, capabilities 0xC01, failures only, no
/// command ids. Flotilla must drive it in that plain form and say honestly what it learnt.
#[tokio::test]
async fn fluent_opamp_supervisors_are_driven_in_their_own_wire_form() {
    const CHATOPS: &str = "org.mp3monster.opamp_provider.chatopcommand";
    const SHUTDOWN: &str = "org.mp3monster.opamp_provider.command_shutdown_agent";
    let server = TestServer::start_with(|c| c.commands.result_timeout_s = 1).await;
    let uid = new_uid();
    let mut hello = full(uid, 0, 0xC01);
    hello.agent_description = Some(AgentDescription {
        identifying_attributes: vec![
            kv_str("service.name", "fluentbit-agent"),
            kv_str("service.namespace", "fluent"),
            kv_str("service.type", "Fluent Bit"),
            kv_str("service.instance.id", "node-7"),
            kv_str("service.version", "Fluent Bit - 5.1.1 (Community)"),
        ],
        non_identifying_attributes: vec![kv_str("os_type", "linux"), kv_str("hostname", "node-7")],
    });
    hello.custom_capabilities = Some(flotilla_proto::CustomCapabilities {
        capabilities: vec![
            format!("request:{CHATOPS}"),
            format!("request:{SHUTDOWN}"),
            "request:org.mp3monster.opamp_provider.nullcommand".into(),
        ],
    });
    let mut ws = Ws::connect(&server).await;
    let r = ws.request(&hello).await;
    let offered = r
        .custom_capabilities
        .expect("the server lists its custom capabilities");
    for c in [CHATOPS, SHUTDOWN] {
        assert!(offered.capabilities.iter().any(|o| o == c), "{offered:?}");
    }

    // ChatOps in fluent-opamp's form: type "request", keys sorted, no command id.
    let failing = queue(
        &server,
        uid,
        "chatops",
        json!({"tag": "flush", "attributes": {"why": "disk"}}),
    )
    .await;
    let m = ws.recv().await;
    assert_fluent_opamp_chatops(
        &m.custom_message.expect("a custom message"),
        r#"{"attributes":{"why":"disk"},"tag":"flush"}"#,
    );
    wait_command(&server, &failing, "sent").await;
    // Its only report: a failure, correlated with the last ChatOps command sent.
    let mut fail = beat(uid, 1);
    fail.custom_message = Some(flotilla_proto::CustomMessage {
        capability: CHATOPS.into(),
        r#type: "failure".into(),
        data: br#"{"http_code": 503, "err_msg": "input paused"}"#.to_vec(),
    });
    ws.request(&fail).await;
    let c = wait_command(&server, &failing, "failed").await;
    assert!(c["error"].as_str().unwrap().contains("input paused"), "{c}");
    assert_eq!(c["result"]["data"]["http_code"], 503, "{c}");

    // No news is not reported as good news: without a failure report the command expires,
    // and the message says the outcome is unknown and why.
    let silent = queue(&server, uid, "chatops", json!({"tag": "rotate"})).await;
    assert!(ws.recv().await.custom_message.is_some());
    let c = wait_command(&server, &silent, "expired").await;
    assert!(
        c["error"]
            .as_str()
            .unwrap()
            .contains("reports only failures"),
        "{c}"
    );

    // Shutdown in its form; agent_disconnect is the evidence it ran.
    let bye = queue(&server, uid, "shutdown", json!({})).await;
    let cm = ws.recv().await.custom_message.expect("shutdown message");
    assert_eq!(
        (cm.capability.as_str(), cm.r#type.as_str()),
        (SHUTDOWN, "Shutdown Agent")
    );
    let mut disconnect = beat(uid, 2);
    disconnect.agent_disconnect = Some(AgentDisconnect {});
    ws.request(&disconnect).await;
    wait_command(&server, &bye, "succeeded").await;
    let db = db(&server).await;
    let a = wait_agent(&db, uid, |a| !a.connected).await;
    assert_eq!(a.attr("service.type"), Some("Fluent Bit"));

    // It starts again with a fresh uid (it never persists one): not a ghost beside a new
    // agent, but the same agent back, linked both ways and audited.
    let again = new_uid();
    let mut hello2 = hello.clone();
    hello2.instance_uid = again.as_bytes().to_vec();
    let mut ws = Ws::connect(&server).await;
    ws.request(&hello2).await;
    let rest = server.rest();
    let (_, new_view) = rest.get(&format!("/api/v1/agents/{again}")).await;
    assert_eq!(new_view["replaces"], uid.to_string(), "{new_view}");
    let (_, old_view) = rest.get(&format!("/api/v1/agents/{uid}")).await;
    assert_eq!(old_view["replaced_by"], again.to_string(), "{old_view}");
    let (_, found) = rest.get("/api/v1/agents?q=replaced:yes").await;
    let uids: Vec<&str> = found["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["uid"].as_str().unwrap())
        .collect();
    assert_eq!(uids, vec![uid.to_string().as_str()]);
    let (_, trail) = rest
        .get(&format!(
            "/api/v1/audit?operation=agent.reregistered&agent={again}"
        ))
        .await;
    assert_eq!(trail["items"].as_array().unwrap().len(), 1, "{trail}");
    assert_eq!(trail["items"][0]["channel"], "system");
    server.stop().await;
}

/// ChatOps exactly as fluent-opamp's provider sends it: type "request", the command's keys
/// sorted as JSON, no command id.
pub(crate) fn assert_fluent_opamp_chatops(cm: &flotilla_proto::CustomMessage, data: &str) {
    assert_eq!(
        (cm.capability.as_str(), cm.r#type.as_str()),
        ("org.mp3monster.opamp_provider.chatopcommand", "request")
    );
    assert_eq!(String::from_utf8_lossy(&cm.data), data);
}

/// Flotilla's own form: commands carry their id, results name it, and over WebSocket the reply
/// to a result acknowledges it by id (a reply alone proves nothing there: commands are pushed
/// as messages of their own, so the agent cannot count replies).
#[tokio::test]
async fn flotilla_results_are_acknowledged_by_command_id() {
    const RICH: &str = "io.flotilla.command/v1";
    const ACK: &str = "io.flotilla.command/v1/ack";
    const CHATOPS: &str = "org.mp3monster.opamp_provider.chatopcommand";
    let server = TestServer::start().await;
    let uid = new_uid();
    let mut hello = full(uid, 0, REPORTS_STATUS);
    hello.custom_capabilities = Some(flotilla_proto::CustomCapabilities {
        capabilities: vec![RICH.into(), ACK.into(), CHATOPS.into()],
    });
    let mut ws = Ws::connect(&server).await;
    let r = ws.request(&hello).await;
    assert!(r
        .custom_capabilities
        .unwrap()
        .capabilities
        .iter()
        .any(|c| c == ACK));
    let id = queue(&server, uid, "chatops", json!({"tag": "flush"})).await;
    let cm = ws.recv().await.custom_message.expect("chatops");
    let data: serde_json::Value = serde_json::from_slice(&cm.data).unwrap();
    assert_eq!(data["command_id"], id.as_str(), "{data}");
    let mut result = beat(uid, 1);
    result.custom_message = Some(flotilla_proto::CustomMessage {
        capability: RICH.into(),
        r#type: "result".into(),
        data: json!({"command_id": id, "status": "succeeded", "message": "HTTP 200"})
            .to_string()
            .into_bytes(),
    });
    for seq in [1, 2] {
        // The second is the agent re-sending after a reconnect: acked again, settled once.
        result.sequence_num = seq;
        let r = ws.request(&result).await;
        assert!(
            r.custom_capabilities.is_some(),
            "an ack comes with the server's custom capabilities"
        );
        let ack = r.custom_message.expect("an ack in the reply");
        assert_eq!(
            (ack.capability.as_str(), ack.r#type.as_str()),
            (RICH, "ack")
        );
        let a: serde_json::Value = serde_json::from_slice(&ack.data).unwrap();
        assert_eq!(a["command_id"], id.as_str());
    }
    let c = wait_command(&server, &id, "succeeded").await;
    assert_eq!(c["result"]["message"], "HTTP 200", "{c}");
    // A heartbeat is not acknowledged.
    assert!(ws.request(&beat(uid, 3)).await.custom_message.is_none());
    // An agent that does not declare the ack marker (an older supervisor, which would take an
    // ack for a command) gets none.
    let older = new_uid();
    let mut hello = full(older, 0, REPORTS_STATUS);
    hello.custom_capabilities = Some(flotilla_proto::CustomCapabilities {
        capabilities: vec![RICH.into(), CHATOPS.into()],
    });
    let mut ws2 = Ws::connect(&server).await;
    ws2.request(&hello).await;
    let id2 = queue(&server, older, "chatops", json!({"tag": "flush"})).await;
    assert!(ws2.recv().await.custom_message.is_some());
    let mut result2 = result.clone();
    result2.instance_uid = older.as_bytes().to_vec();
    result2.custom_message.as_mut().unwrap().data =
        json!({"command_id": id2, "status": "succeeded"})
            .to_string()
            .into_bytes();
    assert!(ws2.request(&result2).await.custom_message.is_none());
    wait_command(&server, &id2, "succeeded").await;
    server.stop().await;
}

/// After a host reboot the old WebSocket is half-open and still looks live, so a re-registered
/// agent is linked to its earlier record only once that connection has proved dead.
#[tokio::test]
async fn a_reregistration_behind_a_half_open_connection_is_linked_once_it_is_dead() {
    let server = TestServer::start().await;
    let identity = |uid: Uuid| {
        let mut m = full(uid, 0, REPORTS_STATUS);
        m.agent_description = Some(AgentDescription {
            identifying_attributes: vec![kv_str("service.instance.id", "node-9")],
            non_identifying_attributes: vec![kv_str("host.name", "node-9")],
        });
        m
    };
    let (before, after) = (new_uid(), new_uid());
    let mut stale = Ws::connect_raw(&server).await;
    stale
        .send(WsMessage::Binary(encode_ws(&identity(before)).into()))
        .await
        .unwrap();
    let db = db(&server).await;
    wait_agent(&db, before, |a| a.connected).await;
    let mut ws = Ws::connect(&server).await;
    ws.request(&identity(after)).await;
    let linked = wait_agent(&db, after, |a| a.replaces.is_some()).await;
    assert_eq!(linked.replaces, Some(before));
    let old = wait_agent(&db, before, |_| true).await;
    assert_eq!((old.replaced_by, old.connected), (Some(after), false));
    drop(stale);
    server.stop().await;
}

#[tokio::test]
async fn a_plain_http_agent_back_under_a_new_uid_is_linked_once_its_old_uid_falls_silent() {
    // Agents that take the offered 1 s heartbeat make "silent for two intervals" a few seconds.
    let server = TestServer::start_with(|c| c.opamp.heartbeat_interval_s = 1).await;
    let caps =
        REPORTS_STATUS | AC::AcceptsOpAmpConnectionSettings as u64 | AC::ReportsHeartbeat as u64;
    let identity = |uid: Uuid, node: &str| {
        let mut m = full(uid, 0, caps);
        m.agent_description = Some(AgentDescription {
            identifying_attributes: vec![kv_str("service.instance.id", node)],
            non_identifying_attributes: vec![kv_str("host.name", node)],
        });
        m
    };
    // node-1 restarts under a new uid without agent_disconnect (as the Node client does);
    // node-2 gets a twin with its identity while it goes on polling.
    let (before, after, alive, twin) = (new_uid(), new_uid(), new_uid(), new_uid());
    post(&server, &identity(before, "node-1")).await;
    post(&server, &identity(alive, "node-2")).await;
    post(&server, &identity(after, "node-1")).await;
    post(&server, &identity(twin, "node-2")).await;
    let registered = tokio::time::Instant::now();
    let db = db(&server).await;
    let mut seq = 0;
    loop {
        seq += 1;
        post(&server, &beat(alive, seq)).await;
        let linked = db.get_agent(after).await.unwrap().unwrap().replaces;
        // The twin's decision falls 4 s after its registration; poll well past it.
        if linked.is_some() && registered.elapsed() > Duration::from_secs(6) {
            assert_eq!(linked, Some(before));
            break;
        }
        assert!(
            registered.elapsed() < WAIT,
            "the silent record was never linked"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let old = db.get_agent(before).await.unwrap().unwrap();
    assert_eq!(old.replaced_by, Some(after));
    let (t, a) = (
        db.get_agent(twin).await.unwrap().unwrap(),
        db.get_agent(alive).await.unwrap().unwrap(),
    );
    assert_eq!(
        (t.replaces, a.replaced_by),
        (None, None),
        "a live agent is not replaced"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_restart_that_cannot_be_confirmed_expires_saying_so() {
    let server = TestServer::start_with(|c| c.commands.result_timeout_s = 1).await;
    let uid = new_uid();
    // AcceptsRestartCommand without ReportsHealth: no start time will ever show the restart.
    let caps = REPORTS_STATUS | AC::AcceptsRestartCommand as u64;
    let mut msg = full(uid, 0, caps);
    msg.health = None;
    post(&server, &msg).await;
    let id = queue(&server, uid, "restart", json!({})).await;
    assert!(post(&server, &beat(uid, 1)).await.command.is_some());
    let c = wait_command(&server, &id, "expired").await;
    assert!(
        c["error"]
            .as_str()
            .unwrap()
            .contains("does not report health"),
        "{c}"
    );
    server.stop().await;
}

#[tokio::test]
async fn ws_commands_queued_while_offline_arrive_after_the_first_message() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let caps = REPORTS_STATUS | AC::AcceptsRestartCommand as u64;
    post(&server, &full(uid, 0, caps)).await;
    let mut bye = beat(uid, 1);
    bye.agent_disconnect = Some(AgentDisconnect {});
    post(&server, &bye).await;
    let id = queue(&server, uid, "force_resync", json!({})).await;
    let restart = queue(&server, uid, "restart", json!({})).await;
    let mut ws = Ws::connect(&server).await;
    // Both were queued while it was away: the first rides in the answer to its first
    // message, the restart (which travels alone) follows in a message of its own.
    let r = ws.request(&beat(uid, 2)).await;
    assert!(
        full_state_asked(&r),
        "the queued force_resync, in the reply"
    );
    assert!(r.command.is_none());
    let m = ws.recv().await;
    assert!(
        m.command.is_some() && m.flags == 0,
        "then the restart: {m:?}"
    );
    wait_command(&server, &restart, "sent").await;
    ws.request(&full(uid, 3, caps)).await;
    wait_command(&server, &id, "succeeded").await;
    server.stop().await;
}

#[tokio::test]
async fn http_command_is_delivered_on_the_next_poll_alone_and_once() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let caps = REPORTS_STATUS | AC::AcceptsRestartCommand as u64;
    post(&server, &full(uid, 0, caps)).await;
    let id = queue(&server, uid, "restart", json!({})).await;
    let r = post(&server, &beat(uid, 1)).await;
    assert!(r.command.is_some());
    assert_eq!(r.instance_uid, uid.as_bytes().to_vec());
    assert_eq!(r.flags, 0);
    assert!(r.custom_capabilities.is_none() && r.connection_settings.is_none());
    wait_command(&server, &id, "sent").await;
    let r = post(&server, &beat(uid, 2)).await;
    assert!(r.command.is_none(), "delivered once");
    server.stop().await;
}

#[tokio::test]
async fn http_command_waits_when_the_reply_must_carry_flags() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let caps = REPORTS_STATUS | AC::AcceptsRestartCommand as u64;
    post(&server, &full(uid, 0, caps)).await;
    let id = queue(&server, uid, "restart", json!({})).await;
    // A gap: this reply must carry ReportFullState, so the restart waits a poll.
    let r = post(&server, &beat(uid, 5)).await;
    assert!(full_state_asked(&r));
    assert!(r.command.is_none());
    let r = post(&server, &full(uid, 6, caps)).await;
    assert!(r.command.is_some());
    wait_command(&server, &id, "sent").await;
    server.stop().await;
}

#[tokio::test]
async fn command_is_failed_if_the_capability_is_gone_at_send_time() {
    let server = TestServer::start().await;
    let uid = new_uid();
    post(
        &server,
        &full(uid, 0, REPORTS_STATUS | AC::AcceptsRestartCommand as u64),
    )
    .await;
    let id = queue(&server, uid, "restart", json!({})).await;
    // The agent drops AcceptsRestartCommand before the command goes out.
    let r = post(&server, &full(uid, 1, REPORTS_STATUS)).await;
    assert!(r.command.is_none(), "never use an undeclared capability");
    let c = wait_command(&server, &id, "failed").await;
    assert!(
        c["error"]
            .as_str()
            .unwrap_or("")
            .contains("AcceptsRestartCommand"),
        "{c}"
    );
    server.stop().await;
}

#[tokio::test]
async fn new_instance_uid_command_moves_the_record_when_adopted() {
    let server = TestServer::start().await;
    let old = new_uid();
    let mut ws = Ws::connect(&server).await;
    ws.request(&full(old, 0, REPORTS_STATUS)).await;
    let id = queue(&server, old, "new_instance_uid", json!({})).await;
    let m = ws.recv().await;
    let new = Uuid::from_slice(&m.agent_identification.expect("new uid").new_instance_uid).unwrap();
    let r = ws.request(&beat(new, 1)).await;
    assert_eq!(r.instance_uid, new.as_bytes().to_vec());
    assert!(!full_state_asked(&r), "the record carried over");
    wait_command(&server, &id, "succeeded").await;
    let db = db(&server).await;
    let a = wait_agent(&db, new, |_| true).await;
    assert_eq!(a.previous_uid, Some(old));
    assert_eq!(a.attr("service.name"), Some("fluent-bit"));
    server.stop().await;
}

#[tokio::test]
async fn an_adopted_uid_that_someone_took_meanwhile_is_replaced_not_merged() {
    let server = TestServer::start().await;
    let old = new_uid();
    let mut ws = Ws::connect(&server).await;
    ws.request(&full(old, 0, REPORTS_STATUS)).await;
    let s = label_env_prod(&server, old).await;
    assert_eq!(s, 200);
    queue(&server, old, "new_instance_uid", json!({})).await;
    let m = ws.recv().await;
    let taken =
        Uuid::from_slice(&m.agent_identification.expect("new uid").new_instance_uid).unwrap();
    // Before the agent adopts it, another agent appears under that very uid.
    let mut squatter = full(taken, 0, REPORTS_STATUS);
    squatter
        .agent_description
        .as_mut()
        .unwrap()
        .non_identifying_attributes = vec![kv_str("host.name", "squatter")];
    post(&server, &squatter).await;
    // The agent now speaks as `taken`: it is not merged into the squatter's record, but given
    // another uid, and asked for its full state.
    let r = ws.request(&beat(taken, 1)).await;
    assert!(full_state_asked(&r));
    let fresh = Uuid::from_slice(
        &r.agent_identification
            .expect("another uid")
            .new_instance_uid,
    )
    .unwrap();
    assert_ne!(fresh, taken);
    let r = ws.request(&beat(fresh, 2)).await;
    assert!(r.agent_identification.is_none(), "{r:?}");
    let db = db(&server).await;
    let mine = wait_agent(&db, fresh, |_| true).await;
    assert_eq!(mine.labels.get("env").map(String::as_str), Some("prod"));
    assert_eq!(mine.previous_uid, Some(old));
    let theirs = wait_agent(&db, taken, |_| true).await;
    assert_eq!(theirs.attr("host.name"), Some("squatter"));
    assert!(theirs.labels.is_empty());
    server.stop().await;
}

// ================================================================ authentication

#[tokio::test]
async fn agent_tokens_are_required_when_configured() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tmp.path().join("agent-tokens");
    flotilla_e2e::write_secret(&tokens, "# agents\nagent-token-1\n");
    let server = TestServer::start_with(|c| c.opamp.agent_tokens_file = Some(tokens.clone())).await;
    let body = full(new_uid(), 0, REPORTS_STATUS).encode_to_vec();
    assert_eq!(post_raw(&server, body.clone(), &[]).await.status(), 401);
    let wrong = post_raw(
        &server,
        body.clone(),
        &[("Authorization", "Bearer agent-token-2")],
    )
    .await;
    assert_eq!(wrong.status(), 401);
    let ok = post_raw(&server, body, &[("Authorization", "Bearer agent-token-1")]).await;
    assert_eq!(ok.status(), 200);

    match connect_async(server.opamp_ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {:?}", other.map(|(_, r)| r.status())),
    }
    let mut req = server.opamp_ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", "Bearer agent-token-1".parse().unwrap());
    let (mut ws, resp) = connect_async(req).await.expect("authorised upgrade");
    assert_eq!(resp.status(), 101);
    ws.send(WsMessage::Binary(
        encode_ws(&full(new_uid(), 0, REPORTS_STATUS)).into(),
    ))
    .await
    .unwrap();
    let frame = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(matches!(frame, Some(Ok(WsMessage::Binary(_)))));
    server.stop().await;
}

#[tokio::test]
async fn ws_heartbeats_reach_the_registry_in_batches() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let db = db(&server).await;
    let mut ws = Ws::connect(&server).await;
    ws.request(&full(uid, 0, REPORTS_STATUS)).await;
    let first = wait_agent(&db, uid, |_| true).await;
    for seq in 1..=5 {
        let r = ws.request(&beat(uid, seq)).await;
        assert!(!full_state_asked(&r));
    }
    // Written by the flusher (about once a second), not by each heartbeat.
    let a = wait_agent(&db, uid, |a| a.sequence_num == 5).await;
    assert!(a.last_seen >= first.last_seen);
    assert!(a.connected);
    server.stop().await;
}

#[tokio::test]
async fn remote_config_is_not_reoffered_once_the_agent_stops_accepting_it() {
    let server = TestServer::start().await;
    let uid = new_uid();
    let caps = REPORTS_STATUS | AC::AcceptsRemoteConfig as u64 | AC::ReportsRemoteConfig as u64;
    post(&server, &full(uid, 0, caps)).await;
    queue(
        &server,
        uid,
        "remote_config",
        json!({"files": {"fluent-bit.conf": "[SERVICE]\n"}}),
    )
    .await;
    assert!(post(&server, &beat(uid, 1)).await.remote_config.is_some());
    let mut m = full(uid, 2, REPORTS_STATUS | AC::ReportsRemoteConfig as u64);
    m.remote_config_status = Some(RemoteConfigStatus {
        last_remote_config_hash: vec![1],
        status: 3,
        error_message: "refused".into(),
    });
    let r = post(&server, &m).await;
    assert!(
        r.remote_config.is_none(),
        "AcceptsRemoteConfig is no longer declared"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_outgoing_message_over_the_limit_is_not_sent() {
    let server = TestServer::start_with(|c| c.opamp.max_message_bytes = 1024).await;
    let uid = new_uid();
    let caps = REPORTS_STATUS | AC::AcceptsRemoteConfig as u64;
    let mut ws = Ws::connect(&server).await;
    ws.request(&full(uid, 0, caps)).await;
    let id = queue(
        &server,
        uid,
        "remote_config",
        json!({"files": {"big.conf": "x".repeat(2000)}}),
    )
    .await;
    let c = wait_command(&server, &id, "failed").await;
    assert!(
        c["error"]
            .as_str()
            .unwrap_or("")
            .contains("max_message_bytes"),
        "{c}"
    );
    assert!(
        ws.silent_for(Duration::from_millis(300)).await,
        "nothing was sent"
    );
    server.stop().await;
}
