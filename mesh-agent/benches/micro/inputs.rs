//! The benches' inputs, made through the agent's public API, each built once per process and
//! only when a bench that the filter selected first asks for it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::OnceLock;

use mesh_agent::balance::Desired;
use mesh_agent::catalog::{Announcement, Registrations, Sources};
use mesh_agent::config::Config;
use mesh_agent::model::Service;
use mesh_agent::reconcile::{self, KernelState, MapOp, MapWriteError, MapWriter};

/// The design's large catalog: 20,000 services with 200,000 backends.
pub const SERVICES: usize = 20_000;
pub const BACKENDS_PER_SERVICE: usize = 10;
/// Members of the gossip mesh of [`mesh`].
pub const MEMBERS: usize = 16;

/// The validated config of [`SERVICES`] TCP services, each on a VIP of its own with
/// [`BACKENDS_PER_SERVICE`] backends of its own (random balancing).
pub fn services() -> &'static [Service] {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    &CONFIG
        .get_or_init(|| {
            Config::parse(&config_text(SERVICES, BACKENDS_PER_SERVICE), "bench.toml")
                .expect("the bench config is valid")
        })
        .services
}

/// One node whose config holds every service and backend.
pub fn one_node() -> &'static Sources {
    static SOURCES: OnceLock<Sources> = OnceLock::new();
    SOURCES.get_or_init(|| Sources {
        node: "n1".to_owned(),
        config: services().to_vec(),
        registered: Registrations::default(),
        peers: Vec::new(),
    })
}

/// A mesh of [`MEMBERS`] nodes with the same service definitions; each announces the
/// backends whose index is its own modulo [`MEMBERS`] (node `n0` is this one).
pub fn mesh() -> &'static Sources {
    static SOURCES: OnceLock<Sources> = OnceLock::new();
    SOURCES.get_or_init(|| mesh_of(MEMBERS))
}

fn mesh_of(members: usize) -> Sources {
    let share = |member: usize| -> Vec<Service> {
        services()
            .iter()
            .map(|s| {
                let mut s = s.clone();
                s.backends = (s.backends.iter().enumerate())
                    .filter(|(i, _)| i % members == member)
                    .map(|(_, b)| *b)
                    .collect();
                s
            })
            .collect()
    };
    Sources {
        node: "n0".to_owned(),
        config: share(0),
        registered: Registrations::default(),
        peers: (1..members)
            .map(|m| {
                let announced = Announcement::local(&share(m), &Registrations::default());
                (format!("n{m}"), std::sync::Arc::new(announced))
            })
            .collect(),
    }
}

/// The desired kernel state of [`one_node`], as the agent computes it.
pub fn desired() -> &'static Desired {
    static DESIRED: OnceLock<Desired> = OnceLock::new();
    DESIRED.get_or_init(|| one_node().catalog().desired())
}

/// The same desired state with one service's backends changed (its first backend replaced).
pub fn desired_one_changed() -> &'static Desired {
    static DESIRED: OnceLock<Desired> = OnceLock::new();
    DESIRED.get_or_init(|| {
        let mut config = services().to_vec();
        let changed = &mut config[SERVICES / 2];
        changed.backends[0].address = "10.250.0.1:8080".parse().expect("address");
        let sources = Sources {
            config,
            ..one_node().clone()
        };
        sources.catalog().desired()
    })
}

/// A kernel that holds [`desired`]: the plan from an empty kernel, applied to a writer that
/// accepts every write (the kernel state records what was written).
pub fn kernel_holding_desired() -> &'static KernelState {
    struct Accept;
    impl MapWriter for Accept {
        fn write(&mut self, _: &MapOp) -> Result<(), MapWriteError> {
            Ok(())
        }
    }
    static KERNEL: OnceLock<KernelState> = OnceLock::new();
    KERNEL.get_or_init(|| {
        let mut kernel = KernelState::default();
        let plan = reconcile::plan(&kernel, desired());
        reconcile::apply(&plan, &mut Accept, &mut kernel).expect("an accepting writer never fails");
        kernel
    })
}

/// The config text of [`services`] with an active health check (threshold 1) on service
/// `svc-{checked}`.
pub fn config_text_checked(checked: usize) -> String {
    config_text_with(SERVICES, BACKENDS_PER_SERVICE, Some(checked))
}

/// Backend `k` of service `i` in the configs of this module.
pub fn backend_of(i: usize, k: usize) -> SocketAddr {
    let j = i * BACKENDS_PER_SERVICE + k;
    SocketAddr::from(([10, (100 + (j >> 16)) as u8, (j >> 8) as u8, j as u8], 8080))
}

/// A config text: `services` services `svc-I` on VIPs 10.96.x.y:80, each with `per` backends
/// 10.100.x.y:8080 of its own.
fn config_text(services: usize, per: usize) -> String {
    config_text_with(services, per, None)
}

fn config_text_with(services: usize, per: usize, checked: Option<usize>) -> String {
    let mut text = String::new();
    for i in 0..services {
        let _ = write!(
            text,
            "[[services]]\nname = \"svc-{i}\"\nvip = \"10.96.{}.{}\"\nport = 80\n",
            i >> 8,
            i & 255
        );
        if checked == Some(i) {
            text.push_str(
                "health = { interval_ms = 1000, timeout_ms = 500, healthy_threshold = 1, \
                 unhealthy_threshold = 1 }\n",
            );
        }
        text.push_str("backends = [");
        for k in 0..per {
            let j = i * per + k;
            let _ = write!(
                text,
                "{{ address = \"10.{}.{}.{}:8080\" }},",
                100 + (j >> 16),
                (j >> 8) & 255,
                j & 255
            );
        }
        text.push_str("]\n");
    }
    text
}
