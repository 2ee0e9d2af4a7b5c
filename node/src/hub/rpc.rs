//! The hub's HTTP endpoints, as the Hikma app calls them on `--hub-listen`:
//! `GET /rpc/heartbeat`, `POST /rpc/handshake`, `POST /rpc/command`, `POST /rpc/query`.
//! Nothing else of the node is served there.
//!
//! Answers follow the reference hub where the app depends on them: a call's result in
//! `{"payload", "success": true}`; a refused or failed call `{"payload": "", "success":
//! false, "error"}` (200); a request from a tablet that did not handshake, that does not
//! decrypt, or that is a replay, 500 with a text body; a missing or ended token 401 (the
//! one status the app treats as "sign in again").

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use medmesh_protocol::hub::Aad;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::Hub;
use super::calls::{self, Call, CallError, Kind};
use crate::api::AppState;

/// Largest request body (a push of many rows, sealed).
const MAX_BODY: usize = 64 * 1024 * 1024;

#[derive(Clone)]
struct HubState {
    app: AppState,
    hub: Arc<Hub>,
}

/// The hub's router.
pub fn router(app: AppState, hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/rpc/heartbeat", get(heartbeat))
        .route("/rpc/handshake", post(handshake))
        .route("/rpc/command", post(command))
        .route("/rpc/query", post(query))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(HubState { app, hub })
}

/// Takes the hub's address (before the hub is made: its URL names the port bound).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen for the Hikma app on {addr} (--hub-listen): is another program using it?"
        )
    })
}

/// The hub serving on `listener` until `shutdown`.
pub fn serve(
    listener: TcpListener,
    app: AppState,
    hub: Arc<Hub>,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let served = axum::serve(listener, router(app, hub))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::warn!(error = %err, "the hub for the Hikma app stopped with an error");
        }
    })
}

fn now() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn refused(status: StatusCode, text: impl Into<String>) -> Response {
    (status, text.into()).into_response()
}

async fn heartbeat() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn handshake(State(state): State<HubState>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return refused(StatusCode::BAD_REQUEST, "the handshake is not JSON");
    };
    let client = request["client_id"].as_str().unwrap_or_default();
    let public = request["client_public_key"].as_str().unwrap_or_default();
    match state.hub.handshake(client, public, now()) {
        Ok(()) => Json(json!({
            "hub_public_key": state.hub.public_key(),
            "hub_id": state.hub.id(),
            "hub_name": state.hub.name(),
            "success": true,
        }))
        .into_response(),
        Err(reason) => {
            tracing::warn!(
                client,
                "a tablet's handshake with the hub was refused: {reason}"
            );
            refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("handshake refused: {reason}"),
            )
        }
    }
}

async fn command(state: State<HubState>, body: Bytes) -> Response {
    sealed_call(state, body, Kind::Command).await
}

async fn query(state: State<HubState>, body: Bytes) -> Response {
    sealed_call(state, body, Kind::Query).await
}

async fn sealed_call(State(state): State<HubState>, body: Bytes, kind: Kind) -> Response {
    let (aad, reply_aad, field, args_field) = match kind {
        Kind::Command => (Aad::Command, Aad::CommandResponse, "command", "data"),
        Kind::Query => (Aad::Query, Aad::QueryResponse, "query", "params"),
    };
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return refused(StatusCode::BAD_REQUEST, "the request is not JSON");
    };
    let client = request["client_id"].as_str().unwrap_or_default().to_owned();
    let payload = request["payload"].as_str().unwrap_or_default();
    let (plain, key) = match state.hub.open_request(&client, aad, payload, now()) {
        Ok(opened) => opened,
        Err(err) => {
            tracing::warn!(client = %client, "a request to the hub was refused: {err}");
            return refused(StatusCode::INTERNAL_SERVER_ERROR, err.to_string());
        }
    };
    let Ok(inner) = serde_json::from_slice::<Value>(&plain) else {
        return refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request's content is not JSON",
        );
    };
    let Some(name) = inner[field].as_str() else {
        return refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the request names no {field}"),
        );
    };
    let call = Call {
        kind,
        name: name.to_owned(),
        args: inner.get(args_field).cloned().unwrap_or(Value::Null),
        token: inner["token"].as_str().map(str::to_owned),
    };
    let name = call.name.clone();
    match calls::answer(&state.app, &state.hub, &client, call).await {
        Ok(answer) => {
            let sealed = serde_json::to_vec(&answer)
                .map_err(anyhow::Error::from)
                .and_then(|plain| state.hub.seal(&key, reply_aad, &plain));
            match sealed {
                Ok(payload) => Json(json!({"payload": payload, "success": true})).into_response(),
                Err(err) => {
                    tracing::error!(error = %format!("{err:#}"), "an answer of the hub could not be sealed");
                    refused(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the answer could not be sealed",
                    )
                }
            }
        }
        Err(CallError::Unauthorized(reason)) => {
            tracing::info!(client = %client, call = %name, "a hub call was refused: {reason}");
            refused(StatusCode::UNAUTHORIZED, reason)
        }
        Err(CallError::Failed(reason)) => {
            tracing::info!(client = %client, call = %name, "a hub call failed: {reason}");
            Json(json!({"payload": "", "success": false, "error": reason})).into_response()
        }
    }
}
