//! Alignment with the reference networks of `nn`: activation matching and REPAIR on the
//! digits data, and their bad input.
#![cfg(feature = "nn")]

use modelfusion::align::{
    ActivationMatching, Aligner, Correlation, GroundCost, Marginals, OtFusion, Repair, Transport,
    WeightMatching,
};
use modelfusion::nn::{Classification, Dataset, Mlp, Network, ResMlp, data};
use modelfusion::perm::{PermutationSet, specs};
use modelfusion::{Activations, Error, Features, Model, Objective, Result, StateDictF32};

fn digits(n: usize) -> Dataset {
    data::digits().unwrap().head(n)
}

/// Every unit that fires on the data is matched back to its planted position (units
/// that never fire are interchangeable), and the aligned model computes the same loss.
fn check_recovered<N: Network>(
    task: &Classification<'_, N>,
    a: &StateDictF32,
    b: &StateDictF32,
    al: &modelfusion::align::Alignment,
    pi: &PermutationSet,
    spec: &modelfusion::perm::PermutationSpec,
) {
    let feats = task.activations(a, 0).unwrap();
    let (got, want) = (al.permutations().unwrap(), pi.inverse());
    let mut live = 0;
    for (g, f) in &feats {
        for (i, col) in f.columns().into_iter().enumerate() {
            if col.iter().any(|&v| v != 0.0) {
                live += 1;
                assert_eq!(
                    got.get(g).unwrap().as_slice()[i],
                    want.get(g).unwrap().as_slice()[i],
                    "{g} unit {i}"
                );
            }
        }
    }
    assert!(live > 30, "{live}");
    let aligned = al.apply(spec, b).unwrap();
    assert!((task.loss(&aligned).unwrap() - task.loss(a).unwrap()).abs() < 1e-5);
}

/// A 64-24-24-10 MLP, a planted permutation of it, and its spec.
fn planted_mlp() -> (
    Mlp,
    StateDictF32,
    StateDictF32,
    PermutationSet,
    modelfusion::perm::PermutationSpec,
) {
    let net = Mlp::new(&[64, 24, 24, 10]).unwrap();
    let a: StateDictF32 = net.init(1);
    let spec = specs::mlp(2);
    let pi = PermutationSet::random(&spec, &a, 4).unwrap();
    let b = spec.apply(&pi, &a).unwrap();
    (net, a, b, pi, spec)
}

#[test]
fn activation_matching_recovers_planted_permutations() {
    let d = digits(300);
    for corr in [Correlation::Cross, Correlation::Pearson] {
        let (net, a, b, pi, spec) = planted_mlp();
        let task = Classification::new(&net, &d, 300).unwrap();
        let al = ActivationMatching::new(task.clone())
            .with_correlation(corr)
            .align(&a, &b, &spec)
            .unwrap();
        check_recovered(&task, &a, &b, &al, &pi, &spec);
    }
    // the residual MLP too (the stream's features are stacked over blocks)
    let net = ResMlp::new(64, 16, 20, 2, 10).unwrap();
    let a: StateDictF32 = net.init(3);
    let spec = specs::res_mlp(2);
    let pi = PermutationSet::random(&spec, &a, 5).unwrap();
    let b = spec.apply(&pi, &a).unwrap();
    let task = Classification::new(&net, &d, 300).unwrap();
    let al = ActivationMatching::new(task.clone())
        .with_correlation(Correlation::Pearson)
        .align(&a, &b, &spec)
        .unwrap();
    check_recovered(&task, &a, &b, &al, &pi, &spec);
}

/// Activation-based OT fusion: exact transport recovers planted permutations, and a
/// Sinkhorn plan with a small regulariser nearly does (its soft barycentres stay close
/// to the reference's units).
#[test]
fn ot_fusion_on_activations_recovers_planted_permutations() {
    let d = digits(300);
    let (net, a, b, pi, spec) = planted_mlp();
    let task = Classification::new(&net, &d, 300).unwrap();
    for ground in [GroundCost::Euclidean, GroundCost::SquaredEuclidean] {
        let al = OtFusion::new(Transport::Exact)
            .unwrap()
            .with_ground_cost(ground)
            .with_activations(task.clone())
            .align(&a, &b, &spec)
            .unwrap();
        check_recovered(&task, &a, &b, &al, &pi, &spec);
        let worst = al
            .stats()
            .objective
            .iter()
            .fold(0.0f64, |m, &c| m.max(c.abs()));
        assert!(worst < 1e-3, "{worst}");
    }
    let soft = OtFusion::new(Transport::Sinkhorn { reg: 1e-3 })
        .unwrap()
        .with_marginals(Marginals::Importance)
        .with_activations(task.clone());
    let (fused, al) = soft.fuse(&a, &b, &spec, 0.5).unwrap();
    assert!(!al.is_hard());
    let (la, lf) = (task.loss(&a).unwrap(), task.loss(&fused).unwrap());
    assert!((lf - la).abs() < 0.05 * la.max(1.0), "{la} vs {lf}");
    // a source without the group's features is a clear error
    let e = OtFusion::new(Transport::Exact)
        .unwrap()
        .with_activations(task.layer_inputs())
        .align(&a, &b, &spec)
        .unwrap_err();
    assert!(e.to_string().contains("hidden"), "{e}");
}

/// Wraps a source and drops one sample of the second model's features.
struct Truncating<'a>(Classification<'a, Mlp>, std::cell::Cell<usize>);
impl Activations<StateDictF32> for Truncating<'_> {
    fn num_batches(&self) -> usize {
        Activations::<StateDictF32>::num_batches(&self.0)
    }
    fn activations(&self, m: &StateDictF32, b: usize) -> Result<Features<f32>> {
        let mut f = self.0.activations(m, b)?;
        self.1.set(self.1.get() + 1);
        if self.1.get() % 2 == 0 {
            for v in f.values_mut() {
                *v = v.slice(ndarray::s![1.., ..]).to_owned();
            }
        }
        Ok(f)
    }
}

#[test]
fn activation_bad_input() {
    let d = digits(100);
    let net = Mlp::new(&[64, 8, 10]).unwrap();
    let a: StateDictF32 = net.init(1);
    let spec = specs::mlp(1);
    let task = Classification::new(&net, &d, 50).unwrap();
    // mismatched sample counts between the two models' batches
    let e = ActivationMatching::new(Truncating(task.clone(), Default::default()))
        .align(&a, &a, &spec)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sample counts") && e.contains("hidden.0"), "{e}");
    // features keyed by something else than the spec's groups
    let e = ActivationMatching::new(task.layer_inputs())
        .align(&a, &a, &spec)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no features for group `hidden.0`"), "{e}");
    // a spec whose groups are not the network's
    let e = ActivationMatching::new(task.clone())
        .align(&a, &a, &specs::mlp(2))
        .unwrap_err();
    assert!(matches!(e, Error::Spec { .. }), "{e}");
}

#[test]
fn repair_restores_the_statistics_of_a_midpoint() {
    let d = digits(400);
    let net = Mlp::new(&[64, 32, 32, 10]).unwrap();
    let (a, b): (StateDictF32, StateDictF32) = (net.init(1), net.init(2));
    let spec = specs::mlp(2);
    let b = WeightMatching::new(0)
        .align(&a, &b, &spec)
        .unwrap()
        .apply(&spec, &b)
        .unwrap();
    let mid = a.lerp(&b, 0.5).unwrap();
    let task = Classification::new(&net, &d, 128).unwrap();
    let repair = Repair::new(task.layer_inputs());
    let (_, report) = repair.repair(&a, &b, &mid, 0.5, &spec).unwrap();
    assert_eq!(report.repaired, vec!["hidden.0", "hidden.1"]);
    assert!(report.skipped.is_empty());
    // interpolation shrank the variance; REPAIR brings it back to the target
    assert!(report.std_ratio_before["hidden.0"] < 0.95, "{report:?}");
    for g in ["hidden.0", "hidden.1"] {
        let r = report.std_ratio_after[g];
        assert!((r - 1.0).abs() < 1e-3, "{g}: {r}");
    }
    // at an endpoint REPAIR changes nothing
    let (same, _) = repair.repair(&a, &b, &a, 0.0, &spec).unwrap();
    assert!(same.max_abs_diff(&a).unwrap() < 1e-4);
    // the residual stream of a residual MLP has several producers: skipped
    let rnet = ResMlp::new(64, 8, 12, 1, 10).unwrap();
    let (ra, rb): (StateDictF32, StateDictF32) = (rnet.init(0), rnet.init(1));
    let rtask = Classification::new(&rnet, &d, 128).unwrap();
    let (_, rep) = Repair::new(rtask.layer_inputs())
        .repair(
            &ra,
            &rb,
            &ra.lerp(&rb, 0.3).unwrap(),
            0.3,
            &specs::res_mlp(1),
        )
        .unwrap();
    assert_eq!(rep.repaired, vec!["blocks.0.hidden"]);
    assert_eq!(rep.skipped, vec!["residual"]);
    // bad input
    assert!(repair.repair(&a, &b, &mid, 1.5, &spec).is_err());
    let e = Repair::new(task.clone()) // group-keyed features: no layer inputs
        .repair(&a, &b, &mid, 0.5, &spec)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers.0.weight"), "{e}");
    let mut bad = mid.clone();
    bad.get_mut("layers.0.bias").unwrap()[[0]] = f32::INFINITY;
    assert!(matches!(
        repair.repair(&a, &b, &bad, 0.5, &spec),
        Err(Error::NonFinite { .. })
    ));
}
