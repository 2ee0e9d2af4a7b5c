//! Identifiers: document ids and collection names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The id of one record, and of the Automerge document that holds it: a UUID.
///
/// The node makes a UUIDv7 (time-ordered) for a record created without an id, as the
/// Hikma Health app does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DocId(Uuid);

impl DocId {
    /// A new time-ordered id (UUIDv7).
    pub fn new_v7() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id's 16 bytes, as stored in index keys.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// The id from its 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }

    /// The id from a byte slice; `None` unless it is exactly 16 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 16]>::try_from(bytes).ok().map(Self::from_bytes)
    }

    /// The UUID itself.
    pub fn uuid(&self) -> Uuid {
        self.0
    }

    /// A deterministic id (UUIDv8) for the record of a `kind` identified by `parts`: two
    /// devices that create the same thing while apart make the same id, so their
    /// documents merge instead of duplicating. Parts are length-prefixed, so they cannot
    /// run into each other.
    pub fn derived(kind: &str, parts: &[&str]) -> Self {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(b"medmesh/id/1/");
        hash.update(kind.as_bytes());
        for part in parts {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        let digest = hash.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        Self(Uuid::new_v8(bytes))
    }
}

impl From<Uuid> for DocId {
    fn from(value: Uuid) -> Self {
        Self(value)
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for DocId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| IdError::NotAUuid(truncate(s, 60)))
    }
}

/// A collection name such as `patients` or a deployment's own `lab_reports`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Collection(String);

impl Collection {
    /// Checks the name: lower-case ASCII letters, digits and `_`, starting with a letter,
    /// at most 63 characters.
    pub fn new(name: impl Into<String>) -> Result<Self, IdError> {
        let name = name.into();
        if crate::schema::is_valid_collection_name(&name) {
            Ok(Self(name))
        } else {
            Err(IdError::BadCollectionName(truncate(&name, 60)))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Collection {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Collection> for String {
    fn from(value: Collection) -> Self {
        value.0
    }
}

impl fmt::Display for Collection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An id or name that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// Record ids are UUIDs.
    #[error("`{0}` is not a record id: ids are UUIDs like 0192f0c4-6a1e-7cc3-9d0e-5b8f1c2a3d4e")]
    NotAUuid(String),
    /// Collection names are lower-case identifiers.
    #[error(
        "`{0}` is not a collection name: use lower-case letters, digits and _, starting with a letter"
    )]
    BadCollectionName(String),
}

/// Cuts `s` to at most `max` characters for an error message.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_id_round_trips_through_text_and_bytes() {
        let id = DocId::new_v7();
        assert_eq!(id.to_string().parse::<DocId>(), Ok(id));
        assert_eq!(DocId::from_slice(id.as_bytes()), Some(id));
        assert_eq!(DocId::from_slice(&[1, 2, 3]), None);
    }

    #[test]
    fn bad_ids_and_names_are_refused_with_the_value() {
        let err = "patient-1".parse::<DocId>().unwrap_err();
        assert!(err.to_string().contains("patient-1"));
        assert!(Collection::new("Patients").is_err());
        assert!(Collection::new("lab_reports").is_ok());
        assert!(Collection::new("../etc").is_err());
    }
}
