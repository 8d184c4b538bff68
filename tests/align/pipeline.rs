//! The fusion pipeline: reference choice, alignment, merge, evaluation, and bad input.

use modelfusion::align::{Identity, WeightMatching};
use modelfusion::merge::Average;
use modelfusion::perm::PermutationSet;
use modelfusion::perm::specs::{self, Architecture, MlpShapes};
use modelfusion::pipeline::{Pipeline, Reference};
use modelfusion::{Error, Model, Objective, Result, StateDictF32};
use proptest::prelude::*;

/// Distance to a fixed model: lower is better.
struct DistanceTo(StateDictF32);
impl Objective<StateDictF32> for DistanceTo {
    fn loss(&self, m: &StateDictF32) -> Result<f64> {
        Ok(m.sub(&self.0)?.norm())
    }
}

fn shuffled_copies(arch: &MlpShapes, n: u64, seed: u64) -> (StateDictF32, Vec<StateDictF32>) {
    let spec = arch.spec();
    let a = arch.random_model(seed);
    let copies = (0..n)
        .map(|s| {
            spec.apply(&PermutationSet::random(&spec, &a, seed + s).unwrap(), &a)
                .unwrap()
        })
        .collect();
    (a, copies)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Aligned, permuted copies of one network average back to that network (in the
    /// reference's basis). Coordinate descent from the identity alone can stop in a
    /// local optimum on narrow layers (about 1 in 30 pairs at widths 8 to 16; see
    /// `restarts_escape_local_optima` in align_props.rs), so this uses 4 starts.
    #[test]
    fn aligned_copies_average_to_the_reference(width in 8usize..32, n in 2u64..5, seed in 0u64..1000) {
        let arch = MlpShapes::new(&[5, width, width, 3]).unwrap();
        let (_, copies) = shuffled_copies(&arch, n, seed);
        let report = Pipeline::new(arch.spec(), WeightMatching::new(seed).with_restarts(4).unwrap(), Average::uniform())
            .with_reference(Reference::Index(1))
            .run(&copies)
            .unwrap();
        prop_assert_eq!(report.reference, 1);
        prop_assert!(report.fused.max_abs_diff(&copies[1]).unwrap() < 1e-5);
        for m in &report.aligned {
            prop_assert!(m.max_abs_diff(&copies[1]).unwrap() < 1e-6);
        }
        prop_assert_eq!(report.align_stats.len(), n as usize);
    }
}

#[test]
fn naive_average_of_shuffled_copies_differs() {
    let arch = MlpShapes::new(&[5, 16, 16, 3]).unwrap();
    let (a, copies) = shuffled_copies(&arch, 3, 11);
    let report = Pipeline::new(arch.spec(), Identity, Average::uniform())
        .run(&copies)
        .unwrap();
    assert!(report.fused.max_abs_diff(&copies[0]).unwrap() > 1e-2);
    assert!(report.model_scores.is_none() && report.fused_score.is_none());
    let _ = a;
}

#[test]
fn best_reference_and_scores() {
    let arch = MlpShapes::new(&[4, 8, 2]).unwrap();
    let models: Vec<StateDictF32> = (0..3).map(|s| arch.random_model(s)).collect();
    let target = DistanceTo(models[2].clone());
    let report = Pipeline::new(arch.spec(), Identity, Average::uniform())
        .with_reference(Reference::Best)
        .with_objective(&target)
        .run(&models)
        .unwrap();
    assert_eq!(report.reference, 2);
    let scores = report.model_scores.unwrap();
    assert_eq!(scores.len(), 3);
    assert_eq!(scores[2], 0.0);
    assert!(report.fused_score.unwrap() > 0.0);
}

#[test]
fn bad_input_is_a_clear_error() {
    let arch = MlpShapes::new(&[4, 8, 2]).unwrap();
    let models: Vec<StateDictF32> = (0..2).map(|s| arch.random_model(s)).collect();
    let p = || Pipeline::new(arch.spec(), Identity, Average::uniform());
    assert!(matches!(p().run(&[]), Err(Error::Empty { .. })));
    let e = p()
        .with_reference(Reference::Index(5))
        .run(&models)
        .unwrap_err()
        .to_string();
    assert!(e.contains("reference") && e.contains('5'), "{e}");
    let e = p()
        .with_reference(Reference::Best)
        .run(&models)
        .unwrap_err()
        .to_string();
    assert!(e.contains("evaluator"), "{e}");
    // Models of different architectures.
    let other = MlpShapes::new(&[4, 9, 2]).unwrap().random_model(0);
    let e = p()
        .run(&[models[0].clone(), other])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model 1") && e.contains("layers.0.weight"),
        "{e}"
    );
    // A spec that does not fit the models.
    let e = Pipeline::new(specs::mlp(3), Identity, Average::uniform())
        .run(&models)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers.2.weight"), "{e}");
}
