//! Capability and flag bit helpers, so callers test bits by name instead of by number.

use crate::{AgentCapabilities, AgentToServerFlags, ServerCapabilities, ServerToAgentFlags};

/// True if `bits` has the agent capability `cap` set.
pub fn agent_has(bits: u64, cap: AgentCapabilities) -> bool {
    bits & cap as u64 != 0
}

/// True if `bits` has the server capability `cap` set.
pub fn server_has(bits: u64, cap: ServerCapabilities) -> bool {
    bits & cap as u64 != 0
}

/// True if the agent asked the server to assign it an instance uid.
pub fn requests_instance_uid(flags: u64) -> bool {
    flags & AgentToServerFlags::RequestInstanceUid as u64 != 0
}

/// True if the server asked for a full state report.
pub fn report_full_state(flags: u64) -> bool {
    flags & ServerToAgentFlags::ReportFullState as u64 != 0
}

/// Mask of every agent capability bit defined by OpAMP v1; other bits MUST be 0.
pub const AGENT_CAPABILITIES_DEFINED: u64 = 0xffff;

/// Every defined agent capability with its stable name (the proto's, without prefix).
pub const AGENT_CAPABILITY_NAMES: &[(AgentCapabilities, &str)] = &[
    (AgentCapabilities::ReportsStatus, "ReportsStatus"),
    (
        AgentCapabilities::AcceptsRemoteConfig,
        "AcceptsRemoteConfig",
    ),
    (
        AgentCapabilities::ReportsEffectiveConfig,
        "ReportsEffectiveConfig",
    ),
    (AgentCapabilities::AcceptsPackages, "AcceptsPackages"),
    (
        AgentCapabilities::ReportsPackageStatuses,
        "ReportsPackageStatuses",
    ),
    (AgentCapabilities::ReportsOwnTraces, "ReportsOwnTraces"),
    (AgentCapabilities::ReportsOwnMetrics, "ReportsOwnMetrics"),
    (AgentCapabilities::ReportsOwnLogs, "ReportsOwnLogs"),
    (
        AgentCapabilities::AcceptsOpAmpConnectionSettings,
        "AcceptsOpAMPConnectionSettings",
    ),
    (
        AgentCapabilities::AcceptsOtherConnectionSettings,
        "AcceptsOtherConnectionSettings",
    ),
    (
        AgentCapabilities::AcceptsRestartCommand,
        "AcceptsRestartCommand",
    ),
    (AgentCapabilities::ReportsHealth, "ReportsHealth"),
    (
        AgentCapabilities::ReportsRemoteConfig,
        "ReportsRemoteConfig",
    ),
    (AgentCapabilities::ReportsHeartbeat, "ReportsHeartbeat"),
    (
        AgentCapabilities::ReportsAvailableComponents,
        "ReportsAvailableComponents",
    ),
    (
        AgentCapabilities::ReportsConnectionSettingsStatus,
        "ReportsConnectionSettingsStatus",
    ),
];

/// Names of the capabilities set in `bits`, in bit order.
pub fn agent_capability_names(bits: u64) -> Vec<&'static str> {
    AGENT_CAPABILITY_NAMES
        .iter()
        .filter(|(c, _)| agent_has(bits, *c))
        .map(|(_, n)| *n)
        .collect()
}

/// Looks a capability up by name, case-insensitively, with or without the `Accepts`/`Reports`
/// prefix spelled out (e.g. `acceptsrestartcommand`).
pub fn agent_capability_by_name(name: &str) -> Option<AgentCapabilities> {
    AGENT_CAPABILITY_NAMES
        .iter()
        .find(|(_, n)| n.eq_ignore_ascii_case(name))
        .map(|(c, _)| *c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let bits =
            AgentCapabilities::ReportsStatus as u64 | AgentCapabilities::ReportsHealth as u64;
        assert_eq!(
            agent_capability_names(bits),
            vec!["ReportsStatus", "ReportsHealth"]
        );
        assert_eq!(
            agent_capability_by_name("acceptsrestartcommand"),
            Some(AgentCapabilities::AcceptsRestartCommand)
        );
        assert!(agent_has(0x3007, AgentCapabilities::ReportsHeartbeat));
        assert!(!agent_has(0x3007, AgentCapabilities::ReportsHealth));
        assert!(requests_instance_uid(1));
        assert!(report_full_state(1));
        assert!(server_has(0x7, ServerCapabilities::AcceptsEffectiveConfig));
    }
}
