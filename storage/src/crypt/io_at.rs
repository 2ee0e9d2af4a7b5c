//! Reads and writes at an offset, and how their failures are worded.

use std::fs::File;
use std::io;
use std::path::Path;

use crate::error::StoreError;

pub(super) fn in_use(path: &Path) -> StoreError {
    StoreError::Open {
        path: path.display().to_string(),
        reason: "another medmesh node is already using it; stop that node first, or give this one another --data directory".into(),
    }
}

pub(super) fn open_failed(path: &Path, err: &io::Error) -> StoreError {
    let reason = if err.kind() == io::ErrorKind::PermissionDenied {
        "permission denied: run medmesh as the user that owns the data directory".to_owned()
    } else if err.kind() == io::ErrorKind::AlreadyExists {
        "it already exists; remove it (it is left over from an earlier attempt) and try again"
            .to_owned()
    } else if err.kind() == io::ErrorKind::NotFound {
        "it does not exist; check the --data directory".to_owned()
    } else {
        err.to_string()
    };
    match StoreError::from_io(err) {
        StoreError::DiskFull => StoreError::DiskFull,
        _ => StoreError::Open {
            path: path.display().to_string(),
            reason,
        },
    }
}

pub(super) fn read_failed(path: &Path, err: &io::Error) -> StoreError {
    StoreError::Open {
        path: path.display().to_string(),
        reason: format!("it could not be read ({err})"),
    }
}

#[cfg(unix)]
pub(super) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(unix)]
pub(super) fn write_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

#[cfg(windows)]
pub(super) fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(windows)]
pub(super) fn write_at(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_write(buf, offset)? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => {
                buf = &buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}
