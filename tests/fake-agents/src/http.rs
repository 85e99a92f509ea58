//! A deliberately small HTTP/1.1 server. The fakes need byte-level control of what goes
//! on the wire (exact header sets such as `server: Fluent Bit` without an added `date`,
//! empty 404 bodies, a 405 with `allow`, and a connection dropped without an answer), so
//! they do not use a framework that adds its own headers.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Query parameters, percent-decoded, in order.
    pub fn query_params(&self) -> Vec<(String, String)> {
        self.query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Close the connection without writing anything (see rpc_processes.killWorkers.json).
    pub hang_up: bool,
    /// A status line without a reason phrase (`HTTP/1.1 200`), as Fluent Bit's monitoring
    /// server writes it (H_v2_reload_GET_raw.json).
    pub bare_status: bool,
}

impl Response {
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            hang_up: false,
            bare_status: false,
        }
    }

    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }

    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = b.into();
        self
    }

    pub fn bare_status(mut self) -> Self {
        self.bare_status = true;
        self
    }

    pub fn hang_up() -> Self {
        Response {
            hang_up: true,
            ..Response::new(0)
        }
    }
}

pub type Handler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// Binds a listening socket. `reuse_port` lets two processes share the port, which the
/// fake Fluentd needs for its zero-downtime restart (the real one passes sockets between
/// supervisors; see zdr-serverengine-2.4.0.log).
pub fn bind(addr: &str, reuse_port: bool) -> std::io::Result<TcpListener> {
    let sa: std::net::SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(_) => std::net::ToSocketAddrs::to_socket_addrs(addr)?
            .next()
            .ok_or_else(|| std::io::Error::other("unresolvable address"))?,
    };
    let sock = if sa.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    if reuse_port {
        sock.set_reuseport(true)?;
    }
    sock.bind(sa)?;
    sock.listen(1024)
}

/// Serves `handler` on `listener` until the returned task is aborted.
pub fn serve(listener: TcpListener, handler: Handler) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let h = handler.clone();
                    tokio::spawn(async move {
                        let _ = connection(stream, h).await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
}

async fn connection(stream: TcpStream, handler: Handler) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("/").to_string();
        let version = parts.next().unwrap_or("HTTP/1.1").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).await? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        let mut body = Vec::new();
        if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let mut size = String::new();
                reader.read_line(&mut size).await?;
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                    .unwrap_or(0);
                if n == 0 {
                    let mut end = String::new();
                    reader.read_line(&mut end).await?;
                    break;
                }
                let mut chunk = vec![0; n + 2];
                reader.read_exact(&mut chunk).await?;
                chunk.truncate(n);
                body.extend_from_slice(&chunk);
            }
        } else if let Some(n) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body = vec![0; n];
            reader.read_exact(&mut body).await?;
        }
        let close = find("connection").is_some_and(|v| v == "close") || version == "HTTP/1.0";
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (target.clone(), String::new()),
        };
        let resp = handler(Request {
            method,
            path,
            query,
            headers,
            body,
        });
        if resp.hang_up {
            return Ok(());
        }
        let mut out = if resp.bare_status {
            format!("HTTP/1.1 {}\r\n", resp.status)
        } else {
            format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status))
        };
        for (k, v) in &resp.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        if !resp
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        {
            out.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
        }
        out.push_str("\r\n");
        let stream = reader.get_mut();
        stream.write_all(out.as_bytes()).await?;
        stream.write_all(&resp.body).await?;
        stream.flush().await?;
        if close {
            return Ok(());
        }
    }
}
