//! The OpAMP connection: a persistent WebSocket (ws://) or plain-HTTP polling (http://), with
//! reconnects under exponential backoff + jitter, HTTP 429/503 + `Retry-After` (seconds or
//! HTTP-date), `UNAVAILABLE` + `RetryInfo`, bearer/OAuth2 auth with a refresh after 401,
//! heartbeats at the (server-offered) interval, a switch to a server-offered endpoint (only
//! within `server.accept_offered_endpoint`, never dropping TLS, with a fall back when it does
//! not answer), the server's acks of results, and agent_disconnect + Close on stop.

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
use crate::backoff::{parse_retry_after, throttle_delay, Backoff};
use crate::commands;
use crate::config::{check_opamp_url, parse_origin, OfferedEndpoint, OPAMP_SCHEMES};
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
    /// The OpAMP endpoint the server offered last (AcceptsOpAMPConnectionSettings), not yet
    /// looked at by the transport.
    pub offered_endpoint: Arc<Mutex<Option<String>>>,
}

impl Link {
    pub fn new(reporter: Reporter, heartbeat_s: u64) -> Link {
        Link {
            reporter: Arc::new(Mutex::new(reporter)),
            wake: Arc::new(Notify::new()),
            heartbeat_s: Arc::new(AtomicU64::new(clamp_heartbeat_s(heartbeat_s))),
            connected: Arc::new(AtomicBool::new(false)),
            offered_endpoint: Arc::new(Mutex::new(None)),
        }
    }

    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Hands a server-offered endpoint to the transport, which switches to it if it differs
    /// from the one in use (and falls back if it does not answer).
    pub fn offer_endpoint(&self, url: &str) {
        *self.offered_endpoint.lock().expect("offer") = Some(url.trim().to_string());
        self.poke();
    }

    fn take_offer(&self) -> Option<String> {
        self.offered_endpoint.lock().expect("offer").take()
    }
}

/// Longest heartbeat / polling interval taken from a server (a day). A larger offer, up to
/// u64::MAX seconds, would overflow the clock arithmetic; 0 keeps meaning "off".
pub const MAX_HEARTBEAT_S: u64 = 86_400;

/// A server-offered `heartbeat_interval_seconds` made safe to use: 0 stays 0 (off), anything
/// else is capped at [`MAX_HEARTBEAT_S`].
pub fn clamp_heartbeat_s(s: u64) -> u64 {
    s.min(MAX_HEARTBEAT_S)
}

/// `t + d`, or `None` where the clock cannot represent it.
fn deadline(t: Instant, d: Duration) -> Option<Instant> {
    t.checked_add(d)
}

/// Transport settings.
pub struct Settings {
    /// The configured endpoint; the scheme picks the transport (ws/wss or http/https).
    pub url: String,
    pub connect_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Polling interval used by HTTP when the server turns heartbeats off.
    pub local_heartbeat_s: u64,
    /// Which offered endpoints may be followed.
    pub offer_policy: OfferedEndpoint,
    /// `[server.tls]` for wss:// (the HTTP client is built with the same configuration).
    #[cfg(feature = "tls")]
    pub tls: Arc<rustls::ClientConfig>,
}

/// An error with its sources: reqwest's own message ("error sending request") hides the TLS
/// reason (`invalid peer certificate: UnknownIssuer`) one level down.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        next = s.source();
    }
    out
}

/// What a failed connection needs the operator to check, when it is about certificates.
fn tls_hint(error: &str) -> Option<&'static str> {
    [
        ("UnknownIssuer", "the server's certificate is not signed by a trusted CA: check server.tls.ca_file"),
        ("NotValidForName", "the server's certificate does not name the host in server.url"),
        ("Expired", "the server's certificate has expired (or this host's clock is wrong)"),
        ("CertificateRequired", "the server requires a client certificate: set server.tls.cert_file and key_file"),
        ("UnknownCA", "the server refused our client certificate (server.tls.cert_file): not signed by its client CA"),
        ("BadCertificate", "the server refused our client certificate (server.tls.cert_file)"),
    ]
    .into_iter()
    .find(|(needle, _)| error.contains(needle))
    .map(|(_, hint)| hint)
}

/// True for `ws://` and `wss://` endpoints.
pub fn is_websocket(url: &str) -> bool {
    url.starts_with("ws://") || url.starts_with("wss://")
}

/// Whether an offered endpoint may replace `current` under `policy`. The connection carries
/// the credentials, so following an offer sends them wherever it points: an offer that drops
/// TLS is refused whatever the policy (a man in the middle, or a mistaken server, would get
/// the token in the clear and the agent's traffic with it), and another origin only with
/// the operator's `any`.
pub fn offer_allowed(policy: OfferedEndpoint, current: &str, offered: &str) -> Result<(), String> {
    if policy == OfferedEndpoint::Never {
        return Err("server.accept_offered_endpoint is \"never\"".into());
    }
    let cur = parse_origin(current, OPAMP_SCHEMES)?;
    let off = parse_origin(offered, OPAMP_SCHEMES)?;
    if cur.tls() && !off.tls() {
        return Err(format!(
            "it would drop TLS ({}:// to {}://), which is never done: the credentials and \
             everything the agent reports would travel in the clear",
            cur.scheme, off.scheme
        ));
    }
    if policy == OfferedEndpoint::SameOrigin && cur != off {
        return Err(format!(
            "it is another origin ({}://{}:{} instead of {}://{}:{}) and the credentials are \
             sent only to the configured one; set server.accept_offered_endpoint = \"any\" to \
             follow such offers",
            off.scheme, off.host, off.port, cur.scheme, cur.host, cur.port
        ));
    }
    check_opamp_url(offered).map(drop)
}

fn same_endpoint(a: &str, b: &str) -> bool {
    a.trim().trim_end_matches('/') == b.trim().trim_end_matches('/')
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// Reconnect after the usual backoff.
    Lost(String),
    /// Throttled: reconnect after this long, or the backoff if that is longer
    /// (Retry-After / RetryInfo).
    RetryAfter(Duration, String),
    /// The server offered another endpoint; agent_disconnect was sent on this one.
    Switch(String),
    /// Asked to stop; agent_disconnect was sent.
    Stopped,
}

const USER_AGENT: &str = concat!("flotilla-supervisor/", env!("CARGO_PKG_VERSION"));

/// What one session works with.
struct Session<'a> {
    s: &'a Settings,
    /// The endpoint of this session.
    url: &'a str,
    link: &'a Link,
    tokens: &'a TokenSource,
    inbound: &'a mpsc::Sender<ServerToAgent>,
    /// Offered endpoints that did not work before.
    refused: &'a [String],
    /// Set once the server answered a message without an error: the endpoint works.
    answered: bool,
}

impl Session<'_> {
    /// A switch the server asked for, if it is one this build can and should make. Not before
    /// this endpoint answered: a trial is judged by its own answer, and an offer still pending
    /// from the previous endpoint must not end the trial (and get this endpoint blamed for
    /// not answering) before it had the chance to.
    fn switch(&self) -> Option<String> {
        if !self.answered {
            return None;
        }
        let url = self.link.take_offer()?;
        if same_endpoint(&url, self.url) {
            return None;
        }
        if self.refused.iter().any(|r| same_endpoint(r, &url)) {
            tracing::debug!(offered = %url, "offered OpAMP endpoint failed before; staying");
            return None;
        }
        if let Err(e) = offer_allowed(self.s.offer_policy, self.url, &url) {
            tracing::warn!(offered = %url, "not switching to the offered OpAMP endpoint: {e}");
            return None;
        }
        tracing::info!(from = %self.url, to = %url, "server offered another OpAMP endpoint; switching");
        Some(url)
    }
}

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
    let mut current = s.url.clone();
    // While an offered endpoint is being tried: the one to go back to if it does not answer
    // (the spec: a client MUST verify new connection settings by actually connecting).
    let mut trial_from: Option<String> = None;
    // Offered endpoints that did not answer: the server offers again on every connection, and
    // trying each time would cost a failed connection per reconnect.
    let mut refused: Vec<String> = Vec::new();
    loop {
        let mut sess = Session {
            s: &s,
            url: &current,
            link: &link,
            tokens: &tokens,
            inbound: &inbound,
            refused: &refused,
            answered: false,
        };
        let end = if is_websocket(&current) {
            ws_session(&mut sess, &mut stop, &mut backoff).await
        } else {
            http_session(&mut sess, &mut stop, &mut backoff, &http).await
        };
        let answered = sess.answered;
        link.connected.store(false, Ordering::Relaxed);
        link.reporter.lock().expect("reporter").connection_lost();
        if let Some(prev) = trial_from.take() {
            if matches!(end, End::Stopped) {
                return;
            }
            if answered {
                tracing::info!(endpoint = %current, "the offered OpAMP endpoint works; staying on it");
            } else {
                tracing::warn!(offered = %current, back_to = %prev,
                    "the offered OpAMP endpoint did not answer ({end:?}); going back");
                refused.push(std::mem::replace(&mut current, prev));
                link.reporter.lock().expect("reporter").server_changed();
                continue;
            }
        }
        let delay = match end {
            End::Stopped => return,
            End::Switch(url) => {
                // Whatever was offered until now came from the endpoint being left: the trial
                // starts clean and is judged by the new endpoint's own answers.
                link.take_offer();
                link.reporter.lock().expect("reporter").server_changed();
                trial_from = Some(std::mem::replace(&mut current, url));
                continue;
            }
            End::RetryAfter(d, why) => {
                let d = throttle_delay(d, &mut backoff);
                tracing::warn!(retry_in_s = d.as_secs_f64(), "OpAMP server busy: {why}");
                d
            }
            End::Lost(why) => {
                let d = backoff.next_delay();
                match tls_hint(&why) {
                    Some(hint) => tracing::warn!(
                        retry_in_ms = d.as_millis() as u64,
                        hint,
                        "OpAMP connection: {why}"
                    ),
                    None => tracing::warn!(
                        retry_in_ms = d.as_millis() as u64,
                        "OpAMP connection: {why}"
                    ),
                }
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
    match clamp_heartbeat_s(link.heartbeat_s.load(Ordering::Relaxed)) {
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

/// Takes in what every answer says about the server itself: the custom capabilities it
/// declares (whether it acks results) and the ack it carries, if any.
fn note_server(link: &Link, msg: &ServerToAgent) {
    let mut r = link.reporter.lock().expect("reporter");
    if let Some(cc) = &msg.custom_capabilities {
        r.server_capabilities(&cc.capabilities);
    }
    if let Some(id) = msg.custom_message.as_ref().and_then(commands::ack_id) {
        let known = r.ack(&id);
        tracing::debug!(command_id = %id, known, "the server acknowledged a result");
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
            Some(d) => End::RetryAfter(d, why),
            None => End::Lost(why),
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

type WsSink = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    WsMessage,
>;
type WsStream = futures_util::stream::SplitStream<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
>;

/// The last message on a WebSocket: agent_disconnect (spec: MUST be in the last
/// AgentToServer, also when switching connection settings), then Close, then a short wait
/// for the server's Close so the disconnect is read, not reset. Until its Close the server may
/// still push queued commands: when switching endpoints they are handed on like any other
/// frame (the results go out on the new connection); when stopping, nobody would run them.
async fn say_goodbye(
    sess: &mut Session<'_>,
    sink: &mut WsSink,
    stream: &mut WsStream,
    replies: &mut u64,
    backoff: &mut Backoff,
    forward: bool,
) {
    let bye = sess
        .link
        .reporter
        .lock()
        .expect("reporter")
        .build_disconnect();
    let _ = sink.send(WsMessage::binary(encode_ws(&bye))).await;
    let _ = sink.send(WsMessage::Close(None)).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(f)) = stream.next().await {
            match f {
                WsMessage::Close(_) => break,
                WsMessage::Binary(data) if forward => {
                    // An error answer or a stopped core ends nothing more than this wait.
                    if let Some(End::Stopped) = ws_frame(sess, &data, replies, backoff).await {
                        break;
                    }
                }
                _ => {}
            }
        }
    })
    .await;
}

/// One Binary frame from the server: decoded, its acks and answer count taken in, handed to
/// the core. `Some` ends the session.
async fn ws_frame(
    sess: &mut Session<'_>,
    data: &[u8],
    replies: &mut u64,
    backoff: &mut Backoff,
) -> Option<End> {
    let link = sess.link;
    let msg = match decode_ws::<ServerToAgent>(data) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("undecodable ServerToAgent: {e}");
            return None;
        }
    };
    note_server(link, &msg);
    *replies += 1;
    if let Some(end) = server_error(&msg, link) {
        // UNAVAILABLE: what it answered was not taken in; nothing is confirmed and the
        // backoff is not reset.
        return Some(end);
    }
    link.reporter
        .lock()
        .expect("reporter")
        .confirm_replies(*replies);
    backoff.reset();
    sess.answered = true;
    if sess.inbound.send(msg).await.is_err() {
        return Some(End::Stopped);
    }
    None
}

async fn ws_session(
    sess: &mut Session<'_>,
    stop: &mut mpsc::Receiver<oneshot::Sender<()>>,
    backoff: &mut Backoff,
) -> End {
    let link = sess.link;
    let mut req = match sess.url.into_client_request() {
        Ok(r) => r,
        Err(e) => return End::Lost(format!("bad URL: {e}")),
    };
    let uid = link.reporter.lock().expect("reporter").uid();
    let h = req.headers_mut();
    h.insert("user-agent", HeaderValue::from_static(USER_AGENT));
    if let Ok(v) = HeaderValue::from_str(&uid.to_string()) {
        h.insert("opamp-instance-uid", v);
    }
    match sess.tokens.token().await {
        Ok(Some(t)) => {
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}")) {
                h.insert("authorization", v);
            }
        }
        Ok(None) => {}
        Err(e) => return End::Lost(e.to_string()),
    }
    #[cfg(feature = "tls")]
    let connect = tokio_tungstenite::connect_async_tls_with_config(
        req,
        None,
        false,
        Some(tokio_tungstenite::Connector::Rustls(sess.s.tls.clone())),
    );
    #[cfg(not(feature = "tls"))]
    let connect = tokio_tungstenite::connect_async(req);
    let ws = match tokio::time::timeout(sess.s.connect_timeout, connect).await {
        Err(_) => return End::Lost("connect timed out".into()),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let status = resp.status().as_u16();
            if status == 401 {
                sess.tokens.invalidate();
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
        Ok(Err(e)) => return End::Lost(error_chain(&e)),
        Ok(Ok((ws, _))) => ws,
    };
    tracing::info!(url = %sess.url, "OpAMP WebSocket connected");
    link.connected.store(true, Ordering::Relaxed);
    let (mut sink, mut stream) = ws.split();
    let mut last_sent = Instant::now();
    let mut first = true;
    // ServerToAgent messages received on this connection (each answers one of ours, in order).
    let mut replies: u64 = 0;
    loop {
        if !first {
            if let Some(url) = sess.switch() {
                say_goodbye(sess, &mut sink, &mut stream, &mut replies, backoff, true).await;
                return End::Switch(url);
            }
        }
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
        let next_hb = heartbeat(link).and_then(|d| deadline(last_sent, d));
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
                    match ws_frame(sess, &data, &mut replies, backoff).await {
                        None => {}
                        Some(End::Stopped) => return End::Stopped,
                        Some(end) => {
                            let _ = sink.send(WsMessage::Close(None)).await;
                            return end;
                        }
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
                say_goodbye(sess, &mut sink, &mut stream, &mut replies, backoff, false).await;
                tracing::info!("sent agent_disconnect and closed the OpAMP WebSocket");
                if let Some(r) = r { let _ = r.send(()); }
                return End::Stopped;
            }
        }
    }
}

async fn http_session(
    sess: &mut Session<'_>,
    stop: &mut mpsc::Receiver<oneshot::Sender<()>>,
    backoff: &mut Backoff,
    http: &reqwest::Client,
) -> End {
    let link = sess.link;
    let mut last_sent: Option<Instant> = None;
    loop {
        if last_sent.is_some() {
            if let Some(url) = sess.switch() {
                let bye = link.reporter.lock().expect("reporter").build_disconnect();
                if let Err(e) = post(sess, http, &bye).await {
                    tracing::debug!("agent_disconnect before switching endpoints: {e:?}");
                }
                return End::Switch(url);
            }
        }
        // HTTP must poll to hear from the server; with heartbeats off it polls at the local rate.
        let poll = heartbeat(link).unwrap_or(Duration::from_secs(clamp_heartbeat_s(
            sess.s.local_heartbeat_s,
        )));
        let due = match last_sent {
            None => Instant::now(),
            Some(t) => deadline(t, poll)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(MAX_HEARTBEAT_S)),
        };
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
                if let Err(e) = post(sess, http, &m).await {
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
        match post(sess, http, &msg).await {
            Ok(reply) => {
                link.connected.store(true, Ordering::Relaxed);
                note_server(link, &reply);
                if let Some(end) = server_error(&reply, link) {
                    return end;
                }
                // The answer to this POST is the answer to the one message it carried.
                link.reporter.lock().expect("reporter").confirm();
                backoff.reset();
                sess.answered = true;
                if sess.inbound.send(reply).await.is_err() {
                    return End::Stopped;
                }
            }
            Err(end) => return end,
        }
    }
}

async fn post(
    sess: &Session<'_>,
    http: &reqwest::Client,
    msg: &flotilla_proto::AgentToServer,
) -> Result<ServerToAgent, End> {
    let uid = sess.link.reporter.lock().expect("reporter").uid();
    let mut req = http
        .post(sess.url)
        .timeout(sess.s.connect_timeout)
        .header("content-type", "application/x-protobuf")
        .header("user-agent", USER_AGENT)
        .header("opamp-instance-uid", uid.to_string())
        .body(msg.encode_to_vec());
    match sess.tokens.token().await {
        Ok(Some(t)) => req = req.bearer_auth(t),
        Ok(None) => {}
        Err(e) => return Err(End::Lost(e.to_string())),
    }
    let resp = req.send().await.map_err(|e| End::Lost(error_chain(&e)))?;
    let status = resp.status().as_u16();
    match status {
        200 => {}
        401 => {
            sess.tokens.invalidate();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn test_link() -> Link {
        Link::new(
            Reporter::new(
                uuid::Uuid::now_v7(),
                0,
                vec![],
                crate::config::FullStateController::AlwaysSend,
            ),
            30,
        )
    }

    #[test]
    fn offered_heartbeats_are_clamped_and_never_overflow() {
        assert_eq!(clamp_heartbeat_s(0), 0, "0 keeps meaning off");
        assert_eq!(clamp_heartbeat_s(30), 30);
        assert_eq!(clamp_heartbeat_s(u64::MAX), MAX_HEARTBEAT_S);
        let link = test_link();
        link.heartbeat_s.store(u64::MAX, Ordering::Relaxed);
        let d = heartbeat(&link).unwrap();
        assert_eq!(d, Duration::from_secs(MAX_HEARTBEAT_S));
        assert!(deadline(Instant::now(), d).is_some());
        assert!(deadline(Instant::now(), Duration::from_secs(u64::MAX)).is_none());
    }

    #[test]
    fn offered_endpoints_are_checked() {
        assert!(check_opamp_url("ws://10.0.0.1:4320/v1/opamp").is_ok());
        assert!(check_opamp_url("http://h/v1/opamp").is_ok());
        assert!(check_opamp_url("ftp://h/x").is_err());
        assert!(check_opamp_url("ws:///v1/opamp").is_err());
        assert!(check_opamp_url("nonsense").is_err());
        assert_eq!(
            check_opamp_url("wss://h/v1/opamp").is_ok(),
            cfg!(feature = "tls")
        );
        assert!(same_endpoint("ws://h:1/v1/opamp/", " ws://h:1/v1/opamp"));
        assert!(!same_endpoint("ws://h:1/v1/opamp", "ws://h:2/v1/opamp"));
    }

    #[test]
    fn offers_never_drop_tls_and_stay_on_the_origin_by_default() {
        use OfferedEndpoint::{Any, Never, SameOrigin};
        let ok = |p, cur, off| offer_allowed(p, cur, off).is_ok();
        let tls = cfg!(feature = "tls");
        // Dropping TLS: refused under every policy.
        for p in [SameOrigin, Any, Never] {
            assert!(!ok(p, "wss://h:4320/v1/opamp", "ws://h:4320/v1/opamp"));
            assert!(!ok(p, "https://h/v1/opamp", "http://h/v1/opamp"));
            assert!(!ok(p, "wss://h/v1/opamp", "http://other/v1/opamp"));
        }
        let e = offer_allowed(Any, "wss://h/v1/opamp", "ws://h/v1/opamp").unwrap_err();
        assert!(e.contains("TLS"), "{e}");
        // Same origin: only the path may change; host case and default ports do not matter.
        assert!(ok(
            SameOrigin,
            "ws://h:4320/v1/opamp",
            "ws://h:4320/opamp/v2"
        ));
        assert!(ok(SameOrigin, "ws://H:80/v1/opamp", "ws://h/v1/opamp"));
        assert_eq!(ok(SameOrigin, "wss://h/v1/opamp", "wss://h:443/other"), tls);
        for other in [
            "ws://evil:4320/v1/opamp",
            "ws://h:4321/v1/opamp",
            "http://h:4320/v1/opamp",
            "wss://h:4320/v1/opamp",
            "ws://user@evil:4320/v1/opamp",
        ] {
            let e = offer_allowed(SameOrigin, "ws://h:4320/v1/opamp", other).unwrap_err();
            assert!(e.contains("accept_offered_endpoint"), "{other}: {e}");
        }
        // Any: another host, port or transport, and a TLS upgrade.
        assert!(ok(Any, "ws://h:4320/v1/opamp", "ws://other:9/v1/opamp"));
        assert!(ok(Any, "ws://h:4320/v1/opamp", "http://other/v1/opamp"));
        assert_eq!(ok(Any, "ws://h/v1/opamp", "wss://other/v1/opamp"), tls);
        assert!(!ok(Any, "ws://h/v1/opamp", "ftp://other/x"));
        // Never: nothing.
        assert!(!ok(Never, "ws://h:4320/v1/opamp", "ws://h:4320/v2"));
    }

    #[tokio::test]
    async fn an_offer_waits_until_the_endpoint_answered() {
        let link = test_link();
        let s = Settings {
            url: "ws://h:1/v1/opamp".into(),
            connect_timeout: Duration::from_secs(1),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(1),
            local_heartbeat_s: 30,
            offer_policy: OfferedEndpoint::SameOrigin,
            #[cfg(feature = "tls")]
            tls: crate::tls::client_config(&Default::default()).unwrap(),
        };
        let tokens = TokenSource::from_config(
            &crate::config::AuthConfig {
                kind: "none".into(),
                ..Default::default()
            },
            reqwest::Client::new(),
        );
        let (tx, _rx) = mpsc::channel(1);
        let mut sess = Session {
            s: &s,
            url: &s.url,
            link: &link,
            tokens: &tokens,
            inbound: &tx,
            refused: &[],
            answered: false,
        };
        link.offer_endpoint("ws://h:1/v2/opamp");
        assert_eq!(sess.switch(), None, "not before this endpoint answered");
        assert!(
            link.offered_endpoint.lock().unwrap().is_some(),
            "the offer is kept for later"
        );
        sess.answered = true;
        assert_eq!(sess.switch().as_deref(), Some("ws://h:1/v2/opamp"));
        // Another origin: refused under the default policy.
        link.offer_endpoint("ws://elsewhere:1/v1/opamp");
        assert_eq!(sess.switch(), None);
    }
}
