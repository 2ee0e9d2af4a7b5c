//! The open database, and reopening it after a write failed.
//!
//! After an I/O error (typically a full disk) redb refuses every later write until the
//! database is reopened. The slot lets the writer do that in place: it takes the database
//! out (new readers wait or get a "try again" error), waits for the readers in flight,
//! closes it and opens it again. Committed data is untouched; the failed transaction
//! never was.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::Database;

use crate::error::{Result, StoreError};

/// How long a reopen waits for readers still using the old database.
const READERS_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a reader may try to reopen a database that could not be reopened.
const REOPEN_RETRY: Duration = Duration::from_millis(200);

type Opener = Box<dyn Fn() -> Result<Database> + Send + Sync>;

/// The database, replaceable by a reopen.
pub(crate) struct DbSlot {
    current: RwLock<Option<Arc<Database>>>,
    open: Opener,
    last_attempt: Mutex<Option<Instant>>,
}

impl DbSlot {
    pub(crate) fn new(db: Database, open: Opener) -> Self {
        Self {
            current: RwLock::new(Some(Arc::new(db))),
            open,
            last_attempt: Mutex::new(None),
        }
    }

    /// The open database. When an earlier reopen failed (the disk is still full), tries
    /// again, at most every [`REOPEN_RETRY`].
    pub(crate) fn get(&self) -> Result<Arc<Database>> {
        if let Some(db) = self.current.read().ok().and_then(|db| db.clone()) {
            return Ok(db);
        }
        let due = match self.last_attempt.lock() {
            Ok(mut last) => {
                let due = last.is_none_or(|t| t.elapsed() >= REOPEN_RETRY);
                if due {
                    *last = Some(Instant::now());
                }
                due
            }
            Err(_) => false,
        };
        if due {
            self.reopen()?;
            if let Some(db) = self.current.read().ok().and_then(|db| db.clone()) {
                return Ok(db);
            }
        }
        Err(StoreError::Storage(
            "the database could not be reopened after a failed write (is the disk still full?); free some space, then try again".into(),
        ))
    }

    /// Compacts the database file (redb moves pages down and gives back the end of the
    /// file), holding it alone meanwhile: new readers wait, and the readers in flight are
    /// let finish first. Answers whether redb could compact.
    pub(crate) fn compact(&self) -> Result<bool> {
        let mut slot = self
            .current
            .write()
            .map_err(|_| StoreError::Storage("the database lock was poisoned".into()))?;
        let Some(old) = slot.take() else {
            return Err(StoreError::Storage(
                "the database is closed after a failed write; try again later".into(),
            ));
        };
        let deadline = Instant::now() + READERS_DRAIN_TIMEOUT;
        while Arc::strong_count(&old) > 1 {
            if Instant::now() > deadline {
                *slot = Some(old);
                return Err(StoreError::Storage(
                    "readers kept the database busy; compact it again later".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut db = match Arc::try_unwrap(old) {
            Ok(db) => db,
            Err(old) => {
                *slot = Some(old);
                return Err(StoreError::Storage(
                    "the database is in use; compact it again later".into(),
                ));
            }
        };
        let mut compacted = false;
        let outcome = loop {
            match db.compact() {
                Ok(true) => compacted = true,
                Ok(false) => break Ok(compacted),
                Err(err) => break Err(StoreError::Storage(format!("compaction: {err}"))),
            }
        };
        *slot = Some(Arc::new(db));
        outcome
    }

    /// Closes and reopens the database.
    pub(crate) fn reopen(&self) -> Result<()> {
        let mut slot = self
            .current
            .write()
            .map_err(|_| StoreError::Storage("the database lock was poisoned".into()))?;
        if let Ok(mut last) = self.last_attempt.lock() {
            *last = Some(Instant::now());
        }
        if let Some(old) = slot.take() {
            let deadline = Instant::now() + READERS_DRAIN_TIMEOUT;
            while Arc::strong_count(&old) > 1 {
                if Instant::now() > deadline {
                    *slot = Some(old);
                    return Err(StoreError::Storage(
                        "readers kept the database busy; the reopen will be tried again".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            drop(old);
        }
        let db = (self.open)()?;
        *slot = Some(Arc::new(db));
        tracing::info!("the database was reopened after a failed write");
        Ok(())
    }
}
