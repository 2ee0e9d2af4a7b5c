//! Replication by clinic in the store: what a scope covers (feed, documents sent,
//! summaries), a patient who comes into a clinic's scope with its whole history, a
//! narrow store refusing what is not its clinics', and purging what left its scope only
//! once a device that serves it holds it.

use std::collections::BTreeSet;

use medmesh_protocol::record::Fields;
use medmesh_protocol::scope::Scope;
use medmesh_protocol::wire::Summary;
use medmesh_protocol::{ChangeAuthor, DocId, Schema};
use medmesh_storage::{
    PeerUpdate, Received, Store, StoreError, StoreOptions, WriteBatch, WriteKind, WriteOp,
};
use serde_json::{Value, json};

fn fields(v: Value) -> Fields {
    v.as_object().cloned().expect("an object")
}

fn create(store: &Store, collection: &str, v: Value) -> DocId {
    let op = WriteOp::new(
        collection,
        None,
        WriteKind::Create(fields(v)),
        ChangeAuthor::default(),
    );
    store
        .write_blocking(WriteBatch::one(op))
        .expect("write")
        .remove(0)
        .expect("created")
        .id
}

fn patch(store: &Store, collection: &str, id: DocId, v: Value) {
    let op = WriteOp::new(
        collection,
        Some(id),
        WriteKind::Patch(fields(v)),
        ChangeAuthor::default(),
    );
    store
        .write_blocking(WriteBatch::one(op))
        .expect("write")
        .remove(0)
        .expect("patched");
}

/// What `from` announces to a device of `scope` after `after`: ids in feed order.
fn announced(from: &Store, after: u64, scope: &Scope) -> Vec<DocId> {
    let (entries, _) = from
        .local_feed_page(after, 100_000, scope)
        .expect("feed page");
    entries.iter().map(|e| e.item.id).collect()
}

/// Sends `to` what `from` announces to `scope` after `after`, as a session does (whole
/// documents, merged in feed order). Answers how many `to` kept.
fn send(from: &Store, to: &Store, after: u64, scope: &Scope) -> usize {
    let ids = announced(from, after, scope);
    let (docs, _) = from.load_for_peer_diverged(&ids, &[], scope).expect("load");
    let mut kept = 0;
    for doc in docs {
        let op = WriteOp::new(
            &doc.collection,
            Some(doc.id),
            WriteKind::Merge(Received {
                bytes: doc.bytes.to_vec(),
                heads: medmesh_protocol::wire::split_heads(&doc.heads).unwrap_or_default(),
                from: Some("wide".into()),
                tentative: false,
                sigs: doc.sigs.to_vec(),
            }),
            ChangeAuthor::default(),
        );
        let outcome = to
            .write_blocking(WriteBatch::one(op))
            .expect("batch")
            .remove(0)
            .expect("merge");
        if outcome.changed {
            kept += 1;
        }
    }
    kept
}

/// An in-memory store of a device that serves `scope`.
fn narrow_store(scope: &Scope) -> Store {
    Store::memory_with(
        Schema::hikma(),
        StoreOptions {
            scope: scope.clone(),
            ..StoreOptions::default()
        },
    )
    .expect("narrow")
}

fn ids_in(store: &Store) -> BTreeSet<DocId> {
    announced(store, 0, &Scope::all()).into_iter().collect()
}

fn summary_ids(store: &Store, scope: &Scope) -> Summary {
    store.summary_for(scope).expect("summary")
}

struct Mesh {
    c1: String,
    c2: String,
    clinic: DocId,
    p1: DocId,
    e1: DocId,
    p2: DocId,
    v2: DocId,
    e2: DocId,
    stock1: DocId,
    stock2: DocId,
}

fn district(store: &Store) -> Mesh {
    let c1 = DocId::new_v7().to_string();
    let c2 = DocId::new_v7().to_string();
    let clinic = create(store, "clinics", json!({"name": "Clinic one"}));
    let p1 = create(
        store,
        "patients",
        json!({"given_name": "Amina", "primary_clinic_id": c1}),
    );
    let e1 = create(
        store,
        "events",
        json!({"patient_id": p1.to_string(), "form_id": DocId::new_v7().to_string()}),
    );
    let p2 = create(
        store,
        "patients",
        json!({"given_name": "Bilal", "primary_clinic_id": c2}),
    );
    let v2 = create(
        store,
        "visits",
        json!({"patient_id": p2.to_string(), "clinic_id": c2}),
    );
    let e2 = create(
        store,
        "events",
        json!({"patient_id": p2.to_string(), "visit_id": v2.to_string()}),
    );
    let stock = |clinic: &str| {
        create(
            store,
            "inventory_transactions",
            json!({"clinic_id": clinic, "stock_item_id": DocId::new_v7().to_string(),
                   "transaction_type": "restock", "quantity_change": 10}),
        )
    };
    let stock1 = stock(&c1);
    let stock2 = stock(&c2);
    Mesh {
        c1,
        c2,
        clinic,
        p1,
        e1,
        p2,
        v2,
        e2,
        stock1,
        stock2,
    }
}

#[test]
fn a_clinic_s_scope_covers_its_patients_stock_and_the_reference_data() {
    let wide = Store::memory(Schema::hikma()).expect("store");
    let m = district(&wide);
    let c1 = Scope::of_clinics(&[&m.c1]);
    let expected: BTreeSet<DocId> = [m.clinic, m.p1, m.e1, m.stock1].into();
    assert_eq!(
        announced(&wide, 0, &c1)
            .into_iter()
            .collect::<BTreeSet<_>>(),
        expected
    );
    // Asking for other clinics' records by id gets nothing.
    let (docs, _) = wide
        .load_for_peer_diverged(&[m.p2, m.e2, m.stock2, m.p1], &[], &c1)
        .expect("load");
    assert_eq!(docs.iter().map(|d| d.id).collect::<Vec<_>>(), vec![m.p1]);
    assert_eq!(summary_ids(&wide, &c1).count, 4);
    assert_eq!(summary_ids(&wide, &Scope::all()).count, 8);
    let mut listed = BTreeSet::new();
    for bucket in 0..=255u8 {
        let (entries, more) = wide.read_range(bucket, None, 1000, &c1).expect("range");
        assert!(!more);
        listed.extend(entries.iter().map(|e| e.id));
    }
    assert_eq!(listed, expected);
    assert_eq!(
        wide.clinics_of_patient(&m.p2).expect("clinics"),
        [m.c2.clone()].into()
    );
}

#[test]
fn a_patient_seen_at_another_clinic_arrives_there_with_its_whole_history() {
    let wide = Store::memory(Schema::hikma()).expect("store");
    let m = district(&wide);
    let c1 = Scope::of_clinics(&[&m.c1]);
    let mark = wide.last_seq().expect("seq");
    let v3 = create(
        &wide,
        "visits",
        json!({"patient_id": m.p2.to_string(), "clinic_id": m.c1}),
    );
    let after = announced(&wide, mark, &c1);
    assert_eq!(
        after.first(),
        Some(&v3),
        "the visit, then the patient's history"
    );
    assert_eq!(
        after.get(1),
        Some(&m.p2),
        "the patient first of its history"
    );
    assert_eq!(
        after.iter().collect::<BTreeSet<_>>(),
        [&v3, &m.p2, &m.v2, &m.e2].into()
    );
    assert_eq!(
        wide.clinics_of_patient(&m.p2).expect("clinics"),
        [m.c1.clone(), m.c2.clone()].into()
    );
    // Nothing else moved, and the other clinic's devices are told only of the visit.
    let c2 = Scope::of_clinics(&[&m.c2]);
    assert_eq!(
        announced(&wide, mark, &c2)
            .into_iter()
            .collect::<BTreeSet<_>>(),
        [v3, m.p2, m.v2, m.e2].into()
    );
}

#[test]
fn a_narrow_store_refuses_other_clinics_records_and_purges_what_leaves_its_scope() {
    let wide = Store::memory(Schema::hikma()).expect("wide");
    let m = district(&wide);
    let c1 = Scope::of_clinics(&[&m.c1]);
    let narrow = narrow_store(&c1);
    assert_eq!(send(&wide, &narrow, 0, &c1), 4);
    assert_eq!(
        ids_in(&narrow),
        [m.clinic, m.p1, m.e1, m.stock1].into(),
        "exactly clinic one's records"
    );
    // What a careless peer sends of other clinics is refused.
    assert_eq!(send(&wide, &narrow, 0, &Scope::all()), 0);
    assert_eq!(ids_in(&narrow), [m.clinic, m.p1, m.e1, m.stock1].into());
    assert_eq!(
        summary_ids(&narrow, &c1).root,
        summary_ids(&wide, &c1).root,
        "the two compare equal over clinic one"
    );

    // The patient moves to clinic two: the change still reaches clinic one's device.
    let mark = wide.last_seq().expect("seq");
    patch(&wide, "patients", m.p1, json!({"primary_clinic_id": m.c2}));
    assert_eq!(announced(&wide, mark, &c1), vec![m.p1]);
    assert_eq!(send(&wide, &narrow, mark, &c1), 1);
    assert!(!narrow.in_scope(&m.p1, &c1).expect("scope"));
    // No device that serves clinic two has confirmed it holds them: kept.
    let report = narrow.purge_blocking().expect("purge");
    assert_eq!((report.purged, report.kept), (0, 2));
    assert!(narrow.get("patients", &m.p1).is_ok());
    // The wide device (all clinics) confirms this store's feed: purged.
    narrow
        .update_peer_blocking("wide", PeerUpdate::Clinics { clinics: vec![] })
        .expect("peer");
    narrow
        .update_peer_blocking(
            "wide",
            PeerUpdate::Acked {
                epoch: narrow.info().feed_epoch.clone(),
                seq: narrow.last_seq().expect("seq"),
            },
        )
        .expect("peer");
    let report = narrow.purge_blocking().expect("purge");
    assert_eq!((report.purged, report.kept), (2, 0));
    assert_eq!(report.by_collection.get("patients"), Some(&1));
    assert!(matches!(
        narrow.get("patients", &m.p1),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(ids_in(&narrow), [m.clinic, m.stock1].into());
    assert_eq!(
        narrow.counts().expect("counts").get("patients").copied(),
        Some(0)
    );
    assert_eq!(
        summary_ids(&narrow, &c1).root,
        summary_ids(&wide, &c1).root,
        "still equal: the wide device no longer counts the patient for clinic one"
    );
    // Later records of the purged patient are refused...
    let mark = wide.last_seq().expect("seq");
    let e3 = create(&wide, "events", json!({"patient_id": m.p1.to_string()}));
    assert_eq!(send(&wide, &narrow, mark, &Scope::all()), 0);
    assert!(narrow.get("events", &e3).is_err());
    // ...until a visit at clinic one brings the patient back with its history.
    let mark = wide.last_seq().expect("seq");
    create(
        &wide,
        "visits",
        json!({"patient_id": m.p1.to_string(), "clinic_id": m.c1}),
    );
    assert_eq!(send(&wide, &narrow, mark, &c1), 4, "visit, patient, e1, e3");
    assert!(narrow.get("events", &e3).is_ok());
    assert!(narrow.get("patients", &m.p1).is_ok());
}

#[test]
fn widening_a_store_s_scope_takes_what_it_refused_before() {
    let wide = Store::memory(Schema::hikma()).expect("wide");
    let m = district(&wide);
    let c1 = Scope::of_clinics(&[&m.c1]);
    let narrow = narrow_store(&c1);
    send(&wide, &narrow, 0, &Scope::all());
    assert!(narrow.get("patients", &m.p2).is_err());
    let both = Scope::of_clinics(&[&m.c1, &m.c2]);
    narrow.set_scope_blocking(both.clone()).expect("scope");
    assert_eq!(narrow.scope(), both);
    assert_eq!(send(&wide, &narrow, 0, &both), 4);
    assert_eq!(ids_in(&narrow), ids_in(&wide));
    assert!(narrow.get("visits", &m.v2).is_ok());
}

#[test]
fn a_store_made_before_scopes_learns_where_its_records_belong_at_open() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("medmesh.redb");
    let m = {
        let store = Store::open(&path, Schema::hikma(), StoreOptions::default()).expect("open");
        district(&store)
    };
    // Forget what was kept beside the documents, as a store of an older medmesh lacks it.
    {
        let db = redb::Database::open(&path).expect("db");
        let txn = db.begin_write().expect("txn");
        txn.delete_table(medmesh_storage::tables::PLACES)
            .expect("drop");
        txn.delete_table(medmesh_storage::tables::PATIENT_DOCS)
            .expect("drop");
        txn.open_table(medmesh_storage::tables::INFO)
            .expect("info")
            .remove("places")
            .expect("remove");
        txn.commit().expect("commit");
    }
    let store = Store::open(&path, Schema::hikma(), StoreOptions::default()).expect("reopen");
    let c2 = Scope::of_clinics(&[&m.c2]);
    assert_eq!(
        announced(&store, 0, &c2)
            .into_iter()
            .collect::<BTreeSet<_>>(),
        [m.clinic, m.p2, m.v2, m.e2, m.stock2].into()
    );
}

#[test]
fn pages_for_a_device_of_one_clinic_are_full_and_leave_out_none_of_its_records() {
    let store = Store::memory(Schema::hikma()).expect("store");
    let clinics: Vec<String> = (0..10).map(|_| DocId::new_v7().to_string()).collect();
    let ops = (0..3000)
        .map(|i| {
            WriteOp::new(
                "patients",
                None,
                WriteKind::Create(fields(
                    json!({"given_name": format!("P{i}"), "primary_clinic_id": clinics[i % 10]}),
                )),
                ChangeAuthor::default(),
            )
        })
        .collect();
    store
        .write_blocking(WriteBatch { ops, atomic: false })
        .expect("write");
    let scope = Scope::of_clinics(&clinics[..1]);
    let everything: Vec<DocId> = announced(&store, 0, &scope);
    assert_eq!(everything.len(), 300);
    // Pages of 50: each full (it reads on past other clinics' records), the position
    // moving on, and together exactly the clinic's records in feed order.
    let (mut paged, mut after, mut pages) = (Vec::new(), 0, 0);
    loop {
        let (entries, last) = store.local_feed_page(after, 50, &scope).expect("page");
        if last == after {
            break;
        }
        assert!(entries.len() == 50 || paged.len() + entries.len() == 300);
        paged.extend(entries.iter().map(|e| e.item.id));
        after = last;
        pages += usize::from(!entries.is_empty());
    }
    assert_eq!(paged, everything);
    assert_eq!(pages, 6, "pages with records");
}

#[test]
fn a_device_left_with_an_old_version_of_a_patient_that_moved_away_is_sent_the_move() {
    let origin = Store::memory(Schema::hikma()).expect("origin");
    let m = district(&origin);
    let c1 = Scope::of_clinics(&[&m.c1]);
    let narrow = narrow_store(&c1);
    send(&origin, &narrow, 0, &c1);
    // The patient moves to clinic two; the narrow device misses it. A wide device that
    // met the patient only after the move cannot tell it was ever clinic one's.
    patch(
        &origin,
        "patients",
        m.p1,
        json!({"primary_clinic_id": m.c2}),
    );
    let late = Store::memory(Schema::hikma()).expect("late");
    send(&origin, &late, 0, &Scope::all());
    let mark = late.last_seq().expect("seq");
    assert!(announced(&late, 0, &c1).iter().all(|id| *id != m.p1));
    // The narrow device lists its old version (its feed, or a range in anti-entropy):
    // the wide one announces the move to it.
    let (listed, _) = narrow.feed_page(0, 1000).expect("feed");
    late.check_docs_from("narrow", &listed, &c1).expect("check");
    assert_eq!(announced(&late, mark, &c1), vec![m.p1]);
    assert_eq!(send(&late, &narrow, mark, &c1), 1);
    let moved = narrow.get("patients", &m.p1).expect("patient");
    assert_eq!(moved.record["primary_clinic_id"], json!(m.c2));
    // Listed again at the same version, nothing more is announced.
    let mark = late.last_seq().expect("seq");
    let (listed, _) = narrow.feed_page(0, 1000).expect("feed");
    late.check_docs_from("narrow", &listed, &c1).expect("check");
    assert_eq!(late.last_seq().expect("seq"), mark);
}
