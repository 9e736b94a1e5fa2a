//! What a process has used so far, from `/proc/PID`: CPU seconds (`stat`) and resident
//! memory (`status`'s `VmRSS` and its peak, `VmHWM`), for the agents a suite runs.

use anyhow::{ensure, Context, Result};

/// User + system CPU seconds process `pid` has used so far (`/proc/PID/stat`).
pub fn cpu_s(pid: i32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may hold spaces), from field 3 (state) on:
    // utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("unexpected {path}: {stat:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        let f = fields
            .get(i)
            .with_context(|| format!("short {path}: {stat:?}"))?;
        Ok(f.parse::<u64>()
            .with_context(|| format!("in {path}: {stat:?}"))? as f64)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok((ticks(11)? + ticks(12)?) / hz as f64)
}

/// Resident memory of process `pid` in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss_bytes(pid: i32) -> Result<u64> {
    Ok(memory(pid)?.rss)
}

/// A process's resident memory, in bytes, from one read of `/proc/PID/status` (so the peak is
/// at least the current value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss: u64,
    /// `VmHWM`: the most it has been resident so far.
    pub peak: u64,
}

/// The resident memory of process `pid`, now and at its peak.
pub fn memory(pid: i32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| kb_field(&text, name).with_context(|| format!("no {name} in {path}"));
    Ok(Memory {
        rss: field("VmRSS")?,
        peak: field("VmHWM")?,
    })
}

fn kb_field(status: &str, field: &str) -> Option<u64> {
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    let kb: u64 = kb.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb * 1024)
}

/// Open file descriptors of process `pid` (entries of `/proc/PID/fd`).
pub fn open_fds(pid: i32) -> Result<usize> {
    let path = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&path)
        .with_context(|| format!("reading {path}"))?
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id() as i32;
        assert!(cpu_s(me).unwrap() >= 0.0);
        assert!(rss_bytes(me).unwrap() > 0);
        let memory = memory(me).unwrap();
        assert!(memory.peak >= memory.rss, "{memory:?}");
        assert!(open_fds(me).unwrap() >= 3);
        let status = "Name:\tx\nVmHWM:\t   2000 kB\nVmRSS:\t   1234 kB\n";
        assert_eq!(kb_field(status, "VmRSS"), Some(1234 * 1024));
        assert_eq!(kb_field(status, "VmHWM"), Some(2000 * 1024));
        assert_eq!(kb_field("Name:\tx\n", "VmRSS"), None);
    }
}
