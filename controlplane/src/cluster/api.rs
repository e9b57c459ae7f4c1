//! `GET /v1/cluster`: the live members as JSON,
//! `[{"role","id","sip","api","ng","media","load","since"}]`, on every role's API.

use super::{Member, View};
use axum::{extract::State, routing::get, Json, Router};
use tokio::sync::watch;

/// The route, reading the view `view` follows. Mount it behind the API's token.
pub fn router(view: watch::Receiver<View>) -> Router {
    Router::new().route("/v1/cluster", get(list)).with_state(view)
}

async fn list(State(view): State<watch::Receiver<View>>) -> Json<Vec<Member>> {
    Json(view.borrow().members.to_vec())
}
