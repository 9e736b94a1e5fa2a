//! How a backend is probed: the [`Prober`] port the checker runs its probes through, and the
//! direct probe ([`Direct`]: a TCP connect, optionally followed by an HTTP/1.1 GET). A strict
//! mTLS backend is probed through the tunnel by the agent in front of it (the tunnel's
//! prober, `tunnel::TunnelProber`); the composition root picks one per target.
//!
//! Every probe socket carries [`AGENT_MARK`], so the kernel hooks leave it alone: the agent
//! checks the backend's real address, never a VIP. The whole probe (connect, request,
//! response head) is bounded by the check's timeout.

use std::{io, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{header, Request};
use hyper_util::rt::TokioIo;
use mesh_common::redirect::AGENT_MARK;
use tokio::net::{TcpSocket, TcpStream};

use super::checker::Target;
use crate::model::{ActiveCheck, HttpCheck};

/// Runs one probe of a target; the checker schedules them.
#[async_trait::async_trait]
pub trait Prober: Send + Sync + 'static {
    async fn probe(&self, target: &Target) -> Result<(), ProbeError>;
}

/// Probes the backend's address from this host.
pub struct Direct;

#[async_trait::async_trait]
impl Prober for Direct {
    async fn probe(&self, target: &Target) -> Result<(), ProbeError> {
        probe(target.backend, &target.check).await
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot open a probe socket: {cause}")]
    Socket { cause: io::Error },
    #[error("connect: {cause}")]
    Connect { cause: io::Error },
    #[error("no answer within {timeout:?}")]
    Timeout { timeout: Duration },
    #[error("HTTP: {cause}")]
    Http { cause: hyper::Error },
    #[error("HTTP status {got}, expected {want}")]
    Status { got: u16, want: u16 },
    #[error("through the mTLS tunnel: {cause}")]
    Tunnel { cause: String },
}

/// Probes `addr` as `check` says.
pub async fn probe(addr: SocketAddr, check: &ActiveCheck) -> Result<(), ProbeError> {
    let run = async {
        let stream = connect(addr).await?;
        match &check.http {
            None => Ok(()),
            Some(http) => get(stream, addr, http).await,
        }
    };
    tokio::time::timeout(check.timeout, run)
        .await
        .unwrap_or(Err(ProbeError::Timeout {
            timeout: check.timeout,
        }))
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, ProbeError> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|cause| ProbeError::Socket { cause })?;
    socket2::SockRef::from(&socket)
        .set_mark(AGENT_MARK)
        .map_err(|cause| ProbeError::Socket { cause })?;
    socket
        .connect(addr)
        .await
        .map_err(|cause| ProbeError::Connect { cause })
}

async fn get(stream: TcpStream, addr: SocketAddr, http: &HttpCheck) -> Result<(), ProbeError> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|cause| ProbeError::Http { cause })?;
    let request = Request::get(http.path.as_str())
        .header(header::HOST, addr.to_string())
        .header(header::USER_AGENT, "mesh-agent-health")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        // The path was checked with the config; a request that still does not build fails the
        // probe like a refused one would.
        .map_err(|e| ProbeError::Connect {
            cause: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
    let response = sender.send_request(request);
    tokio::pin!(response, connection);
    // The connection future drives the exchange; the response comes through `sender`. Only the
    // head is needed, so both end here and the socket closes with them.
    let response = tokio::select! {
        biased;
        response = &mut response => response,
        done = &mut connection => {
            done.map_err(|cause| ProbeError::Http { cause })?;
            response.await
        }
    }
    .map_err(|cause| ProbeError::Http { cause })?;
    let got = response.status().as_u16();
    if got == http.expect_status {
        Ok(())
    } else {
        Err(ProbeError::Status {
            got,
            want: http.expect_status,
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    fn check(http: Option<(&str, u16)>) -> ActiveCheck {
        ActiveCheck {
            interval: Duration::from_millis(1000),
            timeout: Duration::from_millis(500),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
            http: http.map(|(path, expect_status)| HttpCheck {
                path: path.into(),
                expect_status,
            }),
        }
    }

    /// A server answering each connection's request with `status`; returns its address and
    /// the request lines it saw.
    async fn http_server(status: u16) -> (SocketAddr, tokio::sync::mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                let _ = tx.send(text.lines().next().unwrap_or("").to_owned()).await;
                let reply = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok");
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn tcp_connect_check() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        probe(addr, &check(None)).await.unwrap();
        drop(listener);
        let e = probe(addr, &check(None)).await.unwrap_err();
        assert!(
            matches!(&e, ProbeError::Connect { cause } if cause.kind() == io::ErrorKind::ConnectionRefused),
            "{e}"
        );
    }

    #[tokio::test]
    async fn http_check_wants_its_status() {
        let (addr, mut requests) = http_server(200).await;
        probe(addr, &check(Some(("/healthz", 200)))).await.unwrap();
        assert_eq!(requests.recv().await.unwrap(), "GET /healthz HTTP/1.1");
        let (addr, _requests) = http_server(503).await;
        let e = probe(addr, &check(Some(("/", 200)))).await.unwrap_err();
        assert_eq!(e.to_string(), "HTTP status 503, expected 200");
        probe(addr, &check(Some(("/", 503)))).await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        // Accepts (the kernel does, from the backlog) but never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let e = probe(addr, &check(Some(("/", 200)))).await.unwrap_err();
        assert!(matches!(e, ProbeError::Timeout { .. }), "{e}");
        drop(listener);
    }
}
