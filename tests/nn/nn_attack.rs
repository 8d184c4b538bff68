//! Adversarial attacks (`nn::Pgd`), robust evaluation and adversarial minibatches
//! (`nn::Robust`), adversarial training, and robust curve fitting: golden values from
//! tests/golden/nn/pgd_golden.py (numpy), finite differences, properties and errors.
#![cfg(feature = "nn")]

use modelfusion::nn::{
    Classification, Dataset, Mlp, Mode, Network, Norm, Optimizer, Pgd, ResMlp, TrainConfig, data,
    train,
};
use modelfusion::path::{
    Bezier, FitConfig, PathSampler, curve_loss_and_gradients, fit_curve_stochastic,
};
use modelfusion::progress::Silent;
use modelfusion::{Model, StateDictF32, StateDictF64, StochasticGradient};
use ndarray::{Array2, ArrayD};
use proptest::prelude::*;

use crate::nn_common::{formula_mlp, random_batch, randomise_running_stats, read_golden};

const SIZES: [usize; 3] = [5, 6, 3];
const N: usize = 6;

/// Model `s` of the script: element k of parameter m is 0.6 sin(1.1 k + 0.7 m + 0.3 s + 0.1).
fn golden_model(s: usize) -> StateDictF64 {
    formula_mlp(&SIZES, |m, k| {
        0.6 * (1.1 * k as f64 + 0.7 * m as f64 + 0.3 * s as f64 + 0.1).sin()
    })
}

fn golden_x() -> Array2<f32> {
    Array2::from_shape_fn((N, SIZES[0]), |(i, j)| {
        (0.5 + 0.4 * (0.9 * i as f64 + 0.45 * j as f64 + 0.2).cos()) as f32
    })
}

fn labels() -> Vec<usize> {
    (0..N).map(|i| i % 3).collect()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{k}]: got {g}, want {w}");
    }
}

#[test]
fn input_gradient_and_pgd_match_numpy() {
    let golden = read_golden("nn/pgd.txt");
    let net = Mlp::new(&SIZES).unwrap();
    let p = golden_model(0);
    let x = golden_x().mapv(f64::from);
    let y = labels();
    let (logits, cache) = net.forward(&p, x.view(), Mode::Eval).unwrap();
    let mut d = logits.mapv(f64::exp);
    for (mut row, &l) in d.rows_mut().into_iter().zip(&y) {
        let s = row.sum();
        row /= s;
        row[l] -= 1.0;
    }
    let gx = net.input_gradient(&p, &cache, d.view()).unwrap();
    assert_close(
        gx.as_slice().unwrap(),
        &golden["input_grad"],
        1e-12,
        "input gradient",
    );
    let cases = [
        (
            "linf",
            Pgd::new(Norm::LInf, 0.15, 0.05, 5)
                .unwrap()
                .with_range(0.0, 1.0)
                .unwrap(),
        ),
        (
            "l2",
            Pgd::new(Norm::L2, 0.5, 0.2, 5)
                .unwrap()
                .with_range(0.0, 1.0)
                .unwrap(),
        ),
        ("fgsm", Pgd::fgsm(0.1).unwrap()),
    ];
    for (name, pgd) in cases {
        let adv = pgd.perturb(&net, &p, x.view(), &y).unwrap();
        assert_close(
            adv.x.as_slice().unwrap(),
            &golden[&format!("{name}_x")],
            1e-12,
            name,
        );
        assert_close(
            &[adv.clean_loss],
            &golden[&format!("{name}_clean_loss")],
            1e-12,
            name,
        );
        assert_close(&[adv.loss], &golden[&format!("{name}_loss")], 1e-12, name);
    }
}

#[test]
fn robust_curve_gradient_matches_numpy() {
    let golden = read_golden("nn/pgd.txt");
    let net = Mlp::new(&SIZES).unwrap();
    let set = Dataset::new(golden_x(), labels(), 3).unwrap();
    let task = Classification::new(&net, &set, N).unwrap();
    let pgd = Pgd::new(Norm::LInf, 0.15, 0.05, 5)
        .unwrap()
        .with_range(0.0, 1.0)
        .unwrap();
    let mut robust = task.robust(pgd);
    let curve = Bezier::new(vec![golden_model(0), golden_model(1), golden_model(2)]).unwrap();
    let (total, loss, grads) = curve_loss_and_gradients(&curve, 0.5, &mut robust, 0, 0.0).unwrap();
    assert_eq!(total, loss);
    assert_close(
        &[loss],
        &golden["rmc_loss"],
        1e-12,
        "robust loss at phi(0.5)",
    );
    // Control k's gradient is c_k(0.5) times the gradient at phi(0.5); c_1 = 0.5.
    for (name, g) in grads[1].iter() {
        let want: Vec<f64> = golden[&format!("rmc_grad.{name}")]
            .iter()
            .map(|v| 0.5 * v)
            .collect();
        assert_close(g.as_slice().unwrap(), &want, 1e-12, name);
    }
}

/// Central differences of the summed cross-entropy with respect to every input.
fn check_input_gradient<N: Network>(net: &N, p: &StateDictF64, mode: Mode) {
    let x: Array2<f64> = random_batch(5, net.input_dim(), 3);
    let y: Vec<usize> = (0..5).map(|i| i % net.num_classes()).collect();
    let loss = |x: &Array2<f64>| {
        net.batch_loss_and_gradient(p, x.view(), &y, mode)
            .unwrap()
            .loss
            * 5.0
    };
    let (logits, cache) = net.forward(p, x.view(), mode).unwrap();
    let mut d = logits.mapv(f64::exp);
    for (mut row, &l) in d.rows_mut().into_iter().zip(&y) {
        let s = row.sum();
        row /= s;
        row[l] -= 1.0;
    }
    let gx = net.input_gradient(p, &cache, d.view()).unwrap();
    let h = 1e-6;
    for i in 0..x.nrows() {
        for j in 0..x.ncols() {
            let (mut up, mut down) = (x.clone(), x.clone());
            up[[i, j]] += h;
            down[[i, j]] -= h;
            let fd = (loss(&up) - loss(&down)) / (2.0 * h);
            assert!(
                (fd - gx[[i, j]]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{} {mode:?} x[{i}, {j}]: analytic {}, numeric {fd}",
                net.describe(),
                gx[[i, j]]
            );
        }
    }
}

#[test]
fn input_gradient_agrees_with_finite_differences() {
    let mlp = Mlp::new(&[4, 6, 5, 3]).unwrap();
    check_input_gradient(&mlp, &mlp.init(1), Mode::Eval);
    let res = ResMlp::new(4, 5, 6, 2, 3).unwrap();
    let mut p: StateDictF64 = res.init(2);
    randomise_running_stats(&res, &mut p, 7);
    check_input_gradient(&res, &p, Mode::Eval);
    check_input_gradient(&res, &p, Mode::Train);
}

fn ball_norm(norm: Norm, d: ndarray::ArrayView1<f32>) -> f64 {
    match norm {
        Norm::LInf => d.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs()))),
        Norm::L2 => d.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The attacked loss is never below the clean one; the perturbation stays in the
    /// ball and the input in the data range; the random start is reproducible by seed.
    #[test]
    fn pgd_stays_in_the_ball_and_never_lowers_the_loss(
        l2 in any::<bool>(),
        eps in 0.0f64..0.6,
        step_frac in 0.05f64..0.8,
        steps in 1usize..6,
        random_start in any::<bool>(),
        seed in 0u64..1000,
        residual in any::<bool>(),
    ) {
        let norm = if l2 { Norm::L2 } else { Norm::LInf };
        let pgd = Pgd::new(norm, eps, eps * step_frac, steps).unwrap()
            .with_random_start(random_start)
            .with_seed(seed)
            .with_range(0.0, 1.0).unwrap();
        let d = data::digits().unwrap().shuffled(seed).head(24);
        let (x, y) = (d.x(), d.y());
        let check = |adv: &modelfusion::nn::Perturbed<f32>| -> Result<(), TestCaseError> {
            prop_assert!(adv.loss >= adv.clean_loss, "{} < {}", adv.loss, adv.clean_loss);
            for (a, c) in adv.x.rows().into_iter().zip(x.rows()) {
                let delta = &a - &c;
                prop_assert!(ball_norm(norm, delta.view()) <= eps * (1.0 + 1e-5) + 1e-6);
                prop_assert!(a.iter().all(|v| (0.0..=1.0).contains(v)));
            }
            Ok(())
        };
        if residual {
            let net = ResMlp::new(64, 12, 16, 1, 10).unwrap();
            let p: StateDictF32 = net.init(seed);
            let adv = pgd.perturb(&net, &p, x.view(), y).unwrap();
            check(&adv)?;
            prop_assert_eq!(adv, pgd.perturb(&net, &p, x.view(), y).unwrap());
        } else {
            let net = Mlp::new(&[64, 16, 10]).unwrap();
            let p: StateDictF32 = net.init(seed);
            let adv = pgd.perturb(&net, &p, x.view(), y).unwrap();
            check(&adv)?;
            prop_assert_eq!(adv, pgd.perturb(&net, &p, x.view(), y).unwrap());
        }
    }
}

#[test]
fn a_ball_of_radius_zero_is_the_clean_objective() {
    let d = data::digits().unwrap().head(100);
    let net = Mlp::new(&[64, 16, 10]).unwrap();
    let p: StateDictF32 = net.init(0);
    let task = Classification::new(&net, &d, 32).unwrap();
    let pgd = Pgd::new(Norm::LInf, 0.0, 0.0, 3)
        .unwrap()
        .with_random_start(true);
    let mut robust = task.robust(pgd);
    assert_eq!(robust.evaluate(&p).unwrap(), task.evaluate(&p).unwrap());
    for step in 0..4 {
        assert_eq!(
            robust.loss_and_gradient_at(&p, step).unwrap(),
            task.minibatch_loss_and_gradient(&p, step).unwrap()
        );
    }
}

#[test]
fn pgd_refuses_bad_input() {
    let msg = |r: modelfusion::Result<Pgd>| r.unwrap_err().to_string();
    assert!(msg(Pgd::new(Norm::LInf, -0.1, 0.1, 3)).contains("eps"));
    assert!(msg(Pgd::new(Norm::LInf, f64::INFINITY, 0.1, 3)).contains("eps"));
    assert!(msg(Pgd::new(Norm::L2, 0.1, -0.1, 3)).contains("step_size"));
    assert!(msg(Pgd::new(Norm::L2, 0.1, f64::NAN, 3)).contains("step_size"));
    assert!(msg(Pgd::new(Norm::L2, 0.1, 0.1, 0)).contains("steps"));
    assert!(msg(Pgd::fgsm(-1.0)).contains("eps"));
    assert!(msg(Pgd::fgsm(0.1).unwrap().with_range(0.5, 0.5)).contains("range"));
    assert!(msg(Pgd::fgsm(0.1).unwrap().with_range(f64::NAN, 1.0)).contains("range"));

    let net = Mlp::new(&[3, 4, 2]).unwrap();
    let p: StateDictF64 = net.init(0);
    let pgd = Pgd::fgsm(0.1).unwrap().with_range(0.0, 1.0).unwrap();
    let x = Array2::from_elem((2, 3), 0.5);
    // Wrong width, empty batch, wrong label count, label out of range.
    let e = pgd
        .perturb(&net, &p, Array2::<f64>::zeros((2, 4)).view(), &[0, 1])
        .unwrap_err();
    assert!(
        e.to_string().contains("[2, 3]") && e.to_string().contains("[2, 4]"),
        "{e}"
    );
    assert!(
        pgd.perturb(&net, &p, Array2::<f64>::zeros((0, 3)).view(), &[])
            .is_err()
    );
    let e = pgd.perturb(&net, &p, x.view(), &[0]).unwrap_err();
    assert!(e.to_string().contains("labels"), "{e}");
    let e = pgd.perturb(&net, &p, x.view(), &[0, 5]).unwrap_err();
    assert!(e.to_string().contains("label 5"), "{e}");
    // Non-finite input, input outside the data range.
    let mut bad = x.clone();
    bad[[1, 2]] = f64::NAN;
    let e = pgd.perturb(&net, &p, bad.view(), &[0, 1]).unwrap_err();
    assert!(e.to_string().contains("sample 1, feature 2"), "{e}");
    bad[[1, 2]] = 1.5;
    let e = pgd.perturb(&net, &p, bad.view(), &[0, 1]).unwrap_err();
    assert!(e.to_string().contains("outside the data range"), "{e}");
    // Parameters of another network.
    let other: StateDictF64 = Mlp::new(&[3, 5, 2]).unwrap().init(0);
    let e = pgd.perturb(&net, &other, x.view(), &[0, 1]).unwrap_err();
    assert!(e.to_string().contains("layers.0.weight"), "{e}");
}

/// Adversarial training on digits (FGSM-started PGD) buys robust accuracy over plain
/// training from the same initialisation.
#[test]
fn adversarial_training_raises_robust_accuracy_on_digits() {
    let (train_set, test_set) = data::digits().unwrap().split(0.25, 0).unwrap();
    let net = Mlp::new(&[64, 32, 10]).unwrap();
    let init: StateDictF32 = net.init(0);
    let pgd = Pgd::new(Norm::LInf, 0.1, 0.04, 3)
        .unwrap()
        .with_range(0.0, 1.0)
        .unwrap();
    let plain_cfg = TrainConfig::new(Optimizer::adam(3e-3).unwrap(), 8, 32, 1).unwrap();
    let adv_cfg = plain_cfg
        .clone()
        .with_attack(pgd.clone().with_random_start(true));
    let plain = train(&net, &init, &train_set, &plain_cfg).unwrap().params;
    let adv = train(&net, &init, &train_set, &adv_cfg).unwrap().params;
    let task = Classification::new(&net, &test_set, 128).unwrap();
    let robust = task.robust(pgd);
    let (plain_rob, adv_rob) = (
        robust.accuracy(&plain).unwrap(),
        robust.accuracy(&adv).unwrap(),
    );
    assert!(
        adv_rob > plain_rob + 0.1,
        "robust accuracy: adversarial {adv_rob}, plain {plain_rob}"
    );
    assert!(task.accuracy(&adv).unwrap() > 0.8);
}

/// Robust curve fitting keeps the endpoints and lowers the robust loss in the middle of
/// the path below the straight line's.
#[test]
fn robust_curve_fitting_lowers_the_robust_midpoint_loss() {
    let (train_set, test_set) = data::digits().unwrap().split(0.25, 0).unwrap();
    let net = Mlp::new(&[64, 32, 10]).unwrap();
    let cfg = TrainConfig::new(Optimizer::adam(3e-3).unwrap(), 6, 32, 1).unwrap();
    let a = train(&net, &net.init::<ArrayD<f32>>(0), &train_set, &cfg)
        .unwrap()
        .params;
    let b = train(&net, &net.init::<ArrayD<f32>>(1), &train_set, &cfg)
        .unwrap()
        .params;
    let pgd = Pgd::new(Norm::LInf, 0.05, 0.02, 3)
        .unwrap()
        .with_range(0.0, 1.0)
        .unwrap();
    let shuffled = train_set.shuffled(3);
    let mut objective = Classification::new(&net, &shuffled, 64)
        .unwrap()
        .robust(pgd.clone());
    let line = Bezier::new(vec![a.clone(), a.lerp(&b, 0.5).unwrap(), b.clone()]).unwrap();
    let fit_cfg = FitConfig::new(300, Optimizer::adam(1e-2).unwrap())
        .unwrap()
        .with_seed(2);
    let fit = fit_curve_stochastic(&line, &mut objective, &fit_cfg, Silent).unwrap();
    assert_eq!(fit.curve.point(0.0).unwrap(), a);
    assert_eq!(fit.curve.point(1.0).unwrap(), b);
    let robust = Classification::new(&net, &test_set, 128)
        .unwrap()
        .robust(pgd);
    let before = robust.evaluate(&line.point(0.5).unwrap()).unwrap().loss;
    let after = robust
        .evaluate(&fit.curve.point(0.5).unwrap())
        .unwrap()
        .loss;
    assert!(
        after < before,
        "robust midpoint loss: curve {after}, line {before}"
    );
}
