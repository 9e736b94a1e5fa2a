//! `reconcile::plan` at 20,000 services / 200,000 backends: the first apply of an agent
//! (empty kernel) and a one-service change against a kernel that holds everything else.

use std::sync::Once;

use criterion::{Criterion, SamplingMode};
use mesh_agent::reconcile::{self, KernelState};

use crate::inputs::{self, BACKENDS_PER_SERVICE, SERVICES};

pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan");
    // Tens of milliseconds an iteration: the same number of iterations in every sample.
    group.sampling_mode(SamplingMode::Flat);
    let empty = KernelState::default();
    group.bench_function("20k services, empty kernel", |b| {
        let desired = inputs::desired();
        b.iter(|| reconcile::plan(&empty, desired));
    });
    group.bench_function("20k services, one changed", |b| {
        let (kernel, changed) = (
            inputs::kernel_holding_desired(),
            inputs::desired_one_changed(),
        );
        describe(kernel, changed);
        b.iter(|| reconcile::plan(kernel, changed));
    });
    group.finish();
}

/// The size of the work, once.
fn describe(kernel: &KernelState, changed: &mesh_agent::balance::Desired) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let ops = |kernel: &KernelState, desired| {
            let plan = reconcile::plan(kernel, desired);
            plan.groups.iter().map(|g| g.ops.len()).sum::<usize>()
        };
        eprintln!(
            "plan: {SERVICES} services, {} backends: {} map ops from an empty kernel, {} for one \
             changed service",
            SERVICES * BACKENDS_PER_SERVICE,
            ops(&KernelState::default(), inputs::desired()),
            ops(kernel, changed),
        );
    });
}
