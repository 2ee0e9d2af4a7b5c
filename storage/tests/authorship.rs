//! Signed authorship in the store: a node signs its own changes, a receiver with an
//! authority checks every change it is sent, signatures travel through relays, and a
//! change whose signature is missing, forged or by a refused device is held, never merged.

use std::sync::Arc;

use automerge::transaction::CommitOptions;
use automerge::{ActorId, Automerge};
use medmesh_protocol::authorship::{self, Authority, SigningKey};
use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::wire::{DocPayload, Message, WantChanges};
use medmesh_protocol::{ChangeAuthor, DocId, Schema};
use medmesh_storage::{Store, StoreError, StoreOptions, WriteBatch, WriteKind, WriteOp};
use serde_bytes::ByteBuf;
use serde_json::{Value, json};

/// Accepts every device except one, for changes dated from a time on.
struct Mesh {
    revoked: Option<([u8; 32], i64)>,
}

impl Authority for Mesh {
    fn check_signer(&self, signer: &[u8; 32], time_ms: i64) -> Result<(), String> {
        match self.revoked {
            Some((key, from)) if key == *signer && time_ms >= from => {
                Err("it was made by a device revoked before then".into())
            }
            _ => Ok(()),
        }
    }
}

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn public(n: u8) -> [u8; 32] {
    key(n).verifying_key().to_bytes()
}

fn checking(revoked: Option<([u8; 32], i64)>) -> Store {
    Store::memory_with(
        Schema::hikma(),
        StoreOptions {
            authority: Some(Arc::new(Mesh { revoked })),
            ..StoreOptions::default()
        },
    )
    .expect("store")
}

/// A node's store: checks what it receives and signs with device key `n`.
fn node(n: u8) -> Store {
    let store = checking(None);
    store.sign_as_blocking(&[n; 32]).expect("sign as");
    store
}

fn fields(v: Value) -> Fields {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

fn create(store: &Store, v: Value) -> DocId {
    let op = WriteOp::new(
        "patients",
        None,
        WriteKind::Create(fields(v)),
        ChangeAuthor::default(),
    );
    store.write_blocking(WriteBatch::one(op)).expect("write")[0]
        .as_ref()
        .expect("created")
        .id
}

fn patch(store: &Store, id: DocId, v: Value) {
    let op = WriteOp::new(
        "patients",
        Some(id),
        WriteKind::Patch(fields(v)),
        ChangeAuthor::default(),
    );
    store.write_blocking(WriteBatch::one(op)).expect("write")[0]
        .as_ref()
        .expect("patched");
}

/// Stores what a peer sent; answers the outcome's hold reason, if held.
fn receive(store: &Store, payloads: Vec<DocPayload>) -> Vec<Option<String>> {
    let ops = payloads
        .into_iter()
        .map(|p| WriteOp::received(p, Some("peer".into()), false))
        .collect();
    store
        .write_blocking(WriteBatch { ops, atomic: false })
        .expect("batch")
        .into_iter()
        .map(|o| o.expect("merge").held)
        .collect()
}

fn whole(from: &Store, id: DocId) -> Vec<DocPayload> {
    from.load_for_peer(&[id], &[]).expect("load")
}

fn changes_since(from: &Store, to: &Store, id: DocId) -> Vec<DocPayload> {
    let heads = to.document("patients", &id).expect("doc").get_heads();
    let want = WantChanges {
        id,
        heads: ByteBuf::from(heads.iter().flat_map(|h| h.0).collect::<Vec<u8>>()),
        have: None,
    };
    from.load_for_peer(&[], &[want]).expect("load")
}

fn name(store: &Store, id: DocId) -> Option<Value> {
    store
        .get("patients", &id)
        .ok()
        .and_then(|r| r.record.get("given_name").cloned())
}

#[test]
fn changes_cross_two_hops_and_each_names_the_device_that_made_it() {
    let (a, b, c) = (node(1), node(2), node(3));
    let id = create(&a, json!({"given_name": "Amina", "surname": "Diallo"}));
    assert_eq!(receive(&b, whole(&a, id)), vec![None]);
    // A's next change reaches B as a change; B's own edit follows; C has it all from B.
    patch(&a, id, json!({"given_name": "Aminata"}));
    assert_eq!(receive(&b, changes_since(&a, &b, id)), vec![None]);
    patch(&b, id, json!({"surname": "Diallo-Ba"}));
    assert_eq!(receive(&c, whole(&b, id)), vec![None]);
    assert_eq!(name(&c, id), Some(json!("Aminata")));

    let signers = c.signers(&id).expect("signers");
    let doc = c.document("patients", &id).expect("doc");
    let mut by_device = std::collections::BTreeMap::new();
    for change in doc.get_changes_meta(&[]) {
        let (signer, vouched) = signers
            .get(&change.hash.0)
            .copied()
            .expect("every change signed");
        assert!(!vouched);
        assert_eq!(
            authorship::actor_key(change.actor.to_bytes()),
            Some(signer),
            "the signer is the device the change names"
        );
        *by_device.entry(signer).or_insert(0) += 1;
    }
    assert_eq!(by_device.get(&public(1)), Some(&2), "A made two changes");
    assert_eq!(by_device.get(&public(2)), Some(&1), "B made one");
}

/// A member that writes as another device: its document names the victim's actor and
/// is signed with the forger's own key (or vouched for by it, or not signed at all).
fn forged(id: DocId, signing: Option<(u8, bool)>) -> DocPayload {
    let victim = key(1);
    let mut doc =
        Automerge::new().with_actor(ActorId::from(authorship::author_actor(&victim, [5; 8])));
    let mut record = fields(json!({"given_name": "Forged", "surname": "Entry"}));
    record.insert("id".into(), Value::String(id.to_string()));
    doc.transact_with::<_, _, medmesh_protocol::RecordError, _>(
        |_| CommitOptions::default().with_time(1_000),
        |tx| record::init_record(tx, &record),
    )
    .expect("forged doc");
    let hashes: Vec<[u8; 32]> = doc.get_heads().iter().map(|h| h.0).collect();
    let entries: Vec<_> = match signing {
        None => Vec::new(),
        Some((forger, false)) => hashes
            .iter()
            .map(|h| authorship::sign(&key(forger), *h))
            .collect(),
        Some((forger, true)) => hashes
            .iter()
            .map(|h| authorship::vouch(&key(forger), *h))
            .collect(),
    };
    DocPayload {
        id,
        collection: "patients".into(),
        bytes: ByteBuf::from(doc.save()),
        heads: ByteBuf::from(hashes.concat()),
        sigs: ByteBuf::from(authorship::encode(&entries)),
    }
}

#[test]
fn a_member_that_writes_as_another_device_is_held_and_never_read() {
    let b = node(2);
    let cases = [
        (Some((9, false)), "not signed by the device it names"),
        (Some((9, true)), "signed by another device"),
        (None, "carries no signature"),
    ];
    for (signing, why) in cases {
        let id = DocId::new_v7();
        let held = receive(&b, vec![forged(id, signing)]);
        let reason = held[0].clone().expect("held");
        assert!(reason.contains(why), "{reason}");
        assert!(
            matches!(b.get("patients", &id), Err(StoreError::NotFound { .. })),
            "a forged record is not readable"
        );
        assert!(b.held_doc(&id).expect("held table").is_some());
        // Retrying does not let it in.
        b.retry_held_blocking().expect("retry");
        assert!(b.get("patients", &id).is_err());
    }
    // A forged change in a batch of good ones is found and only it is held.
    let a = node(1);
    let good = create(&a, json!({"given_name": "Kofi", "surname": "Mensah"}));
    let bad = DocId::new_v7();
    let mut payloads: Vec<DocPayload> = (0..40)
        .map(|n| create(&a, json!({"given_name": format!("P{n}"), "surname": "X"})))
        .flat_map(|id| whole(&a, id))
        .collect();
    payloads.insert(17, forged(bad, Some((9, false))));
    payloads.extend(whole(&a, good));
    let outcomes = receive(&b, payloads);
    assert_eq!(outcomes.iter().filter(|o| o.is_some()).count(), 1);
    assert!(outcomes[17].is_some());
    assert_eq!(name(&b, good), Some(json!("Kofi")));
}

#[test]
fn changes_of_a_revoked_device_dated_after_the_revocation_are_held() {
    let a = node(1);
    let early = create(&a, json!({"given_name": "Before", "surname": "Revocation"}));
    let revoked_at = chrono::Utc::now().timestamp_millis() + 1;
    std::thread::sleep(std::time::Duration::from_millis(5));
    let late = create(&a, json!({"given_name": "After", "surname": "Revocation"}));
    let b = checking(Some((public(1), revoked_at)));
    assert_eq!(receive(&b, whole(&a, early)), vec![None]);
    let held = receive(&b, whole(&a, late));
    assert!(
        held[0].as_deref().is_some_and(|r| r.contains("revoked")),
        "{held:?}"
    );
    assert!(b.get("patients", &late).is_err());
}

#[test]
fn records_from_before_signatures_are_vouched_for_by_the_node_that_sends_them() {
    let a = checking(None);
    let id = create(&a, json!({"given_name": "Old", "surname": "Record"}));
    // The node learns its key (an upgrade): its earlier record is vouched for.
    a.sign_as_blocking(&[1; 32]).expect("sign as");
    let b = node(2);
    assert_eq!(receive(&b, whole(&a, id)), vec![None]);
    let signers = b.signers(&id).expect("signers");
    assert_eq!(
        signers.values().copied().collect::<Vec<_>>(),
        vec![(public(1), true)]
    );
    // Written again after the upgrade, the old change is vouched for and the new signed.
    patch(&a, id, json!({"given_name": "Older"}));
    assert_eq!(receive(&b, changes_since(&a, &b, id)), vec![None]);
    let c = node(3);
    assert_eq!(receive(&c, whole(&a, id)), vec![None]);
    assert_eq!(name(&c, id), Some(json!("Older")));
    let mut signers: Vec<_> = c.signers(&id).expect("signers").into_values().collect();
    signers.sort();
    assert_eq!(signers, vec![(public(1), false), (public(1), true)]);
}

#[test]
fn own_signatures_not_yet_saved_when_the_node_stops_are_made_again_at_the_next_start() {
    let disk = medmesh_storage::MemoryDisk::new();
    let open = || {
        let disk = disk.clone();
        let store = Store::with_backend(
            move || disk.clone(),
            Schema::hikma(),
            StoreOptions {
                authority: Some(Arc::new(Mesh { revoked: None })),
                ..StoreOptions::default()
            },
        )
        .expect("store");
        store.sign_as_blocking(&[1; 32]).expect("sign as");
        store
    };
    let a = open();
    let ids: Vec<DocId> = (0..5)
        .map(|n| {
            create(
                &a,
                json!({"given_name": format!("P{n}"), "surname": "Stop"}),
            )
        })
        .collect();
    patch(&a, ids[0], json!({"surname": "Stopped"}));
    // Stopped at once: the signatures were still waiting in memory.
    drop(a);
    let a = open();
    let b = node(2);
    let payloads: Vec<DocPayload> = ids.iter().flat_map(|id| whole(&a, *id)).collect();
    assert_eq!(receive(&b, payloads), vec![None; 5]);
    let signers = b.signers(&ids[0]).expect("signers");
    assert_eq!(signers.len(), 2);
    assert!(
        signers
            .values()
            .all(|(key, vouched)| *key == public(1) && !vouched)
    );
}

/// Creates `n` patients in one batch (as an import does).
fn create_batch(store: &Store, n: usize) -> Vec<DocId> {
    let ops = (0..n)
        .map(|i| {
            WriteOp::new(
                "patients",
                None,
                WriteKind::Create(fields(
                    json!({"given_name": format!("B{i}"), "surname": "Batch"}),
                )),
                ChangeAuthor::default(),
            )
        })
        .collect();
    store
        .write_blocking(WriteBatch { ops, atomic: false })
        .expect("batch")
        .into_iter()
        .map(|o| o.expect("created").id)
        .collect()
}

/// Whether signatures as sent carry a seal (a list of change hashes: 32 bytes each).
fn carries_seal(payload: &DocPayload) -> bool {
    authorship::decode(&payload.sigs)
        .map(|d| !d.seals.is_empty())
        .unwrap_or(false)
}

/// What goes on one connection (whose seals sent so far are `sent`) when `from` sends
/// the documents `ids` in one message.
fn send(from: &Store, ids: &[DocId], sent: &mut medmesh_storage::SealsSent) -> Vec<DocPayload> {
    let docs = from.load_for_peer(ids, &[]).expect("load");
    let mut message = Message::Docs {
        req: 1,
        docs,
        done: true,
        diverged: Vec::new(),
    };
    from.seals_for_send(&mut message, sent);
    match message {
        Message::Docs { docs, .. } => docs,
        _ => unreachable!("a Docs message stays one"),
    }
}

#[test]
fn a_batch_is_signed_once_its_seal_travels_once_per_connection_and_relays_carry_it() {
    let (a, b, c) = (node(1), node(2), node(3));
    let ids = create_batch(&a, 40);
    let mut sent = medmesh_storage::SealsSent::new();
    // What is read for a peer carries the seal; the session leaves the first document
    // out (the peer has it): the next message that needs the seal carries it.
    let read = a.load_for_peer(&ids[..2], &[]).expect("load");
    assert!(carries_seal(&read[0]) && !carries_seal(&read[1]));
    let payloads: Vec<DocPayload> = ids
        .iter()
        .flat_map(|id| send(&a, std::slice::from_ref(id), &mut sent))
        .collect();
    assert_eq!(payloads.len(), 40);
    assert_eq!(
        payloads.iter().filter(|p| carries_seal(p)).count(),
        1,
        "the seal is sent with the first document only"
    );
    assert!(carries_seal(&payloads[0]));
    // Each of the others carries one entry naming the seal: tag, hash, seal id.
    assert!(payloads[1..].iter().all(|p| p.sigs.len() == 65));
    assert_eq!(receive(&b, payloads), vec![None; 40]);
    for id in &ids {
        let signers = b.signers(id).expect("signers");
        assert_eq!(signers.len(), 1);
        assert!(signers.values().all(|(k, v)| *k == public(1) && !v));
    }
    // B relays to C on a new connection: it kept the seal and sends it along.
    let relayed: Vec<DocPayload> = b.load_for_peer(&ids, &[]).expect("load");
    assert_eq!(relayed.iter().filter(|p| carries_seal(p)).count(), 1);
    assert_eq!(receive(&c, relayed), vec![None; 40]);
    assert_eq!(name(&c, ids[39]), Some(json!("B39")));
}

#[test]
fn a_batch_of_two_clinics_is_sealed_by_clinic_so_a_device_of_one_gets_no_other_hashes() {
    let (a, b) = (node(1), node(2));
    let clinics = [DocId::new_v7().to_string(), DocId::new_v7().to_string()];
    let ops = (0..40)
        .map(|i| {
            WriteOp::new(
                "patients",
                None,
                WriteKind::Create(fields(json!({
                    "given_name": format!("C{i}"), "primary_clinic_id": clinics[i % 2]
                }))),
                ChangeAuthor::default(),
            )
        })
        .collect();
    let ids: Vec<DocId> = a
        .write_blocking(WriteBatch { ops, atomic: false })
        .expect("batch")
        .into_iter()
        .map(|o| o.expect("created").id)
        .collect();
    let mut sent = medmesh_storage::SealsSent::new();
    let payloads: Vec<DocPayload> = ids
        .iter()
        .flat_map(|id| send(&a, std::slice::from_ref(id), &mut sent))
        .collect();
    let sealed: Vec<usize> = (0..40).filter(|i| carries_seal(&payloads[*i])).collect();
    assert_eq!(sealed, vec![0, 1], "one seal per clinic, each sent once");
    // Clinic one's seal names its 20 changes only: 32 bytes each, and the signature.
    assert!(
        payloads[0].sigs.len() < 21 * 32 + 200,
        "{} bytes of signatures",
        payloads[0].sigs.len()
    );
    assert_eq!(receive(&b, payloads), vec![None; 40]);
    assert!(
        b.signers(&ids[39])
            .expect("signers")
            .values()
            .all(|(k, v)| *k == public(1) && !v)
    );
}

#[test]
fn a_document_whose_seal_has_not_come_is_held_then_merged_when_it_comes() {
    let (a, d) = (node(1), node(4));
    let ids = create_batch(&a, 3);
    let mut sent = medmesh_storage::SealsSent::new();
    let first = send(&a, &ids[..1], &mut sent);
    let second = send(&a, &ids[1..2], &mut sent);
    assert!(carries_seal(&first[0]) && !carries_seal(&second[0]));
    // The second arrives first (another stream, a reordered batch): held, saying why.
    let held = receive(&d, second).pop().flatten().expect("held");
    assert!(held.contains("did not come"), "{held}");
    assert_eq!(name(&d, ids[1]), None, "a held document is never read");
    // The seal comes with the first: the held one merges at the next retry.
    assert_eq!(receive(&d, first), vec![None]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while name(&d, ids[1]).is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(name(&d, ids[1]), Some(json!("B1")));
}

#[test]
fn a_seal_made_by_a_forger_over_another_devices_changes_is_refused() {
    let (forger, victim) = (key(5), node(1));
    let b = node(2);
    let ids = create_batch(&victim, 2);
    // The forger takes the victim's documents and signs their changes in its own seal.
    let mut payloads = victim.load_for_peer(&ids, &[]).expect("load");
    let hashes: Vec<[u8; 32]> = ids
        .iter()
        .flat_map(|id| victim.document("patients", id).expect("doc").get_heads())
        .map(|h| h.0)
        .collect();
    let (seal, entries) = authorship::seal(&forger, hashes);
    for (payload, entry) in payloads.iter_mut().zip(&entries) {
        let mut sigs = authorship::encode(std::slice::from_ref(entry));
        authorship::encode_seal_into(&seal, &mut sigs);
        payload.sigs = ByteBuf::from(sigs);
    }
    for reason in receive(&b, payloads) {
        let reason = reason.expect("held");
        assert!(reason.contains("signed by another device"), "{reason}");
    }
    assert_eq!(name(&b, ids[0]), None);
}
