//! The agent's own TCP connections (to a peer's inbound port, to a local backend): marked with
//! [`AGENT_MARK`] so the kernel hooks leave them alone and strict ingress admits them.

use std::{io, net::SocketAddr, time::Duration};

use mesh_common::redirect::AGENT_MARK;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// How long a connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `addr` from a socket marked [`AGENT_MARK`].
pub async fn dial_marked(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(AGENT_MARK)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    Ok(stream)
}

/// Makes the next close of `stream` send a reset (RST) instead of a FIN.
pub fn reset_on_close(stream: &TcpStream) {
    // A failure leaves an orderly close, which the peer sees as end of stream.
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
