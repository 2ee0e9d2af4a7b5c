//! Documents from peers: stored whatever their collection, held (never lost) when they
//! cannot be merged, relayed as they arrived, retried; the schema as mesh state; per-peer
//! state updated field by field.

use automerge::Automerge;
use automerge::transaction::Transactable;
use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::schema::SCHEMA_COLLECTION;
use medmesh_protocol::wire::WantChanges;
use medmesh_protocol::{ChangeAuthor, DocId, Schema};
use medmesh_storage::{
    Filter, PeerUpdate, Query, Received, Store, StoreError, WriteBatch, WriteKind, WriteOp,
    WriteOutcome,
};
use serde_json::{Value, json};

const LAB: &str = r#"{"collections": [{"name": "lab_reports", "fields": [
    {"name": "patient_id", "type": "id", "required": true, "index": "exact"},
    {"name": "test_name", "type": "string", "index": "prefix"}]}]}"#;

fn fields(v: Value) -> Fields {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

fn doc_of(id: &DocId, v: Value) -> Automerge {
    let mut f = fields(v);
    f.insert("id".into(), Value::String(id.to_string()));
    let mut doc = Automerge::new();
    doc.transact::<_, _, medmesh_protocol::RecordError>(|tx| record::init_record(tx, &f))
        .expect("init");
    doc
}

fn heads(doc: &Automerge) -> Vec<[u8; 32]> {
    doc.get_heads().iter().map(|h| h.0).collect()
}

fn merge(store: &Store, collection: &str, id: DocId, received: Received) -> WriteOutcome {
    let op = WriteOp::new(
        collection,
        Some(id),
        WriteKind::Merge(received),
        ChangeAuthor::default(),
    );
    store
        .write_blocking(WriteBatch {
            ops: vec![op],
            atomic: false,
        })
        .expect("batch")
        .remove(0)
        .expect("merge")
}

fn received(bytes: Vec<u8>, heads: Vec<[u8; 32]>) -> Received {
    Received {
        bytes,
        heads,
        from: Some("peer-b".into()),
        tentative: false,
        sigs: Vec::new(),
    }
}

#[test]
fn a_document_of_an_unknown_collection_is_stored_and_indexed_once_the_mesh_declares_it() {
    let a = Store::memory(Schema::hikma()).expect("a");
    let b = Store::memory(Schema::hikma()).expect("b");
    let id = DocId::new_v7();
    let patient = DocId::new_v7();
    let doc = doc_of(
        &id,
        json!({"patient_id": patient.to_string(), "test_name": "Glucose"}),
    );
    let outcome = merge(&b, "lab_reports", id, received(doc.save(), heads(&doc)));
    assert_eq!(outcome.held, None, "stored, not held");
    assert!(matches!(
        b.get("lab_reports", &id),
        Err(StoreError::UnknownCollection(_))
    ));
    assert_eq!(b.counts().expect("counts").get("lab_reports"), Some(&1));
    // Relayed like any document.
    let (page, _) = b.feed_page(0, 10).expect("feed");
    assert!(
        page.iter()
            .any(|e| e.id == id && e.collection == "lab_reports")
    );
    let sent = b.load_for_peer(&[id], &[]).expect("load");
    assert_eq!(sent.len(), 1);

    // Another node declares the collection; its schema document reaches b.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let declarations = a
        .schema()
        .declarations_of_file(LAB, "lab.json")
        .expect("valid");
    let notes = rt
        .block_on(a.declare_schema(&declarations, ChangeAuthor::default()))
        .expect("declare");
    assert!(notes.is_empty(), "{notes:?}");
    assert!(a.schema().collection("lab_reports").is_some());
    let schema_id = a.schema_doc_id();
    let schema_doc = a.load_for_peer(&[schema_id], &[]).expect("load").remove(0);
    merge(
        &b,
        SCHEMA_COLLECTION,
        schema_id,
        received(schema_doc.bytes.into_vec(), Vec::new()),
    );
    assert!(b.schema().collection("lab_reports").is_some());
    let view = b.get("lab_reports", &id).expect("readable now");
    assert_eq!(view.record["test_name"], json!("Glucose"));
    let page = b
        .list(&Query {
            collection: "lab_reports".into(),
            filters: vec![Filter::Prefix {
                field: "test_name".into(),
                prefix: "glu".into(),
            }],
            limit: 10,
            ..Query::default()
        })
        .expect("indexed now");
    assert_eq!(page.records.len(), 1);
}

#[test]
fn damaged_bytes_are_held_relayed_as_they_came_and_merged_when_good_ones_arrive() {
    let store = Store::memory(Schema::hikma()).expect("store");
    let id = DocId::new_v7();
    let good = doc_of(&id, json!({"given_name": "Amina"}));
    let mut damaged = good.save();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x55;
    let outcome = merge(
        &store,
        "patients",
        id,
        received(damaged.clone(), heads(&good)),
    );
    let reason = outcome.held.expect("held");
    assert!(reason.contains("damaged"), "{reason}");
    let (held, total) = store.held(10).expect("held list");
    assert_eq!(total, 1);
    assert_eq!(held[0].id, id);
    assert_eq!(held[0].from.as_deref(), Some("peer-b"));
    // Not readable, but offered to other peers under the sender's heads, as it came.
    assert!(matches!(
        store.get("patients", &id),
        Err(StoreError::NotFound { .. })
    ));
    let (page, _) = store.feed_page(0, 10).expect("feed");
    let entry = page.iter().find(|e| e.id == id).expect("in the feed");
    assert_eq!(entry.heads.as_ref(), heads(&good).concat().as_slice());
    let sent = store.load_for_peer(&[id], &[]).expect("load").remove(0);
    assert_eq!(sent.bytes.as_ref(), damaged.as_slice());
    // A peer that announces it is asked for its copy, whole: it may be a good one.
    let (missing, behind) = store.check_docs(&page).expect("check");
    assert_eq!(missing, vec![id]);
    assert!(behind.is_empty());
    // The same bytes again are not kept twice.
    merge(
        &store,
        "patients",
        id,
        received(damaged.clone(), heads(&good)),
    );
    assert_eq!(
        store
            .held_doc(&id)
            .expect("held")
            .expect("kept")
            .payloads
            .len(),
        1
    );

    // The good document arrives: it is stored; the damaged copy stays held (it never
    // merges), named with its reason.
    let outcome = merge(&store, "patients", id, received(good.save(), heads(&good)));
    assert_eq!(outcome.held, None);
    assert_eq!(
        store.get("patients", &id).expect("stored").record["given_name"],
        json!("Amina")
    );
}

#[test]
fn changes_that_arrive_before_their_document_are_held_then_merged_on_retry() {
    let store = Store::memory(Schema::hikma()).expect("store");
    let id = DocId::new_v7();
    let base = doc_of(&id, json!({"given_name": "Amina"}));
    let mut later = base.fork();
    later
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(automerge::ROOT, "surname", "Okafor")?;
            Ok(())
        })
        .expect("edit");
    let changes = later.save_after(&base.get_heads());
    let outcome = merge(&store, "patients", id, received(changes, heads(&later)));
    assert!(outcome.held.is_some());
    merge(&store, "patients", id, received(base.save(), heads(&base)));
    let view = store.get("patients", &id).expect("stored");
    // Merged at once: the held changes went into the document that arrived.
    assert_eq!(view.record["surname"], json!("Okafor"));
    assert_eq!(store.held(10).expect("held").1, 0);
}

#[test]
fn a_change_of_a_records_id_or_collection_is_held_and_the_record_kept() {
    let store = Store::memory(Schema::hikma()).expect("store");
    let id = DocId::new_v7();
    let doc = doc_of(&id, json!({"given_name": "Amina"}));
    merge(&store, "patients", id, received(doc.save(), heads(&doc)));
    let mut forged = doc.fork();
    forged
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(automerge::ROOT, "id", DocId::new_v7().to_string())?;
            tx.put(automerge::ROOT, "given_name", "Mallory")?;
            Ok(())
        })
        .expect("edit");
    let outcome = merge(
        &store,
        "patients",
        id,
        received(forged.save_after(&doc.get_heads()), heads(&forged)),
    );
    assert!(outcome.held.expect("held").contains("`id`"));
    let view = store.get("patients", &id).expect("kept");
    assert_eq!(view.record["given_name"], json!("Amina"));
    assert_eq!(view.record["id"], json!(id.to_string()));

    let outcome = merge(&store, "visits", id, received(doc.save(), heads(&doc)));
    assert!(outcome.held.expect("held").contains("patients"));
    // A document that names another id than the one it is sent as is held too.
    let other = DocId::new_v7();
    let outcome = merge(&store, "patients", other, received(doc.save(), heads(&doc)));
    assert!(outcome.held.is_some());
    assert_eq!(store.held(10).expect("held").1, 2);
}

#[test]
fn a_record_nested_too_deep_is_held() {
    let store = Store::memory(Schema::hikma()).expect("store");
    let id = DocId::new_v7();
    let mut doc = doc_of(&id, json!({"given_name": "Amina"}));
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        let mut obj = automerge::ROOT;
        for _ in 0..1000 {
            obj = tx.put_object(&obj, "deeper", automerge::ObjType::Map)?;
        }
        Ok(())
    })
    .expect("deep");
    let outcome = merge(&store, "patients", id, received(doc.save(), heads(&doc)));
    assert!(outcome.held.expect("held").contains("deeper"));
}

#[test]
fn a_held_document_is_served_to_a_peer_that_asks_for_its_changes() {
    let store = Store::memory(Schema::hikma()).expect("store");
    let id = DocId::new_v7();
    let doc = doc_of(&id, json!({"given_name": "Amina"}));
    let bytes = vec![1, 2, 3, 4];
    merge(&store, "patients", id, received(bytes.clone(), heads(&doc)));
    let sent = store
        .load_for_peer(
            &[],
            &[WantChanges {
                id,
                heads: serde_bytes::ByteBuf::new(),
                have: None,
            }],
        )
        .expect("load");
    assert_eq!(sent[0].bytes.as_ref(), bytes.as_slice());
}

#[test]
fn a_sessions_cursor_and_the_networks_addresses_never_overwrite_each_other() {
    let store = Store::memory(Schema::hikma()).expect("store");
    store
        .update_peer_blocking(
            "peer-b",
            PeerUpdate::Cursor {
                epoch: "e1".into(),
                seq: 42,
                synced_ms: Some(7),
            },
        )
        .expect("cursor");
    store
        .update_peer_blocking(
            "peer-b",
            PeerUpdate::Seen {
                addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
                at_ms: 9,
            },
        )
        .expect("seen");
    let record = store.peer("peer-b").expect("read").expect("kept");
    assert_eq!(record.cursor_seq, 42);
    assert_eq!(record.cursor_epoch.as_deref(), Some("e1"));
    assert_eq!(record.addrs, vec!["/ip4/127.0.0.1/tcp/1".to_owned()]);
    assert_eq!(record.last_seen_ms, Some(9));
    for i in 0..20 {
        store
            .update_peer_blocking(
                "peer-b",
                PeerUpdate::Seen {
                    addrs: vec![format!("/ip4/127.0.0.1/tcp/{i}")],
                    at_ms: 10,
                },
            )
            .expect("seen");
    }
    let record = store.peer("peer-b").expect("read").expect("kept");
    assert_eq!(record.addrs.len(), medmesh_storage::MAX_PEER_ADDRS);
    assert_eq!(record.cursor_seq, 42);
    store
        .update_peer_blocking("peer-b", PeerUpdate::Forget)
        .expect("forget");
    assert!(store.peer("peer-b").expect("read").is_none());
}
