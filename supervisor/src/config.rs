//! Supervisor configuration: a TOML file, overridden by `FLOTILLA_SUPERVISOR_*` environment
//! variables, overridden by flags; validated as a whole at start so an operator sees every bad
//! field at once, each by its TOML name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use flotilla_proto::caps::agent_capability_by_name;
use flotilla_proto::AgentCapabilities;
use serde::Deserialize;

/// fluent-opamp's ChatOps capability.
pub const CAP_CHATOPS: &str = "org.mp3monster.opamp_provider.chatopcommand";
/// fluent-opamp's shutdown capability.
pub const CAP_SHUTDOWN: &str = "org.mp3monster.opamp_provider.command_shutdown_agent";
/// fluent-opamp's null (probe) capability.
pub const CAP_NULL: &str = "org.mp3monster.opamp_provider.nullcommand";
/// Flotilla's rich command form: payloads carry `command_id`, outcomes come back as `result`.
pub const CAP_FLOTILLA: &str = "io.flotilla.command/v1";
/// Marker: results are confirmed by the server's `ack` (a server acks only agents that declare
/// it, and a supervisor waits for acks only from servers that declare it), so neither side of
/// an older pair loops on a message the other does not understand.
pub const CAP_ACK: &str = "io.flotilla.command/v1/ack";
/// Custom capabilities this supervisor implements (and declares by default).
pub const SUPPORTED_CUSTOM: &[&str] = &[CAP_CHATOPS, CAP_SHUTDOWN, CAP_NULL, CAP_FLOTILLA, CAP_ACK];

/// Standard capabilities this supervisor implements, declared by default. ReportsStatus is
/// always declared (the spec requires it).
pub const SUPPORTED_CAPABILITIES: &[AgentCapabilities] = &[
    AgentCapabilities::ReportsStatus,
    AgentCapabilities::AcceptsRemoteConfig,
    AgentCapabilities::ReportsEffectiveConfig,
    AgentCapabilities::AcceptsOpAmpConnectionSettings,
    AgentCapabilities::AcceptsRestartCommand,
    AgentCapabilities::ReportsHealth,
    AgentCapabilities::ReportsRemoteConfig,
    AgentCapabilities::ReportsHeartbeat,
];

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not a valid supervisor configuration: {message}")]
    Parse { path: PathBuf, message: String },
    /// Every problem found, each starting with the field's TOML name.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl ConfigError {
    /// The individual problems (one per bad field); empty for read/parse errors.
    pub fn problems(&self) -> &[String] {
        match self {
            ConfigError::Invalid(p) => p,
            _ => &[],
        }
    }
}

/// The whole configuration. Field names are the TOML keys.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the instance uid, executed command ids, last remote config and last-known-good
    /// copies live.
    pub data_dir: PathBuf,
    pub server: ServerConfig,
    pub agent: AgentConfig,
    pub capabilities: CapabilitiesConfig,
    pub description: DescriptionConfig,
    pub log: LogConfig,
    pub healthz: HealthzConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// OpAMP endpoint. ws/wss: persistent WebSocket; http/https: plain-HTTP polling.
    pub url: String,
    pub auth: AuthConfig,
    /// Heartbeat (and HTTP polling) interval until the server offers one.
    pub heartbeat_interval_s: u64,
    /// First reconnect delay; doubles up to `backoff_max_s`, with jitter.
    pub backoff_initial_ms: u64,
    pub backoff_max_s: u64,
    /// Timeout for connecting and for one HTTP exchange.
    pub connect_timeout_s: u64,
    /// When all status sections are re-sent even if unchanged.
    pub full_state: FullStateController,
    /// Which server-offered OpAMP endpoints are followed (an offer that drops TLS never is).
    pub accept_offered_endpoint: OfferedEndpoint,
    /// `[server.tls]`: a private CA and a client certificate for wss/https (OpAMP and the
    /// OAuth2 token endpoint).
    pub tls: ServerTlsConfig,
}

/// `[server.tls]`. Unset, a TLS build trusts the public (webpki) roots and presents no client
/// certificate.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM CA certificate(s) trusted besides the public roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain (leaf first), for servers that ask for one (mTLS).
    pub cert_file: Option<PathBuf>,
    /// Its PEM private key; refused when other users can read or write it.
    pub key_file: Option<PathBuf>,
}

impl ServerTlsConfig {
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// Which `destination_endpoint` offers the supervisor follows. The connection carries the
/// credentials (bearer or OAuth2 token), so following an offer hands them to whoever the
/// offered URL names: the default keeps them on the origin the operator configured.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OfferedEndpoint {
    /// Same scheme, host and port as the endpoint in use (RFC 6454's origin); only the path
    /// may change. What a server behind a path-rewriting proxy needs, and nothing more.
    #[default]
    SameOrigin,
    /// Any host and port (a server that moves its agents to another server); TLS is still
    /// never given up.
    Any,
    /// Offered endpoints are ignored.
    Never,
}

/// How the OpAMP connection authenticates (HTTP `Authorization: Bearer`).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `none`, `bearer` (static token) or `oauth2` (client credentials).
    #[serde(rename = "type")]
    pub kind: String,
    /// bearer: environment variable holding the token.
    pub token_env: Option<String>,
    /// bearer: file holding the token (first line, trimmed).
    pub token_file: Option<PathBuf>,
    /// oauth2: token endpoint URL.
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_env: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub scope: Option<String>,
    pub audience: Option<String>,
}

/// When to re-send every status section (fluent-opamp's controllers, kept so operators moving
/// from it keep the same behaviour). Reconnects and the server's ReportFullState always do.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum FullStateController {
    /// Every message carries the full state.
    AlwaysSend,
    /// Every `n`th message carries the full state.
    SentCount { n: u64 },
    /// The full state again once `secs` seconds passed since the last full report.
    TimeSend { secs: u64 },
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AgentKind {
    Fluentbit,
    Fluentd,
}

impl AgentKind {
    /// Name used in logs and as the default `service.name`.
    pub fn name(self) -> &'static str {
        match self {
            AgentKind::Fluentbit => "fluent-bit",
            AgentKind::Fluentd => "fluentd",
        }
    }
    /// `service.type` as fluent-opamp reports it.
    pub fn display(self) -> &'static str {
        match self {
            AgentKind::Fluentbit => "Fluent Bit",
            AgentKind::Fluentd => "Fluentd",
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// `fluentbit` or `fluentd` (required).
    pub kind: Option<AgentKind>,
    pub executable: PathBuf,
    /// Extra arguments, appended after the ones the supervisor sets (`-c`, HTTP flags).
    pub args: Vec<String>,
    /// The agent's main config file; remote configs are written here (and next to it).
    pub config_path: PathBuf,
    /// Extra environment for the agent.
    pub env: BTreeMap<String, String>,
    /// Fluent Bit monitoring port; the supervisor forces the HTTP server on 127.0.0.1:<port>.
    pub http_port: u16,
    /// Fluentd monitor_agent base URL (must be loopback).
    pub monitor_url: String,
    /// Fluentd `<system> rpc_endpoint` (host:port) for graceful reload; unset = controlled restart.
    pub rpc_endpoint: Option<String>,
    /// Port of the agent's local `http` input that ChatOps commands are POSTed to.
    pub chat_ops_port: u16,
    /// SIGTERM → SIGKILL grace. Unset: 10 s for Fluent Bit, 30 s for Fluentd (buffer flush).
    pub stop_timeout_s: Option<u64>,
    /// How often the agent's own API is polled for health.
    pub health_interval_s: u64,
    /// After a remote config is applied, the agent must stay up and healthy this long.
    pub health_gate_s: u64,
    /// Longest wait for a hot reload to be confirmed.
    pub reload_timeout_s: u64,
    /// Longest a dry run (`-D` / `--dry-run`) may take.
    pub dry_run_timeout_s: u64,
    pub restart_backoff_initial_ms: u64,
    pub restart_backoff_max_s: u64,
    /// An agent that exits unexpectedly this many times within `crash_loop_window_s` is
    /// reported as crash-looping.
    pub crash_loop_threshold: u32,
    pub crash_loop_window_s: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CapabilitiesConfig {
    /// Standard capabilities to declare, by name (e.g. `AcceptsRemoteConfig`).
    pub declare: Vec<String>,
    /// Custom capabilities to declare.
    pub custom: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DescriptionConfig {
    /// `service.name`; default `fluent-bit` / `fluentd`.
    pub service_name: Option<String>,
    pub service_namespace: String,
    /// Extra identifying attributes.
    pub identifying: BTreeMap<String, String>,
    /// Extra non-identifying attributes.
    pub non_identifying: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info`.
    pub level: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct HealthzConfig {
    /// Local `/healthz` listener, e.g. `127.0.0.1:8989`; off when unset.
    pub listen: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("/var/lib/flotilla-supervisor"),
            server: ServerConfig::default(),
            agent: AgentConfig::default(),
            capabilities: CapabilitiesConfig::default(),
            description: DescriptionConfig::default(),
            log: LogConfig::default(),
            healthz: HealthzConfig::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            url: String::new(),
            auth: AuthConfig {
                kind: "none".into(),
                ..Default::default()
            },
            heartbeat_interval_s: 30,
            backoff_initial_ms: 1000,
            backoff_max_s: 60,
            connect_timeout_s: 10,
            full_state: FullStateController::TimeSend { secs: 600 },
            accept_offered_endpoint: OfferedEndpoint::SameOrigin,
            tls: ServerTlsConfig::default(),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            kind: None,
            executable: PathBuf::new(),
            args: Vec::new(),
            config_path: PathBuf::new(),
            env: BTreeMap::new(),
            http_port: 2020,
            monitor_url: "http://127.0.0.1:24220".into(),
            rpc_endpoint: None,
            chat_ops_port: 8888,
            stop_timeout_s: None,
            health_interval_s: 10,
            health_gate_s: 10,
            reload_timeout_s: 15,
            dry_run_timeout_s: 60,
            restart_backoff_initial_ms: 1000,
            restart_backoff_max_s: 60,
            crash_loop_threshold: 3,
            crash_loop_window_s: 120,
        }
    }
}

impl Default for CapabilitiesConfig {
    fn default() -> Self {
        CapabilitiesConfig {
            declare: SUPPORTED_CAPABILITIES
                .iter()
                .map(|c| cap_name(*c).to_string())
                .collect(),
            custom: SUPPORTED_CUSTOM.iter().map(|s| s.to_string()).collect(),
        }
    }
}

// By hand, not derived: serde fills a `[description]` table's missing keys from this, so a
// derived "" would replace the documented namespace whenever the table is present.
impl Default for DescriptionConfig {
    fn default() -> Self {
        DescriptionConfig {
            service_name: None,
            service_namespace: "flotilla".into(),
            identifying: BTreeMap::new(),
            non_identifying: BTreeMap::new(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

fn cap_name(c: AgentCapabilities) -> &'static str {
    flotilla_proto::caps::AGENT_CAPABILITY_NAMES
        .iter()
        .find(|(x, _)| *x == c)
        .map(|(_, n)| *n)
        .unwrap_or("?")
}

/// Environment variables read by [`Config::load`], with the field each overrides.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("FLOTILLA_SUPERVISOR_DATA_DIR", "data_dir"),
    ("FLOTILLA_SUPERVISOR_SERVER_URL", "server.url"),
    ("FLOTILLA_SUPERVISOR_AUTH_TYPE", "server.auth.type"),
    (
        "FLOTILLA_SUPERVISOR_HEARTBEAT_INTERVAL_S",
        "server.heartbeat_interval_s",
    ),
    ("FLOTILLA_SUPERVISOR_AGENT_KIND", "agent.kind"),
    ("FLOTILLA_SUPERVISOR_AGENT_EXECUTABLE", "agent.executable"),
    ("FLOTILLA_SUPERVISOR_AGENT_CONFIG", "agent.config_path"),
    ("FLOTILLA_SUPERVISOR_CHAT_OPS_PORT", "agent.chat_ops_port"),
    ("FLOTILLA_SUPERVISOR_LOG_FORMAT", "log.format"),
    ("FLOTILLA_SUPERVISOR_LOG", "log.level"),
    ("FLOTILLA_SUPERVISOR_HEALTHZ_LISTEN", "healthz.listen"),
];

impl Config {
    /// Reads `file` (if given) and applies `env` overrides (only names in [`ENV_VARS`] count);
    /// does not validate.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Config::from_toml(&text).map_err(|message| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message,
                })?
            }
            None => Config::default(),
        };
        let mut problems = Vec::new();
        for (name, value) in env {
            if let Some((_, field)) = ENV_VARS.iter().find(|(n, _)| *n == name) {
                if let Err(e) = cfg.set(field, &value) {
                    problems.push(format!("{field} (from {name}): {e}"));
                }
            }
        }
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Parses TOML text (unknown keys are refused so a typo never goes unnoticed).
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str::<Config>(text).map_err(|e| e.to_string())
    }

    /// Sets one field by its TOML name from a string (environment variables and flags).
    pub fn set(&mut self, field: &str, value: &str) -> Result<(), String> {
        let num = |v: &str| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| format!("{v:?} is not a whole number"))
        };
        match field {
            "data_dir" => self.data_dir = PathBuf::from(value),
            "server.url" => self.server.url = value.to_string(),
            "server.auth.type" => self.server.auth.kind = value.to_string(),
            "server.heartbeat_interval_s" => self.server.heartbeat_interval_s = num(value)?,
            "agent.kind" => {
                self.agent.kind = Some(match value {
                    "fluentbit" => AgentKind::Fluentbit,
                    "fluentd" => AgentKind::Fluentd,
                    _ => return Err(format!("{value:?} is not one of fluentbit, fluentd")),
                })
            }
            "agent.executable" => self.agent.executable = PathBuf::from(value),
            "agent.config_path" => self.agent.config_path = PathBuf::from(value),
            "agent.chat_ops_port" => {
                self.agent.chat_ops_port = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("{value:?} is not a port number"))?
            }
            "log.format" => self.log.format = value.to_string(),
            "log.level" => self.log.level = value.to_string(),
            "healthz.listen" => {
                self.healthz.listen = (!value.is_empty()).then(|| value.to_string())
            }
            other => return Err(format!("unknown field {other}")),
        }
        Ok(())
    }

    /// Checks every field and returns all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p: Vec<String> = Vec::new();
        if self.data_dir.as_os_str().is_empty() {
            p.push("data_dir: must be set".into());
        }
        // server
        if self.server.url.trim().is_empty() {
            p.push("server.url: must be set (ws://, wss://, http:// or https://)".into());
        } else if let Err(e) = check_opamp_url(&self.server.url) {
            p.push(format!("server.url: {e}"));
        }
        self.validate_auth(&mut p);
        self.validate_tls(&mut p);
        // Durations are bounded above too: `Instant + Duration` panics on overflow, and no
        // sensible setting is longer than a day.
        let sv = &self.server;
        for (field, v, min, max) in [
            (
                "server.heartbeat_interval_s",
                sv.heartbeat_interval_s,
                1,
                DAY_S,
            ),
            (
                "server.backoff_initial_ms",
                sv.backoff_initial_ms,
                1,
                DAY_MS,
            ),
            ("server.backoff_max_s", sv.backoff_max_s, 1, DAY_S),
            ("server.connect_timeout_s", sv.connect_timeout_s, 1, DAY_S),
        ] {
            check_range(&mut p, field, v, min, max);
        }
        match self.server.full_state {
            FullStateController::SentCount { n: 0 } => {
                p.push("server.full_state.n: must be at least 1".into())
            }
            FullStateController::TimeSend { secs: 0 } => {
                p.push("server.full_state.secs: must be at least 1".into())
            }
            _ => {}
        }
        // agent
        let a = &self.agent;
        if a.kind.is_none() {
            p.push("agent.kind: must be set to fluentbit or fluentd".into());
        }
        if a.executable.as_os_str().is_empty() {
            p.push("agent.executable: must be set".into());
        } else if !is_executable(&a.executable) {
            p.push(format!(
                "agent.executable: {} is not an executable file",
                a.executable.display()
            ));
        }
        if a.config_path.as_os_str().is_empty() {
            p.push("agent.config_path: must be set".into());
        } else if a.config_path.file_name().is_none() {
            p.push(format!(
                "agent.config_path: {} does not name a file",
                a.config_path.display()
            ));
        } else if !a
            .config_path
            .parent()
            .map(|d| d.as_os_str().is_empty() || d.is_dir())
            .unwrap_or(false)
        {
            p.push(format!(
                "agent.config_path: directory of {} does not exist",
                a.config_path.display()
            ));
        }
        for (i, arg) in a.args.iter().enumerate() {
            // The supervisor owns these: it must know the config path and where the API is.
            let owned: &[&str] = match a.kind {
                Some(AgentKind::Fluentbit) => &[
                    "-c",
                    "--config",
                    "-d",
                    "--daemon",
                    "--supervisor",
                    "-L",
                    "--http_listen",
                    "-P",
                    "--http_port",
                ],
                Some(AgentKind::Fluentd) => &["-c", "--config", "-d", "--daemon"],
                None => &[],
            };
            let name = arg.split('=').next().unwrap_or(arg);
            if owned.contains(&name) {
                p.push(format!(
                    "agent.args[{i}]: {arg:?} is set by the supervisor (use agent.config_path / agent.http_port)"
                ));
            }
        }
        if a.kind == Some(AgentKind::Fluentbit) && a.http_port == 0 {
            p.push("agent.http_port: must be a port between 1 and 65535".into());
        }
        if a.kind == Some(AgentKind::Fluentd) {
            match parse_http_base(&a.monitor_url) {
                Ok(o) if is_loopback_host(&o.host) => {}
                Ok(o) => p.push(format!(
                    "agent.monitor_url: host {:?} is not a loopback address (monitor_agent must bind 127.0.0.1)",
                    o.host
                )),
                Err(e) => p.push(format!("agent.monitor_url: {e}")),
            }
            if let Some(rpc) = &a.rpc_endpoint {
                match rpc.parse::<SocketAddr>() {
                    Ok(sa) if sa.ip().is_loopback() => {}
                    Ok(_) => p.push(format!(
                        "agent.rpc_endpoint: {rpc:?} is not a loopback address"
                    )),
                    Err(_) => p.push(format!(
                        "agent.rpc_endpoint: {rpc:?} is not host:port (e.g. 127.0.0.1:24444)"
                    )),
                }
            }
        }
        if a.chat_ops_port == 0 {
            p.push("agent.chat_ops_port: must be a port between 1 and 65535".into());
        } else {
            // The ChatOps input and the agent's own API cannot share a port: one of them
            // would fail to bind (Fluent Bit exits 255 on an HTTP port conflict).
            let api = match a.kind {
                Some(AgentKind::Fluentbit) => Some(("agent.http_port", a.http_port)),
                Some(AgentKind::Fluentd) => parse_http_base(&a.monitor_url)
                    .ok()
                    .map(|o| ("agent.monitor_url", o.port)),
                None => None,
            };
            let rpc = a
                .rpc_endpoint
                .as_deref()
                .and_then(|r| r.parse::<SocketAddr>().ok())
                .filter(|_| a.kind == Some(AgentKind::Fluentd))
                .map(|sa| ("agent.rpc_endpoint", sa.port()));
            for (other, port) in [api, rpc].into_iter().flatten() {
                if port == a.chat_ops_port {
                    p.push(format!(
                        "agent.chat_ops_port: {port} is also the port of {other}; the ChatOps input needs its own"
                    ));
                }
            }
        }
        for (field, v, min, max) in [
            (
                "agent.stop_timeout_s",
                a.stop_timeout_s.unwrap_or(1),
                1,
                DAY_S,
            ),
            ("agent.health_interval_s", a.health_interval_s, 1, DAY_S),
            ("agent.health_gate_s", a.health_gate_s, 1, DAY_S),
            ("agent.reload_timeout_s", a.reload_timeout_s, 1, DAY_S),
            ("agent.dry_run_timeout_s", a.dry_run_timeout_s, 1, DAY_S),
            (
                "agent.restart_backoff_initial_ms",
                a.restart_backoff_initial_ms,
                1,
                DAY_MS,
            ),
            (
                "agent.restart_backoff_max_s",
                a.restart_backoff_max_s,
                1,
                DAY_S,
            ),
            ("agent.crash_loop_window_s", a.crash_loop_window_s, 1, DAY_S),
        ] {
            check_range(&mut p, field, v, min, max);
        }
        if a.crash_loop_threshold < 2 {
            p.push("agent.crash_loop_threshold: must be at least 2".into());
        }
        // capabilities
        for (i, name) in self.capabilities.declare.iter().enumerate() {
            match agent_capability_by_name(name) {
                None => p.push(format!(
                    "capabilities.declare[{i}]: {name:?} is not an OpAMP agent capability"
                )),
                Some(c) if !SUPPORTED_CAPABILITIES.contains(&c) => p.push(format!(
                    "capabilities.declare[{i}]: {name:?} is not implemented by this supervisor (supported: {})",
                    SUPPORTED_CAPABILITIES
                        .iter()
                        .map(|c| cap_name(*c))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                Some(_) => {}
            }
        }
        for (i, name) in self.capabilities.custom.iter().enumerate() {
            if !SUPPORTED_CUSTOM.contains(&name.as_str()) {
                p.push(format!(
                    "capabilities.custom[{i}]: {name:?} is not implemented by this supervisor (supported: {})",
                    SUPPORTED_CUSTOM.join(", ")
                ));
            }
        }
        // description
        for (section, map) in [
            ("description.identifying", &self.description.identifying),
            (
                "description.non_identifying",
                &self.description.non_identifying,
            ),
        ] {
            for k in map.keys() {
                if k.trim().is_empty() {
                    p.push(format!("{section}: attribute names must not be empty"));
                }
            }
        }
        if matches!(&self.description.service_name, Some(s) if s.trim().is_empty()) {
            p.push("description.service_name: must not be empty when set".into());
        }
        // log
        if !matches!(self.log.format.as_str(), "text" | "json") {
            p.push(format!(
                "log.format: {:?} is not one of text, json",
                self.log.format
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            p.push(format!(
                "log.level: {:?} is not a valid filter (e.g. info, debug)",
                self.log.level
            ));
        }
        if let Some(l) = &self.healthz.listen {
            if l.parse::<SocketAddr>().is_err() {
                p.push(format!(
                    "healthz.listen: {l:?} is not an address:port (e.g. 127.0.0.1:8989)"
                ));
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(p))
        }
    }

    fn validate_auth(&self, p: &mut Vec<String>) {
        let a = &self.server.auth;
        match a.kind.as_str() {
            "none" => {
                for (set, f) in [
                    (a.token_env.is_some(), "token_env"),
                    (a.token_file.is_some(), "token_file"),
                    (a.token_url.is_some(), "token_url"),
                ] {
                    if set {
                        p.push(format!(
                            "server.auth.{f}: set, but server.auth.type is \"none\" (did you mean bearer or oauth2?)"
                        ));
                    }
                }
            }
            "bearer" => match (&a.token_env, &a.token_file) {
                (None, None) => p.push(
                    "server.auth.token_env: bearer auth needs token_env or token_file".into(),
                ),
                (Some(_), Some(_)) => {
                    p.push("server.auth.token_file: set token_env or token_file, not both".into())
                }
                (Some(var), None) => match std::env::var(var) {
                    Ok(v) if !v.trim().is_empty() => {}
                    _ => p.push(format!(
                        "server.auth.token_env: environment variable {var} is unset or empty"
                    )),
                },
                (None, Some(file)) => check_secret_file(p, "server.auth.token_file", file),
            },
            "oauth2" => {
                match a.token_url.as_deref() {
                    None => p.push("server.auth.token_url: oauth2 auth needs a token endpoint URL".into()),
                    Some(u) => match parse_http_base(u) {
                        Ok(o) if o.tls() && !cfg!(feature = "tls") => p.push(
                            "server.auth.token_url: https:// needs TLS, which this build does not include".into(),
                        ),
                        Ok(_) => {}
                        Err(e) => p.push(format!("server.auth.token_url: {e}")),
                    },
                }
                if a.client_id
                    .as_deref()
                    .map(str::trim)
                    .unwrap_or("")
                    .is_empty()
                {
                    p.push("server.auth.client_id: oauth2 auth needs a client id".into());
                }
                match (&a.client_secret_env, &a.client_secret_file) {
                    (None, None) => p.push(
                        "server.auth.client_secret_env: oauth2 auth needs client_secret_env or client_secret_file".into(),
                    ),
                    (Some(_), Some(_)) => p.push(
                        "server.auth.client_secret_file: set client_secret_env or client_secret_file, not both".into(),
                    ),
                    (Some(var), None) => {
                        if std::env::var(var).map(|v| v.is_empty()).unwrap_or(true) {
                            p.push(format!(
                                "server.auth.client_secret_env: environment variable {var} is unset or empty"
                            ));
                        }
                    }
                    (None, Some(f)) => check_secret_file(p, "server.auth.client_secret_file", f),
                }
            }
            other => p.push(format!(
                "server.auth.type: {other:?} is not one of none, bearer, oauth2"
            )),
        }
    }

    fn validate_tls(&self, p: &mut Vec<String>) {
        let t = &self.server.tls;
        if !t.is_set() {
            return;
        }
        if !cfg!(feature = "tls") {
            p.push(
                "server.tls: set, but this build does not include TLS; build with `--features tls`"
                    .into(),
            );
            return;
        }
        let problem = match (&t.cert_file, &t.key_file) {
            (Some(_), None) => Some("server.tls.cert_file: set without server.tls.key_file".into()),
            (None, Some(_)) => Some("server.tls.key_file: set without server.tls.cert_file".into()),
            // An exposed key is not read at all.
            (Some(_), Some(key)) => exposed_secret_file("server.tls.key_file", key),
            (None, None) => None,
        };
        #[cfg(feature = "tls")]
        let problem = problem.or_else(|| crate::tls::client_config(t).err().map(|e| e.to_string()));
        p.extend(problem);
    }

    /// The agent kind (validated configs always have one).
    pub fn kind(&self) -> AgentKind {
        self.agent.kind.unwrap_or(AgentKind::Fluentbit)
    }

    /// SIGTERM → SIGKILL grace for this agent kind.
    pub fn stop_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.agent.stop_timeout_s.unwrap_or(match self.kind() {
            AgentKind::Fluentbit => 10,
            // Fluentd waits for buffer flush attempts (2–5 s against a dead target); leave room.
            AgentKind::Fluentd => 30,
        }))
    }

    /// The capability bits to declare.
    pub fn capability_bits(&self) -> u64 {
        let mut bits = AgentCapabilities::ReportsStatus as u64;
        for n in &self.capabilities.declare {
            if let Some(c) = agent_capability_by_name(n) {
                bits |= c as u64;
            }
        }
        bits
    }

    /// True if the standard capability is declared.
    pub fn declares(&self, cap: AgentCapabilities) -> bool {
        self.capability_bits() & cap as u64 != 0
    }

    /// True if the custom capability is declared.
    pub fn declares_custom(&self, cap: &str) -> bool {
        self.capabilities.custom.iter().any(|c| c == cap)
    }
}

const DAY_S: u64 = 86_400;
const DAY_MS: u64 = DAY_S * 1000;

/// A token or secret file must be readable now and hold something (it is re-read at use).
fn check_secret_file(p: &mut Vec<String>, field: &str, file: &Path) {
    match std::fs::read_to_string(file) {
        Ok(v) if !v.trim().is_empty() => {}
        Ok(_) => p.push(format!("{field}: {} is empty", file.display())),
        Err(e) => p.push(format!("{field}: cannot read {}: {e}", file.display())),
    }
}

/// The rule `flotilla serve` applies to its secret files: no access for other users (group
/// access stays allowed, for a service group). The reason, naming the key and the fix.
pub fn exposed_secret_file(key: &str, path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    if mode & 0o006 == 0 {
        return None;
    }
    let how = if mode & 0o004 != 0 {
        "readable"
    } else {
        "writable"
    };
    Some(format!(
        "{key}: {} is {how} by other users (mode {mode:04o}); run `chmod 600 {}` \
         (or `chmod 640` for a service group)",
        path.display(),
        path.display()
    ))
}

fn check_range(p: &mut Vec<String>, field: &str, v: u64, min: u64, max: u64) {
    if v < min || v > max {
        p.push(format!("{field}: {v} is not between {min} and {max}"));
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// What a URL's credentials and connections are bound to: RFC 6454's origin, parsed by WHATWG
/// rules (host lower-cased, IPv6 in brackets, default ports filled in).
#[derive(Debug, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

impl Origin {
    pub fn tls(&self) -> bool {
        matches!(self.scheme.as_str(), "wss" | "https")
    }
}

/// The schemes an OpAMP endpoint may have.
pub const OPAMP_SCHEMES: &[&str] = &["ws", "wss", "http", "https"];

/// Parses `scheme://host[:port][/path]` with a scheme among `schemes`.
pub fn parse_origin(url: &str, schemes: &[&str]) -> Result<Origin, String> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "{url:?} is not a URL (expected e.g. {}://host:port/path)",
            schemes[0]
        ));
    };
    // Checked as written: the WHATWG parser would lower-case `WS://`, which then no longer
    // reads as a WebSocket endpoint (`transport::is_websocket`).
    if !schemes.contains(&scheme) {
        return Err(format!(
            "scheme {scheme:?} is not one of {}",
            schemes.join(", ")
        ));
    }
    // WHATWG parsing skips extra slashes (`ws:///v1/opamp` has host "v1"): an empty
    // authority is refused first.
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{url:?} has no host"));
    }
    let u = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let host = match u.host_str() {
        Some(h) if !h.is_empty() => h.to_string(),
        _ => return Err(format!("{url:?} has no host")),
    };
    let port = u
        .port_or_known_default()
        .ok_or_else(|| format!("{url:?} has no port"))?;
    Ok(Origin {
        scheme: scheme.to_string(),
        host,
        port,
    })
}

/// Checks an OpAMP endpoint, the configured `server.url` as well as one the server offers:
/// a URL this build can connect to.
pub fn check_opamp_url(url: &str) -> Result<Origin, String> {
    let o = parse_origin(url, OPAMP_SCHEMES)?;
    if o.tls() && !cfg!(feature = "tls") {
        return Err(format!(
            "{}:// needs TLS, which this build does not include; build with `--features tls`, \
             or terminate TLS in a local proxy",
            o.scheme
        ));
    }
    Ok(o)
}

/// Checks an `http[s]://host[:port][/path]` URL.
pub fn parse_http_base(url: &str) -> Result<Origin, String> {
    parse_origin(url, &["http", "https"])
}

fn is_loopback_host(h: &str) -> bool {
    // An IPv6 host keeps its URL brackets (`[::1]`).
    let ip = h
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h);
    h == "localhost"
        || ip
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Config {
        let mut c = Config::default();
        c.server.url = "ws://127.0.0.1:4320/v1/opamp".into();
        c.agent.kind = Some(AgentKind::Fluentbit);
        c.agent.executable = PathBuf::from("/bin/sh");
        c.agent.config_path = std::env::temp_dir().join("fluent-bit.conf");
        c.data_dir = std::env::temp_dir();
        c
    }

    fn problems(c: &Config) -> Vec<String> {
        match c.validate() {
            Ok(()) => vec![],
            Err(e) => e.problems().to_vec(),
        }
    }

    fn assert_bad(c: &Config, field: &str) {
        let p = problems(c);
        assert!(
            p.iter().any(|m| m.starts_with(field)),
            "expected a problem naming {field}, got {p:?}"
        );
    }

    #[test]
    fn good_config_passes() {
        assert_eq!(problems(&good()), Vec::<String>::new());
    }

    #[test]
    fn every_bad_field_is_named() {
        type Mutate = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Mutate)> = vec![
            ("data_dir", Box::new(|c| c.data_dir = PathBuf::new())),
            ("server.url", Box::new(|c| c.server.url = String::new())),
            (
                "server.url",
                Box::new(|c| c.server.url = "ftp://x/y".into()),
            ),
            ("server.url", Box::new(|c| c.server.url = "nonsense".into())),
            ("server.url", Box::new(|c| c.server.url = "ws:///v1".into())),
            (
                "server.auth.type",
                Box::new(|c| c.server.auth.kind = "magic".into()),
            ),
            (
                "server.auth.token_env",
                Box::new(|c| c.server.auth.kind = "bearer".into()),
            ),
            (
                "server.auth.token_env",
                Box::new(|c| {
                    c.server.auth.kind = "bearer".into();
                    c.server.auth.token_env = Some("FLOTILLA_TEST_SURELY_UNSET_VAR".into());
                }),
            ),
            (
                "server.auth.token_file",
                Box::new(|c| {
                    c.server.auth.kind = "bearer".into();
                    c.server.auth.token_file = Some("/nonexistent/token".into());
                }),
            ),
            (
                "server.auth.token_file",
                Box::new(|c| c.server.auth.token_file = Some("/x".into())),
            ),
            (
                "server.auth.token_url",
                Box::new(|c| c.server.auth.kind = "oauth2".into()),
            ),
            (
                "server.auth.client_id",
                Box::new(|c| c.server.auth.kind = "oauth2".into()),
            ),
            (
                "server.auth.client_secret_env",
                Box::new(|c| c.server.auth.kind = "oauth2".into()),
            ),
            (
                "server.auth.token_url",
                Box::new(|c| {
                    c.server.auth.kind = "oauth2".into();
                    c.server.auth.token_url = Some("idp/token".into());
                }),
            ),
            (
                "server.heartbeat_interval_s",
                Box::new(|c| c.server.heartbeat_interval_s = 0),
            ),
            (
                "server.backoff_initial_ms",
                Box::new(|c| c.server.backoff_initial_ms = 0),
            ),
            (
                "server.backoff_max_s",
                Box::new(|c| c.server.backoff_max_s = 0),
            ),
            (
                "server.connect_timeout_s",
                Box::new(|c| c.server.connect_timeout_s = 0),
            ),
            (
                "server.full_state.n",
                Box::new(|c| c.server.full_state = FullStateController::SentCount { n: 0 }),
            ),
            (
                "server.full_state.secs",
                Box::new(|c| c.server.full_state = FullStateController::TimeSend { secs: 0 }),
            ),
            ("agent.kind", Box::new(|c| c.agent.kind = None)),
            (
                "agent.executable",
                Box::new(|c| c.agent.executable = PathBuf::new()),
            ),
            (
                "agent.executable",
                Box::new(|c| c.agent.executable = "/nonexistent/fluent-bit".into()),
            ),
            (
                "agent.config_path",
                Box::new(|c| c.agent.config_path = PathBuf::new()),
            ),
            (
                "agent.config_path",
                Box::new(|c| c.agent.config_path = "/nonexistent/dir/fluent-bit.conf".into()),
            ),
            (
                "agent.args[1]",
                Box::new(|c| c.agent.args = vec!["-q".into(), "-c".into()]),
            ),
            ("agent.http_port", Box::new(|c| c.agent.http_port = 0)),
            (
                "agent.chat_ops_port",
                Box::new(|c| c.agent.chat_ops_port = 0),
            ),
            (
                "agent.stop_timeout_s",
                Box::new(|c| c.agent.stop_timeout_s = Some(0)),
            ),
            (
                "agent.health_interval_s",
                Box::new(|c| c.agent.health_interval_s = 0),
            ),
            (
                "agent.health_gate_s",
                Box::new(|c| c.agent.health_gate_s = 0),
            ),
            (
                "agent.reload_timeout_s",
                Box::new(|c| c.agent.reload_timeout_s = 0),
            ),
            (
                "agent.dry_run_timeout_s",
                Box::new(|c| c.agent.dry_run_timeout_s = 0),
            ),
            (
                "agent.restart_backoff_initial_ms",
                Box::new(|c| c.agent.restart_backoff_initial_ms = 0),
            ),
            (
                "agent.restart_backoff_max_s",
                Box::new(|c| c.agent.restart_backoff_max_s = 0),
            ),
            (
                "agent.crash_loop_threshold",
                Box::new(|c| c.agent.crash_loop_threshold = 1),
            ),
            (
                "agent.crash_loop_window_s",
                Box::new(|c| c.agent.crash_loop_window_s = 0),
            ),
            (
                "agent.monitor_url",
                Box::new(|c| {
                    c.agent.kind = Some(AgentKind::Fluentd);
                    c.agent.monitor_url = "http://10.0.0.1:24220".into();
                }),
            ),
            (
                "agent.monitor_url",
                Box::new(|c| {
                    c.agent.kind = Some(AgentKind::Fluentd);
                    c.agent.monitor_url = "localhost:24220".into();
                }),
            ),
            (
                "agent.rpc_endpoint",
                Box::new(|c| {
                    c.agent.kind = Some(AgentKind::Fluentd);
                    c.agent.rpc_endpoint = Some("0.0.0.0:24444".into());
                }),
            ),
            (
                "agent.rpc_endpoint",
                Box::new(|c| {
                    c.agent.kind = Some(AgentKind::Fluentd);
                    c.agent.rpc_endpoint = Some("nope".into());
                }),
            ),
            (
                "capabilities.declare[0]",
                Box::new(|c| c.capabilities.declare = vec!["AcceptsMagic".into()]),
            ),
            (
                "capabilities.declare[0]",
                Box::new(|c| c.capabilities.declare = vec!["AcceptsPackages".into()]),
            ),
            (
                "capabilities.custom[0]",
                Box::new(|c| c.capabilities.custom = vec!["com.example.nope".into()]),
            ),
            (
                "description.identifying",
                Box::new(|c| {
                    c.description.identifying.insert(" ".into(), "x".into());
                }),
            ),
            (
                "description.service_name",
                Box::new(|c| c.description.service_name = Some("".into())),
            ),
            (
                "agent.chat_ops_port",
                Box::new(|c| c.agent.chat_ops_port = c.agent.http_port),
            ),
            (
                "agent.chat_ops_port",
                Box::new(|c| {
                    c.agent.kind = Some(AgentKind::Fluentd);
                    c.agent.monitor_url = "http://127.0.0.1:24220/".into();
                    c.agent.chat_ops_port = 24220;
                }),
            ),
            (
                "agent.chat_ops_port",
                Box::new(|c| {
                    c.agent.kind = Some(AgentKind::Fluentd);
                    c.agent.rpc_endpoint = Some("127.0.0.1:24444".into());
                    c.agent.chat_ops_port = 24444;
                }),
            ),
            (
                "server.auth.client_secret_file",
                Box::new(|c| {
                    c.server.auth.kind = "oauth2".into();
                    c.server.auth.token_url = Some("http://127.0.0.1:9/token".into());
                    c.server.auth.client_id = Some("vm".into());
                    c.server.auth.client_secret_file = Some("/nonexistent/secret".into());
                }),
            ),
            (
                "server.auth.client_secret_file",
                Box::new(|c| {
                    c.server.auth.kind = "oauth2".into();
                    c.server.auth.token_url = Some("http://127.0.0.1:9/token".into());
                    c.server.auth.client_id = Some("vm".into());
                    // A directory cannot be read as a file.
                    c.server.auth.client_secret_file = Some(std::env::temp_dir());
                }),
            ),
            (
                "description.non_identifying",
                Box::new(|c| {
                    c.description.non_identifying.insert("".into(), "x".into());
                }),
            ),
            (
                "server.heartbeat_interval_s",
                Box::new(|c| c.server.heartbeat_interval_s = 86_401),
            ),
            (
                "server.backoff_max_s",
                Box::new(|c| c.server.backoff_max_s = u64::MAX),
            ),
            (
                "server.connect_timeout_s",
                Box::new(|c| c.server.connect_timeout_s = u64::MAX),
            ),
            (
                "agent.stop_timeout_s",
                Box::new(|c| c.agent.stop_timeout_s = Some(u64::MAX)),
            ),
            (
                "agent.health_gate_s",
                Box::new(|c| c.agent.health_gate_s = u64::MAX),
            ),
            (
                "agent.reload_timeout_s",
                Box::new(|c| c.agent.reload_timeout_s = u64::MAX),
            ),
            (
                "agent.restart_backoff_initial_ms",
                Box::new(|c| c.agent.restart_backoff_initial_ms = u64::MAX),
            ),
            (
                "agent.crash_loop_window_s",
                Box::new(|c| c.agent.crash_loop_window_s = u64::MAX),
            ),
            ("log.format", Box::new(|c| c.log.format = "xml".into())),
            ("log.level", Box::new(|c| c.log.level = "[[[".into())),
            (
                "healthz.listen",
                Box::new(|c| c.healthz.listen = Some("everywhere".into())),
            ),
        ];
        for (field, mutate) in cases {
            let mut c = good();
            mutate(&mut c);
            assert_bad(&c, field);
        }
    }

    #[test]
    fn empty_client_secret_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, " \n").unwrap();
        let mut c = good();
        c.server.auth.kind = "oauth2".into();
        c.server.auth.token_url = Some("http://127.0.0.1:9/token".into());
        c.server.auth.client_id = Some("vm".into());
        c.server.auth.client_secret_file = Some(f.clone());
        let p = problems(&c);
        assert!(
            p.iter()
                .any(|m| m.starts_with("server.auth.client_secret_file") && m.contains("empty")),
            "{p:?}"
        );
        std::fs::write(&f, "s3cret\n").unwrap();
        assert_eq!(problems(&c), Vec::<String>::new());
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn tls_urls_need_the_tls_feature() {
        for url in [
            "wss://opamp.example.com/v1/opamp",
            "https://opamp.example.com/v1/opamp",
        ] {
            let mut c = good();
            c.server.url = url.into();
            let p = problems(&c);
            assert!(
                p.iter()
                    .any(|m| m.starts_with("server.url") && m.contains("--features tls")),
                "{url}: {p:?}"
            );
        }
        let mut c = good();
        c.server.auth.kind = "oauth2".into();
        c.server.auth.token_url = Some("https://idp.example.com/token".into());
        assert_bad(&c, "server.auth.token_url");
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn server_tls_needs_the_tls_feature() {
        let mut c = good();
        c.server.tls.ca_file = Some("/etc/ssl/private-ca.pem".into());
        let p = problems(&c);
        assert!(
            p.iter()
                .any(|m| m.starts_with("server.tls") && m.contains("--features tls")),
            "{p:?}"
        );
    }

    #[cfg(feature = "tls")]
    #[test]
    fn server_tls_files_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.txt");
        std::fs::write(&not_pem, "not a certificate\n").unwrap();
        let key = dir.path().join("client.key");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let cases: [(&str, ServerTlsConfig, &str); 5] = [
            (
                "server.tls.ca_file",
                ServerTlsConfig {
                    ca_file: Some(dir.path().join("missing.pem")),
                    ..Default::default()
                },
                "cannot read",
            ),
            (
                "server.tls.ca_file",
                ServerTlsConfig {
                    ca_file: Some(not_pem.clone()),
                    ..Default::default()
                },
                "no PEM certificate",
            ),
            (
                "server.tls.cert_file",
                ServerTlsConfig {
                    cert_file: Some(not_pem.clone()),
                    ..Default::default()
                },
                "without server.tls.key_file",
            ),
            (
                "server.tls.key_file",
                ServerTlsConfig {
                    key_file: Some(key.clone()),
                    ..Default::default()
                },
                "without server.tls.cert_file",
            ),
            (
                "server.tls.key_file",
                ServerTlsConfig {
                    cert_file: Some(not_pem.clone()),
                    key_file: Some(key.clone()),
                    ..Default::default()
                },
                "readable by other users (mode 0644)",
            ),
        ];
        for (field, tls, why) in cases {
            let mut c = good();
            c.server.tls = tls;
            let p = problems(&c);
            assert!(
                p.iter().any(|m| m.starts_with(field) && m.contains(why)),
                "{field} / {why}: {p:?}"
            );
        }
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_urls_are_accepted_with_the_tls_feature() {
        let mut c = good();
        c.server.url = "wss://opamp.example.com/v1/opamp".into();
        assert_eq!(problems(&c), Vec::<String>::new());
    }

    #[test]
    fn url_ports() {
        let port = |u| parse_http_base(u).ok().map(|o| o.port);
        assert_eq!(port("http://127.0.0.1:24220"), Some(24220));
        assert_eq!(port("http://127.0.0.1:24220/x"), Some(24220));
        assert_eq!(port("http://localhost/"), Some(80));
        assert_eq!(port("http://[::1]"), Some(80));
        assert_eq!(port("http://[::1]:5"), Some(5));
        assert_eq!(port("ftp://x"), None);
        assert_eq!(port("https://127.0.0.1"), Some(443));
        assert_eq!(port("http://user@127.0.0.1:7"), Some(7));
        assert!(is_loopback_host(
            &parse_http_base("http://[::1]:5").unwrap().host
        ));
    }

    #[test]
    fn chat_ops_port_conflicts_with_an_https_monitor_url() {
        for url in [
            "https://127.0.0.1:8443",
            "https://127.0.0.1",
            "http://u@127.0.0.1:8443",
        ] {
            let mut c = good();
            c.agent.kind = Some(AgentKind::Fluentd);
            c.agent.monitor_url = url.into();
            c.agent.chat_ops_port = if url.ends_with("8443") { 8443 } else { 443 };
            let p = problems(&c);
            assert!(
                p.iter().any(
                    |m| m.starts_with("agent.chat_ops_port") && m.contains("agent.monitor_url")
                ),
                "{url}: {p:?}"
            );
        }
    }

    #[test]
    fn all_problems_reported_at_once() {
        let mut c = good();
        c.server.url = String::new();
        c.log.format = "xml".into();
        c.agent.kind = None;
        assert_eq!(problems(&c).len(), 3, "{:?}", problems(&c));
    }

    #[test]
    fn toml_parses_and_unknown_keys_are_refused() {
        let text = r#"
            data_dir = "/tmp/x"
            [server]
            url = "ws://127.0.0.1:4320/v1/opamp"
            full_state = { mode = "sent_count", n = 5 }
            accept_offered_endpoint = "any"
            [server.auth]
            type = "bearer"
            token_env = "TOKEN"
            [agent]
            kind = "fluentd"
            executable = "/usr/bin/fluentd"
            config_path = "/etc/fluent/fluent.conf"
            rpc_endpoint = "127.0.0.1:24444"
            [description.non_identifying]
            "deployment.environment" = "prod"
        "#;
        let c = Config::from_toml(text).unwrap();
        assert_eq!(c.kind(), AgentKind::Fluentd);
        assert_eq!(c.server.full_state, FullStateController::SentCount { n: 5 });
        assert_eq!(c.server.accept_offered_endpoint, OfferedEndpoint::Any);
        assert_eq!(
            Config::default().server.accept_offered_endpoint,
            OfferedEndpoint::SameOrigin,
            "credentials stay on the configured origin unless the operator says otherwise"
        );
        let err =
            Config::from_toml("[server]\naccept_offered_endpoint = \"anywhere\"\n").unwrap_err();
        assert!(err.contains("anywhere") || err.contains("variant"), "{err}");
        assert_eq!(c.stop_timeout().as_secs(), 30);
        assert!(crate::transport::is_websocket(&c.server.url));
        let err = Config::from_toml("[agent]\nkindd = \"fluentd\"\n").unwrap_err();
        assert!(err.contains("kindd"), "{err}");
        let err = Config::from_toml("[agent]\nkind = \"vector\"\n").unwrap_err();
        assert!(err.contains("vector") || err.contains("variant"), "{err}");
        let err =
            Config::from_toml("[server]\nfull_state = { mode = \"sometimes\" }\n").unwrap_err();
        assert!(
            err.contains("sometimes") || err.contains("variant"),
            "{err}"
        );
    }

    #[test]
    fn env_overrides_and_bad_env_values() {
        let c = Config::load(
            None,
            vec![
                (
                    "FLOTILLA_SUPERVISOR_SERVER_URL".into(),
                    "http://h:1/v1/opamp".into(),
                ),
                ("FLOTILLA_SUPERVISOR_AGENT_KIND".into(), "fluentd".into()),
                ("UNRELATED".into(), "x".into()),
            ],
        )
        .unwrap();
        assert_eq!(c.server.url, "http://h:1/v1/opamp");
        assert!(!crate::transport::is_websocket(&c.server.url));
        let e = Config::load(
            None,
            vec![
                ("FLOTILLA_SUPERVISOR_AGENT_KIND".into(), "vector".into()),
                ("FLOTILLA_SUPERVISOR_CHAT_OPS_PORT".into(), "99999".into()),
                (
                    "FLOTILLA_SUPERVISOR_HEARTBEAT_INTERVAL_S".into(),
                    "soon".into(),
                ),
            ],
        )
        .unwrap_err();
        let p = e.problems();
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with("agent.kind"));
        assert!(p[1].starts_with("agent.chat_ops_port"));
        assert!(p[2].starts_with("server.heartbeat_interval_s"));
    }

    #[test]
    fn a_description_table_keeps_the_default_namespace() {
        let c = Config::from_toml("[description]\nservice_name = \"edge\"\n").unwrap();
        assert_eq!(c.description.service_name.as_deref(), Some("edge"));
        assert_eq!(c.description.service_namespace, "flotilla");
        let c = Config::from_toml("[description.non_identifying]\n\"a\" = \"b\"\n").unwrap();
        assert_eq!(c.description.service_namespace, "flotilla");
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.description.service_namespace, "flotilla");
    }

    #[test]
    fn shipped_examples_parse() {
        for text in [
            include_str!("../examples/fluent-bit.toml"),
            include_str!("../examples/fluentd.toml"),
        ] {
            let c = Config::from_toml(text).unwrap();
            assert!(crate::transport::is_websocket(&c.server.url));
        }
    }

    #[test]
    fn capability_bits_default() {
        let c = good();
        let bits = c.capability_bits();
        assert!(c.declares(AgentCapabilities::ReportsHeartbeat));
        assert!(c.declares(AgentCapabilities::AcceptsOpAmpConnectionSettings));
        assert_eq!(bits & AgentCapabilities::AcceptsPackages as u64, 0);
        assert!(c.declares_custom(CAP_FLOTILLA));
    }
}
