//! `cargo xtask bench SUITE`: set up, build, then run one benchmark suite.
//!
//! Suites measure mesh side by side with its baselines (direct, iptables DNAT, HAProxy,
//! stunnel) in one run and report ratios; see the performance targets in the design brief.
//! Each suite lives in its own module with a `run(root: &Path) -> anyhow::Result<()>` entry.

pub mod lb;

use std::path::Path;

use anyhow::Result;
use clap::ValueEnum;

use crate::artifacts::{self, Profile};
use crate::setup;

/// The benchmark suites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// Service load balancing: new connections/s, request/response and throughput via a VIP.
    Lb,
}

pub fn run(root: &Path, suite: Suite) -> Result<()> {
    setup::run()?;
    artifacts::build(root, Profile::Release)?;
    match suite {
        Suite::Lb => lb::run(root),
    }
}
