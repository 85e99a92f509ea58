//! Server-wide state of the OpAMP endpoint, kept in memory: limits and counters, what we
//! remember about plain-HTTP agents between requests, pending uid renames, and the batch of
//! heartbeat liveness updates that a flusher task writes once a second.
//!
//! Every map is sharded behind short-lived `std::sync::Mutex` locks that are never held across
//! an `.await`, so 100k agents never queue on one lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use uuid::Uuid;

use super::auth::AgentAuth;
use super::OpampContext;
use crate::model::{now_ms, Millis};
use crate::store::Touch;

const SHARDS: usize = 64;

/// A uid-keyed map split into [`SHARDS`] independently locked parts.
pub struct Sharded<V> {
    shards: Vec<Mutex<HashMap<Uuid, V>>>,
}

impl<V> Sharded<V> {
    pub fn new() -> Sharded<V> {
        Sharded {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, uid: &Uuid) -> std::sync::MutexGuard<'_, HashMap<Uuid, V>> {
        // The last byte of a UUIDv7 (and v4) is random, so shards fill evenly.
        let i = uid.as_bytes()[15] as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, uid: &Uuid) -> Option<V>
    where
        V: Clone,
    {
        self.shard(uid).get(uid).cloned()
    }

    pub fn insert(&self, uid: Uuid, v: V) {
        self.shard(&uid).insert(uid, v);
    }

    /// The value held for `uid`, or `v` stored and returned when there is none (one step, so
    /// two callers racing for an absent key agree on the winner).
    pub fn get_or_insert(&self, uid: Uuid, v: V) -> V
    where
        V: Clone,
    {
        self.shard(&uid).entry(uid).or_insert(v).clone()
    }

    pub fn remove(&self, uid: &Uuid) -> Option<V> {
        self.shard(uid).remove(uid)
    }

    /// Empties every shard and returns what was in them.
    pub fn drain(&self) -> Vec<(Uuid, V)> {
        let mut out = Vec::new();
        for s in &self.shards {
            let taken = std::mem::take(&mut *s.lock().unwrap_or_else(|e| e.into_inner()));
            out.extend(taken);
        }
        out
    }

    /// Removes and returns the entries for which `gone` is true.
    pub fn remove_where(&self, mut gone: impl FnMut(&V) -> bool) -> Vec<(Uuid, V)>
    where
        V: Clone,
    {
        let mut out = Vec::new();
        for s in &self.shards {
            s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|uid, v| {
                    let g = gone(v);
                    if g {
                        out.push((*uid, v.clone()));
                    }
                    !g
                });
        }
        out
    }

    /// Keeps only entries for which `keep` is true.
    pub fn retain(&self, mut keep: impl FnMut(&V) -> bool) {
        for s in &self.shards {
            s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, v| keep(v));
        }
    }
}

impl<V> Default for Sharded<V> {
    fn default() -> Self {
        Self::new()
    }
}

/// What we remember about an agent between its messages: enough to check sequence numbers and
/// to tell a heartbeat from a status change without reading the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Last `sequence_num` received.
    pub seq: u64,
    /// Capabilities as last known (stored or reported).
    pub caps: u64,
    /// When its last message was handled.
    pub at: Millis,
    /// The spacing of its heartbeats on this link.
    pub beat: Beat,
}

/// What one link has seen of an agent's heartbeat spacing, to learn the interval of agents we
/// offer none. Gaps are measured between pure heartbeats (from the link's first message for the
/// first one): a status message can come at any time, and a client that heartbeats on a fixed
/// clock would otherwise look fast right after one. The estimate is the median of the last
/// three gaps, so neither one quick heartbeat nor one long silence (a retry, a paused VM) moves
/// it on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// The last heartbeat, or the link's first message.
    since: Millis,
    /// Newest first, in ms; 0 = not seen yet.
    gaps: [u32; 3],
}

impl Beat {
    pub fn start(now: Millis) -> Beat {
        Beat {
            since: now,
            gaps: [0; 3],
        }
    }

    /// After a pure heartbeat at `now`.
    pub fn heartbeat(self, now: Millis) -> Beat {
        let gap = (now - self.since).clamp(0, 86_400_000) as u32;
        Beat {
            since: now,
            gaps: [gap, self.gaps[0], self.gaps[1]],
        }
    }

    /// The learnt interval in ms, or 0 while no gap was seen.
    pub fn estimate_ms(&self) -> u32 {
        let mut g = self.gaps;
        g.sort_unstable();
        match g.iter().filter(|x| **x > 0).count() {
            // With one or two gaps seen: the longest, erring on the patient side.
            0..=2 => g[2],
            _ => g[1],
        }
    }

    /// The learnt interval in whole seconds (rounded up, at least 1), if any.
    pub fn secs(&self) -> Option<u64> {
        let ms = self.estimate_ms();
        (ms > 0).then(|| u64::from(ms).div_ceil(1000).max(1))
    }
}

/// A plain-HTTP agent between requests (there is no connection to hang this on).
#[derive(Debug, Clone, Copy)]
pub struct HttpPeer {
    pub peer: Peer,
    /// Stable Hub connection id for this agent, so `agent_disconnect` unbinds the right entry.
    pub conn_id: u64,
    /// Connection settings were offered since this server started.
    pub settings_offered: bool,
    /// When its last request was handled.
    pub last: Millis,
}

/// How an agent uses WebSockets, learnt from its connections (see `ws::push_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsStyle {
    /// A connection per message that reads only the answer (fluent-opamp's consumer): never
    /// pushed to; its commands ride in replies.
    OneShot,
    /// Connections that carry many messages and are read throughout: pushed to at once.
    LongLived,
}

/// A plain-HTTP agent silent this long is forgotten (memory and Hub binding), so agents that
/// go away without `agent_disconnect` (the Node client never sends one) do not accumulate. If
/// it comes back, its next poll is treated like the first since a restart.
const HTTP_PEER_TTL_MS: Millis = 3600 * 1000;

/// Entries older than this are forgotten: an agent that did not adopt its new uid in a day
/// never will, and a moved-away uid whose old holder was silent that long is gone.
const RENAME_TTL_MS: Millis = 24 * 3600 * 1000;

/// State shared by every OpAMP request and session of one server.
pub struct Shared {
    pub ctx: Arc<OpampContext>,
    pub auth: AgentAuth,
    /// With `opamp.tls.pin_uid`: the certificate fingerprint pinned to each uid seen since
    /// start (read from its record once), so a message costs no registry read to check.
    pub pins: Sharded<String>,
    /// Plain-HTTP requests being processed now (`max_in_flight` permits).
    pub in_flight: Arc<Semaphore>,
    /// Open WebSocket connections (bounded by `max_connections`).
    pub ws_open: AtomicUsize,
    /// Plain-HTTP agents heard from since start.
    pub http_peers: Sharded<HttpPeer>,
    /// Server-issued uids not yet used by their agent: new uid → (old uid, issued at).
    /// In memory only: after a restart an agent that adopts its new uid is simply a new agent
    /// that is asked for its full state (documented in docs/protocol-conformance.md).
    pub renames: Sharded<(Uuid, Millis)>,
    /// Uids whose record was renamed away while another connection may still use them:
    /// that connection's next message finds the agent unknown and asks for full state.
    pub moved: Sharded<Millis>,
    /// Heartbeat liveness not yet written.
    pub touches: Sharded<Touch>,
    /// What WebSocket agents showed of how they use connections, and when (in memory: after a
    /// restart each agent's next connection shows it again).
    pub ws_styles: Sharded<(WsStyle, Millis)>,
    /// The log budget for malformed messages, per source address.
    pub malformed_log: crate::logflood::SourceLimiter,
    /// The log and audit budget for refusals of a pinned uid, per uid: an agent retrying with
    /// the wrong certificate must not fill the audit trail.
    pub refusal_log: crate::logflood::SourceLimiter,
}

impl Shared {
    pub fn new(ctx: Arc<OpampContext>) -> Shared {
        let auth = AgentAuth::new(&ctx.cfg);
        let in_flight = Arc::new(Semaphore::new(ctx.cfg.max_in_flight.max(1)));
        let malformed_log = crate::logflood::SourceLimiter::new(
            std::time::Duration::from_secs(ctx.cfg.malformed_log_window_s),
            ctx.cfg.malformed_log_burst,
        );
        let refusal_log = crate::logflood::SourceLimiter::new(
            std::time::Duration::from_secs(ctx.cfg.malformed_log_window_s),
            ctx.cfg.malformed_log_burst,
        );
        Shared {
            ctx,
            auth,
            pins: Sharded::new(),
            in_flight,
            ws_open: AtomicUsize::new(0),
            http_peers: Sharded::new(),
            renames: Sharded::new(),
            moved: Sharded::new(),
            touches: Sharded::new(),
            ws_styles: Sharded::new(),
            malformed_log,
            refusal_log,
        }
    }

    /// Whether to log one more malformed message from `remote` (its address, without the
    /// port: a flood opens a new connection per message). Counts it either way.
    pub fn log_malformed(&self, remote: Option<std::net::SocketAddr>) -> bool {
        let source = remote.map_or_else(|| "unknown".to_string(), |a| a.ip().to_string());
        self.malformed_log.allow(&source)
    }

    /// Records a heartbeat for the next batch (a later one for the same agent replaces it,
    /// keeping a learnt interval the later one does not carry).
    pub fn touch(
        &self,
        uid: Uuid,
        last_seen: Millis,
        sequence_num: u64,
        heartbeat_interval_s: Option<u64>,
    ) {
        let mut shard = self.touches.shard(&uid);
        let keep = shard.get(&uid).and_then(|t| t.heartbeat_interval_s);
        shard.insert(
            uid,
            Touch {
                uid,
                last_seen,
                sequence_num,
                heartbeat_interval_s: heartbeat_interval_s.or(keep),
            },
        );
    }

    /// Forgets a pending heartbeat (the record was just written whole, or renamed).
    pub fn untouch(&self, uid: &Uuid) {
        self.touches.remove(uid);
    }

    /// Takes one WebSocket connection slot; `None` when `max_connections` are open.
    pub fn open_ws(self: &Arc<Self>) -> Option<WsSlot> {
        let max = self.ctx.cfg.max_connections;
        let prev = self.ws_open.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.ws_open.fetch_sub(1, Ordering::AcqRel);
            None
        } else {
            Some(WsSlot(self.clone()))
        }
    }

    /// Writes pending heartbeats; on failure they go back into the batch (a newer one that
    /// arrived meanwhile wins) so liveness is delayed, not lost.
    pub async fn flush_touches(&self) {
        let mut batch: Vec<Touch> = self.touches.drain().into_iter().map(|(_, t)| t).collect();
        if batch.is_empty() {
            return;
        }
        batch.sort_by_key(|t| t.uid);
        // Chunks keep each transaction short, so status writes never wait long behind a
        // flush of 100k heartbeats.
        for chunk in batch.chunks(FLUSH_CHUNK) {
            let res = tokio::time::timeout(
                super::session::STORE_TIMEOUT,
                self.ctx.fleet.store().touch_agents(chunk),
            )
            .await;
            let failed = match res {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("timed out".to_string()),
            };
            if let Some(error) = failed {
                tracing::warn!(%error, count = chunk.len(),
                    "writing heartbeat liveness failed; will retry");
                for t in chunk {
                    // A newer heartbeat wins, but keeps the learnt interval the failed one
                    // carried (as `touch` does): the interval is sent only when it changes.
                    let mut shard = self.touches.shard(&t.uid);
                    shard
                        .entry(t.uid)
                        .and_modify(|n| {
                            n.heartbeat_interval_s =
                                n.heartbeat_interval_s.or(t.heartbeat_interval_s)
                        })
                        .or_insert_with(|| t.clone());
                }
            }
        }
    }

    /// Drops rename bookkeeping and WebSocket styles older than a day, and plain-HTTP agents
    /// silent for an hour.
    pub fn purge(&self, now: Millis) {
        self.renames.retain(|(_, at)| now - *at < RENAME_TTL_MS);
        self.moved.retain(|at| now - *at < RENAME_TTL_MS);
        self.ws_styles.retain(|(_, at)| now - *at < RENAME_TTL_MS);
        let gone = self
            .http_peers
            .remove_where(|p| now - p.last >= HTTP_PEER_TTL_MS);
        if !gone.is_empty() {
            // By connection id too: a poll that arrived since then bound the uid afresh.
            let gone: HashMap<Uuid, u64> = gone.into_iter().map(|(u, p)| (u, p.conn_id)).collect();
            self.ctx
                .fleet
                .hub()
                .unbind_http(|uid, conn| gone.get(uid) == Some(&conn));
            tracing::debug!(
                count = gone.len(),
                "forgot plain-HTTP agents silent for an hour"
            );
        }
    }
}

const FLUSH_CHUNK: usize = 5000;

/// An open WebSocket connection's slot; freed on drop (also when the upgrade never completes).
pub struct WsSlot(Arc<Shared>);

impl Drop for WsSlot {
    fn drop(&mut self) {
        self.0.ws_open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Writes batched heartbeats every second until the listeners have drained, then once more.
pub async fn flusher(sh: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Counted down rather than `n % 60` so the cadences need no modulo (and the crate's
    // minimum Rust has no `is_multiple_of`).
    let mut until_purge = 60u32;
    // Sessions silent for `ws_idle_ping_s` are pinged; sweeping at a third of that bounds a
    // dead connection's life to about 1.33 × ws_idle_ping_s + ws_pong_timeout_s.
    let idle_every = (sh.ctx.cfg.ws_idle_ping_s / 3).clamp(1, 600) as u32;
    let mut until_idle = idle_every;
    loop {
        tokio::select! {
            _ = sh.ctx.drain.cancelled() => {
                sh.flush_touches().await;
                return;
            }
            _ = tick.tick() => {
                sh.flush_touches().await;
                until_purge -= 1;
                if until_purge == 0 {
                    until_purge = 60;
                    sh.purge(now_ms());
                }
                until_idle -= 1;
                if until_idle == 0 {
                    until_idle = idle_every;
                    sh.ctx.fleet.hub().idle_check_all();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Beat;

    #[test]
    fn heartbeat_interval_is_the_median_of_recent_gaps() {
        let b = Beat::start(0);
        assert_eq!(b.secs(), None);
        let b = b.heartbeat(30_000);
        assert_eq!(b.secs(), Some(30));
        // One quick heartbeat (a client on a fixed clock right after a status message)…
        let b = b.heartbeat(31_000);
        assert_eq!(b.secs(), Some(30), "two gaps: the longer");
        let b = b.heartbeat(61_000);
        assert_eq!(b.secs(), Some(30), "median of 30, 1, 30");
        // …and one long silence move nothing on their own.
        let b = b.heartbeat(3_661_000);
        assert_eq!(b.secs(), Some(30), "median of 3600, 30, 1");
        // A real change of pace is followed within two heartbeats.
        let b = b.heartbeat(3_666_000).heartbeat(3_671_000);
        assert_eq!(b.secs(), Some(5));
    }
}
