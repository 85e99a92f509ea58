//! The Discord interactions endpoint (`POST /chat/discord/interactions` on the chat listener)
//! and the [`Outbox`] that posts through Discord's REST API.
//!
//! Each request is verified on its raw bytes first (Ed25519, time window), then parsed. `PING`
//! is answered `PONG`. A command or button goes to the core in the background; Discord wants
//! the interaction answered within 3 seconds, so the gateway waits for the core up to
//! [`ANSWER_WITHIN`] and answers with its reply (type 4, or type 7 editing the button's
//! message; private replies with the ephemeral flag), else defers (type 5, or 6 for a button)
//! and completes through the interaction webhook: the original response edited, private
//! replies as ephemeral follow-ups. Live progress edits the button's message through the same
//! webhook while the interaction's token lives (15 minutes), then through the bot.
//!
//! An interaction id seen before (a redelivery) is answered privately and never run again;
//! a double-clicked button is two interactions, and the core's single-use confirmation refuses
//! the second.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::task::TaskTracker;

use super::client::{ApiError, DiscordApi};
use super::parse::{self, Parsed, Turn};
use super::render::{render, EPHEMERAL};
use super::verify::{SignedHeaders, Verifier};
use crate::core::gateway::Handler;
use crate::core::seen::Seen;
use crate::core::types::{
    ChatError, ChatUser, ConversationRef, IncomingKind, MessageRef, Outbox, Reply,
};

/// Discord's interaction payloads are small; anything larger is not Discord.
const MAX_BODY: usize = 256 * 1024;
/// How long the core may take before the interaction is deferred (Discord allows 3 s in all).
pub const ANSWER_WITHIN: Duration = Duration::from_millis(2000);
/// An interaction token's life for webhook calls is 15 minutes; a little less is used.
const TOKEN_LIFE: Duration = Duration::from_secs(14 * 60);

// Interaction response types.
const PONG: u64 = 1;
const CHANNEL_MESSAGE: u64 = 4;
const DEFERRED_CHANNEL_MESSAGE: u64 = 5;
const DEFERRED_UPDATE_MESSAGE: u64 = 6;
const UPDATE_MESSAGE: u64 = 7;

/// Message id → the token of the button interaction on it, for editing it by webhook.
#[derive(Default)]
struct Tokens(Mutex<HashMap<String, (String, Instant)>>);

impl Tokens {
    fn put(&self, message: &str, token: &str) {
        let now = Instant::now();
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|_, (_, until)| *until > now);
        g.insert(message.to_string(), (token.to_string(), now + TOKEN_LIFE));
    }

    fn get(&self, message: &str) -> Option<String> {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.get(message)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(t, _)| t.clone())
    }
}

/// The Discord side of the chat gateway.
pub struct DiscordGateway {
    verifier: Verifier,
    deliveries: Seen,
    api: Arc<DiscordApi>,
    handler: Arc<dyn Handler>,
    tokens: Arc<Tokens>,
    tasks: TaskTracker,
    answer_within: Duration,
}

impl DiscordGateway {
    pub fn new(
        verifier: Verifier,
        api: Arc<DiscordApi>,
        handler: Arc<dyn Handler>,
    ) -> Arc<DiscordGateway> {
        Self::with_answer_within(verifier, api, handler, ANSWER_WITHIN)
    }

    /// As [`DiscordGateway::new`], deferring when the core takes longer than `answer_within`.
    pub fn with_answer_within(
        verifier: Verifier,
        api: Arc<DiscordApi>,
        handler: Arc<dyn Handler>,
        answer_within: Duration,
    ) -> Arc<DiscordGateway> {
        Arc::new(DiscordGateway {
            verifier,
            // Discord does not resend an interaction after its token's 15 minutes.
            deliveries: Seen::new(30 * 60, 200_000),
            api,
            handler,
            tokens: Arc::default(),
            tasks: TaskTracker::new(),
            answer_within,
        })
    }

    /// The outbox replies and follow-ups are posted through.
    pub fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(DiscordOutbox {
            api: self.api.clone(),
            tokens: self.tokens.clone(),
        })
    }

    /// Waits for conversation turns still being handled (at shutdown).
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Answers one verified, parsed interaction: the body of the HTTP response.
    pub async fn dispatch(self: &Arc<Self>, parsed: Parsed, now_s: i64) -> Value {
        let turn = match parsed {
            Parsed::Ping => return json!({ "type": PONG }),
            Parsed::Turn(t) => t,
        };
        if !self.deliveries.first_time(&turn.id, now_s) {
            tracing::info!(interaction = %turn.id, "Discord delivered this interaction again; it already ran and is not run twice");
            return private_answer("This request was already handled; it did not run again.");
        }
        if turn.application_id != self.api.application_id() {
            tracing::warn!(interaction = %turn.id, application = %turn.application_id, "a signed Discord interaction for another application; its webhook is not ours");
        }
        if let IncomingKind::Action {
            message: Some(m), ..
        } = &turn.incoming.kind
        {
            // Progress edits of this message go through this interaction's webhook.
            self.tokens.put(&m.id, &turn.token);
        }
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let gw = self.clone();
        let t2 = turn.clone();
        self.tasks.spawn(async move {
            let replies = gw.handler.handle(t2.incoming.clone(), gw.outbox()).await;
            // The receiver is closed once the interaction was deferred: complete it by webhook.
            if let Err(replies) = tx.send(replies) {
                complete(&gw.api, &t2, replies).await;
            }
        });
        let in_time = tokio::time::timeout(self.answer_within, &mut rx).await;
        let replies = match in_time {
            Ok(Ok(r)) => Some(r),
            Ok(Err(_)) => Some(Vec::new()),
            Err(_) => {
                rx.close();
                rx.try_recv().ok()
            }
        };
        match replies {
            Some(r) if r.len() <= 1 => answer(&turn, r.into_iter().next()),
            Some(r) => {
                // More than one message: only the webhook can send the rest, after this answer.
                let (api, t) = (self.api.clone(), (*turn).clone());
                self.tasks.spawn(async move { complete(&api, &t, r).await });
                deferred(&turn)
            }
            None => {
                tracing::debug!(interaction = %turn.id, "the core is still working; deferred");
                deferred(&turn)
            }
        }
    }
}

fn private_answer(text: &str) -> Value {
    json!({"type": CHANNEL_MESSAGE, "data": {"content": text, "flags": EPHEMERAL,
        "allowed_mentions": {"parse": []}}})
}

fn deferred(turn: &Turn) -> Value {
    json!({"type": if turn.component { DEFERRED_UPDATE_MESSAGE } else { DEFERRED_CHANNEL_MESSAGE }})
}

/// Whether `reply` replaces the message the button of `turn` is on.
fn edits_own_message(turn: &Turn, reply: &Reply) -> bool {
    match (&turn.incoming.kind, &reply.replace) {
        (
            IncomingKind::Action {
                message: Some(m), ..
            },
            Some(r),
        ) => turn.component && !reply.ephemeral && m.id == r.id,
        _ => false,
    }
}

/// The immediate answer carrying the core's only reply.
fn answer(turn: &Turn, reply: Option<Reply>) -> Value {
    let Some(reply) = reply else {
        // The core recognised a delivery it had handled (its store outlives this process).
        return private_answer("This request was already handled; it did not run again.");
    };
    let kind = if edits_own_message(turn, &reply) {
        UPDATE_MESSAGE
    } else {
        CHANNEL_MESSAGE
    };
    json!({"type": kind, "data": render(&reply)})
}

/// Completes a deferred interaction through its webhook: the first public reply edits the
/// original response (the "thinking…" message, or the button's message), private ones and the
/// rest are follow-ups; a command's placeholder is removed when nothing public replaced it.
async fn complete(api: &DiscordApi, turn: &Turn, replies: Vec<Reply>) {
    let mut original_used = false;
    for reply in &replies {
        let body = render(reply);
        let edit = !original_used
            && !reply.ephemeral
            && (!turn.component || edits_own_message(turn, reply));
        let result = if edit {
            original_used = true;
            with_retry(|| api.edit_original(&turn.token, &body)).await
        } else {
            with_retry(|| async { api.followup(&turn.token, &body).await.map(|_| ()) }).await
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, channel = %turn.incoming.conversation.channel, "could not answer on Discord");
        }
    }
    if !original_used && !turn.component {
        if let Err(e) = with_retry(|| api.delete_original(&turn.token)).await {
            tracing::warn!(error = %e, "could not remove the deferred placeholder on Discord");
        }
    }
}

/// A webhook call right after the deferred answer can reach Discord before the answer does
/// (404 Unknown Webhook); once more a second later.
async fn with_retry<F, Fut>(mut f: F) -> Result<(), ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), ApiError>>,
{
    match f().await {
        Err(ApiError::Discord { status: 404, .. }) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            f().await
        }
        r => r,
    }
}

/// The interactions route, for the chat listener.
pub fn routes(gw: Arc<DiscordGateway>) -> Router {
    Router::new()
        .route("/chat/discord/interactions", post(interactions))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(gw)
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn interactions(
    State(gw): State<Arc<DiscordGateway>>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let now = now_s();
    if let Err(refusal) = gw.verifier.verify(SignedHeaders::from_map(&h), &body, now) {
        tracing::warn!(reason = %refusal, "refused a Discord interaction");
        return (StatusCode::UNAUTHORIZED, refusal.to_string()).into_response();
    }
    let parsed = match parse::interaction(&body) {
        Ok(p) => p,
        Err(m) => {
            tracing::warn!(reason = %m, "refused a malformed Discord interaction");
            return (StatusCode::BAD_REQUEST, m.to_string()).into_response();
        }
    };
    Json(gw.dispatch(parsed, now).await).into_response()
}

/// Posts the core's follow-ups (progress, sign-offs, alerts) through the REST API.
pub struct DiscordOutbox {
    api: Arc<DiscordApi>,
    tokens: Arc<Tokens>,
}

fn platform(e: ApiError) -> ChatError {
    ChatError::Platform(e.to_string())
}

#[async_trait]
impl Outbox for DiscordOutbox {
    async fn post(&self, to: &ConversationRef, reply: &Reply) -> Result<MessageRef, ChatError> {
        let id = self
            .api
            .create_message(&to.channel, &render(reply))
            .await
            .map_err(platform)?;
        Ok(MessageRef {
            conversation: to.clone(),
            id,
        })
    }

    async fn update(&self, msg: &MessageRef, reply: &Reply) -> Result<(), ChatError> {
        let body = render(reply);
        match self.tokens.get(&msg.id) {
            Some(token) => self.api.edit_original(&token, &body).await,
            None => {
                self.api
                    .edit_message(&msg.conversation.channel, &msg.id, &body)
                    .await
            }
        }
        .map_err(platform)
    }

    async fn ephemeral(
        &self,
        to: &ConversationRef,
        user: &ChatUser,
        _reply: &Reply,
    ) -> Result<(), ChatError> {
        // Discord shows a message to one member only as the answer to their interaction.
        tracing::warn!(channel = %to.channel, user = %user.id, "a private Discord message outside an interaction was not sent");
        Err(ChatError::Platform(
            "Discord has private messages only as answers to an interaction".into(),
        ))
    }
}
