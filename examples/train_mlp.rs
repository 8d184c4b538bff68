//! Trains two reference MLPs from different seeds and prints their test accuracy.
//!
//! ```text
//! cargo run --release --example train_mlp              # embedded UCI digits (8x8)
//! cargo run --release --example train_mlp -- fashion   # Fashion-MNIST (Debian package)
//! cargo run --release --example train_mlp -- fashion /path/to/fashion-mnist
//! ```

use std::path::PathBuf;
use std::time::Instant;

use modelfusion::nn::{Classification, Mlp, Network, Optimizer, TrainConfig, data, train};
use modelfusion::{Model, Result, StateDictF32};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fashion = args.first().is_some_and(|a| a == "fashion");
    let (train_set, test_set, sizes, epochs) = if fashion {
        let dir = args.get(1).map(PathBuf::from);
        let (train_set, test_set) = data::fashion_mnist(dir.as_deref())?;
        (train_set, test_set, vec![784, 256, 256, 10], 5)
    } else {
        let (train_set, test_set) = data::digits()?.split(0.2, 0)?;
        (train_set, test_set, vec![64, 128, 128, 10], 20)
    };
    println!(
        "data: {} training and {} test samples, {} features, {} classes",
        train_set.len(),
        test_set.len(),
        train_set.num_features(),
        train_set.num_classes()
    );
    let net = Mlp::new(&sizes)?;
    let eval = Classification::new(&net, &test_set, 1000)?;
    let mut models = Vec::new();
    for seed in [0u64, 1] {
        let start = Instant::now();
        let config = TrainConfig::new(Optimizer::adam(1e-3)?, epochs, 32, seed)?;
        let init: StateDictF32 = net.init(seed);
        let trained = train(&net, &init, &train_set, &config)?;
        let e = eval.evaluate(&trained.params)?;
        println!(
            "model {seed} ({}): final training loss {:.4}, test loss {:.4}, test accuracy {:.2}% ({:.2} s)",
            net.describe(),
            trained.loss_history.last().copied().unwrap_or(f64::NAN),
            e.loss,
            100.0 * e.accuracy,
            start.elapsed().as_secs_f64()
        );
        models.push(trained.params);
    }
    let ens = eval.evaluate_ensemble(&[&models[0], &models[1]])?;
    println!(
        "output ensemble of both: test loss {:.4}, test accuracy {:.2}%",
        ens.loss,
        100.0 * ens.accuracy
    );
    // A first look at why fusion needs alignment: the naive midpoint of the two models.
    let mid = models[0].lerp(&models[1], 0.5)?;
    let e = eval.evaluate(&mid)?;
    println!(
        "naive midpoint (no alignment): test loss {:.4}, test accuracy {:.2}%",
        e.loss,
        100.0 * e.accuracy
    );
    Ok(())
}
