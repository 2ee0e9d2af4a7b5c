//! A peer that sends garbage on the sync stream: the node closes that stream, never
//! panics, never buffers what a length prefix claims, and keeps serving everyone else.

use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{Multiaddr, PeerId};
use medmesh_tests::{InProcessNode, eventually, join_mesh, open_sync_stream};

/// Opens the sync stream to `target` from a fresh libp2p identity, sends `bytes`, and
/// answers what came back before the node closed the stream.
async fn send_raw(target: &Multiaddr, peer: PeerId, bytes: Vec<u8>) -> Vec<u8> {
    let (mut stream, _, driver) = open_sync_stream(target, peer)
        .await
        .expect("open the sync stream");
    let _ = stream.write_all(&bytes).await;
    let _ = stream.flush().await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer)).await;
    driver.abort();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_sync_stream_closes_it_and_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let a = InProcessNode::start(&da, vec![]).await.expect("a");
    let a_peer: PeerId = a.peer_id.parse().expect("peer id");
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a length prefix of 4 GiB",
            vec![0xFF, 0xFF, 0xFF, 0xFF, 1, 0],
        ),
        (
            "a frame of another wire version",
            vec![0, 0, 0, 3, 99, 0, 0],
        ),
        ("unknown flags", vec![0, 0, 0, 3, 1, 0x40, 0]),
        (
            "CBOR that is not a message",
            vec![0, 0, 0, 6, 1, 0, 0xa1, 0x61, 0x78, 0x01],
        ),
        (
            "a truncated frame, then silence",
            vec![0, 0, 1, 0, 1, 0, 0xa1],
        ),
        (
            "a damaged compressed frame",
            vec![0, 0, 0, 6, 1, 1, 0xde, 0xad, 0xbe, 0xef],
        ),
    ];
    // And some random bytes.
    let mut x: u32 = 12345;
    cases.push((
        "random bytes",
        (0..4096)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect(),
    ));
    for (what, bytes) in cases {
        let answer = send_raw(&a.addr, a_peer, bytes).await;
        // The node may have sent its hello (and a refusal) before closing; it never
        // accepted anything.
        assert!(
            answer.len() < 4096,
            "{what}: the node answered {} bytes",
            answer.len()
        );
        let health = reqwest::get(a.url("/health"))
            .await
            .expect("the node still answers");
        assert!(
            health.status().is_success(),
            "{what}: the node is still healthy"
        );
    }
    // A real peer still syncs with it.
    join_mesh(&da, &db).expect("join");
    let b = InProcessNode::start(&db, vec![a.addr.clone()])
        .await
        .expect("b");
    let http = medmesh_tests::http();
    let created: serde_json::Value = http
        .post(a.url("/v1/patients"))
        .json(&serde_json::json!({"given_name": "After the garbage"}))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    let path = format!("/v1/patients/{}", created["id"].as_str().expect("id"));
    eventually(Duration::from_secs(20), "the record on B", || async {
        http.get(b.url(&path))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await
    .expect("a real peer still syncs");
    b.stop().await;
    a.stop().await;
}
