//! The network actor: owns the libp2p swarm, dials and redials peers, keeps one
//! connection per pair, and runs one sync session per connected peer.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::trust::Trust;
use anyhow::{Context, Result};
use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, noise, tcp, yamux};
use medmesh_protocol::record;
use medmesh_protocol::sync::PROTOCOL_VERSION;
use medmesh_storage::{PeerUpdate, Store};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::discovery::{Discovery, DiscoveryConfig, DiscoveryEvent};
use super::session::{self, SESSION_COMMANDS, SessionCommand, SessionContext};
use super::{
    COMMAND_CAPACITY, Command, Mesh, SYNC_PROTOCOL, SharedStatus, update_existing, update_status,
};

/// Discovery events that may wait.
const DISCOVERY_CAPACITY: usize = 64;
/// First and longest wait before dialing a peer again.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long the higher peer id waits for the lower one to dial a discovered peer before
/// dialing itself.
const HIGHER_DIAL_GRACE: Duration = Duration::from_secs(5);
/// Connections close this long after their last stream.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections a node keeps at most (members or not).
const MAX_CONNECTIONS: usize = 128;
/// Connections from one IP address at most (loopback excepted: tests and local tools).
const MAX_CONNECTIONS_PER_IP: usize = 8;
/// Peers that proved membership, waiting to be noted by the actor.
const ESTABLISHED_CAPACITY: usize = 64;

/// How the mesh starts.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Nodes to connect to directly (also remembered).
    pub peers: Vec<Multiaddr>,
    /// Discover nodes with mDNS.
    pub mdns: bool,
    /// Limit mDNS to these interfaces (all when empty).
    pub mdns_interfaces: Vec<String>,
    /// The data directory, where an admin node finds the invites it redeems.
    pub data_dir: Option<std::path::PathBuf>,
}

#[derive(libp2p::swarm::NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
pub(super) struct Behaviour {
    pub(super) stream: libp2p_stream::Behaviour,
}

/// A running session: its number, how to stop it and how to reach it.
struct SessionHandle {
    id: u64,
    cancel: CancellationToken,
    commands: mpsc::Sender<SessionCommand>,
}

/// A peer to dial again, and when.
#[derive(Debug)]
struct Redial {
    due: Instant,
    delay: Duration,
}

struct Network {
    swarm: Swarm<Behaviour>,
    local: PeerId,
    store: Store,
    context: SessionContext,
    status: SharedStatus,
    control: libp2p_stream::Control,
    /// Established connections per peer: (id, dialed by us).
    connections: HashMap<PeerId, Vec<(ConnectionId, bool)>>,
    /// Running sessions per peer.
    sessions: HashMap<PeerId, SessionHandle>,
    /// Peers that proved their membership in a session (only these get a status entry
    /// and are remembered).
    members: HashSet<PeerId>,
    /// The peers with a sync session that proved membership (what sessions tell their
    /// peers, so that changes are not relayed to peers that get them from their source).
    neighbors: tokio::sync::watch::Sender<Vec<String>>,
    /// The remote address of each connection (for the per-address limit).
    conn_addr: HashMap<ConnectionId, Multiaddr>,
    next_session: u64,
    tasks: JoinSet<(PeerId, u64, String)>,
    /// Addresses dialed without a known peer id (`--peer`, the API).
    pinned: Vec<Multiaddr>,
    /// Known peers and their addresses (remembered, discovered).
    known: HashMap<PeerId, Vec<Multiaddr>>,
    /// Peers seen by mDNS now.
    discovered: HashSet<PeerId>,
    redial_peers: HashMap<PeerId, Redial>,
    redial_addrs: HashMap<Multiaddr, Redial>,
    /// Discovered peers the lower id should dial; we dial ourselves after the grace.
    awaiting_dial: HashMap<PeerId, Instant>,
    /// Sessions to open again (we are the opener), and when.
    reopen: HashMap<PeerId, Redial>,
    /// The last wait before reopening a session with a peer (doubles while it fails).
    reopen_delay: HashMap<PeerId, Duration>,
    /// The peer reached at each pinned address.
    pinned_peer: HashMap<Multiaddr, PeerId>,
    /// The data directory (where the listen addresses are kept for `medmesh invite`).
    data_dir: Option<std::path::PathBuf>,
    /// Revoked devices refused so far (each is logged once).
    refused_revoked: HashSet<PeerId>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn backoff(previous: Option<&Redial>) -> Redial {
    let delay = previous.map_or(BACKOFF_FIRST, |r| (r.delay * 2).min(BACKOFF_MAX));
    Redial {
        due: Instant::now() + delay,
        delay,
    }
}

/// The address without its trailing `/p2p/...`, and the peer id it named.
fn split_peer(addr: &Multiaddr) -> (Multiaddr, Option<PeerId>) {
    let mut addr = addr.clone();
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => {
            addr.pop();
            (addr, Some(peer))
        }
        _ => (addr, None),
    }
}

/// Tells the actor of every device revoked from now on.
async fn watch_revoked(
    store: Store,
    trust: Trust,
    commands: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(crate::trust::watch_revocations(store, trust, tx, shutdown));
    while let Some(peer) = rx.recv().await {
        if commands.send(Command::Revoked { peer }).await.is_err() {
            return;
        }
    }
}

/// The swarm of a node: TCP, noise, yamux, and streams for sync and enrollment.
pub(super) fn build_swarm(keypair: Keypair) -> Result<Swarm<Behaviour>> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .context("cannot set up the encrypted transport")?
        .with_behaviour(|_| Behaviour {
            stream: libp2p_stream::Behaviour::new(),
        })
        .context("cannot set up the sync protocol")?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_TIMEOUT))
        .build())
}

/// Starts the mesh: the swarm, discovery and the actor. Runs until `shutdown` fires.
pub async fn start(
    store: Store,
    keypair: Keypair,
    trust: Trust,
    config: MeshConfig,
    shutdown: CancellationToken,
) -> Result<(Mesh, tokio::task::JoinHandle<()>)> {
    let credential = trust.credential();
    {
        let store = store.clone();
        let root = trust.root;
        let revoked = trust.revoked.clone();
        tokio::task::spawn_blocking(move || {
            crate::trust::load_revocations(&store, &root, &revoked)
        })
        .await
        .context("reading the mesh's revocations was interrupted")??;
    }
    let local = keypair.public().to_peer_id();
    let mut swarm = build_swarm(keypair)?;
    for addr in &config.listen {
        swarm.listen_on(addr.clone()).with_context(|| {
            format!("cannot listen on {addr}; is another node using that port? choose another with --listen")
        })?;
    }
    let mut control = swarm.behaviour().stream.new_control();
    let incoming = control
        .accept(SYNC_PROTOCOL)
        .map_err(|_| anyhow::anyhow!("the sync protocol was registered twice"))?;
    let enrollments = control
        .accept(super::enroll::ENROLL_PROTOCOL)
        .map_err(|_| anyhow::anyhow!("the enrollment protocol was registered twice"))?;
    if let Some(dir) = config.data_dir.clone() {
        tokio::spawn(super::enroll::serve(
            enrollments,
            dir,
            trust.clone(),
            shutdown.clone(),
        ));
    }
    let status: SharedStatus = Default::default();
    let root = credential.root;
    let (established_tx, established_rx) = mpsc::channel(ESTABLISHED_CAPACITY);
    let (neighbors_tx, neighbors_rx) = tokio::sync::watch::channel(Vec::new());
    let context = SessionContext {
        store: store.clone(),
        local_peer: local.to_string(),
        credential,
        status: status.clone(),
        established: established_tx,
        neighbors: neighbors_rx,
    };
    let (commands_tx, commands) = mpsc::channel(COMMAND_CAPACITY);
    let mut network = Network {
        swarm,
        local,
        store: store.clone(),
        context,
        status: status.clone(),
        control,
        connections: HashMap::new(),
        sessions: HashMap::new(),
        members: HashSet::new(),
        neighbors: neighbors_tx,
        conn_addr: HashMap::new(),
        next_session: 1,
        tasks: JoinSet::new(),
        pinned: Vec::new(),
        known: HashMap::new(),
        discovered: HashSet::new(),
        redial_peers: HashMap::new(),
        redial_addrs: HashMap::new(),
        awaiting_dial: HashMap::new(),
        reopen: HashMap::new(),
        reopen_delay: HashMap::new(),
        pinned_peer: HashMap::new(),
        data_dir: config.data_dir.clone(),
        refused_revoked: HashSet::new(),
    };
    network.load_remembered(&config.peers).await?;
    let (discovery_tx, discovery_rx) = mpsc::channel(DISCOVERY_CAPACITY);
    tokio::spawn(watch_revoked(
        store.clone(),
        trust.clone(),
        commands_tx.clone(),
        shutdown.clone(),
    ));
    let purge = super::scope::SharedPurge::default();
    tokio::spawn(super::scope::keep(
        store.clone(),
        config.data_dir.clone(),
        trust.clone(),
        commands_tx.clone(),
        purge.clone(),
        shutdown.clone(),
    ));
    let mesh = Mesh {
        commands: commands_tx,
        status,
        fingerprint: root.fingerprint(),
        trust,
        purge,
    };
    let mdns = config.mdns;
    let interfaces = config.mdns_interfaces.clone();
    let listen_port = config
        .listen
        .iter()
        .find_map(|a| {
            a.iter().find_map(|p| match p {
                Protocol::Tcp(port) => Some(port),
                _ => None,
            })
        })
        .unwrap_or(0);
    let task = tokio::spawn(async move {
        network
            .run(
                commands,
                established_rx,
                incoming,
                discovery_tx,
                discovery_rx,
                mdns,
                interfaces,
                root,
                listen_port,
                shutdown,
            )
            .await;
    });
    Ok((mesh, task))
}

impl Network {
    /// Keeps the addresses this node listens on where `medmesh invite` finds them.
    fn save_listen_addrs(&self) {
        let Some(dir) = &self.data_dir else {
            return;
        };
        let text: String = self.swarm.listeners().map(|a| format!("{a}\n")).collect();
        let path = dir.join(crate::server::LISTEN_FILE);
        if let Err(err) = crate::files::write_private(&path, &text) {
            tracing::warn!(error = %err, "cannot note the listening addresses for `medmesh invite`; give them with --addr");
        }
    }

    /// Loads remembered peers and the `--peer` addresses; dials them all.
    async fn load_remembered(&mut self, extra: &[Multiaddr]) -> Result<()> {
        let store = self.store.clone();
        let remembered = tokio::task::spawn_blocking(move || store.peers())
            .await
            .context("reading remembered peers was interrupted")??;
        for (key, record) in remembered {
            let addrs: Vec<Multiaddr> =
                record.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            if let Some(addr) = key.strip_prefix("addr:") {
                if let Ok(addr) = addr.parse::<Multiaddr>() {
                    self.pinned.push(addr);
                }
            } else if let Ok(peer) = key.parse::<PeerId>()
                && !addrs.is_empty()
            {
                self.known.insert(peer, addrs);
            }
        }
        for addr in extra {
            if !self.pinned.contains(addr) {
                self.pinned.push(addr.clone());
                self.remember_addr(addr).await;
            }
        }
        for addr in self.pinned.clone() {
            self.redial_addrs.insert(addr.clone(), backoff(None));
            self.dial_addr(&addr);
        }
        for (peer, addrs) in self.known.clone() {
            self.dial_peer(peer, addrs);
        }
        Ok(())
    }

    fn remember_addr(
        &self,
        addr: &Multiaddr,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let store = self.store.clone();
        let addr = addr.clone();
        async move { remember_addr(store, addr).await }
    }

    fn save_peer_seen(
        &self,
        peer: PeerId,
        addrs: Vec<String>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        save_peer_seen(self.store.clone(), peer, addrs)
    }
    fn dial_addr(&mut self, addr: &Multiaddr) {
        let (bare, peer) = split_peer(addr);
        if let Some(peer) = peer
            && (peer == self.local || self.swarm.is_connected(&peer))
        {
            return;
        }
        if let Err(err) = self
            .swarm
            .dial(if peer.is_some() { addr.clone() } else { bare })
        {
            tracing::debug!(%addr, error = %err, "dial not started");
        }
    }

    fn dial_peer(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if peer == self.local || self.swarm.is_connected(&peer) || addrs.is_empty() {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(err) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %err, "dial not started");
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut established: mpsc::Receiver<String>,
        mut incoming: libp2p_stream::IncomingStreams,
        discovery_tx: mpsc::Sender<DiscoveryEvent>,
        mut discovery_rx: mpsc::Receiver<DiscoveryEvent>,
        mdns: bool,
        interfaces: Vec<String>,
        root: medmesh_protocol::membership::MeshRoot,
        mut listen_port: u16,
        shutdown: CancellationToken,
    ) {
        let mut discovery: Option<Discovery> = None;
        let mut tag_period = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            let now = u64::try_from(now_ms()).unwrap_or(0);
            let period = now / medmesh_protocol::membership::DISCOVERY_PERIOD_MS;
            if discovery.is_some() && period != tag_period {
                // The hour turned: advertise the new tag.
                if let Some(old) = discovery.take() {
                    let _ = tokio::task::spawn_blocking(move || old.shutdown()).await;
                }
            }
            if mdns && discovery.is_none() && listen_port != 0 {
                tag_period = period;
                let step = medmesh_protocol::membership::DISCOVERY_PERIOD_MS;
                let reveal_root = root;
                let config = DiscoveryConfig {
                    peer_id: self.local.to_string(),
                    instance: hex::encode(rand::random::<[u8; 8]>()),
                    sealed_peer: root
                        .seal_peer(&self.local.to_string(), now, rand::random())
                        .unwrap_or_default(),
                    reveal: std::sync::Arc::new(move |tag, sealed| {
                        let now = u64::try_from(now_ms()).unwrap_or(0);
                        let period = reveal_root.tag_period(tag, now)?;
                        reveal_root
                            .open_peer(sealed, period)
                            .filter(|p| p.parse::<PeerId>().is_ok())
                    }),
                    fingerprint: root.discovery_tag(now),
                    also_accept: vec![
                        root.discovery_tag(now.saturating_sub(step)),
                        root.discovery_tag(now.saturating_add(step)),
                    ],
                    protocol_version: PROTOCOL_VERSION,
                    port: listen_port,
                    interfaces: interfaces.clone(),
                };
                match Discovery::start(config, discovery_tx.clone()) {
                    Ok(d) => {
                        tracing::info!("mDNS discovery started");
                        discovery = Some(d);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "mDNS discovery could not start; add peers with --peer or `medmesh peers add`");
                        listen_port = 0;
                    }
                }
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(command) = commands.recv() => self.on_command(command).await,
                event = self.swarm.select_next_some() => {
                    if let SwarmEvent::NewListenAddr { address, .. } = &event
                        && listen_port == 0
                        && discovery.is_none()
                    {
                        listen_port = address.iter().find_map(|p| match p {
                            Protocol::Tcp(port) => Some(port),
                            _ => None,
                        }).unwrap_or(0);
                    }
                    self.on_swarm_event(event).await;
                }
                Some((peer, stream)) = incoming.next() => self.on_incoming(peer, stream),
                Some(peer) = established.recv() => self.on_established(peer).await,
                Some(event) = discovery_rx.recv() => self.on_discovery(event),
                Some(ended) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Ok((peer, id, reason)) = ended {
                        self.on_session_ended(peer, id, reason);
                    }
                }
                _ = tick.tick() => self.on_tick(),
            }
        }
        for (_, handle) in self.sessions.drain() {
            handle.cancel.cancel();
        }
        while self.tasks.join_next().await.is_some() {}
        if let Some(dir) = &self.data_dir {
            let _ = std::fs::remove_file(dir.join(crate::server::LISTEN_FILE));
        }
        if let Some(discovery) = discovery {
            let _ = tokio::task::spawn_blocking(move || discovery.shutdown()).await;
        }
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::AddPeer { addr, reply } => {
                if !self.pinned.contains(&addr) {
                    self.pinned.push(addr.clone());
                    self.remember_addr(&addr).await;
                }
                self.redial_addrs.insert(addr.clone(), backoff(None));
                self.dial_addr(&addr);
                let _ = reply.send(Ok(()));
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Verify { peer, reply } => {
                let answer = match peer.parse::<PeerId>() {
                    Err(_) => Err(anyhow::anyhow!(
                        "`{peer}` is not a peer id; `medmesh peers` lists them"
                    )),
                    Ok(id) => match self.sessions.get(&id) {
                        Some(handle) if self.members.contains(&id) => {
                            let (round_reply, round) = tokio::sync::oneshot::channel();
                            match handle
                                .commands
                                .try_send(SessionCommand::Verify { reply: round_reply })
                            {
                                Ok(()) => Ok(round),
                                Err(_) => Err(anyhow::anyhow!(
                                    "the sync with {peer} is busy; try again in a moment"
                                )),
                            }
                        }
                        _ => Err(anyhow::anyhow!(
                            "{peer} is not connected and syncing now; `medmesh peers` shows which peers are"
                        )),
                    },
                };
                let _ = reply.send(answer);
            }
            Command::Forget { peer, reply } => {
                let _ = reply.send(self.forget(&peer).await);
            }
            Command::Revoked { peer } if peer == self.local.to_string() => {
                tracing::error!(
                    "this device was revoked by an admin of the mesh: the other devices refuse it from now on; ask an admin for a new invite (in a new data directory) if that was a mistake"
                );
            }
            Command::Certificate { cert } => {
                self.context.credential.cert = cert;
                // Every peer sends by the certificate it saw: sync again under the new
                // one (each session ends and is opened again).
                for handle in self.sessions.values() {
                    handle.cancel.cancel();
                }
            }
            Command::Revoked { peer } => {
                let _ = self.forget(&peer).await;
                update_status(&self.status, &peer, |v| {
                    v.connected = false;
                    v.syncing = false;
                    v.last_error =
                        Some("revoked by an admin of the mesh: refused from now on".into());
                });
            }
        }
    }

    /// Drops everything this node keeps about a peer and stops dialing it.
    async fn forget(&mut self, peer: &str) -> Result<bool> {
        let id: PeerId = peer.parse().map_err(|_| {
            anyhow::anyhow!("`{peer}` is not a peer id; `medmesh peers` lists them")
        })?;
        let mut known = self.known.remove(&id).is_some();
        known |= self.members.remove(&id);
        if let Some(handle) = self.sessions.remove(&id) {
            handle.cancel.cancel();
        }
        self.redial_peers.remove(&id);
        self.awaiting_dial.remove(&id);
        self.reopen.remove(&id);
        let pinned: Vec<Multiaddr> = self
            .pinned_peer
            .iter()
            .filter(|(_, p)| **p == id)
            .map(|(a, _)| a.clone())
            .collect();
        for addr in pinned {
            self.pinned.retain(|a| *a != addr);
            self.pinned_peer.remove(&addr);
            self.redial_addrs.remove(&addr);
            self.store
                .update_peer(&format!("addr:{addr}"), PeerUpdate::Forget)
                .await?;
            known = true;
        }
        if self.swarm.is_connected(&id) {
            let _ = self.swarm.disconnect_peer_id(id);
            known = true;
        }
        if let Ok(mut map) = self.status.lock() {
            known |= map.remove(peer).is_some();
        }
        known |= self.store.peer(peer)?.is_some();
        self.store.update_peer(peer, PeerUpdate::Forget).await?;
        tracing::info!(%peer, "forgot the peer");
        Ok(known)
    }

    /// A peer proved its membership: it gets a status entry and is remembered.
    async fn on_established(&mut self, peer: String) {
        let Ok(id) = peer.parse::<PeerId>() else {
            return;
        };
        if !self.swarm.is_connected(&id) {
            return;
        }
        self.members.insert(id);
        self.publish_neighbors();
        let connections = self.connections.get(&id).map_or(0, Vec::len);
        let addrs: Vec<String> = self
            .known
            .get(&id)
            .map(|a| a.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        update_status(&self.status, &peer, |v| {
            v.connected = true;
            v.connections = connections;
            v.last_seen = Some(record::format_timestamp(now_ms()));
            for a in &addrs {
                if !v.addresses.contains(a) {
                    v.addresses.push(a.clone());
                }
            }
        });
        let dialed: Vec<String> = self
            .connections
            .get(&id)
            .into_iter()
            .flatten()
            .filter(|(_, dialed)| *dialed)
            .filter_map(|(conn, _)| self.conn_addr.get(conn))
            .map(ToString::to_string)
            .collect();
        if !dialed.is_empty() {
            self.save_peer_seen(id, dialed).await;
        }
    }

    async fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening for other nodes");
                self.save_listen_addrs();
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let dialed = endpoint.is_dialer();
                let addr = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address.clone(),
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr.clone(),
                };
                tracing::info!(peer = %peer_id, %addr, dialed, "connected");
                if self
                    .context
                    .credential
                    .revoked
                    .contains(&peer_id.to_string())
                {
                    if self.refused_revoked.insert(peer_id) {
                        tracing::warn!(peer = %peer_id, %addr, "a revoked device connected; closing the connection (and every later one)");
                    } else {
                        tracing::debug!(peer = %peer_id, %addr, "a revoked device connected again; closing the connection");
                    }
                    self.swarm.close_connection(connection_id);
                    return;
                }
                if !self.connection_allowed(&addr) {
                    tracing::warn!(peer = %peer_id, %addr, "too many connections (from this address or in all); closing this one");
                    self.swarm.close_connection(connection_id);
                    return;
                }
                self.conn_addr.insert(connection_id, addr.clone());
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    let (bare, _) = split_peer(address);
                    for pinned in &self.pinned {
                        if split_peer(pinned).0 == bare {
                            self.pinned_peer.insert(pinned.clone(), peer_id);
                            self.redial_addrs.remove(pinned);
                        }
                    }
                }
                self.redial_peers.remove(&peer_id);
                self.awaiting_dial.remove(&peer_id);
                self.reopen_delay.remove(&peer_id);
                let conns = self.connections.entry(peer_id).or_default();
                conns.push((connection_id, dialed));
                let count = conns.len();
                if count > 1 {
                    self.drop_duplicate_connections(peer_id);
                }
                update_existing(&self.status, &peer_id.to_string(), |v| {
                    v.connected = true;
                    v.connections = count;
                    v.last_seen = Some(record::format_timestamp(now_ms()));
                    let text = addr.to_string();
                    if dialed && !v.addresses.contains(&text) {
                        v.addresses.push(text);
                    }
                });
                if dialed {
                    let entry = self.known.entry(peer_id).or_default();
                    if !entry.contains(&addr) {
                        entry.push(addr.clone());
                    }
                    if self.members.contains(&peer_id) {
                        let record_addrs = entry.iter().map(ToString::to_string).collect();
                        self.save_peer_seen(peer_id, record_addrs).await;
                    }
                }
                if self.local < peer_id && !self.sessions.contains_key(&peer_id) {
                    self.open_session(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                if let Some(conns) = self.connections.get_mut(&peer_id) {
                    conns.retain(|(id, _)| *id != connection_id);
                }
                self.conn_addr.remove(&connection_id);
                update_existing(&self.status, &peer_id.to_string(), |v| {
                    v.connections = num_established as usize;
                });
                if num_established == 0 {
                    self.connections.remove(&peer_id);
                    tracing::info!(peer = %peer_id, cause = ?cause.map(|c| c.to_string()), "disconnected");
                    if let Some(handle) = self.sessions.remove(&peer_id) {
                        handle.cancel.cancel();
                        self.publish_neighbors();
                    }
                    self.reopen.remove(&peer_id);
                    self.reopen_delay.remove(&peer_id);
                    update_existing(&self.status, &peer_id.to_string(), |v| {
                        v.connected = false;
                        v.syncing = false;
                    });
                    if self.known.contains_key(&peer_id) {
                        let next = backoff(self.redial_peers.get(&peer_id));
                        self.redial_peers.insert(peer_id, next);
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                error,
                connection_id: _,
            } => {
                tracing::debug!(peer = ?peer_id, error = %error, "could not connect");
                if let Some(peer) = peer_id
                    && self.known.contains_key(&peer)
                {
                    let next = backoff(self.redial_peers.get(&peer));
                    tracing::info!(%peer, retry_in_s = next.delay.as_secs(), "could not reach the peer; will retry");
                    self.redial_peers.insert(peer, next);
                }
            }
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => {
                tracing::debug!(%send_back_addr, error = %error, "an incoming connection failed");
            }
            _ => {}
        }
    }

    /// Keeps one connection to `peer`: the one the lower peer id dialed.
    fn drop_duplicate_connections(&mut self, peer: PeerId) {
        let Some(conns) = self.connections.get(&peer) else {
            return;
        };
        let we_are_lower = self.local < peer;
        let preferred = conns
            .iter()
            .find(|(_, dialed)| *dialed == we_are_lower)
            .or_else(|| conns.first())
            .map(|(id, _)| *id);
        for (id, _) in conns.clone() {
            if Some(id) != preferred {
                tracing::debug!(%peer, "closing a duplicate connection");
                self.swarm.close_connection(id);
            }
        }
    }

    fn open_session(&mut self, peer: PeerId) {
        let mut control = self.control.clone();
        let context = self.context.clone();
        let (id, cancel, commands) = self.new_session(peer);
        self.tasks.spawn(async move {
            let stream = tokio::select! {
                () = cancel.cancelled() => return (peer, id, "cancelled".to_owned()),
                opened = control.open_stream(peer, super::SYNC_PROTOCOL) => opened,
            };
            let reason = match stream {
                Ok(stream) => session::run(stream, peer.to_string(), context, commands, cancel)
                    .await
                    .unwrap_or_else(|e| format!("{e:#}")),
                Err(err) => format!("cannot open the sync stream: {err}"),
            };
            (peer, id, reason)
        });
    }

    fn new_session(
        &mut self,
        peer: PeerId,
    ) -> (u64, CancellationToken, mpsc::Receiver<SessionCommand>) {
        if let Some(old) = self.sessions.remove(&peer) {
            old.cancel.cancel();
        }
        let id = self.next_session;
        self.next_session += 1;
        let cancel = CancellationToken::new();
        let (commands, receiver) = mpsc::channel(SESSION_COMMANDS);
        self.sessions.insert(
            peer,
            SessionHandle {
                id,
                cancel: cancel.clone(),
                commands,
            },
        );
        (id, cancel, receiver)
    }

    fn on_incoming(&mut self, peer: PeerId, stream: libp2p::Stream) {
        let context = self.context.clone();
        let (id, cancel, commands) = self.new_session(peer);
        self.tasks.spawn(async move {
            let reason = session::run(stream, peer.to_string(), context, commands, cancel)
                .await
                .unwrap_or_else(|e| format!("{e:#}"));
            (peer, id, reason)
        });
    }

    /// Tells every session which members this node has sessions with now.
    fn publish_neighbors(&mut self) {
        let mut peers: Vec<String> = self
            .sessions
            .keys()
            .filter(|p| self.members.contains(p))
            .map(ToString::to_string)
            .collect();
        peers.sort();
        self.neighbors.send_if_modified(|current| {
            if *current == peers {
                false
            } else {
                *current = peers;
                true
            }
        });
    }

    /// Whether one more connection from `addr` may stay.
    fn connection_allowed(&self, addr: &Multiaddr) -> bool {
        if self.conn_addr.len() >= MAX_CONNECTIONS {
            return false;
        }
        let Some(ip) = ip_of(addr) else {
            return true;
        };
        if ip.is_loopback() {
            return true;
        }
        let same = self
            .conn_addr
            .values()
            .filter(|a| ip_of(a) == Some(ip))
            .count();
        same < MAX_CONNECTIONS_PER_IP
    }

    fn on_session_ended(&mut self, peer: PeerId, id: u64, reason: String) {
        if self
            .sessions
            .get(&peer)
            .is_some_and(|handle| handle.id == id)
        {
            self.sessions.remove(&peer);
            self.publish_neighbors();
            let reason = medmesh_storage::escape(&reason);
            tracing::info!(%peer, %reason, "sync session ended");
            if !self.members.contains(&peer) && self.pinned_peer.values().any(|p| *p == peer) {
                // A node this device was told to reach (by hand or by an invite) that
                // did not prove it belongs: say why, so the person can act on it.
                update_status(&self.status, &peer.to_string(), |v| {
                    v.connected = self.swarm.is_connected(&peer);
                    v.last_error = Some(reason.clone());
                });
            }
            if self.swarm.is_connected(&peer) && self.local < peer {
                // The first retry is at once (the peer reconnected and the old session
                // just ended); repeated failures back off.
                let delay = self.reopen_delay.get(&peer).map_or(Duration::ZERO, |d| {
                    if d.is_zero() {
                        BACKOFF_FIRST
                    } else {
                        (*d * 2).min(BACKOFF_MAX)
                    }
                });
                self.reopen_delay.insert(peer, delay);
                if delay.is_zero() {
                    // Now, not at the next tick: a session that ended because its
                    // connection was a duplicate closed a moment ago would otherwise
                    // wait 100 ms for nothing.
                    tracing::info!(%peer, "opening the sync session again");
                    self.open_session(peer);
                    return;
                }
                self.reopen.insert(
                    peer,
                    Redial {
                        due: Instant::now() + delay,
                        delay,
                    },
                );
                tracing::info!(%peer, retry_in_s = delay.as_secs(), "will open the sync session again");
            }
        }
    }

    fn on_discovery(&mut self, event: DiscoveryEvent) {
        match event {
            DiscoveryEvent::Found { peer_id, addrs } => {
                let Ok(peer) = peer_id.parse::<PeerId>() else {
                    return;
                };
                let addrs: Vec<Multiaddr> = addrs
                    .iter()
                    .filter(|a| lan_address(&a.ip()))
                    .map(|a| {
                        let ip = match a.ip() {
                            std::net::IpAddr::V4(v4) => Protocol::Ip4(v4),
                            std::net::IpAddr::V6(v6) => Protocol::Ip6(v6),
                        };
                        Multiaddr::empty().with(ip).with(Protocol::Tcp(a.port()))
                    })
                    .collect();
                if addrs.is_empty() || peer == self.local {
                    return;
                }
                tracing::info!(%peer, ?addrs, "found a node that says it is of this mesh on the network");
                self.discovered.insert(peer);
                self.known.insert(peer, addrs.clone());
                // One side dials: the lower peer id. The other waits a little, then
                // dials itself in case the lower one cannot see it.
                if self.local < peer {
                    self.dial_peer(peer, addrs);
                } else {
                    self.awaiting_dial
                        .entry(peer)
                        .or_insert_with(|| Instant::now() + HIGHER_DIAL_GRACE);
                }
            }
            DiscoveryEvent::Lost { peer_id } => {
                let Ok(peer) = peer_id.parse::<PeerId>() else {
                    return;
                };
                tracing::info!(%peer, "a node left the network");
                self.discovered.remove(&peer);
                self.awaiting_dial.remove(&peer);
                if !self.swarm.is_connected(&peer) {
                    self.redial_peers.remove(&peer);
                    if !self.members.contains(&peer) {
                        self.known.remove(&peer);
                    }
                }
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let due: Vec<PeerId> = self
            .redial_peers
            .iter()
            .filter(|(_, r)| r.due <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            if let Some(addrs) = self.known.get(&peer).cloned() {
                // Keep the backoff entry; a success removes it, a failure doubles it.
                if let Some(r) = self.redial_peers.get_mut(&peer) {
                    r.due = now + r.delay;
                }
                self.dial_peer(peer, addrs);
            }
        }
        for addr in self.pinned.clone() {
            let reached = self
                .pinned_peer
                .get(&addr)
                .is_some_and(|p| self.swarm.is_connected(p));
            if reached {
                self.redial_addrs.remove(&addr);
                continue;
            }
            let due = self.redial_addrs.get(&addr).is_none_or(|r| r.due <= now);
            if due {
                let next = backoff(self.redial_addrs.get(&addr));
                self.redial_addrs.insert(addr.clone(), next);
                self.dial_addr(&addr);
            }
        }
        let due: Vec<PeerId> = self
            .awaiting_dial
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            self.awaiting_dial.remove(&peer);
            if let Some(addrs) = self.known.get(&peer).cloned() {
                self.dial_peer(peer, addrs);
            }
        }
        let due: Vec<PeerId> = self
            .reopen
            .iter()
            .filter(|(_, r)| r.due <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            self.reopen.remove(&peer);
            if self.swarm.is_connected(&peer) && !self.sessions.contains_key(&peer) {
                self.open_session(peer);
            }
        }
    }
}

async fn remember_addr(store: Store, addr: Multiaddr) {
    let update = PeerUpdate::Pin {
        addr: addr.to_string(),
    };
    if let Err(err) = store.update_peer(&format!("addr:{addr}"), update).await {
        tracing::warn!(%addr, error = %err, "cannot remember the peer address");
    }
}

async fn save_peer_seen(store: Store, peer: PeerId, addrs: Vec<String>) {
    let update = PeerUpdate::Seen {
        addrs,
        at_ms: now_ms(),
    };
    if let Err(err) = store.update_peer(&peer.to_string(), update).await {
        tracing::warn!(%peer, error = %err, "cannot remember the peer");
    }
}

/// The IP address of a multiaddr, if it has one.
fn ip_of(addr: &Multiaddr) -> Option<std::net::IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
        _ => None,
    })
}

/// An address another device on the LAN could really have: not unspecified, loopback,
/// multicast or broadcast (mDNS answers are anyone's to forge).
fn lan_address(ip: &std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast())
        }
        std::net::IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_loopback() || v6.is_multicast()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_a_lan_device_could_have_are_dialed() {
        for bad in [
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.251",
            "255.255.255.255",
            "::1",
            "::",
            "ff02::fb",
        ] {
            let ip: std::net::IpAddr = bad.parse().expect("ip");
            assert!(!lan_address(&ip), "{bad}");
        }
        for good in [
            "192.168.1.20",
            "10.0.0.5",
            "169.254.3.4",
            "fe80::1",
            "fd00::2",
        ] {
            let ip: std::net::IpAddr = good.parse().expect("ip");
            assert!(lan_address(&ip), "{good}");
        }
    }
}
