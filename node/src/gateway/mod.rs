//! The gateway: one node carries the mesh's changes to a Hikma cloud and brings the
//! cloud's back, as a `sync_hub` peer of the cloud's sync API (`HIKMA_SYNC_API.md`).
//!
//! One loop, one owner of the gateway's state: pull since the saved `last_pulled_at`,
//! merge, push what the mesh changed since the saved feed position; on every local change
//! (debounced) and on an interval. Both positions, and the row last exchanged with the
//! cloud for every record (the *base*), are node-local values saved only after the
//! cloud's `200`.
//!
//! - **Three-way merge.** The cloud merges rows (last writer wins), the mesh merges
//!   fields. A pulled row changes only the columns that differ from its base, so a field
//!   edited in the mesh and another edited in the cloud both survive; the row pushed is
//!   the whole merged record, stamped newer than both.
//! - **No echo.** A mesh record equal to its base is not pushed; a pulled row equal to
//!   its base writes nothing. A quiet round is one pull and no write.
//! - **Stock.** Dispenses cross as `dispensing_records` (the cloud's trigger counts them
//!   once; a dispense the cloud has and the mesh lacks becomes a dispense of the mesh,
//!   counted once). The cloud's own movements arrive as movements of the item's cloud
//!   ledger: its value is the cloud's quantity plus every dispense the cloud recorded for
//!   the item, an absolute target every gateway computes alike; one gateway of the mesh
//!   (the lowest peer id among those running) writes it.

mod rows;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::Utc;
use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::schema::GATEWAYS_COLLECTION;
use medmesh_protocol::{ChangeAuthor, DocId};
use medmesh_storage::{Query, Store, StoreError, WriteBatch, WriteKind, WriteOp};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::mobile::{PULLED_TABLES, PUSHED_TABLES};
use crate::pharmacy::{Pharmacy, QUANTITY};

/// Largest answer read from the cloud (a pull of 100,000 records is about 60 MiB).
const MAX_ANSWER_BYTES: usize = 1024 * 1024 * 1024;
/// Rows in one push, at most (a backlog of 100,000 goes in 20 requests, well under the
/// cloud's 60 a minute).
pub const PUSH_PAGE_ROWS: usize = 5_000;
/// Bytes of one push, roughly at most.
const PUSH_PAGE_BYTES: usize = 8 * 1024 * 1024;
/// Requests to the cloud in any minute, at most (the cloud allows 60 per address).
const REQUESTS_PER_MINUTE: usize = 50;
/// Failed sends of one push page before it is split to find the row the cloud refuses.
const FAILURES_BEFORE_SPLIT: u32 = 3;
/// How long a gateway's record says it is running.
const GATEWAY_ALIVE: Duration = Duration::from_secs(24 * 3600);
/// A gateway refreshes its record this often when a round writes anyway...
const HEARTBEAT_BUSY: Duration = Duration::from_secs(10 * 60);
/// ...and at least this often.
const HEARTBEAT_QUIET: Duration = Duration::from_secs(6 * 3600);
/// Longest wait between attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// A push of at most this many rows follows a pull at most [`FRESH_PULL`] old.
const FRESH_PULL_ROWS: usize = 500;
/// See [`FRESH_PULL_ROWS`].
const FRESH_PULL: Duration = Duration::from_millis(300);
/// Pulled rows written to the store in one batch.
const WRITE_CHUNK: usize = 2_000;

/// In a base: the row was pushed and no pull has shown the cloud kept it yet...
const UNCONFIRMED: &str = "_unconfirmed";
/// ...and the base before it (the row both sides had).
const PREVIOUS: &str = "_previous";

const PULL_KEY: &str = "gateway/pull";
const REPUSH: &str = "gateway/repush/";
/// Record id → the feed position of the pull's creation of it.
const CREATED_AT_SEQ: &str = "gateway/created/";
const PUSH_KEY: &str = "gateway/push";
const BASE: &str = "gateway/base/";
const REFUSED: &str = "gateway/refused/";
const DISPENSE_SEEN: &str = "gateway/dispense/";
const DISPENSED_SUM: &str = "gateway/dispensed/";
const CLOUD_QUANTITY: &str = "gateway/quantity/";
const BATCH: &str = "gateway/batch/";

/// How a gateway reaches its cloud.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The cloud's base URL (`https://demo.hikmahealth.org`).
    pub url: String,
    /// The hub key (`hh_` and 64 hex digits).
    pub key: String,
    /// A round at least this often.
    pub interval: Duration,
    /// A round this long after a local change.
    pub debounce: Duration,
    /// Rows in one push, at most.
    pub push_page: usize,
}

impl GatewayConfig {
    /// A gateway to `url` with `key`, at the usual pace.
    pub fn new(url: &str, key: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_owned(),
            key: key.trim().to_owned(),
            interval: Duration::from_secs(30),
            debounce: Duration::from_secs(2),
            push_page: PUSH_PAGE_ROWS,
        }
    }
}

/// Checks that a hub key looks like one (`hh_` and 64 hex digits).
pub fn check_key_form(key: &str) -> Result<(), String> {
    let hex = key.strip_prefix("hh_").unwrap_or("");
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err("a Hikma hub key is `hh_` followed by 64 hex digits".to_owned())
    }
}

/// What went wrong talking to the cloud.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// No answer (no internet, DNS, refused connection, timeout).
    #[error("cannot reach the Hikma cloud at {url}: {reason}")]
    Unreachable {
        /// The cloud.
        url: String,
        /// Why.
        reason: String,
    },
    /// The cloud refused the hub key.
    #[error(
        "the Hikma cloud at {url} refused the hub key (HTTP {status}); ask the cloud's administrator for a valid hub key"
    )]
    Refused {
        /// The cloud.
        url: String,
        /// Its answer's status.
        status: u16,
    },
    /// Too many requests: wait.
    #[error("the Hikma cloud asked the gateway to slow down; waiting {0} s")]
    Slow(u64),
    /// The cloud failed (5xx).
    #[error("the Hikma cloud answered HTTP {status}: {body}")]
    Failed {
        /// The status.
        status: u16,
        /// What it said.
        body: String,
        /// True for the cloud's own failure answer (a row it could not take), as against a
        /// proxy or an outage.
        own: bool,
    },
    /// An answer that is not the contract's.
    #[error("the Hikma cloud's answer could not be read: {0}")]
    Garbled(String),
}

/// Asks the cloud whether it takes `key` (`POST /api/hub/verify-key`); answers the
/// hub's device record.
pub async fn verify_key(http: &reqwest::Client, url: &str, key: &str) -> Result<Value, CloudError> {
    let response = http
        .post(format!("{url}/api/hub/verify-key"))
        .json(&json!({ "api_key": key }))
        .send()
        .await
        .map_err(|e| unreachable(url, &e))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| unreachable(url, &e))?;
    if status.is_success() {
        let record: Value =
            serde_json::from_slice(&body).map_err(|e| CloudError::Garbled(e.to_string()))?;
        if record.get("valid").and_then(Value::as_bool) == Some(false) {
            return Err(CloudError::Refused {
                url: url.to_owned(),
                status: status.as_u16(),
            });
        }
        return Ok(record);
    }
    Err(classify(url, status, &body, None))
}

/// The HTTP client a gateway uses (TLS with the system's certificates).
pub fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .connect_timeout(Duration::from_secs(20))
        .build()
        .context("cannot set up HTTPS for the gateway")
}

fn unreachable(url: &str, err: &reqwest::Error) -> CloudError {
    let mut reason = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        reason = format!("{reason}: {inner}");
        source = inner.source();
    }
    CloudError::Unreachable {
        url: url.to_owned(),
        reason,
    }
}

fn classify(
    url: &str,
    status: reqwest::StatusCode,
    body: &[u8],
    retry_after: Option<u64>,
) -> CloudError {
    match status.as_u16() {
        401 | 403 => CloudError::Refused {
            url: url.to_owned(),
            status: status.as_u16(),
        },
        429 => CloudError::Slow(retry_after.unwrap_or(60).clamp(1, 600)),
        code => {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            CloudError::Failed {
                status: code,
                own: code == 500 && text.contains("HTTPError"),
                body: text,
            }
        }
    }
}

/// What `GET /v1/gateway` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewayStatus {
    /// The cloud.
    pub cloud: String,
    /// The hub's device record as the cloud answered it at start, if it was reachable.
    pub hub: Option<Value>,
    /// True while this gateway brings the cloud's stock movements into the mesh.
    pub stock_gateway: bool,
    /// When the last pull succeeded.
    pub last_pull_at: Option<String>,
    /// When the last push succeeded (or found nothing to send).
    pub last_push_at: Option<String>,
    /// Rows the last successful pull carried.
    pub last_pull_rows: usize,
    /// Rows pushed since the gateway started.
    pub pushed_rows: u64,
    /// Rows pulled since the gateway started.
    pub pulled_rows: u64,
    /// Requests sent to the cloud since the gateway started.
    pub requests: u64,
    /// The last failure, in words, and when; cleared by the next good round.
    pub last_error: Option<String>,
    /// When the last failure happened.
    pub last_error_at: Option<String>,
    /// Records the cloud refused, kept in the mesh and sent again when they change.
    pub refused: Vec<Value>,
    /// Changes of the mesh not yet in the cloud (computed when asked).
    pub backlog: u64,
    /// With no backlog: the cloud's stock items whose quantity in the mesh differs from
    /// the cloud's at the last pull — stock moved in the mesh by restocks, counts or
    /// adjustments, which the cloud does not take from a hub. Enter them in the cloud.
    pub stock_differences: Vec<Value>,
}

/// A running gateway, for the API.
#[derive(Clone)]
pub struct GatewayHandle {
    status: Arc<Mutex<GatewayStatus>>,
    store: Store,
    pharmacy: Arc<Pharmacy>,
    device: String,
}

impl GatewayHandle {
    /// The gateway's status, with its backlog counted now.
    pub fn status(&self) -> GatewayStatus {
        let mut status = self.status.lock().map(|s| s.clone()).unwrap_or_default();
        status.backlog = backlog(&self.store).unwrap_or(0);
        status.stock_gateway = is_stock_gateway(&self.store, &self.device).unwrap_or(false);
        status.refused = self
            .store
            .local_with_prefix(REFUSED)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect();
        if status.backlog == 0 {
            status.stock_differences = self.stock_differences().unwrap_or_default();
        }
        status
    }

    fn stock_differences(&self) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        for (key, value) in self.store.local_with_prefix(CLOUD_QUANTITY)? {
            let Ok(item) = key[CLOUD_QUANTITY.len()..].parse::<DocId>() else {
                continue;
            };
            let Ok(cloud) = <[u8; 8]>::try_from(value.as_slice()).map(i64::from_be_bytes) else {
                continue;
            };
            let mesh = self
                .pharmacy
                .quantity(&item)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(mesh) = mesh.filter(|m| *m != cloud) {
                out.push(json!({"stock_item_id": item, "mesh": mesh, "cloud": cloud}));
            }
        }
        Ok(out)
    }
}

/// Mesh changes after the push position, in the tables the cloud takes (counted up to
/// 100,000).
fn backlog(store: &Store) -> Result<u64> {
    let mut after = read_u64(store, PUSH_KEY)?;
    let mut count = 0u64;
    loop {
        let (entries, last) = store.feed_page(after, 1000)?;
        count += entries
            .iter()
            .filter(|e| PUSHED_TABLES.contains(&e.collection.as_str()))
            .count() as u64;
        if last == after || count >= 100_000 {
            return Ok(count);
        }
        after = last;
    }
}

fn read_u64(store: &Store, key: &str) -> Result<u64> {
    Ok(store
        .get_local(key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// The base of a record: the row last exchanged with the cloud.
#[derive(Debug, Clone)]
enum Base {
    Live(Fields),
    Deleted,
}

fn base_key(table: &str, id: &DocId) -> String {
    format!("{BASE}{table}/{id}")
}

fn encode_base(base: &Base) -> Vec<u8> {
    match base {
        Base::Live(row) => serde_json::to_vec(row).unwrap_or_default(),
        Base::Deleted => b"null".to_vec(),
    }
}

fn decode_base(bytes: &[u8]) -> Option<Base> {
    match serde_json::from_slice::<Value>(bytes).ok()? {
        Value::Object(row) => Some(Base::Live(row)),
        Value::Null => Some(Base::Deleted),
        _ => None,
    }
}

/// Node-local writes of one step, read through before they are saved.
#[derive(Default)]
struct Staged {
    entries: BTreeMap<String, Option<Vec<u8>>>,
}

impl Staged {
    fn get(&self, store: &Store, key: &str) -> Result<Option<Vec<u8>>> {
        match self.entries.get(key) {
            Some(value) => Ok(value.clone()),
            None => Ok(store.get_local(key)?),
        }
    }

    fn put(&mut self, key: String, value: Vec<u8>) {
        self.entries.insert(key, Some(value));
    }

    fn remove(&mut self, key: String) {
        self.entries.insert(key, None);
    }

    fn get_i64(&self, store: &Store, key: &str) -> Result<i64> {
        Ok(self
            .get(store, key)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, i64::from_be_bytes))
    }

    fn save(self, store: &Store) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        store
            .put_local_blocking(self.entries.into_iter().collect())
            .context("cannot save the gateway's positions")
    }
}

/// One page of mesh changes for the cloud.
struct PushPage {
    body: Map<String, Value>,
    rows: Vec<(String, DocId, Base)>,
    /// The records in `rows`.
    ids: std::collections::HashSet<DocId>,
    /// Re-push marks this page takes care of.
    cleared: Vec<String>,
    /// The cloud's users, read when first needed.
    users: Option<Vec<CloudUser>>,
    /// The feed position this page reaches.
    end: u64,
}

/// The gateway of a node.
pub struct Gateway {
    store: Store,
    pharmacy: Arc<Pharmacy>,
    device: String,
    config: GatewayConfig,
    http: reqwest::Client,
    status: Arc<Mutex<GatewayStatus>>,
    sent: Mutex<VecDeque<Instant>>,
    heartbeat: Mutex<Option<Instant>>,
    last_pull: Mutex<Option<Instant>>,
}

impl Gateway {
    /// A gateway for the node whose store, pharmacy and peer id these are.
    pub fn new(
        store: Store,
        pharmacy: Arc<Pharmacy>,
        device: String,
        config: GatewayConfig,
        hub: Option<Value>,
    ) -> Result<Arc<Self>> {
        let status = GatewayStatus {
            cloud: config.url.clone(),
            hub,
            ..GatewayStatus::default()
        };
        Ok(Arc::new(Self {
            store,
            pharmacy,
            device,
            http: http_client()?,
            config,
            status: Arc::new(Mutex::new(status)),
            sent: Mutex::new(VecDeque::new()),
            heartbeat: Mutex::new(None),
            last_pull: Mutex::new(None),
        }))
    }

    /// The handle the API shows the status through.
    pub fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            status: self.status.clone(),
            store: self.store.clone(),
            pharmacy: self.pharmacy.clone(),
            device: self.device.clone(),
        }
    }

    fn update_status(&self, change: impl FnOnce(&mut GatewayStatus)) {
        if let Ok(mut status) = self.status.lock() {
            change(&mut status);
        }
    }

    /// Runs rounds until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        // Records the cloud refused get another chance with every start.
        let gateway = self.clone();
        let _ = tokio::task::spawn_blocking(move || gateway.start_fresh()).await;
        let mut feed = self.store.subscribe_feed();
        let mut failures = 0u32;
        loop {
            let wait = match self.round().await {
                Ok(()) => {
                    failures = 0;
                    self.update_status(|s| {
                        s.last_error = None;
                        s.last_error_at = None;
                    });
                    None
                }
                Err(err) => {
                    let wait = match err.downcast_ref::<CloudError>() {
                        Some(CloudError::Slow(seconds)) => Duration::from_secs(*seconds),
                        _ => {
                            failures = failures.saturating_add(1);
                            backoff(failures)
                        }
                    };
                    let message = describe(&err, wait);
                    tracing::warn!(error = %message, "gateway round failed");
                    self.update_status(|s| {
                        s.last_error = Some(message);
                        s.last_error_at =
                            Some(record::format_timestamp(Utc::now().timestamp_millis()));
                    });
                    Some(wait)
                }
            };
            feed.borrow_and_update();
            let sleep = tokio::time::sleep(wait.unwrap_or(self.config.interval));
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = sleep => {}
                changed = feed.changed(), if wait.is_none() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(self.config.debounce) => {}
                    }
                }
            }
        }
    }

    fn start_fresh(&self) -> Result<()> {
        let refused: Vec<(String, Option<Vec<u8>>)> = self
            .store
            .local_with_prefix(REFUSED)?
            .into_iter()
            .map(|(k, _)| (k, None))
            .collect();
        if !refused.is_empty() {
            self.store.put_local_blocking(refused)?;
        }
        self.beat(true)
    }

    /// One round: pull, then push until the mesh's changes are in the cloud.
    pub async fn round(self: &Arc<Self>) -> Result<()> {
        self.pull().await?;
        self.push().await
    }

    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Self) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let gateway = self.clone();
        tokio::task::spawn_blocking(move || work(&gateway))
            .await
            .context("the gateway's work was interrupted")?
    }

    /// Waits for a slot under the cloud's rate limit.
    async fn pace(&self) {
        loop {
            let wait = {
                let Ok(mut sent) = self.sent.lock() else {
                    return;
                };
                let now = Instant::now();
                while sent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
                {
                    sent.pop_front();
                }
                if sent.len() < REQUESTS_PER_MINUTE {
                    sent.push_back(now);
                    None
                } else {
                    sent.front()
                        .map(|t| Duration::from_secs(60).saturating_sub(now.duration_since(*t)))
                }
            };
            match wait {
                None => break,
                Some(wait) => tokio::time::sleep(wait + Duration::from_millis(10)).await,
            }
        }
        self.update_status(|s| s.requests += 1);
    }

    async fn send(
        &self,
        method: reqwest::Method,
        last_pulled_at: i64,
        body: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, CloudError> {
        self.pace().await;
        let url = &self.config.url;
        let mut request = self
            .http
            .request(
                method,
                format!("{url}/api/v2/sync?last_pulled_at={last_pulled_at}&peerType=sync_hub"),
            )
            .bearer_auth(&self.config.key);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request.send().await.map_err(|e| unreachable(url, &e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        // The cloud is outside this process: its answer is read up to a bound.
        let mut response = response;
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| unreachable(url, &e))? {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(CloudError::Garbled(format!(
                    "the answer is larger than {} MiB",
                    MAX_ANSWER_BYTES >> 20
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(classify(url, status, &bytes, retry_after))
        }
    }

    async fn pull(self: &Arc<Self>) -> Result<()> {
        let since = self
            .blocking(|g| Ok(read_u64(&g.store, PULL_KEY)? as i64))
            .await?;
        let body = self.send(reqwest::Method::GET, since, None).await?;
        let rows = self.blocking(move |g| g.apply_pull(&body)).await?;
        if let Ok(mut last) = self.last_pull.lock() {
            *last = Some(Instant::now());
        }
        let now = record::format_timestamp(Utc::now().timestamp_millis());
        self.update_status(|s| {
            s.last_pull_at = Some(now);
            s.last_pull_rows = rows;
            s.pulled_rows += rows as u64;
        });
        Ok(())
    }

    fn author(&self) -> ChangeAuthor {
        ChangeAuthor {
            device: self.device.clone(),
            user: Some(crate::pharmacy::CLOUD_LEDGER.to_owned()),
        }
    }

    /// Merges a pull's answer into the mesh; answers the rows it carried.
    fn apply_pull(&self, body: &[u8]) -> Result<usize> {
        let answer: Value = serde_json::from_slice(body)
            .map_err(|e| CloudError::Garbled(format!("the pull is not JSON ({e})")))?;
        let timestamp = answer
            .get("timestamp")
            .and_then(Value::as_i64)
            .ok_or_else(|| CloudError::Garbled("the pull has no timestamp".into()))?;
        let Some(changes) = answer.get("changes").and_then(Value::as_object) else {
            return Err(CloudError::Garbled("the pull has no changes".into()).into());
        };
        let schema = self.store.schema();
        let mut staged = Staged::default();
        let mut touched = BTreeSet::new();
        let mut count = 0;
        for table in std::iter::once("users").chain(PULLED_TABLES) {
            let Some(table_changes) = changes.get(table) else {
                continue;
            };
            let spec = schema.collection(table);
            let mut ops = Vec::new();
            for kind in ["created", "updated"] {
                for row in table_changes
                    .get(kind)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let Some(row) = row.as_object() else {
                        continue;
                    };
                    let Some(id) = row
                        .get("id")
                        .and_then(Value::as_str)
                        .and_then(|t| t.parse::<DocId>().ok())
                    else {
                        tracing::warn!(%table, "a row from the cloud has no valid id; skipped");
                        continue;
                    };
                    count += 1;
                    let cloud = rows::normalize(spec, row);
                    match table {
                        "clinic_inventory" => {
                            self.pull_inventory(id, cloud, &mut staged, &mut touched)?;
                        }
                        "dispensing_records" => {
                            self.pull_dispense(id, cloud, &mut staged, &mut touched)?;
                        }
                        _ => self.pull_row(table, id, cloud, &mut ops, &mut staged)?,
                    }
                }
            }
            for id in table_changes
                .get("deleted")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(id) = id.as_str().and_then(|t| t.parse::<DocId>().ok()) else {
                    continue;
                };
                count += 1;
                match self.store.get(table, &id) {
                    Ok(view) if !view.deleted && table != "clinic_inventory" => {
                        ops.push(WriteOp::new(
                            table,
                            Some(id),
                            WriteKind::Delete,
                            self.author(),
                        ));
                    }
                    Ok(_) | Err(StoreError::NotFound { .. }) => {}
                    Err(err) => return Err(err.into()),
                }
                staged.put(base_key(table, &id), encode_base(&Base::Deleted));
            }
            // The feed position of each record the pull created: while its feed entry
            // is still there, the record is the cloud's row as pulled, which the push
            // skips without reading it. (A patched record may hold edits of the mesh
            // the cloud lacks: the push compares it.)
            let created: BTreeSet<DocId> = ops
                .iter()
                .filter(|op| matches!(op.kind, WriteKind::Create(_)))
                .filter_map(|op| op.id)
                .collect();
            for (id, seq) in self.write(table, ops)? {
                if created.contains(&id) {
                    staged.put(format!("{CREATED_AT_SEQ}{id}"), seq.to_be_bytes().to_vec());
                }
            }
        }
        if self.is_stock_gateway()? {
            // Every item the cloud counts, not only this pull's: two gateways that pulled
            // before either had seen the other both wrote the cloud's movements, which the
            // merged ledger then holds twice; this puts it back to the cloud's count.
            let mut items = touched;
            for (key, _) in self.store.local_with_prefix(CLOUD_QUANTITY)? {
                if let Ok(item) = key[CLOUD_QUANTITY.len()..].parse::<DocId>() {
                    items.insert(item);
                }
            }
            for item in &items {
                let quantity = staged.get_i64(&self.store, &format!("{CLOUD_QUANTITY}{item}"))?;
                let dispensed = staged.get_i64(&self.store, &format!("{DISPENSED_SUM}{item}"))?;
                let moved = self
                    .pharmacy
                    .record_cloud_stock(*item, quantity + dispensed, crate::pharmacy::CLOUD_LEDGER)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if moved != 0 {
                    tracing::info!(item = %item, moved, "stock changed in the cloud");
                }
            }
        }
        if count > 0 {
            // An empty answer keeps the old position: pulling from it again is the same.
            staged.put(
                PULL_KEY.to_owned(),
                (timestamp as u64).to_be_bytes().to_vec(),
            );
            self.beat(false)?;
        }
        staged.save(&self.store)?;
        Ok(count)
    }

    /// Writes a table's pulled changes; a row the mesh refuses is logged, not fatal.
    /// Answers each written record's feed position. A large pull is written in chunks
    /// from two threads, so that one works out documents while the store commits.
    fn write(&self, table: &str, ops: Vec<WriteOp>) -> Result<Vec<(DocId, u64)>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let mut chunks = Vec::new();
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            chunks.push(ops.by_ref().take(WRITE_CHUNK).collect::<Vec<_>>());
        }
        let queue = Mutex::new(chunks.into_iter());
        let next = || queue.lock().ok().and_then(|mut q| q.next());
        let work = || -> Result<Vec<(DocId, u64)>> {
            let mut written = Vec::new();
            while let Some(chunk) = next() {
                for result in self.store.write_blocking(WriteBatch {
                    ops: chunk,
                    atomic: false,
                })? {
                    match result {
                        Ok(outcome) => written.push((outcome.id, outcome.seq)),
                        // Another gateway of the mesh brought the same new row first.
                        Err(StoreError::AlreadyExists { .. }) => {}
                        Err(err) => {
                            tracing::warn!(%table, error = %err, "a row from the cloud could not be stored");
                        }
                    }
                }
            }
            Ok(written)
        };
        let (mut first, second) = std::thread::scope(|scope| {
            let helper = scope.spawn(work);
            let first = work();
            let second = helper
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a gateway writer thread failed")));
            (first, second)
        });
        if let Ok(first) = first.as_mut() {
            first.extend(second?);
        }
        first
    }

    fn base(&self, staged: &Staged, table: &str, id: &DocId) -> Result<Option<Base>> {
        Ok(staged
            .get(&self.store, &base_key(table, id))?
            .and_then(|b| decode_base(&b)))
    }

    /// The columns of a pulled row to write into the mesh record `current`: those the
    /// cloud changed since the base (all that differ, when the cloud's row is newer and
    /// there is no base).
    fn cloud_changes(base: Option<&Base>, cloud: &Fields, current: &Fields) -> Option<Fields> {
        let names: Vec<&str> = match base {
            Some(Base::Live(base)) => rows::changed_in(cloud, base),
            _ => {
                let newer = cloud.get("updated_at").and_then(record::timestamp_ms)
                    > current.get("updated_at").and_then(record::timestamp_ms);
                if newer {
                    rows::changed_in(cloud, current)
                } else {
                    Vec::new()
                }
            }
        };
        let differ_here: BTreeSet<&str> = rows::changed_in(cloud, current).into_iter().collect();
        let patch: Fields = names
            .into_iter()
            .filter(|n| *n != QUANTITY && differ_here.contains(n))
            .map(|n| (n.to_owned(), cloud.get(n).cloned().unwrap_or(Value::Null)))
            .collect();
        (!patch.is_empty()).then_some(patch)
    }

    fn pull_row(
        &self,
        table: &str,
        id: DocId,
        cloud: Fields,
        ops: &mut Vec<WriteOp>,
        staged: &mut Staged,
    ) -> Result<()> {
        let base = match self.base(staged, table, &id)? {
            Some(Base::Live(pushed)) if pushed.contains_key(UNCONFIRMED) => {
                if rows::changed_in(&cloud, &pushed).is_empty() {
                    // The cloud took the gateway's push.
                    Some(Base::Live(pushed))
                } else {
                    // The cloud kept another row (it dropped the push as older than an
                    // edit made there meanwhile): merge the cloud's changes against the
                    // row both sides had before, and push the merge again.
                    staged.put(format!("{REPUSH}{table}/{id}"), Vec::new());
                    match pushed.get(PREVIOUS) {
                        Some(Value::Object(previous)) => Some(Base::Live(previous.clone())),
                        _ => None,
                    }
                }
            }
            other => other,
        };
        match self.store.get(table, &id) {
            Err(StoreError::NotFound { .. }) => {
                let mut fields = cloud.clone();
                fields.insert("id".into(), Value::from(id.to_string()));
                ops.push(WriteOp::new(
                    table,
                    Some(id),
                    WriteKind::Create(fields),
                    self.author(),
                ));
            }
            Err(err) => return Err(err.into()),
            // Deleted in the mesh: the delete wins, the cloud's row does not bring it back.
            Ok(view) if view.deleted => return Ok(()),
            Ok(view) => {
                let current = rows::normalize(self.store.schema().collection(table), &view.record);
                if let Some(patch) = Self::cloud_changes(base.as_ref(), &cloud, &current) {
                    ops.push(WriteOp::new(
                        table,
                        Some(id),
                        WriteKind::Patch(patch),
                        self.author(),
                    ));
                }
            }
        }
        staged.put(base_key(table, &id), encode_base(&Base::Live(cloud)));
        Ok(())
    }

    /// A stock item of the cloud: its fields by the three-way merge, its quantity noted
    /// for the stock target.
    fn pull_inventory(
        &self,
        id: DocId,
        cloud: Fields,
        staged: &mut Staged,
        touched: &mut BTreeSet<DocId>,
    ) -> Result<()> {
        let table = "clinic_inventory";
        // A row the cloud made for a dispense of a stock item it did not have names that
        // item as its batch: it is that item.
        let item = cloud
            .get("batch_id")
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<DocId>().ok())
            .filter(|b| *b != id && self.store.exists(table, b).unwrap_or(false))
            .unwrap_or(id);
        let base = self.base(staged, table, &id)?;
        let patch = match self.store.get(table, &item) {
            Err(StoreError::NotFound { .. }) => Some(cloud.clone()),
            Err(err) => return Err(err.into()),
            Ok(view) if view.deleted => None,
            Ok(view) => {
                let current = rows::normalize(self.store.schema().collection(table), &view.record);
                Self::cloud_changes(base.as_ref(), &cloud, &current)
            }
        };
        if let Some(patch) = patch.filter(|_| item == id) {
            self.pharmacy
                .put_cloud_item(id, patch, crate::pharmacy::CLOUD_LEDGER)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let quantity = cloud.get(QUANTITY).and_then(Value::as_i64).unwrap_or(0);
        staged.put(
            format!("{CLOUD_QUANTITY}{item}"),
            quantity.to_be_bytes().to_vec(),
        );
        if let (Some(clinic), Some(drug), Some(batch)) = (
            cloud.get("clinic_id").and_then(Value::as_str),
            cloud.get("drug_id").and_then(Value::as_str),
            cloud.get("batch_id").and_then(Value::as_str),
        ) {
            staged.put(
                format!("{BATCH}{clinic}/{drug}/{batch}"),
                item.to_string().into_bytes(),
            );
        }
        touched.insert(item);
        staged.put(base_key(table, &id), encode_base(&Base::Live(cloud)));
        Ok(())
    }

    /// The mesh's stock item a cloud dispense of (clinic, drug, batch) moved.
    fn item_of_dispense(&self, staged: &Staged, cloud: &Fields) -> Result<Option<DocId>> {
        let text = |f: &str| cloud.get(f).and_then(Value::as_str).unwrap_or_default();
        let (clinic, drug, batch) = (text("clinic_id"), text("drug_id"), text("batch_id"));
        if let Ok(own) = batch.parse::<DocId>()
            && self.store.exists("clinic_inventory", &own)?
        {
            return Ok(Some(own));
        }
        if batch.is_empty() {
            // The cloud takes the drug's latest-expiring batch.
            let rows = self
                .pharmacy
                .stock(Some(clinic), Some(drug))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            return Ok(rows.last().map(|r| r.stock_item_id));
        }
        Ok(staged
            .get(&self.store, &format!("{BATCH}{clinic}/{drug}/{batch}"))?
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|t| t.parse().ok()))
    }

    fn pull_dispense(
        &self,
        id: DocId,
        cloud: Fields,
        staged: &mut Staged,
        touched: &mut BTreeSet<DocId>,
    ) -> Result<()> {
        let seen_key = format!("{DISPENSE_SEEN}{id}");
        let item = self.item_of_dispense(staged, &cloud)?;
        if staged.get(&self.store, &seen_key)?.is_none() {
            let quantity = cloud
                .get("quantity_dispensed")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if let Some(item) = item {
                let key = format!("{DISPENSED_SUM}{item}");
                let sum = staged.get_i64(&self.store, &key)? + quantity;
                staged.put(key, sum.to_be_bytes().to_vec());
                touched.insert(item);
            }
            staged.put(
                seen_key,
                item.map(|i| i.to_string()).unwrap_or_default().into_bytes(),
            );
        }
        if !self.store.exists("dispensing_records", &id)? {
            // A dispense the cloud has and the mesh lacks (an app that synced with the
            // cloud directly): a dispense of the mesh, counted once wherever it enters.
            let mut row = cloud.clone();
            if let Some(item) = item {
                row.insert("batch_id".into(), Value::from(item.to_string()));
            }
            let author = crate::pharmacy::CLOUD_LEDGER;
            match self.pharmacy.record_app_dispense(id, row.clone(), author) {
                // Another gateway brought the same dispense in meanwhile: once more, it
                // finds it there and counts nothing.
                Err(crate::pharmacy::PharmacyError::Store(StoreError::AlreadyExists {
                    ..
                })) => {
                    self.pharmacy
                        .record_app_dispense(id, row, author)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                }
                other => other.map_err(|e| anyhow::anyhow!("{e}"))?,
            }
        }
        staged.put(
            base_key("dispensing_records", &id),
            encode_base(&Base::Live(cloud)),
        );
        Ok(())
    }

    /// Pushes pages until the mesh's changes are in the cloud.
    async fn push(self: &Arc<Self>) -> Result<()> {
        let mut limit = self.config.push_page.max(1);
        let mut failures = 0u32;
        let mut refreshed = false;
        loop {
            let since = self
                .blocking(|g| Ok(read_u64(&g.store, PULL_KEY)? as i64))
                .await?;
            let page = self.blocking(move |g| g.push_page(limit)).await?;
            if page.rows.is_empty() {
                self.blocking(move |g| g.commit_push(page)).await?;
                break;
            }
            // The cloud keeps whole rows: a row pushed replaces whatever the cloud took
            // since the last pull. Clinic-sized pushes go right after a pull, so that an
            // edit made in the cloud meanwhile is merged first, not overwritten.
            if !refreshed
                && page.rows.len() <= FRESH_PULL_ROWS
                && self
                    .last_pull
                    .lock()
                    .ok()
                    .and_then(|t| *t)
                    .is_none_or(|t| t.elapsed() > FRESH_PULL)
            {
                refreshed = true;
                self.pull().await?;
                continue;
            }
            let body = serde_json::to_vec(&page.body)?;
            match self.send(reqwest::Method::POST, since, Some(body)).await {
                Ok(_) => {
                    let count = page.rows.len();
                    self.blocking(move |g| g.commit_push(page)).await?;
                    self.update_status(|s| s.pushed_rows += count as u64);
                    failures = 0;
                    limit = (limit * 2).min(self.config.push_page.max(1));
                }
                Err(CloudError::Failed { own: true, .. })
                    if failures + 1 < FAILURES_BEFORE_SPLIT =>
                {
                    // Part of the page may be in; the cloud's writes are idempotent.
                    failures += 1;
                    tokio::time::sleep(backoff(failures)).await;
                }
                Err(err @ CloudError::Failed { own: true, .. }) => {
                    failures = 0;
                    if page.rows.len() > 1 {
                        limit = page.rows.len() / 2;
                    } else {
                        let (table, id, _) = page.rows[0].clone();
                        let message = err.to_string();
                        tracing::warn!(%table, %id, error = %message, "the cloud refuses a record; it stays in the mesh and is sent again when it changes");
                        self.blocking(move |g| g.refuse(&table, &id, &message))
                            .await?;
                    }
                }
                Err(err) => return Err(err.into()),
            }
        }
        let now = record::format_timestamp(Utc::now().timestamp_millis());
        self.update_status(|s| s.last_push_at = Some(now));
        Ok(())
    }

    /// The next page of mesh changes for the cloud, at most `limit` rows.
    fn push_page(&self, limit: usize) -> Result<PushPage> {
        let mut after = read_u64(&self.store, PUSH_KEY)?;
        let mut page = PushPage {
            body: Map::new(),
            rows: Vec::new(),
            ids: std::collections::HashSet::new(),
            cleared: Vec::new(),
            users: None,
            end: after,
        };
        let mut bytes = 0usize;
        let now = Utc::now().timestamp_millis();
        let staged = Staged::default();
        // Records whose push the cloud did not keep go first.
        for (key, _) in self.store.local_with_prefix(REPUSH)? {
            if page.rows.len() >= limit {
                return Ok(page);
            }
            let parsed = key[REPUSH.len()..]
                .split_once('/')
                .and_then(|(t, i)| Some((t.to_owned(), i.parse::<DocId>().ok()?)));
            if let Some((table, id)) = parsed
                && let Ok(view) = self.store.get(&table, &id)
                && !view.deleted
            {
                let base = self.base(&staged, &table, &id)?;
                bytes += self.outgoing(&mut page, &table, id, &view.record, base, now)?;
            }
            page.cleared.push(key);
        }
        loop {
            let (entries, last) = self.store.feed_page(after, 1000)?;
            for entry in &entries {
                if page.rows.len() >= limit || bytes >= PUSH_PAGE_BYTES {
                    return Ok(page);
                }
                page.end = entry.seq;
                let table = entry.collection.as_str();
                if !PUSHED_TABLES.contains(&table) {
                    continue;
                }
                if read_u64(&self.store, &format!("{CREATED_AT_SEQ}{}", entry.id))? == entry.seq {
                    continue;
                }
                let base = self.base(&staged, table, &entry.id)?;
                let view = match self.store.get(table, &entry.id) {
                    Ok(view) => view,
                    Err(StoreError::NotFound { .. }) => continue,
                    Err(err) => return Err(err.into()),
                };
                if view.deleted {
                    if matches!(base, Some(Base::Live(_))) {
                        push_into(
                            &mut page.body,
                            table,
                            "deleted",
                            json!(entry.id.to_string()),
                        );
                        page.rows.push((table.to_owned(), entry.id, Base::Deleted));
                        page.ids.insert(entry.id);
                    }
                    continue;
                }
                // The cloud makes a visit of its own for an event whose visit it lacks:
                // the visit goes first.
                if table == "events"
                    && let Some(visit) = view
                        .record
                        .get("visit_id")
                        .and_then(Value::as_str)
                        .and_then(|t| t.parse::<DocId>().ok())
                    && self.base(&staged, "visits", &visit)?.is_none()
                    && !page.ids.contains(&visit)
                    && let Ok(visit_view) = self.store.get("visits", &visit)
                    && !visit_view.deleted
                {
                    bytes +=
                        self.outgoing(&mut page, "visits", visit, &visit_view.record, None, now)?;
                }
                bytes += self.outgoing(&mut page, table, entry.id, &view.record, base, now)?;
            }
            if last == after {
                return Ok(page);
            }
            after = last;
            page.end = last;
        }
    }

    /// Puts a live mesh record into the page, whole, stamped newer than the mesh and the
    /// base, unless it equals its base (an echo) or the cloud refused it as it is.
    /// Answers the bytes it added.
    fn outgoing(
        &self,
        page: &mut PushPage,
        table: &str,
        id: DocId,
        record: &Fields,
        base: Option<Base>,
        now: i64,
    ) -> Result<usize> {
        if page.ids.contains(&id) {
            return Ok(0);
        }
        let schema = self.store.schema();
        let spec = schema.collection(table);
        let mut row = rows::normalize(spec, record);
        if page.users.is_none() {
            page.users = Some(self.cloud_users()?);
        }
        self.to_cloud(table, &mut row, page.users.as_deref().unwrap_or_default())?;
        if let Some(Base::Live(base)) = &base
            && rows::changed_in(&row, base).is_empty()
        {
            return Ok(0);
        }
        if self.is_refused(table, &id, &row)? {
            return Ok(0);
        }
        let stamp = |r: &Fields| r.get("updated_at").and_then(record::timestamp_ms);
        let mut updated = now.max(stamp(&row).unwrap_or(0) + 1);
        if let Some(Base::Live(base)) = &base {
            updated = updated.max(stamp(base).unwrap_or(0) + 1);
        }
        row.insert(
            "updated_at".into(),
            Value::from(record::format_timestamp(updated)),
        );
        let wire = Value::Object(rows::to_push_form(spec, &row));
        let bytes = wire.to_string().len();
        let kind = if base.is_some() { "updated" } else { "created" };
        push_into(&mut page.body, table, kind, wire);
        page.rows.push((table.to_owned(), id, Base::Live(row)));
        page.ids.insert(id);
        Ok(bytes)
    }

    /// A mesh row as the cloud must have it: a dispense names the cloud's batch, and
    /// every user column names a user of the cloud.
    fn to_cloud(&self, table: &str, row: &mut Fields, users: &[CloudUser]) -> Result<()> {
        if table == "dispensing_records" {
            self.to_cloud_batch(row)?;
        }
        cloud_user_columns(row, users);
        Ok(())
    }

    /// The users that came from the cloud (a hub cannot push users, and the cloud
    /// refuses a row whose user columns name anyone else).
    fn cloud_users(&self) -> Result<Vec<CloudUser>> {
        let prefix = format!("{BASE}users/");
        let mut users: Vec<CloudUser> = self
            .store
            .local_with_prefix(&prefix)?
            .into_iter()
            .filter_map(|(key, value)| {
                let Some(Base::Live(row)) = decode_base(&value) else {
                    return None;
                };
                let text = |f: &str| row.get(f).and_then(Value::as_str).unwrap_or("").to_owned();
                Some(CloudUser {
                    id: key[prefix.len()..].to_owned(),
                    clinic: text("clinic_id"),
                    rank: match text("role").as_str() {
                        "super_admin" | "admin" => 0,
                        "provider" => 1,
                        _ => 2,
                    },
                })
            })
            .collect();
        users.sort_by(|a, b| (a.rank, &a.id).cmp(&(b.rank, &b.id)));
        Ok(users)
    }

    /// A mesh dispense names its stock item as `batch_id`; the cloud knows the item's
    /// own batch id, when the item came from the cloud.
    fn to_cloud_batch(&self, row: &mut Fields) -> Result<()> {
        let Some(item) = row
            .get("batch_id")
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<DocId>().ok())
        else {
            return Ok(());
        };
        if let Ok(view) = self.store.get("clinic_inventory", &item)
            && let Some(batch) = view.record.get("batch_id").filter(|b| !b.is_null())
        {
            row.insert("batch_id".into(), batch.clone());
        }
        Ok(())
    }

    fn is_refused(&self, table: &str, id: &DocId, row: &Fields) -> Result<bool> {
        let Some(bytes) = self.store.get_local(&format!("{REFUSED}{table}/{id}"))? else {
            return Ok(false);
        };
        let refused: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(refused.get("row") == Some(&Value::Object(row.clone())))
    }

    /// The cloud refuses one record: it stays in the mesh, is shown in the status, and
    /// is sent again when it changes or the gateway restarts.
    fn refuse(&self, table: &str, id: &DocId, message: &str) -> Result<()> {
        let view = self.store.get(table, id)?;
        let mut row = rows::normalize(self.store.schema().collection(table), &view.record);
        self.to_cloud(table, &mut row, &self.cloud_users()?)?;
        let note = json!({
            "collection": table,
            "id": id.to_string(),
            "error": message,
            "what_to_do": "the cloud does not take this record as it is (a required field or a record it refers to may be missing in the cloud); correct it in the mesh and it is sent again",
            "row": row,
        });
        self.store.put_local_blocking(vec![(
            format!("{REFUSED}{table}/{id}"),
            Some(serde_json::to_vec(&note)?),
        )])?;
        Ok(())
    }

    /// Saves what a push the cloud answered 200 carried: the rows as bases, the position.
    /// Saves what a push the cloud answered 200 carried: each row as the record's base,
    /// marked unconfirmed (with the base before it) until a pull shows the cloud kept
    /// it; the feed position; the re-pushes done.
    fn commit_push(&self, page: PushPage) -> Result<()> {
        let PushPage {
            rows, cleared, end, ..
        } = page;
        let mut staged = Staged::default();
        for (table, id, base) in rows {
            let base = match base {
                Base::Live(mut row) => {
                    let previous = match self.base(&staged, &table, &id)? {
                        Some(Base::Live(mut previous)) => {
                            previous.remove(PREVIOUS);
                            previous.remove(UNCONFIRMED);
                            Value::Object(previous)
                        }
                        _ => Value::Null,
                    };
                    row.insert(UNCONFIRMED.into(), Value::Bool(true));
                    row.insert(PREVIOUS.into(), previous);
                    Base::Live(row)
                }
                Base::Deleted => Base::Deleted,
            };
            staged.put(base_key(&table, &id), encode_base(&base));
            staged.remove(format!("{REFUSED}{table}/{id}"));
            staged.remove(format!("{REPUSH}{table}/{id}"));
        }
        for key in cleared {
            staged.remove(key);
        }
        if end != read_u64(&self.store, PUSH_KEY)? {
            staged.put(PUSH_KEY.to_owned(), end.to_be_bytes().to_vec());
        }
        staged.save(&self.store)
    }

    fn gateway_id(&self) -> DocId {
        DocId::derived("gateway", &[&self.device])
    }

    /// Refreshes this gateway's record in the mesh: at start, when a round that
    /// `writes` anyway finds it old, or when it is very old (a quiet mesh sees one such
    /// write every few hours, so that the gateways know who is running).
    fn beat(&self, writes: bool) -> Result<()> {
        let due = match self.heartbeat.lock().ok().and_then(|h| *h) {
            None => true,
            Some(at) => {
                let age = at.elapsed();
                age >= HEARTBEAT_QUIET || (writes && age >= HEARTBEAT_BUSY)
            }
        };
        if !due {
            return Ok(());
        }
        let id = self.gateway_id();
        let fields = match json!({
            "peer_id": self.device,
            "cloud": self.config.url,
            "seen_at": record::format_timestamp(Utc::now().timestamp_millis()),
        }) {
            Value::Object(map) => map,
            _ => Fields::new(),
        };
        let kind = if self.store.exists(GATEWAYS_COLLECTION, &id)? {
            WriteKind::Patch(fields)
        } else {
            let mut fields = fields;
            fields.insert("id".into(), Value::from(id.to_string()));
            WriteKind::Create(fields)
        };
        self.store
            .write_blocking(WriteBatch::one(WriteOp::new(
                GATEWAYS_COLLECTION,
                Some(id),
                kind,
                self.author(),
            )))?
            .into_iter()
            .next()
            .transpose()?;
        if let Ok(mut h) = self.heartbeat.lock() {
            *h = Some(Instant::now());
        }
        Ok(())
    }

    /// Is this the gateway that writes the cloud's stock movements.
    fn is_stock_gateway(&self) -> Result<bool> {
        let mine = is_stock_gateway(&self.store, &self.device)?;
        self.update_status(|s| s.stock_gateway = mine);
        Ok(mine)
    }
}

/// Is `device` the gateway that writes the cloud's stock movements: the lowest peer id
/// among the gateways running in the mesh.
fn is_stock_gateway(store: &Store, device: &str) -> Result<bool> {
    let page = store.list(&Query {
        collection: GATEWAYS_COLLECTION.to_owned(),
        limit: 1000,
        ..Query::default()
    })?;
    let now = Utc::now().timestamp_millis();
    let alive = GATEWAY_ALIVE.as_millis() as i64;
    let lowest = page
        .records
        .iter()
        .filter(|v| !v.deleted)
        .filter(|v| {
            v.record
                .get("seen_at")
                .and_then(record::timestamp_ms)
                .is_some_and(|t| now - t < alive)
        })
        .filter_map(|v| v.record.get("peer_id").and_then(Value::as_str))
        .min()
        .map(str::to_owned);
    Ok(lowest.is_none_or(|p| p == device))
}

/// Marks a node that is no longer started as a gateway as such in the mesh, so another
/// gateway takes over the cloud's stock movements.
pub fn retire(store: &Store, device: &str) -> Result<()> {
    let id = DocId::derived("gateway", &[device]);
    match store.get(GATEWAYS_COLLECTION, &id) {
        Ok(view) if !view.deleted => {
            store
                .write_blocking(WriteBatch::one(WriteOp::new(
                    GATEWAYS_COLLECTION,
                    Some(id),
                    WriteKind::Delete,
                    ChangeAuthor {
                        device: device.to_owned(),
                        user: None,
                    },
                )))?
                .into_iter()
                .next()
                .transpose()?;
            Ok(())
        }
        Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// A user of the cloud, for the user columns of pushed rows.
#[derive(Debug, Clone)]
struct CloudUser {
    id: String,
    clinic: String,
    /// 0 for admins, 1 for providers, 2 for others: the first stands in.
    rank: u8,
}

/// Columns the cloud checks against its users.
const USER_COLUMNS: [&str; 4] = [
    "provider_id",
    "last_modified_by",
    "recorded_by_user_id",
    "dispensed_by",
];

/// A user column naming someone the cloud does not know (a device, a name, a user made
/// in the mesh) names a cloud user of the row's clinic instead, an admin first; the
/// original stays in the row's metadata (`medmesh_<column>`). Rows with no cloud user to
/// stand in are left as they are (the cloud refuses them, and the status says so).
fn cloud_user_columns(row: &mut Fields, users: &[CloudUser]) {
    if users.is_empty() {
        return;
    }
    let clinic = ["clinic_id", "primary_clinic_id", "pickup_clinic_id"]
        .iter()
        .find_map(|c| row.get(*c).and_then(Value::as_str))
        .unwrap_or("")
        .to_owned();
    for column in USER_COLUMNS {
        let Some(named) = row.get(column).and_then(Value::as_str).map(str::to_owned) else {
            continue;
        };
        if users.iter().any(|u| u.id == named) {
            continue;
        }
        let Some(stand_in) = users
            .iter()
            .find(|u| u.clinic == clinic)
            .or_else(|| users.first())
        else {
            continue;
        };
        row.insert(column.into(), Value::from(stand_in.id.clone()));
        let metadata = row
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if metadata.is_null() {
            *metadata = Value::Object(Map::new());
        }
        if let Some(map) = metadata.as_object_mut() {
            map.insert(format!("medmesh_{column}"), Value::from(named));
        }
    }
}

fn push_into(body: &mut Map<String, Value>, table: &str, kind: &str, value: Value) {
    let entry = body
        .entry(table.to_owned())
        .or_insert_with(|| json!({"created": [], "updated": [], "deleted": []}));
    if let Some(list) = entry.get_mut(kind).and_then(Value::as_array_mut) {
        list.push(value);
    }
}

/// The wait after `failures` failed rounds in a row: doubling from 2 s to 5 minutes, with
/// a quarter of jitter.
fn backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(1u64 << failures.min(9)).min(MAX_BACKOFF);
    let jitter = rand::random::<f64>() * 0.25;
    base.mul_f64(1.0 + jitter).min(MAX_BACKOFF)
}

/// A failed round in words a clinic admin can act on.
fn describe(err: &anyhow::Error, wait: Duration) -> String {
    let secs = wait.as_secs().max(1);
    match err.downcast_ref::<CloudError>() {
        Some(CloudError::Unreachable { url, .. }) => format!(
            "cannot reach the Hikma cloud at {url}; the mesh keeps working and the gateway tries again in {secs} s. Check this laptop's internet connection. ({err})"
        ),
        Some(CloudError::Refused { .. }) => format!(
            "{err}, then restart the gateway with --hub-key-file. Trying again in {secs} s."
        ),
        Some(CloudError::Slow(_)) => format!(
            "the Hikma cloud asked the gateway to slow down (too many requests); waiting {secs} s"
        ),
        Some(CloudError::Failed { status, .. }) => format!(
            "the Hikma cloud failed (HTTP {status}); nothing is lost, the gateway tries again in {secs} s. If it lasts, tell the cloud's administrator. ({err})"
        ),
        _ => format!("the gateway failed: {err:#}; trying again in {secs} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(value: Value) -> Fields {
        match value {
            Value::Object(map) => map,
            _ => Fields::new(),
        }
    }

    #[test]
    fn a_pulled_row_changes_only_what_the_cloud_changed() {
        let base = row(
            json!({"given_name": "Amina", "phone": "1", "hometown": "Kano",
                              "updated_at": "2026-01-01T00:00:00.000Z"}),
        );
        // The mesh changed the hometown, the cloud the phone.
        let mesh = row(
            json!({"given_name": "Amina", "phone": "1", "hometown": "Jos",
                              "updated_at": "2026-01-02T00:00:00.000Z"}),
        );
        let cloud = row(
            json!({"given_name": "Amina", "phone": "2", "hometown": "Kano",
                               "updated_at": "2026-01-03T00:00:00.000Z"}),
        );
        let patch = Gateway::cloud_changes(Some(&Base::Live(base.clone())), &cloud, &mesh);
        assert_eq!(patch, Some(row(json!({"phone": "2"}))));
        // The echo of the gateway's own push changes nothing.
        assert_eq!(
            Gateway::cloud_changes(Some(&Base::Live(mesh.clone())), &mesh, &mesh),
            None
        );
        // The same field on both sides: the cloud's value, so both sides agree.
        let cloud = row(json!({"hometown": "Yola", "updated_at": "2026-01-03T00:00:00.000Z"}));
        assert_eq!(
            Gateway::cloud_changes(Some(&Base::Live(base)), &cloud, &mesh),
            Some(row(json!({"hometown": "Yola"})))
        );
    }

    #[test]
    fn without_a_base_the_newer_row_wins_and_stock_is_never_copied() {
        let mesh = row(json!({"phone": "1", "quantity_available": 10,
                              "updated_at": "2026-01-02T00:00:00.000Z"}));
        let newer = row(json!({"phone": "2", "quantity_available": 99,
                               "updated_at": "2026-01-03T00:00:00.000Z"}));
        let older = row(json!({"phone": "3", "updated_at": "2026-01-01T00:00:00.000Z"}));
        assert_eq!(
            Gateway::cloud_changes(None, &newer, &mesh),
            Some(row(json!({"phone": "2"})))
        );
        assert_eq!(Gateway::cloud_changes(None, &older, &mesh), None);
    }

    #[test]
    fn user_columns_name_a_cloud_user_of_the_clinic() {
        let users = vec![
            CloudUser {
                id: "admin-a".into(),
                clinic: "clinic-a".into(),
                rank: 0,
            },
            CloudUser {
                id: "nurse-b".into(),
                clinic: "clinic-b".into(),
                rank: 1,
            },
        ];
        let mut row = row(
            json!({"clinic_id": "clinic-b", "dispensed_by": "12D3KooWdevice",
                                 "recorded_by_user_id": "admin-a"}),
        );
        cloud_user_columns(&mut row, &users);
        assert_eq!(row["dispensed_by"], json!("nurse-b"));
        assert_eq!(row["recorded_by_user_id"], json!("admin-a"));
        assert_eq!(
            row["metadata"],
            json!({"medmesh_dispensed_by": "12D3KooWdevice"})
        );
        // The same row again gives the same row: no push ping-pong.
        let again = row.clone();
        cloud_user_columns(&mut row, &users);
        assert_eq!(row, again);
        // With no cloud users, the row is left as it is.
        let mut alone = self::row(json!({"dispensed_by": "someone"}));
        cloud_user_columns(&mut alone, &[]);
        assert_eq!(alone["dispensed_by"], json!("someone"));
    }

    #[test]
    fn hub_keys_are_checked_for_their_form() {
        assert!(check_key_form(&format!("hh_{}", "a1".repeat(32))).is_ok());
        assert!(check_key_form("hh_short").is_err());
        assert!(check_key_form(&"a".repeat(67)).is_err());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) >= Duration::from_secs(2));
        assert!(backoff(1) <= Duration::from_millis(2500));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
