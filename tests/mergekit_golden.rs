//! Golden tests against mergekit 0.1.5's own trimming (tests/golden/mergekit/gen.py ran
//! mergekit's `magnitude` and `magnitude_outliers`; Python is never run here): the
//! kept entries must be exactly mergekit's, ties at the cut included.

use modelfusion::StateDict;
use modelfusion::merge::{Consensus, Sparsification, TaskMerge, TensorMerger};
use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

#[test]
fn trimming_keeps_exactly_mergekits_entries() {
    let path = format!(
        "{}/tests/golden/mergekit/trim.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let groups: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    for g in groups.as_array().unwrap() {
        let q: Vec<f32> = g["q"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32 / 128.0)
            .collect();
        let n = q.len();
        let base = StateDict::from_pairs([("w", ArrayD::<f32>::zeros(IxDyn(&[n])))]).unwrap();
        let x = ArrayD::from_shape_vec(IxDyn(&[n]), q.clone()).unwrap();
        for c in g["cases"].as_array().unwrap() {
            let density = c["density"].as_f64().unwrap();
            let gamma = c["gamma"].as_f64().unwrap();
            let sp = if c["method"] == "magnitude" {
                Sparsification::Magnitude { density }
            } else {
                Sparsification::Breadcrumbs { density, gamma }
            };
            let m = TaskMerge::new(base.clone(), sp, Consensus::Sum, 1.0).unwrap();
            let out: ArrayD<f32> = m.merge_tensor("w", &[&x]).unwrap();
            let want = c["kept"].as_str().unwrap().as_bytes();
            let wrong = out
                .iter()
                .zip(want)
                .filter(|(v, w)| (**v != 0.0) != (**w == b'1'))
                .count();
            assert_eq!(
                wrong, 0,
                "{} n={n} density={density} gamma={gamma}",
                c["method"]
            );
            checked += 1;
        }
    }
    assert!(checked >= 20);
}
