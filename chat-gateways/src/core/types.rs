//! The seam between the conversation core and the platform adapters (Slack, Discord, Teams):
//! what arrives from a platform, what the core answers, and how it posts follow-ups.
//!
//! Kept exactly as agreed in `chat-interface.md`; changes are additive only, because every
//! adapter renders these types in its own idiom.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use flotilla_mcp::FleetBackend;
use serde::{Deserialize, Serialize};

/// The chat platforms a gateway can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Slack,
    Discord,
    Teams,
}

impl Platform {
    /// The audit channel and actor prefix: `slack`, `discord`, `teams`.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Slack => "slack",
            Platform::Discord => "discord",
            Platform::Teams => "teams",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who wrote: the platform's user id, display name and the groups (Slack user groups, Discord
/// roles, AAD groups) the adapter knows them to be in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatUser {
    pub id: String,
    pub name: String,
    pub groups: Vec<String>,
}

/// Where a conversation happens. `thread` is the platform's thread id (Slack `thread_ts`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConversationRef {
    pub platform: Platform,
    pub workspace: String,
    pub channel: String,
    pub thread: Option<String>,
}

/// One posted message (Slack: its `ts`), so it can be updated in place.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MessageRef {
    pub conversation: ConversationRef,
    pub id: String,
}

/// What the user did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IncomingKind {
    /// `/flotilla <text>`.
    Command { text: String },
    /// A mention of the bot in a channel, the mention stripped.
    Mention { text: String },
    /// A direct message.
    Direct { text: String },
    /// A button press.
    Action {
        action_id: String,
        value: String,
        message: Option<MessageRef>,
    },
}

/// One delivery from a platform. `delivery_id` is the platform's id for it (Slack `event_id`
/// or `trigger_id`), so a platform retry never runs an action twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    pub conversation: ConversationRef,
    pub user: ChatUser,
    pub kind: IncomingKind,
    pub delivery_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Style {
    Default,
    Primary,
    Danger,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Button {
    pub action_id: String,
    pub label: String,
    pub value: String,
    pub style: Style,
}

/// One piece of a reply; each adapter renders it natively (Block Kit, embeds, Adaptive Cards).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Block {
    /// Markdown-ish: `*bold*`, `` `code` ``.
    Text(String),
    Fields(Vec<(String, String)>),
    /// A compact table; `more` rows were left out.
    Table {
        columns: Vec<String>,
        rows: Vec<Vec<String>>,
        more: usize,
    },
    Buttons(Vec<Button>),
    Progress {
        total: u64,
        queued: u64,
        sent: u64,
        succeeded: u64,
        failed: u64,
        done: bool,
    },
    /// A small grey footnote.
    Context(String),
}

/// An answer. `ephemeral`: only the user who asked sees it (where the platform can);
/// `replace`: update that message in place instead of posting a new one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Reply {
    pub blocks: Vec<Block>,
    pub ephemeral: bool,
    pub replace: Option<MessageRef>,
}

impl Reply {
    /// One text block.
    pub fn text(text: impl Into<String>) -> Reply {
        Reply {
            blocks: vec![Block::Text(text.into())],
            ephemeral: false,
            replace: None,
        }
    }

    /// The same reply, seen only by the requester.
    pub fn private(mut self) -> Reply {
        self.ephemeral = true;
        self
    }

    /// The same reply, replacing `msg`.
    pub fn replacing(mut self, msg: MessageRef) -> Reply {
        self.replace = Some(msg);
        self
    }

    pub fn push(mut self, block: Block) -> Reply {
        self.blocks.push(block);
        self
    }

    /// The reply as plain text, for notifications and clients that cannot render blocks.
    pub fn fallback_text(&self) -> String {
        let mut out: Vec<String> = Vec::new();
        for b in &self.blocks {
            match b {
                Block::Text(t) | Block::Context(t) => out.push(t.clone()),
                Block::Fields(fs) => out.extend(fs.iter().map(|(k, v)| format!("{k}: {v}"))),
                Block::Table {
                    columns,
                    rows,
                    more,
                } => {
                    out.push(columns.join(" | "));
                    out.extend(rows.iter().map(|r| r.join(" | ")));
                    if *more > 0 {
                        out.push(format!("… and {more} more"));
                    }
                }
                Block::Buttons(bs) => out.push(
                    bs.iter()
                        .map(|b| format!("[{}]", b.label))
                        .collect::<Vec<_>>()
                        .join(" "),
                ),
                Block::Progress {
                    total,
                    queued,
                    sent,
                    succeeded,
                    failed,
                    done,
                } => out.push(format!(
                    "{}: {succeeded}/{total} succeeded, {failed} failed, {sent} sent, {queued} queued",
                    if *done { "done" } else { "in progress" }
                )),
            }
        }
        out.join("\n")
    }
}

/// Why a chat operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// The platform refused or could not be reached (its own error text).
    #[error("platform error: {0}")]
    Platform(String),
    /// A payload or reference the adapter could not make sense of.
    #[error("malformed: {0}")]
    Malformed(String),
    /// The chat state store failed.
    #[error("chat state: {0}")]
    State(String),
}

/// Sends replies on one platform; implemented by each adapter.
#[async_trait]
pub trait Outbox: Send + Sync {
    async fn post(&self, to: &ConversationRef, reply: &Reply) -> Result<MessageRef, ChatError>;
    async fn update(&self, msg: &MessageRef, reply: &Reply) -> Result<(), ChatError>;
    async fn ephemeral(
        &self,
        to: &ConversationRef,
        user: &ChatUser,
        reply: &Reply,
    ) -> Result<(), ChatError>;
}

/// The role a chat user acts with, as the fleet's service layer knows roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Makes the fleet backend one chat user acts through: actor
/// `<platform>:<workspace>/<user> (<name>)`, channel = the platform, the mapped role.
pub type BackendFor =
    Arc<dyn Fn(&ChatUser, &ConversationRef, Role) -> Arc<dyn FleetBackend> + Send + Sync>;

/// The audit actor of a chat user: `slack:T123/U456 (Ada)`.
pub fn actor(user: &ChatUser, conv: &ConversationRef) -> String {
    format!(
        "{}:{}/{} ({})",
        conv.platform, conv.workspace, user.id, user.name
    )
}

/// One [`Outbox`] over several platforms: each call goes to the outbox of the conversation's
/// platform. What the embedder's housekeeping (sign-offs, the shutdown notice) posts through
/// when more than one gateway runs over the same state.
pub struct Outboxes(pub std::collections::HashMap<Platform, Arc<dyn Outbox>>);

impl Outboxes {
    fn of(&self, p: Platform) -> Result<&Arc<dyn Outbox>, ChatError> {
        self.0
            .get(&p)
            .ok_or_else(|| ChatError::Platform(format!("no {p} gateway is running")))
    }
}

#[async_trait]
impl Outbox for Outboxes {
    async fn post(&self, to: &ConversationRef, reply: &Reply) -> Result<MessageRef, ChatError> {
        self.of(to.platform)?.post(to, reply).await
    }
    async fn update(&self, msg: &MessageRef, reply: &Reply) -> Result<(), ChatError> {
        self.of(msg.conversation.platform)?.update(msg, reply).await
    }
    async fn ephemeral(
        &self,
        to: &ConversationRef,
        user: &ChatUser,
        reply: &Reply,
    ) -> Result<(), ChatError> {
        self.of(to.platform)?.ephemeral(to, user, reply).await
    }
}
