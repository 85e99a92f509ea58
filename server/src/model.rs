//! Domain types shared by every layer: agents, commands, batches, audit records, callers.
//!
//! These are plain data with serde derives; they know nothing of SQL or the wire.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Milliseconds since the Unix epoch; every timestamp in the registry uses it.
pub type Millis = i64;

/// Current wall-clock time in [`Millis`].
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Renders [`Millis`] as RFC 3339 (UTC) for humans and JSON.
pub fn rfc3339(ms: Millis) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Where an operation came from. Every audit record and command carries one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Rest,
    Mcp,
    Slack,
    Discord,
    Teams,
    Console,
    Cli,
    /// The server itself (expiry sweeps, results reported by agents).
    System,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Rest => "rest",
            Channel::Mcp => "mcp",
            Channel::Slack => "slack",
            Channel::Discord => "discord",
            Channel::Teams => "teams",
            Channel::Console => "console",
            Channel::Cli => "cli",
            Channel::System => "system",
        }
    }
    pub fn parse(s: &str) -> Option<Channel> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase())).ok()
    }
}

/// What a caller may do. Ordered: each role can do everything the lower ones can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read the fleet, commands and audit.
    Viewer,
    /// Also queue and cancel commands and change labels.
    Operator,
    /// Everything (reserved for administrative operations).
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase())).ok()
    }

    /// As the tokens file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is asking, through which channel. Adapters build it after authenticating.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub actor: String,
    pub channel: Channel,
    pub role: Role,
}

impl Caller {
    /// The server acting on its own behalf (sweeps, agent-reported outcomes).
    pub fn system() -> Caller {
        Caller {
            actor: "flotilla".into(),
            channel: Channel::System,
            role: Role::Admin,
        }
    }
}

/// How an agent talks to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Http,
    Websocket,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Websocket => "websocket",
        }
    }
}

/// Liveness derived from the age of the last message against the agent's heartbeat interval,
/// whatever the transport did in between (see [`Agent::liveness`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Heard from within 1.5 heartbeat intervals.
    Healthy,
    /// Older than 1.5 intervals but younger than 3.
    Late,
    /// Said goodbye (`agent_disconnect`), or not heard from for 3 intervals.
    Offline,
}

/// Attribute keys agents report their host under, in order of preference: OpenTelemetry's
/// `host.name`, fluent-opamp's `hostname`, and `host.hostname`. Search (`host:`, `host.name:`)
/// looks at all of them.
pub const HOST_ATTRIBUTES: [&str; 3] = ["host.name", "hostname", "host.hostname"];

/// The version number inside a version string: `5.1.1` in `Fluent Bit - 5.1.1 (Community)`
/// (fluent-opamp's `service.version`), `1.18.0` in `fluentd-1.18.0`, `2.0.3-rc1` in
/// `v2.0.3-rc1`. The first run of dotted digits that does not continue a word (a leading `v`
/// is allowed), with a `-`/`+` pre-release or build suffix. `None` without one.
pub fn version_number(s: &str) -> Option<&str> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let starts = b[i].is_ascii_digit()
            && (i == 0 || !b[i - 1].is_ascii_alphanumeric() || matches!(b[i - 1], b'v' | b'V'));
        if !starts {
            i += 1;
            continue;
        }
        let mut j = i;
        let mut dots = 0;
        loop {
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if j + 1 < b.len() && b[j] == b'.' && b[j + 1].is_ascii_digit() {
                dots += 1;
                j += 1;
            } else {
                break;
            }
        }
        if dots > 0 {
            if j + 1 < b.len() && matches!(b[j], b'-' | b'+') && b[j + 1].is_ascii_alphanumeric() {
                j += 1;
                while j < b.len()
                    && (b[j].is_ascii_alphanumeric() || matches!(b[j], b'.' | b'-' | b'+'))
                {
                    j += 1;
                }
            }
            return Some(s[i..j].trim_end_matches(['.', '-', '+']));
        }
        i = j;
    }
    None
}

/// A node of the agent's health tree (OpAMP `ComponentHealth`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub healthy: bool,
    #[serde(default)]
    pub start_time_unix_nano: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
    #[serde(default)]
    pub status_time_unix_nano: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, Health>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// One config file as reported or offered. Bodies are kept as text when they are UTF-8,
/// otherwise base64 (`encoding: "base64"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigFile {
    #[serde(default)]
    pub content_type: String,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
}

/// A set of config files keyed by file name (OpAMP `AgentConfigMap`).
pub type ConfigFiles = BTreeMap<String, ConfigFile>;

/// What the agent last said about remote config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteConfigState {
    /// Hex of `last_remote_config_hash`.
    pub hash: String,
    /// `unset`, `applied`, `applying` or `failed`.
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// The remote config the server wants the agent to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredConfig {
    /// Hex of the SHA-256 config hash sent as `config_hash`.
    pub hash: String,
    pub files: ConfigFiles,
    /// The command that set it, so its status can follow `remote_config_status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<Uuid>,
}

/// One agent in the registry: everything it reported, plus server-side state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub uid: Uuid,
    /// Identifying attributes, values rendered as strings, in reported order.
    pub identifying: Vec<(String, String)>,
    pub non_identifying: Vec<(String, String)>,
    pub capabilities: u64,
    pub custom_capabilities: Vec<String>,
    pub health: Option<Health>,
    pub effective_config: Option<ConfigFiles>,
    pub remote_config_status: Option<RemoteConfigState>,
    pub desired_config: Option<DesiredConfig>,
    /// Server-side labels set by operators.
    pub labels: BTreeMap<String, String>,
    pub transport: Option<Transport>,
    pub remote_addr: Option<String>,
    pub first_seen: Millis,
    pub last_seen: Millis,
    pub connected: bool,
    /// Last `sequence_num` received.
    pub sequence_num: u64,
    /// Heartbeat interval we expect from this agent, in seconds (offered or default).
    pub heartbeat_interval_s: u64,
    /// Set after the agent adopted a new uid: the uid it had before.
    pub previous_uid: Option<Uuid>,
    /// A silent record that is very likely this same agent under an earlier uid (same
    /// `service.instance.id` and host): agents that generate a uid on every start, such as
    /// fluent-opamp supervisors, come back as new agents.
    pub replaces: Option<Uuid>,
    /// Set on such an earlier record: the agent that re-registered in its place.
    pub replaced_by: Option<Uuid>,
    /// The agent said goodbye (`agent_disconnect`), or re-registered under another uid, and
    /// has not been heard from since: offline whatever its last message's age.
    #[serde(default)]
    pub departed: bool,
    /// The client certificate (mTLS) of its latest registry write; with `opamp.tls.pin_uid`
    /// the first one seen, which every later connection for this uid must present.
    #[serde(default)]
    pub client_cert: Option<crate::tls::PeerCert>,
    /// The replica (`store.replica_id`) that holds or last held its connection; set by the
    /// store on every connected write.
    #[serde(default)]
    pub replica: Option<String>,
}

impl Agent {
    /// A fresh record for an agent first seen now.
    pub fn new(uid: Uuid, now: Millis, heartbeat_interval_s: u64) -> Agent {
        Agent {
            uid,
            identifying: Vec::new(),
            non_identifying: Vec::new(),
            capabilities: 0,
            custom_capabilities: Vec::new(),
            health: None,
            effective_config: None,
            remote_config_status: None,
            desired_config: None,
            labels: BTreeMap::new(),
            transport: None,
            remote_addr: None,
            first_seen: now,
            last_seen: now,
            connected: false,
            sequence_num: 0,
            heartbeat_interval_s,
            previous_uid: None,
            replaces: None,
            replaced_by: None,
            departed: false,
            client_cert: None,
            replica: None,
        }
    }

    /// What identifies the agent across uids: `service.instance.id` and its host, when it
    /// reports both. Two records with the same key and one of them silent are one agent that
    /// came back under a new uid.
    pub fn identity_key(&self) -> Option<String> {
        let instance = self.attr("service.instance.id").filter(|v| !v.is_empty())?;
        let host = self
            .attr("host.name")
            .or_else(|| self.attr("hostname"))
            .filter(|v| !v.is_empty())?;
        Some(format!("{instance}\u{0}{host}"))
    }

    /// Looks an attribute up in identifying then non-identifying attributes.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.identifying
            .iter()
            .chain(self.non_identifying.iter())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Where the agent runs: the first non-empty [`HOST_ATTRIBUTES`] value.
    pub fn host(&self) -> Option<&str> {
        self.hosts().next()
    }

    /// Every non-empty host attribute value, in [`HOST_ATTRIBUTES`] order.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        HOST_ATTRIBUTES
            .iter()
            .filter_map(|k| self.attr(k))
            .filter(|v| !v.is_empty())
    }

    /// The version number in `service.version` (see [`version_number`]).
    pub fn version_number(&self) -> Option<&str> {
        self.attr("service.version").and_then(version_number)
    }

    /// Liveness at `now`, from when the agent was last heard and its heartbeat interval —
    /// whatever its transport did in between: a plain-HTTP agent, or one that opens a WebSocket
    /// per message (fluent-opamp), has no connection between messages at all, and a dropped
    /// connection is not a silent agent. Late after 1.5 intervals of silence, offline after 3,
    /// and offline at once after it said goodbye.
    pub fn liveness(&self, now: Millis) -> Liveness {
        if self.departed {
            return Liveness::Offline;
        }
        let interval = (self.heartbeat_interval_s.max(1) as i64) * 1000;
        let age = now - self.last_seen;
        if age <= interval * 3 / 2 {
            Liveness::Healthy
        } else if age <= interval * 3 {
            Liveness::Late
        } else {
            Liveness::Offline
        }
    }

    /// The agent type for search and display: `service.type`/`service.name` normalised, so
    /// `fluentbit`, `fluentd` and `otelcol` match however the agent spells them.
    pub fn agent_type(&self) -> String {
        let raw = self
            .attr("service.type")
            .or_else(|| self.attr("agent.type"))
            .or_else(|| self.attr("service.name"))
            .unwrap_or("");
        let norm: String = raw
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        if norm.contains("fluentbit") {
            "fluentbit".into()
        } else if norm.contains("fluentd") {
            "fluentd".into()
        } else if norm.contains("otelcol") || norm.contains("collector") {
            "otelcol".into()
        } else {
            norm
        }
    }
}

/// The kinds of command the queue knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    Restart,
    ForceResync,
    NewInstanceUid,
    Chatops,
    Shutdown,
    Custom,
    RemoteConfig,
}

impl CommandKind {
    pub const ALL: [CommandKind; 7] = [
        CommandKind::Restart,
        CommandKind::ForceResync,
        CommandKind::NewInstanceUid,
        CommandKind::Chatops,
        CommandKind::Shutdown,
        CommandKind::Custom,
        CommandKind::RemoteConfig,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Restart => "restart",
            CommandKind::ForceResync => "force_resync",
            CommandKind::NewInstanceUid => "new_instance_uid",
            CommandKind::Chatops => "chatops",
            CommandKind::Shutdown => "shutdown",
            CommandKind::Custom => "custom",
            CommandKind::RemoteConfig => "remote_config",
        }
    }
    pub fn parse(s: &str) -> Option<CommandKind> {
        CommandKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Command lifecycle: `queued → sent → succeeded | failed | expired | cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandStatus {
    Queued,
    Sent,
    Succeeded,
    Failed,
    Expired,
    Cancelled,
}

impl CommandStatus {
    pub const ALL: [CommandStatus; 6] = [
        CommandStatus::Queued,
        CommandStatus::Sent,
        CommandStatus::Succeeded,
        CommandStatus::Failed,
        CommandStatus::Expired,
        CommandStatus::Cancelled,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Queued => "queued",
            CommandStatus::Sent => "sent",
            CommandStatus::Succeeded => "succeeded",
            CommandStatus::Failed => "failed",
            CommandStatus::Expired => "expired",
            CommandStatus::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<CommandStatus> {
        CommandStatus::ALL.into_iter().find(|k| k.as_str() == s)
    }
    pub fn is_final(self) -> bool {
        !matches!(self, CommandStatus::Queued | CommandStatus::Sent)
    }
}

/// One command for one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// UUIDv7: sorts by creation time, which is also the per-agent delivery order.
    pub id: Uuid,
    pub agent_uid: Uuid,
    pub batch_id: Option<Uuid>,
    pub kind: CommandKind,
    /// Validated parameters (see `commands::validate`).
    pub params: serde_json::Value,
    pub status: CommandStatus,
    pub created_at: Millis,
    pub sent_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    /// A queued command not sent by then expires.
    pub expires_at: Millis,
    /// What the agent reported (or the evidence the server saw), when it finished.
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    pub actor: String,
    pub channel: Channel,
    /// The audit record that queued it.
    pub audit_id: Option<i64>,
}

/// A fan-out request: one command per agent that matched `query` when it was queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub id: Uuid,
    pub query: String,
    pub kind: CommandKind,
    pub params: serde_json::Value,
    pub created_at: Millis,
    pub actor: String,
    pub channel: Channel,
    /// Agents that matched but could not take the command, with the reason.
    pub skipped: Vec<SkippedTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedTarget {
    pub agent_uid: Uuid,
    pub reason: String,
}

/// An audit record about to be appended; the store assigns id, time and hashes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewAudit {
    pub actor: String,
    pub channel: Channel,
    pub operation: String,
    pub targets: Vec<String>,
    pub params: serde_json::Value,
    pub outcome: String,
    /// For outcome records: the record whose operation this one completes.
    pub ref_id: Option<i64>,
}

impl NewAudit {
    pub fn new(caller: &Caller, operation: &str) -> NewAudit {
        NewAudit {
            actor: caller.actor.clone(),
            channel: caller.channel,
            operation: operation.into(),
            targets: Vec::new(),
            params: serde_json::Value::Null,
            outcome: "ok".into(),
            ref_id: None,
        }
    }
}

/// A stored audit record. `hash = sha256(prev_hash ‖ canonical content)`, see `audit.rs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub id: i64,
    pub ts: Millis,
    pub actor: String,
    pub channel: Channel,
    pub operation: String,
    pub targets: Vec<String>,
    pub params: serde_json::Value,
    pub outcome: String,
    pub ref_id: Option<i64>,
    pub prev_hash: String,
    pub hash: String,
}

/// Filters for listing commands; `None` means "any".
#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    pub agent: Option<Uuid>,
    pub status: Option<CommandStatus>,
    pub batch: Option<Uuid>,
    pub kind: Option<CommandKind>,
    /// Only commands created before this id (cursor, newest first).
    pub before: Option<Uuid>,
    pub limit: usize,
}

/// Filters for querying the audit trail; `None` means "any". Newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub channel: Option<Channel>,
    /// Records whose targets include this agent uid (as a string).
    pub agent: Option<String>,
    pub operation: Option<String>,
    pub since: Option<Millis>,
    pub until: Option<Millis>,
    /// Only records with id below this (cursor).
    pub before_id: Option<i64>,
    pub limit: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_numbers_are_found_inside_version_strings() {
        for (s, want) in [
            ("Fluent Bit - 5.1.1 (Community)", Some("5.1.1")),
            ("5.1.1", Some("5.1.1")),
            ("1.18.0", Some("1.18.0")),
            ("fluentd-1.18.0", Some("1.18.0")),
            ("fluent-bit/5.1.1", Some("5.1.1")),
            ("v2.0.3-rc1", Some("2.0.3-rc1")),
            ("2.0.3+build.7 (linux)", Some("2.0.3+build.7")),
            ("release 3.2.", Some("3.2")),
            ("x86_64 build", None),
            ("community", None),
            ("7", None),
            ("", None),
        ] {
            assert_eq!(version_number(s), want, "{s:?}");
        }
    }

    #[test]
    fn liveness_follows_the_last_message_not_the_connection() {
        let mut a = Agent::new(Uuid::now_v7(), 1_000, 10);
        // A per-message WebSocket (or plain HTTP) agent between two messages.
        a.connected = false;
        assert_eq!(a.liveness(1_000 + 15_000), Liveness::Healthy);
        assert_eq!(a.liveness(1_000 + 15_001), Liveness::Late);
        assert_eq!(a.liveness(1_000 + 30_000), Liveness::Late);
        assert_eq!(a.liveness(1_000 + 30_001), Liveness::Offline);
        // It said goodbye: offline, however recent.
        a.departed = true;
        assert_eq!(a.liveness(1_000), Liveness::Offline);
    }

    #[test]
    fn every_host_attribute_counts() {
        let mut a = Agent::new(Uuid::now_v7(), 0, 30);
        assert_eq!(a.host(), None);
        a.non_identifying = vec![("hostname".into(), "web-7".into())];
        assert_eq!(a.host(), Some("web-7"));
        a.identifying = vec![("host.name".into(), "".into())];
        assert_eq!(a.hosts().collect::<Vec<_>>(), vec!["web-7"]);
        a.identifying = vec![("host.name".into(), "web-7.example".into())];
        assert_eq!(a.host(), Some("web-7.example"));
        assert_eq!(a.hosts().count(), 2);
    }
}
