//! Learned coefficients on the embedded digits (the tables in docs/merging.md):
//!
//! 1. AdaMerging vs task arithmetic: a shared base fine-tuned on digits 0-4 and on 5-9,
//!    each task with its own 5-way head; the backbones are merged and every task is
//!    scored with its own head. AdaMerging learns its coefficients on the unlabelled
//!    test inputs (the paper's test-time setting).
//! 2. The learned soup vs the uniform and greedy soups of fine-tuned runs.
//! 3. A learned line's midpoint vs SWA vs plain training, at equal step budgets.
//!
//! ```text
//! cargo run --release --example adamerging
//! ```

use std::ops::ControlFlow;
use std::time::Instant;

use modelfusion::merge::{
    AdaMerging, Average, Granularity, GreedySoup, LearnedSoup, Merger, StepConfig, Subspace, Swa,
    train_population,
};
use modelfusion::nn::data::Dataset;
use modelfusion::nn::{Classification, Entropy, Mlp, Network, Optimizer, TrainConfig, data, train};
use modelfusion::{Gradient, Model, Result, StateDictF32, StochasticGradient};
use ndarray::Array2;

const BATCH: usize = 32;

/// Minibatches of one run: a fresh seeded order every epoch.
fn batches<'a>(
    net: &'a Mlp,
    data: &'a Dataset,
    seed: u64,
) -> impl FnMut(&StateDictF32, usize) -> Result<(f64, StateDictF32)> + 'a {
    let nb = data.num_batches(BATCH);
    let mut epoch: Option<(usize, Dataset)> = None;
    move |m, step| {
        let e = step / nb;
        if epoch.as_ref().is_none_or(|(k, _)| *k != e) {
            epoch = Some((e, data.shuffled(seed * 1_000_003 + e as u64)));
        }
        let (_, d) = epoch
            .as_ref()
            .ok_or_else(|| modelfusion::Error::empty("epoch"))?;
        Classification::new(net, d, BATCH)?.minibatch_loss_and_gradient(m, step % nb)
    }
}

/// The samples of classes `lo..lo + 5`, relabelled `0..5`.
fn task_subset(d: &Dataset, lo: usize) -> Result<Dataset> {
    let idx: Vec<usize> = (0..d.len())
        .filter(|&i| (lo..lo + 5).contains(&d.y()[i]))
        .collect();
    let s = d.subset(&idx)?;
    Dataset::new(s.x().clone(), s.y().iter().map(|y| y - lo).collect(), 5)
}

fn is_head(name: &str) -> bool {
    name.starts_with("layers.2.")
}

/// A backbone with a head attached.
fn with_head(backbone: &StateDictF32, head: &StateDictF32) -> Result<StateDictF32> {
    let mut full = backbone.clone();
    for (n, t) in head.iter() {
        full.insert(n, t.clone())?;
    }
    Ok(full)
}

fn pct(x: f64) -> String {
    format!("{:.2}", 100.0 * x)
}

fn main() -> Result<()> {
    let start = Instant::now();
    let (train_all, test) = data::digits()?.split(0.2, 0)?;
    let (train_set, val) = train_all.split(0.15, 1)?;
    let net10 = Mlp::new(&[64, 64, 64, 10])?;
    let net5 = Mlp::new(&[64, 64, 64, 5])?;
    // A weak shared base: one epoch on all ten digits.
    let base_cfg = TrainConfig::new(Optimizer::sgd(0.02, 0.9)?, 1, BATCH, 0)?;
    let base_full = train(&net10, &net10.init(0), &train_set, &base_cfg)?.params;
    let (base, _) = base_full.clone().partition(|n| !is_head(n));
    println!(
        "digits: {} train, {} validation, {} test; {}; base: 1 epoch SGD (test acc {}%)",
        train_set.len(),
        val.len(),
        test.len(),
        net10.describe(),
        pct(Classification::new(&net10, &test, 1000)?.accuracy(&base_full)?)
    );

    // 1. AdaMerging vs task arithmetic.
    let tasks = [0, 5];
    let train_t: Vec<Dataset> = tasks
        .iter()
        .map(|&lo| task_subset(&train_set, lo))
        .collect::<Result<_>>()?;
    let test_t: Vec<Dataset> = tasks
        .iter()
        .map(|&lo| task_subset(&test, lo))
        .collect::<Result<_>>()?;
    let ft_cfg = TrainConfig::new(Optimizer::sgd(0.02, 0.9)?, 10, BATCH, 1)?;
    let (mut backbones, mut heads) = (Vec::new(), Vec::new());
    for (k, d) in train_t.iter().enumerate() {
        let (head, _) = net5
            .init::<ndarray::ArrayD<f32>>(10 + k as u64)
            .partition(is_head);
        let tuned = train(&net5, &with_head(&base, &head)?, d, &ft_cfg)?.params;
        let (bb, head) = tuned.partition(|n| !is_head(n));
        backbones.push(bb);
        heads.push(head);
    }
    let refs: Vec<&StateDictF32> = backbones.iter().collect();
    let per_task = |bb: &StateDictF32| -> Result<Vec<f64>> {
        (0..tasks.len())
            .map(|k| {
                Classification::new(&net5, &test_t[k], 1000)?.accuracy(&with_head(bb, &heads[k])?)
            })
            .collect()
    };
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    rows.push((
        "fine-tuned, each task its own backbone".into(),
        (0..tasks.len())
            .map(|k| per_task(&backbones[k]).map(|a| a[k]))
            .collect::<Result<_>>()?,
    ));
    rows.push(("base backbone".into(), per_task(&base)?));
    let ada = AdaMerging::new(200, Optimizer::adam(1e-2)?)?;
    let ta = |lambda: f64| ada.combine(&base, &refs, Array2::from_elem((2, 1), lambda).view());
    for lambda in [0.3, 0.5, 1.0] {
        rows.push((
            format!("task arithmetic, lambda {lambda}"),
            per_task(&ta(lambda)?)?,
        ));
    }
    let mut entropies: Vec<Entropy<'_, Mlp>> = test_t
        .iter()
        .enumerate()
        .map(|(k, d)| Entropy::new(&net5, d, 16, 100 + k as u64))
        .collect::<Result<_>>()?;
    let mut objective = |bb: &StateDictF32, step: usize| -> Result<(f64, StateDictF32)> {
        let mut total = 0.0;
        let mut grad = bb.scale(0.0)?;
        for (h, head) in entropies.iter_mut().zip(&heads) {
            let (l, g) = h.loss_and_gradient_at(&with_head(bb, head)?, step)?;
            total += l;
            grad = grad.add(&g.partition(|n| !is_head(n)).0)?;
        }
        Ok((total, grad))
    };
    for (name, g) in [
        ("task-wise", Granularity::Model),
        ("layer-wise", Granularity::Tensor),
    ] {
        let run = ada
            .clone()
            .with_granularity(g)
            .merge(&base, &refs, &mut objective)?;
        let coef: Vec<String> = run.coefficients.iter().map(|c| format!("{c:.2}")).collect();
        println!(
            "AdaMerging {name}: entropy {:.3} -> {:.3}, coefficients [{}]",
            run.losses[0],
            run.losses.last().copied().unwrap_or(f64::NAN),
            coef.join(", ")
        );
        rows.push((
            format!("AdaMerging {name} (200 Adam steps, lr 1e-2)"),
            per_task(&run.model)?,
        ));
    }
    println!("\n| backbone | digits 0-4 (%) | digits 5-9 (%) | mean (%) |");
    println!("|---|---|---|---|");
    for (name, a) in &rows {
        println!(
            "| {name} | {} | {} | {} |",
            pct(a[0]),
            pct(a[1]),
            pct(a.iter().sum::<f64>() / a.len() as f64)
        );
    }

    // 2. Soups of runs fine-tuned from the base with different seeds and rates.
    let test_eval = Classification::new(&net10, &test, 1000)?;
    let val_eval = Classification::new(&net10, &val, 1000)?;
    let ingredients: Vec<StateDictF32> = [0.005, 0.01, 0.02, 0.05, 0.1]
        .iter()
        .enumerate()
        .map(|(i, &lr)| {
            let cfg = TrainConfig::new(Optimizer::sgd(lr, 0.9)?, 8, BATCH, 20 + i as u64)?;
            Ok(train(&net10, &base_full, &train_set, &cfg)?.params)
        })
        .collect::<Result<_>>()?;
    let irefs: Vec<&StateDictF32> = ingredients.iter().collect();
    let best = irefs
        .iter()
        .map(|m| test_eval.accuracy(*m))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .fold(0.0f64, f64::max);
    let uniform = Average::uniform().merge(&irefs)?;
    let greedy = GreedySoup::new(val_eval.clone()).cook(&irefs)?;
    let mut held_out = |m: &StateDictF32, _: usize| val_eval.loss_and_gradient(m);
    let learned = LearnedSoup::new(100, Optimizer::adam(0.05)?)?.cook(&irefs, &mut held_out)?;
    let w: Vec<String> = learned.weights.iter().map(|w| format!("{w:.2}")).collect();
    println!(
        "\nsoups of 5 runs fine-tuned 8 epochs from the base (SGD lr 0.005..0.1); greedy kept {:?}, learned weights [{}]",
        greedy.kept,
        w.join(", ")
    );
    println!("\n| soup | test accuracy (%) |\n|---|---|");
    println!("| best ingredient | {} |", pct(best));
    println!("| uniform soup | {} |", pct(test_eval.accuracy(&uniform)?));
    println!(
        "| greedy soup | {} |",
        pct(test_eval.accuracy(&greedy.soup)?)
    );
    println!(
        "| learned soup (100 Adam steps, lr 0.05, validation loss) | {} |",
        pct(test_eval.accuracy(&learned.soup)?)
    );

    // 3. A learned line vs SWA vs plain training, same steps and optimiser.
    let epochs = 20;
    let nb = train_set.num_batches(BATCH);
    let steps = epochs * nb;
    let config = StepConfig::new(steps, Optimizer::sgd(0.05, 0.9)?)?;
    let mut acc = vec![Vec::new(); 5];
    for seed in 0..3u64 {
        let init: StateDictF32 = net10.init(seed * 100);
        let mut swa = Swa::new();
        let plain = train_population(
            std::slice::from_ref(&init),
            &mut [batches(&net10, &train_set, seed)],
            &config,
            |step, pop, _| {
                if (step + 1) % nb == 0 && step + 1 > steps / 2 {
                    swa.update(&pop[0])?;
                }
                Ok(ControlFlow::Continue(()))
            },
        )?;
        let swa = swa
            .average()
            .ok_or_else(|| modelfusion::Error::empty("SWA"))?;
        let line = Subspace::new(config.clone()).with_seed(seed).train(
            &[init.clone(), net10.init(seed * 100 + 1)],
            &mut batches(&net10, &train_set, seed),
        )?;
        acc[0].push(test_eval.accuracy(&plain[0])?);
        acc[1].push(test_eval.accuracy(swa)?);
        acc[2].push(test_eval.accuracy(&line.midpoint()?)?);
        acc[3].push(
            (test_eval.accuracy(&line.endpoints[0])? + test_eval.accuracy(&line.endpoints[1])?)
                / 2.0,
        );
        // The same line with twice the steps (each endpoint gets a share of each step).
        let long = StepConfig::new(2 * steps, Optimizer::sgd(0.05, 0.9)?)?;
        let line2 = Subspace::new(long).with_seed(seed).train(
            &[init.clone(), net10.init(seed * 100 + 1)],
            &mut batches(&net10, &train_set, seed),
        )?;
        acc[4].push(test_eval.accuracy(&line2.midpoint()?)?);
    }
    println!(
        "\nline vs SWA: {}, SGD lr 0.05 momentum 0.9, batch {BATCH}, {epochs} epochs ({steps} steps) each",
        net10.describe()
    );
    println!("\n| method | test accuracy, seeds 0, 1, 2 (%) | mean (%) |\n|---|---|---|");
    for (name, a) in [
        "plain (last iterate)",
        "SWA (epoch ends, second half)",
        "learned line, midpoint (global alpha)",
        "learned line, endpoints (mean)",
        "learned line, midpoint, twice the steps",
    ]
    .iter()
    .zip(&acc)
    {
        let per: Vec<String> = a.iter().map(|x| pct(*x)).collect();
        println!(
            "| {name} | {} | {} |",
            per.join(", "),
            pct(a.iter().sum::<f64>() / a.len() as f64)
        );
    }
    println!("\n({:.1} s)", start.elapsed().as_secs_f64());
    Ok(())
}
