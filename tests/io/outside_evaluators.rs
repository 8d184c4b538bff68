//! Evaluators from outside Rust: a closure as an objective, activations read from saved
//! files, a barrier report from `(t, loss)` pairs. Each must give exactly what the live
//! in-crate evaluation gives.
#![cfg(feature = "safetensors")]

use modelfusion::align::{ActivationMatching, Aligner};
use modelfusion::barrier::{BarrierConfig, BarrierReport, loss_barrier};
use modelfusion::io::{Dtype, SavedActivations, save_file};
use modelfusion::path::{Linear, PathSampler};
use modelfusion::perm::PermutationSet;
use modelfusion::perm::specs::{Architecture, MlpShapes};
use modelfusion::{Activations, Features, Model, Objective, Result, StateDict, StateDictF32};
use ndarray::{Array2, Ix2};

/// Hidden features of a 2-hidden-layer MLP on fixed inputs: the "live" source.
struct Hidden(Vec<Array2<f32>>);

fn relu_layer(m: &StateDictF32, i: usize, x: &Array2<f32>) -> Array2<f32> {
    let w = m
        .get(&format!("layers.{i}.weight"))
        .unwrap()
        .clone()
        .into_dimensionality::<Ix2>()
        .unwrap();
    let b = m.get(&format!("layers.{i}.bias")).unwrap();
    (x.dot(&w.t()) + b)
        .mapv(|v| v.max(0.0))
        .into_dimensionality::<Ix2>()
        .unwrap()
}

impl Activations<StateDictF32> for Hidden {
    fn num_batches(&self) -> usize {
        self.0.len()
    }
    fn activations(&self, m: &StateDictF32, batch: usize) -> Result<Features<f32>> {
        let h0 = relu_layer(m, 0, &self.0[batch]);
        let h1 = relu_layer(m, 1, &h0);
        Ok([("hidden.0".to_string(), h0), ("hidden.1".to_string(), h1)].into())
    }
}

fn inputs() -> Vec<Array2<f32>> {
    (0..3)
        .map(|k| {
            Array2::from_shape_fn((40, 6), |(i, j)| {
                (((i * 7 + j * 3 + k * 5) % 13) as f32) / 6.0 - 1.0
            })
        })
        .collect()
}

#[test]
fn activation_matching_on_saved_features_equals_the_live_run() {
    let arch = MlpShapes::new(&[6, 16, 16, 3]).unwrap();
    let spec = arch.spec();
    let a = arch.random_model(0);
    let b = spec
        .apply(
            &PermutationSet::random(&spec, &a, 4).unwrap(),
            &arch.random_model(1),
        )
        .unwrap();
    let live = Hidden(inputs());
    // Save both models' features, one file per model and batch, as PyTorch hooks would.
    let dir = tempfile::tempdir().unwrap();
    let mut saved = SavedActivations::new();
    for (tag, m) in [("a", &a), ("b", &b)] {
        let mut files = Vec::new();
        for k in 0..live.num_batches() {
            let f = live.activations(m, k).unwrap();
            let sd = StateDict::from_pairs(f.into_iter().map(|(n, x)| (n, x.into_dyn()))).unwrap();
            let p = dir.path().join(format!("{tag}{k}.safetensors"));
            save_file(&sd, &p, Dtype::F32).unwrap();
            files.push(p);
        }
        saved = saved.with_model(m, files).unwrap();
    }
    let from_live = ActivationMatching::new(live).align(&a, &b, &spec).unwrap();
    let from_files = ActivationMatching::new(saved.clone())
        .align(&a, &b, &spec)
        .unwrap();
    assert_eq!(from_live.permutations(), from_files.permutations());
    assert_eq!(from_live.stats().objective, from_files.stats().objective);
    // A model that was never saved is a clear error, not a wrong answer.
    let mid = a.lerp(&b, 0.5).unwrap();
    let err = Activations::<StateDictF32>::activations(&saved, &mid, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("registered"), "{err}");
    assert!(
        SavedActivations::new()
            .with_model(&a, [dir.path().join("missing.safetensors")])
            .is_err()
    );
}

#[test]
fn a_closure_objective_and_a_curve_from_outside_give_the_live_barrier() {
    let arch = MlpShapes::new(&[6, 8, 3]).unwrap();
    let (a, b) = (arch.random_model(0), arch.random_model(1));
    let x = inputs().remove(0);
    let loss = |m: &StateDictF32| -> Result<f64> {
        Ok(relu_layer(m, 0, &x)
            .iter()
            .map(|&v| v as f64 * v as f64)
            .sum::<f64>()
            / 40.0)
    };
    let path = Linear::new(a.clone(), b.clone()).unwrap();
    let config = BarrierConfig::uniform(11).unwrap();
    let live = loss_barrier(&path, &loss, &config).unwrap();
    // The same losses "computed elsewhere", handed over as pairs in shuffled order.
    let mut pairs: Vec<(f64, f64)> = (0..11)
        .map(|i| {
            let t = i as f64 / 10.0;
            (t, loss.loss(&path.point(t).unwrap()).unwrap())
        })
        .collect();
    pairs.reverse();
    let outside = BarrierReport::from_curve(pairs).unwrap();
    assert_eq!(outside, live);
    assert!(BarrierReport::from_curve([(0.0, 1.0), (1.0, f64::NAN)]).is_err());
    assert!(BarrierReport::from_curve([(0.0, 1.0), (0.0, 2.0), (1.0, 1.0)]).is_err());
    assert!(BarrierReport::from_curve([(-0.5, 1.0), (1.0, 1.0)]).is_err());
}
