//! The REST API's error shape, `{"error": {"code", "message"}}`, the one table mapping every
//! stable error code to its HTTP status, and JSON/Path/Query extractors whose rejections use
//! that shape instead of axum's plain-text defaults.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::service::FleetError;

/// Every error code the REST API returns, with its HTTP status and meaning. The status of a
/// code never changes (clients branch on the code); the OpenAPI document is generated from
/// this table, so the two cannot disagree.
pub const ERROR_CODES: &[(&str, u16, &str)] = &[
    ("bad_request", 400, "A path or query parameter is malformed or out of range."),
    ("malformed_json", 400, "The request body is not valid JSON or has the wrong shape; the message names the field and the line and column."),
    ("invalid_query", 400, "The agent search query does not parse."),
    ("invalid_params", 400, "Unknown command kind, or parameters the kind does not accept."),
    ("unauthorized", 401, "Missing, malformed or unknown bearer token."),
    ("forbidden", 403, "The token's role may not perform this operation."),
    ("not_found", 404, "The agent, command or batch does not exist (an agent may be named by uid, host name or service name)."),
    ("no_route", 404, "No such API endpoint."),
    ("method_not_allowed", 405, "The endpoint exists but not with this HTTP method."),
    ("conflict", 409, "The resource is in a state that forbids the operation (e.g. cancelling a command already sent)."),
    ("ambiguous_agent", 409, "The agent was named by a host or service name (or a query) that several agents match; the message lists them. Name one by uid."),
    ("targets_changed", 409, "The request carried expect_targets from a dry run, and the agents it would reach are no longer those; nothing was queued."),
    ("body_too_large", 413, "The request body exceeds api.max_body_bytes."),
    ("unsupported_media_type", 415, "A request body was sent without Content-Type: application/json."),
    // 422: the request is well-formed and authorised but the fleet cannot act on it as asked;
    // retrying the same request unchanged will fail the same way until the fleet changes.
    ("capability_missing", 422, "The target agent(s) did not declare the capability the command needs."),
    ("no_targets", 422, "The fan-out query matched no agent."),
    ("too_many_targets", 422, "The fan-out query matched more agents than commands.max_fanout."),
    ("rate_limited", 429, "Too many API requests in flight; retry after the Retry-After seconds."),
    ("storage_unavailable", 503, "The store did not answer; retry later."),
];

/// The HTTP status of a stable error code (500 for a code missing from [`ERROR_CODES`]).
pub fn status_of(code: &str) -> StatusCode {
    ERROR_CODES
        .iter()
        .find(|(c, _, _)| *c == code)
        .and_then(|(_, s, _)| StatusCode::from_u16(*s).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// An error response. Built from a [`FleetError`] or by the REST layer itself.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for `Retry-After` (429, 503).
    pub retry_after: Option<u64>,
    /// `WWW-Authenticate` value (401).
    pub www_authenticate: Option<&'static str>,
}

impl ApiError {
    /// An error with `code`'s status from [`ERROR_CODES`].
    pub fn new(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: status_of(code),
            code,
            message: message.into(),
            retry_after: None,
            www_authenticate: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new("bad_request", message)
    }

    /// 401 with the RFC 6750 challenge; `invalid_token` when a token was sent but is unknown.
    pub fn unauthorized(message: impl Into<String>, invalid_token: bool) -> ApiError {
        let mut e = ApiError::new("unauthorized", message);
        e.www_authenticate = Some(if invalid_token {
            r#"Bearer realm="flotilla", error="invalid_token""#
        } else {
            r#"Bearer realm="flotilla""#
        });
        e
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> ApiError {
        match &e {
            FleetError::Store(inner) => {
                // The detail (paths, SQL) is for the server log, not for API clients.
                tracing::error!(error = %inner, "store failed while serving an API request");
                let mut out = ApiError::new(
                    "storage_unavailable",
                    "storage unavailable; try again later",
                );
                out.retry_after = Some(5);
                out
            }
            _ => ApiError::new(e.code(), e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(w) = self.www_authenticate {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(w));
        }
        resp
    }
}

/// A JSON request body with JSON error bodies: 415 without a JSON content type, 413 over the
/// body limit, 400 `malformed_json` naming the field and position that is wrong in the
/// client's terms (never the server's Rust types).
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if !content_type.as_deref().is_some_and(is_json) {
            let got = match &content_type {
                Some(ct) => format!("Content-Type {ct:?}"),
                None => "no Content-Type".into(),
            };
            return Err(ApiError::new(
                "unsupported_media_type",
                format!("request bodies must be JSON, sent with Content-Type: application/json (this request had {got})"),
            ));
        }
        let body = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    "body_too_large",
                    "request body is larger than the server accepts (api.max_body_bytes)",
                )
            } else {
                ApiError::bad_request(format!(
                    "the request body could not be read: {}",
                    e.body_text()
                ))
            }
        })?;
        parse_body(&body).map(Json)
    }
}

/// `application/json`, or any `application/*+json`, with or without parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

/// Parses a request body, describing a failure as the client sees the body: which field
/// (as a path like `expect_targets.count`), what was wrong, and where.
fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Every request body is an object; serde would describe an array as a struct of the
    // wrong length.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::new(
            "malformed_json",
            match serde_json::from_slice::<serde_json::Value>(body) {
                Err(e) => format!("request body is not valid JSON: {e}"),
                Ok(v) => format!("request body must be a JSON object, not {}", json_kind(&v)),
            },
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    let err = match parsed {
        Ok(v) => match de.end() {
            Ok(()) => return Ok(v),
            Err(e) => e,
        },
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_data() && path != "." {
                return Err(ApiError::new(
                    "malformed_json",
                    format!("request body, field `{path}`: {}", plain_serde(&inner)),
                ));
            }
            inner
        }
    };
    let what = if err.is_data() {
        "request body"
    } else {
        "request body is not valid JSON"
    };
    Err(ApiError::new(
        "malformed_json",
        format!("{what}: {}", plain_serde(&err)),
    ))
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// serde's message with its names for Rust things replaced by JSON's: "expected struct
/// LabelBody" means "expected a JSON object" to a client, "sequence" is an array, "map" an
/// object.
fn plain_serde(e: &serde_json::Error) -> String {
    let mut msg = e.to_string();
    while let Some(at) = msg.find("struct ") {
        let rest = &msg[at + "struct ".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        msg.replace_range(at..at + "struct ".len() + end, "a JSON object");
    }
    msg.replace("invalid type: sequence", "invalid type: array")
        .replace("invalid type: map", "invalid type: object")
        .replace("unit value", "null")
}

/// `axum::extract::Query` with a 400 `bad_request` JSON error naming the bad parameter.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// `axum::extract::Path` with a 400 `bad_request` JSON error.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// Parses a UUID path or query value, naming `what` in the error.
pub fn parse_uuid(what: &str, s: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(s.trim())
        .map_err(|_| ApiError::bad_request(format!("{what} {s:?} is not a UUID")))
}

/// Fallback for paths no route matches.
pub async fn no_route() -> ApiError {
    ApiError::new("no_route", "no such endpoint; see GET /api/v1/openapi.json")
}

/// Fallback for a known path with a method it does not serve.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        "method_not_allowed",
        "this endpoint does not support that method; see GET /api/v1/openapi.json",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::CommandError;

    #[test]
    fn every_fleet_error_code_has_a_status() {
        let errors = [
            FleetError::Forbidden {
                actor: "a".into(),
                role: crate::model::Role::Viewer,
                needed: crate::model::Role::Operator,
                operation: "x".into(),
            },
            FleetError::NotFound {
                what: "agent",
                id: "x".into(),
            },
            FleetError::BadRequest("x".into()),
            FleetError::BadQuery("x".into()),
            FleetError::Command(CommandError::InvalidParams {
                kind: "restart",
                message: "x".into(),
            }),
            FleetError::Command(CommandError::NotCapable {
                agent: uuid::Uuid::nil(),
                kind: "restart",
                reason: "x".into(),
            }),
            FleetError::NoTargets("x".into()),
            FleetError::TooManyTargets { count: 2, max: 1 },
            FleetError::Conflict("x".into()),
            FleetError::AmbiguousAgent("x".into()),
            FleetError::UnknownAgent("x".into()),
            FleetError::TargetsChanged("x".into()),
            FleetError::Store(crate::store::StoreError::Corrupt("x".into())),
        ];
        for e in errors {
            let code = e.code();
            assert!(
                ERROR_CODES.iter().any(|(c, _, _)| *c == code),
                "{code} missing from ERROR_CODES"
            );
            assert_eq!(ApiError::from(e).code, code);
        }
        assert_eq!(
            status_of("capability_missing"),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status_of("storage_unavailable"),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
