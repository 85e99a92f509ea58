//! A fake of the Microsoft side of a Teams bot, for tests on loopback: the Bot Framework
//! OpenID metadata and its JWKS (keys with `endorsements`, as login.botframework.com serves
//! them; a second key can be "rolled in"), the identity platform's client-credentials token
//! endpoint, and the Bot Connector API (replies, new messages and updates, recorded; calls
//! without a token the fake issued are answered 401). [`FakeTeams::token`] signs connector →
//! bot JWTs with the test keys under `tests/fixtures/teams/`, as the Bot Connector does
//! (RS256, `kid`, issuer `https://api.botframework.com`, audience = app id, `serviceUrl`).
//!
//! Shapes follow "Authentication with the Bot Connector API" (metadata, JWKS, token request
//! and response `{"token_type", "expires_in", "ext_expires_in", "access_token"}`) and the
//! Connector REST reference (`ResourceResponse` `{"id"}`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The issuer the Bot Connector signs with.
pub const ISSUER: &str = "https://api.botframework.com";
/// The test keys: `key1` served from the start, `key2` after [`FakeTeams::rotate`], `rogue`
/// never.
pub const KEY1: &str = "key1";
pub const KEY2: &str = "key2";
pub const ROGUE: &str = "rogue";

fn pem(name: &str) -> &'static str {
    match name {
        KEY1 => include_str!("../fixtures/teams/key1.pem"),
        KEY2 => include_str!("../fixtures/teams/key2.pem"),
        _ => include_str!("../fixtures/teams/rogue.pem"),
    }
}

fn jwk(name: &str) -> Value {
    let all: Value =
        serde_json::from_str(include_str!("../fixtures/teams/jwk.json")).expect("jwk.json is JSON");
    json!({
        "kty": "RSA", "use": "sig", "kid": name, "x5t": name,
        "n": all[name]["n"], "e": all[name]["e"],
        "endorsements": ["msteams", "webchat"],
    })
}

/// One Connector API call the bot made.
#[derive(Debug, Clone)]
pub struct ConnectorCall {
    /// `reply`, `post` or `update`.
    pub kind: String,
    pub conversation: String,
    /// The activity replied to (`reply`) or updated (`update`).
    pub activity: Option<String>,
    /// The id the fake gave the new activity (`reply`, `post`).
    pub id: Option<String>,
    pub body: Value,
}

#[derive(Default)]
struct Inner {
    rotated: bool,
    metadata_fetches: usize,
    jwks_fetches: usize,
    tokens: Vec<String>,
    token_requests: Vec<HashMap<String, String>>,
    calls: Vec<ConnectorCall>,
    next_id: u64,
}

/// The running fake.
#[derive(Clone)]
pub struct FakeTeams {
    pub addr: SocketAddr,
    pub app_id: String,
    pub app_password: String,
    inner: Arc<Mutex<Inner>>,
}

type S = State<FakeTeams>;

impl FakeTeams {
    /// Starts the fake for bot `app_id` with `app_password` on 127.0.0.1:0.
    pub async fn start(app_id: &str, app_password: &str) -> FakeTeams {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Teams");
        let fake = FakeTeams {
            addr: listener.local_addr().expect("address"),
            app_id: app_id.into(),
            app_password: app_password.into(),
            inner: Arc::default(),
        };
        let app = Router::new()
            .route("/v1/.well-known/openidconfiguration", get(metadata))
            .route("/v1/keys", get(keys))
            .route("/botframework.com/oauth2/v2.0/token", post(token))
            .route(
                "/amer/v3/conversations/{conv}/activities",
                post(new_message),
            )
            .route(
                "/amer/v3/conversations/{conv}/activities/{id}",
                post(reply).put(update),
            )
            .with_state(fake.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        fake
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The OpenID metadata URL (`chat.teams.openid_metadata_url`).
    pub fn metadata_url(&self) -> String {
        format!("{}/v1/.well-known/openidconfiguration", self.base())
    }

    /// The token endpoint (`chat.teams.token_url`).
    pub fn token_url(&self) -> String {
        format!("{}/botframework.com/oauth2/v2.0/token", self.base())
    }

    /// The `serviceUrl` activities carry (with Teams' trailing slash).
    pub fn service_url(&self) -> String {
        format!("{}/amer/", self.base())
    }

    /// Rolls `key2` into the JWKS (beside `key1`).
    pub fn rotate(&self) {
        self.lock().rotated = true;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How often the metadata and the JWKS were fetched.
    pub fn key_fetches(&self) -> (usize, usize) {
        let i = self.lock();
        (i.metadata_fetches, i.jwks_fetches)
    }

    /// The token requests received (form fields).
    pub fn token_requests(&self) -> Vec<HashMap<String, String>> {
        self.lock().token_requests.clone()
    }

    /// Every Connector call so far.
    pub fn calls(&self) -> Vec<ConnectorCall> {
        self.lock().calls.clone()
    }

    /// Waits (up to `secs`) until `pred` holds for the calls; returns them.
    pub async fn wait_calls(
        &self,
        secs: u64,
        pred: impl Fn(&[ConnectorCall]) -> bool,
    ) -> Vec<ConnectorCall> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let calls = self.calls();
            if pred(&calls) {
                return calls;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "the expected Connector calls did not come within {secs} s; got:\n{}",
                    calls
                        .iter()
                        .map(|c| format!(
                            "{} {} {:?} {}",
                            c.kind, c.conversation, c.activity, c.body
                        ))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The claims of a good token for an activity from `service_url`.
    pub fn claims(&self, service_url: &str) -> Value {
        let now = now_s();
        json!({
            "iss": ISSUER,
            "aud": self.app_id,
            "nbf": now - 10,
            "iat": now - 10,
            "exp": now + 3600,
            "serviceUrl": service_url,
        })
    }

    /// A JWT over `claims`, signed with test key `key` and naming `kid`.
    pub fn sign(key: &str, kid: &str, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid.to_string());
        h.typ = Some("JWT".into());
        let k = EncodingKey::from_rsa_pem(pem(key).as_bytes()).expect("test key");
        encode(&h, claims, &k).expect("sign")
    }

    /// `Bearer <good token>` for an activity from this fake's service URL, signed with `key1`.
    pub fn bearer(&self) -> String {
        format!(
            "Bearer {}",
            Self::sign(KEY1, KEY1, &self.claims(&self.service_url()))
        )
    }

    /// A message activity as Teams sends it. `kind`: `personal`, `groupChat` or `channel`.
    pub fn message(&self, kind: &str, id: &str, user: (&str, &str), text: &str) -> Value {
        let (aad, name) = user;
        let conv = match kind {
            // A new post in a channel: the conversation id names its thread (the post).
            "channel" => format!("19:ops@thread.tacv2;messageid={id}"),
            "groupChat" => "19:group-1@thread.v2".to_string(),
            _ => format!("a:1personal-{aad}"),
        };
        let mention = "<at>Flotilla</at>";
        let (text, entities) = if kind == "personal" {
            (text.to_string(), json!([]))
        } else {
            (
                format!("{mention} {text}"),
                json!([{"type": "mention", "text": mention,
                        "mentioned": {"id": format!("28:{}", self.app_id), "name": "Flotilla"}}]),
            )
        };
        json!({
            "type": "message",
            "id": id,
            "timestamp": "2026-12-05T09:00:00.000Z",
            "serviceUrl": self.service_url(),
            "channelId": "msteams",
            "from": {"id": format!("29:{aad}"), "name": name, "aadObjectId": aad},
            "conversation": {
                "id": conv, "conversationType": kind, "tenantId": "tenant-1",
                "isGroup": kind != "personal",
            },
            "recipient": {"id": format!("28:{}", self.app_id), "name": "Flotilla"},
            "textFormat": "plain",
            "text": text,
            "entities": entities,
            "channelData": {"tenant": {"id": "tenant-1"}},
        })
    }

    /// An `Action.Submit` from a card: a message activity with the card's `data` as `value`,
    /// replying to the card's activity id, in conversation `conversation` (as Teams gave it).
    pub fn submit(
        &self,
        id: &str,
        user: (&str, &str),
        conversation: &str,
        card_id: &str,
        data: &Value,
    ) -> Value {
        let kind = if conversation.starts_with("a:") {
            "personal"
        } else {
            "channel"
        };
        json!({
            "type": "message",
            "id": id,
            "serviceUrl": self.service_url(),
            "channelId": "msteams",
            "from": {"id": format!("29:{}", user.0), "name": user.1, "aadObjectId": user.0},
            "conversation": {"id": conversation, "conversationType": kind, "tenantId": "tenant-1"},
            "recipient": {"id": format!("28:{}", self.app_id), "name": "Flotilla"},
            "replyToId": card_id,
            "value": data,
            "channelData": {"tenant": {"id": "tenant-1"}, "source": {"name": "message"}},
        })
    }
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn metadata(State(f): S) -> Json<Value> {
    f.lock().metadata_fetches += 1;
    Json(json!({
        "issuer": ISSUER,
        "authorization_endpoint": "https://invalid.botframework.com",
        "jwks_uri": format!("{}/v1/keys", f.base()),
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
    }))
}

async fn keys(State(f): S) -> Json<Value> {
    let mut i = f.lock();
    i.jwks_fetches += 1;
    let mut keys = vec![jwk(KEY1)];
    if i.rotated {
        keys.push(jwk(KEY2));
    }
    Json(json!({ "keys": keys }))
}

async fn token(State(f): S, Form(form): Form<HashMap<String, String>>) -> Response {
    let mut i = f.lock();
    i.token_requests.push(form.clone());
    let get = |k: &str| form.get(k).map(String::as_str);
    if get("grant_type") != Some("client_credentials")
        || get("scope") != Some("https://api.botframework.com/.default")
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_request"})),
        )
            .into_response();
    }
    if get("client_id") != Some(f.app_id.as_str())
        || get("client_secret") != Some(f.app_password.as_str())
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let t = format!("bf-token-{}", i.tokens.len() + 1);
    i.tokens.push(t.clone());
    Json(json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": t}))
        .into_response()
}

fn authorised(f: &FakeTeams, h: &HeaderMap) -> bool {
    let t = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    t.is_some_and(|t| f.lock().tokens.iter().any(|x| x == t))
}

fn record(
    f: &FakeTeams,
    kind: &str,
    conv: String,
    activity: Option<String>,
    body: Value,
) -> Response {
    let mut i = f.lock();
    let id = (kind != "update").then(|| {
        i.next_id += 1;
        format!("bot-{}", i.next_id)
    });
    i.calls.push(ConnectorCall {
        kind: kind.into(),
        conversation: conv,
        activity: activity.clone(),
        id: id.clone(),
        body,
    });
    let id = id.or(activity).unwrap_or_default();
    (StatusCode::OK, Json(json!({ "id": id }))).into_response()
}

async fn new_message(
    State(f): S,
    Path(conv): Path<String>,
    h: HeaderMap,
    Json(b): Json<Value>,
) -> Response {
    if !authorised(&f, &h) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    record(&f, "post", conv, None, b)
}

async fn reply(
    State(f): S,
    Path((conv, id)): Path<(String, String)>,
    h: HeaderMap,
    Json(b): Json<Value>,
) -> Response {
    existing(&f, "reply", conv, id, &h, b)
}

async fn update(
    State(f): S,
    Path((conv, id)): Path<(String, String)>,
    h: HeaderMap,
    Json(b): Json<Value>,
) -> Response {
    existing(&f, "update", conv, id, &h, b)
}

/// A call naming an existing activity (a reply to it, or its update).
fn existing(
    f: &FakeTeams,
    kind: &str,
    conv: String,
    id: String,
    h: &HeaderMap,
    b: Value,
) -> Response {
    if !authorised(f, h) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    record(f, kind, conv, Some(id), b)
}
