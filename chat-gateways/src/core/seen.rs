//! A bounded, time-limited set of keys: what every adapter remembers to recognise a delivery
//! (Slack event ids, Discord interaction ids) or a signed request it has already taken.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Keys seen in the last `keep_s` seconds, at most `cap` of them (the oldest go first).
#[derive(Debug)]
pub struct Seen {
    keep_s: u64,
    cap: usize,
    inner: Mutex<SeenInner>,
}

#[derive(Debug, Default)]
struct SeenInner {
    at: HashMap<String, i64>,
    order: VecDeque<(i64, String)>,
}

impl Seen {
    pub fn new(keep_s: u64, cap: usize) -> Seen {
        Seen {
            keep_s,
            cap,
            inner: Mutex::new(SeenInner::default()),
        }
    }

    /// Records `key` at unix time `now_s`; `false` if it was recorded before (and is still
    /// remembered).
    pub fn first_time(&self, key: &str, now_s: i64) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let horizon = now_s - self.keep_s as i64;
        while let Some((t, _)) = g.order.front() {
            if *t >= horizon && g.order.len() < self.cap {
                break;
            }
            if let Some((t, k)) = g.order.pop_front() {
                if g.at.get(&k) == Some(&t) {
                    g.at.remove(&k);
                }
            }
        }
        if g.at.contains_key(key) {
            return false;
        }
        g.at.insert(key.to_string(), now_s);
        g.order.push_back((now_s, key.to_string()));
        true
    }
}
