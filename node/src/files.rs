//! Files of the data directory: every one is written readable by its owner only, whole
//! (written beside, synced, renamed: a crash leaves the old file or the new one).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `text` to `path`, mode 0600, replacing the file whole.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        // A file left by an older medmesh may have been more open.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot protect {}", tmp.display()))?;
        }
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot save {}", path.display()))?;
    sync_parent(path);
    Ok(())
}

/// Writes `text` to `path`, mode 0600, only if there is no such file yet; answers false
/// (and writes nothing) when there is one. Two processes racing get one winner.
pub fn write_private_new(path: &Path, text: &str) -> Result<bool> {
    let tmp = path.with_extension(format!("new-{}", std::process::id()));
    write_private(&tmp, text)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_parent(path);
            Ok(true)
        }
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(err) => Err(err).with_context(|| format!("cannot save {}", path.display())),
    }
}

/// Makes a rename or a new name in `path`'s directory durable (best effort).
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
}
