//! The sync protocol's messages and their framing.
//!
//! A frame is `length (u32, big-endian) | version (u8) | flags (u8) | payload`, where the
//! length counts the version, flags and payload, and the payload is one [`Message`] in
//! CBOR, deflate-compressed when that makes it smaller (flag [`FLAG_DEFLATE`]). Decoding
//! checks the length against [`MAX_FRAME`] before buffering anything, limits what a
//! compressed payload may expand to, and answers a [`WireError`] for anything malformed:
//! a peer can make a session fail, never make the node panic or allocate without bound.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::DocId;

/// The wire format version in every frame.
pub const WIRE_VERSION: u8 = 1;
/// Largest frame accepted (length field), compressed or not.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;
/// Largest payload a compressed frame may expand to.
pub const MAX_DECOMPRESSED: usize = 16 * 1024 * 1024;
/// Payloads at least this large are compressed.
const COMPRESS_FROM: usize = 256;
/// Flag: the payload is deflate-compressed.
pub const FLAG_DEFLATE: u8 = 1;
const HEADER: usize = 4;

/// The opening message of each side of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sync protocol version the sender speaks.
    pub version: u16,
    /// The sender's mesh fingerprint.
    pub mesh: String,
    /// The challenge: random bytes the other side must bind into its proof.
    pub nonce: ByteBuf,
    /// The sender's change feed epoch (a new one when its store was replaced).
    pub feed_epoch: String,
}

/// Proof of membership (see [`crate::membership`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Proof {
    /// The sender's device certificate, signed by the mesh's owner key; the transport has
    /// already proven that the sender holds the key of the peer id it names.
    Certificate {
        /// The encoded [`crate::membership::SignedCert`].
        cert: ByteBuf,
    },
}

/// One entry of a node's change feed: a document changed at `seq`, now at `heads`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedItem {
    /// Feed position.
    #[serde(rename = "s")]
    pub seq: u64,
    /// The document.
    #[serde(rename = "i")]
    pub id: DocId,
    /// Its collection.
    #[serde(rename = "c")]
    pub collection: String,
    /// Its heads: 32-byte change hashes, concatenated.
    #[serde(rename = "h")]
    pub heads: ByteBuf,
    /// For an announcement, the document's latest change (or, for a new small
    /// document, the document): a receiver that had the version before merges it at
    /// once, saving a request; any other receiver ignores it and asks as usual.
    #[serde(default, rename = "p", skip_serializing_if = "Option::is_none")]
    pub payload: Option<ByteBuf>,
    /// The signatures of the changes in `payload` ([`crate::authorship`] entries).
    #[serde(default, rename = "g", skip_serializing_if = "<[u8]>::is_empty")]
    pub payload_sigs: ByteBuf,
}

/// A document the asker has, with its heads, for which it wants the changes it lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WantChanges {
    /// The document.
    #[serde(rename = "i")]
    pub id: DocId,
    /// The asker's heads (concatenated 32-byte hashes).
    #[serde(rename = "h")]
    pub heads: ByteBuf,
    /// When the sender did not know the asker's heads (both sides changed the document
    /// since they last met): a summary of every change the asker has, as an Automerge
    /// sync message (its heads and a Bloom filter), so that only what the asker lacks is
    /// sent back.
    #[serde(default, rename = "v", skip_serializing_if = "Option::is_none")]
    pub have: Option<ByteBuf>,
}

/// Neighbors named in one [`Message::Neighbors`] at most.
pub const MAX_NEIGHBORS: usize = 256;

/// Buckets of a [`Summary`].
pub const SUMMARY_BUCKETS: usize = 256;
/// Bytes of each bucket's hash.
const BUCKET_HASH: usize = 16;

/// A compact summary of every document a node holds, for anti-entropy: the documents
/// fall into [`SUMMARY_BUCKETS`] buckets by the last byte of their id, and each bucket is
/// the XOR of a 16-byte hash of each of its documents' id and heads. Two nodes that hold
/// the same documents at the same heads have equal summaries; a bucket that differs names
/// the documents worth comparing one by one. It travels as its root (a hash of the
/// buckets) first, and whole only when the roots differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// How many documents it covers.
    pub count: u64,
    /// The buckets' hashes, concatenated; empty when only the root travels.
    pub buckets: ByteBuf,
    /// A hash of the buckets (32 bytes).
    #[serde(default)]
    pub root: ByteBuf,
}

impl Default for Summary {
    fn default() -> Self {
        let mut summary = Self {
            count: 0,
            buckets: ByteBuf::from(vec![0; SUMMARY_BUCKETS * BUCKET_HASH]),
            root: ByteBuf::new(),
        };
        summary.seal();
        summary
    }
}

impl Summary {
    /// Computes the root from the buckets (after the last [`Summary::add`]).
    pub fn seal(&mut self) {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(self.count.to_be_bytes());
        hash.update(&self.buckets);
        self.root = ByteBuf::from(hash.finalize().to_vec());
    }

    /// The same summary with its root only.
    pub fn root_only(&self) -> Summary {
        Summary {
            count: self.count,
            buckets: ByteBuf::new(),
            root: self.root.clone(),
        }
    }

    /// Whether it carries its buckets.
    pub fn is_whole(&self) -> bool {
        !self.buckets.is_empty()
    }

    /// Whether two summaries say the same (by their roots).
    pub fn same_as(&self, other: &Summary) -> bool {
        self.root == other.root
    }

    /// The bucket of a document.
    pub fn bucket_of(id: &DocId) -> u8 {
        id.as_bytes()[15]
    }

    /// Adds one document (its heads as 32-byte hashes, in any order). A document held
    /// without being merged counts differently from one merged at the same heads, so
    /// that anti-entropy fetches a good copy for it.
    pub fn add(&mut self, id: &DocId, heads: &[[u8; 32]], held: bool) {
        use sha2::{Digest, Sha256};
        let mut sorted = heads.to_vec();
        sorted.sort_unstable();
        let mut hash = Sha256::new();
        hash.update(if held {
            b"medmesh/summary/held/1".as_slice()
        } else {
            b"medmesh/summary/1".as_slice()
        });
        hash.update(id.as_bytes());
        for head in &sorted {
            hash.update(head);
        }
        let digest = hash.finalize();
        let start = usize::from(Self::bucket_of(id)) * BUCKET_HASH;
        if let Some(bucket) = self.buckets.get_mut(start..start + BUCKET_HASH) {
            for (byte, d) in bucket.iter_mut().zip(digest.iter()) {
                *byte ^= d;
            }
        }
        self.count += 1;
    }

    /// Whether it has the shape every summary has.
    pub fn is_well_formed(&self) -> bool {
        (self.buckets.is_empty() || self.buckets.len() == SUMMARY_BUCKETS * BUCKET_HASH)
            && self.root.len() == 32
    }

    /// The buckets in which two summaries differ (none when their roots agree; every
    /// bucket when one of them travelled as its root only).
    pub fn differing(&self, other: &Summary) -> Vec<u8> {
        if self.same_as(other) {
            return Vec::new();
        }
        if !self.is_whole() || !other.is_whole() {
            return (0..=u8::MAX).collect();
        }
        self.buckets
            .chunks(BUCKET_HASH)
            .zip(other.buckets.chunks(BUCKET_HASH))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .filter_map(|(i, _)| u8::try_from(i).ok())
            .collect()
    }
}

/// A document, whole or as the changes the asker lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocPayload {
    /// The document.
    #[serde(rename = "i")]
    pub id: DocId,
    /// Its collection.
    #[serde(rename = "c")]
    pub collection: String,
    /// Automerge bytes (a saved document or changes), to merge.
    #[serde(rename = "b")]
    pub bytes: ByteBuf,
    /// The sender's heads after these bytes (concatenated 32-byte hashes): a receiver
    /// that cannot merge the bytes still relays them under these heads.
    #[serde(default, rename = "h")]
    pub heads: ByteBuf,
    /// The signatures of the changes in `bytes` ([`crate::authorship`] entries).
    #[serde(default, rename = "g")]
    pub sigs: ByteBuf,
}

/// A message of the sync protocol. The messages sent for every change (`Feed`, `Want`,
/// `Docs`, `Ack`) and their items carry one-letter names on the wire: at a few hundred
/// bytes per change, field names would otherwise be a third of the traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Message {
    /// Opens the session.
    Hello(Hello),
    /// Answers the other side's challenge.
    Proof(Proof),
    /// The session is refused or ended, and why.
    Refuse {
        /// What to tell the person at the other device.
        reason: String,
    },
    /// The asker wants the sender's feed after `since` (in feed `epoch`), and then every
    /// later change as it happens.
    Subscribe {
        /// The feed epoch the asker's cursor belongs to.
        epoch: String,
        /// The asker's cursor.
        since: u64,
    },
    /// A page of the feed; everything up to `upto` is covered by it.
    #[serde(rename = "F")]
    Feed {
        /// Changed documents.
        #[serde(rename = "e")]
        entries: Vec<FeedItem>,
        /// The feed position this page reaches.
        #[serde(rename = "u")]
        upto: u64,
        /// More of the feed follows at once (the sender leaves out entries the receiver
        /// does not need, so a short page does not mean the end).
        #[serde(default, rename = "m", skip_serializing_if = "std::ops::Not::not")]
        more: bool,
        /// The sender's newest feed position when it sent the page (0: not said), so the
        /// receiver can show how far an initial sync has come.
        #[serde(default, rename = "h", skip_serializing_if = "is_zero")]
        head: u64,
    },
    /// What the asker needs, for its request `req`.
    #[serde(rename = "W")]
    Want {
        /// Request number (answered by `Docs` with the same number).
        #[serde(rename = "r")]
        req: u64,
        /// Documents the asker does not have at all.
        #[serde(rename = "w")]
        whole: Vec<DocId>,
        /// Documents the asker has but is behind on.
        #[serde(rename = "c")]
        changes: Vec<WantChanges>,
    },
    /// Documents answering request `req`; `done` on the last message of the answer.
    #[serde(rename = "D")]
    Docs {
        /// The request answered.
        #[serde(rename = "r")]
        req: u64,
        /// The documents.
        #[serde(rename = "d")]
        docs: Vec<DocPayload>,
        /// This is the last message of the answer.
        #[serde(rename = "f")]
        done: bool,
        /// Documents asked for by heads the sender does not know (both sides changed
        /// them): ask again with a summary of what you have ([`WantChanges::have`]).
        #[serde(default, rename = "v", skip_serializing_if = "Vec::is_empty")]
        diverged: Vec<DocId>,
    },
    /// Part of a document too large for one frame; parts arrive in order.
    DocPart {
        /// The request answered.
        req: u64,
        /// The document.
        id: DocId,
        /// Its collection.
        collection: String,
        /// The whole size of its bytes.
        total: u64,
        /// This part.
        bytes: ByteBuf,
        /// The sender's heads of the document (see [`DocPayload::heads`]).
        #[serde(default)]
        heads: ByteBuf,
        /// This part's piece of the document's change signatures
        /// ([`DocPayload::sigs`], split over the parts as its bytes are).
        #[serde(default)]
        sigs: ByteBuf,
    },
    /// The asker has durably stored everything of the feed up to `upto`.
    #[serde(rename = "A")]
    Ack {
        /// Feed position.
        #[serde(rename = "u")]
        upto: u64,
    },
    /// The peers the sender has open sessions with (at most [`MAX_NEIGHBORS`]). A node
    /// does not relay to this peer the changes it got from one of them: the peer gets
    /// them from their source directly.
    Neighbors {
        /// Peer ids.
        peers: Vec<String>,
    },
    /// Anti-entropy: the sender's summary of what it holds. With `reply`, the receiver
    /// answers with its own; either side then compares them and fetches the entries of
    /// the buckets that differ.
    Summary {
        /// The round this belongs to (the sender's numbering).
        round: u64,
        /// What the sender holds.
        summary: Summary,
        /// Answer with your summary.
        reply: bool,
    },
    /// Anti-entropy: the documents of one bucket, after `after` (by id).
    WantRange {
        /// The asker's round.
        round: u64,
        /// The bucket.
        bucket: u8,
        /// Continue after this document.
        after: Option<DocId>,
    },
    /// Anti-entropy: documents of a bucket with their heads; `more` when the bucket has
    /// more after the last one.
    Range {
        /// The asker's round.
        round: u64,
        /// The bucket.
        bucket: u8,
        /// The documents (their `seq` is not used).
        entries: Vec<FeedItem>,
        /// More follow: ask again after the last one.
        more: bool,
    },
}

/// A frame or message that cannot be accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The length field is larger than the protocol allows.
    #[error("the peer sent a frame of {0} bytes, more than the {MAX_FRAME} allowed")]
    TooLarge(usize),
    /// A frame shorter than its header.
    #[error("the peer sent an empty frame")]
    Empty,
    /// A frame of another wire version.
    #[error(
        "the peer speaks wire version {0}, this node speaks {WIRE_VERSION}; update medmesh on both devices"
    )]
    Version(u8),
    /// Unknown flags.
    #[error("the peer sent a frame with unknown flags {0:#x}")]
    Flags(u8),
    /// The payload does not decompress, or expands beyond the limit.
    #[error("the peer sent a compressed frame that is damaged or too large")]
    Compression,
    /// The payload is not a message.
    #[error("the peer sent a message that could not be read: {0}")]
    Decode(String),
    /// The message could not be encoded (too large).
    #[error("a message could not be encoded: {0}")]
    Encode(String),
}

/// Encodes one message as a frame.
pub fn encode(message: &Message) -> Result<Vec<u8>, WireError> {
    let mut payload = Vec::new();
    ciborium::into_writer(message, &mut payload).map_err(|e| WireError::Encode(e.to_string()))?;
    let mut flags = 0;
    if payload.len() >= COMPRESS_FROM {
        let mut encoder = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(payload.len() / 2),
            flate2::Compression::fast(),
        );
        if encoder.write_all(&payload).is_ok()
            && let Ok(compressed) = encoder.finish()
            && compressed.len() < payload.len()
        {
            payload = compressed;
            flags |= FLAG_DEFLATE;
        }
    }
    let length = payload.len() + 2;
    if length > MAX_FRAME {
        return Err(WireError::Encode(format!(
            "{length} bytes is over the frame limit"
        )));
    }
    let mut frame = Vec::with_capacity(HEADER + length);
    frame.extend_from_slice(&(length as u32).to_be_bytes());
    frame.push(WIRE_VERSION);
    frame.push(flags);
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Reads the length of the frame starting `header`; checks it against [`MAX_FRAME`].
pub fn frame_length(header: [u8; 4]) -> Result<usize, WireError> {
    let length = u32::from_be_bytes(header) as usize;
    if length > MAX_FRAME {
        Err(WireError::TooLarge(length))
    } else if length < 2 {
        Err(WireError::Empty)
    } else {
        Ok(length)
    }
}

/// Limits on what a frame may be, and expand to. Before a peer has proven it belongs to
/// the mesh it gets [`Limits::HANDSHAKE`], far below those of an open session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame (length field).
    pub frame: usize,
    /// Largest payload a compressed frame may expand to.
    pub decompressed: usize,
}

impl Limits {
    /// An open session's limits.
    pub const OPEN: Limits = Limits {
        frame: MAX_FRAME,
        decompressed: MAX_DECOMPRESSED,
    };
    /// Until the peer has proven its membership: a hello and a proof are tiny.
    pub const HANDSHAKE: Limits = Limits {
        frame: 16 * 1024,
        decompressed: 16 * 1024,
    };
}

/// Decodes a frame's body (what follows the length field).
pub fn decode_body(body: &[u8]) -> Result<Message, WireError> {
    decode_body_within(body, Limits::OPEN)
}

/// Decodes a frame's body within `limits`.
pub fn decode_body_within(body: &[u8], limits: Limits) -> Result<Message, WireError> {
    if body.len() > limits.frame {
        return Err(WireError::TooLarge(body.len()));
    }
    let [version, flags, payload @ ..] = body else {
        return Err(WireError::Empty);
    };
    if *version != WIRE_VERSION {
        return Err(WireError::Version(*version));
    }
    match *flags {
        0 => ciborium::from_reader(payload).map_err(|e| WireError::Decode(e.to_string())),
        FLAG_DEFLATE => {
            let mut decoder =
                flate2::read::DeflateDecoder::new(payload).take(limits.decompressed as u64 + 1);
            let mut plain = Vec::new();
            decoder
                .read_to_end(&mut plain)
                .map_err(|_| WireError::Compression)?;
            if plain.len() > limits.decompressed {
                return Err(WireError::Compression);
            }
            ciborium::from_reader(plain.as_slice()).map_err(|e| WireError::Decode(e.to_string()))
        }
        other => Err(WireError::Flags(other)),
    }
}

/// Decodes frames from a byte stream, without I/O: push what arrived, take messages out.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete message, if one has arrived. An error means the stream must be
    /// closed.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        self.next_message_within(Limits::OPEN)
    }

    /// The next complete message within `limits`, if one has arrived.
    pub fn next_message_within(&mut self, limits: Limits) -> Result<Option<Message>, WireError> {
        let Some(header) = self.buffer.get(..HEADER) else {
            return Ok(None);
        };
        let mut length_bytes = [0u8; 4];
        length_bytes.copy_from_slice(header);
        let length = frame_length(length_bytes)?;
        if length > limits.frame {
            return Err(WireError::TooLarge(length));
        }
        if self.buffer.len() < HEADER + length {
            return Ok(None);
        }
        let message = decode_body_within(&self.buffer[HEADER..HEADER + length], limits);
        self.buffer.drain(..HEADER + length);
        message.map(Some)
    }

    /// Bytes received and not yet taken as messages.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }
}

/// Concatenated 32-byte heads as separate hashes; `None` when the length is wrong.
pub fn split_heads(heads: &[u8]) -> Option<Vec<[u8; 32]>> {
    if !heads.len().is_multiple_of(32) {
        return None;
    }
    Some(
        heads
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect(),
    )
}

/// Hashes concatenated for the wire.
pub fn join_heads(heads: &[[u8; 32]]) -> ByteBuf {
    ByteBuf::from(heads.concat())
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<Message> {
        let id = DocId::new_v7();
        vec![
            Message::Hello(Hello {
                version: 1,
                mesh: "00aa".into(),
                nonce: ByteBuf::from(vec![1; 32]),
                feed_epoch: "e".into(),
            }),
            Message::Proof(Proof::Certificate {
                cert: ByteBuf::from(vec![2; 32]),
            }),
            Message::Refuse {
                reason: "no".into(),
            },
            Message::Subscribe {
                epoch: "e".into(),
                since: 42,
            },
            Message::Feed {
                entries: (0..300)
                    .map(|i| FeedItem {
                        seq: i,
                        id,
                        collection: "patients".into(),
                        heads: ByteBuf::from(vec![3; 32]),
                        payload: (i == 0).then(|| ByteBuf::from(vec![1, 2])),
                        payload_sigs: ByteBuf::from(if i == 0 { vec![0; 97] } else { Vec::new() }),
                    })
                    .collect(),
                upto: 299,
                more: true,
                head: 1_000,
            },
            Message::Want {
                req: 1,
                whole: vec![id],
                changes: vec![WantChanges {
                    id,
                    heads: ByteBuf::from(vec![4; 64]),
                    have: Some(ByteBuf::from(vec![1, 2, 3])),
                }],
            },
            Message::Docs {
                diverged: vec![id],
                req: 1,
                docs: vec![DocPayload {
                    id,
                    collection: "visits".into(),
                    bytes: ByteBuf::from(vec![5; 1000]),
                    heads: ByteBuf::from(vec![7; 32]),
                    sigs: ByteBuf::from(vec![0; 97]),
                }],
                done: true,
            },
            Message::DocPart {
                req: 2,
                id,
                collection: "visits".into(),
                total: 10,
                bytes: ByteBuf::from(vec![6; 5]),
                heads: ByteBuf::new(),
                sigs: ByteBuf::from(vec![0; 48]),
            },
            Message::Ack { upto: 299 },
            Message::Neighbors {
                peers: vec!["12D3KooW".into()],
            },
            Message::Summary {
                round: 3,
                summary: Summary::default(),
                reply: true,
            },
            Message::WantRange {
                round: 3,
                bucket: 7,
                after: Some(id),
            },
            Message::Range {
                round: 3,
                bucket: 7,
                entries: vec![],
                more: false,
            },
        ]
    }

    #[test]
    fn every_message_round_trips_through_a_byte_stream_in_pieces() {
        let messages = sample();
        let mut stream = Vec::new();
        for m in &messages {
            stream.extend(encode(m).expect("encode"));
        }
        let mut decoder = FrameDecoder::new();
        let mut out = Vec::new();
        for piece in stream.chunks(7) {
            decoder.push(piece);
            while let Some(m) = decoder.next_message().expect("decode") {
                out.push(m);
            }
        }
        assert_eq!(out, messages);
    }

    #[test]
    fn large_messages_are_compressed() {
        let feed = &sample()[4];
        let frame = encode(feed).expect("encode");
        assert_eq!(frame[5], FLAG_DEFLATE);
        let mut plain = Vec::new();
        ciborium::into_writer(feed, &mut plain).expect("cbor");
        assert!(
            frame.len() < plain.len() / 2,
            "{} vs {}",
            frame.len(),
            plain.len()
        );
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decoder.next_message(),
            Err(WireError::TooLarge(_))
        ));
    }

    #[test]
    fn wrong_version_flags_and_zip_bombs_are_refused() {
        let mut frame = encode(&Message::Ack { upto: 1 }).expect("encode");
        frame[4] = 9;
        assert!(matches!(
            decode_body(&frame[4..]),
            Err(WireError::Version(9))
        ));
        frame[4] = WIRE_VERSION;
        frame[5] = 0x80;
        assert!(matches!(decode_body(&frame[4..]), Err(WireError::Flags(_))));
        // 64 MiB of zeros compresses to a few KiB: it must be refused, not expanded.
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1024 * 1024];
        for _ in 0..64 {
            encoder.write_all(&zeros).expect("compress");
        }
        let bomb = encoder.finish().expect("finish");
        let mut body = vec![WIRE_VERSION, FLAG_DEFLATE];
        body.extend(bomb);
        assert!(matches!(decode_body(&body), Err(WireError::Compression)));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let mut decoder = FrameDecoder::new();
            decoder.push(&bytes);
            for _ in 0..4 {
                match decoder.next_message() {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
            let _ = decode_body(&bytes);
        }

        #[test]
        fn truncated_frames_never_decode_wrongly(cut in 0usize..200) {
            let frame = encode(&sample()[5]).expect("encode");
            let cut = cut.min(frame.len().saturating_sub(1));
            let mut decoder = FrameDecoder::new();
            decoder.push(&frame[..cut]);
            prop_assert!(matches!(decoder.next_message(), Ok(None)));
        }
    }
}
