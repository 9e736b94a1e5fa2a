//! Whether a value is usable, with typed errors: the checks the config file and the catalog
//! (peers' records, registrations) both make, written once. Each error displays as the cause
//! part of a message (`10.0.0.2:0: port 0 is not a port to connect to`); the caller adds
//! where it was found.

use std::net::{IpAddr, SocketAddr};

use super::limits::{MAX_AFFINITY_TIMEOUT_S, MAX_NAME_LEN, MAX_NODE_NAME_LEN, MAX_WEIGHT};
use super::LbPolicy;

/// Why a service name is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceNameError {
    #[error("must not be empty")]
    Empty,
    #[error("{0:?} is longer than {MAX_NAME_LEN} characters")]
    TooLong(String),
    #[error(
        "{0:?} contains {1:?}; a service name is a DNS label: lowercase letters, digits and '-'"
    )]
    Character(String, char),
    #[error("{0:?} must start and end with a letter or digit")]
    Edge(String),
}

/// A service name is a DNS label (1..=63 of `[a-z0-9-]`, starting and ending with a letter or
/// digit), since it names metrics, logs and later DNS records.
pub fn service_name(name: &str) -> Result<(), ServiceNameError> {
    if name.is_empty() {
        return Err(ServiceNameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ServiceNameError::TooLong(name.to_owned()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(ServiceNameError::Character(name.to_owned(), c));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(ServiceNameError::Edge(name.to_owned()));
    }
    Ok(())
}

/// Why a node name is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeNameError {
    #[error("{0:?} must be 1 to {MAX_NODE_NAME_LEN} characters long")]
    Length(String),
    #[error("{0:?} must not start with '.' or '-'")]
    Start(String),
    #[error("{0:?} contains {1:?}; use letters, digits, '.', '_' and '-'")]
    Character(String, char),
}

/// A node name becomes a directory under `/sys/fs/bpf/mesh/`, so it is 1..=64 of
/// `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn node_name(name: &str) -> Result<(), NodeNameError> {
    if name.is_empty() || name.len() > MAX_NODE_NAME_LEN {
        return Err(NodeNameError::Length(name.to_owned()));
    }
    if name.starts_with(['.', '-']) {
        return Err(NodeNameError::Start(name.to_owned()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(NodeNameError::Character(name.to_owned(), c));
    }
    Ok(())
}

/// An address that cannot be a VIP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} cannot be a VIP: it is an unspecified, multicast or broadcast address")]
pub struct VipError(pub IpAddr);

/// A VIP is neither unspecified, multicast nor broadcast.
pub fn vip(ip: IpAddr) -> Result<(), VipError> {
    let bad = match ip {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
    };
    if bad {
        Err(VipError(ip))
    } else {
        Ok(())
    }
}

/// An affinity timeout out of range (in seconds, as written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} seconds is out of range 1..={MAX_AFFINITY_TIMEOUT_S} (one week)")]
pub struct AffinityTimeoutError(pub i64);

/// An affinity timeout is 1..=[`MAX_AFFINITY_TIMEOUT_S`] seconds.
pub fn affinity_timeout(seconds: i64) -> Result<u32, AffinityTimeoutError> {
    u32::try_from(seconds)
        .ok()
        .filter(|s| (1..=MAX_AFFINITY_TIMEOUT_S).contains(s))
        .ok_or(AffinityTimeoutError(seconds))
}

/// A weight out of range (as written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} is out of range 0..={MAX_WEIGHT}")]
pub struct WeightError(pub i64);

/// A weight is 0..=[`MAX_WEIGHT`] (0: drained).
pub fn weight(weight: i64) -> Result<u32, WeightError> {
    u32::try_from(weight)
        .ok()
        .filter(|w| *w <= MAX_WEIGHT)
        .ok_or(WeightError(weight))
}

/// Why an address cannot be a backend (or an endpoint announced to the mesh).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("{0}: port 0 is not a port to connect to")]
    PortZero(SocketAddr),
    #[error("{0}: a backend needs a unicast address")]
    NotUnicast(SocketAddr),
    /// The address names no particular host of the mesh (`kind`: "a loopback", …).
    #[error("{0}: {1} address cannot be announced (another host would reach its own)")]
    Unannounceable(SocketAddr, &'static str),
    #[error("{address} is {} but the VIP {vip} is {}; a socket cannot be redirected across families", family_name(address.ip()), family_name(*vip))]
    Family { address: SocketAddr, vip: IpAddr },
}

/// A backend of a service with VIP `vip`: a port, a unicast address, the VIP's family.
pub fn backend_address(address: SocketAddr, vip: IpAddr) -> Result<(), AddressError> {
    if address.port() == 0 {
        return Err(AddressError::PortZero(address));
    }
    let ip = address.ip();
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(AddressError::NotUnicast(address));
    }
    if !same_family(address, vip) {
        return Err(AddressError::Family { address, vip });
    }
    Ok(())
}

/// An endpoint announced to the mesh: a port, and an address other hosts can reach (not
/// loopback, unspecified, broadcast, multicast or link-local: another host would dial its
/// own).
pub fn announceable(address: SocketAddr) -> Result<(), AddressError> {
    if address.port() == 0 {
        return Err(AddressError::PortZero(address));
    }
    let ip = address.ip();
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    let kind = [
        (ip.is_loopback(), "a loopback"),
        (ip.is_unspecified(), "an unspecified"),
        (broadcast, "a broadcast"),
        (ip.is_multicast(), "a multicast"),
        (link_local, "a link-local"),
    ]
    .into_iter()
    .find_map(|(is, kind)| is.then_some(kind));
    match kind {
        Some(kind) => Err(AddressError::Unannounceable(address, kind)),
        None => Ok(()),
    }
}

/// Whether a backend at `address` can serve VIP `vip` (a socket is never redirected across
/// address families).
pub fn same_family(address: SocketAddr, vip: IpAddr) -> bool {
    address.is_ipv4() == vip.is_ipv4()
}

/// More backends with weight than a policy's table holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{active} backends with nonzero weight exceed the {max} that lb = \"{lb}\" supports ({why})"
)]
pub struct BackendLimitError {
    pub active: usize,
    pub max: usize,
    pub lb: LbPolicy,
    pub why: &'static str,
}

/// `active` backends with nonzero weight fit `lb`'s table ([`LbPolicy::backend_limit`]).
pub fn backend_limit(lb: LbPolicy, active: usize) -> Result<(), BackendLimitError> {
    match lb.backend_limit() {
        Some((max, why)) if active > max => Err(BackendLimitError {
            active,
            max,
            lb,
            why,
        }),
        _ => Ok(()),
    }
}

fn family_name(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(service_name("web-1").is_ok());
        assert_eq!(service_name(""), Err(ServiceNameError::Empty));
        assert!(matches!(
            service_name("Web"),
            Err(ServiceNameError::Character(_, 'W'))
        ));
        assert!(matches!(
            service_name("web-"),
            Err(ServiceNameError::Edge(_))
        ));
        assert!(service_name(&"a".repeat(64)).is_err());
        assert!(node_name("node-a").is_ok());
        assert!(node_name("ip-10-0-0-1.eu-west-1.compute.internal").is_ok());
        assert!(node_name("").is_err());
        assert!(node_name("a/b").is_err());
        assert!(node_name("..").is_err());
        assert!(node_name(&"a".repeat(65)).is_err());
    }

    #[test]
    fn vips() {
        for bad in ["0.0.0.0", "224.0.0.1", "255.255.255.255", "::", "ff02::1"] {
            let ip: IpAddr = bad.parse().unwrap();
            assert_eq!(vip(ip), Err(VipError(ip)), "{bad}");
        }
        assert!(vip("10.96.0.10".parse().unwrap()).is_ok());
        assert!(vip("fd00::10".parse().unwrap()).is_ok());
    }

    #[test]
    fn addresses() {
        let v4: IpAddr = "10.96.0.10".parse().unwrap();
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(backend_address(a("10.0.0.2:80"), v4).is_ok());
        assert!(
            backend_address(a("127.0.0.1:80"), v4).is_ok(),
            "a local backend is fine"
        );
        assert_eq!(
            backend_address(a("10.0.0.2:0"), v4),
            Err(AddressError::PortZero(a("10.0.0.2:0")))
        );
        assert!(matches!(
            backend_address(a("[fd00::2]:80"), v4),
            Err(AddressError::Family { .. })
        ));
        assert_eq!(
            backend_address(a("[fd00::2]:80"), v4).unwrap_err().to_string(),
            "[fd00::2]:80 is IPv6 but the VIP 10.96.0.10 is IPv4; a socket cannot be redirected across families"
        );
        assert_eq!(
            announceable(a("0.0.0.0:80")).unwrap_err().to_string(),
            "0.0.0.0:80: an unspecified address cannot be announced (another host would reach its own)"
        );
        for bad in [
            "127.0.0.1:80",
            "169.254.0.1:80",
            "[fe80::1]:80",
            "[::1]:80",
            "10.0.0.1:0",
        ] {
            assert!(announceable(a(bad)).is_err(), "{bad}");
        }
        assert!(announceable(a("10.0.0.1:80")).is_ok());
    }

    #[test]
    fn limits() {
        assert!(backend_limit(LbPolicy::Random, 1_000_000).is_ok());
        assert!(backend_limit(LbPolicy::Maglev, 6552).is_ok());
        let e = backend_limit(LbPolicy::Maglev, 6553).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "6553 backends with nonzero weight exceed the 6552 that lb = \"maglev\" supports"
            ),
            "{e}"
        );
        assert_eq!(weight(10_001), Err(WeightError(10_001)));
        assert_eq!(weight(0), Ok(0));
        assert_eq!(affinity_timeout(0), Err(AffinityTimeoutError(0)));
        assert_eq!(affinity_timeout(60), Ok(60));
    }
}
