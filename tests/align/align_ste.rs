//! STE matching and differentiable (Sinkhorn) re-basin: valid permutations, planted
//! permutations recovered, function preservation, a golden STE run (JAX + scipy,
//! tests/golden/align/ste_golden.py) and bad input.

use crate::common;

use std::collections::BTreeMap;

use common::*;
use modelfusion::align::{Aligner, SinkhornRebasin, SteMatching, WeightMatching};
use modelfusion::nn::{Classification, Dataset, Mlp, Network, data};
use modelfusion::optim::Optimizer;
use modelfusion::perm::specs::{Architecture, MlpShapes};
use modelfusion::perm::{PermutationSet, PermutationSpec, SpecBuilder};
use modelfusion::{Error, Model, Objective, StateDictF32};
use ndarray::{Array2, ArrayD};
use proptest::prelude::*;

fn golden() -> BTreeMap<String, ArrayD<f64>> {
    common::golden::golden_table(include_str!("../golden/align/ste.txt"))
}

fn perm_of(a: &ArrayD<f64>) -> Vec<usize> {
    a.iter().map(|&v| v as usize).collect()
}

/// A small digits task and an MLP over it.
fn digits_task(n: usize) -> (Dataset, Mlp) {
    (
        data::digits().unwrap().head(n),
        Mlp::new(&[64, 12, 12, 10]).unwrap(),
    )
}

fn is_permutation(p: &[usize]) -> bool {
    let mut seen = vec![false; p.len()];
    p.iter()
        .all(|&j| j < p.len() && !std::mem::replace(&mut seen[j], true))
}

fn check_valid(perms: &PermutationSet, spec: &PermutationSpec, m: &StateDictF32) {
    let sizes = spec.validate(m).unwrap();
    assert_eq!(perms.len(), sizes.len());
    for (g, n) in sizes {
        let p = perms.get(&g).unwrap().as_slice();
        assert_eq!(p.len(), n, "group {g}");
        assert!(is_permutation(p), "group {g}: {p:?}");
    }
}

#[test]
fn ste_matches_the_jax_reference_run() {
    let g = golden();
    let (a, b) = (golden_mlp(&g, "a"), golden_mlp(&g, "b"));
    let x = g["x"]
        .clone()
        .into_dimensionality()
        .unwrap()
        .mapv(|v: f64| v as f32);
    let y = perm_of(&g["y"]);
    let d = Dataset::new(x, y, 3).unwrap();
    let net = Mlp::new(&[5, 7, 3]).unwrap();
    let task = Classification::new(&net, &d, 16).unwrap();
    let ste = SteMatching::new(task.clone(), 0)
        .with_steps(30)
        .unwrap()
        .with_learning_rate(0.05)
        .unwrap();
    let al = ste.align(&a, &b, &net.spec()).unwrap();
    let want = g["ste.history"].as_slice().unwrap();
    let got = &al.stats().objective;
    assert_eq!(got.len(), want.len());
    for (i, (x, y)) in got.iter().zip(want).enumerate() {
        assert!(
            (x - y).abs() < 1e-9 * y.abs().max(1.0),
            "step {i}: {x} vs {y}"
        );
    }
    assert_eq!(al.stats().sweeps, 30);
    let perm = al.permutations().unwrap();
    assert_eq!(
        perm.get("hidden.0").unwrap().as_slice(),
        perm_of(&g["ste.perm"])
    );
    // the proxy moved: the result is not weight matching's answer on A
    let wm = WeightMatching::new(0).align(&a, &b, &net.spec()).unwrap();
    let first = wm.permutations().unwrap();
    assert_eq!(
        first.get("hidden.0").unwrap().as_slice(),
        perm_of(&g["ste.first_perm"])
    );
    assert_ne!(first, perm);
}

#[test]
fn ste_lowers_the_midpoint_loss_below_weight_matching() {
    let (d, net) = digits_task(300);
    let task = Classification::new(&net, &d, 300).unwrap();
    let (a, b): (StateDictF32, StateDictF32) = (net.init(1), net.init(2));
    let spec = net.spec();
    let ste = SteMatching::new(task.clone(), 0)
        .with_steps(40)
        .unwrap()
        .with_learning_rate(1e-2)
        .unwrap()
        .align(&a, &b, &spec)
        .unwrap();
    check_valid(&ste.permutations().unwrap(), &spec, &a);
    let wm = WeightMatching::new(0).align(&a, &b, &spec).unwrap();
    let mid = |al: &modelfusion::align::Alignment| {
        task.loss(&a.lerp(&al.apply(&spec, &b).unwrap(), 0.5).unwrap())
            .unwrap()
    };
    let (l_ste, l_wm) = (mid(&ste), mid(&wm));
    assert!(
        l_ste < l_wm,
        "STE midpoint loss {l_ste} vs weight matching {l_wm}"
    );
    // the first step's loss is weight matching's midpoint loss (the proxy starts at A)
    assert!((ste.stats().objective[0] - l_wm).abs() < 1e-6);
}

#[test]
fn ste_is_deterministic() {
    let (d, net) = digits_task(100);
    let task = Classification::new(&net, &d, 50).unwrap();
    let (a, b): (StateDictF32, StateDictF32) = (net.init(3), net.init(4));
    let ste = SteMatching::new(task.clone(), 5).with_steps(5).unwrap();
    assert_eq!(
        ste.align(&a, &b, &net.spec()).unwrap(),
        ste.align(&a, &b, &net.spec()).unwrap()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]
    #[test]
    fn ste_recovers_planted_and_keeps_function(seed in 0u64..1000) {
        let (d, net) = digits_task(64);
        let task = Classification::new(&net, &d, 64).unwrap();
        let spec = net.spec();
        let a: StateDictF32 = net.init(seed);
        let planted = PermutationSet::random(&spec, &a, seed + 1).unwrap();
        let b = with_noise(&spec.apply(&planted, &a).unwrap(), 1e-4, seed + 2);
        let al = SteMatching::new(task.clone(), seed).with_steps(3).unwrap().align(&a, &b, &spec).unwrap();
        prop_assert_eq!(al.permutations().unwrap(), planted.inverse());
        let aligned = al.apply(&spec, &b).unwrap();
        let x = gaussian_inputs(9, 64, seed);
        prop_assert!(max_abs(&mlp_forward(&aligned, 3, &x), &mlp_forward(&b, 3, &x)) < 1e-4);
    }

    #[test]
    fn sinkhorn_recovers_planted_and_keeps_function(
        sizes in proptest::collection::vec(2usize..9, 3..5),
        seed in 0u64..1000,
    ) {
        let arch = MlpShapes::new(&sizes).unwrap();
        let spec = arch.spec();
        let a = arch.random_model(seed);
        let planted = PermutationSet::random(&spec, &a, seed + 1).unwrap();
        let b = with_noise(&spec.apply(&planted, &a).unwrap(), 1e-4, seed + 2);
        let al = SinkhornRebasin::weight_distance(seed)
            .with_steps(300)
            .unwrap()
            .align(&a, &b, &spec)
            .unwrap();
        let perms = al.permutations().unwrap();
        check_valid(&perms, &spec, &a);
        prop_assert_eq!(perms, planted.inverse());
        let aligned = al.apply(&spec, &b).unwrap();
        let x = gaussian_inputs(9, sizes[0], seed);
        let layers = sizes.len() - 1;
        prop_assert!(max_abs(&mlp_forward(&aligned, layers, &x), &mlp_forward(&b, layers, &x)) < 1e-4);
    }
}

#[test]
fn sinkhorn_midpoint_returns_valid_permutations() {
    let (d, net) = digits_task(100);
    let task = Classification::new(&net, &d, 100).unwrap();
    let (a, b): (StateDictF32, StateDictF32) = (net.init(1), net.init(2));
    let spec = net.spec();
    let al = SinkhornRebasin::midpoint(task.clone(), 0)
        .with_steps(10)
        .unwrap()
        .align(&a, &b, &spec)
        .unwrap();
    check_valid(&al.permutations().unwrap(), &spec, &a);
    assert_eq!(al.stats().objective.len(), 10);
    // B's function is kept
    let aligned = al.apply(&spec, &b).unwrap();
    assert!((task.loss(&aligned).unwrap() - task.loss(&b).unwrap()).abs() < 1e-4);
}

fn message(e: Error) -> String {
    e.to_string()
}

#[test]
fn bad_input_is_a_clear_error() {
    let (d, net) = digits_task(40);
    let task = Classification::new(&net, &d, 40).unwrap();
    let (a, b): (StateDictF32, StateDictF32) = (net.init(1), net.init(2));
    let spec = net.spec();
    // empty data never becomes an objective
    let empty = Dataset::new(Array2::zeros((0, 64)), vec![], 10);
    assert!(empty.is_err() || Classification::new(&net, &empty.unwrap(), 8).is_err());
    // zero steps, lr <= 0
    assert!(
        message(SteMatching::new(task.clone(), 0).with_steps(0).unwrap_err()).contains("steps")
    );
    assert!(
        message(
            SinkhornRebasin::midpoint(task.clone(), 0)
                .with_steps(0)
                .unwrap_err()
        )
        .contains("steps")
    );
    for lr in [0.0, -1e-3, f64::NAN] {
        assert!(
            message(
                SteMatching::new(task.clone(), 0)
                    .with_learning_rate(lr)
                    .unwrap_err()
            )
            .contains("lr")
        );
        assert!(
            message(
                SinkhornRebasin::weight_distance(0)
                    .with_learning_rate(lr)
                    .unwrap_err()
            )
            .contains("lr")
        );
        let bad = Optimizer::Sgd {
            lr,
            momentum: 0.0,
            nesterov: false,
        };
        assert!(
            SteMatching::new(task.clone(), 0)
                .with_optimizer(bad)
                .is_err()
        );
    }
    assert!(
        message(
            SinkhornRebasin::weight_distance(0)
                .with_tau(-1.0)
                .unwrap_err()
        )
        .contains("tau")
    );
    // mismatched models
    let other = MlpShapes::new(&[64, 12, 13, 10]).unwrap().random_model(0);
    let msg = message(
        SteMatching::new(task.clone(), 0)
            .align(&a, &other, &spec)
            .unwrap_err(),
    );
    assert!(msg.contains("13"), "{msg}");
    assert!(
        SinkhornRebasin::weight_distance(0)
            .align(&a, &other, &spec)
            .is_err()
    );
    // a non-finite model
    let mut nan = b.clone();
    nan.get_mut("layers.0.weight").unwrap()[[0, 0]] = f32::NAN;
    assert!(
        SteMatching::new(task.clone(), 0)
            .align(&a, &nan, &spec)
            .is_err()
    );
    // an objective returning NaN, or a gradient of the wrong shape
    struct Broken(bool);
    impl Objective<StateDictF32> for Broken {
        fn loss(&self, _: &StateDictF32) -> modelfusion::Result<f64> {
            Ok(f64::NAN)
        }
    }
    impl modelfusion::Gradient<StateDictF32> for Broken {
        fn loss_and_gradient(&self, m: &StateDictF32) -> modelfusion::Result<(f64, StateDictF32)> {
            if self.0 {
                Ok((f64::NAN, m.clone()))
            } else {
                Ok((1.0, StateDictF32::new()))
            }
        }
    }
    for broken in [Broken(true), Broken(false)] {
        let e = SteMatching::new(broken, 0)
            .with_steps(2)
            .unwrap()
            .align(&a, &b, &spec)
            .unwrap_err();
        assert!(matches!(e, Error::Objective(_)), "{e}");
    }
    let e = SinkhornRebasin::midpoint(Broken(true), 0)
        .align(&a, &b, &spec)
        .unwrap_err();
    assert!(matches!(e, Error::Objective(_)), "{e}");
    // a flattened group is refused
    let mut builder = SpecBuilder::new();
    builder
        .producer("c", "conv", true)
        .flatten_consumer("c", "fc", 4)
        .invariant("conv.weight")
        .invariant("fc.weight")
        .invariant("fc.bias");
    let flat = builder.build().unwrap();
    let m = StateDictF32::from_pairs([
        ("conv.weight", ArrayD::<f32>::ones(vec![3, 2])),
        ("conv.bias", ArrayD::<f32>::ones(vec![3])),
        ("fc.weight", ArrayD::<f32>::ones(vec![2, 12])),
        ("fc.bias", ArrayD::<f32>::ones(vec![2])),
    ])
    .unwrap();
    let e = SinkhornRebasin::weight_distance(0)
        .align(&m, &m, &flat)
        .unwrap_err();
    assert!(message(e).contains("repeat"));
}
