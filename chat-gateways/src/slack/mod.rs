//! Slack, the platform: request verification, payload parsing, Block Kit rendering, the Web API
//! client, and the chat-listener routes (`/chat/slack/commands`, `/chat/slack/events`,
//! `/chat/slack/interactions`) or Socket Mode (`socket`). Everything Slack-specific lives here; the conversation itself is
//! the platform-neutral core's.

pub mod client;
pub mod gateway;
pub mod pace;
pub mod parse;
pub mod render;
pub mod socket;
pub mod verify;
