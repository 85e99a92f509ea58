//! flotilla-supervisor: runs one Fluent Bit or Fluentd next to it and lets a Flotilla (or any
//! spec-conformant OpAMP) server manage it — identity, health, effective and remote config with
//! rollback, restart/shutdown/ChatOps commands executed exactly once.
//!
//! Depends only on `flotilla-proto` and small crates; no server, database or chat code.

pub mod agent;
pub mod auth;
pub mod backoff;
pub mod commands;
pub mod config;
pub mod fluent;
pub mod healthz;
pub mod remote;
pub mod reporter;
pub mod state;
pub mod supervisor;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transport;
pub mod view;
