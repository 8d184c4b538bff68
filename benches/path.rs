//! Path evaluation and curve-fitting overhead on a model of 1M f32 parameters
//! (4 tensors of 512 x 512): the cost modelfusion adds on top of the objective.
//!
//! `cargo bench --bench path -- --measurement-time 2 --warm-up-time 1`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use modelfusion::barrier::{BarrierConfig, loss_barrier};
use modelfusion::path::{Bezier, FitConfig, Optimizer, PathSampler, fit_curve};
use modelfusion::progress::Silent;
use modelfusion::{Gradient, Model, Objective, Result, StateDict, StateDictF32};
use ndarray::{ArrayD, IxDyn};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn model(seed: u64) -> StateDictF32 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    StateDict::from_pairs((0..4).map(|i| {
        let data: Vec<f32> = (0..512 * 512).map(|_| rng.random::<f32>() - 0.5).collect();
        (
            format!("layer{i}.weight"),
            ArrayD::from_shape_vec(IxDyn(&[512, 512]), data).unwrap(),
        )
    }))
    .unwrap()
}

/// `|w|^2 / 2`: as cheap as an objective gets, so the timings are the path's own.
struct HalfNorm;
impl Objective<StateDictF32> for HalfNorm {
    fn loss(&self, m: &StateDictF32) -> Result<f64> {
        Ok(0.5 * m.norm().powi(2))
    }
}
impl Gradient<StateDictF32> for HalfNorm {
    fn loss_and_gradient(&self, m: &StateDictF32) -> Result<(f64, StateDictF32)> {
        Ok((0.5 * m.norm().powi(2), m.clone()))
    }
}

fn benches(c: &mut Criterion) {
    let (a, bend, b) = (model(1), model(2), model(3));
    let curve = Bezier::new(vec![a.clone(), bend, b.clone()]).unwrap();
    let mut g = c.benchmark_group("path_1M_f32");
    g.sample_size(20);
    g.bench_function("bezier3_point", |bench| {
        bench.iter(|| black_box(curve.point(black_box(0.37)).unwrap()))
    });
    g.bench_function("barrier_25_points_half_norm", |bench| {
        bench
            .iter(|| black_box(loss_barrier(&curve, &HalfNorm, &BarrierConfig::default()).unwrap()))
    });
    for (name, opt) in [
        ("sgd", Optimizer::sgd(0.01, 0.9).unwrap()),
        ("adam", Optimizer::adam(0.01).unwrap()),
    ] {
        let cfg = FitConfig::new(10, opt).unwrap();
        g.bench_function(format!("fit_10_steps_{name}_half_norm"), |bench| {
            bench.iter(|| black_box(fit_curve(&curve, &HalfNorm, &cfg, Silent).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(path, benches);
criterion_main!(path);
