//! REPAIR on real conv nets (Jordan et al. 2022), trained with candle on Fashion-MNIST.
//!
//! ```text
//! cargo run --release --features candle --example repair_cnn
//! options: --train N (5000)  --test N (2000)  --epochs N (3)  --stats N (1000)  --resnet-width W (1)
//!          --resnet-base C (16: ResNet-20's first-stage channels; stages C, 2C, 4C, times W)
//!          --vgg-width W (1: VGG-11 channels / 8)  --vgg-hidden N (0: hidden linear layers of
//!          512 / 8 x W, without batch norm, before the classifier; 0 is the REPAIR paper's
//!          CIFAR VGG, 2 torchvision's head)  --only resnet20|vgg11  --out DIR (out/repair_cnn)
//!          --optimizer adamw|sgd (adamw: 2e-3 down to 0; sgd: Nesterov momentum 0.9, weight
//!          decay 5e-4, learning rate 0 -> 0.05 over the first fifth of the steps, then to 0)
//! ```
//!
//! For ResNet-20 (BatchNorm) and VGG-11 (BatchNorm): two networks from different seeds
//! trained on the first `--train` images, then the test loss and accuracy along the
//! linear path between them for naive, weight-matched (WM), activation-matched (AM),
//! WM + batch-norm statistics reset (`BnReset`, torch's `update_bn`) and WM + REPAIR
//! (`OutputRepair` on every batch norm, with the residual-stream treatment, after the
//! reset) interpolation; the barrier of each (Frankle: max_t L(t) - (L0 + L1) / 2 on an
//! 11-point grid), and an SVG plot per architecture. Everything is seeded.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use modelfusion::align::{
    ActivationMatching, Aligner, BnReset, Correlation, OutputRepair, WeightMatching,
};
use modelfusion::barrier::BarrierReport;
use modelfusion::candle::candle_core::{DType, Device, Tensor};
use modelfusion::candle::candle_nn::{self, Optimizer, VarBuilder};
use modelfusion::candle::{
    CandleResNet, CandleVgg, Taps, candle_core, to_state_dict_from_varmap, to_varmap,
};
use modelfusion::nn::{Dataset, data};
use modelfusion::perm::specs::{Architecture, ResNet, Vgg};
use modelfusion::perm::{PermutationSet, PermutationSpec};
use modelfusion::plot::{Series, plot_curves};
use modelfusion::{Activations, Model, Result, StateDictF32};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

const POINTS: usize = 11;
const BATCH: usize = 100;

struct Args {
    train: usize,
    test: usize,
    epochs: usize,
    stats: usize,
    resnet_width: usize,
    resnet_base: usize,
    vgg_width: usize,
    vgg_hidden: usize,
    optimizer: Opt,
    only: Option<String>,
    out: PathBuf,
}

/// The training optimizer and its learning-rate schedule.
#[derive(Clone, Copy)]
enum Opt {
    /// SGD with Nesterov momentum 0.9 and coupled weight decay 5e-4 (the REPAIR paper's
    /// optimizer), triangular learning rate peaking at 0.05.
    Sgd,
    /// candle's AdamW at 2e-3 (weight decay 5e-4), linear warm-down to zero.
    AdamW,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        train: 5000,
        test: 2000,
        epochs: 3,
        stats: 1000,
        resnet_width: 1,
        resnet_base: 16,
        vgg_width: 1,
        vgg_hidden: 0,
        optimizer: Opt::AdamW,
        only: None,
        out: PathBuf::from("out/repair_cnn"),
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, flag: &str| -> std::result::Result<usize, String> {
        v.and_then(|s| s.parse().ok())
            .filter(|&n: &usize| n > 0)
            .ok_or_else(|| format!("{flag} needs a positive integer"))
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--train" => a.train = num(it.next(), "--train")?,
            "--test" => a.test = num(it.next(), "--test")?,
            "--epochs" => a.epochs = num(it.next(), "--epochs")?,
            "--stats" => a.stats = num(it.next(), "--stats")?,
            "--resnet-width" => a.resnet_width = num(it.next(), "--resnet-width")?,
            "--resnet-base" => a.resnet_base = num(it.next(), "--resnet-base")?,
            "--vgg-width" => a.vgg_width = num(it.next(), "--vgg-width")?,
            "--vgg-hidden" => {
                a.vgg_hidden = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--vgg-hidden needs a count")?
            }
            "--optimizer" => {
                a.optimizer = match it.next().as_deref() {
                    Some("sgd") => Opt::Sgd,
                    Some("adamw") => Opt::AdamW,
                    _ => return Err("--optimizer needs sgd or adamw".into()),
                }
            }
            "--only" => a.only = it.next(),
            "--out" => {
                a.out = it
                    .next()
                    .map(PathBuf::from)
                    .ok_or("--out needs a directory")?
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(a)
}

/// Images `(n, 1, 28, 28)` and labels in batches of `BATCH`.
struct Batches {
    x: Vec<Tensor>,
    y: Vec<Tensor>,
}

impl Batches {
    /// The same batches with the images zero-padded by `p` pixels on every side.
    fn padded(&self, p: usize) -> Result<Batches> {
        let pad = |x: &Tensor| x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p);
        Ok(Batches {
            x: self
                .x
                .iter()
                .map(pad)
                .collect::<candle_core::Result<_>>()
                .map_err(err)?,
            y: self.y.clone(),
        })
    }
}

fn batches(d: &Dataset) -> Result<Batches> {
    let mut out = Batches {
        x: Vec::new(),
        y: Vec::new(),
    };
    for (xb, yb) in d.batches(BATCH)? {
        let flat: Vec<f32> = xb.iter().copied().collect();
        out.x.push(
            Tensor::from_vec(flat, (xb.nrows(), 1, 28, 28), &Device::Cpu)
                .map_err(|e| modelfusion::Error::Objective(e.to_string()))?,
        );
        let labels: Vec<u32> = yb.iter().map(|&c| c as u32).collect();
        out.y.push(
            Tensor::new(labels.as_slice(), &Device::Cpu)
                .map_err(|e| modelfusion::Error::Objective(e.to_string()))?,
        );
    }
    Ok(out)
}

/// One architecture: how to run it, and what REPAIR resets.
trait Net: Sized + 'static {
    fn taps(&self, x: &Tensor, train: bool) -> candle_core::Result<(Tensor, Taps)>;
    fn repair_layers(&self) -> Vec<(String, Option<String>)>;
}

impl Net for CandleResNet {
    fn taps(&self, x: &Tensor, train: bool) -> candle_core::Result<(Tensor, Taps)> {
        self.forward_taps(x, train)
    }
    fn repair_layers(&self) -> Vec<(String, Option<String>)> {
        CandleResNet::repair_layers(self)
    }
}

impl Net for CandleVgg {
    fn taps(&self, x: &Tensor, train: bool) -> candle_core::Result<(Tensor, Taps)> {
        self.forward_taps(x, train)
    }
    fn repair_layers(&self) -> Vec<(String, Option<String>)> {
        CandleVgg::repair_layers(self)
    }
}

/// The closure that builds a network from a `VarBuilder`.
trait Build<N>: Fn(VarBuilder<'static>) -> candle_core::Result<N> + Clone + 'static {}
impl<N, B: Fn(VarBuilder<'static>) -> candle_core::Result<N> + Clone + 'static> Build<N> for B {}

fn err(e: impl std::fmt::Display) -> modelfusion::Error {
    modelfusion::Error::Objective(e.to_string())
}

/// SGD with Nesterov momentum and coupled weight decay (as torch's `SGD(momentum=0.9,
/// nesterov=True, weight_decay=5e-4)`), which candle's own `SGD` does not have.
struct Nesterov {
    vars: Vec<candle_core::Var>,
    velocity: Vec<Tensor>,
}

impl Nesterov {
    const MOMENTUM: f64 = 0.9;
    const DECAY: f64 = 5e-4;

    fn new(vars: Vec<candle_core::Var>) -> candle_core::Result<Self> {
        let velocity = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<_>>()?;
        Ok(Nesterov { vars, velocity })
    }

    fn step(&mut self, loss: &Tensor, lr: f64) -> candle_core::Result<()> {
        let grads = loss.backward()?;
        for (var, vel) in self.vars.iter().zip(self.velocity.iter_mut()) {
            if let Some(g) = grads.get(var) {
                // detached, so that the velocity does not keep every step's graph alive
                let w = var.as_tensor().detach();
                let g = (g.detach() + (&w * Self::DECAY)?)?;
                *vel = ((&*vel * Self::MOMENTUM)? + &g)?;
                let update = (g + (&*vel * Self::MOMENTUM)?)?;
                var.set(&(w - (update * lr)?)?)?;
            }
        }
        Ok(())
    }
}

/// An optimizer with its state.
enum Trainer {
    Sgd(Nesterov),
    AdamW(candle_nn::AdamW),
}

/// Trains a network from the seeded parameters `init` with `opt`; returns the trained
/// parameters and the seconds per epoch.
fn train_net<N: Net>(
    build: &impl Build<N>,
    init: &StateDictF32,
    d: &Batches,
    epochs: usize,
    opt: Opt,
    seed: u64,
) -> Result<(StateDictF32, f64)> {
    let vm = to_varmap(init, DType::F32, &Device::Cpu)?;
    let net = build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).map_err(err)?;
    let steps = epochs * d.x.len();
    let mut trainer = match opt {
        Opt::Sgd => Trainer::Sgd(Nesterov::new(vm.all_vars()).map_err(err)?),
        Opt::AdamW => {
            let params = candle_nn::ParamsAdamW {
                lr: 2e-3,
                weight_decay: 5e-4,
                ..Default::default()
            };
            Trainer::AdamW(candle_nn::AdamW::new(vm.all_vars(), params).map_err(err)?)
        }
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start = Instant::now();
    let mut step = 0;
    for epoch in 0..epochs {
        let mut order: Vec<usize> = (0..d.x.len()).collect();
        order.shuffle(&mut rng);
        let mut total = 0.0;
        for &b in &order {
            let (logits, _) = net.taps(&d.x[b], true).map_err(err)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &d.y[b]).map_err(err)?;
            let done = step as f64 / steps as f64;
            match &mut trainer {
                Trainer::Sgd(sgd) => {
                    // triangular: up to the peak over the first fifth, then down to zero
                    let rise = (step + 1) as f64 / (0.2 * steps as f64);
                    sgd.step(&loss, 0.05 * rise.min((1.0 - done) / 0.8))
                }
                Trainer::AdamW(adamw) => {
                    // linear warm-down of the learning rate to zero
                    adamw.set_learning_rate(2e-3 * (1.0 - done));
                    adamw.backward_step(&loss)
                }
            }
            .map_err(err)?;
            total += loss.to_scalar::<f32>().map_err(err)? as f64;
            step += 1;
        }
        eprintln!(
            "  epoch {epoch}: train loss {:.4}",
            total / d.x.len() as f64
        );
    }
    let secs = start.elapsed().as_secs_f64() / epochs as f64;
    Ok((to_state_dict_from_varmap(&vm)?, secs))
}

/// Test loss and accuracy (evaluation mode).
fn evaluate<N: Net>(build: &impl Build<N>, p: &StateDictF32, d: &Batches) -> Result<(f64, f64)> {
    let net = modelfusion::candle::CandleNet::new(build.clone()).build(p)?;
    let (mut loss, mut correct, mut n) = (0.0, 0usize, 0usize);
    for (x, y) in d.x.iter().zip(&d.y) {
        let logits = net.taps(x, false).map_err(err)?.0;
        let m = x.dim(0).map_err(err)?;
        loss += candle_nn::loss::cross_entropy(&logits, y)
            .and_then(|l| l.to_scalar::<f32>())
            .map_err(err)? as f64
            * m as f64;
        let pred: Vec<u32> = logits.argmax(1).and_then(|t| t.to_vec1()).map_err(err)?;
        let truth: Vec<u32> = y.to_vec1().map_err(err)?;
        correct += pred.iter().zip(&truth).filter(|(a, b)| a == b).count();
        n += m;
    }
    Ok((loss / n as f64, correct as f64 / n as f64))
}

/// A features source over `x` for the network `N`.
fn source<N: Net>(
    build: &impl Build<N>,
    x: Arc<Vec<Tensor>>,
    pick: fn(Taps) -> Vec<(String, Tensor)>,
    train: bool,
) -> Result<impl Activations<StateDictF32>> {
    let nb = x.len();
    modelfusion::candle::CandleNet::new(build.clone())
        .features(nb, move |n: &N, b| Ok(pick(n.taps(&x[b], train)?.1)))
}

struct Curve {
    name: &'static str,
    loss: Vec<(f64, f64)>,
    acc: Vec<(f64, f64)>,
}

#[allow(clippy::too_many_arguments)]
fn run<N: Net>(
    label: &str,
    build: impl Build<N>,
    arch: &dyn Architecture,
    spec: &PermutationSpec,
    args: &Args,
    train: &Batches,
    test: &Batches,
    stat_x: Arc<Vec<Tensor>>,
) -> Result<()> {
    eprintln!(
        "== {label}: {} parameters",
        arch.random_model(0).num_elements()
    );
    let mut trained = Vec::new();
    for seed in [0u64, 1] {
        let (p, secs) = train_net(
            &build,
            &arch.random_model(seed + 10),
            train,
            args.epochs,
            args.optimizer,
            seed,
        )?;
        eprintln!("  seed {seed}: {secs:.1} s per epoch");
        println!(
            "{label}: training, seed {seed}: {secs:.1} s per epoch ({} images)",
            args.train
        );
        trained.push(p);
    }
    let (a, b) = (&trained[0], &trained[1]);
    let vm = candle_nn::VarMap::new();
    let layers = build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
        .map_err(err)?
        .repair_layers();

    let t0 = Instant::now();
    let wm_al = WeightMatching::new(0).align(a, b, spec)?;
    let wm = wm_al.apply(spec, b)?;
    let wm_secs = t0.elapsed().as_secs_f64();
    // Sanity of the alignment on the trained networks: the objective <A, P B> and the
    // distance ||A - P B|| against the identity, and weight matching recovering a
    // planted permutation of A exactly.
    let obj = &wm_al.stats().objective;
    let planted = PermutationSet::random(spec, a, 99)?;
    let recovered = WeightMatching::new(0).align(a, &spec.apply(&planted, a)?, spec)?;
    println!(
        "{label}: weight matching objective <A, P B> {:.2} -> {:.2} ({} sweeps), ||A - P B|| {:.2} -> {:.2}, planted permutation of A recovered: {}",
        obj[0],
        obj[obj.len() - 1],
        wm_al.stats().sweeps,
        a.sub(b)?.norm(),
        a.sub(&wm)?.norm(),
        recovered.permutations() == Some(planted.inverse())
    );
    let t0 = Instant::now();
    let groups = source(&build, stat_x.clone(), |t| t.groups, false)?;
    let am = ActivationMatching::new(groups)
        .with_correlation(Correlation::Pearson)
        .align(a, b, spec)?
        .apply(spec, b)?;
    let am_secs = t0.elapsed().as_secs_f64();

    let reset = BnReset::new(source(&build, stat_x.clone(), |t| t.norm_inputs, true)?);
    let repair = layers.iter().try_fold(
        OutputRepair::new(source(
            &build,
            stat_x.clone(),
            |t| t.norm_outputs.into_iter().chain(t.sums).collect(),
            false,
        )?),
        |r, (l, s)| match s {
            Some(s) => r.with_stream_write(l, s),
            None => r.with_layer(l),
        },
    )?;
    let mut curves = vec![
        Curve {
            name: "naive",
            loss: vec![],
            acc: vec![],
        },
        Curve {
            name: "WM",
            loss: vec![],
            acc: vec![],
        },
        Curve {
            name: "AM",
            loss: vec![],
            acc: vec![],
        },
        Curve {
            name: "WM + BN reset",
            loss: vec![],
            acc: vec![],
        },
        Curve {
            name: "WM + REPAIR",
            loss: vec![],
            acc: vec![],
        },
    ];
    // The endpoints' statistics, measured once for the whole path.
    let t0 = Instant::now();
    let ends = repair.endpoints(a, &wm)?;
    let ends_secs = t0.elapsed().as_secs_f64();
    let (mut reset_secs, mut repair_secs) = (0.0, 0.0);
    for i in 0..POINTS {
        let t = i as f64 / (POINTS - 1) as f64;
        let wm_t = a.lerp(&wm, t)?;
        let t0 = Instant::now();
        let (wm_reset, _) = reset.reset(&wm_t)?;
        reset_secs += t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let wm_repair = if i == 0 || i == POINTS - 1 {
            wm_reset.clone()
        } else {
            repair.repair_with(&ends, &wm_reset, t)?.0
        };
        repair_secs += t0.elapsed().as_secs_f64();
        let points = [a.lerp(b, t)?, wm_t, a.lerp(&am, t)?, wm_reset, wm_repair];
        for (c, p) in curves.iter_mut().zip(&points) {
            let (l, acc) = evaluate(&build, p, test)?;
            c.loss.push((t, l));
            c.acc.push((t, acc));
        }
        eprintln!(
            "  t = {t:.1}: {}",
            curves
                .iter()
                .map(|c| format!("{} {:.3}", c.name, c.acc[i].1))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("\n### {label}\n");
    println!(
        "| method | loss barrier | midpoint loss | midpoint accuracy | endpoints' mean accuracy |"
    );
    println!("|---|---|---|---|---|");
    for c in &curves {
        let rep = BarrierReport::from_curve(c.loss.iter().copied())?;
        let mid = POINTS / 2;
        let ends = (c.acc[0].1 + c.acc[POINTS - 1].1) / 2.0;
        println!(
            "| {} | {:.3} | {:.3} | {:.1}% | {:.1}% |",
            c.name,
            rep.frankle,
            c.loss[mid].1,
            100.0 * c.acc[mid].1,
            100.0 * ends
        );
    }
    println!(
        "\n{label}: weight matching {wm_secs:.2} s, activation matching {am_secs:.2} s, BN reset {:.2} s per point, REPAIR endpoints {ends_secs:.2} s once, then {:.2} s per interior point ({} statistics images)",
        reset_secs / POINTS as f64,
        repair_secs / (POINTS - 2) as f64,
        stat_x.iter().map(|x| x.dim(0).unwrap_or(0)).sum::<usize>()
    );
    std::fs::create_dir_all(&args.out).map_err(|e| modelfusion::Error::Io {
        path: args.out.clone(),
        source: e,
    })?;
    let file = args.out.join(format!("{label}.svg"));
    let series: Vec<Series> = curves
        .iter()
        .map(|c| Series::new(c.name, c.acc.clone()))
        .collect();
    plot_curves(
        &file,
        &format!("{label} on Fashion-MNIST: test accuracy along the linear path"),
        "t",
        "test accuracy",
        &series,
    )?;
    println!("{label}: plot {}", file.display());
    Ok(())
}

fn main() -> std::result::Result<(), modelfusion::Report> {
    let start = Instant::now();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let (train_all, test_all) = data::fashion_mnist(None)?;
    let train_d = train_all.shuffled(0).head(args.train);
    let test_d = test_all.head(args.test);
    let (train, test) = (batches(&train_d)?, batches(&test_d)?);
    // Statistics (activation matching, BN reset, REPAIR) on the first `--stats` training images.
    let stat_x = Arc::new(batches(&train_d.head(args.stats))?.x);
    println!(
        "Fashion-MNIST: {} training images, {} test images, {} epochs, batch {BATCH}, {}",
        args.train,
        args.test,
        args.epochs,
        match args.optimizer {
            Opt::Sgd => "SGD (Nesterov)",
            Opt::AdamW => "AdamW",
        }
    );
    let want = |name: &str| args.only.as_deref().is_none_or(|o| o == name);
    if want("resnet20") {
        let (w, c) = (args.resnet_width, args.resnet_base);
        let arch = ResNet::new(1, &[(c * w, 3), (2 * c * w, 3), (4 * c * w, 3)], 10)?;
        let a2 = arch.clone();
        let build = move |vb: VarBuilder<'static>| CandleResNet::new(&a2, vb);
        run(
            &if c == 16 {
                format!("resnet20x{w}")
            } else {
                format!("resnet20x{w}-base{c}")
            },
            build,
            &arch,
            &arch.spec(),
            &args,
            &train,
            &test,
            stat_x.clone(),
        )?;
    }
    if want("vgg11") {
        // VGG-11's eight convolutions (64, 128, 256, 256, 512, 512, 512, 512) / 8 x width
        // on the images zero-padded to 32 x 32, pooling after convolutions 0, 1, 3, 5
        // (32 -> 16 -> 8 -> 4 -> 2) as CIFAR VGG-11 does, then global average pooling,
        // `--vgg-hidden` hidden linear layers (ReLU, no batch norm) and the classifier.
        // (On 28 x 28 the same pools leave convolutions 6 and 7 a 1 x 1 input, where
        // only the kernels' centre taps are trained: the other eight taps keep their
        // random initialisation and are noise to weight matching.)
        let w = args.vgg_width;
        let channels: Vec<usize> = [64, 128, 256, 256, 512, 512, 512, 512]
            .iter()
            .map(|c| c * w / 8)
            .collect();
        let mut fc = vec![512 * w / 8; args.vgg_hidden];
        fc.push(10);
        let arch = Vgg::new(1, &channels, &fc, 3)?;
        let a2 = arch.clone();
        let build = move |vb: VarBuilder<'static>| CandleVgg::new(&a2, &[0, 1, 3, 5], vb);
        run(
            &if args.vgg_hidden == 0 {
                format!("vgg11x{w}")
            } else {
                format!("vgg11x{w}-hidden{}", args.vgg_hidden)
            },
            build,
            &arch,
            &arch.spec(),
            &args,
            &train.padded(2)?,
            &test.padded(2)?,
            Arc::new(
                Batches {
                    x: stat_x.to_vec(),
                    y: vec![],
                }
                .padded(2)?
                .x,
            ),
        )?;
    }
    println!("wall time {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}
