//! Fluent Bit's monitoring bodies, built from the fake's counters: `/api/v1/metrics`
//! (B_v1_metrics.json), its Prometheus form (B_v1_metrics_prometheus.txt), the cmetrics
//! text and Prometheus of `/api/v2/metrics*` (B_v2_metrics.txt,
//! B_v2_metrics_prometheus.txt), `/api/v1/storage` (B_v1_storage.json,
//! E_v1_storage_filesystem.json), health (B_v2_health*.json) and uptime (B_v1_uptime.json).
//! Family names, help texts, label sets and order are the recorded ones.

use std::collections::VecDeque;
use std::time::SystemTime;

use super::config::{Config, Kind};
use crate::common::{iso_nanos, unix_millis, unix_secs};
use crate::json::Obj;

#[derive(Clone, Default)]
pub struct InStat {
    pub records: u64,
    pub bytes: u64,
    /// Records received but not yet flushed (the http input; flushed on the next tick).
    pub pending: Vec<Posted>,
    pub scrapes: u64,
    pub rate_records: u64,
    pub rate_bytes: u64,
}

/// One POST to the http input: its records carry their own tag (the URL path), so they are
/// routed by it, not by the input's `Tag` (I_http_in_POST_flush.txt).
#[derive(Clone, Default)]
pub struct Posted {
    pub tag: String,
    pub records: u64,
    pub bytes: u64,
    /// The record, as JSON text, for the stdout output.
    pub body: String,
}

#[derive(Clone, Default)]
pub struct OutStat {
    pub proc_records: u64,
    pub proc_bytes: u64,
    pub errors: u64,
    pub retries: u64,
    pub retries_failed: u64,
    pub dropped_records: u64,
    pub retried_records: u64,
}

#[derive(Clone, Default)]
pub struct Route {
    pub input: usize,
    pub output: usize,
    pub records: u64,
    pub bytes: u64,
    pub drop_records: u64,
    pub drop_bytes: u64,
    pub flushes: u64,
}

/// Everything the bodies need, copied out under the engine lock.
pub struct Snapshot<'a> {
    pub cfg: &'a Config,
    pub inputs: &'a [InStat],
    pub outputs: &'a [OutStat],
    pub routes: &'a [Route],
    pub samples: &'a VecDeque<(u64, u64)>,
    pub uptime: u64,
    pub hot_reload_count: u64,
    pub process_start: SystemTime,
    pub logs: [u64; 5],
    pub hostname: &'a str,
}

impl Snapshot<'_> {
    fn input_names(&self) -> Vec<&str> {
        self.cfg
            .of(Kind::Input)
            .map(|p| p.instance.as_str())
            .collect()
    }

    fn output_names(&self) -> Vec<&str> {
        self.cfg
            .of(Kind::Output)
            .map(|p| p.instance.as_str())
            .collect()
    }
}

/// `{"uptime_sec":3,"uptime_hr":"Fluent Bit has been running:  0 day, 0 hour, 0 minute and 3 seconds"}`
/// (A_v1_uptime.json; `1 second` singular in B_v1_uptime_after_reload.json).
pub fn uptime_json(secs: u64) -> String {
    let plural = |n: u64| if n > 1 { "s" } else { "" };
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    let hr = format!(
        "Fluent Bit has been running:  {d} day{}, {h} hour{}, {m} minute{} and {s} second{}",
        plural(d),
        plural(h),
        plural(m),
        plural(s)
    );
    Obj::new()
        .num("uptime_sec", secs)
        .str("uptime_hr", &hr)
        .build()
}

pub fn v1_json(s: &Snapshot) -> String {
    let mut inputs = Obj::new();
    for (name, st) in s.input_names().iter().zip(s.inputs) {
        inputs.push(
            name,
            Obj::new()
                .num("records", st.records)
                .num("bytes", st.bytes)
                .build(),
        );
    }
    // No recording has a filter; these are the two counters v1 keeps for filters.
    let mut filters = Obj::new();
    for p in s.cfg.of(Kind::Filter) {
        filters.push(
            &p.instance,
            Obj::new()
                .num("drop_records", 0)
                .num("add_records", 0)
                .build(),
        );
    }
    let mut outputs = Obj::new();
    for (name, o) in s.output_names().iter().zip(s.outputs) {
        outputs.push(
            name,
            Obj::new()
                .num("proc_records", o.proc_records)
                .num("proc_bytes", o.proc_bytes)
                .num("errors", o.errors)
                .num("retries", o.retries)
                .num("retries_failed", o.retries_failed)
                .num("dropped_records", o.dropped_records)
                .num("retried_records", o.retried_records)
                .build(),
        );
    }
    Obj::new()
        .raw("input", inputs.build())
        .raw("filter", filters.build())
        .raw("output", outputs.build())
        .build()
}

/// v1 Prometheus: families in alphabetical order with a millisecond timestamp on each
/// plugin sample, then uptime, process start and build info (A_v1_metrics_prometheus.txt).
pub fn v1_prometheus(s: &Snapshot, now: SystemTime) -> String {
    let ts = unix_millis(now);
    let mut out = String::new();
    let mut fam = |name: &str, help: &str, rows: Vec<(&str, u64)>| {
        if rows.is_empty() {
            return;
        }
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
        for (label, v) in rows {
            out.push_str(&format!("{name}{{name=\"{label}\"}} {v} {ts}\n"));
        }
    };
    let ins = s.input_names();
    let outs = s.output_names();
    let irow = |f: fn(&InStat) -> u64| {
        ins.iter()
            .zip(s.inputs)
            .map(|(n, st)| (*n, f(st)))
            .collect::<Vec<_>>()
    };
    let orow = |f: fn(&OutStat) -> u64| {
        outs.iter()
            .zip(s.outputs)
            .map(|(n, st)| (*n, f(st)))
            .collect::<Vec<_>>()
    };
    let filters: Vec<&str> = s
        .cfg
        .of(Kind::Filter)
        .map(|p| p.instance.as_str())
        .collect();
    fam(
        "fluentbit_filter_add_records_total",
        "Number of added records.",
        filters.iter().map(|n| (*n, 0)).collect(),
    );
    fam(
        "fluentbit_filter_drop_records_total",
        "Number of dropped records.",
        filters.iter().map(|n| (*n, 0)).collect(),
    );
    fam(
        "fluentbit_input_bytes_total",
        "Number of input bytes.",
        irow(|i| i.bytes),
    );
    fam(
        "fluentbit_input_records_total",
        "Number of input records.",
        irow(|i| i.records),
    );
    fam(
        "fluentbit_output_dropped_records_total",
        "Number of dropped records.",
        orow(|o| o.dropped_records),
    );
    fam(
        "fluentbit_output_errors_total",
        "Number of output errors.",
        orow(|o| o.errors),
    );
    fam(
        "fluentbit_output_proc_bytes_total",
        "Number of processed output bytes.",
        orow(|o| o.proc_bytes),
    );
    fam(
        "fluentbit_output_proc_records_total",
        "Number of processed output records.",
        orow(|o| o.proc_records),
    );
    fam(
        "fluentbit_output_retried_records_total",
        "Number of retried records.",
        orow(|o| o.retried_records),
    );
    fam(
        "fluentbit_output_retries_failed_total",
        "Number of abandoned batches because the maximum number of re-tries was reached.",
        orow(|o| o.retries_failed),
    );
    fam(
        "fluentbit_output_retries_total",
        "Number of output retries.",
        orow(|o| o.retries),
    );
    out.push_str(&format!(
        "# HELP fluentbit_uptime Number of seconds that Fluent Bit has been running.\n# TYPE fluentbit_uptime counter\nfluentbit_uptime {}\n",
        s.uptime
    ));
    out.push_str(&format!(
        "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {}\n",
        unix_secs(s.process_start)
    ));
    out.push_str(&format!(
        "# HELP fluentbit_build_info Build version information.\n# TYPE fluentbit_build_info gauge\nfluentbit_build_info{{version=\"{}\",edition=\"Community\"}} 1\n",
        super::VERSION
    ));
    out
}

enum Val {
    Int(u64),
    Hist {
        bounds: &'static [f64],
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<(Vec<(&'static str, String)>, Val)>,
}

const LATENCY_BOUNDS: &[f64] = &[0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 30.0];
const BACKPRESSURE_BOUNDS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 15.0, 30.0, 60.0];

fn v2_families(s: &Snapshot) -> Vec<Family> {
    let host = || vec![("hostname", s.hostname.to_string())];
    let ins = s.input_names();
    let outs = s.output_names();
    let per_in = |f: &dyn Fn(usize, &InStat) -> u64| -> Vec<(Vec<(&'static str, String)>, Val)> {
        ins.iter()
            .enumerate()
            .map(|(i, n)| (vec![("name", n.to_string())], Val::Int(f(i, &s.inputs[i]))))
            .collect()
    };
    let per_out = |f: &dyn Fn(&OutStat) -> u64| -> Vec<(Vec<(&'static str, String)>, Val)> {
        outs.iter()
            .zip(s.outputs)
            .map(|(n, o)| (vec![("name", n.to_string())], Val::Int(f(o))))
            .collect()
    };
    let route_labels = |r: &Route| {
        vec![
            ("input", ins[r.input].to_string()),
            ("output", outs[r.output].to_string()),
        ]
    };
    let mut fams = Vec::new();
    let mut add = |name, help, kind, samples| {
        fams.push(Family {
            name,
            help,
            kind,
            samples,
        })
    };
    add(
        "fluentbit_uptime",
        "Number of seconds that Fluent Bit has been running.",
        "counter",
        vec![(host(), Val::Int(s.uptime))],
    );
    add(
        "fluentbit_hot_reloaded_times",
        "Collect the count of hot reloaded times.",
        "counter",
        vec![(host(), Val::Int(s.hot_reload_count))],
    );
    let levels = ["error", "warn", "info", "debug", "trace"];
    add(
        "fluentbit_logger_logs_total",
        "Total number of logs",
        "counter",
        levels
            .iter()
            .enumerate()
            .map(|(i, l)| (vec![("message_type", l.to_string())], Val::Int(s.logs[i])))
            .collect(),
    );
    let total: u64 = s.logs.iter().sum();
    add(
        "fluentbit_logger_queue_enqueued_total",
        "Total number of logger queue enqueues",
        "counter",
        vec![(vec![], Val::Int(total))],
    );
    add(
        "fluentbit_logger_queue_dropped_total",
        "Total number of logger queue drops",
        "counter",
        vec![(vec![], Val::Int(0))],
    );
    add(
        "fluentbit_logger_queue_drained_total",
        "Total number of logger queue records drained",
        "counter",
        vec![(vec![], Val::Int(total))],
    );
    let routed: Vec<&Route> = s.routes.iter().filter(|r| r.records > 0).collect();
    let dropped: Vec<&Route> = s.routes.iter().filter(|r| r.drop_records > 0).collect();
    add(
        "fluentbit_routing_logs_records_total",
        "Total log records routed from input to output",
        "counter",
        routed
            .iter()
            .map(|r| (route_labels(r), Val::Int(r.records)))
            .collect(),
    );
    add(
        "fluentbit_routing_logs_bytes_total",
        "Total bytes routed from input to output (logs)",
        "counter",
        routed
            .iter()
            .map(|r| (route_labels(r), Val::Int(r.bytes)))
            .collect(),
    );
    add(
        "fluentbit_routing_logs_drop_records_total",
        "Total log records dropped during routing",
        "counter",
        dropped
            .iter()
            .map(|r| (route_labels(r), Val::Int(r.drop_records)))
            .collect(),
    );
    add(
        "fluentbit_routing_logs_drop_bytes_total",
        "Total bytes dropped during routing (logs)",
        "counter",
        dropped
            .iter()
            .map(|r| (route_labels(r), Val::Int(r.drop_bytes)))
            .collect(),
    );
    add(
        "fluentbit_input_bytes_total",
        "Number of input bytes.",
        "counter",
        per_in(&|_, i| i.bytes),
    );
    add(
        "fluentbit_input_records_total",
        "Number of input records.",
        "counter",
        per_in(&|_, i| i.records),
    );
    add(
        "fluentbit_input_ring_buffer_writes_total",
        "Number of ring buffer writes.",
        "counter",
        per_in(&|_, _| 0),
    );
    add(
        "fluentbit_input_ring_buffer_retries_total",
        "Number of ring buffer retries.",
        "counter",
        per_in(&|_, _| 0),
    );
    add(
        "fluentbit_input_ring_buffer_retry_failures_total",
        "Number of ring buffer retry failures.",
        "counter",
        per_in(&|_, _| 0),
    );
    let scrapers: Vec<_> = s
        .cfg
        .of(Kind::Input)
        .zip(s.inputs)
        .filter(|(p, _)| p.name == "fluentbit_metrics")
        .map(|(p, st)| (vec![("name", p.instance.clone())], Val::Int(st.scrapes)))
        .collect();
    add(
        "fluentbit_input_metrics_scrapes_total",
        "Number of total metrics scrapes",
        "counter",
        scrapers,
    );
    add(
        "fluentbit_output_proc_records_total",
        "Number of processed output records.",
        "counter",
        per_out(&|o| o.proc_records),
    );
    add(
        "fluentbit_output_proc_bytes_total",
        "Number of processed output bytes.",
        "counter",
        per_out(&|o| o.proc_bytes),
    );
    add(
        "fluentbit_output_errors_total",
        "Number of output errors.",
        "counter",
        per_out(&|o| o.errors),
    );
    add(
        "fluentbit_output_retries_total",
        "Number of output retries.",
        "counter",
        per_out(&|o| o.retries),
    );
    add(
        "fluentbit_output_retries_failed_total",
        "Number of abandoned batches because the maximum number of re-tries was reached.",
        "counter",
        per_out(&|o| o.retries_failed),
    );
    add(
        "fluentbit_output_dropped_records_total",
        "Number of dropped records.",
        "counter",
        per_out(&|o| o.dropped_records),
    );
    add(
        "fluentbit_output_retried_records_total",
        "Number of retried records.",
        "counter",
        per_out(&|o| o.retried_records),
    );
    let start = unix_secs(s.process_start);
    add(
        "fluentbit_process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        "gauge",
        vec![(host(), Val::Int(start))],
    );
    // The recorded build_info value is the start time too (B_v2_metrics.txt), not 1.
    add(
        "fluentbit_build_info",
        "Build version information.",
        "gauge",
        vec![(
            vec![
                ("hostname", s.hostname.to_string()),
                ("version", super::VERSION.to_string()),
                ("os", "linux".to_string()),
            ],
            Val::Int(start),
        )],
    );
    let (mem, fs) = storage_chunks(s);
    add(
        "fluentbit_storage_chunks",
        "Total number of chunks in the storage layer.",
        "gauge",
        vec![(vec![], Val::Int(mem + fs))],
    );
    add(
        "fluentbit_storage_mem_chunks",
        "Total number of memory chunks.",
        "gauge",
        vec![(vec![], Val::Int(mem))],
    );
    add(
        "fluentbit_storage_fs_chunks",
        "Total number of filesystem chunks.",
        "gauge",
        vec![(vec![], Val::Int(fs))],
    );
    add(
        "fluentbit_storage_fs_chunks_up",
        "Total number of filesystem chunks up in memory.",
        "gauge",
        vec![(vec![], Val::Int(fs))],
    );
    add(
        "fluentbit_storage_fs_chunks_down",
        "Total number of filesystem chunks down.",
        "gauge",
        vec![(vec![], Val::Int(0))],
    );
    add(
        "fluentbit_input_rate_bytes",
        "Current input bytes per second.",
        "gauge",
        per_in(&|_, i| i.rate_bytes),
    );
    add(
        "fluentbit_input_rate_records",
        "Current input records per second.",
        "gauge",
        per_in(&|_, i| i.rate_records),
    );
    add(
        "fluentbit_input_rate_gate_limited",
        "Is the input rate gate currently limiting ingestion?",
        "gauge",
        per_in(&|_, _| 0),
    );
    add(
        "fluentbit_input_rate_gate_busy_chunks",
        "Busy chunks considered by the input rate gate.",
        "gauge",
        per_in(&|_, _| 0),
    );
    add(
        "fluentbit_input_rate_gate_retry_attempts",
        "Retry attempts considered by the input rate gate.",
        "gauge",
        per_in(&|_, _| 0),
    );
    add(
        "fluentbit_input_ingestion_paused",
        "Is the input paused or not?",
        "gauge",
        per_in(&|_, _| 0),
    );
    add(
        "fluentbit_input_storage_overlimit",
        "Is the input memory usage overlimit ?.",
        "gauge",
        per_in(&|_, _| 0),
    );
    add(
        "fluentbit_input_storage_memory_bytes",
        "Memory bytes used by the chunks.",
        "gauge",
        per_in(&|_, i| i.rate_bytes),
    );
    add(
        "fluentbit_input_storage_chunks",
        "Total number of chunks.",
        "gauge",
        per_in(&|_, i| u64::from(i.records > 0)),
    );
    add(
        "fluentbit_input_storage_chunks_up",
        "Total number of chunks up in memory.",
        "gauge",
        per_in(&|_, i| u64::from(i.records > 0)),
    );
    add(
        "fluentbit_input_storage_chunks_down",
        "Total number of chunks down.",
        "gauge",
        per_in(&|_, _| 0),
    );
    add(
        "fluentbit_input_storage_chunks_busy",
        "Total number of chunks in a busy state.",
        "gauge",
        per_in(&|_, _| 0),
    );
    add(
        "fluentbit_input_storage_chunks_busy_bytes",
        "Total number of bytes used by chunks in a busy state.",
        "gauge",
        per_in(&|_, _| 0),
    );
    add(
        "fluentbit_output_upstream_total_connections",
        "Total Connection count.",
        "gauge",
        per_out(&|_| 0),
    );
    add(
        "fluentbit_output_upstream_busy_connections",
        "Busy Connection count.",
        "gauge",
        per_out(&|_| 0),
    );
    add(
        "fluentbit_output_chunk_available_capacity_percent",
        "Available chunk capacity (percent)",
        "gauge",
        per_out(&|_| 100),
    );
    // One flush per second per route: every batch lands in the 1.0-1.5 s bucket, as most do
    // in B_v2_metrics.txt.
    let latency = routed
        .iter()
        .filter(|r| r.flushes > 0)
        .map(|r| {
            let counts = LATENCY_BOUNDS
                .iter()
                .map(|b| if *b >= 1.5 { r.flushes } else { 0 })
                .collect();
            (
                route_labels(r),
                Val::Hist {
                    bounds: LATENCY_BOUNDS,
                    counts,
                    sum: r.flushes as f64 * 1.0003,
                    count: r.flushes,
                },
            )
        })
        .collect();
    add(
        "fluentbit_output_latency_seconds",
        "End-to-end latency in seconds",
        "histogram",
        latency,
    );
    let backpressure = outs
        .iter()
        .zip(s.outputs)
        .filter(|(_, o)| o.retries > 0)
        .map(|(n, o)| {
            let counts = BACKPRESSURE_BOUNDS
                .iter()
                .map(|b| if *b >= 15.0 { o.retries } else { 0 })
                .collect();
            (
                vec![("output", n.to_string())],
                Val::Hist {
                    bounds: BACKPRESSURE_BOUNDS,
                    counts,
                    sum: o.retries as f64 * 7.0,
                    count: o.retries,
                },
            )
        })
        .collect();
    add(
        "fluentbit_output_backpressure_wait_seconds",
        "Output backpressure wait in seconds",
        "histogram",
        backpressure,
    );
    fams
}

fn labels(l: &[(&str, String)]) -> String {
    if l.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{{{}}}", inner.join(","))
}

/// `%g`-style bound as cmetrics prints it in text (`0.5`, `1`, `+Inf`).
fn short(b: f64) -> String {
    if b.fract() == 0.0 {
        format!("{}", b as i64)
    } else {
        format!("{b}")
    }
}

/// Prometheus `le` as cmetrics prints it (`0.5`, `1.0`, `30.0`).
fn le(b: f64) -> String {
    if b.fract() == 0.0 {
        format!("{b:.1}")
    } else {
        format!("{b}")
    }
}

/// cmetrics text: `TIMESTAMP name{labels} = value` (B_v2_metrics.txt).
pub fn v2_text(s: &Snapshot, now: SystemTime) -> String {
    let ts = iso_nanos(now);
    let mut out = String::new();
    for f in v2_families(s) {
        for (l, v) in &f.samples {
            let value = match v {
                Val::Int(n) => n.to_string(),
                Val::Hist {
                    bounds,
                    counts,
                    sum,
                    count,
                } => {
                    let mut b: Vec<String> = bounds
                        .iter()
                        .zip(counts)
                        .map(|(b, c)| format!("{}={c}", short(*b)))
                        .collect();
                    b.push(format!("+Inf={count}"));
                    format!(
                        "{{ buckets = {{ {} }}, sum={}, count={count} }}",
                        b.join(", "),
                        format_sum(*sum)
                    )
                }
            };
            out.push_str(&format!("{ts} {}{} = {value}\n", f.name, labels(l)));
        }
    }
    out
}

fn format_sum(v: f64) -> String {
    let s = format!("{v:.5}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Prometheus text of the same families (B_v2_metrics_prometheus.txt; the
/// prometheus_exporter output serves the same layout, B_prometheus_exporter_2021.txt).
pub fn v2_prometheus(s: &Snapshot) -> String {
    let mut out = String::new();
    for f in v2_families(s) {
        if f.samples.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "# HELP {} {}\n# TYPE {} {}\n",
            f.name, f.help, f.name, f.kind
        ));
        for (l, v) in &f.samples {
            match v {
                Val::Int(n) => out.push_str(&format!("{}{} {n}\n", f.name, labels(l))),
                Val::Hist {
                    bounds,
                    counts,
                    sum,
                    count,
                } => {
                    let rest: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                    let rest = rest.join(",");
                    for (b, c) in bounds.iter().zip(counts) {
                        out.push_str(&format!(
                            "{}_bucket{{le=\"{}\",{rest}}} {c}\n",
                            f.name,
                            le(*b)
                        ));
                    }
                    out.push_str(&format!(
                        "{}_bucket{{le=\"+Inf\",{rest}}} {count}\n",
                        f.name
                    ));
                    out.push_str(&format!("{}_sum{} {sum}\n", f.name, labels(l)));
                    out.push_str(&format!("{}_count{} {count}\n", f.name, labels(l)));
                }
            }
        }
    }
    out
}

fn fs_input(s: &Snapshot, idx: usize) -> bool {
    s.cfg
        .of(Kind::Input)
        .nth(idx)
        .and_then(|p| p.prop("storage.type"))
        .is_some_and(|t| t.eq_ignore_ascii_case("filesystem"))
}

fn storage_chunks(s: &Snapshot) -> (u64, u64) {
    let (mut mem, mut fs) = (0, 0);
    for (i, st) in s.inputs.iter().enumerate() {
        if st.records > 0 {
            if fs_input(s, i) {
                fs += 1;
            } else {
                mem += 1;
            }
        }
    }
    (mem, fs)
}

fn size(b: u64) -> String {
    if b >= 1024 {
        format!("{:.1}K", b as f64 / 1024.0)
    } else {
        format!("{b}b")
    }
}

/// `/api/v1/storage` in the recorded shape; one chunk per input that has data. With
/// `storage.path` set the backlog input appears too (E_v1_storage_filesystem.json).
pub fn storage_json(s: &Snapshot) -> String {
    let (mem, fs) = storage_chunks(s);
    let layer = Obj::new().raw(
        "chunks",
        Obj::new()
            .num("total_chunks", mem + fs)
            .num("mem_chunks", mem)
            .num("fs_chunks", fs)
            .num("fs_chunks_up", fs)
            .num("fs_chunks_down", 0)
            .build(),
    );
    let chunk = |name: &str, bytes: u64, n: u64| {
        (
            name.to_string(),
            Obj::new()
                .raw(
                    "status",
                    Obj::new()
                        .raw("overlimit", "false")
                        .str("mem_size", &size(bytes))
                        .str("mem_limit", "0b")
                        .build(),
                )
                .raw(
                    "chunks",
                    Obj::new()
                        .num("total", n)
                        .num("up", n)
                        .num("down", 0)
                        .num("busy", 0)
                        .str("busy_size", "0b")
                        .build(),
                )
                .build(),
        )
    };
    let mut inputs = Obj::new();
    for (name, st) in s.input_names().iter().zip(s.inputs) {
        let (k, v) = chunk(name, st.rate_bytes, u64::from(st.records > 0));
        inputs.push(&k, v);
    }
    if s.cfg.service("storage.path").is_some() {
        let n = s.cfg.of(Kind::Input).count();
        let (k, v) = chunk(&format!("storage_backlog.{n}"), 0, 0);
        inputs.push(&k, v);
    }
    Obj::new()
        .raw("storage_layer", layer.build())
        .raw("input_chunks", inputs.build())
        .build()
}

/// Health as `api/v1/health.c` computes it (fluent-agents.md §2.2): the newest sample of
/// summed output errors / retries_failed against the oldest one kept (HC_Period samples);
/// unhealthy when either delta is strictly greater than its limit; healthy with no samples.
pub struct Health {
    pub ok: bool,
    pub errors: u64,
    pub retries_failed: u64,
}

pub fn health(samples: &VecDeque<(u64, u64)>, error_limit: i64, retry_limit: i64) -> Health {
    let (errors, retries_failed) = match (samples.front(), samples.back()) {
        (Some(a), Some(b)) => (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1)),
        _ => (0, 0),
    };
    let ok = (errors as i64) <= error_limit && (retries_failed as i64) <= retry_limit;
    Health {
        ok,
        errors,
        retries_failed,
    }
}
