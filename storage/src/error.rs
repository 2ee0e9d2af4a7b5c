//! What can go wrong in the store, said so that a person can act on it.

use medmesh_protocol::{DocId, SchemaError};

/// An error from the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The disk is full: the write was not stored, and nothing stored before is lost.
    #[error(
        "the disk is full: this change was not saved (everything saved before is safe). Free some space on the device, then try again"
    )]
    DiskFull,
    /// The database file could not be opened.
    #[error("cannot open the database file {path}: {reason}")]
    Open {
        /// The file.
        path: String,
        /// What was wrong, and what to do.
        reason: String,
    },
    /// The data key given does not open this encrypted store file.
    #[error(
        "the data key does not open this store: {path} was encrypted with another key, so nothing was read and nothing was changed. Start medmesh with the data key this node was set up with (restore it from the key backup if it was lost)"
    )]
    WrongKey {
        /// The file.
        path: String,
    },
    /// A data key was given, but the store file is not encrypted.
    #[error(
        "the database file {path} is not encrypted, but this node was asked to open it with a data key. Encrypt the existing store first (the node's store migration does this), or start the node without encryption"
    )]
    NotEncrypted {
        /// The file.
        path: String,
    },
    /// The store file is encrypted, and no data key was given.
    #[error(
        "the database file {path} is encrypted and can only be opened with its data key. Start medmesh with this node's data key"
    )]
    Encrypted {
        /// The file.
        path: String,
    },
    /// The database file is damaged.
    #[error(
        "the database file {path} is damaged ({reason}). Move it aside and start again to re-sync from other devices, or restore it from a backup"
    )]
    CorruptDatabase {
        /// The file.
        path: String,
        /// What redb found.
        reason: String,
    },
    /// One stored document is damaged; the others are readable.
    #[error(
        "the stored document for record {id} in {collection} is damaged and cannot be read ({reason}); other records are not affected"
    )]
    CorruptDocument {
        /// The record.
        id: DocId,
        /// Its collection.
        collection: String,
        /// What Automerge found.
        reason: String,
    },
    /// No such collection.
    #[error("there is no collection named `{0}`")]
    UnknownCollection(String),
    /// No such record.
    #[error("there is no record {id} in {collection}")]
    NotFound {
        /// The collection asked for.
        collection: String,
        /// The record asked for.
        id: DocId,
    },
    /// A record with this id already exists.
    #[error("a record with id {id} already exists in {collection}")]
    AlreadyExists {
        /// Where it exists.
        collection: String,
        /// Its id.
        id: DocId,
    },
    /// The record is not valid for its collection's schema.
    #[error(transparent)]
    Invalid(#[from] SchemaError),
    /// A query that cannot be answered.
    #[error("{0}")]
    BadQuery(String),
    /// A read or write failed for a reason other than a full disk.
    #[error("the database could not be read or written: {0}")]
    Storage(String),
    /// The store has shut down (the node is stopping).
    #[error("the store is shutting down; try again once the node has restarted")]
    Closed,
}

impl StoreError {
    pub(crate) fn from_io(err: &std::io::Error) -> Self {
        if err.kind() == std::io::ErrorKind::StorageFull
            || err.raw_os_error() == Some(28 /* ENOSPC */)
            || err.kind() == std::io::ErrorKind::QuotaExceeded
        {
            StoreError::DiskFull
        } else {
            StoreError::Storage(err.to_string())
        }
    }
}

impl From<redb::StorageError> for StoreError {
    fn from(err: redb::StorageError) -> Self {
        match err {
            redb::StorageError::Io(io) => StoreError::from_io(&io),
            redb::StorageError::PreviousIo => StoreError::Storage(
                "an earlier write failed (often a full disk); the store is reopening, try again in a moment"
                    .into(),
            ),
            redb::StorageError::Corrupted(reason) => StoreError::CorruptDatabase {
                path: String::from("(the store)"),
                reason,
            },
            other => StoreError::Storage(other.to_string()),
        }
    }
}

macro_rules! storage_wrapper {
    ($($ty:ty),*) => {$(
        impl From<$ty> for StoreError {
            fn from(err: $ty) -> Self {
                match err.into() {
                    redb::Error::Io(io) => StoreError::from_io(&io),
                    redb::Error::Corrupted(reason) => StoreError::CorruptDatabase {
                        path: String::from("(the store)"),
                        reason,
                    },
                    redb::Error::PreviousIo => StoreError::from(redb::StorageError::PreviousIo),
                    other => StoreError::Storage(other.to_string()),
                }
            }
        }
    )*};
}

storage_wrapper!(
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError
);

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
