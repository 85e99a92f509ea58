//! The tool catalogue: names, descriptions, input schemas (derived from the argument types, so
//! schema and parser cannot disagree), output schemas and annotations.
//!
//! Descriptions are written for the model: they say when to use the tool, what it costs and
//! how the confirmation of destructive calls works.

use std::sync::Arc;

use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// Default and largest page of `agents_search` (kept small: every row costs model context).
pub const SEARCH_DEFAULT_LIMIT: usize = 20;
pub const SEARCH_MAX_LIMIT: usize = 200;
/// Largest page of `remote_config_get` with a query (each row is one agent lookup).
pub const CONFIG_ROWS_MAX_LIMIT: usize = 50;

/// The kinds the server's catalog marks destructive, as named in the tool descriptions. The
/// gate itself follows the catalog (the service's plan says `destructive`); a test in
/// `server/tests/it/mcp.rs` keeps this list equal to the catalog's.
pub const DESTRUCTIVE_KINDS: &[&str] =
    &["restart", "chatops", "shutdown", "custom", "remote_config"];

/// The search language, as the model needs it (mirrors `flotilla_server::query`).
pub const QUERY_HELP: &str = "Query language: whitespace-separated terms, all must match. \
Free text matches uid, attribute values and labels (case-insensitive substring). key:value terms: \
type (fluentbit|fluentd|otelcol), health (healthy|unhealthy|unknown), state (healthy|late|offline|online), \
version, name (service.name), host (host.name), label (k=v or k), capability (restart|remote_config|chatops|shutdown \
or a capability name), uid (prefix), transport (http|websocket), or any attribute key with a dot (host.name:web-*). \
Values are case-insensitive globs (* ?). A leading - negates a term; \"double quotes\" keep spaces. \
The empty query matches every agent. Example: `type:fluentd health:unhealthy`.";

const AGENT_REF: &str = "An agent: its uid, or a unique host name (host.name) or service name \
(service.name), or a query expression with ':' that matches exactly one agent. An ambiguous \
reference is refused with the candidates listed.";

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentsSearchArgs {
    /// Search query (see the tool description); empty or absent matches every agent.
    #[serde(default)]
    pub query: Option<String>,
    /// Rows per page, 1-200 (default 20). The total is always returned, so a small page is
    /// enough to answer "how many".
    #[serde(default)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// Extra sections of `agent_get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Detail {
    /// The full health tree (every component), not just the summary.
    Health,
    /// The configuration files the agent reports running (can be large).
    EffectiveConfig,
    /// The agent's 10 latest commands.
    RecentCommands,
    /// Non-identifying attributes (OS, process, ...).
    Attributes,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentGetArgs {
    /// Uid, unique host name, unique service name, or a query matching exactly one agent.
    pub agent: String,
    /// Extra sections to include; the default answer is a compact overview.
    #[serde(default)]
    pub include: Vec<Detail>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandQueueArgs {
    /// One agent (uid, unique host or service name). Give exactly one of agent and query.
    #[serde(default)]
    pub agent: Option<String>,
    /// Fan-out: every agent matching this search query at queue time (always confirmed).
    #[serde(default)]
    pub query: Option<String>,
    /// Command kind, from commands_catalog: restart, force_resync, new_instance_uid, chatops,
    /// shutdown, custom, remote_config.
    pub kind: String,
    /// Parameters of the kind (see its params_schema in commands_catalog).
    #[serde(default)]
    pub params: Option<Value>,
    /// Show the targets without queuing anything.
    #[serde(default)]
    pub dry_run: bool,
    /// Token from a previous call's confirmation_required answer (same arguments).
    #[serde(default)]
    pub confirmation_token: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandStatusArgs {
    /// A command id (from command_queue or commands_list).
    #[serde(default)]
    pub command_id: Option<String>,
    /// A fan-out batch id: per-agent progress of the whole batch.
    #[serde(default)]
    pub batch_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandsListArgs {
    /// Only this agent's commands (uid or unique host/service name).
    #[serde(default)]
    pub agent: Option<String>,
    /// queued, sent, succeeded, failed, expired or cancelled.
    #[serde(default)]
    pub status: Option<String>,
    /// A command kind.
    #[serde(default)]
    pub kind: Option<String>,
    /// Only commands of this fan-out batch.
    #[serde(default)]
    pub batch: Option<String>,
    /// 1-1000, default 20.
    #[serde(default)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandCancelArgs {
    /// The queued command to cancel.
    pub command_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditQueryArgs {
    /// Who acted (token name, or `flotilla` for the server itself).
    #[serde(default)]
    pub actor: Option<String>,
    /// rest, mcp, slack, discord, teams, console, cli or system.
    #[serde(default)]
    pub channel: Option<String>,
    /// Records about this agent (uid or unique host/service name).
    #[serde(default)]
    pub agent: Option<String>,
    /// Operation, e.g. command.queue, batch.queue, command.result, command.cancel.
    #[serde(default)]
    pub operation: Option<String>,
    /// From this time (RFC 3339 or unix milliseconds).
    #[serde(default)]
    pub since: Option<String>,
    /// Until this time (RFC 3339 or unix milliseconds).
    #[serde(default)]
    pub until: Option<String>,
    /// 1-1000, default 20.
    #[serde(default)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfigGetArgs {
    /// One agent (uid, unique host or service name): its full configuration. Give exactly one
    /// of agent and query.
    #[serde(default)]
    pub agent: Option<String>,
    /// Every agent matching this search query: one compact row each (hashes and status, no
    /// config bodies), paged.
    #[serde(default)]
    pub query: Option<String>,
    /// Rows per page with query, 1-50 (default 20).
    #[serde(default)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfigPushArgs {
    /// One agent (uid, unique host or service name). Give exactly one of agent and query.
    #[serde(default)]
    pub agent: Option<String>,
    /// Every agent matching this search query (fan-out).
    #[serde(default)]
    pub query: Option<String>,
    /// File name → body (string) or {body, content_type}. Replaces the agent's remote config.
    pub files: Map<String, Value>,
    /// Seconds the command may wait for the agent before it expires.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// Show the targets without queuing anything.
    #[serde(default)]
    pub dry_run: bool,
    /// Token from a previous call's confirmation_required answer (same arguments).
    #[serde(default)]
    pub confirmation_token: Option<String>,
}

/// One tool as served.
pub struct ToolDef {
    pub name: &'static str,
    /// Changes fleet state: hidden and refused in read-only mode.
    pub mutating: bool,
    pub tool: Tool,
}

fn obj(v: Value) -> Arc<JsonObject> {
    match v {
        Value::Object(m) => Arc::new(m),
        _ => unreachable!("output schemas are objects"),
    }
}

fn annotations(
    title: &str,
    read_only: bool,
    destructive: bool,
    idempotent: bool,
) -> ToolAnnotations {
    ToolAnnotations::with_title(title)
        .read_only(read_only)
        .destructive(destructive)
        .idempotent(idempotent)
        // The fleet is a closed world: tools touch only this Flotilla's registry.
        .open_world(false)
}

fn page_schema(item: Value) -> Value {
    json!({
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": {"type": "array", "items": item},
            "next_cursor": {"type": ["string", "null"], "description": "Pass as cursor for the next page; null on the last page"},
            "total": {"type": "integer", "description": "Matches in the whole fleet"}
        }
    })
}

fn agent_row_schema() -> Value {
    json!({"type": "object", "properties": {
        "uid": {"type": "string"}, "type": {"type": "string"},
        "name": {"type": ["string", "null"]}, "host": {"type": ["string", "null"]},
        "version": {"type": ["string", "null"]},
        "state": {"type": "string", "enum": ["healthy", "late", "offline"]},
        "healthy": {"type": ["boolean", "null"]},
        "labels": {"type": "object"}, "last_seen": {"type": "string"}
    }})
}

fn nullable(t: &str) -> Value {
    json!({"type": [t, "null"]})
}

/// One command, as `views::command` renders it (REST's `Command`).
fn command_schema() -> Value {
    json!({
        "type": "object",
        "required": ["id", "agent_uid", "kind", "params", "status", "created_at", "expires_at", "actor", "channel"],
        "properties": {
            "id": {"type": "string"}, "agent_uid": {"type": "string"},
            "batch_id": nullable("string"), "kind": {"type": "string"},
            "params": {"type": "object"},
            "status": {"type": "string", "enum": ["queued", "sent", "succeeded", "failed", "expired", "cancelled"]},
            "created_at": {"type": "string"}, "sent_at": nullable("string"),
            "finished_at": nullable("string"), "expires_at": {"type": "string"},
            "result": {"description": "What the agent reported, once finished"},
            "error": nullable("string"), "actor": {"type": "string"}, "channel": {"type": "string"},
            "audit_id": nullable("string")
        }
    })
}

fn skipped_schema() -> Value {
    json!({"type": "object", "required": ["agent_uid", "reason"], "properties": {
        "agent_uid": {"type": "string"}, "reason": {"type": "string"}}})
}

/// A fan-out's progress, as `views::batch_progress` renders it (REST's `BatchProgress`).
fn batch_progress_schema() -> Value {
    json!({
        "type": "object",
        "required": ["batch", "counts", "commands"],
        "properties": {
            "batch": {"type": "object", "required": ["id", "query", "kind"], "properties": {
                "id": {"type": "string"}, "query": {"type": "string"}, "kind": {"type": "string"},
                "params": {"type": "object"}, "created_at": {"type": "string"},
                "actor": {"type": "string"}, "channel": {"type": "string"},
                "skipped": {"type": "array", "items": skipped_schema()}}},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"},
                       "description": "Commands by status, plus skipped"},
            "commands": {"type": "array", "items": {"type": "object", "required": ["agent_uid", "command_id", "status"], "properties": {
                "agent_uid": {"type": "string"}, "command_id": {"type": "string"},
                "status": {"type": "string"}, "error": {"type": "string"}}}}
        }
    })
}

/// One audit record, as `views::audit` renders it (REST's `AuditRecord`).
fn audit_record_schema() -> Value {
    json!({
        "type": "object",
        "required": ["id", "ts", "actor", "channel", "operation", "targets", "outcome", "hash"],
        "properties": {
            "id": {"type": "string"}, "ts": {"type": "string"}, "actor": {"type": "string"},
            "channel": {"type": "string"}, "operation": {"type": "string"},
            "targets": {"type": "array", "items": {"type": "string"}},
            "params": {"description": "What was asked (config bodies reduced to their size)"},
            "outcome": {"type": "string"}, "ref_id": nullable("string"),
            "prev_hash": {"type": "string"}, "hash": {"type": "string"}
        }
    })
}

/// `remote_config_get` for one agent, or a page of compact rows for a query.
fn remote_config_schema() -> Value {
    let one = json!({"type": "object", "required": ["uid"], "properties": {
        "uid": {"type": "string"}, "host": nullable("string"),
        "effective_config": {"type": ["object", "null"]},
        "effective_config_hash": nullable("string"),
        "desired_config": {"type": ["object", "null"]},
        "remote_config_status": {"type": ["object", "null"]}
    }});
    let row = json!({"type": "object", "required": ["uid"], "properties": {
        "uid": {"type": "string"}, "host": nullable("string"),
        "desired_hash": nullable("string"),
        "remote_config_status": nullable("string"),
        "remote_config_hash": nullable("string"),
        "remote_config_error": nullable("string"),
        "effective_config_hash": nullable("string")
    }});
    json!({"type": "object", "anyOf": [one, page_schema(row)]})
}

fn queue_outcome_schema() -> Value {
    json!({
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["queued", "dry_run", "confirmation_required", "declined"],
                       "description": "queued: done; dry_run: nothing queued; confirmation_required: call again with confirmation_token; declined: the user said no, nothing queued"},
            "command_id": {"type": "string"},
            "command": {"type": "object"},
            "batch_id": {"type": "string"},
            "queued": {"type": "integer"},
            "skipped": {"type": "array", "items": skipped_schema()},
            "skipped_count": {"type": "integer"},
            "matched": {"type": "integer"},
            "destructive": {"type": "boolean"},
            "commands": {"type": "array"},
            "targets": {"type": "array", "items": agent_row_schema()},
            "total_targets": {"type": "integer"},
            "preview": {"type": "object"},
            "confirmation_token": {"type": "string"},
            "expires_in_seconds": {"type": "integer"}
        }
    })
}

/// Every tool, in the order they are listed.
pub fn all() -> Vec<ToolDef> {
    let confirm_note = format!(
        "Destructive: {} commands, and every fan-out (query), need the user's confirmation. \
         If the client supports elicitation the user is asked directly; otherwise the first \
         call queues nothing and returns status=confirmation_required with a preview and a \
         confirmation_token (valid 5 minutes, single use, bound to these exact arguments and \
         to the previewed targets): show the preview to the user and, only if they agree, call \
         again with the same arguments plus confirmation_token. If the targets changed in \
         between, nothing is queued (targets_changed).",
        DESTRUCTIVE_KINDS.join(", ")
    );
    vec![
        ToolDef {
            name: "agents_search",
            mutating: false,
            tool: Tool::new(
                "agents_search",
                format!(
                    "Find agents (Fluent Bit, Fluentd, OpenTelemetry collectors) with a search \
                     query. Returns compact rows, a cursor for the next page and the total \
                     number of matches. {QUERY_HELP}"
                ),
                JsonObject::new(),
            )
            .with_input_schema::<AgentsSearchArgs>()
            .with_raw_output_schema(obj(page_schema(agent_row_schema())))
            .with_annotations(annotations("Search agents", true, false, true)),
        },
        ToolDef {
            name: "agent_get",
            mutating: false,
            tool: Tool::new(
                "agent_get",
                format!(
                    "One agent's overview: identity, state, health summary (and unhealthy \
                     components), capabilities, labels, remote-config status. {AGENT_REF} Add \
                     include=[health, effective_config, recent_commands, attributes] for detail."
                ),
                JsonObject::new(),
            )
            .with_input_schema::<AgentGetArgs>()
            .with_raw_output_schema(obj(json!({"type": "object", "required": ["uid"], "properties": {
                "uid": {"type": "string"}, "type": {"type": "string"}, "state": {"type": "string"},
                "health": {"type": ["object", "null"]}, "labels": {"type": "object"}
            }})))
            .with_annotations(annotations("Get an agent", true, false, true)),
        },
        ToolDef {
            name: "fleet_summary",
            mutating: false,
            tool: Tool::new(
                "fleet_summary",
                "Counts of the whole fleet by agent type, version, health and connection \
                 state. Cheapest way to answer questions about the fleet as a whole.",
                JsonObject::new(),
            )
            .with_input_schema::<NoArgs>()
            .with_raw_output_schema(obj(json!({"type": "object", "required": ["total"], "properties": {
                "total": {"type": "integer"}, "by_type": {"type": "object"},
                "by_version": {"type": "object"}, "by_health": {"type": "object"},
                "by_state": {"type": "object"}
            }})))
            .with_annotations(annotations("Fleet summary", true, false, true)),
        },
        ToolDef {
            name: "commands_catalog",
            mutating: false,
            tool: Tool::new(
                "commands_catalog",
                "The command kinds agents can be sent, each with its parameter JSON Schema, \
                 what an agent needs to run it, whether it is destructive, and how many known \
                 agents can run it.",
                JsonObject::new(),
            )
            .with_input_schema::<NoArgs>()
            .with_raw_output_schema(obj(json!({"type": "object", "required": ["kinds"], "properties": {
                "kinds": {"type": "array", "items": {"type": "object", "properties": {
                    "kind": {"type": "string"}, "description": {"type": "string"},
                    "requires": {"type": "string"}, "destructive": {"type": "boolean"},
                    "params_schema": {"type": "object"}, "capable_agents": {"type": "integer"}
                }}}
            }})))
            .with_annotations(annotations("Command catalog", true, false, true)),
        },
        ToolDef {
            name: "command_queue",
            mutating: true,
            tool: Tool::new(
                "command_queue",
                format!(
                    "Queue a command for one agent, or fan it out to every agent matching a \
                     query; the agent runs it when it next connects. Use dry_run=true to see \
                     the targets first. {confirm_note} Follow up with command_status."
                ),
                JsonObject::new(),
            )
            .with_input_schema::<CommandQueueArgs>()
            .with_raw_output_schema(obj(queue_outcome_schema()))
            .with_annotations(annotations("Queue a command", false, true, false)),
        },
        ToolDef {
            name: "command_status",
            mutating: false,
            tool: Tool::new(
                "command_status",
                "Status of one command (queued → sent → succeeded | failed | expired | \
                 cancelled, with the agent's result or error), or with batch_id the \
                 per-agent progress of a fan-out.",
                JsonObject::new(),
            )
            .with_input_schema::<CommandStatusArgs>()
            .with_raw_output_schema(obj(
                json!({"type": "object", "anyOf": [command_schema(), batch_progress_schema()]}),
            ))
            .with_annotations(annotations("Command status", true, false, true)),
        },
        ToolDef {
            name: "commands_list",
            mutating: false,
            tool: Tool::new(
                "commands_list",
                "Commands, newest first, filtered by agent, status, kind or batch; paged.",
                JsonObject::new(),
            )
            .with_input_schema::<CommandsListArgs>()
            .with_raw_output_schema(obj(page_schema(command_schema())))
            .with_annotations(annotations("List commands", true, false, true)),
        },
        ToolDef {
            name: "command_cancel",
            mutating: true,
            tool: Tool::new(
                "command_cancel",
                "Cancel a command that is still queued (not yet sent to the agent). Refused \
                 with a conflict once it was sent.",
                JsonObject::new(),
            )
            .with_input_schema::<CommandCancelArgs>()
            .with_raw_output_schema(obj(command_schema()))
            .with_annotations(annotations("Cancel a command", false, false, true)),
        },
        ToolDef {
            name: "audit_query",
            mutating: false,
            tool: Tool::new(
                "audit_query",
                "The tamper-evident audit trail, newest first: who did what to which agents \
                 through which channel, and each command's outcome. Filter by actor, channel, \
                 agent, operation and time; paged.",
                JsonObject::new(),
            )
            .with_input_schema::<AuditQueryArgs>()
            .with_raw_output_schema(obj(page_schema(audit_record_schema())))
            .with_annotations(annotations("Query the audit trail", true, false, true)),
        },
        ToolDef {
            name: "remote_config_get",
            mutating: false,
            tool: Tool::new(
                "remote_config_get",
                format!(
                    "With agent: that agent's configuration — the files it reports running \
                     (effective config), the remote config Flotilla wants it to run (hash and \
                     the command that set it) and its last remote-config status. {AGENT_REF} \
                     With query: one compact row per matching agent (uid, host, desired hash, \
                     remote-config status and hash, effective config hash; equal hashes mean \
                     equal files), paged, to check a rollout; the query language is \
                     agents_search's."
                ),
                JsonObject::new(),
            )
            .with_input_schema::<RemoteConfigGetArgs>()
            .with_raw_output_schema(obj(remote_config_schema()))
            .with_annotations(annotations("Get an agent's config", true, false, true)),
        },
        ToolDef {
            name: "remote_config_push",
            mutating: true,
            tool: Tool::new(
                "remote_config_push",
                format!(
                    "Offer a new remote configuration (files) to one agent or to every agent \
                     matching a query (queues remote_config commands; the outcome follows the \
                     agent's remote-config status). Roll out to one agent first, check \
                     command_status, then widen. {confirm_note}"
                ),
                JsonObject::new(),
            )
            .with_input_schema::<RemoteConfigPushArgs>()
            .with_raw_output_schema(obj(queue_outcome_schema()))
            .with_annotations(annotations("Push a config", false, true, false)),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_schemas_and_annotations() {
        let tools = all();
        assert_eq!(tools.len(), 11);
        for d in &tools {
            assert_eq!(d.tool.name, d.name);
            assert_eq!(
                d.tool.input_schema.get("type"),
                Some(&json!("object")),
                "{}",
                d.name
            );
            let out = d.tool.output_schema.as_ref().expect("output schema");
            assert_eq!(out.get("type"), Some(&json!("object")));
            let a = d.tool.annotations.as_ref().expect("annotations");
            assert_eq!(a.read_only_hint, Some(!d.mutating), "{}", d.name);
            assert!(a.destructive_hint.is_some() && a.idempotent_hint.is_some());
        }
        let q = tools.iter().find(|t| t.name == "command_queue").unwrap();
        let props = q.tool.input_schema["properties"].as_object().unwrap();
        for k in [
            "agent",
            "query",
            "kind",
            "params",
            "dry_run",
            "confirmation_token",
        ] {
            assert!(props.contains_key(k), "{k}");
        }
    }
}
