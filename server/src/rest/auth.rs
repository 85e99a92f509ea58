//! Bearer-token authentication of operators: loading the tokens file (or generating the admin
//! token), checking a presented token, and the middleware that turns it into a [`Caller`].
//!
//! Only SHA-256 digests of tokens are kept in memory, compared in constant time, and no token
//! is ever logged: failures log the remote address and the reason only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::errors::ApiError;
use super::ApiState;
use crate::config::ApiConfig;
use crate::model::{Caller, Channel, Role};

/// File name of the generated admin token inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Shortest token accepted from a tokens file: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why the API tokens could not be loaded. The server must not serve the API without them.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read API tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API tokens file {path}, line {line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("API tokens file {path} holds no tokens (lines are `name role token`)")]
    Empty { path: PathBuf },
    #[error("cannot create the admin token file {path}: {source}")]
    Generate {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct Entry {
    name: String,
    role: Role,
    digest: [u8; 32],
    /// Marked `gateway` in the tokens file: may act for chat users (see [`acting_caller`]).
    gateway: bool,
}

/// The accepted API tokens, as digests.
#[derive(Clone)]
pub struct Tokens {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Tokens {
    // Names and roles only: digests are not secret-free enough to print casually.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| (&e.name, e.role.as_str())))
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Where the generated admin token lives.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(ADMIN_TOKEN_FILE)
}

impl Tokens {
    /// Loads `cfg.tokens_file`, or, when unset, the admin token in `<data_dir>/admin.token`,
    /// generating it (32 random bytes, base64url, mode 0600) the first time. Idempotent: the
    /// lead's start-up check and the router may both call it.
    pub fn load(cfg: &ApiConfig, data_dir: &Path) -> Result<Tokens, AuthError> {
        match &cfg.tokens_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
                    path: path.clone(),
                    source,
                })?;
                Tokens::parse(&text, path)
            }
            None => Tokens::admin_token(data_dir),
        }
    }

    /// Parses a tokens file: one `name role token [gateway]` per line; blank lines and `#`
    /// comments are skipped. Refuses unknown roles, short tokens, a 4th field other than
    /// `gateway`, and a token listed twice (which identity would it be?).
    pub fn parse(text: &str, path: &Path) -> Result<Tokens, AuthError> {
        let mut entries: Vec<Entry> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |message: String| AuthError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (name, role, token, gateway) = match fields[..] {
                [name, role, token] => (name, role, token, false),
                [name, role, token, "gateway"] => (name, role, token, true),
                [_, _, _, other] => {
                    return Err(bad(format!(
                    "the 4th field may only be `gateway` (a chat gateway's token), not {other:?}"
                )))
                }
                _ => {
                    return Err(bad(format!(
                        "expected 3 fields `name role token` (and optionally `gateway`), found {}",
                        fields.len()
                    )))
                }
            };
            let role = Role::parse(role)
                .ok_or_else(|| bad(format!("role {role:?} must be viewer, operator or admin")))?;
            if token.len() < MIN_TOKEN_LEN {
                return Err(bad(format!(
                    "the token of {name:?} is shorter than {MIN_TOKEN_LEN} characters"
                )));
            }
            let digest = digest(token);
            if entries.iter().any(|e| e.digest == digest) {
                return Err(bad(format!("the token of {name:?} is listed twice")));
            }
            entries.push(Entry {
                name: name.to_string(),
                role,
                digest,
                gateway,
            });
        }
        if entries.is_empty() {
            return Err(AuthError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Tokens { entries })
    }

    fn admin_token(data_dir: &Path) -> Result<Tokens, AuthError> {
        let path = admin_token_path(data_dir);
        let gen_err = |source| AuthError::Generate {
            path: path.clone(),
            source,
        };
        let token = match std::fs::read_to_string(&path) {
            Ok(t) => {
                warn_if_exposed(&path);
                tracing::debug!(path = %path.display(), "using the generated admin API token");
                t.trim().to_string()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::store::private_dir(data_dir).map_err(gen_err)?;
                let token = generate_token();
                write_private(&path, &token).map_err(gen_err)?;
                tracing::info!(
                    path = %path.display(),
                    "generated an admin API token (no api.tokens_file configured); read it from the file"
                );
                token
            }
            Err(source) => return Err(AuthError::Read { path, source }),
        };
        if token.len() < MIN_TOKEN_LEN {
            return Err(AuthError::Line {
                path,
                line: 1,
                message: format!("the admin token is shorter than {MIN_TOKEN_LEN} characters"),
            });
        }
        Ok(Tokens {
            entries: vec![Entry {
                name: "admin".into(),
                role: Role::Admin,
                digest: digest(&token),
                gateway: false,
            }],
        })
    }

    /// How many tokens are accepted.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The caller a presented token stands for. Every entry is compared (no early exit) so the
    /// time taken does not depend on which entry, if any, matched.
    /// Authenticates a request by its `Authorization: Bearer <token>` header. Every adapter
    /// on the operator listener (REST, MCP) uses this one check.
    pub fn caller_from_headers(
        &self,
        headers: &axum::http::HeaderMap,
    ) -> Result<Caller, BearerRefusal> {
        self.bearer(headers).map(|(caller, _)| caller)
    }

    /// [`Tokens::caller_from_headers`], and whether the token is a gateway token.
    fn bearer(&self, headers: &axum::http::HeaderMap) -> Result<(Caller, bool), BearerRefusal> {
        let refuse = |reason, invalid_token| {
            Err(BearerRefusal {
                reason,
                invalid_token,
            })
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return refuse("missing Authorization header", false);
        };
        let Ok(value) = value.to_str() else {
            return refuse("Authorization header is not ASCII", true);
        };
        let mut parts = value.trim().splitn(2, ' ');
        let scheme = parts.next().unwrap_or("");
        let token = parts.next().map(str::trim).unwrap_or("");
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return refuse("Authorization is not a Bearer token", false);
        }
        match self.entry(token) {
            Some(e) => Ok((e.caller(), e.gateway)),
            None => refuse("unknown token", true),
        }
    }

    pub fn authenticate(&self, token: &str) -> Option<Caller> {
        self.entry(token).map(Entry::caller)
    }

    fn entry(&self, token: &str) -> Option<&Entry> {
        let d = digest(token);
        let mut found: Option<&Entry> = None;
        for e in &self.entries {
            if bool::from(e.digest.ct_eq(&d)) {
                found = Some(e);
            }
        }
        found
    }
}

impl Entry {
    fn caller(&self) -> Caller {
        Caller {
            actor: self.name.clone(),
            channel: Channel::Rest,
            role: self.role,
        }
    }
}

/// 32 random bytes from the OS, base64url without padding (43 characters).
fn generate_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Creates `path` readable by the owner only; fails if it already exists, so a racing second
/// start cannot overwrite a token someone has already read.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

fn warn_if_exposed(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "the admin token file is readable by other users; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// The authenticated caller of a request (set by [`require_bearer`]).
pub struct Auth(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        // Only reachable without the middleware through a routing mistake; deny rather than
        // serve anonymously.
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .map(Auth)
            .ok_or_else(|| ApiError::unauthorized("authentication required", false))
    }
}

/// Why a request's bearer credentials were refused (for the log and the 401 body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BearerRefusal {
    pub reason: &'static str,
    /// A token was presented but is not valid (`error="invalid_token"` in the challenge).
    pub invalid_token: bool,
}

/// Header with which a relay (e.g. `flotilla mcp` over stdio, later the chat gateways) says
/// which channel the request came through, so the audit trail names it. The actor is still
/// the authenticated token's; only adapter channels may be claimed, never `system`.
pub const CHANNEL_HEADER: &str = "x-flotilla-channel";

fn declared_channel(headers: &axum::http::HeaderMap) -> Result<Option<Channel>, String> {
    let Some(v) = headers.get(CHANNEL_HEADER) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("");
    match Channel::parse(s) {
        Some(Channel::System) | None => Err(format!(
            "{CHANNEL_HEADER}: {s:?} is not a channel a client may declare \
             (rest, mcp, slack, discord, teams, console, cli)"
        )),
        Some(c) => Ok(Some(c)),
    }
}

/// Header with which a chat gateway running as its own process (`flotilla chat`) names the
/// chat user a request is made for: the percent-encoded chat identity, e.g.
/// `slack%3AT1%2FU1%20(Alice)` for `slack:T1/U1 (Alice)`.
pub const ACTING_FOR_HEADER: &str = "x-flotilla-acting-for";
/// The role the gateway's identity mapping gave that chat user.
pub const ACTING_ROLE_HEADER: &str = "x-flotilla-acting-role";

/// Longest chat identity accepted in [`ACTING_FOR_HEADER`] (decoded).
const MAX_ACTING_FOR: usize = 256;

/// Why the acting-for headers were refused: malformed (400) or not allowed for this token
/// (403).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActingRefusal {
    Malformed(String),
    NotGateway,
}

/// The caller a request stands for once the acting-for headers are applied. `token` is the
/// authenticated token's caller and whether it is a gateway token. Without the headers the
/// caller is the token's own; with them (gateway tokens only) it is `<token name> for
/// <chat identity>`, in the chat platform's channel, with the lower of the token's role and the
/// role the gateway gave the chat user — a gateway can never lend more than it holds.
pub fn acting_caller(
    headers: &axum::http::HeaderMap,
    token: (Caller, bool),
) -> Result<Caller, ActingRefusal> {
    let (caller, gateway) = token;
    let for_ = headers.get(ACTING_FOR_HEADER);
    let role = headers.get(ACTING_ROLE_HEADER);
    if for_.is_none() && role.is_none() {
        return Ok(caller);
    }
    if !gateway {
        return Err(ActingRefusal::NotGateway);
    }
    let bad = |m: String| Err(ActingRefusal::Malformed(m));
    let (Some(for_), Some(role)) = (for_, role) else {
        return bad(format!(
            "{ACTING_FOR_HEADER} and {ACTING_ROLE_HEADER} go together; one was sent alone"
        ));
    };
    let Ok(raw) = for_.to_str() else {
        return bad(format!(
            "{ACTING_FOR_HEADER} is not ASCII (percent-encode it)"
        ));
    };
    let Ok(identity) = percent_encoding::percent_decode_str(raw).decode_utf8() else {
        return bad(format!("{ACTING_FOR_HEADER} does not decode to UTF-8"));
    };
    if identity.is_empty()
        || identity.chars().count() > MAX_ACTING_FOR
        || identity.chars().any(char::is_control)
    {
        return bad(format!(
            "{ACTING_FOR_HEADER} must be 1 to {MAX_ACTING_FOR} characters without control characters"
        ));
    }
    let channel = match identity.split_once(':') {
        Some(("slack", rest)) if !rest.is_empty() => Channel::Slack,
        Some(("discord", rest)) if !rest.is_empty() => Channel::Discord,
        Some(("teams", rest)) if !rest.is_empty() => Channel::Teams,
        _ => {
            return bad(format!(
                "{ACTING_FOR_HEADER} must name a chat identity `slack:…`, `discord:…` or `teams:…`"
            ))
        }
    };
    let acting_role = role.to_str().ok().and_then(Role::parse).ok_or_else(|| {
        ActingRefusal::Malformed(format!(
            "{ACTING_ROLE_HEADER} must be viewer, operator or admin"
        ))
    })?;
    Ok(Caller {
        actor: format!("{} for {identity}", caller.actor),
        channel,
        role: caller.role.min(acting_role),
    })
}

/// Middleware on every `/api/v1` route: requires `Authorization: Bearer <token>`, puts the
/// [`Caller`] in the request extensions, then admits at most [`super::MAX_IN_FLIGHT`]
/// authenticated requests at once (429 beyond).
pub(super) async fn require_bearer(
    State(st): State<Arc<ApiState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "unknown".into());
    let deny = |reason: &str, invalid_token: bool, req: &Request| {
        tracing::warn!(%remote, method = %req.method(), path = %req.uri().path(), reason,
                       "API authentication failed");
        ApiError::unauthorized(
            format!("{reason}; send Authorization: Bearer <token>"),
            invalid_token,
        )
        .into_response()
    };
    let Some(tokens) = st.tokens.as_ref() else {
        return deny(
            "API tokens could not be loaded (see the server log)",
            false,
            &req,
        );
    };
    let token = match tokens.bearer(req.headers()) {
        Ok(t) => t,
        Err(e) => return deny(e.reason, e.invalid_token, &req),
    };
    let caller = match declared_channel(req.headers()) {
        Ok(Some(channel)) => Caller { channel, ..token.0 },
        Ok(None) => token.0,
        Err(msg) => return ApiError::new("bad_request", msg).into_response(),
    };
    let token_name = caller.actor.clone();
    let caller = match acting_caller(req.headers(), (caller, token.1)) {
        Ok(c) => c,
        Err(ActingRefusal::NotGateway) => {
            tracing::warn!(%remote, actor = %token_name, path = %req.uri().path(),
                "refused: acting-for headers from a token not marked `gateway` in api.tokens_file");
            return ApiError::new(
                "forbidden",
                format!(
                    "only a gateway token (4th field `gateway` in api.tokens_file) may send \
                     {ACTING_FOR_HEADER} / {ACTING_ROLE_HEADER}"
                ),
            )
            .into_response();
        }
        Err(ActingRefusal::Malformed(msg)) => {
            tracing::warn!(%remote, actor = %token_name, reason = %msg, "refused: malformed acting-for headers");
            return ApiError::new("bad_request", msg).into_response();
        }
    };
    let Ok(_permit) = st.inflight.clone().try_acquire_owned() else {
        let mut e = ApiError::new(
            "rate_limited",
            "too many API requests in flight; retry shortly",
        );
        e.retry_after = Some(1);
        tracing::warn!(%remote, actor = %caller.actor, "API request refused: too many in flight");
        return e.into_response();
    };
    req.extensions_mut().insert(caller);
    req.extensions_mut().insert(GatewayToken(token.1));
    next.run(req).await
}

/// Whether the request's token is marked `gateway` (set by [`require_bearer`]).
#[derive(Debug, Clone, Copy)]
pub struct GatewayToken(pub bool);

/// `GET /api/v1/whoami`: the caller as the server audits it — `{actor, channel, role,
/// gateway}`. A standalone chat gateway asks once at start, to refuse to run with a token
/// that may not act for chat users and to learn the name its users' records carry.
pub(super) async fn whoami(
    Auth(caller): Auth,
    gateway: Option<axum::Extension<GatewayToken>>,
) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "actor": caller.actor,
        "channel": caller.channel.as_str(),
        "role": caller.role.as_str(),
        "gateway": gateway.is_some_and(|g| g.0 .0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "first-token-0123456789";
    const T2: &str = "second-token-0123456789";

    #[test]
    fn parses_and_authenticates() {
        let text = format!("# comment\n\nalice admin {T1}\n  bob VIEWER {T2}  \n");
        let t = Tokens::parse(&text, Path::new("t")).unwrap();
        assert_eq!(t.len(), 2);
        let a = t.authenticate(T1).unwrap();
        assert_eq!(
            (a.actor.as_str(), a.role, a.channel),
            ("alice", Role::Admin, Channel::Rest)
        );
        assert_eq!(t.authenticate(T2).unwrap().role, Role::Viewer);
        assert!(t.authenticate("nope-nope-nope-nope").is_none());
        assert!(t.authenticate("").is_none());
        assert!(!format!("{t:?}").contains(T1));
    }

    fn headers(pairs: &[(&'static str, &str)]) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn gw(role: Role) -> (Caller, bool) {
        (
            Caller {
                actor: "chat-dmz".into(),
                channel: Channel::Rest,
                role,
            },
            true,
        )
    }

    #[test]
    fn gateway_tokens_are_marked_by_a_fourth_field() {
        let text = format!("dmz operator {T1} gateway\nbob viewer {T2}\n");
        let t = Tokens::parse(&text, Path::new("t")).unwrap();
        assert!(t.entry(T1).unwrap().gateway);
        assert!(!t.entry(T2).unwrap().gateway);
        let err = Tokens::parse(&format!("dmz operator {T1} gatewy"), Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("4th field"), "{err}");
    }

    #[test]
    fn a_gateway_acts_for_a_chat_user_with_the_lower_role() {
        let h = headers(&[
            (ACTING_FOR_HEADER, "slack%3AT1%2FU1%20(Al%C3%AFce)"),
            (ACTING_ROLE_HEADER, "admin"),
        ]);
        let c = acting_caller(&h, gw(Role::Operator)).unwrap();
        assert_eq!(c.actor, "chat-dmz for slack:T1/U1 (Alïce)");
        assert_eq!(c.channel, Channel::Slack);
        assert_eq!(c.role, Role::Operator, "never more than the token holds");
        let h = headers(&[
            (ACTING_FOR_HEADER, "teams:tenant/29%3Aabc"),
            (ACTING_ROLE_HEADER, "Viewer"),
        ]);
        let c = acting_caller(&h, gw(Role::Admin)).unwrap();
        assert_eq!((c.channel, c.role), (Channel::Teams, Role::Viewer));
        assert_eq!(c.actor, "chat-dmz for teams:tenant/29:abc");
        // Without the headers the token is itself.
        let c = acting_caller(&headers(&[]), gw(Role::Admin)).unwrap();
        assert_eq!((c.actor.as_str(), c.role), ("chat-dmz", Role::Admin));
    }

    #[test]
    fn acting_headers_are_refused_from_ordinary_tokens_and_when_malformed() {
        let ok = [
            (ACTING_FOR_HEADER, "slack%3AT1%2FU1"),
            (ACTING_ROLE_HEADER, "viewer"),
        ];
        let (caller, _) = gw(Role::Admin);
        assert_eq!(
            acting_caller(&headers(&ok), (caller, false)),
            Err(ActingRefusal::NotGateway)
        );
        for (pairs, needle) in [
            (&[ok[0]][..], "go together"),
            (&[ok[1]][..], "go together"),
            (
                &[(ACTING_FOR_HEADER, "mastodon%3Ax"), ok[1]][..],
                "chat identity",
            ),
            (
                &[(ACTING_FOR_HEADER, "slack%3A"), ok[1]][..],
                "chat identity",
            ),
            (
                &[(ACTING_FOR_HEADER, "slack%3AT%0AU"), ok[1]][..],
                "control",
            ),
            (&[(ACTING_FOR_HEADER, "slack%3A%FF"), ok[1]][..], "UTF-8"),
            (&[(ACTING_FOR_HEADER, ""), ok[1]][..], "1 to"),
            (
                &[ok[0], (ACTING_ROLE_HEADER, "root")][..],
                "viewer, operator or admin",
            ),
            (
                &[ok[0], (ACTING_ROLE_HEADER, "none")][..],
                "viewer, operator or admin",
            ),
        ] {
            match acting_caller(&headers(pairs), gw(Role::Admin)) {
                Err(ActingRefusal::Malformed(m)) => assert!(m.contains(needle), "{pairs:?}: {m}"),
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
        let long = format!("slack%3A{}", "x".repeat(MAX_ACTING_FOR));
        assert!(matches!(
            acting_caller(
                &headers(&[(ACTING_FOR_HEADER, &long), ok[1]]),
                gw(Role::Admin)
            ),
            Err(ActingRefusal::Malformed(_))
        ));
    }

    #[test]
    fn refuses_bad_files() {
        let p = Path::new("tokens");
        for (text, needle) in [
            ("alice admin", "3 fields"),
            ("alice root abcdefghijklmnopqrstuvwxyz", "role"),
            ("alice admin short", "shorter"),
            (&format!("a admin {T1}\nb viewer {T1}") as &str, "twice"),
            ("# nothing\n", "no tokens"),
        ] {
            let err = Tokens::parse(text, p).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let err = Tokens::parse("x\nalice admin", p).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn generates_admin_token_once_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let cfg = ApiConfig::default();
        let t1 = Tokens::load(&cfg, &data).unwrap();
        let path = admin_token_path(&data);
        let token = std::fs::read_to_string(&path).unwrap().trim().to_string();
        assert_eq!(token.len(), 43);
        assert_eq!(t1.authenticate(&token).unwrap().role, Role::Admin);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Reused, not regenerated.
        let t2 = Tokens::load(&cfg, &data).unwrap();
        assert!(t2.authenticate(&token).is_some());
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), token);
    }

    #[test]
    fn missing_tokens_file_is_an_error() {
        let cfg = ApiConfig {
            tokens_file: Some("/nonexistent/flotilla-tokens".into()),
            ..ApiConfig::default()
        };
        assert!(matches!(
            Tokens::load(&cfg, Path::new("/tmp")),
            Err(AuthError::Read { .. })
        ));
    }
}
