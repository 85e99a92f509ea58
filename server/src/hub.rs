//! Live agent connections: which agents are connected now, and how to wake a WebSocket session
//! so a queued command is delivered at once instead of at the next heartbeat.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::model::Transport;

/// A wake-up for a WebSocket session. The channel is tiny ([`WAKE_CAPACITY`]) so wake-ups
/// coalesce: a session that is already going to look at its queue needs no second nudge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Look at the queue and send what is due.
    Deliver,
    /// Someone else claims this uid: prove the connection is alive (ping, short deadline).
    Probe,
    /// Periodic idle check: ping if the agent has been silent for long.
    IdleCheck,
}

/// Room for one delivery and one liveness wake-up at a time; more coalesce.
pub const WAKE_CAPACITY: usize = 2;

struct Entry {
    conn_id: u64,
    transport: Transport,
    wake: Option<mpsc::Sender<Wake>>,
}

/// The registry of live connections, keyed by instance uid.
#[derive(Default)]
pub struct Hub {
    inner: Mutex<HashMap<Uuid, Entry>>,
    next_conn: AtomicU64,
}

/// Returned when a uid is already held by another live WebSocket connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duplicate;

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// A process-unique id for a new transport connection.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Binds `uid` to connection `conn_id`. Fails if another live WebSocket connection holds the
    /// uid (the newcomer must then be given a new uid). HTTP agents hold no connection between
    /// requests, so an HTTP binding never blocks anyone and is replaced freely.
    pub fn bind(
        &self,
        uid: Uuid,
        conn_id: u64,
        transport: Transport,
        wake: Option<mpsc::Sender<Wake>>,
    ) -> Result<(), Duplicate> {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get(&uid) {
            let other_live_ws = e.conn_id != conn_id
                && e.transport == Transport::Websocket
                && e.wake.as_ref().is_some_and(|w| !w.is_closed());
            if other_live_ws {
                return Err(Duplicate);
            }
        }
        map.insert(
            uid,
            Entry {
                conn_id,
                transport,
                wake,
            },
        );
        Ok(())
    }

    /// True if `uid` is bound to any connection now (WebSocket, or an HTTP agent that polled
    /// within the last hour and did not say goodbye).
    pub fn is_bound(&self, uid: Uuid) -> bool {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&uid).is_some_and(|e| match &e.wake {
            Some(w) => !w.is_closed(),
            None => true,
        })
    }

    /// True if `uid` is bound to a live WebSocket connection other than `conn_id`.
    pub fn held_by_other(&self, uid: Uuid, conn_id: u64) -> bool {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&uid).is_some_and(|e| {
            e.conn_id != conn_id
                && e.transport == Transport::Websocket
                && e.wake.as_ref().is_some_and(|w| !w.is_closed())
        })
    }

    /// Removes the binding if it still belongs to `conn_id`. Returns true if it did.
    pub fn unbind(&self, uid: Uuid, conn_id: u64) -> bool {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&uid).is_some_and(|e| e.conn_id == conn_id) {
            map.remove(&uid);
            true
        } else {
            false
        }
    }

    /// Wakes the WebSocket session of `uid` to deliver, if any. Returns true if one was there.
    pub fn notify(&self, uid: Uuid) -> bool {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&uid).and_then(|e| e.wake.as_ref()) {
            Some(w) => {
                if let Err(mpsc::error::TrySendError::Full(_)) = w.try_send(Wake::Deliver) {
                    // Full of liveness wake-ups (a busy session being probed): those do not
                    // deliver, so this one must not be dropped. Rare; a task waits for room.
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        let w = w.clone();
                        rt.spawn(async move {
                            let _ = w.send(Wake::Deliver).await;
                        });
                    }
                }
                !w.is_closed()
            }
            None => false,
        }
    }

    /// Asks the WebSocket session holding `uid` to prove it is alive (a newcomer claims the
    /// uid). Returns false if no live WebSocket holds it.
    pub fn probe(&self, uid: Uuid) -> bool {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&uid).and_then(|e| e.wake.as_ref()) {
            Some(w) => {
                let _ = w.try_send(Wake::Probe);
                !w.is_closed()
            }
            None => false,
        }
    }

    /// Asks every WebSocket session to check whether its agent has gone quiet. The senders are
    /// copied out first so the lock is not held while 100k wake-ups are sent.
    pub fn idle_check_all(&self) -> usize {
        let wakes: Vec<mpsc::Sender<Wake>> = {
            let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            map.values().filter_map(|e| e.wake.clone()).collect()
        };
        for w in &wakes {
            // Full: a wake-up is pending, and every wake-up also runs the idle check.
            let _ = w.try_send(Wake::IdleCheck);
        }
        wakes.len()
    }

    /// Removes plain-HTTP bindings for which `gone` is true (agents that stopped polling
    /// without saying goodbye), so the map does not grow with churn.
    pub fn unbind_http(&self, mut gone: impl FnMut(&Uuid, u64) -> bool) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|uid, e| e.transport != Transport::Http || !gone(uid, e.conn_id));
    }

    /// Number of agents bound to a live connection, by transport.
    pub fn counts(&self) -> (usize, usize) {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let ws = map
            .values()
            .filter(|e| e.transport == Transport::Websocket)
            .count();
        (ws, map.len() - ws)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_live_websocket_is_a_duplicate() {
        let hub = Hub::new();
        let uid = Uuid::now_v7();
        let (tx1, _rx1) = mpsc::channel(1);
        let (tx2, _rx2) = mpsc::channel(1);
        hub.bind(uid, 1, Transport::Websocket, Some(tx1)).unwrap();
        assert_eq!(
            hub.bind(uid, 2, Transport::Websocket, Some(tx2)),
            Err(Duplicate)
        );
        assert!(hub.notify(uid));
        assert!(!hub.unbind(uid, 2));
        assert!(hub.unbind(uid, 1));
        assert!(!hub.notify(uid));
    }

    #[test]
    fn probe_reaches_only_a_live_websocket_holder() {
        let hub = Hub::new();
        let uid = Uuid::now_v7();
        assert!(!hub.probe(uid));
        let (tx, mut rx) = mpsc::channel(WAKE_CAPACITY);
        hub.bind(uid, 1, Transport::Websocket, Some(tx)).unwrap();
        assert!(hub.notify(uid));
        assert!(hub.probe(uid));
        assert_eq!(rx.try_recv(), Ok(Wake::Deliver));
        assert_eq!(rx.try_recv(), Ok(Wake::Probe));
        assert_eq!(hub.idle_check_all(), 1);
        assert_eq!(rx.try_recv(), Ok(Wake::IdleCheck));
    }

    #[tokio::test]
    async fn a_delivery_wake_is_not_lost_behind_liveness_wakes() {
        let hub = Hub::new();
        let uid = Uuid::now_v7();
        let (tx, mut rx) = mpsc::channel(WAKE_CAPACITY);
        hub.bind(uid, 1, Transport::Websocket, Some(tx)).unwrap();
        hub.probe(uid);
        hub.probe(uid);
        assert!(hub.notify(uid), "the channel is full of probes");
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(rx.recv().await.unwrap());
        }
        assert_eq!(got, vec![Wake::Probe, Wake::Probe, Wake::Deliver]);
    }

    #[test]
    fn silent_http_agents_are_unbound() {
        let hub = Hub::new();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        hub.bind(a, 1, Transport::Http, None).unwrap();
        hub.bind(b, 2, Transport::Http, None).unwrap();
        hub.unbind_http(|uid, _| *uid == a);
        assert_eq!(hub.counts(), (0, 1));
    }

    #[test]
    fn closed_session_does_not_block_reconnect() {
        let hub = Hub::new();
        let uid = Uuid::now_v7();
        let (tx1, rx1) = mpsc::channel(1);
        hub.bind(uid, 1, Transport::Websocket, Some(tx1)).unwrap();
        drop(rx1);
        let (tx2, _rx2) = mpsc::channel(1);
        assert_eq!(hub.bind(uid, 2, Transport::Websocket, Some(tx2)), Ok(()));
    }
}
