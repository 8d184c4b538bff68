//! REPAIR of residual streams and the batch-norm statistics reset on the crate's
//! residual MLP: after the reset, every reset point has the interpolated statistics, and
//! the generic reset agrees with `nn::reset_running_stats`.
#![cfg(feature = "nn")]

use crate::repair_common;

use modelfusion::align::{BnReset, OutputRepair, Repair};
use modelfusion::nn::{
    Classification, LayerInputs, Mode, Network, ResMlp, data, reset_running_stats,
};
use modelfusion::perm::specs::Architecture;
use modelfusion::{Activations, Features, Model, Result, StateDictF64};
use ndarray::{Array2, Ix1, Ix2};
use proptest::prelude::*;
use repair_common::assert_points_reset;

/// The residual MLP's layer outputs and streams, computed from its layer inputs:
/// `stem` (pre-ReLU), `blocks.{j}.fc1`, `blocks.{j}.fc2` and `stream.{k}` (the stream
/// after the stem, `k = 0`, and after block `k - 1`), and each norm's input under
/// `blocks.{j}.norm`.
struct Outputs<'a> {
    inputs: LayerInputs<'a, ResMlp>,
    blocks: usize,
}

fn affine(m: &StateDictF64, layer: &str, x: &Array2<f64>) -> Array2<f64> {
    let w = m
        .get(&format!("{layer}.weight"))
        .unwrap()
        .view()
        .into_dimensionality::<Ix2>()
        .unwrap();
    let b = m
        .get(&format!("{layer}.bias"))
        .unwrap()
        .view()
        .into_dimensionality::<Ix1>()
        .unwrap();
    x.dot(&w.t()) + b
}

impl Activations<StateDictF64> for Outputs<'_> {
    fn num_batches(&self) -> usize {
        self.inputs.num_batches()
    }

    fn activations(&self, m: &StateDictF64, batch: usize) -> Result<Features<f64>> {
        let inp = self.inputs.activations(m, batch)?;
        let mut f = Features::new();
        let stem = affine(m, "stem", &inp["stem.weight"]);
        let mut stream = stem.mapv(|v| v.max(0.0));
        f.insert("stem".into(), stem);
        f.insert("stream.0".into(), stream.clone());
        for j in 0..self.blocks {
            f.insert(format!("blocks.{j}.norm"), stream.clone());
            let fc1 = affine(
                m,
                &format!("blocks.{j}.fc1"),
                &inp[&format!("blocks.{j}.fc1.weight")],
            );
            let fc2 = affine(
                m,
                &format!("blocks.{j}.fc2"),
                &inp[&format!("blocks.{j}.fc2.weight")],
            );
            stream = &stream + &fc2;
            f.insert(format!("blocks.{j}.fc1"), fc1);
            f.insert(format!("blocks.{j}.fc2"), fc2);
            f.insert(format!("stream.{}", j + 1), stream.clone());
        }
        Ok(f)
    }
}

fn points(blocks: usize) -> Vec<(String, Option<String>)> {
    let mut p = vec![("stem".to_string(), None)];
    for j in 0..blocks {
        p.push((format!("blocks.{j}.fc1"), None));
        p.push((format!("blocks.{j}.fc2"), Some(format!("stream.{}", j + 1))));
    }
    p
}

fn output_repair<A>(src: A, points: &[(String, Option<String>)]) -> OutputRepair<A> {
    points
        .iter()
        .fold(OutputRepair::new(src), |r, (l, s)| match s {
            Some(s) => r.with_stream_write(l, s).unwrap(),
            None => r.with_layer(l).unwrap(),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    #[test]
    fn every_stream_point_gets_the_interpolated_statistics(seed in 0u64..1000, t in 0.2f64..0.8) {
        let d = data::digits().unwrap().head(240);
        let net = ResMlp::new(64, 16, 24, 3, 10).unwrap();
        let (a, b): (StateDictF64, StateDictF64) = (net.init(seed), net.init(seed + 1));
        let mid = a.lerp(&b, t).unwrap();
        let src = || Outputs { inputs: Classification::new(&net, &d, 80).unwrap().layer_inputs(), blocks: 3 };
        let pts = points(3);
        let (fixed, report) = output_repair(src(), &pts).repair(&a, &b, &mid, t).unwrap();
        prop_assert_eq!(report.repaired.len(), 7);
        // Plain layers land on their targets; stream writes too, except channels whose
        // target variance the stream's earlier writers already exceed (few).
        for (layer, stream) in &pts {
            let r = report.std_ratio_after[layer];
            if stream.is_none() {
                prop_assert!((r - 1.0).abs() < 1e-9, "{}: {}", layer, r);
            }
        }
        let missed: usize = report.unreachable.values().map(Vec::len).sum();
        prop_assert!(missed <= 3 * 16 / 2, "{:?}", report.unreachable);
        let collapse = assert_points_reset(&src(), &pts, &report.unreachable, (&a, &b, &mid, &fixed), t, 1e-6);
        prop_assert!(collapse < 1.0);
        // The plain REPAIR skips the residual stream (several producers write it).
        let (_, plain) = Repair::new(Classification::new(&net, &d, 80).unwrap().layer_inputs())
            .repair(&a, &b, &mid, t, &net.spec()).unwrap();
        prop_assert!(plain.skipped.contains(&"residual".to_string()));
    }
}

#[test]
fn output_repair_errors_name_what_is_wrong() {
    let d = data::digits().unwrap().head(40);
    let net = ResMlp::new(64, 8, 8, 1, 10).unwrap();
    let a: StateDictF64 = net.init(0);
    let src = || Outputs {
        inputs: Classification::new(&net, &d, 20).unwrap().layer_inputs(),
        blocks: 1,
    };
    let e = OutputRepair::new(src())
        .repair(&a, &a, &a, 0.5)
        .unwrap_err();
    assert!(e.to_string().contains("with_layer"), "{e}");
    let e = OutputRepair::new(src())
        .with_layer("nope")
        .unwrap()
        .repair(&a, &a, &a, 0.5)
        .unwrap_err();
    assert!(e.to_string().contains("nope.weight"), "{e}");
    let e = OutputRepair::new(src())
        .with_stream_write("blocks.0.fc2", "missing")
        .unwrap()
        .repair(&a, &a, &a, 0.5)
        .unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    let e = OutputRepair::new(src())
        .with_layer("stem")
        .unwrap()
        .repair(&a, &a, &a, 1.5)
        .unwrap_err();
    assert!(e.to_string().contains("`t`"), "{e}");
    let e = BnReset::new(Outputs {
        inputs: Classification::new(&net, &d, 20).unwrap().layer_inputs(),
        blocks: 0,
    })
    .reset(&a)
    .unwrap_err();
    assert!(e.to_string().contains("blocks.0.norm"), "{e}");
}

#[test]
fn bn_reset_agrees_with_the_networks_own_reset() {
    let d = data::digits().unwrap().head(250);
    let net = ResMlp::new(64, 16, 24, 3, 10).unwrap();
    let (a, b): (StateDictF64, StateDictF64) = (net.init(4), net.init(5));
    let mid = a.lerp(&b, 0.5).unwrap();
    // Batch-norm inputs in training mode (batch statistics), batches of 60 (the last 10).
    let task = Classification::new(&net, &d, 60)
        .unwrap()
        .with_mode(Mode::Train);
    let (fresh, reset) = BnReset::new(Outputs {
        inputs: task.layer_inputs(),
        blocks: 3,
    })
    .reset(&mid)
    .unwrap();
    assert_eq!(reset, ["blocks.0.norm", "blocks.1.norm", "blocks.2.norm"]);
    let own = reset_running_stats(&net, &mid, &d, 60).unwrap();
    assert!(fresh.max_abs_diff(&own).unwrap() < 1e-9);
    assert!(fresh.max_abs_diff(&mid).unwrap() > 1e-3);
}
