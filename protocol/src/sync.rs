//! The sync session with one peer, as a state machine without I/O.
//!
//! One [`Session`] runs per connected peer and plays three roles over the one stream:
//!
//! - **puller** ([`puller`]): after the handshake it sends `Subscribe` with its stored
//!   cursor into the peer's change feed. For each `Feed` page it asks the node which
//!   documents it lacks ([`Output::CheckDocs`]), sends one `Want` for them (whole
//!   documents for the ones it does not have, changes since its heads for the others),
//!   hands the `Docs` to the node to merge ([`Output::StoreDocs`]), and only when every
//!   document of a page is durably stored (or held) advances its cursor
//!   ([`Output::SaveCursor`]) and acknowledges the page. An interrupted sync therefore
//!   resumes at the first page not fully stored. When both sides changed a document
//!   since they last met, the peer cannot tell what this side lacks from its heads; it
//!   says so (`diverged`), and the puller asks again with a summary of every change it
//!   has (an Automerge sync message: heads and a Bloom filter, [`Output::PrepareHave`]),
//!   so that only the changes it lacks cross — never the document's whole history.
//! - **feeder** ([`feeder`]): it answers the peer's `Subscribe` by reading its own feed
//!   from the peer's cursor ([`Output::ReadFeed`]) and sending pages, at most [`WINDOW`]
//!   pages ahead of the peer's acknowledgements (backpressure), then keeps sending every
//!   later local change as the feed grows ([`Input::LocalFeedAdvanced`]), so a change
//!   crosses hops. It answers `Want` with the documents ([`Output::LoadDocs`]), split
//!   into frames.
//! - **anti-entropy** ([`entropy`]): when caught up, at connect and then every
//!   [`ENTROPY_INTERVAL_MS`], the two sides exchange a [`Summary`] of everything they
//!   hold; the buckets that differ are listed document by document and what is missing
//!   is fetched through the same pages as the feed. A bug anywhere in sync can thus not
//!   leave two devices different without it being repaired and logged.
//!   [`Input::Verify`] runs a round on demand and reports whether the two agree.
//!
//! Documents just received from the peer are not announced back to it (echo
//! suppression), so an initial sync does not send the feed back the other way.
//!
//! The node performs each output and feeds the result back as an input; time is passed
//! in. Nothing here blocks, allocates without bound on a peer's say-so, or panics on what
//! a peer sends: a protocol violation closes the session with [`Output::Close`] and a
//! `Refuse` naming it.

mod entropy;
mod feeder;
mod puller;

use std::collections::{HashMap, VecDeque};

use serde_bytes::ByteBuf;

use crate::DocId;
use crate::membership::{Credential, DeviceCert, SignedCert};
use crate::wire::{DocPayload, FeedItem, Hello, Message, Proof, Summary, WantChanges};

use entropy::Entropy;
use puller::{Page, PartialDoc};

/// The sync protocol version. Version 2 added anti-entropy summaries, the `diverged`
/// answer with its Bloom-filter follow-up, and the senders' heads on documents; version 3
/// device certificates; version 4 the signatures of changes; version 5 seals (one
/// signature over many changes).
pub const PROTOCOL_VERSION: u16 = 5;
/// Feed entries per page.
pub const PAGE: usize = 512;
/// Pages a feeder sends ahead of the acknowledgements.
pub const WINDOW: usize = 4;
/// Documents of one `Docs` message, in bytes at most (before compression).
pub const DOCS_MESSAGE_BYTES: usize = 256 * 1024;
/// A document larger than this travels in `DocPart`s.
pub const PART_BYTES: usize = 2 * 1024 * 1024;
/// Largest document accepted from a peer.
pub const MAX_DOC_BYTES: u64 = 64 * 1024 * 1024;
/// How often two connected nodes compare summaries (when idle and caught up).
pub const ENTROPY_INTERVAL_MS: u64 = 60_000;
/// Echo-suppression entries kept at most.
const ECHO_CAPACITY: usize = 65_536;
/// How long the feeder lets the peer's cursor lag behind entries it did not need,
/// before it sends an empty page to move it (so a reconnection does not reread them).
const POSITION_LAG_MS: u64 = 200;

/// A position in a peer's change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The feed's epoch.
    pub epoch: String,
    /// The last position fully stored here.
    pub seq: u64,
}

/// How a session starts.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// This node's peer id.
    pub local_peer: String,
    /// The peer's id, as the transport authenticated it.
    pub remote_peer: String,
    /// Proof of membership.
    pub credential: Credential,
    /// Fresh random bytes: the challenge for the peer.
    pub nonce: Vec<u8>,
    /// This node's feed epoch.
    pub local_epoch: String,
    /// Where this node's copy of the peer's feed stands.
    pub cursor: Option<Cursor>,
}

/// How far an initial sync (or any stretch of catching up) has come: feed positions of
/// the peer, each one document changed there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Progress {
    /// Positions of the peer's feed this node holds, of those below.
    pub received: u64,
    /// Positions of the peer's feed it had told of since the stretch began.
    pub announced: u64,
    /// How long the stretch has lasted (milliseconds).
    pub elapsed_ms: u64,
}

/// What happened, for the session to act on.
#[derive(Debug, Clone)]
pub enum Input {
    /// A message from the peer.
    Message(Message),
    /// Answer to [`Output::ReadFeed`]: entries after `after`, the position they reach
    /// (`after` itself when there are none), and the newest local position.
    FeedRead {
        /// The entries.
        entries: Vec<LocalEntry>,
        /// The position the read reached.
        last_seq: u64,
        /// The newest position of the local feed.
        head: u64,
    },
    /// The local feed reached `seq` (a local write, or documents merged from any peer).
    LocalFeedAdvanced {
        /// The newest position.
        seq: u64,
    },
    /// Answer to [`Output::CheckDocs`] for the page `page`.
    Checked {
        /// The page ([`Output::CheckDocs::page`]).
        page: u64,
        /// Documents not stored here at all.
        missing: Vec<DocId>,
        /// Documents stored here that lack some of the peer's changes, with local heads.
        behind: Vec<WantChanges>,
    },
    /// Answer to [`Output::LoadDocs`].
    Loaded {
        /// The request.
        req: u64,
        /// The documents (whole or changes), in any order.
        docs: Vec<DocPayload>,
        /// Documents asked for by heads this node does not know, without a summary of
        /// the asker's changes: the asker must ask again with one.
        diverged: Vec<DocId>,
    },
    /// Answer to [`Output::PrepareHave`].
    HaveReady {
        /// The request to send.
        req: u64,
        /// The documents with a summary of their changes.
        changes: Vec<WantChanges>,
        /// Documents no longer here (ask for them whole).
        whole: Vec<DocId>,
    },
    /// Answer to [`Output::StoreDocs`]: the documents are durably stored (or held).
    Stored {
        /// The request they answered.
        req: u64,
    },
    /// Answer to [`Output::ComputeSummary`].
    SummaryComputed {
        /// What this node holds.
        summary: Summary,
    },
    /// Answer to [`Output::ReadRange`].
    RangeRead {
        /// The peer's round.
        round: u64,
        /// The bucket.
        bucket: u8,
        /// Documents of the bucket after the asked position.
        entries: Vec<FeedItem>,
        /// More follow.
        more: bool,
    },
    /// Time passed (the node ticks every second or so): starts anti-entropy rounds.
    Tick,
    /// The peers this node has open sessions with now (sent to the peer, so that it
    /// relays to this node only what this node cannot get from its source).
    LocalNeighbors {
        /// Peer ids.
        peers: Vec<String>,
    },
    /// Compare with the peer now; [`Output::Verified`] answers with `token`.
    Verify {
        /// The caller's token.
        token: u64,
    },
}

/// What the node must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send a message to the peer.
    Send(Message),
    /// Read the local feed after `after`, at most `limit` entries; answer
    /// [`Input::FeedRead`].
    ReadFeed {
        /// Position.
        after: u64,
        /// Entries at most.
        limit: usize,
    },
    /// Find which of these documents are missing or behind; answer [`Input::Checked`].
    CheckDocs {
        /// The page (pass it back).
        page: u64,
        /// The peer's entries.
        entries: Vec<FeedItem>,
    },
    /// Load documents for the peer; answer [`Input::Loaded`].
    LoadDocs {
        /// The peer's request.
        req: u64,
        /// Send these whole.
        whole: Vec<DocId>,
        /// Send the changes these lack.
        changes: Vec<WantChanges>,
    },
    /// Summarize every change this node has of these documents (an Automerge sync
    /// message each); answer [`Input::HaveReady`].
    PrepareHave {
        /// The request the answer is for.
        req: u64,
        /// The documents.
        ids: Vec<DocId>,
    },
    /// Merge and durably store these documents; answer [`Input::Stored`].
    StoreDocs {
        /// The request they answer.
        req: u64,
        /// The documents.
        docs: Vec<DocPayload>,
        /// Latest changes sent with announcements: merge those that build on what is
        /// here, drop the others (never hold them); the announcements are checked next.
        tentative: bool,
    },
    /// Store the cursor into the peer's feed (after the documents it covers).
    SaveCursor(Cursor),
    /// Summarize what this node holds; answer [`Input::SummaryComputed`].
    ComputeSummary,
    /// Read the documents of a bucket after `after`, at most `limit`; answer
    /// [`Input::RangeRead`].
    ReadRange {
        /// The peer's round.
        round: u64,
        /// The bucket.
        bucket: u8,
        /// Continue after this document.
        after: Option<DocId>,
        /// Entries at most.
        limit: usize,
    },
    /// An anti-entropy round of this side ended.
    RoundDone(RoundReport),
    /// Answer to [`Input::Verify`].
    Verified {
        /// The caller's token.
        token: u64,
        /// What the round found.
        report: RoundReport,
    },
    /// The handshake succeeded.
    Established {
        /// The peer's feed epoch.
        remote_epoch: String,
        /// The peer's certificate, checked.
        device: Box<DeviceCert>,
    },
    /// The session is over; close the stream.
    Close {
        /// Why, for the logs and the person at the device.
        reason: String,
    },
}

/// One entry of the local feed, with the peer whose copy of the document this node's
/// version is (when it came unchanged from one): a peer connected to that one too gets
/// it from there, and is not sent it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEntry {
    /// The entry.
    pub item: FeedItem,
    /// The peer the document's current version came from, if it came whole from one.
    pub origin: Option<String>,
}

impl From<FeedItem> for LocalEntry {
    fn from(item: FeedItem) -> Self {
        Self { item, origin: None }
    }
}

/// What an anti-entropy round found, from this side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Buckets whose summaries differed.
    pub differing_buckets: usize,
    /// Documents of those buckets compared one by one.
    pub compared: u64,
    /// Documents this side lacked (or lacked changes of) and asked for.
    pub fetched: u64,
    /// Documents this node holds (summary count).
    pub local_count: u64,
    /// Documents the peer holds (summary count).
    pub remote_count: u64,
}

#[derive(Debug)]
enum Phase {
    AwaitHello,
    AwaitProof,
    Open,
    Closed,
}

/// The session with one peer (all roles).
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    phase: Phase,
    remote_epoch: String,
    // Puller.
    pages: VecDeque<Page>,
    next_page: u64,
    next_req: u64,
    cursor_seq: u64,
    /// The newest position of the peer's feed it has told of.
    remote_head: u64,
    /// Where this copy of the peer's feed stood, and when, as the current stretch of
    /// catching up began (for [`Session::progress`]).
    progress_base: Option<(u64, u64)>,
    partial: Option<PartialDoc>,
    caught_up: bool,
    last_synced_ms: Option<u64>,
    /// Heads the peer announced per document: not worth announcing back.
    echo: HashMap<DocId, ByteBuf>,
    /// Heads this side announced per document in this session: with the peer's own, a
    /// version made of both (a merge) is not worth announcing either.
    announced: HashMap<DocId, ByteBuf>,
    /// The feed position the peer was last sent a page up to.
    sent_upto: u64,
    /// When the feeder last passed entries the peer did not need without a page.
    skipped_at: Option<u64>,
    /// The time of the input being handled (ms).
    clock: u64,
    /// When the handshake succeeded (ms).
    opened_ms: u64,
    /// Requests asked with a summary of our changes (a repeat `diverged` takes whole).
    have_reqs: Vec<u64>,
    /// Requests whose documents are being stored, and their page.
    storing_reqs: HashMap<u64, u64>,
    // Feeder.
    subscribed: bool,
    after: u64,
    head: Option<u64>,
    reading: bool,
    in_flight: VecDeque<u64>,
    told_caught_up: bool,
    loading: usize,
    acked: u64,
    /// The peer's open sessions, as it last said.
    remote_neighbors: std::collections::HashSet<String>,
    /// Our open sessions, as last told to the peer.
    local_neighbors: Vec<String>,
    // Anti-entropy.
    entropy: Entropy,
}

impl Session {
    /// A session; call [`Session::start`] for its first outputs.
    pub fn new(config: SessionConfig) -> Self {
        Self {
            config,
            phase: Phase::AwaitHello,
            remote_epoch: String::new(),
            pages: VecDeque::new(),
            next_page: 1,
            next_req: 1,
            cursor_seq: 0,
            remote_head: 0,
            progress_base: None,
            partial: None,
            caught_up: false,
            last_synced_ms: None,
            echo: HashMap::new(),
            announced: HashMap::new(),
            sent_upto: 0,
            skipped_at: None,
            clock: 0,
            opened_ms: 0,
            have_reqs: Vec::new(),
            storing_reqs: HashMap::new(),
            subscribed: false,
            after: 0,
            head: None,
            reading: false,
            in_flight: VecDeque::new(),
            told_caught_up: false,
            loading: 0,
            acked: 0,
            remote_neighbors: std::collections::HashSet::new(),
            local_neighbors: Vec::new(),
            entropy: Entropy::default(),
        }
    }

    /// The opening message.
    pub fn start(&mut self) -> Vec<Output> {
        vec![Output::Send(Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            mesh: self.config.credential.fingerprint(),
            nonce: ByteBuf::from(self.config.nonce.clone()),
            feed_epoch: self.config.local_epoch.clone(),
        }))]
    }

    /// The peer this session is with.
    pub fn remote_peer(&self) -> &str {
        &self.config.remote_peer
    }

    /// True once the handshake succeeded and until the session closes.
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open)
    }

    /// True when the session is over.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Documents requested from the peer and not stored yet.
    pub fn pending_in(&self) -> usize {
        self.pages.iter().map(|p| p.wanted).sum()
    }

    /// How far this node has come in taking the peer's feed, while it is behind it.
    pub fn progress(&self) -> Option<Progress> {
        let (base, since_ms) = self.progress_base?;
        // Level with the peer, or told so by it: a peer that overstated its head does
        // not keep a progress bar up.
        if self.remote_head <= self.cursor_seq || (self.caught_up && self.pages.is_empty()) {
            return None;
        }
        Some(Progress {
            received: self.cursor_seq.saturating_sub(base),
            announced: self.remote_head.saturating_sub(base),
            elapsed_ms: self.clock.saturating_sub(since_ms),
        })
    }

    /// A feed page told the peer's newest position: a stretch of catching up begins when
    /// this copy was level with the peer's feed.
    fn note_progress(&mut self, upto: u64, head: u64, now_ms: u64) {
        let head = head.max(upto);
        let level =
            self.remote_head <= self.cursor_seq || (self.caught_up && self.pages.is_empty());
        if self.progress_base.is_none() || level {
            self.progress_base = Some((self.cursor_seq, now_ms));
            self.remote_head = head;
        } else {
            self.remote_head = self.remote_head.max(head);
        }
    }

    /// Local feed positions the peer has not acknowledged yet.
    pub fn pending_out(&self) -> u64 {
        self.head.unwrap_or(self.acked).saturating_sub(self.acked)
    }

    /// How far the peer confirmed it durably holds this node's feed (what it was sent of
    /// it).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// When this node last held everything of the peer's feed (milliseconds).
    pub fn last_synced_ms(&self) -> Option<u64> {
        self.last_synced_ms
    }

    /// The last anti-entropy round's report, and when it ended.
    pub fn last_round(&self) -> Option<(&RoundReport, u64)> {
        self.entropy.last_report()
    }

    /// What the puller is waiting for, for logs when sync seems stuck.
    pub fn waiting_for(&self) -> String {
        match (&self.phase, self.pages.front()) {
            (Phase::AwaitHello, _) => "the peer's hello".into(),
            (Phase::AwaitProof, _) => "the peer's proof of membership".into(),
            (Phase::Closed, _) => "nothing (closed)".into(),
            (Phase::Open, None) => "new changes".into(),
            (Phase::Open, Some(page)) => page.waiting_for(),
        }
    }

    /// Handles one input at time `now_ms`; answers what to do.
    pub fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Output> {
        let mut out = Vec::new();
        if self.is_closed() {
            return out;
        }
        self.clock = now_ms;
        let result = match input {
            Input::Message(message) => self.on_message(message, now_ms, &mut out),
            Input::FeedRead {
                entries,
                last_seq,
                head,
            } => {
                self.on_feed_read(entries, last_seq, head, &mut out);
                Ok(())
            }
            Input::LocalFeedAdvanced { seq } => {
                self.head = Some(self.head.map_or(seq, |h| h.max(seq)));
                self.maybe_read(&mut out);
                Ok(())
            }
            Input::Checked {
                page,
                missing,
                behind,
            } => {
                self.on_checked(page, missing, behind, now_ms, &mut out);
                Ok(())
            }
            Input::Loaded {
                req,
                docs,
                diverged,
            } => {
                self.loading = self.loading.saturating_sub(1);
                self.send_docs(req, docs, diverged, &mut out);
                Ok(())
            }
            Input::HaveReady {
                req,
                changes,
                whole,
            } => {
                out.push(Output::Send(Message::Want {
                    req,
                    whole,
                    changes,
                }));
                Ok(())
            }
            Input::Stored { req } => {
                self.on_stored(req, now_ms, &mut out);
                Ok(())
            }
            Input::SummaryComputed { summary } => {
                self.on_summary_computed(summary, now_ms, &mut out);
                Ok(())
            }
            Input::RangeRead {
                round,
                bucket,
                entries,
                more,
            } => {
                self.entropy.reading_range = false;
                out.push(Output::Send(Message::Range {
                    round,
                    bucket,
                    entries,
                    more,
                }));
                Ok(())
            }
            Input::Tick => {
                self.maybe_start_round(now_ms, &mut out);
                self.maybe_send_position(now_ms, &mut out);
                Ok(())
            }
            Input::LocalNeighbors { mut peers } => {
                peers.retain(|p| *p != self.config.remote_peer);
                peers.sort();
                peers.truncate(crate::wire::MAX_NEIGHBORS);
                if peers != self.local_neighbors {
                    self.local_neighbors = peers.clone();
                    if self.is_open() {
                        out.push(Output::Send(Message::Neighbors { peers }));
                    }
                }
                Ok(())
            }
            Input::Verify { token } => {
                self.verify(token, now_ms, &mut out);
                Ok(())
            }
        };
        if let Err(reason) = result {
            out.push(Output::Send(Message::Refuse {
                reason: reason.clone(),
            }));
            self.close(reason, &mut out);
        }
        out
    }

    fn close(&mut self, reason: String, out: &mut Vec<Output>) {
        self.phase = Phase::Closed;
        out.push(Output::Close { reason });
    }

    fn on_message(
        &mut self,
        message: Message,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), String> {
        match (&self.phase, message) {
            (_, Message::Refuse { reason }) => {
                let reason: String = reason.chars().take(500).collect();
                self.close(format!("the other device ended the sync: {reason}"), out);
                Ok(())
            }
            (Phase::AwaitHello, Message::Hello(hello)) => self.on_hello(hello, out),
            (Phase::AwaitProof, Message::Proof(proof)) => self.on_proof(proof, out),
            (Phase::Open, Message::Subscribe { epoch, since }) => {
                self.on_subscribe(epoch, since, out);
                Ok(())
            }
            (Phase::Open, Message::Ack { upto }) => {
                self.on_ack(upto, out);
                Ok(())
            }
            (Phase::Open, Message::Neighbors { peers }) => {
                if peers.len() > crate::wire::MAX_NEIGHBORS || peers.iter().any(|p| p.len() > 128) {
                    return Err("sent a malformed list of its neighbors".into());
                }
                self.remote_neighbors = peers.into_iter().collect();
                Ok(())
            }
            (
                Phase::Open,
                Message::Want {
                    req,
                    whole,
                    changes,
                },
            ) => self.on_want(req, whole, changes, out),
            (
                Phase::Open,
                Message::Feed {
                    entries,
                    upto,
                    more,
                    head,
                },
            ) => {
                self.note_progress(upto, head, now_ms);
                self.on_feed(entries, upto, more, now_ms, out)
            }
            (
                Phase::Open,
                Message::Docs {
                    req,
                    docs,
                    done,
                    diverged,
                },
            ) => self.on_docs(req, docs, done, diverged, now_ms, out),
            (
                Phase::Open,
                Message::DocPart {
                    req,
                    id,
                    collection,
                    total,
                    bytes,
                    heads,
                    sigs,
                },
            ) => self.on_doc_part(
                PartialDoc {
                    req,
                    id,
                    collection,
                    total,
                    sigs: sigs.into_vec(),
                    bytes: bytes.into_vec(),
                    heads,
                },
                now_ms,
                out,
            ),
            (
                Phase::Open,
                Message::Summary {
                    round,
                    summary,
                    reply,
                },
            ) => self.on_summary(round, summary, reply, now_ms, out),
            (
                Phase::Open,
                Message::WantRange {
                    round,
                    bucket,
                    after,
                },
            ) => self.on_want_range(round, bucket, after, out),
            (
                Phase::Open,
                Message::Range {
                    round,
                    bucket,
                    entries,
                    more,
                },
            ) => self.on_range(round, bucket, entries, more, now_ms, out),
            (phase, message) => Err(format!(
                "sent {} while the session was {}",
                message_name(&message),
                match phase {
                    Phase::AwaitHello => "waiting for its hello",
                    Phase::AwaitProof => "waiting for its proof of membership",
                    Phase::Open => "open",
                    Phase::Closed => "closed",
                }
            )),
        }
    }

    fn on_hello(&mut self, hello: Hello, out: &mut Vec<Output>) -> Result<(), String> {
        if hello.version != PROTOCOL_VERSION {
            return Err(format!(
                "speaks sync protocol version {}, this device speaks {PROTOCOL_VERSION}; update medmesh on both",
                hello.version
            ));
        }
        if hello.mesh != self.config.credential.fingerprint() {
            return Err(
                "belongs to another mesh; join it with an invite from one of its devices".into(),
            );
        }
        if hello.nonce.len() < 16 || hello.nonce.len() > 64 {
            return Err("sent a malformed challenge".into());
        }
        if hello.feed_epoch.len() > 64 {
            return Err("sent a malformed feed epoch".into());
        }
        self.remote_epoch = hello.feed_epoch;
        self.phase = Phase::AwaitProof;
        out.push(Output::Send(Message::Proof(Proof::Certificate {
            cert: ByteBuf::from(self.config.credential.cert.to_bytes()),
        })));
        Ok(())
    }

    fn on_proof(&mut self, proof: Proof, out: &mut Vec<Output>) -> Result<(), String> {
        let Phase::AwaitProof = &self.phase else {
            return Err("sent a proof out of turn".into());
        };
        let Proof::Certificate { cert } = proof;
        let credential = &self.config.credential;
        let device = SignedCert::from_bytes(&cert)
            .and_then(|cert| {
                credential.root.check_cert(
                    &cert,
                    &self.config.remote_peer,
                    i64::try_from(self.clock).unwrap_or(i64::MAX),
                    |peer| credential.revoked.contains(peer),
                )
            })
            .map_err(|err| format!("could not prove it belongs to this mesh: {err}"))?;
        self.phase = Phase::Open;
        self.opened_ms = self.clock;
        out.push(Output::Established {
            remote_epoch: self.remote_epoch.clone(),
            device: Box::new(device),
        });
        let since = match &self.config.cursor {
            Some(cursor) if cursor.epoch == self.remote_epoch => cursor.seq,
            _ => 0,
        };
        self.cursor_seq = since;
        out.push(Output::Send(Message::Subscribe {
            epoch: self.remote_epoch.clone(),
            since,
        }));
        if !self.local_neighbors.is_empty() {
            out.push(Output::Send(Message::Neighbors {
                peers: self.local_neighbors.clone(),
            }));
        }
        Ok(())
    }
}

fn message_name(message: &Message) -> &'static str {
    match message {
        Message::Hello(_) => "a hello",
        Message::Proof(_) => "a proof",
        Message::Refuse { .. } => "a refusal",
        Message::Subscribe { .. } => "a subscription",
        Message::Feed { .. } => "a feed page",
        Message::Want { .. } => "a request",
        Message::Docs { .. } => "documents",
        Message::DocPart { .. } => "part of a document",
        Message::Ack { .. } => "an acknowledgement",
        Message::Neighbors { .. } => "its neighbors",
        Message::Summary { .. } => "a summary",
        Message::WantRange { .. } => "a request for a summary bucket",
        Message::Range { .. } => "the documents of a summary bucket",
    }
}

#[cfg(test)]
mod tests;
