//! The signatures of changes ([`medmesh_protocol::authorship`]): made for this node's
//! own changes when they are written, checked for a peer's when they arrive, kept per
//! change beside the document, and sent with the changes wherever they go.
//!
//! The node gives the store its device key once it is known ([`crate::Store::sign_as`]);
//! from then on the store writes with a device actor and signs every change it makes.
//! A store opened with an [`Authority`] refuses (holds) what a peer sends unless every
//! change in it is signed by the device that made it (or vouched for, when it names no
//! device) and the authority accepts that device. Documents stored before signatures
//! existed have none; the node vouches for their changes when it sends them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use automerge::{ActorId, Automerge, ChangeHash};
use medmesh_protocol::DocId;
use medmesh_protocol::authorship::{
    self, Authority, ChangeFacts, KeyCache, KnownSeal, Proof, SEAL_MAX, Seal, SealId, SealLookup,
    SignedChange, actor_key, author_actor,
};
use redb::{ReadableTable, Table};

use crate::error::Result;
use crate::merge::{guarded, load_received, next_chunk};
use crate::meta::doc_key;
use crate::tables::{FEED, INFO, SEALS, SIGS};
use crate::writer::Writer;
use redb::ReadableDatabase;

pub(crate) use medmesh_protocol::authorship::SigningKey;

/// The device key this store signs with, and the actor it writes as.
pub(crate) struct Author {
    pub(crate) key: SigningKey,
    pub(crate) actor: ActorId,
}

impl Author {
    pub(crate) fn new(secret: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(secret);
        let actor = ActorId::from(author_actor(&key, rand::random()));
        Self { key, actor }
    }

    /// This node's signatures of changes it made (`true`: made with its device actor;
    /// else, such as a record's shared genesis, vouched for), by document: one seal
    /// for many changes of documents with the same `audience` (the devices they go
    /// to), a signature of its own for a change alone. A seal carries the hash of every
    /// change it covers, so a device that receives one of them receives them all: one
    /// seal over a whole clinic's changes would cost a device of another clinic more
    /// than its own records. Answers the seals made, to be kept.
    pub(crate) fn sign_own<K: Ord>(
        &self,
        changes: Vec<(DocId, ChangeHash, bool)>,
        mut audience: impl FnMut(&DocId) -> K,
    ) -> (HashMap<DocId, Vec<SignedChange>>, Vec<Seal>) {
        let mut out: HashMap<DocId, Vec<SignedChange>> = HashMap::new();
        let mut seals = Vec::new();
        let mut groups: BTreeMap<K, Vec<(DocId, ChangeHash)>> = BTreeMap::new();
        for (id, hash, device) in changes {
            if device {
                groups.entry(audience(&id)).or_default().push((id, hash));
            } else {
                out.entry(id)
                    .or_default()
                    .push(authorship::vouch(&self.key, hash.0));
            }
        }
        for group in groups.into_values() {
            if let [(id, hash)] = group.as_slice() {
                out.entry(*id)
                    .or_default()
                    .push(authorship::sign(&self.key, hash.0));
                continue;
            }
            for chunk in group.chunks(SEAL_MAX) {
                let (seal, entries) =
                    authorship::seal(&self.key, chunk.iter().map(|c| c.1.0).collect());
                for ((id, _), entry) in chunk.iter().zip(entries) {
                    out.entry(*id).or_default().push(entry);
                }
                seals.push(seal);
            }
        }
        (out, seals)
    }
}

/// The author, set once the node knows its key (the writer is its only writer).
pub(crate) type AuthorCell = RwLock<Option<Arc<Author>>>;

pub(crate) fn current(cell: &AuthorCell) -> Option<Arc<Author>> {
    cell.read().ok().and_then(|a| a.clone())
}

/// What is checked of every change in a peer's bytes: a saved document's changes and
/// each change chunk's.
pub(crate) fn facts_of_bytes(bytes: &[u8]) -> std::result::Result<Vec<ChangeFacts>, String> {
    let mut facts = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (kind, chunk, _) = next_chunk(rest)?;
        rest = &rest[chunk.len()..];
        if kind == 0 {
            let doc = load_received(chunk)?;
            facts.extend(authorship::facts_of_doc(&doc, &[]));
        } else {
            let change = guarded(|| {
                automerge::Change::try_from(chunk)
                    .map_err(|e| format!("a change received is damaged: {e}"))
            })?;
            facts.push(authorship::facts_of_change(&change));
        }
    }
    Ok(facts)
}

/// Checks a peer's bytes against their signatures (and the seals they refer to, found
/// by `seals`); the entries to keep.
pub(crate) fn verify_bytes(
    bytes: &[u8],
    entries: &[SignedChange],
    seals: &dyn SealLookup,
    authority: &dyn Authority,
    keys: &mut KeyCache,
) -> std::result::Result<Vec<SignedChange>, String> {
    let facts = facts_of_bytes(bytes)?;
    authorship::verify(&facts, entries, seals, authority, keys)
        .map_err(|why| format!("{SIGNATURES_DO_NOT_HOLD}{why}"))
}

/// Signatures as a peer sent them, decoded; an error says they are damaged.
pub(crate) fn decode(sigs: &[u8]) -> std::result::Result<authorship::Decoded, String> {
    authorship::decode(sigs).map_err(|why| format!("{SIGNATURES_DO_NOT_HOLD}{why}"))
}

/// Seals known here: those this node made and those from peers whose signature held.
/// The ones used lately stay in memory (checked once); the ones from peers not yet in
/// the table wait for the writer, which keeps them ([`SealBook::take_unsaved`]).
#[derive(Default)]
pub(crate) struct SealBook(Mutex<Book>);

#[derive(Default)]
struct Book {
    known: HashMap<SealId, Arc<KnownSeal>>,
    /// From peers, not yet handed to the writer.
    unsaved: HashMap<SealId, Arc<KnownSeal>>,
    /// Handed to the writer, in a commit not yet done (readers cannot see them in the
    /// table yet).
    saving: HashMap<SealId, Arc<KnownSeal>>,
}

/// Seals kept in memory at most (each up to [`SEAL_MAX`] hashes).
const SEALS_IN_MEMORY: usize = 64;

impl Book {
    fn remember(&mut self, seal: Arc<KnownSeal>) {
        if self.known.len() >= SEALS_IN_MEMORY {
            self.known.clear();
        }
        self.known.insert(seal.seal().id(), seal);
    }

    fn find(&self, id: &SealId) -> Option<Arc<KnownSeal>> {
        self.known
            .get(id)
            .or_else(|| self.unsaved.get(id))
            .or_else(|| self.saving.get(id))
            .cloned()
    }
}

impl SealBook {
    /// Checks the seals a peer sent that are not known here yet; those that hold become
    /// known (and are kept by the writer). One that does not hold is left out: the
    /// changes that refer to it are refused for it.
    pub(crate) fn admit(&self, seals: Vec<Seal>, keys: &mut KeyCache) {
        let new: Vec<Seal> = match self.0.lock() {
            Ok(book) => seals
                .into_iter()
                .filter(|s| book.find(&s.id()).is_none())
                .collect(),
            Err(_) => return,
        };
        if new.is_empty() {
            return;
        }
        let checked = authorship::verify_seals(new, keys);
        if let Ok(mut book) = self.0.lock() {
            for seal in checked {
                match seal {
                    Ok(seal) => {
                        let seal = Arc::new(seal);
                        book.unsaved.insert(seal.seal().id(), seal.clone());
                        book.remember(seal);
                    }
                    Err(why) => {
                        tracing::warn!(reason = %why, "a peer sent signatures that do not hold; the changes that refer to them are held")
                    }
                }
            }
        }
    }

    /// A seal this node made (kept in the table by the writer in the same commit).
    pub(crate) fn remember_own(&self, seal: Seal) {
        if let Ok(mut book) = self.0.lock() {
            book.remember(Arc::new(KnownSeal::trusted(seal)));
        }
    }

    /// The seals from peers still to be written to the table (they stay known here until
    /// the commit that writes them is done: [`SealBook::committed`]).
    pub(crate) fn take_unsaved(&self) -> Vec<Arc<KnownSeal>> {
        let Ok(mut book) = self.0.lock() else {
            return Vec::new();
        };
        let taken: Vec<(SealId, Arc<KnownSeal>)> = book.unsaved.drain().collect();
        book.saving.extend(taken.iter().cloned());
        taken.into_iter().map(|(_, s)| s).collect()
    }

    /// The writer's commit is done (`true`) or failed (`false`): the seals it was writing
    /// are in the table, or are to be written again.
    pub(crate) fn committed(&self, done: bool) {
        if let Ok(mut book) = self.0.lock() {
            let saving = std::mem::take(&mut book.saving);
            if !done {
                book.unsaved.extend(saving);
            }
        }
    }

    /// A seal known here: in memory, else read with `load` from the table.
    pub(crate) fn find(
        &self,
        id: &SealId,
        load: impl FnOnce(&SealId) -> Option<Seal>,
    ) -> Option<Arc<KnownSeal>> {
        if let Some(seal) = self.0.lock().ok()?.find(id) {
            return Some(seal);
        }
        let seal = Arc::new(KnownSeal::trusted(load(id)?));
        if let Ok(mut book) = self.0.lock() {
            book.remember(seal.clone());
        }
        Some(seal)
    }
}

/// The seals of a [`SealBook`], read from the table through `load` when not in memory.
pub(crate) struct Lookup<'a, F> {
    pub(crate) book: &'a SealBook,
    pub(crate) load: F,
}

impl<F: Fn(&SealId) -> Option<Seal> + Sync> SealLookup for Lookup<'_, F> {
    fn seal(&self, id: &SealId) -> Option<Arc<KnownSeal>> {
        self.book.find(id, &self.load)
    }
}

/// A seal as the table keeps it; `None` when absent or unreadable.
pub(crate) fn read_seal(
    table: &impl ReadableTable<[u8; 32], &'static [u8]>,
    id: &SealId,
) -> Option<Seal> {
    let value = table.get(id).ok()??;
    Seal::decode(value.value()).ok().map(|(seal, _)| seal)
}

/// Keeps seals in the table (a seal already there is left as it is).
pub(crate) fn store_seals<'s>(
    table: &mut Table<'_, [u8; 32], &'static [u8]>,
    seals: impl IntoIterator<Item = &'s Seal>,
) -> Result<()> {
    for seal in seals {
        if table.get(seal.id())?.is_none() {
            let mut bytes = Vec::with_capacity(100 + seal.hashes().len() * 32);
            seal.encode_into(&mut bytes);
            table.insert(seal.id(), bytes.as_slice())?;
        }
    }
    Ok(())
}

/// The seals this connection has sent already (a seal travels once per connection).
pub type SealsSent = HashSet<SealId>;

/// `sigs` as they are to go on a connection that has sent `sent`: the seals it carries
/// that went already are left out, and the seals its entries refer to that have not gone
/// are added (and counted as sent).
pub(crate) fn seals_once(
    sigs: Vec<u8>,
    sent: &mut SealsSent,
    find: impl Fn(&SealId) -> Option<Arc<KnownSeal>>,
) -> Vec<u8> {
    let Ok(decoded) = authorship::decode(&sigs) else {
        return sigs;
    };
    let needs_work = decoded.entries.iter().any(|e| match e.proof {
        Proof::Sealed(id) => !sent.contains(&id),
        _ => false,
    }) || decoded.seals.iter().any(|s| sent.contains(&s.id()));
    if !needs_work {
        sent.extend(decoded.seals.iter().map(Seal::id));
        return sigs;
    }
    let mut out = authorship::encode(&decoded.entries);
    for seal in &decoded.seals {
        if sent.insert(seal.id()) {
            authorship::encode_seal_into(seal, &mut out);
        }
    }
    attach_seals(&mut out, &decoded.entries, sent, find);
    out
}

/// Appends to `out` the seals that `entries` refer to and `sent` does not have (and
/// counts them as sent); a seal not known here is left out.
fn attach_seals(
    out: &mut Vec<u8>,
    entries: &[SignedChange],
    sent: &mut SealsSent,
    find: impl Fn(&SealId) -> Option<Arc<KnownSeal>>,
) {
    for entry in entries {
        if let Proof::Sealed(id) = entry.proof
            && !sent.contains(&id)
            && let Some(seal) = find(&id)
        {
            authorship::encode_seal_into(seal.seal(), out);
            sent.insert(id);
        }
    }
}

/// How a refusal for signatures begins.
pub(crate) const SIGNATURES_DO_NOT_HOLD: &str = "its signatures do not hold: ";

/// Keeps signatures (a change's first signature stays: an author's is never replaced).
/// For a document new here (`new`), nothing is kept yet and nothing is looked up.
pub(crate) fn store(
    table: &mut Table<'_, (u128, [u8; 32]), &'static [u8]>,
    id: &DocId,
    entries: &[SignedChange],
    new: bool,
) -> Result<()> {
    let key = doc_key(id);
    for entry in entries {
        if new || table.get((key, entry.hash))?.is_none() {
            table.insert((key, entry.hash), encode_value(entry).as_slice())?;
        }
    }
    Ok(())
}

/// A signature as kept: the signature, and the voucher's key for a vouch; or the id
/// of the seal.
fn encode_value(entry: &SignedChange) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    entry.proof.encode_into(&mut out);
    out
}

pub(crate) fn decode_value(hash: [u8; 32], value: &[u8]) -> Option<SignedChange> {
    let proof = match value.len() {
        32 => Proof::Sealed(value.try_into().ok()?),
        64 => Proof::Author(value.try_into().ok()?),
        96 => Proof::Vouch {
            sig: value[..64].try_into().ok()?,
            voucher: value[64..].try_into().ok()?,
        },
        _ => return None,
    };
    Some(SignedChange { hash, proof })
}

/// Every signature kept for a document.
pub(crate) fn of_doc(
    table: &impl ReadableTable<(u128, [u8; 32]), &'static [u8]>,
    id: &DocId,
) -> Result<Vec<SignedChange>> {
    let key = doc_key(id);
    let mut out = Vec::new();
    for entry in table.range((key, [0; 32])..=(key, [0xff; 32]))? {
        let (k, v) = entry?;
        if let Some(signed) = decode_value(k.value().1, v.value()) {
            out.push(signed);
        }
    }
    Ok(out)
}

/// The signatures to send with `bytes` of document `id`: those of the changes in them.
/// Changes with no signature here (stored before signatures existed) are vouched for by
/// this node when they name no device.
pub(crate) fn for_payload(
    table: &impl ReadableTable<(u128, [u8; 32]), &'static [u8]>,
    id: &DocId,
    bytes: &[u8],
    author: Option<&Author>,
    own: Vec<SignedChange>,
    sent: &mut SealsSent,
    find: &dyn Fn(&SealId) -> Option<Arc<KnownSeal>>,
) -> Result<Vec<u8>> {
    let whole = crate::prepare::is_document_chunk(bytes);
    let mut entries = if whole {
        let mut all = of_doc(table, id)?;
        all.extend(own);
        all
    } else {
        let key = doc_key(id);
        let mut out = Vec::new();
        for facts in facts_of_bytes(bytes).unwrap_or_default() {
            if let Some(value) = table.get((key, facts.hash))?
                && let Some(signed) = decode_value(facts.hash, value.value())
            {
                out.push(signed);
            } else if let Some(signed) = own.iter().find(|e| e.hash == facts.hash) {
                out.push(*signed);
            }
        }
        out
    };
    if let Some(author) = author
        && (!whole || entries.is_empty())
    {
        // (A document with signatures here has them for every change: see
        // `vouch_unsigned`.)
        let facts = facts_of_bytes(bytes).unwrap_or_default();
        vouch_missing(&mut entries, &facts, author);
    }
    let mut out = authorship::encode(&entries);
    attach_seals(&mut out, &entries, sent, find);
    Ok(out)
}

/// Adds this node's vouch for each change of `facts` that has no signature and names no
/// device.
pub(crate) fn vouch_missing(
    entries: &mut Vec<SignedChange>,
    facts: &[ChangeFacts],
    author: &Author,
) {
    let have: HashSet<[u8; 32]> = entries.iter().map(|e| e.hash).collect();
    for change in facts {
        if !have.contains(&change.hash) && actor_key(&change.actor).is_none() {
            entries.push(authorship::vouch(&author.key, change.hash));
        }
    }
}

/// Whether any signature is kept for a document.
pub(crate) fn any_for(
    table: &impl ReadableTable<(u128, [u8; 32]), &'static [u8]>,
    id: &DocId,
) -> Result<bool> {
    let key = doc_key(id);
    Ok(table
        .range((key, [0; 32])..=(key, [0xff; 32]))?
        .next()
        .is_some())
}

/// The vouches a document stored before signatures existed needs when it is first
/// written with them: one for every change it has that names no device, so that its
/// signatures here stay complete.
pub(crate) fn vouch_unsigned(doc: &Automerge, author: &Author) -> Vec<SignedChange> {
    let mut entries = Vec::new();
    vouch_missing(&mut entries, &authorship::facts_of_doc(doc, &[]), author);
    entries
}

/// This node's own signatures wait here, out of the commits, until there are
/// [`OWN_FLUSH`] of them or the writer is idle: a durable single write then writes no
/// more pages than before signatures. Losing them in a crash loses nothing: a signature
/// is deterministic, and at the next start the writer signs again every own change of
/// the documents written after the last flush (their feed positions are above the mark
/// kept in `info`).
#[derive(Default)]
pub(crate) struct OwnPending(Mutex<HashMap<DocId, Vec<SignedChange>>>);

/// Own signatures kept in memory at most before they are written.
pub(crate) const OWN_FLUSH: usize = 256;
/// Feed positions the mark may lag at most (what a restart may have to look at again).
pub(crate) const MARK_EVERY: u64 = 4096;
/// The `info` key of the feed position up to which own signatures are in the table.
const OWN_UPTO: &str = "own_sigs_upto";

impl OwnPending {
    pub(crate) fn add(&self, id: &DocId, entries: &[SignedChange]) {
        if entries.is_empty() {
            return;
        }
        if let Ok(mut map) = self.0.lock() {
            map.entry(*id).or_default().extend_from_slice(entries);
        }
    }

    pub(crate) fn has(&self, id: &DocId) -> bool {
        self.0.lock().map(|m| m.contains_key(id)).unwrap_or(false)
    }

    /// Everything waiting. Read it before opening the read transaction that reads the
    /// table: a flush writes the table before it empties this.
    pub(crate) fn all(&self) -> HashMap<DocId, Vec<SignedChange>> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.lock().map(|m| m.len()).unwrap_or(0)
    }

    fn snapshot(&self) -> Vec<(DocId, Vec<SignedChange>)> {
        self.0
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }

    fn clear(&self) {
        if let Ok(mut map) = self.0.lock() {
            map.clear();
        }
    }
}

impl Writer {
    /// Writes the own signatures waiting in memory, and the mark that they are written.
    pub(crate) fn flush_own_sigs(&mut self) -> Result<()> {
        let upto = self.next_seq.saturating_sub(1);
        if current(&self.author).is_none() {
            self.own_upto = upto;
            return Ok(());
        }
        self.save_own(&self.own_pending.snapshot(), &[], upto)?;
        self.own_pending.clear();
        Ok(())
    }

    /// Writes own signatures (and seals) and the mark that every one up to `upto` is
    /// written.
    fn save_own(
        &mut self,
        entries: &[(DocId, Vec<SignedChange>)],
        seals: &[Seal],
        upto: u64,
    ) -> Result<()> {
        let txn = self.db.get()?.begin_write()?;
        {
            let mut table = txn.open_table(SIGS)?;
            for (id, entries) in entries {
                store(&mut table, id, entries, false)?;
            }
            store_seals(&mut txn.open_table(SEALS)?, seals)?;
            let mut info = txn.open_table(INFO)?;
            info.insert(OWN_UPTO, upto.to_be_bytes().as_slice())?;
        }
        // Own signatures can be made again (`recover_own_sigs`): no need to sync them.
        self.commit(txn, true)?;
        self.own_upto = upto;
        Ok(())
    }

    /// At start, once the key is known: signs again the own changes whose signatures
    /// were still in memory when the node stopped.
    pub(crate) fn recover_own_sigs(&mut self, author: &Author) -> Result<()> {
        let upto = self.next_seq.saturating_sub(1);
        let mine = author.key.verifying_key().to_bytes();
        let mut missing = Vec::new();
        let mut audiences = HashMap::new();
        let mark = {
            let txn = self.db.get()?.begin_read()?;
            let info = txn.open_table(INFO)?;
            let mark = info
                .get(OWN_UPTO)?
                .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
                .map(u64::from_be_bytes);
            if let Some(mark) = mark.filter(|m| *m < upto) {
                let feed = txn.open_table(FEED)?;
                let sigs = txn.open_table(SIGS)?;
                for entry in feed.range(mark + 1..)? {
                    let id = crate::meta::key_doc(entry?.1.value());
                    let Some(meta) = crate::store::read_meta(&txn, &id)?.filter(|m| !m.held) else {
                        continue;
                    };
                    let Ok(doc) = crate::store::load_document(&txn, &id, &meta) else {
                        continue;
                    };
                    for change in authorship::facts_of_doc(&doc, &[]) {
                        if actor_key(&change.actor) == Some(mine)
                            && sigs.get((doc_key(&id), change.hash))?.is_none()
                        {
                            missing.push((id, ChangeHash(change.hash), true));
                        }
                    }
                }
                // Sealed by audience, as when they were written.
                audiences = crate::scope::audiences(
                    &txn.open_table(crate::tables::PLACES)?,
                    &txn.open_table(crate::tables::PATIENT_DOCS)?,
                    missing.iter().map(|c| &c.0),
                )?;
            }
            mark
        };
        if mark == Some(upto) {
            self.own_upto = upto;
            return Ok(());
        }
        let changes = missing.len();
        let (entries, seals) = author.sign_own(missing, |id| audiences.get(id).cloned());
        let entries: Vec<_> = entries.into_iter().collect();
        self.save_own(&entries, &seals, upto)?;
        if changes > 0 {
            tracing::info!(
                changes,
                "signed again this device's changes whose signatures were not saved before it stopped"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer_seal(n: u8) -> Seal {
        authorship::seal(&SigningKey::from_bytes(&[9; 32]), vec![[n; 32]]).0
    }

    #[test]
    fn a_seal_from_a_peer_stays_known_until_the_commit_that_keeps_it_is_done() {
        let book = SealBook::default();
        let mut keys = KeyCache::default();
        // Enough seals that the first has left the recent ones in memory.
        for n in 0..=SEALS_IN_MEMORY as u8 {
            book.admit(vec![peer_seal(n)], &mut keys);
        }
        let first = peer_seal(0).id();
        let not_in_table = |_: &SealId| None;
        assert!(
            book.find(&first, not_in_table).is_some(),
            "waiting to be written"
        );
        let taken = book.take_unsaved();
        assert_eq!(taken.len(), SEALS_IN_MEMORY + 1);
        assert!(
            book.find(&first, not_in_table).is_some(),
            "known while the commit that writes it runs"
        );
        book.committed(false);
        assert_eq!(
            book.take_unsaved().len(),
            SEALS_IN_MEMORY + 1,
            "a failed commit writes them again"
        );
        book.committed(true);
        assert!(book.take_unsaved().is_empty());
    }

    #[test]
    fn a_seal_whose_signature_does_not_hold_is_not_admitted() {
        let book = SealBook::default();
        let genuine = peer_seal(1);
        let mut bytes = Vec::new();
        authorship::encode_seal_into(&genuine, &mut bytes);
        bytes[40] ^= 1; // in the signature
        let forged = authorship::decode(&bytes).expect("decodes").seals;
        book.admit(forged, &mut KeyCache::default());
        assert!(book.find(&genuine.id(), |_| None).is_none());
        assert!(book.take_unsaved().is_empty());
    }
}
