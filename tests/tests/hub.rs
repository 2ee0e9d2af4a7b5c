//! The Hikma app pairs with any node as with its hub (`HIKMA_HUB_RPC.md`): a client that
//! does what the app does — handshake, `login`, sealed commands and queries — against
//! node processes serving `--hub-listen`.

use std::time::Duration;

use medmesh_tests::hub::{Answer, HubClient};
use medmesh_tests::{Api, NodeProcess, eventually, init_node, join_mesh};
use serde_json::{Value, json};

const EMAIL: &str = "amina@kano.clinic";
const PASSWORD: &str = "a long enough password";
const CLINIC: &str = "0192f0c4-6a1e-7cc3-9d0e-5b8f1c2a3d4e";

/// The tables the app has models for: a pull may name no other.
const APP_TABLES: &[&str] = &[
    "patients",
    "events",
    "visits",
    "clinics",
    "users",
    "event_forms",
    "registration_forms",
    "patient_additional_attributes",
    "appointments",
    "prescriptions",
    "patient_vitals",
    "patient_problems",
    "clinic_departments",
    "drug_catalogue",
    "clinic_inventory",
    "prescription_items",
    "dispensing_records",
    "user_clinic_permissions",
    "app_config",
];

fn start_hub(dir: &std::path::Path, peers: &[String]) -> NodeProcess {
    NodeProcess::start_with_args(dir, peers, &["--hub-listen", "127.0.0.1:0"]).expect("node")
}

async fn add_user(api: &Api, email: &str, role: &str) -> String {
    let hashed = medmesh::users::hash_password(PASSWORD).expect("hash");
    let (status, user) = api
        .post(
            "/v1/users",
            &json!({"email": email, "name": format!("{role} {email}"), "role": role,
                    "clinic_id": CLINIC, "hashed_password": hashed}),
        )
        .await
        .expect("user");
    assert_eq!(status, 201, "{user}");
    user["id"].as_str().expect("id").to_owned()
}

async fn hub_of(api: &Api) -> Value {
    let (status, hub) = api.get("/v1/hub").await.expect("hub");
    assert_eq!(status, 200, "{hub}");
    hub
}

async fn signed_in(api: &Api) -> HubClient {
    let url = hub_of(api).await["url"].as_str().expect("url").to_owned();
    let mut tablet = HubClient::pair(&url).await.expect("pair");
    let answer = tablet.login(EMAIL, PASSWORD).await.expect("login");
    assert!(matches!(answer, Answer::Ok(_)), "{answer:?}");
    tablet
}

async fn pull(tablet: &mut HubClient, since: i64) -> Value {
    tablet.handshake().await.expect("handshake");
    tablet
        .query("sync_pull", json!({"lastPulledAt": since}))
        .await
        .expect("pull")
        .ok()
        .expect("pulled")
}

fn rows<'a>(pulled: &'a Value, table: &str, kind: &str) -> Vec<&'a Value> {
    pulled["changes"][table][kind]
        .as_array()
        .map(|rows| rows.iter().collect())
        .unwrap_or_default()
}

fn app_patient(id: &str, given: &str, now: i64) -> Value {
    json!({"id": id, "given_name": given, "surname": "Bello", "date_of_birth": "1990-04-02",
           "sex": "female", "primary_clinic_id": CLINIC, "metadata": "{\"source\":\"tablet\"}",
           "additional_data": "{}", "created_at": now, "updated_at": now,
           "_status": "created", "_changed": ""})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tablets_pair_sign_in_and_sync_through_two_nodes_of_one_mesh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    init_node(&da);
    join_mesh(&da, &db).expect("join");
    let a = start_hub(&da, &[]);
    let b = start_hub(&db, std::slice::from_ref(&a.listen));
    let (api_a, api_b) = (Api::new(&a.api), Api::new(&b.api));
    add_user(&api_a, EMAIL, "admin").await;

    // Pairing: the QR code's text names the hub the handshake reaches.
    let hub = hub_of(&api_a).await;
    let pairing: Value =
        serde_json::from_str(hub["pairing"].as_str().expect("text")).expect("json");
    assert_eq!(pairing["type"], "sync_hub");
    let url = pairing["url"].as_str().expect("url");
    assert!(url.starts_with("http://") && !url.ends_with('/'), "{url}");
    let mut one = HubClient::pair(url).await.expect("pair");
    assert_eq!(one.hub_public_key, pairing["pk"].as_str().expect("pk"));
    assert_eq!(one.hub_id, pairing["id"].as_str().expect("id"));

    // Sign-in: a wrong password is refused; the right one gives what the app needs.
    assert!(matches!(
        one.login(EMAIL, "not the password").await.expect("login"),
        Answer::Failed(_)
    ));
    assert!(one.token.is_none());
    let login = one
        .login(EMAIL, PASSWORD)
        .await
        .expect("login")
        .ok()
        .expect("ok");
    assert!(login["token"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        login["provider_name"]
            .as_str()
            .is_some_and(|n| !n.is_empty())
    );
    assert_eq!(login["role"], "admin");
    assert_eq!(login["clinic_id"], CLINIC);
    assert!(login["user_id"].is_string());

    // A first pull: only the app's tables, no password hash, the hub's time in ms.
    let first = pull(&mut one, 0).await;
    assert!(
        first["timestamp"]
            .as_i64()
            .is_some_and(|t| t > 1_600_000_000_000)
    );
    for table in first["changes"].as_object().expect("changes").keys() {
        assert!(
            APP_TABLES.contains(&table.as_str()),
            "the app has no table {table}"
        );
    }
    assert!(!first.to_string().contains("hashed_password"));
    assert!(!first.to_string().contains("$2"), "a bcrypt hash was sent");

    // Tablet one pushes two new patients through node a.
    let now = chrono::Utc::now().timestamp_millis();
    let (p1, p2) = (
        uuid::Uuid::now_v7().to_string(),
        uuid::Uuid::now_v7().to_string(),
    );
    one.handshake().await.expect("handshake");
    let pushed = one
        .command(
            "sync_push",
            json!({"changes": {"patients": {"created": [app_patient(&p1, "Chidi", now), app_patient(&p2, "Dina", now)],
                                            "updated": [], "deleted": []}},
                   "lastPulledAt": first["timestamp"]}),
        )
        .await
        .expect("push");
    assert!(matches!(pushed, Answer::Ok(Value::Object(_))), "{pushed:?}");
    // What the tablet pushed does not come back to it (deleted there meanwhile, a row
    // sent back as new would be inserted again), unless someone changes it.
    let echo = pull(&mut one, first["timestamp"].as_i64().expect("ts")).await;
    assert!(
        !echo["changes"]["patients"].to_string().contains(&p1),
        "{}",
        echo["changes"]["patients"]
    );

    // Tablet two, paired with node b, gets them once the mesh has carried them.
    eventually(
        Duration::from_secs(20),
        "the users and the patients reach node b",
        || async {
            api_b
                .get(&format!("/v1/patients/{p2}"))
                .await
                .is_ok_and(|(s, _)| s == 200)
                && api_b
                    .get("/v1/users")
                    .await
                    .is_ok_and(|(_, u)| u.to_string().contains(EMAIL))
        },
    )
    .await
    .expect("mesh");
    let mut two = signed_in(&api_b).await;
    let got = pull(&mut two, 0).await;
    let created = rows(&got, "patients", "created");
    let chidi = created
        .iter()
        .find(|r| r["id"] == p1.as_str())
        .expect("the tablet's patient");
    assert_eq!(chidi["given_name"], "Chidi");
    assert!(chidi["created_at"].is_number(), "times in ms: {chidi}");
    assert!(
        chidi["metadata"].is_string(),
        "JSON columns as text: {chidi}"
    );

    // `_changed`: the tablet's stale surname does not overwrite the node's newer one.
    let (status, _) = api_b
        .patch(&format!("/v1/patients/{p1}"), &json!({"surname": "Okafor"}))
        .await
        .expect("patch");
    assert_eq!(status, 200);
    let mut edited = app_patient(&p1, "Chidinma", now);
    edited["_status"] = json!("updated");
    edited["_changed"] = json!("given_name");
    two.handshake().await.expect("handshake");
    two.command(
        "sync_push",
        json!({"changes": {"patients": {"created": [], "updated": [edited],
                                        "deleted": [{"id": p2}]}},
               "lastPulledAt": got["timestamp"]}),
    )
    .await
    .expect("push")
    .ok()
    .expect("pushed");
    let (_, record) = api_b.get(&format!("/v1/patients/{p1}")).await.expect("get");
    assert_eq!(record["given_name"], "Chidinma");
    assert_eq!(record["surname"], "Okafor");
    // The deletion pushed as a row object, through node b, reaches tablet one on node a
    // as a deletion the app applies: an object with the id.
    eventually(
        Duration::from_secs(20),
        "the deletion reaches node a",
        || async {
            api_a
                .get(&format!("/v1/patients/{p2}"))
                .await
                .is_ok_and(|(_, r)| r["deleted_at"].is_string())
        },
    )
    .await
    .expect("mesh");
    let later = pull(&mut one, first["timestamp"].as_i64().expect("ts")).await;
    assert!(
        rows(&later, "patients", "deleted").contains(&&json!({"id": p2})),
        "{}",
        later["changes"]["patients"]
    );
    let chidinma = rows(&later, "patients", "created")
        .into_iter()
        .chain(rows(&later, "patients", "updated"))
        .find(|r| r["id"] == p1.as_str())
        .cloned()
        .expect("the edit reaches tablet one");
    assert_eq!(chidinma["given_name"], "Chidinma");
    assert_eq!(chidinma["surname"], "Okafor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_removed_tablets_and_disabled_users_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_hub(&dir.path().join("n"), &[]);
    let api = Api::new(&node.api);
    let user = add_user(&api, EMAIL, "provider").await;
    let mut tablet = signed_in(&api).await;

    // A sealed request answered once is refused when it comes again.
    tablet.handshake().await.expect("handshake");
    tablet
        .query("get_patients", json!({"limit": 30, "offset": 0}))
        .await
        .expect("query")
        .ok()
        .expect("answered");
    assert!(matches!(
        tablet.replay().await.expect("replay"),
        Answer::Status(500, _)
    ));
    // A request sealed under the key before the newest still opens (the app handshakes
    // before every call, several at once).
    let url = hub_of(&api).await["url"].as_str().expect("url").to_owned();
    let mut other = HubClient::pair(&url).await.expect("pair");
    other.client_id = tablet.client_id.clone();
    other
        .handshake()
        .await
        .expect("a second handshake of the same install");
    assert!(matches!(
        tablet.query("ping", json!({})).await.expect("query"),
        Answer::Ok(_)
    ));
    // No token: 401, the status the app treats as "sign in again".
    let token = tablet.token.take();
    assert!(matches!(
        tablet
            .query("get_patients", json!({}))
            .await
            .expect("query"),
        Answer::Status(401, _)
    ));
    tablet.token = token;

    // A disabled user's token ends.
    let (status, _) = api
        .patch(
            &format!("/v1/users/{user}"),
            &json!({"disabled_at": medmesh_protocol::record::format_timestamp(chrono::Utc::now().timestamp_millis())}),
        )
        .await
        .expect("disable");
    assert_eq!(status, 200);
    tablet.handshake().await.expect("handshake");
    assert!(matches!(
        tablet
            .query("get_patients", json!({}))
            .await
            .expect("query"),
        Answer::Status(401, _)
    ));
    let (status, _) = api
        .patch(&format!("/v1/users/{user}"), &json!({"disabled_at": null}))
        .await
        .expect("enable");
    assert_eq!(status, 200);

    // A removed tablet can neither call nor pair again; another tablet goes on.
    let mut lost = signed_in(&api).await;
    let mut kept = signed_in(&api).await;
    let (status, removed) = api
        .delete(&format!("/v1/hub/clients/{}", lost.client_id))
        .await
        .expect("remove");
    assert_eq!(status, 200, "{removed}");
    assert_eq!(removed["sign_ins_ended"], 1);
    assert!(matches!(
        lost.query("get_patients", json!({})).await.expect("query"),
        Answer::Status(500, _)
    ));
    assert!(
        lost.handshake().await.is_err(),
        "a removed tablet pairs again"
    );
    kept.handshake().await.expect("handshake");
    kept.query("get_patients", json!({}))
        .await
        .expect("query")
        .ok()
        .expect("another tablet goes on");
    let (_, clients) = api.get("/v1/hub/clients").await.expect("clients");
    assert!(clients.to_string().contains(&kept.client_id));
    assert!(clients.to_string().contains(EMAIL));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_mode_calls_answer_as_the_app_reads_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_hub(&dir.path().join("n"), &[]);
    let api = Api::new(&node.api);
    add_user(&api, EMAIL, "admin").await;
    let (status, _) = api
        .post(
            "/v1/registration_forms",
            &json!({"name": "Registration", "fields": [
                {"id": "f-given", "column": "given_name", "baseField": true, "fieldType": "text", "label": "Given name"},
                {"id": "f-surname", "column": "surname", "baseField": true, "fieldType": "text", "label": "Surname"},
                {"id": "f-colour", "column": "colour", "baseField": false, "fieldType": "text", "label": "Colour"},
                {"id": "f-weight", "column": "weight", "baseField": false, "fieldType": "number", "label": "Weight"}
            ]}),
        )
        .await
        .expect("form");
    assert_eq!(status, 201);
    let mut tablet = signed_in(&api).await;

    // register_patient, as the app sends it: attributes keyed by the field id, no
    // patient id, no clinic.
    let register = |id: &str, given: &str, colour: &str| {
        json!({"patient": {"id": id, "given_name": given, "surname": "Haddad", "date_of_birth": "1985-01-30",
                            "sex": "male", "citizenship": "", "hometown": "Jos", "phone": "", "camp": "",
                            "additional_data": {}, "metadata": {}, "photo_url": "", "government_id": "",
                            "external_patient_id": "", "created_at": "2026-12-01T10:00:00.000Z",
                            "updated_at": "2026-12-01T10:00:00.000Z"},
               "additional_attributes": [
                   {"id": "f-colour", "patient_id": "", "attribute_id": "f-colour", "attribute": "colour",
                    "string_value": colour, "metadata": {}, "is_deleted": false},
                   {"id": "f-weight", "patient_id": "", "attribute_id": "f-weight", "attribute": "weight",
                    "number_value": 61.5, "metadata": {}, "is_deleted": false}]})
    };
    let (h1, h2) = (
        uuid::Uuid::now_v7().to_string(),
        uuid::Uuid::now_v7().to_string(),
    );
    let made = tablet
        .online_command("register_patient", register(&h1, "Hassan", "blue"))
        .await
        .expect("register");
    assert_eq!(made["patient_id"], h1.as_str());
    assert_eq!(made["attributes_count"], 2);
    tablet
        .online_command("register_patient", register(&h2, "Hamza", "green"))
        .await
        .expect("register");
    let one = tablet
        .online_query("get_patient", json!({"patient_id": h1}))
        .await
        .expect("get");
    assert_eq!(one["values"]["f-given"], "Hassan");
    assert_eq!(
        one["values"]["f-colour"], "blue",
        "another patient's attribute did not overwrite it"
    );
    assert_eq!(one["values"]["f-weight"], 61.5);
    assert!(
        one["fields"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["baseField"] == true))
    );
    let (_, stored) = api.get(&format!("/v1/patients/{h1}")).await.expect("get");
    assert_eq!(
        stored["primary_clinic_id"], CLINIC,
        "a new patient is of the user's clinic"
    );
    // An edit keeps the clinic.
    tablet
        .online_command("register_patient", register(&h1, "Hassan Ali", "blue"))
        .await
        .expect("edit");
    let (_, stored) = api.get(&format!("/v1/patients/{h1}")).await.expect("get");
    assert_eq!(stored["given_name"], "Hassan Ali");
    assert_eq!(stored["primary_clinic_id"], CLINIC);
    let missing = tablet
        .online_query(
            "get_patient",
            json!({"patient_id": uuid::Uuid::now_v7().to_string()}),
        )
        .await
        .expect("an unknown patient is a success with `error`");
    assert!(missing["error"].is_string());

    // Lists and search.
    let list = tablet
        .online_query("get_patients", json!({"limit": 30, "offset": 0}))
        .await
        .expect("list");
    assert_eq!(list["limit"], 30);
    assert_eq!(list["offset"], 0);
    assert!(list["total"].as_u64().is_some_and(|t| t >= 2));
    assert!(list["data"].as_array().is_some_and(|d| d.len() >= 2));
    let found = tablet
        .online_query(
            "search_patients",
            json!({"filters": {"given_name": "hams"}, "limit": 30, "offset": 0}),
        )
        .await
        .expect("search");
    assert_eq!(found["total"], 0);
    let found = tablet
        .online_query(
            "search_patients",
            json!({"filters": {"given_name": "Hamz"}, "limit": 30, "offset": 0}),
        )
        .await
        .expect("search");
    assert_eq!(found["total"], 1);
    assert_eq!(found["data"][0]["id"], h2.as_str());
    assert!(
        found["data"][0]["metadata"].is_object(),
        "JSON columns as JSON online"
    );

    // An event with no visit opens one; lists of visits and events.
    let form_data = json!([{"fieldId": "c", "name": "Complaint", "value": "cough", "fieldType": "text", "inputType": "text"}]);
    let event = tablet
        .online_command(
            "events.create",
            json!({"patient_id": h1, "visit_id": null, "event_type": "Consultation", "form_id": "form-1",
                   "form_data": form_data, "metadata": {}, "recorded_by_user_id": "u"}),
        )
        .await
        .expect("event");
    let (event_id, visit_id) = (
        event["id"].as_str().expect("id").to_owned(),
        event["visit_id"].as_str().expect("visit").to_owned(),
    );
    let visits = tablet
        .online_query("get_visits", json!({"patient_id": h1}))
        .await
        .expect("visits");
    assert_eq!(visits["data"][0]["id"], visit_id.as_str());
    assert_eq!(visits["data"][0]["clinic_id"], CLINIC);
    let events = tablet
        .online_query(
            "get_visit_events",
            json!({"patient_id": h1, "visit_id": visit_id}),
        )
        .await
        .expect("events");
    assert_eq!(
        events["data"][0]["form_data"], form_data,
        "form_data as an array"
    );
    let by_form = tablet
        .online_query(
            "events.by_form",
            json!({"form_id": "form-1", "patient_id": h1}),
        )
        .await
        .expect("by form");
    assert_eq!(by_form.as_array().map(Vec::len), Some(1));
    let changed = json!([{"fieldId": "c", "name": "Complaint", "value": "fever", "fieldType": "text", "inputType": "text"}]);
    let updated = tablet
        .online_command(
            "events.update",
            json!({"id": event_id, "form_data": changed, "metadata": {}}),
        )
        .await
        .expect("update");
    assert_eq!(updated["form_data"], changed);
    tablet
        .online_command("events.delete", json!({"id": event_id}))
        .await
        .expect("delete");
    let events = tablet
        .online_query(
            "get_visit_events",
            json!({"patient_id": h1, "visit_id": visit_id}),
        )
        .await
        .expect("events");
    assert_eq!(events["data"], json!([]));

    // Vitals and problems.
    let vitals = tablet
        .online_command(
            "vitals.create",
            json!({"patient_id": h1, "timestamp": "2026-12-01T10:05:00.000Z", "systolic_bp": 120,
                   "diastolic_bp": 80, "bp_position": "sitting", "recorded_by_user_id": "u",
                   "metadata": {}, "is_deleted": false}),
        )
        .await
        .expect("vitals");
    assert!(vitals["id"].is_string());
    let listed = tablet
        .online_query("vitals.list", json!({"patient_id": h1}))
        .await
        .expect("vitals list");
    assert_eq!(listed[0]["systolic_bp"], 120);
    assert_eq!(listed[0]["heart_rate"], Value::Null);
    let problem = tablet
        .online_command(
            "problems.create",
            json!({"patient_id": h1, "problem_code_system": "icd11", "problem_code": "CA40",
                   "problem_label": "Pneumonia", "clinical_status": "active",
                   "verification_status": "provisional", "onset_date": "2026-11-28T00:00:00.000Z",
                   "recorded_by_user_id": "u", "metadata": {}, "is_deleted": false}),
        )
        .await
        .expect("problem");
    let problem_id = problem["id"].as_str().expect("id").to_owned();
    let got = tablet
        .online_query("problems.get", json!({"id": problem_id}))
        .await
        .expect("problem");
    assert_eq!(got["clinical_status"], "active");
    let updated = tablet
        .online_command(
            "problems.update",
            json!({"id": problem_id, "clinical_status": "resolved", "verification_status": "confirmed",
                   "severity_score": 3, "onset_date": "2026-11-28T00:00:00.000Z", "end_date": null}),
        )
        .await
        .expect("update");
    assert_eq!(updated["clinical_status"], "resolved");
    let listed = tablet
        .online_query("problems.list", json!({"patient_id": h1}))
        .await
        .expect("problems");
    assert_eq!(listed[0]["verification_status"], "confirmed");

    // The reads are in the access log, as the user who made them.
    let path = format!("/v1/_access_log?patient_id={h1}");
    eventually(
        Duration::from_secs(10),
        "the hub's reads in the access log",
        || async {
            api.get(&path).await.is_ok_and(|(_, log)| {
                log["records"].as_array().is_some_and(|entries| {
                    entries
                        .iter()
                        .any(|e| e["user"] == EMAIL && e["action"] == "read")
                })
            })
        },
    )
    .await
    .expect("logged");
}
