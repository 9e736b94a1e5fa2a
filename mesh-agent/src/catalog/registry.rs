//! The endpoints registered at run time (`mesh-agent register`), kept on disk so they survive
//! an agent restart: `<state dir>/<node>/registrations.json`, rewritten on every change by
//! writing a sibling temporary file, syncing it and renaming it over the old one (a crash
//! leaves the old file or the new one, never half of one).
//!
//! The file is the agent's own; one it cannot read back (corrupt, truncated, written by a
//! newer agent, holding an endpoint `register` would refuse) is refused as a whole: the agent
//! logs why, moves it aside to `registrations.json.broken` (kept for the operator, never
//! overwritten by the next save) and starts without registrations, since whatever registered
//! them can register them again, while refusing to start would take the node's whole data
//! plane down for one side file.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::catalog::{Endpoint, Registrations};

/// The version of the file format this agent writes and reads.
const VERSION: u32 = 1;

/// Why the registrations could not be read or written; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read {}: {cause}", path.display())]
    Read { path: PathBuf, cause: io::Error },
    #[error("{}: not a registrations file: {cause}", path.display())]
    Parse {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("{}: format version {found}, this agent reads version {VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("{}: endpoint {service} {address}: {cause}", path.display())]
    Endpoint {
        path: PathBuf,
        service: String,
        address: std::net::SocketAddr,
        cause: String,
    },
    #[error("cannot write {}: {cause}", path.display())]
    Write { path: PathBuf, cause: io::Error },
}

/// The file's contents.
#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    endpoints: Vec<Endpoint>,
}

/// Where this node's registrations are kept.
#[derive(Debug, Clone)]
pub struct Registry {
    path: PathBuf,
}

impl Registry {
    /// The registry of `node` under `state_dir`.
    pub fn new(state_dir: &Path, node: &str) -> Registry {
        Registry {
            path: state_dir.join(node).join("registrations.json"),
        }
    }

    /// Where a file that cannot be read back is moved.
    pub fn broken_path(&self) -> PathBuf {
        self.path.with_extension("json.broken")
    }

    /// The registrations kept; none if there is no file yet.
    pub fn load(&self) -> Result<Registrations, RegistryError> {
        let path = &self.path;
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Registrations::default()),
            Err(cause) => {
                return Err(RegistryError::Read {
                    path: path.clone(),
                    cause,
                })
            }
        };
        Registry::parse(path, &text)
    }

    /// Reads registrations from `text`, the contents of the file at `path` (named in errors).
    pub fn parse(path: &Path, text: &[u8]) -> Result<Registrations, RegistryError> {
        let path = &path.to_path_buf();
        let file: File = serde_json::from_slice(text).map_err(|cause| RegistryError::Parse {
            path: path.clone(),
            cause,
        })?;
        if file.version != VERSION {
            return Err(RegistryError::Version {
                path: path.clone(),
                found: file.version,
            });
        }
        let mut registrations = Registrations::default();
        for endpoint in file.endpoints {
            let (service, address) = (endpoint.service.clone(), endpoint.address);
            registrations
                .register(endpoint)
                .map_err(|cause| RegistryError::Endpoint {
                    path: path.clone(),
                    service: service.to_string(),
                    address,
                    cause,
                })?;
        }
        Ok(registrations)
    }

    /// [`Registry::load`], falling back to none: a file that cannot be read back is logged
    /// and moved aside to [`Registry::broken_path`].
    pub fn restore(&self) -> Registrations {
        match self.load() {
            Ok(registrations) => {
                let count = registrations.endpoints().len();
                if count > 0 {
                    tracing::info!(file = %self.path.display(), count, "registrations restored");
                }
                registrations
            }
            Err(error) => {
                let aside = self.broken_path();
                match std::fs::rename(&self.path, &aside) {
                    Ok(()) => tracing::error!(%error, moved_to = %aside.display(),
                        "registrations not restored; the agent starts without them"),
                    Err(cause) => tracing::error!(%error, %cause,
                        "registrations not restored, and the file could not be moved aside; the agent starts without them"),
                }
                Registrations::default()
            }
        }
    }

    /// Replaces the file with `registrations`, atomically.
    pub fn save(&self, registrations: &Registrations) -> Result<(), RegistryError> {
        let file = File {
            version: VERSION,
            endpoints: registrations.endpoints().to_vec(),
        };
        crate::sys::state_file::write_json(&self.path, &file).map_err(|e| RegistryError::Write {
            path: e.path,
            cause: e.cause,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch state directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir =
                std::env::temp_dir().join(format!("mesh-registry-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn endpoint(service: &str, address: &str, weight: u32) -> Endpoint {
        Endpoint {
            service: service.into(),
            address: address.parse().unwrap(),
            weight,
        }
    }

    #[test]
    fn saved_registrations_load_back_in_order() {
        let dir = Dir::new("roundtrip");
        let registry = Registry::new(&dir.0, "node-a");
        assert_eq!(registry.load().unwrap(), Registrations::default());
        let mut r = Registrations::default();
        r.register(endpoint("web", "10.0.0.2:80", 3)).unwrap();
        r.register(endpoint("api", "[fd00::1]:8080", 1)).unwrap();
        registry.save(&r).unwrap();
        assert_eq!(registry.load().unwrap(), r);
        assert_eq!(
            registry.path,
            dir.0.join("node-a").join("registrations.json")
        );
        // A deregistration is saved too; no temporary file stays behind.
        assert!(r.deregister("web", "10.0.0.2:80".parse().unwrap()));
        registry.save(&r).unwrap();
        assert_eq!(registry.load().unwrap().endpoints(), r.endpoints());
        let names: Vec<_> = std::fs::read_dir(dir.0.join("node-a"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["registrations.json"]);
    }

    #[test]
    fn an_unreadable_file_is_refused_naming_it_and_moved_aside() {
        let dir = Dir::new("broken");
        let registry = Registry::new(&dir.0, "n");
        std::fs::create_dir_all(registry.path.parent().unwrap()).unwrap();
        let file = registry.path.display().to_string();
        let cases = [
            (
                "{\"version\": 1, \"endpoints\": [",
                "not a registrations file",
            ),
            ("{\"version\": 9, \"endpoints\": []}", "format version 9"),
            (
                r#"{"version": 1, "endpoints": [{"service": "web", "address": "0.0.0.0:80", "weight": 1}]}"#,
                "endpoint web 0.0.0.0:80: 0.0.0.0:80: an unspecified address cannot be announced",
            ),
        ];
        for (text, want) in cases {
            std::fs::write(&registry.path, text).unwrap();
            let error = registry.load().unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("{file}: ")) && error.contains(want),
                "{error}"
            );
        }
        // restore() starts empty and keeps the broken file for the operator.
        assert_eq!(registry.restore(), Registrations::default());
        assert!(!registry.path.exists());
        assert!(std::fs::read_to_string(registry.broken_path())
            .unwrap()
            .contains("0.0.0.0:80"));
        // The next save writes a fresh file and leaves the broken one alone.
        let mut r = Registrations::default();
        r.register(endpoint("web", "10.0.0.2:80", 1)).unwrap();
        registry.save(&r).unwrap();
        assert_eq!(registry.restore(), r);
        assert!(registry.broken_path().exists());
    }

    #[test]
    fn a_save_that_cannot_write_names_the_path() {
        let dir = Dir::new("unwritable");
        std::fs::create_dir_all(&dir.0).unwrap();
        // The node's directory is a file: nothing can be created under it.
        std::fs::write(dir.0.join("n"), "").unwrap();
        let registry = Registry::new(&dir.0, "n");
        let error = registry.save(&Registrations::default()).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot write {}", dir.0.join("n").display())),
            "{error}"
        );
    }
}
