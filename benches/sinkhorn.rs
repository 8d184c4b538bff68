//! Criterion benches of `solve::Sinkhorn` (1 and 2 threads) and the Sinkhorn operator.
//!
//! `cargo bench --bench sinkhorn -- --measurement-time 2 --warm-up-time 1`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use modelfusion::solve::{Sinkhorn, sinkhorn_operator};
use ndarray::{Array1, Array2};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use std::hint::black_box;

/// Squared Euclidean cost between two 64-D Gaussian clouds (shifted), max-normalised.
fn clouds(n: usize, seed: u64) -> Array2<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = Array2::<f64>::from_shape_fn((n, 64), |_| rng.sample(StandardNormal));
    let y = Array2::<f64>::from_shape_fn((n, 64), |_| rng.sample::<f64, _>(StandardNormal) + 0.5);
    let mut m = Array2::from_shape_fn((n, n), |(i, j)| {
        x.row(i)
            .iter()
            .zip(y.row(j))
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
    });
    let mx = m.iter().cloned().fold(0.0, f64::max);
    m /= mx;
    m
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("sinkhorn");
    g.sample_size(10);
    for n in [512, 1024] {
        let m = clouds(n, 1);
        let u = Array1::from_elem(n, 1.0 / n as f64);
        for reg in [0.05, 0.01] {
            let s = Sinkhorn::builder()
                .with_reg(reg)
                .with_tol(1e-9)
                .build()
                .unwrap();
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                g.bench_with_input(
                    BenchmarkId::new(format!("reg{reg}_threads{threads}"), n),
                    &m,
                    |bch, m| {
                        bch.iter(|| {
                            pool.install(|| {
                                s.solve(u.view(), u.view(), black_box(m.view())).unwrap()
                            })
                        })
                    },
                );
            }
        }
        g.bench_with_input(
            BenchmarkId::new("operator_tau0.05_20it", n),
            &m,
            |bch, m| bch.iter(|| sinkhorn_operator(black_box(m.view()), 0.05, 20).unwrap()),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
