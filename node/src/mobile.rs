//! The Hikma Health mobile app's sync, served by every node (`GET` and `POST
//! /api/v2/sync`, the WatermelonDB protocol as `HIKMA_SYNC_API.md` restates it), so an
//! unmodified app can use the node on its tablet, or any node of the mesh, as its server.
//!
//! - **Pull** answers what changed on this node since `last_pulled_at`, in the app's value
//!   forms (timestamps as epoch milliseconds, JSON columns as JSON text, dates as
//!   `YYYY-MM-DD`). The `timestamp` it hands out is this node's own, strictly increasing,
//!   and remembered with the feed position it stood for; a `last_pulled_at` this node did
//!   not hand out (another node's, one from before a restore, one from the future) gets a
//!   complete answer, so an app that moves between nodes misses nothing.
//! - **Push** applies rows field by field: an updated row carries `_changed`, the columns
//!   the app changed since its last sync, and only those are written — the app's stale
//!   copy of the other columns never overwrites newer values from the mesh. A pushed
//!   `dispensing_records` row is a dispense of this node's pharmacy, counted once.
//!
//! The handlers are in `api::mobile`; this module knows no HTTP.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use chrono::Utc;

use crate::forms::{app_value, stored_value};
use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::schema::CollectionSpec;
use medmesh_protocol::{ChangeAuthor, DocId};
use medmesh_storage::{Query, RecordView, Store, StoreError, WriteBatch, WriteKind, WriteOp};
use serde_json::{Map, Value, json};

/// The tables the app pulls, in the order the answer lists them.
pub const PULLED_TABLES: [&str; 18] = [
    "patients",
    "patient_additional_attributes",
    "clinics",
    "visits",
    "events",
    "event_forms",
    "registration_forms",
    "appointments",
    "prescriptions",
    "patient_vitals",
    "patient_problems",
    "clinic_departments",
    "drug_catalogue",
    "clinic_inventory",
    "dispensing_records",
    "prescription_items",
    "user_clinic_permissions",
    "app_config",
];

/// The tables the app pushes; rows of other tables are ignored, as the cloud does.
pub const PUSHED_TABLES: [&str; 10] = [
    "patients",
    "patient_additional_attributes",
    "visits",
    "events",
    "appointments",
    "prescriptions",
    "patient_vitals",
    "patient_problems",
    "dispensing_records",
    "prescription_items",
];

/// The store-wide value holding the pull timestamps handed out.
const MARKS_KEY: &str = "mobile-pull-marks";
/// Pull timestamps remembered; an older one gets a complete answer.
const MARKS_KEPT: usize = 4096;
/// Feed entries read per step of a pull.
const FEED_PAGE: usize = 1000;
/// Rows one push may carry, at most.
pub const MAX_PUSH_ROWS: usize = 20_000;

/// The app's sync on this node. One per node: it owns the pull timestamps.
pub struct MobileSync {
    store: Store,
    pharmacy: std::sync::Arc<crate::pharmacy::Pharmacy>,
    device: String,
    /// (timestamp handed out, feed position it stands for), oldest first.
    marks: Mutex<Vec<(i64, u64)>>,
}

impl MobileSync {
    /// The app's sync over this node's store and pharmacy.
    pub fn new(
        store: Store,
        pharmacy: std::sync::Arc<crate::pharmacy::Pharmacy>,
        device: String,
    ) -> Self {
        let marks = store
            .get_info(MARKS_KEY)
            .ok()
            .flatten()
            .map(|bytes| decode_marks(&bytes))
            .unwrap_or_default();
        Self {
            store,
            pharmacy,
            device,
            marks: Mutex::new(marks),
        }
    }

    /// Hands out the next timestamp for the feed position `seq`, remembered durably.
    fn mark(&self, seq: u64) -> Result<i64> {
        let mut marks = self
            .marks
            .lock()
            .map_err(|_| anyhow::anyhow!("the pull timestamps are unavailable"))?;
        let last = marks.last().map_or(0, |(t, _)| *t);
        let timestamp = Utc::now().timestamp_millis().max(last + 1);
        marks.push((timestamp, seq));
        if marks.len() > MARKS_KEPT {
            let excess = marks.len() - MARKS_KEPT;
            marks.drain(..excess);
        }
        self.store
            .put_info_blocking(MARKS_KEY, &encode_marks(&marks))
            .context("could not save the pull timestamp")?;
        Ok(timestamp)
    }

    /// The feed position a timestamp this node handed out stands for.
    fn position_of(&self, timestamp: i64) -> Option<u64> {
        let marks = self.marks.lock().ok()?;
        marks
            .binary_search_by_key(&timestamp, |(t, _)| *t)
            .ok()
            .map(|i| marks[i].1)
    }

    /// A pull: `{"changes": {...}, "timestamp": T}` (the handler adds `success`).
    pub fn pull(&self, last_pulled_at: Option<i64>) -> Result<Value> {
        self.pull_except(last_pulled_at, None)
    }

    /// [`MobileSync::pull`] leaving out of a pull since a timestamp the rows this app
    /// pushed itself and nobody changed since (`pushed`: record → its feed position after
    /// the push): sent back, a row the app deleted meanwhile would come back as new.
    pub fn pull_except(
        &self,
        last_pulled_at: Option<i64>,
        pushed: Option<&std::collections::HashMap<DocId, u64>>,
    ) -> Result<Value> {
        let head = self.store.last_seq()?;
        let since = last_pulled_at
            .filter(|t| *t > 0)
            .and_then(|t| self.position_of(t).map(|seq| (t, seq)));
        let mut tables: BTreeMap<&str, Changes> = PULLED_TABLES
            .iter()
            .map(|t| (*t, Changes::default()))
            .collect();
        let schema = self.store.schema();
        match since {
            Some((since_ms, since_seq)) => {
                let mut after = since_seq;
                while after < head {
                    let entries = self.store.changes_since(after, FEED_PAGE)?;
                    let Some(last) = entries.last() else {
                        break;
                    };
                    after = last.seq;
                    for entry in entries {
                        let Ok(view) = entry.record else {
                            continue;
                        };
                        if pushed.and_then(|p| p.get(&view.id)) == Some(&view.seq) {
                            continue;
                        }
                        let Some(changes) = tables.get_mut(view.collection.as_str()) else {
                            continue;
                        };
                        if view.deleted {
                            changes.deleted.push(json!(view.id.to_string()));
                            continue;
                        }
                        let created = view
                            .record
                            .get("created_at")
                            .and_then(record::timestamp_ms)
                            .is_some_and(|ms| ms >= since_ms);
                        let row = self.to_app(schema.collection(&view.collection), view)?;
                        if created {
                            changes.created.push(row);
                        } else {
                            changes.updated.push(row);
                        }
                    }
                }
            }
            None => {
                // Everything live: a first pull, or a timestamp this node did not hand out.
                for table in PULLED_TABLES {
                    let spec = schema.collection(table);
                    let mut cursor = None;
                    loop {
                        let page = self.store.list(&Query {
                            collection: table.to_owned(),
                            limit: FEED_PAGE,
                            cursor,
                            ..Query::default()
                        })?;
                        let changes = tables.get_mut(table).context("table")?;
                        for view in page.records {
                            changes.created.push(self.to_app(spec, view)?);
                        }
                        match page.next {
                            Some(next) => cursor = Some(next),
                            None => break,
                        }
                    }
                }
            }
        }
        let timestamp = self.mark(head)?;
        let changes: Map<String, Value> = tables
            .into_iter()
            .map(|(table, c)| {
                (
                    table.to_owned(),
                    json!({"created": c.created, "updated": c.updated, "deleted": c.deleted}),
                )
            })
            .collect();
        Ok(json!({"changes": changes, "timestamp": timestamp}))
    }

    /// A record as the app stores it.
    fn to_app(&self, spec: Option<&CollectionSpec>, view: RecordView) -> Result<Value> {
        let mut row = view.record;
        if view.collection == "clinic_inventory"
            && let Some(quantity) = self.pharmacy.quantity(&view.id)?
        {
            row.insert(crate::pharmacy::QUANTITY.into(), Value::from(quantity));
        }
        row.remove("_status");
        row.remove("_changed");
        for (name, value) in row.iter_mut() {
            let ty = spec.and_then(|s| s.field(name)).map(|f| f.ty);
            *value = app_value(ty, std::mem::take(value));
        }
        Ok(Value::Object(row))
    }

    /// Applies a push. `user` is the signed-in user (the author of the changes).
    pub fn push(&self, body: &Value, user: &str) -> Result<PushSummary> {
        let Some(tables) = body.as_object() else {
            bail!("the push is not a JSON object of tables");
        };
        let rows: usize = tables
            .values()
            .map(|t| {
                ["created", "updated", "deleted"]
                    .iter()
                    .map(|k| t.get(*k).and_then(Value::as_array).map_or(0, Vec::len))
                    .sum::<usize>()
            })
            .sum();
        if rows > MAX_PUSH_ROWS {
            bail!("the push carries {rows} rows, more than {MAX_PUSH_ROWS}");
        }
        let author = ChangeAuthor {
            device: self.device.clone(),
            user: Some(user.to_owned()),
        };
        let schema = self.store.schema();
        let mut summary = PushSummary::default();
        // As the cloud does: dispensing records before prescription items.
        let mut order: Vec<&str> = PUSHED_TABLES
            .iter()
            .copied()
            .filter(|t| tables.contains_key(*t))
            .collect();
        order.sort_by_key(|t| usize::from(*t != "dispensing_records"));
        for table in order {
            let changes = &tables[table];
            let spec = schema.collection(table);
            let mut ops = Vec::new();
            for (kind, rows) in [
                ("created", &changes["created"]),
                ("updated", &changes["updated"]),
            ] {
                for row in rows.as_array().into_iter().flatten() {
                    let Some(row) = row.as_object() else {
                        bail!("a {kind} row of {table} is not an object");
                    };
                    let id: DocId = row
                        .get("id")
                        .and_then(Value::as_str)
                        .and_then(|t| t.parse().ok())
                        .with_context(|| format!("a {kind} row of {table} has no valid id"))?;
                    let exists = self.store.exists(table, &id)?;
                    // Only the columns the app changed, on a record this node has.
                    let changed: Option<HashSet<&str>> = match (kind, row.get("_changed")) {
                        ("updated", Some(Value::String(list))) if exists => {
                            Some(list.split(',').map(str::trim).collect())
                        }
                        _ => None,
                    };
                    let mut fields = Fields::new();
                    for (name, value) in row {
                        if name.starts_with('_')
                            || changed
                                .as_ref()
                                .is_some_and(|c| !c.contains(name.as_str()) && name != "id")
                        {
                            continue;
                        }
                        let ty = spec.and_then(|s| s.field(name)).map(|f| f.ty);
                        fields.insert(name.clone(), stored_value(ty, value.clone()));
                    }
                    if table == "dispensing_records" && !exists {
                        self.pharmacy.record_app_dispense(id, fields, user)?;
                        summary.dispensed += 1;
                        continue;
                    }
                    fields.remove("id");
                    let write = if exists {
                        WriteKind::Patch(fields)
                    } else {
                        fields.insert("id".into(), Value::from(id.to_string()));
                        WriteKind::Create(fields)
                    };
                    ops.push(WriteOp::new(table, Some(id), write, author.clone()));
                }
            }
            // Deleted rows as ids (WatermelonDB) or as row objects (the Hikma app).
            for id in changes["deleted"].as_array().into_iter().flatten() {
                let id = id.as_str().or_else(|| id.get("id").and_then(Value::as_str));
                let Some(id) = id.and_then(|t| t.parse::<DocId>().ok()) else {
                    bail!("a deleted id of {table} is not an id");
                };
                match self.store.get(table, &id) {
                    Ok(view) if !view.deleted => {
                        ops.push(WriteOp::new(
                            table,
                            Some(id),
                            WriteKind::Delete,
                            author.clone(),
                        ));
                    }
                    Ok(_) | Err(StoreError::NotFound { .. }) => {}
                    Err(err) => return Err(err.into()),
                }
            }
            if ops.is_empty() {
                continue;
            }
            let count = ops.len();
            for result in self
                .store
                .write_blocking(WriteBatch { ops, atomic: false })?
            {
                let outcome = result.with_context(|| format!("a row of {table} was refused"))?;
                if outcome.changed {
                    summary.changed += 1;
                }
                summary.written.push((outcome.id, outcome.seq));
            }
            summary.rows += count;
        }
        Ok(summary)
    }
}

/// What a push did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PushSummary {
    /// The records written, each with its feed position after the push.
    pub written: Vec<(DocId, u64)>,
    /// Rows written (created, updated or deleted).
    pub rows: usize,
    /// Of those, rows that changed anything.
    pub changed: usize,
    /// Dispenses recorded in the pharmacy.
    pub dispensed: usize,
}

#[derive(Default)]
struct Changes {
    created: Vec<Value>,
    updated: Vec<Value>,
    deleted: Vec<Value>,
}

fn encode_marks(marks: &[(i64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(marks.len() * 16);
    for (t, seq) in marks {
        out.extend_from_slice(&t.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
    }
    out
}

fn decode_marks(bytes: &[u8]) -> Vec<(i64, u64)> {
    bytes
        .chunks_exact(16)
        .map(|c| {
            let mut t = [0u8; 8];
            let mut s = [0u8; 8];
            t.copy_from_slice(&c[..8]);
            s.copy_from_slice(&c[8..]);
            (i64::from_be_bytes(t), u64::from_be_bytes(s))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip() {
        let marks = vec![(1, 2), (i64::MAX, u64::MAX)];
        assert_eq!(decode_marks(&encode_marks(&marks)), marks);
    }
}
