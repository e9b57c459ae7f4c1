//! The REST API of the relay role (axum).
//!
//! `POST/GET /v1/sessions`, `GET/PATCH/DELETE /v1/sessions/{id}`, `GET /health`,
//! `GET /metrics`. Every error is JSON `{"code": "...", "message": "..."}` with a stable
//! code; no input reaches a panic.

mod conferences;
mod error;
mod sessions;

pub use error::ApiError;

use crate::relay::Relay;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;
use tower::limit::ConcurrencyLimitLayer;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// Shared state of the API handlers.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The relay.
    pub relay: Arc<Relay>,
    /// Required bearer token; `None` when authentication is disabled.
    pub token: Option<Arc<str>>,
    /// The SIP store, when the proxy/registrar runs in this process.
    pub store: Option<Arc<dyn crate::store::Store>>,
    /// Call anchoring for NG over HTTP (`POST /ng`).
    pub calls: Option<Arc<crate::relay::calls::Calls>>,
    /// SIP counters, when the proxy runs in this process.
    pub sip: Option<crate::obs::sip::SipMetrics>,
    /// The cluster's live members (`GET /v1/cluster`), when the process is in one.
    pub cluster: Option<tokio::sync::watch::Receiver<crate::cluster::View>>,
}

/// Builds the router.
pub fn router(state: ApiState) -> Router {
    let max = state.relay.config().api_max_concurrency.max(1);
    let protected = Router::new()
        .route("/v1/sessions", get(sessions::list).post(sessions::create))
        .route("/v1/sessions/{id}", get(sessions::get).patch(sessions::update).delete(sessions::delete))
        .route("/v1/conferences", get(conferences::list).post(conferences::create))
        .route("/v1/conferences/{id}", get(conferences::get).delete(conferences::delete))
        .route("/v1/conferences/{id}/participants", axum::routing::post(conferences::add_participant))
        .route(
            "/v1/conferences/{id}/participants/{pid}",
            get(conferences::get_participant)
                .patch(conferences::update_participant)
                .delete(conferences::delete_participant),
        )
        .route("/v1/users", axum::routing::post(crate::proxy::api::create))
        .route("/ng", axum::routing::post(ng_http))
        .route("/metrics", get(metrics))
        .route("/v1/cluster", get(cluster))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(ConcurrencyLimitLayer::new(max))
        .with_state(state)
}

/// Compares in time independent of where the first difference is.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let Some(token) = &st.token else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| req.headers().get("x-api-token").and_then(|v| v.to_str().ok()));
    match given {
        Some(g) if constant_time_eq(g.trim().as_bytes(), token.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid API token").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing API token: send 'Authorization: Bearer <token>'",
        )
        .into_response(),
    }
}

async fn health(State(st): State<ApiState>) -> Response {
    let workers: Vec<_> = st
        .relay
        .workers()
        .into_iter()
        .map(|(mode, core, _)| serde_json::json!({"io_mode": mode, "core": core}))
        .collect();
    Json(serde_json::json!({"status": "ok", "role": "relay", "workers": workers})).into_response()
}

async fn cluster(State(st): State<ApiState>) -> Response {
    Json(crate::cluster::api::members(st.cluster.as_ref())).into_response()
}

async fn metrics(State(st): State<ApiState>) -> Response {
    let mut collectors: Vec<Box<dyn prometheus_client::collector::Collector>> = vec![
        Box::new(crate::obs::relay::RelayCollector::new(st.relay)),
        Box::new(crate::obs::http::HttpCollector::process()),
    ];
    if let Some(sip) = st.sip {
        collectors.push(Box::new(sip));
    }
    match crate::obs::render(collectors) {
        Ok(text) => {
            ([(header::CONTENT_TYPE, HeaderValue::from_static(crate::obs::CONTENT_TYPE))], text).into_response()
        }
        Err(_) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "metrics could not be encoded").into_response()
        }
    }
}

/// rtpengine's NG protocol over HTTP: the body is `<cookie> <bencoded dict>`, the answer
/// the same framing (as rtpengine's `POST /ng`). What `hasp proxy --relay http://…` uses.
async fn ng_http(State(st): State<ApiState>, body: axum::body::Bytes) -> Response {
    let Some(calls) = st.calls.clone() else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "NG is not served here").into_response();
    };
    let Some((cookie, dict)) = crate::control::ng::split_cookie(&body) else {
        return ApiError::new(StatusCode::BAD_REQUEST, "bad_ng", "expected '<cookie> <bencoded dictionary>'")
            .into_response();
    };
    let cookie = cookie.to_vec();
    let reply = match crate::control::ng::bencode::decode(dict) {
        Ok((v, _)) => tokio::task::spawn_blocking(move || crate::control::ng::handle_command(&calls, &v))
            .await
            .unwrap_or_else(|_| crate::control::ng::error_reply("internal error")),
        Err(e) => crate::control::ng::error_reply(&format!("Could not decode dictionary: {e}")),
    };
    let mut r = crate::control::ng::frame(&cookie, &reply).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-rtpengine-ng"));
    r
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this resource")
}

/// Serves the API on `listener` under `limits` (connection caps, timeouts: see
/// [`crate::net::http`]) until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    limits: crate::net::http::HttpLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::net::http::serve(listener, crate::net::http::exported("api"), router(state), limits, shutdown).await
}
