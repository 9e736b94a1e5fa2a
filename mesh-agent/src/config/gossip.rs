//! The `[gossip]` table: how this agent joins its peers.
//!
//! ```toml
//! [gossip]
//! advertise = "10.0.0.1:15010"        # the address peers reach this node at (required)
//! listen = "0.0.0.0:15010"            # default: the advertise port on every address
//! seeds = ["10.0.0.2:15010"]          # one or two peers to join through; may be empty
//!                                     # (an address without a port means port 15010)
//! key_file = "/etc/mesh/gossip.key"   # the mesh key (absolute path; read when the agent starts)
//! cluster = "mesh"                    # peers of another cluster name are refused
//! interval = "100ms"                  # gossip round period
//! phi_threshold = 10                  # failure detector: dead after ~phi x the mean heartbeat gap
//! ```
//!
//! This module owns the table's format, defaults and checks (errors name the file, line and
//! field like every config error); no `[gossip]` table means single-host mode. It does not read
//! the key file: [`crate::gossip`] does when it starts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Source};
use crate::model::settings::GossipSettings;

/// The gossip port of an address written without one.
pub const DEFAULT_PORT: u16 = 15010;
/// Gossip round period by default: a change reaches 16 nodes in a few rounds.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);
/// Shortest and longest accepted round period.
const INTERVAL_RANGE: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(10));
/// Phi threshold by default: with 100 ms rounds a silent node is declared dead after about
/// 1-2 s, well inside the 5 s budget, without flapping under a loaded scheduler.
pub const DEFAULT_PHI_THRESHOLD: u32 = 10;
/// Default cluster name.
pub const DEFAULT_CLUSTER: &str = "mesh";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGossip {
    listen: Option<Spanned<String>>,
    advertise: Option<Spanned<String>>,
    #[serde(default)]
    seeds: Vec<Spanned<String>>,
    key_file: Spanned<String>,
    cluster: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    phi_threshold: Option<Spanned<i64>>,
}

impl Source<'_> {
    pub(super) fn gossip(&self, raw: RawGossip) -> Result<GossipSettings, ConfigError> {
        let addr = |value: &Spanned<String>, field: &str| -> Result<SocketAddr, ConfigError> {
            let text = value.get_ref().trim();
            text.parse()
                .or_else(|_| text.parse().map(|ip| SocketAddr::new(ip, DEFAULT_PORT)))
                .map_err(|_| {
                    self.invalid(
                        value.span(),
                        field,
                        format!("{text:?} is not an IP or IP:port"),
                    )
                })
        };
        let listen = raw
            .listen
            .as_ref()
            .map(|l| addr(l, "gossip.listen"))
            .transpose()?;
        let advertise = match (&raw.advertise, listen) {
            (Some(a), _) => {
                let advertised = addr(a, "gossip.advertise")?;
                let ip = advertised.ip();
                if ip.is_unspecified() || ip.is_multicast() || advertised.port() == 0 {
                    return Err(self.invalid(
                        a.span(),
                        "gossip.advertise",
                        format!("{advertised}: peers need a unicast address and a port"),
                    ));
                }
                advertised
            }
            (None, Some(l)) if !l.ip().is_unspecified() && l.port() != 0 => l,
            (None, _) => {
                let span = raw
                    .listen
                    .as_ref()
                    .map_or(raw.key_file.span(), Spanned::span);
                return Err(self.invalid(
                    span,
                    "gossip.advertise",
                    "missing: set advertise to the IP:port peers reach this node at",
                ));
            }
        };
        let listen = listen.unwrap_or_else(|| {
            let any = match advertise.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            SocketAddr::new(any, advertise.port())
        });
        let seeds = raw
            .seeds
            .iter()
            .enumerate()
            .map(|(i, s)| addr(s, &format!("gossip.seeds[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let key_file = PathBuf::from(raw.key_file.get_ref());
        if !key_file.is_absolute() {
            return Err(self.invalid(
                raw.key_file.span(),
                "gossip.key_file",
                format!("{:?} must be an absolute path", raw.key_file.get_ref()),
            ));
        }
        let cluster = match raw.cluster {
            None => DEFAULT_CLUSTER.to_owned(),
            Some(c) if (1..=64).contains(&c.get_ref().len()) => c.into_inner(),
            Some(c) => {
                return Err(self.invalid(
                    c.span(),
                    "gossip.cluster",
                    "must be 1 to 64 characters long",
                ))
            }
        };
        let interval = match raw.interval {
            None => DEFAULT_INTERVAL,
            Some(i) => humantime::parse_duration(i.get_ref())
                .ok()
                .filter(|d| (INTERVAL_RANGE.0..=INTERVAL_RANGE.1).contains(d))
                .ok_or_else(|| {
                    self.invalid(
                        i.span(),
                        "gossip.interval",
                        format!(
                            "{:?} is not a duration between {:?} and {:?} (e.g. \"100ms\")",
                            i.get_ref(),
                            INTERVAL_RANGE.0,
                            INTERVAL_RANGE.1
                        ),
                    )
                })?,
        };
        let phi_threshold = match raw.phi_threshold {
            None => DEFAULT_PHI_THRESHOLD,
            Some(p) => u32::try_from(*p.get_ref())
                .ok()
                .filter(|p| (1..=100).contains(p))
                .ok_or_else(|| {
                    self.invalid(
                        p.span(),
                        "gossip.phi_threshold",
                        format!("{} is out of range 1..=100", p.get_ref()),
                    )
                })?,
        };
        Ok(GossipSettings {
            listen,
            advertise,
            seeds,
            key_file,
            cluster,
            interval,
            phi_threshold,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    use super::*;

    fn parse(gossip: &str) -> Result<Option<GossipSettings>, String> {
        Config::parse(&format!("[gossip]\n{gossip}"), "mesh.toml")
            .map(|c| c.gossip)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_absence() {
        assert_eq!(Config::parse("", "m").unwrap().gossip, None);
        let g = parse("advertise = '10.0.0.1'\nkey_file = '/k'\n")
            .unwrap()
            .unwrap();
        assert_eq!(g.listen, "0.0.0.0:15010".parse().unwrap());
        assert_eq!(g.advertise, "10.0.0.1:15010".parse().unwrap());
        assert!(g.seeds.is_empty());
        assert_eq!(g.interval, DEFAULT_INTERVAL);
        assert_eq!(g.phi_threshold, DEFAULT_PHI_THRESHOLD);
        assert_eq!(g.cluster, "mesh");
        let g = parse("listen = '10.0.0.1:7000'\nseeds = ['10.0.0.2:7000']\nkey_file = '/k'\ninterval = '150ms'\nphi_threshold = 8\ncluster = 'prod'\n")
            .unwrap()
            .unwrap();
        assert_eq!(g.advertise, g.listen);
        assert_eq!(g.seeds, vec!["10.0.0.2:7000".parse().unwrap()]);
        assert_eq!(g.interval, Duration::from_millis(150));
        assert_eq!((g.phi_threshold, g.cluster.as_str()), (8, "prod"));
    }

    #[test]
    fn errors_name_line_and_field() {
        for (text, want) in [
            (
                "key_file = '/k'\n",
                "mesh.toml:2: gossip.advertise: missing",
            ),
            (
                "listen = '0.0.0.0:1'\nkey_file = '/k'\n",
                "mesh.toml:2: gossip.advertise: missing",
            ),
            (
                "advertise = '0.0.0.0:1'\nkey_file = '/k'\n",
                "mesh.toml:2: gossip.advertise: 0.0.0.0:1: peers need a unicast address",
            ),
            (
                "advertise = '10.0.0.x'\nkey_file = '/k'\n",
                "mesh.toml:2: gossip.advertise: \"10.0.0.x\" is not an IP or IP:port",
            ),
            (
                "advertise = '10.0.0.1:1'\nseeds = ['x:1']\nkey_file = '/k'\n",
                "mesh.toml:3: gossip.seeds[0]: \"x:1\" is not an IP or IP:port",
            ),
            (
                "advertise = '10.0.0.1:1'\nkey_file = 'k'\n",
                "mesh.toml:3: gossip.key_file: \"k\" must be an absolute path",
            ),
            (
                "advertise = '10.0.0.1:1'\n",
                "gossip: missing field `key_file`",
            ),
            (
                "advertise = '10.0.0.1:1'\nkey_file = '/k'\ninterval = '5ms'\n",
                "mesh.toml:4: gossip.interval: \"5ms\" is not a duration",
            ),
            (
                "advertise = '10.0.0.1:1'\nkey_file = '/k'\nphi_threshold = 0\n",
                "mesh.toml:4: gossip.phi_threshold: 0 is out of range",
            ),
            (
                "advertise = '10.0.0.1:1'\nkey_file = '/k'\nseed = []\n",
                "mesh.toml:4: gossip.seed: unknown field `seed`",
            ),
        ] {
            let got = parse(text).unwrap_err();
            assert!(got.contains(want), "want {want:?}, got {got:?}");
        }
    }
}
