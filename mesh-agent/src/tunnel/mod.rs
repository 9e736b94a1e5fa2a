//! Path 2, the encrypted service flow, in user space: transparent mutual TLS between agents.
//!
//! Three rooms: [`identity`] (who is who: SPIFFE ids, the CA, credentials, cgroup →
//! identity), [`authz`] (what may be reached and by whom) and [`proxy`] (carrying the flows).
//!
//! A connect to a strict service is redirected by the kernel to the [`outbound`] listener,
//! which carries it as an HTTP/2 `CONNECT` stream ([`proxy::connect`]) over one pooled TLS 1.3
//! connection per (source identity, peer agent) ([`pool`]) to the peer's [`inbound`] listener;
//! that side checks the caller's SPIFFE identity ([`crate::model::identity`]) against the
//! catalog and the policy ([`authz`], [`crate::model::policy`]) and connects to the backend
//! from a marked socket ([`proxy::socket`]); [`proxy::relay`] copies the bytes. Credentials
//! come from files ([`certs`]) made by [`identity::ca`], and are reloaded on change.
//!
//! [`Tunnel`] is the state both listeners share; the composition root builds it from the
//! config, binds (or takes over) the [`Listeners`] and starts [`Tunnel::spawn`] and
//! [`Tunnel::serve`]. A draining agent stops serving, tells peers to go away and waits for
//! its flows to end ([`drain`]).

pub mod authz;
pub mod identity;
pub mod proxy;

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{net::TcpListener, runtime::Handle, sync::mpsc, task::JoinSet};

pub use self::proxy::outbound::OriginalDestinations;
use self::{
    identity::certs,
    proxy::{drain, inbound, limits, outbound, pool},
};
use crate::{
    admin::types::PolicyStatus,
    health::{
        checker::Target,
        probe::{ProbeError, Prober},
    },
    model::identity::SpiffeId,
    model::policy::Policies,
    model::settings::MtlsSettings,
    tunnel::authz::{Authz, MtlsService},
    tunnel::identity::certs::{CertError, CertStatus, Credentials, IdentityFiles, Sources},
    tunnel::identity::workload::Identities,
    tunnel::proxy::pool::Pool,
    tunnel::proxy::stats::{TunnelSample, TunnelStats},
};

/// Everything the tunnel needs from the `[mtls]` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelConfig {
    pub sources: Sources,
    /// Cgroup (absolute, or relative to the cgroup2 root) → identity.
    pub identities: Vec<(PathBuf, SpiffeId)>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub idle_timeout: Duration,
}

impl From<&MtlsSettings> for TunnelConfig {
    fn from(mtls: &MtlsSettings) -> Self {
        TunnelConfig {
            sources: Sources {
                trust_domain: mtls.trust_domain.clone(),
                ca_bundle: mtls.ca_bundle.clone(),
                node: IdentityFiles {
                    expected: None,
                    cert: mtls.cert.clone(),
                    key: mtls.key.clone(),
                },
                workloads: mtls
                    .identities
                    .iter()
                    .map(|i| IdentityFiles {
                        expected: Some(i.spiffe_id.clone()),
                        cert: i.cert.clone(),
                        key: i.key.clone(),
                    })
                    .collect(),
            },
            identities: mtls
                .identities
                .iter()
                .map(|i| (i.cgroup.clone(), i.spiffe_id.clone()))
                .collect(),
            outbound_port: mtls.outbound_port,
            inbound_port: mtls.inbound_port,
            idle_timeout: mtls.idle_timeout,
        }
    }
}

/// Why the tunnel could not start.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("mTLS credentials: {0}")]
    Credentials(CertError),
    #[error("cannot listen on {addr}: {cause}")]
    Listen { addr: SocketAddr, cause: io::Error },
}

// The cause is in the message and not a `source`, or `{:#}` would print it twice.
impl From<CertError> for TunnelError {
    fn from(cause: CertError) -> Self {
        TunnelError::Credentials(cause)
    }
}

/// A listener on `[::]:port` that also accepts IPv4 (`IPV6_V6ONLY` off), so peers reach the
/// inbound tunnel over either family.
fn bind_dual_stack(port: u16) -> Result<std::net::TcpListener, TunnelError> {
    let addr = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
    let listen = || -> io::Result<std::net::TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_only_v6(false)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    };
    listen().map_err(|cause| TunnelError::Listen { addr, cause })
}

fn bind_nonblocking(addr: SocketAddr) -> Result<std::net::TcpListener, TunnelError> {
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|cause| TunnelError::Listen { addr, cause })
}

/// The tunnel's listening sockets (plain std sockets, non-blocking, so that they can be handed
/// to a successor agent as they are).
#[derive(Debug)]
pub struct Listeners {
    /// 127.0.0.1 and, if it binds, ::1.
    pub outbound: Vec<std::net::TcpListener>,
    pub inbound: std::net::TcpListener,
}

impl Listeners {
    /// The inbound listener on `port`: dual-stack, else IPv4 only.
    pub fn bind_inbound(port: u16) -> Result<std::net::TcpListener, TunnelError> {
        match bind_dual_stack(port) {
            Ok(listener) => Ok(listener),
            Err(error) => {
                tracing::info!(%error, "no IPv6 inbound listener; IPv4 only");
                bind_nonblocking(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))
            }
        }
    }

    /// The outbound listeners on `port`: 127.0.0.1 and, if it binds, ::1.
    pub fn bind_outbound(port: u16) -> Result<Vec<std::net::TcpListener>, TunnelError> {
        let mut outbound = vec![bind_nonblocking(SocketAddr::new(
            Ipv4Addr::LOCALHOST.into(),
            port,
        ))?];
        match bind_nonblocking(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)) {
            Ok(v6) => outbound.push(v6),
            Err(error) => tracing::info!(%error, "no IPv6 outbound listener"),
        }
        Ok(outbound)
    }

    /// Copies of the descriptors (the same sockets), for one set of accept loops.
    pub fn try_clone(&self) -> io::Result<Listeners> {
        Ok(Listeners {
            outbound: self
                .outbound
                .iter()
                .map(std::net::TcpListener::try_clone)
                .collect::<io::Result<_>>()?,
            inbound: self.inbound.try_clone()?,
        })
    }
}

/// The state the listeners share.
pub struct Tunnel {
    credentials: Arc<Credentials>,
    stats: Arc<TunnelStats>,
    /// What the inbound side may reach, swapped whole by [`Tunnel::update`].
    authz: ArcSwap<Authz>,
    identities: Identities,
    pool: Arc<Pool>,
    inbound_port: u16,
    drain: drain::Drain,
    /// Bounds on the inbound connections.
    limits: Arc<limits::ConnectionLimits>,
    /// The data-plane runtime: the listeners, the relays, the pooled connections and the
    /// probes through them run there, never on the control runtime's thread.
    runtime: Handle,
}

impl Tunnel {
    /// Loads the credentials; nothing listens yet. The tunnel's work will run on `runtime`.
    pub fn new(
        config: &TunnelConfig,
        cgroup_root: PathBuf,
        runtime: Handle,
    ) -> Result<Arc<Tunnel>, TunnelError> {
        let credentials = Arc::new(Credentials::load(config.sources.clone())?);
        let stats = Arc::new(TunnelStats::default());
        Ok(Arc::new(Tunnel {
            pool: Pool::new(
                Arc::clone(&credentials),
                Arc::clone(&stats),
                config.idle_timeout,
            ),
            credentials,
            stats,
            authz: ArcSwap::default(),
            identities: Identities::new(cgroup_root, config.identities.clone()),
            inbound_port: config.inbound_port,
            drain: drain::Drain::default(),
            limits: limits::ConnectionLimits::new(limits::MAX_CONNECTIONS, limits::MAX_PER_PEER),
            runtime,
        }))
    }

    /// Puts a new catalog and policy in force (flows already open keep going).
    pub fn update(&self, services: &[MtlsService], policies: Policies) {
        self.authz.store(Arc::new(Authz::new(services, policies)));
    }

    fn authz(&self) -> Arc<Authz> {
        self.authz.load_full()
    }

    /// The rules in force (`mesh-agent policies`).
    pub fn policies(&self) -> Vec<PolicyStatus> {
        self.authz().policies.rules.iter().map(Into::into).collect()
    }

    /// The certificates in force (`mesh-agent certs`).
    pub fn certs(&self) -> Vec<CertStatus> {
        self.credentials
            .current()
            .certs
            .iter()
            .map(certs::CertInfo::status)
            .collect()
    }

    /// Has the agent in front of `backend` (a strict backend of `service`) run its check of
    /// it, asked as this node's identity; `Ok` when the check passed there.
    pub async fn probe(&self, backend: SocketAddr, service: &str) -> Result<(), pool::OpenError> {
        let node = self.credentials.current().node.clone();
        let peer = SocketAddr::new(backend.ip(), self.inbound_port);
        let pool = Arc::clone(&self.pool);
        let service = service.to_owned();
        let probe = async move { pool.probe(&node, peer, backend, &service).await };
        match self.runtime.spawn(probe).await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Err(pool::OpenError::Stopped),
        }
    }

    /// The tunnel's metrics now.
    pub fn sample(&self) -> TunnelSample {
        let mut sample = self.stats.sample();
        sample.cert_expiry = self
            .credentials
            .current()
            .certs
            .iter()
            .map(|c| (c.identity.to_string(), c.seconds_left()))
            .collect();
        sample
    }

    /// Spawns the credential watcher and the pool's idle expiry.
    pub fn spawn(self: &Arc<Self>, tasks: &mut JoinSet<()>) {
        tasks.spawn_on(Arc::clone(&self.pool).expire_idle(), &self.runtime);
        tasks.spawn_on(Arc::clone(self).follow_credentials(), &self.runtime);
    }

    /// Spawns the accept loops on `listeners` into `accepting`.
    pub fn serve(
        self: &Arc<Self>,
        listeners: Listeners,
        destinations: &Arc<dyn OriginalDestinations>,
        names: &Arc<crate::telemetry::flows::ServiceNames>,
        accepting: &mut JoinSet<()>,
    ) -> Result<(), TunnelError> {
        let tokio_listener = |listener: std::net::TcpListener| {
            let addr = listener
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
            TcpListener::from_std(listener).map_err(|cause| TunnelError::Listen { addr, cause })
        };
        let inbound = tokio_listener(listeners.inbound)?;
        let outbound = listeners
            .outbound
            .into_iter()
            .map(tokio_listener)
            .collect::<Result<Vec<_>, _>>()?;
        tracing::info!(
            inbound = ?inbound.local_addr().ok(),
            outbound = ?outbound.iter().filter_map(|l| l.local_addr().ok()).collect::<Vec<_>>(),
            node = %self.credentials.current().node,
            "mTLS tunnel listening"
        );
        accepting.spawn_on(inbound::serve(Arc::clone(self), inbound), &self.runtime);
        for listener in outbound {
            let serve = outbound::serve(
                Arc::clone(self),
                listener,
                Arc::clone(destinations),
                Arc::clone(names),
            );
            accepting.spawn_on(serve, &self.runtime);
        }
        Ok(())
    }

    /// Starts draining: inbound tunnel connections are told to go away (GOAWAY; their open
    /// streams go on). Returns the flows open now.
    pub fn drain(&self) -> usize {
        self.drain.go_away();
        self.drain.open()
    }

    /// Flows (and inbound tunnel connections) still open.
    pub fn open_flows(&self) -> usize {
        self.drain.open()
    }

    /// Resolves once no flow is open.
    pub async fn drained(&self) {
        self.drain.idle().await;
    }

    /// Reloads the credentials when a file changes and warns daily about expiring ones.
    async fn follow_credentials(self: Arc<Self>) {
        let (changes_tx, mut changes) = mpsc::unbounded_channel();
        let mut watchers = Vec::new();
        for file in self.credentials.sources().files() {
            match crate::sys::watch::watch_file(file, changes_tx.clone()) {
                Ok(watcher) => watchers.push(watcher),
                Err(error) => tracing::error!(%error, "certificate changes will not be seen"),
            }
        }
        self.credentials.warn_expiring();
        let mut daily = tokio::time::interval(Duration::from_secs(86_400));
        daily.tick().await;
        loop {
            tokio::select! {
                _ = daily.tick() => {
                    self.credentials.warn_expiring();
                }
                Some(()) = changes.recv() => {
                    // Certificate and key are often written one after the other: let it settle.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while changes.try_recv().is_ok() {}
                    self.reload_credentials();
                }
            }
        }
    }

    /// Re-reads the credential files; a bad set is refused and the one in force stays.
    pub fn reload_credentials(&self) {
        use std::sync::atomic::Ordering;
        match self.credentials.reload() {
            Ok(()) => {
                self.stats.cert_reloads_ok.fetch_add(1, Ordering::Relaxed);
                let serials: Vec<String> = self
                    .certs()
                    .into_iter()
                    .map(|c| format!("{} {}", c.identity, c.serial))
                    .collect();
                let retired = self.pool.retire_all();
                tracing::info!(
                    ?serials,
                    retired,
                    "certificates reloaded; new flows use new tunnel connections with them"
                );
                self.credentials.warn_expiring();
            }
            Err(error) => {
                self.stats
                    .cert_reloads_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "certificate reload refused; the previous certificates stay in force");
            }
        }
    }
}

/// Probes strict backends through the tunnel: the agent in front of the backend runs its own
/// check of it, bounded by twice the check's timeout (its check, then the round trip).
pub struct TunnelProber(pub Arc<Tunnel>);

#[async_trait::async_trait]
impl Prober for TunnelProber {
    async fn probe(&self, target: &Target) -> Result<(), ProbeError> {
        let timeout = target.check.timeout * 2;
        match tokio::time::timeout(timeout, self.0.probe(target.backend, &target.service)).await {
            Ok(result) => result.map_err(|cause| ProbeError::Tunnel {
                cause: cause.to_string(),
            }),
            Err(_) => Err(ProbeError::Timeout { timeout }),
        }
    }
}

#[cfg(test)]
mod tests;
