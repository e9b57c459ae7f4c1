//! The LI administration API (X1-like), on its own listener with its own token:
//! `POST/GET /v1/li/tasks`, `GET/PATCH/DELETE /v1/li/tasks/{xid}`, `GET /v1/li/stats`.
//! Every request, allowed or denied, is written to the audit log before it is
//! answered.

use super::tasks::{Task, TaskPatch};
use super::Li;
use crate::control::rest::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::net::SocketAddr;
use std::sync::Arc;

/// Shared state of the LI API.
#[derive(Debug, Clone)]
pub struct LiApiState {
    /// The LI function.
    pub li: Arc<Li>,
    /// The LI administrators' token.
    pub token: Arc<str>,
}

fn who(peer: &SocketAddr) -> String {
    format!("li-token@{peer}")
}

async fn auth(
    State(st): State<LiApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| {
        let (a, b) = (g.trim().as_bytes(), st.token.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    });
    if !ok {
        let what = format!("{} {}", req.method(), req.uri().path());
        let _ = st.li.audit().record(
            &format!("unauthenticated@{peer}"),
            "denied",
            None,
            "unauthorized",
            Some(&what.into()),
        );
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "LI credentials required").into_response();
    }
    next.run(req).await
}

fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<(T, serde_json::Value), ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), "bad_body", e.body_text()))?;
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", format!("malformed JSON: {e}")))?;
    let t = serde_json::from_value(v.clone()).map_err(|e| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", format!("invalid task: {e}"))
    })?;
    Ok((t, v))
}

/// Audits the outcome, then answers. An audit failure fails the request: an action
/// that cannot be recorded must not be acknowledged.
fn audited(
    st: &LiApiState,
    peer: &SocketAddr,
    action: &str,
    xid: Option<&str>,
    detail: Option<&serde_json::Value>,
    r: Result<Response, ApiError>,
) -> Response {
    let outcome = match &r {
        Ok(_) => "ok".to_string(),
        Err(e) => e.code.to_string(),
    };
    if let Err(e) = st.li.audit().record(&who(peer), action, xid, &outcome, detail) {
        tracing::error!(error = %e, "LI audit log write failed");
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "audit_failed", "the audit log cannot be written")
            .into_response();
    }
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn create(
    State(st): State<LiApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (r, xid, detail) = match parse::<Task>(body) {
        Ok((task, v)) => {
            let xid = task.xid.clone();
            let li = st.li.clone();
            let r = tokio::task::spawn_blocking(move || li.create(task))
                .await
                .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "failed"))
                .and_then(|r| r.map_err(ApiError::from));
            let r = r.map(|_| (StatusCode::CREATED, Json(st.li.get(&xid))).into_response());
            (r, Some(xid), Some(v))
        }
        Err(e) => (Err(e), None, None),
    };
    audited(&st, &peer, "activate", xid.as_deref(), detail.as_ref(), r)
}

async fn list(State(st): State<LiApiState>, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    let tasks = st.li.list();
    audited(&st, &peer, "list", None, None, Ok(Json(serde_json::json!({"tasks": tasks})).into_response()))
}

async fn get_one(
    State(st): State<LiApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(xid): Path<String>,
) -> Response {
    let r = st
        .li
        .get(&xid)
        .map(|t| Json(t).into_response())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no task {xid}")));
    audited(&st, &peer, "get", Some(&xid), None, r)
}

async fn modify(
    State(st): State<LiApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(xid): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (r, detail) = match parse::<TaskPatch>(body) {
        Ok((patch, v)) => {
            let (li, x) = (st.li.clone(), xid.clone());
            let r = tokio::task::spawn_blocking(move || li.modify(&x, patch))
                .await
                .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "failed"))
                .and_then(|r| r.map_err(ApiError::from))
                .map(|_| Json(st.li.get(&xid)).into_response());
            (r, Some(v))
        }
        Err(e) => (Err(e), None),
    };
    audited(&st, &peer, "modify", Some(&xid), detail.as_ref(), r)
}

async fn delete(
    State(st): State<LiApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(xid): Path<String>,
) -> Response {
    let (li, x) = (st.li.clone(), xid.clone());
    let r = tokio::task::spawn_blocking(move || li.delete(&x))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "failed"))
        .and_then(|r| r.map_err(ApiError::from))
        .map(|()| StatusCode::NO_CONTENT.into_response());
    audited(&st, &peer, "deactivate", Some(&xid), None, r)
}

async fn stats(State(st): State<LiApiState>, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    let s = st.li.stats();
    audited(&st, &peer, "stats", None, None, Ok(Json(s).into_response()))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
}

/// The LI router.
pub fn router(state: LiApiState) -> Router {
    Router::new()
        .route("/v1/li/tasks", get(list).post(create))
        .route("/v1/li/tasks/{xid}", get(get_one).patch(modify).delete(delete))
        .route("/v1/li/stats", get(stats))
        .fallback(not_found)
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

/// Serves the LI API on `listener` under `limits` (connection caps, timeouts: see
/// [`crate::net::http`]) until the process ends. Peer addresses reach the handlers as
/// `ConnectInfo` and are recorded in the audit log. Its connection counters are kept
/// off the relay's `/metrics`, which must not show that interception exists.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: LiApiState,
    limits: crate::net::http::HttpLimits,
) -> std::io::Result<()> {
    let stats = std::sync::Arc::new(crate::net::http::ListenerStats::new("li_api"));
    crate::net::http::serve(listener, stats, router(state), limits, std::future::pending()).await
}
