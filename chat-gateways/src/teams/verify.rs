//! Bot Framework request authentication ("Authentication with the Bot Connector API", connector
//! to bot): every request's `Authorization: Bearer <JWT>` is checked against the OpenID
//! metadata's JWKS — RS256 signature by a listed key that endorses the activity's `channelId`,
//! issuer `https://api.botframework.com`, audience = the bot's app id, `exp`/`nbf` with five
//! minutes of clock skew, and the `serviceUrl` claim equal to the activity's `serviceUrl` (so
//! replies, which carry the bot's own token, only ever go where Microsoft signed for).
//!
//! Keys are cached; an unknown `kid` refreshes them (signing keys roll over), but at most once
//! per `min_refresh`, so a stream of forged kids cannot make the gateway hammer the metadata
//! endpoint. A cache older than `max_age` is refreshed on the next request.

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::{decode, decode_header, errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Bot Framework's OpenID metadata (connector → bot tokens).
pub const DEFAULT_OPENID_METADATA_URL: &str =
    "https://login.botframework.com/v1/.well-known/openidconfiguration";
/// The issuer of connector → bot tokens.
pub const ISSUER: &str = "https://api.botframework.com";
/// Clock skew allowed on `exp` and `nbf` (the documented five minutes).
pub const LEEWAY_S: u64 = 300;

/// How the key cache behaves.
#[derive(Debug, Clone)]
pub struct KeyOptions {
    /// Least time between two fetches of the metadata and JWKS triggered by unknown key ids.
    pub min_refresh: Duration,
    /// A cache this old is fetched again (Microsoft rolls keys over; its SDKs keep them a day).
    pub max_age: Duration,
}

impl Default for KeyOptions {
    fn default() -> Self {
        KeyOptions {
            min_refresh: Duration::from_secs(60),
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why a request was refused (logged and answered 401, or 503 when the keys cannot be had).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no Authorization header")]
    Missing,
    #[error("the Authorization header is not `Bearer <JWT>`")]
    NotBearer,
    #[error("the bearer token is not a JWT: {0}")]
    Malformed(String),
    #[error("the token is signed with {0:?}; only RS256 is accepted")]
    Algorithm(String),
    #[error("the token has no key id (kid)")]
    NoKeyId,
    #[error("the token's key id {0:?} is not in the Bot Framework JWKS")]
    UnknownKey(String),
    #[error("the token's signature does not verify with key {0:?}")]
    Signature(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's issuer is not {ISSUER}")]
    Issuer,
    #[error("the token's audience is not this bot's app id")]
    Audience,
    #[error("the token was rejected: {0}")]
    Invalid(String),
    #[error("the token's serviceUrl claim {claim:?} does not match the activity's serviceUrl {activity:?}")]
    ServiceUrl { claim: String, activity: String },
    #[error("key {kid:?} does not endorse channel {channel:?}")]
    NotEndorsed { kid: String, channel: String },
    #[error("the Bot Framework signing keys cannot be fetched: {0}")]
    KeysUnavailable(String),
}

impl Refusal {
    /// Whether the fault is ours (the keys could not be fetched), not the caller's.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Refusal::KeysUnavailable(_))
    }
}

/// The claims checked beyond the registered ones.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    #[serde(rename = "serviceUrl")]
    pub service_url: Option<String>,
}

/// A token whose signature, issuer, audience and lifetime were checked; what remains is to
/// compare it with the activity ([`Verified::check_activity`]).
#[derive(Debug, Clone)]
pub struct Verified {
    kid: String,
    claims: Claims,
    endorsements: Vec<String>,
}

impl Verified {
    /// The `serviceUrl` claim must equal the activity's, and the key must endorse its channel.
    pub fn check_activity(&self, service_url: &str, channel_id: &str) -> Result<(), Refusal> {
        match &self.claims.service_url {
            Some(c) if c == service_url => {}
            other => {
                return Err(Refusal::ServiceUrl {
                    claim: other.clone().unwrap_or_default(),
                    activity: service_url.to_string(),
                })
            }
        }
        if !channel_id.is_empty() && !self.endorsements.iter().any(|e| e == channel_id) {
            return Err(Refusal::NotEndorsed {
                kid: self.kid.clone(),
                channel: channel_id.to_string(),
            });
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct Metadata {
    jwks_uri: String,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kid: Option<String>,
    kty: Option<String>,
    n: Option<String>,
    e: Option<String>,
    #[serde(default)]
    endorsements: Vec<String>,
}

struct Key {
    key: DecodingKey,
    endorsements: Vec<String>,
}

#[derive(Default)]
struct Cache {
    keys: HashMap<String, std::sync::Arc<Key>>,
    fetched_at: Option<Instant>,
}

/// Validates the bearer tokens of one bot (its app id).
pub struct TokenVerifier {
    app_id: String,
    metadata_url: String,
    http: reqwest::Client,
    options: KeyOptions,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("app_id", &self.app_id)
            .field("metadata_url", &self.metadata_url)
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    pub fn new(app_id: &str, metadata_url: &str, options: KeyOptions) -> TokenVerifier {
        TokenVerifier {
            app_id: app_id.to_string(),
            metadata_url: metadata_url.to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            options,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Checks the `Authorization` header's token (signature, issuer, audience, lifetime).
    pub async fn verify(&self, authorization: Option<&str>) -> Result<Verified, Refusal> {
        let auth = authorization.ok_or(Refusal::Missing)?;
        let token = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::NotBearer)?;
        let header = decode_header(token).map_err(|e| Refusal::Malformed(e.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(Refusal::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(Refusal::NoKeyId)?;
        let key = self.key(&kid).await?;
        let mut v = Validation::new(Algorithm::RS256);
        v.set_issuer(&[ISSUER]);
        v.set_audience(&[&self.app_id]);
        v.leeway = LEEWAY_S;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = decode::<Claims>(token, &key.key, &v).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => Refusal::Signature(kid.clone()),
            ErrorKind::ExpiredSignature => Refusal::Expired,
            ErrorKind::ImmatureSignature => Refusal::NotYetValid,
            ErrorKind::InvalidIssuer => Refusal::Issuer,
            ErrorKind::InvalidAudience => Refusal::Audience,
            ErrorKind::MissingRequiredClaim(c) if c == "iss" => Refusal::Issuer,
            ErrorKind::MissingRequiredClaim(c) if c == "aud" => Refusal::Audience,
            _ => Refusal::Invalid(e.to_string()),
        })?;
        Ok(Verified {
            kid,
            claims: data.claims,
            endorsements: key.endorsements.clone(),
        })
    }

    /// The key `kid`, from the cache or a refresh (at most one per `min_refresh` for unknown
    /// ids; always when the cache is empty or older than `max_age`).
    async fn key(&self, kid: &str) -> Result<std::sync::Arc<Key>, Refusal> {
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        let age = cache.fetched_at.map(|t| now - t);
        let stale = age.is_none_or(|a| a >= self.options.max_age);
        let known = cache.keys.get(kid).cloned();
        let may_refresh = age.is_none_or(|a| a >= self.options.min_refresh);
        if let (Some(k), false) = (&known, stale) {
            return Ok(k.clone());
        }
        if !stale && !may_refresh {
            return Err(Refusal::UnknownKey(kid.to_string()));
        }
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(
                    keys = keys.len(),
                    "Teams: Bot Framework signing keys fetched"
                );
                cache.keys = keys;
                cache.fetched_at = Some(now);
            }
            Err(e) => {
                // A failed fetch counts as one, so an outage is not retried per request.
                cache.fetched_at = Some(now);
                if cache.keys.is_empty() {
                    return Err(Refusal::KeysUnavailable(e));
                }
                tracing::warn!(error = %e, "Teams: signing keys not refreshed; keeping the cached ones");
            }
        }
        cache
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(|| Refusal::UnknownKey(kid.to_string()))
    }

    async fn fetch(&self) -> Result<HashMap<String, std::sync::Arc<Key>>, String> {
        let meta: Metadata = self.get_json(&self.metadata_url).await?;
        let jwks: Jwks = self.get_json(&meta.jwks_uri).await?;
        let mut keys = HashMap::new();
        for k in jwks.keys {
            let (Some(kid), Some(n), Some(e)) = (k.kid, k.n, k.e) else {
                continue;
            };
            if k.kty.as_deref().is_some_and(|t| t != "RSA") {
                continue;
            }
            match DecodingKey::from_rsa_components(&n, &e) {
                Ok(key) => {
                    keys.insert(
                        kid,
                        std::sync::Arc::new(Key {
                            key,
                            endorsements: k.endorsements,
                        }),
                    );
                }
                Err(err) => tracing::warn!(kid, error = %err, "Teams: unusable key in the JWKS"),
            }
        }
        Ok(keys)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let r = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", r.status()));
        }
        r.json::<T>()
            .await
            .map_err(|e| format!("GET {url}: not the expected JSON: {e}"))
    }
}
