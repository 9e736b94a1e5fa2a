//! The standard `process_*` metrics of the agent itself, read from `/proc/self` at scrape time
//! (prometheus-client has no process collector): CPU seconds, resident and virtual memory,
//! open and maximum file descriptors, start time and threads.

use std::fs;

/// The agent process at one instant; a field is `None` when its `/proc` file could not be read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessSample {
    /// User plus system CPU time.
    pub cpu_seconds: Option<f64>,
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    /// The soft limit of open files.
    pub max_fds: Option<u64>,
    /// Seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
    pub threads: Option<u64>,
}

/// Reads this process's numbers.
pub fn sample() -> ProcessSample {
    // SAFETY: sysconf only reads a configuration value.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let stat = fs::read_to_string("/proc/self/stat").ok();
    let boot = fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| boot_time(&s));
    let mut out = stat
        .as_deref()
        .map(|s| parse_stat(s, ticks as f64, u64::try_from(page).unwrap_or(4096), boot))
        .unwrap_or_default();
    out.open_fds = fs::read_dir("/proc/self/fd")
        .ok()
        .map(|dir| dir.count() as u64);
    out.max_fds = fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| max_open_files(&s));
    out
}

/// The fields of `/proc/self/stat` (see proc(5)); the command name in parentheses may hold
/// spaces, so fields are counted from its closing parenthesis.
fn parse_stat(stat: &str, ticks: f64, page: u64, boot: Option<u64>) -> ProcessSample {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return ProcessSample::default();
    };
    // rest starts at field 3 (state).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let ticks = (ticks > 0.0).then_some(ticks);
    ProcessSample {
        cpu_seconds: field(14)
            .zip(field(15))
            .zip(ticks)
            .map(|((utime, stime), ticks)| (utime + stime) as f64 / ticks),
        threads: field(20),
        start_time_seconds: field(22)
            .zip(ticks)
            .zip(boot)
            .map(|((start, ticks), boot)| boot as f64 + start as f64 / ticks),
        virtual_memory_bytes: field(23),
        resident_memory_bytes: field(24).map(|pages| pages * page),
        open_fds: None,
        max_fds: None,
    }
}

/// `btime` of `/proc/stat`: boot time, seconds since the epoch.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

/// The soft limit of "Max open files" in `/proc/self/limits`.
fn max_open_files(limits: &str) -> Option<u64> {
    limits.lines().find_map(|l| {
        l.strip_prefix("Max open files")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "4242 (mesh agent) S 1 4242 4242 0 -1 4194560 900 0 0 0 150 50 0 0 20 0 7 0 \
                    1000 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let s = parse_stat(stat, 100.0, 4096, Some(1_700_000_000));
        assert_eq!(s.cpu_seconds, Some(2.0));
        assert_eq!(s.threads, Some(7));
        assert_eq!(s.start_time_seconds, Some(1_700_000_010.0));
        assert_eq!(s.virtual_memory_bytes, Some(123_456_789));
        assert_eq!(s.resident_memory_bytes, Some(2048 * 4096));
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1048576              1048576              files\n";
        assert_eq!(max_open_files(limits), Some(1_048_576));
    }

    #[test]
    fn reads_this_process() {
        let s = sample();
        assert!(s.cpu_seconds.is_some() && s.resident_memory_bytes.is_some_and(|r| r > 0));
        assert!(s.open_fds.is_some_and(|n| n >= 3) && s.max_fds.is_some());
        assert!(s.threads.is_some_and(|n| n >= 1));
        assert!(s.start_time_seconds.is_some_and(|t| t > 1e9));
    }
}
