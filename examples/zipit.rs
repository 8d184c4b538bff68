//! ZipIt! against permutation merging on the embedded digits: pairs of MLPs trained from
//! different seeds, merged at the midpoint by naive averaging, weight-matched and
//! activation-matched averaging, ZipIt! (full, and partial for k = 0..depth zipped
//! hidden layers); test accuracy of each, and the output ensemble for reference.
//!
//! ```text
//! cargo run --release --example zipit                       # 3 pairs, MLP 64-128-128-128-10
//! options: --width N  --epochs N  --pairs N
//! ```

use std::time::Instant;

use modelfusion::align::{ActivationMatching, Aligner, Correlation, WeightMatching, ZipIt};
use modelfusion::nn::{Classification, Mlp, Network, Optimizer, TrainConfig, data, train};
use modelfusion::perm::specs::Architecture;
use modelfusion::{Model, Result, StateDictF32};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    let start = Instant::now();
    let (width, epochs, pairs) = (arg("--width", 128), arg("--epochs", 30), arg("--pairs", 3));
    let (train_set, test) = data::digits()?.split(0.2, 0)?;
    let depth = 3;
    let mut sizes = vec![64];
    sizes.extend(std::iter::repeat_n(width, depth));
    sizes.push(10);
    let net = Mlp::new(&sizes)?;
    let spec = net.spec();
    let eval = Classification::new(&net, &test, 1000)?;
    // Activation statistics (matching, ZipIt!) come from the training set.
    let stats = Classification::new(&net, &train_set, 1000)?;
    println!(
        "digits: {} train / {} test; MLP {sizes:?}; {epochs} epochs of Adam; {pairs} pairs of seeds",
        train_set.len(),
        test.len()
    );

    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let mut record = |name: String, acc: f64| match rows.iter_mut().find(|(n, _)| *n == name) {
        Some((_, v)) => v.push(acc),
        None => rows.push((name, vec![acc])),
    };
    for pair in 0..pairs as u64 {
        let model = |seed: u64| -> Result<StateDictF32> {
            let config = TrainConfig::new(Optimizer::adam(1e-3)?, epochs, 32, seed)?;
            Ok(train(&net, &net.init(seed), &train_set, &config)?.params)
        };
        let (a, b) = (model(2 * pair)?, model(2 * pair + 1)?);
        let acc = |m: &StateDictF32| eval.accuracy(m);
        record("endpoint A".into(), acc(&a)?);
        record("endpoint B".into(), acc(&b)?);
        record(
            "output ensemble".into(),
            eval.evaluate_ensemble(&[&a, &b])?.accuracy,
        );
        record("naive average".into(), acc(&a.lerp(&b, 0.5)?)?);
        let wm = WeightMatching::new(0).align(&a, &b, &spec)?.apply_to(&b)?;
        record("weight matching".into(), acc(&a.lerp(&wm, 0.5)?)?);
        let am = ActivationMatching::new(stats.clone())
            .with_correlation(Correlation::Pearson)
            .align(&a, &b, &spec)?
            .apply_to(&b)?;
        record("activation matching".into(), acc(&a.lerp(&am, 0.5)?)?);
        let zipper = ZipIt::new(stats.clone()).with_constant_units(true);
        let cross = zipper.clone().with_alpha(0.0)?.zip(&a, &b, &spec)?;
        record(
            "ZipIt! alpha = 0 (greedy perm.)".into(),
            acc(&cross.merge(&a, &b)?)?,
        );
        let zip = zipper.zip(&a, &b, &spec)?;
        let within: usize = zip.iter().map(|(_, g)| g.within().0).sum();
        record("ZipIt! full (alpha = 1)".into(), acc(&zip.merge(&a, &b)?)?);
        record(
            "  units merged within their model".into(),
            2.0 * within as f64 / (depth * width) as f64,
        );
        for k in 0..=depth {
            let p = zip.partial_mlp(&a, &b, k)?;
            let wide = Mlp::new(&p.sizes)?;
            let e = Classification::new(&wide, &test, 1000)?.accuracy(&p.model)?;
            record(format!("ZipIt! partial k = {k}"), e);
        }
    }
    println!(
        "\ntest accuracy at the midpoint (per pair, then mean; 'within' row: fraction of units):"
    );
    for (name, v) in &rows {
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let each: Vec<String> = v.iter().map(|x| format!("{:6.2}", 100.0 * x)).collect();
        println!(
            "  {name:<34} {}  | mean {:6.2} %",
            each.join(" "),
            100.0 * mean
        );
    }
    println!("\ndone in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
