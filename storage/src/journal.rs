//! The write journal: a small write made durable by one short append, not a database
//! commit to disk.
//!
//! A durable redb commit writes every page the transaction touched (a record write
//! touches about twenty: the document, its metadata, the feed, each index, the table
//! roots, redb's own freed-page records) and then syncs. With a journal, the writer
//! commits a small transaction to redb *without* durability — its pages stay in redb's
//! memory, visible to readers — after appending what the transaction changed to this
//! file and syncing it: one sequential write of a few hundred bytes. Every so often (when
//! the writer is idle, when the journal is long, before a bulk write) a durable commit
//! writes out everything at once, pages changed by many writes written once, and the
//! journal starts again.
//!
//! # What a frame holds
//!
//! The Automerge changes the transaction made, per document: for a new document its
//! saved bytes, for an existing one the changes since its heads before the transaction,
//! and the signatures stored with them that are not this node's own (a vouch). Everything
//! else the writer stores — metadata, feed position, index entries, counts — follows
//! from the documents and is worked out again on replay; this node's own signatures are
//! made again by [`crate::Writer::recover_own_sigs`], as after any restart.
//!
//! The file is made its full size once (zeros) and then overwritten from the start after
//! each checkpoint, never grown or cut: a sync of a file whose size and blocks do not
//! change writes only the data, where an append also writes the file's inode (two disk
//! writes per sync instead of one). Each run of frames from the start of the file — a
//! *cycle* — has a random number every frame carries; reading stops at the first frame
//! of another cycle (what is left of an earlier one), at the first frame whose check
//! fails (a write cut short, never acknowledged), or at zeros.
//!
//! Replaying a frame is idempotent: a change already in a document changes nothing. So
//! starting a new cycle after a checkpoint needs no sync of its own: if a crash brings
//! back the old cycle's frames, they are already in the store. (Were records ever
//! removed from a store outright, the journal would have to be cleared durably first,
//! lest a replay bring them back.)
//!
//! # On disk
//!
//! ```text
//! frame: body length (u32 LE) | cycle (u64 LE)
//!        | check: the first 16 bytes of SHA-256(cycle | body) | body
//! body (plain store):     entries
//! body (encrypted store): nonce (12) | AES-256-GCM(entries) | tag (16)
//! entries: count (u32 LE), then each:
//!   document id (16) | feed position (u64 LE)
//!   | collection (u16 LE length + UTF-8) | bytes (u32 LE length + bytes)
//!   | signatures (u16 LE count, each: change hash (32), proof (u8 length + bytes))
//! ```
//!
//! The journal of an encrypted store is encrypted (with a key derived from the data key;
//! the cycle is the associated data), so it shows no more than the store file. A frame
//! is acknowledged only after its sync.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::digest::{SHA256, digest};
use medmesh_protocol::DocId;
use medmesh_protocol::authorship::SignedChange;
use rand::RngCore;

use crate::crypt::DataKey;
use crate::error::{Result, StoreError};

/// The file beside the store `store` that holds its journal.
pub fn journal_path(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push("-journal");
    PathBuf::from(name)
}

/// The journal file's size, made once.
const FILE_BYTES: u64 = 4 << 20;
/// A checkpoint is due once a cycle holds this many bytes...
const MAX_BYTES: u64 = 3 << 20;
/// ...or this many frames (each a commit whose pages wait in memory).
const MAX_FRAMES: u32 = 4096;
/// A transaction whose changes are larger than this (an import's batch) is committed
/// durably instead: it would gain little, and its pages would wait in memory.
pub(crate) const MAX_FRAME_BYTES: usize = 64 << 10;
/// The longest frame body a reader accepts (a larger length is damage).
const MAX_BODY: usize = 64 << 20;
const CHECK_LEN: usize = 16;
const HEAD_LEN: usize = 4 + 8 + CHECK_LEN;
const TAG_LEN: usize = 16;
const AAD: &[u8] = b"medmesh journal 1";

/// The changes of one document in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub(crate) id: DocId,
    /// Its feed position in the transaction (kept on replay).
    pub(crate) seq: u64,
    pub(crate) collection: String,
    pub(crate) bytes: Vec<u8>,
    pub(crate) sigs: Vec<SignedChange>,
}

pub(crate) struct Journal {
    file: File,
    path: PathBuf,
    /// Bytes of this cycle's frames (where the next frame goes).
    len: u64,
    frames: u32,
    cycle: u64,
    sealer: Option<LessSafeKey>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("frames", &self.frames)
            .finish()
    }
}

/// What a replay found in the journal.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    /// The frames, in order.
    pub(crate) frames: Vec<Vec<Entry>>,
    /// Why reading stopped before the end of the file, if it did.
    pub(crate) torn: Option<String>,
}

impl Journal {
    /// Opens (or creates, mode 0600) the journal of the store file `store`; `key` is the
    /// store's data key when the store is encrypted.
    pub(crate) fn open(store: &Path, key: Option<&DataKey>) -> Result<Self> {
        let path = journal_path(store);
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options
            .open(&path)
            .map_err(|err| journal_error(&path, &err))?;
        let size = file
            .metadata()
            .map_err(|err| journal_error(&path, &err))?
            .len();
        if size < FILE_BYTES {
            // Made its full size once, so that a sync never has to record a new size.
            let zeros = vec![0u8; 1 << 20];
            let mut at = size;
            while at < FILE_BYTES {
                let n = (FILE_BYTES - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at)
                    .map_err(|err| journal_error(&path, &err))?;
                at += n as u64;
            }
            file.sync_all().map_err(|err| journal_error(&path, &err))?;
        }
        let sealer = match key {
            None => None,
            Some(key) => {
                let mut material = b"medmesh journal key\0".to_vec();
                material.extend_from_slice(key.as_bytes());
                let derived = digest(&SHA256, &material);
                material.fill(0);
                let unbound = UnboundKey::new(&AES_256_GCM, derived.as_ref()).map_err(|_| {
                    StoreError::Storage("the journal's key could not be set up".into())
                })?;
                Some(LessSafeKey::new(unbound))
            }
        };
        Ok(Self {
            file,
            path,
            len: 0,
            frames: 0,
            cycle: new_cycle(),
            sealer,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// True when a checkpoint is due.
    pub(crate) fn is_full(&self) -> bool {
        self.len >= MAX_BYTES || self.frames >= MAX_FRAMES
    }

    /// Reads the frames of the cycle at the start of the file. New frames then start a
    /// new cycle (after the checkpoint that stores these).
    pub(crate) fn read(&mut self) -> Result<Replay> {
        let mut bytes = Vec::new();
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.read_to_end(&mut bytes))
            .map_err(|err| journal_error(&self.path, &err))?;
        let mut replay = Replay::default();
        let mut at = 0usize;
        let mut cycle = None;
        while bytes.len() - at >= HEAD_LEN && bytes[at..at + HEAD_LEN].iter().any(|&b| b != 0) {
            match self.frame_at(&bytes[at..]) {
                Ok((_, frame_cycle, _)) if cycle.is_some_and(|c| c != frame_cycle) => break,
                Ok((used, frame_cycle, entries)) => {
                    cycle = Some(frame_cycle);
                    at += used;
                    replay.frames.push(entries);
                }
                Err(reason) => {
                    replay.torn = Some(format!("at byte {at}: {reason}"));
                    break;
                }
            }
        }
        self.len = at as u64;
        Ok(replay)
    }

    /// One frame at the start of `bytes`: its length, cycle and entries.
    fn frame_at(&self, bytes: &[u8]) -> std::result::Result<(usize, u64, Vec<Entry>), String> {
        let mut cursor = Cursor(bytes);
        let len = cursor.u32()? as usize;
        if len > MAX_BODY {
            return Err(format!("a frame claims {len} bytes (a write cut short)"));
        }
        let cycle = cursor.take(8)?;
        let check = cursor.take(CHECK_LEN)?;
        let body = cursor.take(len)?;
        if check_of(cycle, body) != *check {
            return Err("a frame does not match its check (a write cut short)".into());
        }
        let aad = [AAD, cycle].concat();
        let cycle = u64::from_le_bytes(cycle.try_into().unwrap_or_default());
        let plain = match &self.sealer {
            None => body.to_vec(),
            Some(sealer) => {
                if body.len() < NONCE_LEN + TAG_LEN {
                    return Err("an encrypted frame is too short".into());
                }
                let nonce = Nonce::try_assume_unique_for_key(&body[..NONCE_LEN])
                    .map_err(|_| "a frame's nonce is unreadable".to_owned())?;
                let mut text = body[NONCE_LEN..].to_vec();
                let plain = sealer
                    .open_in_place(nonce, Aad::from(&aad), &mut text)
                    .map_err(|_| "a frame does not decrypt with this store's key".to_owned())?;
                plain.to_vec()
            }
        };
        let mut cursor = Cursor(&plain);
        let count = cursor.u32()? as usize;
        let mut entries = Vec::with_capacity(count.min(4096));
        for _ in 0..count {
            entries.push(cursor.entry()?);
        }
        if !cursor.0.is_empty() {
            return Err("a frame has bytes after its entries".into());
        }
        Ok((HEAD_LEN + len, cycle, entries))
    }

    /// Appends one frame and syncs it: once this returns, the entries survive a crash.
    pub(crate) fn append(&mut self, entries: &[Entry]) -> Result<()> {
        let mut plain = Vec::with_capacity(64 + entries.iter().map(Entry::size).sum::<usize>());
        plain.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for entry in entries {
            entry.encode_into(&mut plain);
        }
        let body = match &self.sealer {
            None => plain,
            Some(sealer) => {
                let mut nonce = [0u8; NONCE_LEN];
                rand::rng().fill_bytes(&mut nonce);
                let mut body = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
                body.extend_from_slice(&nonce);
                body.extend_from_slice(&plain);
                plain.fill(0);
                let aad = [AAD, &self.cycle.to_le_bytes()].concat();
                let tag = sealer
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&aad),
                        &mut body[NONCE_LEN..],
                    )
                    .map_err(|_| {
                        StoreError::Storage("a journal frame could not be encrypted".into())
                    })?;
                body.extend_from_slice(tag.as_ref());
                body
            }
        };
        let cycle = self.cycle.to_le_bytes();
        let mut frame = Vec::with_capacity(HEAD_LEN + body.len() + HEAD_LEN);
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&cycle);
        frame.extend_from_slice(&check_of(&cycle, &body));
        frame.extend_from_slice(&body);
        // Zeros after the frame: the end, even over what is left of an earlier cycle.
        frame.extend_from_slice(&[0u8; HEAD_LEN]);
        let written = self
            .file
            .write_all_at(&frame, self.len)
            .and_then(|_| self.file.sync_data());
        if let Err(err) = written {
            // Whatever part of the frame reached the file is undone, so that the write
            // the caller is told failed is not replayed later.
            self.undo_to(self.len);
            return Err(StoreError::from_io(&err));
        }
        let frame = frame.len() - HEAD_LEN;
        self.len += frame as u64;
        self.frames += 1;
        Ok(())
    }

    /// Ends the journal at `len` bytes again (the last frame appended, when its
    /// transaction could not be committed after all).
    pub(crate) fn undo_to(&mut self, len: u64) {
        let cut = self
            .file
            .write_all_at(&[0u8; HEAD_LEN], len)
            .and_then(|_| self.file.sync_data());
        match cut {
            Ok(()) => {
                if self.len > len {
                    self.len = len;
                    self.frames = self.frames.saturating_sub(1);
                }
            }
            Err(err) => tracing::error!(
                journal = %self.path.display(),
                error = %err,
                "a write that failed could not be taken out of the journal; it may reappear after a restart"
            ),
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Starts a new cycle after a durable checkpoint. Not synced (see the module's notes).
    pub(crate) fn reset(&mut self) {
        if self.len == 0 {
            self.cycle = new_cycle();
            return;
        }
        match self.file.write_all_at(&[0u8; HEAD_LEN], 0) {
            Ok(()) => {
                self.len = 0;
                self.frames = 0;
                self.cycle = new_cycle();
            }
            // The frames stay (replayed to no effect after a crash); new ones follow in
            // the same cycle.
            Err(err) => {
                tracing::warn!(journal = %self.path.display(), error = %err, "the journal could not be emptied after a checkpoint")
            }
        }
    }

    /// At a clean stop, after the last checkpoint: nothing to replay at the next start.
    pub(crate) fn clear(&mut self) -> io::Result<()> {
        self.file.write_all_at(&[0u8; HEAD_LEN], 0)?;
        self.file.sync_data()?;
        self.len = 0;
        self.frames = 0;
        Ok(())
    }
}

fn new_cycle() -> u64 {
    rand::rng().next_u64()
}

fn check_of(cycle: &[u8], body: &[u8]) -> [u8; CHECK_LEN] {
    let mut context = aws_lc_rs::digest::Context::new(&SHA256);
    context.update(cycle);
    context.update(body);
    let mut check = [0u8; CHECK_LEN];
    check.copy_from_slice(&context.finish().as_ref()[..CHECK_LEN]);
    check
}

impl Entry {
    fn size(&self) -> usize {
        16 + 8 + 2 + self.collection.len() + 4 + self.bytes.len() + 2 + self.sigs.len() * 130
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        let collection = self.collection.as_bytes();
        let collection = &collection[..collection.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(collection.len() as u16).to_le_bytes());
        out.extend_from_slice(collection);
        out.extend_from_slice(&(self.bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.bytes);
        let sigs = &self.sigs[..self.sigs.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(sigs.len() as u16).to_le_bytes());
        for sig in sigs {
            out.extend_from_slice(&sig.hash);
            let mut proof = Vec::with_capacity(96);
            sig.proof.encode_into(&mut proof);
            out.push(proof.len() as u8);
            out.extend_from_slice(&proof);
        }
    }
}

/// Reads a frame's fields, each checked against what is left.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("a frame is cut short".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u16(&mut self) -> std::result::Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn entry(&mut self) -> std::result::Result<Entry, String> {
        let mut id = [0u8; 16];
        id.copy_from_slice(self.take(16)?);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(self.take(8)?);
        let seq = u64::from_le_bytes(seq);
        let len = self.u16()? as usize;
        let collection = std::str::from_utf8(self.take(len)?)
            .map_err(|_| "a collection name is not UTF-8".to_owned())?
            .to_owned();
        let len = self.u32()? as usize;
        let bytes = self.take(len)?.to_vec();
        let count = self.u16()? as usize;
        let mut sigs = Vec::with_capacity(count);
        for _ in 0..count {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(self.take(32)?);
            let len = self.take(1)?[0] as usize;
            let sig = crate::signing::decode_value(hash, self.take(len)?)
                .ok_or_else(|| "a signature is unreadable".to_owned())?;
            sigs.push(sig);
        }
        Ok(Entry {
            id: DocId::from_bytes(id),
            seq,
            collection,
            bytes,
            sigs,
        })
    }
}

fn journal_error(path: &Path, err: &io::Error) -> StoreError {
    match StoreError::from_io(err) {
        StoreError::DiskFull => StoreError::DiskFull,
        _ => StoreError::Open {
            path: path.display().to_string(),
            reason: format!("its write journal cannot be used: {err}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medmesh_protocol::authorship::Proof;

    fn entries(n: u8) -> Vec<Entry> {
        vec![
            Entry {
                id: DocId::from_bytes([n; 16]),
                seq: u64::from(n) * 10,
                collection: "patients".into(),
                bytes: vec![n; 300],
                sigs: vec![SignedChange {
                    hash: [n; 32],
                    proof: Proof::Sealed([7; 32]),
                }],
            },
            Entry {
                id: DocId::from_bytes([n + 1; 16]),
                seq: u64::from(n) * 10 + 1,
                collection: "visits".into(),
                bytes: vec![n; 10],
                sigs: Vec::new(),
            },
        ]
    }

    #[test]
    fn frames_come_back_as_written_plain_and_encrypted_and_a_reset_empties_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = DataKey::generate();
        for (name, key) in [("plain.redb", None), ("encrypted.redb", Some(&key))] {
            let store = dir.path().join(name);
            let mut journal = Journal::open(&store, key).expect("open");
            journal.append(&entries(1)).expect("append");
            journal.append(&entries(2)).expect("append");
            drop(journal);
            let raw = std::fs::read(journal_path(&store)).expect("read");
            if key.is_some() {
                assert!(
                    !raw.windows(8).any(|w| w == b"patients"),
                    "an encrypted store's journal shows no collection name"
                );
            }
            let mut journal = Journal::open(&store, key).expect("open");
            let replay = journal.read().expect("read");
            assert_eq!(replay.frames, vec![entries(1), entries(2)]);
            assert!(replay.torn.is_none());
            journal.reset();
            assert_eq!(journal.read().expect("read").frames.len(), 0);
            // A new cycle overwrites from the start; what is left of the old one after
            // it is not read, and a clear leaves nothing.
            let mut journal = Journal::open(&store, key).expect("open");
            journal.append(&entries(1)).expect("append");
            journal.append(&entries(2)).expect("append");
            journal.append(&entries(3)).expect("append");
            journal.reset();
            journal.append(&entries(4)).expect("append");
            assert_eq!(journal.read().expect("read").frames, vec![entries(4)]);
            journal.clear().expect("clear");
            assert!(journal.read().expect("read").frames.is_empty());
            assert_eq!(
                std::fs::metadata(journal_path(&store)).expect("size").len(),
                FILE_BYTES,
                "the journal keeps its size"
            );
        }
    }

    #[test]
    fn a_frame_cut_short_or_damaged_ends_the_replay_and_a_wrong_key_reads_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("s.redb");
        let key = DataKey::generate();
        let mut journal = Journal::open(&store, Some(&key)).expect("open");
        journal.append(&entries(1)).expect("append");
        let first = journal.len() as usize;
        journal.append(&entries(2)).expect("append");
        journal.append(&entries(3)).expect("append");
        let end = journal.len() as usize;
        drop(journal);
        let raw = std::fs::read(journal_path(&store)).expect("read");

        std::fs::write(journal_path(&store), &raw[..end - 3]).expect("cut");
        let replay = Journal::open(&store, Some(&key))
            .expect("open")
            .read()
            .expect("read");
        assert_eq!(replay.frames, vec![entries(1), entries(2)]);
        assert!(replay.torn.expect("torn").contains("cut short"));

        let mut damaged = raw.clone();
        damaged[first + 40] ^= 1;
        std::fs::write(journal_path(&store), &damaged).expect("damage");
        let replay = Journal::open(&store, Some(&key))
            .expect("open")
            .read()
            .expect("read");
        assert_eq!(replay.frames, vec![entries(1)]);

        std::fs::write(journal_path(&store), &raw).expect("restore");
        let other = DataKey::generate();
        let replay = Journal::open(&store, Some(&other))
            .expect("open")
            .read()
            .expect("read");
        assert!(replay.frames.is_empty());
        assert!(replay.torn.expect("refused").contains("does not decrypt"));
    }
}
