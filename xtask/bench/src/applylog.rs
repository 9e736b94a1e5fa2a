//! When an agent's kernel maps took a given state, read from its log.
//!
//! The agent logs `config applied to the kernel` after every write of its maps, with the
//! number of services and backends the kernel then holds (`services=N backends=M`), and the
//! log line carries a wall-clock timestamp (RFC 3339, microseconds). All processes of the bench
//! share one clock, so "the first apply since T whose kernel held M backends" tells, to the
//! microsecond and without asking the agent anything, when a change reached that node's
//! kernel. [`Applies`] follows one log file incrementally (only what was appended since the
//! last read is read), which keeps watching 16 agents cheap.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context as _, Result};

/// The message of the agent's log line after each write of the kernel maps.
const APPLIED: &str = "config applied to the kernel";

/// One write of an agent's kernel maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Apply {
    /// When the agent logged it (right after the write).
    pub at: SystemTime,
    /// Backends in the kernel after it.
    pub backends: usize,
}

/// The applies an agent logged, read incrementally from its log file.
#[derive(Debug)]
pub struct Applies {
    path: PathBuf,
    /// Bytes of the file read so far.
    offset: u64,
    /// The last line read, when it had no newline yet.
    partial: String,
    /// Applies read since the last [`Applies::forget`].
    seen: Vec<Apply>,
}

impl Applies {
    /// Follows the log at `path` from its current end (or its start, once it exists).
    pub fn follow(path: PathBuf) -> Self {
        let offset = std::fs::metadata(&path).map_or(0, |m| m.len());
        Applies {
            path,
            offset,
            partial: String::new(),
            seen: Vec::new(),
        }
    }

    /// Reads what was appended since the last call.
    pub fn poll(&mut self) -> Result<()> {
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.path.display())),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", self.path.display()))?;
        self.offset += bytes.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        if let Some(end) = self.partial.rfind('\n') {
            let rest = self.partial.split_off(end + 1);
            self.seen.extend(self.partial.lines().filter_map(parse));
            self.partial = rest;
        }
        Ok(())
    }

    /// Reads what was appended and drops every apply read so far.
    pub fn forget(&mut self) -> Result<()> {
        self.poll()?;
        self.seen.clear();
        Ok(())
    }

    /// The first apply at or after `since` that left `backends` backends in the kernel.
    pub fn first(&self, since: SystemTime, backends: usize) -> Option<Apply> {
        self.seen
            .iter()
            .copied()
            .find(|a| a.at >= since && a.backends == backends)
    }

    /// The last apply read, for error messages.
    pub fn last(&self) -> Option<Apply> {
        self.seen.last().copied()
    }
}

/// The apply of a log line, if it is one (text format:
/// `2026-11-22T07:25:01.123456Z  INFO mesh_agent::run: config applied to the kernel report=… backends=3`).
fn parse(line: &str) -> Option<Apply> {
    if !line.contains(APPLIED) {
        return None;
    }
    let at = humantime::parse_rfc3339(line.split_whitespace().next()?).ok()?;
    let backends = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("backends="))?
        .parse()
        .ok()?;
    Some(Apply { at, backends })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LINE: &str = "2026-11-22T07:25:01.123456Z  INFO mesh_agent::run: config applied to the kernel report=0 services added, 1 changed, 0 removed; 3 map writes elapsed_us=41 services=1 backends=17";

    #[test]
    fn parses_the_agents_apply_line() {
        let a = parse(LINE).unwrap();
        assert_eq!(a.backends, 17);
        let t = humantime::parse_rfc3339("2026-11-22T07:25:01Z").unwrap();
        assert_eq!(
            a.at.duration_since(t).unwrap(),
            Duration::from_micros(123_456)
        );
        assert_eq!(
            parse("2026-11-22T07:25:01.1Z  INFO mesh_agent::run: ready"),
            None
        );
        assert_eq!(
            parse("2026-11-22T07:25:01.1Z  INFO x: config applied to the kernel report=1"),
            None,
            "an agent without the backends field"
        );
    }

    #[test]
    fn follows_a_growing_log_line_by_line() {
        let dir = std::env::temp_dir().join(format!("mesh-applylog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.log");
        std::fs::write(&path, format!("{LINE}\n")).unwrap();
        let mut applies = Applies::follow(path.clone());
        applies.poll().unwrap();
        assert_eq!(applies.last(), None, "what was there before is skipped");

        let later = LINE
            .replace("07:25:01.123456", "07:25:02.5")
            .replace("backends=17", "backends=18");
        let append = |text: &str| {
            use std::io::Write as _;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        };
        // Half a line, then the rest.
        append(&later[..40]);
        applies.poll().unwrap();
        assert_eq!(applies.last(), None);
        append(&format!("{}\n{LINE}\n", &later[40..]));
        applies.poll().unwrap();
        let t = |s| humantime::parse_rfc3339(s).unwrap();
        let first = applies.first(t("2026-11-22T07:25:02Z"), 18).unwrap();
        assert_eq!(first.at, t("2026-11-22T07:25:02.5Z"));
        assert_eq!(applies.first(t("2026-11-22T07:25:02Z"), 17), None);
        assert_eq!(
            applies
                .first(t("2026-11-22T07:25:00Z"), 17)
                .unwrap()
                .backends,
            17
        );
        applies.forget().unwrap();
        assert_eq!(applies.last(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
