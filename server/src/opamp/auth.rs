//! Agent authentication (`opamp.agent_auth`): none, bearer tokens from
//! `opamp.agent_tokens_file` compared in constant time, or mTLS (a client certificate the TLS
//! layer verified against `opamp.tls.client_ca_file`). Checked before a request body is read or
//! a WebSocket is upgraded.

use std::path::Path;

use axum::http::{header, HeaderMap};
use subtle::ConstantTimeEq;

/// The tokens agents may present. `None` means authentication is off.
pub struct AgentTokens {
    tokens: Option<Vec<Vec<u8>>>,
}

impl AgentTokens {
    /// No authentication.
    pub fn none() -> AgentTokens {
        AgentTokens { tokens: None }
    }

    /// Loads one token per line; blank lines and `#` comments are skipped. A file that cannot
    /// be read, or holds no token, yields an empty list, which refuses every agent: failing
    /// closed is the only safe reading of "tokens are required but unknown".
    pub fn load(path: &Path) -> AgentTokens {
        let tokens = match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| l.as_bytes().to_vec())
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e,
                    "cannot read opamp.agent_tokens_file; every agent will be refused");
                Vec::new()
            }
        };
        if tokens.is_empty() {
            tracing::error!(path = %path.display(),
                "opamp.agent_tokens_file holds no token; every agent will be refused");
        }
        AgentTokens {
            tokens: Some(tokens),
        }
    }

    /// True if the request may proceed. Every configured token is compared (no early exit), so
    /// the time taken does not reveal which token, or how much of one, matched.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(tokens) = &self.tokens else {
            return true;
        };
        let Some(presented) = bearer(headers) else {
            return false;
        };
        let mut ok = subtle::Choice::from(0u8);
        for t in tokens {
            ok |= t.as_slice().ct_eq(presented);
        }
        bool::from(ok)
    }
}

/// What admits an agent: the mode and, for `token` and `mtls`, the tokens.
pub struct AgentAuth {
    pub mode: crate::config::AgentAuthMode,
    tokens: AgentTokens,
}

impl AgentAuth {
    pub fn new(cfg: &crate::config::OpampConfig) -> AgentAuth {
        AgentAuth {
            mode: cfg.agent_auth_mode(),
            tokens: match &cfg.agent_tokens_file {
                Some(path) => AgentTokens::load(path),
                None => AgentTokens::none(),
            },
        }
    }

    /// `Ok` if the request may proceed, else why not (never what was presented).
    pub fn check(
        &self,
        headers: &HeaderMap,
        cert: Option<&crate::tls::PeerCert>,
    ) -> Result<(), &'static str> {
        use crate::config::AgentAuthMode as M;
        match self.mode {
            M::None => Ok(()),
            M::Token if self.tokens.allows(headers) => Ok(()),
            M::Token if bearer(headers).is_none() => Err("no bearer token"),
            M::Token => Err("unknown bearer token"),
            // The certificate is only here when rustls verified it against the client CA.
            M::Mtls if cert.is_some() => Ok(()),
            M::Mtls if self.tokens.tokens.is_some() && self.tokens.allows(headers) => Ok(()),
            M::Mtls if self.tokens.tokens.is_some() && bearer(headers).is_some() => {
                Err("no client certificate, and an unknown bearer token")
            }
            M::Mtls => Err("no client certificate"),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at(v.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn bearer_tokens_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "# agents\n\nalpha-token\n  beta-token  \n").unwrap();
        let t = AgentTokens::load(&f);
        assert!(t.allows(&headers("Bearer alpha-token")));
        assert!(t.allows(&headers("bearer beta-token")));
        assert!(!t.allows(&headers("Bearer alpha")));
        assert!(!t.allows(&headers("Basic alpha-token")));
        assert!(!t.allows(&headers("Bearer ")));
        assert!(!t.allows(&HeaderMap::new()));
        assert!(AgentTokens::none().allows(&HeaderMap::new()));
    }

    #[test]
    fn unreadable_file_refuses_everyone() {
        let t = AgentTokens::load(Path::new("/nonexistent/flotilla/tokens"));
        assert!(!t.allows(&headers("Bearer x")));
    }
}
