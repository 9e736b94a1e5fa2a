//! Prometheus metrics on `--metrics-addr` (default port 15020), with prometheus-client.
//!
//! The agent hands out a [`Snapshot`] of what it knows at scrape time; this module owns the
//! metric names, labels and the HTTP endpoint (`GET /metrics`, OpenMetrics text). Nothing is
//! kept between scrapes: a [`Collector`] turns each scrape's snapshot into metrics, so a backend
//! that left the config leaves the exposition with it (the two histograms are kept where they
//! are observed: [`crate::telemetry::applied::AppliedFeed`] and the tunnel's stats). This
//! module never touches the kernel maps itself.
//!
//! Every family (the README's metrics table is the same list):
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `mesh_kernel_forwarded_total` | counter | `path`: `kernel` (rewritten to a backend), `mtls` (sent to the outbound listener) |
//! | `mesh_kernel_refused_total` | counter | `reason`: `no_backend`, `no_service_port`, `mtls_no_agent` |
//! | `mesh_kernel_passthrough_total` | counter | `kind`: `not_a_vip`, `agent_socket` |
//! | `mesh_kernel_reverse_lookups_total` | counter | (getpeername/recvmsg showed the VIP) |
//! | `mesh_kernel_affinity_total` | counter | `result`: `hit`, `miss` |
//! | `mesh_kernel_strict_dropped_total` | counter | |
//! | `mesh_kernel_connect_failures_total` | counter | |
//! | `mesh_kernel_loopback_redirected_total` | counter | |
//! | `mesh_kernel_errors_total` | counter | `kind`: `slot_missing`, `map_update_failed`, `event_dropped` |
//! | `mesh_backend_connections_total` | counter | `service`, `backend` (TCP services); per service only beyond the limit |
//! | `mesh_backend_datagrams_total` | counter | `service`, `backend` (UDP services); per service only beyond the limit |
//! | `mesh_backend_healthy` | gauge | `service`, `backend` (0/1); beyond the limit `service` only: healthy backends |
//! | `mesh_map_entries` | gauge | `map` (plain name), `pinned` (pinned name); only the maps counted (below) |
//! | `mesh_map_capacity` | gauge | `map`, `pinned`; every pinned map |
//! | `mesh_service_panic` | gauge (0/1) | `service` |
//! | `mesh_health_checks_total` | counter | `service`, `result` (`passed`, `failed`) |
//! | `mesh_outlier_ejections_total` | counter | `service` |
//! | `mesh_config_reloads_total` | counter | `result` (`applied`, `rejected`) |
//! | `mesh_kernel_apply_duration_seconds` | histogram | (planning and writing the maps, per apply) |
//! | `mesh_flows_recorded_total` | counter | |
//! | `mesh_agent_uptime_seconds` | gauge | |
//! | `mesh_build_info` | info (value 1) | `version` (`0.1.0`), `commit` (short hash) |
//! | `mesh_gossip_members` | gauge | `state` (`alive`, `dead`; this node counts as alive) |
//! | `mesh_gossip_bytes_total` | counter | `direction` (`sent`, `received`) |
//! | `mesh_gossip_datagrams_total` | counter | `direction` (`sent`, `received`) |
//! | `mesh_gossip_auth_failures_total` | counter | `kind`: not_a_frame, old_format, hmac, stale, future, replayed |
//! | `mesh_catalog_conflicts` | gauge | `kind` ([`crate::catalog::ConflictKind::name`]) |
//! | `mesh_mtls_handshakes_total` | counter | `side`, `result` (with `[mtls]`, like every `mesh_mtls_*`) |
//! | `mesh_mtls_authz_decisions_total` | counter | `service`, `decision`, `identity` |
//! | `mesh_mtls_flows_total` | counter | `side`, `result` |
//! | `mesh_mtls_bytes_total` | counter | `direction` |
//! | `mesh_mtls_streams_active` | gauge | `side` (`all`) |
//! | `mesh_mtls_pooled_connections` | gauge | `side` (`outbound`) |
//! | `mesh_mtls_flow_duration_seconds` | histogram | (tunneled flows that ended, both sides) |
//! | `mesh_mtls_cert_reloads_total` | counter | `result` |
//! | `mesh_mtls_cert_expiry_seconds` | gauge | `identity` |
//! | `process_cpu_seconds_total` | counter | |
//! | `process_resident_memory_bytes`, `process_virtual_memory_bytes` | gauge | |
//! | `process_open_fds`, `process_max_fds` | gauge | |
//! | `process_start_time_seconds` | gauge | |
//! | `process_threads` | gauge | |
//!
//! Every [`Counter`] of the programs lands in exactly one `mesh_kernel_*` family
//! ([`kernel_family`]); `mesh-agent status` shows them under their [`Counter::name`].
//!
//! **Per-backend series are bounded**: while the agent has at most [`BACKEND_SERIES_LIMIT`]
//! backends, `mesh_backend_connections_total`, `mesh_backend_datagrams_total` and
//! `mesh_backend_healthy` have one series per backend. Beyond it they have one series per
//! service, without the `backend` label (`sum by (service)` reads the same either way; the
//! healthy gauge then counts the service's healthy backends), and per-service counters that
//! are still zero are left out: a 20,000-service, 200,000-backend scrape stays under 5 MB.
//!
//! **Map fill**: `mesh_map_entries` is exported for the maps whose entries the agent knows
//! without walking them: `services`, `slots`, `backends` (its own mirror of what it wrote),
//! `strict` (the strict backends it wrote), `counters` (the indices in use) and
//! `backend_counts` (the backends the kernel has counted a connection or datagram for: the
//! entry is created with the first and removed with the backend). The LRU maps (`reverse`,
//! `affinity`, `redirect_by_cookie`, `redirect_by_peer`), the per-CPU `outcomes` and the
//! `loopback_sockets` sockhash have no entry count in the kernel: counting means one
//! `bpf(MAP_GET_NEXT_KEY)` per entry, up to 262,144 per scrape, so they get
//! `mesh_map_capacity` only.

use std::{
    collections::BTreeMap, convert::Infallible, fmt, io, net::SocketAddr, sync::Arc, time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response,
    StatusCode,
};
use hyper_util::rt::TokioIo;
use mesh_common::counters::Counter;
use prometheus_client::{
    collector::Collector,
    encoding::{text, DescriptorEncoder, EncodeLabelSet, EncodeMetric as _, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, info::Info, MetricType},
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;

use super::{histogram::HistogramSample, process::ProcessSample};

/// Per-backend series are exported while the agent has at most this many backends; beyond,
/// one series per service (see the module docs).
pub const BACKEND_SERIES_LIMIT: usize = 1_000;

/// What the kernel counts per backend: connections (TCP services) or datagrams (UDP ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// What one backend received: connections or datagrams, by its service's protocol.
#[derive(Clone, Debug)]
pub struct BackendSample {
    pub service: String,
    pub backend: String,
    pub transport: Transport,
    pub count: u64,
}

/// Fill level of one pinned kernel map.
#[derive(Clone, Debug)]
pub struct MapUsage {
    /// Plain name: `services`, `slots`, `strict`, ...
    pub name: &'static str,
    /// The pinned (versioned) name, `MESH_SVC_V1`.
    pub pinned: &'static str,
    /// `None` where the agent cannot know it without walking the map (see the module docs).
    pub entries: Option<u64>,
    pub capacity: u64,
}

/// Everything the metrics show, read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Kernel decisions by reason, summed over CPUs.
    pub counters: Vec<(Counter, u64)>,
    pub backends: Vec<BackendSample>,
    pub maps: Vec<MapUsage>,
    /// Health of every service's backends.
    pub health: Vec<crate::health::ServiceSample>,
    /// Config reloads applied and rejected since start.
    pub reloads_applied: u64,
    pub reloads_rejected: u64,
    /// How long each write of the kernel maps took.
    pub apply_durations: HistogramSample,
    /// Flows pushed to the history since start.
    pub flows_recorded: u64,
    pub uptime_seconds: f64,
    /// Gossip members and traffic (all zero without gossip).
    pub gossip: GossipSample,
    /// Catalog conflicts in force, by kind.
    pub conflicts: Vec<(&'static str, u64)>,
    /// The mTLS tunnel's counters, when it runs.
    pub tunnel: Option<crate::tunnel::proxy::stats::TunnelSample>,
}

/// Gossip members by state and the gossip socket's counters.
#[derive(Clone, Debug, Default)]
pub struct GossipSample {
    pub alive: u64,
    pub dead: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    /// Datagrams dropped, by reason.
    pub rejected: Vec<(&'static str, u64)>,
}

/// What the metrics port serves from: a [`Snapshot`] per scrape, and readiness per probe.
pub trait SnapshotSource: Send + Sync + 'static {
    fn snapshot(&self) -> Snapshot;
    /// What the agent still waits for before it is ready (empty: ready).
    fn waiting_for(&self) -> Vec<String>;
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {cause}")]
pub struct MetricsError {
    addr: SocketAddr,
    cause: io::Error,
}

/// The media type of the OpenMetrics text exposition.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the metrics listener (non-blocking, as [`serve`] takes it).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, MetricsError> {
    std::net::TcpListener::bind(addr)
        .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
        .map_err(|cause| MetricsError { addr, cause })
}

/// Serves `GET /metrics`, `/healthz` and `/ready` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, source: Arc<dyn SnapshotSource>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics on /metrics, probes on /healthz and /ready");
    }
    let probes = Arc::clone(&source);
    let registry = Arc::new(registry(source));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, most likely: give the others a moment to close.
                tracing::warn!(%error, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = Arc::clone(&registry);
        let probes = Arc::clone(&probes);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let registry = Arc::clone(&registry);
                let probes = Arc::clone(&probes);
                // A scrape reads the published view and encodes every series: on a blocking
                // thread, not the one gossip and the admin API share.
                let answer =
                    tokio::task::spawn_blocking(move || route(&request, &registry, &*probes));
                async move {
                    Ok::<_, Infallible>(answer.await.unwrap_or_else(|_| {
                        respond(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "text/plain",
                            "the scrape failed inside the agent\n",
                        )
                    }))
                }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "metrics connection ended with an error");
            }
        });
    }
}

/// A registry whose collectors read `source` (under the `mesh_` prefix) and `/proc/self`
/// (the standard `process_*` names) at every encoding.
fn registry(source: Arc<dyn SnapshotSource>) -> Registry {
    let mut registry = Registry::default();
    registry
        .sub_registry_with_prefix("mesh")
        .register_collector(Box::new(AgentCollector { source }));
    registry.register_collector(Box::new(ProcessCollector));
    registry
}

fn route(
    request: &Request<Incoming>,
    registry: &Registry,
    probes: &dyn SnapshotSource,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    match request.uri().path() {
        "/metrics" => match render(registry) {
            Ok(body) => respond(StatusCode::OK, CONTENT_TYPE, body),
            Err(fmt::Error) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "cannot encode the metrics\n",
            ),
        },
        // Alive: the control runtime, which serves this, is turning.
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/ready" => readiness(&probes.waiting_for()),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "served: /metrics, /healthz, /ready\n",
        ),
    }
}

/// `200 ready`, or `503` listing what the agent still waits for, one reason a line.
fn readiness(waiting_for: &[String]) -> Response<Full<Bytes>> {
    if waiting_for.is_empty() {
        return respond(StatusCode::OK, "text/plain", "ready\n");
    }
    let body: String = waiting_for
        .iter()
        .map(|reason| format!("waiting for {reason}\n"))
        .collect();
    respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", body)
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// The whole exposition, `# EOF` included.
fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut body = String::new();
    text::encode(&mut body, registry)?;
    Ok(body)
}

/// Encodes a fresh [`Snapshot`] on every scrape.
struct AgentCollector {
    source: Arc<dyn SnapshotSource>,
}

impl fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentCollector").finish_non_exhaustive()
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        encode_snapshot(&self.source.snapshot(), &mut encoder)
    }
}

/// The `process_*` metrics of the agent, read from `/proc/self` at every scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        encode_process(&super::process::sample(), &mut encoder)
    }
}

fn encode_process(p: &ProcessSample, encoder: &mut DescriptorEncoder) -> fmt::Result {
    if let Some(cpu) = p.cpu_seconds {
        let metric = ConstCounter::new(cpu);
        metric.encode(encoder.encode_descriptor(
            "process_cpu",
            "User and system CPU time the agent spent.",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?)?;
    }
    let gauges: [(&str, &str, Option<Unit>, Option<f64>); 6] = [
        (
            "process_resident_memory",
            "Resident memory of the agent.",
            Some(Unit::Bytes),
            p.resident_memory_bytes.map(|v| v as f64),
        ),
        (
            "process_virtual_memory",
            "Virtual memory of the agent.",
            Some(Unit::Bytes),
            p.virtual_memory_bytes.map(|v| v as f64),
        ),
        (
            "process_open_fds",
            "File descriptors the agent has open.",
            None,
            p.open_fds.map(|v| v as f64),
        ),
        (
            "process_max_fds",
            "The agent's limit of open file descriptors (soft).",
            None,
            p.max_fds.map(|v| v as f64),
        ),
        (
            "process_start_time",
            "When the agent started, since the Unix epoch.",
            Some(Unit::Seconds),
            p.start_time_seconds,
        ),
        (
            "process_threads",
            "Threads of the agent.",
            None,
            p.threads.map(|v| v as f64),
        ),
    ];
    for (name, help, unit, value) in gauges {
        if let Some(value) = value {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                unit.as_ref(),
                MetricType::Gauge,
            )?)?;
        }
    }
    Ok(())
}

/// The families of the programs' counters, in exposition order: (name, help).
const KERNEL_FAMILIES: [(&str, &str); 9] = [
    ("kernel_forwarded", "Connects and sends to a VIP the kernel forwarded, by path: kernel (rewritten to a backend) or mtls (sent to the agent's outbound listener)."),
    ("kernel_refused", "Connects and sends to a VIP the kernel refused (ECONNREFUSED), by reason."),
    ("kernel_passthrough", "Connects and sends the kernel left alone: not_a_vip (any other host connect), agent_socket (the agent's own)."),
    ("kernel_reverse_lookups", "getpeername/recvmsg calls that showed the VIP instead of the backend."),
    ("kernel_affinity", "Backend choices of services with affinity: hit (the remembered backend), miss (a new one)."),
    ("kernel_strict_dropped", "Plaintext connection openings to a strict mTLS backend the kernel dropped."),
    ("kernel_connect_failures", "Balanced TCP connects that failed (reset, timeout or abandoned in SYN-SENT)."),
    ("kernel_loopback_redirected", "Messages of the loopback hop to the outbound listener redirected by the sockmap."),
    ("kernel_errors", "Kernel-side errors: slot_missing (an update raced a lookup), map_update_failed (a full map), event_dropped (flow event over the rate bound or ring full)."),
];

/// The family (in [`KERNEL_FAMILIES`]) and label of each counter of the programs: every counter
/// in exactly one family (a counter added to [`Counter`] does not compile until it is placed).
pub fn kernel_family(counter: Counter) -> (&'static str, Option<(&'static str, &'static str)>) {
    match counter {
        Counter::Rewritten => ("kernel_forwarded", Some(("path", "kernel"))),
        Counter::MtlsRedirected => ("kernel_forwarded", Some(("path", "mtls"))),
        Counter::NoBackend => ("kernel_refused", Some(("reason", "no_backend"))),
        Counter::NoServicePort => ("kernel_refused", Some(("reason", "no_service_port"))),
        Counter::MtlsNoAgent => ("kernel_refused", Some(("reason", "mtls_no_agent"))),
        Counter::Passthrough => ("kernel_passthrough", Some(("kind", "not_a_vip"))),
        Counter::AgentSocket => ("kernel_passthrough", Some(("kind", "agent_socket"))),
        Counter::ReverseHit => ("kernel_reverse_lookups", None),
        Counter::AffinityHit => ("kernel_affinity", Some(("result", "hit"))),
        Counter::AffinityMiss => ("kernel_affinity", Some(("result", "miss"))),
        Counter::StrictDropped => ("kernel_strict_dropped", None),
        Counter::ConnectFailed => ("kernel_connect_failures", None),
        Counter::LoopbackRedirected => ("kernel_loopback_redirected", None),
        Counter::SlotMissing => ("kernel_errors", Some(("kind", "slot_missing"))),
        Counter::MapUpdateFailed => ("kernel_errors", Some(("kind", "map_update_failed"))),
        Counter::EventDropped => ("kernel_errors", Some(("kind", "event_dropped"))),
    }
}

/// The programs' counters, one family per kind of decision.
fn encode_kernel(counters: &[(Counter, u64)], encoder: &mut DescriptorEncoder) -> fmt::Result {
    for (family, help) in KERNEL_FAMILIES {
        let mut metric = encoder.encode_descriptor(family, help, None, MetricType::Counter)?;
        for (counter, value) in counters {
            match kernel_family(*counter) {
                (f, _) if f != family => {}
                (_, Some(label)) => {
                    ConstCounter::new(*value).encode(metric.encode_family(&[label])?)?;
                }
                // A family without labels has its one sample.
                (_, None) => {
                    ConstCounter::new(*value).encode(metric)?;
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Connections (TCP services) and datagrams (UDP services) per backend, or per service beyond
/// [`BACKEND_SERIES_LIMIT`].
fn encode_backends(backends: &[BackendSample], encoder: &mut DescriptorEncoder) -> fmt::Result {
    let detailed = backends.len() <= BACKEND_SERIES_LIMIT;
    for (transport, name, help) in [
        (
            Transport::Tcp,
            "backend_connections",
            "Connections the kernel sent to each backend of a TCP service (per service beyond 1,000 backends).",
        ),
        (
            Transport::Udp,
            "backend_datagrams",
            "Datagrams the kernel sent to each backend of a UDP service (per service beyond 1,000 backends).",
        ),
    ] {
        let of_kind = backends.iter().filter(|b| b.transport == transport);
        if detailed {
            counter_family(
                encoder,
                name,
                help,
                of_kind.map(|b| {
                    (
                        [
                            ("service", b.service.as_str()),
                            ("backend", b.backend.as_str()),
                        ],
                        b.count,
                    )
                }),
            )?;
        } else {
            let mut per_service: BTreeMap<&str, u64> = BTreeMap::new();
            for b in of_kind {
                *per_service.entry(b.service.as_str()).or_default() += b.count;
            }
            counter_family(
                encoder,
                name,
                help,
                per_service
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(service, n)| ([("service", service)], n)),
            )?;
        }
    }
    Ok(())
}

/// Writes every metric of `s`; the names and labels are the ones in the module docs.
fn encode_snapshot(s: &Snapshot, encoder: &mut DescriptorEncoder) -> fmt::Result {
    encode_kernel(&s.counters, encoder)?;
    encode_backends(&s.backends, encoder)?;
    gauge_family(
        encoder,
        "map_entries",
        "Entries of each kernel map, where the agent knows them without walking the map.",
        s.maps
            .iter()
            .filter_map(|m| Some(([("map", m.name), ("pinned", m.pinned)], m.entries?))),
    )?;
    gauge_family(
        encoder,
        "map_capacity",
        "Maximum entries of each pinned kernel map.",
        s.maps
            .iter()
            .map(|m| ([("map", m.name), ("pinned", m.pinned)], m.capacity)),
    )?;
    encode_health(&s.health, encoder)?;
    counter_family(
        encoder,
        "config_reloads",
        "Config file changes since start, applied or rejected (the previous config stays).",
        [
            ([("result", "applied")], s.reloads_applied),
            ([("result", "rejected")], s.reloads_rejected),
        ],
    )?;
    gauge_family(
        encoder,
        "gossip_members",
        "Members of the mesh by failure-detector state, this node included.",
        [
            ([("state", "alive")], s.gossip.alive),
            ([("state", "dead")], s.gossip.dead),
        ],
    )?;
    counter_family(
        encoder,
        "gossip_bytes",
        "Bytes of gossip datagrams sent and received (framing included).",
        [
            ([("direction", "sent")], s.gossip.bytes_sent),
            ([("direction", "received")], s.gossip.bytes_received),
        ],
    )?;
    counter_family(
        encoder,
        "gossip_datagrams",
        "Gossip datagrams sent and received (those failing authentication included).",
        [
            ([("direction", "sent")], s.gossip.datagrams_sent),
            ([("direction", "received")], s.gossip.datagrams_received),
        ],
    )?;
    counter_family(
        encoder,
        "gossip_auth_failures",
        "Gossip datagrams dropped, by kind: not_a_frame, old_format (format 1), hmac (another key or altered), stale, future (outside the time window), replayed.",
        s.gossip.rejected.iter().map(|(kind, n)| ([("kind", *kind)], *n)),
    )?;
    gauge_family(
        encoder,
        "catalog_conflicts",
        "Disagreements between nodes' announcements in the catalog in force, by kind.",
        s.conflicts.iter().map(|(kind, n)| ([("kind", *kind)], *n)),
    )?;
    histogram(
        encoder,
        "kernel_apply_duration",
        "How long planning and writing the kernel maps took, per apply (config, registration, gossip, health).",
        &s.apply_durations,
    )?;
    let flows = ConstCounter::new(s.flows_recorded);
    flows.encode(encoder.encode_descriptor(
        "flows_recorded",
        "Flow events recorded in the agent's flow history since start.",
        None,
        flows.metric_type(),
    )?)?;
    let uptime = ConstGauge::new(s.uptime_seconds);
    uptime.encode(encoder.encode_descriptor(
        "agent_uptime",
        "Seconds since the agent started.",
        Some(&Unit::Seconds),
        uptime.metric_type(),
    )?)?;
    if let Some(tunnel) = &s.tunnel {
        encode_tunnel(tunnel, encoder)?;
    }
    let build = Info::new([
        ("version", env!("CARGO_PKG_VERSION")),
        ("commit", env!("MESH_BUILD_COMMIT")),
    ]);
    build.encode(encoder.encode_descriptor(
        "build",
        "The agent's version and commit; always 1.",
        None,
        build.metric_type(),
    )?)
}

/// The health metrics of every service; per backend up to [`BACKEND_SERIES_LIMIT`] backends.
fn encode_health(
    services: &[crate::health::ServiceSample],
    encoder: &mut DescriptorEncoder,
) -> fmt::Result {
    let total: usize = services.iter().map(|s| s.backends.len()).sum();
    let detailed = total <= BACKEND_SERIES_LIMIT;
    let help = "1 when the backend may be picked, 0 while health excludes it (even in panic); beyond 1,000 backends one series per service: its healthy backends.";
    if detailed {
        let backends: Vec<(&str, String, bool)> = services
            .iter()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .map(|(addr, ok)| (s.service.as_str(), addr.to_string(), *ok))
            })
            .collect();
        gauge_family(
            encoder,
            "backend_healthy",
            help,
            backends.iter().map(|(service, backend, ok)| {
                (
                    [("service", *service), ("backend", backend.as_str())],
                    u64::from(*ok),
                )
            }),
        )?;
    } else {
        gauge_family(
            encoder,
            "backend_healthy",
            help,
            services.iter().map(|s| {
                let healthy = s.backends.iter().filter(|(_, ok)| *ok).count();
                ([("service", s.service.as_str())], healthy as u64)
            }),
        )?;
    }
    gauge_family(
        encoder,
        "service_panic",
        "1 while every backend of the service is unhealthy and all of them are used.",
        services
            .iter()
            .map(|s| ([("service", s.service.as_str())], u64::from(s.panic))),
    )?;
    // Beyond the limit, a service's counters appear once they count something.
    counter_family(
        encoder,
        "health_checks",
        "Active health probes, by outcome.",
        services
            .iter()
            .filter(|s| detailed || s.checks_passed + s.checks_failed > 0)
            .flat_map(|s| {
                [
                    (
                        [("service", s.service.as_str()), ("result", "passed")],
                        s.checks_passed,
                    ),
                    (
                        [("service", s.service.as_str()), ("result", "failed")],
                        s.checks_failed,
                    ),
                ]
            }),
    )?;
    counter_family(
        encoder,
        "outlier_ejections",
        "Backends ejected after failed connects seen by the kernel.",
        services
            .iter()
            .filter(|s| detailed || s.ejections > 0)
            .map(|s| ([("service", s.service.as_str())], s.ejections)),
    )
}

/// The mTLS tunnel's metrics.
fn encode_tunnel(
    t: &crate::tunnel::proxy::stats::TunnelSample,
    encoder: &mut DescriptorEncoder,
) -> fmt::Result {
    counter_family(
        encoder,
        "mtls_handshakes",
        "TLS handshakes of the tunnel by side (inbound, outbound) and result (ok or why it failed).",
        t.handshakes
            .iter()
            .map(|((side, result), n)| ([("side", *side), ("result", *result)], *n)),
    )?;
    counter_family(
        encoder,
        "mtls_authz_decisions",
        "Authorization decisions of the inbound side by service, decision and caller identity.",
        t.authz.iter().map(|((service, decision, identity), n)| {
            (
                [
                    ("service", service.as_str()),
                    ("decision", *decision),
                    ("identity", identity.as_str()),
                ],
                *n,
            )
        }),
    )?;
    counter_family(
        encoder,
        "mtls_flows",
        "Tunneled flows by side and result (opened, or why refused).",
        t.flows
            .iter()
            .map(|((side, result), n)| ([("side", *side), ("result", *result)], *n)),
    )?;
    counter_family(
        encoder,
        "mtls_bytes",
        "Bytes carried through the tunnel by direction (sent: into the tunnel).",
        [
            ([("direction", "sent")], t.bytes_sent),
            ([("direction", "received")], t.bytes_received),
        ],
    )?;
    gauge_family(
        encoder,
        "mtls_streams_active",
        "Tunneled flows open now.",
        [([("side", "all")], t.streams_active)],
    )?;
    gauge_family(
        encoder,
        "mtls_pooled_connections",
        "Pooled tunnel connections to peer agents open now.",
        [([("side", "outbound")], t.pooled_connections)],
    )?;
    counter_family(
        encoder,
        "mtls_cert_reloads",
        "Certificate reloads, applied or refused (the previous certificates stay).",
        [
            ([("result", "applied")], t.cert_reloads_ok),
            ([("result", "rejected")], t.cert_reloads_failed),
        ],
    )?;
    histogram(
        encoder,
        "mtls_flow_duration",
        "How long tunneled flows lasted, from open to close (both sides).",
        &t.flow_durations,
    )?;
    let mut expiry = encoder.encode_descriptor(
        "mtls_cert_expiry",
        "Seconds until each loaded certificate expires (negative once expired).",
        Some(&Unit::Seconds),
        MetricType::Gauge,
    )?;
    for (identity, seconds) in &t.cert_expiry {
        ConstGauge::new(*seconds)
            .encode(expiry.encode_family(&[("identity", identity.as_str())])?)?;
    }
    Ok(())
}

/// One histogram without labels, in seconds (`name` gets the `_seconds` suffix).
fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    sample: &HistogramSample,
) -> fmt::Result {
    // prometheus-client takes each bucket's own count (it sums them) and writes `+Inf` for an
    // upper bound of f64::MAX.
    let mut below = 0;
    let mut buckets: Vec<(f64, u64)> = sample
        .buckets
        .iter()
        .map(|&(bound, cumulative)| {
            let own = cumulative.saturating_sub(below);
            below = cumulative;
            (if bound.is_finite() { bound } else { f64::MAX }, own)
        })
        .collect();
    if buckets.last().is_none_or(|(bound, _)| *bound != f64::MAX) {
        buckets.push((f64::MAX, sample.count.saturating_sub(below)));
    }
    encoder
        .encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(sample.sum, sample.count, &buckets, None)
}

/// One counter metric with a sample per label set (`name` gets the `_total` suffix).
fn counter_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One gauge metric with a sample per label set.
fn gauge_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    struct Fixed(Snapshot);

    impl SnapshotSource for Fixed {
        fn snapshot(&self) -> Snapshot {
            self.0.clone()
        }

        fn waiting_for(&self) -> Vec<String> {
            Vec::new()
        }
    }

    fn backend(service: &str, backend: &str, transport: Transport, count: u64) -> BackendSample {
        BackendSample {
            service: service.into(),
            backend: backend.into(),
            transport,
            count,
        }
    }

    fn sample() -> Snapshot {
        Snapshot {
            counters: Counter::ALL
                .iter()
                .map(|&c| {
                    let n = match c {
                        Counter::Rewritten => 300,
                        Counter::Passthrough => 8_531,
                        _ => 0,
                    };
                    (c, n)
                })
                .collect(),
            backends: vec![
                backend("web", "10.1.0.2:8080", Transport::Tcp, 120),
                backend("web", "[fd00:1::3]:8080", Transport::Tcp, 180),
                backend("dns", "10.1.0.4:53", Transport::Udp, 9),
            ],
            maps: vec![
                MapUsage {
                    name: "services",
                    pinned: mesh_common::maps::SERVICES,
                    entries: Some(3),
                    capacity: 65_536,
                },
                MapUsage {
                    name: "reverse",
                    pinned: mesh_common::maps::REVERSE,
                    entries: None,
                    capacity: 262_144,
                },
            ],
            health: vec![crate::health::ServiceSample {
                service: "web".into(),
                panic: false,
                checks_passed: 7,
                checks_failed: 2,
                ejections: 1,
                backends: vec![
                    ("10.1.0.2:8080".parse().unwrap(), true),
                    ("[fd00:1::3]:8080".parse().unwrap(), false),
                ],
            }],
            reloads_applied: 2,
            reloads_rejected: 1,
            apply_durations: {
                let h = crate::telemetry::histogram::DurationHistogram::new(&[0.001, 0.01]);
                h.observe(Duration::from_micros(400));
                h.observe(Duration::from_millis(3));
                h.sample()
            },
            flows_recorded: 42,
            uptime_seconds: 12.5,
            gossip: GossipSample {
                alive: 4,
                dead: 1,
                bytes_sent: 100,
                bytes_received: 200,
                datagrams_sent: 2,
                datagrams_received: 5,
                rejected: vec![("hmac", 3), ("replayed", 2)],
            },
            conflicts: vec![("definition", 1)],
            tunnel: Some(crate::tunnel::proxy::stats::TunnelSample {
                handshakes: vec![(("inbound", "unknown_ca"), 2)],
                authz: vec![(
                    ("payments".into(), "deny", "spiffe://td/ns/a/sa/b".into()),
                    3,
                )],
                cert_expiry: vec![("spiffe://td/ns/mesh/sa/node".into(), 86_000)],
                ..Default::default()
            }),
        }
    }

    fn exposition(snapshot: Snapshot) -> String {
        render(&registry(Arc::new(Fixed(snapshot)))).expect("encodes")
    }

    /// The families (`# TYPE` names) of an exposition.
    fn families(text: &str) -> BTreeSet<&str> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
            .collect()
    }

    #[test]
    fn renders_every_metric_of_a_snapshot() {
        let text = exposition(sample());
        let lines: Vec<&str> = text.lines().collect();
        let expected = [
            "# TYPE mesh_kernel_forwarded counter",
            r#"mesh_kernel_forwarded_total{path="kernel"} 300"#,
            r#"mesh_kernel_forwarded_total{path="mtls"} 0"#,
            r#"mesh_kernel_refused_total{reason="no_backend"} 0"#,
            r#"mesh_kernel_refused_total{reason="no_service_port"} 0"#,
            r#"mesh_kernel_refused_total{reason="mtls_no_agent"} 0"#,
            r#"mesh_kernel_passthrough_total{kind="not_a_vip"} 8531"#,
            r#"mesh_kernel_passthrough_total{kind="agent_socket"} 0"#,
            "mesh_kernel_reverse_lookups_total 0",
            r#"mesh_kernel_affinity_total{result="hit"} 0"#,
            "mesh_kernel_strict_dropped_total 0",
            "mesh_kernel_connect_failures_total 0",
            "mesh_kernel_loopback_redirected_total 0",
            r#"mesh_kernel_errors_total{kind="event_dropped"} 0"#,
            "# TYPE mesh_backend_connections counter",
            r#"mesh_backend_connections_total{service="web",backend="10.1.0.2:8080"} 120"#,
            r#"mesh_backend_connections_total{service="web",backend="[fd00:1::3]:8080"} 180"#,
            r#"mesh_backend_datagrams_total{service="dns",backend="10.1.0.4:53"} 9"#,
            "# TYPE mesh_map_entries gauge",
            r#"mesh_map_entries{map="services",pinned="MESH_SVC_V1"} 3"#,
            r#"mesh_map_capacity{map="services",pinned="MESH_SVC_V1"} 65536"#,
            r#"mesh_map_capacity{map="reverse",pinned="MESH_REV_V1"} 262144"#,
            r#"mesh_backend_healthy{service="web",backend="10.1.0.2:8080"} 1"#,
            r#"mesh_backend_healthy{service="web",backend="[fd00:1::3]:8080"} 0"#,
            r#"mesh_service_panic{service="web"} 0"#,
            r#"mesh_health_checks_total{service="web",result="passed"} 7"#,
            r#"mesh_health_checks_total{service="web",result="failed"} 2"#,
            r#"mesh_outlier_ejections_total{service="web"} 1"#,
            r#"mesh_config_reloads_total{result="applied"} 2"#,
            r#"mesh_config_reloads_total{result="rejected"} 1"#,
            "# TYPE mesh_kernel_apply_duration_seconds histogram",
            r#"mesh_kernel_apply_duration_seconds_bucket{le="0.001"} 1"#,
            r#"mesh_kernel_apply_duration_seconds_bucket{le="+Inf"} 2"#,
            "mesh_kernel_apply_duration_seconds_count 2",
            "mesh_flows_recorded_total 42",
            r#"mesh_gossip_members{state="alive"} 4"#,
            r#"mesh_gossip_members{state="dead"} 1"#,
            r#"mesh_gossip_bytes_total{direction="sent"} 100"#,
            r#"mesh_gossip_bytes_total{direction="received"} 200"#,
            r#"mesh_gossip_datagrams_total{direction="sent"} 2"#,
            r#"mesh_gossip_datagrams_total{direction="received"} 5"#,
            r#"mesh_gossip_auth_failures_total{kind="hmac"} 3"#,
            r#"mesh_gossip_auth_failures_total{kind="replayed"} 2"#,
            r#"mesh_catalog_conflicts{kind="definition"} 1"#,
            "# UNIT mesh_agent_uptime_seconds seconds",
            "mesh_agent_uptime_seconds 12.5",
            r#"mesh_mtls_handshakes_total{side="inbound",result="unknown_ca"} 2"#,
            r#"mesh_mtls_authz_decisions_total{service="payments",decision="deny",identity="spiffe://td/ns/a/sa/b"} 3"#,
            r#"mesh_mtls_flow_duration_seconds_count 0"#,
            r#"mesh_mtls_cert_expiry_seconds{identity="spiffe://td/ns/mesh/sa/node"} 86000"#,
            "# TYPE process_cpu_seconds counter",
            "# TYPE process_resident_memory_bytes gauge",
            "# TYPE process_open_fds gauge",
            "# TYPE process_max_fds gauge",
            "# TYPE process_start_time_seconds gauge",
            "# TYPE process_threads gauge",
        ];
        for line in expected {
            assert!(lines.contains(&line), "no line {line:?} in:\n{text}");
        }
        let build = format!(
            "mesh_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            env!("MESH_BUILD_COMMIT")
        );
        assert!(lines.contains(&build.as_str()), "no {build:?} in:\n{text}");
        assert!(
            !text.contains("mesh_map_entries{map=\"reverse\""),
            "an uncounted map has no entries series:\n{text}"
        );
        assert!(
            !text.contains("mesh_backend_connections_total{service=\"dns\""),
            "{text}"
        );
        let kernel = lines
            .iter()
            .filter(|l| l.starts_with("mesh_kernel_") && !l.starts_with("mesh_kernel_apply"))
            .count();
        assert_eq!(
            kernel,
            Counter::ALL.len(),
            "one sample per counter:\n{text}"
        );
        assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
        // Every family of the exposition is in the module docs' table (and so the README's).
        let docs = include_str!("metrics.rs");
        for family in families(&text) {
            let family = family.strip_suffix("_seconds").unwrap_or(family);
            assert!(
                docs.contains(&format!("`{family}")),
                "{family} is not documented"
            );
        }
    }

    #[test]
    fn every_counter_lands_in_exactly_one_kernel_family() {
        let families: BTreeSet<&str> = KERNEL_FAMILIES.iter().map(|(name, _)| *name).collect();
        assert_eq!(families.len(), KERNEL_FAMILIES.len());
        let mut seen = BTreeSet::new();
        for counter in Counter::ALL {
            let (family, label) = kernel_family(counter);
            assert!(families.contains(family), "{counter:?}: {family} unknown");
            assert!(
                seen.insert((family, label)),
                "{counter:?} shares {family} {label:?}"
            );
        }
        // An unlabelled family holds one counter; a labelled one has no unlabelled member.
        for family in &families {
            let members: Vec<_> = Counter::ALL
                .iter()
                .map(|&c| kernel_family(c))
                .filter(|(f, _)| f == family)
                .collect();
            assert!(!members.is_empty(), "{family} has no counter");
            if members.iter().any(|(_, l)| l.is_none()) {
                assert_eq!(members.len(), 1, "{family}: {members:?}");
            }
        }
        assert_eq!(seen.len(), Counter::ALL.len());
    }

    #[test]
    fn a_removed_backend_leaves_the_exposition() {
        let source = Arc::new(std::sync::Mutex::new(sample()));
        struct Shared(Arc<std::sync::Mutex<Snapshot>>);
        impl SnapshotSource for Shared {
            fn snapshot(&self) -> Snapshot {
                self.0.lock().unwrap().clone()
            }

            fn waiting_for(&self) -> Vec<String> {
                Vec::new()
            }
        }
        let registry = registry(Arc::new(Shared(Arc::clone(&source))));
        assert!(render(&registry).unwrap().contains("10.1.0.2:8080"));
        {
            let mut s = source.lock().unwrap();
            s.backends.remove(0);
            s.health[0].backends.remove(0);
        }
        let text = render(&registry).unwrap();
        assert!(!text.contains("10.1.0.2:8080"), "{text}");
        assert!(text.contains("[fd00:1::3]:8080"), "{text}");
    }

    /// 20,000 services of 10 backends each (200,000), every backend with traffic, every 50th
    /// service with active checks and ejections, some in panic: per service, not per backend,
    /// and under 5 MB.
    fn many(services: usize, per_service: usize) -> Snapshot {
        let mut s = sample();
        s.backends.clear();
        s.health.clear();
        for i in 0..services {
            let name = format!("service-{i:05}");
            let transport = if i % 10 == 0 {
                Transport::Udp
            } else {
                Transport::Tcp
            };
            let mut health = crate::health::ServiceSample {
                service: name.clone(),
                panic: i % 1_000 == 0,
                checks_passed: if i % 50 == 0 { 12_345 } else { 0 },
                checks_failed: if i % 50 == 0 { 3 } else { 0 },
                ejections: if i % 50 == 0 { 2 } else { 0 },
                backends: Vec::new(),
            };
            for j in 0..per_service {
                let addr: SocketAddr = format!("10.{}.{}.{}:8080", i / 250, i % 250, j + 1)
                    .parse()
                    .unwrap();
                s.backends
                    .push(backend(&name, &addr.to_string(), transport, 1_000_000));
                health.backends.push((addr, j != 0));
            }
            s.health.push(health);
        }
        s
    }

    #[test]
    fn a_20000_service_scrape_is_per_service_and_under_5_mb() {
        let text = exposition(many(20_000, 10));
        let size = text.len();
        println!("scrape at 20,000 services / 200,000 backends: {size} bytes");
        assert!(size < 5_000_000, "{size} bytes");
        assert!(
            !text.contains("backend=\""),
            "no per-backend series beyond the limit"
        );
        let lines: Vec<&str> = text.lines().collect();
        for line in [
            r#"mesh_backend_connections_total{service="service-00001"} 10000000"#,
            r#"mesh_backend_datagrams_total{service="service-00010"} 10000000"#,
            r#"mesh_backend_healthy{service="service-00001"} 9"#,
            r#"mesh_service_panic{service="service-01000"} 1"#,
            r#"mesh_health_checks_total{service="service-00050",result="failed"} 3"#,
        ] {
            assert!(lines.contains(&line), "no {line:?}");
        }
        assert!(!text.contains(r#"mesh_health_checks_total{service="service-00001""#));
        // At the limit, still per backend.
        let text = exposition(many(100, 10));
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("mesh_backend_connections_total{"))
                .count(),
            900
        );
        assert!(text.contains(
            r#"mesh_backend_healthy{service="service-00000",backend="10.0.0.1:8080"} 0"#
        ));
    }
}
