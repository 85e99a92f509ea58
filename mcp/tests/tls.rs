//! `RestBackend` over `https://`: a real TLS handshake with a local rustls server whose
//! certificate comes from a test CA (`tests/fixtures/tls`, made with openssl; valid until
//! 2125). Trusted through `RestOptions::ca_file`, the call succeeds and carries the token;
//! without it the certificate is refused and nothing is sent.

use std::path::PathBuf;
use std::sync::Arc;

use flotilla_mcp::{FleetBackend, RestBackend, RestOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// Serves one canned fleet summary per connection over TLS; each request head is sent on
/// the returned channel.
async fn tls_server() -> (u16, mpsc::UnboundedReceiver<String>) {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&std::fs::read(fixture("server.pem")).unwrap())
            .collect::<Result<_, _>>()
            .unwrap();
    let key =
        PrivateKeyDer::from_pem_slice(&std::fs::read(fixture("server.key")).unwrap()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                // A refused handshake (the client does not trust us) just ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&head).to_string());
                let body =
                    r#"{"total":7,"by_type":{},"by_version":{},"by_health":{},"by_state":{}}"#;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn https_with_a_trusted_ca_file() {
    let (port, mut heads) = tls_server().await;
    let opts = RestOptions {
        ca_file: Some(fixture("ca.pem")),
    };
    for host in ["localhost", "127.0.0.1"] {
        let b = RestBackend::with_options(
            &format!("https://{host}:{port}"),
            Some("tls-token-0123456789".into()),
            &opts,
        )
        .unwrap();
        let summary = b.summary().await.unwrap();
        assert_eq!(summary["total"], 7, "{host}");
        let head = heads.recv().await.unwrap().to_ascii_lowercase();
        assert!(head.starts_with("get /api/v1/fleet/summary "), "{head}");
        assert!(
            head.contains("authorization: bearer tls-token-0123456789"),
            "{head}"
        );
        assert!(head.contains("x-flotilla-channel: mcp"), "{head}");
    }
}

#[tokio::test]
async fn https_refuses_an_untrusted_certificate() {
    let (port, mut heads) = tls_server().await;
    let b = RestBackend::new(
        &format!("https://localhost:{port}"),
        Some("tls-token-0123456789".into()),
    )
    .unwrap();
    let e = b.summary().await.unwrap_err();
    assert_eq!(e.code, "unavailable", "{e}");
    // The token never left the client: no request reached the server.
    assert!(heads.try_recv().is_err());
    let bad = RestOptions {
        ca_file: Some(fixture("server.key")),
    };
    let e = RestBackend::with_options("https://localhost:1", None, &bad).unwrap_err();
    assert_eq!(e.code, "bad_request", "{e}");
}
