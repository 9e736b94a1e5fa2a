//! Takeover: a new agent (`mesh-agent run --takeover`) replaces the running one on its node
//! without a moment where a connect is refused or the node is unlocked.
//!
//! The protocol, over the running agent's admin socket:
//!
//! 1. The successor sends `POST /v1/takeover` with `Upgrade: mesh-takeover/1`; the running
//!    agent (the predecessor) checks the caller is root (`SO_PEERCRED`) and answers
//!    `101 Switching Protocols`. The connection is now a plain stream between the two; the
//!    successor sends [`ASK`] once it has read the answer (descriptors sent earlier could
//!    land in its HTTP read buffer, and descriptors read without a control buffer are lost).
//! 2. The predecessor stops gossip and every accept loop (so two processes never read one
//!    socket), then sends one [`message`]: the node lock, the admin, outbound, inbound,
//!    metrics and gossip sockets as `SCM_RIGHTS`, named by a JSON header. What waits in a
//!    listener's backlog meanwhile is accepted by the successor.
//! 3. The successor adopts the lock, installs the data plane (adopting the pinned maps and
//!    replacing the links), applies its config and sends [`READY`].
//! 4. The predecessor makes the successor systemd's main process (`MAINPID=`), answers [`GO`],
//!    closes its copies of the sockets and drains: it relays the flows it has until they end
//!    or its drain timeout passes, then exits, leaving the pins and the admin socket alone.
//!    Only after `GO` does the successor serve.
//!
//! If the successor fails before `READY` (bad config, incompatible pins, crash) or is not
//! ready within [`READY_TIMEOUT`], the predecessor serves again with its copies of the
//! sockets and the successor, if still there, exits on the closed connection.

pub mod message;

use std::{
    io,
    os::fd::{BorrowedFd, OwnedFd},
    path::Path,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{header, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
};

pub use message::Kind;
use message::{Header, MessageError};

/// The admin route of a takeover.
pub const PATH: &str = "/v1/takeover";

/// The protocol named in the `Upgrade` header.
pub const PROTOCOL: &str = "mesh-takeover/1";

/// Successor → predecessor: upgraded; send the sockets.
pub const ASK: u8 = b'T';

/// Successor → predecessor: installed and configured, about to serve.
pub const READY: u8 = b'R';

/// Predecessor → successor: committed; serve now.
pub const GO: u8 = b'G';

/// How long the predecessor waits for [`READY`] before it serves again.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a takeover failed.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("cannot reach the running agent at {path}: {cause}")]
    Connect { path: String, cause: io::Error },
    #[error("takeover request failed: {0}")]
    Http(hyper::Error),
    #[error("the running agent refused the takeover: {status} {body}")]
    Refused { status: StatusCode, body: String },
    #[error("the running agent answered the takeover without switching protocols")]
    NotUpgraded,
    #[error(transparent)]
    Message(#[from] MessageError),
    #[error("the successor was not ready within {0:?}")]
    NotReady(Duration),
    #[error("the successor went away before it was ready ({0})")]
    SuccessorGone(io::Error),
    #[error("the running agent did not commit to the takeover ({0}); it serves on")]
    NotCommitted(io::Error),
    #[error("cannot answer the successor: {0}")]
    Answer(io::Error),
}

// The cause is in the message and not a `source`, or `{:#}` would print it twice.
impl From<hyper::Error> for TakeoverError {
    fn from(cause: hyper::Error) -> Self {
        TakeoverError::Http(cause)
    }
}

/// The descriptors a predecessor handed over; what is not taken is closed with it.
#[derive(Debug)]
pub struct Inherited {
    predecessor: Header,
    fds: Vec<(Kind, Option<OwnedFd>)>,
    stream: UnixStream,
}

/// Asks the agent on `admin_socket` to hand its sockets over. `Ok(None)` when no agent
/// answers there (no socket, or nobody listening): the caller starts as usual.
pub async fn request(admin_socket: &Path) -> Result<Option<Inherited>, TakeoverError> {
    let stream = match UnixStream::connect(admin_socket).await {
        Ok(stream) => stream,
        Err(cause)
            if matches!(
                cause.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(cause) => {
            return Err(TakeoverError::Connect {
                path: admin_socket.display().to_string(),
                cause,
            })
        }
    };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection.with_upgrades());
    let request = Request::post(PATH)
        .header(header::HOST, "mesh-agent")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(Empty::<Bytes>::new())
        .expect("a constant request is well formed");
    let response = sender.send_request(request).await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        return Err(TakeoverError::Refused { status, body });
    }
    let upgraded = hyper::upgrade::on(response).await?;
    // The connection task ends with the upgrade; the stream is ours now.
    drop(connection);
    let parts = upgraded
        .downcast::<TokioIo<UnixStream>>()
        .map_err(|_| TakeoverError::NotUpgraded)?;
    if !parts.read_buf.is_empty() {
        return Err(TakeoverError::NotUpgraded);
    }
    Inherited::receive(parts.io.into_inner()).await.map(Some)
}

impl Inherited {
    /// Asks the predecessor at the other end of `stream` (upgraded) for its sockets and
    /// receives them.
    async fn receive(mut stream: UnixStream) -> Result<Inherited, TakeoverError> {
        stream
            .write_all(&[ASK])
            .await
            .map_err(|cause| TakeoverError::Message(MessageError::Send(cause)))?;
        let (predecessor, fds) = message::receive(&stream).await?;
        tracing::info!(
            pid = predecessor.pid,
            agent = predecessor.agent,
            sockets = ?predecessor.fds,
            "taking over from the running agent"
        );
        Ok(Inherited {
            fds: predecessor
                .fds
                .iter()
                .copied()
                .zip(fds.into_iter().map(Some))
                .collect(),
            predecessor,
            stream,
        })
    }

    /// The predecessor's pid.
    pub fn predecessor(&self) -> u32 {
        self.predecessor.pid
    }

    /// The first descriptor of `kind` that `wanted` accepts, taken.
    pub fn take(&mut self, kind: Kind, wanted: impl Fn(&OwnedFd) -> bool) -> Option<OwnedFd> {
        self.fds
            .iter_mut()
            .filter(|(k, fd)| *k == kind && fd.as_ref().is_some_and(&wanted))
            .find_map(|(_, fd)| fd.take())
    }

    /// Tells the predecessor this agent is ready and waits for its go: `Ok` means serve now.
    /// The descriptors not taken are closed.
    pub async fn ready(mut self) -> Result<(), TakeoverError> {
        let unused: Vec<Kind> = self
            .fds
            .iter()
            .filter(|(_, fd)| fd.is_some())
            .map(|(kind, _)| *kind)
            .collect();
        if !unused.is_empty() {
            tracing::info!(
                ?unused,
                "sockets of the predecessor this config does not use are closed"
            );
        }
        self.fds.clear();
        self.stream
            .write_all(&[READY])
            .await
            .map_err(TakeoverError::NotCommitted)?;
        let mut answer = [0u8; 1];
        match self.stream.read(&mut answer).await {
            Ok(1) if answer[0] == GO => Ok(()),
            Ok(_) => Err(TakeoverError::NotCommitted(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed",
            ))),
            Err(cause) => Err(TakeoverError::NotCommitted(cause)),
        }
    }
}

/// A successor that asked for this agent's sockets: the upgraded admin connection.
#[derive(Debug)]
pub struct Successor {
    stream: UnixStream,
    pid: Option<u32>,
}

/// How long a successor may take to send [`ASK`] after the upgrade.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

impl Successor {
    /// Waits for the [`ASK`] of the successor on `stream` (`early`: what the HTTP server had
    /// read of it past the request), whose process is `pid` (from `SO_PEERCRED`).
    pub async fn asking(
        mut stream: UnixStream,
        early: Bytes,
        pid: Option<u32>,
    ) -> Result<Successor, TakeoverError> {
        let mut byte = [0u8; 1];
        let asked = match early.first() {
            Some(&first) => Ok(first),
            None => match tokio::time::timeout(ASK_TIMEOUT, stream.read(&mut byte)).await {
                Err(_) => return Err(TakeoverError::NotReady(ASK_TIMEOUT)),
                Ok(Ok(1)) => Ok(byte[0]),
                Ok(Ok(_)) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed",
                )),
                Ok(Err(cause)) => Err(cause),
            },
        };
        match asked {
            Ok(ASK) => Ok(Successor { stream, pid }),
            Ok(other) => Err(TakeoverError::SuccessorGone(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected byte {other:#04x} instead of the ask"),
            ))),
            Err(cause) => Err(TakeoverError::SuccessorGone(cause)),
        }
    }

    /// The successor's pid, if known.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Sends `fds` and waits until the successor is ready, then makes it systemd's main
    /// process and tells it to go. `Ok`: the successor serves and this agent must drain.
    /// The caller has stopped everything that reads the sockets.
    pub async fn hand_over(mut self, fds: &[(Kind, BorrowedFd<'_>)]) -> Result<(), TakeoverError> {
        let header = Header {
            v: message::VERSION,
            pid: std::process::id(),
            agent: crate::VERSION.to_owned(),
            fds: fds.iter().map(|(kind, _)| *kind).collect(),
        };
        let raw: Vec<BorrowedFd<'_>> = fds.iter().map(|(_, fd)| *fd).collect();
        message::send(&self.stream, &header, &raw).await?;
        let mut answer = [0u8; 1];
        match tokio::time::timeout(READY_TIMEOUT, self.stream.read(&mut answer)).await {
            Err(_) => return Err(TakeoverError::NotReady(READY_TIMEOUT)),
            Ok(Ok(1)) if answer[0] == READY => {}
            Ok(Ok(_)) => {
                return Err(TakeoverError::SuccessorGone(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed",
                )))
            }
            Ok(Err(cause)) => return Err(TakeoverError::SuccessorGone(cause)),
        }
        // Before GO: this process is still alive, so systemd never sees the unit without one.
        if let Some(pid) = self.pid {
            crate::sys::sd_notify::main_pid(pid);
        }
        if let Err(cause) = self.stream.write_all(&[GO]).await {
            crate::sys::sd_notify::main_pid(std::process::id());
            return Err(TakeoverError::Answer(cause));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    /// The two ends of an upgraded takeover connection, the predecessor's already asked.
    async fn connected() -> (
        Successor,
        tokio::task::JoinHandle<Result<Inherited, TakeoverError>>,
    ) {
        let (old, new) = UnixStream::pair().unwrap();
        let receiving = tokio::spawn(Inherited::receive(new));
        let successor = Successor::asking(old, Bytes::new(), None).await.unwrap();
        (successor, receiving)
    }

    #[tokio::test]
    async fn sockets_go_over_and_both_sides_commit() {
        let (successor, receiving) = connected().await;
        let lock = tempfile_dir();
        let inbound = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let want = inbound.local_addr().unwrap();
        let handing = tokio::spawn(async move {
            successor
                .hand_over(&[(Kind::Lock, lock.as_fd()), (Kind::Inbound, inbound.as_fd())])
                .await
        });
        let mut inherited = receiving.await.unwrap().unwrap();
        assert_eq!(inherited.predecessor(), std::process::id());
        assert!(inherited.take(Kind::Metrics, |_| true).is_none());
        let fd = inherited.take(Kind::Inbound, |_| true).unwrap();
        assert_eq!(std::net::TcpListener::from(fd).local_addr().unwrap(), want);
        assert!(
            inherited.take(Kind::Lock, |_| false).is_none(),
            "refused by the filter"
        );
        inherited.ready().await.unwrap();
        handing.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_successor_gone_before_ready_leaves_the_predecessor_serving() {
        let (successor, receiving) = connected().await;
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let handing =
            tokio::spawn(
                async move { successor.hand_over(&[(Kind::Gossip, socket.as_fd())]).await },
            );
        // The successor received the sockets, then failed (its install, say) and exited.
        drop(receiving.await.unwrap().unwrap());
        let err = handing.await.unwrap().unwrap_err();
        assert!(matches!(err, TakeoverError::SuccessorGone(_)), "{err}");
    }

    #[tokio::test]
    async fn a_predecessor_that_does_not_commit_stops_the_successor() {
        let (old, new) = UnixStream::pair().unwrap();
        let receiving = tokio::spawn(Inherited::receive(new));
        let mut old = Successor::asking(old, Bytes::new(), None)
            .await
            .unwrap()
            .stream;
        let header = Header {
            v: message::VERSION,
            pid: 1,
            agent: "old".into(),
            fds: vec![],
        };
        message::send(&old, &header, &[]).await.unwrap();
        let inherited = receiving.await.unwrap().unwrap();
        let ready = tokio::spawn(inherited.ready());
        // The predecessor reads READY but serves again instead of answering GO.
        let mut byte = [0u8; 1];
        old.read_exact(&mut byte).await.unwrap();
        assert_eq!(byte[0], READY);
        drop(old);
        let err = ready.await.unwrap().unwrap_err();
        assert!(matches!(err, TakeoverError::NotCommitted(_)), "{err}");
    }

    #[tokio::test]
    async fn an_ask_already_read_by_the_http_server_counts() {
        let (old, _new) = UnixStream::pair().unwrap();
        Successor::asking(old, Bytes::from_static(&[ASK]), Some(7))
            .await
            .unwrap();
        let (old, _new) = UnixStream::pair().unwrap();
        let err = Successor::asking(old, Bytes::from_static(b"x"), None)
            .await
            .unwrap_err();
        assert!(matches!(err, TakeoverError::SuccessorGone(_)), "{err}");
    }

    /// A directory to stand in for the locked pin directory.
    fn tempfile_dir() -> std::fs::File {
        std::fs::File::open(std::env::temp_dir()).unwrap()
    }
}
