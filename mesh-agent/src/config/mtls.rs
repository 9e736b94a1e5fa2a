//! The config of path 2: the `[mtls]` table (trust domain, credentials, ports, the mesh-wide
//! default), `[[mtls.identities]]` (cgroup → SPIFFE identity), each service's `mtls` mode and
//! the `[[policies]]` rules. Checked here with the same `file:line: field: cause` errors as
//! the rest of the file, into the model's [`MtlsSettings`] and [`Policies`].

use std::{collections::HashSet, path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::Source;
use crate::model::{
    identity::{check_trust_domain, SpiffeId},
    policy::{Action, Policies, Principal, Rule},
    settings::{IdentitySettings, MtlsSettings},
    Protocol, Service,
};
use mesh_common::redirect::{DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT};

/// Seconds a pooled tunnel connection lives unused, by default.
pub const DEFAULT_IDLE_TIMEOUT_S: u32 = 60;

/// Threads of the data-plane runtime (tunnel listeners and relays), by default: ztunnel's
/// default too; the control work has a thread of its own besides.
pub const DEFAULT_WORKERS: u32 = 2;

/// `mtls = "off" | "strict"` on a service, and `[mtls] default`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    #[default]
    Off,
    /// Between hosts the flow travels only inside mutual TLS; plaintext openings to the
    /// backends are dropped by the kernel.
    Strict,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMtls {
    trust_domain: Spanned<String>,
    ca_bundle: Spanned<String>,
    cert: Spanned<String>,
    key: Spanned<String>,
    default: Option<Spanned<MtlsMode>>,
    outbound_port: Option<Spanned<i64>>,
    inbound_port: Option<Spanned<i64>>,
    idle_timeout_s: Option<Spanned<i64>>,
    workers: Option<Spanned<i64>>,
    loopback_sockmap: Option<bool>,
    #[serde(default)]
    identities: Vec<Spanned<RawIdentity>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    cgroup: Spanned<String>,
    spiffe_id: Spanned<String>,
    cert: Spanned<String>,
    key: Spanned<String>,
}

/// `action = "allow" | "deny"` as the file spells it.
#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawAction {
    Allow,
    Deny,
}

impl From<RawAction> for Action {
    fn from(raw: RawAction) -> Action {
        match raw {
            RawAction::Allow => Action::Allow,
            RawAction::Deny => Action::Deny,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    service: Spanned<String>,
    port: Option<Spanned<i64>>,
    action: Spanned<RawAction>,
    from: Spanned<Vec<Spanned<String>>>,
}

impl Source<'_> {
    fn path(&self, value: &Spanned<String>, field: &str) -> Result<PathBuf, super::ConfigError> {
        if value.get_ref().trim().is_empty() {
            return Err(self.invalid(value.span(), field, "must name a file"));
        }
        Ok(PathBuf::from(value.get_ref()))
    }

    fn port(
        &self,
        value: Option<Spanned<i64>>,
        field: &str,
        default: u16,
    ) -> Result<u16, super::ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        u16::try_from(*value.get_ref())
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| {
                self.invalid(
                    value.span(),
                    field,
                    format!("{} is not a port number (1..=65535)", value.get_ref()),
                )
            })
    }

    /// A number in `range` (in `unit`s), the default when absent.
    fn number(
        &self,
        value: &Option<Spanned<i64>>,
        field: &str,
        (default, range): (u32, std::ops::Range<u32>),
        unit: &str,
    ) -> Result<u32, super::ConfigError> {
        super::health::number(value, field, range, default, unit)
            .map_err(|bad| self.invalid(bad.span, &bad.field, bad.message))
    }

    pub(super) fn mtls(&self, raw: RawMtls) -> Result<MtlsSettings, super::ConfigError> {
        let trust_domain = raw.trust_domain.get_ref().clone();
        if !check_trust_domain(&trust_domain) {
            return Err(self.invalid(
                raw.trust_domain.span(),
                "mtls.trust_domain",
                format!("{trust_domain:?} is not a trust domain (lowercase letters, digits, '.', '-', '_')"),
            ));
        }
        let outbound_port = self.port(
            raw.outbound_port,
            "mtls.outbound_port",
            DEFAULT_OUTBOUND_PORT,
        )?;
        let inbound_port =
            self.port(raw.inbound_port, "mtls.inbound_port", DEFAULT_INBOUND_PORT)?;
        let idle_timeout_s = self.number(
            &raw.idle_timeout_s,
            "mtls.idle_timeout_s",
            (DEFAULT_IDLE_TIMEOUT_S, 1..86_401),
            " seconds",
        )?;
        let workers = self.number(
            &raw.workers,
            "mtls.workers",
            (DEFAULT_WORKERS, 1..65),
            " threads",
        )?;
        let mut identities = Vec::with_capacity(raw.identities.len());
        let mut cgroups = HashSet::new();
        for (i, raw_id) in raw.identities.into_iter().enumerate() {
            let path = format!("mtls.identities[{i}]");
            let raw_id = raw_id.into_inner();
            let spiffe_id: SpiffeId = raw_id.spiffe_id.get_ref().parse().map_err(|e| {
                self.invalid(
                    raw_id.spiffe_id.span(),
                    format!("{path}.spiffe_id"),
                    format!("{e}"),
                )
            })?;
            if spiffe_id.trust_domain() != trust_domain {
                return Err(self.invalid(
                    raw_id.spiffe_id.span(),
                    format!("{path}.spiffe_id"),
                    format!("{spiffe_id} is not in the trust domain {trust_domain}"),
                ));
            }
            let cgroup = self.path(&raw_id.cgroup, &format!("{path}.cgroup"))?;
            if !cgroups.insert(cgroup.clone()) {
                return Err(self.invalid(
                    raw_id.cgroup.span(),
                    format!("{path}.cgroup"),
                    format!("{} is already mapped to an identity", cgroup.display()),
                ));
            }
            identities.push(IdentitySettings {
                cgroup,
                spiffe_id,
                cert: self.path(&raw_id.cert, &format!("{path}.cert"))?,
                key: self.path(&raw_id.key, &format!("{path}.key"))?,
            });
        }
        Ok(MtlsSettings {
            ca_bundle: self.path(&raw.ca_bundle, "mtls.ca_bundle")?,
            cert: self.path(&raw.cert, "mtls.cert")?,
            key: self.path(&raw.key, "mtls.key")?,
            trust_domain,
            strict_by_default: raw.default.map(Spanned::into_inner) == Some(MtlsMode::Strict),
            outbound_port,
            inbound_port,
            idle_timeout: Duration::from_secs(u64::from(idle_timeout_s)),
            workers,
            loopback_sockmap: raw.loopback_sockmap.unwrap_or(false),
            identities,
        })
    }

    /// Whether a service is strict: its own `mtls`, else the mesh-wide default (which only
    /// applies to TCP services).
    pub(super) fn service_mtls(
        &self,
        path: &str,
        raw: Option<Spanned<MtlsMode>>,
        protocol: Protocol,
        strict_by_default: bool,
    ) -> Result<bool, super::ConfigError> {
        match raw {
            Some(mode) if *mode.get_ref() == MtlsMode::Strict && protocol != Protocol::Tcp => {
                Err(self.invalid(
                    mode.span(),
                    format!("{path}.mtls"),
                    format!("mTLS carries TCP only; this service is {protocol}"),
                ))
            }
            Some(mode) => Ok(*mode.get_ref() == MtlsMode::Strict),
            None => Ok(strict_by_default && protocol == Protocol::Tcp),
        }
    }

    pub(super) fn policies(
        &self,
        raw: Vec<Spanned<RawPolicy>>,
        services: &[Service],
    ) -> Result<Policies, super::ConfigError> {
        let mut rules = Vec::with_capacity(raw.len());
        for (i, raw_rule) in raw.into_iter().enumerate() {
            let path = format!("policies[{i}]");
            let raw_rule = raw_rule.into_inner();
            let name = raw_rule.service.get_ref();
            let Some(service) = services.iter().find(|s| s.name == *name) else {
                return Err(self.invalid(
                    raw_rule.service.span(),
                    format!("{path}.service"),
                    format!("no service is named {name:?}"),
                ));
            };
            if !service.mtls {
                return Err(self.invalid(
                    raw_rule.service.span(),
                    format!("{path}.service"),
                    format!("{name:?} is not an mTLS service (set mtls = \"strict\"); a policy needs the caller's identity"),
                ));
            }
            let port = match raw_rule.port {
                None => None,
                Some(p) => Some(self.port(Some(p), &format!("{path}.port"), 0)?),
            };
            let from_span = raw_rule.from.span();
            let from = raw_rule
                .from
                .into_inner()
                .into_iter()
                .enumerate()
                .map(|(j, entry)| {
                    entry.get_ref().parse::<Principal>().map_err(|e| {
                        self.invalid(entry.span(), format!("{path}.from[{j}]"), e.to_string())
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if from.is_empty() {
                return Err(self.invalid(
                    from_span,
                    format!("{path}.from"),
                    "must list at least one identity, \"ns:<namespace>\" or \"prefix:<spiffe prefix>\"",
                ));
            }
            rules.push(Rule {
                service: name.clone(),
                port,
                action: (*raw_rule.action.get_ref()).into(),
                from,
            });
        }
        Ok(Policies { rules })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};
    use super::*;

    const MTLS: &str = "[mtls]\ntrust_domain = 'mesh.test'\nca_bundle = '/etc/mesh/ca.pem'\ncert = '/etc/mesh/node.pem'\nkey = '/etc/mesh/node-key.pem'\n";
    const PAYMENTS: &str = "[[services]]\nname = 'payments'\nvip = '10.96.0.20'\nport = 443\nmtls = 'strict'\nbackends = [{ address = '10.0.0.5:8443' }]\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "mesh.toml")
    }

    #[test]
    fn parses_mtls_identities_and_policies() {
        let text = format!(
            "{MTLS}default = 'strict'\nidle_timeout_s = 30\n[[mtls.identities]]\ncgroup = 'shop/frontend'\nspiffe_id = 'spiffe://mesh.test/ns/shop/sa/frontend'\ncert = 'f.pem'\nkey = 'f-key.pem'\n\
             {PAYMENTS}[[services]]\nname = 'dns'\nvip = '10.96.0.53'\nport = 53\nprotocol = 'udp'\n\
             [[services]]\nname = 'web'\nvip = '10.96.0.10'\nport = 80\nmtls = 'off'\n\
             [[policies]]\nservice = 'payments'\nport = 443\naction = 'allow'\nfrom = ['spiffe://mesh.test/ns/shop/sa/frontend', 'ns:ops']\n"
        );
        let c = parse(&text).unwrap();
        let mtls = c.mtls.as_ref().unwrap();
        assert!(mtls.strict_by_default);
        assert_eq!(
            (mtls.outbound_port, mtls.inbound_port, mtls.idle_timeout),
            (15001, 15008, Duration::from_secs(30))
        );
        assert_eq!(mtls.identities[0].cgroup, PathBuf::from("shop/frontend"));
        let strict: Vec<bool> = c.services.iter().map(|s| s.mtls).collect();
        // The default covers payments; dns is UDP, web opted out.
        assert_eq!(strict, [true, false, false]);
        assert_eq!(c.policies.rules.len(), 1);
        assert_eq!(c.policies.rules[0].port, Some(443));
        assert!(
            !mtls.loopback_sockmap,
            "the loopback sockmap is off by default"
        );
        let on = parse(&format!("{MTLS}loopback_sockmap = true\n")).unwrap();
        assert!(on.mtls.unwrap().loopback_sockmap);
        assert_eq!(mtls.identities.len(), 1);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let cases: Vec<(String, &str)> = vec![
            (PAYMENTS.to_owned(), "mesh.toml:5: services[0].mtls: service \"payments\" is strict but there is no [mtls] section"),
            (format!("{MTLS}[[services]]\nname = 'dns'\nvip = '10.96.0.53'\nport = 53\nprotocol = 'udp'\nmtls = 'strict'\n"),
             "mesh.toml:11: services[0].mtls: mTLS carries TCP only; this service is udp"),
            (format!("{MTLS}{}", PAYMENTS.replace("'strict'", "'on'")), "mesh.toml:10: services[0].mtls: unknown variant `on`, expected `off` or `strict`"),
            (MTLS.replace("mesh.test", "Mesh"), "mesh.toml:2: mtls.trust_domain: \"Mesh\" is not a trust domain"),
            (format!("{MTLS}inbound_port = 0\n"), "mesh.toml:6: mtls.inbound_port: 0 is not a port number"),
            (format!("{MTLS}idle_timeout_s = 0\n"), "mesh.toml:6: mtls.idle_timeout_s: 0 seconds is out of range"),
            (format!("{MTLS}workers = 65\n"), "mesh.toml:6: mtls.workers: 65 threads is out of range 1..=64"),
            (format!("{MTLS}loopback_sockmap = 'yes'\n"), "mesh.toml:6: mtls.loopback_sockmap: invalid type: string \"yes\", expected a boolean"),
            (format!("{MTLS}[[mtls.identities]]\ncgroup = 'a'\nspiffe_id = 'spiffe://other/ns/a/sa/b'\ncert = 'c'\nkey = 'k'\n"),
             "mesh.toml:8: mtls.identities[0].spiffe_id: spiffe://other/ns/a/sa/b is not in the trust domain mesh.test"),
            (format!("{MTLS}[[mtls.identities]]\ncgroup = 'a'\nspiffe_id = 'spiffe://mesh.test/a'\ncert = 'c'\nkey = 'k'\n"),
             "mesh.toml:8: mtls.identities[0].spiffe_id: \"spiffe://mesh.test/a\": the path must be"),
            (MTLS.replace("'/etc/mesh/node.pem'", "''"), "mesh.toml:4: mtls.cert: must name a file"),
            (format!("{MTLS}{PAYMENTS}[[policies]]\nservice = 'nope'\naction = 'deny'\nfrom = ['ns:a']\n"),
             "mesh.toml:13: policies[0].service: no service is named \"nope\""),
            (format!("{MTLS}{PAYMENTS}[[policies]]\nservice = 'payments'\naction = 'deny'\nfrom = ['ns:a', 'frontend']\n"),
             "mesh.toml:15: policies[0].from[1]: \"frontend\" is not a SPIFFE ID"),
            (format!("{MTLS}{PAYMENTS}[[policies]]\nservice = 'payments'\naction = 'deny'\nfrom = []\n"),
             "mesh.toml:15: policies[0].from: must list at least one"),
            (format!("{MTLS}{PAYMENTS}[[policies]]\nservice = 'payments'\naction = 'permit'\nfrom = ['ns:a']\n"),
             "mesh.toml:14: policies[0].action: unknown variant `permit`"),
            (format!("{MTLS}[[services]]\nname = 'web'\nvip = '10.96.0.10'\nport = 80\n[[policies]]\nservice = 'web'\naction = 'deny'\nfrom = ['ns:a']\n"),
             "policies[0].service: \"web\" is not an mTLS service"),
        ];
        for (text, want) in cases {
            let got = parse(&text).unwrap_err().to_string();
            assert!(
                got.contains(want),
                "\n--- config:\n{text}--- want: {want}\n--- got: {got}"
            );
        }
    }
}
