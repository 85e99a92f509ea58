//! The one seam between the MCP adapter and the fleet: [`FleetBackend`], one method per fleet
//! operation the tools need, speaking the REST API's JSON shapes and stable error codes.
//!
//! Two implementations exist: the server's in-process backend (`flotilla_server::mcp_backend`,
//! the service layer with the authenticated caller, channel `mcp`) and [`crate::RestBackend`]
//! (a remote server's REST API, used by `flotilla mcp` over stdio). Because both return what
//! REST returns, a tool behaves the same whichever transport or backend serves it, and no fleet
//! operation is implemented twice.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A refusal or failure, with the REST API's stable code (`not_found`, `invalid_params`,
/// `invalid_query`, `capability_missing`, `forbidden`, `no_targets`, `too_many_targets`,
/// `conflict`, `bad_request`, `unauthorized`, `storage_unavailable`, ...) and a message for
/// the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code})")]
pub struct BackendError {
    pub code: String,
    pub message: String,
}

impl BackendError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> BackendError {
        BackendError {
            code: code.into(),
            message: message.into(),
        }
    }
}

pub type BackendResult<T> = Result<T, BackendError>;

/// What a command goes to: one agent (uid) or every agent matching a search query (fan-out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueTarget {
    Agent(String),
    Query(String),
}

/// A target set as a dry run saw it (REST's `expect_targets`): how many agents and a digest of
/// their uids. Queuing with it fails with `targets_changed`, queuing nothing, if the set changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedTargets {
    pub count: usize,
    pub digest: String,
}

/// Filters of `GET /api/v1/commands` (all optional; strings as REST takes them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandsFilter {
    pub agent: Option<String>,
    pub status: Option<String>,
    pub kind: Option<String>,
    pub batch: Option<String>,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

/// Filters of `GET /api/v1/audit` (all optional; times RFC 3339 or unix milliseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub channel: Option<String>,
    pub agent: Option<String>,
    pub operation: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

/// The fleet operations behind the MCP tools. Every method returns exactly the JSON body the
/// REST endpoint named in its doc returns, and every error carries the REST error code.
/// Implementations act as one authenticated caller: authorisation and audit happen behind
/// this trait, in the service layer, never in the MCP adapter.
#[async_trait]
pub trait FleetBackend: Send + Sync {
    /// A stable string naming the caller (who, with which role); confirmation tokens are bound
    /// to it so one caller cannot spend another's confirmation.
    fn identity(&self) -> String;

    /// `GET /api/v1/agents?q=&limit=&cursor=&total=`: `{items, next_cursor, total?}`.
    async fn search(
        &self,
        q: &str,
        limit: Option<usize>,
        cursor: Option<&str>,
        total: bool,
    ) -> BackendResult<Value>;

    /// The uid of the agent `reference` names: a uid, a unique host or service name, or a
    /// query matching exactly one agent — the service's resolution, as
    /// `GET /api/v1/agents/{reference}` applies it. `ambiguous_agent` (the candidates listed)
    /// or `not_found` otherwise.
    async fn resolve_agent(&self, reference: &str) -> BackendResult<String>;

    /// `GET /api/v1/agents/{uid}`: the full agent view with `recent_commands`.
    async fn agent(&self, uid: &str) -> BackendResult<Value>;

    /// `GET /api/v1/fleet/summary`: `{total, by_type, by_version, by_health, by_state}`.
    async fn summary(&self) -> BackendResult<Value>;

    /// `GET /api/v1/catalog`: `{kinds: [{kind, description, requires, destructive,
    /// params_schema, capable_agents}]}`.
    async fn catalog(&self) -> BackendResult<Value>;

    /// `POST /api/v1/commands` with `dry_run: true`: what `queue` would do after all of its
    /// checks (role, parameters, capabilities, `max_fanout`), queuing nothing: `{dry_run, kind,
    /// params, destructive, target, matched, target_count, targets, skipped_count, skipped,
    /// expect_targets}`. Fails exactly where `queue` would.
    async fn plan(&self, target: &QueueTarget, kind: &str, params: &Value) -> BackendResult<Value>;

    /// `POST /api/v1/commands` with `agent` or `query`: `{command_id, command}` for one agent,
    /// `{batch_id, queued, skipped, commands}` for a fan-out. With `expect`, refused with
    /// `targets_changed` (nothing queued) unless the targets are still exactly those of the plan.
    async fn queue(
        &self,
        target: &QueueTarget,
        kind: &str,
        params: &Value,
        expect: Option<&ExpectedTargets>,
    ) -> BackendResult<Value>;

    /// `GET /api/v1/commands/{id}`: one command.
    async fn command(&self, id: &str) -> BackendResult<Value>;

    /// `GET /api/v1/batches/{id}`: `{batch, counts, commands}`.
    async fn batch(&self, id: &str) -> BackendResult<Value>;

    /// `GET /api/v1/commands`: `{items, next_cursor}`, newest first.
    async fn commands(&self, filter: &CommandsFilter) -> BackendResult<Value>;

    /// `GET /api/v1/audit`: `{items, next_cursor}`, newest first.
    async fn audit(&self, filter: &AuditFilter) -> BackendResult<Value>;

    /// `DELETE /api/v1/commands/{id}`: cancels a queued command; the command after the change.
    async fn cancel(&self, id: &str) -> BackendResult<Value>;
}

/// The backend for one HTTP request, put in the request's extensions by the server's
/// authentication middleware; the MCP handler prefers it over its default backend so every
/// request runs as the caller who sent it.
#[derive(Clone)]
pub struct BackendHandle(pub Arc<dyn FleetBackend>);

impl std::fmt::Debug for BackendHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BackendHandle")
            .field(&self.0.identity())
            .finish()
    }
}
