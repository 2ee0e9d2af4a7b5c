//! Bearer tokens: the node's own token for its command line (`DIR/api-token`) and the
//! sessions users open with `POST /v1/sessions`. Only a token's SHA-256 is kept in memory
//! and on disk; a session expires and can be revoked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The file, in the data directory, that holds the node's token for its command line.
pub const API_TOKEN_FILE: &str = "api-token";
/// The file, in the data directory, that holds the open sessions (their tokens' hashes).
pub const SESSIONS_FILE: &str = "sessions.json";
/// How long a session lasts unless asked otherwise: a working day.
pub const DEFAULT_SESSION_HOURS: i64 = 12;
/// The longest a session may last.
pub const MAX_SESSION_HOURS: i64 = 24 * 30;
/// Sessions kept open at most on one node; the oldest goes first.
pub const MAX_SESSIONS: usize = 10_000;
/// Tokens shorter than this are not accepted from a file.
const MIN_TOKEN_LEN: usize = 32;

/// A token's SHA-256.
pub type TokenDigest = [u8; 32];

/// The SHA-256 of a token.
pub fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.trim().as_bytes()).into()
}

/// A new random token (`mm_` and 32 random bytes, base64url).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "mm_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

pub use crate::files::write_private;

fn plausible(token: &str) -> bool {
    token.len() >= MIN_TOKEN_LEN && token.bytes().all(|b| b.is_ascii_graphic())
}

/// Reads the node's token from a data directory, if it has a usable one.
pub fn read_api_token(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(API_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim().to_owned();
            Ok(plausible(&token).then_some(token))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| {
            format!(
                "cannot read the node's token {} (run the command as the user who runs the node)",
                path.display()
            )
        }),
    }
}

/// The node's own token: whoever can read the data directory may use the node.
#[derive(Debug, Clone)]
pub struct ApiToken {
    digest: TokenDigest,
}

impl ApiToken {
    /// The token in `dir`, kept across starts so that scripts keep working; a new one
    /// when there is none (written readable by the owner only).
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let token = match read_api_token(dir)? {
            Some(token) => token,
            None => {
                let token = new_token();
                write_private(&dir.join(API_TOKEN_FILE), &format!("{token}\n"))?;
                token
            }
        };
        Ok(Self::of(&token))
    }

    /// A token held in memory only (a node with no data directory); answers the token.
    pub fn ephemeral() -> (Self, String) {
        let token = new_token();
        (Self::of(&token), token)
    }

    fn of(token: &str) -> Self {
        Self {
            digest: digest(token),
        }
    }

    /// Whether `token` is this one.
    pub fn matches(&self, token: &str) -> bool {
        same(&digest(token), &self.digest)
    }
}

/// Compares two digests in constant time.
fn same(a: &TokenDigest, b: &TokenDigest) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An open session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    /// The user's record id.
    pub user_id: String,
    /// The user's email, as they signed in.
    pub email: String,
    /// When it was opened (ms since the epoch).
    pub created_at: i64,
    /// When it stops being valid (ms since the epoch).
    pub expires_at: i64,
    /// The Hikma app install it was opened for through the hub RPC (its `client_id`),
    /// if it was: removing that tablet ends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

/// The sessions open on this node. One owner: every change goes through here and is
/// written to `DIR/sessions.json` (hashes only) before it is answered.
#[derive(Debug)]
pub struct Sessions {
    path: Option<PathBuf>,
    open: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// The sessions kept in `dir` (none kept when `None`). A damaged file signs everyone
    /// out, with a warning, rather than stopping the node.
    pub fn open(dir: Option<&Path>) -> Self {
        let path = dir.map(|d| d.join(SESSIONS_FILE));
        let mut open = HashMap::new();
        if let Some(path) = &path {
            match std::fs::read(path) {
                Ok(bytes) => match serde_json::from_slice::<HashMap<String, Session>>(&bytes) {
                    Ok(kept) => open = kept,
                    Err(err) => tracing::warn!(
                        file = %path.display(),
                        error = %err,
                        "the open sessions could not be read; everyone signs in again"
                    ),
                },
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => tracing::warn!(
                    file = %path.display(),
                    error = %err,
                    "the open sessions could not be read; everyone signs in again"
                ),
            }
        }
        Self {
            path,
            open: Mutex::new(open),
        }
    }

    fn save(&self, open: &HashMap<String, Session>) -> Result<()> {
        if let Some(path) = &self.path {
            let text = serde_json::to_string(open).context("cannot encode the sessions")?;
            write_private(path, &text)?;
        }
        Ok(())
    }

    /// Opens a session for a user, lasting `hours`; answers its token (shown once).
    pub fn issue(
        &self,
        user_id: &str,
        email: &str,
        hours: i64,
        now: i64,
    ) -> Result<(String, Session)> {
        self.issue_for(user_id, email, hours, now, None)
    }

    /// [`Sessions::issue`] for a Hikma app install (`client`).
    pub fn issue_for(
        &self,
        user_id: &str,
        email: &str,
        hours: i64,
        now: i64,
        client: Option<&str>,
    ) -> Result<(String, Session)> {
        let token = new_token();
        let session = Session {
            user_id: user_id.to_owned(),
            email: email.to_owned(),
            created_at: now,
            expires_at: now + hours.clamp(1, MAX_SESSION_HOURS) * 3_600_000,
            client: client.map(str::to_owned),
        };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|_, s| s.expires_at > now);
        while open.len() >= MAX_SESSIONS {
            let Some(oldest) = open
                .iter()
                .min_by_key(|(_, s)| s.created_at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            open.remove(&oldest);
        }
        open.insert(hex::encode(digest(&token)), session.clone());
        self.save(&open)?;
        Ok((token, session))
    }

    /// The live session of `token`, if any.
    pub fn find(&self, token: &str, now: i64) -> Option<Session> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&hex::encode(digest(token)))
            .filter(|s| s.expires_at > now)
            .cloned()
    }

    /// The live session of `token`, kept open `hours` from now when less than half of
    /// that is left: a session in use does not end (the Hikma app never renews its token).
    pub fn find_extending(&self, token: &str, now: i64, hours: i64) -> Option<Session> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let key = hex::encode(digest(token));
        let session = open.get_mut(&key).filter(|s| s.expires_at > now)?;
        let lasting = hours.clamp(1, MAX_SESSION_HOURS) * 3_600_000;
        if session.expires_at - now < lasting / 2 {
            session.expires_at = now + lasting;
            let found = session.clone();
            if let Err(err) = self.save(&open) {
                tracing::warn!(error = %format!("{err:#}"), "a session could not be kept open longer");
            }
            return Some(found);
        }
        Some(session.clone())
    }

    /// Ends every session opened for the Hikma app install `client`.
    pub fn revoke_client(&self, client: &str) -> Result<usize> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let before = open.len();
        open.retain(|_, s| s.client.as_deref() != Some(client));
        let gone = before - open.len();
        if gone > 0 {
            self.save(&open)?;
        }
        Ok(gone)
    }

    /// Ends the session of `token`; answers whether there was one.
    pub fn revoke(&self, token: &str) -> Result<bool> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let gone = open.remove(&hex::encode(digest(token))).is_some();
        if gone {
            self.save(&open)?;
        }
        Ok(gone)
    }

    /// Ends every session of a user; answers how many there were.
    pub fn revoke_user(&self, user_id: &str) -> Result<usize> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let before = open.len();
        open.retain(|_, s| s.user_id != user_id);
        let gone = before - open.len();
        if gone > 0 {
            self.save(&open)?;
        }
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_expires_is_revoked_and_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sessions = Sessions::open(Some(dir.path()));
        let (token, session) = sessions
            .issue("u1", "amina@clinic.org", 1, 1_000)
            .expect("issue");
        assert_eq!(sessions.find(&token, 2_000), Some(session.clone()));
        assert_eq!(sessions.find(&token, 1_000 + 3_600_000), None, "expired");
        assert_eq!(sessions.find("mm_unknown", 2_000), None);
        // Kept as a hash only, and found again after a restart.
        let kept = std::fs::read_to_string(dir.path().join(SESSIONS_FILE)).expect("file");
        assert!(!kept.contains(&token));
        let again = Sessions::open(Some(dir.path()));
        assert_eq!(again.find(&token, 2_000), Some(session));
        assert!(again.revoke(&token).expect("revoke"));
        assert_eq!(Sessions::open(Some(dir.path())).find(&token, 2_000), None);
    }

    #[test]
    fn the_api_token_is_kept_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ApiToken::load_or_create(dir.path()).expect("token");
        let token = read_api_token(dir.path()).expect("read").expect("token");
        assert!(first.matches(&token));
        assert!(!first.matches("mm_someone-else-entirely-000000000000"));
        assert!(
            ApiToken::load_or_create(dir.path())
                .expect("again")
                .matches(&token)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(API_TOKEN_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
        }
    }
}
