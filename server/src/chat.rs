//! The chat listener (`chat.listen`): the in-process chat gateways. Each gateway's requests
//! reach the platform-neutral conversation core (`flotilla_chat::core`), whose tool calls run
//! through [`McpBackend`] over the one service layer as the chat user: actor
//! `slack:<team>/<user> (<name>)`, channel `slack`, the role the identity mapping gives them.
//! The listener carries only the chat routes, so the operator API can stay on loopback; in
//! Socket Mode (`chat.slack.mode = "socket"`) there is no listener: the gateway opens its
//! WebSockets to Slack and hands the envelopes to the same gateway below the transport.
//! Teams (`[chat.teams]`) posts to `/chat/teams/messages` on the same listener, Discord
//! (`[chat.discord]`) to `/chat/discord/interactions`, and with `chat.discord.gateway` the bot
//! also holds a Gateway WebSocket for mentions and DMs. Beside them
//! runs one alert engine (`flotilla_chat::core::alerts`), fed by the fleet event bus and
//! posting to subscribed channels through each platform's outbox, and one housekeeping over
//! the shared chat state. The same gateways also run as their own process (`flotilla chat`,
//! [`Sources::standalone`]): tool calls then reach a remote server's REST API as a gateway
//! token acting for the chat user, and no alerts run.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use flotilla_chat::core::alerts::{AlertEngine, AlertOptions};
use flotilla_chat::core::gateway::{Core, CoreOptions};
use flotilla_chat::core::identity::IdentityConfig;
use flotilla_chat::core::planner::llm::{LlmConfig, LlmPlanner};
use flotilla_chat::core::state::{ChatState, MemoryState};
use flotilla_chat::core::types::Outboxes;
use flotilla_chat::discord::client::{BotToken as DiscordToken, DiscordApi};
use flotilla_chat::discord::gateway::DiscordGateway;
use flotilla_chat::discord::verify::Verifier as DiscordVerifier;
use flotilla_chat::discord::ws::{DiscordWs, WsOptions};
use flotilla_chat::slack::client::{BotToken, SlackApi};
use flotilla_chat::slack::gateway::{routes as slack_routes, SlackGateway};
use flotilla_chat::slack::socket::{AppToken, SocketMode, SocketOptions};
use flotilla_chat::slack::verify::{SigningSecret, Verifier};
use flotilla_chat::teams::client::{AppPassword, Connector};
use flotilla_chat::teams::gateway::{ServiceUrls, TeamsGateway};
use flotilla_chat::teams::verify::{KeyOptions, TokenVerifier};
use flotilla_chat::{
    actor, BackendFor, ChatUser, ConversationRef, Outbox, Platform, Role as ChatRole,
};
use flotilla_mcp::FleetBackend;

use crate::config::{
    ChatAccess, DiscordConfig, DiscordSettings, SlackConfig, SlackSettings, SlackTransport,
    TeamsConfig, TeamsSettings,
};
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

/// The chat gateways, running: their routes for the chat listener (`None` when nothing is
/// served over HTTP: Slack in Socket Mode alone), and their duties.
pub struct Chat {
    pub routes: Option<Router>,
    pub housekeeping: ChatHousekeeping,
}

/// Who may do what on one platform.
fn identity(access: &ChatAccess) -> IdentityConfig {
    IdentityConfig {
        users: access.users.clone().into_iter().collect(),
        groups: access.groups.clone().into_iter().collect(),
        channels: access.channels.clone().into_iter().collect(),
        default_role: access.default_role,
        allowed_channels: access
            .allowed_channels
            .clone()
            .map(|c| c.into_iter().collect()),
        two_person: access.two_person.clone().into_iter().collect(),
    }
}

/// What the gateways run over: how a chat user reaches the fleet, where conversation state
/// lives, and the fleet events for alerts.
pub struct Sources {
    pub backend_for: BackendFor,
    pub state: Arc<dyn ChatState>,
    /// `None` in a standalone `flotilla chat`: no alert engine runs and `subscribe` says why.
    pub events: Option<EventReceiver>,
    /// The gateway token's name in a standalone `flotilla chat` (see
    /// `CoreOptions::acting_as`).
    pub acting_as: Option<String>,
}

impl Sources {
    /// Inside `flotilla serve`: the service layer itself, the store's chat tables, the event
    /// bus (subscribed now, before anything is served, so no event after start is missed).
    pub fn fleet(fleet: &Fleet) -> Sources {
        // Pending confirmations and thread context live in the store when it has chat tables,
        // so a server restart does not void a preview someone is about to confirm.
        let state: Arc<dyn ChatState> = match fleet.store().clone().chat_store() {
            Some(cs) => Arc::new(StoreChatState(cs)),
            None => Arc::new(MemoryState::default()),
        };
        Sources {
            backend_for: backend_for(fleet.clone()),
            state,
            events: Some(fleet.subscribe()),
            acting_as: None,
        }
    }

    /// A standalone `flotilla chat`: every chat user's calls go to a remote server's REST API
    /// as the gateway token `token_name` acting for the user; state in memory; no alerts.
    pub fn standalone(rest: flotilla_mcp::RestBackend, token_name: String) -> Sources {
        Sources {
            backend_for: rest_backend_for(rest),
            state: Arc::new(MemoryState::default()),
            events: None,
            acting_as: Some(token_name),
        }
    }
}

/// A remote server's fleet as one chat user sees it: `rest` (a gateway token) acting for the
/// user with the role the access map gave them.
pub fn rest_backend_for(rest: flotilla_mcp::RestBackend) -> BackendFor {
    Arc::new(
        move |user: &ChatUser, conv: &ConversationRef, r: ChatRole| -> Arc<dyn FleetBackend> {
            Arc::new(rest.acting_for(&actor(user, conv), r.as_str()))
        },
    )
}

/// Builds the enabled gateways over one chat state and, when `sources` has events, one alert
/// engine; Slack in Socket Mode also opens its connections here (a refused app token fails at
/// start). With `llm`, messages the rule planner asks back about go to the LLM planner. `None`
/// when no gateway is enabled.
pub async fn gateways(
    sources: Sources,
    slack: Option<(&SlackConfig, &SlackSettings)>,
    teams: Option<(&TeamsConfig, &TeamsSettings)>,
    discord: Option<(&DiscordConfig, &DiscordSettings)>,
    llm: Option<&LlmConfig>,
) -> Result<Option<Chat>, ChatSetupError> {
    if slack.is_none() && teams.is_none() && discord.is_none() {
        return Ok(None);
    }
    let Sources {
        backend_for,
        state,
        events,
        acting_as,
    } = sources;
    let llm = match llm {
        Some(c) => {
            let p = LlmPlanner::new(c.clone()).map_err(|e| ChatSetupError(e.to_string()))?;
            tracing::info!(base_url = %c.base_url, model = %c.model, "chat: LLM planner on (after the rule planner)");
            Some(Arc::new(p))
        }
        None => None,
    };
    let core = |access: &ChatAccess, confirm_expiry_s: u64| {
        let options = CoreOptions {
            llm: llm.clone(),
            confirm_ttl: std::time::Duration::from_secs(confirm_expiry_s),
            alerts: events.is_some(),
            acting_as: acting_as.clone(),
            ..CoreOptions::default()
        };
        Arc::new(Core::new(
            identity(access),
            backend_for.clone(),
            state.clone(),
            options,
        ))
    };
    let setup = |e: &dyn std::fmt::Display| ChatSetupError(e.to_string());
    let mut routes: Option<Router> = None;
    let mut outboxes: HashMap<Platform, Arc<dyn Outbox>> = HashMap::new();
    let mut drains = Drains::default();
    let mut any_core = None;
    if let Some((cfg, s)) = slack {
        let core = core(&cfg.access, cfg.confirm_expiry_s);
        any_core = Some(core.clone());
        let token = BotToken::new(&s.bot_token).map_err(|e| setup(&e))?;
        let api = SlackApi::new(&s.api_url, token).map_err(|e| setup(&e))?;
        let gw = match &s.transport {
            SlackTransport::Http { signing_secret } => {
                let secret = SigningSecret::new(signing_secret).map_err(|e| setup(&e))?;
                let gw = SlackGateway::new(Verifier::new(secret), api, core);
                routes = Some(slack_routes(gw.clone()));
                gw
            }
            SlackTransport::Socket { app_token } => {
                let app = AppToken::new(app_token).map_err(|e| setup(&e))?;
                let gw = SlackGateway::socket_only(api, core);
                let socket =
                    SocketMode::start(gw.clone(), &s.api_url, app, SocketOptions::default())
                        .await
                        .map_err(|e| setup(&e))?;
                tracing::info!("Slack gateway in Socket Mode (no chat listener)");
                drains.socket = Some(socket);
                gw
            }
        };
        outboxes.insert(Platform::Slack, gw.outbox());
        drains.slack = Some(gw);
    }
    if let Some((cfg, s)) = teams {
        let core = core(&cfg.access, cfg.confirm_expiry_s);
        any_core = Some(core.clone());
        let verifier = TokenVerifier::new(
            &s.app_id,
            &s.openid_metadata_url,
            KeyOptions {
                min_refresh: std::time::Duration::from_secs(s.keys_min_refresh_s),
                ..KeyOptions::default()
            },
        );
        let password = AppPassword::new(&s.app_password).map_err(|e| setup(&e))?;
        let connector = Arc::new(Connector::new(&s.app_id, password, &s.token_url));
        let urls = Arc::new(ServiceUrls::new(&s.service_url));
        let gw = TeamsGateway::new(verifier, connector, urls, core);
        let r = flotilla_chat::teams::gateway::routes(gw.clone());
        routes = Some(match routes {
            Some(x) => x.merge(r),
            None => r,
        });
        outboxes.insert(Platform::Teams, gw.outbox());
        drains.teams = Some(gw);
    }
    if let Some((cfg, s)) = discord {
        let core = core(&cfg.access, cfg.confirm_expiry_s);
        any_core = Some(core.clone());
        let token = DiscordToken::new(&s.bot_token).map_err(|e| setup(&e))?;
        let api = DiscordApi::new(&s.api_url, &s.application_id, token).map_err(|e| setup(&e))?;
        let api = Arc::new(api);
        let gw = DiscordGateway::new(
            DiscordVerifier::new(s.public_key.clone()),
            api.clone(),
            core.clone(),
        );
        if s.gateway {
            // Mentions and DMs: a refused bot token stops the start here.
            let ws = DiscordWs::start(api, &s.bot_token, core, gw.outbox(), WsOptions::default())
                .await
                .map_err(|e| setup(&e))?;
            drains.discord_ws = Some(ws);
        }
        let r = flotilla_chat::discord::gateway::routes(gw.clone());
        routes = Some(match routes {
            Some(x) => x.merge(r),
            None => r,
        });
        outboxes.insert(Platform::Discord, gw.outbox());
        drains.discord = Some(gw);
    }
    let Some(core) = any_core else {
        return Ok(None);
    };
    let alerts = events.map(|events| {
        let engine = Arc::new(AlertEngine::new(
            state,
            backend_for,
            outboxes.clone(),
            AlertOptions::default(),
        ));
        (engine, events)
    });
    Ok(Some(Chat {
        routes,
        housekeeping: ChatHousekeeping {
            core,
            outbox: Arc::new(Outboxes(outboxes)),
            drains,
            alerts,
        },
    }))
}

/// The gateways' turns in flight, finished at shutdown (and Slack's Socket Mode closed first).
#[derive(Default)]
struct Drains {
    slack: Option<Arc<SlackGateway>>,
    socket: Option<SocketMode>,
    teams: Option<Arc<TeamsGateway>>,
    discord: Option<Arc<DiscordGateway>>,
    discord_ws: Option<DiscordWs>,
}

/// The gateway's periodic and shutdown duties: expiring confirmations, signing off idle
/// threads, telling open threads the server is going away; and the fleet alerts.
pub struct ChatHousekeeping {
    /// Any gateway's core: they share the state, so one sweeps for all.
    core: Arc<Core>,
    /// Every gateway's outbox, by platform.
    outbox: Arc<Outboxes>,
    drains: Drains,
    alerts: Option<(Arc<AlertEngine>, EventReceiver)>,
}

pub type EventReceiver = tokio::sync::broadcast::Receiver<crate::events::Event>;

/// How often idle threads and expired confirmations are looked for.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl ChatHousekeeping {
    /// Sweeps until `stop`, then finishes the turns in flight and posts the shutdown notice.
    pub async fn run(self, stop: tokio_util::sync::CancellationToken) {
        let alerts = self
            .alerts
            .map(|(engine, events)| tokio::spawn(engine.run(events, stop.clone())));
        let outbox = self.outbox.clone();
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => { self.core.sweep(outbox.as_ref()).await; }
            }
        }
        if let Some(Err(e)) = match alerts {
            Some(a) => Some(a.await),
            None => None,
        } {
            tracing::warn!(error = %e, "chat alerts ended abnormally");
        }
        // No new deliveries; Slack keeps (and retries) what arrives meanwhile.
        if let Some(socket) = &self.drains.socket {
            socket.shutdown().await;
        }
        if let Some(ws) = &self.drains.discord_ws {
            ws.shutdown().await;
        }
        // Conversation turns still running finish their answers before the notice.
        if let Some(gw) = &self.drains.slack {
            gw.drain().await;
        }
        if let Some(gw) = &self.drains.teams {
            gw.drain().await;
        }
        if let Some(gw) = &self.drains.discord {
            gw.drain().await;
        }
        let n = self.core.shutdown_notice(outbox.as_ref()).await;
        if n > 0 {
            tracing::info!(threads = n, "chat: shutdown notice posted");
        }
    }
}
