//! What one write transaction holds in memory: the documents it loads or changes.

use std::collections::{BTreeSet, HashMap};

use automerge::{Automerge, ChangeHash};
use medmesh_protocol::DocId;
use medmesh_protocol::authorship::SignedChange;
use medmesh_protocol::record::{self, Fields};
use serde_json::Value;

use crate::error::{Result, StoreError};
use crate::meta::DocMeta;
use crate::write::WriteOutcome;

/// A document being changed in the current transaction.
pub(crate) struct Working {
    /// The document, when loaded. A new document worked out off the writer thread is
    /// held only as its bytes, heads and record (an Automerge document takes tens of
    /// kilobytes in memory; its bytes a few hundred), and loaded only if touched again.
    pub(crate) doc: Option<Automerge>,
    /// Heads of the document when `doc` is not loaded.
    pub(crate) heads: Vec<ChangeHash>,
    pub(crate) collection: String,
    /// Its metadata before this transaction; `None` for a new document.
    pub(crate) old_meta: Option<DocMeta>,
    /// Its record before this transaction (for index maintenance).
    pub(crate) old_record: Fields,
    /// Its heads before this transaction (to save only the new changes).
    pub(crate) old_heads: Vec<ChangeHash>,
    /// Its record now, when already known (saves reading the document again).
    pub(crate) record: Option<Fields>,
    /// For a new document: its saved bytes, stored as they are (cleared when the
    /// document is changed again).
    pub(crate) raw: Option<Vec<u8>>,
    /// Signatures of the changes received (or vouched for) in this batch, stored with it.
    pub(crate) sigs: Vec<SignedChange>,
    /// The changes this node made in this batch, to be signed at its end (`true`: made
    /// with its device actor).
    pub(crate) own: Vec<(ChangeHash, bool)>,
}

impl Working {
    /// The document, loaded from its bytes if needed, to read or change. Its stored bytes
    /// no longer stand for it afterwards.
    pub(crate) fn doc_mut(&mut self, id: &DocId) -> Result<&mut Automerge> {
        if self.doc.is_none() {
            let raw = self.raw.as_deref().unwrap_or_default();
            let doc = Automerge::load(raw).map_err(|e| StoreError::CorruptDocument {
                id: *id,
                collection: self.collection.clone(),
                reason: e.to_string(),
            })?;
            self.doc = Some(doc);
        }
        self.raw = None;
        self.doc
            .as_mut()
            .ok_or_else(|| StoreError::Storage("the document could not be loaded".into()))
    }

    /// The document's heads now.
    pub(crate) fn current_heads(&self) -> Vec<ChangeHash> {
        match &self.doc {
            Some(doc) => doc.get_heads(),
            None => self.heads.clone(),
        }
    }
}

/// Documents loaded or changed by one transaction, in first-touch order.
#[derive(Default)]
pub(crate) struct Staged {
    pub(crate) docs: HashMap<DocId, Working>,
    pub(crate) order: Vec<DocId>,
    /// Documents worth keeping loaded after the commit (from small, interactive
    /// batches; a bulk import would only churn the cache).
    pub(crate) cacheable: BTreeSet<DocId>,
}

impl Staged {
    /// Room for `n` documents.
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            docs: HashMap::with_capacity(n),
            order: Vec::with_capacity(n),
            cacheable: BTreeSet::new(),
        }
    }

    /// Adds signatures to be stored with a document of this batch.
    pub(crate) fn sign(&mut self, id: &DocId, sigs: Vec<SignedChange>) {
        if let Some(working) = self.docs.get_mut(id) {
            working.sigs.extend(sigs);
        }
    }

    /// Adds changes this node made to a document of this batch, to be signed.
    pub(crate) fn sign_own(&mut self, id: &DocId, own: Vec<(ChangeHash, bool)>) {
        if let Some(working) = self.docs.get_mut(id) {
            working.own.extend(own);
        }
    }

    /// Adds a document new to the store; answers the write's outcome.
    pub(crate) fn add_new(
        &mut self,
        id: DocId,
        collection: String,
        doc: Option<Automerge>,
        heads: Vec<ChangeHash>,
        record: Fields,
        raw: Option<Vec<u8>>,
    ) -> WriteOutcome {
        self.order.push(id);
        self.docs.insert(
            id,
            Working {
                doc,
                heads,
                collection,
                old_meta: None,
                old_record: Fields::new(),
                old_heads: Vec::new(),
                record: Some(record.clone()),
                raw,
                sigs: Vec::new(),
                own: Vec::new(),
            },
        );
        WriteOutcome {
            id,
            record,
            changed: true,
            seq: 0,
            held: None,
        }
    }
}

/// Batches of at most this many writes keep their documents in the cache.
pub(crate) const CACHEABLE_BATCH: usize = 16;

impl Working {
    pub(crate) fn old_record_field(&self, field: &str) -> Option<Value> {
        match (&self.record, &self.doc) {
            (Some(record), _) => record.get(field).cloned(),
            (None, Some(doc)) => record::read_record(doc).get(field).cloned(),
            (None, None) => None,
        }
    }
}
