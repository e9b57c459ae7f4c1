//! `GET /v1/cluster`: the live members as JSON,
//! `[{"role","id","sip","api","ng","media","load","since"}]`, on every role's API.

use super::{Member, View};
use axum::{extract::State, routing::get, Json, Router};
use tokio::sync::watch;

/// The route alone, reading the view `view` follows, for roles whose API has no other
/// state; mount it behind the API's token check.
pub fn router(view: watch::Receiver<View>) -> Router {
    Router::new().route("/v1/cluster", get(list)).with_state(view)
}

async fn list(State(view): State<watch::Receiver<View>>) -> Json<Vec<Member>> {
    Json(members(Some(&view)))
}

/// The body of `GET /v1/cluster`: the live members (none outside a cluster).
pub fn members(view: Option<&watch::Receiver<View>>) -> Vec<Member> {
    view.map(|v| v.borrow().members.to_vec()).unwrap_or_default()
}
