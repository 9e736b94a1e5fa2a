//! Following an agent's `GET /v1/applied` stream: one [`Applied`] per write of its kernel
//! maps, published by the agent right after the writes.
//!
//! [`Follower::start`] reads the stream on a thread of its own: it connects to the admin
//! socket, sends the request and reads the NDJSON answer (HTTP/1.1, chunked), one [`Applied`]
//! per line. The first line is the agent's latest apply, so a follower that attaches late
//! still learns the state in force. When the agent goes away (killed, restarted) the thread
//! connects again until the follower is dropped, so a restarted agent's stream is followed
//! too. [`Follower::poll`] hands over what arrived; nothing here asks the agent anything else.
//! The agent stamps each event with its wall clock (`unix_ms`); on one host that is the test's
//! clock too, so "the first apply since T with these counts" says when a change reached that
//! agent's kernel.
//!
//! This module knows the route and the JSON of an event; it does not know how the agent works.

use std::io::{BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

/// How long the reader waits before connecting again after the stream ended or failed.
const RETRY: Duration = Duration::from_millis(20);

/// One write of an agent's kernel maps (the agent's `Applied`, JSON numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Applied {
    /// 1 for an agent process's first apply, then one more per apply.
    pub seq: u64,
    /// The agent's wall clock right after the writes, in ms since the Unix epoch.
    pub unix_ms: u64,
    /// How long the agent took to plan and write.
    pub elapsed_us: u64,
    /// Services in the kernel after it (VIP markers not counted).
    pub services: usize,
    /// Backends in the kernel after it.
    pub backends: usize,
}

impl Applied {
    /// When the agent wrote the maps.
    pub fn at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.unix_ms)
    }

    /// Whether the agent wrote the maps at or after `since`, to the millisecond it reports.
    pub fn since(&self, since: SystemTime) -> bool {
        let since_ms = since
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        u128::from(self.unix_ms) >= since_ms
    }
}

/// What the reader thread and the follower share.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    /// A handle of the connection being read, to shut it down on drop.
    connection: Mutex<Option<UnixStream>>,
    /// The last reason the stream could not be read, for error messages.
    error: Mutex<Option<String>>,
}

/// The applies of one agent, read from its `GET /v1/applied` stream by a thread of its own.
#[derive(Debug)]
pub struct Follower {
    socket: PathBuf,
    shared: Arc<Shared>,
    arrived: mpsc::Receiver<Applied>,
    /// Applies received since the last [`Follower::forget`].
    seen: Vec<Applied>,
    reader: Option<JoinHandle<()>>,
}

impl Follower {
    /// Follows the agent serving the admin socket at `socket` (now, and again after each
    /// restart) until dropped.
    pub fn start(socket: &Path) -> Self {
        let shared = Arc::new(Shared::default());
        let (tx, arrived) = mpsc::channel();
        let reader = {
            let socket = socket.to_path_buf();
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || follow(&socket, &shared, &tx))
        };
        Follower {
            socket: socket.to_path_buf(),
            shared,
            arrived,
            seen: Vec::new(),
            reader: Some(reader),
        }
    }

    /// Takes in what arrived since the last call.
    pub fn poll(&mut self) {
        self.seen.extend(self.arrived.try_iter());
    }

    /// Takes in what arrived and drops every apply received so far.
    pub fn forget(&mut self) {
        self.poll();
        self.seen.clear();
    }

    /// The first apply received (since the last [`Follower::forget`]) that was made at or
    /// after `since` and satisfies `pred`.
    pub fn first(&self, since: SystemTime, pred: impl Fn(&Applied) -> bool) -> Option<Applied> {
        self.seen
            .iter()
            .copied()
            .find(|a| a.since(since) && pred(a))
    }

    /// The last apply received, for error messages.
    pub fn last(&self) -> Option<Applied> {
        self.seen.last().copied()
    }

    /// Waits (at most `timeout`) for an apply made at or after `since` that satisfies `pred`.
    pub fn wait(
        &mut self,
        since: SystemTime,
        timeout: Duration,
        pred: impl Fn(&Applied) -> bool,
    ) -> Result<Applied> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll();
            if let Some(found) = self.first(since, &pred) {
                return Ok(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no matching apply on {} within {timeout:?} (received: {:?}; {})",
                    self.socket.display(),
                    self.seen,
                    self.problem()
                );
            }
            if let Ok(applied) = self.arrived.recv_timeout(left) {
                self.seen.push(applied);
            }
        }
    }

    /// Why the stream could not be read the last time it could not, or that it could.
    pub fn problem(&self) -> String {
        let error = self
            .shared
            .error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        error
            .as_ref()
            .map_or("the stream read fine".to_owned(), |e| {
                format!("last stream error: {e}")
            })
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Unblocks a read in progress; a reader connecting now sees `stop` under this lock.
        let mut connection = self
            .shared
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = connection.take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        drop(connection);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The reader thread: the stream, again and again, until stopped or nobody listens.
fn follow(socket: &Path, shared: &Shared, tx: &mpsc::Sender<Applied>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match read_stream(socket, shared, tx) {
            Ok(Ended::Closed) => {}
            Ok(Ended::NobodyListens) => return,
            Err(e) => {
                *shared.error.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(format!("{e:#}"))
            }
        }
        std::thread::sleep(RETRY);
    }
}

/// How a stream ended without an error.
enum Ended {
    /// The agent closed it (it exited), or the follower shut it down.
    Closed,
    /// The follower is gone.
    NobodyListens,
}

/// One connection: the request, the answer's head, then its lines until it ends.
fn read_stream(socket: &Path, shared: &Shared, tx: &mpsc::Sender<Applied>) -> Result<Ended> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    {
        let mut slot = shared
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(Ended::Closed);
        }
        *slot = Some(stream.try_clone()?);
    }
    (&stream)
        .write_all(
            b"GET /v1/applied HTTP/1.1\r\nHost: mesh\r\nAccept: application/x-ndjson\r\n\r\n",
        )
        .context("sending GET /v1/applied")?;
    let mut reader = BufReader::new(stream);
    let Some(status) = read_line(&mut reader)? else {
        return Ok(Ended::Closed);
    };
    if !status.starts_with("HTTP/1.1 200") {
        bail!("GET /v1/applied answered {status:?}");
    }
    let mut chunked = false;
    loop {
        let Some(header) = read_line(&mut reader)? else {
            return Ok(Ended::Closed);
        };
        if header.is_empty() {
            break;
        }
        let lower = header.to_ascii_lowercase();
        chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
    }
    let mut lines = Lines::default();
    loop {
        let data = if chunked {
            let Some(size) = read_line(&mut reader)? else {
                return Ok(Ended::Closed);
            };
            let size = size.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .with_context(|| format!("bad chunk size {size:?}"))?;
            if size == 0 {
                return Ok(Ended::Closed);
            }
            let mut chunk = vec![0; size + 2];
            if reader.read_exact(&mut chunk).is_err() {
                return Ok(Ended::Closed);
            }
            chunk.truncate(size);
            chunk
        } else {
            let mut buf = vec![0; 4096];
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => return Ok(Ended::Closed),
                Ok(n) => buf[..n].to_vec(),
            }
        };
        for line in lines.push(&data) {
            let applied: Applied = serde_json::from_slice(&line)
                .with_context(|| format!("unreadable line {:?}", String::from_utf8_lossy(&line)))?;
            if tx.send(applied).is_err() {
                return Ok(Ended::NobodyListens);
            }
        }
    }
}

/// One line of the answer's head without its CRLF; `None` at the end of the stream (an
/// agent that exits, or a shut-down connection, ends it).
fn read_line(reader: &mut impl std::io::BufRead) -> Result<Option<String>> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(line.trim_end_matches(['\r', '\n']).to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(e).context("reading the answer"),
    }
}

/// Splits bytes arriving in pieces into lines (without the newline; empty lines dropped).
#[derive(Debug, Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.partial.extend_from_slice(data);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let rest = self.partial.split_off(end + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        done.split(|&b| b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .map(<[u8]>::to_vec)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_across_pieces() {
        let mut lines = Lines::default();
        assert!(lines.push(b"{\"a\":").is_empty());
        assert_eq!(
            lines.push(b"1}\n{\"b\"\n\n"),
            [b"{\"a\":1}".to_vec(), b"{\"b\"".to_vec()]
        );
        assert!(lines.push(b"x").is_empty());
        assert_eq!(lines.push(b"y\n"), [b"xy".to_vec()]);
    }

    #[test]
    fn applied_reads_the_agents_json_and_compares_by_millisecond() {
        let a: Applied = serde_json::from_str(
            r#"{"seq":3,"unix_ms":1700000000123,"elapsed_us":41,"services":2,"backends":17}"#,
        )
        .unwrap();
        assert_eq!((a.seq, a.services, a.backends), (3, 2, 17));
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_900);
        assert!(a.since(t), "the same millisecond counts");
        assert!(!a.since(t + Duration::from_millis(1)));
        assert!(
            serde_json::from_str::<Applied>(
                r#"{"seq":"3","unix_ms":1,"elapsed_us":1,"services":1,"backends":1}"#
            )
            .is_err(),
            "numbers, not strings"
        );
    }

    /// A stand-in agent: answers the way hyper does (chunked), one line split over two chunks,
    /// then closes; the follower connects again and reads the next answer.
    #[test]
    fn follows_a_chunked_stream_and_reconnects() {
        let dir = std::env::temp_dir().join(format!("mesh-applied-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for seq in [1, 2] {
                let (mut c, _) = listener.accept().unwrap();
                let mut request = [0; 1024];
                let n = c.read(&mut request).unwrap();
                assert!(request[..n].starts_with(b"GET /v1/applied HTTP/1.1\r\n"));
                let line = format!(
                    r#"{{"seq":{seq},"unix_ms":5,"elapsed_us":1,"services":{seq},"backends":9}}"#
                ) + "\n";
                let (a, b) = line.split_at(10);
                let body = format!("{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n", a.len(), b.len());
                c.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n\
                         transfer-encoding: chunked\r\n\r\n{body}"
                    )
                    .as_bytes(),
                )
                .unwrap();
            }
        });
        let mut follower = Follower::start(&path);
        let first = follower
            .wait(UNIX_EPOCH, Duration::from_secs(5), |a| a.seq == 1)
            .unwrap();
        assert_eq!(first.services, 1);
        let second = follower
            .wait(UNIX_EPOCH, Duration::from_secs(5), |a| a.seq == 2)
            .unwrap();
        assert_eq!((second.services, second.backends), (2, 9));
        server.join().unwrap();
        drop(follower);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
