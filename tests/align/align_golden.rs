//! Golden values from numpy + scipy (tests/golden/align_golden.py): weight matching with
//! one group, and the streaming statistics activation matching uses.

use std::collections::BTreeMap;

use modelfusion::StateDictF64;
use modelfusion::align::{Aligner, CrossMoments, WeightMatching};
use modelfusion::perm::specs;
use ndarray::{ArrayD, Ix2};

use crate::common;

fn golden() -> BTreeMap<String, ArrayD<f64>> {
    common::golden::golden_table(include_str!("../golden/align_golden.txt"))
}

fn model(g: &BTreeMap<String, ArrayD<f64>>, prefix: &str) -> StateDictF64 {
    common::golden_mlp(g, prefix)
}

#[test]
fn weight_matching_matches_scipy_on_one_group() {
    let g = golden();
    let (a, b) = (model(&g, "a"), model(&g, "b"));
    let al = WeightMatching::new(3)
        .align(&a, &b, &specs::mlp(1))
        .unwrap();
    let perm: Vec<usize> = g["perm"].iter().map(|&v| v as usize).collect();
    let got = al.permutations().unwrap();
    assert_eq!(got.get("hidden.0").unwrap().as_slice(), perm.as_slice());
    let obj = *al.stats().objective.last().unwrap();
    assert!((obj - g["objective"][[0]]).abs() < 1e-9, "{obj}");
}

#[test]
fn streaming_statistics_match_numpy() {
    let g = golden();
    let x = g["x"].clone().into_dimensionality::<Ix2>().unwrap();
    let y = g["y"].clone().into_dimensionality::<Ix2>().unwrap();
    let mut cm = CrossMoments::new(5, 3);
    // uneven batches, merged pairwise
    for (lo, hi) in [(0, 7), (7, 8), (8, 31), (31, 50)] {
        cm.update(
            x.slice(ndarray::s![lo..hi, ..]),
            y.slice(ndarray::s![lo..hi, ..]),
        )
        .unwrap();
    }
    let close = |a: &ndarray::Array2<f64>, b: &ArrayD<f64>| {
        a.iter().zip(b.iter()).all(|(p, q)| (p - q).abs() < 1e-12)
    };
    assert!(close(&cm.cross_correlation(), &g["cross"]));
    assert!(close(&cm.correlation(0.0), &g["pearson"]));
}
