//! Replication by clinic, in the store: where each document belongs
//! ([`medmesh_protocol::scope`] has the rules), the clinics of each patient, what of the
//! store a scope covers, documents refused or purged because they are outside this
//! device's scope.
//!
//! Kept beside the documents (written by the writer with each document):
//! - `places`: document → where it belongs, for documents not held by every device;
//! - `patient_docs`: (patient, document) → the clinic the document brings to its
//!   patient's clinics now, and the one it brought before its last change. The clinics
//!   of a patient are those its documents bring now. The clinic brought before lets the
//!   change that moves a patient (or a visit) away from a clinic still reach that
//!   clinic's devices, which then purge what left their scope.
//! - `purged`: patients removed here because they left this device's scope; what arrives
//!   for them is refused until something brings them back into scope.
//!
//! When a patient gains a clinic, every document of the patient moves to the head of the
//! feed, so that the devices of that clinic receive its whole history.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use medmesh_protocol::DocId;
use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::scope::{Belongs, Placement, Scope};
use redb::{ReadableDatabase, ReadableTable};
use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::meta::{DocMeta, doc_key, key_doc};
use crate::store::{Store, load_document, load_from_tables, read_meta};
use crate::tables::{PATIENT_DOCS, PLACES, PURGED};
use crate::write::PeerRecord;
use crate::write::PeerUpdate;
use crate::writer::{Tables, Writer, index_entries};
use automerge::{ChangeHash, ReadDoc};
use medmesh_protocol::wire::{FeedItem, WantChanges, split_heads};

/// The `info` key that says every document of the store is placed.
pub(crate) const PLACED_MARK: &str = "places";

/// The scope this store holds (shared by the writer, which alone changes it, and readers).
pub(crate) type ScopeCell = std::sync::RwLock<Scope>;

/// What one purge did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PurgeReport {
    /// Documents removed (outside this device's scope, held by a device that serves them).
    pub purged: u64,
    /// Per collection.
    pub by_collection: BTreeMap<String, u64>,
    /// Documents outside the scope kept for now: no device that serves their clinic has
    /// confirmed it holds their latest version yet.
    pub kept: u64,
}

fn encode_place(belongs: &Belongs) -> Option<Vec<u8>> {
    match belongs {
        Belongs::All => None,
        Belongs::Clinic(clinic) => {
            let mut out = vec![b'c'];
            out.extend_from_slice(clinic.as_bytes());
            Some(out)
        }
        Belongs::Patient(patient) => {
            let mut out = vec![b'p'];
            out.extend_from_slice(patient.as_bytes());
            Some(out)
        }
    }
}

/// Where a document belongs; `None` when it is not known (a document held here as it
/// arrived, which could not be read).
fn decode_place(bytes: &[u8]) -> Option<Belongs> {
    match bytes.split_first() {
        Some((b'c', clinic)) => Some(Belongs::Clinic(
            String::from_utf8_lossy(clinic).into_owned(),
        )),
        Some((b'p', id)) => DocId::from_slice(id).map(Belongs::Patient),
        _ => None,
    }
}

/// Marks a document held here (as it arrived, unreadable) as belonging to no known place:
/// only devices that serve every clinic send, receive and compare it.
pub(crate) fn mark_unknown(tables: &mut Tables<'_>, id: &DocId) -> Result<()> {
    tables.places.insert(doc_key(id), b"?".as_slice())?;
    Ok(())
}

/// For each document, who receives it now, as a key: documents of one key go to the
/// same devices (every device, one clinic's, those of a patient's clinics), so that a
/// seal over their changes reaches no device without them.
pub(crate) fn audiences<'d>(
    places: &impl ReadableTable<u128, &'static [u8]>,
    patient_docs: &impl ReadableTable<(u128, u128), &'static [u8]>,
    ids: impl Iterator<Item = &'d DocId>,
) -> Result<HashMap<DocId, Vec<u8>>> {
    let mut out = HashMap::new();
    let mut patients: HashMap<u128, Vec<u8>> = HashMap::new();
    for id in ids {
        if out.contains_key(id) {
            continue;
        }
        let place = places.get(doc_key(id))?.map(|v| v.value().to_vec());
        let key = match place.as_deref().and_then(decode_place) {
            Some(Belongs::Patient(patient)) => {
                let p = doc_key(&patient);
                if let Some(key) = patients.get(&p) {
                    key.clone()
                } else {
                    let mut key = vec![b'p'];
                    for clinic in patient_clinics(patient_docs, p)? {
                        key.extend_from_slice(clinic.as_bytes());
                        key.push(0);
                    }
                    patients.insert(p, key.clone());
                    key
                }
            }
            _ => place.unwrap_or_default(),
        };
        out.insert(*id, key);
    }
    Ok(out)
}

/// `brings \0 brought-before` (either may be empty).
fn encode_entry(brings: Option<&str>, before: Option<&str>) -> Vec<u8> {
    let mut out = brings.unwrap_or_default().as_bytes().to_vec();
    out.push(0);
    out.extend_from_slice(before.unwrap_or_default().as_bytes());
    out
}

fn decode_entry(bytes: &[u8]) -> (Option<String>, Option<String>) {
    let text = |b: &[u8]| (!b.is_empty()).then(|| String::from_utf8_lossy(b).into_owned());
    match bytes.iter().position(|b| *b == 0) {
        Some(at) => (text(&bytes[..at]), text(&bytes[at + 1..])),
        None => (text(bytes), None),
    }
}

fn patient_range(patient: u128) -> std::ops::RangeInclusive<(u128, u128)> {
    (patient, 0)..=(patient, u128::MAX)
}

/// The clinics a patient's documents bring now.
fn patient_clinics(
    table: &impl ReadableTable<(u128, u128), &'static [u8]>,
    patient: u128,
) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for entry in table.range(patient_range(patient))? {
        let (_, value) = entry?;
        if let (Some(clinic), _) = decode_entry(value.value()) {
            out.insert(clinic);
        }
    }
    Ok(out)
}

/// What of a store a scope covers, read in one transaction (patients' answers memoized).
pub(crate) struct Reach<'s, P, D> {
    places: &'s P,
    patients: &'s D,
    scope: &'s Scope,
    memo: HashMap<u128, bool>,
}

impl<'s, P, D> Reach<'s, P, D>
where
    P: ReadableTable<u128, &'static [u8]>,
    D: ReadableTable<(u128, u128), &'static [u8]>,
{
    pub(crate) fn new(places: &'s P, patients: &'s D, scope: &'s Scope) -> Self {
        Self {
            places,
            patients,
            scope,
            memo: HashMap::new(),
        }
    }

    fn patient_in_scope(&mut self, patient: u128) -> Result<bool> {
        if let Some(known) = self.memo.get(&patient) {
            return Ok(*known);
        }
        let clinics = patient_clinics(self.patients, patient)?;
        let served = self.scope.serves_any(clinics.iter().map(String::as_str));
        self.memo.insert(patient, served);
        Ok(served)
    }

    /// Whether the scope holds the document now.
    pub(crate) fn holds(&mut self, id: &DocId) -> Result<bool> {
        if self.scope.is_all() {
            return Ok(true);
        }
        let place = match self.places.get(doc_key(id))? {
            Some(bytes) => decode_place(bytes.value()),
            None => return Ok(true),
        };
        match place {
            None => Ok(false),
            Some(Belongs::All) => Ok(true),
            Some(Belongs::Clinic(clinic)) => Ok(self.scope.serves(&clinic)),
            Some(Belongs::Patient(patient)) => self.patient_in_scope(doc_key(&patient)),
        }
    }

    /// Whether the document is to be sent to a device of the scope: held by it now, or
    /// moved away from one of its clinics by its latest change (so that the device learns
    /// that it left).
    pub(crate) fn sends(&mut self, id: &DocId) -> Result<bool> {
        if self.holds(id)? {
            return Ok(true);
        }
        let Some(Some(Belongs::Patient(patient))) = self
            .places
            .get(doc_key(id))?
            .map(|b| decode_place(b.value()))
        else {
            return Ok(false);
        };
        Ok(match self.patients.get((doc_key(&patient), doc_key(id)))? {
            Some(bytes) => decode_entry(bytes.value())
                .1
                .is_some_and(|before| self.scope.serves(&before)),
            None => false,
        })
    }
}

impl Store {
    /// The scope this store holds (its device's clinics).
    pub fn scope(&self) -> Scope {
        self.inner
            .scope
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Opens a [`Reach`] of `scope` over a read transaction and runs `f` with it.
    pub(crate) fn with_reach<T>(
        &self,
        txn: &redb::ReadTransaction,
        scope: &Scope,
        f: impl FnOnce(
            &mut Reach<
                '_,
                redb::ReadOnlyTable<u128, &'static [u8]>,
                redb::ReadOnlyTable<(u128, u128), &'static [u8]>,
            >,
        ) -> Result<T>,
    ) -> Result<T> {
        let places = txn.open_table(PLACES)?;
        let patients = txn.open_table(PATIENT_DOCS)?;
        let mut reach = Reach::new(&places, &patients, scope);
        f(&mut reach)
    }

    /// [`Store::check_docs`] for a page of `peer`, a device of `scope`. It also offers the
    /// peer again ([`PeerUpdate::Offer`]) the documents it lists at older versions that,
    /// by what this store knows, left its clinics since: a device that missed the change
    /// moving a patient away would otherwise keep the old version, which no summary of
    /// the clinics both serve shows and no feed brings.
    pub fn check_docs_from(
        &self,
        peer: &str,
        entries: &[FeedItem],
        scope: &Scope,
    ) -> Result<(Vec<DocId>, Vec<WantChanges>)> {
        let checked = self.check_docs(entries)?;
        let Some(clinic) = scope.clinics().and_then(|c| c.iter().next()).cloned() else {
            return Ok(checked);
        };
        let ids = self.left_scope(entries, scope)?;
        if !ids.is_empty() {
            tracing::debug!(
                peer,
                documents = ids.len(),
                "a peer holds old versions of records that left its clinics; announcing them again"
            );
            self.update_peer_blocking(peer, PeerUpdate::Offer { ids, clinic })?;
        }
        Ok(checked)
    }

    /// Which of a peer's entries it holds at versions older than this store's (every
    /// change of theirs is here), for documents a device of `scope` does not hold.
    fn left_scope(&self, entries: &[FeedItem], scope: &Scope) -> Result<Vec<DocId>> {
        let txn = self.read_txn()?;
        let mut behind = Vec::new();
        for entry in entries {
            let Some(meta) = read_meta(&txn, &entry.id)?.filter(|m| !m.held) else {
                continue;
            };
            let theirs = split_heads(&entry.heads).unwrap_or_default();
            if !theirs.is_empty() && theirs != meta.heads {
                behind.push((entry.id, theirs, meta));
            }
        }
        if behind.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        self.with_reach(&txn, scope, |reach| {
            for (id, theirs, meta) in behind {
                // (Even one marked as sent to it: the feed did not bring it, or the
                // peer could not merge what came.)
                if reach.holds(&id)? {
                    continue;
                }
                let theirs: Vec<ChangeHash> = theirs.into_iter().map(ChangeHash).collect();
                if load_document(&txn, &id, &meta)
                    .is_ok_and(|doc| doc.get_missing_deps(&theirs).is_empty())
                {
                    out.push(id);
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Whether a device of `scope` holds the document (by what this store knows).
    pub fn in_scope(&self, id: &DocId, scope: &Scope) -> Result<bool> {
        let txn = self.read_txn()?;
        self.with_reach(&txn, scope, |reach| reach.holds(id))
    }

    /// The clinics a patient belongs to, as this store knows them (its primary clinic
    /// and the clinics of its visits and appointments).
    pub fn clinics_of_patient(&self, patient: &DocId) -> Result<BTreeSet<String>> {
        let txn = self.read_txn()?;
        let table = txn.open_table(PATIENT_DOCS)?;
        patient_clinics(&table, doc_key(patient))
    }

    /// Holds the scope `scope` from now on. Widening forgets the patients purged here
    /// (they may be in scope now); what a narrower scope leaves out is removed by
    /// [`Store::purge_blocking`].
    pub fn set_scope_blocking(&self, scope: Scope) -> Result<()> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(crate::writer::Command::SetScope { scope, reply })?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// Removes the documents outside this device's scope that a device serving their
    /// clinic has confirmed it holds (per peer: its scope and how far it acknowledged
    /// this store's feed, [`crate::PeerUpdate::Acked`]); keeps the others for now.
    /// Nothing removed is sent to peers as a deletion.
    pub fn purge_blocking(&self) -> Result<PurgeReport> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(crate::writer::Command::Purge { reply })?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)?
    }
}

impl Writer {
    fn own_scope(&self) -> Scope {
        self.scope
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Keeps where a stored document belongs: `old` its record before this write (`None`
    /// for a new document), `new` its record now. A patient that gains a clinic is
    /// queued to move to the head of the feed.
    pub(crate) fn place(
        &mut self,
        tables: &mut Tables<'_>,
        id: &DocId,
        collection: &str,
        old: Option<&Fields>,
        new: &Fields,
    ) -> Result<()> {
        let before = old.map(|r| Placement::of(collection, id, r));
        let after = Placement::of(collection, id, new);
        if before.as_ref() == Some(&after) {
            return Ok(());
        }
        let key = doc_key(id);
        if before.as_ref().map(|b| &b.belongs) != Some(&after.belongs) {
            if let Some(Belongs::Patient(p)) = before.as_ref().map(|b| &b.belongs) {
                tables.patient_docs.remove((doc_key(p), key))?;
            }
            match encode_place(&after.belongs) {
                Some(bytes) => {
                    tables.places.insert(key, bytes.as_slice())?;
                }
                None => {
                    tables.places.remove(key)?;
                }
            }
        }
        if let Belongs::Patient(patient) = &after.belongs {
            let p = doc_key(patient);
            let brought = tables
                .patient_docs
                .get((p, key))?
                .map(|v| decode_entry(v.value()));
            let gains = match &after.brings {
                Some(clinic) if brought.as_ref().and_then(|b| b.0.as_ref()) != Some(clinic) => {
                    !patient_clinics(&tables.patient_docs, p)?.contains(clinic)
                }
                _ => false,
            };
            let earlier = match &brought {
                Some((now, earlier)) if *now != after.brings => now.clone(),
                Some((_, earlier)) => earlier.clone(),
                None => None,
            };
            tables.patient_docs.insert(
                (p, key),
                encode_entry(after.brings.as_deref(), earlier.as_deref()).as_slice(),
            )?;
            tables.purged.remove(p)?;
            if gains {
                self.refeed.insert(*patient);
            }
        }
        Ok(())
    }

    /// Whether a document a peer sent, new here, is to be refused: it is outside this
    /// device's scope by what this store knows (a record of a patient not known here
    /// follows its patient, and is kept).
    pub(crate) fn refuses(
        &self,
        tables: &Tables<'_>,
        collection: &str,
        id: &DocId,
        record: &Fields,
    ) -> Result<bool> {
        let scope = self.own_scope();
        if scope.is_all() {
            return Ok(false);
        }
        let place = Placement::of(collection, id, record);
        match &place.belongs {
            Belongs::All => Ok(false),
            Belongs::Clinic(clinic) => Ok(!scope.serves(clinic)),
            Belongs::Patient(patient) => {
                if place.brings.as_deref().is_some_and(|c| scope.serves(c)) {
                    return Ok(false);
                }
                let p = doc_key(patient);
                // The patient itself is decided by its clinics; a record of a patient
                // not known here follows it when it comes.
                let known = patient == id || tables.patient_docs.get((p, p))?.is_some();
                let purged = tables.purged.get(p)?.is_some();
                if !known && !purged {
                    return Ok(false);
                }
                let clinics = patient_clinics(&tables.patient_docs, p)?;
                Ok(!scope.serves_any(clinics.iter().map(String::as_str)))
            }
        }
    }

    /// [`Writer::refuses`] for a document new here that the current batch merged: when
    /// refused, it is dropped from the batch.
    pub(crate) fn refuses_new(
        &mut self,
        tables: &mut Tables<'_>,
        batch: &mut crate::working::Staged,
        collection: &str,
        id: &DocId,
    ) -> Result<bool> {
        if self.own_scope().is_all() {
            return Ok(false);
        }
        let Some(working) = batch.docs.get_mut(id) else {
            return Ok(false);
        };
        let record = match &working.record {
            Some(record) => record.clone(),
            None => record::read_record(working.doc_mut(id)?),
        };
        if !self.refuses(tables, collection, id, &record)? {
            return Ok(false);
        }
        if let Belongs::Patient(patient) = Placement::of(collection, id, &record).belongs
            && patient == *id
        {
            // Known now not to be this device's: its records are refused too.
            tables.purged.insert(doc_key(id), ())?;
        }
        batch.docs.remove(id);
        batch.order.retain(|d| d != id);
        tracing::debug!(doc = %id, collection, "a peer sent a record outside this device's clinics; it is not kept");
        Ok(true)
    }

    /// Moves every document of the patients that gained a clinic in this transaction to
    /// the head of the feed (the patient first), except those stored in it already.
    /// Answers whether anything moved.
    pub(crate) fn refeed(&mut self, tables: &mut Tables<'_>, first_seq: u64) -> Result<bool> {
        let mut moved = false;
        let mut groups: Vec<Vec<u128>> = std::mem::take(&mut self.refeed_docs)
            .iter()
            .map(|id| vec![doc_key(id)])
            .collect();
        for patient in std::mem::take(&mut self.refeed) {
            let p = doc_key(&patient);
            let mut ids = vec![p];
            for entry in tables.patient_docs.range(patient_range(p))? {
                let (key, _) = entry?;
                let doc = key.value().1;
                if doc != p {
                    ids.push(doc);
                }
            }
            groups.push(ids);
        }
        for ids in groups {
            for key in ids {
                let id = key_doc(key);
                let Some(mut meta) = tables.meta_of(&id)? else {
                    continue;
                };
                if meta.seq >= first_seq {
                    continue;
                }
                tables.feed.remove(meta.seq)?;
                meta.seq = self.next_seq;
                self.next_seq += 1;
                tables.feed.insert(meta.seq, key)?;
                tables.meta.insert(key, meta.encode().as_slice())?;
                moved = true;
            }
        }
        Ok(moved)
    }

    /// [`PeerUpdate::Offer`]: marks each patient's document as having left `clinic` and
    /// queues it to move to the head of the feed, so that the feed brings it to the
    /// devices of `clinic` that still hold an older version.
    pub(crate) fn offer(
        &mut self,
        tables: &mut Tables<'_>,
        ids: &[DocId],
        clinic: &str,
    ) -> Result<()> {
        for id in ids {
            let key = doc_key(id);
            let place = tables
                .places
                .get(key)?
                .and_then(|v| decode_place(v.value()));
            let Some(Belongs::Patient(patient)) = place else {
                continue;
            };
            let p = doc_key(&patient);
            let Some((brings, _)) = tables
                .patient_docs
                .get((p, key))?
                .map(|v| decode_entry(v.value()))
            else {
                continue;
            };
            if brings.as_deref() == Some(clinic) {
                continue;
            }
            tables.patient_docs.insert(
                (p, key),
                encode_entry(brings.as_deref(), Some(clinic)).as_slice(),
            )?;
            self.refeed_docs.insert(*id);
            // Announced even to a peer whose neighbour it came from: that neighbour may
            // not send it (it may not know that the peer ever held it).
            if let Ok(mut origins) = self.origins.lock() {
                origins.pop(id);
            }
        }
        Ok(())
    }

    /// [`Store::set_scope_blocking`].
    pub(crate) fn set_scope(&mut self, scope: Scope) -> Result<()> {
        let widened = !scope.within(&self.own_scope());
        if widened {
            let txn = self.db.get()?.begin_write()?;
            {
                let mut purged = txn.open_table(PURGED)?;
                purged.retain(|_, _| false)?;
            }
            self.commit(txn, false)?;
        }
        match self.scope.write() {
            Ok(mut cell) => *cell = scope,
            Err(poisoned) => *poisoned.into_inner() = scope,
        }
        self.summary_generation.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// [`Store::purge_blocking`].
    pub(crate) fn purge(&mut self) -> Result<PurgeReport> {
        let scope = self.own_scope();
        let mut report = PurgeReport::default();
        if scope.is_all() {
            return Ok(report);
        }
        let epoch = self.feed_epoch.clone();
        let txn = self.db.get()?.begin_write()?;
        {
            let mut tables = Tables::open(&txn)?;
            // Devices that confirmed this store's feed up to a position, with their scope.
            let mut confirmed: Vec<(Scope, u64)> = Vec::new();
            for entry in tables.peers.iter()? {
                let (_, value) = entry?;
                if let Ok(peer) = serde_json::from_slice::<PeerRecord>(value.value())
                    && peer.acked_epoch.as_deref() == Some(epoch.as_str())
                    && let Some(clinics) = &peer.clinics
                {
                    confirmed.push((Scope::of_clinics(clinics), peer.acked_seq));
                }
            }
            let mut candidates = Vec::new();
            {
                let mut mine = Reach::new(&tables.places, &tables.patient_docs, &scope);
                for entry in tables.places.iter()? {
                    let (key, _) = entry?;
                    let id = key_doc(key.value());
                    if !mine.holds(&id)? {
                        candidates.push(id);
                    }
                }
            }
            let mut safe = Vec::new();
            {
                let mut theirs: Vec<_> = confirmed
                    .iter()
                    .map(|(s, upto)| (Reach::new(&tables.places, &tables.patient_docs, s), *upto))
                    .collect();
                for id in candidates {
                    let Some(meta) = tables.meta_of(&id)? else {
                        continue;
                    };
                    let mut held_elsewhere = false;
                    for (reach, upto) in theirs.iter_mut() {
                        if *upto >= meta.seq && reach.holds(&id)? {
                            held_elsewhere = true;
                            break;
                        }
                    }
                    if held_elsewhere && !meta.held {
                        safe.push((id, meta));
                    } else {
                        report.kept += 1;
                    }
                }
            }
            let schema = self.current_schema();
            for (id, meta) in safe {
                self.remove_document(&mut tables, &id, &meta, &schema)?;
                report.purged += 1;
                *report
                    .by_collection
                    .entry(meta.collection.clone())
                    .or_insert(0) += 1;
            }
        }
        if report.purged > 0 {
            self.commit(txn, false)?;
            self.summary_generation.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                purged = report.purged,
                kept = report.kept,
                "records outside this device's clinics were removed from it (the devices of their clinics hold them)"
            );
        }
        Ok(report)
    }

    /// Removes a document and everything kept beside it, as if it had never come here.
    fn remove_document(
        &mut self,
        tables: &mut Tables<'_>,
        id: &DocId,
        meta: &DocMeta,
        schema: &medmesh_protocol::Schema,
    ) -> Result<()> {
        let key = doc_key(id);
        let record = load_from_tables(&tables.docs, &tables.chunks, id, &meta.collection)
            .map(|doc| record::read_record(&doc))
            .unwrap_or_default();
        for entry in index_entries(
            &meta.collection,
            schema.collection(&meta.collection),
            id,
            &record,
        ) {
            tables.index.remove(entry.as_slice())?;
        }
        if !meta.deleted {
            tables.count_removed(&meta.collection)?;
        }
        tables.docs.remove(key)?;
        tables
            .chunks
            .retain_in((key, 0)..=(key, u32::MAX), |_, _| false)?;
        tables.meta.remove(key)?;
        tables.feed.remove(meta.seq)?;
        tables
            .sigs
            .retain_in((key, [0; 32])..=(key, [u8::MAX; 32]), |_, _| false)?;
        tables.held.remove(key)?;
        if let Some(bytes) = tables.places.remove(key)?
            && let Some(Belongs::Patient(patient)) = decode_place(bytes.value())
        {
            let p = doc_key(&patient);
            tables.patient_docs.remove((p, key))?;
            tables.purged.insert(p, ())?;
        }
        self.cache.pop(id);
        self.to_compact.remove(id);
        Ok(())
    }

    /// Fills `places` and `patient_docs` for the documents of a store made before they
    /// existed (once; marked in `info`).
    pub(crate) fn place_existing(&mut self) -> Result<()> {
        const MARK: &str = PLACED_MARK;
        {
            let txn = self.db.get()?.begin_read()?;
            if txn.open_table(crate::tables::INFO)?.get(MARK)?.is_some() {
                return Ok(());
            }
        }
        let txn = self.db.get()?.begin_write()?;
        {
            let mut tables = Tables::open(&txn)?;
            let mut docs = Vec::new();
            for entry in tables.meta.iter()? {
                let (key, value) = entry?;
                if let Some(meta) = DocMeta::decode(value.value())
                    && !meta.held
                {
                    docs.push((key_doc(key.value()), meta.collection));
                }
            }
            for (id, collection) in docs {
                let Ok(doc) = load_from_tables(&tables.docs, &tables.chunks, &id, &collection)
                else {
                    continue;
                };
                let record = record::read_record(&doc);
                self.place(&mut tables, &id, &collection, None, &record)?;
            }
            // Nothing needs to move in the feed of a store that had no scopes.
            self.refeed.clear();
            tables.info.insert(MARK, b"1".as_slice())?;
        }
        self.commit(txn, false)
    }
}
