//! JSON error responses.

use crate::error::Error;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// An API error: an HTTP status, a stable machine-readable code and a message.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    /// Stable code scripts can match on.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, code) = match &e {
            Error::PortsExhausted(_) => (StatusCode::SERVICE_UNAVAILABLE, "ports_exhausted"),
            Error::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::RemoteDenied(_) => (StatusCode::FORBIDDEN, "remote_denied"),
            Error::RoomFull(_) => (StatusCode::CONFLICT, "room_full"),
            Error::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self::new(status, code, e.to_string())
    }
}
