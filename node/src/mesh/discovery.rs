//! LAN discovery over mDNS (DNS-SD), with the `mdns-sd` crate.
//!
//! Every node advertises one service instance of type [`SERVICE_TYPE`]
//! (`_medmesh._udp.local.`). The instance and host names are random, new with every
//! advert (at least hourly); the port is its libp2p TCP port; the addresses follow the
//! interfaces (`enable_addr_auto`); and the TXT record carries three keys:
//!
//! | key    | value                                            |
//! |--------|--------------------------------------------------|
//! | `peer` | the peer id, sealed for this hour (members only) |
//! | `mesh` | the mesh's discovery tag for this hour           |
//! | `pv`   | the mesh protocol version, a decimal `u16`       |
//!
//! At the same time the node browses for that service type. A resolved instance is
//! reported as [`DiscoveryEvent::Found`] only if it belongs to *our* mesh (its `mesh`
//! TXT is our mesh's tag for this hour or the hour before or after) and is not ourselves; anything else is logged at debug
//! and ignored. A node that says goodbye, or whose records expire, is reported as
//! [`DiscoveryEvent::Lost`] — but only if it was reported as found before.
//!
//! ```text
//!   mdns_sd::ServiceDaemon (its own thread, UDP 5353)
//!        │ flume: ServiceEvent
//!        ▼
//!   browse thread ──▶ PeerTable (pure: filter, de-duplicate) ──try_send──▶ events
//! ```
//!
//! The tag (see `MeshRoot::discovery_tag`) changes every hour and only members, who know
//! the mesh's root, can compute it: someone on the Wi-Fi cannot tell which mesh a node
//! belongs to, nor follow a mesh's devices by it from one hour to the next. The node
//! restarts its advert when the hour turns.
//!
//! Discovery is only a hint: the tag can be replayed and mDNS is not
//! authenticated, so whoever connects to a found peer must still verify it (libp2p
//! Noise checks the peer id; the mesh handshake checks membership). The events channel
//! is bounded; when it is full an event is dropped, since mDNS re-announces anyway.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mdns_sd::{
    DaemonEvent, IfKind, Receiver, RecvTimeoutError, ResolvedService, ScopedIp, ServiceDaemon,
    ServiceEvent, ServiceInfo,
};
use tokio::sync::mpsc::{self, error::TrySendError};

/// The DNS-SD service type every medmesh node advertises and browses for.
pub const SERVICE_TYPE: &str = "_medmesh._udp.local.";

/// TXT key holding the advertising node's peer id.
const TXT_PEER: &str = "peer";
/// TXT key holding the mesh fingerprint.
const TXT_MESH: &str = "mesh";
/// TXT key holding the mesh protocol version.
const TXT_PROTOCOL_VERSION: &str = "pv";

/// The longest DNS label: the instance name (the peer id) must fit in one.
const MAX_LABEL_LEN: usize = 63;
/// How many characters of the peer id name the mDNS host (`<prefix>.local.`).
const HOSTNAME_PEER_CHARS: usize = 16;
/// At most this many peers of our mesh are remembered, so a flood of adverts on the
/// LAN cannot grow memory without bound.
const MAX_TRACKED_PEERS: usize = 1024;
/// How often the browse thread checks whether it should stop.
const BROWSE_POLL: Duration = Duration::from_millis(250);
/// How long `shutdown` waits for each answer from the daemon thread.
const DAEMON_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// mdns-sd repeats the goodbye packet 120 ms after the first; wait for it to go out.
const GOODBYE_REPEAT_WAIT: Duration = Duration::from_millis(200);
/// How long `shutdown` waits for the browse thread to finish.
const BROWSE_THREAD_JOIN_TIMEOUT: Duration = Duration::from_secs(2);

/// What discovery tells the node about other nodes of its mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// A node of our mesh was seen (or seen again with new addresses).
    Found {
        /// Its libp2p peer id.
        peer_id: String,
        /// Its IP addresses, each with its libp2p TCP port, sorted.
        addrs: Vec<SocketAddr>,
    },
    /// A node announced it is leaving (or its record expired).
    Lost {
        /// Its libp2p peer id.
        peer_id: String,
    },
}

/// Reads the peer id out of another node's `peer` TXT value, given its `mesh` TXT value
/// (the node's tag tells which hour's key sealed it); `None` when it is not one of ours.
pub type Reveal = Arc<dyn Fn(&str, &str) -> Option<String> + Send + Sync>;

/// How this node advertises itself and which nodes it reports.
#[derive(Clone)]
pub struct DiscoveryConfig {
    /// Our libp2p peer id (never advertised in the clear).
    pub peer_id: String,
    /// The mDNS instance name (and host name): random, a new one with every advert.
    pub instance: String,
    /// Our `peer` TXT value: the peer id sealed for this hour (see `MeshRoot::seal_peer`).
    pub sealed_peer: String,
    /// Opens the `peer` TXT values of other nodes.
    pub reveal: Reveal,
    /// The mesh tag this node advertises; nodes advertising it are reported.
    pub fingerprint: String,
    /// Other tags of our mesh (neighbouring hours) whose nodes are reported too.
    pub also_accept: Vec<String>,
    /// The mesh protocol version we speak, advertised as TXT `pv`.
    pub protocol_version: u16,
    /// Our libp2p TCP port, advertised in the SRV record.
    pub port: u16,
    /// Network interfaces to use, by name (e.g. `wlan0`); empty means all of them.
    pub interfaces: Vec<String>,
}

/// A running mDNS advertiser and browser. Stop it with [`Discovery::shutdown`] so the
/// other nodes hear a goodbye; dropping it only stops the daemon.
pub struct Discovery {
    daemon: ServiceDaemon,
    /// Our instance's full name, `<peer id>._medmesh._udp.local.`.
    fullname: String,
    peer_id: String,
    stop: Arc<AtomicBool>,
    browse_thread: Option<JoinHandle<()>>,
    closed: bool,
}

impl Discovery {
    /// Starts advertising and browsing.
    ///
    /// Events for nodes of OTHER meshes (different fingerprint TXT) and for ourselves
    /// are not reported (they are logged at debug). Events go to the bounded `events`
    /// sender; if it is full the event is dropped with a debug log (discovery repeats).
    ///
    /// Needs no async runtime: the daemon and the browse loop run on their own threads.
    pub fn start(
        config: DiscoveryConfig,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> anyhow::Result<Discovery> {
        validate(&config)?;
        let DiscoveryConfig {
            peer_id,
            instance,
            sealed_peer,
            reveal,
            fingerprint,
            also_accept,
            protocol_version,
            port,
            interfaces,
        } = config;

        let daemon = ServiceDaemon::new().context(
            "could not start the mDNS daemon; run the node with --no-mdns and give peers \
             with --peer instead",
        )?;
        let started = Self::advertise_and_browse(
            &daemon,
            &instance,
            &sealed_peer,
            &fingerprint,
            protocol_version,
            port,
            &interfaces,
        );
        let (fullname, service_events, daemon_events) = match started {
            Ok(parts) => parts,
            Err(err) => {
                stop_daemon(&daemon, &peer_id);
                return Err(err);
            }
        };

        let stop = Arc::new(AtomicBool::new(false));
        let mut table = PeerTable::new(peer_id.clone(), fingerprint);
        table.also_accept = also_accept;
        table.reveal = reveal;
        let browse = BrowseLoop {
            table,
            service_events,
            daemon_events,
            events,
            stop: Arc::clone(&stop),
        };
        let browse_thread = std::thread::Builder::new()
            .name("medmesh-mdns-browse".into())
            .spawn(move || browse.run());
        let browse_thread = match browse_thread {
            Ok(handle) => handle,
            Err(err) => {
                stop_daemon(&daemon, &peer_id);
                return Err(err).context(
                    "could not start the mDNS browse thread; the system may be out of \
                     threads — run with --no-mdns",
                );
            }
        };

        tracing::info!(
            peer = %peer_id,
            service = SERVICE_TYPE,
            port,
            interfaces = ?interfaces,
            "mDNS discovery started"
        );
        Ok(Discovery {
            daemon,
            fullname,
            peer_id,
            stop,
            browse_thread: Some(browse_thread),
            closed: false,
        })
    }

    /// Registers our service and starts browsing; returns our instance full name and
    /// the daemon's event receivers.
    fn advertise_and_browse(
        daemon: &ServiceDaemon,
        instance: &str,
        sealed_peer: &str,
        fingerprint: &str,
        protocol_version: u16,
        port: u16,
        interfaces: &[String],
    ) -> anyhow::Result<(String, Receiver<ServiceEvent>, Receiver<DaemonEvent>)> {
        // Subscribe first so errors from binding sockets are not missed.
        let daemon_events = daemon
            .monitor()
            .context("could not watch the mDNS daemon for errors")?;

        if !interfaces.is_empty() {
            // Selections apply in order, the last match wins.
            daemon
                .disable_interface(IfKind::All)
                .context("could not restrict mDNS to the configured interfaces")?;
            let names: Vec<IfKind> = interfaces.iter().map(IfKind::from).collect();
            daemon.enable_interface(names).with_context(|| {
                format!("could not enable mDNS on interfaces {interfaces:?}; check their names")
            })?;
        }

        let pv = protocol_version.to_string();
        let txt = [
            (TXT_PEER, sealed_peer),
            (TXT_MESH, fingerprint),
            (TXT_PROTOCOL_VERSION, pv.as_str()),
        ];
        let mut info = ServiceInfo::new(
            SERVICE_TYPE,
            instance,
            &hostname_for(instance),
            (),
            port,
            &txt[..],
        )
        .with_context(|| format!("could not build the mDNS advert {instance}"))?
        .enable_addr_auto();
        if !interfaces.is_empty() {
            info.set_interfaces(interfaces.iter().map(IfKind::from).collect());
        }
        let fullname = info.get_fullname().to_string();
        daemon
            .register(info)
            .with_context(|| format!("could not advertise {fullname} over mDNS"))?;

        let service_events = daemon
            .browse(SERVICE_TYPE)
            .with_context(|| format!("could not browse for {SERVICE_TYPE} over mDNS"))?;
        Ok((fullname, service_events, daemon_events))
    }

    /// Unregisters the service (sends goodbye) and shuts the daemon down.
    ///
    /// Blocks for a fraction of a second (at most a few seconds if the daemon is stuck);
    /// from async code call it inside `tokio::task::spawn_blocking`.
    pub fn shutdown(mut self) {
        self.close(true);
    }

    fn close(&mut self, say_goodbye: bool) {
        if self.closed {
            return;
        }
        self.closed = true;
        let peer_id = self.peer_id.as_str();

        if say_goodbye {
            match self.daemon.unregister(&self.fullname) {
                Ok(reply) => match reply.recv_timeout(DAEMON_REPLY_TIMEOUT) {
                    Ok(status) => {
                        tracing::debug!(peer = %peer_id, ?status, "mDNS goodbye sent");
                        std::thread::sleep(GOODBYE_REPEAT_WAIT);
                    }
                    Err(err) => {
                        tracing::warn!(peer = %peer_id, error = %err, "mDNS daemon did not confirm the goodbye; peers will forget us when our records expire");
                    }
                },
                Err(err) => {
                    tracing::warn!(peer = %peer_id, error = %err, "could not send the mDNS goodbye; peers will forget us when our records expire");
                }
            }
            if let Err(err) = self.daemon.stop_browse(SERVICE_TYPE) {
                tracing::debug!(peer = %peer_id, error = %err, "could not stop the mDNS browse");
            }
        }

        self.stop.store(true, Ordering::Relaxed);
        stop_daemon(&self.daemon, peer_id);

        if let Some(handle) = self.browse_thread.take() {
            let deadline = Instant::now() + BROWSE_THREAD_JOIN_TIMEOUT;
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if handle.is_finished() {
                if handle.join().is_err() {
                    tracing::warn!(peer = %peer_id, "the mDNS browse thread panicked");
                }
            } else {
                tracing::warn!(peer = %peer_id, "the mDNS browse thread did not stop in time; leaving it");
            }
        }
        tracing::info!(peer = %peer_id, "mDNS discovery stopped");
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        // Without `shutdown` there is no goodbye, but the daemon thread must not outlive us.
        self.close(false);
    }
}

/// Asks the daemon thread to exit and waits briefly for it to confirm.
fn stop_daemon(daemon: &ServiceDaemon, peer_id: &str) {
    match daemon.shutdown() {
        Ok(reply) => {
            if let Err(err) = reply.recv_timeout(DAEMON_REPLY_TIMEOUT) {
                tracing::warn!(peer = %peer_id, error = %err, "mDNS daemon did not confirm its shutdown");
            }
        }
        Err(err) => {
            tracing::debug!(peer = %peer_id, error = %err, "mDNS daemon was already stopped")
        }
    }
}

/// Checks what goes on the wire before handing it to the daemon.
fn validate(config: &DiscoveryConfig) -> anyhow::Result<()> {
    let peer = &config.instance;
    if peer.is_empty() || peer.len() > MAX_LABEL_LEN {
        bail!(
            "{peer:?} cannot be an mDNS instance name: it must be 1 to \
             {MAX_LABEL_LEN} bytes"
        );
    }
    if peer.contains(['.', '\\']) || peer.chars().any(char::is_control) {
        bail!(
            "{peer:?} cannot be an mDNS instance name: it contains '.', '\\' or a \
             control character"
        );
    }
    if TXT_PEER.len() + 1 + config.sealed_peer.len() > usize::from(u8::MAX) {
        bail!("the sealed peer id is too long for an mDNS TXT record");
    }
    // Each TXT string is one length byte plus `key=value`.
    if TXT_MESH.len() + 1 + config.fingerprint.len() > usize::from(u8::MAX) {
        bail!(
            "mesh fingerprint is {} bytes, too long for an mDNS TXT record (at most {}); \
             use a shorter fingerprint",
            config.fingerprint.len(),
            usize::from(u8::MAX) - TXT_MESH.len() - 1
        );
    }
    if config.fingerprint.is_empty() {
        bail!("the mesh fingerprint is empty; a node must belong to a mesh to use discovery");
    }
    Ok(())
}

/// The mDNS host name for our address records: `<first 16 chars of peer id>.local.`,
/// lowercased (DNS names compare case-insensitively anyway).
fn hostname_for(peer_id: &str) -> String {
    let prefix: String = peer_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(HOSTNAME_PEER_CHARS)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("{prefix}.local.")
}

/// The instance label of `fullname` (`<instance>._medmesh._udp.local.`), unescaped;
/// `None` if `fullname` is not of our service type.
fn instance_label(fullname: &str) -> Option<String> {
    let suffix_len = SERVICE_TYPE.len() + 1;
    if fullname.len() <= suffix_len {
        return None;
    }
    let split = fullname.len() - suffix_len;
    let (label, suffix) = (fullname.get(..split)?, fullname.get(split..)?);
    let service = suffix.strip_prefix('.')?;
    if !service.eq_ignore_ascii_case(SERVICE_TYPE) {
        return None;
    }
    let mut out = String::with_capacity(label.len());
    let mut chars = label.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
    Some(out)
}

/// IP addresses plus port, as socket addresses (IPv6 ones keep their scope), sorted.
fn socket_addrs<'a>(ips: impl IntoIterator<Item = &'a ScopedIp>, port: u16) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = ips
        .into_iter()
        .map(|ip| match ip {
            ScopedIp::V6(v6) => {
                let scope = if v6.addr().is_unicast_link_local() {
                    v6.scope_id().index
                } else {
                    0
                };
                SocketAddr::V6(SocketAddrV6::new(*v6.addr(), port, 0, scope))
            }
            other => SocketAddr::new(other.to_ip_addr(), port),
        })
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

/// What a resolved service advertises, in the terms discovery cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Advert {
    /// Lowercased instance full name: the key the daemon uses when it is removed.
    fullname: String,
    peer_id: Option<String>,
    mesh: Option<String>,
    protocol_version: Option<String>,
    addrs: Vec<SocketAddr>,
}

impl Advert {
    fn from_resolved(service: &ResolvedService) -> Advert {
        Advert {
            fullname: service.get_fullname().to_ascii_lowercase(),
            peer_id: service.get_property_val_str(TXT_PEER).map(str::to_owned),
            mesh: service.get_property_val_str(TXT_MESH).map(str::to_owned),
            protocol_version: service
                .get_property_val_str(TXT_PROTOCOL_VERSION)
                .map(str::to_owned),
            addrs: socket_addrs(service.get_addresses(), service.get_port()),
        }
    }
}

/// Why an advert or a removal led to no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ignored {
    Ourselves,
    OtherMesh,
    NoPeerTxt,
    NoAddresses,
    Unchanged,
    NotReported,
    TableFull,
}

/// The peers of our mesh reported so far, keyed by lowercased instance full name.
/// Pure logic: decides which daemon events become [`DiscoveryEvent`]s.
struct PeerTable {
    own_peer_id: String,
    fingerprint: String,
    also_accept: Vec<String>,
    reveal: Reveal,
    reported: HashMap<String, Reported>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Reported {
    peer_id: String,
    addrs: Vec<SocketAddr>,
}

impl PeerTable {
    fn new(own_peer_id: String, fingerprint: String) -> PeerTable {
        PeerTable {
            own_peer_id,
            fingerprint,
            also_accept: Vec::new(),
            reveal: Arc::new(|_, peer| Some(peer.to_owned())),
            reported: HashMap::new(),
        }
    }

    /// A service was resolved (or resolved again).
    fn resolved(&mut self, advert: Advert) -> Result<DiscoveryEvent, Ignored> {
        let Some(sealed) = advert.peer_id else {
            return Err(Ignored::NoPeerTxt);
        };
        let ours = advert
            .mesh
            .as_deref()
            .is_some_and(|m| m == self.fingerprint || self.also_accept.iter().any(|a| a == m));
        let peer_id = if ours {
            advert
                .mesh
                .as_deref()
                .and_then(|m| (self.reveal)(m, &sealed))
        } else {
            None
        };
        if let Some(peer_id) = &peer_id
            && *peer_id == self.own_peer_id
        {
            return Err(Ignored::Ourselves);
        }
        let Some(peer_id) = peer_id else {
            // A node we reported may have moved to another mesh: it is lost to us.
            return match self.reported.remove(&advert.fullname) {
                Some(gone) => Ok(DiscoveryEvent::Lost {
                    peer_id: gone.peer_id,
                }),
                None => Err(Ignored::OtherMesh),
            };
        };
        if advert.addrs.is_empty() {
            return Err(Ignored::NoAddresses);
        }
        let now = Reported {
            peer_id,
            addrs: advert.addrs,
        };
        let table_full = self.reported.len() >= MAX_TRACKED_PEERS;
        match self.reported.entry(advert.fullname) {
            Entry::Occupied(entry) if *entry.get() == now => Err(Ignored::Unchanged),
            Entry::Occupied(mut entry) => {
                entry.insert(now.clone());
                Ok(now.into_found())
            }
            Entry::Vacant(_) if table_full => Err(Ignored::TableFull),
            Entry::Vacant(entry) => {
                entry.insert(now.clone());
                Ok(now.into_found())
            }
        }
    }

    /// A service said goodbye or expired.
    fn removed(&mut self, fullname: &str) -> Result<DiscoveryEvent, Ignored> {
        match self.reported.remove(&fullname.to_ascii_lowercase()) {
            // A node renames its advert every hour: it is lost only when no advert of
            // it is left.
            Some(gone) if self.reported.values().any(|r| r.peer_id == gone.peer_id) => {
                Err(Ignored::Unchanged)
            }
            Some(gone) => Ok(DiscoveryEvent::Lost {
                peer_id: gone.peer_id,
            }),
            None => Err(Ignored::NotReported),
        }
    }
}

impl Reported {
    fn into_found(self) -> DiscoveryEvent {
        DiscoveryEvent::Found {
            peer_id: self.peer_id,
            addrs: self.addrs,
        }
    }
}

/// The browse thread: daemon events in, [`DiscoveryEvent`]s out.
struct BrowseLoop {
    table: PeerTable,
    service_events: Receiver<ServiceEvent>,
    daemon_events: Receiver<DaemonEvent>,
    events: mpsc::Sender<DiscoveryEvent>,
    stop: Arc<AtomicBool>,
}

impl BrowseLoop {
    fn run(mut self) {
        let me = self.table.own_peer_id.clone();
        while !self.stop.load(Ordering::Relaxed) {
            self.drain_daemon_events(&me);
            let event = match self.service_events.recv_timeout(BROWSE_POLL) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    tracing::debug!(peer = %me, "mDNS browse ended: the daemon stopped");
                    break;
                }
            };
            if !self.handle(&me, event) {
                break;
            }
        }
    }

    /// Handles one daemon service event; false when no one listens any more.
    fn handle(&mut self, me: &str, event: ServiceEvent) -> bool {
        let outcome = match event {
            ServiceEvent::ServiceResolved(service) => {
                let advert = Advert::from_resolved(&service);
                let (fullname, mesh, pv) = (
                    advert.fullname.clone(),
                    advert.mesh.clone(),
                    advert.protocol_version.clone(),
                );
                let outcome = self.table.resolved(advert);
                if let Err(reason) = outcome {
                    tracing::debug!(peer = %me, instance = %fullname, ?mesh, ?pv, ?reason, "mDNS advert not reported");
                }
                outcome
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                let outcome = self.table.removed(&fullname);
                if let Err(reason) = outcome {
                    let label = instance_label(&fullname);
                    tracing::debug!(peer = %me, instance = %fullname, ?label, ?reason, "mDNS removal not reported");
                }
                outcome
            }
            ServiceEvent::SearchStopped(_) => return false,
            other => {
                tracing::trace!(peer = %me, event = ?other, "mDNS event");
                return true;
            }
        };
        let Ok(event) = outcome else {
            return true;
        };
        match self.events.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Full(event)) => {
                tracing::debug!(peer = %me, ?event, "discovery events channel full; dropped (mDNS repeats)");
                true
            }
            Err(TrySendError::Closed(_)) => {
                tracing::debug!(peer = %me, "no one listens for discovery events; stopping the browse");
                false
            }
        }
    }

    fn drain_daemon_events(&self, me: &str) {
        for event in self.daemon_events.try_iter() {
            match event {
                DaemonEvent::Error(err) => {
                    tracing::warn!(peer = %me, error = %err, "mDNS daemon error; discovery may miss peers on this network");
                }
                DaemonEvent::IpAdd(ip) => log_ip_change(me, "now used", ip),
                DaemonEvent::IpDel(ip) => log_ip_change(me, "no longer used", ip),
                other => tracing::trace!(peer = %me, event = ?other, "mDNS daemon event"),
            }
        }
    }
}

fn log_ip_change(me: &str, change: &str, ip: IpAddr) {
    tracing::debug!(peer = %me, %ip, change, "mDNS daemon address change");
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "12D3KooWMeMeMeMeMeMeMeMeMeMeMeMeMeMeMeMeMeMeMeMeMeMe";
    const OTHER: &str = "12D3KooWOtherOtherOtherOtherOtherOtherOtherOtherOthe";

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn advert(peer: Option<&str>, mesh: Option<&str>, addrs: &[&str]) -> Advert {
        Advert {
            fullname: format!("{}.{SERVICE_TYPE}", peer.unwrap_or("anon")).to_ascii_lowercase(),
            peer_id: peer.map(str::to_owned),
            mesh: mesh.map(str::to_owned),
            protocol_version: Some("1".into()),
            addrs: addrs.iter().map(|a| addr(a)).collect(),
        }
    }

    fn table() -> PeerTable {
        PeerTable::new(ME.into(), "meshA".into())
    }

    #[test]
    fn instance_label_is_the_peer_id_before_the_service_type() {
        let fullname = format!("{OTHER}.{SERVICE_TYPE}");
        assert_eq!(instance_label(&fullname).as_deref(), Some(OTHER));
        assert_eq!(
            instance_label("x._MEDMESH._UDP.LOCAL.").as_deref(),
            Some("x")
        );
        assert_eq!(
            instance_label(r"a\.b._medmesh._udp.local.").as_deref(),
            Some("a.b")
        );
    }

    #[test]
    fn instance_label_rejects_other_names() {
        assert_eq!(instance_label("x._http._tcp.local."), None);
        assert_eq!(instance_label(SERVICE_TYPE), None);
        assert_eq!(instance_label(&format!(".{SERVICE_TYPE}")), None);
        assert_eq!(instance_label(""), None);
        assert_eq!(instance_label("é._medmesh._udp.local"), None);
    }

    #[test]
    fn hostname_is_a_short_lowercase_peer_prefix() {
        assert_eq!(hostname_for(OTHER), "12d3koowotheroth.local.");
        assert_eq!(hostname_for("ab"), "ab.local.");
    }

    #[test]
    fn same_mesh_is_found_once_until_addresses_change() {
        let mut t = table();
        let first = advert(Some(OTHER), Some("meshA"), &["10.77.0.2:4001"]);
        assert_eq!(
            t.resolved(first.clone()),
            Ok(DiscoveryEvent::Found {
                peer_id: OTHER.into(),
                addrs: vec![addr("10.77.0.2:4001")]
            })
        );
        assert_eq!(t.resolved(first), Err(Ignored::Unchanged));
        let moved = advert(Some(OTHER), Some("meshA"), &["10.77.0.9:4001"]);
        assert!(matches!(
            t.resolved(moved),
            Ok(DiscoveryEvent::Found { .. })
        ));
    }

    #[test]
    fn other_mesh_ourselves_and_incomplete_adverts_are_ignored() {
        let mut t = table();
        let other_mesh = advert(Some(OTHER), Some("meshB"), &["10.77.0.3:4001"]);
        assert_eq!(t.resolved(other_mesh), Err(Ignored::OtherMesh));
        let no_mesh = advert(Some(OTHER), None, &["10.77.0.3:4001"]);
        assert_eq!(t.resolved(no_mesh), Err(Ignored::OtherMesh));
        let me = advert(Some(ME), Some("meshA"), &["10.77.0.1:4001"]);
        assert_eq!(t.resolved(me), Err(Ignored::Ourselves));
        let anon = advert(None, Some("meshA"), &["10.77.0.4:4001"]);
        assert_eq!(t.resolved(anon), Err(Ignored::NoPeerTxt));
        let no_addrs = advert(Some(OTHER), Some("meshA"), &[]);
        assert_eq!(t.resolved(no_addrs), Err(Ignored::NoAddresses));
        assert!(t.reported.is_empty());
    }

    #[test]
    fn lost_only_for_reported_peers_matching_case_insensitively() {
        let mut t = table();
        let fullname = format!("{OTHER}.{SERVICE_TYPE}");
        assert_eq!(t.removed(&fullname), Err(Ignored::NotReported));
        let found = advert(Some(OTHER), Some("meshA"), &["10.77.0.2:4001"]);
        assert!(t.resolved(found).is_ok());
        // The daemon may hand back the name in another case; the peer id keeps its own.
        assert_eq!(
            t.removed(&fullname.to_ascii_uppercase()),
            Ok(DiscoveryEvent::Lost {
                peer_id: OTHER.into()
            })
        );
        assert_eq!(t.removed(&fullname), Err(Ignored::NotReported));
    }

    #[test]
    fn a_peer_moving_to_another_mesh_is_lost() {
        let mut t = table();
        assert!(
            t.resolved(advert(Some(OTHER), Some("meshA"), &["10.77.0.2:4001"]))
                .is_ok()
        );
        assert_eq!(
            t.resolved(advert(Some(OTHER), Some("meshB"), &["10.77.0.2:4001"])),
            Ok(DiscoveryEvent::Lost {
                peer_id: OTHER.into()
            })
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = table();
        for i in 0..MAX_TRACKED_PEERS {
            let peer = format!("peer{i}");
            assert!(
                t.resolved(advert(Some(&peer), Some("meshA"), &["10.0.0.1:1"]))
                    .is_ok()
            );
        }
        let extra = advert(Some("one-too-many"), Some("meshA"), &["10.0.0.1:1"]);
        assert_eq!(t.resolved(extra), Err(Ignored::TableFull));
    }

    #[test]
    fn a_sealed_peer_id_is_revealed_only_with_our_tag() {
        let mut t = table();
        t.reveal = Arc::new(|tag, sealed| (tag == "meshA").then(|| sealed.replace("sealed-", "")));
        let found = t.resolved(advert(Some("sealed-peerB"), Some("meshA"), &["10.0.0.2:1"]));
        assert!(
            matches!(found, Ok(DiscoveryEvent::Found { ref peer_id, .. }) if peer_id == "peerB"),
            "{found:?}"
        );
        // Our own advert, seen sealed, is recognised once opened.
        let own = t.resolved(advert(
            Some(&format!("sealed-{ME}")),
            Some("meshA"),
            &["10.0.0.3:1"],
        ));
        assert_eq!(own, Err(Ignored::Ourselves));
        // An advert whose peer does not open is another mesh's.
        t.reveal = Arc::new(|_, _| None);
        let other = t.resolved(advert(Some("x"), Some("meshA"), &["10.0.0.4:1"]));
        assert_eq!(other, Err(Ignored::OtherMesh));
    }

    #[test]
    fn config_is_checked_before_it_goes_on_the_wire() {
        let check = |peer: &str, mesh: &str| {
            validate(&DiscoveryConfig {
                peer_id: peer.into(),
                instance: peer.into(),
                sealed_peer: "00".repeat(60),
                reveal: Arc::new(|_, p| Some(p.to_owned())),
                fingerprint: mesh.into(),
                also_accept: Vec::new(),
                protocol_version: 1,
                port: 4001,
                interfaces: vec![],
            })
            .is_ok()
        };
        assert!(check(OTHER, "meshA"));
        assert!(!check(&"p".repeat(64), "meshA"));
        assert!(!check("a.b", "meshA"));
        assert!(!check(OTHER, ""));
        assert!(check(OTHER, &"f".repeat(250)));
        assert!(!check(OTHER, &"f".repeat(251)));
    }

    #[test]
    fn socket_addrs_are_sorted_and_keep_the_port() {
        use mdns_sd::{InterfaceId, ScopedIpV4};
        let intf = InterfaceId {
            name: "eth0".into(),
            index: 2,
        };
        let ips = [
            ScopedIp::V4(ScopedIpV4::new(
                "10.77.0.3".parse().expect("ip"),
                intf.clone(),
            )),
            ScopedIp::V4(ScopedIpV4::new("10.77.0.2".parse().expect("ip"), intf)),
        ];
        assert_eq!(
            socket_addrs(&ips, 4001),
            vec![addr("10.77.0.2:4001"), addr("10.77.0.3:4001")]
        );
    }
}
