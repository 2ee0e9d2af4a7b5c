//! The store's behaviour as the node relies on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::{ChangeAuthor, DocId, Schema};
use medmesh_storage::{
    Filter, Query, Store, StoreError, StoreOptions, WriteBatch, WriteKind, WriteOp,
};
use serde_json::{Value, json};

fn author() -> ChangeAuthor {
    ChangeAuthor {
        device: "device-a".into(),
        user: Some("nurse".into()),
    }
}

fn fields(v: Value) -> Fields {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

fn create(store: &Store, collection: &str, v: Value) -> Result<DocId, StoreError> {
    let op = WriteOp::new(collection, None, WriteKind::Create(fields(v)), author());
    let mut out = store.write_blocking(WriteBatch::one(op))?;
    out.remove(0).map(|o| o.id)
}

fn write(store: &Store, collection: &str, id: DocId, kind: WriteKind) -> Result<bool, StoreError> {
    let op = WriteOp::new(collection, Some(id), kind, author());
    let mut out = store.write_blocking(WriteBatch::one(op))?;
    out.remove(0).map(|o| o.changed)
}

fn open(path: &std::path::Path) -> Store {
    Store::open(path, Schema::hikma(), StoreOptions::default()).expect("open")
}

#[test]
fn create_patch_replace_delete_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let store = open(&path);
    let id = create(
        &store,
        "patients",
        json!({"given_name": "Amina", "surname": "Okafor", "metadata": {"a": 1}}),
    )
    .expect("create");
    let got = store.get("patients", &id).expect("get");
    assert_eq!(got.record["given_name"], json!("Amina"));
    assert!(got.record["created_at"].is_string());
    assert!(got.record["updated_at"].is_string());

    assert!(
        write(
            &store,
            "patients",
            id,
            WriteKind::Patch(fields(json!({"surname": "Okafor-Bello"})))
        )
        .expect("patch")
    );
    // A patch with the same value changes nothing.
    assert!(
        !write(
            &store,
            "patients",
            id,
            WriteKind::Patch(fields(json!({"surname": "Okafor-Bello"})))
        )
        .expect("patch")
    );
    let got = store.get("patients", &id).expect("get");
    assert_eq!(got.record["given_name"], json!("Amina"));
    assert_eq!(got.record["surname"], json!("Okafor-Bello"));

    write(
        &store,
        "patients",
        id,
        WriteKind::Replace(fields(json!({"given_name": "Amina", "sex": "female"}))),
    )
    .expect("put");
    let got = store.get("patients", &id).expect("get");
    assert!(
        !got.record.contains_key("surname"),
        "PUT removes fields not given"
    );
    assert!(
        got.record.contains_key("created_at"),
        "PUT keeps created_at"
    );
    assert_eq!(got.record["id"], json!(id.to_string()));

    write(&store, "patients", id, WriteKind::Delete).expect("delete");
    let got = store
        .get("patients", &id)
        .expect("tombstone still readable");
    assert!(got.deleted);
    assert!(got.record["deleted_at"].is_string());
    assert_eq!(store.counts().expect("counts").get("patients"), Some(&0));

    let history = record::history(&store.document("patients", &id).expect("doc"));
    assert_eq!(history.len(), 4, "create, patch, put, delete: {history:?}");
    assert_eq!(history[0].author, author());
    assert!(history[1].fields.contains(&"surname".to_owned()));

    drop(store);
    let store = open(&path);
    let got = store.get("patients", &id).expect("get after reopen");
    assert!(got.deleted);
    assert_eq!(got.record["sex"], json!("female"));
}

#[test]
fn refused_writes_change_nothing() {
    let store = Store::memory(Schema::hikma()).expect("store");
    let id = create(&store, "visits", json!({"patient_id": "p1"})).expect("create");
    let before = store.get("visits", &id).expect("get");
    let err = write(
        &store,
        "visits",
        id,
        WriteKind::Patch(fields(json!({"check_in_timestamp": "yesterday"}))),
    )
    .unwrap_err();
    assert!(err.to_string().contains("check_in_timestamp"), "{err}");
    let err = create(&store, "visits", json!({"clinic_id": "c"})).unwrap_err();
    assert!(err.to_string().contains("patient_id"), "{err}");
    let err = create(
        &store,
        "visits",
        json!({"id": id.to_string(), "patient_id": "p"}),
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    assert!(matches!(
        create(&store, "nope", json!({})),
        Err(StoreError::UnknownCollection(_))
    ));
    // An atomic batch with one bad write stores none of it.
    let good = WriteOp::new(
        "visits",
        Some(id),
        WriteKind::Patch(fields(json!({"clinic_id": "c9"}))),
        author(),
    );
    let bad = WriteOp::new(
        "visits",
        Some(id),
        WriteKind::Patch(fields(json!({"metadata": 1, "check_in_timestamp": false}))),
        author(),
    );
    let result = store.write_blocking(WriteBatch {
        ops: vec![good, bad],
        atomic: true,
    });
    assert!(result.is_err());
    assert_eq!(store.get("visits", &id).expect("get"), before);
    assert_eq!(store.last_seq().expect("seq"), before.seq);
}

#[test]
fn non_atomic_batches_keep_the_good_writes() {
    let store = Store::memory(Schema::hikma()).expect("store");
    let ops = vec![
        WriteOp::new(
            "patients",
            None,
            WriteKind::Create(fields(json!({"given_name": "A"}))),
            author(),
        ),
        WriteOp::new(
            "patients",
            None,
            WriteKind::Create(fields(json!({"date_of_birth": "31/12/1990"}))),
            author(),
        ),
        WriteOp::new(
            "patients",
            None,
            WriteKind::Create(fields(json!({"given_name": "C"}))),
            author(),
        ),
    ];
    let out = store
        .write_blocking(WriteBatch { ops, atomic: false })
        .expect("batch");
    assert!(out[0].is_ok() && out[1].is_err() && out[2].is_ok());
    assert_eq!(store.counts().expect("counts").get("patients"), Some(&2));
}

#[test]
fn feed_lists_each_changed_record_once_at_its_latest_change() {
    let store = Store::memory(Schema::hikma()).expect("store");
    let a = create(&store, "patients", json!({"given_name": "A"})).expect("a");
    let b = create(&store, "patients", json!({"given_name": "B"})).expect("b");
    let mark = store.last_seq().expect("seq");
    write(
        &store,
        "patients",
        a,
        WriteKind::Patch(fields(json!({"surname": "X"}))),
    )
    .expect("patch");
    let all = store.changes_since(0, 100).expect("feed");
    let ids: Vec<DocId> = all
        .iter()
        .map(|e| e.record.as_ref().expect("readable").id)
        .collect();
    assert_eq!(ids, vec![b, a]);
    let since = store.changes_since(mark, 100).expect("feed");
    assert_eq!(since.len(), 1);
    assert_eq!(
        since[0].record.as_ref().expect("readable").record["surname"],
        json!("X")
    );
}

#[test]
fn indexed_queries_with_prefix_equality_and_paging() {
    let store = Store::memory(Schema::hikma()).expect("store");
    for (given, surname, clinic) in [
        ("Amina", "Okafor", "c1"),
        ("Amir", "Haddad", "c1"),
        ("Bola", "Okafor", "c2"),
        ("amelia", "Smith", "c2"),
    ] {
        create(
            &store,
            "patients",
            json!({"given_name": given, "surname": surname, "primary_clinic_id": clinic}),
        )
        .expect("create");
    }
    let query = |filters: Vec<Filter>| Query {
        collection: "patients".into(),
        filters,
        include_deleted: false,
        limit: 50,
        cursor: None,
    };
    let names = |q: &Query| -> Vec<String> {
        let mut v: Vec<String> = store
            .list(q)
            .expect("list")
            .records
            .iter()
            .map(|r| r.record["given_name"].as_str().unwrap_or("").to_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(&query(vec![Filter::Prefix {
            field: "given_name".into(),
            prefix: "AM".into()
        }])),
        vec!["Amina", "Amir", "amelia"]
    );
    assert_eq!(
        names(&query(vec![Filter::Equals {
            field: "surname".into(),
            value: "okafor".into()
        }])),
        vec!["Amina", "Bola"]
    );
    assert_eq!(
        names(&query(vec![
            Filter::Prefix {
                field: "given_name".into(),
                prefix: "am".into()
            },
            Filter::Equals {
                field: "primary_clinic_id".into(),
                value: "c2".into()
            }
        ])),
        vec!["amelia"]
    );
    let err = store
        .list(&query(vec![Filter::Equals {
            field: "hometown".into(),
            value: "x".into(),
        }]))
        .unwrap_err();
    assert!(err.to_string().contains("hometown"), "{err}");

    // Paging through everything, two at a time, sees each record once.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(&Query {
                limit: 2,
                cursor: cursor.clone(),
                ..query(vec![])
            })
            .expect("page");
        seen.extend(page.records.iter().map(|r| r.id));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), 4);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4);
}

#[test]
fn compaction_keeps_documents_identical() {
    let store = Store::memory(Schema::hikma()).expect("store");
    let id = create(&store, "patients", json!({"given_name": "A"})).expect("create");
    for i in 0..20 {
        write(
            &store,
            "patients",
            id,
            WriteKind::Patch(fields(
                json!({"phone": format!("555-{i}"), "metadata": {"n": i}}),
            )),
        )
        .expect("patch");
    }
    let before = store.document("patients", &id).expect("doc");
    let record_before = store.get("patients", &id).expect("get");
    store.compact_all_blocking().expect("compact");
    assert_eq!(
        store.compact_all_blocking().expect("compact again"),
        0,
        "nothing left to compact"
    );
    let after = store.document("patients", &id).expect("doc");
    assert_eq!(before.get_heads(), after.get_heads());
    assert_eq!(before.save(), after.save());
    assert_eq!(store.get("patients", &id).expect("get"), record_before);
    assert_eq!(record::history(&after).len(), 21);
}

#[test]
fn a_damaged_document_is_named_and_the_rest_stays_readable() {
    let store = Store::memory(Schema::hikma()).expect("store");
    let good = create(&store, "patients", json!({"given_name": "Good"})).expect("good");
    let bad = create(&store, "patients", json!({"given_name": "Bad"})).expect("bad");
    store
        .debug_overwrite_document(&bad, b"\x85\x6f\x4a\x83garbage")
        .expect("corrupt");
    let err = store.get("patients", &bad).unwrap_err();
    assert!(
        matches!(err, StoreError::CorruptDocument { id, .. } if id == bad),
        "{err}"
    );
    assert!(err.to_string().contains(&bad.to_string()));
    assert_eq!(
        store.get("patients", &good).expect("good").record["given_name"],
        json!("Good")
    );
    let page = store
        .list(&Query {
            collection: "patients".into(),
            limit: 50,
            ..Query::default()
        })
        .expect("list");
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.unreadable.len(), 1);
    // Writing to it fails with the same clear error; other writes go on.
    let err = write(
        &store,
        "patients",
        bad,
        WriteKind::Patch(fields(json!({"surname": "x"}))),
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::CorruptDocument { .. }), "{err}");
    write(
        &store,
        "patients",
        good,
        WriteKind::Patch(fields(json!({"surname": "x"}))),
    )
    .expect("good write");
}

#[test]
fn a_truncated_database_file_is_reported_not_panicked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    {
        let store = open(&path);
        for i in 0..200 {
            create(&store, "patients", json!({"given_name": format!("P{i}")})).expect("create");
        }
    }
    let len = std::fs::metadata(&path).expect("meta").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("file");
    file.set_len(len / 3).expect("truncate");
    drop(file);
    match Store::open(&path, Schema::hikma(), StoreOptions::default()) {
        Ok(store) => {
            // redb may repair what it can; then reads must not panic either.
            let _ = store.list(&Query {
                collection: "patients".into(),
                limit: 1000,
                ..Query::default()
            });
        }
        Err(err) => {
            let text = err.to_string();
            assert!(
                text.contains("store.redb"),
                "the error names the file: {text}"
            );
        }
    }
}

/// A redb backend over memory that fails writes like a full disk while `full` is set.
#[derive(Debug)]
struct FillableDisk {
    inner: Arc<redb::backends::InMemoryBackend>,
    full: Arc<AtomicBool>,
}

impl redb::StorageBackend for FillableDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        if self.full.load(Ordering::SeqCst) && len > self.inner.len()? {
            return Err(std::io::Error::from_raw_os_error(28));
        }
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        if self.full.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(28));
        }
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        if self.full.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(28));
        }
        self.inner.write(offset, data)
    }
}

#[test]
fn a_full_disk_refuses_the_write_and_loses_nothing() {
    let full = Arc::new(AtomicBool::new(false));
    let memory = Arc::new(redb::backends::InMemoryBackend::new());
    let flag = full.clone();
    let disk = move || FillableDisk {
        inner: memory.clone(),
        full: flag.clone(),
    };
    let store = Store::with_backend(disk, Schema::hikma(), StoreOptions::default()).expect("store");
    let kept = create(&store, "patients", json!({"given_name": "Kept"})).expect("create");
    full.store(true, Ordering::SeqCst);
    let err = create(&store, "patients", json!({"given_name": "Lost"})).unwrap_err();
    assert!(matches!(err, StoreError::DiskFull), "{err}");
    assert!(err.to_string().contains("disk is full"));
    let err = write(
        &store,
        "patients",
        kept,
        WriteKind::Patch(fields(json!({"surname": "x"}))),
    )
    .unwrap_err();
    assert!(
        matches!(err, StoreError::DiskFull | StoreError::Storage(_)),
        "{err}"
    );
    // While the disk is full, reads either work or say clearly why not.
    if let Err(err) = store.get("patients", &kept) {
        assert!(err.to_string().contains("disk"), "{err}");
    }
    // Space is freed: the store reopens itself, the refused writes left no trace and
    // writing works again.
    full.store(false, Ordering::SeqCst);
    let mut recovered = false;
    for _ in 0..50 {
        if write(
            &store,
            "patients",
            kept,
            WriteKind::Patch(fields(json!({"surname": "y"}))),
        )
        .is_ok()
        {
            recovered = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(recovered, "writes work again once space is free");
    let got = store.get("patients", &kept).expect("get");
    assert_eq!(got.record["surname"], json!("y"));
    assert_eq!(store.counts().expect("counts").get("patients"), Some(&1));
}

#[test]
fn a_record_created_and_changed_in_one_batch_is_stored_whole() {
    let store = Store::memory(Schema::hikma()).expect("store");
    let id = DocId::new_v7();
    let mut ops = Vec::new();
    for i in 0..10 {
        ops.push(WriteOp::new(
            "patients",
            None,
            WriteKind::Create(fields(json!({"given_name": format!("P{i}")}))),
            author(),
        ));
    }
    ops.push(WriteOp::new(
        "patients",
        Some(id),
        WriteKind::Create(fields(json!({"given_name": "Ana"}))),
        author(),
    ));
    ops.push(WriteOp::new(
        "patients",
        Some(id),
        WriteKind::Patch(fields(json!({"surname": "Diaz"}))),
        author(),
    ));
    let out = store
        .write_blocking(WriteBatch { ops, atomic: true })
        .expect("batch");
    assert!(out.iter().all(Result::is_ok));
    let got = store.get("patients", &id).expect("get");
    assert_eq!(got.record["surname"], json!("Diaz"));
    assert_eq!(
        record::history(&store.document("patients", &id).expect("doc")).len(),
        2
    );
    // The same document received whole by another store, then changed there.
    let other = Store::memory(Schema::hikma()).expect("store");
    let bytes = store.document("patients", &id).expect("doc").save();
    let mut ops: Vec<WriteOp> = (0..9)
        .map(|_| {
            WriteOp::new(
                "patients",
                Some(DocId::new_v7()),
                WriteKind::Merge(bytes.clone().into()),
                author(),
            )
        })
        .collect();
    ops.push(WriteOp::new(
        "patients",
        Some(id),
        WriteKind::Merge(bytes.clone().into()),
        author(),
    ));
    ops.push(WriteOp::new(
        "patients",
        Some(id),
        WriteKind::Patch(fields(json!({"phone": "1"}))),
        author(),
    ));
    let out = other
        .write_blocking(WriteBatch { ops, atomic: false })
        .expect("merge");
    assert!(out.iter().all(Result::is_ok));
    let got = other.get("patients", &id).expect("get");
    assert_eq!(
        (got.record["surname"].clone(), got.record["phone"].clone()),
        (json!("Diaz"), json!("1"))
    );
}

#[test]
fn records_ensured_apart_merge_into_one_whose_counter_adds_up() {
    let id = DocId::new_v7();
    let identity = || fields(json!({"clinic_id": "c1", "drug_id": "d1", "batch_number": "B-7"}));
    let ensure = || {
        WriteOp::new(
            "clinic_inventory",
            Some(id),
            WriteKind::Ensure {
                fields: identity(),
                counters: vec![("quantity_available".into(), 0)],
            },
            author(),
        )
    };
    let inc = |by: i64| {
        WriteOp::new(
            "clinic_inventory",
            Some(id),
            WriteKind::Increment {
                counters: vec![("quantity_available".into(), by)],
            },
            author(),
        )
    };
    let a = Store::memory(Schema::hikma()).expect("a");
    let b = Store::memory(Schema::hikma()).expect("b");
    a.write_blocking(WriteBatch {
        ops: vec![ensure(), inc(100)],
        atomic: true,
    })
    .expect("a restocks");
    b.write_blocking(WriteBatch {
        ops: vec![ensure(), inc(-3)],
        atomic: true,
    })
    .expect("b dispenses");
    // Ensuring again changes nothing.
    let again = a.write_blocking(WriteBatch::one(ensure())).expect("again");
    assert!(!again[0].as_ref().expect("ok").changed);
    let from_a = a.document("clinic_inventory", &id).expect("doc").save();
    let from_b = b.document("clinic_inventory", &id).expect("doc").save();
    a.write_blocking(WriteBatch::one(WriteOp::new(
        "clinic_inventory",
        Some(id),
        WriteKind::Merge(from_b.into()),
        author(),
    )))
    .expect("merge");
    b.write_blocking(WriteBatch::one(WriteOp::new(
        "clinic_inventory",
        Some(id),
        WriteKind::Merge(from_a.into()),
        author(),
    )))
    .expect("merge");
    for store in [&a, &b] {
        let got = store.get("clinic_inventory", &id).expect("get");
        assert_eq!(
            got.record["quantity_available"],
            json!(97),
            "both sides' movements count"
        );
        let conflicts = record::conflicts(&store.document("clinic_inventory", &id).expect("doc"));
        assert!(
            conflicts.iter().all(|c| c.field == "updated_at"),
            "one counter and one set of identity fields, no conflict: {conflicts:?}"
        );
    }
    // A counter cannot be incremented where there is none: refused, nothing stored.
    let err = a
        .write_blocking(WriteBatch::one(WriteOp::new(
            "clinic_inventory",
            Some(id),
            WriteKind::Increment {
                counters: vec![("batch_number".into(), 1)],
            },
            author(),
        )))
        .expect_err("refused");
    assert!(matches!(err, StoreError::BadQuery(_)), "{err}");
}

#[test]
fn a_document_written_without_pause_is_compacted_inline_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let store = open(&path);
    let id = create(&store, "patients", json!({"given_name": "A"})).expect("create");
    for i in 0..70 {
        write(
            &store,
            "patients",
            id,
            WriteKind::Patch(fields(json!({"phone": format!("{i}")}))),
        )
        .expect("patch");
    }
    drop(store);
    let store = open(&path);
    let doc = store.document("patients", &id).expect("doc");
    assert_eq!(record::history(&doc).len(), 71);
    assert_eq!(
        store.get("patients", &id).expect("get").record["phone"],
        json!("69")
    );
}

/// A copy of the store file and its journal taken while the store is open is what a
/// crash (or a pulled plug) leaves: every write acknowledged before the copy is there
/// when it opens — records made, patched, deleted, counters incremented, indexes and
/// counts with them — and a journal cut in the middle of its last frame loses only that
/// frame's writes.
#[test]
fn every_acknowledged_write_survives_a_crash_through_the_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let journal = medmesh_storage::journal_path(&path);
    let store = open(&path);
    let mut ids = Vec::new();
    for n in 0..50 {
        let id = create(
            &store,
            "patients",
            json!({"given_name": format!("Bola{n}"), "surname": "Mensah"}),
        )
        .expect("create");
        ids.push(id);
    }
    for (n, id) in ids.iter().enumerate().take(20) {
        write(
            &store,
            "patients",
            *id,
            WriteKind::Patch(fields(json!({"surname": format!("Osei{n}")}))),
        )
        .expect("patch");
    }
    let before_delete = std::fs::read(&journal).expect("the journal holds the recent writes");
    write(&store, "patients", ids[49], WriteKind::Delete).expect("delete");
    // The feed as peers have read it: every document at its position.
    let feed = |store: &Store| -> Vec<(u64, String)> {
        store
            .changes_since(0, 10_000)
            .expect("feed")
            .into_iter()
            .map(|e| {
                (
                    e.seq,
                    e.record.map(|r| r.id.to_string()).unwrap_or_default(),
                )
            })
            .collect()
    };
    let feed_before = feed(&store);
    let copy = dir.path().join("crashed.redb");
    std::fs::copy(&path, &copy).expect("copy store");
    let journal_bytes = std::fs::read(&journal).expect("the journal holds the recent writes");
    std::fs::write(medmesh_storage::journal_path(&copy), &journal_bytes).expect("copy");
    // The same, with the last write (the delete) cut short: a byte in the middle of what
    // it added to the journal is not written.
    let changed: Vec<usize> = (0..journal_bytes.len())
        .filter(|&i| journal_bytes[i] != before_delete[i])
        .collect();
    assert!(!changed.is_empty(), "the delete was journaled");
    let mut cut = journal_bytes.clone();
    let middle = changed[changed.len() / 2];
    cut[middle] = before_delete[middle];
    let torn = dir.path().join("torn.redb");
    std::fs::copy(&path, &torn).expect("copy store");
    std::fs::write(medmesh_storage::journal_path(&torn), &cut).expect("copy");
    drop(store);

    for (file, deleted_kept) in [(&copy, true), (&torn, false)] {
        let store = open(file);
        if deleted_kept {
            assert_eq!(
                feed(&store),
                feed_before,
                "replayed writes keep their feed positions (peers' cursors still hold)"
            );
        }
        for (n, id) in ids.iter().enumerate() {
            let got = store.get("patients", id).expect("every record is back");
            assert_eq!(got.record["given_name"], json!(format!("Bola{n}")));
            let surname = if n < 20 {
                format!("Osei{n}")
            } else {
                "Mensah".to_owned()
            };
            assert_eq!(got.record["surname"], json!(surname));
        }
        let last = store.get("patients", &ids[49]).expect("get");
        assert_eq!(
            last.record.get("is_deleted") == Some(&json!(true)),
            deleted_kept
        );
        let found = store
            .list(&Query {
                collection: "patients".into(),
                filters: vec![Filter::Equals {
                    field: "surname".into(),
                    value: "Osei3".into(),
                }],
                limit: 10,
                ..Query::default()
            })
            .expect("query");
        assert_eq!(found.records.len(), 1, "indexes follow the replayed writes");
        let counts = store.counts().expect("counts");
        assert_eq!(counts["patients"], if deleted_kept { 49 } else { 50 });
        drop(store);
        // And it all stays after a clean close.
        let store = open(file);
        assert_eq!(
            store.counts().expect("counts")["patients"],
            counts["patients"]
        );
    }
}
