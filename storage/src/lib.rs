//! # medmesh-storage
//!
//! The node's durable state, in one redb file. No networking here.
//!
//! - One Automerge document per record, stored as a compacted snapshot plus the change
//!   chunks written since; the writer folds chunks into the snapshot in the background.
//! - The **change feed**: every document changed here (written locally or, later,
//!   received from a peer) gets the next local sequence number. A peer keeps a cursor
//!   into this feed, so catching up costs O(changes since), not O(all records).
//! - Indexes per collection on `updated_at` and on the fields the schema marks
//!   (patient names, government id, clinic, `patient_id` of child records, ...).
//! - Store-wide values: format version, feed epoch, Automerge actor, node identity.
//!
//! Data flow: readers open redb read transactions on any thread ([`Store::get`],
//! [`Store::list`], [`Store::changes_since`]). Every write goes through one writer thread
//! ([`writer`]) over a bounded channel; it batches waiting writes into one durable
//! transaction, so an answered write survives `kill -9`. Loaded documents live in the
//! writer's bounded LRU cache; nothing loads the whole store at start.
//!
//! Documents from peers go through [`WriteKind::Merge`]: they are stored whatever their
//! collection (the mesh's schema may not have arrived yet), checked and isolated (a
//! panic in Automerge or a record that lies about its id refuses that document only),
//! and what cannot be merged is kept in the held table and retried — never acknowledged
//! and lost. The schema in force is the built-in one plus the mesh's schema document
//! ([`Store::declare_schema`]), and changes when that document does.
//!
//! The tables are listed, with their versioned names, in [`tables`].
//!
//! [`Store::open_encrypted`] keeps the whole file encrypted with a [`DataKey`]: redb runs
//! on [`crypt::EncryptedFile`], which authenticates and encrypts every 4 KiB block and
//! keeps redb's crash recovery working (see [`crypt`]).

pub mod crypt;
pub mod error;
mod held;
mod journal;
mod merge;
mod mesh_schema;
pub mod meta;
mod peer;
mod prepare;
mod receive;
mod scope;
mod signing;
mod slot;
mod store;
pub mod tables;
mod working;
mod write;
mod writer;

pub use crypt::{DataKey, EncryptedFile, encrypt_store_file, reencrypt_store_file};
pub use error::{Result, StoreError};
pub use held::{HeldDoc, HeldSummary, MAX_HELD_BYTES};
pub use journal::journal_path;
pub use medmesh_protocol::record::MAX_RECORD_DEPTH;
pub use merge::escape;
pub use scope::PurgeReport;
pub use signing::SealsSent;
pub use store::{
    FeedEntry, Filter, MemoryDisk, Page, Query, RecordView, Signers, Store, StoreInfo,
    StoreOptions, TableSize,
};
pub use write::{
    MAX_PEER_ADDRS, PeerRecord, PeerUpdate, Received, WriteBatch, WriteKind, WriteOp, WriteOutcome,
    choice_as_fields,
};
