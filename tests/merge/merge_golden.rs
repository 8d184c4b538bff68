//! Golden tests of `modelfusion::merge` against the independent numpy implementations in
//! tests/golden/merge/gen.py (committed outputs; Python is never run here).

use std::collections::BTreeMap;

use modelfusion::merge::{Consensus, Fisher, Merger, ModelStock, Rescale, Slerp, TaskMerge};
use modelfusion::{Model, StateDict, StateDictF64, Tensor};
use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

fn load(name: &str) -> Vec<Value> {
    let path = format!("{}/tests/golden/merge/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn tensor(v: &Value) -> ArrayD<f64> {
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let data: Vec<f64> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    ArrayD::from_shape_vec(IxDyn(&shape), data).unwrap()
}

/// Models are stored as JSON objects; keep the generator's key order irrelevant by sorting.
fn model(v: &Value) -> StateDictF64 {
    let map: BTreeMap<&String, &Value> = v.as_object().unwrap().iter().collect();
    StateDict::from_pairs(map.into_iter().map(|(k, t)| (k.clone(), tensor(t)))).unwrap()
}

fn models(v: &Value) -> Vec<StateDictF64> {
    v.as_array().unwrap().iter().map(model).collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_close(got: &StateDictF64, want: &StateDictF64, tol: f64, what: &str) {
    let d = got.max_abs_diff(want).unwrap();
    assert!(d <= tol, "{what}: max abs diff {d:e} > {tol:e}");
}

#[test]
fn ties_matches_numpy() {
    for (i, c) in load("ties.json").iter().enumerate() {
        let base = model(&c["base"]);
        let ms = models(&c["models"]);
        let refs: Vec<&StateDictF64> = ms.iter().collect();
        let m = TaskMerge::ties(
            base,
            c["density"].as_f64().unwrap(),
            c["lambda"].as_f64().unwrap(),
        )
        .unwrap()
        .with_weights(f64s(&c["weights"]))
        .unwrap();
        assert_close(
            &m.merge(&refs).unwrap(),
            &model(&c["expected"]),
            1e-12,
            &format!("TIES case {i}"),
        );
    }
}

#[test]
fn dare_with_fixed_masks_matches_numpy() {
    for (i, c) in load("dare.json").iter().enumerate() {
        let base = model(&c["base"]);
        let ms = models(&c["models"]);
        let rescale = match c["rescale"].as_str().unwrap() {
            "inverse" => Rescale::InverseDensity,
            "l1" => Rescale::L1Norm,
            other => panic!("unknown rescale {other}"),
        };
        let consensus = if c["sign_election"].as_bool().unwrap() {
            Consensus::SignElection
        } else {
            Consensus::Sum
        };
        let dare = TaskMerge::dare(
            base,
            c["density"].as_f64().unwrap(),
            0,
            c["lambda"].as_f64().unwrap(),
        )
        .unwrap()
        .with_rescale(rescale)
        .unwrap()
        .with_consensus(consensus)
        .with_weights(f64s(&c["weights"]))
        .unwrap();
        let want = model(&c["expected"]);
        for name in want.names() {
            let masks: Vec<Vec<bool>> = c["masks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|mk| {
                    mk[name]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|b| b.as_i64().unwrap() != 0)
                        .collect()
                })
                .collect();
            let mrefs: Vec<&[bool]> = masks.iter().map(Vec::as_slice).collect();
            let ts: Vec<&ArrayD<f64>> = ms.iter().map(|m| m.get(name).unwrap()).collect();
            let got = dare.merge_tensor_with_masks(name, &ts, &mrefs).unwrap();
            let w = want.get(name).unwrap();
            let d = got
                .view()
                .iter()
                .zip(w.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(d < 1e-12, "DARE case {i}, `{name}`: diff {d:e}");
        }
    }
}

#[test]
fn slerp_matches_numpy() {
    for (i, c) in load("slerp.json").iter().enumerate() {
        let ms = models(&c["models"]);
        let got = Slerp::new(c["t"].as_f64().unwrap())
            .unwrap()
            .merge(&[&ms[0], &ms[1]])
            .unwrap();
        assert_close(
            &got,
            &model(&c["expected"]),
            1e-12,
            &format!("SLERP case {i}"),
        );
    }
}

#[test]
fn model_stock_matches_numpy() {
    for (i, c) in load("model_stock.json").iter().enumerate() {
        let ms = models(&c["models"]);
        let refs: Vec<&StateDictF64> = ms.iter().collect();
        let got = ModelStock::new(model(&c["base"])).merge(&refs).unwrap();
        assert_close(
            &got,
            &model(&c["expected"]),
            1e-12,
            &format!("model stock case {i}"),
        );
    }
}

#[test]
fn fisher_matches_numpy() {
    for (i, c) in load("fisher.json").iter().enumerate() {
        let ms = models(&c["models"]);
        let refs: Vec<&StateDictF64> = ms.iter().collect();
        let f = Fisher::new(models(&c["fishers"]))
            .unwrap()
            .with_coefficients(f64s(&c["coefficients"]))
            .unwrap()
            .with_floor(c["floor"].as_f64().unwrap())
            .unwrap();
        assert_close(
            &f.merge(&refs).unwrap(),
            &model(&c["expected"]),
            1e-12,
            &format!("Fisher case {i}"),
        );
    }
}

#[cfg(feature = "linalg")]
#[test]
fn regmean_matches_numpy() {
    use modelfusion::merge::{RegMean, gram_matrices};
    use modelfusion::{Activations, Features, Result};

    /// Replays the stored layer inputs: batch b of every key.
    struct Replay(BTreeMap<String, Vec<ndarray::Array2<f64>>>);
    impl Activations<StateDictF64> for Replay {
        fn num_batches(&self) -> usize {
            self.0.values().next().unwrap().len()
        }
        fn activations(&self, _: &StateDictF64, b: usize) -> Result<Features<f64>> {
            Ok(self
                .0
                .iter()
                .map(|(k, v)| (k.clone(), v[b].clone()))
                .collect())
        }
    }
    for (i, c) in load("regmean.json").iter().enumerate() {
        let ms = models(&c["models"]);
        let refs: Vec<&StateDictF64> = ms.iter().collect();
        let grams = c["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&ms)
            .map(|(x, m)| {
                let replay = Replay(
                    x.as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, bs)| {
                            let batches = bs
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|b| tensor(b).into_dimensionality().unwrap())
                                .collect();
                            (k.clone(), batches)
                        })
                        .collect(),
                );
                gram_matrices(m, &replay).unwrap()
            })
            .collect();
        let r = RegMean::new(grams, c["alpha"].as_f64().unwrap()).unwrap();
        assert_close(
            &r.merge(&refs).unwrap(),
            &model(&c["expected"]),
            1e-9,
            &format!("RegMean case {i}"),
        );
    }
}
