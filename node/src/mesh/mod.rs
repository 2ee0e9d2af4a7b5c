//! The mesh: finding the other nodes of this mesh and keeping every record in sync with
//! them over libp2p.
//!
//! - [`network`]: the actor that owns the libp2p swarm (TCP, noise, yamux). It dials
//!   peers from `--peer`, the API, remembered peers and mDNS, keeps exactly one
//!   connection per pair of peers, reconnects with backoff, and starts one sync session
//!   per connected peer on the `/medmesh/sync/1` stream.
//! - [`session`]: drives `medmesh_protocol::sync::Session` for one peer: frames in and
//!   out of the stream, store work on blocking threads, the cursor saved after the
//!   documents it covers.
//! - [`discovery`]: mDNS (`_medmesh._udp.local.`) advertising and browsing.
//!
//! [`Mesh`] is the handle the rest of the node uses: a bounded channel to the network
//! actor, and the shared per-peer status the API reports.

pub mod discovery;
pub mod enroll;
mod network;
pub mod scope;
mod session;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use libp2p::{Multiaddr, StreamProtocol};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub use network::{MeshConfig, start};

/// The sync protocol's stream name.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/medmesh/sync/1");
/// Commands that may wait for the network actor.
const COMMAND_CAPACITY: usize = 64;

/// What the API shows about one peer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerView {
    /// Its libp2p peer id.
    pub peer_id: String,
    /// Its name, from its certificate.
    pub name: Option<String>,
    /// tablet, gateway or admin, from its certificate.
    pub kind: Option<String>,
    /// The clinics it serves, from its certificate (empty: all); only their records are
    /// sent to it.
    pub clinics: Option<Vec<String>>,
    /// Where it was reached or seen.
    pub addresses: Vec<String>,
    /// Connected now.
    pub connected: bool,
    /// Open connections to it (one, once duplicates are closed).
    pub connections: usize,
    /// A sync session is running with it.
    pub syncing: bool,
    /// When it was last connected (RFC 3339).
    pub last_seen: Option<String>,
    /// When this node last held everything of its feed (RFC 3339).
    pub last_sync: Option<String>,
    /// Documents requested from it and not stored yet.
    pub pending_in: usize,
    /// Local changes it has not acknowledged yet.
    pub pending_out: u64,
    /// What the sync with it waits for.
    pub waiting_for: Option<String>,
    /// While this node is taking the peer's feed (an initial sync, or catching up after
    /// time apart): how far it has come.
    pub sync_progress: Option<SyncProgress>,
    /// Why the last session ended, if it did.
    pub last_error: Option<String>,
    /// When this node last compared everything it holds with the peer (RFC 3339).
    pub last_check: Option<String>,
    /// What that comparison found.
    pub last_check_result: Option<String>,
}

/// Documents a stretch of a peer's feed must hold for its progress to be shown on the
/// terminal and the sign-in page.
pub const SYNC_SHOWN_FROM: u64 = 200;

/// How far this node has come in taking a peer's feed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncProgress {
    /// Documents received (feed positions of the peer this node holds).
    pub received: u64,
    /// Documents the peer announced since this stretch began.
    pub announced: u64,
    /// Documents per second so far.
    pub rate: f64,
    /// Seconds left at that rate (none before the first documents arrived).
    pub eta_s: Option<f64>,
}

impl SyncProgress {
    /// From the session's figures.
    pub fn of(progress: medmesh_protocol::sync::Progress) -> Self {
        let seconds = progress.elapsed_ms as f64 / 1000.0;
        let rate = if seconds > 0.0 {
            progress.received as f64 / seconds
        } else {
            0.0
        };
        let left = progress.announced.saturating_sub(progress.received) as f64;
        Self {
            received: progress.received,
            announced: progress.announced,
            rate,
            eta_s: (rate > 0.0).then(|| left / rate),
        }
    }
}

/// What `medmesh verify --peer` reports.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The peer.
    pub peer_id: String,
    /// This node and the peer hold the same documents at the same versions.
    pub equal: bool,
    /// Comparison rounds run (a difference is repaired, then compared again).
    pub rounds: usize,
    /// Documents (or changes of them) this node lacked and fetched.
    pub repaired_here: u64,
    /// Summary buckets that still differed at the last round.
    pub differing_buckets: usize,
    /// Documents this node holds.
    pub local_documents: u64,
    /// Documents the peer holds.
    pub peer_documents: u64,
}

/// Per-peer status shared by the network actor and the sessions. An entry is made only
/// for a peer that proved it belongs to the mesh (or that this node remembers), and
/// there are at most [`MAX_PEER_STATUS`].
pub type SharedStatus = Arc<Mutex<BTreeMap<String, PeerView>>>;

/// Peers shown in the status at most; the longest unseen of those not connected go first.
pub const MAX_PEER_STATUS: usize = 256;

/// Makes or changes a peer's status entry (only for members and remembered peers).
pub(crate) fn update_status(status: &SharedStatus, peer: &str, change: impl FnOnce(&mut PeerView)) {
    if let Ok(mut map) = status.lock() {
        if !map.contains_key(peer) && map.len() >= MAX_PEER_STATUS {
            let evict = map
                .values()
                .filter(|v| !v.connected)
                .min_by(|a, b| a.last_seen.cmp(&b.last_seen))
                .map(|v| v.peer_id.clone());
            match evict {
                Some(old) => {
                    map.remove(&old);
                }
                None => return,
            }
        }
        let view = map.entry(peer.to_owned()).or_insert_with(|| PeerView {
            peer_id: peer.to_owned(),
            ..PeerView::default()
        });
        change(view);
    }
}

/// Changes a peer's status entry if it has one.
pub(crate) fn update_existing(
    status: &SharedStatus,
    peer: &str,
    change: impl FnOnce(&mut PeerView),
) {
    if let Ok(mut map) = status.lock()
        && let Some(view) = map.get_mut(peer)
    {
        change(view);
    }
}

pub(crate) enum Command {
    AddPeer {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<()>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Verify {
        peer: String,
        reply: oneshot::Sender<Result<oneshot::Receiver<medmesh_protocol::sync::RoundReport>>>,
    },
    Forget {
        peer: String,
        reply: oneshot::Sender<Result<bool>>,
    },
    Revoked {
        peer: String,
    },
    /// This device has a new certificate (an admin changed its clinics): present it from
    /// now on, to every peer again.
    Certificate {
        cert: medmesh_protocol::membership::SignedCert,
    },
}

/// A handle to the running mesh.
#[derive(Clone)]
pub struct Mesh {
    commands: mpsc::Sender<Command>,
    status: SharedStatus,
    fingerprint: String,
    trust: crate::trust::Trust,
    purge: scope::SharedPurge,
}

impl Mesh {
    fn closed() -> anyhow::Error {
        anyhow!("the mesh has stopped (the node is shutting down)")
    }

    /// Connects to a node by address, now and after restarts.
    pub async fn add_peer(&self, addr: Multiaddr) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::AddPeer { addr, reply })
            .await
            .map_err(|_| Self::closed())?;
        answer.await.map_err(|_| Self::closed())?
    }

    /// The addresses the node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::ListenAddrs { reply })
            .await
            .map_err(|_| Self::closed())?;
        answer.await.map_err(|_| Self::closed())
    }

    /// Compares everything this node holds with a connected peer (anti-entropy rounds
    /// until they agree, at most a few), repairing what differs on the way.
    pub async fn verify(&self, peer: &str) -> Result<VerifyReport> {
        const ROUNDS: usize = 4;
        let mut report = VerifyReport {
            peer_id: peer.to_owned(),
            equal: false,
            rounds: 0,
            repaired_here: 0,
            differing_buckets: 0,
            local_documents: 0,
            peer_documents: 0,
        };
        while report.rounds < ROUNDS {
            let (reply, answer) = oneshot::channel();
            self.commands
                .send(Command::Verify {
                    peer: peer.to_owned(),
                    reply,
                })
                .await
                .map_err(|_| Self::closed())?;
            let round = answer.await.map_err(|_| Self::closed())??;
            let round = tokio::time::timeout(std::time::Duration::from_secs(120), round)
                .await
                .map_err(|_| {
                    anyhow!("the comparison with {peer} took more than two minutes; try again")
                })?
                .map_err(|_| {
                    anyhow!("the connection to {peer} ended during the comparison; try again")
                })?;
            report.rounds += 1;
            report.repaired_here += round.fetched;
            report.differing_buckets = round.differing_buckets;
            report.local_documents = round.local_count;
            report.peer_documents = round.remote_count;
            if round.differing_buckets == 0 {
                report.equal = true;
                break;
            }
            // Give the peer's own repair a moment before comparing again.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        Ok(report)
    }

    /// Forgets a peer: disconnects it, stops dialing it, drops what this node keeps
    /// about it. Answers whether it was known.
    pub async fn forget(&self, peer: &str) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Forget {
                peer: peer.to_owned(),
                reply,
            })
            .await
            .map_err(|_| Self::closed())?;
        answer.await.map_err(|_| Self::closed())?
    }

    /// Every peer known now.
    pub fn peers(&self) -> Vec<PeerView> {
        self.status
            .lock()
            .map(|map| map.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The largest stretch of a peer's feed this node is taking now (an initial sync, or
    /// catching up after time apart) of at least [`SYNC_SHOWN_FROM`] documents: the
    /// peer's name (or the start of its id) and how far it has come. What the terminal's
    /// bar and the console's sign-in show; the trickle of a busy mesh's edits is not one.
    pub fn largest_sync(&self) -> Option<(String, SyncProgress)> {
        self.peers()
            .into_iter()
            .filter_map(|p| {
                let progress = p.sync_progress.filter(|s| s.announced >= SYNC_SHOWN_FROM)?;
                let name = p
                    .name
                    .unwrap_or_else(|| p.peer_id.chars().take(12).collect());
                Some((name, progress))
            })
            .max_by_key(|(_, progress)| progress.announced)
    }

    /// The mesh's fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// This device's trust (root, certificate, owner key on admin devices).
    pub fn trust(&self) -> &crate::trust::Trust {
        &self.trust
    }

    /// The last purge of records outside this device's clinics.
    pub fn purge_state(&self) -> scope::PurgeState {
        self.purge.lock().map(|s| s.clone()).unwrap_or_default()
    }
}
