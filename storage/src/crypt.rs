//! Encryption at rest: the whole store file — documents, feed, indexes, redb's own
//! header — encrypted and authenticated with one data key.
//!
//! [`EncryptedFile`] is a redb [`StorageBackend`]: redb sees a plain database of 4 KiB
//! blocks (its page size), and the file on disk holds only ciphertext. A copy of the data
//! directory without the key shows no patient name, no field value and no private key.
//!
//! # On disk (format 2)
//!
//! ```text
//! [0, 4096)               file header (plaintext, authenticated):
//!                           "medmesh encrypted store\n" (24 bytes), format version (u32 LE),
//!                           block size (u32 LE), file id (16 random bytes),
//!                           key check: nonce (12) + AES-GCM tag (16) over the bytes before it
//! 4096 + s * 4160         logical block 0, slot s (A = 0, B = 1), 4132 bytes:
//!                           sequence number (u64 LE) + nonce (12) + ciphertext (4096) + tag (16)
//! 4096 + (i + 1) * 4160   logical block i >= 1, its only slot, 4124 bytes:
//!                           nonce (12) + ciphertext (4096) + tag (16)
//! ```
//!
//! A slot is AES-256-GCM of the block's 4096 plaintext bytes. Its associated data is the
//! file id and the block index, and for block 0 also the slot's sequence number and which
//! slot it is: a block cannot be moved to another place or another file, nor an old
//! version of block 0 passed off as newer. A slot that was never written is all zeros and
//! reads as zeros, as new file space must. The logical length is `blocks * 4096` (redb
//! only asks for whole pages); the physical length encodes it.
//!
//! Slots are 4160 bytes apart (64 more than a block, so each starts on a multiple of 64):
//! a block with its nonce and tag cannot fit one 4 KiB page of the file system, and at
//! this spacing none straddles three. The file is `4096 + (blocks + 1) * 4160` bytes: 1.6 %
//! more than the plain database, plus 8 KiB.
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
//! redb (4.x) writes only one page in place: its super-header, the file's first 4 KiB
//! (320 bytes used — magic, the bit naming the primary commit slot, the region geometry,
//! and two 128-byte commit slots, each with its roots' checksums and a checksum of its
//! own; regions have no header pages). Every other page is copy-on-write: a transaction
//! writes only pages that are free in the commit it starts from, and a page it frees is
//! handed out again only by a later transaction (`process_freed_pages` releases the
//! records of older transactions only). A durable commit — one phase, with checksums —
//! writes its pages, then the header with the new commit in the unused commit slot made
//! primary, and syncs once. After a crash redb walks every page reachable from the
//! primary's roots checking checksums; if one fails (or names an impossible page) it falls
//! back to the other commit slot, the previous durable commit, whose pages the
//! interrupted commit did not touch.
//!
//! A torn write leaves a slot that no longer authenticates, so:
//!
//! - **Block 0** holds both of redb's commit slots, and losing it would lose both. It has
//!   two slots, written alternately: a write goes to the slot that does *not* hold the
//!   newest authentic version, with the next sequence number, and a read takes the newest
//!   slot that authenticates. A torn write reverts block 0 to its last complete version —
//!   the header before that write — exactly what redb assumes of a header write that did
//!   not happen.
//! - **Every other block** has one slot. A crash can only tear one that belongs to a
//!   commit that never became durable, or a free one: redb does not need its content, and
//!   reads it at most once — in the recovery walk over the newest commit, which it makes
//!   only when its header says the last writer did not shut down cleanly. While redb opens
//!   such a file ([`RecoveryWindow`]), a block that does not authenticate is handed to
//!   redb as zeros, with a warning naming it. A zero page is neither a leaf nor a branch, so
//!   redb's walk counts it as a checksum failure and falls back to the previous commit, as
//!   it would on a plain file whose torn page fails its checksum. (A lost write leaves the
//!   block's older version, which authenticates and fails redb's checksum the same way.)
//!   Once redb is open, no page it can reach was torn, and a block that does not
//!   authenticate is an I/O error naming it: redb checks no checksums on ordinary reads,
//!   and would panic on a zero page.
//!
//! The assumption is the one redb makes of a plain file: a torn write changes only the
//! bytes it was writing.
//!
//! # What is detected, and what is not
//!
//! Any change to a slot — a flipped bit, a block copied from another place or another
//! file, a file written under another key — fails authentication; garbage is never
//! decrypted into data. What redb then sees:
//!
//! - Block 0 with neither slot authentic: opening fails with an error naming the block.
//!   Its newest slot damaged: the previous version is used, i.e. the store opens at the
//!   commit before — or fails, if that commit's pages are gone; never at made-up content.
//! - Another block damaged, in a file closed cleanly or once redb is open: reading it
//!   fails with an error naming the block (opening fails, or the store reports the read;
//!   other records stay readable).
//! - Another block damaged, read while redb opens a file it did not close cleanly: zeros,
//!   which redb's checks refuse —
//!   as a failed open ("damaged") or, in the recovery walk, as a fall-back to the
//!   previous commit when that commit does not hold the block. The newest commit is then
//!   lost, as after a crash before its sync, and the warning names the block. A damaged
//!   block that is part of the durable state therefore shows as redb's corruption error, a
//!   read error or that roll-back — never as data.
//!
//! Not detected: putting back an old version of the file, or of a block other than 0
//! from an old copy of the same file (redb checks a page against its parent's checksum
//! only in the recovery walk). Like SQLCipher's, this is a roll-back by someone with write
//! access to the file, not a leak.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce as AeadNonce, UnboundKey};
use redb::StorageBackend;

use crate::error::{Result, StoreError};
use header::{check_header, write_header};
use io_at::{in_use, open_failed, read_at, read_failed, write_at};
use key::NonceSource;

/// Bytes in a logical block: redb's page size.
pub const BLOCK_BYTES: usize = 4096;
/// The first bytes of an encrypted store file.
pub const MAGIC: &[u8; 24] = b"medmesh encrypted store\n";
/// The layout of the file written here (1 kept two slots for every block).
const FORMAT_VERSION: u32 = 2;
/// The first bytes of a plain redb file.
const REDB_MAGIC: &[u8; 9] = &[b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
/// Where redb's header keeps its flags, and the ones a writer that did not shut down
/// cleanly leaves set (recovery required, primary unflushed): redb 4's
/// `tree_store/page_store/header.rs`, file format 3.
const REDB_GOD_BYTE: usize = REDB_MAGIC.len();
const REDB_UNCLEAN: u8 = 2 | 8;

const SEQ_LEN: usize = 8;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// A data block's slot: nonce, ciphertext, tag.
const DATA_SLOT_LEN: usize = NONCE_LEN + BLOCK_BYTES + TAG_LEN;
/// A slot of block 0: sequence number, then as a data block's.
const FIRST_SLOT_LEN: usize = SEQ_LEN + DATA_SLOT_LEN;
/// Distance between the starts of two slots: a multiple of 64 bytes, so that no slot
/// straddles three 4 KiB pages of the file system.
const SLOT_STRIDE: u64 = FIRST_SLOT_LEN.next_multiple_of(64) as u64;
/// The file header's share of the file (a whole page, so blocks start aligned to it).
const HEADER_LEN: u64 = 4096;
/// What the key check covers: magic, version, block size, file id.
const HEADER_CHECKED: usize = 48;
const FILE_ID_AT: usize = 32;
const KEY_NONCE_AT: usize = HEADER_CHECKED;
const KEY_TAG_AT: usize = KEY_NONCE_AT + NONCE_LEN;
const HEADER_USED: usize = KEY_TAG_AT + TAG_LEN;
/// Associated data of a data block: file id, block index.
const DATA_AAD_LEN: usize = 16 + 8;
/// Associated data of a slot of block 0: file id, block index, sequence number, slot.
const FIRST_AAD_LEN: usize = DATA_AAD_LEN + 8 + 1;
/// Writes to one block are serialized by one of these locks (redb never writes one
/// block from two threads at once; the locks make that a guarantee rather than a hope).
const WRITE_STRIPES: usize = 64;

/// Whether the file at `path` starts as an encrypted store does (false when it cannot be
/// read, is empty or is anything else).
pub fn is_encrypted_store_file(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    let mut head = [0u8; MAGIC.len()];
    read_at(&file, &mut head, 0).is_ok() && &head == MAGIC
}

/// Which slot of block 0 holds its newest authentic version.
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

/// What the slots of block 0 say.
enum Resolved {
    Current(Current),
    /// Neither slot authenticates, and neither is empty.
    Unauthentic,
}

/// What the slot of a data block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataSlot {
    /// Never written: the block is zeros.
    Empty,
    /// A version that authenticates.
    Authentic,
    /// Anything else: a write torn by a crash, or damage.
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

/// The time during which redb opens an [`EncryptedFile`] and may walk a commit that a
/// crash interrupted. Until [`RecoveryWindow::end`], a data block that does not
/// authenticate reads as zeros (which redb's checksums refuse, so that it falls back to
/// the previous commit); afterwards it is an I/O error. Take it before handing the file
/// to redb, end it once redb's open has returned. A file whose redb header says it was
/// closed cleanly has no window (there is nothing to recover).
#[derive(Debug, Clone)]
pub struct RecoveryWindow(Arc<AtomicBool>);

impl RecoveryWindow {
    /// Ends the window: from now on a data block that does not authenticate is an error.
    pub fn end(&self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A redb storage backend that keeps the database encrypted in a file: see the module
/// documentation for the layout and why it survives a crash at any moment.
pub struct EncryptedFile {
    file: File,
    path: PathBuf,
    /// The key in aws-lc's AES-GCM, for the blocks (several times faster than the
    /// pure-Rust GHASH, which was a tenth of the writer's time; the bytes are the same).
    sealer: LessSafeKey,
    file_id: [u8; 16],
    nonces: NonceSource,
    /// Logical length in bytes.
    len: AtomicU64,
    /// The slot of block 0 that holds its newest version ([`Current::encode`]).
    first: AtomicU64,
    /// Whether redb is still opening the file ([`RecoveryWindow`]).
    recovering: Arc<AtomicBool>,
    writing: [Mutex<()>; WRITE_STRIPES],
    #[cfg(test)]
    crash: Option<Arc<tests::CrashPoint>>,
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
    /// another node holds are refused before anything is written. The file starts in its
    /// [`RecoveryWindow`].
    pub fn open(path: &Path, key: &DataKey) -> Result<Self> {
        Self::open_as(path, key, Mode::Create)
    }

    /// The window during which a data block that does not authenticate reads as zeros:
    /// end it once redb has opened the file.
    pub fn recovery_window(&self) -> RecoveryWindow {
        RecoveryWindow(self.recovering.clone())
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
        let sealer = UnboundKey::new(&AES_256_GCM, key.as_bytes())
            .map(LessSafeKey::new)
            .map_err(|_| StoreError::Open {
                path: display(),
                reason: "the data key could not be set up for AES-256-GCM".into(),
            })?;
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
        let blocks = blocks_in(physical);
        if physical > HEADER_LEN && physical != physical_len(blocks) {
            let shown = display();
            tracing::warn!(path = %shown, "the encrypted store ends in a partial block; it is ignored");
        }
        if usize::try_from(blocks).is_err() {
            return Err(StoreError::Open {
                path: display(),
                reason: "it is too large for this device".into(),
            });
        }
        let opened = Self {
            file,
            path: path.to_path_buf(),
            sealer,
            file_id,
            nonces,
            len: AtomicU64::new(blocks * BLOCK_BYTES as u64),
            first: AtomicU64::new(0),
            recovering: Arc::new(AtomicBool::new(true)),
            writing: std::array::from_fn(|_| Mutex::new(())),
            #[cfg(test)]
            crash: None,
        };
        if opened.closed_cleanly() {
            opened.recovering.store(false, Ordering::Release);
        }
        Ok(opened)
    }

    /// Whether redb's header says its last writer shut down cleanly: then redb walks no
    /// commit when it opens the file, every page it can reach was synced, and no
    /// [`RecoveryWindow`] is needed — a block that does not authenticate is an error
    /// from the start, reported as such rather than as whatever redb makes of zeros.
    fn closed_cleanly(&self) -> bool {
        if self.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut first = [0u8; BLOCK_BYTES];
        matches!(
            self.resolve_first(Some(&mut first)),
            Ok(Resolved::Current(Current::Slot { .. }))
        ) && first.starts_with(REDB_MAGIC)
            && first[REDB_GOD_BYTE] & REDB_UNCLEAN == 0
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
        match self.resolve_first(Some(&mut first))? {
            Resolved::Current(_) if !first.starts_with(REDB_MAGIC) => {}
            _ => return Ok(()),
        }
        let mut slot = [0u8; DATA_SLOT_LEN];
        for index in 1..blocks {
            read_at(&self.file, &mut slot, slot_offset(index, 0))?;
            if slot.iter().any(|&byte| byte != 0) {
                return Ok(());
            }
        }
        tracing::warn!(path = %self.path.display(), "the encrypted store was never completely created; starting it afresh");
        self.set_len(0)?;
        self.file.sync_data()
    }

    fn data_aad(&self, index: u64) -> [u8; DATA_AAD_LEN] {
        let mut aad = [0u8; DATA_AAD_LEN];
        aad[..16].copy_from_slice(&self.file_id);
        aad[16..24].copy_from_slice(&index.to_le_bytes());
        aad
    }

    fn first_aad(&self, seq: u64, slot: usize) -> [u8; FIRST_AAD_LEN] {
        let mut aad = [0u8; FIRST_AAD_LEN];
        aad[..DATA_AAD_LEN].copy_from_slice(&self.data_aad(0));
        aad[DATA_AAD_LEN..DATA_AAD_LEN + 8].copy_from_slice(&seq.to_le_bytes());
        aad[DATA_AAD_LEN + 8] = slot as u8;
        aad
    }

    /// Decrypts `sealed` (nonce, ciphertext, tag) into `out`; false (and `out` zeroed)
    /// when it does not authenticate under `aad`.
    fn open_sealed(&self, sealed: &[u8], aad: &[u8], out: &mut [u8]) -> bool {
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[..NONCE_LEN]);
        let tag = &sealed[NONCE_LEN + BLOCK_BYTES..DATA_SLOT_LEN];
        out.copy_from_slice(&sealed[NONCE_LEN..NONCE_LEN + BLOCK_BYTES]);
        let ok = self
            .sealer
            .open_in_place_separate_tag(
                AeadNonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                tag,
                out,
            )
            .is_ok();
        if !ok {
            out.fill(0);
        }
        ok
    }

    /// Encrypts `plain` into `sealed` (nonce, ciphertext, tag) under `aad`.
    fn seal(&self, plain: &[u8], aad: &[u8], sealed: &mut [u8]) -> io::Result<()> {
        let nonce = self.nonces.next();
        sealed[..NONCE_LEN].copy_from_slice(&nonce);
        let text = &mut sealed[NONCE_LEN..NONCE_LEN + BLOCK_BYTES];
        text.copy_from_slice(plain);
        let tag = self
            .sealer
            .seal_in_place_separate_tag(
                AeadNonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                text,
            )
            .map_err(|_| io::Error::other("a block could not be encrypted"))?;
        sealed[NONCE_LEN + BLOCK_BYTES..DATA_SLOT_LEN].copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decrypts a slot of block 0 into `out`; false (and `out` zeroed) when it does not
    /// authenticate.
    fn open_first_slot(&self, slot: usize, bytes: &[u8], out: &mut [u8]) -> bool {
        let seq = read_seq(bytes);
        seq != 0 && self.open_sealed(&bytes[SEQ_LEN..], &self.first_aad(seq, slot), out)
    }

    /// Reads both slots of block 0 and finds its newest authentic version, decrypted into
    /// `out` when given.
    fn resolve_first(&self, out: Option<&mut [u8]>) -> io::Result<Resolved> {
        let mut pair = [[0u8; FIRST_SLOT_LEN]; 2];
        for (slot, bytes) in pair.iter_mut().enumerate() {
            read_at(&self.file, bytes, slot_offset(0, slot))?;
        }
        let order = if read_seq(&pair[1]) > read_seq(&pair[0]) {
            [1, 0]
        } else {
            [0, 1]
        };
        let mut scratch = [0u8; BLOCK_BYTES];
        let mut empty = false;
        let mut found = None;
        let mut failed = false;
        for slot in order {
            if pair[slot].iter().all(|&byte| byte == 0) {
                empty = true;
            } else if self.open_first_slot(slot, &pair[slot], &mut scratch) {
                found = Some(Current::Slot {
                    slot,
                    seq: read_seq(&pair[slot]),
                });
                break;
            } else {
                failed = true;
            }
        }
        if failed && (found.is_some() || empty) {
            // Expected after a power cut during a commit; otherwise a sign that the file
            // was changed.
            tracing::warn!(path = %self.path.display(), block = 0, "the newest version of redb's header block does not authenticate (a write torn by a crash?); its previous version is used");
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

    /// Reads block 0 (whole) into `out`.
    fn read_first(&self, out: &mut [u8]) -> io::Result<()> {
        let seen = self.first.load(Ordering::Acquire);
        match Current::decode(seen) {
            Some(Current::Empty) => {
                out.fill(0);
                return Ok(());
            }
            Some(Current::Slot { slot, seq }) => {
                let mut bytes = [0u8; FIRST_SLOT_LEN];
                read_at(&self.file, &mut bytes, slot_offset(0, slot))?;
                if read_seq(&bytes) == seq && self.open_first_slot(slot, &bytes, out) {
                    return Ok(());
                }
                // A write may have gone over this slot meanwhile: look at both.
            }
            None => {}
        }
        match self.resolve_first(Some(out))? {
            Resolved::Current(current) => {
                // Only if no write has recorded a newer version meanwhile.
                let _ = self.first.compare_exchange(
                    seen,
                    current.encode(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                Ok(())
            }
            Resolved::Unauthentic => Err(self.unauthentic(0)),
        }
    }

    /// Writes `plain` (one whole block) as the next version of block 0.
    fn write_first(&self, plain: &[u8]) -> io::Result<()> {
        let current = match Current::decode(self.first.load(Ordering::Acquire)) {
            Some(current) => current,
            None => match self.resolve_first(None)? {
                Resolved::Current(current) => current,
                // Nothing readable to keep: the whole block is replaced.
                Resolved::Unauthentic => Current::Empty,
            },
        };
        let (slot, seq) = match current {
            Current::Empty => (0, 1),
            Current::Slot { slot, seq } => (1 - slot, seq + 1),
        };
        let mut bytes = [0u8; FIRST_SLOT_LEN];
        bytes[..SEQ_LEN].copy_from_slice(&seq.to_le_bytes());
        self.seal(plain, &self.first_aad(seq, slot), &mut bytes[SEQ_LEN..])?;
        match self.put(&bytes, slot_offset(0, slot)) {
            Ok(()) => {
                self.first
                    .store(Current::Slot { slot, seq }.encode(), Ordering::Release);
                Ok(())
            }
            Err(err) => {
                // The slot may hold part of the write: look again next time.
                self.first.store(0, Ordering::Release);
                Err(err)
            }
        }
    }

    /// Reads the slot of data block `index` (not 0) into `out`, and says what it held
    /// (`out` is zeros unless it was authentic).
    pub(crate) fn read_data_slot(&self, index: u64, out: &mut [u8]) -> io::Result<DataSlot> {
        let mut bytes = [0u8; DATA_SLOT_LEN];
        read_at(&self.file, &mut bytes, slot_offset(index, 0))?;
        if bytes.iter().all(|&byte| byte == 0) {
            out.fill(0);
            Ok(DataSlot::Empty)
        } else if self.open_sealed(&bytes, &self.data_aad(index), out) {
            Ok(DataSlot::Authentic)
        } else {
            Ok(DataSlot::Unauthentic)
        }
    }

    /// Reads data block `index` (whole) into `out`: see the module documentation for a
    /// block that does not authenticate.
    fn read_data(&self, index: u64, out: &mut [u8]) -> io::Result<()> {
        match self.read_data_slot(index, out)? {
            DataSlot::Empty | DataSlot::Authentic => Ok(()),
            DataSlot::Unauthentic if self.recovering.load(Ordering::Acquire) => {
                tracing::warn!(path = %self.path.display(), block = index, "a block does not authenticate (a write torn by a crash, or damage); redb is given zeros, which its checksums refuse");
                Ok(())
            }
            DataSlot::Unauthentic => Err(self.unauthentic(index)),
        }
    }

    /// Writes `plain` (one whole block) as data block `index` (not 0).
    fn write_data(&self, index: u64, plain: &[u8]) -> io::Result<()> {
        let mut bytes = [0u8; DATA_SLOT_LEN];
        self.seal(plain, &self.data_aad(index), &mut bytes)?;
        self.put(&bytes, slot_offset(index, 0))
    }

    /// Makes data block `index` (not 0) one that does not authenticate, as it was in the
    /// file a copy is made from.
    pub(crate) fn write_unauthentic(&self, index: u64) -> io::Result<()> {
        self.check_range(index * BLOCK_BYTES as u64, BLOCK_BYTES)?;
        self.put(&[0xFF; DATA_SLOT_LEN], slot_offset(index, 0))
    }

    /// Writes one slot's bytes (a test's crash point may tear or lose the write).
    fn put(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        #[cfg(test)]
        if let Some(crash) = &self.crash {
            match crash.on_write() {
                tests::Fate::Write => {}
                tests::Fate::Tear => {
                    return write_at(&self.file, &bytes[..bytes.len() / 2], offset);
                }
                tests::Fate::Lose => return Ok(()),
            }
        }
        write_at(&self.file, bytes, offset)
    }

    fn read_block(&self, index: u64, out: &mut [u8]) -> io::Result<()> {
        if index == 0 {
            self.read_first(out)
        } else {
            self.read_data(index, out)
        }
    }

    fn write_block(&self, index: u64, plain: &[u8]) -> io::Result<()> {
        if index == 0 {
            self.write_first(plain)
        } else {
            self.write_data(index, plain)
        }
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
    pub(crate) fn set_crash(&mut self, crash: Arc<tests::CrashPoint>) {
        self.crash = Some(crash);
    }
}

impl StorageBackend for EncryptedFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.len.load(Ordering::Acquire))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, out.len())?;
        for Span {
            index,
            within,
            done,
            n,
        } in spans(offset, out.len())
        {
            if n == BLOCK_BYTES {
                self.read_block(index, &mut out[done..done + n])?;
            } else {
                let mut block = [0u8; BLOCK_BYTES];
                self.read_block(index, &mut block)?;
                out[done..done + n].copy_from_slice(&block[within..within + n]);
            }
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
        let blocks = len / BLOCK_BYTES as u64;
        if usize::try_from(blocks).is_err() {
            return Err(io::Error::other("the store is too large for this device"));
        }
        // Serialized with writes to block 0, whose slots this may remove.
        let _guard = self.writing[0]
            .lock()
            .map_err(|_| io::Error::other("an encrypted store write lock was poisoned"))?;
        self.file.set_len(physical_len(blocks))?;
        if blocks == 0 {
            // Block 0's slots are gone; grown again, they are zeros.
            self.first.store(Current::Empty.encode(), Ordering::Release);
        }
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
        self.check_range(offset, data.len())?;
        for Span {
            index,
            within,
            done,
            n,
        } in spans(offset, data.len())
        {
            let stripe = &self.writing[(index % WRITE_STRIPES as u64) as usize];
            let _guard = stripe
                .lock()
                .map_err(|_| io::Error::other("an encrypted store write lock was poisoned"))?;
            if n == BLOCK_BYTES {
                self.write_block(index, &data[done..done + n])?;
            } else {
                let mut block = [0u8; BLOCK_BYTES];
                self.read_block(index, &mut block)?;
                block[within..within + n].copy_from_slice(&data[done..done + n]);
                self.write_block(index, &block)?;
            }
        }
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        self.file.unlock()
    }
}

/// The part of one logical block that a read or write of the file covers.
struct Span {
    /// The block.
    index: u64,
    /// Where in the block the part starts.
    within: usize,
    /// Bytes of the read or write before this part.
    done: usize,
    /// The part's length.
    n: usize,
}

/// The blocks that `len` bytes at `offset` cover, in order.
fn spans(offset: u64, len: usize) -> impl Iterator<Item = Span> {
    let mut done = 0;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = offset + done as u64;
        let within = (at % BLOCK_BYTES as u64) as usize;
        let span = Span {
            index: at / BLOCK_BYTES as u64,
            within,
            done,
            n: (BLOCK_BYTES - within).min(len - done),
        };
        done += span.n;
        Some(span)
    })
}

/// Where slot `slot` of logical block `index` starts (data blocks have slot 0 only).
fn slot_offset(index: u64, slot: usize) -> u64 {
    if index == 0 {
        HEADER_LEN + slot as u64 * SLOT_STRIDE
    } else {
        HEADER_LEN + (index + 1) * SLOT_STRIDE
    }
}

/// The file's length when it holds `blocks` logical blocks.
fn physical_len(blocks: u64) -> u64 {
    if blocks == 0 {
        HEADER_LEN
    } else {
        HEADER_LEN + (blocks + 1) * SLOT_STRIDE
    }
}

/// The whole logical blocks a file of `physical` bytes holds.
fn blocks_in(physical: u64) -> u64 {
    match physical.checked_sub(HEADER_LEN + 2 * SLOT_STRIDE) {
        Some(rest) => 1 + rest / SLOT_STRIDE,
        None => 0,
    }
}

fn read_seq(slot: &[u8]) -> u64 {
    let mut seq = [0u8; SEQ_LEN];
    seq.copy_from_slice(&slot[..SEQ_LEN]);
    u64::from_le_bytes(seq)
}

mod copy;
mod header;
mod io_at;
mod key;
#[cfg(test)]
mod tests;

pub use copy::{encrypt_store_file, reencrypt_store_file};
pub use key::DataKey;
