//! The chat crate's one integration-test binary: modules per owner (`core_*` the conversation
//! core, `slack_*` the Slack adapter, `teams_*` the Teams adapter, `discord_*` the Discord adapter).

mod core_alerts;
mod core_gateway;
mod core_llm;
mod core_planner;
mod core_sessions;
mod core_types;
mod discord_gateway;
mod discord_ws;
mod slack_api;
mod slack_gateway;
mod teams_gateway;
