//! `cargo xtask lint`: the import rules between the agent's rooms ([`crate::layers`]),
//! formatting and clippy, warnings denied.
//!
//! Host crates are linted with the default (stable) toolchain; the eBPF crate with nightly for
//! `bpfel-unknown-none` and `-Z build-std=core`, in its own target directory so it does not
//! invalidate the host build's cache. Runs [`crate::setup`] first: clippy runs
//! `mesh-agent/build.rs`, which builds the eBPF object (nightly, rust-src, bpf-linker, LLVM).
//! `mesh-agent` is also linted without its `ebpf` feature, which proves the library and the
//! in-process tests build without that toolchain.

use std::path::Path;

use anyhow::Result;

use crate::artifacts::EBPF_CRATE;
use crate::setup;
use crate::util::{cmd, run_checked};

pub fn run(root: &Path) -> Result<()> {
    crate::layers::run(root)?;
    setup::run()?;
    run_checked(
        cmd("cargo")
            .current_dir(root)
            .args(["fmt", "--all", "--check"]),
    )?;
    run_checked(cmd("cargo").current_dir(root).args([
        "clippy",
        "--workspace",
        "--exclude",
        EBPF_CRATE,
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The library and its in-process tests build without the eBPF toolchain (the `ebpf`
    // feature off): this keeps it so.
    run_checked(cmd("cargo").current_dir(root).args([
        "clippy",
        "-p",
        "mesh-agent",
        "--no-default-features",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run_checked(
        cmd("cargo")
            .current_dir(root)
            .args(["+nightly", "clippy", "-p", EBPF_CRATE])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--", "-D", "warnings"])
            .env("CARGO_TARGET_DIR", root.join("target").join("bpf-lint")),
    )
}
