//! A trust domain's certificate authority: `mesh-agent ca init` makes one, `mesh-agent cert
//! issue` signs workload certificates with it (ECDSA P-256, rcgen). The agent itself only reads
//! what these write ([`crate::tunnel::identity::certs`]).

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::model::identity::{check_trust_domain, SpiffeId};

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
    #[error("the CA names no trust domain (no organization in its subject); was it made by `mesh-agent ca init`?")]
    NoTrustDomain,
    #[error("{id} is outside the CA's trust domain {trust_domain}; the mesh would refuse it, so it is not signed")]
    ForeignTrustDomain { id: String, trust_domain: String },
    #[error("refusing to overwrite {}: every certificate the existing CA issued would stop verifying; pass --force to replace it", path.display())]
    Exists { path: std::path::PathBuf },
    #[error("cannot write {}: {cause}", path.display())]
    Write {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
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
    crate::tunnel::identity::certs::provider()
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

/// The trust domain a CA made by [`init`] is for (its subject's organization).
pub fn trust_domain_of(ca_cert_pem: &str) -> Result<String, CaError> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(ca_cert_pem.as_bytes()).map_err(|_| CaError::Cert {
            cause: rcgen::Error::CouldNotParseCertificate,
        })?;
    let cert = pem.parse_x509().map_err(|_| CaError::Cert {
        cause: rcgen::Error::CouldNotParseCertificate,
    })?;
    let td = cert
        .subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .filter(|td| check_trust_domain(td))
        .ok_or(CaError::NoTrustDomain)?;
    Ok(td.to_owned())
}

/// A new key and a certificate for `id`, signed by the CA (`ca.cert`, `ca.key`); refused for
/// an id outside the CA's trust domain.
pub fn issue(ca: &Pem, id: &SpiffeId, valid_for: Duration) -> Result<Pem, CaError> {
    let trust_domain = trust_domain_of(&ca.cert)?;
    if id.trust_domain() != trust_domain {
        return Err(CaError::ForeignTrustDomain {
            id: id.to_string(),
            trust_domain,
        });
    }
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

/// Whether [`write`] may replace existing files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    Replace,
    Refuse,
}

/// Writes `pem` to `cert` and `key` (the key readable by its owner only). With
/// [`Existing::Refuse`] neither file may exist yet (checked before anything is written).
pub fn write(
    pem: &Pem,
    cert: &std::path::Path,
    key: &std::path::Path,
    existing: Existing,
) -> Result<(), CaError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    if existing == Existing::Refuse {
        if let Some(path) = [cert, key].into_iter().find(|p| p.exists()) {
            return Err(CaError::Exists {
                path: path.to_owned(),
            });
        }
    }
    let open = |path: &std::path::Path, mode: u32| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).mode(mode);
        match existing {
            Existing::Replace => options.create(true).truncate(true),
            // A file that appeared since the check is not overwritten either.
            Existing::Refuse => options.create_new(true),
        };
        options.open(path)
    };
    for (path, text, mode) in [(cert, &pem.cert, 0o644), (key, &pem.key, 0o600)] {
        open(path, mode)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(|cause| CaError::Write {
                path: path.to_owned(),
                cause,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_a_spiffe_certificate() {
        let ca = init("mesh.test", Duration::from_secs(86_400)).unwrap();
        let id: SpiffeId = "spiffe://mesh.test/ns/shop/sa/frontend".parse().unwrap();
        let leaf = issue(&ca, &id, Duration::from_secs(3600)).unwrap();
        let info =
            crate::tunnel::identity::certs::CertInfo::from_pem(&leaf.cert, "leaf.pem").unwrap();
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

    #[test]
    fn an_id_of_another_trust_domain_is_not_signed() {
        let ca = init("mesh.test", Duration::from_secs(86_400)).unwrap();
        assert_eq!(trust_domain_of(&ca.cert).unwrap(), "mesh.test");
        let foreign: SpiffeId = "spiffe://evil.test/ns/shop/sa/frontend".parse().unwrap();
        let err = issue(&ca, &foreign, Duration::from_secs(3600)).unwrap_err();
        assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");
        assert!(err.to_string().contains("mesh.test"), "{err}");
    }

    #[test]
    fn an_existing_ca_is_not_overwritten_without_force() {
        let dir = crate::sys::state_file::ScratchDir::new("ca-overwrite");
        std::fs::create_dir_all(dir.path()).unwrap();
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        let first = init("mesh.test", Duration::from_secs(86_400)).unwrap();
        write(&first, &cert, &key, Existing::Refuse).unwrap();
        let second = init("mesh.test", Duration::from_secs(86_400)).unwrap();
        let err = write(&second, &cert, &key, Existing::Refuse).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), first.cert);
        assert_eq!(std::fs::read_to_string(&key).unwrap(), first.key);
        write(&second, &cert, &key, Existing::Replace).unwrap();
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), second.cert);
    }
}
