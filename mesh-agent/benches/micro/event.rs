//! One controller event at 20,000 services / 200,000 backends, end to end against the
//! in-memory kernel: what the agent does between learning of one change and the kernel holding
//! it (merge, health, plan, map writes, the names and views it publishes). The changes: a
//! registration and its withdrawal, and a health check taking a backend out and back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use criterion::{Criterion, SamplingMode};
use mesh_agent::app::controller::{Controller, Parts};
use mesh_agent::catalog::Endpoint;
use mesh_agent::config::Config;
use mesh_agent::health::checker::{Checker, ProbeReport, Target};
use mesh_agent::health::probe::{ProbeError, Prober};
use mesh_agent::reconcile::kernel::MemoryKernel;
use tokio::sync::mpsc;

use crate::inputs::{self, SERVICES};

/// A prober whose probes never finish: the bench delivers the results itself.
struct NeverAnswers;

#[async_trait::async_trait]
impl Prober for NeverAnswers {
    async fn probe(&self, _: &Target) -> Result<(), ProbeError> {
        std::future::pending().await
    }
}

/// The checked service (the config's health check is on it) and its first backend.
const CHECKED: usize = SERVICES / 2;

pub fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the checker");
    let _entered = runtime.enter();
    let dir = std::env::temp_dir().join(format!("mesh-bench-event-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let config_path = dir.join("mesh.toml");
    std::fs::write(&config_path, inputs::config_text_checked(CHECKED)).expect("the config");
    let (reports, _receiver) = mpsc::channel(16);
    let mut controller = Controller::start(Parts {
        node: "n1".to_owned(),
        config: Config::load(&config_path).expect("the bench config is valid"),
        config_path,
        cgroup: PathBuf::from("/sys/fs/cgroup/bench"),
        maps: Box::new(MemoryKernel::default()),
        adopted: false,
        state_dir: dir.join("state"),
        checker: Checker::new(reports, Arc::new(NeverAnswers)),
        tunnel: None,
    })
    .expect("the controller starts");

    let service = format!("svc-{CHECKED}");
    let backend = inputs::backend_of(CHECKED, 0);
    let registered: SocketAddr = "10.250.0.1:8080".parse().expect("address");
    let mut group = c.benchmark_group("event");
    group.sampling_mode(SamplingMode::Flat);
    group.bench_function("20k services, register then deregister", |b| {
        b.iter(|| {
            let endpoint = Endpoint {
                service: service.as_str().into(),
                address: registered,
                weight: 1,
            };
            assert_eq!(controller.register(endpoint), Ok(true));
            assert_eq!(controller.deregister(&service, registered), Ok(true));
        });
    });
    group.bench_function("20k services, probe fails then passes", |b| {
        let report = |result| ProbeReport {
            service: service.clone(),
            backend,
            result,
        };
        b.iter(|| {
            let timeout = std::time::Duration::from_millis(500);
            controller.on_probe(report(Err(ProbeError::Timeout { timeout })));
            controller.on_probe(report(Ok(())));
        });
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}
