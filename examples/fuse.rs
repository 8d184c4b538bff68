//! Fuses three reference MLPs trained from different seeds, and compares the ways of
//! doing it: naive weight average, weight-matched average, weight-matched greedy soup, and
//! the output ensemble (the baseline every fusion is measured against).
//!
//! ```text
//! cargo run --release --example fuse
//! ```

use std::time::Instant;

use modelfusion::align::{Identity, WeightMatching};
use modelfusion::merge::{Average, GreedySoup};
use modelfusion::nn::{Classification, Mlp, Network, Optimizer, TrainConfig, data, train};
use modelfusion::perm::specs::Architecture;
use modelfusion::pipeline::{Pipeline, Reference};
use modelfusion::{Result, StateDictF32};

fn main() -> Result<()> {
    let start = Instant::now();
    // Train / held-out (for the soup and the reference choice) / test.
    let (rest, test) = data::digits()?.split(0.2, 0)?;
    let (train_set, held_out) = rest.split(0.15, 1)?;
    let net = Mlp::new(&[64, 128, 128, 10])?;
    let held = Classification::new(&net, &held_out, 1000)?;
    let eval = Classification::new(&net, &test, 1000)?;

    let mut models: Vec<StateDictF32> = Vec::new();
    for seed in 0..3u64 {
        let config = TrainConfig::new(Optimizer::adam(1e-3)?, 20, 32, seed)?;
        let trained = train(&net, &net.init(seed), &train_set, &config)?;
        let e = eval.evaluate(&trained.params)?;
        println!(
            "model {seed}: test loss {:.4}, accuracy {:.2}%",
            e.loss,
            100.0 * e.accuracy
        );
        models.push(trained.params);
    }
    let refs: Vec<&StateDictF32> = models.iter().collect();
    let row = |name: &str, m: &StateDictF32| -> Result<()> {
        let e = eval.evaluate(m)?;
        println!(
            "{name:<34} test loss {:.4}, accuracy {:.2}%",
            e.loss,
            100.0 * e.accuracy
        );
        Ok(())
    };
    println!();
    let spec = net.spec();
    let naive = Pipeline::new(spec.clone(), Identity, Average::uniform()).run(&models)?;
    row("naive average", &naive.fused)?;
    let aligned = Pipeline::new(spec, WeightMatching::new(0), Average::uniform())
        .with_reference(Reference::Best)
        .with_objective(&held)
        .run(&models)?;
    row(
        &format!("weight-matched average (ref {})", aligned.reference),
        &aligned.fused,
    )?;
    let soup = GreedySoup::new(held).cook(&aligned.aligned.iter().collect::<Vec<_>>())?;
    row(
        &format!("weight-matched greedy soup {:?}", soup.kept),
        &soup.soup,
    )?;
    let ens = eval.evaluate_ensemble(&refs)?;
    println!(
        "{:<34} test loss {:.4}, accuracy {:.2}%",
        "output ensemble (3 forward passes)",
        ens.loss,
        100.0 * ens.accuracy
    );
    println!("\ndone in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
