//! The one rustls client configuration behind every TLS connection to the server (the OpAMP
//! WebSocket, OpAMP over HTTPS and the OAuth2 token endpoint): the public webpki roots plus
//! `server.tls.ca_file`, and the client certificate of `server.tls.cert_file`/`key_file`.
//!
//! Built once at start, so a bad file is a configuration error, not a failure at the first
//! connect. ring provider, as the server: no aws-lc, no C toolchain.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ServerTlsConfig;

/// Why `[server.tls]` cannot be used; every variant names the key and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {}: {error}", .path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{key}: {}: {reason}", .path.display())]
    Bad {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        key,
        path: path.to_path_buf(),
        error,
    })
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Bad {
        key,
        path: path.to_path_buf(),
        reason,
    };
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// The client configuration for `[server.tls]` (TLS 1.2 and 1.3).
pub fn client_config(t: &ServerTlsConfig) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(ca) = &t.ca_file {
        for c in certs("server.tls.ca_file", ca)? {
            roots.add(c).map_err(|e| TlsError::Bad {
                key: "server.tls.ca_file",
                path: ca.clone(),
                reason: format!("not a CA certificate: {e}"),
            })?;
        }
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| TlsError::Bad {
        key: "server.tls",
        path: PathBuf::new(),
        reason: e.to_string(),
    })?
    .with_root_certificates(roots);
    let cfg = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) => {
            let chain = certs("server.tls.cert_file", cert)?;
            let pem = read("server.tls.key_file", key)?;
            let bad_key = |reason: String| TlsError::Bad {
                key: "server.tls.key_file",
                path: key.clone(),
                reason,
            };
            let k = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| bad_key(format!("no PEM private key in it ({e})")))?;
            b.with_client_auth_cert(chain, k).map_err(|e| {
                bad_key(format!(
                    "does not make a pair with server.tls.cert_file: {e}"
                ))
            })?
        }
        _ => b.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}
