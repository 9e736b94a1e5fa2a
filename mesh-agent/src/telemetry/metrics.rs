//! Prometheus metrics on `--metrics-addr` (default port 15020), with prometheus-client.
//!
//! The agent hands out a [`Snapshot`] of what it knows at scrape time; this module owns the
//! metric names, labels and the HTTP endpoint (`GET /metrics`, OpenMetrics text). Nothing is
//! kept between scrapes: a [`Collector`] turns each scrape's snapshot into metrics, so a backend
//! that left the config leaves the exposition with it. This module never touches the kernel
//! maps itself.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `mesh_kernel_decisions_total` | counter | `reason` ([`Counter::name`]) |
//! | `mesh_backend_connections_total` | counter | `service`, `backend` (address) |
//! | `mesh_map_entries`, `mesh_map_capacity` | gauge | `map` (pinned map name) |
//! | `mesh_backend_healthy` | gauge (0/1) | `service`, `backend` |
//! | `mesh_service_panic` | gauge (0/1) | `service` |
//! | `mesh_health_checks_total` | counter | `service`, `result` (`passed`, `failed`) |
//! | `mesh_outlier_ejections_total` | counter | `service` |
//! | `mesh_config_reloads_total` | counter | `result` (`applied`, `rejected`) |
//! | `mesh_flows_recorded_total` | counter | |
//! | `mesh_agent_uptime_seconds` | gauge | |
//! | `mesh_build_info` | info (value 1) | `version` |
//! | `mesh_gossip_members` | gauge | `state` (`alive`, `dead`; this node counts as alive) |
//! | `mesh_gossip_bytes_total` | counter | `direction` (`sent`, `received`) |
//! | `mesh_gossip_datagrams_total` | counter | `direction` (`sent`, `received`) |
//! | `mesh_gossip_auth_failures_total` | counter | `kind`: not_a_frame, old_format, hmac, stale, future, replayed |
//! | `mesh_catalog_conflicts` | gauge | `kind` ([`crate::catalog::ConflictKind::name`]) |

use std::{convert::Infallible, fmt, io, net::SocketAddr, sync::Arc, time::Duration};

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
    encoding::{text, DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge, info::Info, MetricType},
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;

/// Connections one backend received.
#[derive(Clone, Debug)]
pub struct BackendSample {
    pub service: String,
    pub backend: String,
    pub connections: u64,
}

/// Fill level of one kernel map.
#[derive(Clone, Debug)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: u64,
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

/// A registry whose one collector reads `source` at every encoding, under the `mesh_` prefix.
fn registry(source: Arc<dyn SnapshotSource>) -> Registry {
    let mut registry = Registry::with_prefix("mesh");
    registry.register_collector(Box::new(AgentCollector { source }));
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

/// Writes every metric of `s`; the names and labels are the ones in the module docs.
fn encode_snapshot(s: &Snapshot, encoder: &mut DescriptorEncoder) -> fmt::Result {
    counter_family(
        encoder,
        "kernel_decisions",
        "Decisions of the kernel programs at connect/sendmsg/recvmsg/getpeername, by reason.",
        s.counters
            .iter()
            .map(|(counter, value)| ([("reason", counter.name())], *value)),
    )?;
    counter_family(
        encoder,
        "backend_connections",
        "Connections and unconnected sends the kernel sent to each backend of a service.",
        s.backends.iter().map(|b| {
            (
                [
                    ("service", b.service.as_str()),
                    ("backend", b.backend.as_str()),
                ],
                b.connections,
            )
        }),
    )?;
    gauge_family(
        encoder,
        "map_entries",
        "Entries the agent keeps in each kernel map.",
        s.maps.iter().map(|m| ([("map", m.name)], m.entries)),
    )?;
    gauge_family(
        encoder,
        "map_capacity",
        "Maximum entries of each kernel map.",
        s.maps.iter().map(|m| ([("map", m.name)], m.capacity)),
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
    let build = Info::new([("version", crate::VERSION)]);
    build.encode(encoder.encode_descriptor(
        "build",
        "The agent's version and commit; always 1.",
        None,
        build.metric_type(),
    )?)
}

/// The health metrics of every service.
fn encode_health(
    services: &[crate::health::ServiceSample],
    encoder: &mut DescriptorEncoder,
) -> fmt::Result {
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
        "1 when the backend may be picked, 0 while health excludes it (even in panic).",
        backends.iter().map(|(service, backend, ok)| {
            (
                [("service", *service), ("backend", backend.as_str())],
                u64::from(*ok),
            )
        }),
    )?;
    gauge_family(
        encoder,
        "service_panic",
        "1 while every backend of the service is unhealthy and all of them are used.",
        services
            .iter()
            .map(|s| ([("service", s.service.as_str())], u64::from(s.panic))),
    )?;
    counter_family(
        encoder,
        "health_checks",
        "Active health probes, by outcome.",
        services.iter().flat_map(|s| {
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

    fn sample() -> Snapshot {
        Snapshot {
            counters: Counter::ALL
                .iter()
                .map(|&c| (c, if c == Counter::Rewritten { 300 } else { 0 }))
                .collect(),
            backends: vec![
                BackendSample {
                    service: "web".into(),
                    backend: "10.1.0.2:8080".into(),
                    connections: 120,
                },
                BackendSample {
                    service: "web".into(),
                    backend: "[fd00:1::3]:8080".into(),
                    connections: 180,
                },
            ],
            maps: vec![MapUsage {
                name: mesh_common::maps::SERVICES,
                entries: 3,
                capacity: 65_536,
            }],
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

    #[test]
    fn renders_every_metric_of_a_snapshot() {
        let text = exposition(sample());
        let lines: Vec<&str> = text.lines().collect();
        let expected = [
            "# TYPE mesh_kernel_decisions counter",
            r#"mesh_kernel_decisions_total{reason="forwarded"} 300"#,
            r#"mesh_kernel_decisions_total{reason="no_backend"} 0"#,
            r#"mesh_kernel_decisions_total{reason="events_dropped"} 0"#,
            "# TYPE mesh_backend_connections counter",
            r#"mesh_backend_connections_total{service="web",backend="10.1.0.2:8080"} 120"#,
            r#"mesh_backend_connections_total{service="web",backend="[fd00:1::3]:8080"} 180"#,
            "# TYPE mesh_map_entries gauge",
            r#"mesh_map_entries{map="MESH_SVC_V1"} 3"#,
            r#"mesh_map_capacity{map="MESH_SVC_V1"} 65536"#,
            r#"mesh_backend_healthy{service="web",backend="10.1.0.2:8080"} 1"#,
            r#"mesh_backend_healthy{service="web",backend="[fd00:1::3]:8080"} 0"#,
            r#"mesh_service_panic{service="web"} 0"#,
            r#"mesh_health_checks_total{service="web",result="passed"} 7"#,
            r#"mesh_health_checks_total{service="web",result="failed"} 2"#,
            r#"mesh_outlier_ejections_total{service="web"} 1"#,
            r#"mesh_config_reloads_total{result="applied"} 2"#,
            r#"mesh_config_reloads_total{result="rejected"} 1"#,
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
            r#"mesh_mtls_cert_expiry_seconds{identity="spiffe://td/ns/mesh/sa/node"} 86000"#,
        ];
        for line in expected {
            assert!(lines.contains(&line), "no line {line:?} in:\n{text}");
        }
        let build = format!("mesh_build_info{{version=\"{}\"}} 1", crate::VERSION);
        assert!(lines.contains(&build.as_str()), "no {build:?} in:\n{text}");
        let reasons = lines
            .iter()
            .filter(|l| l.starts_with("mesh_kernel_decisions_total{"))
            .count();
        assert_eq!(reasons, Counter::ALL.len(), "{text}");
        assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
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
}
