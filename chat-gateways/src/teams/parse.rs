//! Bot Framework activities → the core's platform-neutral [`Incoming`]. Field names follow the
//! Bot Framework Activity schema and the Teams pages "Conversation basics" / "Channel and group
//! chat conversations with a bot": `conversation.conversationType` is `personal` (1:1),
//! `groupChat` or `channel`; in a channel, `conversation.id` is
//! `19:…@thread.tacv2;messageid=<root>` (the thread); an @mention arrives as `<at>Name</at>` in
//! `text` with a `mention` entity naming the bot (`recipient`); an Adaptive Card's
//! `Action.Submit` arrives as a `message` activity whose `value` is the action's `data` and
//! whose `replyToId` is the card's activity id.
//!
//! Only called on activities whose bearer token verified.

use serde::Deserialize;
use serde_json::Value;

use crate::core::types::{ChatUser, ConversationRef, Incoming, IncomingKind, MessageRef, Platform};

/// The `data` key of an `Action.Submit` naming the core's action id (the value is `value`).
pub const ACTION_KEY: &str = "flotilla_action";
/// The `data` key carrying the action's value.
pub const VALUE_KEY: &str = "flotilla_value";

/// What the gateway needs of an activity to answer it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// Where the Connector API is for this conversation (already matched with the token).
    pub service_url: String,
    /// The conversation id as Teams gave it (with `;messageid=` in a channel thread).
    pub conversation_id: String,
    /// The activity replied to.
    pub activity_id: String,
}

/// A verified activity, understood.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Message {
        incoming: Box<Incoming>,
        reference: Reference,
    },
    /// Valid but nothing to do (typing, conversationUpdate, an empty message); answered 200.
    Ignored(String),
}

/// A body that is not a Bot Framework activity: answered 400 with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed Teams activity: {0}")]
pub struct Malformed(pub String);

/// The two fields authentication compares with the token, read before the rest.
#[derive(Debug, Clone, Deserialize)]
pub struct Envelope {
    #[serde(rename = "serviceUrl")]
    pub service_url: String,
    #[serde(rename = "channelId", default)]
    pub channel_id: String,
}

/// Reads the envelope (for authentication) from a body.
pub fn envelope(body: &[u8]) -> Result<Envelope, Malformed> {
    serde_json::from_slice(body).map_err(|e| Malformed(e.to_string()))
}

#[derive(Debug, Deserialize)]
struct Account {
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(rename = "aadObjectId")]
    aad_object_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Conversation {
    id: String,
    #[serde(rename = "conversationType")]
    conversation_type: Option<String>,
    #[serde(rename = "tenantId")]
    tenant_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Activity {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
    #[serde(rename = "serviceUrl")]
    service_url: String,
    from: Option<Account>,
    conversation: Option<Conversation>,
    recipient: Option<Account>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    entities: Vec<Value>,
    #[serde(default)]
    value: Option<Value>,
    #[serde(rename = "replyToId")]
    reply_to_id: Option<String>,
    #[serde(rename = "channelData", default)]
    channel_data: Value,
}

/// Splits a Teams conversation id into the channel and the thread (`;messageid=`).
pub fn split_conversation(id: &str) -> (String, Option<String>) {
    match id.split_once(";messageid=") {
        Some((c, m)) if !m.is_empty() => (c.to_string(), Some(m.to_string())),
        _ => (id.to_string(), None),
    }
}

/// The Teams conversation id of a core conversation (the thread put back).
pub fn conversation_id(c: &ConversationRef) -> String {
    match &c.thread {
        Some(t) => format!("{};messageid={t}", c.channel),
        None => c.channel.clone(),
    }
}

/// Parses one activity.
pub fn activity(body: &[u8]) -> Result<Parsed, Malformed> {
    let a: Activity = serde_json::from_slice(body).map_err(|e| Malformed(e.to_string()))?;
    if a.kind != "message" {
        return Ok(Parsed::Ignored(format!("activity type {:?}", a.kind)));
    }
    let need = |what: &str| Malformed(format!("a message activity without {what}"));
    let id = a.id.filter(|s| !s.is_empty()).ok_or_else(|| need("id"))?;
    let from = a.from.ok_or_else(|| need("from"))?;
    let conv = a.conversation.ok_or_else(|| need("conversation"))?;
    let tenant = conv
        .tenant_id
        .clone()
        .or_else(|| a.channel_data["tenant"]["id"].as_str().map(str::to_string))
        .ok_or_else(|| need("a tenant id"))?;
    // The AAD object id is who the person is across Teams; `from.id` (29:…) is per bot.
    let user_id = from
        .aad_object_id
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| need("from.aadObjectId"))?;
    let user = ChatUser {
        id: user_id,
        name: from.name.clone().unwrap_or_else(|| from.id.clone()),
        groups: Vec::new(),
    };
    let (channel, mut thread) = split_conversation(&conv.id);
    let kind_of = conv.conversation_type.as_deref().unwrap_or("personal");
    if kind_of == "channel" && thread.is_none() {
        // A new post in a channel starts its own thread.
        thread = Some(id.clone());
    }
    let conversation = ConversationRef {
        platform: Platform::Teams,
        workspace: tenant,
        channel,
        thread,
    };
    let reference = Reference {
        service_url: a.service_url,
        conversation_id: conv.id.clone(),
        activity_id: id.clone(),
    };
    let kind = if let Some(v) = a.value.as_ref().filter(|v| v.is_object()) {
        let Some(action) = v[ACTION_KEY].as_str() else {
            return Ok(Parsed::Ignored(
                "a card submit that is not Flotilla's".into(),
            ));
        };
        IncomingKind::Action {
            action_id: action.to_string(),
            value: v[VALUE_KEY].as_str().unwrap_or("").to_string(),
            message: a.reply_to_id.filter(|s| !s.is_empty()).map(|m| MessageRef {
                conversation: conversation.clone(),
                id: m,
            }),
        }
    } else {
        let bot = a.recipient.as_ref().map(|r| r.id.as_str()).unwrap_or("");
        let text = strip_mentions(a.text.as_deref().unwrap_or(""), &a.entities, bot);
        if text.is_empty() {
            return Ok(Parsed::Ignored("a message with no text".into()));
        }
        match kind_of {
            "personal" => IncomingKind::Direct { text },
            _ => IncomingKind::Mention { text },
        }
    };
    Ok(Parsed::Message {
        incoming: Box::new(Incoming {
            conversation,
            user,
            kind,
            delivery_id: Some(format!("teams:{}:{id}", conv.id)),
        }),
        reference,
    })
}

/// The text without the bot's `<at>…</at>` mentions (other people's mentions keep their
/// names), HTML entities Teams adds decoded, whitespace collapsed.
pub fn strip_mentions(text: &str, entities: &[Value], bot_id: &str) -> String {
    let mut t = text.to_string();
    for e in entities {
        if e["type"] != "mention" {
            continue;
        }
        let Some(m) = e["text"].as_str() else {
            continue;
        };
        if e["mentioned"]["id"].as_str() == Some(bot_id) {
            t = t.replace(m, " ");
        } else {
            let name = m.trim_start_matches("<at>").trim_end_matches("</at>");
            t = t.replace(m, name);
        }
    }
    let t = t
        .replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&");
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}
