//! Passive health: ejecting a backend whose connects keep failing.
//!
//! The kernel counts, per backend address, the balanced TCP connects that were established and
//! those that failed (reset, SYN retries exhausted) — monotonic sums read every poll. An
//! [`Outlier`] turns successive readings into decisions: `consecutive_failures` failed
//! connects with no established one in between eject the backend for
//! `base_ejection × 2^k` (k: ejections since the backend last stayed admitted for
//! `max_ejection`), at most `max_ejection`; once that time has passed, or as soon as an
//! active check passes (as Envoy does by default), it is readmitted and judged afresh. This module is pure: it reads no clock and no map, so every rule is tested
//! with synthetic counts.

use std::time::{Duration, Instant};

use mesh_common::health::ConnectOutcomes;

use crate::model::OutlierSettings;

/// The passive state of one backend of one service.
#[derive(Debug, Clone, Default)]
pub struct Outlier {
    /// The previous reading (`None` before the first: it only sets the baseline).
    last: Option<ConnectOutcomes>,
    /// Failed connects since the last established one.
    consecutive: u64,
    /// Ejections in a row (the `k` of the backoff).
    ejections: u32,
    /// Set while ejected.
    ejected_until: Option<Instant>,
    /// When the backend was last readmitted.
    admitted_at: Option<Instant>,
}

/// A change [`Outlier`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Out of the table until `until`.
    Ejected {
        failures: u64,
        duration: Duration,
        until: Instant,
    },
    Readmitted,
}

impl Outlier {
    /// Takes the backend's counts as of `now`; returns the ejection they cause, if any. With
    /// `may_eject` false (its service has as many backends ejected as its settings allow) a
    /// backend that reached the threshold stays in, its run of failures kept: it is ejected on
    /// a later reading once the service has room.
    pub fn observe(
        &mut self,
        counts: ConnectOutcomes,
        now: Instant,
        settings: &OutlierSettings,
        may_eject: bool,
    ) -> Option<Event> {
        let last = self.last.replace(counts)?;
        if counts.failed < last.failed || counts.established < last.established {
            // The counts restarted (the map was recreated): this reading is the new baseline.
            return None;
        }
        if self.ejected_until.is_some() {
            // Connects that still reach an ejected backend (panic, or in flight) say nothing
            // new; it is judged afresh once readmitted.
            return None;
        }
        // The order of events inside one poll is unknown: an established connect among them
        // means the failures were not all in a row, so the run restarts.
        if counts.established > last.established {
            self.consecutive = 0;
        } else {
            self.consecutive += counts.failed - last.failed;
        }
        if self.consecutive < u64::from(settings.consecutive_failures) || !may_eject {
            return None;
        }
        if self
            .admitted_at
            .is_some_and(|at| now.saturating_duration_since(at) >= settings.max_ejection)
        {
            // Healthy for a whole maximum ejection since the last one: the backoff restarts.
            self.ejections = 0;
        }
        let duration = ejection_time(self.ejections, settings);
        let until = now + duration;
        let failures = std::mem::take(&mut self.consecutive);
        self.ejections = self.ejections.saturating_add(1);
        self.ejected_until = Some(until);
        Some(Event::Ejected {
            failures,
            duration,
            until,
        })
    }

    /// Readmits the backend if its ejection is over by `now`.
    pub fn expire(&mut self, now: Instant) -> Option<Event> {
        match self.ejected_until {
            Some(until) if until <= now => {
                self.ejected_until = None;
                self.admitted_at = Some(now);
                Some(Event::Readmitted)
            }
            _ => None,
        }
    }

    /// Ends an ejection early (an active check just passed), as if its time were over.
    pub fn readmit(&mut self, now: Instant) -> Option<Event> {
        self.ejected_until.map(|_| {
            self.ejected_until = None;
            self.admitted_at = Some(now);
            Event::Readmitted
        })
    }

    /// The end of the current ejection, if the backend is ejected.
    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }
}

/// `base × 2^k`, at most `max`.
fn ejection_time(k: u32, settings: &OutlierSettings) -> Duration {
    let factor = 1u32.checked_shl(k).unwrap_or(u32::MAX);
    settings
        .base_ejection
        .saturating_mul(factor)
        .min(settings.max_ejection)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: OutlierSettings = OutlierSettings {
        max_ejection_percent: 50,
        consecutive_failures: 3,
        base_ejection: Duration::from_secs(1),
        max_ejection: Duration::from_secs(5),
    };

    fn c(established: u64, failed: u64) -> ConnectOutcomes {
        ConnectOutcomes {
            established,
            failed,
            syn_timeouts: 0,
        }
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_backend_over_the_services_cap_stays_in_and_is_ejected_once_there_is_room() {
        let t0 = Instant::now();
        let mut o = Outlier::default();
        o.observe(c(0, 0), t0, &S, false);
        assert_eq!(o.observe(c(0, 10), ms(t0, 250), &S, false), None);
        assert_eq!(o.ejected_until(), None);
        // The run was kept: room in the service ejects it at the next reading.
        let e = o.observe(c(0, 10), ms(t0, 500), &S, true);
        assert!(
            matches!(e, Some(Event::Ejected { failures: 10, .. })),
            "{e:?}"
        );
    }

    #[test]
    fn first_reading_is_only_a_baseline() {
        let t0 = Instant::now();
        let mut o = Outlier::default();
        // 100 failures before the agent looked: not held against the backend.
        assert_eq!(o.observe(c(0, 100), t0, &S, true), None);
        assert_eq!(o.observe(c(0, 102), ms(t0, 250), &S, true), None);
        let e = o.observe(c(0, 103), ms(t0, 500), &S, true);
        assert!(
            matches!(e, Some(Event::Ejected { failures: 3, duration, .. }) if duration == S.base_ejection),
            "{e:?}"
        );
    }

    #[test]
    fn an_established_connect_restarts_the_run() {
        let t0 = Instant::now();
        let mut o = Outlier::default();
        o.observe(c(0, 0), t0, &S, true);
        assert_eq!(o.observe(c(0, 2), ms(t0, 1), &S, true), None);
        assert_eq!(o.observe(c(1, 2), ms(t0, 2), &S, true), None);
        // Failures and a success in the same poll: not a run either.
        assert_eq!(o.observe(c(2, 10), ms(t0, 3), &S, true), None);
        assert_eq!(o.observe(c(2, 12), ms(t0, 4), &S, true), None);
        assert!(o.observe(c(2, 13), ms(t0, 5), &S, true).is_some());
    }

    #[test]
    fn many_failures_in_one_poll_eject_at_once() {
        let t0 = Instant::now();
        let mut o = Outlier::default();
        o.observe(c(5, 0), t0, &S, true);
        let e = o.observe(c(5, 7), ms(t0, 250), &S, true);
        assert!(
            matches!(e, Some(Event::Ejected { failures: 7, until, .. }) if until == ms(t0, 1250))
        );
        assert_eq!(o.ejected_until(), Some(ms(t0, 1250)));
    }

    #[test]
    fn readmitted_after_the_ejection_time() {
        let t0 = Instant::now();
        let mut o = Outlier::default();
        o.observe(c(0, 0), t0, &S, true);
        o.observe(c(0, 3), t0, &S, true).unwrap();
        assert_eq!(o.expire(ms(t0, 999)), None);
        // Failures while ejected (panic traffic) are not counted.
        assert_eq!(o.observe(c(0, 50), ms(t0, 500), &S, true), None);
        assert_eq!(o.expire(ms(t0, 1000)), Some(Event::Readmitted));
        assert_eq!(o.readmit(ms(t0, 1000)), None, "not ejected any more");
        assert_eq!(o.ejected_until(), None);
        assert_eq!(o.expire(ms(t0, 1001)), None);
        // Judged afresh: the failures seen while ejected are not part of the next run.
        assert_eq!(o.observe(c(0, 52), ms(t0, 1100), &S, true), None);
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets_after_health() {
        let t0 = Instant::now();
        let mut o = Outlier::default();
        o.observe(c(0, 0), t0, &S, true);
        let mut now = t0;
        let mut failed = 0;
        let mut durations = Vec::new();
        for _ in 0..5 {
            failed += 3;
            match o.observe(c(0, failed), now, &S, true) {
                Some(Event::Ejected {
                    duration, until, ..
                }) => {
                    durations.push(duration.as_secs());
                    now = until;
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(o.expire(now), Some(Event::Readmitted));
        }
        assert_eq!(durations, [1, 2, 4, 5, 5]);
        // Admitted for less than the maximum ejection: the backoff goes on.
        failed += 3;
        now += Duration::from_secs(4);
        let e = o.observe(c(0, failed), now, &S, true);
        assert!(matches!(e, Some(Event::Ejected { duration, .. }) if duration == S.max_ejection));
        now += S.max_ejection;
        o.expire(now).unwrap();
        // Admitted for the whole maximum: back to the base.
        failed += 3;
        now += S.max_ejection;
        let e = o.observe(c(0, failed), now, &S, true);
        assert!(matches!(e, Some(Event::Ejected { duration, .. }) if duration == S.base_ejection));
    }

    #[test]
    fn readmit_ends_an_ejection_early_and_keeps_the_backoff() {
        let t0 = Instant::now();
        let mut o = Outlier::default();
        o.observe(c(0, 0), t0, &S, true);
        o.observe(c(0, 3), t0, &S, true).unwrap();
        assert_eq!(o.readmit(ms(t0, 10)), Some(Event::Readmitted));
        assert_eq!(o.ejected_until(), None);
        let e = o.observe(c(0, 6), ms(t0, 20), &S, true);
        assert!(
            matches!(e, Some(Event::Ejected { duration, .. }) if duration == 2 * S.base_ejection)
        );
    }

    #[test]
    fn counts_that_go_back_are_a_new_baseline() {
        let t0 = Instant::now();
        let mut o = Outlier::default();
        o.observe(c(10, 10), t0, &S, true);
        o.observe(c(10, 12), t0, &S, true);
        // The map was recreated: counts restart from zero.
        assert_eq!(o.observe(c(0, 1), t0, &S, true), None);
        assert_eq!(o.observe(c(0, 1), t0, &S, true), None);
        // The run of 2 before the reset still stands; one more failure ejects.
        assert!(o.observe(c(0, 2), t0, &S, true).is_some());
    }

    #[test]
    fn ejection_time_never_overflows() {
        let s = OutlierSettings {
            max_ejection_percent: 50,
            consecutive_failures: 1,
            base_ejection: Duration::from_millis(86_400_000),
            max_ejection: Duration::from_millis(86_400_000),
        };
        for k in [0, 1, 31, 32, 1000, u32::MAX] {
            assert_eq!(ejection_time(k, &s), s.max_ejection);
        }
        assert_eq!(ejection_time(40, &S), S.max_ejection);
    }
}
