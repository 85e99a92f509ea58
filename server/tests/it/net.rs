//! Connection-level defences of both listeners, against real sockets on loopback: stalled
//! uploads, idle and slowloris floods, connection caps (issue 11, defects 1 and 2).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{agent_status, TestServer};

const WAIT: Duration = Duration::from_secs(10);

/// `GET /healthz` on a fresh connection; the status, or `None` if no answer came in `within`.
async fn healthz(server: &TestServer, within: Duration) -> Option<u16> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let req = client.get(server.api_url("/healthz")).send();
    match tokio::time::timeout(within, req).await {
        Ok(Ok(r)) => Some(r.status().as_u16()),
        _ => None,
    }
}

/// One plain-HTTP OpAMP request from a new agent; its status (0 when the connection failed).
async fn agent_post(server: &TestServer) -> u16 {
    use flotilla_proto::Message;
    let msg = agent_status(uuid::Uuid::now_v7(), 0, &[("host.name", "real")], 1, &[]);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let req = client
        .post(server.opamp_http_url())
        .header("Content-Type", "application/x-protobuf")
        .body(msg.encode_to_vec())
        .send();
    match tokio::time::timeout(WAIT, req).await {
        Ok(Ok(r)) => r.status().as_u16(),
        _ => 0,
    }
}

/// Reads until the server closes the connection (or `within` passes); what it sent, and
/// whether it closed.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
}

/// Opens `n` connections that send nothing.
async fn idle_flood(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(TcpStream::connect(addr).await.expect("connect"));
    }
    v
}

/// Opens `n` slowloris connections: a request line, then one header line every 200 ms, never
/// the blank line. Each task returns how long the server let it live.
fn slowloris(addr: SocketAddr, n: usize) -> Vec<tokio::task::JoinHandle<Duration>> {
    (0..n)
        .map(|_| {
            tokio::spawn(async move {
                let start = Instant::now();
                let Ok(s) = TcpStream::connect(addr).await else {
                    return start.elapsed();
                };
                let (mut r, mut w) = s.into_split();
                let writer = async move {
                    if w.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    loop {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if w.write_all(b"X-Slow: 1\r\n").await.is_err() {
                            return;
                        }
                    }
                };
                let reader = async move {
                    let mut buf = [0u8; 256];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                };
                tokio::select! {
                    _ = reader => {}
                    _ = async { writer.await; std::future::pending::<()>().await } => {}
                }
                start.elapsed()
            })
        })
        .collect()
}

/// Asserts every connection of the flood was closed by the server within `within`.
async fn assert_all_closed(
    idle: &mut [TcpStream],
    slow: Vec<tokio::task::JoinHandle<Duration>>,
    within: Duration,
) {
    let start = Instant::now();
    for (i, s) in idle.iter_mut().enumerate() {
        let left = within.saturating_sub(start.elapsed());
        let (_, closed) = read_until_closed(s, left).await;
        assert!(closed, "idle connection {i} still open after {within:?}");
    }
    for (i, h) in slow.into_iter().enumerate() {
        let left = within.saturating_sub(start.elapsed()) + Duration::from_millis(100);
        let lived = tokio::time::timeout(left, h)
            .await
            .unwrap_or_else(|_| panic!("slowloris connection {i} still open after {within:?}"))
            .unwrap();
        assert!(lived <= within + Duration::from_secs(1), "{lived:?}");
    }
}

/// Defect 2: 64 (= max_in_flight) connections each send one byte of a 1,000-byte body and
/// hang on; a real agent is still answered (today: 429 for as long as they hang on), and the
/// stalled uploads are answered 408 and closed once the body read timeout passes.
#[tokio::test]
async fn stalled_uploads_do_not_block_plain_http_agents() {
    let server = TestServer::start_with(|c| {
        c.opamp.max_in_flight = 64;
        c.opamp.body_read_timeout_s = 2;
    })
    .await;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-protobuf\r\nContent-Length: 1000\r\n\r\n\x0a",
        server.config.opamp.path, server.opamp
    );
    let mut stalled = Vec::new();
    for _ in 0..64 {
        let mut s = TcpStream::connect(server.opamp).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        stalled.push(s);
    }
    // Real time, not a paused clock: the server must have read all 64 heads (and, before the
    // fix, taken all 64 slots) before the agent asks.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(agent_post(&server).await, 200, "a real agent is answered");
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "before the body timeout"
    );
    for (i, s) in stalled.iter_mut().enumerate() {
        let (got, closed) = read_until_closed(s, WAIT).await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 408"),
            "stalled upload {i} got: {text:?}"
        );
        assert!(closed, "stalled upload {i} still open");
    }
    server.stop().await;
}

/// Defect 1, agent port: an idle + slowloris flood above the agent listener's cap. The
/// operator listener answers `/healthz` throughout, every flood connection is closed once the
/// header read timeout passes (today: all still open), and agents are served again.
#[tokio::test]
async fn an_idle_and_slowloris_flood_of_the_agent_port_is_shed() {
    let server = TestServer::start_with(|c| {
        c.opamp.max_connections = 100;
        c.opamp.max_in_flight = 20;
        c.opamp.header_read_timeout_s = 2;
    })
    .await;
    let flood_start = Instant::now();
    let mut idle = idle_flood(server.opamp, 300).await;
    let slow = slowloris(server.opamp, 50);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        healthz(&server, Duration::from_secs(1)).await,
        Some(200),
        "the operator listener answers while the agent port is flooded"
    );
    assert!(flood_start.elapsed() < Duration::from_secs(2), "while held");
    assert_all_closed(&mut idle, slow, Duration::from_secs(5)).await;
    assert_eq!(agent_post(&server).await, 200, "agents are served again");
    server.stop().await;
}

/// Defect 1, operator port: the same flood against the operator listener. Agents are answered
/// throughout, the flood is closed after the header read timeout, and `/healthz` answers again.
#[tokio::test]
async fn an_idle_and_slowloris_flood_of_the_operator_port_is_shed() {
    let server = TestServer::start_with(|c| {
        c.api.max_connections = 50;
        c.api.header_read_timeout_s = 2;
    })
    .await;
    let mut idle = idle_flood(server.api, 200).await;
    let slow = slowloris(server.api, 20);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        agent_post(&server).await,
        200,
        "agents are answered while the operator port is flooded"
    );
    assert_all_closed(&mut idle, slow, Duration::from_secs(5)).await;
    assert_eq!(healthz(&server, WAIT).await, Some(200));
    server.stop().await;
}

/// The connection cap closes what is over it at once, and a slot comes back when a
/// connection ends.
#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let server = TestServer::start_with(|c| c.api.max_connections = 5).await;
    let held = idle_flood(server.api, 5).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut over = TcpStream::connect(server.api).await.unwrap();
    let (_, closed) = read_until_closed(&mut over, Duration::from_secs(2)).await;
    assert!(closed, "the sixth connection is closed at once");
    drop(held);
    let deadline = tokio::time::Instant::now() + WAIT;
    while healthz(&server, Duration::from_secs(1)).await != Some(200) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

/// Log output captured by a tracing subscriber for the current thread (a `#[tokio::test]`
/// runtime runs the server's tasks on it too).
#[derive(Clone, Default)]
pub(crate) struct LogBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuf {
    type Writer = LogBuf;
    fn make_writer(&'a self) -> LogBuf {
        self.clone()
    }
}

impl LogBuf {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Captures this thread's log lines at `level` and above (a current-thread test runtime
    /// runs the server here too) until the guard is dropped.
    pub(crate) fn capture(level: tracing::Level) -> (LogBuf, tracing::subscriber::DefaultGuard) {
        let logs = LogBuf::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(level)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }
}

/// Defect 5: 200 malformed messages from one address write a few WARN lines and then one
/// summary line with the count of the rest (today: 200 WARN lines, no summary).
#[tokio::test]
async fn malformed_messages_are_logged_a_few_times_per_source_then_summed_up() {
    let (logs, _guard) = LogBuf::capture(tracing::Level::WARN);
    let server = TestServer::start_with(|c| {
        c.opamp.malformed_log_burst = 3;
        c.opamp.malformed_log_window_s = 2;
    })
    .await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    for _ in 0..200 {
        let r = client
            .post(server.opamp_http_url())
            .header("Content-Type", "application/x-protobuf")
            .body(vec![0xffu8; 16])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }
    // A window lasts 2 s to 2.5 s (the sweep runs every quarter window) and the first one starts
    // with the first message: the sending spanned at most this many windows.
    let windows = started.elapsed().as_secs() / 2 + 1;
    // Every message is either logged or counted in a summary line; the last window's summary
    // comes up to a quarter window after that window ends, so wait for the sum, not a fixed time.
    let count = |text: &str| -> (u64, u64, Vec<String>) {
        let logged = text
            .lines()
            .filter(|l| l.contains("OpAMP HTTP body is not an AgentToServer"))
            .count() as u64;
        let summaries: Vec<String> = text
            .lines()
            .filter(|l| l.contains("suppressed"))
            .map(str::to_string)
            .collect();
        let suppressed: u64 = summaries
            .iter()
            .map(|l| {
                let after = l.split("suppressed ").nth(1).unwrap();
                after.split(' ').next().unwrap().parse::<u64>().unwrap()
            })
            .sum();
        (logged, suppressed, summaries)
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while {
        let (logged, suppressed, _) = count(&logs.text());
        logged + suppressed < 200
    } {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every message logged or counted: {}",
            logs.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (logged, suppressed, summaries) = count(&logs.text());
    assert!(
        logged <= 3 * windows,
        "{logged} lines in {windows} window(s)"
    );
    assert_eq!(
        logged + suppressed,
        200,
        "every message logged or counted exactly once"
    );
    assert!(
        summaries[0]
            .contains("similar messages (malformed OpAMP messages) from 127.0.0.1 in the last 2 s"),
        "{}",
        summaries[0]
    );
    server.stop().await;
}
