//! Cgroup v2 directories for nodes and workloads.
//!
//! A [`Cgroup`] is a directory under the cgroup2 mount. It creates itself, hands out an open
//! `cgroup.procs` so a child can join it from `pre_exec` (before it creates any socket, which
//! is what the cgroup socket hooks require), and can kill everything inside and remove a whole
//! subtree, children first. It never enables controllers, so processes may sit in inner nodes.
//!
//! A `Cgroup` does not remove itself on drop: the owner of the subtree ([`crate::bed`]) does,
//! once every process is gone, with [`remove_tree`].

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// A cgroup v2 directory.
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates the directory (and missing parents) if absent.
    pub fn create(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    /// The directory, e.g. for `mesh-agent --cgroup` or `bpftool cgroup show`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates (if absent) and returns the child cgroup `name`.
    pub fn child(&self, name: &str) -> Result<Cgroup> {
        anyhow::ensure!(
            !name.is_empty() && !name.contains('/') && name != "." && name != "..",
            "bad cgroup name {name:?}"
        );
        Cgroup::create(self.path.join(name))
    }

    /// `cgroup.procs` opened for writing; a child writes `"0"` to it to join.
    pub fn open_procs(&self) -> Result<File> {
        let p = self.path.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))
    }

    /// PIDs currently in this cgroup (not its children).
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

/// Kills every process in the subtree at `root` and removes its directories, deepest first.
/// Errors are reported to stderr; this never panics (it runs from `Drop`).
pub fn remove_tree(root: &Path) {
    if !root.exists() {
        return;
    }
    // cgroup.kill (Linux 5.14+) SIGKILLs the whole subtree at once.
    if let Err(e) = std::fs::write(root.join("cgroup.kill"), "1") {
        eprintln!(
            "mesh-tests teardown: writing {}/cgroup.kill: {e}",
            root.display()
        );
    }
    let mut dirs = Vec::new();
    collect_dirs(root, &mut dirs);
    // Deepest first: a cgroup can only be removed once it has no children.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in dirs {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                // Killed processes leave the cgroup asynchronously: EBUSY until they are gone.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => {
                    let procs = std::fs::read_to_string(dir.join("cgroup.procs"))
                        .unwrap_or_default()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ");
                    eprintln!(
                        "mesh-tests teardown: removing cgroup {}: {e} (pids left: [{procs}])",
                        dir.display()
                    );
                    break;
                }
            }
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for entry in rd.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

/// The BPF programs attached directly to `cgroup` (not inherited), as short attach-type names
/// (`connect4`, `sendmsg6`, `getpeername4`, …), one entry per attachment, from
/// `bpftool -j cgroup show`.
pub fn bpf_attach_types(cgroup: &Path) -> Result<Vec<String>> {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .arg("cgroup")
        .arg("show")
        .arg(cgroup)
        .output()
        .context("running bpftool (apt-get install bpftool)")?;
    anyhow::ensure!(
        out.status.success(),
        "bpftool cgroup show {} failed: {}",
        cgroup.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing bpftool output {text:?}"))?;
    let entries = v.as_array().context("bpftool output is not an array")?;
    entries
        .iter()
        .map(|e| {
            e["attach_type"]
                .as_str()
                .map(short_attach_type)
                .with_context(|| format!("no attach_type in {e}"))
        })
        .collect()
}

/// libbpf's attach-type names (`cgroup_inet4_connect`) to the short ones older bpftool prints
/// and people say (`connect4`); unknown names pass through.
pub fn short_attach_type(name: &str) -> String {
    let short = match name {
        "cgroup_inet4_connect" => "connect4",
        "cgroup_inet6_connect" => "connect6",
        "cgroup_udp4_sendmsg" => "sendmsg4",
        "cgroup_udp6_sendmsg" => "sendmsg6",
        "cgroup_udp4_recvmsg" => "recvmsg4",
        "cgroup_udp6_recvmsg" => "recvmsg6",
        "cgroup_inet4_getpeername" => "getpeername4",
        "cgroup_inet6_getpeername" => "getpeername6",
        "cgroup_inet4_getsockname" => "getsockname4",
        "cgroup_inet6_getsockname" => "getsockname6",
        "cgroup_inet4_bind" => "bind4",
        "cgroup_inet6_bind" => "bind6",
        "cgroup_inet4_post_bind" => "post_bind4",
        "cgroup_inet6_post_bind" => "post_bind6",
        "cgroup_sock_ops" => "sock_ops",
        "cgroup_inet_ingress" => "ingress",
        "cgroup_inet_egress" => "egress",
        "cgroup_inet_sock_create" => "sock_create",
        "cgroup_inet_sock_release" => "sock_release",
        other => other,
    };
    short.to_string()
}
