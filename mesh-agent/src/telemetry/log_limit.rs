//! Rate-limited log lines: for refusal paths a peer (or a stranger) can trigger at will, one
//! line per period; for the access log, a bounded number a second. The first line written in
//! a new period says how many were suppressed since, so junk traffic cannot flood the log. The
//! counters, not the log, count every event.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// The period of the limiters of the agent's refusal paths.
pub const PERIOD: Duration = Duration::from_secs(10);

/// At most `lines` lines per `period`.
#[derive(Debug)]
pub struct LogLimit {
    period: Duration,
    lines: u32,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// When the current period began (with its first line).
    started: Option<Instant>,
    written: u32,
    suppressed: u64,
}

impl LogLimit {
    /// A limiter of one line per `period` (const, for a `static` per call site).
    pub const fn new(period: Duration) -> LogLimit {
        LogLimit::lines_per(1, period)
    }

    /// A limiter of `lines` lines per `period`.
    pub const fn lines_per(lines: u32, period: Duration) -> LogLimit {
        LogLimit {
            period,
            lines,
            state: Mutex::new(State {
                started: None,
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// Calls `log` with the count suppressed since the last line written, unless the period's
    /// lines are used up (then counts this one as suppressed).
    pub fn warn(&self, log: impl FnOnce(u64)) {
        if let Some(suppressed) = self.take(Instant::now()) {
            log(suppressed);
        }
    }

    /// `Some(suppressed so far)` when a line may be written at `now`.
    fn take(&self, now: Instant) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state
            .started
            .is_none_or(|t| now.duration_since(t) >= self.period)
        {
            state.started = Some(now);
            state.written = 0;
        }
        if state.written >= self.lines {
            state.suppressed += 1;
            return None;
        }
        state.written += 1;
        Some(std::mem::take(&mut state.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_period_allows_its_lines_and_the_next_says_how_many_were_not_written() {
        let limit = LogLimit::lines_per(3, Duration::from_secs(1));
        let start = Instant::now();
        let taken: Vec<Option<u64>> = (0..5).map(|_| limit.take(start)).collect();
        assert_eq!(taken, [Some(0), Some(0), Some(0), None, None]);
        let later = start + Duration::from_millis(1001);
        assert_eq!(limit.take(later), Some(2));
        assert_eq!(limit.take(later), Some(0));
    }

    #[test]
    fn one_line_per_period_with_the_count_suppressed() {
        let limit = LogLimit::new(Duration::from_millis(200));
        let mut lines = Vec::new();
        for _ in 0..3_000 {
            limit.warn(|suppressed| lines.push(suppressed));
        }
        assert_eq!(lines, [0]);
        std::thread::sleep(Duration::from_millis(250));
        limit.warn(|suppressed| lines.push(suppressed));
        assert_eq!(lines, [0, 2_999]);
    }
}
