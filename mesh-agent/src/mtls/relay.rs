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
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};

use super::socket::reset_on_close;

/// Bytes read from the TCP side at a time (also the largest DATA payload queued at once).
const READ_BUFFER: usize = 256 * 1024;
/// Reads go into the rest of the current buffer until less than this is left; only then is a
/// new one allocated, so small messages do not cost an allocation of [`READ_BUFFER`] each.
const MIN_READ_SPACE: usize = 16 * 1024;

/// Byte totals of one flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// TCP → stream.
    pub sent: u64,
    /// Stream → TCP.
    pub received: u64,
}

/// Relays until both directions ended; the totals so far are added to `sent`/`received` as
/// they go (for the metrics).
pub async fn relay(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    sent: &AtomicU64,
    received: &AtomicU64,
) -> io::Result<Transferred> {
    let (mut read, mut write) = tcp.into_split();
    let mut totals = Transferred::default();
    let result = tokio::try_join!(
        tcp_to_stream(&mut read, &mut send, sent, &mut totals.sent),
        stream_to_tcp(&mut recv, &mut write, received, &mut totals.received),
    );
    if let Err(error) = result {
        send.send_reset(Reason::CANCEL);
        reset_on_close(write.as_ref());
        return Err(error);
    }
    Ok(totals)
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
    let mut buffer = BytesMut::with_capacity(READ_BUFFER);
    loop {
        if buffer.capacity() < MIN_READ_SPACE {
            buffer.reserve(READ_BUFFER);
        }
        let n = read.read_buf(&mut buffer).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_error)?;
            return Ok(());
        }
        let mut data = buffer.split().freeze();
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
