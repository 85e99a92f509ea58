//! A fake of the parts of Slack the chat gateway talks to, for tests on loopback: the Web API
//! methods it calls (`chat.postMessage`, `chat.update`, `chat.postEphemeral`) and
//! `response_url`s, recording every call; and [`SlackSigner`], which sends requests to the
//! gateway signed exactly as Slack signs them.
//!
//! Answers follow Slack's method reference pages: `{"ok": true, "channel", "ts", "message"}`
//! for `chat.postMessage`, `{"ok": true, "channel", "ts", "text", "message"}` for `chat.update`,
//! `{"ok": true, "message_ts"}` for `chat.postEphemeral`, `{"ok": false, "error": …}` on
//! failure (`not_authed`, `invalid_auth`, or a scripted error), and HTTP 429 with a
//! `Retry-After` header when rate limited ("Rate limits" page). The signature is the `v0`
//! scheme of "Verifying requests from Slack", computed here independently of the gateway's
//! verifier (both are checked against Slack's documented example).
//!
//! Socket Mode ("Socket Mode implementation"): `apps.connections.open` requires the app-level
//! token (`xapp-…`; a bot token gets `not_allowed_token_type`) and answers a one-use
//! `ws://…/link/?ticket=…` URL; the WebSocket there sends `hello`, then the envelopes a test
//! pushes (`events_api`, `slash_commands`, `interactive`, `disconnect`), and records every
//! acknowledgement (`{"envelope_id": …}`) the app sends back. `users.info` answers the profile
//! a test registered (`user_not_found` otherwise).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};

/// One call the gateway made.
#[derive(Debug, Clone)]
pub struct Call {
    /// `chat.postMessage`, `chat.update`, `chat.postEphemeral`, or `response_url`.
    pub method: String,
    /// For `response_url`: the path id it was posted to.
    pub target: Option<String>,
    pub body: Value,
    pub authorization: Option<String>,
    pub at: Instant,
}

/// A scripted answer for the next call(s) of a method.
#[derive(Debug, Clone)]
pub enum Script {
    /// HTTP 429 with `Retry-After: secs`.
    RateLimited { retry_after_s: u64 },
    /// `{"ok": false, "error": code}`.
    Error(String),
}

/// An acknowledgement the app sent over a Socket Mode connection.
#[derive(Debug, Clone)]
pub struct Ack {
    pub envelope_id: String,
    /// The response payload, when the app answered inline (slash commands).
    pub payload: Option<Value>,
    /// Which connection (in order of opening, from 0) it came over.
    pub connection: usize,
    pub at: Instant,
}

/// One Socket Mode WebSocket.
struct Conn {
    tx: tokio::sync::mpsc::UnboundedSender<Message>,
    open: bool,
}

#[derive(Default)]
struct Inner {
    calls: Vec<Call>,
    scripts: HashMap<String, VecDeque<Script>>,
    next_ts: u64,
    /// Each answered `chat.postMessage`: its body and the `ts` the fake gave the message, so a
    /// test can click a button on it as Slack would (with that `message_ts`).
    posted: Vec<(Value, String)>,
    app_token: Option<String>,
    tickets: HashMap<String, bool>,
    conns: Vec<Conn>,
    acks: Vec<Ack>,
    /// Sent envelope id → when, for ack latency.
    sent: HashMap<String, Instant>,
    /// `users.info`: user id → (username, display name, real name).
    users: HashMap<String, (String, String, String)>,
}

/// The fake Slack, serving on a loopback port until dropped with the runtime.
#[derive(Clone)]
pub struct FakeSlack {
    pub addr: SocketAddr,
    token: String,
    inner: Arc<Mutex<Inner>>,
    notify: Arc<tokio::sync::Notify>,
}

impl FakeSlack {
    /// Starts a fake Slack accepting the bot token `token`.
    pub async fn start(token: &str) -> FakeSlack {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeSlack {
            addr: listener.local_addr().unwrap(),
            token: token.to_string(),
            inner: Arc::new(Mutex::new(Inner {
                next_ts: 1_700_000_000_000_100,
                ..Default::default()
            })),
            notify: Arc::new(tokio::sync::Notify::new()),
        };
        let app = Router::new()
            .route("/api/{method}", post(api).get(api_get))
            .route("/link/", get(link))
            .route("/response/{id}", post(respond))
            .with_state(fake.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        fake
    }

    /// The Web API base URL to configure (`chat.slack.api_url`).
    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    /// Accepts `token` (an app-level `xapp-…` token) for `apps.connections.open`.
    pub fn accept_app_token(&self, token: &str) {
        self.inner.lock().unwrap().app_token = Some(token.to_string());
    }

    /// Registers a workspace member for `users.info`.
    pub fn add_user(&self, id: &str, username: &str, display_name: &str, real_name: &str) {
        self.inner.lock().unwrap().users.insert(
            id.to_string(),
            (
                username.to_string(),
                display_name.to_string(),
                real_name.to_string(),
            ),
        );
    }

    /// Socket Mode connections opened so far (each `apps.connections.open` ticket used).
    pub fn socket_opens(&self) -> usize {
        self.inner.lock().unwrap().conns.len()
    }

    /// Socket Mode connections open now.
    pub fn sockets_open(&self) -> usize {
        self.inner
            .lock()
            .unwrap()
            .conns
            .iter()
            .filter(|c| c.open)
            .count()
    }

    /// Every Socket Mode acknowledgement so far.
    pub fn acks(&self) -> Vec<Ack> {
        self.inner.lock().unwrap().acks.clone()
    }

    /// When an envelope was pushed, for the time to its acknowledgement.
    pub fn sent_at(&self, envelope_id: &str) -> Option<Instant> {
        self.inner.lock().unwrap().sent.get(envelope_id).copied()
    }

    /// Pushes one message over the newest open Socket Mode connection (Slack picks any open
    /// one); returns that connection's number. Panics if none is open.
    pub fn socket_send(&self, msg: &Value) -> usize {
        let mut g = self.inner.lock().unwrap();
        if let Some(id) = msg["envelope_id"].as_str() {
            g.sent.insert(id.to_string(), Instant::now());
        }
        let (i, c) = g
            .conns
            .iter()
            .enumerate()
            .rev()
            .find(|(_, c)| c.open)
            .expect("a Socket Mode connection is open");
        c.tx.send(Message::Text(msg.to_string().into()))
            .expect("the connection task is running");
        i
    }

    /// Sends `disconnect` (reason `refresh_requested`) on the newest open connection, then
    /// closes it as Slack does; returns that connection's number.
    pub fn socket_disconnect(&self) -> usize {
        let i = self.socket_send(&json!({
            "type": "disconnect", "reason": "refresh_requested",
            "debug_info": {"host": "applink-fake"}
        }));
        let mut g = self.inner.lock().unwrap();
        let _ = g.conns[i].tx.send(Message::Close(None));
        g.conns[i].open = false;
        drop(g);
        self.notify.notify_waiters();
        i
    }

    /// Waits until `pred` holds for the fake (its sockets, acks, calls); panics after `timeout`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&FakeSlack) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if pred(self) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                assert!(
                    pred(self),
                    "timed out waiting for {what}; acks: {:?}, sockets open: {}, opened: {}",
                    self.acks()
                        .iter()
                        .map(|a| &a.envelope_id)
                        .collect::<Vec<_>>(),
                    self.sockets_open(),
                    self.socket_opens()
                );
                return;
            }
        }
    }

    /// Waits for the acknowledgement of `envelope_id`.
    pub async fn wait_ack(&self, timeout: Duration, envelope_id: &str) -> Ack {
        self.wait_until(timeout, &format!("the ack of {envelope_id}"), |f| {
            f.acks().iter().any(|a| a.envelope_id == envelope_id)
        })
        .await;
        self.acks()
            .into_iter()
            .find(|a| a.envelope_id == envelope_id)
            .unwrap()
    }

    /// A `response_url` as Slack would put in a command or interaction.
    pub fn response_url(&self, id: &str) -> String {
        format!("http://{}/response/{id}", self.addr)
    }

    /// Scripts the next calls of `method` (`chat.postMessage`, ..., or `response_url`).
    pub fn script(&self, method: &str, s: Script) {
        self.inner
            .lock()
            .unwrap()
            .scripts
            .entry(method.to_string())
            .or_default()
            .push_back(s);
    }

    /// Every call so far, oldest first (refused and rate-limited ones included).
    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// Calls of one method.
    pub fn calls_of(&self, method: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == method)
            .collect()
    }

    /// Waits until `pred` holds for the recorded calls; panics with them after `timeout`.
    pub async fn wait_for(&self, timeout: Duration, what: &str, pred: impl Fn(&[Call]) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if pred(&self.calls()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let calls = self.calls();
                assert!(
                    pred(&calls),
                    "timed out waiting for {what}; Slack got: {:#?}",
                    calls
                        .iter()
                        .map(|c| (&c.method, &c.body))
                        .collect::<Vec<_>>()
                );
                return;
            }
        }
    }

    /// Every message posted with `chat.postMessage` (answered `ok`), oldest first, with the
    /// `ts` it was given.
    pub fn posted(&self) -> Vec<(Value, String)> {
        self.inner.lock().unwrap().posted.clone()
    }

    fn record(
        &self,
        method: &str,
        target: Option<String>,
        h: &HeaderMap,
        body: Value,
    ) -> Option<Script> {
        let mut g = self.inner.lock().unwrap();
        g.calls.push(Call {
            method: method.to_string(),
            target,
            body,
            authorization: h
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            at: Instant::now(),
        });
        let s = g.scripts.get_mut(method).and_then(VecDeque::pop_front);
        drop(g);
        self.notify.notify_waiters();
        s
    }

    fn next_ts(&self) -> String {
        let mut g = self.inner.lock().unwrap();
        g.next_ts += 100;
        let n = g.next_ts;
        format!("{}.{:06}", n / 1_000_000, n % 1_000_000)
    }
}

fn scripted(s: Script) -> Response {
    match s {
        Script::RateLimited { retry_after_s } => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", retry_after_s.to_string())],
            Json(json!({"ok": false, "error": "ratelimited"})),
        )
            .into_response(),
        Script::Error(code) => Json(json!({"ok": false, "error": code})).into_response(),
    }
}

async fn api(
    State(fake): State<FakeSlack>,
    Path(method): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let json: Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
        // Form-encoded calls are recorded as an object of their fields.
        let pairs: Vec<(String, String)> = url_pairs(&body);
        Value::Object(
            pairs
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        )
    });
    if let Some(s) = fake.record(&method, None, &h, json.clone()) {
        return scripted(s);
    }
    let auth = h.get("authorization").and_then(|v| v.to_str().ok());
    if method == "apps.connections.open" {
        return connections_open(&fake, auth);
    }
    match auth {
        None => return Json(json!({"ok": false, "error": "not_authed"})).into_response(),
        Some(a) if a != format!("Bearer {}", fake.token) => {
            return Json(json!({"ok": false, "error": "invalid_auth"})).into_response()
        }
        _ => {}
    }
    let channel = json["channel"].clone();
    if !channel.is_string() {
        return Json(json!({"ok": false, "error": "channel_not_found"})).into_response();
    }
    match method.as_str() {
        "chat.postMessage" => {
            let ts = fake.next_ts();
            fake.inner
                .lock()
                .unwrap()
                .posted
                .push((json.clone(), ts.clone()));
            Json(json!({
                "ok": true, "channel": channel, "ts": ts,
                "message": {"type": "message", "subtype": "bot_message", "bot_id": "B0FAKE",
                            "text": json["text"], "ts": ts, "blocks": json["blocks"]}
            }))
            .into_response()
        }
        "chat.update" => Json(json!({
            "ok": true, "channel": channel, "ts": json["ts"], "text": json["text"],
            "message": {"text": json["text"], "user": "U0FLOTILLA", "blocks": json["blocks"]}
        }))
        .into_response(),
        "chat.postEphemeral" => {
            Json(json!({"ok": true, "message_ts": fake.next_ts()})).into_response()
        }
        _ => Json(json!({"ok": false, "error": "unknown_method"})).into_response(),
    }
}

/// `apps.connections.open`: only an app-level token may open a connection.
fn connections_open(fake: &FakeSlack, auth: Option<&str>) -> Response {
    let app = fake.inner.lock().unwrap().app_token.clone();
    let Some(given) = auth.and_then(|a| a.strip_prefix("Bearer ")) else {
        return Json(json!({"ok": false, "error": "not_authed"})).into_response();
    };
    if given == fake.token {
        return Json(json!({"ok": false, "error": "not_allowed_token_type"})).into_response();
    }
    if app.as_deref() != Some(given) {
        return Json(json!({"ok": false, "error": "invalid_auth"})).into_response();
    }
    let ticket = uuid::Uuid::new_v4().to_string();
    fake.inner
        .lock()
        .unwrap()
        .tickets
        .insert(ticket.clone(), false);
    Json(json!({
        "ok": true,
        "url": format!("ws://{}/link/?ticket={ticket}&app_id=A0FLOTILLA", fake.addr)
    }))
    .into_response()
}

/// GET Web API methods (slack-morphism calls `users.info` with query parameters).
async fn api_get(
    State(fake): State<FakeSlack>,
    Path(method): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
) -> Response {
    let args = Value::Object(q.into_iter().map(|(k, v)| (k, Value::String(v))).collect());
    if let Some(s) = fake.record(&method, None, &h, args.clone()) {
        return scripted(s);
    }
    let auth = h.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(format!("Bearer {}", fake.token).as_str()) {
        return Json(json!({"ok": false, "error": "invalid_auth"})).into_response();
    }
    if method != "users.info" {
        return Json(json!({"ok": false, "error": "unknown_method"})).into_response();
    }
    let id = args["user"].as_str().unwrap_or_default();
    let user = fake.inner.lock().unwrap().users.get(id).cloned();
    match user {
        // Shaped as the users.info reference page's example.
        Some((name, display, real)) => Json(json!({
            "ok": true,
            "user": {
                "id": id, "team_id": "T1", "name": name, "deleted": false,
                "real_name": real, "tz": "Europe/Amsterdam", "tz_offset": 3600,
                "profile": {"real_name": real, "display_name": display,
                            "real_name_normalized": real, "display_name_normalized": display,
                            "team": "T1"},
                "is_admin": false, "is_owner": false, "is_bot": false, "updated": 1502138686
            }
        }))
        .into_response(),
        None => Json(json!({"ok": false, "error": "user_not_found"})).into_response(),
    }
}

/// The Socket Mode WebSocket: one use per ticket.
async fn link(
    State(fake): State<FakeSlack>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let ticket = q.get("ticket").cloned().unwrap_or_default();
    {
        let mut g = fake.inner.lock().unwrap();
        match g.tickets.get_mut(&ticket) {
            Some(used) if !*used => *used = true,
            _ => return (StatusCode::UNAUTHORIZED, "invalid ticket").into_response(),
        }
    }
    ws.on_upgrade(move |socket| connection(fake, socket))
}

async fn connection(fake: FakeSlack, mut socket: WebSocket) {
    use futures_util::{SinkExt, StreamExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let index = {
        let mut g = fake.inner.lock().unwrap();
        g.conns.push(Conn { tx, open: true });
        g.conns.len() - 1
    };
    let open = fake.sockets_open();
    let hello = json!({
        "type": "hello", "num_connections": open,
        "debug_info": {"host": "applink-fake", "build_number": 10,
                       "approximate_connection_time": 18060},
        "connection_info": {"app_id": "A0FLOTILLA"}
    });
    if socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    fake.notify.notify_waiters();
    let (mut sink, mut stream) = socket.split();
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(m) => {
                    let close = matches!(m, Message::Close(_));
                    if sink.send(m).await.is_err() || close {
                        break;
                    }
                }
                None => break,
            },
            inbound = stream.next() => match inbound {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    if let Some(id) = v["envelope_id"].as_str() {
                        fake.inner.lock().unwrap().acks.push(Ack {
                            envelope_id: id.to_string(),
                            payload: v.get("payload").cloned(),
                            connection: index,
                            at: Instant::now(),
                        });
                        fake.notify.notify_waiters();
                    }
                }
                Some(Ok(Message::Ping(p))) => {
                    if sink.send(Message::Pong(p)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
    }
    fake.inner.lock().unwrap().conns[index].open = false;
    fake.notify.notify_waiters();
}

/// A Socket Mode `events_api` envelope around an Events API body.
pub fn events_api_envelope(envelope_id: &str, body: &str, retry_attempt: u32) -> Value {
    json!({
        "payload": serde_json::from_str::<Value>(body).unwrap(),
        "envelope_id": envelope_id, "type": "events_api",
        "accepts_response_payload": false,
        "retry_attempt": retry_attempt,
        "retry_reason": if retry_attempt > 0 { "timeout" } else { "" }
    })
}

/// A Socket Mode `slash_commands` envelope (the command's fields as a JSON object).
pub fn slash_commands_envelope(envelope_id: &str, fake: &FakeSlack, c: &SlashCommand<'_>) -> Value {
    let mut payload: serde_json::Map<String, Value> = url_pairs(c.body(fake).as_bytes())
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    payload.insert("is_enterprise_install".into(), "false".into());
    json!({
        "payload": payload, "envelope_id": envelope_id, "type": "slash_commands",
        "accepts_response_payload": true
    })
}

/// A Socket Mode `interactive` envelope around an interaction payload.
pub fn interactive_envelope(envelope_id: &str, payload: &Value) -> Value {
    json!({
        "payload": payload, "envelope_id": envelope_id, "type": "interactive",
        "accepts_response_payload": false
    })
}

async fn respond(
    State(fake): State<FakeSlack>,
    Path(id): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Some(s) = fake.record("response_url", Some(id), &h, json) {
        return scripted(s);
    }
    Json(json!({"ok": true})).into_response()
}

fn url_pairs(body: &[u8]) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{}", String::from_utf8_lossy(body)))
        .map(|u| {
            u.query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Sends requests to the gateway's chat listener signed as Slack signs them.
#[derive(Clone)]
pub struct SlackSigner {
    secret: String,
    base: String,
    http: reqwest::Client,
}

/// What the gateway answered.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub elapsed: Duration,
}

impl SlackSigner {
    /// `base`: the chat listener, e.g. `http://127.0.0.1:1234`.
    pub fn new(secret: &str, base: &str) -> SlackSigner {
        SlackSigner {
            secret: secret.to_string(),
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
        }
    }

    /// `v0=` + hex HMAC-SHA256 of `v0:{ts}:{body}`.
    pub fn sign(&self, ts: &str, body: &[u8]) -> String {
        sign(&self.secret, ts, body)
    }

    /// Now, as Slack's `X-Slack-Request-Timestamp`.
    pub fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    /// POSTs `body` to `path` with the given timestamp, signature and extra headers.
    pub async fn send_raw(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
        ts: &str,
        signature: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .header("x-slack-request-timestamp", ts)
            .body(body.to_vec());
        if let Some(s) = signature {
            req = req.header("x-slack-signature", s);
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let start = Instant::now();
        let resp = req.send().await.expect("the chat listener answers");
        let elapsed = start.elapsed();
        Answer {
            status: resp.status().as_u16(),
            body: resp.text().await.unwrap_or_default(),
            elapsed,
        }
    }

    /// A correctly signed request, now.
    pub async fn send(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
        extra: &[(&str, &str)],
    ) -> Answer {
        let ts = Self::now().to_string();
        let sig = self.sign(&ts, body);
        self.send_raw(path, content_type, body, &ts, Some(&sig), extra)
            .await
    }

    /// A slash command (`/flotilla <text>`) as Slack posts it.
    pub async fn command(&self, fake: &FakeSlack, c: &SlashCommand<'_>) -> Answer {
        let body = c.body(fake);
        self.send("/chat/slack/commands", FORM, body.as_bytes(), &[])
            .await
    }

    /// An Events API callback around `event` (JSON), with `event_id`.
    pub async fn event(
        &self,
        team: &str,
        event_id: &str,
        event: Value,
        extra: &[(&str, &str)],
    ) -> Answer {
        let body = event_body(team, event_id, event);
        self.send(
            "/chat/slack/events",
            "application/json",
            body.as_bytes(),
            extra,
        )
        .await
    }

    /// A `block_actions` interaction (the JSON payload in the `payload` form field).
    pub async fn interaction(&self, payload: &Value) -> Answer {
        let body = interaction_body(payload);
        self.send("/chat/slack/interactions", FORM, body.as_bytes(), &[])
            .await
    }
}

/// Slack's form content type.
pub const FORM: &str = "application/x-www-form-urlencoded";

/// `v0=` + hex HMAC-SHA256 of `v0:{ts}:{body}` keyed with `secret`.
pub fn sign(secret: &str, ts: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{ts}:").as_bytes());
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    format!(
        "v0={}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// The fields of a slash command request.
pub struct SlashCommand<'a> {
    pub team: &'a str,
    pub channel: &'a str,
    pub user: &'a str,
    pub user_name: &'a str,
    pub text: &'a str,
    pub trigger_id: &'a str,
}

impl SlashCommand<'_> {
    /// The form body, as in Slack's "Implementing slash commands" example.
    pub fn body(&self, fake: &FakeSlack) -> String {
        let pairs = [
            ("token", "gIkuvaNzQIHg97ATvDxqgjtO"),
            ("team_id", self.team),
            ("team_domain", "example"),
            ("channel_id", self.channel),
            ("channel_name", "ops"),
            ("user_id", self.user),
            ("user_name", self.user_name),
            ("command", "/flotilla"),
            ("text", self.text),
            ("api_app_id", "A0FLOTILLA"),
            ("response_url", &fake.response_url(self.trigger_id)),
            ("trigger_id", self.trigger_id),
        ];
        form(&pairs)
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut u = reqwest::Url::parse("http://x/").unwrap();
    u.query_pairs_mut().extend_pairs(pairs);
    u.query().unwrap_or("").to_string()
}

/// An Events API `event_callback` body (Slack's documented envelope).
pub fn event_body(team: &str, event_id: &str, event: Value) -> String {
    json!({
        "token": "XXYYZZ", "team_id": team, "api_app_id": "A0FLOTILLA",
        "event": event, "type": "event_callback", "event_id": event_id,
        "event_time": SlackSigner::now(),
        "authorizations": [{"team_id": team, "user_id": "U0FLOTILLA", "is_bot": true}]
    })
    .to_string()
}

/// The form body of an interaction.
pub fn interaction_body(payload: &Value) -> String {
    form(&[("payload", &payload.to_string())])
}

/// A button click, as the fields of a `block_actions` payload.
pub struct Click<'a> {
    pub team: &'a str,
    pub channel: &'a str,
    /// `(id, username)`.
    pub user: (&'a str, &'a str),
    /// The message the button is on.
    pub message_ts: &'a str,
    pub thread_ts: Option<&'a str>,
    pub action_id: &'a str,
    pub value: &'a str,
    pub trigger_id: &'a str,
}

impl Click<'_> {
    /// The payload as Slack's "block_actions payloads" page shapes it.
    pub fn payload(&self, fake: &FakeSlack) -> Value {
        let (team, channel) = (self.team, self.channel);
        json!({
            "type": "block_actions",
            "team": {"id": team, "domain": "example"},
            "user": {"id": self.user.0, "username": self.user.1, "name": self.user.1, "team_id": team},
            "api_app_id": "A0FLOTILLA",
            "token": "9s8d9as89d8as9d8as989",
            "container": {"type": "message", "message_ts": self.message_ts, "channel_id": channel,
                          "is_ephemeral": false, "thread_ts": self.thread_ts},
            "trigger_id": self.trigger_id,
            "channel": {"id": channel, "name": "ops"},
            "message": {"type": "message", "bot_id": "B0FAKE", "ts": self.message_ts,
                        "thread_ts": self.thread_ts},
            "response_url": fake.response_url(self.trigger_id),
            "actions": [{"action_id": self.action_id, "block_id": "b1",
                         "text": {"type": "plain_text", "text": "x"}, "value": self.value,
                         "type": "button", "action_ts": "1548426417.840180"}]
        })
    }
}
