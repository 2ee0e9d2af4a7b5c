//! Merging what peers send: documents and changes from outside the process, checked,
//! isolated and, when they cannot be merged, held — never dropped.
//!
//! Every Automerge call on a peer's bytes runs under `catch_unwind`: a panic inside
//! Automerge refuses that document (it is held with the reason) instead of killing the
//! writer thread. Bytes are first loaded on their own, refusing damaged or partial input
//! (Automerge's `load_incremental` would silently apply the readable part); only then
//! are they applied to the stored document. A merged record must keep its identity: its
//! `id` field names the document's own id, its collection is the one stored, and it nests
//! no deeper than [`MAX_RECORD_DEPTH`]. A merge that breaks any of this is undone.

use std::io::Read;
use std::panic::{AssertUnwindSafe, catch_unwind};

use automerge::{Automerge, ChangeHash, LoadOptions, OnPartialLoad, ReadDoc, VerificationMode};
use medmesh_protocol::DocId;
#[cfg(test)]
use medmesh_protocol::record::MAX_RECORD_DEPTH;
use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::schema::is_valid_collection_name;
use serde_json::Value;

/// Runs `work` on a peer's bytes; a panic becomes a refusal with a reason.
pub(crate) fn guarded<T>(work: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(work)) {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %escape(&what), "Automerge failed on bytes from a peer; the document is held");
            Err(format!(
                "Automerge could not process it (an internal failure: {})",
                escape(&what)
            ))
        }
    }
}

/// Automerge's chunk magic bytes.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// Largest size a compressed change may expand to.
const MAX_EXPANDED_CHANGE: u64 = 64 * 1024 * 1024;

/// Checks a peer's bytes chunk by chunk, each on its own: a saved document loads, a
/// change parses (a compressed one expands within bounds). Nothing is applied anywhere.
pub(crate) fn check_chunks(bytes: &[u8]) -> Result<(), String> {
    check_chunks_with(bytes, true)
}

/// [`check_chunks`]; without loading document chunks when `load_documents` is false
/// (for bytes about to be loaded on their own anyway, which is the same check).
fn check_chunks_with(bytes: &[u8], load_documents: bool) -> Result<(), String> {
    guarded(|| {
        let mut rest = bytes;
        if rest.is_empty() {
            return Err("no bytes arrived".into());
        }
        while !rest.is_empty() {
            let (kind, chunk, data) = next_chunk(rest)?;
            rest = &rest[chunk.len()..];
            match kind {
                0 if !load_documents => {}
                0 => {
                    Automerge::load_with_options(
                        chunk,
                        LoadOptions::new()
                            .on_partial_load(OnPartialLoad::Error)
                            .verification_mode(VerificationMode::Check),
                    )
                    .map_err(|e| format!("the document received is damaged: {e}"))?;
                }
                1 | 2 => {
                    if kind == 2 {
                        let mut decoder =
                            flate2::read::DeflateDecoder::new(data).take(MAX_EXPANDED_CHANGE + 1);
                        let expanded = std::io::copy(&mut decoder, &mut std::io::sink())
                            .map_err(|e| format!("a compressed change is damaged: {e}"))?;
                        if expanded > MAX_EXPANDED_CHANGE {
                            return Err("a compressed change expands beyond what is allowed".into());
                        }
                    }
                    automerge::Change::try_from(chunk)
                        .map_err(|e| format!("a change received is damaged: {e}"))?;
                }
                other => {
                    return Err(format!(
                        "it holds a kind of Automerge chunk ({other}) that medmesh does not exchange"
                    ));
                }
            }
        }
        Ok(())
    })
}

/// The next chunk of `bytes`: its type, the whole chunk, and its data.
pub(crate) fn next_chunk(bytes: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let damaged = || "the bytes received are not Automerge data (damaged or cut short)".to_owned();
    if bytes.len() < 10 || bytes[..4] != MAGIC {
        return Err(damaged());
    }
    let kind = bytes[8];
    let mut length: u64 = 0;
    let mut shift = 0;
    let mut at = 9;
    loop {
        let byte = *bytes.get(at).ok_or_else(damaged)?;
        at += 1;
        if shift > 56 {
            return Err(damaged());
        }
        length |= u64::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let end = usize::try_from(length)
        .ok()
        .and_then(|l| at.checked_add(l))
        .filter(|end| *end <= bytes.len())
        .ok_or_else(damaged)?;
    Ok((kind, &bytes[..end], &bytes[at..end]))
}

/// Loads a peer's bytes (a saved document, maybe followed by changes) as a document of
/// their own, refusing anything damaged or cut short.
pub(crate) fn load_received(bytes: &[u8]) -> Result<Automerge, String> {
    // Changes are checked (and compressed ones bounded) first; the document chunk is
    // checked by the load below, in isolation, which is all its own check would do.
    check_chunks_with(bytes, false)?;
    guarded(|| {
        Automerge::load_with_options(
            bytes,
            LoadOptions::new()
                .on_partial_load(OnPartialLoad::Error)
                .verification_mode(VerificationMode::Check),
        )
        .map_err(|e| format!("the document received is damaged: {e}"))
    })
}

/// Checks that a merged document still holds the record it is stored as, and reads it.
pub(crate) fn check_record(doc: &Automerge, id: &DocId) -> Result<Fields, String> {
    guarded(|| {
        let missing = doc.get_missing_deps(&[]);
        if !missing.is_empty() {
            return Err(format!(
                "{} of its changes arrived without the changes they build on",
                missing.len()
            ));
        }
        let record = record::read_record_checked(doc)?;
        match record.get("id") {
            Some(Value::String(text)) if text.parse::<DocId>().ok() == Some(*id) => Ok(record),
            Some(other) => Err(format!(
                "its `id` field says {} but it was sent as record {id}",
                escape(&other.to_string())
            )),
            None => Err(format!("it has no `id` field (sent as record {id})")),
        }
    })
}

/// Merges bytes into `doc`; on any failure `doc` is left exactly as it was.
pub(crate) fn merge_into(doc: &mut Automerge, bytes: &[u8], id: &DocId) -> Result<Fields, String> {
    // Checked on their own first: damage is refused before it touches the document.
    check_chunks(bytes)?;
    let before: Vec<ChangeHash> = doc.get_heads();
    let applied = guarded(|| {
        doc.load_incremental(bytes)
            .map_err(|e| format!("Automerge refused its changes: {e}"))?;
        check_record(doc, id)
    });
    match applied {
        Ok(record) => Ok(record),
        Err(reason) => {
            // Undo: the document as it was before this merge.
            let restored = guarded(|| {
                doc.fork_at(&before)
                    .map_err(|e| format!("the document could not be restored: {e}"))
            });
            match restored {
                Ok(mut old) => {
                    old.set_actor(doc.get_actor().clone());
                    *doc = old;
                    Ok(())
                }
                Err(err) => Err(err),
            }
            .map_err(|err| format!("{reason}; {err}"))?;
            Err(reason)
        }
    }
}

/// A collection name a peer may use: a valid name, or an internal one (`_` and a valid
/// name).
pub(crate) fn acceptable_collection(name: &str) -> bool {
    is_valid_collection_name(name.strip_prefix('_').unwrap_or(name))
}

/// Text from outside the process, made safe for a log line: control characters escaped,
/// cut to 200 characters.
pub fn escape(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(200)
        .flat_map(char::escape_default)
        .collect();
    if text.chars().count() > 200 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;

    fn doc_with_id(id: &DocId) -> Automerge {
        let mut doc = Automerge::new();
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(automerge::ROOT, "id", id.to_string())?;
            tx.put(automerge::ROOT, "given_name", "Amina")?;
            Ok(())
        })
        .expect("write");
        doc
    }

    #[test]
    fn damaged_bytes_leave_the_document_as_it_was() {
        let id = DocId::new_v7();
        let mut doc = doc_with_id(&id);
        let before = doc.get_heads();
        let mut other = doc.fork();
        other
            .transact::<_, _, automerge::AutomergeError>(|tx| {
                tx.put(automerge::ROOT, "surname", "Okafor")?;
                Ok(())
            })
            .expect("write");
        let mut bytes = other.save_after(&before);
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert!(merge_into(&mut doc, &bytes, &id).is_err());
        assert_eq!(doc.get_heads(), before);
        assert!(merge_into(&mut doc, &bytes[..bytes.len() / 2], &id).is_err());
        assert_eq!(doc.get_heads(), before);
    }

    #[test]
    fn a_change_of_the_id_is_refused_and_undone() {
        let id = DocId::new_v7();
        let mut doc = doc_with_id(&id);
        let before = doc.get_heads();
        let mut other = doc.fork();
        other
            .transact::<_, _, automerge::AutomergeError>(|tx| {
                tx.put(automerge::ROOT, "id", DocId::new_v7().to_string())?;
                Ok(())
            })
            .expect("write");
        let reason = merge_into(&mut doc, &other.save_after(&before), &id).expect_err("refused");
        assert!(reason.contains("`id` field"), "{reason}");
        assert_eq!(doc.get_heads(), before);
        assert_eq!(
            record::read_record(&doc)["id"],
            Value::String(id.to_string())
        );
    }

    #[test]
    fn too_deep_a_record_is_refused() {
        let id = DocId::new_v7();
        let mut doc = doc_with_id(&id);
        let before = doc.get_heads();
        let mut other = doc.fork();
        other
            .transact::<_, _, automerge::AutomergeError>(|tx| {
                let mut obj = automerge::ROOT;
                for _ in 0..(MAX_RECORD_DEPTH + 5) {
                    obj = tx.put_object(&obj, "x", automerge::ObjType::Map)?;
                }
                Ok(())
            })
            .expect("write");
        let reason = merge_into(&mut doc, &other.save_after(&before), &id).expect_err("refused");
        assert!(reason.contains("deeper"), "{reason}");
        assert_eq!(doc.get_heads(), before);
    }

    #[test]
    fn collection_names_from_peers_are_checked() {
        assert!(acceptable_collection("lab_reports"));
        assert!(acceptable_collection("_schema"));
        assert!(!acceptable_collection("../etc"));
        assert!(!acceptable_collection(""));
        assert!(!acceptable_collection(&"a".repeat(100)));
    }

    #[test]
    fn escape_makes_peer_text_one_safe_line() {
        assert_eq!(escape("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        assert!(escape(&"x".repeat(500)).ends_with('…'));
    }
}
