//! The access log: who read which patient's record, when, on which device. Entries are
//! records of the replicated `_access_log` collection, so any node can answer who looked
//! at whom; no endpoint changes or deletes them.
//!
//! One task owns the writing: handlers hand it entries and go on; it writes them in
//! batches (a read does not wait for a disk sync), at once when the node stops.

use std::time::Duration;

use medmesh_protocol::ChangeAuthor;
use medmesh_protocol::record::Fields;
use medmesh_protocol::schema::ACCESS_LOG_COLLECTION;
use medmesh_storage::{Store, WriteBatch, WriteKind, WriteOp};
use serde_json::json;
use tokio::sync::mpsc;

use super::Caller;

/// Entries waiting at most; a reader waits when the log is this far behind.
const QUEUE: usize = 4096;
/// Entries written in one batch at most.
const BATCH: usize = 256;
/// How long an entry waits for others before it is written.
const LINGER: Duration = Duration::from_millis(200);

/// One read of a patient's record.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Who read it.
    pub caller: Caller,
    /// What they did: `read`, `list`, `history` or `conflicts`.
    pub action: &'static str,
    /// The collection.
    pub collection: String,
    /// The record, for one record.
    pub record_id: Option<String>,
    /// The patient the record is of, when known.
    pub patient_id: Option<String>,
    /// Records answered, for a list.
    pub count: Option<usize>,
}

/// Hands entries to the log's writer.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Entry>,
}

impl AccessLog {
    /// Starts the writer of `store`'s access log on this device (a tokio runtime must
    /// be running). It ends when every handle is dropped, after writing what it holds.
    pub fn start(store: Store, device: String) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_entries(store, device, rx));
        Self { tx }
    }

    /// Records an entry (waits only when the writer is far behind).
    pub async fn record(&self, entry: Entry) {
        if self.tx.send(entry).await.is_err() {
            tracing::warn!("the access log is closed; a read was not logged");
        }
    }
}

fn fields_of(entry: &Entry, device: &str, at: i64) -> Fields {
    let mut fields = Fields::new();
    fields.insert("user".into(), json!(entry.caller.name));
    if let Some(id) = &entry.caller.user_id {
        fields.insert("user_id".into(), json!(id));
    }
    fields.insert("device".into(), json!(device));
    fields.insert("at".into(), json!(at));
    fields.insert("action".into(), json!(entry.action));
    fields.insert("collection".into(), json!(entry.collection));
    if let Some(id) = &entry.record_id {
        fields.insert("record_id".into(), json!(id));
    }
    if let Some(id) = &entry.patient_id {
        fields.insert("patient_id".into(), json!(id));
    }
    if let Some(count) = entry.count {
        fields.insert("count".into(), json!(count));
    }
    fields
}

async fn write_entries(store: Store, device: String, mut rx: mpsc::Receiver<Entry>) {
    let author = ChangeAuthor {
        device: device.clone(),
        user: None,
    };
    let mut pending: Vec<Entry> = Vec::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(entry) => pending.push(entry),
                None => return,
            }
        }
        let deadline = tokio::time::Instant::now() + LINGER;
        let mut closed = false;
        while pending.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(entry)) => pending.push(entry),
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let now = chrono::Utc::now().timestamp_millis();
        let ops = pending
            .drain(..)
            .map(|entry| {
                let mut op = WriteOp::new(
                    ACCESS_LOG_COLLECTION,
                    None,
                    WriteKind::Create(fields_of(&entry, &device, now)),
                    author.clone(),
                );
                op.time_ms = now;
                op
            })
            .collect::<Vec<_>>();
        let count = ops.len();
        match store.write(WriteBatch { ops, atomic: false }).await {
            Ok(results) => {
                let failed = results.iter().filter(|r| r.is_err()).count();
                if failed > 0 {
                    tracing::warn!(failed, "entries of the access log could not be written");
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, entries = count, "the access log could not be written")
            }
        }
        if closed {
            return;
        }
    }
}
