//! Server configuration: a TOML file, overridden by `FLOTILLA_*` environment variables, overridden
//! by flags; validated as a whole before any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why the configuration was refused. Every variant names the setting and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for Flotilla: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The whole server configuration. Field names are the TOML keys.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the database and generated secrets live.
    pub data_dir: PathBuf,
    pub opamp: OpampConfig,
    pub api: ApiConfig,
    pub commands: CommandsConfig,
    pub log: LogConfig,
    pub mcp: McpConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OpampConfig {
    /// Address agents connect to (spec default port 4320).
    pub listen: String,
    /// URL path of the OpAMP endpoint.
    pub path: String,
    /// Largest accepted AgentToServer, after decompression, and largest ServerToAgent sent.
    pub max_message_bytes: usize,
    /// Most agent connections (WebSocket) open at once; more get HTTP 503 + Retry-After.
    pub max_connections: usize,
    /// Most plain-HTTP OpAMP requests processed at once; more get HTTP 429 + Retry-After.
    pub max_in_flight: usize,
    /// Heartbeat interval offered to agents that accept OpAMP connection settings; also the
    /// interval assumed for liveness of agents that were offered nothing.
    pub heartbeat_interval_s: u64,
    /// Seconds put in `Retry-After` and `RetryInfo` when overloaded.
    pub retry_after_s: u64,
    /// WebSocket read buffer per connection, bytes.
    pub ws_read_buffer_bytes: usize,
    /// WebSocket write buffer per connection, bytes.
    pub ws_write_buffer_bytes: usize,
    /// A WebSocket whose agent has sent nothing for this long is pinged; one that does not
    /// answer within `ws_pong_timeout_s` is closed (a host that vanished leaves a half-open
    /// TCP connection that would otherwise hold its slot, and its uid, forever).
    pub ws_idle_ping_s: u64,
    /// How long a pinged WebSocket has to answer before it is considered dead. A connection
    /// whose uid a newcomer claims gets `min(ws_pong_timeout_s, 3)` seconds.
    pub ws_pong_timeout_s: u64,
    /// File with bearer tokens agents must present (one per line); unset means agents need no
    /// token.
    pub agent_tokens_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Operator listener: REST API (and later MCP, console, chat webhooks).
    pub listen: String,
    /// File of API tokens, one per line: `name role token` (role: viewer|operator|admin).
    /// Unset: an admin token is generated once into `<data_dir>/admin.token` (mode 0600).
    pub tokens_file: Option<PathBuf>,
    /// Largest accepted JSON request body, bytes.
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CommandsConfig {
    /// A queued command not delivered within this many seconds expires (overridable per command).
    pub queue_ttl_s: u64,
    /// A sent command with no result within this many seconds expires.
    pub result_timeout_s: u64,
    /// Most agents one fan-out request may target.
    pub max_fanout: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `flotilla_server=debug`.
    pub level: String,
}

/// The MCP server on the operator listener (`/mcp`, `/sse`, `/messages`), see mcp/README.md.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct McpConfig {
    /// Serve MCP on the operator listener.
    pub enabled: bool,
    /// Hide and refuse every state-changing tool on the HTTP transports.
    pub read_only: bool,
    /// Accepted `Host` headers (DNS-rebinding protection): a name or address (any port) or
    /// `host:port`. Add the names operators use when the listener is not on loopback.
    pub allowed_hosts: Vec<String>,
    /// Accepted browser `Origin`s (`scheme://host[:port]`, `:*` for any port). Requests without
    /// an Origin always pass; with an empty list every browser origin is refused.
    pub allowed_origins: Vec<String>,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            enabled: true,
            read_only: false,
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            allowed_origins: Vec::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data"),
            opamp: OpampConfig::default(),
            api: ApiConfig::default(),
            commands: CommandsConfig::default(),
            log: LogConfig::default(),
            mcp: McpConfig::default(),
        }
    }
}

impl Default for OpampConfig {
    fn default() -> Self {
        OpampConfig {
            listen: "0.0.0.0:4320".into(),
            path: "/v1/opamp".into(),
            max_message_bytes: 64 * 1024 * 1024,
            max_connections: 200_000,
            max_in_flight: 1024,
            heartbeat_interval_s: 30,
            retry_after_s: 30,
            ws_read_buffer_bytes: 2 * 1024,
            ws_write_buffer_bytes: 2 * 1024,
            ws_idle_ping_s: 90,
            ws_pong_timeout_s: 10,
            agent_tokens_file: None,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:8080".into(),
            tokens_file: None,
            max_body_bytes: 1024 * 1024,
        }
    }
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            queue_ttl_s: 24 * 3600,
            result_timeout_s: 600,
            max_fanout: 100_000,
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

/// Environment variables read by [`Config::load`], with the setting each overrides.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("FLOTILLA_DATA_DIR", "data_dir"),
    ("FLOTILLA_OPAMP_LISTEN", "opamp.listen"),
    ("FLOTILLA_OPAMP_PATH", "opamp.path"),
    ("FLOTILLA_MAX_MESSAGE_BYTES", "opamp.max_message_bytes"),
    ("FLOTILLA_MAX_CONNECTIONS", "opamp.max_connections"),
    ("FLOTILLA_MAX_IN_FLIGHT", "opamp.max_in_flight"),
    (
        "FLOTILLA_HEARTBEAT_INTERVAL_S",
        "opamp.heartbeat_interval_s",
    ),
    ("FLOTILLA_AGENT_TOKENS_FILE", "opamp.agent_tokens_file"),
    ("FLOTILLA_API_LISTEN", "api.listen"),
    ("FLOTILLA_API_TOKENS_FILE", "api.tokens_file"),
    ("FLOTILLA_LOG_FORMAT", "log.format"),
    ("FLOTILLA_LOG", "log.level"),
    ("FLOTILLA_MCP_READ_ONLY", "mcp.read_only"),
    ("FLOTILLA_MCP_ALLOWED_HOSTS", "mcp.allowed_hosts"),
];

impl Config {
    /// Reads `file` (if given), then applies `env` (name, value) overrides; does not validate.
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
                toml::from_str::<Config>(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?
            }
            None => Config::default(),
        };
        let mut problems = Vec::new();
        for (name, value) in env {
            cfg.apply_env(&name, &value, &mut problems);
        }
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    fn apply_env(&mut self, name: &str, value: &str, problems: &mut Vec<String>) {
        fn num<T: std::str::FromStr>(
            name: &str,
            value: &str,
            problems: &mut Vec<String>,
        ) -> Option<T> {
            match value.trim().parse() {
                Ok(v) => Some(v),
                Err(_) => {
                    problems.push(format!(
                        "{name}={value:?} is not a non-negative whole number"
                    ));
                    None
                }
            }
        }
        match name {
            "FLOTILLA_DATA_DIR" => self.data_dir = value.into(),
            "FLOTILLA_OPAMP_LISTEN" => self.opamp.listen = value.into(),
            "FLOTILLA_OPAMP_PATH" => self.opamp.path = value.into(),
            "FLOTILLA_MAX_MESSAGE_BYTES" => {
                if let Some(v) = num(name, value, problems) {
                    self.opamp.max_message_bytes = v
                }
            }
            "FLOTILLA_MAX_CONNECTIONS" => {
                if let Some(v) = num(name, value, problems) {
                    self.opamp.max_connections = v
                }
            }
            "FLOTILLA_MAX_IN_FLIGHT" => {
                if let Some(v) = num(name, value, problems) {
                    self.opamp.max_in_flight = v
                }
            }
            "FLOTILLA_HEARTBEAT_INTERVAL_S" => {
                if let Some(v) = num(name, value, problems) {
                    self.opamp.heartbeat_interval_s = v
                }
            }
            "FLOTILLA_AGENT_TOKENS_FILE" => self.opamp.agent_tokens_file = Some(value.into()),
            "FLOTILLA_API_LISTEN" => self.api.listen = value.into(),
            "FLOTILLA_API_TOKENS_FILE" => self.api.tokens_file = Some(value.into()),
            "FLOTILLA_LOG_FORMAT" => self.log.format = value.into(),
            "FLOTILLA_LOG" => self.log.level = value.into(),
            "FLOTILLA_MCP_READ_ONLY" => match value.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => self.mcp.read_only = true,
                "0" | "false" | "no" | "off" | "" => self.mcp.read_only = false,
                _ => problems.push(format!("{name}={value:?} is not true or false")),
            },
            "FLOTILLA_MCP_ALLOWED_HOSTS" => {
                self.mcp.allowed_hosts = value
                    .split(',')
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            _ => {}
        }
    }

    /// Checks every setting and reports all problems at once.
    pub fn validate(&self) -> Result<Validated, ConfigError> {
        let mut p = Vec::new();
        let opamp_addr = parse_addr("opamp.listen", &self.opamp.listen, &mut p);
        let api_addr = parse_addr("api.listen", &self.api.listen, &mut p);
        if let (Some(a), Some(b)) = (opamp_addr, api_addr) {
            if a == b && a.port() != 0 {
                p.push(format!(
                    "opamp.listen and api.listen are both {a}: agents and operators need separate listeners"
                ));
            }
        }
        if !self.opamp.path.starts_with('/') || self.opamp.path.contains(char::is_whitespace) {
            p.push(format!(
                "opamp.path {:?} must be an absolute URL path such as \"/v1/opamp\"",
                self.opamp.path
            ));
        }
        if self.opamp.path.starts_with("/api/") {
            p.push("opamp.path must not live under /api/".into());
        }
        if self.opamp.max_message_bytes < 1024 {
            p.push(format!(
                "opamp.max_message_bytes = {} is too small (at least 1024; the spec recommends 67108864)",
                self.opamp.max_message_bytes
            ));
        }
        if self.opamp.max_connections == 0 {
            p.push("opamp.max_connections must be at least 1".into());
        }
        if self.opamp.max_in_flight == 0 {
            p.push("opamp.max_in_flight must be at least 1".into());
        }
        if self.opamp.heartbeat_interval_s == 0 || self.opamp.heartbeat_interval_s > 86_400 {
            p.push(format!(
                "opamp.heartbeat_interval_s = {} must be between 1 and 86400 seconds",
                self.opamp.heartbeat_interval_s
            ));
        }
        if self.opamp.retry_after_s == 0 || self.opamp.retry_after_s > 3600 {
            p.push(format!(
                "opamp.retry_after_s = {} must be between 1 and 3600 seconds",
                self.opamp.retry_after_s
            ));
        }
        if !(1..=86_400).contains(&self.opamp.ws_idle_ping_s) {
            p.push(format!(
                "opamp.ws_idle_ping_s = {} must be between 1 and 86400 seconds",
                self.opamp.ws_idle_ping_s
            ));
        }
        if !(1..=600).contains(&self.opamp.ws_pong_timeout_s) {
            p.push(format!(
                "opamp.ws_pong_timeout_s = {} must be between 1 and 600 seconds",
                self.opamp.ws_pong_timeout_s
            ));
        }
        for (name, v) in [
            (
                "opamp.ws_read_buffer_bytes",
                self.opamp.ws_read_buffer_bytes,
            ),
            (
                "opamp.ws_write_buffer_bytes",
                self.opamp.ws_write_buffer_bytes,
            ),
        ] {
            if !(512..=16 * 1024 * 1024).contains(&v) {
                p.push(format!("{name} = {v} must be between 512 and 16777216"));
            }
        }
        for (name, f) in [
            ("opamp.agent_tokens_file", &self.opamp.agent_tokens_file),
            ("api.tokens_file", &self.api.tokens_file),
        ] {
            if let Some(f) = f {
                if !f.is_file() {
                    p.push(format!(
                        "{name} {} does not exist or is not a file",
                        f.display()
                    ));
                }
            }
        }
        if self.api.max_body_bytes < 1024 {
            p.push(format!(
                "api.max_body_bytes = {} is too small (at least 1024)",
                self.api.max_body_bytes
            ));
        }
        if self.commands.queue_ttl_s == 0 {
            p.push("commands.queue_ttl_s must be at least 1".into());
        }
        if self.commands.result_timeout_s == 0 {
            p.push("commands.result_timeout_s must be at least 1".into());
        }
        if self.commands.max_fanout == 0 {
            p.push("commands.max_fanout must be at least 1".into());
        }
        for h in &self.mcp.allowed_hosts {
            if h.is_empty() || h.contains(char::is_whitespace) || h.contains('/') {
                p.push(format!(
                    "mcp.allowed_hosts entry {h:?} must be a host name or address, optionally with :port (no scheme)"
                ));
            }
        }
        for o in &self.mcp.allowed_origins {
            let ok = o == "null"
                || ((o.starts_with("http://") || o.starts_with("https://"))
                    && !o.contains(char::is_whitespace)
                    && !o
                        .trim_end_matches('/')
                        .split("://")
                        .nth(1)
                        .unwrap_or("")
                        .contains('/'));
            if !ok {
                p.push(format!(
                    "mcp.allowed_origins entry {o:?} must be scheme://host[:port] (e.g. \"http://localhost:*\")"
                ));
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            p.push(format!(
                "log.format = {:?} must be \"text\" or \"json\"",
                self.log.format
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            p.push(format!(
                "log.level = {:?} is not a valid filter (try \"info\" or \"debug\")",
                self.log.level
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            p.push("data_dir must not be empty".into());
        } else if self.data_dir.exists() && !self.data_dir.is_dir() {
            p.push(format!(
                "data_dir {} exists and is not a directory",
                self.data_dir.display()
            ));
        }
        match (p.is_empty(), opamp_addr, api_addr) {
            (true, Some(opamp_addr), Some(api_addr)) => Ok(Validated {
                config: self.clone(),
                opamp_addr,
                api_addr,
            }),
            _ => Err(ConfigError::Invalid(p)),
        }
    }
}

fn parse_addr(name: &str, value: &str, problems: &mut Vec<String>) -> Option<SocketAddr> {
    match value.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            problems.push(format!(
                "{name} = {value:?} is not an address of the form HOST:PORT (e.g. \"127.0.0.1:8080\")"
            ));
            None
        }
    }
}

/// A configuration that passed [`Config::validate`], with parsed addresses.
#[derive(Debug, Clone)]
pub struct Validated {
    pub config: Config,
    pub opamp_addr: SocketAddr,
    pub api_addr: SocketAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let v = Config::default().validate().unwrap();
        assert_eq!(v.opamp_addr.port(), 4320);
        assert_eq!(v.config.opamp.path, "/v1/opamp");
        assert_eq!(v.config.opamp.max_message_bytes, 64 * 1024 * 1024);
        assert_eq!(v.api_addr.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn every_bad_value_is_named() {
        let mut c = Config::default();
        c.opamp.listen = "nowhere".into();
        c.opamp.path = "v1/opamp".into();
        c.opamp.max_message_bytes = 10;
        c.opamp.heartbeat_interval_s = 0;
        c.opamp.max_connections = 0;
        c.opamp.max_in_flight = 0;
        c.opamp.ws_read_buffer_bytes = 1;
        c.opamp.ws_idle_ping_s = 0;
        c.opamp.ws_pong_timeout_s = 0;
        c.api.tokens_file = Some("/nonexistent/tokens".into());
        c.log.format = "xml".into();
        c.commands.queue_ttl_s = 0;
        let msg = c.validate().unwrap_err().to_string();
        for needle in [
            "opamp.listen",
            "opamp.path",
            "opamp.max_message_bytes",
            "opamp.heartbeat_interval_s",
            "opamp.max_connections",
            "opamp.max_in_flight",
            "opamp.ws_read_buffer_bytes",
            "opamp.ws_idle_ping_s",
            "opamp.ws_pong_timeout_s",
            "api.tokens_file",
            "log.format",
            "commands.queue_ttl_s",
        ] {
            assert!(msg.contains(needle), "{needle} missing from: {msg}");
        }
    }

    #[test]
    fn same_listener_twice_is_refused() {
        let mut c = Config::default();
        c.api.listen = "0.0.0.0:4320".into();
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("separate listeners"), "{msg}");
    }

    #[test]
    fn env_overrides_file_and_bad_numbers_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.toml");
        std::fs::write(
            &f,
            "data_dir = \"/x\"\n[opamp]\nheartbeat_interval_s = 10\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&f),
            [(
                "FLOTILLA_OPAMP_LISTEN".to_string(),
                "127.0.0.1:0".to_string(),
            )],
        )
        .unwrap();
        assert_eq!(c.opamp.heartbeat_interval_s, 10);
        assert_eq!(c.opamp.listen, "127.0.0.1:0");
        assert_eq!(c.data_dir, PathBuf::from("/x"));
        let err = Config::load(
            None,
            [("FLOTILLA_MAX_CONNECTIONS".to_string(), "many".to_string())],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("FLOTILLA_MAX_CONNECTIONS"), "{err}");
    }

    #[test]
    fn mcp_settings_are_validated_and_overridable() {
        let mut c = Config::default();
        assert!(c.mcp.enabled && !c.mcp.read_only);
        c.mcp.allowed_hosts = vec!["http://x".into()];
        c.mcp.allowed_origins = vec!["localhost".into()];
        let msg = c.validate().unwrap_err().to_string();
        assert!(
            msg.contains("mcp.allowed_hosts") && msg.contains("mcp.allowed_origins"),
            "{msg}"
        );
        let c = Config::load(
            None,
            [
                ("FLOTILLA_MCP_READ_ONLY".to_string(), "true".to_string()),
                (
                    "FLOTILLA_MCP_ALLOWED_HOSTS".to_string(),
                    "a.example, b:8080".to_string(),
                ),
            ],
        )
        .unwrap();
        assert!(c.mcp.read_only);
        assert_eq!(c.mcp.allowed_hosts, vec!["a.example", "b:8080"]);
        assert!(Config::load(
            None,
            [("FLOTILLA_MCP_READ_ONLY".to_string(), "maybe".to_string())]
        )
        .is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.toml");
        std::fs::write(&f, "[opamp]\nlisten_on = \"x\"\n").unwrap();
        let err = Config::load(Some(&f), []).unwrap_err().to_string();
        assert!(err.contains("listen_on"), "{err}");
    }
}
