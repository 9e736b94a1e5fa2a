//! systemd's service notification protocol (`sd_notify(3)`), the few lines of it the agent
//! needs: one datagram of `KEY=value` lines to the Unix socket named by `$NOTIFY_SOCKET`
//! (a path, or an abstract name when it starts with `@`). Without that variable (not started
//! by systemd as `Type=notify`) nothing is sent.
//!
//! The agent sends `MAINPID=<its pid>` and `READY=1` once it serves, and a predecessor that
//! hands over to a successor sends `MAINPID=<successor>` before it lets the successor go, so
//! the unit's main process is always a live agent (the unit needs `NotifyAccess=all`).
//!
//! With `WatchdogSec=` systemd passes `$WATCHDOG_USEC`; [`watchdog`] then sends `WATCHDOG=1`
//! at half that interval from the control runtime, so a control thread that stops turning
//! (a deadlock, a loop that never yields) gets the agent restarted.

use std::{io, os::unix::net::UnixDatagram, time::Duration};

/// This agent serves: it is the unit's main process and the unit is ready.
pub fn ready() {
    notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
}

/// `pid` is the unit's main process from now on.
pub fn main_pid(pid: u32) {
    notify(&format!("MAINPID={pid}"));
}

/// The keep-alive loop when systemd asked for one (`$WATCHDOG_USEC`, and `$WATCHDOG_PID`
/// absent or this process); it runs until dropped.
pub fn watchdog() -> Option<impl std::future::Future<Output = ()>> {
    let interval = watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )?;
    Some(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            notify("WATCHDOG=1");
        }
    })
}

/// Half the watchdog timeout, when the watchdog is meant for process `pid`.
fn watchdog_interval(usec: Option<&str>, for_pid: Option<&str>, pid: u32) -> Option<Duration> {
    if for_pid.is_some_and(|p| p.parse() != Ok(pid)) {
        return None;
    }
    let usec: u64 = usec?.parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(error) = send(socket.as_encoded_bytes(), state) {
        tracing::warn!(%error, socket = %socket.to_string_lossy(), state, "cannot notify systemd");
    }
}

fn send(socket: &[u8], state: &str) -> io::Result<()> {
    let datagram = UnixDatagram::unbound()?;
    match socket.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            datagram.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            use std::os::unix::ffi::OsStrExt as _;
            datagram.send_to(state.as_bytes(), std::ffi::OsStr::from_bytes(socket))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_pings_at_half_its_timeout_and_only_for_this_process() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
    }

    #[test]
    fn a_datagram_reaches_a_path_and_an_abstract_socket() {
        let dir = crate::sys::state_file::ScratchDir::new("sd-notify");
        std::fs::create_dir_all(dir.path()).unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str().as_encoded_bytes(), "MAINPID=7\nREADY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MAINPID=7\nREADY=1");

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("mesh-sd-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        send(format!("@{name}").as_bytes(), "MAINPID=8").unwrap();
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MAINPID=8");
    }
}
