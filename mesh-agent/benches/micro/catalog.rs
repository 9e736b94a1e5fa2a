//! The catalog merge at 20,000 services: `Sources::catalog()` (merging the members'
//! announcements, resolving conflicts) then `.desired()` (slot tables), as the agent does on
//! every config reload, registration or peer change.

use criterion::{Criterion, SamplingMode};

use crate::inputs;

pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("catalog");
    group.sampling_mode(SamplingMode::Flat);
    group.bench_function("20k services, one node", |b| {
        let one = inputs::one_node();
        b.iter(|| one.catalog().desired());
    });
    group.bench_function("20k services, 16 members", |b| {
        let mesh = inputs::mesh();
        b.iter(|| mesh.catalog().desired());
    });
    group.finish();
}
