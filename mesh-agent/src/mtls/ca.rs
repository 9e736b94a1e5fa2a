//! A trust domain's certificate authority: `mesh-agent ca init` makes one, `mesh-agent cert
//! issue` signs workload certificates with it (ECDSA P-256, rcgen). The agent itself only reads
//! what these write ([`super::certs`]).

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::spiffe::{check_trust_domain, SpiffeId};

/// A certificate and its private key, PEM.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// Why a CA or certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0:?} is not a trust domain (lowercase letters, digits, '.', '-', '_')")]
    TrustDomain(String),
    #[error("the CA key is unreadable: {cause}")]
    Key { cause: rcgen::Error },
    #[error("the CA certificate is unreadable: {cause}")]
    Cert { cause: rcgen::Error },
    #[error("the system's random generator failed")]
    Random,
    #[error("cannot make the certificate: {cause}")]
    Sign { cause: rcgen::Error },
}

/// Certificates start being valid a little before now, so a peer whose clock lags accepts them.
const BACKDATE: Duration = Duration::from_secs(300);

fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + valid_for;
}

fn random_serial() -> Result<SerialNumber, CaError> {
    // 16 bytes from the crypto provider's generator, top bit clear: a positive DER integer.
    let mut bytes = [0u8; 16];
    super::certs::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

/// A new self-signed CA for `trust_domain`.
pub fn init(trust_domain: &str, valid_for: Duration) -> Result<Pem, CaError> {
    if !check_trust_domain(trust_domain) {
        return Err(CaError::TrustDomain(trust_domain.to_owned()));
    }
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, trust_domain);
    name.push(DnType::CommonName, format!("mesh CA {trust_domain}"));
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?);
    validity(&mut params, valid_for);
    let key = KeyPair::generate().map_err(|cause| CaError::Sign { cause })?;
    let cert = params
        .self_signed(&key)
        .map_err(|cause| CaError::Sign { cause })?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A new key and a certificate for `id`, signed by the CA (`ca.cert`, `ca.key`).
pub fn issue(ca: &Pem, id: &SpiffeId, valid_for: Duration) -> Result<Pem, CaError> {
    let ca_key = KeyPair::from_pem(&ca.key).map_err(|cause| CaError::Key { cause })?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(|cause| CaError::Cert { cause })?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, id.to_string());
    params.distinguished_name = name;
    let uri = id
        .to_string()
        .try_into()
        .map_err(|cause| CaError::Sign { cause })?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    validity(&mut params, valid_for);
    let key = KeyPair::generate().map_err(|cause| CaError::Sign { cause })?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|cause| CaError::Sign { cause })?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Writes `pem` to `cert` and `key` (the key readable by its owner only).
pub fn write(pem: &Pem, cert: &std::path::Path, key: &std::path::Path) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    std::fs::write(cert, &pem.cert)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(key)?;
    file.write_all(pem.key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_a_spiffe_certificate() {
        let ca = init("mesh.test", Duration::from_secs(86_400)).unwrap();
        let id: SpiffeId = "spiffe://mesh.test/ns/shop/sa/frontend".parse().unwrap();
        let leaf = issue(&ca, &id, Duration::from_secs(3600)).unwrap();
        let info = super::super::certs::CertInfo::from_pem(&leaf.cert, "leaf.pem").unwrap();
        assert_eq!(info.identity, id);
        assert!(info.seconds_left() > 3000 && info.seconds_left() <= 3600);
        assert!(init("Not A Domain", Duration::from_secs(1)).is_err());
        let bad = Pem {
            cert: ca.cert.clone(),
            key: "junk".into(),
        };
        assert!(issue(&bad, &id, Duration::from_secs(1))
            .unwrap_err()
            .to_string()
            .contains("CA key"));
    }
}
