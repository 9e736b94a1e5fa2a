//! What the inbound side may connect to and who may ask: the mTLS services of the local
//! catalog by backend address (so the agent is never an open proxy), and the policy rules.

use std::{collections::HashMap, net::SocketAddr};

use super::{
    connect::Target,
    policy::{Decision, Policies},
    spiffe::SpiffeId,
};

/// One mTLS service of the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MtlsService {
    pub name: String,
    /// The port clients call (policies name it).
    pub port: u16,
    pub backends: Vec<SocketAddr>,
}

/// The catalog's mTLS services and the rules in force; replaced whole on config change.
#[derive(Clone, Debug, Default)]
pub struct Authz {
    /// Backend → (service name, service port).
    by_backend: HashMap<SocketAddr, Vec<(String, u16)>>,
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
        for service in services {
            for backend in &service.backends {
                by_backend
                    .entry(*backend)
                    .or_default()
                    .push((service.name.clone(), service.port));
            }
        }
        Authz {
            by_backend,
            policies,
        }
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
    use super::super::policy::{Action, Rule};
    use super::*;

    #[test]
    fn only_known_backends_and_policy_per_service() {
        let backend: SocketAddr = "10.0.0.5:8443".parse().unwrap();
        let authz = Authz::new(
            &[MtlsService {
                name: "payments".into(),
                port: 443,
                backends: vec![backend],
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
}
