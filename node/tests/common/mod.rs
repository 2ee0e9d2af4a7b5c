//! What the API tests share: a node's API on a fresh data directory.

use medmesh::api::AppState;
use medmesh::server::{RunningApi, open_data_async, serve_api};

/// Serves a new node's API on a free loopback port; the directory lives as long as the
/// returned guard.
pub async fn serve_fresh_node() -> (RunningApi, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let opened = open_data_async(dir.path().to_path_buf(), None)
        .await
        .expect("open");
    let state = AppState::new(opened.store, opened.peer_id, None);
    let api = serve_api(state, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve");
    (api, dir)
}
