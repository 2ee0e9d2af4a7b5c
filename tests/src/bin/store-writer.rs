//! A child process for the crash-consistency test: writes to a store as fast as it can
//! and prints `ack <id> <value>` after each write the store acknowledged as durable.

use std::io::Write;

use medmesh_protocol::{ChangeAuthor, DocId, Schema};
use medmesh_storage::{Store, StoreOptions, WriteBatch, WriteKind, WriteOp};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: store-writer DB [KEY]"))?;
    // With a key (64 hex digits), the store file is encrypted.
    let path = std::path::Path::new(&path);
    let store = match std::env::args().nth(2) {
        Some(key) => Store::open_encrypted(
            path,
            &medmesh_tests::key_from_hex(&key)?,
            Schema::hikma(),
            StoreOptions::default(),
        )?,
        None => Store::open(path, Schema::hikma(), StoreOptions::default())?,
    };
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut mine: Vec<DocId> = Vec::new();
                for n in 0u64.. {
                    let op = if n % 3 == 2 && !mine.is_empty() {
                        let id = mine[(n as usize) % mine.len()];
                        WriteOp::new("patients", Some(id), WriteKind::Patch(fields(json!({"phone": format!("{t}-{n}")}))), ChangeAuthor::default())
                    } else {
                        WriteOp::new("patients", None, WriteKind::Create(fields(json!({"given_name": format!("w{t}-{n}"), "phone": format!("{t}-{n}")}))), ChangeAuthor::default())
                    };
                    let out = store.write_blocking(WriteBatch::one(op))?;
                    for outcome in out.into_iter().flatten() {
                        if !mine.contains(&outcome.id) {
                            mine.push(outcome.id);
                        }
                        let stdout = std::io::stdout();
                        let mut lock = stdout.lock();
                        writeln!(lock, "ack {} {t}-{n}", outcome.id)?;
                        lock.flush()?;
                    }
                }
                Ok(())
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn fields(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}
