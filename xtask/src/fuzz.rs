//! `cargo xtask fuzz TARGET|all --seconds N`: runs the agent's fuzz targets
//! (`mesh-agent/fuzz/`, cargo-fuzz and libFuzzer on nightly) for a bounded time each, starting
//! from the seeds kept in the repo (`mesh-agent/fuzz/seeds/TARGET/`). New inputs go to a
//! scratch corpus under `mesh-agent/fuzz/corpus/` (not kept); a crash fails the task and
//! leaves its input in `mesh-agent/fuzz/artifacts/TARGET/`.

use std::path::Path;

use anyhow::{ensure, Context as _, Result};

use crate::setup;
use crate::util::{cmd, run_checked};

/// The fuzz targets, as `mesh-agent/fuzz/Cargo.toml` names them.
pub const TARGETS: [&str; 5] = [
    "gossip_frame",
    "gossip_records",
    "connect_request",
    "config",
    "registrations",
];

pub fn run(root: &Path, target: &str, seconds: u32) -> Result<()> {
    ensure!(
        target == "all" || TARGETS.contains(&target),
        "no fuzz target {target:?}; the targets are: all, {}",
        TARGETS.join(", ")
    );
    setup::run()?;
    let fuzz = root.join("mesh-agent").join("fuzz");
    let targets: Vec<&str> = if target == "all" {
        TARGETS.to_vec()
    } else {
        vec![target]
    };
    for target in targets {
        let corpus = fuzz.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        println!("fuzzing {target} for {seconds} s");
        run_checked(
            cmd("cargo")
                .current_dir(&fuzz)
                .args(["+nightly", "fuzz", "run", target])
                .arg(&corpus)
                .arg(fuzz.join("seeds").join(target))
                .args(["--", &format!("-max_total_time={seconds}")]),
        )
        .with_context(|| {
            format!(
                "fuzz target {target} failed (its input is in mesh-agent/fuzz/artifacts/{target}/)"
            )
        })?;
    }
    Ok(())
}
