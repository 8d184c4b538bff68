//! Averaging during training on the embedded digits: plain training, SWA, SWAD, PAPA
//! (three rules) and HWA, each from the same step budget per run, over several seeds.
//! Prints test accuracy per method (the table in docs/averaging.md).
//!
//! ```text
//! cargo run --release --example averaging            # 3 seeds
//! cargo run --release --example averaging -- 5       # 5 seeds
//! ```

use std::ops::ControlFlow;
use std::time::Instant;

use modelfusion::merge::{Hwa, Papa, StepConfig, Swa, Swad, train_population};
use modelfusion::nn::data::Dataset;
use modelfusion::nn::{Classification, Mlp, Network, Optimizer, data};
use modelfusion::{Result, StateDictF32, StochasticGradient};

const EPOCHS: usize = 40;
const BATCH: usize = 32;
const POPULATION: usize = 4;

/// Minibatches of one run: a fresh seeded order every epoch.
struct Batches<'a> {
    net: &'a Mlp,
    data: &'a Dataset,
    seed: u64,
    epoch: Option<(usize, Dataset)>,
}

impl StochasticGradient<StateDictF32> for Batches<'_> {
    fn loss_and_gradient_at(
        &mut self,
        m: &StateDictF32,
        step: usize,
    ) -> Result<(f64, StateDictF32)> {
        let nb = self.data.num_batches(BATCH);
        let epoch = step / nb;
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.epoch = Some((
                epoch,
                self.data.shuffled(self.seed * 1_000_003 + epoch as u64),
            ));
        }
        let (_, d) = self
            .epoch
            .as_ref()
            .ok_or_else(|| modelfusion::Error::empty("epoch"))?;
        Classification::new(self.net, d, BATCH)?.minibatch_loss_and_gradient(m, step % nb)
    }
}

fn main() -> Result<()> {
    let seeds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let (train_all, test) = data::digits()?.split(0.2, 0)?;
    let (train_set, val) = train_all.split(0.15, 1)?;
    let net = Mlp::new(&[64, 128, 128, 10])?;
    let test_eval = Classification::new(&net, &test, 1000)?;
    let val_eval = Classification::new(&net, &val, 1000)?;
    let nb = train_set.num_batches(BATCH);
    let steps = EPOCHS * nb;
    let config = StepConfig::new(steps, Optimizer::sgd(0.05, 0.9)?)?;
    println!(
        "digits: {} train, {} validation, {} test; {}; SGD lr 0.05 momentum 0.9, batch {BATCH}, {EPOCHS} epochs ({steps} steps) per run",
        train_set.len(),
        val.len(),
        test.len(),
        net.describe()
    );
    let methods = [
        "plain (last iterate)",
        "SWA (epoch ends, second half)",
        "SWAD (every step, epoch segments)",
        "PAPA (alpha 0.99 every 10 steps)",
        "PAPA-all (every epoch)",
        "PAPA-2 (every epoch)",
        "HWA (sync every epoch, window 5)",
        "ensemble of 4 plain runs (outputs)",
    ];
    let mut acc = vec![Vec::new(); methods.len()];
    let start = Instant::now();
    for seed in 0..seeds {
        let batches = |j: usize| Batches {
            net: &net,
            data: &train_set,
            seed: seed * 100 + j as u64,
            epoch: None,
        };
        // Plain, SWA and SWAD from one run.
        let init: StateDictF32 = net.init(seed * 100);
        let mut swa = Swa::new();
        let mut swad = Swad::new();
        let plain = train_population(
            std::slice::from_ref(&init),
            &mut [batches(0)],
            &config,
            |step, pop, _| {
                swad.update(&pop[0])?;
                if (step + 1) % nb == 0 {
                    swad.evaluate(val_eval.evaluate(&pop[0])?.loss)?;
                    if step + 1 > steps / 2 {
                        swa.update(&pop[0])?;
                    }
                }
                Ok(ControlFlow::Continue(()))
            },
        )?;
        let swad_avg = swad.average()?;
        let swa_avg = swa
            .average()
            .ok_or_else(|| modelfusion::Error::empty("SWA"))?;
        acc[0].push(test_eval.accuracy(&plain[0])?);
        acc[1].push(test_eval.accuracy(swa_avg)?);
        acc[2].push(test_eval.accuracy(&swad_avg.model)?);
        println!(
            "seed {seed}: SWAD window (epochs) {:?}, {} iterates",
            swad_avg.window, swad_avg.iterates
        );
        // Populations: PAPA members from different inits, HWA runs from one init.
        let inits: Vec<StateDictF32> = (0..POPULATION)
            .map(|j| net.init(seed * 100 + j as u64))
            .collect();
        let objs = || (0..POPULATION).map(batches).collect::<Vec<_>>();
        for (k, papa) in [
            Papa::ema(0.99, 10)?,
            Papa::all(nb)?,
            Papa::pairs(nb)?.with_seed(seed),
        ]
        .into_iter()
        .enumerate()
        {
            let run = papa.train(&inits, &mut objs(), &config)?;
            acc[3 + k].push(test_eval.accuracy(&run.average)?);
        }
        let same = vec![init.clone(); POPULATION];
        let run = Hwa::new(nb, 5)?.train(&same, &mut objs(), &config)?;
        acc[6].push(test_eval.accuracy(&run.average)?);
        let solo = train_population(&inits, &mut objs(), &config, |_, _, _| {
            Ok(ControlFlow::Continue(()))
        })?;
        let refs: Vec<&StateDictF32> = solo.iter().collect();
        acc[7].push(test_eval.evaluate_ensemble(&refs)?.accuracy);
    }
    println!("\n| method | test accuracy, mean ± std over {seeds} seeds (%) | per seed |");
    println!("|---|---|---|");
    for (name, a) in methods.iter().zip(&acc) {
        let n = a.len() as f64;
        let mean = a.iter().sum::<f64>() / n;
        let std = (a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
        let per: Vec<String> = a.iter().map(|x| format!("{:.2}", 100.0 * x)).collect();
        println!(
            "| {name} | {:.2} ± {:.2} | {} |",
            100.0 * mean,
            100.0 * std,
            per.join(", ")
        );
    }
    println!("\n({:.1} s)", start.elapsed().as_secs_f64());
    Ok(())
}
