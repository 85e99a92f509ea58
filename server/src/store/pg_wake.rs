//! Cross-replica wake-ups over PostgreSQL `LISTEN/NOTIFY`, so a command queued through one
//! replica reaches an agent connected to another at once rather than at the next sweep.
//!
//! The notification is sent inside the transaction that queues the commands, so PostgreSQL
//! delivers it only if they committed, and only after they are visible. Each payload starts
//! with the sending store's random origin, so a replica skips its own (it woke its sessions
//! directly). Notifications sent while the listening connection is down are lost: after a
//! reconnect the feed says [`Wakeup::Resumed`] and the receiver looks at every queue.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnection, PgListener, PgPool};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{StoreResult, Wakeup};

/// Agent uids per notification: 33 bytes each (32 hex digits and a comma) plus the origin
/// stays under PostgreSQL's 8000-byte payload limit.
const UIDS_PER_PAYLOAD: usize = 200;
/// Wake-ups buffered between the listener and the sessions; the listener waits when full.
const FEED_CAPACITY: usize = 1024;
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The channel of one Flotilla schema, and this store's origin mark.
#[derive(Debug)]
pub(super) struct WakeChannel {
    /// `flotilla_wake_` and a hash of the schema: deployments (and parallel test runs) in
    /// one database do not hear each other.
    pub name: String,
    origin: String,
}

impl WakeChannel {
    pub async fn of(pool: &PgPool) -> StoreResult<WakeChannel> {
        let hash: String =
            sqlx::query_scalar("SELECT substr(md5(COALESCE(current_schema(), '')), 1, 16)")
                .fetch_one(pool)
                .await?;
        Ok(WakeChannel {
            name: format!("flotilla_wake_{hash}"),
            origin: format!("{:016x}", rand::random::<u64>()),
        })
    }

    /// Announces, inside `conn`'s transaction, that `agents` have commands to deliver.
    pub async fn notify(
        &self,
        conn: &mut PgConnection,
        agents: impl IntoIterator<Item = Uuid>,
    ) -> StoreResult<()> {
        let mut agents: Vec<Uuid> = agents.into_iter().collect();
        if agents.is_empty() {
            return Ok(());
        }
        agents.sort_unstable();
        agents.dedup();
        let payloads: Vec<String> = agents
            .chunks(UIDS_PER_PAYLOAD)
            .map(|chunk| {
                let uids: Vec<String> = chunk.iter().map(|u| u.simple().to_string()).collect();
                format!("{} {}", self.origin, uids.join(","))
            })
            .collect();
        sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::text[]) AS p")
            .bind(&self.name)
            .bind(payloads)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// The agents a payload names; `None` for our own notifications and for payloads that
    /// are not ours to read (logged: something else writes to the channel).
    fn parse(&self, payload: &str) -> Option<Vec<Uuid>> {
        let Some((origin, list)) = payload.split_once(' ') else {
            tracing::warn!(channel = %self.name, len = payload.len(),
                "wake feed: ignored a notification without an origin");
            return None;
        };
        if origin == self.origin {
            return None;
        }
        let uids: Result<Vec<Uuid>, _> = list.split(',').map(Uuid::parse_str).collect();
        match uids {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(channel = %self.name, error = %e,
                    "wake feed: ignored a notification with a malformed agent uid");
                None
            }
        }
    }
}

/// Listens on `channel` through a connection of `pool` until the receiver is dropped or the
/// pool closes, reconnecting (with backoff) whenever the connection fails.
pub(super) fn feed(pool: PgPool, channel: Arc<WakeChannel>) -> mpsc::Receiver<Wakeup> {
    let (tx, rx) = mpsc::channel(FEED_CAPACITY);
    tokio::spawn(async move {
        let mut listened_before = false;
        let mut retry = RETRY_FIRST;
        loop {
            if tx.is_closed() || pool.is_closed() {
                return;
            }
            let mut listener = match listen(&pool, &channel.name).await {
                Ok(l) => l,
                Err(e) => {
                    if pool.is_closed() {
                        return;
                    }
                    tracing::warn!(error = %e, retry_ms = retry.as_millis() as u64,
                        "wake feed: cannot listen for other replicas' wake-ups; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = tx.closed() => return,
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                    continue;
                }
            };
            retry = RETRY_FIRST;
            if listened_before {
                tracing::info!(
                    "wake feed: listening again; looking at every queue for missed wake-ups"
                );
                if tx.send(Wakeup::Resumed).await.is_err() {
                    return;
                }
            }
            listened_before = true;
            loop {
                let next = tokio::select! {
                    n = listener.try_recv() => n,
                    _ = tx.closed() => return,
                };
                let wake = match next {
                    Ok(Some(n)) => match channel.parse(n.payload()) {
                        Some(uids) => Wakeup::Agents(uids),
                        None => continue,
                    },
                    // sqlx has already reconnected and listens again.
                    Ok(None) => {
                        tracing::warn!(
                            "wake feed: the listening connection was lost and is back; \
                            looking at every queue for missed wake-ups"
                        );
                        Wakeup::Resumed
                    }
                    Err(sqlx::Error::PoolClosed) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "wake feed: the listening connection failed; reconnecting");
                        break;
                    }
                };
                if tx.send(wake).await.is_err() {
                    return;
                }
            }
        }
    });
    rx
}

async fn listen(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect_with(pool).await?;
    l.listen(channel).await?;
    Ok(l)
}
