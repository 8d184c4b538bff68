//! Information-theoretic activation matching: the binned and Gaussian mutual information
//! against scikit-learn / numpy (tests/golden/align/gen_mi.py), planted permutations
//! recovered, a non-linear dependence only the binned estimate sees, the Euclidean cost
//! as the cross-correlation in disguise, and bad input.

use std::ops::ControlFlow;

use modelfusion::align::{ActivationMatching, Aligner, Correlation, JointHistogram};
use modelfusion::perm::PermutationSet;
use modelfusion::perm::specs::{Architecture, MlpShapes};
use modelfusion::progress::{Observer, Progress};
use modelfusion::solve::linear_sum_assignment;
use modelfusion::{Activations, Error, Features, Model, Result, StateDictF32};
use ndarray::{Array1, Array2, Axis, s};
use proptest::prelude::*;

const N: usize = 300;
const BINS: usize = 6;

/// The script's features: `a` (300 x 4) and `b` (300 x 5).
fn features() -> (Array2<f64>, Array2<f64>) {
    let a = Array2::from_shape_fn((N, 4), |(n, i)| {
        (0.37 * (n as f64 + 1.0) * (i as f64 + 1.0) + 0.5 * i as f64).sin()
    });
    let b = Array2::from_shape_fn((N, 5), |(n, j)| {
        let n64 = n as f64;
        match j {
            0 => a[[n, 2]].powi(2),
            1 => (3.0 * a[[n, 0]]).cos(),
            2 => a[[n, 1]] + 0.3 * n64.sin(),
            3 => (1.7 * n64 + 0.1).sin(),
            _ => a[[n, 3]].abs(),
        }
    });
    (a, b)
}

fn golden(name: &str) -> Array2<f64> {
    let text = include_str!("../golden/align/mi.txt");
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap();
    let (head, vals) = line.split_once(" | ").unwrap();
    let dims: Vec<usize> = head
        .split(' ')
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    let vals: Vec<f64> = vals.split(' ').map(|v| v.parse().unwrap()).collect();
    Array2::from_shape_vec((dims[0], dims[1]), vals).unwrap()
}

fn ranges(x: &Array2<f64>) -> (Array1<f64>, Array1<f64>) {
    (
        x.fold_axis(Axis(0), f64::INFINITY, |m, &v| m.min(v)),
        x.fold_axis(Axis(0), f64::NEG_INFINITY, |m, &v| m.max(v)),
    )
}

#[test]
fn binned_information_matches_scikit_learn_in_batches() {
    let (a, b) = features();
    let mut h = JointHistogram::new(ranges(&a), ranges(&b), BINS).unwrap();
    h.update(a.slice(s![..170, ..]), b.slice(s![..170, ..]))
        .unwrap();
    h.update(a.slice(s![170.., ..]), b.slice(s![170.., ..]))
        .unwrap();
    assert_eq!(h.count(), N);
    let mi = h.mutual_information();
    let want = golden("binned");
    let d = (&mi - &want).mapv(f64::abs).fold(0.0f64, |m, &v| m.max(v));
    assert!(d < 1e-12, "binned MI differs from scikit-learn by {d}");
    // b0 = a2^2 is uncorrelated with a2 but shares a lot of information with it.
    assert!(want[[2, 0]] > 0.5 && golden("gaussian")[[2, 0]] < 1e-6);
}

/// Features of a fixed matrix for both models: `reference` gets `a`, every other model
/// `b` (told apart by the first bias, which the test sets).
struct Fixed(Array2<f64>, Array2<f64>);

impl Activations<StateDictF32> for Fixed {
    fn num_batches(&self) -> usize {
        2
    }

    fn activations(&self, m: &StateDictF32, batch: usize) -> Result<Features<f32>> {
        let is_ref = m.get("layers.0.bias").unwrap()[[0]] == 0.0;
        let x = if is_ref { &self.0 } else { &self.1 };
        let rows = if batch == 0 {
            s![..170, ..]
        } else {
            s![170.., ..]
        };
        Ok([("hidden.0".to_string(), x.slice(rows).mapv(|v| v as f32))].into())
    }
}

fn models(
    width: usize,
) -> (
    StateDictF32,
    StateDictF32,
    modelfusion::perm::PermutationSpec,
) {
    let arch = MlpShapes::new(&[3, width, 2]).unwrap();
    let mut a = arch.random_model(0);
    let mut b = arch.random_model(1);
    a.get_mut("layers.0.bias").unwrap()[[0]] = 0.0;
    b.get_mut("layers.0.bias").unwrap()[[0]] = 1.0;
    (a, b, arch.spec())
}

fn best(score: &Array2<f64>) -> Vec<usize> {
    linear_sum_assignment(score.view(), true)
        .unwrap()
        .permutation()
        .unwrap()
}

#[test]
fn matching_on_information_maximises_the_reference_scores() {
    // Square: the 4 units of `a` against the first 4 of `b`.
    let (a, b) = features();
    let b4 = b.slice(s![.., ..4]).to_owned();
    let (ma, mb, spec) = models(4);
    for (corr, name) in [
        (Correlation::BinnedInformation { bins: BINS }, "binned"),
        (Correlation::GaussianInformation, "gaussian"),
    ] {
        let want = golden(name).slice(s![.., ..4]).to_owned();
        let al = ActivationMatching::new(Fixed(a.clone(), b4.clone()))
            .with_correlation(corr)
            .align(&ma, &mb, &spec)
            .unwrap();
        let p = al.permutations().unwrap();
        let p = p.get("hidden.0").unwrap().as_slice().to_vec();
        assert_eq!(p, best(&want), "{name}");
        let score: f64 = p.iter().enumerate().map(|(i, &j)| want[[i, j]]).sum();
        let got = al.stats().objective[0];
        // f32 features: the Gaussian estimate moves in the 6th digit, the bins do not.
        assert!(
            (got - score).abs() < 1e-4 * score.max(1.0),
            "{name}: {got} vs {score}"
        );
    }
}

#[test]
fn only_the_binned_estimate_recovers_a_non_linear_planted_matching() {
    // b's unit j is a's unit perm[j], squared: a symmetric dependence no correlation sees.
    let (a, _) = features();
    let perm = [2usize, 0, 3, 1];
    let b = Array2::from_shape_fn((N, 4), |(n, j)| a[[n, perm[j]]].powi(2));
    let mut h = JointHistogram::new(ranges(&a), ranges(&b), 8).unwrap();
    h.update(a.view(), b.view()).unwrap();
    let p = best(&h.mutual_information());
    let inv: Vec<usize> = (0..4)
        .map(|i| perm.iter().position(|&u| u == i).unwrap())
        .collect();
    assert_eq!(p, inv);
    let pearson = hidden_matching(&a, &b, Correlation::Pearson);
    assert_ne!(
        pearson, inv,
        "Pearson should not see the squared dependence"
    );
    let binned = hidden_matching(&a, &b, Correlation::BinnedInformation { bins: 8 });
    assert_eq!(binned, inv);
}

/// The permutation activation matching finds between features `a` and `b` of a
/// one-group model.
fn hidden_matching(a: &Array2<f64>, b: &Array2<f64>, corr: Correlation) -> Vec<usize> {
    let (ma, mb, spec) = models(a.ncols());
    let al = ActivationMatching::new(Fixed(a.clone(), b.clone()))
        .with_correlation(corr)
        .align(&ma, &mb, &spec)
        .unwrap();
    al.permutations()
        .unwrap()
        .get("hidden.0")
        .unwrap()
        .as_slice()
        .to_vec()
}

#[test]
fn planted_permutations_are_recovered_by_both_estimates() {
    let arch = MlpShapes::new(&[5, 12, 2]).unwrap();
    let spec = arch.spec();
    let a = arch.random_model(4);
    let planted = PermutationSet::random(&spec, &a, 9).unwrap();
    let b = spec.apply(&planted, &a).unwrap();
    struct Hidden(Array2<f32>);
    impl Activations<StateDictF32> for Hidden {
        fn num_batches(&self) -> usize {
            1
        }
        fn activations(&self, m: &StateDictF32, _: usize) -> Result<Features<f32>> {
            let w = m.get("layers.0.weight").unwrap();
            let w = w.view().into_dimensionality::<ndarray::Ix2>().unwrap();
            let h = (self.0.dot(&w.t()) + m.get("layers.0.bias").unwrap()).mapv(|v| v.max(0.0));
            Ok([("hidden.0".to_string(), h.into_dimensionality().unwrap())].into())
        }
    }
    let x = Array2::from_shape_fn((256, 5), |(i, j)| ((i * 7 + j * 3) % 11) as f32 / 5.0 - 1.0);
    for corr in [
        Correlation::GaussianInformation,
        Correlation::BinnedInformation { bins: 10 },
    ] {
        let al = ActivationMatching::new(Hidden(x.clone()))
            .with_correlation(corr)
            .align(&a, &b, &spec)
            .unwrap();
        assert_eq!(
            al.apply(&spec, &b).unwrap().max_abs_diff(&a).unwrap(),
            0.0,
            "{corr:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// `E||a - P b||^2 = E||a||^2 + E||b||^2 - 2 sum_i E[a_i b_P(i)]`: the Euclidean
    /// matching cost and the cross-correlation pick the same permutation, and the costs
    /// agree through that identity.
    #[test]
    fn the_euclidean_cost_is_the_cross_correlation_in_disguise(
        d in 2usize..8,
        n in 3usize..40,
        seed in 0u64..10_000,
    ) {
        let v = |k: u64| ((seed.wrapping_mul(6364136223846793005).wrapping_add(k * 1442695040888963407) >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0;
        let a = Array2::from_shape_fn((n, d), |(i, j)| v((i * d + j) as u64));
        let b = Array2::from_shape_fn((n, d), |(i, j)| v((n * d + i * d + j) as u64 + 7));
        let cross = a.t().dot(&b) / n as f64;
        let dist = Array2::from_shape_fn((d, d), |(i, j)| {
            (0..n).map(|k| (a[[k, i]] - b[[k, j]]).powi(2)).sum::<f64>() / n as f64
        });
        let by_dist = linear_sum_assignment(dist.view(), false).unwrap().permutation().unwrap();
        let by_cross = best(&cross);
        prop_assert_eq!(&by_dist, &by_cross);
        let sq = |x: &Array2<f64>| x.mapv(|v| v * v).sum() / n as f64;
        let total: f64 = by_dist.iter().enumerate().map(|(i, &j)| dist[[i, j]]).sum();
        let gain: f64 = by_cross.iter().enumerate().map(|(i, &j)| cross[[i, j]]).sum();
        prop_assert!((total - (sq(&a) + sq(&b) - 2.0 * gain)).abs() < 1e-9);
    }
}

struct StopAfter(usize);

impl Observer for StopAfter {
    fn observe(&mut self, p: &Progress) -> ControlFlow<()> {
        match p {
            Progress::Batch { done, .. } if *done >= self.0 => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    }
}

#[test]
fn bad_input_is_named() {
    let (a, b) = features();
    let b4 = b.slice(s![.., ..4]).to_owned();
    let (ma, mb, spec) = models(4);
    for bins in [0, 1, 65] {
        let e = ActivationMatching::new(Fixed(a.clone(), b4.clone()))
            .with_correlation(Correlation::BinnedInformation { bins })
            .align(&ma, &mb, &spec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bins") && e.contains(&bins.to_string()), "{e}");
    }
    let mut nan = b4.clone();
    nan[[200, 1]] = f64::NAN;
    let e = ActivationMatching::new(Fixed(a.clone(), nan))
        .with_correlation(Correlation::BinnedInformation { bins: 4 })
        .align(&ma, &mb, &spec)
        .unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("hidden.0") && e.contains("batch 1") && e.contains("feature 1"),
        "{e}"
    );
    let e = ActivationMatching::new(Fixed(a.clone(), a.slice(s![.., ..3]).to_owned()))
        .with_correlation(Correlation::BinnedInformation { bins: 4 })
        .align(&ma, &mb, &spec)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hidden.0") && e.contains('3') && e.contains('4'),
        "{e}"
    );
    // Cancelled in the second pass (batch 3 of 4).
    let e = ActivationMatching::new(Fixed(a.clone(), b4))
        .with_correlation(Correlation::BinnedInformation { bins: 4 })
        .align_observed(&ma, &mb, &spec, &mut StopAfter(3))
        .unwrap_err();
    assert!(matches!(e, Error::Cancelled { .. }), "{e}");
    let r = (Array1::from(vec![0.0]), Array1::from(vec![f64::NAN]));
    assert!(
        JointHistogram::new(r.clone(), r, 4)
            .unwrap_err()
            .to_string()
            .contains("x unit 0")
    );
}
