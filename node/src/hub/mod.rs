//! The Hikma app pairs with any node as with its own sync hub (`HIKMA_HUB_RPC.md`): the
//! node serves the hub's encrypted RPC on `--hub-listen` (plain HTTP, as the app speaks
//! to a hub; every payload sealed), and nothing else of the node there.
//!
//! This module owns the hub's state — its static X25519 key (kept in the store's local
//! table, so encrypted at rest with the store), the session keys of the tablets that
//! handshook, the nonces each key has opened, and the tablets an admin removed — and
//! knows no HTTP: [`rpc`] serves it, [`calls`] answers the app's commands and queries.
//!
//! Better than the reference hub, without breaking the app:
//! - A sealed request opened once is refused if it comes again (nonces are random, so a
//!   repeat is a replay). Each tablet keeps its last [`KEYS_PER_CLIENT`] session keys
//!   (the app handshakes before every call, often several at once, and a call sealed
//!   under the key before the newest must still open); a key lasts [`KEY_HOURS`] hours.
//! - Sessions are bounded ([`MAX_CLIENTS`] tablets) and the tokens from `login` are the
//!   node's sessions: ended when the user is disabled or changes password, or when the
//!   tablet is removed (`medmesh hub remove`), and kept open while in use (the app never
//!   renews its token).
//! - A user's password hash is never sent to a tablet.

pub mod calls;
pub mod rpc;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use anyhow::{Context, Result};
use medmesh_protocol::DocId;
use medmesh_protocol::hub::{self, Aad, HubError, HubKey};
use medmesh_storage::Store;
use serde::{Deserialize, Serialize};

/// The store's local key of the hub's private key.
const KEY_ENTRY: &str = "hub-key";
/// The store's local key of the tablets removed from the hub.
const REMOVED_ENTRY: &str = "hub-removed-clients";
/// Session keys kept per tablet.
pub const KEYS_PER_CLIENT: usize = 8;
/// Hours a session key lasts.
pub const KEY_HOURS: i64 = 24;
/// Tablets with session keys at most (the least recently seen goes first).
pub const MAX_CLIENTS: usize = 1024;
/// Requests one session key opens at most (the app makes one per handshake).
const NONCES_PER_KEY: usize = 4096;
/// Hours a token from `login` lasts while unused.
pub const TOKEN_HOURS: i64 = 24 * 30;

/// A tablet as an admin sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientInfo {
    /// The app install's id (`hub_client_id`).
    pub client_id: String,
    /// First handshake since the node started (ms).
    pub first_seen: i64,
    /// Latest handshake or call (ms).
    pub last_seen: i64,
    /// Who signed in from it last, if anyone.
    pub user: Option<String>,
}

struct SessionKey {
    key: [u8; 32],
    made: i64,
    opened: HashSet<[u8; 12]>,
}

struct Client {
    keys: VecDeque<SessionKey>,
    info: ClientInfo,
    /// What its last push wrote (record → feed position after it), left out of its
    /// next pulls while unchanged.
    pushed: HashMap<DocId, u64>,
}

/// Why a sealed request was not opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No handshake from this tablet (or its keys expired): handshake first.
    #[error("this tablet is not paired with the hub (or its session ended): it handshakes first")]
    NotPaired,
    /// The tablet was removed by an admin.
    #[error("this tablet was removed from the hub by an admin")]
    Removed,
    /// No session key of the tablet opens it.
    #[error("the request does not decrypt with this tablet's session keys")]
    Undecryptable,
    /// Opened before: a replay.
    #[error("the request was sent before (a replay) and is refused")]
    Replayed,
}

/// The hub a node serves.
pub struct Hub {
    key: HubKey,
    id: String,
    name: String,
    url: String,
    store: Store,
    clients: Mutex<HashMap<String, Client>>,
    removed: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("id", &self.id)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// The hub of the node with this store: its key made at the first start and kept
    /// in the store's local table. `url` is what the app calls (`http://IP:PORT`).
    pub fn start(store: Store, id: String, name: String, url: String) -> Result<Self> {
        let key = match store.get_local(KEY_ENTRY)? {
            Some(bytes) => {
                let secret: [u8; 32] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("the hub key in the store is damaged"))?;
                HubKey::from_bytes(&secret)?
            }
            None => {
                let key = HubKey::generate()?;
                store
                    .put_local_blocking(vec![(
                        KEY_ENTRY.to_owned(),
                        Some(key.secret_bytes()?.to_vec()),
                    )])
                    .context("cannot keep the hub key")?;
                key
            }
        };
        let removed = match store.get_local(REMOVED_ENTRY)? {
            Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            None => HashSet::new(),
        };
        Ok(Self {
            key,
            id,
            name,
            url: url.trim_end_matches('/').to_owned(),
            store,
            clients: Mutex::new(HashMap::new()),
            removed: Mutex::new(removed),
        })
    }

    /// The hub's id (the node's peer id).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The hub's name, as the app shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL the app calls.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The public key, base64url.
    pub fn public_key(&self) -> String {
        hub::b64(&self.key.public())
    }

    /// The pairing QR code's text.
    pub fn pairing_text(&self) -> String {
        serde_json::json!({
            "type": "sync_hub",
            "url": self.url,
            "id": self.id,
            "pk": self.public_key(),
        })
        .to_string()
    }

    /// A handshake: the tablet's new session key (its older ones stay, up to
    /// [`KEYS_PER_CLIENT`]).
    pub fn handshake(&self, client_id: &str, client_public: &str, now: i64) -> Result<(), String> {
        if client_id.is_empty() || client_id.len() > 128 {
            return Err("the client id is missing or too long".into());
        }
        if self.is_removed(client_id) {
            return Err(OpenError::Removed.to_string());
        }
        let public = hub::unb64(client_public).map_err(|e| e.to_string())?;
        let key = self.key.session_key(&public).map_err(|e| e.to_string())?;
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if !clients.contains_key(client_id) && clients.len() >= MAX_CLIENTS {
            let oldest = clients
                .iter()
                .min_by_key(|(_, c)| c.info.last_seen)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                clients.remove(&oldest);
            }
        }
        let client = clients
            .entry(client_id.to_owned())
            .or_insert_with(|| Client {
                keys: VecDeque::new(),
                info: ClientInfo {
                    client_id: client_id.to_owned(),
                    first_seen: now,
                    last_seen: now,
                    user: None,
                },
                pushed: HashMap::new(),
            });
        client.info.last_seen = now;
        client.keys.push_front(SessionKey {
            key,
            made: now,
            opened: HashSet::new(),
        });
        client.keys.truncate(KEYS_PER_CLIENT);
        Ok(())
    }

    /// Opens a sealed request of `client_id`: its plaintext and the session key that
    /// opened it (the answer is sealed with the same key).
    pub fn open_request(
        &self,
        client_id: &str,
        aad: Aad,
        payload: &str,
        now: i64,
    ) -> Result<(Vec<u8>, [u8; 32]), OpenError> {
        if self.is_removed(client_id) {
            return Err(OpenError::Removed);
        }
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let client = clients.get_mut(client_id).ok_or(OpenError::NotPaired)?;
        client.keys.retain(|k| now - k.made < KEY_HOURS * 3_600_000);
        if client.keys.is_empty() {
            return Err(OpenError::NotPaired);
        }
        for session in client.keys.iter_mut() {
            match hub::open(&session.key, aad, payload) {
                Ok((plain, nonce)) => {
                    if session.opened.contains(&nonce) {
                        return Err(OpenError::Replayed);
                    }
                    if session.opened.len() >= NONCES_PER_KEY {
                        // Spent: the tablet handshakes again.
                        return Err(OpenError::NotPaired);
                    }
                    session.opened.insert(nonce);
                    client.info.last_seen = now;
                    return Ok((plain, session.key));
                }
                Err(HubError::Undecryptable) => continue,
                Err(_) => return Err(OpenError::Undecryptable),
            }
        }
        Err(OpenError::Undecryptable)
    }

    /// Seals an answer.
    pub fn seal(&self, key: &[u8; 32], aad: Aad, plain: &[u8]) -> Result<String> {
        Ok(hub::seal(key, aad, plain)?)
    }

    /// Notes who signed in from a tablet.
    pub fn signed_in(&self, client_id: &str, user: &str) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get_mut(client_id) {
            client.info.user = Some(user.to_owned());
        }
    }

    /// Remembers what a tablet's push wrote.
    pub fn pushed(&self, client_id: &str, written: &[(DocId, u64)]) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get_mut(client_id) {
            client.pushed = written.iter().copied().collect();
        }
    }

    /// What a tablet's last push wrote.
    pub fn pushed_by(&self, client_id: &str) -> HashMap<DocId, u64> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .get(client_id)
            .map(|c| c.pushed.clone())
            .unwrap_or_default()
    }

    /// The tablets that handshook since the node started, most recent first.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<ClientInfo> = clients.values().map(|c| c.info.clone()).collect();
        list.sort_by_key(|c| std::cmp::Reverse(c.last_seen));
        list
    }

    /// Whether an admin removed this tablet.
    pub fn is_removed(&self, client_id: &str) -> bool {
        self.removed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(client_id)
    }

    /// Removes a tablet: its session keys go, and it may not handshake again (kept in the
    /// store). The caller ends its tokens.
    pub fn remove(&self, client_id: &str) -> Result<()> {
        let list: Vec<String> = {
            let mut removed = self.removed.lock().unwrap_or_else(|e| e.into_inner());
            removed.insert(client_id.to_owned());
            removed.iter().cloned().collect()
        };
        self.store.put_local_blocking(vec![(
            REMOVED_ENTRY.to_owned(),
            Some(serde_json::to_vec(&list)?),
        )])?;
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(client_id);
        Ok(())
    }
}

/// The URL the app is to call for a hub listening on `addr`: its own address, or for an
/// unspecified one (`0.0.0.0`) the address this machine would use on its network (found
/// without sending anything), else loopback.
pub fn url_for(addr: std::net::SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        local_ip().unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
    } else {
        addr.ip()
    };
    format!("http://{}", std::net::SocketAddr::new(ip, addr.port()))
}

fn local_ip() -> Option<std::net::IpAddr> {
    // A UDP "connect" picks the outgoing address and sends no packet.
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}
