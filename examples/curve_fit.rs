//! Mode connectivity on the embedded digits: train two reference MLPs from different
//! seeds, fit a quadratic Bezier curve between them (Garipov et al. 2018; no alignment),
//! and compare the barriers of the straight line and of the fitted curve.
//!
//! ```text
//! cargo run --release --example curve_fit                 # prints the barriers
//! cargo run --release --example curve_fit -- curve.svg    # and plots the test loss
//! cargo run --release --example curve_fit -- curve.svg plane.svg
//!     # and the test loss on the plane through both endpoints and the curve's bend
//! ```

use std::time::Instant;

use modelfusion::barrier::{BarrierConfig, BarrierReport, loss_barrier};
use modelfusion::nn::{Classification, Mlp, Network, TrainConfig, data, train};
use modelfusion::path::{
    Bezier, FitConfig, Linear, LrSchedule, Optimizer, PathSampler, fit_curve_stochastic,
};
use modelfusion::progress::{Progress, from_fn};
use modelfusion::{Result, StateDictF32};

/// Steps of curve training (minibatches of 64: about 130 passes over the training set).
const CURVE_STEPS: usize = 3000;

fn main() -> Result<()> {
    let (train_set, test_set) = data::digits()?.split(0.2, 0)?;
    let sizes = [64, 128, 128, 10];
    let net = Mlp::new(&sizes)?;
    println!(
        "digits: {} training / {} test samples; MLP {sizes:?}",
        train_set.len(),
        test_set.len()
    );

    // The two endpoints: the reference MLPs of `train_mlp`, seeds 0 and 1.
    let start = Instant::now();
    let mut ends = Vec::new();
    for seed in [0u64, 1] {
        let config = TrainConfig::new(Optimizer::adam(1e-3)?, 20, 32, seed)?;
        let init: StateDictF32 = net.init(seed);
        ends.push(train(&net, &init, &train_set, &config)?.params);
    }
    let (a, b) = (ends.remove(0), ends.remove(0));
    println!("trained both endpoints in {:.1?}", start.elapsed());

    // Curve training on minibatches of a shuffled training set: step s uses batch
    // s mod (number of batches).
    let shuffled = train_set.shuffled(7);
    let batches = Classification::new(&net, &shuffled, 64)?;
    let mut minibatch =
        |m: &StateDictF32, step: usize| batches.minibatch_loss_and_gradient(m, step);
    let curve = Bezier::straight(&a, &b, 3)?;
    let config = FitConfig::new(CURVE_STEPS, Optimizer::adam(1e-2)?)?
        .with_schedule(LrSchedule::Garipov)
        .with_seed(3);
    let start = Instant::now();
    let mut running = 0.0;
    let fit = fit_curve_stochastic(
        &curve,
        &mut minibatch,
        &config,
        from_fn(|p| {
            let Progress::Step { step, loss, .. } = *p else {
                return;
            };
            running = if step == 0 {
                loss
            } else {
                0.98 * running + 0.02 * loss
            };
            if (step + 1) % 500 == 0 {
                println!(
                    "  step {:>4}: running training loss along the curve {running:.4}",
                    step + 1
                );
            }
        }),
    )?;
    println!(
        "fitted the curve ({CURVE_STEPS} steps) in {:.1?}\n",
        start.elapsed()
    );

    // Barriers on a 25-point grid, refined around each maximum.
    let grid = BarrierConfig::default().with_refinement(8);
    let train_task = Classification::new(&net, &train_set, 512)?;
    let test_task = Classification::new(&net, &test_set, 512)?;
    let line = Linear::new(a, b)?;
    let paths: [(&str, &dyn PathSampler<StateDictF32>); 2] =
        [("straight line", &line), ("Bezier curve", &fit.curve)];
    println!(
        "{:<14} {:>26} {:>26} {:>26}",
        "barrier", "train loss", "test loss", "test error"
    );
    println!(
        "{:<14} {:>26} {:>26} {:>26}",
        "", "Frankle / interp. (max)", "Frankle / interp. (max)", "Frankle / interp. (max)"
    );
    let mut reports = Vec::new();
    for (name, path) in paths {
        let row = [
            loss_barrier(path, &train_task, &grid)?,
            loss_barrier(path, &test_task, &grid)?,
            loss_barrier(path, &test_task.error_rate(), &grid)?,
        ];
        println!(
            "{name:<14} {} {} {}",
            cell(&row[0]),
            cell(&row[1]),
            cell(&row[2])
        );
        reports.push(row);
    }
    let ratio = |i: usize| reports[1][i].frankle / reports[0][i].frankle;
    println!(
        "\nfitted / straight (Frankle): train loss {:.3}, test loss {:.3}, test error {:.3}",
        ratio(0),
        ratio(1),
        ratio(2)
    );

    #[cfg(feature = "plot")]
    if let Some(file) = std::env::args().nth(1) {
        use modelfusion::plot::{LinePlot, Series};
        LinePlot::new("Test loss between two independently trained MLPs (digits)")
            .with_labels("t", "test loss")
            .with_series(Series::from_report("straight line", &reports[0][1]))
            .with_series(Series::from_report("fitted Bezier curve", &reports[1][1]))
            .write_svg(&file)?;
        println!("wrote {file}");
    }
    #[cfg(feature = "plot")]
    if let Some(file) = std::env::args().nth(2) {
        plane(&fit.curve, &test_task, &file)?;
    }
    Ok(())
}

/// The test loss on a 25 x 25 grid of the plane through the endpoints and the fitted
/// bend (Garipov et al.'s figure), printed at the three models and plotted.
#[cfg(feature = "plot")]
fn plane(curve: &Bezier<StateDictF32>, task: &Classification<'_, Mlp>, file: &str) -> Result<()> {
    use modelfusion::Objective;
    use modelfusion::path::{Plane, loss_surface};
    use modelfusion::plot::SurfacePlot;
    let c = curve.controls();
    let plane = Plane::through(&c[0], &c[2], &c[1])?;
    let (xs, ys) = plane.grid(25, 0.2)?;
    let start = Instant::now();
    let surface = loss_surface(&plane, task, &xs, &ys)?;
    let midpoint = task.loss(&curve.point(0.5)?)?;
    println!(
        "
loss plane through A, B and the bend: {} points in {:.1?}; test loss min {:.4}, max {:.4}; \
         curve midpoint {midpoint:.4}",
        xs.len() * ys.len(),
        start.elapsed(),
        surface.values.iter().cloned().fold(f64::INFINITY, f64::min),
        surface
            .values
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max),
    );
    SurfacePlot::new(
        "Test loss on the plane through A, B and the Bezier bend (digits)",
        surface,
    )
    .with_names(["A", "B", "bend"])
    .write_svg(file)?;
    println!("wrote {file}");
    Ok(())
}

/// `Frankle / interpolated (largest value on the path)`.
fn cell(r: &BarrierReport) -> String {
    format!(
        "{:>8.4} / {:>7.4} ({:.4})",
        r.frankle,
        r.interpolated,
        r.max_value()
    )
}
