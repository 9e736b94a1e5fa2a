//! The TOML config file: its format, its defaults, and every check made before it is used.
//!
//! This module owns turning text into a [`Config`] of [`model`] values known to fit the kernel maps, or
//! into one [`ConfigError`] that names the file, the line and the field path
//! (`mesh.toml:14: services[1].backends[0].address: "10.0.0.x:80" is not an IP:port`). It does
//! not resolve the node name from the host, compute slot tables or touch the kernel; a config
//! that passes here always fits the maps. It speaks [`crate::model`]'s types and imports
//! nothing else of the crate (but the tunnel's policy and SPIFFE types, see `mtls.rs`).
//!
//! Parsing goes through serde with `deny_unknown_fields` (so a misspelt key is an error, not a
//! silently ignored line) and keeps each value's byte span with [`toml::Spanned`], so checks
//! made after parsing can point at the line too. Errors raised by serde itself carry a span but
//! no field path; the path is recovered by finding that span in the document tree.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use mesh_common::maps;
use serde::{Deserialize, Deserializer};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::model::limits::{self, DEFAULT_AFFINITY_TIMEOUT_S};
use crate::model::settings::GossipSettings;
use crate::model::{rules, Affinity, Backend, LbPolicy, Protocol, Service};

pub mod gossip;
pub mod health;
mod mtls;

/// A validated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The `[node]` table.
    pub node: NodeConfig,
    /// The `[[services]]`, in file order; names and (VIP, port, protocol) are unique.
    pub services: Vec<Service>,
    /// The `[gossip]` table; `None`: single-host mode.
    pub gossip: Option<GossipSettings>,
    /// The `[mtls]` table; without it no service is strict and the tunnel is off.
    pub mtls: Option<crate::model::settings::MtlsSettings>,
    /// The `[[policies]]`, in file order; each names a strict service.
    pub policies: crate::model::policy::Policies,
}

/// The `[node]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node's name, if the file sets one. The command line's `--node` overrides it, and
    /// without either the agent uses the host name.
    pub name: Option<String>,
}

/// `protocol = "tcp" | "udp"`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawProtocol {
    #[default]
    Tcp,
    Udp,
}

impl From<RawProtocol> for Protocol {
    fn from(raw: RawProtocol) -> Protocol {
        match raw {
            RawProtocol::Tcp => Protocol::Tcp,
            RawProtocol::Udp => Protocol::Udp,
        }
    }
}

/// `lb = "random" | "weighted" | "maglev"`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawLbPolicy {
    Random,
    Weighted,
    Maglev,
}

impl From<RawLbPolicy> for LbPolicy {
    fn from(raw: RawLbPolicy) -> LbPolicy {
        match raw {
            RawLbPolicy::Random => LbPolicy::Random,
            RawLbPolicy::Weighted => LbPolicy::Weighted,
            RawLbPolicy::Maglev => LbPolicy::Maglev,
        }
    }
}

/// `affinity = false | true | "cgroup" | "netns"`: which client keeps its backend.
#[derive(Debug, Clone, Copy)]
struct RawAffinity(Affinity);

const AFFINITY_EXPECTED: &str = r#"false, true, "cgroup" or "netns""#;

impl<'de> Deserialize<'de> for RawAffinity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawAffinity;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(AFFINITY_EXPECTED)
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawAffinity, E> {
                Ok(RawAffinity(if v {
                    Affinity::Cgroup
                } else {
                    Affinity::None
                }))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawAffinity, E> {
                match v {
                    "cgroup" => Ok(RawAffinity(Affinity::Cgroup)),
                    "netns" => Ok(RawAffinity(Affinity::Netns)),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Why a config was refused. Each displays as one line naming the file and, where there is
/// one, the line and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The cause is the `source` (shown by `{:#}` and error chains).
    #[error("cannot read config {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML.
    #[error("{origin}:{line}:{column}: {message}")]
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// The TOML is well formed but a value is wrong, missing, unknown or too much.
    #[error("{origin}:{line}: {field}: {message}")]
    Invalid {
        origin: String,
        line: usize,
        /// Path of the offending field, e.g. `services[1].backends[0].address`.
        field: String,
        message: String,
    },
}

impl Config {
    /// Read and validate the config at `path`; errors name the file as given.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parse and validate `text`; `origin` names it in errors (a path, or `<embedded>`).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let src = Source::new(text, origin);
        let raw: RawConfig = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
        src.validate(raw)
    }
}

// ---------------------------------------------------------------------------------------------
// The file as serde sees it.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: Option<RawNode>,
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
    gossip: Option<gossip::RawGossip>,
    mtls: Option<mtls::RawMtls>,
    #[serde(default)]
    policies: Vec<Spanned<mtls::RawPolicy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    vip: Spanned<String>,
    port: Spanned<i64>,
    protocol: Option<Spanned<RawProtocol>>,
    lb: Option<Spanned<RawLbPolicy>>,
    affinity: Option<Spanned<RawAffinity>>,
    affinity_timeout: Option<Spanned<i64>>,
    backends: Option<Spanned<Vec<Spanned<RawBackend>>>>,
    health: Option<Spanned<health::RawHealth>>,
    outlier: Option<Spanned<health::RawOutlier>>,
    locality: Option<Spanned<health::RawLocality>>,
    mtls: Option<Spanned<mtls::MtlsMode>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    weight: Option<Spanned<i64>>,
}

// ---------------------------------------------------------------------------------------------
// Validation.

struct Source<'a> {
    text: &'a str,
    origin: &'a str,
    /// Byte offset of the start of each line (a large file has many errors' worth of lookups).
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    fn new(text: &'a str, origin: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Source {
            text,
            origin,
            line_starts,
        }
    }

    /// 1-based line and column of byte `offset`.
    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        // The line of `offset` is the number of line starts at or before it (at least 1: 0).
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let start = self
            .line_starts
            .get(line.saturating_sub(1))
            .copied()
            .unwrap_or(0);
        (line, offset - start + 1)
    }

    fn invalid(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            line: self.position(span.start).0,
            field: field.into(),
            message: message.into(),
        }
    }

    /// A parse or serde error, with the field path recovered from its span where possible.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let span = e.span().unwrap_or(0..0);
        let message = e.message().trim_end().to_owned();
        match locate(self.text, &span) {
            Some(field) if !field.is_empty() => self.invalid(span, field, message),
            _ => {
                let (line, column) = self.position(span.start);
                ConfigError::Syntax {
                    origin: self.origin.to_owned(),
                    line,
                    column,
                    message,
                }
            }
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let mut node = NodeConfig::default();
        if let Some(name) = raw.node.and_then(|n| n.name) {
            rules::node_name(name.get_ref())
                .map_err(|m| self.invalid(name.span(), "node.name", m.to_string()))?;
            node.name = Some(name.into_inner());
        }

        let gossip = raw.gossip.map(|g| self.gossip(g)).transpose()?;
        let mtls = raw.mtls.map(|m| self.mtls(m)).transpose()?;
        let strict_by_default = mtls.as_ref().is_some_and(|m| m.strict_by_default);
        let mut services = Vec::with_capacity(raw.services.len());
        // name → (index, line); (vip, port, protocol) → (index, line)
        let mut names: HashMap<String, (usize, usize)> = HashMap::new();
        let mut frontends: HashMap<(IpAddr, u16, Protocol), (usize, usize)> = HashMap::new();
        let mut vips: HashSet<IpAddr> = HashSet::new();
        let (mut backends_total, mut slots_total) = (0usize, 0usize);
        let services_max = maps::SERVICES_MAX as usize;
        let backends_max = maps::BACKENDS_MAX as usize;
        let slots_max = (maps::SLOTS_MAX / 2) as usize;

        for (i, raw_svc) in raw.services.into_iter().enumerate() {
            let path = format!("services[{i}]");
            let svc_span = raw_svc.span();
            let svc = self.service(&path, raw_svc.into_inner(), strict_by_default)?;
            if let (true, None, Some(span)) = (svc.config.mtls, &mtls, &svc.mtls_span) {
                return Err(self.invalid(
                    span.clone(),
                    format!("{path}.mtls"),
                    format!(
                        "service {:?} is strict but there is no [mtls] section",
                        svc.config.name
                    ),
                ));
            }

            let line = self.position(svc.name_span.start).0;
            if let Some((j, other_line)) = names.insert(svc.config.name.clone(), (i, line)) {
                return Err(self.invalid(
                    svc.name_span,
                    format!("{path}.name"),
                    format!(
                        "{:?} is already the name of services[{j}] (line {other_line})",
                        svc.config.name
                    ),
                ));
            }
            let c = &svc.config;
            let frontend = (c.vip, c.port, c.protocol);
            if let Some((j, other_line)) = frontends.insert(frontend, (i, line)) {
                return Err(self.invalid(
                    svc.vip_span,
                    path,
                    format!(
                        "{}/{} is already served by services[{j}] {:?} (line {other_line})",
                        SocketAddr::new(c.vip, c.port),
                        c.protocol,
                        services.get(j).map_or("", |s: &Service| s.name.as_str()),
                    ),
                ));
            }

            // Capacity: checked as we go, so the error points at the first service that does
            // not fit.
            vips.insert(c.vip);
            if services.len() + 1 + vips.len() > services_max {
                return Err(self.invalid(
                    svc_span,
                    path,
                    format!(
                        "too many services: {} services and {} VIP markers exceed the {} entries of {}",
                        services.len() + 1,
                        vips.len(),
                        services_max,
                        maps::SERVICES
                    ),
                ));
            }
            let active = c.backends.iter().filter(|b| b.weight > 0).count();
            backends_total += active;
            if backends_total > backends_max {
                return Err(self.invalid(
                    svc.backends_span.clone(),
                    format!("{path}.backends"),
                    format!(
                        "too many backends: {backends_total} backends with nonzero weight in services[0..={i}] exceed the {backends_max} entries of {}",
                        maps::BACKENDS
                    ),
                ));
            }
            slots_total += limits::slot_count(c.lb, c.backends.iter().map(|b| b.weight));
            if slots_total > slots_max {
                return Err(self.invalid(
                    svc.backends_span,
                    format!("{path}.backends"),
                    format!(
                        "too many slots: the tables of services[0..={i}] need {slots_total} entries, more than {slots_max} \
                         (half of {}'s {}, since an update holds two generations)",
                        maps::SLOTS,
                        maps::SLOTS_MAX
                    ),
                ));
            }
            services.push(svc.config);
        }
        let policies = self.policies(raw.policies, &services)?;
        Ok(Config {
            node,
            services,
            gossip,
            mtls,
            policies,
        })
    }

    fn service(
        &self,
        path: &str,
        raw: RawService,
        strict_by_default: bool,
    ) -> Result<CheckedService, ConfigError> {
        rules::service_name(raw.name.get_ref())
            .map_err(|m| self.invalid(raw.name.span(), format!("{path}.name"), m.to_string()))?;

        let vip_field = format!("{path}.vip");
        let vip: IpAddr = raw.vip.get_ref().trim().parse().map_err(|_| {
            self.invalid(
                raw.vip.span(),
                &vip_field,
                format!("{:?} is not an IP address", raw.vip.get_ref()),
            )
        })?;
        rules::vip(vip).map_err(|e| self.invalid(raw.vip.span(), vip_field, e.to_string()))?;

        let port = *raw.port.get_ref();
        let port = u16::try_from(port)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| {
                self.invalid(
                    raw.port.span(),
                    format!("{path}.port"),
                    format!("{port} is not a port number (1..=65535)"),
                )
            })?;

        let protocol: Protocol = raw
            .protocol
            .map(Spanned::into_inner)
            .unwrap_or_default()
            .into();
        let mtls_span = raw.mtls.as_ref().map(Spanned::span);
        let mtls = self.service_mtls(path, raw.mtls, protocol, strict_by_default)?;
        let (lb, lb_span) = match raw.lb {
            Some(lb) => (LbPolicy::from(*lb.get_ref()), lb.span()),
            None => (LbPolicy::default(), raw.name.span()),
        };
        let affinity = raw.affinity.map_or(Affinity::None, |a| a.get_ref().0);
        let affinity_timeout_s = match raw.affinity_timeout {
            None => DEFAULT_AFFINITY_TIMEOUT_S,
            Some(t) => rules::affinity_timeout(*t.get_ref()).map_err(|e| {
                self.invalid(t.span(), format!("{path}.affinity_timeout"), e.to_string())
            })?,
        };

        let (raw_backends, backends_span) = match raw.backends {
            Some(b) => {
                let span = b.span();
                (b.into_inner(), span)
            }
            None => (Vec::new(), raw.name.span()),
        };
        let mut backends: Vec<Backend> = Vec::with_capacity(raw_backends.len());
        let mut seen: HashMap<SocketAddr, usize> = HashMap::with_capacity(raw_backends.len());
        for (j, raw_be) in raw_backends.into_iter().enumerate() {
            let be_path = format!("{path}.backends[{j}]");
            let raw_be = raw_be.into_inner();
            let addr_field = format!("{be_path}.address");
            let text = raw_be.address.get_ref();
            let span = raw_be.address.span();
            let address: SocketAddr = text.trim().parse().map_err(|_| {
                let hint = if let Ok(ip) = text.trim().parse::<IpAddr>() {
                    if ip.is_ipv6() {
                        " (the port is missing; write IPv6 as [address]:port)"
                    } else {
                        " (the port is missing)"
                    }
                } else if text.matches(':').count() > 1 && !text.starts_with('[') {
                    " (write IPv6 as [address]:port)"
                } else {
                    ""
                };
                self.invalid(
                    span.clone(),
                    &addr_field,
                    format!("{text:?} is not an IP:port{hint}"),
                )
            })?;
            rules::backend_address(address, vip)
                .map_err(|e| self.invalid(span.clone(), &addr_field, e.to_string()))?;
            if let Some(k) = seen.insert(address, j) {
                return Err(self.invalid(
                    span,
                    addr_field,
                    format!("{address} is already listed as {path}.backends[{k}]"),
                ));
            }
            let weight = match raw_be.weight {
                None => 1,
                Some(w) => rules::weight(*w.get_ref()).map_err(|e| {
                    self.invalid(w.span(), format!("{be_path}.weight"), e.to_string())
                })?,
            };
            backends.push(Backend { address, weight });
        }

        let active = backends.iter().filter(|b| b.weight > 0).count();
        rules::backend_limit(lb, active)
            .map_err(|e| self.invalid(lb_span, format!("{path}.lb"), e.to_string()))?;

        let health = health::settings(
            health::RawSettings {
                health: raw.health,
                outlier: raw.outlier,
                locality: raw.locality,
            },
            protocol,
        )
        .map_err(|e| self.invalid(e.span, format!("{path}.{}", e.field), e.message))?;

        Ok(CheckedService {
            mtls_span,
            name_span: raw.name.span(),
            vip_span: raw.vip.span(),
            backends_span,
            config: Service {
                name: raw.name.into_inner(),
                vip,
                port,
                protocol,
                lb,
                affinity,
                affinity_timeout_s,
                backends,
                health,
                mtls,
            },
        })
    }
}

struct CheckedService {
    /// Where `mtls` was set, if it was.
    mtls_span: Option<Range<usize>>,
    name_span: Range<usize>,
    vip_span: Range<usize>,
    backends_span: Range<usize>,
    config: Service,
}

// ---------------------------------------------------------------------------------------------
// Span → field path.

/// The path (`services[1].backends[0].weight`) of the deepest key or value whose span covers
/// `span`, or `None` when the text does not parse as a table.
fn locate(text: &str, span: &Range<usize>) -> Option<String> {
    let root = DeTable::parse(text).ok()?;
    let mut path = String::new();
    locate_in_table(root.get_ref(), span, &mut path).then_some(path)
}

fn covers(outer: Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end && outer.start < outer.end
}

fn locate_in_table(table: &DeTable<'_>, span: &Range<usize>, path: &mut String) -> bool {
    for (key, value) in table.iter() {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key.get_ref());
        // Children first: the tables of `[[services]]` do not necessarily span their keys.
        if locate_in_value(value.get_ref(), span, path)
            || covers(key.span(), span)
            || covers(value.span(), span)
        {
            return true;
        }
        path.truncate(len);
    }
    false
}

fn locate_in_value(value: &DeValue<'_>, span: &Range<usize>, path: &mut String) -> bool {
    match value {
        DeValue::Table(table) => locate_in_table(table, span, path),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                if locate_in_value(item.get_ref(), span, path) || covers(item.span(), span) {
                    return true;
                }
                path.truncate(len);
            }
            false
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "mesh.toml")
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    const WEB: &str = r#"
[node]
name = "node-a"

[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
lb = "maglev"
affinity = "netns"
affinity_timeout = 60
backends = [
  { address = "10.200.0.2:8080", weight = 1 },
  { address = "10.200.0.3:8080", weight = 0 },
]

[[services]]
name = "dns"
vip = "10.96.0.53"
port = 53
protocol = "udp"
backends = [{ address = "10.200.0.4:5353" }]
"#;

    #[test]
    fn parses_and_defaults() {
        let c = parse(WEB).unwrap();
        assert_eq!(c.node.name.as_deref(), Some("node-a"));
        let web = &c.services[0];
        assert_eq!(web.lb, LbPolicy::Maglev);
        assert_eq!(web.affinity, Affinity::Netns);
        assert_eq!(web.affinity_timeout_s, 60);
        assert_eq!(web.backends[1].weight, 0);
        let dns = &c.services[1];
        assert_eq!(dns.protocol, Protocol::Udp);
        assert_eq!(dns.lb, LbPolicy::Random);
        assert_eq!(dns.affinity, Affinity::None);
        assert_eq!(dns.affinity_timeout_s, DEFAULT_AFFINITY_TIMEOUT_S);
        assert_eq!(dns.backends[0].weight, 1);
    }

    #[test]
    fn empty_and_backendless_are_valid() {
        assert_eq!(parse("").unwrap().services.len(), 0);
        let c = parse("[[services]]\nname='a'\nvip='10.0.0.1'\nport=1\nbackends=[]\n").unwrap();
        assert!(c.services[0].backends.is_empty());
        let c = parse("[[services]]\nname='a'\nvip='fd00::1'\nport=1\n").unwrap();
        assert!(c.services[0].backends.is_empty());
        assert_eq!(c.node.name, None);
    }

    #[test]
    fn affinity_forms() {
        for (text, want) in [
            ("false", Affinity::None),
            ("true", Affinity::Cgroup),
            ("'cgroup'", Affinity::Cgroup),
            ("'netns'", Affinity::Netns),
        ] {
            let c = parse(&format!(
                "[[services]]\nname='a'\nvip='10.0.0.1'\nport=1\naffinity={text}\n"
            ))
            .unwrap();
            assert_eq!(c.services[0].affinity, want, "{text}");
        }
        let e = error("[[services]]\nname='a'\nvip='10.0.0.1'\nport=1\naffinity='pod'\n");
        assert!(e.starts_with("mesh.toml:5: services[0].affinity: "), "{e}");
        assert!(e.contains("\"netns\""), "{e}");
        let e = error("[[services]]\nname='a'\nvip='10.0.0.1'\nport=1\naffinity=1\n");
        assert!(e.starts_with("mesh.toml:5: services[0].affinity: "), "{e}");
    }

    /// The one-line message of each mistake: file, line, field path, cause.
    #[test]
    fn errors_name_file_line_and_field() {
        let svc = "[[services]]\nname = 'web'\nvip = '10.96.0.10'\nport = 80\n";
        let cases: &[(&str, &str)] = &[
            (
                "[[services]]\nname = 'web'\nvip = '10.96.0.10'\nport = 80\nbackends = [\n  { address = '10.0.0.2:80' },\n  { address = '10.0.0.x:80' },\n]\n",
                r#"mesh.toml:7: services[0].backends[1].address: "10.0.0.x:80" is not an IP:port"#,
            ),
            (
                &format!("{svc}backends = [{{ address = '10.0.0.2:80', weigth = 2 }}]\n"),
                "mesh.toml:5: services[0].backends[0].weigth: unknown field `weigth`, expected `address` or `weight`",
            ),
            (
                &format!("{svc}prot = 'udp'\n"),
                "mesh.toml:5: services[0].prot: unknown field `prot`",
            ),
            (
                "[[services]]\nname = 'web'\nport = 80\n",
                "mesh.toml:1: services[0]: missing field `vip`",
            ),
            (
                "[[services]]\nname = 'web'\nvip = '10.96.0.10'\nport = '80'\n",
                "mesh.toml:4: services[0].port: invalid type: string \"80\"",
            ),
            (
                "[[services]]\nname = 'web'\nvip = '10.96.0.10'\nport = 70000\n",
                "mesh.toml:4: services[0].port: 70000 is not a port number (1..=65535)",
            ),
            (
                "[[services]]\nname = 'web'\nvip = '10.96.0.10'\nport = 0\n",
                "mesh.toml:4: services[0].port: 0 is not a port number",
            ),
            (
                &format!("{svc}protocol = 'sctp'\n"),
                "mesh.toml:5: services[0].protocol: unknown variant `sctp`, expected `tcp` or `udp`",
            ),
            (
                &format!("{svc}lb = 'roundrobin'\n"),
                "mesh.toml:5: services[0].lb: unknown variant `roundrobin`",
            ),
            (
                &format!("{svc}affinity_timeout = 0\n"),
                "mesh.toml:5: services[0].affinity_timeout: 0 seconds is out of range 1..=604800",
            ),
            (
                &format!("{svc}affinity_timeout = 604801\n"),
                "mesh.toml:5: services[0].affinity_timeout: 604801 seconds",
            ),
            (
                "[[services]]\nname = 'Web_1'\nvip = '10.96.0.10'\nport = 80\n",
                "mesh.toml:2: services[0].name: \"Web_1\" contains 'W'",
            ),
            (
                "[[services]]\nname = ''\nvip = '10.96.0.10'\nport = 80\n",
                "mesh.toml:2: services[0].name: must not be empty",
            ),
            (
                "[[services]]\nname = 'web-'\nvip = '10.96.0.10'\nport = 80\n",
                "mesh.toml:2: services[0].name: \"web-\" must start and end",
            ),
            (
                "[[services]]\nname = 'web'\nvip = '10.96.0'\nport = 80\n",
                "mesh.toml:3: services[0].vip: \"10.96.0\" is not an IP address",
            ),
            (
                "[[services]]\nname = 'web'\nvip = '0.0.0.0'\nport = 80\n",
                "mesh.toml:3: services[0].vip: 0.0.0.0 cannot be a VIP",
            ),
            (
                "[[services]]\nname = 'web'\nvip = '224.0.0.1'\nport = 80\n",
                "mesh.toml:3: services[0].vip: 224.0.0.1 cannot be a VIP",
            ),
            (
                "[[services]]\nname = 'web'\nvip = 'ff02::1'\nport = 80\n",
                "mesh.toml:3: services[0].vip: ff02::1 cannot be a VIP",
            ),
            (
                &format!("{svc}backends = [{{ address = '10.0.0.2:0' }}]\n"),
                "mesh.toml:5: services[0].backends[0].address: 10.0.0.2:0: port 0",
            ),
            (
                &format!("{svc}backends = [{{ address = '10.0.0.2' }}]\n"),
                "mesh.toml:5: services[0].backends[0].address: \"10.0.0.2\" is not an IP:port (the port is missing)",
            ),
            (
                &format!("{svc}backends = [{{ address = 'fd00::2:80' }}]\n"),
                "mesh.toml:5: services[0].backends[0].address: \"fd00::2:80\" is not an IP:port (the port is missing; write IPv6 as [address]:port)",
            ),
            (
                &format!("{svc}backends = [{{ address = '[fd00::2]:80' }}]\n"),
                "mesh.toml:5: services[0].backends[0].address: [fd00::2]:80 is IPv6 but the VIP 10.96.0.10 is IPv4",
            ),
            (
                &format!("{svc}backends = [{{ address = '0.0.0.0:80' }}]\n"),
                "services[0].backends[0].address: 0.0.0.0:80: a backend needs a unicast address",
            ),
            (
                &format!("{svc}backends = [\n{{ address = '10.0.0.2:80' }},\n{{ address = '10.0.0.2:80' }}]\n"),
                "mesh.toml:7: services[0].backends[1].address: 10.0.0.2:80 is already listed as services[0].backends[0]",
            ),
            (
                &format!("{svc}backends = [{{ address = '10.0.0.2:80', weight = 10001 }}]\n"),
                "mesh.toml:5: services[0].backends[0].weight: 10001 is out of range 0..=10000",
            ),
            (
                &format!("{svc}backends = [{{ address = '10.0.0.2:80', weight = -1 }}]\n"),
                "mesh.toml:5: services[0].backends[0].weight: -1 is out of range",
            ),
            (
                &format!("{svc}[[services]]\nname = 'web'\nvip = '10.96.0.11'\nport = 80\n"),
                "mesh.toml:6: services[1].name: \"web\" is already the name of services[0] (line 2)",
            ),
            (
                &format!("{svc}[[services]]\nname = 'web2'\nvip = '10.96.0.10'\nport = 80\nprotocol = 'tcp'\n"),
                "mesh.toml:7: services[1]: 10.96.0.10:80/tcp is already served by services[0] \"web\" (line 2)",
            ),
            (
                "[node]\nname = '../etc'\n",
                "mesh.toml:2: node.name: \"../etc\" must not start with '.' or '-'",
            ),
            (
                "[node]\nnmae = 'a'\n",
                "mesh.toml:2: node.nmae: unknown field `nmae`, expected `name`",
            ),
            (
                "[[service]]\nname = 'a'\n",
                "mesh.toml:1: service[0]: unknown field `service`, expected one of `node`, `services`, `gossip`, `mtls`, `policies`",
            ),
            ("[[services]\nname = 'a'\n", "mesh.toml:1:12: "),
            ("[[services]]\nname = 'a\n", "mesh.toml:2:"),
        ];
        for (text, want) in cases {
            let got = error(text);
            assert!(
                got.contains(want),
                "\n--- config:\n{text}--- want (substring): {want}\n--- got: {got}"
            );
            assert!(!got.contains('\n'), "not one line: {got}");
        }
        let e = parse("[[services]]\nname = 'web'\nvip = '10.96.0.10'\nport = 0\n").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Invalid { line: 4, field, .. } if field == "services[0].port"),
            "{e:?}"
        );
    }

    #[test]
    fn a_udp_service_may_share_vip_and_port_with_a_tcp_one() {
        let c = parse("[[services]]\nname='a'\nvip='10.0.0.1'\nport=53\n[[services]]\nname='b'\nvip='10.0.0.1'\nport=53\nprotocol='udp'\n").unwrap();
        assert_eq!(c.services.len(), 2);
    }

    #[test]
    fn maglev_and_weighted_backend_limits() {
        let backends = |n: usize| {
            (0..n)
                .map(|i| {
                    format!(
                        "{{ address = '10.{}.{}.{}:80' }}",
                        i >> 16,
                        (i >> 8) & 255,
                        i & 255
                    )
                })
                .collect::<Vec<_>>()
                .join(",\n")
        };
        let svc = |lb: &str, n: usize| {
            format!(
                "[[services]]\nname='a'\nvip='10.96.0.1'\nport=1\nlb='{lb}'\nbackends=[\n{}]\n",
                backends(n)
            )
        };
        parse(&svc("maglev", limits::MAGLEV_MAX_BACKENDS)).unwrap();
        let e = error(&svc("maglev", limits::MAGLEV_MAX_BACKENDS + 1));
        assert!(
            e.starts_with(
                "mesh.toml:5: services[0].lb: 6553 backends with nonzero weight exceed the 6552"
            ),
            "{e}"
        );
        parse(&svc("weighted", limits::WEIGHTED_MAX_SLOTS)).unwrap();
        let e = error(&svc("weighted", limits::WEIGHTED_MAX_SLOTS + 1));
        assert!(
            e.contains("exceed the 1021 that lb = \"weighted\" supports"),
            "{e}"
        );
        parse(&svc("random", 20_000)).unwrap();
    }

    #[test]
    fn slot_capacity_is_half_the_map() {
        // 2089 Maglev services with one backend need 251 slots each: 524,339 > 524,288.
        let mut text = String::new();
        for i in 0..2089 {
            text.push_str(&format!(
                "[[services]]\nname='s{i}'\nvip='10.96.{}.{}'\nport=80\nlb='maglev'\nbackends=[{{ address='10.0.0.1:80' }}]\n",
                i / 250,
                i % 250 + 1
            ));
        }
        let e = error(&text);
        assert!(e.contains("services[2088].backends: too many slots: the tables of services[0..=2088] need 524339 entries, more than 524288"), "{e}");
    }

    #[test]
    fn service_capacity_counts_vip_markers() {
        let mut text = String::new();
        // Every service on its own VIP: each takes two frontend entries.
        let n = maps::SERVICES_MAX as usize / 2 + 1;
        for i in 0..n {
            text.push_str(&format!(
                "[[services]]\nname='s{i}'\nvip='10.{}.{}.{}'\nport=80\n",
                i >> 16,
                (i >> 8) & 255,
                i & 255
            ));
        }
        let e = error(&text);
        assert!(e.contains(&format!("services[{}]: too many services: {n} services and {n} VIP markers exceed the 65536 entries of MESH_SVC_V1", n - 1)), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let e = Config::load(Path::new("/nonexistent/mesh.toml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read config /nonexistent/mesh.toml"),
            "{e}"
        );
    }

    #[test]
    fn shipped_config_is_valid() {
        let text = include_str!("../../../config/mesh.toml");
        let c = Config::parse(text, "config/mesh.toml").unwrap();
        assert_eq!(c.node.name, None);
        let names: Vec<&str> = c.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web", "dns"]);
        for s in &c.services {
            assert!(s.vip.is_ipv4());
            assert!(s.backends.iter().all(|b| b.address.ip().is_loopback()));
        }
    }
}
