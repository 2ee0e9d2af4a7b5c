//! The node's identity: a libp2p ed25519 key pair, made at the first start and kept in
//! the store, so the node's peer id never changes.

use anyhow::{Context, Result};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use medmesh_storage::Store;

const IDENTITY_KEY: &str = "node_identity";

/// Loads the node's key pair from the store, creating and storing one if there is none.
pub fn load_or_create(store: &Store) -> Result<Keypair> {
    if let Some(bytes) = store.get_info(IDENTITY_KEY)? {
        return Keypair::from_protobuf_encoding(&bytes).context(
            "the node identity stored in the database is damaged; restore the data directory from a backup or start with a new one",
        );
    }
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .context("cannot encode the new node identity")?;
    store
        .put_info_blocking(IDENTITY_KEY, &bytes)
        .context("cannot save the new node identity")?;
    Ok(keypair)
}

/// The peer id of a key pair, as text.
pub fn peer_id(keypair: &Keypair) -> PeerId {
    keypair.public().to_peer_id()
}
