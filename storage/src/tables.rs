//! The redb tables. Each name carries a format version ("docs-1"); a change of layout
//! gets a new name and a migration, never a silent reinterpretation.

use redb::TableDefinition;

/// Document id → the document's compacted Automerge snapshot.
pub const DOCS: TableDefinition<u128, &[u8]> = TableDefinition::new("docs-1");

/// (document id, chunk number) → Automerge changes saved since the snapshot.
/// The background compaction folds them into the snapshot.
pub const CHUNKS: TableDefinition<(u128, u32), &[u8]> = TableDefinition::new("chunks-1");

/// Document id → [`crate::meta::DocMeta`]: collection, feed position, flags.
pub const DOC_META: TableDefinition<u128, &[u8]> = TableDefinition::new("doc_meta-1");

/// The change feed: local sequence number → document id. A document appears once, at
/// the position of its latest change; a peer's cursor is a sequence number.
pub const FEED: TableDefinition<u64, u128> = TableDefinition::new("feed-1");

/// Index entries: `collection \0 field \0 value \0 doc-id(16 bytes)` → ().
/// `updated_at` is indexed for every collection, other fields as the schema says.
pub const INDEX: TableDefinition<&[u8], ()> = TableDefinition::new("index-1");

/// Collection → number of live (not deleted) records.
pub const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("counts-1");

/// Store-wide values: format version, feed epoch, actor id, node identity.
pub const INFO: TableDefinition<&str, &[u8]> = TableDefinition::new("info-1");

/// Peer id (or `addr:` + address for a peer known only by address) → what this node
/// keeps about that peer: its feed cursor, addresses, when last seen and synced (JSON of
/// [`crate::PeerRecord`]).
pub const PEERS: TableDefinition<&str, &[u8]> = TableDefinition::new("peers-1");

/// Document id → a document received from a peer that could not be merged here
/// ([`crate::HeldDoc`], CBOR): the bytes as received, why, from whom. Retried when the
/// cause may have gone (a schema change, a restart, new changes of the same document).
pub const HELD: TableDefinition<u128, &[u8]> = TableDefinition::new("held-1");

/// Node-local state of the node's own modules (the gateway's positions and the rows it
/// last exchanged with the cloud): key → bytes. Never replicated, never in the feed.
pub const LOCAL: TableDefinition<&str, &[u8]> = TableDefinition::new("local-1");

/// (Document id, change hash) → the change's signature (64 bytes), followed for a vouch
/// by the voucher's public key; or (32 bytes) the id of the seal that signs it
/// ([`medmesh_protocol::authorship`]). Sent with the change.
pub const SIGS: TableDefinition<(u128, [u8; 32]), &[u8]> = TableDefinition::new("sigs-1");

/// Seal id → a seal ([`medmesh_protocol::authorship::Seal`], encoded): one device's
/// signature over many of its changes. Only seals made here or whose signature held.
pub const SEALS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("seals-1");

/// Document id → where the document belongs when not every device holds it: `c` and a
/// clinic id, or `p` and the id of the patient it follows ([`crate::scope`]).
pub const PLACES: TableDefinition<u128, &[u8]> = TableDefinition::new("places-1");

/// (Patient id, document id) → the clinic the document brings to its patient's clinics
/// (empty if none), a zero byte, and the clinic it brought before its last change.
pub const PATIENT_DOCS: TableDefinition<(u128, u128), &[u8]> =
    TableDefinition::new("patient_docs-1");

/// Patient id → (): patients purged here because they left this device's scope; what
/// arrives for them is refused until something brings them into scope again.
pub const PURGED: TableDefinition<u128, ()> = TableDefinition::new("purged-1");

/// The format version written in [`INFO`] under `format`.
pub const FORMAT_VERSION: u32 = 1;
