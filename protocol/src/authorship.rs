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
//! A device that makes many changes at once (an import, a batch of writes) signs them
//! with one [`Seal`]: a signature over the list of their hashes. Each change then refers
//! to the seal by its id ([`Proof::Sealed`]), and the seal itself travels once per
//! connection; a receiver checks the seal's signature once and each change's place in
//! it. This is what keeps an import and an initial sync from paying one signature per
//! change.
//!
//! Entries are concatenated in one byte string ([`encode`], [`decode`]): a tag byte, the
//! change hash, then the signature (and for a vouch the voucher's public key) or the id
//! of the seal; seals carried along are entries of their own (signer, signature, count,
//! hashes).

use std::collections::{HashMap, HashSet};

use ed25519_dalek::{Signature, Signer, VerifyingKey};
use sha2::{Digest, Sha256};

pub use ed25519_dalek::SigningKey;

/// Prefix of the signed message, so that a change signature is never valid as any
/// other signature made with a device key.
const DOMAIN: &[u8; 16] = b"medmesh-change-1";
/// Tag of an entry signed by the change's author.
const TAG_AUTHOR: u8 = 0;
/// Tag of an entry signed by a node that vouches for a change with no device actor.
const TAG_VOUCH: u8 = 1;
/// Tag of an entry whose change is in a seal.
const TAG_SEALED: u8 = 2;
/// Tag of a seal carried along.
const TAG_SEAL: u8 = 3;
/// Length of an author entry: tag, hash, signature.
const AUTHOR_LEN: usize = 1 + 32 + 64;
/// Length of a vouch entry: tag, hash, signature, voucher key.
const VOUCH_LEN: usize = AUTHOR_LEN + 32;
/// Length of a sealed entry: tag, hash, seal id.
const SEALED_LEN: usize = 1 + 32 + 32;
/// Length of a seal before its hashes: signer, signature, count (u16, little-endian).
const SEAL_HEAD: usize = 32 + 64 + 2;
/// Prefix of the message a seal signs (the SHA-256 of its hashes follows).
const SEAL_DOMAIN: &[u8; 16] = b"medmesh-sealed-1";
/// Prefix of what a seal's id is the SHA-256 of.
const SEAL_ID_DOMAIN: &[u8; 16] = b"medmesh-seal-id1";
/// Changes in one seal at most (its list is then 32 KiB).
pub const SEAL_MAX: usize = 1024;
/// Length of a device actor: the public key, then random bytes that change at every
/// start of the store (a store restored from a backup never reuses sequence numbers).
pub const DEVICE_ACTOR_LEN: usize = 32 + 8;
/// Entries decoded from one byte string at most (a peer cannot make a receiver
/// allocate more than the bytes it sent would justify anyway; this bounds the work).
pub const MAX_ENTRIES: usize = 1 << 20;

/// The id of a [`Seal`].
pub type SealId = [u8; 32];

/// What shows that a change is genuine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// The change's author's Ed25519 signature over [`DOMAIN`] and the hash.
    Author([u8; 64]),
    /// A node's signature for a change that names no device, and that node's key.
    Vouch {
        /// The signature, made as an author's is.
        sig: [u8; 64],
        /// The node that vouched.
        voucher: [u8; 32],
    },
    /// The change is in this seal of its author.
    Sealed(SealId),
}

/// One change's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedChange {
    /// The change's hash.
    pub hash: [u8; 32],
    /// Its proof.
    pub proof: Proof,
}

impl SignedChange {
    /// The node that vouched for the change; `None` when its author signed it.
    pub fn voucher(&self) -> Option<[u8; 32]> {
        match self.proof {
            Proof::Vouch { voucher, .. } => Some(voucher),
            _ => None,
        }
    }
}

/// One device's signature over the hashes of many changes it made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    signer: [u8; 32],
    sig: [u8; 64],
    hashes: Vec<[u8; 32]>,
    /// SHA-256 of the hashes, which the signature covers.
    digest: [u8; 32],
    id: SealId,
}

impl Seal {
    fn new(signer: [u8; 32], sig: [u8; 64], hashes: Vec<[u8; 32]>) -> Self {
        let mut sha = Sha256::new();
        for hash in &hashes {
            sha.update(hash);
        }
        let digest: [u8; 32] = sha.finalize().into();
        let mut sha = Sha256::new();
        sha.update(SEAL_ID_DOMAIN);
        sha.update(signer);
        sha.update(digest);
        Self {
            signer,
            sig,
            hashes,
            digest,
            id: sha.finalize().into(),
        }
    }

    /// Its id: what changes in it refer to.
    pub fn id(&self) -> SealId {
        self.id
    }

    /// The device that signed it.
    pub fn signer(&self) -> [u8; 32] {
        self.signer
    }

    /// The hashes of the changes it signs.
    pub fn hashes(&self) -> &[[u8; 32]] {
        &self.hashes
    }

    fn message(&self) -> [u8; 48] {
        let mut out = [0; 48];
        out[..16].copy_from_slice(SEAL_DOMAIN);
        out[16..].copy_from_slice(&self.digest);
        out
    }

    /// Appends its encoding (without a tag) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.signer);
        out.extend_from_slice(&self.sig);
        out.extend_from_slice(&(self.hashes.len() as u16).to_le_bytes());
        for hash in &self.hashes {
            out.extend_from_slice(hash);
        }
    }

    /// A seal from the start of `bytes` (as [`Seal::encode_into`] wrote it), and the
    /// bytes after it. Its signature is not checked here: see [`verify_seals`].
    pub fn decode(bytes: &[u8]) -> Result<(Self, &[u8]), String> {
        let head = bytes
            .get(..SEAL_HEAD)
            .ok_or("its list of change signatures is cut short")?;
        let mut signer = [0; 32];
        signer.copy_from_slice(&head[..32]);
        let mut sig = [0; 64];
        sig.copy_from_slice(&head[32..96]);
        let count = usize::from(u16::from_le_bytes([head[96], head[97]]));
        if count == 0 || count > SEAL_MAX {
            return Err(format!(
                "its list of change signatures names {count} changes (1 to {SEAL_MAX} accepted)"
            ));
        }
        let end = SEAL_HEAD + count * 32;
        let list = bytes
            .get(SEAL_HEAD..end)
            .ok_or("its list of change signatures is cut short")?;
        let hashes = list
            .chunks_exact(32)
            .map(|c| {
                let mut hash = [0; 32];
                hash.copy_from_slice(c);
                hash
            })
            .collect();
        Ok((Self::new(signer, sig, hashes), &bytes[end..]))
    }
}

/// A seal whose signature holds (or that this node made): which changes it covers.
#[derive(Debug)]
pub struct KnownSeal {
    seal: Seal,
    covers: HashSet<[u8; 32]>,
}

impl KnownSeal {
    /// A seal taken as genuine without a check: one this node made, or read back from
    /// where it keeps only seals it checked.
    pub fn trusted(seal: Seal) -> Self {
        let covers = seal.hashes.iter().copied().collect();
        Self { seal, covers }
    }

    /// The seal.
    pub fn seal(&self) -> &Seal {
        &self.seal
    }

    /// Whether the change with this hash is in it.
    pub fn covers(&self, hash: &[u8; 32]) -> bool {
        self.covers.contains(hash)
    }
}

/// Where [`prepare_checks`] finds the seals that changes refer to (only seals whose
/// signature held).
pub trait SealLookup {
    /// The seal with this id, if known.
    fn seal(&self, id: &SealId) -> Option<std::sync::Arc<KnownSeal>>;
}

/// A lookup that knows no seal.
pub struct NoSeals;

impl SealLookup for NoSeals {
    fn seal(&self, _: &SealId) -> Option<std::sync::Arc<KnownSeal>> {
        None
    }
}

/// Signature entries and the seals that came with them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decoded {
    /// One per change.
    pub entries: Vec<SignedChange>,
    /// Seals carried along.
    pub seals: Vec<Seal>,
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
        proof: Proof::Author(key.sign(&message(&hash)).to_bytes()),
    }
}

/// A node's vouch for a change with no device actor.
pub fn vouch(key: &SigningKey, hash: [u8; 32]) -> SignedChange {
    SignedChange {
        hash,
        proof: Proof::Vouch {
            sig: key.sign(&message(&hash)).to_bytes(),
            voucher: key.verifying_key().to_bytes(),
        },
    }
}

/// The author's one signature over many of its changes (at most [`SEAL_MAX`]; the
/// caller splits longer lists), and the entries that refer to it.
pub fn seal(key: &SigningKey, hashes: Vec<[u8; 32]>) -> (Seal, Vec<SignedChange>) {
    let unsigned = Seal::new(key.verifying_key().to_bytes(), [0; 64], hashes);
    let sig = key.sign(&unsigned.message()).to_bytes();
    let seal = Seal { sig, ..unsigned };
    let entries = seal
        .hashes
        .iter()
        .map(|hash| SignedChange {
            hash: *hash,
            proof: Proof::Sealed(seal.id),
        })
        .collect();
    (seal, entries)
}

/// Appends the encoding of `entries` to `out`.
pub fn encode_into(entries: &[SignedChange], out: &mut Vec<u8>) {
    for entry in entries {
        let tag = match entry.proof {
            Proof::Author(_) => TAG_AUTHOR,
            Proof::Vouch { .. } => TAG_VOUCH,
            Proof::Sealed(_) => TAG_SEALED,
        };
        out.push(tag);
        out.extend_from_slice(&entry.hash);
        entry.proof.encode_into(out);
    }
}

impl Proof {
    /// Appends the proof's bytes (without its kind, which the caller records): the
    /// signature, then for a vouch the voucher's key; or the seal's id.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Proof::Author(sig) => out.extend_from_slice(sig),
            Proof::Vouch { sig, voucher } => {
                out.extend_from_slice(sig);
                out.extend_from_slice(voucher);
            }
            Proof::Sealed(id) => out.extend_from_slice(id),
        }
    }
}

/// Appends a seal, carried along with entries, to `out`.
pub fn encode_seal_into(seal: &Seal, out: &mut Vec<u8>) {
    out.push(TAG_SEAL);
    seal.encode_into(out);
}

/// The encoding of `entries`.
pub fn encode(entries: &[SignedChange]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * AUTHOR_LEN);
    encode_into(entries, &mut out);
    out
}

/// Entries and seals from their encoding; an error names what is wrong.
pub fn decode(mut bytes: &[u8]) -> Result<Decoded, String> {
    let mut out = Decoded {
        entries: Vec::with_capacity((bytes.len() / SEALED_LEN).min(MAX_ENTRIES)),
        seals: Vec::new(),
    };
    let mut counted = 0usize;
    while let Some(&tag) = bytes.first() {
        if tag == TAG_SEAL {
            let (seal, rest) = Seal::decode(&bytes[1..])?;
            counted += seal.hashes.len();
            if counted > MAX_ENTRIES {
                return Err("it carries more change signatures than medmesh accepts".into());
            }
            out.seals.push(seal);
            bytes = rest;
            continue;
        }
        let len = match tag {
            TAG_AUTHOR => AUTHOR_LEN,
            TAG_VOUCH => VOUCH_LEN,
            TAG_SEALED => SEALED_LEN,
            other => {
                return Err(format!(
                    "its change signatures are damaged (entry kind {other})"
                ));
            }
        };
        if bytes.len() < len {
            return Err("its change signatures are cut short".into());
        }
        counted += 1;
        if counted > MAX_ENTRIES {
            return Err("it carries more change signatures than medmesh accepts".into());
        }
        let mut hash = [0; 32];
        hash.copy_from_slice(&bytes[1..33]);
        let mut tail = [0; 32];
        let proof = match tag {
            TAG_SEALED => {
                tail.copy_from_slice(&bytes[33..65]);
                Proof::Sealed(tail)
            }
            _ => {
                let mut sig = [0; 64];
                sig.copy_from_slice(&bytes[33..97]);
                if tag == TAG_VOUCH {
                    tail.copy_from_slice(&bytes[97..129]);
                    Proof::Vouch { sig, voucher: tail }
                } else {
                    Proof::Author(sig)
                }
            }
        };
        out.entries.push(SignedChange { hash, proof });
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
    /// The change's hash, or the seal's id.
    hash: [u8; 32],
    what: Subject,
}

/// What a [`Check`] is of (for the error it gives).
#[derive(Debug, Clone, Copy)]
enum Subject {
    Change,
    Seal,
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
/// A change in a seal needs no signature of its own: its seal's was checked when the
/// seal arrived, and `seals` knows only seals whose signature held.
pub fn prepare_checks(
    changes: &[ChangeFacts],
    entries: &[SignedChange],
    seals: &dyn SealLookup,
    authority: &dyn Authority,
    keys: &mut KeyCache,
) -> Result<(Vec<Check>, Vec<SignedChange>), String> {
    // A change's author's proof is preferred to a vouch (later entries win below).
    let by_hash: HashMap<[u8; 32], &SignedChange> = entries
        .iter()
        .filter(|e| e.voucher().is_none())
        .chain(entries.iter().filter(|e| e.voucher().is_some()))
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
        if let Proof::Sealed(id) = entry.proof {
            let author = actor_key(&change.actor).ok_or_else(|| {
                format!("change {hash} names no device but is in a device's list of signatures")
            })?;
            let seal = seals.seal(&id).ok_or_else(|| {
                format!(
                    "change {hash} refers to a list of signatures ({}) that did not come with it",
                    short(&id)
                )
            })?;
            if seal.seal.signer != author {
                return Err(format!(
                    "change {hash} was made by device key {} but is in a list signed by another device",
                    short(&author)
                ));
            }
            if !seal.covers(&change.hash) {
                return Err(format!(
                    "change {hash} is not in the list of signatures it refers to"
                ));
            }
            authority
                .check_signer(&author, change.time_ms)
                .map_err(|why| format!("change {hash}: {why}"))?;
            kept.push(**entry);
            continue;
        }
        let (sig, voucher) = match entry.proof {
            Proof::Author(sig) => (sig, None),
            Proof::Vouch { sig, voucher } => (sig, Some(voucher)),
            Proof::Sealed(_) => continue,
        };
        let signer = match (actor_key(&change.actor), voucher) {
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
            sig: Signature::from_bytes(&sig),
            hash: change.hash,
            what: Subject::Change,
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
            .map_err(|_| match check.what {
                Subject::Change => format!(
                    "change {} carries a signature that is not valid: it was not signed by the device it names",
                    short(&check.hash)
                ),
                Subject::Seal => format!(
                    "its list of signatures {} is not valid: it was not signed by the device it names",
                    short(&check.hash)
                ),
            })?;
    }
    Ok(())
}

/// Checks the signatures of seals that came from a peer (in batches, as changes'); each
/// answer is the seal, now known, or why it is refused.
pub fn verify_seals(seals: Vec<Seal>, keys: &mut KeyCache) -> Vec<Result<KnownSeal, String>> {
    let checks: Vec<Result<Check, String>> = seals
        .iter()
        .map(|seal| {
            Ok(Check {
                key: keys.get(&seal.signer)?,
                message: seal.message(),
                sig: Signature::from_bytes(&seal.sig),
                hash: seal.id,
                what: Subject::Seal,
            })
        })
        .collect();
    let valid: Vec<Check> = checks
        .iter()
        .filter_map(|c| c.as_ref().ok())
        .cloned()
        .collect();
    let all_hold = verify_checks(&valid).is_ok();
    seals
        .into_iter()
        .zip(checks)
        .map(|(seal, check)| {
            let check = check?;
            if !all_hold {
                verify_batch(std::slice::from_ref(&check))?;
            }
            Ok(KnownSeal::trusted(seal))
        })
        .collect()
}

/// [`prepare_checks`] and [`verify_checks`] for one set of changes: the entries to keep.
pub fn verify(
    changes: &[ChangeFacts],
    entries: &[SignedChange],
    seals: &dyn SealLookup,
    authority: &dyn Authority,
    keys: &mut KeyCache,
) -> Result<Vec<SignedChange>, String> {
    let (checks, kept) = prepare_checks(changes, entries, seals, authority, keys)?;
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
    entry.voucher().or_else(|| actor_key(actor))
}

#[cfg(test)]
mod tests;
