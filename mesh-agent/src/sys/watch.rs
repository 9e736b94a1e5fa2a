//! Following a file the agent reads (the config, certificates): each time a new version of
//! it is complete, one message on a channel.
//!
//! A version is complete when its writer has closed it (`IN_CLOSE_WRITE`) or when it was
//! renamed or linked into place (`IN_MOVED_TO`, `IN_CREATE`); writes to a file still open are
//! ignored, so a file caught mid-write is never read. Symlinks are followed: every link on the
//! way from the path to the file (a `ln -sf` deploy, the Kubernetes ConfigMap's
//! `mesh.toml -> ..data/mesh.toml` with `..data -> ..<timestamp>`) is watched in its
//! directory, so swapping any of them is a change, and the watches follow the new chain.
//!
//! Directories are watched, not files, because a rename replaces the inode a file watch
//! would follow. The watches live on a thread of their own (notify's callbacks cannot change
//! the watches they are called from); it ends when the [`FileWatch`] is dropped.

use std::{
    collections::BTreeSet,
    path::{Component, Path, PathBuf},
    sync::mpsc as std_mpsc,
};

use notify::{
    event::{AccessKind, AccessMode, ModifyKind},
    EventKind, RecommendedWatcher, RecursiveMode, Watcher as _,
};
use tokio::sync::mpsc::UnboundedSender;

/// Why a file cannot be followed.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {cause}")]
pub struct WatchError {
    path: PathBuf,
    cause: notify::Error,
}

/// Symlinks followed at most, as the kernel's own limit.
const MAX_LINKS: usize = 40;

/// A followed file; the watches stop when it is dropped.
pub struct FileWatch {
    stop: std_mpsc::Sender<Message>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        let _ = self.stop.send(Message::Stop);
    }
}

enum Message {
    Event(notify::Event),
    Stop,
}

/// Starts following `file`; complete new versions are announced on `changes` until the
/// returned [`FileWatch`] is dropped.
pub fn watch_file(file: &Path, changes: UnboundedSender<()>) -> Result<FileWatch, WatchError> {
    let err = |cause| WatchError {
        path: file.to_owned(),
        cause,
    };
    let absolute = std::path::absolute(file).map_err(|e| err(notify::Error::io(e)))?;
    let (tx, rx) = std_mpsc::channel();
    let events = tx.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let _ = events.send(Message::Event(event));
        }
    })
    .map_err(err)?;
    let mut follower = Follower {
        file: absolute,
        watcher,
        watched: BTreeSet::new(),
        chain: Vec::new(),
    };
    follower.rewatch().map_err(err)?;
    std::thread::Builder::new()
        .name("mesh-watch".into())
        .spawn(move || follower.run(&rx, &changes))
        .map_err(|e| err(notify::Error::io(e)))?;
    Ok(FileWatch { stop: tx })
}

struct Follower {
    file: PathBuf,
    watcher: RecommendedWatcher,
    /// Directories watched now.
    watched: BTreeSet<PathBuf>,
    /// The paths whose change changes what `file` reads: itself, every link on the way, the
    /// target.
    chain: Vec<PathBuf>,
}

impl Follower {
    fn run(mut self, rx: &std_mpsc::Receiver<Message>, changes: &UnboundedSender<()>) {
        while let Ok(Message::Event(event)) = rx.recv() {
            if !completes_a_version(event.kind)
                || !event.paths.iter().any(|p| self.chain.contains(p))
            {
                continue;
            }
            if let Err(error) = self.rewatch() {
                tracing::warn!(file = %self.file.display(), %error, "cannot follow a link of the watched file");
            }
            if changes.send(()).is_err() {
                return;
            }
        }
    }

    /// Watches the directory of every path of the chain, and only those.
    fn rewatch(&mut self) -> Result<(), notify::Error> {
        self.chain = chain(&self.file);
        let dirs: BTreeSet<PathBuf> = self
            .chain
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            // A directory that is itself a link is watched as its target (also in the chain):
            // a watch through the link would stay on the old target after a swap.
            .filter(|dir| !std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()))
            .collect();
        for gone in self.watched.difference(&dirs) {
            let _ = self.watcher.unwatch(gone);
        }
        let mut first_error = None;
        for dir in dirs.difference(&self.watched) {
            if let Err(error) = self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                // A directory of a dangling link: the link itself is still watched.
                first_error.get_or_insert(error);
            }
        }
        self.watched = dirs;
        first_error.map_or(Ok(()), Err)
    }
}

/// Events after which the file holds a whole version: closed after writing, renamed or
/// created (a link) into place. Plain writes are not: the writer may not be done.
fn completes_a_version(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Name(_))
    )
}

/// `path`, every symlink met while resolving it (whole path or a directory on the way), and
/// what it resolves to; absolute and lexically normalised.
fn chain(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![normalise(path)];
    let mut current = normalise(path);
    for _ in 0..MAX_LINKS {
        let Some((link, rest)) = first_link(&current) else {
            break;
        };
        let Ok(target) = std::fs::read_link(&link) else {
            break;
        };
        let base = link.parent().unwrap_or(Path::new("/"));
        current = normalise(&base.join(target).join(rest));
        for p in [link, current.clone()] {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// The first prefix of `path` that is a symlink, and what follows it.
fn first_link(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let mut prefix = PathBuf::new();
    let mut components = path.components();
    for component in components.by_ref() {
        prefix.push(component);
        if std::fs::symlink_metadata(&prefix).is_ok_and(|m| m.file_type().is_symlink()) {
            return Some((prefix, components.as_path().to_path_buf()));
        }
    }
    None
}

/// Absolute, with `.` and `..` resolved lexically (links are resolved by [`chain`]).
fn normalise(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut out = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::state_file::ScratchDir;
    use std::{io::Write as _, os::unix::fs::symlink, time::Duration};
    use tokio::sync::mpsc;

    fn changes_within(rx: &mut mpsc::UnboundedReceiver<()>, wait: Duration) -> usize {
        std::thread::sleep(wait);
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        n
    }

    #[test]
    fn a_file_written_in_two_halves_is_announced_once_when_closed() {
        let dir = ScratchDir::new("watch-halves");
        std::fs::create_dir_all(dir.path()).unwrap();
        let path = dir.path().join("mesh.toml");
        std::fs::write(&path, "a = 1\n").unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _watch = watch_file(&path, tx).unwrap();
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(b"a = ").unwrap();
        assert_eq!(changes_within(&mut rx, Duration::from_millis(100)), 0);
        file.write_all(b"2\n").unwrap();
        drop(file);
        assert_eq!(changes_within(&mut rx, Duration::from_millis(100)), 1);
    }

    #[test]
    fn a_configmap_style_data_swap_is_a_change_and_is_followed() {
        let dir = ScratchDir::new("watch-configmap");
        let root = dir.path();
        std::fs::create_dir_all(root.join("..v1")).unwrap();
        std::fs::write(root.join("..v1/mesh.toml"), "v = 1\n").unwrap();
        symlink("..v1", root.join("..data")).unwrap();
        symlink("..data/mesh.toml", root.join("mesh.toml")).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _watch = watch_file(&root.join("mesh.toml"), tx).unwrap();
        // Kubernetes: write the new directory, link ..data_tmp to it, rename over ..data.
        let swap = |version: &str| {
            std::fs::create_dir_all(root.join(version)).unwrap();
            std::fs::write(root.join(version).join("mesh.toml"), "v = 2\n").unwrap();
            symlink(version, root.join("..data_tmp")).unwrap();
            std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        };
        swap("..v2");
        assert!(changes_within(&mut rx, Duration::from_millis(200)) >= 1);
        // The watches moved to the new target: an in-place edit there is seen too.
        std::fs::write(root.join("..v2/mesh.toml"), "v = 3\n").unwrap();
        assert!(changes_within(&mut rx, Duration::from_millis(200)) >= 1);
        swap("..v3");
        assert!(changes_within(&mut rx, Duration::from_millis(200)) >= 1);
        // Other files of the directory are not the config.
        std::fs::write(root.join("other.toml"), "x = 1\n").unwrap();
        assert_eq!(changes_within(&mut rx, Duration::from_millis(200)), 0);
    }

    #[test]
    fn the_chain_names_every_link_and_the_target() {
        let dir = ScratchDir::new("watch-chain");
        let root = dir.path();
        std::fs::create_dir_all(root.join("..v1")).unwrap();
        std::fs::write(root.join("..v1/mesh.toml"), "").unwrap();
        symlink("..v1", root.join("..data")).unwrap();
        symlink("..data/mesh.toml", root.join("mesh.toml")).unwrap();
        let root = normalise(root);
        assert_eq!(
            chain(&root.join("mesh.toml")),
            [
                root.join("mesh.toml"),
                root.join("..data/mesh.toml"),
                root.join("..data"),
                root.join("..v1/mesh.toml"),
            ]
        );
    }
}
