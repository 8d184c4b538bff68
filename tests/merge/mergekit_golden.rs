//! Golden tests against mergekit 0.1.5's own selections (Python is never run here):
//! tests/golden/mergekit/gen.py ran mergekit's trimming (`magnitude`,
//! `magnitude_outliers`), gen_sce.py its SCE selection (`sce_mask`); the kept entries
//! must be exactly mergekit's, ties at the cut included.

use modelfusion::StateDict;
use modelfusion::merge::{Consensus, Sce, SliceChunks, Sparsification, TaskMerge, TensorMerger};
use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

/// The groups of a golden file.
fn golden(file: &str) -> Vec<Value> {
    let path = format!(
        "{}/tests/golden/mergekit/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v.as_array().unwrap().clone()
}

/// A vector of small integers times 2^-7 (exact in f32).
fn quantised(v: &Value) -> ArrayD<f32> {
    let q: Vec<f32> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32 / 128.0)
        .collect();
    ArrayD::from_shape_vec(IxDyn(&[q.len()]), q).unwrap()
}

/// How many entries are kept (non-zero) where mergekit's mask (`"0101..."`) says not,
/// or the other way round.
fn mask_mismatches(out: &ArrayD<f32>, kept: &Value) -> usize {
    out.iter()
        .zip(kept.as_str().unwrap().as_bytes())
        .filter(|(v, w)| (**v != 0.0) != (**w == b'1'))
        .count()
}

fn zero_base(n: usize) -> StateDict<ArrayD<f32>> {
    StateDict::from_pairs([("w", ArrayD::<f32>::zeros(IxDyn(&[n])))]).unwrap()
}

#[test]
fn trimming_keeps_exactly_mergekits_entries() {
    let mut checked = 0;
    for g in golden("trim.json") {
        let x = quantised(&g["q"]);
        let n = x.len();
        let base = zero_base(n);
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
            assert_eq!(
                mask_mismatches(&out, &c["kept"]),
                0,
                "{} n={n} density={density} gamma={gamma}",
                c["method"]
            );
            // The chunked (bounded-memory) path, in the default mergekit tie order.
            let chunk = 1 + n / 7;
            let got = std::sync::Mutex::new(vec![0.0f32; n]);
            let src = SliceChunks::new(vec![x.as_slice().unwrap()], chunk).unwrap();
            m.merge_chunked("w", &[n], &src, &|start, xs: &[f32]| {
                got.lock().unwrap()[start..start + xs.len()].copy_from_slice(xs);
                Ok(())
            })
            .unwrap();
            let got = ArrayD::from_shape_vec(IxDyn(&[n]), got.into_inner().unwrap()).unwrap();
            assert_eq!(mask_mismatches(&got, &c["kept"]), 0, "chunked {chunk}");
            checked += 1;
        }
    }
    assert!(checked >= 20);
}

/// SCE's selection (variance over models, torch's `topk`, in both of its algorithms):
/// an entry of the merge is non-zero exactly where mergekit keeps it.
#[test]
fn sce_selection_keeps_exactly_mergekits_entries() {
    let mut checked = 0;
    for g in golden("sce_topk.json") {
        let tvs: Vec<ArrayD<f32>> = g["q"].as_array().unwrap().iter().map(quantised).collect();
        let n = tvs[0].len();
        let base = zero_base(n);
        let r: Vec<&ArrayD<f32>> = tvs.iter().collect();
        for c in g["cases"].as_array().unwrap() {
            let topk = c["select_topk"].as_f64().unwrap();
            let out = Sce::new(base.clone(), topk)
                .unwrap()
                .merge_tensor("w", &r)
                .unwrap();
            assert_eq!(
                mask_mismatches(&out, &c["kept"]),
                0,
                "n={n} k={} select_topk={topk}",
                tvs.len()
            );
            checked += 1;
        }
    }
    assert!(checked >= 30);
}
