//! `mesh-agent uninstall`: removes every trace of a node's agent from this host (the pinned
//! maps and links, which detaches the programs; the admin socket; the node's state directory)
//! and says exactly what it removed.
//!
//! It refuses while an agent holds the node's lock ([`crate::sys::node_lock`]), naming it, unless
//! forced; otherwise it takes the lock itself for the removal, so no agent can start halfway.

use std::{
    fs, io,
    os::unix::fs::FileTypeExt as _,
    path::{Path, PathBuf},
};

use crate::{
    dataplane::{self, PinDir},
    sys::node_lock::{LockError, NodeLock, Owner},
};

/// What to remove.
pub struct Target {
    pub node: String,
    pub pins: PinDir,
    /// `<state-dir>/<node>`.
    pub state: PathBuf,
    pub admin_socket: PathBuf,
    /// Remove even while an agent holds the node.
    pub force: bool,
}

/// Why nothing (or not everything) was removed.
#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("node {node} is served by a running agent ({owner}); stop it first (`systemctl stop mesh-agent`), or pass --force to remove its data plane under it")]
    Running { node: String, owner: Owner },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    DataPlane(#[from] dataplane::DataPlaneError),
    #[error("cannot remove {}: {cause}", path.display())]
    Remove { path: PathBuf, cause: io::Error },
}

/// Removes what exists of `target`; the paths removed (empty: there was nothing to remove).
pub fn uninstall(target: &Target) -> Result<Vec<PathBuf>, UninstallError> {
    let owner_file = target.state.join("agent.json");
    let holder = NodeLock::holder(target.pins.root(), &owner_file)?;
    if let Some(owner) = holder {
        if !target.force {
            return Err(UninstallError::Running {
                node: target.node.clone(),
                owner,
            });
        }
        tracing::warn!(node = target.node, %owner, "--force: removing the data plane of a running agent");
    }
    let admin_socket = recorded_socket(&owner_file).unwrap_or_else(|| target.admin_socket.clone());
    let mut removed = Vec::new();
    if target.pins.root().exists() {
        // Held for the removal (unless forced past a running agent), so no agent starts halfway.
        let _lock = if target.force {
            None
        } else {
            Some(NodeLock::acquire(
                target.pins.root(),
                &target.state.join("uninstall.json"),
                &target.node,
                &admin_socket,
            )?)
        };
        dataplane::uninstall(&target.pins)?;
        removed.push(target.pins.root().to_owned());
        remove_if_empty(target.pins.root().parent());
    }
    if is_socket(&admin_socket) {
        remove(&admin_socket, |p| fs::remove_file(p))?;
        removed.push(admin_socket);
    }
    if target.state.exists() {
        remove(&target.state, |p| fs::remove_dir_all(p))?;
        removed.push(target.state.clone());
    }
    Ok(removed)
}

/// The admin socket the node's last agent recorded.
fn recorded_socket(owner_file: &Path) -> Option<PathBuf> {
    let bytes = fs::read(owner_file).ok()?;
    serde_json::from_slice::<Owner>(&bytes).ok()?.admin_socket
}

fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

fn remove(path: &Path, how: fn(&Path) -> io::Result<()>) -> Result<(), UninstallError> {
    match how(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(cause) => Err(UninstallError::Remove {
            path: path.to_owned(),
            cause,
        }),
    }
}

/// `<bpffs>/mesh` once its last node is gone.
fn remove_if_empty(dir: Option<&Path>) {
    if let Some(dir) = dir {
        let _ = fs::remove_dir(dir);
    }
}
