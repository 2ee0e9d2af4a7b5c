//! The single-node benchmark: import, durable single writes, reads, memory, store open;
//! beside them, in the same run and on the same disk, the anchors the write path is
//! measured against: SQLite's durable single-row transactions and bulk insert of the
//! same records, and the in-process floor of the import (the same records made and saved
//! as Automerge documents on all cores, with no storage).
//!
//! `cargo run --release -p medmesh-tests --bin node-bench -- [--records N]`
//! (build the node first: `cargo build --release -p medmesh`). Prints each figure with its
//! target and writes them to BENCHMARKS.md.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use medmesh::config::ApiArgs;
use medmesh_protocol::ChangeAuthor;
use medmesh_protocol::Schema;
use medmesh_storage::{Query, Store, StoreOptions, WriteBatch, WriteKind, WriteOp};
use medmesh_tests::{Figure, NodeProcess, patient, update_benchmarks};
use serde_json::json;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let records: usize = args
        .iter()
        .position(|a| a == "--records")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let single_writes = 2_000;
    let runtime = tokio::runtime::Runtime::new()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("node");
    let file = dir.path().join("patients.jsonl");
    let mut bytes = 0usize;
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
        for i in 0..records {
            let line = patient(i).to_string();
            bytes += line.len();
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
    println!(
        "{records} generated patients, {} bytes of JSON each on average",
        bytes / records.max(1)
    );
    let mut figures = Vec::new();

    let node = NodeProcess::start(&data)?;
    let api = ApiArgs {
        api: node.api.clone(),
        data: Some(data.clone()),
        token: None,
    };
    let started = Instant::now();
    let summary = runtime.block_on(medmesh::client::import_file(&api, "patients", &file, false))?;
    let import_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        summary.accepted == records,
        "import refused lines: {:?}",
        summary.refused.first()
    );
    let rate = records as f64 / import_s;
    println!("import: {records} records in {import_s:.2} s = {rate:.0} records/s");
    figures.push(Figure {
        name: "import (CLI path, HTTP batches of 1000)".into(),
        value: rate,
        unit: "records/s",
        target: "≥ 10,000".into(),
        holds: rate >= 10_000.0,
    });

    // Sequential durable single-record writes through the API.
    let http = medmesh_tests::http();
    let round_trip_us = round_trip(&runtime, &http, &node.url("/health"), single_writes)?;
    println!("HTTP round trip (GET /health): {round_trip_us:.0} µs");
    let url = node.url("/v1/visits");
    let single_rate = sequential_writes(&runtime, &http, &url, single_writes)?;
    println!("sequential single writes: {single_rate:.0}/s");
    figures.push(Figure {
        name: "sequential durable single-record API writes".into(),
        value: single_rate,
        unit: "writes/s",
        target: "≥ 1,000".into(),
        holds: single_rate >= 1_000.0,
    });

    // Eight clients writing at once: each write still durable when answered.
    let started = Instant::now();
    runtime.block_on(async {
        let mut clients = tokio::task::JoinSet::new();
        for client in 0..8 {
            let (http, url) = (http.clone(), url.clone());
            clients.spawn(async move {
                for i in 0..single_writes / 8 {
                    let response = http
                        .post(&url)
                        .json(&json!({"patient_id": format!("c{client}-{i}"), "clinic_id": "c1"}))
                        .send()
                        .await?;
                    anyhow::ensure!(
                        response.status() == reqwest::StatusCode::CREATED,
                        "write failed: {}",
                        response.status()
                    );
                }
                Ok(())
            });
        }
        while let Some(done) = clients.join_next().await {
            done??;
        }
        anyhow::Ok(())
    })?;
    let concurrent_rate = (single_writes / 8 * 8) as f64 / started.elapsed().as_secs_f64();
    println!("eight clients writing at once: {concurrent_rate:.0}/s");
    figures.push(Figure {
        name: format!(
            "eight clients writing at once ({concurrent_rate:.0} writes/s) vs sequential writes"
        ),
        value: concurrent_rate / single_rate,
        unit: "×",
        target: "≥ 4".into(),
        holds: concurrent_rate >= 4.0 * single_rate,
    });

    // Serve reads for a while, then read the node's memory.
    let started = Instant::now();
    let reads = runtime.block_on(async {
        let mut n = 0;
        for i in 0..2_000usize {
            let path = match i % 4 {
                0 => format!("/v1/patients?given_name=amina{}*&limit=20", i % 97),
                1 => format!("/v1/patients?government_id=NIN-{:011}", (i * 37) % records),
                2 => "/v1/patients?limit=100".to_owned(),
                _ => format!(
                    "/v1/patients?surname=Bello&limit=50&include_deleted={}",
                    i % 2 == 0
                ),
            };
            let response = http.get(node.url(&path)).send().await?;
            anyhow::ensure!(
                response.status().is_success(),
                "read failed: {}",
                response.status()
            );
            let body: serde_json::Value = response.json().await?;
            n += body["records"].as_array().map_or(0, Vec::len);
        }
        Ok(n)
    })?;
    let read_ms = started.elapsed().as_secs_f64() * 1000.0 / 2000.0;
    println!("2000 indexed queries returned {reads} records, {read_ms:.2} ms per query");
    let (rss, peak) = node.rss().context("cannot read the node's memory")?;
    let rss_mb = rss as f64 / 1_048_576.0;
    let peak_mb = peak as f64 / 1_048_576.0;
    println!("node RSS after import while serving reads: {rss_mb:.1} MB (peak {peak_mb:.1} MB)");
    figures.push(Figure {
        name: "node RSS after the import, serving reads".into(),
        value: rss_mb,
        unit: "MB",
        target: "≤ 150".into(),
        holds: rss_mb <= 150.0,
    });
    figures.push(Figure {
        name: "node peak RSS (whole run)".into(),
        value: peak_mb,
        unit: "MB",
        target: String::new(),
        holds: true,
    });
    figures.push(Figure {
        name: "indexed query through the API".into(),
        value: read_ms,
        unit: "ms/query",
        target: String::new(),
        holds: true,
    });

    let db_size = std::fs::metadata(data.join("medmesh.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    let mut node = node;
    node.stop();

    // Store open with all records.
    let open_s = timed_open(&data)?;
    println!(
        "store open + first read with {records} records: {:.3} s",
        open_s
    );
    figures.push(Figure {
        name: "store open (and first read)".into(),
        value: open_s,
        unit: "s",
        target: "≤ 1".into(),
        holds: open_s <= 1.0,
    });
    let started = Instant::now();
    let mut node = NodeProcess::start(&data)?;
    let ready_s = started.elapsed().as_secs_f64();
    println!("node start until its API answers: {ready_s:.3} s");
    figures.push(Figure {
        name: "node start until its API answers".into(),
        value: ready_s,
        unit: "s",
        target: String::new(),
        holds: true,
    });
    // After a crash (kill -9) redb checks and repairs the file on open.
    runtime.block_on(async {
        let response = http
            .post(node.url("/v1/visits"))
            .json(&json!({"patient_id": "p"}))
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success(), "write failed");
        Ok(())
    })?;
    node.kill9();
    let crash_open_s = timed_open(&data)?;
    println!("store open after kill -9 (with repair): {crash_open_s:.3} s");
    figures.push(Figure {
        name: "store open after kill -9 (redb repair)".into(),
        value: crash_open_s,
        unit: "s",
        target: "≤ 1 (same bar)".into(),
        holds: crash_open_s <= 1.0,
    });
    figures.push(Figure {
        name: "database file size".into(),
        value: db_size as f64 / 1_048_576.0,
        unit: "MB",
        target: String::new(),
        holds: true,
    });
    let size_ratio = db_size as f64 / bytes.max(1) as f64;
    figures.push(Figure {
        name: "database file after the import (and 4,000 writes) vs the records' JSON".into(),
        value: size_ratio,
        unit: "×",
        target: "≤ 1.5".into(),
        holds: size_ratio <= 1.5,
    });
    // `medmesh compact` on the stopped node: redb's free pages given back.
    let (uncompacted, compacted, compact_s) = compact(&data)?;
    let compacted_ratio = compacted as f64 / bytes.max(1) as f64;
    println!(
        "medmesh compact: {:.0} MB -> {:.0} MB in {compact_s:.1} s",
        uncompacted as f64 / 1_048_576.0,
        compacted as f64 / 1_048_576.0
    );
    figures.push(Figure {
        name: format!(
            "database file after `medmesh compact` ({:.0} MB, from {:.0} MB after a restart and a kill -9, in {compact_s:.1} s) vs the records' JSON",
            compacted as f64 / 1_048_576.0,
            uncompacted as f64 / 1_048_576.0
        ),
        value: compacted_ratio,
        unit: "×",
        target: "≤ 1.5".into(),
        holds: compacted_ratio <= 1.5,
    });

    // A week's edits on the compacted store: 10 edits on each of 10,000 records (eight
    // clients at once), then a clean stop; the file against the records' JSON.
    let edited = records.min(10_000);
    let ids: Vec<String> = std::fs::read_to_string(&file)?
        .lines()
        .take(edited)
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_owned))
                .context("a generated record has no id")
        })
        .collect::<Result<_>>()?;
    let mut node = NodeProcess::start(&data)?;
    let started = Instant::now();
    runtime.block_on(week_of_edits(&http, &node, &ids))?;
    let edits_s = started.elapsed().as_secs_f64();
    node.stop();
    let (week, week_compacted, week_compact_s) = compact(&data)?;
    let week_ratio = week as f64 / bytes.max(1) as f64;
    println!(
        "{} edits in {edits_s:.1} s ({:.0}/s); database file afterwards {:.0} MB, {:.0} MB after `medmesh compact` ({week_compact_s:.1} s)",
        ids.len() * EDITS_PER_RECORD,
        (ids.len() * EDITS_PER_RECORD) as f64 / edits_s,
        week as f64 / 1_048_576.0,
        week_compacted as f64 / 1_048_576.0
    );
    figures.push(Figure {
        name: format!(
            "database file after a week's edits ({EDITS_PER_RECORD} on each of {} records, {:.0} MB) vs the records' JSON",
            ids.len(),
            week as f64 / 1_048_576.0
        ),
        value: week_ratio,
        unit: "×",
        target: "≤ 1.5".into(),
        holds: week_ratio <= 1.5,
    });
    figures.push(Figure {
        name: "a week's edits through the API (`PATCH` of one field, eight clients at once)".into(),
        value: (ids.len() * EDITS_PER_RECORD) as f64 / edits_s,
        unit: "edits/s",
        target: String::new(),
        holds: true,
    });
    let week_compacted_ratio = week_compacted as f64 / bytes.max(1) as f64;
    figures.push(Figure {
        name: format!(
            "the same after `medmesh compact` ({:.0} MB, in {week_compact_s:.1} s) vs the records' JSON",
            week_compacted as f64 / 1_048_576.0
        ),
        value: week_compacted_ratio,
        unit: "×",
        target: "≤ 1.5".into(),
        holds: week_compacted_ratio <= 1.5,
    });

    // The same import and sequential writes on a node whose store is not encrypted
    // (side by side: what encryption at rest costs).
    let plain = dir.path().join("plain");
    let unencrypted = [(medmesh::keys::UNENCRYPTED_FOR_BENCHMARK, "1")];
    let plain_node = medmesh_tests::NodeProcess::start_peered_env(&plain, &[], &unencrypted)?;
    let plain_api = ApiArgs {
        api: plain_node.api.clone(),
        data: Some(plain.clone()),
        token: None,
    };
    let started = Instant::now();
    runtime.block_on(medmesh::client::import_file(
        &plain_api, "patients", &file, false,
    ))?;
    let plain_import = records as f64 / started.elapsed().as_secs_f64();
    let plain_single = sequential_writes(
        &runtime,
        &http,
        &plain_node.url("/v1/visits"),
        single_writes,
    )?;
    drop(plain_node);
    println!(
        "store not encrypted: import {plain_import:.0} records/s, sequential writes {plain_single:.0}/s"
    );
    figures.push(Figure {
        name: format!(
            "import, store encrypted vs not encrypted ({rate:.0} vs {plain_import:.0} records/s, side by side)"
        ),
        value: rate / plain_import,
        unit: "×",
        target: String::new(),
        holds: true,
    });
    figures.push(Figure {
        name: format!(
            "sequential durable writes, store encrypted vs not ({single_rate:.0} vs {plain_single:.0} writes/s, side by side)"
        ),
        value: single_rate / plain_single,
        unit: "×",
        target: String::new(),
        holds: true,
    });

    // The anchors, in the same run and on the same disk, after medmesh's figures (so
    // that what they leave in memory and on disk does not weigh on medmesh's).
    let lines: Vec<String> = std::fs::read_to_string(&file)?
        .lines()
        .map(str::to_owned)
        .collect();
    let floor_rate = automerge_floor(&lines)?;
    let sync_us = synced_append(dir.path(), single_writes)?;
    println!("anchor: append and fdatasync {sync_us:.0} µs");
    let store_us = store_writes(dir.path(), single_writes)?;
    println!("sequential writes straight to a store in this process: {store_us:.0} µs each");
    println!("anchor: Automerge in-process floor {floor_rate:.0} records/s");
    let (sqlite_single, sqlite_bulk) = sqlite_anchors(dir.path(), &lines, single_writes)?;
    println!(
        "anchor: SQLite {sqlite_single:.0} durable single-row transactions/s, bulk insert {sqlite_bulk:.0} records/s"
    );
    figures.push(Figure {
        name: "anchor: the same records made and saved as Automerge documents in-process (all cores, no storage)".into(),
        value: floor_rate,
        unit: "records/s",
        target: String::new(),
        holds: true,
    });
    let import_ratio = rate / floor_rate;
    figures.push(Figure {
        name: "import vs that in-process floor".into(),
        value: import_ratio,
        unit: "×",
        target: "≥ 0.6".into(),
        holds: import_ratio >= 0.6,
    });
    figures.push(Figure {
        name: "anchor: SQLite bulk insert of the same records (one transaction)".into(),
        value: sqlite_bulk,
        unit: "records/s",
        target: String::new(),
        holds: true,
    });
    figures.push(Figure {
        name: "anchor: SQLite durable single-row transactions (WAL, synchronous=FULL, index on surname)".into(),
        value: sqlite_single,
        unit: "transactions/s",
        target: String::new(),
        holds: true,
    });
    let write_ratio = single_rate / sqlite_single;
    // Where a sequential write's time goes: what any durable write through this API
    // cannot go below (an HTTP round trip and one synced append on the same disk).
    let write_us = 1e6 / single_rate;
    figures.push(Figure {
        name: "sequential durable write through the API, time per write".into(),
        value: write_us,
        unit: "µs",
        target: String::new(),
        holds: true,
    });
    figures.push(Figure {
        name: "anchor: SQLite durable single-row transaction, time per transaction".into(),
        value: 1e6 / sqlite_single,
        unit: "µs",
        target: String::new(),
        holds: true,
    });
    figures.push(Figure {
        name: "anchor: HTTP round trip to the node (`GET /health`, same client, same connection)"
            .into(),
        value: round_trip_us,
        unit: "µs",
        target: String::new(),
        holds: true,
    });
    figures.push(Figure {
        name: "anchor: append 300 bytes to a file and fdatasync it, on the same disk".into(),
        value: sync_us,
        unit: "µs",
        target: String::new(),
        holds: true,
    });
    figures.push(Figure {
        name: "the same sequential writes made straight to a store in this process (no HTTP, no runtime), time per write".into(),
        value: store_us,
        unit: "µs",
        target: String::new(),
        holds: true,
    });
    let own_us = write_us - round_trip_us - sync_us;
    println!(
        "a sequential write takes {write_us:.0} µs: HTTP round trip {round_trip_us:.0} µs, synced append {sync_us:.0} µs, the rest {own_us:.0} µs"
    );
    figures.push(Figure {
        name: "sequential write time less the HTTP round trip and the synced append: the node's own work".into(),
        value: own_us,
        unit: "µs",
        target: String::new(),
        holds: true,
    });
    figures.push(Figure {
        name: "sequential durable writes vs SQLite's single-row transactions".into(),
        value: write_ratio,
        unit: "×",
        target: "≥ 0.5".into(),
        holds: write_ratio >= 0.5,
    });

    write_report(records, bytes / records.max(1), &figures)?;
    let targets: Vec<&Figure> = figures.iter().filter(|f| !f.target.is_empty()).collect();
    let failed = targets.iter().filter(|f| !f.holds).count();
    println!(
        "{} of {} targets hold",
        targets.len() - failed,
        targets.len()
    );
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}

/// Writes per second of `count` sequential durable single-record writes to `url`, each
/// answered before the next is sent.
fn sequential_writes(
    runtime: &tokio::runtime::Runtime,
    http: &reqwest::Client,
    url: &str,
    count: usize,
) -> Result<f64> {
    let started = Instant::now();
    runtime.block_on(async {
        for i in 0..count {
            let response = http
                .post(url)
                .json(&json!({"patient_id": format!("p{i}"), "clinic_id": "c1", "provider_name": "Dr. Mensah"}))
                .send()
                .await?;
            anyhow::ensure!(
                response.status() == reqwest::StatusCode::CREATED,
                "write failed: {}",
                response.status()
            );
        }
        anyhow::Ok(())
    })?;
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// `medmesh compact` on the stopped node of data directory `data`: the file's size before
/// and after, and the seconds it took.
fn compact(data: &Path) -> Result<(u64, u64, f64)> {
    let size = || {
        std::fs::metadata(data.join("medmesh.redb"))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let before = size();
    let started = Instant::now();
    let out = medmesh_tests::medmesh_command()
        .args(["compact", "--data"])
        .arg(data)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "medmesh compact failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((before, size(), started.elapsed().as_secs_f64()))
}

/// Edits made to each record of a week's edits.
const EDITS_PER_RECORD: usize = 10;

/// [`EDITS_PER_RECORD`] edits of one field on each patient of `ids`, by eight clients at
/// once, each edit answered before that client's next.
async fn week_of_edits(http: &reqwest::Client, node: &NodeProcess, ids: &[String]) -> Result<()> {
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..8 {
        let mine: Vec<String> = ids.iter().skip(client).step_by(8).cloned().collect();
        let urls: Vec<String> = mine
            .iter()
            .map(|id| node.url(&format!("/v1/patients/{id}")))
            .collect();
        let http = http.clone();
        clients.spawn(async move {
            for round in 0..EDITS_PER_RECORD {
                for (i, url) in urls.iter().enumerate() {
                    let phone = format!("+234 805 {round:03} {:04}", (i * 8 + client) % 10_000);
                    let response = http
                        .patch(url)
                        .json(&json!({ "phone": phone }))
                        .send()
                        .await?;
                    anyhow::ensure!(
                        response.status().is_success(),
                        "edit failed: {}",
                        response.status()
                    );
                    response.bytes().await?;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = clients.join_next().await {
        done??;
    }
    Ok(())
}

/// Mean microseconds of `count` sequential `GET` requests of `url`, each answered before
/// the next (after a few to open the connection).
fn round_trip(
    runtime: &tokio::runtime::Runtime,
    http: &reqwest::Client,
    url: &str,
    count: usize,
) -> Result<f64> {
    runtime.block_on(async {
        let mut started = Instant::now();
        for i in 0..count + 10 {
            if i == 10 {
                started = Instant::now();
            }
            let response = http.get(url).send().await?;
            anyhow::ensure!(
                response.status().is_success(),
                "GET {url}: {}",
                response.status()
            );
            response.bytes().await?;
        }
        Ok(started.elapsed().as_secs_f64() * 1e6 / count as f64)
    })
}

/// Mean microseconds of `count` sequential durable single-record writes made straight
/// to a store in this process (a new plain store in `dir`, its changes signed as the
/// node's are): a write's time with no HTTP and no runtime around it.
fn store_writes(dir: &Path, count: usize) -> Result<f64> {
    let store = Store::open(
        &dir.join("store-only.redb"),
        Schema::hikma(),
        StoreOptions::default(),
    )?;
    store.sign_as_blocking(&[7u8; 32])?;
    let started = Instant::now();
    for i in 0..count {
        let mut fields = medmesh_protocol::record::Fields::new();
        fields.insert("patient_id".into(), json!(format!("p{i}")));
        fields.insert("clinic_id".into(), json!("c1"));
        fields.insert("provider_name".into(), json!("Dr. Mensah"));
        let op = WriteOp::new(
            "visits",
            None,
            WriteKind::Create(fields),
            ChangeAuthor::default(),
        );
        store.write_blocking(WriteBatch::one(op))?.remove(0)?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / count as f64)
}

/// Mean microseconds to append 300 bytes to a file in `dir` and `fdatasync` it, `count`
/// times: the disk's cost of one durable append, which every durable write pays.
fn synced_append(dir: &Path, count: usize) -> Result<f64> {
    let path = dir.join("synced-append");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let frame = [7u8; 300];
    let started = Instant::now();
    for _ in 0..count {
        file.write_all(&frame)?;
        file.sync_data()?;
    }
    let us = started.elapsed().as_secs_f64() * 1e6 / count as f64;
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(us)
}

/// Records per second to make each record an Automerge document and save it, on all
/// cores, with no storage: the floor an import cannot go below.
fn automerge_floor(lines: &[String]) -> Result<f64> {
    let records: Vec<medmesh_protocol::record::Fields> = lines
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for chunk in records.chunks(records.len().div_ceil(cores).max(1)) {
            scope.spawn(move || {
                for fields in chunk {
                    let mut doc = automerge::Automerge::new();
                    let made = doc.transact::<_, _, medmesh_protocol::RecordError>(|tx| {
                        medmesh_protocol::record::init_record(tx, fields)
                    });
                    assert!(made.is_ok(), "a generated record is a valid document");
                    std::hint::black_box(doc.save());
                }
            });
        }
    });
    Ok(records.len() as f64 / started.elapsed().as_secs_f64())
}

/// SQLite in WAL mode with `synchronous=FULL` and an index on surname, in `dir`: durable
/// single-row transactions per second (`single` of them), then records per second of a
/// bulk insert of every record in one transaction.
fn sqlite_anchors(dir: &Path, lines: &[String], single: usize) -> Result<(f64, f64)> {
    let mut db = rusqlite::Connection::open(dir.join("anchor.sqlite"))?;
    let mode: String = db.query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))?;
    anyhow::ensure!(mode == "wal", "SQLite did not take WAL mode ({mode})");
    db.pragma_update(None, "synchronous", "FULL")?;
    db.execute_batch(
        "CREATE TABLE patients (id TEXT PRIMARY KEY, surname TEXT, body TEXT NOT NULL);
         CREATE INDEX patients_surname ON patients (surname);",
    )?;
    let surname = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["surname"].as_str().map(str::to_owned))
    };
    let started = Instant::now();
    for (i, line) in lines.iter().cycle().take(single).enumerate() {
        db.execute(
            "INSERT INTO patients (id, surname, body) VALUES (?1, ?2, ?3)",
            (format!("single-{i}"), surname(line), line),
        )?;
    }
    let single_rate = single as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let tx = db.transaction()?;
    {
        let mut insert =
            tx.prepare("INSERT INTO patients (id, surname, body) VALUES (?1, ?2, ?3)")?;
        for (i, line) in lines.iter().enumerate() {
            insert.execute((format!("bulk-{i}"), surname(line), line))?;
        }
    }
    tx.commit()?;
    let bulk_rate = lines.len() as f64 / started.elapsed().as_secs_f64();
    Ok((single_rate, bulk_rate))
}

/// Seconds to open the (encrypted) store of data directory `dir` and read its first
/// record.
fn timed_open(dir: &Path) -> Result<f64> {
    let path = dir.join("medmesh.redb");
    let started = Instant::now();
    let (store, _) =
        medmesh::keys::open_store(dir, &path, Schema::hikma(), StoreOptions::default(), true)?;
    let page = store.list(&Query {
        collection: "patients".into(),
        limit: 1,
        ..Query::default()
    })?;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        page.records.len() == 1,
        "no record after opening {}",
        path.display()
    );
    Ok(seconds)
}

fn write_report(records: usize, avg_bytes: usize, figures: &[Figure]) -> Result<()> {
    let mut section = String::new();
    let allocator = std::env::var("MEDMESH_BENCH_ALLOCATOR").unwrap_or_else(|_| "mimalloc".into());
    let marker = if allocator == "mimalloc" {
        "node-bench".to_owned()
    } else {
        format!("node-bench-{allocator}")
    };
    section.push_str(&format!("<!-- {marker}:start -->\n"));
    section.push_str(&format!(
        "## One node: import, writes, memory, open (`node-bench`, {allocator})\n\nRun {} on this machine ({} cores), {records} generated patient records of about {avg_bytes} bytes of JSON, release build, allocator {} (for the system allocator: build with `--features system-allocator`, run with `MEDMESH_BIN=that binary MEDMESH_BENCH_ALLOCATOR=glibc`).\nReproduce: `cargo build --release -p medmesh && cargo run --release -p medmesh-tests --bin node-bench`.\n\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        allocator,
    ));
    section.push_str(&medmesh_tests::figures_table(figures));
    section.push_str(&format!("<!-- {marker}:end -->\n"));
    update_benchmarks(Path::new("BENCHMARKS.md"), &marker, &section)
}
