//! Access to the API: credentials on every endpoint, the role matrix, tokens that expire
//! or are revoked, the browser's attacks (Host, content type, CORS), history naming the
//! signed-in user, and the access log.

mod common;

use std::time::Duration;

use medmesh::access::AccessConfig;
use medmesh::api::AppState;
use medmesh::server::{RunningApi, open_data_async, serve_api};
use medmesh_protocol::ChangeAuthor;
use medmesh_storage::{WriteBatch, WriteKind, WriteOp};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery";
const CLINIC: &str = "0192f0c4-6a1e-7cc3-9d0e-00000000c1c1";
const OTHER_CLINIC: &str = "0192f0c4-6a1e-7cc3-9d0e-00000000c2c2";
const ORIGIN: &str = "https://console.clinic.example";

struct Node {
    api: RunningApi,
    state: AppState,
    admin: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = open_data_async(dir.path().to_path_buf(), None)
            .await
            .expect("open");
        common::give_token(dir.path());
        let state = AppState::with_access(
            opened.store,
            opened.peer_id,
            Some(dir.path().to_path_buf()),
            AccessConfig {
                hosts: vec!["clinic-laptop.local".into()],
                cors_origins: vec![ORIGIN.into()],
            },
        )
        .expect("state");
        let api = serve_api(state.clone(), "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("serve");
        Self {
            api,
            state,
            admin: common::http(),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api.addr)
    }

    /// Adds a user with this role (and clinic permission rows) straight into the store.
    async fn add_user(&self, email: &str, role: &str, rows: &[(&str, &[&str])]) -> String {
        self.add_user_at(email, role, None, rows).await
    }

    /// [`Node::add_user`] for a user whose own clinic is `home`.
    async fn add_user_at(
        &self,
        email: &str,
        role: &str,
        home: Option<&str>,
        rows: &[(&str, &[&str])],
    ) -> String {
        let hashed = bcrypt::hash(PASSWORD, 4).expect("hash");
        let Value::Object(fields) = json!({"email": email, "name": email, "role": role,
                                           "hashed_password": hashed, "clinic_id": home})
        else {
            unreachable!()
        };
        let author = ChangeAuthor::default();
        let made = self
            .state
            .store()
            .write(WriteBatch::one(WriteOp::new(
                "users",
                None,
                WriteKind::Create(fields),
                author.clone(),
            )))
            .await
            .expect("write");
        let id = made[0].as_ref().expect("user").id.to_string();
        for (clinic, flags) in rows {
            let mut row = json!({"user_id": id, "clinic_id": clinic});
            for flag in *flags {
                row[*flag] = json!(true);
            }
            let Value::Object(row) = row else {
                unreachable!()
            };
            self.state
                .store()
                .write(WriteBatch::one(WriteOp::new(
                    "user_clinic_permissions",
                    None,
                    WriteKind::Create(row),
                    author.clone(),
                )))
                .await
                .expect("write")[0]
                .as_ref()
                .expect("row");
        }
        id
    }

    /// Signs a user in; answers a client that sends their token.
    async fn sign_in(&self, email: &str) -> reqwest::Client {
        let answer = reqwest::Client::new()
            .post(self.url("/v1/sessions"))
            .json(&json!({"email": email, "password": PASSWORD}))
            .send()
            .await
            .expect("sign in");
        assert_eq!(answer.status(), StatusCode::CREATED);
        let body: Value = answer.json().await.expect("json");
        client_with_token(body["token"].as_str().expect("token"))
    }
}

fn client_with_token(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

async fn call(
    http: &reqwest::Client,
    node: &Node,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = http.request(method, node.url(path));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("send");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn every_endpoint_needs_a_credential_except_health() {
    let node = Node::start().await;
    let id = "0192f0c4-6a1e-7cc3-9d0e-000000000001";
    let endpoints: &[(Method, &str)] = &[
        (Method::GET, "/v1/status"),
        (Method::GET, "/v1/changes"),
        (Method::GET, "/v1/gateway"),
        (Method::GET, "/v1/peers"),
        (Method::POST, "/v1/peers"),
        (Method::DELETE, "/v1/peers/12D3KooWx"),
        (Method::POST, "/v1/peers/12D3KooWx/verify"),
        (Method::GET, "/v1/devices"),
        (Method::POST, "/v1/devices/12D3KooWx/revoke"),
        (Method::POST, "/v1/invites"),
        (Method::GET, "/v1/pharmacy/levels?stock_item_id=ID"),
        (Method::POST, "/v1/pharmacy/restock"),
        (Method::POST, "/v1/pharmacy/dispense"),
        (Method::POST, "/v1/pharmacy/count"),
        (Method::POST, "/v1/pharmacy/adjust"),
        (Method::GET, "/v1/pharmacy/stock"),
        (Method::GET, "/v1/pharmacy/alerts"),
        (Method::GET, "/v1/pharmacy/verify"),
        (Method::GET, "/v1/drugs/search?q=para"),
        (Method::GET, "/v1/patients"),
        (Method::POST, "/v1/patients"),
        (Method::POST, "/v1/patients/_import"),
        (Method::GET, "/v1/me"),
        (Method::DELETE, "/v1/sessions/current"),
    ];
    let anonymous = reqwest::Client::new();
    let stranger = client_with_token("mm_a-token-this-node-never-gave-out-000000");
    for (method, path) in endpoints
        .iter()
        .cloned()
        .chain(
            [Method::GET, Method::PATCH, Method::PUT, Method::DELETE]
                .into_iter()
                .map(|m| (m, "/v1/patients/ID")),
        )
        .chain([
            (Method::GET, "/v1/patients/ID/history"),
            (Method::GET, "/v1/patients/ID/conflicts"),
            (Method::POST, "/v1/patients/ID/conflicts"),
        ])
    {
        let path = path.replace("ID", id);
        let body = matches!(method, Method::POST | Method::PUT | Method::PATCH).then(|| json!({}));
        for (who, http) in [("no credential", &anonymous), ("unknown token", &stranger)] {
            let (status, answer) = call(http, &node, method.clone(), &path, body.clone()).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{who}: {method} {path}: {answer}"
            );
            assert_eq!(
                answer["error"]["code"],
                json!("unauthenticated"),
                "{method} {path}"
            );
            assert!(
                answer["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("/v1/sessions")),
                "says how to sign in: {answer}"
            );
        }
    }
    let (status, _) = call(&anonymous, &node, Method::GET, "/health", None).await;
    assert_eq!(status, StatusCode::OK);
    // The console's files hold no data: they need no credential, and say what the page
    // may load (only this node).
    for (path, kind) in [
        ("/", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/strings.js", "text/javascript"),
        ("/console/app.css", "text/css"),
    ] {
        let answer = anonymous.get(node.url(path)).send().await.expect("send");
        assert_eq!(answer.status(), StatusCode::OK, "{path}");
        let header = |name: &str| {
            answer
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert!(header("content-type").starts_with(kind), "{path}");
        assert!(
            header("content-security-policy").contains("default-src 'self'"),
            "{path}"
        );
    }
    // A HEAD (what a link checker or `curl -I` sends) is a GET without the body.
    let head = anonymous.head(node.url("/")).send().await.expect("send");
    assert_eq!(head.status(), StatusCode::OK);
    let missing = anonymous
        .get(node.url("/console/secrets.txt"))
        .send()
        .await
        .expect("send");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    // A wrong password is refused like no credential.
    let basic = reqwest::Client::new()
        .get(node.url("/v1/status"))
        .basic_auth("admin@medmesh.local", Some("wrong"))
        .send()
        .await
        .expect("send");
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);
}

/// One row of the matrix: a role does something; `Some(permission)` when it must be
/// refused naming that permission, `None` when it must be allowed.
struct Case {
    role: &'static str,
    method: Method,
    path: &'static str,
    body: Option<Value>,
    refused: Option<&'static str>,
}

fn case(
    role: &'static str,
    method: Method,
    path: &'static str,
    body: Option<Value>,
    refused: Option<&'static str>,
) -> Case {
    Case {
        role,
        method,
        path,
        body,
        refused,
    }
}

#[tokio::test]
async fn the_role_matrix_applies_to_collections_and_pharmacy_operations() {
    let node = Node::start().await;
    for (clinic, name) in [(CLINIC, "Kano"), (OTHER_CLINIC, "Jos")] {
        let (status, answer) = call(
            &node.admin,
            &node,
            Method::POST,
            "/v1/clinics",
            Some(json!({"id": clinic, "name": name})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }
    // The stock the pharmacy cases draw from.
    let (status, restocked) = call(
        &node.admin,
        &node,
        Method::POST,
        "/v1/pharmacy/restock",
        Some(json!({"clinic_id": CLINIC, "drug_name": "Amoxicillin 250mg", "batch_number": "B1", "quantity": 100, "expiry_date": "2031-01-31"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{restocked}");
    let (_, patient) = call(
        &node.admin,
        &node,
        Method::POST,
        "/v1/patients",
        Some(json!({"given_name": "Amina", "surname": "Okafor", "primary_clinic_id": CLINIC})),
    )
    .await;
    let patient_id = patient["id"].as_str().expect("id").to_owned();
    node.add_user("reg@clinic.org", "registrar", &[]).await;
    node.add_user("doc@clinic.org", "provider", &[]).await;
    node.add_user("pharm@clinic.org", "pharmacist", &[]).await;
    node.add_user("admin@clinic.org", "admin", &[]).await;
    node.add_user("super@clinic.org", "super_admin", &[]).await;
    node.add_user(
        "doc-dispenses@clinic.org",
        "provider",
        &[(CLINIC, &["can_view_history", "can_dispense_medications"])],
    )
    .await;
    let visit = json!({"patient_id": patient_id, "clinic_id": CLINIC});
    let dispense = json!({"clinic_id": CLINIC, "drug_name": "Amoxicillin 250mg", "quantity": 1});
    let dispense_elsewhere =
        json!({"clinic_id": OTHER_CLINIC, "drug_name": "Amoxicillin 250mg", "quantity": 1});
    let super_user = json!({"email": "x@clinic.org", "role": "super_admin"});
    let cases = vec![
        // Registrar: registers and books, reads nothing clinical.
        case(
            "reg@clinic.org",
            Method::POST,
            "/v1/patients",
            Some(json!({"given_name": "New", "primary_clinic_id": CLINIC})),
            None,
        ),
        case("reg@clinic.org", Method::GET, "/v1/patients", None, None),
        case(
            "reg@clinic.org",
            Method::POST,
            "/v1/appointments",
            Some(json!({"patient_id": patient_id, "clinic_id": CLINIC})),
            None,
        ),
        case(
            "reg@clinic.org",
            Method::GET,
            "/v1/visits",
            None,
            Some("read_clinical"),
        ),
        case(
            "reg@clinic.org",
            Method::GET,
            "/v1/events",
            None,
            Some("read_clinical"),
        ),
        case(
            "reg@clinic.org",
            Method::GET,
            "/v1/prescriptions",
            None,
            Some("read_prescriptions"),
        ),
        case(
            "reg@clinic.org",
            Method::POST,
            "/v1/visits",
            Some(visit.clone()),
            Some("write_clinical"),
        ),
        case(
            "reg@clinic.org",
            Method::GET,
            "/v1/pharmacy/stock",
            None,
            Some("read_stock"),
        ),
        case(
            "reg@clinic.org",
            Method::POST,
            "/v1/pharmacy/dispense",
            Some(dispense.clone()),
            Some("dispense"),
        ),
        case(
            "reg@clinic.org",
            Method::GET,
            "/v1/users",
            None,
            Some("manage_users"),
        ),
        case(
            "reg@clinic.org",
            Method::GET,
            "/v1/devices",
            None,
            Some("manage_devices"),
        ),
        case(
            "reg@clinic.org",
            Method::GET,
            "/v1/_access_log",
            None,
            Some("read_audit"),
        ),
        case("reg@clinic.org", Method::GET, "/v1/status", None, None),
        // Provider: clinical work and prescribing; no dispensing without the flag.
        case(
            "doc@clinic.org",
            Method::POST,
            "/v1/visits",
            Some(visit.clone()),
            None,
        ),
        case("doc@clinic.org", Method::GET, "/v1/visits", None, None),
        case(
            "doc@clinic.org",
            Method::POST,
            "/v1/prescriptions",
            Some(json!({"patient_id": patient_id, "provider_id": "p", "clinic_id": CLINIC})),
            None,
        ),
        case(
            "doc@clinic.org",
            Method::POST,
            "/v1/pharmacy/dispense",
            Some(dispense.clone()),
            Some("dispense"),
        ),
        case(
            "doc@clinic.org",
            Method::POST,
            "/v1/pharmacy/restock",
            Some(
                json!({"clinic_id": CLINIC, "drug_name": "X", "batch_number": "B", "quantity": 1}),
            ),
            Some("manage_stock"),
        ),
        case(
            "doc@clinic.org",
            Method::DELETE,
            "/v1/patients/PATIENT",
            None,
            Some("delete_patients"),
        ),
        case(
            "doc@clinic.org",
            Method::GET,
            "/v1/users",
            None,
            Some("manage_users"),
        ),
        // A provider with the flag at one clinic dispenses there, and only there.
        case(
            "doc-dispenses@clinic.org",
            Method::POST,
            "/v1/pharmacy/dispense",
            Some(dispense.clone()),
            None,
        ),
        case(
            "doc-dispenses@clinic.org",
            Method::POST,
            "/v1/pharmacy/dispense",
            Some(dispense_elsewhere),
            Some("dispense"),
        ),
        case(
            "doc-dispenses@clinic.org",
            Method::POST,
            "/v1/visits",
            Some(visit.clone()),
            Some("write_clinical"),
        ),
        // Pharmacist: stock and dispensing, nothing clinical.
        case(
            "pharm@clinic.org",
            Method::POST,
            "/v1/pharmacy/dispense",
            Some(dispense.clone()),
            None,
        ),
        case(
            "pharm@clinic.org",
            Method::POST,
            "/v1/pharmacy/restock",
            Some(
                json!({"clinic_id": CLINIC, "drug_name": "Amoxicillin 250mg", "batch_number": "B2", "quantity": 5}),
            ),
            None,
        ),
        case(
            "pharm@clinic.org",
            Method::GET,
            "/v1/prescriptions",
            None,
            None,
        ),
        case(
            "pharm@clinic.org",
            Method::GET,
            "/v1/visits",
            None,
            Some("read_clinical"),
        ),
        case(
            "pharm@clinic.org",
            Method::POST,
            "/v1/prescriptions",
            Some(json!({"patient_id": patient_id})),
            Some("prescribe"),
        ),
        // Admin: users, devices, the log; but no super admin.
        case("admin@clinic.org", Method::GET, "/v1/users", None, None),
        case("admin@clinic.org", Method::GET, "/v1/devices", None, None),
        case(
            "admin@clinic.org",
            Method::GET,
            "/v1/_access_log",
            None,
            None,
        ),
        case(
            "admin@clinic.org",
            Method::POST,
            "/v1/users",
            Some(super_user.clone()),
            Some("manage_users"),
        ),
        case(
            "super@clinic.org",
            Method::POST,
            "/v1/users",
            Some(super_user),
            None,
        ),
        case(
            "super@clinic.org",
            Method::DELETE,
            "/v1/patients/PATIENT",
            None,
            None,
        ),
    ];
    let mut clients = std::collections::HashMap::new();
    for case in &cases {
        if !clients.contains_key(case.role) {
            clients.insert(case.role, node.sign_in(case.role).await);
        }
        let path = case.path.replace("PATIENT", &patient_id);
        let (status, answer) = call(
            &clients[case.role],
            &node,
            case.method.clone(),
            &path,
            case.body.clone(),
        )
        .await;
        match case.refused {
            Some(permission) => {
                assert_eq!(
                    status,
                    StatusCode::FORBIDDEN,
                    "{} {} {path}: {answer}",
                    case.role,
                    case.method
                );
                assert_eq!(
                    answer["error"]["permission"],
                    json!(permission),
                    "{} {path}: {answer}",
                    case.role
                );
                assert!(
                    answer["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(permission)),
                    "the message names the permission: {answer}"
                );
            }
            // Allowed: not refused (a node without a mesh answers 503 for devices).
            None => assert!(
                status.is_success() || answer["error"]["code"] == json!("no_mesh"),
                "{} {} {path} should be allowed: {status} {answer}",
                case.role,
                case.method
            ),
        }
    }
}

#[tokio::test]
async fn tokens_expire_are_revoked_and_end_with_a_disabled_user() {
    let node = Node::start().await;
    let id = node.add_user("nurse@clinic.org", "provider", &[]).await;
    // Expired: opened 13 hours ago for 12.
    let long_ago = chrono::Utc::now().timestamp_millis() - 13 * 3_600_000;
    let (token, _) = node
        .state
        .access()
        .sessions
        .issue(&id, "nurse@clinic.org", 12, long_ago)
        .expect("issue");
    let (status, answer) = call(
        &client_with_token(&token),
        &node,
        Method::GET,
        "/v1/me",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    // Signed out.
    let nurse = node.sign_in("nurse@clinic.org").await;
    let (status, me) = call(&nurse, &node, Method::GET, "/v1/me", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["role"], json!("provider"));
    assert!(
        me["permissions"]
            .as_array()
            .expect("list")
            .contains(&json!("write_clinical"))
    );
    let (status, _) = call(&nurse, &node, Method::DELETE, "/v1/sessions/current", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&nurse, &node, Method::GET, "/v1/me", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Disabled: the open session stops working, and so does the password.
    let nurse = node.sign_in("nurse@clinic.org").await;
    let (status, _) = call(
        &node.admin,
        &node,
        Method::PATCH,
        &format!("/v1/users/{id}"),
        Some(json!({"disabled_at": "2026-12-01T10:00:00Z"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = call(&nurse, &node, Method::GET, "/v1/me", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    let refused = reqwest::Client::new()
        .post(node.url("/v1/sessions"))
        .json(&json!({"email": "nurse@clinic.org", "password": PASSWORD}))
        .send()
        .await
        .expect("send");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let answer: Value = refused.json().await.expect("json");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("disabled")),
        "{answer}"
    );
}

#[tokio::test]
async fn a_web_page_can_neither_rebind_post_a_form_nor_read_answers() {
    let node = Node::start().await;
    // DNS rebinding: a page of evil.example whose name now points at the node.
    let rebound = node
        .admin
        .get(node.url("/v1/patients"))
        .header("host", "evil.example:7400")
        .send()
        .await
        .expect("send");
    assert_eq!(rebound.status(), StatusCode::MISDIRECTED_REQUEST);
    let named = node
        .admin
        .get(node.url("/v1/status"))
        .header("host", "clinic-laptop.local:7400")
        .send()
        .await
        .expect("send");
    assert_eq!(
        named.status(),
        StatusCode::OK,
        "a name given with --api-host works"
    );
    // A cross-site form: urlencoded, multipart or text/plain bodies are refused, even
    // with the browser's remembered credentials.
    for content_type in [
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain",
    ] {
        let form = node
            .admin
            .post(node.url("/v1/patients"))
            .header("content-type", content_type)
            .body("{\"given_name\": \"Forged\"}")
            .send()
            .await
            .expect("send");
        assert_eq!(
            form.status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type}"
        );
    }
    let (_, list) = call(&node.admin, &node, Method::GET, "/v1/patients", None).await;
    assert_eq!(list["records"], json!([]), "nothing was written");
    // No CORS for other origins: the browser keeps the answer from the page.
    for origin in ["https://evil.example", "null"] {
        let answer = node
            .admin
            .get(node.url("/v1/status"))
            .header("origin", origin)
            .send()
            .await
            .expect("send");
        assert!(
            answer
                .headers()
                .get("access-control-allow-origin")
                .is_none(),
            "{origin}"
        );
        let preflight = reqwest::Client::new()
            .request(Method::OPTIONS, node.url("/v1/patients"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
            .await
            .expect("send");
        assert!(
            preflight
                .headers()
                .get("access-control-allow-origin")
                .is_none(),
            "{origin}"
        );
    }
    // The configured origin is allowed.
    let preflight = reqwest::Client::new()
        .request(Method::OPTIONS, node.url("/v1/patients"))
        .header("origin", ORIGIN)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("send");
    assert_eq!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some(ORIGIN)
    );
}

#[tokio::test]
async fn history_names_the_signed_in_user_and_reads_are_logged() {
    let node = Node::start().await;
    node.add_user("amy@clinic.org", "provider", &[]).await;
    let amy = node.sign_in("amy@clinic.org").await;
    let created = amy
        .post(node.url("/v1/patients"))
        .header("x-medmesh-user", "someone-else")
        .json(&json!({"given_name": "Fatima", "primary_clinic_id": CLINIC}))
        .send()
        .await
        .expect("send");
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    let (status, history) = call(
        &amy,
        &node,
        Method::GET,
        &format!("/v1/patients/{id}/history"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        history["changes"][0]["user"],
        json!("amy@clinic.org"),
        "{history}"
    );
    let (status, _) = call(
        &amy,
        &node,
        Method::GET,
        &format!("/v1/patients/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Both reads are in the log (written within a moment), for an admin to see.
    let path = format!("/v1/_access_log?patient_id={id}");
    let mut entries = Vec::new();
    for _ in 0..100 {
        let (status, log) = call(&node.admin, &node, Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{log}");
        entries = log["records"].as_array().cloned().unwrap_or_default();
        if entries.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let actions: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"history") && actions.contains(&"read"),
        "{entries:?}"
    );
    assert!(
        entries.iter().all(|e| e["user"] == json!("amy@clinic.org")),
        "{entries:?}"
    );
    // The log cannot be changed through the API.
    let entry = entries[0]["id"].as_str().expect("id");
    let (status, _) = call(
        &node.admin,
        &node,
        Method::DELETE,
        &format!("/v1/_access_log/{entry}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn admins_stay_in_their_clinic_deletions_need_the_delete_permission_and_emails_are_unique() {
    let node = Node::start().await;
    let clinic_admin = node
        .add_user_at("kano-admin@clinic.org", "admin", Some(CLINIC), &[])
        .await;
    let nurse = node
        .add_user_at("nurse@clinic.org", "provider", Some(CLINIC), &[])
        .await;
    let admin = node.sign_in("kano-admin@clinic.org").await;
    // Users of their own clinic, yes; of another clinic or another admin, no.
    let (status, answer) = call(
        &admin,
        &node,
        Method::POST,
        "/v1/users",
        Some(json!({"email": "reg2@clinic.org", "role": "registrar", "clinic_id": CLINIC})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let (status, answer) = call(
        &admin,
        &node,
        Method::POST,
        "/v1/users",
        Some(json!({"email": "jos@clinic.org", "role": "registrar", "clinic_id": OTHER_CLINIC})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(answer["error"]["permission"], json!("manage_users"));
    let (status, answer) = call(
        &admin,
        &node,
        Method::POST,
        "/v1/users",
        Some(json!({"email": "admin2@clinic.org", "role": "admin", "clinic_id": CLINIC})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    // One email, one user (compared without case).
    let (status, answer) = call(
        &admin,
        &node,
        Method::POST,
        "/v1/users",
        Some(json!({"email": "NURSE@clinic.org", "role": "registrar", "clinic_id": CLINIC})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    // A provider may edit a patient but not delete it by setting `deleted_at`.
    let doc = node.sign_in("nurse@clinic.org").await;
    let (_, patient) = call(
        &doc,
        &node,
        Method::POST,
        "/v1/patients",
        Some(json!({"given_name": "Musa", "primary_clinic_id": CLINIC})),
    )
    .await;
    let path = format!("/v1/patients/{}", patient["id"].as_str().expect("id"));
    let (status, _) = call(
        &doc,
        &node,
        Method::PATCH,
        &path,
        Some(json!({"phone": "0803"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = call(
        &doc,
        &node,
        Method::PATCH,
        &path,
        Some(json!({"deleted_at": "2026-12-01T10:00:00Z", "is_deleted": true})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(answer["error"]["permission"], json!("delete_patients"));
    // A new password ends the sessions opened with the old one.
    let (status, _) = call(
        &admin,
        &node,
        Method::PATCH,
        &format!("/v1/users/{nurse}"),
        Some(json!({"hashed_password": bcrypt::hash("a new password", 4).expect("hash")})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&doc, &node, Method::GET, "/v1/me", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The change feed never shows a password hash.
    let (status, feed) = call(&node.admin, &node, Method::GET, "/v1/changes", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !feed.to_string().contains("$2"),
        "a bcrypt hash in the feed"
    );
    let _ = clinic_admin;
}

#[tokio::test]
async fn the_apps_sync_gives_and_takes_only_what_the_role_may() {
    let node = Node::start().await;
    let (_, patient) = call(
        &node.admin,
        &node,
        Method::POST,
        "/v1/patients",
        Some(json!({"given_name": "Zainab"})),
    )
    .await;
    let patient_id = patient["id"].as_str().expect("id").to_owned();
    let (status, _) = call(
        &node.admin,
        &node,
        Method::POST,
        "/v1/visits",
        Some(json!({"patient_id": patient_id})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    node.add_user("reg@clinic.org", "registrar", &[]).await;
    node.add_user("doc@clinic.org", "provider", &[]).await;
    let app = reqwest::Client::new();
    let pull = |email: &'static str| {
        app.get(node.url("/api/v2/sync?last_pulled_at=0"))
            .basic_auth(email, Some(PASSWORD))
            .send()
    };
    let registrar: Value = pull("reg@clinic.org")
        .await
        .expect("pull")
        .json()
        .await
        .expect("json");
    assert_eq!(
        registrar["changes"]["patients"]["created"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{registrar}"
    );
    assert_eq!(
        registrar["changes"]["visits"]["created"],
        json!([]),
        "a registrar gets no visits"
    );
    let provider: Value = pull("doc@clinic.org")
        .await
        .expect("pull")
        .json()
        .await
        .expect("json");
    assert_eq!(
        provider["changes"]["visits"]["created"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    // A provider without the clinic flag cannot push a dispense; nothing is stored.
    let push = app
        .post(node.url("/api/v2/sync?last_pulled_at=0"))
        .basic_auth("doc@clinic.org", Some(PASSWORD))
        .json(&json!({"dispensing_records": {"created": [{
            "id": "0192f0c4-6a1e-7cc3-9d0e-0000000000d1", "patient_id": patient_id,
            "drug_id": "0192f0c4-6a1e-7cc3-9d0e-0000000000d2", "quantity_dispensed": 2}],
            "updated": [], "deleted": []}}))
        .send()
        .await
        .expect("push");
    assert_eq!(push.status(), StatusCode::FORBIDDEN);
    let (_, dispensed) = call(
        &node.admin,
        &node,
        Method::GET,
        "/v1/dispensing_records",
        None,
    )
    .await;
    assert_eq!(dispensed["records"], json!([]));
}

#[tokio::test]
async fn a_password_given_to_the_api_is_hashed_by_the_node_and_a_new_user_gets_its_roles_permissions()
 {
    let node = Node::start().await;
    let admin_id = node.add_user("admin@clinic.org", "admin", &[]).await;
    assert!(!admin_id.is_empty());
    let admin = node.sign_in("admin@clinic.org").await;
    let (status, refused) = call(
        &admin,
        &node,
        Method::POST,
        "/v1/users",
        Some(json!({"email": "nurse@clinic.org", "name": "Nurse", "role": "registrar", "password": "short"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["error"]["field"], "password", "{refused}");
    // Longer than bcrypt reads: refused too, rather than cut short unseen.
    let (status, refused) = call(
        &admin,
        &node,
        Method::POST,
        "/v1/users",
        Some(json!({"email": "nurse@clinic.org", "name": "Nurse", "role": "registrar", "password": "x".repeat(73)})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["error"]["field"], "password", "{refused}");
    let (status, made) = call(
        &admin,
        &node,
        Method::POST,
        "/v1/users",
        Some(
            json!({"email": "nurse@clinic.org", "name": "Nurse", "role": "registrar",
                    "clinic_id": CLINIC, "password": "first password"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    assert_eq!(made["hashed_password"], "************");
    assert!(made.get("password").is_none(), "{made}");
    let id = made["id"].as_str().expect("id").to_owned();
    let stored = node
        .state
        .store()
        .get("users", &id.parse().expect("id"))
        .expect("stored");
    let hash = stored.record["hashed_password"].as_str().expect("hash");
    assert!(bcrypt::verify("first password", hash).expect("bcrypt"));
    // What the Hikma cloud gives a new registrar at their clinic.
    let (_, rows) = call(
        &admin,
        &node,
        Method::GET,
        &format!("/v1/user_clinic_permissions?user_id={id}"),
        None,
    )
    .await;
    let row = &rows["records"][0];
    assert_eq!(row["clinic_id"], CLINIC, "{rows}");
    assert_eq!(row["can_register_patients"], true, "{rows}");
    assert_eq!(row["can_view_history"], false, "{rows}");

    let sign_in = |password: &'static str| {
        let url = node.url("/v1/sessions");
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({"email": "nurse@clinic.org", "password": password}))
                .send()
                .await
                .expect("sign in")
                .status()
        }
    };
    assert_eq!(sign_in("first password").await, StatusCode::CREATED);
    let (status, answer) = call(
        &admin,
        &node,
        Method::PATCH,
        &format!("/v1/users/{id}"),
        Some(json!({"password": "second password"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(sign_in("first password").await, StatusCode::UNAUTHORIZED);
    assert_eq!(sign_in("second password").await, StatusCode::CREATED);
}
