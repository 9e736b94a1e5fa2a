//! mesh-agent: the per-host agent of the mesh and its command line.
//!
//! `run` is the daemon; `check`, `status` and `uninstall` are tools around it. See the
//! README's CLI reference.

mod admin;
mod cgroup;
mod config;
mod dataplane;
mod desired;
mod kernel_addr;
mod maglev;
mod reconcile;
mod run;
mod status;
mod watch;

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "mesh-agent", version, about = "Sidecarless service mesh agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the data plane, apply the config and follow it until SIGTERM.
    Run(run::RunOptions),
    /// Validate a config file and exit.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show services, backends and kernel counters of the running agent.
    Status {
        #[arg(long, default_value_os_t = run::default_admin_socket().to_path_buf())]
        admin_socket: PathBuf,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Detach the programs and remove the pinned state of a node.
    Uninstall {
        /// Node name [default: the config's [node] name, else the host name].
        #[arg(long)]
        node: Option<String>,
        /// Config file to read the node name from.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match execute(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mesh-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match command {
        Command::Run(options) => runtime.block_on(run::run(options)),
        Command::Check { config } => {
            let parsed = config::Config::load(&config)?;
            println!(
                "{}: ok ({} services)",
                config.display(),
                parsed.services.len()
            );
            Ok(())
        }
        Command::Status {
            admin_socket,
            output,
        } => {
            let report = runtime.block_on(admin::fetch_status(&admin_socket))?;
            match output {
                Output::Table => print!("{}", report.render()),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(())
        }
        Command::Uninstall {
            node,
            config,
            bpffs,
        } => {
            let config = config.map(|path| config::Config::load(&path)).transpose()?;
            let node = run::node_name(node.as_deref(), config.as_ref())?;
            let pins = dataplane::PinDir::new(&bpffs, &node);
            dataplane::uninstall(&pins)?;
            println!(
                "removed the data plane of node {node} ({})",
                pins.root().display()
            );
            Ok(())
        }
    }
}
