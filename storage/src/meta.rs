//! Per-document metadata and index keys.

use medmesh_protocol::DocId;

/// What the store keeps beside each document, so that lists, the feed and compaction
/// need not load the document itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocMeta {
    /// The record's collection.
    pub collection: String,
    /// Position of the document's latest change in the local feed.
    pub seq: u64,
    /// The record's `updated_at` in milliseconds (0 when unknown).
    pub updated_ms: i64,
    /// Soft-deleted (`deleted_at` set).
    pub deleted: bool,
    /// Received from a peer but not mergeable here: the bytes wait in the held table,
    /// the document is served to peers as it arrived and hidden from reads.
    pub held: bool,
    /// Chunks saved since the snapshot.
    pub chunks: u32,
    /// The document's heads (Automerge change hashes), so the feed can be served
    /// without loading documents.
    pub heads: Vec<[u8; 32]>,
}

/// Version 1 kept at most 255 heads (a byte for their number); version 2 keeps them all.
const META_VERSION_1: u8 = 1;
const META_VERSION: u8 = 2;
/// Flag bits of the second byte.
const FLAG_DELETED: u8 = 1;
const FLAG_HELD: u8 = 2;
/// Version, flags, seq, updated_ms, chunks.
const COMMON: usize = 22;

impl DocMeta {
    /// Encodes: version, flags, seq, updated_ms, chunks, number of heads (u32), heads,
    /// collection name.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(COMMON + 4 + 32 * self.heads.len() + self.collection.len());
        out.push(META_VERSION);
        let mut flags = 0;
        if self.deleted {
            flags |= FLAG_DELETED;
        }
        if self.held {
            flags |= FLAG_HELD;
        }
        out.push(flags);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.updated_ms.to_be_bytes());
        out.extend_from_slice(&self.chunks.to_be_bytes());
        // A document's heads fit in u32 many times over: its bytes are bounded far lower.
        out.extend_from_slice(&(self.heads.len() as u32).to_be_bytes());
        for head in &self.heads {
            out.extend_from_slice(head);
        }
        out.extend_from_slice(self.collection.as_bytes());
        out
    }

    /// Decodes what [`DocMeta::encode`] wrote (or its version 1); `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let version = *bytes.first()?;
        let (heads, start) = match version {
            META_VERSION_1 => (usize::from(*bytes.get(COMMON)?), COMMON + 1),
            META_VERSION => (
                u32::from_be_bytes(bytes.get(COMMON..COMMON + 4)?.try_into().ok()?) as usize,
                COMMON + 4,
            ),
            _ => return None,
        };
        let names = start.checked_add(heads.checked_mul(32)?)?;
        let head_bytes = bytes.get(start..names)?;
        let flags = bytes[1];
        Some(Self {
            deleted: flags & FLAG_DELETED != 0,
            held: flags & FLAG_HELD != 0,
            seq: u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?),
            updated_ms: i64::from_be_bytes(bytes.get(10..18)?.try_into().ok()?),
            chunks: u32::from_be_bytes(bytes.get(18..22)?.try_into().ok()?),
            heads: head_bytes
                .chunks_exact(32)
                .filter_map(|c| <[u8; 32]>::try_from(c).ok())
                .collect(),
            collection: String::from_utf8(bytes.get(names..)?.to_vec()).ok()?,
        })
    }
}

/// The `updated_at` pseudo-field's name in index keys.
pub const UPDATED_AT: &str = "updated_at";

/// The prefix of every index key of `field` in `collection`.
pub fn index_prefix(collection: &str, field: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(collection.len() + field.len() + 2);
    key.extend_from_slice(collection.as_bytes());
    key.push(0);
    key.extend_from_slice(field.as_bytes());
    key.push(0);
    key
}

/// The index key of one (collection, field, value, document).
pub fn index_key(collection: &str, field: &str, value: &str, id: &DocId) -> Vec<u8> {
    let mut key = index_prefix(collection, field);
    key.extend(value.bytes().filter(|b| *b != 0));
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

/// The index value of an `updated_at` in milliseconds: fixed-width, so that byte order is
/// time order.
pub fn updated_value(ms: i64) -> String {
    // Shift into unsigned space so that times before 1970 still sort first.
    format!("{:016x}", (ms as u64) ^ (1u64 << 63))
}

/// The document id at the end of an index key.
pub fn doc_of_index_key(key: &[u8]) -> Option<DocId> {
    let start = key.len().checked_sub(16)?;
    DocId::from_slice(&key[start..])
}

/// A document id as the tables' key.
pub fn doc_key(id: &DocId) -> u128 {
    u128::from_be_bytes(*id.as_bytes())
}

/// The document id of a tables' key.
pub fn key_doc(key: u128) -> DocId {
    DocId::from_bytes(key.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        let meta = DocMeta {
            collection: "patients".into(),
            seq: 42,
            updated_ms: 1_715_000_000_000,
            deleted: true,
            held: false,
            chunks: 3,
            heads: vec![[1; 32], [2; 32]],
        };
        assert_eq!(DocMeta::decode(&meta.encode()), Some(meta));
        assert_eq!(DocMeta::decode(&[9, 9, 9]), None);
        assert_eq!(DocMeta::decode(&[]), None);
    }

    #[test]
    fn every_head_is_kept_however_many() {
        let meta = DocMeta {
            collection: "clinic_inventory".into(),
            seq: 1,
            updated_ms: 0,
            deleted: false,
            held: true,
            chunks: 0,
            heads: (0..300u32)
                .map(|i| {
                    let mut h = [0u8; 32];
                    h[..4].copy_from_slice(&i.to_be_bytes());
                    h
                })
                .collect(),
        };
        let back = DocMeta::decode(&meta.encode()).expect("decode");
        assert_eq!(back.heads.len(), 300);
        assert_eq!(back, meta);
    }

    #[test]
    fn version_1_entries_still_read() {
        let mut v1 = vec![1u8, 1];
        v1.extend_from_slice(&7u64.to_be_bytes());
        v1.extend_from_slice(&5i64.to_be_bytes());
        v1.extend_from_slice(&2u32.to_be_bytes());
        v1.push(1);
        v1.extend_from_slice(&[9; 32]);
        v1.extend_from_slice(b"patients");
        let meta = DocMeta::decode(&v1).expect("v1");
        assert_eq!(meta.seq, 7);
        assert!(meta.deleted);
        assert_eq!(meta.heads, vec![[9; 32]]);
        assert_eq!(meta.collection, "patients");
    }

    #[test]
    fn updated_values_sort_by_time() {
        let times = [-5i64, 0, 1, 1_715_000_000_000, i64::MAX];
        let values: Vec<String> = times.iter().map(|t| updated_value(*t)).collect();
        let mut sorted = values.clone();
        sorted.sort();
        assert_eq!(values, sorted);
    }

    #[test]
    fn index_key_ends_with_the_doc() {
        let id = DocId::new_v7();
        let key = index_key("patients", "surname", "diaz", &id);
        assert!(key.starts_with(&index_prefix("patients", "surname")));
        assert_eq!(doc_of_index_key(&key), Some(id));
    }
}
