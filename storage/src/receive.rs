//! The writer's side of receiving: merging documents from peers (or holding them), the
//! retry of held documents, and the schema that follows the mesh's schema document.

use std::collections::BTreeSet;
use std::sync::Arc;

use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::schema::{declarations_in_record, schema_doc_id};
use medmesh_protocol::{DocId, Schema};
use redb::ReadableDatabase;
use redb::ReadableTable;
use serde_bytes::ByteBuf;
use tokio::sync::oneshot;

use crate::error::{Result, StoreError};
use crate::held::{HeldDoc, MAX_HELD_BYTES, MAX_HELD_PAYLOADS};
use crate::merge::{acceptable_collection, check_record, escape, load_received, merge_into};
use crate::meta::{DocMeta, doc_key, index_prefix, key_doc};
use crate::prepare::{Prepared, PreparedCreate};
use crate::store::load_from_tables;
use crate::tables::HELD;
use crate::working::Staged;
use crate::write::{Received, WriteBatch, WriteKind, WriteOp, WriteOutcome};
use crate::writer::{Command, Tables, Writer, index_entries};
use medmesh_protocol::authorship::{self, SignedChange};

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// What is known about a document that is being received.
struct Arrival {
    id: DocId,
    collection: String,
    /// The bytes just received (none when retrying what is held).
    fresh: Option<Vec<u8>>,
    heads: Vec<[u8; 32]>,
    from: Option<String>,
    /// The signatures that came with `fresh`, as they came.
    sigs: Vec<u8>,
}

impl Writer {
    /// Merges a received document (or, with no bytes, retries what is held of it);
    /// holds it, with the reason, when it cannot be merged.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply_merge(
        &mut self,
        tables: &mut Tables<'_>,
        staged: &mut Staged,
        batch: &mut Staged,
        collection: String,
        id: Option<DocId>,
        received: Received,
        prepared: Option<Prepared>,
    ) -> Result<WriteOutcome> {
        let id = id.ok_or_else(|| StoreError::BadQuery("a merge needs the record's id".into()))?;
        if !acceptable_collection(&collection) {
            return Err(StoreError::BadQuery(format!(
                "record {id} names a collection that is not valid ({})",
                escape(&collection)
            )));
        }
        let Received {
            bytes,
            heads,
            from,
            tentative,
            sigs,
        } = received;
        if let Some(from) = &from
            && !heads.is_empty()
        {
            self.arrivals.push((id, heads.clone(), from.clone()));
        }
        let (prepared, checked) = match prepared {
            Some(Prepared::Received(result)) => (Some(result), None),
            Some(Prepared::Checked(result)) => (None, Some(result)),
            _ => (None, None),
        };
        // Whole documents may have been loaded (and their bytes taken) off the writer.
        let (fresh, loaded, early_refusal) = match prepared {
            Some(Ok(p)) => (Some(p.raw.clone()), Some(p), None),
            Some(Err((bytes, reason))) => (Some(bytes), None, Some(reason)),
            None => ((!bytes.is_empty()).then_some(bytes), None, None),
        };
        // Every change that arrived must be signed by the device that made it.
        let signed = match (&loaded, checked, &fresh) {
            (Some(p), _, _) => p.sigs.clone(),
            (None, Some(checked), _) => checked,
            (None, None, Some(bytes)) => self.check_sigs(tables, bytes, &sigs),
            (None, None, None) => Ok(Vec::new()),
        };
        let arrival = Arrival {
            id,
            collection,
            fresh,
            heads,
            from,
            sigs,
        };
        let kept = match signed {
            Ok(kept) => kept,
            Err(reason) => {
                return self.refuse_unsigned(tables, staged, batch, arrival, tentative, reason);
            }
        };
        let new_here = !batch.docs.contains_key(&id) && tables.meta_of(&id)?.is_none();
        let collection = arrival.collection.clone();
        let result = self.merge_signed(
            tables,
            staged,
            batch,
            arrival,
            tentative,
            loaded,
            early_refusal,
        );
        if new_here
            && let Ok(outcome) = &result
            && outcome.held.is_none()
            && self.refuses_new(tables, batch, &collection, &id)?
        {
            // Outside this device's clinics: not kept, and acknowledged like a copy.
            return Ok(WriteOutcome {
                id,
                record: Fields::new(),
                changed: false,
                seq: 0,
                held: None,
            });
        }
        if let Ok(outcome) = &result
            && outcome.held.is_none()
        {
            batch.sign(&id, kept);
        }
        result
    }

    /// The signatures of `bytes` from a peer: checked when this store has an authority,
    /// else taken as they came.
    fn check_sigs(
        &mut self,
        tables: &mut Tables<'_>,
        bytes: &[u8],
        sigs: &[u8],
    ) -> std::result::Result<Vec<SignedChange>, String> {
        let decoded = match (&self.authority, crate::signing::decode(sigs)) {
            (_, Ok(decoded)) => decoded,
            (None, Err(_)) => return Ok(Vec::new()),
            (Some(_), Err(why)) => return Err(why),
        };
        if !decoded.seals.is_empty() {
            // Kept in this same commit, with what refers to them.
            self.seals.admit(decoded.seals, &mut self.keys);
            let unsaved = self.seals.take_unsaved();
            crate::signing::store_seals(&mut tables.seals, unsaved.iter().map(|s| s.seal()))
                .map_err(|e| format!("its signatures could not be kept here: {e}"))?;
            self.retry_due |= !unsaved.is_empty();
        }
        match &self.authority {
            None => Ok(decoded.entries),
            Some(authority) => {
                let seals = crate::signing::Lookup {
                    book: &self.seals,
                    load: |id: &authorship::SealId| crate::signing::read_seal(&tables.seals, id),
                };
                crate::signing::verify_bytes(
                    bytes,
                    &decoded.entries,
                    &seals,
                    authority.as_ref(),
                    &mut self.keys,
                )
            }
        }
    }

    /// What arrived carries a change not signed by the device that made it (or by a
    /// device refused here): held with the reason, unless it brings nothing new.
    fn refuse_unsigned(
        &mut self,
        tables: &mut Tables<'_>,
        staged: &mut Staged,
        batch: &mut Staged,
        arrival: Arrival,
        tentative: bool,
        reason: String,
    ) -> Result<WriteOutcome> {
        let id = arrival.id;
        let meta = tables.meta_of(&id)?;
        let unchanged = WriteOutcome {
            id,
            record: Fields::new(),
            changed: false,
            seq: meta.as_ref().map_or(0, |m| m.seq),
            held: None,
        };
        if tentative {
            // Dropped: the announcement is checked and the document asked for as usual.
            return Ok(unchanged);
        }
        let exists = meta.as_ref().is_some_and(|m| !m.held);
        if exists
            && !arrival.heads.is_empty()
            && self.load_working(tables, staged, batch, &id)?
            && let Some(working) = batch.docs.get_mut(&id)
            && has_every(working.doc_mut(&id)?, &arrival.heads)
        {
            tracing::debug!(doc = %id, reason = %escape(&reason), "badly signed bytes from a peer brought nothing new; the document already has them");
            return Ok(unchanged);
        }
        let held = match tables.held.get(doc_key(&id))? {
            Some(bytes) => HeldDoc::decode(bytes.value()),
            None => None,
        };
        self.hold(tables, arrival, held, meta, reason)
    }

    /// [`Writer::apply_merge`] once what arrived is known to be signed.
    #[allow(clippy::too_many_arguments)]
    fn merge_signed(
        &mut self,
        tables: &mut Tables<'_>,
        staged: &mut Staged,
        batch: &mut Staged,
        arrival: Arrival,
        tentative: bool,
        loaded: Option<PreparedCreate>,
        early_refusal: Option<String>,
    ) -> Result<WriteOutcome> {
        let id = arrival.id;
        let key = doc_key(&id);
        if tentative {
            return self.merge_tentative(
                tables,
                staged,
                batch,
                arrival,
                loaded,
                early_refusal.is_some(),
            );
        }
        let mut held = match tables.held.get(key)? {
            Some(bytes) => HeldDoc::decode(bytes.value()),
            None => None,
        };
        let meta = tables.meta_of(&id)?;
        let mut set_aside = None;
        if let Some(entry) = &held {
            match self.check_sigs(tables, &entry.joined(), &entry.sigs) {
                Ok(kept) => batch.sign(&id, kept),
                Err(reason) if arrival.fresh.is_none() => {
                    return self.hold(tables, arrival, held, meta, reason);
                }
                // What is held stays held (and shown) unless what arrived makes it
                // unneeded; what arrived is merged alone.
                Err(_) => set_aside = held.take(),
            }
        }
        if arrival.fresh.is_none() && held.is_none() {
            // Nothing to merge and nothing held (a retry of something resolved since).
            return Ok(WriteOutcome {
                id,
                record: Fields::new(),
                changed: false,
                seq: meta.map_or(0, |m| m.seq),
                held: None,
            });
        }
        let known_as = meta
            .as_ref()
            .map(|m| m.collection.clone())
            .or_else(|| held.as_ref().map(|h| h.collection.clone()));
        if let Some(known_as) = known_as.filter(|c| *c != arrival.collection) {
            let reason = format!(
                "it arrived as a record of `{}`, but record {id} is a record of `{known_as}` here",
                arrival.collection
            );
            return self.hold(tables, arrival, held, meta, reason);
        }
        let exists = meta.as_ref().is_some_and(|m| !m.held);
        if let Some(reason) = early_refusal
            && !exists
        {
            // (For a document stored here, the merge below says whether the refused
            // bytes bring anything it lacks.)
            return self.hold(tables, arrival, held, meta, reason);
        }
        if self.poisoned.contains(&id) {
            let reason = "merging it made Automerge fail before; it is kept aside".to_owned();
            return self.hold(tables, arrival, held, meta, reason);
        }
        let result = if exists {
            self.merge_existing(tables, staged, batch, arrival, held, meta)
        } else {
            self.merge_new(tables, batch, arrival, held, meta, loaded)
        };
        if let (Some(entry), Ok(outcome)) = (&set_aside, &result)
            && outcome.held.is_none()
            && let Some(working) = batch.docs.get_mut(&id)
            && superseded(working.doc_mut(&id)?, entry)
        {
            // The document now has every change the held copy announced.
            tables.held.remove(key)?;
            tracing::info!(doc = %id, "a good copy of a held document arrived; it is no longer held");
        }
        result
    }

    /// Merges bytes sent ahead of a request: applied if they can be, else dropped (the
    /// announcement they came with is checked next, and what is missing asked for).
    fn merge_tentative(
        &mut self,
        tables: &mut Tables<'_>,
        staged: &mut Staged,
        batch: &mut Staged,
        arrival: Arrival,
        loaded: Option<PreparedCreate>,
        early_refused: bool,
    ) -> Result<WriteOutcome> {
        let id = arrival.id;
        let unchanged = WriteOutcome {
            id,
            record: Fields::new(),
            changed: false,
            seq: 0,
            held: None,
        };
        let Some(bytes) = arrival.fresh else {
            return Ok(unchanged);
        };
        let meta = tables.meta_of(&id)?;
        if meta
            .as_ref()
            .is_some_and(|m| m.held || m.collection != arrival.collection)
            || self.poisoned.contains(&id)
            || tables.held.get(doc_key(&id))?.is_some()
        {
            return Ok(unchanged);
        }
        if meta.is_none() {
            if let Some(p) = loaded {
                // Loaded and checked off the writer (a whole document).
                return Ok(batch.add_new(
                    id,
                    arrival.collection,
                    None,
                    p.heads,
                    p.record,
                    Some(p.raw),
                ));
            }
            if early_refused || !crate::prepare::is_document_chunk(&bytes) {
                // Changes of a document not here: the announcement's check asks for it.
                return Ok(unchanged);
            }
            return match load_received(&bytes).and_then(|doc| {
                let record = check_record(&doc, &id)?;
                Ok((doc, record))
            }) {
                Ok((doc, record)) => {
                    let heads = doc.get_heads();
                    Ok(batch.add_new(id, arrival.collection, Some(doc), heads, record, None))
                }
                Err(_) => Ok(unchanged),
            };
        }
        if !self.load_working(tables, staged, batch, &id)? {
            return Ok(unchanged);
        }
        let working = batch
            .docs
            .get_mut(&id)
            .ok_or_else(|| StoreError::Storage(format!("record {id} was not loaded")))?;
        let doc = working.doc_mut(&id)?;
        let before = doc.get_heads();
        // (Changes whose predecessors are not here are refused and undone by the merge:
        // they would wait in Automerge's queue and be lost at save.)
        match merge_into(doc, &bytes, &id) {
            Ok(record) => {
                let changed = doc.get_heads() != before;
                working.record = Some(record.clone());
                Ok(WriteOutcome {
                    record,
                    changed,
                    ..unchanged
                })
            }
            Err(_) if doc.get_heads() == before => Ok(unchanged),
            Err(reason) => {
                self.poisoned.insert(id);
                batch.docs.remove(&id);
                batch.order.retain(|d| *d != id);
                self.cache.pop(&id);
                Err(StoreError::Storage(format!(
                    "record {id} from a peer could not be merged and the attempt could not be undone ({reason}); nothing of this batch was saved"
                )))
            }
        }
    }

    /// Merges into a document stored here: what is held of it first, then what arrived.
    fn merge_existing(
        &mut self,
        tables: &mut Tables<'_>,
        staged: &mut Staged,
        batch: &mut Staged,
        arrival: Arrival,
        held: Option<HeldDoc>,
        meta: Option<DocMeta>,
    ) -> Result<WriteOutcome> {
        let id = arrival.id;
        if !self.load_working(tables, staged, batch, &id)? {
            return Err(StoreError::NotFound {
                collection: arrival.collection,
                id,
            });
        }
        let working = batch
            .docs
            .get_mut(&id)
            .ok_or_else(|| StoreError::Storage(format!("record {id} was not loaded")))?;
        let doc = working.doc_mut(&id)?;
        let before = doc.get_heads();
        let mut attempts: Vec<Vec<u8>> = Vec::new();
        if let Some(held) = &held {
            let mut all = held.joined();
            if let Some(fresh) = &arrival.fresh {
                all.extend_from_slice(fresh);
            }
            attempts.push(all);
        }
        if let Some(fresh) = &arrival.fresh {
            attempts.push(fresh.clone());
        }
        let mut outcome = None;
        let mut last_reason = String::new();
        for (n, bytes) in attempts.iter().enumerate() {
            match merge_into(doc, bytes, &id) {
                Ok(record) => {
                    outcome = Some((record, n == 0 && held.is_some()));
                    break;
                }
                Err(reason) => last_reason = reason,
            }
        }
        if doc.get_heads() != before && outcome.is_none() {
            // merge_into undoes what it refuses; a document it could not restore must
            // not be stored. Abort the transaction and hold the document next time.
            self.poisoned.insert(id);
            batch.docs.remove(&id);
            batch.order.retain(|d| *d != id);
            self.cache.pop(&id);
            return Err(StoreError::Storage(format!(
                "record {id} from a peer could not be merged and the attempt could not be undone ({last_reason}); nothing of this batch was saved, and the record will be held when it arrives again"
            )));
        }
        match outcome {
            Some((record, held_resolved)) => {
                let changed = doc.get_heads() != before;
                let superseded = held.as_ref().is_some_and(|h| superseded(doc, h));
                working.record = Some(record.clone());
                // What was held is resolved when it merged, or when the document has
                // every change its sender announced (a good copy arrived another way).
                if held_resolved || superseded || (held.is_some() && arrival.fresh.is_none()) {
                    tables.held.remove(doc_key(&id))?;
                    tracing::info!(doc = %id, "a held document merged at last; it is no longer held");
                }
                Ok(WriteOutcome {
                    id,
                    record,
                    changed,
                    seq: 0,
                    held: None,
                })
            }
            None => {
                // Bytes that cannot be merged but bring nothing this document lacks (a
                // damaged copy of changes that arrived intact another way) lose nothing.
                let redundant = has_every(doc, &arrival.heads);
                let held_superseded = held.as_ref().is_some_and(|h| superseded(doc, h));
                if redundant && (held.is_none() || held_superseded) {
                    if held.is_some() {
                        tables.held.remove(doc_key(&id))?;
                    }
                    tracing::debug!(doc = %id, reason = %escape(&last_reason), "unmergeable bytes from a peer brought nothing new; the document already has them");
                    return Ok(WriteOutcome {
                        id,
                        record: working.record.clone().unwrap_or_default(),
                        changed: false,
                        seq: 0,
                        held: None,
                    });
                }
                self.hold(tables, arrival, held, meta, last_reason)
            }
        }
    }

    /// Stores a document new here (or held here so far) from what arrived and what is held.
    fn merge_new(
        &mut self,
        tables: &mut Tables<'_>,
        batch: &mut Staged,
        arrival: Arrival,
        held: Option<HeldDoc>,
        meta: Option<DocMeta>,
        loaded: Option<PreparedCreate>,
    ) -> Result<WriteOutcome> {
        let id = arrival.id;
        if held.is_none()
            && let Some(p) = loaded
        {
            // The common case: a whole document, loaded and checked off the writer.
            let outcome =
                batch.add_new(id, arrival.collection, None, p.heads, p.record, Some(p.raw));
            if let Some(working) = batch.docs.get_mut(&id) {
                // (A held placeholder's feed entry is replaced by the document's.)
                working.old_meta = meta;
            }
            return Ok(outcome);
        }
        let loaded_doc = |bytes: &[u8]| {
            load_received(bytes).and_then(|doc| {
                let record = check_record(&doc, &id)?;
                Ok((doc, record))
            })
        };
        let held_bytes = held.as_ref().map(HeldDoc::joined);
        // What arrived on its own first, then together with what is held (changes that
        // came before their document, say), then what is held alone (a retry).
        let mut result = Err(String::from("nothing arrived"));
        let mut held_used = false;
        if let Some(fresh) = &arrival.fresh {
            result = loaded_doc(fresh);
            if result.is_err()
                && let Some(held_bytes) = &held_bytes
            {
                let mut all = held_bytes.clone();
                all.extend_from_slice(fresh);
                if let ok @ Ok(_) = loaded_doc(&all) {
                    result = ok;
                    held_used = true;
                }
            }
        } else if let Some(held_bytes) = &held_bytes {
            result = loaded_doc(held_bytes);
            held_used = true;
        }
        let (mut doc, mut record) = match result {
            Ok(loaded) => loaded,
            Err(reason) => return self.hold(tables, arrival, held, meta, reason),
        };
        let mut still_held = None;
        if let (Some(held_entry), false) = (&held, held_used) {
            // The document is here now: what was held of it may merge into it.
            match merge_into(&mut doc, &held_entry.joined(), &id) {
                Ok(merged) => record = merged,
                Err(reason) => still_held = Some(reason),
            }
        }
        if held.as_ref().is_some_and(|h| superseded(&doc, h)) {
            still_held = None;
        }
        match (&held, still_held) {
            (Some(_), None) => {
                tables.held.remove(doc_key(&id))?;
                tracing::info!(doc = %id, "a held document merged at last; it is no longer held");
            }
            (Some(entry), Some(reason)) => {
                let mut entry = entry.clone();
                entry.reason = reason;
                entry.attempts = entry.attempts.saturating_add(1);
                entry.last_try_ms = now_ms();
                tables
                    .held
                    .insert(doc_key(&id), entry.encode()?.as_slice())?;
            }
            (None, _) => {}
        }
        let heads = doc.get_heads();
        let mut outcome = batch.add_new(id, arrival.collection, Some(doc), heads, record, None);
        // The held placeholder's feed entry is replaced by the document's.
        if let Some(working) = batch.docs.get_mut(&id) {
            working.old_meta = meta;
        }
        outcome.changed = true;
        Ok(outcome)
    }

    /// Keeps what arrived in the held table with the reason. A document that exists
    /// nowhere else here is also given a feed entry under the heads its sender announced,
    /// so that it is still relayed as it arrived.
    fn hold(
        &mut self,
        tables: &mut Tables<'_>,
        arrival: Arrival,
        held: Option<HeldDoc>,
        meta: Option<DocMeta>,
        reason: String,
    ) -> Result<WriteOutcome> {
        let id = arrival.id;
        let now = now_ms();
        let mut entry = held.unwrap_or_else(|| HeldDoc {
            collection: arrival.collection.clone(),
            reason: String::new(),
            from: None,
            first_ms: now,
            last_try_ms: now,
            attempts: 0,
            heads: ByteBuf::new(),
            payloads: Vec::new(),
            sigs: ByteBuf::new(),
        });
        entry.reason = reason.clone();
        entry.attempts = entry.attempts.saturating_add(1);
        entry.last_try_ms = now;
        if arrival.from.is_some() {
            entry.from = arrival.from.clone();
        }
        if let Some(fresh) = arrival
            .fresh
            .filter(|f| !entry.payloads.iter().any(|p| p.as_slice() == f.as_slice()))
        {
            if entry.size() + fresh.len() + arrival.sigs.len() > MAX_HELD_BYTES
                || entry.payloads.len() >= MAX_HELD_PAYLOADS
            {
                return Err(StoreError::BadQuery(format!(
                    "record {id} cannot be merged ({reason}) and as much of it as may be kept is held already; resolve the held copy first"
                )));
            }
            entry.payloads.push(ByteBuf::from(fresh));
            entry.sigs.extend_from_slice(&arrival.sigs);
            if !arrival.heads.is_empty() {
                entry.heads = ByteBuf::from(arrival.heads.concat());
            }
        }
        tables
            .held
            .insert(doc_key(&id), entry.encode()?.as_slice())?;
        let exists = meta.as_ref().is_some_and(|m| !m.held);
        let mut seq = meta.as_ref().map_or(0, |m| m.seq);
        let heads: Vec<[u8; 32]> =
            medmesh_protocol::wire::split_heads(&entry.heads).unwrap_or_default();
        if !exists && !heads.is_empty() && meta.as_ref().is_none_or(|m| m.heads != heads) {
            seq = self.next_seq;
            self.next_seq += 1;
            if let Some(old) = &meta {
                tables.feed.remove(old.seq)?;
            }
            tables.feed.insert(seq, doc_key(&id))?;
            let placeholder = DocMeta {
                collection: entry.collection.clone(),
                seq,
                updated_ms: 0,
                deleted: false,
                held: true,
                chunks: 0,
                heads,
            };
            tables
                .meta
                .insert(doc_key(&id), placeholder.encode().as_slice())?;
            // What it holds is not known: it travels only between devices that serve
            // every clinic.
            crate::scope::mark_unknown(tables, &id)?;
        }
        tracing::warn!(
            doc = %id,
            collection = %escape(&entry.collection),
            from = %entry.from.as_deref().map(escape).unwrap_or_default(),
            reason = %escape(&reason),
            "a document from a peer could not be merged; it is kept aside (see `medmesh status`) and will be retried"
        );
        Ok(WriteOutcome {
            id,
            record: Fields::new(),
            changed: false,
            seq,
            held: Some(reason),
        })
    }

    /// Tries every held document again; answers how many merged.
    pub(crate) fn retry_held(&mut self) -> Result<usize> {
        let mut held_before = 0;
        let mut resolved = 0;
        let mut after: Option<u128> = None;
        loop {
            let ids: Vec<(DocId, String)> = {
                let txn = self.db.get()?.begin_read()?;
                let table = txn.open_table(HELD)?;
                let range = match after {
                    Some(key) => table.range(key + 1..)?,
                    None => table.range(0..)?,
                };
                let mut ids = Vec::new();
                for entry in range.take(RETRIES_PER_COMMIT) {
                    let (key, value) = entry?;
                    let collection = HeldDoc::decode(value.value())
                        .map(|h| h.collection)
                        .unwrap_or_default();
                    ids.push((key_doc(key.value()), collection));
                }
                ids
            };
            let Some((last, _)) = ids.last() else {
                break;
            };
            after = Some(doc_key(last));
            held_before += ids.len();
            let ops = ids
                .into_iter()
                .map(|(id, collection)| {
                    WriteOp::new(
                        &collection,
                        Some(id),
                        WriteKind::Merge(Received::default()),
                        Default::default(),
                    )
                })
                .collect();
            let (reply, answer) = oneshot::channel();
            self.commit_writes(vec![Command::Write {
                batch: WriteBatch { ops, atomic: false },
                prepared: Vec::new(),
                reply,
            }]);
            if let Ok(Ok(outcomes)) = answer.blocking_recv() {
                resolved += outcomes
                    .iter()
                    .filter(|o| matches!(o, Ok(o) if o.held.is_none()))
                    .count();
            }
        }
        if held_before > 0 {
            tracing::info!(
                tried = held_before,
                merged = resolved,
                "retried the documents held from peers"
            );
        }
        Ok(resolved)
    }

    /// Rebuilds the schema from the mesh's schema document, reindexes what changed, and
    /// has held documents retried.
    pub(crate) fn reload_schema(&mut self) {
        if let Err(err) = self.try_reload_schema() {
            tracing::error!(error = %err, "the mesh's schema could not be applied; it will be tried again at the next start");
        }
        self.retry_due = true;
    }

    fn try_reload_schema(&mut self) -> Result<()> {
        let record = {
            let id = schema_doc_id();
            match self.cache.get(&id) {
                Some(doc) => record::read_record(doc),
                None => {
                    let txn = self.db.get()?.begin_read()?;
                    match crate::store::read_meta(&txn, &id)? {
                        Some(meta) if !meta.held => {
                            record::read_record(&crate::store::load_document(&txn, &id, &meta)?)
                        }
                        _ => Fields::new(),
                    }
                }
            }
        };
        let schema = effective_schema(&self.base_schema, &record);
        let old = self.current_schema();
        let changed: BTreeSet<String> = schema
            .collections()
            .filter(|spec| !spec.builtin && old.collection(&spec.name) != Some(*spec))
            .map(|spec| spec.name.clone())
            .collect();
        match self.schema.write() {
            Ok(mut cell) => *cell = Arc::new(schema),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(schema),
        }
        if !changed.is_empty() {
            tracing::info!(collections = ?changed, "the mesh's schema changed; the node now knows these collections");
        }
        self.reindex_stale()
    }

    /// Rebuilds the index entries of every declared collection whose indexes were built
    /// for another declaration (or none); remembers what they were built for.
    pub(crate) fn reindex_stale(&mut self) -> Result<()> {
        let schema = self.current_schema();
        let txn = self.db.get()?.begin_write()?;
        {
            let mut tables = Tables::open(&txn)?;
            for spec in schema.collections().filter(|s| !s.builtin) {
                let marker = format!("indexed:{}", spec.name);
                let built_for = serde_json::to_vec(spec).unwrap_or_default();
                let current = tables
                    .info
                    .get(marker.as_str())?
                    .map(|v| v.value().to_vec());
                if current.as_deref() == Some(built_for.as_slice()) {
                    continue;
                }
                let prefix = index_prefix(&spec.name, "");
                let prefix = &prefix[..prefix.len() - 1];
                let mut end = prefix.to_vec();
                end.push(0xff);
                tables
                    .index
                    .retain_in::<&[u8], _>(prefix..end.as_slice(), |_, _| false)?;
                let ids: Vec<(DocId, DocMeta)> = {
                    let mut ids = Vec::new();
                    for entry in tables.meta.iter()? {
                        let (key, value) = entry?;
                        if let Some(meta) = DocMeta::decode(value.value())
                            && meta.collection == spec.name
                            && !meta.held
                        {
                            ids.push((key_doc(key.value()), meta));
                        }
                    }
                    ids
                };
                let count = ids.len();
                for (id, meta) in ids {
                    let doc = match load_from_tables(
                        &tables.docs,
                        &tables.chunks,
                        &id,
                        &meta.collection,
                    ) {
                        Ok(doc) => doc,
                        Err(err) => {
                            tracing::warn!(doc = %id, error = %err, "cannot index a damaged document");
                            continue;
                        }
                    };
                    let record = record::read_record(&doc);
                    for entry in index_entries(&spec.name, Some(spec), &id, &record) {
                        tables.index.insert(entry.as_slice(), ())?;
                    }
                }
                tables.info.insert(marker.as_str(), built_for.as_slice())?;
                tracing::info!(collection = %spec.name, records = count, "indexed the records of a newly declared collection");
            }
        }
        self.commit(txn, false)?;
        Ok(())
    }
}

/// Whether a document already has every change a held copy of it announced.
fn superseded(doc: &automerge::Automerge, held: &HeldDoc) -> bool {
    has_every(
        doc,
        &medmesh_protocol::wire::split_heads(&held.heads).unwrap_or_default(),
    )
}

/// Whether a document has every one of `heads` (and so everything before them); false
/// for no heads.
fn has_every(doc: &automerge::Automerge, heads: &[[u8; 32]]) -> bool {
    let hashes: Vec<automerge::ChangeHash> =
        heads.iter().copied().map(automerge::ChangeHash).collect();
    !hashes.is_empty() && automerge::ReadDoc::get_missing_deps(doc, &hashes).is_empty()
}

/// The schema in force for a schema document's record: the base collections with the
/// mesh's declarations added (problems logged).
pub(crate) fn effective_schema(base: &Schema, record: &Fields) -> Schema {
    let (declarations, problems) = declarations_in_record(record);
    let (schema, skipped) = base.with_declarations(&declarations);
    for problem in problems.iter().chain(skipped.iter()) {
        tracing::warn!(problem = %problem, "part of the mesh's schema cannot be used");
    }
    schema
}

const RETRIES_PER_COMMIT: usize = 256;
