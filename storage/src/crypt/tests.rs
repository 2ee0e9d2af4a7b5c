//! The encrypted backend against a model, and redb's recovery through torn writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use medmesh_protocol::{ChangeAuthor, DocId, Schema};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redb::ReadableDatabase;
use serde_json::json;

use super::*;
use crate::store::{Store, StoreOptions};
use crate::write::{WriteBatch, WriteKind, WriteOp};

/// A simulated power cut: the write with this number is torn (half of its slot reaches
/// the disk) or lost, and every I/O after it fails, as on a machine that lost power.
#[derive(Debug)]
pub(crate) struct CrashPoint {
    at: u64,
    tear: bool,
    count: AtomicU64,
}

pub(crate) enum Fate {
    Write,
    Tear,
    Lose,
}

impl CrashPoint {
    fn new(at: u64, tear: bool) -> Arc<Self> {
        Arc::new(Self {
            at,
            tear,
            count: AtomicU64::new(0),
        })
    }

    pub(crate) fn on_write(&self) -> Fate {
        let n = self.count.fetch_add(1, Ordering::SeqCst);
        if n < self.at {
            Fate::Write
        } else if n == self.at && self.tear {
            Fate::Tear
        } else {
            Fate::Lose
        }
    }

    pub(crate) fn crashed(&self) -> bool {
        self.count.load(Ordering::SeqCst) > self.at
    }

    fn writes(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

/// One open encrypted file shared by the store's reopens (a crash test keeps its crash
/// point across them).
#[derive(Debug)]
struct Shared(Arc<EncryptedFile>, Arc<CrashPoint>);

impl Shared {
    fn dead(&self) -> io::Result<()> {
        if self.1.crashed() {
            Err(io::Error::other("the power is off"))
        } else {
            Ok(())
        }
    }
}

impl StorageBackend for Shared {
    fn len(&self) -> io::Result<u64> {
        self.dead()?;
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.dead()?;
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.dead()?;
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.dead()?;
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.dead()?;
        self.0.write(offset, data)?;
        self.dead()
    }
}

fn key(seed: u8) -> DataKey {
    DataKey::from_bytes([seed; 32])
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn random_reads_and_writes_match_a_model_across_reopens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.redb");
    let key = key(7);
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut model: Vec<u8> = Vec::new();
    let mut file = EncryptedFile::open(&path, &key).expect("create");
    for step in 0..400 {
        if step % 50 == 49 {
            drop(file);
            file = EncryptedFile::open(&path, &key).expect("reopen");
            assert_eq!(file.len().expect("len"), model.len() as u64);
        }
        match rng.random_range(0..10) {
            0 => {
                let blocks = rng.random_range(0..12u64);
                let len = blocks * BLOCK_BYTES as u64;
                file.set_len(len).expect("set_len");
                model.resize(len as usize, 0);
            }
            1..=5 if !model.is_empty() => {
                let offset = rng.random_range(0..model.len());
                let len = rng.random_range(1..=(model.len() - offset).min(3 * BLOCK_BYTES));
                let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                file.write(offset as u64, &data).expect("write");
                model[offset..offset + len].copy_from_slice(&data);
            }
            _ if !model.is_empty() => {
                let offset = rng.random_range(0..model.len());
                let len = rng.random_range(1..=(model.len() - offset).min(3 * BLOCK_BYTES));
                let mut out = vec![0u8; len];
                file.read(offset as u64, &mut out).expect("read");
                assert_eq!(out, model[offset..offset + len], "step {step}");
            }
            _ => {}
        }
    }
    let mut all = vec![0u8; model.len()];
    file.read(0, &mut all).expect("read all");
    assert_eq!(all, model);
    // Past the end is refused, not invented.
    let mut out = [0u8; 1];
    assert!(file.read(model.len() as u64, &mut out).is_err());
    assert!(file.set_len(100).is_err());
}

#[test]
fn the_file_holds_no_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("plain-check.redb");
    let file = EncryptedFile::open(&path, &key(1)).expect("create");
    file.set_len(4 * BLOCK_BYTES as u64).expect("set_len");
    let text = b"Okonkwo-Test ".repeat(1000);
    file.write(100, &text).expect("write");
    file.sync_data().expect("sync");
    drop(file);
    let raw = std::fs::read(&path).expect("read raw");
    assert!(!contains(&raw, b"Okonkwo"));
    assert!(raw.starts_with(MAGIC));
}

#[test]
fn slots_sit_where_the_layout_says_and_none_straddles_three_pages() {
    assert_eq!(SLOT_STRIDE, 4160);
    assert_eq!((FIRST_SLOT_LEN, DATA_SLOT_LEN), (4132, 4124));
    for index in 0..5000u64 {
        for slot in 0..if index == 0 { 2 } else { 1 } {
            let start = slot_offset(index, slot);
            let end = start + FIRST_SLOT_LEN as u64 - 1;
            assert_eq!(start % 64, 0);
            assert!(end / 4096 - start / 4096 <= 1, "block {index} slot {slot}");
        }
        assert_eq!(blocks_in(physical_len(index)), index);
        assert_eq!(blocks_in(physical_len(index) + SLOT_STRIDE - 1), index);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("layout.redb");
    let file = EncryptedFile::open(&path, &key(1)).expect("create");
    file.set_len(10 * BLOCK_BYTES as u64).expect("set_len");
    drop(file);
    let size = std::fs::metadata(&path).expect("meta").len();
    assert_eq!(size, HEADER_LEN + 11 * SLOT_STRIDE);
}

#[test]
fn a_torn_write_of_block_0_reverts_it_and_damage_to_both_slots_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("torn.redb");
    let key = key(2);
    let file = EncryptedFile::open(&path, &key).expect("create");
    file.set_len(2 * BLOCK_BYTES as u64).expect("set_len");
    file.write(0, &[1u8; BLOCK_BYTES]).expect("v1");
    file.write(0, &[2u8; BLOCK_BYTES]).expect("v2");
    file.write(BLOCK_BYTES as u64, &[9u8; BLOCK_BYTES])
        .expect("block 1");
    drop(file);
    // v1 went to slot A (sequence 1), v2 to slot B (sequence 2): tear slot B.
    let mut raw = std::fs::read(&path).expect("raw");
    let b = slot_offset(0, 1) as usize;
    raw[b + FIRST_SLOT_LEN / 2..b + FIRST_SLOT_LEN].fill(0);
    std::fs::write(&path, &raw).expect("tear");
    let file = EncryptedFile::open(&path, &key).expect("reopen");
    let mut out = [0u8; BLOCK_BYTES];
    file.read(0, &mut out).expect("read reverted");
    assert_eq!(out, [1u8; BLOCK_BYTES]);
    // The next write goes over the torn slot, not the good one.
    file.write(0, &[3u8; BLOCK_BYTES]).expect("v3");
    drop(file);
    let file = EncryptedFile::open(&path, &key).expect("reopen");
    file.read(0, &mut out).expect("read v3");
    assert_eq!(out, [3u8; BLOCK_BYTES]);
    // A partial write (redb writes its 320-byte header so) keeps the rest of the block.
    file.write(10, &[4u8; 20]).expect("partial");
    file.read(0, &mut out).expect("read partial");
    assert_eq!(&out[..10], &[3u8; 10]);
    assert_eq!(&out[10..30], &[4u8; 20]);
    assert_eq!(&out[30..], &[3u8; BLOCK_BYTES - 30][..]);
    drop(file);
    // Both slots damaged: a clear error, never made-up content, even while redb opens.
    let mut raw = std::fs::read(&path).expect("raw");
    raw[slot_offset(0, 0) as usize + 100] ^= 0x55;
    raw[slot_offset(0, 1) as usize + 100] ^= 0x55;
    std::fs::write(&path, &raw).expect("damage");
    let file = EncryptedFile::open(&path, &key).expect("reopen");
    let err = file.read(0, &mut out).expect_err("damaged block");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("block 0"), "{err}");
    assert!(err.to_string().contains("does not authenticate"), "{err}");
    // The other block is still readable.
    file.read(BLOCK_BYTES as u64, &mut out).expect("block 1");
    assert_eq!(out, [9u8; BLOCK_BYTES]);
}

#[test]
fn a_data_block_that_does_not_authenticate_is_zeros_while_redb_opens_then_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data.redb");
    let key = key(2);
    let file = EncryptedFile::open(&path, &key).expect("create");
    file.set_len(3 * BLOCK_BYTES as u64).expect("set_len");
    file.write(BLOCK_BYTES as u64, &[7u8; BLOCK_BYTES])
        .expect("block 1");
    file.write(2 * BLOCK_BYTES as u64, &[8u8; BLOCK_BYTES])
        .expect("block 2");
    drop(file);
    // Block 1 torn (its second half never reached the disk), block 2 one bit flipped.
    let mut raw = std::fs::read(&path).expect("raw");
    let one = slot_offset(1, 0) as usize;
    raw[one + DATA_SLOT_LEN / 2..one + DATA_SLOT_LEN].fill(0);
    raw[slot_offset(2, 0) as usize + 2000] ^= 0x01;
    std::fs::write(&path, &raw).expect("damage");
    let file = EncryptedFile::open(&path, &key).expect("reopen");
    let mut out = [0xAAu8; 2 * BLOCK_BYTES];
    file.read(BLOCK_BYTES as u64, &mut out)
        .expect("zeros while redb opens");
    assert!(out.iter().all(|&b| b == 0));
    file.recovery_window().end();
    for index in [1u64, 2] {
        let err = file
            .read(index * BLOCK_BYTES as u64 + 5, &mut out[..10])
            .expect_err("damaged block");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains(&format!("block {index} ")),
            "{err}"
        );
    }
    // Writing the block whole replaces it (redb writes free pages so).
    file.write(BLOCK_BYTES as u64, &[5u8; BLOCK_BYTES])
        .expect("rewrite");
    file.read(BLOCK_BYTES as u64, &mut out[..BLOCK_BYTES])
        .expect("rewritten");
    assert!(out[..BLOCK_BYTES].iter().all(|&b| b == 5));
}

#[test]
fn a_block_moved_to_another_place_does_not_authenticate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("moved.redb");
    let key = key(3);
    let file = EncryptedFile::open(&path, &key).expect("create");
    file.set_len(4 * BLOCK_BYTES as u64).expect("set_len");
    for index in 0..4u8 {
        file.write(
            u64::from(index) * BLOCK_BYTES as u64,
            &[index + 1; BLOCK_BYTES],
        )
        .expect("block");
    }
    drop(file);
    let mut raw = std::fs::read(&path).expect("raw");
    // Blocks 1 and 2 swapped; block 0's slot copied over block 3's (its sequence number
    // in front, the rest in the place of a data slot).
    let (one, two, three) = (
        slot_offset(1, 0) as usize,
        slot_offset(2, 0) as usize,
        slot_offset(3, 0) as usize,
    );
    let first = raw[one..one + DATA_SLOT_LEN].to_vec();
    raw.copy_within(two..two + DATA_SLOT_LEN, one);
    raw[two..two + DATA_SLOT_LEN].copy_from_slice(&first);
    let zero = slot_offset(0, 0) as usize;
    raw.copy_within(zero + SEQ_LEN..zero + FIRST_SLOT_LEN, three);
    std::fs::write(&path, &raw).expect("swap");
    let file = EncryptedFile::open(&path, &key).expect("reopen");
    file.recovery_window().end();
    let mut out = [0u8; BLOCK_BYTES];
    for index in 1..4u64 {
        assert!(file.read(index * BLOCK_BYTES as u64, &mut out).is_err());
    }
    file.read(0, &mut out).expect("block 0");
    assert_eq!(out, [1u8; BLOCK_BYTES]);
}

#[test]
fn a_rekeyed_copy_keeps_a_block_that_does_not_authenticate_as_such() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (dir.path().join("src.redb"), dir.path().join("dst.redb"));
    let file = EncryptedFile::open(&src, &key(1)).expect("create");
    file.set_len(3 * BLOCK_BYTES as u64).expect("set_len");
    for index in 0..3u8 {
        file.write(
            u64::from(index) * BLOCK_BYTES as u64,
            &[index + 1; BLOCK_BYTES],
        )
        .expect("block");
    }
    drop(file);
    let mut raw = std::fs::read(&src).expect("raw");
    raw[slot_offset(1, 0) as usize + 50] ^= 0x10;
    std::fs::write(&src, &raw).expect("damage");
    reencrypt_store_file(&src, &dst, &key(1), &key(2)).expect("rekey");
    let copy = EncryptedFile::open(&dst, &key(2)).expect("open copy");
    copy.recovery_window().end();
    let mut out = [0u8; BLOCK_BYTES];
    copy.read(0, &mut out).expect("block 0");
    assert_eq!(out, [1u8; BLOCK_BYTES]);
    assert!(copy.read(BLOCK_BYTES as u64, &mut out).is_err());
    copy.read(2 * BLOCK_BYTES as u64, &mut out)
        .expect("block 2");
    assert_eq!(out, [3u8; BLOCK_BYTES]);
}

#[test]
fn a_zero_page_fails_redbs_checksum_walk_rather_than_panicking() {
    // What the recovery window relies on: when redb walks the newest commit after a crash,
    // a zero page is a checksum failure — a fall-back to the previous commit, or redb's
    // corruption error when that commit holds the page too — never a panic or bad data.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("zero.redb");
    let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
    let db = redb::Database::create(&path).expect("create");
    for round in 1..=2u8 {
        let txn = db.begin_write().expect("write");
        {
            let mut t = txn.open_table(table).expect("table");
            for n in 0..50u64 {
                t.insert(u64::from(round) * 1000 + n, &[round; 300][..])
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    // Taken while the database is open, as after a crash: redb will walk the newest commit.
    let raw = std::fs::read(&path).expect("raw");
    drop(db);
    let (mut fell_back, mut refused) = (0, 0);
    for page in 1..raw.len() / BLOCK_BYTES {
        let at = page * BLOCK_BYTES;
        if raw[at..at + BLOCK_BYTES].iter().all(|&b| b == 0) {
            continue;
        }
        let mut copy = raw.clone();
        copy[at..at + BLOCK_BYTES].fill(0);
        let path = dir.path().join(format!("zero-{page}.redb"));
        std::fs::write(&path, &copy).expect("write copy");
        let opened = std::panic::catch_unwind(|| redb::Database::create(&path))
            .unwrap_or_else(|_| panic!("redb panicked on zero page {page}"));
        let db = match opened {
            Ok(db) => db,
            Err(err) => {
                assert!(err.to_string().contains("orrupt"), "page {page}: {err}");
                refused += 1;
                continue;
            }
        };
        let read = db.begin_read().expect("read");
        let t = read.open_table(table).expect("table");
        for round in 1..=2u8 {
            for n in 0..50u64 {
                let got = t.get(u64::from(round) * 1000 + n).expect("get");
                match got {
                    Some(value) => assert_eq!(value.value(), &[round; 300][..]),
                    None => assert_eq!(round, 2, "page {page}: the first commit lost"),
                }
            }
        }
        if t.get(2000).expect("get").is_none() {
            fell_back += 1;
        }
    }
    assert!(fell_back > 0, "no zeroed page made redb fall back");
    assert!(refused > 0, "no zeroed page was refused");
}

#[test]
fn a_file_in_format_1_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v1.redb");
    drop(EncryptedFile::open(&path, &key(4)).expect("create"));
    let mut raw = std::fs::read(&path).expect("raw");
    raw[24..28].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&path, &raw).expect("write");
    match EncryptedFile::open(&path, &key(4)) {
        Err(StoreError::Open { reason, .. }) => {
            assert!(reason.contains("encrypted format 1"), "{reason}")
        }
        other => panic!("expected a format error, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).expect("raw"), raw);
}

#[test]
fn a_wrong_key_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("key.redb");
    let file = EncryptedFile::open(&path, &key(4)).expect("create");
    file.set_len(BLOCK_BYTES as u64).expect("set_len");
    file.write(0, &[4u8; BLOCK_BYTES]).expect("write");
    drop(file);
    let before = std::fs::read(&path).expect("raw");
    match EncryptedFile::open(&path, &key(5)) {
        Err(StoreError::WrongKey { path: p }) => assert!(p.contains("key.redb")),
        other => panic!("expected WrongKey, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).expect("raw"), before);
}

#[test]
fn a_second_open_is_refused_while_the_first_holds_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lock.redb");
    let first = EncryptedFile::open(&path, &key(6)).expect("create");
    match EncryptedFile::open(&path, &key(6)) {
        Err(StoreError::Open { reason, .. }) => {
            assert!(reason.contains("another medmesh node"), "{reason}")
        }
        other => panic!("expected a lock error, got {other:?}"),
    }
    drop(first);
    EncryptedFile::open(&path, &key(6)).expect("open once the first is closed");
}

#[test]
fn a_plain_redb_file_is_named_as_not_encrypted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("plain.redb");
    drop(redb::Database::create(&path).expect("plain redb"));
    match EncryptedFile::open(&path, &key(8)) {
        Err(StoreError::NotEncrypted { .. }) => {}
        other => panic!("expected NotEncrypted, got {other:?}"),
    }
    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, b"hello, this is not a store").expect("write");
    assert!(matches!(
        EncryptedFile::open(&garbage, &key(8)),
        Err(StoreError::Open { .. })
    ));
}

fn author() -> ChangeAuthor {
    ChangeAuthor {
        device: "device-a".into(),
        user: Some("nurse".into()),
    }
}

fn patient(store: &Store, n: usize) -> crate::Result<DocId> {
    let fields = match json!({"given_name": "Ada", "surname": format!("Okonkwo-{n}")}) {
        serde_json::Value::Object(m) => m,
        _ => unreachable!(),
    };
    let op = WriteOp::new("patients", None, WriteKind::Create(fields), author());
    let mut out = store.write_blocking(WriteBatch::one(op))?;
    out.remove(0).map(|o| o.id)
}

/// Writes records one commit at a time until the power is cut at write `at`; returns
/// the records acknowledged.
fn run_until_crash(path: &Path, key: &DataKey, at: u64, tear: bool) -> (Vec<(usize, DocId)>, u64) {
    let mut file = EncryptedFile::open(path, key).expect("open");
    let crash = CrashPoint::new(at, tear);
    file.set_crash(crash.clone());
    let file = Arc::new(file);
    let backend = Shared(file, crash.clone());
    let backend = Arc::new(backend);
    let opened = Store::with_backend(
        move || Shared(backend.0.clone(), backend.1.clone()),
        Schema::hikma(),
        StoreOptions::default(),
    );
    let mut acked = Vec::new();
    if let Ok(store) = opened {
        for n in 0..25 {
            match patient(&store, n) {
                Ok(id) => acked.push((n, id)),
                Err(_) => break,
            }
        }
    }
    (acked, crash.writes())
}

#[test]
fn after_a_torn_or_lost_write_at_any_point_every_acknowledged_record_is_there() {
    crash_at_points(|total| {
        let mut points: Vec<(u64, bool)> = (0..24).map(|i| (i * total / 24, i % 2 == 0)).collect();
        points.extend([
            (1, true),
            (2, true),
            (3, false),
            (total.saturating_sub(1), true),
        ]);
        points
    });
}

/// Every write of the sequence torn, then every write lost (a few minutes).
#[test]
#[ignore = "slow: run with --ignored"]
fn crash_at_every_write() {
    crash_at_points(|total| {
        (0..total)
            .flat_map(|at| [(at, true), (at, false)])
            .collect()
    });
}

fn crash_at_points(points: impl FnOnce(u64) -> Vec<(u64, bool)>) {
    let key = key(9);
    // A dry run counts the writes the whole sequence makes.
    let dir = tempfile::tempdir().expect("tempdir");
    let (all, total) = run_until_crash(&dir.path().join("dry.redb"), &key, u64::MAX, false);
    assert_eq!(all.len(), 25);
    let points = points(total);
    println!(
        "{} crash points over the {total} block writes of 25 commits",
        points.len()
    );
    for (i, (at, tear)) in points.into_iter().enumerate() {
        let path = dir.path().join(format!("crash-{i}.redb"));
        let (acked, _) = run_until_crash(&path, &key, at, tear);
        let store = Store::open_encrypted(&path, &key, Schema::hikma(), StoreOptions::default())
            .unwrap_or_else(|e| panic!("reopen after a crash at write {at} (torn {tear}): {e}"));
        for (n, id) in &acked {
            let got = store
                .get("patients", id)
                .unwrap_or_else(|e| panic!("record {n} after a crash at write {at}: {e}"));
            assert_eq!(got.record["surname"], json!(format!("Okonkwo-{n}")));
        }
        let count = store.counts().expect("counts").get("patients").copied();
        let count = count.unwrap_or(0) as usize;
        assert!(
            count == acked.len() || count == acked.len() + 1,
            "crash at write {at}: {count} records, {} acknowledged",
            acked.len()
        );
        // The store goes on working.
        patient(&store, 100).expect("write after recovery");
    }
}
