//! Per-channel pacing of Slack Web API writes. Slack allows `chat.postMessage` about one
//! message per second per channel, with short bursts, and answers HTTP 429 with `Retry-After`
//! for that method in that channel. slack-morphism's own rate control keys its special
//! `chat.postMessage` limit by method and workspace (every channel shares one 1/s budget, no
//! burst) and honours a 429 only for the one call that got it, so the gateway paces here
//! instead: a burst then one call per interval for each (method, channel), a 429 holding that
//! pair — and only that pair — until its `Retry-After` has passed.
//!
//! Callers take their turn in arrival order. The queue of each pair is bounded; a call over the
//! bound is refused with a log line naming the channel (the alert engine coalesces what it
//! could not post), never dropped without a word.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How one (method, channel) pair is paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Calls allowed back to back after a quiet spell.
    pub burst: u32,
    /// The steady interval between calls once the burst is spent.
    pub interval: Duration,
}

impl Pace {
    /// `chat.postMessage` and `chat.update`: Slack's ~1 per second per channel, bursts of 3.
    pub const PER_CHANNEL: Pace = Pace {
        burst: 3,
        interval: Duration::from_secs(1),
    };

    /// No pacing of our own; only a 429's `Retry-After` holds the pair.
    pub const UNPACED: Pace = Pace {
        burst: u32::MAX,
        interval: Duration::ZERO,
    };

    fn tolerance(&self) -> Duration {
        self.interval
            .checked_mul(self.burst.saturating_sub(1))
            .unwrap_or(Duration::from_secs(3600))
    }
}

/// The state of one (method, channel) pair: a GCRA "theoretical arrival time", the end of a
/// 429 hold, and how many callers are waiting.
#[derive(Debug)]
struct Slot {
    tat: Instant,
    held_until: Option<Instant>,
    waiting: usize,
}

/// Refused: too many calls are already waiting for this channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backlogged {
    pub waiting: usize,
}

/// Paces calls per (method, channel).
#[derive(Debug)]
pub struct Pacer {
    max_waiting: usize,
    slots: Mutex<HashMap<(&'static str, String), Slot>>,
}

/// Pairs remembered before idle ones are forgotten.
const PRUNE_AT: usize = 4096;

/// A caller's place in a pair's queue; leaving it (drop) frees the place.
pub struct Turn<'a> {
    pacer: &'a Pacer,
    key: (&'static str, String),
    pace: Pace,
}

impl Pacer {
    /// A pacer letting at most `max_waiting` calls wait per (method, channel).
    pub fn new(max_waiting: usize) -> Pacer {
        Pacer {
            max_waiting,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(&'static str, String), Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the queue of `method` in `channel`, or is refused when it is full.
    pub fn enter(
        &self,
        method: &'static str,
        channel: &str,
        pace: Pace,
    ) -> Result<Turn<'_>, Backlogged> {
        let now = Instant::now();
        let mut g = self.lock();
        if g.len() >= PRUNE_AT {
            g.retain(|_, s| s.waiting > 0 || s.tat > now || s.held_until.is_some_and(|h| h > now));
        }
        let slot = g.entry((method, channel.to_string())).or_insert(Slot {
            tat: now,
            held_until: None,
            waiting: 0,
        });
        if slot.waiting >= self.max_waiting {
            return Err(Backlogged {
                waiting: slot.waiting,
            });
        }
        slot.waiting += 1;
        Ok(Turn {
            pacer: self,
            key: (method, channel.to_string()),
            pace,
        })
    }
}

impl Turn<'_> {
    /// Reserves the next send time of the pair (GCRA: no earlier than the burst allows, nor
    /// before a 429 hold ends).
    fn reserve(&self, now: Instant) -> Instant {
        let mut g = self.pacer.lock();
        let Some(slot) = g.get_mut(&self.key) else {
            return now;
        };
        let mut at = now.max(slot.tat.checked_sub(self.pace.tolerance()).unwrap_or(now));
        if let Some(h) = slot.held_until {
            at = at.max(h);
        }
        slot.tat = slot.tat.max(at) + self.pace.interval;
        at
    }

    fn held(&self, now: Instant) -> bool {
        self.pacer
            .lock()
            .get(&self.key)
            .and_then(|s| s.held_until)
            .is_some_and(|h| h > now)
    }

    /// Waits until this caller may send. A 429 that arrives for the pair while waiting sends
    /// it back for a later place.
    pub async fn wait(&self) {
        loop {
            let at = self.reserve(Instant::now());
            tokio::time::sleep_until(at).await;
            if !self.held(Instant::now()) {
                return;
            }
        }
    }

    /// Slack said 429: holds the pair for `retry_after`, and resumes at the steady interval
    /// (no burst) after it.
    pub fn hold(&self, retry_after: Duration) {
        let until = Instant::now() + retry_after;
        let mut g = self.pacer.lock();
        if let Some(slot) = g.get_mut(&self.key) {
            slot.held_until = Some(slot.held_until.map_or(until, |h| h.max(until)));
            slot.tat = slot.tat.max(until + self.pace.tolerance());
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.pacer.lock().get_mut(&self.key) {
            slot.waiting = slot.waiting.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// When each of `n` calls of `channel` gets its turn, relative to the start.
    async fn turns(p: &Pacer, channel: &str, n: usize) -> Vec<Duration> {
        let start = Instant::now();
        let mut out = Vec::new();
        for _ in 0..n {
            let t = p
                .enter("chat.postMessage", channel, Pace::PER_CHANNEL)
                .unwrap();
            t.wait().await;
            out.push(start.elapsed());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_one_per_second_per_channel() {
        let p = Pacer::new(100);
        let s = Duration::from_secs;
        assert_eq!(
            turns(&p, "C1", 5).await,
            [s(0), s(0), s(0), s(1), s(2)],
            "three back to back, then one a second"
        );
        // Another channel has its own budget: it is not behind C1's queue.
        assert_eq!(turns(&p, "C2", 3).await, [s(0), s(0), s(0)]);
        // So has another method in the same channel.
        let t = p.enter("chat.update", "C1", Pace::PER_CHANNEL).unwrap();
        let start = Instant::now();
        t.wait().await;
        assert_eq!(start.elapsed(), s(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_spell_refills_the_burst() {
        let p = Pacer::new(100);
        turns(&p, "C1", 4).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let s = Duration::from_secs;
        assert_eq!(turns(&p, "C1", 4).await, [s(0), s(0), s(0), s(1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_holds_only_its_channel_and_resumes_without_a_burst() {
        let p = Pacer::new(100);
        let t = p
            .enter("chat.postMessage", "C1", Pace::PER_CHANNEL)
            .unwrap();
        t.wait().await;
        t.hold(Duration::from_secs(30));
        drop(t);
        assert_eq!(turns(&p, "C2", 1).await, [Duration::ZERO]);
        let s = Duration::from_secs;
        assert_eq!(turns(&p, "C1", 3).await, [s(30), s(31), s(32)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_sent_back_by_a_429_that_arrived_meanwhile() {
        let p = std::sync::Arc::new(Pacer::new(100));
        // Spend C1's burst so the next caller has to wait a second.
        turns(&p, "C1", 3).await;
        let start = Instant::now();
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move {
                let t = p
                    .enter("chat.postMessage", "C1", Pace::PER_CHANNEL)
                    .unwrap();
                t.wait().await;
                start.elapsed()
            })
        };
        tokio::task::yield_now().await;
        let t = p.enter("chat.postMessage", "C1", Pace::UNPACED).unwrap();
        t.hold(Duration::from_secs(5));
        drop(t);
        assert!(waiter.await.unwrap() >= Duration::from_secs(5));
    }

    #[test]
    fn a_full_queue_refuses_the_next_call() {
        let p = Pacer::new(2);
        let a = p
            .enter("chat.postMessage", "C1", Pace::PER_CHANNEL)
            .unwrap();
        let _b = p
            .enter("chat.postMessage", "C1", Pace::PER_CHANNEL)
            .unwrap();
        assert_eq!(
            p.enter("chat.postMessage", "C1", Pace::PER_CHANNEL).err(),
            Some(Backlogged { waiting: 2 })
        );
        assert!(p.enter("chat.postMessage", "C2", Pace::PER_CHANNEL).is_ok());
        drop(a);
        assert!(p.enter("chat.postMessage", "C1", Pace::PER_CHANNEL).is_ok());
    }
}
