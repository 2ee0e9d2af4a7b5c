//! The plaintext file header: what the file is, its id, and a check of the key.

use std::fs::File;
use std::io;
use std::path::Path;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand::RngCore;

use super::{
    BLOCK_BYTES, FILE_ID_AT, FORMAT_VERSION, HEADER_CHECKED, HEADER_LEN, HEADER_USED, KEY_NONCE_AT,
    KEY_TAG_AT, MAGIC, NonceSource, REDB_MAGIC, write_at,
};
use crate::error::{Result, StoreError};

/// Writes a new file header (random file id, key check) into `header` and the file.
pub(super) fn write_header(
    file: &File,
    cipher: &Aes256Gcm,
    nonces: &NonceSource,
    header: &mut [u8; HEADER_LEN as usize],
) -> io::Result<()> {
    header.fill(0);
    header[..MAGIC.len()].copy_from_slice(MAGIC);
    header[24..28].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[28..32].copy_from_slice(&(BLOCK_BYTES as u32).to_le_bytes());
    rand::rng().fill_bytes(&mut header[FILE_ID_AT..FILE_ID_AT + 16]);
    let nonce = nonces.next();
    header[KEY_NONCE_AT..KEY_TAG_AT].copy_from_slice(&nonce);
    let tag = cipher
        .encrypt_in_place_detached(
            Nonce::from_slice(&nonce),
            &header[..HEADER_CHECKED],
            &mut [],
        )
        .map_err(|_| io::Error::other("the key check could not be computed"))?;
    header[KEY_TAG_AT..HEADER_USED].copy_from_slice(&tag);
    write_at(file, header, 0)?;
    file.sync_data()
}

/// Checks an existing file's header against the key; gives its file id.
pub(super) fn check_header(path: &Path, cipher: &Aes256Gcm, header: &[u8]) -> Result<[u8; 16]> {
    let display = || path.display().to_string();
    if header.starts_with(REDB_MAGIC) {
        return Err(StoreError::NotEncrypted { path: display() });
    }
    if !header.starts_with(MAGIC) {
        return Err(StoreError::Open {
            path: display(),
            reason: "it is not a medmesh store file (neither encrypted nor plain); check the --data directory".into(),
        });
    }
    if header.len() < HEADER_USED {
        return Err(StoreError::CorruptDatabase {
            path: display(),
            reason: "its encryption header is cut short".into(),
        });
    }
    let version = u32::from_le_bytes([header[24], header[25], header[26], header[27]]);
    let block = u32::from_le_bytes([header[28], header[29], header[30], header[31]]);
    if version == 1 {
        return Err(StoreError::Open {
            path: display(),
            reason: "it is in encrypted format 1 (two copies of every block), written by a development version of medmesh that was never released; this version does not read it. Move it aside and start again to re-sync from other devices".into(),
        });
    }
    if version != FORMAT_VERSION || block as usize != BLOCK_BYTES {
        return Err(StoreError::Open {
            path: display(),
            reason: format!(
                "it was encrypted by another medmesh version (encrypted format {version}, blocks of {block} bytes); run the medmesh version that wrote it"
            ),
        });
    }
    let nonce = Nonce::from_slice(&header[KEY_NONCE_AT..KEY_TAG_AT]);
    let tag = Tag::from_slice(&header[KEY_TAG_AT..HEADER_USED]);
    cipher
        .decrypt_in_place_detached(nonce, &header[..HEADER_CHECKED], &mut [], tag)
        .map_err(|_| StoreError::WrongKey { path: display() })?;
    let mut id = [0u8; 16];
    id.copy_from_slice(&header[FILE_ID_AT..FILE_ID_AT + 16]);
    Ok(id)
}
