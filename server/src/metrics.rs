//! Prometheus metrics: agents by state, messages by kind, commands by status, delivery latency,
//! operator requests (REST and MCP) by route and status with their latency, build info, and
//! the standard `process_*` metrics of this process.
//!
//! Counters and the histogram are updated where things happen; gauges that describe stored
//! state (agents by liveness, from the registry index's counts; commands by status) are read
//! at scrape time by the REST layer and passed to [`Metrics::render`].

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The commit this binary was built from (see `build.rs`).
pub const COMMIT: &str = env!("FLOTILLA_COMMIT");

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// One operator request: which API (`rest`, `mcp`, `ops` for /healthz, /readyz, /metrics),
/// the route pattern (never the raw path, so uids do not multiply series), the method and the
/// answer's status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub api: &'static str,
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub api: &'static str,
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabel {
    pub replica: String,
}

/// What `/metrics` shows of one replica sharing the store.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaGauges {
    pub id: String,
    /// Its heartbeat is fresh (written within 3 intervals).
    pub up: bool,
    pub connections: u64,
    pub heartbeat_age_s: f64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
}

/// Which API a route pattern belongs to.
pub fn api_of(route: &str) -> &'static str {
    if route.starts_with("/api/") {
        "rest"
    } else if ["/mcp", "/sse", "/messages"]
        .iter()
        .any(|p| route == *p || route.starts_with(&format!("{p}/")))
    {
        "mcp"
    } else {
        "ops"
    }
}

/// All metrics of one server.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// `process_*`, unprefixed as every Prometheus client library names them.
    process: Registry,
    /// Operator requests answered, by api, route, method and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Seconds from receiving an operator request to the start of its answer.
    pub request_duration: Family<RouteLabels, Histogram>,
    /// AgentToServer messages handled, by kind: `status`, `heartbeat`, `disconnect`,
    /// `custom_message`, `malformed`.
    pub messages: Family<KindLabel, Counter>,
    /// Connections or requests refused, by reason (`overload`, `too_large`, `unauthorized`).
    pub rejected: Family<ReasonLabel, Counter>,
    /// Seconds from queueing a command to writing it to the agent.
    pub delivery_latency: Histogram,
    agents: Family<StateLabel, Gauge>,
    commands: Family<StatusLabel, Gauge>,
    ws_connections: Gauge,
    /// Sessions woken here for commands queued through another replica.
    remote_wakes: Counter,
    replica_up: Family<ReplicaLabel, Gauge>,
    replica_connections: Family<ReplicaLabel, Gauge>,
    replica_heartbeat_age: Family<ReplicaLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    replica_self: Family<ReplicaLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let messages = Family::<KindLabel, Counter>::default();
        let rejected = Family::<ReasonLabel, Counter>::default();
        let delivery_latency = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 300.0,
        ]);
        let agents = Family::<StateLabel, Gauge>::default();
        let commands = Family::<StatusLabel, Gauge>::default();
        let ws_connections = Gauge::default();
        let remote_wakes = Counter::default();
        let replica_up = Family::<ReplicaLabel, Gauge>::default();
        let replica_connections = Family::<ReplicaLabel, Gauge>::default();
        let replica_heartbeat_age =
            Family::<ReplicaLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let replica_self = Family::<ReplicaLabel, Gauge>::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ])
        });
        let mut registry = Registry::with_prefix("flotilla");
        registry.register(
            "build",
            "The version and commit of this server",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: COMMIT,
            }),
        );
        registry.register(
            "http_requests",
            "Operator requests answered (REST, MCP, ops), by route pattern, method and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from receiving an operator request to the start of its answer",
            request_duration.clone(),
        );
        registry.register(
            "opamp_messages",
            "OpAMP AgentToServer messages handled, by kind",
            messages.clone(),
        );
        registry.register(
            "opamp_rejected",
            "OpAMP connections or requests refused, by reason",
            rejected.clone(),
        );
        registry.register(
            "command_delivery_latency_seconds",
            "Time from queueing a command to writing it to the agent",
            delivery_latency.clone(),
        );
        registry.register("agents", "Agents in the registry, by state", agents.clone());
        registry.register("commands", "Commands, by status", commands.clone());
        registry.register(
            "websocket_connections",
            "Open agent WebSocket connections",
            ws_connections.clone(),
        );
        registry.register(
            "replica_wakes",
            "Agent sessions woken here for commands queued through another replica",
            remote_wakes.clone(),
        );
        registry.register(
            "replica_up",
            "Replicas sharing the store: 1 while its heartbeat is fresh, 0 once it is silent",
            replica_up.clone(),
        );
        registry.register(
            "replica_connections",
            "Agent connections each replica held at its last heartbeat",
            replica_connections.clone(),
        );
        registry.register(
            "replica_heartbeat_age_seconds",
            "Time since each replica last wrote its heartbeat",
            replica_heartbeat_age.clone(),
        );
        registry.register(
            "replica_self",
            "The replica answering this scrape (always 1)",
            replica_self.clone(),
        );
        let mut process = Registry::default();
        process.register_collector(Box::new(ProcessCollector));
        Metrics {
            registry: Mutex::new(registry),
            process,
            requests,
            request_duration,
            messages,
            rejected,
            delivery_latency,
            agents,
            commands,
            ws_connections,
            remote_wakes,
            replica_up,
            replica_connections,
            replica_heartbeat_age,
            replica_self,
        }
    }

    /// Sets the replica gauges to `replicas` (those no longer known disappear) and names
    /// this one.
    pub fn set_replicas(&self, this: &str, replicas: &[ReplicaGauges]) {
        self.replica_up.clear();
        self.replica_connections.clear();
        self.replica_heartbeat_age.clear();
        self.replica_self.clear();
        for r in replicas {
            let l = ReplicaLabel {
                replica: r.id.clone(),
            };
            self.replica_up.get_or_create(&l).set(i64::from(r.up));
            self.replica_connections
                .get_or_create(&l)
                .set(r.connections as i64);
            self.replica_heartbeat_age
                .get_or_create(&l)
                .set(r.heartbeat_age_s);
        }
        self.replica_self
            .get_or_create(&ReplicaLabel {
                replica: this.to_string(),
            })
            .set(1);
    }

    /// Counts one session woken for a command queued through another replica.
    pub fn remote_wake(&self) {
        self.remote_wakes.inc();
    }

    /// Counts one handled message of `kind`.
    pub fn message(&self, kind: &str) {
        self.messages
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// Counts one refusal for `reason`.
    pub fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts one answered operator request and its latency.
    pub fn request(&self, route: &str, method: &str, status: u16, took: Duration) {
        let api = api_of(route);
        // Methods are bounded so a client cannot mint series with made-up verbs.
        let method = match method {
            "GET" | "POST" | "PUT" | "DELETE" | "HEAD" | "OPTIONS" | "PATCH" => method,
            _ => "other",
        };
        self.requests
            .get_or_create(&RequestLabels {
                api,
                method: method.into(),
                route: route.into(),
                status,
            })
            .inc();
        self.request_duration
            .get_or_create(&RouteLabels {
                api,
                method: method.into(),
                route: route.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// Renders the text exposition format with the given stored-state gauges.
    pub fn render(
        &self,
        agents_by_state: &[(&str, u64)],
        commands_by_status: &[(&str, u64)],
        ws_connections: u64,
    ) -> String {
        for (state, n) in agents_by_state {
            self.agents
                .get_or_create(&StateLabel {
                    state: (*state).into(),
                })
                .set(*n as i64);
        }
        for (status, n) in commands_by_status {
            self.commands
                .get_or_create(&StatusLabel {
                    status: (*status).into(),
                })
                .set(*n as i64);
        }
        self.ws_connections.set(ws_connections as i64);
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut out, &registry);
        let _ = encode_registry(&mut out, &self.process);
        let _ = encode_eof(&mut out);
        out
    }
}

/// The standard process metrics, read from `/proc/self` at each scrape (Linux; elsewhere
/// none are exported).
#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self` says about this process.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time_seconds: f64,
    threads: u64,
    open_fds: u64,
    max_fds: Option<u64>,
}

#[cfg(target_os = "linux")]
fn process_stats() -> Option<ProcessStats> {
    // SAFETY: sysconf only reads a system constant.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    parse_proc(&stat, &boot, &limits, ticks as f64, page as u64, open_fds)
}

#[cfg(not(target_os = "linux"))]
fn process_stats() -> Option<ProcessStats> {
    None
}

/// Parses `/proc/self/stat` (fields counted after the parenthesised command name, which may
/// itself hold spaces), the `btime` line of `/proc/stat` and `/proc/self/limits`.
fn parse_proc(
    stat: &str,
    proc_stat: &str,
    limits: &str,
    ticks_per_s: f64,
    page_bytes: u64,
    open_fds: u64,
) -> Option<ProcessStats> {
    let after = &stat[stat.rfind(')')? + 1..];
    // after[0] is field 3 (state); field N is after[N - 3].
    let f: Vec<&str> = after.split_whitespace().collect();
    let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    let btime: u64 = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let max_fds = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok());
    Some(ProcessStats {
        cpu_seconds: (num(14)? + num(15)?) as f64 / ticks_per_s,
        threads: num(20)?,
        start_time_seconds: btime as f64 + num(22)? as f64 / ticks_per_s,
        virtual_bytes: num(23)?,
        resident_bytes: num(24)? * page_bytes,
        open_fds,
        max_fds,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let Some(p) = process_stats() else {
            return Ok(());
        };
        let c = ConstCounter::new(p.cpu_seconds);
        c.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            c.metric_type(),
        )?)?;
        let mut gauge = |name: &str, help: &str, v: f64| {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
        };
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            p.resident_bytes as f64,
        )?;
        gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            p.virtual_bytes as f64,
        )?;
        gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            p.start_time_seconds,
        )?;
        gauge("process_threads", "Number of OS threads", p.threads as f64)?;
        gauge(
            "process_open_fds",
            "Number of open file descriptors",
            p.open_fds as f64,
        )?;
        if let Some(m) = p.max_fds {
            gauge(
                "process_max_fds",
                "Maximum number of open file descriptors",
                m as f64,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        // A command name with a space and a parenthesis, as /proc allows.
        let stat = "4242 (tokio rt) x) S 1 4242 4242 0 -1 4194560 1500 0 0 0 250 50 0 0 20 0 \
                    7 0 123400 987654321 2048 18446744073709551615";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        let p = parse_proc(stat, proc_stat, limits, 100.0, 4096, 12).unwrap();
        assert_eq!(
            p,
            ProcessStats {
                cpu_seconds: 3.0,
                resident_bytes: 2048 * 4096,
                virtual_bytes: 987654321,
                start_time_seconds: 1_700_000_000.0 + 1234.0,
                threads: 7,
                open_fds: 12,
                max_fds: Some(1024),
            }
        );
        assert!(parse_proc("garbage", proc_stat, limits, 100.0, 4096, 1).is_none());
    }

    #[test]
    fn routes_map_to_their_api() {
        assert_eq!(api_of("/api/v1/agents/{uid}"), "rest");
        assert_eq!(api_of("/mcp"), "mcp");
        assert_eq!(api_of("/sse"), "mcp");
        assert_eq!(api_of("/messages"), "mcp");
        assert_eq!(api_of("/metrics"), "ops");
        assert_eq!(api_of("/mcpx"), "ops");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn exposition_has_build_info_process_metrics_and_requests() {
        let m = Metrics::new();
        m.request("/api/v1/agents/{uid}", "GET", 200, Duration::from_millis(3));
        let text = m.render(&[], &[], 0);
        for needle in [
            &format!("flotilla_build_info{{version=\"{}\",commit=\"{COMMIT}\"}} 1", env!("CARGO_PKG_VERSION")) as &str,
            "flotilla_http_requests_total{api=\"rest\",method=\"GET\",route=\"/api/v1/agents/{uid}\",status=\"200\"} 1",
            "flotilla_http_request_duration_seconds_count{api=\"rest\",method=\"GET\",route=\"/api/v1/agents/{uid}\"} 1",
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
