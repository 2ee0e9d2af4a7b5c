//! # medmesh (the node)
//!
//! The `medmesh` binary and the library behind it. The node wires the crates together:
//! the [`medmesh_storage::Store`] holds records, [`api`] serves them over HTTP to apps on
//! the device, [`client`] is the command line that talks to a running node, and
//! [`server`] starts everything and shuts it down cleanly, and [`mesh`] finds the other
//! nodes of the mesh (mDNS, `--peer`) and keeps every record in sync with them over
//! libp2p; on one node, [`gateway`] carries the mesh to the Hikma cloud and back.
//!
//! ```text
//!   app / curl / medmesh CLI ──HTTP──▶ api ──▶ Store (writer thread ──▶ redb)
//!                                       └──── reads on blocking threads ◀── redb
//!   other nodes ◀──libp2p (noise, yamux)──▶ mesh::network ──▶ mesh::session ──▶ Store
//! ```

pub mod access;
pub mod api;
pub mod client;
pub mod config;
pub mod console;
pub mod files;
pub mod forms;
pub mod gateway;
pub mod hub;
pub mod identity;
pub mod keys;
pub mod mesh;
pub mod mobile;
pub mod pharmacy;
pub mod server;
pub mod tls;
pub mod trust;
pub mod users;
