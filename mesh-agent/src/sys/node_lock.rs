//! One agent per node: an exclusive `flock(2)` on the node's pin directory
//! (`<bpffs>/mesh/<node>/`), taken before the agent touches a map, a link or a socket, and
//! held until it exits.
//!
//! The lock is on the pin directory because that is what two agents of one node would fight
//! over, whatever their state directories. Beside it the holder keeps an owner record
//! (`<state-dir>/<node>/agent.json`: pid, admin socket) so that a refused agent, or
//! `mesh-agent uninstall`, can name who holds the node.
//!
//! The lock belongs to the open file description, not to the process: a takeover hands the
//! descriptor to the successor over the admin socket (`SCM_RIGHTS`), which then holds the
//! lock with no moment where nobody does ([`NodeLock::adopt`]).

use std::{
    fs::{self, File},
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Why the node could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open {path} to lock the node: {cause} (is bpffs mounted? try `mount -t bpf bpf /sys/fs/bpf`)")]
    Open { path: PathBuf, cause: io::Error },
    #[error("cannot lock {path}: {cause}")]
    Lock { path: PathBuf, cause: io::Error },
    #[error("node {node} is already served by another agent ({owner}); nothing was changed. Stop it first, or start this one with --takeover to replace it without a gap")]
    Held { node: String, owner: Owner },
}

/// Who holds a node's lock, as its owner record says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// `None` when no owner record could be read (another state directory, or written by an
    /// agent that has not yet recorded itself).
    pub pid: Option<u32>,
    pub admin_socket: Option<PathBuf>,
    /// The lock's directory.
    #[serde(skip)]
    pub lock: PathBuf,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid}")?,
            None => write!(f, "pid unknown")?,
        }
        if let Some(socket) = &self.admin_socket {
            write!(f, ", admin socket {}", socket.display())?;
        }
        write!(f, ", lock on {}", self.lock.display())
    }
}

/// The node's lock, held while this value lives (and by any copy of its descriptor).
#[derive(Debug)]
pub struct NodeLock {
    /// Held for the lock; handed over by a takeover.
    dir: OwnedFd,
    owner_file: PathBuf,
}

impl NodeLock {
    /// Takes the lock on `pin_root` (created if missing) without waiting, and records this
    /// process as its owner in `owner_file`. A lock held by another agent is
    /// [`LockError::Held`], naming it.
    pub fn acquire(
        pin_root: &Path,
        owner_file: &Path,
        node: &str,
        admin_socket: &Path,
    ) -> Result<Self, LockError> {
        let dir = open_dir(pin_root)?;
        if !try_lock(&dir, pin_root)? {
            return Err(LockError::Held {
                node: node.to_owned(),
                owner: read_owner(pin_root, owner_file),
            });
        }
        let lock = Self {
            dir: dir.into(),
            owner_file: owner_file.to_owned(),
        };
        lock.record_owner(admin_socket);
        Ok(lock)
    }

    /// The lock a predecessor handed over (its descriptor, received by a takeover); this
    /// process becomes the recorded owner.
    pub fn adopt(dir: OwnedFd, owner_file: &Path, admin_socket: &Path) -> Self {
        let lock = Self {
            dir,
            owner_file: owner_file.to_owned(),
        };
        lock.record_owner(admin_socket);
        lock
    }

    /// Who holds `pin_root`'s lock now, or `None` when nobody does (the lock is tried and
    /// released at once).
    pub fn holder(pin_root: &Path, owner_file: &Path) -> Result<Option<Owner>, LockError> {
        let dir = match File::open(pin_root) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(cause) => {
                return Err(LockError::Open {
                    path: pin_root.to_owned(),
                    cause,
                })
            }
        };
        if try_lock(&dir, pin_root)? {
            return Ok(None);
        }
        Ok(Some(read_owner(pin_root, owner_file)))
    }

    /// The locked descriptor, to hand to a successor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// Writes this process into the owner record (atomically; a failure is logged, the lock
    /// holds either way). Also after a failed takeover, whose successor recorded itself.
    pub fn record_owner(&self, admin_socket: &Path) {
        let owner = Owner {
            pid: Some(std::process::id()),
            admin_socket: Some(admin_socket.to_owned()),
            lock: PathBuf::new(),
        };
        if let Err(error) = crate::sys::state_file::write_json(&self.owner_file, &owner) {
            tracing::warn!(file = %self.owner_file.display(), %error, "cannot record this agent as the node's owner");
        }
    }
}

fn open_dir(path: &Path) -> Result<File, LockError> {
    let err = |cause| LockError::Open {
        path: path.to_owned(),
        cause,
    };
    fs::create_dir_all(path).map_err(err)?;
    File::open(path).map_err(err)
}

/// `flock(LOCK_EX | LOCK_NB)`: true when taken, false when another description holds it.
fn try_lock(file: &File, path: &Path) -> Result<bool, LockError> {
    // SAFETY: flock on a descriptor this function borrows for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let cause = io::Error::last_os_error();
    if cause.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(LockError::Lock {
        path: path.to_owned(),
        cause,
    })
}

fn read_owner(pin_root: &Path, owner_file: &Path) -> Owner {
    let recorded = fs::read(owner_file)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Owner>(&bytes).ok())
        .unwrap_or_default();
    Owner {
        lock: pin_root.to_owned(),
        ..recorded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_owner_and_free_once_released() {
        let dir = crate::sys::state_file::ScratchDir::new("lock-second");
        let pins = dir.path().join("pins");
        let owner = dir.path().join("state/agent.json");
        let socket = Path::new("/run/mesh/test.sock");
        let first = NodeLock::acquire(&pins, &owner, "n1", socket).unwrap();
        let err = NodeLock::acquire(&pins, &owner, "n1", socket).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert!(text.contains("/run/mesh/test.sock"), "{text}");
        assert!(text.contains("--takeover"), "{text}");
        let held = NodeLock::holder(&pins, &owner).unwrap().unwrap();
        assert_eq!(held.pid, Some(std::process::id()));
        drop(first);
        assert_eq!(NodeLock::holder(&pins, &owner).unwrap(), None);
        NodeLock::acquire(&pins, &owner, "n1", socket).unwrap();
    }

    #[test]
    fn a_handed_over_descriptor_keeps_the_lock() {
        let dir = crate::sys::state_file::ScratchDir::new("lock-handover");
        let pins = dir.path().join("pins");
        let owner = dir.path().join("agent.json");
        let socket = Path::new("/s");
        let first = NodeLock::acquire(&pins, &owner, "n1", socket).unwrap();
        let copy = first.fd().try_clone_to_owned().unwrap();
        drop(first);
        let second = NodeLock::adopt(copy, &owner, Path::new("/t"));
        assert!(NodeLock::acquire(&pins, &owner, "n1", socket).is_err());
        drop(second);
        assert!(NodeLock::acquire(&pins, &owner, "n1", socket).is_ok());
    }
}
