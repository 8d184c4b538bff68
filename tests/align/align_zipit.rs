//! ZipIt!: the golden reference run (tests/golden/align/zipit_golden.py), the reduction
//! to permutation matching + averaging, function preservation, partial zipping, and
//! bad input.

use std::collections::BTreeMap;

use modelfusion::align::{ActivationMatching, Aligner, Correlation, GroupZip, ZipIt};
use modelfusion::nn::{Classification, Dataset, Mlp, Network};
use modelfusion::perm::infer::infer_model_spec;
use modelfusion::perm::specs::{Architecture, ResMlpShapes, ResNet, Vgg};
use modelfusion::perm::{PermutationSet, PermutationSpec, Role};
use modelfusion::{
    Activations, Error, Features, Model, Result, StateDictF32, StateDictF64, Tensor,
};
use ndarray::{Array2, ArrayD, Axis};
use proptest::prelude::*;

use crate::common;

fn golden() -> BTreeMap<String, ArrayD<f64>> {
    common::golden::golden_table(include_str!("../golden/align/zipit.txt"))
}

const NAMES: [&str; 6] = [
    "layers.0.weight",
    "layers.0.bias",
    "layers.1.weight",
    "layers.1.bias",
    "layers.2.weight",
    "layers.2.bias",
];

fn golden_model(g: &BTreeMap<String, ArrayD<f64>>, prefix: &str) -> StateDictF64 {
    StateDictF64::from_pairs(NAMES.map(|n| (n, g[&format!("{prefix}.{n}")].clone()))).unwrap()
}

fn max_diff(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn golden_matching_merge_and_partial_zip() {
    let g = golden();
    let (a, b) = (golden_model(&g, "a"), golden_model(&g, "b"));
    let x = g["x"].mapv(|v| v as f32).into_dimensionality().unwrap();
    let y: Vec<usize> = g["y"].iter().map(|&v| v as usize).collect();
    let data = Dataset::new(x, y, 3).unwrap();
    let net = Mlp::new(&[5, 6, 4, 3]).unwrap();
    // Batches of 16: the statistics are streamed over three batches.
    let task = Classification::new(&net, &data, 16).unwrap();
    for (tag, alpha, beta) in [("full", 1.0, 1.0), ("half", 0.5, 0.5), ("cross", 0.0, 1.0)] {
        let zip = ZipIt::new(task.clone())
            .with_alpha(alpha)
            .unwrap()
            .with_beta(beta)
            .unwrap()
            .zip(&a, &b, &net.spec())
            .unwrap();
        for l in 0..2 {
            let gz = zip.get(&format!("hidden.{l}")).unwrap();
            let expected: Vec<(usize, usize)> = g[&format!("{tag}.pairs.hidden.{l}")]
                .outer_iter()
                .map(|r| (r[0] as usize, r[1] as usize))
                .collect();
            assert_eq!(gz.pairs(), expected.as_slice(), "{tag} hidden.{l}");
        }
        let merged = zip.merge(&a, &b).unwrap();
        for n in NAMES {
            let d = max_diff(merged.get(n).unwrap(), &g[&format!("{tag}.merged.{n}")]);
            assert!(d < 1e-12, "{tag} {n}: {d}");
        }
        let logits = task.logits(&merged).unwrap().into_dyn();
        assert!(max_diff(&logits, &g[&format!("{tag}.logits")]) < 1e-10);
        let partial = zip.partial_mlp(&a, &b, 1).unwrap();
        assert_eq!(partial.sizes, [5, 6, 8, 3]);
        let wide = Mlp::new(&partial.sizes).unwrap();
        let z = Classification::new(&wide, &data, 16)
            .unwrap()
            .logits(&partial.model)
            .unwrap()
            .into_dyn();
        let d = max_diff(&z, &g[&format!("{tag}.partial1.logits")]);
        assert!(d < 1e-10, "{tag} partial: {d}");
    }
}

/// Permutation-equivariant synthetic features for any spec: for group `g`, unit `u`'s
/// feature on sample `s` is `sum_j X[s, j] * sorted(row u of g's first producer)[j]`
/// (sorting makes a row independent of the permutations of its other axes).
struct RowFeatures {
    spec: PermutationSpec,
    samples: usize,
    seed: u64,
}

impl Activations<StateDictF32> for RowFeatures {
    fn num_batches(&self) -> usize {
        2
    }
    fn activations(&self, m: &StateDictF32, batch: usize) -> Result<Features<f32>> {
        let mut out = Features::new();
        for (g, members) in self.spec.groups() {
            let (param, axis) = members
                .iter()
                .find(|(p, ax)| {
                    let nd = m.get(p).unwrap().shape().len();
                    self.spec.role(p, *ax, nd) == Role::Produce
                })
                .unwrap();
            let rows = m.get(param).unwrap().unfold(*axis)?;
            let sorted: Vec<Vec<f32>> = rows
                .outer_iter()
                .map(|r| {
                    let mut v = r.to_vec();
                    v.sort_by(f32::total_cmp);
                    v
                })
                .collect();
            let d = sorted[0].len();
            let x = common::gaussian_inputs(self.samples, d, self.seed + batch as u64);
            let f = Array2::from_shape_fn((self.samples, sorted.len()), |(s, u)| {
                (0..d).map(|j| x[[s, j]] * sorted[u][j]).sum::<f32>()
            });
            out.insert(g.to_string(), f);
        }
        Ok(out)
    }
}

fn shuffled(spec: &PermutationSpec, a: &StateDictF32, seed: u64) -> StateDictF32 {
    spec.apply(&PermutationSet::random(spec, a, seed).unwrap(), a)
        .unwrap()
}

#[test]
fn zipping_a_shuffled_copy_returns_the_model_on_ready_and_inferred_specs() {
    let vgg = Vgg::new(3, &[4, 6], &[5, 3], 3).unwrap();
    let resnet = ResNet::new(3, &[(4, 1), (6, 1)], 3).unwrap();
    let res_mlp = ResMlpShapes::new(6, 5, 7, 2, 3).unwrap();
    let cases: Vec<(&str, PermutationSpec, StateDictF32)> = vec![
        ("vgg", vgg.spec(), vgg.random_model(1)),
        ("resnet", resnet.spec(), resnet.random_model(2)),
        ("res_mlp", res_mlp.spec(), res_mlp.random_model(3)),
    ];
    for (name, spec, a) in cases {
        let inferred = infer_model_spec(&a, None).unwrap().spec;
        for spec in [spec.clone(), inferred] {
            let b = shuffled(&spec, &a, 9);
            for alpha in [0.0, 1.0] {
                let source = RowFeatures {
                    spec: spec.clone(),
                    samples: 24,
                    seed: 5,
                };
                let zip = ZipIt::new(source)
                    .with_alpha(alpha)
                    .unwrap()
                    .zip(&a, &b, &spec)
                    .unwrap();
                let merged = zip.merge(&a, &b).unwrap();
                let d = merged.max_abs_diff(&a).unwrap();
                assert!(d < 1e-5, "{name} alpha {alpha}: {d}");
                assert!(zip.permutations().is_some(), "{name}: twins found");
            }
        }
    }
}

fn digits_pair(widths: &[usize]) -> (Mlp, Dataset, StateDictF32, StateDictF32) {
    let mut sizes = vec![64];
    sizes.extend_from_slice(widths);
    sizes.push(10);
    let net = Mlp::new(&sizes).unwrap();
    let data = modelfusion::nn::data::digits().unwrap().head(150);
    (net.clone(), data, net.init(0), net.init(1))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// With within-model pairs forbidden, ZipIt! is permutation matching followed by
    /// averaging; its greedy matching never beats the optimal assignment.
    #[test]
    fn alpha_zero_is_permutation_matching_plus_averaging(w0 in 3usize..10, w1 in 3usize..10) {
        let (net, data, a, b) = digits_pair(&[w0, w1]);
        let task = Classification::new(&net, &data, 64).unwrap();
        let zip = ZipIt::new(task.clone()).with_alpha(0.0).unwrap()
            .with_constant_units(true).zip(&a, &b, &net.spec()).unwrap();
        let perms = zip.permutations().unwrap();
        let averaged = a.lerp(&net.spec().apply(&perms, &b).unwrap(), 0.5).unwrap();
        prop_assert!(zip.merge(&a, &b).unwrap().max_abs_diff(&averaged).unwrap() < 1e-6);
        // Every k: partial zipping of the permuted-average is the same network at k = depth.
        let full = task.logits(&zip.merge(&a, &b).unwrap()).unwrap();
        let p = zip.partial_mlp(&a, &b, 2).unwrap();
        let wide = Mlp::new(&p.sizes).unwrap();
        let z = Classification::new(&wide, &data, 64).unwrap().logits(&p.model).unwrap();
        prop_assert!((&z - &full).mapv(f32::abs).fold(0.0f32, |m, &v| m.max(v)) < 1e-4);
    }

    /// `M U = I` and `U M` is a projection, for any correlation matrix and options.
    #[test]
    fn merge_unmerge_algebra(n in 1usize..8, seed in 0u64..1000, alpha in 0.0f64..=1.0, beta in 0.0f64..=1.0) {
        let f = common::gaussian_inputs(30, 2 * n, seed).mapv(f64::from);
        let c = pearson(&f);
        let z = GroupZip::from_correlation(c.view(), alpha, beta).unwrap();
        prop_assert_eq!(z.merge().dot(z.unmerge()), Array2::<f64>::eye(n));
        let p = z.unmerge().dot(z.merge());
        prop_assert!((p.dot(&p) - &p).mapv(f64::abs).sum() < 1e-12);
        let (wa, wb) = z.within();
        prop_assert_eq!(wa, wb);
        prop_assert!(wa <= ((beta * n as f64) / 2.0 + 1e-9).floor() as usize);
        if alpha == 0.0 { prop_assert_eq!(wa, 0); }
        // every feature in exactly one pair
        let mut seen = vec![0; 2 * n];
        for &(i, j) in z.pairs() { seen[i] += 1; seen[j] += 1; prop_assert!(i < j); }
        prop_assert!(seen.iter().all(|&s| s == 1));
    }

    /// Zipping a model with a shuffled copy of itself gives the model back, fully and
    /// partially (every k): the output equals the model's.
    #[test]
    fn self_zip_preserves_the_function(w0 in 3usize..12, w1 in 3usize..12, seed in 0u64..100) {
        let (net, data, a, _) = digits_pair(&[w0, w1]);
        let b = shuffled(&net.spec(), &a, seed);
        let task = Classification::new(&net, &data, 64).unwrap();
        let zip = ZipIt::new(task.clone()).with_constant_units(true).zip(&a, &b, &net.spec()).unwrap();
        let want = task.logits(&a).unwrap();
        for k in 0..=2 {
            let p = zip.partial_mlp(&a, &b, k).unwrap();
            let wide = Mlp::new(&p.sizes).unwrap();
            let z = Classification::new(&wide, &data, 64).unwrap().logits(&p.model).unwrap();
            prop_assert!((&z - &want).mapv(f32::abs).fold(0.0f32, |m, &v| m.max(v)) < 1e-4, "k = {}", k);
        }
    }
}

fn pearson(f: &Array2<f64>) -> Array2<f64> {
    let mean = f.mean_axis(Axis(0)).unwrap();
    let c = f - &mean;
    let cov = c.t().dot(&c) / f.nrows() as f64;
    let s = cov.diag().mapv(f64::sqrt);
    Array2::from_shape_fn(cov.dim(), |(i, j)| cov[[i, j]] / (s[i] * s[j]))
}

#[test]
fn greedy_matching_never_beats_the_optimal_assignment() {
    let (net, data, a, b) = digits_pair(&[16]);
    let task = Classification::new(&net, &data, 64).unwrap();
    let zip = ZipIt::new(task.clone())
        .with_alpha(0.0)
        .unwrap()
        .with_constant_units(true)
        .zip(&a, &b, &net.spec())
        .unwrap();
    let am = ActivationMatching::new(task)
        .with_correlation(Correlation::Pearson)
        .align(&a, &b, &net.spec())
        .unwrap();
    let greedy = zip.get("hidden.0").unwrap().mean_correlation() * 16.0;
    let optimal = am.stats().objective[0];
    assert!(greedy <= optimal + 1e-9, "{greedy} > {optimal}");
    assert!(greedy > 0.5 * optimal, "{greedy} vs {optimal}");
}

#[test]
fn partial_zip_ends_are_the_merge_and_the_logit_ensemble() {
    let (net, data, a, b) = digits_pair(&[10, 8]);
    let task = Classification::new(&net, &data, 64).unwrap();
    let zip = ZipIt::new(task.clone())
        .with_constant_units(true)
        .zip(&a, &b, &net.spec())
        .unwrap();
    let logits = |p: &modelfusion::align::PartialZip<StateDictF32>| {
        let wide = Mlp::new(&p.sizes).unwrap();
        Classification::new(&wide, &data, 64)
            .unwrap()
            .logits(&p.model)
            .unwrap()
    };
    let full = task.logits(&zip.merge(&a, &b).unwrap()).unwrap();
    let top = logits(&zip.partial_mlp(&a, &b, 2).unwrap());
    assert!(
        (&top - &full)
            .mapv(f32::abs)
            .fold(0.0, |m: f32, &v| m.max(v))
            < 1e-4
    );
    let ens = (task.logits(&a).unwrap() + task.logits(&b).unwrap()) * 0.5;
    let bottom = zip.partial_mlp(&a, &b, 0).unwrap();
    assert_eq!(bottom.sizes, [64, 20, 16, 10]);
    assert!(
        (&logits(&bottom) - &ens)
            .mapv(f32::abs)
            .fold(0.0, |m: f32, &v| m.max(v))
            < 1e-4
    );
}

fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn bad_input_is_a_clear_error() {
    let (net, data, a, b) = digits_pair(&[6, 5]);
    let task = Classification::new(&net, &data, 64).unwrap();
    let spec = net.spec();
    // alpha / beta out of range
    for v in [-0.1, 1.5, f64::NAN] {
        let e = err_text(ZipIt::new(()).with_alpha(v));
        assert!(e.contains("alpha") && e.contains("[0, 1]"), "{e}");
        let e = err_text(ZipIt::new(()).with_beta(v));
        assert!(e.contains("beta"), "{e}");
        assert!(GroupZip::from_correlation(Array2::eye(4).view(), v, 1.0).is_err());
    }
    // a correlation matrix that is not 2n x 2n
    let e = err_text(GroupZip::from_correlation(Array2::eye(3).view(), 1.0, 1.0));
    assert!(e.contains("[3, 3]"), "{e}");
    let mut nan = Array2::eye(4);
    nan[[0, 2]] = f64::NAN;
    assert!(matches!(
        GroupZip::from_correlation(nan.view(), 1.0, 1.0),
        Err(Error::NonFinite { .. })
    ));
    let zipper = ZipIt::new(task.clone()).with_constant_units(true);
    // mismatched shapes between the models
    let (other_net, _, c, _) = digits_pair(&[7, 5]);
    let e = err_text(zipper.zip(&a, &c, &spec));
    assert!(e.contains("layers.0.weight"), "{e}");
    // a spec that does not fit the models
    let e = err_text(zipper.zip(&a, &b, &modelfusion::perm::specs::mlp(3)));
    assert!(e.contains("layers.3"), "{e}");
    // a matching used on models of other widths
    let zip = zipper.zip(&a, &b, &spec).unwrap();
    let c2: StateDictF32 = other_net.init(5);
    let e = err_text(zip.merge(&c2, &c2));
    assert!(e.contains("hidden.0"), "{e}");
    // k out of range
    let e = err_text(zip.partial_mlp(&a, &b, 3));
    assert!(e.contains("k = 3") && e.contains("0..=2"), "{e}");
    // partial zipping of a model that is not an MLP
    let rm = ResMlpShapes::new(4, 5, 6, 1, 3).unwrap();
    let (ra, rb) = (rm.random_model(0), rm.random_model(1));
    let rzip = ZipIt::new(RowFeatures {
        spec: rm.spec(),
        samples: 10,
        seed: 0,
    })
    .zip(&ra, &rb, &rm.spec())
    .unwrap();
    assert!(rzip.merge(&ra, &rb).is_ok());
    let e = err_text(rzip.partial_mlp(&ra, &rb, 1));
    assert!(e.contains("MLP layout"), "{e}");
    // a constant (dead) unit: an error naming it, unless accepted
    let mut dead = a.clone();
    dead.get_mut("layers.0.weight")
        .unwrap()
        .index_axis_mut(Axis(0), 2)
        .fill(0.0);
    dead.get_mut("layers.0.bias").unwrap()[[2]] = -1.0;
    let e = err_text(ZipIt::new(task.clone()).zip(&dead, &b, &spec));
    assert!(
        e.contains("unit 2") && e.contains("hidden.0") && e.contains("constant"),
        "{e}"
    );
    assert!(zipper.zip(&dead, &b, &spec).is_ok());
    // features of the wrong width, and no batches
    struct Narrow;
    impl Activations<StateDictF32> for Narrow {
        fn num_batches(&self) -> usize {
            1
        }
        fn activations(&self, _: &StateDictF32, _: usize) -> Result<Features<f32>> {
            Ok([
                ("hidden.0".to_string(), Array2::zeros((4, 6))),
                ("hidden.1".to_string(), Array2::zeros((4, 3))),
            ]
            .into())
        }
    }
    let e = err_text(ZipIt::new(Narrow).zip(&a, &b, &spec));
    assert!(e.contains("hidden.1") && e.contains("[4, 5]"), "{e}");
}
