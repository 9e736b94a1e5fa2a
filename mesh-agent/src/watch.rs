//! Following the config file: every change to it (written in place, or replaced by rename as
//! editors and config managers do) becomes one message on a channel.
//!
//! The parent directory is watched, not the file, because a rename replaces the inode a
//! file watch would follow.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc::UnboundedSender;

/// Why the config file cannot be followed.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch config file {path}: {cause}")]
pub struct WatchError {
    path: PathBuf,
    cause: notify::Error,
}

/// Starts following `file`; changes arrive on `changes` until the returned watcher is dropped.
pub fn watch_file(
    file: &Path,
    changes: UnboundedSender<()>,
) -> Result<RecommendedWatcher, WatchError> {
    let err = |cause| WatchError {
        path: file.to_owned(),
        cause,
    };
    let absolute = std::path::absolute(file).map_err(|e| err(notify::Error::io(e)))?;
    let dir = absolute
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let name: Option<OsString> = absolute.file_name().map(ToOwned::to_owned);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        let ours = event
            .paths
            .iter()
            .any(|path| path.file_name().map(ToOwned::to_owned) == name);
        if ours {
            let _ = changes.send(());
        }
    })
    .map_err(err)?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(err)?;
    Ok(watcher)
}
