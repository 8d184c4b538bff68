//! The headline of curve fitting on real data: between two MLPs trained from different
//! seeds on the embedded digits, a fitted quadratic Bezier curve has at most a quarter
//! of the straight line's loss barrier (Garipov et al. 2018 report curves whose worst
//! point is within a few tenths of a percent of the endpoints' error).
#![cfg(feature = "nn")]

use modelfusion::barrier::{BarrierConfig, loss_barrier};
use modelfusion::nn::{Classification, Mlp, Network, Optimizer, TrainConfig, data, train};
use modelfusion::path::{Bezier, FitConfig, Linear, LrSchedule, fit_curve_stochastic};
use modelfusion::progress::Silent;
use modelfusion::{Result, StateDictF32};
use ndarray::ArrayD;

#[test]
fn fitted_bezier_cuts_the_digits_barrier() -> Result<()> {
    let (train_set, test_set) = data::digits()?.split(0.2, 0)?;
    let net = Mlp::new(&[64, 32, 32, 10])?;
    let config = |seed| TrainConfig::new(Optimizer::adam(3e-3)?, 25, 32, seed);
    let a = train(&net, &net.init::<ArrayD<f32>>(1), &train_set, &config(11)?)?.params;
    let b = train(&net, &net.init::<ArrayD<f32>>(2), &train_set, &config(12)?)?.params;

    let shuffled = train_set.shuffled(5);
    let batches = Classification::new(&net, &shuffled, 64)?;
    let mut minibatch =
        |m: &StateDictF32, step: usize| batches.minibatch_loss_and_gradient(m, step);
    let cfg = FitConfig::new(1500, Optimizer::adam(1e-2)?)?
        .with_schedule(LrSchedule::Garipov)
        .with_seed(3);
    let curve = Bezier::straight(&a, &b, 3)?;
    let fit = fit_curve_stochastic(&curve, &mut minibatch, &cfg, Silent)?;

    let line = Linear::new(a, b)?;
    let grid = BarrierConfig::default();
    for (what, data) in [("train", &train_set), ("test", &test_set)] {
        let task = Classification::new(&net, data, 512)?;
        let straight = loss_barrier(&line, &task, &grid)?;
        let fitted = loss_barrier(&fit.curve, &task, &grid)?;
        assert!(
            straight.frankle > 0.1,
            "{what}: straight barrier {}",
            straight.frankle
        );
        assert!(
            fitted.frankle <= 0.25 * straight.frankle,
            "{what}: fitted {} vs straight {}",
            fitted.frankle,
            straight.frankle
        );
        let err_straight = loss_barrier(&line, &task.error_rate(), &grid)?;
        let err_fitted = loss_barrier(&fit.curve, &task.error_rate(), &grid)?;
        assert!(
            err_fitted.frankle <= 0.25 * err_straight.frankle,
            "{what} error rate"
        );
    }
    Ok(())
}
