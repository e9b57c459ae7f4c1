//! `/v1/conferences` handlers.

use super::{ApiError, ApiState};
use crate::relay::parse_id;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dataplane::mixer::{Codec, RoomConfig};
use serde_json::Value;
use std::net::SocketAddr;

fn invalid(code: &'static str, m: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, m)
}

fn body_json(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let b = body.map_err(|e| ApiError::new(e.status(), "bad_body", e.body_text()))?;
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Default::default()));
    }
    let v: Value = serde_json::from_slice(&b)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", format!("malformed JSON: {e}")))?;
    if !v.is_object() {
        return Err(invalid("invalid_request", "the body must be a JSON object"));
    }
    Ok(v)
}

fn conf_id(s: &str) -> Result<u64, ApiError> {
    parse_id(s).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no conference {s:?}")))
}

fn part_id(s: &str) -> Result<u32, ApiError> {
    (s.len() == 8)
        .then(|| u32::from_str_radix(s, 16).ok())
        .flatten()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no participant {s:?}")))
}

fn remote(v: &Value) -> Result<Option<Option<SocketAddr>>, ApiError> {
    match v.get("remote") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(s)) => {
            let a: SocketAddr =
                s.parse().map_err(|_| invalid("invalid_remote", format!("remote {s:?} is not IP:PORT")))?;
            if a.port() == 0 || a.ip().is_unspecified() {
                return Err(invalid("invalid_remote", format!("remote {s:?} has no usable address")));
            }
            Ok(Some(Some(a)))
        }
        Some(_) => Err(invalid("invalid_remote", "remote must be \"IP:PORT\" or null")),
    }
}

fn flag(v: &Value, k: &str) -> Result<Option<bool>, ApiError> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid("invalid_request", format!("{k} must be true or false"))),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::Error> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "request handler failed"))?
        .map_err(ApiError::from)
}

pub(super) async fn create(
    State(st): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = body_json(body)?;
    let mut cfg = RoomConfig::default();
    if let Some(k) = v.get("max_talkers") {
        cfg.max_talkers = k
            .as_u64()
            .filter(|k| (1..=32).contains(k))
            .ok_or_else(|| invalid("invalid_request", "max_talkers must be 1-32"))? as usize;
    }
    if let Some(k) = v.get("opus_complexity") {
        cfg.opus_complexity =
            k.as_i64()
                .filter(|k| (0..=10).contains(k))
                .ok_or_else(|| invalid("invalid_request", "opus_complexity must be 0-10"))? as i32;
    }
    let id = blocking(move || st.relay.conf_create(cfg)).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({"id": id}))).into_response())
}

pub(super) async fn list(State(st): State<ApiState>) -> Response {
    let ids = st.relay.conf_list();
    Json(serde_json::json!({"count": ids.len(), "conferences": ids})).into_response()
}

pub(super) async fn get(State(st): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = conf_id(&id)?;
    Ok(Json(blocking(move || st.relay.conf_get(id)).await?).into_response())
}

pub(super) async fn delete(State(st): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = conf_id(&id)?;
    blocking(move || st.relay.conf_delete(id)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn add_participant(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let conf = conf_id(&id)?;
    let v = body_json(body)?;
    let codec: Codec = match v.get("codec") {
        Some(c) => serde_json::from_value(c.clone())
            .map_err(|_| invalid("invalid_codec", format!("codec {c} is not one of \"PCMU\", \"PCMA\", \"opus\"")))?,
        None => return Err(invalid("invalid_codec", "codec is required: \"PCMU\", \"PCMA\" or \"opus\"")),
    };
    let pt = match v.get("payload_type") {
        None | Some(Value::Null) => None,
        Some(p) => Some(
            p.as_u64().filter(|p| *p < 128).ok_or_else(|| invalid("invalid_request", "payload_type must be 0-127"))?
                as u8,
        ),
    };
    let remote = remote(&v)?.flatten();
    let p = blocking(move || st.relay.participant_add(conf, codec, pt, remote)).await?;
    Ok((StatusCode::CREATED, Json(p)).into_response())
}

pub(super) async fn get_participant(
    State(st): State<ApiState>,
    Path((id, pid)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (conf, pid_n) = (conf_id(&id)?, part_id(&pid)?);
    let view = blocking(move || st.relay.conf_get(conf)).await?;
    let p = view
        .participants
        .into_iter()
        .find(|p| p["id"] == pid)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no participant {pid_n:08x}")))?;
    Ok(Json(p).into_response())
}

pub(super) async fn update_participant(
    State(st): State<ApiState>,
    Path((id, pid)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (conf, pid) = (conf_id(&id)?, part_id(&pid)?);
    let v = body_json(body)?;
    let (r, mute, deaf) = (remote(&v)?, flag(&v, "mute")?, flag(&v, "deaf")?);
    let to = match v.get("conference") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            Some(parse_id(s).ok_or_else(|| invalid("invalid_request", format!("no conference {s:?}")))?)
        }
        Some(_) => return Err(invalid("invalid_request", "conference must be a conference id")),
    };
    let view = blocking(move || {
        let mut conf = conf;
        if let Some(to) = to {
            st.relay.participant_move(conf, pid, to)?;
            conf = to;
        }
        st.relay.participant_update(conf, pid, r, mute, deaf)?;
        st.relay.conf_get(conf)
    })
    .await?;
    let p = view.participants.into_iter().find(|p| p["id"] == format!("{pid:08x}")).unwrap_or(Value::Null);
    Ok(Json(p).into_response())
}

pub(super) async fn delete_participant(
    State(st): State<ApiState>,
    Path((id, pid)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (conf, pid) = (conf_id(&id)?, part_id(&pid)?);
    blocking(move || st.relay.participant_delete(conf, pid)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
