//! The writer thread: the only place that writes to the database.
//!
//! Commands arrive on a bounded channel. The thread takes every command already waiting
//! (up to [`MAX_COMMANDS_PER_COMMIT`]), applies them all in one redb write transaction and
//! commits it durably before answering any of them: group commit, so the commit delay is
//! bounded by one transaction and concurrent writers share an fsync. When idle it compacts
//! documents whose change chunks have piled up.
//!
//! Each record write is worked out in memory first (load the document, validate, apply
//! one Automerge change); only then are its bytes, metadata, feed position and index
//! entries written. A refused write therefore changes nothing, and a failed commit drops
//! the loaded documents so that memory never holds what the disk does not.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::num::NonZeroUsize;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ChangeHash, ROOT, ReadDoc};
use lru::LruCache;
use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::schema::{index_value, schema_doc_id};
use medmesh_protocol::{CollectionSpec, DocId, RecordError, Schema, SchemaError};
use redb::{Durability, ReadableDatabase, ReadableTable, Table, WriteTransaction};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::error::{Result, StoreError};
use crate::journal::{self, Journal};
use crate::meta::{self, DocMeta, doc_key, index_key, updated_value};
use crate::prepare::{Prepared, actor_from_hex, commit_options, prepare_create};
use crate::signing::{self, Author, AuthorCell};
use crate::slot::DbSlot;
use crate::store::{StoreInfo, StoreOptions, load_from_tables};
use crate::tables::{
    CHUNKS, COUNTS, DOC_META, DOCS, FEED, HELD, INDEX, INFO, LOCAL, PATIENT_DOCS, PEERS, PLACES,
    PURGED, SEALS, SIGS,
};
use crate::working::{CACHEABLE_BATCH, Staged, Working};
use crate::write::{PeerRecord, PeerUpdate, WriteBatch, WriteKind, WriteOp, WriteOutcome};
use medmesh_protocol::authorship::{Authority, KeyCache, actor_key};

/// The schema in force: the built-in collections and the mesh's declarations. Written
/// only by the writer (when the schema document changes), read by everyone.
pub(crate) type SchemaCell = RwLock<Arc<Schema>>;

/// Batches with at least this many creates have their documents worked out by the
/// caller's thread, so that two cores share an import.
pub(crate) const PREPARE_OFF_WRITER: usize = 8;
/// Commands that may wait for the writer.
pub(crate) const WRITE_QUEUE_CAPACITY: usize = 1024;
/// Commands applied in one transaction at most.
const MAX_COMMANDS_PER_COMMIT: usize = 256;
/// Idle time after which the writer compacts.
const IDLE_BEFORE_COMPACTION: Duration = Duration::from_millis(200);
/// A document with this many times the compaction threshold in chunks is compacted as
/// part of its next write.
const INLINE_COMPACTION_FACTOR: u32 = 4;
/// Documents compacted per transaction.
const COMPACTIONS_PER_COMMIT: usize = 256;

type WriteReply = oneshot::Sender<Result<Vec<Result<WriteOutcome>>>>;

pub(crate) enum Command {
    Write {
        batch: WriteBatch,
        /// Creates already worked out by the caller, aligned with the batch's writes.
        prepared: Vec<Option<Prepared>>,
        reply: WriteReply,
    },
    PutInfo {
        key: String,
        value: Vec<u8>,
        reply: oneshot::Sender<Result<()>>,
    },
    UpdatePeer {
        key: String,
        update: PeerUpdate,
        reply: oneshot::Sender<Result<()>>,
    },
    PutLocal {
        entries: Vec<(String, Option<Vec<u8>>)>,
        reply: oneshot::Sender<Result<()>>,
    },
    CompactAll {
        reply: oneshot::Sender<Result<usize>>,
    },
    CompactFile {
        reply: oneshot::Sender<Result<bool>>,
    },
    Checkpoint {
        reply: oneshot::Sender<Result<()>>,
    },
    RetryHeld {
        reply: oneshot::Sender<Result<usize>>,
    },
    Evict {
        id: DocId,
    },
    SignAs {
        author: Arc<Author>,
        reply: oneshot::Sender<Result<()>>,
    },
    SetScope {
        scope: medmesh_protocol::scope::Scope,
        reply: oneshot::Sender<Result<()>>,
    },
    Purge {
        reply: oneshot::Sender<Result<crate::scope::PurgeReport>>,
    },
    Shutdown,
}

pub(crate) struct Writer {
    pub(crate) db: Arc<DbSlot>,
    /// Tells subscribers the newest feed position after each commit.
    feed: tokio::sync::watch::Sender<u64>,
    /// A write failed at the storage level: reopen the database before the next one.
    needs_reopen: bool,
    /// The schema in force (this writer is its only writer).
    pub(crate) schema: Arc<SchemaCell>,
    /// The built-in collections (and those of a local schema file kept from older
    /// versions), to which the mesh's declarations are added.
    pub(crate) base_schema: Arc<Schema>,
    pub(crate) actor: ActorId,
    pub(crate) cache: LruCache<DocId, Automerge>,
    pub(crate) next_seq: u64,
    compact_after: u32,
    pub(crate) to_compact: BTreeSet<DocId>,
    /// Documents whose merge made Automerge fail: held on arrival from now on.
    pub(crate) poisoned: HashSet<DocId>,
    /// The schema document changed in the transaction being written.
    pub(crate) schema_touched: bool,
    /// Held documents are to be retried when the writer is next idle.
    pub(crate) retry_due: bool,
    /// Documents received in the transaction being written: who sent them, at which
    /// heads (published to [`Origins`] when it commits).
    pub(crate) arrivals: Vec<(DocId, Vec<[u8; 32]>, String)>,
    pub(crate) origins: Arc<Origins>,
    /// The device key this store signs its changes with (this writer is its only writer).
    pub(crate) author: Arc<AuthorCell>,
    /// Who may have made the changes peers send.
    pub(crate) authority: Option<Arc<dyn Authority>>,
    /// Device keys decompressed for verification.
    pub(crate) keys: KeyCache,
    /// This node's signatures not yet in the `sigs` table (this writer is their only
    /// writer; readers add them to what they send).
    pub(crate) own_pending: Arc<signing::OwnPending>,
    /// The feed position up to which every own signature is in the table, as stored.
    pub(crate) own_upto: u64,
    /// Seals known here; the writer keeps those from peers in the table.
    pub(crate) seals: Arc<signing::SealBook>,
    /// The write journal of a store on a file ([`crate::journal`]): small transactions
    /// are committed to redb without durability once their frame is synced.
    journal: Option<Journal>,
    /// What the transaction being written changed, for its journal frame (collected only
    /// while `journaling`: a transaction that may be journaled).
    journal_entries: Vec<journal::Entry>,
    journaling: bool,
    /// Commits made without durability since the last durable one (a checkpoint is due).
    unsaved: bool,
    /// The clinics this store holds (this writer is its only writer).
    pub(crate) scope: Arc<crate::scope::ScopeCell>,
    /// Patients that gained a clinic in the transaction being written: their documents
    /// move to the head of the feed before it commits.
    pub(crate) refeed: BTreeSet<DocId>,
    /// Documents to move to the head of the feed in this transaction (offered again).
    pub(crate) refeed_docs: BTreeSet<DocId>,
    /// Bumped when what the store holds changed without the feed moving (a purge, a new
    /// scope): summaries computed before are stale.
    pub(crate) summary_generation: Arc<std::sync::atomic::AtomicU64>,
    /// This store's feed epoch (peers' acknowledgements of another epoch mean nothing).
    pub(crate) feed_epoch: String,
}

/// Which peer each document's current version came from, when it came whole from one
/// (bounded; lost at restart, when every change is simply relayed to everyone). Only the
/// writer records; the feed's readers look up.
pub(crate) type Origins = std::sync::Mutex<LruCache<DocId, (Vec<[u8; 32]>, String)>>;
/// Documents whose origin is remembered at most.
pub(crate) const ORIGINS_CAPACITY: usize = 65_536;

pub(crate) struct Tables<'txn> {
    pub(crate) docs: Table<'txn, u128, &'static [u8]>,
    pub(crate) chunks: Table<'txn, (u128, u32), &'static [u8]>,
    pub(crate) meta: Table<'txn, u128, &'static [u8]>,
    pub(crate) feed: Table<'txn, u64, u128>,
    pub(crate) index: Table<'txn, &'static [u8], ()>,
    counts: Table<'txn, &'static str, u64>,
    pub(crate) info: Table<'txn, &'static str, &'static [u8]>,
    pub(crate) peers: Table<'txn, &'static str, &'static [u8]>,
    pub(crate) held: Table<'txn, u128, &'static [u8]>,
    local: Table<'txn, &'static str, &'static [u8]>,
    pub(crate) sigs: Table<'txn, (u128, [u8; 32]), &'static [u8]>,
    pub(crate) seals: Table<'txn, [u8; 32], &'static [u8]>,
    pub(crate) places: Table<'txn, u128, &'static [u8]>,
    pub(crate) patient_docs: Table<'txn, (u128, u128), &'static [u8]>,
    pub(crate) purged: Table<'txn, u128, ()>,
}

impl<'txn> Tables<'txn> {
    pub(crate) fn open(txn: &'txn WriteTransaction) -> Result<Self> {
        Ok(Self {
            docs: txn.open_table(DOCS)?,
            chunks: txn.open_table(CHUNKS)?,
            meta: txn.open_table(DOC_META)?,
            feed: txn.open_table(FEED)?,
            index: txn.open_table(INDEX)?,
            counts: txn.open_table(COUNTS)?,
            info: txn.open_table(INFO)?,
            peers: txn.open_table(PEERS)?,
            held: txn.open_table(HELD)?,
            local: txn.open_table(LOCAL)?,
            sigs: txn.open_table(SIGS)?,
            seals: txn.open_table(SEALS)?,
            places: txn.open_table(PLACES)?,
            patient_docs: txn.open_table(PATIENT_DOCS)?,
            purged: txn.open_table(PURGED)?,
        })
    }

    /// One live record of `collection` fewer.
    pub(crate) fn count_removed(&mut self, collection: &str) -> Result<()> {
        let current = self.counts.get(collection)?.map_or(0, |v| v.value());
        self.counts.insert(collection, current.saturating_sub(1))?;
        Ok(())
    }

    pub(crate) fn meta_of(&self, id: &DocId) -> Result<Option<DocMeta>> {
        match self.meta.get(doc_key(id))? {
            None => Ok(None),
            Some(bytes) => DocMeta::decode(bytes.value()).map(Some).ok_or_else(|| {
                StoreError::CorruptDocument {
                    id: *id,
                    collection: "(unknown)".into(),
                    reason: "its metadata entry is unreadable".into(),
                }
            }),
        }
    }
}

impl Writer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        feed: tokio::sync::watch::Sender<u64>,
        db: Arc<DbSlot>,
        schema: Arc<SchemaCell>,
        base_schema: Arc<Schema>,
        origins: Arc<Origins>,
        author: Arc<AuthorCell>,
        own_pending: Arc<signing::OwnPending>,
        seals: Arc<signing::SealBook>,
        info: &StoreInfo,
        options: StoreOptions,
        journal: Option<Journal>,
        scope: Arc<crate::scope::ScopeCell>,
        summary_generation: Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<Self> {
        let next_seq = {
            let txn = db.get()?.begin_read()?;
            let feed = txn.open_table(FEED)?;
            feed.last()?.map_or(0, |(k, _)| k.value()) + 1
        };
        feed.send_replace(next_seq - 1);
        Ok(Self {
            feed,
            db,
            needs_reopen: false,
            schema,
            base_schema,
            actor: actor_from_hex(&info.actor),
            cache: LruCache::new(
                NonZeroUsize::new(options.doc_cache.max(1)).unwrap_or(NonZeroUsize::MIN),
            ),
            next_seq,
            compact_after: options.compact_after_chunks.max(1),
            to_compact: BTreeSet::new(),
            poisoned: HashSet::new(),
            schema_touched: false,
            // Whatever was held may merge now: this is a new start (perhaps of a newer
            // medmesh).
            retry_due: true,
            arrivals: Vec::new(),
            origins,
            author,
            authority: options.authority,
            keys: KeyCache::default(),
            own_pending,
            own_upto: 0,
            seals,
            journal,
            journal_entries: Vec::new(),
            journaling: false,
            unsaved: false,
            scope,
            refeed: BTreeSet::new(),
            refeed_docs: BTreeSet::new(),
            summary_generation,
            feed_epoch: info.feed_epoch.clone(),
        })
    }

    /// The schema in force.
    pub(crate) fn current_schema(&self) -> Arc<Schema> {
        self.schema
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Serves commands until shutdown. A failure inside (a bug: the writer never panics
    /// on purpose) drops the writes in progress, says so, and serves on with a clean
    /// state: the writer restarts rather than leaving the node unable to write.
    pub(crate) fn run(mut self, rx: Receiver<Command>) {
        loop {
            match catch_unwind(AssertUnwindSafe(|| self.serve(&rx))) {
                Ok(()) => {
                    self.close_journal();
                    return;
                }
                Err(_) => {
                    tracing::error!(
                        "the store's writer failed while applying writes and was restarted; the writes in progress were not saved and their senders were told so"
                    );
                    self.cache.clear();
                    self.needs_reopen = true;
                    self.schema_touched = false;
                    match self.read_next_seq() {
                        Ok(next) => self.next_seq = next,
                        Err(err) => {
                            tracing::error!(error = %err, "the store cannot be read after the writer failed; stopping it");
                            return;
                        }
                    }
                }
            }
        }
    }

    fn serve(&mut self, rx: &Receiver<Command>) {
        loop {
            let idle_work = self.unsaved
                || !self.to_compact.is_empty()
                || self.retry_due
                || self.own_upto + 1 < self.next_seq;
            let first = if !idle_work {
                match rx.recv() {
                    Ok(command) => command,
                    Err(_) => return,
                }
            } else {
                match rx.recv_timeout(IDLE_BEFORE_COMPACTION) {
                    Ok(command) => command,
                    Err(RecvTimeoutError::Timeout) => {
                        if self.own_upto + 1 < self.next_seq {
                            // Own signatures first: the checkpoint then writes them too.
                            if let Err(err) = self.flush_own_sigs() {
                                tracing::warn!(error = %err, "this node's signatures could not be saved; will retry");
                            }
                        } else if self.unsaved {
                            if let Err(err) = self.checkpoint() {
                                tracing::warn!(error = %err, "the store could not write its recent changes out of the journal; will retry");
                            }
                        } else if self.retry_due {
                            self.retry_due = false;
                            if let Err(err) = self.retry_held() {
                                tracing::warn!(error = %err, "retrying held documents failed; will retry at the next start or schema change");
                            }
                        } else if let Err(err) = self.compact_some(COMPACTIONS_PER_COMMIT) {
                            tracing::warn!(error = %err, "background compaction failed; will retry");
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            let mut commands = vec![first];
            while commands.len() < MAX_COMMANDS_PER_COMMIT {
                match rx.try_recv() {
                    Ok(command) => commands.push(command),
                    Err(_) => break,
                }
            }
            if self.process(commands) {
                return;
            }
        }
    }

    /// Applies commands; true when the writer should stop.
    fn process(&mut self, commands: Vec<Command>) -> bool {
        let mut writes = Vec::new();
        let mut shutdown = false;
        for command in commands {
            match command {
                Command::Shutdown => shutdown = true,
                Command::Evict { id } => {
                    self.cache.pop(&id);
                }
                Command::CompactAll { reply } => {
                    let _ = reply.send(self.compact_all());
                }
                Command::CompactFile { reply } => {
                    // Everything out of the journal first: the file then holds all.
                    let done = self.checkpoint().and_then(|()| self.db.compact());
                    let _ = reply.send(done);
                }
                Command::Checkpoint { reply } => {
                    let _ = reply.send(self.checkpoint());
                }
                Command::RetryHeld { reply } => {
                    let _ = reply.send(self.retry_held());
                }
                Command::SignAs { author, reply } => {
                    self.actor = author.actor.clone();
                    for doc in self.cache.iter_mut() {
                        doc.1.set_actor(self.actor.clone());
                    }
                    match self.author.write() {
                        Ok(mut cell) => *cell = Some(author.clone()),
                        Err(poisoned) => *poisoned.into_inner() = Some(author.clone()),
                    }
                    let _ = reply.send(self.recover_own_sigs(&author));
                }
                Command::SetScope { scope, reply } => {
                    let _ = reply.send(self.set_scope(scope));
                }
                Command::Purge { reply } => {
                    let _ = reply.send(self.purge());
                }
                other => writes.push(other),
            }
        }
        if !writes.is_empty() {
            self.commit_writes(writes);
        }
        shutdown
    }

    pub(crate) fn commit_writes(&mut self, commands: Vec<Command>) {
        let first_seq = self.next_seq;
        let mut replies = Vec::with_capacity(commands.len());
        let mut pending = Vec::with_capacity(commands.len());
        for command in commands {
            match command {
                Command::Write {
                    batch,
                    prepared,
                    reply,
                } => {
                    pending.push(Pending::Write(batch, prepared));
                    replies.push(Reply::Write(reply, None));
                }
                Command::PutInfo { key, value, reply } => {
                    pending.push(Pending::Info(key, value));
                    replies.push(Reply::Info(reply));
                }
                Command::UpdatePeer { key, update, reply } => {
                    pending.push(Pending::Peer(key, update));
                    replies.push(Reply::Info(reply));
                }
                Command::PutLocal { entries, reply } => {
                    pending.push(Pending::Local(entries));
                    replies.push(Reply::Info(reply));
                }
                _ => {}
            }
        }
        let mut staged = Staged::default();
        let result = self.transaction(pending, &mut staged, &mut replies);
        self.seals.committed(result.is_ok());
        match result {
            Ok(()) => {
                if self.next_seq != first_seq {
                    self.feed.send_replace(self.next_seq - 1);
                }
                if std::mem::take(&mut self.schema_touched) {
                    self.reload_schema();
                }
                if let Ok(mut origins) = self.origins.lock() {
                    for (id, mut heads, from) in self.arrivals.drain(..) {
                        heads.sort_unstable();
                        origins.put(id, (heads, from));
                    }
                }
                for id in staged.order {
                    if let Some(working) = staged.docs.remove(&id)
                        && staged.cacheable.contains(&id)
                        && let Some(mut doc) = working.doc
                    {
                        doc.set_actor(self.actor.clone());
                        self.cache.put(id, doc);
                    }
                }
                for reply in replies {
                    reply.send_ok();
                }
                // Enough own signatures wait, or the mark is far behind (a long sync
                // that never leaves the writer idle): written now, after the answers.
                if (self.own_pending.len() >= signing::OWN_FLUSH
                    || self.next_seq.saturating_sub(self.own_upto) > signing::MARK_EVERY)
                    && let Err(err) = self.flush_own_sigs()
                {
                    tracing::warn!(error = %err, "this node's signatures could not be saved; will retry");
                }
            }
            Err(err) => {
                // Nothing of this transaction is stored: forget what it changed in memory
                // (the staged documents are dropped) and tell every writer.
                self.next_seq = first_seq;
                self.needs_reopen = true;
                self.schema_touched = false;
                self.arrivals.clear();
                tracing::error!(error = %err, "a write to the database failed; nothing of it was stored");
                for reply in replies {
                    reply.send_err(&err);
                }
            }
        }
    }

    fn transaction(
        &mut self,
        pending: Vec<Pending>,
        staged: &mut Staged,
        replies: &mut [Reply],
    ) -> Result<()> {
        self.reopen_if_needed()?;
        // Local record writes are journaled (what peers send is larger, and comes again
        // if lost); anything else is committed durably.
        let journaled = self.journal.as_ref().is_some_and(|j| !j.is_full())
            && pending.iter().all(|work| match work {
                Pending::Write(batch, _) => batch
                    .ops
                    .iter()
                    .all(|op| !matches!(op.kind, WriteKind::Merge(_))),
                _ => false,
            });
        // (What a transaction that failed collected is not carried into this one.)
        self.journal_entries.clear();
        self.refeed.clear();
        self.refeed_docs.clear();
        self.journaling = journaled;
        let first_seq = self.next_seq;
        let mut refed = false;
        let txn = self.db.get()?.begin_write()?;
        {
            let mut tables = Tables::open(&txn)?;
            // Seals from peers checked since the last commit (before what refers to them).
            let unsaved = self.seals.take_unsaved();
            if !unsaved.is_empty() {
                signing::store_seals(&mut tables.seals, unsaved.iter().map(|s| s.seal()))?;
                // A document held because its seal had not come yet may merge now.
                self.retry_due = true;
            }
            for (index, work) in pending.into_iter().enumerate() {
                match work {
                    Pending::Write(batch, prepared) => {
                        let answer = self.apply_batch(&mut tables, staged, batch, prepared)?;
                        if let Some(Reply::Write(_, slot)) = replies.get_mut(index) {
                            *slot = Some(answer);
                        }
                    }
                    Pending::Info(key, value) => {
                        tables.info.insert(key.as_str(), value.as_slice())?;
                    }
                    Pending::Local(entries) => {
                        for (key, value) in entries {
                            match value {
                                Some(value) => {
                                    tables.local.insert(key.as_str(), value.as_slice())?;
                                }
                                None => {
                                    tables.local.remove(key.as_str())?;
                                }
                            }
                        }
                    }
                    Pending::Peer(_, PeerUpdate::Offer { ids, clinic }) => {
                        self.offer(&mut tables, &ids, &clinic)?;
                    }
                    Pending::Peer(key, update) => {
                        let old = match tables.peers.get(key.as_str())? {
                            Some(bytes) => serde_json::from_slice::<PeerRecord>(bytes.value())
                                .unwrap_or_default(),
                            None => PeerRecord::default(),
                        };
                        match old.apply(&update) {
                            Some(record) => {
                                let value = serde_json::to_vec(&record)
                                    .map_err(|e| StoreError::Storage(e.to_string()))?;
                                tables.peers.insert(key.as_str(), value.as_slice())?;
                            }
                            None => {
                                tables.peers.remove(key.as_str())?;
                            }
                        }
                    }
                }
            }
            if !self.refeed.is_empty() || !self.refeed_docs.is_empty() {
                refed = self.refeed(&mut tables, first_seq)?;
            }
        }
        // Moved feed positions are not in the journal's frames.
        let journaled = journaled
            && !refed
            && self
                .journal_entries
                .iter()
                .map(|e| e.bytes.len())
                .sum::<usize>()
                <= journal::MAX_FRAME_BYTES;
        self.commit(txn, journaled)
    }

    /// Commits a write transaction: `journaled`, once its frame is appended to the
    /// journal and synced, without making redb write it to disk; otherwise durably, as a
    /// checkpoint (everything committed before is then on disk too, and the journal
    /// starts again).
    pub(crate) fn commit(&mut self, mut txn: WriteTransaction, journaled: bool) -> Result<()> {
        self.journaling = false;
        let entries = std::mem::take(&mut self.journal_entries);
        if let (true, Some(journal)) = (journaled, self.journal.as_mut()) {
            let before = journal.len();
            if !entries.is_empty() {
                journal.append(&entries)?;
            }
            let committed = txn
                .set_durability(Durability::None)
                .map_err(|e| StoreError::Storage(e.to_string()))
                .and_then(|()| txn.commit().map_err(StoreError::from));
            if let Err(err) = committed {
                journal.undo_to(before);
                return Err(err);
            }
            self.unsaved = true;
            return Ok(());
        }
        txn.commit()?;
        self.unsaved = false;
        if let Some(journal) = self.journal.as_mut() {
            journal.reset();
        }
        Ok(())
    }

    /// Writes everything committed without durability to disk (a durable commit).
    pub(crate) fn checkpoint(&mut self) -> Result<()> {
        self.reopen_if_needed()?;
        let txn = self.db.get()?.begin_write()?;
        self.commit(txn, false)
    }

    /// Reopens the database after a failed write, and replays the journal: what was
    /// committed without durability is gone with the old handle.
    fn reopen_if_needed(&mut self) -> Result<()> {
        if self.needs_reopen {
            self.db.reopen()?;
            self.needs_reopen = false;
            self.next_seq = self.read_next_seq()?;
            self.unsaved = false;
            if self.journal.is_some() {
                self.replay_journal()?;
                if let Some(author) = signing::current(&self.author) {
                    self.recover_own_sigs(&author)?;
                }
            }
        }
        Ok(())
    }

    /// At a clean stop: everything to disk, and nothing left to replay.
    fn close_journal(&mut self) {
        if self.journal.is_none() {
            return;
        }
        match self.checkpoint() {
            Ok(()) => {
                if let Some(journal) = self.journal.as_mut()
                    && let Err(err) = journal.clear()
                {
                    tracing::warn!(error = %err, "the store's journal could not be cleared; it is read again (to no effect) at the next start");
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "the store's last changes could not be written out of its journal; they are replayed at the next start");
            }
        }
    }

    /// Applies what the journal holds (writes acknowledged before a crash, or before a
    /// failed write reopened the database), then checkpoints.
    pub(crate) fn replay_journal(&mut self) -> Result<()> {
        let Some(journal) = self.journal.as_mut() else {
            return Ok(());
        };
        let replay = journal.read()?;
        let shown = journal.path().display().to_string();
        if let Some(torn) = &replay.torn {
            tracing::warn!(journal = %shown, "the journal ends with a write that was cut short ({torn}); it was never acknowledged, and is dropped");
        }
        if replay.frames.is_empty() {
            if journal.len() > 0 {
                self.checkpoint()?;
            }
            return Ok(());
        }
        let frames = replay.frames.len();
        let first_seq = self.next_seq;
        let txn = self.db.get()?.begin_write()?;
        let mut documents = 0usize;
        // Each frame is stored as its transaction was, every document at the feed
        // position it had then: peers that read the feed before the crash keep cursors
        // that mean the same documents.
        let mut next = first_seq;
        let replayed = (|| -> Result<()> {
            let mut tables = Tables::open(&txn)?;
            let mut staged = Staged::default();
            for frame in replay.frames {
                let mut batch = Staged::default();
                let mut positions = HashMap::new();
                for entry in frame {
                    let (id, seq) = (entry.id, entry.seq);
                    match self.replay_entry(&mut tables, &mut staged, &mut batch, entry) {
                        Ok(()) => {
                            positions.insert(id, seq);
                        }
                        Err(err) if is_fatal(&err) => return Err(err),
                        Err(err) => {
                            tracing::error!(doc = %id, error = %err, journal = %shown, "a write in the journal could not be applied again");
                        }
                    }
                }
                for id in &batch.order {
                    let Some(working) = batch.docs.get(id) else {
                        continue;
                    };
                    if let Some(seq) = positions.get(id).filter(|s| **s >= first_seq)
                        && tables.feed.get(*seq)?.is_none()
                    {
                        self.next_seq = *seq;
                    }
                    if let Some(seq) = self.store_doc(&mut tables, id, working)? {
                        documents += 1;
                        next = next.max(seq + 1);
                        if *id == schema_doc_id() {
                            self.schema_touched = true;
                        }
                    }
                    self.next_seq = next;
                }
                for (id, working) in batch.docs {
                    if !staged.docs.contains_key(&id) {
                        staged.order.push(id);
                    }
                    staged.docs.insert(id, working);
                }
            }
            Ok(())
        })();
        self.next_seq = next;
        if let Err(err) = replayed.and_then(|()| self.commit(txn, false)) {
            self.next_seq = first_seq;
            return Err(err);
        }
        self.feed.send_replace(self.next_seq - 1);
        if std::mem::take(&mut self.schema_touched) {
            self.reload_schema();
        }
        tracing::info!(
            frames,
            documents,
            "recovered writes from the store's journal after an unclean stop"
        );
        Ok(())
    }

    /// Applies one journal entry: the changes of one document.
    fn replay_entry(
        &mut self,
        tables: &mut Tables<'_>,
        staged: &mut Staged,
        batch: &mut Staged,
        entry: journal::Entry,
    ) -> Result<()> {
        let id = entry.id;
        let corrupt = |reason: String| StoreError::CorruptDocument {
            id,
            collection: entry.collection.clone(),
            reason,
        };
        // (Changes whose earlier changes the store lacks — it can only be after damage
        // made redb fall back to an older commit — are not applied.)
        let incomplete = || corrupt("the store lacks the changes it builds on".into());
        if self.load_working(tables, staged, batch, &id)? {
            let working = batch
                .docs
                .get_mut(&id)
                .ok_or_else(|| StoreError::Storage(format!("record {id} was not loaded")))?;
            let doc = working.doc_mut(&id)?;
            doc.load_incremental(&entry.bytes)
                .map_err(|e| corrupt(e.to_string()))?;
            if !doc.get_missing_deps(&[]).is_empty() {
                return Err(incomplete());
            }
            working.record = Some(record::read_record(doc));
        } else {
            let doc = Automerge::load(&entry.bytes).map_err(|e| corrupt(e.to_string()))?;
            if !doc.get_missing_deps(&[]).is_empty() {
                return Err(incomplete());
            }
            let record = record::read_record(&doc);
            batch.add_new(
                id,
                entry.collection.clone(),
                None,
                doc.get_heads(),
                record,
                Some(entry.bytes),
            );
        }
        batch.sign(&id, entry.sigs);
        Ok(())
    }

    /// Applies one batch: works every write out in memory, then stores the documents it
    /// changed. The outer error is a storage failure that aborts the whole transaction.
    fn apply_batch(
        &mut self,
        tables: &mut Tables<'_>,
        staged: &mut Staged,
        batch: WriteBatch,
        prepared: Vec<Option<Prepared>>,
    ) -> Result<Result<Vec<Result<WriteOutcome>>>> {
        // Sized up front: a document being worked on is large, and growing the map moves
        // every one already in it (an import's batch of 1,000 spent a tenth of the
        // writer's time there).
        let mut batch_docs = Staged::with_capacity(batch.ops.len());
        let cacheable = batch.ops.len() <= CACHEABLE_BATCH;
        let mut outcomes = Vec::with_capacity(batch.ops.len());
        let mut prepared = prepared.into_iter();
        for op in batch.ops {
            let ready = prepared.next().flatten();
            match self.apply_op(tables, staged, &mut batch_docs, op, ready) {
                Ok(outcome) => outcomes.push(Ok(outcome)),
                Err(err) if is_fatal(&err) => return Err(err),
                Err(err) if batch.atomic => {
                    // Refused: none of this batch is stored; its documents are reloaded
                    // from disk next time.
                    return Ok(Err(err));
                }
                Err(err) => outcomes.push(Err(err)),
            }
        }
        let mut seqs = HashMap::new();
        let mut own = Vec::new();
        for id in &batch_docs.order {
            if let Some(working) = batch_docs.docs.get(id)
                && let Some(seq) = self.store_doc(tables, id, working)?
            {
                seqs.insert(*id, seq);
                if *id == schema_doc_id() {
                    self.schema_touched = true;
                }
                own.extend(
                    working
                        .own
                        .iter()
                        .map(|(hash, device)| (*id, *hash, *device)),
                );
            }
        }
        self.sign_own(tables, own)?;
        staged.docs.reserve(batch_docs.docs.len());
        for (id, mut working) in batch_docs.docs {
            // Stored with the document above.
            working.sigs.clear();
            working.own.clear();
            if !staged.docs.contains_key(&id) {
                staged.order.push(id);
            }
            if cacheable {
                staged.cacheable.insert(id);
            }
            staged.docs.insert(id, working);
        }
        for outcome in outcomes.iter_mut().flatten() {
            match seqs.get(&outcome.id) {
                Some(seq) => outcome.seq = *seq,
                None => {
                    if let Some(meta) = tables.meta_of(&outcome.id)? {
                        outcome.seq = meta.seq;
                    }
                }
            }
        }
        Ok(Ok(outcomes))
    }

    /// Brings a document into `batch` (from this batch, this transaction, the cache, or
    /// the tables); `None` when it does not exist.
    pub(crate) fn load_working(
        &mut self,
        tables: &Tables<'_>,
        staged: &mut Staged,
        batch: &mut Staged,
        id: &DocId,
    ) -> Result<bool> {
        if batch.docs.contains_key(id) {
            return Ok(true);
        }
        if let Some(mut working) = staged.docs.remove(id) {
            // Changed earlier in this transaction: carry on from there; what is stored
            // already counts as the old state.
            working.old_meta = tables.meta_of(id)?;
            working.old_record = match working.record.take() {
                Some(record) => record,
                None => record::read_record(working.doc_mut(id)?),
            };
            working.old_heads = working.current_heads();
            staged.order.retain(|d| d != id);
            batch.order.push(*id);
            batch.docs.insert(*id, working);
            return Ok(true);
        }
        let Some(old_meta) = tables.meta_of(id)? else {
            return Ok(false);
        };
        if old_meta.held {
            // Only held bytes: nothing here to read or change.
            return Ok(false);
        }
        let mut doc = match self.cache.pop(id) {
            Some(doc) => doc,
            None => load_from_tables(&tables.docs, &tables.chunks, id, &old_meta.collection)?,
        };
        doc.set_actor(self.actor.clone());
        batch.order.push(*id);
        batch.docs.insert(
            *id,
            Working {
                old_record: record::read_record(&doc),
                record: None,
                raw: None,
                heads: Vec::new(),
                old_heads: doc.get_heads(),
                collection: old_meta.collection.clone(),
                old_meta: Some(old_meta),
                doc: Some(doc),
                sigs: Vec::new(),
                own: Vec::new(),
            },
        );
        Ok(true)
    }

    fn apply_op(
        &mut self,
        tables: &mut Tables<'_>,
        staged: &mut Staged,
        batch: &mut Staged,
        op: WriteOp,
        prepared: Option<Prepared>,
    ) -> Result<WriteOutcome> {
        if let WriteKind::Merge(received) = op.kind {
            return self.apply_merge(
                tables,
                staged,
                batch,
                op.collection,
                op.id,
                received,
                prepared,
            );
        }
        let prepared = match prepared {
            Some(Prepared::Create(result)) => Some(result),
            _ => None,
        };
        let schema = self.current_schema();
        let spec = schema
            .collection(&op.collection)
            .ok_or_else(|| StoreError::UnknownCollection(op.collection.clone()))?;
        let now = Value::String(record::format_timestamp(op.time_ms));
        let options = commit_options(&op);
        match op.kind {
            WriteKind::Create(fields) => {
                let created = match prepared {
                    Some(result) => result?,
                    None => prepare_create(
                        spec,
                        &self.actor,
                        signing::current(&self.author).as_deref(),
                        op.id,
                        fields,
                        op.time_ms,
                        options,
                    )?,
                };
                let id = created.id;
                if self.load_working(tables, staged, batch, &id)?
                    || tables.meta_of(&id)?.is_some_and(|m| m.held)
                {
                    return Err(StoreError::AlreadyExists {
                        collection: op.collection,
                        id,
                    });
                }
                let outcome = batch.add_new(
                    id,
                    op.collection,
                    None,
                    created.heads,
                    created.record,
                    Some(created.raw),
                );
                batch.sign_own(&id, created.own);
                Ok(outcome)
            }
            WriteKind::Ensure {
                mut fields,
                counters,
            } => {
                let id = op.id.ok_or_else(|| {
                    StoreError::BadQuery("this write needs the record's id".into())
                })?;
                if self.load_working(tables, staged, batch, &id)? {
                    let working = batch
                        .docs
                        .get_mut(&id)
                        .ok_or_else(|| StoreError::NotFound {
                            collection: op.collection.clone(),
                            id,
                        })?;
                    if working.collection != op.collection {
                        return Err(StoreError::AlreadyExists {
                            collection: working.collection.clone(),
                            id,
                        });
                    }
                    let record = record::read_record(working.doc_mut(&id)?);
                    return Ok(WriteOutcome {
                        id,
                        record,
                        changed: false,
                        seq: 0,
                        held: None,
                    });
                }
                fields.insert("id".into(), Value::String(id.to_string()));
                let mut check = fields.clone();
                for (name, start) in &counters {
                    check.insert(name.clone(), Value::from(*start));
                }
                spec.validate_record(&check)?;
                fields.sort_keys();
                let mut doc = Automerge::new().with_actor(ActorId::from(id.as_bytes().as_slice()));
                doc.transact_with::<_, _, RecordError, _>(
                    |_| CommitOptions::default().with_time(0),
                    |tx| {
                        record::write_fields(tx, &fields)?;
                        for (name, start) in &counters {
                            record::put_counter(tx, name, *start)?;
                        }
                        Ok(())
                    },
                )
                .map_err(|f| refused(&f.error))?;
                // Every node makes this same first change; each vouches for it.
                let vouches = match signing::current(&self.author) {
                    Some(author) => signing::vouch_unsigned(&doc, &author),
                    None => Vec::new(),
                };
                doc.set_actor(self.actor.clone());
                let record = record::read_record(&doc);
                let outcome = batch.add_new(id, op.collection, Some(doc), Vec::new(), record, None);
                batch.sign(&id, vouches);
                Ok(outcome)
            }
            kind => {
                let id = op.id.ok_or_else(|| {
                    StoreError::BadQuery("this write needs the record's id".into())
                })?;
                let not_found = || StoreError::NotFound {
                    collection: op.collection.clone(),
                    id,
                };
                if !self.load_working(tables, staged, batch, &id)? {
                    return Err(not_found());
                }
                let working = batch.docs.get_mut(&id).ok_or_else(not_found)?;
                if working.collection != op.collection {
                    return Err(not_found());
                }
                let change = match kind {
                    WriteKind::Patch(mut fields) => {
                        check_same_id(spec, &mut fields, &id)?;
                        fields.remove("updated_at");
                        spec.validate_patch(&fields)?;
                        Change::Write(fields)
                    }
                    WriteKind::Choose { path, value } => {
                        let mut fields = crate::write::choice_as_fields(&path, &value);
                        check_same_id(spec, &mut fields, &id)?;
                        spec.validate_patch(&fields)?;
                        Change::Choose(path, value)
                    }
                    WriteKind::Replace(mut fields) => {
                        check_same_id(spec, &mut fields, &id)?;
                        fields.remove("updated_at");
                        let mut full = fields.clone();
                        full.insert("id".into(), Value::String(id.to_string()));
                        for keep in KEPT_ON_REPLACE {
                            if let (false, Some(v)) =
                                (full.contains_key(*keep), working.old_record_field(keep))
                            {
                                full.insert((*keep).to_owned(), v);
                            }
                        }
                        spec.validate_record(&full)?;
                        Change::Replace(fields)
                    }
                    WriteKind::Delete => Change::Delete,
                    WriteKind::Increment { counters } => Change::Increment(counters),
                    // Handled above.
                    WriteKind::Create(_) | WriteKind::Merge(_) | WriteKind::Ensure { .. } => {
                        return Err(StoreError::BadQuery(
                            "this write cannot be applied here".into(),
                        ));
                    }
                };
                let result = working.doc_mut(&id)?.transact_with::<_, _, RecordError, _>(
                    |_| options,
                    |tx| {
                        match &change {
                            Change::Write(fields) => record::write_fields(tx, fields)?,
                            Change::Choose(path, value) => record::settle_field(tx, path, value)?,
                            Change::Replace(fields) => {
                                record::replace_fields(tx, fields, KEPT_ON_REPLACE)?
                            }
                            Change::Increment(counters) => {
                                for (field, by) in counters {
                                    if *by != 0 {
                                        tx.increment(ROOT, field.as_str(), *by)?;
                                    }
                                }
                            }
                            Change::Delete => {
                                let deleted = tx.get(ROOT, "deleted_at")?.is_some_and(|(v, _)| {
                                    !matches!(v, automerge::Value::Scalar(ref s) if s.is_null())
                                });
                                if !deleted {
                                    let mut fields = Fields::new();
                                    fields.insert("deleted_at".into(), now.clone());
                                    fields.insert("is_deleted".into(), Value::Bool(true));
                                    record::write_fields(tx, &fields)?;
                                }
                            }
                        }
                        if tx.pending_ops() > 0 {
                            let mut stamp = Fields::new();
                            stamp.insert("updated_at".into(), now.clone());
                            record::write_fields(tx, &stamp)?;
                        }
                        Ok(())
                    },
                );
                let changed = match result {
                    Ok(success) => match success.hash {
                        Some(hash) => {
                            working
                                .own
                                .push((hash, actor_key(self.actor.to_bytes()).is_some()));
                            true
                        }
                        None => false,
                    },
                    Err(failure) => return Err(refused(&failure.error)),
                };
                let record = record::read_record(working.doc_mut(&id)?);
                working.record = Some(record.clone());
                Ok(WriteOutcome {
                    id,
                    record,
                    changed,
                    seq: 0,
                    held: None,
                })
            }
        }
    }

    /// Stores one changed document: its bytes, metadata, feed position, index entries and
    /// the collection's count. Answers its new feed position, or `None` if unchanged.
    fn store_doc(
        &mut self,
        tables: &mut Tables<'_>,
        id: &DocId,
        working: &Working,
    ) -> Result<Option<u64>> {
        let heads = working.current_heads();
        // A held entry is only a placeholder: the document is stored whole over it.
        let old_meta = working.old_meta.as_ref().filter(|m| !m.held);
        if old_meta.is_some() && heads == working.old_heads {
            return Ok(None);
        }
        // A document of a collection not known here (yet) is stored all the same,
        // indexed by `updated_at` only until the schema that declares it arrives.
        let schema = self.current_schema();
        let spec = schema.collection(&working.collection);
        let seq = self.next_seq;
        self.next_seq += 1;
        let read;
        let record = match &working.record {
            Some(record) => record,
            None => {
                read = working
                    .doc
                    .as_ref()
                    .map(record::read_record)
                    .unwrap_or_default();
                &read
            }
        };
        let deleted = record.get("deleted_at").is_some_and(|v| !v.is_null());
        let updated_ms = record
            .get("updated_at")
            .and_then(record::timestamp_ms)
            .unwrap_or(0);
        let key = doc_key(id);
        let journaled = self.journaling;
        let mut journal_bytes = None;
        let chunks = match old_meta {
            None => {
                let saved;
                let bytes = match (&working.raw, &working.doc) {
                    (Some(raw), _) => raw.as_slice(),
                    (None, Some(doc)) => {
                        saved = doc.save();
                        saved.as_slice()
                    }
                    (None, None) => {
                        return Err(StoreError::Storage(format!(
                            "record {id} has nothing to store"
                        )));
                    }
                };
                tables.docs.insert(key, bytes)?;
                if journaled {
                    journal_bytes = Some(bytes.to_vec());
                }
                0
            }
            Some(old) => {
                let Some(doc) = &working.doc else {
                    return Err(StoreError::Storage(format!("record {id} was not loaded")));
                };
                if old.chunks + 1 >= INLINE_COMPACTION_FACTOR * self.compact_after {
                    // Writes never paused long enough for the background compaction:
                    // fold the chunks now, so that loading the document stays cheap.
                    tables.docs.insert(key, doc.save().as_slice())?;
                    if journaled {
                        journal_bytes = Some(doc.save_after(&working.old_heads));
                    }
                    tables
                        .chunks
                        .retain_in((key, 0)..=(key, u32::MAX), |_, _| false)?;
                    self.to_compact.remove(id);
                    0
                } else {
                    let bytes = doc.save_after(&working.old_heads);
                    tables.chunks.insert((key, old.chunks), bytes.as_slice())?;
                    if journaled {
                        journal_bytes = Some(bytes);
                    }
                    let chunks = old.chunks + 1;
                    if chunks >= self.compact_after {
                        self.to_compact.insert(*id);
                    }
                    chunks
                }
            }
        };
        if let Some(old) = &working.old_meta {
            tables.feed.remove(old.seq)?;
        }
        tables.feed.insert(seq, key)?;
        let old_entries = match old_meta {
            Some(_) => index_entries(&working.collection, spec, id, &working.old_record),
            None => BTreeSet::new(),
        };
        let new_entries = index_entries(&working.collection, spec, id, record);
        for stale in old_entries.difference(&new_entries) {
            tables.index.remove(stale.as_slice())?;
        }
        for fresh in new_entries.difference(&old_entries) {
            tables.index.insert(fresh.as_slice(), ())?;
        }
        self.place(
            tables,
            id,
            &working.collection,
            old_meta.map(|_| &working.old_record),
            record,
        )?;
        let was_live = old_meta.is_some_and(|m| !m.deleted);
        if was_live == deleted {
            let current = tables
                .counts
                .get(working.collection.as_str())?
                .map_or(0, |v| v.value());
            let next = if deleted {
                current.saturating_sub(1)
            } else {
                current + 1
            };
            tables.counts.insert(working.collection.as_str(), next)?;
        }
        let meta = DocMeta {
            collection: working.collection.clone(),
            seq,
            updated_ms,
            deleted,
            held: false,
            chunks,
            heads: heads.iter().map(|h| h.0).collect(),
        };
        tables.meta.insert(key, meta.encode().as_slice())?;
        if let (Some(_), Some(doc), Some(author)) =
            (old_meta, &working.doc, signing::current(&self.author))
            && !self.own_pending.has(id)
            && !signing::any_for(&tables.sigs, id)?
        {
            // A document stored before signatures existed, written with them for the
            // first time: vouch for its earlier changes, so that its signatures here
            // are complete.
            signing::store(
                &mut tables.sigs,
                id,
                &signing::vouch_unsigned(doc, &author),
                false,
            )?;
        }
        signing::store(&mut tables.sigs, id, &working.sigs, old_meta.is_none())?;
        if let Some(bytes) = journal_bytes {
            self.journal_entries.push(journal::Entry {
                id: *id,
                seq,
                collection: working.collection.clone(),
                bytes,
                sigs: working.sigs.clone(),
            });
        }
        Ok(Some(seq))
    }

    /// Signs the changes this node made in a batch (one seal for many): the seals are
    /// kept now, the signatures wait in memory ([`signing::OwnPending`]).
    fn sign_own(
        &mut self,
        tables: &mut Tables<'_>,
        own: Vec<(DocId, ChangeHash, bool)>,
    ) -> Result<()> {
        let Some(author) = signing::current(&self.author).filter(|_| !own.is_empty()) else {
            return Ok(());
        };
        // A large batch (an import) writes its signatures in its own commit: they add
        // little to it, while a commit of their own later would cost a sync to disk.
        let inline = own.len() >= signing::OWN_FLUSH;
        let audiences = crate::scope::audiences(
            &tables.places,
            &tables.patient_docs,
            own.iter().map(|c| &c.0),
        )?;
        let (entries, seals) = author.sign_own(own, |id| audiences.get(id).cloned());
        signing::store_seals(&mut tables.seals, &seals)?;
        for seal in seals {
            self.seals.remember_own(seal);
        }
        for (id, entries) in entries {
            if inline {
                // Changes just made: no signature of them is kept yet.
                signing::store(&mut tables.sigs, &id, &entries, true)?;
            } else {
                self.own_pending.add(&id, &entries);
            }
        }
        Ok(())
    }

    pub(crate) fn read_next_seq(&self) -> Result<u64> {
        let txn = self.db.get()?.begin_read()?;
        let feed = txn.open_table(FEED)?;
        Ok(feed.last()?.map_or(0, |(k, _)| k.value()) + 1)
    }

    fn compact_all(&mut self) -> Result<usize> {
        {
            let txn = self.db.get()?.begin_read()?;
            let table = txn.open_table(DOC_META)?;
            for entry in table.iter()? {
                let (key, value) = entry?;
                if DocMeta::decode(value.value()).is_some_and(|m| m.chunks > 0) {
                    self.to_compact.insert(meta::key_doc(key.value()));
                }
            }
        }
        let mut total = 0;
        while !self.to_compact.is_empty() {
            total += self.compact_some(COMPACTIONS_PER_COMMIT)?;
        }
        Ok(total)
    }

    /// Folds the change chunks of up to `max` documents into their snapshots.
    fn compact_some(&mut self, max: usize) -> Result<usize> {
        let ids: Vec<DocId> = self.to_compact.iter().take(max).copied().collect();
        self.reopen_if_needed()?;
        let txn = self.db.get()?.begin_write()?;
        let mut done = 0;
        {
            let mut tables = Tables::open(&txn)?;
            for id in &ids {
                let Some(mut meta) = tables.meta_of(id)? else {
                    continue;
                };
                if meta.chunks == 0 || meta.held {
                    continue;
                }
                let doc = match self.cache.get(id) {
                    Some(doc) => doc.clone(),
                    None => {
                        match load_from_tables(&tables.docs, &tables.chunks, id, &meta.collection) {
                            Ok(doc) => doc,
                            Err(err) => {
                                tracing::warn!(doc = %id, error = %err, "cannot compact a damaged document; leaving it as it is");
                                continue;
                            }
                        }
                    }
                };
                let key = doc_key(id);
                tables.docs.insert(key, doc.save().as_slice())?;
                tables
                    .chunks
                    .retain_in((key, 0)..=(key, u32::MAX), |_, _| false)?;
                meta.chunks = 0;
                tables.meta.insert(key, meta.encode().as_slice())?;
                done += 1;
            }
        }
        if let Err(err) = self.commit(txn, false) {
            self.needs_reopen = true;
            return Err(err);
        }
        for id in ids {
            self.to_compact.remove(&id);
        }
        Ok(done)
    }
}

/// Fields a PUT leaves as they are unless it names them.
const KEPT_ON_REPLACE: &[&str] = &["id", "created_at", "updated_at", "deleted_at", "is_deleted"];

enum Pending {
    Write(WriteBatch, Vec<Option<Prepared>>),
    Info(String, Vec<u8>),
    Peer(String, PeerUpdate),
    Local(Vec<(String, Option<Vec<u8>>)>),
}

enum Reply {
    Write(WriteReply, Option<Result<Vec<Result<WriteOutcome>>>>),
    Info(oneshot::Sender<Result<()>>),
}

impl Reply {
    fn send_ok(self) {
        match self {
            Reply::Write(reply, answer) => {
                let _ = reply.send(answer.unwrap_or_else(|| {
                    Err(StoreError::Storage("the write was not processed".into()))
                }));
            }
            Reply::Info(reply) => {
                let _ = reply.send(Ok(()));
            }
        }
    }

    fn send_err(self, err: &StoreError) {
        match self {
            Reply::Write(reply, _) => {
                let _ = reply.send(Err(replicate(err)));
            }
            Reply::Info(reply) => {
                let _ = reply.send(Err(replicate(err)));
            }
        }
    }
}

/// The same transaction-wide failure, for each waiting writer.
fn replicate(err: &StoreError) -> StoreError {
    match err {
        StoreError::DiskFull => StoreError::DiskFull,
        StoreError::Closed => StoreError::Closed,
        other => StoreError::Storage(other.to_string()),
    }
}

enum Change {
    Write(Fields),
    Choose(Vec<String>, Value),
    Replace(Fields),
    Increment(Vec<(String, i64)>),
    Delete,
}

/// An Automerge operation the document refused (a counter that is not one, say): this
/// write is refused, the transaction goes on.
pub(crate) fn refused(err: &RecordError) -> StoreError {
    StoreError::BadQuery(format!("the change could not be applied: {err}"))
}

pub(crate) fn bad_id(spec: &CollectionSpec, text: &str) -> StoreError {
    StoreError::Invalid(SchemaError::InvalidField {
        collection: spec.name.clone(),
        field: "id".into(),
        expected: "a UUID",
        found: format!("{text:?}"),
    })
}

/// A patch may repeat the record's id but not change it.
fn check_same_id(spec: &CollectionSpec, fields: &mut Fields, id: &DocId) -> Result<()> {
    match fields.remove("id") {
        None => Ok(()),
        Some(Value::String(text)) if text.parse::<DocId>().ok() == Some(*id) => Ok(()),
        Some(other) => Err(StoreError::Invalid(SchemaError::InvalidField {
            collection: spec.name.clone(),
            field: "id".into(),
            expected: "the record's own id (ids cannot be changed)",
            found: other.to_string(),
        })),
    }
}

/// The index entries of a record: `updated_at` always, the schema's indexed fields when
/// its collection is known.
pub(crate) fn index_entries(
    collection: &str,
    spec: Option<&CollectionSpec>,
    id: &DocId,
    record: &Fields,
) -> BTreeSet<Vec<u8>> {
    let mut out = BTreeSet::new();
    let updated = record
        .get("updated_at")
        .and_then(record::timestamp_ms)
        .unwrap_or(0);
    out.insert(index_key(
        collection,
        meta::UPDATED_AT,
        &updated_value(updated),
        id,
    ));
    for field in spec.iter().flat_map(|spec| spec.indexed_fields()) {
        let Some(kind) = field.index else { continue };
        if let Some(value) = record.get(&field.name).and_then(|v| index_value(v, kind)) {
            out.insert(index_key(collection, &field.name, &value, id));
        }
    }
    out
}

/// Errors that mean the transaction cannot go on (as opposed to one refused write).
fn is_fatal(err: &StoreError) -> bool {
    matches!(
        err,
        StoreError::DiskFull
            | StoreError::Storage(_)
            | StoreError::CorruptDatabase { .. }
            | StoreError::Closed
    )
}
