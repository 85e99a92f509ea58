//! The next AgentToServer: sequence numbers, status compression (only changed sub-messages),
//! the full-state controllers, ReportFullState, queued custom messages (command results) with
//! their confirmation (the server's ack, or its answer where it does not ack), and the final
//! agent_disconnect. Shared between the core (which updates the state) and the transport
//! (which asks for a message whenever it may send).

use std::collections::VecDeque;
use std::time::Instant;

use flotilla_proto::{
    AgentDescription, AgentDisconnect, AgentToServer, ComponentHealth, CustomCapabilities,
    CustomMessage, EffectiveConfig, RemoteConfigStatus,
};
use uuid::Uuid;

use crate::commands;
use crate::config::{FullStateController, CAP_ACK};

/// Most custom messages kept waiting (results are small; a server that never answers must not
/// grow memory forever).
const MAX_QUEUE: usize = 256;

/// A result the server answered this many times without acknowledging it counts as delivered.
/// A server that declares [`CAP_ACK`] but (or any server that stops acking)
/// would otherwise get every result again after every reconnect, forever. Three answered sends
/// are far more than a Flotilla server that acks ever needs: it acks in its reply to the very
/// message, so only a result whose connection died three times in a row before that reply
/// arrived is given up on.
pub const MAX_UNACKED_ANSWERS: u32 = 3;

/// A custom message on its way, with what confirming it needs.
#[derive(Debug, Clone)]
struct Outbound {
    msg: CustomMessage,
    /// The command id when this is a Flotilla result: the server's ack for it confirms it.
    ack_id: Option<String>,
    /// Connections on which the server answered the message carrying it but did not ack it.
    unacked_answers: u32,
}

/// A custom message sent on this connection and not yet confirmed.
#[derive(Debug)]
struct Sent {
    /// Its position among the messages sent on this connection.
    pos: u64,
    out: Outbound,
    /// The server answered the message that carried it (by reply count), without an ack.
    answered: bool,
}

/// Current state and what the server was last told.
#[derive(Debug)]
pub struct Reporter {
    uid: Uuid,
    capabilities: u64,
    seq: u64,
    description: AgentDescription,
    custom_caps: CustomCapabilities,
    health: Option<ComponentHealth>,
    effective: Option<EffectiveConfig>,
    remote_status: Option<RemoteConfigStatus>,
    sent_description: Option<AgentDescription>,
    sent_custom_caps: Option<CustomCapabilities>,
    sent_health: Option<ComponentHealth>,
    sent_effective: Option<EffectiveConfig>,
    sent_remote_status: Option<RemoteConfigStatus>,
    /// Results and reports not yet sent.
    queue: VecDeque<Outbound>,
    /// Sent, but not yet confirmed: re-queued if the connection drops (the server ignores a
    /// result for a command already settled, so a duplicate is harmless).
    unconfirmed: Vec<Sent>,
    /// The server acks Flotilla results: it declared [`CAP_ACK`] in its
    /// custom_capabilities, or sent an ack. Then, on a WebSocket, only the ack confirms a
    /// result (see [`Reporter::confirm_replies`]).
    server_acks: bool,
    /// Messages built since the connection (re)started.
    conn_sent: u64,
    controller: FullStateController,
    sends_since_full: u64,
    last_full: Instant,
    full_pending: bool,
    /// The next message (whenever it goes) carries the full state, without causing one.
    full_next: bool,
}

impl Reporter {
    pub fn new(
        uid: Uuid,
        capabilities: u64,
        custom: Vec<String>,
        controller: FullStateController,
    ) -> Self {
        Reporter {
            uid,
            capabilities,
            seq: 0,
            description: AgentDescription::default(),
            custom_caps: CustomCapabilities {
                capabilities: custom,
            },
            health: None,
            effective: None,
            remote_status: None,
            sent_description: None,
            sent_custom_caps: None,
            sent_health: None,
            sent_effective: None,
            sent_remote_status: None,
            queue: VecDeque::new(),
            unconfirmed: Vec::new(),
            server_acks: false,
            conn_sent: 0,
            controller,
            sends_since_full: 0,
            last_full: Instant::now(),
            full_pending: true,
            full_next: false,
        }
    }

    pub fn uid(&self) -> Uuid {
        self.uid
    }

    /// Switches to a new instance uid; the description is re-sent (it names the uid).
    pub fn set_uid(&mut self, uid: Uuid) {
        self.uid = uid;
        self.full_pending = true;
    }

    pub fn set_description(&mut self, d: AgentDescription) {
        self.description = d;
    }

    pub fn description(&self) -> &AgentDescription {
        &self.description
    }

    pub fn set_health(&mut self, h: ComponentHealth) {
        self.health = Some(h);
    }

    pub fn health(&self) -> Option<&ComponentHealth> {
        self.health.as_ref()
    }

    pub fn set_effective(&mut self, e: EffectiveConfig) {
        self.effective = Some(e);
    }

    pub fn set_remote_status(&mut self, s: RemoteConfigStatus) {
        self.remote_status = Some(s);
    }

    /// Re-sends the remote config status even if unchanged (same hash offered again).
    pub fn resend_remote_status(&mut self) {
        self.sent_remote_status = None;
    }

    /// Queues a custom message (one travels per AgentToServer).
    pub fn push_custom(&mut self, m: CustomMessage) {
        if self.queue.len() >= MAX_QUEUE {
            tracing::warn!("custom message queue full; dropping the oldest report");
            self.queue.pop_front();
        }
        let ack_id = commands::result_id(&m);
        self.queue.push_back(Outbound {
            msg: m,
            ack_id,
            unacked_answers: 0,
        });
    }

    /// Everything is sent again with the next message (ReportFullState, error responses).
    pub fn request_full_state(&mut self) {
        self.full_pending = true;
    }

    /// The next message, whenever something causes one, carries the full state. Used after an
    /// error response: sending at once could loop with a server that refuses every message.
    pub fn full_state_next_time(&mut self) {
        self.full_next = true;
    }

    /// A new connection: report the full state first, and re-send what may have been lost.
    pub fn connection_lost(&mut self) {
        self.full_pending = true;
        self.conn_sent = 0;
        let mut resent: usize = 0;
        for mut s in self.unconfirmed.drain(..).rev() {
            if s.answered {
                s.out.unacked_answers += 1;
            }
            if s.out.unacked_answers >= MAX_UNACKED_ANSWERS {
                tracing::warn!(
                    command_id = s.out.ack_id.as_deref().unwrap_or("-"),
                    "the server answered the message carrying this result {} times but never \
                     acknowledged it; counting the answers as delivery and not sending it again",
                    s.out.unacked_answers
                );
                continue;
            }
            resent += 1;
            self.queue.push_front(s.out);
        }
        // The oldest go, as in `push_custom`: they are the re-queued results, sent at least once
        // already and perhaps processed, while the newest were never sent.
        let excess = self.queue.len().saturating_sub(MAX_QUEUE);
        if excess > 0 {
            self.queue.drain(..excess);
            resent = resent.saturating_sub(excess);
            tracing::warn!(
                dropped = excess,
                "custom message queue full; dropping the oldest unconfirmed results"
            );
        }
        if resent > 0 {
            tracing::info!(
                results = resent,
                "re-sending results the server has not confirmed"
            );
        }
    }

    /// The server's custom_capabilities (a Flotilla server sends them in its first WebSocket
    /// reply and in every HTTP reply): whether it acks results.
    pub fn server_capabilities(&mut self, caps: &[String]) {
        self.server_acks = caps.iter().any(|c| c == CAP_ACK);
    }

    /// A new endpoint: whether it acks is not known until it says so.
    pub fn server_changed(&mut self) {
        self.server_acks = false;
    }

    /// The server acknowledged the result of `command_id`: it processed it, so neither the
    /// sent copy nor a queued duplicate (a re-delivered command's stored result) is needed.
    /// Returns false if no such result was waiting.
    pub fn ack(&mut self, command_id: &str) -> bool {
        self.server_acks = true;
        let before = self.unconfirmed.len() + self.queue.len();
        self.unconfirmed
            .retain(|s| s.out.ack_id.as_deref() != Some(command_id));
        self.queue
            .retain(|o| o.ack_id.as_deref() != Some(command_id));
        self.unconfirmed.len() + self.queue.len() < before
    }

    /// Plain HTTP: the answer to a POST is the answer to the one message it carried, so
    /// everything sent so far arrived.
    pub fn confirm(&mut self) {
        self.unconfirmed.clear();
    }

    /// WebSocket: `replies` ServerToAgent messages have arrived on this connection. Against a
    /// server that acks, a Flotilla result is confirmed only by its ack: a Flotilla server
    /// also pushes each queued command as a frame of its own, so counting frames as answers
    /// would confirm a result the server never processed. Everything else (and everything,
    /// against a server that does not ack) is confirmed by position: the server answers every
    /// AgentToServer in order, so the n-th answer proves the first n messages arrived, and a
    /// frame that merely arrives after a message was sent proves nothing. There a frame the
    /// server sends unasked counts like an answer and can confirm one message early.
    pub fn confirm_replies(&mut self, replies: u64) {
        let acks = self.server_acks;
        self.unconfirmed.retain_mut(|s| {
            if s.pos >= replies {
                return true;
            }
            if acks && s.out.ack_id.is_some() {
                s.answered = true;
                return true;
            }
            false
        });
    }

    /// True if the next [`Reporter::build`] without heartbeat would send something.
    pub fn has_pending(&self) -> bool {
        self.full_pending
            || !self.queue.is_empty()
            || self.sent_description.as_ref() != Some(&self.description)
            || self.sent_custom_caps.as_ref() != Some(&self.custom_caps)
            || self.sent_effective != self.effective
            || self.sent_remote_status != self.remote_status
            || health_changed_significantly(self.sent_health.as_ref(), self.health.as_ref())
    }

    /// The next message, or `None` when there is nothing to say and no heartbeat is due.
    pub fn build(&mut self, heartbeat: bool) -> Option<AgentToServer> {
        if !heartbeat && !self.has_pending() {
            return None;
        }
        // The controllers only widen a message that is being sent anyway.
        let full = self.full_pending
            || self.full_next
            || match self.controller {
                FullStateController::AlwaysSend => true,
                FullStateController::SentCount { n } => self.sends_since_full + 1 >= n,
                FullStateController::TimeSend { secs } => {
                    self.last_full.elapsed().as_secs() >= secs
                }
            };
        let mut m = AgentToServer {
            instance_uid: self.uid.as_bytes().to_vec(),
            sequence_num: self.seq,
            // Always present: 8 bytes, and a server must not have to guess it.
            capabilities: self.capabilities,
            ..Default::default()
        };
        if full || self.sent_description.as_ref() != Some(&self.description) {
            m.agent_description = Some(self.description.clone());
            self.sent_description = Some(self.description.clone());
        }
        if full || self.sent_custom_caps.as_ref() != Some(&self.custom_caps) {
            m.custom_capabilities = Some(self.custom_caps.clone());
            self.sent_custom_caps = Some(self.custom_caps.clone());
        }
        // Counter-only changes in components ride along with the next message instead of
        // causing one of their own, so a busy pipeline does not make a message per poll.
        if let Some(h) = &self.health {
            if full || self.sent_health.as_ref().map(strip_time) != Some(strip_time(h)) {
                m.health = Some(h.clone());
                self.sent_health = Some(h.clone());
            }
        }
        if let Some(e) = &self.effective {
            if full || self.sent_effective.as_ref() != Some(e) {
                m.effective_config = Some(e.clone());
                self.sent_effective = Some(e.clone());
            }
        }
        if let Some(s) = &self.remote_status {
            if full || self.sent_remote_status.as_ref() != Some(s) {
                m.remote_config_status = Some(s.clone());
                self.sent_remote_status = Some(s.clone());
            }
        }
        if let Some(c) = self.queue.pop_front() {
            if self.unconfirmed.len() >= MAX_QUEUE {
                // A server that never answers: keep memory bounded.
                let gone = self.unconfirmed.remove(0);
                tracing::warn!(
                    command_id = gone.out.ack_id.as_deref().unwrap_or("-"),
                    "{MAX_QUEUE} results sent and not confirmed; no longer re-sending the oldest"
                );
            }
            m.custom_message = Some(c.msg.clone());
            self.unconfirmed.push(Sent {
                pos: self.conn_sent,
                out: c,
                answered: false,
            });
        }
        self.conn_sent += 1;
        self.seq += 1;
        if full {
            self.full_pending = false;
            self.full_next = false;
            self.sends_since_full = 0;
            self.last_full = Instant::now();
        } else {
            self.sends_since_full += 1;
        }
        Some(m)
    }

    /// The last message: agent_disconnect (spec: MUST be in the last AgentToServer).
    pub fn build_disconnect(&mut self) -> AgentToServer {
        let m = AgentToServer {
            instance_uid: self.uid.as_bytes().to_vec(),
            sequence_num: self.seq,
            capabilities: self.capabilities,
            agent_disconnect: Some(AgentDisconnect {}),
            health: self.health.clone(),
            ..Default::default()
        };
        self.seq += 1;
        m
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }
}

fn strip_time(h: &ComponentHealth) -> ComponentHealth {
    let mut h = h.clone();
    fn walk(h: &mut ComponentHealth) {
        h.status_time_unix_nano = 0;
        for c in h.component_health_map.values_mut() {
            walk(c);
        }
    }
    walk(&mut h);
    h
}

/// Health changes that deserve a message of their own: any healthy flag, error, start time
/// or the top-level status.
fn health_changed_significantly(a: Option<&ComponentHealth>, b: Option<&ComponentHealth>) -> bool {
    fn key(h: &ComponentHealth, top: bool) -> String {
        let mut s = format!(
            "{}|{}|{}|{}",
            h.healthy,
            h.start_time_unix_nano,
            h.last_error,
            if top { h.status.as_str() } else { "" }
        );
        let mut names: Vec<&String> = h.component_health_map.keys().collect();
        names.sort();
        for n in names {
            s.push_str(&format!("[{n}:{}]", key(&h.component_health_map[n], false)));
        }
        s
    }
    match (a, b) {
        (None, None) => false,
        (Some(a), Some(b)) => key(a, true) != key(b, true),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(c: FullStateController) -> Reporter {
        let mut r = Reporter::new(Uuid::now_v7(), 0x1, vec!["x".into()], c);
        r.set_description(AgentDescription::default());
        r.set_health(ComponentHealth {
            healthy: true,
            ..Default::default()
        });
        r
    }

    #[test]
    fn first_full_then_compressed_then_heartbeat() {
        let mut r = rep(FullStateController::TimeSend { secs: 3600 });
        let m = r.build(false).unwrap();
        assert_eq!(m.sequence_num, 0);
        assert!(m.agent_description.is_some() && m.health.is_some());
        assert!(m.custom_capabilities.is_some());
        assert!(r.build(false).is_none(), "nothing changed");
        let hb = r.build(true).unwrap();
        assert_eq!(hb.sequence_num, 1);
        assert!(hb.agent_description.is_none() && hb.health.is_none());
        assert_eq!(hb.capabilities, 1);
    }

    #[test]
    fn minor_health_changes_ride_along() {
        let mut r = rep(FullStateController::TimeSend { secs: 3600 });
        r.build(false).unwrap();
        let mut h = r.health().unwrap().clone();
        h.status = "running".into();
        h.component_health_map.insert(
            "output".into(),
            ComponentHealth {
                healthy: true,
                status: "errors=0".into(),
                ..Default::default()
            },
        );
        r.set_health(h.clone());
        assert!(r.build(false).is_some(), "a new component is significant");
        h.component_health_map.get_mut("output").unwrap().status = "errors=0 retries=3".into();
        r.set_health(h.clone());
        assert!(r.build(false).is_none(), "counter-only change waits");
        assert!(
            r.build(true).unwrap().health.is_some(),
            "sent with the heartbeat"
        );
        h.healthy = false;
        r.set_health(h);
        assert!(r.build(false).unwrap().health.is_some());
    }

    #[test]
    fn controllers() {
        let mut r = rep(FullStateController::AlwaysSend);
        r.build(false);
        assert!(
            r.build(false).is_none(),
            "controllers never cause a message"
        );
        assert!(r.build(true).unwrap().agent_description.is_some());
        let mut r = rep(FullStateController::SentCount { n: 3 });
        r.build(false); // full
        assert!(r.build(true).unwrap().agent_description.is_none());
        assert!(r.build(true).unwrap().agent_description.is_none());
        assert!(r.build(true).unwrap().agent_description.is_some());
    }

    #[test]
    fn full_state_and_requeue_on_loss() {
        let mut r = rep(FullStateController::TimeSend { secs: 3600 });
        r.build(false);
        r.push_custom(CustomMessage {
            capability: "c".into(),
            r#type: "result".into(),
            data: b"1".to_vec(),
        });
        assert!(r.build(false).unwrap().custom_message.is_some());
        r.connection_lost();
        let m = r.build(false).unwrap();
        assert!(m.agent_description.is_some(), "full state after reconnect");
        assert!(m.custom_message.is_some(), "unconfirmed result re-sent");
        r.confirm();
        r.connection_lost();
        assert!(r.build(false).unwrap().custom_message.is_none());
        r.request_full_state();
        assert!(r.build(false).unwrap().health.is_some());
        let d = r.build_disconnect();
        assert!(d.agent_disconnect.is_some());
    }

    fn result(n: u8) -> CustomMessage {
        CustomMessage {
            capability: "c".into(),
            r#type: "result".into(),
            data: vec![n],
        }
    }

    #[test]
    fn only_answers_to_the_message_itself_confirm_a_result() {
        let mut r = rep(FullStateController::TimeSend { secs: 3600 });
        r.build(false).unwrap(); // #0 on this connection
        r.build(true).unwrap(); // #1
        r.push_custom(result(1));
        assert!(r.build(false).unwrap().custom_message.is_some()); // #2
                                                                   // Answers to #0 and #1 arrive after the result went out: not proof it arrived.
        r.confirm_replies(1);
        r.confirm_replies(2);
        r.connection_lost();
        let again = r.build(false).unwrap(); // #0 of the new connection
        assert_eq!(again.custom_message.unwrap().data, vec![1], "re-sent");
        // The answer to the message that carried it confirms it.
        r.confirm_replies(1);
        r.connection_lost();
        assert!(r.build(false).unwrap().custom_message.is_none());
    }

    fn flotilla_result(id: &str) -> CustomMessage {
        commands::rich_message(&commands::rich_result(id, &commands::Outcome::ok("done")))
    }

    /// The ids of the Flotilla results the next messages carry, until one carries none.
    fn drain_results(r: &mut Reporter) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(m) = r.build(false) {
            match m.custom_message.as_ref().and_then(commands::result_id) {
                Some(id) => out.push(id),
                None => break,
            }
        }
        out
    }

    #[test]
    fn pushed_frames_never_confirm_a_result_the_server_acks() {
        let mut r = rep(FullStateController::TimeSend { secs: 3600 });
        r.server_capabilities(&[CAP_ACK.to_string()]);
        r.build(false).unwrap(); // #0
        r.push_custom(flotilla_result("a"));
        r.build(false).unwrap(); // #1 carries the result
                                 // The answer to #0 plus pushed commands: as many frames as messages and more.
        r.confirm_replies(5);
        r.connection_lost();
        assert_eq!(drain_results(&mut r), vec!["a"], "not acked: re-sent");
        // Its ack confirms it, whatever the frame count says.
        assert!(r.ack("a"));
        assert!(!r.ack("a"), "nothing left to confirm");
        r.connection_lost();
        assert!(drain_results(&mut r).is_empty());
    }

    #[test]
    fn an_ack_also_drops_a_queued_duplicate() {
        let mut r = rep(FullStateController::TimeSend { secs: 3600 });
        r.build(false).unwrap();
        r.push_custom(flotilla_result("a"));
        r.build(false).unwrap();
        // The command was delivered again: its stored result is queued once more.
        r.push_custom(flotilla_result("a"));
        r.push_custom(flotilla_result("b"));
        assert!(r.ack("a"));
        assert_eq!(drain_results(&mut r), vec!["b"]);
        assert!(
            r.server_acks,
            "a server that acks is one whose acks we wait for"
        );
    }

    #[test]
    fn without_acks_answers_confirm_and_resends_are_bounded() {
        // A server that does not declare the capability (fluent-opamp's): answers confirm.
        let mut r = rep(FullStateController::TimeSend { secs: 3600 });
        r.server_capabilities(&["org.mp3monster.opamp_provider.chatopcommand".to_string()]);
        r.push_custom(flotilla_result("a"));
        r.build(false).unwrap(); // #0
        r.confirm_replies(1);
        r.connection_lost();
        assert!(drain_results(&mut r).is_empty());

        // One that declares it but never acks (a Flotilla server from before acks): re-sent
        // after each reconnect until it was answered MAX_UNACKED_ANSWERS times.
        let mut r = rep(FullStateController::TimeSend { secs: 3600 });
        r.server_capabilities(&[CAP_ACK.to_string()]);
        r.push_custom(flotilla_result("a"));
        // A connection that dies before the answer does not count.
        assert_eq!(drain_results(&mut r), vec!["a"]);
        r.connection_lost();
        let mut sends = 0;
        loop {
            let ids = drain_results(&mut r);
            if ids.is_empty() {
                break;
            }
            assert_eq!(ids, vec!["a"]);
            sends += 1;
            assert!(sends <= MAX_UNACKED_ANSWERS, "re-sent forever");
            r.confirm_replies(1);
            r.connection_lost();
        }
        assert_eq!(sends, MAX_UNACKED_ANSWERS);
    }

    #[test]
    fn http_answers_confirm_even_against_a_server_that_acks() {
        let mut r = rep(FullStateController::TimeSend { secs: 3600 });
        r.server_capabilities(&[CAP_ACK.to_string()]);
        r.push_custom(flotilla_result("a"));
        r.build(false).unwrap();
        r.confirm();
        r.connection_lost();
        assert!(drain_results(&mut r).is_empty());
        // A new endpoint has to say again whether it acks.
        r.server_changed();
        assert!(!r.server_acks);
    }

    #[test]
    fn unconfirmed_results_stay_bounded() {
        let mut r = rep(FullStateController::TimeSend { secs: 3600 });
        for i in 0..(MAX_QUEUE + 10) {
            r.push_custom(result(i as u8));
            r.build(false).unwrap();
        }
        r.connection_lost();
        let mut n = 0;
        while let Some(m) = r.build(false) {
            if m.custom_message.is_none() {
                break;
            }
            n += 1;
        }
        assert_eq!(n, MAX_QUEUE);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_on_reconnect() {
        let mut r = rep(FullStateController::TimeSend { secs: 3600 });
        r.build(false).unwrap();
        r.push_custom(flotilla_result("old"));
        r.build(false).unwrap(); // sent, not confirmed
        let ids: Vec<String> = (0..MAX_QUEUE).map(|i| format!("r{i}")).collect();
        for id in &ids {
            r.push_custom(flotilla_result(id));
        }
        r.connection_lost();
        assert_eq!(drain_results(&mut r), ids, "the newest results all stay");
    }
}
