//! Health, status and the change feed.

use axum::extract::{Query, State};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, MAX_PAGE, blocking};

/// Held documents listed in the status at most (all are counted).
const HELD_SHOWN: usize = 50;
/// Clinics looked at for the ones no connected peer brings.
const CLINICS_LISTED: usize = 1_000;

/// `GET /health`: answers without a credential. While this node is taking a large
/// stretch of a peer's feed (an initial sync, or catching up after time apart; see
/// `Mesh::largest_sync`) it also tells how far it has come (counts only, no names): a new
/// device's console shows it on its sign-in page, before the mesh's users have arrived.
pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let sync = state
        .mesh()
        .and_then(|mesh| mesh.largest_sync())
        .map(|(_, progress)| progress);
    Json(json!({"status": "ok", "sync_progress": sync}))
}

/// `GET /v1/status`
pub async fn status(
    State(state): State<AppState>,
    Extension(caller): Extension<crate::access::Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(crate::access::Permission::ReadStatus, None)?;
    let s = state.clone();
    let (counts, seq, (held, held_total), clinics) = blocking(move || {
        Ok((
            s.store().counts()?,
            s.store().last_seq()?,
            s.store().held(HELD_SHOWN)?,
            crate::mesh::scope::known_clinics(s.store(), CLINICS_LISTED)?,
        ))
    })
    .await?;
    let scope = state.store().scope();
    let total: u64 = counts.values().sum();
    let info = state.store().info();
    let mesh = state.mesh().map(|mesh| {
        let peers = mesh.peers();
        let connected: Vec<_> = peers.iter().filter(|p| p.connected).collect();
        let device = &mesh.trust().device;
        json!({
            "fingerprint": mesh.fingerprint(),
            "device": {
                "name": device.name,
                "kind": device.kind.as_str(),
                "admin": mesh.trust().owner.is_some(),
                "clinics": scope.clinics().map(|c| c.iter().cloned().collect::<Vec<_>>()).unwrap_or_default(),
                "serves": scope.describe(),
                "expires_at": device.expires_at.map(medmesh_protocol::record::format_timestamp),
            },
            "peers_known": peers.len(),
            "peers_connected": connected.len(),
            "pending_in": connected.iter().map(|p| p.pending_in).sum::<usize>(),
            "pending_out": connected.iter().map(|p| p.pending_out).sum::<u64>(),
            "oldest_last_sync": connected.iter().map(|p| p.last_sync.clone()).min().flatten(),
            // Clinics this device serves whose records no connected peer can bring.
            "unreached_clinics": crate::mesh::scope::unreached(&scope, &clinics, &peers)
                .into_iter()
                .map(|(id, name)| json!({"id": id, "name": name}))
                .collect::<Vec<_>>(),
            "purge": mesh.purge_state(),
        })
    });
    Ok(Json(json!({
        "mesh": mesh,
        "peer_id": state.peer_id(),
        "version": env!("CARGO_PKG_VERSION"),
        "data_dir": state.inner.data_dir.as_ref().map(|p| p.display().to_string()),
        "encryption": state.protection().map(crate::keys::Protection::describe),
        "https": state.tls().map(|(fingerprint, cert)| json!({
            "fingerprint": fingerprint,
            "certificate": cert.display().to_string(),
        })),
        "database": info.path.as_ref().map(|p| p.display().to_string()),
        "records": counts,
        "total_records": total,
        "feed": {"seq": seq, "epoch": info.feed_epoch},
        "held": {"total": held_total, "documents": held},
        "uptime_s": state.inner.started.elapsed().as_secs(),
        "gateway": state.gateway().is_some(),
    })))
}

/// `GET /v1/gateway`: the cloud, the last pull and push, the backlog, the last error.
pub async fn gateway(
    State(state): State<AppState>,
    Extension(caller): Extension<crate::access::Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(crate::access::Permission::ReadStatus, None)?;
    let Some(gateway) = state.gateway().cloned() else {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_a_gateway",
            "this node is not a gateway to the Hikma cloud; start it with --gateway URL --hub-key-file FILE to make it one",
        ));
    };
    let status = blocking(move || Ok(gateway.status())).await?;
    Ok(Json(json!(status)))
}

/// Parameters of `GET /v1/changes`.
#[derive(Debug, Deserialize)]
pub struct ChangesParams {
    /// Feed position after which to list changes.
    #[serde(default)]
    since: u64,
    /// At most this many.
    limit: Option<usize>,
}

/// `GET /v1/changes?since=SEQ&limit=N`: records changed after a feed position.
pub async fn changes(
    State(state): State<AppState>,
    Extension(caller): Extension<crate::access::Caller>,
    Query(params): Query<ChangesParams>,
) -> Result<Json<Value>, ApiError> {
    caller.require(crate::access::Permission::ReadAudit, None)?;
    let limit = params.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let since = params.since;
    let entries = blocking(move || Ok(state.store().changes_since(since, limit)?)).await?;
    let next = entries.last().map_or(since, |e| e.seq);
    let changes: Vec<Value> = entries
        .into_iter()
        .map(|entry| match entry.record {
            Ok(view) => json!({
                "seq": entry.seq,
                "record": Value::Object(if view.collection == "users" {
                    crate::users::masked(view.record)
                } else {
                    view.record
                }),
                "collection": view.collection,
                "id": view.id,
                "deleted": view.deleted,
            }),
            Err(reason) => json!({"seq": entry.seq, "error": reason}),
        })
        .collect();
    Ok(Json(json!({"changes": changes, "next": next})))
}
