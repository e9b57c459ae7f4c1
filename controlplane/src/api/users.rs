//! `POST /v1/users`: provision a SIP user (`{"user", "domain", "password"}`).

use super::{ApiError, ApiState};
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

pub(super) async fn create(
    State(st): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let store = st
        .store
        .clone()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no SIP registrar runs in this process"))?;
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
