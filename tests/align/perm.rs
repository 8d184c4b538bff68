//! Permutations and permutation specs: invariants and bad input.

use crate::common;

use common::*;
use modelfusion::perm::specs::{self, Architecture, MlpShapes, ResMlpShapes, ResNet, Vgg};
use modelfusion::perm::{Permutation, PermutationSet, PermutationSpec};
use modelfusion::{Error, Model, StateDict};
use ndarray::{Array2, Array3, ArrayD};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

fn randn2(n: usize, d: usize, seed: u64) -> Array2<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let nd = Normal::new(0.0f32, 1.0).unwrap();
    Array2::from_shape_fn((n, d), |_| nd.sample(&mut rng))
}
fn images(n: usize, c: usize, hw: usize, seed: u64) -> Vec<Array3<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let nd = Normal::new(0.0f32, 1.0).unwrap();
    (0..n)
        .map(|_| Array3::from_shape_fn((c, hw, hw), |_| nd.sample(&mut rng)))
        .collect()
}

fn permute_and_back<A: Architecture>(
    arch: &A,
    seed: u64,
) -> (modelfusion::StateDictF32, modelfusion::StateDictF32) {
    let model = arch.random_model(seed);
    let spec = arch.spec();
    let perms = PermutationSet::random(&spec, &model, seed ^ 0x5eed).unwrap();
    let permuted = spec.apply(&perms, &model).unwrap();
    let back = spec.apply(&perms.inverse(), &permuted).unwrap();
    assert_eq!(back.max_abs_diff(&model).unwrap(), 0.0);
    if !perms.is_identity() {
        assert!(
            permuted.max_abs_diff(&model).unwrap() > 0.0,
            "a permutation moved nothing"
        );
    }
    (model, permuted)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn mlp_permutation_keeps_function(sizes in proptest::collection::vec(1usize..12, 2..6), seed in any::<u64>()) {
        let arch = MlpShapes::new(&sizes).unwrap();
        let (a, b) = permute_and_back(&arch, seed);
        let x = randn2(5, sizes[0], seed);
        let (ya, yb) = (mlp_forward(&a, sizes.len() - 1, &x), mlp_forward(&b, sizes.len() - 1, &x));
        prop_assert!(max_abs(&ya, &yb) <= 1e-5 * (1.0 + ya.iter().fold(0.0f32, |m, v| m.max(v.abs()))));
    }

    #[test]
    fn res_mlp_permutation_keeps_function(width in 1usize..10, hidden in 1usize..10, blocks in 0usize..4, seed in any::<u64>()) {
        let arch = ResMlpShapes::new(6, width, hidden, blocks, 3).unwrap();
        let (a, b) = permute_and_back(&arch, seed);
        let x = randn2(4, 6, seed);
        let (ya, yb) = (res_mlp_forward(&a, blocks, &x), res_mlp_forward(&b, blocks, &x));
        prop_assert!(max_abs(&ya, &yb) <= 1e-5 * (1.0 + ya.iter().fold(0.0f32, |m, v| m.max(v.abs()))));
    }

    #[test]
    fn permutation_group_laws(n in 0usize..40, s1 in any::<u64>(), s2 in any::<u64>()) {
        let p = Permutation::random(n, s1);
        let q = Permutation::random(n, s2);
        let x: Vec<usize> = (0..n).map(|i| i * 7 + 1).collect();
        prop_assert_eq!(p.then(&q).unwrap().apply_to(&x).unwrap(), q.apply_to(&p.apply_to(&x).unwrap()).unwrap());
        prop_assert!(p.then(&p.inverse()).unwrap().is_identity());
        prop_assert!(p.inverse().then(&p).unwrap().is_identity());
        prop_assert_eq!(Permutation::new(p.as_slice().to_vec()).unwrap(), p);
    }
}

#[test]
fn vgg_permutation_keeps_function() {
    let arch = Vgg::new(2, &[3, 4, 5], &[6, 3], 3).unwrap();
    for seed in 0..3 {
        let (a, b) = permute_and_back(&arch, seed);
        let xs = images(2, 2, 5, seed);
        let (ya, yb) = (vgg_forward(&a, 3, 2, &xs), vgg_forward(&b, 3, 2, &xs));
        assert!(max_abs(&ya, &yb) < 1e-4, "{ya} vs {yb}");
    }
}

#[test]
fn resnet_permutation_keeps_function() {
    let stages = [(3, 2), (5, 1), (6, 2)];
    let arch = ResNet::new(2, &stages, 4).unwrap();
    for seed in 0..3 {
        let (a, b) = permute_and_back(&arch, seed);
        let xs = images(2, 2, 7, seed);
        let (ya, yb) = (
            resnet_forward(&a, &stages, &xs),
            resnet_forward(&b, &stages, &xs),
        );
        assert!(max_abs(&ya, &yb) < 1e-4, "{ya} vs {yb}");
    }
}

#[test]
fn a_wrong_spec_changes_the_function() {
    // The check above can fail: forgetting one consumer breaks function preservation.
    let arch = MlpShapes::new(&[4, 8, 3]).unwrap();
    let model = arch.random_model(1);
    let broken = PermutationSpec::from_groups([(
        "hidden.0",
        vec![("layers.0.weight", 0), ("layers.0.bias", 0)],
    )])
    .unwrap();
    // `apply` refuses it, naming the forgotten consumer ...
    let perms = PermutationSet::random(&broken, &model, 9).unwrap();
    let err = broken.apply(&perms, &model).unwrap_err().to_string();
    assert!(
        err.contains("layers.1.weight") && err.contains("no consumer"),
        "{err}"
    );
    // ... and the function check shows that it does break the function, and where.
    let x = randn2(5, 4, 0);
    let forward = |m: &modelfusion::StateDictF32| {
        Ok(mlp_forward(m, 2, &x).iter().map(|&v| v as f64).collect())
    };
    let r = modelfusion::perm::check_function_preserved(&broken, &model, forward, 9, 1e-5).unwrap();
    assert!(!r.passed() && r.max_abs_diff > 1e-3, "{r:?}");
    assert_eq!(r.broken_groups.len(), 1);
    assert_eq!(r.broken_groups[0].0, "hidden.0");
    let good = modelfusion::perm::check_function_preserved(&arch.spec(), &model, forward, 9, 1e-5)
        .unwrap();
    assert!(good.passed(), "{good:?}");
}

#[test]
fn ready_specs_fit_their_shapes() {
    for (spec, model) in [
        (Vgg::vgg16(1, 10).spec(), Vgg::vgg16(1, 10).random_model(0)),
        (
            ResNet::resnet20(2, 10).spec(),
            ResNet::resnet20(2, 10).random_model(0),
        ),
    ] {
        let sizes = spec.validate(&model).unwrap();
        assert_eq!(sizes.len(), spec.num_groups());
        // Every parameter with a dimension other than the class count is permuted somewhere.
        for name in model.names() {
            assert!(
                spec.axes(name).is_some() || name.ends_with("bias"),
                "{name} not in the spec"
            );
        }
    }
    let sizes = ResNet::resnet20(4, 10)
        .spec()
        .validate(&ResNet::resnet20(4, 10).random_model(0))
        .unwrap();
    assert_eq!(sizes["stream.1"], 64);
    assert_eq!(sizes["layer3.2.inner"], 256);
    assert_eq!(specs::mlp(0).num_groups(), 0);
}

fn sd(pairs: &[(&str, &[usize])]) -> modelfusion::StateDictF32 {
    StateDict::from_pairs(
        pairs
            .iter()
            .map(|(n, s)| (*n, ArrayD::<f32>::zeros(s.to_vec()))),
    )
    .unwrap()
}

#[test]
fn spec_errors_name_param_axis_and_sizes() {
    let spec = specs::mlp(1);
    // Missing parameter.
    let m = sd(&[("layers.0.weight", &[4, 2]), ("layers.0.bias", &[4])]);
    let e = spec.validate(&m).unwrap_err().to_string();
    assert!(
        e.contains("layers.1.weight") && e.contains("hidden.0"),
        "{e}"
    );
    // Inconsistent sizes within a group.
    let m = sd(&[
        ("layers.0.weight", &[4, 2]),
        ("layers.0.bias", &[4]),
        ("layers.1.weight", &[3, 5]),
    ]);
    let e = spec.validate(&m).unwrap_err().to_string();
    assert!(
        e.contains("size 4") && e.contains("size 5") && e.contains("layers.1.weight"),
        "{e}"
    );
    // Axis out of range.
    let m = sd(&[
        ("layers.0.weight", &[4, 2]),
        ("layers.0.bias", &[4]),
        ("layers.1.weight", &[3]),
    ]);
    let e = spec.validate(&m).unwrap_err().to_string();
    assert!(e.contains("axis 1") && e.contains("[3]"), "{e}");
    // Inconsistent spec definitions.
    assert!(matches!(
        PermutationSpec::from_axes([("w", vec![Some("a")]), ("w", vec![Some("b")])]),
        Err(Error::Spec { .. })
    ));
    assert!(PermutationSpec::from_groups([("a", Vec::<(&str, usize)>::new())]).is_err());
}

#[test]
fn wrong_permutations_are_rejected() {
    let arch = MlpShapes::new(&[3, 4, 2]).unwrap();
    let model = arch.random_model(0);
    let spec = arch.spec();
    let mut perms = PermutationSet::new();
    perms.insert("hidden.0", Permutation::identity(5));
    let e = spec.apply(&perms, &model).unwrap_err().to_string();
    assert!(e.contains("length 5") && e.contains("size 4"), "{e}");
    let e = spec
        .apply(&PermutationSet::new(), &model)
        .unwrap_err()
        .to_string();
    assert!(e.contains("hidden.0"), "{e}");
    assert!(Permutation::new(vec![1, 2]).is_err());
    assert!(Permutation::new(vec![0, 0]).is_err());
    assert!(Permutation::identity(3).apply_to(&[1, 2]).is_err());
    let other = PermutationSet::from_iter([("x".to_string(), Permutation::identity(2))]);
    assert!(perms.then(&other).is_err());
}

#[test]
fn specs_built_both_ways_agree() {
    let a = specs::mlp(2);
    let b =
        PermutationSpec::from_axes(a.param_names().map(|p| (p.to_string(), a.axes(p).unwrap())))
            .unwrap();
    assert_eq!(
        a.groups().collect::<Vec<_>>(),
        b.groups().collect::<Vec<_>>()
    );
    assert_eq!(
        a.axes("layers.1.weight").unwrap(),
        vec![Some("hidden.1"), Some("hidden.0")]
    );
}
