//! Fleet alerts into chat channels: the `subscribe` / `subscriptions` / `unsubscribe`
//! commands, the alert buttons (Show health, Mute 1 h; Restart is previewed by the core), and
//! the [`AlertEngine`], which turns fleet events (the server's event-bus JSON, see "Fleet
//! events" in docs/ARCHITECTURE.md) into channel messages.
//!
//! The engine is platform-neutral: events are collected for a short coalescing window (closed
//! after `quiet` without a new event, or `max_window` after the first), matched against every
//! subscription (its event kinds; the agent against its query, through the subscriber's own
//! `FleetBackend` search), de-duplicated (the same agent and kind in a channel once per
//! `dedupe_for`), then sent per channel through a token bucket: a few alerts go out one by
//! one with buttons, more become one summary ("1,000 agents went offline: web-1, … and 990
//! more"), and what a drained bucket holds back goes out as a summary when it refills.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flotilla_mcp::{BackendError, FleetBackend};
use rand::RngCore;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::gateway::now_ms;
use super::planner::rules::EVENTS;
use super::state::{same_channel, ChatState, Mute, Subscription};
use super::types::{
    BackendFor, Block, Button, ChatUser, ConversationRef, Outbox, Platform, Reply, Role, Style,
};

/// Button action ids of an alert. Restart's and Show health's value is the agent's uid;
/// Mute's is `<subscription id> <uid>`.
pub const ACTION_RESTART: &str = "flotilla_alert_restart";
pub const ACTION_HEALTH: &str = "flotilla_alert_health";
pub const ACTION_MUTE: &str = "flotilla_alert_mute";

/// Pages of a subscription's agent search (1000 rows each): 200k agents.
const MAX_PAGES: usize = 200;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Unhealthy,
    Offline,
    Recovered,
    CommandFailed,
    ConfigFailed,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Unhealthy,
        Kind::Offline,
        Kind::Recovered,
        Kind::CommandFailed,
        Kind::ConfigFailed,
    ];

    /// The name a subscription uses (`subscribe <query> offline,recovered`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Unhealthy => "unhealthy",
            Kind::Offline => "offline",
            Kind::Recovered => "recovered",
            Kind::CommandFailed => "command_failed",
            Kind::ConfigFailed => "config_failed",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn verb(self, many: bool) -> &'static str {
        match (self, many) {
            (Kind::Unhealthy, _) => "became unhealthy",
            (Kind::Offline, _) => "went offline",
            (Kind::Recovered, _) => "recovered",
            (Kind::CommandFailed, false) => "had a command fail",
            (Kind::CommandFailed, true) => "had commands fail",
            (Kind::ConfigFailed, _) => "failed to apply their remote config",
        }
    }
}

/// One fleet event an alert may be made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub kind: Kind,
    pub uid: String,
    pub host: Option<String>,
    pub agent_type: Option<String>,
    /// The error or the command, when the event has one.
    pub detail: Option<String>,
}

impl Candidate {
    fn label(&self) -> String {
        self.host.clone().unwrap_or_else(|| self.uid.clone())
    }
}

fn s(v: &Value) -> Option<String> {
    v.as_str().filter(|s| !s.is_empty()).map(str::to_string)
}

/// The alert an event is, if any: health flipped to unhealthy (or back), liveness went
/// offline (or came back from offline), a command failed or expired, a remote config failed.
pub fn candidate(ev: &Value) -> Option<Candidate> {
    let (old, new) = (ev["old"].as_str(), ev["new"].as_str());
    let (kind, uid, detail) = match ev["type"].as_str()? {
        "agent.health" => match (old, new) {
            (_, Some("unhealthy")) => (Kind::Unhealthy, &ev["uid"], s(&ev["last_error"])),
            (Some("unhealthy"), Some("healthy")) => {
                (Kind::Recovered, &ev["uid"], Some("healthy again".into()))
            }
            _ => return None,
        },
        "agent.liveness" => match (old, new) {
            (_, Some("offline")) => (Kind::Offline, &ev["uid"], None),
            (Some("offline"), Some(_)) => (Kind::Recovered, &ev["uid"], Some("back online".into())),
            _ => return None,
        },
        "command.failed" => {
            let what = format!(
                "`{}` {}{}",
                ev["kind"].as_str().unwrap_or("command"),
                ev["status"].as_str().unwrap_or("failed"),
                s(&ev["error"])
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
            (Kind::CommandFailed, &ev["agent_uid"], Some(what))
        }
        "config.status" if new == Some("failed") => {
            (Kind::ConfigFailed, &ev["uid"], s(&ev["error"]))
        }
        _ => return None,
    };
    Some(Candidate {
        kind,
        uid: s(uid)?,
        host: s(&ev["host"]),
        agent_type: s(&ev["agent_type"]),
        detail,
    })
}

/// `state:`/`health:` terms say which events a subscription wants; the other terms say which
/// agents. Returns the kinds its query implies (empty: none named) and the agent query.
pub fn split_query(query: &str) -> (Vec<Kind>, String) {
    let mut kinds = Vec::new();
    let mut rest = Vec::new();
    for term in query.split_whitespace() {
        let lower = term.to_ascii_lowercase();
        let implied: &[Kind] = match lower.as_str() {
            "health:unhealthy" | "health:false" => &[Kind::Unhealthy, Kind::Recovered],
            "state:offline" | "state:late" => &[Kind::Offline, Kind::Recovered],
            "health:healthy" | "health:ok" | "state:healthy" | "state:online" => &[Kind::Recovered],
            _ => {
                rest.push(term);
                continue;
            }
        };
        for k in implied {
            if !kinds.contains(k) {
                kinds.push(*k);
            }
        }
    }
    kinds.sort();
    (kinds, rest.join(" "))
}

/// The kinds a new subscription gets: those named, else those its query implies, else all.
pub fn resolve_events(query: &str, named: &[String]) -> Result<Vec<Kind>, String> {
    let mut kinds = Vec::new();
    for n in named {
        let k = Kind::parse(n)
            .ok_or_else(|| format!("unknown event {n:?}; the events are {}", EVENTS.join(", ")))?;
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    if kinds.is_empty() {
        kinds = split_query(query).0;
    }
    if kinds.is_empty() {
        kinds = Kind::ALL.to_vec();
    }
    kinds.sort();
    Ok(kinds)
}

/// Tunables of the engine.
#[derive(Debug, Clone)]
pub struct AlertOptions {
    /// A coalescing window closes this long after its last event...
    pub quiet: Duration,
    /// ...or this long after its first, whichever is sooner.
    pub max_window: Duration,
    /// The same agent and kind alert a channel once per this.
    pub dedupe_for: Duration,
    /// Messages a channel can get at once (its token bucket's size)...
    pub burst: u32,
    /// ...and one more per this.
    pub refill_every: Duration,
    /// A window with at most this many alerts for a channel sends them one by one (with
    /// buttons); more become one summary.
    pub singles_max: usize,
    /// Agents named in a summary line.
    pub summary_names: usize,
    /// How long the Mute button silences an agent.
    pub mute_for: Duration,
}

impl Default for AlertOptions {
    fn default() -> Self {
        AlertOptions {
            quiet: Duration::from_secs(1),
            max_window: Duration::from_secs(5),
            dedupe_for: Duration::from_secs(10 * 60),
            burst: 5,
            refill_every: Duration::from_secs(12),
            singles_max: 3,
            summary_names: 10,
            mute_for: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone)]
struct Alert {
    subscription: String,
    c: Candidate,
}

/// Alerts of one kind waiting for a channel: how many, and the first few in full.
#[derive(Debug, Default)]
struct Group {
    count: u64,
    first: Vec<Alert>,
}

struct ChannelState {
    conversation: ConversationRef,
    tokens: f64,
    refilled: Instant,
    held: BTreeMap<Kind, Group>,
}

impl ChannelState {
    fn held(&self) -> u64 {
        self.held.values().map(|g| g.count).sum()
    }

    fn refill(&mut self, now: Instant, o: &AlertOptions) {
        let per = o.refill_every.as_secs_f64().max(0.001);
        let gained = now.saturating_duration_since(self.refilled).as_secs_f64() / per;
        self.tokens = (self.tokens + gained).min(o.burst as f64);
        self.refilled = now;
    }

    /// When the bucket next holds a whole token (a millisecond late, so rounding can never
    /// wake the engine a hair too early, again and again).
    fn token_at(&self, o: &AlertOptions) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.refilled + o.refill_every.mul_f64(missing) + Duration::from_millis(1)
    }

    /// Whether `n` messages may go now (floating-point slack forgiven).
    fn has(&self, n: f64) -> bool {
        self.tokens + 1e-9 >= n
    }
}

#[derive(Default)]
struct Inner {
    pending: Vec<Candidate>,
    /// First and last event of the open window.
    window: Option<(Instant, Instant)>,
    /// Events the bus dropped for us (we lagged) since the last message.
    missed: u64,
    dedupe: HashMap<(String, String, Kind), Instant>,
    channels: HashMap<String, ChannelState>,
}

/// What the engine has done, for logs, tests and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlertStats {
    pub events: u64,
    pub messages: u64,
    pub alerts: u64,
    pub deduplicated: u64,
}

/// Turns fleet events into alert messages; one per server, for every platform.
pub struct AlertEngine {
    state: Arc<dyn ChatState>,
    backend_for: BackendFor,
    outboxes: HashMap<Platform, Arc<dyn Outbox>>,
    opts: AlertOptions,
    inner: Mutex<Inner>,
    events: AtomicU64,
    messages: AtomicU64,
    alerts: AtomicU64,
    deduplicated: AtomicU64,
}

fn channel_key(c: &ConversationRef) -> String {
    format!("{}/{}/{}", c.platform, c.workspace, c.channel)
}

/// `1000` → `1,000`.
pub fn thousands(n: u64) -> String {
    let d = n.to_string();
    let mut out = String::new();
    for (i, ch) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

impl AlertEngine {
    pub fn new(
        state: Arc<dyn ChatState>,
        backend_for: BackendFor,
        outboxes: HashMap<Platform, Arc<dyn Outbox>>,
        opts: AlertOptions,
    ) -> AlertEngine {
        AlertEngine {
            state,
            backend_for,
            outboxes,
            opts,
            inner: Mutex::new(Inner::default()),
            events: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            alerts: AtomicU64::new(0),
            deduplicated: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> AlertStats {
        AlertStats {
            events: self.events.load(Ordering::Relaxed),
            messages: self.messages.load(Ordering::Relaxed),
            alerts: self.alerts.load(Ordering::Relaxed),
            deduplicated: self.deduplicated.load(Ordering::Relaxed),
        }
    }

    /// Takes one bus event; true if it may become an alert (it joins the open window).
    pub fn feed(&self, ev: &Value) -> bool {
        let Some(c) = candidate(ev) else {
            return false;
        };
        self.events.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut g = self.lock();
        g.pending.push(c);
        g.window = Some(match g.window {
            Some((first, _)) => (first, now),
            None => (now, now),
        });
        true
    }

    /// The bus dropped `n` events for us: said in the next message.
    pub fn lagged(&self, n: u64) {
        self.lock().missed += n;
    }

    /// When [`AlertEngine::flush`] has something to do: the open window closes, or a channel
    /// holding alerts gets a token.
    pub fn next_due(&self) -> Option<Instant> {
        let g = self.lock();
        let window = g
            .window
            .map(|(first, last)| (last + self.opts.quiet).min(first + self.opts.max_window));
        let held = g
            .channels
            .values()
            .filter(|c| c.held() > 0)
            .map(|c| c.token_at(&self.opts))
            .min();
        match (window, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Closes the window if it is due, matches its events, and sends what each channel's
    /// bucket allows. Returns the messages sent.
    pub async fn flush(&self) -> usize {
        let now = Instant::now();
        let pending = {
            let mut g = self.lock();
            let due = g.window.is_some_and(|(first, last)| {
                now >= (last + self.opts.quiet).min(first + self.opts.max_window)
            });
            if due {
                g.window = None;
                std::mem::take(&mut g.pending)
            } else {
                Vec::new()
            }
        };
        let fresh = if pending.is_empty() {
            HashMap::new()
        } else {
            self.match_all(pending, now).await
        };
        let outgoing = {
            let mut g = self.lock();
            let missed = std::mem::take(&mut g.missed);
            for (key, (conv, alerts)) in fresh {
                let ch = g.channels.entry(key).or_insert_with(|| ChannelState {
                    conversation: conv,
                    tokens: self.opts.burst as f64,
                    refilled: now,
                    held: BTreeMap::new(),
                });
                for a in alerts {
                    let grp = ch.held.entry(a.c.kind).or_default();
                    grp.count += 1;
                    if grp.first.len() < self.opts.summary_names.max(self.opts.singles_max) {
                        grp.first.push(a);
                    }
                }
            }
            let mut out = Vec::new();
            for ch in g.channels.values_mut() {
                let held = ch.held();
                if held == 0 {
                    continue;
                }
                ch.refill(now, &self.opts);
                let replies = if held as usize <= self.opts.singles_max && ch.has(held as f64) {
                    ch.tokens = (ch.tokens - held as f64).max(0.0);
                    let held = std::mem::take(&mut ch.held);
                    held.into_values()
                        .flat_map(|g| g.first)
                        .map(|a| single(&a))
                        .collect()
                } else if ch.has(1.0) {
                    ch.tokens = (ch.tokens - 1.0).max(0.0);
                    vec![summary(&std::mem::take(&mut ch.held), &self.opts)]
                } else {
                    continue;
                };
                let replies: Vec<Reply> = replies
                    .into_iter()
                    .map(|r| {
                        if missed > 0 {
                            r.push(Block::Context(format!(
                                "{} fleet events were missed while the server was busy; some alerts may be missing.",
                                thousands(missed)
                            )))
                        } else {
                            r
                        }
                    })
                    .collect();
                out.push((ch.conversation.clone(), replies));
            }
            // Forget de-duplication entries older than the window, so the map stays the size
            // of the recent alerts.
            let keep = self.opts.dedupe_for;
            g.dedupe
                .retain(|_, at| now.saturating_duration_since(*at) < keep);
            out
        };
        let mut sent = 0;
        for (conv, replies) in outgoing {
            let Some(outbox) = self.outboxes.get(&conv.platform) else {
                tracing::warn!(platform = %conv.platform, "alerts: no gateway for this platform; dropped");
                continue;
            };
            for r in replies {
                match outbox.post(&conv, &r).await {
                    Ok(_) => sent += 1,
                    Err(e) => {
                        tracing::warn!(error = %e, channel = %conv.channel, "alerts: could not post an alert")
                    }
                }
            }
        }
        self.messages.fetch_add(sent as u64, Ordering::Relaxed);
        sent
    }

    /// The window's events against every subscription: channel → its new alerts.
    async fn match_all(
        &self,
        pending: Vec<Candidate>,
        now: Instant,
    ) -> HashMap<String, (ConversationRef, Vec<Alert>)> {
        let mut out: HashMap<String, (ConversationRef, Vec<Alert>)> = HashMap::new();
        let mut subs = match self.state.list_subscriptions().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, dropped = pending.len(), "alerts: subscriptions not read; these events are not alerted");
                return out;
            }
        };
        if subs.is_empty() {
            return out;
        }
        subs.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        let muted: HashSet<(String, String)> = match self.state.mutes(now_ms()).await {
            Ok(m) => m.into_iter().map(|m| (m.subscription, m.agent)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "alerts: mutes not read; alerting without them");
                HashSet::new()
            }
        };
        for sub in &subs {
            let kinds: Vec<Kind> = sub.events.iter().filter_map(|e| Kind::parse(e)).collect();
            let relevant: Vec<&Candidate> = pending
                .iter()
                .filter(|c| kinds.contains(&c.kind))
                .filter(|c| !muted.contains(&(sub.id.clone(), c.uid.clone())))
                .collect();
            if relevant.is_empty() {
                continue;
            }
            let (_, selector) = split_query(&sub.query);
            let matching = if selector.is_empty() {
                None
            } else {
                let b = (self.backend_for)(&sub.created_by, &sub.conversation, Role::Viewer);
                match matching_uids(&*b, &selector).await {
                    Ok(set) => Some(set),
                    Err(e) => {
                        tracing::warn!(subscription = %sub.id, error = %e.message, "alerts: the subscription's query failed; its events are not alerted");
                        continue;
                    }
                }
            };
            let key = channel_key(&sub.conversation);
            for c in relevant {
                if matching.as_ref().is_some_and(|m| !m.contains(&c.uid)) {
                    continue;
                }
                let dk = (key.clone(), c.uid.clone(), c.kind);
                {
                    let mut g = self.lock();
                    if g.dedupe
                        .get(&dk)
                        .is_some_and(|at| now.saturating_duration_since(*at) < self.opts.dedupe_for)
                    {
                        self.deduplicated.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    g.dedupe.insert(dk, now);
                }
                self.alerts.fetch_add(1, Ordering::Relaxed);
                out.entry(key.clone())
                    .or_insert_with(|| (sub.conversation.clone(), Vec::new()))
                    .1
                    .push(Alert {
                        subscription: sub.id.clone(),
                        c: c.clone(),
                    });
            }
        }
        out
    }

    /// Consumes the fleet event bus until `stop` (or the bus's `shutdown` event), flushing
    /// windows as they close. A lag (the bus dropped events for us) is logged and said in the
    /// next alert; alerts still held at the end are logged, not sent.
    pub async fn run(
        self: Arc<Self>,
        mut rx: broadcast::Receiver<Arc<Value>>,
        stop: CancellationToken,
    ) {
        loop {
            let due = self.next_due();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    self.flush().await;
                }
                r = rx.recv() => match r {
                    Ok(ev) => {
                        if ev["type"] == "shutdown" {
                            break;
                        }
                        self.feed(&ev);
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "alerts: fell behind the fleet event bus; those events are not alerted");
                        self.lagged(n);
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            }
        }
        let g = self.lock();
        let held: u64 = g.channels.values().map(ChannelState::held).sum();
        if held > 0 || !g.pending.is_empty() {
            tracing::info!(
                held,
                pending = g.pending.len(),
                "alerts: stopping with alerts not yet sent"
            );
        }
    }
}

/// Every uid the agent query matches (the service's own search, page by page).
async fn matching_uids(b: &dyn FleetBackend, q: &str) -> Result<HashSet<String>, BackendError> {
    let mut out = HashSet::new();
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let page = b.search(q, Some(1000), cursor.as_deref(), false).await?;
        out.extend(
            page["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["uid"].as_str().map(str::to_string)),
        );
        match page["next_cursor"].as_str() {
            Some(c) if !c.is_empty() => cursor = Some(c.to_string()),
            _ => break,
        }
    }
    Ok(out)
}

/// One alert with its buttons.
fn single(a: &Alert) -> Reply {
    let c = &a.c;
    let ty = c
        .agent_type
        .as_deref()
        .map(|t| format!(" (`{t}`)"))
        .unwrap_or_default();
    let mut text = format!("*{}*{ty} {}", c.label(), c.kind.verb(false));
    if let Some(d) = &c.detail {
        text.push_str(&format!(": {d}"));
    }
    Reply::text(text)
        .push(Block::Buttons(vec![
            Button {
                action_id: ACTION_RESTART.into(),
                label: "Restart".into(),
                value: c.uid.clone(),
                style: Style::Danger,
            },
            Button {
                action_id: ACTION_HEALTH.into(),
                label: "Show health".into(),
                value: c.uid.clone(),
                style: Style::Default,
            },
            Button {
                action_id: ACTION_MUTE.into(),
                label: "Mute 1 h".into(),
                value: format!("{} {}", a.subscription, c.uid),
                style: Style::Default,
            },
        ]))
        .push(Block::Context(format!(
            "Subscription `{}` · agent `{}`",
            a.subscription, c.uid
        )))
}

/// Many alerts as one message: a line per kind with a count and the first names.
fn summary(held: &BTreeMap<Kind, Group>, o: &AlertOptions) -> Reply {
    let mut lines = Vec::new();
    let mut subs: Vec<&str> = Vec::new();
    for (kind, g) in held {
        let names: Vec<String> = g
            .first
            .iter()
            .take(o.summary_names)
            .map(|a| a.c.label())
            .collect();
        for a in &g.first {
            if !subs.contains(&a.subscription.as_str()) {
                subs.push(&a.subscription);
            }
        }
        let more = g.count.saturating_sub(names.len() as u64);
        let agents = if g.count == 1 { "agent" } else { "agents" };
        let mut line = format!(
            "*{} {agents} {}*: {}",
            thousands(g.count),
            kind.verb(g.count > 1),
            names.join(", ")
        );
        if more > 0 {
            line.push_str(&format!(", … and {} more", thousands(more)));
        }
        lines.push(line);
    }
    Reply::text(lines.join("\n")).push(Block::Context(format!(
        "Grouped into one message (alerts in a channel are coalesced and rate-limited). \
         Subscription {}; `agents <query>` lists the agents.",
        subs.iter()
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

fn private(text: impl Into<String>) -> Vec<Reply> {
    vec![Reply::text(text).private()]
}

fn needs_operator(role: Role, what: &str) -> Option<Vec<Reply>> {
    (role < Role::Operator).then(|| {
        private(format!(
            "{what} needs the *operator* role; you have *{role}*. Nothing was changed."
        ))
    })
}

fn new_id() -> String {
    let mut b = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("s-{}", hex::encode(b))
}

/// `subscribe <query> [events]`: this channel gets alerts (operators only; a subscription
/// always posts to the channel it was made in).
pub async fn subscribe(
    state: &dyn ChatState,
    b: &dyn FleetBackend,
    conv: &ConversationRef,
    user: &ChatUser,
    role: Role,
    query: &str,
    events: &[String],
) -> Vec<Reply> {
    if let Some(r) = needs_operator(role, "Subscribing a channel to alerts") {
        return r;
    }
    let kinds = match resolve_events(query, events) {
        Ok(k) => k,
        Err(e) => return private(e),
    };
    let (_, selector) = split_query(query);
    // The query is checked by the service now, so a typo is said at once, not at the first
    // alert.
    let matching = match b.search(&selector, Some(1), None, true).await {
        Ok(v) => v["total"].as_u64().unwrap_or(0),
        Err(e) => {
            return private(format!(
                "Flotilla refused the query: {} (`{}`). Nothing was subscribed.",
                e.message, e.code
            ))
        }
    };
    let sub = Subscription {
        id: new_id(),
        conversation: ConversationRef {
            thread: None,
            ..conv.clone()
        },
        query: query.to_string(),
        events: kinds.iter().map(|k| k.as_str().to_string()).collect(),
        created_by: user.clone(),
        created_at_ms: now_ms(),
    };
    if let Err(e) = state.put_subscription(&sub).await {
        return private(format!("Flotilla could not keep the subscription: {e}"));
    }
    tracing::info!(subscription = %sub.id, channel = %conv.channel, query = %query, by = %user.id, "alerts: channel subscribed");
    vec![Reply::text(format!(
        "Subscribed this channel to {} (`{}`): {}.",
        if query.is_empty() {
            "every agent".to_string()
        } else {
            format!("`{query}`")
        },
        sub.id,
        sub.events.join(", ")
    ))
    .push(Block::Context(format!(
        "{} agent{} match the query now. Bursts are grouped into one summary; the same alert \
         about an agent comes at most once in {} min. `unsubscribe {}` stops it.",
        thousands(matching),
        if matching == 1 { "" } else { "s" },
        AlertOptions::default().dedupe_for.as_secs() / 60,
        sub.id
    )))]
}

/// `subscriptions`: this channel's.
pub async fn list(state: &dyn ChatState, conv: &ConversationRef) -> Vec<Reply> {
    let subs = match state.list_subscriptions().await {
        Ok(s) => s,
        Err(e) => return private(format!("Flotilla could not read the subscriptions: {e}")),
    };
    let mine: Vec<Vec<String>> = subs
        .iter()
        .filter(|s| same_channel(&s.conversation, conv))
        .map(|s| {
            vec![
                s.id.clone(),
                if s.query.is_empty() {
                    "(every agent)".into()
                } else {
                    s.query.clone()
                },
                s.events.join(","),
                s.created_by.name.clone(),
            ]
        })
        .collect();
    if mine.is_empty() {
        return vec![Reply::text(
            "This channel has no alert subscriptions. Try `subscribe health:unhealthy type:fluentd`.",
        )];
    }
    vec![Reply::text(format!(
        "*{}* alert subscription{} in this channel",
        mine.len(),
        if mine.len() == 1 { "" } else { "s" }
    ))
    .push(Block::Table {
        columns: vec!["id".into(), "query".into(), "events".into(), "by".into()],
        rows: mine,
        more: 0,
    })]
}

/// `unsubscribe <id>`: removes one of this channel's subscriptions (operators only).
pub async fn unsubscribe(
    state: &dyn ChatState,
    conv: &ConversationRef,
    user: &ChatUser,
    role: Role,
    id: &str,
) -> Vec<Reply> {
    if let Some(r) = needs_operator(role, "Unsubscribing") {
        return r;
    }
    match state.remove_subscription(id, conv, user).await {
        Ok(Some(s)) => {
            tracing::info!(subscription = %s.id, channel = %conv.channel, by = %user.id, "alerts: channel unsubscribed");
            vec![Reply::text(format!(
                "Unsubscribed `{}` (`{}`); no more alerts from it here.",
                s.id, s.query
            ))]
        }
        Ok(None) => private(format!(
            "This channel has no subscription `{id}`; `subscriptions` lists them."
        )),
        Err(e) => private(format!("Flotilla could not remove the subscription: {e}")),
    }
}

/// The Mute button: silences the agent for that subscription for `for_` (operators only).
pub async fn mute(
    state: &dyn ChatState,
    user: &ChatUser,
    role: Role,
    value: &str,
    for_: Duration,
) -> Vec<Reply> {
    if let Some(r) = needs_operator(role, "Muting an alert") {
        return r;
    }
    let Some((sub, agent)) = value.split_once(' ') else {
        tracing::warn!(value, "alerts: a Mute button with a malformed value");
        return private("That Mute button is malformed; nothing was muted.");
    };
    let m = Mute {
        subscription: sub.to_string(),
        agent: agent.to_string(),
        until_ms: now_ms() + for_.as_millis() as i64,
    };
    match state.mute(&m, user).await {
        Ok(true) => {
            tracing::info!(subscription = sub, agent, by = %user.id, "alerts: agent muted");
            vec![Reply::text(format!(
                "{} muted `{agent}` for subscription `{sub}` for {} min.",
                user.name,
                for_.as_secs() / 60
            ))]
        }
        Ok(false) => private(format!(
            "Subscription `{sub}` no longer exists; nothing was muted."
        )),
        Err(e) => private(format!("Flotilla could not keep the mute: {e}")),
    }
}

/// The Show health button: the agent's state and health.
pub async fn show_health(b: &dyn FleetBackend, uid: &str) -> Vec<Reply> {
    let v = match b.agent(uid).await {
        Ok(v) => v,
        Err(e) => return private(format!("Flotilla refused: {} (`{}`).", e.message, e.code)),
    };
    let o = flotilla_mcp::server::agent_overview(&v, &[]);
    let text = |v: &Value| match v {
        Value::Null => "—".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let h = &o["health"];
    let health = match h["healthy"].as_bool() {
        Some(true) => "healthy".to_string(),
        Some(false) => "unhealthy".to_string(),
        None => "unknown".to_string(),
    };
    let mut fields = vec![
        ("Agent".to_string(), text(&o["host"])),
        ("Type".into(), text(&o["type"])),
        ("State".into(), text(&o["state"])),
        ("Health".into(), health),
        ("Version".into(), text(&o["version"])),
        ("Uid".into(), format!("`{uid}`")),
    ];
    if let Some(e) = h["last_error"].as_str().filter(|e| !e.is_empty()) {
        fields.push(("Last error".into(), e.to_string()));
    }
    if let Some(bad) = h["unhealthy_components"]
        .as_array()
        .filter(|b| !b.is_empty())
    {
        fields.push((
            "Unhealthy components".into(),
            bad.iter().map(text).collect::<Vec<_>>().join(", "),
        ));
    }
    let rcs = &o["remote_config_status"];
    if !rcs.is_null() {
        fields.push(("Remote config".into(), text(&rcs["status"])));
    }
    vec![Reply::text(format!("*Health of {}*", text(&o["host"]))).push(Block::Fields(fields))]
}
