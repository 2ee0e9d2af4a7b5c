//! What the API tests share: a node's API on a fresh data directory, and an HTTP client
//! that carries the node's token. Each test file uses a part of it.
#![allow(dead_code)]

use std::path::Path;

use medmesh::api::AppState;
use medmesh::server::{RunningApi, open_data_async, serve_api};

/// The token every node of these tests is given (written into its data directory, where
/// a node keeps its token across starts).
pub const TOKEN: &str = "mm_the-token-of-every-node-in-the-api-tests-00";

/// Gives the node of data directory `dir` the tests' token.
pub fn give_token(dir: &Path) {
    medmesh::access::tokens::write_private(
        &dir.join(medmesh::access::tokens::API_TOKEN_FILE),
        TOKEN,
    )
    .expect("write the token");
}

/// An HTTP client whose every request carries the tests' token.
pub fn http() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse().expect("header"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

/// Serves a new node's API on a free loopback port; the directory lives as long as the
/// returned guard.
pub async fn serve_fresh_node() -> (RunningApi, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let opened = open_data_async(dir.path().to_path_buf(), None)
        .await
        .expect("open");
    give_token(dir.path());
    let state =
        AppState::new(opened.store, opened.peer_id, Some(dir.path().to_path_buf())).expect("state");
    let api = serve_api(state, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve");
    (api, dir)
}
