//! The agent's listening sockets (admin API, mTLS outbound and inbound, metrics, gossip):
//! bound at start, or taken from the predecessor when the config still wants them where they
//! are; kept here as plain non-blocking std sockets for as long as the agent serves. Each set
//! of accept loops works on copies of the descriptors, so the loops can be stopped and
//! started again (a takeover that failed) and the originals handed to a successor.

use std::{
    io,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::net::UnixListener,
    },
    path::Path,
};

use crate::{
    admin::takeover::{Inherited, Kind},
    admin::{self, AdminError},
    gossip::{self, GossipError},
    telemetry::metrics,
    tunnel::{Listeners, TunnelConfig, TunnelError},
};

/// Where the config wants the sockets.
pub struct Wanted<'a> {
    pub admin: &'a Path,
    /// `None` without `[mtls]`.
    pub tunnel: Option<&'a TunnelConfig>,
    pub metrics: SocketAddr,
    /// `None` without `[gossip]`.
    pub gossip: Option<SocketAddr>,
}

/// Why the sockets could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SocketsError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error(transparent)]
    Gossip(#[from] GossipError),
    #[error("cannot copy a listening socket's descriptor: {0}")]
    Copy(io::Error),
}

// The cause is in the message and not a `source`, or `{:#}` would print it twice.
impl From<io::Error> for SocketsError {
    fn from(cause: io::Error) -> Self {
        SocketsError::Copy(cause)
    }
}

/// The listening sockets.
#[derive(Debug)]
pub struct Sockets {
    admin: UnixListener,
    tunnel: Option<Listeners>,
    /// `None` when it could not bind (logged; metrics are off).
    metrics: Option<TcpListener>,
    gossip: Option<UdpSocket>,
}

fn local_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    socket2::SockRef::from(fd).local_addr().ok()?.as_socket()
}

/// A received descriptor as a non-blocking socket of type `T`.
fn adopt<T: From<OwnedFd> + AsFd>(fd: OwnedFd) -> io::Result<T> {
    socket2::SockRef::from(&fd).set_nonblocking(true)?;
    Ok(T::from(fd))
}

impl Sockets {
    /// Takes what `inherited` has where `wanted` says, and binds the rest.
    pub fn open(
        wanted: &Wanted<'_>,
        mut inherited: Option<&mut Inherited>,
    ) -> Result<Sockets, SocketsError> {
        let mut take = |kind: Kind, accept: &dyn Fn(&OwnedFd) -> bool| {
            inherited.as_mut().and_then(|i| i.take(kind, accept))
        };
        let admin = match take(Kind::Admin, &|fd| {
            socket2::SockRef::from(fd)
                .local_addr()
                .ok()
                .is_some_and(|a| a.as_pathname() == Some(wanted.admin))
        }) {
            Some(fd) => adopt(fd)?,
            None => admin::bind(wanted.admin)?,
        };
        let tunnel = match wanted.tunnel {
            None => None,
            Some(config) => {
                let port =
                    |p: u16| move |fd: &OwnedFd| local_addr(fd).is_some_and(|a| a.port() == p);
                let inbound = match take(Kind::Inbound, &port(config.inbound_port)) {
                    Some(fd) => adopt(fd)?,
                    None => Listeners::bind_inbound(config.inbound_port)?,
                };
                let mut outbound = Vec::new();
                while let Some(fd) = take(Kind::Outbound, &port(config.outbound_port)) {
                    outbound.push(adopt(fd)?);
                }
                if outbound.is_empty() {
                    outbound = Listeners::bind_outbound(config.outbound_port)?;
                }
                Some(Listeners { outbound, inbound })
            }
        };
        let metrics = match take(Kind::Metrics, &|fd| local_addr(fd) == Some(wanted.metrics)) {
            Some(fd) => Some(adopt(fd)?),
            None => metrics::bind(wanted.metrics)
                .inspect_err(|error| tracing::error!("{error}; metrics are off"))
                .ok(),
        };
        let gossip = match wanted.gossip {
            None => None,
            Some(listen) => match take(Kind::Gossip, &|fd| local_addr(fd) == Some(listen)) {
                Some(fd) => Some(adopt(fd)?),
                None => Some(gossip::bind(listen)?),
            },
        };
        Ok(Sockets {
            admin,
            tunnel,
            metrics,
            gossip,
        })
    }

    /// Every socket, named, as a takeover hands them over.
    pub fn handover(&self) -> Vec<(Kind, BorrowedFd<'_>)> {
        let mut fds = vec![(Kind::Admin, self.admin.as_fd())];
        if let Some(tunnel) = &self.tunnel {
            fds.extend(tunnel.outbound.iter().map(|l| (Kind::Outbound, l.as_fd())));
            fds.push((Kind::Inbound, tunnel.inbound.as_fd()));
        }
        fds.extend(self.metrics.iter().map(|l| (Kind::Metrics, l.as_fd())));
        fds.extend(self.gossip.iter().map(|s| (Kind::Gossip, s.as_fd())));
        fds
    }

    /// A copy of the admin listener, for one accept loop.
    pub fn admin(&self) -> io::Result<tokio::net::UnixListener> {
        tokio::net::UnixListener::from_std(self.admin.try_clone()?)
    }

    /// Copies of the tunnel's listeners.
    pub fn tunnel(&self) -> io::Result<Option<Listeners>> {
        self.tunnel.as_ref().map(Listeners::try_clone).transpose()
    }

    /// A copy of the metrics listener.
    pub fn metrics(&self) -> io::Result<Option<tokio::net::TcpListener>> {
        self.metrics
            .as_ref()
            .map(|l| tokio::net::TcpListener::from_std(l.try_clone()?))
            .transpose()
    }

    /// A copy of the gossip socket.
    pub fn gossip(&self) -> io::Result<Option<UdpSocket>> {
        self.gossip.as_ref().map(UdpSocket::try_clone).transpose()
    }
}
