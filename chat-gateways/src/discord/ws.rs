//! The Discord Gateway (the bot's WebSocket to Discord), for what interactions cannot carry:
//! bot mentions in channels and direct messages, in natural language. Written over
//! tokio-tungstenite against Discord's documented Gateway protocol (API v10, JSON encoding)
//! rather than through serenity, whose 0.12 line would compile a second HTTP stack
//! (reqwest 0.11 / hyper 0.14) beside the one the REST client already uses.
//!
//! The connection's life, as "Gateway → Connection Lifecycle" describes it: the URL from
//! `GET /gateway/bot` (so tests point `chat.discord.api_url` at a fake that names its own
//! socket); `HELLO` (op 10) gives the heartbeat interval; the first heartbeat (op 1, the last
//! sequence number) goes after `interval × jitter`, then every interval, and a heartbeat
//! without an `ACK` (op 11) since the previous one marks the connection a zombie, which is
//! closed and resumed; a heartbeat Discord asks for (op 1) is sent at once. `IDENTIFY` (op 2)
//! carries the bot token and the intents GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT;
//! `READY` gives the session id, the `resume_gateway_url` and the bot's own user id. After a
//! dropped connection, `RECONNECT` (op 7) or a resumable close code, the session is resumed
//! (op 6: token, session id, last sequence) on the resume URL; `INVALID_SESSION` (op 9) with
//! `d: false`, or closes 4007/4009, start a new session after a 1–5 s wait. Closes Discord
//! documents as final (4004 authentication failed, 4010–4014: shard, version, intents) stop
//! the connection with an error log: retrying cannot help.
//!
//! `MESSAGE_CREATE`: the bot's own messages and other bots' are ignored; in a guild only a
//! message mentioning the bot is read, the mention stripped; in a DM every message. The core's
//! replies are posted in the channel through the REST API as replies to the message (message
//! reference); a reply replacing an earlier message edits it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{ApiError, DiscordApi};
use super::parse::NO_GUILD;
use super::render::render;
use crate::core::gateway::Handler;
use crate::core::types::{
    ChatUser, ConversationRef, Incoming, IncomingKind, Outbox, Platform, Reply,
};

/// `GUILD_MESSAGES` (1 << 9): messages in guild channels.
pub const GUILD_MESSAGES: u64 = 1 << 9;
/// `DIRECT_MESSAGES` (1 << 12).
pub const DIRECT_MESSAGES: u64 = 1 << 12;
/// `MESSAGE_CONTENT` (1 << 15), privileged: enabled under Bot → Privileged Gateway Intents.
pub const MESSAGE_CONTENT: u64 = 1 << 15;
/// The intents the bot identifies with.
pub const INTENTS: u64 = GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT;

// Gateway opcodes.
const DISPATCH: u64 = 0;
const HEARTBEAT: u64 = 1;
const IDENTIFY: u64 = 2;
const RESUME: u64 = 6;
const RECONNECT: u64 = 7;
const INVALID_SESSION: u64 = 9;
const HELLO: u64 = 10;
const HEARTBEAT_ACK: u64 = 11;

/// How the connection is kept; the defaults are Discord's documented behaviour, tests shorten
/// the waits.
#[derive(Debug, Clone)]
pub struct WsOptions {
    /// Wait before identifying again after an invalid session (Discord: random 1–5 s).
    pub invalid_session_wait: (Duration, Duration),
    /// Wait before reconnecting after a dropped connection (doubling up to `max_backoff`).
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// How long a connection may take to say HELLO.
    pub hello_within: Duration,
}

impl Default for WsOptions {
    fn default() -> Self {
        WsOptions {
            invalid_session_wait: (Duration::from_secs(1), Duration::from_secs(5)),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            hello_within: Duration::from_secs(30),
        }
    }
}

/// Why the Gateway could not be started.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("{0}")]
    Api(#[from] ApiError),
}

/// The running Gateway connection: mentions and DMs to the core until [`DiscordWs::shutdown`].
pub struct DiscordWs {
    stop: CancellationToken,
    /// The connection's task and the turns it started.
    tasks: TaskTracker,
}

/// A session that can be resumed.
#[derive(Debug, Clone)]
struct Session {
    id: String,
    resume_url: String,
}

/// What ended one connection, and so what the next one does.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Resume the session (dropped connection, RECONNECT, zombie, resumable close).
    Resume,
    /// Start a new session after Discord's 1–5 s wait.
    Identify,
    /// A close Discord documents as final, or shutdown.
    Stop,
}

/// The state one connection works on and keeps across reconnects.
struct Conn {
    api: Arc<DiscordApi>,
    token: String,
    handler: Arc<dyn Handler>,
    outbox: Arc<dyn Outbox>,
    turns: TaskTracker,
    opts: WsOptions,
    gateway_url: String,
    session: Option<Session>,
    seq: Option<u64>,
    /// The bot's own user id (from READY): its messages are ignored, its mention stripped.
    me: Option<String>,
}

fn ws_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    format!("{base}/?v=10&encoding=json")
}

impl DiscordWs {
    /// Asks Discord where its Gateway is (a refused bot token fails here) and connects in the
    /// background. Mentions and DMs go to `handler`; the replies are posted through `api`, and
    /// follow-ups (progress) through `outbox`.
    pub async fn start(
        api: Arc<DiscordApi>,
        bot_token: &str,
        handler: Arc<dyn Handler>,
        outbox: Arc<dyn Outbox>,
        opts: WsOptions,
    ) -> Result<DiscordWs, WsError> {
        let gateway_url = api.gateway_url().await?;
        tracing::info!(url = %gateway_url, "Discord Gateway: connecting for mentions and DMs");
        let stop = CancellationToken::new();
        let turns = TaskTracker::new();
        let mut conn = Conn {
            api,
            token: bot_token.to_string(),
            handler,
            outbox,
            turns: turns.clone(),
            opts,
            gateway_url,
            session: None,
            seq: None,
            me: None,
        };
        let s = stop.clone();
        turns.spawn(async move { conn.run(s).await });
        Ok(DiscordWs { stop, tasks: turns })
    }

    /// Closes the connection and waits for the turns in flight.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn close_frame(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }))
}

/// What a close code from Discord means for the next connection.
fn after_close(code: u16) -> Next {
    match code {
        4004 => {
            tracing::error!(
                code,
                "Discord Gateway: authentication failed (the bot token was refused); not reconnecting"
            );
            Next::Stop
        }
        4010..=4013 => {
            tracing::error!(
                code,
                "Discord Gateway: refused the shard, API version or intents; not reconnecting"
            );
            Next::Stop
        }
        4014 => {
            tracing::error!(
                code,
                "Discord Gateway: disallowed intents — enable MESSAGE CONTENT under Bot → Privileged Gateway Intents; not reconnecting"
            );
            Next::Stop
        }
        4007 | 4009 => Next::Identify,
        _ => Next::Resume,
    }
}

fn jitter(max: Duration) -> Duration {
    max.mul_f64(rand::random::<f64>())
}

impl Conn {
    async fn run(&mut self, stop: CancellationToken) {
        let mut backoff = self.opts.backoff;
        let mut next = Next::Identify;
        loop {
            if next == Next::Identify {
                self.session = None;
                self.seq = None;
            }
            let url = match &self.session {
                Some(s) => ws_url(&s.resume_url),
                None => ws_url(&self.gateway_url),
            };
            let started = Instant::now();
            next = tokio::select! {
                _ = stop.cancelled() => return,
                n = self.connection(&url, &stop) => n,
            };
            if stop.is_cancelled() || next == Next::Stop {
                return;
            }
            // A connection that lived a while earns a fresh backoff.
            if started.elapsed() > Duration::from_secs(60) {
                backoff = self.opts.backoff;
            }
            let wait = match next {
                Next::Identify => {
                    let (lo, hi) = self.opts.invalid_session_wait;
                    lo + jitter(hi.saturating_sub(lo))
                }
                _ => backoff,
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(self.opts.max_backoff);
        }
    }

    /// One connection, until it ends; what to do next.
    async fn connection(&mut self, url: &str, stop: &CancellationToken) -> Next {
        let mut ws: Socket = match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                tracing::warn!(error = %e, "Discord Gateway: cannot connect; retrying");
                return if self.session.is_some() {
                    Next::Resume
                } else {
                    Next::Identify
                };
            }
        };
        let interval = match tokio::time::timeout(self.opts.hello_within, self.hello(&mut ws)).await
        {
            Ok(Some(i)) => i,
            _ => {
                tracing::warn!("Discord Gateway: no HELLO; reconnecting");
                let _ = ws.close(None).await;
                return Next::Resume;
            }
        };
        let first = if let Some(s) = self.session.clone() {
            tracing::info!("Discord Gateway: resuming the session");
            json!({"op": RESUME, "d": {"token": self.token, "session_id": s.id, "seq": self.seq}})
        } else {
            json!({"op": IDENTIFY, "d": {
                "token": self.token,
                "intents": INTENTS,
                "properties": {"os": std::env::consts::OS, "browser": "flotilla", "device": "flotilla"},
            }})
        };
        if ws.send(Message::text(first.to_string())).await.is_err() {
            return Next::Resume;
        }
        let mut beat_at = Instant::now() + jitter(interval);
        let mut acked = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    // 1000: the session ends with us.
                    let _ = ws.send(close_frame(1000, "shutting down")).await;
                    return Next::Stop;
                }
                _ = tokio::time::sleep_until(beat_at) => {
                    if !acked {
                        tracing::warn!("Discord Gateway: no heartbeat ACK (zombie connection); reconnecting to resume");
                        // Not 1000/1001, which would end the session.
                        let _ = ws.send(close_frame(4000, "zombie")).await;
                        return Next::Resume;
                    }
                    acked = false;
                    if self.heartbeat(&mut ws).await.is_err() {
                        return Next::Resume;
                    }
                    beat_at = Instant::now() + interval;
                }
                msg = ws.next() => {
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(f))) => {
                            let code = f.as_ref().map(|f| u16::from(f.code)).unwrap_or(1006);
                            tracing::info!(code, "Discord Gateway: closed by Discord");
                            return after_close(code);
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => {
                            tracing::info!(error = %e, "Discord Gateway: connection lost; resuming");
                            return Next::Resume;
                        }
                        None => return Next::Resume,
                    };
                    let Ok(v) = serde_json::from_str::<Value>(&text) else {
                        tracing::warn!("Discord Gateway: a frame that is not JSON; ignored");
                        continue;
                    };
                    match v["op"].as_u64() {
                        Some(DISPATCH) => {
                            if let Some(s) = v["s"].as_u64() {
                                self.seq = Some(s);
                            }
                            self.dispatch(v["t"].as_str().unwrap_or(""), &v["d"]);
                        }
                        // Discord asking for a heartbeat now.
                        Some(HEARTBEAT) if self.heartbeat(&mut ws).await.is_err() => {
                            return Next::Resume;
                        }
                        Some(HEARTBEAT) => {}
                        Some(HEARTBEAT_ACK) => acked = true,
                        Some(RECONNECT) => {
                            tracing::info!("Discord Gateway: RECONNECT asked; resuming on a new connection");
                            let _ = ws.send(close_frame(4000, "reconnect")).await;
                            return Next::Resume;
                        }
                        Some(INVALID_SESSION) => {
                            let resumable = v["d"].as_bool().unwrap_or(false);
                            tracing::info!(resumable, "Discord Gateway: INVALID_SESSION");
                            let _ = ws.send(close_frame(4000, "invalid session")).await;
                            return if resumable && self.session.is_some() {
                                Next::Resume
                            } else {
                                Next::Identify
                            };
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Reads up to HELLO; its heartbeat interval.
    async fn hello(&self, ws: &mut Socket) -> Option<Duration> {
        while let Some(Ok(m)) = ws.next().await {
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).ok()?;
            if v["op"].as_u64() == Some(HELLO) {
                let ms = v["d"]["heartbeat_interval"].as_u64().filter(|ms| *ms > 0)?;
                return Some(Duration::from_millis(ms));
            }
        }
        None
    }

    async fn heartbeat(
        &self,
        ws: &mut Socket,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        ws.send(Message::text(
            json!({"op": HEARTBEAT, "d": self.seq}).to_string(),
        ))
        .await
    }

    fn dispatch(&mut self, t: &str, d: &Value) {
        match t {
            "READY" => {
                let id = d["session_id"].as_str().unwrap_or_default().to_string();
                let resume_url = d["resume_gateway_url"]
                    .as_str()
                    .unwrap_or(&self.gateway_url)
                    .to_string();
                self.me = d["user"]["id"].as_str().map(str::to_string);
                tracing::info!(bot = ?self.me, "Discord Gateway: ready");
                self.session = Some(Session { id, resume_url });
            }
            "RESUMED" => tracing::info!("Discord Gateway: resumed"),
            "MESSAGE_CREATE" => {
                let Some(me) = &self.me else { return };
                let Some(m) = message(d, me) else { return };
                let (handler, outbox, api) =
                    (self.handler.clone(), self.outbox.clone(), self.api.clone());
                self.turns.spawn(async move {
                    let replies = handler.handle(m.incoming, outbox.clone()).await;
                    answer(&api, outbox.as_ref(), &m.channel, &m.id, replies).await;
                });
            }
            _ => {}
        }
    }
}

/// A message for the core: the turn and where to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ForCore {
    incoming: Incoming,
    channel: String,
    id: String,
}

/// Reads a MESSAGE_CREATE: `None` for the bot's own and other bots' messages, and for guild
/// messages that do not mention the bot (`me`).
fn message(d: &Value, me: &str) -> Option<ForCore> {
    let author = &d["author"];
    let user = author["id"].as_str()?;
    if user == me || author["bot"].as_bool() == Some(true) {
        return None;
    }
    let id = d["id"].as_str()?.to_string();
    let channel = d["channel_id"].as_str()?.to_string();
    let content = d["content"].as_str().unwrap_or_default();
    let guild = d["guild_id"].as_str().filter(|g| !g.is_empty());
    let (kind, groups) = match guild {
        Some(_) => {
            let mentioned = d["mentions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|u| u["id"].as_str() == Some(me));
            if !mentioned {
                return None;
            }
            let text = strip_mention(content, me);
            let roles = d["member"]["roles"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect();
            (IncomingKind::Mention { text }, roles)
        }
        None => (
            IncomingKind::Direct {
                text: strip_mention(content, me),
            },
            Vec::new(),
        ),
    };
    let name = d["member"]["nick"]
        .as_str()
        .or(author["global_name"].as_str())
        .or(author["username"].as_str())
        .unwrap_or(user);
    Some(ForCore {
        incoming: Incoming {
            conversation: ConversationRef {
                platform: Platform::Discord,
                workspace: guild.unwrap_or(NO_GUILD).to_string(),
                channel: channel.clone(),
                thread: None,
            },
            user: ChatUser {
                id: user.to_string(),
                name: name.to_string(),
                groups,
            },
            kind,
            delivery_id: Some(format!("discord-message:{id}")),
        },
        channel,
        id,
    })
}

/// The text without the bot's mention (`<@id>` or the older `<@!id>`), trimmed.
fn strip_mention(content: &str, me: &str) -> String {
    content
        .replace(&format!("<@!{me}>"), " ")
        .replace(&format!("<@{me}>"), " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Posts the core's replies to a message: each as a reply in its channel (Discord has private
/// messages only as answers to interactions), or an edit of the message a reply replaces.
async fn answer(
    api: &DiscordApi,
    outbox: &dyn Outbox,
    channel: &str,
    message_id: &str,
    replies: Vec<Reply>,
) {
    for reply in replies {
        let result = match &reply.replace {
            Some(m) => outbox.update(m, &reply).await.map_err(|e| e.to_string()),
            None => {
                let mut body = render(&reply);
                // Not the ephemeral flag: outside an interaction Discord refuses it.
                if let Some(o) = body.as_object_mut() {
                    o.remove("flags");
                }
                body["message_reference"] =
                    json!({"message_id": message_id, "fail_if_not_exists": false});
                api.create_message(channel, &body)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, channel, "could not answer a Discord message");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "999";

    fn guild_msg(content: &str, mentions: Value) -> Value {
        json!({"id": "M1", "channel_id": "C1", "guild_id": "G1", "content": content,
            "author": {"id": "U1", "username": "ada", "global_name": "Ada"},
            "member": {"roles": ["R1"], "nick": null}, "mentions": mentions})
    }

    #[test]
    fn a_guild_mention_is_read_without_the_mention() {
        let m = message(
            &guild_msg("<@999> agents  type:fluentd", json!([{"id": ME}])),
            ME,
        )
        .unwrap();
        assert_eq!(
            m.incoming.kind,
            IncomingKind::Mention {
                text: "agents type:fluentd".into()
            }
        );
        assert_eq!(m.incoming.user.groups, vec!["R1"]);
        assert_eq!(m.incoming.user.name, "Ada");
        assert_eq!(m.incoming.conversation.workspace, "G1");
        assert_eq!(
            m.incoming.delivery_id.as_deref(),
            Some("discord-message:M1")
        );
        let old_style = message(&guild_msg("hi <@!999>", json!([{"id": ME}])), ME).unwrap();
        assert_eq!(
            old_style.incoming.kind,
            IncomingKind::Mention { text: "hi".into() }
        );
    }

    #[test]
    fn unmentioned_own_and_bot_messages_are_ignored() {
        assert!(message(&guild_msg("agents", json!([])), ME).is_none());
        let mut own = guild_msg("<@999> x", json!([{"id": ME}]));
        own["author"]["id"] = json!(ME);
        assert!(message(&own, ME).is_none());
        let mut bot = guild_msg("<@999> x", json!([{"id": ME}]));
        bot["author"]["bot"] = json!(true);
        assert!(message(&bot, ME).is_none());
    }

    #[test]
    fn a_dm_is_direct() {
        let d = json!({"id": "M2", "channel_id": "D1", "content": "summary",
            "author": {"id": "U2", "username": "bob"}});
        let m = message(&d, ME).unwrap();
        assert_eq!(
            m.incoming.kind,
            IncomingKind::Direct {
                text: "summary".into()
            }
        );
        assert_eq!(m.incoming.conversation.workspace, NO_GUILD);
        assert_eq!(m.incoming.user.name, "bob");
    }

    #[test]
    fn final_closes_stop_and_others_resume() {
        assert_eq!(after_close(4004), Next::Stop);
        assert_eq!(after_close(4014), Next::Stop);
        assert_eq!(after_close(4009), Next::Identify);
        assert_eq!(after_close(4000), Next::Resume);
        assert_eq!(after_close(1006), Next::Resume);
    }

    #[test]
    fn the_intents_are_guild_messages_dms_and_content() {
        assert_eq!(INTENTS, 37376);
    }
}
