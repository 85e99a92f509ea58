//! The in-memory registry index: every agent's record (without configuration bodies) with
//! postings per search key and counts kept up to date on write, so a search on an indexed key,
//! the fleet summary, the catalog and `/metrics` cost what their answer costs, not the fleet's
//! size.
//!
//! It is fed by [`crate::store::indexed::IndexedStore`], which applies every agent write the
//! store committed, so it cannot miss one whichever path wrote it. Liveness (healthy, late,
//! offline) changes with time and no write marks it: a deadline index holds each agent's next
//! transition, and every read or write first applies the transitions due by now — the cost is
//! the agents that changed, never a scan. The query language's own [`Query::matches`] decides
//! every answer; the postings only narrow the candidates, so an index can make a search
//! slower, never wrong.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use crate::commands;
use crate::model::{now_ms, Agent, CommandKind, Liveness, Millis, Transport};
use crate::query::{CapTerm, Indexed, Query};
use crate::store::Touch;

const HEALTH: [&str; 3] = ["healthy", "unhealthy", "unknown"];
const STATE: [&str; 3] = ["healthy", "late", "offline"];

fn health_ix(a: &Agent) -> usize {
    match a.health.as_ref().map(|h| h.healthy) {
        Some(true) => 0,
        Some(false) => 1,
        None => 2,
    }
}

fn state_ix(l: Liveness) -> usize {
    match l {
        Liveness::Healthy => 0,
        Liveness::Late => 1,
        Liveness::Offline => 2,
    }
}

/// The first instant at which `a`'s liveness differs from `state` (None: never, until a write).
fn next_due(a: &Agent, state: Liveness) -> Option<Millis> {
    let interval = (a.heartbeat_interval_s.max(1) as i64) * 1000;
    match state {
        _ if a.departed => None,
        Liveness::Healthy => Some(a.last_seen + interval * 3 / 2 + 1),
        Liveness::Late => Some(a.last_seen + interval * 3 + 1),
        Liveness::Offline => None,
    }
}

/// Probe parameters per command kind, so the catalog's capability checks of parametrised
/// kinds can run (`custom` is counted apart: agents declaring any custom capability).
fn probes() -> Vec<(CommandKind, serde_json::Value)> {
    CommandKind::ALL
        .iter()
        .map(|k| {
            let p = match k {
                CommandKind::Chatops => serde_json::json!({"tag": "x"}),
                CommandKind::RemoteConfig => serde_json::json!({"files": {"f": "x"}}),
                _ => serde_json::Value::Null,
            };
            (
                *k,
                commands::validate_params(*k, &p).unwrap_or(serde_json::Value::Null),
            )
        })
        .collect()
}

/// What an agent is indexed under (derived from its record; unchanged by heartbeats).
#[derive(Clone, PartialEq)]
struct Keys {
    ty: String,
    version: Option<String>,
    health: usize,
    /// Lowercased, de-duplicated.
    hosts: Vec<String>,
    labels: Vec<String>,
    bits: u64,
    custom: Vec<String>,
    /// Bit i: the agent can run `CommandKind::ALL[i]` (catalog counts).
    capable: u32,
}

impl Keys {
    fn of(a: &Agent, probes: &[(CommandKind, serde_json::Value)]) -> Keys {
        let mut hosts: Vec<String> = a.hosts().map(str::to_lowercase).collect();
        hosts.sort();
        hosts.dedup();
        let mut custom = a.custom_capabilities.clone();
        custom.sort();
        custom.dedup();
        let mut capable = 0u32;
        for (i, (k, p)) in probes.iter().enumerate() {
            let can = if *k == CommandKind::Custom {
                !a.custom_capabilities.is_empty()
            } else {
                commands::check_capable(a, *k, p).is_ok()
            };
            if can {
                capable |= 1 << i;
            }
        }
        Keys {
            ty: a.agent_type(),
            version: a.attr("service.version").map(str::to_string),
            health: health_ix(a),
            hosts,
            labels: a.labels.keys().cloned().collect(),
            bits: a.capabilities,
            custom,
            capable,
        }
    }
}

struct Slot {
    agent: Arc<Agent>,
    keys: Keys,
    state: Liveness,
    due: Option<Millis>,
}

type Set = BTreeSet<Uuid>;

fn add(map: &mut HashMap<String, Set>, key: &str, uid: Uuid) {
    map.entry(key.to_string()).or_default().insert(uid);
}

fn del(map: &mut HashMap<String, Set>, key: &str, uid: Uuid) {
    if let Some(s) = map.get_mut(key) {
        s.remove(&uid);
        if s.is_empty() {
            map.remove(key);
        }
    }
}

/// Until the index holds the whole registry, writes it sees are noted and re-read.
enum Phase {
    Unloaded,
    Loading(HashSet<Uuid>),
    Ready,
}

struct Inner {
    phase: Phase,
    agents: BTreeMap<Uuid, Slot>,
    by_type: HashMap<String, Set>,
    by_version: HashMap<String, Set>,
    no_version: Set,
    by_health: [Set; 3],
    by_state: [Set; 3],
    by_host: HashMap<String, Set>,
    by_label: HashMap<String, Set>,
    by_bit: Vec<Set>,
    by_custom: HashMap<String, Set>,
    capable: Vec<usize>,
    due: BTreeSet<(Millis, Uuid)>,
    /// The latest instant states were brought up to: never goes back, so a reader whose clock
    /// read is a little older than a concurrent writer's never sees a state from its future.
    clock: Millis,
    probes: Vec<(CommandKind, serde_json::Value)>,
}

/// The fleet counts of [`Registry::summary`]: non-zero buckets only.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Summary {
    pub total: usize,
    pub by_type: BTreeMap<String, usize>,
    pub by_version: BTreeMap<String, usize>,
    pub by_health: BTreeMap<String, usize>,
    pub by_state: BTreeMap<String, usize>,
}

/// One page of a search.
pub struct Found {
    /// Matching agents after the cursor, in uid order, at most the limit.
    pub items: Vec<Arc<Agent>>,
    /// More match after the last item.
    pub more: bool,
    /// All matches (cursor ignored), when asked for.
    pub total: Option<usize>,
    /// The instant the query was evaluated at.
    pub now: Millis,
}

/// Candidates for a query: the union of some postings (`None`: every agent).
type Cands<'a> = Option<Vec<&'a Set>>;

impl Inner {
    fn new() -> Inner {
        let probes = probes();
        Inner {
            phase: Phase::Unloaded,
            agents: BTreeMap::new(),
            by_type: HashMap::new(),
            by_version: HashMap::new(),
            no_version: Set::new(),
            by_health: Default::default(),
            by_state: Default::default(),
            by_host: HashMap::new(),
            by_label: HashMap::new(),
            by_bit: vec![Set::new(); 64],
            by_custom: HashMap::new(),
            capable: vec![0; probes.len()],
            due: BTreeSet::new(),
            clock: 0,
            probes,
        }
    }

    /// Brings liveness up to `now` (or the clock, if later); returns the instant used.
    fn advance(&mut self, now: Millis) -> Millis {
        self.clock = self.clock.max(now);
        let now = self.clock;
        while let Some(&(d, uid)) = self.due.first() {
            if d > now {
                break;
            }
            self.due.pop_first();
            if let Some(slot) = self.agents.get_mut(&uid) {
                slot.due = None;
            }
            self.restate(uid);
        }
        now
    }

    /// Recomputes `uid`'s liveness at the clock and its next deadline.
    fn restate(&mut self, uid: Uuid) {
        let now = self.clock;
        let Some(slot) = self.agents.get_mut(&uid) else {
            return;
        };
        let new = slot.agent.liveness(now);
        if new != slot.state {
            self.by_state[state_ix(slot.state)].remove(&uid);
            self.by_state[state_ix(new)].insert(uid);
            slot.state = new;
        }
        if let Some(d) = slot.due.take() {
            self.due.remove(&(d, uid));
        }
        slot.due = next_due(&slot.agent, slot.state);
        if let Some(d) = slot.due {
            self.due.insert((d, uid));
        }
    }

    fn post(&mut self, uid: Uuid, k: &Keys, on: bool) {
        let f = if on { add } else { del };
        f(&mut self.by_type, &k.ty, uid);
        match &k.version {
            Some(v) => f(&mut self.by_version, v, uid),
            None if on => {
                self.no_version.insert(uid);
            }
            None => {
                self.no_version.remove(&uid);
            }
        }
        for h in &k.hosts {
            f(&mut self.by_host, h, uid);
        }
        for l in &k.labels {
            f(&mut self.by_label, l, uid);
        }
        for c in &k.custom {
            f(&mut self.by_custom, c, uid);
        }
        let sets = std::iter::once(&mut self.by_health[k.health]).chain(
            self.by_bit
                .iter_mut()
                .enumerate()
                .filter(|(b, _)| k.bits & (1u64 << b) != 0)
                .map(|(_, s)| s),
        );
        for s in sets {
            if on {
                s.insert(uid);
            } else {
                s.remove(&uid);
            }
        }
        for (i, n) in self.capable.iter_mut().enumerate() {
            if k.capable & (1 << i) != 0 {
                if on {
                    *n += 1;
                } else {
                    *n -= 1;
                }
            }
        }
    }

    /// Puts `agent` (as stored) in the index, replacing what it held for its uid.
    fn put(&mut self, agent: Agent) {
        let uid = agent.uid;
        let keys = Keys::of(&agent, &self.probes);
        let agent = Arc::new(agent);
        if let Some(slot) = self.agents.get_mut(&uid) {
            let old = std::mem::replace(&mut slot.keys, keys.clone());
            slot.agent = agent;
            if old != keys {
                self.post(uid, &old, false);
                self.post(uid, &keys, true);
            }
        } else {
            self.post(uid, &keys, true);
            let state = agent.liveness(self.clock);
            self.by_state[state_ix(state)].insert(uid);
            self.agents.insert(
                uid,
                Slot {
                    agent,
                    keys,
                    state,
                    due: None,
                },
            );
        }
        self.restate(uid);
    }

    fn take(&mut self, uid: Uuid) -> Option<Agent> {
        let slot = self.agents.remove(&uid)?;
        self.post(uid, &slot.keys, false);
        self.by_state[state_ix(slot.state)].remove(&uid);
        if let Some(d) = slot.due {
            self.due.remove(&(d, uid));
        }
        Some(Arc::unwrap_or_clone(slot.agent))
    }

    /// Changes `uid`'s record in place with `f` (false: nothing changed).
    fn edit(&mut self, uid: Uuid, f: impl FnOnce(&mut Agent) -> bool) {
        let Some(slot) = self.agents.get_mut(&uid) else {
            return;
        };
        let mut a = (*slot.agent).clone();
        if f(&mut a) {
            self.put(a);
        }
    }

    /// A heartbeat changes only liveness: no re-keying.
    fn touch(&mut self, t: &Touch) {
        let Some(slot) = self.agents.get_mut(&t.uid) else {
            return;
        };
        // As the store: a touch older than the record does not roll it back.
        if slot.agent.last_seen > t.last_seen {
            return;
        }
        let a = Arc::make_mut(&mut slot.agent);
        a.last_seen = t.last_seen;
        a.sequence_num = t.sequence_num;
        if let Some(hb) = t.heartbeat_interval_s {
            a.heartbeat_interval_s = hb;
        }
        self.restate(t.uid);
    }

    /// The candidates of one indexed term.
    fn cands<'a>(&'a self, t: &Indexed<'_>) -> Cands<'a> {
        let union = |m: &'a HashMap<String, Set>, f: &dyn Fn(&str) -> bool| {
            Some(m.iter().filter(|(k, _)| f(k)).map(|(_, s)| s).collect())
        };
        match t {
            Indexed::Type(g) => union(&self.by_type, &|k| g.matches(k)),
            Indexed::Health(h) => {
                let i = HEALTH.iter().position(|x| x == h)?;
                Some(vec![&self.by_health[i]])
            }
            Indexed::State("online") => Some(vec![&self.by_state[0], &self.by_state[1]]),
            Indexed::State(s) => {
                let i = STATE.iter().position(|x| x == s)?;
                Some(vec![&self.by_state[i]])
            }
            Indexed::Version(g) => union(&self.by_version, &|k| {
                g.matches(k) || crate::model::version_number(k).is_some_and(|n| g.matches(n))
            }),
            Indexed::Host(_, Some(exact)) => Some(self.by_host.get(*exact).into_iter().collect()),
            Indexed::Host(g, None) => union(&self.by_host, &|k| g.matches(k)),
            Indexed::Label(k) => Some(self.by_label.get(*k).into_iter().collect()),
            Indexed::Capability(CapTerm::Bit(cap)) => {
                let bits = *cap as u64;
                (bits.count_ones() == 1).then(|| vec![&self.by_bit[bits.trailing_zeros() as usize]])
            }
            Indexed::Capability(c) => union(&self.by_custom, &|k| c.custom_matches(k)),
        }
    }

    fn search(&self, q: &Query, after: Option<Uuid>, limit: usize, with_total: bool) -> Found {
        let now = self.clock;
        let size = |c: &Vec<&Set>| c.iter().map(|s| s.len()).sum::<usize>();
        let best = q
            .indexed()
            .filter_map(|t| self.cands(&t))
            .min_by_key(|c| size(c));
        // With a total, matches before the cursor are counted too.
        let from = if with_total { None } else { after };
        let mut items = Vec::new();
        let mut more = false;
        let mut total = 0usize;
        let mut visit = |uid: &Uuid, a: &Arc<Agent>| -> bool {
            if !q.matches(a, now) {
                return true;
            }
            total += 1;
            if after.is_some_and(|c| *uid <= c) {
                return true;
            }
            if items.len() == limit {
                more = true;
                return with_total;
            }
            items.push(a.clone());
            true
        };
        let lower = from.map_or(Bound::Unbounded, Bound::Excluded);
        match best {
            None => {
                for (uid, slot) in self.agents.range((lower, Bound::Unbounded)) {
                    if !visit(uid, &slot.agent) {
                        break;
                    }
                }
            }
            Some(sets) => {
                let mut walk = |uids: &mut dyn Iterator<Item = &Uuid>| {
                    for uid in uids {
                        if let Some(slot) = self.agents.get(uid) {
                            if !visit(uid, &slot.agent) {
                                break;
                            }
                        }
                    }
                };
                match sets.as_slice() {
                    [] => {}
                    [one] => walk(&mut one.range((lower, Bound::Unbounded))),
                    many => {
                        let mut all: Vec<&Uuid> = many
                            .iter()
                            .flat_map(|s| s.range((lower, Bound::Unbounded)))
                            .collect();
                        all.sort_unstable();
                        all.dedup();
                        walk(&mut all.into_iter());
                    }
                }
            }
        }
        Found {
            items,
            more,
            total: with_total.then_some(total),
            now,
        }
    }
}

/// The index. One per server, shared by the store wrapper and [`crate::service::Fleet`].
pub struct Registry {
    inner: Mutex<Inner>,
    loaded: tokio::sync::OnceCell<()>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            inner: Mutex::new(Inner::new()),
            loaded: tokio::sync::OnceCell::new(),
        }
    }
}

/// Agents read per page while loading.
const LOAD_PAGE: usize = 1000;

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change leaves the index whole between statements that could panic; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the whole registry from `store` once (the first caller does it, the others wait).
    /// Writes applied meanwhile are re-read afterwards, so none is lost.
    pub async fn ensure_loaded(
        &self,
        store: &dyn crate::store::Store,
    ) -> crate::store::StoreResult<()> {
        self.loaded
            .get_or_try_init(|| async {
                let started = std::time::Instant::now();
                self.lock().phase = Phase::Loading(HashSet::new());
                let mut after = None;
                loop {
                    let page = store.list_agents_brief(after, LOAD_PAGE).await?;
                    let n = page.len();
                    {
                        let mut g = self.lock();
                        g.advance(now_ms());
                        for a in page {
                            after = Some(a.uid);
                            g.put(a);
                        }
                    }
                    if n < LOAD_PAGE {
                        break;
                    }
                }
                loop {
                    let dirty = match &mut self.lock().phase {
                        Phase::Loading(d) => std::mem::take(d),
                        _ => HashSet::new(),
                    };
                    if dirty.is_empty() {
                        let mut g = self.lock();
                        if matches!(&g.phase, Phase::Loading(d) if d.is_empty()) {
                            g.phase = Phase::Ready;
                            break;
                        }
                        continue;
                    }
                    for uid in dirty {
                        let fresh = store.get_agent(uid).await?;
                        let mut g = self.lock();
                        g.advance(now_ms());
                        g.take(uid);
                        if let Some(mut a) = fresh {
                            a.effective_config = None;
                            a.desired_config = None;
                            g.put(a);
                        }
                    }
                }
                tracing::info!(
                    agents = self.lock().agents.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "registry index loaded"
                );
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Applies a committed write to the index with `f`. Before the load started it is
    /// ignored (the load reads it); during the load its agents are re-read after.
    fn write(&self, uids: &[Uuid], f: impl FnOnce(&mut Inner)) {
        let mut g = self.lock();
        match &mut g.phase {
            Phase::Unloaded => {}
            Phase::Loading(dirty) => dirty.extend(uids.iter().copied()),
            Phase::Ready => {
                g.advance(now_ms());
                f(&mut g);
            }
        }
    }

    /// `Store::put_agent` committed `a`: server-owned fields of a known agent are kept, as the
    /// store keeps them.
    pub fn put_agent(&self, a: &Agent) {
        self.write(&[a.uid], |g| {
            let mut new = a.clone();
            new.effective_config = None;
            new.desired_config = None;
            if let Some(old) = g.agents.get(&a.uid) {
                let old = &old.agent;
                new.labels = old.labels.clone();
                new.replaces = old.replaces;
                new.replaced_by = old.replaced_by;
                new.first_seen = old.first_seen.min(new.first_seen);
                new.previous_uid = new.previous_uid.or(old.previous_uid);
            }
            g.put(new);
        });
    }

    pub fn touch(&self, touches: &[Touch]) {
        let uids: Vec<Uuid> = touches.iter().map(|t| t.uid).collect();
        self.write(&uids, |g| {
            for t in touches {
                g.touch(t);
            }
        });
    }

    /// As `Store::set_connected`.
    pub fn set_connected(
        &self,
        uid: Uuid,
        connected: bool,
        transport: Option<Transport>,
        remote_addr: Option<String>,
        at: Millis,
    ) {
        self.write(&[uid], |g| {
            g.edit(uid, |a| {
                if !connected && a.last_seen > at {
                    return false;
                }
                a.connected = connected;
                if connected {
                    a.departed = false;
                    a.last_seen = a.last_seen.max(at);
                }
                if transport.is_some() {
                    a.transport = transport;
                }
                if remote_addr.is_some() {
                    a.remote_addr = remote_addr;
                }
                true
            })
        });
    }

    pub fn mark_all_disconnected(&self) {
        let uids: Vec<Uuid> = self.lock().agents.keys().copied().collect();
        self.write(&uids, |g| {
            let connected: Vec<Uuid> = g
                .agents
                .iter()
                .filter(|(_, s)| s.agent.connected)
                .map(|(u, _)| *u)
                .collect();
            for uid in connected {
                g.edit(uid, |a| {
                    a.connected = false;
                    true
                });
            }
        });
    }

    /// `Store::rename_agent` moved `old` to `new`.
    pub fn renamed(&self, old: Uuid, new: Uuid) {
        self.write(&[old, new], |g| {
            if let Some(mut a) = g.take(old) {
                a.uid = new;
                a.previous_uid = Some(old);
                g.put(a);
            }
        });
    }

    /// `Store::link_reregistration` linked `old` to its successor `new`.
    pub fn linked(&self, old: Uuid, new: Uuid) {
        self.write(&[old, new], |g| {
            g.edit(old, |a| {
                a.replaced_by = Some(new);
                a.connected = false;
                a.departed = true;
                true
            });
            g.edit(new, |a| {
                a.replaces = Some(old);
                true
            });
        });
    }

    pub fn set_label(&self, uid: Uuid, key: &str, value: Option<&str>) {
        self.write(&[uid], |g| {
            g.edit(uid, |a| {
                match value {
                    Some(v) => a.labels.insert(key.to_string(), v.to_string()),
                    None => a.labels.remove(key),
                };
                true
            })
        });
    }

    /// Agents matching `q`: `limit` of them after `after` in uid order, and the number of all
    /// matches when `with_total`.
    pub fn search(&self, q: &Query, after: Option<Uuid>, limit: usize, with_total: bool) -> Found {
        let mut g = self.lock();
        g.advance(now_ms());
        g.search(q, after, limit, with_total)
    }

    /// Counts by type, `service.version`, health and liveness.
    pub fn summary(&self) -> Summary {
        let mut g = self.lock();
        g.advance(now_ms());
        let count = |m: &HashMap<String, Set>| {
            m.iter()
                .map(|(k, s)| (k.clone(), s.len()))
                .collect::<BTreeMap<_, _>>()
        };
        let mut by_version = count(&g.by_version);
        if !g.no_version.is_empty() {
            *by_version.entry("unknown".into()).or_default() += g.no_version.len();
        }
        let fixed = |names: &[&str; 3], sets: &[Set; 3]| {
            names
                .iter()
                .zip(sets)
                .filter(|(_, s)| !s.is_empty())
                .map(|(n, s)| (n.to_string(), s.len()))
                .collect()
        };
        Summary {
            total: g.agents.len(),
            by_type: count(&g.by_type),
            by_version,
            by_health: fixed(&HEALTH, &g.by_health),
            by_state: fixed(&STATE, &g.by_state),
        }
    }

    /// How many agents can run each command kind (`custom`: agents declaring any custom
    /// capability).
    pub fn capable(&self) -> Vec<(CommandKind, usize)> {
        let g = self.lock();
        g.probes
            .iter()
            .zip(&g.capable)
            .map(|((k, _), n)| (*k, *n))
            .collect()
    }
}
