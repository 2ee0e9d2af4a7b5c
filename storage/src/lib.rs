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
//! The tables are listed, with their versioned names, in [`tables`].

pub mod error;
pub mod meta;
mod peer;
mod prepare;
mod slot;
mod store;
pub mod tables;
mod working;
mod write;
mod writer;

pub use error::{Result, StoreError};
pub use store::{FeedEntry, Filter, Page, Query, RecordView, Store, StoreInfo, StoreOptions};
pub use write::{PeerRecord, WriteBatch, WriteKind, WriteOp, WriteOutcome};
