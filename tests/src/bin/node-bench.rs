//! The single-node benchmark: import, durable single writes, reads, memory, store open.
//!
//! `cargo run --release -p medmesh-tests --bin node-bench -- [--records N]`
//! (build the node first: `cargo build --release -p medmesh`). Prints each figure with its
//! target and writes them to BENCHMARKS.md.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use medmesh::config::ApiArgs;
use medmesh_protocol::Schema;
use medmesh_storage::{Query, Store, StoreOptions};
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
        user: Some("bench".into()),
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
    let http = reqwest::Client::new();
    let url = node.url("/v1/visits");
    let started = Instant::now();
    runtime.block_on(async {
        for i in 0..single_writes {
            let response = http
                .post(&url)
                .json(&json!({"patient_id": format!("p{i}"), "clinic_id": "c1", "provider_name": "Dr. Mensah"}))
                .send()
                .await?;
            anyhow::ensure!(response.status() == reqwest::StatusCode::CREATED, "write failed: {}", response.status());
        }
        Ok(())
    })?;
    let single_rate = single_writes as f64 / started.elapsed().as_secs_f64();
    println!("sequential single writes: {single_rate:.0}/s");
    figures.push(Figure {
        name: "sequential durable single-record API writes".into(),
        value: single_rate,
        unit: "writes/s",
        target: "≥ 1,000".into(),
        holds: single_rate >= 1_000.0,
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
    let open_s = timed_open(&data.join("medmesh.redb"))?;
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
    let crash_open_s = timed_open(&data.join("medmesh.redb"))?;
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

/// Seconds to open the store and read its first record.
fn timed_open(path: &Path) -> Result<f64> {
    let started = Instant::now();
    let store = Store::open(path, Schema::hikma(), StoreOptions::default())?;
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
