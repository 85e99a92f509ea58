//! Merging an `AgentToServer` status report into the registry record, honouring status
//! compression: a sub-message that is absent means "unchanged", never "cleared".

use std::collections::BTreeMap;

use base64::Engine;
use flotilla_proto::{
    any_value_to_string, AgentConfigMap, AgentToServer, ComponentHealth, KeyValue,
    RemoteConfigStatus,
};

use crate::model::{Agent, ConfigFile, ConfigFiles, Health, RemoteConfigState};

/// True if the message reports status the registry keeps (as opposed to a pure heartbeat).
/// `capabilities` counts only when it is non-zero and differs from what we know: many agents
/// repeat it in every heartbeat, and 0 means "not sent" (fluent-opamp defect #6).
pub fn reports_status(msg: &AgentToServer, known_caps: u64) -> bool {
    msg.agent_description.is_some()
        || msg.health.is_some()
        || msg.effective_config.is_some()
        || msg.remote_config_status.is_some()
        || msg.custom_capabilities.is_some()
        || (msg.capabilities != 0 && msg.capabilities != known_caps)
}

/// Applies what `msg` reports to `agent`. Liveness and connection fields are the caller's.
pub fn merge_status(agent: &mut Agent, msg: &AgentToServer) {
    if let Some(d) = &msg.agent_description {
        agent.identifying = attrs(&d.identifying_attributes);
        agent.non_identifying = attrs(&d.non_identifying_attributes);
    }
    // 0 is "unchanged": a full report that sets capabilities replaces them, an omission never
    // clears them.
    if msg.capabilities != 0 {
        agent.capabilities = msg.capabilities;
    }
    if let Some(h) = &msg.health {
        agent.health = Some(health(h));
    }
    if let Some(ec) = &msg.effective_config {
        agent.effective_config = Some(config_files(ec.config_map.as_ref()));
    }
    if let Some(r) = &msg.remote_config_status {
        agent.remote_config_status = Some(remote_config_state(r));
    }
    if let Some(cc) = &msg.custom_capabilities {
        agent.custom_capabilities = cc.capabilities.clone();
    }
}

/// Attributes in reported order, values rendered as strings.
pub fn attrs(kvs: &[KeyValue]) -> Vec<(String, String)> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value
                    .as_ref()
                    .map(any_value_to_string)
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// The health tree. Depth is bounded by prost's decode recursion limit, so recursion is safe.
pub fn health(h: &ComponentHealth) -> Health {
    Health {
        healthy: h.healthy,
        start_time_unix_nano: h.start_time_unix_nano,
        last_error: h.last_error.clone(),
        status: h.status.clone(),
        status_time_unix_nano: h.status_time_unix_nano,
        components: h
            .component_health_map
            .iter()
            .map(|(k, v)| (k.clone(), health(v)))
            .collect(),
        attributes: attrs(&h.attributes).into_iter().collect::<BTreeMap<_, _>>(),
    }
}

/// Config files; UTF-8 bodies as text, anything else base64 with `encoding: "base64"`.
pub fn config_files(map: Option<&AgentConfigMap>) -> ConfigFiles {
    let Some(map) = map else {
        return ConfigFiles::new();
    };
    map.config_map
        .iter()
        .map(|(name, f)| {
            let file = match std::str::from_utf8(&f.body) {
                Ok(text) => ConfigFile {
                    content_type: f.content_type.clone(),
                    body: text.to_string(),
                    encoding: None,
                },
                Err(_) => ConfigFile {
                    content_type: f.content_type.clone(),
                    body: base64::engine::general_purpose::STANDARD.encode(&f.body),
                    encoding: Some("base64".into()),
                },
            };
            (name.clone(), file)
        })
        .collect()
}

/// `RemoteConfigStatus` as stored: hash in hex, status as its lowercase name.
pub fn remote_config_state(r: &RemoteConfigStatus) -> RemoteConfigState {
    RemoteConfigState {
        hash: hex::encode(&r.last_remote_config_hash),
        status: match r.status {
            0 => "unset",
            1 => "applied",
            2 => "applying",
            3 => "failed",
            _ => "unknown",
        }
        .into(),
        error: r.error_message.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{kv_str, AgentConfigFile, AgentDescription, EffectiveConfig};
    use uuid::Uuid;

    #[test]
    fn omitted_parts_keep_their_value() {
        let mut a = Agent::new(Uuid::now_v7(), 1, 30);
        let full = AgentToServer {
            capabilities: 0x801,
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![kv_str("service.name", "fb")],
                non_identifying_attributes: vec![],
            }),
            health: Some(ComponentHealth {
                healthy: true,
                component_health_map: [(
                    "in".to_string(),
                    ComponentHealth {
                        healthy: false,
                        last_error: "x".into(),
                        ..Default::default()
                    },
                )]
                .into_iter()
                .collect(),
                ..Default::default()
            }),
            effective_config: Some(EffectiveConfig {
                config_map: Some(AgentConfigMap {
                    config_map: [
                        (
                            "a".to_string(),
                            AgentConfigFile {
                                body: b"text".to_vec(),
                                content_type: "text/plain".into(),
                            },
                        ),
                        (
                            "b".to_string(),
                            AgentConfigFile {
                                body: vec![0xff, 0xfe],
                                content_type: String::new(),
                            },
                        ),
                    ]
                    .into_iter()
                    .collect(),
                }),
            }),
            remote_config_status: Some(RemoteConfigStatus {
                last_remote_config_hash: vec![0xab],
                status: 3,
                error_message: "bad".into(),
            }),
            ..Default::default()
        };
        assert!(reports_status(&full, 0));
        merge_status(&mut a, &full);
        let snapshot = a.clone();
        assert_eq!(a.health.as_ref().unwrap().components["in"].last_error, "x");
        let ec = a.effective_config.as_ref().unwrap();
        assert_eq!(ec["a"].body, "text");
        assert_eq!(ec["b"].encoding.as_deref(), Some("base64"));
        assert_eq!(a.remote_config_status.as_ref().unwrap().hash, "ab");
        assert_eq!(a.remote_config_status.as_ref().unwrap().status, "failed");

        let heartbeat = AgentToServer {
            capabilities: 0,
            ..Default::default()
        };
        assert!(!reports_status(&heartbeat, 0x801));
        merge_status(&mut a, &heartbeat);
        assert_eq!(a, snapshot);
        let same_caps = AgentToServer {
            capabilities: 0x801,
            ..Default::default()
        };
        assert!(!reports_status(&same_caps, 0x801));
        assert!(reports_status(&same_caps, 0x1));
    }
}
