use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ROOT};
use proptest::prelude::*;

use super::*;

struct Anyone;

impl Authority for Anyone {
    fn check_signer(&self, _: &[u8; 32], _: i64) -> Result<(), String> {
        Ok(())
    }
}

/// Refuses one signer for changes dated from `from_ms` on.
struct Revoked([u8; 32], i64);

impl Authority for Revoked {
    fn check_signer(&self, signer: &[u8; 32], time_ms: i64) -> Result<(), String> {
        if *signer == self.0 && time_ms >= self.1 {
            return Err("its device was revoked".into());
        }
        Ok(())
    }
}

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// A document with one change by `actor` at `time_ms`.
fn doc_by(actor: Vec<u8>, time_ms: i64) -> Automerge {
    let mut doc = Automerge::new().with_actor(ActorId::from(actor));
    doc.transact_with::<_, _, automerge::AutomergeError, _>(
        |_| CommitOptions::default().with_time(time_ms),
        |tx| {
            tx.put(ROOT, "name", "Amina")?;
            Ok(())
        },
    )
    .unwrap_or_else(|_| panic!("a local change commits"));
    doc
}

fn signed(doc: &Automerge, key: &SigningKey) -> Vec<SignedChange> {
    facts_of_doc(doc, &[])
        .iter()
        .map(|f| sign(key, f.hash))
        .collect()
}

#[test]
fn a_change_signed_by_its_device_is_accepted_and_kept() {
    let device = key(1);
    let doc = doc_by(author_actor(&device, [7; 8]), 1_000);
    let entries = signed(&doc, &device);
    let facts = facts_of_doc(&doc, &[]);
    let kept = verify(
        &facts,
        &entries,
        &NoSeals,
        &Anyone,
        &mut KeyCache::default(),
    );
    assert_eq!(kept, Ok(entries.clone()));
    assert_eq!(
        signer_of(&facts[0].actor, &entries[0]),
        Some(device.verifying_key().to_bytes())
    );
}

#[test]
fn a_change_signed_by_another_device_than_its_actor_is_refused() {
    let victim = key(1);
    let forger = key(2);
    // The forger writes as the victim's actor and signs with its own key.
    let doc = doc_by(author_actor(&victim, [7; 8]), 1_000);
    let entries = signed(&doc, &forger);
    let refused = verify(
        &facts_of_doc(&doc, &[]),
        &entries,
        &NoSeals,
        &Anyone,
        &mut KeyCache::default(),
    );
    let reason = refused.expect_err("a forged signature is refused");
    assert!(
        reason.contains("not signed by the device it names"),
        "{reason}"
    );
    // Nor may the forger vouch for a change that names a device.
    let vouched: Vec<SignedChange> = facts_of_doc(&doc, &[])
        .iter()
        .map(|f| vouch(&forger, f.hash))
        .collect();
    let reason = verify(
        &facts_of_doc(&doc, &[]),
        &vouched,
        &NoSeals,
        &Anyone,
        &mut KeyCache::default(),
    )
    .expect_err("a vouch for a device's change is refused");
    assert!(reason.contains("signed by another device"), "{reason}");
}

#[test]
fn a_change_with_no_signature_is_refused() {
    let device = key(1);
    let doc = doc_by(author_actor(&device, [7; 8]), 1_000);
    let reason = verify(
        &facts_of_doc(&doc, &[]),
        &[],
        &NoSeals,
        &Anyone,
        &mut KeyCache::default(),
    )
    .expect_err("an unsigned change is refused");
    assert!(reason.contains("carries no signature"), "{reason}");
}

#[test]
fn a_change_from_before_signatures_is_accepted_only_when_vouched_for() {
    let node = key(3);
    let doc = doc_by(vec![9; 16], 1_000);
    let facts = facts_of_doc(&doc, &[]);
    let vouched: Vec<SignedChange> = facts.iter().map(|f| vouch(&node, f.hash)).collect();
    let kept = verify(
        &facts,
        &vouched,
        &NoSeals,
        &Anyone,
        &mut KeyCache::default(),
    );
    assert_eq!(kept, Ok(vouched.clone()));
    assert_eq!(
        signer_of(&facts[0].actor, &vouched[0]),
        Some(node.verifying_key().to_bytes())
    );
    // An author signature means nothing without a device actor.
    let plain = signed(&doc, &node);
    assert!(verify(&facts, &plain, &NoSeals, &Anyone, &mut KeyCache::default()).is_err());
}

#[test]
fn a_revoked_device_changes_dated_after_its_revocation_are_refused() {
    let device = key(1);
    let revoked = Revoked(device.verifying_key().to_bytes(), 5_000);
    let before = doc_by(author_actor(&device, [7; 8]), 4_999);
    let after = doc_by(author_actor(&device, [7; 8]), 5_000);
    let mut keys = KeyCache::default();
    assert!(
        verify(
            &facts_of_doc(&before, &[]),
            &signed(&before, &device),
            &NoSeals,
            &revoked,
            &mut keys
        )
        .is_ok()
    );
    let reason = verify(
        &facts_of_doc(&after, &[]),
        &signed(&after, &device),
        &NoSeals,
        &revoked,
        &mut keys,
    )
    .expect_err("a change dated after the revocation is refused");
    assert!(reason.contains("revoked"), "{reason}");
}

#[test]
fn one_bad_signature_in_a_batch_is_named() {
    let device = key(1);
    let mut checks = Vec::new();
    let mut bad_hash = [0; 32];
    for n in 0..8u8 {
        let doc = doc_by(author_actor(&device, [n; 8]), 1_000 + i64::from(n));
        let mut entries = signed(&doc, &device);
        if n == 5 {
            if let Proof::Author(sig) = &mut entries[0].proof {
                sig[0] ^= 1;
            }
            bad_hash = entries[0].hash;
        }
        let (more, _) = prepare_checks(
            &facts_of_doc(&doc, &[]),
            &entries,
            &NoSeals,
            &Anyone,
            &mut KeyCache::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        checks.extend(more);
    }
    let reason = verify_checks(&checks).expect_err("the damaged signature is found");
    assert!(reason.contains(&short(&bad_hash)), "{reason}");
}

#[test]
fn damaged_encodings_are_refused_with_a_reason() {
    let entries = vec![sign(&key(1), [1; 32]), vouch(&key(2), [2; 32])];
    let bytes = encode(&entries);
    assert_eq!(bytes.len(), AUTHOR_LEN + VOUCH_LEN);
    assert_eq!(decode(&bytes).map(|d| d.entries), Ok(entries));
    assert!(
        decode(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .contains("cut short")
    );
    let mut wrong_tag = bytes.clone();
    wrong_tag[0] = 9;
    assert!(decode(&wrong_tag).unwrap_err().contains("damaged"));
    assert_eq!(decode(&[]), Ok(Decoded::default()));
}

proptest! {
    #[test]
    fn encoding_round_trips(raw in proptest::collection::vec((any::<[u8; 32]>(), any::<u8>()), 0..20)) {
        let entries: Vec<SignedChange> = raw
            .iter()
            .map(|(hash, kind)| SignedChange {
                hash: *hash,
                proof: match kind % 3 {
                    0 => Proof::Author([hash[0]; 64]),
                    1 => Proof::Vouch { sig: [hash[1]; 64], voucher: *hash },
                    _ => Proof::Sealed([hash[2]; 32]),
                },
            })
            .collect();
        let (seal, _) = seal(&key(3), raw.iter().map(|(h, _)| *h).chain([[9; 32]]).collect());
        let mut bytes = encode(&entries);
        encode_seal_into(&seal, &mut bytes);
        let decoded = decode(&bytes).map_err(TestCaseError::fail)?;
        prop_assert_eq!(decoded.entries, entries);
        prop_assert_eq!(decoded.seals, vec![seal]);
    }

    #[test]
    fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode(&bytes);
    }
}

/// A lookup over seals taken as they are (for tests).
struct Seals(Vec<std::sync::Arc<KnownSeal>>);

impl SealLookup for Seals {
    fn seal(&self, id: &SealId) -> Option<std::sync::Arc<KnownSeal>> {
        self.0.iter().find(|s| s.seal().id() == *id).cloned()
    }
}

fn checked(seal: Seal) -> Seals {
    let known = verify_seals(vec![seal], &mut KeyCache::default())
        .pop()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("the seal holds"));
    Seals(vec![std::sync::Arc::new(known)])
}

#[test]
fn changes_in_a_seal_of_their_device_are_accepted() {
    let device = key(1);
    let docs: Vec<Automerge> = (0..5u8)
        .map(|n| doc_by(author_actor(&device, [n; 8]), 1_000))
        .collect();
    let facts: Vec<ChangeFacts> = docs.iter().flat_map(|d| facts_of_doc(d, &[])).collect();
    let (seal, entries) = seal(&device, facts.iter().map(|f| f.hash).collect());
    let mut bytes = encode(&entries);
    encode_seal_into(&seal, &mut bytes);
    let decoded = decode(&bytes).unwrap_or_else(|e| panic!("{e}"));
    let seals = checked(decoded.seals[0].clone());
    let (checks, kept) = prepare_checks(
        &facts,
        &decoded.entries,
        &seals,
        &Anyone,
        &mut KeyCache::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(checks.is_empty(), "no signature of its own is checked");
    assert_eq!(kept, entries);
    // One change's facts with no seal known: refused, saying what is missing.
    let reason = verify(
        &facts,
        &entries,
        &NoSeals,
        &Anyone,
        &mut KeyCache::default(),
    )
    .expect_err("a seal that did not come is refused");
    assert!(reason.contains("did not come"), "{reason}");
}

#[test]
fn a_seal_cannot_vouch_for_another_devices_change_nor_one_outside_it() {
    let victim = key(1);
    let forger = key(2);
    let doc = doc_by(author_actor(&victim, [1; 8]), 1_000);
    let facts = facts_of_doc(&doc, &[]);
    // The forger seals the victim's change with its own key.
    let (forged, entries) = seal(&forger, vec![facts[0].hash]);
    let reason = verify(
        &facts,
        &entries,
        &checked(forged),
        &Anyone,
        &mut KeyCache::default(),
    )
    .expect_err("a seal by another device is refused");
    assert!(reason.contains("signed by another device"), "{reason}");
    // The victim's genuine seal of other changes does not cover this one.
    let (other, _) = seal(&victim, vec![[5; 32], [6; 32]]);
    let id = other.id();
    let pointing = vec![SignedChange {
        hash: facts[0].hash,
        proof: Proof::Sealed(id),
    }];
    let reason = verify(
        &facts,
        &pointing,
        &checked(other),
        &Anyone,
        &mut KeyCache::default(),
    )
    .expect_err("a change outside the seal is refused");
    assert!(reason.contains("not in the list"), "{reason}");
}

#[test]
fn a_seal_whose_list_was_changed_does_not_hold() {
    let device = key(1);
    let (genuine, _) = seal(&device, vec![[1; 32], [2; 32]]);
    let mut bytes = Vec::new();
    encode_seal_into(&genuine, &mut bytes);
    // A relay swaps one hash of the list for another.
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let decoded = decode(&bytes).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(decoded.seals[0].id(), genuine.id());
    let answer = verify_seals(decoded.seals, &mut KeyCache::default());
    let reason = answer[0].as_ref().expect_err("the altered list is refused");
    assert!(reason.contains("not valid"), "{reason}");
    // And one that names no changes, or is cut short, is refused when decoded.
    let mut empty = vec![TAG_SEAL];
    empty.extend_from_slice(&[0; SEAL_HEAD]);
    assert!(decode(&empty).unwrap_err().contains("0 changes"));
    let mut cut = Vec::new();
    encode_seal_into(&genuine, &mut cut);
    cut.pop();
    assert!(decode(&cut).unwrap_err().contains("cut short"));
}
