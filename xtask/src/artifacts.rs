//! `cargo xtask build`: build every binary of the workspace.
//!
//! One `cargo build --workspace --bins` does it all: `mesh-agent/build.rs` builds the eBPF
//! object with aya-build (nightly, `-Z build-std=core`, `bpf-linker`) and embeds it. `mesh-ebpf`
//! is excluded explicitly because `--workspace` means all members, not the default ones, and
//! that crate cannot be built for the host.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};

use crate::util::{cmd, run_checked};

/// The crate that only builds for `bpfel-unknown-none` (through `mesh-agent/build.rs`).
pub const EBPF_CRATE: &str = "mesh-ebpf";

/// Which cargo profile to build with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }
}

/// The binaries the other tasks use.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The agent daemon and CLI.
    pub agent: PathBuf,
    /// The test workload (echo servers and clients driven by the e2e tests and benchmarks).
    pub workload: PathBuf,
    /// The benchmark suites (`xtask/bench/`).
    pub bench: PathBuf,
}

impl Artifacts {
    /// Where cargo put them (see [`profile_dir`]).
    fn in_target(root: &Path, profile: Profile) -> Self {
        let dir = profile_dir(root, profile);
        Artifacts {
            agent: dir.join("mesh-agent"),
            workload: dir.join("mesh-workload"),
            bench: dir.join("mesh-bench"),
        }
    }
}

/// Where cargo puts the binaries of `profile`: under `$CARGO_TARGET_DIR` (relative to `root`)
/// when set, else `root/target`.
fn profile_dir(root: &Path, profile: Profile) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    target.join(profile.dir())
}

/// The `mesh-bench` binary of `profile` (built by [`build`], or by `cargo build -p mesh-bench`).
pub fn bench_bin(root: &Path, profile: Profile) -> PathBuf {
    profile_dir(root, profile).join("mesh-bench")
}

/// Fails with a clear message unless the binary at `path` exists.
pub fn require(path: &Path) -> Result<()> {
    ensure!(
        path.is_file(),
        "{} was not produced by the build (is its [[bin]] target defined?)",
        path.display()
    );
    Ok(())
}

/// Builds all workspace binaries (setup must have run) and returns where they are.
pub fn build(root: &Path, profile: Profile) -> Result<Artifacts> {
    let mut build = cmd("cargo");
    build
        .current_dir(root)
        .args(["build", "--workspace", "--exclude", EBPF_CRATE, "--bins"]);
    if profile == Profile::Release {
        build.arg("--release");
    }
    run_checked(&mut build)?;
    let artifacts = Artifacts::in_target(root, profile);
    require(&artifacts.agent)?;
    Ok(artifacts)
}
