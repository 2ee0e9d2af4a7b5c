//! The network actor: owns the libp2p swarm, dials and redials peers, keeps one
//! connection per pair, and runs one sync session per connected peer.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, noise, tcp, yamux};
use medmesh_protocol::membership::Credential;
use medmesh_protocol::record;
use medmesh_protocol::sync::PROTOCOL_VERSION;
use medmesh_storage::{PeerUpdate, Store};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::discovery::{Discovery, DiscoveryConfig, DiscoveryEvent};
use super::session::{self, SessionContext};
use super::{COMMAND_CAPACITY, Command, Mesh, SYNC_PROTOCOL, SharedStatus, update_status};

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
}

#[derive(libp2p::swarm::NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
struct Behaviour {
    stream: libp2p_stream::Behaviour,
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
    sessions: HashMap<PeerId, (u64, CancellationToken)>,
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

/// Starts the mesh: the swarm, discovery and the actor. Runs until `shutdown` fires.
pub async fn start(
    store: Store,
    keypair: Keypair,
    credential: Credential,
    config: MeshConfig,
    shutdown: CancellationToken,
) -> Result<(Mesh, tokio::task::JoinHandle<()>)> {
    let local = keypair.public().to_peer_id();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
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
        .build();
    for addr in &config.listen {
        swarm.listen_on(addr.clone()).with_context(|| {
            format!("cannot listen on {addr}; is another node using that port? choose another with --listen")
        })?;
    }
    let mut control = swarm.behaviour().stream.new_control();
    let incoming = control
        .accept(SYNC_PROTOCOL)
        .map_err(|_| anyhow::anyhow!("the sync protocol was registered twice"))?;
    let status: SharedStatus = Default::default();
    let fingerprint = credential.fingerprint();
    let context = SessionContext {
        store: store.clone(),
        local_peer: local.to_string(),
        credential,
        status: status.clone(),
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
    };
    network.load_remembered(&config.peers).await?;
    let (discovery_tx, discovery_rx) = mpsc::channel(DISCOVERY_CAPACITY);
    let mesh = Mesh {
        commands: commands_tx,
        status,
        fingerprint: fingerprint.clone(),
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
                incoming,
                discovery_tx,
                discovery_rx,
                mdns,
                interfaces,
                fingerprint,
                listen_port,
                shutdown,
            )
            .await;
    });
    Ok((mesh, task))
}

impl Network {
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
        mut incoming: libp2p_stream::IncomingStreams,
        discovery_tx: mpsc::Sender<DiscoveryEvent>,
        mut discovery_rx: mpsc::Receiver<DiscoveryEvent>,
        mdns: bool,
        interfaces: Vec<String>,
        fingerprint: String,
        mut listen_port: u16,
        shutdown: CancellationToken,
    ) {
        let mut discovery: Option<Discovery> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            if mdns && discovery.is_none() && listen_port != 0 {
                let config = DiscoveryConfig {
                    peer_id: self.local.to_string(),
                    fingerprint: fingerprint.clone(),
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
                Some(event) = discovery_rx.recv() => self.on_discovery(event),
                Some(ended) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Ok((peer, id, reason)) = ended {
                        self.on_session_ended(peer, id, reason);
                    }
                }
                _ = tick.tick() => self.on_tick(),
            }
        }
        for (_, (_, cancel)) in self.sessions.drain() {
            cancel.cancel();
        }
        while self.tasks.join_next().await.is_some() {}
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
        }
    }

    async fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening for other nodes");
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
                update_status(&self.status, &peer_id.to_string(), |v| {
                    v.connected = true;
                    v.connections = count;
                    v.last_seen = Some(record::format_timestamp(now_ms()));
                    let text = addr.to_string();
                    if !v.addresses.contains(&text) {
                        v.addresses.push(text);
                    }
                });
                if dialed {
                    let entry = self.known.entry(peer_id).or_default();
                    if !entry.contains(&addr) {
                        entry.push(addr.clone());
                    }
                    let record_addrs = entry.iter().map(ToString::to_string).collect();
                    self.save_peer_seen(peer_id, record_addrs).await;
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
                update_status(&self.status, &peer_id.to_string(), |v| {
                    v.connections = num_established as usize;
                });
                if num_established == 0 {
                    self.connections.remove(&peer_id);
                    tracing::info!(peer = %peer_id, cause = ?cause.map(|c| c.to_string()), "disconnected");
                    if let Some((_, cancel)) = self.sessions.remove(&peer_id) {
                        cancel.cancel();
                    }
                    self.reopen.remove(&peer_id);
                    self.reopen_delay.remove(&peer_id);
                    update_status(&self.status, &peer_id.to_string(), |v| {
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
        let (id, cancel) = self.new_session(peer);
        self.tasks.spawn(async move {
            let stream = tokio::select! {
                () = cancel.cancelled() => return (peer, id, "cancelled".to_owned()),
                opened = control.open_stream(peer, super::SYNC_PROTOCOL) => opened,
            };
            let reason = match stream {
                Ok(stream) => session::run(stream, peer.to_string(), context, cancel)
                    .await
                    .unwrap_or_else(|e| format!("{e:#}")),
                Err(err) => format!("cannot open the sync stream: {err}"),
            };
            (peer, id, reason)
        });
    }

    fn new_session(&mut self, peer: PeerId) -> (u64, CancellationToken) {
        if let Some((_, old)) = self.sessions.remove(&peer) {
            old.cancel();
        }
        let id = self.next_session;
        self.next_session += 1;
        let cancel = CancellationToken::new();
        self.sessions.insert(peer, (id, cancel.clone()));
        (id, cancel)
    }

    fn on_incoming(&mut self, peer: PeerId, stream: libp2p::Stream) {
        let context = self.context.clone();
        let (id, cancel) = self.new_session(peer);
        self.tasks.spawn(async move {
            let reason = session::run(stream, peer.to_string(), context, cancel)
                .await
                .unwrap_or_else(|e| format!("{e:#}"));
            (peer, id, reason)
        });
    }

    fn on_session_ended(&mut self, peer: PeerId, id: u64, reason: String) {
        if self
            .sessions
            .get(&peer)
            .is_some_and(|(current, _)| *current == id)
        {
            self.sessions.remove(&peer);
            tracing::info!(%peer, %reason, "sync session ended");
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
                    .map(|a| {
                        let ip = match a.ip() {
                            std::net::IpAddr::V4(v4) => Protocol::Ip4(v4),
                            std::net::IpAddr::V6(v6) => Protocol::Ip6(v6),
                        };
                        Multiaddr::empty().with(ip).with(Protocol::Tcp(a.port()))
                    })
                    .collect();
                tracing::info!(%peer, ?addrs, "found a node of this mesh on the network");
                self.discovered.insert(peer);
                self.known.insert(peer, addrs.clone());
                update_status(&self.status, &peer.to_string(), |v| {
                    for a in &addrs {
                        let text = a.to_string();
                        if !v.addresses.contains(&text) {
                            v.addresses.push(text);
                        }
                    }
                });
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
                    if let Ok(mut map) = self.status.lock() {
                        map.remove(&peer.to_string());
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
