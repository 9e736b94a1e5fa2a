//! One request to an agent's admin API (HTTP/1.1 over its Unix socket), the way the suites
//! that time the agent make them: a fresh connection, `Connection: close`, the whole answer.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

/// How long one answer may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// `METHOD path` on the admin socket at `socket`; the answer's body. Anything but a 200 fails,
/// quoting the start of the answer.
pub fn request(socket: &Path, method: &str, path: &str) -> Result<String> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .with_context(|| format!("reading the answer to {method} {path}"))?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        bail!(
            "the admin API answered {method} {path} with {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
    }
    let text = String::from_utf8_lossy(&answer);
    Ok(text
        .split_once("\r\n\r\n")
        .map_or_else(String::new, |(_, body)| body.to_owned()))
}
