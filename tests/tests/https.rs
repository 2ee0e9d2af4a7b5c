//! The API over HTTPS with the certificate the node makes: trusted by its fingerprint or
//! its file, refused over plain HTTP, shown by `medmesh status`.

use medmesh_tests::{NodeProcess, TEST_TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_https_with_the_nodes_own_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let node = NodeProcess::start_with_args(&data, &[], &["--https"]).expect("node");
    let port = node.api.rsplit_once(':').expect("port").1.to_owned();
    let cert_file = data.join(medmesh::tls::CERT_FILE);
    let pem = std::fs::read(&cert_file).expect("the node made its certificate");
    let key_mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(data.join(medmesh::tls::KEY_FILE))
            .expect("key")
            .permissions()
            .mode()
    };
    assert_eq!(key_mode & 0o077, 0, "the key is private: {key_mode:o}");
    let key_text = std::fs::read_to_string(data.join(medmesh::tls::KEY_FILE)).expect("key");
    assert!(
        !key_text.contains("PRIVATE KEY"),
        "the key is sealed with the data key"
    );
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .build()
        .expect("client");
    let url = format!("https://localhost:{port}/v1/status");
    let status: serde_json::Value = trusting
        .get(&url)
        .bearer_auth(TEST_TOKEN)
        .send()
        .await
        .expect("https")
        .json()
        .await
        .expect("json");
    let fingerprint = medmesh::tls::fingerprint(&cert_file).expect("fingerprint");
    assert_eq!(
        status["https"]["fingerprint"],
        serde_json::json!(fingerprint),
        "{status}"
    );
    // A client that does not know the certificate refuses it, and plain HTTP gets nothing.
    assert!(reqwest::Client::new().get(&url).send().await.is_err());
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await;
    assert!(plain.is_err() || !plain.expect("answer").status().is_success());
    // The command line trusts the node's certificate from its data directory.
    let out = medmesh_tests::medmesh_command()
        .args([
            "status",
            "--api",
            &format!("https://localhost:{port}"),
            "--data",
        ])
        .arg(&data)
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&fingerprint), "{text}");
}
