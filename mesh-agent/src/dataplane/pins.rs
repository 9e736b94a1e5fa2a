//! The pin directory of one node: where maps and links live while no agent runs.
//!
//! Layout: `<bpffs>/mesh/<node>/maps/<MAP_NAME>` and `<bpffs>/mesh/<node>/links/<hook>`.
//! Map names carry the layout version (`MESH_SVC_V1`); this module checks that what is pinned
//! matches what this build expects before anything adopts it, so an agent never reads or writes
//! a map of another layout.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::maps::MapData;
use mesh_common::{
    health::ConnectOutcomes,
    maps,
    redirect::{OriginalDest, SockKey},
    service::{
        AffinityKey, AffinityValue, Backend, ReverseKey, ReverseValue, Service, ServiceKey, SlotKey,
    },
    sockmap::SockTuple,
};

/// Why the pinned state cannot be adopted.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("cannot create pin directory {path}: {cause} (is bpffs mounted? try `mount -t bpf bpf /sys/fs/bpf`)")]
    CreateDir { path: PathBuf, cause: io::Error },
    #[error("cannot read pin directory {path}: {cause}")]
    ReadDir { path: PathBuf, cause: io::Error },
    #[error("{path} holds a map this agent does not know ({name}); it was left by an agent with another map layout (this one uses layout v{version}). Run `mesh-agent uninstall` with that agent's version, or remove the directory, then start again")]
    ForeignMap {
        path: PathBuf,
        name: String,
        version: u32,
    },
    #[error("pinned map {path} has (key size, value size, capacity) {found:?}, this agent expects {expected:?}; refusing to adopt an incompatible layout")]
    Incompatible {
        path: PathBuf,
        found: (u32, u32, u32),
        expected: (u32, u32, u32),
    },
    #[error("cannot open pinned map {path}")]
    Open {
        path: PathBuf,
        #[source]
        cause: aya::maps::MapError,
    },
    #[error("cannot remove {path}: {cause}")]
    Remove { path: PathBuf, cause: io::Error },
}

/// Paths of one node's pins.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// `<bpffs>/mesh/<node>`.
    pub fn new(bpffs: &Path, node: &str) -> Self {
        Self {
            root: bpffs.join("mesh").join(node),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, hook: &str) -> PathBuf {
        self.links().join(hook)
    }

    /// Creates the directories if needed.
    pub fn create(&self) -> Result<(), PinError> {
        for path in [self.maps(), self.links()] {
            fs::create_dir_all(&path).map_err(|cause| PinError::CreateDir { path, cause })?;
        }
        Ok(())
    }

    /// True when a previous agent left maps here.
    pub fn has_maps(&self) -> bool {
        fs::read_dir(self.maps())
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false)
    }

    /// Checks every pinned map against this build's layout.
    pub fn validate(&self) -> Result<(), PinError> {
        let dir = self.maps();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(cause) => return Err(PinError::ReadDir { path: dir, cause }),
        };
        for entry in entries {
            let entry = entry.map_err(|cause| PinError::ReadDir {
                path: dir.clone(),
                cause,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let Some(expected) = expected_shape(&name) else {
                return Err(PinError::ForeignMap {
                    path,
                    name,
                    version: maps::LAYOUT_VERSION,
                });
            };
            let info = MapData::from_pin(&path)
                .and_then(|map| map.info())
                .map_err(|cause| PinError::Open {
                    path: path.clone(),
                    cause,
                })?;
            let found = (info.key_size(), info.value_size(), info.max_entries());
            if found != expected {
                return Err(PinError::Incompatible {
                    path,
                    found,
                    expected,
                });
            }
        }
        Ok(())
    }

    /// Removes every pin and the node's directory. Links detach when their pin goes and no
    /// process holds them.
    pub fn remove_all(&self) -> Result<(), PinError> {
        match fs::remove_dir_all(&self.root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(cause) => Err(PinError::Remove {
                path: self.root.clone(),
                cause,
            }),
        }
    }
}

/// (key size, value size, capacity) of each map of this layout. A pinned map cannot be resized,
/// so a capacity change is as incompatible as a new key.
fn expected_shape(name: &str) -> Option<(u32, u32, u32)> {
    fn shape<K, V>(capacity: u32) -> (u32, u32, u32) {
        #[expect(clippy::cast_possible_truncation, reason = "map types are a few bytes")]
        (size_of::<K>() as u32, size_of::<V>() as u32, capacity)
    }
    Some(match name {
        maps::SERVICES => shape::<ServiceKey, Service>(maps::SERVICES_MAX),
        maps::SLOTS => shape::<SlotKey, u32>(maps::SLOTS_MAX),
        maps::BACKENDS => shape::<u32, Backend>(maps::BACKENDS_MAX),
        maps::REVERSE => shape::<ReverseKey, ReverseValue>(maps::REVERSE_MAX),
        maps::AFFINITY => shape::<AffinityKey, AffinityValue>(maps::AFFINITY_MAX),
        maps::COUNTERS => shape::<u32, u64>(maps::COUNTERS_MAX),
        maps::BACKEND_COUNTS => shape::<u32, u64>(maps::BACKENDS_MAX),
        maps::REDIRECT_BY_COOKIE => shape::<u64, OriginalDest>(maps::REDIRECT_MAX),
        maps::REDIRECT_BY_PEER => shape::<SockKey, OriginalDest>(maps::REDIRECT_MAX),
        maps::STRICT_INBOUND => shape::<SockKey, u32>(maps::STRICT_MAX),
        maps::CONNECT_OUTCOMES => shape::<SockKey, ConnectOutcomes>(maps::BACKENDS_MAX),
        // A sockhash's value is the socket, shown to user space as a 32-bit descriptor.
        maps::LOOPBACK_SOCKETS => shape::<SockTuple, u32>(maps::LOOPBACK_SOCKETS_MAX),
        _ => return None,
    })
}
