//! The sync session with one peer, as a state machine without I/O.
//!
//! One [`Session`] runs per connected peer and plays two roles over the one stream:
//!
//! - **puller**: after the handshake it sends `Subscribe` with its stored cursor into the
//!   peer's change feed. For each `Feed` page it asks the node which documents it lacks
//!   ([`Output::CheckDocs`]), sends one `Want` for them (whole documents for the ones it
//!   does not have, changes since its heads for the others), hands the `Docs` to the node
//!   to merge ([`Output::StoreDocs`]), and only when every document of a page is durably
//!   stored advances its cursor ([`Output::SaveCursor`]) and acknowledges the page. An
//!   interrupted sync therefore resumes at the first page not fully stored.
//! - **feeder**: it answers the peer's `Subscribe` by reading its own feed from the
//!   peer's cursor ([`Output::ReadFeed`]) and sending pages, at most [`WINDOW`] pages
//!   ahead of the peer's acknowledgements (backpressure), then keeps sending every later
//!   local change as the feed grows ([`Input::LocalFeedAdvanced`]), so a change crosses
//!   hops. It answers `Want` with the documents ([`Output::LoadDocs`]), split into frames.
//!
//! Documents just received from the peer are not announced back to it (echo
//! suppression), so an initial sync does not send the feed back the other way.
//!
//! The node performs each output and feeds the result back as an input; time is passed
//! in. Nothing here blocks, allocates without bound on a peer's say-so, or panics on what
//! a peer sends: a protocol violation closes the session with [`Output::Close`].

use std::collections::{HashMap, VecDeque};

use serde_bytes::ByteBuf;

use crate::DocId;
use crate::membership::Credential;
use crate::wire::{DocPayload, FeedItem, Hello, Message, Proof, WantChanges};

/// The sync protocol version.
pub const PROTOCOL_VERSION: u16 = 1;
/// Feed entries per page.
pub const PAGE: usize = 512;
/// Pages a feeder sends ahead of the acknowledgements.
pub const WINDOW: usize = 4;
/// Documents of one `Docs` message, in bytes at most (before compression).
pub const DOCS_MESSAGE_BYTES: usize = 256 * 1024;
/// A document larger than this travels in `DocPart`s.
pub const PART_BYTES: usize = 2 * 1024 * 1024;
/// Largest document accepted from a peer.
pub const MAX_DOC_BYTES: u64 = 256 * 1024 * 1024;
/// Echo-suppression entries kept at most.
const ECHO_CAPACITY: usize = 65_536;

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

/// What happened, for the session to act on.
#[derive(Debug, Clone)]
pub enum Input {
    /// A message from the peer.
    Message(Message),
    /// Answer to [`Output::ReadFeed`]: entries after `after`, the position they reach
    /// (`after` itself when there are none), and the newest local position.
    FeedRead {
        /// The entries.
        entries: Vec<FeedItem>,
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
    /// Answer to [`Output::CheckDocs`] for the page reaching `upto`.
    Checked {
        /// The page.
        upto: u64,
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
    },
    /// Answer to [`Output::StoreDocs`]: the documents are durably stored.
    Stored {
        /// The request they answered.
        req: u64,
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
        /// The page.
        upto: u64,
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
    /// Merge and durably store these documents; answer [`Input::Stored`].
    StoreDocs {
        /// The request they answer.
        req: u64,
        /// The documents.
        docs: Vec<DocPayload>,
    },
    /// Store the cursor into the peer's feed (after the documents it covers).
    SaveCursor(Cursor),
    /// The handshake succeeded.
    Established {
        /// The peer's feed epoch.
        remote_epoch: String,
    },
    /// The session is over; close the stream.
    Close {
        /// Why, for the logs and the person at the device.
        reason: String,
    },
}

#[derive(Debug)]
enum Phase {
    AwaitHello,
    AwaitProof { remote_nonce: Vec<u8> },
    Open,
    Closed,
}

#[derive(Debug)]
enum PageState {
    Checking,
    Wanting {
        req: u64,
        answered: bool,
        storing: usize,
    },
    Complete,
}

#[derive(Debug)]
struct Page {
    upto: u64,
    wanted: usize,
    state: PageState,
}

#[derive(Debug)]
struct PartialDoc {
    req: u64,
    id: DocId,
    collection: String,
    total: u64,
    bytes: Vec<u8>,
    heads: ByteBuf,
}

/// The session with one peer (both directions).
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    phase: Phase,
    remote_epoch: String,
    // Puller.
    pages: VecDeque<Page>,
    next_req: u64,
    cursor_seq: u64,
    partial: Option<PartialDoc>,
    caught_up: bool,
    last_synced_ms: Option<u64>,
    /// Heads the peer announced per document: not worth announcing back.
    echo: HashMap<DocId, ByteBuf>,
    // Feeder.
    subscribed: bool,
    after: u64,
    head: Option<u64>,
    reading: bool,
    in_flight: VecDeque<u64>,
    told_caught_up: bool,
    loading: usize,
    acked: u64,
}

impl Session {
    /// A session; call [`Session::start`] for its first outputs.
    pub fn new(config: SessionConfig) -> Self {
        Self {
            config,
            phase: Phase::AwaitHello,
            remote_epoch: String::new(),
            pages: VecDeque::new(),
            next_req: 1,
            cursor_seq: 0,
            partial: None,
            caught_up: false,
            last_synced_ms: None,
            echo: HashMap::new(),
            subscribed: false,
            after: 0,
            head: None,
            reading: false,
            in_flight: VecDeque::new(),
            told_caught_up: false,
            loading: 0,
            acked: 0,
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

    /// Local feed positions the peer has not acknowledged yet.
    pub fn pending_out(&self) -> u64 {
        self.head.unwrap_or(self.acked).saturating_sub(self.acked)
    }

    /// When this node last held everything of the peer's feed (milliseconds).
    pub fn last_synced_ms(&self) -> Option<u64> {
        self.last_synced_ms
    }

    /// What the puller is waiting for, for logs when sync seems stuck.
    pub fn waiting_for(&self) -> String {
        match (&self.phase, self.pages.front()) {
            (Phase::AwaitHello, _) => "the peer's hello".into(),
            (Phase::AwaitProof { .. }, _) => "the peer's proof of membership".into(),
            (Phase::Closed, _) => "nothing (closed)".into(),
            (Phase::Open, None) => "new changes".into(),
            (Phase::Open, Some(page)) => match page.state {
                PageState::Checking => format!("the local check of feed page {}", page.upto),
                PageState::Wanting {
                    req,
                    answered,
                    storing,
                } => format!(
                    "documents of request {req} (all received: {answered}, batches being stored: {storing})"
                ),
                PageState::Complete => "the cursor to be saved".into(),
            },
        }
    }

    /// Handles one input at time `now_ms`; answers what to do.
    pub fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Output> {
        let mut out = Vec::new();
        if self.is_closed() {
            return out;
        }
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
                upto,
                missing,
                behind,
            } => self.on_checked(upto, missing, behind, now_ms, &mut out),
            Input::Loaded { req, docs } => {
                self.loading = self.loading.saturating_sub(1);
                self.send_docs(req, docs, &mut out);
                Ok(())
            }
            Input::Stored { req } => {
                for page in &mut self.pages {
                    if let PageState::Wanting {
                        req: r, storing, ..
                    } = &mut page.state
                        && *r == req
                    {
                        *storing = storing.saturating_sub(1);
                    }
                }
                self.advance(now_ms, &mut out);
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
                self.close(format!("the other device ended the sync: {reason}"), out);
                Ok(())
            }
            (Phase::AwaitHello, Message::Hello(hello)) => self.on_hello(hello, out),
            (Phase::AwaitProof { .. }, Message::Proof(proof)) => self.on_proof(proof, out),
            (Phase::Open, Message::Subscribe { epoch, since }) => {
                self.subscribed = true;
                self.after = if epoch == self.config.local_epoch {
                    since
                } else {
                    0
                };
                self.acked = self.after;
                self.in_flight.clear();
                self.told_caught_up = false;
                self.maybe_read(out);
                Ok(())
            }
            (Phase::Open, Message::Ack { upto }) => {
                self.acked = self.acked.max(upto);
                while self.in_flight.front().is_some_and(|u| *u <= upto) {
                    self.in_flight.pop_front();
                }
                self.maybe_read(out);
                Ok(())
            }
            (
                Phase::Open,
                Message::Want {
                    req,
                    whole,
                    changes,
                },
            ) => {
                if whole.len() + changes.len() > 2 * PAGE {
                    return Err(format!(
                        "asked for {} documents at once, more than allowed",
                        whole.len() + changes.len()
                    ));
                }
                if self.loading >= 2 * WINDOW {
                    return Err("sent requests without waiting for the answers".into());
                }
                self.loading += 1;
                out.push(Output::LoadDocs {
                    req,
                    whole,
                    changes,
                });
                Ok(())
            }
            (Phase::Open, Message::Feed { entries, upto }) => {
                self.on_feed(entries, upto, now_ms, out)
            }
            (Phase::Open, Message::Docs { req, docs, done }) => {
                if self.partial.is_some() {
                    return Err("sent documents in the middle of a split document".into());
                }
                let known = self.mark_answer(req, !docs.is_empty(), done);
                if !docs.is_empty() {
                    self.note_received(&docs);
                    out.push(Output::StoreDocs {
                        req: if known { req } else { 0 },
                        docs,
                    });
                }
                self.advance(now_ms, out);
                Ok(())
            }
            (
                Phase::Open,
                Message::DocPart {
                    req,
                    id,
                    collection,
                    total,
                    bytes,
                    heads,
                },
            ) => self.on_doc_part(
                PartialDoc {
                    req,
                    id,
                    collection,
                    total,
                    bytes: bytes.into_vec(),
                    heads,
                },
                out,
            ),
            (phase, message) => Err(format!(
                "sent {} while the session was {}",
                message_name(&message),
                match phase {
                    Phase::AwaitHello => "waiting for its hello",
                    Phase::AwaitProof { .. } => "waiting for its proof of membership",
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
        let mac = match &self.config.credential {
            Credential::SharedSecret(secret) => secret.prove(
                &self.config.local_peer,
                &self.config.remote_peer,
                &hello.nonce,
                &self.config.nonce,
            ),
        };
        self.remote_epoch = hello.feed_epoch;
        self.phase = Phase::AwaitProof {
            remote_nonce: hello.nonce.into_vec(),
        };
        out.push(Output::Send(Message::Proof(Proof::SharedSecret {
            mac: ByteBuf::from(mac),
        })));
        Ok(())
    }

    fn on_proof(&mut self, proof: Proof, out: &mut Vec<Output>) -> Result<(), String> {
        let Phase::AwaitProof { remote_nonce } = &self.phase else {
            return Err("sent a proof out of turn".into());
        };
        let valid = match (&self.config.credential, &proof) {
            (Credential::SharedSecret(secret), Proof::SharedSecret { mac }) => secret.verify(
                &self.config.remote_peer,
                &self.config.local_peer,
                &self.config.nonce,
                remote_nonce,
                mac,
            ),
        };
        if !valid {
            return Err("could not prove it belongs to this mesh".into());
        }
        self.phase = Phase::Open;
        out.push(Output::Established {
            remote_epoch: self.remote_epoch.clone(),
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
        Ok(())
    }

    // ---- puller ----

    fn on_feed(
        &mut self,
        entries: Vec<FeedItem>,
        upto: u64,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), String> {
        if entries.len() > PAGE {
            return Err(format!(
                "sent a feed page of {} entries, more than {PAGE}",
                entries.len()
            ));
        }
        if self.pages.len() >= 2 * WINDOW {
            return Err("sent feed pages without waiting for acknowledgements".into());
        }
        let last = self.pages.back().map_or(self.cursor_seq, |p| p.upto);
        if upto < last && self.pages.is_empty() {
            // The peer's feed went back within the same epoch (its store was restored
            // from a backup): start over from its beginning, so nothing is skipped.
            self.cursor_seq = 0;
        } else if upto < last {
            return Err("sent a feed page that goes backwards".into());
        }
        if entries
            .iter()
            .any(|e| e.seq > upto || e.heads.len() % 32 != 0 || e.heads.is_empty())
        {
            return Err("sent a malformed feed page".into());
        }
        self.caught_up = entries.len() < PAGE;
        if entries.is_empty() {
            self.pages.push_back(Page {
                upto,
                wanted: 0,
                state: PageState::Complete,
            });
            self.advance(now_ms, out);
            return Ok(());
        }
        if self.echo.len() + entries.len() > ECHO_CAPACITY {
            self.echo.clear();
        }
        for entry in &entries {
            self.echo.insert(entry.id, entry.heads.clone());
        }
        self.pages.push_back(Page {
            upto,
            wanted: 0,
            state: PageState::Checking,
        });
        out.push(Output::CheckDocs { upto, entries });
        Ok(())
    }

    fn on_checked(
        &mut self,
        upto: u64,
        missing: Vec<DocId>,
        behind: Vec<WantChanges>,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), String> {
        let req = self.next_req;
        let Some(page) = self
            .pages
            .iter_mut()
            .find(|p| p.upto == upto && matches!(p.state, PageState::Checking))
        else {
            return Ok(());
        };
        if missing.is_empty() && behind.is_empty() {
            page.state = PageState::Complete;
        } else {
            self.next_req += 1;
            page.wanted = missing.len() + behind.len();
            page.state = PageState::Wanting {
                req,
                answered: false,
                storing: 0,
            };
            out.push(Output::Send(Message::Want {
                req,
                whole: missing,
                changes: behind,
            }));
        }
        self.advance(now_ms, out);
        Ok(())
    }

    /// Notes a `Docs` message for request `req`; false when no page waits for it.
    fn mark_answer(&mut self, req: u64, has_docs: bool, done: bool) -> bool {
        for page in &mut self.pages {
            if let PageState::Wanting {
                req: r,
                answered,
                storing,
            } = &mut page.state
                && *r == req
            {
                if has_docs {
                    *storing += 1;
                }
                if done {
                    *answered = true;
                }
                return true;
            }
        }
        false
    }

    fn note_received(&mut self, docs: &[DocPayload]) {
        for page in &mut self.pages {
            if matches!(page.state, PageState::Wanting { .. }) {
                page.wanted = page.wanted.saturating_sub(docs.len());
                break;
            }
        }
    }

    /// One part of a document too large for a frame (`part.bytes` holds this part).
    fn on_doc_part(&mut self, part: PartialDoc, out: &mut Vec<Output>) -> Result<(), String> {
        let total = part.total;
        if total > MAX_DOC_BYTES {
            return Err(format!(
                "sent a document of {total} bytes, more than allowed"
            ));
        }
        let partial = match &mut self.partial {
            Some(partial) => {
                if partial.req != part.req || partial.id != part.id || partial.total != total {
                    return Err("interleaved the parts of two documents".into());
                }
                if partial.bytes.len() as u64 + part.bytes.len() as u64 > total {
                    return Err("sent more parts than the document has".into());
                }
                partial.bytes.extend_from_slice(&part.bytes);
                partial
            }
            None => {
                if part.bytes.len() as u64 > total {
                    return Err("sent more parts than the document has".into());
                }
                self.partial.insert(part)
            }
        };
        if partial.bytes.len() as u64 == total
            && let Some(done) = self.partial.take()
        {
            let known = self.mark_answer(done.req, true, false);
            let docs = vec![DocPayload {
                id: done.id,
                collection: done.collection,
                bytes: ByteBuf::from(done.bytes),
                heads: done.heads,
            }];
            self.note_received(&docs);
            out.push(Output::StoreDocs {
                req: if known { done.req } else { 0 },
                docs,
            });
        }
        Ok(())
    }

    /// Pops the pages whose documents are all stored; saves the cursor and acknowledges.
    fn advance(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let mut reached = None;
        while let Some(page) = self.pages.front() {
            let complete = match page.state {
                PageState::Complete => true,
                PageState::Wanting {
                    answered, storing, ..
                } => answered && storing == 0,
                PageState::Checking => false,
            };
            if !complete {
                break;
            }
            reached = Some(page.upto);
            self.pages.pop_front();
        }
        if let Some(upto) = reached {
            if upto > self.cursor_seq {
                self.cursor_seq = upto;
                out.push(Output::SaveCursor(Cursor {
                    epoch: self.remote_epoch.clone(),
                    seq: upto,
                }));
            }
            out.push(Output::Send(Message::Ack { upto }));
        }
        if self.caught_up && self.pages.is_empty() {
            self.last_synced_ms = Some(now_ms);
        }
    }

    // ---- feeder ----

    fn maybe_read(&mut self, out: &mut Vec<Output>) {
        if !self.subscribed || self.reading || self.in_flight.len() >= WINDOW {
            return;
        }
        let behind = self.head.is_none_or(|h| h > self.after);
        if behind || !self.told_caught_up {
            self.reading = true;
            out.push(Output::ReadFeed {
                after: self.after,
                limit: PAGE,
            });
        }
    }

    fn on_feed_read(
        &mut self,
        entries: Vec<FeedItem>,
        last_seq: u64,
        head: u64,
        out: &mut Vec<Output>,
    ) {
        self.reading = false;
        self.head = Some(self.head.map_or(head, |h| h.max(head)));
        if !self.subscribed {
            return;
        }
        if head < self.after {
            // The peer's cursor is past the end of this feed: this store was restored
            // from an older copy. Serve the whole feed again rather than skip anything.
            self.after = 0;
            self.acked = 0;
            self.head = Some(head);
            self.told_caught_up = false;
            self.maybe_read(out);
            return;
        }
        let moved = last_seq > self.after;
        let full = entries.len() >= PAGE;
        let entries: Vec<FeedItem> = entries
            .into_iter()
            .filter(|entry| match self.echo.remove(&entry.id) {
                Some(heads) => heads != entry.heads,
                None => true,
            })
            .collect();
        if moved || !self.told_caught_up {
            self.after = self.after.max(last_seq);
            self.in_flight.push_back(self.after);
            self.told_caught_up = !full;
            out.push(Output::Send(Message::Feed {
                entries,
                upto: self.after,
            }));
        }
        self.maybe_read(out);
    }

    fn send_docs(&mut self, req: u64, docs: Vec<DocPayload>, out: &mut Vec<Output>) {
        let mut batch = Vec::new();
        let mut size = 0;
        for doc in docs {
            if doc.bytes.len() > PART_BYTES {
                if !batch.is_empty() {
                    out.push(Output::Send(Message::Docs {
                        req,
                        docs: std::mem::take(&mut batch),
                        done: false,
                    }));
                    size = 0;
                }
                let total = doc.bytes.len() as u64;
                for part in doc.bytes.chunks(PART_BYTES) {
                    out.push(Output::Send(Message::DocPart {
                        req,
                        id: doc.id,
                        collection: doc.collection.clone(),
                        total,
                        bytes: ByteBuf::from(part.to_vec()),
                        heads: doc.heads.clone(),
                    }));
                }
                continue;
            }
            if size + doc.bytes.len() > DOCS_MESSAGE_BYTES && !batch.is_empty() {
                out.push(Output::Send(Message::Docs {
                    req,
                    docs: std::mem::take(&mut batch),
                    done: false,
                }));
                size = 0;
            }
            size += doc.bytes.len() + doc.collection.len() + 24;
            batch.push(doc);
        }
        out.push(Output::Send(Message::Docs {
            req,
            docs: batch,
            done: true,
        }));
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
    }
}

#[cfg(test)]
mod tests;
