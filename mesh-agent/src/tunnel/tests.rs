//! In-process tests of the tunnel: outbound → inbound over loopback TCP, with certificates
//! from [`crate::tunnel::identity::ca`], a fake kernel (original destinations) and an echo backend.

use std::{
    collections::HashMap,
    error::Error,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
};

use crate::{dataplane::Redirect, telemetry::flows::ServiceNames};
use crate::{
    model::policy::{Action, Policies, Rule},
    tunnel::authz::{self, MtlsService},
    tunnel::identity::certs::tests::Fixture,
    tunnel::proxy::inbound,
    tunnel::proxy::outbound,
    tunnel::proxy::stats::{INBOUND, OUTBOUND},
    tunnel::{OriginalDestinations, Tunnel, TunnelConfig},
};

const TD: &str = "mesh.test";
const NODE: &str = "spiffe://mesh.test/ns/mesh/sa/node";
const FRONTEND: &str = "spiffe://mesh.test/ns/shop/sa/frontend";
const BATCH: &str = "spiffe://mesh.test/ns/shop/sa/batch";
const SERVICE_ID: u32 = 7;
const UNKNOWN_SERVICE_ID: u32 = 8;

/// The kernel's records, as a test fills them.
#[derive(Default)]
struct FakeKernel(Mutex<HashMap<SocketAddr, Redirect>>);

impl OriginalDestinations for FakeKernel {
    fn take(&self, client: SocketAddr) -> Result<Option<Redirect>, Box<dyn Error + Send + Sync>> {
        Ok(self.0.lock().unwrap().remove(&client))
    }
}

fn names() -> Arc<ServiceNames> {
    let names = ServiceNames::default();
    names.publish([(SERVICE_ID, "payments".to_owned())].into());
    Arc::new(names)
}

/// Echoes until end of stream, then closes its side.
async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    addr
}

/// One agent's tunnel with both listeners on loopback.
struct Agent {
    tunnel: Arc<Tunnel>,
    kernel: Arc<FakeKernel>,
    outbound: SocketAddr,
    inbound: SocketAddr,
}

/// A cgroup tree stand-in: cgroup ids are directory inodes.
struct Cgroups {
    root: PathBuf,
}

impl Cgroups {
    fn new(name: &str) -> Cgroups {
        let root = std::env::temp_dir().join(format!("mesh-cg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for dir in ["frontend", "batch", "other"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        Cgroups { root }
    }

    fn id(&self, dir: &str) -> u64 {
        std::fs::metadata(self.root.join(dir)).unwrap().ino()
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Starts an agent; its flows go to peers' inbound port `peer_port` (0: its own).
async fn agent(fixture: &Fixture, cgroups: &Cgroups, peer_port: u16, backend: SocketAddr) -> Agent {
    let inbound_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inbound = inbound_listener.local_addr().unwrap();
    let outbound_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let outbound = outbound_listener.local_addr().unwrap();
    let config = TunnelConfig {
        sources: fixture.sources.clone(),
        identities: vec![
            (PathBuf::from("frontend"), FRONTEND.parse().unwrap()),
            (cgroups.root.join("batch"), BATCH.parse().unwrap()),
        ],
        outbound_port: outbound.port(),
        inbound_port: if peer_port == 0 {
            inbound.port()
        } else {
            peer_port
        },
        idle_timeout: Duration::from_secs(60),
    };
    let tunnel = Tunnel::new(
        &config,
        cgroups.root.clone(),
        tokio::runtime::Handle::current(),
    )
    .unwrap();
    tunnel.update(
        &[MtlsService {
            name: "payments".into(),
            port: 443,
            backends: vec![backend],
            check: None,
        }],
        Policies {
            rules: vec![Rule {
                service: "payments".into(),
                port: None,
                action: Action::Deny,
                from: vec![BATCH.parse().unwrap()],
            }],
        },
    );
    let kernel = Arc::new(FakeKernel::default());
    tokio::spawn(inbound::serve(Arc::clone(&tunnel), inbound_listener));
    tokio::spawn(outbound::serve(
        Arc::clone(&tunnel),
        outbound_listener,
        Arc::clone(&kernel) as Arc<dyn OriginalDestinations>,
        names(),
    ));
    Agent {
        tunnel,
        kernel,
        outbound,
        inbound,
    }
}

impl Agent {
    /// A client connection the kernel "redirected": recorded under its address, then connected.
    async fn connect(&self, backend: SocketAddr, service_id: u32, cgroup_id: u64) -> TcpStream {
        self.try_connect(backend, service_id, cgroup_id)
            .await
            .unwrap()
    }

    /// Sends `payload` on a new flow and returns what came back (an error when refused early).
    async fn attempt(
        &self,
        backend: SocketAddr,
        service_id: u32,
        cgroup_id: u64,
        payload: &[u8],
    ) -> std::io::Result<Vec<u8>> {
        exchange(
            self.try_connect(backend, service_id, cgroup_id).await?,
            payload,
        )
        .await
    }

    async fn try_connect(
        &self,
        backend: SocketAddr,
        service_id: u32,
        cgroup_id: u64,
    ) -> std::io::Result<TcpStream> {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let client = socket.local_addr().unwrap();
        self.kernel.0.lock().unwrap().insert(
            client,
            Redirect {
                backend,
                service_id,
                cgroup_id,
            },
        );
        // A refusal may reset the connection before connect() returns.
        socket.connect(self.outbound).await
    }

    fn count(&self, side: &str, result: &str) -> u64 {
        self.tunnel
            .stats
            .sample()
            .flows
            .iter()
            .filter(|((s, r), _)| *s == side && *r == result)
            .map(|(_, n)| *n)
            .sum()
    }

    fn handshakes(&self, side: &str, result: &str) -> u64 {
        self.tunnel
            .stats
            .sample()
            .handshakes
            .iter()
            .filter(|((s, r), _)| *s == side && *r == result)
            .map(|(_, n)| *n)
            .sum()
    }
}

/// Waits (up to 5 s) until `check` holds: the far side counts after the near side saw the end.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 5 s: {what}");
}

/// Writes `payload`, half-closes, and reads until the other side closes.
async fn exchange(mut stream: TcpStream, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(payload).await?;
    stream.shutdown().await?;
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut echoed))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    Ok(echoed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_echo_and_half_close_travels_both_ways() {
    let fixture = Fixture::new("tunnel-echo", TD, NODE, &[FRONTEND, BATCH]);
    let cgroups = Cgroups::new("echo");
    let backend = echo_backend().await;
    let a = agent(&fixture, &cgroups, 0, backend).await;
    // 3 MB: more than the stream window, so flow control takes part.
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let client = a.connect(backend, SERVICE_ID, cgroups.id("frontend")).await;
    let echoed = exchange(client, &payload).await.unwrap();
    assert!(
        echoed == payload,
        "echoed {} of {} bytes",
        echoed.len(),
        payload.len()
    );

    // Half-close: after our FIN the backend can still answer, and its FIN reaches us.
    let mut client = a.connect(backend, SERVICE_ID, cgroups.id("frontend")).await;
    client.write_all(b"ping").await.unwrap();
    client.shutdown().await.unwrap();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"ping");

    let sample = a.tunnel.sample();
    assert!(sample.bytes_sent >= 2 * 3_000_000, "{sample:?}");
    assert!(
        sample
            .authz
            .iter()
            .any(|((service, decision, id), n)| service == "payments"
                && *decision == "allow"
                && id == FRONTEND
                && *n == 2),
        "{sample:?}"
    );
    assert_eq!(a.count(OUTBOUND, "opened"), 2);
    // Both flows shared one connection and one handshake.
    assert_eq!(a.handshakes(OUTBOUND, "ok"), 1);
    assert_eq!(a.tunnel.pool.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_rule_unknown_target_and_missing_record_are_refused() {
    let fixture = Fixture::new("tunnel-deny", TD, NODE, &[FRONTEND, BATCH]);
    let cgroups = Cgroups::new("deny");
    let backend = echo_backend().await;
    let a = agent(&fixture, &cgroups, 0, backend).await;

    let outcome = a
        .attempt(backend, SERVICE_ID, cgroups.id("batch"), b"secret")
        .await;
    assert!(
        !matches!(&outcome, Ok(bytes) if !bytes.is_empty()),
        "{outcome:?}"
    );
    let sample = a.tunnel.sample();
    assert!(
        sample
            .authz
            .iter()
            .any(|((service, decision, id), n)| service == "payments"
                && *decision == "deny"
                && id == BATCH
                && *n == 1),
        "{sample:?}"
    );
    eventually("the inbound side counted the denial", || {
        a.count(INBOUND, "denied") == 1
    })
    .await;

    // Another backend port on the same host is no mTLS backend: no open proxy.
    let elsewhere = SocketAddr::new(backend.ip(), a.inbound.port());
    let outcome = a
        .attempt(elsewhere, UNKNOWN_SERVICE_ID, cgroups.id("frontend"), b"x")
        .await;
    assert!(
        !matches!(&outcome, Ok(bytes) if !bytes.is_empty()),
        "{outcome:?}"
    );
    eventually("the inbound side counted the unknown target", || {
        a.count(INBOUND, "unknown_target") == 1
    })
    .await;

    // A connection the kernel has no record of.
    if let Ok(mut unrecorded) = TcpStream::connect(a.outbound).await {
        let mut buf = [0u8; 1];
        assert_eq!(unrecorded.read(&mut buf).await.unwrap_or(0), 0);
    }
    eventually(
        "the outbound side counted the unrecorded connection",
        || a.count(OUTBOUND, "no_destination") == 1,
    )
    .await;

    // An allowed identity still gets through, on the node identity too (cgroup "other").
    let ok = a
        .attempt(backend, SERVICE_ID, cgroups.id("other"), b"hello")
        .await;
    assert_eq!(ok.unwrap(), b"hello");
    let sample = a.tunnel.sample();
    assert!(
        sample
            .authz
            .iter()
            .any(|((_, d, id), _)| *d == "allow" && id == NODE),
        "{sample:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_of_another_ca_are_rejected_both_ways() {
    let fixture = Fixture::new("tunnel-ca", TD, NODE, &[FRONTEND]);
    let mut rogue = Fixture::new("tunnel-rogue", TD, NODE, &[FRONTEND]);
    let cgroups = Cgroups::new("ca");
    let backend = echo_backend().await;
    let server = agent(&fixture, &cgroups, 0, backend).await;

    // A client that trusts only its own CA refuses the server.
    let client = agent(&rogue, &cgroups, server.inbound.port(), backend).await;
    let outcome = client
        .attempt(backend, SERVICE_ID, cgroups.id("frontend"), b"secret")
        .await;
    assert!(
        !matches!(&outcome, Ok(bytes) if !bytes.is_empty()),
        "{outcome:?}"
    );
    assert_eq!(client.handshakes(OUTBOUND, "unknown_ca"), 1);
    assert_eq!(client.count(OUTBOUND, "refused"), 1);
    eventually("the server saw its certificate refused", || {
        server.handshakes(INBOUND, "rejected_by_peer") == 1
    })
    .await;

    // A client that trusts the server's CA too, but whose certificate the server's CA did not
    // sign, is refused by the server.
    let both = rogue.dir.join("both.pem");
    std::fs::write(&both, format!("{}{}", fixture.ca.cert, rogue.ca.cert)).unwrap();
    rogue.sources.ca_bundle = both;
    let client = agent(&rogue, &cgroups, server.inbound.port(), backend).await;
    let outcome = client
        .attempt(backend, SERVICE_ID, cgroups.id("frontend"), b"secret")
        .await;
    assert!(
        !matches!(&outcome, Ok(bytes) if !bytes.is_empty()),
        "{outcome:?}"
    );
    eventually("the server refused the client's CA", || {
        server.handshakes(INBOUND, "unknown_ca") == 1
    })
    .await;
    assert_eq!(server.count(INBOUND, "opened"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_flows_share_one_connection() {
    let fixture = Fixture::new("tunnel-1000", TD, NODE, &[FRONTEND]);
    let cgroups = Cgroups::new("1000");
    let backend = echo_backend().await;
    let a = agent(&fixture, &cgroups, 0, backend).await;
    let frontend = cgroups.id("frontend");
    let mut clients = Vec::new();
    for i in 0..1000u32 {
        clients.push(a.connect(backend, SERVICE_ID, frontend).await);
        if i == 0 {
            // Let the first flow set up the pooled connection alone.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Every flow is open at once before any finishes.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, client) in clients.into_iter().enumerate() {
        tasks.spawn(async move {
            let payload = format!("flow {i} ").repeat(100).into_bytes();
            let echoed = exchange(client, &payload).await.unwrap();
            assert!(echoed == payload, "flow {i}");
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(a.count(OUTBOUND, "opened"), 1000);
    assert_eq!(a.count(INBOUND, "opened"), 1000);
    assert_eq!(a.handshakes(OUTBOUND, "ok"), 1);
    assert_eq!(a.handshakes(INBOUND, "ok"), 1);
    assert_eq!(a.tunnel.sample().pooled_connections, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_serve_new_connections_and_keep_old_ones() {
    let fixture = Fixture::new("tunnel-rotate", TD, NODE, &[FRONTEND]);
    let cgroups = Cgroups::new("rotate");
    let backend = echo_backend().await;
    let a = agent(&fixture, &cgroups, 0, backend).await;
    let mut long = a.connect(backend, SERVICE_ID, cgroups.id("frontend")).await;
    long.write_all(b"before ").await.unwrap();
    // The agent opens the flow's tunnel connection on its own time: rotate only once it has
    // (else the long flow itself would dial with the new credentials).
    for _ in 0..500 {
        if a.handshakes(OUTBOUND, "ok") == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(a.handshakes(OUTBOUND, "ok"), 1);
    let before = a.tunnel.certs()[0].serial.clone();
    fixture.issue(NODE, "node");
    a.tunnel.reload_credentials();
    assert_ne!(a.tunnel.certs()[0].serial, before);
    // A new flow dials a fresh connection (a second handshake, with the new credentials)
    // while the old one still carries the first flow.
    let fresh = a.connect(backend, SERVICE_ID, cgroups.id("frontend")).await;
    assert_eq!(exchange(fresh, b"fresh").await.unwrap(), b"fresh");
    assert_eq!(a.handshakes(OUTBOUND, "ok"), 2);
    // The flow started before the rotation keeps going.
    assert_eq!(exchange(long, b"after").await.unwrap(), b"before after");
    // A broken file is refused and the rotated credentials stay.
    let rotated = a.tunnel.certs()[0].serial.clone();
    std::fs::write(&fixture.sources.node.key, "not a key").unwrap();
    a.tunnel.reload_credentials();
    assert_eq!(a.tunnel.certs()[0].serial, rotated);
    let sample = a.tunnel.sample();
    assert_eq!((sample.cert_reloads_ok, sample.cert_reloads_failed), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_peer_finishes_its_streams_while_new_flows_reach_its_successor() {
    let fixture = Fixture::new("tunnel-drain", TD, NODE, &[FRONTEND]);
    let cgroups = Cgroups::new("drain");
    let backend = echo_backend().await;
    // The peer's inbound listening socket, which its successor takes over.
    let shared = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    shared.set_nonblocking(true).unwrap();
    let accept_on = |tunnel: &Arc<Tunnel>| {
        let listener = TcpListener::from_std(shared.try_clone().unwrap()).unwrap();
        tokio::spawn(inbound::serve(Arc::clone(tunnel), listener))
    };
    let client = agent(
        &fixture,
        &cgroups,
        shared.local_addr().unwrap().port(),
        backend,
    )
    .await;
    let old = agent(&fixture, &cgroups, 0, backend).await;
    let old_accepting = accept_on(&old.tunnel);
    let frontend = cgroups.id("frontend");
    let mut long = client.connect(backend, SERVICE_ID, frontend).await;
    long.write_all(b"before ").await.unwrap();
    eventually("the old peer relays the long flow", || {
        old.count(INBOUND, "opened") == 1
    })
    .await;

    // The takeover: the old peer stops accepting and drains, the successor accepts.
    old_accepting.abort();
    let _ = old_accepting.await;
    // The tunnel connection and its one stream.
    assert_eq!(old.tunnel.drain(), 2);
    let new = agent(&fixture, &cgroups, 0, backend).await;
    let _new_accepting = accept_on(&new.tunnel);
    for i in 0..20 {
        let fresh = client.connect(backend, SERVICE_ID, frontend).await;
        let payload = format!("fresh {i}");
        assert_eq!(
            exchange(fresh, payload.as_bytes()).await.unwrap(),
            payload.as_bytes(),
            "flow {i} after the GOAWAY"
        );
    }
    // Streams opened before the GOAWAY reached the client may still land on the old peer.
    let (on_old, on_new) = (old.count(INBOUND, "opened"), new.count(INBOUND, "opened"));
    assert!(
        on_new >= 1 && on_old + on_new == 21,
        "old {on_old}, new {on_new}"
    );
    assert_eq!(client.count(OUTBOUND, "refused"), 0);
    // The flow the old peer had goes on to its end, then the old peer is idle.
    assert_eq!(exchange(long, b"after").await.unwrap(), b"before after");
    tokio::time::timeout(Duration::from_secs(5), old.tunnel.drained())
        .await
        .expect("the old peer is idle once its flows ended");
}

/// Moved from the catalog (the pure core tests no runtime room): the catalog says what this
/// node announces, the inbound side's authorization reaches only that.
#[test]
fn the_inbound_tunnel_reaches_only_what_this_node_announces_and_never_its_loopback() {
    use crate::{
        catalog::{Announcement, Registrations},
        config::Config,
        model::identity::SpiffeId,
        model::Backend,
        tunnel::{
            authz::{Authz, Verdict},
            proxy::connect::Target,
        },
    };
    let config = Config::parse(
        r#"
[[services]]
name = "pay"
vip = "10.96.0.30"
port = 80
backends = [{ address = "127.0.0.1:15020" }, { address = "10.0.0.5:8080" }]
"#,
        "t.toml",
    )
    .unwrap();
    let mut services = config.services.clone();
    services[0].mtls = true;
    // A peer announces another port of this host for pay: in the catalog, not hosted here.
    let mut merged = services.clone();
    merged[0].backends.push(Backend {
        address: "10.0.0.5:22".parse().unwrap(),
        weight: 1,
    });
    let strict = std::collections::HashSet::from(["pay"]);
    let local =
        Announcement::local(&services, &Registrations::default()).reachable_by_peers(&strict);
    let hosted = |s: &str, b: SocketAddr| local.contains(&(s.to_owned(), b));
    let authz = Authz::new(
        &crate::tunnel::authz::mtls_services(&merged, &services, &hosted),
        crate::model::policy::Policies::default(),
    );
    let peer: SpiffeId = "spiffe://td/ns/mesh/sa/peer".parse().unwrap();
    let verdict = |backend: &str| {
        authz.check(
            &Target {
                backend: backend.parse().unwrap(),
                service: Some("pay".into()),
            },
            &peer,
        )
    };
    assert_eq!(verdict("127.0.0.1:15020"), Verdict::UnknownTarget);
    assert_eq!(verdict("10.0.0.5:22"), Verdict::UnknownTarget);
    assert!(matches!(verdict("10.0.0.5:8080"), Verdict::Allow(_)));
}

#[test]
fn the_mtls_services_are_the_strict_ones_with_the_backends_this_node_hosts() {
    let config = crate::config::Config::parse(
        "[mtls]\ntrust_domain = 'mesh.test'\nca_bundle = 'ca.pem'\ncert = 'n.pem'\nkey = 'n.key'\n\
         [[services]]\nname = 'payments'\nvip = '10.96.0.20'\nport = 443\nmtls = 'strict'\n\
         backends = [{ address = '10.0.0.5:8443' }]\n\
         [[services]]\nname = 'web'\nvip = '10.96.0.10'\nport = 80\n\
         backends = [{ address = '10.0.0.6:8080' }]\n",
        "mesh.toml",
    )
    .unwrap();
    let services = authz::mtls_services(&config.services, &config.services, &|_, _| true);
    assert_eq!(services.len(), 1, "only the strict one: {services:?}");
    assert_eq!(services[0].backends, ["10.0.0.5:8443".parse().unwrap()]);
    // payments has no active check in this config; without a local definition none.
    assert_eq!(services[0].check, None);
    assert_eq!(
        authz::mtls_services(&config.services, &[], &|_, _| true)[0].check,
        None
    );
    // A backend another node announces is not this node's to dial.
    let elsewhere = authz::mtls_services(&config.services, &config.services, &|_, _| false);
    assert!(elsewhere[0].backends.is_empty());
    let tunnel = TunnelConfig::from(config.mtls.as_ref().unwrap());
    assert_eq!(tunnel.sources.ca_bundle, std::path::PathBuf::from("ca.pem"));
    assert_eq!(tunnel.idle_timeout, Duration::from_secs(60));
}
