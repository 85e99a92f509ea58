//! Console sessions: an API token presented once at login becomes a random session id in an
//! HttpOnly, SameSite=Strict cookie (Secure over TLS) that expires; each session carries its
//! own CSRF token, which every state-changing form must send back.
//!
//! Only SHA-256 digests of session ids are kept, so the table itself holds nothing a cookie
//! could be rebuilt from; ids and CSRF tokens are compared in constant time.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::{header, HeaderMap, HeaderValue};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::model::{now_ms, Caller, Millis};

/// Cookie holding the session id over plain HTTP.
pub const COOKIE: &str = "flotilla_session";
/// Over TLS the `__Host-` prefix makes browsers refuse the cookie unless it is Secure, set by
/// this host for `/`, so a sibling subdomain cannot plant one.
pub const COOKIE_SECURE: &str = "__Host-flotilla_session";
/// The login form's own CSRF cookie (double submit), so nobody can log a victim in as
/// themselves from another site.
pub const LOGIN_COOKIE: &str = "flotilla_login";
pub const LOGIN_COOKIE_SECURE: &str = "__Host-flotilla_login";
/// How long a login form stays usable, seconds.
pub const LOGIN_FORM_TTL_S: u64 = 600;
/// Most sessions held at once; the oldest is dropped beyond (each login makes one).
pub const MAX_SESSIONS: usize = 10_000;

/// A signed-in operator.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who the token stood for, with channel `console`.
    pub caller: Caller,
    /// Sent back by every state-changing form.
    pub csrf: String,
    pub created_at: Millis,
    pub expires_at: Millis,
}

/// The session table.
pub struct Sessions {
    by_digest: Mutex<HashMap<[u8; 32], Session>>,
    ttl_ms: Millis,
    secure: bool,
}

/// 32 random bytes from the OS, base64url (43 characters).
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// Constant-time equality of two strings (length is not secret here: tokens have one length).
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The value of cookie `name` in the request, if any.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

impl Sessions {
    pub fn new(ttl_s: u64, secure: bool) -> Sessions {
        Sessions {
            by_digest: Mutex::new(HashMap::new()),
            ttl_ms: (ttl_s as i64) * 1000,
            secure,
        }
    }

    /// Whether cookies are marked Secure (TLS, or `console.secure_cookie`).
    pub fn secure(&self) -> bool {
        self.secure
    }

    pub fn cookie_name(&self) -> &'static str {
        if self.secure {
            COOKIE_SECURE
        } else {
            COOKIE
        }
    }

    pub fn login_cookie_name(&self) -> &'static str {
        if self.secure {
            LOGIN_COOKIE_SECURE
        } else {
            LOGIN_COOKIE
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.by_digest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a session for `caller`; returns its id (for the cookie) and the session.
    pub fn create(&self, caller: Caller) -> (String, Session) {
        self.create_at(caller, now_ms())
    }

    pub fn create_at(&self, caller: Caller, now: Millis) -> (String, Session) {
        let id = random_token();
        let s = Session {
            caller,
            csrf: random_token(),
            created_at: now,
            expires_at: now + self.ttl_ms,
        };
        let mut m = self.lock();
        m.retain(|_, s| s.expires_at > now);
        if m.len() >= MAX_SESSIONS {
            if let Some(oldest) = m.iter().min_by_key(|(_, s)| s.created_at).map(|(k, _)| *k) {
                m.remove(&oldest);
            }
        }
        m.insert(digest(&id), s.clone());
        (id, s)
    }

    /// The live session a request's cookie names; expired sessions are removed on sight.
    pub fn lookup(&self, headers: &HeaderMap, now: Millis) -> Option<Session> {
        let id = cookie(headers, self.cookie_name())?;
        let d = digest(id);
        let mut m = self.lock();
        // HashMap lookup by digest: the digest of a guess reveals nothing about real ids.
        match m.get(&d) {
            Some(s) if s.expires_at > now => Some(s.clone()),
            Some(_) => {
                m.remove(&d);
                None
            }
            None => None,
        }
    }

    /// Ends the session a request's cookie names.
    pub fn remove(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, self.cookie_name()) {
            self.lock().remove(&digest(id));
        }
    }

    /// Sessions held now (expired ones included until they are next seen).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn attrs(&self, max_age: Option<u64>) -> String {
        let mut s = String::from("; Path=/; HttpOnly; SameSite=Strict");
        match max_age {
            Some(a) => s.push_str(&format!("; Max-Age={a}")),
            None => s.push_str("; Max-Age=0"),
        }
        if self.secure {
            s.push_str("; Secure");
        }
        s
    }

    /// `Set-Cookie` for a new session id: expires with the session.
    pub fn set_cookie(&self, id: &str) -> HeaderValue {
        let v = format!(
            "{}={id}{}",
            self.cookie_name(),
            self.attrs(Some((self.ttl_ms / 1000) as u64))
        );
        HeaderValue::from_str(&v).expect("cookie is ASCII")
    }

    /// `Set-Cookie` that deletes the session cookie.
    pub fn clear_cookie(&self) -> HeaderValue {
        let v = format!("{}={}", self.cookie_name(), self.attrs(None));
        HeaderValue::from_str(&v).expect("cookie is ASCII")
    }

    /// `Set-Cookie` for the login form's CSRF value.
    pub fn login_cookie(&self, value: &str) -> HeaderValue {
        let v = format!(
            "{}={value}{}",
            self.login_cookie_name(),
            self.attrs(Some(LOGIN_FORM_TTL_S))
        );
        HeaderValue::from_str(&v).expect("cookie is ASCII")
    }

    pub fn clear_login_cookie(&self) -> HeaderValue {
        let v = format!("{}={}", self.login_cookie_name(), self.attrs(None));
        HeaderValue::from_str(&v).expect("cookie is ASCII")
    }
}

/// Whether a state-changing request may proceed: the form's CSRF token equals the session's,
/// and a browser's `Origin` (when sent) is this very host. Returns why not.
pub fn check_csrf(
    session: &Session,
    sent: Option<&str>,
    headers: &HeaderMap,
) -> Result<(), String> {
    check_origin(headers)?;
    match sent {
        Some(t) if same(t, &session.csrf) => Ok(()),
        Some(_) => Err("the form's CSRF token does not match this session".into()),
        None => Err("the form carries no CSRF token".into()),
    }
}

/// A cross-site request carries an `Origin` that is not this host (or `Sec-Fetch-Site:
/// cross-site`): refused whatever else it carries.
pub fn check_origin(headers: &HeaderMap) -> Result<(), String> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site == "cross-site" || site == "same-site" {
            return Err(format!("a {site} request may not change anything"));
        }
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .split_once("://")
        .map(|(_, h)| h.trim_end_matches('/'))
        .unwrap_or("");
    if !host.is_empty() && origin_host.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        Err(format!("Origin {origin:?} is not this console ({host:?})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Channel, Role};

    fn caller() -> Caller {
        Caller {
            actor: "ops".into(),
            channel: Channel::Console,
            role: Role::Operator,
        }
    }

    fn with_cookie(name: &str, v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other=1; {name}={v}")).unwrap(),
        );
        h
    }

    #[test]
    fn sessions_expire_and_can_be_removed() {
        let s = Sessions::new(60, false);
        let (id, sess) = s.create_at(caller(), 1_000);
        assert_eq!(sess.expires_at, 61_000);
        let h = with_cookie(COOKIE, &id);
        assert_eq!(s.lookup(&h, 60_999).unwrap().caller, caller());
        assert!(s.lookup(&h, 61_000).is_none(), "expired at its deadline");
        assert!(s.is_empty(), "an expired session is dropped when seen");
        let (id, _) = s.create(caller());
        let h = with_cookie(COOKIE, &id);
        assert!(s.lookup(&h, now_ms()).is_some());
        s.remove(&h);
        assert!(s.lookup(&h, now_ms()).is_none());
        // A made-up id, or the right id under the wrong cookie name, is nobody.
        assert!(s.lookup(&with_cookie(COOKIE, "x"), now_ms()).is_none());
    }

    #[test]
    fn cookies_carry_the_flags() {
        let plain = Sessions::new(3600, false);
        let v = plain.set_cookie("abc").to_str().unwrap().to_string();
        assert_eq!(
            v,
            "flotilla_session=abc; Path=/; HttpOnly; SameSite=Strict; Max-Age=3600"
        );
        let tls = Sessions::new(3600, true);
        let v = tls.set_cookie("abc").to_str().unwrap().to_string();
        assert!(v.starts_with("__Host-flotilla_session=abc;"), "{v}");
        assert!(v.ends_with("; Secure"), "{v}");
        assert!(tls.clear_cookie().to_str().unwrap().contains("Max-Age=0"));
    }

    #[test]
    fn csrf_needs_the_token_and_a_same_origin() {
        let s = Sessions::new(60, false);
        let (_, sess) = s.create(caller());
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(check_csrf(&sess, Some(&sess.csrf), &h).is_ok());
        assert!(check_csrf(&sess, None, &h).is_err());
        assert!(check_csrf(&sess, Some("nope"), &h).is_err());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(check_csrf(&sess, Some(&sess.csrf), &h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(check_csrf(&sess, Some(&sess.csrf), &h).is_err());
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(check_csrf(&sess, Some(&sess.csrf), &h).is_err());
    }
}
