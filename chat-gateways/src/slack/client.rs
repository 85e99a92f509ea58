//! The Slack Web API as the gateway uses it — `chat.postMessage`, `chat.update`,
//! `chat.postEphemeral` and posts to an interaction's `response_url` — through slack-morphism's
//! hyper client. The base URL is configurable (`chat.slack.api_url`) so tests point it at a
//! local fake; rate limiting (HTTP 429 + `Retry-After`) is honoured by slack-morphism's rate
//! controller, which waits the advertised time and retries.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use slack_morphism::errors::SlackClientError;
use slack_morphism::prelude::*;

use super::render::Rendered;

/// Slack's Web API base.
pub const DEFAULT_API_URL: &str = "https://slack.com/api";

/// How often a call refused with HTTP 429 is retried after the advertised `Retry-After`.
const MAX_RETRIES: usize = 3;

type Connector = SlackClientHyperConnector<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
>;

/// The bot token (`xoxb-…`). Never printed.
#[derive(Clone)]
pub struct BotToken(String);

impl BotToken {
    pub fn new(text: &str) -> Result<BotToken, ApiError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(ApiError::Config("the Slack bot token is empty".into()));
        }
        Ok(BotToken(t.to_string()))
    }

    pub fn from_file(path: &Path) -> Result<BotToken, ApiError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ApiError::Config(format!(
                "cannot read the Slack bot token from {}: {e}",
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

/// Why a Web API call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Config(String),
    /// Slack answered `{"ok": false, "error": …}`.
    #[error("Slack refused {method}: {error}")]
    Slack { method: &'static str, error: String },
    /// Still rate limited after the retries.
    #[error("Slack rate-limited {method} (retried {MAX_RETRIES} times)")]
    RateLimited { method: &'static str },
    #[error("cannot reach Slack for {method}: {error}")]
    Transport { method: &'static str, error: String },
}

fn api_error(method: &'static str, e: SlackClientError) -> ApiError {
    match e {
        SlackClientError::ApiError(a) => ApiError::Slack {
            method,
            error: a.code,
        },
        SlackClientError::RateLimitError(_) => ApiError::RateLimited { method },
        other => ApiError::Transport {
            method,
            error: other.to_string(),
        },
    }
}

/// A Slack Web API client for one bot token.
pub struct SlackApi {
    client: SlackClient<Connector>,
    token: SlackApiToken,
}

impl std::fmt::Debug for SlackApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackApi").finish_non_exhaustive()
    }
}

impl SlackApi {
    /// A client for `api_url` (e.g. `https://slack.com/api`; `http://` is accepted for a local
    /// fake in tests).
    pub fn new(api_url: &str, token: BotToken) -> Result<Arc<SlackApi>, ApiError> {
        let url = api_url.trim_end_matches('/');
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(ApiError::Config(format!(
                "chat.slack.api_url {api_url:?} must be an http(s):// URL"
            )));
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let connector = SlackClientHyperConnector::with_connector(https)
            .with_slack_api_url(url)
            .with_rate_control(
                SlackApiRateControlConfig::new()
                    .with_max_retries(MAX_RETRIES)
                    .with_max_delay_timeout(Duration::from_secs(120)),
            );
        Ok(Arc::new(SlackApi {
            client: SlackClient::new(connector),
            token: SlackApiToken::new(SlackApiTokenValue(token.0)),
        }))
    }

    fn content(r: &Rendered) -> Result<SlackMessageContent, ApiError> {
        // The renderer speaks Block Kit JSON; slack-morphism's models read it back, so a block
        // it cannot represent is found here rather than by Slack.
        let blocks: Vec<SlackBlock> = serde_json::from_value(Value::Array(r.blocks.clone()))
            .map_err(|e| ApiError::Config(format!("rendered blocks are not Block Kit: {e}")))?;
        Ok(SlackMessageContent::new()
            .with_text(r.text.clone())
            .with_blocks(blocks))
    }

    /// `chat.postMessage`; returns the message's `ts`.
    pub async fn post(
        &self,
        channel: &str,
        thread_ts: Option<&str>,
        r: &Rendered,
    ) -> Result<String, ApiError> {
        let req = SlackApiChatPostMessageRequest::new(channel.into(), Self::content(r)?)
            .opt_thread_ts(thread_ts.map(Into::into));
        let resp = self
            .client
            .open_session(&self.token)
            .chat_post_message(&req)
            .await
            .map_err(|e| api_error("chat.postMessage", e))?;
        Ok(resp.ts.0)
    }

    /// `chat.update` of the message `ts` in `channel`.
    pub async fn update(&self, channel: &str, ts: &str, r: &Rendered) -> Result<(), ApiError> {
        let req = SlackApiChatUpdateRequest::new(channel.into(), Self::content(r)?, ts.into());
        self.client
            .open_session(&self.token)
            .chat_update(&req)
            .await
            .map_err(|e| api_error("chat.update", e))?;
        Ok(())
    }

    /// `chat.postEphemeral`: visible to `user` only.
    pub async fn ephemeral(
        &self,
        channel: &str,
        user: &str,
        thread_ts: Option<&str>,
        r: &Rendered,
    ) -> Result<(), ApiError> {
        let req =
            SlackApiChatPostEphemeralRequest::new(channel.into(), user.into(), Self::content(r)?)
                .opt_thread_ts(thread_ts.map(Into::into));
        self.client
            .open_session(&self.token)
            .chat_post_ephemeral(&req)
            .await
            .map_err(|e| api_error("chat.postEphemeral", e))?;
        Ok(())
    }

    /// Posts to an interaction's or command's `response_url`: privately to the user who asked
    /// (Slack's default `response_type` is `ephemeral`), or replacing the message the button
    /// was on.
    pub async fn respond(
        &self,
        response_url: &str,
        r: &Rendered,
        replace_original: bool,
    ) -> Result<(), ApiError> {
        let url: url::Url = response_url.parse().map_err(|e| ApiError::Transport {
            method: "response_url",
            error: format!("{e}"),
        })?;
        let req = SlackApiPostWebhookMessageRequest::new(Self::content(r)?)
            .opt_replace_original(replace_original.then_some(true));
        self.client
            .respond_to_event(&SlackResponseUrl(url), &req)
            .await
            .map_err(|e| api_error("response_url", e))?;
        Ok(())
    }
}
