//! Finding the cgroup v2 hierarchy the programs attach to.
//!
//! On these hosts cgroup2 is not always at `/sys/fs/cgroup` (it may sit at
//! `/sys/fs/cgroup/unified` beside v1 controllers), so the mount table decides.

use std::{fs, io, path::PathBuf};

/// Why no cgroup v2 hierarchy could be found.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(io::Error),
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo); mount one or pass --cgroup")]
    NotMounted,
}

/// The mount point of the unified (v2) cgroup hierarchy.
pub fn unified_root() -> Result<PathBuf, CgroupError> {
    let table = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    cgroup2_mount(&table).ok_or(CgroupError::NotMounted)
}

/// Finds the first cgroup2 mount point in a mountinfo table.
fn cgroup2_mount(table: &str) -> Option<PathBuf> {
    table.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| pre.split_whitespace().nth(4).map(unescape))?
    })
}

/// mountinfo escapes spaces and a few other bytes as `\ooo` octal.
fn unescape(field: &str) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_unified_mount_beside_v1() {
        let table = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 25 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(
            cgroup2_mount(table),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn unescapes_spaces_and_reports_absence() {
        let table = "41 31 0:38 / /mnt/my\\040cg rw shared:1 - cgroup2 none rw";
        assert_eq!(cgroup2_mount(table), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(
            cgroup2_mount("25 30 0:22 / /sys tmpfs - sysfs sysfs rw"),
            None
        );
    }
}
