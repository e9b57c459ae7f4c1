//! The LI administration API (X1-like), on its own listener with its own token:
//! `POST/GET /v1/li/tasks`, `GET/PATCH/DELETE /v1/li/tasks/{xid}`, `GET /v1/li/stats`.
//!
//! Every authenticated request is written to the audit log: a change before it takes
//! effect (see [`Li::create`]), a read before it is answered. Unauthenticated requests
//! are rate-limited before they reach the disk ([`super::audit::AuditLog::admit_denied`]):
//! within the budget each is one `denied` record and a 401, past it a 429 and a count in
//! the next `denied_suppressed` summary.

use super::error::Error;
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

/// The API's answer for an LI error: its stable code, and a status saying whether
/// retrying can help (503: the audit log or state file is failing, nothing was done).
fn api_error(e: Error) -> ApiError {
    let status = match &e {
        Error::Invalid(_) | Error::Limit(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Audit(_) | Error::State(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if matches!(e, Error::Audit(_) | Error::AuditIncomplete(_) | Error::State(_)) {
        tracing::error!(error = %e, "LI change");
    }
    ApiError::new(status, e.code(), e.to_string())
}

fn internal() -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "failed")
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
    if ok {
        return next.run(req).await;
    }
    // Rate-limited before the disk: a flood of bad tokens costs a counter each.
    if !st.li.audit().admit_denied(peer.ip()) {
        let mut r = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many unauthenticated requests")
            .into_response();
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return r;
    }
    let what = format!("{} {}", req.method(), req.uri().path());
    let li = st.li.clone();
    let written =
        tokio::task::spawn_blocking(move || li.audit().record_denied(&format!("unauthenticated@{peer}"), &what)).await;
    if let Ok(Err(e)) = written {
        tracing::error!(error = %e, "LI audit log: cannot record a denied request");
    }
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "LI credentials required").into_response()
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

/// Audits a request that changes nothing (a read, or a change refused before it was
/// understood), then answers. An audit failure fails the request: what cannot be
/// recorded is not answered.
async fn audited(
    st: &LiApiState,
    peer: &SocketAddr,
    action: &'static str,
    xid: Option<String>,
    r: Result<Response, ApiError>,
) -> Response {
    let outcome = match &r {
        Ok(_) => "ok",
        Err(e) => e.code,
    };
    let (li, who) = (st.li.clone(), who(peer));
    let written = tokio::task::spawn_blocking(move || li.audit().record(&who, action, xid.as_deref(), outcome, None))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
    if let Err(e) = written {
        return api_error(Error::Audit(e)).into_response();
    }
    r.unwrap_or_else(IntoResponse::into_response)
}

/// Runs a change (which audits itself, write-ahead) off the async threads: it fsyncs.
async fn change<T: Send + 'static>(f: impl FnOnce() -> Result<T, Error> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| internal())?.map_err(api_error)
}

async fn create(
    State(st): State<LiApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (task, v) = match parse::<Task>(body) {
        Ok(x) => x,
        Err(e) => return audited(&st, &peer, "activate", None, Err(e)).await,
    };
    let (li, who) = (st.li.clone(), who(&peer));
    match change(move || li.create(&who, task, Some(&v))).await {
        Ok(t) => (StatusCode::CREATED, Json(st.li.get(&t.xid))).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn list(State(st): State<LiApiState>, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    let tasks = st.li.list();
    audited(&st, &peer, "list", None, Ok(Json(serde_json::json!({"tasks": tasks})).into_response())).await
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
    audited(&st, &peer, "get", Some(xid), r).await
}

async fn modify(
    State(st): State<LiApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(xid): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (patch, v) = match parse::<TaskPatch>(body) {
        Ok(x) => x,
        Err(e) => return audited(&st, &peer, "modify", Some(xid), Err(e)).await,
    };
    let (li, who, x) = (st.li.clone(), who(&peer), xid.clone());
    match change(move || li.modify(&who, &x, patch, Some(&v))).await {
        Ok(_) => Json(st.li.get(&xid)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn delete(
    State(st): State<LiApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(xid): Path<String>,
) -> Response {
    let (li, who) = (st.li.clone(), who(&peer));
    match change(move || li.delete(&who, &xid)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn stats(State(st): State<LiApiState>, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    let s = st.li.stats();
    audited(&st, &peer, "stats", None, Ok(Json(s).into_response())).await
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
