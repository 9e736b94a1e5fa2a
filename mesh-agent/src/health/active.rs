//! Active health: the threshold state machine of one checked backend.
//!
//! A backend starts healthy (so a new service is served at once rather than refused until its
//! first probes pass); `unhealthy_threshold` failed probes in a row make it unhealthy and
//! `healthy_threshold` successful probes in a row make it healthy again. The probes themselves
//! are [`super::probe`]'s; this module is pure.

use crate::model::ActiveCheck;

/// The active-check state of one backend of one service.
#[derive(Debug, Clone)]
pub struct ActiveState {
    healthy: bool,
    /// Probes in a row with the same outcome as the last one.
    run: u32,
    last_ok: bool,
    /// Why the last failed probe failed.
    last_error: Option<String>,
}

impl Default for ActiveState {
    fn default() -> Self {
        ActiveState {
            healthy: true,
            run: 0,
            last_ok: true,
            last_error: None,
        }
    }
}

impl ActiveState {
    /// Records one probe; returns the new health when it changed.
    pub fn record(&mut self, result: Result<(), String>, check: &ActiveCheck) -> Option<bool> {
        let ok = result.is_ok();
        if let Err(error) = result {
            self.last_error = Some(error);
        }
        self.run = if ok == self.last_ok {
            self.run.saturating_add(1)
        } else {
            1
        };
        self.last_ok = ok;
        let threshold = if ok {
            check.healthy_threshold
        } else {
            check.unhealthy_threshold
        };
        if ok != self.healthy && self.run >= threshold {
            self.healthy = ok;
            return Some(ok);
        }
        None
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Why the backend is unhealthy: the failures in a row and the last one's cause.
    pub fn reason(&self) -> Option<String> {
        if self.healthy {
            return None;
        }
        let error = self.last_error.as_deref().unwrap_or("failed");
        Some(if self.last_ok {
            format!("{} probe(s) passed, last failure: {error}", self.run)
        } else {
            format!("{} failed probe(s): {error}", self.run)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn check(healthy: u32, unhealthy: u32) -> ActiveCheck {
        ActiveCheck {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(200),
            healthy_threshold: healthy,
            unhealthy_threshold: unhealthy,
            http: None,
        }
    }

    const FAIL: fn() -> Result<(), String> = || Err("connection refused".into());

    #[test]
    fn thresholds() {
        let c = check(2, 3);
        let mut s = ActiveState::default();
        assert!(s.healthy());
        assert_eq!(s.record(FAIL(), &c), None);
        assert_eq!(s.record(FAIL(), &c), None);
        // A success in between restarts the count.
        assert_eq!(s.record(Ok(()), &c), None);
        assert_eq!(s.record(FAIL(), &c), None);
        assert_eq!(s.record(FAIL(), &c), None);
        assert_eq!(s.record(FAIL(), &c), Some(false));
        assert_eq!(
            s.reason().as_deref(),
            Some("3 failed probe(s): connection refused")
        );
        assert_eq!(s.record(FAIL(), &c), None);
        assert_eq!(s.record(Ok(()), &c), None);
        assert!(!s.healthy());
        assert_eq!(
            s.reason().as_deref(),
            Some("1 probe(s) passed, last failure: connection refused")
        );
        assert_eq!(s.record(Ok(()), &c), Some(true));
        assert_eq!(s.reason(), None);
        assert_eq!(s.record(Ok(()), &c), None);
    }

    #[test]
    fn thresholds_of_one_flip_at_once() {
        let c = check(1, 1);
        let mut s = ActiveState::default();
        assert_eq!(s.record(Ok(()), &c), None);
        assert_eq!(s.record(FAIL(), &c), Some(false));
        assert_eq!(s.record(Ok(()), &c), Some(true));
    }
}
