//! The Hikma app's own sync engine — WatermelonDB 0.28's `synchronize()`, under Node.js —
//! against a node process: first sync, a column changed on the tablet while another
//! changed on the node (both survive), a record made and deleted on the tablet, and a
//! sync with nothing new that changes nothing. Needs Node.js 18+ and npm; the packages
//! (`tests/watermelondb/package-lock.json`) are installed on first run with `npm ci`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use medmesh_tests::{NodeProcess, join_mesh};
use serde_json::{Value, json};

const EMAIL: &str = "amina@kano.clinic";
const PASSWORD: &str = "a long enough password";

fn client_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("watermelondb")
}

/// Installs the client's packages when they are not there yet.
fn install_client() {
    let dir = client_dir();
    if dir.join("node_modules/@nozbe/watermelondb").is_dir() {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .status()
        .expect("npm is needed for this test: install Node.js 18+ and npm");
    assert!(status.success(), "npm install failed in {}", dir.display());
}

/// The app: one WatermelonDB database, driven a step at a time.
struct App {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl App {
    fn start(base: &str) -> Self {
        let mut child = Command::new("node")
            .arg("client.js")
            .args([base, EMAIL, PASSWORD])
            .current_dir(client_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node is needed for this test: install Node.js 18+");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    fn step(&mut self, step: Value) -> Value {
        writeln!(self.stdin, "{step}").expect("write a step");
        self.stdin.flush().expect("flush");
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).expect("read an answer");
            assert!(n > 0, "the app exited during {step}");
            // WatermelonDB logs its own lines too; answers are JSON objects.
            if let Ok(answer @ Value::Object(_)) = serde_json::from_str::<Value>(line.trim()) {
                assert!(answer.get("error").is_none(), "{step}: {answer}");
                return answer;
            }
        }
    }

    fn patient(&mut self, id: &str) -> Option<Value> {
        self.step(json!({"op": "list"}))["patients"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["id"] == json!(id))
            .cloned()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_own_sync_engine_syncs_field_by_field_with_a_node() {
    install_client();
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node")).expect("node");
    let http = medmesh_tests::http();
    let post = async |path: &str, body: Value| -> Value {
        let response = http
            .post(node.url(path))
            .json(&body)
            .send()
            .await
            .expect("post");
        assert!(response.status().is_success(), "{path}");
        response.json().await.expect("json")
    };
    let hashed = medmesh::users::hash_password(PASSWORD).expect("hash");
    post(
        "/v1/users",
        // An admin: the app deletes a patient here, which a provider may not by default.
        json!({"email": EMAIL, "name": "Amina", "role": "admin", "hashed_password": hashed}),
    )
    .await;
    let created = post(
        "/v1/patients",
        json!({"given_name": "Bola", "surname": "Bello", "date_of_birth": "1990-04-02",
               "metadata": {"source": "registration"}}),
    )
    .await;
    let id = created["id"].as_str().expect("id").to_owned();
    let get = async |id: &str| -> Value {
        http.get(node.url(&format!("/v1/patients/{id}")))
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json")
    };
    let position = async || -> u64 {
        let status: Value = http
            .get(node.url("/v1/status"))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        status["feed"]["seq"].as_u64().expect("seq")
    };

    let mut app = App::start(&node.url(""));
    app.step(json!({"op": "sync"}));
    let local = app.patient(&id).expect("the first sync brings the patient");
    assert_eq!(local["given_name"], json!("Bola"));
    assert_eq!(local["date_of_birth"], json!("1990-04-02"));
    assert_eq!(local["metadata"], json!("{\"source\":\"registration\"}"));
    assert!(local["created_at"].is_number());

    // The node changes the phone; the tablet, not yet knowing, changes the surname.
    let response = http
        .patch(node.url(&format!("/v1/patients/{id}")))
        .json(&json!({"phone": "+234 803 555 0101"}))
        .send()
        .await
        .expect("patch");
    assert!(response.status().is_success());
    app.step(json!({"op": "update", "id": id, "fields": {"surname": "Bello-Okafor"}}));
    app.step(json!({"op": "sync"}));
    let merged = get(&id).await;
    assert_eq!(merged["surname"], json!("Bello-Okafor"), "{merged}");
    assert_eq!(merged["phone"], json!("+234 803 555 0101"), "{merged}");
    assert_eq!(merged["given_name"], json!("Bola"));
    let local = app.patient(&id).expect("still there");
    assert_eq!(local["phone"], json!("+234 803 555 0101"));
    assert_eq!(local["surname"], json!("Bello-Okafor"));

    // A patient registered on the tablet reaches the node; a sync with nothing new
    // changes nothing there.
    let made =
        app.step(json!({"op": "create", "fields": {"given_name": "Chidi", "surname": "Obi"}}));
    let made = made["id"].as_str().expect("id").to_owned();
    app.step(json!({"op": "sync"}));
    assert_eq!(get(&made).await["given_name"], json!("Chidi"));
    let before = position().await;
    app.step(json!({"op": "sync"}));
    assert_eq!(position().await, before, "a quiet sync writes nothing");

    // Deleted on the tablet: a tombstone on the node.
    app.step(json!({"op": "delete", "id": made}));
    app.step(json!({"op": "sync"}));
    assert!(get(&made).await["deleted_at"].is_string());

    // The tablet moves to another node of the mesh, whose timestamps it has never seen:
    // it gets a complete answer, misses nothing, and its edits reach both nodes.
    let other_dir = dir.path().join("other");
    join_mesh(&node.data, &other_dir).expect("join");
    let other = NodeProcess::start_peered(&other_dir, std::slice::from_ref(&node.listen), None)
        .expect("other node");
    let later = post(
        "/v1/patients",
        json!({"given_name": "Dina", "surname": "Mensah"}),
    )
    .await;
    let later = later["id"].as_str().expect("id").to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let there = http
            .get(other.url(&format!("/v1/patients/{later}")))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if there {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the mesh did not carry the patient"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    app.step(json!({"op": "server", "base": other.url("")}));
    app.step(json!({"op": "sync"}));
    assert_eq!(
        app.patient(&later)
            .expect("the other node's pull misses nothing")["given_name"],
        json!("Dina")
    );
    assert!(app.patient(&made).is_none(), "a deleted patient came back");
    app.step(json!({"op": "update", "id": id, "fields": {"given_name": "Bolanle"}}));
    app.step(json!({"op": "sync"}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while get(&id).await["given_name"] != json!("Bolanle") {
        assert!(
            std::time::Instant::now() < deadline,
            "the edit did not reach the first node"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(get(&id).await["surname"], json!("Bello-Okafor"));
}
