//! # medmesh (the node)
//!
//! The `medmesh` binary and the library behind it. The node wires the crates together:
//! the [`medmesh_storage::Store`] holds records, [`api`] serves them over HTTP to apps on
//! the device, [`client`] is the command line that talks to a running node, and
//! [`server`] starts everything and shuts it down cleanly. The mesh (libp2p, mDNS) joins
//! here in a later step; `--listen`, `--peer` and `--no-mdns` are accepted already.
//!
//! ```text
//!   app / curl / medmesh CLI ──HTTP──▶ api ──▶ Store (writer thread ──▶ redb)
//!                                       └──── reads on blocking threads ◀── redb
//! ```

pub mod api;
pub mod client;
pub mod config;
pub mod identity;
pub mod server;
