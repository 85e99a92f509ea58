//! The Bot Connector REST API as the gateway uses it ("Send and receive messages with the Bot
//! Connector API"): `POST {serviceUrl}/v3/conversations/{id}/activities/{replyToId}` (a reply),
//! `POST {serviceUrl}/v3/conversations/{id}/activities` (a new message in the conversation or
//! thread) and `PUT {serviceUrl}/v3/conversations/{id}/activities/{activityId}` (an update in
//! place), each answered with a `ResourceResponse` `{"id": …}`.
//!
//! Calls carry a client-credentials token ("Authentication with the Bot Connector API", bot to
//! connector): `POST` the token endpoint (`https://login.microsoftonline.com/botframework.com/
//! oauth2/v2.0/token`, or the tenant's for a single-tenant bot) with `grant_type=
//! client_credentials`, the app id and password, and `scope=https://api.botframework.com/
//! .default`; it is cached until shortly before `expires_in`, and fetched again after a 401.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The multi-tenant token endpoint.
pub const DEFAULT_TOKEN_URL: &str =
    "https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token";
/// The scope of bot → connector tokens.
pub const SCOPE: &str = "https://api.botframework.com/.default";
/// A token is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(300);
/// Retries of a call answered 429 (after its `Retry-After`, at most 10 s each).
const MAX_RETRIES: usize = 3;

/// The bot's app password (client secret). Never printed.
#[derive(Clone)]
pub struct AppPassword(String);

impl AppPassword {
    pub fn new(text: &str) -> Result<AppPassword, ConnectorError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(ConnectorError::Config(
                "the Teams app password is empty".into(),
            ));
        }
        Ok(AppPassword(t.to_string()))
    }
}

impl std::fmt::Debug for AppPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AppPassword(<{} bytes>)", self.0.len())
    }
}

/// Why a Connector call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectorError {
    #[error("{0}")]
    Config(String),
    #[error("no Bot Framework token: {0}")]
    Token(String),
    #[error("the Bot Connector refused {what}: HTTP {status} {body}")]
    Refused {
        what: &'static str,
        status: u16,
        body: String,
    },
    #[error("cannot reach the Bot Connector for {what}: {error}")]
    Transport { what: &'static str, error: String },
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

/// A Connector client for one bot.
pub struct Connector {
    http: reqwest::Client,
    app_id: String,
    password: AppPassword,
    token_url: String,
    token: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("app_id", &self.app_id)
            .field("token_url", &self.token_url)
            .finish_non_exhaustive()
    }
}

enum Method {
    Post,
    Put,
}

impl Connector {
    pub fn new(app_id: &str, password: AppPassword, token_url: &str) -> Connector {
        Connector {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap_or_default(),
            app_id: app_id.to_string(),
            password,
            token_url: token_url.to_string(),
            token: Mutex::new(None),
        }
    }

    /// The bot's app id.
    pub fn app_id(&self) -> &str {
        &self.app_id
    }

    /// A reply to `activity_id` in its conversation (or thread); the new activity's id.
    pub async fn reply(
        &self,
        service_url: &str,
        conversation: &str,
        activity_id: &str,
        activity: &Value,
    ) -> Result<String, ConnectorError> {
        let mut a = activity.clone();
        a["replyToId"] = Value::String(activity_id.to_string());
        let url = format!(
            "{}/v3/conversations/{}/activities/{}",
            service_url.trim_end_matches('/'),
            enc(conversation),
            enc(activity_id)
        );
        self.call("reply", Method::Post, &url, &a).await
    }

    /// A new message in a conversation (a thread, when the id carries `;messageid=`).
    pub async fn post(
        &self,
        service_url: &str,
        conversation: &str,
        activity: &Value,
    ) -> Result<String, ConnectorError> {
        let url = format!(
            "{}/v3/conversations/{}/activities",
            service_url.trim_end_matches('/'),
            enc(conversation)
        );
        self.call("post", Method::Post, &url, activity).await
    }

    /// Replaces activity `activity_id` in place.
    pub async fn update(
        &self,
        service_url: &str,
        conversation: &str,
        activity_id: &str,
        activity: &Value,
    ) -> Result<(), ConnectorError> {
        let mut a = activity.clone();
        a["id"] = Value::String(activity_id.to_string());
        let url = format!(
            "{}/v3/conversations/{}/activities/{}",
            service_url.trim_end_matches('/'),
            enc(conversation),
            enc(activity_id)
        );
        self.call("update", Method::Put, &url, &a).await.map(|_| ())
    }

    async fn call(
        &self,
        what: &'static str,
        method: Method,
        url: &str,
        body: &Value,
    ) -> Result<String, ConnectorError> {
        let mut renewed = false;
        let mut retries = 0;
        loop {
            let token = self.token(renewed).await?;
            let req = match method {
                Method::Post => self.http.post(url),
                Method::Put => self.http.put(url),
            };
            let r = req
                .bearer_auth(&token)
                .json(body)
                .send()
                .await
                .map_err(|e| ConnectorError::Transport {
                    what,
                    error: e.to_string(),
                })?;
            let status = r.status().as_u16();
            if status == 401 && !renewed {
                // The token may have been revoked or rolled early: one more try with a new one.
                renewed = true;
                continue;
            }
            if status == 429 && retries < MAX_RETRIES {
                retries += 1;
                let wait = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1)
                    .min(10);
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            let text = r.text().await.unwrap_or_default();
            if !(200..300).contains(&status) {
                return Err(ConnectorError::Refused {
                    what,
                    status,
                    body: text.chars().take(300).collect(),
                });
            }
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            return Ok(v["id"].as_str().unwrap_or("").to_string());
        }
    }

    /// The cached token, or a new one when it is missing, near expiry, or `renew`.
    async fn token(&self, renew: bool) -> Result<String, ConnectorError> {
        let mut slot = self.token.lock().await;
        if let (Some((t, until)), false) = (&*slot, renew) {
            if Instant::now() < *until {
                return Ok(t.clone());
            }
        }
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.app_id.as_str()),
            ("client_secret", self.password.0.as_str()),
            ("scope", SCOPE),
        ];
        let r = self
            .http
            .post(&self.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| ConnectorError::Token(e.to_string()))?;
        let status = r.status();
        if !status.is_success() {
            // The body is the identity platform's error (`invalid_client`, …), never the secret.
            let body: String = r
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect();
            return Err(ConnectorError::Token(format!("HTTP {status} {body}")));
        }
        let t: TokenResponse = r
            .json()
            .await
            .map_err(|e| ConnectorError::Token(format!("not a token response: {e}")))?;
        let life = Duration::from_secs(t.expires_in);
        let until = Instant::now() + life.saturating_sub(RENEW_BEFORE.min(life / 2));
        *slot = Some((t.access_token.clone(), until));
        Ok(t.access_token)
    }
}

/// A path segment, percent-encoded (conversation ids carry `:`, `;`, `@`, `=`).
fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}
