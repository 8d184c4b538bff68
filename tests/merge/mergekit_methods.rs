//! Golden tests of the mergers ported from mergekit 0.1.5 (nuslerp, multislerp, karcher,
//! sce, arcee_fusion, nearswap, ram, ramplus_tl): small tensors whose results follow by
//! hand from the formulas in mergekit's sources (SCE's selection against mergekit's
//! own masks: tests/merge/mergekit_golden.rs).

use std::f64::consts::{FRAC_PI_2, FRAC_PI_6};

use modelfusion::merge::{
    ArceeFusion, KarcherMean, Merger, MultiSlerp, NearSwap, NuSlerp, Ram, Sce, SlerpVectors,
    TensorMerger, nuslerp_t,
};
use modelfusion::{Error, Model, StateDict, StateDictF64};
use ndarray::{ArrayD, IxDyn};

fn sd(shape: &[usize], v: &[f64]) -> StateDictF64 {
    let t = ArrayD::from_shape_vec(IxDyn(shape), v.to_vec()).unwrap();
    StateDict::from_pairs([("w", t)]).unwrap()
}

fn vals(m: &StateDictF64) -> Vec<f64> {
    m.get("w").unwrap().iter().copied().collect()
}

fn close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "entry {i}: got {g}, want {w} (all: {got:?})"
        );
    }
}

fn refs(ms: &[StateDictF64]) -> Vec<&StateDictF64> {
    ms.iter().collect()
}

#[test]
fn nuslerp_whole_rows_and_columns() {
    // Whole tensor, no base: quarter turn between orthonormal vectors.
    let (a, b) = (sd(&[2], &[1.0, 0.0]), sd(&[2], &[0.0, 1.0]));
    let t = nuslerp_t(1.0, 3.0);
    assert_eq!(t, 0.75);
    let m = NuSlerp::new(t).unwrap().merge(&[&a, &b]).unwrap();
    close(
        &vals(&m),
        &[(0.75 * FRAC_PI_2).cos(), (0.75 * FRAC_PI_2).sin()],
        1e-12,
    );

    // Around a base, per row: row 0's task vectors (1, 0), (0, 1) are orthogonal,
    // row 1's (2, 0), (4, 0) collinear (linear interpolation).
    let base = sd(&[2, 2], &[1.0; 4]);
    let a = sd(&[2, 2], &[2.0, 1.0, 3.0, 1.0]);
    let b = sd(&[2, 2], &[1.0, 2.0, 5.0, 1.0]);
    let rows = NuSlerp::with_base(Some(base.clone()), t)
        .unwrap()
        .with_vectors(SlerpVectors::LastAxis)
        .merge(&[&a, &b])
        .unwrap();
    let (c, s) = ((0.75 * FRAC_PI_2).cos(), (0.75 * FRAC_PI_2).sin());
    close(&vals(&rows), &[1.0 + c, 1.0 + s, 1.0 + 3.5, 1.0], 1e-12);

    // Per column (mergekit's nuslerp_row_wise): column 0's task vectors (1, 2), (0, 4);
    // column 1's (0, 0) and (1, 0): the zero one counts as orthogonal (mergekit) or
    // makes the pair interpolate linearly (with_zero_lerp).
    let cols = |zero_lerp| {
        vals(
            &NuSlerp::with_base(Some(base.clone()), t)
                .unwrap()
                .with_vectors(SlerpVectors::FirstAxis)
                .with_zero_lerp(zero_lerp)
                .merge(&[&a, &b])
                .unwrap(),
        )
    };
    let th = (8.0 / (5.0f64.sqrt() * 4.0)).acos();
    let (c0, c1) = ((0.25 * th).sin() / th.sin(), (0.75 * th).sin() / th.sin());
    let col0 = [1.0 + c0 * 1.0, 1.0 + c0 * 2.0 + c1 * 4.0];
    close(&cols(false), &[col0[0], 1.0 + s, col0[1], 1.0], 1e-12);
    close(&cols(true), &[col0[0], 1.0 + 0.75, col0[1], 1.0], 1e-12);

    // A 1-D tensor is one vector whatever the choice.
    let (x, y) = (sd(&[2], &[1.0, 0.0]), sd(&[2], &[0.0, 1.0]));
    for v in [SlerpVectors::LastAxis, SlerpVectors::FirstAxis] {
        let m = NuSlerp::new(0.5)
            .unwrap()
            .with_vectors(v)
            .merge(&[&x, &y])
            .unwrap();
        close(&vals(&m), &[0.5f64.sqrt(); 2], 1e-12);
    }
    // Exactly two models.
    let e = NuSlerp::new(0.5).unwrap().merge(&[&x, &y, &x]).unwrap_err();
    assert!(e.to_string().contains("exactly 2"), "{e}");
    assert!(NuSlerp::<StateDictF64>::new(f64::INFINITY).is_err());
}

#[test]
fn multislerp_is_the_normalised_mean_direction_times_the_mean_norm() {
    let (a, b) = (sd(&[2], &[3.0, 0.0]), sd(&[2], &[0.0, 1.0]));
    let r2 = 2.0f64.sqrt();
    let m = MultiSlerp::new(vec![1.0, 1.0], true)
        .unwrap()
        .merge(&[&a, &b])
        .unwrap();
    close(&vals(&m), &[r2, r2], 1e-7);
    // Unnormalised weights 2, 2: the mean norm is 2 * 3 + 2 * 1 = 8.
    let m = MultiSlerp::new(vec![2.0, 2.0], false)
        .unwrap()
        .merge(&[&a, &b])
        .unwrap();
    close(&vals(&m), &[8.0 / r2, 8.0 / r2], 1e-6);
    // Around a base: the same task vectors, shifted by it.
    let base = sd(&[2], &[1.0, -1.0]);
    let (pa, pb) = (sd(&[2], &[4.0, -1.0]), sd(&[2], &[1.0, 0.0]));
    let m = MultiSlerp::with_base(Some(base.clone()), vec![1.0, 1.0], true)
        .unwrap()
        .merge(&[&pa, &pb])
        .unwrap();
    close(&vals(&m), &[1.0 + r2, -1.0 + r2], 1e-7);
    // Antipodal pair with equal weights: linear fallback; three cancelling: an error.
    let neg = sd(&[2], &[-3.0, 0.0]);
    let m = MultiSlerp::new(vec![1.0, 1.0], true)
        .unwrap()
        .merge(&[&a, &neg])
        .unwrap();
    close(&vals(&m), &[0.0, 0.0], 0.0);
    let zero = sd(&[2], &[0.0, 0.0]);
    let e = MultiSlerp::new(vec![1.0, 1.0, 1.0], true)
        .unwrap()
        .merge(&[&a, &neg, &zero])
        .unwrap_err();
    assert!(matches!(e, Error::Infeasible { .. }), "{e}");
    // One model comes back unchanged, base or not.
    let m = MultiSlerp::with_base(Some(base), vec![0.3], true)
        .unwrap()
        .merge(&[&pa])
        .unwrap();
    assert_eq!(m, pa);
    // eps 0 and a zero tensor: its direction is undefined.
    let e = MultiSlerp::new(vec![1.0, 1.0], true)
        .unwrap()
        .with_eps(0.0)
        .unwrap()
        .merge(&[&a, &zero])
        .unwrap_err();
    assert!(e.to_string().contains("eps"), "{e}");
}

#[test]
fn karcher_as_mergekit_computes_it() {
    // On a circle one Riemannian step lands on the mean angle: (0 + 0 + pi/2) / 3.
    let (e1, e2) = (sd(&[2], &[1.0, 0.0]), sd(&[2], &[0.0, 1.0]));
    let three = [e1.clone(), e1.clone(), e2.clone()];
    let m = KarcherMean::mergekit(10, 1e-5)
        .unwrap()
        .merge(&refs(&three))
        .unwrap();
    close(&vals(&m), &[FRAC_PI_6.cos(), FRAC_PI_6.sin()], 1e-12);
    // No step: the normalised Euclidean mean, angle atan(1/2).
    let m = KarcherMean::mergekit(0, 1e-5)
        .unwrap()
        .merge(&refs(&three))
        .unwrap();
    let a = 0.5f64.atan();
    close(&vals(&m), &[a.cos(), a.sin()], 1e-12);
    // Norms <= tol drop out of the direction; all of them small gives zeros.
    let (big, small) = (sd(&[2], &[0.0, 4.0]), sd(&[2], &[1e-6, 0.0]));
    let m = KarcherMean::mergekit(10, 1e-5)
        .unwrap()
        .merge(&[&big, &small])
        .unwrap();
    close(&vals(&m), &[0.0, 2.0 + 0.5e-6], 1e-15);
    let zero = sd(&[2], &[0.0, 0.0]);
    let m = KarcherMean::mergekit(10, 1e-5)
        .unwrap()
        .merge(&[&big, &zero])
        .unwrap();
    assert_eq!(vals(&m), [0.0, 2.0]);
    let tiny = sd(&[2], &[0.0, 1e-6]);
    let m = KarcherMean::mergekit(10, 1e-5)
        .unwrap()
        .merge(&[&tiny, &small])
        .unwrap();
    assert_eq!(vals(&m), [0.0, 0.0]);
    // Antipodal: mergekit starts at the first direction, where the step vanishes;
    // the strict rules refuse.
    let neg = sd(&[2], &[-1.0, 0.0]);
    let m = KarcherMean::mergekit(10, 1e-5)
        .unwrap()
        .merge(&[&e1, &neg])
        .unwrap();
    close(&vals(&m), &[1.0, 0.0], 1e-12);
    assert!(KarcherMean::uniform().merge(&[&e1, &neg]).is_err());
    // The cap is not an error here (it is for the strict rules).
    let spread = [e1.clone(), e2.clone(), sd(&[2], &[-1.0, 0.1])];
    assert!(
        KarcherMean::mergekit(1, 1e-12)
            .unwrap()
            .merge(&refs(&spread))
            .is_ok()
    );
    assert!(matches!(
        KarcherMean::uniform()
            .with_tolerance(1e-300, 1)
            .unwrap()
            .merge(&refs(&spread)),
        Err(Error::NotConverged { .. })
    ));
}

#[test]
fn sce_selects_weights_and_erases() {
    let base = sd(&[4], &[0.0; 4]);
    let ms = [
        sd(&[4], &[1.0, 2.0, 0.0, 4.0]),
        sd(&[4], &[1.0, -2.0, 0.0, 0.0]),
        sd(&[4], &[1.0, 0.0, 3.0, -5.0]),
    ];
    // Variances 0, 8/3, 2, 366/27: three are non-zero.
    // select_topk 0.5 keeps floor(1.5) = 1 entry (3); its sum -1 elects -, so only the
    // third model (-5) agrees.
    let sce = |topk: f64| {
        vals(
            &Sce::new(base.clone(), topk)
                .unwrap()
                .merge(&refs(&ms))
                .unwrap(),
        )
    };
    close(&sce(0.5), &[0.0, 0.0, 0.0, -5.0], 1e-12);
    // 0.7 keeps floor(2.1) = 2 entries (3 and 1); entry 1 sums to 0: +, model 0 alone.
    close(&sce(0.7), &[0.0, 2.0, 0.0, -5.0], 1e-12);
    // Everything kept: entry 0 agrees everywhere (the weighted mean of equal values),
    // entries 1 and 3 have one agreeing model each, entry 2 one changed model.
    close(&sce(1.0), &[1.0, 2.0, 3.0, -5.0], 1e-12);
    // One model and a selection: zero variance everywhere, nothing kept.
    let m = Sce::new(base.clone(), 0.5)
        .unwrap()
        .merge(&[&ms[0]])
        .unwrap();
    assert_eq!(vals(&m), [0.0; 4]);
    // A NaN is refused, naming the model.
    let bad = sd(&[4], &[0.0, f64::NAN, 0.0, 0.0]);
    let e = Sce::new(base, 1.0)
        .unwrap()
        .merge(&[&ms[0], &bad])
        .unwrap_err();
    assert!(e.to_string().contains("model 1"), "{e}");
}

#[test]
fn sce_uniform_weights_below_the_threshold() {
    let base = sd(&[1], &[0.0]);
    let (a, b) = (sd(&[1], &[3e-4]), sd(&[1], &[1e-4]));
    let mk = Sce::new(base.clone(), 1.0)
        .unwrap()
        .merge(&[&a, &b])
        .unwrap();
    close(&vals(&mk), &[2e-4], 1e-15);
    let energy = Sce::new(base, 1.0)
        .unwrap()
        .with_uniform_below(0.0)
        .unwrap()
        .merge(&[&a, &b])
        .unwrap();
    close(&vals(&energy), &[2.8e-4], 1e-15);
}

#[test]
fn arcee_fusion_keeps_the_important_changes() {
    // One row: importances |p| KL, quantiles at positions 1, 3, 5 of 8 sorted:
    // 2, 4, 6 (times KL), threshold 4 + 1.5 (6 - 2) = 10: only 40 passes.
    let base = sd(&[8], &[0.0; 8]);
    let p = sd(&[8], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 40.0]);
    let m = ArceeFusion::new(base, 0).merge(&[&p]).unwrap();
    assert_eq!(vals(&m), [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 40.0]);
    // Row 0 moves uniformly: same softmax, KL 0, no importance despite the change.
    let base = sd(&[2, 4], &[0.0; 8]);
    let p = sd(&[2, 4], &[5.0, 5.0, 5.0, 5.0, 0.0, 1.0, 2.0, 40.0]);
    let m = ArceeFusion::new(base, 0).merge(&[&p]).unwrap();
    // Sorted importances (units of KL_1): 0, 0, 0, 0, 0, 1, 2, 40 -> q1 = s[1] = 0,
    // q2 = s[3] = 0, q3 = s[5] = 1: threshold 1.5; kept: 2 and 40 (and no zero).
    assert_eq!(vals(&m), [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 40.0]);
    // Exactly one model.
    let e = ArceeFusion::new(sd(&[2, 4], &[0.0; 8]), 0)
        .merge(&[&p, &p])
        .unwrap_err();
    assert!(e.to_string().contains("exactly 1"), "{e}");
}

#[test]
fn arcee_fusion_samples_large_tensors_reproducibly() {
    let n = modelfusion::merge::FUSION_QUANTILE_SAMPLE + 4097;
    let rows = n / 7;
    let base = StateDict::from_pairs([("w", ArrayD::<f32>::zeros(IxDyn(&[rows, 7])))]).unwrap();
    let p: Vec<f32> = (0..rows * 7)
        .map(|i| ((i * 7919) % 61) as f32 / 64.0)
        .collect();
    let p = ArrayD::from_shape_vec(IxDyn(&[rows, 7]), p).unwrap();
    let f = ArceeFusion::new(base.clone(), 3);
    let (x, y): (ArrayD<f32>, ArrayD<f32>) = (
        f.merge_tensor("w", &[&p]).unwrap(),
        f.merge_tensor("w", &[&p]).unwrap(),
    );
    assert_eq!(x, y);
    let exact: ArrayD<f32> = f
        .clone()
        .with_exact_quantiles(true)
        .merge_tensor("w", &[&p])
        .unwrap();
    // The sampled threshold is close to the exact one: few entries differ.
    let differ = x.iter().zip(exact.iter()).filter(|(a, b)| a != b).count();
    assert!(differ * 100 < rows * 7, "{differ}");
}

#[test]
fn nearswap_moves_by_t_over_the_distance() {
    let base = sd(&[4], &[0.0, 1.0, -2.0, 3.0]);
    let m = sd(&[4], &[0.5, 5.0, -2.0, 3.0 - 1e-9]);
    let out = NearSwap::new(base.clone(), 1.0)
        .unwrap()
        .merge(&[&m])
        .unwrap();
    // |0.5| <= 1: swapped; distance 4: w = 1/4 -> 2; equal: base; 1e-9 < 1e-6: swapped.
    close(&vals(&out), &[0.5, 2.0, -2.0, 3.0 - 1e-9], 1e-15);
    let out = NearSwap::new(base.clone(), 0.0)
        .unwrap()
        .merge(&[&m])
        .unwrap();
    assert_eq!(out, base);
    assert!(NearSwap::new(base.clone(), f64::NAN).is_err());
    assert!(NearSwap::new(base, 1.0).unwrap().merge(&[&m, &m]).is_err());
}

#[test]
fn ram_keeps_unique_changes_and_averages_shared_ones() {
    let base = sd(&[3], &[0.0, 0.0, 1.0]);
    let a = sd(&[3], &[1e-6, 0.5, 1.0]);
    let b = sd(&[3], &[0.3, 0.5, 3.0]);
    // Entry 0: only b contributes (a's change <= epsilon); entry 1: both (mean);
    // entry 2: b alone.
    let m = Ram::new(base.clone(), 1e-5)
        .unwrap()
        .merge(&[&a, &b])
        .unwrap();
    close(&vals(&m), &[0.3, 0.5, 3.0], 1e-15);
    // RAM+: a shares 1, has 0 alone; b shares 1, has 2 alone: rho_b = 1/2,
    // l_b = 1 + 0.1 * min(0.5, 0.2) = 1.02.
    let m = Ram::plus(base.clone(), 0.1, 0.2, 1e-5)
        .unwrap()
        .merge(&[&a, &b])
        .unwrap();
    close(&vals(&m), &[0.3 * 1.02, 0.5, 1.0 + 2.0 * 1.02], 1e-15);
    let m = Ram::plus(base.clone(), 0.1, 0.8, 1e-5)
        .unwrap()
        .merge(&[&a, &b])
        .unwrap();
    close(&vals(&m), &[0.3 * 1.05, 0.5, 1.0 + 2.0 * 1.05], 1e-15);
    // A NaN would never count as a change: refused.
    let bad = sd(&[3], &[f64::NAN, 0.0, 0.0]);
    let e = Ram::new(base, 1e-5)
        .unwrap()
        .merge(&[&a, &bad])
        .unwrap_err();
    assert!(e.to_string().contains("model 1"), "{e}");
}
