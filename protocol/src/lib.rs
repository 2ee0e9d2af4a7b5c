//! # medmesh-protocol
//!
//! The part of medmesh that is pure logic: no tokio, no sockets, no disk.
//!
//! - [`ids`]: the identifiers every other crate speaks in ([`DocId`], [`Collection`]).
//! - [`schema`]: which collections exist, their fields and types, which fields are
//!   indexed, and the validation of a JSON record against them. Built-in collections follow
//!   the Hikma Health schema; a deployment can add its own from a schema file.
//! - [`record`]: how a JSON record maps onto one Automerge document and back, field by
//!   field, with nothing lost (nested objects, arrays, ints vs floats, unknown fields), and
//!   how a write becomes the minimal set of field changes.
//!
//! - [`authorship`]: change signatures — who made a change, checkable by any receiver.
//! - [`membership`]: mesh secrets, invites, fingerprints, proofs of membership.
//! - [`wire`]: the sync protocol's messages and their length-prefixed, versioned,
//!   compressed CBOR frames, decoded without trusting the peer.
//! - [`scope`]: which clinics a record belongs to; which records a device holds.
//! - [`sync`]: the sync session with one peer as a state machine
//!   (`handle(input, now) -> outputs`), both directions, no I/O.
//!
//! Data flows one way: the node parses a request into JSON, [`schema`] validates it,
//! [`record`] turns it into Automerge operations inside a transaction the storage crate
//! owns, and turns documents back into JSON for answers.

pub mod authorship;
pub mod hub;
pub mod ids;
pub mod membership;
pub mod pharmacy;
pub mod record;
pub mod schema;
pub mod scope;
pub mod sync;
pub mod wire;

pub use ids::{Collection, DocId, IdError};
pub use record::{ChangeAuthor, RecordError};
pub use schema::{CollectionSpec, FieldSpec, FieldType, IndexKind, Schema, SchemaError};
