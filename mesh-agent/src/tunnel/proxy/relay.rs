//! Copying one flow's bytes between a plain TCP connection and its HTTP/2 stream, both ways at
//! once. End of stream travels as a half-close (TCP FIN ↔ HTTP/2 END_STREAM) so either side may
//! finish sending and keep receiving; an error on one side resets the other (TCP RST ↔
//! HTTP/2 RST_STREAM).

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::{
    io::AsyncWriteExt as _,
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};

use crate::tunnel::proxy::socket::reset_on_close;

/// The largest read from the TCP side (also the largest DATA payload queued at once).
const READ_BUFFER: usize = 256 * 1024;
/// The first buffer of a flow. A read that fills the buffer doubles the next one, up to
/// [`READ_BUFFER`], so bulk flows reach large reads within a few round trips while an idle or
/// chatty flow keeps a small one.
const FIRST_READ_BUFFER: usize = 4 * 1024;

/// The read buffer of one direction of a flow. Nothing is allocated until the socket has data
/// (10,000 idle flows cost no buffers), and reads go into the rest of the current buffer until
/// little is left, so small messages do not cost an allocation each.
struct ReadBuffer {
    buffer: BytesMut,
    next: usize,
}

impl ReadBuffer {
    fn new() -> Self {
        Self {
            buffer: BytesMut::new(),
            next: FIRST_READ_BUFFER,
        }
    }

    /// Waits for data and reads it; `None` at end of stream.
    async fn read(&mut self, socket: &mut OwnedReadHalf) -> io::Result<Option<Bytes>> {
        loop {
            socket.readable().await?;
            // A tail of less than a quarter is let go (it would cut reads short).
            if self.buffer.capacity() < self.next / 4 {
                self.buffer.reserve(self.next);
            }
            let room = self.buffer.capacity();
            match socket.try_read_buf(&mut self.buffer) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    if n == room {
                        self.next = (self.next * 2).min(READ_BUFFER);
                    }
                    return Ok(Some(self.buffer.split().freeze()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Byte totals of one flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// TCP → stream.
    pub sent: u64,
    /// Stream → TCP.
    pub received: u64,
}

/// Relays until both directions ended; the totals so far are added to `sent`/`received` as
/// they go (for the metrics). Returns the flow's totals, and the error that reset it, if one
/// did.
pub async fn relay(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    sent: &AtomicU64,
    received: &AtomicU64,
) -> (Transferred, io::Result<()>) {
    let (mut read, mut write) = tcp.into_split();
    let mut totals = Transferred::default();
    let result = tokio::try_join!(
        tcp_to_stream(&mut read, &mut send, sent, &mut totals.sent),
        stream_to_tcp(&mut recv, &mut write, received, &mut totals.received),
    );
    if let Err(error) = result {
        send.send_reset(Reason::CANCEL);
        reset_on_close(write.as_ref());
        return (totals, Err(error));
    }
    (totals, Ok(()))
}

fn h2_error(error: h2::Error) -> io::Error {
    if error.is_io() {
        error
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, error)
    }
}

async fn tcp_to_stream(
    read: &mut OwnedReadHalf,
    send: &mut SendStream<Bytes>,
    counter: &AtomicU64,
    total: &mut u64,
) -> io::Result<()> {
    let mut buffer = ReadBuffer::new();
    loop {
        let Some(mut data) = buffer.read(read).await? else {
            send.send_data(Bytes::new(), true).map_err(h2_error)?;
            return Ok(());
        };
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))?
                .map_err(h2_error)?;
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            let len = chunk.len() as u64;
            send.send_data(chunk, false).map_err(h2_error)?;
            counter.fetch_add(len, Ordering::Relaxed);
            *total += len;
        }
    }
}

async fn stream_to_tcp(
    recv: &mut RecvStream,
    write: &mut OwnedWriteHalf,
    counter: &AtomicU64,
    total: &mut u64,
) -> io::Result<()> {
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_error)?;
        write.write_all(&data).await?;
        let _ = recv.flow_control().release_capacity(data.len());
        counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        *total += data.len() as u64;
    }
    // END_STREAM: the other side finished sending.
    write.shutdown().await
}
