//! The OpAMP connection: a persistent WebSocket (ws://) or plain-HTTP polling (http://), with
//! reconnects under exponential backoff + jitter, HTTP 429/503 + `Retry-After` (seconds or
//! HTTP-date), `UNAVAILABLE` + `RetryInfo`, bearer/OAuth2 auth with a refresh after 401,
//! heartbeats at the (server-offered) interval, and agent_disconnect + Close on stop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use flotilla_proto::framing::{decode_ws, encode_ws};
use flotilla_proto::{Message as _, ServerErrorResponseType, ServerToAgent};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::auth::TokenSource;
use crate::backoff::{parse_retry_after, Backoff};
use crate::reporter::Reporter;

/// Shared between the core and the transport.
#[derive(Clone)]
pub struct Link {
    pub reporter: Arc<Mutex<Reporter>>,
    /// Wakes the transport when the reporter has something to send.
    pub wake: Arc<Notify>,
    /// Heartbeat / polling interval in seconds; 0 disables WebSocket heartbeats.
    pub heartbeat_s: Arc<AtomicU64>,
    /// True while a WebSocket is open or the last HTTP exchange succeeded.
    pub connected: Arc<AtomicBool>,
}

impl Link {
    pub fn poke(&self) {
        self.wake.notify_one();
    }
}

/// Transport settings.
pub struct Settings {
    pub url: String,
    pub websocket: bool,
    pub connect_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Polling interval used by HTTP when the server turns heartbeats off.
    pub local_heartbeat_s: u64,
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// Reconnect after the usual backoff.
    Lost(String),
    /// Reconnect after exactly this long (Retry-After / RetryInfo).
    RetryAfter(Duration, String),
    /// Asked to stop; agent_disconnect was sent.
    Stopped,
}

const USER_AGENT: &str = concat!("flotilla-supervisor/", env!("CARGO_PKG_VERSION"));

/// Runs the transport until a stop request arrives on `stop` (answered after agent_disconnect).
pub async fn run(
    s: Settings,
    link: Link,
    tokens: Arc<TokenSource>,
    inbound: mpsc::Sender<ServerToAgent>,
    mut stop: mpsc::Receiver<oneshot::Sender<()>>,
    http: reqwest::Client,
) {
    let mut backoff = Backoff::new(s.backoff_initial, s.backoff_max);
    loop {
        let end = if s.websocket {
            ws_session(&s, &link, &tokens, &inbound, &mut stop, &mut backoff).await
        } else {
            http_session(&s, &link, &tokens, &inbound, &mut stop, &mut backoff, &http).await
        };
        link.connected.store(false, Ordering::Relaxed);
        link.reporter.lock().expect("reporter").connection_lost();
        let delay = match end {
            End::Stopped => return,
            End::RetryAfter(d, why) => {
                tracing::warn!(retry_after_s = d.as_secs_f64(), "OpAMP server busy: {why}");
                d
            }
            End::Lost(why) => {
                let d = backoff.next_delay();
                tracing::warn!(
                    retry_in_ms = d.as_millis() as u64,
                    "OpAMP connection: {why}"
                );
                d
            }
        };
        // During a back-off no heartbeat is sent (spec); a stop request ends the wait.
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            r = stop.recv() => {
                // Not connected: nobody to say goodbye to.
                if let Some(r) = r { let _ = r.send(()); }
                return;
            }
        }
    }
}

fn heartbeat(link: &Link) -> Option<Duration> {
    match link.heartbeat_s.load(Ordering::Relaxed) {
        0 => None,
        s => Some(Duration::from_secs(s)),
    }
}

/// Reads what a throttling answer asks for: `Retry-After`, else the usual backoff.
fn throttle(status: u16, retry_after: Option<&str>) -> End {
    let why = format!("HTTP {status}");
    match retry_after.and_then(|v| parse_retry_after(v, SystemTime::now())) {
        Some(d) => End::RetryAfter(
            d,
            format!("{why}, Retry-After {}", retry_after.unwrap_or("")),
        ),
        None => End::Lost(why),
    }
}

/// Checks an answer for a server error; `Some` ends the session.
fn server_error(msg: &ServerToAgent, link: &Link) -> Option<End> {
    let e = msg.error_response.as_ref()?;
    // Whatever failed, the next message carries the full state (fluent-opamp's controllers
    // do the same): the server may have lost what we told it.
    link.reporter
        .lock()
        .expect("reporter")
        .full_state_next_time();
    if e.r#type == ServerErrorResponseType::Unavailable as i32 {
        let d = match &e.details {
            Some(flotilla_proto::v1::server_error_response::Details::RetryInfo(r)) => {
                Some(Duration::from_nanos(r.retry_after_nanoseconds))
            }
            _ => None,
        };
        let why = format!("UNAVAILABLE: {}", e.error_message);
        return Some(match d {
            Some(d) if !d.is_zero() => End::RetryAfter(d, why),
            _ => End::Lost(why),
        });
    }
    // BAD_REQUEST / UNKNOWN: the spec says not to retry that message; keep going.
    tracing::warn!(
        kind = e.r#type,
        "OpAMP server refused a message: {}",
        e.error_message
    );
    None
}

async fn ws_session(
    s: &Settings,
    link: &Link,
    tokens: &TokenSource,
    inbound: &mpsc::Sender<ServerToAgent>,
    stop: &mut mpsc::Receiver<oneshot::Sender<()>>,
    backoff: &mut Backoff,
) -> End {
    let mut req = match s.url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => return End::Lost(format!("bad URL: {e}")),
    };
    let uid = link.reporter.lock().expect("reporter").uid();
    let h = req.headers_mut();
    h.insert("user-agent", HeaderValue::from_static(USER_AGENT));
    if let Ok(v) = HeaderValue::from_str(&uid.to_string()) {
        h.insert("opamp-instance-uid", v);
    }
    match tokens.token().await {
        Ok(Some(t)) => {
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}")) {
                h.insert("authorization", v);
            }
        }
        Ok(None) => {}
        Err(e) => return End::Lost(e.to_string()),
    }
    let connect = tokio_tungstenite::connect_async(req);
    let ws = match tokio::time::timeout(s.connect_timeout, connect).await {
        Err(_) => return End::Lost("connect timed out".into()),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let status = resp.status().as_u16();
            if status == 401 {
                tokens.invalidate();
                return End::Lost("HTTP 401: the server refused our credentials".into());
            }
            if status == 429 || status == 503 {
                let ra = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok());
                return throttle(status, ra);
            }
            return End::Lost(format!("WebSocket upgrade refused: HTTP {status}"));
        }
        Ok(Err(e)) => return End::Lost(e.to_string()),
        Ok(Ok((ws, _))) => ws,
    };
    tracing::info!(url = %s.url, "OpAMP WebSocket connected");
    link.connected.store(true, Ordering::Relaxed);
    let (mut sink, mut stream) = ws.split();
    let mut last_sent = Instant::now();
    let mut first = true;
    loop {
        // Send everything pending (the first message is the full status report).
        loop {
            let msg = link.reporter.lock().expect("reporter").build(first);
            let Some(msg) = msg else { break };
            first = false;
            if let Err(e) = sink.send(WsMessage::binary(encode_ws(&msg))).await {
                return End::Lost(format!("send failed: {e}"));
            }
            last_sent = Instant::now();
        }
        let hb = heartbeat(link);
        let next_hb = hb.map(|d| last_sent + d);
        tokio::select! {
            _ = link.wake.notified() => {}
            _ = async { match next_hb { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                let msg = link.reporter.lock().expect("reporter").build(true);
                if let Some(msg) = msg {
                    if let Err(e) = sink.send(WsMessage::binary(encode_ws(&msg))).await {
                        return End::Lost(format!("heartbeat failed: {e}"));
                    }
                    last_sent = Instant::now();
                }
            }
            frame = stream.next() => match frame {
                Some(Ok(WsMessage::Binary(data))) => {
                    let msg = match decode_ws::<ServerToAgent>(&data) {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!("undecodable ServerToAgent: {e}");
                            continue;
                        }
                    };
                    backoff.reset();
                    link.reporter.lock().expect("reporter").confirm();
                    if let Some(end) = server_error(&msg, link) {
                        let _ = sink.send(WsMessage::Close(None)).await;
                        return end;
                    }
                    if inbound.send(msg).await.is_err() {
                        return End::Stopped;
                    }
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    return End::Lost(format!("server closed the WebSocket ({:?})", frame.map(|f| f.code)));
                }
                Some(Ok(_)) => {} // ping/pong handled by tungstenite; text frames are not OpAMP
                Some(Err(e)) => return End::Lost(format!("receive failed: {e}")),
                None => return End::Lost("connection closed".into()),
            },
            r = stop.recv() => {
                // Flush what is queued (a shutdown result), then the last message.
                loop {
                    let msg = link.reporter.lock().expect("reporter").build(false);
                    let Some(msg) = msg else { break };
                    if sink.send(WsMessage::binary(encode_ws(&msg))).await.is_err() {
                        break;
                    }
                }
                let bye = link.reporter.lock().expect("reporter").build_disconnect();
                let _ = sink.send(WsMessage::binary(encode_ws(&bye))).await;
                let _ = sink.send(WsMessage::Close(None)).await;
                // Wait briefly for the server's Close so the disconnect is read, not reset.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Some(Ok(f)) = stream.next().await {
                        if matches!(f, WsMessage::Close(_)) { break; }
                    }
                }).await;
                tracing::info!("sent agent_disconnect and closed the OpAMP WebSocket");
                if let Some(r) = r { let _ = r.send(()); }
                return End::Stopped;
            }
        }
    }
}

async fn http_session(
    s: &Settings,
    link: &Link,
    tokens: &TokenSource,
    inbound: &mpsc::Sender<ServerToAgent>,
    stop: &mut mpsc::Receiver<oneshot::Sender<()>>,
    backoff: &mut Backoff,
    http: &reqwest::Client,
) -> End {
    let mut last_sent: Option<Instant> = None;
    loop {
        // HTTP must poll to hear from the server; with heartbeats off it polls at the local rate.
        let poll = heartbeat(link).unwrap_or(Duration::from_secs(s.local_heartbeat_s));
        let due = last_sent.map(|t| t + poll).unwrap_or_else(Instant::now);
        let mut stopping: Option<Option<oneshot::Sender<()>>> = None;
        let msg = {
            let ready = link.reporter.lock().expect("reporter").has_pending();
            if ready || last_sent.is_none() {
                link.reporter.lock().expect("reporter").build(true)
            } else {
                tokio::select! {
                    _ = link.wake.notified() => link.reporter.lock().expect("reporter").build(false),
                    _ = tokio::time::sleep_until(due) => link.reporter.lock().expect("reporter").build(true),
                    r = stop.recv() => { stopping = Some(r); None }
                }
            }
        };
        if let Some(reply) = stopping {
            let mut msgs = Vec::new();
            while let Some(m) = link.reporter.lock().expect("reporter").build(false) {
                msgs.push(m);
            }
            msgs.push(link.reporter.lock().expect("reporter").build_disconnect());
            for m in msgs {
                if let Err(e) = post(s, link, tokens, http, &m).await {
                    tracing::warn!("could not deliver the last messages: {e:?}");
                    break;
                }
            }
            tracing::info!("sent agent_disconnect over HTTP");
            if let Some(r) = reply {
                let _ = r.send(());
            }
            return End::Stopped;
        }
        let Some(msg) = msg else { continue };
        last_sent = Some(Instant::now());
        match post(s, link, tokens, http, &msg).await {
            Ok(reply) => {
                backoff.reset();
                link.connected.store(true, Ordering::Relaxed);
                link.reporter.lock().expect("reporter").confirm();
                if let Some(end) = server_error(&reply, link) {
                    return end;
                }
                if inbound.send(reply).await.is_err() {
                    return End::Stopped;
                }
            }
            Err(end) => return end,
        }
    }
}

async fn post(
    s: &Settings,
    link: &Link,
    tokens: &TokenSource,
    http: &reqwest::Client,
    msg: &flotilla_proto::AgentToServer,
) -> Result<ServerToAgent, End> {
    let uid = link.reporter.lock().expect("reporter").uid();
    let mut req = http
        .post(&s.url)
        .timeout(s.connect_timeout)
        .header("content-type", "application/x-protobuf")
        .header("user-agent", USER_AGENT)
        .header("opamp-instance-uid", uid.to_string())
        .body(msg.encode_to_vec());
    match tokens.token().await {
        Ok(Some(t)) => req = req.bearer_auth(t),
        Ok(None) => {}
        Err(e) => return Err(End::Lost(e.to_string())),
    }
    let resp = req.send().await.map_err(|e| End::Lost(e.to_string()))?;
    let status = resp.status().as_u16();
    match status {
        200 => {}
        401 => {
            tokens.invalidate();
            return Err(End::Lost(
                "HTTP 401: the server refused our credentials".into(),
            ));
        }
        429 | 503 => {
            let ra = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            return Err(throttle(status, ra.as_deref()));
        }
        _ => return Err(End::Lost(format!("HTTP {status}"))),
    }
    let body = resp.bytes().await.map_err(|e| End::Lost(e.to_string()))?;
    ServerToAgent::decode(body.as_ref()).map_err(|e| End::Lost(format!("bad ServerToAgent: {e}")))
}
