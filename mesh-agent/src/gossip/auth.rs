//! Authenticated gossip datagrams: every datagram carries an HMAC-SHA256 tag under the mesh
//! key, and what fails the check is dropped and counted.
//!
//! Frame: `MGS1` ‖ chitchat message ‖ HMAC-SHA256(key, `MGS1` ‖ message) (32 bytes).
//!
//! chitchat's [`Transport`] trait works on decoded envelopes and keeps their codec private, so
//! [`AuthTransport`] reuses chitchat's own UDP codec through loopback: to send, chitchat's
//! socket encodes the envelope to a loopback socket of ours, which seals the bytes and sends
//! them to the peer; to receive, a verified frame's message is handed to a second chitchat
//! socket over loopback, which decodes it. Both loopback sockets are connected to their
//! partner, so nothing else can feed them. Each message costs two extra loopback datagrams,
//! negligible at gossip rates, and no copy of chitchat's wire format lives here.
//!
//! Limits: a frame is 36 bytes longer than chitchat's message, so a message within 36 bytes
//! of the UDP maximum (65,507 bytes on IPv4; only a catalog of thousands of endpoints gets
//! there) cannot be sent; it is dropped and counted as `oversize`. Replayed frames pass the
//! check; chitchat ignores state older than what it has.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as ChitchatUdp};
use chitchat::ChitchatEnvelope;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;
use tokio::net::UdpSocket;

const MAGIC: &[u8; 4] = b"MGS1";
const TAG_LEN: usize = 32;
/// Bytes a frame adds to a message.
pub const OVERHEAD: usize = MAGIC.len() + TAG_LEN;
/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535 - 8;
/// Shortest mesh key accepted.
pub const MIN_KEY_LEN: usize = 16;
/// How long a verified message may take to come back from chitchat's decoder (it is already
/// there when it decodes; only a message chitchat rejects waits this long).
const DECODE_TIMEOUT: Duration = Duration::from_millis(50);
/// At most one log line per this period about rejected datagrams.
const LOG_PERIOD: Duration = Duration::from_secs(10);

type HmacSha256 = Hmac<Sha256>;

/// Why the mesh key is unusable.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the mesh key {}: {cause}", path.display())]
    Read { path: PathBuf, cause: io::Error },
    #[error("the mesh key {} is {len} bytes; it needs at least {MIN_KEY_LEN} (e.g. `head -c 32 /dev/urandom | base64 > FILE`)", path.display())]
    TooShort { path: PathBuf, len: usize },
}

/// The shared secret of the mesh.
#[derive(Clone)]
pub struct MeshKey(Arc<[u8]>);

impl std::fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshKey(..)")
    }
}

impl MeshKey {
    /// The file's bytes, surrounding whitespace removed (so `base64 > FILE` works).
    pub fn load(path: &Path) -> Result<MeshKey, KeyError> {
        let bytes = std::fs::read(path).map_err(|cause| KeyError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        MeshKey::new(bytes.trim_ascii()).map_err(|len| KeyError::TooShort {
            path: path.to_path_buf(),
            len,
        })
    }

    /// A key of these bytes; `Err(len)` when too short.
    pub fn new(bytes: &[u8]) -> Result<MeshKey, usize> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(bytes.len());
        }
        Ok(MeshKey(bytes.into()))
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length.
        let mut mac = HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(MAGIC);
        mac
    }

    /// `message` framed and tagged.
    pub fn seal(&self, message: &[u8]) -> Vec<u8> {
        let mut mac = self.mac();
        mac.update(message);
        let mut frame = Vec::with_capacity(message.len() + OVERHEAD);
        frame.extend_from_slice(MAGIC);
        frame.extend_from_slice(message);
        frame.extend_from_slice(&mac.finalize().into_bytes());
        frame
    }

    /// The message of an authentic `frame`.
    pub fn open<'f>(&self, frame: &'f [u8]) -> Result<&'f [u8], Rejected> {
        if frame.len() < OVERHEAD || !frame.starts_with(MAGIC) {
            return Err(Rejected::NotAFrame);
        }
        let (body, tag) = frame.split_at(frame.len() - TAG_LEN);
        let message = &body[MAGIC.len()..];
        let mut mac = self.mac();
        mac.update(message);
        mac.verify_slice(tag).map_err(|_| Rejected::BadTag)?;
        Ok(message)
    }
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Not a mesh gossip frame (wrong magic or too short).
    NotAFrame,
    /// The tag does not match: another key, or altered on the way.
    BadTag,
}

/// Counters of the gossip socket.
#[derive(Debug, Default)]
pub struct Stats {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Datagrams behind the byte counters (bytes per datagram: the size of gossip messages).
    pub datagrams_sent: AtomicU64,
    pub datagrams_received: AtomicU64,
    /// Datagrams dropped because they failed authentication.
    pub auth_failures: AtomicU64,
    /// Authentic messages chitchat could not decode, and messages too large to frame.
    pub undeliverable: AtomicU64,
    /// When the last authentic datagram arrived.
    last_authentic: std::sync::Mutex<Option<Instant>>,
}

impl Stats {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// When the last authentic datagram arrived.
    pub fn last_authentic(&self) -> Option<Instant> {
        *self
            .last_authentic
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn heard(&self) {
        *self
            .last_authentic
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    }
}

/// chitchat's UDP transport with every datagram authenticated under the mesh key, on a socket
/// bound beforehand (by this agent, or by the predecessor that handed it over).
pub struct AuthTransport {
    pub key: MeshKey,
    pub stats: Arc<Stats>,
    /// The gossip socket (non-blocking), taken by the one `open`.
    pub wire: std::sync::Mutex<Option<std::net::UdpSocket>>,
}

#[async_trait]
impl Transport for AuthTransport {
    async fn open(&self, listen: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let wire = self
            .wire
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .with_context(|| format!("the gossip socket {listen}/udp is already in use"))?;
        let wire = UdpSocket::from_std(wire)
            .with_context(|| format!("cannot use the gossip socket {listen}/udp"))?;
        let loopback = SocketAddr::new(
            match listen.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            },
            0,
        );
        let encoder = ChitchatUdp::open(loopback).await?;
        let encoded = bind_connected(loopback, encoder.local_addr()?).await?;
        let decoder = ChitchatUdp::open(loopback).await?;
        let feeder = bind_connected(loopback, decoder.local_addr()?).await?;
        Ok(Box::new(AuthSocket {
            key: self.key.clone(),
            stats: Arc::clone(&self.stats),
            encoded_addr: encoded.local_addr()?,
            feeder_addr: feeder.local_addr()?,
            wire,
            encoder,
            encoded,
            decoder,
            feeder,
            pending: None,
            buf: vec![0; MAX_DATAGRAM].into_boxed_slice(),
            log: RateLimit::default(),
        }))
    }
}

async fn bind_connected(local: SocketAddr, peer: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = UdpSocket::bind(local)
        .await
        .context("cannot bind a loopback socket for the gossip codec (is `lo` up?)")?;
    socket.connect(peer).await?;
    Ok(socket)
}

struct AuthSocket {
    key: MeshKey,
    stats: Arc<Stats>,
    /// The peer-facing socket.
    wire: UdpSocket,
    /// chitchat encodes into `encoded`.
    encoder: ChitchatUdp,
    encoded: UdpSocket,
    encoded_addr: SocketAddr,
    /// `feeder` hands verified messages to chitchat's `decoder`.
    decoder: ChitchatUdp,
    feeder: UdpSocket,
    feeder_addr: SocketAddr,
    /// The sender of the message handed to the decoder and not yet read back (recv must be
    /// cancel-safe: chitchat selects on it).
    pending: Option<(SocketAddr, usize)>,
    buf: Box<[u8]>,
    log: RateLimit,
}

#[async_trait]
impl Socket for AuthSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.wire.local_addr()?)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        self.encoder.send(self.encoded_addr, envelope).await?;
        let n = self.encoded.recv(&mut self.buf).await?;
        if n + OVERHEAD > MAX_DATAGRAM {
            Stats::add(&self.stats.undeliverable, 1);
            self.log.warn(|suppressed| {
                tracing::warn!(to = %to, bytes = n, suppressed, "gossip message too large to authenticate; dropped")
            });
            return Ok(SendOutcome { num_bytes_sent: 0 });
        }
        let frame = self.key.seal(&self.buf[..n]);
        match self.wire.send_to(&frame, to).await {
            Ok(sent) => {
                Stats::add(&self.stats.bytes_sent, sent);
                Stats::add(&self.stats.datagrams_sent, 1);
                Ok(SendOutcome {
                    num_bytes_sent: sent,
                })
            }
            // An unreachable peer is the failure detector's business, not a broken socket.
            Err(error) => {
                tracing::debug!(%to, %error, "gossip send failed");
                Ok(SendOutcome { num_bytes_sent: 0 })
            }
        }
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            if let Some((from, received)) = self.pending {
                let decoded = tokio::time::timeout(DECODE_TIMEOUT, self.decoder.recv()).await;
                self.pending = None;
                match decoded {
                    Ok(outcome) => {
                        let outcome = outcome?;
                        if outcome.from_addr == self.feeder_addr {
                            return Ok(RecvOutcome {
                                from_addr: from,
                                envelope: outcome.envelope,
                                num_bytes_received: received,
                            });
                        }
                    }
                    Err(_) => {
                        Stats::add(&self.stats.undeliverable, 1);
                        tracing::debug!(%from, "authentic gossip message chitchat cannot decode");
                    }
                }
            }
            let (n, from) = match self.wire.recv_from(&mut self.buf).await {
                Ok(received) => received,
                Err(error) => {
                    tracing::warn!(%error, "gossip receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            Stats::add(&self.stats.bytes_received, n);
            Stats::add(&self.stats.datagrams_received, 1);
            match self.key.open(&self.buf[..n]) {
                Ok(message) => {
                    self.stats.heard();
                    self.feeder.send(message).await?;
                    self.pending = Some((from, n));
                }
                Err(why) => {
                    let total = self.stats.auth_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    self.log.warn(|suppressed| {
                        tracing::warn!(%from, bytes = n, reason = ?why, total, suppressed, "dropped a gossip datagram that failed authentication")
                    });
                }
            }
        }
    }
}

/// Logs at most once per [`LOG_PERIOD`], saying how many were suppressed since.
#[derive(Default)]
struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    fn warn(&mut self, log: impl FnOnce(u64)) {
        if self.last.is_some_and(|t| t.elapsed() < LOG_PERIOD) {
            self.suppressed += 1;
            return;
        }
        log(self.suppressed);
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> MeshKey {
        MeshKey::new(&[b; 32]).unwrap()
    }

    #[test]
    fn seal_and_open() {
        let frame = key(1).seal(b"hello");
        assert_eq!(frame.len(), 5 + OVERHEAD);
        assert_eq!(key(1).open(&frame), Ok(&b"hello"[..]));
        assert_eq!(key(2).open(&frame), Err(Rejected::BadTag));
        let mut altered = frame.clone();
        altered[5] ^= 1;
        assert_eq!(key(1).open(&altered), Err(Rejected::BadTag));
        assert_eq!(key(1).open(b"junk"), Err(Rejected::NotAFrame));
        assert_eq!(key(1).open(&frame[4..]), Err(Rejected::NotAFrame));
        assert_eq!(MeshKey::new(b"short").unwrap_err(), 5);
    }

    #[test]
    fn key_file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("mesh-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        std::fs::write(&path, "tooshort\n").unwrap();
        let e = MeshKey::load(&path).unwrap_err().to_string();
        assert!(e.contains("is 8 bytes; it needs at least 16"), "{e}");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        assert!(MeshKey::load(&path).is_ok());
        let e = MeshKey::load(&dir.join("none")).unwrap_err().to_string();
        assert!(e.starts_with("cannot read the mesh key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
