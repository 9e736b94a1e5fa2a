//! The reference servers of the benchmarks, each with its own minimal config in a scratch
//! directory, run in the foreground as children of the bench (own process group, killed with
//! it, see `mesh_tests::process`):
//!
//! * [`Nginx`] (Debian `nginx-light`): the backend, answering every request with a small
//!   static body (`return 200 "ok\n"`). Keep-alive connections are never closed by the server
//!   (`keepalive_requests` is huge), so a request/response run stays on one connection.
//! * [`Haproxy`] (Debian `haproxy`): a TCP-mode hop with one thread, the "userspace proxy"
//!   baseline.
//! * [`Stunnel`] (Debian `stunnel4`): one end of a mutual-TLS hop (TLS 1.3, one cipher suite,
//!   both sides verifying the other's certificate), the "TLS proxy" baseline of `bench mtls`.
//! * [`Iperf3Server`] (Debian `iperf3`): the bulk-throughput server.
//!
//! Both are ready once a TCP connect to their listening address succeeds from inside the node.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::process::Capture;
use mesh_tests::{Node, Proc};

/// How long a server may take to start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// nginx serving `ok\n` on one address.
#[derive(Debug)]
pub struct Nginx {
    pub addr: SocketAddr,
    _proc: Proc,
}

/// The nginx config: foreground, `workers` worker processes, no access log, everything it
/// writes (pid, error log) in `dir`.
pub fn nginx_config(dir: &Path, listen: SocketAddr, workers: u32) -> String {
    let dir = dir.display();
    format!(
        "\
daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    keepalive_timeout 120s;
    keepalive_requests 1000000000;
    server {{
        listen {listen} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 \"ok\\n\";
        }}
    }}
}}
"
    )
}

impl Nginx {
    /// Starts nginx in `node` (workload cgroup `nginx`) with its config in `dir`.
    pub fn start(node: &Node, dir: &Path, listen: SocketAddr, workers: u32) -> Result<Self> {
        let conf = write_config(dir, "nginx.conf", &nginx_config(dir, listen, workers))?;
        let mut cmd = Command::new("nginx");
        // -e: the error log before the config is read (else /var/log/nginx/error.log).
        cmd.arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"));
        launch(node, dir, "nginx", cmd, listen, &[&dir.join("error.log")]).map(|proc| Self {
            addr: listen,
            _proc: proc,
        })
    }
}

/// HAProxy forwarding TCP from one address to one backend.
#[derive(Debug)]
pub struct Haproxy {
    pub addr: SocketAddr,
    _proc: Proc,
}

/// The HAProxy config: TCP mode, one thread, `listen` → `backend`.
pub fn haproxy_config(listen: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "\
global
    nbthread 1
    maxconn 8192

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend bench
    bind {listen}
    default_backend backends

backend backends
    server backend {backend}
"
    )
}

impl Haproxy {
    /// Starts HAProxy in `node` (workload cgroup `haproxy`), in the foreground (`-db`), with
    /// its config in `dir`.
    pub fn start(node: &Node, dir: &Path, listen: SocketAddr, backend: SocketAddr) -> Result<Self> {
        let conf = write_config(dir, "haproxy.cfg", &haproxy_config(listen, backend))?;
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&conf);
        launch(node, dir, "haproxy", cmd, listen, &[]).map(|proc| Self {
            addr: listen,
            _proc: proc,
        })
    }
}

/// The certificate files one stunnel end presents and trusts.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// The TLS 1.3 cipher suite both the mesh tunnel and stunnel use in `bench mtls`, so the
/// comparison is about the proxies, not the cipher.
pub const TLS13_CIPHER: &str = "TLS_AES_256_GCM_SHA384";

/// One end of a stunnel hop: `client` (plain in, TLS out) or server (TLS in, plain out).
#[derive(Debug)]
pub struct Stunnel {
    pub addr: SocketAddr,
    _proc: Proc,
}

/// The stunnel config: foreground, TLS 1.3 only with [`TLS13_CIPHER`], the peer's certificate
/// verified against `tls.ca` (mutual TLS on both ends).
pub fn stunnel_config(
    client: bool,
    listen: SocketAddr,
    connect: SocketAddr,
    tls: &TlsFiles,
) -> String {
    format!(
        "\
foreground = yes
debug = 3
[bench]
client = {client}
accept = {listen}
connect = {connect}
cert = {cert}
key = {key}
CAfile = {ca}
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.3
sslVersionMax = TLSv1.3
ciphersuites = {TLS13_CIPHER}
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
",
        client = if client { "yes" } else { "no" },
        cert = tls.cert.display(),
        key = tls.key.display(),
        ca = tls.ca.display(),
    )
}

impl Stunnel {
    /// Starts one stunnel end in `node` (workload cgroup `stunnel`), its config in `dir`.
    pub fn start(
        node: &Node,
        dir: &Path,
        client: bool,
        listen: SocketAddr,
        connect: SocketAddr,
        tls: &TlsFiles,
    ) -> Result<Self> {
        let conf = write_config(
            dir,
            "stunnel.conf",
            &stunnel_config(client, listen, connect, tls),
        )?;
        let mut cmd = Command::new("stunnel");
        cmd.arg(&conf);
        launch(node, dir, "stunnel", cmd, listen, &[]).map(|proc| Self {
            addr: listen,
            _proc: proc,
        })
    }
}

/// `iperf3 -s` on one address.
#[derive(Debug)]
pub struct Iperf3Server {
    pub addr: SocketAddr,
    _proc: Proc,
}

impl Iperf3Server {
    /// Starts an iperf3 server in `node` (workload cgroup `iperf3`), logging to `dir`.
    pub fn start(node: &Node, dir: &Path, listen: SocketAddr) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cmd = Command::new("iperf3");
        cmd.args(["-s", "-B"])
            .arg(listen.ip().to_string())
            .arg("-p")
            .arg(listen.port().to_string());
        launch(node, dir, "iperf3", cmd, listen, &[]).map(|proc| Self {
            addr: listen,
            _proc: proc,
        })
    }
}

fn write_config(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Waits until a TCP connect to `addr` from inside `node` succeeds, failing early (with the
/// server's logs) if the server exits.
/// Starts `cmd` in `node` (workload cgroup `name`), its output in `dir/<name>.out`, and waits
/// until it listens on `listen`; on failure the error quotes that output and `extra_logs`.
fn launch(
    node: &Node,
    dir: &Path,
    name: &str,
    cmd: Command,
    listen: SocketAddr,
    extra_logs: &[&Path],
) -> Result<Proc> {
    let log = dir.join(format!("{name}.out"));
    let proc = node.spawn_with(
        name,
        cmd,
        Some(&node.workload_cgroup(name)?),
        Capture::File(log.clone()),
    )?;
    let mut logs = vec![log.as_path()];
    logs.extend_from_slice(extra_logs);
    wait_listening(node, &proc, listen, &logs)?;
    Ok(proc)
}

fn wait_listening(node: &Node, proc: &Proc, addr: SocketAddr, logs: &[&Path]) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let logs = || {
        logs.iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                format!("--- {} ---\n{text}", p.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    loop {
        if let Some(st) = proc.wait_timeout(Duration::ZERO)? {
            bail!(
                "{} exited ({st}) before listening on {addr}\n{}",
                proc.label(),
                logs()
            );
        }
        let connected = node
            .netns()
            .run_in(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())?;
        if connected {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} not listening on {addr} within {READY_TIMEOUT:?}\n{}",
                proc.label(),
                logs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_config_is_self_contained() {
        let c = nginx_config(Path::new("/tmp/x"), "10.1.0.2:8080".parse().unwrap(), 1);
        for needle in [
            "daemon off;",
            "worker_processes 1;",
            "pid /tmp/x/nginx.pid;",
            "error_log /tmp/x/error.log warn;",
            "access_log off;",
            "listen 10.1.0.2:8080 backlog=4096;",
            "return 200 \"ok\\n\";",
        ] {
            assert!(c.contains(needle), "missing {needle:?} in\n{c}");
        }
        // Balanced braces: nginx refuses the file otherwise.
        assert_eq!(c.matches('{').count(), c.matches('}').count());
    }

    #[test]
    fn stunnel_config_is_mutual_tls13_with_one_cipher() {
        let tls = TlsFiles {
            cert: "/c/cert.pem".into(),
            key: "/c/key.pem".into(),
            ca: "/c/ca.pem".into(),
        };
        let c = stunnel_config(
            true,
            "127.0.0.1:18443".parse().unwrap(),
            "10.1.0.2:8443".parse().unwrap(),
            &tls,
        );
        for needle in [
            "client = yes",
            "accept = 127.0.0.1:18443",
            "connect = 10.1.0.2:8443",
            "cert = /c/cert.pem",
            "CAfile = /c/ca.pem",
            "verifyChain = yes",
            "requireCert = yes",
            "sslVersionMin = TLSv1.3",
            "ciphersuites = TLS_AES_256_GCM_SHA384",
        ] {
            assert!(c.contains(needle), "missing {needle:?} in\n{c}");
        }
    }

    #[test]
    fn haproxy_config_forwards_tcp_with_one_thread() {
        let c = haproxy_config(
            "127.0.0.1:18080".parse().unwrap(),
            "10.1.0.2:8080".parse().unwrap(),
        );
        for needle in [
            "nbthread 1",
            "mode tcp",
            "bind 127.0.0.1:18080",
            "server backend 10.1.0.2:8080",
        ] {
            assert!(c.contains(needle), "missing {needle:?} in\n{c}");
        }
    }
}
