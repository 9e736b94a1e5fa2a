//! `mesh-agent check`: whether a config would run, found before `run` is tried. The file
//! parses and validates (with its `file:line: field: cause` errors); with `[mtls]`, every
//! certificate and key it names loads the way the agent loads them (PEM parses, the key
//! matches, the chain verifies against the CA bundle, the SPIFFE ID is the expected one). A
//! VIP that is an address of this host is warned about: the kernel takes every port of a VIP,
//! so connects to its other ports (ssh, a database on 127.0.0.1) would be refused.

use std::{fmt::Write as _, path::Path};

use anyhow::Context as _;

use crate::{
    config::Config,
    health::locality::is_local,
    model::Service,
    tunnel::{identity::certs::Tls, TunnelConfig},
};

/// What `check` found: the report on stdout, the warnings on stderr; an error fails it.
pub struct Checked {
    pub report: String,
    pub warnings: Vec<String>,
}

/// Checks the config at `path`.
pub fn check(path: &Path) -> anyhow::Result<Checked> {
    let config = Config::load(path)?;
    let mut report = format!(
        "{}: ok ({} services)\n",
        path.display(),
        config.services.len()
    );
    if let Some(mtls) = &config.mtls {
        let tls = Tls::load(&TunnelConfig::from(mtls).sources).context("[mtls] credentials")?;
        for cert in &tls.certs {
            let status = cert.status();
            let _ = writeln!(
                report,
                "  certificate {}: {}, serial {}, valid until {} ({} days)",
                status.file, status.identity, status.serial, status.not_after, status.days_left
            );
        }
    }
    Ok(Checked {
        report,
        warnings: vip_warnings(&config.services, &is_local),
    })
}

/// A warning for every service whose VIP is an address of this host (`local`).
fn vip_warnings(services: &[Service], local: &dyn Fn(std::net::IpAddr) -> bool) -> Vec<String> {
    services
        .iter()
        .filter(|s| local(s.vip))
        .map(|s| {
            format!(
                "service {:?}: vip {} is an address of this host; the kernel takes every port \
                 of a VIP, so connects to {} on any port but {} would be refused (ssh, a \
                 database listening there); pick an address no interface has",
                s.name, s.vip, s.vip, s.port
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_files_that_do_not_load_fail_the_check_naming_the_file_once() {
        let file = std::env::temp_dir().join(format!("mesh-check-tls-{}.toml", std::process::id()));
        std::fs::write(
            &file,
            "[mtls]\ntrust_domain = \"example.org\"\nca_bundle = \"/nonexistent/ca.pem\"\n\
             cert = \"/nonexistent/node.pem\"\nkey = \"/nonexistent/node.key\"\n",
        )
        .unwrap();
        let error = check(&file).err().expect("refused");
        let _ = std::fs::remove_file(&file);
        let text = format!("{error:#}");
        assert!(
            text.starts_with("[mtls] credentials: cannot read /nonexistent/ca.pem"),
            "{text}"
        );
        assert_eq!(text.matches("/nonexistent/ca.pem").count(), 1, "{text}");
    }

    #[test]
    fn a_vip_on_a_local_address_is_warned_about() {
        let file = std::env::temp_dir().join(format!("mesh-check-{}.toml", std::process::id()));
        std::fs::write(
            &file,
            "[[services]]\nname = \"web\"\nvip = \"127.0.0.1\"\nport = 80\n\
             backends = [{ address = \"10.0.0.1:8080\" }]\n\n\
             [[services]]\nname = \"api\"\nvip = \"10.96.0.1\"\nport = 80\n\
             backends = [{ address = \"10.0.0.1:8080\" }]\n",
        )
        .unwrap();
        let config = Config::load(&file).unwrap();
        let _ = std::fs::remove_file(&file);
        let warnings = vip_warnings(&config.services, &is_local);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("service \"web\": vip 127.0.0.1 is an address of this host")
        );
    }
}
