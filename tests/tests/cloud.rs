//! The reference cloud keeps the contract of `HIKMA_SYNC_API.md`, so that the gateway's
//! tests against it say something about the real cloud.

use medmesh_tests::cloud::Cloud;
use serde_json::{Value, json};

const CLINIC: &str = "0192f0c4-6a1e-7cc3-9d0e-5b8f1c2a3d4e";
const OTHER_CLINIC: &str = "0192f0c4-6a1e-7cc3-9d0e-5b8f1c2a3d99";
const USER: &str = "0192f0c4-6a1e-7cc3-9d0e-0000000000a1";

struct Hub {
    http: reqwest::Client,
    url: String,
    key: String,
}

impl Hub {
    async fn pull(&self, since: i64) -> (u16, Value) {
        let response = self
            .http
            .get(format!(
                "{}/api/v2/sync?last_pulled_at={since}&peerType=sync_hub",
                self.url
            ))
            .bearer_auth(&self.key)
            .send()
            .await
            .expect("pull");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn push(&self, body: Value) -> (u16, Value, Option<String>) {
        let response = self
            .http
            .post(format!("{}/api/v2/sync?last_pulled_at=0", self.url))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .expect("push");
        let status = response.status().as_u16();
        let retry = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (status, response.json().await.unwrap_or(Value::Null), retry)
    }
}

async fn hub() -> (Cloud, Hub) {
    let cloud = Cloud::new();
    cloud.put("clinics", json!({"id": CLINIC, "name": "Kano"}));
    cloud.put("clinics", json!({"id": OTHER_CLINIC, "name": "Jos"}));
    let key = cloud.add_hub_key(&[CLINIC]);
    let addr = cloud
        .serve("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve");
    (
        cloud,
        Hub {
            http: reqwest::Client::new(),
            url: format!("http://{addr}"),
            key,
        },
    )
}

fn ids(changes: &Value, table: &str, kind: &str) -> Vec<String> {
    changes["changes"][table][kind]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r.as_str().or(r["id"].as_str()).unwrap_or("").to_owned())
        .collect()
}

fn patient(id: &str, clinic: Option<&str>, updated_at: i64) -> Value {
    json!({"id": id, "given_name": "Amina", "surname": "Okafor", "date_of_birth": "1992-03-05",
           "primary_clinic_id": clinic, "created_at": updated_at, "updated_at": updated_at,
           "additional_data": "{\"blood\":\"O+\"}"})
}

#[tokio::test]
async fn delta_rules_scope_and_value_forms() {
    let (cloud, hub) = hub().await;
    let (a, b, c) = (
        "0192f0c4-6a1e-7cc3-9d0e-000000000001",
        "0192f0c4-6a1e-7cc3-9d0e-000000000002",
        "0192f0c4-6a1e-7cc3-9d0e-000000000003",
    );
    let t0 = 1_767_000_000_000i64;
    let (status, _, _) = hub
        .push(json!({"patients": {"created": [
            patient(a, Some(CLINIC), t0), patient(b, Some(OTHER_CLINIC), t0), patient(c, None, t0)
        ], "updated": [], "deleted": []}}))
        .await;
    assert_eq!(status, 200);
    let (status, first) = hub.pull(0).await;
    assert_eq!(status, 200);
    // Only the key's clinic; a patient without a clinic never comes back.
    assert_eq!(ids(&first, "patients", "created"), vec![a.to_owned()]);
    assert_eq!(ids(&first, "clinics", "created"), vec![CLINIC.to_owned()]);
    let row = &first["changes"]["patients"]["created"][0];
    assert_eq!(row["updated_at"], json!("2025-12-29T09:20:00.000Z"));
    assert_eq!(row["additional_data"], json!({"blood": "O+"}));
    // A date comes back as the server's midnight (UTC+3), written in UTC.
    assert_eq!(row["date_of_birth"], json!("1992-03-04T21:00:00.000Z"));
    for table in medmesh_tests::cloud::hub_tables() {
        for kind in ["created", "updated", "deleted"] {
            assert!(first["changes"][table][kind].is_array(), "{table}.{kind}");
        }
    }
    let t1 = first["timestamp"].as_i64().expect("timestamp");
    let (_, quiet) = hub.pull(t1).await;
    assert!(ids(&quiet, "patients", "created").is_empty());
    assert!(ids(&quiet, "patients", "updated").is_empty());

    // Last writer wins on a strictly newer updated_at; an older row is dropped silently.
    let (status, _, _) = hub
        .push(json!({"patients": {"created": [], "updated": [
            json!({"id": a, "given_name": "Stale", "updated_at": t0 - 1, "primary_clinic_id": CLINIC})
        ], "deleted": []}}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        cloud.row("patients", a).expect("row")["given_name"],
        json!("Amina")
    );
    // A newer one replaces the whole row: a column it lacks is gone.
    hub.push(json!({"patients": {"created": [], "updated": [
        json!({"id": a, "given_name": "Newer", "updated_at": t0 + 1, "primary_clinic_id": CLINIC})
    ], "deleted": []}}))
        .await;
    let row = cloud.row("patients", a).expect("row");
    assert_eq!(row["given_name"], json!("Newer"));
    assert!(row.get("surname").is_none());
    let (_, later) = hub.pull(t1).await;
    assert_eq!(ids(&later, "patients", "updated"), vec![a.to_owned()]);
    let t2 = later["timestamp"].as_i64().expect("timestamp");

    // Soft deletes: listed as deleted after T, never when T = 0.
    hub.push(json!({"patients": {"created": [], "updated": [], "deleted": [a]}}))
        .await;
    assert!(cloud.is_deleted("patients", a));
    let (_, after_delete) = hub.pull(t2).await;
    assert_eq!(
        ids(&after_delete, "patients", "deleted"),
        vec![a.to_owned()]
    );
    let (_, everything) = hub.pull(0).await;
    assert!(ids(&everything, "patients", "deleted").is_empty());
    assert!(ids(&everything, "patients", "created").is_empty());
}

#[tokio::test]
async fn the_inventory_trigger_counts_a_dispense_once_and_a_bad_row_fails_the_rest() {
    let (cloud, hub) = hub().await;
    let (drug, item, batch, person) = (
        "0192f0c4-6a1e-7cc3-9d0e-00000000d001",
        "0192f0c4-6a1e-7cc3-9d0e-00000000a001",
        "0192f0c4-6a1e-7cc3-9d0e-00000000b001",
        "0192f0c4-6a1e-7cc3-9d0e-000000000010",
    );
    cloud.put(
        "clinic_inventory",
        json!({"id": item, "clinic_id": CLINIC, "drug_id": drug, "batch_id": batch, "quantity_available": 40}),
    );
    cloud.put("patients", patient(person, Some(CLINIC), 1_767_000_000_000));
    cloud.put(
        "users",
        json!({"id": USER, "name": "Pharmacist", "role": "provider", "clinic_id": CLINIC}),
    );
    let dispense = |id: &str, quantity: i64, updated: i64| {
        json!({"id": id, "clinic_id": CLINIC, "drug_id": drug, "batch_id": batch,
               "patient_id": person, "quantity_dispensed": quantity, "dispensed_by": USER,
               "dispensed_at": updated, "updated_at": updated})
    };
    let d1 = "0192f0c4-6a1e-7cc3-9d0e-0000000000e1";
    let body = json!({"dispensing_records": {"created": [dispense(d1, 5, 1_767_000_000_000)], "updated": [], "deleted": []}});
    assert_eq!(hub.push(body.clone()).await.0, 200);
    assert_eq!(hub.push(body).await.0, 200);
    // A re-push with another quantity changes the record, never the stock.
    hub.push(json!({"dispensing_records": {"created": [], "updated": [dispense(d1, 9, 1_767_000_000_500)], "deleted": []}}))
        .await;
    assert_eq!(
        cloud.row("clinic_inventory", item).expect("item")["quantity_available"],
        json!(35)
    );
    assert_eq!(
        cloud.row("dispensing_records", d1).expect("record")["quantity_dispensed"],
        json!(9)
    );

    // A row missing a required column fails the push there: rows before it are kept,
    // the rest are not processed.
    let (ok, bad, after) = (
        "0192f0c4-6a1e-7cc3-9d0e-0000000000e2",
        "0192f0c4-6a1e-7cc3-9d0e-0000000000e3",
        "0192f0c4-6a1e-7cc3-9d0e-0000000000e4",
    );
    let mut broken = dispense(bad, 1, 1_767_000_001_000);
    broken["dispensed_by"] = Value::Null;
    let (status, answer, _) = hub
        .push(json!({"dispensing_records": {"created": [
            dispense(ok, 1, 1_767_000_001_000), broken, dispense(after, 1, 1_767_000_001_000)
        ], "updated": [], "deleted": []}}))
        .await;
    assert_eq!(status, 500);
    assert_eq!(
        answer,
        json!({"status": 500, "unhandled": true, "message": "HTTPError"})
    );
    assert!(cloud.row("dispensing_records", ok).is_some());
    assert!(cloud.row("dispensing_records", after).is_none());
    // A user column must name a user of the cloud.
    let mut stranger = dispense(after, 1, 1_767_000_002_000);
    stranger["dispensed_by"] = json!("12D3KooW-a-device");
    let (status, _, _) = hub
        .push(json!({"dispensing_records": {"created": [stranger], "updated": [], "deleted": []}}))
        .await;
    assert_eq!(status, 500);
}

#[tokio::test]
async fn keys_and_the_rate_limit() {
    let (cloud, hub) = hub().await;
    let stranger = Hub {
        http: reqwest::Client::new(),
        url: hub.url.clone(),
        key: format!("hh_{}", "0".repeat(64)),
    };
    let (status, answer) = stranger.pull(0).await;
    assert_eq!((status, answer), (401, json!({"error": "Unauthorized"})));
    let verify = |key: &str| {
        hub.http
            .post(format!("{}/api/hub/verify-key", hub.url))
            .json(&json!({"api_key": key}))
            .send()
    };
    let answer: Value = verify(&hub.key)
        .await
        .expect("verify")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["clinic_ids"], json!([CLINIC]));
    assert_eq!(verify(&stranger.key).await.expect("verify").status(), 401);

    cloud.set_rate_limit(3, 42);
    for _ in 0..3 {
        assert_eq!(hub.pull(0).await.0, 200);
    }
    let (status, answer, retry) = hub.push(json!({})).await;
    assert_eq!(status, 429);
    assert_eq!(
        answer,
        json!({"error": "Too many requests. Please try again later."})
    );
    assert_eq!(retry.as_deref(), Some("42"));
}
