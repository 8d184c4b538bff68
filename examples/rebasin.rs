//! The Git Re-Basin demo: two MLPs trained from different seeds are connected by a
//! straight line in weight space, before and after aligning the second to the first.
//!
//! ```text
//! cargo run --release --example rebasin                     # embedded UCI digits, 3 x 256 MLP
//! cargo run --release --example rebasin -- --fashion-mnist  # Fashion-MNIST, 3 x 512 MLP
//! cargo run --release --example rebasin -- --data DIR       # Fashion-MNIST IDX files in DIR
//! options: --width N  --epochs N  --out FILE.svg (default out/rebasin.svg)  --no-repair
//!          --correlation pearson|cross|gaussian-mi|binned-mi:BINS (activation matching's
//!          similarity, default pearson)
//!          --ste (also STE matching and differentiable Sinkhorn re-basin, both trained
//!          on the training-set loss at the midpoint)
//! ```
//!
//! Prints the test loss and accuracy at 25 points of the linear path for naive, weight
//! matched, activation matched (and REPAIR'd weight matched) interpolation, the loss
//! barrier of each (Frankle: max_t L(t) - (L0 + L1) / 2, on the 25-point grid), and
//! writes an SVG plot of test loss against t.

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Instant;

use modelfusion::align::{
    ActivationMatching, Aligner, Correlation, Endpoints, Identity, Repair, SinkhornRebasin,
    SteMatching, WeightMatching,
};
use modelfusion::barrier::{BarrierConfig, loss_barrier};
use modelfusion::nn::{
    Classification, Dataset, Evaluation, LrSchedule, Mlp, Network, Optimizer, TrainConfig, data,
    train,
};
use modelfusion::path::Linear;
use modelfusion::path::PathSampler;
use modelfusion::perm::specs;
use modelfusion::plot::{Series, plot_curves};
use modelfusion::{Objective, Result, StateDictF32};

const POINTS: usize = 25;
/// Training steps of STE matching and of differentiable re-basin (`--ste`).
const STE_STEPS: usize = 100;
const SINKHORN_STEPS: usize = 100;

struct Args {
    fashion: Option<Option<PathBuf>>,
    width: Option<usize>,
    epochs: Option<usize>,
    out: PathBuf,
    repair: bool,
    correlation: Correlation,
    ste: bool,
}

fn correlation(name: &str) -> std::result::Result<Correlation, String> {
    match name {
        "pearson" => Ok(Correlation::Pearson),
        "cross" => Ok(Correlation::Cross),
        "gaussian-mi" => Ok(Correlation::GaussianInformation),
        _ => name
            .strip_prefix("binned-mi:")
            .and_then(|b| b.parse().ok())
            .map(|bins| Correlation::BinnedInformation { bins })
            .ok_or_else(|| {
                format!(
                    "--correlation `{name}`: expected pearson, cross, gaussian-mi or binned-mi:BINS"
                )
            }),
    }
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut args = Args {
        fashion: None,
        width: None,
        epochs: None,
        out: PathBuf::from("out/rebasin.svg"),
        repair: true,
        correlation: Correlation::Pearson,
        ste: false,
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, flag: &str| -> std::result::Result<usize, String> {
        v.and_then(|s| s.parse().ok())
            .filter(|&n: &usize| n > 0)
            .ok_or_else(|| format!("{flag} needs a positive integer"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--fashion-mnist" => args.fashion = Some(None),
            "--data" => {
                let dir = it.next().ok_or("--data needs a directory")?;
                args.fashion = Some(Some(PathBuf::from(dir)));
            }
            "--width" => args.width = Some(num(it.next(), "--width")?),
            "--epochs" => args.epochs = Some(num(it.next(), "--epochs")?),
            "--out" => args.out = PathBuf::from(it.next().ok_or("--out needs a file")?),
            "--no-repair" => args.repair = false,
            "--ste" => args.ste = true,
            "--correlation" => {
                args.correlation = correlation(&it.next().ok_or("--correlation needs a name")?)?
            }
            "-h" | "--help" => {
                return Err("usage: rebasin [--fashion-mnist | --data DIR] [--width N] [--epochs N] [--out FILE.svg] [--no-repair] [--correlation NAME] [--ste]".into());
            }
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
    }
    Ok(args)
}

/// An objective that records every evaluation (loss and accuracy) in call order.
struct Recording<'a> {
    task: &'a Classification<'a, Mlp>,
    log: RefCell<Vec<Evaluation>>,
}

impl Objective<StateDictF32> for Recording<'_> {
    fn loss(&self, model: &StateDictF32) -> Result<f64> {
        let e = self.task.evaluate(model)?;
        self.log.borrow_mut().push(e);
        Ok(e.loss)
    }
}

/// The linear path whose every point is REPAIR'd (statistics reset to the endpoints').
struct RepairedLine<'a> {
    line: Linear<StateDictF32>,
    repair: &'a Repair<modelfusion::nn::LayerInputs<'a, Mlp>>,
    ends: Endpoints,
}

impl PathSampler<StateDictF32> for RepairedLine<'_> {
    fn controls(&self) -> &[StateDictF32] {
        self.line.controls()
    }
    fn coefficients(&self, t: f64) -> Result<Vec<f64>> {
        self.line.coefficients(t)
    }
    fn point(&self, t: f64) -> Result<StateDictF32> {
        let mid = self.line.point(t)?;
        if t == 0.0 || t == 1.0 {
            return Ok(mid);
        }
        Ok(self.repair.repair_with(&self.ends, &mid, t)?.0)
    }
}

struct Curve {
    name: &'static str,
    evals: Vec<Evaluation>,
    barrier: f64,
    acc_drop: f64,
}

fn run() -> Result<()> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let start = Instant::now();
    let (train_set, test_set, name): (Dataset, Dataset, &str) = match &args.fashion {
        None => {
            let (tr, te) = data::digits()?.split(0.2, 0)?;
            (tr, te, "UCI digits (8x8)")
        }
        Some(dir) => {
            let (tr, te) = data::fashion_mnist(dir.as_deref())?;
            (tr, te, "Fashion-MNIST (28x28)")
        }
    };
    let fashion = args.fashion.is_some();
    let width = args.width.unwrap_or(if fashion { 512 } else { 256 });
    let epochs = args.epochs.unwrap_or(if fashion { 10 } else { 40 });
    let sizes = [
        train_set.num_features(),
        width,
        width,
        width,
        train_set.num_classes(),
    ];
    let net = Mlp::new(&sizes)?;
    let spec = specs::mlp(3);
    println!(
        "data: {name}, {} train / {} test samples; MLP {sizes:?}; {epochs} epochs of Adam per model",
        train_set.len(),
        test_set.len()
    );

    let config = |seed| -> Result<TrainConfig> {
        Ok(TrainConfig::new(Optimizer::adam(1e-3)?, epochs, 128, seed)?
            .with_schedule(LrSchedule::Cosine))
    };
    let a = train(
        &net,
        &net.init::<ndarray::ArrayD<f32>>(1),
        &train_set,
        &config(11)?,
    )?
    .params;
    let b = train(
        &net,
        &net.init::<ndarray::ArrayD<f32>>(2),
        &train_set,
        &config(12)?,
    )?
    .params;
    println!(
        "trained both models in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    let task = Classification::new(&net, &test_set, 1000)?;
    // Activation statistics come from (a subset of) the training set.
    let stats_set = train_set.head(train_set.len().min(10_000));
    let stats_task = Classification::new(&net, &stats_set, 1000)?;

    let t0 = Instant::now();
    let wm = WeightMatching::new(0).align(&a, &b, &spec)?;
    let wm_time = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let am = ActivationMatching::new(stats_task.clone())
        .with_correlation(args.correlation)
        .align(&a, &b, &spec)?;
    let am_time = t0.elapsed().as_secs_f64();
    let naive = Identity.align(&a, &b, &spec)?;
    println!(
        "weight matching: {} sweeps, {:.3} s, objective {:.2} -> {:.2}, units moved {:?}",
        wm.stats().sweeps,
        wm_time,
        wm.stats().objective[0],
        wm.stats().objective.last().copied().unwrap_or(f64::NAN),
        wm.stats().moved
    );
    println!(
        "activation matching ({:?}): {am_time:.3} s, units moved {:?}",
        args.correlation,
        am.stats().moved
    );

    let grid = BarrierConfig::uniform(POINTS)?;
    let ts = grid.grid().to_vec();
    let mut curves = Vec::new();
    let mut eval_path = |label: &'static str, path: &dyn PathSampler<StateDictF32>| -> Result<()> {
        let rec = Recording {
            task: &task,
            log: RefCell::new(Vec::new()),
        };
        let report = loss_barrier(path, &rec, &grid)?;
        let evals = rec.log.into_inner();
        let acc_ends = 0.5 * (evals[0].accuracy + evals[evals.len() - 1].accuracy);
        let acc_min = evals
            .iter()
            .map(|e| e.accuracy)
            .fold(f64::INFINITY, f64::min);
        curves.push(Curve {
            name: label,
            evals,
            barrier: report.frankle,
            acc_drop: acc_ends - acc_min,
        });
        Ok(())
    };
    let b_naive = naive.apply(&spec, &b)?;
    let b_wm = wm.apply(&spec, &b)?;
    let b_am = am.apply(&spec, &b)?;
    eval_path("naive", &Linear::new(a.clone(), b_naive)?)?;
    eval_path("weight matching", &Linear::new(a.clone(), b_wm.clone())?)?;
    eval_path("activation matching", &Linear::new(a.clone(), b_am)?)?;
    let inputs = stats_task.layer_inputs();
    let repair = Repair::new(inputs);
    if args.repair {
        let line = RepairedLine {
            ends: repair.endpoints(&a, &b_wm, &spec)?,
            line: Linear::new(a.clone(), b_wm)?,
            repair: &repair,
        };
        eval_path("weight matching + REPAIR", &line)?;
    }
    if args.ste {
        // Both learn on the training-set loss at the midpoint (full batch).
        let objective = Classification::new(&net, &train_set, 2000)?;
        let t0 = Instant::now();
        let ste = SteMatching::new(objective.clone(), 0)
            .with_steps(STE_STEPS)?
            .with_learning_rate(1e-3)?
            .align(&a, &b, &spec)?;
        println!(
            "STE matching: {STE_STEPS} steps, {:.1} s, training midpoint loss {:.4} -> {:.4}",
            t0.elapsed().as_secs_f64(),
            ste.stats().objective[0],
            ste.stats().objective.last().copied().unwrap_or(f64::NAN)
        );
        let t0 = Instant::now();
        let sinkhorn = SinkhornRebasin::midpoint(objective, 0)
            .with_steps(SINKHORN_STEPS)?
            .align(&a, &b, &spec)?;
        println!(
            "Sinkhorn re-basin: {SINKHORN_STEPS} steps, {:.1} s, soft midpoint loss {:.4} -> {:.4}",
            t0.elapsed().as_secs_f64(),
            sinkhorn.stats().objective[0],
            sinkhorn
                .stats()
                .objective
                .last()
                .copied()
                .unwrap_or(f64::NAN)
        );
        eval_path(
            "STE matching",
            &Linear::new(a.clone(), ste.apply(&spec, &b)?)?,
        )?;
        eval_path(
            "Sinkhorn re-basin",
            &Linear::new(a.clone(), sinkhorn.apply(&spec, &b)?)?,
        )?;
    }

    println!("\ntest loss / accuracy along the linear path from A (t = 0) to B (t = 1):");
    print!("{:>6}", "t");
    for c in &curves {
        print!(" | {:>26}", c.name);
    }
    println!();
    for (i, t) in ts.iter().enumerate() {
        print!("{t:>6.3}");
        for c in &curves {
            let e = c.evals[i];
            print!(" | {:>15.4} {:>9.2}%", e.loss, 100.0 * e.accuracy);
        }
        println!();
    }
    println!(
        "\nloss barrier (max_t L(t) - (L(0) + L(1)) / 2, {POINTS}-point grid) and accuracy drop:"
    );
    let naive_barrier = curves[0].barrier;
    for c in &curves {
        println!(
            "  {:<26} barrier {:>8.4}  ({:>6.1}% of naive)   accuracy drop {:>6.2} points",
            c.name,
            c.barrier,
            100.0 * c.barrier / naive_barrier,
            100.0 * c.acc_drop
        );
    }

    // The numbers docs/rebasin.md quotes (tests/nn/doc_numbers.rs compares them).
    let (naive_curve, wm_curve) = (&curves[0].evals, &curves[1].evals);
    let mid = POINTS / 2;
    println!(
        "\nendpoints: test loss {:.4} / {:.4}, accuracy {:.1} % / {:.1} %; naive midpoint: loss \
         {:.3}, accuracy {:.1} %; weight-matched midpoint: loss {:.3}, accuracy {:.1} %",
        naive_curve[0].loss,
        naive_curve[POINTS - 1].loss,
        100.0 * naive_curve[0].accuracy,
        100.0 * naive_curve[POINTS - 1].accuracy,
        naive_curve[mid].loss,
        100.0 * naive_curve[mid].accuracy,
        wm_curve[mid].loss,
        100.0 * wm_curve[mid].accuracy,
    );

    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| modelfusion::Error::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
    }
    let series: Vec<Series> = curves
        .iter()
        .map(|c| {
            Series::new(
                c.name,
                ts.iter().zip(&c.evals).map(|(&t, e)| (t, e.loss)).collect(),
            )
        })
        .collect();
    plot_curves(
        &args.out,
        &format!("Test loss along the linear path ({name}, MLP {width}x3)"),
        "t",
        "test loss",
        &series,
    )?;
    println!(
        "\nwrote {} ; total {:.1} s",
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
