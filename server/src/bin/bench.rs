//! `flotilla-bench`: a load benchmark (not a test). It connects N simulated Fluent Bit agents over
//! OpAMP WebSocket to a Flotilla server, heartbeats each on a fixed interval, queues restart
//! commands through the REST API during a steady-state window, and reports server RSS per agent,
//! heartbeat replies per second, queue-to-agent delivery latency and server CPU use.
//!
//! By default it starts `flotilla serve` itself (the binary next to this one) on free loopback
//! ports with a throw-away data directory, so one command does everything once both binaries
//! are built (`cargo run --bin flotilla-bench` builds only the bench, hence the first line):
//!
//! ```text
//! cargo build --release -p flotilla-server
//! cargo run --release -p flotilla-server --bin flotilla-bench -- --agents 10000
//! ```
//!
//! `--server-url/--api-url/--token/--server-pid` point it at a server that is already running.
//! The last line of stdout is one JSON object with every figure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use flotilla_proto::framing::{decode_ws, encode_ws};
use flotilla_proto::{
    caps, kv_str, AgentCapabilities, AgentDescription, AgentDisconnect, AgentToServer,
    ServerToAgent,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[path = "bench/chat.rs"]
mod chat;
#[path = "bench/console.rs"]
mod console;

/// What the simulated agents declare: ReportsStatus | AcceptsRestartCommand | ReportsHeartbeat.
const AGENT_CAPS: u64 = AgentCapabilities::ReportsStatus as u64
    | AgentCapabilities::AcceptsRestartCommand as u64
    | AgentCapabilities::ReportsHeartbeat as u64;

/// Loopback connections per source address: the ephemeral port range is ~28k wide, so past this
/// the agents spread over 127.0.0.2, 127.0.0.3, ...
const AGENTS_PER_SOURCE_IP: usize = 25_000;

/// File descriptors beyond one per agent, for listeners, the database, logs and REST calls.
const FD_MARGIN: u64 = 512;

/// Set in the environment when the bench re-executes itself under a raised `ulimit -n`, so it
/// never loops.
const REEXEC_ENV: &str = "FLOTILLA_BENCH_REEXEC";

/// Linux reports utime/stime in USER_HZ ticks, which is 100 on every supported architecture
/// (reading it via sysconf would need libc).
const USER_HZ: f64 = 100.0;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "flotilla-bench",
    version,
    about = "Load benchmark: N simulated OpAMP WebSocket agents against a Flotilla server"
)]
struct Args {
    /// Number of simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Seconds between two heartbeats of one agent.
    #[arg(long, default_value_t = 10)]
    interval_secs: u64,
    /// Length of the steady-state measurement window, seconds.
    #[arg(long, default_value_t = 30)]
    duration_secs: u64,
    /// Restart commands queued during the window (each to a different agent).
    #[arg(long, default_value_t = 200)]
    commands: usize,
    /// Agents connected at once; the next batch starts when this one has reported.
    #[arg(long, default_value_t = 500)]
    ramp: usize,
    /// Pause between "all connected" and the start of the window, seconds.
    #[arg(long, default_value_t = 3)]
    settle_secs: u64,
    /// After the window, how long to wait for commands still in flight, seconds.
    #[arg(long, default_value_t = 10)]
    grace_secs: u64,
    /// OpAMP WebSocket URL of an already running server (e.g. ws://127.0.0.1:4320/v1/opamp).
    /// Without it the bench starts its own server.
    #[arg(long, requires = "api_url")]
    server_url: Option<String>,
    /// REST base URL of that server (e.g. http://127.0.0.1:8080).
    #[arg(long, requires = "server_url")]
    api_url: Option<String>,
    /// Bearer token (operator or admin) for the external server's REST API.
    #[arg(long, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Pid of the external server, to read its RSS and CPU time from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// `flotilla` binary to start (default: the one next to this executable).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Log level of the started server.
    #[arg(long, default_value = "info")]
    server_log_level: String,
    /// Keep the started server's data directory (database, log) instead of deleting it.
    #[arg(long)]
    keep_data: bool,
    /// Web consoles (signed in with the token) that hold the live-update stream open while
    /// the agents connect; afterwards the fleet page and a search are timed. With `--ramp`
    /// equal to `--agents` the connect is a reconnect storm. 0: no console measurements.
    #[arg(long, default_value_t = 0)]
    consoles: usize,
    /// After the agents have connected (and registered), drop every connection without a
    /// goodbye and reconnect all agents at once under their uids, as after a server restart
    /// or a network cut; the consoles watch that reconnect instead of the first connect.
    #[arg(long)]
    reconnect_storm: bool,
    /// Fan-out phase after the window: the first N agents (hosts `fan-*`; the others are
    /// `bench-*`) get one restart command through one query (`POST /api/v1/commands`) and
    /// answer it at once with a new start time, which settles it. Reported: time from the
    /// request's answer until all are `sent` (the batch's counts, polled) and received by the
    /// agents, until all are settled, and the other agents' heartbeat round trips meanwhile.
    #[arg(long, default_value_t = 0)]
    fanout: usize,
    /// Chat phase (after the fan-out; only with a server the bench starts): the Slack gateway
    /// against a fake Slack Web API on loopback; N signed slash commands (`agent <host>`) timed
    /// to the HTTP ack and to the answer posted, then `--chat-restarts` restarts of single
    /// agents timed from the slash command through the Confirm click to the agent. 0: none.
    #[arg(long, default_value_t = 0)]
    chat: usize,
    /// Restarts in the chat phase (each to a different agent).
    #[arg(long, default_value_t = 50)]
    chat_restarts: usize,
    /// Alert storm (after the chat phase; needs `--chat`): a channel subscribes to
    /// `state:offline`, then every agent says goodbye at once; reports the messages the channel
    /// got and the time from the goodbyes to the last one. The server is then stopped with no
    /// agents connected.
    #[arg(long)]
    alert_storm: bool,
}

// ---------------------------------------------------------------------------------------------
// Shared state between the agent tasks and the driver.

/// Counters and per-agent slots. Per-agent slots are atomics so the driver and 10k agent tasks
/// never contend on a lock in the hot path.
struct Shared {
    epoch: Instant,
    uids: Vec<Mutex<Uuid>>,
    /// Nanoseconds since `epoch` just before the command POST for agent i (0: none queued).
    cmd_posted_ns: Vec<AtomicU64>,
    /// Nanoseconds since `epoch` when agent i received a ServerToAgent with `command` set.
    cmd_recv_ns: Vec<AtomicU64>,
    sent: AtomicU64,
    replies: AtomicU64,
    commands_received: AtomicU64,
    /// Heartbeats that got no reply before the next one was due.
    unanswered: AtomicU64,
    server_errors: AtomicU64,
    full_state_requests: AtomicU64,
    uid_reassigned: AtomicU64,
    /// Connections lost after the agent had reported (before the bench stopped anything).
    dropped: AtomicU64,
    /// True while the steady-state window runs: heartbeat round trips are recorded only then.
    measuring: AtomicBool,
    /// True once the bench is stopping the server: closes are then expected, not "dropped".
    stopping: AtomicBool,
    closed_at_stop_with_frame: AtomicU64,
    closed_at_stop_without_frame: AtomicU64,
    rtt_us: Mutex<Vec<u32>>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Agents `0..fanout` are the fan-out's targets.
    fanout: usize,
    /// True while the fan-out phase runs.
    fan_active: AtomicBool,
    /// Nanoseconds since `epoch` when agent i received the fan-out's command (0: not yet).
    fan_recv_ns: Vec<AtomicU64>,
    /// Heartbeat round trips of agents outside the fan-out, during it.
    fan_rtt_us: Mutex<Vec<u32>>,
}

impl Shared {
    fn new(n: usize, fanout: usize) -> Shared {
        Shared {
            epoch: Instant::now(),
            uids: (0..n).map(|_| Mutex::new(Uuid::new_v4())).collect(),
            cmd_posted_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            cmd_recv_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            sent: AtomicU64::new(0),
            replies: AtomicU64::new(0),
            commands_received: AtomicU64::new(0),
            unanswered: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            full_state_requests: AtomicU64::new(0),
            uid_reassigned: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            measuring: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            closed_at_stop_with_frame: AtomicU64::new(0),
            closed_at_stop_without_frame: AtomicU64::new(0),
            rtt_us: Mutex::new(Vec::new()),
            errors: Mutex::new(BTreeMap::new()),
            fanout,
            fan_active: AtomicBool::new(false),
            fan_recv_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            fan_rtt_us: Mutex::new(Vec::new()),
        }
    }

    fn now_ns(&self) -> u64 {
        // Never 0, so 0 can mean "not set" in the per-agent slots.
        (self.epoch.elapsed().as_nanos() as u64).max(1)
    }

    fn uid(&self, i: usize) -> Uuid {
        *self.uids[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts an error by its message, so the report shows each distinct failure once.
    fn note(&self, what: &str, detail: impl std::fmt::Display) {
        let mut key = format!("{what}: {detail}");
        if key.len() > 200 {
            let mut cut = 200;
            while !key.is_char_boundary(cut) {
                cut -= 1;
            }
            key.truncate(cut);
        }
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }
}

/// Where the server is.
#[derive(Clone)]
struct Target {
    ws_url: String,
    /// host:port of the OpAMP listener, for the raw TCP connect.
    ws_addr: String,
    api_addr: String,
    api_prefix: String,
    token: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The fan-out phase.

/// One restart to agents `0..sh.fanout` through one query, timed from the request's answer:
/// until the batch has nothing queued (every command claimed `sent`; its counts polled every
/// 20 ms), until every target received it, and until every command settled. Heartbeats of
/// the other agents are timed meanwhile.
async fn fan_out(sh: &Arc<Shared>, target: &Target, pid: Option<u32>) -> anyhow::Result<Value> {
    let n = sh.fanout;
    eprintln!("bench: fan-out: one restart to {n} agents (host:fan-*)");
    sh.fan_rtt_us
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    sh.fan_active.store(true, Ordering::Relaxed);
    let cpu0 = pid.map(proc_cpu_secs).transpose()?;
    let t_post = Instant::now();
    let (code, body) = http(
        &target.api_addr,
        "POST",
        &format!("{}/api/v1/commands", target.api_prefix),
        target.token.as_deref(),
        Some(r#"{"query":"host:fan-*","kind":"restart","params":{}}"#),
    )
    .await?;
    let t_answer = Instant::now();
    if code != 202 {
        sh.fan_active.store(false, Ordering::Relaxed);
        bail!("fan-out POST answered {code}: {}", body.trim());
    }
    let v: Value = serde_json::from_str(&body).context("fan-out answer")?;
    let batch = v["batch_id"]
        .as_str()
        .context("fan-out answer without batch_id")?
        .to_string();
    let queued = v["queued"].as_u64().unwrap_or(0);
    let path = format!("{}/api/v1/batches/{batch}", target.api_prefix);
    let answer_ns = t_answer.duration_since(sh.epoch).as_nanos() as u64;
    let since_answer = |at: Instant| at.duration_since(t_answer).as_secs_f64() * 1000.0;
    let (mut all_sent, mut all_settled) = (None, None);
    let mut poll_ms = Vec::new();
    let mut last = Value::Null;
    let deadline = t_answer + Duration::from_secs(120);
    while all_settled.is_none() && Instant::now() < deadline {
        let t = Instant::now();
        let (code, body) = http(
            &target.api_addr,
            "GET",
            &path,
            target.token.as_deref(),
            None,
        )
        .await?;
        let at = Instant::now();
        poll_ms.push(at.duration_since(t).as_secs_f64() * 1000.0);
        if code != 200 {
            sh.note("GET batch", format!("HTTP {code}"));
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        last = serde_json::from_str(&body).unwrap_or(Value::Null);
        let queued_now = last["counts"]["queued"].as_u64().unwrap_or(0);
        if all_sent.is_none() && queued_now == 0 {
            all_sent = Some(since_answer(t));
        }
        if last["done"].as_u64() == Some(queued) {
            all_settled = Some(since_answer(t));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu1 = pid.map(proc_cpu_secs).transpose()?;
    let wall = t_post.elapsed().as_secs_f64();
    sh.fan_active.store(false, Ordering::Relaxed);
    let recv: Vec<u64> = (0..n)
        .map(|i| sh.fan_recv_ns[i].load(Ordering::Relaxed))
        .filter(|ns| *ns != 0)
        .collect();
    let received_all = (recv.len() == n)
        .then(|| {
            recv.iter()
                .max()
                .map(|m| m.saturating_sub(answer_ns) as f64 / 1e6)
        })
        .flatten();
    let rtt = std::mem::take(&mut *sh.fan_rtt_us.lock().unwrap_or_else(|e| e.into_inner()));
    let r1 = |x: f64| (x * 10.0).round() / 10.0;
    Ok(json!({
        "targets": n, "queued": queued,
        "post_ms": r1(t_answer.duration_since(t_post).as_secs_f64() * 1000.0),
        "all_sent_after_answer_ms": all_sent.map(r1),
        "all_received_after_answer_ms": received_all.map(r1),
        "received": recv.len(),
        "all_settled_after_answer_ms": all_settled.map(r1),
        "final_counts": last["counts"],
        "batch_poll": ms_stats(poll_ms),
        "other_agents_heartbeat_rtt": ms_stats(rtt.into_iter().map(|u| u as f64 / 1000.0).collect()),
        "server_cpu_ratio": match (cpu0, cpu1) { (Some(a), Some(b)) => Some(r1((b - a) / wall * 10.0) / 10.0), _ => None },
    }))
}

// ---------------------------------------------------------------------------------------------
// One simulated agent.

/// The first message, and the answer to ReportFullState: everything a status-reporting Fluent
/// Bit agent tells about itself.
fn full_status(sh: &Shared, i: usize, uid: Uuid, seq: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.as_bytes().to_vec(),
        sequence_num: seq,
        capabilities: AGENT_CAPS,
        agent_description: Some(AgentDescription {
            identifying_attributes: vec![
                kv_str("service.name", "fluent-bit"),
                kv_str("service.version", "3.2.0"),
                kv_str("service.instance.id", &uid.to_string()),
            ],
            non_identifying_attributes: vec![
                kv_str("host.name", &host_name(sh, i)),
                kv_str("os.type", "linux"),
                kv_str("host.arch", "amd64"),
                kv_str("deployment.environment", "bench"),
            ],
        }),
        ..Default::default()
    }
}

/// `fan-{i}` for the fan-out's targets, `bench-{i}` for the others.
fn host_name(sh: &Shared, i: usize) -> String {
    if i < sh.fanout {
        format!("fan-{i}")
    } else {
        format!("bench-{i}")
    }
}

/// What an agent that restarted at once reports: healthy, started now (wall clock), which
/// settles a restart queued before.
fn restarted(uid: Uuid, seq: u64) -> AgentToServer {
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    AgentToServer {
        instance_uid: uid.as_bytes().to_vec(),
        sequence_num: seq,
        capabilities: AGENT_CAPS,
        health: Some(flotilla_proto::ComponentHealth {
            healthy: true,
            start_time_unix_nano: now_ns,
            status: "running".into(),
            status_time_unix_nano: now_ns,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn heartbeat(uid: Uuid, seq: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.as_bytes().to_vec(),
        sequence_num: seq,
        capabilities: AGENT_CAPS,
        ..Default::default()
    }
}

/// Spreads first heartbeats evenly over one interval (golden-ratio sequence), so the load is
/// flat instead of arriving in per-ramp bursts.
fn phase(i: usize, interval: Duration) -> Duration {
    let frac = (i as f64 * 0.618_033_988_749_895).fract();
    interval.mul_f64(frac)
}

async fn connect(target: &Target, i: usize, n: usize) -> anyhow::Result<TcpStream> {
    let addr: std::net::SocketAddr = tokio::net::lookup_host(&target.ws_addr)
        .await?
        .next()
        .context("server address does not resolve")?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Past one source address' worth of ephemeral ports, use 127.0.0.2, .3, ... (loopback only).
    if n > AGENTS_PER_SOURCE_IP {
        if let std::net::IpAddr::V4(v4) = addr.ip() {
            if v4.is_loopback() {
                let k = (i / AGENTS_PER_SOURCE_IP).min(253) as u8;
                let src = std::net::Ipv4Addr::new(127, 0, 0, 1 + k);
                socket.bind((src, 0).into())?;
            }
        }
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Runs agent `i` until `cancel` fires or the connection ends. Sends exactly one message on
/// `ready`: Ok(time to connect and get the first reply) or Err(why it never got there).
async fn run_agent(
    i: usize,
    n: usize,
    sh: Arc<Shared>,
    target: Target,
    interval: Duration,
    cancel: CancellationToken,
    ready: mpsc::UnboundedSender<Result<Duration, String>>,
) {
    let t0 = Instant::now();
    let mut ready = Some(ready);
    let fail = |ready: &mut Option<mpsc::UnboundedSender<Result<Duration, String>>>, e: String| {
        if let Some(r) = ready.take() {
            let _ = r.send(Err(e));
        }
    };

    let stream = match tokio::time::timeout(Duration::from_secs(30), connect(&target, i, n)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(&mut ready, format!("tcp connect: {e:#}")),
        Err(_) => return fail(&mut ready, "tcp connect: timed out after 30 s".into()),
    };
    // Small buffers: tungstenite's defaults (128 KiB each) would cost the bench gigabytes at 10k.
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let hs = tokio_tungstenite::client_async_with_config(target.ws_url.as_str(), stream, Some(cfg));
    let mut ws = match tokio::time::timeout(Duration::from_secs(30), hs).await {
        Ok(Ok((ws, _resp))) => ws,
        Ok(Err(e)) => return fail(&mut ready, format!("websocket handshake: {e}")),
        Err(_) => {
            return fail(
                &mut ready,
                "websocket handshake: timed out after 30 s".into(),
            )
        }
    };

    let mut seq = 0u64;
    let mut uid = sh.uid(i);
    let first = encode_ws(&full_status(&sh, i, uid, seq));
    if let Err(e) = ws.send(WsMessage::Binary(first.into())).await {
        return fail(&mut ready, format!("send status: {e}"));
    }
    sh.sent.fetch_add(1, Ordering::Relaxed);
    let mut outstanding: Option<Instant> = None;
    let mut send_full = false;
    let mut ticker: Option<tokio::time::Interval> = None;
    let first_reply_deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(first_reply_deadline);

    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                // Normal agent shutdown: say goodbye, then close.
                seq += 1;
                let bye = AgentToServer {
                    instance_uid: uid.as_bytes().to_vec(),
                    sequence_num: seq,
                    capabilities: AGENT_CAPS,
                    agent_disconnect: Some(AgentDisconnect {}),
                    ..Default::default()
                };
                let _ = ws.send(WsMessage::Binary(encode_ws(&bye).into())).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                return;
            }
            _ = &mut first_reply_deadline, if ready.is_some() => {
                return fail(&mut ready, "no reply to the first status within 30 s".into());
            }
            _ = async { ticker.as_mut().expect("guarded").tick().await }, if ticker.is_some() => {
                if outstanding.is_some() {
                    sh.unanswered.fetch_add(1, Ordering::Relaxed);
                }
                seq += 1;
                let msg = if send_full {
                    send_full = false;
                    full_status(&sh, i, uid, seq)
                } else {
                    heartbeat(uid, seq)
                };
                if let Err(e) = ws.send(WsMessage::Binary(encode_ws(&msg).into())).await {
                    lost(&sh, "send heartbeat", e.to_string(), false);
                    return;
                }
                sh.sent.fetch_add(1, Ordering::Relaxed);
                outstanding = Some(Instant::now());
            }
            msg = ws.next() => {
                let data = match msg {
                    Some(Ok(WsMessage::Binary(b))) => b,
                    Some(Ok(WsMessage::Close(frame))) => {
                        let why = frame.map(|f| format!("{} {}", f.code, f.reason)).unwrap_or_default();
                        if ready.is_some() {
                            return fail(&mut ready, format!("closed by server before first reply: {why}"));
                        }
                        lost(&sh, "closed by server", why, true);
                        return;
                    }
                    Some(Ok(_)) => continue, // ping/pong/text: tungstenite answers pings itself
                    Some(Err(e)) => {
                        if ready.is_some() {
                            return fail(&mut ready, format!("read before first reply: {e}"));
                        }
                        lost(&sh, "read", e.to_string(), false);
                        return;
                    }
                    None => {
                        if ready.is_some() {
                            return fail(&mut ready, "connection ended before first reply".into());
                        }
                        lost(&sh, "read", "connection ended without Close frame".into(), false);
                        return;
                    }
                };
                let reply: ServerToAgent = match decode_ws(&data) {
                    Ok(m) => m,
                    Err(e) => {
                        sh.note("undecodable ServerToAgent", e);
                        continue;
                    }
                };
                if let Some(err) = &reply.error_response {
                    sh.server_errors.fetch_add(1, Ordering::Relaxed);
                    sh.note("ServerErrorResponse", format!("type {} {}", err.r#type, err.error_message));
                }
                if caps::report_full_state(reply.flags) {
                    sh.full_state_requests.fetch_add(1, Ordering::Relaxed);
                    send_full = true;
                }
                if let Some(id) = &reply.agent_identification {
                    if let Ok(new) = Uuid::from_slice(&id.new_instance_uid) {
                        sh.uid_reassigned.fetch_add(1, Ordering::Relaxed);
                        uid = new;
                        *sh.uids[i].lock().unwrap_or_else(|e| e.into_inner()) = new;
                    }
                }
                if reply.command.is_some() {
                    // A command travels in a message of its own; it is not a heartbeat reply.
                    sh.commands_received.fetch_add(1, Ordering::Relaxed);
                    if sh.fan_active.load(Ordering::Relaxed) && i < sh.fanout {
                        let _ = sh.fan_recv_ns[i].compare_exchange(
                            0, sh.now_ns(), Ordering::Relaxed, Ordering::Relaxed);
                        // Restarted at once: the new start time settles the command.
                        seq += 1;
                        let msg = encode_ws(&restarted(uid, seq));
                        if let Err(e) = ws.send(WsMessage::Binary(msg.into())).await {
                            lost(&sh, "send restart result", e.to_string(), false);
                            return;
                        }
                        sh.sent.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let _ = sh.cmd_recv_ns[i].compare_exchange(
                        0, sh.now_ns(), Ordering::Relaxed, Ordering::Relaxed);
                    continue;
                }
                sh.replies.fetch_add(1, Ordering::Relaxed);
                if let Some(r) = ready.take() {
                    let _ = r.send(Ok(t0.elapsed()));
                    let start = tokio::time::Instant::now() + phase(i, interval);
                    let mut t = tokio::time::interval_at(start, interval);
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    ticker = Some(t);
                    if send_full {
                        // The server asked for everything again: do it now, not at the next tick.
                        send_full = false;
                        seq += 1;
                        let msg = encode_ws(&full_status(&sh, i, uid, seq));
                        if let Err(e) = ws.send(WsMessage::Binary(msg.into())).await {
                            lost(&sh, "send status", e.to_string(), false);
                            return;
                        }
                        sh.sent.fetch_add(1, Ordering::Relaxed);
                    }
                } else if let Some(sent_at) = outstanding.take() {
                    let us = sent_at.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    if sh.measuring.load(Ordering::Relaxed) {
                        sh.rtt_us.lock().unwrap_or_else(|e| e.into_inner()).push(us);
                    }
                    if sh.fan_active.load(Ordering::Relaxed) && i >= sh.fanout {
                        sh.fan_rtt_us.lock().unwrap_or_else(|e| e.into_inner()).push(us);
                    }
                }
            }
        }
    }
}

/// Records a connection that ended after the agent had reported.
fn lost(sh: &Shared, what: &str, detail: String, with_close_frame: bool) {
    if sh.stopping.load(Ordering::Relaxed) {
        if with_close_frame {
            sh.closed_at_stop_with_frame.fetch_add(1, Ordering::Relaxed);
        } else {
            sh.closed_at_stop_without_frame
                .fetch_add(1, Ordering::Relaxed);
            sh.note(&format!("at server stop, {what}"), detail);
        }
    } else {
        sh.dropped.fetch_add(1, Ordering::Relaxed);
        sh.note(what, detail);
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 client for the few REST calls (keeps the bench free of an HTTP client crate).

/// Splits `scheme://host:port/path` into (host:port, path without trailing slash).
fn split_url(url: &str, schemes: &[&str]) -> anyhow::Result<(String, String)> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("{url:?} is not a URL"))?;
    if !schemes.contains(&scheme) {
        bail!("{url:?}: scheme must be one of {schemes:?} (TLS is not supported by the bench)");
    }
    let (host, path) = match rest.find('/') {
        Some(p) => (&rest[..p], &rest[p..]),
        None => (rest, ""),
    };
    if !host.contains(':') {
        bail!("{url:?}: give the port explicitly");
    }
    Ok((host.to_string(), path.trim_end_matches('/').to_string()))
}

/// One request on a fresh connection (`Connection: close`, so the body ends at EOF).
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let body = body
        .filter(|b| !b.is_empty())
        .map(|b| ("application/json", b));
    let r = console::request(addr, method, path, &headers, body).await?;
    Ok((r.status, r.body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// /proc readings.

/// (VmRSS, VmHWM, Threads) of `pid`, sizes in KiB.
fn proc_status(pid: u32) -> anyhow::Result<(u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:"), field("Threads:")))
}

/// utime + stime of `pid` in seconds.
fn proc_cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; fields after its closing ')' are fixed.
    let after = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at indices 11 and 12.
    let ticks = |k: usize| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok((ticks(11) + ticks(12)) as f64 / USER_HZ)
}

/// Soft and hard RLIMIT_NOFILE of `pid` ("unlimited" reads as u64::MAX).
fn nofile_limits(pid: &str) -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no 'Max open files' in limits")?;
    let nums: Vec<u64> = line["Max open files".len()..]
        .split_whitespace()
        .take(2)
        .map(|v| v.parse().unwrap_or(u64::MAX))
        .collect();
    Ok((nums[0], nums[1]))
}

/// Makes sure this process (and so the server it starts, which inherits the limit) may open
/// `need` files. std cannot call setrlimit, so when the soft limit is too low but the hard limit
/// allows it, the bench re-executes itself through `sh -c 'ulimit -n ...'`; otherwise it fails
/// with the command to run.
fn ensure_fd_limit(need: u64) -> anyhow::Result<()> {
    let (soft, hard) = nofile_limits("self")?;
    if soft >= need {
        return Ok(());
    }
    if hard < need {
        bail!(
            "need {need} open files but the hard limit is {hard}; raise it (e.g. \
             /etc/security/limits.conf or `prlimit`) or use fewer --agents"
        );
    }
    if std::env::var_os(REEXEC_ENV).is_some() {
        bail!("need {need} open files; soft limit is still {soft} after `ulimit -n`; run the bench under `ulimit -n {need}`");
    }
    let exe = std::env::current_exe()?;
    let target = hard.min(need.max(65_536));
    eprintln!("bench: raising the open-files limit from {soft} to {target} (re-exec via sh)");
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg("ulimit -n \"$0\" && exec \"$@\"")
        .arg(target.to_string())
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(REEXEC_ENV, "1")
        .exec();
    Err(err).context("re-exec under a raised ulimit -n")
}

/// System-wide TCP accept-queue overflows (`TcpExt: ListenOverflows`): a SYN dropped because a
/// listener's backlog was full costs the client a 1 s retransmit, which shows as setup latency.
fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The 1-minute load average: the machine may be shared, and other work skews every figure.
fn loadavg1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn mem_total_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// The server the bench starts.

struct OwnServer {
    child: Child,
    dir: PathBuf,
    keep: bool,
}

impl OwnServer {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// SIGTERM, then wait up to `limit` for a graceful exit; returns how long it took (None:
    /// it had to be killed).
    fn stop(&mut self, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        while t.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        // On any early exit the server must not outlive the bench.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Writes a secret file owner-only: `flotilla serve` refuses secret files other users can read.
pub(crate) fn private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

fn free_port() -> anyhow::Result<u16> {
    // Bind-and-release: racy in theory, fine on a quiet loopback.
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The chat gateway of a started server: its listener and the fake Slack it posts to.
struct ChatRig {
    fake: chat::FakeSlack,
    fake_url: String,
    addr: String,
    secret: String,
}

fn start_server(
    args: &Args,
    fake: Option<(chat::FakeSlack, String)>,
) -> anyhow::Result<(OwnServer, Target, Option<ChatRig>)> {
    let exe = std::env::current_exe()?;
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => exe
            .parent()
            .context("bench executable has no directory")?
            .join("flotilla"),
    };
    if !bin.is_file() {
        bail!(
            "{} not found: build it first with `cargo build --release -p flotilla-server` \
             (cargo run --bin flotilla-bench builds only the bench), or pass --server-bin",
            bin.display()
        );
    }
    if args.server_bin.is_none() {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if let (Some(s), Some(b)) = (mtime(&bin), mtime(&exe)) {
            if s < b {
                eprintln!(
                    "bench: note: {} is older than the bench; if server code changed, run \
                     `cargo build --release -p flotilla-server` first",
                    bin.display()
                );
            }
        }
    }
    let dir = std::env::temp_dir().join(format!(
        "flotilla-bench-{}-{}",
        std::process::id(),
        Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    let token = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let tokens = dir.join("tokens");
    private(&tokens, &format!("bench admin {token}\n"))?;
    let opamp_port = free_port()?;
    let api_port = free_port()?;
    let cfg = dir.join("flotilla.toml");
    let mut chat_toml = String::new();
    let chat = match fake {
        Some((fake, fake_url)) => {
            let port = free_port()?;
            let secret = Uuid::new_v4().simple().to_string();
            chat_toml = chat::config_toml(&dir, port, &fake_url, &secret);
            Some(ChatRig {
                fake,
                fake_url,
                addr: format!("127.0.0.1:{port}"),
                secret,
            })
        }
        None => None,
    };
    // JSON logs: no ANSI codes, and the bench can count warnings and errors by level.
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {data:?}\n\n[opamp]\nlisten = \"127.0.0.1:{opamp_port}\"\n\
             heartbeat_interval_s = {hb}\n\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n\
             tokens_file = {tokens:?}\n\n[log]\nformat = \"json\"\nlevel = {level:?}\n",
            data = dir.join("data"),
            hb = args.interval_secs,
            level = args.server_log_level,
        ) + &chat_toml,
    )?;
    let log = std::fs::File::create(dir.join("server.log"))?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("serve")
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Settings come from the file only, not from the caller's FLOTILLA_* environment.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLOTILLA_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let server = OwnServer {
        child,
        dir,
        keep: args.keep_data,
    };
    let target = Target {
        ws_url: format!("ws://127.0.0.1:{opamp_port}/v1/opamp"),
        ws_addr: format!("127.0.0.1:{opamp_port}"),
        api_addr: format!("127.0.0.1:{api_port}"),
        api_prefix: String::new(),
        token: Some(token),
    };
    Ok((server, target, chat))
}

/// Waits until the REST API answers /healthz with 200 and the OpAMP port accepts connections.
async fn wait_ready(target: &Target, server: &mut Option<OwnServer>) -> anyhow::Result<()> {
    let t = Instant::now();
    let health = format!("{}/healthz", target.api_prefix);
    let mut last = String::new();
    while t.elapsed() < Duration::from_secs(30) {
        if let Some(s) = server.as_mut() {
            if let Ok(Some(status)) = s.child.try_wait() {
                let log = std::fs::read_to_string(s.log_path()).unwrap_or_default();
                bail!("server exited at start ({status}); its log:\n{log}");
            }
        }
        match http(&target.api_addr, "GET", &health, None, None).await {
            Ok((200, _)) if TcpStream::connect(&target.ws_addr).await.is_ok() => return Ok(()),
            Ok((code, body)) => last = format!("GET {health}: HTTP {code} {body}"),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("server not ready after 30 s (last: {last})")
}

/// Counts the server log's lines by level and keeps the first few distinct warnings/errors.
fn scan_log(path: &Path) -> (BTreeMap<String, u64>, Vec<String>) {
    let mut levels = BTreeMap::new();
    let mut samples: Vec<String> = Vec::new();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for line in text.lines() {
        let (level, msg) = match serde_json::from_str::<Value>(line) {
            // The JSON shape is flat: `message` and the event's fields beside `level`.
            Ok(v) => (
                v["level"].as_str().unwrap_or("?").to_string(),
                format!("{} {}", v["message"].as_str().unwrap_or(""), v),
            ),
            Err(_) => ("unparsed".to_string(), line.to_string()),
        };
        *levels.entry(level.clone()).or_default() += 1;
        if matches!(level.as_str(), "WARN" | "ERROR" | "unparsed") && samples.len() < 8 {
            let short: String = msg.chars().take(300).collect();
            if !samples.iter().any(|s| s.ends_with(&short)) {
                samples.push(format!("{level}: {short}"));
            }
        }
    }
    (levels, samples)
}

// ---------------------------------------------------------------------------------------------
// Statistics.

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms_stats(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let r = |x: Option<f64>| x.map(|x| (x * 100.0).round() / 100.0);
    json!({
        "n": v.len(),
        "p50_ms": r(pct(&v, 50.0)),
        "p99_ms": r(pct(&v, 99.0)),
        "max_ms": r(v.last().copied()),
    })
}

fn fmt_ms(s: &Value) -> String {
    let f = |k: &str| {
        s[k].as_f64()
            .map(|x| format!("{x:.1} ms"))
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "p50 {}  p99 {}  max {}  (n={})",
        f("p50_ms"),
        f("p99_ms"),
        f("max_ms"),
        s["n"]
    )
}

// ---------------------------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.agents == 0 || args.interval_secs == 0 || args.duration_secs == 0 || args.ramp == 0 {
        bail!("--agents, --interval-secs, --duration-secs and --ramp must be at least 1");
    }
    ensure_fd_limit(args.agents as u64 + FD_MARGIN)?;
    if cfg!(debug_assertions) {
        eprintln!(
            "bench: warning: this is a debug build; figures are not representative (use --release)"
        );
    }
    // Two worker threads: enough for the simulated fleet, and the machine is shared with the
    // server being measured.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (summary, json) = rt.block_on(bench(args))?;
    println!("{summary}");
    println!("{json}");
    Ok(())
}

/// Starts agents `0..n` in batches of `ramp` (the next batch when this one has reported).
/// Returns the agent tasks, which agents reported, their set-up times and the failures.
async fn connect_all(
    sh: &Arc<Shared>,
    target: &Target,
    interval: Duration,
    cancel: &CancellationToken,
    n: usize,
    ramp: usize,
) -> (Vec<JoinHandle<()>>, Vec<bool>, Vec<f64>, usize) {
    let mut tasks = Vec::with_capacity(n);
    let mut connected = vec![false; n];
    let mut setup_ms = Vec::with_capacity(n);
    let mut connect_failures = 0usize;
    let ramp_t = Instant::now();
    let mut start = 0;
    while start < n {
        let end = (start + ramp).min(n);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut idx = Vec::with_capacity(end - start);
        for i in start..end {
            let (tx1, mut rx1) = mpsc::unbounded_channel();
            tasks.push(tokio::spawn(run_agent(
                i,
                n,
                sh.clone(),
                target.clone(),
                interval,
                cancel.clone(),
                tx1,
            )));
            // Funnel the per-agent answers into one channel tagged with the agent index.
            let tx = tx.clone();
            tokio::spawn(async move {
                let r = rx1
                    .recv()
                    .await
                    .unwrap_or(Err("agent task ended silently".into()));
                let _ = tx.send((i, r));
            });
            idx.push(i);
        }
        drop(tx);
        while let Some((i, r)) = rx.recv().await {
            match r {
                Ok(d) => {
                    connected[i] = true;
                    setup_ms.push(d.as_secs_f64() * 1000.0);
                }
                Err(e) => {
                    connect_failures += 1;
                    sh.note("connect", e);
                }
            }
        }
        eprintln!(
            "bench: {end}/{n} agents started, {} reported, {connect_failures} failed ({:.1} s)",
            setup_ms.len(),
            ramp_t.elapsed().as_secs_f64()
        );
        start = end;
    }
    (tasks, connected, setup_ms, connect_failures)
}

async fn bench(args: Args) -> anyhow::Result<(String, Value)> {
    let n = args.agents;
    let interval = Duration::from_secs(args.interval_secs);
    let window = Duration::from_secs(args.duration_secs);

    // --- the server
    if args.chat > 0 && args.server_url.is_some() {
        bail!("--chat needs a server the bench starts (it configures the Slack gateway)");
    }
    if args.alert_storm && args.chat == 0 {
        bail!("--alert-storm needs --chat (the Slack gateway the alerts are posted through)");
    }
    let mut chat_rig = None;
    let (mut own, target, pid) = match (&args.server_url, &args.api_url) {
        (Some(ws), Some(api)) => {
            let (ws_addr, _) = split_url(ws, &["ws"])?;
            let (api_addr, api_prefix) = split_url(api, &["http"])?;
            if let Some(pid) = args.server_pid {
                if let Ok((soft, _)) = nofile_limits(&pid.to_string()) {
                    if soft < n as u64 + FD_MARGIN {
                        eprintln!("bench: warning: server pid {pid} may open only {soft} files; {n} agents need about {}", n as u64 + FD_MARGIN);
                    }
                }
            }
            let t = Target {
                ws_url: ws.clone(),
                ws_addr,
                api_addr,
                api_prefix,
                token: args.token.clone(),
            };
            (None, t, args.server_pid)
        }
        _ => {
            let fake = match args.chat {
                0 => None,
                _ => Some(chat::FakeSlack::start().await?),
            };
            let (s, t, c) = start_server(&args, fake)?;
            chat_rig = c;
            let pid = s.pid();
            eprintln!(
                "bench: started server pid {pid}: opamp {} api {} (data in {})",
                t.ws_url,
                t.api_addr,
                s.dir.display()
            );
            (Some(s), t, Some(pid))
        }
    };
    wait_ready(&target, &mut own).await?;
    if target.token.is_none() && args.commands > 0 {
        eprintln!("bench: warning: no --token/FLOTILLA_TOKEN for the external server; command POSTs will likely be refused");
    }
    // Let the freshly started server reach its idle footprint before the baseline reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = match pid {
        Some(p) => Some(proc_status(p)?),
        None => None,
    };

    // --- consoles watching live updates through the connect
    let console_cookie = match (args.consoles, target.token.as_deref()) {
        (0, _) => None,
        (_, Some(t)) => Some(console::login(&target.api_addr, t).await?),
        (_, None) => bail!("--consoles needs --token (or a server the bench starts)"),
    };
    let open_watchers = || async {
        match &console_cookie {
            Some(c) => console::Watchers::open(&target.api_addr, c, args.consoles)
                .await
                .map(Some),
            None => Ok(None),
        }
    };
    let mut watchers = if args.reconnect_storm {
        None
    } else {
        open_watchers().await?
    };
    let mut ramp_cpu0 = pid.map(proc_cpu_secs).transpose()?;

    // --- connect in ramps
    let sh = Arc::new(Shared::new(n, args.fanout.min(n)));
    let cancel = CancellationToken::new();
    let load_at_start = loadavg1();
    let overflows0 = listen_overflows();
    let mut ramp_t = Instant::now();
    let (mut tasks, mut connected, mut setup_ms, mut connect_failures) =
        connect_all(&sh, &target, interval, &cancel, n, args.ramp).await;
    let mut reconnect = Value::Null;
    if args.reconnect_storm {
        // The fleet is registered and connected; the consoles open, then every connection
        // drops at once without a goodbye and all agents come back together: the storm they
        // watch is n disconnections and n reconnections.
        let registered = setup_ms.len();
        let first_connect_s = ramp_t.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
        watchers = open_watchers().await?;
        ramp_cpu0 = pid.map(proc_cpu_secs).transpose()?;
        ramp_t = Instant::now();
        for t in &tasks {
            t.abort();
        }
        (tasks, connected, setup_ms, connect_failures) =
            connect_all(&sh, &target, interval, &cancel, n, n).await;
        reconnect = json!({"registered_first": registered,
                           "first_connect_s": (first_connect_s * 10.0).round() / 10.0,
                           "reconnected": setup_ms.len(),
                           "reconnect_s": (ramp_t.elapsed().as_secs_f64() * 10.0).round() / 10.0});
    }
    let ramp_secs = ramp_t.elapsed().as_secs_f64();
    let ramp_cpu1 = pid.map(proc_cpu_secs).transpose()?;
    let ramp_overflows = listen_overflows().saturating_sub(overflows0);
    let console_report = match (watchers, &console_cookie) {
        (Some(w), Some(cookie)) => {
            // The last changes of the storm arrive one debounce window later.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let end = Instant::now();
            let live_updates = w.finish(ramp_t, end);
            let addr = &target.api_addr;
            let pages = vec![
                console::time_page(addr, cookie, "/ui/fleet", false, 10).await?,
                console::time_page(addr, cookie, "/ui/fleet?q=host%3Abench-1*", true, 10).await?,
                console::time_page(
                    addr,
                    cookie,
                    "/ui/fleet?q=version%3A3.2.0&sort=last_seen&dir=desc&page=100",
                    true,
                    10,
                )
                .await?,
            ];
            let storm_cpu = match (ramp_cpu0, ramp_cpu1) {
                (Some(a), Some(b)) => Some(((b - a) / ramp_secs * 1000.0).round() / 1000.0),
                _ => None,
            };
            Some(json!({
                "reconnect_storm": reconnect,
                "live_updates_during_connect": live_updates,
                "server_cpu_ratio_during_connect": storm_cpu,
                "pages": pages,
            }))
        }
        _ => None,
    };
    let live: Vec<usize> = (0..n).filter(|&i| connected[i]).collect();
    if live.is_empty() {
        let errs = sh.errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
        bail!("no agent could connect and report: {errs:#?}");
    }

    // --- steady state
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let rss_connected = match pid {
        Some(p) => Some(proc_status(p)?),
        None => None,
    };
    let cpu0 = pid.map(proc_cpu_secs).transpose()?;
    let self_cpu0 = proc_cpu_secs(std::process::id())?;
    let replies0 = sh.replies.load(Ordering::Relaxed);
    let sent0 = sh.sent.load(Ordering::Relaxed);
    let unanswered0 = sh.unanswered.load(Ordering::Relaxed);
    let dropped0 = sh.dropped.load(Ordering::Relaxed);
    sh.measuring.store(true, Ordering::Relaxed);
    let w0 = Instant::now();
    eprintln!(
        "bench: steady state: {} agents, measuring for {} s with {} commands",
        live.len(),
        args.duration_secs,
        args.commands.min(live.len())
    );

    // Commands: evenly spaced over the window, each to a different agent spread over the fleet.
    let m = args.commands.min(live.len());
    let post_ms: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    let post_failures = Arc::new(AtomicU64::new(0));
    let mut posts = Vec::with_capacity(m);
    let mut targets = Vec::with_capacity(m);
    for k in 0..m {
        let i = live[k * live.len() / m];
        targets.push(i);
        let at = tokio::time::Instant::from_std(w0) + window.mul_f64((k as f64 + 0.5) / m as f64);
        let sh = sh.clone();
        let target = target.clone();
        let post_ms = post_ms.clone();
        let post_failures = post_failures.clone();
        posts.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let path = format!("{}/api/v1/agents/{}/commands", target.api_prefix, sh.uid(i));
            let t = Instant::now();
            sh.cmd_posted_ns[i].store(sh.now_ns(), Ordering::Relaxed);
            let r = http(
                &target.api_addr,
                "POST",
                &path,
                target.token.as_deref(),
                Some(r#"{"kind":"restart","params":{}}"#),
            )
            .await;
            match r {
                Ok((code, _)) if (200..300).contains(&code) => {
                    post_ms
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(t.elapsed().as_secs_f64() * 1000.0);
                }
                Ok((code, body)) => {
                    post_failures.fetch_add(1, Ordering::Relaxed);
                    sh.cmd_posted_ns[i].store(0, Ordering::Relaxed);
                    sh.note("POST command", format!("HTTP {code} {}", body.trim()));
                }
                Err(e) => {
                    post_failures.fetch_add(1, Ordering::Relaxed);
                    sh.cmd_posted_ns[i].store(0, Ordering::Relaxed);
                    sh.note("POST command", format!("{e:#}"));
                }
            }
        }));
    }

    tokio::time::sleep_until(tokio::time::Instant::from_std(w0) + window).await;
    let window_secs = w0.elapsed().as_secs_f64();
    sh.measuring.store(false, Ordering::Relaxed);
    let cpu1 = pid.map(proc_cpu_secs).transpose()?;
    let self_cpu1 = proc_cpu_secs(std::process::id())?;
    let replies = sh.replies.load(Ordering::Relaxed) - replies0;
    let sent = sh.sent.load(Ordering::Relaxed) - sent0;
    let unanswered = sh.unanswered.load(Ordering::Relaxed) - unanswered0;
    let dropped_in_window = sh.dropped.load(Ordering::Relaxed) - dropped0;
    let rss_end = match pid {
        Some(p) => Some(proc_status(p)?),
        None => None,
    };

    // Commands POSTed near the end of the window may still be on their way.
    let grace_t = Instant::now();
    for p in posts {
        let _ = p.await;
    }
    let pending = |sh: &Shared| {
        targets
            .iter()
            .filter(|&&i| {
                sh.cmd_posted_ns[i].load(Ordering::Relaxed) != 0
                    && sh.cmd_recv_ns[i].load(Ordering::Relaxed) == 0
            })
            .count()
    };
    while pending(&sh) > 0 && grace_t.elapsed() < Duration::from_secs(args.grace_secs) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut delivery_ms = Vec::with_capacity(m);
    // (seconds into the window, ms) of each delivery, to see whether slow ones line up with
    // something periodic in the server.
    let w0_ns = w0.duration_since(sh.epoch).as_nanos() as u64;
    let mut timeline = Vec::with_capacity(m);
    for &i in &targets {
        let (p, r) = (
            sh.cmd_posted_ns[i].load(Ordering::Relaxed),
            sh.cmd_recv_ns[i].load(Ordering::Relaxed),
        );
        if p != 0 && r != 0 {
            // A command can beat the POST's own response; it can never precede the POST.
            let ms = r.saturating_sub(p) as f64 / 1e6;
            delivery_ms.push(ms);
            timeline.push((p.saturating_sub(w0_ns) as f64 / 1e9, ms));
        }
    }
    timeline.sort_by(|a, b| b.1.total_cmp(&a.1));
    let slowest: Vec<Value> = timeline
        .iter()
        .take(5)
        .map(|(at, ms)| json!({"at_s": (at * 10.0).round() / 10.0, "ms": (ms * 100.0).round() / 100.0}))
        .collect();
    let posted_ok = post_ms.lock().unwrap_or_else(|e| e.into_inner()).len();
    let delivered = delivery_ms.len();
    let undelivered = pending(&sh);

    // --- fan-out
    let fanout_report = if sh.fanout > 0 {
        Some(fan_out(&sh, &target, pid).await?)
    } else {
        None
    };

    // --- chat
    let chat_report = match &chat_rig {
        Some(c) => Some(
            chat::run(
                &sh,
                &c.fake,
                &c.fake_url,
                &c.addr,
                &c.secret,
                args.chat,
                args.chat_restarts,
            )
            .await?,
        ),
        None => None,
    };
    let storm_report = match (&chat_rig, args.alert_storm) {
        (Some(c), true) => {
            Some(chat::alert_storm(&sh, &c.fake, &c.fake_url, &c.addr, &c.secret, &cancel).await?)
        }
        _ => None,
    };

    // --- stop: our own server is stopped with the agents still connected (exercises graceful
    // shutdown under load); an external one is left running and the agents say goodbye.
    sh.stopping.store(true, Ordering::Relaxed);
    let mut shutdown_secs = None;
    let mut log_levels = BTreeMap::new();
    let mut log_samples = Vec::new();
    if let Some(s) = own.as_mut() {
        let stopped = tokio::task::block_in_place(|| s.stop(Duration::from_secs(30)));
        shutdown_secs = Some(stopped.map(|d| d.as_secs_f64()));
        // Give agent tasks a moment to see their connections end.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cancel.cancel();
    let join_all = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), join_all).await;
    if let Some(s) = &own {
        (log_levels, log_samples) = scan_log(&s.log_path());
    }

    // --- report
    let rtt = std::mem::take(&mut *sh.rtt_us.lock().unwrap_or_else(|e| e.into_inner()));
    let rtt_stats = ms_stats(rtt.into_iter().map(|u| u as f64 / 1000.0).collect());
    let delivery_stats = ms_stats(delivery_ms);
    let post_stats = ms_stats(std::mem::take(
        &mut *post_ms.lock().unwrap_or_else(|e| e.into_inner()),
    ));
    let setup_stats = ms_stats(setup_ms);
    let errors = sh.errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let cpu_ratio = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some((b - a) / window_secs),
        _ => None,
    };
    let bench_cpu_ratio = (self_cpu1 - self_cpu0) / window_secs;
    let load_at_end = loadavg1();
    let per_agent_kib = match (rss_before, rss_connected) {
        (Some(b), Some(c)) => Some((c.0 as f64 - b.0 as f64) / live.len() as f64),
        _ => None,
    };
    let hb_rate = replies as f64 / window_secs;
    let expected_rate = live.len() as f64 / args.interval_secs as f64;
    let r1 = |x: f64| (x * 10.0).round() / 10.0;
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;

    let json = json!({
        "bench": "flotilla-bench",
        "machine": {
            "cpu_model": cpu_model(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "mem_gib": r1(mem_total_gib()),
            "loadavg1_at_start": load_at_start,
            "loadavg1_at_end": load_at_end,
        },
        "params": {
            "agents": n, "interval_s": args.interval_secs, "duration_s": args.duration_secs,
            "commands": m, "ramp": args.ramp, "server_started_by_bench": own.is_some(),
            "server_log_level": if own.is_some() { Some(&args.server_log_level) } else { None },
        },
        "connect": {
            "connected": live.len(), "failed": connect_failures, "ramp_s": r3(ramp_secs),
            "agents_per_s": r1(n as f64 / ramp_secs), "setup": setup_stats,
            "listen_overflows": ramp_overflows,
        },
        "rss_kib": {
            "before": rss_before.map(|r| r.0),
            "connected": rss_connected.map(|r| r.0),
            "end": rss_end.map(|r| r.0),
            "peak": rss_end.map(|r| r.1),
            "per_agent": per_agent_kib.map(r3),
        },
        "server_threads": rss_end.map(|r| r.2),
        "window_s": r3(window_secs),
        "heartbeats": {
            "sent": sent, "replies": replies, "replies_per_s": r1(hb_rate),
            "expected_per_s": r1(expected_rate), "unanswered_within_interval": unanswered,
            "rtt": rtt_stats,
        },
        "commands": {
            "queued": m, "post_ok": posted_ok,
            "post_failed": post_failures.load(Ordering::Relaxed),
            "delivered": delivered, "undelivered_after_grace": undelivered,
            "post": post_stats, "delivery": delivery_stats, "slowest_deliveries": slowest,
        },
        "server_cpu": {
            "seconds": match (cpu0, cpu1) { (Some(a), Some(b)) => Some(r3(b - a)), _ => None },
            "ratio_of_wall": cpu_ratio.map(r3),
        },
        "bench_cpu_ratio_of_wall": r3(bench_cpu_ratio),
        "connections": {
            "dropped_in_window": dropped_in_window,
            "dropped_total": sh.dropped.load(Ordering::Relaxed),
            "server_error_responses": sh.server_errors.load(Ordering::Relaxed),
            "full_state_requests": sh.full_state_requests.load(Ordering::Relaxed),
            "uid_reassigned": sh.uid_reassigned.load(Ordering::Relaxed),
        },
        "shutdown": {
            "graceful_s": shutdown_secs.map(|s| s.map(r3)),
            "agents_closed_with_close_frame": sh.closed_at_stop_with_frame.load(Ordering::Relaxed),
            "agents_closed_without_close_frame": sh.closed_at_stop_without_frame.load(Ordering::Relaxed),
        },
        "console": console_report,
        "fanout": fanout_report,
        "chat": chat_report,
        "alert_storm": storm_report,
        "errors": errors,
        "server_log_levels": log_levels,
        "server_log_samples": log_samples,
    });

    let kib = |v: Option<(u64, u64, u64)>| {
        v.map(|r| format!("{:.1} MiB", r.0 as f64 / 1024.0))
            .unwrap_or_else(|| "-".into())
    };
    let mut s = String::new();
    use std::fmt::Write;
    let _ = writeln!(s, "== flotilla-bench ==");
    let _ = writeln!(
        s,
        "machine        {} x {}, {:.1} GiB; load average {:.2} at start, {:.2} at end",
        json["machine"]["cpus"],
        json["machine"]["cpu_model"].as_str().unwrap_or(""),
        mem_total_gib(),
        load_at_start,
        load_at_end
    );
    let _ = writeln!(
        s,
        "agents         {} connected, {} failed, in {:.1} s ({:.0}/s); setup {}",
        live.len(),
        connect_failures,
        ramp_secs,
        n as f64 / ramp_secs,
        fmt_ms(&json["connect"]["setup"])
    );
    if ramp_overflows > 0 {
        let _ = writeln!(
            s,
            "               {ramp_overflows} SYNs hit a full accept queue while connecting \
             (system-wide ListenOverflows): each costs its client a 1 s retransmit"
        );
    }
    let _ = writeln!(
        s,
        "server RSS     idle {}, connected {}, end {}; per agent {}",
        kib(rss_before),
        kib(rss_connected),
        kib(rss_end),
        per_agent_kib
            .map(|k| format!("{k:.1} KiB"))
            .unwrap_or_else(|| "- (no --server-pid)".into())
    );
    let _ = writeln!(
        s,
        "heartbeats     {:.1} replies/s (expected {:.1}); {} sent, {} replies in {:.1} s; {} unanswered",
        hb_rate, expected_rate, sent, replies, window_secs, unanswered
    );
    let _ = writeln!(s, "heartbeat RTT  {}", fmt_ms(&json["heartbeats"]["rtt"]));
    let _ = writeln!(
        s,
        "commands       {} queued, {} POST ok, {} delivered, {} undelivered",
        m, posted_ok, delivered, undelivered
    );
    let _ = writeln!(s, "  POST         {}", fmt_ms(&json["commands"]["post"]));
    let _ = writeln!(
        s,
        "  delivery     {}",
        fmt_ms(&json["commands"]["delivery"])
    );
    if !timeline.is_empty() {
        let worst: Vec<String> = timeline
            .iter()
            .take(5)
            .map(|(at, ms)| format!("{ms:.1} ms at {at:.1} s"))
            .collect();
        let _ = writeln!(s, "  slowest      {}", worst.join(", "));
    }
    let _ = writeln!(
        s,
        "server CPU     {} of one core over the window (bench itself: {:.1}%)",
        cpu_ratio
            .map(|r| format!("{:.1}%", r * 100.0))
            .unwrap_or_else(|| "-".into()),
        bench_cpu_ratio * 100.0
    );
    let _ = writeln!(
        s,
        "connections    {} dropped during the run, {} server error responses",
        sh.dropped.load(Ordering::Relaxed),
        sh.server_errors.load(Ordering::Relaxed)
    );
    if let Some(sd) = shutdown_secs {
        let _ = writeln!(
            s,
            "shutdown       {}; {} agents got a Close frame, {} did not",
            sd.map(|d| format!("graceful in {d:.2} s"))
                .unwrap_or_else(|| "NOT graceful within 30 s (killed)".into()),
            sh.closed_at_stop_with_frame.load(Ordering::Relaxed),
            sh.closed_at_stop_without_frame.load(Ordering::Relaxed)
        );
    }
    if let Some(f) = &json["fanout"].as_object() {
        let ms = |k: &str| {
            f.get(k)
                .and_then(Value::as_f64)
                .map_or_else(|| "never".into(), |v| format!("{v:.0} ms"))
        };
        let _ = writeln!(
            s,
            "fan-out        1 restart to {} agents: POST {}; after its answer all sent {}, all \
             received {}, all settled {}; other agents' heartbeats {}",
            f["queued"],
            ms("post_ms"),
            ms("all_sent_after_answer_ms"),
            ms("all_received_after_answer_ms"),
            ms("all_settled_after_answer_ms"),
            fmt_ms(&f["other_agents_heartbeat_rtt"])
        );
    }
    if let Some(c) = json["chat"].as_object() {
        let _ = writeln!(
            s,
            "chat           slash ack {}; answer posted {}; restart: preview posted {}, \
             slash to agent {}, Confirm to agent {}",
            fmt_ms(&c["slash_ack"]),
            fmt_ms(&c["slash_answer_posted"]),
            fmt_ms(&c["restart_preview_posted"]),
            fmt_ms(&c["restart_slash_to_agent"]),
            fmt_ms(&c["restart_confirm_to_agent"])
        );
    }
    if let Some(a) = json["alert_storm"].as_object() {
        let _ = writeln!(
            s,
            "alert storm    {} agents offline -> {} message(s) in the channel, last {} ms after \
             the goodbyes",
            a["agents_offline"], a["messages"], a["goodbyes_to_last_message_ms"]
        );
    }
    if !log_levels.is_empty() {
        let _ = writeln!(s, "server log     {log_levels:?}");
        for l in &log_samples {
            let _ = writeln!(s, "  {l}");
        }
    }
    if !errors.is_empty() {
        let _ = writeln!(s, "errors:");
        for (e, c) in &errors {
            let _ = writeln!(s, "  {c:>6} x {e}");
        }
    }
    Ok((s, json))
}
