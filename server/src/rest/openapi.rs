//! The OpenAPI 3.1 description of the REST API, served at `GET /api/v1/openapi.json`.
//!
//! Built in code rather than kept as a JSON file so the parts that already exist as data (error
//! codes and their statuses, each command kind's parameter schema) are taken from their single
//! source and cannot drift. A unit test in `rest/mod.rs` checks its `paths` against the routes.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::errors::ERROR_CODES;
use crate::model::{CommandKind, CommandStatus};

/// Every audit/command channel, as the API spells it.
const CHANNELS: [&str; 8] = [
    "rest", "mcp", "slack", "discord", "teams", "console", "cli", "system",
];

/// `GET /api/v1/openapi.json`, without a token (a client generator or API browser fetches it
/// before it has one; the document holds nothing secret). `servers` names the server the
/// request reached, so a tool that resolves paths against it needs no extra setting.
pub async fn serve(headers: HeaderMap) -> Response {
    static DOC: OnceLock<Value> = OnceLock::new();
    let mut doc = DOC.get_or_init(document).clone();
    doc["servers"] = json!([{"url": server_url(&headers),
        "description": "The Flotilla server that served this document."}]);
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.to_string(),
    )
        .into_response()
}

/// `http[s]://host[:port]` as the client addressed this server (`Host`, and
/// `X-Forwarded-Proto: https` from a TLS-terminating proxy); `/` (the same origin as the
/// document) when the request named no usable host.
fn server_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::trim)
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
        });
    let Some(host) = host else {
        return "/".into();
    };
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
    format!("{}://{host}", if https { "https" } else { "http" })
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn json_content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": json_content(schema)})
}

fn path_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": description,
           "schema": {"type": "string"}})
}

fn query_param(name: &str, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description,
           "schema": schema})
}

fn limit_param() -> Value {
    query_param(
        "limit",
        json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
        "Page size.",
    )
}

fn cursor_param(what: &str) -> Value {
    query_param(
        "cursor",
        json!({"type": "string"}),
        &format!("The `next_cursor` of the previous page ({what})."),
    )
}

/// Error responses for `codes`, grouped by status, each listing its codes.
fn errors(codes: &[&str]) -> Map<String, Value> {
    let mut by_status: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
    for code in codes {
        let (_, status, _) = ERROR_CODES
            .iter()
            .find(|(c, _, _)| c == code)
            .unwrap_or_else(|| panic!("openapi: unknown error code {code}"));
        by_status.entry(*status).or_default().push(code);
    }
    by_status
        .into_iter()
        .map(|(status, codes)| {
            let description = format!("Error; `error.code` is one of: {}", codes.join(", "));
            (status.to_string(), ok(&description, schema_ref("Error")))
        })
        .collect()
}

/// An operation. `extra_errors` are added to those every authenticated call can return.
// Positional on purpose: the call sites read like a table of the API.
#[allow(clippy::too_many_arguments)]
fn op(
    id: &str,
    tag: &str,
    summary: &str,
    description: &str,
    parameters: Vec<Value>,
    body: Option<Value>,
    success: (&str, Value),
    extra_errors: &[&str],
) -> Value {
    let mut responses = Map::new();
    responses.insert(success.0.to_string(), success.1);
    let mut codes = vec!["unauthorized", "rate_limited", "storage_unavailable"];
    if body.is_some() {
        codes.extend(["malformed_json", "body_too_large", "unsupported_media_type"]);
    }
    codes.extend_from_slice(extra_errors);
    responses.extend(errors(&codes));
    let mut o = json!({
        "operationId": id,
        "tags": [tag],
        "summary": summary,
        "description": description,
        "parameters": parameters,
        "responses": responses,
    });
    if let Some(b) = body {
        o["requestBody"] = json!({"required": true, "content": json_content(b)});
    }
    o
}

fn ops_op(id: &str, summary: &str, description: &str, content_type: &str, ok_text: &str) -> Value {
    json!({
        "operationId": id,
        "tags": ["operations"],
        "summary": summary,
        "description": description,
        "security": [],
        "responses": {
            "200": {"description": ok_text,
                    "content": {content_type: {"schema": {"type": "string"}}}},
            "503": {"description": "The store did not answer.",
                    "content": {"text/plain": {"schema": {"type": "string"}}}},
        }
    })
}

fn nullable(t: &str) -> Value {
    json!({"type": [t, "null"]})
}

fn time_schema() -> Value {
    json!({"type": "string", "format": "date-time"})
}

fn nullable_time() -> Value {
    json!({"type": ["string", "null"], "format": "date-time"})
}

fn uuid_schema() -> Value {
    json!({"type": "string", "format": "uuid"})
}

/// `remote_config` → `RemoteConfig`: the component name stem of a kind.
fn camel(kind: CommandKind) -> String {
    kind.as_str()
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// Each kind's parameter schema (from the catalog) as a component of its own, `<Kind>Params`,
/// plus `ConfigFile` (one file of a remote config). Defined once and referenced by both queue
/// requests: inlined twice, generators such as openapi-python-client built the same model
/// twice and refused the second.
fn params_components(out: &mut Map<String, Value>) {
    for k in CommandKind::ALL {
        let mut schema = crate::commands::catalog_entry(k)["params_schema"].clone();
        let file = &mut schema["properties"]["files"]["additionalProperties"];
        if let Some(variants) = file.get_mut("oneOf").and_then(Value::as_array_mut) {
            // The object form of a file gets a name, so a generator does not have to invent
            // one inside a union (openapi-python-client cannot).
            for v in variants.iter_mut().filter(|v| v["type"] == "object") {
                out.insert("ConfigFile".into(), v.take());
                *v = schema_ref("ConfigFile");
            }
        }
        out.insert(format!("{}Params", camel(k)), schema);
    }
}

/// One request variant per command kind (`<Kind><suffix>`, a component each), and the request
/// itself as their union, discriminated by `kind`.
fn queue_variants(
    out: &mut Map<String, Value>,
    suffix: &str,
    extra: &Map<String, Value>,
    description: &str,
) -> Value {
    let mut refs = Vec::new();
    let mut mapping = Map::new();
    for k in CommandKind::ALL {
        let name = format!("{}{suffix}", camel(k));
        let mut props = extra.clone();
        props.insert("kind".into(), json!({"const": k.as_str()}));
        props.insert("params".into(), schema_ref(&format!("{}Params", camel(k))));
        out.insert(
            name.clone(),
            json!({"type": "object", "required": ["kind"], "properties": props,
                   "additionalProperties": false}),
        );
        refs.push(schema_ref(&name));
        mapping.insert(
            k.as_str().into(),
            json!(format!("#/components/schemas/{name}")),
        );
    }
    json!({"description": description, "oneOf": refs,
           "discriminator": {"propertyName": "kind", "mapping": mapping}})
}

fn schemas() -> Value {
    let codes: Vec<&str> = ERROR_CODES.iter().map(|(c, _, _)| *c).collect();
    let kinds: Vec<&str> = CommandKind::ALL.iter().map(|k| k.as_str()).collect();
    let statuses: Vec<&str> = CommandStatus::ALL.iter().map(|s| s.as_str()).collect();
    let state = schema_ref("AgentState");
    let labels = json!({"type": "object", "additionalProperties": {"type": "string"}});
    let client_cert = json!({
        "type": ["object", "null"], "required": ["identity", "sha256"],
        "description": "mTLS (opamp.tls.client_ca_file): the client certificate of the agent's latest report; with opamp.tls.pin_uid the one pinned to its uid.",
        "properties": {
            "identity": {"type": "string", "description": "Subject CN, else the first subject alternative name."},
            "subject_cn": {"type": "string"},
            "sans": {"type": "array", "items": {"type": "string"}, "description": "DNS names, URIs (e.g. SPIFFE ids) and IP addresses."},
            "sha256": {"type": "string", "description": "SHA-256 of the certificate (DER), lowercase hex."}
        }
    });
    let attrs = json!({"type": "object", "additionalProperties": {"type": "string"}});
    let skipped = json!({"type": "object", "required": ["agent_uid", "reason"], "properties": {
        "agent_uid": uuid_schema(), "reason": {"type": "string"}}});
    // Every queue request may be a dry run, or carry a dry run's target expectation.
    let mut queue_extra = Map::new();
    queue_extra.insert(
        "dry_run".into(),
        json!({"type": "boolean", "default": false, "description": "Queue nothing: answer 200 with the plan (targets, skipped agents, expect_targets) after the same checks as the real request."}),
    );
    queue_extra.insert(
        "expect_targets".into(),
        json!({"$ref": "#/components/schemas/ExpectedTargets", "description": "A dry run's expect_targets: the request is refused (409 targets_changed, nothing queued) if the resolved targets are no longer exactly those."}),
    );
    let mut fanout_extra = queue_extra.clone();
    fanout_extra.insert(
        "query".into(),
        json!({"type": "string", "description": "Fan out to every agent matching this search query (see GET /api/v1/agents)."}),
    );
    fanout_extra.insert(
        "agent".into(),
        json!({"type": "string", "description": "Instead of `query`: one agent, by uid or unique host or service name."}),
    );
    let mut out = match json!({
        "CommandKind": {"type": "string", "enum": kinds},
        "CommandStatus": {"type": "string", "enum": statuses},
        "Channel": {"type": "string", "enum": CHANNELS, "description": "Where a request came from."},
        "AgentState": {"type": "string", "enum": ["healthy", "late", "offline"]},
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": codes, "description": "Stable, machine-readable."},
                    "message": {"type": "string", "description": "For humans; may change."}
                }
            }}
        },
        "AgentRow": {
            "type": "object", "required": ["uid", "type", "state", "last_seen"],
            "properties": {
                "uid": uuid_schema(),
                "type": {"type": "string", "description": "Normalised agent type: fluentbit, fluentd, otelcol, ..."},
                "name": nullable("string"), "host": nullable("string"), "version": nullable("string"),
                "state": state, "healthy": nullable("boolean"),
                "labels": labels, "last_seen": time_schema()
            }
        },
        "AgentPage": {
            "type": "object", "required": ["items", "next_cursor"],
            "properties": {
                "items": {"type": "array", "items": schema_ref("AgentRow")},
                "next_cursor": nullable("string"),
                "total": {"type": "integer", "description": "Matches in the whole fleet; only with total=true."}
            }
        },
        "Agent": {
            "type": "object", "required": ["uid", "type", "state", "connected", "labels", "first_seen", "last_seen"],
            "properties": {
                "uid": uuid_schema(), "type": {"type": "string"}, "state": state,
                "connected": {"type": "boolean"},
                "identifying_attributes": attrs, "non_identifying_attributes": attrs,
                "capabilities": {"type": "object", "properties": {
                    "bits": {"type": "integer"}, "names": {"type": "array", "items": {"type": "string"}}}},
                "custom_capabilities": {"type": "array", "items": {"type": "string"}},
                "health": {"type": ["object", "null"], "description": "OpAMP ComponentHealth tree."},
                "effective_config": {"type": ["object", "null"], "description": "File name → {body, content_type, encoding?}."},
                "effective_config_hash": {"type": ["string", "null"], "description": "The remote-config hash of the reported files: equals desired_config.hash when the agent runs exactly the pushed files."},
                "remote_config_status": {"type": ["object", "null"], "properties": {
                    "hash": {"type": "string"}, "status": {"type": "string"}, "error": {"type": "string"}}},
                "desired_config": {"type": ["object", "null"], "properties": {
                    "hash": {"type": "string"}, "command_id": {"type": ["string", "null"], "format": "uuid"}}},
                "labels": labels,
                "transport": {"type": ["string", "null"], "enum": ["http", "websocket", null]},
                "remote_addr": nullable("string"),
                "first_seen": time_schema(), "last_seen": time_schema(),
                "sequence_num": {"type": "integer"},
                "heartbeat_interval_seconds": {"type": "integer"},
                "previous_uid": {"type": ["string", "null"], "format": "uuid"},
                "replaces": {"type": ["string", "null"], "format": "uuid",
                             "description": "A silent earlier record of this same agent (same service.instance.id and host) that it re-registered in place of."},
                "replaced_by": {"type": ["string", "null"], "format": "uuid",
                                "description": "Set on such an earlier record: the agent that took its place."},
                "client_certificate": client_cert,
                "recent_commands": {"type": "array", "items": schema_ref("Command"),
                                    "description": "The agent's 10 newest commands."}
            }
        },
        "Labels": {
            "type": "object", "required": ["uid", "labels"],
            "properties": {"uid": uuid_schema(), "labels": labels}
        },
        "LabelValue": {
            "type": "object", "required": ["value"], "additionalProperties": false,
            "properties": {"value": {"type": "string", "maxLength": 256}}
        },
        "Command": {
            "type": "object",
            "required": ["id", "agent_uid", "kind", "params", "status", "created_at", "expires_at", "actor", "channel"],
            "properties": {
                "id": uuid_schema(), "agent_uid": uuid_schema(),
                "batch_id": {"type": ["string", "null"], "format": "uuid"},
                "kind": schema_ref("CommandKind"),
                "params": {"type": "object", "description": "Validated, normalised parameters."},
                "status": schema_ref("CommandStatus"),
                "created_at": time_schema(), "sent_at": nullable_time(),
                "finished_at": nullable_time(), "expires_at": time_schema(),
                "result": {"description": "What the agent reported, once finished."},
                "error": nullable("string"),
                "actor": {"type": "string"}, "channel": schema_ref("Channel"),
                "audit_id": {"type": ["string", "null"], "description": "The audit record that queued it."}
            }
        },
        "CommandPage": {
            "type": "object", "required": ["items", "next_cursor"],
            "properties": {"items": {"type": "array", "items": schema_ref("Command")},
                           "next_cursor": nullable("string")}
        },
        "ExpectedTargets": {
            "type": "object", "required": ["count", "digest"], "additionalProperties": false,
            "properties": {
                "count": {"type": "integer", "minimum": 0},
                "digest": {"type": "string", "description": "Hex SHA-256 of the target uids (16 bytes each) in uid order."}
            }
        },
        "Plan": {
            "type": "object",
            "required": ["dry_run", "kind", "params", "destructive", "target", "matched", "target_count", "targets", "skipped_count", "skipped", "expect_targets"],
            "properties": {
                "dry_run": {"const": true},
                "kind": schema_ref("CommandKind"),
                "params": {"type": "object", "description": "Validated, normalised parameters."},
                "destructive": {"type": "boolean", "description": "The kind is destructive (catalog)."},
                "target": {"type": "object", "properties": {"agent": uuid_schema(), "query": {"type": "string"}}},
                "matched": {"type": "integer", "description": "Agents the target matched."},
                "target_count": {"type": "integer", "description": "Agents a command would be queued for."},
                "targets": {"type": "array", "items": schema_ref("AgentRow"), "description": "The first 100 of them, in uid order."},
                "skipped_count": {"type": "integer"},
                "skipped": {"type": "array", "items": skipped, "description": "The first 100 matching agents that cannot run it."},
                "expect_targets": schema_ref("ExpectedTargets")
            }
        },
        "QueuedCommand": {
            "type": "object", "required": ["command_id", "command"],
            "properties": {"command_id": uuid_schema(), "command": schema_ref("Command")}
        },
        "QueuedBatch": {
            "type": "object", "required": ["batch_id", "queued", "skipped", "commands"],
            "properties": {
                "batch_id": uuid_schema(),
                "queued": {"type": "integer"},
                "skipped": {"type": "array", "items": skipped,
                            "description": "Agents that matched but cannot run the command."},
                "commands": {"type": "array", "items": {"type": "object", "properties": {
                    "agent_uid": uuid_schema(), "command_id": uuid_schema()}}}
            }
        },
        "Batch": {
            "type": "object",
            "properties": {
                "id": uuid_schema(), "query": {"type": "string"},
                "kind": schema_ref("CommandKind"), "params": {"type": "object"},
                "created_at": time_schema(), "actor": {"type": "string"},
                "channel": schema_ref("Channel"),
                "skipped": {"type": "array", "items": skipped}
            }
        },
        "BatchProgress": {
            "type": "object", "required": ["batch", "counts", "total", "done", "commands"],
            "properties": {
                "batch": schema_ref("Batch"),
                "counts": {"type": "object", "additionalProperties": {"type": "integer"},
                           "description": "Commands by status, plus `skipped`."},
                "total": {"type": "integer", "description": "Commands in the batch."},
                "done": {"type": "integer", "description": "Commands in a final status."},
                "commands": {"type": "array", "description": "The newest 1000 commands at most; `counts` cover all.",
                    "items": {"type": "object", "properties": {
                    "agent_uid": uuid_schema(), "command_id": uuid_schema(),
                    "status": schema_ref("CommandStatus"),
                    "error": {"type": "string"}}}}
            }
        },
        "Catalog": {
            "type": "object", "required": ["kinds"],
            "properties": {"kinds": {"type": "array", "items": {"type": "object", "properties": {
                "kind": schema_ref("CommandKind"),
                "description": {"type": "string"},
                "requires": {"type": "string"},
                "destructive": {"type": "boolean"},
                "outcome": {"type": "string", "description": "How the server learns whether it ran."},
                "params_schema": {"type": "object", "description": "JSON Schema of `params`."},
                "capable_agents": {"type": "integer", "description": "Known agents that can run it."}
            }}}}
        },
        "FleetSummary": {
            "type": "object",
            "properties": {
                "total": {"type": "integer"},
                "by_type": {"type": "object", "additionalProperties": {"type": "integer"}},
                "by_version": {"type": "object", "additionalProperties": {"type": "integer"}},
                "by_health": {"type": "object", "additionalProperties": {"type": "integer"}},
                "by_state": {"type": "object", "additionalProperties": {"type": "integer"}}
            }
        },
        "AuditRecord": {
            "type": "object",
            "properties": {
                "id": {"type": "string"}, "ts": time_schema(), "actor": {"type": "string"},
                "channel": schema_ref("Channel"),
                "operation": {"type": "string", "description": "e.g. agent.label.set, agent.label.remove, command.queue, batch.queue, command.cancel, command.result"},
                "targets": {"type": "array", "items": {"type": "string"}},
                "params": {}, "outcome": {"type": "string"},
                "ref_id": nullable("string"),
                "prev_hash": {"type": "string"}, "hash": {"type": "string"}
            }
        },
        "AuditPage": {
            "type": "object", "required": ["items", "next_cursor"],
            "properties": {"items": {"type": "array", "items": schema_ref("AuditRecord")},
                           "next_cursor": nullable("string")}
        }
    }) {
        Value::Object(m) => m,
        _ => unreachable!("the schemas are an object"),
    };
    params_components(&mut out);
    for (name, suffix, extra, description) in [
        ("QueueRequest", "Request", &queue_extra,
         "A command for the agent in the path: `kind` picks the variant and its `params`."),
        ("QueueFanoutRequest", "FanoutRequest", &fanout_extra,
         "A command for every agent matching `query`, or for one `agent`; exactly one of the two."),
    ] {
        let union = queue_variants(&mut out, suffix, extra, description);
        out.insert(name.into(), union);
    }
    Value::Object(out)
}

fn description() -> String {
    let mut d = String::from(
        "Operator API of the Flotilla control plane. Every `/api/v1` route needs \
         `Authorization: Bearer <token>`; tokens come from `api.tokens_file` (`name role token`, \
         role viewer|operator|admin) or, if unset, `<data_dir>/admin.token`. Viewers read; \
         operators also queue and cancel commands and change labels; admins also shut down \
         more than `commands.admin_shutdown_above` agents in one request and export the audit \
         trail. Every change is audited.\n\n\
         Timestamps are RFC 3339 strings; ids are strings. Errors are \
         `{\"error\": {\"code\", \"message\"}}`; the code is stable:\n\n\
         | code | status | meaning |\n|---|---|---|\n",
    );
    for (code, status, meaning) in ERROR_CODES {
        d.push_str(&format!("| `{code}` | {status} | {meaning} |\n"));
    }
    d.push_str(
        "\n`/healthz`, `/readyz`, `/metrics` and this document (`/api/v1/openapi.json`) need no \
         token: they are served on the operator listener, which binds to loopback by default.",
    );
    d
}

/// The whole document.
pub fn document() -> Value {
    let uid = || {
        path_param(
            "uid",
            "The agent: its instance uid (UUID), or a unique host name or service name \
             (percent-encoded). A name several agents share is refused with 409 \
             `ambiguous_agent`, listing them.",
        )
    };
    let key = path_param(
        "key",
        "Label key: 1-63 characters of A-Z a-z 0-9 . _ - / (percent-encode /).",
    );
    let cmd_id = || path_param("id", "Command id (UUID).");
    let search = op(
        "searchAgents",
        "agents",
        "Search agents",
        "Agents matching a query, in uid order. The query is whitespace-separated terms, all of \
         which must match: free text, or `key:value` with keys type, health \
         (healthy|unhealthy|unknown), state (healthy|late|offline|online), version, name, host, \
         label (`k=v` or `k`), capability, uid (prefix), transport (http|websocket), or any \
         attribute name containing a dot (`host.name:web-*`). Values are case-insensitive globs; \
         a leading `-` negates a term; \"double quotes\" keep spaces.",
        vec![
            query_param(
                "q",
                json!({"type": "string"}),
                "Search query; empty matches every agent.",
            ),
            query_param(
                "limit",
                json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}),
                "Page size.",
            ),
            cursor_param("an agent uid"),
            query_param(
                "total",
                json!({"type": "boolean", "default": false}),
                "Also count all matches.",
            ),
        ],
        None,
        ("200", ok("A page of agents.", schema_ref("AgentPage"))),
        &["bad_request", "invalid_query", "forbidden"],
    );
    let get_agent = op(
        "getAgent",
        "agents",
        "One agent",
        "Everything the agent reported, server-side state, and its 10 newest commands.",
        vec![uid()],
        None,
        ("200", ok("The agent.", schema_ref("Agent"))),
        &["bad_request", "forbidden", "not_found", "ambiguous_agent"],
    );
    let put_label = op(
        "setLabel",
        "agents",
        "Set a label",
        "Sets a server-side label (operator). Audited as `agent.label.set`.",
        vec![uid(), key.clone()],
        Some(schema_ref("LabelValue")),
        (
            "200",
            ok("The agent's labels after the change.", schema_ref("Labels")),
        ),
        &["bad_request", "forbidden", "not_found", "ambiguous_agent"],
    );
    let mut delete_label = op(
        "removeLabel",
        "agents",
        "Remove a label",
        "Removes a server-side label (operator); 204 also when it was not set. Audited as \
         `agent.label.remove`.",
        vec![uid(), key],
        None,
        ("204", json!({"description": "Removed."})),
        &["bad_request", "forbidden", "not_found", "ambiguous_agent"],
    );
    delete_label["responses"]["204"] = json!({"description": "Removed."});
    let queue_one = op(
        "queueCommand",
        "commands",
        "Queue a command for one agent",
        "Queues a command (operator) after checking its parameters against the kind's schema \
         (see GET /api/v1/catalog) and the agent's capabilities. Audited as `command.queue`. \
         The `Location` header names the command.",
        vec![uid()],
        Some(schema_ref("QueueRequest")),
        ("202", ok("Queued.", schema_ref("QueuedCommand"))),
        &[
            "bad_request",
            "invalid_params",
            "forbidden",
            "not_found",
            "ambiguous_agent",
            "capability_missing",
        ],
    );
    let queue_many = op(
        "queueCommands",
        "commands",
        "Queue a command by query (fan-out) or for one agent",
        "With `query`: one command per matching agent able to run it, as a batch (audited as \
         `batch.queue`); matching agents that cannot are listed in `skipped`. Nothing is queued \
         if any check fails. With `agent`: as POST /api/v1/agents/{uid}/commands. The \
         `Location` header names the batch or command.",
        vec![],
        Some(schema_ref("QueueFanoutRequest")),
        (
            "202",
            ok(
                "Queued.",
                json!({"oneOf": [schema_ref("QueuedBatch"), schema_ref("QueuedCommand")]}),
            ),
        ),
        &[
            "bad_request",
            "invalid_params",
            "invalid_query",
            "forbidden",
            "not_found",
            "ambiguous_agent",
            "capability_missing",
            "no_targets",
            "too_many_targets",
        ],
    );
    // Both queue endpoints answer a dry run with its plan, and refuse a stale expectation.
    let (mut queue_one, mut queue_many) = (queue_one, queue_many);
    for o in [&mut queue_one, &mut queue_many] {
        o["responses"]["200"] = ok(
            "Dry run (`dry_run: true`): what would be queued; nothing was.",
            schema_ref("Plan"),
        );
        if let Value::Object(r) = &mut o["responses"] {
            r.extend(errors(&["targets_changed"]));
        }
        let d = o["description"].as_str().unwrap_or_default().to_string();
        o["description"] = json!(format!(
            "{d} With `dry_run: true`: the same checks, nothing queued or audited, 200 with the \
             plan (the first 100 targets and skipped agents, counts, and `expect_targets`). \
             Sending that `expect_targets` with the real request makes it fail with 409 \
             `targets_changed`, queuing nothing, if the resolved targets changed in between."
        ));
    }
    let list = op(
        "listCommands",
        "commands",
        "List commands",
        "Commands, newest first, filtered.",
        vec![
            query_param(
                "agent",
                json!({"type": "string"}),
                "Only this agent's (uid, or unique host or service name).",
            ),
            query_param(
                "status",
                schema_ref("CommandStatus"),
                "Only in this status.",
            ),
            query_param("kind", schema_ref("CommandKind"), "Only of this kind."),
            query_param("batch", uuid_schema(), "Only of this batch."),
            limit_param(),
            cursor_param("a command id"),
        ],
        None,
        ("200", ok("A page of commands.", schema_ref("CommandPage"))),
        &["bad_request", "forbidden", "not_found", "ambiguous_agent"],
    );
    let get_cmd = op(
        "getCommand",
        "commands",
        "One command",
        "A command and its outcome so far.",
        vec![cmd_id()],
        None,
        ("200", ok("The command.", schema_ref("Command"))),
        &["bad_request", "forbidden", "not_found"],
    );
    let cancel = op(
        "cancelCommand",
        "commands",
        "Cancel a queued command",
        "Cancels a command not yet sent (operator). Audited as `command.cancel`. A command \
         already sent or finished cannot be cancelled (409).",
        vec![cmd_id()],
        None,
        ("200", ok("The cancelled command.", schema_ref("Command"))),
        &["bad_request", "forbidden", "not_found", "conflict"],
    );
    let batch = op(
        "getBatch",
        "commands",
        "Fan-out progress",
        "A batch, its per-status counts (plus skipped) and each agent's command.",
        vec![path_param("id", "Batch id (UUID).")],
        None,
        ("200", ok("The batch.", schema_ref("BatchProgress"))),
        &["bad_request", "forbidden", "not_found"],
    );
    let catalog = op(
        "getCatalog", "commands", "Command catalog",
        "Every command kind with its parameter schema, requirement and how many known agents can run it.",
        vec![], None, ("200", ok("The catalog.", schema_ref("Catalog"))), &["forbidden"],
    );
    let summary = op(
        "getFleetSummary",
        "agents",
        "Fleet summary",
        "Agent counts by type, version, health and state.",
        vec![],
        None,
        ("200", ok("Counts.", schema_ref("FleetSummary"))),
        &["forbidden"],
    );
    let audit = op(
        "queryAudit",
        "audit",
        "Query the audit trail",
        "Audit records, newest first. `since`/`until` are RFC 3339 (percent-encode `+`) or unix \
         milliseconds, inclusive.",
        vec![
            query_param(
                "actor",
                json!({"type": "string"}),
                "Token name (or `flotilla`, `agent:<uid>` for system records).",
            ),
            query_param("channel", schema_ref("Channel"), "Where it came from."),
            query_param(
                "agent",
                json!({"type": "string"}),
                "Records naming this agent (uid, or unique host or service name) or this \
                 command or batch id as a target.",
            ),
            query_param(
                "operation",
                json!({"type": "string"}),
                "e.g. command.queue.",
            ),
            query_param("since", json!({"type": "string"}), "Earliest time."),
            query_param("until", json!({"type": "string"}), "Latest time."),
            limit_param(),
            cursor_param("an audit record id"),
        ],
        None,
        ("200", ok("A page of records.", schema_ref("AuditPage"))),
        &["bad_request", "forbidden", "not_found", "ambiguous_agent"],
    );
    let verify = op(
        "verifyAudit",
        "audit",
        "Verify the audit chain",
        "Walks the whole hash chain (as `flotilla audit verify` does): `intact` with the number \
         of records and the head `ID:HASH`, or the first record that does not hold and why.",
        vec![],
        None,
        (
            "200",
            ok(
                "The chain's state.",
                json!({"type": "object", "required": ["intact"], "properties": {
                    "intact": {"type": "boolean"},
                    "records": {"type": "integer", "description": "Records verified (intact)."},
                    "head": {"type": ["string", "null"], "description": "ID:HASH of the newest record (intact)."},
                    "commands_verified": {"type": "integer", "description": "Commands that match the digest in the record that queued them (intact)."},
                    "commands_legacy": {"type": "integer", "description": "Commands queued before records carried a digest: unverifiable (intact)."},
                    "broken_at": {"type": "string", "description": "Id of the first record that fails (broken)."},
                    "reason": {"type": "string", "description": "Why it fails (broken)."}
                }}),
            ),
        ),
        &["forbidden"],
    );
    let whoami = op(
        "whoami",
        "meta",
        "Who the server takes the caller to be",
        "The caller as its calls are authorised and audited: the actor (with \
         `X-Flotilla-Acting-For`, `<token> for <chat identity>`), channel, role, and whether the \
         token is marked `gateway` in api.tokens_file. A standalone `flotilla chat` checks its \
         token with it at start.",
        vec![],
        None,
        (
            "200",
            ok(
                "The caller.",
                json!({"type": "object", "required": ["actor", "channel", "role", "gateway"], "properties": {
                    "actor": {"type": "string"},
                    "channel": {"type": "string"},
                    "role": {"type": "string", "enum": ["viewer", "operator", "admin"]},
                    "gateway": {"type": "boolean", "description": "The token may act for chat users."}
                }}),
            ),
        ),
        &["forbidden"],
    );
    let export = op(
        "exportAudit",
        "audit",
        "Export the audit trail (admin)",
        "Every record in chain order (oldest first) with `prev_hash` and `hash`, from just after \
         record `after`: for archiving the trail or verifying it elsewhere. Page on with \
         `after=next_after` until it is null. Needs the admin role.",
        vec![
            query_param(
                "after",
                json!({"type": "string"}),
                "A record id; the page starts after it (default: from the first record).",
            ),
            limit_param(),
        ],
        None,
        (
            "200",
            ok(
                "A page of records, oldest first.",
                json!({"type": "object", "required": ["items", "next_after"], "properties": {
                    "items": {"type": "array", "items": schema_ref("AuditRecord")},
                    "next_after": {"type": ["string", "null"], "description": "Pass as `after` for the next page; null at the end."}
                }}),
            ),
        ),
        &["bad_request", "forbidden"],
    );
    let mut openapi = op(
        "getOpenApi",
        "meta",
        "This document",
        "The OpenAPI 3.1 description of this API. Needs no token.",
        vec![],
        None,
        ("200", ok("The document.", json!({"type": "object"}))),
        &[],
    );
    openapi["security"] = json!([]);
    if let Value::Object(r) = &mut openapi["responses"] {
        // No token, so no 401 and no in-flight limit; the document is built in memory.
        r.retain(|status, _| status == "200");
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Flotilla operator API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": description(),
        },
        "security": [{"bearer": []}],
        "tags": [
            {"name": "agents"}, {"name": "commands"}, {"name": "audit"},
            {"name": "meta"}, {"name": "operations"}
        ],
        "paths": {
            "/api/v1/agents": {"get": search},
            "/api/v1/agents/{uid}": {"get": get_agent},
            "/api/v1/agents/{uid}/labels/{key}": {"put": put_label, "delete": delete_label},
            "/api/v1/agents/{uid}/commands": {"post": queue_one},
            "/api/v1/commands": {"get": list, "post": queue_many},
            "/api/v1/commands/{id}": {"get": get_cmd, "delete": cancel},
            "/api/v1/batches/{id}": {"get": batch},
            "/api/v1/catalog": {"get": catalog},
            "/api/v1/fleet/summary": {"get": summary},
            "/api/v1/audit": {"get": audit},
            "/api/v1/audit/verify": {"get": verify},
            "/api/v1/audit/export": {"get": export},
            "/api/v1/whoami": {"get": whoami},
            "/api/v1/openapi.json": {"get": openapi},
            "/healthz": {"get": ops_op("healthz", "Liveness", "200 `ok` while the process serves requests.", "text/plain", "Alive.")},
            "/readyz": {"get": ops_op("readyz", "Readiness", "200 when the store answers a trivial query, else 503.", "text/plain", "Ready.")},
            "/metrics": {"get": ops_op("metrics", "Prometheus metrics",
                "OpenMetrics text: flotilla_agents{state}, flotilla_commands{status}, \
                 flotilla_opamp_messages_total{kind}, flotilla_opamp_rejected_total{reason}, \
                 flotilla_command_delivery_latency_seconds, flotilla_websocket_connections. \
                 Unauthenticated: keep the operator listener on loopback or guard it.",
                "application/openmetrics-text", "Metrics.")},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                "description": "A token from api.tokens_file or <data_dir>/admin.token."}},
            "schemas": schemas(),
        }
    })
}
