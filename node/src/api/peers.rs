//! The mesh's peers: `GET /v1/peers`, `POST /v1/peers {"addr": MULTIADDR}`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::{Value, json};

use super::{ApiError, AppState, blocking};

/// A request's JSON body, or the error that names what is wrong with it.
fn json_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body.map_err(|e| ApiError::bad_request("bad_body", e.to_string()))?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "bad_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })
}

fn no_mesh() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_mesh",
        "this node runs without the mesh",
    )
}

/// This device's trust, for a caller who may manage devices, on an admin device (one
/// that holds the mesh's owner key): only such a device can `action`.
fn admin_trust(
    state: &AppState,
    caller: &crate::access::Caller,
    action: &str,
) -> Result<crate::trust::Trust, ApiError> {
    caller.require(crate::access::Permission::ManageDevices, None)?;
    let trust = state.mesh().ok_or_else(no_mesh)?.trust().clone();
    if trust.owner.is_none() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_admin_device",
            format!(
                "only an admin device of the mesh (one that holds the owner key) can {action}; do it on an admin device"
            ),
        ));
    }
    Ok(trust)
}

/// Every peer known now: id, addresses, connected, last sync, documents pending each way.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<crate::access::Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(crate::access::Permission::ReadStatus, None)?;
    let mesh = state.mesh().ok_or_else(no_mesh)?;
    let store = state.store().clone();
    let clinics =
        blocking(move || crate::mesh::scope::known_clinics(&store, 1_000).map_err(ApiError::from))
            .await?;
    let peers = mesh.peers();
    let unreached: Vec<Value> =
        crate::mesh::scope::unreached(&state.store().scope(), &clinics, &peers)
            .into_iter()
            .map(|(id, name)| json!({"id": id, "name": name}))
            .collect();
    Ok(Json(json!({
        "mesh": mesh.fingerprint(),
        "serves": state.store().scope().describe(),
        "peers": peers,
        "unreached_clinics": unreached,
    })))
}

/// `POST /v1/peers/{peer_id}/verify`: compares everything this node holds with the peer
/// (repairing differences), and says whether they agree.
pub async fn verify(
    State(state): State<AppState>,
    Extension(caller): Extension<crate::access::Caller>,
    Path(peer): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(crate::access::Permission::ManageDevices, None)?;
    let mesh = state.mesh().ok_or_else(no_mesh)?;
    let report = mesh
        .verify(&peer)
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "peer_not_syncing", format!("{e:#}")))?;
    Ok(Json(json!(report)))
}

/// `DELETE /v1/peers/{peer_id}`: forgets a peer (disconnects it, stops dialing it).
pub async fn forget(
    State(state): State<AppState>,
    Extension(caller): Extension<crate::access::Caller>,
    Path(peer): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(crate::access::Permission::ManageDevices, None)?;
    let mesh = state.mesh().ok_or_else(no_mesh)?;
    let known = mesh
        .forget(&peer)
        .await
        .map_err(|e| ApiError::bad_request("bad_peer", format!("{e:#}")))?;
    if !known {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_peer",
            format!("{peer} is not a peer this node knows; `medmesh peers` lists them"),
        ));
    }
    Ok(Json(json!({"peer_id": peer, "forgotten": true})))
}

/// Connects to a node by address (and remembers it).
pub async fn add(
    State(state): State<AppState>,
    Extension(caller): Extension<crate::access::Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(crate::access::Permission::ManageDevices, None)?;
    let mesh = state.mesh().ok_or_else(no_mesh)?;
    let value = json_body(body)?;
    let addr = value["addr"].as_str().ok_or_else(|| {
        ApiError::bad_request(
            "bad_json",
            "the body must be {\"addr\": \"/ip4/192.168.1.20/tcp/7401\"}",
        )
    })?;
    let addr: libp2p::Multiaddr = addr.parse().map_err(|_| {
        ApiError::bad_request(
            "bad_addr",
            format!("`{addr}` is not a libp2p address; write it like /ip4/192.168.1.20/tcp/7401"),
        )
    })?;
    mesh.add_peer(addr.clone())
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_mesh", e.to_string()))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"addr": addr.to_string(), "status": "connecting"})),
    ))
}

/// `GET /v1/devices`: the mesh's devices (valid certificates in the replicated list) and
/// the revoked ones, with whether each is connected now.
pub async fn devices(
    State(state): State<AppState>,
    Extension(caller): Extension<crate::access::Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(crate::access::Permission::ManageDevices, None)?;
    let mesh = state.mesh().ok_or_else(no_mesh)?;
    let trust = mesh.trust().clone();
    let store = state.store().clone();
    let list = blocking(move || {
        crate::trust::devices(&store, &trust).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", format!("{e:#}"))
        })
    })
    .await?;
    let connected: std::collections::HashSet<String> = mesh
        .peers()
        .into_iter()
        .filter(|p| p.connected)
        .map(|p| p.peer_id)
        .collect();
    let devices: Vec<Value> = list
        .into_iter()
        .map(|d| {
            let mut v = json!(d);
            v["connected"] = json!(d.this_device || connected.contains(&d.peer_id));
            v
        })
        .collect();
    Ok(Json(json!({
        "mesh": mesh.fingerprint(),
        "this_device_is_admin": mesh.trust().owner.is_some(),
        "devices": devices,
    })))
}

/// `POST /v1/devices/{peer_id}/revoke {"reason": TEXT}`: revokes a device (admin
/// devices only). The signed revocation reaches every node like any change.
pub async fn revoke(
    State(state): State<AppState>,
    Extension(caller): Extension<crate::access::Caller>,
    Path(peer): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let trust = admin_trust(&state, &caller, "revoke devices")?;
    if peer.parse::<libp2p::PeerId>().is_err() {
        return Err(ApiError::bad_request(
            "bad_peer",
            format!("`{peer}` is not a peer id; `medmesh devices list` shows them"),
        ));
    }
    let reason = match body {
        Ok(bytes) if bytes.is_empty() => String::new(),
        body => json_body(body)?["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    };
    let store = state.store().clone();
    let target = peer.clone();
    blocking(move || {
        crate::trust::revoke(&store, &trust, &target, &reason)
            .map_err(|e| ApiError::bad_request("cannot_revoke", format!("{e:#}")))
    })
    .await?;
    Ok(Json(json!({"peer_id": peer, "revoked": true})))
}

/// `POST /v1/devices/{peer_id}/clinics {"clinics": [ID, …]}`: changes the clinics a
/// device serves (an empty list: all), on an admin device. The device's new certificate
/// reaches it through the device list; it then holds only those clinics' records, and
/// purges the others once a device that serves them holds them.
pub async fn set_clinics(
    State(state): State<AppState>,
    Extension(caller): Extension<crate::access::Caller>,
    Path(peer): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let trust = admin_trust(&state, &caller, "change a device's clinics")?;
    let body = json_body(body)?;
    let Some(list) = body.get("clinics").and_then(Value::as_array) else {
        return Err(ApiError::bad_request(
            "bad_clinics",
            "send {\"clinics\": [clinic id, …]} (an empty list: all clinics)",
        ));
    };
    let mut clinics = Vec::with_capacity(list.len());
    for clinic in list {
        match clinic.as_str().map(str::trim).filter(|c| !c.is_empty()) {
            Some(c) => clinics.push(c.to_owned()),
            None => {
                return Err(ApiError::bad_request(
                    "bad_clinics",
                    "every clinic must be a clinic id (text)",
                ));
            }
        }
    }
    let store = state.store().clone();
    let target = peer.clone();
    let device = blocking(move || {
        crate::trust::set_clinics(&store, &trust, &target, clinics)
            .map_err(|e| ApiError::bad_request("cannot_change_clinics", format!("{e:#}")))
    })
    .await?;
    Ok(Json(json!({"peer_id": peer, "clinics": device.clinics})))
}

/// `POST /v1/invites {"kind"?, "name"?, "clinics"?, "expires"?, "valid_for"?}` on an
/// admin device: a single-use invite for one new device, as text and as a QR code (SVG),
/// the way `medmesh invite` makes it.
pub async fn invite(
    State(state): State<AppState>,
    Extension(caller): Extension<crate::access::Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let trust = admin_trust(&state, &caller, "invite devices")?;
    let Some(dir) = state.inner.data_dir.clone() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_data_dir",
            "this node keeps no data directory, so it cannot keep invites",
        ));
    };
    let body = match body {
        Ok(bytes) if bytes.is_empty() => json!({}),
        body => json_body(body)?,
    };
    let text = |name: &str| body.get(name).and_then(Value::as_str).map(str::trim);
    let bad = |field: &str, message: String| ApiError::invalid_field(field, message);
    let kind: medmesh_protocol::membership::DeviceKind = text("kind")
        .unwrap_or("tablet")
        .parse()
        .map_err(|e: String| bad("kind", e))?;
    let duration = |field: &str, default: Option<&str>| {
        text(field)
            .filter(|t| !t.is_empty())
            .or(default)
            .map(|t| crate::trust::parse_duration(t).map_err(|e| bad(field, format!("{e:#}"))))
            .transpose()
    };
    let clinics = match body.get("clinics") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|c| {
                c.as_str()
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .ok_or_else(|| bad("clinics", "every clinic must be a clinic id (text)".into()))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(bad(
                "clinics",
                "`clinics` must be a list of clinic ids (empty: all)".into(),
            ));
        }
    };
    let options = crate::trust::InviteOptions {
        valid_for: duration("expires", Some("24h"))?.unwrap_or_default(),
        kind,
        name: text("name").filter(|n| !n.is_empty()).map(str::to_owned),
        clinics,
        cert_valid_for: duration("valid_for", None)?,
    };
    let invite = blocking(move || {
        crate::server::new_invite(&dir, &trust, Vec::new(), &options).map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot_invite",
                format!("{e:#}"),
            )
        })
    })
    .await?;
    let text = invite.to_text();
    let qr = qrcode::QrCode::new(text.as_bytes())
        .map(|code| {
            code.render::<qrcode::render::svg::Color>()
                .min_dimensions(400, 400)
                .quiet_zone(true)
                .build()
        })
        .ok();
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "invite": text,
            "kind": kind.as_str(),
            "expires_at": medmesh_protocol::record::format_timestamp(invite.expires_at),
            "qr_svg": qr,
            "join": "on the new device: medmesh init --data DIR --join INVITE",
        })),
    ))
}
