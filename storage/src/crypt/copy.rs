//! Whole-file copies through the encryption: migrating a plain store, changing the key.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;

use redb::StorageBackend;
use zeroize::Zeroize;

use super::{
    BLOCK_BYTES, DataKey, DataSlot, EncryptedFile, MAGIC, Mode, REDB_MAGIC, open_failed, read_at,
    read_failed,
};
use crate::error::{Result, StoreError};

/// Bytes copied at a time.
const COPY_CHUNK: usize = 64 * BLOCK_BYTES;

/// Copies the closed plain store file `plain` into a new encrypted file `encrypted`
/// (which must not exist yet), and syncs it. The logical content is byte for byte the
/// same, so redb opens it as the same database. Only `encrypted` is written; the caller
/// moves it into place (and removes the plain file) once this returns.
pub fn encrypt_store_file(plain: &Path, encrypted: &Path, key: &DataKey) -> Result<()> {
    let source = File::open(plain).map_err(|err| open_failed(plain, &err))?;
    let mut head = [0u8; MAGIC.len()];
    let length = source
        .metadata()
        .map_err(|err| open_failed(plain, &err))?
        .len();
    let have = usize::try_from(length.min(MAGIC.len() as u64)).unwrap_or(0);
    read_at(&source, &mut head[..have], 0).map_err(|err| open_failed(plain, &err))?;
    if &head == MAGIC {
        return Err(StoreError::Encrypted {
            path: plain.display().to_string(),
        });
    }
    if !head.starts_with(REDB_MAGIC) {
        return Err(StoreError::Open {
            path: plain.display().to_string(),
            reason: "it is not a medmesh database file, so there is nothing to encrypt".into(),
        });
    }
    let target = EncryptedFile::open_as(encrypted, key, Mode::CreateNew)?;
    let padded = length.next_multiple_of(BLOCK_BYTES as u64);
    copy_blocks(padded, &target, encrypted, |offset, buf| {
        let end = (offset + buf.len() as u64).min(length);
        let real = usize::try_from(end.saturating_sub(offset)).unwrap_or(0);
        buf[real..].fill(0);
        read_at(&source, &mut buf[..real], offset).map_err(|err| read_failed(plain, &err))
    })
}

/// Copies the closed encrypted store file `src` (opened with `old`) into a new encrypted
/// file `dst` (which must not exist yet) under `new`, with a new file id, and syncs it:
/// a change of data key. Only `dst` is written; the caller moves it into place.
///
/// A data block of `src` that does not authenticate (a free page a crash tore, or damage)
/// stays one that does not authenticate in `dst`: the copy neither fails on it nor turns
/// it into authentic zeros that redb would take for a page.
pub fn reencrypt_store_file(src: &Path, dst: &Path, old: &DataKey, new: &DataKey) -> Result<()> {
    let source = EncryptedFile::open_as(src, old, Mode::ReadOnly)?;
    let target = EncryptedFile::open_as(dst, new, Mode::CreateNew)?;
    let length = source.len.load(Ordering::Acquire);
    let blocks = length / BLOCK_BYTES as u64;
    let mut block = [0u8; BLOCK_BYTES];
    if blocks > 0 {
        source
            .read(0, &mut block)
            .map_err(|err| read_failed(src, &err))?;
    }
    let mut damaged = Vec::new();
    copy_blocks(length, &target, dst, |offset, buf| {
        for (i, chunk) in buf.chunks_mut(BLOCK_BYTES).enumerate() {
            let index = offset / BLOCK_BYTES as u64 + i as u64;
            if index == 0 {
                chunk.copy_from_slice(&block);
            } else if source
                .read_data_slot(index, chunk)
                .map_err(|err| read_failed(src, &err))?
                == DataSlot::Unauthentic
            {
                damaged.push(index);
            }
        }
        Ok(())
    })?;
    block.zeroize();
    if damaged.is_empty() {
        return Ok(());
    }
    tracing::warn!(path = %src.display(), blocks = ?damaged, "blocks that do not authenticate were copied as such");
    for index in damaged {
        target
            .write_unauthentic(index)
            .map_err(|err| write_failed(dst, &err))?;
    }
    target.sync_data().map_err(|err| write_failed(dst, &err))
}

/// Sizes `target` to `length` and fills it chunk by chunk from `fill`, then syncs it.
fn copy_blocks(
    length: u64,
    target: &EncryptedFile,
    target_path: &Path,
    mut fill: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let written = |err: io::Error| write_failed(target_path, &err);
    target.set_len(length).map_err(written)?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut offset = 0;
    while offset < length {
        let n = usize::try_from((length - offset).min(COPY_CHUNK as u64)).unwrap_or(COPY_CHUNK);
        fill(offset, &mut buf[..n])?;
        target.write(offset, &buf[..n]).map_err(written)?;
        offset += n as u64;
    }
    buf.zeroize();
    target.sync_data().map_err(written)
}

fn write_failed(path: &Path, err: &io::Error) -> StoreError {
    match StoreError::from_io(err) {
        StoreError::DiskFull => StoreError::DiskFull,
        _ => StoreError::Open {
            path: path.display().to_string(),
            reason: format!("it could not be written ({err})"),
        },
    }
}
