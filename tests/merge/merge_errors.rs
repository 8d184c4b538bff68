//! Bad input to `modelfusion::merge`: every case is a clear error, never a panic.

use modelfusion::merge::{
    ArceeFusion, Average, Ema, Ensemble, EnsembleMode, Fisher, GreedySoup, KarcherMean, Lawa,
    Merger, ModelStock, MultiSlerp, NearSwap, NuSlerp, Ram, RegMean, Rescale, Sce, Slerp,
    Sparsification, Swa, Swag, TaskMerge, TensorMerger,
};
use modelfusion::{Error, Model, Objective, Result, StateDict, StateDictF64};
use ndarray::{ArrayD, arr1, arr2};

fn sd(pairs: &[(&str, &[f64])]) -> StateDictF64 {
    StateDict::from_pairs(pairs.iter().map(|(n, v)| (*n, arr1(v).into_dyn()))).unwrap()
}

fn msg<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn mismatched_names_and_shapes() {
    let a = sd(&[("w", &[1.0, 2.0]), ("b", &[0.0])]);
    let other_name = sd(&[("w", &[1.0, 2.0]), ("c", &[0.0])]);
    let other_shape = sd(&[("w", &[1.0]), ("b", &[0.0])]);
    let base = a.clone();
    let mergers: Vec<Box<dyn Merger<StateDictF64>>> = vec![
        Box::new(Average::uniform()),
        Box::new(TaskMerge::ties(base.clone(), 0.5, 1.0).unwrap()),
        Box::new(TaskMerge::dare(base.clone(), 0.5, 1, 1.0).unwrap()),
        Box::new(Slerp::new(0.5).unwrap()),
        Box::new(ModelStock::new(base.clone())),
        Box::new(KarcherMean::uniform()),
        Box::new(Fisher::new(vec![a.clone(), a.clone()]).unwrap()),
        Box::new(NuSlerp::with_base(Some(base.clone()), 0.5).unwrap()),
        Box::new(MultiSlerp::new(vec![1.0, 1.0], true).unwrap()),
        Box::new(KarcherMean::mergekit(10, 1e-5).unwrap()),
        Box::new(Sce::new(base.clone(), 0.5).unwrap()),
        Box::new(ArceeFusion::new(base.clone(), 0)),
        Box::new(NearSwap::new(base.clone(), 0.1).unwrap()),
        Box::new(Ram::new(base.clone(), 1e-5).unwrap()),
        Box::new(Ram::plus(base.clone(), 0.1, 0.2, 1e-5).unwrap()),
    ];
    for m in &mergers {
        let e = m.merge(&[&a, &other_name]).unwrap_err();
        assert!(matches!(e, Error::NameMismatch { .. }), "{e}");
        let e = m.merge(&[&a, &other_shape]).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
        assert!(e.to_string().contains("`w`"), "{e}");
    }
    // Tensor level: shapes named with the model index.
    let (x, y) = (arr1(&[1.0f64, 2.0]).into_dyn(), arr1(&[1.0f64]).into_dyn());
    let e = msg(TensorMerger::<ArrayD<f64>>::merge_tensor(
        &Average::uniform(),
        "fc",
        &[&x, &y],
    ));
    assert!(
        e.contains("`fc`") && e.contains("model 1") && e.contains("[2]") && e.contains("[1]"),
        "{e}"
    );
}

#[test]
fn zero_models() {
    let base = sd(&[("w", &[1.0])]);
    let none: [&StateDictF64; 0] = [];
    assert!(matches!(
        Average::uniform().merge(&none),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        TaskMerge::ties(base.clone(), 0.5, 1.0)
            .unwrap()
            .merge(&none),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        Lawa::<StateDictF64>::new(2).unwrap().average(),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        Swag::<StateDictF64>::new(2).unwrap().sample(1, 1.0),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        Fisher::<StateDictF64>::new(vec![]),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        RegMean::new(vec![], 0.9),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        Ensemble::new(EnsembleMode::Logits).combine(&[]),
        Err(Error::Empty { .. })
    ));
    struct Zero;
    impl Objective<StateDictF64> for Zero {
        fn loss(&self, _: &StateDictF64) -> Result<f64> {
            Ok(0.0)
        }
    }
    assert!(matches!(
        GreedySoup::new(Zero).cook::<StateDictF64>(&[]),
        Err(Error::Empty { .. })
    ));
    let no: [&Zero; 0] = [];
    let _ = no;
}

#[test]
fn weights_summing_to_zero_or_miscounted() {
    let e = msg(Average::weighted(vec![1.0, -1.0], true));
    assert!(e.contains("weights") && e.contains("sum to 0"), "{e}");
    assert!(Average::weighted(vec![f64::NAN, 1.0], true).is_err());
    let a = sd(&[("w", &[1.0])]);
    let e = msg(Average::weighted(vec![1.0, 2.0, 3.0], true)
        .unwrap()
        .merge(&[&a, &a]));
    assert!(
        e.contains("3 given for 2 models") && e.contains("`w`"),
        "{e}"
    );
    let base = sd(&[("w", &[0.0])]);
    let e = msg(TaskMerge::task_arithmetic(base, 1.0)
        .unwrap()
        .with_weights(vec![1.0])
        .unwrap()
        .merge(&[&a, &a]));
    assert!(e.contains("weights"), "{e}");
    assert!(KarcherMean::weighted(vec![0.0, 0.0]).is_err());
    assert!(
        Ensemble::new(EnsembleMode::Logits)
            .with_weights(vec![1.0, -1.0])
            .is_err()
    );
}

#[test]
fn density_outside_unit_interval() {
    let base = sd(&[("w", &[0.0])]);
    // Density 0 is legal (mergekit: nothing kept); outside [0, 1] is not.
    assert!(TaskMerge::ties(base.clone(), 0.0, 1.0).is_ok());
    for d in [-0.1, 1.0001, f64::NAN] {
        for r in [
            TaskMerge::ties(base.clone(), d, 1.0),
            TaskMerge::dare(base.clone(), d, 0, 1.0),
            TaskMerge::breadcrumbs(base.clone(), d, 0.0, 1.0),
            TaskMerge::della(base.clone(), d, 0.0, 0, 1.0),
        ] {
            let e = msg(r);
            assert!(e.contains("density") && e.contains("[0, 1]"), "{e}");
        }
    }
    assert!(TaskMerge::ties(base.clone(), 1.0, 1.0).is_ok());
    assert!(msg(TaskMerge::breadcrumbs(base.clone(), 0.5, 1.6, 1.0)).contains("gamma"));
    assert!(msg(TaskMerge::breadcrumbs(base.clone(), 0.5, -0.1, 1.0)).contains("gamma"));
    assert!(msg(TaskMerge::della(base.clone(), 0.5, 1.2, 0, 1.0)).contains("epsilon"));
    assert!(msg(TaskMerge::ties(base.clone(), 0.5, f64::INFINITY)).contains("lambda"));
    // Rescaling applies to every sparsification (mergekit's `rescale`).
    assert!(
        TaskMerge::ties(base.clone(), 0.5, 1.0)
            .unwrap()
            .with_rescale(Rescale::L1Norm)
            .is_ok()
    );
    assert!(
        Sparsification::Random {
            density: 2.0,
            seed: 0
        }
        .validate()
        .is_err()
    );
}

#[test]
fn decay_and_other_ranges() {
    for d in [1.0, 1.5, -0.01, f64::NAN] {
        let e = msg(Ema::<StateDictF64>::new(d));
        assert!(e.contains("decay") && e.contains("[0, 1)"), "{e}");
    }
    assert!(Ema::<StateDictF64>::new(0.0).is_ok());
    assert!(msg(Lawa::<StateDictF64>::new(0)).contains("`k`"));
    assert!(msg(Slerp::new(-0.5)).contains("`t`"));
    assert!(msg(RegMean::new(vec![Default::default()], 1.5)).contains("alpha"));
    let f = sd(&[("w", &[1.0])]);
    assert!(msg(Fisher::new(vec![f.clone()]).unwrap().with_floor(-1.0)).contains("floor"));
    assert!(
        msg(Fisher::new(vec![f])
            .unwrap()
            .with_coefficients(vec![1.0, 1.0]))
        .contains("coefficients")
    );
    assert!(msg(Swag::<StateDictF64>::new(1).unwrap().sample(0, -1.0)).contains("scale"));
    assert!(KarcherMean::uniform().with_tolerance(1e-3, 0).is_err());
}

#[test]
fn base_missing_or_incompatible() {
    let a = sd(&[("w", &[1.0, 2.0]), ("b", &[0.0])]);
    let missing = sd(&[("w", &[0.0, 0.0])]);
    let wrong = sd(&[("w", &[0.0]), ("b", &[0.0])]);
    for base in [missing.clone(), wrong.clone()] {
        let mergers: Vec<Box<dyn Merger<StateDictF64>>> = vec![
            Box::new(TaskMerge::task_arithmetic(base.clone(), 1.0).unwrap()),
            Box::new(TaskMerge::ties(base.clone(), 0.5, 1.0).unwrap()),
            Box::new(TaskMerge::dare(base.clone(), 0.5, 1, 1.0).unwrap()),
            Box::new(ModelStock::new(base.clone())),
        ];
        for m in &mergers {
            let e = m.merge(&[&a, &a]).unwrap_err();
            assert!(e.to_string().contains("base model"), "{e}");
            assert!(
                matches!(e, Error::MissingParam { .. } | Error::ShapeMismatch { .. }),
                "{e}"
            );
        }
    }
}

#[test]
fn method_specific_counts() {
    let a = sd(&[("w", &[1.0, 2.0])]);
    assert!(msg(Slerp::new(0.5).unwrap().merge(&[&a, &a, &a])).contains("exactly 2"));
    assert!(msg(ModelStock::new(a.clone()).merge(&[&a])).contains("at least 2"));
    let e = msg(Fisher::new(vec![a.clone()]).unwrap().merge(&[&a, &a]));
    assert!(e.contains("fishers") && e.contains("1 given for 2"), "{e}");
    let neg = sd(&[("w", &[1.0, -2.0])]);
    assert!(msg(Fisher::new(vec![neg])).contains("negative"));
    let anti = sd(&[("w", &[-1.0, -2.0])]);
    assert!(matches!(
        KarcherMean::uniform().merge(&[&a, &anti]),
        Err(Error::Infeasible { .. })
    ));
    let base = sd(&[("w", &[0.0, 0.0])]);
    let dare = TaskMerge::dare(base.clone(), 0.5, 0, 1.0).unwrap();
    let x = a.get("w").unwrap();
    let e = msg(dare.merge_tensor_with_masks("w", &[x], &[&[true]]));
    assert!(e.contains("keep mask 0") && e.contains("`w`"), "{e}");
    assert!(msg(dare.merge_tensor_with_masks("w", &[x], &[])).contains("masks"));
    assert!(
        TaskMerge::ties(base, 0.5, 1.0)
            .unwrap()
            .keep_mask("w", 0, 2)
            .is_err()
    );
    let mut l = Lawa::new(2).unwrap();
    l.update(&a).unwrap();
    assert!(l.update(&sd(&[("v", &[1.0, 2.0])])).is_err());
    let mut s = Swa::new();
    s.update(&a).unwrap();
    assert!(s.update(&sd(&[("w", &[1.0])])).is_err());
    let e = Ensemble::new(EnsembleMode::Probabilities)
        .combine(&[arr2(&[[1.0, 2.0]]).view(), arr2(&[[1.0], [2.0]]).view()])
        .unwrap_err();
    assert!(e.to_string().contains("model 1"), "{e}");
}

#[cfg(not(feature = "linalg"))]
#[test]
fn regmean_without_linalg_is_feature_disabled() {
    let g: modelfusion::merge::Grams = [("w".to_string(), ndarray::Array2::eye(2))].into();
    let e = RegMean::new(vec![g], 0.9).unwrap_err();
    assert!(
        matches!(
            e,
            Error::FeatureDisabled {
                feature: "linalg",
                ..
            }
        ),
        "{e}"
    );
}

#[cfg(feature = "linalg")]
#[test]
fn regmean_bad_grams_and_shapes() {
    let g2: modelfusion::merge::Grams = [("w".to_string(), ndarray::Array2::eye(2))].into();
    let g3: modelfusion::merge::Grams = [("w".to_string(), ndarray::Array2::eye(3))].into();
    let other: modelfusion::merge::Grams = [("v".to_string(), ndarray::Array2::eye(2))].into();
    assert!(matches!(
        RegMean::new(vec![g2.clone(), g3], 0.9),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        RegMean::new(vec![g2.clone(), other], 0.9),
        Err(Error::NameMismatch { .. })
    ));
    // A weight whose input size does not match its Gram matrix.
    let m =
        StateDict::from_pairs([("w", ndarray::Array2::<f64>::zeros((4, 3)).into_dyn())]).unwrap();
    let e = msg(RegMean::new(vec![g2.clone(), g2], 0.9)
        .unwrap()
        .merge(&[&m, &m]));
    assert!(e.contains("`w`") && e.contains("[4, 3]"), "{e}");
}

#[test]
fn task_vector_merges_refuse_non_finite_results() {
    use modelfusion::merge::{Merger, TaskMerge};
    use modelfusion::{StateDict, StateDictF64};
    use ndarray::arr1;
    let sd =
        |v: &[f64]| -> StateDictF64 { StateDict::from_pairs([("w", arr1(v).into_dyn())]).unwrap() };
    let base = sd(&[0.0, 0.0]);
    let (a, b) = (sd(&[1.0, 2.0]), sd(&[3.0, -1.0]));
    // Finite inputs, a lambda that overflows: the error names `lambda`.
    let huge = TaskMerge::task_arithmetic(base.clone(), 1e308).unwrap();
    let e = huge.merge(&[&a, &b]).unwrap_err().to_string();
    assert!(e.contains("lambda") && e.contains("`w`"), "{e}");
    // A NaN in a model: the error names the tensor and the model.
    let nan = sd(&[1.0, f64::NAN]);
    for m in [
        TaskMerge::task_arithmetic(base.clone(), 1.0).unwrap(),
        TaskMerge::ties(base.clone(), 1.0, 1.0).unwrap(),
    ] {
        let e = m.merge(&[&a, &nan]).unwrap_err().to_string();
        assert!(e.contains("`w`") && e.contains("model 1"), "{e}");
    }
}

#[test]
fn mergekit_ports_refuse_non_finite_inputs_naming_them() {
    let base = sd(&[("w", &[0.0, 0.5, 1.0])]);
    let nan_base = sd(&[("w", &[0.0, f64::NAN, 1.0])]);
    let a = sd(&[("w", &[1.0, 2.0, -1.0])]);
    let nan = sd(&[("w", &[1.0, f64::INFINITY, -1.0])]);
    type Make = fn(StateDictF64) -> Box<dyn Merger<StateDictF64>>;
    // (merger around a base, number of models it merges)
    let cases: Vec<(Make, usize)> = vec![
        (|b| Box::new(NuSlerp::with_base(Some(b), 0.5).unwrap()), 2),
        (
            |b| Box::new(MultiSlerp::with_base(Some(b), vec![1.0, 2.0], true).unwrap()),
            2,
        ),
        (|b| Box::new(Sce::new(b, 0.5).unwrap()), 2),
        (|b| Box::new(ArceeFusion::new(b, 0)), 1),
        (|b| Box::new(NearSwap::new(b, 0.1).unwrap()), 1),
        (|b| Box::new(Ram::new(b, 1e-5).unwrap()), 2),
        (|b| Box::new(Ram::plus(b, 0.1, 0.2, 1e-5).unwrap()), 2),
    ];
    for (make, k) in cases {
        let mut models: Vec<&StateDictF64> = vec![&a; k - 1];
        models.push(&nan);
        let e = msg(make(base.clone()).merge(&models));
        assert!(
            e.contains("`w`") && e.contains(&format!("model {}", k - 1)),
            "{e}"
        );
        let ok: Vec<&StateDictF64> = vec![&a; k];
        let e = msg(make(nan_base.clone()).merge(&ok));
        assert!(e.contains("`w`") && e.contains("base model"), "{e}");
    }
    let e = msg(KarcherMean::mergekit(10, 1e-5).unwrap().merge(&[&a, &nan]));
    assert!(e.contains("`w`") && e.contains("model 1"), "{e}");
}
