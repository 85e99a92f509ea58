//! Rate limits for log lines that a remote party can trigger at will (malformed agent
//! messages): a few lines per source and window, then one summary line per source saying how
//! many were suppressed. 220k bad messages once wrote 58 MB of log; now a source costs at most
//! `burst + 1` lines per window.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sources tracked at once; past this, new sources share one entry, so a flood from many
/// addresses cannot grow the map without bound.
const MAX_SOURCES: usize = 10_000;
/// The entry that sources beyond [`MAX_SOURCES`] share.
const OTHERS: &str = "other sources";

struct Entry {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

/// Per-source log budget: [`SourceLimiter::allow`] says whether to write a line,
/// [`SourceLimiter::summaries`] what was held back.
pub struct SourceLimiter {
    window: Duration,
    burst: u32,
    sources: Mutex<HashMap<String, Entry>>,
}

/// Sources whose lines were held back in a window that has ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    pub source: String,
    pub count: u64,
}

impl SourceLimiter {
    pub fn new(window: Duration, burst: u32) -> SourceLimiter {
        SourceLimiter {
            window,
            burst,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// The window, for the summary line.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Counts one line from `source`; true if it should be written.
    pub fn allow(&self, source: &str) -> bool {
        let now = Instant::now();
        let mut map = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let key = if map.len() >= MAX_SOURCES && !map.contains_key(source) {
            OTHERS
        } else {
            source
        };
        let e = map.entry(key.to_string()).or_insert(Entry {
            window_start: now,
            logged: 0,
            suppressed: 0,
        });
        if e.logged < self.burst {
            e.logged += 1;
            true
        } else {
            e.suppressed += 1;
            false
        }
    }

    /// Ends the windows that are over: returns what each source had suppressed in its window
    /// (sources with nothing held back are forgotten).
    pub fn summaries(&self, now: Instant) -> Vec<Suppressed> {
        let mut out = Vec::new();
        let mut map = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|source, e| {
            if now.duration_since(e.window_start) < self.window {
                return true;
            }
            if e.suppressed > 0 {
                out.push(Suppressed {
                    source: source.clone(),
                    count: e.suppressed,
                });
            }
            false
        });
        out.sort_by(|a, b| a.source.cmp(&b.source));
        out
    }

    /// Writes the summary line of every ended window, every `window / 4` (so a summary comes
    /// at most a quarter window late), until `stop` is cancelled; then writes what is left.
    pub async fn report(&self, what: &'static str, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval((self.window / 4).max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = tokio::select! {
                _ = stop.cancelled() => Instant::now() + self.window,
                _ = tick.tick() => Instant::now(),
            };
            for s in self.summaries(now) {
                tracing::warn!(source = %s.source, suppressed = s.count,
                    window_s = self.window.as_secs(),
                    "suppressed {} similar messages ({what}) from {} in the last {} s",
                    s.count, s.source, self.window.as_secs());
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_burst_then_a_count() {
        let l = SourceLimiter::new(Duration::from_secs(60), 3);
        let allowed = (0..100).filter(|_| l.allow("10.0.0.1")).count();
        assert_eq!(allowed, 3);
        assert!(l.allow("10.0.0.2"), "another source has its own budget");
        assert!(l.summaries(Instant::now()).is_empty(), "window not over");
        let later = Instant::now() + Duration::from_secs(61);
        assert_eq!(
            l.summaries(later),
            vec![Suppressed {
                source: "10.0.0.1".into(),
                count: 97
            }]
        );
        assert!(l.allow("10.0.0.1"), "a new window, a new budget");
    }

    #[test]
    fn sources_past_the_cap_share_one_entry() {
        let l = SourceLimiter::new(Duration::from_secs(60), 1);
        for i in 0..MAX_SOURCES {
            assert!(l.allow(&format!("s{i}")));
        }
        assert!(l.allow("new-1"));
        assert!(!l.allow("new-2"), "shares the budget of new-1");
        let s = l.summaries(Instant::now() + Duration::from_secs(61));
        assert_eq!(
            s,
            vec![Suppressed {
                source: OTHERS.into(),
                count: 1
            }]
        );
    }
}
