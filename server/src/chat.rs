//! The chat listener (`chat.listen`): the in-process chat gateways. Each gateway's requests
//! reach the platform-neutral conversation core (`flotilla_chat::core`), whose tool calls run
//! through [`McpBackend`] over the one service layer as the chat user: actor
//! `slack:<team>/<user> (<name>)`, channel `slack`, the role the identity mapping gives them.
//! The listener carries only the chat routes, so the operator API can stay on loopback; in
//! Socket Mode (`chat.slack.mode = "socket"`) there is no listener: the gateway opens its
//! WebSockets to Slack and hands the envelopes to the same gateway below the transport.
//! Beside it runs the alert engine (`flotilla_chat::core::alerts`), fed by the fleet event
//! bus and posting to subscribed channels through the gateway's outbox.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use flotilla_chat::core::alerts::{AlertEngine, AlertOptions};
use flotilla_chat::core::gateway::{Core, CoreOptions};
use flotilla_chat::core::identity::IdentityConfig;
use flotilla_chat::core::planner::llm::{LlmConfig, LlmPlanner};
use flotilla_chat::core::state::{ChatState, MemoryState};
use flotilla_chat::slack::client::{BotToken, SlackApi};
use flotilla_chat::slack::gateway::{routes, SlackGateway};
use flotilla_chat::slack::socket::{AppToken, SocketMode, SocketOptions};
use flotilla_chat::slack::verify::{SigningSecret, Verifier};
use flotilla_chat::{actor, BackendFor, ChatUser, ConversationRef, Platform, Role as ChatRole};
use flotilla_mcp::FleetBackend;

use crate::config::{SlackConfig, SlackSettings, SlackTransport};
use crate::mcp_backend::McpBackend;
use crate::model::{Caller, Channel, Role};
use crate::service::Fleet;
use crate::store::chat::StoreChatState;

/// Why a gateway could not be built (its settings were validated already, so only a secret
/// the chat crate refuses can get here).
#[derive(Debug, thiserror::Error)]
#[error("chat gateway: {0}")]
pub struct ChatSetupError(String);

fn role(r: ChatRole) -> Role {
    match r {
        ChatRole::Viewer => Role::Viewer,
        ChatRole::Operator => Role::Operator,
        ChatRole::Admin => Role::Admin,
    }
}

/// The audit channel of a chat platform.
pub(crate) fn channel(p: Platform) -> Channel {
    match p {
        Platform::Slack => Channel::Slack,
        Platform::Discord => Channel::Discord,
        Platform::Teams => Channel::Teams,
    }
}

/// The fleet as one chat user sees it.
fn backend_for(fleet: Fleet) -> BackendFor {
    Arc::new(
        move |user: &ChatUser, conv: &ConversationRef, r: ChatRole| -> Arc<dyn FleetBackend> {
            Arc::new(McpBackend::for_chat(
                fleet.clone(),
                Caller {
                    actor: actor(user, conv),
                    channel: channel(conv.platform),
                    role: role(r),
                },
            ))
        },
    )
}

/// The Slack gateway, running: its routes for the chat listener (HTTP mode), and its duties.
pub struct SlackChat {
    /// `None` in Socket Mode: nothing is served.
    pub routes: Option<Router>,
    pub housekeeping: ChatHousekeeping,
}

/// Builds the Slack gateway; in Socket Mode, also opens its connections (a refused app token
/// fails here, at start). With `llm`, messages the rule planner asks back about go to the LLM
/// planner.
pub async fn slack_gateway(
    fleet: Fleet,
    cfg: &SlackConfig,
    s: &SlackSettings,
    llm: Option<&LlmConfig>,
) -> Result<SlackChat, ChatSetupError> {
    let identity = IdentityConfig {
        users: cfg.access.users.clone().into_iter().collect(),
        groups: cfg.access.groups.clone().into_iter().collect(),
        channels: cfg.access.channels.clone().into_iter().collect(),
        default_role: cfg.access.default_role,
        allowed_channels: cfg
            .access
            .allowed_channels
            .clone()
            .map(|c| c.into_iter().collect()),
        two_person: cfg.access.two_person.clone().into_iter().collect(),
    };
    // Pending confirmations and thread context live in the store when it has chat tables, so
    // a server restart does not void a preview someone is about to confirm.
    let state: Arc<dyn ChatState> = match fleet.store().clone().chat_store() {
        Some(cs) => Arc::new(StoreChatState(cs)),
        None => Arc::new(MemoryState::default()),
    };
    let llm = match llm {
        Some(c) => {
            let p = LlmPlanner::new(c.clone()).map_err(|e| ChatSetupError(e.to_string()))?;
            tracing::info!(base_url = %c.base_url, model = %c.model, "chat: LLM planner on (after the rule planner)");
            Some(Arc::new(p))
        }
        None => None,
    };
    let options = CoreOptions {
        llm,
        confirm_ttl: std::time::Duration::from_secs(cfg.confirm_expiry_s),
        ..CoreOptions::default()
    };
    // Taken before anything is served, so no event after start is missed by the alerts.
    let events = fleet.subscribe();
    let core = Arc::new(Core::new(
        identity,
        backend_for(fleet.clone()),
        state.clone(),
        options,
    ));
    let alerts = move |gw: &Arc<SlackGateway>| {
        let engine = Arc::new(AlertEngine::new(
            state,
            backend_for(fleet),
            HashMap::from([(Platform::Slack, gw.outbox())]),
            AlertOptions::default(),
        ));
        (engine, events)
    };
    let setup = |e: &dyn std::fmt::Display| ChatSetupError(e.to_string());
    let token = BotToken::new(&s.bot_token).map_err(|e| setup(&e))?;
    let api = SlackApi::new(&s.api_url, token).map_err(|e| setup(&e))?;
    match &s.transport {
        SlackTransport::Http { signing_secret } => {
            let secret = SigningSecret::new(signing_secret).map_err(|e| setup(&e))?;
            let gw = SlackGateway::new(Verifier::new(secret), api, core.clone());
            Ok(SlackChat {
                routes: Some(routes(gw.clone())),
                housekeeping: ChatHousekeeping {
                    core,
                    alerts: alerts(&gw),
                    gw,
                    socket: None,
                },
            })
        }
        SlackTransport::Socket { app_token } => {
            let app = AppToken::new(app_token).map_err(|e| setup(&e))?;
            let gw = SlackGateway::socket_only(api, core.clone());
            let socket = SocketMode::start(gw.clone(), &s.api_url, app, SocketOptions::default())
                .await
                .map_err(|e| setup(&e))?;
            tracing::info!("Slack gateway in Socket Mode (no chat listener)");
            Ok(SlackChat {
                routes: None,
                housekeeping: ChatHousekeeping {
                    core,
                    alerts: alerts(&gw),
                    gw,
                    socket: Some(socket),
                },
            })
        }
    }
}

/// The gateway's periodic and shutdown duties: expiring confirmations, signing off idle
/// threads, telling open threads the server is going away; and the fleet alerts.
pub struct ChatHousekeeping {
    core: Arc<Core>,
    gw: Arc<SlackGateway>,
    socket: Option<SocketMode>,
    alerts: (Arc<AlertEngine>, EventReceiver),
}

type EventReceiver = tokio::sync::broadcast::Receiver<crate::events::Event>;

/// How often idle threads and expired confirmations are looked for.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl ChatHousekeeping {
    /// Sweeps until `stop`, then finishes the turns in flight and posts the shutdown notice.
    pub async fn run(self, stop: tokio_util::sync::CancellationToken) {
        let (engine, events) = self.alerts;
        let alerts = tokio::spawn(engine.run(events, stop.clone()));
        let outbox = self.gw.outbox();
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => { self.core.sweep(outbox.as_ref()).await; }
            }
        }
        if let Err(e) = alerts.await {
            tracing::warn!(error = %e, "chat alerts ended abnormally");
        }
        // No new deliveries; Slack keeps (and retries) what arrives meanwhile.
        if let Some(socket) = &self.socket {
            socket.shutdown().await;
        }
        // Conversation turns still running finish their answers before the notice.
        self.gw.drain().await;
        let n = self.core.shutdown_notice(outbox.as_ref()).await;
        if n > 0 {
            tracing::info!(threads = n, "chat: shutdown notice posted");
        }
    }
}
