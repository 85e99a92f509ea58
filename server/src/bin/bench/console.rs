//! The web console part of `flotilla-bench` (`--consoles N`): N signed-in consoles hold the
//! live-update stream (`GET /ui/events`, Server-Sent Events) open while the agents connect —
//! all at once with `--ramp` equal to `--agents`, a reconnect storm — and count the messages
//! they get; then the fleet page and a search are timed against the full registry.
//!
//! Plain HTTP/1.1 over TCP, like the rest of the bench: every byte the browser would receive
//! is counted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// A response: status, head (header lines as sent), body (de-chunked).
pub struct Resp {
    pub status: u16,
    pub head: String,
    pub body: String,
    pub bytes: usize,
}

/// One request on a fresh connection (`Connection: close`).
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &str)>,
) -> anyhow::Result<Resp> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (ct, body) = body.unwrap_or(("", ""));
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !ct.is_empty() {
            req.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let bytes = buf.len();
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP response: {head:?}"))?;
        // Header names are case-insensitive; cookie values are not.
        let head = head.to_string();
        let chunked = head
            .to_ascii_lowercase()
            .lines()
            .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
        let body = if chunked {
            super::dechunk(body)
        } else {
            body.to_string()
        };
        anyhow::Ok(Resp {
            status,
            head,
            body,
            bytes,
        })
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .with_context(|| format!("{method} {path}: no answer within 30 s"))?
}

fn cookie_value(head: &str, name: &str) -> Option<String> {
    let prefix = format!("set-cookie: {name}=");
    head.lines()
        .find_map(|l| {
            let n = prefix.len().min(l.len());
            l[..n].eq_ignore_ascii_case(&prefix).then(|| &l[n..])
        })
        .and_then(|v| v.split(';').next())
        .map(str::to_string)
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Signs in to the console with an API token; returns the `Cookie` header of the session.
pub async fn login(addr: &str, token: &str) -> anyhow::Result<String> {
    let form = request(addr, "GET", "/ui/login", &[], None).await?;
    if form.status != 200 {
        bail!(
            "GET /ui/login: HTTP {} (is the console enabled?)",
            form.status
        );
    }
    let nonce_cookie = cookie_value(&form.head, "flotilla_login").context("no login cookie")?;
    let needle = "name=\"login_csrf\" value=\"";
    let i = form.body.find(needle).context("no login_csrf field")? + needle.len();
    let nonce = &form.body[i..i + form.body[i..].find('"').unwrap_or(0)];
    let body = format!(
        "token={}&login_csrf={}&next=%2Fui%2Ffleet",
        form_encode(token),
        form_encode(nonce)
    );
    let r = request(
        addr,
        "POST",
        "/ui/login",
        &[("Cookie", &format!("flotilla_login={nonce_cookie}"))],
        Some(("application/x-www-form-urlencoded", &body)),
    )
    .await?;
    let session = cookie_value(&r.head, "flotilla_session")
        .with_context(|| format!("login refused: HTTP {}", r.status))?;
    Ok(format!("flotilla_session={session}"))
}

/// What one console's live-update stream received.
#[derive(Default)]
struct Seen {
    /// Seconds since the watchers opened, of each `change` message.
    at: Vec<f64>,
    bytes: usize,
    error: Option<String>,
}

/// N consoles holding `/ui/events` open.
pub struct Watchers {
    t0: Instant,
    seen: Vec<Arc<Mutex<Seen>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Watchers {
    /// Opens `n` live-update streams with the session `cookie` and waits until each answered.
    pub async fn open(addr: &str, cookie: &str, n: usize) -> anyhow::Result<Watchers> {
        let t0 = Instant::now();
        let mut seen = Vec::new();
        let mut tasks = Vec::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..n {
            let s = Arc::new(Mutex::new(Seen::default()));
            seen.push(s.clone());
            let (addr, cookie, tx) = (addr.to_string(), cookie.to_string(), tx.clone());
            tasks.push(tokio::spawn(async move {
                let r = watch(&addr, &cookie, t0, &s, &tx).await;
                if let Err(e) = r {
                    let _ = tx.send(Err(format!("{e:#}")));
                    s.lock().unwrap_or_else(|e| e.into_inner()).error = Some(format!("{e:#}"));
                }
            }));
        }
        for _ in 0..n {
            match rx.recv().await {
                Some(Ok(())) => {}
                Some(Err(e)) => bail!("a console's live-update stream failed: {e}"),
                None => bail!("console watchers ended"),
            }
        }
        Ok(Watchers { t0, seen, tasks })
    }

    /// Stops the streams; reports messages, bytes and rates between `from` and `to` (seconds
    /// since the watchers opened are converted from those instants).
    pub fn finish(self, from: Instant, to: Instant) -> Value {
        for t in &self.tasks {
            t.abort();
        }
        let a = from.saturating_duration_since(self.t0).as_secs_f64();
        let b = to.saturating_duration_since(self.t0).as_secs_f64();
        let span = (b - a).max(0.001);
        let mut total = 0usize;
        let mut bytes = 0usize;
        let mut max_per_s = 0usize;
        let mut per_console = Vec::new();
        let mut errors = Vec::new();
        for s in &self.seen {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            let msgs: Vec<f64> =
                s.at.iter()
                    .copied()
                    .filter(|t| *t >= a && *t <= b)
                    .collect();
            total += msgs.len();
            bytes += s.bytes;
            per_console.push(msgs.len());
            // The most messages one console got within any one second.
            for (i, t) in msgs.iter().enumerate() {
                let n = msgs[i..].iter().take_while(|u| **u < t + 1.0).count();
                max_per_s = max_per_s.max(n);
            }
            if let Some(e) = &s.error {
                errors.push(e.clone());
            }
        }
        let consoles = self.seen.len().max(1);
        json!({
            "consoles": self.seen.len(),
            "messages": total,
            "messages_per_s_all_consoles": (total as f64 / span * 10.0).round() / 10.0,
            "messages_per_s_per_console": (total as f64 / consoles as f64 / span * 100.0).round() / 100.0,
            "max_messages_in_one_second_one_console": max_per_s,
            "per_console": per_console,
            "stream_bytes_all_consoles": bytes,
            "window_s": (span * 1000.0).round() / 1000.0,
            "errors": errors,
        })
    }
}

async fn watch(
    addr: &str,
    cookie: &str,
    t0: Instant,
    seen: &Mutex<Seen>,
    ready: &tokio::sync::mpsc::UnboundedSender<Result<(), String>>,
) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!(
        "GET /ui/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nCookie: {cookie}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending = String::new();
    let mut answered = false;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("the server closed the stream");
        }
        let chunk = String::from_utf8_lossy(&buf[..n]).to_string();
        let now = t0.elapsed().as_secs_f64();
        let mut g = seen.lock().unwrap_or_else(|e| e.into_inner());
        g.bytes += n;
        pending.push_str(&chunk);
        if !answered {
            let Some(end) = pending.find("\r\n\r\n") else {
                continue;
            };
            let head = pending[..end].to_string();
            if !head.starts_with("HTTP/1.1 200") {
                let _ = ready.send(Err(format!(
                    "GET /ui/events: {}",
                    head.lines().next().unwrap_or("")
                )));
                bail!("GET /ui/events refused");
            }
            answered = true;
            pending.drain(..end + 4);
            let _ = ready.send(Ok(()));
        }
        // Count whole `event: change` lines; keep a possibly cut line for the next read.
        while let Some(i) = pending.find('\n') {
            let line: String = pending.drain(..=i).collect();
            if line.trim_end() == "event: change" {
                g.at.push(now);
            }
        }
    }
}

/// Times `GET path` `n` times with the session; returns latency stats and the body size.
pub async fn time_page(
    addr: &str,
    cookie: &str,
    path: &str,
    live: bool,
    n: usize,
) -> anyhow::Result<Value> {
    let mut ms = Vec::with_capacity(n);
    let mut bytes = 0;
    let mut headers = vec![("Cookie", cookie)];
    if live {
        // As the page's script asks when it re-renders a region.
        headers.push(("X-Flotilla-Live", "1"));
    }
    for _ in 0..n {
        let t = Instant::now();
        let r = request(addr, "GET", path, &headers, None).await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if r.status != 200 {
            bail!("GET {path}: HTTP {}", r.status);
        }
        bytes = r.bytes;
    }
    Ok(json!({"path": path, "requests": n, "ms": super::ms_stats(ms), "bytes": bytes}))
}
