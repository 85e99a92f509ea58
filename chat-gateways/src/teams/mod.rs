//! Microsoft Teams through the Bot Framework: bearer-token authentication against the Bot
//! Framework OpenID metadata (`verify`), activity parsing (`parse`), Adaptive Card rendering
//! (`render`), the Bot Connector client with its client-credentials token (`client`), the
//! messaging endpoint `/chat/teams/messages` with its outbox (`gateway`), and the app package
//! `flotilla chat teams package` writes (`package`). The conversation itself is the
//! platform-neutral core's.

pub mod client;
pub mod gateway;
pub mod package;
pub mod parse;
pub mod render;
pub mod verify;
