//! Documents received from a peer that could not be merged: kept as they arrived, with
//! the reason, and retried — never acknowledged and lost.
//!
//! A held document that exists nowhere else here also gets a feed entry under the heads
//! its sender announced (its metadata flagged `held`), so that other peers can still
//! fetch it from this node as it arrived: a node that cannot read a document does not
//! stop it from reaching nodes that can.

use medmesh_protocol::DocId;
use redb::{ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::error::{Result, StoreError};
use crate::meta::{doc_key, key_doc};
use crate::store::Store;
use crate::tables::HELD;

/// Bytes kept for one held document at most; more is refused (the peer's session ends
/// and it sends them again later), so a peer cannot fill the disk through one document.
pub const MAX_HELD_BYTES: usize = 64 * 1024 * 1024;
/// Payloads kept for one held document at most (the same limit, counted in pieces).
pub const MAX_HELD_PAYLOADS: usize = 1024;

/// A document kept because it could not be merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldDoc {
    /// The collection its sender named.
    pub collection: String,
    /// Why it could not be merged (the latest attempt).
    pub reason: String,
    /// The peer it last came from.
    pub from: Option<String>,
    /// When it first arrived (ms since the epoch).
    pub first_ms: i64,
    /// When it was last tried.
    pub last_try_ms: i64,
    /// How many times merging it was tried.
    pub attempts: u32,
    /// The heads its sender announced for it (concatenated 32-byte hashes).
    pub heads: ByteBuf,
    /// The bytes as received, oldest first.
    pub payloads: Vec<ByteBuf>,
    /// The signatures that came with them ([`medmesh_protocol::authorship`] entries,
    /// concatenated).
    #[serde(default)]
    pub sigs: ByteBuf,
}

impl HeldDoc {
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out)
            .map_err(|e| StoreError::Storage(format!("cannot encode a held document: {e}")))?;
        Ok(out)
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        ciborium::from_reader(bytes).ok()
    }

    /// Total bytes of the payloads and their signatures.
    pub fn size(&self) -> usize {
        self.payloads.iter().map(|p| p.len()).sum::<usize>() + self.sigs.len()
    }

    /// The payloads as one byte string that Automerge loads in one go.
    pub fn joined(&self) -> Vec<u8> {
        self.payloads
            .iter()
            .flat_map(|p| p.iter().copied())
            .collect()
    }
}

/// One held document, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeldSummary {
    /// The document.
    pub id: DocId,
    /// Its collection.
    pub collection: String,
    /// Why it could not be merged.
    pub reason: String,
    /// The peer it came from.
    pub from: Option<String>,
    /// Attempts so far.
    pub attempts: u32,
    /// Bytes kept.
    pub bytes: usize,
}

impl Store {
    /// Documents kept because they could not be merged, at most `limit`, and how many
    /// there are in all.
    pub fn held(&self, limit: usize) -> Result<(Vec<HeldSummary>, u64)> {
        let txn = self.read_txn()?;
        let table = txn.open_table(HELD)?;
        let total = table.len()?;
        let mut out = Vec::new();
        for entry in table.iter()?.take(limit) {
            let (key, value) = entry?;
            let id = key_doc(key.value());
            match HeldDoc::decode(value.value()) {
                Some(held) => out.push(HeldSummary {
                    id,
                    bytes: held.size(),
                    collection: held.collection,
                    reason: held.reason,
                    from: held.from,
                    attempts: held.attempts,
                }),
                None => out.push(HeldSummary {
                    id,
                    collection: String::new(),
                    reason: "its held entry is unreadable".into(),
                    from: None,
                    attempts: 0,
                    bytes: 0,
                }),
            }
        }
        Ok((out, total))
    }

    /// The held entry of one document.
    pub fn held_doc(&self, id: &DocId) -> Result<Option<HeldDoc>> {
        let txn = self.read_txn()?;
        let table = txn.open_table(HELD)?;
        Ok(table
            .get(doc_key(id))?
            .and_then(|v| HeldDoc::decode(v.value())))
    }
}
