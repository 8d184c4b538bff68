//! Training: loss goes down, accuracy on the digits, determinism, running statistics,
//! optimiser configuration errors.
#![cfg(feature = "nn")]

use crate::nn_common;

use modelfusion::nn::{
    Classification, LrSchedule, Mlp, Mode, Network, Optimizer, ResMlp, TrainConfig, data, train,
};
use modelfusion::{Error, Model, StateDictF32, StateDictF64};
use nn_common::*;

#[test]
fn mlp_learns_the_digits() {
    let (train_set, test_set) = data::digits().unwrap().split(0.2, 0).unwrap();
    let net = Mlp::new(&[64, 64, 10]).unwrap();
    let config = TrainConfig::new(Optimizer::adam(3e-3).unwrap(), 8, 32, 1).unwrap();
    let init: StateDictF32 = net.init(0);
    let t = train(&net, &init, &train_set, &config).unwrap();
    assert_eq!(t.loss_history.len(), 8);
    assert!(
        t.loss_history[7] < 0.5 * t.loss_history[0],
        "{:?}",
        t.loss_history
    );
    let acc = Classification::new(&net, &test_set, 256)
        .unwrap()
        .accuracy(&t.params)
        .unwrap();
    assert!(acc >= 0.9, "test accuracy {acc}");
    assert!(*t.accuracy_history.last().unwrap() > 0.9);
}

#[test]
fn res_mlp_learns_the_digits_with_sgd() {
    let (train_set, test_set) = data::digits().unwrap().split(0.2, 0).unwrap();
    let net = ResMlp::new(64, 32, 64, 2, 10).unwrap();
    let config = TrainConfig::new(Optimizer::nesterov(0.05, 0.9).unwrap(), 6, 32, 3)
        .unwrap()
        .with_weight_decay(1e-4)
        .unwrap()
        .with_schedule(LrSchedule::Cosine);
    let t = train(
        &net,
        &net.init::<ndarray::ArrayD<f32>>(2),
        &train_set,
        &config,
    )
    .unwrap();
    assert!(
        t.loss_history[5] < t.loss_history[0],
        "{:?}",
        t.loss_history
    );
    let eval = Classification::new(&net, &test_set, 256).unwrap();
    let acc = eval.accuracy(&t.params).unwrap();
    assert!(acc >= 0.9, "test accuracy {acc}");
    // The running statistics were learnt: evaluation with them is about as good as
    // with batch statistics.
    let batch_acc = eval
        .clone()
        .with_mode(Mode::Train)
        .accuracy(&t.params)
        .unwrap();
    assert!((acc - batch_acc).abs() < 0.05, "{acc} vs {batch_acc}");
}

#[test]
fn training_is_deterministic_for_a_seed() {
    let data = random_dataset(40, 5, 3, 0);
    let (mlp, res) = nets();
    let config = TrainConfig::new(Optimizer::sgd(0.1, 0.9).unwrap(), 3, 8, 5).unwrap();
    let a = train(&mlp, &mlp.init::<ndarray::ArrayD<f32>>(1), &data, &config).unwrap();
    let b = train(&mlp, &mlp.init::<ndarray::ArrayD<f32>>(1), &data, &config).unwrap();
    assert_eq!(a.params, b.params);
    assert_eq!(a.loss_history, b.loss_history);
    let other = TrainConfig::new(Optimizer::sgd(0.1, 0.9).unwrap(), 3, 8, 6).unwrap();
    let c = train(&mlp, &mlp.init::<ndarray::ArrayD<f32>>(1), &data, &other).unwrap();
    assert_ne!(a.params, c.params);
    let ra = train(&res, &res.init::<ndarray::ArrayD<f32>>(1), &data, &config).unwrap();
    let rb = train(&res, &res.init::<ndarray::ArrayD<f32>>(1), &data, &config).unwrap();
    assert_eq!(ra.params, rb.params);
}

#[test]
fn running_statistics_follow_the_momentum_rule_and_skip_the_optimiser() {
    // One full-batch step: running_mean = 0.9 * 0 + 0.1 * batch mean of the stream,
    // running_var = 0.9 * 1 + 0.1 * unbiased batch variance, whatever the optimiser and
    // weight decay do to the trained parameters.
    let data = random_dataset(12, 5, 3, 4);
    let net = ResMlp::new(5, 4, 6, 1, 3).unwrap();
    let init: StateDictF64 = net.init(0);
    let config = TrainConfig::new(Optimizer::sgd(0.5, 0.9).unwrap(), 1, 12, 0)
        .unwrap()
        .with_weight_decay(0.5)
        .unwrap();
    let trained = train(&net, &init, &data, &config).unwrap();
    let x = data.x().mapv(f64::from);
    let (_, cache) = net.forward(&init, x.view(), Mode::Train).unwrap();
    let stream = net.group_features(&cache)["residual"]
        .slice(ndarray::s![..12, ..])
        .to_owned();
    let mean = stream.mean_axis(ndarray::Axis(0)).unwrap();
    let var = stream.var_axis(ndarray::Axis(0), 1.0);
    let rm = trained.params.get("blocks.0.norm.running_mean").unwrap();
    let rv = trained.params.get("blocks.0.norm.running_var").unwrap();
    for c in 0..4 {
        assert!((rm[[c]] - 0.1 * mean[c]).abs() < 1e-12);
        assert!((rv[[c]] - (0.9 + 0.1 * var[c])).abs() < 1e-12);
    }
    // The trained parameters did move.
    assert!(trained.params.get("stem.weight").unwrap() != init.get("stem.weight").unwrap());
}

#[test]
fn a_single_sample_batch_is_skipped_with_batch_norm() {
    // 9 samples in batches of 4: the last batch has one sample.
    let data = random_dataset(9, 5, 3, 1);
    let (_, res) = nets();
    let config = TrainConfig::new(Optimizer::adam(1e-3).unwrap(), 2, 4, 0).unwrap();
    assert!(train(&res, &res.init::<ndarray::ArrayD<f32>>(0), &data, &config).is_ok());
}

#[test]
fn bad_training_inputs_are_errors() {
    let data = random_dataset(10, 5, 3, 1);
    let (mlp, res) = nets();
    let config = TrainConfig::new(Optimizer::adam(1e-3).unwrap(), 1, 4, 0).unwrap();
    // Parameters of another network.
    let e = train(&mlp, &res.init::<ndarray::ArrayD<f32>>(0), &data, &config).unwrap_err();
    assert!(matches!(e, Error::MissingParam { .. }), "{e}");
    // Data of the wrong width.
    let wide = random_dataset(10, 6, 3, 1);
    assert!(matches!(
        train(&mlp, &mlp.init::<ndarray::ArrayD<f32>>(0), &wide, &config),
        Err(Error::ShapeMismatch { .. })
    ));
    // A diverging learning rate is an error, not NaN parameters.
    let hot = TrainConfig::new(Optimizer::sgd(1e30, 0.0).unwrap(), 5, 4, 0).unwrap();
    let p: StateDictF32 = mlp.init(0);
    assert!(matches!(
        train(&mlp, &p, &data, &hot),
        Err(Error::NonFinite { .. })
    ));
    // Invalid hyperparameters, each named.
    for (r, param) in [
        (Optimizer::sgd(-0.1, 0.0), "lr"),
        (Optimizer::sgd(0.1, -0.5), "momentum"),
        (Optimizer::nesterov(0.1, 0.0), "momentum"),
        (Optimizer::adam_with(0.1, 0.9, 1.5, 1e-8), "beta2"),
        (Optimizer::adam_with(0.1, 0.9, 0.99, -1.0), "eps"),
    ] {
        let e = r.unwrap_err().to_string();
        assert!(e.contains(param), "{e}");
    }
    let raw = Optimizer::Adam {
        lr: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    assert!(TrainConfig::new(raw, 1, 1, 0).is_err());
    assert!(config.clone().with_weight_decay(f64::NAN).is_err());
}

#[test]
fn reset_running_stats_averages_batch_statistics() {
    use modelfusion::nn::reset_running_stats;
    use ndarray::{Axis, s};
    let data = random_dataset(10, 5, 3, 8);
    let (mlp, res) = nets();
    let mut params: StateDictF64 = res.init(3);
    randomise_running_stats(&res, &mut params, 1);
    let fresh = reset_running_stats(&res, &params, &data, 4).unwrap();
    // Expected: per block, the size-weighted mean over batches (4, 4, 2) of the batch
    // mean and unbiased variance of the block's input stream.
    for j in 0..res.num_blocks() {
        let (mut mean, mut var) = (
            ndarray::Array1::<f64>::zeros(6),
            ndarray::Array1::<f64>::zeros(6),
        );
        for (x, _) in data.batches(4).unwrap() {
            let n = x.nrows();
            let (_, cache) = res
                .forward(&params, x.mapv(f64::from).view(), Mode::Train)
                .unwrap();
            let stream = net_stream(&res, &cache, j, n);
            mean = mean + stream.mean_axis(Axis(0)).unwrap() * n as f64;
            var = var + stream.var_axis(Axis(0), 1.0) * n as f64;
        }
        let got_m = fresh.get(&format!("blocks.{j}.norm.running_mean")).unwrap();
        let got_v = fresh.get(&format!("blocks.{j}.norm.running_var")).unwrap();
        for c in 0..6 {
            assert!((got_m[[c]] - mean[c] / 10.0).abs() < 1e-12);
            assert!((got_v[[c]] - var[c] / 10.0).abs() < 1e-12);
        }
    }
    // Everything but the buffers is unchanged.
    for name in params.names().filter(|n| !res.is_buffer(n)) {
        assert_eq!(fresh.get(name), params.get(name));
    }
    fn net_stream(
        res: &ResMlp,
        cache: &modelfusion::nn::ResMlpCache<f64>,
        j: usize,
        n: usize,
    ) -> ndarray::Array2<f64> {
        res.group_features(cache)["residual"]
            .slice(s![j * n..(j + 1) * n, ..])
            .to_owned()
    }
    // Networks without buffers come back unchanged; one-sample data cannot be used.
    let pm: StateDictF32 = mlp.init(0);
    assert_eq!(reset_running_stats(&mlp, &pm, &data, 4).unwrap(), pm);
    let one = data.head(1);
    assert!(reset_running_stats(&res, &params, &one, 4).is_err());
    assert!(reset_running_stats(&res, &params, &data, 0).is_err());
}

#[test]
fn tasks_with_reset_statistics_evaluate_the_reset_model() {
    use modelfusion::nn::reset_running_stats;
    use modelfusion::{Gradient, Objective};
    let (train_set, test_set) = data::digits().unwrap().head(400).split(0.25, 0).unwrap();
    let net = ResMlp::new(64, 16, 32, 2, 10).unwrap();
    let config = TrainConfig::new(Optimizer::adam(3e-3).unwrap(), 3, 32, 0).unwrap();
    let a = train(
        &net,
        &net.init::<ndarray::ArrayD<f32>>(0),
        &train_set,
        &config,
    )
    .unwrap()
    .params;
    let b = train(
        &net,
        &net.init::<ndarray::ArrayD<f32>>(1),
        &train_set,
        &config,
    )
    .unwrap()
    .params;
    let mid = a.lerp(&b, 0.5).unwrap();
    let plain = Classification::new(&net, &test_set, 64).unwrap();
    let task = plain.clone().with_reset_stats(&train_set).unwrap();
    let fresh = reset_running_stats(&net, &mid, &train_set, 64).unwrap();
    assert_eq!(task.loss(&mid).unwrap(), plain.loss(&fresh).unwrap());
    assert_eq!(task.logits(&mid).unwrap(), plain.logits(&fresh).unwrap());
    assert_eq!(
        task.error_rate().loss(&mid).unwrap(),
        plain.error_rate().loss(&fresh).unwrap()
    );
    let (l1, g1) = task.loss_and_gradient(&mid).unwrap();
    let (l2, g2) = plain.loss_and_gradient(&fresh).unwrap();
    assert_eq!((l1, g1), (l2, g2));
    assert_ne!(plain.loss(&mid).unwrap(), plain.loss(&fresh).unwrap());
    // Data of the wrong width is refused.
    let wide = random_dataset(10, 3, 3, 0);
    assert!(plain.clone().with_reset_stats(&wide).is_err());
}
