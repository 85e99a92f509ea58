//! A scripted OpAMP agent over plain HTTP, for tests that need exact control of every message
//! (which sequence number, when it polls, what it reports) across server restarts.

use std::time::Duration;

use flotilla_proto::{
    kv_str, AgentCapabilities, AgentConfigFile, AgentConfigMap, AgentDescription, AgentToServer,
    ComponentHealth, CustomCapabilities, EffectiveConfig, Message, RemoteConfigStatus,
    ServerToAgent,
};
use uuid::Uuid;

/// fluent-opamp's ChatOps custom capability (what the server's `chatops` kind needs).
pub const CAP_CHATOPS: &str = "org.mp3monster.opamp_provider.chatopcommand";

/// ServerToAgentFlags.ReportFullState.
pub const REPORT_FULL_STATE: u64 = 1;

/// Capabilities of [`HttpAgent::fluent_like`]: ReportsStatus, AcceptsRemoteConfig,
/// ReportsEffectiveConfig, AcceptsRestartCommand, ReportsHealth, ReportsRemoteConfig,
/// ReportsHeartbeat.
pub const FLUENT_LIKE_CAPS: u64 = AgentCapabilities::ReportsStatus as u64
    | AgentCapabilities::AcceptsRemoteConfig as u64
    | AgentCapabilities::ReportsEffectiveConfig as u64
    | AgentCapabilities::AcceptsRestartCommand as u64
    | AgentCapabilities::ReportsHealth as u64
    | AgentCapabilities::ReportsRemoteConfig as u64
    | AgentCapabilities::ReportsHeartbeat as u64;

/// An agent that speaks OpAMP over HTTP POST, one message per call, numbering them itself.
pub struct HttpAgent {
    pub uid: Uuid,
    /// The sequence number the next message will carry.
    pub next_seq: u64,
    pub capabilities: u64,
    pub endpoint: String,
    /// `service.name` (identifying).
    pub name: String,
    /// Health start time; bump it to simulate a restart.
    pub start_time_unix_nano: u64,
    http: reqwest::Client,
}

impl HttpAgent {
    /// A Fluent-Bit-like agent named `name` with [`FLUENT_LIKE_CAPS`] and a fresh UUIDv7.
    pub fn fluent_like(endpoint: &str, name: &str) -> HttpAgent {
        HttpAgent {
            uid: Uuid::now_v7(),
            next_seq: 0,
            capabilities: FLUENT_LIKE_CAPS,
            endpoint: endpoint.to_string(),
            name: name.to_string(),
            start_time_unix_nano: now_ns(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("reqwest client"),
        }
    }

    /// The uid in canonical UUID form (what the REST API uses).
    pub fn uid_str(&self) -> String {
        self.uid.to_string()
    }

    /// Identifying `service.name`, `service.type`, `service.version`; non-identifying
    /// `host.name`, `os.type`.
    pub fn description(&self) -> AgentDescription {
        AgentDescription {
            identifying_attributes: vec![
                kv_str("service.name", &self.name),
                kv_str("service.type", "fluentbit"),
                kv_str("service.version", "5.1.1"),
            ],
            non_identifying_attributes: vec![
                kv_str("host.name", &format!("{}-host", self.name)),
                kv_str("os.type", "linux"),
            ],
        }
    }

    /// A healthy top-level health report.
    pub fn health(&self) -> ComponentHealth {
        ComponentHealth {
            healthy: true,
            start_time_unix_nano: self.start_time_unix_nano,
            status: "running".into(),
            status_time_unix_nano: now_ns(),
            ..Default::default()
        }
    }

    /// Everything the agent knows: description, health, effective config, remote config
    /// status (none received yet) and custom capabilities (ChatOps).
    pub fn full_state(&self) -> AgentToServer {
        let mut files = std::collections::HashMap::new();
        files.insert(
            "fluent-bit.conf".to_string(),
            AgentConfigFile {
                body: b"[SERVICE]\n    flush 1\n".to_vec(),
                content_type: "text/plain".into(),
            },
        );
        AgentToServer {
            agent_description: Some(self.description()),
            health: Some(self.health()),
            effective_config: Some(EffectiveConfig {
                config_map: Some(AgentConfigMap { config_map: files }),
            }),
            remote_config_status: Some(RemoteConfigStatus::default()),
            custom_capabilities: Some(CustomCapabilities {
                capabilities: vec![CAP_CHATOPS.to_string()],
            }),
            ..Default::default()
        }
    }

    /// A heartbeat: nothing but uid, sequence number and capabilities.
    pub fn heartbeat(&self) -> AgentToServer {
        AgentToServer::default()
    }

    /// Sends `msg` with this agent's uid, next sequence number and capabilities filled in;
    /// panics unless the server answers 200 `application/x-protobuf` with a decodable
    /// ServerToAgent addressed to this uid.
    pub async fn send(&mut self, mut msg: AgentToServer) -> ServerToAgent {
        msg.instance_uid = self.uid.as_bytes().to_vec();
        msg.sequence_num = self.next_seq;
        msg.capabilities = self.capabilities;
        self.next_seq += 1;
        let resp = self
            .http
            .post(&self.endpoint)
            .header("Content-Type", "application/x-protobuf")
            .body(msg.encode_to_vec())
            .send()
            .await
            .unwrap_or_else(|e| panic!("OpAMP POST {}: {e}", self.endpoint));
        let status = resp.status();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = resp.bytes().await.expect("OpAMP response body");
        assert!(
            status.is_success(),
            "OpAMP POST answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(ctype, "application/x-protobuf", "OpAMP response type");
        let reply = ServerToAgent::decode(body.as_ref()).expect("decodable ServerToAgent");
        assert_eq!(
            reply.instance_uid,
            self.uid.as_bytes().to_vec(),
            "ServerToAgent.instance_uid must be the agent's uid"
        );
        reply
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
