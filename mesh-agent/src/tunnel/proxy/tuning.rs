//! HTTP/2 settings of the tunnel, the same on both sides: large flow-control windows so one
//! stream can fill a fast link without waiting for WINDOW_UPDATEs, large frames to cut
//! per-frame cost, and room for many concurrent flows on one connection.

/// Per-stream receive window (the RFC's default is 64 KiB).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection receive window, shared by its streams.
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// Largest DATA frame.
pub const MAX_FRAME: u32 = 256 * 1024;
/// Bytes buffered per stream before the sender must wait.
pub const SEND_BUFFER: usize = 1024 * 1024;
/// Flows one connection carries at once.
pub const MAX_STREAMS: u32 = 16_384;

pub fn client() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(MAX_STREAMS);
    builder
}

pub fn server() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(MAX_STREAMS);
    builder
}
