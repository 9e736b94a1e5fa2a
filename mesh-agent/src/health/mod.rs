//! Backend health: which backends the kernel may pick, from active checks and passive signals.
//!
//! The agent decides; the kernel follows because [`Health::apply`] takes the unhealthy
//! backends out of each service's slot table before the reconciler writes it. The reconciler
//! swaps whole slot generations, so a connect never sees an empty or mixed table, and
//! established connections are never touched. Leaving the table is exactly what draining
//! does (a zero weight for the table's sake), so Maglev keeps every other backend's slots.
//!
//! Rules, per service:
//!
//! * a backend is excluded while its active check says unhealthy ([`active`]) or while it is
//!   ejected by the outlier detector ([`outlier`]);
//! * when every backend with weight would be excluded, none is: the service is in *panic*
//!   and all of them are used (a refused connect from a backend beats one refused for lack
//!   of backends, and health may be wrong about all of them at once);
//! * with `locality = "prefer-local"`, only the remaining backends on this node are used while
//!   there is one.
//!
//! [`Health`] is pure state fed by the agent's loop: probe results ([`checker`], [`probe`]),
//! the kernel's connect outcomes and the clock. It owns the transitions' log lines and the
//! numbers shown by status and metrics. It does not read maps or spawn tasks.

pub mod active;
pub mod checker;
pub mod locality;
pub mod outlier;
pub mod probe;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use mesh_common::health::ConnectOutcomes;

use crate::{
    balance::{Desired, DesiredBackend, DesiredService},
    model::{HealthSettings, Locality, Service},
};
use active::ActiveState;
use checker::Target;
use outlier::{Event, Outlier};

/// How often the agent reads the kernel's connect outcomes and ends ejections.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The health of every backend of every service the agent serves.
#[derive(Debug, Default, Clone)]
pub struct Health {
    services: BTreeMap<String, ServiceHealth>,
}

#[derive(Debug, Default, Clone)]
struct ServiceHealth {
    settings: HealthSettings,
    /// A strict mTLS service: its backends are probed through the tunnel.
    strict: bool,
    backends: BTreeMap<SocketAddr, BackendHealth>,
    /// Every backend with weight was excluded, so all are used (set by [`Health::apply`]).
    panic: bool,
    checks_passed: u64,
    checks_failed: u64,
    ejections: u64,
}

#[derive(Debug, Default, Clone)]
struct BackendHealth {
    /// Present when the service has an active check.
    active: Option<ActiveState>,
    outlier: Outlier,
    /// The backend's address is one of this node's (only looked up for prefer-local).
    local: bool,
    /// Why and since when it is ejected, for status.
    ejection_reason: Option<String>,
}

impl BackendHealth {
    fn excluded(&self) -> bool {
        self.outlier.ejected_until().is_some() || self.active.as_ref().is_some_and(|a| !a.healthy())
    }
}

/// One backend's health as `mesh-agent endpoints` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendView {
    /// `healthy`, `unhealthy` (active check) or `ejected` (outlier detection).
    pub state: &'static str,
    pub reason: Option<String>,
    /// End of the ejection.
    pub until: Option<SystemTime>,
}

/// One service's health numbers for the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSample {
    pub service: String,
    pub panic: bool,
    pub checks_passed: u64,
    pub checks_failed: u64,
    pub ejections: u64,
    /// (backend, healthy) — excluded backends are not healthy, panic or not.
    pub backends: Vec<(SocketAddr, bool)>,
}

impl Health {
    /// Follows the catalog's `services`, each with the health settings it carries. Kept
    /// backends keep their state; a changed active check starts over.
    pub fn sync(&mut self, services: &[Service]) {
        let mut old = std::mem::take(&mut self.services);
        for service in services {
            let (name, entry) = old
                .remove_entry(&service.name)
                .unwrap_or_else(|| (service.name.clone(), ServiceHealth::default()));
            self.services.insert(name, entry);
            self.sync_service(service);
        }
    }

    /// [`Health::sync`] for one service of the catalog (after an event that changed only it):
    /// the others keep their state as it is.
    pub fn sync_service(&mut self, service: &Service) {
        let entry = self.services.entry(service.name.clone()).or_default();
        // The same settings and backends (the common case of an event that changed another
        // service): the backends' state is kept as it is, not rebuilt.
        let unchanged = entry.settings == service.health
            && entry.strict == service.mtls
            && entry.backends.len() == service.backends.len()
            && (service.backends.iter()).all(|b| entry.backends.contains_key(&b.address));
        if !unchanged {
            let wanted = service.health.clone();
            if entry.settings.check != wanted.check {
                for b in entry.backends.values_mut() {
                    b.active = None;
                }
            }
            let mut backends = BTreeMap::new();
            for b in &service.backends {
                let mut state = entry.backends.remove(&b.address).unwrap_or_default();
                if wanted.check.is_some() && state.active.is_none() {
                    state.active = Some(ActiveState::default());
                }
                if wanted.check.is_none() {
                    state.active = None;
                }
                backends.insert(b.address, state);
            }
            entry.backends = backends;
            entry.settings = wanted;
            entry.strict = service.mtls;
        }
        // Looked up again on every sync: this host's addresses may have changed.
        let prefer_local = entry.settings.locality == Locality::PreferLocal;
        for (address, state) in &mut entry.backends {
            state.local = prefer_local && locality::is_local(address.ip());
        }
    }

    /// The backends to probe, and how.
    pub fn targets(&self) -> Vec<Target> {
        self.services
            .iter()
            .filter_map(|(name, s)| Some((name, s, s.settings.check.as_ref()?)))
            .flat_map(|(name, s, check)| {
                s.backends.keys().map(move |&backend| Target {
                    service: name.clone(),
                    backend,
                    check: check.clone(),
                    strict: s.strict,
                })
            })
            .collect()
    }

    /// Records a probe of `backend` of `service`; true when a backend changed health.
    pub fn record_probe(
        &mut self,
        service: &str,
        backend: SocketAddr,
        result: Result<(), String>,
    ) -> bool {
        let Some(s) = self.services.get_mut(service) else {
            return false;
        };
        let (Some(check), Some(b)) = (s.settings.check.as_ref(), s.backends.get_mut(&backend))
        else {
            return false;
        };
        let Some(active) = b.active.as_mut() else {
            return false;
        };
        let mut changed = false;
        match &result {
            Ok(()) => {
                s.checks_passed += 1;
                // A passing check is direct evidence: it ends an ejection.
                if b.outlier.readmit(Instant::now()).is_some() {
                    tracing::info!(service, %backend, "active check passed, ejection ended");
                    b.ejection_reason = None;
                    changed = true;
                }
            }
            Err(_) => s.checks_failed += 1,
        }
        changed
            | match active.record(result, check) {
                Some(true) => {
                    tracing::info!(service, %backend, "backend healthy again: its checks pass");
                    true
                }
                Some(false) => {
                    let reason = active.reason().unwrap_or_default();
                    tracing::warn!(service, %backend, %reason, "backend unhealthy");
                    true
                }
                None => false,
            }
    }

    /// Feeds the kernel's connect outcomes (monotonic, per backend address) read at `now`;
    /// the services of which a backend was ejected. A backend the kernel has no entry for has had no
    /// connect outcome yet: it counts as zeros, so the connects that create its entry count.
    /// (Only the very first reading is a mere baseline: a restarted agent adopts counts from
    /// before it started.)
    pub fn observe_outcomes(
        &mut self,
        outcomes: &[(SocketAddr, ConnectOutcomes)],
        now: Instant,
    ) -> BTreeSet<String> {
        let outcomes: BTreeMap<SocketAddr, ConnectOutcomes> = outcomes.iter().copied().collect();
        let mut changed = BTreeSet::new();
        for (name, s) in &mut self.services {
            let Some(settings) = s.settings.outlier else {
                continue;
            };
            let cap = settings.ejection_cap(s.backends.len());
            let mut ejected = s
                .backends
                .values()
                .filter(|b| b.outlier.ejected_until().is_some())
                .count();
            for (addr, b) in &mut s.backends {
                let counts = outcomes.get(addr).copied().unwrap_or_default();
                if let Some(Event::Ejected {
                    failures, duration, ..
                }) = b.outlier.observe(counts, now, &settings, ejected < cap)
                {
                    ejected += 1;
                    let reason = format!("{failures} failed connects in a row");
                    tracing::warn!(
                        service = name,
                        backend = %addr,
                        %reason,
                        ejection_ms = duration.as_millis(),
                        "backend ejected"
                    );
                    b.ejection_reason = Some(reason);
                    s.ejections += 1;
                    changed.insert(name.clone());
                }
            }
        }
        changed
    }

    /// Readmits the backends whose ejection is over at `now`; the services of which one was.
    pub fn expire(&mut self, now: Instant) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        for (name, s) in &mut self.services {
            for (addr, b) in &mut s.backends {
                if b.outlier.expire(now) == Some(Event::Readmitted) {
                    tracing::info!(service = name, backend = %addr, "ejection over, backend readmitted");
                    b.ejection_reason = None;
                    changed.insert(name.clone());
                }
            }
        }
        changed
    }

    /// Takes the excluded backends out of the slot tables of `desired` (see the module docs)
    /// and notes which services are in panic.
    pub fn apply(&mut self, desired: &mut Desired) {
        for service in desired.services.values_mut() {
            self.apply_service(service);
        }
    }

    /// [`Health::apply`] for the services of `desired` named in `names` only: the others keep
    /// the tables a previous apply gave them.
    pub fn apply_to(&mut self, desired: &mut Desired, names: &BTreeSet<String>) {
        for service in desired.services.values_mut() {
            if names.contains(&service.name) {
                self.apply_service(service);
            }
        }
    }

    /// Masks one service's table (a copy of the service is made only when it changes).
    fn apply_service(&mut self, service: &mut Arc<DesiredService>) {
        let Some(s) = self.services.get_mut(&service.name) else {
            return;
        };
        let weighted = |b: &DesiredBackend| b.weight > 0;
        let state = |b: &DesiredBackend| s.backends.get(&b.addr);
        let healthy: Vec<bool> = service
            .backends
            .iter()
            .map(|b| weighted(b) && !state(b).is_some_and(BackendHealth::excluded))
            .collect();
        let any_weighted = service.backends.iter().any(weighted);
        let panic = any_weighted && !healthy.contains(&true);
        if panic != s.panic {
            if panic {
                tracing::warn!(
                    service = service.name,
                    "every backend is unhealthy: panic, all of them are used"
                );
            } else {
                tracing::info!(service = service.name, "panic over");
            }
        }
        s.panic = panic;
        let mut used: Vec<bool> = if panic {
            service.backends.iter().map(weighted).collect()
        } else {
            healthy
        };
        if s.settings.locality == Locality::PreferLocal {
            let local: Vec<bool> = service
                .backends
                .iter()
                .zip(&used)
                .map(|(b, &u)| u && state(b).is_some_and(|h| h.local))
                .collect();
            if local.contains(&true) {
                used = local;
            }
        }
        let all = service.backends.iter().map(weighted);
        if used.iter().copied().eq(all) {
            return;
        }
        let masked: Vec<DesiredBackend> = service
            .backends
            .iter()
            .zip(&used)
            .map(|(b, &u)| DesiredBackend {
                weight: if u { b.weight } else { 0 },
                ..*b
            })
            .collect();
        let table = crate::balance::build_table(service.policy, &masked);
        Arc::make_mut(service).table = table;
    }

    /// Whether `service` is in panic (as of the last [`Health::apply`]).
    pub fn panic(&self, service: &str) -> bool {
        self.services.get(service).is_some_and(|s| s.panic)
    }

    /// What `mesh-agent endpoints` shows of one backend.
    pub fn view(&self, service: &str, backend: SocketAddr, now: Instant) -> Option<BackendView> {
        let b = self.services.get(service)?.backends.get(&backend)?;
        if let Some(until) = b.outlier.ejected_until() {
            return Some(BackendView {
                state: "ejected",
                reason: b.ejection_reason.clone(),
                until: Some(SystemTime::now() + until.saturating_duration_since(now)),
            });
        }
        let reason = b.active.as_ref().and_then(ActiveState::reason);
        Some(BackendView {
            state: if reason.is_some() {
                "unhealthy"
            } else {
                "healthy"
            },
            reason,
            until: None,
        })
    }

    /// Numbers for the metrics, by service.
    pub fn samples(&self) -> Vec<ServiceSample> {
        self.services
            .iter()
            .map(|(name, s)| ServiceSample {
                service: name.clone(),
                panic: s.panic,
                checks_passed: s.checks_passed,
                checks_failed: s.checks_failed,
                ejections: s.ejections,
                backends: s
                    .backends
                    .iter()
                    .map(|(&addr, b)| (addr, !b.excluded()))
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::config::Config;

    fn config(extra: &str, lb: &str, backends: &[(&str, u32)]) -> Config {
        let backends: Vec<String> = backends
            .iter()
            .map(|(a, w)| format!("{{ address = '{a}', weight = {w} }}"))
            .collect();
        Config::parse(
            &format!(
                "[[services]]\nname = 'web'\nvip = '10.96.0.10'\nport = 80\nlb = '{lb}'\n{extra}\nbackends = [{}]\n",
                backends.join(", ")
            ),
            "t.toml",
        )
        .unwrap()
    }

    const CHECK: &str = "health = { interval_ms = 500, healthy_threshold = 1, unhealthy_threshold = 2 }\noutlier = { consecutive_failures = 2, base_ejection_ms = 1000 }";

    fn setup(extra: &str, lb: &str, backends: &[(&str, u32)]) -> (Health, Desired) {
        let c = config(extra, lb, backends);
        let catalog = Desired::from_config(&c);
        let mut h = Health::default();
        h.sync(&c.services);
        (h, catalog)
    }

    fn table_of(h: &mut Health, catalog: &Desired) -> BTreeSet<SocketAddr> {
        let mut d = catalog.clone();
        h.apply(&mut d);
        let s = d.services.values().next().unwrap();
        s.table_addrs().collect()
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn set(addrs: &[&str]) -> BTreeSet<SocketAddr> {
        addrs.iter().map(|s| a(s)).collect()
    }

    const B: [&str; 3] = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];

    #[test]
    fn unhealthy_backends_leave_the_table_and_come_back() {
        let (mut h, catalog) = setup(CHECK, "random", &[(B[0], 1), (B[1], 1), (B[2], 1)]);
        assert_eq!(h.targets().len(), 3);
        assert_eq!(table_of(&mut h, &catalog), set(&B));
        assert!(!h.record_probe("web", a(B[1]), Err("refused".into())));
        assert!(h.record_probe("web", a(B[1]), Err("refused".into())));
        assert_eq!(table_of(&mut h, &catalog), set(&[B[0], B[2]]));
        let now = Instant::now();
        let v = h.view("web", a(B[1]), now).unwrap();
        assert_eq!(v.state, "unhealthy");
        assert_eq!(v.reason.as_deref(), Some("2 failed probe(s): refused"));
        assert_eq!(h.view("web", a(B[0]), now).unwrap().state, "healthy");
        assert!(h.record_probe("web", a(B[1]), Ok(())));
        assert_eq!(table_of(&mut h, &catalog), set(&B));
        let s = &h.samples()[0];
        assert_eq!((s.checks_passed, s.checks_failed), (1, 2));
    }

    #[test]
    fn panic_when_every_weighted_backend_is_excluded() {
        // The drained one never counts, panic or not.
        let (mut h, catalog) = setup(CHECK, "random", &[(B[0], 1), (B[1], 1), (B[2], 0)]);
        for b in [B[0], B[1]] {
            h.record_probe("web", a(b), Err("refused".into()));
            h.record_probe("web", a(b), Err("refused".into()));
        }
        assert_eq!(table_of(&mut h, &catalog), set(&[B[0], B[1]]));
        assert!(h.panic("web"));
        let healthy: Vec<bool> = h.samples()[0].backends.iter().map(|&(_, ok)| ok).collect();
        assert_eq!(healthy, [false, false, true]);
        h.record_probe("web", a(B[0]), Ok(()));
        assert_eq!(table_of(&mut h, &catalog), set(&[B[0]]));
        assert!(!h.panic("web"));
    }

    #[test]
    fn no_backends_with_weight_is_not_panic() {
        let (mut h, catalog) = setup(CHECK, "random", &[(B[0], 0)]);
        assert!(table_of(&mut h, &catalog).is_empty());
        assert!(!h.panic("web"));
    }

    #[test]
    fn passive_ejection_and_readmission() {
        let (mut h, catalog) = setup("", "maglev", &[(B[0], 1), (B[1], 1)]);
        assert!(h.targets().is_empty(), "no active check configured");
        let t0 = Instant::now();
        let counts = |failed| ConnectOutcomes {
            established: 5,
            failed,
            syn_timeouts: 0,
        };
        assert!(h
            .observe_outcomes(&[(a(B[0]), counts(0)), (a(B[1]), counts(0))], t0)
            .is_empty());
        // Default settings: 5 in a row.
        assert!(h.observe_outcomes(&[(a(B[0]), counts(4))], t0).is_empty());
        assert!(!h.observe_outcomes(&[(a(B[0]), counts(5))], t0).is_empty());
        let full: Vec<u32> = catalog.services.values().next().unwrap().table.clone();
        let mut d = catalog.clone();
        h.apply(&mut d);
        let table = &d.services.values().next().unwrap().table;
        assert_eq!(table.len(), full.len(), "the Maglev table keeps its size");
        assert!(table.iter().all(|&i| i == 1));
        let v = h.view("web", a(B[0]), t0).unwrap();
        assert_eq!(v.state, "ejected");
        assert_eq!(v.reason.as_deref(), Some("5 failed connects in a row"));
        assert!(v.until.is_some());
        assert_eq!(h.samples()[0].ejections, 1);
        assert!(h.expire(t0 + Duration::from_secs(29)).is_empty());
        assert!(!h.expire(t0 + Duration::from_secs(30)).is_empty());
        let mut d = catalog.clone();
        h.apply(&mut d);
        assert_eq!(d.services.values().next().unwrap().table, full);
    }

    #[test]
    fn outlier_detection_ejects_at_most_its_share_of_a_services_backends() {
        let four = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"];
        let failing = |n| ConnectOutcomes {
            established: 0,
            failed: n,
            syn_timeouts: 0,
        };
        for (extra, ejectable) in [
            ("", 2),
            ("outlier = { max_ejection_percent = 25 }", 1),
            ("outlier = { max_ejection_percent = 10 }", 1),
            ("outlier = { max_ejection_percent = 100 }", 4),
        ] {
            let backends: Vec<(&str, u32)> = four.iter().map(|&b| (b, 1)).collect();
            let (mut h, catalog) = setup(extra, "random", &backends);
            let t0 = Instant::now();
            let all = |n| four.iter().map(|&b| (a(b), failing(n))).collect::<Vec<_>>();
            h.observe_outcomes(&all(0), t0);
            // Every backend fails its connects, twice over the threshold.
            h.observe_outcomes(&all(10), t0);
            h.observe_outcomes(&all(20), t0);
            let ejected = four
                .iter()
                .filter(|&&b| h.view("web", a(b), t0).unwrap().state == "ejected")
                .count();
            assert_eq!(ejected, ejectable, "{extra:?}");
            // With every backend ejected the service is in panic and uses them all.
            let in_table = if ejectable == 4 { 4 } else { 4 - ejectable };
            assert_eq!(table_of(&mut h, &catalog).len(), in_table, "{extra:?}");
        }
    }

    #[test]
    fn a_new_kernel_entry_counts_from_zero() {
        let (mut h, _) = setup("", "random", &[(B[0], 1), (B[1], 1)]);
        let t0 = Instant::now();
        assert!(h.observe_outcomes(&[], t0).is_empty());
        let failed = ConnectOutcomes {
            established: 0,
            failed: 5,
            syn_timeouts: 0,
        };
        assert!(!h.observe_outcomes(&[(a(B[0]), failed)], t0).is_empty());
    }

    #[test]
    fn a_passing_check_ends_an_ejection() {
        let (mut h, catalog) = setup(CHECK, "random", &[(B[0], 1), (B[1], 1)]);
        let t0 = Instant::now();
        let failed = |failed| ConnectOutcomes {
            established: 0,
            failed,
            syn_timeouts: 0,
        };
        h.observe_outcomes(&[], t0);
        assert!(!h.observe_outcomes(&[(a(B[0]), failed(2))], t0).is_empty());
        assert_eq!(table_of(&mut h, &catalog), set(&[B[1]]));
        assert!(h.record_probe("web", a(B[0]), Ok(())));
        assert_eq!(h.view("web", a(B[0]), t0).unwrap().state, "healthy");
        assert_eq!(table_of(&mut h, &catalog), set(&B[..2]));
    }

    #[test]
    fn outlier_detection_can_be_off() {
        let (mut h, _) = setup(
            "outlier = { enabled = false }",
            "random",
            &[(B[0], 1), (B[1], 1)],
        );
        let t0 = Instant::now();
        let failed = |failed| ConnectOutcomes {
            established: 0,
            failed,
            syn_timeouts: 0,
        };
        h.observe_outcomes(&[(a(B[0]), failed(0))], t0);
        assert!(h
            .observe_outcomes(&[(a(B[0]), failed(1000))], t0)
            .is_empty());
    }

    #[test]
    fn prefer_local_uses_the_local_backends_while_there_is_one() {
        let local = "127.0.0.1:80";
        let (mut h, catalog) = setup(
            &format!("{CHECK}\nlocality = 'prefer-local'"),
            "random",
            &[(local, 1), (B[0], 1)],
        );
        assert_eq!(table_of(&mut h, &catalog), set(&[local]));
        h.record_probe("web", a(local), Err("refused".into()));
        h.record_probe("web", a(local), Err("refused".into()));
        assert_eq!(table_of(&mut h, &catalog), set(&[B[0]]));
    }

    #[test]
    fn sync_keeps_state_and_restarts_changed_checks() {
        let c = config(CHECK, "random", &[(B[0], 1), (B[1], 1)]);
        let mut h = Health::default();
        h.sync(&c.services);
        h.record_probe("web", a(B[0]), Err("refused".into()));
        h.record_probe("web", a(B[0]), Err("refused".into()));
        // Same settings, one more backend: the unhealthy one stays unhealthy.
        let c2 = config(CHECK, "random", &[(B[0], 1), (B[1], 1), (B[2], 1)]);
        let catalog2 = Desired::from_config(&c2);
        h.sync(&c2.services);
        assert_eq!(table_of(&mut h, &catalog2), set(&[B[1], B[2]]));
        // A different check starts over (healthy).
        let c3 = config(
            "health = { interval_ms = 1000 }",
            "random",
            &[(B[0], 1), (B[1], 1)],
        );
        let catalog3 = Desired::from_config(&c3);
        h.sync(&c3.services);
        assert_eq!(table_of(&mut h, &catalog3), set(&[B[0], B[1]]));
        assert_eq!(h.targets().len(), 2);
        // A service that left the catalog leaves the health state.
        h.sync(&[]);
        assert!(h.samples().is_empty());
    }
}
