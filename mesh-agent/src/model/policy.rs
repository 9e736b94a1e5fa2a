//! Authorization of tunneled flows on the receiving side, with Istio's semantics: a rule allows
//! or denies a set of source identities for one service (optionally one service port); any
//! matching deny rule refuses; a service with at least one allow rule refuses every caller no
//! allow rule matches; a service without rules admits every authenticated caller.

use std::{fmt, str::FromStr};

use super::identity::{SpiffeError, SpiffeId};

/// Who a rule is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// One identity (`spiffe://td/ns/a/sa/b`).
    Exact(SpiffeId),
    /// Every identity in a namespace (`ns:<namespace>`).
    Namespace(String),
    /// Every identity whose ID starts with this (`prefix:spiffe://td/ns/shop/`).
    Prefix(String),
}

/// Why a `from` entry is not a principal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalError {
    #[error(transparent)]
    Spiffe(#[from] SpiffeError),
    #[error("{0:?}: a namespace is letters, digits, '.', '-' and '_'")]
    Namespace(String),
    #[error("{0:?}: a prefix must start with spiffe://")]
    Prefix(String),
}

impl Principal {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Principal::Exact(exact) => exact == id,
            Principal::Namespace(namespace) => id.namespace() == namespace,
            Principal::Prefix(prefix) => id.to_string().starts_with(prefix.as_str()),
        }
    }
}

impl FromStr for Principal {
    type Err = PrincipalError;

    fn from_str(text: &str) -> Result<Self, PrincipalError> {
        if let Some(namespace) = text.strip_prefix("ns:") {
            let valid = !namespace.is_empty()
                && namespace
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            return if valid {
                Ok(Principal::Namespace(namespace.to_owned()))
            } else {
                Err(PrincipalError::Namespace(namespace.to_owned()))
            };
        }
        if let Some(prefix) = text.strip_prefix("prefix:") {
            return if prefix.starts_with("spiffe://") && prefix.len() > "spiffe://".len() {
                Ok(Principal::Prefix(prefix.to_owned()))
            } else {
                Err(PrincipalError::Prefix(prefix.to_owned()))
            };
        }
        Ok(Principal::Exact(text.parse()?))
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Exact(id) => write!(f, "{id}"),
            Principal::Namespace(namespace) => write!(f, "ns:{namespace}"),
            Principal::Prefix(prefix) => write!(f, "prefix:{prefix}"),
        }
    }
}

/// `action = "allow" | "deny"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// One `[[policies]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub service: String,
    /// The service port it applies to; every port when `None`.
    pub port: Option<u16>,
    pub action: Action,
    pub from: Vec<Principal>,
}

impl Rule {
    fn applies(&self, service: &str, port: u16) -> bool {
        self.service == service && self.port.is_none_or(|p| p == port)
    }

    fn matches(&self, id: &SpiffeId) -> bool {
        self.from.iter().any(|p| p.matches(id))
    }
}

/// What the policy said, and which rule said it (an index into the rules in force).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No rule for the service: every authenticated caller is admitted.
    AllowNoPolicy,
    /// This allow rule matched.
    Allow { rule: usize },
    /// This deny rule matched.
    Deny { rule: usize },
    /// The service has allow rules and none matched.
    DenyNoMatch,
}

impl Decision {
    pub fn allowed(self) -> bool {
        matches!(self, Decision::AllowNoPolicy | Decision::Allow { .. })
    }

    /// `allow` or `deny`, the metric label.
    pub fn label(self) -> &'static str {
        if self.allowed() {
            "allow"
        } else {
            "deny"
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::AllowNoPolicy => f.write_str("allowed (no policy for the service)"),
            Decision::Allow { rule } => write!(f, "allowed by policies[{rule}]"),
            Decision::Deny { rule } => write!(f, "denied by policies[{rule}]"),
            Decision::DenyNoMatch => {
                f.write_str("denied (the service has allow rules and none matched)")
            }
        }
    }
}

/// The rules in force, in config order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policies {
    pub rules: Vec<Rule>,
}

impl Policies {
    /// Whether `id` may open a flow to `service` on `port` (the service's port).
    pub fn evaluate(&self, service: &str, port: u16, id: &SpiffeId) -> Decision {
        let applicable = || {
            self.rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.applies(service, port))
        };
        if let Some((rule, _)) =
            applicable().find(|(_, r)| r.action == Action::Deny && r.matches(id))
        {
            return Decision::Deny { rule };
        }
        let mut allows = applicable()
            .filter(|(_, r)| r.action == Action::Allow)
            .peekable();
        if allows.peek().is_none() {
            return Decision::AllowNoPolicy;
        }
        allows
            .find(|(_, r)| r.matches(id))
            .map_or(Decision::DenyNoMatch, |(rule, _)| Decision::Allow { rule })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> SpiffeId {
        text.parse().unwrap()
    }

    fn rule(service: &str, port: Option<u16>, action: Action, from: &[&str]) -> Rule {
        Rule {
            service: service.into(),
            port,
            action,
            from: from.iter().map(|f| f.parse().unwrap()).collect(),
        }
    }

    const FRONTEND: &str = "spiffe://td/ns/shop/sa/frontend";
    const BATCH: &str = "spiffe://td/ns/shop/sa/batch";
    const OTHER: &str = "spiffe://td/ns/ops/sa/debug";

    #[test]
    fn no_rules_admit_everyone() {
        let p = Policies::default();
        assert_eq!(
            p.evaluate("payments", 443, &id(OTHER)),
            Decision::AllowNoPolicy
        );
    }

    #[test]
    fn an_allow_rule_denies_everything_else() {
        let p = Policies {
            rules: vec![rule("payments", Some(443), Action::Allow, &[FRONTEND])],
        };
        assert_eq!(
            p.evaluate("payments", 443, &id(FRONTEND)),
            Decision::Allow { rule: 0 }
        );
        assert_eq!(
            p.evaluate("payments", 443, &id(BATCH)),
            Decision::DenyNoMatch
        );
        // The rule is about port 443 only: another port of the service has no allow rule.
        assert_eq!(
            p.evaluate("payments", 80, &id(BATCH)),
            Decision::AllowNoPolicy
        );
        // Nor about another service.
        assert_eq!(p.evaluate("web", 443, &id(BATCH)), Decision::AllowNoPolicy);
    }

    #[test]
    fn deny_wins() {
        let p = Policies {
            rules: vec![
                rule("payments", None, Action::Allow, &["ns:shop"]),
                rule("payments", None, Action::Deny, &[BATCH]),
            ],
        };
        assert_eq!(
            p.evaluate("payments", 443, &id(FRONTEND)),
            Decision::Allow { rule: 0 }
        );
        assert_eq!(
            p.evaluate("payments", 443, &id(BATCH)),
            Decision::Deny { rule: 1 }
        );
        assert_eq!(
            p.evaluate("payments", 443, &id(OTHER)),
            Decision::DenyNoMatch
        );
        assert!(!Decision::Deny { rule: 1 }.allowed());
    }

    #[test]
    fn principals() {
        assert!("ns:shop"
            .parse::<Principal>()
            .unwrap()
            .matches(&id(FRONTEND)));
        assert!(!"ns:shop".parse::<Principal>().unwrap().matches(&id(OTHER)));
        let prefix: Principal = "prefix:spiffe://td/ns/shop/sa/front".parse().unwrap();
        assert!(prefix.matches(&id(FRONTEND)));
        assert!(!prefix.matches(&id(BATCH)));
        assert_eq!(prefix.to_string(), "prefix:spiffe://td/ns/shop/sa/front");
        for bad in [
            "ns:",
            "ns:a/b",
            "prefix:td/ns",
            "prefix:spiffe://",
            "frontend",
        ] {
            assert!(bad.parse::<Principal>().is_err(), "{bad}");
        }
    }
}
