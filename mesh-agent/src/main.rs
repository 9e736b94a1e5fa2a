//! mesh-agent: the per-host agent of the mesh. Parses the command line, sets up logging and
//! hands the command to [`mesh_agent::cli`].

use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use mesh_agent::{
    cli::{self, Cli, LogFormat},
    telemetry::log_level,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli::execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mesh-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr through a filter from `RUST_LOG` (default `info`) that `mesh-agent
/// log-level` can change while the agent runs.
fn init_logging(format: LogFormat) {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = log_level::filter(&directives).unwrap_or_else(|error| {
        eprintln!("mesh-agent: RUST_LOG {error}; logging at info");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let builder = builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_env_filter(filter)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            log_level::install(Box::new(move |f| {
                handle.reload(f).map_err(|e| e.to_string())
            }));
            builder.init();
        }
        LogFormat::Json => {
            let builder = builder
                .json()
                .with_env_filter(filter)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            log_level::install(Box::new(move |f| {
                handle.reload(f).map_err(|e| e.to_string())
            }));
            builder.init();
        }
    }
}
