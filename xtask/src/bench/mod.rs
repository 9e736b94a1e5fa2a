//! `cargo xtask bench SUITE [OPTIONS]`: set up, build, then run one benchmark suite.
//!
//! Suites measure mesh side by side with its baselines (direct, iptables DNAT, HAProxy,
//! stunnel) in one run and report ratios; see the performance targets in the design brief.
//! Each suite lives in its own module with a `run(&Artifacts, &Args) -> anyhow::Result<()>`
//! entry; the helpers they share are modules here too.
//!
//! | module | owns |
//! | --- | --- |
//! | [`lb`] | the load-balancing suite: scenario, checks, results table |
//! | [`gossip`] | the gossip suite: propagation, failure detection, gossip traffic |
//! | [`applylog`] | when an agent's kernel maps took a state, from its log |
//! | [`traffic`] | gossip traffic counters of an agent and of a node's interface |
//! | [`wrk`] | running `wrk` and parsing its report |
//! | [`servers`] | nginx and HAProxy: config files, start, readiness |
//! | [`iptables`] | kube-proxy-like DNAT rules, loaded with `iptables-restore` |
//! | [`cpu`] | how much CPU other processes took during the runs (the machine may be shared) |
//! | [`bpfstats`] | the kernel's per-program run time of the agent's hooks |
//!
//! A suite's processes are children in their own process groups, so Ctrl-C reaches only the
//! bench: it notes the interrupt, finishes the run in progress (each is bounded) and returns
//! an error, and the test bed's drop tears everything down; a suite that fails keeps the bed's
//! configs and logs (see [`keep_files`]).

pub mod applylog;
pub mod bpfstats;
pub mod cpu;
pub mod gossip;
pub mod iptables;
pub mod lb;
pub mod servers;
pub mod traffic;
pub mod wrk;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use mesh_tests::TestBed;

use crate::artifacts::{self, Profile};
use crate::setup;

/// The benchmark suites.
#[derive(Debug, Clone, Subcommand)]
pub enum Suite {
    /// Service load balancing: new connections/s and request/response via a VIP, vs direct,
    /// iptables DNAT and HAProxy.
    Lb(lb::Args),
    /// Gossip between agents: how fast a change reaches every node's kernel maps, how fast a
    /// dead node is withdrawn, and how many bytes gossip costs, for meshes of 4, 8 and 16 nodes.
    Gossip(gossip::Args),
}

pub fn run(root: &Path, suite: Suite) -> Result<()> {
    setup::run()?;
    let built = artifacts::build(root, Profile::Release)?;
    install_interrupt_handler();
    match suite {
        Suite::Lb(args) => lb::run(&built, &args),
        Suite::Gossip(args) => gossip::run(&built, &args),
    }
}

/// Set by SIGINT/SIGTERM; checked between runs.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Fails once the bench was asked to stop, so the caller unwinds and tears down.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// External programs a suite needs.
pub struct Tools;

impl Tools {
    /// Fails naming every program of `names` not found in `PATH`.
    pub fn require(names: &[&str]) -> Result<()> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !std::env::split_paths(&path).any(|d| d.join(n).is_file()))
            .collect();
        if !missing.is_empty() {
            bail!(
                "not found in PATH: {} (cargo xtask setup installs them; is /usr/sbin in PATH?)",
                missing.join(", ")
            );
        }
        Ok(())
    }
}

/// `error` with the bed's configs and logs kept (see [`keep`]), saying where they are.
pub fn keep_files(bed: &TestBed, suite: &str, error: anyhow::Error) -> anyhow::Error {
    match keep(bed, suite) {
        Ok(kept) => error.context(format!("configs and logs kept in {}", kept.display())),
        Err(copy) => error.context(format!("(keeping the logs failed: {copy:#})")),
    }
}

/// Copies the bed's configs and logs to `$TMPDIR/mesh-bench-SUITE-PREFIX` (the bed removes its
/// scratch directory on drop) and returns that directory.
pub fn keep(bed: &TestBed, suite: &str) -> Result<PathBuf> {
    let kept = std::env::temp_dir().join(format!("mesh-bench-{suite}-{}", bed.prefix()));
    copy_files(bed.tmpdir(), &kept)?;
    Ok(kept)
}

/// Copies the regular files under `from` to `to`, keeping the tree (sockets are skipped).
fn copy_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let dest = to.join(entry.file_name());
        if kind.is_dir() {
            copy_files(&entry.path(), &dest)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &dest)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}
