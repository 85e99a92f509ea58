//! Flotilla's chat gateways: a platform-neutral conversation core ([`core`]) that plans chat
//! messages into calls of the same tools the MCP server exposes (through
//! `flotilla_mcp::FleetBackend`, so chat and MCP clients never disagree), and the platform
//! adapters that render its replies (Slack, Teams, Discord).

pub mod core;
pub mod discord;
pub mod slack;
pub mod teams;

pub use crate::core::types::{
    actor, BackendFor, Block, Button, ChatError, ChatUser, ConversationRef, Incoming, IncomingKind,
    MessageRef, Outbox, Platform, Reply, Role, Style,
};
