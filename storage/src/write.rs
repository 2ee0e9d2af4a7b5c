//! The writes a store accepts.

use medmesh_protocol::record::Fields;
use medmesh_protocol::wire::DocPayload;
use medmesh_protocol::{ChangeAuthor, DocId};

/// What one write does to one record.
#[derive(Debug, Clone)]
pub enum WriteKind {
    /// A new record; fails if the id exists. The id is the record's `id` field, or a new
    /// UUIDv7 when it has none.
    Create(Fields),
    /// Changes only the given fields.
    Patch(Fields),
    /// A person's choice for one field that holds concurrent values (a conflict): the
    /// field at `path` (`["address", "town"]`) is written even where it equals the value
    /// shown, which settles its conflict and no other
    /// ([`medmesh_protocol::record::settle_field`]).
    Choose {
        /// The field, one name per level of nesting.
        path: Vec<String>,
        /// The value chosen.
        value: serde_json::Value,
    },
    /// Makes the record equal to the given fields (written as the minimal set of field
    /// changes); `id` and `created_at` are kept.
    Replace(Fields),
    /// Soft delete: sets `deleted_at`; the record stays as a tombstone.
    Delete,
    /// Merges Automerge changes or a saved document received from elsewhere (another
    /// node), creating the record if it is new here. Never refused for the schema (a
    /// merge must not lose what another device wrote), stored even when its collection
    /// is not known here yet. What cannot be merged at all (damaged bytes, an Automerge
    /// refusal, a record whose `id` or collection disagrees with its key, nesting deeper
    /// than [`crate::MAX_RECORD_DEPTH`]) is kept as received in the held table, with the
    /// reason, and retried later: the outcome says so in [`WriteOutcome::held`].
    Merge(Received),
    /// Creates the record, if it does not exist yet, from a **deterministic first
    /// change**: the same actor (derived from the id), time and content on every
    /// device. Two devices that create the same record while apart (a stock item keyed by
    /// clinic, drug and batch) thus make the identical change, and their documents merge
    /// into one, with one counter per `counters` entry that adds up everyone's moves.
    Ensure {
        /// The identifying fields (the same on every device), `id` included.
        fields: Fields,
        /// Counter fields and their starting value.
        counters: Vec<(String, i64)>,
    },
    /// Adds to counter fields of the record (negative amounts subtract), in one change.
    Increment {
        /// The counter fields and the amount for each.
        counters: Vec<(String, i64)>,
    },
}

/// Automerge bytes received from another node, with what the sender said about them.
#[derive(Debug, Clone, Default)]
pub struct Received {
    /// A saved document, or changes.
    pub bytes: Vec<u8>,
    /// The heads the sender had after these bytes (empty when not known). A document
    /// held here is offered to other peers under these heads.
    pub heads: Vec<[u8; 32]>,
    /// The peer it came from, for the held table and the logs.
    pub from: Option<String>,
    /// Sent ahead of a request (with an announcement), for a receiver that may not have
    /// what it builds on: if it cannot be merged it is dropped, not held — the
    /// announcement is then checked and what is missing asked for as usual.
    pub tentative: bool,
    /// The signatures of the changes in `bytes` ([`medmesh_protocol::authorship`]
    /// entries, as they came).
    pub sigs: Vec<u8>,
}

impl From<Vec<u8>> for Received {
    fn from(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            ..Self::default()
        }
    }
}

/// One write to one record, as one Automerge change.
#[derive(Debug, Clone)]
pub struct WriteOp {
    /// The record's collection.
    pub collection: String,
    /// The record (`None` for a create that takes the id from the record or makes one).
    pub id: Option<DocId>,
    /// What to do.
    pub kind: WriteKind,
    /// Who asks: recorded in the change.
    pub author: ChangeAuthor,
    /// When, in milliseconds since the epoch: the change's time and the record's
    /// `updated_at`.
    pub time_ms: i64,
}

impl WriteOp {
    /// A write made now.
    pub fn new(collection: &str, id: Option<DocId>, kind: WriteKind, author: ChangeAuthor) -> Self {
        Self {
            collection: collection.to_owned(),
            id,
            kind,
            author,
            time_ms: chrono::Utc::now().timestamp_millis(),
        }
    }

    /// The merge of a document a peer sent (`from`), as it came off the wire.
    pub fn received(doc: DocPayload, from: Option<String>, tentative: bool) -> Self {
        Self::new(
            &doc.collection,
            Some(doc.id),
            WriteKind::Merge(Received {
                heads: medmesh_protocol::wire::split_heads(&doc.heads).unwrap_or_default(),
                bytes: doc.bytes.into_vec(),
                from,
                tentative,
                sigs: doc.sigs.into_vec(),
            }),
            ChangeAuthor::default(),
        )
    }
}

/// Writes applied together, in one database transaction.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    /// The writes, in order.
    pub ops: Vec<WriteOp>,
    /// All or nothing: when one write fails, none is stored. Otherwise each write
    /// succeeds or fails on its own (an import).
    pub atomic: bool,
}

impl WriteBatch {
    /// A batch of one write.
    pub fn one(op: WriteOp) -> Self {
        Self {
            ops: vec![op],
            atomic: true,
        }
    }
}

/// The result of one write.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteOutcome {
    /// The record's id.
    pub id: DocId,
    /// The record after the write.
    pub record: Fields,
    /// False when the write asked for what the record already held (no change made).
    pub changed: bool,
    /// The record's position in the local feed.
    pub seq: u64,
    /// For a merge that could not be applied: why. The bytes are kept in the held table
    /// and retried; nothing of them is lost.
    pub held: Option<String>,
}

/// A change to what the node keeps about one peer. The store's writer applies it to the
/// stored entry, so the parts that different tasks maintain (a session its cursor, the
/// network its addresses) never overwrite each other.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerUpdate {
    /// The peer's feed is durably stored here up to `seq` of `epoch`.
    Cursor {
        /// The feed epoch.
        epoch: String,
        /// The position.
        seq: u64,
        /// When this node last held everything of the peer's feed, if it does now.
        synced_ms: Option<i64>,
    },
    /// The peer was connected just now at these addresses (merged with those known).
    Seen {
        /// Addresses (multiaddrs, as text).
        addrs: Vec<String>,
        /// When.
        at_ms: i64,
    },
    /// An address added by hand (`--peer`, the API, an invite): dialed at every start.
    Pin {
        /// The address.
        addr: String,
    },
    /// The peer confirmed it holds this store's feed (of `epoch`) up to `seq`.
    Acked {
        /// This store's feed epoch.
        epoch: String,
        /// The position.
        seq: u64,
    },
    /// The clinics the peer serves (its certificate's; empty: all).
    Clinics {
        /// The clinic ids.
        clinics: Vec<String>,
    },
    /// Read the peer's feed again from its start (this device's scope widened: what the
    /// peer sent before was only what the narrower scope held).
    Rewind,
    /// The peer (of `clinic`) holds these documents at older versions, from before they
    /// left its clinics: they are announced again, to the devices of `clinic` too, so it
    /// learns that they left (and purges them).
    Offer {
        /// The documents.
        ids: Vec<medmesh_protocol::DocId>,
        /// A clinic the peer serves.
        clinic: String,
    },
    /// Forget the peer entirely.
    Forget,
}

/// Addresses kept per peer at most (the newest win).
pub const MAX_PEER_ADDRS: usize = 8;

impl PeerRecord {
    /// Applies an update; `None` when the entry is to be removed.
    pub fn apply(mut self, update: &PeerUpdate) -> Option<Self> {
        match update {
            PeerUpdate::Cursor {
                epoch,
                seq,
                synced_ms,
            } => {
                self.cursor_epoch = Some(epoch.clone());
                self.cursor_seq = *seq;
                if synced_ms.is_some() {
                    self.last_sync_ms = *synced_ms;
                }
            }
            PeerUpdate::Seen { addrs, at_ms } => {
                for addr in addrs {
                    self.addrs.retain(|a| a != addr);
                    self.addrs.push(addr.clone());
                }
                let excess = self.addrs.len().saturating_sub(MAX_PEER_ADDRS);
                self.addrs.drain(..excess);
                self.last_seen_ms = Some(*at_ms);
            }
            PeerUpdate::Pin { addr } => {
                if !self.addrs.contains(addr) {
                    self.addrs.push(addr.clone());
                }
                self.pinned = true;
            }
            PeerUpdate::Acked { epoch, seq } => {
                if self.acked_epoch.as_ref() == Some(epoch) {
                    self.acked_seq = self.acked_seq.max(*seq);
                } else {
                    self.acked_epoch = Some(epoch.clone());
                    self.acked_seq = *seq;
                }
            }
            PeerUpdate::Clinics { clinics } => self.clinics = Some(clinics.clone()),
            PeerUpdate::Rewind => self.cursor_seq = 0,
            // Documents of the store, not the peer's record (the writer does it).
            PeerUpdate::Offer { .. } => {}
            PeerUpdate::Forget => return None,
        }
        Some(self)
    }
}

/// What the node keeps about one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerRecord {
    /// The epoch of the peer's feed that `cursor_seq` belongs to.
    #[serde(default)]
    pub cursor_epoch: Option<String>,
    /// How far this node has durably stored the peer's feed.
    #[serde(default)]
    pub cursor_seq: u64,
    /// Addresses the peer was reached at (multiaddrs, as text).
    #[serde(default)]
    pub addrs: Vec<String>,
    /// Added by hand (`--peer`, the API): dialed even when discovery does not see it.
    #[serde(default)]
    pub pinned: bool,
    /// When the peer was last connected (milliseconds since the epoch).
    #[serde(default)]
    pub last_seen_ms: Option<i64>,
    /// When this node last held everything of the peer's feed.
    #[serde(default)]
    pub last_sync_ms: Option<i64>,
    /// The feed epoch of this store that `acked_seq` belongs to.
    #[serde(default)]
    pub acked_epoch: Option<String>,
    /// How far the peer confirmed it durably holds this store's feed (what it was sent
    /// of it: its scope's documents).
    #[serde(default)]
    pub acked_seq: u64,
    /// The clinics the peer serves, from its certificate (empty: all); `None` until it
    /// proved its membership.
    #[serde(default)]
    pub clinics: Option<Vec<String>>,
}

/// The field at `path` with `value` as a patch of the record's top level
/// (`{"address": {"town": "Kati"}}`): what a choice is checked as (schema, permission).
pub fn choice_as_fields(path: &[String], value: &serde_json::Value) -> Fields {
    let mut nested = value.clone();
    for key in path.iter().skip(1).rev() {
        let mut level = serde_json::Map::new();
        level.insert(key.clone(), nested);
        nested = serde_json::Value::Object(level);
    }
    let mut fields = Fields::new();
    if let Some(top) = path.first() {
        fields.insert(top.clone(), nested);
    }
    fields
}
