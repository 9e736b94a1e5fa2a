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
//! | [`wrk`] | running `wrk` and parsing its report |
//! | [`servers`] | nginx and HAProxy: config files, start, readiness |
//! | [`iptables`] | kube-proxy-like DNAT rules, loaded with `iptables-restore` |
//! | [`cpu`] | how much CPU other processes took during the runs (the machine may be shared) |
//! | [`bpfstats`] | the kernel's per-program run time of the agent's hooks |
//! | [`msgsize`] | message-size sweeps over one path (ping-pong and iperf3 per size), for the loopback sockmap decision |
//! | [`sockmap`] | the loopback sockmap suite: mTLS path with `loopback_sockmap` off vs on, per message size |
//!
//! A suite's processes are children in their own process groups, so Ctrl-C reaches only the
//! bench: it notes the interrupt, finishes the run in progress (each is bounded) and returns
//! an error, and the test bed's drop tears everything down.

pub mod bpfstats;
pub mod cpu;
pub mod iptables;
pub mod lb;
pub mod msgsize;
pub mod servers;
pub mod sockmap;
pub mod wrk;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use clap::Subcommand;

use crate::artifacts::{self, Profile};
use crate::setup;

/// The benchmark suites.
#[derive(Debug, Clone, Subcommand)]
pub enum Suite {
    /// Service load balancing: new connections/s and request/response via a VIP, vs direct,
    /// iptables DNAT and HAProxy.
    Lb(lb::Args),
    /// The loopback sockmap on the mTLS path: ping-pong and iperf3 per message size (64 B to
    /// 64 KB), `[mtls] loopback_sockmap` off vs on.
    Sockmap(sockmap::Args),
}

pub fn run(root: &Path, suite: Suite) -> Result<()> {
    setup::run()?;
    let built = artifacts::build(root, Profile::Release)?;
    install_interrupt_handler();
    match suite {
        Suite::Lb(args) => lb::run(&built, &args),
        Suite::Sockmap(args) => sockmap::run(&built, &args),
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
