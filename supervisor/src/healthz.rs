//! The optional local `/healthz` listener (off by default): 200 when the agent runs and is
//! healthy, 503 otherwise, with a small JSON body. Hand-rolled HTTP/1.1 so the supervisor
//! carries no HTTP server stack for one endpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::view::SharedView;

/// Serves until the process ends.
pub async fn serve(listener: TcpListener, view: SharedView, connected: Arc<AtomicBool>) {
    loop {
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Out of file descriptors (EMFILE) fails every accept at once: pause instead
                // of spinning a core on the error.
                tracing::warn!("/healthz accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let view = view.clone();
        let connected = connected.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            let (code, body) = if path == "/healthz" || path == "/" {
                let v = view.lock().expect("view").clone();
                let healthy = v.running
                    && v.crash_loop.is_none()
                    && v.probe.as_ref().map(|p| p.healthy).unwrap_or(false);
                let body = serde_json::json!({
                    "status": if healthy { "ok" } else { "unhealthy" },
                    "agent_running": v.running,
                    "agent_pid": v.pid,
                    "agent_version": v.version,
                    "crash_loop": v.crash_loop,
                    "last_error": v.probe.as_ref().map(|p| p.last_error.clone()).filter(|e| !e.is_empty()).or(v.exit_error),
                    "opamp_connected": connected.load(Ordering::Relaxed),
                });
                (
                    if healthy {
                        "200 OK"
                    } else {
                        "503 Service Unavailable"
                    },
                    body.to_string(),
                )
            } else {
                ("404 Not Found", "{}".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
