//! TLS for the listeners: certificate and key files loaded and checked before any port is
//! bound, re-read while serving so a renewed certificate is used without a restart, and the
//! optional client-certificate (mTLS) check of the agent listener.
//!
//! rustls with the ring provider (already in the tree through reqwest; no aws-lc, no C
//! toolchain), TLS 1.2 and 1.3 only, ALPN `http/1.1` (the listeners speak nothing else: see
//! `net.rs`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::UnixTime;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// Why a listener's TLS could not be set up. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key} {}: cannot be read: {error}", .path.display())]
    Read {
        key: String,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{key} {}: no PEM certificate in it", .path.display())]
    NoCertificate { key: String, path: PathBuf },
    #[error("{key} {}: no PEM private key in it ({reason})", .path.display())]
    NoKey {
        key: String,
        path: PathBuf,
        reason: String,
    },
    /// The key file is open to other users (the reason, from the shared secret-file check).
    #[error("{0}")]
    Exposed(String),
    #[error("{cert_key} {} and {key_key} {} do not make a pair: {reason}", .cert.display(), .key.display())]
    Mismatch {
        cert_key: String,
        cert: PathBuf,
        key_key: String,
        key: PathBuf,
        reason: String,
    },
    #[error("{key} {}: {reason}", .path.display())]
    ClientCa {
        key: String,
        path: PathBuf,
        reason: String,
    },
}

/// Where one listener's certificate chain and key come from, and the config keys that named
/// them (for error messages).
#[derive(Debug, Clone, PartialEq)]
pub struct CertFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub cert_key: String,
    pub key_key: String,
}

/// The client-certificate check of a listener (mTLS).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientAuth {
    /// PEM file of the CA certificates that sign agents' client certificates.
    pub ca_file: PathBuf,
    /// Refuse the handshake of a client without a certificate (otherwise it may go on, and the
    /// OpAMP layer decides).
    pub required: bool,
}

/// The certificate a client presented and rustls verified against the client CA: what the
/// agent record shows and what `opamp.tls.pin_uid` pins. Public data (no secret in it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerCert {
    /// Subject CN, else the first DNS/URI subject alternative name, else empty.
    pub identity: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_cn: Option<String>,
    /// DNS names, URIs (SPIFFE ids) and IP addresses among the subject alternative names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sans: Vec<String>,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub sha256: String,
}

impl PeerCert {
    pub fn from_der(der: &[u8]) -> PeerCert {
        let (subject_cn, sans) = cert_names(der).unwrap_or_default();
        PeerCert {
            identity: subject_cn
                .clone()
                .or_else(|| sans.first().cloned())
                .unwrap_or_default(),
            subject_cn,
            sans,
            sha256: hex::encode(Sha256::digest(der)),
        }
    }
}

/// The provider every listener uses: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One listener's TLS: the acceptor to hand to `net::serve` and the certificate it presents,
/// replaced in place when the files change.
pub struct ListenerTls {
    files: CertFiles,
    current: Arc<Current>,
    /// The client CA (mTLS) and the verifier built from it, replaced when the file changes.
    client: Option<(ClientAuth, Arc<ReloadingVerifier>)>,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls")
            .field("cert_file", &self.files.cert_file)
            .field("key_file", &self.files.key_file)
            .finish_non_exhaustive()
    }
}

/// The pair in use, with a digest of the file contents it came from; also the digest of a
/// broken pair already reported, so it is logged once, not every poll.
struct Current {
    state: RwLock<InUse>,
}

struct InUse {
    key: Arc<CertifiedKey>,
    digest: [u8; 32],
    /// The digest of a broken pair already reported.
    refused: Option<[u8; 32]>,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Current")
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        Some(s.key.clone())
    }
}

impl ListenerTls {
    /// Reads and checks the pair (and the client CA), and builds the acceptor.
    pub fn load(files: CertFiles, client: Option<&ClientAuth>) -> Result<ListenerTls, TlsError> {
        let provider = provider();
        let (key, digest) = load_pair(&files, &provider)?;
        let current = Arc::new(Current {
            state: RwLock::new(InUse {
                key,
                digest,
                refused: None,
            }),
        });
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Mismatch {
                cert_key: files.cert_key.clone(),
                cert: files.cert_file.clone(),
                key_key: files.key_key.clone(),
                key: files.key_file.clone(),
                reason: e.to_string(),
            })?;
        let client = match client {
            None => None,
            Some(c) => Some((c.clone(), Arc::new(ReloadingVerifier::load(c, provider)?))),
        };
        let builder = match &client {
            None => builder.with_no_client_auth(),
            Some((_, v)) => builder.with_client_cert_verifier(v.clone()),
        };
        let mut cfg = builder.with_cert_resolver(current.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ListenerTls {
            files,
            current,
            client,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        })
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptor.clone()
    }

    /// Re-reads the files; a changed, valid pair (or client CA) is used for new handshakes
    /// from now on, a broken one is reported (once per content) and the one in use kept.
    /// Returns whether anything changed.
    pub fn reload(&self, listener: &str) -> bool {
        let ca = self
            .client
            .as_ref()
            .is_some_and(|(c, v)| v.reload(c, listener));
        self.reload_pair(listener) || ca
    }

    fn reload_pair(&self, listener: &str) -> bool {
        let Some(digest) = file_digest(&self.files) else {
            // Unreadable (e.g. mid-rename): load_pair below reports it.
            return self.try_load(listener, None);
        };
        {
            let s = self.current.state.read().unwrap_or_else(|p| p.into_inner());
            if s.digest == digest || s.refused == Some(digest) {
                return false;
            }
        }
        self.try_load(listener, Some(digest))
    }

    fn try_load(&self, listener: &str, digest: Option<[u8; 32]>) -> bool {
        match load_pair(&self.files, &provider()) {
            Ok((key, d)) => {
                let mut s = self
                    .current
                    .state
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                if s.digest == d {
                    return false;
                }
                *s = InUse {
                    key,
                    digest: d,
                    refused: None,
                };
                tracing::info!(listener, cert_file = %self.files.cert_file.display(),
                    "TLS certificate reloaded: new handshakes use it");
                true
            }
            Err(e) => {
                let mut s = self
                    .current
                    .state
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                if digest.is_none() || s.refused != digest {
                    tracing::error!(listener, error = %e,
                        "TLS certificate reload failed: keeping the certificate in use");
                }
                s.refused = digest;
                false
            }
        }
    }

    /// Polls the files every `every` until `shutdown`.
    pub async fn watch(
        self: Arc<Self>,
        listener: &'static str,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    let me = self.clone();
                    // File reads and key parsing are blocking work; the caller's subscriber
                    // goes along so the reload's log lines land where the server's do.
                    let dispatch = tracing::dispatcher::get_default(|d| d.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        tracing::dispatcher::with_default(&dispatch, || me.reload(listener))
                    })
                    .await;
                }
            }
        }
    }
}

fn file_digest(files: &CertFiles) -> Option<[u8; 32]> {
    let cert = std::fs::read(&files.cert_file).ok()?;
    let key = std::fs::read(&files.key_file).ok()?;
    Some(digest_of(&cert, &key))
}

fn digest_of(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((cert.len() as u64).to_be_bytes());
    h.update(cert);
    h.update(key);
    h.finalize().into()
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        key: key.to_string(),
        path: path.to_path_buf(),
        error,
    })
}

fn load_pair(
    files: &CertFiles,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, [u8; 32]), TlsError> {
    if let Some(why) = crate::config::exposed_secret_file(&files.key_key, &files.key_file) {
        return Err(TlsError::Exposed(why));
    }
    let cert_pem = read(&files.cert_key, &files.cert_file)?;
    let key_pem = read(&files.key_key, &files.key_file)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            key: files.cert_key.clone(),
            path: files.cert_file.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::NoKey {
        key: files.key_key.clone(),
        path: files.key_file.clone(),
        reason: e.to_string(),
    })?;
    let mismatch = |reason: String| TlsError::Mismatch {
        cert_key: files.cert_key.clone(),
        cert: files.cert_file.clone(),
        key_key: files.key_key.clone(),
        key: files.key_file.clone(),
        reason,
    };
    let ck = CertifiedKey::from_der(chain, key, provider).map_err(|e| mismatch(e.to_string()))?;
    // from_der lets "cannot tell" through; a key whose public half is unknown is refused here
    // rather than discovered at the first handshake.
    ck.keys_match().map_err(|e| mismatch(e.to_string()))?;
    Ok((Arc::new(ck), digest_of(&cert_pem, &key_pem)))
}

/// The client-certificate check of a listener whose CA file may change: each handshake asks
/// the verifier built from the file as last read, so a rotated or added CA needs no restart.
#[derive(Debug)]
struct ReloadingVerifier {
    state: RwLock<Verifying>,
}

#[derive(Debug)]
struct Verifying {
    verifier: Arc<dyn ClientCertVerifier>,
    /// The CA subjects offered as hints. `root_hint_subjects` lends a slice, which cannot
    /// come out of a lock guard: each CA's hints are leaked once (a few hundred bytes per CA
    /// file change).
    hints: &'static [DistinguishedName],
    digest: [u8; 32],
    /// The digest of a broken CA file already reported.
    refused: Option<[u8; 32]>,
}

impl ReloadingVerifier {
    fn load(c: &ClientAuth, provider: Arc<CryptoProvider>) -> Result<ReloadingVerifier, TlsError> {
        let (verifier, digest) = client_verifier(c, provider)?;
        Ok(ReloadingVerifier {
            state: RwLock::new(Verifying {
                hints: Box::leak(verifier.root_hint_subjects().to_vec().into_boxed_slice()),
                verifier,
                digest,
                refused: None,
            }),
        })
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        s.verifier.clone()
    }

    /// Re-reads the CA file; true if new handshakes now verify against a changed CA.
    fn reload(&self, c: &ClientAuth, listener: &str) -> bool {
        let digest = std::fs::read(&c.ca_file)
            .ok()
            .map(|pem| <[u8; 32]>::from(Sha256::digest(pem)));
        {
            let s = self.state.read().unwrap_or_else(|p| p.into_inner());
            if digest == Some(s.digest) || (digest.is_some() && s.refused == digest) {
                return false;
            }
        }
        let built = client_verifier(c, provider());
        let mut s = self.state.write().unwrap_or_else(|p| p.into_inner());
        match built {
            Ok((verifier, d)) => {
                if s.digest == d {
                    return false;
                }
                *s = Verifying {
                    hints: Box::leak(verifier.root_hint_subjects().to_vec().into_boxed_slice()),
                    verifier,
                    digest: d,
                    refused: None,
                };
                tracing::info!(listener, client_ca_file = %c.ca_file.display(),
                    "TLS client CA reloaded: new handshakes verify client certificates against it");
                true
            }
            Err(e) => {
                if digest.is_none() || s.refused != digest {
                    tracing::error!(listener, error = %e,
                        "TLS client CA reload failed: keeping the client CA in use");
                }
                s.refused = digest;
                false
            }
        }
    }
}

impl ClientCertVerifier for ReloadingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.current().offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.current().client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.state.read().unwrap_or_else(|p| p.into_inner()).hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// The verifier for the CA file as it is now, and the digest of what was read.
fn client_verifier(
    c: &ClientAuth,
    provider: Arc<CryptoProvider>,
) -> Result<(Arc<dyn ClientCertVerifier>, [u8; 32]), TlsError> {
    let key = "opamp.tls.client_ca_file";
    let err = |reason: String| TlsError::ClientCa {
        key: key.to_string(),
        path: c.ca_file.clone(),
        reason,
    };
    let pem = read(key, &c.ca_file)?;
    let digest = Sha256::digest(&pem).into();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| err(format!("not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| err(format!("not a CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    let b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let b = if c.required {
        b
    } else {
        b.allow_unauthenticated()
    };
    Ok((b.build().map_err(|e| err(e.to_string()))?, digest))
}

/// The subject CN of a DER certificate, else its first DNS or URI subject alternative name.
pub fn cert_identity(der: &[u8]) -> Option<String> {
    let (cn, sans) = cert_names(der)?;
    cn.or_else(|| sans.into_iter().next())
}

/// The subject CN and the subject alternative names of a DER certificate. A small DER walk
/// (tbsCertificate's subject and extensions) rather than an X.509 parser dependency: rustls
/// has already verified the certificate, this only reads two fields.
fn cert_names(der: &[u8]) -> Option<(Option<String>, Vec<String>)> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    // [0] version is optional.
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2;
    }
    // serial, signature algorithm, issuer, validity, subject.
    let mut fields = Vec::new();
    for _ in 0..5 {
        let (_, body, next) = tlv(rest)?;
        fields.push(body);
        rest = next;
    }
    let cn = subject_cn(fields[4]);
    // subjectPublicKeyInfo, then optional [1] [2] unique ids and [3] extensions.
    rest = tlv(rest)?.2;
    while !rest.is_empty() {
        let (tag, body, next) = tlv(rest)?;
        if tag == 0xa3 {
            return Some((cn, sans(tlv(body)?.1).unwrap_or_default()));
        }
        rest = next;
    }
    Some((cn, Vec::new()))
}

const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

fn subject_cn(mut name: &[u8]) -> Option<String> {
    while !name.is_empty() {
        let (_, set, next) = tlv(name)?;
        let mut attrs = set;
        while !attrs.is_empty() {
            let (_, atv, n) = tlv(attrs)?;
            let (_, oid, v) = tlv(atv)?;
            if oid == OID_CN {
                let (_, value, _) = tlv(v)?;
                return Some(String::from_utf8_lossy(value).into_owned());
            }
            attrs = n;
        }
        name = next;
    }
    None
}

fn sans(mut exts: &[u8]) -> Option<Vec<String>> {
    while !exts.is_empty() {
        let (_, ext, next) = tlv(exts)?;
        let (_, oid, mut rest) = tlv(ext)?;
        if oid == OID_SAN {
            // Optional `critical` BOOLEAN, then the OCTET STRING holding GeneralNames.
            if rest.first() == Some(&0x01) {
                rest = tlv(rest)?.2;
            }
            let (_, octets, _) = tlv(rest)?;
            let (_, mut names, _) = tlv(octets)?;
            let mut out = Vec::new();
            while !names.is_empty() {
                let (tag, value, n) = tlv(names)?;
                match tag {
                    // [2] dNSName, [6] uniformResourceIdentifier (SPIFFE ids).
                    0x82 | 0x86 => out.push(String::from_utf8_lossy(value).into_owned()),
                    // [7] iPAddress.
                    0x87 => {
                        if let Ok(a) = <[u8; 4]>::try_from(value) {
                            out.push(std::net::Ipv4Addr::from(a).to_string());
                        } else if let Ok(a) = <[u8; 16]>::try_from(value) {
                            out.push(std::net::Ipv6Addr::from(a).to_string());
                        }
                    }
                    _ => {}
                }
                names = n;
            }
            return Some(out);
        }
        exts = next;
    }
    None
}

/// One DER element: (tag, contents, what follows).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)? as usize;
    let (len, head) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    if end > b.len() {
        return None;
    }
    Some((tag, &b[head..end], &b[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_der(cn: Option<&str>, sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        p.subject_alt_names = sans;
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identity_subject_and_every_kind_of_san_are_read() {
        use rcgen::SanType;
        let sans = || {
            vec![
                SanType::DnsName("web-1.example".try_into().unwrap()),
                SanType::URI("spiffe://example.org/agent/1".try_into().unwrap()),
                SanType::IpAddress("10.0.0.7".parse().unwrap()),
                SanType::IpAddress("fd00::7".parse().unwrap()),
            ]
        };
        let der = cert_der(Some("agent-1"), sans());
        let c = PeerCert::from_der(&der);
        assert_eq!(c.identity, "agent-1");
        assert_eq!(c.subject_cn.as_deref(), Some("agent-1"));
        assert_eq!(
            c.sans,
            [
                "web-1.example",
                "spiffe://example.org/agent/1",
                "10.0.0.7",
                "fd00::7"
            ]
        );
        assert_eq!(c.sha256, hex::encode(Sha256::digest(&der)));
        // No CN: the first SAN is the identity.
        let c = PeerCert::from_der(&cert_der(None, sans()));
        assert_eq!((c.identity.as_str(), c.subject_cn), ("web-1.example", None));
        // Neither: an empty identity, still a fingerprint.
        let c = PeerCert::from_der(&cert_der(None, vec![]));
        assert_eq!(
            (c.identity.as_str(), c.sans.len(), c.sha256.len()),
            ("", 0, 64)
        );
    }

    #[test]
    fn truncated_der_is_no_identity() {
        assert_eq!(cert_identity(&[]), None);
        assert_eq!(cert_identity(&[0x30, 0x85, 1, 2, 3, 4, 5]), None);
        assert_eq!(cert_identity(&[0x30, 0x05, 0x30]), None);
    }
}
