//! The operator REST API under `/api/v1`, plus `/healthz`, `/readyz` and `/metrics`.
//!
//! A thin adapter over [`Fleet`]: it authenticates, parses, calls one service method and
//! renders the answer; every rule about the fleet lives in the service, and every write goes
//! through it (so it is role-checked and audited). Routes are declared once, in [`api_table`]
//! and [`ops_table`]; [`routes`] lists them for the OpenAPI completeness test.

pub mod auth;
pub mod errors;
pub mod openapi;

mod agents;
mod audit;
mod commands;
mod ops;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{middleware, Router};
use tokio::sync::Semaphore;

use crate::config::ApiConfig;
use crate::service::Fleet;

/// Most authenticated API requests served at once; more get 429 + `Retry-After`. Searches scan
/// the registry, so an unbounded burst from one script would starve everyone else.
pub const MAX_IN_FLIGHT: usize = 256;

/// Everything the REST API needs.
pub struct RestContext {
    pub fleet: Fleet,
    pub cfg: ApiConfig,
    pub data_dir: std::path::PathBuf,
}

/// State shared by the handlers (built by [`router`]).
pub struct ApiState {
    fleet: Fleet,
    /// `None` when the tokens could not be loaded: every `/api/v1` request is then refused.
    tokens: Option<auth::Tokens>,
    inflight: Arc<Semaphore>,
}

type S = Arc<ApiState>;
type RouteEntry = (&'static str, &'static str, MethodRouter<S>);

/// One route; the method string drives the method filter, so the listing cannot disagree with
/// what is served.
fn r<H, T>(method: &'static str, path: &'static str, h: H) -> RouteEntry
where
    H: Handler<T, S>,
    T: 'static,
{
    let filter = match method {
        "GET" => MethodFilter::GET,
        "POST" => MethodFilter::POST,
        "PUT" => MethodFilter::PUT,
        "DELETE" => MethodFilter::DELETE,
        other => panic!("route table: unsupported method {other}"),
    };
    (method, path, on(filter, h))
}

/// The authenticated `/api/v1` routes.
fn api_table() -> Vec<RouteEntry> {
    vec![
        r("GET", "/api/v1/agents", agents::search),
        r("GET", "/api/v1/agents/{uid}", agents::get),
        r(
            "PUT",
            "/api/v1/agents/{uid}/labels/{key}",
            agents::put_label,
        ),
        r(
            "DELETE",
            "/api/v1/agents/{uid}/labels/{key}",
            agents::delete_label,
        ),
        r(
            "POST",
            "/api/v1/agents/{uid}/commands",
            commands::queue_for_agent,
        ),
        r("POST", "/api/v1/commands", commands::queue),
        r("GET", "/api/v1/commands", commands::list),
        r("GET", "/api/v1/commands/{id}", commands::get),
        r("DELETE", "/api/v1/commands/{id}", commands::cancel),
        r("GET", "/api/v1/batches/{id}", commands::batch),
        r("GET", "/api/v1/catalog", commands::catalog),
        r("GET", "/api/v1/fleet/summary", agents::summary),
        r("GET", "/api/v1/audit", audit::query),
        r("GET", "/api/v1/audit/verify", audit::verify),
        r("GET", "/api/v1/audit/export", audit::export),
        r("GET", "/api/v1/whoami", auth::whoami),
    ]
}

/// The unauthenticated routes: operations, and the API's own description.
fn ops_table() -> Vec<RouteEntry> {
    vec![
        r("GET", "/healthz", ops::healthz),
        r("GET", "/readyz", ops::readyz),
        r("GET", "/metrics", ops::metrics),
        // Without a token: client generators and API browsers fetch it first.
        r("GET", "/api/v1/openapi.json", openapi::serve),
    ]
}

/// Every served (method, path), in axum path syntax (which is also OpenAPI's for these paths).
pub fn routes() -> Vec<(&'static str, &'static str)> {
    api_table()
        .into_iter()
        .chain(ops_table())
        .map(|(m, p, _)| (m, p))
        .collect()
}

/// The operator-facing router.
pub fn router(ctx: Arc<RestContext>) -> Router {
    let tokens = match auth::Tokens::load(&ctx.cfg, &ctx.data_dir) {
        Ok(t) => {
            tracing::info!(tokens = t.len(), "API tokens loaded");
            Some(t)
        }
        Err(e) => {
            tracing::error!(error = %e, "API tokens could not be loaded; every /api/v1 request will be refused");
            None
        }
    };
    let st = Arc::new(ApiState {
        fleet: ctx.fleet.clone(),
        tokens,
        inflight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
    });
    build(st, ctx.cfg.max_body_bytes)
}

fn build(st: Arc<ApiState>, max_body_bytes: usize) -> Router {
    let mut api = Router::new();
    for (_, path, mr) in api_table() {
        api = api.route(path, mr);
    }
    // The 405 fallback is set before the layers so a wrong method is authenticated too.
    let api = api
        .method_not_allowed_fallback(errors::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(
            st.clone(),
            auth::require_bearer,
        ));
    let mut ops = Router::new();
    for (_, path, mr) in ops_table() {
        ops = ops.route(path, mr);
    }
    ops.method_not_allowed_fallback(errors::method_not_allowed)
        .merge(api)
        .fallback(errors::no_route)
        .with_state(st)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::hub::Hub;
    use crate::metrics::Metrics;
    use crate::service::FleetSettings;
    use crate::store::sqlite::SqliteStore;

    #[tokio::test]
    async fn requests_beyond_the_in_flight_limit_get_429() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let fleet = Fleet::new(
            Arc::new(store),
            Arc::new(Hub::new()),
            Arc::new(Metrics::new()),
            FleetSettings {
                queue_ttl_s: 60,
                result_timeout_s: 60,
                max_fanout: 10,
                heartbeat_interval_s: 30,
                admin_shutdown_above: 10,
                replica_id: "test".into(),
                replica_heartbeat_s: 5,
            },
        );
        let token = "a-token-long-enough-0123";
        let tokens =
            auth::Tokens::parse(&format!("me viewer {token}"), std::path::Path::new("t")).unwrap();
        // No permits at all: every authenticated request is over the limit.
        let st = Arc::new(ApiState {
            fleet,
            tokens: Some(tokens),
            inflight: Arc::new(Semaphore::new(0)),
        });
        let app = build(st, 4096);
        let req = |auth: Option<&str>| {
            let mut b = Request::get("/api/v1/catalog");
            if let Some(t) = auth {
                b = b.header("Authorization", format!("Bearer {t}"));
            }
            b.body(Body::empty()).unwrap()
        };
        let resp = app.clone().oneshot(req(Some(token))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()["retry-after"], "1");
        let body = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "rate_limited");
        // Unauthenticated requests are refused before they could take a permit.
        let resp = app.clone().oneshot(req(None)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        // The operational endpoints are not limited.
        let resp = app
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[test]
    fn openapi_paths_match_the_routes() {
        let doc = openapi::document();
        let mut in_doc = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, _) in item.as_object().unwrap() {
                in_doc.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
        let served: BTreeSet<(String, String)> = routes()
            .into_iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(served.len(), routes().len(), "a route is listed twice");
        assert_eq!(
            served.difference(&in_doc).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "served but not documented"
        );
        assert_eq!(
            in_doc.difference(&served).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "documented but not served"
        );
    }
}
