//! `cargo xtask setup`: prepare a Debian 12 machine to build and run mesh.
//!
//! Idempotent and marker-free: each step checks the real state of the machine (dpkg, rustup,
//! `bpf-linker --version`, `/proc/self/mountinfo`) and acts only when something is missing, so
//! a prepared machine costs a few cheap process spawns. That is why `build`, `run`, `test` and
//! `bench` simply call [`run`] first. Each step prints one line: `ok: ...` when nothing had to be
//! done, `installing: ...` (or `mounting: ...`) when it acts.

use std::fs;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use crate::util::{cmd, output, run_checked, succeeds};

/// Debian packages the build (LLVM for bpf-linker), the agent (bpftool, iproute2, iptables) and
/// the tests and benchmarks (traffic tools, reference proxies, systemd's unit checks) need.
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iproute2",
    "iperf3",
    "wrk",
    "iptables",
    "haproxy",
    "stunnel4",
    "curl",
    "nginx-light",
    "tcpdump",
    "procps",
    "openssl",
    "util-linux",
    // `systemd-analyze verify` and `security` check the shipped unit (tests/tests/systemd.rs);
    // verify looks its Documentation= man page up with man.
    "systemd",
    "man-db",
];

/// The LLVM that `bpf-linker` is built against (must match the nightly's LLVM major).
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_FEATURE: &str = "llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

/// Runs every set-up step in order, stopping at the first failure.
pub fn run() -> Result<()> {
    require_root()?;
    debian_packages()?;
    nightly_toolchain()?;
    // rust-src for `-Z build-std=core`; clippy for `cargo xtask lint` of the eBPF crate.
    components(Some("nightly"), "nightly", &["rust-src", "clippy"])?;
    // The active (stable) toolchain lints the host crates.
    components(None, "active toolchain", &["clippy", "rustfmt"])?;
    bpf_linker()?;
    cargo_fuzz()?;
    bpffs()?;
    cgroup2()?;
    Ok(())
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "cargo xtask setup needs root (it installs Debian packages and mounts bpffs, and the \
         agent and tests load eBPF programs); running as uid {euid} — rerun as root"
    );
    Ok(())
}

fn package_installed(pkg: &str) -> bool {
    output(cmd("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.trim() == "install ok installed")
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        println!("ok: debian packages ({} installed)", DEBIAN_PACKAGES.len());
        return Ok(());
    }
    println!("installing: debian packages {}", missing.join(" "));
    // Wait for a concurrent apt/dpkg run instead of failing on its lock.
    let lock_timeout = "DPkg::Lock::Timeout=600";
    run_checked(
        cmd("apt-get")
            .args(["-o", lock_timeout, "update"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_checked(
        cmd("apt-get")
            .args([
                "-o",
                lock_timeout,
                "install",
                "-y",
                "--no-install-recommends",
            ])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still_missing: Vec<&str> = missing
        .into_iter()
        .filter(|p| !package_installed(p))
        .collect();
    ensure!(
        still_missing.is_empty(),
        "apt-get install succeeded but these packages are still not installed: {}",
        still_missing.join(" ")
    );
    Ok(())
}

fn nightly_toolchain() -> Result<()> {
    if let Some(version) = output(cmd("rustup").args(["run", "nightly", "rustc", "--version"])) {
        println!("ok: nightly toolchain ({})", version.trim());
        return Ok(());
    }
    println!("installing: nightly toolchain");
    run_checked(cmd("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
}

/// Makes sure `toolchain` (`None`: the active one) has `components`, installing the missing
/// ones in one `rustup component add`.
fn components(toolchain: Option<&str>, label: &str, components: &[&str]) -> Result<()> {
    let plus = toolchain.map(|t| format!("+{t}"));
    let installed = output(
        cmd("rustup")
            .args(&plus)
            .args(["component", "list", "--installed"]),
    )
    .with_context(|| format!("`rustup component list --installed` failed for the {label}"))?;
    // Lines look like `rust-src` (target-independent) or `clippy-x86_64-unknown-linux-gnu`.
    let has = |c: &str| {
        installed
            .lines()
            .map(str::trim)
            .any(|l| l == c || l.strip_prefix(c).is_some_and(|rest| rest.starts_with('-')))
    };
    let missing: Vec<&str> = components.iter().copied().filter(|c| !has(c)).collect();
    if missing.is_empty() {
        println!("ok: {label} components ({})", components.join(" "));
        return Ok(());
    }
    println!("installing: {label} components {}", missing.join(" "));
    run_checked(
        cmd("rustup")
            .args(&plus)
            .args(["component", "add"])
            .args(&missing),
    )
}

fn bpf_linker() -> Result<()> {
    // `cmd` puts ~/.cargo/bin on PATH, so this finds it there as well as anywhere on PATH.
    if let Some(version) = output(cmd("bpf-linker").arg("--version")) {
        println!("ok: bpf-linker ({})", version.trim());
        return Ok(());
    }
    println!("installing: bpf-linker (cargo install, about a minute or two)");
    run_checked(
        cmd("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(BPF_LINKER_FEATURE)
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )?;
    ensure!(
        succeeds(cmd("bpf-linker").arg("--version")),
        "bpf-linker was installed but `bpf-linker --version` still fails"
    );
    Ok(())
}

/// cargo-fuzz, which builds and runs the fuzz targets (`cargo xtask fuzz`).
fn cargo_fuzz() -> Result<()> {
    if let Some(version) = output(cmd("cargo").args(["fuzz", "--version"])) {
        println!("ok: cargo-fuzz ({})", version.trim());
        return Ok(());
    }
    println!("installing: cargo-fuzz (cargo install, about two minutes)");
    run_checked(cmd("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    ensure!(
        succeeds(cmd("cargo").args(["fuzz", "--version"])),
        "cargo-fuzz was installed but `cargo fuzz --version` still fails"
    );
    Ok(())
}

/// One mount from `/proc/self/mountinfo`: its mount point and filesystem type.
struct Mount {
    mount_point: String,
    fs_type: String,
}

fn mounts() -> Result<Vec<Mount>> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

/// Parses `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`.
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let mount_point = unescape_octal(left.split(' ').nth(4)?);
    let fs_type = right.split(' ').next()?.to_string();
    Some(Mount {
        mount_point,
        fs_type,
    })
}

/// Undoes mountinfo's `\ooo` escaping of spaces, tabs, newlines and backslashes.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn bpffs() -> Result<()> {
    if mounts()?
        .iter()
        .any(|m| m.mount_point == BPFFS && m.fs_type == "bpf")
    {
        println!("ok: bpffs mounted at {BPFFS}");
        return Ok(());
    }
    println!("mounting: bpffs at {BPFFS}");
    if !Path::new(BPFFS).is_dir() {
        fs::create_dir_all(BPFFS).with_context(|| format!("cannot create {BPFFS}"))?;
    }
    run_checked(cmd("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

fn cgroup2() -> Result<()> {
    match mounts()?.into_iter().find(|m| m.fs_type == "cgroup2") {
        Some(m) => {
            println!("ok: cgroup2 mounted at {}", m.mount_point);
            Ok(())
        }
        None => bail!(
            "no cgroup v2 mount found in /proc/self/mountinfo; mesh attaches its programs to a \
             cgroup v2 hierarchy — mount one (e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`) \
             or boot with systemd.unified_cgroup_hierarchy"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let m = parse_mountinfo_line(
            "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw",
        )
        .unwrap();
        assert_eq!(m.mount_point, "/sys/fs/cgroup/unified");
        assert_eq!(m.fs_type, "cgroup2");
    }

    #[test]
    fn unescapes_spaces() {
        assert_eq!(unescape_octal(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_octal(r"/mnt/end\"), r"/mnt/end\");
    }
}
