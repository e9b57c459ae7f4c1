//! `POST /v1/users`: provision a SIP user (`{"user", "domain", "password"}`).

use crate::control::rest::{ApiError, ApiState};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    user: String,
    domain: String,
    password: String,
}

fn ok_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic() && b != b'@' && b != b':')
}

pub(crate) async fn create(
    State(st): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let store = st
        .store
        .clone()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no SIP registrar runs in this process"))?;
    provision(store, body).await
}

async fn provision(
    store: std::sync::Arc<dyn crate::store::Store>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), "bad_body", e.body_text()))?;
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", format!("malformed JSON: {e}")))?;
    let u: NewUser = serde_json::from_value(v).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            format!("expected {{user, domain, password}}: {e}"),
        )
    })?;
    if !ok_token(&u.user) || !ok_token(&u.domain) || u.password.is_empty() || u.password.len() > 256 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "user and domain must be 1-128 printable characters without '@' or ':', password 1-256",
        ));
    }
    let (user, domain) = (u.user.clone(), u.domain.clone());
    tokio::task::spawn_blocking(move || store.put_user(&u.user, &u.domain, &u.password))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "failed"))?
        .map_err(ApiError::from)?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({"user": user, "domain": domain}))).into_response())
}

/// State of the proxy role's own API (no relay in the process).
#[derive(Clone)]
pub struct ProxyApiState {
    /// The store.
    pub store: std::sync::Arc<dyn crate::store::Store>,
    /// Required bearer token; `None` when authentication is disabled.
    pub token: Option<std::sync::Arc<str>>,
    /// SIP counters for `/metrics`.
    pub sip: Option<crate::obs::sip::SipMetrics>,
    /// The cluster's live members (`GET /v1/cluster`).
    pub cluster: Option<tokio::sync::watch::Receiver<crate::cluster::View>>,
}

fn check_token(st: &ProxyApiState, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let Some(t) = &st.token else { return Ok(()) };
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if crate::control::rest::constant_time_eq(g.trim().as_bytes(), t.as_bytes()) => Ok(()),
        _ => Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid or missing API token")),
    }
}

async fn proxy_create(
    State(st): State<ProxyApiState>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_token(&st, &headers)?;
    provision(st.store.clone(), body).await
}

async fn proxy_cluster(State(st): State<ProxyApiState>, headers: axum::http::HeaderMap) -> Result<Response, ApiError> {
    check_token(&st, &headers)?;
    Ok(Json(crate::cluster::api::members(st.cluster.as_ref())).into_response())
}

async fn proxy_metrics(State(st): State<ProxyApiState>, headers: axum::http::HeaderMap) -> Result<Response, ApiError> {
    check_token(&st, &headers)?;
    let mut collectors: Vec<Box<dyn prometheus_client::collector::Collector>> =
        vec![Box::new(crate::obs::http::HttpCollector::process())];
    if let Some(sip) = st.sip {
        collectors.push(Box::new(sip));
    }
    let text = crate::obs::render(collectors)
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "metrics could not be encoded"))?;
    let content_type = axum::http::HeaderValue::from_static(crate::obs::CONTENT_TYPE);
    Ok(([(axum::http::header::CONTENT_TYPE, content_type)], text).into_response())
}

/// The API of `hasp proxy`: `GET /health`, `POST /v1/users`, `GET /metrics`,
/// `GET /v1/cluster`.
pub fn proxy_router(state: ProxyApiState) -> axum::Router {
    axum::Router::new()
        .route("/health", axum::routing::get(|| async { Json(serde_json::json!({"status": "ok", "role": "proxy"})) }))
        .route("/v1/users", axum::routing::post(proxy_create))
        .route("/metrics", axum::routing::get(proxy_metrics))
        .route("/v1/cluster", axum::routing::get(proxy_cluster))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

/// Serves `hasp proxy`'s API on `listener` under `limits` (connection caps, timeouts:
/// see [`crate::net::http`]) until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ProxyApiState,
    limits: crate::net::http::HttpLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::net::http::serve(listener, crate::net::http::exported("api"), proxy_router(state), limits, shutdown).await
}
