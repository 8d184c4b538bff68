//! The linear-mode-connectivity barrier of two small LLaMA-style decoders trained with
//! candle from different seeds, before and after permutation alignment.
//!
//! ```text
//! cargo run --release --features candle --example transformer_barrier
//! options: --steps N (1000)  --batch N (32)  --seq N (64)  --hidden N (64)  --layers N (2)
//!          --no-am (skip activation matching)  --out DIR (out/transformer_barrier)
//! ```
//!
//! Character-level language modelling on the first 27 chapters of Genesis (KJV, public
//! domain, `data/kjv/genesis.txt`; the last tenth held out). Two decoders (4 query
//! heads, 2 key-value heads, RoPE, SwiGLU; Hugging Face `llama` names, so the crate's
//! inferred spec applies unchanged) are trained from different initialisation and
//! data-order seeds, then the held-out loss (and perplexity) is measured at 11 points of
//! the linear path for naive interpolation, weight matching on the residual stream and
//! MLPs only (attention held at identity), full weight matching (heads included) and
//! activation matching with heads. The barrier is the largest gap between the path's
//! loss and the linear interpolation of the endpoint losses. Everything is seeded.

mod decoder;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use decoder::{Decoder, DecoderConfig, without_heads};
use modelfusion::align::{ActivationMatching, Aligner, WeightMatching};
use modelfusion::barrier::BarrierReport;
use modelfusion::candle::candle_core::{DType, Device, Tensor};
use modelfusion::candle::candle_nn::{self, Optimizer, VarBuilder};
use modelfusion::candle::{CandleNet, to_state_dict_from_varmap, to_varmap};
use modelfusion::perm::PermutationSpec;
use modelfusion::perm::infer::infer_model_spec;
use modelfusion::plot::{Series, plot_curves};
use modelfusion::{Model, Result, StateDictF32};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CORPUS: &str = include_str!("../../data/kjv/genesis.txt");
const POINTS: usize = 11;
const LR: f64 = 3e-3;
const WARMUP: usize = 100;

struct Args {
    steps: usize,
    batch: usize,
    seq: usize,
    hidden: usize,
    layers: usize,
    am: bool,
    out: PathBuf,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        steps: 1000,
        batch: 32,
        seq: 64,
        hidden: 64,
        layers: 2,
        am: true,
        out: PathBuf::from("out/transformer_barrier"),
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, flag: &str| -> std::result::Result<usize, String> {
        v.and_then(|s| s.parse().ok())
            .filter(|&n: &usize| n > 0)
            .ok_or_else(|| format!("{flag} needs a positive integer"))
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--steps" => a.steps = num(it.next(), "--steps")?,
            "--batch" => a.batch = num(it.next(), "--batch")?,
            "--seq" => a.seq = num(it.next(), "--seq")?,
            "--hidden" => a.hidden = num(it.next(), "--hidden")?,
            "--layers" => a.layers = num(it.next(), "--layers")?,
            "--no-am" => a.am = false,
            "--out" => {
                a.out = it
                    .next()
                    .map(PathBuf::from)
                    .ok_or("--out needs a directory")?
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.hidden % 16 != 0 {
        return Err(format!(
            "--hidden must be a multiple of 16 (4 heads of even head_dim), got {}",
            a.hidden
        ));
    }
    Ok(a)
}

fn err(e: impl std::fmt::Display) -> modelfusion::Error {
    modelfusion::Error::Objective(e.to_string())
}

/// The corpus as character ids, and the alphabet.
fn encode(text: &str) -> (Vec<u32>, Vec<char>) {
    let mut alphabet: Vec<char> = text.chars().collect();
    alphabet.sort_unstable();
    alphabet.dedup();
    let ids = text
        .chars()
        .map(|c| alphabet.binary_search(&c).unwrap_or(0) as u32)
        .collect();
    (ids, alphabet)
}

/// Inputs `(n, seq)` and next-character targets `(n * seq)` of the windows starting at
/// `starts`.
fn windows(ids: &[u32], starts: &[usize], seq: usize) -> Result<(Tensor, Tensor)> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for &s in starts {
        x.extend_from_slice(&ids[s..s + seq]);
        y.extend_from_slice(&ids[s + 1..s + seq + 1]);
    }
    let n = starts.len();
    Ok((
        Tensor::from_vec(x, (n, seq), &Device::Cpu).map_err(err)?,
        Tensor::from_vec(y, n * seq, &Device::Cpu).map_err(err)?,
    ))
}

fn next_token_loss(
    logits: &Tensor,
    y: &Tensor,
) -> modelfusion::candle::candle_core::Result<Tensor> {
    let v = logits.dim(2)?;
    candle_nn::loss::cross_entropy(&logits.reshape(((), v))?, y)
}

/// Trains from `init` with AdamW (linear warm-up, then linear decay to zero) on random
/// windows of `ids` drawn with `seed`; returns the parameters and the wall time.
fn train(
    cfg: &DecoderConfig,
    init: &StateDictF32,
    ids: &[u32],
    args: &Args,
    seed: u64,
) -> Result<(StateDictF32, f64)> {
    let vm = to_varmap(init, DType::F32, &Device::Cpu)?;
    let net =
        Decoder::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).map_err(err)?;
    let params = candle_nn::ParamsAdamW {
        lr: LR,
        weight_decay: 0.01,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(vm.all_vars(), params).map_err(err)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start = Instant::now();
    let mut recent = 0.0;
    for step in 0..args.steps {
        let lr = if step < WARMUP {
            LR * (step + 1) as f64 / WARMUP as f64
        } else {
            LR * (args.steps - step) as f64 / (args.steps - WARMUP.min(args.steps - 1)) as f64
        };
        opt.set_learning_rate(lr);
        let starts: Vec<usize> = (0..args.batch)
            .map(|_| rng.random_range(0..ids.len() - args.seq - 1))
            .collect();
        let (x, y) = windows(ids, &starts, args.seq)?;
        let loss = next_token_loss(&net.forward(&x).map_err(err)?, &y).map_err(err)?;
        opt.backward_step(&loss).map_err(err)?;
        recent += loss.to_scalar::<f32>().map_err(err)? as f64;
        if (step + 1) % 250 == 0 {
            eprintln!("  step {}: train loss {:.3}", step + 1, recent / 250.0);
            recent = 0.0;
        }
    }
    Ok((
        to_state_dict_from_varmap(&vm)?,
        start.elapsed().as_secs_f64(),
    ))
}

/// Mean next-character loss (nats) over the held-out windows.
fn evaluate(cfg: &DecoderConfig, p: &StateDictF32, held: &[(Tensor, Tensor)]) -> Result<f64> {
    let c = *cfg;
    let net = CandleNet::new(move |vb| Decoder::new(&c, vb)).build(p)?;
    let mut total = 0.0;
    for (x, y) in held {
        let logits = net.forward(x).map_err(err)?;
        total += next_token_loss(&logits, y)
            .and_then(|l| l.to_scalar::<f32>())
            .map_err(err)? as f64;
    }
    Ok(total / held.len() as f64)
}

struct Method {
    name: &'static str,
    /// Model B expressed in A's coordinates (B itself for naive interpolation).
    b: StateDictF32,
    secs: f64,
}

fn main() -> std::result::Result<(), modelfusion::Report> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let (ids, alphabet) = encode(CORPUS);
    let split = ids.len() * 9 / 10;
    let (train_ids, held_ids) = ids.split_at(split);
    let cfg = DecoderConfig {
        vocab: alphabet.len(),
        hidden: args.hidden,
        layers: args.layers,
        heads: 4,
        kv_heads: 2,
        head_dim: args.hidden / 4,
        intermediate: args.hidden * 8 / 3 / 16 * 16,
    };
    // held out: every non-overlapping window, in batches of `batch`
    let starts: Vec<usize> = (0..(held_ids.len() - 1) / args.seq)
        .map(|k| k * args.seq)
        .collect();
    let held = starts
        .chunks(args.batch)
        .map(|s| windows(held_ids, s, args.seq))
        .collect::<Result<Vec<_>>>()?;
    let init_a = cfg.init(10, 0.02)?;
    println!(
        "corpus: {} characters ({} distinct), {} training, {} held out ({} windows of {}); decoder: {} layers, hidden {}, 4 heads / 2 KV heads of {}, MLP {}, {} parameters; {} steps of {} x {}",
        ids.len(),
        alphabet.len(),
        train_ids.len(),
        held_ids.len(),
        starts.len(),
        args.seq,
        cfg.layers,
        cfg.hidden,
        cfg.head_dim,
        cfg.intermediate,
        init_a.num_elements(),
        args.steps,
        args.batch,
        args.seq
    );
    let spec = infer_model_spec(&init_a, Some(&cfg.hf_config()))?;
    println!("spec: {} ({})", spec.family, spec.reason);
    let spec = spec.spec;
    let spec_no_heads = without_heads(&spec)?;

    let mut trained = Vec::new();
    for (seed, init) in [(0u64, init_a), (1, cfg.init(11, 0.02)?)] {
        eprintln!("== training model {seed}");
        let (p, secs) = train(&cfg, &init, train_ids, &args, seed)?;
        println!("model {seed}: trained in {secs:.0} s");
        trained.push(p);
    }
    let (a, b) = (&trained[0], &trained[1]);

    let mut methods = vec![Method {
        name: "naive",
        b: b.clone(),
        secs: 0.0,
    }];
    let mut align = |name,
                     spec: &PermutationSpec,
                     aligner: &dyn Fn(&PermutationSpec) -> Result<StateDictF32>|
     -> Result<()> {
        let t0 = Instant::now();
        let aligned = aligner(spec)?;
        methods.push(Method {
            name,
            b: aligned,
            secs: t0.elapsed().as_secs_f64(),
        });
        Ok(())
    };
    let wm = |s: &PermutationSpec| WeightMatching::new(0).align(a, b, s)?.apply(s, b);
    align("WM, residual + MLP", &spec_no_heads, &wm)?;
    align("WM, with heads", &spec, &wm)?;
    if args.am {
        // features on 16 training windows of `seq`, 4 batches
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let xs: Vec<Tensor> = (0..4)
            .map(|_| {
                let s: Vec<usize> = (0..4)
                    .map(|_| rng.random_range(0..train_ids.len() - args.seq - 1))
                    .collect();
                Ok(windows(train_ids, &s, args.seq)?.0)
            })
            .collect::<Result<_>>()?;
        let xs = Arc::new(xs);
        let c = cfg;
        let features = CandleNet::new(move |vb| Decoder::new(&c, vb))
            .features(xs.len(), move |n: &Decoder, k| {
                Ok(n.forward_taps(&xs[k])?.1.into_features())
            })?;
        let am = |s: &PermutationSpec| {
            ActivationMatching::new(features.clone())
                .align(a, b, s)?
                .apply(s, b)
        };
        align("AM, with heads", &spec, &am)?;
    }

    let mut curves: Vec<Vec<(f64, f64)>> = vec![Vec::new(); methods.len()];
    for i in 0..POINTS {
        let t = i as f64 / (POINTS - 1) as f64;
        for (m, c) in methods.iter().zip(&mut curves) {
            c.push((t, evaluate(&cfg, &a.lerp(&m.b, t)?, &held)?));
        }
        eprintln!(
            "  t = {t:.1}: {}",
            methods
                .iter()
                .zip(&curves)
                .map(|(m, c)| format!("{} {:.3}", m.name, c[i].1))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "\n| method | barrier (loss) | max loss on the path | midpoint loss | midpoint perplexity | endpoint losses | alignment time |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (m, c) in methods.iter().zip(&curves) {
        let r = BarrierReport::from_curve(c.iter().copied())?;
        let mid = c[POINTS / 2].1;
        println!(
            "| {} | {:.3} (t = {:.1}) | {:.3} | {:.3} | {:.2} | {:.3}, {:.3} | {:.1} s |",
            m.name,
            r.interpolated,
            r.interpolated_t,
            r.max_value(),
            mid,
            mid.exp(),
            r.start,
            r.end,
            m.secs
        );
    }
    std::fs::create_dir_all(&args.out).map_err(|e| modelfusion::Error::Io {
        path: args.out.clone(),
        source: e,
    })?;
    let file = args.out.join("transformer_barrier.svg");
    let series: Vec<Series> = methods
        .iter()
        .zip(&curves)
        .map(|(m, c)| Series::new(m.name, c.clone()))
        .collect();
    plot_curves(
        &file,
        "Two LLaMA-style decoders on Genesis: held-out loss along the linear path",
        "t",
        "held-out loss (nats per character)",
        &series,
    )?;
    println!("\nplot: {}", file.display());
    Ok(())
}
