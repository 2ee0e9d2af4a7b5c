//! Who made a change, in a form no relay can forge.
//!
//! A device writes with an Automerge actor id that begins with its Ed25519 public key
//! (the key of its libp2p identity): [`author_actor`]. Each change it makes is signed
//! with that key over the change's hash ([`sign`]), and the signature travels with the
//! change wherever it goes. A receiver takes the signer from the change itself (the
//! actor, which the hash covers), checks the signature, and asks an [`Authority`]
//! whether that device may have made it (not revoked by then): [`verify`]. A change made
//! by another device's actor cannot be signed by anyone but that device.
//!
//! Two kinds of change have no device actor: those written before signed authorship
//! (random actors), and the genesis change of a record that every node creates the same
//! way (its actor is the record's id). A node vouches for such a change with its own
//! key ([`vouch`]): the vouch names the node that vouched, and history shows it as such.
//! A vouch is refused for a change whose actor names a device.
//!
//! Entries are concatenated in one byte string ([`encode`], [`decode`]): a tag byte, the
//! change hash, the signature, and for a vouch the voucher's public key.

use std::collections::HashMap;

use ed25519_dalek::{Signature, Signer, VerifyingKey};

pub use ed25519_dalek::SigningKey;

/// Prefix of the signed message, so that a change signature is never valid as any
/// other signature made with a device key.
const DOMAIN: &[u8; 16] = b"medmesh-change-1";
/// Tag of an entry signed by the change's author.
const TAG_AUTHOR: u8 = 0;
/// Tag of an entry signed by a node that vouches for a change with no device actor.
const TAG_VOUCH: u8 = 1;
/// Length of an author entry: tag, hash, signature.
const AUTHOR_LEN: usize = 1 + 32 + 64;
/// Length of a vouch entry: tag, hash, signature, voucher key.
const VOUCH_LEN: usize = AUTHOR_LEN + 32;
/// Length of a device actor: the public key, then random bytes that change at every
/// start of the store (a store restored from a backup never reuses sequence numbers).
pub const DEVICE_ACTOR_LEN: usize = 32 + 8;
/// Entries decoded from one byte string at most (a peer cannot make a receiver
/// allocate more than the bytes it sent would justify anyway; this bounds the work).
pub const MAX_ENTRIES: usize = 1 << 20;

/// One change's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedChange {
    /// The change's hash.
    pub hash: [u8; 32],
    /// Ed25519 signature over [`DOMAIN`] and the hash.
    pub sig: [u8; 64],
    /// For a vouch, the node that vouched; `None` when the change's author signed.
    pub voucher: Option<[u8; 32]>,
}

/// What a receiver knows of a change from its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeFacts {
    /// Its hash.
    pub hash: [u8; 32],
    /// Its actor id.
    pub actor: Vec<u8>,
    /// Its time as its author wrote it (ms since 1970).
    pub time_ms: i64,
}

/// Whether a device may have made a change: membership and revocation, as the node
/// knows them.
pub trait Authority: Send + Sync {
    /// `Ok` when changes signed by `signer` (an Ed25519 public key) and dated `time_ms`
    /// are accepted; else what to tell the person at the clinic.
    fn check_signer(&self, signer: &[u8; 32], time_ms: i64) -> Result<(), String>;
}

/// The device key named by a device actor; `None` for any other actor.
pub fn actor_key(actor: &[u8]) -> Option<[u8; 32]> {
    if actor.len() != DEVICE_ACTOR_LEN {
        return None;
    }
    actor[..32].try_into().ok()
}

/// A new device actor for `key`: the public key and eight random bytes.
pub fn author_actor(key: &SigningKey, random: [u8; 8]) -> Vec<u8> {
    let mut actor = key.verifying_key().to_bytes().to_vec();
    actor.extend_from_slice(&random);
    actor
}

fn message(hash: &[u8; 32]) -> [u8; 48] {
    let mut out = [0; 48];
    out[..16].copy_from_slice(DOMAIN);
    out[16..].copy_from_slice(hash);
    out
}

/// The author's signature of its own change.
pub fn sign(key: &SigningKey, hash: [u8; 32]) -> SignedChange {
    SignedChange {
        hash,
        sig: key.sign(&message(&hash)).to_bytes(),
        voucher: None,
    }
}

/// A node's vouch for a change with no device actor.
pub fn vouch(key: &SigningKey, hash: [u8; 32]) -> SignedChange {
    SignedChange {
        voucher: Some(key.verifying_key().to_bytes()),
        ..sign(key, hash)
    }
}

/// Appends the encoding of `entries` to `out`.
pub fn encode_into(entries: &[SignedChange], out: &mut Vec<u8>) {
    for entry in entries {
        out.push(if entry.voucher.is_some() {
            TAG_VOUCH
        } else {
            TAG_AUTHOR
        });
        out.extend_from_slice(&entry.hash);
        out.extend_from_slice(&entry.sig);
        if let Some(voucher) = &entry.voucher {
            out.extend_from_slice(voucher);
        }
    }
}

/// The encoding of `entries`.
pub fn encode(entries: &[SignedChange]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * AUTHOR_LEN);
    encode_into(entries, &mut out);
    out
}

/// Entries from their encoding; an error names what is wrong.
pub fn decode(mut bytes: &[u8]) -> Result<Vec<SignedChange>, String> {
    let mut out = Vec::with_capacity((bytes.len() / AUTHOR_LEN).min(MAX_ENTRIES));
    while let Some(&tag) = bytes.first() {
        let len = match tag {
            TAG_AUTHOR => AUTHOR_LEN,
            TAG_VOUCH => VOUCH_LEN,
            other => {
                return Err(format!(
                    "its change signatures are damaged (entry kind {other})"
                ));
            }
        };
        if bytes.len() < len {
            return Err("its change signatures are cut short".into());
        }
        if out.len() >= MAX_ENTRIES {
            return Err("it carries more change signatures than medmesh accepts".into());
        }
        let mut hash = [0; 32];
        hash.copy_from_slice(&bytes[1..33]);
        let mut sig = [0; 64];
        sig.copy_from_slice(&bytes[33..97]);
        let voucher = (tag == TAG_VOUCH).then(|| {
            let mut key = [0; 32];
            key.copy_from_slice(&bytes[97..129]);
            key
        });
        out.push(SignedChange { hash, sig, voucher });
        bytes = &bytes[len..];
    }
    Ok(out)
}

/// One signature to check: the signer's key, the message, the signature.
#[derive(Debug, Clone)]
pub struct Check {
    key: VerifyingKey,
    message: [u8; 48],
    sig: Signature,
    hash: [u8; 32],
}

/// Keys already decompressed, by their bytes (a mesh has few devices; decompressing a
/// key costs about a tenth of a verification).
#[derive(Default)]
pub struct KeyCache(HashMap<[u8; 32], VerifyingKey>);

impl KeyCache {
    fn get(&mut self, bytes: &[u8; 32]) -> Result<VerifyingKey, String> {
        if let Some(key) = self.0.get(bytes) {
            return Ok(*key);
        }
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| {
            format!(
                "a change names a device key that is not valid ({})",
                short(bytes)
            )
        })?;
        if self.0.len() < 4096 {
            self.0.insert(*bytes, key);
        }
        Ok(key)
    }
}

fn short(bytes: &[u8]) -> String {
    bytes.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Matches every change with its signature and asks `authority` about each signer;
/// answers the signatures still to verify (see [`verify_checks`]) and the entries to keep
/// with the changes. An error names the first change that cannot be accepted and why.
pub fn prepare_checks(
    changes: &[ChangeFacts],
    entries: &[SignedChange],
    authority: &dyn Authority,
    keys: &mut KeyCache,
) -> Result<(Vec<Check>, Vec<SignedChange>), String> {
    let by_hash: HashMap<[u8; 32], &SignedChange> = entries
        .iter()
        .filter(|e| e.voucher.is_none())
        .chain(entries.iter().filter(|e| e.voucher.is_some()))
        .rev()
        .map(|e| (e.hash, e))
        .collect();
    let mut checks = Vec::with_capacity(changes.len());
    let mut kept = Vec::with_capacity(changes.len());
    for change in changes {
        let hash = short(&change.hash);
        let entry = by_hash.get(&change.hash).ok_or_else(|| {
            format!("change {hash} carries no signature of the device that made it")
        })?;
        let signer = match (actor_key(&change.actor), entry.voucher) {
            (Some(author), None) => author,
            (Some(author), Some(_)) => {
                return Err(format!(
                    "change {hash} was made by device key {} but is signed by another device",
                    short(&author)
                ));
            }
            (None, Some(voucher)) => voucher,
            (None, None) => {
                return Err(format!(
                    "change {hash} names no device and no device vouched for it"
                ));
            }
        };
        authority
            .check_signer(&signer, change.time_ms)
            .map_err(|why| format!("change {hash}: {why}"))?;
        checks.push(Check {
            key: keys.get(&signer)?,
            message: message(&change.hash),
            sig: Signature::from_bytes(&entry.sig),
            hash: change.hash,
        });
        kept.push(**entry);
    }
    Ok((checks, kept))
}

/// Signatures verified in one batch at most: batches cost about 40% of a signature
/// checked alone from 16 on, and larger ones gain little while their working memory
/// grows with them.
const BATCH: usize = 64;

/// Verifies signatures, many at once (batch verification costs about half as much per
/// signature); when a batch fails, one by one to name the change that is wrong.
pub fn verify_checks(checks: &[Check]) -> Result<(), String> {
    checks.chunks(BATCH).try_for_each(verify_batch)
}

fn verify_batch(checks: &[Check]) -> Result<(), String> {
    if checks.is_empty() {
        return Ok(());
    }
    if checks.len() > 1 {
        let messages: Vec<&[u8]> = checks.iter().map(|c| c.message.as_slice()).collect();
        let sigs: Vec<Signature> = checks.iter().map(|c| c.sig).collect();
        let keys: Vec<VerifyingKey> = checks.iter().map(|c| c.key).collect();
        if ed25519_dalek::verify_batch(&messages, &sigs, &keys).is_ok() {
            return Ok(());
        }
    }
    for check in checks {
        check
            .key
            .verify_strict(&check.message, &check.sig)
            .map_err(|_| {
                format!(
                    "change {} carries a signature that is not valid: it was not signed by the device it names",
                    short(&check.hash)
                )
            })?;
    }
    Ok(())
}

/// [`prepare_checks`] and [`verify_checks`] for one set of changes: the entries to keep.
pub fn verify(
    changes: &[ChangeFacts],
    entries: &[SignedChange],
    authority: &dyn Authority,
    keys: &mut KeyCache,
) -> Result<Vec<SignedChange>, String> {
    let (checks, kept) = prepare_checks(changes, entries, authority, keys)?;
    verify_checks(&checks)?;
    Ok(kept)
}

/// What a receiver checks of each change of `doc` after `after` (all with `&[]`).
pub fn facts_of_doc(
    doc: &automerge::Automerge,
    after: &[automerge::ChangeHash],
) -> Vec<ChangeFacts> {
    doc.get_changes_meta(after)
        .into_iter()
        .map(|m| ChangeFacts {
            hash: m.hash.0,
            actor: m.actor.to_bytes().to_vec(),
            time_ms: m.timestamp,
        })
        .collect()
}

/// What a receiver checks of one change.
pub fn facts_of_change(change: &automerge::Change) -> ChangeFacts {
    ChangeFacts {
        hash: change.hash().0,
        actor: change.actor_id().to_bytes().to_vec(),
        time_ms: change.timestamp(),
    }
}

/// The device that made or vouched for a change, as its signature says.
pub fn signer_of(actor: &[u8], entry: &SignedChange) -> Option<[u8; 32]> {
    entry.voucher.or_else(|| actor_key(actor))
}

#[cfg(test)]
mod tests;
