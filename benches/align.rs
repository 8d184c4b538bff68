//! Weight matching on random weights of ready architectures (ResNet-20 x {1, 4, 16},
//! VGG-16), to convergence (seed 0), in f32; ResNet-20 x4 also in f64.
//!
//! `cargo bench --bench align` (all), `cargo bench --bench align -- resnet20x1` (one).
//! The numpy + scipy comparison is `benches/compare/align_compare.py`.

use criterion::{Criterion, criterion_group, criterion_main};
use modelfusion::StateDictF64;
use modelfusion::align::{Aligner, WeightMatching};
use modelfusion::perm::specs::{Architecture, ResNet, Vgg};
use std::hint::black_box;
use std::time::Duration;

fn bench_arch<A: Architecture>(c: &mut Criterion, name: &str, arch: &A, f64_too: bool) {
    let spec = arch.spec();
    let (a, b) = (arch.random_model(1), arch.random_model(2));
    let wm = WeightMatching::new(0);
    let mut g = c.benchmark_group("weight_matching");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g.bench_function(format!("{name}/f32"), |bench| {
        bench.iter(|| black_box(wm.align(&a, &b, &spec).unwrap()))
    });
    if f64_too {
        let (a, b): (StateDictF64, StateDictF64) = (a.cast(), b.cast());
        g.bench_function(format!("{name}/f64"), |bench| {
            bench.iter(|| black_box(wm.align(&a, &b, &spec).unwrap()))
        });
    }
    g.finish();
}

fn weight_matching(c: &mut Criterion) {
    bench_arch(c, "resnet20x1", &ResNet::resnet20(1, 10), true);
    bench_arch(c, "resnet20x4", &ResNet::resnet20(4, 10), true);
    bench_arch(c, "resnet20x16", &ResNet::resnet20(16, 10), false);
    bench_arch(c, "vgg16", &Vgg::vgg16(1, 10), false);
}

criterion_group!(benches, weight_matching);
criterion_main!(benches);
