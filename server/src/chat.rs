//! The chat listener (`chat.listen`): the in-process chat gateways. Each gateway's requests
//! reach the platform-neutral conversation core (`flotilla_chat::core`), whose tool calls run
//! through [`McpBackend`] over the one service layer as the chat user: actor
//! `slack:<team>/<user> (<name>)`, channel `slack`, the role the identity mapping gives them.
//! The listener carries only the chat routes, so the operator API can stay on loopback.

use std::sync::Arc;

use axum::Router;
use flotilla_chat::core::gateway::{Core, CoreOptions};
use flotilla_chat::core::identity::IdentityConfig;
use flotilla_chat::core::state::MemoryState;
use flotilla_chat::slack::client::{BotToken, SlackApi};
use flotilla_chat::slack::gateway::{routes, SlackGateway};
use flotilla_chat::slack::verify::{SigningSecret, Verifier};
use flotilla_chat::{actor, BackendFor, ChatUser, ConversationRef, Platform, Role as ChatRole};
use flotilla_mcp::FleetBackend;

use crate::config::{SlackConfig, SlackSettings};
use crate::mcp_backend::McpBackend;
use crate::model::{Caller, Channel, Role};
use crate::service::Fleet;

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

fn channel(p: Platform) -> Channel {
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

/// The Slack gateway's routes.
pub fn slack_routes(
    fleet: Fleet,
    cfg: &SlackConfig,
    s: &SlackSettings,
) -> Result<(Router, Arc<SlackGateway>), ChatSetupError> {
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
    let core = Arc::new(Core::new(
        identity,
        backend_for(fleet),
        Arc::new(MemoryState::default()),
        CoreOptions::default(),
    ));
    let secret =
        SigningSecret::new(&s.signing_secret).map_err(|e| ChatSetupError(e.to_string()))?;
    let token = BotToken::new(&s.bot_token).map_err(|e| ChatSetupError(e.to_string()))?;
    let api = SlackApi::new(&s.api_url, token).map_err(|e| ChatSetupError(e.to_string()))?;
    let gw = SlackGateway::new(Verifier::new(secret), api, core);
    Ok((routes(gw.clone()), gw))
}
