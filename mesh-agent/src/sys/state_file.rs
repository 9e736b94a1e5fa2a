//! The agent's own files in its state directory (`<state-dir>/<node>/`): each is replaced
//! atomically (a sibling temporary file, written, synced, renamed over the old one, directory
//! synced), so a crash leaves the old file or the new one, never half of one, and each is
//! created mode 0600 whatever the umask (they name the node's endpoints and peers).

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::Serialize;

/// A state file that could not be written, naming it.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {cause}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    pub cause: io::Error,
}

/// Replaces `path` with `bytes`, atomically, mode 0600; creates its directory (0700) if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |cause| WriteError { path, cause }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err(dir))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err(&tmp))?;
    out.write_all(bytes).map_err(err(&tmp))?;
    out.sync_all().map_err(err(&tmp))?;
    fs::rename(&tmp, path).map_err(err(path))?;
    // The rename itself is durable once the directory is synced.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err(dir))
}

/// [`write_atomic`] of `value` as pretty JSON.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), WriteError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| WriteError {
        path: path.to_owned(),
        cause: io::Error::other(e),
    })?;
    write_atomic(path, &bytes)
}

/// A scratch directory for tests, removed on drop.
#[cfg(test)]
pub struct ScratchDir(pub PathBuf);

#[cfg(test)]
impl ScratchDir {
    pub fn new(name: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("mesh-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        ScratchDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn files_are_private_whatever_the_umask_and_replaced_whole() {
        let dir = ScratchDir::new("state-file");
        let path = dir.path().join("node/x.json");
        // SAFETY: umask only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0) };
        let written = write_atomic(&path, b"one").and_then(|()| write_atomic(&path, b"two"));
        unsafe { libc::umask(old) };
        written.unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        assert!(!dir.path().join("node/x.json.tmp").exists());
    }
}
