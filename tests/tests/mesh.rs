//! Real nodes in one process, syncing over libp2p on 127.0.0.1.

use std::time::Duration;

use medmesh_tests::{InProcessNode, eventually, join_mesh};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

async fn post(
    http: &reqwest::Client,
    node: &InProcessNode,
    collection: &str,
    body: Value,
) -> Value {
    let response = http
        .post(node.url(&format!("/v1/{collection}")))
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    response.json().await.expect("json")
}

async fn patch(http: &reqwest::Client, node: &InProcessNode, path: &str, body: Value) {
    let response = http
        .patch(node.url(path))
        .json(&body)
        .send()
        .await
        .expect("patch");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
}

async fn get(http: &reqwest::Client, node: &InProcessNode, path: &str) -> Option<Value> {
    let response = http.get(node.url(path)).send().await.ok()?;
    if response.status() != reqwest::StatusCode::OK {
        return None;
    }
    response.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_at_one_end_of_a_chain_reaches_the_other_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db, dc) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    let a = InProcessNode::start(&da, vec![]).await.expect("a");
    join_mesh(&da, &db).expect("join");
    join_mesh(&da, &dc).expect("join");
    let b = InProcessNode::start(&db, vec![a.addr.clone()])
        .await
        .expect("b");
    let c = InProcessNode::start(&dc, vec![b.addr.clone()])
        .await
        .expect("c");
    let http = medmesh_tests::http();
    let from_a = post(&http, &a, "patients", json!({"given_name": "From A"})).await;
    let from_c = post(&http, &c, "visits", json!({"patient_id": from_a["id"]})).await;
    let a_path = format!("/v1/patients/{}", from_a["id"].as_str().expect("id"));
    let c_path = format!("/v1/visits/{}", from_c["id"].as_str().expect("id"));
    eventually(WAIT, "A's patient on C", || async {
        get(&http, &c, &a_path).await.is_some()
    })
    .await
    .expect("hop A→C");
    eventually(WAIT, "C's visit on A", || async {
        get(&http, &a, &c_path).await.is_some()
    })
    .await
    .expect("hop C→A");
    // A live edit crosses too, and every node reports its peers.
    patch(&http, &a, &a_path, json!({"surname": "Live"})).await;
    eventually(WAIT, "the edit on C", || async {
        get(&http, &c, &a_path)
            .await
            .is_some_and(|r| r["surname"] == json!("Live"))
    })
    .await
    .expect("live edit");
    let peers: Value = http
        .get(b.url("/v1/peers"))
        .send()
        .await
        .expect("peers")
        .json()
        .await
        .expect("json");
    let peers = peers["peers"].as_array().expect("peers").clone();
    assert_eq!(peers.len(), 2, "B sees A and C: {peers:?}");
    assert!(
        peers
            .iter()
            .all(|p| p["connected"] == json!(true) && p["last_sync"].is_string())
    );
    let status: Value = http
        .get(b.url("/v1/status"))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert_eq!(status["mesh"]["peers_connected"], json!(2));
    c.stop().await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_made_apart_merge_field_by_field_and_conflicts_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let http = medmesh_tests::http();
    let a = InProcessNode::start(&da, vec![]).await.expect("a");
    join_mesh(&da, &db).expect("join");
    let b = InProcessNode::start(&db, vec![a.addr.clone()])
        .await
        .expect("b");
    let record = post(
        &http,
        &a,
        "patients",
        json!({"given_name": "Ana", "phone": "1"}),
    )
    .await;
    let path = format!("/v1/patients/{}", record["id"].as_str().expect("id"));
    eventually(WAIT, "the record on B", || async {
        get(&http, &b, &path).await.is_some()
    })
    .await
    .expect("synced");
    let a_addr = a.addr.clone();
    // A partition: each side edits while the other is away.
    b.stop().await;
    patch(&http, &a, &path, json!({"surname": "Diaz", "phone": "2"})).await;
    a.stop().await;
    let b = InProcessNode::start(&db, vec![]).await.expect("b alone");
    patch(&http, &b, &path, json!({"sex": "female", "phone": "3"})).await;
    b.stop().await;
    // Heal: both run again; B remembers A.
    let a = InProcessNode::start(&da, vec![]).await.expect("a again");
    assert_eq!(a.addr.iter().next(), a_addr.iter().next());
    let b = InProcessNode::start(&db, vec![a.addr.clone()])
        .await
        .expect("b again");
    eventually(WAIT, "both edits on both nodes", || async {
        let (ra, rb) = (get(&http, &a, &path).await, get(&http, &b, &path).await);
        matches!((ra, rb), (Some(ra), Some(rb)) if ra == rb && ra["surname"] == json!("Diaz") && ra["sex"] == json!("female"))
    })
    .await
    .expect("merged");
    let ca = get(&http, &a, &format!("{path}/conflicts"))
        .await
        .expect("conflicts");
    let cb = get(&http, &b, &format!("{path}/conflicts"))
        .await
        .expect("conflicts");
    assert_eq!(ca, cb, "both nodes pick the same winner");
    let phone = ca["conflicts"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["field"] == json!("phone")))
        .expect("a phone conflict");
    let mut values: Vec<String> = phone["values"]
        .as_array()
        .expect("values")
        .iter()
        .map(ToString::to_string)
        .collect();
    values.sort();
    assert_eq!(values, vec!["\"2\"", "\"3\""]);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_mesh_gets_nothing_and_gives_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, dx) = (dir.path().join("a"), dir.path().join("x"));
    let http = medmesh_tests::http();
    let a = InProcessNode::start(&da, vec![]).await.expect("a");
    // X founds its own mesh and is pointed at A.
    let x = InProcessNode::start(&dx, vec![a.addr.clone()])
        .await
        .expect("x");
    post(&http, &a, "patients", json!({"given_name": "Secret A"})).await;
    post(&http, &x, "patients", json!({"given_name": "Secret X"})).await;
    eventually(WAIT, "X's session to be refused", || async {
        x.mesh.peers().iter().any(|p| {
            p.last_error
                .as_deref()
                .is_some_and(|e| e.contains("another mesh"))
        })
    })
    .await
    .expect("refused");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.store.counts().expect("counts").get("patients"), Some(&1));
    assert_eq!(x.store.counts().expect("counts").get("patients"), Some(&1));
    x.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_dialing_each_other_keep_one_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let a = InProcessNode::start(&da, vec![]).await.expect("a");
    join_mesh(&da, &db).expect("join");
    let b = InProcessNode::start(&db, vec![a.addr.clone()])
        .await
        .expect("b");
    // A is told about B too: both dial.
    a.mesh.add_peer(b.addr.clone()).await.expect("add");
    eventually(WAIT, "one connection each way", || async {
        let (pa, pb) = (a.mesh.peers(), b.mesh.peers());
        pa.len() == 1
            && pb.len() == 1
            && pa[0].connections == 1
            && pb[0].connections == 1
            && pa[0].syncing
            && pb[0].syncing
    })
    .await
    .expect("duplicates closed");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(a.mesh.peers()[0].connections, 1);
    assert_eq!(b.mesh.peers()[0].connections, 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_larger_than_a_frame_arrives_in_parts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let a = InProcessNode::start(&da, vec![]).await.expect("a");
    join_mesh(&da, &db).expect("join");
    // A scanned report: 8 MB of text in one record (frames are at most 4 MB).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let big: String = (0..8 * 1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    let mut fields = serde_json::Map::new();
    fields.insert("patient_id".into(), json!("p-big"));
    fields.insert("form_data".into(), json!(big));
    let op = medmesh_storage::WriteOp::new(
        "events",
        None,
        medmesh_storage::WriteKind::Create(fields),
        Default::default(),
    );
    let out = a
        .store
        .write(medmesh_storage::WriteBatch::one(op))
        .await
        .expect("write");
    let id = out.into_iter().next().expect("one").expect("created").id;
    let saved = a.store.document("events", &id).expect("doc").save().len();
    assert!(
        saved > medmesh_protocol::wire::MAX_FRAME,
        "the document ({saved} bytes) is larger than a frame"
    );
    let b = InProcessNode::start(&db, vec![a.addr.clone()])
        .await
        .expect("b");
    eventually(Duration::from_secs(60), "the large record on B", || async {
        b.store
            .get("events", &id)
            .is_ok_and(|r| r.record["form_data"].as_str().map(str::len) == Some(big.len()))
    })
    .await
    .expect("large document synced");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_that_stock_the_same_batch_offline_end_with_one_item_and_the_right_quantity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let http = medmesh_tests::http();
    // The clinic exists on both before they part.
    let a = InProcessNode::start(&da, vec![]).await.expect("a");
    join_mesh(&da, &db).expect("join");
    let b = InProcessNode::start(&db, vec![a.addr.clone()])
        .await
        .expect("b");
    let clinic = post(&http, &a, "clinics", json!({"name": "Yola"})).await;
    let clinic_path = format!("/v1/clinics/{}", clinic["id"].as_str().expect("id"));
    eventually(WAIT, "the clinic on B", || async {
        get(&http, &b, &clinic_path).await.is_some()
    })
    .await
    .expect("clinic");
    b.stop().await;
    a.stop().await;
    // Apart: each receives the same batch of the same drug (spelled differently) and
    // dispenses from it.
    let pharmacy = async |dir: &std::path::Path, name: &str, restock: i64, dispense: i64| {
        let node = InProcessNode::start(dir, vec![]).await.expect("node alone");
        let body = json!({"clinic_id": clinic["id"], "drug_name": name, "batch_number": "bx-9", "expiry_date": "2030-12-31", "quantity": restock});
        let r = http
            .post(node.url("/v1/pharmacy/restock"))
            .json(&body)
            .send()
            .await
            .expect("restock");
        assert!(r.status().is_success());
        let body = json!({"clinic_id": clinic["id"], "drug_name": name, "quantity": dispense});
        let r = http
            .post(node.url("/v1/pharmacy/dispense"))
            .json(&body)
            .send()
            .await
            .expect("dispense");
        assert!(r.status().is_success());
        node.stop().await;
    };
    pharmacy(&da, "Ciprofloxacin 500mg tablets", 100, 7).await;
    pharmacy(&db, "ciprofloxacin 500 MG Tablets", 40, 5).await;
    // They meet.
    let a = InProcessNode::start(&da, vec![]).await.expect("a again");
    let b = InProcessNode::start(&db, vec![a.addr.clone()])
        .await
        .expect("b again");
    let stock = async |node: &InProcessNode| -> Value {
        http.get(node.url("/v1/pharmacy/stock"))
            .send()
            .await
            .expect("stock")
            .json()
            .await
            .expect("json")
    };
    eventually(WAIT, "one item with 100 + 40 - 7 - 5 on both", || async {
        let (sa, sb) = (stock(&a).await, stock(&b).await);
        sa == sb
            && sa["items"]
                .as_array()
                .is_some_and(|i| i.len() == 1 && i[0]["quantity"] == json!(128))
    })
    .await
    .expect("merged stock");
    assert_eq!(
        a.store.counts().expect("counts").get("drug_catalogue"),
        Some(&1),
        "one drug"
    );
    let verify: Value = http
        .get(a.url("/v1/pharmacy/verify"))
        .send()
        .await
        .expect("verify")
        .json()
        .await
        .expect("json");
    assert_eq!(verify["mismatches"], json!([]));
    a.stop().await;
    b.stop().await;
}

/// Two nodes of one mesh, and a user of the app made on the first; answers the nodes and
/// the user's `Authorization` header.
async fn two_nodes_and_an_app_user(
    dir: &std::path::Path,
) -> (InProcessNode, InProcessNode, String) {
    use base64::Engine;
    let (da, db) = (dir.join("a"), dir.join("b"));
    let a = InProcessNode::start(&da, vec![]).await.expect("a");
    join_mesh(&da, &db).expect("join");
    let b = InProcessNode::start(&db, vec![a.addr.clone()])
        .await
        .expect("b");
    let hashed = medmesh::users::hash_password("a long password").expect("hash");
    post(
        &medmesh_tests::http(),
        &a,
        "users",
        // An admin: the app pushes a dispense (a provider needs the clinic flag for it).
        json!({"email": "nurse@clinic.org", "name": "Nurse", "role": "admin", "hashed_password": hashed}),
    )
    .await;
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("nurse@clinic.org:a long password")
    );
    (a, b, auth)
}

/// The Hikma app signs in on one node with a user created on another, and moves between
/// nodes: the second node, which did not hand out its `last_pulled_at`, answers with
/// everything, so nothing written through the first is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_moves_between_nodes_and_misses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, auth) = two_nodes_and_an_app_user(dir.path()).await;
    let http = medmesh_tests::http();
    let pull = async |node: &InProcessNode, since: Option<i64>| -> Option<Value> {
        let url = match since {
            Some(t) => node.url(&format!("/api/v2/sync?last_pulled_at={t}")),
            None => node.url("/api/v2/sync"),
        };
        let response = http
            .get(url)
            .header("authorization", &auth)
            .send()
            .await
            .ok()?;
        (response.status() == reqwest::StatusCode::OK)
            .then_some(response.json::<Value>().await.ok()?)
    };
    // The user reaches B; the app signs in there too.
    eventually(WAIT, "the user on B", || async {
        pull(&b, None).await.is_some()
    })
    .await
    .expect("the app signs in on B");
    // The app syncs with A: pulls, then pushes a patient.
    let first = pull(&a, None).await.expect("pull from A");
    let t_a = first["timestamp"].as_i64().expect("timestamp");
    let patient = uuid::Uuid::now_v7().to_string();
    let response = http
        .post(a.url(&format!("/api/v2/sync?last_pulled_at={t_a}")))
        .header("authorization", &auth)
        .json(
            &json!({"patients": {"created": [{"id": patient, "given_name": "Moved",
            "created_at": 1_764_000_000_000i64, "updated_at": 1_764_000_000_000i64,
            "_status": "created", "_changed": ""}], "updated": [], "deleted": []}}),
        )
        .send()
        .await
        .expect("push to A");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    // Another record written on A meanwhile by another device.
    let other = post(&http, &a, "patients", json!({"given_name": "Elsewhere"})).await;
    let other = other["id"].as_str().expect("id").to_owned();
    // The app moves to B with A's timestamp: B answers with everything once it has both.
    eventually(WAIT, "both records from B with A's timestamp", || async {
        let Some(answer) = pull(&b, Some(t_a)).await else {
            return false;
        };
        let rows: Vec<&str> = answer["changes"]["patients"]["created"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(
                answer["changes"]["patients"]["updated"]
                    .as_array()
                    .into_iter()
                    .flatten(),
            )
            .filter_map(|r| r["id"].as_str())
            .collect();
        rows.contains(&patient.as_str()) && rows.contains(&other.as_str())
    })
    .await
    .expect("B answers a foreign timestamp completely");
    b.stop().await;
    a.stop().await;
}

/// The app pushes the same dispense to two nodes (it moved between them before they
/// met): once the nodes merge, the stock moved once, with one movement record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispense_pushed_to_two_nodes_moves_the_stock_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, auth) = two_nodes_and_an_app_user(dir.path()).await;
    let http = medmesh_tests::http();
    let clinic = post(&http, &a, "clinics", json!({"name": "Kano"})).await;
    let clinic = clinic["id"].as_str().expect("clinic").to_owned();
    let restocked: Value = http
        .post(a.url("/v1/pharmacy/restock"))
        .json(
            &json!({"clinic_id": clinic, "drug_name": "Amoxicillin 250mg", "batch_number": "A1",
                      "expiry_date": "2031-01-31", "quantity": 100}),
        )
        .send()
        .await
        .expect("restock")
        .json()
        .await
        .expect("json");
    let (drug, item) = (
        restocked["drug_id"].as_str().expect("drug").to_owned(),
        restocked["stock_item_id"]
            .as_str()
            .expect("item")
            .to_owned(),
    );
    let stock_path = format!("/v1/pharmacy/stock?clinic_id={clinic}&drug_id={drug}");
    let quantity = async |node: &InProcessNode| -> Option<i64> {
        get(&http, node, &stock_path).await?["items"][0]["quantity"].as_i64()
    };
    eventually(WAIT, "the stock item on B", || async {
        quantity(&b).await == Some(100)
    })
    .await
    .expect("B has the stock item");
    let record = uuid::Uuid::now_v7().to_string();
    let push = json!({"dispensing_records": {"created": [{
        "id": record, "clinic_id": clinic, "drug_id": drug, "batch_id": item,
        "quantity_dispensed": 12, "dispensed_by": "nurse@clinic.org",
        "dispensed_at": 1_764_000_000_000i64, "_status": "created", "_changed": ""}],
        "updated": [], "deleted": []}});
    // The two nodes part (each forgets the other), and the app pushes to both.
    for (node, other) in [(&a, &b), (&b, &a)] {
        let response = http
            .delete(node.url(&format!("/v1/peers/{}", other.peer_id)))
            .send()
            .await
            .expect("forget");
        assert!(response.status().is_success());
    }
    eventually(WAIT, "the nodes apart", || async {
        let mut apart = true;
        for node in [&a, &b] {
            apart &= get(&http, node, "/v1/peers").await.is_some_and(|p| {
                p["peers"]
                    .as_array()
                    .is_none_or(|peers| peers.iter().all(|peer| peer["connected"] != json!(true)))
            });
        }
        apart
    })
    .await
    .expect("apart");
    for node in [&a, &b] {
        eventually(WAIT, "the push accepted", || async {
            http.post(node.url("/api/v2/sync?last_pulled_at=0"))
                .header("authorization", &auth)
                .json(&push)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await
        .expect("the node takes the push");
    }
    for node in [&a, &b] {
        assert_eq!(
            quantity(node).await,
            Some(88),
            "each node counted the dispense"
        );
    }
    // They meet again: both end at 88, and stay there once each has the other's copy.
    let response = http
        .post(b.url("/v1/peers"))
        .json(&json!({"addr": a.addr.to_string()}))
        .send()
        .await
        .expect("add");
    assert!(response.status().is_success());
    eventually(WAIT, "both nodes at 88 with one movement", || async {
        let mut agree = true;
        for node in [&a, &b] {
            let movements = get(
                &http,
                node,
                &format!("/v1/inventory_transactions?stock_item_id={item}&limit=100"),
            )
            .await
            .and_then(|page| page["records"].as_array().cloned())
            .map(|records| {
                records
                    .iter()
                    .filter(|t| t["transaction_type"] == json!("dispense"))
                    .count()
            });
            agree &= quantity(node).await == Some(88) && movements == Some(1);
        }
        agree
    })
    .await
    .expect("the stock moved once");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(quantity(&a).await, Some(88));
    assert_eq!(quantity(&b).await, Some(88));
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_read_a_patient_on_one_node_is_in_the_access_log_of_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let http = medmesh_tests::http();
    let a = InProcessNode::start(&da, vec![]).await.expect("a");
    join_mesh(&da, &db).expect("join");
    let b = InProcessNode::start(&db, vec![a.addr.clone()])
        .await
        .expect("b");
    let patient = post(&http, &a, "patients", json!({"given_name": "Halima"})).await;
    let id = patient["id"].as_str().expect("id").to_owned();
    assert!(
        get(&http, &a, &format!("/v1/patients/{id}"))
            .await
            .is_some()
    );
    let path = format!("/v1/_access_log?patient_id={id}");
    eventually(WAIT, "A's read in B's access log", || async {
        get(&http, &b, &path).await.is_some_and(|log| {
            log["records"].as_array().is_some_and(|entries| {
                entries.iter().any(|e| {
                    e["action"] == json!("read")
                        && e["device"] == json!(a.peer_id)
                        && e["record_id"] == json!(id)
                })
            })
        })
    })
    .await
    .expect("the access log replicates");
    b.stop().await;
    a.stop().await;
}
