//! The HTTP API, served for real on 127.0.0.1:0 by an in-process node.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use medmesh::api::AppState;
use medmesh::server::{RunningApi, open_data_async, serve_api};
use medmesh_protocol::{DocId, Schema};
use medmesh_storage::{Store, StoreOptions, WriteBatch, WriteOp};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Node {
    api: RunningApi,
    http: reqwest::Client,
    store: Store,
    _dir: Option<tempfile::TempDir>,
}

impl Node {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = open_data_async(dir.path().to_path_buf(), None)
            .await
            .expect("open");
        Self::serve(opened.store, opened.peer_id, Some(dir)).await
    }

    async fn serve(store: Store, peer_id: String, dir: Option<tempfile::TempDir>) -> Self {
        // A node on a memory store still keeps its token in a directory.
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().expect("tempdir"));
        common::give_token(dir.path());
        let state =
            AppState::new(store.clone(), peer_id, Some(dir.path().to_path_buf())).expect("state");
        let dir = Some(dir);
        let api = serve_api(state, "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("serve");
        Self {
            api,
            http: common::http(),
            store,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api.addr)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("send");
        let status = response.status();
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn raw(&self, method: reqwest::Method, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let response = self
            .http
            .request(method, self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("send");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("(no error code)")
}

#[tokio::test]
async fn health_status_and_the_create_read_update_delete_cycle() {
    let node = Node::start().await;
    let (status, body) = node.get("/health").await;
    assert_eq!(
        (status, body),
        (
            StatusCode::OK,
            json!({"status": "ok", "sync_progress": null})
        )
    );

    let (status, created) = node
        .post("/v1/patients", json!({"given_name": "Amina", "surname": "Okafor", "additional_data": {"tribe": "x", "n": [1, 2.5]}, "app_field_v9": true}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    assert!(id.parse::<DocId>().is_ok());
    assert_eq!(
        created["app_field_v9"],
        json!(true),
        "unknown fields are kept"
    );
    assert!(created["created_at"].is_string() && created["updated_at"].is_string());

    let (status, got) = node.get(&format!("/v1/patients/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, created);

    let (status, patched) = node
        .send(
            reqwest::Method::PATCH,
            &format!("/v1/patients/{id}"),
            Some(json!({"phone": "0803"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(patched["phone"], json!("0803"));
    assert_eq!(
        patched["given_name"],
        json!("Amina"),
        "PATCH leaves other fields"
    );

    let (status, replaced) = node
        .send(
            reqwest::Method::PUT,
            &format!("/v1/patients/{id}"),
            Some(json!({"given_name": "Amina", "surname": "Bello"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(replaced.get("phone").is_none(), "PUT replaces: {replaced}");
    assert_eq!(replaced["created_at"], created["created_at"]);

    let (status, tombstone) = node
        .send(reqwest::Method::DELETE, &format!("/v1/patients/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(tombstone["deleted_at"].is_string());
    let (_, list) = node.get("/v1/patients").await;
    assert_eq!(list["records"], json!([]), "deleted records are hidden");
    let (_, list) = node.get("/v1/patients?include_deleted=true").await;
    assert_eq!(list["records"].as_array().map(Vec::len), Some(1));

    let (status, history) = node.get(&format!("/v1/patients/{id}/history")).await;
    assert_eq!(status, StatusCode::OK);
    let changes = history["changes"].as_array().expect("changes");
    assert_eq!(changes.len(), 4);
    assert_eq!(changes[0]["user"], json!("this device's command line"));
    assert_eq!(changes[1]["fields"], json!(["phone", "updated_at"]));
    assert!(
        changes
            .iter()
            .all(|c| c["device"].as_str().is_some_and(|d| d.starts_with("12D3")))
    );

    let (status, node_status) = node.get("/v1/status").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        node_status["peer_id"]
            .as_str()
            .is_some_and(|p| p.starts_with("12D3"))
    );
    assert!(node_status["data_dir"].is_string());
    assert_eq!(node_status["records"]["patients"], json!(0));

    let (status, changes) = node.get("/v1/changes?since=0").await;
    assert_eq!(status, StatusCode::OK);
    // The node's own entry in the mesh's device list, and the patient.
    let patients: Vec<&Value> = changes["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["collection"] == json!("patients"))
        .collect();
    assert_eq!(patients.len(), 1, "{changes}");
    assert_eq!(patients[0]["id"], json!(id));
    assert_eq!(patients[0]["deleted"], json!(true));
    let next = changes["next"].as_u64().expect("next");
    let (_, later) = node.get(&format!("/v1/changes?since={next}")).await;
    assert_eq!(later["changes"], json!([]));
}

#[tokio::test]
async fn every_error_is_json_with_a_clear_status() {
    let node = Node::start().await;
    let (_, before) = node.get("/v1/status").await;
    let (status, body) = node
        .raw(
            reqwest::Method::POST,
            "/v1/patients",
            b"{\"given_name\": ".to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "bad_json");

    let (status, body) = node
        .post("/v1/patients", json!(["not", "an", "object"]))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "bad_json")
    );

    let (status, body) = node
        .post("/v1/patients", json!({"date_of_birth": "02/04/1990"}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_field")
    );
    assert_eq!(body["error"]["field"], json!("date_of_birth"));
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("date_of_birth"))
    );

    let (status, body) = node.post("/v1/no_such_things", json!({})).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::NOT_FOUND, "unknown_collection")
    );
    let missing = DocId::new_v7();
    let (status, body) = node.get(&format!("/v1/patients/{missing}")).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let (status, body) = node.get("/v1/patients/not-a-uuid").await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "bad_id")
    );
    let (status, body) = node.get("/v1/nowhere/at/all/really").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "no_such_endpoint");

    let (_, created) = node.post("/v1/visits", json!({"patient_id": "p-1"})).await;
    let (status, body) = node
        .post(
            "/v1/visits",
            json!({"id": created["id"], "patient_id": "p-2"}),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "already_exists")
    );

    let big = json!({"patient_id": "p", "notes": "x".repeat(2 * 1024 * 1024)});
    let (status, body) = node.post("/v1/visits", big).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
    );

    let (status, body) = node.get("/v1/patients?limit=1001").await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "bad_query")
    );
    let (status, body) = node.get("/v1/patients?hometown=Kano").await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "bad_query")
    );

    // None of the refused requests stored anything: only the one visit was added.
    let (_, status_body) = node.get("/v1/status").await;
    assert_eq!(
        status_body["total_records"],
        json!(before["total_records"].as_u64().unwrap_or(0) + 1)
    );
}

#[tokio::test]
async fn lists_filter_on_indexed_fields_and_page_with_a_cursor() {
    let node = Node::start().await;
    let clinic = DocId::new_v7().to_string();
    for i in 0..120 {
        let (status, _) = node
            .post(
                "/v1/patients",
                json!({"given_name": if i % 2 == 0 { format!("Amina{i}") } else { format!("Bola{i}") }, "surname": "Okafor", "primary_clinic_id": if i < 10 { clinic.clone() } else { "other".into() }}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (_, page) = node.get("/v1/patients").await;
    assert_eq!(
        page["records"].as_array().map(Vec::len),
        Some(50),
        "default page is 50"
    );
    assert!(page["next"].is_string());

    let (_, page) = node.get("/v1/patients?given_name=amina*&limit=1000").await;
    assert_eq!(page["records"].as_array().map(Vec::len), Some(60));
    assert!(page["next"].is_null());
    let (_, page) = node
        .get(&format!(
            "/v1/patients?primary_clinic_id={clinic}&given_name=Bola*"
        ))
        .await;
    assert_eq!(page["records"].as_array().map(Vec::len), Some(5));
    let (_, page) = node.get("/v1/patients?given_name=Amina4").await;
    assert_eq!(
        page["records"].as_array().map(Vec::len),
        Some(1),
        "exact match, not a prefix"
    );

    let mut seen = std::collections::BTreeSet::new();
    let mut path = "/v1/patients?limit=7".to_owned();
    loop {
        let (status, page) = node.get(&path).await;
        assert_eq!(status, StatusCode::OK);
        for record in page["records"].as_array().expect("records") {
            assert!(
                seen.insert(record["id"].as_str().expect("id").to_owned()),
                "no duplicates"
            );
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/patients?limit=7&cursor={next}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 120);
}

#[tokio::test]
async fn concurrent_edits_merged_from_two_stores_show_as_conflicts() {
    let a = Node::start().await;
    let b = Node::start().await;
    let (_, created) = a
        .post("/v1/patients", json!({"given_name": "Ana", "phone": "1"}))
        .await;
    let id: DocId = created["id"].as_str().expect("id").parse().expect("uuid");
    // B receives A's document, then both edit while apart.
    merge(&b.store, id, &a.store).await;
    a.send(
        reqwest::Method::PATCH,
        &format!("/v1/patients/{id}"),
        Some(json!({"phone": "2", "surname": "Diaz"})),
    )
    .await;
    b.send(
        reqwest::Method::PATCH,
        &format!("/v1/patients/{id}"),
        Some(json!({"phone": "3", "sex": "female"})),
    )
    .await;
    // They meet: each merges the other's document.
    merge(&a.store, id, &b.store).await;
    merge(&b.store, id, &a.store).await;

    let (_, on_a) = a.get(&format!("/v1/patients/{id}")).await;
    let (_, on_b) = b.get(&format!("/v1/patients/{id}")).await;
    assert_eq!(on_a, on_b, "both nodes show the same record");
    assert_eq!(on_a["surname"], json!("Diaz"));
    assert_eq!(on_a["sex"], json!("female"));
    let (status, conflicts_a) = a.get(&format!("/v1/patients/{id}/conflicts")).await;
    assert_eq!(status, StatusCode::OK);
    let (_, conflicts_b) = b.get(&format!("/v1/patients/{id}/conflicts")).await;
    assert_eq!(conflicts_a, conflicts_b, "both pick the same winner");
    let phone = conflicts_a["conflicts"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["field"] == json!("phone")))
        .expect("phone conflict")
        .clone();
    let mut values: Vec<String> = phone["values"]
        .as_array()
        .expect("values")
        .iter()
        .map(|v| v.to_string())
        .collect();
    values.sort();
    assert_eq!(values, vec!["\"2\"", "\"3\""]);
    assert_eq!(phone["value"], on_a["phone"]);

    // The record written back as shown (what a device or the cloud sends) is no choice:
    // the conflict stays.
    let path = format!("/v1/patients/{id}");
    let (status, _) = a
        .send(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"phone": phone["value"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, still) = a.get(&format!("{path}/conflicts")).await;
    assert!(
        still["conflicts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["field"] == json!("phone"))),
        "{still}"
    );
    // A person chooses, also the value shown: the conflict is settled, here and on the
    // other node once it has the choice.
    let (status, chosen) = a
        .send(
            reqwest::Method::POST,
            &format!("{path}/conflicts"),
            Some(json!({"field": "phone", "value": phone["value"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{chosen}");
    assert_eq!(chosen["phone"], phone["value"]);
    merge(&b.store, id, &a.store).await;
    for node in [&a, &b] {
        let (_, left) = node.get(&format!("{path}/conflicts")).await;
        assert!(
            left["conflicts"]
                .as_array()
                .is_some_and(|c| c.iter().all(|c| c["field"] != json!("phone"))),
            "{left}"
        );
        let (_, record) = node.get(&path).await;
        assert_eq!(record["phone"], phone["value"]);
    }
    // What is not a choice of a field is refused, naming what is wrong, and changes
    // nothing.
    for (body, named) in [
        (json!({"value": "4"}), "`field` is required"),
        (json!({"field": "phone"}), "`value` is required"),
        (
            json!({"field": "phone.x", "value": "4"}),
            "must be a string",
        ),
        (
            json!({"field": "nickname.first", "value": "4"}),
            "not a field of this record",
        ),
        (
            json!({"field": "phone", "value": "4", "sex": "x"}),
            "`sex` is not part of a choice",
        ),
        (
            json!({"field": "id", "value": "00000000-0000-4000-8000-000000000000"}),
            "ids cannot be changed",
        ),
    ] {
        let (status, refused) = a
            .send(
                reqwest::Method::POST,
                &format!("{path}/conflicts"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {refused}");
        let message = refused["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(named), "{body}: {refused}");
    }
    let (_, record) = a.get(&path).await;
    assert_eq!(record["phone"], phone["value"]);
}

/// Sends `from`'s document `id` to `to` as a peer would (its bytes with their
/// signatures) and checks that it merged.
async fn merge(to: &Store, id: DocId, from: &Store) {
    let payload = from
        .load_for_peer(&[id], &[])
        .expect("load")
        .pop()
        .expect("the document");
    let op = WriteOp::received(payload, Some("peer".into()), false);
    let out = to.write(WriteBatch::one(op)).await.expect("merge");
    let outcome = out.into_iter().next().expect("one").expect("merged");
    assert_eq!(outcome.held, None, "the peer's document merges");
}

#[tokio::test]
async fn bulk_import_reports_each_record() {
    let node = Node::start().await;
    let records = json!({"records": [
        {"given_name": "A"},
        {"date_of_birth": "not a date"},
        "not an object",
        {"given_name": "D", "id": DocId::new_v7().to_string()}
    ]});
    let (status, body) = node.post("/v1/patients/_import", records).await;
    assert_eq!(status, StatusCode::OK);
    let results = body["results"].as_array().expect("results");
    let ok: Vec<bool> = results.iter().map(|r| r["ok"] == json!(true)).collect();
    assert_eq!(ok, vec![true, false, false, true]);
    assert_eq!(results[1]["error"]["field"], json!("date_of_birth"));
    let (_, status_body) = node.get("/v1/status").await;
    assert_eq!(status_body["records"]["patients"], json!(2));
}

/// A disk that fills up on demand.
#[derive(Debug)]
struct FillableDisk {
    inner: Arc<redb::backends::InMemoryBackend>,
    full: Arc<AtomicBool>,
}

impl FillableDisk {
    fn check(&self) -> std::io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            Err(std::io::Error::from_raw_os_error(28))
        } else {
            Ok(())
        }
    }
}

impl redb::StorageBackend for FillableDisk {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.inner.write(offset, data)
    }
}

#[tokio::test]
async fn a_full_disk_answers_503_and_keeps_what_was_stored() {
    let full = Arc::new(AtomicBool::new(false));
    let memory = Arc::new(redb::backends::InMemoryBackend::new());
    let flag = full.clone();
    let store = Store::with_backend(
        move || FillableDisk {
            inner: memory.clone(),
            full: flag.clone(),
        },
        Schema::hikma(),
        StoreOptions::default(),
    )
    .expect("store");
    let node = Node::serve(store, "12D3KooWtest".into(), None).await;
    let (status, kept) = node
        .post("/v1/patients", json!({"given_name": "Kept"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    full.store(true, Ordering::SeqCst);
    let (status, body) = node
        .post("/v1/patients", json!({"given_name": "Refused"}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "disk_full"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Free some space"))
    );
    full.store(false, Ordering::SeqCst);
    let id = kept["id"].as_str().expect("id");
    let mut got = (StatusCode::SERVICE_UNAVAILABLE, Value::Null);
    for _ in 0..50 {
        got = node.get(&format!("/v1/patients/{id}")).await;
        if got.0 == StatusCode::OK {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(got.0, StatusCode::OK);
    assert_eq!(got.1["given_name"], json!("Kept"));
    let (_, list) = node.get("/v1/patients?given_name=Refused").await;
    assert_eq!(
        list["records"],
        json!([]),
        "the refused record left no trace"
    );
}

#[tokio::test]
async fn a_deployment_schema_file_adds_a_collection_without_recompiling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = dir.path().join("lab.json");
    std::fs::write(
        &schema,
        r#"{"collections": [{"name": "lab_reports", "fields": [
            {"name": "patient_id", "type": "id", "required": true, "index": "exact"},
            {"name": "test_name", "type": "string", "index": "prefix"},
            {"name": "result_value", "type": "number"}]}]}"#,
    )
    .expect("write schema");
    let data = dir.path().join("node");
    let opened = open_data_async(data.clone(), Some(schema.clone()))
        .await
        .expect("open with schema");
    let node = Node::serve(opened.store, opened.peer_id, None).await;
    let (status, _) = node
        .post(
            "/v1/lab_reports",
            json!({"patient_id": "p1", "test_name": "Hemoglobin", "result_value": 12.5}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = node
        .post(
            "/v1/lab_reports",
            json!({"patient_id": "p1", "result_value": "high"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("result_value"))
    );
    let (status, body) = node
        .post("/v1/lab_reports", json!({"test_name": "x"}))
        .await;
    assert_eq!(
        (status, body["error"]["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("patient_id"))
    );
    let (_, page) = node.get("/v1/lab_reports?test_name=hemo*").await;
    assert_eq!(page["records"].as_array().map(Vec::len), Some(1));
    let Node {
        api, store, http, ..
    } = node;
    drop(http);
    api.shutdown.cancel();
    let _ = api.task.await;
    drop(store);
    // The schema is kept in the data directory: the next start knows lab_reports.
    let reopened = open_data_async(data.clone(), None).await.expect("reopen");
    assert!(reopened.store.schema().collection("lab_reports").is_some());
    // A bad schema file is refused with its name.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"collections": [{"name": "patients"}]}"#).expect("write");
    let err = open_data_async(dir.path().join("other"), Some(bad.clone()))
        .await
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("bad.json"), "{err:#}");
}
