//! Who may do what from chat: platform user ids, user-group ids and per-channel defaults map
//! to Flotilla roles; unknown users get a configurable default (none unless configured);
//! channels can be allow-listed; channels can require a second operator for large fan-outs.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::types::{ChatUser, ConversationRef, Role};

/// The identity configuration of one platform (filled from `[chat.<platform>]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// Platform user id → role; also `<workspace>/<user id>` (a Slack team, a Teams tenant), so
    /// an id can be granted in one workspace only.
    pub users: HashMap<String, Role>,
    /// Platform group id (Slack user group, Discord role, AAD group) → role.
    pub groups: HashMap<String, Role>,
    /// Channel id → the role anyone writing there has at least.
    pub channels: HashMap<String, Role>,
    /// Role of users nobody mapped; `None` (the default) refuses them.
    pub default_role: Option<Role>,
    /// When set, only these channel ids are served.
    pub allowed_channels: Option<HashSet<String>>,
    /// Channel id → fan-out size above which a *different* operator must confirm.
    pub two_person: HashMap<String, u64>,
}

/// Why a user may not act.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("Flotilla does not answer in this channel (it is not on the allow-list)")]
    Channel,
    #[error("you are not mapped to a Flotilla role; ask an admin to add your user id {0}")]
    Unknown(String),
}

impl IdentityConfig {
    /// The highest role the user has from their id, groups and the channel, or the default.
    pub fn role_of(&self, user: &ChatUser, conv: &ConversationRef) -> Result<Role, Denied> {
        if let Some(allowed) = &self.allowed_channels {
            if !allowed.contains(&conv.channel) {
                return Err(Denied::Channel);
            }
        }
        let found = self
            .users
            .get(&user.id)
            .into_iter()
            .chain(self.users.get(&format!("{}/{}", conv.workspace, user.id)))
            .chain(user.groups.iter().filter_map(|g| self.groups.get(g)))
            .chain(self.channels.get(&conv.channel))
            .max()
            .copied();
        found
            .or(self.default_role)
            .ok_or_else(|| Denied::Unknown(user.id.clone()))
    }

    /// The fan-out size above which this channel needs a second operator, if it does.
    pub fn two_person_above(&self, conv: &ConversationRef) -> Option<u64> {
        self.two_person.get(&conv.channel).copied()
    }
}

/// The role a tool needs, as the service checks it (said to the user before asking it).
pub fn role_needed(tool: &str) -> Role {
    if super::planner::MUTATING_TOOLS.contains(&tool) {
        Role::Operator
    } else {
        Role::Viewer
    }
}
