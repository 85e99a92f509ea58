//! Planners: a chat message (and the thread's state) → a [`Plan`]: one call of an MCP tool by
//! its name with the JSON arguments that tool takes, a chat-local action, or a question back.
//!
//! The rule planner ([`rules`]) is the default: offline and deterministic. It never guesses a
//! state-changing call: when it cannot tell the target it asks back, with what it understood
//! and two commands that would work.
//!
//! The LLM planner ([`llm`]) is optional and consulted only for what the rule planner asks
//! back about: deterministic hits stay deterministic, and the model never sees a message the
//! grammar already understood (or refused).

pub mod llm;
pub mod rules;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The tools whose calls change the fleet; every call of one goes through a confirmation.
pub const MUTATING_TOOLS: &[&str] = &["command_queue", "remote_config_push", "command_cancel"];

/// What a thread remembers between messages, so follow-ups ("restart them", "what happened to
/// it?") have a meaning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ThreadContext {
    /// The last search's query (what "them" means).
    pub last_query: Option<String>,
    /// The uids the last search or lookup showed (one uid: "it", "restart it").
    pub last_agents: Vec<String>,
    /// The last command or batch queued in this thread.
    pub last_command: Option<String>,
    pub last_batch: Option<String>,
}

/// Chat-local actions: they touch the gateway's own state, not the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Local {
    Help,
    /// Post fleet events matching `query` (of the kinds in `events`, all if empty) here.
    Subscribe {
        query: String,
        events: Vec<String>,
    },
    Subscriptions,
    Unsubscribe {
        id: String,
    },
}

/// A planner's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "plan")]
pub enum Plan {
    /// Call this MCP tool with these arguments (as `tools/call` takes them).
    Tool {
        tool: String,
        args: Value,
    },
    Local(Local),
    /// Not sure: what was understood, and two commands that would work.
    AskBack {
        understood: String,
        suggestions: Vec<String>,
    },
    /// Will not do it: why, and two commands that would work.
    Refuse {
        reason: String,
        suggestions: Vec<String>,
    },
}

impl Plan {
    pub fn tool(tool: &str, args: Value) -> Plan {
        Plan::Tool {
            tool: tool.to_string(),
            args,
        }
    }

    /// Whether running the plan changes the fleet (and so needs a confirmation).
    pub fn is_mutating(&self) -> bool {
        matches!(self, Plan::Tool { tool, .. } if MUTATING_TOOLS.contains(&tool.as_str()))
    }
}
