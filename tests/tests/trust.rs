//! Trust between devices, with `medmesh` processes on loopback: single-use invites,
//! expiry, admin-only invites, revocation across a chain of five nodes while they write,
//! and the upgrade of a mesh of the shared-secret format.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use medmesh_tests::{Api, NodeProcess, eventually, join_mesh, patient};
use serde_json::json;

fn medmesh(args: &[&str]) -> Output {
    medmesh_tests::medmesh_command()
        .args(args)
        .output()
        .expect("run medmesh")
}

fn init(dir: &Path) {
    let out = medmesh(&["init", "--data", &dir.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `medmesh invite` on a running admin node: the invite (its last line).
fn invite(dir: &Path, extra: &[&str]) -> String {
    medmesh_tests::invite_device(dir, extra)
}

fn join(dir: &Path, invite: &str) -> Output {
    medmesh_tests::join_with_invite(dir, invite, "joiner")
}

async fn peer_id(api: &Api) -> String {
    let (_, status) = api.get("/v1/status").await.expect("status");
    status["peer_id"].as_str().expect("peer id").to_owned()
}

async fn create(api: &Api, given: &str) -> String {
    let (code, created) = api
        .post("/v1/patients", &json!({"given_name": given}))
        .await
        .expect("post");
    assert_eq!(code, 201, "{created}");
    created["id"].as_str().expect("id").to_owned()
}

async fn has(api: &Api, id: &str) -> bool {
    matches!(api.get(&format!("/v1/patients/{id}")).await, Ok((200, _)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_admits_one_device_once_even_when_two_race_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let da = dir.path().join("admin");
    init(&da);
    let admin = NodeProcess::start(&da).expect("admin node");
    let admin_api = Api::new(&admin.api);
    let text = invite(&da, &["--kind", "tablet"]);
    assert!(text.starts_with("medmesh-invite-2:"), "{text}");

    // Two devices use the same invite at the same moment: exactly one is admitted.
    let (db, dc) = (dir.path().join("b"), dir.path().join("c"));
    let (first, second) = {
        let t1 = text.clone();
        let t2 = text.clone();
        let (b1, c1) = (db.clone(), dc.clone());
        let one = std::thread::spawn(move || join(&b1, &t1));
        let two = std::thread::spawn(move || join(&c1, &t2));
        (one.join().expect("b"), two.join().expect("c"))
    };
    let outcomes = [(&db, &first), (&dc, &second)];
    let admitted: Vec<_> = outcomes
        .iter()
        .filter(|(_, o)| o.status.success())
        .collect();
    let refused: Vec<_> = outcomes
        .iter()
        .filter(|(_, o)| !o.status.success())
        .collect();
    assert_eq!(
        admitted.len(),
        1,
        "one device is admitted: {first:?} {second:?}"
    );
    assert_eq!(refused.len(), 1);
    let refusal = String::from_utf8_lossy(&refused[0].1.stderr);
    assert!(refusal.contains("already been used"), "{refusal}");
    assert!(!refused[0].0.join("device.cert").exists());

    // The used invite admits nobody later either.
    let late = join(&dir.path().join("d"), &text);
    assert!(!late.status.success());
    assert!(String::from_utf8_lossy(&late.stderr).contains("already been used"));

    // The admitted device syncs; a device without a certificate cannot even start.
    let joined =
        NodeProcess::start_peered(admitted[0].0, std::slice::from_ref(&admin.listen), None)
            .expect("the admitted node");
    let joined_api = Api::new(&joined.api);
    let id = create(&admin_api, "Invited").await;
    eventually(
        Duration::from_secs(20),
        "the record on the admitted device",
        || has(&joined_api, &id),
    )
    .await
    .expect("synced");
    assert!(
        NodeProcess::start(refused[0].0).is_err(),
        "a device that was not admitted does not start"
    );

    // The admitted tablet is listed with its name and kind, and cannot invite or revoke.
    eventually(
        Duration::from_secs(20),
        "the tablet in the device list",
        || {
            let api = admin_api.clone();
            async move {
                let (_, devices) = api.get("/v1/devices").await.expect("devices");
                devices["devices"].as_array().is_some_and(|d| {
                    d.iter()
                        .any(|d| d["name"] == json!("joiner") && d["kind"] == json!("tablet"))
                })
            }
        },
    )
    .await
    .expect("listed");
    let out = medmesh(&["invite", "--data", &admitted[0].0.display().to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an admin device"));
    let admin_id = peer_id(&admin_api).await;
    let (code, answer) = joined_api
        .post(
            &format!("/v1/devices/{admin_id}/revoke"),
            &json!({"reason": "x"}),
        )
        .await
        .expect("revoke");
    assert_eq!(code, 403, "{answer}");

    // A second admin device: it gets the owner key, its certificate expires, and it
    // revokes the tablet from the command line.
    let text = invite(
        &da,
        &[
            "--kind",
            "admin",
            "--name",
            "laptop 2",
            "--valid-for",
            "30d",
        ],
    );
    let de = dir.path().join("e");
    let out = join(&de, &text);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        de.join("owner.key").exists(),
        "an admin device holds the owner key"
    );
    assert!(
        !admitted[0].0.join("owner.key").exists(),
        "a tablet does not"
    );
    let second = NodeProcess::start_peered(&de, std::slice::from_ref(&admin.listen), None)
        .expect("the second admin");
    let (_, status) = Api::new(&second.api)
        .get("/v1/status")
        .await
        .expect("status");
    assert_eq!(status["mesh"]["device"]["kind"], json!("admin"));
    assert!(status["mesh"]["device"]["expires_at"].is_string());
    let tablet_id = peer_id(&joined_api).await;
    let out = medmesh(&[
        "devices",
        "revoke",
        &tablet_id,
        "--reason",
        "lost on the road",
        "--api",
        &second.api,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(
        Duration::from_secs(20),
        "the revocation on the first admin",
        || async {
            let out = medmesh(&["devices", "list", "--api", &admin.api]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.lines().any(|l| {
                l.contains(&tablet_id) && l.contains("REVOKED") && l.contains("lost on the road")
            })
        },
    )
    .await
    .expect("listed as revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_invite_admits_nobody() {
    let dir = tempfile::tempdir().expect("tempdir");
    let da = dir.path().join("admin");
    init(&da);
    let _admin = NodeProcess::start(&da).expect("admin node");
    // The invite as a QR code in the terminal, the invite itself still the last line.
    let out = medmesh(&[
        "invite",
        "--data",
        &da.display().to_string(),
        "--expires",
        "1s",
        "--qr",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(shown.contains('█') && shown.contains('▀'), "{shown}");
    let text = shown.lines().last().expect("the invite").trim().to_owned();
    assert!(text.starts_with("medmesh-invite-2:"), "{text}");
    std::thread::sleep(Duration::from_millis(1500));
    let out = join(&dir.path().join("late"), &text);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expired"), "{err}");
    // A damaged or old invite is named as such.
    let out = join(&dir.path().join("x"), &text[..text.len() - 20]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
    let out = join(
        &dir.path().join("y"),
        &format!("medmesh-invite-1:{}", "ab".repeat(32)),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no longer accepted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_crosses_a_chain_of_five_and_the_revoked_device_is_cut_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dirs: Vec<_> = (0..5).map(|i| dir.path().join(format!("n{i}"))).collect();
    init(&dirs[0]);
    for d in &dirs[1..] {
        join_mesh(&dirs[0], d).expect("join");
    }
    // A chain: n0 - n1 - n2 - n3 - n4; n4 will be revoked from n0, at the other end.
    let mut nodes: Vec<NodeProcess> = Vec::new();
    for d in &dirs {
        let peers: Vec<String> = nodes
            .last()
            .map(|n| vec![n.listen.clone()])
            .unwrap_or_default();
        nodes.push(NodeProcess::start_peered(d, &peers, None).expect("node"));
    }
    let apis: Vec<Api> = nodes.iter().map(|n| Api::new(&n.api)).collect();
    let last = create(&apis[4], "From the end").await;
    eventually(
        Duration::from_secs(30),
        "the chain carries a write end to end",
        || has(&apis[0], &last),
    )
    .await
    .expect("chain");
    let revoked = peer_id(&apis[4]).await;

    // Everyone keeps writing while the revocation travels.
    let writers: Vec<_> = apis[..4]
        .iter()
        .cloned()
        .map(|api| {
            tokio::spawn(async move {
                for i in 0..20 {
                    let _ = api.post("/v1/patients", &patient(i)).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();
    let started = Instant::now();
    let (code, answer) = apis[0]
        .post(
            &format!("/v1/devices/{revoked}/revoke"),
            &json!({"reason": "tablet stolen"}),
        )
        .await
        .expect("revoke");
    assert_eq!(code, 200, "{answer}");
    for api in &apis[1..4] {
        eventually(
            Duration::from_secs(30),
            "the revocation on every node",
            || {
                let api = api.clone();
                let revoked = revoked.clone();
                async move {
                    let (_, devices) = api.get("/v1/devices").await.expect("devices");
                    devices["devices"].as_array().is_some_and(|d| {
                        d.iter()
                            .any(|d| d["peer_id"] == json!(revoked) && d["revoked"].is_string())
                    })
                }
            },
        )
        .await
        .expect("revocation");
    }
    // n3, its only neighbour, has cut it off.
    eventually(
        Duration::from_secs(30),
        "n3 disconnects the revoked device",
        || {
            let api = apis[3].clone();
            let revoked = revoked.clone();
            async move {
                let (_, peers) = api.get("/v1/peers").await.expect("peers");
                !peers["peers"].as_array().is_some_and(|p| {
                    p.iter()
                        .any(|p| p["peer_id"] == json!(revoked) && p["connected"] == json!(true))
                })
            }
        },
    )
    .await
    .expect("disconnected");
    println!(
        "revocation reached the chain of five in {:?}",
        started.elapsed()
    );
    for w in writers {
        w.await.expect("writer");
    }

    // What the revoked device writes now reaches nobody, even after it restarts and dials.
    let after = create(&apis[4], "After revocation").await;
    nodes[4].stop();
    let again = NodeProcess::start_peered(&dirs[4], std::slice::from_ref(&nodes[3].listen), None)
        .expect("the revoked node restarts");
    let again_api = Api::new(&again.api);
    let later = create(&again_api, "Later still").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    for api in &apis[..4] {
        assert!(
            !has(api, &after).await,
            "a write of the revoked device crossed"
        );
        assert!(
            !has(api, &later).await,
            "a write of the revoked device crossed"
        );
    }
    // The others still sync with each other.
    let fresh = create(&apis[0], "Still syncing").await;
    eventually(
        Duration::from_secs(20),
        "the chain of four still syncs",
        || has(&apis[3], &fresh),
    )
    .await
    .expect("still syncing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_of_the_shared_secret_format_is_upgraded_in_place_and_keeps_its_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    init(&da);
    init(&db);
    let id = {
        let a = NodeProcess::start(&da).expect("a");
        let id = create(&Api::new(&a.api), "Before upgrade").await;
        drop(a);
        id
    };
    // Both directories now look as a medmesh before certificates left them: the store,
    // and the shared mesh secret in mesh.key.
    let secret = "5a".repeat(32);
    for d in [&da, &db] {
        for f in ["mesh.root", "device.cert", "owner.key"] {
            std::fs::remove_file(d.join(f)).expect("remove");
        }
        std::fs::write(d.join("mesh.key"), &secret).expect("mesh.key");
    }
    let out = medmesh(&["init", "--data", &da.display().to_string()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("upgraded"));
    let a = NodeProcess::start(&da).expect("a upgraded");
    let kept = std::fs::read_to_string(da.join("mesh.key")).expect("mesh.key");
    assert!(
        !kept.contains(&secret),
        "the old shared secret is sealed with the data key"
    );
    let b =
        NodeProcess::start_peered(&db, std::slice::from_ref(&a.listen), None).expect("b upgraded");
    let b_api = Api::new(&b.api);
    eventually(
        Duration::from_secs(20),
        "the old record on the other upgraded node",
        || has(&b_api, &id),
    )
    .await
    .expect("synced");
    // Both derived the same mesh, and both are admin devices of it.
    let (_, a_devices) = Api::new(&a.api).get("/v1/devices").await.expect("devices");
    let (_, b_devices) = b_api.get("/v1/devices").await.expect("devices");
    assert_eq!(a_devices["mesh"], b_devices["mesh"]);
    assert_eq!(b_devices["this_device_is_admin"], json!(true));
}
