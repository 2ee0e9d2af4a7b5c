//! The gateway and mobile benchmark: a gateway pushes a backlog of 100,000 records to the
//! reference cloud and pulls 100,000 from it into an empty mesh; a mobile client pulls
//! 10,000 records from a node; a quiet round's requests and bytes.
//!
//! `cargo run --release -p medmesh-tests --bin gateway-bench -- [--records N]`. Prints
//! each figure with its target and writes them to BENCHMARKS.md.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use medmesh::gateway::{Gateway, GatewayConfig};
use medmesh::pharmacy::Pharmacy;
use medmesh_protocol::{ChangeAuthor, Schema};
use medmesh_storage::{Store, StoreOptions, WriteBatch, WriteKind, WriteOp};
use medmesh_tests::cloud::Cloud;
use medmesh_tests::{Figure, patient, update_benchmarks};
use serde_json::{Value, json};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The clinic of `medmesh_tests::patient`.
const CLINIC: &str = "0192f0c4-6a1e-7cc3-9d0e-5b8f1c2a3d4e";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let records: usize = args
        .iter()
        .position(|a| a == "--records")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let mobile_records = 10_000;
    let runtime = tokio::runtime::Runtime::new()?;
    let dir = tempfile::tempdir()?;
    let mut figures = Vec::new();

    let cloud = Cloud::new();
    cloud.put("clinics", json!({"id": CLINIC, "name": "Kano General"}));
    let key = cloud.add_hub_key(&[CLINIC]);
    let addr = runtime.block_on(cloud.serve("127.0.0.1:0".parse()?))?;
    let url = format!("http://{addr}");

    // A backlog written in the mesh before the gateway could reach the cloud.
    let (mesh, mesh_pharmacy) = open_node(&dir.path().join("mesh"))?;
    fill(&mesh, records)?;
    let gateway = start_gateway(&mesh, &mesh_pharmacy, "gateway-a", &url, &key)?;
    let started = Instant::now();
    runtime.block_on(gateway.round())?;
    let push_seconds = started.elapsed().as_secs_f64();
    if cloud.count("patients") != records {
        bail!(
            "the cloud has {} of the {records} records pushed",
            cloud.count("patients")
        );
    }
    let rate = records as f64 / push_seconds;
    println!(
        "push: {records} records in {push_seconds:.2} s, {rate:.0} records/s ({} requests)",
        cloud.stats().requests
    );
    figures.push(Figure {
        name: format!("gateway pushes a backlog of {records} records to the cloud"),
        value: rate,
        unit: "records/s",
        target: "≥ 5,000 records/s".into(),
        holds: rate >= 5000.0,
    });

    // A new, empty mesh behind a new gateway pulls everything the cloud has.
    let (empty, empty_pharmacy) = open_node(&dir.path().join("empty"))?;
    let newcomer = start_gateway(&empty, &empty_pharmacy, "gateway-b", &url, &key)?;
    let started = Instant::now();
    runtime.block_on(newcomer.round())?;
    let pull_seconds = started.elapsed().as_secs_f64();
    let pulled = empty.counts()?.get("patients").copied().unwrap_or(0) as usize;
    if pulled != records {
        bail!("the empty mesh has {pulled} of the {records} records pulled");
    }
    let rate = records as f64 / pull_seconds;
    println!(
        "pull: {records} records into an empty mesh in {pull_seconds:.2} s, {rate:.0} records/s"
    );
    figures.push(Figure {
        name: format!("gateway pulls {records} records from the cloud into an empty mesh"),
        value: rate,
        unit: "records/s",
        target: "≥ 5,000 records/s".into(),
        holds: rate >= 5000.0,
    });

    // A quiet round: nothing new on either side.
    runtime.block_on(gateway.round())?;
    let seq = mesh.last_seq()?;
    let before = cloud.stats();
    runtime.block_on(gateway.round())?;
    let after = cloud.stats();
    if mesh.last_seq()? != seq {
        bail!("a quiet round wrote to the mesh");
    }
    let requests = after.requests - before.requests;
    let bytes = (after.bytes_in - before.bytes_in) + (after.bytes_out - before.bytes_out);
    println!("quiet round: {requests} request(s), {bytes} bytes of bodies");
    figures.push(Figure {
        name: "a quiet round: requests".into(),
        value: requests as f64,
        unit: "requests",
        target: "≤ 2".into(),
        holds: requests <= 2,
    });
    figures.push(Figure {
        name: "a quiet round: bytes of request and answer bodies".into(),
        value: bytes as f64,
        unit: "bytes",
        target: "≤ 4 KB".into(),
        holds: bytes <= 4096,
    });

    // A mobile client pulls 10,000 records from a node.
    let (node, _) = open_node(&dir.path().join("node"))?;
    fill(&node, mobile_records)?;
    let password = "bench-password-1";
    add_user(&node, password)?;
    let seconds = runtime.block_on(mobile_pull(node.clone(), password, mobile_records))?;
    println!("mobile pull: {mobile_records} records in {seconds:.2} s");
    figures.push(Figure {
        name: format!("a mobile client pulls {mobile_records} records from a node (HTTP)"),
        value: seconds,
        unit: "s",
        target: "≤ 2 s".into(),
        holds: seconds <= 2.0,
    });
    // The Hikma app's first pull of the same 10,000 records through the hub's RPC.
    let seconds = runtime.block_on(hub_pull(node.clone(), password, mobile_records))?;
    println!("hub pull: {mobile_records} records in {seconds:.2} s");
    figures.push(Figure {
        name: format!(
            "a tablet's first pull of {mobile_records} records through the hub RPC (handshake, sealed query)"
        ),
        value: seconds,
        unit: "s",
        target: "≤ 3 s".into(),
        holds: seconds <= 3.0,
    });
    drop(runtime);
    write_report(records, &figures)
}

fn open_node(path: &Path) -> Result<(Store, Arc<Pharmacy>)> {
    std::fs::create_dir_all(path)?;
    let store = Store::open(
        &path.join("medmesh.redb"),
        Schema::hikma(),
        StoreOptions::default(),
    )?;
    let pharmacy = Arc::new(Pharmacy::new(store.clone(), "bench-node".into()));
    Ok((store, pharmacy))
}

fn start_gateway(
    store: &Store,
    pharmacy: &Arc<Pharmacy>,
    device: &str,
    url: &str,
    key: &str,
) -> Result<Arc<Gateway>> {
    Gateway::new(
        store.clone(),
        pharmacy.clone(),
        device.to_owned(),
        GatewayConfig::new(url, key),
        None,
    )
}

fn author() -> ChangeAuthor {
    ChangeAuthor {
        device: "bench".into(),
        user: None,
    }
}

fn fill(store: &Store, records: usize) -> Result<()> {
    for start in (0..records).step_by(5000) {
        let ops = (start..(start + 5000).min(records))
            .map(|i| {
                let Value::Object(fields) = patient(i) else {
                    unreachable!("a patient is an object")
                };
                let id = fields
                    .get("id")
                    .and_then(Value::as_str)
                    .and_then(|t| t.parse().ok());
                WriteOp::new("patients", id, WriteKind::Create(fields), author())
            })
            .collect();
        for result in store.write_blocking(WriteBatch { ops, atomic: false })? {
            result.context("a generated patient was refused")?;
        }
    }
    Ok(())
}

fn add_user(store: &Store, password: &str) -> Result<()> {
    let hash = medmesh::users::hash_password(password)?;
    let Value::Object(fields) = json!({
        "id": "0192f0c4-6a1e-7cc3-9d0e-0000000000b1", "name": "Bench Nurse",
        "role": "provider", "email": "bench@clinic.example", "hashed_password": hash,
        "clinic_id": CLINIC,
    }) else {
        unreachable!("an object")
    };
    let id = "0192f0c4-6a1e-7cc3-9d0e-0000000000b1".parse().ok();
    store
        .write_blocking(WriteBatch::one(WriteOp::new(
            "users",
            id,
            WriteKind::Create(fields),
            author(),
        )))?
        .into_iter()
        .next()
        .transpose()?;
    Ok(())
}

/// Serves the node's API and times a first pull as the app makes it.
async fn mobile_pull(store: Store, password: &str, expected: usize) -> Result<f64> {
    let state = medmesh::api::AppState::new(store, "bench-node".into(), None)?;
    let api = medmesh::server::serve_api(state, "127.0.0.1:0".parse()?).await?;
    let http = medmesh_tests::http();
    let url = format!("http://{}/api/v2/sync?last_pulled_at=0", api.addr);
    // One pull to sign in (bcrypt) and warm up; the timed one follows.
    let request = || {
        http.get(&url)
            .basic_auth("bench@clinic.example", Some(password))
            .send()
    };
    let _ = request().await?.bytes().await?;
    let started = Instant::now();
    let response = request().await?;
    let status = response.status();
    let body: Value = serde_json::from_slice(&response.bytes().await?)?;
    let seconds = started.elapsed().as_secs_f64();
    let rows = body["changes"]["patients"]["created"]
        .as_array()
        .map_or(0, Vec::len);
    if !status.is_success() || rows != expected {
        bail!("the mobile pull answered {status} with {rows} of {expected} patients");
    }
    api.shutdown.cancel();
    Ok(seconds)
}

/// Serves the node's hub for the Hikma app and times a tablet's first sync pull: a
/// handshake and the sealed `sync_pull`, answer decrypted and read.
async fn hub_pull(store: Store, password: &str, expected: usize) -> Result<f64> {
    let state = medmesh::api::AppState::new(store.clone(), "bench-node".into(), None)?;
    let listener = medmesh::hub::rpc::bind("127.0.0.1:0".parse()?).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let hub_url = url.clone();
    let hub = Arc::new(
        tokio::task::spawn_blocking(move || {
            medmesh::hub::Hub::start(store, "bench-node".into(), "bench".into(), hub_url)
        })
        .await??,
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = medmesh::hub::rpc::serve(listener, state, hub, shutdown.clone());
    let mut tablet = medmesh_tests::hub::HubClient::pair(&url).await?;
    tablet
        .login("bench@clinic.example", password)
        .await?
        .ok()
        .context("the bench user could not sign in through the hub")?;
    let started = Instant::now();
    tablet.handshake().await?;
    let pulled = tablet
        .query("sync_pull", serde_json::json!({"lastPulledAt": 0}))
        .await?
        .ok()?;
    let seconds = started.elapsed().as_secs_f64();
    let rows = pulled["changes"]["patients"]["created"]
        .as_array()
        .map_or(0, Vec::len);
    if rows != expected {
        bail!("the hub pull gave {rows} of {expected} patients");
    }
    shutdown.cancel();
    let _ = task.await;
    Ok(seconds)
}

fn write_report(records: usize, figures: &[Figure]) -> Result<()> {
    let marker = "gateway-bench";
    let mut section = format!("<!-- {marker}:start -->\n");
    section.push_str(&format!(
        "## Gateway and mobile sync (`gateway-bench`)\n\nRun {} on this machine ({} cores), {records} generated patient records, release build; the reference cloud of `tests/src/cloud.rs` runs in the same process over loopback HTTP. Bytes of a quiet round are the request and answer bodies (HTTP headers add about 300 bytes).\nReproduce: `cargo run --release -p medmesh-tests --bin gateway-bench`.\n\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    ));
    section.push_str(&medmesh_tests::figures_table(figures));
    section.push_str(&format!("<!-- {marker}:end -->\n"));
    update_benchmarks(Path::new("BENCHMARKS.md"), marker, &section)
}
