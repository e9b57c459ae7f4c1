//! `/v1/sessions` handlers.

use super::{ApiError, ApiState};
use crate::relay::{parse_id, CreateRequest};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dataplane::LatchPolicy;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

/// Body of `POST /v1/sessions`; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CreateBody {
    legs: Vec<LegBody>,
    latch: Option<LatchPolicy>,
    inactivity_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LegBody {
    remote: Option<String>,
    clock_rate: Option<u32>,
}

fn body_error(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(e.status(), "payload_too_large", format!("request body larger than {} bytes", super::MAX_BODY))
    } else {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_body", e.body_text())
    }
}

/// Parses an optional JSON body: empty means `T::default()`; a syntax error is 400, a
/// well-formed body of the wrong shape is 422.
fn parse_json<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    // Syntax first, shape second: a truncated document must say "malformed", even when
    // its first bytes already have the wrong shape.
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", format!("malformed JSON: {e}")))?;
    serde_json::from_value(v).map_err(|e| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", format!("invalid request: {e}"))
    })
}

fn parse_remote(s: &str, leg: usize) -> Result<SocketAddr, ApiError> {
    let a: SocketAddr = s.trim().parse().map_err(|_| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_remote",
            format!("legs[{leg}].remote {s:?} is not IP:PORT (IPv6 as [addr]:port)"),
        )
    })?;
    if a.port() == 0 || a.ip().is_unspecified() || a.ip().is_multicast() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_remote",
            format!("legs[{leg}].remote {s:?} is not a unicast address with a non-zero port"),
        ));
    }
    Ok(a)
}

fn session_id(s: &str) -> Result<u64, ApiError> {
    parse_id(s).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no session with id {s:?}")))
}

/// Runs blocking relay work (waiting for a worker's answer) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|_| Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "request handler failed")))
}

pub(super) async fn create(
    State(st): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let b: CreateBody = parse_json(&body)?;
    if b.legs.len() > 2 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "a session has at most two legs",
        ));
    }
    let mut req = CreateRequest::default();
    for (i, leg) in b.legs.iter().enumerate() {
        req.remotes[i] = leg.remote.as_deref().map(|r| parse_remote(r, i)).transpose()?;
        if let Some(rate) = leg.clock_rate {
            if !(1000..=192_000).contains(&rate) {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request",
                    format!("legs[{i}].clock_rate {rate} out of range 1000-192000"),
                ));
            }
            req.clock_rates[i] = Some(rate);
        }
    }
    req.latch = b.latch;
    if let Some(t) = b.inactivity_timeout_secs {
        if t == 0 || t > 86_400 {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "inactivity_timeout_secs must be 1-86400",
            ));
        }
        req.inactivity = Some(Duration::from_secs(t));
    }
    let created = st.relay.create(req)?;
    tracing::debug!(session = %created.id, "session created");
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

pub(super) async fn list(State(st): State<ApiState>) -> Response {
    let sessions = st.relay.list();
    Json(serde_json::json!({"count": sessions.len(), "sessions": sessions})).into_response()
}

pub(super) async fn get(State(st): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = session_id(&id)?;
    let view = blocking(move || st.relay.get(id).map_err(ApiError::from)).await?;
    Ok(Json(view).into_response())
}

pub(super) async fn update(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = session_id(&id)?;
    let body = body.map_err(body_error)?;
    let v: Value = parse_json(&body)?;
    let legs = match v.get("legs") {
        Some(Value::Array(a)) if a.len() <= 2 => a.clone(),
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "legs must be an array of at most two objects",
            ))
        }
        None => Vec::new(),
    };
    let mut changes = Vec::new();
    for (i, leg) in legs.iter().enumerate() {
        match leg.get("remote") {
            None => {}
            Some(Value::Null) => changes.push((i, None)),
            Some(Value::String(s)) => changes.push((i, Some(parse_remote(s, i)?))),
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_remote",
                    format!("legs[{i}].remote must be \"IP:PORT\" or null"),
                ))
            }
        }
    }
    let view = blocking(move || st.relay.update(id, &changes).map_err(ApiError::from)).await?;
    Ok(Json(view).into_response())
}

pub(super) async fn delete(State(st): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = session_id(&id)?;
    let view = blocking(move || st.relay.delete(id).map_err(ApiError::from)).await?;
    Ok(Json(view).into_response())
}
