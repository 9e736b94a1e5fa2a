//! Building one service's Maglev table for 1,000 backends (10,000+ entries: table size 16381),
//! with equal weights and with weights 1 to 10.

use criterion::Criterion;
use mesh_agent::balance::maglev::{self, MaglevBackend};

const BACKENDS: usize = 1_000;

pub fn bench(c: &mut Criterion) {
    let names: Vec<String> = (0..BACKENDS)
        .map(|i| format!("10.1.{}.{}:8080", i >> 8, i & 255))
        .collect();
    let backends = |weight: &dyn Fn(usize) -> u32| -> Vec<MaglevBackend<'_>> {
        (names.iter().enumerate())
            .map(|(i, name)| MaglevBackend {
                name,
                weight: weight(i),
            })
            .collect()
    };
    let equal = backends(&|_| 1);
    let mixed = backends(&|i| 1 + (i % 10) as u32);
    let mut group = c.benchmark_group("maglev");
    group.bench_function("1000 backends, equal weights", |b| {
        b.iter(|| maglev::build(&equal));
    });
    group.bench_function("1000 backends, weights 1-10", |b| {
        b.iter(|| maglev::build(&mixed));
    });
    group.finish();
}
