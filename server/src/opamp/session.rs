//! The OpAMP protocol session, independent of transport: one `AgentToServer` in, one
//! `ServerToAgent` out, with the registry updated and commands settled in between; plus how
//! queued commands are put on the wire.
//!
//! The same [`handle`] serves both transports. A WebSocket session keeps its [`Link`] state for
//! the life of the connection; a plain-HTTP request rebuilds it from [`Shared::http_peers`].

use std::net::SocketAddr;
use std::time::Duration;

use flotilla_proto::caps::{agent_has, requests_instance_uid};
use flotilla_proto::v1::server_error_response::Details;
use flotilla_proto::{
    AgentCapabilities, AgentIdentification, AgentToServer, ConnectionSettingsOffers,
    CustomCapabilities, Message, OpAmpConnectionSettings, RetryInfo, ServerCapabilities,
    ServerErrorResponse, ServerErrorResponseType, ServerToAgent, ServerToAgentFlags,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::merge::{merge_status, reports_status};
use super::shared::{Beat, Peer, Shared};
use crate::commands::{self, Outgoing};
use crate::hub::Wake;
use crate::model::{now_ms, Agent, Command, CommandStatus, Millis, Transport};
use crate::service::FleetError;
use crate::store::{Finish, StoreError};

/// Longest we wait for one store operation before telling the agent we are overloaded.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// The server capabilities we really implement, and nothing else.
pub const SERVER_CAPABILITIES: u64 = ServerCapabilities::AcceptsStatus as u64
    | ServerCapabilities::OffersRemoteConfig as u64
    | ServerCapabilities::AcceptsEffectiveConfig as u64
    | ServerCapabilities::OffersConnectionSettings as u64;

const REPORT_FULL_STATE: u64 = ServerToAgentFlags::ReportFullState as u64;

/// Why a message could not be processed now. Always "try again later", never the agent's fault.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("storage unavailable: {0}")]
    Store(#[from] StoreError),
    #[error("storage did not answer within {}s", STORE_TIMEOUT.as_secs())]
    Timeout,
    #[error("{0}")]
    Fleet(#[from] FleetError),
}

/// Runs one store (or fleet) operation with [`STORE_TIMEOUT`].
pub async fn timed<T, E: Into<Unavailable>>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Unavailable> {
    match tokio::time::timeout(STORE_TIMEOUT, f).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(Unavailable::Timeout),
    }
}

/// Claims the agent's due commands (`queued → sent`, or parked ones) within [`STORE_TIMEOUT`].
/// Cutting the wait short loses nothing: a claim that completes after we stopped waiting is
/// parked for the agent's next delivery by [`crate::service::Fleet::claim_due`].
pub async fn claim(sh: &Shared, uid: Uuid, limit: usize) -> Result<Vec<Command>, Unavailable> {
    timed(sh.ctx.fleet.claim_due(uid, limit)).await
}

/// Parks a claimed command for the agent's next delivery when dropped, unless disarmed once
/// the command is on its way. Covers every early return and a future dropped mid-await.
pub struct Unclaim {
    fleet: Option<crate::service::Fleet>,
    cmd: Command,
}

impl Unclaim {
    pub fn new(fleet: &crate::service::Fleet, cmd: &Command) -> Unclaim {
        Unclaim {
            fleet: Some(fleet.clone()),
            cmd: cmd.clone(),
        }
    }

    pub fn disarm(&mut self) {
        self.fleet = None;
    }
}

impl Drop for Unclaim {
    fn drop(&mut self) {
        if let Some(fleet) = self.fleet.take() {
            fleet.park(vec![self.cmd.clone()]);
        }
    }
}

/// The transport side of a session: who is talking and how to reach them.
pub struct Link {
    pub transport: Transport,
    pub remote: Option<SocketAddr>,
    /// The OpAMP URL this agent connected to (scheme, Host header, path), offered back as
    /// `destination_endpoint` with the heartbeat interval. `None` when the request had no Host.
    pub endpoint: Option<String>,
    /// Hub connection id (per WebSocket connection; per agent for plain HTTP).
    pub conn_id: u64,
    /// The WebSocket session's wake-up channel (plain HTTP has none).
    pub wake: Option<mpsc::Sender<Wake>>,
    /// The uid this connection is bound to in the Hub.
    pub bound: Option<Uuid>,
    /// What we know of the bound agent; `None` until its record was read on this link.
    pub peer: Option<Peer>,
    /// Capabilities were sent in a reply on this link.
    pub replied: bool,
    /// Connection settings were offered on this link.
    pub settings_offered: bool,
    /// WebSocket: messages answered on this connection (saturating).
    pub messages: u32,
    /// WebSocket: when the answer to the connection's first message was written.
    pub first_reply: Option<tokio::time::Instant>,
    /// WebSocket: a delivery is owed but may not be pushed yet (see `ws::push_policy`).
    pub deferred: bool,
    /// A delivery failed on store trouble: the agent's next message, heartbeats included,
    /// looks at its queue again.
    pub retry: bool,
    /// The client certificate of this connection (mTLS), verified by the TLS layer.
    pub cert: Option<Box<crate::tls::PeerCert>>,
    /// The uid whose pinned certificate this connection's was checked against.
    pub pin_checked: Option<Uuid>,
    /// The agent was refused (`opamp.tls.pin_uid`): a WebSocket closes after the answer.
    pub refused: bool,
}

impl Link {
    pub fn new(
        transport: Transport,
        remote: Option<SocketAddr>,
        endpoint: Option<String>,
        conn_id: u64,
    ) -> Link {
        Link {
            transport,
            remote,
            endpoint,
            conn_id,
            wake: None,
            bound: None,
            peer: None,
            replied: false,
            settings_offered: false,
            messages: 0,
            first_reply: None,
            deferred: false,
            retry: false,
            cert: None,
            pin_checked: None,
            refused: false,
        }
    }
}

/// Checks the connection's client certificate against the one pinned to `uid` (the first
/// seen for it). `Some`: the refusal to answer with; the agent is not bound or recorded.
async fn check_pin(
    sh: &Shared,
    link: &mut Link,
    uid: Uuid,
    instance_uid: &[u8],
    remote: &str,
) -> Result<Option<Handled>, Unavailable> {
    use subtle::ConstantTimeEq;
    let presented = link.cert.as_ref().map(|c| c.sha256.clone());
    let pinned = match sh.pins.get(&uid) {
        Some(p) => Some(p),
        None => {
            let stored = timed(sh.ctx.fleet.store().get_agent(uid)).await?;
            match stored.and_then(|a| a.client_cert).map(|c| c.sha256) {
                Some(p) => Some(sh.pins.get_or_insert(uid, p)),
                None => match &presented {
                    // The first certificate for this uid: pinned from now on (the record
                    // written for this message carries it, so the registry is read and
                    // written even if this is a heartbeat).
                    Some(c) => {
                        link.peer = None;
                        Some(sh.pins.get_or_insert(uid, c.clone()))
                    }
                    // Nothing to pin (no certificate while client_auth is optional).
                    None => None,
                },
            }
        }
    };
    let reason = match (&pinned, &presented) {
        (None, _) => return Ok(None),
        (Some(p), Some(c)) if bool::from(p.as_bytes().ct_eq(c.as_bytes())) => return Ok(None),
        (Some(_), Some(_)) => "client certificate is not the one pinned to this instance_uid",
        (Some(_), None) => "no client certificate, and this instance_uid has one pinned",
    };
    let fleet = &sh.ctx.fleet;
    fleet.metrics().reject("pinned_certificate");
    if sh.refusal_log.allow(&uid.to_string()) {
        let identity = link.cert.as_ref().map(|c| c.identity.as_str());
        tracing::warn!(mode = "mtls", %remote, %uid, reason, certificate = ?identity,
            "OpAMP agent refused");
        let params = serde_json::json!({
            "mode": "mtls",
            "reason": reason,
            "remote_addr": remote,
            "certificate": link.cert.as_deref(),
            "pinned_sha256": pinned,
        });
        if let Err(e) = timed(fleet.audit_agent_refused(uid, params)).await {
            tracing::error!(%uid, error = %e, "could not audit the refusal of an agent");
        }
    }
    link.refused = true;
    Ok(Some(Handled {
        reply: error_reply(
            instance_uid.to_vec(),
            ServerErrorResponseType::BadRequest,
            format!("refused: {reason}"),
        ),
        deliver_to: None,
        disconnected: false,
    }))
}

/// The result of handling one message.
pub struct Handled {
    pub reply: ServerToAgent,
    /// The agent whose queued commands may now be delivered (`None`: do not look).
    pub deliver_to: Option<Uuid>,
    /// The agent said goodbye (`agent_disconnect`).
    pub disconnected: bool,
}

/// A reply carrying only an error (and the echoed uid, which some clients need even then).
pub fn error_reply(
    instance_uid: Vec<u8>,
    kind: ServerErrorResponseType,
    message: String,
) -> ServerToAgent {
    ServerToAgent {
        instance_uid,
        error_response: Some(ServerErrorResponse {
            r#type: kind as i32,
            error_message: message,
            details: None,
        }),
        ..Default::default()
    }
}

/// The UNAVAILABLE reply for an overloaded server, with the configured retry delay.
pub fn unavailable_reply(
    instance_uid: Vec<u8>,
    why: &Unavailable,
    retry_after_s: u64,
) -> ServerToAgent {
    let mut r = error_reply(
        instance_uid,
        ServerErrorResponseType::Unavailable,
        format!("server overloaded, retry later ({why})"),
    );
    if let Some(e) = r.error_response.as_mut() {
        e.details = Some(Details::RetryInfo(RetryInfo {
            retry_after_nanoseconds: retry_after_s.saturating_mul(1_000_000_000),
        }));
    }
    r
}

/// Handles one decoded message. Errors mean "overloaded now": the caller answers UNAVAILABLE
/// (WebSocket) or 503 (plain HTTP), and nothing the agent must re-send was half-applied.
pub async fn handle(
    sh: &Shared,
    link: &mut Link,
    msg: &AgentToServer,
) -> Result<Handled, Unavailable> {
    let fleet = &sh.ctx.fleet;
    let cfg = &sh.ctx.cfg;
    let remote = link
        .remote
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into());
    let Ok(uid) = Uuid::from_slice(&msg.instance_uid) else {
        fleet.metrics().message("malformed");
        if sh.log_malformed(link.remote) {
            tracing::warn!(%remote, len = msg.instance_uid.len(), transport = link.transport.as_str(),
                "refused OpAMP message: instance_uid is not 16 bytes");
        }
        return Ok(Handled {
            reply: error_reply(
                msg.instance_uid.clone(),
                ServerErrorResponseType::BadRequest,
                format!(
                    "instance_uid must be 16 bytes (a UUID), got {} bytes",
                    msg.instance_uid.len()
                ),
            ),
            deliver_to: None,
            disconnected: false,
        });
    };
    if uid.is_nil() && !requests_instance_uid(msg.flags) {
        // Every agent that forgot to generate a uid would otherwise merge into one record.
        fleet.metrics().message("malformed");
        if sh.log_malformed(link.remote) {
            tracing::warn!(%remote, transport = link.transport.as_str(),
                "refused OpAMP message: instance_uid is all zeros");
        }
        return Ok(Handled {
            reply: error_reply(
                msg.instance_uid.clone(),
                ServerErrorResponseType::BadRequest,
                "instance_uid must not be all zeros: generate a UUIDv7, or set the \
                 RequestInstanceUid flag to be given one"
                    .into(),
            ),
            deliver_to: None,
            disconnected: false,
        });
    }
    let now = now_ms();
    let mut reply = ServerToAgent {
        instance_uid: msg.instance_uid.clone(),
        // Always set: required in the first reply, harmless afterwards, and some clients only
        // look at the latest message.
        capabilities: SERVER_CAPABILITIES,
        ..Default::default()
    };

    // 1. The agent now uses a uid we issued: its record moves over from the old uid. Not to a
    //    speaker on another connection while the old uid is still live on a WebSocket: that
    //    is someone else who knows the uid, and the record stays for the agent it was sent to.
    let claim = match sh.renames.get(&uid) {
        Some((old, _))
            if link.bound != Some(old) && fleet.hub().held_by_other(old, link.conn_id) =>
        {
            tracing::warn!(%old, new = %uid, %remote,
                "a uid offered to a connected agent is used by another connection; not moving its record");
            None
        }
        Some(_) => sh.renames.remove(&uid),
        None => None,
    };
    if let Some((old, _)) = claim {
        let mut audit =
            crate::model::NewAudit::new(&crate::model::Caller::system(), "agent.rename");
        audit.targets = vec![old.to_string(), uid.to_string()];
        audit.params = serde_json::json!({"previous_uid": old.to_string(), "new_uid": uid.to_string(),
            "remote_addr": remote});
        match timed(fleet.store().rename_agent(old, uid, audit)).await {
            Ok(true) => {
                sh.moved.insert(old, now);
                sh.untouch(&old);
                fleet.events().renamed(old, uid);
                tracing::info!(%old, new = %uid, %remote, "agent adopted its new instance uid");
            }
            Ok(false) => {
                if timed(fleet.store().get_agent(old)).await?.is_some() {
                    // The uid it adopted belongs to another agent's record by now: it must not
                    // speak as that agent. It gets another uid, and its own record follows it
                    // there when it adopts that one.
                    let fresh = Uuid::now_v7();
                    sh.renames.insert(fresh, (old, now));
                    tracing::warn!(%old, taken = %uid, %fresh, %remote,
                        "agent adopted a uid another agent's record holds; offering another");
                    return Ok(offer_other_uid(link, reply, fresh));
                }
                tracing::info!(%old, new = %uid, %remote,
                    "agent adopted a new uid, but its old record is gone; it starts afresh");
            }
            Err(e) => {
                sh.renames.insert(uid, (old, now));
                return Err(e);
            }
        }
        if link.bound == Some(old) {
            fleet.hub().unbind(old, link.conn_id);
            link.bound = None;
        }
        link.peer = None;
    }
    // 2. Our record was renamed away under this connection (duplicate uid): start over.
    if sh.moved.remove(&uid).is_some() {
        link.peer = None;
    }
    if link.bound != Some(uid) {
        link.peer = None;
    }

    // 2b. With `pin_uid`, only the certificate pinned to this uid may speak for it.
    if cfg.tls.pin_uid && link.pin_checked != Some(uid) {
        if let Some(refusal) = check_pin(sh, link, uid, &msg.instance_uid, &remote).await? {
            return Ok(refusal);
        }
        link.pin_checked = Some(uid);
    }

    let disconnect = msg.agent_disconnect.is_some();
    let wants_uid = requests_instance_uid(msg.flags);
    let has_desc = msg.agent_description.is_some();
    // Capabilities only make a message a status report when they change what we know.
    let known_caps = link.peer.map_or(msg.capabilities, |p| p.caps);
    let kind = if disconnect {
        "disconnect"
    } else if msg.custom_message.is_some() {
        "custom_message"
    } else if reports_status(msg, known_caps) {
        "status"
    } else {
        "heartbeat"
    };
    fleet.metrics().message(kind);

    // 3. Bind the uid to this connection; a uid held by another live WebSocket is a duplicate.
    if link.transport == Transport::Http || link.bound != Some(uid) {
        match bind(sh, link, uid).await {
            Ok(()) => {
                if let Some(prev) = link.bound.replace(uid) {
                    if prev != uid {
                        fleet.hub().unbind(prev, link.conn_id);
                    }
                }
            }
            Err(_duplicate) => {
                // A second agent (a cloned VM, a copied data directory) that must not inherit
                // the first one's record, labels or queued commands: its new uid starts a
                // record of its own, so nothing is put in `renames`.
                let new = Uuid::now_v7();
                tracing::warn!(%uid, %new, %remote, transport = link.transport.as_str(),
                    "instance_uid already in use by another live connection; offering a new uid");
                return Ok(offer_other_uid(link, reply, new));
            }
        }
    }

    if let Some(cm) = &msg.custom_message {
        let known = commands::SERVER_CUSTOM_CAPABILITIES
            .iter()
            .any(|c| *c == cm.capability || cm.capability.strip_prefix("request:") == Some(*c));
        if !known {
            tracing::debug!(%uid, capability = %cm.capability, r#type = %cm.r#type,
                "custom message on a capability the server does not handle");
        }
    }

    let mut need_full;
    let caps;
    let mut deliver = true;
    match link.peer {
        // A pure heartbeat from an agent we know: batched liveness only, no registry read.
        Some(p) if kind == "heartbeat" && !wants_uid => {
            need_full = !(msg.sequence_num == p.seq || msg.sequence_num == p.seq.wrapping_add(1));
            caps = p.caps;
            let beat = p.beat.heartbeat(now);
            let learnt = (!takes_offered_interval(caps, link))
                .then(|| beat.secs())
                .flatten()
                .filter(|s| Some(*s) != p.beat.secs());
            sh.touch(uid, now, msg.sequence_num, learnt);
            fleet.events().heard(uid, now, learnt);
            link.peer = Some(Peer {
                seq: msg.sequence_num,
                caps,
                at: now,
                beat,
            });
            // Commands queued while connected arrive through Hub::notify; an HTTP agent has no
            // other chance than its poll. A WebSocket agent whose delivery failed, or whose
            // claimed commands wait parked, gets them now rather than at the next wake-up.
            deliver = link.transport == Transport::Http
                || std::mem::take(&mut link.retry)
                || fleet.has_parked(uid);
        }
        prev => {
            let stored = timed(fleet.store().get_agent(uid)).await?;
            let existed = stored.is_some();
            need_full = if !existed {
                // Unknown (new uid, or the registry lost it): we need everything it has.
                !has_desc
            } else if has_desc {
                // This is a full report already; asking again would loop.
                false
            } else {
                // Compared with the last number seen on this link or, for the first message
                // of a connection or since a restart, the last one recorded (a heartbeat not
                // yet flushed counts): messages lost while the agent reconnected, or before a
                // crash of ours, are a gap too. A repeat (HTTP retry) is not.
                let last = match prev {
                    Some(p) => p.seq,
                    None => sh.touches.get(&uid).map_or_else(
                        || stored.as_ref().map_or(0, |a| a.sequence_num),
                        |t| t.sequence_num,
                    ),
                };
                !(msg.sequence_num == last || msg.sequence_num == last.wrapping_add(1))
            };
            let before = stored.unwrap_or_else(|| Agent::new(uid, now, cfg.heartbeat_interval_s));
            let mut after = before.clone();
            merge_status(&mut after, msg);
            after.last_seen = now;
            after.sequence_num = msg.sequence_num;
            after.connected = !disconnect;
            after.departed = disconnect;
            after.transport = Some(link.transport);
            if cfg.tls.client_ca_file.is_some() {
                after.client_cert = link.cert.as_deref().cloned();
            }
            if let Some(a) = link.remote {
                after.remote_addr = Some(a.to_string());
            }
            // Agents we offer an interval use it; the others use their own, which the spec
            // says we cannot know: it is learnt from the spacing of their heartbeats, and until
            // then liveness assumes the recommended default (or what was learnt before). A
            // status message can come at any time, so its spacing teaches nothing.
            let beat = prev.map_or_else(|| Beat::start(now), |p| p.beat);
            after.heartbeat_interval_s = if takes_offered_interval(after.capabilities, link) {
                cfg.heartbeat_interval_s
            } else if let Some(s) = beat.secs() {
                s
            } else if existed {
                before.heartbeat_interval_s
            } else {
                DEFAULT_AGENT_HEARTBEAT_S
            };
            if wants_uid {
                let new = Uuid::now_v7();
                reply.agent_identification = Some(AgentIdentification {
                    new_instance_uid: new.as_bytes().to_vec(),
                });
                if existed {
                    // The record moves when the agent first speaks with the new uid.
                    sh.renames.insert(new, (uid, now));
                } else {
                    // A temporary uid: nothing to carry over, the agent starts life as `new`.
                    after.uid = new;
                }
                tracing::info!(%uid, %new, %remote, "issued a new instance uid on request");
            }
            timed(fleet.store().put_agent(&after)).await?;
            sh.untouch(&uid);
            fleet
                .events()
                .agent_written(existed.then_some(&before), &after, now);
            if existed {
                settle_from(sh, &before, &after, msg, now).await?;
            } else if has_desc {
                link_reregistration(sh, &after, &remote).await;
            }
            // The outcome is stored (or there was none to store): the agent may forget it.
            // Only over WebSocket, where commands are pushed as messages of their own and a
            // reply alone does not say which message was processed; a plain-HTTP reply does,
            // and its custom-message slot is better left to a queued command.
            if link.transport == Transport::Websocket
                && commands::has_custom(&after, commands::CAP_ACK)
            {
                reply.custom_message = commands::result_ack(msg);
            }
            // The spec's MUST: a reported remote-config hash that differs from ours gets the
            // config again. Only when the agent reported one (now, or at the start of this
            // link), so an agent that never reports status is not flooded.
            if agent_has(after.capabilities, AgentCapabilities::AcceptsRemoteConfig)
                && (msg.remote_config_status.is_some() || prev.is_none())
            {
                if let (Some(d), Some(rcs)) = (&after.desired_config, &after.remote_config_status) {
                    if rcs.hash != d.hash {
                        reply.remote_config = Some(commands::remote_config_message(d));
                    }
                }
            }
            caps = after.capabilities;
            link.peer = (after.uid == uid).then_some(Peer {
                seq: msg.sequence_num,
                caps,
                at: now,
                beat,
            });
        }
    }

    if disconnect {
        // It is leaving: no flags, no settings, no commands; forget the association.
        need_full = false;
        deliver = false;
        fleet.hub().unbind(uid, link.conn_id);
        link.bound = None;
        link.peer = None;
        tracing::debug!(%uid, %remote, "agent disconnected (agent_disconnect)");
    }
    if need_full {
        reply.flags |= REPORT_FULL_STATE;
    }
    if !disconnect {
        offer_settings(link, msg, caps, &mut reply, cfg.heartbeat_interval_s);
    }
    finish_reply(link, &mut reply);
    Ok(Handled {
        reply,
        deliver_to: deliver.then_some(uid),
        disconnected: disconnect,
    })
}

/// Binds `uid` to this link in the Hub. A well-behaved agent closes its old WebSocket before
/// reconnecting, but the old session may not have seen that close yet, and a host that
/// vanished leaves a half-open connection that never will. So before calling the newcomer a
/// duplicate we ask the holder to prove it is alive (a ping with a
/// [`super::ws::PROBE_PONG_TIMEOUT`] deadline; a dead holder's session ends and frees the uid)
/// and retry until that verdict is in. Only this rare path sleeps.
async fn bind(sh: &Shared, link: &Link, uid: Uuid) -> Result<(), crate::hub::Duplicate> {
    let hub = sh.ctx.fleet.hub();
    let grace = super::ws::PROBE_PONG_TIMEOUT
        .min(Duration::from_secs(sh.ctx.cfg.ws_pong_timeout_s))
        + Duration::from_millis(500);
    let start = tokio::time::Instant::now();
    let mut step = Duration::from_millis(10);
    // Re-asked every second: a probe that found the holder's wake channel full is lost.
    let mut next_probe = Duration::ZERO;
    loop {
        match hub.bind(uid, link.conn_id, link.transport, link.wake.clone()) {
            Ok(()) => return Ok(()),
            Err(d) if start.elapsed() >= grace => return Err(d),
            Err(_) => {
                if start.elapsed() >= next_probe {
                    hub.probe(uid);
                    next_probe += Duration::from_secs(1);
                }
                tokio::time::sleep(step).await;
                step = (step * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// The answer to a message that must not be merged under the uid it carries: a uid of its own,
/// and a request to report everything again under it.
fn offer_other_uid(link: &mut Link, mut reply: ServerToAgent, new: Uuid) -> Handled {
    reply.agent_identification = Some(AgentIdentification {
        new_instance_uid: new.as_bytes().to_vec(),
    });
    reply.flags |= REPORT_FULL_STATE;
    finish_reply(link, &mut reply);
    Handled {
        reply,
        deliver_to: None,
        disconnected: false,
    }
}

/// Custom capabilities go in the first reply of a WebSocket and in every plain-HTTP reply
/// (as opamp-go does: an HTTP agent has no "connection" to remember them by).
fn finish_reply(link: &mut Link, reply: &mut ServerToAgent) {
    // Also with every ack: an agent that missed the first reply (a command in it leaves no
    // room) learns from the next ack that acks are what confirm its results.
    let ack = reply
        .custom_message
        .as_ref()
        .is_some_and(|m| m.r#type == "ack");
    if !link.replied || link.transport == Transport::Http || ack {
        reply.custom_capabilities = Some(CustomCapabilities {
            capabilities: commands::SERVER_CUSTOM_CAPABILITIES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        });
    }
    link.replied = true;
}

/// The heartbeat interval the spec recommends, and the one agents use unless offered another.
pub const DEFAULT_AGENT_HEARTBEAT_S: u64 = 30;

/// True if we offer this agent our heartbeat interval (so it uses it): it takes OpAMP
/// connection settings, sends heartbeats, and we know the endpoint to offer with it.
fn takes_offered_interval(caps: u64, link: &Link) -> bool {
    agent_has(caps, AgentCapabilities::AcceptsOpAmpConnectionSettings)
        && agent_has(caps, AgentCapabilities::ReportsHeartbeat)
        && link.endpoint.is_some()
}

/// Offers the heartbeat interval to agents that can take OpAMP connection settings and send
/// heartbeats: once per link, and again whenever the agent reports a different settings hash.
fn offer_settings(
    link: &mut Link,
    msg: &AgentToServer,
    caps: u64,
    reply: &mut ServerToAgent,
    interval_s: u64,
) {
    let able = takes_offered_interval(caps, link);
    let Some(endpoint) = link.endpoint.as_deref().filter(|_| able) else {
        return;
    };
    let offers = connection_settings(endpoint, interval_s);
    let offer = match &msg.connection_settings_status {
        Some(s) => s.last_connection_settings_hash != offers.hash,
        None => !link.settings_offered,
    };
    if offer {
        reply.connection_settings = Some(offers);
        link.settings_offered = true;
    }
}

/// The connection settings we offer, with a hash that depends only on their content (so an
/// agent sees the same hash on every connection and does not re-apply them).
pub fn connection_settings(endpoint: &str, interval_s: u64) -> ConnectionSettingsOffers {
    let mut h = Sha256::new();
    h.update(b"flotilla-opamp-settings-v1\0");
    h.update(endpoint.as_bytes());
    h.update(b"\0");
    h.update(interval_s.to_be_bytes());
    ConnectionSettingsOffers {
        hash: h.finalize().to_vec(),
        opamp: Some(OpAmpConnectionSettings {
            // The spec requires a non-empty endpoint: it is where the agent already is.
            destination_endpoint: endpoint.to_string(),
            heartbeat_interval_seconds: interval_s,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A new agent whose `service.instance.id` and host match a silent record is most likely that
/// agent back under a uid made up at start (fluent-opamp supervisors do this): the two are
/// linked (`replaces` / `replaced_by`, audited) so the old one shows as replaced instead of as
/// a ghost. Labels and queued commands stay where they are: the link is a strong guess, not
/// proof. Best effort: a store problem here only costs the link.
async fn link_reregistration(sh: &Shared, agent: &Agent, remote: &str) {
    let Some(key) = agent.identity_key() else {
        return;
    };
    let fleet = &sh.ctx.fleet;
    let candidates = match timed(fleet.store().same_identity(&key, agent.uid, 4)).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(uid = %agent.uid, error = %e, "could not look for an earlier record of this agent");
            return;
        }
    };
    // One that is live right now is a second agent with the same identity, not this one...
    let hub = fleet.hub();
    if let Some(old) = candidates.iter().copied().find(|u| !hub.is_bound(*u)) {
        link(fleet, old, agent, remote).await;
        return;
    }
    // ...unless its "live" WebSocket is what a rebooted host left behind: ask it to prove it,
    // and link once it turns out dead.
    if let Some(old) = candidates.iter().copied().find(|u| hub.probe(*u)) {
        let (fleet, agent, remote) = (fleet.clone(), agent.clone(), remote.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(super::ws::PROBE_PONG_TIMEOUT + Duration::from_secs(1)).await;
            if !fleet.hub().is_bound(old) {
                link(&fleet, old, &agent, &remote).await;
            }
        });
        return;
    }
    // A plain-HTTP agent stays bound until it has been silent for an hour, and one that
    // restarts rarely says goodbye (the Node client never does): it is this agent's earlier
    // self if it has not polled for two of its heartbeat intervals since this registration.
    let Some(old) = candidates
        .into_iter()
        .find(|u| sh.http_peers.get(u).is_some())
    else {
        return;
    };
    let (fleet, agent, remote) = (fleet.clone(), agent.clone(), remote.to_string());
    tokio::spawn(async move {
        let since = crate::model::now_ms();
        let interval_s = match timed(fleet.store().get_agent(old)).await {
            Ok(Some(a)) => a.heartbeat_interval_s,
            _ => return,
        };
        let wait = Duration::from_secs(interval_s.saturating_mul(2).clamp(2, 600));
        // Two more seconds for the batched heartbeat write (every second) that shows a poll.
        tokio::time::sleep(wait + Duration::from_secs(2)).await;
        if let Ok(Some(a)) = timed(fleet.store().get_agent(old)).await {
            if a.last_seen < since {
                link(&fleet, old, &agent, &remote).await;
            }
        }
    });
}

/// Records that `agent` re-registered in place of `old` (audited as `agent.reregistered`).
async fn link(fleet: &crate::service::Fleet, old: Uuid, agent: &Agent, remote: &str) {
    let mut audit =
        crate::model::NewAudit::new(&crate::model::Caller::system(), "agent.reregistered");
    audit.targets = vec![old.to_string(), agent.uid.to_string()];
    audit.params = serde_json::json!({
        "replaced_uid": old.to_string(), "new_uid": agent.uid.to_string(),
        "service.instance.id": agent.attr("service.instance.id"),
        "remote_addr": remote,
    });
    match timed(fleet.store().link_reregistration(old, agent.uid, audit)).await {
        Ok(true) => tracing::info!(%old, new = %agent.uid, %remote,
            "agent re-registered under a new uid; earlier record marked replaced"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(%old, new = %agent.uid, error = %e, "could not link a re-registration")
        }
    }
}

/// Settles the agent's sent commands from what this message says.
async fn settle_from(
    sh: &Shared,
    before: &Agent,
    after: &Agent,
    msg: &AgentToServer,
    now: Millis,
) -> Result<(), Unavailable> {
    let fleet = &sh.ctx.fleet;
    let sent = timed(fleet.store().sent_for(after.uid)).await?;
    if sent.is_empty() {
        return Ok(());
    }
    for (id, finish) in commands::observe(before, after, msg, &sent, now) {
        if let Some(cmd) = sent.iter().find(|c| c.id == id) {
            tracing::debug!(command = %id, status = finish.to.as_str(), "command settled by agent report");
            timed(fleet.settle(cmd, &[CommandStatus::Sent], finish)).await?;
        }
    }
    Ok(())
}

/// Turns a claimed command into what goes on the wire, re-checking at send time that the
/// agent still declares what the command needs (it may have changed its capabilities since
/// the command was queued). A command it can no longer run is settled `failed` and skipped.
pub async fn outgoing_for(
    sh: &Shared,
    cmd: &Command,
    agent: &Agent,
) -> Result<Option<Outgoing>, Unavailable> {
    if let Outgoing::NewUid(new) = commands::encode(cmd, agent) {
        // Another agent already holds it, or was offered it: two agents adopting one uid
        // would merge into one record.
        let offered_to = sh
            .renames
            .get(&new)
            .map(|(a, _)| a)
            .filter(|a| *a != agent.uid);
        let held = timed(sh.ctx.fleet.store().get_agent(new)).await?.is_some();
        if held || offered_to.is_some() {
            let why = match offered_to {
                Some(other) => {
                    format!("not sent: new uid {new} was already offered to agent {other}")
                }
                None => format!("not sent: new uid {new} belongs to another agent by now"),
            };
            tracing::info!(command = %cmd.id, agent = %agent.uid, %new, "{why}");
            fail(sh, cmd, why).await?;
            return Ok(None);
        }
    }
    if let Err(e) = commands::check_capable(agent, cmd.kind, &cmd.params) {
        tracing::info!(command = %cmd.id, agent = %agent.uid, error = %e, "command not sent");
        fail(
            sh,
            cmd,
            format!("not sent: {e} (capabilities changed after it was queued)"),
        )
        .await?;
        return Ok(None);
    }
    Ok(Some(commands::encode(cmd, agent)))
}

/// Settles a claimed command as failed without sending it.
pub async fn fail(sh: &Shared, cmd: &Command, error: String) -> Result<(), Unavailable> {
    let finish = Finish {
        to: CommandStatus::Failed,
        result: None,
        error: Some(error),
        at: now_ms(),
    };
    timed(sh.ctx.fleet.settle(cmd, &[CommandStatus::Sent], finish)).await?;
    Ok(())
}

/// What [`fill_reply`] put into a reply.
#[derive(Debug, Default)]
pub struct Filled {
    /// Commands now in the reply (claimed `sent`): a transport whose write fails puts them back.
    pub placed: Vec<Command>,
    /// It stopped with commands still queued (one could not share the reply, or `max` was
    /// reached): they need messages of their own.
    pub more: bool,
    /// Store trouble stopped it: what is due waits for the next message or wake-up.
    pub failed: bool,
}

/// How one claimed command fared in [`fill_reply`].
enum Placement {
    /// In the reply.
    Placed,
    /// Settled `failed` at send time: not sent, and nothing to put back.
    Settled,
    /// It cannot share this reply: it goes back to the queue, and so does everything after it.
    Wait,
}

/// Puts the agent's due commands into `reply` — the answer to its message — in queue order, as
/// many as can share it, at most `max`: a standard command only into a reply that carries
/// nothing else, one custom message and one new uid per message (see [`apply`]). The first one
/// that cannot join stays queued, and everything after it too, so the order holds. Whether a
/// command would join is asked before it is claimed, so a command that must wait is never marked
/// `sent`. Store trouble ends the filling early (logged): what is placed stays placed.
///
/// Replies come first because some agents read nothing else: fluent-opamp's WebSocket consumer
/// reads exactly one frame per connection, and a plain-HTTP agent only has its reply.
pub async fn fill_reply(sh: &Shared, agent: Uuid, reply: &mut ServerToAgent, max: usize) -> Filled {
    let fleet = &sh.ctx.fleet;
    let mut filled = Filled::default();
    let mut record: Option<Agent> = None;
    // Every round places a command, settles one (it leaves the queue) or stops.
    let mut rounds = max.saturating_mul(4).max(4);
    let res: Result<(), Unavailable> = async {
        while filled.placed.len() < max {
            let Some(next) = timed(fleet.peek_due(agent)).await? else {
                return Ok(());
            };
            rounds -= 1;
            if rounds == 0 {
                filled.more = true;
                return Ok(());
            }
            if record.is_none() {
                record = timed(fleet.store().get_agent(agent)).await?;
            }
            let Some(rec) = record.as_ref() else {
                return Ok(());
            };
            if !apply(&commands::encode(&next, rec), &mut reply.clone()) {
                filled.more = true;
                return Ok(());
            }
            let Some(cmd) = claim(sh, agent, 1).await?.pop() else {
                // Expired and not swept yet, or taken by another session.
                return Ok(());
            };
            // Until it is in the reply, the claim is undone however this ends, including the
            // handler being dropped because the agent hung up mid-request.
            let mut guard = Unclaim::new(fleet, &cmd);
            let placement = place(sh, &cmd, rec, reply).await;
            guard.disarm();
            match placement {
                Ok(Placement::Placed) => filled.placed.push(cmd),
                Ok(Placement::Settled) => {}
                Ok(Placement::Wait) => {
                    // First in line for the next message or push.
                    fleet.park(vec![cmd]);
                    filled.more = true;
                    return Ok(());
                }
                Err(e) => {
                    fleet.park(vec![cmd]);
                    return Err(e);
                }
            }
        }
        filled.more = true;
        Ok(())
    }
    .await;
    if let Err(e) = res {
        // The reply itself is good; what is still queued waits for the next chance.
        tracing::warn!(%agent, error = %e, "could not put queued commands into the reply");
        filled.failed = true;
    }
    filled
}

/// Puts one claimed command into `reply` if it can share it and the result still fits.
async fn place(
    sh: &Shared,
    cmd: &Command,
    agent: &Agent,
    reply: &mut ServerToAgent,
) -> Result<Placement, Unavailable> {
    let Some(out) = outgoing_for(sh, cmd, agent).await? else {
        return Ok(Placement::Settled);
    };
    let mut trial = reply.clone();
    if !apply(&out, &mut trial) {
        return Ok(Placement::Wait);
    }
    if !fits(sh, trial.encoded_len()) {
        // Too big beside what the reply carries: a message of its own may still take it.
        let mut alone = ServerToAgent {
            instance_uid: reply.instance_uid.clone(),
            capabilities: SERVER_CAPABILITIES,
            ..Default::default()
        };
        if apply(&out, &mut alone) && fits(sh, alone.encoded_len()) {
            return Ok(Placement::Wait);
        }
        fail(
            sh,
            cmd,
            format!(
                "not sent: the message would exceed opamp.max_message_bytes ({} bytes)",
                sh.ctx.cfg.max_message_bytes
            ),
        )
        .await?;
        return Ok(Placement::Settled);
    }
    before_send(sh, agent.uid, &out).await?;
    *reply = trial;
    tracing::debug!(command = %cmd.id, agent = %agent.uid, kind = cmd.kind.as_str(),
        "command delivered in the reply");
    Ok(Placement::Placed)
}

/// Puts `out` into `msg`. Returns false (and leaves `msg` alone) when it cannot share the
/// message with what is already there: a standard command travels alone, and one message has
/// room for one new uid and one custom message.
pub fn apply(out: &Outgoing, msg: &mut ServerToAgent) -> bool {
    let busy = msg.command.is_some();
    match out {
        Outgoing::Command(c) => {
            let alone = msg.flags == 0
                && msg.remote_config.is_none()
                && msg.connection_settings.is_none()
                && msg.agent_identification.is_none()
                && msg.custom_message.is_none()
                && msg.packages_available.is_none()
                && msg.error_response.is_none()
                && !busy;
            if alone {
                // Custom capabilities are not "other content" in spirit, but the spec allows
                // only instance_uid and capabilities next to a command.
                msg.custom_capabilities = None;
                msg.command = Some(*c);
            }
            alone
        }
        _ if busy => false,
        Outgoing::Flags(f) => {
            msg.flags |= f;
            true
        }
        Outgoing::NewUid(u) => {
            if msg.agent_identification.is_some() {
                return false;
            }
            msg.agent_identification = Some(AgentIdentification {
                new_instance_uid: u.as_bytes().to_vec(),
            });
            true
        }
        Outgoing::Custom(m) => {
            if msg.custom_message.is_some() {
                return false;
            }
            msg.custom_message = Some(m.clone());
            true
        }
        Outgoing::RemoteConfig(rc, _) => {
            // The command's config is the newest wish; it replaces a re-offered older one.
            msg.remote_config = Some(rc.clone());
            true
        }
    }
}

/// Side effects that must happen before a command is written: the desired config is recorded
/// (so later hash reports are compared with it), a new uid is remembered for the rename.
pub async fn before_send(sh: &Shared, agent: Uuid, out: &Outgoing) -> Result<(), Unavailable> {
    match out {
        Outgoing::RemoteConfig(_, desired) => {
            timed(
                sh.ctx
                    .fleet
                    .store()
                    .set_desired_config(agent, Some(desired)),
            )
            .await
        }
        Outgoing::NewUid(new) => {
            sh.renames.insert(*new, (agent, now_ms()));
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Encoded size check: the spec forbids sending a message over the limit.
pub fn fits(sh: &Shared, encoded_len: usize) -> bool {
    encoded_len <= sh.ctx.cfg.max_message_bytes
}

/// Keeps a reply within `max_message_bytes`: only a re-offered remote config can make it big,
/// and the agent still gets the rest. A reply still over the limit becomes an error reply
/// (the spec forbids sending it; it is logged).
pub fn fit_reply(sh: &Shared, mut reply: ServerToAgent) -> ServerToAgent {
    if fits(sh, reply.encoded_len()) {
        return reply;
    }
    if reply.remote_config.take().is_some() && fits(sh, reply.encoded_len()) {
        tracing::error!(uid = %hex::encode(&reply.instance_uid), limit = sh.ctx.cfg.max_message_bytes,
            "remote config exceeds opamp.max_message_bytes; not sent");
        return reply;
    }
    tracing::error!(uid = %hex::encode(&reply.instance_uid), size = reply.encoded_len(),
        "OpAMP reply exceeds opamp.max_message_bytes; not sent");
    error_reply(
        reply.instance_uid,
        ServerErrorResponseType::Unknown,
        "the server's reply exceeded its message size limit".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{CustomMessage, ServerToAgentCommand};

    #[test]
    fn unavailable_carries_retry_info_and_the_uid() {
        let r = unavailable_reply(vec![9; 16], &Unavailable::Timeout, 30);
        assert_eq!(r.instance_uid, vec![9; 16]);
        let e = r.error_response.expect("error");
        assert_eq!(e.r#type, ServerErrorResponseType::Unavailable as i32);
        assert_eq!(
            e.details,
            Some(Details::RetryInfo(RetryInfo {
                retry_after_nanoseconds: 30_000_000_000
            }))
        );
        // Nothing else may accompany an error.
        assert_eq!(r.capabilities, 0);
        assert!(r.custom_capabilities.is_none() && r.flags == 0);
    }

    #[test]
    fn a_standard_command_travels_alone() {
        let cmd = Outgoing::Command(ServerToAgentCommand { r#type: 0 });
        let mut m = ServerToAgent {
            capabilities: SERVER_CAPABILITIES,
            custom_capabilities: Some(CustomCapabilities::default()),
            ..Default::default()
        };
        assert!(apply(&cmd, &mut m));
        assert!(m.command.is_some() && m.custom_capabilities.is_none());
        assert_eq!(m.capabilities, SERVER_CAPABILITIES);
        // Nothing joins it, and it joins nothing.
        assert!(!apply(&Outgoing::Flags(REPORT_FULL_STATE), &mut m));
        let mut flagged = ServerToAgent {
            flags: REPORT_FULL_STATE,
            ..Default::default()
        };
        assert!(!apply(&cmd, &mut flagged));
        assert!(flagged.command.is_none());
        // Other kinds merge, one custom message per message.
        let custom = Outgoing::Custom(CustomMessage::default());
        assert!(apply(&custom, &mut flagged));
        assert!(!apply(&custom, &mut flagged));
    }

    #[test]
    fn settings_hash_is_stable_and_covers_the_settings() {
        let a = connection_settings("ws://h:4320/v1/opamp", 30);
        assert_eq!(a, connection_settings("ws://h:4320/v1/opamp", 30));
        assert_ne!(a.hash, connection_settings("ws://h:4320/v1/opamp", 31).hash);
        assert_ne!(
            a.hash,
            connection_settings("http://h:4320/v1/opamp", 30).hash
        );
        assert_eq!(
            a.opamp.unwrap().destination_endpoint,
            "ws://h:4320/v1/opamp"
        );
    }
}
