//! Crash consistency: a process writing continuously is killed with SIGKILL at random
//! points; every write it had acknowledged must be there afterwards.

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use medmesh_protocol::{DocId, Schema};
use medmesh_storage::{Store, StoreOptions};
use medmesh_tests::NodeProcess;
use rand::{Rng, SeedableRng};
use serde_json::json;

fn seed() -> u64 {
    std::env::var("MEDMESH_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// The last acknowledged value per record: (writer thread, write number).
fn parse_value(value: &str) -> Option<(u64, u64)> {
    let (t, n) = value.split_once('-')?;
    Some((t.parse().ok()?, n.parse().ok()?))
}

#[test]
fn store_keeps_every_acknowledged_write_across_kill_9() {
    kill_9_rounds(None);
}

#[test]
fn an_encrypted_store_keeps_every_acknowledged_write_across_kill_9() {
    kill_9_rounds(Some("5e".repeat(32)));
}

fn kill_9_rounds(key: Option<String>) {
    let seed = seed();
    println!("seed {seed} (set MEDMESH_TEST_SEED to repeat)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("store.redb");
    let mut acked: HashMap<DocId, (u64, u64)> = HashMap::new();
    for round in 0..6 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_store-writer"))
            .arg(&db)
            .args(key.iter())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn writer");
        let stdout = child.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in std::io::BufReader::new(stdout).lines() {
                match line {
                    Ok(line) => lines.push(line),
                    Err(_) => break,
                }
            }
            lines
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(150..700)));
        child.kill().expect("kill -9");
        child.wait().expect("wait");
        let lines = reader.join().expect("reader");
        let mut this_round = 0;
        for line in lines {
            let mut parts = line.split_whitespace();
            if let (Some("ack"), Some(id), Some(value)) = (parts.next(), parts.next(), parts.next())
            {
                let id: DocId = id.parse().expect("id");
                acked.insert(id, parse_value(value).expect("value"));
                this_round += 1;
            }
        }
        assert!(
            this_round > 0,
            "round {round}: the writer acknowledged nothing"
        );
        let store = match &key {
            Some(key) => Store::open_encrypted(
                &db,
                &medmesh_tests::key_from_hex(key).expect("key"),
                Schema::hikma(),
                StoreOptions::default(),
            ),
            None => Store::open(&db, Schema::hikma(), StoreOptions::default()),
        }
        .expect("reopen after kill -9");
        for (id, (thread, n)) in &acked {
            let record = store.get("patients", id).unwrap_or_else(|e| {
                panic!("round {round}: acknowledged record {id} is missing: {e}")
            });
            let stored = record.record["phone"]
                .as_str()
                .and_then(parse_value)
                .expect("phone");
            assert_eq!(stored.0, *thread);
            assert!(
                stored.1 >= *n,
                "round {round}: record {id} lost an acknowledged write: has {stored:?}, acknowledged {n}"
            );
        }
        println!(
            "round {round}: {this_round} acknowledged writes, {} records checked",
            acked.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_keeps_every_answered_write_across_kill_9() {
    let seed = seed();
    println!("seed {seed} (set MEDMESH_TEST_SEED to repeat)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acked: Vec<(String, String)> = Vec::new();
    for round in 0..3 {
        let mut node = NodeProcess::start(dir.path()).expect("start node");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..4 {
            let url = node.url("/v1/patients");
            let stop = stop.clone();
            writers.push(tokio::spawn(async move {
                let http = medmesh_tests::http();
                let mut answered = Vec::new();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && n < 20_000 {
                    n += 1;
                    let name = format!("r{round}-w{w}-{n}");
                    match http
                        .post(&url)
                        .json(&json!({"given_name": name}))
                        .send()
                        .await
                    {
                        Ok(response) if response.status() == reqwest::StatusCode::CREATED => {
                            if let Ok(body) = response.json::<serde_json::Value>().await
                                && let Some(id) = body["id"].as_str()
                            {
                                answered.push((id.to_owned(), name));
                            }
                        }
                        _ => break,
                    }
                }
                answered
            }));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..900))).await;
        node.kill9();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for writer in writers {
            acked.extend(writer.await.expect("writer"));
        }
        let node = NodeProcess::start(dir.path()).expect("restart node");
        let http = medmesh_tests::http();
        for (id, name) in &acked {
            let response = http
                .get(node.url(&format!("/v1/patients/{id}")))
                .send()
                .await
                .expect("get");
            assert_eq!(
                response.status(),
                reqwest::StatusCode::OK,
                "round {round}: answered record {id} is missing"
            );
            let body: serde_json::Value = response.json().await.expect("json");
            assert_eq!(body["given_name"], json!(name));
        }
        println!(
            "round {round}: {} answered writes survived kill -9",
            acked.len()
        );
        drop(node);
    }
    assert!(!acked.is_empty());
}
