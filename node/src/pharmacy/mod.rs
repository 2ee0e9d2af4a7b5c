//! Pharmacy operations: restock, dispense (FEFO, split across batches), physical count,
//! adjustment, stock, alerts, drug search, and the check that every stock item's
//! quantity equals the sum of its movements.
//!
//! Stock quantities are Automerge counters whose first change is deterministic (see
//! `WriteKind::Ensure`), so movements made on devices that were apart add up after any
//! merge. A stock item's quantity is its own counter plus the counters of its ledgers
//! (`_stock_ledgers`): every movement goes into the moving device's current ledger of
//! the item, and a ledger is full after 500 movements, so that no document's history —
//! whose cost every write and sync pays — grows with the life of a busy stock item. Every movement is also an immutable `inventory_transactions`
//! record written in the same store transaction as the counter change: a refused
//! operation changes nothing, and the counter can always be checked against its trail.

mod view;

use std::sync::Mutex;

use chrono::{NaiveDate, Utc};
use medmesh_protocol::pharmacy::{
    STOCK_LEDGERS, drug_id, normalize_batch, normalize_drug_name, stock_item_id, stock_ledger_id,
};
use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::{ChangeAuthor, DocId};
use medmesh_storage::{Query, Store, StoreError, WriteBatch, WriteKind, WriteOp};
use serde::Serialize;
use serde_json::{Value, json};

use view::View;
pub use view::{DrugHit, DrugRow, StockRow};

/// The counter field of a stock item.
pub const QUANTITY: &str = "quantity_available";
/// The ledger "device" of the stock movements made in the Hikma cloud.
pub const CLOUD_LEDGER: &str = "hikma-cloud";

/// A pharmacy request that cannot be carried out, and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PharmacyError {
    /// A field of the request is missing or wrong.
    #[error("{message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: &'static str, message: impl Into<String>) -> PharmacyError {
    PharmacyError::Invalid {
        field,
        message: message.into(),
    }
}

type Result<T, E = PharmacyError> = std::result::Result<T, E>;

/// Locks that serialise the movements of one drug at one clinic (striped): each
/// movement reads the stock, works out the balance and writes it as one step, so every
/// movement's `balance_after` follows from the one before.
const MOVEMENT_LOCKS: usize = 64;
/// A stock item whose document is smaller than this takes its movements on its own
/// counter; a larger one, in its ledgers.
const DIRECT_MOVEMENTS_BYTES: u64 = 8 * 1024;

/// The pharmacy of one node.
pub struct Pharmacy {
    store: Store,
    device: String,
    view: Mutex<View>,
    movements: [Mutex<()>; MOVEMENT_LOCKS],
}

/// One part of a dispense: from which batch, how much.
#[derive(Debug, Clone, Serialize)]
pub struct Taken {
    /// The stock item.
    pub stock_item_id: DocId,
    /// Its batch.
    pub batch_number: String,
    /// Units taken.
    pub quantity: i64,
    /// The quantity left on this device's view.
    pub balance_after: i64,
}

/// One movement of stock, for its `inventory_transactions` record.
struct Movement<'a> {
    clinic: &'a str,
    drug: &'a str,
    stock_item: DocId,
    kind: &'static str,
    change: i64,
    balance: i64,
    reason: Option<String>,
    reference: Option<DocId>,
}

/// A request body, read field by field with errors that name the field.
pub struct Body<'a>(pub &'a Fields);

impl Body<'_> {
    fn text(&self, field: &'static str) -> Result<Option<String>> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
            Some(_) => Err(invalid(field, format!("`{field}` must be text"))),
        }
    }

    fn required_text(&self, field: &'static str) -> Result<String> {
        self.text(field)?
            .ok_or_else(|| invalid(field, format!("`{field}` is required")))
    }

    fn int(&self, field: &'static str) -> Result<Option<i64>> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                invalid(field, format!("`{field}` must be a whole number, not {v}"))
            }),
        }
    }

    fn positive(&self, field: &'static str) -> Result<i64> {
        match self.int(field)? {
            Some(n) if n > 0 => Ok(n),
            Some(n) => Err(invalid(
                field,
                format!("`{field}` must be more than 0, not {n}"),
            )),
            None => Err(invalid(field, format!("`{field}` is required"))),
        }
    }

    fn date(&self, field: &'static str) -> Result<Option<NaiveDate>> {
        match self.text(field)? {
            None => Ok(None),
            Some(text) => NaiveDate::parse_from_str(&text, "%Y-%m-%d")
                .map(Some)
                .map_err(|_| {
                    invalid(
                        field,
                        format!("`{field}` must be a date like 2027-03-31, not `{text}`"),
                    )
                }),
        }
    }

    fn flag(&self, field: &'static str) -> Result<bool> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(invalid(field, format!("`{field}` must be true or false"))),
        }
    }
}

fn fields(value: Value) -> Fields {
    match value {
        Value::Object(map) => map,
        _ => Fields::new(),
    }
}

impl Pharmacy {
    /// The pharmacy of a store; `device` is the node's peer id (recorded in movements).
    pub fn new(store: Store, device: String) -> Self {
        Self {
            store,
            device: device.clone(),
            view: Mutex::new(View::new(device.clone())),
            movements: std::array::from_fn(|_| Mutex::new(())),
        }
    }

    /// Holds the movement lock of a drug at a clinic for the rest of the caller's scope.
    fn movement_lock(&self, clinic: &str, drug: &DocId) -> Result<std::sync::MutexGuard<'_, ()>> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        clinic.hash(&mut hasher);
        drug.hash(&mut hasher);
        let stripe = (hasher.finish() as usize) % MOVEMENT_LOCKS;
        self.movements[stripe]
            .lock()
            .map_err(|_| StoreError::Storage("a pharmacy lock was poisoned".into()).into())
    }

    fn with_view<T>(&self, read: impl FnOnce(&View) -> T) -> Result<T> {
        let mut view = self
            .view
            .lock()
            .map_err(|_| StoreError::Storage("the pharmacy view lock was poisoned".into()))?;
        view.refresh(&self.store)?;
        Ok(read(&view))
    }

    fn author(&self, user: Option<&str>) -> ChangeAuthor {
        ChangeAuthor {
            device: self.device.clone(),
            user: user.map(str::to_owned),
        }
    }

    fn op(
        &self,
        collection: &str,
        id: Option<DocId>,
        kind: WriteKind,
        user: Option<&str>,
    ) -> WriteOp {
        WriteOp::new(collection, id, kind, self.author(user))
    }

    fn require_clinic(&self, clinic_id: &str) -> Result<()> {
        let id: DocId = clinic_id.parse().map_err(|_| {
            invalid(
                "clinic_id",
                format!("`clinic_id` must be a clinic's id, not `{clinic_id}`"),
            )
        })?;
        if self.store.exists("clinics", &id)? {
            Ok(())
        } else {
            Err(invalid(
                "clinic_id",
                format!("there is no clinic {clinic_id}; create it first (POST /v1/clinics)"),
            ))
        }
    }

    /// The drug of a request: by `drug_id` (must exist), or by `drug_name` (created when
    /// `create` and it does not exist). Answers its id and the writes that create it.
    fn resolve_drug(
        &self,
        body: &Body<'_>,
        create: bool,
        user: Option<&str>,
    ) -> Result<(DocId, Vec<WriteOp>)> {
        if let Some(text) = body.text("drug_id")? {
            let id: DocId = text.parse().map_err(|_| {
                invalid(
                    "drug_id",
                    format!("`drug_id` must be a drug's id, not `{text}`"),
                )
            })?;
            return match self.store.get("drug_catalogue", &id) {
                Ok(_) => Ok((id, Vec::new())),
                Err(StoreError::NotFound { .. }) => Err(invalid(
                    "drug_id",
                    format!(
                        "there is no drug {id} in the catalogue; give `drug_name` to create it"
                    ),
                )),
                Err(err) => Err(err.into()),
            };
        }
        let name = body
            .text("drug_name")?
            .ok_or_else(|| invalid("drug_id", "give `drug_id` or `drug_name`"))?;
        let normalized = normalize_drug_name(&name);
        if normalized.is_empty() {
            return Err(invalid("drug_name", "`drug_name` is empty"));
        }
        let id = drug_id(&name);
        if self.store.exists("drug_catalogue", &id)? {
            return Ok((id, Vec::new()));
        }
        if !create {
            return Err(invalid(
                "drug_name",
                format!("there is no drug named `{name}` in the catalogue"),
            ));
        }
        // The drug's first change is the same on every device (its normalized name), so
        // two devices creating it apart end up with one drug.
        let ensure = WriteKind::Ensure {
            fields: fields(json!({ "normalized_name": normalized })),
            counters: Vec::new(),
        };
        let named = WriteKind::Patch(fields(json!({ "generic_name": name, "is_active": true })));
        Ok((
            id,
            vec![
                self.op("drug_catalogue", Some(id), ensure, user),
                self.op("drug_catalogue", Some(id), named, user),
            ],
        ))
    }

    fn transaction(&self, movement: Movement<'_>, user: Option<&str>) -> WriteOp {
        let record = json!({
            "clinic_id": movement.clinic,
            "drug_id": movement.drug,
            "stock_item_id": movement.stock_item.to_string(),
            "transaction_type": movement.kind,
            "quantity_change": movement.change,
            "balance_after": movement.balance,
            "reason": movement.reason,
            "reference_id": movement.reference.map(|r| r.to_string()),
            "performed_by": user.unwrap_or(&self.device),
            "performed_at": record::format_timestamp(Utc::now().timestamp_millis()),
            "metadata": {"device": self.device},
        });
        self.op(
            "inventory_transactions",
            None,
            WriteKind::Create(fields(record)),
            user,
        )
    }

    /// Writes an atomic batch and takes the stock items and ledgers it changed into the
    /// view.
    fn write(&self, ops: Vec<WriteOp>) -> Result<()> {
        let collections: std::collections::HashMap<DocId, String> = ops
            .iter()
            .filter_map(|op| Some((op.id?, op.collection.clone())))
            .collect();
        let outcomes = self
            .store
            .write_blocking(WriteBatch { ops, atomic: true })?;
        let mut view = self
            .view
            .lock()
            .map_err(|_| StoreError::Storage("the pharmacy view lock was poisoned".into()))?;
        for outcome in outcomes.into_iter().flatten() {
            if let Some(collection) = collections.get(&outcome.id) {
                view.written(collection, outcome.id, &outcome.record, outcome.seq);
            }
        }
        Ok(())
    }

    /// The writes of one movement of a stock item's quantity: into this device's current
    /// ledger of the item (made when new), `delta` changed by `change`.
    fn movement_ops(
        &self,
        item: &DocId,
        clinic: &str,
        drug: &str,
        change: i64,
        user: Option<&str>,
    ) -> Result<Vec<WriteOp>> {
        // A stock item that has moved little takes its movements itself (one document
        // fewer per movement); once its history makes it heavy, they go to ledgers, so a
        // busy item's cost stays that of a small document.
        if self
            .store
            .stored_bytes(item)?
            .is_some_and(|bytes| bytes < DIRECT_MOVEMENTS_BYTES)
        {
            return Ok(vec![self.op(
                "clinic_inventory",
                Some(*item),
                WriteKind::Increment {
                    counters: vec![(QUANTITY.into(), change)],
                },
                user,
            )]);
        }
        let (ledger, index) = self.with_view(|v| v.ledger_for(item))?;
        let identity = fields(json!({
            "stock_item_id": item.to_string(),
            "clinic_id": clinic,
            "drug_id": drug,
            "device": self.device,
            "index": index,
        }));
        Ok(vec![
            self.op(
                STOCK_LEDGERS,
                Some(ledger),
                WriteKind::Ensure {
                    fields: identity,
                    counters: vec![("delta".into(), 0), ("movements".into(), 0)],
                },
                user,
            ),
            self.op(
                STOCK_LEDGERS,
                Some(ledger),
                WriteKind::Increment {
                    counters: vec![("delta".into(), change), ("movements".into(), 1)],
                },
                user,
            ),
        ])
    }

    fn current(&self, id: &DocId) -> Result<Option<StockRow>> {
        self.with_view(|v| v.stock.get(id).cloned())
    }

    /// Receives stock: creates the drug (by name) and the stock item when new.
    pub fn restock(&self, body: &Fields, user: Option<&str>) -> Result<Value> {
        let body = Body(body);
        let clinic = body.required_text("clinic_id")?;
        let batch = body.required_text("batch_number")?;
        let expiry = body.date("expiry_date")?;
        let quantity = body.positive("quantity")?;
        let reorder = body.int("reorder_level")?;
        let supplier = body.text("supplier")?;
        let unit_price = match body.0.get("unit_price") {
            None | Some(Value::Null) => None,
            Some(v) if v.is_number() => Some(v.clone()),
            Some(_) => return Err(invalid("unit_price", "`unit_price` must be a number")),
        };
        self.require_clinic(&clinic)?;
        let (drug, mut ops) = self.resolve_drug(&body, true, user)?;
        let _movement = self.movement_lock(&clinic, &drug)?;
        // The batch's stock item: the one this clinic has (made here, or from the cloud
        // under the cloud's id), or a new one whose id comes from clinic, drug and batch.
        let found = self.find_batch(&clinic, &drug, &batch)?;
        let derived = stock_item_id(&clinic, &drug.to_string(), &batch);
        let id = found.as_ref().map_or(derived, |r| r.stock_item_id);
        let before = found.map_or(0, |r| r.quantity);
        if id == derived {
            ops.push(self.op(
                "clinic_inventory",
                Some(id),
                WriteKind::Ensure {
                    fields: fields(json!({"clinic_id": clinic, "drug_id": drug.to_string(), "batch_number": normalize_batch(&batch)})),
                    counters: vec![(QUANTITY.into(), 0)],
                },
                user,
            ));
        }
        let mut details = Fields::new();
        if let Some(expiry) = expiry {
            details.insert("batch_expiry_date".into(), json!(expiry.to_string()));
        }
        if let Some(reorder) = reorder {
            details.insert("reorder_level".into(), json!(reorder));
        }
        if !details.is_empty() {
            ops.push(self.op(
                "clinic_inventory",
                Some(id),
                WriteKind::Patch(details),
                user,
            ));
        }
        ops.extend(self.movement_ops(&id, &clinic, &drug.to_string(), quantity, user)?);
        let mut tx = self.transaction(
            Movement {
                clinic: &clinic,
                drug: &drug.to_string(),
                stock_item: id,
                kind: "restock",
                change: quantity,
                balance: before + quantity,
                reason: supplier.map(|s| format!("from {s}")),
                reference: None,
            },
            user,
        );
        if let (Some(price), WriteKind::Create(record)) = (unit_price, &mut tx.kind) {
            record.insert(
                "metadata".into(),
                json!({"device": self.device, "unit_price": price}),
            );
        }
        ops.push(tx);
        self.write(ops)?;
        Ok(json!({
            "stock_item_id": id,
            "drug_id": drug,
            "batch_number": normalize_batch(&batch),
            "quantity": before + quantity,
        }))
    }

    /// Dispenses a drug: from the earliest-expiring batches with stock (FEFO), split
    /// across batches when one is not enough, or from the batch given. Writes the
    /// dispensing records and updates the prescription item.
    pub fn dispense(&self, body: &Fields, user: Option<&str>) -> Result<Value> {
        let body = Body(body);
        let clinic = body.required_text("clinic_id")?;
        let quantity = body.positive("quantity")?;
        let batch = body.text("batch_number")?;
        let allow_expired = body.flag("allow_expired")?;
        let patient = body.text("patient_id")?;
        let item = body.text("prescription_item_id")?;
        let instructions = body.text("dosage_instructions")?;
        let days_supply = body.int("days_supply")?;
        self.require_clinic(&clinic)?;
        let (drug, _) = self.resolve_drug(&body, false, user)?;
        let _movement = self.movement_lock(&clinic, &drug)?;
        let drug_text = drug.to_string();
        let today = Utc::now().date_naive();
        let rows = self.with_view(|v| v.stock_rows(Some(&clinic), Some(&drug_text)))?;
        let expired = |r: &StockRow| r.expiry.is_some_and(|e| e < today);
        // Which batches, and how much from each.
        let mut plan: Vec<(StockRow, i64)> = Vec::new();
        if let Some(batch) = &batch {
            let wanted = normalize_batch(batch);
            let row = rows
                .iter()
                .find(|r| normalize_batch(&r.batch_number) == wanted)
                .ok_or_else(|| {
                    invalid(
                        "batch_number",
                        format!("batch `{batch}` of this drug is not stocked at this clinic"),
                    )
                })?;
            if expired(row) && !allow_expired {
                return Err(invalid(
                    "batch_number",
                    format!(
                        "batch `{batch}` expired on {}; send allow_expired: true to dispense it anyway",
                        row.expiry_date.clone().unwrap_or_default()
                    ),
                ));
            }
            plan.push((row.clone(), quantity));
        } else {
            let usable: Vec<&StockRow> = rows
                .iter()
                .filter(|r| allow_expired || !expired(r))
                .collect();
            let Some(last) = usable.first().copied() else {
                return Err(invalid(
                    "drug_id",
                    if rows.is_empty() {
                        "this drug is not stocked at this clinic; restock it first".to_owned()
                    } else {
                        "every batch of this drug at this clinic has expired; send allow_expired: true to dispense anyway".to_owned()
                    },
                ));
            };
            let mut left = quantity;
            for row in usable.iter().filter(|r| r.quantity > 0) {
                if left == 0 {
                    break;
                }
                let take = left.min(row.quantity);
                plan.push(((*row).clone(), take));
                left -= take;
            }
            if left > 0 {
                // Not enough on record: the shelf is the truth, the record follows it.
                match plan.last_mut() {
                    Some((_, take)) => *take += left,
                    None => plan.push((last.clone(), left)),
                }
            }
        }
        // The prescription item, if any.
        let mut ops = Vec::new();
        if let Some(item) = &item {
            ops.push(self.prescription_update(item, &drug_text, quantity, user)?);
        }
        let mut taken = Vec::new();
        let mut records = Vec::new();
        for (row, take) in &plan {
            let record_id = DocId::new_v7();
            let balance = row.quantity - take;
            ops.extend(self.movement_ops(&row.stock_item_id, &clinic, &drug_text, -take, user)?);
            ops.push(self.transaction(
                Movement {
                    clinic: &clinic,
                    drug: &drug_text,
                    stock_item: row.stock_item_id,
                    kind: "dispense",
                    change: -take,
                    balance,
                    reason: None,
                    reference: Some(record_id),
                },
                user,
            ));
            let record = json!({
                "id": record_id.to_string(),
                "clinic_id": clinic,
                "drug_id": drug_text,
                "batch_id": row.stock_item_id.to_string(),
                "prescription_item_id": item,
                "patient_id": patient,
                "quantity_dispensed": take,
                "dosage_instructions": instructions,
                "days_supply": days_supply,
                "dispensed_by": user.unwrap_or(&self.device),
                "dispensed_at": record::format_timestamp(Utc::now().timestamp_millis()),
            });
            ops.push(self.op(
                "dispensing_records",
                Some(record_id),
                WriteKind::Create(fields(record)),
                user,
            ));
            records.push(record_id);
            taken.push(Taken {
                stock_item_id: row.stock_item_id,
                batch_number: row.batch_number.clone(),
                quantity: *take,
                balance_after: balance,
            });
        }
        self.write(ops)?;
        let negative: Vec<&Taken> = taken.iter().filter(|t| t.balance_after < 0).collect();
        let mut answer = json!({
            "drug_id": drug,
            "quantity": quantity,
            "taken": taken,
            "dispensing_record_ids": records,
            "negative_stock": !negative.is_empty(),
        });
        if !negative.is_empty() {
            answer["warning"] = json!(
                "the records show less stock than was dispensed: the quantity is now negative. Count the shelf (POST /v1/pharmacy/count) to correct it."
            );
        }
        Ok(answer)
    }

    /// A dispense the Hikma app recorded and pushed (`dispensing_records` row `id`):
    /// the stock item it names (`batch_id`), or the earliest-expiring batch of the drug
    /// at the clinic, loses the quantity, with its `inventory_transactions` record, and
    /// the row is stored as the app wrote it. A row this node has already is not
    /// counted again. The prescription item is the app's to update (it pushes it too).
    pub fn record_app_dispense(&self, id: DocId, mut row: Fields, user: &str) -> Result<()> {
        let clinic = row
            .get("clinic_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| invalid("clinic_id", "a dispensing record needs its clinic_id"))?;
        let drug: DocId = row
            .get("drug_id")
            .and_then(Value::as_str)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| invalid("drug_id", "a dispensing record needs its drug_id"))?;
        let quantity = row
            .get("quantity_dispensed")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let _movement = self.movement_lock(&clinic, &drug)?;
        if self.store.exists("dispensing_records", &id)? {
            return Ok(());
        }
        let drug_text = drug.to_string();
        let rows = self.with_view(|v| v.stock_rows(Some(&clinic), Some(&drug_text)))?;
        let named = row
            .get("batch_id")
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<DocId>().ok());
        let today = Utc::now().date_naive();
        let item = rows
            .iter()
            .find(|r| Some(r.stock_item_id) == named)
            .or_else(|| {
                rows.iter()
                    .find(|r| r.quantity > 0 && r.expiry.is_none_or(|e| e >= today))
            })
            .or(rows.first());
        let mut ops = Vec::new();
        if let Some(item) = item.filter(|_| quantity > 0) {
            // The movement is a ledger of its own whose first change is the same on every
            // node (its id and content come from the dispensing record): an app that
            // pushes the record to two nodes moves the stock once when they merge.
            let device = format!("app-dispense:{id}");
            let ledger = stock_ledger_id(&item.stock_item_id, &device, 0);
            ops.push(self.op(
                STOCK_LEDGERS,
                Some(ledger),
                WriteKind::Ensure {
                    fields: fields(json!({
                        "id": ledger.to_string(),
                        "stock_item_id": item.stock_item_id.to_string(),
                        "clinic_id": clinic,
                        "drug_id": drug_text,
                        "device": device,
                        "index": 0,
                    })),
                    counters: vec![("delta".into(), -quantity), ("movements".into(), 1)],
                },
                Some(user),
            ));
            let trail = DocId::derived("app-dispense-movement", &[&id.to_string()]);
            if !self.store.exists("inventory_transactions", &trail)? {
                let mut op = self.transaction(
                    Movement {
                        clinic: &clinic,
                        drug: &drug_text,
                        stock_item: item.stock_item_id,
                        kind: "dispense",
                        change: -quantity,
                        balance: item.quantity - quantity,
                        reason: None,
                        reference: Some(id),
                    },
                    Some(user),
                );
                op.id = Some(trail);
                if let WriteKind::Create(record) = &mut op.kind {
                    record.insert("id".into(), Value::from(trail.to_string()));
                }
                ops.push(op);
            }
            row.insert(
                "batch_id".into(),
                Value::from(item.stock_item_id.to_string()),
            );
        } else if quantity > 0 {
            tracing::warn!(
                %clinic, drug = %drug_text,
                "a dispense from the app names a drug this clinic has no stock item for; it is recorded, and the stock changes when the drug is restocked here or counted"
            );
        }
        row.insert("id".into(), Value::from(id.to_string()));
        ops.push(self.op(
            "dispensing_records",
            Some(id),
            WriteKind::Create(row),
            Some(user),
        ));
        self.write(ops)
    }

    /// A stock item of the Hikma cloud (its `clinic_inventory` row `id`): made in the
    /// mesh when new, its other fields as the cloud has them. The quantity is never
    /// copied: it comes in as movements ([`Self::record_cloud_stock`]).
    pub fn put_cloud_item(&self, id: DocId, mut row: Fields, author: &str) -> Result<()> {
        row.remove(QUANTITY);
        row.remove("id");
        let mut ops = Vec::new();
        if !self.store.exists("clinic_inventory", &id)? {
            // The same first change on every gateway that meets the row.
            let mut identity = Fields::new();
            identity.insert("id".into(), Value::from(id.to_string()));
            for field in ["clinic_id", "drug_id"] {
                if let Some(value) = row.get(field) {
                    identity.insert(field.into(), value.clone());
                }
            }
            ops.push(self.op(
                "clinic_inventory",
                Some(id),
                WriteKind::Ensure {
                    fields: identity,
                    counters: vec![(QUANTITY.into(), 0)],
                },
                Some(author),
            ));
        }
        if !row.is_empty() {
            ops.push(self.op(
                "clinic_inventory",
                Some(id),
                WriteKind::Patch(row),
                Some(author),
            ));
        }
        if ops.is_empty() {
            return Ok(());
        }
        self.write(ops)
    }

    /// The part of a stock item's quantity made by the cloud's own movements (restocks
    /// and counts entered there): `target` is the cloud's quantity plus every dispense
    /// the cloud has recorded for the item. The item's cloud ledger moves by the
    /// difference to what it holds, with its trail record, so the mesh's quantity
    /// follows the cloud's without ever overwriting a counter. Answers the movement.
    pub fn record_cloud_stock(&self, item: DocId, target: i64, author: &str) -> Result<i64> {
        let Some(row) = self.current(&item)? else {
            return Ok(0);
        };
        let drug: DocId = match row.drug_id.parse() {
            Ok(drug) => drug,
            Err(_) => return Ok(0),
        };
        let ledger = stock_ledger_id(&item, CLOUD_LEDGER, 0);
        // The gateway asks every round for every item: most agree, as the view shows
        // without reading the store (a view behind the store is caught up next round).
        if self.with_view(|v| v.ledger_delta(&ledger))? == Some(target) {
            return Ok(0);
        }
        let _movement = self.movement_lock(&row.clinic_id, &drug)?;
        let held = match self.store.get(STOCK_LEDGERS, &ledger) {
            Ok(view) => view
                .record
                .get("delta")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            Err(StoreError::NotFound { .. }) => 0,
            Err(err) => return Err(err.into()),
        };
        let change = target - held;
        if change == 0 {
            return Ok(0);
        }
        let row = self.current(&item)?.unwrap_or(row);
        let user = Some(author);
        let ops = vec![
            self.op(
                STOCK_LEDGERS,
                Some(ledger),
                WriteKind::Ensure {
                    fields: fields(json!({
                        "id": ledger.to_string(),
                        "stock_item_id": item.to_string(),
                        "clinic_id": row.clinic_id,
                        "drug_id": row.drug_id,
                        "device": CLOUD_LEDGER,
                        "index": 0,
                    })),
                    counters: vec![("delta".into(), 0), ("movements".into(), 0)],
                },
                user,
            ),
            self.op(
                STOCK_LEDGERS,
                Some(ledger),
                WriteKind::Increment {
                    counters: vec![("delta".into(), change), ("movements".into(), 1)],
                },
                user,
            ),
            self.transaction(
                Movement {
                    clinic: &row.clinic_id,
                    drug: &row.drug_id,
                    stock_item: item,
                    kind: "cloud",
                    change,
                    balance: row.quantity + change,
                    reason: Some(
                        "stock changed in the Hikma cloud (a restock or count entered there)"
                            .into(),
                    ),
                    reference: None,
                },
                user,
            ),
        ];
        self.write(ops)?;
        Ok(change)
    }

    fn prescription_update(
        &self,
        item: &str,
        drug: &str,
        quantity: i64,
        user: Option<&str>,
    ) -> Result<WriteOp> {
        let id: DocId = item.parse().map_err(|_| {
            invalid(
                "prescription_item_id",
                format!("`prescription_item_id` must be an id, not `{item}`"),
            )
        })?;
        let current = match self.store.get("prescription_items", &id) {
            Ok(view) => view.record,
            Err(StoreError::NotFound { .. }) => {
                return Err(invalid(
                    "prescription_item_id",
                    format!("there is no prescription item {id}"),
                ));
            }
            Err(err) => return Err(err.into()),
        };
        if let Some(for_drug) = current.get("drug_id").and_then(Value::as_str)
            && for_drug != drug
        {
            return Err(invalid(
                "prescription_item_id",
                format!("prescription item {id} is for another drug ({for_drug})"),
            ));
        }
        let prescribed = current.get("quantity_prescribed").and_then(Value::as_i64);
        let dispensed = current
            .get("quantity_dispensed")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let authorized = current
            .get("refills_authorized")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let used = current
            .get("refills_used")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let status = current
            .get("item_status")
            .and_then(Value::as_str)
            .unwrap_or("");
        let mut patch = Fields::new();
        // A dispense after the item was fully dispensed is a refill.
        if status == "dispensed" || prescribed.is_some_and(|p| p > 0 && dispensed >= p * (used + 1))
        {
            if used >= authorized {
                return Err(invalid(
                    "prescription_item_id",
                    format!(
                        "prescription item {id} is fully dispensed and has no refills left ({used} of {authorized} used)"
                    ),
                ));
            }
            patch.insert("refills_used".into(), json!(used + 1));
        }
        let total = dispensed + quantity;
        let courses = i64::from(patch.contains_key("refills_used")) + used + 1;
        let complete = prescribed.is_none_or(|p| total >= p * courses);
        patch.insert("quantity_dispensed".into(), json!(total));
        patch.insert(
            "item_status".into(),
            json!(if complete {
                "dispensed"
            } else {
                "partially_dispensed"
            }),
        );
        Ok(self.op(
            "prescription_items",
            Some(id),
            WriteKind::Patch(patch),
            user,
        ))
    }

    /// A physical count: records the difference to this device's view as an adjustment,
    /// so dispenses made elsewhere meanwhile are not wiped out.
    pub fn count(&self, body: &Fields, user: Option<&str>) -> Result<Value> {
        let body = Body(body);
        let clinic = body.required_text("clinic_id")?;
        let batch = body.required_text("batch_number")?;
        let counted = body
            .int("counted_quantity")?
            .ok_or_else(|| invalid("counted_quantity", "`counted_quantity` is required"))?;
        if counted < 0 {
            return Err(invalid(
                "counted_quantity",
                "`counted_quantity` cannot be negative",
            ));
        }
        self.require_clinic(&clinic)?;
        let (drug, _) = self.resolve_drug(&body, false, user)?;
        let _movement = self.movement_lock(&clinic, &drug)?;
        let row = self.existing_batch(&clinic, &drug, &batch)?;
        let change = counted - row.quantity;
        let now = record::format_timestamp(Utc::now().timestamp_millis());
        let mut ops = vec![self.op(
            "clinic_inventory",
            Some(row.stock_item_id),
            WriteKind::Patch(fields(json!({"last_counted_at": now}))),
            user,
        )];
        if change != 0 {
            ops.extend(self.movement_ops(
                &row.stock_item_id,
                &clinic,
                &drug.to_string(),
                change,
                user,
            )?);
        }
        ops.push(self.transaction(
            Movement {
                clinic: &clinic,
                drug: &drug.to_string(),
                stock_item: row.stock_item_id,
                kind: "count",
                change,
                balance: counted,
                reason: Some(format!("physical count: {counted}")),
                reference: None,
            },
            user,
        ));
        self.write(ops)?;
        Ok(
            json!({"stock_item_id": row.stock_item_id, "previous": row.quantity, "counted": counted, "adjustment": change}),
        )
    }

    /// An adjustment: damage, loss, expiry write-off.
    pub fn adjust(&self, body: &Fields, user: Option<&str>) -> Result<Value> {
        let body = Body(body);
        let clinic = body.required_text("clinic_id")?;
        let batch = body.required_text("batch_number")?;
        let change = body
            .int("quantity_change")?
            .ok_or_else(|| invalid("quantity_change", "`quantity_change` is required"))?;
        if change == 0 {
            return Err(invalid("quantity_change", "`quantity_change` cannot be 0"));
        }
        let reason = body.required_text("reason")?;
        self.require_clinic(&clinic)?;
        let (drug, _) = self.resolve_drug(&body, false, user)?;
        let _movement = self.movement_lock(&clinic, &drug)?;
        let row = self.existing_batch(&clinic, &drug, &batch)?;
        let mut ops =
            self.movement_ops(&row.stock_item_id, &clinic, &drug.to_string(), change, user)?;
        ops.push(self.transaction(
            Movement {
                clinic: &clinic,
                drug: &drug.to_string(),
                stock_item: row.stock_item_id,
                kind: "adjustment",
                change,
                balance: row.quantity + change,
                reason: Some(reason),
                reference: None,
            },
            user,
        ));
        self.write(ops)?;
        Ok(json!({"stock_item_id": row.stock_item_id, "quantity": row.quantity + change}))
    }

    /// The stock item of a batch of a drug at a clinic, if there is one: by its id made
    /// from the three, or by batch number (a stock item that came from the cloud keeps
    /// the cloud's id).
    fn find_batch(&self, clinic: &str, drug: &DocId, batch: &str) -> Result<Option<StockRow>> {
        let id = stock_item_id(clinic, &drug.to_string(), batch);
        if let Some(row) = self.current(&id)? {
            return Ok(Some(row));
        }
        let wanted = normalize_batch(batch);
        let drug = drug.to_string();
        self.with_view(|v| {
            v.stock_rows(Some(clinic), Some(&drug))
                .into_iter()
                .find(|r| normalize_batch(&r.batch_number) == wanted)
        })
    }

    fn existing_batch(&self, clinic: &str, drug: &DocId, batch: &str) -> Result<StockRow> {
        self.find_batch(clinic, drug, batch)?.ok_or_else(|| {
            invalid(
                "batch_number",
                format!("batch `{batch}` of this drug is not stocked at this clinic"),
            )
        })
    }

    /// A stock item's quantity: its own counter and its ledgers' (what a stock item
    /// record shows as `quantity_available`).
    pub fn quantity(&self, id: &DocId) -> Result<Option<i64>> {
        self.with_view(|v| v.stock.get(id).map(|r| r.quantity))
    }

    /// Stock items, optionally for one clinic and one drug.
    pub fn stock(&self, clinic: Option<&str>, drug: Option<&str>) -> Result<Vec<StockRow>> {
        self.with_view(|v| v.stock_rows(clinic, drug))
    }

    /// A page of [`Self::stock`]: at most `limit` rows after the stock item `after`, and
    /// where the next page starts. `None` when `after` is not in this listing.
    pub fn stock_page(
        &self,
        clinic: Option<&str>,
        drug: Option<&str>,
        after: Option<&DocId>,
        limit: usize,
    ) -> Result<Option<(Vec<StockRow>, Option<DocId>)>> {
        self.with_view(|v| v.stock_page(clinic, drug, after, limit))
    }

    /// Low stock, batches expiring within `within_days`, expired batches still holding
    /// stock, and negative stock.
    pub fn alerts(
        &self,
        clinic: Option<&str>,
        within_days: i64,
        today: NaiveDate,
    ) -> Result<Value> {
        self.with_view(|v| {
            let rows = v.stock_rows(clinic, None);
            let mut low = Vec::new();
            let mut expiring = Vec::new();
            let mut expired = Vec::new();
            let mut negative = Vec::new();
            let horizon = today + chrono::Duration::days(within_days.max(0));
            for row in rows {
                let min_level = row.reorder_level.or_else(|| {
                    row.drug_id.parse::<DocId>().ok().and_then(|d| v.drugs.get(&d)).and_then(|d| d.min_stock_level)
                });
                if row.quantity < 0 {
                    negative.push(row.clone());
                } else if min_level.is_some_and(|m| row.quantity <= m) {
                    low.push(row.clone());
                }
                match row.expiry {
                    Some(e) if e < today && row.quantity > 0 => expired.push(row),
                    Some(e) if e <= horizon && row.quantity > 0 => expiring.push(row),
                    _ => {}
                }
            }
            json!({"low_stock": low, "expiring_soon": expiring, "expired_with_stock": expired, "negative_stock": negative})
        })
    }

    /// Drug names matching `query` (prefix, word prefix, typos), best first.
    pub fn search_drugs(&self, query: &str, limit: usize) -> Result<Vec<DrugHit>> {
        self.with_view(|v| v.search(query, limit))
    }

    /// A stock item's level over time, from its movements (`inventory_transactions`) in
    /// the order they were made: the running sum of their changes after each one, at
    /// most `points` of them (evenly spaced, the last always kept), and how many
    /// movements there are. The sum after the last is the item's quantity.
    pub fn levels(&self, stock_item: &DocId, points: usize) -> Result<Value> {
        let mut moves: Vec<(String, i64, String)> = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.store.list(&Query {
                collection: "inventory_transactions".into(),
                filters: vec![medmesh_storage::Filter::Equals {
                    field: "stock_item_id".into(),
                    value: stock_item.to_string(),
                }],
                limit: 1000,
                cursor: cursor.take(),
                include_deleted: true,
            })?;
            for tx in page.records {
                let text = |f: &str| {
                    tx.record
                        .get(f)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned()
                };
                if let Some(change) = tx.record.get("quantity_change").and_then(Value::as_i64) {
                    moves.push((text("performed_at"), change, text("transaction_type")));
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        moves.sort_by(|a, b| a.0.cmp(&b.0));
        let total = moves.len();
        let step = total.div_ceil(points.max(1)).max(1);
        let mut level = 0i64;
        let mut shown = Vec::with_capacity(total.min(points) + 1);
        for (i, (at, change, kind)) in moves.into_iter().enumerate() {
            level += change;
            if (i + 1) % step == 0 || i + 1 == total {
                shown.push(json!({"at": at, "level": level, "change": change, "type": kind}));
            }
        }
        Ok(json!({
            "stock_item_id": stock_item.to_string(),
            "movements": total,
            "level": level,
            "quantity": self.quantity(stock_item)?,
            "points": shown,
        }))
    }

    /// Every stock item whose quantity differs from the sum of its movements.
    pub fn verify(&self) -> Result<Value> {
        let mut sums: std::collections::HashMap<String, (i64, usize)> = Default::default();
        let mut cursor = None;
        loop {
            let page = self.store.list(&Query {
                collection: "inventory_transactions".into(),
                limit: 1000,
                cursor: cursor.clone(),
                include_deleted: true,
                ..Query::default()
            })?;
            for tx in &page.records {
                if let (Some(item), Some(change)) = (
                    tx.record.get("stock_item_id").and_then(Value::as_str),
                    tx.record.get("quantity_change").and_then(Value::as_i64),
                ) {
                    let entry = sums.entry(item.to_owned()).or_default();
                    entry.0 += change;
                    entry.1 += 1;
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let rows = self.stock(None, None)?;
        let mut mismatches = Vec::new();
        for row in &rows {
            let (sum, count) = sums
                .remove(&row.stock_item_id.to_string())
                .unwrap_or((0, 0));
            if sum != row.quantity {
                mismatches.push(json!({"stock_item_id": row.stock_item_id, "batch_number": row.batch_number, "quantity": row.quantity, "sum_of_transactions": sum, "transactions": count}));
            }
        }
        for (item, (sum, count)) in sums {
            if sum != 0 {
                mismatches.push(json!({"stock_item_id": item, "quantity": null, "sum_of_transactions": sum, "transactions": count, "problem": "transactions for a stock item this node does not have"}));
            }
        }
        Ok(json!({"stock_items": rows.len(), "mismatches": mismatches}))
    }
}
