//! What each command kind means: parameter validation, capability checks, the catalog, how a
//! command is put on the wire, and how an agent's later messages settle its outcome.
//!
//! Pure functions over model and proto types; no IO. The service layer validates with them at
//! queue time, the OpAMP session encodes and observes with them.

use std::collections::BTreeMap;

use flotilla_proto::caps::agent_has;
use flotilla_proto::{
    AgentCapabilities, AgentConfigFile, AgentConfigMap, AgentRemoteConfig, AgentToServer,
    CustomMessage, ServerToAgentCommand,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::model::{Agent, Command, CommandKind, ConfigFile, ConfigFiles, DesiredConfig, Millis};
use crate::store::Finish;

/// fluent-opamp's ChatOps capability (see shared/reference/fluent-opamp-compat.md).
pub const CAP_CHATOPS: &str = "org.mp3monster.opamp_provider.chatopcommand";
/// The longest `ttl_seconds` a command may ask for (30 days).
pub const MAX_TTL_S: u64 = 30 * 86_400;

/// fluent-opamp's shutdown capability.
pub const CAP_SHUTDOWN: &str = "org.mp3monster.opamp_provider.command_shutdown_agent";
/// fluent-opamp's null (probe) capability.
pub const CAP_NULL: &str = "org.mp3monster.opamp_provider.nullcommand";
/// Flotilla's own capability: an agent declaring it reads `command_id` in command payloads and
/// reports every command's outcome as a `result` custom message on this capability.
pub const CAP_FLOTILLA: &str = "io.flotilla.command/v1";
/// Results are confirmed by an `ack` ([`result_ack`]): declared by the server, and acks go only
/// to agents that declare it, so an agent that would not understand one never gets it.
pub const CAP_ACK: &str = "io.flotilla.command/v1/ack";
/// Custom capabilities the server itself supports (sent in `ServerToAgent.custom_capabilities`).
pub const SERVER_CUSTOM_CAPABILITIES: &[&str] =
    &[CAP_CHATOPS, CAP_SHUTDOWN, CAP_NULL, CAP_FLOTILLA, CAP_ACK];

/// A queue-time refusal, phrased for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("invalid parameters for {kind}: {message}")]
    InvalidParams { kind: &'static str, message: String },
    #[error("agent {agent} cannot run {kind}: {reason}")]
    NotCapable {
        agent: Uuid,
        kind: &'static str,
        reason: String,
    },
}

/// True if the agent declared custom capability `cap` (fluent-opamp supervisors prefix theirs
/// with `request:`; both forms count).
pub fn has_custom(agent: &Agent, cap: &str) -> bool {
    agent
        .custom_capabilities
        .iter()
        .any(|c| c == cap || c.strip_prefix("request:") == Some(cap))
}

/// The acknowledgement of a Flotilla result message, put in the reply to the message that
/// carried it once its outcome is stored: `{"command_id": …}` on [`CAP_FLOTILLA`], type
/// `ack`. The agent stops re-sending that result then. Over WebSocket the server also pushes
/// commands as messages of their own, so "a reply came" cannot tell the agent which of its
/// messages were processed; the ack names it. Unknown and already settled ids are acked too:
/// there is nothing more the server could do with them.
pub fn result_ack(msg: &AgentToServer) -> Option<CustomMessage> {
    let cm = msg.custom_message.as_ref()?;
    if cm.capability != CAP_FLOTILLA || cm.r#type != "result" {
        return None;
    }
    let v: Value = serde_json::from_slice(&cm.data).ok()?;
    let id = v.get("command_id")?.as_str()?;
    Some(CustomMessage {
        capability: CAP_FLOTILLA.into(),
        r#type: "ack".into(),
        data: json!({ "command_id": id }).to_string().into_bytes(),
    })
}

/// True if the agent reports outcomes with Flotilla's rich result messages.
pub fn reports_results(agent: &Agent) -> bool {
    has_custom(agent, CAP_FLOTILLA)
}

fn bad(kind: CommandKind, message: impl Into<String>) -> CommandError {
    CommandError::InvalidParams {
        kind: kind.as_str(),
        message: message.into(),
    }
}

/// Checks `params` for `kind` and returns them normalised (defaults filled in, a generated uid
/// for `new_instance_uid`, the config hash for `remote_config`). Unknown keys are refused so a
/// typo never silently changes what runs.
pub fn validate_params(kind: CommandKind, params: &Value) -> Result<Value, CommandError> {
    let empty = serde_json::Map::new();
    let obj = match params {
        Value::Null => &empty,
        Value::Object(o) => o,
        _ => return Err(bad(kind, "params must be a JSON object")),
    };
    let allowed: &[&str] = match kind {
        CommandKind::Restart | CommandKind::ForceResync | CommandKind::Shutdown => &["ttl_seconds"],
        CommandKind::NewInstanceUid => &["new_uid", "ttl_seconds"],
        CommandKind::Chatops => &["tag", "attributes", "ttl_seconds"],
        CommandKind::Custom => &["capability", "type", "data", "ttl_seconds"],
        CommandKind::RemoteConfig => &["files", "ttl_seconds"],
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(
            kind,
            format!("unknown parameter {k:?} (allowed: {})", allowed.join(", ")),
        ));
    }
    let mut out = serde_json::Map::new();
    if let Some(ttl) = obj.get("ttl_seconds") {
        match ttl.as_u64() {
            Some(t) if (1..=MAX_TTL_S).contains(&t) => {
                out.insert("ttl_seconds".into(), json!(t));
            }
            _ => {
                return Err(bad(
                    kind,
                    "ttl_seconds must be a whole number of seconds between 1 and 2592000",
                ))
            }
        }
    }
    match kind {
        CommandKind::Restart | CommandKind::ForceResync | CommandKind::Shutdown => {}
        CommandKind::NewInstanceUid => {
            // Left out, a fresh UUIDv7 is chosen per command when it is queued (so a dry run
            // does not show a uid the real call would not use, and a batch gets one per agent).
            let uid = match obj.get("new_uid") {
                None => None,
                Some(Value::String(s)) => Some(
                    Uuid::parse_str(s)
                        .map_err(|_| bad(kind, format!("new_uid {s:?} is not a UUID")))?,
                ),
                Some(_) => return Err(bad(kind, "new_uid must be a UUID string")),
            };
            if let Some(uid) = uid {
                if uid.is_nil() {
                    return Err(bad(kind, "new_uid must not be the nil UUID"));
                }
                out.insert("new_uid".into(), json!(uid.to_string()));
            }
        }
        CommandKind::Chatops => {
            let tag = obj
                .get("tag")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(kind, "tag is required and must be a string"))?;
            let tag_ok = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !tag_ok {
                return Err(bad(
                    kind,
                    format!("tag {tag:?} must be 1-128 characters of A-Z a-z 0-9 . _ - (it becomes a URL path)"),
                ));
            }
            out.insert("tag".into(), json!(tag));
            // fluent-opamp accepts attributes as an object or as a string holding JSON.
            let attributes = match obj.get("attributes") {
                None | Some(Value::Null) => json!({}),
                Some(Value::Object(o)) => Value::Object(o.clone()),
                Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => return Err(bad(kind, "attributes string must hold a JSON object")),
                },
                Some(_) => return Err(bad(kind, "attributes must be a JSON object")),
            };
            out.insert("attributes".into(), attributes);
        }
        CommandKind::Custom => {
            let capability = obj
                .get("capability")
                .and_then(Value::as_str)
                .filter(|s| !s.trim().is_empty())
                .ok_or_else(|| bad(kind, "capability is required (a reverse-FQDN name)"))?;
            let ty = obj
                .get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(kind, "type is required and must be a string"))?;
            out.insert("capability".into(), json!(capability));
            out.insert("type".into(), json!(ty));
            match obj.get("data") {
                None | Some(Value::Null) => {
                    out.insert("data".into(), json!(""));
                }
                Some(v @ (Value::String(_) | Value::Object(_) | Value::Array(_))) => {
                    out.insert("data".into(), v.clone());
                }
                Some(_) => return Err(bad(kind, "data must be a string or a JSON object/array")),
            }
        }
        CommandKind::RemoteConfig => {
            let files = parse_files(kind, obj.get("files"))?;
            out.insert("hash".into(), json!(config_hash(&files)));
            out.insert(
                "files".into(),
                serde_json::to_value(&files).map_err(|e| bad(kind, e.to_string()))?,
            );
        }
    }
    Ok(Value::Object(out))
}

fn parse_files(kind: CommandKind, v: Option<&Value>) -> Result<ConfigFiles, CommandError> {
    let obj = v.and_then(Value::as_object).ok_or_else(|| {
        bad(
            kind,
            "files is required: an object of file name → {body, content_type}",
        )
    })?;
    if obj.is_empty() {
        return Err(bad(kind, "files must contain at least one file"));
    }
    if obj.len() > MAX_CONFIG_FILES {
        return Err(bad(
            kind,
            format!(
                "{} files offered; at most {MAX_CONFIG_FILES} are allowed",
                obj.len()
            ),
        ));
    }
    let mut files = BTreeMap::new();
    for (name, f) in obj {
        check_file_name(name).map_err(|why| bad(kind, format!("file name {name:?} {why}")))?;
        let file = match f {
            Value::String(body) => ConfigFile {
                content_type: String::new(),
                body: body.clone(),
                encoding: None,
            },
            Value::Object(o) => {
                if let Some(k) = o
                    .keys()
                    .find(|k| !matches!(k.as_str(), "body" | "content_type"))
                {
                    return Err(bad(kind, format!("file {name:?}: unknown key {k:?}")));
                }
                ConfigFile {
                    body: o
                        .get("body")
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad(kind, format!("file {name:?}: body must be a string")))?
                        .to_string(),
                    content_type: match o.get("content_type") {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(_) => {
                            return Err(bad(
                                kind,
                                format!("file {name:?}: content_type must be a string"),
                            ))
                        }
                    },
                    encoding: None,
                }
            }
            _ => {
                return Err(bad(
                    kind,
                    format!("file {name:?} must be a string or {{body, content_type}}"),
                ))
            }
        };
        files.insert(name.clone(), file);
    }
    Ok(files)
}

/// The most files one remote config may carry.
pub const MAX_CONFIG_FILES: usize = 64;
/// The longest file name (bytes) a remote config may carry; 255 is the usual limit of one
/// path component, so a longer name could not be written as one file anyway.
pub const MAX_CONFIG_FILE_NAME: usize = 255;

/// Checks a remote-config file name before it is queued. Agents other than Flotilla's own
/// supervisor write names as paths unchecked, so the server refuses anything that could
/// leave the agent's config directory or confuse a log line: only plain relative names,
/// `/`-separated components that are neither empty, `.` nor `..`; no absolute path, no
/// backslash (a separator on Windows), no `:` (a drive or stream on Windows), no control
/// characters (NUL, newlines, …). Returns why a name is refused.
pub fn check_file_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > MAX_CONFIG_FILE_NAME {
        return Err("is longer than 255 bytes");
    }
    if name.chars().any(char::is_control) {
        return Err("contains a control character (NUL, newline, …)");
    }
    if name.contains('\\') {
        return Err("contains a backslash");
    }
    if name.contains(':') {
        return Err("contains ':' (a drive or stream name on Windows)");
    }
    if name.starts_with('/') {
        return Err("is an absolute path; only relative names are allowed");
    }
    if name
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err("has an empty, '.' or '..' path component");
    }
    Ok(())
}

/// SHA-256 over each file's (name, body, content type), in name order, each part
/// length-prefixed so no two different configs share a hash input. Hex-encoded.
pub fn config_hash(files: &ConfigFiles) -> String {
    let mut h = Sha256::new();
    for (name, f) in files {
        for part in [
            name.as_bytes(),
            f.body.as_bytes(),
            f.content_type.as_bytes(),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
    }
    hex::encode(h.finalize())
}

/// Checks that `agent` can run `kind` with the (validated) `params`.
pub fn check_capable(agent: &Agent, kind: CommandKind, params: &Value) -> Result<(), CommandError> {
    let refuse = |reason: String| CommandError::NotCapable {
        agent: agent.uid,
        kind: kind.as_str(),
        reason,
    };
    match kind {
        CommandKind::Restart => {
            if !agent_has(agent.capabilities, AgentCapabilities::AcceptsRestartCommand) {
                return Err(refuse(
                    "it did not declare the AcceptsRestartCommand capability".into(),
                ));
            }
        }
        CommandKind::ForceResync | CommandKind::NewInstanceUid => {
            if agent.capabilities == 0 && agent.last_seen == agent.first_seen && !agent.connected {
                // Never reported a status: nothing to resync yet, but queueing is harmless.
            }
        }
        CommandKind::Chatops => {
            if !has_custom(agent, CAP_CHATOPS) {
                return Err(refuse(format!(
                    "it did not declare the custom capability {CAP_CHATOPS}"
                )));
            }
        }
        CommandKind::Shutdown => {
            if !has_custom(agent, CAP_SHUTDOWN) {
                return Err(refuse(format!(
                    "it did not declare the custom capability {CAP_SHUTDOWN}"
                )));
            }
        }
        CommandKind::Custom => {
            let cap = params
                .get("capability")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !has_custom(agent, cap) {
                return Err(refuse(format!(
                    "it did not declare the custom capability {cap}"
                )));
            }
        }
        CommandKind::RemoteConfig => {
            if !agent_has(agent.capabilities, AgentCapabilities::AcceptsRemoteConfig) {
                return Err(refuse(
                    "it did not declare the AcceptsRemoteConfig capability".into(),
                ));
            }
        }
    }
    Ok(())
}

/// One catalog entry: a kind, its parameter schema, and what an agent needs to run it.
pub fn catalog_entry(kind: CommandKind) -> Value {
    let ttl = json!({"type": "integer", "minimum": 1, "maximum": 2_592_000,
        "description": "Seconds the command may wait in the queue before it expires"});
    let (description, requires, destructive, schema) = match kind {
        CommandKind::Restart => (
            "Restart the agent (OpAMP standard Restart command).",
            "capability AcceptsRestartCommand",
            true,
            json!({"type": "object", "properties": {"ttl_seconds": ttl}, "additionalProperties": false}),
        ),
        CommandKind::ForceResync => (
            "Ask the agent to report its full state (ReportFullState flag).",
            "any agent",
            false,
            json!({"type": "object", "properties": {"ttl_seconds": ttl}, "additionalProperties": false}),
        ),
        CommandKind::NewInstanceUid => (
            "Give the agent a new instance uid (AgentIdentification); its record moves to the new uid.",
            "any agent",
            false,
            json!({"type": "object", "properties": {
                "new_uid": {"type": "string", "format": "uuid", "description": "Defaults to a fresh UUIDv7"},
                "ttl_seconds": ttl}, "additionalProperties": false}),
        ),
        CommandKind::Chatops => (
            "Send a ChatOps command: the supervisor POSTs the attributes to its local HTTP input at /<tag>.",
            "custom capability org.mp3monster.opamp_provider.chatopcommand",
            true,
            json!({"type": "object", "required": ["tag"], "properties": {
                "tag": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
                "attributes": {"type": "object", "description": "JSON object posted to the agent's HTTP input"},
                "ttl_seconds": ttl}, "additionalProperties": false}),
        ),
        CommandKind::Shutdown => (
            "Stop the agent and its supervisor (fluent-opamp compatible).",
            "custom capability org.mp3monster.opamp_provider.command_shutdown_agent",
            true,
            json!({"type": "object", "properties": {"ttl_seconds": ttl}, "additionalProperties": false}),
        ),
        CommandKind::Custom => (
            "Send any custom message on a custom capability the agent declared.",
            "the named custom capability",
            true,
            json!({"type": "object", "required": ["capability", "type"], "properties": {
                "capability": {"type": "string"},
                "type": {"type": "string"},
                "data": {"description": "String (sent as UTF-8) or JSON value (sent as JSON)"},
                "ttl_seconds": ttl}, "additionalProperties": false}),
        ),
        CommandKind::RemoteConfig => (
            "Offer a remote configuration (files); the outcome follows the agent's RemoteConfigStatus.",
            "capability AcceptsRemoteConfig",
            true,
            json!({"type": "object", "required": ["files"], "properties": {
                "files": {"type": "object", "minProperties": 1, "additionalProperties": {
                    "oneOf": [
                        {"type": "string"},
                        {"type": "object", "required": ["body"], "properties": {
                            "body": {"type": "string"}, "content_type": {"type": "string"}},
                         "additionalProperties": false}
                    ]}},
                "ttl_seconds": ttl}, "additionalProperties": false}),
        ),
    };
    json!({
        "kind": kind.as_str(),
        "description": description,
        "requires": requires,
        "destructive": destructive,
        "outcome": outcome(kind),
        "params_schema": schema,
    })
}

/// How the server learns whether a command of `kind` ran, so callers know in advance when
/// `succeeded` is impossible to observe and an expiry only means "unconfirmed".
fn outcome(kind: CommandKind) -> &'static str {
    match kind {
        CommandKind::Restart => {
            "succeeded when the agent's health reports a wall-clock start time later than the \
             command's queue time; agents that report no health, or their uptime instead of a \
             start time (fluent-opamp), cannot confirm it (the command then expires as unconfirmed)"
        }
        CommandKind::ForceResync => "succeeded when the agent sends its full state",
        CommandKind::NewInstanceUid => "succeeded when the agent speaks with the new uid",
        CommandKind::Chatops | CommandKind::Shutdown | CommandKind::Custom => {
            "agents declaring io.flotilla.command/v1 (flotilla-supervisor) report success or \
             failure with the command id; plain fluent-opamp supervisors report failures only \
             (shutdown: agent_disconnect), so silence expires as unconfirmed"
        }
        CommandKind::RemoteConfig => {
            "the agent's RemoteConfigStatus for this config hash: APPLIED succeeds, FAILED fails"
        }
    }
}

/// What one command puts into a ServerToAgent.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// A standard command; the spec says no other field but instance_uid/capabilities may
    /// accompany it, so it travels in a message of its own.
    Command(ServerToAgentCommand),
    /// ServerToAgent flags (ReportFullState).
    Flags(u64),
    /// `agent_identification.new_instance_uid`.
    NewUid(Uuid),
    Custom(CustomMessage),
    RemoteConfig(AgentRemoteConfig, DesiredConfig),
}

/// Builds the wire form of `cmd` for `agent`. Flotilla's rich form (with `command_id`) is used
/// only for agents that declared [`CAP_FLOTILLA`]; others get exactly fluent-opamp's form.
pub fn encode(cmd: &Command, agent: &Agent) -> Outgoing {
    let rich = reports_results(agent);
    let p = &cmd.params;
    match cmd.kind {
        CommandKind::Restart => Outgoing::Command(ServerToAgentCommand { r#type: 0 }),
        CommandKind::ForceResync => {
            Outgoing::Flags(flotilla_proto::ServerToAgentFlags::ReportFullState as u64)
        }
        CommandKind::NewInstanceUid => Outgoing::NewUid(
            p.get("new_uid")
                .and_then(Value::as_str)
                .and_then(|s| Uuid::parse_str(s).ok())
                .unwrap_or_else(Uuid::now_v7),
        ),
        CommandKind::Chatops => {
            // Keys sorted (serde_json maps are ordered), as fluent-opamp's server sends them.
            let mut data = serde_json::Map::new();
            data.insert("tag".into(), p.get("tag").cloned().unwrap_or(json!("")));
            data.insert(
                "attributes".into(),
                p.get("attributes").cloned().unwrap_or(json!({})),
            );
            if rich {
                data.insert("command_id".into(), json!(cmd.id.to_string()));
            }
            Outgoing::Custom(CustomMessage {
                capability: CAP_CHATOPS.into(),
                r#type: "request".into(),
                data: Value::Object(data).to_string().into_bytes(),
            })
        }
        CommandKind::Shutdown => {
            let data = if rich {
                json!({"command_id": cmd.id.to_string()})
            } else {
                json!({})
            };
            Outgoing::Custom(CustomMessage {
                capability: CAP_SHUTDOWN.into(),
                r#type: "Shutdown Agent".into(),
                data: data.to_string().into_bytes(),
            })
        }
        CommandKind::Custom => {
            let data = match p.get("data") {
                Some(Value::String(s)) => s.clone().into_bytes(),
                Some(v @ (Value::Object(_) | Value::Array(_))) => {
                    let mut v = v.clone();
                    if let (true, Value::Object(o)) = (rich, &mut v) {
                        o.insert("command_id".into(), json!(cmd.id.to_string()));
                    }
                    v.to_string().into_bytes()
                }
                _ => Vec::new(),
            };
            Outgoing::Custom(CustomMessage {
                capability: p
                    .get("capability")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into(),
                r#type: p
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into(),
                data,
            })
        }
        CommandKind::RemoteConfig => {
            let files: ConfigFiles = p
                .get("files")
                .and_then(|f| serde_json::from_value(f.clone()).ok())
                .unwrap_or_default();
            let hash = p
                .get("hash")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| config_hash(&files));
            let desired = DesiredConfig {
                hash: hash.clone(),
                files: files.clone(),
                command_id: Some(cmd.id),
            };
            (Outgoing::RemoteConfig(remote_config_message(&desired), desired)) as Outgoing
        }
    }
}

/// The `AgentRemoteConfig` for a desired config (also re-sent when the agent reports a different
/// hash, as the spec requires).
pub fn remote_config_message(desired: &DesiredConfig) -> AgentRemoteConfig {
    let config_map = desired
        .files
        .iter()
        .map(|(name, f)| {
            (
                name.clone(),
                AgentConfigFile {
                    body: f.body.clone().into_bytes(),
                    content_type: f.content_type.clone(),
                },
            )
        })
        .collect();
    AgentRemoteConfig {
        config: Some(AgentConfigMap { config_map }),
        config_hash: hex::decode(&desired.hash).unwrap_or_default(),
    }
}

/// Why a delivered command expired without a result, in the operator's terms. For some kinds
/// and agents the outcome cannot be learned at all, and the message says so instead of
/// suggesting the agent misbehaved.
pub fn no_result_reason(cmd: &Command, agent: Option<&Agent>) -> String {
    let plain = agent.is_some_and(|a| !reports_results(a));
    let health = agent.is_some_and(|a| agent_has(a.capabilities, AgentCapabilities::ReportsHealth));
    match cmd.kind {
        CommandKind::Restart if agent.is_some() && !health => {
            "delivered; this agent does not report health, so its restart cannot be confirmed"
                .into()
        }
        CommandKind::Restart if agent.is_some_and(reports_uptime) => {
            "delivered; this agent reports its uptime, not a wall-clock start time, in \
             health.start_time_unix_nano (fluent-opamp does), so its restart cannot be confirmed"
                .into()
        }
        CommandKind::Restart => {
            "delivered, but the agent's health never showed a start time later than the \
             command's queue time"
                .into()
        }
        CommandKind::Chatops | CommandKind::Shutdown | CommandKind::Custom if plain => {
            "delivered; this agent uses the plain fluent-opamp form, which reports only failures, \
             and none arrived, so the outcome is unconfirmed"
                .into()
        }
        CommandKind::RemoteConfig => {
            "delivered, but the agent reported neither APPLIED nor FAILED for this config in time"
                .into()
        }
        _ => "delivered, but the agent reported no result in time".into(),
    }
}

/// Start times before this (2020-01-01) are not wall-clock times: fluent-opamp sends its uptime
/// in `start_time_unix_nano`, a number of nanoseconds that grows with every heartbeat.
const WALL_CLOCK_FLOOR_NS: u64 = 1_577_836_800 * 1_000_000_000;

/// How far ahead of ours an agent's clock may run before its start time is implausible.
const CLOCK_AHEAD_NS: u64 = 10 * 60 * 1_000_000_000;

/// True if the agent reports its uptime where OpAMP wants a start time, so no start time it
/// sends can prove a restart.
pub fn reports_uptime(agent: &Agent) -> bool {
    agent
        .health
        .as_ref()
        .is_some_and(|h| h.start_time_unix_nano > 0 && h.start_time_unix_nano < WALL_CLOCK_FLOOR_NS)
}

/// A reported start time `t1` proves a restart queued at `queued_at` only if it is an absolute
/// time that moved forward (past the last one reported, `t0`) and past the queue time, and is
/// not later than now beyond clock skew. "It grew" alone proves nothing: an uptime grows with
/// every heartbeat, and a start time that moved but predates the command is some other restart.
fn restarted_since(t0: Option<u64>, t1: u64, queued_at: Millis, now: Millis) -> bool {
    let ns = |ms: Millis| u64::try_from(ms).unwrap_or(0).saturating_mul(1_000_000);
    t0.is_none_or(|t0| t1 > t0)
        && t1 > ns(queued_at).max(WALL_CLOCK_FLOOR_NS)
        && t1 <= ns(now).saturating_add(CLOCK_AHEAD_NS)
}

/// Settles commands in status `sent` from what the agent just said.
///
/// `before` is the agent record before this message was merged, `after` the merged one, `msg`
/// the raw message. Returns the commands to finish, each with the evidence. Commands with no
/// evidence yet are left alone (the expiry sweep ends them after the result timeout).
pub fn observe(
    before: &Agent,
    after: &Agent,
    msg: &AgentToServer,
    sent: &[Command],
    now: crate::model::Millis,
) -> Vec<(Uuid, Finish)> {
    let mut out: Vec<(Uuid, Finish)> = Vec::new();
    let done = |to, result: Value, error: Option<String>| Finish {
        to,
        result: Some(result),
        error,
        at: now,
    };
    use crate::model::CommandStatus::{Failed, Succeeded};

    // 1. Flotilla rich results name their command.
    if let Some(cm) = &msg.custom_message {
        if cm.capability == CAP_FLOTILLA && cm.r#type == "result" {
            if let Ok(v) = serde_json::from_slice::<Value>(&cm.data) {
                let id = v
                    .get("command_id")
                    .and_then(Value::as_str)
                    .and_then(|s| Uuid::parse_str(s).ok());
                if let Some(cmd) = id.and_then(|id| sent.iter().find(|c| c.id == id)) {
                    let ok = v.get("status").and_then(Value::as_str) == Some("succeeded");
                    let message = v
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    out.push((
                        cmd.id,
                        if ok {
                            done(Succeeded, v.clone(), None)
                        } else {
                            done(
                                Failed,
                                v.clone(),
                                Some(if message.is_empty() {
                                    "agent reported failure".into()
                                } else {
                                    message
                                }),
                            )
                        },
                    ));
                }
            }
        }
    }
    let settled = |out: &Vec<(Uuid, Finish)>, id: Uuid| out.iter().any(|(i, _)| *i == id);

    for cmd in sent {
        if settled(&out, cmd.id) {
            continue;
        }
        match cmd.kind {
            CommandKind::ForceResync => {
                if msg.agent_description.is_some() {
                    out.push((
                        cmd.id,
                        done(Succeeded, json!({"full_state_reported": true}), None),
                    ));
                }
            }
            CommandKind::Restart => {
                let t0 = before.health.as_ref().map(|h| h.start_time_unix_nano);
                let t1 = msg.health.as_ref().map(|h| h.start_time_unix_nano);
                if let Some(t1) = t1.filter(|t1| restarted_since(t0, *t1, cmd.created_at, now)) {
                    out.push((
                        cmd.id,
                        done(
                            Succeeded,
                            json!({"evidence": "health.start_time_unix_nano is later than the queue time",
                                   "start_time_unix_nano": t1}),
                            None,
                        ),
                    ));
                }
            }
            CommandKind::NewInstanceUid => {
                let want = cmd.params.get("new_uid").and_then(Value::as_str);
                let got = Uuid::from_slice(&msg.instance_uid)
                    .ok()
                    .map(|u| u.to_string());
                if want.is_some() && want == got.as_deref() {
                    out.push((cmd.id, done(Succeeded, json!({"adopted_uid": want}), None)));
                }
            }
            CommandKind::Shutdown => {
                if msg.agent_disconnect.is_some() && !reports_results(after) {
                    out.push((
                        cmd.id,
                        done(Succeeded, json!({"evidence": "agent_disconnect"}), None),
                    ));
                }
            }
            CommandKind::Chatops | CommandKind::Custom => {}
            CommandKind::RemoteConfig => {
                if let Some(rcs) = &msg.remote_config_status {
                    let want = cmd.params.get("hash").and_then(Value::as_str).unwrap_or("");
                    if hex::encode(&rcs.last_remote_config_hash) == want {
                        match rcs.status {
                            1 => out.push((
                                cmd.id,
                                done(Succeeded, json!({"status": "applied", "hash": want}), None),
                            )),
                            3 => out.push((
                                cmd.id,
                                done(
                                    Failed,
                                    json!({"status": "failed", "hash": want}),
                                    Some(if rcs.error_message.is_empty() {
                                        "agent reported FAILED".into()
                                    } else {
                                        rcs.error_message.clone()
                                    }),
                                ),
                            )),
                            _ => {}
                        }
                    }
                }
            }
        }
    }

    // 2. fluent-opamp's plain failure report names no command: it belongs to the oldest sent
    //    command of that capability.
    if let Some(cm) = &msg.custom_message {
        if cm.capability != CAP_FLOTILLA {
            let oldest = sent.iter().find(|c| {
                !settled(&out, c.id)
                    && match c.kind {
                        CommandKind::Chatops => cm.capability == CAP_CHATOPS,
                        CommandKind::Shutdown => cm.capability == CAP_SHUTDOWN,
                        CommandKind::Custom => {
                            c.params.get("capability").and_then(Value::as_str)
                                == Some(cm.capability.as_str())
                        }
                        _ => false,
                    }
            });
            if let Some(c) = oldest {
                let data: Value = serde_json::from_slice(&cm.data)
                    .unwrap_or_else(|_| json!(String::from_utf8_lossy(&cm.data)));
                let reply = json!({"type": cm.r#type, "data": data});
                if cm.r#type.eq_ignore_ascii_case("failure") {
                    let err = data
                        .get("err_msg")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .unwrap_or_else(|| "agent reported failure".into());
                    let err = match data.get("http_code") {
                        Some(code) => format!("{err} (HTTP {code})"),
                        None => err,
                    };
                    out.push((c.id, done(Failed, reply, Some(err))));
                } else if c.kind == CommandKind::Custom {
                    // A reply on the same capability is the custom command's answer.
                    out.push((c.id, done(Succeeded, reply, None)));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Channel, CommandStatus};

    fn agent(caps: u64, custom: &[&str]) -> Agent {
        let mut a = Agent::new(Uuid::now_v7(), 1, 30);
        a.capabilities = caps;
        a.custom_capabilities = custom.iter().map(|s| s.to_string()).collect();
        a
    }

    fn cmd(kind: CommandKind, params: Value, agent: &Agent) -> Command {
        Command {
            id: Uuid::now_v7(),
            agent_uid: agent.uid,
            batch_id: None,
            kind,
            params: validate_params(kind, &params).unwrap(),
            status: CommandStatus::Sent,
            created_at: 1,
            sent_at: Some(2),
            finished_at: None,
            expires_at: 100,
            result: None,
            error: None,
            actor: "t".into(),
            channel: Channel::Rest,
            audit_id: None,
        }
    }

    #[test]
    fn params_are_checked() {
        assert!(validate_params(CommandKind::Restart, &json!({"force": true})).is_err());
        assert!(validate_params(CommandKind::Chatops, &json!({})).is_err());
        assert!(validate_params(CommandKind::Chatops, &json!({"tag": "../etc"})).is_err());
        assert!(validate_params(CommandKind::RemoteConfig, &json!({"files": {}})).is_err());
        assert!(validate_params(CommandKind::Restart, &json!({"ttl_seconds": 0})).is_err());
        let p = validate_params(
            CommandKind::Chatops,
            &json!({"tag": "t1", "attributes": "{\"a\":1}"}),
        )
        .unwrap();
        assert_eq!(p["attributes"], json!({"a": 1}));
        // A uid left out is chosen at queue time, per command (not here, once).
        let p = validate_params(CommandKind::NewInstanceUid, &Value::Null).unwrap();
        assert!(p.get("new_uid").is_none(), "{p}");
        let chosen = Uuid::now_v7().to_string();
        let p = validate_params(CommandKind::NewInstanceUid, &json!({"new_uid": chosen})).unwrap();
        assert_eq!(p["new_uid"], chosen.as_str());
        assert!(validate_params(CommandKind::NewInstanceUid, &json!({"new_uid": "x"})).is_err());
    }

    #[test]
    fn capability_checks() {
        let plain = agent(1, &[]);
        let p = validate_params(CommandKind::Restart, &Value::Null).unwrap();
        assert!(check_capable(&plain, CommandKind::Restart, &p).is_err());
        assert!(check_capable(&agent(0x401, &[]), CommandKind::Restart, &p).is_ok());
        let p = validate_params(CommandKind::Chatops, &json!({"tag": "x"})).unwrap();
        let prefixed = agent(1, &["request:org.mp3monster.opamp_provider.chatopcommand"]);
        assert!(check_capable(&prefixed, CommandKind::Chatops, &p).is_ok());
        assert!(check_capable(&plain, CommandKind::Chatops, &p).is_err());
    }

    #[test]
    fn chatops_wire_forms() {
        let plain = agent(1, &[CAP_CHATOPS]);
        let c = cmd(
            CommandKind::Chatops,
            json!({"tag": "t", "attributes": {"b": 1}}),
            &plain,
        );
        let Outgoing::Custom(m) = encode(&c, &plain) else {
            panic!()
        };
        assert_eq!(m.capability, CAP_CHATOPS);
        assert_eq!(m.r#type, "request");
        assert_eq!(
            String::from_utf8(m.data).unwrap(),
            r#"{"attributes":{"b":1},"tag":"t"}"#
        );
        let rich = agent(1, &[CAP_CHATOPS, CAP_FLOTILLA]);
        let Outgoing::Custom(m) = encode(&c, &rich) else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&m.data).unwrap();
        assert_eq!(v["command_id"], json!(c.id.to_string()));
    }

    #[test]
    fn plain_failure_settles_oldest_chatops() {
        let a = agent(1, &[CAP_CHATOPS]);
        let c1 = cmd(CommandKind::Chatops, json!({"tag": "a"}), &a);
        let c2 = cmd(CommandKind::Chatops, json!({"tag": "b"}), &a);
        let msg = AgentToServer {
            custom_message: Some(CustomMessage {
                capability: CAP_CHATOPS.into(),
                r#type: "failure".into(),
                data: br#"{"http_code": 404, "err_msg": "no route"}"#.to_vec(),
            }),
            ..Default::default()
        };
        let got = observe(&a, &a, &msg, &[c1.clone(), c2], 5);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, c1.id);
        assert_eq!(got[0].1.to, CommandStatus::Failed);
        assert_eq!(got[0].1.error.as_deref(), Some("no route (HTTP 404)"));
    }

    #[test]
    fn rich_result_and_remote_config_status() {
        let a = agent(0x1003, &[CAP_FLOTILLA, CAP_CHATOPS]);
        let c = cmd(CommandKind::Chatops, json!({"tag": "a"}), &a);
        let rc = cmd(
            CommandKind::RemoteConfig,
            json!({"files": {"fluent-bit.conf": "[SERVICE]\n"}}),
            &a,
        );
        let data = json!({"command_id": c.id.to_string(), "status": "succeeded", "http_code": 200});
        let msg = AgentToServer {
            custom_message: Some(CustomMessage {
                capability: CAP_FLOTILLA.into(),
                r#type: "result".into(),
                data: data.to_string().into_bytes(),
            }),
            remote_config_status: Some(flotilla_proto::RemoteConfigStatus {
                last_remote_config_hash: hex::decode(rc.params["hash"].as_str().unwrap()).unwrap(),
                status: 3,
                error_message: "bad plugin".into(),
            }),
            ..Default::default()
        };
        let got = observe(&a, &a, &msg, &[c.clone(), rc.clone()], 5);
        assert_eq!(got.len(), 2);
        let find = |id| got.iter().find(|(i, _)| *i == id).unwrap();
        assert_eq!(find(c.id).1.to, CommandStatus::Succeeded);
        assert_eq!(find(rc.id).1.to, CommandStatus::Failed);
        assert_eq!(find(rc.id).1.error.as_deref(), Some("bad plugin"));
    }

    /// Only an absolute start time later than the queue time confirms a restart.
    #[test]
    fn a_restart_is_confirmed_only_by_a_start_time_after_the_queue_time() {
        const S: u64 = 1_000_000_000;
        let queued: Millis = 1_780_000_000_000; // 2026, in ms
        let q_ns = queued as u64 * 1_000_000;
        let now = queued + 5_000;
        let settled = |t0: Option<u64>, t1: u64| {
            let mut before = agent(0xC01, &[]);
            before.health = t0.map(|t| crate::model::Health {
                healthy: true,
                start_time_unix_nano: t,
                ..Default::default()
            });
            let mut c = cmd(CommandKind::Restart, json!({}), &before);
            c.created_at = queued;
            let msg = AgentToServer {
                health: Some(flotilla_proto::ComponentHealth {
                    healthy: true,
                    start_time_unix_nano: t1,
                    ..Default::default()
                }),
                ..Default::default()
            };
            !observe(&before, &before, &msg, &[c], now).is_empty()
        };
        // fluent-opamp's uptime grows with every heartbeat: never proof.
        assert!(!settled(Some(3 * S), 4 * S));
        assert!(!settled(None, 9 * S));
        // A start time that moved, but to before the command was queued: some other restart.
        assert!(!settled(Some(q_ns - 600 * S), q_ns - 5 * S));
        // Unchanged, or in the far future (not a clock reading): no.
        assert!(!settled(Some(q_ns + S), q_ns + S));
        assert!(!settled(Some(q_ns - 600 * S), q_ns + 86_400 * S));
        // Started after the queue time: the restart happened.
        assert!(settled(Some(q_ns - 600 * S), q_ns + 2 * S));
        assert!(settled(None, q_ns + 2 * S));
        // A clock a few minutes ahead of ours still counts.
        assert!(settled(Some(q_ns - 600 * S), q_ns + 300 * S));

        // And an expiry says why an uptime cannot confirm it.
        let mut fo = agent(0xC01, &[]);
        fo.health = Some(crate::model::Health {
            healthy: true,
            start_time_unix_nano: 7 * S,
            ..Default::default()
        });
        let c = cmd(CommandKind::Restart, json!({}), &fo);
        assert!(reports_uptime(&fo));
        assert!(no_result_reason(&c, Some(&fo)).contains("uptime"));
        fo.health.as_mut().unwrap().start_time_unix_nano = q_ns;
        assert!(!reports_uptime(&fo));
        assert!(no_result_reason(&c, Some(&fo)).contains("queue time"));
    }

    #[test]
    fn config_hash_is_stable_and_sensitive() {
        let mut f = ConfigFiles::new();
        f.insert(
            "a".into(),
            ConfigFile {
                content_type: "text/plain".into(),
                body: "x".into(),
                encoding: None,
            },
        );
        let h1 = config_hash(&f);
        assert_eq!(h1, config_hash(&f.clone()));
        f.get_mut("a").unwrap().content_type = "text/yaml".into();
        assert_ne!(h1, config_hash(&f));
        assert_eq!(h1.len(), 64);
    }
}
