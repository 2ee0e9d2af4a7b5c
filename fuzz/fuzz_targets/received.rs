//! Documents received from a member peer, merged by the real store (a fresh one in
//! memory for each input): any bytes, under any collection, tentative or not, on a
//! record that exists or not, several in a row. The store answers every one (stored or
//! held, never an error or a panic), and the record already there stays readable under
//! its own id. The store checks signatures as a node's does; each input part carries its
//! own signature bytes (after a 0xFE), or the vouches of the valid document's changes.

#![no_main]

use std::sync::{Arc, OnceLock};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT};
use libfuzzer_sys::fuzz_target;
use medmesh_protocol::{ChangeAuthor, DocId, Schema};
use medmesh_protocol::authorship::{self, Authority, SigningKey};
use medmesh_storage::{Received, Store, StoreOptions, WriteBatch, WriteKind, WriteOp};

struct Fixture {
    /// A record: its id, a saved copy, and one change on top of it.
    existing: DocId,
    saved: Vec<u8>,
    change: Vec<u8>,
    /// A member's vouches for both changes.
    sigs: Vec<u8>,
}

struct Members;

impl Authority for Members {
    fn check_signer(&self, _: &[u8; 32], _: i64) -> Result<(), String> {
        Ok(())
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let existing = DocId::from_bytes([9; 16]);
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "id", existing.to_string()).expect("put");
        doc.put(ROOT, "given_name", "Seed").expect("put");
        doc.put(ROOT, "updated_at", 1_700_000_000_000i64)
            .expect("put");
        doc.commit();
        let saved = doc.save();
        let before = doc.get_heads();
        doc.put(ROOT, "phone", "+234 800 000 0000").expect("put");
        doc.commit();
        let change = doc.save_after(&before);
        let key = SigningKey::from_bytes(&[5; 32]);
        let vouches: Vec<_> = authorship::facts_of_doc(doc.document(), &[])
            .iter()
            .map(|f| authorship::vouch(&key, f.hash))
            .collect();
        Fixture {
            existing,
            saved,
            change,
            sigs: authorship::encode(&vouches),
        }
    })
}

fn merge(
    store: &Store,
    collection: &str,
    id: DocId,
    bytes: Vec<u8>,
    sigs: Vec<u8>,
    tentative: bool,
) {
    let results = store
        .write_blocking(WriteBatch {
            ops: vec![WriteOp::new(
                collection,
                Some(id),
                WriteKind::Merge(Received {
                    bytes,
                    heads: Vec::new(),
                    from: Some("fuzz".into()),
                    tentative,
                    sigs,
                }),
                ChangeAuthor::default(),
            )],
            atomic: false,
        })
        .expect("the store answers");
    for result in results {
        result.expect("a received document is stored or held, never refused");
    }
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let options = StoreOptions {
        authority: Some(Arc::new(Members)),
        ..StoreOptions::default()
    };
    let store = Store::memory_with(Schema::hikma(), options).expect("a store in memory");
    merge(
        &store,
        "patients",
        fixture.existing,
        fixture.saved.clone(),
        fixture.sigs.clone(),
        false,
    );
    // Up to four documents, each from its own part of the input.
    for part in data.split(|b| *b == 0xFF).take(4) {
        let [how, which, flags, rest @ ..] = part else {
            continue;
        };
        let (rest, sigs) = match rest.iter().position(|b| *b == 0xFE) {
            Some(at) => (&rest[..at], rest[at + 1..].to_vec()),
            None => (rest, fixture.sigs.clone()),
        };
        // Bytes: as given, or a valid document or change with the input written over
        // part of it (damage a fuzzer would rarely find from nothing).
        let base = match how % 3 {
            0 => Vec::new(),
            1 => fixture.saved.clone(),
            _ => fixture.change.clone(),
        };
        let bytes = if base.is_empty() {
            rest.to_vec()
        } else {
            let mut bytes = base;
            let at = usize::from(*which) % bytes.len();
            for (i, b) in rest.iter().enumerate() {
                match bytes.get_mut(at + i) {
                    Some(slot) => *slot ^= b,
                    None => bytes.push(*b),
                }
            }
            bytes
        };
        let id = if which % 2 == 0 {
            fixture.existing
        } else {
            DocId::from_bytes([which / 2; 16])
        };
        let collection = match flags % 3 {
            0 => "patients",
            1 => "visits",
            _ => "lab_reports",
        };
        merge(&store, collection, id, bytes, sigs, flags & 0x80 != 0);
        let view = store
            .get("patients", &fixture.existing)
            .expect("the stored record stays readable");
        assert_eq!(
            view.record.get("id").and_then(|v| v.as_str()),
            Some(fixture.existing.to_string().as_str()),
            "a peer cannot change a record's id"
        );
    }
});
