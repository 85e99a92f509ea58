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

/// Every command kind, for `command_queue`'s `kind` enum; the same test keeps it equal to
/// the catalog's kinds.
pub const KINDS: &[&str] = &[
    "restart",
    "force_resync",
    "new_instance_uid",
    "chatops",
    "shutdown",
    "custom",
    "remote_config",
];

/// The search language, as the model needs it (mirrors `flotilla_server::query`).
pub const QUERY_HELP: &str = "Query: terms, all must match. Free text matches uid, \
attribute values, labels. key:value: type (fluentbit|fluentd|otelcol), health \
(healthy|unhealthy|unknown), state (healthy|late|offline|online), version, name (service), host, \
label (k=v or k), capability (restart|remote_config|chatops|shutdown|<name>), uid (prefix), \
transport (http|websocket), or any dotted attribute key (host.name:web-*). Values are \
case-insensitive globs; -term negates; \"quotes\" keep spaces; empty matches all.";

const AGENT_REF: &str =
    "agent: uid, unique host or service name, or a one-agent query (ambiguity is refused).";

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentsSearchArgs {
    #[serde(default)]
    pub query: Option<String>,
    /// 1-200, default 20 (the total comes anyway).
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
    pub agent: String,
    /// Whole health tree, effective_config files (large), 10 recent_commands, other attributes.
    #[serde(default)]
    pub include: Vec<Detail>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandQueueArgs {
    /// One agent (uid, host or service name); or query.
    #[serde(default)]
    pub agent: Option<String>,
    /// Fan-out to every agent matching it.
    #[serde(default)]
    pub query: Option<String>,
    // Typed in the schema by `kind_schema` and `params_schema`; the service checks them.
    pub kind: String,
    #[serde(default)]
    pub params: Option<Value>,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub confirmation_token: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandStatusArgs {
    #[serde(default)]
    pub command_id: Option<String>,
    #[serde(default)]
    pub batch_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandsListArgs {
    /// Uid, host or service name.
    #[serde(default)]
    pub agent: Option<String>,
    /// queued, sent, succeeded, failed, expired or cancelled.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub batch: Option<String>,
    /// 1-1000, default 20.
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandCancelArgs {
    pub command_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditQueryArgs {
    #[serde(default)]
    pub actor: Option<String>,
    /// rest, mcp, slack, discord, teams, console, cli or system.
    #[serde(default)]
    pub channel: Option<String>,
    /// Uid, host or service name.
    #[serde(default)]
    pub agent: Option<String>,
    /// E.g. command.queue, command.result.
    #[serde(default)]
    pub operation: Option<String>,
    /// RFC 3339 or unix ms; also until.
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub until: Option<String>,
    /// 1-1000, default 20.
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfigGetArgs {
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub query: Option<String>,
    /// With query: 1-50, default 20.
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfigPushArgs {
    /// One agent (uid, host or service name); or query.
    #[serde(default)]
    pub agent: Option<String>,
    /// Fan-out to every agent matching it.
    #[serde(default)]
    pub query: Option<String>,
    /// File name → body, or {body, content_type}; replaces its remote config.
    pub files: Map<String, Value>,
    /// Seconds it may wait queued before it expires.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub dry_run: bool,
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
        _ => unreachable!("schemas are objects"),
    }
}

/// Hints as the spec reads them, without restating its defaults (every tool list is paid in
/// model context): a read-only tool says only that (`destructiveHint` and `idempotentHint`
/// mean nothing for it), and every tool says it is closed-world — it touches only this
/// Flotilla's registry.
fn annotations(read_only: bool, destructive: bool, idempotent: bool) -> ToolAnnotations {
    let a = ToolAnnotations::new()
        .read_only(read_only)
        .open_world(false);
    if read_only {
        a
    } else {
        a.destructive(destructive).idempotent(idempotent)
    }
}

/// A schemars input schema with what costs tokens and says nothing removed: the `$schema`
/// URI, `"default": null` and `null` in the type of optional fields (leaving a field out is
/// how a client says "none"; `null` is still accepted), and Rust's integer formats. A `oneOf`
/// of bare constants becomes an `enum`.
pub fn compact_schema(v: Value) -> Value {
    match v {
        Value::Object(mut m) => {
            m.remove("$schema");
            if m.get("additionalProperties") == Some(&Value::Bool(true)) {
                m.remove("additionalProperties");
            }
            if m.get("default") == Some(&Value::Null) {
                m.remove("default");
            }
            if let Some(Value::Array(types)) = m.get("type") {
                let kept: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
                if kept.len() == 1 {
                    m.insert("type".into(), kept[0].clone());
                }
            }
            if m.get("format")
                .and_then(Value::as_str)
                .is_some_and(|f| matches!(f, "uint" | "uint32" | "uint64" | "int64" | "int32"))
            {
                m.remove("format");
                if m.get("minimum") == Some(&json!(0)) {
                    m.remove("minimum");
                }
            }
            let consts: Option<Vec<Value>> = m
                .get("oneOf")
                .and_then(Value::as_array)
                .and_then(|vs| vs.iter().map(|v| v.get("const").cloned()).collect());
            if let Some(consts) = consts {
                m.remove("oneOf");
                m.insert("type".into(), json!("string"));
                m.insert("enum".into(), Value::Array(consts));
            }
            Value::Object(m.into_iter().map(|(k, v)| (k, compact_schema(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(compact_schema).collect()),
        other => other,
    }
}

/// The input schema of `A`, compacted, with `overrides` replacing properties whose type the
/// parser keeps loose on purpose (the service validates them and names what is wrong).
fn input<A: JsonSchema + 'static>(tool: Tool, overrides: &[(&str, Value)]) -> Tool {
    let mut tool = tool.with_input_schema::<A>();
    let mut schema = Value::Object((*tool.input_schema).clone());
    if let Some(Value::Object(defs)) = schema.as_object_mut().and_then(|m| m.remove("$defs")) {
        inline_refs(&mut schema, &defs);
    }
    let mut schema = compact_schema(schema);
    for (name, s) in overrides {
        schema["properties"][*name] = s.clone();
    }
    tool.input_schema = obj(schema);
    tool
}

/// Replaces each `{"$ref": "#/$defs/X"}` by X itself, without X's description (the field
/// that uses it has its own): one self-contained schema, and no name the model never needs.
fn inline_refs(v: &mut Value, defs: &Map<String, Value>) {
    match v {
        Value::Object(m) => {
            let target = m
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix("#/$defs/"))
                .and_then(|name| defs.get(name));
            if let Some(def) = target {
                let mut def = def.clone();
                if let Some(d) = def.as_object_mut() {
                    d.remove("description");
                }
                inline_refs(&mut def, defs);
                *v = def;
                return;
            }
            m.values_mut().for_each(|x| inline_refs(x, defs));
        }
        Value::Array(a) => a.iter_mut().for_each(|x| inline_refs(x, defs)),
        _ => {}
    }
}

/// A JSON Schema object of `(name, type)` properties; a type `"string?"` is nullable and `""`
/// is any value. Kept short: output schemas are read by clients, and paid for by models.
fn shape(required: &[&str], props: &[(&str, &str)]) -> Value {
    let mut p = Map::new();
    for (name, ty) in props {
        let s = match ty.strip_suffix('?') {
            _ if ty.is_empty() => json!({}),
            Some(t) => json!({"type": [t, "null"]}),
            None => json!({"type": ty}),
        };
        p.insert((*name).to_string(), s);
    }
    let mut v = json!({"type": "object"});
    if !p.is_empty() {
        v["properties"] = Value::Object(p);
    }
    if !required.is_empty() {
        v["required"] = json!(required);
    }
    v
}

/// A page of rows, each an object with its `id_key`; `total` only where the tool returns it.
/// Row fields are the REST API's (its OpenAPI document describes them); listing them here
/// again would cost every session's context.
fn page_schema(id_key: &str, with_total: bool) -> Value {
    let mut p = shape(&["items"], &[("next_cursor", "string?")]);
    p["properties"]["items"] =
        json!({"type": "array", "items": {"type": "object", "required": [id_key]}});
    if with_total {
        p["properties"]["total"] = json!({"type": "integer"});
    }
    p
}

/// One command, as `views::command` renders it (REST's `Command`).
fn command_schema() -> Value {
    shape(
        &["id", "status"],
        &[
            ("id", "string"),
            ("agent_uid", "string"),
            ("kind", "string"),
            ("status", "string"),
            ("error", "string?"),
        ],
    )
}

/// `remote_config_get`: one agent's config, or a page of compact rows for a query.
fn remote_config_schema() -> Value {
    shape(
        &[],
        &[
            ("uid", "string"),
            ("effective_config", "object?"),
            ("desired_config", "object?"),
            ("remote_config_status", "object?"),
            ("items", "array"),
            ("next_cursor", "string?"),
        ],
    )
}

fn queue_outcome_schema() -> Value {
    let mut s = shape(
        &["status"],
        &[
            ("status", "string"),
            ("command_id", "string"),
            ("batch_id", "string"),
            ("preview", "object"),
            ("confirmation_token", "string"),
        ],
    );
    s["properties"]["status"]["enum"] =
        json!(["queued", "dry_run", "confirmation_required", "declined"]);
    s
}

/// `kind` of `command_queue`: the catalog's kinds (a test keeps the two equal).
fn kind_schema() -> Value {
    json!({"type": "string", "enum": KINDS, "description": "See commands_catalog."})
}

/// `params` of `command_queue`: every kind's parameters, typed, in one object (each says
/// which kinds take it; the service refuses a parameter the kind does not take).
fn params_schema() -> Value {
    json!({"type": "object", "additionalProperties": false, "properties": {
        "ttl_seconds": {"type": "integer", "minimum": 1, "maximum": 2_592_000,
                        "description": "any kind: seconds queued before it expires"},
        "tag": {"type": "string", "description": "chatops (required): route /<tag>"},
        "attributes": {"type": "object", "description": "chatops: JSON posted"},
        "new_uid": {"type": "string", "description": "new_instance_uid"},
        "capability": {"type": "string", "description": "custom (required)"},
        "type": {"type": "string", "description": "custom (required)"},
        "data": {"description": "custom"},
        "files": {"type": "object", "description": "remote_config"}
    }})
}

/// Every tool, in the order they are listed.
pub fn all() -> Vec<ToolDef> {
    // Said once, here; remote_config_push points to it.
    let confirm_note = format!(
        "Destructive kinds ({}) and fan-outs need the user's confirmation: by elicitation if \
         the client can; else the first call queues nothing and returns \
         status=confirmation_required with a preview of what will be sent and a \
         confirmation_token (5 min, single use, bound to these arguments and targets): show the \
         preview and only if the user agrees repeat the call with the token.",
        DESTRUCTIVE_KINDS.join(", ")
    );
    let tool =
        |name: &'static str, description: String| Tool::new(name, description, JsonObject::new());
    let def = |name, mutating, tool: Tool, output: Value, ann: ToolAnnotations| ToolDef {
        name,
        mutating,
        tool: tool
            .with_raw_output_schema(obj(output))
            .with_annotations(ann),
    };
    vec![
        def(
            "agents_search",
            false,
            input::<AgentsSearchArgs>(
                tool(
                    "agents_search",
                    format!(
                        "Find agents (Fluent Bit, Fluentd, OpenTelemetry collectors): compact \
                         rows, the total and a cursor. {QUERY_HELP}"
                    ),
                ),
                &[],
            ),
            page_schema("uid", true),
            annotations(true, false, true),
        ),
        def(
            "agent_get",
            false,
            input::<AgentGetArgs>(
                tool(
                    "agent_get",
                    format!(
                        "One agent: identity, state, health summary with unhealthy \
                         components, capabilities, labels, remote-config status. {AGENT_REF}"
                    ),
                ),
                &[],
            ),
            shape(
                &["uid"],
                &[
                    ("uid", "string"),
                    ("type", "string"),
                    ("state", "string"),
                    ("health", "object?"),
                    ("labels", "object"),
                ],
            ),
            annotations(true, false, true),
        ),
        def(
            "fleet_summary",
            false,
            input::<NoArgs>(
                tool(
                    "fleet_summary",
                    "Fleet counts by type, version, health and state: the cheapest answer \
                     about the whole fleet."
                        .into(),
                ),
                &[],
            ),
            shape(
                &["total"],
                &[
                    ("total", "integer"),
                    ("by_type", "object"),
                    ("by_version", "object"),
                    ("by_health", "object"),
                    ("by_state", "object"),
                ],
            ),
            annotations(true, false, true),
        ),
        def(
            "commands_catalog",
            false,
            input::<NoArgs>(
                tool(
                    "commands_catalog",
                    "Command kinds: what each does and needs, if destructive, how its outcome \
                     is known, its params, how many agents can run it."
                        .into(),
                ),
                &[],
            ),
            {
                let mut s = shape(
                    &["kinds"],
                    &[("every_kind_takes", "object"), ("kinds", "array")],
                );
                s["properties"]["kinds"]["items"] = json!({"type": "object", "required": ["kind"]});
                s
            },
            annotations(true, false, true),
        ),
        def(
            "command_queue",
            true,
            input::<CommandQueueArgs>(
                tool(
                    "command_queue",
                    format!(
                        "Queue a command for one agent or every agent matching a query; agents \
                         run it when they next connect (see command_status). dry_run previews \
                         the targets. {confirm_note}"
                    ),
                ),
                &[("kind", kind_schema()), ("params", params_schema())],
            ),
            queue_outcome_schema(),
            annotations(false, true, false),
        ),
        def(
            "command_status",
            false,
            input::<CommandStatusArgs>(
                tool(
                    "command_status",
                    "One command (queued → sent → succeeded | failed | expired | cancelled, \
                     with the agent's result or error), or with batch_id a fan-out's \
                     per-agent progress."
                        .into(),
                ),
                &[],
            ),
            // A command (id, status, ...) or a batch's progress (batch, counts, commands).
            shape(
                &[],
                &[
                    ("id", "string"),
                    ("status", "string"),
                    ("error", "string?"),
                    ("batch", "object"),
                    ("counts", "object"),
                    ("commands", "array"),
                ],
            ),
            annotations(true, false, true),
        ),
        def(
            "commands_list",
            false,
            input::<CommandsListArgs>(
                tool(
                    "commands_list",
                    "Commands, newest first, filtered; paged.".into(),
                ),
                &[],
            ),
            page_schema("id", false),
            annotations(true, false, true),
        ),
        def(
            "command_cancel",
            true,
            input::<CommandCancelArgs>(
                tool(
                    "command_cancel",
                    "Cancel a command not yet sent to its agent (a conflict once sent).".into(),
                ),
                &[],
            ),
            command_schema(),
            annotations(false, false, true),
        ),
        def(
            "audit_query",
            false,
            input::<AuditQueryArgs>(
                tool(
                    "audit_query",
                    "The tamper-evident audit trail, newest first: who did what, to which \
                     agents, via which channel, with command outcomes."
                        .into(),
                ),
                &[],
            ),
            page_schema("id", false),
            annotations(true, false, true),
        ),
        def(
            "remote_config_get",
            false,
            input::<RemoteConfigGetArgs>(
                tool(
                    "remote_config_get",
                    format!(
                        "With agent: the files it runs, the config Flotilla wants it to run, \
                         its last remote-config status. {AGENT_REF} With query: hashes and \
                         status per agent (equal hashes, equal files), paged."
                    ),
                ),
                &[],
            ),
            remote_config_schema(),
            annotations(true, false, true),
        ),
        def(
            "remote_config_push",
            true,
            input::<RemoteConfigPushArgs>(
                tool(
                    "remote_config_push",
                    "Push config files to one agent or a query's agents (remote_config \
                     commands; outcome: the agent's remote-config status). Roll out to one, \
                     check command_status, then widen. Confirmed as command_queue says."
                        .into(),
                ),
                &[],
            ),
            queue_outcome_schema(),
            annotations(false, true, false),
        ),
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
            assert_eq!(a.open_world_hint, Some(false), "{}", d.name);
            // Hints the spec ignores for read-only tools are left out; mutating tools say both.
            assert_eq!(
                a.destructive_hint.is_some() && a.idempotent_hint.is_some(),
                d.mutating,
                "{}",
                d.name
            );
            // Compacted: no schema URI, no `default: null`, no nullable optional fields.
            let text = serde_json::to_string(&d.tool.input_schema).unwrap();
            for waste in ["$schema", "\"default\":null", "\"null\"", "$defs"] {
                assert!(!text.contains(waste), "{}: {waste} in {text}", d.name);
            }
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
        // kind is one of the kinds, and params are typed.
        assert_eq!(props["kind"]["enum"], json!(KINDS));
        assert_eq!(props["params"]["type"], "object");
        assert_eq!(props["params"]["properties"]["tag"]["type"], "string");
        assert_eq!(props["params"]["additionalProperties"], false);
        // The confirmation protocol is explained once.
        let described = tools
            .iter()
            .filter(|d| {
                d.tool
                    .description
                    .as_deref()
                    .unwrap_or("")
                    .contains("confirmation_token")
            })
            .count();
        assert_eq!(described, 1);
    }
}
