//! Speed of the reference networks: one training step (forward, backward, optimiser
//! update) and one epoch on the embedded digits.
//!
//! `cargo bench --bench nn -- --measurement-time 2 --warm-up-time 1`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use modelfusion::StateDictF32;
use modelfusion::nn::{Mlp, Mode, Network, Optimizer, ResMlp, TrainConfig, data, train};
use ndarray::Array2;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("nn");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);

    // Forward + backward of one Fashion-MNIST-sized batch.
    let mlp = Mlp::new(&[784, 256, 256, 10]).unwrap();
    let params: StateDictF32 = mlp.init(0);
    let x = Array2::from_shape_fn((32, 784), |(i, j)| ((i * 31 + j * 7) % 256) as f32 / 255.0);
    let labels: Vec<usize> = (0..32).map(|i| i % 10).collect();
    g.bench_function("mlp_784x256x256x10_batch32_forward_backward", |b| {
        b.iter(|| {
            mlp.batch_loss_and_gradient(&params, black_box(x.view()), &labels, Mode::Train)
                .unwrap()
                .loss
        })
    });
    let res = ResMlp::new(784, 256, 512, 2, 10).unwrap();
    let rparams: StateDictF32 = res.init(0);
    g.bench_function(
        "res_mlp_784_w256_h512_2blocks_batch32_forward_backward",
        |b| {
            b.iter(|| {
                res.batch_loss_and_gradient(&rparams, black_box(x.view()), &labels, Mode::Train)
                    .unwrap()
                    .loss
            })
        },
    );

    // One epoch (45 Adam steps of 32) of the demo's MLP on the digits training split.
    let (train_set, _) = data::digits().unwrap().split(0.2, 0).unwrap();
    let demo = Mlp::new(&[64, 128, 128, 10]).unwrap();
    let init: StateDictF32 = demo.init(0);
    let config = TrainConfig::new(Optimizer::adam(1e-3).unwrap(), 1, 32, 0).unwrap();
    g.bench_function("digits_epoch_mlp_64x128x128x10_adam_batch32", |b| {
        b.iter(|| {
            train(&demo, &init, &train_set, &config)
                .unwrap()
                .loss_history[0]
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
