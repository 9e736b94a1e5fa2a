//! Pooled tunnel connections: one TLS 1.3 + HTTP/2 connection per (source identity, peer
//! agent), carrying any number of flows as streams, so a new flow costs one `CONNECT`
//! round trip and no handshake. A connection no flow used for the idle timeout is let go
//! (HTTP/2 GOAWAY once its last handle is dropped); a broken one is replaced on next use. A
//! credential rotation retires every connection: new flows handshake with the new
//! certificates while the old connections drain.
//!
//! A peer agent that drains (upgraded by a takeover, or stopping) sends GOAWAY: h2 then
//! refuses new streams on that connection, so the pool dials a fresh one (which reaches the
//! peer's successor through the same listening socket). A stream refused by GOAWAY or
//! `REFUSED_STREAM` never carried a byte of the flow (the flow's bytes follow the peer's
//! answer), so it is retried once on a fresh connection and the client sees nothing of it.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{client::SendRequest, Reason, RecvStream, SendStream};
use http::StatusCode;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::{
    model::identity::SpiffeId,
    tunnel::identity::certs::{handshake_failure_reason, session_peer, Credentials},
    tunnel::proxy::connect,
    tunnel::proxy::socket::dial_marked,
    tunnel::proxy::stats::{TunnelStats, OUTBOUND},
    tunnel::proxy::tuning,
};

/// Why a flow could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no certificate for identity {0}")]
    NoCertificate(SpiffeId),
    #[error("cannot connect to peer agent {peer}: {cause}")]
    Connect { peer: SocketAddr, cause: io::Error },
    #[error("TLS handshake with peer agent {peer} failed: {cause}")]
    Handshake { peer: SocketAddr, cause: io::Error },
    #[error("HTTP/2 with peer agent {peer} failed: {cause}")]
    H2 { peer: SocketAddr, cause: h2::Error },
    #[error("peer agent {peer} refused the flow to {backend}: {status}{}",
        reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Refused {
        peer: SocketAddr,
        backend: SocketAddr,
        status: StatusCode,
        /// The peer's [`connect::PROBE_ERROR_HEADER`], if any.
        reason: Option<String>,
    },
    #[error("the tunnel's runtime has stopped")]
    Stopped,
}

type Key = (SpiffeId, SocketAddr);

/// How one attempt to open a stream failed.
enum Attempt {
    /// Before the peer took the stream (the connection is going away or gone): nothing of the
    /// flow was sent, another connection may carry it.
    Retry(h2::Error),
    Failed(OpenError),
}

/// Whether the peer refused the stream without processing it.
fn refused(error: &h2::Error) -> bool {
    error.is_go_away() || error.reason() == Some(Reason::REFUSED_STREAM)
}

/// One pooled connection.
#[derive(Clone)]
struct Pooled {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
}

/// The pool: per key a slot whose async lock serialises connection set-up.
pub struct Pool {
    credentials: Arc<Credentials>,
    stats: Arc<TunnelStats>,
    idle_timeout: Duration,
    slots: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<Option<Pooled>>>>>,
}

/// A flow's stream, counted as active on its connection until dropped.
pub struct Flow {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    _active: ActiveFlow,
}

struct ActiveFlow {
    active: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
}

impl Drop for ActiveFlow {
    fn drop(&mut self) {
        *self
            .last_used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(
        credentials: Arc<Credentials>,
        stats: Arc<TunnelStats>,
        idle_timeout: Duration,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            credentials,
            stats,
            idle_timeout,
            slots: Mutex::new(HashMap::new()),
        })
    }

    fn slot(&self, key: &Key) -> Arc<tokio::sync::Mutex<Option<Pooled>>> {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(slots.entry(key.clone()).or_default())
    }

    /// Opens a flow to `backend` through the agent at `peer`, as `source`.
    pub async fn open(
        &self,
        source: &SpiffeId,
        peer: SocketAddr,
        backend: SocketAddr,
        service: Option<&str>,
    ) -> Result<Flow, OpenError> {
        self.send(source, peer, backend, || connect::request(backend, service))
            .await
    }

    /// Has the agent at `peer` probe `backend` of `service` (as `source`); `Ok` when the
    /// check passed there.
    pub async fn probe(
        &self,
        source: &SpiffeId,
        peer: SocketAddr,
        backend: SocketAddr,
        service: &str,
    ) -> Result<(), OpenError> {
        self.send(source, peer, backend, || {
            connect::probe_request(backend, service)
        })
        .await
        .map(drop)
    }

    /// Sends the request `make` builds (a `CONNECT` to `backend`) on the connection to
    /// `peer`; once more on a fresh connection if that one was going away.
    async fn send(
        &self,
        source: &SpiffeId,
        peer: SocketAddr,
        backend: SocketAddr,
        make: impl Fn() -> http::Request<()>,
    ) -> Result<Flow, OpenError> {
        let key = (source.clone(), peer);
        let mut retried = false;
        loop {
            let pooled = self.connection(&key).await?;
            match self.attempt(&pooled, peer, backend, make()).await {
                Ok(flow) => return Ok(flow),
                Err(Attempt::Failed(error)) => return Err(error),
                Err(Attempt::Retry(cause)) => {
                    // Going away (GOAWAY), or gone (peer restarted, idle close raced us): no
                    // new flow goes there again.
                    pooled.closed.store(true, Ordering::Relaxed);
                    if retried {
                        return Err(OpenError::H2 { peer, cause });
                    }
                    tracing::debug!(%peer, %backend, error = %cause, "tunnel connection going away; the flow goes on a fresh one");
                    retried = true;
                }
            }
        }
    }

    /// One try of `request` on `pooled`.
    async fn attempt(
        &self,
        pooled: &Pooled,
        peer: SocketAddr,
        backend: SocketAddr,
        request: http::Request<()>,
    ) -> Result<Flow, Attempt> {
        let mut send_request = pooled.send.clone().ready().await.map_err(Attempt::Retry)?;
        pooled.active.fetch_add(1, Ordering::Relaxed);
        let active = ActiveFlow {
            active: Arc::clone(&pooled.active),
            last_used: Arc::clone(&pooled.last_used),
        };
        // An error here is the connection's (it went away since `ready`): nothing was sent.
        let (response, send) = send_request
            .send_request(request, false)
            .map_err(Attempt::Retry)?;
        let response = response.await.map_err(|cause| {
            if refused(&cause) {
                Attempt::Retry(cause)
            } else {
                Attempt::Failed(OpenError::H2 { peer, cause })
            }
        })?;
        if response.status() != StatusCode::OK {
            return Err(Attempt::Failed(OpenError::Refused {
                peer,
                backend,
                status: response.status(),
                reason: response
                    .headers()
                    .get(connect::PROBE_ERROR_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            }));
        }
        Ok(Flow {
            send,
            recv: response.into_body(),
            _active: active,
        })
    }

    /// The live connection of `key`, made if there is none.
    async fn connection(&self, key: &Key) -> Result<Pooled, OpenError> {
        let slot = self.slot(key);
        let mut slot = slot.lock().await;
        if let Some(pooled) = slot.as_ref() {
            if !pooled.closed.load(Ordering::Relaxed) {
                return Ok(pooled.clone());
            }
        }
        // Boxed: the handshake's state (a rustls connection, the HTTP/2 preface) would otherwise
        // be part of every flow's task, which lives as long as the flow (kilobytes per flow).
        let pooled = Box::pin(self.dial(key)).await?;
        *slot = Some(pooled.clone());
        Ok(pooled)
    }

    async fn dial(&self, (source, peer): &Key) -> Result<Pooled, OpenError> {
        let peer = *peer;
        let config = self
            .credentials
            .current()
            .client(source)
            .ok_or_else(|| OpenError::NoCertificate(source.clone()))?;
        let tcp = dial_marked(peer)
            .await
            .map_err(|cause| OpenError::Connect { peer, cause })?;
        let tls = match TlsConnector::from(config)
            .connect(ServerName::IpAddress(peer.ip().into()), tcp)
            .await
        {
            Ok(tls) => {
                self.stats.handshake(OUTBOUND, "ok");
                if let Some(cert) = session_peer(tls.get_ref().1.peer_certificates()) {
                    let status = cert.status();
                    tracing::info!(%peer, %source, identity = %status.identity,
                        serial = %status.serial, not_after = %status.not_after,
                        "tunnel connection established");
                }
                tls
            }
            Err(cause) => {
                self.stats
                    .handshake(OUTBOUND, handshake_failure_reason(&cause));
                return Err(OpenError::Handshake { peer, cause });
            }
        };
        let (send, connection) = tuning::client()
            .handshake(tls)
            .await
            .map_err(|cause| OpenError::H2 { peer, cause })?;
        let closed = Arc::new(AtomicBool::new(false));
        let stats = Arc::clone(&self.stats);
        stats.pooled_connections.fetch_add(1, Ordering::Relaxed);
        let done = Arc::clone(&closed);
        let source = source.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %source, %error, "tunnel connection ended");
            }
            done.store(true, Ordering::Relaxed);
            stats.pooled_connections.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Pooled {
            send,
            closed,
            active: Arc::new(AtomicUsize::new(0)),
            last_used: Arc::new(Mutex::new(Instant::now())),
        })
    }

    /// Lets go of every connection, so that new flows dial afresh with the credentials in
    /// force now (after a rotation); flows open on the old connections keep going, and h2
    /// closes each old connection once its last flow ends. Returns how many were let go.
    pub fn retire_all(&self) -> usize {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let retired = slots.len();
        slots.clear();
        retired
    }

    /// Lets go of connections idle for the timeout, and of closed ones; runs until dropped.
    pub async fn expire_idle(self: Arc<Self>) {
        let period =
            (self.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut ticks = tokio::time::interval(period);
        loop {
            ticks.tick().await;
            self.expire_once();
        }
    }

    fn expire_once(&self) {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slots.retain(|_, slot| {
            // A slot being dialled is busy, not idle.
            let Ok(mut guard) = slot.try_lock() else {
                return true;
            };
            let expired = guard.as_ref().is_none_or(|p| {
                let idle = p
                    .last_used
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .elapsed();
                p.closed.load(Ordering::Relaxed)
                    || (p.active.load(Ordering::Relaxed) == 0 && idle >= self.idle_timeout)
            });
            if expired {
                // Dropping the last SendRequest lets h2 close the connection gracefully.
                guard.take();
            }
            !expired
        });
    }

    /// Connections held now.
    #[cfg(test)]
    pub fn connections(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}
