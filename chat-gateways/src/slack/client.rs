//! The Slack Web API as the gateway uses it — `chat.postMessage`, `chat.update`,
//! `chat.postEphemeral` and posts to an interaction's `response_url` — through slack-morphism's
//! hyper client. The base URL is configurable (`chat.slack.api_url`) so tests point it at a
//! local fake. Writes are paced per channel and a 429's `Retry-After` holds that method in that
//! channel (see [`super::pace`] for why slack-morphism's own rate control is not used here).

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use slack_morphism::errors::SlackClientError;
use slack_morphism::prelude::*;

use super::pace::{Pace, Pacer};
use super::render::Rendered;

/// Slack's Web API base.
pub const DEFAULT_API_URL: &str = "https://slack.com/api";

/// How often a call refused with HTTP 429 is retried after the advertised `Retry-After`.
const MAX_RETRIES: usize = 3;
/// The longest one `Retry-After` is obeyed for; a longer one is retried after this.
const MAX_HOLD: Duration = Duration::from_secs(120);
/// The wait when a 429 comes without a (readable) `Retry-After`.
const DEFAULT_HOLD: Duration = Duration::from_secs(1);
/// Calls that may wait per method and channel; beyond it a call is refused and logged.
const MAX_WAITING: usize = 64;

pub(crate) type Connector = SlackClientHyperConnector<
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
    /// Too many calls already wait for this channel (Slack allows about one a second).
    #[error("{method} to {channel} not sent: {waiting} calls already wait for that channel")]
    Backlogged {
        method: &'static str,
        channel: String,
        waiting: usize,
    },
}

pub(crate) fn api_error(method: &'static str, e: SlackClientError) -> ApiError {
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

/// slack-morphism's connector for Socket Mode's `apps.connections.open`: [`plain_connector`]
/// with the crate's rate control, which waits out a 429's `Retry-After` and retries.
pub(crate) fn connector(api_url: &str) -> Result<Connector, ApiError> {
    Ok(plain_connector(api_url)?.with_rate_control(
        SlackApiRateControlConfig::new()
            .with_max_retries(MAX_RETRIES)
            .with_max_delay_timeout(MAX_HOLD),
    ))
}

/// slack-morphism's connector for `api_url`: rustls with webpki roots, `http://` allowed (a
/// local fake), no rate control (a 429 comes back as an error for the caller to pace).
fn plain_connector(api_url: &str) -> Result<Connector, ApiError> {
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
    Ok(SlackClientHyperConnector::with_connector(https).with_slack_api_url(url))
}

/// A Slack Web API client for one bot token.
pub struct SlackApi {
    client: SlackClient<Connector>,
    token: SlackApiToken,
    pacer: Pacer,
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
        Ok(Arc::new(SlackApi {
            client: SlackClient::new(plain_connector(api_url)?),
            token: SlackApiToken::new(SlackApiTokenValue(token.0)),
            pacer: Pacer::new(MAX_WAITING),
        }))
    }

    /// Runs `call` for `method` in `channel` when the channel's pace allows; a 429 holds the
    /// pair for its `Retry-After` and the same call is retried after it (the message is not
    /// lost), up to [`MAX_RETRIES`] times.
    async fn paced<T, F, Fut>(
        &self,
        method: &'static str,
        channel: &str,
        pace: Pace,
        call: F,
    ) -> Result<T, ApiError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, SlackClientError>>,
    {
        let turn = self.pacer.enter(method, channel, pace).map_err(|b| {
            tracing::warn!(
                method,
                channel,
                waiting = b.waiting,
                "Slack channel backlog full; this call is refused, not queued"
            );
            ApiError::Backlogged {
                method,
                channel: channel.to_string(),
                waiting: b.waiting,
            }
        })?;
        for attempt in 0..=MAX_RETRIES {
            turn.wait().await;
            match call().await {
                Err(SlackClientError::RateLimitError(e)) => {
                    let hold = e.retry_after.unwrap_or(DEFAULT_HOLD).min(MAX_HOLD);
                    tracing::info!(
                        method,
                        channel,
                        retry_after_ms = hold.as_millis() as u64,
                        attempt,
                        "Slack answered 429; holding this channel's calls for Retry-After"
                    );
                    turn.hold(hold);
                }
                other => return other.map_err(|e| api_error(method, e)),
            }
        }
        tracing::warn!(
            method,
            channel,
            "Slack still rate-limits after {MAX_RETRIES} retries; giving up this call"
        );
        Err(ApiError::RateLimited { method })
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
        let req = &SlackApiChatPostMessageRequest::new(channel.into(), Self::content(r)?)
            .opt_thread_ts(thread_ts.map(Into::into));
        let (client, token) = (&self.client, &self.token);
        let resp = self
            .paced(
                "chat.postMessage",
                channel,
                Pace::PER_CHANNEL,
                || async move { client.open_session(token).chat_post_message(req).await },
            )
            .await?;
        Ok(resp.ts.0)
    }

    /// `chat.update` of the message `ts` in `channel`.
    pub async fn update(&self, channel: &str, ts: &str, r: &Rendered) -> Result<(), ApiError> {
        let req = &SlackApiChatUpdateRequest::new(channel.into(), Self::content(r)?, ts.into());
        let (client, token) = (&self.client, &self.token);
        self.paced("chat.update", channel, Pace::PER_CHANNEL, || async move {
            client.open_session(token).chat_update(req).await
        })
        .await?;
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
            &SlackApiChatPostEphemeralRequest::new(channel.into(), user.into(), Self::content(r)?)
                .opt_thread_ts(thread_ts.map(Into::into));
        let (client, token) = (&self.client, &self.token);
        // Ephemerals are limited per workspace, far above one a second: only a 429 holds them.
        self.paced(
            "chat.postEphemeral",
            channel,
            Pace::UNPACED,
            || async move { client.open_session(token).chat_post_ephemeral(req).await },
        )
        .await?;
        Ok(())
    }

    /// `users.info`: the member's display name (the profile's `display_name`, else its
    /// `real_name`, else the account name), `None` when the profile has none.
    pub async fn display_name(&self, user: &str) -> Result<Option<String>, ApiError> {
        let resp = self
            .client
            .open_session(&self.token)
            .users_info(&SlackApiUsersInfoRequest::new(user.into()))
            .await
            .map_err(|e| api_error("users.info", e))?;
        let u = resp.user;
        let profile = u.profile.as_ref();
        Ok([
            profile.and_then(|p| p.display_name.clone()),
            profile.and_then(|p| p.real_name.clone()),
            u.real_name.clone(),
            u.name.clone(),
        ]
        .into_iter()
        .flatten()
        .map(|n| n.trim().to_string())
        .find(|n| !n.is_empty()))
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

/// How long a looked-up display name is used before it is asked again.
const NAME_TTL: Duration = Duration::from_secs(3600);
/// How long a failed lookup is not retried (the id, or the payload's name, stands in).
const NAME_FAILURE_TTL: Duration = Duration::from_secs(300);
/// Most time a lookup may add to a conversation turn.
const NAME_TIMEOUT: Duration = Duration::from_secs(2);
/// Most members remembered; the oldest half is forgotten beyond it.
const NAME_CAP: usize = 10_000;

/// Display names from `users.info`, cached per user: events carry only the user id, and the
/// audit trail should read `slack:T/U (Display Name)`. A failed or slow lookup falls back to
/// the name the payload had (the id for events); it runs after the acknowledgement, never
/// before it.
pub struct UserNames {
    api: Arc<SlackApi>,
    cache: Mutex<HashMap<String, (Option<String>, Instant)>>,
}

impl UserNames {
    pub fn new(api: Arc<SlackApi>) -> UserNames {
        UserNames {
            api,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The display name of `user`, if Slack gives one.
    pub async fn lookup(&self, user: &str) -> Option<String> {
        let now = Instant::now();
        if let Some((name, until)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(user)
        {
            if *until > now {
                return name.clone();
            }
        }
        let (name, ttl) = match tokio::time::timeout(NAME_TIMEOUT, self.api.display_name(user))
            .await
        {
            Ok(Ok(n)) => (n, NAME_TTL),
            Ok(Err(e)) => {
                tracing::info!(user, error = %e, "users.info failed; the user id stands for the name");
                (None, NAME_FAILURE_TTL)
            }
            Err(_) => {
                tracing::info!(
                    user,
                    "users.info took over 2 s; the user id stands for the name"
                );
                (None, NAME_FAILURE_TTL)
            }
        };
        let mut g = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() >= NAME_CAP {
            let mut by_age: Vec<(String, Instant)> =
                g.iter().map(|(k, (_, t))| (k.clone(), *t)).collect();
            by_age.sort_by_key(|(_, t)| *t);
            for (k, _) in by_age.into_iter().take(NAME_CAP / 2) {
                g.remove(&k);
            }
        }
        g.insert(user.to_string(), (name.clone(), now + ttl));
        name
    }
}
