//! Which SPIFFE identity a local client's flow carries: the config maps cgroups to identities
//! (a cgroup and everything below it); a client in no mapped cgroup carries the node's.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::model::identity::SpiffeId;
use crate::telemetry::flows::CgroupNames;

/// Cgroup → identity, longest prefix first.
pub struct Identities {
    cgroup_root: PathBuf,
    /// (path relative to the cgroup2 root, starting with '/', identity), longest path first.
    mapped: Vec<(String, SpiffeId)>,
    names: Mutex<CgroupNames>,
}

impl Identities {
    /// `mapped` paths are relative to `cgroup_root` or absolute under it.
    pub fn new(cgroup_root: PathBuf, mapped: Vec<(PathBuf, SpiffeId)>) -> Identities {
        let mut mapped: Vec<(String, SpiffeId)> = mapped
            .into_iter()
            .map(|(path, id)| (relative(&cgroup_root, &path), id))
            .collect();
        mapped.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        Identities {
            cgroup_root,
            mapped,
            names: Mutex::new(CgroupNames::default()),
        }
    }

    /// The identity of a client in cgroup `id`, if a mapping covers it.
    pub fn of_cgroup(&self, id: u64) -> Option<SpiffeId> {
        // The common case, a client right in a mapped cgroup, costs one stat per mapping.
        for (path, identity) in &self.mapped {
            let dir = self.cgroup_root.join(path.trim_start_matches('/'));
            if std::fs::metadata(dir).is_ok_and(|m| m.ino() == id) {
                return Some(identity.clone());
            }
        }
        let path = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .resolve(&self.cgroup_root, id);
        self.mapped
            .iter()
            .find(|(mapped, _)| {
                path == *mapped || path.starts_with(&format!("{}/", mapped.trim_end_matches('/')))
            })
            .map(|(_, identity)| identity.clone())
    }
}

/// `/a/b` for `<root>/a/b`, `a/b` or `/a/b`.
fn relative(root: &Path, path: &Path) -> String {
    let relative = path.strip_prefix(root).unwrap_or(path);
    let text = relative.display().to_string();
    format!("/{}", text.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_a_cgroup_and_its_descendants() {
        // Any directory tree works: a cgroup id is its directory's inode number.
        let root = std::env::temp_dir().join(format!("mesh-identities-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("shop/frontend/worker")).unwrap();
        std::fs::create_dir_all(root.join("other")).unwrap();
        let frontend: SpiffeId = "spiffe://td/ns/shop/sa/frontend".parse().unwrap();
        let shop: SpiffeId = "spiffe://td/ns/shop/sa/default".parse().unwrap();
        let ids = Identities::new(
            root.clone(),
            vec![
                (PathBuf::from("shop"), shop.clone()),
                (root.join("shop/frontend"), frontend.clone()),
            ],
        );
        let ino = |p: &str| std::fs::metadata(root.join(p)).unwrap().ino();
        assert_eq!(ids.of_cgroup(ino("shop/frontend")), Some(frontend.clone()));
        assert_eq!(ids.of_cgroup(ino("shop/frontend/worker")), Some(frontend));
        assert_eq!(ids.of_cgroup(ino("shop")), Some(shop));
        assert_eq!(ids.of_cgroup(ino("other")), None);
        assert_eq!(ids.of_cgroup(u64::MAX), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
