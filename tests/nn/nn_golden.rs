//! Golden values from scikit-learn (tests/golden/nn_sklearn.py): the MLP's loss, logits
//! and gradients against `MLPClassifier._backprop`, and the embedded digits against
//! `load_digits`.
#![cfg(feature = "nn")]

use modelfusion::nn::{Mlp, Mode, Network, data};
use modelfusion::{Model, StateDictF64};
use ndarray::Array2;

use crate::nn_common::{formula_mlp, read_golden};

const SIZES: [usize; 4] = [5, 4, 3, 3];
const N: usize = 8;

/// The parameters of the script: element k of parameter m is 0.5 sin(1.3 k + 0.7 m + 0.1).
fn golden_params() -> StateDictF64 {
    formula_mlp(&SIZES, |m, k| {
        0.5 * (1.3 * k as f64 + 0.7 * m as f64 + 0.1).sin()
    })
}

#[test]
fn mlp_loss_logits_and_gradients_match_sklearn() {
    let golden = read_golden("nn_sklearn_mlp.txt");
    let net = Mlp::new(&SIZES).unwrap();
    let params = golden_params();
    let x = Array2::from_shape_fn((N, SIZES[0]), |(i, j)| {
        (0.9 * i as f64 + 0.45 * j as f64 + 0.2).cos()
    });
    let labels: Vec<usize> = (0..N).map(|i| i % 3).collect();
    let step = net
        .batch_loss_and_gradient(&params, x.view(), &labels, Mode::Eval)
        .unwrap();
    assert!(
        (step.loss - golden["loss"][0]).abs() < 1e-12,
        "{} vs {}",
        step.loss,
        golden["loss"][0]
    );
    let logits = net.logits(&params, x.view()).unwrap();
    for (a, b) in logits.iter().zip(&golden["logits"]) {
        assert!((a - b).abs() < 1e-12);
    }
    for name in params.names() {
        let g = step.gradient.get(name).unwrap();
        let want = &golden[name];
        assert_eq!(g.len(), want.len(), "{name}");
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{name}: {a} vs {b}");
        }
    }
}

#[test]
fn embedded_digits_match_sklearn_load_digits() {
    let golden = read_golden("nn_sklearn_digits.txt");
    let d = data::digits().unwrap();
    let counts: Vec<f64> = d.class_counts().iter().map(|&c| c as f64).collect();
    assert_eq!(counts, golden["counts"]);
    let mut sums = [0.0f64; 10];
    for (row, &label) in d.x().rows().into_iter().zip(d.y()) {
        sums[label] += row.iter().map(|&v| f64::from(v) * 16.0).sum::<f64>();
    }
    for (a, b) in sums.iter().zip(&golden["pixel_sums"]) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    let last = &golden["last_row"];
    let n = d.len() - 1;
    for (v, want) in d.x().row(n).iter().zip(&last[..64]) {
        assert_eq!(f64::from(*v) * 16.0, *want);
    }
    assert_eq!(d.y()[n] as f64, last[64]);
}
