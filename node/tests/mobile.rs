//! The Hikma app's sync on a node, driven as WatermelonDB's `synchronize()` drives it:
//! sign-in, pulls with the timestamp handed back, pushes of created, updated (with
//! `_changed`) and deleted rows, re-pushed batches, a timestamp from elsewhere.

use base64::Engine;
mod common;

use medmesh::server::RunningApi;
use reqwest::StatusCode;
use serde_json::{Value, json};

const EMAIL: &str = "amina@kano.clinic";
const PASSWORD: &str = "correct horse battery";

struct Node {
    api: RunningApi,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start() -> Self {
        let (api, dir) = common::serve_fresh_node().await;
        let node = Self {
            api,
            http: common::http(),
            _dir: dir,
        };
        let hashed = medmesh::users::hash_password(PASSWORD).expect("hash");
        let (status, created) = node
            .send(
                reqwest::Method::POST,
                "/v1/users",
                // An admin: these tests push visits, prescriptions and dispenses alike
                // (what each role may push is in the access tests).
                Some(json!({"email": EMAIL, "name": "Amina", "role": "admin", "hashed_password": hashed})),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(created["hashed_password"], json!("************"));
        node
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api.addr)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        auth: Option<(&str, &str)>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some((email, password)) = auth {
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{email}:{password}"));
            request = request.header("authorization", format!("Basic {token}"));
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A pull as the app makes it.
    async fn pull(&self, last_pulled_at: Option<i64>) -> (Value, i64) {
        let path = match last_pulled_at {
            Some(t) => format!("/api/v2/sync?last_pulled_at={t}&schema_version=1&migration=null"),
            None => "/api/v2/sync?last_pulled_at=null&schema_version=1&migration=null".to_owned(),
        };
        let (status, answer) = self
            .send(reqwest::Method::GET, &path, None, Some((EMAIL, PASSWORD)))
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["success"], json!(true));
        let tables = answer["changes"].as_object().expect("changes");
        assert_eq!(tables.len(), 18, "every table the app pulls");
        for (table, changes) in tables {
            for part in ["created", "updated", "deleted"] {
                assert!(changes[part].is_array(), "{table}.{part}");
            }
        }
        let timestamp = answer["timestamp"].as_i64().expect("timestamp");
        (answer["changes"].clone(), timestamp)
    }

    async fn push(&self, last_pulled_at: i64, changes: Value) {
        let (status, answer) = self
            .send(
                reqwest::Method::POST,
                &format!("/api/v2/sync?last_pulled_at={last_pulled_at}"),
                Some(changes),
                Some((EMAIL, PASSWORD)),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer, json!({"success": true}));
    }

    async fn get(&self, path: &str) -> Value {
        self.send(reqwest::Method::GET, path, None, None).await.1
    }

    async fn feed_position(&self) -> u64 {
        self.get("/v1/status").await["feed"]["seq"]
            .as_u64()
            .expect("seq")
    }
}

fn ids(rows: &Value) -> Vec<String> {
    rows.as_array()
        .into_iter()
        .flatten()
        .map(|r| r.as_str().or(r["id"].as_str()).unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn sign_in_is_the_clouds_and_wrong_credentials_get_its_401() {
    let node = Node::start().await;
    for auth in [
        None,
        Some((EMAIL, "wrong")),
        Some(("nobody@x.org", PASSWORD)),
    ] {
        let (status, answer) = node
            .send(reqwest::Method::GET, "/api/v2/sync", None, auth)
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer, json!({"error": "Unauthorized"}));
    }
    // The email in another case signs in too.
    let (status, _) = node
        .send(
            reqwest::Method::GET,
            "/api/v2/sync",
            None,
            Some(("Amina@Kano.Clinic", PASSWORD)),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, user) = node
        .send(
            reqwest::Method::POST,
            "/api/login",
            Some(json!({"email": EMAIL, "password": PASSWORD})),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{user}");
    assert_eq!(user["name"], json!("Amina"));
    assert_eq!(user["hashed_password"], json!("************"));
    assert!(user["token"].as_str().is_some_and(|t| !t.is_empty()));
    let (status, answer) = node
        .send(
            reqwest::Method::POST,
            "/api/login",
            Some(json!({"email": EMAIL, "password": "nope"})),
            None,
        )
        .await;
    assert_eq!((status, answer), (StatusCode::UNAUTHORIZED, json!({})));
    // The generic API never shows a password hash.
    let users = node.get("/v1/users").await;
    assert_eq!(
        users["records"][0]["hashed_password"],
        json!("************")
    );
}

#[tokio::test]
async fn pulls_are_deltas_in_the_apps_forms_and_pushes_are_field_level() {
    let node = Node::start().await;
    let (status, patient) = node
        .send(
            reqwest::Method::POST,
            "/v1/patients",
            Some(
                json!({"given_name": "Bola", "surname": "Bello", "date_of_birth": "1990-04-02",
                        "metadata": {"source": "registration"}}),
            ),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = patient["id"].as_str().expect("id").to_owned();

    // First pull: everything, in the app's forms.
    let (changes, t1) = node.pull(None).await;
    let row = &changes["patients"]["created"][0];
    assert_eq!(row["id"], json!(id));
    assert!(row["created_at"].is_i64(), "timestamps as epoch ms: {row}");
    assert!(row["updated_at"].is_i64());
    assert_eq!(row["date_of_birth"], json!("1990-04-02"));
    assert_eq!(row["metadata"], json!("{\"source\":\"registration\"}"));
    assert!(row.get("_status").is_none() && row.get("_changed").is_none());
    assert_eq!(changes["patients"]["deleted"], json!([]));

    // Nothing changed: an empty answer, and a later timestamp.
    let (changes, t2) = node.pull(Some(t1)).await;
    assert!(t2 > t1, "timestamps strictly increase");
    assert!(ids(&changes["patients"]["created"]).is_empty());
    assert!(ids(&changes["patients"]["updated"]).is_empty());

    // Changed on the node (another device, say): an update in the next pull.
    let (status, _) = node
        .send(
            reqwest::Method::PATCH,
            &format!("/v1/patients/{id}"),
            Some(json!({"phone": "+234 803 555 0101"})),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (changes, t3) = node.pull(Some(t2)).await;
    assert_eq!(ids(&changes["patients"]["updated"]), vec![id.clone()]);
    assert!(ids(&changes["patients"]["created"]).is_empty());

    // The app changed the surname on its stale copy (it never saw the phone, and still
    // has the old given name): only the columns in `_changed` are written.
    let mut stale = row.clone();
    stale["surname"] = json!("Bello-Okafor");
    stale["given_name"] = json!("Old name the app still holds");
    stale["phone"] = Value::Null;
    stale["_status"] = json!("updated");
    stale["_changed"] = json!("surname,updated_at");
    let new_id = uuid::Uuid::now_v7().to_string();
    let created = json!({"id": new_id, "given_name": "Chidi", "surname": "Obi",
        "date_of_birth": "2001-09-30", "created_at": 1_764_000_000_000i64,
        "updated_at": 1_764_000_000_000i64, "metadata": "{}", "_status": "created", "_changed": ""});
    let push = json!({
        "patients": {"created": [created], "updated": [stale], "deleted": []},
        "visits": {"created": [], "updated": [], "deleted": []},
        "not_a_table": {"created": [{"id": "x"}], "updated": [], "deleted": []},
    });
    node.push(t3, push.clone()).await;
    let merged = node.get(&format!("/v1/patients/{id}")).await;
    assert_eq!(merged["surname"], json!("Bello-Okafor"));
    assert_eq!(merged["given_name"], json!("Bola"), "not in _changed: kept");
    assert_eq!(
        merged["phone"],
        json!("+234 803 555 0101"),
        "the mesh's newer value kept"
    );
    assert!(merged.get("_changed").is_none() && merged.get("_status").is_none());
    let pushed = node.get(&format!("/v1/patients/{new_id}")).await;
    assert_eq!(pushed["given_name"], json!("Chidi"));
    assert!(
        pushed["created_at"].is_string(),
        "stored in the node's form: {pushed}"
    );

    // The same batch again changes nothing.
    let before = node.feed_position().await;
    node.push(t3, push).await;
    assert_eq!(
        node.feed_position().await,
        before,
        "a re-pushed batch is a no-op"
    );

    // A delete from the app is a tombstone, and a delete in the next pull of others.
    node.push(
        t3,
        json!({"patients": {"created": [], "updated": [], "deleted": [new_id]}}),
    )
    .await;
    let tombstone = node.get(&format!("/v1/patients/{new_id}")).await;
    assert!(tombstone["deleted_at"].is_string(), "{tombstone}");
    let (changes, _) = node.pull(Some(t3)).await;
    assert!(ids(&changes["patients"]["deleted"]).contains(&new_id));

    // A timestamp this node did not hand out (another node's, or from the future): the
    // whole live state, never a partial answer.
    for foreign in [t3 + 7, 4_102_444_800_000] {
        let (changes, _) = node.pull(Some(foreign)).await;
        assert_eq!(
            ids(&changes["patients"]["created"]),
            vec![id.clone()],
            "{foreign}"
        );
    }
}

#[tokio::test]
async fn a_dispense_pushed_by_the_app_is_counted_once() {
    let node = Node::start().await;
    let (_, clinic) = node
        .send(
            reqwest::Method::POST,
            "/v1/clinics",
            Some(json!({"name": "Kano"})),
            None,
        )
        .await;
    let clinic = clinic["id"].as_str().expect("clinic").to_owned();
    let (status, item) = node
        .send(
            reqwest::Method::POST,
            "/v1/pharmacy/restock",
            Some(
                json!({"clinic_id": clinic, "drug_name": "Amoxicillin 250mg", "batch_number": "A1",
                        "expiry_date": "2031-01-31", "quantity": 100}),
            ),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{item}");
    let drug = item["drug_id"].as_str().expect("drug").to_owned();
    let stock = item["stock_item_id"].as_str().expect("item").to_owned();
    let (_, patient) = node
        .send(
            reqwest::Method::POST,
            "/v1/patients",
            Some(json!({"given_name": "Dayo"})),
            None,
        )
        .await;
    let record = uuid::Uuid::now_v7().to_string();
    let push = json!({"dispensing_records": {"created": [{
        "id": record, "clinic_id": clinic, "drug_id": drug, "batch_id": stock,
        "patient_id": patient["id"], "quantity_dispensed": 12, "dispensed_by": "amina",
        "dispensed_at": 1_764_000_000_000i64, "_status": "created", "_changed": ""}],
        "updated": [], "deleted": []}});
    let (_, t) = node.pull(None).await;
    for _ in 0..3 {
        node.push(t, push.clone()).await;
    }
    let stock_now = node
        .get(&format!(
            "/v1/pharmacy/stock?clinic_id={clinic}&drug_id={drug}"
        ))
        .await;
    assert_eq!(stock_now["items"][0]["quantity"], json!(88), "{stock_now}");
    let trail = node
        .get(&format!(
            "/v1/inventory_transactions?stock_item_id={stock}&limit=100"
        ))
        .await;
    let dispenses = trail["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|t| t["transaction_type"] == json!("dispense"))
        .count();
    assert_eq!(
        dispenses, 1,
        "one movement for one pushed dispense: {trail}"
    );
    assert_eq!(
        node.get("/v1/pharmacy/verify").await["mismatches"],
        json!([])
    );
    // The app sees the stock it left.
    let (changes, _) = node.pull(None).await;
    let row = changes["clinic_inventory"]["created"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["id"] == json!(stock))
        .cloned()
        .expect("the stock item");
    assert_eq!(row["quantity_available"], json!(88));
}
