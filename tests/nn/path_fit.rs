//! Curve fitting: analytic gradients against finite differences, convergence on a
//! non-convex valley, determinism, early stopping, and bad input.

use crate::path_common as common;

use std::ops::ControlFlow;

use common::{Ring, bits_equal, model, vector};
use modelfusion::barrier::{BarrierConfig, loss_barrier};
use modelfusion::path::{
    BendInit, Bezier, ControlCurve, FitConfig, Linear, LrSchedule, Optimizer, PathSampler,
    PolyChain, curve_loss_and_gradients, fit_curve, fit_curve_stochastic,
};
use modelfusion::progress::{Progress, Silent, from_fn};
use modelfusion::{Error, Gradient, Model, Objective, Result, StateDictF64};

/// Central finite differences of the curve objective with respect to every element of
/// every control, against `c_k(t) * (grad L + wd * phi)`.
fn check_gradients<C: ControlCurve<StateDictF64>>(curve: &C, t: f64, wd: f64) {
    let ring = Ring { c: 0.4, s: 0.7 };
    let mut obj = |m: &StateDictF64, _| ring.loss_and_gradient(m);
    let (total, loss, grads) = curve_loss_and_gradients(curve, t, &mut obj, 0, wd).unwrap();
    let point = curve.point(t).unwrap();
    assert!((loss - ring.loss(&point).unwrap()).abs() < 1e-14);
    assert!((total - loss - 0.5 * wd * point.norm().powi(2)).abs() < 1e-12);
    let controls = curve.controls().to_vec();
    let h = 1e-6;
    let mut checked = 0;
    for (k, gk) in grads.iter().enumerate() {
        for name in ["w", "m"] {
            for i in 0..controls[k].get(name).unwrap().len() {
                let eval = |delta: f64| {
                    let mut c = controls.clone();
                    c[k].get_mut(name).unwrap().as_slice_mut().unwrap()[i] += delta;
                    let moved = curve.with_controls(c).unwrap();
                    let mut obj = |m: &StateDictF64, _| ring.loss_and_gradient(m);
                    curve_loss_and_gradients(&moved, t, &mut obj, 0, wd)
                        .unwrap()
                        .0
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h);
                let an = gk.get(name).unwrap().as_slice().unwrap()[i];
                assert!(
                    (fd - an).abs() <= 1e-6 * (1.0 + an.abs()),
                    "control {k} `{name}`[{i}] at t={t}: finite difference {fd} vs analytic {an}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, controls.len() * 7);
}

#[test]
fn gradients_match_finite_differences() {
    let c = vec![
        model(&[-1.0, 0.0, 0.3], [0.1, -0.2, 0.3, 0.4]),
        model(&[-0.4, 0.9, -0.5], [0.5, 0.2, -0.3, 0.0]),
        model(&[0.6, -0.2, 0.2], [-0.1, 0.7, 0.3, 0.2]),
        model(&[1.0, 0.0, 1.1], [0.2, 0.2, -0.6, 0.1]),
    ];
    for &t in &[0.0, 0.13, 0.5, 0.77, 1.0] {
        for wd in [0.0, 0.3] {
            check_gradients(&Bezier::new(c.clone()).unwrap(), t, wd);
            check_gradients(&PolyChain::new(c.clone()).unwrap(), t, wd);
            check_gradients(&Linear::new(c[0].clone(), c[3].clone()).unwrap(), t, wd);
        }
    }
}

/// The ring valley centred at (0, 0.5): the straight line from (-1, 0) to (1, 0) cuts
/// through the inside; a fitted quadratic Bezier curve follows the ring.
fn ring_setup() -> (Ring, StateDictF64, StateDictF64) {
    (
        Ring { c: 0.5, s: 1.0 },
        vector(&[-1.0, 0.0]),
        vector(&[1.0, 0.0]),
    )
}

#[test]
fn fitted_curves_cut_the_barrier() {
    let (ring, a, b) = ring_setup();
    let line = Linear::new(a.clone(), b.clone()).unwrap();
    let grid = BarrierConfig::uniform(61).unwrap();
    let straight = loss_barrier(&line, &ring, &grid).unwrap();
    assert!((straight.frankle - 1.0).abs() < 1e-12, "{straight:?}");
    for (curve_n, opt) in [
        (3, Optimizer::sgd(0.01, 0.9).unwrap()),
        (3, Optimizer::adam(0.02).unwrap()),
    ] {
        let curve = Bezier::straight(&a, &b, curve_n).unwrap();
        let cfg = FitConfig::new(1500, opt)
            .unwrap()
            .with_schedule(LrSchedule::Garipov)
            .with_seed(3);
        let fit = fit_curve(&curve, &ring, &cfg, Silent).unwrap();
        let fitted = loss_barrier(&fit.curve, &ring, &grid).unwrap();
        eprintln!(
            "{opt:?}: barrier {} -> {}",
            straight.frankle, fitted.frankle
        );
        assert!(
            fitted.frankle <= 0.25 * straight.frankle,
            "{opt:?}: fitted {} vs straight {}",
            fitted.frankle,
            straight.frankle
        );
        // The endpoints never move.
        assert!(bits_equal(&fit.curve.controls()[0], &a));
        assert!(bits_equal(&fit.curve.controls()[2], &b));
        assert_eq!(fit.history.len(), 1500);
        assert!(!fit.stopped_early);
    }
    // A polygonal chain with three bends does it too.
    let chain = PolyChain::straight(&a, &b, 5).unwrap();
    let cfg = FitConfig::new(2000, Optimizer::adam(0.02).unwrap())
        .unwrap()
        .with_seed(4);
    let fit = fit_curve(&chain, &ring, &cfg, Silent).unwrap();
    let fitted = loss_barrier(&fit.curve, &ring, &grid).unwrap();
    eprintln!(
        "PolyChain(5): barrier {} -> {}",
        straight.frankle, fitted.frankle
    );
    assert!(
        fitted.frankle <= 0.25 * straight.frankle,
        "{}",
        fitted.frankle
    );
}

#[test]
fn fitting_is_deterministic_in_the_seed() {
    let (ring, a, b) = ring_setup();
    let curve = Bezier::straight(&a, &b, 4).unwrap();
    let run = |seed| {
        let cfg = FitConfig::new(50, Optimizer::sgd(0.01, 0.5).unwrap())
            .unwrap()
            .with_seed(seed);
        fit_curve(&curve, &ring, &cfg, Silent).unwrap()
    };
    let (x, y, z) = (run(1), run(1), run(2));
    assert_eq!(x.history, y.history);
    assert!(bits_equal(&x.curve.controls()[1], &y.curve.controls()[1]));
    assert_ne!(x.history[0].t, z.history[0].t);
    // t is uniform on [0, 1): its mean over many steps is near 1/2.
    let cfg = FitConfig::new(4000, Optimizer::sgd(1e-6, 0.0).unwrap()).unwrap();
    let long = fit_curve(&curve, &ring, &cfg, Silent).unwrap();
    let mean = long.history.iter().map(|s| s.t).sum::<f64>() / 4000.0;
    assert!((mean - 0.5).abs() < 0.02, "{mean}");
    assert!(long.history.iter().all(|s| (0.0..1.0).contains(&s.t)));
}

#[test]
fn weight_decay_and_given_init() {
    let (ring, a, b) = ring_setup();
    // With a bend given far away and no training signal from the loss (zero-loss
    // objective), weight decay alone pulls the bend towards the origin.
    let far = vector(&[0.0, 10.0]);
    let curve = Bezier::new(vec![a.clone(), far.clone(), b.clone()]).unwrap();
    let zero = |m: &StateDictF64, _: usize| Ok((0.0, m.scale(0.0)?));
    let cfg = FitConfig::new(200, Optimizer::sgd(0.1, 0.0).unwrap())
        .unwrap()
        .with_init(BendInit::Given)
        .with_weight_decay(1.0)
        .unwrap();
    let fit = fit_curve_stochastic(&curve, &mut { zero }, &cfg, Silent).unwrap();
    let bend = fit.curve.controls()[1].get("w").unwrap()[[1]];
    assert!(bend < 5.0, "{bend}");
    // Without weight decay it does not move at all.
    let cfg = FitConfig::new(200, Optimizer::sgd(0.1, 0.0).unwrap())
        .unwrap()
        .with_init(BendInit::Given);
    let fit = fit_curve_stochastic(&curve, &mut { zero }, &cfg, Silent).unwrap();
    assert!(bits_equal(&fit.curve.controls()[1], &far));
    // StraightLine (the default) ignores the given bend.
    let cfg = FitConfig::new(1, Optimizer::sgd(1e-9, 0.0).unwrap()).unwrap();
    let fit = fit_curve(&curve, &ring, &cfg, Silent).unwrap();
    assert!(fit.curve.controls()[1].get("w").unwrap()[[1]].abs() < 1e-6);
}

#[test]
fn progress_sees_every_step_and_can_stop() {
    let (ring, a, b) = ring_setup();
    let curve = Bezier::straight(&a, &b, 3).unwrap();
    let cfg = FitConfig::new(100, Optimizer::adam(0.01).unwrap()).unwrap();
    let mut seen = Vec::new();
    let fit = fit_curve(
        &curve,
        &ring,
        &cfg,
        from_fn(|p| {
            let Progress::Step {
                step,
                total,
                t,
                loss,
            } = *p
            else {
                panic!("not a fitting step: {p:?}");
            };
            assert_eq!(total, 100);
            seen.push((step, t, loss));
            if step == 9 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }),
    )
    .unwrap();
    assert!(fit.stopped_early);
    assert_eq!(seen.len(), 10);
    assert_eq!(
        seen.iter().map(|s| s.0).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    for (s, h) in seen.iter().zip(&fit.history) {
        assert_eq!((s.0, s.1, s.2), (h.step, h.t, h.loss));
    }
    // The reported loss is the objective at phi(t) before the update.
    let (s0, t0, l0) = seen[0];
    assert_eq!(s0, 0);
    let phi = Bezier::straight(&a, &b, 3).unwrap().point(t0).unwrap();
    assert!((ring.loss(&phi).unwrap() - l0).abs() < 1e-12);
    // Breaking at the last step is not an early stop.
    let cfg = FitConfig::new(5, Optimizer::adam(0.01).unwrap()).unwrap();
    let fit = fit_curve(&curve, &ring, &cfg, from_fn(|_| ControlFlow::Break(()))).unwrap();
    assert!(fit.stopped_early && fit.history.len() == 1);
    let fit = fit_curve(
        &curve,
        &ring,
        &FitConfig::new(1, Optimizer::adam(0.01).unwrap()).unwrap(),
        from_fn(|_| ControlFlow::Break(())),
    )
    .unwrap();
    assert!(!fit.stopped_early);
}

/// Minibatch training: a logistic regression whose data set is split in batches, the
/// batch chosen by the step number.
#[test]
fn stochastic_objective_gets_the_step() {
    // Points on a line, labels by sign; the model is w (2 weights: slope and bias).
    let xs: Vec<f64> = (0..40).map(|i| i as f64 / 10.0 - 2.0).collect();
    let ys: Vec<f64> = xs
        .iter()
        .map(|&x| if x > 0.0 { 1.0 } else { 0.0 })
        .collect();
    let batch_loss = |m: &StateDictF64, batch: usize| -> Result<(f64, StateDictF64)> {
        let w = m.require("w", "model")?;
        let (mut loss, mut g0, mut g1) = (0.0, 0.0, 0.0);
        let idx: Vec<usize> = (batch * 10..batch * 10 + 10).collect();
        for &i in &idx {
            let z = w[[0]] * xs[i] + w[[1]];
            let p = 1.0 / (1.0 + (-z).exp());
            loss -= ys[i] * p.max(1e-300).ln() + (1.0 - ys[i]) * (1.0 - p).max(1e-300).ln();
            g0 += (p - ys[i]) * xs[i];
            g1 += p - ys[i];
        }
        let n = idx.len() as f64;
        Ok((loss / n, vector(&[g0 / n, g1 / n])))
    };
    let mut steps = Vec::new();
    let mut stoch = |m: &StateDictF64, step: usize| {
        steps.push(step);
        batch_loss(m, step % 4)
    };
    let curve = Bezier::straight(&vector(&[3.0, 0.0]), &vector(&[1.0, 0.5]), 3).unwrap();
    let cfg = FitConfig::new(40, Optimizer::sgd(0.05, 0.9).unwrap()).unwrap();
    let fit = fit_curve_stochastic(&curve, &mut stoch, &cfg, Silent).unwrap();
    assert_eq!(steps, (0..40).collect::<Vec<_>>());
    assert_eq!(fit.history.len(), 40);
}

// ---- bad input ----

#[test]
fn bad_configs_are_rejected() {
    let adam = Optimizer::adam(0.1).unwrap();
    let e = FitConfig::new(0, adam).unwrap_err().to_string();
    assert!(e.contains("steps"), "{e}");
    for wd in [-0.1, f64::NAN, f64::INFINITY] {
        let e = FitConfig::new(1, adam)
            .unwrap()
            .with_weight_decay(wd)
            .unwrap_err();
        assert!(e.to_string().contains("weight_decay"), "{e}");
    }
    let bad = Optimizer::Sgd {
        lr: -1.0,
        momentum: 0.0,
        nesterov: false,
    };
    assert!(
        FitConfig::new(1, bad)
            .unwrap_err()
            .to_string()
            .contains("lr")
    );
    for (lr, mom) in [(0.0, 0.0), (f64::NAN, 0.0), (0.1, -0.1), (0.1, 1.0)] {
        assert!(Optimizer::sgd(lr, mom).is_err(), "{lr} {mom}");
    }
    let bad = Optimizer::Adam {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        eps: 0.0,
    };
    assert!(bad.validate().unwrap_err().to_string().contains("eps"));
}

#[test]
fn nothing_to_train_is_rejected() {
    let (ring, a, b) = ring_setup();
    let cfg = FitConfig::new(5, Optimizer::adam(0.1).unwrap()).unwrap();
    let e = fit_curve(
        &Linear::new(a.clone(), b.clone()).unwrap(),
        &ring,
        &cfg,
        Silent,
    )
    .unwrap_err();
    assert!(e.to_string().contains("inner control"), "{e}");
    let e = fit_curve(&Bezier::new(vec![a, b]).unwrap(), &ring, &cfg, Silent).unwrap_err();
    assert!(matches!(e, Error::InvalidParameter { .. }), "{e}");
}

#[test]
fn non_finite_losses_and_gradients_are_reported() {
    let (_, a, b) = ring_setup();
    let curve = Bezier::straight(&a, &b, 3).unwrap();
    let cfg = FitConfig::new(5, Optimizer::adam(0.1).unwrap()).unwrap();
    let mut nan_loss = |m: &StateDictF64, _: usize| Ok((f64::NAN, m.clone()));
    let e = fit_curve_stochastic(&curve, &mut nan_loss, &cfg, Silent).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    assert!(
        e.to_string().contains("t = ") && e.to_string().contains("step 0"),
        "{e}"
    );
    // (`scale` refuses a non-finite alpha, so the infinite gradient is built directly)
    let mut inf_grad = |m: &StateDictF64, _: usize| {
        Ok((1.0, m.try_map(|_, t| Ok(t.mapv(|x| x * f64::INFINITY)))?))
    };
    let e = fit_curve_stochastic(&curve, &mut inf_grad, &cfg, Silent).unwrap_err();
    assert!(
        e.to_string().contains("gradient") && e.to_string().contains("`w`"),
        "{e}"
    );
    let mut wrong = |_: &StateDictF64, _: usize| Ok((1.0, vector(&[1.0, 2.0, 3.0])));
    let e = fit_curve_stochastic(&curve, &mut wrong, &cfg, Silent).unwrap_err();
    assert!(e.to_string().contains("gradient"), "{e}");
    // An objective's own error passes through unchanged.
    let mut failing = |_: &StateDictF64, _: usize| -> Result<(f64, StateDictF64)> {
        Err(Error::Objective("data loader broke".into()))
    };
    let e = fit_curve_stochastic(&curve, &mut failing, &cfg, Silent).unwrap_err();
    assert!(e.to_string().contains("data loader broke"));
}

#[test]
fn frozen_parameters_stay_put() {
    let ring = Ring { c: 0.5, s: 1.0 };
    let a = model(&[-1.0, 0.0, 0.2], [1.0, 2.0, 3.0, 4.0]);
    let b = model(&[1.0, 0.0, -0.2], [-1.0, 0.5, 0.0, 2.0]);
    let curve = Bezier::straight(&a, &b, 3).unwrap();
    let cfg = FitConfig::new(100, Optimizer::sgd(0.01, 0.9).unwrap())
        .unwrap()
        .with_weight_decay(0.1)
        .unwrap()
        .with_frozen(["m"]);
    let fit = fit_curve(&curve, &ring, &cfg, Silent).unwrap();
    let (before, after) = (&curve.controls()[1], &fit.curve.controls()[1]);
    let bits = |m: &StateDictF64, n: &str| {
        m.get(n)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(before, "m"), bits(after, "m"));
    assert_ne!(bits(before, "w"), bits(after, "w"));
    // Without freezing, `m` moves (the ring objective and weight decay both pull on it).
    let cfg = FitConfig::new(100, Optimizer::sgd(0.01, 0.9).unwrap()).unwrap();
    let fit = fit_curve(&curve, &ring, &cfg, Silent).unwrap();
    assert_ne!(bits(before, "m"), bits(&fit.curve.controls()[1], "m"));
    // Unknown names are rejected before any work.
    let cfg = FitConfig::new(1, Optimizer::adam(0.1).unwrap())
        .unwrap()
        .with_frozen(["bn.running_var"]);
    let e = fit_curve(&curve, &ring, &cfg, Silent).unwrap_err();
    assert!(
        matches!(e, Error::MissingParam { .. }) && e.to_string().contains("bn.running_var"),
        "{e}"
    );
}
