//! Integration tests of the server against real sockets on port 0: OpAMP conformance, the
//! command queue, the REST API. One test binary for the whole crate.

mod auth;
mod chat_alerts;
mod chat_discord;
mod chat_llm;
mod chat_rest;
mod chat_slack;
mod chat_slack_flows;
mod chat_socket;
mod chat_teams;
mod console;
mod console_browser;
mod events;
mod flaky;
mod fluent_opamp;
mod mcp;
mod net;
mod opamp;
mod postgres;
mod registry;
mod rest;
mod scale;
mod support;
mod tls;
