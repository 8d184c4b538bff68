//! The reference networks follow the naming convention of the ready permutation specs:
//! same parameter shapes as `perm::specs`, same groups, and any permutation set applied
//! through `perm::specs::mlp` / `res_mlp` keeps the network's function.
#![cfg(feature = "nn")]

use crate::nn_common;

use modelfusion::nn::{Mlp, Mode, Network, ResMlp};
use modelfusion::perm::PermutationSet;
use modelfusion::perm::specs::{self, Architecture};
use modelfusion::{Model, StateDictF32};
use nn_common::*;
use proptest::prelude::*;

#[test]
fn groups_match_the_ready_specs() {
    let mlp = Mlp::new(&[64, 32, 16, 10]).unwrap();
    let res = ResMlp::new(64, 32, 48, 2, 10).unwrap();
    // The networks' specs are the ready ones, and their initialised state dicts fit them.
    assert_eq!(mlp.spec(), specs::mlp(2));
    assert_eq!(res.spec(), specs::res_mlp(2));
    let pm: StateDictF32 = mlp.init(0);
    let widths = specs::mlp(2).validate(&pm).unwrap();
    for (g, w) in mlp.groups() {
        assert_eq!(widths[&g], w, "{g}");
    }
    for (net_groups, spec) in [
        (mlp.groups(), specs::mlp(mlp.num_hidden())),
        (res.groups(), specs::res_mlp(res.num_blocks())),
    ] {
        let mut ours: Vec<String> = net_groups.iter().map(|(g, _)| g.clone()).collect();
        let mut theirs: Vec<String> = spec.group_names().map(String::from).collect();
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs);
    }
    // The spec's group widths are the network's.
    let p: StateDictF32 = res.init(0);
    let widths = specs::res_mlp(2).validate(&p).unwrap();
    for (g, w) in res.groups() {
        assert_eq!(widths[&g], w, "{g}");
    }
    // The hand-written axes of the residual stream (used by the other tests) agree
    // with the spec.
    let spec = specs::res_mlp(2);
    let mut hand = res_mlp_group_axes(&res, None);
    hand.sort();
    let mut from_spec = spec.group("residual").unwrap().to_vec();
    from_spec.sort();
    assert_eq!(hand, from_spec);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn spec_permutations_keep_both_networks_functions(seed in 0u64..10_000) {
        let (mlp, res) = nets();
        let x = random_batch::<f32>(9, 5, seed);
        let pm: StateDictF32 = mlp.init(seed);
        let spec = specs::mlp(mlp.num_hidden());
        let perms = PermutationSet::random(&spec, &pm, seed + 1).unwrap();
        let qm = spec.apply(&perms, &pm).unwrap();
        let (a, b) = (mlp.logits(&pm, x.view()).unwrap(), mlp.logits(&qm, x.view()).unwrap());
        prop_assert!(max_diff(&a, &b) < 1e-5);

        let mut pr: StateDictF32 = res.init(seed);
        randomise_running_stats(&res, &mut pr, seed);
        let spec = specs::res_mlp(res.num_blocks());
        let perms = PermutationSet::random(&spec, &pr, seed + 2).unwrap();
        let qr = spec.apply(&perms, &pr).unwrap();
        prop_assert!(qr.max_abs_diff(&pr).unwrap() > 0.0);
        for mode in [Mode::Eval, Mode::Train] {
            let a = res.forward(&pr, x.view(), mode).unwrap().0;
            let b = res.forward(&qr, x.view(), mode).unwrap().0;
            prop_assert!(max_diff(&a, &b) < 1e-5);
        }
    }
}
