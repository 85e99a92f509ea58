//! The Discord REST API as the gateway uses it (reqwest, the HTTP client already in the
//! build): channel messages with the bot token (`POST`/`PATCH /channels/{id}/messages…`: alerts,
//! sign-offs, edits of messages the bot posted), the interaction webhook with the interaction's
//! token (`PATCH /webhooks/{app}/{token}/messages/@original`, follow-ups `POST
//! /webhooks/{app}/{token}`), and the bulk overwrite of application commands (`PUT
//! /applications/{app}[/guilds/{guild}]/commands`), and `GET /gateway/bot` (where the Gateway
//! WebSocket is, `ws.rs`). The base URL is configurable
//! (`chat.discord.api_url`) so tests point it at a local fake.
//!
//! HTTP 429 is honoured as Discord's "Rate Limits" page describes: wait the body's
//! `retry_after` seconds (or `Retry-After`), then retry, a few times. Error texts never hold a
//! URL: webhook URLs carry the interaction token.

use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Discord's REST API base (API v10).
pub const DEFAULT_API_URL: &str = "https://discord.com/api/v10";

/// How often a call refused with HTTP 429 is retried.
const MAX_RETRIES: usize = 3;
/// Longest wait on one 429 before giving up (a global limit can be much longer).
const MAX_WAIT: Duration = Duration::from_secs(10);

/// The bot token. Never printed.
#[derive(Clone)]
pub struct BotToken(String);

impl BotToken {
    pub fn new(text: &str) -> Result<BotToken, ApiError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(ApiError::Config("the Discord bot token is empty".into()));
        }
        Ok(BotToken(t.to_string()))
    }

    pub fn from_file(path: &Path) -> Result<BotToken, ApiError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ApiError::Config(format!(
                "cannot read the Discord bot token from {}: {e}",
                path.display()
            ))
        })?;
        BotToken::new(&text)
    }
}

impl std::fmt::Debug for BotToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BotToken(<{} bytes>)", self.0.len())
    }
}

/// Why a REST call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Config(String),
    /// Discord answered with an error status (its JSON `message`, or the status).
    #[error("Discord refused {what}: HTTP {status}: {message}")]
    Discord {
        what: &'static str,
        status: u16,
        message: String,
    },
    #[error("Discord rate-limited {what} (retried {MAX_RETRIES} times)")]
    RateLimited { what: &'static str },
    #[error("cannot reach Discord for {what}: {error}")]
    Transport { what: &'static str, error: String },
}

/// Authentication of one call.
enum Auth {
    Bot,
    /// Webhook calls are authenticated by the token in their path.
    None,
}

/// A Discord REST client for one application.
#[derive(Debug, Clone)]
pub struct DiscordApi {
    http: reqwest::Client,
    base: String,
    application_id: String,
    token: BotToken,
}

impl DiscordApi {
    pub fn new(
        base_url: &str,
        application_id: &str,
        token: BotToken,
    ) -> Result<DiscordApi, ApiError> {
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(ApiError::Config(format!(
                "the Discord API URL {base_url:?} is not an http(s):// URL"
            )));
        }
        if application_id.is_empty() || !application_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ApiError::Config(format!(
                "the Discord application id {application_id:?} is not a snowflake (digits)"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .user_agent(concat!(
                "DiscordBot (https://github.com/flotilla, ",
                env!("CARGO_PKG_VERSION"),
                ")"
            ))
            .build()
            .map_err(|e| ApiError::Config(e.to_string()))?;
        Ok(DiscordApi {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            application_id: application_id.to_string(),
            token,
        })
    }

    pub fn application_id(&self) -> &str {
        &self.application_id
    }

    async fn call(
        &self,
        what: &'static str,
        method: Method,
        path: &str,
        auth: Auth,
        body: Option<&Value>,
    ) -> Result<Option<Value>, ApiError> {
        let transport = |e: reqwest::Error| ApiError::Transport {
            what,
            error: e.without_url().to_string(),
        };
        for _ in 0..=MAX_RETRIES {
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.base));
            if let Auth::Bot = auth {
                req = req.header("authorization", format!("Bot {}", self.token.0));
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(transport)?;
            let status = resp.status();
            let header_wait = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<f64>().ok());
            let text = resp.text().await.map_err(transport)?;
            let json: Option<Value> = serde_json::from_str(&text).ok();
            if status == StatusCode::TOO_MANY_REQUESTS {
                let secs = json
                    .as_ref()
                    .and_then(|j| j["retry_after"].as_f64())
                    .or(header_wait)
                    .unwrap_or(1.0);
                let wait = Duration::from_secs_f64(secs.clamp(0.0, MAX_WAIT.as_secs_f64()));
                tracing::info!(
                    what,
                    wait_ms = wait.as_millis() as u64,
                    "Discord rate limit; waiting"
                );
                tokio::time::sleep(wait).await;
                continue;
            }
            if !status.is_success() {
                let message = json
                    .as_ref()
                    .and_then(|j| j["message"].as_str())
                    .map(str::to_string)
                    .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_string());
                return Err(ApiError::Discord {
                    what,
                    status: status.as_u16(),
                    message,
                });
            }
            return Ok(json);
        }
        Err(ApiError::RateLimited { what })
    }

    /// Posts a message in a channel as the bot; its id.
    pub async fn create_message(&self, channel: &str, body: &Value) -> Result<String, ApiError> {
        let what = "create message";
        let v = self
            .call(
                what,
                Method::POST,
                &format!("/channels/{channel}/messages"),
                Auth::Bot,
                Some(body),
            )
            .await?;
        message_id(what, v)
    }

    /// Edits a message the bot posted.
    pub async fn edit_message(
        &self,
        channel: &str,
        id: &str,
        body: &Value,
    ) -> Result<(), ApiError> {
        self.call(
            "edit message",
            Method::PATCH,
            &format!("/channels/{channel}/messages/{id}"),
            Auth::Bot,
            Some(body),
        )
        .await
        .map(|_| ())
    }

    /// Edits an interaction's original response (for a button: the message it is on).
    pub async fn edit_original(&self, token: &str, body: &Value) -> Result<(), ApiError> {
        self.call(
            "edit original response",
            Method::PATCH,
            &format!(
                "/webhooks/{}/{token}/messages/@original",
                self.application_id
            ),
            Auth::None,
            Some(body),
        )
        .await
        .map(|_| ())
    }

    /// Deletes an interaction's original response (a deferred one whose answer is private).
    pub async fn delete_original(&self, token: &str) -> Result<(), ApiError> {
        self.call(
            "delete original response",
            Method::DELETE,
            &format!(
                "/webhooks/{}/{token}/messages/@original",
                self.application_id
            ),
            Auth::None,
            None,
        )
        .await
        .map(|_| ())
    }

    /// Sends a follow-up message to an interaction; its id.
    pub async fn followup(&self, token: &str, body: &Value) -> Result<String, ApiError> {
        let what = "follow-up";
        let v = self
            .call(
                what,
                Method::POST,
                &format!("/webhooks/{}/{token}?wait=true", self.application_id),
                Auth::None,
                Some(body),
            )
            .await?;
        message_id(what, v)
    }

    /// The Gateway's WebSocket URL for this bot (`GET /gateway/bot`, bot token): where
    /// mentions and DMs are received. A refused token fails here.
    pub async fn gateway_url(&self) -> Result<String, ApiError> {
        let what = "gateway/bot";
        let v = self
            .call(what, Method::GET, "/gateway/bot", Auth::Bot, None)
            .await?;
        v.as_ref()
            .and_then(|v| v["url"].as_str())
            .filter(|u| u.starts_with("wss://") || u.starts_with("ws://"))
            .map(str::to_string)
            .ok_or(ApiError::Discord {
                what,
                status: 200,
                message: "the answer has no ws(s):// url".into(),
            })
    }

    /// Replaces the application's commands (in `guild`, or globally) with `commands`: Discord's
    /// bulk overwrite, so registering twice leaves the same set. The commands Discord now has.
    pub async fn overwrite_commands(
        &self,
        guild: Option<&str>,
        commands: &Value,
    ) -> Result<Value, ApiError> {
        let path = match guild {
            Some(g) => format!("/applications/{}/guilds/{g}/commands", self.application_id),
            None => format!("/applications/{}/commands", self.application_id),
        };
        self.call(
            "register commands",
            Method::PUT,
            &path,
            Auth::Bot,
            Some(commands),
        )
        .await
        .map(|v| v.unwrap_or(Value::Null))
    }
}

fn message_id(what: &'static str, v: Option<Value>) -> Result<String, ApiError> {
    v.as_ref()
        .and_then(|v| v["id"].as_str())
        .map(str::to_string)
        .ok_or(ApiError::Discord {
            what,
            status: 200,
            message: "the answer has no message id".into(),
        })
}
