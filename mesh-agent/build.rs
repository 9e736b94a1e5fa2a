//! With the `ebpf` feature (the default), builds the eBPF programs of `mesh-ebpf` for
//! `bpfel-unknown-none` with the nightly toolchain and leaves the object in `OUT_DIR`, where
//! `dataplane/mod.rs` embeds it. Always records the commit the agent is built from for
//! `mesh-agent --version`.
use std::process::Command;

fn main() -> anyhow::Result<()> {
    record_commit();
    #[cfg(feature = "ebpf")]
    build_ebpf()?;
    Ok(())
}

/// Builds `mesh-ebpf`'s programs into `OUT_DIR`.
#[cfg(feature = "ebpf")]
fn build_ebpf() -> anyhow::Result<()> {
    use anyhow::{anyhow, Context as _};
    use aya_build::{Package, Toolchain};

    // aya-build turns every line the inner cargo prints into a `cargo:warning`, which cargo
    // replays on every later build; quiet, it prints only real warnings and errors.
    std::env::set_var("CARGO_TERM_QUIET", "true");
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "mesh-ebpf")
        .ok_or_else(|| anyhow!("mesh-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("mesh-ebpf manifest has no parent"))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}

/// Sets `MESH_BUILD_COMMIT` to the short commit hash (`unknown` outside a git checkout).
fn record_commit() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=MESH_BUILD_COMMIT={commit}");
    // Rebuild when HEAD moves. Git says where its files are (in a worktree `.git` is a file);
    // a path that does not exist would rerun this script, and rebuild the agent, every time.
    for (ask, file) in [("--git-dir", "HEAD"), ("--git-common-dir", "refs/heads")] {
        let dir = Command::new("git")
            .args(["rev-parse", "--path-format=absolute", ask])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok());
        if let Some(path) = dir.map(|d| std::path::Path::new(d.trim()).join(file)) {
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
