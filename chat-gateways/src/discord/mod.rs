//! Discord, the platform: interaction verification (Ed25519), payload parsing, the `/flotilla`
//! command's definition, embed and button rendering, the REST client, the chat-listener
//! route `/chat/discord/interactions`, and the Gateway WebSocket for mentions and DMs (`ws`). Everything Discord-specific lives here; the conversation
//! itself is the platform-neutral core's.

pub mod client;
pub mod commands;
pub mod gateway;
pub mod parse;
pub mod render;
pub mod verify;
pub mod ws;
