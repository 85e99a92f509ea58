//! The REST API's error shape, `{"error": {"code", "message"}}`, the one table mapping every
//! stable error code to its HTTP status, and JSON/Path/Query extractors whose rejections use
//! that shape instead of axum's plain-text defaults.

use axum::extract::rejection::JsonRejection;
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
    ("malformed_json", 400, "The request body is not valid JSON or has the wrong shape; the message is serde's."),
    ("invalid_query", 400, "The agent search query does not parse."),
    ("invalid_params", 400, "Unknown command kind, or parameters the kind does not accept."),
    ("unauthorized", 401, "Missing, malformed or unknown bearer token."),
    ("forbidden", 403, "The token's role may not perform this operation."),
    ("not_found", 404, "The agent, command or batch does not exist."),
    ("no_route", 404, "No such API endpoint."),
    ("method_not_allowed", 405, "The endpoint exists but not with this HTTP method."),
    ("conflict", 409, "The resource is in a state that forbids the operation (e.g. cancelling a command already sent)."),
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

/// `axum::Json` with JSON error bodies: 415 without a JSON content type, 413 over the body
/// limit, 400 `malformed_json` (with serde's message) for bad syntax or shape.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                "unsupported_media_type",
                "request bodies must be JSON, sent with Content-Type: application/json",
            )),
            Err(JsonRejection::JsonDataError(e)) => {
                Err(ApiError::new("malformed_json", e.body_text()))
            }
            Err(JsonRejection::JsonSyntaxError(e)) => {
                Err(ApiError::new("malformed_json", e.body_text()))
            }
            Err(JsonRejection::BytesRejection(e))
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::new(
                    "body_too_large",
                    "request body is larger than the server accepts (api.max_body_bytes)",
                ))
            }
            Err(other) => Err(ApiError::bad_request(other.body_text())),
        }
    }
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
                operation: "x",
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
