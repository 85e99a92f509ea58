//! The supervisor's live picture of the agent (process, last probe, crash state), shared by
//! the core, the remote-config job and the local /healthz listener.

use std::sync::{Arc, Mutex};

use crate::fluent::Probe;

#[derive(Debug, Clone, Default)]
pub struct AgentView {
    /// Pid of the running agent process (0 when not running).
    pub pid: i32,
    /// Real start time of that process, ns since the epoch (0 when not running).
    pub start_time_ns: u64,
    pub running: bool,
    /// Count of unexpected exits since the supervisor started (the config health gate watches it).
    pub unexpected_exits: u64,
    /// Why the agent last died unexpectedly (cleared once it is healthy again).
    pub exit_error: Option<String>,
    /// Set while the agent keeps dying.
    pub crash_loop: Option<String>,
    /// The last probe of the agent's API since the current process started.
    pub probe: Option<Probe>,
    /// Version reported by the agent (API) or `--version`.
    pub version: Option<String>,
    /// The supervisor asked it to stop (shutdown).
    pub stopping: bool,
    /// A failed config could not be rolled back: its files are still on disk and automatic
    /// restarts stay held until last-known-good is back (why, for health).
    pub rollback_stuck: Option<String>,
}

pub type SharedView = Arc<Mutex<AgentView>>;
