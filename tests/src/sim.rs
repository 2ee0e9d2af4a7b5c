//! The deterministic multi-peer simulator: 5–30 peers run the sans-IO sync sessions over
//! in-memory links, each on the **real store** (redb on an in-memory backend), with
//! seeded random edits (concurrent ones on the same records included), partitions,
//! heals, cut connections (messages in flight dropped), duplicated deliveries, damaged
//! documents in flight, storage results that come back late and out of order, and schema
//! drift (a collection declared on one peer only; the others store its records before
//! they know it).
//!
//! [`Sim::quiesce`] heals everything and lets the sessions run (anti-entropy rounds
//! included) until quiet; the tests then check that every peer holds exactly the same
//! documents at the same heads (their anti-entropy summaries are equal) and every
//! acknowledged change everywhere.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use automerge::{ChangeHash, ReadDoc};
use medmesh_protocol::membership::{Credential, DeviceCert, DeviceKind, OwnerKey};
use medmesh_protocol::record::Fields;
use medmesh_protocol::scope::Scope;
use medmesh_protocol::sync::{Cursor, Input, Output, RoundReport, Session, SessionConfig};
use medmesh_protocol::wire::{self, FrameDecoder, Message, Summary};
use medmesh_protocol::{ChangeAuthor, DocId, Schema};
use medmesh_storage::{Store, WriteBatch, WriteKind, WriteOp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// The collection one peer declares and the others learn through the mesh.
pub const LAB: &str = r#"{"collections": [{"name": "lab_reports", "fields": [
    {"name": "patient_id", "type": "id", "index": "exact"},
    {"name": "test_name", "type": "string", "index": "prefix"}]}]}"#;

pub use medmesh_storage::MemoryDisk;

/// Every device of the simulated mesh may write (none is revoked).
struct Members;

impl medmesh_protocol::authorship::Authority for Members {
    fn check_signer(&self, _: &[u8; 32], _: i64) -> Result<(), String> {
        Ok(())
    }
}

/// A store on `disk`, with the simulator's schema, signing as device `n` and checking the
/// signatures of what it receives, as a node's store does.
pub fn open_disk(disk: &MemoryDisk, n: usize) -> Store {
    let disk = disk.clone();
    let options = medmesh_storage::StoreOptions {
        authority: Some(std::sync::Arc::new(Members)),
        ..Default::default()
    };
    let store = Store::with_backend(move || disk.clone(), Schema::hikma(), options)
        .expect("a store on the memory disk");
    let mut key = [0; 32];
    key[..8].copy_from_slice(&(n as u64 + 1).to_le_bytes());
    store.sign_as_blocking(&key).expect("signing");
    store
}

fn obj(value: Value) -> Fields {
    value.as_object().cloned().unwrap_or_default()
}

/// One simulated device.
pub struct SimPeer {
    /// Its name (peer id in sessions).
    pub name: String,
    /// Its store.
    pub store: Store,
    /// The disk under the store.
    pub disk: MemoryDisk,
    /// Its cursors into the others' feeds.
    pub cursors: HashMap<String, Cursor>,
    /// The clinics it serves (its certificate's).
    pub scope: Scope,
}

impl SimPeer {
    fn new(i: usize) -> Self {
        let disk = MemoryDisk::new();
        Self {
            name: format!("peer-{i:02}"),
            store: open_disk(&disk, i),
            disk,
            cursors: HashMap::new(),
            scope: Scope::all(),
        }
    }

    /// The author of this peer's writes.
    pub fn author(&self) -> ChangeAuthor {
        ChangeAuthor {
            device: self.name.clone(),
            user: None,
        }
    }

    fn head(&self) -> u64 {
        self.store.last_seq().expect("feed")
    }

    /// The heads of a record after a write (the change just made is among them).
    pub fn heads_of(&self, collection: &str, id: &DocId) -> Vec<ChangeHash> {
        self.store
            .document(collection, id)
            .map(|d| d.get_heads())
            .unwrap_or_default()
    }
}

/// A connection between two peers.
pub struct Link {
    /// One end.
    pub a: usize,
    /// The other end.
    pub b: usize,
    sessions: Option<[Session; 2]>,
    /// Frames in flight: [toward a, toward b].
    queues: [VecDeque<Vec<u8>>; 2],
    decoders: [FrameDecoder; 2],
    /// Stored answers not yet given to the session: [a's, b's].
    late: [Vec<u64>; 2],
    /// The seals each side's session has sent.
    seals_sent: [medmesh_storage::SealsSent; 2],
    /// Down (a partition): no connection.
    pub blocked: bool,
}

/// Which of a peer's writes were acknowledged: its collection, record and change.
pub type Acknowledged = (String, DocId, ChangeHash);

/// The simulation.
pub struct Sim {
    /// Its randomness (all of it comes from the seed).
    pub rng: StdRng,
    /// The devices.
    pub peers: Vec<SimPeer>,
    /// The connections.
    pub links: Vec<Link>,
    owner: OwnerKey,
    /// Simulated time, ms.
    pub now: u64,
    /// Every acknowledged write.
    pub acknowledged: Vec<Acknowledged>,
    /// Records created, per collection.
    pub records: Vec<(String, DocId)>,
    /// Connections opened and cut.
    pub connects: u64,
    /// Sessions closed.
    pub closes: u64,
    /// A peer of another mesh, if any.
    pub foreign: Option<usize>,
    /// Why sessions closed (none should, but for cuts).
    pub close_reasons: BTreeMap<String, u64>,
    /// Chance that a document in flight is damaged.
    pub damage: f64,
    /// Documents damaged in flight.
    pub damaged: u64,
    /// Documents held by receivers (damaged, or not mergeable).
    pub held: u64,
    /// Bytes delivered to each peer.
    pub received_bytes: Vec<u64>,
    /// Bytes delivered, by kind of message.
    pub bytes_by_kind: BTreeMap<&'static str, u64>,
    /// Anti-entropy rounds that fetched documents, and how many.
    pub repairs: u64,
    /// Reports of verify rounds, per (link, side).
    pub verified: Vec<RoundReport>,
    /// The clinics of a mesh whose devices serve some of them ([`Sim::scoped`]); empty:
    /// every device serves all, and records name no clinic.
    pub clinics: Vec<String>,
}

impl Sim {
    /// A mesh of 5–20 peers on a ring plus random chords.
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.random_range(5..=20);
        let mut edges = HashSet::new();
        for i in 0..n {
            edges.insert((i, (i + 1) % n));
        }
        for _ in 0..rng.random_range(0..n) {
            let a = rng.random_range(0..n);
            let b = rng.random_range(0..n);
            if a != b && !edges.contains(&(b, a)) {
                edges.insert((a, b));
            }
        }
        let mut edges: Vec<(usize, usize)> = edges.into_iter().collect();
        edges.sort();
        Self::with_edges(rng, n, edges)
    }

    /// Every pair of `n` peers connected.
    pub fn full_mesh(seed: u64, n: usize) -> Self {
        let rng = StdRng::seed_from_u64(seed);
        let edges = (0..n)
            .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
            .collect();
        Self::with_edges(rng, n, edges)
    }

    fn with_edges(rng: StdRng, n: usize, edges: Vec<(usize, usize)>) -> Self {
        let peers: Vec<SimPeer> = (0..n).map(SimPeer::new).collect();
        let links = edges
            .into_iter()
            .map(|(a, b)| Link {
                a,
                b,
                sessions: None,
                queues: [VecDeque::new(), VecDeque::new()],
                decoders: [FrameDecoder::new(), FrameDecoder::new()],
                late: [Vec::new(), Vec::new()],
                seals_sent: Default::default(),
                blocked: false,
            })
            .collect();
        Self {
            rng,
            peers,
            links,
            owner: OwnerKey::from_seed([9; 32]),
            now: 1_000_000,
            acknowledged: Vec::new(),
            records: Vec::new(),
            connects: 0,
            closes: 0,
            foreign: None,
            close_reasons: BTreeMap::new(),
            damage: 0.0,
            damaged: 0,
            held: 0,
            received_bytes: vec![0; n],
            bytes_by_kind: BTreeMap::new(),
            repairs: 0,
            verified: Vec::new(),
            clinics: Vec::new(),
        }
    }

    /// A mesh of `clinics` clinics: peer 0 serves all of them and is linked to every
    /// other peer (so that every record has a way to every device that serves it); the
    /// others serve all (a quarter of them) or one or two clinics. Edits then write
    /// patients of the writer's clinics, visits (some at other clinics, which bring the
    /// patient there), events, stock movements and transfers between clinics.
    pub fn scoped(seed: u64, clinics: usize) -> Self {
        let mut sim = Self::new(seed);
        sim.clinics = (0..clinics).map(|c| format!("clinic-{c}")).collect();
        let n = sim.peers.len();
        for b in 1..n {
            if !sim
                .links
                .iter()
                .any(|l| (l.a, l.b) == (0, b) || (l.a, l.b) == (b, 0))
            {
                sim.links.push(Link {
                    a: 0,
                    b,
                    sessions: None,
                    queues: [VecDeque::new(), VecDeque::new()],
                    decoders: [FrameDecoder::new(), FrameDecoder::new()],
                    late: [Vec::new(), Vec::new()],
                    seals_sent: Default::default(),
                    blocked: false,
                });
            }
        }
        for p in 1..n {
            let scope = if sim.rng.random_bool(0.25) {
                Scope::all()
            } else {
                let take = sim.rng.random_range(1..=2.min(clinics));
                let mut mine = Vec::new();
                while mine.len() < take {
                    let c = sim.clinics[sim.rng.random_range(0..clinics)].clone();
                    if !mine.contains(&c) {
                        mine.push(c);
                    }
                }
                Scope::of_clinics(&mine)
            };
            sim.peers[p]
                .store
                .set_scope_blocking(scope.clone())
                .expect("scope");
            sim.peers[p].scope = scope;
        }
        sim
    }

    fn credential_for(&self, peer: usize) -> Credential {
        let owner = if self.foreign == Some(peer) {
            OwnerKey::from_seed([66; 32])
        } else {
            self.owner.clone()
        };
        let name = &self.peers[peer].name;
        let mut cert = DeviceCert::new(name, name, DeviceKind::Tablet, 0);
        cert.clinics = self.peers[peer]
            .scope
            .clinics()
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default();
        Credential {
            root: owner.root(),
            cert: owner.issue(cert).expect("a certificate"),
            revoked: Default::default(),
        }
    }

    /// Declares the lab collection on one peer (schema drift: the others learn it
    /// through the mesh).
    pub fn declare_lab(&mut self, peer: usize) {
        let store = &self.peers[peer].store;
        let declarations = store
            .schema()
            .declarations_of_file(LAB, "lab.json")
            .expect("valid");
        store
            .declare_schema_blocking(&declarations, self.peers[peer].author())
            .expect("declare");
        self.notify(peer, None);
    }

    /// Opens the sessions of link `l`.
    pub fn connect(&mut self, l: usize) {
        let (a, b) = (self.links[l].a, self.links[l].b);
        let make = |sim: &mut Sim, local: usize, remote: usize| {
            let nonce: [u8; 32] = sim.rng.random();
            Session::new(SessionConfig {
                local_peer: sim.peers[local].name.clone(),
                remote_peer: sim.peers[remote].name.clone(),
                credential: sim.credential_for(local),
                nonce: nonce.to_vec(),
                local_epoch: sim.peers[local].store.info().feed_epoch.clone(),
                cursor: sim.peers[local]
                    .cursors
                    .get(&sim.peers[remote].name)
                    .cloned(),
            })
        };
        let mut sa = make(self, a, b);
        let mut sb = make(self, b, a);
        let out_a = sa.start();
        let out_b = sb.start();
        let link = &mut self.links[l];
        link.sessions = Some([sa, sb]);
        link.queues = [VecDeque::new(), VecDeque::new()];
        link.decoders = [FrameDecoder::new(), FrameDecoder::new()];
        link.late = [Vec::new(), Vec::new()];
        link.seals_sent = Default::default();
        self.connects += 1;
        self.run_outputs(l, 0, out_a);
        self.run_outputs(l, 1, out_b);
        self.tell_neighbors(a);
        self.tell_neighbors(b);
    }

    /// Tells every session of `peer` which peers it has sessions with now.
    fn tell_neighbors(&mut self, peer: usize) {
        let mut peers = Vec::new();
        for link in &self.links {
            if link.sessions.is_some() && (link.a == peer || link.b == peer) {
                let other = if link.a == peer { link.b } else { link.a };
                peers.push(self.peers[other].name.clone());
            }
        }
        for l in 0..self.links.len() {
            for side in 0..2 {
                if self.peer_of(l, side) == peer {
                    self.tell(
                        l,
                        side,
                        Input::LocalNeighbors {
                            peers: peers.clone(),
                        },
                    );
                }
            }
        }
    }

    /// Cuts link `l`: its sessions end, what was in flight is lost.
    pub fn cut(&mut self, l: usize) {
        let link = &mut self.links[l];
        let was_open = link.sessions.take().is_some();
        link.queues = [VecDeque::new(), VecDeque::new()];
        link.late = [Vec::new(), Vec::new()];
        link.seals_sent = Default::default();
        if was_open {
            self.closes += 1;
            let (a, b) = (link.a, link.b);
            self.tell_neighbors(a);
            self.tell_neighbors(b);
        }
    }

    fn peer_of(&self, l: usize, side: usize) -> usize {
        if side == 0 {
            self.links[l].a
        } else {
            self.links[l].b
        }
    }

    /// Runs a session's outputs, answering storage work from its peer's store.
    fn run_outputs(&mut self, l: usize, side: usize, outputs: Vec<Output>) {
        let mut pending: VecDeque<Output> = outputs.into();
        while let Some(output) = pending.pop_front() {
            let peer = self.peer_of(l, side);
            let store = self.peers[peer].store.clone();
            let remote_scope = self.peers[self.peer_of(l, 1 - side)].scope.clone();
            let shared = self.peers[peer].scope.intersect(&remote_scope);
            let input = match output {
                Output::Send(mut message) => {
                    store.seals_for_send(&mut message, &mut self.links[l].seals_sent[side]);
                    let frame = wire::encode(&message).expect("encode");
                    self.links[l].queues[1 - side].push_back(frame);
                    None
                }
                Output::ReadFeed { after, limit } => {
                    let (entries, last_seq) = store
                        .local_feed_page(after, limit, &remote_scope)
                        .expect("feed");
                    Some(Input::FeedRead {
                        entries,
                        last_seq,
                        head: self.peers[peer].head().max(last_seq),
                    })
                }
                Output::CheckDocs { page, entries } => {
                    let remote = self.peers[self.peer_of(l, 1 - side)].name.clone();
                    let before = self.peers[peer].head();
                    let (missing, behind) = store
                        .check_docs_from(&remote, &entries, &remote_scope)
                        .expect("check");
                    // Records offered again moved to the head of the feed.
                    if self.peers[peer].head() != before {
                        self.notify(peer, Some((l, side)));
                    }
                    Some(Input::Checked {
                        page,
                        missing,
                        behind,
                    })
                }
                Output::LoadDocs {
                    req,
                    whole,
                    changes,
                } => {
                    let (docs, diverged) = store
                        .load_for_peer_diverged(&whole, &changes, &remote_scope)
                        .expect("load");
                    Some(Input::Loaded {
                        req,
                        docs,
                        diverged,
                    })
                }
                Output::PrepareHave { req, ids } => {
                    let (changes, whole) = store.prepare_have(&ids).expect("have");
                    Some(Input::HaveReady {
                        req,
                        changes,
                        whole,
                    })
                }
                Output::StoreDocs {
                    req,
                    docs,
                    tentative,
                } => {
                    let before = self.peers[peer].head();
                    let from = self.peers[self.peer_of(l, 1 - side)].name.clone();
                    let ops = docs
                        .into_iter()
                        .map(|doc| WriteOp::received(doc, Some(from.clone()), tentative))
                        .collect();
                    let results = store
                        .write_blocking(WriteBatch { ops, atomic: false })
                        .expect("store documents");
                    for result in results {
                        let outcome = result.expect("every document stored or held");
                        if outcome.held.is_some() {
                            self.held += 1;
                        }
                    }
                    if self.peers[peer].head() != before {
                        self.notify(peer, Some((l, side)));
                    }
                    if self.rng.random_bool(0.3) {
                        // The answer comes later, maybe after others.
                        self.links[l].late[side].push(req);
                        None
                    } else {
                        Some(Input::Stored { req })
                    }
                }
                Output::SaveCursor(cursor) => {
                    let remote = self.peers[self.peer_of(l, 1 - side)].name.clone();
                    self.peers[peer].cursors.insert(remote, cursor);
                    None
                }
                Output::ComputeSummary => Some(Input::SummaryComputed {
                    summary: store.summary_for(&shared).expect("summary"),
                }),
                Output::ReadRange {
                    round,
                    bucket,
                    after,
                    limit,
                } => {
                    let (entries, more) = store
                        .read_range(bucket, after, limit, &shared)
                        .expect("range");
                    Some(Input::RangeRead {
                        round,
                        bucket,
                        entries,
                        more,
                    })
                }
                Output::RoundDone(report) => {
                    if report.fetched > 0 {
                        self.repairs += report.fetched;
                    }
                    None
                }
                Output::Verified { report, .. } => {
                    self.verified.push(report);
                    None
                }
                Output::Established { .. } => None,
                Output::Close { reason } => {
                    *self.close_reasons.entry(reason).or_default() += 1;
                    self.cut(l);
                    return;
                }
            };
            if let Some(input) = input {
                let Some(sessions) = self.links[l].sessions.as_mut() else {
                    return;
                };
                self.now += 1;
                pending.extend(sessions[side].handle(input, self.now));
            }
        }
    }

    /// Tells every open session of `peer` that its feed advanced.
    pub fn notify(&mut self, peer: usize, except: Option<(usize, usize)>) {
        let seq = self.peers[peer].head();
        for l in 0..self.links.len() {
            for side in 0..2 {
                if self.peer_of(l, side) != peer || except == Some((l, side)) {
                    continue;
                }
                self.tell(l, side, Input::LocalFeedAdvanced { seq });
            }
        }
        if let Some((l, side)) = except {
            self.tell(l, side, Input::LocalFeedAdvanced { seq });
        }
    }

    /// Gives one input to one side of a link.
    pub fn tell(&mut self, l: usize, side: usize, input: Input) {
        let Some(sessions) = self.links[l].sessions.as_mut() else {
            return;
        };
        self.now += 1;
        let out = sessions[side].handle(input, self.now);
        self.run_outputs(l, side, out);
    }

    /// Delivers one frame (or one late storage answer) somewhere; false if nothing
    /// moved.
    pub fn deliver_one(&mut self, duplicate_chance: f64) -> bool {
        let late: Vec<(usize, usize)> = (0..self.links.len())
            .flat_map(|l| (0..2).map(move |side| (l, side)))
            .filter(|(l, side)| !self.links[*l].late[*side].is_empty())
            .collect();
        let ready: Vec<(usize, usize)> = (0..self.links.len())
            .flat_map(|l| (0..2).map(move |side| (l, side)))
            .filter(|(l, side)| !self.links[*l].blocked && !self.links[*l].queues[*side].is_empty())
            .collect();
        if ready.is_empty() && late.is_empty() {
            return false;
        }
        if !late.is_empty() && (ready.is_empty() || self.rng.random_bool(0.2)) {
            let (l, side) = late[self.rng.random_range(0..late.len())];
            let reqs = &mut self.links[l].late[side];
            let req = reqs.remove(self.rng.random_range(0..reqs.len()));
            self.tell(l, side, Input::Stored { req });
            return true;
        }
        let (l, side) = ready[self.rng.random_range(0..ready.len())];
        let Some(frame) = self.links[l].queues[side].pop_front() else {
            return false;
        };
        let peer = self.peer_of(l, side);
        self.received_bytes[peer] += frame.len() as u64;
        if let Ok(message) = wire::decode_body(&frame[4..]) {
            *self.bytes_by_kind.entry(kind_of(&message)).or_default() += frame.len() as u64;
        }
        let times = if self.rng.random_bool(duplicate_chance) {
            2
        } else {
            1
        };
        for round in 0..times {
            self.links[l].decoders[side].push(&frame);
            loop {
                let mut message = match self.links[l].decoders[side].next_message() {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(err) => panic!("a frame the protocol made did not decode: {err}"),
                };
                if round == 1 && !matches!(message, Message::Docs { done: false, .. }) {
                    // Only documents within an answer are worth seeing twice (merging is
                    // idempotent); a stream never repeats the end of an answer.
                    continue;
                }
                if let Message::Docs { docs, .. } = &mut message
                    && let Some(doc) = docs.first_mut()
                    && self.damage > 0.0
                    && self.rng.random_bool(self.damage)
                    && doc.bytes.len() > 16
                {
                    let at = self.rng.random_range(8..doc.bytes.len());
                    doc.bytes[at] ^= 0x5a;
                    self.damaged += 1;
                }
                if let Message::Feed { entries, .. } = &mut message
                    && let Some(payload) = entries.first_mut().and_then(|e| e.payload.as_mut())
                    && self.damage > 0.0
                    && self.rng.random_bool(self.damage)
                    && payload.len() > 16
                {
                    let at = self.rng.random_range(8..payload.len());
                    payload[at] ^= 0x5a;
                    self.damaged += 1;
                }
                self.tell(l, side, Input::Message(message));
            }
        }
        true
    }

    /// One random event.
    pub fn step(&mut self) {
        let roll: f64 = self.rng.random();
        if roll < 0.15 {
            let p = self.rng.random_range(0..self.peers.len());
            self.edit(p);
        } else if roll < 0.17 {
            let l = self.rng.random_range(0..self.links.len());
            self.cut(l);
        } else if roll < 0.22 {
            let l = self.rng.random_range(0..self.links.len());
            if self.links[l].sessions.is_none() && !self.links[l].blocked {
                self.connect(l);
            }
        } else if roll < 0.23 {
            // A partition: a random set of links goes down.
            for l in 0..self.links.len() {
                if self.rng.random_bool(0.4) {
                    self.links[l].blocked = true;
                    self.cut(l);
                }
            }
        } else if roll < 0.25 {
            for link in &mut self.links {
                link.blocked = false;
            }
        } else if roll < 0.26 {
            self.now += 30_000;
            self.tick_all();
        } else {
            self.deliver_one(0.05);
        }
    }

    /// A write on peer `p`: a new patient or lab report, or an edit of a record it has
    /// (often one others edit too).
    pub fn edit(&mut self, p: usize) {
        if !self.clinics.is_empty() {
            return self.edit_scoped(p);
        }
        let knows_lab = self.peers[p]
            .store
            .schema()
            .collection("lab_reports")
            .is_some();
        let existing: Vec<(String, DocId)> = self
            .records
            .iter()
            .filter(|(c, id)| self.peers[p].store.exists(c, id).unwrap_or(false))
            .cloned()
            .collect();
        let author = self.peers[p].author();
        let value = format!("{}-{}", self.peers[p].name, self.rng.random::<u16>());
        let (collection, op) = if existing.is_empty() || self.rng.random_bool(0.3) {
            let lab = knows_lab && self.rng.random_bool(0.3);
            let collection = if lab { "lab_reports" } else { "patients" };
            let fields = if lab {
                json!({"test_name": value})
            } else {
                json!({"given_name": value})
            };
            let Value::Object(fields) = fields else {
                return;
            };
            (
                collection.to_owned(),
                WriteOp::new(collection, None, WriteKind::Create(fields), author),
            )
        } else {
            // Recent records are edited most, so that devices edit the same ones.
            let pick = existing.len() - 1 - self.rng.random_range(0..existing.len().min(4));
            let (collection, id) = existing[pick].clone();
            let field = if collection == "lab_reports" {
                ["test_name", "result"][self.rng.random_range(0..2)]
            } else {
                ["given_name", "surname", "phone", "camp"][self.rng.random_range(0..4)]
            };
            let mut fields = Fields::new();
            fields.insert(field.into(), Value::String(value));
            let op = WriteOp::new(&collection, Some(id), WriteKind::Patch(fields), author);
            (collection, op)
        };
        let outcome = self.peers[p]
            .store
            .write_blocking(WriteBatch::one(op))
            .expect("write")
            .remove(0)
            .expect("accepted");
        if !self.records.iter().any(|(_, id)| *id == outcome.id) {
            self.records.push((collection.clone(), outcome.id));
        }
        if outcome.changed {
            for head in self.peers[p].heads_of(&collection, &outcome.id) {
                self.acknowledged
                    .push((collection.clone(), outcome.id, head));
            }
        }
        self.notify(p, None);
    }

    /// A clinic peer `p` serves, at random.
    fn clinic_of(&mut self, p: usize) -> String {
        let mine: Vec<String> = self
            .clinics
            .iter()
            .filter(|c| self.peers[p].scope.serves(c))
            .cloned()
            .collect();
        mine[self.rng.random_range(0..mine.len())].clone()
    }

    /// A write of a scoped mesh on peer `p` (see [`Sim::scoped`]).
    fn edit_scoped(&mut self, p: usize) {
        let patients: Vec<DocId> = self
            .records
            .iter()
            .filter(|(c, id)| c == "patients" && self.peers[p].store.exists(c, id).unwrap_or(false))
            .map(|(_, id)| *id)
            .collect();
        let author = self.peers[p].author();
        let roll: f64 = self.rng.random();
        let value = format!("{}-{}", self.peers[p].name, self.rng.random::<u16>());
        let (collection, kind, id) = if patients.is_empty() || roll < 0.25 {
            let clinic = self.clinic_of(p);
            (
                "patients",
                WriteKind::Create(obj(
                    json!({"given_name": value, "primary_clinic_id": clinic}),
                )),
                None,
            )
        } else {
            let patient = patients[self.rng.random_range(0..patients.len())];
            if roll < 0.35 {
                // Seen at another clinic now and then (wide devices only write there).
                let clinic = if self.peers[p].scope.is_all() {
                    self.clinics[self.rng.random_range(0..self.clinics.len())].clone()
                } else {
                    self.clinic_of(p)
                };
                (
                    "visits",
                    WriteKind::Create(obj(
                        json!({"patient_id": patient.to_string(), "clinic_id": clinic}),
                    )),
                    None,
                )
            } else if roll < 0.55 {
                (
                    "events",
                    WriteKind::Create(obj(
                        json!({"patient_id": patient.to_string(), "form_data": value}),
                    )),
                    None,
                )
            } else if roll < 0.65 {
                let clinic = self.clinic_of(p);
                (
                    "inventory_transactions",
                    WriteKind::Create(obj(
                        json!({"clinic_id": clinic, "stock_item_id": DocId::new_v7().to_string(), "transaction_type": "restock", "quantity_change": 5}),
                    )),
                    None,
                )
            } else if roll < 0.7 && self.peers[p].scope.is_all() {
                let clinic = self.clinics[self.rng.random_range(0..self.clinics.len())].clone();
                (
                    "patients",
                    WriteKind::Patch(obj(json!({"primary_clinic_id": clinic}))),
                    Some(patient),
                )
            } else {
                (
                    "patients",
                    WriteKind::Patch(obj(json!({"surname": value}))),
                    Some(patient),
                )
            }
        };
        let op = WriteOp::new(collection, id, kind, author);
        let outcome = self.peers[p]
            .store
            .write_blocking(WriteBatch::one(op))
            .expect("write")
            .remove(0)
            .expect("accepted");
        if !self.records.iter().any(|(_, id)| *id == outcome.id) {
            self.records.push((collection.to_owned(), outcome.id));
        }
        if outcome.changed {
            for head in self.peers[p].heads_of(collection, &outcome.id) {
                self.acknowledged
                    .push((collection.to_owned(), outcome.id, head));
            }
        }
        self.notify(p, None);
    }

    /// Every open session is told that time passed.
    pub fn tick_all(&mut self) {
        for l in 0..self.links.len() {
            for side in 0..2 {
                self.tell(l, side, Input::Tick);
            }
        }
    }

    /// Heals every partition, stops damaging documents, and runs until nothing moves
    /// and a round of anti-entropy on every link finds nothing to fetch.
    pub fn quiesce(&mut self) {
        for link in &mut self.links {
            link.blocked = false;
        }
        self.damage = 0.0;
        for _ in 0..50 {
            for l in 0..self.links.len() {
                if self.links[l].sessions.is_none() {
                    self.connect(l);
                }
            }
            self.drain();
            // A minute passes: every caught-up pair compares summaries.
            let repairs = self.repairs;
            self.now += 61_000;
            self.tick_all();
            self.drain();
            if self.links.iter().all(|l| l.sessions.is_some()) && self.repairs == repairs {
                return;
            }
        }
    }

    /// Delivers everything in flight.
    pub fn drain(&mut self) {
        let mut moved = 0u64;
        while self.deliver_one(0.0) {
            moved += 1;
            assert!(moved < 5_000_000, "the sessions never went quiet");
        }
    }

    /// Runs a verify round on both sides of every link; answers the reports.
    pub fn verify_all(&mut self) -> Vec<RoundReport> {
        self.verified.clear();
        for l in 0..self.links.len() {
            for side in 0..2 {
                self.tell(l, side, Input::Verify { token: l as u64 });
                self.drain();
            }
        }
        std::mem::take(&mut self.verified)
    }

    /// Each peer's summary of what it holds.
    pub fn summaries(&self) -> Vec<Summary> {
        self.peers
            .iter()
            .map(|p| p.store.summary().expect("summary"))
            .collect()
    }

    /// For a scoped mesh: panics unless every peer holds exactly what peer 0 (which
    /// serves all clinics) holds of its clinics, at the same versions, with every
    /// acknowledged change of them; and, once each has purged what left its scope
    /// (peer 0 confirming it holds everything), nothing of other clinics.
    pub fn check_scoped(&self, seed: u64) {
        let wide = &self.peers[0].store;
        for peer in &self.peers {
            let scope = &peer.scope;
            let theirs = peer.store.summary_for(scope).expect("summary");
            let reference = wide.summary_for(scope).expect("summary");
            assert_eq!(
                theirs.differing(&reference),
                Vec::<u8>::new(),
                "seed {seed}: {} ({}; {} documents) differs from peer 0 ({} documents of those clinics)",
                peer.name,
                scope.describe(),
                theirs.count,
                reference.count
            );
            for (collection, id, change) in &self.acknowledged {
                if !wide.in_scope(id, scope).expect("scope") {
                    continue;
                }
                let doc = peer.store.document(collection, id).unwrap_or_else(|e| {
                    panic!(
                        "seed {seed}: {} cannot read {collection} {id}: {e}",
                        peer.name
                    )
                });
                assert!(
                    !doc.get_missing_deps(&[*change]).contains(change),
                    "seed {seed}: {} lacks an acknowledged change of {id}",
                    peer.name
                );
            }
            if scope.is_all() {
                continue;
            }
            let wide_name = &self.peers[0].name;
            peer.store
                .update_peer_blocking(
                    wide_name,
                    medmesh_storage::PeerUpdate::Clinics { clinics: vec![] },
                )
                .expect("clinics");
            peer.store
                .update_peer_blocking(
                    wide_name,
                    medmesh_storage::PeerUpdate::Acked {
                        epoch: peer.store.info().feed_epoch.clone(),
                        seq: peer.store.last_seq().expect("seq"),
                    },
                )
                .expect("acked");
            let report = peer.store.purge_blocking().expect("purge");
            assert_eq!(report.kept, 0, "seed {seed}: {}: {report:?}", peer.name);
            for entry in peer.store.changes_since(0, usize::MAX).expect("feed") {
                let view = entry.record.expect("readable");
                assert!(
                    peer.store.in_scope(&view.id, scope).expect("scope"),
                    "seed {seed}: {} ({}) holds {} {} of other clinics",
                    peer.name,
                    scope.describe(),
                    view.collection,
                    view.id
                );
            }
        }
    }

    /// Panics unless every peer holds every acknowledged change, and all hold the same.
    pub fn check_converged(&self, seed: u64) {
        let summaries = self.summaries();
        for (peer, summary) in self.peers.iter().zip(&summaries) {
            assert_eq!(
                summary.differing(&summaries[0]),
                Vec::<u8>::new(),
                "seed {seed}: {} ({} documents) differs from {} ({} documents)",
                peer.name,
                summary.count,
                self.peers[0].name,
                summaries[0].count
            );
            for (collection, id, change) in &self.acknowledged {
                let doc = peer.store.document(collection, id).unwrap_or_else(|e| {
                    panic!(
                        "seed {seed}: {} cannot read {collection} {id}: {e}",
                        peer.name
                    )
                });
                assert!(
                    !doc.get_missing_deps(&[*change]).contains(change),
                    "seed {seed}: {} lacks an acknowledged change of {id}",
                    peer.name
                );
            }
            let (list, held) = peer.store.held(10).expect("held");
            assert_eq!(
                held, 0,
                "seed {seed}: {} still holds documents: {list:?}",
                peer.name
            );
        }
    }
}

/// A message's kind, for byte counts.
fn kind_of(message: &Message) -> &'static str {
    match message {
        Message::Hello(_) => "hello",
        Message::Proof(_) => "proof",
        Message::Refuse { .. } => "refuse",
        Message::Subscribe { .. } => "subscribe",
        Message::Feed { .. } => "feed",
        Message::Want { .. } => "want",
        Message::Docs { .. } => "docs",
        Message::DocPart { .. } => "doc part",
        Message::Ack { .. } => "ack",
        Message::Neighbors { .. } => "neighbors",
        Message::Summary { .. } => "summary",
        Message::WantRange { .. } => "want range",
        Message::Range { .. } => "range",
        _ => "other",
    }
}

/// What [`fanout`] measured.
#[derive(Debug, Clone)]
pub struct FanoutReport {
    /// Peers, all connected to all.
    pub peers: usize,
    /// Changes made (one at a time, each delivered before the next).
    pub changes: usize,
    /// The average size of a change (its Automerge bytes).
    pub change_bytes: f64,
    /// Bytes each node received per change, on average.
    pub bytes_per_change_per_node: f64,
}

/// A full mesh of `peers`: after every node holds some records, `changes` edits are
/// made one at a time on rotating nodes; answers what each node received per change.
/// Panics unless every change reached every node.
pub fn fanout(peers: usize, changes: usize, seed: u64) -> FanoutReport {
    let mut sim = Sim::full_mesh(seed, peers);
    for l in 0..sim.links.len() {
        sim.connect(l);
    }
    for p in 0..peers {
        sim.edit(p);
    }
    sim.quiesce();
    let before: u64 = sim.received_bytes.iter().sum();
    let mut change_bytes = 0usize;
    for i in 0..changes {
        let p = i % peers;
        let seq = sim.peers[p].store.last_seq().expect("seq");
        // An edit of a record that every node has (not a new one).
        let (collection, id) = sim.records[i % sim.records.len()].clone();
        let mut fields = Fields::new();
        fields.insert(
            "phone".into(),
            Value::String(format!("+234 803 555 {i:04}")),
        );
        let op = WriteOp::new(
            &collection,
            Some(id),
            WriteKind::Patch(fields),
            sim.peers[p].author(),
        );
        sim.peers[p]
            .store
            .write_blocking(WriteBatch::one(op))
            .expect("write")
            .remove(0)
            .expect("accepted");
        for head in sim.peers[p].heads_of(&collection, &id) {
            sim.acknowledged.push((collection.clone(), id, head));
        }
        for entry in sim.peers[p].store.changes_since(seq, 10).expect("changes") {
            if let Ok(view) = entry.record {
                let doc = sim.peers[p]
                    .store
                    .document(&view.collection, &view.id)
                    .expect("doc");
                for head in doc.get_heads() {
                    if let Some(change) = doc.get_change_by_hash(&head) {
                        change_bytes += change.raw_bytes().len();
                    }
                }
            }
        }
        sim.notify(p, None);
        sim.drain();
    }
    let received: u64 = sim.received_bytes.iter().sum::<u64>() - before;
    sim.check_converged(seed);
    FanoutReport {
        peers,
        changes,
        change_bytes: change_bytes as f64 / changes as f64,
        bytes_per_change_per_node: received as f64 / peers as f64 / changes as f64,
    }
}
