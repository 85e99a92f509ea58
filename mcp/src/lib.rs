//! Flotilla's MCP server: the fleet as tools, prompts and resources for LLM clients (Claude
//! Desktop, Codex, any MCP client) over stdio, streamable HTTP and legacy HTTP+SSE.
//!
//! A thin adapter: every fleet operation goes through a [`FleetBackend`] — in the server
//! process the service layer itself (authorised and audited with channel `mcp`), in
//! `flotilla mcp` a remote server's REST API ([`RestBackend`]). See `mcp/README.md`.

pub mod backend;
pub mod confirm;
pub mod http;
pub mod prompts;
pub mod rest_backend;
pub mod server;
pub mod stdio;
pub mod tools;

pub use backend::{
    AuditFilter, BackendError, BackendHandle, BackendResult, CommandsFilter, ExpectedTargets,
    FleetBackend, QueueTarget,
};
pub use confirm::ConfirmStore;
pub use http::{router, HttpOptions};
pub use rest_backend::{RestBackend, RestOptions};
pub use server::FlotillaMcp;
pub use stdio::{read_token_file, run_stdio};
