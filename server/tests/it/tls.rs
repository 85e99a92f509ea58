//! TLS on the listeners with certificates made here by rcgen (a private CA, good, expired and
//! wrong-host server certificates, client certificates): OpAMP over https and wss, REST over
//! https, old protocol versions and plain HTTP refused, certificate reload without restart, the
//! startup checks of the key file, and mTLS for agents: client certificates verified, recorded
//! on the agent and pinned to its uid, and `opamp.agent_auth = "mtls"`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::Message;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::net::LogBuf;
use crate::support::{agent_status, TestServer, ADMIN_TOKEN};

const WAIT: Duration = Duration::from_secs(10);

/// A private certificate authority.
pub(crate) struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A certificate and its key, PEM, and the certificate's DER.
pub(crate) struct Leaf {
    pub pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    pub(crate) fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `names` (DNS names), valid now.
    pub(crate) fn server(&self, names: &[&str]) -> Leaf {
        self.leaf(names, "server", false, None)
    }

    /// A client certificate with subject CN `cn` and DNS/URI names `names`, valid now.
    pub(crate) fn client(&self, cn: &str, names: &[&str]) -> Leaf {
        self.leaf(names, cn, true, None)
    }

    /// A server certificate for `names` that expired in 2021.
    fn expired_server(&self, names: &[&str]) -> Leaf {
        self.leaf(
            names,
            "server",
            false,
            Some((
                rcgen::date_time_ymd(2020, 1, 1),
                rcgen::date_time_ymd(2021, 1, 1),
            )),
        )
    }

    fn leaf(
        &self,
        names: &[&str],
        cn: &str,
        client: bool,
        validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
    ) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, cn.to_string());
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        if let Some((from, to)) = validity {
            p.not_before = from;
            p.not_after = to;
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// Writes a pair as `<stem>.crt` and `<stem>.key` (mode 0600) in `dir`; rewrites in place.
pub(crate) fn write_pair(dir: &Path, stem: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    write_private(&key, &leaf.key_pem);
    std::fs::write(&cert, &leaf.pem).unwrap();
    (cert, key)
}

pub(crate) fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// A client configuration trusting `ca_pem`, offering `versions`, with an optional client
/// certificate.
pub(crate) fn client_config(
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    identity: Option<&Leaf>,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots);
    match identity {
        None => b.with_no_client_auth(),
        Some(l) => b
            .with_client_auth_cert(
                vec![CertificateDer::from(l.der.clone())],
                PrivateKeyDer::from_pem_slice(l.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    }
}

/// A TLS connection to `addr` as `name`, verified against `ca_pem` (TLS 1.2 and 1.3).
pub(crate) async fn connect(
    addr: SocketAddr,
    name: &str,
    ca_pem: &str,
    identity: Option<&Leaf>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let cfg = client_config(ca_pem, rustls::ALL_VERSIONS, identity);
    connect_with(addr, name, cfg).await
}

async fn connect_with(
    addr: SocketAddr,
    name: &str,
    cfg: rustls::ClientConfig,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = ServerName::try_from(name.to_string()).unwrap();
    tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
}

/// The leaf certificate the server presented.
fn presented(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// One HTTP/1.1 request on an established stream; the status line and body.
async fn http_over<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    head: &str,
) -> String {
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

/// A server with `[tls]` set to a certificate for `localhost` from `ca`.
async fn tls_server(dir: &Path, ca: &Ca, reload_s: u64) -> TestServer {
    let (cert, key) = write_pair(dir, "server", &ca.server(&["localhost"]));
    TestServer::start_with(move |c| {
        c.tls.cert_file = Some(cert);
        c.tls.key_file = Some(key);
        c.tls.reload_interval_s = reload_s;
    })
    .await
}

/// A reqwest client that trusts `ca_pem` and reaches `localhost` at `addr`.
fn https_client(ca_pem: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .resolve("localhost", addr)
        .build()
        .unwrap()
}

#[tokio::test]
async fn opamp_over_https_and_wss_and_rest_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Flotilla test CA");
    let server = tls_server(dir.path(), &ca, 5).await;

    // Plain-HTTP OpAMP over https.
    let uid = uuid::Uuid::now_v7();
    let msg = agent_status(uid, 0, &[("host.name", "tls-http")], 1, &[]);
    let http = https_client(&ca.pem(), server.opamp);
    let resp = http
        .post(format!(
            "https://localhost:{}{}",
            server.opamp.port(),
            server.config.opamp.path
        ))
        .header("Content-Type", "application/x-protobuf")
        .body(msg.encode_to_vec())
        .send()
        .await
        .expect("OpAMP over https");
    assert_eq!(resp.status(), 200);
    let reply =
        flotilla_proto::ServerToAgent::decode(resp.bytes().await.unwrap().as_ref()).unwrap();
    assert_eq!(reply.instance_uid, uid.as_bytes().to_vec());

    // WebSocket OpAMP over wss, negotiated as http/1.1.
    let tls = connect(server.opamp, "localhost", &ca.pem(), None)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), None::<&[u8]>);
    let url = format!(
        "wss://localhost:{}{}",
        server.opamp.port(),
        server.config.opamp.path
    );
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket upgrade over TLS");
    assert_eq!(resp.status(), 101);
    let wuid = uuid::Uuid::now_v7();
    let mut frame = vec![0u8];
    frame.extend(agent_status(wuid, 0, &[("host.name", "tls-ws")], 1, &[]).encode_to_vec());
    ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        frame.into(),
    ))
    .await
    .unwrap();
    let answer = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("answer") {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b))) => break b,
            Some(Ok(_)) => continue,
            other => panic!("no ServerToAgent over wss: {other:?}"),
        }
    };
    assert_eq!(answer[0], 0);
    let reply = flotilla_proto::ServerToAgent::decode(&answer[1..]).unwrap();
    assert_eq!(reply.instance_uid, wuid.as_bytes().to_vec());

    // REST over https sees both agents.
    let api = https_client(&ca.pem(), server.api);
    let list: serde_json::Value = api
        .get(format!(
            "https://localhost:{}/api/v1/agents",
            server.api.port()
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("REST over https")
        .json()
        .await
        .unwrap();
    let text = list.to_string();
    assert!(
        text.contains(&uid.to_string()) && text.contains(&wuid.to_string()),
        "{text}"
    );
    drop(ws);
    server.stop().await;
}

#[tokio::test]
async fn tls_1_2_is_served_older_versions_and_plain_http_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Flotilla test CA");
    let server = tls_server(dir.path(), &ca, 5).await;

    let cfg = client_config(&ca.pem(), &[&rustls::version::TLS12], None);
    let mut s = connect_with(server.api, "localhost", cfg)
        .await
        .expect("TLS 1.2 handshake");
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let out = http_over(
        &mut s,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");

    // A TLS 1.1 ClientHello (legacy version 3.2, no supported_versions extension) gets a
    // fatal alert, never a ServerHello.
    let mut hello = vec![0x03, 0x02];
    hello.extend([7u8; 32]);
    hello.push(0); // session id
    hello.extend([0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // two TLS 1.1 cipher suites
    hello.extend([0x01, 0x00]); // null compression
    let mut hs = vec![0x01, 0, 0, hello.len() as u8];
    hs.extend(&hello);
    let mut record = vec![0x16, 0x03, 0x02, 0, hs.len() as u8];
    record.extend(&hs);
    let mut tcp = TcpStream::connect(server.api).await.unwrap();
    tcp.write_all(&record).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out))
        .await
        .expect("closed in time")
        .ok();
    assert_eq!(out.first(), Some(&0x15), "an alert record: {out:?}");
    assert_eq!(out.get(5), Some(&2), "a fatal alert: {out:?}");

    // Plain HTTP to the TLS port: no HTTP answer, the connection is closed.
    let mut tcp = TcpStream::connect(server.api).await.unwrap();
    let out = http_over(
        &mut tcp,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        !out.starts_with("HTTP/"),
        "plain HTTP answered on a TLS port: {out}"
    );
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", server.api))
        .send()
        .await;
    assert!(plain.is_err(), "a plain-HTTP client must fail: {plain:?}");

    // The listener is unharmed.
    let ok = https_client(&ca.pem(), server.api)
        .get(format!("https://localhost:{}/healthz", server.api.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_restart_and_a_broken_one_is_not() {
    let (logs, _guard) = LogBuf::capture(tracing::Level::INFO);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Flotilla test CA");
    let first = ca.server(&["localhost"]);
    let (cert, key) = write_pair(dir.path(), "server", &first);
    let server = TestServer::start_with({
        let (cert, key) = (cert.clone(), key.clone());
        move |c| {
            c.tls.cert_file = Some(cert);
            c.tls.key_file = Some(key);
            c.tls.reload_interval_s = 1;
        }
    })
    .await;
    let mut before = connect(server.opamp, "localhost", &ca.pem(), None)
        .await
        .unwrap();
    assert_eq!(presented(&before), first.der);

    let renewed = ca.server(&["localhost"]);
    write_pair(dir.path(), "server", &renewed);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = connect(server.opamp, "localhost", &ca.pem(), None)
            .await
            .unwrap();
        if presented(&s) == renewed.der {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The connection made before the renewal is still open and usable.
    let out = http_over(
        &mut before,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 "), "{out}");

    // A broken pair: the certificate of one key with another key.
    let other = ca.server(&["localhost"]);
    write_private(&key, &other.key_pem);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !logs.text().contains("TLS certificate reload failed") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ERROR for the broken pair: {}",
            logs.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("TLS certificate reload failed"))
        .unwrap();
    assert!(
        line.contains("ERROR") && line.contains("do not make a pair"),
        "{line}"
    );
    assert!(
        !text.contains("PRIVATE KEY"),
        "key material in the log: {text}"
    );
    let s = connect(server.opamp, "localhost", &ca.pem(), None)
        .await
        .expect("the renewed certificate is kept");
    assert_eq!(presented(&s), renewed.der);
    drop(_guard);
    server.stop().await;
}

#[tokio::test]
async fn expired_unknown_ca_and_wrong_host_certificates_are_refused_by_a_verifying_client() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Flotilla test CA");
    let cases: [(&str, Leaf, String, &str); 3] = [
        (
            "expired",
            ca.expired_server(&["localhost"]),
            ca.pem(),
            "Expired",
        ),
        (
            "unknown CA",
            Ca::new("Someone else's CA").server(&["localhost"]),
            ca.pem(),
            "UnknownIssuer",
        ),
        (
            "wrong host",
            ca.server(&["flotilla.example"]),
            ca.pem(),
            "NotValidForName",
        ),
    ];
    for (what, leaf, trust, why) in cases {
        let (cert, key) = write_pair(dir.path(), "server", &leaf);
        let server = TestServer::start_with(move |c| {
            c.tls.cert_file = Some(cert);
            c.tls.key_file = Some(key);
        })
        .await;
        let err = connect(server.opamp, "localhost", &trust, None)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: the handshake succeeded"));
        assert!(
            format!("{err:?}").contains(why),
            "{what}: refused for another reason: {err:?}"
        );
        let r = https_client(&trust, server.api)
            .get(format!("https://localhost:{}/healthz", server.api.port()))
            .send()
            .await;
        assert!(r.is_err(), "{what}: reqwest accepted it");
        server.stop().await;
    }
}

#[test]
fn a_key_readable_by_others_or_a_mismatched_pair_stops_the_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Flotilla test CA");
    let (cert, key) = write_pair(dir.path(), "server", &ca.server(&["localhost"]));
    let mut cfg = flotilla_server::config::Config {
        data_dir: dir.path().join("data"),
        ..Default::default()
    };
    cfg.opamp.tls.cert_file = Some(cert.clone());
    cfg.opamp.tls.key_file = Some(key.clone());
    assert!(cfg.validate().is_ok());

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("opamp.tls.key_file") && err.contains("readable by other users"),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    write_private(&key, &ca.server(&["localhost"]).key_pem);
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("do not make a pair"), "{err}");

    cfg.opamp.tls.key_file = None;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("opamp.tls.cert_file is set without"), "{err}");
}

#[test]
fn the_tls_files_come_from_the_environment_too() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Flotilla test CA");
    let (cert, key) = write_pair(dir.path(), "server", &ca.server(&["localhost"]));
    let cfg = flotilla_server::config::Config::load(
        None,
        [
            (
                "FLOTILLA_TLS_CERT_FILE".to_string(),
                cert.display().to_string(),
            ),
            (
                "FLOTILLA_TLS_KEY_FILE".to_string(),
                key.display().to_string(),
            ),
            (
                "FLOTILLA_DATA_DIR".to_string(),
                dir.path().join("d").display().to_string(),
            ),
        ],
    )
    .unwrap();
    let v = cfg.validate().unwrap();
    assert!(v.tls.opamp.is_some() && v.tls.api.is_some());
    assert!(v.tls.chat.is_none(), "no chat gateway, no chat listener");
}

/// A server whose agent listener serves a `localhost` certificate from `ca` and verifies client
/// certificates against `agents` (PEM in `dir`), configured further by `f`.
async fn mtls_server(
    dir: &Path,
    ca: &Ca,
    agents: &Ca,
    f: impl FnOnce(&mut flotilla_server::config::Config),
) -> TestServer {
    let (cert, key) = write_pair(dir, "server", &ca.server(&["localhost"]));
    let client_ca = dir.join("agents-ca.crt");
    std::fs::write(&client_ca, agents.pem()).unwrap();
    TestServer::start_with(move |c| {
        c.opamp.tls.cert_file = Some(cert);
        c.opamp.tls.key_file = Some(key);
        c.opamp.tls.client_ca_file = Some(client_ca);
        f(c);
    })
    .await
}

/// An OpAMP WebSocket over TLS to the agent listener, presenting `identity`.
async fn wss(
    server: &TestServer,
    ca_pem: &str,
    identity: Option<&Leaf>,
) -> tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>> {
    let tls = connect(server.opamp, "localhost", ca_pem, identity)
        .await
        .expect("TLS handshake");
    let url = format!(
        "wss://localhost:{}{}",
        server.opamp.port(),
        server.config.opamp.path
    );
    tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket upgrade over TLS")
        .0
}

/// Sends one `AgentToServer` and returns the answer, or `None` if the connection was closed
/// (after a Close frame, whose code comes back in the `Err`).
async fn exchange(
    ws: &mut tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>,
    msg: &flotilla_proto::AgentToServer,
) -> flotilla_proto::ServerToAgent {
    use tokio_tungstenite::tungstenite::Message as M;
    let mut frame = vec![0u8];
    frame.extend(msg.encode_to_vec());
    ws.send(M::Binary(frame.into())).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("answer") {
            Some(Ok(M::Binary(b))) => {
                return flotilla_proto::ServerToAgent::decode(&b[1..]).unwrap()
            }
            Some(Ok(_)) => continue,
            other => panic!("no ServerToAgent: {other:?}"),
        }
    }
}

/// The close code of the server's Close frame, once it comes.
async fn closed_with(ws: &mut tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>) -> u16 {
    use tokio_tungstenite::tungstenite::Message as M;
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(M::Close(Some(f)))) => return f.code.into(),
            Some(Ok(_)) => continue,
            other => panic!("no Close frame: {other:?}"),
        }
    }
}

/// OpAMP over https presenting `identity` (and `token` as a bearer, if any): the status and,
/// on 200, the answer.
async fn https_post(
    server: &TestServer,
    ca_pem: &str,
    identity: Option<&Leaf>,
    token: Option<&str>,
    msg: &flotilla_proto::AgentToServer,
) -> Result<(u16, Option<flotilla_proto::ServerToAgent>), reqwest::Error> {
    let mut b = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .resolve("localhost", server.opamp);
    if let Some(l) = identity {
        let pem = format!("{}{}", l.pem, l.key_pem);
        b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    let mut req = b
        .build()
        .unwrap()
        .post(format!(
            "https://localhost:{}{}",
            server.opamp.port(),
            server.config.opamp.path
        ))
        .header("Content-Type", "application/x-protobuf")
        .body(msg.encode_to_vec());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await?;
    Ok((
        status,
        (status == 200).then(|| flotilla_proto::ServerToAgent::decode(body.as_ref()).unwrap()),
    ))
}

/// True when the listener refuses a TLS client presenting `identity`: the handshake fails, or
/// (TLS 1.3 sends the client's certificate after the client considers itself connected) the
/// first request gets no HTTP answer.
async fn refuses(server: &TestServer, ca_pem: &str, identity: Option<&Leaf>) -> bool {
    let Ok(mut s) = connect(server.opamp, "localhost", ca_pem, identity).await else {
        return true;
    };
    let out = http_over(
        &mut s,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    !out.starts_with("HTTP/")
}

#[tokio::test]
async fn client_certificates_are_verified_recorded_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Flotilla test CA");
    let agents = Ca::new("Flotilla agents CA");
    let server = mtls_server(dir.path(), &ca, &agents, |_| {}).await;
    assert_eq!(
        server.config.opamp.tls.client_auth,
        flotilla_server::config::ClientAuthMode::Required,
        "required is the default"
    );

    // A valid client certificate: accepted, and its identity recorded on the agent.
    let leaf = agents.client(
        "agent-7",
        &["web-7.example", "spiffe://example.org/agent/7"],
    );
    let uid = uuid::Uuid::now_v7();
    let mut ws = wss(&server, &ca.pem(), Some(&leaf)).await;
    let reply = exchange(
        &mut ws,
        &agent_status(uid, 0, &[("host.name", "web-7")], 1, &[]),
    )
    .await;
    assert!(reply.error_response.is_none(), "{reply:?}");
    let (status, a) = server.rest().get(&format!("/api/v1/agents/{uid}")).await;
    assert_eq!(status, 200, "{a}");
    let c = &a["client_certificate"];
    assert_eq!(c["identity"], "agent-7", "{a}");
    assert_eq!(c["subject_cn"], "agent-7", "{a}");
    assert_eq!(
        c["sans"],
        serde_json::json!(["web-7.example", "spiffe://example.org/agent/7"]),
        "{a}"
    );
    use sha2::Digest;
    assert_eq!(
        c["sha256"],
        hex::encode(sha2::Sha256::digest(&leaf.der)),
        "{a}"
    );
    drop(ws);
    // MCP's agent_get shows the same.
    let mcp = crate::mcp::connect(
        &server,
        ADMIN_TOKEN,
        crate::mcp::Revision::Session,
        Default::default(),
    )
    .await;
    let v = crate::mcp::ok(
        &crate::mcp::call(
            &mcp,
            "agent_get",
            serde_json::json!({"agent": uid.to_string()}),
        )
        .await,
    );
    assert_eq!(v["client_certificate"], *c, "{v}");
    drop(mcp);

    // Plain HTTP over https with the certificate: accepted too.
    let huid = uuid::Uuid::now_v7();
    let (status, reply) = https_post(
        &server,
        &ca.pem(),
        Some(&leaf),
        None,
        &agent_status(huid, 0, &[("host.name", "web-7h")], 1, &[]),
    )
    .await
    .expect("OpAMP over https with a client certificate");
    assert_eq!(status, 200);
    assert!(reply.unwrap().error_response.is_none());
    let (_, a) = server.rest().get(&format!("/api/v1/agents/{huid}")).await;
    assert_eq!(a["client_certificate"]["identity"], "agent-7", "{a}");

    // client_auth = "required": no certificate, no handshake.
    assert!(
        refuses(&server, &ca.pem(), None).await,
        "a client without a certificate was served"
    );
    // A certificate from another CA: refused at the handshake.
    let stranger = Ca::new("Someone else's CA").client("agent-7", &["web-7.example"]);
    assert!(
        refuses(&server, &ca.pem(), Some(&stranger)).await,
        "a certificate from another CA was served"
    );
    assert!(
        https_post(
            &server,
            &ca.pem(),
            Some(&stranger),
            None,
            &agent_status(uuid::Uuid::now_v7(), 0, &[], 1, &[])
        )
        .await
        .is_err(),
        "reqwest got through with another CA's certificate"
    );
    // The listener is unharmed.
    assert!(!refuses(&server, &ca.pem(), Some(&leaf)).await);
    server.stop().await;
}

#[tokio::test]
async fn a_pinned_uid_refuses_another_certificate_logs_and_audits_it() {
    let (logs, _guard) = LogBuf::capture(tracing::Level::INFO);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Flotilla test CA");
    let agents = Ca::new("Flotilla agents CA");
    let server = mtls_server(dir.path(), &ca, &agents, |c| c.opamp.tls.pin_uid = true).await;
    let first = agents.client("agent-1", &["web-1.example"]);
    let other = agents.client("agent-2", &["web-2.example"]);
    let uid = uuid::Uuid::now_v7();

    // The first certificate seen for the uid is pinned.
    let mut ws = wss(&server, &ca.pem(), Some(&first)).await;
    let r = exchange(
        &mut ws,
        &agent_status(uid, 0, &[("host.name", "web-1")], 1, &[]),
    )
    .await;
    assert!(r.error_response.is_none(), "{r:?}");
    drop(ws);

    // Another certificate of the same CA, speaking as that uid: an OpAMP error, then Close.
    let mut ws = wss(&server, &ca.pem(), Some(&other)).await;
    let r = exchange(
        &mut ws,
        &agent_status(uid, 1, &[("host.name", "web-1")], 1, &[]),
    )
    .await;
    let e = r.error_response.expect("a ServerErrorResponse");
    assert_eq!(
        e.r#type,
        flotilla_proto::ServerErrorResponseType::BadRequest as i32
    );
    assert!(e.error_message.contains("pinned"), "{}", e.error_message);
    assert_eq!(r.instance_uid, uid.as_bytes().to_vec());
    assert_eq!(
        closed_with(&mut ws).await,
        1008,
        "closed as a policy violation"
    );

    // Over https too.
    let (status, reply) = https_post(
        &server,
        &ca.pem(),
        Some(&other),
        None,
        &agent_status(uid, 2, &[("host.name", "web-1")], 1, &[]),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert!(
        reply.unwrap().error_response.is_some(),
        "https with another certificate was not refused"
    );

    // The record keeps the pinned certificate and the impostor's attributes never reached it.
    let (_, a) = server.rest().get(&format!("/api/v1/agents/{uid}")).await;
    use sha2::Digest;
    assert_eq!(
        a["client_certificate"]["sha256"],
        hex::encode(sha2::Sha256::digest(&first.der)),
        "{a}"
    );
    assert_eq!(a["sequence_num"], 0, "{a}");

    // The agent with its own certificate still gets in.
    let mut ws = wss(&server, &ca.pem(), Some(&first)).await;
    let r = exchange(
        &mut ws,
        &agent_status(uid, 1, &[("host.name", "web-1")], 1, &[]),
    )
    .await;
    assert!(r.error_response.is_none(), "{r:?}");
    drop(ws);

    // Logged with mode, source and reason; the refusal is audited.
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("OpAMP agent refused"))
        .unwrap_or_else(|| panic!("no log line: {text}"));
    assert!(
        line.contains("WARN")
            && line.contains("mode=\"mtls\"")
            && line.contains("remote=127.0.0.1:")
            && line.contains("not the one pinned"),
        "{line}"
    );
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    let (status, page) = server
        .rest()
        .get("/api/v1/audit?operation=agent.refused")
        .await;
    assert_eq!(status, 200, "{page}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "one per refusal: {page}");
    let rec = &items[0];
    assert_eq!(
        rec["targets"],
        serde_json::json!([uid.to_string()]),
        "{rec}"
    );
    assert_eq!(rec["channel"], "system", "{rec}");
    assert_eq!(rec["params"]["mode"], "mtls", "{rec}");
    assert_eq!(
        rec["params"]["certificate"]["sha256"],
        hex::encode(sha2::Sha256::digest(&other.der)),
        "{rec}"
    );
    let (_, v) = server.rest().get("/api/v1/audit/verify").await;
    assert_eq!(v["intact"], true, "{v}");
    drop(_guard);
    server.stop().await;
}

#[tokio::test]
async fn agent_auth_mtls_admits_by_certificate_alone() {
    let (logs, _guard) = LogBuf::capture(tracing::Level::INFO);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Flotilla test CA");
    let agents = Ca::new("Flotilla agents CA");
    let tokens = dir.path().join("agent-tokens");
    write_private(&tokens, "agent-token-0123456789\n");
    let server = mtls_server(dir.path(), &ca, &agents, |c| {
        c.opamp.tls.client_auth = flotilla_server::config::ClientAuthMode::Optional;
        c.opamp.agent_tokens_file = Some(tokens);
        c.opamp.agent_auth = Some(flotilla_server::config::AgentAuthMode::Mtls);
    })
    .await;
    let leaf = agents.client("agent-9", &[]);
    let msg = |host: &str| agent_status(uuid::Uuid::now_v7(), 0, &[("host.name", host)], 1, &[]);

    // A certificate alone, the token alone: in. Neither (or a wrong token): 401, logged.
    let cases: [(Option<&Leaf>, Option<&str>, u16); 4] = [
        (Some(&leaf), None, 200),
        (None, Some("agent-token-0123456789"), 200),
        (None, None, 401),
        (None, Some("agent-token-guess"), 401),
    ];
    for (i, (identity, token, want)) in cases.into_iter().enumerate() {
        let (status, _) = https_post(&server, &ca.pem(), identity, token, &msg(&format!("a{i}")))
            .await
            .unwrap();
        assert_eq!(status, want, "case {i}");
    }
    let text = logs.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("OpAMP agent authentication failed"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("mode=\"mtls\"") && lines[0].contains("reason=\"no client certificate\""),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("unknown bearer token"), "{}", lines[1]);
    assert!(
        !text.contains("agent-token-guess"),
        "a token was logged: {text}"
    );
    drop(_guard);
    server.stop().await;
}

#[test]
fn agent_auth_modes_are_checked_at_start() {
    use flotilla_server::config::AgentAuthMode;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("agent-tokens");
    write_private(&tokens, "t0123456789\n");
    let base = flotilla_server::config::Config {
        data_dir: dir.path().join("data"),
        ..Default::default()
    };
    let cases = [
        (
            Some(AgentAuthMode::Mtls),
            None,
            "needs opamp.tls.client_ca_file",
        ),
        (
            Some(AgentAuthMode::Token),
            None,
            "needs opamp.agent_tokens_file",
        ),
        (
            Some(AgentAuthMode::None),
            Some(tokens.clone()),
            "opamp.agent_tokens_file is set",
        ),
    ];
    for (mode, file, why) in cases {
        let mut c = base.clone();
        c.opamp.agent_auth = mode;
        c.opamp.agent_tokens_file = file;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(why), "{mode:?}: {err}");
    }
    let mut c = base.clone();
    c.opamp.agent_tokens_file = Some(tokens);
    assert_eq!(c.opamp.agent_auth_mode(), AgentAuthMode::Token);
    assert!(c.validate().is_ok());
    assert_eq!(base.opamp.agent_auth_mode(), AgentAuthMode::None);
}

#[tokio::test]
async fn the_client_ca_is_reloaded_when_its_file_changes() {
    let (logs, _guard) = LogBuf::capture(tracing::Level::INFO);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Flotilla test CA");
    let old = Ca::new("Agents CA 2025");
    let new = Ca::new("Agents CA 2026");
    let server = mtls_server(dir.path(), &ca, &old, |c| c.tls.reload_interval_s = 1).await;
    let client_ca = dir.path().join("agents-ca.crt");
    let (old_leaf, new_leaf) = (old.client("agent-old", &[]), new.client("agent-new", &[]));
    assert!(!refuses(&server, &ca.pem(), Some(&old_leaf)).await);
    assert!(refuses(&server, &ca.pem(), Some(&new_leaf)).await);

    // The CA is rotated in place: new handshakes verify against the new one, no restart.
    std::fs::write(&client_ca, new.pem()).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while refuses(&server, &ca.pem(), Some(&new_leaf)).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new client CA was never used: {}",
            logs.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(refuses(&server, &ca.pem(), Some(&old_leaf)).await);
    assert!(
        logs.text().contains("TLS client CA reloaded"),
        "{}",
        logs.text()
    );

    // A broken CA file: reported once at ERROR, the CA in use kept.
    std::fs::write(&client_ca, "not a certificate\n").unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !logs.text().contains("TLS client CA reload failed") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ERROR for the broken CA file: {}",
            logs.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let text = logs.text();
    let failures: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("TLS client CA reload failed"))
        .collect();
    assert_eq!(failures.len(), 1, "reported once per content: {text}");
    assert!(
        failures[0].contains("ERROR") && failures[0].contains("opamp.tls.client_ca_file"),
        "{}",
        failures[0]
    );
    assert!(!refuses(&server, &ca.pem(), Some(&new_leaf)).await);
    assert!(refuses(&server, &ca.pem(), Some(&old_leaf)).await);
    drop(_guard);
    server.stop().await;
}
