//! A fake of the parts of Discord the chat gateway talks to, for tests on loopback: the REST
//! API routes it calls, recording every call, and [`DiscordSigner`], which sends interactions
//! to the gateway signed exactly as Discord signs them.
//!
//! Routes and answers follow Discord's API v10 reference: `POST /channels/{id}/messages`
//! (bot token, `Authorization: Bot …`; answers the message object with a new snowflake `id`),
//! `PATCH /channels/{id}/messages/{id}` (bot; unknown message → 404 code 10008), the
//! interaction webhook `PATCH /webhooks/{app}/{token}/messages/@original`, `POST
//! /webhooks/{app}/{token}` (follow-up; `?wait=true` answers the message), `DELETE …/@original`
//! (204) — a token the fake did not issue in an interaction, or another application's id, is
//! 404 "Unknown Webhook" (code 10015) — and the bulk overwrite `PUT
//! /applications/{app}[/guilds/{guild}]/commands`, which replaces the set and keeps a
//! command's id when its name is unchanged. A missing or wrong bot token is 401.
//!
//! `GET /gateway/bot` (bot token) names the Gateway's URL; [`FakeGateway`] is that Gateway
//! (HELLO, IDENTIFY/READY, RESUME/RESUMED, heartbeats and ACKs, dispatches, RECONNECT,
//! INVALID_SESSION, closes), on a port of its own.
//!
//! The signature is Ed25519 over `timestamp + body` ("Receiving and Responding: security and
//! authorization"), made with ring from a test seed, independently of the gateway's verifier.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::{Json, Router};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{json, Value};

/// One call the gateway made.
#[derive(Debug, Clone)]
pub struct Call {
    /// `create_message`, `edit_message`, `edit_original`, `followup`, `delete_original`,
    /// `commands`, `gateway_bot`.
    pub route: &'static str,
    /// The channel, guild (`commands`: `global` when none) or interaction token's interaction id.
    pub target: String,
    /// The message id edited (`edit_message`) or created (`create_message`, `followup`).
    pub message: Option<String>,
    pub body: Value,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Inner {
    calls: Vec<Call>,
    next_id: u64,
    /// Interaction token → interaction id.
    tokens: HashMap<String, String>,
    /// Message ids that exist (posted by the bot or answered to interactions).
    messages: HashSet<String>,
    /// Registered commands per scope (`global` or a guild id): name → (id, definition).
    commands: HashMap<String, Vec<(String, Value)>>,
}

/// The fake Discord, serving on a loopback port until dropped with the runtime.
#[derive(Clone)]
pub struct FakeDiscord {
    pub addr: SocketAddr,
    pub application_id: String,
    bot_token: String,
    inner: Arc<Mutex<Inner>>,
    notify: Arc<tokio::sync::Notify>,
    /// What `GET /gateway/bot` answers (a [`FakeGateway`]'s URL once set).
    gateway: Arc<Mutex<String>>,
}

fn discord_error(status: StatusCode, code: u64, message: &str) -> Response {
    (status, Json(json!({"message": message, "code": code}))).into_response()
}

impl FakeDiscord {
    /// Starts a fake Discord for application `application_id` with bot token `bot_token`.
    pub async fn start(application_id: &str, bot_token: &str) -> FakeDiscord {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeDiscord {
            addr: listener.local_addr().unwrap(),
            application_id: application_id.to_string(),
            bot_token: bot_token.to_string(),
            inner: Arc::new(Mutex::new(Inner {
                next_id: 1_300_000_000_000_000_000,
                ..Default::default()
            })),
            notify: Arc::new(tokio::sync::Notify::new()),
            gateway: Arc::new(Mutex::new("wss://gateway.discord.gg".into())),
        };
        let app = Router::new()
            .route("/api/v10/gateway/bot", get(gateway_bot))
            .route("/api/v10/channels/{channel}/messages", post(create_message))
            .route(
                "/api/v10/channels/{channel}/messages/{id}",
                patch(edit_message),
            )
            .route("/api/v10/webhooks/{app}/{token}", post(followup))
            .route(
                "/api/v10/webhooks/{app}/{token}/messages/{which}",
                patch(webhook_message).delete(webhook_message),
            )
            .route("/api/v10/applications/{app}/commands", put(global_commands))
            .route(
                "/api/v10/applications/{app}/guilds/{guild}/commands",
                put(guild_commands),
            )
            .with_state(fake.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        fake
    }

    /// Makes `GET /gateway/bot` name `url` (a [`FakeGateway`]).
    pub fn set_gateway(&self, url: &str) {
        *self.gateway.lock().unwrap() = url.to_string();
    }

    /// The REST base URL to configure (`chat.discord.api_url`).
    pub fn api_url(&self) -> String {
        format!("http://{}/api/v10", self.addr)
    }

    fn snowflake(g: &mut Inner) -> String {
        g.next_id += 1;
        g.next_id.to_string()
    }

    /// A new interaction: its id and token (the token is then accepted by the webhook).
    pub fn new_interaction(&self) -> (String, String) {
        let mut g = self.inner.lock().unwrap();
        let id = Self::snowflake(&mut g);
        let token = format!("aW50ZXJhY3Rpb246{id}:tok");
        g.tokens.insert(token.clone(), id.clone());
        (id, token)
    }

    /// A message the bot posted earlier (e.g. the preview a slash command answered with),
    /// known to the fake so it can be edited; its id.
    pub fn new_message(&self) -> String {
        let mut g = self.inner.lock().unwrap();
        let id = Self::snowflake(&mut g);
        g.messages.insert(id.clone());
        id
    }

    /// Every call so far, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// Calls of one route.
    pub fn calls_of(&self, route: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.route == route)
            .collect()
    }

    /// The commands registered in `scope` (a guild id, or `global`).
    pub fn commands(&self, scope: &str) -> Vec<(String, Value)> {
        self.inner
            .lock()
            .unwrap()
            .commands
            .get(scope)
            .cloned()
            .unwrap_or_default()
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
                    "timed out waiting for {what}; Discord got: {:#?}",
                    calls
                        .iter()
                        .map(|c| (c.route, &c.target, &c.body))
                        .collect::<Vec<_>>()
                );
                return;
            }
        }
    }

    fn record(
        &self,
        route: &'static str,
        target: &str,
        message: Option<&str>,
        h: &HeaderMap,
        body: Value,
    ) {
        self.inner.lock().unwrap().calls.push(Call {
            route,
            target: target.to_string(),
            message: message.map(str::to_string),
            body,
            authorization: h
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        });
        self.notify.notify_waiters();
    }

    fn bot_ok(&self, h: &HeaderMap) -> bool {
        h.get("authorization").and_then(|v| v.to_str().ok())
            == Some(format!("Bot {}", self.bot_token).as_str())
    }

    /// The interaction a webhook token belongs to, if the fake issued it for this application.
    fn interaction_of(&self, app: &str, token: &str) -> Option<String> {
        if app != self.application_id {
            return None;
        }
        self.inner.lock().unwrap().tokens.get(token).cloned()
    }
}

fn json_body(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

fn message(id: &str, channel: &str, body: &Value) -> Value {
    json!({"id": id, "channel_id": channel, "type": 0, "content": body["content"],
        "embeds": body["embeds"], "components": body["components"]})
}

async fn gateway_bot(State(f): State<FakeDiscord>, h: HeaderMap) -> Response {
    f.record("gateway_bot", "", None, &h, Value::Null);
    if !f.bot_ok(&h) {
        return discord_error(StatusCode::UNAUTHORIZED, 0, "401: Unauthorized");
    }
    let url = f.gateway.lock().unwrap().clone();
    Json(json!({"url": url, "shards": 1, "session_start_limit":
        {"total": 1000, "remaining": 999, "reset_after": 14400000, "max_concurrency": 1}}))
    .into_response()
}

async fn create_message(
    State(f): State<FakeDiscord>,
    Path(channel): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let body = json_body(&body);
    if !f.bot_ok(&h) {
        f.record("create_message", &channel, None, &h, body);
        return discord_error(StatusCode::UNAUTHORIZED, 0, "401: Unauthorized");
    }
    let id = {
        let mut g = f.inner.lock().unwrap();
        let id = FakeDiscord::snowflake(&mut g);
        g.messages.insert(id.clone());
        id
    };
    f.record("create_message", &channel, Some(&id), &h, body.clone());
    Json(message(&id, &channel, &body)).into_response()
}

async fn edit_message(
    State(f): State<FakeDiscord>,
    Path((channel, id)): Path<(String, String)>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let body = json_body(&body);
    f.record("edit_message", &channel, Some(&id), &h, body.clone());
    if !f.bot_ok(&h) {
        return discord_error(StatusCode::UNAUTHORIZED, 0, "401: Unauthorized");
    }
    if !f.inner.lock().unwrap().messages.contains(&id) {
        return discord_error(StatusCode::NOT_FOUND, 10008, "Unknown Message");
    }
    Json(message(&id, &channel, &body)).into_response()
}

async fn followup(
    State(f): State<FakeDiscord>,
    Path((app, token)): Path<(String, String)>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let body = json_body(&body);
    let Some(interaction) = f.interaction_of(&app, &token) else {
        f.record("followup", "unknown", None, &h, body);
        return discord_error(StatusCode::NOT_FOUND, 10015, "Unknown Webhook");
    };
    let id = {
        let mut g = f.inner.lock().unwrap();
        let id = FakeDiscord::snowflake(&mut g);
        g.messages.insert(id.clone());
        id
    };
    f.record("followup", &interaction, Some(&id), &h, body.clone());
    Json(message(&id, "", &body)).into_response()
}

async fn webhook_message(
    State(f): State<FakeDiscord>,
    Path((app, token, which)): Path<(String, String, String)>,
    method: Method,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let body = json_body(&body);
    let route = if method == Method::DELETE {
        "delete_original"
    } else {
        "edit_original"
    };
    let Some(interaction) = f
        .interaction_of(&app, &token)
        .filter(|_| which == "@original")
    else {
        f.record(route, "unknown", None, &h, body);
        return discord_error(StatusCode::NOT_FOUND, 10015, "Unknown Webhook");
    };
    f.record(route, &interaction, None, &h, body.clone());
    if method == Method::DELETE {
        return StatusCode::NO_CONTENT.into_response();
    }
    Json(message(&interaction, "", &body)).into_response()
}

async fn global_commands(
    State(f): State<FakeDiscord>,
    Path(app): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    overwrite(&f, &app, "global", &h, json_body(&body))
}

async fn guild_commands(
    State(f): State<FakeDiscord>,
    Path((app, guild)): Path<(String, String)>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    overwrite(&f, &app, &guild, &h, json_body(&body))
}

fn overwrite(f: &FakeDiscord, app: &str, scope: &str, h: &HeaderMap, body: Value) -> Response {
    f.record("commands", scope, None, h, body.clone());
    if !f.bot_ok(h) {
        return discord_error(StatusCode::UNAUTHORIZED, 0, "401: Unauthorized");
    }
    if app != f.application_id {
        return discord_error(StatusCode::FORBIDDEN, 50001, "Missing Access");
    }
    let Some(list) = body.as_array() else {
        return discord_error(StatusCode::BAD_REQUEST, 50035, "Invalid Form Body");
    };
    let mut g = f.inner.lock().unwrap();
    let old = g.commands.get(scope).cloned().unwrap_or_default();
    let mut new = Vec::new();
    for c in list {
        let name = c["name"].as_str().unwrap_or_default().to_string();
        if name.is_empty() || c["description"].as_str().is_none() {
            return discord_error(StatusCode::BAD_REQUEST, 50035, "Invalid Form Body");
        }
        let id = old
            .iter()
            .find(|(_, d)| d["name"] == name.as_str())
            .map(|(id, _)| id.clone())
            .unwrap_or_else(|| FakeDiscord::snowflake(&mut g));
        new.push((id, c.clone()));
    }
    let answer: Vec<Value> = new
        .iter()
        .map(|(id, d)| {
            let mut d = d.clone();
            d["id"] = json!(id);
            d["application_id"] = json!(f.application_id);
            d
        })
        .collect();
    g.commands.insert(scope.to_string(), new);
    Json(answer).into_response()
}

/// Sends interactions to the gateway signed as Discord signs them.
pub struct DiscordSigner {
    key: Ed25519KeyPair,
    url: String,
    http: reqwest::Client,
}

/// The gateway's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub text: String,
    pub json: Value,
}

pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl DiscordSigner {
    /// A signer with the Ed25519 key from `seed`, posting to `base` + `/chat/discord/interactions`.
    pub fn new(seed: [u8; 32], base: &str) -> DiscordSigner {
        DiscordSigner {
            key: Ed25519KeyPair::from_seed_unchecked(&seed).expect("a 32-byte seed"),
            url: format!("{base}/chat/discord/interactions"),
            http: reqwest::Client::new(),
        }
    }

    /// The application public key, as the Developer Portal shows it (hex).
    pub fn public_key_hex(&self) -> String {
        public_key_hex(&self.key)
    }

    /// The hex signature of `timestamp + body`.
    pub fn sign(&self, timestamp: &str, body: &[u8]) -> String {
        let msg = [timestamp.as_bytes(), body].concat();
        self.key
            .sign(&msg)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Posts `body` signed now.
    pub async fn send(&self, body: &Value) -> Answer {
        let raw = body.to_string();
        let ts = now_s().to_string();
        let sig = self.sign(&ts, raw.as_bytes());
        self.send_raw(raw.as_bytes(), Some(&ts), Some(&sig)).await
    }

    /// Posts raw bytes with the given headers (absent when `None`).
    pub async fn send_raw(&self, body: &[u8], ts: Option<&str>, sig: Option<&str>) -> Answer {
        let mut req = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(ts) = ts {
            req = req.header("x-signature-timestamp", ts);
        }
        if let Some(sig) = sig {
            req = req.header("x-signature-ed25519", sig);
        }
        let resp = req.send().await.expect("the gateway answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer { status, text, json }
    }
}

/// The public key of `key` in hex.
pub fn public_key_hex(key: &Ed25519KeyPair) -> String {
    key.public_key()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A guild member as interactions carry them.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    pub guild: &'a str,
    pub channel: &'a str,
    pub user: &'a str,
    pub name: &'a str,
    pub roles: &'a [&'a str],
}

impl Member<'_> {
    fn base(&self, fake: &FakeDiscord, kind: u64) -> Value {
        let (id, token) = fake.new_interaction();
        json!({
            "id": id, "application_id": fake.application_id, "type": kind, "token": token,
            "version": 1, "guild_id": self.guild, "channel_id": self.channel,
            "channel": {"id": self.channel, "type": 0},
            "member": {"user": {"id": self.user, "username": self.name.to_lowercase(),
                                "global_name": self.name, "discriminator": "0"},
                       "roles": self.roles, "permissions": "0", "nick": null},
            "locale": "en-GB", "guild_locale": "en-US",
            "app_permissions": "0", "entitlements": [], "authorizing_integration_owners": {},
        })
    }

    /// `/flotilla <sub> [options]` (options as name → string value).
    pub fn command(&self, fake: &FakeDiscord, sub: &str, opts: &[(&str, &str)]) -> Value {
        let mut v = self.base(fake, 2);
        let options: Vec<Value> = opts
            .iter()
            .map(|(n, val)| json!({"name": n, "type": 3, "value": val}))
            .collect();
        v["data"] = json!({"id": "1200000000000000001", "name": "flotilla", "type": 1,
            "options": [{"name": sub, "type": 1, "options": options}]});
        v
    }

    /// A click on the button `custom_id` of message `message_id`.
    pub fn click(&self, fake: &FakeDiscord, message_id: &str, custom_id: &str) -> Value {
        let mut v = self.base(fake, 3);
        v["message"] = json!({"id": message_id, "channel_id": self.channel, "type": 0,
            "author": {"id": fake.application_id, "bot": true}});
        v["data"] = json!({"custom_id": custom_id, "component_type": 2});
        v
    }
}

/// The `custom_id`s of the buttons in a message body (as rendered by the gateway).
pub fn custom_ids(message: &Value) -> Vec<String> {
    message["components"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|row| row["components"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["custom_id"].as_str().map(str::to_string))
        .collect()
}

/// A message body's text: its content and embeds, as one searchable string.
pub fn text_of(message: &Value) -> String {
    format!("{} {}", message["content"], message["embeds"])
}

/// A fake of Discord's Gateway (the bot's WebSocket), API v10 JSON encoding, on its own
/// loopback port: `HELLO` with a heartbeat interval on connect; `IDENTIFY` checked against the
/// bot token (else close 4004) and answered with `READY` (a new session id, a
/// `resume_gateway_url` on this fake's `/resume`, the bot user); `RESUME` of a session it
/// issued answered `RESUMED`, of another `INVALID_SESSION` (`d: false`); heartbeats `ACK`ed
/// unless told not to. Every frame the client sends is recorded with its connection; the test
/// pushes dispatches and opcodes to the newest connection.
#[derive(Clone)]
pub struct FakeGateway {
    pub addr: SocketAddr,
    bot_token: String,
    /// The bot's user id, in READY.
    pub bot_id: String,
    heartbeat_ms: u64,
    inner: Arc<Mutex<GwInner>>,
    notify: Arc<tokio::sync::Notify>,
}

/// One connection the client opened.
#[derive(Debug, Clone)]
pub struct GwConnection {
    /// Path and query it connected to (`/?v=10&encoding=json`, `/resume/?v=10&encoding=json`).
    pub uri: String,
}

/// One frame the client sent.
#[derive(Debug, Clone)]
pub struct GwFrame {
    /// Index into [`FakeGateway::connections`].
    pub conn: usize,
    pub op: u64,
    pub d: Value,
}

#[derive(Default)]
struct GwInner {
    connections: Vec<GwConnection>,
    frames: Vec<GwFrame>,
    current: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    seq: u64,
    sessions: HashSet<String>,
    next_session: u64,
    no_ack: bool,
}

impl FakeGateway {
    /// Starts the fake Gateway for a bot with `bot_token` and user id `bot_id`, asking for a
    /// heartbeat every `heartbeat_ms`.
    pub async fn start(bot_token: &str, bot_id: &str, heartbeat_ms: u64) -> FakeGateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = FakeGateway {
            addr: listener.local_addr().unwrap(),
            bot_token: bot_token.to_string(),
            bot_id: bot_id.to_string(),
            heartbeat_ms,
            inner: Arc::default(),
            notify: Arc::new(tokio::sync::Notify::new()),
        };
        let g = gw.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let g = g.clone();
                tokio::spawn(async move { g.serve(tcp).await });
            }
        });
        gw
    }

    /// The URL `GET /gateway/bot` answers with.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn connections(&self) -> Vec<GwConnection> {
        self.inner.lock().unwrap().connections.clone()
    }

    pub fn frames(&self) -> Vec<GwFrame> {
        self.inner.lock().unwrap().frames.clone()
    }

    /// Frames with opcode `op`.
    pub fn frames_of(&self, op: u64) -> Vec<GwFrame> {
        self.frames().into_iter().filter(|f| f.op == op).collect()
    }

    /// Stops (or resumes) acknowledging heartbeats: the client should see a zombie.
    pub fn set_ack(&self, ack: bool) {
        self.inner.lock().unwrap().no_ack = !ack;
    }

    /// Forgets every session: a RESUME is then answered INVALID_SESSION.
    pub fn forget_sessions(&self) {
        self.inner.lock().unwrap().sessions.clear();
    }

    /// Sends a raw payload on the newest connection.
    pub fn send(&self, payload: Value) {
        let g = self.inner.lock().unwrap();
        if let Some(tx) = &g.current {
            let _ = tx.send(payload.to_string());
        }
    }

    /// Dispatches event `t` with the next sequence number on the newest connection.
    pub fn dispatch(&self, t: &str, d: Value) {
        let mut g = self.inner.lock().unwrap();
        g.seq += 1;
        let payload = json!({"op": 0, "t": t, "s": g.seq, "d": d});
        if let Some(tx) = &g.current {
            let _ = tx.send(payload.to_string());
        }
    }

    /// The last sequence number dispatched.
    pub fn seq(&self) -> u64 {
        self.inner.lock().unwrap().seq
    }

    /// Waits until `pred` holds for the frames received; panics with them after `timeout`.
    pub async fn wait_for(&self, timeout: Duration, what: &str, pred: impl Fn(&[GwFrame]) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if pred(&self.frames()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let frames = self.frames();
                assert!(
                    pred(&frames),
                    "timed out waiting for {what}; frames: {frames:#?}"
                );
                return;
            }
        }
    }

    // tungstenite fixes the handshake callback's error type (an HTTP response).
    #[allow(clippy::result_large_err)]
    async fn serve(&self, tcp: tokio::net::TcpStream) {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let uri = Arc::new(Mutex::new(String::new()));
        let u2 = uri.clone();
        let cb = move |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
            *u2.lock().unwrap() = req.uri().to_string();
            Ok(resp)
        };
        let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else {
            return;
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let conn = {
            let mut g = self.inner.lock().unwrap();
            g.connections.push(GwConnection {
                uri: uri.lock().unwrap().clone(),
            });
            g.current = Some(tx.clone());
            g.connections.len() - 1
        };
        self.notify.notify_waiters();
        let hello = json!({"op": 10, "d": {"heartbeat_interval": self.heartbeat_ms}});
        if ws.send(Message::text(hello.to_string())).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                out = rx.recv() => {
                    let Some(out) = out else { return };
                    if let Some(code) = out.strip_prefix("close:") {
                        let code: u16 = code.parse().unwrap_or(1000);
                        let _ = ws.send(Message::Close(Some(
                            tokio_tungstenite::tungstenite::protocol::CloseFrame {
                                code: code.into(),
                                reason: "".into(),
                            }))).await;
                        return;
                    }
                    if ws.send(Message::text(out)).await.is_err() {
                        return;
                    }
                }
                m = ws.next() => {
                    let text = match m {
                        Some(Ok(Message::Text(t))) => t.to_string(),
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                        Some(Ok(_)) => continue,
                    };
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    let op = v["op"].as_u64().unwrap_or(u64::MAX);
                    self.inner.lock().unwrap().frames.push(GwFrame { conn, op, d: v["d"].clone() });
                    self.notify.notify_waiters();
                    self.answer(op, &v["d"], &tx);
                }
            }
        }
    }

    fn answer(&self, op: u64, d: &Value, tx: &tokio::sync::mpsc::UnboundedSender<String>) {
        let mut g = self.inner.lock().unwrap();
        match op {
            1 if !g.no_ack => {
                let _ = tx.send(json!({"op": 11}).to_string());
            }
            2 => {
                if d["token"].as_str() != Some(self.bot_token.as_str()) {
                    let _ = tx.send("close:4004".into());
                    return;
                }
                g.next_session += 1;
                let session = format!("session-{}", g.next_session);
                g.sessions.insert(session.clone());
                g.seq += 1;
                let ready = json!({"op": 0, "t": "READY", "s": g.seq, "d": {
                    "v": 10, "session_id": session,
                    "resume_gateway_url": format!("ws://{}/resume", self.addr),
                    "user": {"id": self.bot_id, "username": "flotilla", "bot": true},
                    "guilds": [], "application": {"id": "0", "flags": 0},
                }});
                let _ = tx.send(ready.to_string());
            }
            6 => {
                let known = d["session_id"]
                    .as_str()
                    .is_some_and(|s| g.sessions.contains(s))
                    && d["token"].as_str() == Some(self.bot_token.as_str());
                if known {
                    g.seq += 1;
                    let resumed = json!({"op": 0, "t": "RESUMED", "s": g.seq, "d": null});
                    let _ = tx.send(resumed.to_string());
                } else {
                    let _ = tx.send(json!({"op": 9, "d": false}).to_string());
                }
            }
            _ => {}
        }
    }

    /// Closes the newest connection with `code`.
    pub fn close(&self, code: u16) {
        let g = self.inner.lock().unwrap();
        if let Some(tx) = &g.current {
            let _ = tx.send(format!("close:{code}"));
        }
    }
}

#[cfg(test)]
mod self_test {
    use super::*;

    #[test]
    fn the_signer_signs_timestamp_then_body() {
        let s = DiscordSigner::new([1u8; 32], "http://127.0.0.1:1");
        let sig = s.sign("123", b"{}");
        let pk = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ED25519,
            (0..32)
                .map(|i| u8::from_str_radix(&s.public_key_hex()[2 * i..2 * i + 2], 16).unwrap())
                .collect::<Vec<u8>>(),
        );
        let bytes: Vec<u8> = (0..64)
            .map(|i| u8::from_str_radix(&sig[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        pk.verify(b"123{}", &bytes).unwrap();
        assert!(pk.verify(b"124{}", &bytes).is_err());
    }
}
