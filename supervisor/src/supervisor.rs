//! The core: one task that owns the decisions. It starts the agent runner, the health poller,
//! the OpAMP transport and the optional /healthz listener, then reacts to the server's
//! messages (commands, remote config, new uid, ReportFullState, heartbeat interval), to the
//! agent's events and probes, to finished jobs (ChatOps, config applies, restarts) and to
//! SIGTERM/SIGINT. Every command runs at most once: ids are persisted before execution.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_proto::caps::report_full_state;
use flotilla_proto::{
    kv_str, AgentCapabilities, AgentDescription, AgentRemoteConfig, ComponentHealth,
    RemoteConfigStatus, RemoteConfigStatuses, ServerToAgent,
};
use tokio::sync::{mpsc, oneshot, Notify};
use uuid::Uuid;

use crate::agent::{self, AgentEvent, AgentHandle};
use crate::auth::TokenSource;
use crate::commands::{self, Incoming, Outcome, Request};
use crate::config::{Config, CAP_FLOTILLA};
use crate::fluent::{Fluent, Probe};
use crate::remote::{self, Applied, Applier};
use crate::reporter::Reporter;
use crate::state::{now_ns, State, StoredFile};
use crate::transport::{self, Link, Settings};
use crate::view::{AgentView, SharedView};

/// A startup problem (the process exits with it).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory: {0}")]
    State(#[from] crate::state::StateError),
    #[error("remote config recovery: {0}")]
    Remote(#[from] remote::ApplyError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("healthz listener {addr}: {source}")]
    Healthz {
        addr: String,
        source: std::io::Error,
    },
    #[cfg(feature = "tls")]
    #[error("{0}")]
    Tls(crate::tls::TlsError),
}

/// A started agent counts as up (its start time is reported, so a restart is confirmed, and
/// it may be called healthy) only once its API has answered and it has stayed up this long:
/// an agent that dies on its config usually does so within the first second.
const CONFIRM_UPTIME: Duration = Duration::from_millis(1500);
/// After a (re)start the API is probed this soon, then at doubling intervals up to
/// [`FAST_PROBE_MAX`] (or the configured interval, if shorter), until it has answered with
/// metrics and the process is confirmed up; then at the configured interval. Fluent Bit
/// answers its metrics 404 for about the first second of a pipeline.
const FAST_PROBE_FIRST: Duration = Duration::from_millis(250);
const FAST_PROBE_MAX: Duration = Duration::from_secs(2);

/// At most this many re-reports of one already processed config hash per window: far more
/// than operators re-send the same config, far fewer than a server stuck re-offering it.
const REREPORT_BURST: u32 = 5;
const REREPORT_WINDOW: Duration = Duration::from_secs(10);

/// The remote configs in hand. Applies are serialized: one applies, the newest offer waits.
#[derive(Debug, Default)]
struct Offers {
    /// Hash of the last remote config taken in hand (applying, applied or failed).
    last_hash: Option<String>,
    applying: Option<String>,
    /// The newest offer that came while an apply or a restart was under way.
    next: Option<(String, BTreeMap<String, StoredFile>)>,
    /// Re-reports of an already processed hash: (hash, window start, count in the window).
    rereports: Option<(String, Instant, u32)>,
}

/// What to do about an offer of a config already taken in hand.
#[derive(Debug, PartialEq, Eq)]
enum Again {
    /// Say again where it stands.
    Report,
    /// The loop guard just tripped: say so once.
    Guard,
    /// The guard holds: nothing.
    Quiet,
}

impl Offers {
    /// `Some` if `hash` was taken in hand already (applying, applied or failed). A waiting
    /// offer is dropped then: the server now wants this config, not the one it offered in
    /// between, and applying that one afterwards would leave the agent on a config the server
    /// no longer asks for.
    fn again(&mut self, hash: &str, now: Instant) -> Option<Again> {
        if self.last_hash.as_deref() != Some(hash) {
            return None;
        }
        if self.next.take().is_some() {
            tracing::info!(
                hash,
                "the server offers the config in hand again; the one offered in between is dropped"
            );
        }
        // A server that attaches the config to every reply would make re-reports a message
        // loop (each draws the offer again); a burst limit per hash breaks it without losing
        // real repeats.
        let burst = match &mut self.rereports {
            Some((h, since, n)) if h == hash && now.duration_since(*since) < REREPORT_WINDOW => {
                *n += 1;
                *n
            }
            other => {
                *other = Some((hash.to_string(), now, 1));
                1
            }
        };
        Some(if burst <= REREPORT_BURST {
            Again::Report
        } else if burst == REREPORT_BURST + 1 {
            Again::Guard
        } else {
            Again::Quiet
        })
    }

    /// Keeps a new offer until the apply or restart under way ends (only the newest matters).
    fn wait(&mut self, hash: String, files: BTreeMap<String, StoredFile>) {
        self.next = Some((hash, files));
    }

    fn started(&mut self, hash: &str) {
        self.last_hash = Some(hash.to_string());
        self.applying = Some(hash.to_string());
    }

    /// The waiting offer, if there is one and it is not the config in hand.
    fn take_next(&mut self) -> Option<(String, BTreeMap<String, StoredFile>)> {
        let (h, files) = self.next.take()?;
        (Some(&h) != self.last_hash.as_ref()).then_some((h, files))
    }
}

/// Work that finished off the core task.
enum Job {
    Command(Incoming, Outcome),
    Applied(String, Applied),
    Restarted,
}

struct Core {
    cfg: Arc<Config>,
    state: State,
    link: Link,
    view: SharedView,
    agent: AgentHandle,
    applier: Arc<Applier>,
    http: reqwest::Client,
    jobs: mpsc::Sender<Job>,
    transport_stop: mpsc::Sender<oneshot::Sender<()>>,
    probe_now: Arc<Notify>,
    offers: Offers,
    restarting: bool,
    /// A restart command came while a config apply was under way: run it when the apply ends.
    restart_after_apply: bool,
    /// Command ids running now (a duplicate delivery is neither run nor answered twice).
    in_flight: HashSet<String>,
    health_status: (String, u64),
    version: Option<String>,
    crash_window: Duration,
    started_at: Option<Instant>,
    /// The current process has answered and stayed up [`CONFIRM_UPTIME`].
    confirmed: bool,
    /// Log-tail cursor at the current process's start: its own error lines come after it.
    start_cursor: u64,
}

/// Runs the supervisor until SIGTERM/SIGINT or a shutdown command. Returns the exit code.
pub async fn run(cfg: Config) -> Result<i32, StartError> {
    let cfg = Arc::new(cfg);
    // One TLS configuration for OpAMP over wss and https and the OAuth2 token endpoint; built
    // before the agent starts, so a file gone since validation stops nothing half-started.
    #[cfg(feature = "tls")]
    let tls = crate::tls::client_config(&cfg.server.tls).map_err(StartError::Tls)?;
    let state = State::open(&cfg.data_dir)?;
    let uid = state.instance_uid()?;
    if let Some(msg) = remote::recover(&state)? {
        tracing::warn!("{msg}");
    }
    remote::reinstate(&cfg, &state)?;
    if let Some((pid, ticks)) = state.agent_pid() {
        let timeout = cfg.stop_timeout();
        tokio::task::spawn_blocking(move || agent::reap_leftover(pid, ticks, timeout))
            .await
            .ok();
        state.set_agent_pid(None);
    }
    let version = Fluent::detect_version(&cfg).await;
    tracing::info!(
        instance_uid = %uid,
        agent = cfg.kind().name(),
        version = version.as_deref().unwrap_or("unknown"),
        "flotilla-supervisor {} starting",
        env!("CARGO_PKG_VERSION")
    );

    let mut reporter = Reporter::new(
        uid,
        cfg.capability_bits(),
        cfg.capabilities.custom.clone(),
        cfg.server.full_state,
    );
    reporter.set_description(describe(&cfg, uid, version.as_deref()));
    if cfg.declares(AgentCapabilities::ReportsEffectiveConfig) {
        reporter.set_effective(remote::effective_config(
            &cfg,
            state.remote_config()?.as_ref(),
        ));
    }
    let last = state.remote_status()?;
    if cfg.declares(AgentCapabilities::ReportsRemoteConfig) {
        if let Some(l) = &last {
            reporter.set_remote_status(remote_status(&l.hash, &l.status, &l.error_message));
        }
    }
    let link = Link::new(reporter, cfg.server.heartbeat_interval_s);
    let view: SharedView = Arc::new(Mutex::new(AgentView {
        version: version.clone(),
        ..Default::default()
    }));

    // Signals first: a SIGTERM during start-up must still stop the agent cleanly.
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(StartError::Signal)?;

    // The agent.
    let (ev_tx, mut ev_rx) = mpsc::channel(64);
    let pid_state = state.clone();
    let spec = agent::Spec {
        kind: cfg.kind(),
        executable: cfg.agent.executable.clone(),
        args: Fluent::argv(&cfg),
        env: cfg.agent.env.clone().into_iter().collect(),
        stop_timeout: cfg.stop_timeout(),
        backoff_initial: Duration::from_millis(cfg.agent.restart_backoff_initial_ms),
        backoff_max: Duration::from_secs(cfg.agent.restart_backoff_max_s),
        crash_loop_threshold: cfg.agent.crash_loop_threshold,
        crash_loop_window: Duration::from_secs(cfg.agent.crash_loop_window_s),
    };
    tracing::info!(executable = %cfg.agent.executable.display(), args = ?spec.args, "agent command line");
    let agent = agent::spawn(spec, ev_tx, Arc::new(move |p| pid_state.set_agent_pid(p)));

    // Health poller.
    let (probe_tx, mut probe_rx) = mpsc::channel::<Probe>(4);
    let probe_now = Arc::new(Notify::new());
    tokio::spawn(poll_health(
        Fluent::new(&cfg),
        Duration::from_secs(cfg.agent.health_interval_s),
        probe_now.clone(),
        probe_tx,
    ));

    // Transport.
    let server_http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(cfg.server.connect_timeout_s));
    #[cfg(feature = "tls")]
    let server_http = server_http.use_preconfigured_tls((*tls).clone());
    let server_http = server_http.build().expect("HTTP client");
    let tokens = Arc::new(TokenSource::from_config(
        &cfg.server.auth,
        server_http.clone(),
    ));
    let (in_tx, mut in_rx) = mpsc::channel::<ServerToAgent>(16);
    let (stop_tx, stop_rx) = mpsc::channel(1);
    let settings = Settings {
        url: cfg.server.url.clone(),
        connect_timeout: Duration::from_secs(cfg.server.connect_timeout_s),
        backoff_initial: Duration::from_millis(cfg.server.backoff_initial_ms),
        backoff_max: Duration::from_secs(cfg.server.backoff_max_s),
        local_heartbeat_s: cfg.server.heartbeat_interval_s,
        offer_policy: cfg.server.accept_offered_endpoint,
        #[cfg(feature = "tls")]
        tls,
    };
    let transport_task = tokio::spawn(transport::run(
        settings,
        link.clone(),
        tokens,
        in_tx,
        stop_rx,
        server_http,
    ));

    if let Some(addr) = &cfg.healthz.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Healthz {
                addr: addr.clone(),
                source,
            })?;
        tokio::spawn(crate::healthz::serve(
            l,
            view.clone(),
            link.connected.clone(),
        ));
        tracing::info!(%addr, "local /healthz listening");
    }

    let (jobs_tx, mut jobs_rx) = mpsc::channel(16);
    let local_http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client");
    let mut core = Core {
        applier: Arc::new(Applier::new(
            cfg.clone(),
            state.clone(),
            agent.clone(),
            view.clone(),
        )),
        cfg: cfg.clone(),
        state,
        link,
        view,
        agent,
        http: local_http,
        jobs: jobs_tx,
        transport_stop: stop_tx,
        probe_now,
        offers: Offers {
            last_hash: last.map(|l| l.hash),
            ..Default::default()
        },
        restarting: false,
        restart_after_apply: false,
        in_flight: HashSet::new(),
        health_status: ("starting".into(), now_ns()),
        version,
        crash_window: Duration::from_secs(cfg.agent.crash_loop_window_s),
        started_at: None,
        confirmed: false,
        start_cursor: 0,
    };
    core.update_health();

    let code = loop {
        tokio::select! {
            Some(msg) = in_rx.recv() => {
                if let Some(code) = core.on_server(msg).await {
                    break code;
                }
            }
            Some(ev) = ev_rx.recv() => core.on_agent(ev),
            Some(p) = probe_rx.recv() => core.on_probe(p),
            Some(job) = jobs_rx.recv() => core.on_job(job),
            _ = sigterm.recv() => break core.on_signal("SIGTERM").await,
            _ = sigint.recv() => break core.on_signal("SIGINT").await,
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), transport_task).await;
    Ok(code)
}

/// Probes the agent's API at `interval`; after each (re)start (`started` is notified) quickly
/// and backing off instead, until the API has answered with metrics and the process is
/// confirmed up: a fresh agent's per-plugin health and readiness then show within a couple
/// of seconds, not a whole interval later.
async fn poll_health(
    mut fluent: Fluent,
    interval: Duration,
    started: Arc<Notify>,
    probes: mpsc::Sender<Probe>,
) {
    // While fast: (when the process started, the next delay).
    let mut fast: Option<(Instant, Duration)> = None;
    loop {
        let delay = fast.map(|(_, d)| d).unwrap_or(interval);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = started.notified() => {
                fast = Some((Instant::now(), FAST_PROBE_FIRST));
                tokio::time::sleep(FAST_PROBE_FIRST).await;
            }
        }
        let p = fluent.probe().await;
        if let Some((since, d)) = &mut fast {
            if p.reachable && p.metrics && since.elapsed() >= CONFIRM_UPTIME {
                fast = None;
            } else {
                *d = (*d * 2).min(FAST_PROBE_MAX).min(interval);
            }
        }
        if probes.send(p).await.is_err() {
            return;
        }
    }
}

/// The AgentDescription: identity first (stable across restarts), then where it runs.
pub fn describe(cfg: &Config, uid: Uuid, version: Option<&str>) -> AgentDescription {
    let kind = cfg.kind();
    let mut ident = vec![
        kv_str(
            "service.name",
            cfg.description
                .service_name
                .as_deref()
                .unwrap_or(kind.name()),
        ),
        kv_str("service.namespace", &cfg.description.service_namespace),
        kv_str("service.instance.id", &uid.to_string()),
        kv_str("service.version", version.unwrap_or("unknown")),
        kv_str("service.type", kind.display()),
    ];
    for (k, v) in &cfg.description.identifying {
        ident.retain(|kv| &kv.key != k);
        ident.push(kv_str(k, v));
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let mut non = vec![
        kv_str("host.name", &hostname()),
        kv_str("os.type", std::env::consts::OS),
        kv_str("host.arch", arch),
        kv_str("agent.type", &kind.name().replace('-', "")),
        kv_str("flotilla.supervisor.version", env!("CARGO_PKG_VERSION")),
    ];
    if let Some(d) = os_description() {
        non.push(kv_str("os.description", &d));
    }
    for (k, v) in &cfg.description.non_identifying {
        non.retain(|kv| &kv.key != k);
        non.push(kv_str(k, v));
    }
    AgentDescription {
        identifying_attributes: ident,
        non_identifying_attributes: non,
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn os_description() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
}

fn remote_status(hash_hex: &str, status: &str, error: &str) -> RemoteConfigStatus {
    RemoteConfigStatus {
        last_remote_config_hash: hex::decode(hash_hex).unwrap_or_default(),
        status: match status {
            "applied" => RemoteConfigStatuses::Applied,
            "applying" => RemoteConfigStatuses::Applying,
            "failed" => RemoteConfigStatuses::Failed,
            _ => RemoteConfigStatuses::Unset,
        } as i32,
        error_message: error.to_string(),
    }
}

impl Core {
    fn reporter(&self) -> std::sync::MutexGuard<'_, Reporter> {
        self.link.reporter.lock().expect("reporter")
    }

    /// Recomputes the top-level health from the view and hands it to the reporter.
    fn update_health(&mut self) {
        let v = self.view.lock().expect("view").clone();
        let (healthy, status, last_error) = if v.stopping {
            (
                false,
                "stopping",
                "the supervisor is stopping the agent".to_string(),
            )
        } else if let (false, Some(e)) = (v.running, &v.rollback_stuck) {
            // Down and held down on purpose: saying "restarting" would be a lie.
            (false, "rollback-stuck", e.clone())
        } else if !v.running {
            match (&v.crash_loop, &v.exit_error) {
                (Some(c), _) => (false, "crash-loop", c.clone()),
                (None, Some(e)) => (false, "restarting", e.clone()),
                (None, None) => (
                    false,
                    "starting",
                    "the agent is not running yet".to_string(),
                ),
            }
        } else if let Some(c) = &v.crash_loop {
            (false, "crash-loop", c.clone())
        } else if let Some(e) = &v.rollback_stuck {
            (false, "rollback-stuck", e.clone())
        } else {
            match &v.probe {
                None => (false, "starting", "waiting for the agent's API".to_string()),
                Some(p) if !p.reachable => {
                    // The API alone says only "connection refused"; the agent's own words
                    // say why (a Fluentd worker crash-looping on a taken port, say).
                    let errors = self
                        .agent
                        .tail
                        .lock()
                        .expect("tail")
                        .errors_since(self.start_cursor, 3);
                    let mut e = p.last_error.clone();
                    if !errors.is_empty() {
                        e.push_str("; agent log: ");
                        e.push_str(&errors.join(" | "));
                    }
                    (false, "unreachable", e)
                }
                Some(p) if !p.healthy => (false, "unhealthy", p.last_error.clone()),
                Some(_) if !self.confirmed => (
                    false,
                    "starting",
                    format!(
                        "the agent answered; confirming it stays up ({} ms)",
                        CONFIRM_UPTIME.as_millis()
                    ),
                ),
                Some(_) => (true, "running", String::new()),
            }
        };
        if self.health_status.0 != status {
            self.health_status = (status.to_string(), now_ns());
        }
        let h = ComponentHealth {
            healthy,
            // Only a process that answered and stayed up has started, as far as anyone
            // watching is concerned: a restart is confirmed by this time moving forward, and
            // one that died half a second in must not be.
            start_time_unix_nano: if v.running && self.confirmed {
                v.start_time_ns
            } else {
                0
            },
            last_error,
            status: status.to_string(),
            status_time_unix_nano: self.health_status.1,
            component_health_map: v
                .probe
                .as_ref()
                .map(|p| p.components.clone().into_iter().collect())
                .unwrap_or_default(),
            ..Default::default()
        };
        if self.cfg.declares(AgentCapabilities::ReportsHealth) {
            self.reporter().set_health(h);
        }
        self.link.poke();
    }

    fn on_agent(&mut self, ev: AgentEvent) {
        {
            let mut v = self.view.lock().expect("view");
            match &ev {
                AgentEvent::Started {
                    pid,
                    start_time_ns,
                    after_restart,
                    log_cursor,
                } => {
                    v.running = true;
                    v.pid = *pid;
                    v.start_time_ns = *start_time_ns;
                    v.probe = None;
                    self.started_at = Some(Instant::now());
                    self.confirmed = false;
                    self.start_cursor = *log_cursor;
                    self.restarting = false;
                    if *after_restart {
                        // The runner forgot the exits: so does health.
                        v.crash_loop = None;
                        v.exit_error = None;
                    }
                }
                AgentEvent::Exited {
                    expected,
                    crash_loop,
                    error,
                    ..
                } => {
                    v.running = false;
                    v.pid = 0;
                    v.start_time_ns = 0;
                    v.probe = None;
                    if !expected {
                        v.unexpected_exits += 1;
                        v.exit_error = error.clone();
                        if crash_loop.is_some() {
                            v.crash_loop = crash_loop.clone();
                        }
                    }
                }
            }
        }
        if matches!(ev, AgentEvent::Started { .. }) {
            self.probe_now.notify_one();
        }
        self.update_health();
    }

    fn on_probe(&mut self, p: Probe) {
        let version_changed = {
            let mut v = self.view.lock().expect("view");
            if !v.running {
                return;
            }
            if p.reachable
                && self
                    .started_at
                    .is_some_and(|t| t.elapsed() >= CONFIRM_UPTIME)
            {
                self.confirmed = true;
            }
            if p.reachable && p.healthy {
                v.exit_error = None;
                // A crash loop ends only after the agent stayed up a whole window.
                if self
                    .started_at
                    .map(|t| t.elapsed() >= self.crash_window)
                    .unwrap_or(false)
                {
                    v.crash_loop = None;
                }
            }
            let changed = p.version.is_some() && p.version != v.version;
            if changed {
                v.version = p.version.clone();
            }
            v.probe = Some(p);
            changed.then(|| v.version.clone()).flatten()
        };
        if let Some(ver) = version_changed {
            self.version = Some(ver);
            let uid = self.reporter().uid();
            let d = describe(&self.cfg, uid, self.version.as_deref());
            self.reporter().set_description(d);
        }
        self.update_health();
    }

    async fn on_server(&mut self, msg: ServerToAgent) -> Option<i32> {
        // A command travels alone; anything else in the message is ignored (spec).
        if let Some(cmd) = &msg.command {
            if cmd.r#type == flotilla_proto::v1::CommandType::Restart as i32 {
                self.restart_command();
            } else {
                tracing::warn!(kind = cmd.r#type, "unknown standard command ignored");
            }
            return None;
        }
        if let Some(id) = &msg.agent_identification {
            self.adopt_uid(&id.new_instance_uid);
        }
        if report_full_state(msg.flags) {
            tracing::info!("server asked for the full state");
            self.reporter().request_full_state();
            self.link.poke();
        }
        if let Some(cs) = msg
            .connection_settings
            .as_ref()
            .and_then(|c| c.opamp.as_ref())
        {
            let accepts = self
                .cfg
                .declares(AgentCapabilities::AcceptsOpAmpConnectionSettings);
            if accepts && self.cfg.declares(AgentCapabilities::ReportsHeartbeat) {
                // Clamped: an absurd offer (u64::MAX) would overflow the timer arithmetic.
                let offered = cs.heartbeat_interval_seconds;
                let hb = transport::clamp_heartbeat_s(offered);
                if hb != offered {
                    tracing::warn!(
                        offered,
                        used = hb,
                        "server-offered heartbeat interval is out of range; capped"
                    );
                }
                let old = self.link.heartbeat_s.swap(hb, Ordering::Relaxed);
                if old != hb {
                    tracing::info!(
                        heartbeat_interval_s = hb,
                        "heartbeat interval offered by the server applied (0 = off)"
                    );
                    self.link.poke();
                }
            }
            if accepts && !cs.destination_endpoint.is_empty() {
                // The transport compares it with the endpoint in use, switches if it differs
                // and goes back if the new one does not answer.
                self.link.offer_endpoint(&cs.destination_endpoint);
            }
        }
        if let Some(rc) = msg.remote_config {
            self.on_remote_config(rc);
        }
        if let Some(cm) = &msg.custom_message {
            return self.on_custom(cm).await;
        }
        None
    }

    fn adopt_uid(&mut self, raw: &[u8]) {
        let Ok(uid) = Uuid::from_slice(raw) else {
            tracing::warn!(
                len = raw.len(),
                "ignoring new_instance_uid that is not 16 bytes"
            );
            return;
        };
        if uid.is_nil() || uid == self.reporter().uid() {
            return;
        }
        if let Err(e) = self.state.set_instance_uid(uid) {
            // Adopt anyway (the spec says MUST); it will not survive a restart.
            tracing::error!("cannot persist the new instance uid: {e}");
        }
        tracing::info!(new_instance_uid = %uid, "server assigned a new instance uid; adopted");
        let d = describe(&self.cfg, uid, self.version.as_deref());
        let mut r = self.reporter();
        r.set_uid(uid);
        r.set_description(d);
        drop(r);
        self.link.poke();
    }

    fn restart_command(&mut self) {
        if !self.cfg.declares(AgentCapabilities::AcceptsRestartCommand) {
            tracing::warn!("restart command ignored: AcceptsRestartCommand not declared");
            return;
        }
        // The standard command has no id: one arriving while a restart is still under way is
        // the same intent, and restarting twice would turn one command into two.
        if self.restarting || self.restart_after_apply {
            tracing::warn!("restart command while a restart is in progress; not restarting twice");
            return;
        }
        if self.offers.applying.is_some() {
            // A new process in the middle of an apply breaks its verdict: its reload counter
            // starts again from 0, so a good reload looks halted and last-known-good is put
            // back on disk but never loaded. The restart waits for the apply to end.
            tracing::info!(
                "restart command while a config apply is in progress; restarting when it ends"
            );
            self.restart_after_apply = true;
            return;
        }
        self.restarting = true;
        tracing::info!("restart command: restarting the agent");
        let agent = self.agent.clone();
        let jobs = self.jobs.clone();
        tokio::spawn(async move {
            agent.restart().await;
            let _ = jobs.send(Job::Restarted).await;
        });
    }

    fn on_remote_config(&mut self, rc: AgentRemoteConfig) {
        if !self.cfg.declares(AgentCapabilities::AcceptsRemoteConfig) {
            tracing::warn!("remote config ignored: AcceptsRemoteConfig not declared");
            return;
        }
        let hash = hex::encode(&rc.config_hash);
        if hash.is_empty() {
            return;
        }
        // Same config again (a second identical remote_config command, or a server that
        // re-offers it): no reload; say again where it stands, every time, or a command
        // waiting on that answer is never settled.
        match self.offers.again(&hash, Instant::now()) {
            None => {}
            Some(Again::Report) => {
                tracing::info!(hash, "remote config already processed; status re-reported");
                self.reporter().resend_remote_status();
                self.link.poke();
                return;
            }
            Some(Again::Guard) => {
                tracing::warn!(
                    hash,
                    "the server keeps offering the config it already has; not re-reporting \
                     again for {} s (message loop guard)",
                    REREPORT_WINDOW.as_secs()
                );
                return;
            }
            Some(Again::Quiet) => return,
        }
        let mut files = BTreeMap::new();
        let mut problem = None;
        for (name, f) in rc.config.map(|c| c.config_map).unwrap_or_default() {
            match String::from_utf8(f.body) {
                Ok(body) => {
                    files.insert(
                        name,
                        StoredFile {
                            body,
                            content_type: f.content_type,
                        },
                    );
                }
                Err(_) => problem = Some(format!("file {name:?} is not UTF-8 text")),
            }
        }
        if files.is_empty() && problem.is_none() {
            problem = Some("the offer carries a new hash but no files".into());
        }
        if let Some(p) = problem {
            self.offers.last_hash = Some(hash.clone());
            self.finish_apply(&hash, Applied::Failed(p));
            return;
        }
        if self.offers.applying.is_some() || self.restarting || self.restart_after_apply {
            // Applies are serialized, with each other and with restart commands (see
            // restart_command); only the newest waiting offer matters.
            self.offers.wait(hash, files);
            return;
        }
        self.start_apply(hash, files);
    }

    fn start_apply(&mut self, hash: String, files: BTreeMap<String, StoredFile>) {
        tracing::info!(hash, files = files.len(), "applying remote config");
        self.offers.started(&hash);
        if self.cfg.declares(AgentCapabilities::ReportsRemoteConfig) {
            self.reporter()
                .set_remote_status(remote_status(&hash, "applying", ""));
        }
        self.link.poke();
        let applier = self.applier.clone();
        let jobs = self.jobs.clone();
        tokio::spawn(async move {
            let r = applier.apply(&hash, &files).await;
            let _ = jobs.send(Job::Applied(hash, r)).await;
        });
    }

    fn finish_apply(&mut self, hash: &str, r: Applied) {
        let (status, err) = match &r {
            Applied::Ok => ("applied", String::new()),
            Applied::Failed(m) => ("failed", m.clone()),
        };
        if matches!(r, Applied::Failed(_)) && self.offers.applying.is_none() {
            // Failed before the job started: persist here.
            let _ = self
                .state
                .set_remote_status(&crate::state::StoredRemoteConfig {
                    hash: hash.to_string(),
                    files: BTreeMap::new(),
                    status: "failed".into(),
                    error_message: err.clone(),
                });
        }
        if self.cfg.declares(AgentCapabilities::ReportsRemoteConfig) {
            self.reporter()
                .set_remote_status(remote_status(hash, status, &err));
        }
        if self.cfg.declares(AgentCapabilities::ReportsEffectiveConfig) {
            let applied = self.state.remote_config().ok().flatten();
            let e = remote::effective_config(&self.cfg, applied.as_ref());
            self.reporter().set_effective(e);
        }
        self.link.poke();
    }

    fn on_job(&mut self, job: Job) {
        match job {
            Job::Command(inc, outcome) => self.report(&inc, &outcome),
            Job::Applied(hash, r) => {
                self.offers.applying = None;
                self.finish_apply(&hash, r);
                // A stuck rollback shows in health at once.
                self.update_health();
                if std::mem::take(&mut self.restart_after_apply) {
                    // The next offer, if any, waits for this restart in turn.
                    self.restart_command();
                } else if let Some((h, files)) = self.offers.take_next() {
                    self.start_apply(h, files);
                }
            }
            Job::Restarted => {
                self.restarting = false;
                if self.offers.applying.is_none() {
                    if let Some((h, files)) = self.offers.take_next() {
                        self.start_apply(h, files);
                    }
                }
            }
        }
    }

    async fn on_custom(&mut self, cm: &flotilla_proto::CustomMessage) -> Option<i32> {
        if commands::ack_id(cm).is_some() {
            // The server's ack of one of our results: the transport took it in. Not a
            // command, and treating it as a re-delivery would re-send the result, draw
            // another ack, and so on.
            return None;
        }
        let cfg = self.cfg.clone();
        let inc = commands::parse(cm, |c| cfg.declares_custom(c));
        if cm.capability == CAP_FLOTILLA && inc.command_id.is_none() {
            // Our own result type echoed or a future message type: nothing to do.
            tracing::debug!(r#type = %cm.r#type, "custom message on {CAP_FLOTILLA} ignored");
            return None;
        }
        if let Some(id) = &inc.command_id {
            if self.in_flight.contains(id) {
                tracing::warn!(command_id = %id, "duplicate delivery of a running command ignored");
                return None;
            }
            if let Some(prev) = self.state.executed(id).cloned() {
                tracing::warn!(command_id = %id, "command already executed; not running it again");
                let result = prev.result.unwrap_or_else(|| {
                    commands::rich_result(
                        id,
                        &Outcome::failed(
                            "the supervisor restarted while running this command; it is not run again",
                        ),
                    )
                });
                self.reporter().push_custom(commands::rich_message(&result));
                self.link.poke();
                return None;
            }
            if let Err(e) = self.state.mark_executed(id, inc.kind()) {
                // Without the record a restart could run it twice: refuse rather than risk it.
                self.report(
                    &inc,
                    &Outcome::failed(format!("cannot record the command: {e}")),
                );
                return None;
            }
        }
        tracing::info!(
            capability = %inc.capability,
            command_id = inc.command_id.as_deref().unwrap_or("-"),
            kind = inc.kind(),
            "custom command received"
        );
        match inc.request.clone() {
            Request::Chatops { tag, attributes } => {
                if let Some(id) = &inc.command_id {
                    self.in_flight.insert(id.clone());
                }
                let http = self.http.clone();
                let port = self.cfg.agent.chat_ops_port;
                let jobs = self.jobs.clone();
                tokio::spawn(async move {
                    let o = commands::run_chatops(&http, port, &tag, &attributes).await;
                    let _ = jobs.send(Job::Command(inc, o)).await;
                });
                None
            }
            Request::Null => {
                self.report(&inc, &Outcome::ok("null command received"));
                None
            }
            Request::Unsupported(why) => {
                tracing::warn!("{why}");
                self.report(&inc, &Outcome::failed(why));
                None
            }
            Request::Shutdown => Some(self.shutdown_command(&inc).await),
        }
    }

    /// Sends a command's outcome: the rich result when the command had an id, fluent-opamp's
    /// failure message otherwise (it has no success message).
    fn report(&mut self, inc: &Incoming, o: &Outcome) {
        if o.ok {
            tracing::info!(kind = inc.kind(), "command succeeded: {}", o.message);
        } else {
            tracing::warn!(kind = inc.kind(), "command failed: {}", o.message);
        }
        let msg = match &inc.command_id {
            Some(id) => {
                self.in_flight.remove(id);
                let r = commands::rich_result(id, o);
                if let Err(e) = self.state.set_result(id, r.clone()) {
                    tracing::error!("cannot persist a command result: {e}");
                }
                Some(commands::rich_message(&r))
            }
            None if !o.ok => {
                let cap = inc
                    .capability
                    .strip_prefix("request:")
                    .unwrap_or(&inc.capability);
                Some(commands::plain_failure(cap, o))
            }
            None => None,
        };
        if let Some(m) = msg {
            self.reporter().push_custom(m);
            self.link.poke();
        }
    }

    async fn shutdown_command(&mut self, inc: &Incoming) -> i32 {
        tracing::info!("shutdown command: stopping the agent, then the supervisor");
        self.view.lock().expect("view").stopping = true;
        self.update_health();
        self.agent.stop().await;
        self.report(inc, &Outcome::ok("agent stopped; supervisor exiting"));
        self.update_health();
        self.disconnect().await;
        0
    }

    async fn on_signal(&mut self, name: &str) -> i32 {
        tracing::info!(signal = name, "stopping: agent_disconnect, then the agent");
        self.view.lock().expect("view").stopping = true;
        self.update_health();
        self.disconnect().await;
        self.agent.stop().await;
        tracing::info!("agent stopped; supervisor exiting");
        0
    }

    /// Flushes queued reports and sends agent_disconnect (bounded: a dead server must not hold
    /// up the agent's stop).
    async fn disconnect(&mut self) {
        let (tx, rx) = oneshot::channel();
        if self.transport_stop.send(tx).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(body: &str) -> BTreeMap<String, StoredFile> {
        [(
            "fluent-bit.conf".to_string(),
            StoredFile {
                body: body.into(),
                content_type: String::new(),
            },
        )]
        .into()
    }

    #[test]
    fn a_re_offer_of_the_config_applying_drops_the_one_waiting() {
        let mut o = Offers::default();
        let now = Instant::now();
        assert_eq!(o.again("h1", now), None, "new");
        o.started("h1");
        assert_eq!(o.again("h2", now), None, "new");
        o.wait("h2".into(), files("2"));
        // The server goes back to h1 while it still applies: h1 is what it wants now.
        assert_eq!(o.again("h1", now), Some(Again::Report));
        o.applying = None;
        assert!(o.take_next().is_none(), "h2 must not be applied after h1");
    }

    #[test]
    fn the_newest_waiting_offer_is_applied_next_and_re_reports_are_bounded() {
        let mut o = Offers::default();
        let now = Instant::now();
        o.started("h1");
        o.wait("h2".into(), files("2"));
        o.wait("h3".into(), files("3"));
        o.applying = None;
        assert_eq!(o.take_next().map(|(h, _)| h).as_deref(), Some("h3"));
        assert!(o.take_next().is_none());
        for _ in 0..REREPORT_BURST {
            assert_eq!(o.again("h1", now), Some(Again::Report));
        }
        assert_eq!(o.again("h1", now), Some(Again::Guard));
        assert_eq!(o.again("h1", now), Some(Again::Quiet));
        assert_eq!(
            o.again("h1", now + REREPORT_WINDOW),
            Some(Again::Report),
            "a new window"
        );
    }
}
