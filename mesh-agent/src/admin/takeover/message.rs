//! The handover message: one `sendmsg(2)` on the takeover connection carrying the
//! predecessor's descriptors as `SCM_RIGHTS` and a small JSON [`Header`] naming each of them,
//! in order.
//!
//! Wire format: a 4-byte big-endian length, then that many bytes of JSON; the descriptors ride
//! on the first byte (the kernel attaches them to the first `recvmsg` that reads it). Received
//! descriptors are close-on-exec (`MSG_CMSG_CLOEXEC`). A message whose header does not name
//! exactly the descriptors that came is refused, and every received descriptor is closed.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use serde::{Deserialize, Serialize};
use tokio::{io::Interest, net::UnixStream};

/// The format of the header; a successor refuses any other.
pub const VERSION: u32 = 1;

/// At most this many descriptors in one message (the kernel allows 253).
pub const MAX_FDS: usize = 16;

/// The largest header accepted.
const MAX_HEADER: usize = 64 * 1024;

/// What each descriptor of the message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The node lock (the locked pin directory).
    Lock,
    /// The admin API's Unix listener.
    Admin,
    /// An outbound mTLS listener (loopback).
    Outbound,
    /// The inbound mTLS listener.
    Inbound,
    /// The Prometheus listener.
    Metrics,
    /// The gossip UDP socket.
    Gossip,
}

/// The JSON part of the message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub v: u32,
    /// The predecessor's pid and version, for the successor's log.
    pub pid: u32,
    pub agent: String,
    /// One entry per descriptor, in the order they were sent.
    pub fds: Vec<Kind>,
}

/// Why a handover message could not be sent or read.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("cannot send the handover message: {0}")]
    Send(io::Error),
    #[error("cannot receive the handover message: {0}")]
    Receive(io::Error),
    #[error("the connection closed before the handover message was complete")]
    Truncated,
    #[error("the handover header is {0} bytes, more than {MAX_HEADER}")]
    TooLarge(usize),
    #[error("{0} descriptors to send, more than {MAX_FDS}")]
    TooManyFds(usize),
    #[error("unreadable handover header: {0}")]
    Header(serde_json::Error),
    #[error("handover header version {0}, this agent reads version {VERSION}")]
    Version(u32),
    #[error("the header names {named} descriptors but {received} came")]
    Mismatch { named: usize, received: usize },
    #[error("the kernel cut the descriptors short (MSG_CTRUNC)")]
    ControlTruncated,
}

// The cause is in the message and not a `source`, or `{:#}` would print it twice.
impl From<serde_json::Error> for MessageError {
    fn from(cause: serde_json::Error) -> Self {
        MessageError::Header(cause)
    }
}

/// The control buffer for up to [`MAX_FDS`] descriptors, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct Control([u8; 128]);

// The control buffer holds a cmsghdr and MAX_FDS descriptors, with room for alignment.
const _: () = assert!(
    std::mem::size_of::<libc::cmsghdr>() + MAX_FDS * std::mem::size_of::<RawFd>() + 8 <= 128
);

/// Sends `header` with `fds` (as many as `header.fds` names).
pub async fn send(
    stream: &UnixStream,
    header: &Header,
    fds: &[BorrowedFd<'_>],
) -> Result<(), MessageError> {
    if fds.len() > MAX_FDS {
        return Err(MessageError::TooManyFds(fds.len()));
    }
    let json = serde_json::to_vec(header)?;
    let mut payload = u32::try_from(json.len())
        .map_err(|_| MessageError::TooLarge(json.len()))?
        .to_be_bytes()
        .to_vec();
    payload.extend_from_slice(&json);
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = stream
        .async_io(Interest::WRITABLE, || send_with_fds(stream, &payload, &raw))
        .await
        .map_err(MessageError::Send)?;
    // The descriptors went with the first byte; the rest (if the buffer was short) goes plain.
    while sent < payload.len() {
        stream.writable().await.map_err(MessageError::Send)?;
        match stream.try_write(&payload[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(MessageError::Send(e)),
        }
    }
    Ok(())
}

fn send_with_fds(stream: &UnixStream, payload: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut control = Control([0; 128]);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let fd_bytes = std::mem::size_of_val(fds);
    if !fds.is_empty() {
        // SAFETY: CMSG_* compute within `control`, which is large enough (asserted above) and
        // aligned for cmsghdr; the fds are copied into its data.
        unsafe {
            msg.msg_control = control.0.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(fd_bytes as u32) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    // SAFETY: sendmsg on a descriptor `stream` owns, with the msghdr built above.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Reads one message: its header and the descriptors it names, in order.
pub async fn receive(stream: &UnixStream) -> Result<(Header, Vec<OwnedFd>), MessageError> {
    let mut buffer = vec![0u8; 4 + MAX_HEADER];
    let (mut read, fds) = stream
        .async_io(Interest::READABLE, || receive_with_fds(stream, &mut buffer))
        .await
        .map_err(MessageError::Receive)?;
    let end = loop {
        let want = if read >= 4 {
            let len = u32::from_be_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]) as usize;
            if len > MAX_HEADER {
                return Err(MessageError::TooLarge(len));
            }
            4 + len
        } else {
            4
        };
        if read >= want && read >= 4 {
            break want;
        }
        if read == 0 {
            return Err(MessageError::Truncated);
        }
        stream.readable().await.map_err(MessageError::Receive)?;
        match stream.try_read(&mut buffer[read..want]) {
            Ok(0) => return Err(MessageError::Truncated),
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(MessageError::Receive(e)),
        }
    };
    let header: Header = serde_json::from_slice(&buffer[4..end])?;
    if header.v != VERSION {
        return Err(MessageError::Version(header.v));
    }
    if header.fds.len() != fds.len() {
        return Err(MessageError::Mismatch {
            named: header.fds.len(),
            received: fds.len(),
        });
    }
    Ok((header, fds))
}

fn receive_with_fds(stream: &UnixStream, buffer: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = Control([0; 128]);
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: an all-zero msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: recvmsg into the buffers above, on a descriptor `stream` owns.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control data the kernel wrote into `control`; each
    // SCM_RIGHTS entry holds whole descriptors, now owned by this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // `fds` (what did come) is closed on return.
        return Err(io::Error::other(MessageError::ControlTruncated));
    }
    Ok((n as usize, fds))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    fn header(fds: Vec<Kind>) -> Header {
        Header {
            v: VERSION,
            pid: 42,
            agent: "0.1.0 (test)".into(),
            fds,
        }
    }

    #[tokio::test]
    async fn descriptors_arrive_named_and_usable() {
        let (old, new) = UnixStream::pair().unwrap();
        let inbound = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gossip = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sent = header(vec![Kind::Inbound, Kind::Gossip]);
        send(&old, &sent, &[inbound.as_fd(), gossip.as_fd()])
            .await
            .unwrap();
        let (got, fds) = receive(&new).await.unwrap();
        assert_eq!(got, sent);
        let mut fds = fds.into_iter();
        let listener = std::net::TcpListener::from(fds.next().unwrap());
        assert_eq!(
            listener.local_addr().unwrap(),
            inbound.local_addr().unwrap()
        );
        let udp = std::net::UdpSocket::from(fds.next().unwrap());
        assert_eq!(udp.local_addr().unwrap(), gossip.local_addr().unwrap());
        // The received listener is the same socket: a connect queued on it is accepted here.
        drop(inbound);
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());
    }

    #[tokio::test]
    async fn a_header_naming_other_descriptors_is_refused() {
        let (old, new) = UnixStream::pair().unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Names two, sends one.
        send(
            &old,
            &header(vec![Kind::Lock, Kind::Admin]),
            &[socket.as_fd()],
        )
        .await
        .unwrap();
        let err = receive(&new).await.unwrap_err();
        assert!(
            matches!(
                err,
                MessageError::Mismatch {
                    named: 2,
                    received: 1
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn another_version_and_a_cut_message_are_refused() {
        let (old, new) = UnixStream::pair().unwrap();
        let mut future = header(vec![]);
        future.v = 2;
        send(&old, &future, &[]).await.unwrap();
        let err = receive(&new).await.unwrap_err();
        assert!(matches!(err, MessageError::Version(2)), "{err}");

        let (old, new) = UnixStream::pair().unwrap();
        old.try_write(&[0, 0, 0, 50, b'{']).unwrap();
        drop(old);
        let err = receive(&new).await.unwrap_err();
        assert!(matches!(err, MessageError::Truncated), "{err}");
    }

    #[test]
    fn the_header_is_plain_json() {
        let text = serde_json::to_string(&header(vec![Kind::Lock, Kind::Outbound])).unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"pid":42,"agent":"0.1.0 (test)","fds":["lock","outbound"]}"#
        );
    }
}
