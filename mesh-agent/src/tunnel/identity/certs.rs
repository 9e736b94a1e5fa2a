//! The agent's credentials: the trust domain's CA bundle and the certificates and keys of the
//! node and of each configured workload identity, read from PEM files, turned into rustls
//! configs, and replaced as a whole when the files change (a bad set of files is refused and
//! the last good one stays). Sessions already established keep the credentials they started
//! with; only new handshakes use the new ones.
//!
//! Peers are checked in both directions by chain (webpki, against the bundle) and by their
//! SPIFFE ID: a certificate without one, or of another trust domain, is refused.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ParsedCertificate, WebPkiClientVerifier,
    },
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

use crate::model::identity::{SpiffeError, SpiffeId};

/// The one crypto provider of the tunnel.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The ALPN protocol of the tunnel.
const ALPN_H2: &[u8] = b"h2";

/// Why credentials could not be loaded; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {}: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{}: no PEM certificate in the file", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: not a PEM private key: {cause}", path.display())]
    Key {
        path: PathBuf,
        cause: rustls::pki_types::pem::Error,
    },
    #[error("{}: {cause}", path.display())]
    Pem {
        path: PathBuf,
        cause: rustls::pki_types::pem::Error,
    },
    #[error("{path}: not an X.509 certificate: {cause}")]
    Parse { path: String, cause: String },
    #[error("{path}: the certificate has no spiffe:// URI SAN")]
    NoIdentity { path: String },
    #[error("{path}: {cause}")]
    Identity { path: String, cause: SpiffeError },
    #[error("{}: the certificate is for {found}, the config says {expected}", path.display())]
    WrongIdentity {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{}: {id} is not in the trust domain {trust_domain}", path.display())]
    WrongTrustDomain {
        path: PathBuf,
        id: String,
        trust_domain: String,
    },
    #[error("{}: the certificate expired at {not_after}", path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error("{}: the certificate is not signed by the CA bundle {}: {cause}", path.display(), bundle.display())]
    Untrusted {
        path: PathBuf,
        bundle: PathBuf,
        cause: rustls::Error,
    },
    #[error("{}: the CA bundle is unusable: {cause}", path.display())]
    Bundle { path: PathBuf, cause: String },
    #[error("{}: the key does not fit the certificate {}: {cause}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        cause: rustls::Error,
    },
    #[error("cannot build the TLS config: {cause}")]
    Tls { cause: rustls::Error },
}

/// What the agent shows of one loaded certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: SpiffeId,
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub not_after: OffsetDateTime,
    /// The file it came from.
    pub file: String,
}

impl CertInfo {
    /// Reads identity, serial and expiry from a DER certificate; `origin` names it in errors.
    pub fn from_der(der: &[u8], origin: &str) -> Result<CertInfo, CertError> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| {
            CertError::Parse {
                path: origin.to_owned(),
                cause: e.to_string(),
            }
        })?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| CertError::Parse {
                path: origin.to_owned(),
                cause: e.to_string(),
            })?;
        let uri = san
            .into_iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .find_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                _ => None,
            })
            .ok_or_else(|| CertError::NoIdentity {
                path: origin.to_owned(),
            })?;
        let identity = uri.parse().map_err(|cause| CertError::Identity {
            path: origin.to_owned(),
            cause,
        })?;
        Ok(CertInfo {
            identity,
            serial: cert.raw_serial_as_string().replace(':', ""),
            not_after: cert.validity().not_after.to_datetime(),
            file: origin.to_owned(),
        })
    }

    /// The first certificate of a PEM text.
    #[cfg(test)]
    pub fn from_pem(pem: &str, origin: &str) -> Result<CertInfo, CertError> {
        let der = CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .ok_or_else(|| CertError::NoCertificate {
                path: origin.into(),
            })?
            .map_err(|cause| CertError::Pem {
                path: origin.into(),
                cause,
            })?;
        CertInfo::from_der(&der, origin)
    }

    /// Seconds until it expires (negative once expired).
    pub fn seconds_left(&self) -> i64 {
        (self.not_after - OffsetDateTime::now_utc()).whole_seconds()
    }

    pub fn status(&self) -> CertStatus {
        CertStatus {
            identity: self.identity.to_string(),
            serial: self.serial.clone(),
            not_after: self
                .not_after
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            days_left: self.seconds_left().div_euclid(86_400),
            file: self.file.clone(),
        }
    }
}

/// One certificate as `mesh-agent certs` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CertStatus {
    pub identity: String,
    pub serial: String,
    /// RFC 3339.
    pub not_after: String,
    pub days_left: i64,
    pub file: String,
}

/// A certificate and key file pair, and the identity the config expects in it (`None` for the
/// node's, whose certificate says who the node is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityFiles {
    pub expected: Option<SpiffeId>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where the credentials come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sources {
    pub trust_domain: String,
    pub ca_bundle: PathBuf,
    pub node: IdentityFiles,
    pub workloads: Vec<IdentityFiles>,
}

impl Sources {
    /// Every file read, for the watcher.
    pub fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.ca_bundle.as_path()];
        for identity in std::iter::once(&self.node).chain(&self.workloads) {
            files.push(&identity.cert);
            files.push(&identity.key);
        }
        files
    }
}

/// One consistent set of loaded credentials.
pub struct Tls {
    /// The inbound listener's config (the node's certificate, client certificates required).
    pub server: Arc<ServerConfig>,
    clients: HashMap<SpiffeId, Arc<ClientConfig>>,
    pub node: SpiffeId,
    /// Node first, then workloads in config order.
    pub certs: Vec<CertInfo>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("certs", &self.certs)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// The client config presenting `id`, if the agent holds a certificate for it.
    pub fn client(&self, id: &SpiffeId) -> Option<Arc<ClientConfig>> {
        self.clients.get(id).cloned()
    }

    /// Reads and checks every file of `sources`.
    pub fn load(sources: &Sources) -> Result<Tls, CertError> {
        let provider = provider();
        let roots = Arc::new(load_roots(&sources.ca_bundle)?);
        let algorithms = provider.signature_verification_algorithms;
        let mut certs = Vec::new();
        let mut keys = Vec::new();
        for files in std::iter::once(&sources.node).chain(&sources.workloads) {
            let (chain, key, info) = load_identity(files, sources, &roots, algorithms)?;
            certs.push(info);
            keys.push((chain, key));
        }
        let node = certs[0].identity.clone();
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|e| CertError::Bundle {
                    path: sources.ca_bundle.clone(),
                    cause: e.to_string(),
                })?;
        let mut keys = keys.into_iter();
        let (node_chain, node_key) = keys.next().expect("the node identity comes first");
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|cause| CertError::Tls { cause })?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
                inner: client_verifier,
                trust_domain: sources.trust_domain.clone(),
            }))
            .with_single_cert(node_chain.clone(), node_key.clone_key())
            .map_err(|cause| CertError::Tls { cause })?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        let server_verifier = Arc::new(SpiffeServerVerifier {
            roots,
            trust_domain: sources.trust_domain.clone(),
            algorithms,
        });
        let mut clients = HashMap::new();
        for (info, (chain, key)) in certs
            .iter()
            .zip(std::iter::once((node_chain, node_key)).chain(keys))
        {
            let mut client = ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|cause| CertError::Tls { cause })?
                .dangerous()
                .with_custom_certificate_verifier(server_verifier.clone())
                .with_client_auth_cert(chain, key)
                .map_err(|cause| CertError::Tls { cause })?;
            client.alpn_protocols = vec![ALPN_H2.to_vec()];
            clients.insert(info.identity.clone(), Arc::new(client));
        }
        Ok(Tls {
            server: Arc::new(server),
            clients,
            node,
            certs,
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|cause| CertError::Read {
        path: path.to_owned(),
        cause,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|cause| CertError::Pem {
            path: path.to_owned(),
            cause,
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| CertError::Bundle {
            path: path.to_owned(),
            cause: e.to_string(),
        })?;
    }
    Ok(roots)
}

type Identity = (
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
    CertInfo,
);

/// One identity's chain and key, checked: SPIFFE ID as expected and in the trust domain, not
/// expired, signed by the bundle, key matching.
fn load_identity(
    files: &IdentityFiles,
    sources: &Sources,
    roots: &RootCertStore,
    algorithms: WebPkiSupportedAlgorithms,
) -> Result<Identity, CertError> {
    let chain = load_certs(&files.cert)?;
    let info = CertInfo::from_der(&chain[0], &files.cert.display().to_string())?;
    if let Some(expected) = &files.expected {
        if *expected != info.identity {
            return Err(CertError::WrongIdentity {
                path: files.cert.clone(),
                expected: expected.to_string(),
                found: info.identity.to_string(),
            });
        }
    }
    if info.identity.trust_domain() != sources.trust_domain {
        return Err(CertError::WrongTrustDomain {
            path: files.cert.clone(),
            id: info.identity.to_string(),
            trust_domain: sources.trust_domain.clone(),
        });
    }
    if info.seconds_left() <= 0 {
        return Err(CertError::Expired {
            path: files.cert.clone(),
            not_after: info.status().not_after,
        });
    }
    let parsed = ParsedCertificate::try_from(&chain[0]).map_err(|cause| CertError::Untrusted {
        path: files.cert.clone(),
        bundle: sources.ca_bundle.clone(),
        cause,
    })?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        &chain[1..],
        UnixTime::now(),
        algorithms.all,
    )
    .map_err(|cause| CertError::Untrusted {
        path: files.cert.clone(),
        bundle: sources.ca_bundle.clone(),
        cause,
    })?;
    let key =
        PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|cause| CertError::Key {
            path: files.key.clone(),
            cause,
        })?;
    let signing = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|cause| CertError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            cause,
        })?;
    rustls::sign::CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(|cause| CertError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            cause,
        })?;
    Ok((chain, key, info))
}

/// Why a peer's certificate was refused after its chain checked out.
#[derive(Debug, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("the peer certificate has no usable SPIFFE ID: {0}")]
    NoIdentity(String),
    #[error("the peer {id} is not in the trust domain {trust_domain}")]
    TrustDomain { id: SpiffeId, trust_domain: String },
}

/// The SPIFFE ID of a peer's end-entity certificate, if it is in `trust_domain`.
fn peer_identity(
    end_entity: &CertificateDer<'_>,
    trust_domain: &str,
) -> Result<SpiffeId, rustls::Error> {
    let error = |e: PeerIdentityError| {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    };
    let info = CertInfo::from_der(end_entity, "peer certificate")
        .map_err(|e| error(PeerIdentityError::NoIdentity(e.to_string())))?;
    if info.identity.trust_domain() != trust_domain {
        return Err(error(PeerIdentityError::TrustDomain {
            id: info.identity,
            trust_domain: trust_domain.to_owned(),
        }));
    }
    Ok(info.identity)
}

/// The certificate (SPIFFE ID, serial, expiry) of the peer of an established session (checked
/// during the handshake).
pub fn session_peer(certs: Option<&[CertificateDer<'_>]>) -> Option<CertInfo> {
    let end_entity = certs?.first()?;
    CertInfo::from_der(end_entity, "peer certificate").ok()
}

/// Client certificates: webpki's chain check, then the SPIFFE ID's trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        peer_identity(end_entity, &self.trust_domain)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server certificates: the chain against the bundle (no DNS name: peers are named by SPIFFE
/// ID), then the SPIFFE ID's trust domain.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        peer_identity(end_entity, &self.trust_domain)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The `reason` label of a failed handshake.
pub fn handshake_failure_reason(error: &std::io::Error) -> &'static str {
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return "io";
    };
    match tls {
        // A CA with another key but the same name as ours fails on the signature.
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => "unknown_ca",
        rustls::Error::InvalidCertificate(CertificateError::Other(other))
            if other.0.downcast_ref::<PeerIdentityError>().is_some() =>
        {
            "bad_identity"
        }
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        // The peer refused our certificate (its log says why).
        rustls::Error::AlertReceived(_) => "rejected_by_peer",
        rustls::Error::NoCertificatesPresented => "no_certificate",
        _ => "protocol",
    }
}

/// Warn this long before a certificate expires.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 86_400);

/// The credentials in force, replaced whole on reload.
pub struct Credentials {
    sources: Sources,
    current: RwLock<Arc<Tls>>,
}

impl Credentials {
    pub fn load(sources: Sources) -> Result<Credentials, CertError> {
        let tls = Tls::load(&sources)?;
        Ok(Credentials {
            sources,
            current: RwLock::new(Arc::new(tls)),
        })
    }

    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    pub fn current(&self) -> Arc<Tls> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Re-reads every file; on error the credentials in force stay.
    pub fn reload(&self) -> Result<(), CertError> {
        let tls = Arc::new(Tls::load(&self.sources)?);
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tls;
        Ok(())
    }

    /// Logs a warning for each certificate within [`EXPIRY_WARNING`] of its end; returns how
    /// many there are.
    pub fn warn_expiring(&self) -> usize {
        let tls = self.current();
        let expiring: Vec<&CertInfo> = tls
            .certs
            .iter()
            .filter(|c| c.seconds_left() < EXPIRY_WARNING.as_secs() as i64)
            .collect();
        for cert in &expiring {
            tracing::warn!(
                identity = %cert.identity,
                file = cert.file,
                seconds_left = cert.seconds_left(),
                "certificate expires soon; replace the file (it is reloaded on change)"
            );
        }
        expiring.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tunnel::identity::ca;

    /// A CA and identities written to a temporary directory.
    pub struct Fixture {
        pub dir: PathBuf,
        pub ca: ca::Pem,
        pub sources: Sources,
    }

    impl Fixture {
        pub fn new(name: &str, trust_domain: &str, node: &str, workloads: &[&str]) -> Fixture {
            let dir = std::env::temp_dir().join(format!("mesh-mtls-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let ca = ca::init(trust_domain, Duration::from_secs(86_400)).unwrap();
            std::fs::write(dir.join("ca.pem"), &ca.cert).unwrap();
            let mut fixture = Fixture {
                sources: Sources {
                    trust_domain: trust_domain.to_owned(),
                    ca_bundle: dir.join("ca.pem"),
                    node: IdentityFiles {
                        expected: None,
                        cert: PathBuf::new(),
                        key: PathBuf::new(),
                    },
                    workloads: Vec::new(),
                },
                dir,
                ca,
            };
            fixture.sources.node = fixture.issue(node, "node");
            for (i, id) in workloads.iter().enumerate() {
                let mut files = fixture.issue(id, &format!("w{i}"));
                files.expected = Some(id.parse().unwrap());
                fixture.sources.workloads.push(files);
            }
            fixture
        }

        /// Issues `id` into `<stem>.pem` / `<stem>-key.pem`.
        pub fn issue(&self, id: &str, stem: &str) -> IdentityFiles {
            let pem =
                ca::issue(&self.ca, &id.parse().unwrap(), Duration::from_secs(86_400)).unwrap();
            let cert = self.dir.join(format!("{stem}.pem"));
            let key = self.dir.join(format!("{stem}-key.pem"));
            std::fs::write(&cert, pem.cert).unwrap();
            std::fs::write(&key, pem.key).unwrap();
            IdentityFiles {
                expected: None,
                cert,
                key,
            }
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn loads_node_and_workloads() {
        let f = Fixture::new(
            "load",
            "mesh.test",
            "spiffe://mesh.test/ns/mesh/sa/node-a",
            &["spiffe://mesh.test/ns/shop/sa/frontend"],
        );
        let tls = Tls::load(&f.sources).unwrap();
        assert_eq!(tls.node.to_string(), "spiffe://mesh.test/ns/mesh/sa/node-a");
        assert_eq!(tls.certs.len(), 2);
        let frontend = "spiffe://mesh.test/ns/shop/sa/frontend".parse().unwrap();
        assert!(tls.client(&frontend).is_some());
        let status = tls.certs[1].status();
        assert_eq!(status.days_left, 0);
        assert_eq!(status.serial.len(), 32, "{status:?}");
    }

    #[test]
    fn errors_name_the_file() {
        let f = Fixture::new(
            "errors",
            "mesh.test",
            "spiffe://mesh.test/ns/mesh/sa/node",
            &[],
        );
        let expect = |sources: &Sources, want: &str| {
            let e = Tls::load(sources).unwrap_err().to_string();
            assert!(e.contains(want), "want {want:?} in {e}");
        };
        // A missing file.
        let mut s = f.sources.clone();
        s.ca_bundle = f.dir.join("nope.pem");
        expect(
            &s,
            &format!("cannot read {}", f.dir.join("nope.pem").display()),
        );
        // A file with no certificate.
        let junk = f.dir.join("junk.pem");
        std::fs::write(&junk, "hello\n").unwrap();
        let mut s = f.sources.clone();
        s.node.cert = junk.clone();
        expect(&s, &format!("{}: no PEM certificate", junk.display()));
        // A key file that holds a certificate.
        let mut s = f.sources.clone();
        s.node.key = f.sources.node.cert.clone();
        expect(
            &s,
            &format!("{}: not a PEM private key", f.sources.node.cert.display()),
        );
        // Another identity's key.
        let other = f.issue("spiffe://mesh.test/ns/x/sa/y", "other");
        let mut s = f.sources.clone();
        s.node.key = other.key;
        expect(&s, "the key does not fit the certificate");
        // A certificate of another trust domain, and one of another CA.
        let foreign = Fixture::new(
            "errors-foreign",
            "other.test",
            "spiffe://other.test/ns/a/sa/b",
            &[],
        );
        let mut s = f.sources.clone();
        s.node = foreign.sources.node.clone();
        expect(&s, "is not in the trust domain mesh.test");
        let rogue = Fixture::new(
            "errors-rogue",
            "mesh.test",
            "spiffe://mesh.test/ns/a/sa/b",
            &[],
        );
        let mut s = f.sources.clone();
        s.node = rogue.sources.node.clone();
        expect(&s, "is not signed by the CA bundle");
        // The config expects another identity.
        let mut s = f.sources.clone();
        let mut w = f.sources.node.clone();
        w.expected = Some("spiffe://mesh.test/ns/shop/sa/frontend".parse().unwrap());
        s.workloads.push(w);
        expect(&s, "the certificate is for spiffe://mesh.test/ns/mesh/sa/node, the config says spiffe://mesh.test/ns/shop/sa/frontend");
    }

    #[test]
    fn reload_keeps_the_last_good_credentials() {
        let f = Fixture::new(
            "reload",
            "mesh.test",
            "spiffe://mesh.test/ns/mesh/sa/node",
            &[],
        );
        let creds = Credentials::load(f.sources.clone()).unwrap();
        let first = creds.current().certs[0].serial.clone();
        std::fs::write(&f.sources.node.cert, "garbage").unwrap();
        assert!(creds.reload().is_err());
        assert_eq!(creds.current().certs[0].serial, first);
        let fresh = f.issue("spiffe://mesh.test/ns/mesh/sa/node", "node");
        assert_eq!(fresh.cert, f.sources.node.cert);
        creds.reload().unwrap();
        assert_ne!(creds.current().certs[0].serial, first);
        // A one-day certificate is within the warning period.
        assert_eq!(creds.warn_expiring(), 1);
    }
}
