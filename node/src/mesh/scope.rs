//! This device's clinics while it runs: a new certificate from an admin (the device's
//! clinics changed) is taken up, and what left the device's scope is purged once a
//! device that serves it holds it.
//!
//! One task owns this: it alone changes the store's scope and the sessions' credential.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medmesh_protocol::scope::Scope;
use medmesh_storage::{PeerUpdate, PurgeReport, Store};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Command;
use crate::trust::{self, Trust};

/// How long changes settle before the device list is read again.
const SETTLE: Duration = Duration::from_millis(500);
/// How often a device with a narrow scope looks for records to purge while nothing
/// changes, and at most while changes arrive (a patient that moved away, a peer's
/// confirmation saved).
const PURGE_EVERY: Duration = Duration::from_secs(30);
const PURGE_AFTER_CHANGES: Duration = Duration::from_secs(5);

/// What the status shows of the last purge.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PurgeState {
    /// When it ran (RFC 3339).
    pub at: Option<String>,
    /// What it did.
    pub report: PurgeReport,
    /// Records purged since the node started.
    pub purged_since_start: u64,
}

/// Shared between the task (which writes it) and the status.
pub type SharedPurge = Arc<Mutex<PurgeState>>;

/// Runs until `shutdown`.
pub(super) async fn keep(
    store: Store,
    dir: Option<PathBuf>,
    mut trust: Trust,
    network: mpsc::Sender<Command>,
    purge: SharedPurge,
    shutdown: CancellationToken,
) {
    let mut feed = store.subscribe_feed();
    let mut tick = tokio::time::interval(PURGE_EVERY);
    let mut last_purge = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = feed.changed() => {
                if changed.is_err() {
                    return;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(SETTLE) => {}
                }
                feed.borrow_and_update();
                match take_new_cert(&store, dir.as_ref(), &mut trust).await {
                    Ok(Some(cert)) => {
                        if network.send(Command::Certificate { cert }).await.is_err() {
                            return;
                        }
                        run_purge(&store, &purge).await;
                    }
                    Ok(None) if last_purge.elapsed() >= PURGE_AFTER_CHANGES => {
                        last_purge = tokio::time::Instant::now();
                        run_purge(&store, &purge).await;
                    }
                    Ok(None) => {}
                    Err(err) => tracing::warn!(error = %format!("{err:#}"), "this device's new certificate could not be taken up; trying again at the next change"),
                }
            }
            _ = tick.tick() => {
                last_purge = tokio::time::Instant::now();
                run_purge(&store, &purge).await;
            }
        }
    }
}

/// Takes up a newer certificate of this device from the device list, if there is one:
/// the store holds its clinics from now on, and a wider scope reads every peer's feed
/// again. Answers the certificate for the sessions.
async fn take_new_cert(
    store: &Store,
    dir: Option<&PathBuf>,
    trust: &mut Trust,
) -> anyhow::Result<Option<medmesh_protocol::membership::SignedCert>> {
    let (s, t) = (store.clone(), trust.clone());
    let Some((cert, device)) =
        tokio::task::spawn_blocking(move || trust::newer_own_cert(&s, &t)).await??
    else {
        return Ok(None);
    };
    let before = store.scope();
    let after = Scope::of_clinics(&device.clinics);
    match dir {
        Some(dir) => trust::adopt_cert(dir, trust, cert.clone(), device)?,
        None => {
            trust.cert = cert.clone();
            trust.device = device;
        }
    }
    let s = store.clone();
    let widened = !after.within(&before);
    let scope = after.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        s.set_scope_blocking(scope)?;
        if widened {
            for (peer, _) in s.peers()? {
                s.update_peer_blocking(&peer, PeerUpdate::Rewind)?;
            }
        }
        Ok(())
    })
    .await??;
    tracing::warn!(
        before = %before.describe(),
        after = %after.describe(),
        "an admin changed the clinics this device serves: it now holds only their records{}",
        if widened { "; the records it lacks are being fetched from its peers" } else { "" }
    );
    Ok(Some(cert))
}

async fn run_purge(store: &Store, purge: &SharedPurge) {
    if store.scope().is_all() {
        return;
    }
    let s = store.clone();
    match tokio::task::spawn_blocking(move || s.purge_blocking()).await {
        Ok(Ok(report)) => {
            if let Ok(mut state) = purge.lock() {
                state.at = Some(medmesh_protocol::record::format_timestamp(
                    chrono::Utc::now().timestamp_millis(),
                ));
                state.purged_since_start += report.purged;
                state.report = report;
            }
        }
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "removing records outside this device's clinics failed; trying again later")
        }
        Err(_) => {}
    }
}

/// The clinics whose records reach this device through none of its connected peers: of
/// the mesh's clinics (`known`, id and name) that this device serves, those no connected
/// peer serves. Empty while no peer is connected (nothing reaches it then, which the
/// status says otherwise).
pub fn unreached(
    mine: &Scope,
    known: &[(String, String)],
    peers: &[super::PeerView],
) -> Vec<(String, String)> {
    let connected: Vec<Scope> = peers
        .iter()
        .filter(|p| p.connected && p.syncing)
        .filter_map(|p| p.clinics.as_ref().map(|c| Scope::of_clinics(c)))
        .collect();
    if connected.is_empty() || connected.iter().any(Scope::is_all) {
        return Vec::new();
    }
    known
        .iter()
        .filter(|(id, _)| mine.serves(id) && !connected.iter().any(|s| s.serves(id)))
        .cloned()
        .collect()
}

/// The mesh's clinics as this store knows them (id, name), at most `limit`.
pub fn known_clinics(
    store: &Store,
    limit: usize,
) -> medmesh_storage::Result<Vec<(String, String)>> {
    let page = store.list(&medmesh_storage::Query {
        collection: "clinics".into(),
        limit,
        ..Default::default()
    })?;
    Ok(page
        .records
        .into_iter()
        .filter(|r| !r.deleted)
        .map(|r| {
            let name = r
                .record
                .get("name")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned();
            (r.id.to_string(), name)
        })
        .collect())
}
