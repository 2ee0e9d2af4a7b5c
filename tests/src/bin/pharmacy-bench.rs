//! The pharmacy benchmark: sequential dispenses through the API, stock and alert queries
//! over 10,000 stock items, drug search over 20,000 names.
//!
//! `cargo build --release -p medmesh && cargo run --release -p medmesh-tests --bin pharmacy-bench`

use std::time::Instant;

use anyhow::{Context, Result};
use medmesh_tests::{NodeProcess, update_benchmarks};
use serde_json::{Value, json};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DRUGS: usize = 20_000;
const STOCK_ITEMS: usize = 10_000;
const DISPENSES: usize = 2_000;

fn drug_name(i: usize) -> String {
    const STEMS: [&str; 16] = [
        "paracetamol",
        "amoxicillin",
        "metronidazole",
        "ibuprofen",
        "ciprofloxacin",
        "metformin",
        "amlodipine",
        "artemether",
        "lumefantrine",
        "cotrimoxazole",
        "doxycycline",
        "omeprazole",
        "salbutamol",
        "prednisolone",
        "ceftriaxone",
        "zinc sulfate",
    ];
    const FORMS: [&str; 4] = ["tablets", "capsules", "syrup", "injection"];
    format!(
        "{} {}mg {} {}",
        STEMS[i % 16],
        50 * (1 + i % 40),
        FORMS[(i / 16) % 4],
        i / 640
    )
}

async fn median_ms(http: &reqwest::Client, urls: &[String]) -> Result<(f64, f64)> {
    let mut times = Vec::new();
    for url in urls {
        let started = Instant::now();
        let response = http.get(url).send().await?;
        anyhow::ensure!(
            response.status().is_success(),
            "{url}: {}",
            response.status()
        );
        // The whole answer received (not parsed: that is the client's time, not the node's).
        let body = response.bytes().await?;
        anyhow::ensure!(!body.is_empty(), "{url}: empty answer");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[times.len() * 95 / 100]))
}

#[tokio::main]
async fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = NodeProcess::start(&dir.path().join("node"))?;
    let http = medmesh_tests::http();
    // Catalogue and clinics.
    let drugs: Vec<Value> = (0..DRUGS)
        .map(|i| json!({"generic_name": drug_name(i)}))
        .collect();
    let mut drug_ids = Vec::new();
    for chunk in drugs.chunks(1000) {
        let answer: Value = http
            .post(node.url("/v1/drug_catalogue/_import"))
            .json(&json!({"records": chunk}))
            .send()
            .await?
            .json()
            .await?;
        for r in answer["results"].as_array().context("results")? {
            drug_ids.push(r["id"].as_str().context("id")?.to_owned());
        }
    }
    let mut clinics = Vec::new();
    for i in 0..10 {
        let c: Value = http
            .post(node.url("/v1/clinics"))
            .json(&json!({"name": format!("Clinic {i}")}))
            .send()
            .await?
            .json()
            .await?;
        clinics.push(c["id"].as_str().context("id")?.to_owned());
    }
    // 10,000 stock items: 1,000 drugs × 10 clinics, restocked through the API.
    println!("restocking {STOCK_ITEMS} stock items...");
    let today = chrono::Utc::now().date_naive();
    for i in 0..STOCK_ITEMS {
        let body = json!({
            "clinic_id": clinics[i % 10],
            "drug_id": drug_ids[i / 10],
            "batch_number": format!("B{}", i / 10),
            "expiry_date": (today + chrono::Duration::days((i % 700) as i64 - 30)).to_string(),
            "quantity": 20 + (i % 50),
            "reorder_level": 25,
        });
        let response = http
            .post(node.url("/v1/pharmacy/restock"))
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "restock failed: {}",
            response.text().await?
        );
    }
    // Sequential dispenses.
    println!("dispensing {DISPENSES} times...");
    let started = Instant::now();
    for i in 0..DISPENSES {
        // A stock item whose batch has not expired (items with index % 700 < 30 have).
        let mut drug = (i * 7) % 1000;
        while (10 * drug + i % 10) % 700 < 30 {
            drug = (drug + 1) % 1000;
        }
        let body = json!({"clinic_id": clinics[i % 10], "drug_id": drug_ids[drug], "quantity": 1});
        let response = http
            .post(node.url("/v1/pharmacy/dispense"))
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "dispense failed: {}",
            response.text().await?
        );
    }
    let dispense_rate = DISPENSES as f64 / started.elapsed().as_secs_f64();
    println!("dispense: {dispense_rate:.0}/s");
    let stock_urls: Vec<String> = (0..200)
        .map(|i| match i % 3 {
            0 => node.url("/v1/pharmacy/stock"),
            1 => node.url(&format!("/v1/pharmacy/stock?clinic_id={}", clinics[i % 10])),
            _ => node.url(&format!(
                "/v1/pharmacy/stock?clinic_id={}&drug_id={}",
                clinics[i % 10],
                drug_ids[i % 1000]
            )),
        })
        .collect();
    // The whole listing, page by page as a client walks it: each page timed, and the
    // walk as a whole.
    let mut page_times = Vec::new();
    let mut walks = Vec::new();
    for _ in 0..20 {
        let walk = Instant::now();
        let mut after: Option<String> = None;
        let mut rows = 0;
        loop {
            let url = match &after {
                Some(next) => node.url(&format!("/v1/pharmacy/stock?after={next}")),
                None => node.url("/v1/pharmacy/stock"),
            };
            let started = Instant::now();
            let page: Value = http
                .get(&url)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            page_times.push(started.elapsed().as_secs_f64() * 1000.0);
            rows += page["items"].as_array().map_or(0, Vec::len);
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => break,
            }
        }
        anyhow::ensure!(
            rows == STOCK_ITEMS,
            "the paged listing gave {rows} rows, not {STOCK_ITEMS}"
        );
        walks.push(walk.elapsed().as_secs_f64() * 1000.0);
    }
    page_times.sort_by(f64::total_cmp);
    walks.sort_by(f64::total_cmp);
    let (page_ms, page_p95) = (
        page_times[page_times.len() / 2],
        page_times[page_times.len() * 95 / 100],
    );
    let walk_ms = walks[walks.len() / 2];
    let (stock_ms, stock_p95) = median_ms(
        &http,
        &stock_urls
            .iter()
            .skip(1)
            .step_by(3)
            .cloned()
            .collect::<Vec<_>>(),
    )
    .await?;
    let alert_urls: Vec<String> = (0..100)
        .map(|i| {
            if i % 2 == 0 {
                node.url("/v1/pharmacy/alerts?within_days=60")
            } else {
                node.url(&format!(
                    "/v1/pharmacy/alerts?clinic_id={}&within_days=60",
                    clinics[i % 10]
                ))
            }
        })
        .collect();
    let (alerts_ms, alerts_p95) = median_ms(&http, &alert_urls).await?;
    let queries = [
        "para",
        "amoxicilin",
        "metformn 500",
        "ceftri",
        "zinc sul",
        "artemeter",
        "ibu 200",
        "salbutam",
        "doxy",
        "omepra",
    ];
    let search_urls: Vec<String> = (0..200)
        .map(|i| {
            node.url(&format!(
                "/v1/drugs/search?q={}",
                queries[i % queries.len()].replace(' ', "%20")
            ))
        })
        .collect();
    let (search_ms, search_p95) = median_ms(&http, &search_urls).await?;
    let rows = [
        (
            "sequential dispenses through the API",
            format!("{dispense_rate:.0} /s"),
            "≥ 500 /s",
            dispense_rate >= 500.0,
        ),
        (
            "stock query, one clinic (of 10,000 items), median / p95",
            format!("{stock_ms:.2} / {stock_p95:.2} ms"),
            "≤ 20 ms",
            stock_ms <= 20.0,
        ),
        (
            "stock listing of all 10,000 items, each page (1,000 items), median / p95",
            format!("{page_ms:.2} / {page_p95:.2} ms"),
            "≤ 20 ms",
            page_p95 <= 20.0,
        ),
        (
            "stock listing of all 10,000 items, whole walk of its pages, median",
            format!("{walk_ms:.2} ms"),
            "",
            true,
        ),
        (
            "alerts over 10,000 items, median / p95",
            format!("{alerts_ms:.2} / {alerts_p95:.2} ms"),
            "≤ 20 ms",
            alerts_ms <= 20.0,
        ),
        (
            "drug search over 20,000 names (typos included), median / p95",
            format!("{search_ms:.2} / {search_p95:.2} ms"),
            "≤ 10 ms",
            search_ms <= 10.0,
        ),
    ];
    let mut section = format!(
        "<!-- pharmacy-bench:start -->\n## Pharmacy (`pharmacy-bench`)\n\nRun {} on this machine, release `medmesh` node on loopback; times are whole HTTP requests, until the last byte of the answer arrived.\nReproduce: `cargo build --release -p medmesh && cargo run --release -p medmesh-tests --bin pharmacy-bench`.\n\n| figure | value | target | holds |\n|---|---|---|---|\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    for (name, value, target, holds) in rows {
        let (printed, cell) = medmesh_tests::verdict(target, holds);
        println!("{name:<62} {value:<22} target {target:<10} {printed}");
        section.push_str(&format!("| {name} | {value} | {target} | {cell} |\n"));
    }
    section.push_str("<!-- pharmacy-bench:end -->\n");
    update_benchmarks(
        std::path::Path::new("BENCHMARKS.md"),
        "pharmacy-bench",
        &section,
    )?;
    Ok(())
}
