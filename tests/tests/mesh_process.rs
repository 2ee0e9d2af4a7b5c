//! The `medmesh` binary as separate processes, syncing over loopback.

use std::time::{Duration, Instant};

use medmesh_tests::{NodeProcess, init_node, join_mesh};
use serde_json::{Value, json};

async fn count(http: &reqwest::Client, node: &NodeProcess) -> u64 {
    status(http, node).await["records"]["patients"]
        .as_u64()
        .unwrap_or(0)
}

async fn wait_for(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_three_processes_carries_writes_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db, dc) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    init_node(&da);
    join_mesh(&da, &db).expect("join");
    join_mesh(&da, &dc).expect("join");
    let a = NodeProcess::start_peered(&da, &[], None).expect("a");
    let b = NodeProcess::start_peered(&db, std::slice::from_ref(&a.listen), None).expect("b");
    let c = NodeProcess::start_peered(&dc, std::slice::from_ref(&b.listen), None).expect("c");
    let http = medmesh_tests::http();
    let response = http
        .post(a.url("/v1/patients"))
        .json(&json!({"given_name": "Chain"}))
        .send()
        .await
        .expect("post");
    let created: Value = response.json().await.expect("json");
    let path = format!("/v1/patients/{}", created["id"].as_str().expect("id"));
    wait_for("the write on C", Duration::from_secs(20), async || {
        matches!(http.get(c.url(&path)).send().await, Ok(r) if r.status() == reqwest::StatusCode::OK)
    })
    .await;
}

/// A mesh of two data directories under `dir`: A founded it and runs holding `total`
/// imported patients; B has joined and is not started. Answers B's directory, A, and the
/// tests' client.
async fn a_with_patients(
    dir: &std::path::Path,
    total: u64,
) -> (std::path::PathBuf, NodeProcess, reqwest::Client) {
    let (da, db) = (dir.join("a"), dir.join("b"));
    init_node(&da);
    join_mesh(&da, &db).expect("join");
    let a = NodeProcess::start_peered(&da, &[], None).expect("a");
    let http = medmesh_tests::http();
    medmesh_tests::import_patients(&http, &a, 0..total as usize)
        .await
        .expect("import");
    (db, a, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_a_large_sync_finishes_it_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let total = 20_000u64;
    let (db, a, http) = a_with_patients(dir.path(), total).await;
    assert_eq!(count(&http, &a).await, total);
    let mut b = NodeProcess::start_peered(&db, std::slice::from_ref(&a.listen), None).expect("b");
    // Kill B once part of the sync is stored, and B shows how far it has come (what
    // the console and the terminal's bar show).
    let mut progress = Value::Null;
    wait_for("part of the sync", Duration::from_secs(60), async || {
        let n = count(&http, &b).await;
        if let Ok(r) = http.get(b.url("/v1/peers")).send().await
            && let Ok(peers) = r.json::<Value>().await
            && let Some(p) = peers["peers"].as_array().and_then(|l| {
                l.iter()
                    .find_map(|p| p.get("sync_progress").filter(|s| !s.is_null()))
            })
        {
            progress = p.clone();
        }
        n > 0 && n < total && progress["received"].as_u64().is_some_and(|r| r > 0)
    })
    .await;
    let (received, announced) = (
        progress["received"].as_u64().unwrap_or(0),
        progress["announced"].as_u64().unwrap_or(0),
    );
    assert!(
        announced >= total && received < announced,
        "an initial sync shows its progress: {progress}"
    );
    assert!(progress["rate"].as_f64().is_some(), "{progress}");
    let before = count(&http, &b).await;
    b.kill9();
    assert!(before < total, "killed in the middle ({before} of {total})");
    let b = NodeProcess::start_peered(&db, &[], None).expect("b again");
    wait_for(
        "the whole sync after restart",
        Duration::from_secs(120),
        async || count(&http, &b).await == total,
    )
    .await;
    // Same records on both: compare the exported ids.
    let ids = |node: &NodeProcess| {
        let out = medmesh_tests::medmesh_command()
            .args(["export", "patients", "--api", &node.api])
            .output()
            .expect("export");
        let mut ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|r| r["id"].as_str().map(str::to_owned))
            .collect();
        ids.sort();
        ids
    };
    let on_a = ids(&a);
    assert_eq!(on_a.len() as u64, total);
    assert_eq!(on_a, ids(&b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_of_another_mesh_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, dx) = (dir.path().join("a"), dir.path().join("x"));
    init_node(&da);
    init_node(&dx);
    let a = NodeProcess::start_peered(&da, &[], None).expect("a");
    let x = NodeProcess::start_peered(&dx, std::slice::from_ref(&a.listen), None).expect("x");
    let http = medmesh_tests::http();
    http.post(a.url("/v1/patients"))
        .json(&json!({"given_name": "A only"}))
        .send()
        .await
        .expect("post");
    http.post(x.url("/v1/patients"))
        .json(&json!({"given_name": "X only"}))
        .send()
        .await
        .expect("post");
    wait_for("the refusal", Duration::from_secs(20), async || {
        let peers: Value = match http.get(x.url("/v1/peers")).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        peers["peers"].as_array().into_iter().flatten().any(|p| {
            p["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("another mesh"))
        })
    })
    .await;
    assert_eq!(count(&http, &a).await, 1);
    assert_eq!(count(&http, &x).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_of_different_fields_during_a_partition_both_survive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    init_node(&da);
    join_mesh(&da, &db).expect("join");
    let listen_a = format!("/ip4/127.0.0.1/tcp/{}", medmesh_tests::free_port());
    let http = medmesh_tests::http();
    let mut a = NodeProcess::start_peered(&da, &[], Some(listen_a.clone())).expect("a");
    let mut b = NodeProcess::start_peered(&db, std::slice::from_ref(&listen_a), None).expect("b");
    let created: Value = http
        .post(a.url("/v1/patients"))
        .json(&json!({"given_name": "Ana", "surname": "Diaz"}))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    let path = format!("/v1/patients/{}", created["id"].as_str().expect("id"));
    wait_for(
        "the record on B",
        Duration::from_secs(20),
        async || matches!(http.get(b.url(&path)).send().await, Ok(r) if r.status().is_success()),
    )
    .await;
    // Partition: B goes away; A edits the phone; A goes away; B edits the camp.
    b.stop();
    http.patch(a.url(&path))
        .json(&json!({"phone": "0803"}))
        .send()
        .await
        .expect("patch a");
    a.stop();
    let b = NodeProcess::start_peered(&db, &[], None).expect("b alone");
    http.patch(b.url(&path))
        .json(&json!({"camp": "North"}))
        .send()
        .await
        .expect("patch b");
    // Heal: A comes back on its address; B, which remembers it, reconnects.
    let a = NodeProcess::start_peered(&da, &[], Some(listen_a)).expect("a again");
    wait_for("both edits on both", Duration::from_secs(60), async || {
        let get = async |node: &NodeProcess| -> Value {
            match http.get(node.url(&path)).send().await {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            }
        };
        let (ra, rb) = (get(&a).await, get(&b).await);
        ra == rb && ra["phone"] == json!("0803") && ra["camp"] == json!("North")
    })
    .await;
}

async fn status(http: &reqwest::Client, node: &NodeProcess) -> Value {
    match http.get(node.url("/v1/status")).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// The story of issue 8: a deployment adds a collection with `--schema` on one tablet
/// only. Its records cross a tablet that has never seen the schema, reach a third one,
/// and are readable on both once the schema (mesh state) arrives — also after restarts;
/// nothing is held, and the nodes prove they hold the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_declared_on_one_node_reaches_and_is_readable_on_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db, dc) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    init_node(&da);
    join_mesh(&da, &db).expect("join");
    join_mesh(&da, &dc).expect("join");
    let schema = dir.path().join("lab.json");
    std::fs::write(
        &schema,
        json!({"collections": [{"name": "lab_reports", "fields": [
            {"name": "patient_id", "type": "id", "required": true, "index": "exact"},
            {"name": "test_name", "type": "string", "index": "prefix"},
            {"name": "result_value", "type": "number"}]}]})
        .to_string(),
    )
    .expect("schema file");
    let schema_arg = schema.to_str().expect("path");
    let a = NodeProcess::start_with_args(&da, &[], &["--schema", schema_arg]).expect("a");
    let mut b = NodeProcess::start_peered(&db, std::slice::from_ref(&a.listen), None).expect("b");
    let mut c = NodeProcess::start_peered(&dc, std::slice::from_ref(&b.listen), None).expect("c");
    let http = medmesh_tests::http();
    // B and C do not know the collection before the declaration reaches them.
    let patient = uuid::Uuid::new_v4().to_string();
    let mut ids = Vec::new();
    for (test, value) in [
        ("Haemoglobin", 11.2),
        ("Glucose", 5.4),
        ("Malaria RDT", 0.0),
    ] {
        let response = http
            .post(a.url("/v1/lab_reports"))
            .json(&json!({"patient_id": patient, "test_name": test, "result_value": value}))
            .send()
            .await
            .expect("post");
        assert!(
            response.status().is_success(),
            "A stores lab reports: {}",
            response.text().await.unwrap_or_default()
        );
        let created: Value = response.json().await.expect("json");
        ids.push(created["id"].as_str().expect("id").to_owned());
    }
    let readable = async |http: &reqwest::Client, node: &NodeProcess, ids: &[String]| {
        for id in ids {
            let Ok(r) = http
                .get(node.url(&format!("/v1/lab_reports/{id}")))
                .send()
                .await
            else {
                return false;
            };
            if r.status() != reqwest::StatusCode::OK {
                return false;
            }
        }
        let list: Value = match http
            .get(node.url(&format!("/v1/lab_reports?patient_id={patient}")))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => return false,
        };
        list["records"].as_array().map_or(0, Vec::len) == ids.len()
    };
    for (name, node) in [("B", &b), ("C", &c)] {
        wait_for(
            &format!("the lab reports readable (and indexed) on {name}"),
            Duration::from_secs(30),
            async || readable(&http, node, &ids).await,
        )
        .await;
    }
    // Another report after both learned the collection, and restarts in between.
    b.stop();
    c.stop();
    let response = http
        .post(a.url("/v1/lab_reports"))
        .json(&json!({"patient_id": patient, "test_name": "HIV rapid", "result_value": 0}))
        .send()
        .await
        .expect("post");
    let created: Value = response.json().await.expect("json");
    ids.push(created["id"].as_str().expect("id").to_owned());
    let b = NodeProcess::start_peered(&db, std::slice::from_ref(&a.listen), None).expect("b");
    let c = NodeProcess::start_peered(&dc, std::slice::from_ref(&b.listen), None).expect("c");
    for (name, node) in [("B", &b), ("C", &c)] {
        wait_for(
            &format!("all lab reports readable on {name} after a restart"),
            Duration::from_secs(30),
            async || readable(&http, node, &ids).await,
        )
        .await;
        let status = status(&http, node).await;
        assert_eq!(
            status["held"]["total"],
            json!(0),
            "{name} holds nothing back: {status}"
        );
        assert_eq!(status["records"]["lab_reports"], json!(4), "{status}");
    }
    // C and B prove they hold the same.
    let b_id = status(&http, &b).await["peer_id"]
        .as_str()
        .expect("peer id")
        .to_owned();
    let mut report = Value::Null;
    wait_for(
        "a verify round between C and B",
        Duration::from_secs(30),
        async || match http
            .post(c.url(&format!("/v1/peers/{b_id}/verify")))
            .json(&json!({}))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                report = r.json().await.unwrap_or(Value::Null);
                true
            }
            _ => false,
        },
    )
    .await;
    assert_eq!(report["equal"], json!(true), "{report}");
    assert_eq!(report["differing_buckets"], json!(0), "{report}");
    assert!(
        report["local_documents"].as_u64() >= Some(4)
            && report["local_documents"] == report["peer_documents"],
        "{report}"
    );
}

/// The processes started (directly or not) by `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // The parent's pid is the second field after the command's closing parenthesis.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(parent) && !found.contains(&child) {
                found.push(child);
            }
        }
        i += 1;
    }
    found.remove(0);
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn medmesh_start_in_a_terminal_shows_an_initial_syncs_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let total = 10_000u64;
    let (db, a, http) = a_with_patients(dir.path(), total).await;
    // B runs in a pseudo-terminal (`script`), as a person starts it.
    medmesh_tests::give_test_token(&db).expect("token");
    let api = format!("127.0.0.1:{}", medmesh_tests::free_port());
    let command = format!(
        "MEDMESH_LOG=warn {} start --no-mdns --data {} --api {api} --listen /ip4/127.0.0.1/tcp/{} --peer {}",
        medmesh_tests::medmesh_bin().display(),
        db.display(),
        medmesh_tests::free_port(),
        a.listen
    );
    let terminal = dir.path().join("terminal.log");
    let mut script = std::process::Command::new("script")
        .args(["-q", "-f", "-e", "-c", &command])
        .arg(&terminal)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("script");
    let b_url = |path: &str| format!("http://{api}{path}");
    let synced = async || {
        let Ok(r) = http.get(b_url("/v1/status")).send().await else {
            return false;
        };
        r.json::<Value>()
            .await
            .ok()
            .and_then(|s| s["records"]["patients"].as_u64())
            == Some(total)
    };
    wait_for("the sync in the terminal", Duration::from_secs(120), synced).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Stops the node this test started through `script` (by its pid).
    for pid in descendants(script.id()) {
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
    }
    let _ = script.wait();
    let shown =
        String::from_utf8_lossy(&std::fs::read(&terminal).expect("terminal log")).into_owned();
    assert!(
        shown.contains("syncing from") && shown.contains("documents"),
        "a progress bar while syncing: {shown}"
    );
    assert!(shown.contains("initial sync done"), "the bar ends: {shown}");
}
