//! Serving one listener: HTTP/1.1 connections with header and body read timeouts, a cap on the
//! connections open at once, and the process's file-descriptor budget.
//!
//! This replaces `axum::serve`, which sets no timer (so hyper's header read timeout never fires:
//! an idle or slowloris connection is held forever) and accepts until the process runs out of
//! file descriptors (then logs `accept error` every second while the *other* listener, sharing
//! the same budget, cannot accept either). Here each listener has its own connection budget, a
//! connection over it is accepted and closed at once (it costs nothing while held), idle and
//! slow connections are closed after `header_read_timeout`, and a request body must arrive
//! within `body_read_timeout`.
//!
//! HTTP/1.1 only: agents (OpAMP over HTTP and WebSocket) and operators (REST, MCP, the
//! console) all speak it, and hyper's protocol sniffing for cleartext HTTP/2 reads the first
//! bytes with no timeout at all.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// File descriptors kept for everything that is not a connection: the database and its WAL,
/// log files, the config and token files, DNS, the runtime.
pub const FD_RESERVE: u64 = 256;

/// How one listener is served.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A name for log lines: `agent` or `operator`.
    pub name: &'static str,
    /// TCP connections open at once, WebSockets included (an upgraded connection keeps its
    /// place until it closes).
    pub max_connections: usize,
    /// Time for a new connection to send a complete request head, and for an idle keep-alive
    /// connection to send the next one.
    pub header_read_timeout: Duration,
    /// Time for a request body to arrive in full, from the end of its head.
    pub body_read_timeout: Duration,
}

/// A request body that did not arrive within [`Limits::body_read_timeout`].
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(pub Duration);

/// True if `err` (an error reading a request body) is a [`BodyTimeout`].
pub fn is_body_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut e: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cur) = e {
        if cur.is::<BodyTimeout>() {
            return true;
        }
        e = cur.source();
    }
    false
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then stops accepting, lets
/// requests in progress finish, and returns once every connection has ended (upgraded
/// WebSockets have left by then: their sessions see the same cancellation).
///
/// With `tls`, each connection's handshake must finish within `header_read_timeout` (a client
/// that connects and stays silent holds its slot no longer than one that sends no request
/// head), and a verified client certificate rides on every request as a
/// [`crate::tls::PeerCert`] extension.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let conns = tokio_util::task::TaskTracker::new();
    let refused = RateLimitedWarn::new(Duration::from_secs(10));
    let accept_errors = RateLimitedWarn::new(Duration::from_secs(10));
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // EMFILE/ENFILE: nothing frees up by retrying at once. The pause is short
                    // because connections closing (timeouts) free descriptors quickly.
                    if let Some(n) = accept_errors.hit() {
                        tracing::warn!(listener = limits.name, error = %e, count = n,
                            "accept failed (counted over the last 10 s); pausing 100 ms");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once: a flood above the cap holds nothing of ours.
            drop(stream);
            if let Some(n) = refused.hit() {
                tracing::warn!(listener = limits.name, max = limits.max_connections, count = n,
                    "connections refused: listener at its connection cap (counted over the last 10 s)");
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = Counted {
            inner: stream,
            _slot: slot,
        };
        let app = app.clone();
        let limits = limits.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            let Some(acceptor) = tls else {
                serve_connection(io, remote, app, &limits, None, shutdown).await;
                return;
            };
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(io)) => r,
            };
            match stream {
                Ok(Ok(stream)) => {
                    let peer = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| crate::tls::PeerCert::from_der(c));
                    serve_connection(stream, remote, app, &limits, peer, shutdown).await;
                }
                // Debug only: scanners and plain-HTTP clients on a TLS port are routine, and
                // the client sees the TLS alert (or the close) that says why.
                Ok(Err(e)) => tracing::debug!(listener = limits.name, %remote, error = %e,
                    "TLS handshake failed"),
                Err(_) => tracing::debug!(listener = limits.name, %remote,
                    "TLS handshake not finished within the header read timeout; closed"),
            }
        });
    }
    drop(listener);
    conns.close();
    conns.wait().await;
    Ok(())
}

/// Serves HTTP/1.1 (with upgrades) on one accepted connection.
async fn serve_connection<S>(
    io: S,
    remote: SocketAddr,
    app: Router,
    limits: &Limits,
    peer: Option<crate::tls::PeerCert>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let body_timeout = limits.body_read_timeout;
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let mut req = req.map(|b| Body::new(TimedBody::new(b, body_timeout)));
        req.extensions_mut().insert(ConnectInfo(remote));
        if let Some(p) = &peer {
            req.extensions_mut().insert(p.clone());
        }
        app.clone().oneshot(req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(listener = limits.name, %remote, error = %e, "connection ended");
            }
            return;
        }
        _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    if let Err(e) = conn.await {
        tracing::debug!(listener = limits.name, %remote, error = %e, "connection ended");
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A connection holding one of its listener's slots until it is dropped, wherever it went
/// (an upgraded WebSocket carries it along).
struct Counted<S> {
    inner: S,
    _slot: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request body with a deadline: a client that sends a head and then trickles (or never
/// sends) its body is cut off, so it cannot hold the connection, or anything a handler took
/// while reading, for longer than `timeout`.
struct TimedBody {
    inner: Incoming,
    timeout: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl TimedBody {
    fn new(inner: Incoming, timeout: Duration) -> TimedBody {
        TimedBody {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl hyper::body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(r) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(r.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout(self.timeout)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts events and says, at most once per `every`, how many happened since it last said.
pub struct RateLimitedWarn {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
    total: AtomicU64,
}

impl RateLimitedWarn {
    pub fn new(every: Duration) -> RateLimitedWarn {
        RateLimitedWarn {
            every,
            state: Mutex::new((None, 0)),
            total: AtomicU64::new(0),
        }
    }

    /// Records one event; `Some(count since the last report)` when it is time to report.
    pub fn hit(&self) -> Option<u64> {
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1 += 1;
        let now = Instant::now();
        if s.0
            .is_some_and(|last| now.duration_since(last) < self.every)
        {
            return None;
        }
        let n = s.1;
        *s = (Some(now), 0);
        Some(n)
    }
}

/// The process's open-file limit after [`raise_fd_limit`]: what it is and what it could be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft open-file limit to the hard one (every connection is a descriptor; the
/// usual soft default of 1024 is far below a fleet) and returns the limit now in force.
pub fn raise_fd_limit() -> io::Result<FdLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    // rlim_t is u64 on Linux but not on every target.
    #[allow(clippy::unnecessary_cast)]
    Ok(FdLimit {
        soft: lim.rlim_cur as u64,
        hard: lim.rlim_max as u64,
    })
}

/// Splits the descriptor budget: the operator listener keeps its whole cap, the agent listener
/// gets what is left after it and [`FD_RESERVE`] (at most what it asked for). Returns the
/// agent cap and, when it had to be lowered, a warning saying so.
pub fn agent_budget(fd_soft: u64, agent_wanted: usize, operator: usize) -> (usize, Option<String>) {
    let need = agent_wanted as u64 + operator as u64 + FD_RESERVE;
    if fd_soft >= need {
        return (agent_wanted, None);
    }
    let left = fd_soft.saturating_sub(operator as u64 + FD_RESERVE).max(1) as usize;
    let cap = left.min(agent_wanted);
    (
        cap,
        Some(format!(
            "the open-file limit is {fd_soft}, below the {need} that opamp.max_connections + \
             opamp.max_in_flight + api.max_connections need: the agent listener holds at most \
             {cap} connections (raise the hard limit, e.g. LimitNOFILE= in the systemd unit)"
        )),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_fd_limit_is_raised_to_the_hard_one() {
        let l = raise_fd_limit().unwrap();
        assert_eq!(l.soft, l.hard);
    }

    #[test]
    fn the_agent_listener_gets_what_the_operator_listener_leaves() {
        assert_eq!(agent_budget(1_000_000, 1000, 100), (1000, None));
        let (cap, warn) = agent_budget(1024, 200_000, 512);
        assert_eq!(cap, 1024 - 512 - FD_RESERVE as usize);
        assert!(warn.unwrap().contains("1024"));
        assert_eq!(agent_budget(100, 10, 512).0, 1);
    }

    #[test]
    fn rate_limited_warnings_count_what_they_swallowed() {
        let w = RateLimitedWarn::new(Duration::from_secs(3600));
        assert_eq!(w.hit(), Some(1));
        assert_eq!(w.hit(), None);
        assert_eq!(w.hit(), None);
        let w = RateLimitedWarn::new(Duration::ZERO);
        assert_eq!(w.hit(), Some(1));
        assert_eq!(w.hit(), Some(1));
    }
}
