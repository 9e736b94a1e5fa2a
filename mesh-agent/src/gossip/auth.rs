//! Authenticated, replay-protected gossip datagrams: every datagram carries the time it was
//! sent, a nonce and an HMAC-SHA256 tag under the mesh key over all of it; what fails the
//! check, is too old or too far ahead, or was seen before is dropped and counted by reason.
//!
//! Frame (format 2): `MGS2` ‖ sent (u64, ms since the Unix epoch, big-endian) ‖ nonce (u64) ‖
//! chitchat message ‖ HMAC-SHA256(key, everything before the tag) (32 bytes).
//!
//! Replay: a frame is accepted once, and only while `sent` is within [`MAX_AGE`] of this
//! host's clock (and at most [`MAX_SKEW`] ahead of it): hosts' clocks must agree within that
//! (NTP does by far). The (sent, nonce) pairs of the window are remembered (at most
//! [`REPLAY_MEMORY`], oldest forgotten first). A restarted agent remembers none, so it also
//! refuses every frame sent before its gossip started (less [`STARTUP_SKEW`] for the hosts'
//! clocks): a frame captured earlier cannot be fed to it, and one captured in the last
//! [`STARTUP_SKEW`] before the restart at most once. Since only fresh authentic frames are answered, a
//! replayed or forged datagram with a spoofed source draws no reply: there is nothing to
//! amplify.
//!
//! Format 1 frames (`MGS1`, no time or nonce, from agents before this one) are refused and
//! counted as `old_format`, with a rate-limited log line naming the sender: accepting them
//! would keep the replay open. A mesh upgrades its agents' gossip all at once (their data
//! planes keep running meanwhile, and a restarted agent keeps the last catalog while it
//! hears nobody).
//!
//! chitchat's [`Transport`] trait works on decoded envelopes and keeps their codec private, so
//! [`AuthTransport`] reuses chitchat's own UDP codec through loopback: to send, chitchat's
//! socket encodes the envelope to a loopback socket of ours, which seals the bytes and sends
//! them to the peer; to receive, a verified frame's message is handed to a second chitchat
//! socket over loopback, which decodes it. Both loopback sockets are connected to their
//! partner, so nothing else can feed them. Each message costs two extra loopback datagrams,
//! negligible at gossip rates, and no copy of chitchat's wire format lives here.
//!
//! Limits: a frame is 52 bytes longer than chitchat's message, so a message within 52 bytes
//! of the UDP maximum (65,507 bytes on IPv4; only a catalog of thousands of endpoints gets
//! there) cannot be sent; it is dropped and counted as `oversize`.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as ChitchatUdp};
use chitchat::ChitchatEnvelope;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;
use tokio::net::UdpSocket;

use crate::telemetry::log_limit::LogLimit;

const MAGIC: &[u8; 4] = b"MGS2";
/// The magic of format 1 frames, refused.
const MAGIC_V1: &[u8; 4] = b"MGS1";
const TAG_LEN: usize = 32;
/// The sent time and the nonce.
const STAMP_LEN: usize = 16;
/// Bytes a frame adds to a message.
pub const OVERHEAD: usize = MAGIC.len() + STAMP_LEN + TAG_LEN;
/// How old a frame may be when it arrives.
pub const MAX_AGE: Duration = Duration::from_secs(5);
/// How far ahead of this host's clock a frame's time may be.
pub const MAX_SKEW: Duration = Duration::from_secs(5);
/// How far before this agent's start a frame may have been sent (clocks differ a little).
pub const STARTUP_SKEW: Duration = Duration::from_secs(1);
/// (sent, nonce) pairs remembered at most: 10 s of 6,500 datagrams/s, 35 times what an
/// agent of a 16-node mesh receives.
pub const REPLAY_MEMORY: usize = 65_536;
/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535 - 8;
/// Shortest mesh key accepted.
pub const MIN_KEY_LEN: usize = 16;
/// How long a verified message may take to come back from chitchat's decoder (it is already
/// there when it decodes; only a message chitchat rejects waits this long).
const DECODE_TIMEOUT: Duration = Duration::from_millis(50);

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
        HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!())
    }

    /// `message` framed with its `stamp` and tagged.
    pub fn seal(&self, message: &[u8], stamp: Stamp) -> Vec<u8> {
        let mut frame = Vec::with_capacity(message.len() + OVERHEAD);
        frame.extend_from_slice(MAGIC);
        frame.extend_from_slice(&stamp.sent_ms.to_be_bytes());
        frame.extend_from_slice(&stamp.nonce.to_be_bytes());
        frame.extend_from_slice(message);
        let mut mac = self.mac();
        mac.update(&frame);
        frame.extend_from_slice(&mac.finalize().into_bytes());
        frame
    }

    /// The message of an authentic, fresh `frame` not seen before (remembered in `seen`),
    /// at `now_ms` on this host's clock.
    pub fn open<'f>(
        &self,
        frame: &'f [u8],
        seen: &mut ReplayGuard,
        now_ms: u64,
    ) -> Result<&'f [u8], Rejected> {
        if frame.starts_with(MAGIC_V1) {
            return Err(Rejected::OldFormat);
        }
        if frame.len() < OVERHEAD || !frame.starts_with(MAGIC) {
            return Err(Rejected::NotAFrame);
        }
        let (body, tag) = frame.split_at(frame.len() - TAG_LEN);
        let mut mac = self.mac();
        mac.update(body);
        mac.verify_slice(tag).map_err(|_| Rejected::BadTag)?;
        let word = |at: usize| {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(&body[at..at + 8]);
            u64::from_be_bytes(bytes)
        };
        let stamp = Stamp {
            sent_ms: word(MAGIC.len()),
            nonce: word(MAGIC.len() + 8),
        };
        seen.admit(stamp, now_ms)?;
        Ok(&body[MAGIC.len() + STAMP_LEN..])
    }
}

/// When a frame was sent and its nonce: what makes each frame unique.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// The sender's clock, ms since the Unix epoch.
    pub sent_ms: u64,
    pub nonce: u64,
}

/// This host's clock in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// The stamps of the frames accepted within the window.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: HashSet<Stamp>,
    /// In order of arrival, to forget the oldest.
    order: VecDeque<Stamp>,
    /// Frames sent before this are refused (what this agent could not have remembered).
    floor_ms: u64,
}

impl ReplayGuard {
    /// The guard of an agent whose gossip starts at `started_ms`.
    pub fn starting_at(started_ms: u64) -> ReplayGuard {
        let skew = u64::try_from(STARTUP_SKEW.as_millis()).unwrap_or(u64::MAX);
        ReplayGuard {
            floor_ms: started_ms.saturating_sub(skew),
            ..ReplayGuard::default()
        }
    }

    /// Accepts `stamp` once, while fresh.
    fn admit(&mut self, stamp: Stamp, now_ms: u64) -> Result<(), Rejected> {
        let age = u64::try_from(MAX_AGE.as_millis()).unwrap_or(u64::MAX);
        let skew = u64::try_from(MAX_SKEW.as_millis()).unwrap_or(u64::MAX);
        if stamp.sent_ms.saturating_add(age) < now_ms || stamp.sent_ms < self.floor_ms {
            return Err(Rejected::Stale);
        }
        if stamp.sent_ms > now_ms.saturating_add(skew) {
            return Err(Rejected::Future);
        }
        while let Some(&oldest) = self.order.front() {
            if oldest.sent_ms.saturating_add(age) >= now_ms && self.order.len() < REPLAY_MEMORY {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&oldest);
        }
        if !self.seen.insert(stamp) {
            return Err(Rejected::Replayed);
        }
        self.order.push_back(stamp);
        Ok(())
    }
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Not a mesh gossip frame (wrong magic or too short).
    NotAFrame,
    /// A format 1 frame (an agent before replay protection).
    OldFormat,
    /// The tag does not match: another key, or altered on the way.
    BadTag,
    /// Sent longer than [`MAX_AGE`] ago.
    Stale,
    /// Sent more than [`MAX_SKEW`] ahead of this host's clock.
    Future,
    /// Accepted before: a replay.
    Replayed,
}

impl Rejected {
    pub const ALL: [Rejected; 6] = [
        Rejected::NotAFrame,
        Rejected::OldFormat,
        Rejected::BadTag,
        Rejected::Stale,
        Rejected::Future,
        Rejected::Replayed,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejected::NotAFrame => "not_a_frame",
            Rejected::OldFormat => "old_format",
            Rejected::BadTag => "hmac",
            Rejected::Stale => "stale",
            Rejected::Future => "future",
            Rejected::Replayed => "replayed",
        }
    }

    fn index(self) -> usize {
        Rejected::ALL.iter().position(|&r| r == self).unwrap_or(0)
    }
}

/// Counters of the gossip socket.
#[derive(Debug, Default)]
pub struct Stats {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Datagrams behind the byte counters (bytes per datagram: the size of gossip messages).
    pub datagrams_sent: AtomicU64,
    pub datagrams_received: AtomicU64,
    /// Datagrams dropped, by [`Rejected`] reason (in [`Rejected::ALL`] order).
    rejected: [AtomicU64; Rejected::ALL.len()],
    /// Authentic messages chitchat could not decode, and messages too large to frame.
    pub undeliverable: AtomicU64,
    /// When the last authentic datagram arrived.
    last_authentic: std::sync::Mutex<Option<Instant>>,
}

impl Stats {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Datagrams dropped, by reason label.
    pub fn rejected(&self) -> Vec<(&'static str, u64)> {
        Rejected::ALL
            .iter()
            .map(|r| (r.label(), self.rejected[r.index()].load(Ordering::Relaxed)))
            .collect()
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
            log: LogLimit::new(crate::telemetry::log_limit::PERIOD),
            seen: ReplayGuard::starting_at(now_ms()),
            nonce: random_u64(),
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
    log: LogLimit,
    /// The frames accepted within the window.
    seen: ReplayGuard,
    /// The next frame's nonce (random start, then counting).
    nonce: u64,
}

/// A random 64-bit number from the kernel (a clock-derived one if that fails, which only
/// weakens the nonce's unpredictability, not its uniqueness per sender).
fn random_u64() -> u64 {
    use std::io::Read as _;
    let mut bytes = [0; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        Ok(()) => u64::from_ne_bytes(bytes),
        Err(_) => now_ms() ^ u64::from(std::process::id()) << 32,
    }
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
        let stamp = Stamp {
            sent_ms: now_ms(),
            nonce: self.nonce,
        };
        self.nonce = self.nonce.wrapping_add(1);
        let frame = self.key.seal(&self.buf[..n], stamp);
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
            match self.key.open(&self.buf[..n], &mut self.seen, now_ms()) {
                Ok(message) => {
                    self.stats.heard();
                    self.feeder.send(message).await?;
                    self.pending = Some((from, n));
                }
                Err(why) => {
                    let total =
                        self.stats.rejected[why.index()].fetch_add(1, Ordering::Relaxed) + 1;
                    self.log.warn(|suppressed| {
                        if why == Rejected::OldFormat {
                            tracing::warn!(%from, total, suppressed, "refused a gossip frame of format 1: this agent speaks format 2 (timestamped, replay-protected); upgrade the agent at that address");
                        } else {
                            tracing::warn!(%from, bytes = n, reason = why.label(), total, suppressed, "dropped a gossip datagram");
                        }
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> MeshKey {
        MeshKey::new(&[b; 32]).unwrap()
    }

    const NOW: u64 = 1_800_000_000_000;

    fn stamp(sent_ms: u64, nonce: u64) -> Stamp {
        Stamp { sent_ms, nonce }
    }

    #[test]
    fn seal_and_open() {
        let mut seen = ReplayGuard::default();
        let frame = key(1).seal(b"hello", stamp(NOW, 1));
        assert_eq!(frame.len(), 5 + OVERHEAD);
        assert_eq!(key(2).open(&frame, &mut seen, NOW), Err(Rejected::BadTag));
        let mut altered = frame.clone();
        altered[5] ^= 1;
        assert_eq!(key(1).open(&altered, &mut seen, NOW), Err(Rejected::BadTag));
        assert_eq!(
            key(1).open(b"junk", &mut seen, NOW),
            Err(Rejected::NotAFrame)
        );
        assert_eq!(
            key(1).open(&frame[4..], &mut seen, NOW),
            Err(Rejected::NotAFrame)
        );
        assert_eq!(key(1).open(&frame, &mut seen, NOW), Ok(&b"hello"[..]));
        assert_eq!(MeshKey::new(b"short").unwrap_err(), 5);
    }

    #[test]
    fn a_frame_is_accepted_once_and_only_while_fresh() {
        let mut seen = ReplayGuard::default();
        let k = key(1);
        let frame = k.seal(b"m", stamp(NOW, 7));
        assert!(k.open(&frame, &mut seen, NOW + 100).is_ok());
        assert_eq!(
            k.open(&frame, &mut seen, NOW + 200),
            Err(Rejected::Replayed)
        );
        // The same time with another nonce is another frame.
        assert!(k
            .open(&k.seal(b"m", stamp(NOW, 8)), &mut seen, NOW + 200)
            .is_ok());
        let age = MAX_AGE.as_millis() as u64;
        assert_eq!(
            k.open(&frame, &mut seen, NOW + age + 1),
            Err(Rejected::Stale)
        );
        // A restarted agent (nothing remembered) refuses what was sent before it started.
        let mut restarted = ReplayGuard::starting_at(NOW + 1_500);
        assert_eq!(
            k.open(&frame, &mut restarted, NOW + 1_600),
            Err(Rejected::Stale)
        );
        let mut just_started = ReplayGuard::starting_at(NOW + 500);
        assert!(k.open(&frame, &mut just_started, NOW + 600).is_ok());
        let ahead = k.seal(b"m", stamp(NOW + MAX_SKEW.as_millis() as u64 + 1, 9));
        assert_eq!(k.open(&ahead, &mut seen, NOW), Err(Rejected::Future));
    }

    #[test]
    fn the_memory_is_bounded_and_forgets_what_left_the_window() {
        let mut seen = ReplayGuard::default();
        for n in 0..(REPLAY_MEMORY as u64 + 10) {
            seen.admit(stamp(NOW, n), NOW).unwrap();
        }
        assert!(seen.order.len() <= REPLAY_MEMORY);
        let later = NOW + MAX_AGE.as_millis() as u64 + 1;
        seen.admit(stamp(later, 0), later).unwrap();
        assert_eq!(seen.order.len(), 1);
    }

    /// A format 1 frame as the previous agent sealed them (`MGS1` ‖ message ‖
    /// HMAC-SHA256(`MGS1` ‖ message)), under the test key of 32 bytes of 1, kept in
    /// `testdata/`: refused as `old_format` (not `hmac`), so the log names the cause.
    #[test]
    fn a_recorded_format_1_frame_is_refused_as_old_format() {
        let recorded = include_bytes!("testdata/frame.v1.bin");
        assert!(recorded.starts_with(b"MGS1"));
        let mut seen = ReplayGuard::default();
        assert_eq!(
            key(1).open(recorded, &mut seen, NOW),
            Err(Rejected::OldFormat)
        );
        assert_eq!(Rejected::OldFormat.label(), "old_format");
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
