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
        out.contains("user registrar-1") && out.contains("changed: surname, updated_at"),
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
