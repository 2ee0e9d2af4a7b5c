//! A JSON record as an Automerge document, and back.
//!
//! One record is one document. Its root map holds the record's fields; nested JSON
//! objects become Automerge maps, arrays become lists, and scalars keep their JSON type:
//! an integer stays an integer (`Int`, or `Uint` above `i64::MAX`), a float stays a float
//! (`F64`, so `1.0` comes back as `1.0`), plus booleans, strings and nulls. Fields the
//! schema does not know are stored like any other, so a newer app's fields survive.
//!
//! Writes are field-level: [`write_fields`] and [`replace_fields`] compare the new value
//! with the document's current one and emit only the operations that differ, recursing
//! into maps and lists. Two devices that edit different fields of one record therefore
//! make changes that merge without either being lost; edits of the same field are a
//! conflict that Automerge resolves the same way on every device, keeping the losing
//! value readable through [`conflicts`].

use std::collections::BTreeSet;

use automerge::transaction::Transactable;
use automerge::{
    Automerge, ChangeHash, ObjId, ObjType, PatchAction, Prop, ROOT, ReadDoc, ScalarValue,
    ScalarValueRef, ValueRef, hydrate,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

/// A JSON object: one record, or a set of fields to write.
pub type Fields = Map<String, Value>;

/// Who made a change: stored as the Automerge change's message, so a record's history
/// says which device and which user or app wrote each change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ChangeAuthor {
    /// The device (node peer id) that made the change.
    #[serde(rename = "d")]
    pub device: String,
    /// The user or app that asked for it, when known (`X-Medmesh-User`).
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl ChangeAuthor {
    /// The change message that records this author.
    pub fn to_message(&self) -> String {
        // Serializing two strings cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The author recorded in a change message; a message written by another program
    /// is reported as its text, with no device.
    pub fn from_message(message: Option<&str>) -> Self {
        match message {
            None => Self::default(),
            Some(text) => serde_json::from_str(text).unwrap_or_else(|_| Self {
                device: String::new(),
                user: Some(text.to_owned()),
            }),
        }
    }
}

/// A document that does not hold a record as medmesh writes them, or a write that
/// Automerge refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// Automerge refused an operation (a bug or a damaged document).
    #[error("the document could not be read or changed: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// A choice named a field the record does not have where it says (a path through
    /// something that is not an object).
    #[error(
        "`{0}` is not a field of this record (nested fields are named with dots, as in the conflicts listed)"
    )]
    NotAField(String),
    /// A choice named a counter, which adds up every device's moves and holds no
    /// conflict.
    #[error(
        "`{0}` is a counter: it adds up every device's changes, so there is no value to choose"
    )]
    Counter(String),
}

/// Deepest nesting of objects and lists a record may have (the record itself is depth 0).
/// Deeper parts are not read: no document can drive a reader into unbounded recursion.
pub const MAX_RECORD_DEPTH: usize = 32;

/// Reads the whole record held by `doc` as a JSON object. Anything nested deeper than
/// [`MAX_RECORD_DEPTH`] reads as `null` (see [`read_record_checked`] to refuse it).
pub fn read_record<R: ReadDoc>(doc: &R) -> Fields {
    let mut too_deep = false;
    read_map(doc, &ROOT, 0, &mut too_deep)
}

/// Reads the whole record, or says why it is not one a node should store: nesting deeper
/// than [`MAX_RECORD_DEPTH`].
pub fn read_record_checked<R: ReadDoc>(doc: &R) -> Result<Fields, String> {
    let mut too_deep = false;
    let fields = read_map(doc, &ROOT, 0, &mut too_deep);
    if too_deep {
        Err(format!(
            "the record nests objects or lists deeper than {MAX_RECORD_DEPTH} levels"
        ))
    } else {
        Ok(fields)
    }
}

fn read_map<R: ReadDoc>(doc: &R, obj: &ObjId, depth: usize, too_deep: &mut bool) -> Fields {
    let mut out = Map::new();
    for item in doc.map_range(obj, ..) {
        let value = match &item.value {
            ValueRef::Object(ty) => read_object(doc, *ty, &item.id(), depth + 1, too_deep),
            ValueRef::Scalar(scalar) => scalar_ref_to_json(scalar),
        };
        out.insert(item.key.into_owned(), value);
    }
    out
}

fn read_list<R: ReadDoc>(doc: &R, obj: &ObjId, depth: usize, too_deep: &mut bool) -> Vec<Value> {
    doc.list_range(obj, ..)
        .map(|item| match &item.value {
            ValueRef::Object(ty) => read_object(doc, *ty, &item.id(), depth + 1, too_deep),
            ValueRef::Scalar(scalar) => scalar_ref_to_json(scalar),
        })
        .collect()
}

fn read_object<R: ReadDoc>(
    doc: &R,
    ty: ObjType,
    id: &ObjId,
    depth: usize,
    too_deep: &mut bool,
) -> Value {
    if depth > MAX_RECORD_DEPTH {
        *too_deep = true;
        return Value::Null;
    }
    match ty {
        ObjType::Map | ObjType::Table => Value::Object(read_map(doc, id, depth, too_deep)),
        ObjType::List => Value::Array(read_list(doc, id, depth, too_deep)),
        ObjType::Text => Value::String(doc.text(id).unwrap_or_default()),
    }
}

fn scalar_ref_to_json(value: &ScalarValueRef<'_>) -> Value {
    match value {
        ScalarValueRef::Str(s) => Value::String(s.to_string()),
        ScalarValueRef::Int(i) | ScalarValueRef::Counter(i) => Value::from(*i),
        ScalarValueRef::Uint(u) => Value::from(*u),
        ScalarValueRef::F64(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        ScalarValueRef::Boolean(b) => Value::Bool(*b),
        ScalarValueRef::Null => Value::Null,
        ScalarValueRef::Timestamp(ms) => chrono::DateTime::from_timestamp_millis(*ms)
            .map_or(Value::from(*ms), |t| {
                Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            }),
        ScalarValueRef::Bytes(b) => Value::String(b.iter().map(|x| format!("{x:02x}")).collect()),
        ScalarValueRef::Unknown { .. } => Value::Null,
    }
}

fn json_to_scalar(value: &Value) -> Option<ScalarValue> {
    Some(match value {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(*b),
        Value::String(s) => ScalarValue::Str(s.as_str().into()),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::Array(_) | Value::Object(_) => return None,
    })
}

/// Is the stored scalar exactly the JSON value (same type, same value)?
fn scalar_equals(stored: &ScalarValueRef<'_>, new: &Value) -> bool {
    match (stored, json_to_scalar(new)) {
        (ScalarValueRef::Str(a), Some(ScalarValue::Str(b))) => a.as_ref() == b.as_str(),
        (ScalarValueRef::Int(a), Some(ScalarValue::Int(b))) => *a == b,
        (ScalarValueRef::Uint(a), Some(ScalarValue::Uint(b))) => *a == b,
        (ScalarValueRef::F64(a), Some(ScalarValue::F64(b))) => a.to_bits() == b.to_bits(),
        (ScalarValueRef::Boolean(a), Some(ScalarValue::Boolean(b))) => *a == b,
        (ScalarValueRef::Null, Some(ScalarValue::Null)) => true,
        _ => false,
    }
}

/// Writes each of `fields` into the record's root map, emitting only what differs from
/// the current value. Fields not named are left as they are (a PATCH).
pub fn write_fields<T: Transactable>(tx: &mut T, fields: &Fields) -> Result<(), RecordError> {
    for (key, value) in fields {
        put_value(tx, &ROOT, Prop::Map(key.clone()), value)?;
    }
    Ok(())
}

/// Writes a person's choice for the field at `path` (`["address", "town"]`): always
/// written, even where it equals the value shown now, over every concurrent value, which
/// settles that field's conflict and no other. An ordinary write of the value shown (a
/// device or the cloud sending the record back as it saw it) makes no change, and
/// leaves the conflict for a person to see.
pub fn settle_field<T: Transactable>(
    tx: &mut T,
    path: &[String],
    value: &Value,
) -> Result<(), RecordError> {
    let not_a_field = || RecordError::NotAField(path.join("."));
    let (last, parents) = path.split_last().ok_or_else(not_a_field)?;
    let mut obj = ROOT;
    for key in parents {
        match tx.get(&obj, key.as_str())? {
            Some((automerge::Value::Object(ObjType::Map), child)) => obj = child,
            _ => return Err(not_a_field()),
        }
    }
    if let Some((automerge::Value::Scalar(stored), _)) = tx.get(&obj, last.as_str())?
        && matches!(stored.as_ref(), ScalarValue::Counter(_))
    {
        return Err(RecordError::Counter(path.join(".")));
    }
    put_fresh(tx, &obj, Prop::Map(last.clone()), value)
}

/// Makes the record's root map equal `fields` (a PUT), except that fields named in
/// `keep` are left alone when `fields` does not name them; emits only what differs.
pub fn replace_fields<T: Transactable>(
    tx: &mut T,
    fields: &Fields,
    keep: &[&str],
) -> Result<(), RecordError> {
    write_fields(tx, fields)?;
    let stale: Vec<String> = tx
        .keys(ROOT)
        .filter(|k| !fields.contains_key(k) && !keep.contains(&k.as_str()))
        .collect();
    for key in stale {
        tx.delete(ROOT, key.as_str())?;
    }
    Ok(())
}

/// Puts `value` at `prop` of `obj` with the fewest operations.
fn put_value<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    value: &Value,
) -> Result<(), RecordError> {
    let current = tx.get(obj, prop.clone())?;
    match (value, current) {
        (Value::Object(fields), Some((automerge::Value::Object(ObjType::Map), child))) => {
            for (key, v) in fields {
                put_value(tx, &child, Prop::Map(key.clone()), v)?;
            }
            let stale: Vec<String> = tx
                .keys(&child)
                .filter(|k| !fields.contains_key(k))
                .collect();
            for key in stale {
                tx.delete(&child, key.as_str())?;
            }
        }
        (Value::Array(items), Some((automerge::Value::Object(ObjType::List), child))) => {
            let old_len = tx.length(&child);
            for (index, item) in items.iter().enumerate().take(old_len) {
                put_value(tx, &child, Prop::Seq(index), item)?;
            }
            for (index, item) in items.iter().enumerate().skip(old_len) {
                insert_value(tx, &child, index, item)?;
            }
            for index in (items.len()..old_len).rev() {
                tx.delete(&child, index)?;
            }
        }
        (Value::Number(n), Some((automerge::Value::Scalar(stored), _)))
            if matches!(stored.as_ref(), ScalarValue::Counter(_)) =>
        {
            // A counter stays a counter: setting it to N is an increment by the
            // difference, so concurrent increments elsewhere are kept.
            let current = match stored.as_ref() {
                ScalarValue::Counter(c) => i64::from(c),
                _ => 0,
            };
            match n.as_i64() {
                Some(target) if target != current => {
                    tx.increment(obj, prop, target.saturating_sub(current))?;
                }
                Some(_) => {}
                None => put_fresh(tx, obj, prop, value)?,
            }
        }
        (_, Some((automerge::Value::Scalar(stored), _))) if value_is_scalar(value) => {
            if !scalar_equals(&scalar_value_as_ref(stored.as_ref()), value) {
                put_fresh(tx, obj, prop, value)?;
            }
        }
        _ => put_fresh(tx, obj, prop, value)?,
    }
    Ok(())
}

fn value_is_scalar(value: &Value) -> bool {
    !matches!(value, Value::Object(_) | Value::Array(_))
}

fn scalar_value_as_ref(value: &ScalarValue) -> ScalarValueRef<'_> {
    match value {
        ScalarValue::Bytes(b) => ScalarValueRef::Bytes(b.as_slice().into()),
        ScalarValue::Str(s) => ScalarValueRef::Str(s.as_str().into()),
        ScalarValue::Int(i) => ScalarValueRef::Int(*i),
        ScalarValue::Uint(u) => ScalarValueRef::Uint(*u),
        ScalarValue::F64(f) => ScalarValueRef::F64(*f),
        ScalarValue::Counter(c) => ScalarValueRef::Counter(i64::from(c)),
        ScalarValue::Timestamp(t) => ScalarValueRef::Timestamp(*t),
        ScalarValue::Boolean(b) => ScalarValueRef::Boolean(*b),
        ScalarValue::Unknown { type_code, bytes } => ScalarValueRef::Unknown {
            type_code: *type_code,
            bytes: bytes.as_slice().into(),
        },
        ScalarValue::Null => ScalarValueRef::Null,
    }
}

/// Writes `value` at `prop` as a new value, replacing whatever was there. Objects and
/// arrays are created in one batch operation (much faster than one put per node).
fn put_fresh<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    value: &Value,
) -> Result<(), RecordError> {
    match json_to_scalar(value) {
        Some(scalar) => {
            tx.put(obj, prop, scalar)?;
        }
        None => {
            tx.batch_create_object(obj, prop, &to_hydrate(value), false)?;
        }
    }
    Ok(())
}

fn insert_value<T: Transactable>(
    tx: &mut T,
    list: &ObjId,
    index: usize,
    value: &Value,
) -> Result<(), RecordError> {
    match json_to_scalar(value) {
        Some(scalar) => {
            tx.insert(list, index, scalar)?;
        }
        None => {
            tx.batch_create_object(list, Prop::Seq(index), &to_hydrate(value), true)?;
        }
    }
    Ok(())
}

/// A JSON value as Automerge's hydrated form.
fn to_hydrate(value: &Value) -> hydrate::Value {
    match value {
        Value::Object(fields) => hydrate::Value::Map(hydrate_map(fields)),
        Value::Array(items) => {
            hydrate::Value::List(items.iter().map(to_hydrate).collect::<Vec<_>>().into())
        }
        scalar => hydrate::Value::Scalar(json_to_scalar(scalar).unwrap_or(ScalarValue::Null)),
    }
}

fn hydrate_map(fields: &Fields) -> hydrate::Map {
    fields
        .iter()
        .map(|(k, v)| (k.clone(), to_hydrate(v)))
        .collect::<std::collections::HashMap<String, hydrate::Value>>()
        .into()
}

/// Writes a whole new record into an empty document in one batch (the fast path for
/// creating records).
pub fn init_record<T: Transactable>(tx: &mut T, fields: &Fields) -> Result<(), RecordError> {
    tx.init_root_from_hydrate(&hydrate_map(fields))?;
    Ok(())
}

/// Makes `field` of the record an Automerge counter starting at `start` (used for stock
/// quantities, so concurrent movements add up).
pub fn put_counter<T: Transactable>(
    tx: &mut T,
    field: &str,
    start: i64,
) -> Result<(), RecordError> {
    tx.put(ROOT, field, ScalarValue::counter(start))?;
    Ok(())
}

/// A field that holds concurrent values after a merge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldConflict {
    /// The field, with a dotted path for a field inside a nested object.
    pub field: String,
    /// The value every device shows (the deterministic winner).
    pub value: Value,
    /// Every concurrent value, the winner included.
    pub values: Vec<Value>,
}

/// Lists the fields of the record that hold concurrent values.
pub fn conflicts<R: ReadDoc>(doc: &R) -> Vec<FieldConflict> {
    let mut out = Vec::new();
    collect_conflicts(doc, &ROOT, "", 0, &mut out);
    out
}

fn collect_conflicts<R: ReadDoc>(
    doc: &R,
    obj: &ObjId,
    prefix: &str,
    depth: usize,
    out: &mut Vec<FieldConflict>,
) {
    if depth > MAX_RECORD_DEPTH {
        return;
    }
    let items: Vec<(String, bool, Option<ObjId>)> = doc
        .map_range(obj, ..)
        .map(|item| {
            let child = match item.value {
                ValueRef::Object(ObjType::Map) => Some(item.id()),
                _ => None,
            };
            (item.key.into_owned(), item.conflict, child)
        })
        .collect();
    for (key, conflict, child) in items {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if conflict {
            let values: Vec<Value> = doc
                .get_all(obj, key.as_str())
                .unwrap_or_default()
                .into_iter()
                .map(|(value, id)| owned_value_to_json(doc, value, id, depth))
                .collect();
            let value = doc
                .get(obj, key.as_str())
                .ok()
                .flatten()
                .map_or(Value::Null, |(value, id)| {
                    owned_value_to_json(doc, value, id, depth)
                });
            out.push(FieldConflict {
                field: path.clone(),
                value,
                values,
            });
        }
        if let Some(child) = child {
            collect_conflicts(doc, &child, &path, depth + 1, out);
        }
    }
}

fn owned_value_to_json<R: ReadDoc>(
    doc: &R,
    value: automerge::Value<'_>,
    id: ObjId,
    depth: usize,
) -> Value {
    match value {
        automerge::Value::Object(ty) => read_object(doc, ty, &id, depth + 1, &mut false),
        automerge::Value::Scalar(s) => scalar_ref_to_json(&scalar_value_as_ref(s.as_ref())),
    }
}

/// One change in a record's history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    /// The change's hash.
    pub hash: String,
    /// When the writing device made it (milliseconds since the epoch, device clock).
    pub time_ms: i64,
    /// Who made it.
    pub author: ChangeAuthor,
    /// The record's top-level fields it changed.
    pub fields: Vec<String>,
}

/// The record's changes, oldest first (causal order), with the fields each touched.
pub fn history(doc: &Automerge) -> Vec<HistoryEntry> {
    let metas: Vec<(ChangeHash, Vec<ChangeHash>, i64, ChangeAuthor)> = doc
        .get_changes_meta(&[])
        .into_iter()
        .map(|m| {
            (
                m.hash,
                m.deps.clone(),
                m.timestamp,
                ChangeAuthor::from_message(m.message.as_deref()),
            )
        })
        .collect();
    metas
        .into_iter()
        .map(|(hash, deps, time_ms, author)| {
            let mut fields = BTreeSet::new();
            for patch in doc.diff(&deps, &[hash]) {
                let top = match patch.path.first() {
                    Some((_, Prop::Map(key))) => Some(key.clone()),
                    Some((_, Prop::Seq(_))) => None,
                    None => match patch.action {
                        PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key } => {
                            Some(key)
                        }
                        PatchAction::Increment {
                            prop: Prop::Map(key),
                            ..
                        }
                        | PatchAction::Conflict {
                            prop: Prop::Map(key),
                        } => Some(key),
                        _ => None,
                    },
                };
                fields.extend(top);
            }
            HistoryEntry {
                hash: hash.to_string(),
                time_ms,
                author,
                fields: fields.into_iter().collect(),
            }
        })
        .collect()
}

/// A timestamp field's value in milliseconds since the epoch: an RFC 3339 string or an
/// epoch number (seconds when it has 10 digits or fewer, milliseconds otherwise, as the
/// Hikma Health cloud reads them).
pub fn timestamp_ms(value: &Value) -> Option<i64> {
    match value {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.timestamp_millis()),
        Value::Number(n) => {
            let v = n.as_i64()?;
            Some(if v.abs() < 10_000_000_000 {
                v * 1000
            } else {
                v
            })
        }
        _ => None,
    }
}

/// Formats milliseconds since the epoch as the RFC 3339 text medmesh writes
/// (`2026-11-23T18:09:18.123Z`).
pub fn format_timestamp(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::CommitOptions;
    use proptest::prelude::*;
    use serde_json::json;

    fn doc_from(fields: &Fields) -> Automerge {
        let mut doc = Automerge::new();
        doc.transact::<_, _, RecordError>(|tx| write_fields(tx, fields))
            .expect("write");
        doc
    }

    fn obj(v: Value) -> Fields {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn nested_values_and_number_kinds_round_trip() {
        let record = obj(json!({
            "id": "0192f0c4-6a1e-7cc3-9d0e-5b8f1c2a3d4e",
            "given_name": "Amina",
            "weight_kg": 61.0,
            "visits": 3,
            "big": 18446744073709551615u64,
            "neg": -7,
            "alive": true,
            "deleted_at": null,
            "metadata": {"source": {"app": "hikma", "v": [1, 2.5, "x", null, {"a": []}]}},
            "unknown_future_field": ["keep", "me"]
        }));
        let doc = doc_from(&record);
        let back = read_record(&doc);
        assert_eq!(Value::Object(back.clone()), Value::Object(record.clone()));
        assert!(back["weight_kg"].is_f64());
        assert!(back["visits"].is_i64());
        // Survives save and load.
        let loaded = Automerge::load(&doc.save()).expect("load");
        assert_eq!(read_record(&loaded), record);
    }

    #[test]
    fn patch_changes_only_the_given_fields() {
        let mut doc = doc_from(&obj(json!({"a": 1, "b": {"c": 2, "d": 3}})));
        doc.transact::<_, _, RecordError>(|tx| {
            write_fields(tx, &obj(json!({"b": {"c": 2, "d": 4}})))
        })
        .expect("patch");
        assert_eq!(
            Value::Object(read_record(&doc)),
            json!({"a": 1, "b": {"c": 2, "d": 4}})
        );
        // Only one field changed: history sees `b` only.
        let last = history(&doc).pop().expect("a change");
        assert_eq!(last.fields, vec!["b".to_owned()]);
    }

    #[test]
    fn writing_an_identical_record_makes_no_change() {
        let record = obj(json!({"a": 1, "b": [1, {"x": "y"}], "c": 1.5}));
        let mut doc = doc_from(&record);
        let result = doc
            .transact::<_, _, RecordError>(|tx| replace_fields(tx, &record, &[]))
            .expect("replace");
        assert_eq!(result.hash, None, "no operations for an identical write");
    }

    #[test]
    fn replace_removes_fields_not_given_except_kept_ones() {
        let mut doc = doc_from(&obj(json!({"id": "x", "a": 1, "b": 2, "created_at": "t"})));
        doc.transact::<_, _, RecordError>(|tx| {
            replace_fields(tx, &obj(json!({"a": 5})), &["id", "created_at"])
        })
        .expect("replace");
        assert_eq!(
            Value::Object(read_record(&doc)),
            json!({"a": 5, "created_at": "t", "id": "x"})
        );
    }

    #[test]
    fn concurrent_edits_of_different_fields_both_survive_and_same_field_conflicts() {
        let base = doc_from(&obj(
            json!({"given_name": "Ana", "surname": "Diaz", "phone": "1"}),
        ));
        let mut left = base.fork();
        let mut right = base.fork();
        left.transact_with::<_, _, RecordError, _>(
            |_| {
                CommitOptions::default().with_message(
                    ChangeAuthor {
                        device: "L".into(),
                        user: Some("nurse".into()),
                    }
                    .to_message(),
                )
            },
            |tx| write_fields(tx, &obj(json!({"given_name": "Anna", "phone": "2"}))),
        )
        .expect("left");
        right
            .transact::<_, _, RecordError>(|tx| {
                write_fields(tx, &obj(json!({"surname": "Díaz", "phone": "3"})))
            })
            .expect("right");
        let mut merged_lr = left.clone();
        merged_lr.merge(&mut right.clone()).expect("merge");
        let mut merged_rl = right.clone();
        merged_rl.merge(&mut left.clone()).expect("merge");
        let a = read_record(&merged_lr);
        assert_eq!(a, read_record(&merged_rl), "same winner on both sides");
        assert_eq!(a["given_name"], json!("Anna"));
        assert_eq!(a["surname"], json!("Díaz"));
        let c = conflicts(&merged_lr);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].field, "phone");
        let mut values: Vec<String> = c[0].values.iter().map(|v| v.to_string()).collect();
        values.sort();
        assert_eq!(values, vec!["\"2\"", "\"3\""]);
        assert_eq!(c, conflicts(&merged_rl));
        let authors: Vec<ChangeAuthor> =
            history(&merged_lr).into_iter().map(|h| h.author).collect();
        assert!(
            authors
                .iter()
                .any(|a| a.device == "L" && a.user.as_deref() == Some("nurse"))
        );
    }

    #[test]
    fn choosing_a_value_settles_that_conflict_only_and_writing_it_back_does_not() {
        let base = doc_from(&obj(
            json!({"phone": "1", "address": {"town": "A", "street": "x"}}),
        ));
        let mut left = base.fork();
        let mut right = base.fork();
        for (doc, side) in [(&mut left, "l"), (&mut right, "r")] {
            doc.transact::<_, _, RecordError>(|tx| {
                // A scalar, two nested fields, and a map and a list made on both sides at
                // once (each conflicts as a whole).
                write_fields(
                    tx,
                    &obj(
                        json!({"phone": side, "address": {"town": side, "street": side},
                                "extra": {"note": side}, "tags": [side]}),
                    ),
                )
            })
            .expect("edit");
        }
        left.merge(&mut right).expect("merge");
        let fields = |doc: &Automerge| -> Vec<String> {
            conflicts(doc).into_iter().map(|c| c.field).collect()
        };
        let all = ["address.street", "address.town", "extra", "phone", "tags"];
        assert_eq!(fields(&left), all);
        let shown = read_record(&left);
        // The record written back as it is shown (a device or the cloud sending what it
        // saw) is no choice: no change, every conflict stays for a person to see.
        let echo = left
            .transact::<_, _, RecordError>(|tx| write_fields(tx, &shown))
            .expect("echo");
        assert_eq!(echo.hash, None);
        assert_eq!(fields(&left), all);
        // Choosing the value shown of a nested field settles it, and not the field beside.
        let path = |p: &str| -> Vec<String> { p.split('.').map(str::to_owned).collect() };
        let choose = |doc: &mut Automerge, p: &str, value: &Value| {
            doc.transact::<_, _, RecordError>(|tx| settle_field(tx, &path(p), value))
                .expect("choose")
        };
        let result = choose(&mut left, "address.town", &shown["address"]["town"]);
        assert!(result.hash.is_some(), "a choice is a change");
        assert_eq!(fields(&left), ["address.street", "extra", "phone", "tags"]);
        for p in ["phone", "extra", "tags"] {
            choose(&mut left, p, &shown[p]);
        }
        assert_eq!(fields(&left), ["address.street"]);
        assert_eq!(read_record(&left), shown, "the values are the ones chosen");
        // What is not a field, or is a counter, is refused and changes nothing.
        let refused =
            left.transact::<_, _, RecordError>(|tx| settle_field(tx, &path("phone.x"), &json!(1)));
        assert!(matches!(refused, Err(f) if matches!(f.error, RecordError::NotAField(_))));
        left.transact::<_, _, RecordError>(|tx| {
            tx.put(ROOT, "n", ScalarValue::counter(1))?;
            Ok(())
        })
        .expect("counter");
        let refused =
            left.transact::<_, _, RecordError>(|tx| settle_field(tx, &path("n"), &json!(5)));
        assert!(matches!(refused, Err(f) if matches!(f.error, RecordError::Counter(_))));
    }

    #[test]
    fn setting_a_counter_increments_it() {
        let mut doc = Automerge::new();
        doc.transact::<_, _, RecordError>(|tx| put_counter(tx, "quantity", 10))
            .expect("counter");
        let mut other = doc.fork();
        doc.transact::<_, _, RecordError>(|tx| write_fields(tx, &obj(json!({"quantity": 7}))))
            .expect("set");
        other
            .transact::<_, _, RecordError>(|tx| write_fields(tx, &obj(json!({"quantity": 12}))))
            .expect("set");
        doc.merge(&mut other).expect("merge");
        // 10 - 3 + 2
        assert_eq!(read_record(&doc)["quantity"], json!(9));
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn record_strategy() -> impl Strategy<Value = Fields> {
        prop::collection::btree_map("[a-z_]{1,10}", json_value(), 0..8)
            .prop_map(|m| m.into_iter().collect())
    }

    fn sorted(v: Value) -> Value {
        // Automerge maps are ordered by key; compare as sorted objects.
        match v {
            Value::Object(m) => {
                let mut entries: Vec<(String, Value)> =
                    m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Object(entries.into_iter().collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
            other => other,
        }
    }

    proptest! {
        #[test]
        fn any_json_record_round_trips(record in record_strategy()) {
            let doc = doc_from(&record);
            let loaded = Automerge::load(&doc.save()).expect("load");
            prop_assert_eq!(sorted(Value::Object(read_record(&loaded))), sorted(Value::Object(record)));
        }

        #[test]
        fn replacing_one_record_by_another_gives_exactly_the_other(a in record_strategy(), b in record_strategy()) {
            let mut doc = doc_from(&a);
            doc.transact::<_, _, RecordError>(|tx| replace_fields(tx, &b, &[])).expect("replace");
            prop_assert_eq!(sorted(Value::Object(read_record(&doc))), sorted(Value::Object(b)));
        }
    }
}
