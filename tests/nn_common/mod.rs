//! Helpers shared by the nn integration tests.
#![allow(dead_code)]

use modelfusion::nn::{Dataset, Mlp, Network, ResMlp};
use modelfusion::{Model, StateDict, Tensor};
use ndarray::{Array2, ArrayD};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A random data set of `n` samples with `features` features in [-1, 1).
pub fn random_dataset(n: usize, features: usize, classes: usize, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = Array2::from_shape_simple_fn((n, features), || rng.random::<f32>() * 2.0 - 1.0);
    let y = (0..n).map(|_| rng.random_range(0..classes)).collect();
    Dataset::new(x, y, classes).unwrap()
}

/// A random batch in the tensor's element type.
pub fn random_batch<S: modelfusion::Scalar>(n: usize, features: usize, seed: u64) -> Array2<S> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Array2::from_shape_simple_fn((n, features), || {
        S::from_f64_lossy(rng.random::<f64>() * 2.0 - 1.0)
    })
}

/// Replaces every running statistic with random values (mean in [-0.5, 0.5), variance
/// in [0.5, 1.5)) so that evaluation-mode normalisation is not the identity.
pub fn randomise_running_stats<T: Tensor>(net: &ResMlp, params: &mut StateDict<T>, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for j in 0..net.num_blocks() {
        for (stat, offset) in [("running_mean", -0.5), ("running_var", 0.5)] {
            let name = format!("blocks.{j}.norm.{stat}");
            let v = ArrayD::from_shape_simple_fn(vec![net.width()], || {
                <T::Elem as modelfusion::Scalar>::from_f64_lossy(rng.random::<f64>() + offset)
            });
            params.replace(&name, T::from_array(v)).unwrap();
        }
        // Non-trivial affine parameters too.
        for (p, offset) in [("weight", 0.5), ("bias", -0.5)] {
            let name = format!("blocks.{j}.norm.{p}");
            let v = ArrayD::from_shape_simple_fn(vec![net.width()], || {
                <T::Elem as modelfusion::Scalar>::from_f64_lossy(rng.random::<f64>() + offset)
            });
            params.replace(&name, T::from_array(v)).unwrap();
        }
    }
}

/// Every (param, axis) a permutation group touches, written out by hand from the
/// architecture (independently of any permutation spec).
pub fn mlp_group_axes(net: &Mlp, i: usize) -> Vec<(String, usize)> {
    assert!(i < net.num_hidden());
    vec![
        (format!("layers.{i}.weight"), 0),
        (format!("layers.{i}.bias"), 0),
        (format!("layers.{}.weight", i + 1), 1),
    ]
}

/// As [`mlp_group_axes`] for the residual MLP; `None` is the residual stream.
pub fn res_mlp_group_axes(net: &ResMlp, block: Option<usize>) -> Vec<(String, usize)> {
    match block {
        Some(j) => vec![
            (format!("blocks.{j}.fc1.weight"), 0),
            (format!("blocks.{j}.fc1.bias"), 0),
            (format!("blocks.{j}.fc2.weight"), 1),
        ],
        None => {
            let mut v = vec![
                ("stem.weight".to_string(), 0),
                ("stem.bias".to_string(), 0),
                ("head.weight".to_string(), 1),
            ];
            for j in 0..net.num_blocks() {
                for p in ["weight", "bias", "running_mean", "running_var"] {
                    v.push((format!("blocks.{j}.norm.{p}"), 0));
                }
                v.push((format!("blocks.{j}.fc1.weight"), 1));
                v.push((format!("blocks.{j}.fc2.weight"), 0));
                v.push((format!("blocks.{j}.fc2.bias"), 0));
            }
            v
        }
    }
}

/// Applies `perm` (new index i holds old index perm[i]) on every listed axis.
pub fn permute<T: Tensor>(
    params: &StateDict<T>,
    axes: &[(String, usize)],
    perm: &[usize],
) -> StateDict<T> {
    let mut out = params.clone();
    for (name, axis) in axes {
        let t = out.get(name).unwrap().take(*axis, perm).unwrap();
        out.replace(name, t).unwrap();
    }
    out
}

/// A seeded random permutation of `0..n`.
pub fn random_perm(n: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut p: Vec<usize> = (0..n).collect();
    p.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    p
}

/// Largest absolute difference of two arrays.
pub fn max_diff<S: modelfusion::Scalar>(a: &Array2<S>, b: &Array2<S>) -> f64 {
    assert_eq!(a.dim(), b.dim());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x.to_f64_lossless() - y.to_f64_lossless()).abs())
        .fold(0.0, f64::max)
}

/// Both reference networks behind one enum, for tests that run on each.
pub fn nets() -> (Mlp, ResMlp) {
    (
        Mlp::new(&[5, 7, 6, 3]).unwrap(),
        ResMlp::new(5, 6, 8, 2, 3).unwrap(),
    )
}

/// Asserts `net` sees `params` as valid.
pub fn assert_valid<N: Network, T: Tensor>(net: &N, params: &StateDict<T>) {
    net.check_params(params).unwrap();
}

/// `name v1 v2 ...` lines of `tests/golden/{file}` (comments skipped).
pub fn read_golden(file: &str) -> std::collections::HashMap<String, Vec<f64>> {
    let path = format!("{}/tests/golden/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next().unwrap().to_string();
            (name, it.map(|v| v.parse().unwrap()).collect())
        })
        .collect()
}

/// An MLP state dict whose element `k` of parameter `m` (in state-dict order) is
/// `value(m, k)`: the deterministic models the golden scripts rebuild.
pub fn formula_mlp(
    sizes: &[usize],
    value: impl Fn(usize, usize) -> f64,
) -> modelfusion::StateDictF64 {
    use modelfusion::nn::Architecture;
    let net = Mlp::new(sizes).unwrap();
    StateDict::from_pairs(
        net.shapes()
            .into_iter()
            .enumerate()
            .map(|(m, (name, shape))| {
                let len: usize = shape.iter().product();
                let v = (0..len).map(|k| value(m, k)).collect();
                (name, ArrayD::from_shape_vec(shape, v).unwrap())
            }),
    )
    .unwrap()
}
