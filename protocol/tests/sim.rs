//! The deterministic multi-peer harness: 5–20 simulated peers run the sans-IO sync
//! sessions over in-memory links, with seeded random edits, partitions, heals, cut
//! connections (messages in flight dropped), duplicated deliveries and interleavings.
//! At the end every peer must hold identical heads for every document, and every
//! acknowledged local edit must be everywhere.
//!
//! `SIM_SEED=n cargo test -p medmesh-protocol --test sim` replays one seed;
//! `SIM_SEEDS=n` runs that many.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ChangeHash, ReadDoc};
use medmesh_protocol::DocId;
use medmesh_protocol::membership::{Credential, MeshSecret};
use medmesh_protocol::sync::{Cursor, Input, Output, Session, SessionConfig};
use medmesh_protocol::wire::{self, DocPayload, FeedItem, FrameDecoder, Message, WantChanges};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_bytes::ByteBuf;

fn heads_bytes(heads: &[ChangeHash]) -> ByteBuf {
    ByteBuf::from(heads.iter().flat_map(|h| h.0).collect::<Vec<u8>>())
}

fn heads_of(bytes: &[u8]) -> Vec<ChangeHash> {
    wire::split_heads(bytes)
        .unwrap_or_default()
        .into_iter()
        .map(ChangeHash)
        .collect()
}

#[derive(Clone)]
struct Peer {
    name: String,
    actor: ActorId,
    epoch: String,
    docs: BTreeMap<DocId, (String, Automerge)>,
    feed: BTreeMap<u64, DocId>,
    doc_seq: HashMap<DocId, u64>,
    next_seq: u64,
    cursors: HashMap<String, Cursor>,
}

impl Peer {
    fn new(i: usize) -> Self {
        Self {
            name: format!("peer-{i:02}"),
            actor: ActorId::from(vec![i as u8 + 1; 16]),
            epoch: format!("epoch-{i}"),
            docs: BTreeMap::new(),
            feed: BTreeMap::new(),
            doc_seq: HashMap::new(),
            next_seq: 1,
            cursors: HashMap::new(),
        }
    }

    fn head(&self) -> u64 {
        self.next_seq - 1
    }

    fn bump(&mut self, id: DocId) {
        if let Some(old) = self.doc_seq.insert(id, self.next_seq) {
            self.feed.remove(&old);
        }
        self.feed.insert(self.next_seq, id);
        self.next_seq += 1;
    }

    /// A local write; answers the change made.
    fn edit(&mut self, rng: &mut StdRng) -> (DocId, ChangeHash) {
        let existing: Vec<DocId> = self.docs.keys().copied().collect();
        let id = if existing.is_empty() || rng.random_bool(0.3) {
            let id = DocId::from_bytes(rng.random());
            let mut doc = Automerge::new().with_actor(self.actor.clone());
            doc.transact::<_, _, automerge::AutomergeError>(|tx| {
                tx.put(automerge::ROOT, "created_by", self.name.as_str())?;
                Ok(())
            })
            .expect("create");
            self.docs.insert(id, ("patients".into(), doc));
            id
        } else {
            existing[rng.random_range(0..existing.len())]
        };
        let field = ["given_name", "surname", "phone", "camp"][rng.random_range(0..4)];
        let value = format!("{}-{}", self.name, rng.random::<u16>());
        let (_, doc) = self.docs.get_mut(&id).expect("doc");
        doc.set_actor(self.actor.clone());
        let result = doc
            .transact::<_, _, automerge::AutomergeError>(|tx| {
                tx.put(automerge::ROOT, field, value.as_str())?;
                Ok(())
            })
            .expect("edit");
        self.bump(id);
        (id, result.hash.expect("a change"))
    }

    fn read_feed(&self, after: u64, limit: usize) -> (Vec<FeedItem>, u64) {
        let mut last = after;
        let entries = self
            .feed
            .range(after + 1..)
            .take(limit)
            .map(|(seq, id)| {
                last = *seq;
                let (collection, doc) = &self.docs[id];
                FeedItem {
                    seq: *seq,
                    id: *id,
                    collection: collection.clone(),
                    heads: heads_bytes(&doc.get_heads()),
                }
            })
            .collect();
        (entries, last)
    }

    fn check(&self, entries: &[FeedItem]) -> (Vec<DocId>, Vec<WantChanges>) {
        let mut missing = Vec::new();
        let mut behind = Vec::new();
        for entry in entries {
            match self.docs.get(&entry.id) {
                None => missing.push(entry.id),
                Some((_, doc)) => {
                    if heads_of(&entry.heads)
                        .iter()
                        .any(|h| doc.get_change_by_hash(h).is_none())
                    {
                        behind.push(WantChanges {
                            id: entry.id,
                            heads: heads_bytes(&doc.get_heads()),
                        });
                    }
                }
            }
        }
        (missing, behind)
    }

    fn load(&self, whole: &[DocId], changes: &[WantChanges]) -> Vec<DocPayload> {
        let mut out = Vec::new();
        for id in whole {
            if let Some((collection, doc)) = self.docs.get(id) {
                out.push(DocPayload {
                    id: *id,
                    collection: collection.clone(),
                    bytes: ByteBuf::from(doc.save()),
                    heads: heads_bytes(&doc.get_heads()),
                });
            }
        }
        for want in changes {
            if let Some((collection, doc)) = self.docs.get(&want.id) {
                let known: Vec<ChangeHash> = heads_of(&want.heads)
                    .into_iter()
                    .filter(|h| doc.get_change_by_hash(h).is_some())
                    .collect();
                out.push(DocPayload {
                    id: want.id,
                    collection: collection.clone(),
                    bytes: ByteBuf::from(doc.save_after(&known)),
                    heads: heads_bytes(&doc.get_heads()),
                });
            }
        }
        out
    }

    /// Merges documents; answers whether the feed advanced.
    fn store(&mut self, docs: Vec<DocPayload>) -> bool {
        let mut advanced = false;
        for payload in docs {
            let changed = match self.docs.get_mut(&payload.id) {
                Some((_, doc)) => {
                    let before = doc.get_heads();
                    doc.load_incremental(&payload.bytes).expect("merge");
                    doc.get_heads() != before
                }
                None => {
                    let doc = Automerge::load(&payload.bytes).expect("load");
                    self.docs.insert(payload.id, (payload.collection, doc));
                    true
                }
            };
            if changed {
                self.bump(payload.id);
                advanced = true;
            }
        }
        advanced
    }
}

struct Link {
    a: usize,
    b: usize,
    sessions: Option<[Session; 2]>,
    /// Frames in flight: [toward a, toward b].
    queues: [VecDeque<Vec<u8>>; 2],
    decoders: [FrameDecoder; 2],
    blocked: bool,
}

struct Sim {
    rng: StdRng,
    peers: Vec<Peer>,
    links: Vec<Link>,
    secret: MeshSecret,
    now: u64,
    acknowledged: Vec<(DocId, ChangeHash)>,
    connects: u64,
    closes: u64,
    foreign: Option<usize>,
    close_reasons: BTreeMap<String, u64>,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.random_range(5..=20);
        let peers: Vec<Peer> = (0..n).map(Peer::new).collect();
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
        let links = edges
            .into_iter()
            .map(|(a, b)| Link {
                a,
                b,
                sessions: None,
                queues: [VecDeque::new(), VecDeque::new()],
                decoders: [FrameDecoder::new(), FrameDecoder::new()],
                blocked: false,
            })
            .collect();
        Self {
            rng,
            peers,
            links,
            secret: MeshSecret::from_bytes([9; 32]),
            now: 0,
            acknowledged: Vec::new(),
            connects: 0,
            closes: 0,
            foreign: None,
            close_reasons: BTreeMap::new(),
        }
    }

    fn credential_for(&self, peer: usize) -> Credential {
        if self.foreign == Some(peer) {
            Credential::SharedSecret(MeshSecret::from_bytes([66; 32]))
        } else {
            Credential::SharedSecret(self.secret.clone())
        }
    }

    fn connect(&mut self, l: usize) {
        let (a, b) = (self.links[l].a, self.links[l].b);
        let make = |sim: &mut Sim, local: usize, remote: usize| {
            let nonce: [u8; 32] = sim.rng.random();
            Session::new(SessionConfig {
                local_peer: sim.peers[local].name.clone(),
                remote_peer: sim.peers[remote].name.clone(),
                credential: sim.credential_for(local),
                nonce: nonce.to_vec(),
                local_epoch: sim.peers[local].epoch.clone(),
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
        self.connects += 1;
        self.run_outputs(l, 0, out_a);
        self.run_outputs(l, 1, out_b);
    }

    fn cut(&mut self, l: usize) {
        let link = &mut self.links[l];
        if link.sessions.take().is_some() {
            self.closes += 1;
        }
        link.queues = [VecDeque::new(), VecDeque::new()];
    }

    fn peer_of(&self, l: usize, side: usize) -> usize {
        if side == 0 {
            self.links[l].a
        } else {
            self.links[l].b
        }
    }

    /// Runs a session's outputs to completion (storage answers come back at once).
    fn run_outputs(&mut self, l: usize, side: usize, outputs: Vec<Output>) {
        let mut pending: VecDeque<Output> = outputs.into();
        while let Some(output) = pending.pop_front() {
            let peer = self.peer_of(l, side);
            let input = match output {
                Output::Send(message) => {
                    let frame = wire::encode(&message).expect("encode");
                    self.links[l].queues[1 - side].push_back(frame);
                    None
                }
                Output::ReadFeed { after, limit } => {
                    let (entries, last_seq) = self.peers[peer].read_feed(after, limit);
                    Some(Input::FeedRead {
                        entries,
                        last_seq,
                        head: self.peers[peer].head(),
                    })
                }
                Output::CheckDocs { upto, entries } => {
                    let (missing, behind) = self.peers[peer].check(&entries);
                    Some(Input::Checked {
                        upto,
                        missing,
                        behind,
                    })
                }
                Output::LoadDocs {
                    req,
                    whole,
                    changes,
                } => Some(Input::Loaded {
                    req,
                    docs: self.peers[peer].load(&whole, &changes),
                }),
                Output::StoreDocs { req, docs } => {
                    if self.peers[peer].store(docs) {
                        self.notify(peer, Some((l, side)));
                    }
                    Some(Input::Stored { req })
                }
                Output::SaveCursor(cursor) => {
                    let remote = self.peers[self.peer_of(l, 1 - side)].name.clone();
                    self.peers[peer].cursors.insert(remote, cursor);
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
    fn notify(&mut self, peer: usize, except: Option<(usize, usize)>) {
        let seq = self.peers[peer].head();
        for l in 0..self.links.len() {
            for side in 0..2 {
                if self.peer_of(l, side) != peer || except == Some((l, side)) {
                    continue;
                }
                let Some(sessions) = self.links[l].sessions.as_mut() else {
                    continue;
                };
                self.now += 1;
                let out = sessions[side].handle(Input::LocalFeedAdvanced { seq }, self.now);
                self.run_outputs(l, side, out);
            }
        }
        if let Some((l, side)) = except
            && let Some(sessions) = self.links[l].sessions.as_mut()
        {
            // The session that stored learns of the advance too, after its own output.
            self.now += 1;
            let out = sessions[side].handle(Input::LocalFeedAdvanced { seq }, self.now);
            self.run_outputs(l, side, out);
        }
    }

    /// Delivers one frame on a random link that has some; false if none moved.
    fn deliver_one(&mut self, duplicate_chance: f64) -> bool {
        let ready: Vec<(usize, usize)> = (0..self.links.len())
            .flat_map(|l| (0..2).map(move |side| (l, side)))
            .filter(|(l, side)| !self.links[*l].blocked && !self.links[*l].queues[*side].is_empty())
            .collect();
        if ready.is_empty() {
            return false;
        }
        let (l, side) = ready[self.rng.random_range(0..ready.len())];
        let Some(frame) = self.links[l].queues[side].pop_front() else {
            return false;
        };
        let times = if self.rng.random_bool(duplicate_chance) {
            2
        } else {
            1
        };
        for _ in 0..times {
            self.links[l].decoders[side].push(&frame);
            loop {
                let message = match self.links[l].decoders[side].next_message() {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(err) => panic!("a frame the protocol made did not decode: {err}"),
                };
                // Duplicate only what a resent answer could repeat.
                let Some(sessions) = self.links[l].sessions.as_mut() else {
                    return true;
                };
                self.now += 1;
                let out = sessions[side].handle(Input::Message(message), self.now);
                self.run_outputs(l, side, out);
            }
            if times == 2 {
                // Only Docs are idempotent to see twice in a real stream after a resend.
                let decoded = wire::decode_body(&frame[4..]).expect("decode");
                if !matches!(decoded, Message::Docs { .. }) {
                    break;
                }
            }
        }
        true
    }

    fn step(&mut self) {
        let roll: f64 = self.rng.random();
        if roll < 0.15 {
            let p = self.rng.random_range(0..self.peers.len());
            let done = self.peers[p].edit(&mut self.rng);
            self.acknowledged.push(done);
            self.notify(p, None);
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
        } else {
            self.deliver_one(0.05);
        }
    }

    fn quiesce(&mut self) {
        for link in &mut self.links {
            link.blocked = false;
        }
        for _ in 0..50 {
            for l in 0..self.links.len() {
                if self.links[l].sessions.is_none() {
                    self.connect(l);
                }
            }
            let mut moved = 0u64;
            while self.deliver_one(0.0) {
                moved += 1;
                assert!(moved < 5_000_000, "the sessions never went quiet");
            }
            if self.links.iter().all(|l| l.sessions.is_some()) {
                return;
            }
        }
    }
}

fn run(seed: u64) {
    let mut sim = Sim::new(seed);
    let steps = 3_000;
    for _ in 0..steps {
        sim.step();
    }
    sim.quiesce();
    let reference: BTreeMap<DocId, Vec<ChangeHash>> = sim.peers[0]
        .docs
        .iter()
        .map(|(id, (_, doc))| (*id, doc.get_heads()))
        .collect();
    for peer in &sim.peers {
        let heads: BTreeMap<DocId, Vec<ChangeHash>> = peer
            .docs
            .iter()
            .map(|(id, (_, doc))| (*id, doc.get_heads()))
            .collect();
        assert_eq!(
            heads, reference,
            "seed {seed}: {} differs from {}",
            peer.name, sim.peers[0].name
        );
        for (id, change) in &sim.acknowledged {
            let (_, doc) = peer
                .docs
                .get(id)
                .unwrap_or_else(|| panic!("seed {seed}: {} lacks document {id}", peer.name));
            assert!(
                doc.get_change_by_hash(change).is_some(),
                "seed {seed}: {} lacks an acknowledged change",
                peer.name
            );
        }
    }
    assert!(!sim.acknowledged.is_empty());
    assert!(
        sim.close_reasons.is_empty(),
        "seed {seed}: sessions failed: {:?}",
        sim.close_reasons
    );
    println!(
        "seed {seed}: {} peers, {} links, {} documents, {} edits, {} connections, {} cut",
        sim.peers.len(),
        sim.links.len(),
        reference.len(),
        sim.acknowledged.len(),
        sim.connects,
        sim.closes
    );
}

#[test]
fn every_peer_converges_under_partitions_cuts_duplicates_and_reorderings() {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        run(seed);
        return;
    }
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    for seed in 0..seeds {
        run(seed);
    }
}

#[test]
fn a_peer_of_another_mesh_gets_nothing_and_gives_nothing() {
    let mut sim = Sim::new(7);
    sim.foreign = Some(1);
    for _ in 0..5 {
        let done = sim.peers[0].edit(&mut sim.rng);
        sim.acknowledged.push(done);
        let done = sim.peers[1].edit(&mut sim.rng);
        sim.acknowledged.push(done);
    }
    let l = (0..sim.links.len())
        .find(|l| (sim.links[*l].a, sim.links[*l].b) == (0, 1))
        .expect("ring link 0-1");
    sim.connect(l);
    while sim.deliver_one(0.0) {}
    assert!(
        sim.links[l].sessions.is_none(),
        "the session was refused and closed"
    );
    let zero: HashSet<DocId> = sim.peers[0].docs.keys().copied().collect();
    let one: HashSet<DocId> = sim.peers[1].docs.keys().copied().collect();
    assert!(zero.is_disjoint(&one), "no document crossed");
}

#[test]
fn a_replaced_store_is_caught_up_from_zero() {
    let mut sim = Sim::new(11);
    for _ in 0..40 {
        let p = sim.rng.random_range(0..sim.peers.len());
        let done = sim.peers[p].edit(&mut sim.rng);
        sim.acknowledged.push(done);
    }
    sim.quiesce();
    let total = sim.peers[0].docs.len();
    // Peer 2's store is replaced: empty, new epoch, but the others' cursors into its old
    // feed remain.
    let name = sim.peers[2].name.clone();
    sim.peers[2] = Peer::new(2);
    sim.peers[2].name = name;
    sim.peers[2].epoch = "epoch-2-replaced".into();
    for l in 0..sim.links.len() {
        sim.cut(l);
    }
    sim.quiesce();
    assert_eq!(sim.peers[2].docs.len(), total);
}

#[test]
fn a_store_restored_from_an_older_backup_is_not_skipped() {
    let mut sim = Sim::new(5);
    for _ in 0..30 {
        let done = sim.peers[0].edit(&mut sim.rng);
        sim.acknowledged.push(done);
    }
    sim.quiesce();
    // Peer 0 is backed up, writes more (synced to the others), then restored from the
    // backup: same epoch, feed back at an older position. It then writes again.
    let backup = sim.peers[0].clone();
    for _ in 0..20 {
        let done = sim.peers[0].edit(&mut sim.rng);
        sim.acknowledged.push(done);
        sim.notify(0, None);
    }
    sim.quiesce();
    for l in 0..sim.links.len() {
        sim.cut(l);
    }
    sim.peers[0] = backup;
    // A store opened again writes with a new Automerge actor (as medmesh's store does at
    // every open), so its new changes cannot collide with the lost ones others hold.
    sim.peers[0].actor = ActorId::from(vec![0xEE; 16]);
    let mut fresh = Vec::new();
    for _ in 0..5 {
        fresh.push(sim.peers[0].edit(&mut sim.rng));
    }
    sim.quiesce();
    for peer in &sim.peers {
        for (id, change) in sim.acknowledged.iter().chain(&fresh) {
            let (_, doc) = peer.docs.get(id).expect("document everywhere");
            assert!(
                doc.get_change_by_hash(change).is_some(),
                "{} lacks a change",
                peer.name
            );
        }
    }
}
