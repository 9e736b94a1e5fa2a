//! What the host must provide, and where the binaries under test are.
//!
//! [`preflight`] checks root, the cgroup2 mount, bpffs (mounting it when absent) and `ip`, and
//! returns an error naming what is missing: a privileged test fails loudly, it never skips.
//! [`agent_bin`] and [`workload_bin`] find the binaries from `MESH_AGENT_BIN` /
//! `MESH_WORKLOAD_BIN`, falling back to the workspace's target directory.
//!
//! This module only reads the environment; it never changes it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// Where bpffs is expected; the beds pin under `<BPFFS_ROOT>/mesh-test-<prefix>`.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Checked facts about the host, computed once per test process.
#[derive(Debug, Clone)]
pub struct Host {
    /// Mount point of the cgroup v2 hierarchy (read from `/proc/self/mountinfo`).
    pub cgroup2: PathBuf,
    /// Mount point of bpffs.
    pub bpffs: PathBuf,
}

/// Checks that this process can build test beds, once; later calls return the cached answer.
pub fn preflight() -> Result<&'static Host> {
    static HOST: OnceLock<Result<Host, String>> = OnceLock::new();
    HOST.get_or_init(|| check().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| {
            anyhow::anyhow!(
                "the privileged e2e tests cannot run here (they fail rather than skip): {e}"
            )
        })
}

fn check() -> Result<Host> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!("must run as root (euid is {euid}): network namespaces, cgroups and bpffs need it");
    }
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let cgroup2 = find_mount(&mountinfo, "cgroup2")
        .context("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")?;
    let bpffs = match find_mount_at(&mountinfo, "bpf", Path::new(BPFFS_ROOT)) {
        Some(p) => p,
        None => {
            std::fs::create_dir_all(BPFFS_ROOT)
                .with_context(|| format!("creating {BPFFS_ROOT}"))?;
            let out = Command::new("mount")
                .args(["-t", "bpf", "bpf", BPFFS_ROOT])
                .output()
                .context("running mount -t bpf")?;
            if !out.status.success() {
                bail!(
                    "bpffs is not mounted at {BPFFS_ROOT} and `mount -t bpf bpf {BPFFS_ROOT}` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            PathBuf::from(BPFFS_ROOT)
        }
    };
    let ip = Command::new("ip").arg("-V").output();
    if !ip.is_ok_and(|o| o.status.success()) {
        bail!("`ip` (iproute2) is not installed or does not run");
    }
    Ok(Host { cgroup2, bpffs })
}

/// The mount point of the first filesystem of type `fstype` in a mountinfo text.
pub fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mounts(mountinfo)
        .find(|(_, t)| *t == fstype)
        .map(|(p, _)| PathBuf::from(p))
}

fn find_mount_at(mountinfo: &str, fstype: &str, at: &Path) -> Option<PathBuf> {
    mounts(mountinfo)
        .find(|(p, t)| *t == fstype && Path::new(p) == at)
        .map(|(p, _)| PathBuf::from(p))
}

/// (mount point, filesystem type) of each line: the mount point is field 5, the type is the
/// first field after the ` - ` separator (optional fields come before it).
fn mounts(mountinfo: &str) -> impl Iterator<Item = (&str, &str)> {
    mountinfo.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?;
        let fstype = right.split(' ').next()?;
        Some((mount_point, fstype))
    })
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The profile directory the running test executable was built into
/// (`target/<profile>/deps/<test>` → `target/<profile>`).
fn own_profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    if deps.file_name()? == "deps" {
        Some(deps.parent()?.to_path_buf())
    } else {
        Some(deps.to_path_buf())
    }
}

fn find_binary(name: &str, env_var: &str, candidates: &[PathBuf]) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("{env_var}={} does not name a file", p.display());
    }
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "{name} binary not found: set {env_var}, or build it (`cargo build --release -p {pkg}`); looked in {}",
        looked.join(", "),
        pkg = if name == "mesh-agent" { "mesh-agent" } else { "mesh-tests" }
    )
}

/// The `mesh-agent` binary: `$MESH_AGENT_BIN`, else `target/release`, else `target/debug`.
pub fn agent_bin() -> Result<PathBuf> {
    let t = target_dir();
    find_binary(
        "mesh-agent",
        "MESH_AGENT_BIN",
        &[t.join("release/mesh-agent"), t.join("debug/mesh-agent")],
    )
}

/// The `mesh-workload` binary: `$MESH_WORKLOAD_BIN`, else the one cargo built next to the
/// running test (same profile, so never a stale build of the other profile), else
/// `target/release`, else `target/debug`.
pub fn workload_bin() -> Result<PathBuf> {
    let t = target_dir();
    let mut candidates = Vec::new();
    if let Some(dir) = own_profile_dir() {
        candidates.push(dir.join("mesh-workload"));
    }
    candidates.push(t.join("release/mesh-workload"));
    candidates.push(t.join("debug/mesh-workload"));
    find_binary("mesh-workload", "MESH_WORKLOAD_BIN", &candidates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_and_bpffs_in_mountinfo() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
50 23 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw
";
        assert_eq!(
            find_mount(text, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_mount_at(text, "bpf", Path::new("/sys/fs/bpf")),
            Some(PathBuf::from("/sys/fs/bpf"))
        );
        assert_eq!(find_mount(text, "nfs"), None);
    }
}
