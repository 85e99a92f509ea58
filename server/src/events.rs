//! The fleet event bus: one `tokio::sync::broadcast` of JSON events that the console's live
//! updates, the chat gateways' alerts and anything else subscribe to through
//! [`crate::service::Fleet::subscribe`].
//!
//! Events are emitted where the change happens (the service layer and the OpAMP session),
//! never blocking it: a send on a broadcast channel does not wait, and a receiver that falls
//! behind is told it lagged (its problem, not the fleet's). Each event is a JSON object with
//! `type`, `at` (Unix ms) and the ids and fields a consumer needs without a lookup (uid, host
//! name, agent type, old and new values). The list of types and fields is a contract,
//! documented in docs/ARCHITECTURE.md ("Fleet events").
//!
//! Liveness (online/late/offline) is computed from how long ago an agent was last heard, so no
//! write marks its change. [`Events`] keeps an in-memory map of each agent's last-heard time
//! and interval, updated by every message (heartbeats included), and a deadline index: the
//! periodic [`Events::tick`] only looks at agents whose next transition is due, never at the
//! whole fleet, so it stays cheap at 100k agents.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Map, Value};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::model::{now_ms, Agent, Command, CommandStatus, Liveness, Millis};

/// Events a receiver may fall behind by before it is told it lagged. A 10k-agent reconnect
/// storm produces a few events per agent; slower receivers catch up by re-reading state.
pub const CAPACITY: usize = 65_536;

/// What the bus carries.
pub type Event = Arc<Value>;

/// How often liveness transitions are looked for (and the audit tail runs without a wake-up).
pub const TICK: std::time::Duration = std::time::Duration::from_secs(1);

const SHARDS: usize = 16;

/// What the tracker knows of one agent.
struct Entry {
    host: Option<Arc<str>>,
    agent_type: Arc<str>,
    last_seen: Millis,
    interval_ms: i64,
    departed: bool,
    state: Liveness,
    /// When `state` next changes by itself (indexed in `Shard::due`).
    due: Option<Millis>,
}

impl Entry {
    fn of(a: &Agent, now: Millis) -> Entry {
        let mut e = Entry {
            host: a.host().map(Arc::from),
            agent_type: Arc::from(a.agent_type()),
            last_seen: a.last_seen,
            interval_ms: (a.heartbeat_interval_s.max(1) as i64) * 1000,
            departed: a.departed,
            state: Liveness::Offline,
            due: None,
        };
        e.state = e.liveness(now);
        e
    }

    fn liveness(&self, now: Millis) -> Liveness {
        if self.departed {
            return Liveness::Offline;
        }
        let age = now - self.last_seen;
        if age <= self.interval_ms * 3 / 2 {
            Liveness::Healthy
        } else if age <= self.interval_ms * 3 {
            Liveness::Late
        } else {
            Liveness::Offline
        }
    }

    /// The first instant at which [`Entry::liveness`] differs from `state` (None: never).
    fn next_due(&self) -> Option<Millis> {
        match self.state {
            _ if self.departed => None,
            Liveness::Healthy => Some(self.last_seen + self.interval_ms * 3 / 2 + 1),
            Liveness::Late => Some(self.last_seen + self.interval_ms * 3 + 1),
            Liveness::Offline => None,
        }
    }
}

#[derive(Default)]
struct Shard {
    agents: HashMap<Uuid, Entry>,
    due: BTreeSet<(Millis, Uuid)>,
}

impl Shard {
    /// Re-indexes `uid` after its entry changed.
    fn reschedule(&mut self, uid: Uuid) {
        let Some(e) = self.agents.get_mut(&uid) else {
            return;
        };
        if let Some(d) = e.due.take() {
            self.due.remove(&(d, uid));
        }
        e.due = e.next_due();
        if let Some(d) = e.due {
            self.due.insert((d, uid));
        }
    }
}

/// The bus and the liveness tracker. One per server, shared by [`crate::service::Fleet`].
pub struct Events {
    tx: broadcast::Sender<Event>,
    shards: Vec<Mutex<Shard>>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new(CAPACITY)
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard cannot leave it inconsistent in a way that matters more
    // than losing live updates: keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn liveness_str(l: Liveness) -> &'static str {
    match l {
        Liveness::Healthy => "healthy",
        Liveness::Late => "late",
        Liveness::Offline => "offline",
    }
}

impl Events {
    pub fn new(capacity: usize) -> Events {
        let (tx, _) = broadcast::channel(capacity);
        Events {
            tx,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    fn shard(&self, uid: &Uuid) -> MutexGuard<'_, Shard> {
        lock(&self.shards[uid.as_bytes()[15] as usize % SHARDS])
    }

    /// Sends `{type, at, ...fields}`. Never waits; with no subscriber the event is dropped.
    pub fn emit(&self, ty: &str, at: Millis, fields: Value) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let mut m = Map::new();
        m.insert("type".into(), json!(ty));
        m.insert("at".into(), json!(at));
        if let Value::Object(f) = fields {
            m.extend(f);
        }
        let _ = self.tx.send(Arc::new(Value::Object(m)));
    }

    /// The host and agent type the tracker holds for `uid` (nulls when unknown).
    fn names(&self, uid: Uuid) -> (Value, Value) {
        let s = self.shard(&uid);
        match s.agents.get(&uid) {
            Some(e) => (json!(e.host.as_deref()), json!(&*e.agent_type)),
            None => (Value::Null, Value::Null),
        }
    }

    /// Takes in an agent's record as it stands (at start, from the store): no events.
    pub fn seed(&self, a: &Agent, now: Millis) {
        let e = Entry::of(a, now);
        let mut s = self.shard(&a.uid);
        s.agents.insert(a.uid, e);
        s.reschedule(a.uid);
    }

    /// A protocol session wrote an agent's whole record: `before` is what was stored (`None`
    /// for a new agent). Emits what changed: registered, connected/disconnected, health,
    /// remote config status, liveness.
    pub fn agent_written(&self, before: Option<&Agent>, after: &Agent, now: Millis) {
        let host = after.host().map(str::to_string);
        let ty = after.agent_type();
        let base = |extra: Value| {
            let mut v = json!({"uid": after.uid, "host": host, "agent_type": ty});
            if let (Value::Object(m), Value::Object(x)) = (&mut v, extra) {
                m.extend(x);
            }
            v
        };
        if before.is_none() {
            self.emit(
                "agent.registered",
                now,
                base(json!({"name": after.attr("service.name"),
                            "version": after.attr("service.version")})),
            );
        }
        let was_connected = before.is_some_and(|b| b.connected);
        if after.connected && !was_connected {
            self.emit(
                "agent.connected",
                now,
                base(json!({"transport": after.transport.map(|t| t.as_str()),
                            "remote_addr": after.remote_addr})),
            );
        } else if !after.connected && was_connected {
            self.emit(
                "agent.disconnected",
                now,
                base(json!({"reason": if after.departed { "agent_disconnect" } else { "closed" }})),
            );
        }
        let healthy = |a: &Agent| a.health.as_ref().map(|h| h.healthy);
        let (old_h, new_h) = (before.and_then(healthy), healthy(after));
        if new_h.is_some() && old_h != new_h {
            let last_error = after.health.as_ref().map(|h| h.last_error.as_str());
            self.emit(
                "agent.health",
                now,
                base(
                    json!({"old": old_h.map(health_str), "new": new_h.map(health_str),
                            "last_error": last_error.filter(|e| !e.is_empty())}),
                ),
            );
        }
        let rcs = |a: &Agent| a.remote_config_status.clone();
        let (old_c, new_c) = (before.and_then(rcs), rcs(after));
        if let Some(n) = &new_c {
            if old_c.as_ref().map(|o| (&o.status, &o.hash)) != Some((&n.status, &n.hash)) {
                self.emit(
                    "config.status",
                    now,
                    base(
                        json!({"old": old_c.as_ref().map(|o| &o.status), "new": n.status,
                                "hash": n.hash,
                                "error": (!n.error.is_empty()).then_some(&n.error),
                                "desired_hash": after.desired_config.as_ref().map(|d| &d.hash)}),
                    ),
                );
            }
        }
        // Liveness: against what the tracker knew, or what the stored record implied.
        let mut s = self.shard(&after.uid);
        let old = s
            .agents
            .get(&after.uid)
            .map(|e| e.state)
            .or_else(|| before.map(|b| b.liveness(now)));
        let e = Entry::of(after, now);
        let new = e.state;
        if let Some(prev) = s.agents.insert(after.uid, e) {
            if let Some(d) = prev.due {
                s.due.remove(&(d, after.uid));
            }
        }
        s.reschedule(after.uid);
        drop(s);
        if let Some(old) = old.filter(|o| *o != new) {
            self.liveness_changed(after.uid, &host, &ty, old, new, now);
        }
    }

    fn liveness_changed(
        &self,
        uid: Uuid,
        host: &Option<String>,
        ty: &str,
        old: Liveness,
        new: Liveness,
        at: Millis,
    ) {
        self.emit(
            "agent.liveness",
            at,
            json!({"uid": uid, "host": host, "agent_type": ty,
                   "old": liveness_str(old), "new": liveness_str(new)}),
        );
    }

    /// A heartbeat (no record write): the agent was heard at `at`, and maybe its heartbeat
    /// interval was learnt.
    pub fn heard(&self, uid: Uuid, at: Millis, interval_s: Option<u64>) {
        let mut s = self.shard(&uid);
        let Some(e) = s.agents.get_mut(&uid) else {
            return; // its first message of this link writes the record and adds it
        };
        e.last_seen = e.last_seen.max(at);
        e.departed = false;
        if let Some(i) = interval_s {
            e.interval_ms = (i.max(1) as i64) * 1000;
        }
        let old = e.state;
        e.state = e.liveness(at);
        let new = e.state;
        let (host, ty) = (e.host.as_deref().map(str::to_string), e.agent_type.clone());
        s.reschedule(uid);
        drop(s);
        if old != new {
            self.liveness_changed(uid, &host, &ty, old, new, at);
        }
    }

    /// An operator set (`Some`) or removed (`None`) a label.
    pub fn label_changed(
        &self,
        uid: Uuid,
        key: &str,
        value: Option<&str>,
        actor: &str,
        at: Millis,
    ) {
        let (host, ty) = self.names(uid);
        self.emit(
            "agent.labels",
            at,
            json!({"uid": uid, "host": host, "agent_type": ty, "key": key, "value": value,
                   "actor": actor}),
        );
    }

    /// A WebSocket closed without another connection taking the agent over.
    pub fn connection_closed(&self, uid: Uuid, at: Millis) {
        self.disconnected(uid, at, "closed");
    }

    /// The replica holding the agent's connection died (its heartbeat went silent).
    pub fn disconnected_by_replica(&self, uid: Uuid, at: Millis) {
        self.disconnected(uid, at, "replica_lost");
    }

    fn disconnected(&self, uid: Uuid, at: Millis, reason: &str) {
        let (host, ty) = self.names(uid);
        self.emit(
            "agent.disconnected",
            at,
            json!({"uid": uid, "host": host, "agent_type": ty, "reason": reason}),
        );
    }

    /// Emits the liveness transitions due by `now`. Cost: the agents whose transition is due,
    /// not the fleet.
    pub fn tick(&self, now: Millis) -> usize {
        let mut n = 0;
        for shard in &self.shards {
            let mut changed = Vec::new();
            {
                let mut s = lock(shard);
                while let Some(&(d, uid)) = s.due.first() {
                    if d > now {
                        break;
                    }
                    s.due.pop_first();
                    let Some(e) = s.agents.get_mut(&uid) else {
                        continue;
                    };
                    e.due = None;
                    let old = e.state;
                    e.state = e.liveness(now);
                    if old != e.state {
                        changed.push((
                            uid,
                            e.host.as_deref().map(str::to_string),
                            e.agent_type.clone(),
                            old,
                            e.state,
                        ));
                    }
                    s.reschedule(uid);
                }
            }
            for (uid, host, ty, old, new) in changed {
                self.liveness_changed(uid, &host, &ty, old, new, now);
                n += 1;
            }
        }
        n
    }

    /// An agent's record moved to a new uid (it adopted a new instance uid).
    pub fn renamed(&self, old: Uuid, new: Uuid) {
        let e = self.shard(&old).agents.remove(&old);
        if let Some(mut e) = e {
            let mut s = self.shard(&old);
            if let Some(d) = e.due.take() {
                s.due.remove(&(d, old));
            }
            drop(s);
            let mut s = self.shard(&new);
            s.agents.insert(new, e);
            s.reschedule(new);
        }
    }

    /// A command's status changed (`from`: what it was; `None` when it was just queued).
    /// Failures and expiries are also sent as `command.failed`, for alerting.
    pub fn command(&self, c: &Command, from: Option<CommandStatus>, at: Millis) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let (host, ty) = self.names(c.agent_uid);
        let fields = json!({
            "id": c.id, "batch_id": c.batch_id, "kind": c.kind.as_str(),
            "agent_uid": c.agent_uid, "host": host, "agent_type": ty,
            "old": from.map(CommandStatus::as_str), "status": c.status.as_str(),
            "error": c.error, "actor": c.actor, "channel": c.channel.as_str(),
        });
        if matches!(c.status, CommandStatus::Failed | CommandStatus::Expired) {
            self.emit("command.failed", at, fields.clone());
        }
        self.emit("command.progress", at, fields);
    }
}

fn health_str(h: bool) -> &'static str {
    if h {
        "healthy"
    } else {
        "unhealthy"
    }
}

/// The bus's background work: liveness transitions every `every`, and the audit tail. Runs
/// until `stop`.
pub async fn run(
    fleet: crate::service::Fleet,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let events = fleet.events().clone();
    // Seed the tracker from the registry once, so agents that never come back after a restart
    // still go late and offline, and command events name agents that have not reconnected yet.
    let mut after = None;
    let now = now_ms();
    loop {
        match fleet.store().list_agents_brief(after, 1000).await {
            Ok(page) => {
                let n = page.len();
                for a in &page {
                    // An agent already written by a session since start is fresher.
                    if !events.shard(&a.uid).agents.contains_key(&a.uid) {
                        events.seed(a, now);
                    }
                    after = Some(a.uid);
                }
                if n < 1000 {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "event bus: could not read the registry to seed liveness");
                break;
            }
        }
    }
    let mut t = tokio::time::interval(every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // Open streams (console SSE) end on this, so a graceful shutdown is not held.
                let _ = events.tx.send(Arc::new(json!({"type": "shutdown", "at": now_ms()})));
                return;
            }
            _ = t.tick() => {}
            _ = fleet.audit_appended() => {}
        }
        events.tick(now_ms());
        fleet.tail_audit().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(uid: Uuid, last_seen: Millis) -> Agent {
        let mut a = Agent::new(uid, last_seen, 10);
        a.identifying = vec![
            ("service.name".into(), "fluent-bit".into()),
            ("host.name".into(), "web-1".into()),
        ];
        a.connected = true;
        a
    }

    fn drain(rx: &mut broadcast::Receiver<Event>) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(v) = rx.try_recv() {
            out.push((*v).clone());
        }
        out
    }

    #[test]
    fn liveness_moves_through_late_and_offline_and_back() {
        let ev = Events::new(64);
        let mut rx = ev.subscribe();
        let uid = Uuid::now_v7();
        let t0 = 1_000_000;
        ev.agent_written(None, &agent(uid, t0), t0);
        let first: Vec<String> = drain(&mut rx)
            .iter()
            .map(|v| v["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(first, ["agent.registered", "agent.connected"]);
        // 10 s interval: late after 15 s, offline after 30 s.
        assert_eq!(ev.tick(t0 + 15_000), 0);
        assert_eq!(ev.tick(t0 + 15_001), 1);
        let v = drain(&mut rx);
        assert_eq!(v[0]["type"], "agent.liveness");
        assert_eq!(
            (v[0]["old"].as_str(), v[0]["new"].as_str()),
            (Some("healthy"), Some("late"))
        );
        assert_eq!(v[0]["host"], "web-1");
        assert_eq!(v[0]["agent_type"], "fluentbit");
        assert_eq!(ev.tick(t0 + 30_001), 1);
        assert_eq!(drain(&mut rx)[0]["new"], "offline");
        assert_eq!(ev.tick(t0 + 100_000), 0, "offline is final until heard");
        ev.heard(uid, t0 + 100_000, None);
        let v = drain(&mut rx);
        assert_eq!(
            (v[0]["old"].as_str(), v[0]["new"].as_str()),
            (Some("offline"), Some("healthy"))
        );
        // A heartbeat pushes the deadline back: nothing is due at the old one.
        ev.heard(uid, t0 + 110_000, None);
        assert_eq!(ev.tick(t0 + 116_000), 0);
        assert!(drain(&mut rx).is_empty());
    }

    #[test]
    fn health_and_config_status_changes_are_events() {
        let ev = Events::new(64);
        let uid = Uuid::now_v7();
        let before = agent(uid, 1000);
        ev.agent_written(None, &before, 1000);
        let mut rx = ev.subscribe();
        let mut after = before.clone();
        after.health = Some(crate::model::Health {
            healthy: false,
            last_error: "output down".into(),
            ..Default::default()
        });
        after.remote_config_status = Some(crate::model::RemoteConfigState {
            hash: "ab".into(),
            status: "failed".into(),
            error: "bad".into(),
        });
        ev.agent_written(Some(&before), &after, 1500);
        let v = drain(&mut rx);
        let types: Vec<&str> = v.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["agent.health", "config.status"]);
        assert_eq!(v[0]["new"], "unhealthy");
        assert_eq!(v[0]["last_error"], "output down");
        assert_eq!(v[1]["new"], "failed");
        assert_eq!(v[1]["error"], "bad");
        // The same record again changes nothing.
        ev.agent_written(Some(&after), &after, 1600);
        assert!(drain(&mut rx).is_empty());
    }
}
