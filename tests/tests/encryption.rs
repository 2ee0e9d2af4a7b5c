//! The data directory at rest: a copy of it shows no record, no field value and no
//! private key; a passphrase protects the key, a wrong one changes nothing; a store of
//! an older, unencrypted node is encrypted when it is opened.

use std::path::Path;

use medmesh_tests::{Api, NodeProcess};
use serde_json::{Value, json};

const SURNAME: &str = "Okonkwo-Zebedee";
const PHONE: &str = "+234 803 555 0199";

fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            found.push(path.display().to_string());
        }
    }
    found
}

/// Files and directories under `dir` (itself included) that others than the owner can
/// read, write or enter.
fn open_to_others(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut open = Vec::new();
    let mode = std::fs::metadata(dir).expect("meta").permissions().mode();
    if mode & 0o077 != 0 {
        open.push(format!("{} {mode:o}", dir.display()));
    }
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            open.extend(open_to_others(&path));
        } else {
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            if mode & 0o077 != 0 {
                open.push(format!("{} {mode:o}", path.display()));
            }
        }
    }
    open
}

async fn write_patient(node: &NodeProcess) -> String {
    let (status, created) = Api::new(&node.api)
        .post(
            "/v1/patients",
            &json!({"given_name": "Adaeze", "surname": SURNAME, "phone": PHONE}),
        )
        .await
        .expect("post");
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().expect("id").to_owned()
}

async fn read_patient(node: &NodeProcess, id: &str) -> Value {
    Api::new(&node.api)
        .get(&format!("/v1/patients/{id}"))
        .await
        .expect("get")
        .1
}

fn init(data: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = medmesh_tests::medmesh_command()
        .args(["init", "--data"])
        .arg(data)
        .env_remove("MEDMESH_PASSPHRASE")
        .envs(env.iter().copied())
        .output()
        .expect("init");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_the_data_directory_shows_no_record_and_no_private_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    // An older node's store, unencrypted: the values are there in plain text (so the
    // search below can find what it looks for).
    let data = dir.path().join("node");
    let mut node = NodeProcess::start_peered_env(
        &data,
        &[],
        &[(medmesh::keys::UNENCRYPTED_FOR_BENCHMARK, "1")],
    )
    .expect("node");
    let id = write_patient(&node).await;
    node.stop();
    assert!(
        !files_containing(&data, SURNAME.as_bytes()).is_empty(),
        "the plain store holds the name"
    );
    // Opened by this medmesh: encrypted, nothing lost.
    let mut node = NodeProcess::start(&data).expect("node");
    assert_eq!(read_patient(&node, &id).await["surname"], json!(SURNAME));
    let (_, status) = Api::new(&node.api).get("/v1/status").await.expect("status");
    assert!(
        status["encryption"]
            .as_str()
            .is_some_and(|p| p.starts_with("encrypted")),
        "{status}"
    );
    let second = write_patient(&node).await;
    node.stop();
    assert!(medmesh_storage::crypt::is_encrypted_store_file(
        &data.join("medmesh.redb")
    ));
    assert_eq!(
        open_to_others(&data),
        Vec::<String>::new(),
        "every file is 0600, the directory 0700"
    );
    for needle in [SURNAME, PHONE, "Adaeze", "given_name", &id, &second] {
        assert_eq!(
            files_containing(&data, needle.as_bytes()),
            Vec::<String>::new(),
            "{needle}"
        );
    }
    // The owner key is sealed with the data key: its seed is in no file.
    let owner = medmesh::trust::read_owner(&data)
        .expect("read")
        .expect("owner");
    let seed = owner
        .seed()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    assert_eq!(
        files_containing(&data, seed.as_bytes()),
        Vec::<String>::new()
    );
    assert_eq!(files_containing(&data, &owner.seed()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passphrase_protects_the_key_and_a_wrong_one_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let right = [("MEDMESH_PASSPHRASE", "the right passphrase")];
    let (ok, out) = init(&data, &right);
    assert!(ok, "{out}");
    let mut node = NodeProcess::start_peered_env(&data, &[], &right).expect("node");
    let id = write_patient(&node).await;
    node.stop();
    let store = data.join("medmesh.redb");
    let before = std::fs::read(&store).expect("store");
    // Wrong or missing passphrase: refused, saying what is wrong, and nothing changed.
    let (ok, out) = init(&data, &[("MEDMESH_PASSPHRASE", "a wrong passphrase")]);
    assert!(!ok && out.contains("passphrase is wrong"), "{out}");
    let (ok, out) = init(&data, &[]);
    assert!(!ok && out.contains("MEDMESH_PASSPHRASE"), "{out}");
    assert!(
        std::fs::read(&store).expect("store") == before,
        "the store is unchanged"
    );
    // The key file alone does not open the data (it is wrapped).
    let key_file = std::fs::read_to_string(data.join(medmesh::keys::KEY_FILE)).expect("key");
    assert!(
        key_file.contains("\"passphrase\"") && !key_file.contains("\"key\""),
        "{key_file}"
    );
    // Rekey to the key file: the passphrase is no longer needed.
    let out = medmesh_tests::medmesh_command()
        .args(["rekey", "--no-passphrase", "--data"])
        .arg(&data)
        .envs(right)
        .output()
        .expect("rekey");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut node = NodeProcess::start(&data).expect("node without a passphrase");
    assert_eq!(read_patient(&node, &id).await["surname"], json!(SURNAME));
    node.stop();
}
