//! The pharmacy through the HTTP API: restock, FEFO dispensing, counts, adjustments,
//! alerts, prescriptions, drug search, and the stock invariant.

mod common;

use medmesh::server::RunningApi;
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Node {
    api: RunningApi,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start() -> Self {
        let (api, dir) = common::serve_fresh_node().await;
        Self {
            api,
            http: common::http(),
            _dir: dir,
        }
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("http://{}{path}", self.api.addr))
            .json(&body)
            .send()
            .await
            .expect("post");
        (r.status(), r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("http://{}{path}", self.api.addr))
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json")
    }

    async fn clinic(&self) -> String {
        let (status, clinic) = self
            .post("/v1/clinics", json!({"name": "Kano Outreach"}))
            .await;
        assert_eq!(status, StatusCode::CREATED);
        clinic["id"].as_str().expect("id").to_owned()
    }
}

fn quantities(stock: &Value) -> Vec<(String, i64)> {
    stock["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            (
                i["batch_number"].as_str().unwrap_or("").to_owned(),
                i["quantity"].as_i64().unwrap_or(i64::MIN),
            )
        })
        .collect()
}

#[tokio::test]
async fn restock_by_name_then_dispense_earliest_expiry_first_across_batches() {
    let node = Node::start().await;
    let clinic = node.clinic().await;
    let (status, first) = node
        .post("/v1/pharmacy/restock", json!({"clinic_id": clinic, "drug_name": "Paracetamol 500mg tablets", "batch_number": "late-1", "expiry_date": "2031-01-31", "quantity": 100}))
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    // Another spelling of the same drug: the same drug, not a new one.
    let (status, second) = node
        .post("/v1/pharmacy/restock", json!({"clinic_id": clinic, "drug_name": "paracetamol 500 MG  Tablets", "batch_number": "EARLY-1", "expiry_date": "2030-06-30", "quantity": 30, "reorder_level": 10}))
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(first["drug_id"], second["drug_id"]);
    let drug = first["drug_id"].as_str().expect("drug").to_owned();
    let found = node.get("/v1/drug_catalogue?limit=10").await;
    assert_eq!(
        found["records"].as_array().map(Vec::len),
        Some(1),
        "one drug: {found}"
    );

    // 45 units: all 30 of the earliest batch, then 15 of the next.
    let (status, dispensed) = node
        .post(
            "/v1/pharmacy/dispense",
            json!({"clinic_id": clinic, "drug_id": drug, "quantity": 45}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dispensed}");
    let taken: Vec<(String, i64)> = dispensed["taken"]
        .as_array()
        .expect("taken")
        .iter()
        .map(|t| {
            (
                t["batch_number"].as_str().unwrap_or("").to_owned(),
                t["quantity"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        taken,
        vec![("EARLY-1".to_owned(), 30), ("LATE-1".to_owned(), 15)]
    );
    assert_eq!(dispensed["negative_stock"], json!(false));
    assert_eq!(
        dispensed["dispensing_record_ids"].as_array().map(Vec::len),
        Some(2)
    );
    let stock = node
        .get(&format!(
            "/v1/pharmacy/stock?clinic_id={clinic}&drug_id={drug}"
        ))
        .await;
    assert_eq!(
        quantities(&stock),
        vec![("EARLY-1".to_owned(), 0), ("LATE-1".to_owned(), 85)]
    );
    assert_eq!(
        stock["items"][0]["drug_name"],
        json!("Paracetamol 500mg tablets")
    );
    assert_eq!(stock["items"][0]["reorder_level"], json!(10));

    // More than there is: the shelf is the truth; the answer says the stock went negative.
    let (status, over) = node
        .post(
            "/v1/pharmacy/dispense",
            json!({"clinic_id": clinic, "drug_name": "Paracetamol 500mg tablets", "quantity": 90}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{over}");
    assert_eq!(over["negative_stock"], json!(true));
    assert!(
        over["warning"]
            .as_str()
            .is_some_and(|w| w.contains("negative"))
    );
    let stock = node
        .get(&format!("/v1/pharmacy/stock?clinic_id={clinic}"))
        .await;
    assert_eq!(
        quantities(&stock),
        vec![("EARLY-1".to_owned(), 0), ("LATE-1".to_owned(), -5)]
    );

    // A count records the difference to the local view; an adjustment writes off.
    let (status, counted) = node.post("/v1/pharmacy/count", json!({"clinic_id": clinic, "drug_id": drug, "batch_number": "late-1", "counted_quantity": 12})).await;
    assert_eq!(status, StatusCode::OK, "{counted}");
    assert_eq!(counted["adjustment"], json!(17));
    let (status, _) = node.post("/v1/pharmacy/adjust", json!({"clinic_id": clinic, "drug_id": drug, "batch_number": "LATE-1", "quantity_change": -2, "reason": "damaged in transport"})).await;
    assert_eq!(status, StatusCode::OK);
    let stock = node
        .get(&format!("/v1/pharmacy/stock?clinic_id={clinic}"))
        .await;
    assert_eq!(
        quantities(&stock),
        vec![("EARLY-1".to_owned(), 0), ("LATE-1".to_owned(), 10)]
    );

    // Every movement is in the audit trail, and the quantities add up.
    let trail = node.get("/v1/inventory_transactions?limit=100").await;
    assert_eq!(
        trail["records"].as_array().map(Vec::len),
        Some(7),
        "2 restocks, 2 + 1 dispenses, 1 count, 1 adjustment: {trail}"
    );
    let verify = node.get("/v1/pharmacy/verify").await;
    assert_eq!(verify["mismatches"], json!([]), "{verify}");
    assert_eq!(verify["stock_items"], json!(2));
}

#[tokio::test]
async fn expired_batches_are_skipped_or_refused_and_alerts_report_them() {
    let node = Node::start().await;
    let clinic = node.clinic().await;
    let today = chrono::Utc::now().date_naive();
    let day = |d: i64| (today + chrono::Duration::days(d)).to_string();
    for (batch, expiry, quantity) in [
        ("OLD", day(-10), 20),
        ("SOON", day(20), 5),
        ("LATER", day(400), 50),
    ] {
        let (status, _) = node.post("/v1/pharmacy/restock", json!({"clinic_id": clinic, "drug_name": "Amoxicillin 250mg capsules", "batch_number": batch, "expiry_date": expiry, "quantity": quantity, "reorder_level": 8})).await;
        assert_eq!(status, StatusCode::OK);
    }
    // FEFO skips the expired batch.
    let (_, dispensed) = node
        .post(
            "/v1/pharmacy/dispense",
            json!({"clinic_id": clinic, "drug_name": "amoxicillin 250 mg capsule", "quantity": 3}),
        )
        .await;
    assert_eq!(dispensed["taken"][0]["batch_number"], json!("SOON"));
    // Asking for the expired batch is refused, naming the field, unless allowed.
    let (status, refused) = node.post("/v1/pharmacy/dispense", json!({"clinic_id": clinic, "drug_name": "Amoxicillin 250mg capsules", "quantity": 1, "batch_number": "old"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refused["error"]["field"], json!("batch_number"));
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("expired"))
    );
    let (status, _) = node.post("/v1/pharmacy/dispense", json!({"clinic_id": clinic, "drug_name": "Amoxicillin 250mg capsules", "quantity": 1, "batch_number": "old", "allow_expired": true})).await;
    assert_eq!(status, StatusCode::OK);
    let alerts = node
        .get(&format!(
            "/v1/pharmacy/alerts?clinic_id={clinic}&within_days=30"
        ))
        .await;
    let batches = |key: &str| -> Vec<String> {
        alerts[key]
            .as_array()
            .expect(key)
            .iter()
            .map(|i| i["batch_number"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(batches("expired_with_stock"), vec!["OLD"]);
    assert_eq!(batches("expiring_soon"), vec!["SOON"]);
    assert_eq!(
        batches("low_stock"),
        vec!["SOON"],
        "2 left, reorder level 8"
    );
    assert!(batches("negative_stock").is_empty());
}

#[tokio::test]
async fn bad_requests_name_the_field_and_change_nothing() {
    let node = Node::start().await;
    let clinic = node.clinic().await;
    let (status, _) = node.post("/v1/pharmacy/restock", json!({"clinic_id": clinic, "drug_name": "Zinc 20mg", "batch_number": "Z1", "expiry_date": "2030-01-01", "quantity": 10})).await;
    assert_eq!(status, StatusCode::OK);
    let cases = [
        (
            json!({"clinic_id": clinic, "drug_name": "Zinc 20mg", "batch_number": "Z1", "quantity": 0}),
            "quantity",
        ),
        (
            json!({"clinic_id": clinic, "drug_name": "Zinc 20mg", "batch_number": "Z1", "quantity": 2.5}),
            "quantity",
        ),
        (
            json!({"clinic_id": clinic, "drug_name": "Zinc 20mg", "batch_number": "Z1", "quantity": "5"}),
            "quantity",
        ),
        (
            json!({"clinic_id": clinic, "drug_name": "Zinc 20mg", "batch_number": "Z1", "expiry_date": "31/01/2030", "quantity": 5}),
            "expiry_date",
        ),
        (
            json!({"clinic_id": "0192f0c4-6a1e-7cc3-9d0e-5b8f1c2a3d4e", "drug_name": "Zinc 20mg", "batch_number": "Z1", "quantity": 5}),
            "clinic_id",
        ),
        (
            json!({"clinic_id": clinic, "drug_id": "0192f0c4-6a1e-7cc3-9d0e-5b8f1c2a3d4e", "batch_number": "Z1", "quantity": 5}),
            "drug_id",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = node.post("/v1/pharmacy/restock", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer["error"]["field"], json!(field), "{answer}");
    }
    let (status, answer) = node.post("/v1/pharmacy/count", json!({"clinic_id": clinic, "drug_name": "Zinc 20mg", "batch_number": "NOPE", "counted_quantity": 3})).await;
    assert_eq!(
        (status, answer["error"]["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("batch_number"))
    );
    let (status, answer) = node.post("/v1/pharmacy/adjust", json!({"clinic_id": clinic, "drug_name": "Zinc 20mg", "batch_number": "Z1", "quantity_change": -1})).await;
    assert_eq!(
        (status, answer["error"]["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("reason"))
    );
    let (status, answer) = node.post("/v1/pharmacy/dispense", json!({"clinic_id": clinic, "drug_name": "Zinc 20mg", "quantity": 1, "prescription_item_id": "0192f0c4-6a1e-7cc3-9d0e-5b8f1c2a3d4e"})).await;
    assert_eq!(
        (status, answer["error"]["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("prescription_item_id"))
    );
    // Nothing of the refused requests was stored.
    let stock = node
        .get(&format!("/v1/pharmacy/stock?clinic_id={clinic}"))
        .await;
    assert_eq!(quantities(&stock), vec![("Z1".to_owned(), 10)]);
    let trail = node.get("/v1/inventory_transactions").await;
    assert_eq!(trail["records"].as_array().map(Vec::len), Some(1));
    let records = node.get("/v1/dispensing_records").await;
    assert_eq!(records["records"], json!([]));
}

#[tokio::test]
async fn prescriptions_are_dispensed_and_refills_counted() {
    let node = Node::start().await;
    let clinic = node.clinic().await;
    let (_, restocked) = node.post("/v1/pharmacy/restock", json!({"clinic_id": clinic, "drug_name": "Metformin 500mg tablets", "batch_number": "M1", "expiry_date": "2030-01-01", "quantity": 500})).await;
    let drug = restocked["drug_id"].as_str().expect("drug").to_owned();
    let (_, patient) = node
        .post("/v1/patients", json!({"given_name": "Bola"}))
        .await;
    let (_, prescription) = node
        .post(
            "/v1/prescriptions",
            json!({"patient_id": patient["id"], "provider_id": "dr-1", "status": "active"}),
        )
        .await;
    let (_, item) = node
        .post("/v1/prescription_items", json!({"prescription_id": prescription["id"], "patient_id": patient["id"], "drug_id": drug, "quantity_prescribed": 60, "refills_authorized": 1, "dosage_instructions": "1 tablet twice a day"}))
        .await;
    let item_id = item["id"].as_str().expect("item").to_owned();
    let dispense = |q: i64| json!({"clinic_id": clinic, "drug_id": drug, "quantity": q, "prescription_item_id": item_id, "patient_id": patient["id"]});
    let (status, _) = node.post("/v1/pharmacy/dispense", dispense(30)).await;
    assert_eq!(status, StatusCode::OK);
    let got = node.get(&format!("/v1/prescription_items/{item_id}")).await;
    assert_eq!(
        (
            got["quantity_dispensed"].clone(),
            got["item_status"].clone()
        ),
        (json!(30), json!("partially_dispensed"))
    );
    node.post("/v1/pharmacy/dispense", dispense(30)).await;
    let got = node.get(&format!("/v1/prescription_items/{item_id}")).await;
    assert_eq!(
        (
            got["quantity_dispensed"].clone(),
            got["item_status"].clone()
        ),
        (json!(60), json!("dispensed"))
    );
    // The refill.
    let (status, _) = node.post("/v1/pharmacy/dispense", dispense(60)).await;
    assert_eq!(status, StatusCode::OK);
    let got = node.get(&format!("/v1/prescription_items/{item_id}")).await;
    assert_eq!(
        (
            got["refills_used"].clone(),
            got["quantity_dispensed"].clone()
        ),
        (json!(1), json!(120))
    );
    // No refills left.
    let (status, answer) = node.post("/v1/pharmacy/dispense", dispense(60)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no refills left"))
    );
    let records = node
        .get(&format!(
            "/v1/dispensing_records?prescription_item_id={item_id}"
        ))
        .await;
    assert_eq!(records["records"].as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn drug_search_autocompletes_with_typos() {
    let node = Node::start().await;
    for name in [
        "Paracetamol 500mg tablets",
        "Paracetamol 120mg/5ml syrup",
        "Amoxicillin 250mg capsules",
        "Ibuprofen 400mg tablets",
    ] {
        let (status, _) = node
            .post("/v1/drug_catalogue", json!({"generic_name": name}))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let names = |v: &Value| -> Vec<String> {
        v["drugs"]
            .as_array()
            .expect("drugs")
            .iter()
            .map(|d| d["name"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(names(&node.get("/v1/drugs/search?q=para").await).len(), 2);
    assert_eq!(
        names(&node.get("/v1/drugs/search?q=ibuprofin").await),
        vec!["Ibuprofen 400mg tablets"]
    );
    assert_eq!(
        names(&node.get("/v1/drugs/search?q=amoxi%20250").await),
        vec!["Amoxicillin 250mg capsules"]
    );
}

impl Node {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("http://{}{path}", self.api.addr));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let r = request.send().await.expect("request");
        (r.status(), r.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn stock_its_trail_and_prescription_counters_change_only_through_the_pharmacy() {
    use reqwest::Method;
    let node = Node::start().await;
    let clinic = node.clinic().await;
    let (_, stocked) = node
        .post(
            "/v1/pharmacy/restock",
            json!({"clinic_id": clinic, "drug_name": "Amoxicillin 250mg", "batch_number": "A1", "quantity": 10}),
        )
        .await;
    let item = stocked["stock_item_id"].as_str().expect("item").to_owned();
    let refused = |(status, body): (StatusCode, Value), pointer: &str| {
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["error"]["code"], json!("managed_record"));
        let message = body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(pointer), "{message}");
    };
    let item_path = format!("/v1/clinic_inventory/{item}");
    refused(
        node.send(
            Method::PATCH,
            &item_path,
            Some(json!({"quantity_available": 500})),
        )
        .await,
        "/v1/pharmacy/",
    );
    refused(
        node.send(Method::PUT, &item_path, Some(json!({"clinic_id": clinic})))
            .await,
        "/v1/pharmacy/",
    );
    refused(
        node.send(Method::DELETE, &item_path, None).await,
        "/v1/pharmacy/",
    );
    refused(
        node.send(
            Method::POST,
            "/v1/clinic_inventory",
            Some(json!({"id": item, "clinic_id": clinic})),
        )
        .await,
        "/v1/pharmacy/restock",
    );
    refused(
        node.send(
            Method::POST,
            "/v1/inventory_transactions",
            Some(json!({"quantity_change": 5})),
        )
        .await,
        "audit trail",
    );
    refused(
        node.send(
            Method::POST,
            "/v1/clinic_inventory/_import",
            Some(json!({"records": [{}]})),
        )
        .await,
        "/v1/pharmacy/",
    );
    refused(
        node.send(Method::POST, "/v1/_schema", Some(json!({})))
            .await,
        "--schema",
    );
    // A prescription item: other fields by PATCH, counters only by dispensing.
    let (_, prescription) = node
        .post("/v1/prescriptions", json!({"patient_id": "p-1"}))
        .await;
    let (status, line) = node
        .post(
            "/v1/prescription_items",
            json!({"prescription_id": prescription["id"], "patient_id": "p-1", "quantity_prescribed": 20}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{line}");
    let line_path = format!(
        "/v1/prescription_items/{}",
        line["id"].as_str().expect("id")
    );
    refused(
        node.send(
            Method::PATCH,
            &line_path,
            Some(json!({"quantity_dispensed": 20})),
        )
        .await,
        "/v1/pharmacy/dispense",
    );
    refused(
        node.send(
            Method::PUT,
            &line_path,
            Some(json!({"notes": "twice a day"})),
        )
        .await,
        "quantity_dispensed",
    );
    let (status, _) = node
        .send(
            Method::PATCH,
            &line_path,
            Some(json!({"notes": "twice a day"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // Nothing of the refused writes happened.
    let stock = node
        .get(&format!("/v1/pharmacy/stock?clinic_id={clinic}"))
        .await;
    assert_eq!(quantities(&stock), vec![("A1".to_owned(), 10)]);
    let record = node.get(&item_path).await;
    assert_eq!(record["quantity_available"], json!(10));
}

#[tokio::test]
async fn concurrent_dispenses_of_one_item_each_record_the_balance_they_left() {
    let node = std::sync::Arc::new(Node::start().await);
    let clinic = node.clinic().await;
    node.post(
        "/v1/pharmacy/restock",
        json!({"clinic_id": clinic, "drug_name": "Paracetamol 500mg", "batch_number": "P1", "quantity": 100}),
    )
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (node, clinic) = (node.clone(), clinic.clone());
        tasks.spawn(async move {
            node.post(
                "/v1/pharmacy/dispense",
                json!({"clinic_id": clinic, "drug_name": "Paracetamol 500mg", "quantity": 1}),
            )
            .await
        });
    }
    let mut balances = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (status, answer) = done.expect("task");
        assert_eq!(status, StatusCode::OK, "{answer}");
        balances.push(
            answer["taken"][0]["balance_after"]
                .as_i64()
                .expect("balance"),
        );
    }
    balances.sort_unstable();
    assert_eq!(
        balances,
        (84..100).collect::<Vec<i64>>(),
        "each dispense saw the one before"
    );
    let verify = node.get("/v1/pharmacy/verify").await;
    assert_eq!(verify["mismatches"], json!([]));
}

#[tokio::test]
async fn a_busy_item_keeps_its_movements_in_ledgers_that_stay_small() {
    let node = Node::start().await;
    let clinic = node.clinic().await;
    let (_, stocked) = node
        .post(
            "/v1/pharmacy/restock",
            json!({"clinic_id": clinic, "drug_name": "ORS sachets", "batch_number": "O1", "quantity": 5000}),
        )
        .await;
    let item = stocked["stock_item_id"].as_str().expect("item").to_owned();
    for _ in 0..1100 {
        let (status, answer) = node
            .post(
                "/v1/pharmacy/dispense",
                json!({"clinic_id": clinic, "drug_name": "ORS sachets", "quantity": 2}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    let stock = node
        .get(&format!("/v1/pharmacy/stock?clinic_id={clinic}"))
        .await;
    assert_eq!(quantities(&stock), vec![("O1".to_owned(), 5000 - 2200)]);
    let record = node.get(&format!("/v1/clinic_inventory/{item}")).await;
    assert_eq!(record["quantity_available"], json!(2800));
    // 1,101 movements (the restock and 1,100 dispenses): the first ones on the item
    // itself while it is small, the rest in ledgers of at most 500.
    let ledgers = node
        .get(&format!(
            "/v1/_stock_ledgers?stock_item_id={item}&limit=100"
        ))
        .await;
    let ledgers = ledgers["records"].as_array().expect("ledgers").clone();
    let movements: Vec<i64> = ledgers
        .iter()
        .map(|l| l["movements"].as_i64().expect("movements"))
        .collect();
    let in_ledgers: i64 = movements.iter().sum();
    assert!(
        (2..=3).contains(&ledgers.len()) && movements.iter().all(|m| *m <= 500),
        "{movements:?}"
    );
    let item_history = node
        .get(&format!("/v1/clinic_inventory/{item}/history"))
        .await;
    let on_item = item_history["changes"].as_array().expect("changes").len() as i64;
    assert!(
        on_item < 300,
        "the busy item's own history stays small: {on_item} changes"
    );
    assert!(in_ledgers + on_item >= 1100, "{in_ledgers} + {on_item}");
    let history = node
        .get(&format!(
            "/v1/_stock_ledgers/{}/history",
            ledgers[0]["id"].as_str().expect("id")
        ))
        .await;
    assert!(history["changes"].as_array().expect("changes").len() <= 2 * 500 + 1);
    let verify = node.get("/v1/pharmacy/verify").await;
    assert_eq!(verify["mismatches"], json!([]));
}

#[tokio::test]
async fn the_stock_listing_comes_in_pages_that_together_hold_every_batch_once() {
    let node = Node::start().await;
    let clinic = node.clinic().await;
    for i in 0..25 {
        let (status, answer) = node
            .post(
                "/v1/pharmacy/restock",
                json!({"clinic_id": clinic, "drug_name": format!("Drug {:02}", i % 7),
                       "batch_number": format!("B{i}"), "expiry_date": "2031-01-31", "quantity": i + 1}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    let whole = node
        .get(&format!("/v1/pharmacy/stock?clinic_id={clinic}"))
        .await;
    let whole_ids: Vec<Value> = whole["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["stock_item_id"].clone())
        .collect();
    assert_eq!(whole_ids.len(), 25);
    assert_eq!(whole["next"], Value::Null, "one page holds 25 batches");
    // Pages of 10: 10, 10, 5, in the same order as the whole listing.
    let mut paged = Vec::new();
    let mut sizes = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(next) => format!("/v1/pharmacy/stock?clinic_id={clinic}&limit=10&after={next}"),
            None => format!("/v1/pharmacy/stock?clinic_id={clinic}&limit=10"),
        };
        let page = node.get(&path).await;
        let items = page["items"].as_array().expect("items");
        sizes.push(items.len());
        paged.extend(items.iter().map(|i| i["stock_item_id"].clone()));
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(sizes, vec![10, 10, 5]);
    assert_eq!(paged, whole_ids);
    // A page position that is not a stock item, and limits out of range, are refused.
    for query in [
        format!("after={}", uuid::Uuid::new_v4()),
        "after=not-an-id".to_owned(),
        "limit=0".to_owned(),
        "limit=100000".to_owned(),
    ] {
        let response = node
            .http
            .get(format!(
                "http://{}/v1/pharmacy/stock?{query}",
                node.api.addr
            ))
            .send()
            .await
            .expect("get");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
    }
}

#[tokio::test]
async fn a_stock_items_level_over_time_adds_up_its_movements() {
    let node = Node::start().await;
    let clinic = node.clinic().await;
    let (status, restocked) = node
        .post("/v1/pharmacy/restock", json!({"clinic_id": clinic, "drug_name": "Zinc 20mg tablets", "batch_number": "Z-1", "expiry_date": "2031-01-31", "quantity": 50}))
        .await;
    assert_eq!(status, StatusCode::OK, "{restocked}");
    for quantity in [5, 12] {
        let (status, answer) = node
            .post(
                "/v1/pharmacy/dispense",
                json!({"clinic_id": clinic, "drug_name": "zinc 20 mg tablets", "quantity": quantity}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    let (status, answer) = node
        .post("/v1/pharmacy/adjust", json!({"clinic_id": clinic, "drug_name": "Zinc 20mg tablets", "batch_number": "Z-1", "quantity_change": -3, "reason": "damaged"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let stock = node
        .get(&format!("/v1/pharmacy/stock?clinic_id={clinic}"))
        .await;
    let item = stock["items"][0]["stock_item_id"]
        .as_str()
        .expect("item")
        .to_owned();
    let levels = node
        .get(&format!("/v1/pharmacy/levels?stock_item_id={item}"))
        .await;
    let shown: Vec<i64> = levels["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p["level"].as_i64().expect("level"))
        .collect();
    assert_eq!(shown, [50, 45, 33, 30], "{levels}");
    assert_eq!(levels["movements"], 4);
    assert_eq!(levels["level"], levels["quantity"], "{levels}");
    assert_eq!(levels["points"][3]["type"], "adjustment", "{levels}");

    let (status, bad) = {
        let r = node
            .http
            .get(format!(
                "http://{}/v1/pharmacy/levels?stock_item_id=not-an-id",
                node.api.addr
            ))
            .send()
            .await
            .expect("get");
        (r.status(), r.json::<Value>().await.unwrap_or(Value::Null))
    };
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
}
