//! Iso-C and TSV-Merge (feature `svd`): golden values from torch
//! (tests/golden/merge/gen_svd.py, committed output), the properties each must keep,
//! and bad input.
#![cfg(feature = "svd")]

use std::collections::BTreeMap;

use modelfusion::merge::{IsoC, Merger, TsvMerge};
use modelfusion::{Model, StateDict, StateDictF64};
use ndarray::{Array2, ArrayD, IxDyn};
use proptest::prelude::*;
use serde_json::Value;

fn tensor(v: &Value) -> ArrayD<f64> {
    let num = |x: &Value| x.as_f64().expect("a number");
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|x| num(x) as usize)
        .collect();
    let data: Vec<f64> = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(num)
        .collect();
    ArrayD::from_shape_vec(IxDyn(&shape), data).expect("shape and data agree")
}

fn model(v: &Value) -> StateDictF64 {
    let map: BTreeMap<&String, &Value> = v.as_object().expect("a model").iter().collect();
    StateDict::from_pairs(map.into_iter().map(|(k, t)| (k.clone(), tensor(t)))).expect("a model")
}

#[test]
fn iso_c_and_tsv_match_torch() {
    let path = format!("{}/tests/golden/merge/svd.json", env!("CARGO_MANIFEST_DIR"));
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(path).expect("svd.json")).expect("json");
    assert_eq!(cases.len(), 4);
    for (i, c) in cases.iter().enumerate() {
        let base = model(&c["base"]);
        let alpha = c["alpha"].as_f64().expect("alpha");
        let models: Vec<StateDictF64> = c["models"]
            .as_array()
            .expect("models")
            .iter()
            .map(model)
            .collect();
        let refs: Vec<&StateDictF64> = models.iter().collect();
        let iso = IsoC::new(base.clone(), alpha)
            .unwrap()
            .merge(&refs)
            .unwrap();
        let d = iso.max_abs_diff(&model(&c["iso_c"])).unwrap();
        assert!(d < 1e-10, "case {i}: Iso-C differs from torch by {d:e}");
        let tsv = TsvMerge::new(base, alpha).unwrap().merge(&refs).unwrap();
        let d = tsv.max_abs_diff(&model(&c["tsv"])).unwrap();
        assert!(d < 1e-10, "case {i}: TSV-Merge differs from torch by {d:e}");
    }
}

fn pair(name: &str, m: Array2<f64>) -> StateDictF64 {
    StateDict::from_pairs([(name, m.into_dyn())]).unwrap()
}

fn singular_values(m: &Array2<f64>) -> Vec<f64> {
    let x = faer::Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[[i, j]]);
    x.singular_values().unwrap()
}

fn matrix(rows: usize, cols: usize) -> impl Strategy<Value = Array2<f64>> {
    proptest::collection::vec(-2.0f64..2.0, rows * cols)
        .prop_map(move |v| Array2::from_shape_vec((rows, cols), v).unwrap())
}

fn update(merged: &StateDictF64, base: &StateDictF64, alpha: f64) -> Array2<f64> {
    let d = (merged.get("w").unwrap() - base.get("w").unwrap()) / alpha;
    d.into_dimensionality().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Iso-C's update has the singular vectors of the summed task vectors and every
    /// singular value equal to their mean.
    #[test]
    fn iso_c_flattens_the_spectrum(b in matrix(6, 5), t1 in matrix(6, 5), t2 in matrix(6, 5), alpha in 0.5f64..2.0) {
        let base = pair("w", b.clone());
        let (a, c) = (pair("w", &b + &t1), pair("w", &b + &t2));
        let m = IsoC::new(base.clone(), alpha).unwrap().merge(&[&a, &c]).unwrap();
        let u = update(&m, &base, alpha);
        let sum = &t1 + &t2;
        let s = singular_values(&sum);
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        for x in singular_values(&u) {
            prop_assert!((x - mean).abs() < 1e-9 * (1.0 + mean), "{x} vs mean {mean}");
        }
        // Same singular vectors: U V^T of the sum, i.e. u / mean is the polar factor of
        // the sum, so sum^T u is symmetric positive semi-definite.
        let g = sum.t().dot(&u);
        prop_assert!((&g - &g.t()).iter().all(|x| x.abs() < 1e-8 * (1.0 + mean)));
    }

    /// TSV-Merge of one model keeps all its singular triplets: the model comes back.
    #[test]
    fn tsv_of_one_model_is_the_model(b in matrix(5, 7), t in matrix(5, 7)) {
        let base = pair("w", b.clone());
        let a = pair("w", &b + &t);
        let m = TsvMerge::new(base, 1.0).unwrap().merge(&[&a]).unwrap();
        prop_assert!(m.max_abs_diff(&a).unwrap() < 1e-10);
    }

    /// Task vectors of rank <= k on disjoint rows and columns do not interfere: TSV-Merge
    /// returns task arithmetic (their sum).
    #[test]
    fn tsv_of_non_interfering_tasks_is_their_sum(b in matrix(8, 8), x in matrix(4, 4), y in matrix(4, 4)) {
        let mut t1 = Array2::zeros((8, 8));
        t1.slice_mut(ndarray::s![..4, ..4]).assign(&x);
        let mut t2 = Array2::zeros((8, 8));
        t2.slice_mut(ndarray::s![4.., 4..]).assign(&y);
        let base = pair("w", b.clone());
        let (a, c) = (pair("w", &b + &t1), pair("w", &b + &t2));
        let m = TsvMerge::new(base, 1.0).unwrap().merge(&[&a, &c]).unwrap();
        let want = pair("w", &b + &t1 + &t2);
        prop_assert!(m.max_abs_diff(&want).unwrap() < 1e-9);
    }
}

#[test]
fn non_matrix_parameters_get_the_mean_task_vector_in_the_input_type() {
    let base = StateDict::from_pairs([("b", ndarray::arr1(&[1.0f32, 2.0]).into_dyn())]).unwrap();
    let a = StateDict::from_pairs([("b", ndarray::arr1(&[3.0f32, 2.0]).into_dyn())]).unwrap();
    let c = StateDict::from_pairs([("b", ndarray::arr1(&[1.0f32, 6.0]).into_dyn())]).unwrap();
    for m in [
        IsoC::new(base.clone(), 2.0)
            .unwrap()
            .merge(&[&a, &c])
            .unwrap(),
        TsvMerge::new(base.clone(), 2.0)
            .unwrap()
            .merge(&[&a, &c])
            .unwrap(),
    ] {
        // base + 2 * mean(tau) = [1, 2] + 2 * [1, 2]
        assert_eq!(m.get("b").unwrap().as_slice().unwrap(), &[3.0f32, 6.0]);
    }
}

#[test]
fn bad_input_is_a_named_error() {
    let z = |r, c| pair("w", Array2::zeros((r, c)));
    for alpha in [f64::NAN, f64::INFINITY] {
        let e = IsoC::new(z(2, 2), alpha).unwrap_err().to_string();
        assert!(e.contains("alpha"), "{e}");
        let e = TsvMerge::new(z(2, 2), alpha).unwrap_err().to_string();
        assert!(e.contains("alpha"), "{e}");
    }
    // 3 models, a 2 x 5 matrix: floor(2 / 3) = 0 singular vectors per model.
    let base = z(2, 5);
    let e = TsvMerge::new(base.clone(), 1.0)
        .unwrap()
        .merge(&[&base, &base, &base])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`w`") && e.contains("2 x 5") && e.contains("3 models"),
        "{e}"
    );
    // A NaN in a model is named, not decomposed.
    let mut bad = Array2::zeros((2, 2));
    bad[[0, 1]] = f64::NAN;
    let e = IsoC::new(z(2, 2), 1.0)
        .unwrap()
        .merge(&[&pair("w", bad)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("`w`"), "{e}");
    // Shapes that disagree with the base.
    let e = IsoC::new(z(2, 2), 1.0)
        .unwrap()
        .merge(&[&z(3, 2)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("w"), "{e}");
}
