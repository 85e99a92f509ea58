//! Credentials for the OpAMP connection: nothing, a static bearer token (from an environment
//! variable or a file, re-read so rotation needs no restart), or an OAuth2 client-credentials
//! token fetched from a token endpoint and refreshed before it expires or after a 401.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::AuthConfig;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("bearer token: {0}")]
    Static(String),
    #[error("OAuth2 token endpoint {url}: {message}")]
    OAuth2 { url: String, message: String },
}

/// Where the bearer token comes from.
#[derive(Debug)]
pub enum TokenSource {
    None,
    Env(String),
    File(PathBuf),
    OAuth2(OAuth2),
}

/// OAuth2 client-credentials grant (RFC 6749 §4.4).
#[derive(Debug)]
pub struct OAuth2 {
    token_url: String,
    client_id: String,
    secret: Secret,
    scope: Option<String>,
    audience: Option<String>,
    http: reqwest::Client,
    cached: Mutex<Option<(String, Option<Instant>)>>,
}

#[derive(Debug)]
enum Secret {
    Env(String),
    File(PathBuf),
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    /// Seconds; some endpoints send a string or a float, a broken one a negative or
    /// enormous number: read leniently, clamped by [`refresh_at`].
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

/// `expires_in` as whole seconds (negative → 0, beyond u64 → u64::MAX); `None` if absent or
/// not a number.
fn expires_in_secs(v: &serde_json::Value) -> Option<u64> {
    let f = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    // `as` saturates: NaN → 0, negative → 0, huge → u64::MAX.
    Some(f as u64)
}

impl TokenSource {
    /// Builds the source from a validated config.
    pub fn from_config(cfg: &AuthConfig, http: reqwest::Client) -> TokenSource {
        match cfg.kind.as_str() {
            "bearer" => match (&cfg.token_env, &cfg.token_file) {
                (Some(v), _) => TokenSource::Env(v.clone()),
                (None, Some(f)) => TokenSource::File(f.clone()),
                (None, None) => TokenSource::None,
            },
            "oauth2" => TokenSource::OAuth2(OAuth2 {
                token_url: cfg.token_url.clone().unwrap_or_default(),
                client_id: cfg.client_id.clone().unwrap_or_default(),
                secret: match (&cfg.client_secret_env, &cfg.client_secret_file) {
                    (Some(v), _) => Secret::Env(v.clone()),
                    (None, Some(f)) => Secret::File(f.clone()),
                    (None, None) => Secret::Env(String::new()),
                },
                scope: cfg.scope.clone(),
                audience: cfg.audience.clone(),
                http,
                cached: Mutex::new(None),
            }),
            _ => TokenSource::None,
        }
    }

    /// The token to send now (`None`: no authentication configured).
    pub async fn token(&self) -> Result<Option<String>, AuthError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Env(var) => match std::env::var(var) {
                Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
                _ => Err(AuthError::Static(format!(
                    "environment variable {var} is unset or empty"
                ))),
            },
            TokenSource::File(path) => {
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| AuthError::Static(format!("{}: {e}", path.display())))?;
                let t = text.lines().next().unwrap_or("").trim().to_string();
                if t.is_empty() {
                    return Err(AuthError::Static(format!("{} is empty", path.display())));
                }
                Ok(Some(t))
            }
            TokenSource::OAuth2(o) => o.token().await.map(Some),
        }
    }

    /// The server refused the token (401): fetch a fresh one next time.
    pub fn invalidate(&self) {
        if let TokenSource::OAuth2(o) = self {
            *o.cached.lock().expect("token cache") = None;
        }
    }
}

impl OAuth2 {
    async fn token(&self) -> Result<String, AuthError> {
        if let Some((tok, until)) = self.cached.lock().expect("token cache").clone() {
            if until.map(|u| Instant::now() < u).unwrap_or(true) {
                return Ok(tok);
            }
        }
        let (tok, lifetime) = self.fetch().await?;
        let until = lifetime.and_then(|secs| refresh_at(Instant::now(), secs));
        *self.cached.lock().expect("token cache") = Some((tok.clone(), until));
        Ok(tok)
    }

    /// The token and its `expires_in` (seconds), as the endpoint gave them.
    async fn fetch(&self) -> Result<(String, Option<u64>), AuthError> {
        let err = |message: String| AuthError::OAuth2 {
            url: self.token_url.clone(),
            message,
        };
        let secret = match &self.secret {
            Secret::Env(v) => {
                std::env::var(v).map_err(|_| err(format!("environment variable {v} is unset")))?
            }
            Secret::File(f) => tokio::fs::read_to_string(f)
                .await
                .map_err(|e| err(format!("client secret file {}: {e}", f.display())))?
                .trim()
                .to_string(),
        };
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        if let Some(s) = &self.scope {
            form.push(("scope", s));
        }
        if let Some(a) = &self.audience {
            form.push(("audience", a));
        }
        // client_secret_basic is the method every server must support (RFC 6749 §2.3.1).
        let resp = self
            .http
            .post(&self.token_url)
            .basic_auth(&self.client_id, Some(&secret))
            .header("accept", "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| err(e.to_string()))?;
        if !status.is_success() {
            return Err(err(format!("HTTP {status}: {}", excerpt(&body, 200))));
        }
        let t: TokenResponse = serde_json::from_str(&body)
            .map_err(|e| err(format!("unexpected answer ({e}): {}", excerpt(&body, 200))))?;
        if let Some(tt) = &t.token_type {
            if !tt.eq_ignore_ascii_case("bearer") {
                return Err(err(format!("token_type {tt:?} is not Bearer")));
            }
        }
        Ok((
            t.access_token,
            t.expires_in.as_ref().and_then(expires_in_secs),
        ))
    }
}

/// Longest token lifetime taken from a token endpoint (a day): a larger `expires_in` (up to
/// u64::MAX) would overflow the clock, and a daily refresh costs nothing.
pub const MAX_TOKEN_LIFETIME_S: u64 = 86_400;

/// When a token that lives `expires_in` seconds from `now` is refreshed. Refreshed well
/// before expiry: a WebSocket upgrade or poll must never carry a token that expires in flight,
/// so a fifth of the lifetime, at least 5 s, is kept as margin. The lifetime is clamped to
/// 1 s ..= [`MAX_TOKEN_LIFETIME_S`]; `None` only if the clock cannot represent the instant.
pub fn refresh_at(now: Instant, expires_in: u64) -> Option<Instant> {
    let l = Duration::from_secs(expires_in.clamp(1, MAX_TOKEN_LIFETIME_S));
    let margin = (l / 5).max(Duration::from_secs(5)).min(l);
    now.checked_add(l - margin)
}

/// The first `n` characters of `s`, on one line.
pub fn excerpt(s: &str, n: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let t = one_line.trim();
    if t.chars().count() > n {
        format!("{}…", t.chars().take(n).collect::<String>())
    } else {
        t.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lifetimes_are_clamped() {
        let now = Instant::now();
        // u64::MAX seconds would overflow `now + lifetime`: capped at a day.
        let far = refresh_at(now, u64::MAX).unwrap();
        assert_eq!(
            far - now,
            Duration::from_secs(MAX_TOKEN_LIFETIME_S * 4 / 5),
            "a fifth of a day as margin"
        );
        // An hour: refreshed at 48 min.
        assert_eq!(
            refresh_at(now, 3600).unwrap() - now,
            Duration::from_secs(2880)
        );
        // Short lives keep a 5 s margin; 0 behaves like 1 s (refetched next time).
        assert_eq!(refresh_at(now, 6).unwrap() - now, Duration::from_secs(1));
        assert_eq!(refresh_at(now, 0).unwrap(), now);
    }

    #[test]
    fn expires_in_is_read_leniently() {
        let v = |s: &str| expires_in_secs(&serde_json::from_str(s).unwrap());
        assert_eq!(v("3600"), Some(3600));
        assert_eq!(v("\"3600\""), Some(3600));
        assert_eq!(v("59.9"), Some(59));
        assert_eq!(v("-5"), Some(0));
        assert_eq!(v("1e30"), Some(u64::MAX));
        assert_eq!(v("null"), None);
    }
}
