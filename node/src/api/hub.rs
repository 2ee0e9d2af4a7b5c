//! `/v1/hub`: the Hikma hub this node serves — its pairing code and the tablets paired
//! with it, for admins.

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{AppState, blocking};
use crate::access::{Caller, Permission};
use crate::api::error::ApiError;

fn no_hub() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_hub",
        "this node does not serve the Hikma app's hub: start it with --hub-listen 0.0.0.0:4001",
    )
}

/// `GET /v1/hub`: the hub's URL, id, public key and the pairing code's text.
pub async fn info(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::ManageDevices, None)?;
    let hub = state.hub().ok_or_else(no_hub)?;
    Ok(Json(json!({
        "url": hub.url(),
        "id": hub.id(),
        "name": hub.name(),
        "public_key": hub.public_key(),
        "pairing": hub.pairing_text(),
    })))
}

/// `GET /v1/hub/clients`: the tablets that handshook since the node started.
pub async fn clients(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::ManageDevices, None)?;
    let hub = state.hub().ok_or_else(no_hub)?;
    Ok(Json(json!({"clients": hub.clients()})))
}

/// `DELETE /v1/hub/clients/{client_id}`: removes a tablet (a lost one, say): its
/// sessions and sign-ins end and it cannot pair again.
pub async fn remove(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(client_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::ManageDevices, None)?;
    let hub = state.hub().ok_or_else(no_hub)?.clone();
    let s = state.clone();
    let id = client_id.clone();
    let ended = blocking(move || {
        hub.remove(&id)
            .and_then(|()| s.access().sessions.revoke_client(&id))
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", format!("{e:#}"))
            })
    })
    .await?;
    tracing::info!(client = %client_id, by = %caller.name, "a tablet was removed from the hub");
    Ok(Json(json!({"removed": client_id, "sign_ins_ended": ended})))
}
