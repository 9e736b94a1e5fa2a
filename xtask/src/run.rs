//! `cargo xtask run`: set up, build, then replace this process with the agent, running
//! `target/release/mesh-agent run --config config/mesh.toml [ARGS...]` from the workspace root
//! (a `--config`/`-c` among ARGS replaces the default one).
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
    agent.current_dir(root).arg("run");
    if !names_a_config(extra) {
        agent.args(["--config", CONFIG]);
    }
    agent.args(extra);
    eprintln!("$ {}", display(&agent));
    // `exec` only returns on failure.
    let err = agent.exec();
    Err(anyhow!(err).context(format!("cannot exec {}", built.agent.display())))
}

/// Whether `args` give the agent a config of their own.
fn names_a_config(args: &[OsString]) -> bool {
    args.iter().any(|arg| {
        let arg = arg.to_string_lossy();
        arg == "--config" || arg == "-c" || arg.starts_with("--config=")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_among_the_arguments_replaces_the_default() {
        let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(names_a_config(&args(&["--config", "x.toml"])));
        assert!(names_a_config(&args(&["--node", "a", "-c", "x.toml"])));
        assert!(names_a_config(&args(&["--config=x.toml"])));
        assert!(!names_a_config(&args(&["--node", "a"])));
    }
}
