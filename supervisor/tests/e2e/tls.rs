//! The supervisor against the real server's TLS with a private CA made here by rcgen: wss://
//! and https:// connect and report when `server.tls.ca_file` names the CA; without it the
//! server is refused as an unknown issuer and the log says what to check. Only in `--features
//! tls` builds (tests/run.sh runs them).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;

const T: Duration = Duration::from_secs(30);

/// A private CA: its certificate (PEM) and what signs with it.
pub struct Ca {
    pub pem: String,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A certificate signed by a [`Ca`] and its key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(cn: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            cert,
            key,
        }
    }

    /// A server (`client = false`) or client certificate with subject CN `cn` and DNS `names`.
    pub fn issue(&self, cn: &str, names: &[&str], client: bool) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut p = rcgen::CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![match client {
            true => rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            false => rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        }];
        Issued {
            cert_pem: p.signed_by(&key, &self.cert, &self.key).unwrap().pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// Writes `<stem>.crt` and `<stem>.key` (owner-only) into `dir`.
pub fn write_issued(dir: &Path, stem: &str, i: &Issued) -> (PathBuf, PathBuf) {
    let (crt, key) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&crt, &i.cert_pem).unwrap();
    write_private(&key, &i.key_pem);
    (crt, key)
}

/// `[opamp.tls]` for a server certificate of `localhost` from `ca` (files in `dir`), plus `more`.
pub fn server_tls_toml(dir: &Path, ca: &Ca, more: &str) -> String {
    let (crt, key) = write_issued(dir, "server", &ca.issue("flotilla", &["localhost"], false));
    format!("[opamp.tls]\ncert_file = {crt:?}\nkey_file = {key:?}\n{more}")
}

/// `wss://` or `https://` to the server's agent port by the name its certificate carries.
pub fn tls_url(server: &Server, scheme: &str) -> String {
    format!("{scheme}://localhost:{}/v1/opamp", server.opamp_port)
}

#[tokio::test]
async fn wss_and_https_with_a_private_ca_connect_and_report() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("Flotilla supervisor test CA");
    let server = Server::start_with_toml(&server_tls_toml(certs.path(), &ca, "")).await;
    let ca_file = certs.path().join("ca.crt");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let trust = format!("[server.tls]\nca_file = {ca_file:?}\n");

    for scheme in ["wss", "https"] {
        let mut o = SupOpts::fluent_bit(&tls_url(&server, scheme));
        o.server_extra = trust.clone();
        o.heartbeat_s = 1;
        let sup = Sup::start(o).await;
        let uid = sup.uid().await;
        let a = server
            .wait_agent(&uid, "connected over TLS and healthy", T, |a| {
                a["connected"] == true && a["health"]["healthy"] == true
            })
            .await;
        let transport = if scheme == "wss" { "websocket" } else { "http" };
        assert_eq!(a["transport"], transport, "{scheme}: {a}");
        assert!(
            a["effective_config"].to_string().contains("dummy"),
            "{scheme}: the effective config was reported: {a}"
        );
        assert!(!sup.log().contains("UnknownIssuer"), "{}", sup.log());
    }
}

#[tokio::test]
async fn without_the_private_ca_the_server_is_refused_and_the_log_says_why() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("Flotilla supervisor test CA");
    let server = Server::start_with_toml(&server_tls_toml(certs.path(), &ca, "")).await;
    for scheme in ["wss", "https"] {
        let sup = Sup::start(SupOpts::fluent_bit(&tls_url(&server, scheme))).await;
        sup.wait_log("UnknownIssuer", T).await;
        let log = sup.log();
        let line = log
            .lines()
            .find(|l| l.contains("UnknownIssuer"))
            .unwrap()
            .to_string();
        assert!(
            line.contains("OpAMP connection") && line.contains("check server.tls.ca_file"),
            "{scheme}: {line}"
        );
        let uid = sup.uid().await;
        assert!(
            server.agent(&uid).await.is_none(),
            "{scheme}: an agent that refused the server is known to it"
        );
        assert!(!log.contains("OpAMP WebSocket connected"), "{log}");
    }
}

#[tokio::test]
async fn a_client_key_readable_by_others_stops_the_start() {
    use std::os::unix::fs::PermissionsExt;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("Flotilla supervisor test CA");
    let (crt, key) = write_issued(certs.path(), "agent", &ca.issue("agent-1", &[], true));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut o = SupOpts::fluent_bit("wss://localhost:1/v1/opamp");
    o.server_extra = format!("[server.tls]\ncert_file = {crt:?}\nkey_file = {key:?}\n");
    let mut sup = Sup::start(o).await;
    let code = sup.wait_exit(T).await;
    assert_eq!(code, Some(1), "{}", sup.log());
    let log = sup.log();
    assert!(
        log.contains("server.tls.key_file") && log.contains("readable by other users"),
        "{log}"
    );
    assert!(
        !log.contains("PRIVATE KEY"),
        "key material in the log: {log}"
    );
    assert!(
        sup.events().is_empty(),
        "the agent was started: {:?}",
        sup.events()
    );
}

#[tokio::test]
async fn a_client_certificate_admits_the_supervisor_where_the_server_requires_one() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("Flotilla supervisor test CA");
    let agents = Ca::new("Flotilla agents CA");
    let agents_ca = certs.path().join("agents-ca.crt");
    std::fs::write(&agents_ca, &agents.pem).unwrap();
    // mTLS only: no token file, a certificate from the agents' CA is the credential.
    let server = Server::start_with_toml(&format!(
        "[opamp]\nagent_auth = \"mtls\"\n{}",
        server_tls_toml(
            certs.path(),
            &ca,
            &format!(
                "client_ca_file = {agents_ca:?}\nclient_auth = \"required\"\npin_uid = true\n"
            ),
        )
    ))
    .await;
    let ca_file = certs.path().join("ca.crt");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let (crt, key) = write_issued(
        certs.path(),
        "agent",
        &agents.issue("fluent-bit-e2e", &["web-e2e.example"], true),
    );

    let mut o = SupOpts::fluent_bit(&tls_url(&server, "wss"));
    o.server_extra =
        format!("[server.tls]\nca_file = {ca_file:?}\ncert_file = {crt:?}\nkey_file = {key:?}\n");
    let sup = Sup::start(o).await;
    let uid = sup.uid().await;
    let a = server
        .wait_agent(&uid, "connected with its client certificate", T, |a| {
            a["connected"] == true && a["health"]["healthy"] == true
        })
        .await;
    let c = &a["client_certificate"];
    assert_eq!(c["identity"], "fluent-bit-e2e", "{a}");
    assert_eq!(c["sans"], serde_json::json!(["web-e2e.example"]), "{a}");
    assert_eq!(c["sha256"].as_str().map(str::len), Some(64), "{a}");

    // Without a client certificate the handshake is refused, and the log says what to set.
    let mut o = SupOpts::fluent_bit(&tls_url(&server, "wss"));
    o.server_extra = format!("[server.tls]\nca_file = {ca_file:?}\n");
    let bare = Sup::start(o).await;
    bare.wait_log("set server.tls.cert_file", T).await;
    let uid = bare.uid().await;
    assert!(server.agent(&uid).await.is_none(), "{}", bare.log());
}
