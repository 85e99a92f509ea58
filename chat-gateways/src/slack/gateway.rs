//! The Slack HTTP gateway: the chat listener's routes `/chat/slack/commands`,
//! `/chat/slack/events` and `/chat/slack/interactions`, and the [`Outbox`] that posts through
//! the Web API.
//!
//! Each request is verified on its raw bytes first (signature, time window, replay), then
//! parsed, then acknowledged at once — Slack wants an answer within 3 seconds — while the
//! conversation core handles it in the background; its replies go out through
//! `chat.postMessage` (in the thread), `chat.update` (in place) or, when private, the
//! request's `response_url` / `chat.postEphemeral`. A second delivery of the same event or
//! interaction (Slack's retries, `X-Slack-Retry-Num`) is acknowledged with
//! `X-Slack-No-Retry: 1` and not run again.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::task::TaskTracker;

use super::client::{ApiError, SlackApi, UserNames};
use super::parse::{self, Malformed, Parsed};
use super::render::render;
use super::verify::{Deliveries, Retry, SignedHeaders, Verifier};
use crate::core::types::{
    ChatError, ChatUser, ConversationRef, Incoming, MessageRef, Outbox, Reply,
};

/// Slack's payloads are small; anything larger is not Slack.
const MAX_BODY: usize = 256 * 1024;

pub use crate::core::gateway::Handler;

/// The Slack side of the chat gateway: what both transports (the HTTP routes below and
/// Socket Mode, [`super::socket`]) hand their parsed deliveries to.
pub struct SlackGateway {
    /// The request verifier of the HTTP routes; `None` when Slack reaches the gateway through
    /// Socket Mode only (its WebSocket is authenticated by the app-level token instead).
    verifier: Option<Verifier>,
    deliveries: Deliveries,
    api: Arc<SlackApi>,
    names: UserNames,
    handler: Arc<dyn Handler>,
    tasks: TaskTracker,
}

/// What a transport answers for one parsed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Events API `url_verification`: answer with the challenge (HTTP only).
    Challenge(String),
    /// Valid, nothing to do; acknowledged so Slack does not retry.
    Ignored,
    /// Taken before (a retry or a duplicate); acknowledged, not run again.
    Duplicate,
    /// Handed to the core in the background; acknowledged at once.
    Started,
}

impl SlackGateway {
    /// A gateway whose HTTP routes verify requests with `verifier`.
    pub fn new(
        verifier: Verifier,
        api: Arc<SlackApi>,
        handler: Arc<dyn Handler>,
    ) -> Arc<SlackGateway> {
        Self::build(Some(verifier), api, handler)
    }

    /// A gateway for Socket Mode only (no signing secret: nothing reaches it over HTTP).
    pub fn socket_only(api: Arc<SlackApi>, handler: Arc<dyn Handler>) -> Arc<SlackGateway> {
        Self::build(None, api, handler)
    }

    fn build(
        verifier: Option<Verifier>,
        api: Arc<SlackApi>,
        handler: Arc<dyn Handler>,
    ) -> Arc<SlackGateway> {
        Arc::new(SlackGateway {
            verifier,
            deliveries: Deliveries::default(),
            names: UserNames::new(api.clone()),
            api,
            handler,
            tasks: TaskTracker::new(),
        })
    }

    /// The outbox replies and follow-ups are posted through.
    pub fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(SlackOutbox {
            api: self.api.clone(),
        })
    }

    /// The Web API client the gateway answers through.
    pub fn api(&self) -> &Arc<SlackApi> {
        &self.api
    }

    /// Waits for conversation turns still being handled (at shutdown).
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Below the transport: a parsed delivery is answered, ignored, recognised as a
    /// duplicate (by its delivery id: Slack's `event_id`, or the `trigger_id`, whichever
    /// transport or connection brought it), or handed to the core in the background — the
    /// acknowledgement never waits for the core.
    pub fn dispatch(
        self: &Arc<Self>,
        route: &'static str,
        parsed: Parsed,
        retry: Option<&Retry>,
        now_s: i64,
    ) -> Outcome {
        match parsed {
            Parsed::Challenge(c) => Outcome::Challenge(c),
            Parsed::Ignored(why) => {
                tracing::debug!(route, why, "Slack delivery acknowledged, nothing to do");
                Outcome::Ignored
            }
            Parsed::Message {
                incoming,
                response_url,
            } => {
                if let Some(id) = &incoming.delivery_id {
                    if !self.deliveries.first_delivery(id, now_s) {
                        tracing::info!(
                            route, delivery = %id,
                            retry_num = retry.map(|r| r.num),
                            retry_reason = retry.map(|r| r.reason.as_str()),
                            "Slack delivered this again; it already ran and is not run twice"
                        );
                        return Outcome::Duplicate;
                    }
                }
                let gw = self.clone();
                self.tasks
                    .spawn(async move { turn(gw, *incoming, response_url).await });
                Outcome::Started
            }
        }
    }
}

/// The three Slack routes, for the chat listener.
pub fn routes(gw: Arc<SlackGateway>) -> Router {
    Router::new()
        .route("/chat/slack/commands", post(commands))
        .route("/chat/slack/events", post(events))
        .route("/chat/slack/interactions", post(interactions))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(gw)
}

async fn commands(State(gw): State<Arc<SlackGateway>>, h: HeaderMap, body: Bytes) -> Response {
    accept(&gw, "commands", &h, &body, parse::command)
}

async fn events(State(gw): State<Arc<SlackGateway>>, h: HeaderMap, body: Bytes) -> Response {
    accept(&gw, "events", &h, &body, parse::event)
}

async fn interactions(State(gw): State<Arc<SlackGateway>>, h: HeaderMap, body: Bytes) -> Response {
    accept(&gw, "interactions", &h, &body, parse::interaction)
}

pub(crate) fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn accept(
    gw: &Arc<SlackGateway>,
    route: &'static str,
    h: &HeaderMap,
    body: &[u8],
    parse: fn(&[u8]) -> Result<Parsed, Malformed>,
) -> Response {
    let now = now_s();
    let Some(verifier) = &gw.verifier else {
        tracing::warn!(
            route,
            "refused a Slack HTTP request: this gateway runs in Socket Mode"
        );
        return (
            StatusCode::NOT_FOUND,
            "this Slack gateway runs in Socket Mode",
        )
            .into_response();
    };
    if let Err(refusal) = verifier.verify(SignedHeaders::from_map(h), body, now) {
        tracing::warn!(route, reason = %refusal, "refused a Slack request");
        return (StatusCode::UNAUTHORIZED, refusal.to_string()).into_response();
    }
    let parsed = match parse(body) {
        Ok(p) => p,
        Err(m) => {
            tracing::warn!(route, reason = %m, "refused a malformed Slack request");
            return (StatusCode::BAD_REQUEST, m.to_string()).into_response();
        }
    };
    match gw.dispatch(route, parsed, Retry::from_map(h).as_ref(), now) {
        Outcome::Challenge(c) => Json(json!({ "challenge": c })).into_response(),
        Outcome::Duplicate => (StatusCode::OK, [("x-slack-no-retry", "1")]).into_response(),
        Outcome::Ignored | Outcome::Started => StatusCode::OK.into_response(),
    }
}

/// One conversation turn: the core answers, the replies are sent in Slack's idiom.
async fn turn(gw: Arc<SlackGateway>, mut incoming: Incoming, response_url: Option<String>) {
    // The member's display name, so the audit actor reads `slack:T/U (Display Name)` however
    // they reached us (events carry only the id; commands and clicks the account handle).
    if let Some(name) = gw.names.lookup(&incoming.user.id).await {
        incoming.user.name = name;
    }
    let replies = gw.handler.handle(incoming.clone(), gw.outbox()).await;
    for reply in replies {
        if let Err(e) = send(&gw.api, &incoming, response_url.as_deref(), &reply).await {
            tracing::warn!(error = %e, channel = %incoming.conversation.channel, "could not answer on Slack");
        }
    }
}

/// Sends one immediate reply: private ones to the requester (through the `response_url` when
/// there is one: it works even where the bot is not a member), in-place ones by `chat.update`,
/// the rest into the conversation's thread.
async fn send(
    api: &SlackApi,
    incoming: &Incoming,
    response_url: Option<&str>,
    reply: &Reply,
) -> Result<(), ApiError> {
    let r = render(reply);
    let conv = &incoming.conversation;
    if reply.ephemeral {
        return match response_url {
            Some(url) => api.respond(url, &r, false).await,
            None => {
                api.ephemeral(&conv.channel, &incoming.user.id, conv.thread.as_deref(), &r)
                    .await
            }
        };
    }
    if let Some(m) = &reply.replace {
        return api.update(&m.conversation.channel, &m.id, &r).await;
    }
    api.post(&conv.channel, conv.thread.as_deref(), &r)
        .await
        .map(|_| ())
}

/// Posts the core's follow-ups (progress, sign-offs, alerts) through the Web API.
pub struct SlackOutbox {
    api: Arc<SlackApi>,
}

impl SlackOutbox {
    pub fn new(api: Arc<SlackApi>) -> SlackOutbox {
        SlackOutbox { api }
    }
}

fn platform(e: ApiError) -> ChatError {
    ChatError::Platform(e.to_string())
}

#[async_trait]
impl Outbox for SlackOutbox {
    async fn post(&self, to: &ConversationRef, reply: &Reply) -> Result<MessageRef, ChatError> {
        let ts = self
            .api
            .post(&to.channel, to.thread.as_deref(), &render(reply))
            .await
            .map_err(platform)?;
        Ok(MessageRef {
            conversation: to.clone(),
            id: ts,
        })
    }

    async fn update(&self, msg: &MessageRef, reply: &Reply) -> Result<(), ChatError> {
        self.api
            .update(&msg.conversation.channel, &msg.id, &render(reply))
            .await
            .map_err(platform)
    }

    async fn ephemeral(
        &self,
        to: &ConversationRef,
        user: &ChatUser,
        reply: &Reply,
    ) -> Result<(), ChatError> {
        self.api
            .ephemeral(&to.channel, &user.id, to.thread.as_deref(), &render(reply))
            .await
            .map_err(platform)
    }
}
