//! Criterion benches of `solve::linear_sum_assignment` (single thread).
//!
//! `cargo bench --bench lap -- --measurement-time 2 --warm-up-time 1`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use modelfusion::solve::linear_sum_assignment;
use ndarray::Array2;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use std::hint::black_box;

fn uniform(n: usize, m: usize, seed: u64) -> Array2<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Array2::from_shape_fn((n, m), |_| rng.random::<f64>())
}

fn integer(n: usize, seed: u64) -> Array2<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Array2::from_shape_fn((n, n), |_| (rng.random::<f64>() * 100.0).floor())
}

/// `A B^T` with `A`, `B` standard normal `(n, 512)`: a weight-matching similarity.
fn weight_matching(n: usize, seed: u64) -> Array2<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let a = Array2::<f64>::from_shape_fn((n, 512), |_| rng.sample(StandardNormal));
    let b = Array2::<f64>::from_shape_fn((n, 512), |_| rng.sample(StandardNormal));
    a.dot(&b.t())
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("lap");
    g.sample_size(10);
    for n in [256, 1024] {
        let u = uniform(n, n, 1);
        g.bench_with_input(BenchmarkId::new("uniform_f64", n), &u, |bch, u| {
            bch.iter(|| linear_sum_assignment(black_box(u.view()), false).unwrap())
        });
        let u32 = u.mapv(|x| x as f32);
        g.bench_with_input(BenchmarkId::new("uniform_f32", n), &u32, |bch, u| {
            bch.iter(|| linear_sum_assignment(black_box(u.view()), false).unwrap())
        });
        let i = integer(n, 2);
        g.bench_with_input(BenchmarkId::new("integer_f64", n), &i, |bch, c| {
            bch.iter(|| linear_sum_assignment(black_box(c.view()), false).unwrap())
        });
        let w = weight_matching(n, 3);
        g.bench_with_input(
            BenchmarkId::new("weight_matching_max_f64", n),
            &w,
            |bch, c| bch.iter(|| linear_sum_assignment(black_box(c.view()), true).unwrap()),
        );
    }
    let r = uniform(1024, 2048, 4);
    g.bench_function("uniform_f64/1024x2048", |bch| {
        bch.iter(|| linear_sum_assignment(black_box(r.view()), false).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
