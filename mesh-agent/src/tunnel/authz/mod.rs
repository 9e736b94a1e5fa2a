//! What the inbound side may connect to and who may ask: the mTLS services of the local
//! catalog by backend address (so the agent is never an open proxy), and the policy rules;
//! and which check a peer's health probe of a backend runs.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use crate::model::{ActiveCheck, Service};

use crate::{
    model::identity::SpiffeId,
    model::policy::{Decision, Policies},
    tunnel::proxy::connect::Target,
};

/// One mTLS service of the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MtlsService {
    pub name: String,
    /// The port clients call (policies name it).
    pub port: u16,
    pub backends: Vec<SocketAddr>,
    /// The active check this agent's config gives the service (peers' probes run it here).
    pub check: Option<ActiveCheck>,
}

/// The mTLS services of a catalog, for the inbound side: each with the backends of it this
/// node hosts (`hosted(service, backend)`: it announces them, from its config or a
/// registration; the inbound tunnel and the peers' probes reach those only, never what other
/// nodes announce), and with the active check the local config (`local`) gives it, the one a
/// peer's health probe of its backends runs here.
pub fn mtls_services(
    services: &[Service],
    local: &[Service],
    hosted: &dyn Fn(&str, SocketAddr) -> bool,
) -> Vec<MtlsService> {
    services
        .iter()
        .filter(|s| s.mtls)
        .map(|s| MtlsService {
            name: s.name.clone(),
            port: s.port,
            backends: s
                .backends
                .iter()
                .map(|b| b.address)
                .filter(|&b| hosted(&s.name, b))
                .collect(),
            check: local
                .iter()
                .find(|l| l.name == s.name)
                .and_then(|l| l.health.check.clone()),
        })
        .collect()
}

/// The catalog's mTLS services and the rules in force; replaced whole on config change.
#[derive(Clone, Debug, Default)]
pub struct Authz {
    /// Backend → (service name, service port).
    by_backend: HashMap<SocketAddr, Vec<(String, u16)>>,
    /// Service name → its active check, for the services that have one.
    checks: HashMap<String, ActiveCheck>,
    pub policies: Policies,
}

/// The answer to one flow.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The target is no backend of an mTLS service (of the one named, if named).
    UnknownTarget,
    /// Every service the target belongs to admits the caller (each decision given).
    Allow(Vec<(String, Decision)>),
    /// This service refuses the caller.
    Deny(String, Decision),
}

impl Authz {
    pub fn new(services: &[MtlsService], policies: Policies) -> Authz {
        let mut by_backend: HashMap<SocketAddr, Vec<(String, u16)>> = HashMap::new();
        let mut checks = HashMap::new();
        for service in services {
            if let Some(check) = &service.check {
                checks.insert(service.name.clone(), check.clone());
            }
            for backend in &service.backends {
                by_backend
                    .entry(*backend)
                    .or_default()
                    .push((service.name.clone(), service.port));
            }
        }
        Authz {
            by_backend,
            checks,
            policies,
        }
    }

    /// What a peer's health probe of `target` runs here: the active check of the target's
    /// service (the one named) if it has one, else a TCP connect bounded by `timeout`; `None`
    /// when the target is no backend of an mTLS service. Probes are admitted from any
    /// authenticated peer whatever the policy: they carry no bytes of the caller, and the
    /// check is this agent's own, so a peer learns only whether the backend is up.
    pub fn probe_check(&self, target: &Target, timeout: Duration) -> Option<ActiveCheck> {
        let service = self
            .by_backend
            .get(&target.backend)?
            .iter()
            .find(|(name, _)| target.service.as_ref().is_none_or(|s| s == name))?;
        Some(self.checks.get(&service.0).cloned().unwrap_or(ActiveCheck {
            interval: timeout,
            timeout,
            healthy_threshold: 1,
            unhealthy_threshold: 1,
            http: None,
        }))
    }

    /// Whether `caller` may reach `target`. A target named by several services must be
    /// allowed by each (the caller's service, when the request names it).
    pub fn check(&self, target: &Target, caller: &SpiffeId) -> Verdict {
        let services: Vec<&(String, u16)> = self
            .by_backend
            .get(&target.backend)
            .into_iter()
            .flatten()
            .filter(|(name, _)| target.service.as_ref().is_none_or(|s| s == name))
            .collect();
        if services.is_empty() {
            return Verdict::UnknownTarget;
        }
        let mut allowed = Vec::with_capacity(services.len());
        for (name, port) in services {
            let decision = self.policies.evaluate(name, *port, caller);
            if !decision.allowed() {
                return Verdict::Deny(name.clone(), decision);
            }
            allowed.push((name.clone(), decision));
        }
        Verdict::Allow(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::{Action, Rule};

    #[test]
    fn only_known_backends_and_policy_per_service() {
        let backend: SocketAddr = "10.0.0.5:8443".parse().unwrap();
        let authz = Authz::new(
            &[MtlsService {
                name: "payments".into(),
                port: 443,
                backends: vec![backend],
                check: None,
            }],
            Policies {
                rules: vec![Rule {
                    service: "payments".into(),
                    port: Some(443),
                    action: Action::Allow,
                    from: vec!["spiffe://td/ns/shop/sa/frontend".parse().unwrap()],
                }],
            },
        );
        let frontend: SpiffeId = "spiffe://td/ns/shop/sa/frontend".parse().unwrap();
        let batch: SpiffeId = "spiffe://td/ns/shop/sa/batch".parse().unwrap();
        let target = |backend: &str, service: Option<&str>| Target {
            backend: backend.parse().unwrap(),
            service: service.map(Into::into),
        };
        assert_eq!(
            authz.check(&target("10.0.0.5:8443", Some("payments")), &frontend),
            Verdict::Allow(vec![("payments".into(), Decision::Allow { rule: 0 })])
        );
        assert_eq!(
            authz.check(&target("10.0.0.5:8443", None), &batch),
            Verdict::Deny("payments".into(), Decision::DenyNoMatch)
        );
        assert_eq!(
            authz.check(&target("10.0.0.5:22", None), &frontend),
            Verdict::UnknownTarget
        );
        assert_eq!(
            authz.check(&target("10.0.0.5:8443", Some("web")), &frontend),
            Verdict::UnknownTarget
        );
    }

    #[test]
    fn probes_run_the_local_check_or_a_connect_and_only_for_known_backends() {
        let web_check = ActiveCheck {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(300),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            http: Some(crate::model::HttpCheck {
                path: "/healthz".into(),
                expect_status: 204,
            }),
        };
        let service = |name: &str, backend: &str, check: Option<ActiveCheck>| MtlsService {
            name: name.into(),
            port: 80,
            backends: vec![backend.parse().unwrap()],
            check,
        };
        // A policy that admits nobody: probes are not flows and pass it.
        let authz = Authz::new(
            &[
                service("web", "10.0.0.5:80", Some(web_check.clone())),
                service("db", "10.0.0.6:5432", None),
            ],
            Policies {
                rules: vec![Rule {
                    service: "web".into(),
                    port: None,
                    action: Action::Deny,
                    from: vec!["spiffe://td/ns/mesh/sa/a".parse().unwrap()],
                }],
            },
        );
        let target = |backend: &str, service: &str| Target {
            backend: backend.parse().unwrap(),
            service: Some(service.into()),
        };
        let timeout = Duration::from_secs(2);
        assert_eq!(
            authz.probe_check(&target("10.0.0.5:80", "web"), timeout),
            Some(web_check)
        );
        let connect = authz
            .probe_check(&target("10.0.0.6:5432", "db"), timeout)
            .unwrap();
        assert_eq!((connect.timeout, connect.http), (timeout, None));
        assert_eq!(
            authz.probe_check(&target("10.0.0.6:5432", "web"), timeout),
            None
        );
        assert_eq!(
            authz.probe_check(&target("10.0.0.7:80", "web"), timeout),
            None
        );
    }
}
