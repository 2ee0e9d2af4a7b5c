//! The node's data key: the key its store file and its owner key are encrypted with.
//!
//! A random 256-bit key is made when the store is first made (or when an unencrypted
//! store of an older medmesh is first opened: it is encrypted then). It is kept in
//! `DIR/data.key` (mode 0600), either
//! - wrapped by a passphrase (argon2id, then AES-256-GCM), when one is given with
//!   `--passphrase-file FILE` or `MEDMESH_PASSPHRASE`: a copy of the data directory is
//!   then unreadable without the passphrase; or
//! - as it is, beside the database: the files are unreadable to other users of the
//!   device and to anyone who copies the database file alone, but not to someone who
//!   copies the whole directory.
//!
//! This platform's keyring (a desktop's secret service) is not used: clinic tablets
//! and the gateway laptop run without one. `medmesh status` says which protection is in
//! force; `medmesh rekey` changes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use medmesh_protocol::Schema;
use medmesh_storage::crypt::is_encrypted_store_file;
use medmesh_storage::{DataKey, Store, StoreOptions};
use serde::{Deserialize, Serialize};

/// The file, in the data directory, that holds the data key.
pub const KEY_FILE: &str = "data.key";
/// With this environment variable set, a new node's store is not encrypted (and an
/// unencrypted one is not encrypted when opened): only the benchmarks set it, to measure
/// what encryption costs side by side.
pub const UNENCRYPTED_FOR_BENCHMARK: &str = "MEDMESH_BENCHMARK_UNENCRYPTED";
/// The environment variable that may hold the passphrase.
pub const PASSPHRASE_ENV: &str = "MEDMESH_PASSPHRASE";
/// What a sealed secret file starts with.
const SEALED: &str = "sealed1:";
/// argon2id's cost: 19 MiB, 2 passes (OWASP's recommendation; about 0.1 s on a tablet).
const ARGON_MEMORY_KIB: u32 = 19 * 1024;
const ARGON_PASSES: u32 = 2;
/// The most a key file may ask of argon2id (a damaged file is refused beyond).
const MAX_ARGON_MEMORY_KIB: u32 = 1024 * 1024;
const MAX_ARGON_PASSES: u32 = 64;

/// How the data key is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// Wrapped by a passphrase.
    Passphrase,
    /// In a key file beside the database.
    KeyFile,
    /// The store is not encrypted (benchmarks only).
    Off,
}

impl Protection {
    /// How `medmesh status` says it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Passphrase => {
                "encrypted; the key is protected by a passphrase (a copy of the data directory is unreadable without it)"
            }
            Self::KeyFile => {
                "encrypted; the key is in data.key beside the database (unreadable to other users; keep backups of the directory safe, or protect it with a passphrase: `medmesh rekey`)"
            }
            Self::Off => "NOT encrypted (started for a benchmark)",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct KeyFileContent {
    version: u8,
    protection: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    salt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    memory_kib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    passes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wrapped: Option<String>,
}

static PASSPHRASE_FILE: OnceLock<PathBuf> = OnceLock::new();
static UNLOCKED: Mutex<Option<HashMap<PathBuf, DataKey>>> = Mutex::new(None);

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Takes the passphrase from this file from now on (`--passphrase-file`).
pub fn set_passphrase_file(path: &Path) {
    let _ = PASSPHRASE_FILE.set(path.to_path_buf());
}

/// The passphrase given to this process, if any.
fn passphrase() -> Result<Option<String>> {
    if let Some(path) = PASSPHRASE_FILE.get() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the passphrase file {}", path.display()))?;
        let text = text.trim_end_matches(['\r', '\n']).to_owned();
        if text.is_empty() {
            bail!("the passphrase file {} is empty", path.display());
        }
        return Ok(Some(text));
    }
    Ok(std::env::var(PASSPHRASE_ENV).ok().filter(|p| !p.is_empty()))
}

/// The passphrase typed at the terminal (not shown), when standard input is one.
fn prompt() -> Option<String> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return None;
    }
    rpassword::prompt_password("Passphrase of this node's data: ")
        .ok()
        .filter(|p| !p.is_empty())
}

fn kek(passphrase: &str, salt: &[u8], memory_kib: u32, passes: u32) -> Result<[u8; 32]> {
    let params = argon2::Params::new(memory_kib, passes, 1, Some(32))
        .map_err(|e| anyhow!("the key file's passphrase settings are not valid: {e}"))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(passphrase.as_bytes(), salt, &mut out)
        .map_err(|e| anyhow!("cannot derive a key from the passphrase: {e}"))?;
    Ok(out)
}

/// Seals `plain` with `key` (AES-256-GCM, random nonce): `sealed1:` and base64.
pub fn seal(key: &[u8; 32], plain: &[u8]) -> Result<String> {
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| anyhow!("bad key length"))?;
    let nonce: [u8; 12] = rand::random();
    let mut out = nonce.to_vec();
    out.extend(
        cipher
            .encrypt(Nonce::from_slice(&nonce), plain)
            .map_err(|_| anyhow!("cannot encrypt"))?,
    );
    Ok(format!("{SEALED}{}", b64().encode(out)))
}

/// Opens what [`seal`] made; `None` when the key does not open it.
pub fn open_sealed(key: &[u8; 32], text: &str) -> Option<Vec<u8>> {
    let bytes = b64().decode(text.trim().strip_prefix(SEALED)?).ok()?;
    if bytes.len() < 12 {
        return None;
    }
    let cipher = Aes256Gcm::new_from_slice(key).ok()?;
    cipher
        .decrypt(Nonce::from_slice(&bytes[..12]), &bytes[12..])
        .ok()
}

/// Whether a secret file's text is sealed.
pub fn is_sealed(text: &str) -> bool {
    text.trim_start().starts_with(SEALED)
}

fn key_file_text(key: &DataKey, passphrase: Option<&str>) -> Result<String> {
    let content = match passphrase {
        Some(passphrase) => {
            let salt: [u8; 16] = rand::random();
            let kek = kek(passphrase, &salt, ARGON_MEMORY_KIB, ARGON_PASSES)?;
            KeyFileContent {
                version: 1,
                protection: "passphrase".into(),
                key: None,
                salt: Some(b64().encode(salt)),
                memory_kib: Some(ARGON_MEMORY_KIB),
                passes: Some(ARGON_PASSES),
                wrapped: Some(seal(&kek, key.as_bytes())?),
            }
        }
        None => KeyFileContent {
            version: 1,
            protection: "key-file".into(),
            key: Some(b64().encode(key.as_bytes())),
            salt: None,
            memory_kib: None,
            passes: None,
            wrapped: None,
        },
    };
    Ok(serde_json::to_string_pretty(&content)?)
}

fn write_key_file(dir: &Path, key: &DataKey, passphrase: Option<&str>) -> Result<()> {
    crate::files::write_private(&dir.join(KEY_FILE), &key_file_text(key, passphrase)?)
}

fn read_key_file(dir: &Path) -> Result<Option<KeyFileContent>> {
    let path = dir.join(KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| {
            format!(
                "the key file {} is damaged; restore it from the backup of this data directory",
                path.display()
            )
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// How the data key of `dir` is kept (`None`: there is none).
pub fn protection(dir: &Path) -> Result<Option<Protection>> {
    Ok(read_key_file(dir)?.map(|c| match c.protection.as_str() {
        "passphrase" => Protection::Passphrase,
        _ => Protection::KeyFile,
    }))
}

fn remember(dir: &Path, key: &DataKey) {
    let mut unlocked = UNLOCKED.lock().unwrap_or_else(|e| e.into_inner());
    unlocked
        .get_or_insert_with(HashMap::new)
        .insert(dir.to_path_buf(), key.clone());
}

/// The data key of `dir` (`None`: the directory has none), unwrapped with the
/// passphrase given to this process when it is protected by one.
pub fn data_key(dir: &Path) -> Result<Option<DataKey>> {
    if let Some(key) = UNLOCKED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|m| m.get(dir))
    {
        return Ok(Some(key.clone()));
    }
    let Some(content) = read_key_file(dir)? else {
        return Ok(None);
    };
    let path = dir.join(KEY_FILE);
    let bytes: Vec<u8> = match content.protection.as_str() {
        "key-file" => content
            .key
            .as_deref()
            .and_then(|k| b64().decode(k).ok())
            .with_context(|| format!("the key file {} is damaged", path.display()))?,
        "passphrase" => {
            let Some(passphrase) = passphrase()?.or_else(prompt) else {
                bail!(
                    "this node's data is protected by a passphrase: give it in {PASSPHRASE_ENV} or with --passphrase-file FILE"
                );
            };
            let salt = content
                .salt
                .as_deref()
                .and_then(|s| b64().decode(s).ok())
                .with_context(|| format!("the key file {} is damaged", path.display()))?;
            let memory_kib = content.memory_kib.unwrap_or(ARGON_MEMORY_KIB);
            let passes = content.passes.unwrap_or(ARGON_PASSES);
            // A damaged or altered file must not make the node allocate gigabytes.
            if memory_kib > MAX_ARGON_MEMORY_KIB || passes > MAX_ARGON_PASSES {
                bail!(
                    "the key file {} asks for passphrase settings far beyond what medmesh writes; it is damaged: restore it from the backup of this data directory",
                    path.display()
                );
            }
            let kek = kek(&passphrase, &salt, memory_kib, passes)?;
            content
                .wrapped
                .as_deref()
                .and_then(|w| open_sealed(&kek, w))
                .ok_or_else(|| {
                    anyhow!("the passphrase is wrong: it does not open this node's data key ({}); nothing was changed", path.display())
                })?
        }
        other => bail!(
            "the key file {} uses a protection this medmesh does not know (`{other}`); use a newer medmesh",
            path.display()
        ),
    };
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow!("the key file {} is damaged", path.display()))?;
    let key = DataKey::from_bytes(bytes);
    remember(dir, &key);
    Ok(Some(key))
}

/// The data key of `dir`, made (and kept, with the passphrase given to this process if
/// any) when there is none.
pub fn data_key_or_new(dir: &Path) -> Result<DataKey> {
    if let Some(key) = data_key(dir)? {
        return Ok(key);
    }
    let key = DataKey::generate();
    let text = key_file_text(&key, passphrase()?.as_deref())?;
    if !crate::files::write_private_new(&dir.join(KEY_FILE), &text)? {
        // Another process made the key first: that one is the key.
        return data_key(dir)?.with_context(|| {
            format!(
                "{} vanished while it was read",
                dir.join(KEY_FILE).display()
            )
        });
    }
    remember(dir, &key);
    Ok(key)
}

/// Keeps the data key of `dir` under a new protection: `new_passphrase`, or the key file
/// when `None`.
pub fn rewrap(dir: &Path, new_passphrase: Option<&str>) -> Result<Protection> {
    let key = data_key(dir)?.with_context(|| {
        format!(
            "{} has no data key (is it a medmesh data directory?)",
            dir.display()
        )
    })?;
    write_key_file(dir, &key, new_passphrase)?;
    Ok(if new_passphrase.is_some() {
        Protection::Passphrase
    } else {
        Protection::KeyFile
    })
}

/// Whether this process encrypts stores: always, unless a benchmark set
/// [`UNENCRYPTED_FOR_BENCHMARK`].
pub fn encrypting() -> bool {
    std::env::var_os(UNENCRYPTED_FOR_BENCHMARK).is_none()
}

/// Opens the store file `path` of data directory `dir`: encrypted with the directory's
/// data key (made when new), an unencrypted one of an older medmesh encrypted first.
/// With `encrypt` false (benchmarks), a new or unencrypted store stays unencrypted.
pub fn open_store(
    dir: &Path,
    path: &Path,
    schema: Schema,
    options: StoreOptions,
    encrypt: bool,
) -> Result<(Store, Protection)> {
    let unencrypted = !encrypt;
    let exists = path.exists();
    let encrypted = exists && is_encrypted_store_file(path);
    if unencrypted && !encrypted {
        tracing::warn!(
            "{UNENCRYPTED_FOR_BENCHMARK} is set: this node's store is not encrypted. It is for benchmarks only: unset it"
        );
        let store = Store::open(path, schema, options)?;
        return Ok((store, Protection::Off));
    }
    if exists && !encrypted {
        let journal = medmesh_storage::journal_path(path);
        if journal.exists() {
            // Writes of an unclean stop still in the journal go into the file first; the
            // unencrypted journal then goes (a new one is made, encrypted).
            drop(Store::open(path, schema.clone(), StoreOptions::default())?);
            std::fs::remove_file(&journal).with_context(|| {
                format!(
                    "cannot remove the unencrypted journal {}",
                    journal.display()
                )
            })?;
        }
        let key = data_key_or_new(dir)?;
        encrypt_in_place(path, &key)?;
    }
    let key = if encrypted {
        data_key(dir)?.with_context(|| {
            format!(
                "the store {} is encrypted but its key file {} is missing: restore the data directory from its backup",
                path.display(),
                dir.join(KEY_FILE).display()
            )
        })?
    } else {
        data_key_or_new(dir)?
    };
    let protection = protection(dir)?.unwrap_or(Protection::KeyFile);
    let store = Store::open_encrypted(path, &key, schema, options)?;
    Ok((store, protection))
}

/// Encrypts an unencrypted store file: written beside it, synced, then renamed over it
/// (a crash leaves the old file, encrypted again at the next start with the same key).
fn encrypt_in_place(path: &Path, key: &DataKey) -> Result<()> {
    let beside = path.with_extension("redb.encrypting");
    let _ = std::fs::remove_file(&beside);
    println!(
        "Encrypting the store {} (once; this takes a moment for a large store)...",
        path.display()
    );
    medmesh_storage::encrypt_store_file(path, &beside, key)
        .with_context(|| format!("cannot encrypt the store {}", path.display()))?;
    std::fs::rename(&beside, path).with_context(|| {
        format!(
            "cannot put the encrypted store in place of {}",
            path.display()
        )
    })?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    println!("The store is encrypted.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passphrase_wraps_the_key_and_a_wrong_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = DataKey::generate();
        write_key_file(dir.path(), &key, Some("a long passphrase")).expect("write");
        let text = std::fs::read_to_string(dir.path().join(KEY_FILE)).expect("read");
        assert!(
            !text.contains(&b64().encode(key.as_bytes())),
            "the key is wrapped"
        );
        let content: KeyFileContent = serde_json::from_str(&text).expect("json");
        let salt = b64().decode(content.salt.expect("salt")).expect("salt");
        let wrapped = content.wrapped.expect("wrapped");
        let right = kek("a long passphrase", &salt, ARGON_MEMORY_KIB, ARGON_PASSES).expect("kek");
        assert_eq!(
            open_sealed(&right, &wrapped).as_deref(),
            Some(&key.as_bytes()[..])
        );
        let wrong = kek("another passphrase", &salt, ARGON_MEMORY_KIB, ARGON_PASSES).expect("kek");
        assert_eq!(open_sealed(&wrong, &wrapped), None);
    }

    #[test]
    fn a_sealed_secret_opens_only_with_its_key() {
        let key = [7u8; 32];
        let sealed = seal(&key, b"owner seed").expect("seal");
        assert!(is_sealed(&sealed) && !sealed.contains("owner"));
        assert_eq!(
            open_sealed(&key, &sealed).as_deref(),
            Some(&b"owner seed"[..])
        );
        assert_eq!(open_sealed(&[8u8; 32], &sealed), None);
        assert_eq!(open_sealed(&key, "sealed1:!!"), None);
    }
}
