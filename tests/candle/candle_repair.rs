//! REPAIR with the residual-stream treatment and the batch-norm reset on candle
//! networks: every reset point of a candle ResNet and VGG gets the interpolated
//! statistics, and `BnReset` recomputes what candle's own training-mode batch norm
//! measures.
#![cfg(feature = "candle")]

use crate::candle_common;
use crate::repair_common;

use std::sync::Arc;

use candle_common::digit_images_f64;
use modelfusion::align::{BnReset, OutputRepair};
use modelfusion::candle::candle_core::{DType, Device, Tensor};
use modelfusion::candle::candle_nn::{VarBuilder, VarMap};
use modelfusion::candle::{
    CandleNet, CandleResNet, CandleVgg, Taps, to_state_dict_from_varmap, to_varmap,
};
use modelfusion::perm::specs::{Architecture, ResNet, Vgg};
use modelfusion::{Model, StateDictF64};
use repair_common::assert_points_reset;

fn output_repair<A>(src: A, points: &[(String, Option<String>)]) -> OutputRepair<A> {
    points
        .iter()
        .fold(OutputRepair::new(src), |r, (l, s)| match s {
            Some(s) => r.with_stream_write(l, s).unwrap(),
            None => r.with_layer(l).unwrap(),
        })
}

fn repair_keys(t: Taps) -> Vec<(String, Tensor)> {
    t.norm_outputs.into_iter().chain(t.sums).collect()
}

#[test]
fn output_repair_resets_every_point_of_a_candle_resnet() {
    let arch = ResNet::new(1, &[(6, 2), (8, 2)], 10).unwrap();
    let x = Arc::new(digit_images_f64(192, 64));
    let nb = x.len();
    let src = || {
        let (arch, x) = (arch.clone(), x.clone());
        CandleNet::new(move |vb| CandleResNet::new(&arch, vb))
            .features(nb, move |n: &CandleResNet, b| {
                Ok(repair_keys(n.forward_taps(&x[b], false)?.1))
            })
            .unwrap()
    };
    let vm = VarMap::new();
    let points = CandleResNet::new(
        &arch,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap()
    .repair_layers();
    assert_eq!(points.len(), 1 + 2 * 4 + 1);
    for (seed, t) in [(0u64, 0.5), (7, 0.3)] {
        let a: StateDictF64 = arch.random_model(seed).cast();
        let b: StateDictF64 = arch.random_model(seed + 100).cast();
        let mid = a.lerp(&b, t).unwrap();
        let (fixed, report) = output_repair(src(), &points)
            .repair(&a, &b, &mid, t)
            .unwrap();
        assert_eq!(report.repaired.len(), points.len());
        let missed: usize = report.unreachable.values().map(Vec::len).sum();
        assert!(missed <= 8, "{:?}", report.unreachable);
        let collapse = assert_points_reset(
            &src(),
            &points,
            &report.unreachable,
            (&a, &b, &mid, &fixed),
            t,
            1e-6,
        );
        assert!(
            collapse < 0.9,
            "the plain interpolation should lose variance: {collapse}"
        );
        // Only the batch norms' affine parameters moved.
        for name in fixed.names() {
            let moved = fixed.get(name).unwrap() != mid.get(name).unwrap();
            let affine = name.ends_with(".weight") || name.ends_with(".bias");
            let norm = name.contains("bn") || name.contains("shortcut.1");
            assert!(!moved || (affine && norm), "{name} moved");
        }
    }
}

#[test]
fn output_repair_resets_every_norm_of_a_candle_vgg() {
    let arch = Vgg::new(1, &[8, 8, 12], &[16, 10], 3).unwrap();
    let x = Arc::new(digit_images_f64(128, 64));
    let nb = x.len();
    let src = || {
        let (arch, x) = (arch.clone(), x.clone());
        CandleNet::new(move |vb| CandleVgg::new(&arch, &[1], vb))
            .features(nb, move |n: &CandleVgg, b| {
                Ok(repair_keys(n.forward_taps(&x[b], false)?.1))
            })
            .unwrap()
    };
    let points: Vec<(String, Option<String>)> =
        (0..3).map(|i| (format!("norms.{i}"), None)).collect();
    let a: StateDictF64 = arch.random_model(1).cast();
    let b: StateDictF64 = arch.random_model(2).cast();
    let mid = a.lerp(&b, 0.5).unwrap();
    let (fixed, report) = output_repair(src(), &points)
        .repair(&a, &b, &mid, 0.5)
        .unwrap();
    assert!(report.unreachable.is_empty());
    assert_points_reset(
        &src(),
        &points,
        &report.unreachable,
        (&a, &b, &mid, &fixed),
        0.5,
        1e-6,
    );
}

#[test]
fn bn_reset_recomputes_what_candles_batch_norm_measures() {
    let arch = ResNet::new(1, &[(6, 1), (8, 1)], 10).unwrap();
    let x = Arc::new(digit_images_f64(150, 50));
    let nb = x.len();
    let a: StateDictF64 = arch.random_model(3).cast();
    let src = {
        let (arch, x) = (arch.clone(), x.clone());
        CandleNet::new(move |vb| CandleResNet::new(&arch, vb))
            .features(nb, move |n: &CandleResNet, b| {
                Ok(n.forward_taps(&x[b], true)?.1.norm_inputs)
            })
            .unwrap()
    };
    let (fresh, reset) = BnReset::new(src).reset(&a).unwrap();
    assert_eq!(reset.len(), 1 + 2 * 2 + 1);
    // Candle's own: one training-mode pass per batch from the same model updates the
    // running statistics with momentum 0.1; undo the momentum to get the batch's
    // statistics, then average the batches (equal sizes).
    let mut expected: Option<StateDictF64> = None;
    for xb in x.iter() {
        let vm = to_varmap(&a, DType::F64, &Device::Cpu).unwrap();
        let net = CandleResNet::new(
            &arch,
            VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
        )
        .unwrap();
        net.forward_t(&xb.to_dtype(DType::F64).unwrap(), true)
            .unwrap();
        let after: StateDictF64 = to_state_dict_from_varmap(&vm).unwrap();
        // batch = (after - 0.9 * before) / 0.1, over running statistics (others: a's).
        let batch = after
            .try_map(|name, t| {
                let before = a.get(name).unwrap();
                Ok(if name.contains("running") {
                    (t - &(before * 0.9)) / 0.1
                } else {
                    before.clone()
                })
            })
            .unwrap();
        let share = batch.scale(1.0 / nb as f64).unwrap();
        expected = Some(match expected {
            None => share,
            Some(e) => e.add(&share).unwrap(),
        });
    }
    let expected = expected.unwrap();
    let err = fresh.max_abs_diff(&expected).unwrap();
    assert!(err < 1e-9, "{err}");
    assert!(fresh.max_abs_diff(&a).unwrap() > 1e-2);
}
