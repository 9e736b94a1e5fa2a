//! `cargo xtask run`: set up, build, then replace this process with the agent, running
//! `target/release/mesh-agent run --config config/mesh.toml [ARGS...]` from the workspace root.
//!
//! `exec` keeps the process id, so signals (Ctrl-C) reach the agent directly and its exit
//! status becomes this command's.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;

use anyhow::{anyhow, Result};

use crate::artifacts::{self, Profile};
use crate::setup;
use crate::util::{cmd, display};

/// The config the agent runs with, relative to the workspace root.
const CONFIG: &str = "config/mesh.toml";

pub fn run(root: &Path, extra: &[OsString]) -> Result<()> {
    setup::run()?;
    let built = artifacts::build(root, Profile::Release)?;
    let mut agent = cmd(&built.agent);
    agent
        .current_dir(root)
        .args(["run", "--config", CONFIG])
        .args(extra);
    eprintln!("$ {}", display(&agent));
    // `exec` only returns on failure.
    let err = agent.exec();
    Err(anyhow!(err).context(format!("cannot exec {}", built.agent.display())))
}
