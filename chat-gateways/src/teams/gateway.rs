//! The Teams gateway: the chat listener's messaging endpoint `/chat/teams/messages` (what the
//! Azure Bot's "Messaging endpoint" points at) and the [`Outbox`] that posts through the Bot
//! Connector API.
//!
//! A request is authenticated first (the bearer JWT, [`super::verify`]), then its activity is
//! compared with the token (`serviceUrl`, channel endorsement), parsed, answered 200 at once,
//! and handed to the conversation core in the background; the core's replies go back as
//! replies to the activity (in its thread), updates in place (`PUT`) or new messages. A second
//! delivery of the same activity id is recognised by the core's delivery record and not run
//! again. Teams has no ephemeral messages in channels, so private replies are posted as
//! replies in the thread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header::AUTHORIZATION, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use tokio_util::task::TaskTracker;

use super::client::{Connector, ConnectorError};
use super::parse::{self, conversation_id, Parsed, Reference};
use super::render::render;
use super::verify::TokenVerifier;
use crate::core::gateway::Handler;
use crate::core::types::{
    ChatError, ChatUser, ConversationRef, Incoming, MessageRef, Outbox, Reply,
};

/// The messaging endpoint's path on the chat listener.
pub const MESSAGES_PATH: &str = "/chat/teams/messages";
/// Activities are small; Teams caps a message near 28 KB.
const MAX_BODY: usize = 256 * 1024;
/// The global Teams service URL, for posting where no activity has said which to use (an
/// alert channel after a restart). Microsoft documents it for proactive messages.
pub const DEFAULT_SERVICE_URL: &str = "https://smba.trafficmanager.net/teams/";

/// Where each conversation's Connector API is: learnt from authenticated activities only (the
/// token's `serviceUrl` claim matched), so the bot's token is never sent anywhere else.
#[derive(Debug)]
pub struct ServiceUrls {
    known: Mutex<HashMap<String, String>>,
    fallback: String,
}

impl ServiceUrls {
    pub fn new(fallback: &str) -> ServiceUrls {
        ServiceUrls {
            known: Mutex::new(HashMap::new()),
            fallback: fallback.to_string(),
        }
    }

    fn learn(&self, channel: &str, url: &str) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(channel.to_string(), url.to_string());
    }

    /// The service URL of a conversation.
    pub fn of(&self, c: &ConversationRef) -> String {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&c.channel)
            .cloned()
            .unwrap_or_else(|| self.fallback.clone())
    }
}

/// The Teams side of the chat gateway.
pub struct TeamsGateway {
    verifier: TokenVerifier,
    connector: Arc<Connector>,
    urls: Arc<ServiceUrls>,
    handler: Arc<dyn Handler>,
    tasks: TaskTracker,
}

impl TeamsGateway {
    pub fn new(
        verifier: TokenVerifier,
        connector: Arc<Connector>,
        urls: Arc<ServiceUrls>,
        handler: Arc<dyn Handler>,
    ) -> Arc<TeamsGateway> {
        Arc::new(TeamsGateway {
            verifier,
            connector,
            urls,
            handler,
            tasks: TaskTracker::new(),
        })
    }

    /// The outbox follow-ups and alerts are posted through.
    pub fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(TeamsOutbox {
            connector: self.connector.clone(),
            urls: self.urls.clone(),
        })
    }

    /// Waits for conversation turns still being handled (at shutdown).
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// The messaging endpoint, for the chat listener.
pub fn routes(gw: Arc<TeamsGateway>) -> Router {
    Router::new()
        .route(MESSAGES_PATH, post(messages))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(gw)
}

fn refuse(status: StatusCode, why: String) -> Response {
    (status, why).into_response()
}

async fn messages(State(gw): State<Arc<TeamsGateway>>, h: HeaderMap, body: Bytes) -> Response {
    let auth = h.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let verified = match gw.verifier.verify(auth).await {
        Ok(v) => v,
        Err(r) => {
            tracing::warn!(reason = %r, "refused a Teams request");
            let status = if r.is_unavailable() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::UNAUTHORIZED
            };
            return refuse(status, r.to_string());
        }
    };
    let env = match parse::envelope(&body) {
        Ok(e) => e,
        Err(m) => {
            tracing::warn!(reason = %m, "refused a malformed Teams request");
            return refuse(StatusCode::BAD_REQUEST, m.to_string());
        }
    };
    if let Err(r) = verified.check_activity(&env.service_url, &env.channel_id) {
        tracing::warn!(reason = %r, "refused a Teams request");
        return refuse(StatusCode::UNAUTHORIZED, r.to_string());
    }
    match parse::activity(&body) {
        Err(m) => {
            tracing::warn!(reason = %m, "refused a malformed Teams request");
            refuse(StatusCode::BAD_REQUEST, m.to_string())
        }
        Ok(Parsed::Ignored(why)) => {
            tracing::debug!(why, "Teams activity acknowledged, nothing to do");
            StatusCode::OK.into_response()
        }
        Ok(Parsed::Message {
            incoming,
            reference,
        }) => {
            gw.urls
                .learn(&incoming.conversation.channel, &reference.service_url);
            let g = gw.clone();
            gw.tasks
                .spawn(async move { turn(g, *incoming, reference).await });
            StatusCode::OK.into_response()
        }
    }
}

/// One conversation turn: the core answers; its replies go back to the activity's thread, or
/// replace the message they name.
async fn turn(gw: Arc<TeamsGateway>, incoming: Incoming, reference: Reference) {
    let replies = gw.handler.handle(incoming.clone(), gw.outbox()).await;
    for reply in replies {
        let body = render(&reply);
        let sent = match &reply.replace {
            Some(m) => gw
                .connector
                .update(
                    &gw.urls.of(&m.conversation),
                    &conversation_id(&m.conversation),
                    &m.id,
                    &body,
                )
                .await
                .map(|_| ()),
            None => gw
                .connector
                .reply(
                    &reference.service_url,
                    &reference.conversation_id,
                    &reference.activity_id,
                    &body,
                )
                .await
                .map(|_| ()),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, conversation = %reference.conversation_id, "could not answer on Teams");
        }
    }
}

/// Posts the core's follow-ups (progress, sign-offs, alerts) through the Connector API.
pub struct TeamsOutbox {
    connector: Arc<Connector>,
    urls: Arc<ServiceUrls>,
}

fn platform(e: ConnectorError) -> ChatError {
    ChatError::Platform(e.to_string())
}

#[async_trait]
impl Outbox for TeamsOutbox {
    async fn post(&self, to: &ConversationRef, reply: &Reply) -> Result<MessageRef, ChatError> {
        let id = self
            .connector
            .post(&self.urls.of(to), &conversation_id(to), &render(reply))
            .await
            .map_err(platform)?;
        Ok(MessageRef {
            conversation: to.clone(),
            id,
        })
    }

    async fn update(&self, msg: &MessageRef, reply: &Reply) -> Result<(), ChatError> {
        self.connector
            .update(
                &self.urls.of(&msg.conversation),
                &conversation_id(&msg.conversation),
                &msg.id,
                &render(reply),
            )
            .await
            .map_err(platform)
    }

    /// Teams has no ephemeral messages in channels: posted in the conversation.
    async fn ephemeral(
        &self,
        to: &ConversationRef,
        _user: &ChatUser,
        reply: &Reply,
    ) -> Result<(), ChatError> {
        self.post(to, reply).await.map(|_| ())
    }
}
