//! Robustness and model fusion on the embedded digits (results in docs/connectivity.md
//! and docs/averaging.md):
//!
//! 1. **Robust mode connectivity**: two MLPs from different seeds; a quadratic Bezier
//!    curve fitted on clean minibatches (plain curve) and one fitted on PGD minibatches
//!    crafted against each curve point (robust curve, the RMC objective); clean and
//!    robust barriers of the line and both curves.
//! 2. **Batch-norm statistics along a path**: the line between two residual MLPs with
//!    batch norm, evaluated with the interpolated running statistics and with fresh ones
//!    recomputed on training data at every point.
//! 3. **Adversarially-robust soup**: a clean-trained and an adversarially trained MLP from
//!    one initialisation, interpolated; clean and robust accuracy of every soup weight.
//!
//! ```text
//! cargo run --release --example robust
//! ```

use std::time::Instant;

use modelfusion::barrier::{BarrierConfig, BarrierReport, loss_barrier};
use modelfusion::merge::RobustSoup;
use modelfusion::nn::{
    Classification, Mlp, Network, Norm, Optimizer, Pgd, ResMlp, TrainConfig, data, train,
};
use modelfusion::path::{Bezier, FitConfig, Linear, LrSchedule, fit_curve_stochastic};
use modelfusion::progress::Silent;
use modelfusion::{Objective, Result, StateDictF32};

/// The threat model: L-inf radius 0.1 on inputs in [0, 1] (1.6 of the 16 grey levels).
const EPS: f64 = 0.1;
/// Curve-fitting steps (minibatches of 64).
const CURVE_STEPS: usize = 1500;

fn main() -> Result<()> {
    let (train_set, test_set) = data::digits()?.split(0.2, 0)?;
    println!(
        "digits: {} training / {} test samples; L-inf eps {EPS}",
        train_set.len(),
        test_set.len()
    );
    // Training attack: PGD-5 with random start; evaluation attack: PGD-20.
    let train_attack = Pgd::new(Norm::LInf, EPS, EPS / 4.0, 5)?
        .with_random_start(true)
        .with_seed(11)
        .with_range(0.0, 1.0)?;
    let eval_attack = Pgd::new(Norm::LInf, EPS, EPS / 8.0, 20)?
        .with_random_start(true)
        .with_seed(12)
        .with_range(0.0, 1.0)?;

    // 1. Robust mode connectivity.
    let net = Mlp::new(&[64, 64, 10])?;
    let start = Instant::now();
    let mut ends = Vec::new();
    for seed in [0u64, 1] {
        let config = TrainConfig::new(Optimizer::adam(1e-3)?, 20, 32, seed)?;
        ends.push(
            train(
                &net,
                &net.init::<ndarray::ArrayD<f32>>(seed),
                &train_set,
                &config,
            )?
            .params,
        );
    }
    let (a, b) = (ends.remove(0), ends.remove(0));
    println!("\n## 1. Robust mode connectivity (MLP [64, 64, 10])\n");
    println!("trained both endpoints in {:.1?}", start.elapsed());
    let shuffled = train_set.shuffled(7);
    let batches = Classification::new(&net, &shuffled, 64)?;
    let fit_config = FitConfig::new(CURVE_STEPS, Optimizer::adam(1e-2)?)?
        .with_schedule(LrSchedule::Garipov)
        .with_seed(3);
    let straight = Bezier::straight(&a, &b, 3)?;
    let start = Instant::now();
    let mut clean_batches = |m: &StateDictF32, s: usize| batches.minibatch_loss_and_gradient(m, s);
    let plain = fit_curve_stochastic(&straight, &mut clean_batches, &fit_config, Silent)?.curve;
    println!(
        "plain curve: {CURVE_STEPS} steps in {:.1?}",
        start.elapsed()
    );
    let start = Instant::now();
    let mut robust_batches = batches.robust(train_attack.clone());
    let robust = fit_curve_stochastic(&straight, &mut robust_batches, &fit_config, Silent)?.curve;
    println!(
        "robust curve (PGD-5 inside the loss): {CURVE_STEPS} steps in {:.1?}",
        start.elapsed()
    );

    let test = Classification::new(&net, &test_set, 256)?;
    let attacked = test.robust(eval_attack.clone());
    let grid = BarrierConfig::uniform(11)?;
    let line = Linear::new(a.clone(), b.clone())?;
    println!(
        "\n| path | clean loss barrier | clean error barrier | robust loss barrier | robust error barrier | robust error at t = 0.5 |"
    );
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, reports: [BarrierReport; 4]| {
        let mid = reports[3].curve[5].1;
        println!(
            "| {name} | {:.3} | {:.2}% | {:.3} | {:.2}% | {:.2}% |",
            reports[0].frankle,
            100.0 * reports[1].frankle,
            reports[2].frankle,
            100.0 * reports[3].frankle,
            100.0 * mid
        );
    };
    row(
        "line",
        [
            loss_barrier(&line, &test, &grid)?,
            loss_barrier(&line, &test.error_rate(), &grid)?,
            loss_barrier(&line, &attacked, &grid)?,
            loss_barrier(&line, &attacked.error_rate(), &grid)?,
        ],
    );
    for (name, curve) in [("plain curve", &plain), ("robust curve", &robust)] {
        row(
            name,
            [
                loss_barrier(curve, &test, &grid)?,
                loss_barrier(curve, &test.error_rate(), &grid)?,
                loss_barrier(curve, &attacked, &grid)?,
                loss_barrier(curve, &attacked.error_rate(), &grid)?,
            ],
        );
    }
    println!(
        "endpoints: clean error {:.2}% / {:.2}%, robust error {:.2}% / {:.2}%",
        100.0 * test.error_rate().loss(&a)?,
        100.0 * test.error_rate().loss(&b)?,
        100.0 * attacked.error_rate().loss(&a)?,
        100.0 * attacked.error_rate().loss(&b)?
    );

    // 2. Batch-norm statistics along a path.
    let res = ResMlp::new(64, 64, 64, 2, 10)?;
    let mut res_ends = Vec::new();
    for seed in [0u64, 1] {
        let config = TrainConfig::new(Optimizer::adam(1e-3)?, 10, 32, seed)?;
        res_ends.push(
            train(
                &res,
                &res.init::<ndarray::ArrayD<f32>>(seed),
                &train_set,
                &config,
            )?
            .params,
        );
    }
    let res_line = Linear::new(res_ends[0].clone(), res_ends[1].clone())?;
    let stale = Classification::new(&res, &test_set, 256)?;
    let fresh = stale.clone().with_reset_stats(&train_set)?;
    println!("\n## 2. Batch-norm statistics along the line (ResMlp, width 64, 2 blocks)\n");
    println!("| statistics | loss barrier | error barrier | loss at t = 0.5 | error at t = 0.5 |");
    println!("|---|---|---|---|---|");
    for (name, task) in [
        ("interpolated", &stale),
        ("recomputed at every point", &fresh),
    ] {
        let loss = loss_barrier(&res_line, task, &grid)?;
        let err = loss_barrier(&res_line, &task.error_rate(), &grid)?;
        println!(
            "| {name} | {:.3} | {:.2}% | {:.3} | {:.2}% |",
            loss.frankle,
            100.0 * err.frankle,
            loss.curve[5].1,
            100.0 * err.curve[5].1
        );
    }

    // 3. The adversarially-robust soup.
    let init: StateDictF32 = net.init(5);
    let start = Instant::now();
    let clean_cfg = TrainConfig::new(Optimizer::adam(1e-3)?, 20, 32, 5)?;
    let clean_model = train(&net, &init, &train_set, &clean_cfg)?.params;
    let adv_cfg = clean_cfg.clone().with_attack(train_attack);
    let robust_model = train(&net, &init, &train_set, &adv_cfg)?.params;
    println!("\n## 3. Adversarially-robust soup (shared init, clean vs PGD-5 training)\n");
    println!("trained both ingredients in {:.1?}", start.elapsed());
    let report = RobustSoup::new(test.error_rate(), attacked.error_rate())
        .with_trade_off(0.5)?
        .cook(&clean_model, &robust_model)?;
    println!("| robust weight | clean accuracy | robust accuracy |");
    println!("|---|---|---|");
    for p in &report.points {
        println!(
            "| {:.1} | {:.2}% | {:.2}% |",
            p.weight,
            100.0 * (1.0 - p.clean),
            100.0 * (1.0 - p.robust)
        );
    }
    println!(
        "chosen weight (trade-off 0.5, on the test split): {:.1}",
        report.weight
    );
    Ok(())
}
