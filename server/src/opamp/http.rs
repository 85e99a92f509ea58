//! The plain-HTTP transport: one POST with a binary `AgentToServer`, one binary `ServerToAgent`
//! back. Gzip in both directions, the size limit applied after decompression, at most
//! `max_in_flight` requests processed at once, and at most one queued command per poll.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use flotilla_proto::{AgentToServer, Message, ServerToAgent};
use futures_util::StreamExt;
use uuid::Uuid;

use super::session::{self, handle, Link};
use super::shared::{HttpPeer, Shared};
use crate::model::Transport;

/// The only request and response content type of OpAMP over plain HTTP.
pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// Compressed bodies bigger than this are inflated on a blocking thread, so a large config
/// does not stall the async workers.
const INLINE_GUNZIP_MAX: usize = 256 * 1024;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("message exceeds the limit of {0} bytes")]
    TooLarge(usize),
    #[error("gzip body is not valid: {0}")]
    BadGzip(std::io::Error),
    #[error("unsupported Content-Encoding {0:?} (only gzip and identity)")]
    UnsupportedEncoding(String),
    #[error("reading the request body failed: {0}")]
    Read(String),
    #[error("{0}")]
    Timeout(String),
}

/// Serves one plain-HTTP OpAMP request (auth was checked by the caller).
pub async fn serve(
    sh: Arc<Shared>,
    headers: HeaderMap,
    body: Body,
    remote: Option<SocketAddr>,
    endpoint: Option<String>,
    cert: Option<Box<crate::tls::PeerCert>>,
) -> Response {
    let cfg = &sh.ctx.cfg;
    let metrics = sh.ctx.fleet.metrics().clone();
    let limit = cfg.max_message_bytes;
    let bytes = match read_message(&headers, body, limit).await {
        Ok(b) => b,
        Err(e) => {
            let status = match e {
                BodyError::TooLarge(_) => {
                    metrics.reject("too_large");
                    StatusCode::PAYLOAD_TOO_LARGE
                }
                BodyError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                BodyError::Timeout(_) => {
                    metrics.reject("body_timeout");
                    StatusCode::REQUEST_TIMEOUT
                }
                BodyError::BadGzip(_) | BodyError::Read(_) => StatusCode::BAD_REQUEST,
            };
            if sh.log_malformed(remote) {
                tracing::warn!(remote = ?remote, error = %e, "refused OpAMP HTTP request");
            }
            return text(status, e.to_string());
        }
    };
    // The slot is taken only now, with the whole body in hand: a client that trickles its body
    // (or never sends it) holds a connection until the body read timeout, never a slot that
    // a real agent needs. try_acquire, not a queue: a burst beyond capacity is told to come
    // back, it does not pile up memory and latency here.
    let Ok(_permit) = sh.in_flight.clone().try_acquire_owned() else {
        metrics.reject("overload");
        return retry_later(
            StatusCode::TOO_MANY_REQUESTS,
            cfg.retry_after_s,
            "too many OpAMP requests in flight",
        );
    };
    let msg = match AgentToServer::decode(bytes.as_slice()) {
        Ok(m) => m,
        Err(e) => {
            // opamp-go answers 400 here: without a decoded message there is no uid to echo.
            metrics.message("malformed");
            if sh.log_malformed(remote) {
                tracing::warn!(remote = ?remote, error = %e, "OpAMP HTTP body is not an AgentToServer");
            }
            return text(
                StatusCode::BAD_REQUEST,
                format!("body is not a valid AgentToServer: {e}"),
            );
        }
    };
    drop(bytes);

    let uid = Uuid::from_slice(&msg.instance_uid).ok();
    let memo = uid.and_then(|u| sh.http_peers.get(&u));
    let mut link = Link::new(
        Transport::Http,
        remote,
        endpoint,
        memo.map_or_else(|| sh.ctx.fleet.hub().next_conn_id(), |m| m.conn_id),
    );
    link.cert = cert;
    if let Some(m) = memo {
        link.bound = uid;
        link.peer = Some(m.peer);
        link.settings_offered = m.settings_offered;
    }
    let handled = match handle(&sh, &mut link, &msg).await {
        Ok(h) => h,
        Err(e) => {
            metrics.reject("overload");
            tracing::warn!(remote = ?remote, error = %e, "OpAMP HTTP request not processed");
            return retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                cfg.retry_after_s,
                &e.to_string(),
            );
        }
    };
    if let Some(u) = uid {
        match (handled.disconnected, link.peer) {
            (true, _) => {
                sh.http_peers.remove(&u);
            }
            (false, Some(peer)) => sh.http_peers.insert(
                u,
                HttpPeer {
                    peer,
                    conn_id: link.conn_id,
                    settings_offered: link.settings_offered,
                    last: crate::model::now_ms(),
                },
            ),
            (false, None) => {}
        }
    }
    let mut reply = handled.reply;
    if let Some(agent) = handled.deliver_to {
        // One per poll: the reply is the agent's only chance, and a standard command must
        // travel alone, so a queue of them drains one poll at a time anyway.
        session::fill_reply(&sh, agent, &mut reply, 1).await;
    }
    respond(&sh, &headers, reply)
}

/// Encodes the reply: exact Content-Type, gzip when the client accepts it, never over the limit.
fn respond(sh: &Shared, headers: &HeaderMap, reply: ServerToAgent) -> Response {
    let reply = session::fit_reply(sh, reply);
    let body = reply.encode_to_vec();
    let mut resp = if accepts_gzip(headers) {
        match gzip(&body) {
            Ok(z) => {
                let mut r = Response::new(Body::from(z));
                r.headers_mut()
                    .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                r
            }
            Err(_) => Response::new(Body::from(body)),
        }
    } else {
        Response::new(Body::from(body))
    };
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    resp
}

/// An overload answer with `Retry-After` in seconds (understood by opamp-go and the Node client).
pub fn retry_later(status: StatusCode, retry_after_s: u64, why: &str) -> Response {
    let mut r = text(status, format!("{why}; retry after {retry_after_s} s"));
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    r
}

/// A short plain-text answer for errors that happen before there is a message to reply to.
pub fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Reads the body (at most `limit` bytes after decompression).
async fn read_message(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, BodyError> {
    let gz = match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
    {
        None => false,
        Some(e) if e.is_empty() || e == "identity" => false,
        Some(e) if e == "gzip" || e == "x-gzip" => true,
        Some(e) => return Err(BodyError::UnsupportedEncoding(e)),
    };
    // Compressed data is never much larger than what it inflates to; the slack covers gzip's
    // framing of incompressible input.
    let raw_limit = if gz {
        limit.saturating_add(limit / 64 + 1024)
    } else {
        limit
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > raw_limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            if crate::net::is_body_timeout(&e) {
                BodyError::Timeout(e.to_string())
            } else {
                BodyError::Read(e.to_string())
            }
        })?;
        if buf.len() + chunk.len() > raw_limit {
            return Err(BodyError::TooLarge(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    if !gz {
        return Ok(buf);
    }
    if buf.len() <= INLINE_GUNZIP_MAX {
        gunzip(&buf, limit)
    } else {
        tokio::task::spawn_blocking(move || gunzip(&buf, limit))
            .await
            .map_err(|e| BodyError::Read(e.to_string()))?
    }
}

/// Inflates `data`, stopping as soon as the output would pass `limit` (a gzip bomb costs us
/// at most `limit + 1` bytes).
pub fn gunzip(data: &[u8], limit: usize) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(BodyError::BadGzip)?;
    if out.len() > limit {
        return Err(BodyError::TooLarge(limit));
    }
    Ok(out)
}

fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data)?;
    enc.finish()
}

/// True if `Accept-Encoding` allows gzip (RFC 9110: an explicit `gzip`/`x-gzip` entry decides,
/// else `*`; `q=0` means "not acceptable"; names are case-insensitive).
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut explicit: Option<bool> = None;
    let mut wildcard: Option<bool> = None;
    for v in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let mut q = 1.0f32;
            for p in parts {
                if let Some((k, val)) = p.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("q") {
                        q = val.trim().parse().unwrap_or(0.0);
                    }
                }
            }
            let ok = q > 0.0;
            match name.as_str() {
                "gzip" | "x-gzip" => explicit = Some(explicit.unwrap_or(false) || ok),
                "*" => wildcard = Some(ok),
                _ => {}
            }
        }
    }
    explicit.or(wildcard).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ae(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, v.parse().unwrap());
        h
    }

    #[test]
    fn accept_encoding_cases() {
        for (v, want) in [
            ("gzip", true),
            ("GZIP", true),
            ("gzip, deflate", true),
            ("deflate, gzip;q=0.5", true),
            ("gzip;q=0", false),
            ("gzip; q=0.000", false),
            ("gzip;q=0, *;q=1", false),
            ("*", true),
            ("*;q=0", false),
            ("deflate, *;q=0.1", true),
            ("identity", false),
            ("br", false),
            ("x-gzip", true),
        ] {
            assert_eq!(accepts_gzip(&ae(v)), want, "{v}");
        }
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn gunzip_stops_at_the_limit() {
        let big = vec![0u8; 100_000];
        let z = gzip(&big).unwrap();
        assert!(z.len() < 1000);
        assert!(matches!(gunzip(&z, 50_000), Err(BodyError::TooLarge(_))));
        assert_eq!(gunzip(&z, 100_000).unwrap().len(), 100_000);
        assert!(matches!(
            gunzip(b"not gzip", 10),
            Err(BodyError::BadGzip(_))
        ));
    }
}
