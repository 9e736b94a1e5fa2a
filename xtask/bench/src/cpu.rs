//! How busy the machine was with things other than the bench.
//!
//! The benchmarks saturate the CPUs, so anything else running (a build, another test) slows
//! some runs and not others. [`Meter`] estimates that share: the host's busy CPU time
//! (`/proc/stat`: user, nice, system, irq, softirq, and steal, the time the hypervisor ran
//! something else) minus what the bench's cgroup subtree used (`cpu.stat` `usage_usec`, which
//! cgroup v2 keeps for every cgroup and which includes the softirq work done while a bench
//! process was interrupted, without `CONFIG_IRQ_TIME_ACCOUNTING`), over the wall time times
//! the CPU count. It is an estimate: `/proc/stat` is sampled per tick, and the bench's own
//! processes outside its cgroup (the agents, the status queries) count as "other"; a few
//! percent is noise.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};

/// A starting point of the measurement.
#[derive(Debug, Clone)]
pub struct Meter {
    cgroup: PathBuf,
    at: Instant,
    host_s: f64,
    bench_s: f64,
}

impl Meter {
    /// Starts measuring; `cgroup` holds every process of the bench.
    pub fn start(cgroup: &Path) -> Result<Self> {
        Ok(Self {
            cgroup: cgroup.to_path_buf(),
            at: Instant::now(),
            host_s: host_busy_s()?,
            bench_s: cgroup_usage_s(cgroup)?,
        })
    }

    /// The share of all CPUs (0.0 to 1.0) used by others since the start, clamped at 0.
    pub fn others_share(&self) -> Result<f64> {
        let wall = self.at.elapsed().as_secs_f64();
        let host = host_busy_s()? - self.host_s;
        let bench = cgroup_usage_s(&self.cgroup)? - self.bench_s;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        Ok(if wall > 0.0 {
            ((host - bench) / (wall * cpus)).max(0.0)
        } else {
            0.0
        })
    }
}

/// When to measure a run again because the machine was busy with other things.
#[derive(Debug, Clone, Copy)]
pub struct Disturbance {
    /// Measure again when others used more than this share of the CPUs during a run…
    pub max_others: f64,
    /// …at most this many times.
    pub retries: u32,
}

impl Disturbance {
    /// Runs `measure` (which returns its result and the others' share during it, see
    /// [`Meter`]) until the share is at most `max_others`, at most `1 + retries` times; returns
    /// the least disturbed attempt. `label` names the run in the messages.
    pub fn least_disturbed<T>(
        &self,
        label: &str,
        mut measure: impl FnMut() -> Result<(T, f64)>,
    ) -> Result<(T, f64)> {
        let mut best: Option<(T, f64)> = None;
        for attempt in 0..=self.retries {
            let (result, others) = measure()?;
            if best.as_ref().is_none_or(|(_, o)| others < *o) {
                best = Some((result, others));
            }
            if others <= self.max_others {
                break;
            }
            if attempt < self.retries {
                eprintln!(
                    "bench: {label}: other processes used {:.0}% of the CPUs, measuring again",
                    others * 100.0
                );
            }
        }
        best.context("no attempt was made")
    }
}

/// Busy seconds of all CPUs since boot (`/proc/stat`'s `cpu` line): user, nice, system, irq,
/// softirq and steal; not idle and iowait.
fn host_busy_s() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    busy_s_in(&stat)
}

fn busy_s_in(stat: &str) -> Result<f64> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no `cpu` line in /proc/stat")?;
    // user nice system idle iowait irq softirq steal (guest time is part of user).
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {line:?}"))?;
    ensure!(ticks.len() == 8, "short /proc/stat line {line:?}");
    let busy: u64 = ticks[..3].iter().chain(&ticks[5..8]).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(busy as f64 / hz as f64)
}

/// `usage_usec` of a cgroup v2 directory's `cpu.stat`, in seconds.
pub fn cgroup_usage_s(cgroup: &Path) -> Result<f64> {
    let path = cgroup.join("cpu.stat");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    usage_s_in(&text).with_context(|| format!("no usage_usec in {}", path.display()))
}

fn usage_s_in(cpu_stat: &str) -> Option<f64> {
    cpu_stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|us| us as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_least_disturbed_attempt() {
        let d = Disturbance {
            max_others: 0.1,
            retries: 2,
        };
        let mut shares = vec![0.5, 0.3, 0.4].into_iter();
        let mut n = 0;
        let (v, o) = d
            .least_disturbed("t", || {
                n += 1;
                Ok((n, shares.next().unwrap()))
            })
            .unwrap();
        assert_eq!((v, o), (2, 0.3));
        assert_eq!(n, 3);
        let (v, _) = d.least_disturbed("t", || Ok((7, 0.05))).unwrap();
        assert_eq!(v, 7);
    }

    #[test]
    fn reads_proc_stat_and_cpu_stat() {
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let stat = "cpu  100 20 30 5000 7 1 2 4 0 0\ncpu0 50 10 15 2500 3 0 1 2 0 0\n";
        // Everything but idle (5000) and iowait (7).
        assert_eq!(busy_s_in(stat).unwrap(), 157.0 / hz);
        assert!(busy_s_in("cpu  1 2 3\n").is_err());
        assert!(busy_s_in("intr 1 2 3\n").is_err());
        let cpu_stat = "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n";
        assert_eq!(usage_s_in(cpu_stat), Some(2.5));
        assert_eq!(usage_s_in("user_usec 1\n"), None);
    }
}
