//! Live updates: `GET /ui/events`, Server-Sent Events built on the fleet's event bus.
//!
//! The console does not forward the bus event by event: a 10k-agent reconnect storm is tens of
//! thousands of events a second. Each stream collects what changed for one window after the
//! first event and then sends one `change` message naming the topics (`agents`, `commands`,
//! `audit`, `approvals`); the page's script re-renders the regions that show those topics from
//! the page's own URL. A console therefore gets at most one message per window whatever the
//! fleet does. A reader that falls behind the bus is told everything changed. The stream ends
//! with an `expired` message when the session does, and with `shutdown` when the server stops.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde_json::Value;
use tokio::sync::broadcast;

use super::{Op, S};
use crate::model::{now_ms, Millis};

/// How long a stream gathers changes before it sends them.
pub const WINDOW: Duration = Duration::from_millis(1000);
/// Comment lines that keep idle connections (and proxies) from timing out.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The topics a bus event touches (empty: none the console shows).
pub fn topics_of(event: &Value) -> &'static [&'static str] {
    let ty = event["type"].as_str().unwrap_or("");
    match ty {
        "command.progress" | "command.failed" | "batch.queued" => &["commands"],
        "audit" => &["audit"],
        "confirmation" => &["approvals"],
        t if t.starts_with("agent.") || t.starts_with("config.") => &["agents"],
        _ => &[],
    }
}

const ALL: [&str; 4] = ["agents", "commands", "audit", "approvals"];

/// Agents named per topic in one message at most; past this a topic refreshes every region.
const MAX_UIDS: usize = 50;

/// `GET /ui/events`.
pub async fn events(State(st): State<S>, op: Op) -> Response {
    Sse::new(changes(st.fleet.subscribe(), op.session.expires_at, WINDOW))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

enum Next {
    Event(Arc<Value>),
    Lagged,
    Closed,
    Expired,
    WindowDone,
}

struct St {
    rx: broadcast::Receiver<Arc<Value>>,
    expires_at: Millis,
    window: Duration,
    pending: BTreeSet<&'static str>,
    /// Per pending topic, the agents it was about; `None` when one event named none (or too
    /// many did), which refreshes every region of that topic.
    uids: BTreeMap<&'static str, Option<BTreeSet<String>>>,
    deadline: Option<tokio::time::Instant>,
    done: bool,
}

impl St {
    async fn next(&mut self) -> Next {
        let left = Duration::from_millis((self.expires_at - now_ms()).max(0) as u64);
        let expiry = tokio::time::sleep(left);
        let window = async {
            match self.deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = self.rx.recv() => match r {
                Ok(v) => Next::Event(v),
                Err(broadcast::error::RecvError::Lagged(_)) => Next::Lagged,
                Err(broadcast::error::RecvError::Closed) => Next::Closed,
            },
            _ = window => Next::WindowDone,
            _ = expiry => Next::Expired,
        }
    }

    fn add(&mut self, topics: &[&'static str], uid: Option<&str>) {
        if topics.is_empty() {
            return;
        }
        self.pending.extend(topics);
        for t in topics {
            let known = self.uids.entry(t).or_insert_with(|| Some(BTreeSet::new()));
            match (known.as_mut(), uid) {
                (Some(set), Some(u)) if set.len() < MAX_UIDS || set.contains(u) => {
                    set.insert(u.to_string());
                }
                _ => *known = None,
            }
        }
        if self.deadline.is_none() {
            self.deadline = Some(tokio::time::Instant::now() + self.window);
        }
    }

    fn flush(&mut self) -> Event {
        let topics: Vec<&str> = std::mem::take(&mut self.pending).into_iter().collect();
        let uids: serde_json::Map<String, Value> = std::mem::take(&mut self.uids)
            .into_iter()
            .filter_map(|(t, u)| Some((t.to_string(), serde_json::json!(u?))))
            .collect();
        self.deadline = None;
        let mut data = serde_json::json!({ "topics": topics });
        if !uids.is_empty() {
            data["uids"] = Value::Object(uids);
        }
        Event::default().event("change").data(data.to_string())
    }
}

/// The debounced stream of `change` messages over a bus receiver.
pub fn changes(
    rx: broadcast::Receiver<Arc<Value>>,
    expires_at: Millis,
    window: Duration,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let st = St {
        rx,
        expires_at,
        window,
        pending: BTreeSet::new(),
        uids: BTreeMap::new(),
        deadline: None,
        done: false,
    };
    stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            match st.next().await {
                Next::Event(v) => {
                    if v["type"] == "shutdown" {
                        st.done = true;
                        let ev = Event::default().event("shutdown").data("{}");
                        return Some((Ok(ev), st));
                    }
                    let uid = v["uid"].as_str().or(v["agent_uid"].as_str());
                    st.add(topics_of(&v), uid);
                }
                Next::Lagged => st.add(&ALL, None),
                Next::WindowDone => return Some((Ok(st.flush()), st)),
                Next::Closed => {
                    st.done = true;
                    return Some((Ok(Event::default().event("shutdown").data("{}")), st));
                }
                Next::Expired => {
                    st.done = true;
                    return Some((Ok(Event::default().event("expired").data("{}")), st));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use serde_json::json;

    fn ev(ty: &str) -> Arc<Value> {
        Arc::new(json!({"type": ty}))
    }

    /// An SSE event as it goes on the wire.
    async fn wire(e: Event) -> String {
        let resp = Sse::new(stream::iter([Ok::<_, Infallible>(e)])).into_response();
        let b = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_becomes_one_message_per_window() {
        let (tx, rx) = broadcast::channel(64);
        let far = now_ms() + 3_600_000;
        let mut s = Box::pin(changes(rx, far, Duration::from_millis(1000)));
        // 40 events within the window (a storm) and one the console does not show.
        for i in 0..40 {
            tx.send(ev(if i % 2 == 0 {
                "agent.online"
            } else {
                "command.progress"
            }))
            .unwrap();
        }
        tx.send(ev("subscription")).unwrap();
        let first = s.next().await.unwrap().unwrap();
        let w = wire(first).await;
        assert!(w.contains("event: change"), "{w}");
        assert!(w.contains(r#"{"topics":["agents","commands"]}"#), "{w}");
        // Nothing more is pending: the next message needs a new event and a new window.
        let started = tokio::time::Instant::now();
        tx.send(ev("audit")).unwrap();
        let w = wire(s.next().await.unwrap().unwrap()).await;
        assert!(w.contains(r#"{"topics":["audit"]}"#), "{w}");
        assert!(tokio::time::Instant::now() - started >= Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lagging_reader_refreshes_everything_and_streams_end() {
        let (tx, rx) = broadcast::channel(4);
        let far = now_ms() + 3_600_000;
        let mut s = Box::pin(changes(rx, far, Duration::from_millis(500)));
        for _ in 0..10 {
            tx.send(ev("audit")).unwrap();
        }
        let w = wire(s.next().await.unwrap().unwrap()).await;
        assert!(
            w.contains(r#"{"topics":["agents","approvals","audit","commands"]}"#),
            "{w}"
        );
        tx.send(ev("shutdown")).unwrap();
        let w = wire(s.next().await.unwrap().unwrap()).await;
        assert!(w.contains("event: shutdown"), "{w}");
        assert!(s.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_names_the_agents_it_is_about_while_they_are_few() {
        let (tx, rx) = broadcast::channel(256);
        let far = now_ms() + 3_600_000;
        let mut s = Box::pin(changes(rx, far, Duration::from_millis(1000)));
        let on = |ty: &str, k: &str, u: &str| Arc::new(json!({"type": ty, k: u}));
        tx.send(on("agent.labels", "uid", "a")).unwrap();
        tx.send(on("command.progress", "agent_uid", "b")).unwrap();
        tx.send(on("agent.health", "uid", "a")).unwrap();
        let w = wire(s.next().await.unwrap().unwrap()).await;
        assert!(
            w.contains(
                r#"{"topics":["agents","commands"],"uids":{"agents":["a"],"commands":["b"]}}"#
            ),
            "{w}"
        );
        // Too many agents, or an event naming none: that topic refreshes everything.
        for i in 0..=MAX_UIDS {
            tx.send(on("agent.liveness", "uid", &i.to_string()))
                .unwrap();
        }
        tx.send(on("command.progress", "agent_uid", "c")).unwrap();
        tx.send(ev("batch.queued")).unwrap();
        let w = wire(s.next().await.unwrap().unwrap()).await;
        assert!(w.contains(r#"{"topics":["agents","commands"]}"#), "{w}");
    }

    #[tokio::test]
    async fn the_stream_ends_when_the_session_does() {
        let (_tx, rx) = broadcast::channel::<Arc<Value>>(4);
        let mut s = Box::pin(changes(rx, now_ms() + 50, Duration::from_millis(500)));
        let w = wire(s.next().await.unwrap().unwrap()).await;
        assert!(w.contains("event: expired"), "{w}");
        assert!(s.next().await.is_none());
    }
}
