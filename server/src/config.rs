//! Server configuration: a TOML file, overridden by `FLOTILLA_*` environment variables, overridden
//! by flags; validated as a whole before any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use flotilla_chat::core::planner::llm::{Flavor, LlmConfig};
use serde::{Deserialize, Serialize};

/// Why the configuration was refused. Every variant names the setting and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // Not `source`: the message already quotes it, and a source would print it twice.
    #[error("cannot read config file {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {} is not valid TOML for Flotilla: {message}", .path.display())]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The whole server configuration. Field names are the TOML keys.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the database and generated secrets live.
    pub data_dir: PathBuf,
    pub opamp: OpampConfig,
    pub api: ApiConfig,
    pub commands: CommandsConfig,
    pub log: LogConfig,
    pub mcp: McpConfig,
    pub console: ConsoleConfig,
    pub chat: ChatConfig,
    pub store: StoreConfig,
    /// The certificate every listener serves TLS with, unless its own `tls` section names one.
    pub tls: TlsConfig,
    /// Secrets given as environment variables ([`SECRET_ENV`]); never serialised, so never in
    /// a TOML file, `config check`'s output or a log line.
    #[serde(skip)]
    pub env_secrets: EnvSecrets,
}

/// Where the registry, command queue and audit trail live: `<data_dir>/flotilla.db` (SQLite,
/// the default) unless `url` names a PostgreSQL database that several replicas may share.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://user@host:port/database?...`. A password in it is never serialised (nor
    /// logged); prefer `password_file`.
    #[serde(serialize_with = "redacted_url")]
    pub url: Option<String>,
    /// The PostgreSQL password, read from this file (trimmed); overrides one in `url`.
    pub password_file: Option<PathBuf>,
    /// This process's name among the replicas sharing the store (the agent record's `replica`,
    /// `/metrics`). Unset: `<hostname>-<pid>`, so a restart is a new replica.
    pub replica_id: Option<String>,
    /// How often this replica writes its heartbeat row; one silent for 3 intervals is dead and
    /// its agents are marked disconnected by the others.
    pub replica_heartbeat_s: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: None,
            password_file: None,
            replica_id: None,
            replica_heartbeat_s: 5,
        }
    }
}

/// Longest `store.replica_id`.
pub const MAX_REPLICA_ID: usize = 128;

fn redacted_url<S: serde::Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_some(&crate::store::postgres::redact_url(u)),
        None => s.serialize_none(),
    }
}

impl StoreConfig {
    /// This replica's id: `replica_id`, else `<hostname>-<pid>`.
    pub fn replica(&self) -> String {
        if let Some(id) = self.replica_id.as_deref().map(str::trim) {
            if !id.is_empty() {
                return id.to_string();
            }
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "flotilla".into());
        format!("{host}-{}", std::process::id())
    }

    /// The PostgreSQL URL, when one is configured (SQLite otherwise).
    pub fn postgres_url(&self) -> Option<&str> {
        self.url.as_deref().map(str::trim).filter(|u| !u.is_empty())
    }

    /// The password from `password_file`, if one is set.
    pub fn password(&self) -> std::io::Result<Option<String>> {
        match &self.password_file {
            None => Ok(None),
            Some(f) => Ok(Some(std::fs::read_to_string(f)?.trim().to_string())),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OpampConfig {
    /// Address agents connect to (spec default port 4320).
    pub listen: String,
    /// URL path of the OpAMP endpoint.
    pub path: String,
    /// Largest accepted AgentToServer, after decompression, and largest ServerToAgent sent.
    pub max_message_bytes: usize,
    /// Most agent connections (WebSocket) open at once; more get HTTP 503 + Retry-After. The
    /// agent listener holds at most `max_connections + max_in_flight` TCP connections (closing
    /// any more as they arrive), fewer if the open-file limit cannot hold them.
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
    /// How agents authenticate: `none`, `token` (a bearer token from `agent_tokens_file`) or
    /// `mtls` (a client certificate verified against `opamp.tls.client_ca_file` is enough; a
    /// token from `agent_tokens_file`, if set, also admits). Unset: `token` when
    /// `agent_tokens_file` is set, else `none`.
    pub agent_auth: Option<AgentAuthMode>,
    /// A new connection must send a complete request head within this many seconds, and an
    /// idle keep-alive connection its next one; otherwise it is closed (idle and slowloris
    /// connections). An upgraded WebSocket is watched by `ws_idle_ping_s` instead.
    pub header_read_timeout_s: u64,
    /// A request body must arrive in full within this many seconds of its head (a stalled
    /// upload gets 408 and its connection closed).
    pub body_read_timeout_s: u64,
    /// WARN lines about malformed agent messages written per source address and window; the
    /// rest are counted and summed up in one line per source when the window ends.
    pub malformed_log_burst: u32,
    /// The window of `malformed_log_burst`, seconds.
    pub malformed_log_window_s: u64,
    /// TLS of the agent listener (`[opamp.tls]`), with the optional client-certificate check.
    pub tls: AgentTlsConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Operator listener: REST API (and later MCP, console, chat webhooks).
    pub listen: String,
    /// File of API tokens, one per line: `name role token` (role: viewer|operator|admin).
    /// Unset: an admin token is generated once into `<data_dir>/admin.token` (mode 0600).
    pub tokens_file: Option<PathBuf>,
    /// Largest accepted JSON request body, bytes.
    pub max_body_bytes: usize,
    /// Operator connections open at once; more are closed as they arrive. Its own budget, so a
    /// flood of the agent port cannot take the operator listener's descriptors.
    pub max_connections: usize,
    /// As `opamp.header_read_timeout_s`, for the operator listener.
    pub header_read_timeout_s: u64,
    /// As `opamp.body_read_timeout_s`, for the operator listener.
    pub body_read_timeout_s: u64,
    /// TLS of the operator listener (`[api.tls]`).
    pub tls: ListenerTlsConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CommandsConfig {
    /// A queued command not delivered within this many seconds expires (overridable per command).
    pub queue_ttl_s: u64,
    /// A sent command with no result within this many seconds expires.
    pub result_timeout_s: u64,
    /// Most agents one fan-out request may target.
    pub max_fanout: usize,
    /// A `shutdown` fan-out to more agents than this needs the admin role (an operator may
    /// shut down one agent, or up to this many in one request).
    pub admin_shutdown_above: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `flotilla_server=debug`.
    pub level: String,
}

/// The MCP server on the operator listener (`/mcp`, `/sse`, `/messages`), see mcp/README.md.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
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

/// The web console on the operator listener (`/` and `/ui/...`), see `console/`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve the console.
    pub enabled: bool,
    /// A console session ends this many seconds after login (log in again with a token).
    pub session_ttl_s: u64,
    /// Mark the session cookie `Secure` even though the listener speaks plain HTTP: for a
    /// console behind a proxy that terminates TLS. (It is always `Secure` over TLS.)
    pub secure_cookie: bool,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            enabled: true,
            session_ttl_s: 8 * 3600,
            secure_cookie: false,
        }
    }
}

/// The chat listener and its gateways (`[chat]`, `[chat.slack]`). Off unless a gateway is
/// enabled; then `listen` is required and carries only the chat webhook routes, so the operator
/// API can stay on loopback while Slack reaches the gateway.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// Address of the chat listener (`/chat/slack/...`), e.g. `"0.0.0.0:8443"` behind a TLS
    /// proxy. Required when a gateway is enabled.
    pub listen: Option<String>,
    pub slack: SlackConfig,
    /// The Microsoft Teams gateway (`[chat.teams]`).
    pub teams: TeamsConfig,
    /// The Discord gateway (`[chat.discord]`).
    pub discord: DiscordConfig,
    /// The optional LLM planner of every gateway (`[chat.llm]`).
    pub llm: LlmSection,
    /// TLS of the chat listener (`[chat.tls]`), used when a chat gateway is enabled.
    pub tls: ListenerTlsConfig,
}

/// `[tls]`: the certificate shared by every listener that does not name its own.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first). With `key_file`, every listener serves TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (mode 0600 or 0640; readable by others is refused).
    pub key_file: Option<PathBuf>,
    /// Seconds between checks of every listener's certificate and key files: a changed valid
    /// pair is used for new handshakes, a broken one is logged and the old one kept.
    pub reload_interval_s: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            reload_interval_s: 5,
        }
    }
}

/// `[api.tls]`, `[chat.tls]`: a listener's own certificate (overrides `[tls]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerTlsConfig {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// `opamp.agent_auth`: what admits an agent to the OpAMP endpoint.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AgentAuthMode {
    None,
    Token,
    Mtls,
}

impl AgentAuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentAuthMode::None => "none",
            AgentAuthMode::Token => "token",
            AgentAuthMode::Mtls => "mtls",
        }
    }
}

impl OpampConfig {
    /// `agent_auth`, or what it defaults to.
    pub fn agent_auth_mode(&self) -> AgentAuthMode {
        self.agent_auth
            .unwrap_or(if self.agent_tokens_file.is_some() {
                AgentAuthMode::Token
            } else {
                AgentAuthMode::None
            })
    }
}

/// Whether the agent listener's TLS handshake demands a client certificate.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMode {
    /// A client without a certificate may connect (and is then checked like any other agent);
    /// one that presents a certificate must present one the client CA signed.
    Optional,
    /// No certificate from the client CA, no handshake.
    #[default]
    Required,
}

/// `[opamp.tls]`: the agent listener's own certificate and the agents' client certificates.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentTlsConfig {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// PEM CA certificate(s) that sign agents' client certificates: turns on mTLS.
    pub client_ca_file: Option<PathBuf>,
    pub client_auth: ClientAuthMode,
    /// The first client-certificate identity seen for an agent uid is pinned: another
    /// certificate presenting that uid is refused.
    pub pin_uid: bool,
}

/// `[chat.llm]`: an OpenAI-compatible chat-completions endpoint the gateways ask about what the
/// rule planner does not understand. The key comes from `api_key_file` or
/// `FLOTILLA_CHAT_LLM_API_KEY`, never from this file; local servers (Ollama, vLLM) may need none.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LlmSection {
    pub enabled: bool,
    /// Up to and without `/chat/completions`: `https://api.openai.com/v1`,
    /// `http://localhost:11434/v1` (Ollama), `https://<resource>.openai.azure.com/openai/v1`.
    pub base_url: String,
    pub model: String,
    pub api_key_file: Option<PathBuf>,
    /// `openai` (Bearer key; also Azure's v1 endpoint) or `azure` (`api-key` header and
    /// `api_version`, for `…/openai/deployments/<name>` URLs).
    pub flavor: Flavor,
    pub api_version: Option<String>,
    /// Rounds of tool calls before the model must answer (1-16).
    pub max_steps: u32,
    /// `max_tokens` of each completion.
    pub max_tokens: u32,
    /// Seconds per request to the endpoint.
    pub timeout_s: u64,
    /// Seconds for a whole answer, tool calls included.
    pub deadline_s: u64,
}

impl Default for LlmSection {
    fn default() -> Self {
        LlmSection {
            enabled: false,
            base_url: String::new(),
            model: String::new(),
            api_key_file: None,
            flavor: Default::default(),
            api_version: None,
            max_steps: 4,
            max_tokens: 1024,
            timeout_s: 20,
            deadline_s: 45,
        }
    }
}

/// How Slack reaches the gateway.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SlackMode {
    /// Slack posts to `chat.listen` (a public URL), requests signed with the signing secret.
    #[default]
    Http,
    /// The gateway opens WebSockets to Slack with the app-level token (no public URL, no
    /// chat listener).
    Socket,
}

/// The Slack gateway. The signing secret, the bot token and the app-level token come from
/// files (`*_file`) or from the environment ([`SECRET_ENV`]), never from this file itself.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SlackConfig {
    pub enabled: bool,
    /// `http` (Slack posts to `chat.listen`) or `socket` (Socket Mode).
    pub mode: SlackMode,
    /// File holding the app's signing secret (Basic Information → App Credentials); HTTP
    /// mode only.
    pub signing_secret_file: Option<PathBuf>,
    /// File holding the app-level token (`xapp-…`, scope `connections:write`); Socket Mode
    /// only.
    pub app_token_file: Option<PathBuf>,
    /// File holding the bot token (`xoxb-…`, OAuth & Permissions).
    pub bot_token_file: Option<PathBuf>,
    /// The Slack Web API base URL (changed only to point tests at a fake).
    pub api_url: String,
    /// How long a Confirm button stays good, in seconds (1..=3600; default 300). A preview
    /// is a snapshot of the fleet, so it must not be confirmable for long.
    pub confirm_expiry_s: u64,
    /// Who may do what from Slack (`[chat.slack.access]`).
    pub access: ChatAccess,
}

/// Chat users → Flotilla roles (`viewer`, `operator`, `admin`), per platform.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ChatAccess {
    /// User id (Slack `U…`) → role.
    pub users: std::collections::BTreeMap<String, flotilla_chat::Role>,
    /// User-group id (Slack `S…`) → role.
    pub groups: std::collections::BTreeMap<String, flotilla_chat::Role>,
    /// Channel id → the role anyone writing there has at least.
    pub channels: std::collections::BTreeMap<String, flotilla_chat::Role>,
    /// Role of users nobody mapped; unset refuses them.
    pub default_role: Option<flotilla_chat::Role>,
    /// When set, only these channel ids are served.
    pub allowed_channels: Option<Vec<String>>,
    /// Channel id → fan-out size above which a different operator must confirm.
    pub two_person: std::collections::BTreeMap<String, u64>,
}

impl Default for SlackConfig {
    fn default() -> Self {
        SlackConfig {
            enabled: false,
            mode: SlackMode::Http,
            signing_secret_file: None,
            app_token_file: None,
            bot_token_file: None,
            api_url: "https://slack.com/api".into(),
            confirm_expiry_s: DEFAULT_CONFIRM_EXPIRY_S,
            access: ChatAccess::default(),
        }
    }
}

/// The Microsoft Teams gateway (Bot Framework): Teams posts activities to
/// `chat.listen` + `/chat/teams/messages`, authenticated by JWTs the gateway checks against the
/// Bot Framework OpenID metadata. The app password (client secret) comes from
/// `app_password_file` or `FLOTILLA_TEAMS_APP_PASSWORD`, never from this file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TeamsConfig {
    pub enabled: bool,
    /// The bot's Microsoft App ID (the Azure Bot's "Microsoft App ID"): the audience of
    /// incoming tokens and the client id of outgoing ones.
    pub app_id: String,
    /// File holding the app password (the app registration's client secret).
    pub app_password_file: Option<PathBuf>,
    /// The Azure AD tenant of a single-tenant bot: its tokens come from that tenant's token
    /// endpoint. Unset: a multi-tenant bot (`botframework.com`).
    pub tenant: Option<String>,
    /// The Bot Framework OpenID metadata (changed only to point tests at a fake).
    pub openid_metadata_url: String,
    /// The client-credentials token endpoint; unset: derived from `tenant`.
    pub token_url: Option<String>,
    /// Where to post when no activity has said (alerts to a channel after a restart).
    pub service_url: String,
    /// Least seconds between two refreshes of the signing keys caused by unknown key ids.
    pub keys_min_refresh_s: u64,
    /// How long a Confirm button stays good, in seconds (1..=3600; default 300).
    pub confirm_expiry_s: u64,
    /// The name the Teams app package shows (`flotilla chat teams package`).
    pub app_name: String,
    /// Who may do what from Teams (`[chat.teams.access]`): `users` keyed by Azure AD object
    /// id, or `<tenant>/<object id>` to grant in one tenant only.
    pub access: ChatAccess,
}

impl Default for TeamsConfig {
    fn default() -> Self {
        TeamsConfig {
            enabled: false,
            app_id: String::new(),
            app_password_file: None,
            tenant: None,
            openid_metadata_url: flotilla_chat::teams::verify::DEFAULT_OPENID_METADATA_URL.into(),
            token_url: None,
            service_url: flotilla_chat::teams::gateway::DEFAULT_SERVICE_URL.into(),
            keys_min_refresh_s: 60,
            confirm_expiry_s: DEFAULT_CONFIRM_EXPIRY_S,
            app_name: "Flotilla".into(),
            access: ChatAccess::default(),
        }
    }
}

/// The Teams gateway's checked settings, the password read (`Debug` hides it).
#[derive(Clone)]
pub struct TeamsSettings {
    pub app_id: String,
    pub app_password: String,
    pub openid_metadata_url: String,
    pub token_url: String,
    pub service_url: String,
    pub keys_min_refresh_s: u64,
}

impl std::fmt::Debug for TeamsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeamsSettings")
            .field("app_id", &self.app_id)
            .field("openid_metadata_url", &self.openid_metadata_url)
            .field("token_url", &self.token_url)
            .finish_non_exhaustive()
    }
}

/// The Discord gateway: Discord posts interactions (the `/flotilla` command, buttons) to
/// `chat.listen` + `/chat/discord/interactions`, signed with the application's Ed25519 key.
/// The public key is not a secret and lives here; the bot token comes from `bot_token_file` or
/// `FLOTILLA_DISCORD_BOT_TOKEN`, never from this file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DiscordConfig {
    pub enabled: bool,
    /// The application id (Developer Portal → General Information → Application ID).
    pub application_id: String,
    /// The application's public key (General Information → Public Key, 64 hex digits).
    pub public_key: String,
    /// File holding the bot token (Bot → Reset Token).
    pub bot_token_file: Option<PathBuf>,
    /// The Discord REST API base URL (changed only to point tests at a fake).
    pub api_url: String,
    /// Also connect to the Discord Gateway (the bot's WebSocket) so bot mentions in channels
    /// and DMs are answered; needs the privileged Message Content intent (Bot → Privileged
    /// Gateway Intents). Off: only `/flotilla` and buttons, through the interactions endpoint.
    pub gateway: bool,
    /// How long a Confirm button stays good, in seconds (1..=3600; default 300).
    pub confirm_expiry_s: u64,
    /// Who may do what from Discord (`[chat.discord.access]`): `users` keyed by user id (or
    /// `<guild id>/<user id>`), `groups` by guild role id, `channels` by channel id.
    pub access: ChatAccess,
}

impl Default for DiscordConfig {
    fn default() -> Self {
        DiscordConfig {
            enabled: false,
            application_id: String::new(),
            public_key: String::new(),
            bot_token_file: None,
            api_url: flotilla_chat::discord::client::DEFAULT_API_URL.into(),
            gateway: false,
            confirm_expiry_s: DEFAULT_CONFIRM_EXPIRY_S,
            access: ChatAccess::default(),
        }
    }
}

/// The Discord gateway's checked settings, the bot token read (`Debug` hides it).
#[derive(Clone)]
pub struct DiscordSettings {
    pub application_id: String,
    pub public_key: flotilla_chat::discord::verify::PublicKey,
    pub bot_token: String,
    pub api_url: String,
    /// Mentions and DMs through the Gateway too.
    pub gateway: bool,
}

impl std::fmt::Debug for DiscordSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscordSettings")
            .field("application_id", &self.application_id)
            .field("api_url", &self.api_url)
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

/// Default life of a chat confirmation (the issue's five minutes).
pub const DEFAULT_CONFIRM_EXPIRY_S: u64 = 300;
/// Longest a chat confirmation may be configured to live.
pub const MAX_CONFIRM_EXPIRY_S: u64 = 3600;

/// A secret's text; `Debug` never shows it.
#[derive(Clone, Default, PartialEq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

/// Secrets read from [`SECRET_ENV`] by [`Config::load`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnvSecrets {
    pub slack_signing_secret: Option<Secret>,
    pub slack_bot_token: Option<Secret>,
    pub slack_app_token: Option<Secret>,
    pub chat_llm_api_key: Option<Secret>,
    pub teams_app_password: Option<Secret>,
    pub discord_bot_token: Option<Secret>,
}

/// Environment variables holding a secret itself (the alternative to a `*_file` setting). They
/// set no TOML key: a secret never appears in the effective configuration.
pub const SECRET_ENV: &[(&str, &str)] = &[
    (
        "FLOTILLA_SLACK_SIGNING_SECRET",
        "the Slack signing secret (instead of `chat.slack.signing_secret_file`)",
    ),
    (
        "FLOTILLA_SLACK_BOT_TOKEN",
        "the Slack bot token (instead of `chat.slack.bot_token_file`)",
    ),
    (
        "FLOTILLA_SLACK_APP_TOKEN",
        "the Slack app-level token for Socket Mode (instead of `chat.slack.app_token_file`)",
    ),
    (
        "FLOTILLA_CHAT_LLM_API_KEY",
        "the chat LLM planner's API key (instead of `chat.llm.api_key_file`)",
    ),
    (
        "FLOTILLA_TEAMS_APP_PASSWORD",
        "the Teams bot's app password (instead of `chat.teams.app_password_file`)",
    ),
    (
        "FLOTILLA_DISCORD_BOT_TOKEN",
        "the Discord bot token (instead of `chat.discord.bot_token_file`)",
    ),
];

/// Why the secret file `path` (set by `key`) must not be used, if it is exposed: a file other
/// users can read or write is refused, because anyone on the host could take or replace the
/// secret. Group access is allowed (`chmod 640` for a service group, Debian's `ssl-cert`,
/// Kubernetes' `fsGroup`). A file that cannot be inspected passes here; reading it names the
/// problem. Unix only: elsewhere file modes say nothing. Shared by every secret the server
/// reads, TLS keys included (also on reload).
pub(crate) fn exposed_secret_file(key: &str, path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        if mode & 0o006 != 0 {
            let how = if mode & 0o004 != 0 {
                "readable"
            } else {
                "writable"
            };
            return Some(format!(
                "{key} {} is {how} by other users (mode {mode:04o}); run `chmod 600 {}` \
                 (or `chmod 640` for a service group; in Kubernetes set defaultMode: 0400 \
                 on the secret volume)",
                path.display(),
                path.display()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = (key, path);
    None
}

/// Whether the secret file is private enough to read; the reason it is not goes to `p`.
pub(crate) fn private_secret_file(key: &str, path: &Path, p: &mut Vec<String>) -> bool {
    match exposed_secret_file(key, path) {
        Some(why) => {
            p.push(why);
            false
        }
        None => true,
    }
}

/// A secret from a file or from the environment, exactly one of them; every problem is named.
fn one_secret(
    what: &str,
    file_key: &str,
    file: &Option<PathBuf>,
    env_name: &str,
    env: &Option<Secret>,
    p: &mut Vec<String>,
) -> Option<String> {
    match (file, env) {
        (Some(_), Some(_)) => {
            p.push(format!(
                "{what} is given twice: {file_key} and {env_name}; keep one"
            ));
            None
        }
        (None, None) => {
            p.push(format!("{what} is missing: set {file_key} or {env_name}"));
            None
        }
        (None, Some(s)) => match s.0.trim() {
            "" => {
                p.push(format!("{env_name} is empty"));
                None
            }
            t => Some(t.to_string()),
        },
        (Some(f), None) if !private_secret_file(file_key, f, p) => None,
        (Some(f), None) => match std::fs::read_to_string(f) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Ok(_) => {
                p.push(format!("{file_key} {} is empty", f.display()));
                None
            }
            Err(e) => {
                p.push(format!("{file_key} {} cannot be read: {e}", f.display()));
                None
            }
        },
    }
}

/// How Slack reaches the gateway, with that transport's secret.
#[derive(Clone)]
pub enum SlackTransport {
    /// Requests to the chat listener, verified with the signing secret.
    Http { signing_secret: String },
    /// Socket Mode, opened with the app-level token.
    Socket { app_token: String },
}

/// The Slack gateway's checked settings, secrets read.
#[derive(Clone)]
pub struct SlackSettings {
    pub transport: SlackTransport,
    pub bot_token: String,
    pub api_url: String,
}

impl std::fmt::Debug for SlackSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.transport {
            SlackTransport::Http { .. } => "http",
            SlackTransport::Socket { .. } => "socket",
        };
        f.debug_struct("SlackSettings")
            .field("mode", &mode)
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Checks `[chat]`: the listener address (required when a gateway is on) and each enabled
    /// gateway's settings, reading its secrets. Returns the listener address and Slack's
    /// settings when they are on.
    fn validate_chat(&self, p: &mut Vec<String>) -> (Option<SocketAddr>, Option<SlackSettings>) {
        let c = &self.chat;
        if !c.slack.enabled {
            return (self.webhook_listen(p), None);
        }
        let s = &c.slack;
        // Socket Mode needs no listener: the gateway opens the connections itself.
        let addr = match (&c.listen, s.mode) {
            (_, SlackMode::Socket) => self.webhook_listen(p),
            (Some(l), SlackMode::Http) => parse_addr("chat.listen", l, p),
            (None, SlackMode::Http) => {
                p.push(
                    "chat.slack is enabled but chat.listen is not set (the address Slack posts to; or set chat.slack.mode = \"socket\")"
                        .into(),
                );
                None
            }
        };
        let transport = match s.mode {
            SlackMode::Http => one_secret(
                "the Slack signing secret",
                "chat.slack.signing_secret_file",
                &s.signing_secret_file,
                "FLOTILLA_SLACK_SIGNING_SECRET",
                &self.env_secrets.slack_signing_secret,
                p,
            )
            .map(|signing_secret| SlackTransport::Http { signing_secret }),
            SlackMode::Socket => one_secret(
                "the Slack app-level token",
                "chat.slack.app_token_file",
                &s.app_token_file,
                "FLOTILLA_SLACK_APP_TOKEN",
                &self.env_secrets.slack_app_token,
                p,
            )
            .filter(|t| {
                let ok = t.starts_with("xapp-");
                if !ok {
                    p.push(
                        "the Slack app-level token does not start with xapp- (Basic Information → App-Level Tokens)"
                            .into(),
                    );
                }
                ok
            })
            .map(|app_token| SlackTransport::Socket { app_token }),
        };
        let token = one_secret(
            "the Slack bot token",
            "chat.slack.bot_token_file",
            &s.bot_token_file,
            "FLOTILLA_SLACK_BOT_TOKEN",
            &self.env_secrets.slack_bot_token,
            p,
        );
        if let Some(t) = &token {
            if !t.starts_with("xoxb-") {
                p.push(
                    "the Slack bot token does not start with xoxb- (use the Bot User OAuth Token)"
                        .into(),
                );
            }
        }
        let url_ok = (s.api_url.starts_with("https://") || s.api_url.starts_with("http://"))
            && !s.api_url.contains(char::is_whitespace);
        if !url_ok {
            p.push(format!(
                "chat.slack.api_url {:?} must be an http(s):// URL",
                s.api_url
            ));
        }
        if !(1..=MAX_CONFIRM_EXPIRY_S).contains(&s.confirm_expiry_s) {
            p.push(format!(
                "chat.slack.confirm_expiry_s {} must be between 1 and {MAX_CONFIRM_EXPIRY_S} seconds",
                s.confirm_expiry_s
            ));
        }
        let settings = match (transport, token) {
            (Some(transport), Some(bot_token)) if url_ok => Some(SlackSettings {
                transport,
                bot_token,
                api_url: s.api_url.trim_end_matches('/').to_string(),
            }),
            _ => None,
        };
        (addr, settings)
    }
}

impl Config {
    /// The chat listener Teams and Discord need (when Slack does not already require it).
    fn webhook_listen(&self, p: &mut Vec<String>) -> Option<SocketAddr> {
        let needed = [
            (
                self.chat.teams.enabled,
                "chat.teams",
                "the Azure Bot's messaging endpoint",
            ),
            (
                self.chat.discord.enabled,
                "chat.discord",
                "the Discord interactions endpoint URL",
            ),
        ];
        if !needed.iter().any(|(on, ..)| *on) {
            return None;
        }
        match &self.chat.listen {
            Some(l) => parse_addr("chat.listen", l, p),
            None => {
                for (_, key, reaches) in needed.iter().filter(|(on, ..)| *on) {
                    p.push(format!(
                        "{key} is enabled but chat.listen is not set (the address {reaches} reaches)"
                    ));
                }
                None
            }
        }
    }

    /// Checks `[chat.teams]` when enabled, reading the app password.
    fn validate_teams(&self, p: &mut Vec<String>) -> Option<TeamsSettings> {
        let t = &self.chat.teams;
        if !t.enabled {
            return None;
        }
        let before = p.len();
        if t.app_id.trim().is_empty() {
            p.push("chat.teams.app_id must be set (the Azure Bot's Microsoft App ID)".into());
        }
        let tenant = t.tenant.as_deref().map(str::trim);
        if tenant.is_some_and(|x| {
            x.is_empty()
                || !x
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
        }) {
            p.push(format!(
                "chat.teams.tenant {:?} must be a tenant id or domain",
                t.tenant.as_deref().unwrap_or("")
            ));
        }
        let token_url = t.token_url.clone().unwrap_or_else(|| match tenant {
            Some(x) => format!("https://login.microsoftonline.com/{x}/oauth2/v2.0/token"),
            None => flotilla_chat::teams::client::DEFAULT_TOKEN_URL.to_string(),
        });
        for (key, url) in [
            (
                "chat.teams.openid_metadata_url",
                t.openid_metadata_url.as_str(),
            ),
            ("chat.teams.token_url", token_url.as_str()),
            ("chat.teams.service_url", t.service_url.as_str()),
        ] {
            if !(url.starts_with("https://") || url.starts_with("http://"))
                || url.contains(char::is_whitespace)
            {
                p.push(format!("{key} {url:?} must be an http(s):// URL"));
            }
        }
        if t.keys_min_refresh_s > 3600 {
            p.push(format!(
                "chat.teams.keys_min_refresh_s {} must be at most 3600",
                t.keys_min_refresh_s
            ));
        }
        if !(1..=MAX_CONFIRM_EXPIRY_S).contains(&t.confirm_expiry_s) {
            p.push(format!(
                "chat.teams.confirm_expiry_s {} must be between 1 and {MAX_CONFIRM_EXPIRY_S} seconds",
                t.confirm_expiry_s
            ));
        }
        let password = one_secret(
            "the Teams app password",
            "chat.teams.app_password_file",
            &t.app_password_file,
            "FLOTILLA_TEAMS_APP_PASSWORD",
            &self.env_secrets.teams_app_password,
            p,
        );
        match password {
            Some(app_password) if p.len() == before => Some(TeamsSettings {
                app_id: t.app_id.trim().to_string(),
                app_password,
                openid_metadata_url: t.openid_metadata_url.clone(),
                token_url,
                service_url: t.service_url.clone(),
                keys_min_refresh_s: t.keys_min_refresh_s,
            }),
            _ => None,
        }
    }
}

impl Config {
    /// Checks `[chat.discord]` when enabled, reading the bot token.
    fn validate_discord(&self, p: &mut Vec<String>) -> Option<DiscordSettings> {
        let d = &self.chat.discord;
        if !d.enabled {
            return None;
        }
        let before = p.len();
        let app = d.application_id.trim();
        if app.is_empty() || !app.bytes().all(|b| b.is_ascii_digit()) {
            p.push(format!(
                "chat.discord.application_id {app:?} must be the application's id (digits; General Information → Application ID)"
            ));
        }
        let key = flotilla_chat::discord::verify::PublicKey::from_hex(&d.public_key);
        if let Err(e) = &key {
            p.push(format!("chat.discord.public_key: {e}"));
        }
        let url = d.api_url.trim_end_matches('/');
        if !(url.starts_with("https://") || url.starts_with("http://"))
            || url.contains(char::is_whitespace)
        {
            p.push(format!(
                "chat.discord.api_url {:?} must be an http(s):// URL",
                d.api_url
            ));
        }
        if !(1..=MAX_CONFIRM_EXPIRY_S).contains(&d.confirm_expiry_s) {
            p.push(format!(
                "chat.discord.confirm_expiry_s {} must be between 1 and {MAX_CONFIRM_EXPIRY_S} seconds",
                d.confirm_expiry_s
            ));
        }
        let token = one_secret(
            "the Discord bot token",
            "chat.discord.bot_token_file",
            &d.bot_token_file,
            "FLOTILLA_DISCORD_BOT_TOKEN",
            &self.env_secrets.discord_bot_token,
            p,
        );
        match (token, key) {
            (Some(bot_token), Ok(public_key)) if p.len() == before => Some(DiscordSettings {
                application_id: app.to_string(),
                public_key,
                bot_token,
                api_url: url.to_string(),
                gateway: d.gateway,
            }),
            _ => None,
        }
    }
}

impl Config {
    /// Checks `[chat.llm]` when enabled, reading its key (optional: a local server may need
    /// none, but given twice or empty is refused).
    fn validate_llm(&self, p: &mut Vec<String>) -> Option<LlmConfig> {
        let l = &self.chat.llm;
        if !l.enabled {
            return None;
        }
        let before = p.len();
        let url = l.base_url.trim_end_matches('/');
        if !(url.starts_with("https://") || url.starts_with("http://"))
            || url.contains(char::is_whitespace)
        {
            p.push(format!(
                "chat.llm.base_url {:?} must be an http(s):// URL such as https://api.openai.com/v1",
                l.base_url
            ));
        }
        if l.model.trim().is_empty() {
            p.push("chat.llm.model must be set (the model or deployment name)".into());
        }
        if !(1..=16).contains(&l.max_steps) {
            p.push(format!("chat.llm.max_steps = {} must be 1-16", l.max_steps));
        }
        if !(1..=100_000).contains(&l.max_tokens) {
            p.push(format!(
                "chat.llm.max_tokens = {} must be 1-100000",
                l.max_tokens
            ));
        }
        if l.timeout_s == 0 || l.deadline_s < l.timeout_s {
            p.push(format!(
                "chat.llm.timeout_s = {} and deadline_s = {} must be at least 1 and timeout_s <= deadline_s",
                l.timeout_s, l.deadline_s
            ));
        }
        if l.api_version.is_some() && l.flavor != Flavor::Azure {
            p.push("chat.llm.api_version is only used with flavor = \"azure\"".into());
        }
        let key = match (&l.api_key_file, &self.env_secrets.chat_llm_api_key) {
            (None, None) => None,
            (file, env) => one_secret(
                "the chat LLM API key",
                "chat.llm.api_key_file",
                file,
                "FLOTILLA_CHAT_LLM_API_KEY",
                env,
                p,
            ),
        };
        if p.len() > before {
            return None;
        }
        let mut c = LlmConfig::new(url, l.model.trim());
        c.api_key = key;
        c.flavor = l.flavor;
        c.api_version = l.api_version.clone();
        c.max_steps = l.max_steps;
        c.max_tokens = l.max_tokens;
        c.timeout = std::time::Duration::from_secs(l.timeout_s);
        c.deadline = std::time::Duration::from_secs(l.deadline_s);
        Some(c)
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
            console: ConsoleConfig::default(),
            chat: ChatConfig::default(),
            store: StoreConfig::default(),
            tls: TlsConfig::default(),
            env_secrets: EnvSecrets::default(),
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
            agent_auth: None,
            header_read_timeout_s: 30,
            body_read_timeout_s: 60,
            malformed_log_burst: 10,
            malformed_log_window_s: 60,
            tls: AgentTlsConfig::default(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:8080".into(),
            tokens_file: None,
            max_body_bytes: 1024 * 1024,
            max_connections: 1024,
            header_read_timeout_s: 30,
            body_read_timeout_s: 60,
            tls: ListenerTlsConfig::default(),
        }
    }
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            queue_ttl_s: 24 * 3600,
            result_timeout_s: 600,
            max_fanout: 100_000,
            admin_shutdown_above: 10,
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

/// How an environment variable's text becomes a TOML value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvKind {
    /// Taken as is (addresses, paths, filters).
    Text,
    /// A non-negative whole number.
    Number,
    /// `true|false|1|0|yes|no|on|off`.
    Bool,
    /// Comma-separated; at least one entry.
    List,
}

/// One environment variable: its name, the TOML key it sets, and how its text is read.
#[derive(Debug, Clone, Copy)]
pub struct EnvVar {
    pub name: &'static str,
    pub key: &'static str,
    pub kind: EnvKind,
}

const fn var(name: &'static str, key: &'static str, kind: EnvKind) -> EnvVar {
    EnvVar { name, key, kind }
}

/// Every environment variable the server reads, with the TOML key it sets: the one table that
/// [`Config::load`] applies and the README's list is checked against.
pub const ENV_VARS: &[EnvVar] = &[
    var("FLOTILLA_DATA_DIR", "data_dir", EnvKind::Text),
    var("FLOTILLA_STORE_URL", "store.url", EnvKind::Text),
    var(
        "FLOTILLA_STORE_PASSWORD_FILE",
        "store.password_file",
        EnvKind::Text,
    ),
    var(
        "FLOTILLA_STORE_REPLICA_ID",
        "store.replica_id",
        EnvKind::Text,
    ),
    var(
        "FLOTILLA_STORE_REPLICA_HEARTBEAT_S",
        "store.replica_heartbeat_s",
        EnvKind::Number,
    ),
    var("FLOTILLA_OPAMP_LISTEN", "opamp.listen", EnvKind::Text),
    var("FLOTILLA_OPAMP_PATH", "opamp.path", EnvKind::Text),
    var(
        "FLOTILLA_MAX_MESSAGE_BYTES",
        "opamp.max_message_bytes",
        EnvKind::Number,
    ),
    var(
        "FLOTILLA_MAX_CONNECTIONS",
        "opamp.max_connections",
        EnvKind::Number,
    ),
    var(
        "FLOTILLA_MAX_IN_FLIGHT",
        "opamp.max_in_flight",
        EnvKind::Number,
    ),
    var(
        "FLOTILLA_HEARTBEAT_INTERVAL_S",
        "opamp.heartbeat_interval_s",
        EnvKind::Number,
    ),
    var(
        "FLOTILLA_AGENT_TOKENS_FILE",
        "opamp.agent_tokens_file",
        EnvKind::Text,
    ),
    var("FLOTILLA_API_LISTEN", "api.listen", EnvKind::Text),
    var("FLOTILLA_API_TOKENS_FILE", "api.tokens_file", EnvKind::Text),
    var("FLOTILLA_MCP_READ_ONLY", "mcp.read_only", EnvKind::Bool),
    var(
        "FLOTILLA_MCP_ALLOWED_HOSTS",
        "mcp.allowed_hosts",
        EnvKind::List,
    ),
    var("FLOTILLA_CONSOLE_ENABLED", "console.enabled", EnvKind::Bool),
    var("FLOTILLA_CHAT_LISTEN", "chat.listen", EnvKind::Text),
    var(
        "FLOTILLA_SLACK_ENABLED",
        "chat.slack.enabled",
        EnvKind::Bool,
    ),
    var(
        "FLOTILLA_SLACK_SIGNING_SECRET_FILE",
        "chat.slack.signing_secret_file",
        EnvKind::Text,
    ),
    var(
        "FLOTILLA_SLACK_BOT_TOKEN_FILE",
        "chat.slack.bot_token_file",
        EnvKind::Text,
    ),
    var("FLOTILLA_SLACK_MODE", "chat.slack.mode", EnvKind::Text),
    var(
        "FLOTILLA_SLACK_APP_TOKEN_FILE",
        "chat.slack.app_token_file",
        EnvKind::Text,
    ),
    var(
        "FLOTILLA_TEAMS_ENABLED",
        "chat.teams.enabled",
        EnvKind::Bool,
    ),
    var("FLOTILLA_TEAMS_APP_ID", "chat.teams.app_id", EnvKind::Text),
    var(
        "FLOTILLA_TEAMS_APP_PASSWORD_FILE",
        "chat.teams.app_password_file",
        EnvKind::Text,
    ),
    var("FLOTILLA_TEAMS_TENANT", "chat.teams.tenant", EnvKind::Text),
    var(
        "FLOTILLA_DISCORD_ENABLED",
        "chat.discord.enabled",
        EnvKind::Bool,
    ),
    var(
        "FLOTILLA_DISCORD_APPLICATION_ID",
        "chat.discord.application_id",
        EnvKind::Text,
    ),
    var(
        "FLOTILLA_DISCORD_PUBLIC_KEY",
        "chat.discord.public_key",
        EnvKind::Text,
    ),
    var(
        "FLOTILLA_DISCORD_BOT_TOKEN_FILE",
        "chat.discord.bot_token_file",
        EnvKind::Text,
    ),
    var(
        "FLOTILLA_DISCORD_GATEWAY",
        "chat.discord.gateway",
        EnvKind::Bool,
    ),
    var("FLOTILLA_TLS_CERT_FILE", "tls.cert_file", EnvKind::Text),
    var("FLOTILLA_TLS_KEY_FILE", "tls.key_file", EnvKind::Text),
    var("FLOTILLA_LOG_FORMAT", "log.format", EnvKind::Text),
    var("FLOTILLA_LOG", "log.level", EnvKind::Text),
];

/// Names the flag parser reads itself (the config file), not a setting.
pub const CONFIG_ENV: &str = "FLOTILLA_CONFIG";

/// `FLOTILLA_*` variables that are not server settings and that `serve` therefore ignores: the
/// operator CLI's and `flotilla mcp`'s client settings, the supervisor's own variables (a host
/// may run both), and the test suite's. Any other `FLOTILLA_*` variable is refused, so a typo
/// never silently leaves a default in force.
pub const NOT_SERVER_ENV: &[&str] = &[
    CONFIG_ENV,
    "FLOTILLA_SERVER",
    "FLOTILLA_TOKEN",
    "FLOTILLA_TOKEN_FILE",
    "FLOTILLA_CA_FILE",
    "FLOTILLA_OUTPUT",
    "FLOTILLA_CLIENT_CONFIG",
    // The agent token the supervisor's example configs read (`token_env`).
    "FLOTILLA_AGENT_TOKEN",
    "FLOTILLA_SUPERVISOR_*",
    // Read by server/build.rs at build time (the commit in --version).
    "FLOTILLA_BUILD_COMMIT",
    // The test suite (tests/run.sh exports some to every process it starts) and the benchmark.
    "FLOTILLA_BIN",
    "FLOTILLA_PEERS_DIR",
    "FLOTILLA_REAL_AGENTS_DIR",
    "FLOTILLA_TEST_*",
    "FLOTILLA_BENCH_REEXEC",
];

/// True for a `FLOTILLA_*` name listed in [`NOT_SERVER_ENV`] (a trailing `*` is a prefix).
pub fn is_non_server_env(name: &str) -> bool {
    NOT_SERVER_ENV.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == *p,
    })
}

/// The `FLOTILLA_*` variables of this process, for [`Config::load`].
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            if !k.starts_with("FLOTILLA_") {
                return None;
            }
            // A value that is not UTF-8 is kept visible (lossily) so it is refused by name
            // rather than skipped.
            Some((k, v.to_string_lossy().into_owned()))
        })
        .collect()
}

/// The README's environment table (between its `env-table` markers), generated from
/// [`ENV_VARS`].
pub fn env_table_markdown() -> String {
    let mut out = String::from("| variable | sets |\n|---|---|\n");
    out.push_str(&format!(
        "| `{CONFIG_ENV}` | the configuration file (`--config`) |\n"
    ));
    for v in ENV_VARS {
        let how = match v.kind {
            EnvKind::Text => "",
            EnvKind::Number => " (a whole number)",
            EnvKind::Bool => " (`true` or `false`)",
            EnvKind::List => " (comma-separated, at least one)",
        };
        out.push_str(&format!("| `{}` | `{}`{how} |\n", v.name, v.key));
    }
    for (name, what) in SECRET_ENV {
        out.push_str(&format!("| `{name}` | {what} |\n"));
    }
    out
}

impl Config {
    /// Reads `file` (if given), then applies the `FLOTILLA_*` variables in `env` through
    /// [`ENV_VARS`]; does not validate. Unknown `FLOTILLA_*` names (not in [`ENV_VARS`] nor
    /// [`NOT_SERVER_ENV`]) and empty values are refused, every problem named at once.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.to_path_buf(),
                    error,
                })?;
                toml::from_str::<Config>(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?
            }
            None => Config::default(),
        };
        let mut problems = Vec::new();
        // Through the TOML document, so an environment value is typed and checked exactly as
        // the same value in the file would be.
        let mut doc = toml::Value::try_from(&cfg).map_err(|e| {
            ConfigError::Invalid(vec![format!("cannot represent the configuration: {e}")])
        })?;
        let mut env_secrets = EnvSecrets::default();
        for (name, value) in env {
            if !name.starts_with("FLOTILLA_") || is_non_server_env(&name) {
                continue;
            }
            let secret = Some(Secret(value.clone()));
            match name.as_str() {
                "FLOTILLA_SLACK_SIGNING_SECRET" => {
                    env_secrets.slack_signing_secret = secret;
                    continue;
                }
                "FLOTILLA_SLACK_BOT_TOKEN" => {
                    env_secrets.slack_bot_token = secret;
                    continue;
                }
                "FLOTILLA_SLACK_APP_TOKEN" => {
                    env_secrets.slack_app_token = secret;
                    continue;
                }
                "FLOTILLA_CHAT_LLM_API_KEY" => {
                    env_secrets.chat_llm_api_key = secret;
                    continue;
                }
                "FLOTILLA_TEAMS_APP_PASSWORD" => {
                    env_secrets.teams_app_password = secret;
                    continue;
                }
                "FLOTILLA_DISCORD_BOT_TOKEN" => {
                    env_secrets.discord_bot_token = secret;
                    continue;
                }
                _ => {}
            }
            let Some(var) = ENV_VARS.iter().find(|v| v.name == name) else {
                problems.push(unknown_env(&name));
                continue;
            };
            match env_value(var, &value) {
                Ok(v) => set_key(&mut doc, var.key, v),
                Err(e) => problems.push(e),
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        let mut cfg = Config::deserialize(doc)
            .map_err(|e| ConfigError::Invalid(vec![format!("environment variables: {e}")]))?;
        cfg.env_secrets = env_secrets;
        Ok(cfg)
    }

    /// The configuration as TOML, as a file that reproduces it (`config check` prints it).
    pub fn to_toml(&self) -> String {
        // Every field is a string, number, bool, path or list: serialising cannot fail.
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Checks every setting and reports all problems at once.
    pub fn validate(&self) -> Result<Validated, ConfigError> {
        let mut p = Vec::new();
        if let Some(url) = self.store.postgres_url() {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                p.push(format!(
                    "store.url {:?} must be a postgres:// URL (unset for SQLite in data_dir)",
                    crate::store::postgres::redact_url(url)
                ));
            }
            if let Some(f) = &self.store.password_file {
                private_secret_file("store.password_file", f, &mut p);
            }
        } else if self.store.password_file.is_some() {
            p.push("store.password_file is set but store.url is not".into());
        }
        if let Some(id) = &self.store.replica_id {
            let id = id.trim();
            if id.is_empty()
                || id.len() > MAX_REPLICA_ID
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            {
                p.push(format!(
                    "store.replica_id {id:?} must be 1 to {MAX_REPLICA_ID} letters, digits or \
                     - _ . :"
                ));
            }
        }
        if !(1..=300).contains(&self.store.replica_heartbeat_s) {
            p.push(format!(
                "store.replica_heartbeat_s = {} must be between 1 and 300",
                self.store.replica_heartbeat_s
            ));
        }
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
                "opamp.header_read_timeout_s",
                self.opamp.header_read_timeout_s,
            ),
            ("opamp.body_read_timeout_s", self.opamp.body_read_timeout_s),
            ("api.header_read_timeout_s", self.api.header_read_timeout_s),
            ("api.body_read_timeout_s", self.api.body_read_timeout_s),
            (
                "opamp.malformed_log_window_s",
                self.opamp.malformed_log_window_s,
            ),
        ] {
            if !(1..=3600).contains(&v) {
                p.push(format!("{name} = {v} must be between 1 and 3600 seconds"));
            }
        }
        if self.api.max_connections == 0 {
            p.push("api.max_connections must be at least 1".into());
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
                } else {
                    private_secret_file(name, f, &mut p);
                }
            }
        }
        if self.api.max_body_bytes < 1024 {
            p.push(format!(
                "api.max_body_bytes = {} is too small (at least 1024)",
                self.api.max_body_bytes
            ));
        }
        if !(60..=30 * 86_400).contains(&self.console.session_ttl_s) {
            p.push(format!(
                "console.session_ttl_s = {} must be between 60 and 2592000 seconds",
                self.console.session_ttl_s
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
        if let Err(e) = check_log_filter(&self.log.level) {
            p.push(format!("log.level = {:?} {e}", self.log.level));
        }
        if self.data_dir.as_os_str().is_empty() {
            p.push("data_dir must not be empty".into());
        } else if self.data_dir.exists() && !self.data_dir.is_dir() {
            p.push(format!(
                "data_dir {} exists and is not a directory",
                self.data_dir.display()
            ));
        }
        let (chat_addr, slack) = self.validate_chat(&mut p);
        let teams = self.validate_teams(&mut p);
        let discord = self.validate_discord(&mut p);
        let llm = self.validate_llm(&mut p);
        let tls = self.validate_tls(chat_addr.is_some(), &mut p);
        if let Some(c) = chat_addr {
            for (name, other) in [("opamp.listen", opamp_addr), ("api.listen", api_addr)] {
                if other == Some(c) && c.port() != 0 {
                    p.push(format!(
                        "chat.listen and {name} are both {c}: the chat webhooks need their own listener"
                    ));
                }
            }
        }
        match (p.is_empty(), opamp_addr, api_addr) {
            (true, Some(opamp_addr), Some(api_addr)) => Ok(Validated {
                config: self.clone(),
                opamp_addr,
                api_addr,
                chat_addr,
                slack,
                teams,
                discord,
                llm,
                tls,
            }),
            _ => Err(ConfigError::Invalid(p)),
        }
    }
}

/// The problem for a `FLOTILLA_*` name the server does not read, with the likeliest meant name.
fn unknown_env(name: &str) -> String {
    let mut known: Vec<&str> = ENV_VARS.iter().map(|v| v.name).collect();
    known.extend(SECRET_ENV.iter().map(|(n, _)| *n));
    known.push(CONFIG_ENV);
    // A typo, or a longer spelling of a name (FLOTILLA_LOG_LEVEL for FLOTILLA_LOG).
    let near = known
        .iter()
        .map(|k| {
            let extends = name.starts_with(&format!("{k}_"));
            (if extends { 0 } else { edit_distance(name, k) }, *k)
        })
        .min()
        .filter(|(d, _)| *d <= 4)
        .map(|(_, k)| format!(" (did you mean {k}?)"))
        .unwrap_or_default();
    format!(
        "{name} is not a Flotilla server setting{near}; the server reads {} (unset it, or see `flotilla config check --help`)",
        known.join(", ")
    )
}

/// Levenshtein distance, for suggesting the variable a typo meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Reads one variable's text as the TOML value of its key.
fn env_value(var: &EnvVar, value: &str) -> Result<toml::Value, String> {
    let name = var.name;
    let v = value.trim();
    if v.is_empty() {
        // An empty variable is a mistake far more often than a wish for "nothing": for
        // mcp.allowed_hosts it would even turn the Host check off.
        return Err(format!(
            "{name} is set but empty; unset it to keep the file's or the default {}",
            var.key
        ));
    }
    match var.kind {
        EnvKind::Text => Ok(toml::Value::String(value.to_string())),
        EnvKind::Number => v
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(toml::Value::Integer)
            .ok_or_else(|| format!("{name}={value:?} is not a non-negative whole number")),
        EnvKind::Bool => match v.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(toml::Value::Boolean(true)),
            "0" | "false" | "no" | "off" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!("{name}={value:?} is not true or false")),
        },
        EnvKind::List => {
            let items: Vec<&str> = v.split(',').map(str::trim).collect();
            if items.iter().any(|i| i.is_empty()) {
                return Err(format!(
                    "{name}={value:?} has an empty entry (entries are separated by single commas)"
                ));
            }
            Ok(toml::Value::Array(
                items
                    .into_iter()
                    .map(|i| toml::Value::String(i.to_string()))
                    .collect(),
            ))
        }
    }
}

/// Sets a dotted `key` in a TOML document, creating tables on the way.
fn set_key(doc: &mut toml::Value, key: &str, value: toml::Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or(key);
    let mut table = doc;
    for p in parts {
        let toml::Value::Table(t) = table else { return };
        table = t
            .entry(p)
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    if let toml::Value::Table(t) = table {
        t.insert(last.to_string(), value);
    }
}

/// Checks a log filter more strictly than `EnvFilter` does: it takes any bare word as a target
/// name (so `verbose` "parses" and then matches nothing), which is never what was meant.
fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: &str = "trace, debug, info, warn, error or off";
    if filter.trim().is_empty() {
        return Err(format!("is empty (use a level: {LEVELS})"));
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map_err(|e| format!("is not a valid filter ({e}); use a level: {LEVELS}"))?;
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let is_level = d.parse::<tracing_subscriber::filter::LevelFilter>().is_ok();
        if !is_level && !d.contains('=') && !d.contains('[') {
            return Err(format!(
                "names {d:?}, which is not a level ({LEVELS}); to filter by module write target=level, e.g. flotilla_server=debug"
            ));
        }
    }
    Ok(())
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

impl Config {
    /// Valid settings that turn a protection off, for a warning at start and in `config
    /// check`: never silently.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let any_gateway =
            self.chat.slack.enabled || self.chat.teams.enabled || self.chat.discord.enabled;
        if self.chat.listen.is_some() && !any_gateway {
            w.push(
                "chat.listen is set but no chat gateway is enabled: the chat listener stays off"
                    .to_string(),
            );
        }
        if self.chat.listen.is_some()
            && self.chat.slack.enabled
            && self.chat.slack.mode == SlackMode::Socket
            && !self.chat.teams.enabled
            && !self.chat.discord.enabled
        {
            w.push(
                "chat.listen is set but Slack runs in Socket Mode (no webhooks): the chat listener stays off"
                    .to_string(),
            );
        }
        if self.chat.llm.enabled && !any_gateway {
            w.push(
                "chat.llm is enabled but no chat gateway is: the LLM planner is not used"
                    .to_string(),
            );
        }
        if self.mcp.enabled && self.mcp.allowed_hosts.is_empty() {
            w.push(
                "mcp.allowed_hosts is empty: the MCP Host check (DNS-rebinding protection) is off"
                    .to_string(),
            );
        }
        w
    }
}

/// A configuration that passed [`Config::validate`], with parsed addresses.
#[derive(Debug, Clone)]
pub struct Validated {
    pub config: Config,
    pub opamp_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// The chat listener's address, when a chat gateway is enabled.
    pub chat_addr: Option<SocketAddr>,
    /// The Slack gateway's settings with its secrets read, when enabled.
    pub slack: Option<SlackSettings>,
    /// The Teams gateway's settings with its password read, when enabled.
    pub teams: Option<TeamsSettings>,
    /// The Discord gateway's settings with its bot token read, when enabled.
    pub discord: Option<DiscordSettings>,
    /// The chat LLM planner's settings with its key read, when enabled (`Debug` hides the key).
    pub llm: Option<LlmConfig>,
    /// Each listener's TLS, loaded and checked.
    pub tls: TlsListeners,
}

/// The listeners' TLS, each `None` when that listener serves plain HTTP.
#[derive(Debug, Clone, Default)]
pub struct TlsListeners {
    pub opamp: Option<std::sync::Arc<crate::tls::ListenerTls>>,
    pub api: Option<std::sync::Arc<crate::tls::ListenerTls>>,
    pub chat: Option<std::sync::Arc<crate::tls::ListenerTls>>,
}

impl Config {
    /// Loads every listener's certificate (its own `tls` section, else `[tls]`) and checks it,
    /// so a bad pair stops the server before any port is bound.
    fn validate_tls(&self, chat_on: bool, p: &mut Vec<String>) -> TlsListeners {
        use crate::tls::{CertFiles, ClientAuth, ListenerTls};
        if !(1..=86_400).contains(&self.tls.reload_interval_s) {
            p.push(format!(
                "tls.reload_interval_s = {} must be between 1 and 86400 seconds",
                self.tls.reload_interval_s
            ));
        }
        let shared = self.pair("tls", &self.tls.cert_file, &self.tls.key_file, p);
        let load = |section: &str,
                    cert: &Option<PathBuf>,
                    key: &Option<PathBuf>,
                    client: Option<ClientAuth>,
                    p: &mut Vec<String>| {
            let files: Option<CertFiles> = self.pair(section, cert, key, p).or(shared.clone());
            match (files, client) {
                (None, Some(_)) => {
                    p.push(format!(
                        "{section}.client_ca_file needs TLS on that listener: set {section}.cert_file and key_file, or [tls]"
                    ));
                    None
                }
                (None, None) => None,
                (Some(f), client) => match ListenerTls::load(f, client.as_ref()) {
                    Ok(t) => Some(std::sync::Arc::new(t)),
                    Err(e) => {
                        p.push(e.to_string());
                        None
                    }
                },
            }
        };
        let o = &self.opamp.tls;
        let client = o.client_ca_file.as_ref().map(|f| ClientAuth {
            ca_file: f.clone(),
            required: o.client_auth == ClientAuthMode::Required,
        });
        match (self.opamp.agent_auth, &self.opamp.agent_tokens_file) {
            (Some(AgentAuthMode::Token), None) => p.push(
                "opamp.agent_auth = \"token\" needs opamp.agent_tokens_file (the tokens agents present)"
                    .into(),
            ),
            (Some(AgentAuthMode::None), Some(_)) => p.push(
                "opamp.agent_auth = \"none\" but opamp.agent_tokens_file is set: say \"token\" (or \"mtls\"), or unset the file"
                    .into(),
            ),
            (Some(AgentAuthMode::Mtls), _) if client.is_none() => p.push(
                "opamp.agent_auth = \"mtls\" needs opamp.tls.client_ca_file (the CA that signs agents' certificates)"
                    .into(),
            ),
            _ => {}
        }
        if o.pin_uid && client.is_none() {
            p.push(
                "opamp.tls.pin_uid needs opamp.tls.client_ca_file (client certificates to pin)"
                    .into(),
            );
        }
        let opamp = load("opamp.tls", &o.cert_file, &o.key_file, client, p);
        let api = load(
            "api.tls",
            &self.api.tls.cert_file,
            &self.api.tls.key_file,
            None,
            p,
        );
        let chat = if chat_on {
            load(
                "chat.tls",
                &self.chat.tls.cert_file,
                &self.chat.tls.key_file,
                None,
                p,
            )
        } else {
            None
        };
        TlsListeners { opamp, api, chat }
    }

    /// A section's certificate and key, both or neither.
    fn pair(
        &self,
        section: &str,
        cert: &Option<PathBuf>,
        key: &Option<PathBuf>,
        p: &mut Vec<String>,
    ) -> Option<crate::tls::CertFiles> {
        match (cert, key) {
            (Some(c), Some(k)) => Some(crate::tls::CertFiles {
                cert_file: c.clone(),
                key_file: k.clone(),
                cert_key: format!("{section}.cert_file"),
                key_key: format!("{section}.key_file"),
            }),
            (None, None) => None,
            (Some(_), None) => {
                p.push(format!(
                    "{section}.cert_file is set without {section}.key_file"
                ));
                None
            }
            (None, Some(_)) => {
                p.push(format!(
                    "{section}.key_file is set without {section}.cert_file"
                ));
                None
            }
        }
    }
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
    fn a_log_level_that_would_log_nothing_is_refused() {
        // `verbose` is a valid EnvFilter (a target named "verbose") that matches nothing: the
        // server would start and log nothing at all.
        for bad in ["verbose", "info,chatty", "loud"] {
            let mut c = Config::default();
            c.log.level = bad.into();
            let msg = c.validate().unwrap_err().to_string();
            assert!(
                msg.contains("log.level") && msg.contains("not a level"),
                "{bad}: {msg}"
            );
        }
        for good in [
            "info",
            "DEBUG",
            "warn,flotilla_server=debug",
            "off",
            "flotilla_mcp=trace",
        ] {
            let mut c = Config::default();
            c.log.level = good.into();
            c.validate().unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        // Through the environment, as the issue found it.
        let c = Config::load(None, [env("FLOTILLA_LOG", "verbose")]).unwrap();
        assert!(c.validate().is_err());
    }

    fn env(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn unknown_flotilla_variables_are_refused_with_a_suggestion() {
        let err = Config::load(
            None,
            [
                env("FLOTILLA_LOG_LEVEL", "debug"),
                env("FLOTILLA_API_LISTEN", "127.0.0.1:1"),
                env("FLOTILLA_OPAMP_LISTN", "x"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(
                "FLOTILLA_LOG_LEVEL is not a Flotilla server setting (did you mean FLOTILLA_LOG?)"
            ),
            "{err}"
        );
        assert!(err.contains("did you mean FLOTILLA_OPAMP_LISTEN?"), "{err}");
        assert!(!err.contains("FLOTILLA_API_LISTEN is"), "{err}");
        // Client, supervisor and test-suite variables are not the server's and are ignored;
        // other prefixes are not ours at all.
        let c = Config::load(
            None,
            [
                env("FLOTILLA_SERVER", "http://x"),
                env("FLOTILLA_TOKEN_FILE", "/t"),
                env("FLOTILLA_SUPERVISOR_LOG", "debug"),
                env("FLOTILLA_PEERS_DIR", "/p"),
                env("FLOTILLA_CONFIG", "/c.toml"),
                env("HOME", "/root"),
            ],
        )
        .unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn the_test_suites_variables_do_not_stop_a_server() {
        // tests/run.sh and .ci/run export variables to every process, servers started by
        // tests included: each must be a setting or let through.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for script in ["tests/run.sh", ".ci/run"] {
            let text = std::fs::read_to_string(root.join(script)).unwrap();
            let names: std::collections::BTreeSet<&str> = text
                .match_indices("FLOTILLA_")
                .map(|(i, _)| {
                    let rest = &text[i..];
                    let end = rest
                        .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
                        .unwrap_or(rest.len());
                    rest[..end].trim_end_matches('_')
                })
                .collect();
            for name in names {
                if let Err(e) = Config::load(None, [env(name, "/some/value")]) {
                    assert!(
                        !e.to_string().contains("is not a Flotilla server setting"),
                        "{script} exports {name}, which a server refuses: {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_variables_are_refused() {
        // An empty FLOTILLA_MCP_ALLOWED_HOSTS used to turn the Host check off.
        for name in [
            "FLOTILLA_MCP_ALLOWED_HOSTS",
            "FLOTILLA_LOG",
            "FLOTILLA_MCP_READ_ONLY",
            "FLOTILLA_MAX_CONNECTIONS",
        ] {
            let err = Config::load(None, [env(name, "")]).unwrap_err().to_string();
            assert!(err.contains(&format!("{name} is set but empty")), "{err}");
        }
        let err = Config::load(None, [env("FLOTILLA_MCP_ALLOWED_HOSTS", "a,,b")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty entry"), "{err}");
    }

    #[test]
    fn every_variable_of_the_table_sets_its_key() {
        for v in ENV_VARS {
            let (text, want) = match v.kind {
                // A closed set of words: one of them.
                EnvKind::Text if v.name == "FLOTILLA_SLACK_MODE" => {
                    ("socket", toml::Value::String("socket".into()))
                }
                EnvKind::Text => ("/some/value", toml::Value::String("/some/value".into())),
                EnvKind::Number => ("4242", toml::Value::Integer(4242)),
                EnvKind::Bool => ("yes", toml::Value::Boolean(true)),
                EnvKind::List => (
                    "a.example, b:1",
                    toml::Value::Array(vec!["a.example".into(), "b:1".into()]),
                ),
            };
            let c = Config::load(None, [env(v.name, text)])
                .unwrap_or_else(|e| panic!("{}: {e}", v.name));
            let doc = toml::Value::try_from(&c).unwrap();
            let got = v.key.split('.').try_fold(&doc, |d, k| d.get(k));
            assert_eq!(got, Some(&want), "{} -> {}", v.name, v.key);
        }
    }

    #[test]
    fn a_protection_turned_off_is_warned_about() {
        let mut c = Config::default();
        assert!(c.warnings().is_empty());
        c.mcp.allowed_hosts.clear();
        assert!(c.warnings()[0].contains("Host check"), "{:?}", c.warnings());
    }

    #[test]
    fn the_effective_toml_reproduces_the_configuration() {
        let mut c = Config::default();
        c.api.tokens_file = Some("/etc/flotilla/api-tokens".into());
        c.mcp.allowed_hosts.push("flotilla.example".into());
        c.commands.max_fanout = 7;
        let text = c.to_toml();
        assert!(
            text.contains("[opamp]") && text.contains("max_fanout = 7"),
            "{text}"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("effective.toml");
        std::fs::write(&f, &text).unwrap();
        assert_eq!(Config::load(Some(&f), []).unwrap(), c);
    }

    #[test]
    fn a_missing_config_file_is_named_once() {
        let err = Config::load(Some(Path::new("/nonexistent/flotilla.toml")), []).unwrap_err();
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(chain.matches("No such file").count(), 1, "{chain}");
        assert!(chain.contains("/nonexistent/flotilla.toml"), "{chain}");
    }

    #[test]
    fn the_readme_lists_exactly_the_environment_table() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
                .unwrap();
        let start = "<!-- env-table:start (generated from server/src/config.rs ENV_VARS) -->\n";
        let end = "<!-- env-table:end -->";
        let from = readme.find(start).expect("README env-table start marker") + start.len();
        let to = readme[from..]
            .find(end)
            .expect("README env-table end marker")
            + from;
        assert_eq!(
            &readme[from..to],
            env_table_markdown(),
            "README's environment table is stale; replace it with config::env_table_markdown()"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.toml");
        std::fs::write(&f, "[opamp]\nlisten_on = \"x\"\n").unwrap();
        let err = Config::load(Some(&f), []).unwrap_err().to_string();
        assert!(err.contains("listen_on"), "{err}");
    }

    /// A secret file as an operator must write it: owner-only.
    fn secret_file(path: &Path, contents: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, contents).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn secret_files_others_can_read_or_write_are_refused_group_access_is_not() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("llm-key");
        secret_file(&key, "sk-secret-value\n");
        for (mode, ok, word) in [
            (0o600, true, ""),
            (0o640, true, ""),
            (0o400, true, ""),
            (0o644, false, "readable"),
            (0o604, false, "readable"),
            (0o602, false, "writable"),
        ] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let mut p = Vec::new();
            assert_eq!(
                private_secret_file("chat.llm.api_key_file", &key, &mut p),
                ok
            );
            if ok {
                assert!(p.is_empty(), "{mode:o}: {p:?}");
            } else {
                let msg = p.join("\n");
                for needle in [
                    "chat.llm.api_key_file",
                    word,
                    &format!("{mode:04o}"),
                    "chmod 600",
                ] {
                    assert!(msg.contains(needle), "{needle} missing from {msg}");
                }
                assert!(!msg.contains("sk-secret-value"));
            }
        }
        // Through the config: the key is not read from a world-readable file.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let f = dir.path().join("flotilla.toml");
        std::fs::write(
            &f,
            format!(
                "[chat.llm]\nenabled = true\nbase_url = \"http://localhost:11434/v1\"\n\
                 model = \"m\"\napi_key_file = {key:?}\n"
            ),
        )
        .unwrap();
        let msg = Config::load(Some(&f), [])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("readable by other users"), "{msg}");
    }

    #[test]
    fn the_chat_llm_section_is_checked_and_its_key_read_from_file_or_env() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("flotilla.toml");
        let key = dir.path().join("llm-key");
        secret_file(&key, "sk-from-file\n");
        std::fs::write(
            &f,
            format!(
                "[chat.llm]\nenabled = true\nbase_url = \"http://localhost:11434/v1/\"\n\
                 model = \"llama3.1\"\napi_key_file = {:?}\nmax_steps = 3\n",
                key
            ),
        )
        .unwrap();
        let c = Config::load(Some(&f), []).unwrap();
        let l = c.validate().unwrap().llm.unwrap();
        assert_eq!(l.base_url, "http://localhost:11434/v1");
        assert_eq!((l.model.as_str(), l.max_steps), ("llama3.1", 3));
        assert_eq!(l.api_key.as_deref(), Some("sk-from-file"));
        assert!(
            !format!("{l:?}").contains("sk-from-file"),
            "Debug hides the key"
        );
        assert!(c
            .warnings()
            .iter()
            .any(|w| w.contains("LLM planner is not used")));
        // The key given twice is refused; from the environment alone it is read; none is allowed.
        let c = Config::load(Some(&f), [env("FLOTILLA_CHAT_LLM_API_KEY", "sk-env")]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("given twice: chat.llm.api_key_file and FLOTILLA_CHAT_LLM_API_KEY"),
            "{err}"
        );
        assert!(!c.to_toml().contains("sk-env"));
        let mut c = c;
        c.chat.llm.api_key_file = None;
        assert_eq!(
            c.validate().unwrap().llm.unwrap().api_key.as_deref(),
            Some("sk-env")
        );
        c.env_secrets.chat_llm_api_key = None;
        assert_eq!(c.validate().unwrap().llm.unwrap().api_key, None);
        // Every bad value is named at once.
        c.chat.llm.base_url = "localhost:11434".into();
        c.chat.llm.model = " ".into();
        c.chat.llm.max_steps = 0;
        c.chat.llm.timeout_s = 60;
        c.chat.llm.deadline_s = 30;
        c.chat.llm.api_version = Some("2024-10-21".into());
        let err = c.validate().unwrap_err().to_string();
        for want in [
            "chat.llm.base_url",
            "chat.llm.model",
            "chat.llm.max_steps = 0",
            "timeout_s <= deadline_s",
            "api_version is only used with flavor = \"azure\"",
        ] {
            assert!(err.contains(want), "{want}: {err}");
        }
        // Off: nothing checked.
        c.chat.llm.enabled = false;
        assert!(c.validate().unwrap().llm.is_none());
    }

    #[test]
    fn the_chat_listener_is_off_unless_a_gateway_is_enabled() {
        let v = Config::default().validate().unwrap();
        assert_eq!((v.chat_addr, v.slack.is_none()), (None, true));
        let mut c = Config::default();
        c.chat.listen = Some("127.0.0.1:8443".into());
        let v = c.validate().unwrap();
        assert_eq!(v.chat_addr, None);
        assert!(
            c.warnings()[0].contains("chat listener stays off"),
            "{:?}",
            c.warnings()
        );
    }

    #[test]
    fn teams_needs_a_listener_an_app_id_and_its_password_once() {
        let mut c = Config::default();
        c.chat.teams.enabled = true;
        c.chat.teams.openid_metadata_url = "login.botframework.com".into();
        c.chat.teams.confirm_expiry_s = 0;
        let err = c.validate().unwrap_err().to_string();
        for want in [
            "chat.teams is enabled but chat.listen is not set",
            "chat.teams.app_id must be set",
            "chat.teams.openid_metadata_url",
            "chat.teams.confirm_expiry_s 0",
            "the Teams app password is missing: set chat.teams.app_password_file or FLOTILLA_TEAMS_APP_PASSWORD",
        ] {
            assert!(err.contains(want), "{want:?} not in {err}");
        }
        let env = [
            ("FLOTILLA_CHAT_LISTEN", "127.0.0.1:0"),
            ("FLOTILLA_TEAMS_ENABLED", "true"),
            ("FLOTILLA_TEAMS_APP_ID", "app-1"),
            ("FLOTILLA_TEAMS_TENANT", "contoso.onmicrosoft.com"),
            ("FLOTILLA_TEAMS_APP_PASSWORD", "s3cret-pw"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let c = Config::load(None, env).unwrap();
        let v = c.validate().unwrap();
        let t = v.teams.clone().unwrap();
        assert_eq!(
            (t.app_id.as_str(), t.app_password.as_str()),
            ("app-1", "s3cret-pw")
        );
        assert_eq!(
            t.token_url,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert!(v.chat_addr.is_some());
        let shown = format!("{} {:?} {:?}", c.to_toml(), c, t);
        assert!(!shown.contains("s3cret-pw"), "the password is never shown");
    }

    #[test]
    fn discord_needs_a_listener_an_application_a_public_key_and_its_token_once() {
        let mut c = Config::default();
        c.chat.discord.enabled = true;
        c.chat.discord.application_id = "my-app".into();
        c.chat.discord.public_key = "abcd".into();
        c.chat.discord.api_url = "discord.com/api/v10".into();
        c.chat.discord.confirm_expiry_s = 0;
        let err = c.validate().unwrap_err().to_string();
        for want in [
            "chat.discord is enabled but chat.listen is not set",
            "chat.discord.application_id \"my-app\" must be the application's id",
            "chat.discord.public_key: the Discord public key must be 64 hex digits",
            "chat.discord.api_url",
            "chat.discord.confirm_expiry_s 0",
            "the Discord bot token is missing: set chat.discord.bot_token_file or FLOTILLA_DISCORD_BOT_TOKEN",
        ] {
            assert!(err.contains(want), "{want:?} not in {err}");
        }
        let key = "ab".repeat(32);
        let env = [
            ("FLOTILLA_CHAT_LISTEN", "127.0.0.1:0"),
            ("FLOTILLA_DISCORD_ENABLED", "true"),
            ("FLOTILLA_DISCORD_APPLICATION_ID", "900000000000000001"),
            ("FLOTILLA_DISCORD_PUBLIC_KEY", key.as_str()),
            ("FLOTILLA_DISCORD_BOT_TOKEN", "bot-s3cret-token"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let c = Config::load(None, env).unwrap();
        let v = c.validate().unwrap();
        let d = v.discord.clone().unwrap();
        assert_eq!(
            (d.application_id.as_str(), d.bot_token.as_str()),
            ("900000000000000001", "bot-s3cret-token")
        );
        assert_eq!(d.api_url, "https://discord.com/api/v10");
        assert!(v.chat_addr.is_some());
        let shown = format!("{} {:?} {:?}", c.to_toml(), c, d);
        assert!(
            !shown.contains("bot-s3cret-token"),
            "the token is never shown"
        );
    }

    #[test]
    fn slack_needs_a_listener_and_each_secret_exactly_once() {
        let mut c = Config::default();
        c.chat.slack.enabled = true;
        c.chat.slack.api_url = "slack.com".into();
        c.chat.slack.confirm_expiry_s = 0;
        let msg = c.validate().unwrap_err().to_string();
        for needle in [
            "chat.listen is not set",
            "chat.slack.confirm_expiry_s 0 must be between 1 and 3600 seconds",
            "the Slack signing secret is missing: set chat.slack.signing_secret_file or FLOTILLA_SLACK_SIGNING_SECRET",
            "the Slack bot token is missing",
            "chat.slack.api_url",
        ] {
            assert!(msg.contains(needle), "{needle} missing from: {msg}");
        }
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("signing-secret");
        secret_file(&secret, "8f742231b10e8888abcd99yyyzzz85a5\n");
        let empty = dir.path().join("empty");
        secret_file(&empty, "\n");
        // Both sources for the secret, an empty token file, the API's own address.
        let mut c = Config::load(
            None,
            [
                env("FLOTILLA_SLACK_ENABLED", "true"),
                env("FLOTILLA_CHAT_LISTEN", "127.0.0.1:8080"),
                env(
                    "FLOTILLA_SLACK_SIGNING_SECRET_FILE",
                    secret.to_str().unwrap(),
                ),
                env("FLOTILLA_SLACK_SIGNING_SECRET", "from-env"),
                env("FLOTILLA_SLACK_BOT_TOKEN_FILE", empty.to_str().unwrap()),
            ],
        )
        .unwrap();
        let msg = c.validate().unwrap_err().to_string();
        for needle in [
            "given twice: chat.slack.signing_secret_file and FLOTILLA_SLACK_SIGNING_SECRET",
            "chat.slack.bot_token_file",
            "is empty",
            "chat.listen and api.listen are both 127.0.0.1:8080",
        ] {
            assert!(msg.contains(needle), "{needle} missing from: {msg}");
        }
        assert!(!msg.contains("from-env"), "{msg}");
        // One source each: valid, the secrets read, and never in the printed configuration.
        c.env_secrets.slack_signing_secret = None;
        c.env_secrets.slack_bot_token = Some(Secret("xoxb-1-2-abc".into()));
        c.chat.slack.bot_token_file = None;
        c.chat.listen = Some("0.0.0.0:8443".into());
        let v = c.validate().unwrap();
        assert_eq!(v.chat_addr.unwrap().port(), 8443);
        let slack = v.slack.unwrap();
        assert!(matches!(
            &slack.transport,
            SlackTransport::Http { signing_secret } if signing_secret == "8f742231b10e8888abcd99yyyzzz85a5"
        ));
        assert_eq!(slack.bot_token, "xoxb-1-2-abc");
        assert_eq!(slack.api_url, "https://slack.com/api");
        let shown = format!("{} {:?} {:?}", c.to_toml(), c, slack);
        assert!(
            !shown.contains("xoxb-1-2-abc") && !shown.contains("8f742231"),
            "{shown}"
        );
        // A user token where the bot token belongs.
        c.env_secrets.slack_bot_token = Some(Secret("xoxp-user".into()));
        assert!(c.validate().unwrap_err().to_string().contains("xoxb-"));
    }

    #[test]
    fn socket_mode_needs_the_app_token_and_no_listener() {
        let mut c = Config::default();
        c.chat.slack.enabled = true;
        c.env_secrets.slack_bot_token = Some(Secret("xoxb-1-2-abc".into()));
        let env = [("FLOTILLA_SLACK_MODE".to_string(), "socket".to_string())];
        let mut c2 = Config::load(None, env).unwrap();
        assert_eq!(c2.chat.slack.mode, SlackMode::Socket);
        c2.chat.slack.enabled = true;
        c2.env_secrets.slack_bot_token = c.env_secrets.slack_bot_token.clone();
        let msg = c2.validate().unwrap_err().to_string();
        assert!(
            msg.contains("the Slack app-level token is missing: set chat.slack.app_token_file or FLOTILLA_SLACK_APP_TOKEN"),
            "{msg}"
        );
        assert!(!msg.contains("chat.listen"), "{msg}");
        assert!(!msg.contains("signing secret"), "{msg}");
        c2.env_secrets.slack_app_token = Some(Secret("xoxb-not-an-app-token".into()));
        assert!(c2.validate().unwrap_err().to_string().contains("xapp-"));
        c2.env_secrets.slack_app_token = Some(Secret("xapp-1-A1-2-secret".into()));
        let v = c2.validate().unwrap();
        assert_eq!(v.chat_addr, None);
        let slack = v.slack.unwrap();
        assert!(
            matches!(&slack.transport, SlackTransport::Socket { app_token } if app_token == "xapp-1-A1-2-secret")
        );
        let shown = format!("{} {:?} {:?}", c2.to_toml(), c2, slack);
        assert!(!shown.contains("xapp-1-A1-2-secret"), "{shown}");
        assert!(shown.contains("socket"), "{shown}");
        c2.chat.listen = Some("127.0.0.1:8443".into());
        assert!(c2.warnings().iter().any(|w| w.contains("Socket Mode")));
        // A mode that does not exist is refused by name.
        let bad = Config::load(
            None,
            [(
                "FLOTILLA_SLACK_MODE".to_string(),
                "carrier-pigeon".to_string(),
            )],
        );
        assert!(bad.unwrap_err().to_string().contains("carrier-pigeon"));
    }
}
