//! Replication by clinic, with node processes: devices admitted for one clinic hold
//! exactly that clinic's records (listed collection by collection), a patient seen at
//! another clinic arrives there with its history, a transferred patient leaves the old
//! clinic's device, an admin narrows and widens a device's clinics, and where a narrow
//! device is the only way between two wide ones, the others' records cannot cross and the
//! wide devices say so.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use medmesh_tests::{
    Api, NodeProcess, eventually, init_node, invite_device, join_with_invite, medmesh_command,
};
use serde_json::{Value, json};

/// The collections a clinic's records are in (the others go to every device).
const CLINIC_COLLECTIONS: &[&str] = &[
    "patients",
    "visits",
    "events",
    "clinic_inventory",
    "inventory_transactions",
];

const WAIT: Duration = Duration::from_secs(60);

/// Admits a device for `clinics` (none: all) through an invite of the running admin
/// node in `admin`.
fn admit(admin: &Path, dir: &Path, clinics: &[&str]) {
    let mut extra = vec!["--kind", "tablet"];
    for clinic in clinics {
        extra.extend(["--clinic", clinic]);
    }
    let invite = invite_device(admin, &extra);
    let out = join_with_invite(dir, &invite, "clinic tablet");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn post(api: &Api, path: &str, body: Value) -> String {
    let (code, created) = api.post(path, &body).await.expect("post");
    assert!(code == 201 || code == 200, "{path}: {code} {created}");
    created["id"].as_str().unwrap_or_default().to_owned()
}

/// The ids a node holds in the clinic collections.
async fn held(api: &Api) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for collection in CLINIC_COLLECTIONS {
        let (code, page) = api
            .get(&format!("/v1/{collection}?limit=1000&include_deleted=true"))
            .await
            .expect("list");
        assert_eq!(code, 200, "{collection}: {page}");
        for record in page["records"].as_array().into_iter().flatten() {
            out.insert(record["id"].as_str().expect("id").to_owned());
        }
    }
    out
}

async fn holds_exactly(api: &Api, expected: &BTreeSet<String>) -> bool {
    held(api).await == *expected
}

async fn peer_id(api: &Api) -> String {
    let (_, status) = api.get("/v1/status").await.expect("status");
    status["peer_id"].as_str().expect("peer id").to_owned()
}

/// One clinic's records made on `api`: a patient with a visit there and an event, and a
/// restock (a stock item and its movement). Answers the ids.
async fn clinic_records(api: &Api, clinic: &str, name: &str) -> (String, BTreeSet<String>) {
    let patient = post(
        api,
        "/v1/patients",
        json!({"given_name": name, "primary_clinic_id": clinic}),
    )
    .await;
    let visit = post(
        api,
        "/v1/visits",
        json!({"patient_id": patient, "clinic_id": clinic}),
    )
    .await;
    let event = post(
        api,
        "/v1/events",
        json!({"patient_id": patient, "visit_id": visit}),
    )
    .await;
    let (code, restock) = api
        .post(
            "/v1/pharmacy/restock",
            &json!({"clinic_id": clinic, "drug_name": "Paracetamol 500mg tablets",
                    "batch_number": format!("B-{name}"), "expiry_date": "2031-01-31", "quantity": 50}),
        )
        .await
        .expect("restock");
    assert_eq!(code, 200, "{restock}");
    let item = restock["stock_item_id"].as_str().expect("item").to_owned();
    let (_, movements) = api
        .get(&format!("/v1/inventory_transactions?stock_item_id={item}"))
        .await
        .expect("movements");
    let mut ids: BTreeSet<String> = [patient.clone(), visit, event, item].into();
    for movement in movements["records"].as_array().into_iter().flatten() {
        ids.insert(movement["id"].as_str().expect("id").to_owned());
    }
    assert_eq!(ids.len(), 5, "{movements}");
    (patient, ids)
}

async fn wait_for(api: &Api, expected: &BTreeSet<String>, what: &str) {
    if let Err(err) = eventually(WAIT, what, || holds_exactly(api, expected)).await {
        let got = held(api).await;
        panic!(
            "{err:#}\nmissing: {:?}\nextra: {:?}",
            expected.difference(&got).collect::<Vec<_>>(),
            got.difference(expected).collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_device_holds_exactly_its_clinics_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let da = dir.path().join("admin");
    init_node(&da);
    let admin = NodeProcess::start(&da).expect("admin node");
    let a = Api::new(&admin.api);
    let c1 = post(&a, "/v1/clinics", json!({"name": "Clinic one"})).await;
    let c2 = post(&a, "/v1/clinics", json!({"name": "Clinic two"})).await;
    let c3 = post(&a, "/v1/clinics", json!({"name": "Clinic three"})).await;
    let (db, dc) = (dir.path().join("b"), dir.path().join("c"));
    admit(&da, &db, &[&c1]);
    admit(&da, &dc, &[&c2]);
    let b_node =
        NodeProcess::start_peered(&db, std::slice::from_ref(&admin.listen), None).expect("b");
    let c_node =
        NodeProcess::start_peered(&dc, std::slice::from_ref(&admin.listen), None).expect("c");
    let (b, c) = (Api::new(&b_node.api), Api::new(&c_node.api));

    let (_, one) = clinic_records(&a, &c1, "Amina").await;
    let (moving, two) = clinic_records(&a, &c2, "Bilal").await;
    let (seen, _) = clinic_records(&a, &c3, "Chidi").await;
    // A patient of clinic two that was never seen there (it moves to clinic one below).
    let lone = post(
        &a,
        "/v1/patients",
        json!({"given_name": "Dayo", "primary_clinic_id": c2}),
    )
    .await;
    let lone_event = post(&a, "/v1/events", json!({"patient_id": lone})).await;
    let mut two_all = two.clone();
    two_all.extend([lone.clone(), lone_event.clone()]);
    wait_for(&b, &one, "clinic one's records, and only those, on b").await;
    wait_for(&c, &two_all, "clinic two's records, and only those, on c").await;
    // Reference data reaches every device.
    let (_, clinics) = b.get("/v1/clinics").await.expect("clinics");
    assert_eq!(clinics["records"].as_array().map(Vec::len), Some(3));
    // Asking for another clinic's record by id finds nothing.
    let (code, _) = b.get(&format!("/v1/patients/{moving}")).await.expect("get");
    assert_eq!(code, 404);

    // Clinic three's patient is seen at clinic one: it arrives there with its history
    // (its visit and event at clinic three too); its clinic's stock stays away.
    let visit = post(
        &a,
        "/v1/visits",
        json!({"patient_id": seen, "clinic_id": c1}),
    )
    .await;
    let mut one_now = one.clone();
    one_now.insert(visit);
    let (_, history) = a
        .get(&format!("/v1/events?patient_id={seen}"))
        .await
        .expect("events");
    let (_, visits) = a
        .get(&format!("/v1/visits?patient_id={seen}"))
        .await
        .expect("visits");
    for record in history["records"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(visits["records"].as_array().into_iter().flatten())
    {
        one_now.insert(record["id"].as_str().expect("id").to_owned());
    }
    one_now.insert(seen.clone());
    wait_for(
        &b,
        &one_now,
        "the patient seen at clinic one, with its history, on b",
    )
    .await;

    // A patient of clinic two moves to clinic one: it arrives on b with its history and
    // leaves c (purged there once the admin node confirmed it holds it).
    let (code, _) = a
        .patch(
            &format!("/v1/patients/{lone}"),
            &json!({"primary_clinic_id": c1}),
        )
        .await
        .expect("patch");
    assert_eq!(code, 200);
    one_now.extend([lone.clone(), lone_event.clone()]);
    wait_for(&b, &one_now, "the transferred patient on b").await;
    wait_for(&c, &two, "the transferred patient purged from c").await;
    let (_, status) = c.get("/v1/status").await.expect("status");
    assert!(
        status["mesh"]["purge"]["purged_since_start"]
            .as_u64()
            .is_some_and(|n| n >= 2),
        "{}",
        status["mesh"]["purge"]
    );
    // A later record of that patient made on the admin node does not reach c.
    let later = post(&a, "/v1/events", json!({"patient_id": lone})).await;
    one_now.insert(later);
    wait_for(&b, &one_now, "the later event on b").await;
    assert!(holds_exactly(&c, &two).await);

    // The admin narrows b to clinic two: b drops clinic one's records and takes clinic
    // two's (including the patient that moved away from it: it is clinic one's now).
    let b_peer = peer_id(&b).await;
    let out = medmesh_command()
        .args([
            "devices", "clinics", &b_peer, "--clinic", &c2, "--api", &admin.api,
        ])
        .output()
        .expect("devices clinics");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(&b, &two, "b narrowed to clinic two").await;
    let (_, status) = b.get("/v1/status").await.expect("status");
    assert_eq!(status["mesh"]["device"]["clinics"], json!([c2]));
    // Widened to clinics one and two: it holds both again.
    let (code, answer) = a
        .post(
            &format!("/v1/devices/{b_peer}/clinics"),
            &json!({"clinics": [c1, c2]}),
        )
        .await
        .expect("widen");
    assert_eq!(code, 200, "{answer}");
    let mut both = one_now.clone();
    both.extend(two.iter().cloned());
    wait_for(&b, &both, "b widened to clinics one and two").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrow_device_between_two_wide_ones_relays_only_its_clinics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dw = dir.path().join("wide-1");
    init_node(&dw);
    let w1_node = NodeProcess::start(&dw).expect("w1");
    let w1 = Api::new(&w1_node.api);
    let c1 = post(&w1, "/v1/clinics", json!({"name": "Clinic one"})).await;
    let c2 = post(&w1, "/v1/clinics", json!({"name": "Hill clinic"})).await;
    let (dn, dw2) = (dir.path().join("narrow"), dir.path().join("wide-2"));
    admit(&dw, &dn, &[&c1]);
    // (Admitted without an invite, which would give it the first node's address.)
    medmesh_tests::join_mesh(&dw, &dw2).expect("w2 joins");
    // w1 — narrow — w2: the wide devices meet only through the narrow one.
    let mut n_node =
        NodeProcess::start_peered(&dn, std::slice::from_ref(&w1_node.listen), None).expect("n");
    let w2_node =
        NodeProcess::start_peered(&dw2, std::slice::from_ref(&n_node.listen), None).expect("w2");
    let w2 = Api::new(&w2_node.api);
    let (_, one) = clinic_records(&w1, &c1, "Amina").await;
    let (_, _two) = clinic_records(&w1, &c2, "Bilal").await;
    wait_for(
        &w2,
        &one,
        "clinic one's records on w2, through the narrow device",
    )
    .await;
    // The hill clinic's records cannot cross: w2 says so.
    eventually(WAIT, "w2 reporting the clinic no peer brings", || {
        let w2 = w2.clone();
        let c2 = c2.clone();
        async move {
            let (_, peers) = w2.get("/v1/peers").await.expect("peers");
            peers["unreached_clinics"]
                .as_array()
                .is_some_and(|l| l.iter().any(|c| c["id"] == json!(c2)))
        }
    })
    .await
    .expect("unreached clinic reported");
    let out = medmesh_command()
        .args(["peers", "--api", &w2_node.api])
        .output()
        .expect("peers");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Hill clinic")
            && text.contains("reach this device through no connected peer"),
        "{text}"
    );
    assert!(text.contains(&format!("serves clinic(s) {c1}")), "{text}");
    assert!(
        holds_exactly(&w2, &one).await,
        "nothing of the hill clinic on w2"
    );
    // A device of one clinic cannot be the mesh's gateway, which carries every clinic.
    n_node.stop();
    let key_file = dir.path().join("hub.key");
    std::fs::write(&key_file, format!("hh_{}", "ab".repeat(32))).expect("key");
    let out = medmesh_command()
        .args(["start", "--no-mdns", "--api", "127.0.0.1:0", "--data"])
        .arg(&dn)
        .args(["--gateway", "http://127.0.0.1:9", "--hub-key-file"])
        .arg(&key_file)
        .output()
        .expect("start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("serves only clinic(s)") && stderr.contains("medmesh devices clinics"),
        "{stderr}"
    );
}

/// A gateway of every clinic between the cloud and a device of one: the device gets only
/// its clinic's records from the cloud (and a patient of another clinic once seen at
/// its own, with the visit), and what it records reaches the cloud through the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_of_every_clinic_brings_a_device_only_its_clinics_records_from_the_cloud() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = medmesh_tests::cloud::Cloud::new();
    let (c1, c2) = (fresh_id(), fresh_id());
    cloud.put("clinics", json!({"id": c1, "name": "Clinic one"}));
    cloud.put("clinics", json!({"id": c2, "name": "Hill clinic"}));
    let mut ours = medmesh_tests::patient(1);
    ours["primary_clinic_id"] = json!(c1);
    let mut theirs = medmesh_tests::patient(2);
    theirs["primary_clinic_id"] = json!(c2);
    let mut seen_here = medmesh_tests::patient(3);
    seen_here["primary_clinic_id"] = json!(c2);
    let visit = fresh_id();
    for row in [&ours, &theirs, &seen_here] {
        cloud.put("patients", row.clone());
    }
    cloud.put(
        "visits",
        json!({"id": visit, "patient_id": seen_here["id"], "clinic_id": c1,
               "provider_name": "Dr Musa", "check_in_timestamp": 1_767_000_000_000i64}),
    );
    let key = cloud.add_hub_key(&[&c1, &c2]);
    let addr = cloud
        .serve("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("cloud");
    let key_file = dir.path().join("hub.key");
    std::fs::write(&key_file, format!("{key}\n")).expect("key file");

    let dg = dir.path().join("gateway");
    init_node(&dg);
    let gateway_node =
        NodeProcess::start_gateway(&dg, &format!("http://{addr}"), &key_file, &[], "1")
            .expect("gateway");
    let gateway = Api::new(&gateway_node.api);
    let dn = dir.path().join("narrow");
    admit(&dg, &dn, &[&c1]);
    let narrow_node =
        NodeProcess::start_peered(&dn, std::slice::from_ref(&gateway_node.listen), None)
            .expect("narrow");
    let narrow = Api::new(&narrow_node.api);
    let id = |v: &Value| v["id"].as_str().expect("id").to_owned();
    let all: BTreeSet<String> = [id(&ours), id(&theirs), id(&seen_here), visit.clone()].into();
    wait_for(&gateway, &all, "the cloud's records on the gateway").await;
    let clinic_one: BTreeSet<String> = [id(&ours), id(&seen_here), visit.clone()].into();
    wait_for(&narrow, &clinic_one, "clinic one's records on its device").await;

    // What the device records reaches the cloud through the gateway.
    let new = post(
        &narrow,
        "/v1/patients",
        json!({"given_name": "Zainab", "primary_clinic_id": c1}),
    )
    .await;
    eventually(WAIT, "the device's patient in the cloud", || {
        let found = cloud.row("patients", &new).is_some();
        async move { found }
    })
    .await
    .expect("pushed");
    let mut expected = clinic_one;
    expected.insert(new);
    assert!(holds_exactly(&narrow, &expected).await);
}

/// A fresh record id, as text.
fn fresh_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
