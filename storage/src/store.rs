//! The store: opening, reading, and handing writes to the writer thread.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use automerge::Automerge;
use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::schema::index_value;
use medmesh_protocol::{DocId, IndexKind, Schema};
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, StorageBackend};
use tokio::sync::oneshot;

use crate::crypt::{DataKey, EncryptedFile};
use crate::error::{Result, StoreError};
use crate::journal::Journal;
use crate::meta::{self, DocMeta, doc_key, doc_of_index_key, index_prefix, key_doc};
use crate::prepare::{Prepared, actor_from_hex, prepare_creates};
use crate::signing::{self, Author, AuthorCell, SealsSent};
use crate::slot::DbSlot;
use crate::tables::{
    CHUNKS, COUNTS, DOC_META, DOCS, FEED, FORMAT_VERSION, HELD, INDEX, INFO, LOCAL, PEERS, SEALS,
    SIGS,
};
use crate::write::{WriteBatch, WriteKind, WriteOutcome};
use crate::writer::{Command, PREPARE_OFF_WRITER, SchemaCell, WRITE_QUEUE_CAPACITY, Writer};
use medmesh_protocol::authorship::{Authority, Seal, SealId};

/// Largest latest change announced with its feed entry.
pub const PUSH_ENTRY_BYTES: usize = 16 * 1024;
/// Latest changes announced with one feed page, in bytes at most.
pub const PUSH_PAGE_BYTES: usize = 256 * 1024;

/// Feed pages read at most to fill one page for a device of some clinics.
const SCOPED_SCAN: usize = 16;
/// Memory redb may use to cache pages. Bounded so that a device's memory does not grow
/// with the number of records.
const PAGE_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Who signed each change of a document: change hash → (signer's public key, whether
/// the signature is a vouch rather than the author's own).
pub type Signers = HashMap<[u8; 32], ([u8; 32], bool)>;

/// Writes in a batch from which two threads prepare it.
const PREPARE_IN_TWO: usize = 128;

/// How the store is opened.
#[derive(Clone)]
pub struct StoreOptions {
    /// Documents the writer keeps loaded (least recently used are dropped).
    pub doc_cache: usize,
    /// Compact a document once it has this many change chunks.
    pub compact_after_chunks: u32,
    /// Who may have made the changes peers send: with one, every change received must be
    /// signed by a device it accepts (else the document is held); without one, changes
    /// are taken as they come, with whatever signatures they carry.
    pub authority: Option<Arc<dyn Authority>>,
    /// The clinics this device serves: documents of other clinics that peers send are
    /// refused ([`crate::scope`]). All by default.
    pub scope: medmesh_protocol::scope::Scope,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("doc_cache", &self.doc_cache)
            .field("compact_after_chunks", &self.compact_after_chunks)
            .field("authority", &self.authority.is_some())
            .field("scope", &self.scope)
            .finish()
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            doc_cache: 512,
            compact_after_chunks: 8,
            authority: None,
            scope: medmesh_protocol::scope::Scope::all(),
        }
    }
}

/// Facts about a store that do not change while it is open.
#[derive(Debug, Clone)]
pub struct StoreInfo {
    /// The database file; `None` for an in-memory store.
    pub path: Option<PathBuf>,
    /// Random id of this store's change feed. A peer that sees a new epoch knows the feed
    /// was started over (store replaced) and catches up from zero.
    pub feed_epoch: String,
    /// The Automerge actor id this store writes with while open (hex; new at each open).
    pub actor: String,
}

/// What one table of the database holds ([`Store::table_sizes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSize {
    /// The table.
    pub name: String,
    /// Its entries' keys and values.
    pub entry_bytes: u64,
    /// Its B-tree's own bookkeeping (branch pages, page headers).
    pub tree_bytes: u64,
    /// Free space inside its pages.
    pub free_bytes: u64,
}

/// One record as read from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordView {
    /// Its collection.
    pub collection: String,
    /// Its id.
    pub id: DocId,
    /// The record's fields.
    pub record: Fields,
    /// Soft-deleted.
    pub deleted: bool,
    /// Position of its latest change in the local feed.
    pub seq: u64,
}

/// A filter of a list query, on an indexed field.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// The field equals the value (case-insensitively for name fields).
    Equals {
        /// The field.
        field: String,
        /// The value.
        value: String,
    },
    /// The field starts with the text (name fields, case-insensitive).
    Prefix {
        /// The field.
        field: String,
        /// The start of the value.
        prefix: String,
    },
}

/// A page of a list query.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// The collection.
    pub collection: String,
    /// Filters on indexed fields; all must hold.
    pub filters: Vec<Filter>,
    /// Also list soft-deleted records.
    pub include_deleted: bool,
    /// Page size.
    pub limit: usize,
    /// Where the previous page stopped ([`Page::next`]).
    pub cursor: Option<Vec<u8>>,
}

/// The answer to a [`Query`].
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// The records, in index order (by `updated_at` when there is no filter).
    pub records: Vec<RecordView>,
    /// Pass as [`Query::cursor`] for the next page; `None` at the end.
    pub next: Option<Vec<u8>>,
    /// Records that matched but could not be read (damaged), with the reason.
    pub unreadable: Vec<(DocId, String)>,
}

/// A record changed after a feed position.
#[derive(Debug, Clone)]
pub struct FeedEntry {
    /// Its position.
    pub seq: u64,
    /// The record, or why it could not be read.
    pub record: std::result::Result<RecordView, String>,
}

/// What a memoized summary was computed for: the feed position, the writer's generation,
/// the scope.
pub(crate) type SummaryKey = (u64, u64, medmesh_protocol::scope::Scope);

/// The medmesh store: Automerge documents in redb, with a change feed and indexes.
///
/// Cloning is cheap; all clones share one database and one writer thread.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    db: Arc<DbSlot>,
    pub(crate) feed: tokio::sync::watch::Receiver<u64>,
    schema: Arc<SchemaCell>,
    info: StoreInfo,
    writer: std::sync::mpsc::SyncSender<Command>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    /// The last anti-entropy summary and the feed position it was computed at (a memo:
    /// anyone may compute and replace it).
    pub(crate) summary: Mutex<Vec<(SummaryKey, medmesh_protocol::wire::Summary)>>,
    /// The clinics this store holds (the writer changes it).
    pub(crate) scope: Arc<crate::scope::ScopeCell>,
    /// Bumped by the writer when what is held changed without the feed moving.
    pub(crate) summary_generation: Arc<std::sync::atomic::AtomicU64>,
    origins: Arc<crate::writer::Origins>,
    /// The device key changes are signed with (written by the writer only).
    pub(crate) author: Arc<AuthorCell>,
    /// Who may have made the changes peers send.
    pub(crate) authority: Option<Arc<dyn Authority>>,
    /// This node's signatures not yet in the table (written by the writer only).
    pub(crate) own_pending: Arc<signing::OwnPending>,
    /// Seals known here (checked once, kept by the writer).
    pub(crate) seals: Arc<signing::SealBook>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.writer.try_send(Command::Shutdown);
        if let Ok(mut handle) = self.writer_thread.lock()
            && let Some(handle) = handle.take()
        {
            let _ = handle.join();
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("info", &self.inner.info)
            .finish()
    }
}

impl Store {
    /// Opens the store in the file at `path`, creating it when it does not exist.
    pub fn open(path: &Path, schema: Schema, options: StoreOptions) -> Result<Self> {
        let db = open_file(path)?;
        let journal = Journal::open(path, None)?;
        let reopen_path = path.to_path_buf();
        Self::start(
            DbSlot::new(db, Box::new(move || open_file(&reopen_path))),
            Some(path.to_path_buf()),
            schema,
            options,
            Some(journal),
        )
    }

    /// Opens the store in the encrypted file at `path` with its data key, creating it
    /// (encrypted) when it does not exist. Everything in the file — documents, feed,
    /// indexes — is encrypted and authenticated ([`crate::crypt`]). A wrong key is
    /// refused with [`StoreError::WrongKey`] before anything is read or written; a plain
    /// store file with [`StoreError::NotEncrypted`].
    pub fn open_encrypted(
        path: &Path,
        key: &DataKey,
        schema: Schema,
        options: StoreOptions,
    ) -> Result<Self> {
        let db = open_encrypted_file(path, key)?;
        let journal = Journal::open(path, Some(key))?;
        let reopen_path = path.to_path_buf();
        let reopen_key = key.clone();
        Self::start(
            DbSlot::new(
                db,
                Box::new(move || open_encrypted_file(&reopen_path, &reopen_key)),
            ),
            Some(path.to_path_buf()),
            schema,
            options,
            Some(journal),
        )
    }

    /// A store that lives in memory only, for tests.
    pub fn memory(schema: Schema) -> Result<Self> {
        Self::on_memory(&MemoryDisk::new(), schema)
    }

    /// [`Store::memory`] with options (an authority, say).
    pub fn memory_with(schema: Schema, options: StoreOptions) -> Result<Self> {
        let disk = MemoryDisk::new();
        Self::with_backend(move || disk.clone(), schema, options)
    }

    /// A store on a [`MemoryDisk`] (reopened on the same disk, it finds its data again).
    pub fn on_memory(disk: &MemoryDisk, schema: Schema) -> Result<Self> {
        let disk = disk.clone();
        Self::with_backend(move || disk.clone(), schema, StoreOptions::default())
    }

    /// A store on a custom redb storage backend (tests use one that fails like a full
    /// disk). `backend` is called again to reopen the database after a failed write, and
    /// must give access to the same data.
    #[doc(hidden)]
    pub fn with_backend<B: StorageBackend>(
        backend: impl Fn() -> B + Send + Sync + 'static,
        schema: Schema,
        options: StoreOptions,
    ) -> Result<Self> {
        let open = move || {
            Database::builder()
                .set_cache_size(PAGE_CACHE_BYTES)
                .create_with_backend(backend())
                .map_err(|e| open_error("(custom backend)", e))
        };
        let db = open()?;
        Self::start(DbSlot::new(db, Box::new(open)), None, schema, options, None)
    }

    fn start(
        db: DbSlot,
        path: Option<PathBuf>,
        schema: Schema,
        options: StoreOptions,
        journal: Option<Journal>,
    ) -> Result<Self> {
        let display = path
            .as_ref()
            .map_or_else(|| "(memory)".to_owned(), |p| p.display().to_string());
        let info = init_tables(&*db.get()?, path.clone()).map_err(|e| match e {
            StoreError::CorruptDatabase { reason, .. } => StoreError::CorruptDatabase {
                path: display.clone(),
                reason,
            },
            other => other,
        })?;
        let db = Arc::new(db);
        let base = Arc::new(schema);
        // The schema in force includes the mesh's declarations, from its schema document.
        let effective = {
            let txn = db.get()?.begin_read()?;
            let id = medmesh_protocol::schema::schema_doc_id();
            match read_meta(&txn, &id)? {
                Some(meta) if !meta.held => {
                    let record = record::read_record(&load_document(&txn, &id, &meta)?);
                    crate::receive::effective_schema(&base, &record)
                }
                _ => (*base).clone(),
            }
        };
        let schema: Arc<SchemaCell> = Arc::new(std::sync::RwLock::new(Arc::new(effective)));
        let (tx, rx) = std::sync::mpsc::sync_channel(WRITE_QUEUE_CAPACITY);
        let (feed_tx, feed) = tokio::sync::watch::channel(0);
        let origins = Arc::new(Mutex::new(lru::LruCache::new(
            std::num::NonZeroUsize::new(crate::writer::ORIGINS_CAPACITY)
                .unwrap_or(std::num::NonZeroUsize::MIN),
        )));
        let author: Arc<AuthorCell> = Arc::default();
        let own_pending: Arc<signing::OwnPending> = Arc::default();
        let seals: Arc<signing::SealBook> = Arc::default();
        let authority = options.authority.clone();
        let scope: Arc<crate::scope::ScopeCell> =
            Arc::new(std::sync::RwLock::new(options.scope.clone()));
        let summary_generation: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let mut writer = Writer::new(
            feed_tx,
            db.clone(),
            schema.clone(),
            base,
            origins.clone(),
            author.clone(),
            own_pending.clone(),
            seals.clone(),
            &info,
            options,
            journal,
            scope.clone(),
            summary_generation.clone(),
        )?;
        // Writes acknowledged before an unclean stop that only the journal holds.
        writer.replay_journal()?;
        writer.reindex_stale()?;
        writer.place_existing()?;
        let handle = std::thread::Builder::new()
            .name("medmesh-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Storage(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                feed,
                schema,
                info,
                writer: tx,
                writer_thread: Mutex::new(Some(handle)),
                summary: Mutex::new(Vec::new()),
                origins,
                author,
                authority,
                own_pending,
                seals,
                scope,
                summary_generation,
            }),
        })
    }

    /// The schema records are checked against: the built-in collections and those the
    /// mesh's schema document declares (it changes when that document does).
    pub fn schema(&self) -> Arc<Schema> {
        self.inner
            .schema
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Facts about this store.
    pub fn info(&self) -> &StoreInfo {
        &self.inner.info
    }

    /// Applies a batch of writes; answers once they are durably stored.
    ///
    /// The outer error is for the whole batch (disk full, store closed, or — for an
    /// atomic batch — the first operation that failed); the inner results are per
    /// operation.
    pub async fn write(&self, mut batch: WriteBatch) -> Result<Vec<Result<WriteOutcome>>> {
        let mut prepared = Vec::new();
        let new_records = creates(&batch);
        let only_local = batch
            .ops
            .iter()
            .all(|op| !matches!(op.kind, WriteKind::Merge(_)));
        if (1..PREPARE_OFF_WRITER).contains(&new_records) && only_local {
            // A few new records made here: worked out on this task (about 0.1 ms each),
            // so that the writer only stores them and writers at once share the cores.
            // (What a peer sent may be large: it is loaded off the async runtime.)
            prepared = self.prepare(&mut batch);
        } else if new_records >= PREPARE_OFF_WRITER {
            // Work the new documents out on a blocking thread, beside the writer.
            let store = self.clone();
            (batch, prepared) = tokio::task::spawn_blocking(move || {
                let prepared = store.prepare(&mut batch);
                (batch, prepared)
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        }
        let (reply, answer) = oneshot::channel();
        self.send_async(Command::Write {
            batch,
            prepared,
            reply,
        })
        .await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Hands a command to the writer from async code without blocking the runtime's
    /// thread: when the queue is full the wait happens on a blocking thread.
    pub(crate) async fn send_async(&self, command: Command) -> Result<()> {
        match self.inner.writer.try_send(command) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Err(StoreError::Closed),
            Err(std::sync::mpsc::TrySendError::Full(command)) => {
                let writer = self.inner.writer.clone();
                tokio::task::spawn_blocking(move || writer.send(command))
                    .await
                    .map_err(|_| StoreError::Closed)?
                    .map_err(|_| StoreError::Closed)
            }
        }
    }

    /// [`Store::write`] for threads outside an async runtime.
    pub fn write_blocking(&self, mut batch: WriteBatch) -> Result<Vec<Result<WriteOutcome>>> {
        let prepared = if creates(&batch) >= PREPARE_OFF_WRITER {
            self.prepare(&mut batch)
        } else {
            Vec::new()
        };
        let (reply, answer) = oneshot::channel();
        self.send(Command::Write {
            batch,
            prepared,
            reply,
        })?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// Readies a message for this connection: every seal its documents' signatures
    /// refer to goes once per connection (`sent`), in the first message that needs it,
    /// and not again. (What is read for a peer carries the seals it needs, but the
    /// session may leave some of it out; this is done as the message goes.) Parts of a
    /// large document are left as they are.
    pub fn seals_for_send(
        &self,
        message: &mut medmesh_protocol::wire::Message,
        sent: &mut SealsSent,
    ) {
        use medmesh_protocol::authorship::SealLookup;
        use medmesh_protocol::wire::Message;
        let lookup = self.seal_lookup();
        let sigs: Vec<&mut serde_bytes::ByteBuf> = match message {
            Message::Feed { entries, .. } => entries
                .iter_mut()
                .filter(|e| e.payload.is_some())
                .map(|e| &mut e.payload_sigs)
                .collect(),
            Message::Docs { docs, .. } => docs.iter_mut().map(|d| &mut d.sigs).collect(),
            _ => return,
        };
        for sigs in sigs {
            if sigs.is_empty() {
                continue;
            }
            let once =
                signing::seals_once(std::mem::take(sigs).into_vec(), sent, |id| lookup.seal(id));
            *sigs = serde_bytes::ByteBuf::from(once);
        }
    }

    /// Checks the seals carried by signatures a peer sent (those not known yet) and
    /// keeps those that hold, so that what refers to them is accepted, whichever batch it
    /// comes in. A receiver calls this in the order things arrived; writes do it too.
    pub fn admit_seals<'a>(&self, sigs: impl Iterator<Item = &'a [u8]>) {
        let mut keys = medmesh_protocol::authorship::KeyCache::default();
        for sigs in sigs {
            if let Ok(decoded) = medmesh_protocol::authorship::decode(sigs)
                && !decoded.seals.is_empty()
            {
                self.inner.seals.admit(decoded.seals, &mut keys);
            }
        }
    }

    /// The seals known here, read from the table when not in memory.
    pub(crate) fn seal_lookup(
        &self,
    ) -> signing::Lookup<'_, impl Fn(&SealId) -> Option<Seal> + Sync + '_> {
        signing::Lookup {
            book: &self.inner.seals,
            load: move |id: &SealId| {
                let txn = self.read_txn().ok()?;
                signing::read_seal(&txn.open_table(SEALS).ok()?, id)
            },
        }
    }

    fn prepare(&self, batch: &mut WriteBatch) -> Vec<Option<Prepared>> {
        let author = signing::current(&self.inner.author);
        let actor = match &author {
            Some(author) => author.actor.clone(),
            None => actor_from_hex(&self.inner.info.actor),
        };
        let schema = self.schema();
        let authority = self.inner.authority.as_deref();
        // Seals that came with what arrived are checked first, once, for every write
        // of the batch that refers to them.
        self.admit_seals(batch.ops.iter().filter_map(|op| match &op.kind {
            WriteKind::Merge(received) => Some(received.sigs.as_slice()),
            _ => None,
        }));
        let seals = self.seal_lookup();
        let work = |ops: &mut [crate::write::WriteOp]| {
            prepare_creates(&schema, &actor, author.as_deref(), authority, &seals, ops)
        };
        if batch.ops.len() < PREPARE_IN_TWO {
            return work(&mut batch.ops);
        }
        // Two threads share a large batch (an import, a page of an initial sync): loading,
        // signing and checking are most of the work, and the writer waits for them.
        let half = batch.ops.len() / 2;
        let (first, second) = batch.ops.split_at_mut(half);
        std::thread::scope(|scope| {
            let other = scope.spawn(|| work(second));
            let mut prepared = work(first);
            match other.join() {
                Ok(more) => prepared.extend(more),
                // As if it had happened on this thread.
                Err(panic) => std::panic::resume_unwind(panic),
            }
            prepared
        })
    }

    /// Signs every change this store makes from now on with the device key `secret`
    /// (the node's Ed25519 identity), writing as that device's actor
    /// ([`medmesh_protocol::authorship`]). Set once, when the node knows its key.
    pub fn sign_as_blocking(&self, secret: &[u8; 32]) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::SignAs {
            author: Arc::new(Author::new(secret)),
            reply,
        })?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// Who made or vouched for each change of a document, as the signatures kept here
    /// say: change hash → (signer's public key, whether it is a vouch). Only verified
    /// signatures are kept (in a store with an authority).
    pub fn signers(&self, id: &DocId) -> Result<Signers> {
        let own = self.inner.own_pending.all().remove(id).unwrap_or_default();
        let txn = self.read_txn()?;
        let doc = self.document_any(&txn, id)?;
        let table = txn.open_table(SIGS)?;
        let actors: HashMap<[u8; 32], Vec<u8>> = doc
            .map(|doc| {
                medmesh_protocol::authorship::facts_of_doc(&doc, &[])
                    .into_iter()
                    .map(|f| (f.hash, f.actor))
                    .collect()
            })
            .unwrap_or_default();
        let mut out = HashMap::new();
        for entry in signing::of_doc(&table, id)?.into_iter().chain(own) {
            let actor = actors
                .get(&entry.hash)
                .map(Vec::as_slice)
                .unwrap_or_default();
            if let Some(signer) = medmesh_protocol::authorship::signer_of(actor, &entry) {
                out.insert(entry.hash, (signer, entry.voucher().is_some()));
            }
        }
        Ok(out)
    }

    fn document_any(&self, txn: &redb::ReadTransaction, id: &DocId) -> Result<Option<Automerge>> {
        match read_meta(txn, id)?.filter(|m| !m.held) {
            Some(meta) => Ok(Some(load_document(txn, id, &meta)?)),
            None => Ok(None),
        }
    }

    /// Writes one store-wide value (such as the node's identity) durably.
    pub fn put_info_blocking(&self, key: &str, value: &[u8]) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::PutInfo {
            key: key.to_owned(),
            value: value.to_vec(),
            reply,
        })?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// Writes everything committed so far to the store file itself (a durable commit),
    /// leaving nothing in the journal to replay: for a clean stop while other handles
    /// of the store may still be alive.
    pub fn checkpoint_blocking(&self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Checkpoint { reply })?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// What each of the database's tables holds, largest first: its name, the bytes of
    /// its entries, of its B-tree's own bookkeeping, and of free space inside its pages.
    pub fn table_sizes(&self) -> Result<Vec<TableSize>> {
        use redb::ReadableTableMetadata;
        let db = self.inner.db.get()?;
        let txn = db.begin_read()?;
        let mut sizes = Vec::new();
        for handle in txn.list_tables()? {
            let name = redb::TableHandle::name(&handle).to_owned();
            let table = txn
                .open_untyped_table(handle)
                .map_err(|e| StoreError::Storage(e.to_string()))?;
            let stats = table.stats()?;
            sizes.push(TableSize {
                name,
                entry_bytes: stats.stored_bytes(),
                tree_bytes: stats.metadata_bytes(),
                free_bytes: stats.fragmented_bytes(),
            });
        }
        sizes.sort_by_key(|s| std::cmp::Reverse(s.entry_bytes + s.tree_bytes + s.free_bytes));
        Ok(sizes)
    }

    /// Gives back the database file's free pages: writes the journal out, then lets redb
    /// move the live pages to the front and shorten the file. Writes and reads wait
    /// meanwhile, so it is for a node that is stopped (`medmesh compact`) or idle.
    /// Answers the file's size before and after (bytes; both 0 for a store in memory).
    pub fn compact_file_blocking(&self) -> Result<(u64, u64)> {
        let size = || {
            self.inner
                .info
                .path
                .as_ref()
                .and_then(|p| std::fs::metadata(p).ok())
                .map_or(0, |m| m.len())
        };
        let before = size();
        let (reply, answer) = oneshot::channel();
        self.send(Command::CompactFile { reply })?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)??;
        Ok((before, size()))
    }

    /// Compacts every document that has change chunks, now (the writer also does this in
    /// the background when idle). Answers with the number of documents compacted.
    pub fn compact_all_blocking(&self) -> Result<usize> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::CompactAll { reply })?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    pub(crate) fn send(&self, command: Command) -> Result<()> {
        self.inner
            .writer
            .send(command)
            .map_err(|_| StoreError::Closed)
    }

    /// The peer this node's version of a document came from unchanged (`heads` are the
    /// document's heads now, as in its feed entry), if it came whole from one.
    pub fn origin(&self, id: &DocId, heads: &[u8]) -> Option<String> {
        let heads = medmesh_protocol::wire::split_heads(heads)?;
        let mut origins = self.inner.origins.lock().ok()?;
        let (recorded, from) = origins.get(id)?;
        let mut sorted = heads;
        sorted.sort_unstable();
        (*recorded == sorted).then(|| from.clone())
    }

    /// Feed entries after `after` to announce to a peer (see [`Store::feed_page`]): each
    /// with the peer its version came from unchanged, if any, and, within
    /// [`PUSH_ENTRY_BYTES`] each and [`PUSH_PAGE_BYTES`] a page, the document's latest
    /// change (the bytes of its last write, or a new document whole), so that a peer
    /// that had the version before needs no request for it.
    ///
    /// Only documents for a device of `scope` are announced (the position reached still
    /// covers those left out).
    pub fn local_feed_page(
        &self,
        after: u64,
        limit: usize,
        scope: &medmesh_protocol::scope::Scope,
    ) -> Result<(Vec<medmesh_protocol::sync::LocalEntry>, u64)> {
        let (mut entries, mut last) = self.feed_page(after, limit)?;
        let txn = self.read_txn()?;
        if !scope.is_all() {
            // Reads on past what the peer does not take, up to SCOPED_SCAN pages, so that a
            // device of one clinic gets pages as full as one of all clinics (each page
            // costs a round trip).
            let mut kept = Vec::with_capacity(limit.min(entries.len()));
            self.with_reach(&txn, scope, |reach| {
                let mut from = after;
                let mut pages = 0;
                loop {
                    let reached = last;
                    for item in entries.drain(..) {
                        let seq = item.seq;
                        if reach.sends(&item.id)? {
                            kept.push(item);
                            if kept.len() == limit {
                                last = seq;
                                return Ok(());
                            }
                        }
                    }
                    pages += 1;
                    if reached == from || pages == SCOPED_SCAN {
                        break;
                    }
                    from = reached;
                    (entries, last) = self.feed_page(from, limit)?;
                }
                Ok(())
            })?;
            entries = kept;
        }
        let own = self.inner.own_pending.all();
        let docs = txn.open_table(DOCS)?;
        let chunks = txn.open_table(CHUNKS)?;
        let sigs = txn.open_table(SIGS)?;
        let seals = txn.open_table(SEALS)?;
        let find = |id: &SealId| {
            self.inner
                .seals
                .find(id, |id| signing::read_seal(&seals, id))
        };
        let author = signing::current(&self.inner.author);
        // Each seal once in this page (the session sends each once per connection).
        let mut sent = SealsSent::new();
        let mut budget = PUSH_PAGE_BYTES;
        let mut out = Vec::with_capacity(entries.len());
        for mut item in entries {
            if let Some(meta) = read_meta(&txn, &item.id)?
                && !meta.held
                && meta.heads.len() * 32 == item.heads.len()
            {
                let key = doc_key(&item.id);
                let latest = if meta.chunks == 0 {
                    docs.get(key)?.map(|v| v.value().to_vec())
                } else {
                    chunks
                        .get((key, meta.chunks - 1))?
                        .map(|v| v.value().to_vec())
                };
                if let Some(bytes) = latest.filter(|b| b.len() <= PUSH_ENTRY_BYTES.min(budget)) {
                    budget -= bytes.len();
                    item.payload_sigs = serde_bytes::ByteBuf::from(signing::for_payload(
                        &sigs,
                        &item.id,
                        &bytes,
                        author.as_deref(),
                        own.get(&item.id).cloned().unwrap_or_default(),
                        &mut sent,
                        &find,
                    )?);
                    item.payload = Some(serde_bytes::ByteBuf::from(bytes));
                }
            }
            out.push(medmesh_protocol::sync::LocalEntry {
                origin: self.origin(&item.id, &item.heads),
                item,
            });
        }
        Ok((out, last))
    }

    /// Writes node-local values (`None` removes one) in one durable transaction: the
    /// state of a node module that is never replicated, such as the gateway's positions.
    pub fn put_local_blocking(&self, entries: Vec<(String, Option<Vec<u8>>)>) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::PutLocal { entries, reply })?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// Reads one node-local value.
    pub fn get_local(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.read_txn()?;
        let table = txn.open_table(LOCAL)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Node-local values whose key starts with `prefix`, in key order.
    pub fn local_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let txn = self.read_txn()?;
        let table = txn.open_table(LOCAL)?;
        let mut out = Vec::new();
        for entry in table.range(prefix..)? {
            let (key, value) = entry?;
            if !key.value().starts_with(prefix) {
                break;
            }
            out.push((key.value().to_owned(), value.value().to_vec()));
        }
        Ok(out)
    }

    /// Reads one store-wide value.
    pub fn get_info(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.read_txn()?;
        let table = txn.open_table(INFO)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    pub(crate) fn read_txn(&self) -> Result<ReadTransaction> {
        Ok(self.inner.db.get()?.begin_read()?)
    }

    /// Reads one record of `collection`.
    pub fn get(&self, collection: &str, id: &DocId) -> Result<RecordView> {
        self.check_collection(collection)?;
        let txn = self.read_txn()?;
        let meta = read_meta(&txn, id)?
            .filter(|m| m.collection == collection && !m.held)
            .ok_or_else(|| StoreError::NotFound {
                collection: collection.to_owned(),
                id: *id,
            })?;
        let doc = load_document(&txn, id, &meta)?;
        Ok(view(*id, meta, &doc))
    }

    /// Whether a record exists in `collection` (deleted or not), without loading it.
    pub fn exists(&self, collection: &str, id: &DocId) -> Result<bool> {
        let txn = self.read_txn()?;
        Ok(read_meta(&txn, id)?.is_some_and(|m| m.collection == collection && !m.held))
    }

    /// The bytes a record's document takes here (snapshot and change chunks), without
    /// loading it; `None` when there is no such document.
    pub fn stored_bytes(&self, id: &DocId) -> Result<Option<u64>> {
        let txn = self.read_txn()?;
        if read_meta(&txn, id)?.is_none_or(|m| m.held) {
            return Ok(None);
        }
        let docs = txn.open_table(DOCS)?;
        let chunks = txn.open_table(CHUNKS)?;
        let mut total = docs
            .get(doc_key(id))?
            .map_or(0, |snapshot| snapshot.value().len() as u64);
        for chunk in chunks.range((doc_key(id), 0)..=(doc_key(id), u32::MAX))? {
            total += chunk?.1.value().len() as u64;
        }
        Ok(Some(total))
    }

    /// Loads the Automerge document of one record (for history and conflicts).
    pub fn document(&self, collection: &str, id: &DocId) -> Result<Automerge> {
        self.check_collection(collection)?;
        let txn = self.read_txn()?;
        let meta = read_meta(&txn, id)?
            .filter(|m| m.collection == collection && !m.held)
            .ok_or_else(|| StoreError::NotFound {
                collection: collection.to_owned(),
                id: *id,
            })?;
        load_document(&txn, id, &meta)
    }

    fn check_collection(&self, collection: &str) -> Result<()> {
        match self.schema().collection(collection) {
            Some(_) => Ok(()),
            None => Err(StoreError::UnknownCollection(collection.to_owned())),
        }
    }

    /// Lists records of a collection, optionally filtered on indexed fields.
    pub fn list(&self, query: &Query) -> Result<Page> {
        let schema = self.schema();
        let spec = schema
            .collection(&query.collection)
            .ok_or_else(|| StoreError::UnknownCollection(query.collection.clone()))?;
        let limit = query.limit.max(1);
        // The first filter picks the index to scan; the others are checked on each record.
        let mut checks = Vec::new();
        let (scan_prefix, start) = match query.filters.first() {
            None => {
                let prefix = index_prefix(&query.collection, meta::UPDATED_AT);
                (prefix.clone(), prefix)
            }
            Some(first) => {
                for filter in &query.filters {
                    let (field, text) = match filter {
                        Filter::Equals { field, value } => (field, value),
                        Filter::Prefix { field, prefix } => (field, prefix),
                    };
                    let spec_field = spec.field(field).filter(|f| f.index.is_some());
                    let Some(kind) = spec_field.and_then(|f| f.index) else {
                        let indexed: Vec<&str> =
                            spec.indexed_fields().map(|f| f.name.as_str()).collect();
                        return Err(StoreError::BadQuery(format!(
                            "`{field}` cannot be searched in {}: searchable fields are {}",
                            query.collection,
                            indexed.join(", ")
                        )));
                    };
                    if matches!(filter, Filter::Prefix { .. }) && kind != IndexKind::Prefix {
                        return Err(StoreError::BadQuery(format!(
                            "`{field}` can only be matched exactly, not by its beginning (drop the *)"
                        )));
                    }
                    let normalized = index_value(&serde_json::Value::String(text.clone()), kind)
                        .unwrap_or_default();
                    checks.push((
                        field.clone(),
                        kind,
                        normalized,
                        matches!(filter, Filter::Prefix { .. }),
                    ));
                }
                let (field, _, value, is_prefix) = &checks[0];
                let mut prefix = index_prefix(&query.collection, field);
                prefix.extend(value.bytes().filter(|b| *b != 0));
                if !is_prefix {
                    prefix.push(0);
                }
                let _ = first;
                (prefix.clone(), prefix)
            }
        };
        let txn = self.read_txn()?;
        let index = txn.open_table(INDEX)?;
        let lower = match &query.cursor {
            Some(cursor) if cursor.starts_with(&scan_prefix) => Bound::Excluded(cursor.as_slice()),
            _ => Bound::Included(start.as_slice()),
        };
        let mut page = Page::default();
        let mut last_key: Option<Vec<u8>> = None;
        let range = index.range::<&[u8]>((lower, Bound::Unbounded))?;
        for entry in range {
            let (key, _) = entry?;
            let key = key.value();
            if !key.starts_with(&scan_prefix) {
                break;
            }
            if page.records.len() >= limit {
                page.next = last_key.take();
                break;
            }
            last_key = Some(key.to_vec());
            let Some(id) = doc_of_index_key(key) else {
                continue;
            };
            let Some(meta) = read_meta(&txn, &id)? else {
                continue;
            };
            if (meta.deleted && !query.include_deleted) || meta.held {
                continue;
            }
            let doc = match load_document(&txn, &id, &meta) {
                Ok(doc) => doc,
                Err(err) => {
                    page.unreadable.push((id, err.to_string()));
                    continue;
                }
            };
            let record_view = view(id, meta, &doc);
            let matches = checks
                .iter()
                .skip(1)
                .all(|(field, kind, value, is_prefix)| {
                    record_view
                        .record
                        .get(field)
                        .and_then(|v| index_value(v, *kind))
                        .is_some_and(|v| {
                            if *is_prefix {
                                v.starts_with(value.as_str())
                            } else {
                                v == *value
                            }
                        })
                });
            if matches {
                page.records.push(record_view);
            }
        }
        Ok(page)
    }

    /// Records changed after feed position `since`, oldest change first, at most `limit`.
    pub fn changes_since(&self, since: u64, limit: usize) -> Result<Vec<FeedEntry>> {
        let txn = self.read_txn()?;
        let feed = txn.open_table(FEED)?;
        let mut out = Vec::new();
        for entry in feed.range(since.saturating_add(1)..)?.take(limit) {
            let (seq, id) = entry?;
            let id = key_doc(id.value());
            let record = match read_meta(&txn, &id)? {
                None => Err(format!("record {id} has no metadata")),
                Some(meta) if meta.held => Err(format!(
                    "record {id} of {} arrived from a peer but could not be merged; it is held (see /v1/status)",
                    meta.collection
                )),
                Some(meta) => load_document(&txn, &id, &meta)
                    .map(|doc| view(id, meta, &doc))
                    .map_err(|e| e.to_string()),
            };
            out.push(FeedEntry {
                seq: seq.value(),
                record,
            });
        }
        Ok(out)
    }

    /// The position of the latest change in the local feed (0 when empty).
    pub fn last_seq(&self) -> Result<u64> {
        let txn = self.read_txn()?;
        let feed = txn.open_table(FEED)?;
        Ok(feed.last()?.map_or(0, |(k, _)| k.value()))
    }

    /// Live (not deleted) records per collection.
    pub fn counts(&self) -> Result<BTreeMap<String, u64>> {
        let txn = self.read_txn()?;
        let table = txn.open_table(COUNTS)?;
        let mut out = BTreeMap::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            out.insert(k.value().to_owned(), v.value());
        }
        Ok(out)
    }

    /// Replaces the stored snapshot of a document with raw bytes. Only for tests that
    /// check how a damaged document is reported.
    #[doc(hidden)]
    pub fn debug_overwrite_document(&self, id: &DocId, bytes: &[u8]) -> Result<()> {
        let txn = self.inner.db.get()?.begin_write()?;
        {
            let mut docs = txn.open_table(DOCS)?;
            docs.insert(doc_key(id), bytes)?;
            let mut chunks = txn.open_table(CHUNKS)?;
            chunks.retain_in((doc_key(id), 0)..=(doc_key(id), u32::MAX), |_, _| false)?;
        }
        txn.commit()?;
        self.send(Command::Evict { id: *id })?;
        Ok(())
    }
}

/// Opens (or creates) the database file; a file so damaged that redb panics on it is
/// reported as damaged.
fn open_file(path: &Path) -> Result<Database> {
    let display = path.display().to_string();
    if crate::crypt::is_encrypted_store_file(path) {
        return Err(StoreError::Encrypted { path: display });
    }
    let opened = std::panic::catch_unwind(|| {
        Database::builder()
            .set_cache_size(PAGE_CACHE_BYTES)
            .create(path)
    });
    opened_file(path, display, opened)
}

/// Opens (or creates) the encrypted database file: the key is checked before redb reads
/// anything.
fn open_encrypted_file(path: &Path, key: &DataKey) -> Result<Database> {
    let display = path.display().to_string();
    let backend = EncryptedFile::open(path, key)?;
    backend
        .forget_unfinished_creation()
        .map_err(|err| match StoreError::from_io(&err) {
            StoreError::DiskFull => StoreError::DiskFull,
            _ => StoreError::Open {
                path: display.clone(),
                reason: err.to_string(),
            },
        })?;
    // While redb opens the file it may walk a commit a crash interrupted: a torn block
    // then reads as zeros, which redb's checksums refuse. Afterwards it is an error.
    let recovery = backend.recovery_window();
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Database::builder()
            .set_cache_size(PAGE_CACHE_BYTES)
            .create_with_backend(backend)
    }));
    recovery.end();
    opened_file(path, display, opened)
}

/// What redb's open gave, as the store's result.
fn opened_file(
    path: &Path,
    display: String,
    opened: std::thread::Result<Result<Database, redb::DatabaseError>>,
) -> Result<Database> {
    match opened {
        Ok(Ok(db)) => {
            restrict_permissions(path);
            Ok(db)
        }
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(StoreError::Open {
            path: display,
            reason: "another medmesh node is already using it; stop that node first, or give this one another --data directory".into(),
        }),
        Ok(Err(err)) => Err(open_error(&display, err)),
        Err(_) => Err(StoreError::CorruptDatabase {
            path: display,
            reason: "its structure could not be read".into(),
        }),
    }
}

/// A database kept in memory, for tests and the simulator: clones share it, so a store
/// reopened on a clone finds it again, and [`MemoryDisk::copy`] takes a backup.
#[derive(Debug, Clone, Default)]
pub struct MemoryDisk(Arc<redb::backends::InMemoryBackend>);

impl MemoryDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of everything on it now.
    pub fn copy(&self) -> Self {
        let copy = Self::new();
        let len = self.0.len().unwrap_or(0);
        let mut bytes = vec![0u8; len as usize];
        if self.0.read(0, &mut bytes).is_ok() {
            let _ = copy.0.set_len(len);
            let _ = copy.0.write(0, &bytes);
        }
        copy
    }
}

impl StorageBackend for MemoryDisk {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }
}

fn creates(batch: &WriteBatch) -> usize {
    batch
        .ops
        .iter()
        .filter(|op| {
            matches!(
                op.kind,
                crate::write::WriteKind::Create(_) | crate::write::WriteKind::Merge(_)
            )
        })
        .count()
}

fn open_error(path: &str, err: redb::DatabaseError) -> StoreError {
    match err {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(reason)) => {
            StoreError::CorruptDatabase {
                path: path.to_owned(),
                reason,
            }
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            StoreError::Open {
                path: path.to_owned(),
                reason: "permission denied: run medmesh as the user that owns the data directory"
                    .into(),
            }
        }
        redb::DatabaseError::UpgradeRequired(v) => StoreError::Open {
            path: path.to_owned(),
            reason: format!(
                "it was written by an older storage format ({v}); run the medmesh version that wrote it"
            ),
        },
        other => match StoreError::from(other) {
            StoreError::DiskFull => StoreError::DiskFull,
            StoreError::CorruptDatabase { reason, .. } => StoreError::CorruptDatabase {
                path: path.to_owned(),
                reason,
            },
            other => StoreError::Open {
                path: path.to_owned(),
                reason: other.to_string(),
            },
        },
    }
}

/// Creates the tables of a new store, or checks those of an existing one.
fn init_tables(db: &Database, path: Option<PathBuf>) -> Result<StoreInfo> {
    let txn = db.begin_write()?;
    let info = {
        for_each_table(&txn)?;
        let mut table = txn.open_table(INFO)?;
        let format = table.get("format")?.map(|v| v.value().to_vec());
        match format {
            Some(bytes) => {
                let version = <[u8; 4]>::try_from(bytes.as_slice())
                    .ok()
                    .map(u32::from_be_bytes);
                if version != Some(FORMAT_VERSION) {
                    return Err(StoreError::Open {
                        path: path.map(|p| p.display().to_string()).unwrap_or_default(),
                        reason: format!(
                            "its format ({version:?}) is not the one this medmesh writes ({FORMAT_VERSION}); use a matching medmesh version"
                        ),
                    });
                }
            }
            None => {
                table.insert("format", FORMAT_VERSION.to_be_bytes().as_slice())?;
                let epoch = uuid::Uuid::new_v4().simple().to_string();
                table.insert("feed_epoch", epoch.as_bytes())?;
                // A new store places every document as it is written.
                table.insert(crate::scope::PLACED_MARK, b"1".as_slice())?;
            }
        }
        let text = |key: &str| -> Result<Vec<u8>> {
            Ok(table
                .get(key)?
                .map(|v| v.value().to_vec())
                .unwrap_or_default())
        };
        StoreInfo {
            path,
            feed_epoch: String::from_utf8_lossy(&text("feed_epoch")?).into_owned(),
            // A new Automerge actor at every open: a store restored from a backup then
            // never reuses the sequence numbers of changes it lost but others hold.
            actor: rand::random::<[u8; 16]>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        }
    };
    txn.commit()?;
    Ok(info)
}

fn for_each_table(txn: &redb::WriteTransaction) -> Result<()> {
    txn.open_table(DOCS)?;
    txn.open_table(CHUNKS)?;
    txn.open_table(DOC_META)?;
    txn.open_table(FEED)?;
    txn.open_table(INDEX)?;
    txn.open_table(COUNTS)?;
    txn.open_table(PEERS)?;
    txn.open_table(HELD)?;
    txn.open_table(LOCAL)?;
    txn.open_table(SIGS)?;
    txn.open_table(SEALS)?;
    txn.open_table(crate::tables::PLACES)?;
    txn.open_table(crate::tables::PATIENT_DOCS)?;
    txn.open_table(crate::tables::PURGED)?;
    Ok(())
}

/// The database file is readable by its owner only.
fn restrict_permissions(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(err) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!(path = %path.display(), error = %err, "cannot make the database file private to its owner");
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

pub(crate) fn read_meta(txn: &ReadTransaction, id: &DocId) -> Result<Option<DocMeta>> {
    let table = txn.open_table(DOC_META)?;
    let Some(bytes) = table.get(doc_key(id))? else {
        return Ok(None);
    };
    DocMeta::decode(bytes.value())
        .map(Some)
        .ok_or_else(|| StoreError::CorruptDocument {
            id: *id,
            collection: "(unknown)".into(),
            reason: "its metadata entry is unreadable".into(),
        })
}

/// Loads a document from its snapshot and chunks.
pub(crate) fn load_from_tables(
    docs: &impl ReadableTable<u128, &'static [u8]>,
    chunks: &impl ReadableTable<(u128, u32), &'static [u8]>,
    id: &DocId,
    collection: &str,
) -> Result<Automerge> {
    let corrupt = |reason: String| StoreError::CorruptDocument {
        id: *id,
        collection: collection.to_owned(),
        reason,
    };
    let snapshot = docs
        .get(doc_key(id))?
        .ok_or_else(|| corrupt("its snapshot is missing".into()))?;
    let mut doc = Automerge::load(snapshot.value()).map_err(|e| corrupt(e.to_string()))?;
    for chunk in chunks.range((doc_key(id), 0)..=(doc_key(id), u32::MAX))? {
        let (_, bytes) = chunk?;
        doc.load_incremental(bytes.value())
            .map_err(|e| corrupt(e.to_string()))?;
    }
    Ok(doc)
}

pub(crate) fn load_document(
    txn: &ReadTransaction,
    id: &DocId,
    meta: &DocMeta,
) -> Result<Automerge> {
    let docs = txn.open_table(DOCS)?;
    let chunks = txn.open_table(CHUNKS)?;
    load_from_tables(&docs, &chunks, id, &meta.collection)
}

fn view(id: DocId, meta: DocMeta, doc: &Automerge) -> RecordView {
    RecordView {
        collection: meta.collection,
        id,
        record: record::read_record(doc),
        deleted: meta.deleted,
        seq: meta.seq,
    }
}
