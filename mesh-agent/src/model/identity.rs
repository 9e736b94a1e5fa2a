//! SPIFFE identities of this mesh: `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`.
//!
//! This module owns parsing and printing them; where they come from (certificates, config)
//! lives elsewhere, what they may do in [`super::policy`].

use std::{fmt, str::FromStr};

/// A workload identity, as carried in a certificate's URI SAN.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    account: String,
}

/// Why a string is not a SPIFFE ID of this mesh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("{0:?} is not a SPIFFE ID (it must start with spiffe://)")]
    Scheme(String),
    #[error("{id:?}: trust domain {domain:?} must be 1 to 255 of lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain { id: String, domain: String },
    #[error("{0:?}: the path must be /ns/<namespace>/sa/<account>")]
    Path(String),
    #[error("{id:?}: {segment:?} is not a valid path segment (letters, digits, '.', '-', '_'; not . or ..)")]
    Segment { id: String, segment: String },
}

const SCHEME: &str = "spiffe://";

impl SpiffeId {
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

/// Whether `domain` is a valid trust domain name.
pub fn check_trust_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 255
        && domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

fn valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(id: &str) -> Result<Self, SpiffeError> {
        let rest = id
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeError::Scheme(id.to_owned()))?;
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !check_trust_domain(domain) {
            return Err(SpiffeError::TrustDomain {
                id: id.to_owned(),
                domain: domain.to_owned(),
            });
        }
        let parts: Vec<&str> = path.split('/').collect();
        let [ns_key, namespace, sa_key, account] = parts[..] else {
            return Err(SpiffeError::Path(id.to_owned()));
        };
        if ns_key != "ns" || sa_key != "sa" {
            return Err(SpiffeError::Path(id.to_owned()));
        }
        for segment in [namespace, account] {
            if !valid_segment(segment) {
                return Err(SpiffeError::Segment {
                    id: id.to_owned(),
                    segment: segment.to_owned(),
                });
            }
        }
        Ok(SpiffeId {
            trust_domain: domain.to_owned(),
            namespace: namespace.to_owned(),
            account: account.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: SpiffeId = "spiffe://mesh.local/ns/shop/sa/frontend".parse().unwrap();
        assert_eq!(id.trust_domain(), "mesh.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.to_string(), "spiffe://mesh.local/ns/shop/sa/frontend");
    }

    #[test]
    fn rejects_malformed() {
        let cases: &[(&str, &str)] = &[
            ("http://mesh.local/ns/a/sa/b", "must start with spiffe://"),
            ("spiffe://Mesh/ns/a/sa/b", "trust domain \"Mesh\""),
            ("spiffe:///ns/a/sa/b", "trust domain \"\""),
            ("spiffe://mesh.local", "the path must be"),
            ("spiffe://mesh.local/ns/a", "the path must be"),
            ("spiffe://mesh.local/ns/a/sa/b/c", "the path must be"),
            ("spiffe://mesh.local/namespace/a/sa/b", "the path must be"),
            ("spiffe://mesh.local/ns/../sa/b", "\"..\" is not a valid"),
            ("spiffe://mesh.local/ns/a/sa/", "\"\" is not a valid"),
            ("spiffe://mesh.local/ns/a b/sa/c", "\"a b\" is not a valid"),
        ];
        for (text, want) in cases {
            let e = text.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
