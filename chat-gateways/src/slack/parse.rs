//! Slack payloads → the core's platform-neutral [`Incoming`]: slash commands
//! (`application/x-www-form-urlencoded`), Events API callbacks (JSON: the `url_verification`
//! challenge, `app_mention`, `message` in an IM) and interactions (`payload=` form field holding
//! JSON: `block_actions`). Only called on bodies whose signature was verified.
//!
//! Socket Mode ([`super::socket`]) carries the same payloads as JSON inside its envelopes (a
//! slash command's form fields become a JSON object of strings); the `*_json` entry points
//! take them from there, so both transports share one parser below the transport.
//!
//! Field names follow Slack's reference pages: "Implementing slash commands" (the command
//! payload), "Events API" (the `event_callback` envelope, `app_mention`, `message.im`) and
//! "Handling user interaction" (the `block_actions` payload).

use serde::Deserialize;

use crate::core::types::{ChatUser, ConversationRef, Incoming, IncomingKind, MessageRef, Platform};

/// A verified Slack request, understood.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// Events API `url_verification`: answer with the challenge.
    Challenge(String),
    /// Something for the core. `response_url` (commands and interactions) answers privately or
    /// in place for 30 minutes.
    Message {
        incoming: Box<Incoming>,
        response_url: Option<String>,
    },
    /// Valid, but nothing to do (a bot's own message, an edit, an event type not subscribed
    /// to); acknowledged so Slack does not retry. The reason is logged.
    Ignored(String),
}

/// A body that is not what Slack sends on that route: answered 400 with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed Slack {what}: {reason}")]
pub struct Malformed {
    pub what: &'static str,
    pub reason: String,
}

fn malformed(what: &'static str, reason: impl Into<String>) -> Malformed {
    Malformed {
        what,
        reason: reason.into(),
    }
}

fn required<'a>(
    what: &'static str,
    name: &str,
    v: &'a Option<String>,
) -> Result<&'a str, Malformed> {
    match v.as_deref().map(str::trim) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(malformed(what, format!("field {name} is missing or empty"))),
    }
}

/// The slash command form (Slack sends more fields; these are the ones used).
#[derive(Debug, Deserialize)]
struct CommandForm {
    team_id: Option<String>,
    channel_id: Option<String>,
    user_id: Option<String>,
    user_name: Option<String>,
    command: Option<String>,
    #[serde(default)]
    text: String,
    response_url: Option<String>,
    trigger_id: Option<String>,
}

const COMMAND: &str = "slash command";

/// Parses a slash command body (`/flotilla <text>`).
pub fn command(body: &[u8]) -> Result<Parsed, Malformed> {
    let f: CommandForm =
        serde_urlencoded::from_bytes(body).map_err(|e| malformed(COMMAND, e.to_string()))?;
    command_form(f)
}

/// Parses a Socket Mode `slash_commands` payload (the form's fields as a JSON object).
pub fn command_json(payload: serde_json::Value) -> Result<Parsed, Malformed> {
    let f: CommandForm =
        serde_json::from_value(payload).map_err(|e| malformed(COMMAND, e.to_string()))?;
    command_form(f)
}

fn command_form(f: CommandForm) -> Result<Parsed, Malformed> {
    const W: &str = COMMAND;
    let team = required(W, "team_id", &f.team_id)?;
    let channel = required(W, "channel_id", &f.channel_id)?;
    let user = required(W, "user_id", &f.user_id)?;
    let cmd = required(W, "command", &f.command)?;
    if !cmd.starts_with('/') {
        return Err(malformed(
            W,
            format!("command {cmd:?} does not start with /"),
        ));
    }
    let trigger = required(W, "trigger_id", &f.trigger_id)?;
    let response_url = required(W, "response_url", &f.response_url)?;
    let name = f
        .user_name
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(user);
    Ok(Parsed::Message {
        incoming: Box::new(Incoming {
            conversation: conversation(team, channel, None),
            user: chat_user(user, name),
            kind: IncomingKind::Command {
                text: f.text.trim().to_string(),
            },
            delivery_id: Some(trigger.to_string()),
        }),
        response_url: Some(response_url.to_string()),
    })
}

#[derive(Debug, Deserialize)]
struct EventEnvelope {
    #[serde(rename = "type")]
    kind: Option<String>,
    challenge: Option<String>,
    team_id: Option<String>,
    event_id: Option<String>,
    event: Option<Event>,
    #[serde(default)]
    authorizations: Vec<Authorization>,
}

#[derive(Debug, Deserialize)]
struct Authorization {
    user_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: Option<String>,
    subtype: Option<String>,
    bot_id: Option<String>,
    user: Option<String>,
    text: Option<String>,
    channel: Option<String>,
    channel_type: Option<String>,
    ts: Option<String>,
    thread_ts: Option<String>,
    team: Option<String>,
}

/// Parses an Events API body.
pub fn event(body: &[u8]) -> Result<Parsed, Malformed> {
    let env: EventEnvelope =
        serde_json::from_slice(body).map_err(|e| malformed("event", e.to_string()))?;
    event_envelope(env)
}

/// Parses a Socket Mode `events_api` payload (the Events API body, as JSON).
pub fn event_json(payload: serde_json::Value) -> Result<Parsed, Malformed> {
    let env: EventEnvelope =
        serde_json::from_value(payload).map_err(|e| malformed("event", e.to_string()))?;
    event_envelope(env)
}

fn event_envelope(env: EventEnvelope) -> Result<Parsed, Malformed> {
    const W: &str = "event";
    match env.kind.as_deref() {
        Some("url_verification") => {
            let c = required(W, "challenge", &env.challenge)?;
            return Ok(Parsed::Challenge(c.to_string()));
        }
        Some("event_callback") => {}
        Some(other) => return Ok(Parsed::Ignored(format!("envelope type {other:?}"))),
        None => return Err(malformed(W, "field type is missing")),
    }
    let event_id = required(W, "event_id", &env.event_id)?;
    let ev = env
        .event
        .as_ref()
        .ok_or_else(|| malformed(W, "event_callback without an event"))?;
    let kind = ev.kind.as_deref().unwrap_or("");
    // Our own posts come back as message events; bots talking to bots would loop.
    if ev.bot_id.is_some() || ev.subtype.as_deref() == Some("bot_message") {
        return Ok(Parsed::Ignored(format!("{kind} from a bot")));
    }
    if let Some(st) = &ev.subtype {
        // message_changed, message_deleted, channel_join, ...: not someone asking something.
        return Ok(Parsed::Ignored(format!("{kind} subtype {st}")));
    }
    let direct = match kind {
        "app_mention" => false,
        "message" if ev.channel_type.as_deref() == Some("im") => true,
        "message" => {
            return Ok(Parsed::Ignored(format!(
                "message in a {} channel (only IMs and mentions are read)",
                ev.channel_type.as_deref().unwrap_or("unknown")
            )))
        }
        other => return Ok(Parsed::Ignored(format!("event type {other:?}"))),
    };
    let team = env
        .team_id
        .as_ref()
        .or(ev.team.as_ref())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| malformed(W, "field team_id is missing or empty"))?;
    let user = required(W, "event.user", &ev.user)?;
    let channel = required(W, "event.channel", &ev.channel)?;
    let ts = required(W, "event.ts", &ev.ts)?;
    let bots: Vec<&str> = env
        .authorizations
        .iter()
        .filter_map(|a| a.user_id.as_deref())
        .collect();
    let text = strip_mentions(ev.text.as_deref().unwrap_or(""), &bots);
    // A mention is answered in its thread (a new one under the mention if it was not in one),
    // so follow-ups there reach the same conversation; a DM stays flat unless threaded.
    let thread = match (&ev.thread_ts, direct) {
        (Some(t), _) => Some(t.clone()),
        (None, false) => Some(ts.to_string()),
        (None, true) => None,
    };
    let kind = if direct {
        IncomingKind::Direct { text }
    } else {
        IncomingKind::Mention { text }
    };
    Ok(Parsed::Message {
        incoming: Box::new(Incoming {
            conversation: conversation(team, channel, thread),
            // Events carry no display name; the user id stands for it.
            user: chat_user(user, user),
            kind,
            delivery_id: Some(event_id.to_string()),
        }),
        response_url: None,
    })
}

/// Removes `<@BOT>` mentions (all leading mentions, and the app's own anywhere).
fn strip_mentions(text: &str, bots: &[&str]) -> String {
    let mut t = text.trim();
    while let Some(rest) = t.strip_prefix("<@") {
        match rest.find('>') {
            Some(end) => t = rest[end + 1..].trim_start(),
            None => break,
        }
    }
    let mut out = t.to_string();
    for b in bots {
        out = out.replace(&format!("<@{b}>"), "");
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[derive(Debug, Deserialize)]
struct InteractionForm {
    payload: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Interaction {
    #[serde(rename = "type")]
    kind: Option<String>,
    user: Option<IUser>,
    team: Option<IId>,
    channel: Option<IId>,
    container: Option<Container>,
    message: Option<IMessage>,
    response_url: Option<String>,
    trigger_id: Option<String>,
    #[serde(default)]
    actions: Vec<Action>,
}

#[derive(Debug, Deserialize)]
struct IUser {
    id: Option<String>,
    username: Option<String>,
    name: Option<String>,
    team_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct IId {
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Container {
    message_ts: Option<String>,
    channel_id: Option<String>,
    thread_ts: Option<String>,
}

#[derive(Debug, Deserialize)]
struct IMessage {
    ts: Option<String>,
    thread_ts: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Action {
    action_id: Option<String>,
    value: Option<String>,
}

/// Parses an interaction body (`payload=<json>`).
pub fn interaction(body: &[u8]) -> Result<Parsed, Malformed> {
    const W: &str = "interaction";
    let form: InteractionForm =
        serde_urlencoded::from_bytes(body).map_err(|e| malformed(W, e.to_string()))?;
    let json = form
        .payload
        .ok_or_else(|| malformed(W, "no payload field"))?;
    let p: Interaction =
        serde_json::from_str(&json).map_err(|e| malformed(W, format!("payload: {e}")))?;
    interaction_payload(p)
}

/// Parses a Socket Mode `interactive` payload (the interaction's JSON itself).
pub fn interaction_json(payload: serde_json::Value) -> Result<Parsed, Malformed> {
    let p: Interaction = serde_json::from_value(payload)
        .map_err(|e| malformed("interaction", format!("payload: {e}")))?;
    interaction_payload(p)
}

fn interaction_payload(p: Interaction) -> Result<Parsed, Malformed> {
    const W: &str = "interaction";
    match p.kind.as_deref() {
        Some("block_actions") => {}
        Some(other) => return Ok(Parsed::Ignored(format!("interaction type {other:?}"))),
        None => return Err(malformed(W, "payload has no type")),
    }
    let user = p
        .user
        .as_ref()
        .ok_or_else(|| malformed(W, "payload has no user"))?;
    let user_id = required(W, "user.id", &user.id)?;
    let team = p
        .team
        .as_ref()
        .and_then(|t| t.id.clone())
        .or_else(|| user.team_id.clone())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| malformed(W, "payload has no team.id"))?;
    let channel = p
        .channel
        .as_ref()
        .and_then(|c| c.id.clone())
        .or_else(|| p.container.as_ref().and_then(|c| c.channel_id.clone()))
        .filter(|c| !c.is_empty())
        .ok_or_else(|| malformed(W, "payload has no channel.id"))?;
    let action = p
        .actions
        .first()
        .ok_or_else(|| malformed(W, "block_actions without actions"))?;
    let action_id = required(W, "actions[0].action_id", &action.action_id)?;
    let trigger = required(W, "trigger_id", &p.trigger_id)?;
    let thread = p
        .container
        .as_ref()
        .and_then(|c| c.thread_ts.clone())
        .or_else(|| p.message.as_ref().and_then(|m| m.thread_ts.clone()));
    let conv = conversation(&team, &channel, thread);
    let message_ts = p
        .container
        .as_ref()
        .and_then(|c| c.message_ts.clone())
        .or_else(|| p.message.as_ref().and_then(|m| m.ts.clone()));
    let name = user
        .username
        .as_deref()
        .or(user.name.as_deref())
        .filter(|n| !n.is_empty())
        .unwrap_or(user_id);
    Ok(Parsed::Message {
        incoming: Box::new(Incoming {
            conversation: conv.clone(),
            user: chat_user(user_id, name),
            kind: IncomingKind::Action {
                action_id: action_id.to_string(),
                value: action.value.clone().unwrap_or_default(),
                message: message_ts.map(|id| MessageRef {
                    conversation: conv,
                    id,
                }),
            },
            delivery_id: Some(trigger.to_string()),
        }),
        response_url: p.response_url.filter(|u| !u.is_empty()),
    })
}

fn conversation(team: &str, channel: &str, thread: Option<String>) -> ConversationRef {
    ConversationRef {
        platform: Platform::Slack,
        workspace: team.to_string(),
        channel: channel.to_string(),
        thread: thread.filter(|t| !t.is_empty()),
    }
}

fn chat_user(id: &str, name: &str) -> ChatUser {
    ChatUser {
        id: id.to_string(),
        name: name.to_string(),
        groups: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(p: Parsed) -> (Incoming, Option<String>) {
        match p {
            Parsed::Message {
                incoming,
                response_url,
            } => (*incoming, response_url),
            other => panic!("not a message: {other:?}"),
        }
    }

    // Slack's documented slash command example ("Implementing slash commands"), with our
    // command and text.
    const COMMAND: &str = "token=gIkuvaNzQIHg97ATvDxqgjtO&team_id=T0001&team_domain=example&enterprise_id=E0001&enterprise_name=Globular%20Construct%20Inc&channel_id=C2147483705&channel_name=test&user_id=U2147483697&user_name=Steve&command=%2Fflotilla&text=restart+the+unhealthy+fluentd+agents&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2F1234%2F5678&trigger_id=13345224609.738474920.8088930838d88f008e0&api_app_id=A123456";

    #[test]
    fn a_slash_command_becomes_a_command() {
        let (i, url) = message(command(COMMAND.as_bytes()).unwrap());
        assert_eq!(
            url.as_deref(),
            Some("https://hooks.slack.com/commands/1234/5678")
        );
        assert_eq!(i.conversation.workspace, "T0001");
        assert_eq!(i.conversation.channel, "C2147483705");
        assert_eq!(i.conversation.thread, None);
        assert_eq!(i.user.id, "U2147483697");
        assert_eq!(i.user.name, "Steve");
        assert_eq!(
            i.kind,
            IncomingKind::Command {
                text: "restart the unhealthy fluentd agents".into()
            }
        );
        assert_eq!(
            i.delivery_id.as_deref(),
            Some("13345224609.738474920.8088930838d88f008e0")
        );
    }

    #[test]
    fn a_slash_command_missing_what_slack_always_sends_is_malformed() {
        for drop in [
            "team_id",
            "user_id",
            "channel_id",
            "trigger_id",
            "response_url",
            "command",
        ] {
            let body: String = COMMAND
                .split('&')
                .filter(|kv| !kv.starts_with(&format!("{drop}=")))
                .collect::<Vec<_>>()
                .join("&");
            let e = command(body.as_bytes()).unwrap_err();
            assert!(e.to_string().contains(drop), "{drop}: {e}");
        }
        let e = command(
            b"command=flotilla&team_id=T&channel_id=C&user_id=U&trigger_id=1&response_url=x",
        )
        .unwrap_err();
        assert!(e.reason.contains("does not start with /"), "{e}");
    }

    #[test]
    fn url_verification_answers_the_challenge() {
        // Slack's documented url_verification body.
        let body = br#"{"token":"Jhj5dZrVaK7ZwHHjRyZWjbDl","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
        assert_eq!(
            event(body).unwrap(),
            Parsed::Challenge("3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P".into())
        );
        assert!(event(br#"{"type":"url_verification"}"#).is_err());
    }

    fn callback(ev: &str) -> String {
        format!(
            r#"{{"token":"XXYYZZ","team_id":"T061EG9R6","api_app_id":"A0PNCHHK2","event":{ev},"type":"event_callback","event_id":"Ev0PV52K21","event_time":1515449522,"authorizations":[{{"enterprise_id":null,"team_id":"T061EG9R6","user_id":"U0LAN0Z89","is_bot":true}}]}}"#
        )
    }

    #[test]
    fn an_app_mention_is_answered_in_its_thread() {
        // Slack's documented app_mention event.
        let body = callback(
            r#"{"type":"app_mention","user":"U061F7AUR","text":"<@U0LAN0Z89> which fluent bit nodes are dropping records?","ts":"1515449522.000016","channel":"C0LAN2Q65","event_ts":"1515449522000016"}"#,
        );
        let (i, url) = message(event(body.as_bytes()).unwrap());
        assert_eq!(url, None);
        assert_eq!(
            i.kind,
            IncomingKind::Mention {
                text: "which fluent bit nodes are dropping records?".into()
            }
        );
        assert_eq!(i.conversation.workspace, "T061EG9R6");
        assert_eq!(i.conversation.thread.as_deref(), Some("1515449522.000016"));
        assert_eq!(i.delivery_id.as_deref(), Some("Ev0PV52K21"));
        // In a thread: the thread's ts, so "restart them" there continues the conversation.
        let body = callback(
            r#"{"type":"app_mention","user":"U061F7AUR","text":"<@U0LAN0Z89> restart them","ts":"1515449600.000100","thread_ts":"1515449522.000016","channel":"C0LAN2Q65"}"#,
        );
        let (i, _) = message(event(body.as_bytes()).unwrap());
        assert_eq!(i.conversation.thread.as_deref(), Some("1515449522.000016"));
        assert_eq!(
            i.kind,
            IncomingKind::Mention {
                text: "restart them".into()
            }
        );
    }

    #[test]
    fn a_direct_message_is_read_and_bots_and_edits_are_not() {
        // Slack's documented message.im event.
        let body = callback(
            r#"{"type":"message","channel":"D024BE91L","user":"U2147483697","text":"how many agents are offline?","ts":"1355517523.000005","event_ts":"1355517523.000005","channel_type":"im"}"#,
        );
        let (i, _) = message(event(body.as_bytes()).unwrap());
        assert_eq!(
            i.kind,
            IncomingKind::Direct {
                text: "how many agents are offline?".into()
            }
        );
        assert_eq!(i.conversation.channel, "D024BE91L");
        assert_eq!(i.conversation.thread, None);
        for ignored in [
            r#"{"type":"message","channel":"D024BE91L","bot_id":"B1","text":"our own post","ts":"1.2","channel_type":"im"}"#,
            r#"{"type":"message","subtype":"message_changed","channel":"D024BE91L","ts":"1.2","channel_type":"im"}"#,
            r#"{"type":"message","channel":"C1","user":"U1","text":"chatter","ts":"1.2","channel_type":"channel"}"#,
            r#"{"type":"reaction_added","user":"U1","ts":"1.2"}"#,
        ] {
            assert!(
                matches!(
                    event(callback(ignored).as_bytes()).unwrap(),
                    Parsed::Ignored(_)
                ),
                "{ignored}"
            );
        }
    }

    #[test]
    fn malformed_events_say_why() {
        for (body, needle) in [
            ("not json", "expected"),
            (r#"{"token":"x"}"#, "type"),
            (
                r#"{"type":"event_callback","team_id":"T","event_id":"E"}"#,
                "without an event",
            ),
            (
                r#"{"type":"event_callback","team_id":"T","event":{"type":"app_mention"}}"#,
                "event_id",
            ),
            (
                r#"{"type":"event_callback","team_id":"T","event_id":"E","event":{"type":"app_mention","text":"hi","channel":"C","ts":"1"}}"#,
                "event.user",
            ),
        ] {
            let e = event(body.as_bytes()).unwrap_err();
            assert!(e.to_string().contains(needle), "{body}: {e}");
        }
    }

    fn interaction_body(payload: &str) -> Vec<u8> {
        serde_urlencoded::to_string([("payload", payload)])
            .unwrap()
            .into_bytes()
    }

    // Shaped as Slack's documented block_actions payload ("block_actions payloads").
    const BLOCK_ACTIONS: &str = r#"{"type":"block_actions","team":{"id":"T9TK3CUKW","domain":"example"},"user":{"id":"UA8RXUSPL","username":"jtorrance","name":"jtorrance","team_id":"T9TK3CUKW"},"api_app_id":"AABA1ABCD","token":"9s8d9as89d8as9d8as989","container":{"type":"message","message_ts":"1548261231.000200","channel_id":"CBR2V3XEX","is_ephemeral":false,"thread_ts":"1548261100.000100"},"trigger_id":"12321423423.333649436676.d8c1bb837935619ccad0f624c448ffb3","channel":{"id":"CBR2V3XEX","name":"review-updates"},"message":{"bot_id":"BAH5CA16Z","type":"message","text":"preview","user":"UAJ2RU415","ts":"1548261231.000200","thread_ts":"1548261100.000100"},"response_url":"https://hooks.slack.com/actions/AABA1ABCD/1232321423432/D09sSasdasdAS9091209","actions":[{"action_id":"flotilla.confirm","block_id":"=qXel","text":{"type":"plain_text","text":"Confirm","emoji":true},"value":"c-42","type":"button","action_ts":"1548426417.840180"}]}"#;

    #[test]
    fn a_button_click_becomes_an_action_on_its_message() {
        let (i, url) = message(interaction(&interaction_body(BLOCK_ACTIONS)).unwrap());
        assert_eq!(
            url.as_deref(),
            Some("https://hooks.slack.com/actions/AABA1ABCD/1232321423432/D09sSasdasdAS9091209")
        );
        assert_eq!(i.user.id, "UA8RXUSPL");
        assert_eq!(i.user.name, "jtorrance");
        assert_eq!(i.conversation.thread.as_deref(), Some("1548261100.000100"));
        let IncomingKind::Action {
            action_id,
            value,
            message,
        } = i.kind
        else {
            panic!("not an action")
        };
        assert_eq!(
            (action_id.as_str(), value.as_str()),
            ("flotilla.confirm", "c-42")
        );
        let m = message.unwrap();
        assert_eq!(m.id, "1548261231.000200");
        assert_eq!(m.conversation.channel, "CBR2V3XEX");
        assert_eq!(
            i.delivery_id.as_deref(),
            Some("12321423423.333649436676.d8c1bb837935619ccad0f624c448ffb3")
        );
    }

    #[test]
    fn malformed_interactions_say_why() {
        assert!(interaction(b"nopayload=1")
            .unwrap_err()
            .reason
            .contains("no payload"));
        assert!(interaction(&interaction_body("{not json"))
            .unwrap_err()
            .reason
            .contains("payload:"));
        let no_actions = BLOCK_ACTIONS.replace(
            r#""actions":[{"action_id":"flotilla.confirm","block_id":"=qXel","text":{"type":"plain_text","text":"Confirm","emoji":true},"value":"c-42","type":"button","action_ts":"1548426417.840180"}]"#,
            r#""actions":[]"#,
        );
        assert!(interaction(&interaction_body(&no_actions))
            .unwrap_err()
            .reason
            .contains("without actions"));
        let no_user = BLOCK_ACTIONS.replace(r#""id":"UA8RXUSPL""#, r#""id":"""#);
        assert!(interaction(&interaction_body(&no_user))
            .unwrap_err()
            .reason
            .contains("user.id"));
        assert!(matches!(
            interaction(&interaction_body(r#"{"type":"view_submission"}"#)).unwrap(),
            Parsed::Ignored(_)
        ));
    }
}
