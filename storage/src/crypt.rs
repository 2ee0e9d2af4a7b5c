//! Encryption at rest: the whole store file — documents, feed, indexes, redb's own
//! header — encrypted and authenticated with one data key.
//!
//! [`EncryptedFile`] is a redb [`StorageBackend`]: redb sees a plain database of 4 KiB
//! blocks (its page size), and the file on disk holds only ciphertext. A copy of the data
//! directory without the key shows no patient name, no field value and no private key.
//!
//! # On disk
//!
//! ```text
//! [0, 4096)          file header (plaintext, authenticated):
//!                      "medmesh encrypted store\n" (24 bytes), format version (u32 LE),
//!                      block size (u32 LE), file id (16 random bytes),
//!                      key check: nonce (12) + AES-GCM tag (16) over the bytes before it
//! 4096 + i * 8264    logical block i: two slots of 4132 bytes, A then B, each
//!                      sequence number (u64 LE) + nonce (12) + ciphertext (4096) + tag (16)
//! ```
//!
//! A slot is AES-256-GCM of the 4096 plaintext bytes; its associated data is the file id,
//! the block index, the slot's sequence number and which slot it is, so a block cannot be
//! moved to another place or another file, nor an old version passed off as newer. The
//! logical length is `blocks * 4096` (redb only asks for whole pages); the physical
//! length encodes it. A slot that was never written is all zeros; a block neither of
//! whose slots was written reads as zeros, as new file space must.
//!
//! The key check lets a wrong key be refused before redb reads anything, and that path
//! writes nothing: no header, no length change.
//!
//! Nonces are never reused under a key in practice: each open draws a random 96-bit
//! starting point from the operating system's generator (once, not per block) and counts
//! up from it, so nonces within one open are distinct, and two opens collide only if
//! their ranges of at most 2^64 values overlap in a 2^96 space.
//!
//! # Crash consistency
//!
//! redb commits in one phase: it writes the new pages (copy-on-write, never a page of the
//! previous commit) and then its header with the new commit in the unused one of two
//! commit slots, and syncs once. After a crash it checks the newest commit's checksums
//! and falls back to the previous commit when they fail. That needs a torn page to look
//! like a torn page (bad checksum, or its old content), never like an I/O error, and it
//! needs the header's other commit slot to survive a torn header write.
//!
//! With encryption a torn write would leave a whole block that no longer authenticates —
//! both of redb's commit slots with it, since they share block 0. So every block has two
//! physical slots, written alternately: a write goes to the slot that does *not* hold the
//! newest authentic version, with the next sequence number. A read takes the slot with
//! the highest sequence number that authenticates. A write torn by a power cut therefore
//! leaves the block at its last complete version — exactly what redb's protocol assumes
//! of a page whose write did not happen — and the other commit slot in block 0 is intact.
//! The assumption is the one redb makes of a plain file: a torn write changes only the
//! bytes it was writing.
//!
//! Cost versus the alternative (one slot per block, and zeros for a block that does not
//! authenticate so that redb's checksums reject it): two slots double the file's size on
//! disk, but writes stay one `pwrite` per block and `sync_data` stays one `fdatasync`; a
//! read is one `pread` of the current slot once the block was seen (a small in-memory map
//! remembers which slot is current, 8 bytes per 4 KiB block), and one `pread` of both
//! slots the first time. Zeros would keep the size but hand redb made-up content for a
//! block that failed, could not protect redb's header block (zeros there are not a
//! database), and could not tell a damaged block from a torn one at all.
//!
//! What still reads as something other than an error: a block whose *first* version was
//! torn reads as zeros (its content before that write), and a damaged newest slot reads
//! as the block's previous version. Both are indistinguishable from a torn write; redb's
//! own checksums then decide. When neither slot authenticates and neither is empty, the
//! read fails with an error naming the block: garbage is never handed to redb. Like
//! SQLCipher, a whole old copy of the file (or of one block from an old copy of the same
//! file) can be put back by someone with write access; that is a rollback, not a leak.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand::RngCore;
use redb::StorageBackend;
use zeroize::Zeroize;

use crate::error::{Result, StoreError};

/// Bytes in a logical block: redb's page size.
pub const BLOCK_BYTES: usize = 4096;
/// The first bytes of an encrypted store file.
pub const MAGIC: &[u8; 24] = b"medmesh encrypted store\n";
/// The layout of the file written here.
const FORMAT_VERSION: u32 = 1;
/// The first bytes of a plain redb file.
const REDB_MAGIC: &[u8; 9] = &[b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

const SEQ_LEN: usize = 8;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const CIPHER_AT: usize = SEQ_LEN + NONCE_LEN;
const TAG_AT: usize = CIPHER_AT + BLOCK_BYTES;
/// One physical version of a block.
const SLOT_LEN: usize = TAG_AT + TAG_LEN;
/// Both versions of a block, side by side.
const PAIR_LEN: usize = 2 * SLOT_LEN;
/// The file header's share of the file (a whole page, so blocks start aligned to it).
const HEADER_LEN: u64 = 4096;
/// What the key check covers: magic, version, block size, file id.
const HEADER_CHECKED: usize = 48;
const FILE_ID_AT: usize = 32;
const KEY_NONCE_AT: usize = HEADER_CHECKED;
const KEY_TAG_AT: usize = KEY_NONCE_AT + NONCE_LEN;
const HEADER_USED: usize = KEY_TAG_AT + TAG_LEN;
/// Associated data of a block: file id, block index, sequence number, slot.
const AAD_LEN: usize = 16 + 8 + 8 + 1;
/// Writes to one block are serialized by one of these locks (redb never writes one
/// block from two threads at once; the locks make that a guarantee rather than a hope).
const WRITE_STRIPES: usize = 64;

/// The 256-bit key a store file is encrypted with. Wiped from memory when dropped; its
/// `Debug` shows nothing of it.
#[derive(Clone)]
pub struct DataKey([u8; 32]);

impl DataKey {
    /// A new random key, from the operating system's generator.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The key with these bytes (the caller wipes its own copy).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key's bytes, to store it (wrapped) somewhere safe.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.0.into())
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Whether the file at `path` starts as an encrypted store does (false when it cannot be
/// read, is empty or is anything else).
pub fn is_encrypted_store_file(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    let mut head = [0u8; MAGIC.len()];
    read_at(&file, &mut head, 0).is_ok() && &head == MAGIC
}

/// Nonces for one open: a random 96-bit start, counted up.
struct NonceSource {
    start: u128,
    next: AtomicU64,
}

impl NonceSource {
    fn new() -> Self {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes[..NONCE_LEN]);
        Self {
            start: u128::from_le_bytes(bytes),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> [u8; NONCE_LEN] {
        let n = self
            .start
            .wrapping_add(u128::from(self.next.fetch_add(1, Ordering::Relaxed)));
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&n.to_le_bytes()[..NONCE_LEN]);
        nonce
    }
}

/// Which slot of a block holds its newest authentic version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Current {
    /// Neither slot holds a version: the block reads as zeros.
    Empty,
    /// This slot (0 or 1), with this sequence number.
    Slot { slot: usize, seq: u64 },
}

impl Current {
    /// 0 is "not known yet"; bit 0 says known, bit 1 the slot, the rest the sequence.
    fn encode(self) -> u64 {
        match self {
            Current::Empty => 1,
            Current::Slot { slot, seq } => (seq << 2) | ((slot as u64 & 1) << 1) | 1,
        }
    }

    fn decode(v: u64) -> Option<Self> {
        match v {
            0 => None,
            v if v >> 2 == 0 => Some(Current::Empty),
            v => Some(Current::Slot {
                slot: ((v >> 1) & 1) as usize,
                seq: v >> 2,
            }),
        }
    }
}

/// What the slots of a block say.
enum Resolved {
    Current(Current),
    /// Neither slot authenticates, and neither is empty.
    Unauthentic,
}

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Read and write; created when missing.
    Create,
    /// Read and write; must not exist yet.
    CreateNew,
    /// Read only; must exist (shares the lock with other readers).
    ReadOnly,
}

/// A redb storage backend that keeps the database encrypted in a file: see the module
/// documentation for the layout and why it survives a crash at any moment.
pub struct EncryptedFile {
    file: File,
    path: PathBuf,
    cipher: Aes256Gcm,
    file_id: [u8; 16],
    nonces: NonceSource,
    /// Logical length in bytes.
    len: AtomicU64,
    /// Per block, the slot that holds its newest version ([`Current::encode`]). The write
    /// lock is taken only to change the length.
    blocks: RwLock<Vec<AtomicU64>>,
    writing: [Mutex<()>; WRITE_STRIPES],
    #[cfg(test)]
    crash: Option<std::sync::Arc<tests::CrashPoint>>,
}

impl std::fmt::Debug for EncryptedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedFile")
            .field("path", &self.path)
            .field("len", &self.len.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl EncryptedFile {
    /// Opens the encrypted store file at `path` with `key`, creating it (readable by its
    /// owner only) when it does not exist. Takes an exclusive lock on the file, so that
    /// two nodes cannot use it at once. A wrong key, a plain database file or a file
    /// another node holds are refused before anything is written.
    pub fn open(path: &Path, key: &DataKey) -> Result<Self> {
        Self::open_as(path, key, Mode::Create)
    }

    fn open_as(path: &Path, key: &DataKey, mode: Mode) -> Result<Self> {
        let display = || path.display().to_string();
        let mut options = OpenOptions::new();
        options.read(true);
        match mode {
            Mode::Create => {
                options.write(true).create(true);
            }
            Mode::CreateNew => {
                options.write(true).create_new(true);
            }
            Mode::ReadOnly => {}
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options.open(path).map_err(|err| open_failed(path, &err))?;
        let locked = if mode == Mode::ReadOnly {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match locked {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(in_use(path)),
            Err(TryLockError::Error(err)) => return Err(open_failed(path, &err)),
        }
        let cipher = key.cipher();
        let nonces = NonceSource::new();
        let physical = file
            .metadata()
            .map_err(|err| open_failed(path, &err))?
            .len();
        let mut header = [0u8; HEADER_LEN as usize];
        let have = usize::try_from(physical.min(HEADER_LEN)).unwrap_or(0);
        read_at(&file, &mut header[..have], 0).map_err(|err| open_failed(path, &err))?;
        let fresh = physical == 0 || (physical <= HEADER_LEN && header.iter().all(|&b| b == 0));
        let file_id = if fresh {
            if mode == Mode::ReadOnly {
                return Err(StoreError::Open {
                    path: display(),
                    reason: "it is empty, not an encrypted medmesh store".into(),
                });
            }
            write_header(&file, &cipher, &nonces, &mut header)
                .map_err(|err| open_failed(path, &err))?;
            let mut id = [0u8; 16];
            id.copy_from_slice(&header[FILE_ID_AT..FILE_ID_AT + 16]);
            id
        } else {
            check_header(path, &cipher, &header[..have])?
        };
        let blocks = physical.saturating_sub(HEADER_LEN) / PAIR_LEN as u64;
        if physical > HEADER_LEN && !(physical - HEADER_LEN).is_multiple_of(PAIR_LEN as u64) {
            let shown = display();
            tracing::warn!(path = %shown, "the encrypted store ends in a partial block; it is ignored");
        }
        let count = usize::try_from(blocks).map_err(|_| StoreError::Open {
            path: display(),
            reason: "it is too large for this device".into(),
        })?;
        let mut states = Vec::with_capacity(count);
        states.resize_with(count, || AtomicU64::new(0));
        Ok(Self {
            file,
            path: path.to_path_buf(),
            cipher,
            file_id,
            nonces,
            len: AtomicU64::new(blocks * BLOCK_BYTES as u64),
            blocks: RwLock::new(states),
            writing: std::array::from_fn(|_| Mutex::new(())),
            #[cfg(test)]
            crash: None,
        })
    }

    /// A power cut while redb was creating the database can leave a file whose block 0
    /// has no redb header yet (redb writes its magic number last, and never removes it).
    /// Nothing was ever committed then, so the file is emptied and redb creates the
    /// database afresh. When any other block holds a version, the file is left alone
    /// (redb will report it damaged).
    pub(crate) fn forget_unfinished_creation(&self) -> io::Result<()> {
        let blocks = self.len.load(Ordering::Acquire) / BLOCK_BYTES as u64;
        if blocks == 0 {
            return Ok(());
        }
        let mut first = [0u8; BLOCK_BYTES];
        match self.resolve(0, Some(&mut first))? {
            Resolved::Current(_) if !first.starts_with(REDB_MAGIC) => {}
            _ => return Ok(()),
        }
        for index in 1..blocks {
            if !matches!(
                self.resolve(index, None)?,
                Resolved::Current(Current::Empty)
            ) {
                return Ok(());
            }
        }
        tracing::warn!(path = %self.path.display(), "the encrypted store was never completely created; starting it afresh");
        self.set_len(0)?;
        self.file.sync_data()
    }

    fn aad(&self, index: u64, seq: u64, slot: usize) -> [u8; AAD_LEN] {
        let mut aad = [0u8; AAD_LEN];
        aad[..16].copy_from_slice(&self.file_id);
        aad[16..24].copy_from_slice(&index.to_le_bytes());
        aad[24..32].copy_from_slice(&seq.to_le_bytes());
        aad[32] = slot as u8;
        aad
    }

    fn slot_offset(index: u64, slot: usize) -> u64 {
        HEADER_LEN + index * PAIR_LEN as u64 + (slot * SLOT_LEN) as u64
    }

    /// Decrypts `bytes` (one slot) of block `index` into `out`; false (and `out` zeroed)
    /// when it does not authenticate.
    fn open_slot(&self, index: u64, slot: usize, bytes: &[u8], out: &mut [u8]) -> bool {
        let seq = read_seq(bytes);
        let nonce = Nonce::from_slice(&bytes[SEQ_LEN..CIPHER_AT]);
        let tag = Tag::from_slice(&bytes[TAG_AT..SLOT_LEN]);
        out.copy_from_slice(&bytes[CIPHER_AT..TAG_AT]);
        let ok = seq != 0
            && self
                .cipher
                .decrypt_in_place_detached(nonce, &self.aad(index, seq, slot), out, tag)
                .is_ok();
        if !ok {
            out.fill(0);
        }
        ok
    }

    /// Reads both slots of block `index` and finds its newest authentic version, decrypted
    /// into `out` when given.
    fn resolve(&self, index: u64, out: Option<&mut [u8]>) -> io::Result<Resolved> {
        let mut pair = [0u8; PAIR_LEN];
        read_at(&self.file, &mut pair, Self::slot_offset(index, 0))?;
        let (a, b) = pair.split_at(SLOT_LEN);
        let slots = [a, b];
        let order = if read_seq(b) > read_seq(a) {
            [1, 0]
        } else {
            [0, 1]
        };
        let mut scratch = [0u8; BLOCK_BYTES];
        let mut empty = false;
        let mut found = None;
        let mut failed = false;
        for slot in order {
            if slots[slot].iter().all(|&byte| byte == 0) {
                empty = true;
            } else if self.open_slot(index, slot, slots[slot], &mut scratch) {
                found = Some(Current::Slot {
                    slot,
                    seq: read_seq(slots[slot]),
                });
                break;
            } else {
                failed = true;
            }
        }
        if failed && (found.is_some() || empty) {
            // Expected for the blocks a power cut interrupted; anywhere else a sign that
            // the file was changed.
            tracing::warn!(path = %self.path.display(), block = index, "a block's newest version does not authenticate (a write torn by a crash?); its previous version is used");
        }
        let current = match found {
            Some(current) => current,
            None if empty => Current::Empty,
            None => return Ok(Resolved::Unauthentic),
        };
        if let Some(out) = out {
            out.copy_from_slice(&scratch);
        }
        Ok(Resolved::Current(current))
    }

    fn unauthentic(&self, index: u64) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "block {index} of the encrypted store {} does not authenticate: the file was changed outside medmesh or is damaged",
                self.path.display()
            ),
        )
    }

    /// Reads logical block `index` (whole) into `out`.
    fn read_block(&self, states: &[AtomicU64], index: u64, out: &mut [u8]) -> io::Result<()> {
        let state = block_state(states, index)?;
        match Current::decode(state.load(Ordering::Acquire)) {
            Some(Current::Empty) => {
                out.fill(0);
                Ok(())
            }
            Some(Current::Slot { slot, seq }) => {
                let mut bytes = [0u8; SLOT_LEN];
                read_at(&self.file, &mut bytes, Self::slot_offset(index, slot))?;
                if read_seq(&bytes) != seq || !self.open_slot(index, slot, &bytes, out) {
                    return Err(self.unauthentic(index));
                }
                Ok(())
            }
            None => match self.resolve(index, Some(out))? {
                Resolved::Current(current) => {
                    // Only if no write has recorded a newer version meanwhile.
                    let _ = state.compare_exchange(
                        0,
                        current.encode(),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    Ok(())
                }
                Resolved::Unauthentic => Err(self.unauthentic(index)),
            },
        }
    }

    /// Writes `plain` (one whole block) as the next version of block `index`.
    fn write_block(&self, states: &[AtomicU64], index: u64, plain: &[u8]) -> io::Result<()> {
        let state = block_state(states, index)?;
        let current = match Current::decode(state.load(Ordering::Acquire)) {
            Some(current) => current,
            None => match self.resolve(index, None)? {
                Resolved::Current(current) => current,
                // Nothing readable to keep: the whole block is replaced.
                Resolved::Unauthentic => Current::Empty,
            },
        };
        let (slot, seq) = match current {
            Current::Empty => (0, 1),
            Current::Slot { slot, seq } => (1 - slot, seq + 1),
        };
        let mut bytes = [0u8; SLOT_LEN];
        bytes[..SEQ_LEN].copy_from_slice(&seq.to_le_bytes());
        let nonce = self.nonces.next();
        bytes[SEQ_LEN..CIPHER_AT].copy_from_slice(&nonce);
        bytes[CIPHER_AT..TAG_AT].copy_from_slice(plain);
        let tag = self
            .cipher
            .encrypt_in_place_detached(
                Nonce::from_slice(&nonce),
                &self.aad(index, seq, slot),
                &mut bytes[CIPHER_AT..TAG_AT],
            )
            .map_err(|_| io::Error::other("a block could not be encrypted"))?;
        bytes[TAG_AT..].copy_from_slice(&tag);
        #[cfg(test)]
        if let Some(crash) = &self.crash {
            match crash.on_write() {
                tests::Fate::Write => {}
                tests::Fate::Tear => {
                    return write_at(
                        &self.file,
                        &bytes[..SLOT_LEN / 2],
                        Self::slot_offset(index, slot),
                    );
                }
                tests::Fate::Lose => return Ok(()),
            }
        }
        match write_at(&self.file, &bytes, Self::slot_offset(index, slot)) {
            Ok(()) => {
                state.store(Current::Slot { slot, seq }.encode(), Ordering::Release);
                Ok(())
            }
            Err(err) => {
                // The slot may hold part of the write: look again next time.
                state.store(0, Ordering::Release);
                Err(err)
            }
        }
    }

    fn states(&self) -> io::Result<std::sync::RwLockReadGuard<'_, Vec<AtomicU64>>> {
        self.blocks
            .read()
            .map_err(|_| io::Error::other("the encrypted store's block map was poisoned"))
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > self.len.load(Ordering::Acquire)) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{len} bytes at {offset} are past the end of the encrypted store {}",
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn set_crash(&mut self, crash: std::sync::Arc<tests::CrashPoint>) {
        self.crash = Some(crash);
    }
}

impl StorageBackend for EncryptedFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.len.load(Ordering::Acquire))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let states = self.states()?;
        self.check_range(offset, out.len())?;
        let mut done = 0;
        while done < out.len() {
            let at = offset + done as u64;
            let index = at / BLOCK_BYTES as u64;
            let within = (at % BLOCK_BYTES as u64) as usize;
            let n = (BLOCK_BYTES - within).min(out.len() - done);
            if n == BLOCK_BYTES {
                self.read_block(&states, index, &mut out[done..done + n])?;
            } else {
                let mut block = [0u8; BLOCK_BYTES];
                self.read_block(&states, index, &mut block)?;
                out[done..done + n].copy_from_slice(&block[within..within + n]);
            }
            done += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !len.is_multiple_of(BLOCK_BYTES as u64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("an encrypted store holds whole blocks of {BLOCK_BYTES} bytes, not {len}"),
            ));
        }
        let mut states = self
            .blocks
            .write()
            .map_err(|_| io::Error::other("the encrypted store's block map was poisoned"))?;
        let blocks = len / BLOCK_BYTES as u64;
        let count = usize::try_from(blocks)
            .map_err(|_| io::Error::other("the store is too large for this device"))?;
        self.file.set_len(HEADER_LEN + blocks * PAIR_LEN as u64)?;
        states.truncate(count);
        // New file space is zeros: both slots empty.
        states.resize_with(count, || AtomicU64::new(Current::Empty.encode()));
        self.len.store(len, Ordering::Release);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        #[cfg(test)]
        if self.crash.as_ref().is_some_and(|crash| crash.crashed()) {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let states = self.states()?;
        self.check_range(offset, data.len())?;
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let index = at / BLOCK_BYTES as u64;
            let within = (at % BLOCK_BYTES as u64) as usize;
            let n = (BLOCK_BYTES - within).min(data.len() - done);
            let stripe = &self.writing[(index % WRITE_STRIPES as u64) as usize];
            let _guard = stripe
                .lock()
                .map_err(|_| io::Error::other("an encrypted store write lock was poisoned"))?;
            if n == BLOCK_BYTES {
                self.write_block(&states, index, &data[done..done + n])?;
            } else {
                let mut block = [0u8; BLOCK_BYTES];
                self.read_block(&states, index, &mut block)?;
                block[within..within + n].copy_from_slice(&data[done..done + n]);
                self.write_block(&states, index, &block)?;
            }
            done += n;
        }
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        self.file.unlock()
    }
}

/// Writes a new file header (random file id, key check) into `header` and the file.
fn write_header(
    file: &File,
    cipher: &Aes256Gcm,
    nonces: &NonceSource,
    header: &mut [u8; HEADER_LEN as usize],
) -> io::Result<()> {
    header.fill(0);
    header[..MAGIC.len()].copy_from_slice(MAGIC);
    header[24..28].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[28..32].copy_from_slice(&(BLOCK_BYTES as u32).to_le_bytes());
    rand::rng().fill_bytes(&mut header[FILE_ID_AT..FILE_ID_AT + 16]);
    let nonce = nonces.next();
    header[KEY_NONCE_AT..KEY_TAG_AT].copy_from_slice(&nonce);
    let tag = cipher
        .encrypt_in_place_detached(
            Nonce::from_slice(&nonce),
            &header[..HEADER_CHECKED],
            &mut [],
        )
        .map_err(|_| io::Error::other("the key check could not be computed"))?;
    header[KEY_TAG_AT..HEADER_USED].copy_from_slice(&tag);
    write_at(file, header, 0)?;
    file.sync_data()
}

/// Checks an existing file's header against the key; gives its file id.
fn check_header(path: &Path, cipher: &Aes256Gcm, header: &[u8]) -> Result<[u8; 16]> {
    let display = || path.display().to_string();
    if header.starts_with(REDB_MAGIC) {
        return Err(StoreError::NotEncrypted { path: display() });
    }
    if !header.starts_with(MAGIC) {
        return Err(StoreError::Open {
            path: display(),
            reason: "it is not a medmesh store file (neither encrypted nor plain); check the --data directory".into(),
        });
    }
    if header.len() < HEADER_USED {
        return Err(StoreError::CorruptDatabase {
            path: display(),
            reason: "its encryption header is cut short".into(),
        });
    }
    let version = u32::from_le_bytes([header[24], header[25], header[26], header[27]]);
    let block = u32::from_le_bytes([header[28], header[29], header[30], header[31]]);
    if version != FORMAT_VERSION || block as usize != BLOCK_BYTES {
        return Err(StoreError::Open {
            path: display(),
            reason: format!(
                "it was encrypted by another medmesh version (encrypted format {version}, blocks of {block} bytes); run the medmesh version that wrote it"
            ),
        });
    }
    let nonce = Nonce::from_slice(&header[KEY_NONCE_AT..KEY_TAG_AT]);
    let tag = Tag::from_slice(&header[KEY_TAG_AT..HEADER_USED]);
    cipher
        .decrypt_in_place_detached(nonce, &header[..HEADER_CHECKED], &mut [], tag)
        .map_err(|_| StoreError::WrongKey { path: display() })?;
    let mut id = [0u8; 16];
    id.copy_from_slice(&header[FILE_ID_AT..FILE_ID_AT + 16]);
    Ok(id)
}

fn read_seq(slot: &[u8]) -> u64 {
    let mut seq = [0u8; SEQ_LEN];
    seq.copy_from_slice(&slot[..SEQ_LEN]);
    u64::from_le_bytes(seq)
}

fn block_state(states: &[AtomicU64], index: u64) -> io::Result<&AtomicU64> {
    usize::try_from(index)
        .ok()
        .and_then(|i| states.get(i))
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "block past the end"))
}

fn in_use(path: &Path) -> StoreError {
    StoreError::Open {
        path: path.display().to_string(),
        reason: "another medmesh node is already using it; stop that node first, or give this one another --data directory".into(),
    }
}

fn open_failed(path: &Path, err: &io::Error) -> StoreError {
    let reason = if err.kind() == io::ErrorKind::PermissionDenied {
        "permission denied: run medmesh as the user that owns the data directory".to_owned()
    } else if err.kind() == io::ErrorKind::AlreadyExists {
        "it already exists; remove it (it is left over from an earlier attempt) and try again"
            .to_owned()
    } else if err.kind() == io::ErrorKind::NotFound {
        "it does not exist; check the --data directory".to_owned()
    } else {
        err.to_string()
    };
    match StoreError::from_io(err) {
        StoreError::DiskFull => StoreError::DiskFull,
        _ => StoreError::Open {
            path: path.display().to_string(),
            reason,
        },
    }
}

fn read_failed(path: &Path, err: &io::Error) -> StoreError {
    StoreError::Open {
        path: path.display().to_string(),
        reason: format!("it could not be read ({err})"),
    }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(unix)]
fn write_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(windows)]
fn write_at(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_write(buf, offset)? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => {
                buf = &buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

mod copy;
#[cfg(test)]
mod tests;

pub use copy::{encrypt_store_file, reencrypt_store_file};
