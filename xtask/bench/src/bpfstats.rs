//! What the agent's kernel programs cost per call.
//!
//! [`enable`] turns on the kernel's BPF run-time statistics with `bpf(BPF_ENABLE_STATS)`: they
//! stay on while the returned fd is open, so they go off when the bench ends, however it ends
//! (unlike the `kernel.bpf_stats_enabled` sysctl). Each program then counts its runs and the
//! nanoseconds spent in them (a clock read around each run, some 20-40 ns, is the price).
//! [`hook`] reads those counters, through `bpftool`, for the programs attached to a cgroup at
//! one hook (`connect4`).

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// `BPF_ENABLE_STATS` from `enum bpf_cmd` (Linux 5.8+).
const BPF_ENABLE_STATS: libc::c_long = 32;
/// `BPF_STATS_RUN_TIME` from `enum bpf_stats_type`.
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run-time statistics are on while this lives.
#[derive(Debug)]
pub struct Enabled {
    _fd: OwnedFd,
}

/// Turns run-time statistics on until the result is dropped.
pub fn enable() -> Result<Enabled> {
    // union bpf_attr { struct { __u32 type; } enable_stats; ... }: the rest must be zero.
    let attr: [u32; 2] = [BPF_STATS_RUN_TIME, 0];
    // SAFETY: bpf(2) reads size_of_val(&attr) bytes from a live, initialized buffer.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("bpf(BPF_ENABLE_STATS)");
    }
    let fd = i32::try_from(fd).context("fd out of range")?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(Enabled {
        _fd: unsafe { OwnedFd::from_raw_fd(fd) },
    })
}

/// Runs and nanoseconds of some programs, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgStats {
    pub runs: u64,
    pub run_time_ns: u64,
}

impl ProgStats {
    /// The growth from `earlier` to `self`.
    pub fn since(self, earlier: ProgStats) -> ProgStats {
        ProgStats {
            runs: self.runs.saturating_sub(earlier.runs),
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
        }
    }

    /// Adds `other` in.
    pub fn add(&mut self, other: ProgStats) {
        self.runs += other.runs;
        self.run_time_ns += other.run_time_ns;
    }

    /// Mean nanoseconds per run, if it ran.
    pub fn ns_per_run(self) -> Option<f64> {
        (self.runs > 0).then(|| self.run_time_ns as f64 / self.runs as f64)
    }
}

/// The statistics of the programs attached directly to `cgroup` at `hook` (short name, like
/// `connect4`), summed.
pub fn hook(cgroup: &Path, hook: &str) -> Result<ProgStats> {
    let attached = bpftool_json(
        Command::new("bpftool")
            .arg("-j")
            .args(["cgroup", "show"])
            .arg(cgroup),
    )?;
    let mut total = ProgStats::default();
    for entry in attached.as_array().into_iter().flatten() {
        let kind = entry["attach_type"].as_str().unwrap_or_default();
        if mesh_tests::cgroup::short_attach_type(kind) != hook {
            continue;
        }
        let id = entry["id"]
            .as_u64()
            .with_context(|| format!("no program id in {entry}"))?;
        let prog = bpftool_json(
            Command::new("bpftool")
                .arg("-j")
                .args(["prog", "show", "id"])
                .arg(id.to_string()),
        )?;
        total.add(prog_stats(&prog));
    }
    Ok(total)
}

/// `run_cnt` and `run_time_ns` of one `bpftool -j prog show` object (absent: 0).
fn prog_stats(prog: &Value) -> ProgStats {
    ProgStats {
        runs: prog["run_cnt"].as_u64().unwrap_or(0),
        run_time_ns: prog["run_time_ns"].as_u64().unwrap_or(0),
    }
}

fn bpftool_json(cmd: &mut Command) -> Result<Value> {
    let out = cmd.output().context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&text).with_context(|| format!("parsing the output of {cmd:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_subtracts_program_stats() {
        let prog: Value = serde_json::from_str(
            r#"{"id":1088,"type":"cgroup_sock_addr","name":"mesh_connect4","run_time_ns":16433584,"run_cnt":53119}"#,
        )
        .unwrap();
        let now = prog_stats(&prog);
        assert_eq!(
            now,
            ProgStats {
                runs: 53119,
                run_time_ns: 16433584
            }
        );
        // Statistics off: bpftool leaves the fields out.
        let off = prog_stats(&serde_json::json!({"id": 1088}));
        assert_eq!(off, ProgStats::default());
        assert_eq!(off.ns_per_run(), None);
        let d = now.since(ProgStats {
            runs: 53000,
            run_time_ns: 16400000,
        });
        assert_eq!(d.runs, 119);
        assert!((d.ns_per_run().unwrap() - 33584.0 / 119.0).abs() < 1e-9);
    }
}
