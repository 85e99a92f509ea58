//! The WebSocket transport: one task per connection that owns the socket, so every write to it
//! is serialised by construction (no writer task, no mutex). The task waits on the next frame,
//! a Hub wake-up (a command was queued, or a liveness check), server shutdown, and — only
//! while a ping is unanswered — a pong deadline.
//!
//! Memory per idle connection is the socket's read/write buffers (sized from the config), the
//! small [`Link`] state, a tiny wake channel and the task itself; message handling runs in a
//! boxed future that exists only while a message is being processed. No per-connection timer
//! while the connection is healthy: the idle check is one server-wide sweep through the Hub.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use flotilla_proto::framing::{decode_ws, encode_ws, read_varint};
use flotilla_proto::{AgentToServer, ServerErrorResponseType, ServerToAgent};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use uuid::Uuid;

use super::http::retry_later;
use super::session::{
    self, apply, before_send, error_reply, fill_reply, handle, outgoing_for, timed,
    unavailable_reply, Filled, Link, SERVER_CAPABILITIES,
};
use super::shared::{Shared, WsSlot, WsStyle};
use crate::hub::{Wake, WAKE_CAPACITY};
use crate::model::{now_ms, Transport};

/// RFC 6455 close codes we send.
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;

/// Commands claimed per store round trip when delivering.
const CLAIM_BATCH: usize = 16;

/// How long after its first answer a connection must stay open, having sent nothing else, before
/// commands are pushed on it (see [`push_policy`]). A client that reads one frame per connection
/// closes within milliseconds of reading it; this leaves room for a slow network and a busy host.
pub const ONE_SHOT_GRACE: Duration = Duration::from_secs(2);

/// How long we wait for the agent to answer our Close frame before dropping the socket.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Why a session ended.
enum End {
    /// The agent closed, or the socket broke.
    Peer,
    /// A message over `max_message_bytes`.
    TooLarge,
    /// Server shutdown.
    Shutdown,
    /// A ping went unanswered, or a write did not complete: the peer is gone without closing
    /// (half-open TCP) or stopped reading.
    Dead,
    /// The agent was refused (a client certificate not the one pinned to its uid) and told why.
    Refused,
}

/// The pong deadline of a connection whose uid a newcomer claims: short, because the newcomer
/// waits for the verdict before it is answered.
pub const PROBE_PONG_TIMEOUT: Duration = Duration::from_secs(3);

/// Accepts the upgrade unless `max_connections` are open (503 + Retry-After).
pub fn upgrade(
    sh: Arc<Shared>,
    ws: WebSocketUpgrade,
    remote: Option<SocketAddr>,
    endpoint: Option<String>,
    cert: Option<Box<crate::tls::PeerCert>>,
) -> Response {
    let Some(slot) = sh.open_ws() else {
        sh.ctx.fleet.metrics().reject("overload");
        tracing::warn!(remote = ?remote, max = sh.ctx.cfg.max_connections,
            "refused OpAMP WebSocket: too many open connections");
        return retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            sh.ctx.cfg.retry_after_s,
            "too many open OpAMP connections",
        );
    };
    let cfg = &sh.ctx.cfg;
    // The header varint takes at most 10 bytes on top of the protobuf limit.
    let max_frame = cfg.max_message_bytes.saturating_add(10);
    ws.read_buffer_size(cfg.ws_read_buffer_bytes)
        .write_buffer_size(cfg.ws_write_buffer_bytes)
        // A cap, not an allocation: room for one full message beyond the normal buffer.
        .max_write_buffer_size(cfg.ws_write_buffer_bytes + max_frame + 64)
        .max_message_size(max_frame)
        // Checked from the frame header, before any payload is buffered.
        .max_frame_size(max_frame)
        .on_failed_upgrade(
            move |e| tracing::debug!(remote = ?remote, error = %e, "WebSocket upgrade failed"),
        )
        .on_upgrade(move |socket| {
            // Upgraded connections leave axum's graceful-shutdown tracking; the tracker lets
            // `run()` wait until every session has sent its Close frame.
            let sessions = sh.ctx.sessions.clone();
            sessions.track_future(run(sh, socket, remote, endpoint, cert, slot))
        })
}

async fn run(
    sh: Arc<Shared>,
    mut socket: WebSocket,
    remote: Option<SocketAddr>,
    endpoint: Option<String>,
    cert: Option<Box<crate::tls::PeerCert>>,
    slot: WsSlot,
) {
    let hub = sh.ctx.fleet.hub().clone();
    let (wake_tx, mut wake_rx) = mpsc::channel(WAKE_CAPACITY);
    let mut link = Link::new(Transport::Websocket, remote, endpoint, hub.next_conn_id());
    link.wake = Some(wake_tx);
    link.cert = cert;
    // Pinned once, so the session registers with the token once, not per message.
    let shutdown = sh.ctx.shutdown.clone().cancelled_owned();
    tokio::pin!(shutdown);
    tracing::debug!(remote = ?remote, conn = link.conn_id, "OpAMP WebSocket connected");
    // When the agent was last heard from (any frame), and the deadline of an unanswered ping.
    // The deadline is boxed so it costs a pointer while no ping is outstanding.
    let mut last_heard = Instant::now();
    let mut pong_deadline: Option<Pin<Box<Sleep>>> = None;
    // When a delivery held back by `push_policy` may be pushed; boxed like the pong deadline.
    let mut deliver_at: Option<Pin<Box<Sleep>>> = None;

    let end = loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break End::Shutdown,
            // Reading before the deadline check: a pong that arrived while this task was busy
            // (a slow store call, a long write) is already buffered and must count.
            frame = socket.recv() => {
                if frame.is_some() {
                    last_heard = Instant::now();
                    pong_deadline = None;
                }
                match frame {
                None => break End::Peer,
                Some(Err(e)) => {
                    // axum hides tungstenite's error type; its Display is the only way to tell
                    // "message too long" (a capacity error) from a broken socket.
                    if e.to_string().contains("Message too long") {
                        break End::TooLarge;
                    }
                    tracing::debug!(remote = ?remote, error = %e, "OpAMP WebSocket read failed");
                    break End::Peer;
                }
                Some(Ok(Message::Binary(data))) => {
                    if let Err(end) = Box::pin(on_binary(&sh, &mut link, &mut socket, data, &mut deliver_at)).await {
                        break end;
                    }
                }
                Some(Ok(Message::Text(_))) => {
                    // OpAMP is binary only. Answer like any other undecodable message, so the
                    // agent learns why instead of waiting; the connection stays open.
                    sh.ctx.fleet.metrics().message("malformed");
                    if sh.log_malformed(remote) {
                        tracing::warn!(remote = ?remote, "OpAMP WebSocket text frame refused (binary only)");
                    }
                    let reply = error_reply(
                        Vec::new(),
                        ServerErrorResponseType::BadRequest,
                        "OpAMP WebSocket messages must be binary frames".into(),
                    );
                    if Box::pin(send(&sh, &mut socket, reply)).await.is_err() {
                        break End::Peer;
                    }
                }
                // Close is answered by tungstenite on the next read, which then ends the stream;
                // pings are answered automatically; a pong already cleared the deadline.
                Some(Ok(_)) => {}
            }},
            _ = expired(&mut pong_deadline) => break End::Dead,
            _ = expired(&mut deliver_at) => {
                // Open well past its answer: this connection reads what it is sent.
                deliver_at = None;
                if let Err(end) = Box::pin(owed(&sh, &mut link, &mut socket, &mut deliver_at)).await {
                    break end;
                }
            }
            Some(wake) = wake_rx.recv() => {
                let cfg = &sh.ctx.cfg;
                let ping_within = match wake {
                    Wake::Deliver => {
                        if let Err(end) = Box::pin(owed(&sh, &mut link, &mut socket, &mut deliver_at)).await {
                            break end;
                        }
                        None
                    }
                    Wake::Probe => Some(PROBE_PONG_TIMEOUT.min(Duration::from_secs(cfg.ws_pong_timeout_s))),
                    Wake::IdleCheck => (last_heard.elapsed() >= Duration::from_secs(cfg.ws_idle_ping_s))
                        .then(|| Duration::from_secs(cfg.ws_pong_timeout_s)),
                };
                if let Some(within) = ping_within {
                    if let Err(end) = Box::pin(ping(&mut socket, &mut pong_deadline, within)).await {
                        break end;
                    }
                }
            }
        }
    };

    // Boxed: the closing steps would otherwise be part of every idle session's state.
    Box::pin(finish(&sh, &mut socket, &mut link, end)).await;
    drop(wake_rx);
    drop(slot);
}

/// Resolves when the outstanding ping's deadline passes; never while no ping is outstanding.
async fn expired(deadline: &mut Option<Pin<Box<Sleep>>>) {
    match deadline {
        Some(d) => d.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Whether commands may be pushed on a connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Push {
    Now,
    At(Instant),
    /// Not on this connection unless it carries another message.
    Never,
}

/// Whether a command may be pushed on this connection now. Some agents read only the answer to
/// each message, on a connection of its own (fluent-opamp's WebSocket consumer): a frame pushed
/// there is never read, yet would count as delivered. So a push needs evidence that the
/// connection is read: it carried a second message, or the agent's connections did before
/// ([`WsStyle::LongLived`]), or it is still open [`ONE_SHOT_GRACE`] after its first answer,
/// which a one-shot client never is. An agent whose connection closed after one message within
/// that time ([`WsStyle::OneShot`]) is not pushed to until a connection of its carries a second
/// message; meanwhile its commands ride in the replies to its messages. A command held back is
/// never claimed, so a connection that closes first leaves it queued, not lost.
fn push_policy(sh: &Shared, link: &Link, uid: Uuid) -> Push {
    if link.messages >= 2 {
        return Push::Now;
    }
    match sh.ws_styles.get(&uid).map(|(style, _)| style) {
        Some(WsStyle::LongLived) => Push::Now,
        Some(WsStyle::OneShot) => Push::Never,
        None => {
            let at = link.first_reply.unwrap_or_else(Instant::now) + ONE_SHOT_GRACE;
            if Instant::now() >= at {
                Push::Now
            } else {
                Push::At(at)
            }
        }
    }
}

/// A delivery is owed to this connection's agent: pushed now if [`push_policy`] allows it,
/// otherwise remembered (and timed) until it does.
async fn owed(
    sh: &Shared,
    link: &mut Link,
    socket: &mut WebSocket,
    deliver_at: &mut Option<Pin<Box<Sleep>>>,
) -> Result<(), End> {
    let Some(uid) = link.bound else {
        return Ok(());
    };
    match push_policy(sh, link, uid) {
        Push::Now => {
            link.deferred = false;
            *deliver_at = None;
            deliver(sh, link, socket, uid).await
        }
        Push::At(at) => {
            link.deferred = true;
            if deliver_at.is_none() {
                *deliver_at = Some(Box::pin(tokio::time::sleep_until(at)));
            }
            Ok(())
        }
        Push::Never => {
            link.deferred = true;
            Ok(())
        }
    }
}

/// Counts an answered message; the second one on a connection shows the agent keeps its
/// connections and reads them.
fn answered(sh: &Shared, link: &mut Link) {
    link.messages = link.messages.saturating_add(1);
    match link.messages {
        1 => link.first_reply = Some(Instant::now()),
        2 => {
            if let Some(uid) = link.bound {
                sh.ws_styles.insert(uid, (WsStyle::LongLived, now_ms()));
            }
        }
        _ => {}
    }
}

/// Sends a ping and makes sure a pong (or any frame) must arrive within `within`. An earlier
/// outstanding deadline is kept.
async fn ping(
    socket: &mut WebSocket,
    deadline: &mut Option<Pin<Box<Sleep>>>,
    within: Duration,
) -> Result<(), End> {
    let at = Instant::now() + within;
    match deadline {
        Some(d) if d.deadline() <= at => {}
        _ => *deadline = Some(Box::pin(tokio::time::sleep_until(at))),
    }
    // A peer that stopped reading fills the socket buffer; the deadline covers the write too.
    match tokio::time::timeout(
        within,
        socket.send(Message::Ping(Bytes::from_static(b"flotilla"))),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Peer),
        Err(_) => Err(End::Dead),
    }
}

/// Ends a session: the Close frame the reason calls for, then the registry and the Hub.
async fn finish(sh: &Shared, socket: &mut WebSocket, link: &mut Link, end: End) {
    let hub = sh.ctx.fleet.hub();
    let remote = link.remote;
    match end {
        End::Shutdown => close_gracefully(socket, CLOSE_GOING_AWAY, "server shutting down").await,
        End::Refused => close_gracefully(socket, CLOSE_POLICY, "agent refused").await,
        End::TooLarge => {
            sh.ctx.fleet.metrics().reject("too_large");
            if sh.log_malformed(remote) {
                tracing::warn!(remote = ?remote, limit = sh.ctx.cfg.max_message_bytes,
                    "OpAMP WebSocket message too large; closing with 1009");
            }
            // No waiting for the answer here: reading on would buffer the rest of the
            // oversized frame, which is exactly what the limit is for.
            let frame = Message::Close(Some(CloseFrame {
                code: CLOSE_TOO_BIG,
                reason: "message too large".into(),
            }));
            let _ = socket.send(frame).await;
        }
        End::Dead => {
            tracing::info!(remote = ?remote, uid = ?link.bound,
                "OpAMP WebSocket did not answer a ping or take a write in time; closing it as dead");
            let frame = Message::Close(Some(CloseFrame {
                code: CLOSE_GOING_AWAY,
                reason: "no answer to ping".into(),
            }));
            // The peer is most likely gone: do not wait on a full socket buffer.
            let _ = tokio::time::timeout(Duration::from_millis(200), socket.send(frame)).await;
        }
        End::Peer => {
            // One message, answered, and the agent closed at once: it uses a connection per
            // message. One message and open for long: an agent that went away, nothing learnt.
            if let (1, Some(uid), Some(at)) = (link.messages, link.bound, link.first_reply) {
                if at.elapsed() < ONE_SHOT_GRACE {
                    sh.ws_styles.insert(uid, (WsStyle::OneShot, now_ms()));
                } else if sh
                    .ws_styles
                    .get(&uid)
                    .is_some_and(|(s, _)| s == WsStyle::OneShot)
                {
                    sh.ws_styles.remove(&uid);
                }
            }
        }
    }
    if let Some(uid) = link.bound.take() {
        // Unbound first, so a reconnecting agent waiting in `bind` gets its uid at once. The
        // disconnect is then written only if nothing newer than this connection's last message
        // was recorded, so it cannot undo the newcomer's "connected", whichever write lands
        // first. On shutdown the store is closing; the next start marks everyone disconnected.
        hub.unbind(uid, link.conn_id);
        if !matches!(end, End::Shutdown) {
            let last_heard = link.peer.map_or_else(now_ms, |p| p.at);
            let res = timed(
                sh.ctx
                    .fleet
                    .store()
                    .set_connected(uid, false, None, None, last_heard),
            )
            .await;
            match res {
                Err(e) => {
                    tracing::warn!(%uid, error = %e, "could not record the agent's disconnection")
                }
                // Reconnected already on another connection: that is not a disconnection.
                Ok(()) if !hub.is_bound(uid) => {
                    sh.ctx.fleet.events().connection_closed(uid, now_ms())
                }
                Ok(()) => {}
            }
        }
        tracing::debug!(%uid, remote = ?remote, "OpAMP WebSocket closed");
    }
}

/// Handles one binary message: decode, process, reply with what is due in it, then push what
/// did not fit if [`push_policy`] allows.
async fn on_binary(
    sh: &Shared,
    link: &mut Link,
    socket: &mut WebSocket,
    data: Bytes,
    deliver_at: &mut Option<Pin<Box<Sleep>>>,
) -> Result<(), End> {
    let header_len = match data.first() {
        Some(0) => read_varint(&data).map_or(0, |(_, n)| n),
        _ => 0,
    };
    if data.len() - header_len > sh.ctx.cfg.max_message_bytes {
        return Err(End::TooLarge);
    }
    let msg: AgentToServer = match decode_ws(&data) {
        Ok(m) => m,
        Err(e) => {
            sh.ctx.fleet.metrics().message("malformed");
            if sh.log_malformed(link.remote) {
                tracing::warn!(remote = ?link.remote, error = %e, "undecodable OpAMP WebSocket message");
            }
            // Nothing decoded, so there is no uid to echo; the connection stays usable.
            let reply = error_reply(
                Vec::new(),
                ServerErrorResponseType::BadRequest,
                format!("message is not a valid OpAMP AgentToServer: {e}"),
            );
            send(sh, socket, reply).await?;
            answered(sh, link);
            return Ok(());
        }
    };
    drop(data);
    match handle(sh, link, &msg).await {
        Ok(h) if link.refused => {
            send(sh, socket, h.reply).await?;
            Err(End::Refused)
        }
        Ok(h) => {
            let mut reply = h.reply;
            // Due commands ride in the answer: for some agents it is the only frame they read.
            let filled = match h.deliver_to {
                Some(uid) => fill_reply(sh, uid, &mut reply, CLAIM_BATCH).await,
                None => Filled::default(),
            };
            link.retry |= filled.failed;
            if let Err(end) = send(sh, socket, reply).await {
                unclaim_all(sh, &filled.placed);
                return Err(end);
            }
            answered(sh, link);
            if (h.deliver_to.is_some() && filled.more) || link.deferred {
                owed(sh, link, socket, deliver_at).await?;
            }
            Ok(())
        }
        Err(e) => {
            sh.ctx.fleet.metrics().reject("overload");
            tracing::warn!(remote = ?link.remote, error = %e, "OpAMP message not processed; answered UNAVAILABLE");
            let reply = unavailable_reply(msg.instance_uid.clone(), &e, sh.ctx.cfg.retry_after_s);
            send(sh, socket, reply).await?;
            answered(sh, link);
            Ok(())
        }
    }
}

/// Sends every due command, each in its own message, in queue order. A command whose write
/// fails goes back to the queue (with everything after it).
async fn deliver(
    sh: &Shared,
    link: &mut Link,
    socket: &mut WebSocket,
    uid: Uuid,
) -> Result<(), End> {
    let fleet = &sh.ctx.fleet;
    loop {
        let cmds = match session::claim(sh, uid, CLAIM_BATCH).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%uid, error = %e,
                    "could not claim queued commands; will retry on the next message or sweep");
                link.retry = true;
                return Ok(());
            }
        };
        if cmds.is_empty() {
            return Ok(());
        }
        let agent = match timed(fleet.store().get_agent(uid)).await {
            Ok(Some(a)) => a,
            other => {
                if let Err(e) = other {
                    tracing::warn!(%uid, error = %e, "could not read the agent to deliver commands");
                }
                unclaim_all(sh, &cmds);
                link.retry = true;
                return Ok(());
            }
        };
        for (i, cmd) in cmds.iter().enumerate() {
            let out = match outgoing_for(sh, cmd, &agent).await {
                Ok(Some(o)) => o,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(%uid, error = %e, "command delivery interrupted");
                    unclaim_all(sh, &cmds[i..]);
                    link.retry = true;
                    return Ok(());
                }
            };
            let mut m = ServerToAgent {
                instance_uid: uid.as_bytes().to_vec(),
                capabilities: SERVER_CAPABILITIES,
                ..Default::default()
            };
            // An empty message has room for any one command.
            apply(&out, &mut m);
            let bytes = encode_ws(&m);
            if !session::fits(sh, bytes.len() - 1) {
                let _ = session::fail(
                    sh,
                    cmd,
                    format!(
                        "not sent: the message would exceed opamp.max_message_bytes ({} bytes)",
                        sh.ctx.cfg.max_message_bytes
                    ),
                )
                .await;
                continue;
            }
            if let Err(e) = before_send(sh, uid, &out).await {
                tracing::warn!(%uid, error = %e, "command delivery interrupted");
                unclaim_all(sh, &cmds[i..]);
                link.retry = true;
                return Ok(());
            }
            if let Err(end) = write(sh, socket, Message::Binary(bytes.into())).await {
                tracing::debug!(%uid, "writing a command failed; it goes back to the queue");
                unclaim_all(sh, &cmds[i..]);
                return Err(end);
            }
            tracing::debug!(command = %cmd.id, %uid, conn = link.conn_id, kind = cmd.kind.as_str(),
                "command delivered over WebSocket");
        }
        if cmds.len() < CLAIM_BATCH {
            return Ok(());
        }
    }
}

/// Claimed commands that were not written: first in line for the agent's next delivery (on
/// any connection), back in the queue if none comes soon (`Fleet::redeliver`).
fn unclaim_all(sh: &Shared, cmds: &[crate::model::Command]) {
    sh.ctx.fleet.park(cmds.to_vec());
}

/// Writes one message (with the 0x00 header), never over the size limit.
async fn send(sh: &Shared, socket: &mut WebSocket, reply: ServerToAgent) -> Result<(), End> {
    let reply = session::fit_reply(sh, reply);
    write(sh, socket, Message::Binary(encode_ws(&reply).into())).await
}

/// One write, bounded: a peer that stopped reading (a vanished host, its TCP buffer full)
/// would otherwise hold the session in this write for the ~15 minutes TCP retries take, with
/// no pong deadline, probe or shutdown looked at. Generous enough for a large remote config
/// over a slow link.
async fn write(sh: &Shared, socket: &mut WebSocket, msg: Message) -> Result<(), End> {
    let within = Duration::from_secs(sh.ctx.cfg.ws_pong_timeout_s.max(WRITE_TIMEOUT_MIN_S));
    match tokio::time::timeout(within, socket.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Peer),
        Err(_) => Err(End::Dead),
    }
}

/// The shortest write timeout, whatever `opamp.ws_pong_timeout_s` says.
const WRITE_TIMEOUT_MIN_S: u64 = 30;

/// Sends a Close frame and waits briefly for the agent's answer, so the close handshake
/// completes instead of the agent seeing a reset.
async fn close_gracefully(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    if socket.send(frame).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = socket.recv().await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Size of the future a closure returns, without ever running it.
    fn future_size<A, F: std::future::Future>(_f: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn an_idle_session_is_small() {
        type Args = (
            Arc<Shared>,
            WebSocket,
            Option<SocketAddr>,
            Option<String>,
            Option<Box<crate::tls::PeerCert>>,
            WsSlot,
        );
        let session = future_size(|(sh, s, r, e, c, slot): Args| run(sh, s, r, e, c, slot));
        // The session task's whole state while idle; message handling is boxed separately.
        // (Socket buffers are heap: ws_read_buffer_bytes + what the write buffer holds.)
        assert!(session < 2048, "session future is {session} bytes");
        type Msg<'a> = (
            &'a Shared,
            &'a mut Link,
            &'a mut WebSocket,
            Bytes,
            &'a mut Option<Pin<Box<Sleep>>>,
        );
        let message = future_size(|(sh, l, s, d, at): Msg| on_binary(sh, l, s, d, at));
        eprintln!("session future {session} bytes; per-message future {message} bytes");
    }
}
