//! The `medmesh` command line against a running node.

use std::io::Write;

use medmesh_tests::{NodeProcess, patient};

fn medmesh(api: &str, args: &[&str]) -> (bool, String, String) {
    let out = medmesh_tests::medmesh_command()
        .args(args)
        .args(["--api", api])
        .output()
        .expect("run medmesh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn import_reports_refused_lines_and_keeps_the_good_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node")).expect("node");
    let file = dir.path().join("patients.jsonl");
    let mut f = std::fs::File::create(&file).expect("file");
    for i in 0..1500 {
        match i {
            3 => writeln!(f, "{{\"given_name\": \"broken").expect("write"),
            7 => writeln!(
                f,
                "{{\"given_name\": \"X\", \"date_of_birth\": \"31/12/1990\"}}"
            )
            .expect("write"),
            9 => writeln!(f, "[1, 2, 3]").expect("write"),
            11 => writeln!(f).expect("write"),
            _ => writeln!(f, "{}", patient(i)).expect("write"),
        }
    }
    drop(f);
    let (ok, stdout, stderr) = medmesh(
        &node.api,
        &["import", "patients", file.to_str().expect("path")],
    );
    assert!(!ok, "an import with refused lines exits with failure");
    assert!(
        stdout.contains("Imported 1496 record(s) into patients; 3 line(s) refused."),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("line 4: not valid JSON"), "{stdout}");
    assert!(
        stdout.contains("line 8:") && stdout.contains("date_of_birth"),
        "{stdout}"
    );
    assert!(stdout.contains("line 10: not a JSON object"), "{stdout}");

    let (ok, exported, _) = medmesh(&node.api, &["export", "patients"]);
    assert!(ok);
    assert_eq!(exported.lines().count(), 1496);
    let first: serde_json::Value =
        serde_json::from_str(exported.lines().next().expect("a line")).expect("json");
    assert!(first["given_name"].is_string());
    // Importing the same file again refuses every record as already existing.
    let (_, stdout, _) = medmesh(
        &node.api,
        &["import", "patients", file.to_str().expect("path")],
    );
    assert!(stdout.contains("Imported 0 record(s)"), "{stdout}");
    assert!(stdout.contains("already exists"), "{stdout}");

    // The database file's free space given back, with the node stopped (refused while
    // it runs), and every record still there.
    let data = dir.path().join("node");
    let compact = || {
        medmesh_tests::medmesh_command()
            .args(["compact", "--details", "--data"])
            .arg(&data)
            .output()
            .expect("run medmesh compact")
    };
    let refused = compact();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("stop the node first"),
        "{refused:?}"
    );
    let mut node = node;
    node.stop();
    let done = compact();
    let said = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success() && said.contains("went from"),
        "{done:?}"
    );
    assert!(
        said.contains("MB of entries"),
        "what each table holds: {said}"
    );
    let node = NodeProcess::start(&data).expect("node again");
    let (ok, exported, _) = medmesh(&node.api, &["export", "patients"]);
    assert!(ok);
    assert_eq!(exported.lines().count(), 1496);
}

#[test]
fn put_get_list_delete_history_and_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node")).expect("node");
    let (ok, out, err) = medmesh(
        &node.api,
        &[
            "put",
            "patients",
            r#"{"given_name": "Amina", "surname": "Okafor"}"#,
        ],
    );
    assert!(ok, "{err}");
    let record: serde_json::Value = serde_json::from_str(&out).expect("json");
    let id = record["id"].as_str().expect("id").to_owned();
    // put with the id of an existing record replaces it.
    let (ok, out, err) = medmesh(
        &node.api,
        &[
            "put",
            "patients",
            &format!(r#"{{"id": "{id}", "given_name": "Amina", "surname": "Bello"}}"#),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("Bello"));
    let (ok, out, _) = medmesh(&node.api, &["get", "patients", &id]);
    assert!(ok && out.contains("Bello"));
    let (ok, out, _) = medmesh(
        &node.api,
        &["list", "patients", "--where", "given_name=ami*"],
    );
    assert!(ok && out.lines().count() == 1, "{out}");
    let (ok, out, _) = medmesh(&node.api, &["history", "patients", &id]);
    assert!(ok);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.contains("user this device's command line")
            && out.contains("changed: surname, updated_at"),
        "{out}"
    );
    // The device is the one whose signature the change carries.
    assert!(
        out.lines()
            .all(|l| l.contains("device 12D3KooW") && !l.contains("vouched")),
        "{out}"
    );
    let (ok, _, _) = medmesh(&node.api, &["delete", "patients", &id]);
    assert!(ok);
    let (ok, out, _) = medmesh(&node.api, &["list", "patients"]);
    assert!(ok && out.is_empty(), "{out}");
    let (ok, out, _) = medmesh(&node.api, &["status"]);
    assert!(ok && out.contains("Node:") && out.contains("12D3"), "{out}");
    let (ok, _, err) = medmesh(
        &node.api,
        &["get", "patients", "0192f0c4-6a1e-7cc3-9d0e-5b8f1c2a3d4e"],
    );
    assert!(!ok && err.contains("no record"), "{err}");
}

#[test]
fn a_client_without_a_node_says_what_to_do() {
    let port = medmesh_tests::free_port();
    let (ok, _, err) = medmesh(&format!("127.0.0.1:{port}"), &["status"]);
    assert!(!ok);
    assert!(err.contains("is it running?"), "{err}");
}

#[test]
fn init_then_start_keep_the_same_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let out = medmesh_tests::medmesh_command()
        .args(["init", "--data"])
        .arg(&data)
        .output()
        .expect("init");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let peer = text
        .lines()
        .find_map(|l| l.strip_prefix("Node id: "))
        .expect("init prints the node id")
        .to_owned();
    for _ in 0..2 {
        let node = NodeProcess::start(&data).expect("node");
        let (ok, out, _) = medmesh(&node.api, &["status"]);
        assert!(ok && out.contains(&peer), "{out}");
    }
    // The records and the device's keys are readable by the directory's owner only.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&data)
            .expect("data dir")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "data directory mode {mode:o}");
        let mode = std::fs::metadata(data.join("owner.key"))
            .expect("owner key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "owner key mode {mode:o}");
    }
}

#[test]
fn pharmacy_commands_restock_dispense_alert_and_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node")).expect("node");
    let (ok, out, err) = medmesh(&node.api, &["put", "clinics", r#"{"name": "Jos"}"#]);
    assert!(ok, "{err}");
    let clinic: serde_json::Value = serde_json::from_str(&out).expect("json");
    let clinic = clinic["id"].as_str().expect("id").to_owned();
    let (ok, out, err) = medmesh(
        &node.api,
        &[
            "restock",
            "--clinic",
            &clinic,
            "--drug",
            "ORS sachets",
            "--batch",
            "o-1",
            "--expiry",
            "2030-05-01",
            "--quantity",
            "20",
            "--reorder-level",
            "5",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("now holds 20"), "{out}");
    let (ok, out, err) = medmesh(
        &node.api,
        &[
            "dispense",
            "--clinic",
            &clinic,
            "--drug",
            "ors sachet",
            "--quantity",
            "16",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("Dispensed 16 from batch O-1 (4 left)"),
        "{out}"
    );
    let (ok, out, _) = medmesh(&node.api, &["stock", "--clinic", &clinic]);
    assert!(
        ok && out.contains("ORS sachets") && out.contains("quantity      4"),
        "{out}"
    );
    let (ok, out, _) = medmesh(&node.api, &["alerts", "--clinic", &clinic]);
    assert!(ok && out.contains("Low stock: 1"), "{out}");
    let (ok, out, _) = medmesh(&node.api, &["verify-stock"]);
    assert!(ok && out.contains("All 1 stock item(s) match"), "{out}");
    let (ok, _, err) = medmesh(
        &node.api,
        &[
            "dispense",
            "--clinic",
            &clinic,
            "--drug",
            "ORS sachets",
            "--quantity",
            "0",
        ],
    );
    assert!(!ok && err.contains("quantity"), "{err}");
}

/// Runs `medmesh` with `stdin` as its standard input and no token in the environment:
/// the command finds the node's token in `--data`.
fn medmesh_in(
    data: &std::path::Path,
    api: &str,
    args: &[&str],
    stdin: &str,
) -> (bool, String, String) {
    let mut child = std::process::Command::new(medmesh_tests::medmesh_bin())
        .args(args)
        .args(["--api", api, "--data"])
        .arg(data)
        .env_remove("MEDMESH_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run medmesh");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("stdin");
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sign_in(api: &str, email: &str, password: &str) -> u16 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        reqwest::Client::new()
            .post(format!("http://{api}/v1/sessions"))
            .json(&serde_json::json!({"email": email, "password": password}))
            .send()
            .await
            .expect("sign in")
            .status()
            .as_u16()
    })
}

#[test]
fn the_first_admin_and_users_are_managed_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let out = std::process::Command::new(medmesh_tests::medmesh_bin())
        .args(["init", "--data"])
        .arg(&data)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("init");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let password = text
        .lines()
        .find_map(|l| l.split_once("admin@medmesh.local, password: "))
        .map(|(_, p)| p.trim().to_owned())
        .expect("init prints the first admin's password once");
    let node = NodeProcess::start(&data).expect("node");
    assert_eq!(sign_in(&node.api, "admin@medmesh.local", &password), 201);
    assert_eq!(
        sign_in(&node.api, "admin@medmesh.local", "not-the-password"),
        401
    );
    // The command line finds the node's token in the data directory.
    let (ok, out, err) = medmesh_in(
        &data,
        &node.api,
        &[
            "users",
            "add",
            "nurse@clinic.org",
            "--name",
            "Amina",
            "--role",
            "provider",
            "--clinic",
            "0192f0c4-6a1e-7cc3-9d0e-00000000c1c1",
        ],
        "a-long-password\n",
    );
    assert!(ok, "{out}{err}");
    assert_eq!(
        sign_in(&node.api, "nurse@clinic.org", "a-long-password"),
        201
    );
    let (ok, out, _) = medmesh_in(&data, &node.api, &["users", "list"], "");
    assert!(
        ok && out.contains("nurse@clinic.org") && !out.contains("$2"),
        "{out}"
    );
    let (ok, _, err) = medmesh_in(
        &data,
        &node.api,
        &["users", "disable", "nurse@clinic.org"],
        "",
    );
    assert!(ok, "{err}");
    assert_eq!(
        sign_in(&node.api, "nurse@clinic.org", "a-long-password"),
        401
    );
    let (ok, _, err) = medmesh_in(
        &data,
        &node.api,
        &["users", "enable", "nurse@clinic.org"],
        "",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = medmesh_in(
        &data,
        &node.api,
        &["users", "passwd", "nurse@clinic.org"],
        "another-password\n",
    );
    assert!(ok, "{err}");
    assert_eq!(
        sign_in(&node.api, "nurse@clinic.org", "a-long-password"),
        401
    );
    assert_eq!(
        sign_in(&node.api, "nurse@clinic.org", "another-password"),
        201
    );
    // Without the data directory and without a token, the command says what to do.
    let elsewhere = dir.path().join("elsewhere");
    let (ok, _, err) = medmesh_in(&elsewhere, &node.api, &["status"], "");
    assert!(!ok && err.contains("--token"), "{err}");
}
