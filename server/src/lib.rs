//! Flotilla server library: OpAMP server, fleet registry, command queue, REST API, audit trail.
//!
//! See docs/ARCHITECTURE.md for the code map and the invariants. [`run`] takes already-bound
//! listeners so tests bind port 0 and read the address back.

pub mod audit;
pub mod chat;
pub mod commands;
pub mod config;
pub mod console;
pub mod events;
pub mod hub;
pub mod logflood;
pub mod mcp_backend;
pub mod metrics;
pub mod model;
pub mod net;
pub mod opamp;
pub mod query;
pub mod registry;
pub mod rest;
pub mod service;
pub mod store;
pub mod tls;
pub mod views;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Validated;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::service::{Fleet, FleetSettings};
use crate::store::sqlite::SqliteStore;
use crate::store::Store;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        dir: std::path::PathBuf,
        source: store::StoreError,
    },
    #[error("listener failed: {0}")]
    Io(#[from] std::io::Error),
    /// An offline tool was pointed at a directory without a Flotilla database. Tools that
    /// check a database must never create one: an empty new database would "verify".
    #[error(
        "no Flotilla database at {} (is the data directory right? give --data-dir or --config)",
        .path.display()
    )]
    NoDatabase { path: std::path::PathBuf },
    #[error("cannot read the registry into its index: {0}")]
    Registry(String),
    /// The PostgreSQL store could not be opened; `url` has its password redacted.
    #[error("cannot open the PostgreSQL store at {url}: {source}")]
    Postgres {
        url: String,
        source: store::StoreError,
    },
    /// An offline tool was pointed at a PostgreSQL database without Flotilla's tables.
    #[error("no Flotilla schema in the PostgreSQL database at {url} (is store.url right?)")]
    NoSchema { url: String },
}

/// Opens the configured store and prepares it for serving (nothing is connected at start).
pub async fn open_store(cfg: &config::Config) -> Result<Arc<dyn Store>, ServerError> {
    let store = match cfg.store.postgres_url() {
        Some(url) => open_postgres(cfg, url, false).await?,
        None => open_sqlite(cfg).await?,
    };
    let now = model::now_ms();
    let stale = 3 * (cfg.store.replica_heartbeat_s.max(1) as model::Millis) * 1000;
    let replica = cfg.store.replica();
    let released = store
        .start_replica(&replica, now, now - stale)
        .await
        .map_err(|source| ServerError::Store {
            dir: cfg.data_dir.clone(),
            source,
        })?;
    tracing::info!(%replica, marked_disconnected = released, "store: started as replica");
    Ok(store)
}

/// Binds a listener with a deep accept backlog: a fleet reconnecting at once after a restart
/// overflows the default of 128 and each overflow costs an agent a retry.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Opens an existing store without touching connection state, for offline tools (`audit
/// verify`) that may run beside a live server. A missing database is
/// [`ServerError::NoDatabase`]: nothing is created. (SQLite is opened read-write; nothing is
/// written.)
pub async fn open_store_for_tools(cfg: &config::Config) -> Result<Arc<dyn Store>, ServerError> {
    if let Some(url) = cfg.store.postgres_url() {
        return open_postgres(cfg, url, true).await;
    }
    let path = cfg.data_dir.join(store::sqlite::DB_FILE);
    if !path.is_file() {
        return Err(ServerError::NoDatabase { path });
    }
    open_sqlite(cfg).await
}

/// Opens the PostgreSQL store at `url`; `existing`: only if it has Flotilla's schema (tools).
async fn open_postgres(
    cfg: &config::Config,
    url: &str,
    existing: bool,
) -> Result<Arc<dyn Store>, ServerError> {
    let redacted = store::postgres::redact_url(url);
    let failed = |source| ServerError::Postgres {
        url: redacted.clone(),
        source,
    };
    let password = cfg
        .store
        .password()
        .map_err(|e| failed(store::StoreError::Io(e)))?;
    tracing::info!(url = %redacted, "store: PostgreSQL");
    let store = if existing {
        store::postgres::PgStore::open_existing(url, password.as_deref())
            .await
            .map_err(failed)?
            .ok_or_else(|| ServerError::NoSchema {
                url: redacted.clone(),
            })?
    } else {
        store::postgres::PgStore::open(url, password.as_deref())
            .await
            .map_err(failed)?
    };
    Ok(Arc::new(store))
}

async fn open_sqlite(cfg: &config::Config) -> Result<Arc<dyn Store>, ServerError> {
    let store = SqliteStore::open(&cfg.data_dir)
        .await
        .map_err(|source| ServerError::Store {
            dir: cfg.data_dir.clone(),
            source,
        })?;
    Ok(Arc::new(store))
}

/// Serves agents on `opamp` and operators on `api` until `shutdown` resolves, then stops
/// accepting, closes agent WebSockets with a Close frame, and flushes the store.
pub async fn run(
    v: Validated,
    store: Arc<dyn Store>,
    opamp: TcpListener,
    api: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    // With a chat gateway enabled, `chat.listen` is bound too ([`run_with_chat`] takes a bound
    // listener instead, as tests bind port 0).
    let chat = match v.chat_addr {
        Some(a) => Some(bind(a)?),
        None => None,
    };
    run_observed_with_chat(v, store, opamp, api, chat, shutdown, |_| {}).await
}

/// [`run`] with the chat listener already bound (tests bind port 0); it is served only when a
/// chat gateway is enabled, and carries only the chat routes.
pub async fn run_with_chat(
    v: Validated,
    store: Arc<dyn Store>,
    opamp: TcpListener,
    api: TcpListener,
    chat: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_observed_with_chat(v, store, opamp, api, chat, shutdown, |_| {}).await
}

/// `flotilla chat`: the chat gateways configured in `v` alone, without a fleet of their own.
/// Every chat user's tool calls go to a remote Flotilla's REST API (`rest`, with the gateway
/// token named `token_name` on the server), acting for the user; conversation state is in
/// memory and no alerts run.
/// Serves the chat routes on `listener` (when a gateway has any) until `shutdown` resolves,
/// then finishes the turns in flight and posts the shutdown notice.
pub async fn run_chat_gateway(
    v: Validated,
    rest: flotilla_mcp::RestBackend,
    token_name: String,
    listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let cfg = &v.config;
    let chat = chat::gateways(
        chat::Sources::standalone(rest, token_name),
        v.slack.as_ref().map(|s| (&cfg.chat.slack, s)),
        v.teams.as_ref().map(|s| (&cfg.chat.teams, s)),
        v.discord.as_ref().map(|s| (&cfg.chat.discord, s)),
        v.llm.as_ref(),
    )
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))?
    .ok_or_else(|| {
        std::io::Error::other(
            "no chat gateway is enabled ([chat.slack], [chat.teams] or [chat.discord])",
        )
    })?;
    let token = CancellationToken::new();
    {
        let token = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            token.cancel();
        });
    }
    let housekeeping = tokio::spawn(chat.housekeeping.run(token.clone()));
    let served = match (chat.routes, listener) {
        (Some(app), Some(l)) => {
            tracing::info!(chat = %l.local_addr()?, "chat gateways listening");
            let (_, limits) = listener_limits(cfg);
            net::serve(l, app, limits, None, token.clone()).await
        }
        (Some(_), None) => Err(std::io::Error::other(
            "the chat gateways need chat.listen: the platforms post to it",
        )),
        (None, _) => {
            token.cancelled().await;
            Ok(())
        }
    };
    token.cancel();
    if let Err(e) = housekeeping.await {
        tracing::warn!(error = %e, "chat housekeeping ended abnormally");
    }
    served?;
    Ok(())
}

/// [`run`], handing the fleet service to `started` before anything is served: in-process
/// consumers (tests, a gateway) subscribe to its event bus there and miss no event.
pub async fn run_observed(
    v: Validated,
    store: Arc<dyn Store>,
    opamp: TcpListener,
    api: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    started: impl FnOnce(&Fleet),
) -> Result<(), ServerError> {
    let chat = match v.chat_addr {
        Some(a) => Some(bind(a)?),
        None => None,
    };
    run_observed_with_chat(v, store, opamp, api, chat, shutdown, started).await
}

/// [`run_observed`] with the chat listener already bound (tests bind port 0).
pub async fn run_observed_with_chat(
    v: Validated,
    store: Arc<dyn Store>,
    opamp: TcpListener,
    api: TcpListener,
    chat_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    started: impl FnOnce(&Fleet),
) -> Result<(), ServerError> {
    let v_slack = v.slack.clone();
    let v_teams = v.teams.clone();
    let v_discord = v.discord.clone();
    let v_llm = v.llm.clone();
    let tls = v.tls.clone();
    let cfg = v.config;
    let hub = Arc::new(Hub::new());
    let metrics = Arc::new(Metrics::new());
    let fleet = Fleet::new(
        store.clone(),
        hub,
        metrics,
        FleetSettings {
            queue_ttl_s: cfg.commands.queue_ttl_s,
            result_timeout_s: cfg.commands.result_timeout_s,
            max_fanout: cfg.commands.max_fanout,
            heartbeat_interval_s: cfg.opamp.heartbeat_interval_s,
            admin_shutdown_above: cfg.commands.admin_shutdown_above,
            replica_id: cfg.store.replica(),
            replica_heartbeat_s: cfg.store.replica_heartbeat_s,
        },
    );
    // Search, the summary and /metrics answer from the in-memory index: fill it before
    // anything is served.
    fleet
        .load_registry()
        .await
        .map_err(|e| ServerError::Registry(e.to_string()))?;
    started(&fleet);
    let token = CancellationToken::new();
    {
        let token = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            token.cancel();
        });
    }

    let drain = CancellationToken::new();
    let sessions = tokio_util::task::TaskTracker::new();
    let opamp_ctx = Arc::new(opamp::OpampContext {
        fleet: fleet.clone(),
        cfg: cfg.opamp.clone(),
        shutdown: token.clone(),
        drain: drain.clone(),
        sessions: sessions.clone(),
    });
    let rest_ctx = Arc::new(rest::RestContext {
        fleet: fleet.clone(),
        cfg: cfg.api.clone(),
        data_dir: cfg.data_dir.clone(),
    });
    let (opamp_app, flusher) = opamp::router(opamp_ctx);
    let console_app = console::router(&console::ConsoleContext {
        fleet: fleet.clone(),
        api: cfg.api.clone(),
        console: cfg.console.clone(),
        data_dir: cfg.data_dir.clone(),
        tls: tls.api.is_some(),
    });
    let rest_app = rest::router(rest_ctx)
        .merge(mcp_backend::routes(fleet.clone(), &cfg, token.clone()))
        .merge(console_app)
        .layer(axum::middleware::from_fn_with_state(
            fleet.metrics().clone(),
            count_request,
        ));

    log_audit_head(store.as_ref(), "at start").await;
    let sweeper = tokio::spawn(sweep_loop(fleet.clone(), token.clone()));
    let beat = tokio::spawn(replica_loop(fleet.clone(), token.clone()));
    // Replicas sharing a PostgreSQL store wake each other's sessions through it.
    let waker = fleet
        .store()
        .clone()
        .wake_feed()
        .map(|feed| tokio::spawn(fleet.clone().follow_wakes(feed)));
    let bus = tokio::spawn(events::run(fleet.clone(), events::TICK, token.clone()));
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    tracing::info!(
        opamp = %opamp.local_addr()?, path = %cfg.opamp.path,
        api = %api.local_addr()?, data_dir = %cfg.data_dir.display(),
        "flotilla serving"
    );
    if cfg.console.enabled {
        let scheme = if tls.api.is_some() { "https" } else { "http" };
        tracing::info!("web console at {scheme}://{}/", api.local_addr()?);
    }
    let reload_every = Duration::from_secs(cfg.tls.reload_interval_s);
    for (name, t) in [
        ("agent", &tls.opamp),
        ("operator", &tls.api),
        ("chat", &tls.chat),
    ] {
        if let Some(t) = t {
            tracing::info!(listener = name, "serving TLS (1.2/1.3)");
            tokio::spawn(t.clone().watch(name, reload_every, token.clone()));
        }
    }
    let (agent_limits, operator_limits) = listener_limits(&cfg);
    let opamp_srv = net::serve(
        opamp,
        opamp_app,
        agent_limits,
        tls.opamp.as_ref().map(|t| t.acceptor()),
        token.clone(),
    );
    let api_srv = net::serve(
        api,
        rest_app,
        operator_limits.clone(),
        tls.api.as_ref().map(|t| t.acceptor()),
        token.clone(),
    );
    let chat_tls = tls.chat.as_ref().map(|t| t.acceptor());
    let chat = chat::gateways(
        chat::Sources::fleet(&fleet),
        v_slack.as_ref().map(|s| (&cfg.chat.slack, s)),
        v_teams.as_ref().map(|s| (&cfg.chat.teams, s)),
        v_discord.as_ref().map(|s| (&cfg.chat.discord, s)),
        v_llm.as_ref(),
    )
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    let chat_srv = match chat {
        Some(chat) => {
            let housekeeping = tokio::spawn(chat.housekeeping.run(token.clone()));
            let listener = match (chat.routes, chat_listener) {
                (Some(app), Some(listener)) => {
                    tracing::info!(chat = %listener.local_addr()?, "chat gateways listening");
                    Some((app, listener))
                }
                (Some(_), None) => {
                    tracing::warn!(
                        "chat gateways without a chat listener: the platforms cannot reach them"
                    );
                    None
                }
                (None, _) => None,
            };
            let t = token.clone();
            Some(tokio::spawn(async move {
                let r = match listener {
                    Some((app, l)) => net::serve(l, app, operator_limits, chat_tls, t).await,
                    None => Ok(()),
                };
                if let Err(e) = housekeeping.await {
                    tracing::warn!(error = %e, "chat housekeeping ended abnormally");
                }
                r
            }))
        }
        None => None,
    };
    let (a, b) = tokio::join!(opamp_srv, api_srv);
    if let Some(c) = chat_srv {
        match c.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "chat listener failed"),
            Err(e) => tracing::warn!(error = %e, "chat listener ended abnormally"),
            Ok(Ok(())) => {}
        }
    }
    sweeper.abort();
    beat.abort();
    bus.abort();
    if let Some(w) = waker {
        w.abort();
    }
    // Sessions saw the same cancellation and are sending Close frames; give them a bounded
    // time so a stuck peer cannot hold the shutdown.
    sessions.close();
    if tokio::time::timeout(Duration::from_secs(10), sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = sessions.len(),
            "some agent WebSockets did not close within 10 s"
        );
    }
    drain.cancel();
    if let Err(e) = flusher.await {
        tracing::warn!(error = %e, "heartbeat flusher ended abnormally");
    }
    log_audit_head(store.as_ref(), "at stop").await;
    store.close().await;
    tracing::info!("flotilla stopped; store flushed");
    a?;
    b?;
    Ok(())
}

/// Each listener's limits. Raises the open-file limit first and, if it still cannot hold both
/// listeners' caps, lowers the agent listener's: the operator listener must stay reachable
/// whatever the agent port receives.
fn listener_limits(cfg: &config::Config) -> (net::Limits, net::Limits) {
    let wanted = cfg
        .opamp
        .max_connections
        .saturating_add(cfg.opamp.max_in_flight);
    let agent_cap = match net::raise_fd_limit() {
        Ok(fd) => {
            let (cap, warning) = net::agent_budget(fd.soft, wanted, cfg.api.max_connections);
            if let Some(w) = warning {
                tracing::warn!(soft = fd.soft, hard = fd.hard, "{w}");
            }
            cap
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit; connection caps unchanged");
            wanted
        }
    };
    (
        net::Limits {
            name: "agent",
            max_connections: agent_cap,
            header_read_timeout: Duration::from_secs(cfg.opamp.header_read_timeout_s),
            body_read_timeout: Duration::from_secs(cfg.opamp.body_read_timeout_s),
        },
        net::Limits {
            name: "operator",
            max_connections: cfg.api.max_connections,
            header_read_timeout: Duration::from_secs(cfg.api.header_read_timeout_s),
            body_read_timeout: Duration::from_secs(cfg.api.body_read_timeout_s),
        },
    )
}

/// Logs the newest audit record's id and hash. Shipped with the logs, these lines are anchors
/// outside the database: `flotilla audit verify --anchor ID:HASH` proves later that nothing up
/// to that record was deleted or rewritten (deleting the newest records leaves a chain that
/// still links, so the chain alone cannot show it).
async fn log_audit_head(store: &dyn Store, when: &str) {
    let newest = store
        .query_audit(&model::AuditFilter {
            limit: 1,
            ..Default::default()
        })
        .await;
    match newest {
        Ok(recs) => match recs.first() {
            Some(r) => {
                let anchor = audit::ChainHead {
                    id: r.id,
                    hash: r.hash.clone(),
                };
                tracing::info!(%anchor, "audit head {when}")
            }
            None => tracing::info!("audit trail empty {when}"),
        },
        Err(e) => tracing::warn!(error = %e, "could not read the audit head {when}"),
    }
}

/// Counts every operator request (REST, MCP, ops) by its route pattern and status, and times
/// it to the start of the answer (an SSE stream counts until its first byte, not its end).
async fn count_request(
    axum::extract::State(metrics): axum::extract::State<Arc<Metrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().clone();
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    metrics.request(
        &route,
        method.as_str(),
        resp.status().as_u16(),
        start.elapsed(),
    );
    resp
}

/// Expires overdue commands and re-wakes agents with undelivered ones, every second.
async fn sweep_loop(fleet: Fleet, token: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {
                let now = model::now_ms();
                if let Err(e) = fleet.sweep(now).await {
                    tracing::warn!(error = %e, "command expiry sweep failed; will retry");
                }
                match fleet.redeliver(now).await {
                    Ok((requeued, woken)) if requeued > 0 || woken > 0 => tracing::debug!(
                        requeued, woken, "delivery sweep: unwritten commands requeued, agents woken"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "delivery sweep failed; will retry"),
                }
            }
        }
    }
}

/// Writes this replica's heartbeat every `store.replica_heartbeat_s`, releasing the agents of
/// replicas that died.
async fn replica_loop(fleet: Fleet, token: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(
        fleet.settings().replica_heartbeat_s.max(1),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => match fleet.replica_heartbeat(model::now_ms()).await {
                Ok(0) => {}
                Ok(released) => tracing::info!(released,
                    "agents of a replica that stopped answering marked disconnected"),
                Err(e) => tracing::warn!(error = %e,
                    "replica heartbeat failed; the others may think this replica dead"),
            },
        }
    }
}
