//! Named network namespaces (`/run/netns/NAME`) and the `ip` commands that configure them.
//!
//! A [`NetNs`] is created with `ip netns add` and deleted with `ip netns del` on drop.
//! Configuration uses `ip -n NAME …`, which switches namespace inside the `ip` process only.
//! Never `ip netns exec`: it remounts `/sys` for the command, hiding the cgroup2 mount and
//! bpffs. Processes enter a namespace with `setns(2)` (see [`crate::process`]), threads of
//! this process with [`NetNs::run_in`].

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Directory where iproute2 keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    /// Open handle on the namespace, kept so children can `setns` into it from `pre_exec`
    /// without opening anything after `fork`.
    file: File,
}

impl NetNs {
    /// Creates `/run/netns/<name>` and brings up its loopback.
    pub fn create(name: &str) -> Result<Self> {
        run_ip(&["netns", "add", name])?;
        let path = Self::path_of(name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = run_ip(&["netns", "del", name]);
                return Err(e).with_context(|| format!("opening {}", path.display()));
            }
        };
        let ns = Self {
            name: name.to_string(),
            file,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, usable with `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Self::path_of(&self.name)
    }

    fn path_of(name: &str) -> PathBuf {
        PathBuf::from(NETNS_RUN_DIR).join(name)
    }

    /// The raw fd of the namespace handle, for `setns` in a child's `pre_exec`.
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Runs `ip -n <name> ARGS…`, failing with `ip`'s stderr.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    /// Runs `f` on a fresh thread that has entered this namespace (namespaces are per thread),
    /// and returns its result. Sockets created by `f` live in the namespace.
    pub fn run_in<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let fd = self.raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || -> Result<T> {
                // SAFETY: fd is an open namespace handle borrowed from self, which outlives
                // this scoped thread; setns only changes this thread's network namespace.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))?
        })
    }

    /// Deletes the namespace now (if still there), reporting failure to stderr instead of
    /// panicking. Idempotent: the bed calls it at teardown and drop calls it again.
    pub(crate) fn teardown(&self) {
        if !self.path().exists() {
            return;
        }
        if let Err(e) = run_ip(&["netns", "del", &self.name]) {
            eprintln!("mesh-tests teardown: deleting netns {}: {e:#}", self.name);
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Whether `/run/netns/<name>` exists.
pub fn exists(name: &str) -> bool {
    NetNs::path_of(name).exists()
}

/// Names of all namespaces in `/run/netns` starting with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Runs `ip ARGS…` and returns its stdout, or an error quoting the command and its stderr.
pub fn run_ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
