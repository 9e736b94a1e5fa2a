//! `mesh-agent sysdump`: one archive for a bug report. Everything the admin API shows
//! (status, services, endpoints, nodes, policies, certificates without keys, recent flows),
//! the config file in force, the kernel maps' fill from the metrics, the agent's recent log
//! (from the journal, when it runs under systemd) and the versions of the agent, the CLI and
//! the kernel. A part that cannot be had is listed with the reason in `MANIFEST.txt`, never a
//! reason to fail the rest.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde_json::Value;

use crate::admin;

/// How many recent flows and log lines the archive carries.
const FLOWS: usize = 1_000;
const LOG_LINES: &str = "5000";

/// What `sysdump` collects from and where it writes.
pub struct Sysdump<'a> {
    pub admin_socket: &'a Path,
    /// The agent's metrics endpoint (its map fill, `mesh_map_*`).
    pub metrics: std::net::SocketAddr,
    /// The archive to write; `None`: `mesh-sysdump-<unix time>.tar.gz` here.
    pub output: Option<PathBuf>,
}

/// One file of the archive, or why it is missing.
struct Part {
    name: &'static str,
    content: Result<Vec<u8>, String>,
}

impl Sysdump<'_> {
    /// Collects every part and writes the archive; returns its path.
    pub async fn write(&self) -> anyhow::Result<PathBuf> {
        let mut parts = Vec::new();
        let mut status = Value::Null;
        let mut nodes = Value::Null;
        for (name, route) in [
            ("status.json", "/v1/status"),
            ("services.json", "/v1/services"),
            ("endpoints.json", "/v1/endpoints"),
            ("nodes.json", "/v1/nodes"),
            ("policies.json", "/v1/policies"),
            ("certs.json", "/v1/certs"),
        ] {
            let answer: Result<Value, String> = admin::client::fetch(self.admin_socket, route)
                .await
                .map_err(|e| format!("{route}: {e}"));
            match name {
                "status.json" => status = answer.clone().unwrap_or_default(),
                "nodes.json" => nodes = answer.clone().unwrap_or_default(),
                _ => {}
            }
            parts.push(Part {
                name,
                content: answer.and_then(|v| pretty(&v)),
            });
        }
        parts.push(Part {
            name: "flows.ndjson",
            content: self.flows().await,
        });
        parts.push(Part {
            name: "config.toml",
            content: match status["config"].as_str() {
                Some(path) => std::fs::read(path).map_err(|e| format!("{path}: {e}")),
                None => Err("the agent's status names no config file".to_owned()),
            },
        });
        parts.push(Part {
            name: "maps.txt",
            content: self.map_fill(),
        });
        parts.push(Part {
            name: "agent.log",
            content: journal(),
        });
        parts.push(Part {
            name: "versions.txt",
            content: Ok(versions(&status, &nodes).into_bytes()),
        });
        let path = self.output.clone().unwrap_or_else(|| {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            PathBuf::from(format!("mesh-sysdump-{now}.tar.gz"))
        });
        archive(&path, &parts).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    async fn flows(&self) -> Result<Vec<u8>, String> {
        let query = admin::FlowQuery {
            filter: Default::default(),
            limit: Some(FLOWS),
            follow: false,
        };
        let mut out = Vec::new();
        admin::client::flows(self.admin_socket, &query, |flow| {
            if let Ok(line) = serde_json::to_vec(&flow) {
                out.extend(line);
                out.push(b'\n');
            }
        })
        .await
        .map_err(|e| format!("/v1/flows: {e}"))?;
        Ok(out)
    }

    /// The `mesh_map_*` series of one scrape.
    fn map_fill(&self) -> Result<Vec<u8>, String> {
        use std::io::Read as _;
        let timeout = Duration::from_secs(5);
        let mut stream = std::net::TcpStream::connect_timeout(&self.metrics, timeout)
            .map_err(|e| format!("metrics {}: {e}", self.metrics))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n\r\n")
            .map_err(|e| format!("metrics {}: {e}", self.metrics))?;
        let mut text = String::new();
        stream
            .read_to_string(&mut text)
            .map_err(|e| format!("metrics {}: {e}", self.metrics))?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("mesh_map_"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            .into_bytes())
    }
}

fn pretty(value: &Value) -> Result<Vec<u8>, String> {
    serde_json::to_vec_pretty(value).map_err(|e| e.to_string())
}

/// The agent's recent log from the journal (the unit logs JSON there).
fn journal() -> Result<Vec<u8>, String> {
    let out = Command::new("journalctl")
        .args([
            "-u",
            "mesh-agent",
            "-n",
            LOG_LINES,
            "--no-pager",
            "-o",
            "cat",
        ])
        .output()
        .map_err(|e| format!("journalctl: {e} (not under systemd? attach the agent's stderr)"))?;
    // An empty journal is no output, or journalctl's own "-- No entries --" line.
    let text = String::from_utf8_lossy(&out.stdout);
    let empty = matches!(text.trim(), "" | "-- No entries --");
    match (out.status.success(), empty) {
        (true, false) => Ok(out.stdout),
        (true, true) => Err("journalctl: no entries of the mesh-agent unit".to_owned()),
        (false, _) => Err(format!(
            "journalctl: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// The CLI's, the agent's and the kernel's versions.
fn versions(status: &Value, nodes: &Value) -> String {
    let agent = nodes
        .as_array()
        .and_then(|all| all.iter().find(|n| n["role"] == "self"))
        .and_then(|n| n["version"].as_str())
        .unwrap_or("unknown (no answer)");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    format!(
        "cli: {}\nagent: {agent}\nnode: {}\nkernel: {kernel}\n",
        crate::VERSION,
        status["node"].as_str().unwrap_or("unknown"),
    )
}

/// A gzipped tar of the parts that could be had, and `MANIFEST.txt` listing every part.
fn archive(path: &Path, parts: &[Part]) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::default(),
    ));
    let mut manifest = String::new();
    let add = |tar: &mut tar::Builder<_>, name: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        );
        header.set_cksum();
        tar.append_data(&mut header, format!("mesh-sysdump/{name}"), data)
    };
    for part in parts {
        match &part.content {
            Ok(data) => {
                add(&mut tar, part.name, data)?;
                manifest.push_str(&format!("{}: {} bytes\n", part.name, data.len()));
            }
            Err(why) => manifest.push_str(&format!("{}: missing: {why}\n", part.name)),
        }
    }
    add(&mut tar, "MANIFEST.txt", manifest.as_bytes())?;
    tar.into_inner()?.finish()?.sync_all()
}
