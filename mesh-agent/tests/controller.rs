//! The controller driven in process: config files, registrations, gossip members, probe
//! results and health ticks, against the in-memory kernel. Needs neither root nor the eBPF
//! toolchain (`cargo test -p mesh-agent --no-default-features --test controller`).
//!
//! Each test asserts on what a connect would reach: the in-memory kernel resolves a
//! service's frontend the way the programs do (header → slots → backends).

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use mesh_agent::{
    app::controller::{Controller, Parts},
    catalog::{Announcement, Endpoint, ServiceDef},
    config::Config,
    gossip::{record::NodeRecord, Member},
    health::{
        checker::{Checker, ProbeReport, Target},
        probe::{ProbeError, Prober},
    },
    model::{Affinity, LbPolicy, Protocol},
    reconcile::{addr::service_key, kernel::MemoryKernel},
};
use mesh_common::{
    health::ConnectOutcomes,
    service::{PROTO_TCP, SERVICE_FLAG_VIP_MARKER},
};
use tokio::sync::mpsc;

/// A prober whose probes never finish: the tests deliver probe results themselves.
struct NeverAnswers;

#[async_trait::async_trait]
impl Prober for NeverAnswers {
    async fn probe(&self, _: &Target) -> Result<(), ProbeError> {
        std::future::pending().await
    }
}

/// A node: its config file and state directory in a scratch directory, its kernel in memory.
struct Node {
    dir: tempdir::Dir,
    kernel: MemoryKernel,
    // Kept so the checker's channel stays open.
    _reports: mpsc::Receiver<ProbeReport>,
}

mod tempdir {
    //! A scratch directory removed on drop.
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(test: &str) -> Dir {
            let path =
                std::env::temp_dir().join(format!("mesh-controller-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Node {
    fn new(test: &str, config: &str) -> Node {
        let dir = tempdir::Dir::new(test);
        let node = Node {
            dir,
            kernel: MemoryKernel::default(),
            _reports: mpsc::channel(1).1,
        };
        node.write_config(config);
        node
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("mesh.toml")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Replaces the config file the way a deploy does: written aside, renamed into place.
    fn write_config(&self, text: &str) {
        let aside = self.dir.path().join(".mesh.toml.new");
        std::fs::write(&aside, text).unwrap();
        std::fs::rename(&aside, self.config_path()).unwrap();
    }

    /// Starts a controller on this node's kernel and state (again, for a restart).
    fn start(&mut self) -> Controller {
        let config = Config::load(&self.config_path()).unwrap();
        let (tx, rx) = mpsc::channel(16);
        self._reports = rx;
        Controller::start(Parts {
            node: "n1".to_owned(),
            config_path: self.config_path(),
            config,
            cgroup: PathBuf::from("/sys/fs/cgroup/test"),
            maps: Box::new(self.kernel.clone()),
            adopted: false,
            state_dir: self.state_dir(),
            checker: Checker::new(tx, Arc::new(NeverAnswers)),
            tunnel: None,
        })
        .unwrap()
    }

    /// The backends a TCP connect to `frontend` can reach now, sorted; `None`: no service.
    fn reach(&self, frontend: &str) -> Option<Vec<SocketAddr>> {
        let frontend: SocketAddr = frontend.parse().unwrap();
        let key = service_key(frontend.ip(), frontend.port(), PROTO_TCP);
        let mut backends = self.kernel.maps().state.resolve(&key)?.unwrap();
        backends.sort();
        backends.dedup();
        Some(backends)
    }
}

fn addrs(list: &[&str]) -> Option<Vec<SocketAddr>> {
    let mut v: Vec<SocketAddr> = list.iter().map(|a| a.parse().unwrap()).collect();
    v.sort();
    Some(v)
}

const WEB: &str = r#"
[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
backends = [{ address = "10.0.0.1:8080" }, { address = "10.0.0.2:8080" }]
"#;

const WEB_AND_API: &str = r#"
[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
backends = [{ address = "10.0.0.1:8080" }, { address = "10.0.0.2:8080" }, { address = "10.0.0.3:8080" }]

[[services]]
name = "api"
vip = "10.96.0.11"
port = 443
backends = [{ address = "10.0.1.1:8443" }]
"#;

#[tokio::test]
async fn a_config_change_reaches_the_kernel_and_a_bad_one_keeps_the_last_good_state() {
    let mut node = Node::new("config", WEB);
    let mut controller = node.start();
    assert_eq!(
        node.reach("10.96.0.10:80"),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080"])
    );

    node.write_config(WEB_AND_API);
    controller.reload();
    assert_eq!(
        node.reach("10.96.0.10:80"),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"])
    );
    assert_eq!(node.reach("10.96.0.11:443"), addrs(&["10.0.1.1:8443"]));

    // A half-written file (the last service cut short) is refused with its cause; nothing of it
    // is applied.
    let cut = &WEB_AND_API[..WEB_AND_API.len() - 40];
    node.write_config(&format!(
        "{cut}\n[[services]]\nname = \"db\"\nport = 5432\n"
    ));
    let writes = node.kernel.maps().attempts;
    controller.reload();
    assert_eq!(
        node.kernel.maps().attempts,
        writes,
        "a refused config writes nothing"
    );
    let status = controller.view().status().unwrap();
    let error = status.config_error.expect("the refusal is reported");
    assert!(error.contains("mesh.toml"), "{error}");
    assert_eq!(node.reach("10.96.0.11:443"), addrs(&["10.0.1.1:8443"]));
    assert_eq!(node.reach("10.96.0.10:80").unwrap().len(), 3);
    let snapshot = controller.view().snapshot();
    assert_eq!(
        (snapshot.reloads_applied, snapshot.reloads_rejected),
        (1, 1)
    );

    // Removing a service takes it out of the kernel.
    node.write_config(WEB);
    controller.reload();
    assert_eq!(node.reach("10.96.0.11:443"), None);
    assert!(controller.view().status().unwrap().config_error.is_none());
}

#[tokio::test]
async fn a_failed_map_write_rejects_the_change_and_the_kernel_keeps_serving_the_previous_one() {
    let mut node = Node::new("mapfull", WEB);
    let mut controller = node.start();
    let before = node.kernel.maps().state.clone();

    // The maps refuse every write from now on (a full map).
    let attempts = node.kernel.maps().attempts;
    node.kernel.maps().fail_from = Some(attempts);
    node.write_config(WEB_AND_API);
    controller.reload();
    let error = controller
        .view()
        .status()
        .unwrap()
        .config_error
        .expect("reported");
    assert!(error.contains("injected failure"), "{error}");
    assert_eq!(
        node.kernel.maps().state,
        before,
        "all or nothing per service"
    );
    assert_eq!(
        node.reach("10.96.0.10:80"),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080"])
    );

    // Once the maps take writes again, the next reload applies the file.
    node.kernel.maps().fail_from = None;
    controller.reload();
    assert_eq!(node.reach("10.96.0.11:443"), addrs(&["10.0.1.1:8443"]));
}

#[tokio::test]
async fn registrations_apply_survive_a_restart_without_a_write_and_hostile_ones_are_refused() {
    let mut node = Node::new("register", WEB);
    let mut controller = node.start();
    let endpoint = |address: &str| Endpoint {
        service: "web".into(),
        address: address.parse().unwrap(),
        weight: 1,
    };
    assert_eq!(controller.register(endpoint("10.0.0.9:8080")), Ok(true));
    assert_eq!(controller.register(endpoint("10.0.0.9:8080")), Ok(false));
    assert_eq!(
        node.reach("10.96.0.10:80"),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.9:8080"])
    );
    assert!(controller
        .announcement()
        .endpoints
        .iter()
        .any(|e| e.address == "10.0.0.9:8080".parse().unwrap()));

    // A registration that would make peers dial their own loopback, or of a service nobody
    // defined, changes nothing.
    let writes = node.kernel.maps().attempts;
    let loopback = controller.register(endpoint("127.0.0.1:22")).unwrap_err();
    assert!(loopback.contains("loopback"), "{loopback}");
    let unknown = controller
        .register(Endpoint {
            service: "nobody".into(),
            ..endpoint("10.0.0.9:8080")
        })
        .unwrap_err();
    assert!(unknown.contains("not in the catalog"), "{unknown}");
    assert_eq!(node.kernel.maps().attempts, writes);

    // A restarted controller starts from the state directory and the kernel: its first apply
    // has nothing to write.
    drop(controller);
    let writes = node.kernel.maps().attempts;
    let mut controller = node.start();
    assert_eq!(
        node.kernel.maps().attempts,
        writes,
        "restart rewrote the maps"
    );
    assert_eq!(node.reach("10.96.0.10:80").unwrap().len(), 3);

    assert_eq!(
        controller.deregister("web", "10.0.0.9:8080".parse().unwrap()),
        Ok(true)
    );
    assert_eq!(
        node.reach("10.96.0.10:80"),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080"])
    );
}

const GOSSIP: &str = r#"
[gossip]
listen = "10.1.0.1:15010"
key_file = "/nonexistent/mesh.key"

[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
backends = [{ address = "10.0.0.1:8080" }]
"#;

fn peer(name: &str, alive: bool, endpoints: &[&str]) -> Member {
    Member {
        name: name.to_owned(),
        address: "10.1.0.2:15010".parse().unwrap(),
        alive,
        generation: 1,
        node: NodeRecord::default(),
        announcement: Announcement {
            services: Default::default(),
            endpoints: endpoints
                .iter()
                .map(|a| Endpoint {
                    service: "web".into(),
                    address: a.parse().unwrap(),
                    weight: 1,
                })
                .collect(),
        },
        errors: Vec::new(),
        complete: true,
    }
}

#[tokio::test]
async fn a_peer_s_endpoints_join_with_its_announcement_and_leave_when_it_withdraws_them() {
    let mut node = Node::new("members", GOSSIP);
    let mut controller = node.start();
    assert_eq!(node.reach("10.96.0.10:80"), addrs(&["10.0.0.1:8080"]));

    controller.set_members(Arc::new(vec![peer("n2", true, &["10.0.2.1:8080"])]));
    assert_eq!(
        node.reach("10.96.0.10:80"),
        addrs(&["10.0.0.1:8080", "10.0.2.1:8080"])
    );
    let nodes = controller.view().nodes();
    assert!(nodes.iter().any(|n| n.name == "n2" && n.state == "alive"));

    // Still alive, with the endpoint withdrawn.
    controller.set_members(Arc::new(vec![peer("n2", true, &[])]));
    assert_eq!(node.reach("10.96.0.10:80"), addrs(&["10.0.0.1:8080"]));
}

const CHECKED: &str = r#"
[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
health = { interval_ms = 1000, timeout_ms = 500, healthy_threshold = 1, unhealthy_threshold = 1 }
outlier = { consecutive_failures = 3, base_ejection_ms = 60000, max_ejection_ms = 60000 }
backends = [{ address = "10.0.0.1:8080" }, { address = "10.0.0.2:8080" }, { address = "10.0.0.3:8080" }]
"#;

/// The health `mesh-agent endpoints` shows for a backend of `web`.
fn health_of(controller: &Controller, backend: &str) -> Option<String> {
    controller
        .view()
        .endpoints()
        .into_iter()
        .find(|e| e.service == "web" && e.address == backend)
        .and_then(|e| e.health)
}

fn report(backend: &str, result: Result<(), ProbeError>) -> ProbeReport {
    ProbeReport {
        service: "web".to_owned(),
        backend: backend.parse().unwrap(),
        result,
    }
}

#[tokio::test]
async fn a_failed_probe_takes_a_backend_out_and_a_passing_one_brings_it_back() {
    let mut node = Node::new("probes", CHECKED);
    let mut controller = node.start();
    let timeout = || ProbeError::Timeout {
        timeout: std::time::Duration::from_millis(500),
    };
    controller.on_probe(report("10.0.0.2:8080", Err(timeout())));
    assert_eq!(
        node.reach("10.96.0.10:80"),
        addrs(&["10.0.0.1:8080", "10.0.0.3:8080"])
    );
    assert_eq!(
        health_of(&controller, "10.0.0.2:8080").as_deref(),
        Some("unhealthy")
    );

    controller.on_probe(report("10.0.0.2:8080", Ok(())));
    assert_eq!(node.reach("10.96.0.10:80").unwrap().len(), 3);

    // Every backend failing: panic, all of them are used rather than none.
    for b in ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"] {
        controller.on_probe(report(b, Err(timeout())));
    }
    assert_eq!(node.reach("10.96.0.10:80").unwrap().len(), 3);
    assert!(controller.view().status().unwrap().services[0].panic);
}

#[tokio::test]
async fn failed_connects_counted_by_the_kernel_eject_a_backend_on_the_health_tick() {
    let mut node = Node::new("outlier", CHECKED);
    let mut controller = node.start();
    let backend: SocketAddr = "10.0.0.3:8080".parse().unwrap();
    let outcomes = |established, failed| ConnectOutcomes {
        established,
        failed,
        syn_timeouts: 0,
    };
    node.kernel.maps().outcomes.insert(backend, outcomes(10, 0));
    controller.tick();
    assert_eq!(node.reach("10.96.0.10:80").unwrap().len(), 3);

    node.kernel.maps().outcomes.insert(backend, outcomes(10, 3));
    controller.tick();
    assert_eq!(
        node.reach("10.96.0.10:80"),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080"])
    );
    assert_eq!(
        health_of(&controller, "10.0.0.3:8080").as_deref(),
        Some("ejected")
    );
}

/// The admin API and the metrics read the view the controller last published: while an event
/// holds the controller (a large reload), a reader is answered at once with the state before
/// it, never half of it; once the event is over, with the state after it.
#[tokio::test]
async fn readers_get_the_published_view_while_an_event_holds_the_controller() {
    use mesh_agent::{admin::AgentView, app::views::SharedAgent};
    use std::sync::Barrier;

    let mut node = Node::new("views", WEB);
    let agent = Arc::new(SharedAgent::new(
        node.start(),
        Arc::default(),
        mpsc::unbounded_channel().0,
        mpsc::channel(1).0,
    ));
    node.write_config(WEB_AND_API);
    let (inside, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let event = {
        let (agent, inside, release) = (agent.clone(), inside.clone(), release.clone());
        std::thread::spawn(move || {
            agent.update(|controller| {
                controller.reload();
                inside.wait();
                // Still inside the event: the reload is done but not published.
                release.wait();
            })
        })
    };
    inside.wait();
    let services = |agent: &SharedAgent| {
        let mut names: Vec<String> = agent
            .status()
            .unwrap()
            .services
            .into_iter()
            .map(|s| s.name)
            .collect();
        names.sort();
        names
    };
    assert_eq!(services(&agent), ["web"], "the view from before the event");
    assert_eq!(agent.endpoints().unwrap().len(), 2);
    release.wait();
    event.join().unwrap();
    assert_eq!(
        services(&agent),
        ["api", "web"],
        "published after the event"
    );
    assert_eq!(agent.endpoints().unwrap().len(), 4);
}

/// A backend keeps its kernel id, and with it its connection count, across a reload that
/// changes its service (another backend added, a weight changed): `endpoints`' CONNECTIONS do
/// not reset on reload.
#[tokio::test]
async fn a_backend_keeps_its_kernel_id_and_count_across_a_reload_that_changes_its_service() {
    use mesh_agent::reconcile::addr::decode_backend;
    let mut node = Node::new("ids", WEB);
    let mut controller = node.start();
    let ids = |node: &Node| -> std::collections::BTreeMap<SocketAddr, u32> {
        let maps = node.kernel.maps();
        maps.state
            .backends
            .iter()
            .map(|(&id, b)| (decode_backend(b).unwrap(), id))
            .collect()
    };
    let before = ids(&node);
    assert_eq!(before.len(), 2);
    let first: SocketAddr = "10.0.0.1:8080".parse().unwrap();
    node.kernel.maps().backend_counts.insert(before[&first], 7);

    node.write_config(&WEB_AND_API.replace(
        "{ address = \"10.0.0.2:8080\" }",
        "{ address = \"10.0.0.2:8080\", weight = 3 }",
    ));
    controller.reload();
    let after = ids(&node);
    for (addr, id) in &before {
        assert_eq!(
            after.get(addr),
            Some(id),
            "{addr} was renumbered: {after:?}"
        );
    }
    let shown = controller
        .view()
        .endpoints()
        .into_iter()
        .find(|e| e.address == first.to_string())
        .map(|e| e.connections);
    assert_eq!(shown, Some(7), "the count survives the reload");
}

/// Every kernel service id → its name, as the flows and the tunnel's access log name them.
fn names(controller: &Controller) -> Vec<(u32, String)> {
    let mut names: Vec<(u32, String)> = (controller.names().current().iter())
        .map(|(id, name)| (*id, name.clone()))
        .collect();
    names.sort();
    names
}

/// The id the kernel gives the service at `frontend` (`VIP:port`, TCP).
fn id_of(controller: &Controller, frontend: &str) -> u32 {
    let frontend: SocketAddr = frontend.parse().unwrap();
    let key = service_key(frontend.ip(), frontend.port(), PROTO_TCP);
    controller.kernel().services[&key].id
}

#[tokio::test]
async fn flows_name_the_services_the_kernel_holds_through_adds_renames_failures_and_restarts() {
    let mut node = Node::new("names", WEB);
    let mut controller = node.start();
    let web = id_of(&controller, "10.96.0.10:80");
    assert_eq!(names(&controller), vec![(web, "web".to_owned())]);

    node.write_config(WEB_AND_API);
    controller.reload();
    let api = id_of(&controller, "10.96.0.11:443");
    let mut both = vec![(web, "web".to_owned()), (api, "api".to_owned())];
    both.sort();
    assert_eq!(names(&controller), both);

    // A health-like change (a backend's weight) rewrites one header and keeps the names.
    node.write_config(&WEB_AND_API.replace(
        "{ address = \"10.0.0.3:8080\" }",
        "{ address = \"10.0.0.3:8080\", weight = 0 }",
    ));
    controller.reload();
    assert_eq!(names(&controller), both);

    // The same frontend under another name: same id, the new name.
    node.write_config(&WEB_AND_API.replace("name = \"api\"", "name = \"api-v2\""));
    controller.reload();
    assert_eq!(id_of(&controller, "10.96.0.11:443"), api);
    let mut renamed = vec![(web, "web".to_owned()), (api, "api-v2".to_owned())];
    renamed.sort();
    assert_eq!(names(&controller), renamed);

    // A removal the maps refuse leaves the service in the kernel, named.
    let attempts = node.kernel.maps().attempts;
    node.kernel.maps().fail_from = Some(attempts);
    node.write_config(WEB);
    controller.reload();
    assert_eq!(names(&controller), renamed);
    node.kernel.maps().fail_from = None;
    controller.reload();
    assert_eq!(names(&controller), vec![(web, "web".to_owned())]);

    // A restart on the same maps writes nothing and still names every service.
    node.write_config(WEB_AND_API);
    controller.reload();
    drop(controller);
    let restarted = node.start();
    let api = id_of(&restarted, "10.96.0.11:443");
    let mut both = vec![(web, "web".to_owned()), (api, "api".to_owned())];
    both.sort();
    assert_eq!(names(&restarted), both);
}

/// A small deterministic random source (xorshift), so a failure replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// One service of [`Mesh`]'s config: (name, VIP, port, protocol, lb, backends with weight).
#[derive(Clone)]
struct Spec {
    name: &'static str,
    vip: &'static str,
    port: u16,
    udp: bool,
    lb: &'static str,
    /// Extra TOML keys (health and outlier settings).
    extra: String,
    backends: Vec<(String, u32)>,
}

/// The inputs both pipelines are given: the config's services, the gossip members.
struct Mesh {
    config: Vec<Spec>,
    /// Whether the optional service is in the config.
    extra_service: bool,
    members: Vec<Member>,
}

const BACKENDS: [&str; 8] = [
    "10.0.0.1:8080",
    "10.0.0.2:8080",
    "10.0.0.3:8080",
    "10.0.1.1:53",
    "10.0.1.2:53",
    "10.0.2.1:80",
    "[fd00::1]:80",
    "[fd00::2]:80",
];
const NAMES: [&str; 6] = ["web", "api", "dns", "pay", "six", "ghost"];
const CHECK: &str = "health = { interval_ms = 1000, timeout_ms = 500, healthy_threshold = 1, \
                     unhealthy_threshold = 1 }\noutlier = { consecutive_failures = 2, \
                     base_ejection_ms = 600000, max_ejection_ms = 600000 }";

impl Mesh {
    fn new() -> Mesh {
        let spec = |name, vip, port, udp, lb, backends: &[&str]| Spec {
            name,
            vip,
            port,
            udp,
            lb,
            extra: String::new(),
            backends: backends.iter().map(|b| (b.to_string(), 1)).collect(),
        };
        let mut pay = spec("pay", "10.96.0.20", 8080, false, "random", &BACKENDS[..3]);
        pay.extra = CHECK.to_owned();
        Mesh {
            config: vec![
                spec("web", "10.96.0.10", 80, false, "maglev", &BACKENDS[..2]),
                spec("api", "10.96.0.10", 443, false, "weighted", &BACKENDS[1..3]),
                spec("dns", "10.96.0.53", 53, true, "random", &BACKENDS[3..5]),
                pay,
                spec("six", "fd00::10", 80, false, "random", &BACKENDS[6..7]),
            ],
            extra_service: false,
            members: Vec::new(),
        }
    }

    fn toml(&self) -> String {
        let mut out = String::new();
        let extra = self.extra_service.then(|| Spec {
            name: "extra",
            vip: "10.96.0.10",
            port: 8443,
            udp: false,
            lb: "random",
            extra: String::new(),
            backends: vec![("10.0.2.1:80".into(), 1)],
        });
        for s in self.config.iter().chain(&extra) {
            let backends: Vec<String> = (s.backends.iter())
                .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
                .collect();
            out += &format!(
                "[[services]]\nname = \"{}\"\nvip = \"{}\"\nport = {}\nprotocol = \"{}\"\nlb = \"{}\"\n{}\nbackends = [{}]\n\n",
                s.name,
                s.vip,
                s.port,
                if s.udp { "udp" } else { "tcp" },
                s.lb,
                s.extra,
                backends.join(", ")
            );
        }
        out
    }

    /// Changes one thing of the config: a backend in or out, a weight, a service's `lb` (a
    /// definition), its health settings, the optional service in or out.
    fn change_config(&mut self, rng: &mut Rng) {
        let at = rng.below(self.config.len());
        let s = &mut self.config[at];
        match rng.below(6) {
            0 | 1 => {
                let backend = rng.pick(&BACKENDS).to_string();
                match s.backends.iter().position(|(a, _)| *a == backend) {
                    Some(i) if s.backends.len() > 1 => {
                        s.backends.remove(i);
                    }
                    Some(_) => {}
                    None if backend.starts_with('[') == s.vip.contains(':') => {
                        s.backends.push((backend, 1));
                    }
                    None => {}
                }
            }
            2 => {
                let i = rng.below(s.backends.len());
                s.backends[i].1 = rng.below(4) as u32;
            }
            3 => s.lb = *rng.pick(&["random", "weighted", "maglev"]),
            4 => {
                s.extra = match s.extra.is_empty() {
                    true => CHECK.to_owned(),
                    false => String::new(),
                }
            }
            _ => self.extra_service = !self.extra_service,
        }
    }

    /// Changes one thing of the members: a peer joins, leaves, or changes its endpoints or
    /// definitions (one that differs from the config's, one that claims another's frontend).
    fn change_members(&mut self, rng: &mut Rng) {
        let name = *rng.pick(&["n0", "n2"]);
        let Some(at) = self.members.iter().position(|m| m.name == name) else {
            let mut member = peer(name, true, &[]);
            member.announcement.endpoints.clear();
            self.members.push(member);
            return;
        };
        let announcement = &mut self.members[at].announcement;
        match rng.below(8) {
            0 => {
                self.members.remove(at);
            }
            1 => {
                let web = ServiceDef {
                    vip: "10.96.0.10".parse().unwrap(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    lb: LbPolicy::Random,
                    affinity: Affinity::None,
                    affinity_timeout_s: 0,
                    mtls: false,
                };
                let (name, def) = match rng.below(3) {
                    0 => ("web", web),
                    1 => ("alt", web),
                    _ => ("api", ServiceDef { port: 443, ..web }),
                };
                if announcement.services.remove(name).is_none() {
                    announcement.services.insert(name.to_owned(), def);
                }
            }
            _ => {
                let service = rng.pick(&NAMES).to_string();
                let address: SocketAddr = rng.pick(&BACKENDS).parse().unwrap();
                let endpoints = &mut announcement.endpoints;
                match (endpoints.iter())
                    .position(|e| *e.service == *service && e.address == address)
                {
                    Some(i) if rng.below(2) == 0 => endpoints[i].weight = rng.below(3) as u32,
                    Some(i) => {
                        endpoints.remove(i);
                    }
                    None => endpoints.push(Endpoint {
                        service: service.into(),
                        address,
                        weight: 1,
                    }),
                }
            }
        }
        self.members.sort_by(|a, b| a.name.cmp(&b.name));
    }
}

/// What a node's controller shows and its kernel holds, for comparing two of them: every
/// frontend the kernel serves, the name flows give it and what a connect to it reaches (in
/// slot order), the VIP markers, and the reports (services, conflicts, degraded reasons, endpoints; the ejections'
/// end times, which depend on when each ran, left out).
fn observed(node: &Node, controller: &Controller) -> serde_json::Value {
    let state = node.kernel.maps().state.clone();
    let names = controller.names().current();
    let kernel: Vec<String> = (state.services.iter())
        .map(
            |(key, service)| match service.flags & SERVICE_FLAG_VIP_MARKER {
                0 => format!(
                    "{key:?} {:?} -> {:?}",
                    names.get(&service.id),
                    state.resolve(key)
                ),
                _ => format!("{key:?} marker"),
            },
        )
        .collect();
    let view = controller.view();
    let status = view.status().unwrap();
    let mut endpoints = serde_json::to_value(view.endpoints()).unwrap();
    for endpoint in endpoints.as_array_mut().unwrap() {
        endpoint.as_object_mut().unwrap().remove("ejected_until");
    }
    serde_json::json!({
        "kernel": kernel,
        "services": status.services,
        "conflicts": status.conflicts,
        "degraded": status.degraded,
        "config_error": (status.config_error)
            .map(|e| without_ids(&e.replace(node.config_path().to_str().unwrap(), "mesh.toml"))),
        "endpoints": endpoints,
    })
}

/// `text` with the map ids it names (`backend 12`, `slot 5/0/0`) left out: the two pipelines
/// give new entries different ids.
fn without_ids(text: &str) -> String {
    (text.split(' ').collect::<Vec<_>>().windows(2))
        .map(|w| match w[0] {
            "backend" | "slot" | "service" if w[1].starts_with(|c: char| c.is_ascii_digit()) => "#",
            _ => w[1],
        })
        .fold(
            text.split(' ').next().unwrap_or("").to_owned(),
            |out, word| out + " " + word,
        )
}

/// The incremental pipeline held to the whole one: two nodes given the same config and the
/// same 600 random events — registrations (some refused), config reloads that move a backend,
/// change a weight, an `lb`, health settings or add a service, peers that join, leave, change
/// endpoints or define services in conflict, probe results, failed connects, and events while
/// the maps refuse every write — show the same kernel and the same reports after each one.
#[tokio::test]
async fn the_incremental_pipeline_reaches_what_the_whole_pipeline_does_after_every_event() {
    let mut mesh = Mesh::new();
    let mut incremental = Node::new("incremental", &mesh.toml());
    let mut whole = Node::new("whole", &mesh.toml());
    let mut a = incremental.start();
    let mut b = whole.start();
    b.set_incremental(false);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for step in 0..600 {
        let refuse_writes = rng.below(20) == 0;
        if refuse_writes {
            for node in [&incremental, &whole] {
                let attempts = node.kernel.maps().attempts;
                node.kernel.maps().fail_from = Some(attempts);
            }
        }
        let event = rng.below(8);
        match event {
            0 | 1 => {
                let endpoint = Endpoint {
                    service: (*rng.pick(&NAMES)).into(),
                    address: rng.pick(&BACKENDS).parse().unwrap(),
                    weight: rng.below(3) as u32,
                };
                let (x, y) = (a.register(endpoint.clone()), b.register(endpoint));
                assert_eq!(x, y, "step {step}: register");
            }
            2 => {
                let service = rng.pick(&NAMES).to_string();
                let address: SocketAddr = rng.pick(&BACKENDS).parse().unwrap();
                let (x, y) = (
                    a.deregister(&service, address),
                    b.deregister(&service, address),
                );
                assert_eq!(x, y, "step {step}: deregister");
            }
            3 => {
                mesh.change_config(&mut rng);
                incremental.write_config(&mesh.toml());
                whole.write_config(&mesh.toml());
                a.reload();
                b.reload();
            }
            4 | 5 => {
                mesh.change_members(&mut rng);
                let members = Arc::new(mesh.members.clone());
                a.set_members(Arc::clone(&members));
                b.set_members(members);
            }
            6 => {
                let backend: SocketAddr = rng.pick(&BACKENDS[..3]).parse().unwrap();
                let passed = rng.below(2) == 0;
                for controller in [&mut a, &mut b] {
                    controller.on_probe(ProbeReport {
                        service: "pay".to_owned(),
                        backend,
                        result: match passed {
                            true => Ok(()),
                            false => Err(ProbeError::Timeout {
                                timeout: std::time::Duration::from_millis(500),
                            }),
                        },
                    });
                }
            }
            _ => {
                let backend: SocketAddr = rng.pick(&BACKENDS).parse().unwrap();
                let failed = rng.below(4) as u64;
                for node in [&incremental, &whole] {
                    let mut maps = node.kernel.maps();
                    let counts = maps.outcomes.entry(backend).or_default();
                    counts.established += 1;
                    counts.failed += failed;
                }
                a.tick();
                b.tick();
            }
        }
        if refuse_writes {
            for node in [&incremental, &whole] {
                node.kernel.maps().fail_from = None;
            }
        }
        assert_eq!(
            observed(&incremental, &a),
            observed(&whole, &b),
            "step {step}: event {event}, writes refused: {refuse_writes}"
        );
    }
}
