//! Batch-norm statistics along a path: `Classification::with_reset_stats` recomputes the
//! running statistics of every point of a barrier before evaluating it.
#![cfg(feature = "nn")]

use modelfusion::barrier::{BarrierConfig, loss_barrier};
use modelfusion::nn::{
    Classification, Network, Optimizer, ResMlp, TrainConfig, data, reset_running_stats, train,
};
use modelfusion::path::{Linear, PathSampler};
use modelfusion::{Objective, StateDictF32};

fn endpoints() -> (
    ResMlp,
    data::Dataset,
    data::Dataset,
    StateDictF32,
    StateDictF32,
) {
    let (train_set, test_set) = data::digits().unwrap().split(0.25, 0).unwrap();
    let net = ResMlp::new(64, 32, 32, 2, 10).unwrap();
    let cfg = TrainConfig::new(Optimizer::adam(3e-3).unwrap(), 4, 32, 0).unwrap();
    let a = train(&net, &net.init(0), &train_set, &cfg).unwrap().params;
    let b = train(&net, &net.init(1), &train_set, &cfg).unwrap().params;
    (net, train_set, test_set, a, b)
}

/// With the reset, the path's values at the endpoints are the endpoint losses after the
/// reset, and every interior value is the loss of the reset point; the reset lowers the
/// loss in the middle of the path (interpolated running statistics are stale).
#[test]
fn reset_along_the_path_matches_the_reset_endpoints_and_lowers_the_midpoint() {
    let (net, train_set, test_set, a, b) = endpoints();
    let plain = Classification::new(&net, &test_set, 128).unwrap();
    let reset = plain.clone().with_reset_stats(&train_set).unwrap();
    let line = Linear::new(a.clone(), b.clone()).unwrap();
    let cfg = BarrierConfig::uniform(5).unwrap();
    let with = loss_barrier(&line, &reset, &cfg).unwrap();
    let without = loss_barrier(&line, &plain, &cfg).unwrap();
    let fresh = |m: &StateDictF32| reset_running_stats(&net, m, &train_set, 128).unwrap();
    assert_eq!(with.curve[0].1, plain.loss(&fresh(&a)).unwrap());
    assert_eq!(with.curve[4].1, plain.loss(&fresh(&b)).unwrap());
    let mid = line.point(0.5).unwrap();
    assert_eq!(with.curve[2].1, plain.loss(&fresh(&mid)).unwrap());
    assert!(
        with.curve[2].1 < without.curve[2].1,
        "midpoint loss with reset {}, without {}",
        with.curve[2].1,
        without.curve[2].1
    );
    // A network without buffers is unchanged by the reset.
    let mlp = modelfusion::nn::Mlp::new(&[64, 16, 10]).unwrap();
    let p: StateDictF32 = mlp.init(0);
    let t = Classification::new(&mlp, &test_set, 128).unwrap();
    assert_eq!(
        t.loss(&p).unwrap(),
        t.clone()
            .with_reset_stats(&train_set)
            .unwrap()
            .loss(&p)
            .unwrap()
    );
    assert!(net.is_buffer("blocks.0.norm.running_var"));
}

#[test]
fn reset_data_must_fit_the_network() {
    let (train_set, test_set) = data::digits().unwrap().split(0.25, 0).unwrap();
    let net = ResMlp::new(64, 8, 8, 1, 10).unwrap();
    let plain = Classification::new(&net, &test_set, 64).unwrap();
    let wide = crate::nn_common::random_dataset(10, 32, 10, 0);
    let e = plain
        .clone()
        .with_reset_stats(&wide)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[10, 64]") && e.contains("[10, 32]"), "{e}");
    // A single-sample reset set has no batch statistics.
    let one = train_set.head(1);
    let p: StateDictF32 = net.init(0);
    assert!(plain.with_reset_stats(&one).unwrap().loss(&p).is_err());
}
