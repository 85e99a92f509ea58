//! Discord interaction payloads (already verified) → what the core understands: `PING`, the
//! `/flotilla` application command (its sub-command and options become the rule planner's
//! words), and message components (buttons, `custom_id` = `action:value`).
//!
//! Shapes follow Discord's "Interactions → Receiving and Responding" reference: `type` 1 PING,
//! 2 APPLICATION_COMMAND, 3 MESSAGE_COMPONENT; in a guild the user is `member.user` with the
//! member's `roles`, in a DM it is `user`.

use serde_json::Value;

use super::commands::{self, BadInvocation};
use crate::core::types::{ChatUser, ConversationRef, Incoming, IncomingKind, MessageRef, Platform};

/// The `workspace` of a conversation outside any guild (DMs).
pub const NO_GUILD: &str = "dm";

const PING: u64 = 1;
const APPLICATION_COMMAND: u64 = 2;
const MESSAGE_COMPONENT: u64 = 3;
const BUTTON: u64 = 2;

/// A verified interaction, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Discord checking the endpoint: answered with PONG.
    Ping,
    /// A command or a button press for the core.
    Turn(Box<Turn>),
}

/// One interaction for the core, with what answering it later needs.
#[derive(Clone, PartialEq, Eq)]
pub struct Turn {
    pub incoming: Incoming,
    /// The interaction's id (also the core's delivery id, prefixed).
    pub id: String,
    pub application_id: String,
    /// The interaction token: valid 15 minutes for the webhook (edits and follow-ups). Never
    /// logged.
    pub token: String,
    /// A button press (its response edits the message the button is on).
    pub component: bool,
}

impl std::fmt::Debug for Turn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turn")
            .field("incoming", &self.incoming)
            .field("id", &self.id)
            .field("application_id", &self.application_id)
            .field("token", &"<redacted>")
            .field("component", &self.component)
            .finish()
    }
}

/// Why a payload was refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("the body is not a JSON object: {0}")]
    Json(String),
    #[error("interaction without {0}")]
    Missing(&'static str),
    #[error("interaction type {0} is not handled")]
    Type(u64),
    #[error("{0}")]
    Command(#[from] BadInvocation),
    #[error("component type {0} is not a button")]
    Component(u64),
    #[error("button custom_id is not action:value")]
    CustomId,
}

fn text<'a>(v: &'a Value, field: &'static str) -> Result<&'a str, Malformed> {
    v[field]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or(Malformed::Missing(field))
}

/// Reads one interaction body.
pub fn interaction(body: &[u8]) -> Result<Parsed, Malformed> {
    let v: Value = serde_json::from_slice(body).map_err(|e| Malformed::Json(e.to_string()))?;
    if !v.is_object() {
        return Err(Malformed::Json("not an object".into()));
    }
    let kind = v["type"].as_u64().ok_or(Malformed::Missing("type"))?;
    if kind == PING {
        return Ok(Parsed::Ping);
    }
    if kind != APPLICATION_COMMAND && kind != MESSAGE_COMPONENT {
        return Err(Malformed::Type(kind));
    }
    let id = text(&v, "id")?.to_string();
    let application_id = text(&v, "application_id")?.to_string();
    let token = text(&v, "token")?.to_string();
    let channel = v["channel_id"]
        .as_str()
        .or(v["channel"]["id"].as_str())
        .filter(|s| !s.is_empty())
        .ok_or(Malformed::Missing("channel_id"))?;
    let guild = v["guild_id"].as_str().filter(|s| !s.is_empty());
    let (u, groups) = match guild {
        Some(_) => (
            &v["member"]["user"],
            v["member"]["roles"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect(),
        ),
        None => (&v["user"], Vec::new()),
    };
    let user_id = u["id"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or(Malformed::Missing("user.id"))?;
    let name = u["global_name"]
        .as_str()
        .or(u["username"].as_str())
        .unwrap_or(user_id);
    let conversation = ConversationRef {
        platform: Platform::Discord,
        workspace: guild.unwrap_or(NO_GUILD).to_string(),
        channel: channel.to_string(),
        thread: None,
    };
    let data = &v["data"];
    let kind = if kind == APPLICATION_COMMAND {
        IncomingKind::Command {
            text: commands::planner_text(data)?,
        }
    } else {
        let ct = data["component_type"].as_u64().unwrap_or(0);
        if ct != BUTTON {
            return Err(Malformed::Component(ct));
        }
        let (action, value) = data["custom_id"]
            .as_str()
            .and_then(|c| c.split_once(':'))
            .ok_or(Malformed::CustomId)?;
        let message = v["message"]["id"].as_str().map(|m| MessageRef {
            conversation: conversation.clone(),
            id: m.to_string(),
        });
        IncomingKind::Action {
            action_id: action.to_string(),
            value: value.to_string(),
            message,
        }
    };
    let component = matches!(kind, IncomingKind::Action { .. });
    Ok(Parsed::Turn(Box::new(Turn {
        incoming: Incoming {
            conversation,
            user: ChatUser {
                id: user_id.to_string(),
                name: name.to_string(),
                groups,
            },
            kind,
            delivery_id: Some(format!("discord:{id}")),
        },
        id,
        application_id,
        token,
        component,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn guild_command(opts: Value) -> Value {
        json!({"id": "1100", "application_id": "900", "type": 2, "token": "tok",
            "version": 1, "guild_id": "G1", "channel_id": "C1",
            "member": {"user": {"id": "U1", "username": "ada", "global_name": "Ada"},
                       "roles": ["R1", "R2"], "nick": null},
            "data": {"id": "55", "name": "flotilla", "type": 1, "options": opts}})
    }

    #[test]
    fn a_guild_command_names_the_member_roles_and_the_planner_text() {
        let body = guild_command(json!([{"name": "restart", "type": 1,
            "options": [{"name": "target", "type": 3, "value": "web-1"}]}]));
        let Parsed::Turn(t) = interaction(body.to_string().as_bytes()).unwrap() else {
            panic!("a turn")
        };
        assert_eq!(t.incoming.conversation.workspace, "G1");
        assert_eq!(t.incoming.conversation.channel, "C1");
        assert_eq!(t.incoming.user.name, "Ada");
        assert_eq!(t.incoming.user.groups, vec!["R1", "R2"]);
        assert_eq!(
            t.incoming.kind,
            IncomingKind::Command {
                text: "restart web-1".into()
            }
        );
        assert_eq!(t.incoming.delivery_id.as_deref(), Some("discord:1100"));
        assert!(
            !format!("{t:?}").contains("tok\""),
            "the token is not printed"
        );
    }

    #[test]
    fn a_button_in_a_dm_carries_its_message() {
        let body = json!({"id": "1101", "application_id": "900", "type": 3, "token": "t2",
            "channel_id": "D9", "user": {"id": "U2", "username": "bob"},
            "message": {"id": "M7", "channel_id": "D9"},
            "data": {"component_type": 2, "custom_id": "flotilla_confirm:abc"}});
        let Parsed::Turn(t) = interaction(body.to_string().as_bytes()).unwrap() else {
            panic!("a turn")
        };
        assert!(t.component);
        assert_eq!(t.incoming.conversation.workspace, NO_GUILD);
        assert_eq!(t.incoming.user.name, "bob");
        match t.incoming.kind {
            IncomingKind::Action {
                action_id,
                value,
                message,
            } => {
                assert_eq!(
                    (action_id.as_str(), value.as_str()),
                    ("flotilla_confirm", "abc")
                );
                assert_eq!(message.unwrap().id, "M7");
            }
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn ping_and_malformed() {
        assert_eq!(interaction(br#"{"type":1}"#).unwrap(), Parsed::Ping);
        assert!(matches!(interaction(b"[1]"), Err(Malformed::Json(_))));
        assert!(matches!(interaction(b"{"), Err(Malformed::Json(_))));
        assert_eq!(interaction(br#"{"type":4}"#), Err(Malformed::Type(4)));
        let mut no_token = guild_command(json!([{"name": "summary", "type": 1}]));
        no_token.as_object_mut().unwrap().remove("token");
        assert_eq!(
            interaction(no_token.to_string().as_bytes()),
            Err(Malformed::Missing("token"))
        );
        let bad = guild_command(json!([{"name": "rm", "type": 1}]));
        assert!(matches!(
            interaction(bad.to_string().as_bytes()),
            Err(Malformed::Command(_))
        ));
    }
}
