//! `cargo xtask test`: set up, build, then `cargo test --release` over the workspace.
//!
//! That covers the unit tests of every default member and the privileged end-to-end tests of
//! `mesh-tests`, which drive the built binaries named by `MESH_AGENT_BIN` and
//! `MESH_WORKLOAD_BIN`. Extra arguments go to `cargo test` verbatim, so both
//! `cargo xtask test -- FILTER` and `cargo xtask test -- FILTER -- --nocapture` work.

use std::ffi::OsString;
use std::path::Path;

use anyhow::Result;

use crate::artifacts::{self, Profile, EBPF_CRATE};
use crate::setup;
use crate::util::{cmd, run_checked};

pub fn run(root: &Path, extra: &[OsString]) -> Result<()> {
    setup::run()?;
    let built = artifacts::build(root, Profile::Release)?;
    artifacts::require(&built.workload)?;
    run_checked(
        cmd("cargo")
            .current_dir(root)
            .args(["test", "--release", "--workspace", "--exclude", EBPF_CRATE])
            .args(extra)
            .env("MESH_AGENT_BIN", &built.agent)
            .env("MESH_WORKLOAD_BIN", &built.workload),
    )
}
