//! `cargo xtask bench SUITE [OPTIONS]`: set up, build, then hand over to the benchmark crate.
//!
//! The suites and their options belong to `mesh-bench` (`xtask/bench/`); this module only
//! launches them. For each suite of [`SUITES`] it sets up, builds the workspace in
//! release (the `mesh-bench` binary included), and replaces this process with
//! `target/release/mesh-bench SUITE [OPTIONS]`, naming the binaries under test in
//! `MESH_AGENT_BIN` and `MESH_WORKLOAD_BIN` as `cargo xtask test` does. `exec` keeps the
//! process id, so Ctrl-C reaches the bench itself, which finishes the run in progress and tears
//! its test bed down. A request for help (`-h`, `--help`, `help`) builds only `mesh-bench` and
//! shows its answer, without set-up.
//!
//! `micro` runs the agent's criterion microbenchmarks (`mesh-agent/benches/micro/`: reconcile
//! plan, catalog merge, Maglev tables) with `cargo bench -p mesh-agent --no-default-features`;
//! the options go to criterion (`cargo xtask bench micro plan` runs the benches whose name
//! contains `plan`). They measure the library's pure code, so they build without the `ebpf`
//! feature and need neither set-up nor root.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::Path;

use anyhow::{anyhow, bail, Result};

use crate::artifacts::{self, Profile};
use crate::setup;
use crate::util::{cmd, display, run_checked};

/// The suites of `mesh-bench`, checked here so a typo fails before the build.
const SUITES: [&str; 6] = ["lb", "gossip", "mtls", "sockmap", "reload", "scale"];

/// The suite that runs `cargo bench` instead of `mesh-bench`.
const MICRO: &str = "micro";

/// `args` is the suite followed by its options.
pub fn run(root: &Path, args: &[OsString]) -> Result<()> {
    let (suite, options) = args
        .split_first()
        .ok_or_else(|| anyhow!("name a suite: {}", suite_list()))?;
    let suite = suite.to_string_lossy();
    if suite == MICRO {
        return run_checked(
            cmd("cargo")
                .current_dir(root)
                .args(["bench", "-p", "mesh-agent", "--no-default-features", "--"])
                .args(options),
        );
    }
    if asks_for_help(args) {
        run_checked(cmd("cargo").current_dir(root).args([
            "build",
            "--release",
            "-p",
            "mesh-bench",
        ]))?;
        return exec(cmd(artifacts::bench_bin(root, Profile::Release)).args(args));
    }
    if !SUITES.contains(&suite.as_ref()) {
        bail!("no benchmark suite {suite:?}: {}", suite_list());
    }
    setup::run()?;
    let built = artifacts::build(root, Profile::Release)?;
    artifacts::require(&built.workload)?;
    artifacts::require(&built.bench)?;
    exec(
        cmd(&built.bench)
            .current_dir(root)
            .args(args)
            .env("MESH_AGENT_BIN", &built.agent)
            .env("MESH_WORKLOAD_BIN", &built.workload),
    )
}

/// Replaces this process with `command` (only returns on failure).
fn exec(command: &mut std::process::Command) -> Result<()> {
    eprintln!("$ {}", display(command));
    let err = command.exec();
    Err(anyhow!(err).context(format!(
        "cannot exec {}",
        command.get_program().to_string_lossy()
    )))
}

fn asks_for_help(args: &[OsString]) -> bool {
    args.first().is_some_and(|a| a == "help")
        || args
            .iter()
            .any(|a| [OsStr::new("-h"), OsStr::new("--help")].contains(&a.as_os_str()))
}

fn suite_list() -> String {
    format!(
        "one of {}, {MICRO} (SUITE --help shows its options)",
        SUITES.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_is_asked_anywhere_or_as_the_suite() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(asks_for_help(&args(&["gossip", "--help"])));
        assert!(asks_for_help(&args(&["-h"])));
        assert!(asks_for_help(&args(&["help", "lb"])));
        assert!(!asks_for_help(&args(&["gossip", "--nodes", "3"])));
    }
}
