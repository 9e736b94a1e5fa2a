//! Rate-limited warnings for refusal paths a peer (or a stranger) can trigger at will: one
//! line per period, saying how many were suppressed since, so junk traffic cannot flood the
//! log. The counters, not the log, count every refusal.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// The period of the limiters of the agent's refusal paths.
pub const PERIOD: Duration = Duration::from_secs(10);

/// At most one line per `period`.
#[derive(Debug)]
pub struct LogLimit {
    period: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    /// A limiter of one line per `period` (const, for a `static` per call site).
    pub const fn new(period: Duration) -> LogLimit {
        LogLimit {
            period,
            state: Mutex::new(State {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Calls `log` with the count suppressed since the last line, unless a line was written
    /// within the period (then counts this one as suppressed).
    pub fn warn(&self, log: impl FnOnce(u64)) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.last.is_some_and(|t| t.elapsed() < self.period) {
            state.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut state.suppressed);
        state.last = Some(Instant::now());
        drop(state);
        log(suppressed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
