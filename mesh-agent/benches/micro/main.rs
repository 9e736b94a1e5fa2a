//! Microbenchmarks of the agent's pure code (criterion; `cargo xtask bench micro [FILTER]`,
//! which runs `cargo bench -p mesh-agent --no-default-features`: no eBPF toolchain needed):
//!
//! | module | measures |
//! | --- | --- |
//! | [`plan`] | `reconcile::plan` for 20,000 services / 200,000 backends: into an empty kernel, and into a kernel that holds it but for one changed service |
//! | [`catalog`] | `Sources::catalog()` then `.desired()` at 20,000 services: one node's config, and 16 members announcing the same services with the endpoints spread over them |
//! | [`event`] | one controller event (a registration and its withdrawal, a probe taking a backend out and back) at 20,000 services, end to end against the in-memory kernel |
//! | [`maglev`] | `maglev::build` of a 1,000-backend table, equal and mixed weights |
//!
//! Inputs are built once per process through the crate's public API ([`inputs`]): a config
//! text parsed and validated as the agent does, the catalog and desired state from it, and a
//! kernel state made by applying a plan to an in-memory writer. Each bench measures briefly
//! (1 s warm-up, 10 samples over about 3 s; the large ones one iteration per sample), so the
//! whole suite runs in well under two minutes; pass criterion's options after the filter for
//! longer runs (`cargo xtask bench micro plan --measurement-time 20`).

mod catalog;
mod event;
mod inputs;
mod maglev;
mod plan;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};

/// Short runs: these are for seeing the order of magnitude and large regressions.
fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
}

criterion_group! {
    name = micro;
    config = quick();
    targets = plan::bench, catalog::bench, event::bench, maglev::bench
}
criterion_main!(micro);
