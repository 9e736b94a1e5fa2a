//! `cargo xtask` — the project's task runner.
//!
//! Every task that builds or runs anything first runs [`setup`], which is idempotent and cheap
//! when the machine is already prepared, so there is no marker file and no separate "first run".
//!
//! | subcommand | what it does |
//! | --- | --- |
//! | `setup` | install Debian packages, nightly + rust-src, bpf-linker; mount bpffs; check cgroup2 |
//! | `build [--debug]` | setup, then build every binary of the workspace (eBPF object included) |
//! | `run [-- ARGS]` | setup, build, then exec `mesh-agent run --config config/mesh.toml ARGS` (an ARGS `--config` replaces the default) |
//! | `install [--root DIR]` | setup, build, then install the binary, man page, completions, unit and (if absent) config |
//! | `test [-- ARGS]` | setup, build, then `cargo test --release` over the workspace (e2e included) |
//! | `lint` | rustfmt check, clippy for the host crates and for the eBPF crate |
//! | `bench SUITE [OPTIONS]` | setup, build, then run a suite of `mesh-bench` (`xtask/bench/`: `bench lb --duration-secs 3`), or the agent's criterion microbenchmarks (`bench micro [FILTER]`) |
//! | `fuzz TARGET\|all --seconds N` | setup, then run fuzz targets of the agent's decoders for N seconds each |

mod artifacts;
mod bench;
mod fuzz;
mod install;
mod layers;
mod lint;
mod run;
mod setup;
mod test;
mod util;

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Set up, build, run, test, lint and benchmark mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prepare this machine (idempotent; needs root).
    Setup,
    /// Set up, then build all binaries of the workspace (release unless --debug).
    Build {
        /// Build with the dev profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Set up, build, then run the agent with config/mesh.toml.
    Run {
        /// Extra arguments for `mesh-agent run` (after `--`).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Set up, build, then install mesh-agent on this host: /usr/local/bin, its man page and
    /// completions, the systemd unit (not enabled) and /etc/mesh/mesh.toml if there is none.
    Install {
        /// Install below this directory instead of / (a package build).
        #[arg(long)]
        root: Option<std::path::PathBuf>,
    },
    /// Set up, build, then run all tests, including the privileged end-to-end tests.
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter (after `--`).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Check the import rules between the agent's rooms, formatting, and run clippy on the
    /// host crates and the eBPF crate.
    Lint,
    /// Set up, then fuzz the agent's decoders of untrusted input (cargo-fuzz, nightly).
    Fuzz {
        /// A target (gossip_frame, gossip_records, connect_request, config, registrations) or all.
        target: String,
        /// How long to run each target.
        #[arg(long, default_value_t = 30)]
        seconds: u32,
    },
    /// Set up, build, then run a benchmark suite: lb, gossip, mtls, sockmap (mesh-bench) or
    /// micro (the agent's criterion microbenchmarks).
    Bench {
        /// The suite and its options (`cargo xtask bench SUITE --help` lists them).
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "SUITE [OPTIONS]"
        )]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line, without a backtrace.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<()> {
    let root = util::workspace_root();
    match command {
        Command::Setup => setup::run(),
        Command::Build { debug } => {
            setup::run()?;
            let profile = if debug {
                artifacts::Profile::Debug
            } else {
                artifacts::Profile::Release
            };
            artifacts::build(&root, profile).map(drop)
        }
        Command::Run { args } => run::run(&root, &args),
        Command::Install { root: into } => install::run(&root, into.as_deref()),
        Command::Test { args } => test::run(&root, &args),
        Command::Lint => lint::run(&root),
        Command::Bench { args } => bench::run(&root, &args),
        Command::Fuzz { target, seconds } => fuzz::run(&root, &target, seconds),
    }
}
