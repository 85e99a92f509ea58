//! The next AgentToServer: sequence numbers, status compression (only changed sub-messages),
//! the full-state controllers, ReportFullState, queued custom messages (command results) and the
//! final agent_disconnect. Shared between the core (which updates the state) and the transport
//! (which asks for a message whenever it may send).

use std::collections::VecDeque;
use std::time::Instant;

use flotilla_proto::{
    AgentDescription, AgentDisconnect, AgentToServer, ComponentHealth, CustomCapabilities,
    CustomMessage, EffectiveConfig, RemoteConfigStatus,
};
use uuid::Uuid;

use crate::config::FullStateController;

/// Most custom messages kept waiting (results are small; a server that never answers must not
/// grow memory forever).
const MAX_QUEUE: usize = 256;

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
    queue: VecDeque<CustomMessage>,
    /// Sent, but not yet answered: re-queued if the connection drops (the server ignores a
    /// result for a command already settled, so a duplicate is harmless). Each is kept with
    /// its position among the messages sent on this connection, see [`Reporter::confirm_replies`].
    unconfirmed: Vec<(u64, CustomMessage)>,
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
        self.queue.push_back(m);
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
        for (_, m) in self.unconfirmed.drain(..).rev() {
            self.queue.push_front(m);
        }
        while self.queue.len() > MAX_QUEUE {
            self.queue.pop_back();
        }
    }

    /// Plain HTTP: the answer to a POST is the answer to the one message it carried, so
    /// everything sent so far arrived.
    pub fn confirm(&mut self) {
        self.unconfirmed.clear();
    }

    /// WebSocket: `replies` ServerToAgent messages have arrived on this connection. The server
    /// answers every AgentToServer, in order, so the n-th answer proves the first n messages
    /// arrived; a frame that merely arrives after a result was sent proves nothing (it may
    /// answer an earlier message, and the result may die with the connection). A frame the
    /// server sends unasked (a command) is counted like an answer: it can confirm one message
    /// early, never a message not yet sent.
    pub fn confirm_replies(&mut self, replies: u64) {
        self.unconfirmed.retain(|(n, _)| *n >= replies);
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
                self.unconfirmed.remove(0);
            }
            self.unconfirmed.push((self.conn_sent, c.clone()));
            m.custom_message = Some(c);
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
}
