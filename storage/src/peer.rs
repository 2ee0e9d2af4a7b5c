//! What the sync protocol asks of the store: the feed as the peer sees it, which
//! documents are missing or behind, documents to send, and per-peer state.

use crate::held::HeldDoc;
use crate::tables::HELD;
use automerge::Automerge;
use automerge::sync::SyncDoc;
use automerge::{ChangeHash, ReadDoc};
use medmesh_protocol::DocId;
use medmesh_protocol::wire::{self, DocPayload, FeedItem, Summary, WantChanges};
use redb::ReadableTable;
use serde_bytes::ByteBuf;
use tokio::sync::oneshot;

use crate::error::{Result, StoreError};
use crate::merge::{escape, guarded};
use crate::meta::{DocMeta, doc_key, key_doc};
use crate::scope::Reach;
use crate::signing::{self, SealsSent};
use crate::store::{Store, load_document, read_meta};
use crate::tables::{DOC_META, DOCS, FEED, PATIENT_DOCS, PEERS, PLACES, SEALS, SIGS};
use medmesh_protocol::scope::Scope;

/// Summaries memoized at once (one per scope that peers share with this device).
const SUMMARIES_KEPT: usize = 8;
use crate::write::{PeerRecord, PeerUpdate};
use crate::writer::Command;
use medmesh_protocol::authorship::SealId;

fn heads_bytes(heads: &[[u8; 32]]) -> ByteBuf {
    wire::join_heads(heads)
}

impl Store {
    /// A receiver of the newest local feed position, updated after every commit that
    /// advanced the feed.
    pub fn subscribe_feed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.feed.clone()
    }

    /// Feed entries after `after`, at most `limit`, with each document's heads; and the
    /// position reached (`after` when there are none).
    pub fn feed_page(&self, after: u64, limit: usize) -> Result<(Vec<FeedItem>, u64)> {
        let txn = self.read_txn()?;
        let feed = txn.open_table(FEED)?;
        let mut entries = Vec::new();
        let mut last = after;
        for entry in feed.range(after.saturating_add(1)..)?.take(limit) {
            let (seq, id) = entry?;
            let id = key_doc(id.value());
            last = seq.value();
            if let Some(meta) = read_meta(&txn, &id)? {
                entries.push(FeedItem {
                    seq: seq.value(),
                    id,
                    collection: meta.collection,
                    heads: heads_bytes(&meta.heads),
                    payload: None,
                    payload_sigs: Default::default(),
                });
            }
        }
        Ok((entries, last))
    }

    /// Which of a peer's feed entries this store lacks entirely, and which it has but
    /// lacks some changes of (with the local heads, to ask for what is missing).
    pub fn check_docs(&self, entries: &[FeedItem]) -> Result<(Vec<DocId>, Vec<WantChanges>)> {
        let txn = self.read_txn()?;
        let mut missing = Vec::new();
        let mut behind = Vec::new();
        for entry in entries {
            let Some(meta) = read_meta(&txn, &entry.id)? else {
                missing.push(entry.id);
                continue;
            };
            if meta.held {
                // Only bytes that could not be merged are here: ask for the document
                // whole, in case the peer's copy is good (an identical copy is not kept
                // twice).
                missing.push(entry.id);
                continue;
            }
            let theirs = wire::split_heads(&entry.heads).unwrap_or_default();
            if theirs == meta.heads || theirs.iter().all(|h| meta.heads.contains(h)) {
                continue;
            }
            let theirs: Vec<ChangeHash> = theirs.into_iter().map(ChangeHash).collect();
            let lacks = match load_document(&txn, &entry.id, &meta) {
                Ok(doc) => !doc.get_missing_deps(&theirs).is_empty(),
                Err(err) => {
                    tracing::warn!(doc = %entry.id, error = %err, "asking a peer for a damaged document again");
                    true
                }
            };
            if lacks {
                behind.push(WantChanges {
                    id: entry.id,
                    heads: heads_bytes(&meta.heads),
                    have: None,
                });
            }
        }
        Ok((missing, behind))
    }

    /// Documents for a peer: `whole` as saved documents, `changes` as the changes the
    /// peer lacks given its heads. Documents not stored here are left out.
    pub fn load_for_peer(
        &self,
        whole: &[DocId],
        changes: &[WantChanges],
    ) -> Result<Vec<DocPayload>> {
        Ok(self
            .load_for_peer_diverged(whole, changes, &Scope::all())?
            .0)
    }

    /// [`Store::load_for_peer`], also answering the documents whose changes cannot be
    /// told from the peer's heads (both sides changed them since they last met, and the
    /// peer sent no summary of its changes): the peer asks for them again with one.
    /// Documents outside the peer's `scope` are left out, whatever it asks.
    pub fn load_for_peer_diverged(
        &self,
        whole: &[DocId],
        changes: &[WantChanges],
        scope: &Scope,
    ) -> Result<(Vec<DocPayload>, Vec<DocId>)> {
        let txn = self.read_txn()?;
        let (whole, changes) = if scope.is_all() {
            (whole.to_vec(), changes.to_vec())
        } else {
            self.with_reach(&txn, scope, |reach| {
                let mut w = Vec::with_capacity(whole.len());
                for id in whole {
                    if reach.sends(id)? {
                        w.push(*id);
                    }
                }
                let mut c = Vec::with_capacity(changes.len());
                for want in changes {
                    if reach.sends(&want.id)? {
                        c.push(want.clone());
                    }
                }
                Ok((w, c))
            })?
        };
        let (whole, changes) = (whole.as_slice(), changes.as_slice());
        let own = self.inner.own_pending.all();
        let docs = txn.open_table(DOCS)?;
        let held = txn.open_table(HELD)?;
        let sigs = txn.open_table(SIGS)?;
        let seals = txn.open_table(SEALS)?;
        let author = signing::current(&self.inner.author);
        let find = |id: &SealId| {
            self.inner
                .seals
                .find(id, |id| signing::read_seal(&seals, id))
        };
        // Each seal once in this answer (the session sends each once per connection).
        let sent = std::cell::RefCell::new(SealsSent::new());
        let held_bytes = |id: &DocId| -> Result<Option<(Vec<u8>, ByteBuf)>> {
            Ok(held
                .get(doc_key(id))?
                .and_then(|v| HeldDoc::decode(v.value()))
                .map(|h| {
                    let bytes = h.joined();
                    let sigs = signing::seals_once(h.sigs.into_vec(), &mut sent.borrow_mut(), find);
                    (bytes, ByteBuf::from(sigs))
                }))
        };
        let sigs_for = |id: &DocId, bytes: &[u8]| -> Result<ByteBuf> {
            Ok(ByteBuf::from(signing::for_payload(
                &sigs,
                id,
                bytes,
                author.as_deref(),
                own.get(id).cloned().unwrap_or_default(),
                &mut sent.borrow_mut(),
                &find,
            )?))
        };
        let mut out = Vec::with_capacity(whole.len() + changes.len());
        let mut diverged = Vec::new();
        for id in whole {
            let Some(meta) = read_meta(&txn, id)? else {
                continue;
            };
            let bytes = if meta.held {
                // Relayed as it arrived.
                match held_bytes(id)? {
                    Some(held) => Err(held),
                    None => continue,
                }
            } else if meta.chunks == 0 {
                // The compacted snapshot is exactly the saved document.
                match docs.get(doc_key(id))? {
                    Some(bytes) => Ok(bytes.value().to_vec()),
                    None => continue,
                }
            } else {
                match load_document(&txn, id, &meta) {
                    Ok(doc) => Ok(doc.save()),
                    Err(err) => {
                        tracing::warn!(doc = %id, error = %err, "cannot send a damaged document");
                        continue;
                    }
                }
            };
            let (bytes, sigs) = match bytes {
                Ok(bytes) => {
                    let sigs = sigs_for(id, &bytes)?;
                    (bytes, sigs)
                }
                Err(held) => held,
            };
            out.push(DocPayload {
                id: *id,
                heads: heads_bytes(&meta.heads),
                collection: meta.collection,
                bytes: ByteBuf::from(bytes),
                sigs,
            });
        }
        for want in changes {
            let Some(meta) = read_meta(&txn, &want.id)? else {
                continue;
            };
            if meta.held {
                if let Some((bytes, sigs)) = held_bytes(&want.id)? {
                    out.push(DocPayload {
                        id: want.id,
                        heads: heads_bytes(&meta.heads),
                        collection: meta.collection,
                        bytes: ByteBuf::from(bytes),
                        sigs,
                    });
                }
                continue;
            }
            let mut doc = match load_document(&txn, &want.id, &meta) {
                Ok(doc) => doc,
                Err(err) => {
                    tracing::warn!(doc = %want.id, error = %err, "cannot send a damaged document");
                    continue;
                }
            };
            let theirs: Vec<ChangeHash> = wire::split_heads(&want.heads)
                .unwrap_or_default()
                .into_iter()
                .map(ChangeHash)
                .collect();
            let bytes = match &want.have {
                Some(have) => match changes_for_summary(&mut doc, have) {
                    Ok(bytes) => bytes,
                    Err(reason) => {
                        tracing::warn!(doc = %want.id, reason = %escape(&reason), "a peer's summary of its changes is unusable; sending the whole document");
                        doc.save()
                    }
                },
                None if theirs.is_empty() => doc.save(),
                None => {
                    if !doc.get_missing_deps(&theirs).is_empty() {
                        // Some of its heads are not here: it has changes this node lacks,
                        // so its heads do not say what it lacks.
                        diverged.push(want.id);
                        continue;
                    }
                    doc.save_after(&theirs)
                }
            };
            if bytes.is_empty() {
                continue;
            }
            let sigs = sigs_for(&want.id, &bytes)?;
            out.push(DocPayload {
                id: want.id,
                heads: heads_bytes(&meta.heads),
                collection: meta.collection,
                bytes: ByteBuf::from(bytes),
                sigs,
            });
        }
        Ok((out, diverged))
    }

    /// For documents the peer could not answer by heads: this node's heads and a summary
    /// of every change it has (an Automerge sync message), to ask again with; and the
    /// documents no longer here.
    pub fn prepare_have(&self, ids: &[DocId]) -> Result<(Vec<WantChanges>, Vec<DocId>)> {
        let txn = self.read_txn()?;
        let mut changes = Vec::new();
        let mut whole = Vec::new();
        for id in ids {
            let doc = match read_meta(&txn, id)? {
                Some(meta) if !meta.held => load_document(&txn, id, &meta).ok(),
                _ => None,
            };
            match doc {
                Some(doc) => {
                    let mut state = automerge::sync::State::new();
                    let have = doc
                        .generate_sync_message(&mut state)
                        .map(|m| ByteBuf::from(m.encode()));
                    changes.push(WantChanges {
                        id: *id,
                        heads: heads_bytes(
                            &doc.get_heads().iter().map(|h| h.0).collect::<Vec<_>>(),
                        ),
                        have,
                    });
                }
                None => whole.push(*id),
            }
        }
        Ok((changes, whole))
    }

    /// A summary of every document held here (for anti-entropy).
    pub fn summary(&self) -> Result<Summary> {
        self.summary_for(&Scope::all())
    }

    /// A summary of the documents held here that `scope` covers (what two devices
    /// compare: the scope both serve), computed anew only when the feed moved (or what
    /// is held changed) since the last one of that scope.
    pub fn summary_for(&self, scope: &Scope) -> Result<Summary> {
        let key = (
            self.last_seq()?,
            self.inner
                .summary_generation
                .load(std::sync::atomic::Ordering::Relaxed),
            scope.clone(),
        );
        if let Ok(cached) = self.inner.summary.lock()
            && let Some((_, summary)) = cached.iter().find(|(at, _)| *at == key)
        {
            return Ok(summary.clone());
        }
        let txn = self.read_txn()?;
        let table = txn.open_table(DOC_META)?;
        let summary = self.with_reach(&txn, scope, |reach| {
            let mut summary = Summary::default();
            for entry in table.iter()? {
                let (k, value) = entry?;
                let id = key_doc(k.value());
                if let Some(meta) = DocMeta::decode(value.value())
                    && reach.holds(&id)?
                {
                    summary.add(&id, &meta.heads, meta.held);
                }
            }
            summary.seal();
            Ok(summary)
        })?;
        if let Ok(mut cached) = self.inner.summary.lock() {
            cached.retain(|(at, _)| at.0 == key.0 && at.1 == key.1);
            if cached.len() >= SUMMARIES_KEPT {
                cached.remove(0);
            }
            cached.push((key, summary.clone()));
        }
        Ok(summary)
    }

    /// The documents of one summary bucket after `after` (by id), at most `limit`, with
    /// their heads; and whether more follow.
    /// Only documents `scope` covers are listed.
    pub fn read_range(
        &self,
        bucket: u8,
        after: Option<DocId>,
        limit: usize,
        scope: &Scope,
    ) -> Result<(Vec<FeedItem>, bool)> {
        let txn = self.read_txn()?;
        let table = txn.open_table(DOC_META)?;
        let places = txn.open_table(PLACES)?;
        let patients = txn.open_table(PATIENT_DOCS)?;
        let mut reach = Reach::new(&places, &patients, scope);
        let start = after.map_or(0, |id| doc_key(&id).saturating_add(1));
        let mut entries = Vec::new();
        for entry in table.range(start..)? {
            let (key, value) = entry?;
            let id = key_doc(key.value());
            if Summary::bucket_of(&id) != bucket || !reach.holds(&id)? {
                continue;
            }
            if entries.len() >= limit {
                return Ok((entries, true));
            }
            if let Some(meta) = DocMeta::decode(value.value()) {
                entries.push(FeedItem {
                    seq: 0,
                    id,
                    collection: meta.collection,
                    heads: heads_bytes(&meta.heads),
                    payload: None,
                    payload_sigs: Default::default(),
                });
            }
        }
        Ok((entries, false))
    }

    /// Every peer this node keeps state for.
    pub fn peers(&self) -> Result<Vec<(String, PeerRecord)>> {
        let txn = self.read_txn()?;
        let table = txn.open_table(PEERS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            match serde_json::from_slice(value.value()) {
                Ok(record) => out.push((key.value().to_owned(), record)),
                Err(err) => {
                    tracing::warn!(peer = key.value(), error = %err, "forgetting an unreadable peer entry")
                }
            }
        }
        Ok(out)
    }

    /// The state kept for one peer.
    pub fn peer(&self, key: &str) -> Result<Option<PeerRecord>> {
        let txn = self.read_txn()?;
        let table = txn.open_table(PEERS)?;
        Ok(table
            .get(key)?
            .and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    /// Durably applies an update to the state kept for one peer (`key` is its peer id,
    /// or `addr:` and an address for a peer known only by address). Only the store's
    /// writer changes these entries, one update at a time, so a session saving its
    /// cursor and the network saving addresses never overwrite each other.
    pub async fn update_peer(&self, key: &str, update: PeerUpdate) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send_async(Command::UpdatePeer {
            key: key.to_owned(),
            update,
            reply,
        })
        .await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// [`Store::update_peer`] for threads outside an async runtime.
    pub fn update_peer_blocking(&self, key: &str, update: PeerUpdate) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::UpdatePeer {
            key: key.to_owned(),
            update,
            reply,
        })?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// Tries every held document again now (the writer also does so at start and when
    /// the schema changes); answers how many merged.
    pub fn retry_held_blocking(&self) -> Result<usize> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::RetryHeld { reply })?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)?
    }
}

/// The changes a peer lacks, told by its summary (an Automerge sync message with its
/// heads and a Bloom filter of its changes): whatever Automerge's sync protocol would
/// send it next.
fn changes_for_summary(doc: &mut Automerge, have: &[u8]) -> std::result::Result<Vec<u8>, String> {
    guarded(|| {
        let message = automerge::sync::Message::decode(have)
            .map_err(|e| format!("unreadable summary: {e}"))?;
        if !message.changes.is_empty() {
            return Err("the summary carries changes".into());
        }
        let mut state = automerge::sync::State::new();
        doc.receive_sync_message(&mut state, message)
            .map_err(|e| format!("unusable summary: {e}"))?;
        Ok(doc
            .generate_sync_message(&mut state)
            .map(|reply| reply.changes.iter().flatten().copied().collect())
            .unwrap_or_default())
    })
}
