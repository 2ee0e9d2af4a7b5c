//! A reference Hikma cloud for tests and benchmarks: the server side of the sync API as
//! `HIKMA_SYNC_API.md` states it, in memory — delta rules on `server_created_at` /
//! `last_modified`, last writer wins on a strictly newer `updated_at` (stale rows dropped
//! silently), whole-row replacement, soft deletes, ISO timestamps and midnights in the
//! server's time zone on pulls, decimals as text, hub keys scoped to `clinic_ids`, the
//! inventory trigger on a first `dispensing_records` insert, user columns checked
//! against the cloud's users, required columns checked
//! row by row with a 500 that keeps the rows before, and 60 requests a minute per client
//! address with `429` and `retry-after`. Faults (an outage, a 500 part way, 429 storms)
//! are switched on by the test.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{NaiveDate, TimeZone, Utc};
use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::schema::FieldType;
use serde_json::{Map, Value, json};

/// The tables a hub pulls: the app's, and users.
pub fn hub_tables() -> impl Iterator<Item = &'static str> {
    medmesh::mobile::PULLED_TABLES
        .into_iter()
        .chain(std::iter::once("users"))
}

/// The order a push is processed in: the app's tables (dispensing records before
/// prescription items), then the two a hub may push and the cloud treats apart.
fn push_order() -> impl Iterator<Item = &'static str> {
    medmesh::mobile::PUSHED_TABLES
        .into_iter()
        .chain(["drug_catalogue", "clinic_departments"])
}

/// Tables whose applied updates get the server's time as `updated_at`.
const SERVER_STAMPED: [&str; 5] = [
    "visits",
    "events",
    "patient_vitals",
    "dispensing_records",
    "patient_additional_attributes",
];

/// The server's time zone, in hours east of UTC (its midnights come back shifted).
const SERVER_UTC_OFFSET_HOURS: i64 = 3;

/// A stored row and the cloud's own columns.
#[derive(Debug, Clone)]
struct Row {
    fields: Fields,
    server_created_at: i64,
    last_modified: i64,
    deleted_at: Option<i64>,
}

impl Row {
    fn deleted(&self) -> bool {
        self.fields.get("is_deleted").and_then(Value::as_bool) == Some(true)
    }

    /// A stock row's quantity moves by `change`, at `now`.
    fn move_stock(&mut self, change: i64, now: i64) {
        let before = self
            .fields
            .get("quantity_available")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        self.fields
            .insert("quantity_available".into(), json!(before + change));
        self.fields
            .insert("updated_at".into(), json!(record::format_timestamp(now)));
        self.last_modified = now;
    }
}

/// What the cloud has counted.
#[derive(Debug, Clone, Default)]
pub struct CloudStats {
    /// Sync requests answered (any status).
    pub requests: u64,
    /// Pulls answered 200.
    pub pulls: u64,
    /// Pushes answered 200.
    pub pushes: u64,
    /// Rows received in pushes.
    pub rows_pushed: u64,
    /// Bytes received (request bodies) and sent (answer bodies) on the sync endpoint.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Requests answered 429.
    pub too_many: u64,
    /// Requests answered 500.
    pub failed: u64,
    /// Pushed rows dropped as older than the cloud's.
    pub stale: u64,
}

#[derive(Default)]
struct Faults {
    down: bool,
    fail_after_rows: Option<usize>,
    forced_429: usize,
    refuse_ids: Vec<String>,
    push_delay: Duration,
    edits_before_push: Vec<(String, String, Value)>,
    garbled_pulls: usize,
}

struct CloudState {
    tables: BTreeMap<String, BTreeMap<String, Row>>,
    clock: i64,
    hub_keys: HashMap<String, Vec<String>>,
    rate: HashMap<String, VecDeque<Instant>>,
    per_minute: usize,
    retry_after: u64,
    faults: Faults,
    stats: CloudStats,
    inventory_transactions: Vec<Value>,
}

/// The reference cloud. Cheap to clone; all clones are the same cloud.
#[derive(Clone)]
pub struct Cloud {
    state: Arc<Mutex<CloudState>>,
    schema: Arc<medmesh_protocol::Schema>,
}

impl Default for Cloud {
    fn default() -> Self {
        Self::new()
    }
}

impl Cloud {
    /// An empty cloud with no hub keys, 60 requests a minute per address.
    pub fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(CloudState {
                tables: BTreeMap::new(),
                clock: 0,
                hub_keys: HashMap::new(),
                rate: HashMap::new(),
                per_minute: 60,
                retry_after: 60,
                faults: Faults::default(),
                stats: CloudStats::default(),
                inventory_transactions: Vec::new(),
            })),
            schema: Arc::new(medmesh_protocol::Schema::hikma()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CloudState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a hub key allowed to sync these clinics; answers the key.
    pub fn add_hub_key(&self, clinic_ids: &[&str]) -> String {
        let key = format!("hh_{}", hex_of(&rand::random::<[u8; 32]>()));
        self.lock().hub_keys.insert(
            key.clone(),
            clinic_ids.iter().map(|c| (*c).to_owned()).collect(),
        );
        key
    }

    /// Requests a minute per client address, and the `retry-after` it answers.
    pub fn set_rate_limit(&self, per_minute: usize, retry_after: u64) {
        let mut state = self.lock();
        state.per_minute = per_minute;
        state.retry_after = retry_after;
    }

    /// An outage: every sync request answers 503 while `down`.
    pub fn set_down(&self, down: bool) {
        self.lock().faults.down = down;
    }

    /// The next push fails with 500 after `rows` rows were applied.
    pub fn fail_after(&self, rows: usize) {
        self.lock().faults.fail_after_rows = Some(rows);
    }

    /// The next `count` sync requests answer 429 with `retry-after: seconds`.
    pub fn force_429(&self, count: usize, seconds: u64) {
        let mut state = self.lock();
        state.faults.forced_429 = count;
        state.retry_after = seconds;
    }

    /// Rows with this id fail the push (500) until [`Self::accept_id`], as a row that
    /// breaks a foreign key does.
    pub fn refuse_id(&self, id: &str) {
        self.lock().faults.refuse_ids.push(id.to_owned());
    }

    /// Takes rows with this id again.
    pub fn accept_id(&self, id: &str) {
        self.lock().faults.refuse_ids.retain(|i| i != id);
    }

    /// An edit made in the cloud's admin pages just before the next push arrives: the
    /// push's rows, stamped a moment earlier, are then older than it (dropped).
    pub fn edit_before_next_push(&self, table: &str, id: &str, changes: Value) {
        self.lock()
            .faults
            .edits_before_push
            .push((table.to_owned(), id.to_owned(), changes));
    }

    /// The next `count` pulls answer 200 with a body that is not the contract's (a
    /// broken proxy, a truncated answer).
    pub fn garble_pulls(&self, count: usize) {
        self.lock().faults.garbled_pulls = count;
    }

    /// Pushes are applied at once but answered only after `delay` (a slow link: a
    /// gateway killed meanwhile never sees the 200).
    pub fn set_push_delay(&self, delay: Duration) {
        self.lock().faults.push_delay = delay;
    }

    /// What the cloud has counted.
    pub fn stats(&self) -> CloudStats {
        self.lock().stats.clone()
    }

    /// A live (not deleted) row, in the cloud's form.
    pub fn row(&self, table: &str, id: &str) -> Option<Fields> {
        let state = self.lock();
        let row = state.tables.get(table)?.get(id)?;
        (!row.deleted()).then(|| row.fields.clone())
    }

    /// Is the row there and soft-deleted.
    pub fn is_deleted(&self, table: &str, id: &str) -> bool {
        let state = self.lock();
        state
            .tables
            .get(table)
            .and_then(|t| t.get(id))
            .is_some_and(Row::deleted)
    }

    /// Live rows of a table.
    pub fn count(&self, table: &str) -> usize {
        let state = self.lock();
        state
            .tables
            .get(table)
            .map_or(0, |t| t.values().filter(|r| !r.deleted()).count())
    }

    /// Live rows of a table.
    pub fn rows(&self, table: &str) -> Vec<Fields> {
        let state = self.lock();
        state
            .tables
            .get(table)
            .map(|t| {
                t.values()
                    .filter(|r| !r.deleted())
                    .map(|r| r.fields.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The inventory transactions the cloud wrote (its trigger and restocks).
    pub fn inventory_transactions(&self) -> Vec<Value> {
        self.lock().inventory_transactions.clone()
    }

    /// A row entered in the cloud's admin pages: inserted or replaced, stamped now.
    pub fn put(&self, table: &str, fields: Value) {
        let mut state = self.lock();
        let now = state.tick();
        let Value::Object(mut fields) = fields else {
            return;
        };
        let id = fields
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        fields.insert("updated_at".into(), json!(record::format_timestamp(now)));
        fields
            .entry("created_at")
            .or_insert_with(|| json!(record::format_timestamp(now)));
        fields.entry("is_deleted").or_insert(json!(false));
        let fields = self.to_cloud_form(table, fields);
        let table = state.tables.entry(table.to_owned()).or_default();
        let server_created_at = table.get(&id).map_or(now, |r| r.server_created_at);
        table.insert(
            id,
            Row {
                fields,
                server_created_at,
                last_modified: now,
                deleted_at: None,
            },
        );
    }

    /// Edits columns of a row in the cloud's admin pages (its `updated_at` moves).
    pub fn edit(&self, table: &str, id: &str, changes: Value) -> bool {
        let mut state = self.lock();
        let now = state.tick();
        let Some(row) = state.tables.get_mut(table).and_then(|t| t.get_mut(id)) else {
            return false;
        };
        if let Value::Object(changes) = changes {
            for (k, v) in changes {
                row.fields.insert(k, v);
            }
        }
        row.fields
            .insert("updated_at".into(), json!(record::format_timestamp(now)));
        row.last_modified = now;
        true
    }

    /// A restock entered in the cloud: the stock row's quantity grows, with the cloud's
    /// own inventory transaction.
    pub fn restock(&self, inventory_id: &str, quantity: i64) -> bool {
        let mut state = self.lock();
        let now = state.tick();
        let Some(row) = state
            .tables
            .get_mut("clinic_inventory")
            .and_then(|t| t.get_mut(inventory_id))
        else {
            return false;
        };
        row.move_stock(quantity, now);
        state.inventory_transactions.push(json!({
            "inventory_id": inventory_id, "type": "restock", "quantity": quantity,
        }));
        true
    }

    /// A delete in the cloud's admin pages (soft).
    pub fn delete(&self, table: &str, id: &str) -> bool {
        let mut state = self.lock();
        let now = state.tick();
        let Some(row) = state.tables.get_mut(table).and_then(|t| t.get_mut(id)) else {
            return false;
        };
        row.fields.insert("is_deleted".into(), json!(true));
        row.fields
            .insert("deleted_at".into(), json!(record::format_timestamp(now)));
        row.deleted_at = Some(now);
        row.last_modified = now;
        true
    }

    fn field_type(&self, table: &str, field: &str) -> Option<FieldType> {
        self.schema
            .collection(table)
            .and_then(|s| s.field(field))
            .map(|f| f.ty)
    }

    /// A pushed row as the cloud stores it: epoch numbers in timestamp columns become
    /// timestamps (`0` null), JSON text becomes JSON.
    fn to_cloud_form(&self, table: &str, fields: Fields) -> Fields {
        fields
            .into_iter()
            .map(|(name, value)| {
                let value = match (self.field_type(table, &name), value) {
                    (Some(FieldType::Timestamp), Value::Number(n)) => match n.as_i64() {
                        Some(0) | None => Value::Null,
                        Some(ms) => {
                            json!(record::format_timestamp(
                                record::timestamp_ms(&json!(ms)).unwrap_or(ms)
                            ))
                        }
                    },
                    (Some(FieldType::Json | FieldType::StringList), Value::String(text)) => {
                        serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text))
                    }
                    (_, value) => value,
                };
                (name, value)
            })
            .collect()
    }

    /// A stored row as a pull shows it.
    fn to_pull_form(&self, table: &str, row: &Row) -> Value {
        let mut out = Map::new();
        for (name, value) in &row.fields {
            let value = match (self.field_type(table, name), value) {
                (Some(FieldType::Date), Value::String(text)) => {
                    match NaiveDate::parse_from_str(text.get(..10).unwrap_or(""), "%Y-%m-%d") {
                        // Midnight in the server's time zone, written in UTC.
                        Ok(date) => {
                            let midnight = Utc
                                .from_utc_datetime(&date.and_hms_opt(0, 0, 0).unwrap_or_default())
                                .timestamp_millis()
                                - SERVER_UTC_OFFSET_HOURS * 3_600_000;
                            json!(record::format_timestamp(midnight))
                        }
                        Err(_) => value.clone(),
                    }
                }
                (Some(FieldType::Decimal), Value::Number(n)) => json!(n.to_string()),
                _ => value.clone(),
            };
            out.insert(name.clone(), value);
        }
        out.insert(
            "server_created_at".into(),
            json!(record::format_timestamp(row.server_created_at)),
        );
        out.insert(
            "last_modified".into(),
            json!(record::format_timestamp(row.last_modified)),
        );
        Value::Object(out)
    }

    /// A cloud with one clinic, served on loopback, and a hub key for it written to
    /// `dir/hub.key`: the cloud's URL and that file, what a gateway starts with.
    pub async fn serve_with_clinic(
        &self,
        dir: &std::path::Path,
        clinic: &str,
        name: &str,
    ) -> std::io::Result<(String, std::path::PathBuf)> {
        self.put("clinics", json!({"id": clinic, "name": name}));
        let key = self.add_hub_key(&[clinic]);
        let addr = self
            .serve("127.0.0.1:0".parse().expect("an address"))
            .await?;
        let key_file = dir.join("hub.key");
        std::fs::write(&key_file, format!("{key}\n"))?;
        Ok((format!("http://{addr}"), key_file))
    }

    /// Serves the cloud on `addr` (port 0: any); answers the address it listens on.
    pub async fn serve(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/api/v2/sync", get(pull).post(push))
            .route("/api/hub/verify-key", post(verify_key))
            .layer(axum::extract::DefaultBodyLimit::max(256 * 1024 * 1024))
            .with_state(self.clone());
        tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await;
        });
        Ok(addr)
    }

    /// The gate every sync request passes: the hub key, the outage, the rate limit.
    /// Answers the key's clinics.
    fn admit(&self, headers: &HeaderMap) -> Result<Vec<String>, Box<Response>> {
        let mut state = self.lock();
        state.stats.requests += 1;
        let key = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let Some(clinics) = state.hub_keys.get(key).cloned() else {
            return Err(Box::new(
                (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"error": "Unauthorized"})),
                )
                    .into_response(),
            ));
        };
        if state.faults.down {
            return Err(Box::new(
                (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable").into_response(),
            ));
        }
        let client = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map_or_else(|| "shared".to_owned(), |v| v.trim().to_owned());
        let per_minute = state.per_minute;
        let forced = state.faults.forced_429 > 0;
        let window = state.rate.entry(client).or_default();
        let now = Instant::now();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            window.pop_front();
        }
        if forced || window.len() >= per_minute {
            if forced {
                state.faults.forced_429 -= 1;
            }
            state.stats.too_many += 1;
            let retry = state.retry_after.to_string();
            return Err(Box::new(
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", retry)],
                    axum::Json(json!({"error": "Too many requests. Please try again later."})),
                )
                    .into_response(),
            ));
        }
        window.push_back(now);
        Ok(clinics)
    }
}

impl CloudState {
    /// The server's clock in ms, strictly increasing.
    fn tick(&mut self) -> i64 {
        self.clock = Utc::now().timestamp_millis().max(self.clock + 1);
        self.clock
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn http_error() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        axum::Json(json!({"status": 500, "unhandled": true, "message": "HTTPError"})),
    )
        .into_response()
}

async fn verify_key(State(cloud): State<Cloud>, body: Bytes) -> Response {
    let key = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("api_key").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_default();
    let clinics = cloud.lock().hub_keys.get(&key).cloned();
    match clinics {
        Some(clinics) => axum::Json(json!({
            "valid": true,
            "id": "3b0a3b52-0c0e-4c55-9f5f-5b8f0e5f6a01",
            "name": "medmesh gateway",
            "device_type": "sync_hub",
            "clinic_ids": clinics,
        }))
        .into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "Invalid API key"})),
        )
            .into_response(),
    }
}

/// The clinic a row belongs to, for a hub's scope; `None` when the table has no clinic
/// column (every row is in scope).
fn clinic_of(table: &str, row: &Fields) -> Option<Vec<String>> {
    let column = match table {
        "patients" => "primary_clinic_id",
        "clinics" => "id",
        "prescriptions" => "pickup_clinic_id",
        "event_forms" => {
            return Some(
                row.get("clinic_ids")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|c| c.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            );
        }
        "visits"
        | "registration_forms"
        | "appointments"
        | "clinic_departments"
        | "clinic_inventory"
        | "dispensing_records"
        | "prescription_items"
        | "user_clinic_permissions"
        | "users" => "clinic_id",
        _ => return None,
    };
    Some(
        row.get(column)
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
            .map(|c| vec![c.to_owned()])
            .unwrap_or_default(),
    )
}

async fn pull(
    State(cloud): State<Cloud>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let clinics = match cloud.admit(&headers) {
        Ok(c) => c,
        Err(answer) => return *answer,
    };
    let since: i64 = params
        .get("last_pulled_at")
        .or_else(|| params.get("lastPulledAt"))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let mut state = cloud.lock();
    if state.faults.garbled_pulls > 0 {
        state.faults.garbled_pulls -= 1;
        return (
            StatusCode::OK,
            [("content-type", "application/json")],
            "{\"success\": true, \"changes\": {\"patients\": {\"created\": [{\"id\": ",
        )
            .into_response();
    }
    let timestamp = state.tick();
    let mut changes = Map::new();
    for table in hub_tables() {
        let mut created = Vec::new();
        let mut updated = Vec::new();
        let mut deleted = Vec::new();
        for (id, row) in state.tables.get(table).into_iter().flatten() {
            if let Some(row_clinics) = clinic_of(table, &row.fields)
                && !row_clinics.iter().any(|c| clinics.contains(c))
            {
                continue;
            }
            if row.deleted() {
                if since > 0 && row.deleted_at.is_some_and(|d| d > since) {
                    deleted.push(json!(id));
                }
            } else if row.server_created_at >= since {
                created.push(cloud.to_pull_form(table, row));
            } else if row.last_modified > since {
                updated.push(cloud.to_pull_form(table, row));
            }
        }
        changes.insert(
            table.to_owned(),
            json!({"created": created, "updated": updated, "deleted": deleted}),
        );
    }
    let body =
        serde_json::to_vec(&json!({"success": true, "changes": changes, "timestamp": timestamp}))
            .unwrap_or_default();
    state.stats.pulls += 1;
    state.stats.bytes_out += body.len() as u64;
    drop(state);
    (StatusCode::OK, [("content-type", "application/json")], body).into_response()
}

async fn push(State(cloud): State<Cloud>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(answer) = cloud.admit(&headers) {
        return *answer;
    }
    match apply_push(&cloud, &body) {
        Ok(delay) => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            axum::Json(json!({"success": true})).into_response()
        }
        Err(answer) => *answer,
    }
}

/// Applies a push; answers how long to wait before the 200.
fn apply_push(cloud: &Cloud, body: &[u8]) -> Result<Duration, Box<Response>> {
    let edits = std::mem::take(&mut cloud.lock().faults.edits_before_push);
    for (table, id, changes) in edits {
        cloud.edit(&table, &id, changes);
    }
    let mut state = cloud.lock();
    state.stats.bytes_in += body.len() as u64;
    let Ok(Value::Object(tables)) = serde_json::from_slice::<Value>(body) else {
        state.stats.failed += 1;
        return Err(Box::new(http_error()));
    };
    let mut applied = 0usize;
    for table in push_order() {
        let Some(changes) = tables.get(table) else {
            continue;
        };
        for kind in ["created", "updated"] {
            for row in changes
                .get(kind)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                state.stats.rows_pushed += 1;
                if state.faults.fail_after_rows == Some(applied) {
                    state.faults.fail_after_rows = None;
                    state.stats.failed += 1;
                    return Err(Box::new(http_error()));
                }
                let Some(row) = row.as_object() else {
                    state.stats.failed += 1;
                    return Err(Box::new(http_error()));
                };
                if !cloud.apply_row(&mut state, table, row.clone()) {
                    state.stats.failed += 1;
                    return Err(Box::new(http_error()));
                }
                applied += 1;
            }
        }
        for id in changes
            .get("deleted")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(id) = id.as_str() else { continue };
            let now = state.tick();
            if let Some(row) = state.tables.get_mut(table).and_then(|t| t.get_mut(id))
                && !row.deleted()
            {
                row.fields.insert("is_deleted".into(), json!(true));
                row.fields
                    .insert("deleted_at".into(), json!(record::format_timestamp(now)));
                row.deleted_at = Some(now);
                row.last_modified = now;
            }
            applied += 1;
        }
    }
    state.stats.pushes += 1;
    Ok(state.faults.push_delay)
}

impl Cloud {
    /// Applies one pushed row; false when the row is refused (the push answers 500).
    fn apply_row(&self, state: &mut CloudState, table: &str, row: Fields) -> bool {
        let Some(mut id) = row.get("id").and_then(Value::as_str).map(str::to_owned) else {
            return false;
        };
        if state.faults.refuse_ids.contains(&id) {
            return false;
        }
        match table {
            // A hub's catalogue pushes are dropped.
            "drug_catalogue" => return true,
            // Inserted under a new id every time.
            "clinic_departments" => id = uuid::Uuid::new_v4().to_string(),
            "patients" if uuid::Uuid::parse_str(&id).is_err() => {
                id = uuid::Uuid::new_v4().to_string();
            }
            "dispensing_records" => {
                let required = [
                    "clinic_id",
                    "drug_id",
                    "patient_id",
                    "dispensed_by",
                    "dispensed_at",
                ];
                if required
                    .iter()
                    .any(|c| row.get(*c).is_none_or(Value::is_null))
                {
                    return false;
                }
                let patient = row.get("patient_id").and_then(Value::as_str).unwrap_or("");
                if !state
                    .tables
                    .get("patients")
                    .is_some_and(|t| t.contains_key(patient))
                {
                    return false;
                }
            }
            _ => {}
        }
        // User columns must name users of the cloud (a hub cannot push users).
        for column in [
            "provider_id",
            "last_modified_by",
            "recorded_by_user_id",
            "dispensed_by",
        ] {
            if let Some(user) = row.get(column).and_then(Value::as_str)
                && !state
                    .tables
                    .get("users")
                    .is_some_and(|t| t.contains_key(user))
            {
                return false;
            }
        }
        let mut fields = self.to_cloud_form(table, row);
        fields.insert("id".into(), json!(id));
        let is_deleted = fields.get("is_deleted").and_then(Value::as_bool) == Some(true);
        fields.insert("is_deleted".into(), json!(is_deleted));
        let now = state.tick();
        let incoming = fields.get("updated_at").and_then(record::timestamp_ms);
        let existing = state.tables.get(table).and_then(|t| t.get(&id)).cloned();
        match existing {
            Some(old) => {
                let stored = old.fields.get("updated_at").and_then(record::timestamp_ms);
                if table != "patient_problems" && incoming <= stored {
                    state.stats.stale += 1;
                    return true; // stale: dropped silently
                }
                if SERVER_STAMPED.contains(&table) {
                    fields.insert("updated_at".into(), json!(record::format_timestamp(now)));
                }
                let deleted_at = if is_deleted {
                    old.deleted_at.or(Some(now))
                } else {
                    None
                };
                state.tables.entry(table.to_owned()).or_default().insert(
                    id,
                    Row {
                        fields,
                        server_created_at: old.server_created_at,
                        last_modified: now,
                        deleted_at,
                    },
                );
            }
            None => {
                if table == "dispensing_records" {
                    Self::dispense_trigger(state, &fields, now);
                }
                state.tables.entry(table.to_owned()).or_default().insert(
                    id,
                    Row {
                        fields,
                        server_created_at: now,
                        last_modified: now,
                        deleted_at: is_deleted.then_some(now),
                    },
                );
            }
        }
        true
    }

    /// The inventory trigger: a first insert of a dispensing record takes its quantity
    /// off the batch's stock row (the latest-expiring batch when none is named; a new,
    /// negative row when there is none).
    fn dispense_trigger(state: &mut CloudState, record: &Fields, now: i64) {
        let text = |f: &str| {
            record
                .get(f)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let (clinic, drug, batch) = (text("clinic_id"), text("drug_id"), text("batch_id"));
        let quantity = record
            .get("quantity_dispensed")
            .and_then(|v| v.as_i64().or_else(|| v.as_str()?.parse().ok()))
            .unwrap_or(0);
        let inventory = state
            .tables
            .entry("clinic_inventory".to_owned())
            .or_default();
        let matches = |r: &Row| {
            r.fields.get("clinic_id").and_then(Value::as_str) == Some(&clinic)
                && r.fields.get("drug_id").and_then(Value::as_str) == Some(&drug)
                && !r.deleted()
        };
        let target = if batch.is_empty() {
            inventory
                .iter()
                .filter(|(_, r)| matches(r))
                .max_by_key(|(_, r)| {
                    r.fields
                        .get("batch_expiry_date")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned()
                })
                .map(|(id, _)| id.clone())
        } else {
            inventory
                .iter()
                .find(|(_, r)| {
                    matches(r) && r.fields.get("batch_id").and_then(Value::as_str) == Some(&batch)
                })
                .map(|(id, _)| id.clone())
        };
        let id = target.unwrap_or_else(|| {
            let id = uuid::Uuid::new_v4().to_string();
            let mut fields = Fields::new();
            fields.insert("id".into(), json!(id));
            fields.insert("clinic_id".into(), json!(clinic));
            fields.insert("drug_id".into(), json!(drug));
            fields.insert(
                "batch_id".into(),
                if batch.is_empty() {
                    Value::Null
                } else {
                    json!(batch)
                },
            );
            fields.insert("quantity_available".into(), json!(0));
            fields.insert("is_deleted".into(), json!(false));
            fields.insert("created_at".into(), json!(record::format_timestamp(now)));
            inventory.insert(
                id.clone(),
                Row {
                    fields,
                    server_created_at: now,
                    last_modified: now,
                    deleted_at: None,
                },
            );
            id
        });
        if let Some(row) = inventory.get_mut(&id) {
            row.move_stock(-quantity, now);
        }
        state.inventory_transactions.push(json!({
            "inventory_id": id, "type": "dispense", "quantity": -quantity,
            "dispensing_record_id": record.get("id"),
        }));
    }
}
