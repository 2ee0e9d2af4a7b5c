//! Work a write can do before the writer thread sees it: a new record's document, or a
//! received document loaded, worked out on the caller's thread so that two cores share
//! an import or an initial sync. Nothing here touches the database.

use automerge::transaction::CommitOptions;
use automerge::{ActorId, Automerge, ChangeHash};
use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::schema::counter_fields;
use medmesh_protocol::{CollectionSpec, DocId, RecordError, Schema};
use serde_json::Value;

use crate::error::{Result, StoreError};
use crate::signing::{Author, SIGNATURES_DO_NOT_HOLD};
use crate::write::{WriteKind, WriteOp};
use crate::writer::{bad_id, refused};
use medmesh_protocol::authorship::{self, Authority, Check, KeyCache, SealLookup, SignedChange};

/// Work done before the writer sees a write.
pub(crate) enum Prepared {
    /// A new record.
    Create(Result<PreparedCreate>),
    /// A whole document received from a peer: loaded and checked, or why it cannot be
    /// (with its bytes, so that they can be held).
    Received(std::result::Result<PreparedCreate, (Vec<u8>, String)>),
    /// Changes received from a peer, their signatures checked: the entries to keep, or
    /// why they are refused.
    Checked(std::result::Result<Vec<SignedChange>, String>),
}

/// A new record, or a received document, worked out in memory: its id, document and
/// fields (and, for a received one, its bytes).
pub(crate) struct PreparedCreate {
    pub(crate) id: DocId,
    pub(crate) heads: Vec<ChangeHash>,
    pub(crate) record: Fields,
    pub(crate) raw: Vec<u8>,
    /// The signatures to keep with its changes; for a received document whose
    /// signatures were checked and refused, why.
    pub(crate) sigs: std::result::Result<Vec<SignedChange>, String>,
    /// For a new record made by this node: its changes, to be signed when written
    /// (`true`: made with the device actor).
    pub(crate) own: Vec<(ChangeHash, bool)>,
}

pub(crate) fn commit_options(op: &WriteOp) -> CommitOptions {
    CommitOptions::default()
        .with_message(op.author.to_message())
        .with_time(op.time_ms)
}

/// Works out a new record: its id (given, in the record, or a new UUIDv7), timestamps,
/// validation, and its document with one change. Needs nothing from the database, so
/// callers can do it on their own thread.
pub(crate) fn prepare_create(
    spec: &CollectionSpec,
    actor: &ActorId,
    author: Option<&Author>,
    id: Option<DocId>,
    mut fields: Fields,
    time_ms: i64,
    options: CommitOptions,
) -> Result<PreparedCreate> {
    let id = match (id, fields.get("id")) {
        (Some(id), _) => id,
        (None, Some(Value::String(text))) => {
            text.parse::<DocId>().map_err(|_| bad_id(spec, text))?
        }
        (None, Some(other)) => return Err(bad_id(spec, &other.to_string())),
        (None, None) => DocId::new_v7(),
    };
    let now = Value::String(record::format_timestamp(time_ms));
    fields.insert("id".into(), Value::String(id.to_string()));
    fields.entry("created_at").or_insert_with(|| now.clone());
    fields.insert("updated_at".into(), now);
    spec.validate_record(&fields)?;
    // Counter fields (quantities that must add up after merges) start as counters.
    let counters: Vec<(&str, i64)> = counter_fields(&spec.name)
        .iter()
        .map(|f| (*f, fields.get(*f).and_then(Value::as_i64).unwrap_or(0)))
        .collect();
    let plain: Fields = fields
        .iter()
        .filter(|(k, _)| !counters.iter().any(|(c, _)| c == k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut doc = Automerge::new().with_actor(actor.clone());
    doc.transact_with::<_, _, RecordError, _>(
        |_| options,
        |tx| {
            record::init_record(tx, &plain)?;
            for (field, start) in &counters {
                record::put_counter(tx, field, *start)?;
            }
            Ok(())
        },
    )
    .map_err(|f| refused(&f.error))?;
    for (field, start) in &counters {
        fields.insert((*field).to_owned(), Value::from(*start));
    }
    // The document holds exactly these fields (Automerge orders keys).
    fields.sort_keys();
    let heads = doc.get_heads();
    let device = authorship::actor_key(actor.to_bytes()).is_some();
    let own = match author {
        Some(_) => heads.iter().map(|hash| (*hash, device)).collect(),
        None => Vec::new(),
    };
    Ok(PreparedCreate {
        id,
        heads,
        raw: doc.save(),
        record: fields,
        sigs: Ok(Vec::new()),
        own,
    })
}

/// Works out every create of a batch (taking their fields out of the batch).
pub(crate) fn prepare_creates(
    schema: &Schema,
    actor: &ActorId,
    author: Option<&Author>,
    authority: Option<&dyn Authority>,
    seals: &dyn SealLookup,
    ops: &mut [WriteOp],
) -> Vec<Option<Prepared>> {
    let mut keys = KeyCache::default();
    // Signatures of what was received are checked together, at the end: each check with
    // the write it belongs to.
    let mut checks: Vec<Check> = Vec::new();
    let mut owners: Vec<usize> = Vec::new();
    let mut prepared: Vec<Option<Prepared>> = ops
        .iter_mut()
        .enumerate()
        .map(|(n, op)| {
            if let (WriteKind::Merge(received), Some(id)) = (&mut op.kind, op.id) {
                // Only a whole saved document loads on its own; changes are merged by
                // the writer into the document they belong to (their signatures are
                // checked here all the same).
                if !is_document_chunk(&received.bytes) {
                    let authority = authority?;
                    let checked =
                        crate::signing::facts_of_bytes(&received.bytes).and_then(|facts| {
                            let entries = crate::signing::decode(&received.sigs)?.entries;
                            let (more, kept) = authorship::prepare_checks(
                                &facts, &entries, seals, authority, &mut keys,
                            )
                            .map_err(|why| format!("{SIGNATURES_DO_NOT_HOLD}{why}"))?;
                            owners.extend(std::iter::repeat_n(n, more.len()));
                            checks.extend(more);
                            Ok(kept)
                        });
                    return Some(Prepared::Checked(checked));
                }
                let bytes = std::mem::take(&mut received.bytes);
                let loaded = crate::merge::load_received(&bytes).and_then(|doc| {
                    let record = crate::merge::check_record(&doc, &id)?;
                    Ok((doc, record))
                });
                return Some(Prepared::Received(match loaded {
                    Ok((doc, record)) => {
                        let sigs = match authority {
                            None => Ok(authorship::decode(&received.sigs)
                                .unwrap_or_default()
                                .entries),
                            Some(authority) => authorship::decode(&received.sigs)
                                .and_then(|decoded| {
                                    let facts = authorship::facts_of_doc(&doc, &[]);
                                    let (more, kept) = authorship::prepare_checks(
                                        &facts,
                                        &decoded.entries,
                                        seals,
                                        authority,
                                        &mut keys,
                                    )?;
                                    owners.extend(std::iter::repeat_n(n, more.len()));
                                    checks.extend(more);
                                    Ok(kept)
                                })
                                .map_err(|why| format!("{SIGNATURES_DO_NOT_HOLD}{why}")),
                        };
                        Ok(PreparedCreate {
                            id,
                            record,
                            heads: doc.get_heads(),
                            raw: bytes,
                            sigs,
                            own: Vec::new(),
                        })
                    }
                    Err(reason) => Err((bytes, reason)),
                }));
            }
            let WriteKind::Create(fields) = &mut op.kind else {
                return None;
            };
            let fields = std::mem::take(fields);
            let spec = match schema.collection(&op.collection) {
                Some(spec) => spec,
                None => {
                    return Some(Prepared::Create(Err(StoreError::UnknownCollection(
                        op.collection.clone(),
                    ))));
                }
            };
            Some(Prepared::Create(prepare_create(
                spec,
                actor,
                author,
                op.id,
                fields,
                op.time_ms,
                commit_options(op),
            )))
        })
        .collect();
    if authorship::verify_checks(&checks).is_err() {
        // Some signature is wrong: find whose.
        for (check, n) in checks.iter().zip(&owners) {
            if let Err(reason) = authorship::verify_checks(std::slice::from_ref(check)) {
                let refused = Err(format!("{SIGNATURES_DO_NOT_HOLD}{reason}"));
                match prepared.get_mut(*n) {
                    Some(Some(Prepared::Received(Ok(p)))) => p.sigs = refused,
                    Some(Some(Prepared::Checked(checked))) => *checked = refused,
                    _ => {}
                }
            }
        }
    }
    prepared
}

/// Automerge's chunk header: magic bytes, checksum, then the chunk type (0: document).
pub(crate) fn is_document_chunk(bytes: &[u8]) -> bool {
    bytes.len() > 8 && bytes[..4] == [0x85, 0x6f, 0x4a, 0x83] && bytes[8] == 0
}

/// The actor id of a store, from its hex form.
pub(crate) fn actor_from_hex(hex: &str) -> ActorId {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    ActorId::from(bytes)
}
