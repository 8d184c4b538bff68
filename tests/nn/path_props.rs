//! Properties of the ready paths, checked against independent reference values.

use crate::path_common as common;

use common::{bits_equal, flat, model, vector};
use modelfusion::path::{
    Bezier, Linear, PathSampler, PolyChain, bernstein, check_t, control_gradients,
    polychain_coefficients, straight_line_controls,
};
use modelfusion::{Error, Model, StateDict, StateDictF32, StateDictF64};
use ndarray::{ArrayD, IxDyn, arr1};
use proptest::prelude::*;

fn models(n: usize) -> impl Strategy<Value = Vec<StateDictF64>> {
    // Include signed zeros and tiny values: exact endpoints must survive them.
    let elem = prop_oneof![
        Just(0.0f64),
        Just(-0.0f64),
        -1e3f64..1e3,
        Just(f64::MIN_POSITIVE),
    ];
    prop::collection::vec(
        (
            prop::collection::vec(elem.clone(), 3),
            prop::collection::vec(elem, 4),
        ),
        n,
    )
    .prop_map(|v| {
        v.into_iter()
            .map(|(w, m)| model(&w, [m[0], m[1], m[2], m[3]]))
            .collect()
    })
}

fn all_paths(c: &[StateDictF64]) -> Vec<Box<dyn PathSampler<StateDictF64>>> {
    let n = c.len();
    vec![
        Box::new(Linear::new(c[0].clone(), c[n - 1].clone()).unwrap()),
        Box::new(Bezier::new(c.to_vec()).unwrap()),
        Box::new(PolyChain::new(c.to_vec()).unwrap()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn endpoints_are_exact(c in (2usize..7).prop_flat_map(models)) {
        for p in all_paths(&c) {
            prop_assert!(bits_equal(&p.point(0.0).unwrap(), &c[0]));
            prop_assert!(bits_equal(&p.point(1.0).unwrap(), &c[c.len() - 1]));
        }
    }

    #[test]
    fn polychain_passes_through_every_control(c in (2usize..41).prop_flat_map(models)) {
        let chain = PolyChain::new(c.clone()).unwrap();
        let n = c.len();
        for (k, ck) in c.iter().enumerate() {
            let t = k as f64 / (n - 1) as f64;
            prop_assert!(bits_equal(&chain.point(t).unwrap(), ck), "knot {} of {}", k, n);
        }
    }

    #[test]
    fn bezier_with_two_controls_is_linear(c in models(2), t in 0.0f64..=1.0) {
        let line = Linear::new(c[0].clone(), c[1].clone()).unwrap();
        let bez = Bezier::new(c.clone()).unwrap();
        prop_assert_eq!(line.coefficients(t).unwrap(), bez.coefficients(t).unwrap());
        prop_assert!(bits_equal(&line.point(t).unwrap(), &bez.point(t).unwrap()));
    }

    #[test]
    fn coefficients_are_a_partition_of_unity(n in 2usize..40, t in 0.0f64..=1.0) {
        for c in [bernstein(n, t), polychain_coefficients(n, t)] {
            prop_assert_eq!(c.len(), n);
            prop_assert!(c.iter().all(|&x| x >= 0.0));
            let s: f64 = c.iter().sum();
            prop_assert!((s - 1.0).abs() <= 1e-13, "sum {}", s);
        }
        // PolyChain: at most two neighbouring coefficients are non-zero.
        let c = polychain_coefficients(n, t);
        let nz: Vec<usize> = (0..n).filter(|&k| c[k] != 0.0).collect();
        prop_assert!(nz.len() <= 2 && nz.windows(2).all(|w| w[1] == w[0] + 1));
    }

    /// A path through controls laid on the straight line is the straight line.
    #[test]
    fn straight_curves_are_the_line(c in models(2), n in 2usize..8, t in 0.0f64..=1.0) {
        let line = Linear::new(c[0].clone(), c[1].clone()).unwrap().point(t).unwrap();
        let scale = flat(&c[0]).iter().chain(flat(&c[1]).iter()).fold(1.0f64, |a, x| a.max(x.abs()));
        for p in [
            Bezier::straight(&c[0], &c[1], n).unwrap().point(t).unwrap(),
            PolyChain::straight(&c[0], &c[1], n).unwrap().point(t).unwrap(),
        ] {
            prop_assert!(p.max_abs_diff(&line).unwrap() <= 1e-13 * scale * n as f64);
        }
    }

    /// The point is the coefficient-weighted sum of the controls.
    #[test]
    fn point_is_the_weighted_sum(c in (3usize..6).prop_flat_map(models), t in 0.0f64..=1.0) {
        for p in all_paths(&c) {
            let coef = p.coefficients(t).unwrap();
            let ctrl = p.controls();
            let want: Vec<f64> = (0..flat(&ctrl[0]).len())
                .map(|i| ctrl.iter().zip(&coef).map(|(m, &ck)| ck * flat(m)[i]).sum())
                .collect();
            for (x, y) in flat(&p.point(t).unwrap()).iter().zip(&want) {
                prop_assert!((x - y).abs() <= 1e-12 * 1e3 * ctrl.len() as f64);
            }
        }
    }
}

/// The Bernstein basis against scipy's binomial pmf (tests/golden/path_barrier.py).
#[test]
fn bernstein_matches_scipy() {
    let text = include_str!("../golden/path_barrier.txt");
    let mut seen = 0;
    for line in text.lines().filter(|l| l.starts_with("bernstein ")) {
        let f: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        let (n, t) = (f[0] as usize, f[1]);
        let got = bernstein(n, t);
        assert_eq!(got.len(), n);
        for (g, w) in got.iter().zip(&f[2..]) {
            assert!((g - w).abs() < 1e-15, "n={n} t={t}: {g} vs {w}");
        }
        seen += 1;
    }
    assert_eq!(seen, 35);
}

/// With 23 controls, `(15 / 22) * 22 != 15` in floating point: the knot is still hit.
#[test]
fn polychain_knots_that_round() {
    let c: Vec<StateDictF64> = (0..23).map(|k| vector(&[k as f64 * 0.1, -0.0])).collect();
    let chain = PolyChain::new(c.clone()).unwrap();
    assert_ne!((15.0f64 / 22.0) * 22.0, 15.0);
    assert!(bits_equal(&chain.point(15.0 / 22.0).unwrap(), &c[15]));
}

#[test]
fn f32_endpoints_and_midpoint() {
    let a: StateDictF32 =
        StateDict::from_pairs([("w", arr1(&[-0.0f32, 1.0e-30, 3.0]).into_dyn())]).unwrap();
    let b: StateDictF32 =
        StateDict::from_pairs([("w", arr1(&[1.0f32, 2.0, -0.0]).into_dyn())]).unwrap();
    let bend: StateDictF32 =
        StateDict::from_pairs([("w", arr1(&[0.5f32, 0.5, 0.5]).into_dyn())]).unwrap();
    let curve = Bezier::new(vec![a.clone(), bend, b.clone()]).unwrap();
    let p0 = curve.point(0.0).unwrap();
    let bits = |m: &StateDictF32| {
        m.get("w")
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&p0), bits(&a));
    assert_eq!(bits(&curve.point(1.0).unwrap()), bits(&b));
    let mid = curve.point(0.5).unwrap();
    assert_eq!(mid.get("w").unwrap().as_slice().unwrap(), &[0.5, 0.75, 1.0]);
}

#[test]
fn control_gradients_scale_by_the_coefficients() {
    let c = vec![
        vector(&[0.0]),
        vector(&[1.0]),
        vector(&[5.0]),
        vector(&[2.0]),
    ];
    let grad = vector(&[2.0]);
    for p in [
        Box::new(Bezier::new(c.clone()).unwrap()) as Box<dyn PathSampler<StateDictF64>>,
        Box::new(PolyChain::new(c.clone()).unwrap()),
    ] {
        let g = control_gradients(p.as_ref(), 0.3, &grad).unwrap();
        let coef = p.coefficients(0.3).unwrap();
        for (gk, ck) in g.iter().zip(coef) {
            assert_eq!(gk.get("w").unwrap()[[0]], 2.0 * ck);
        }
    }
    // A gradient of another structure is rejected.
    let line = Linear::new(vector(&[0.0]), vector(&[1.0])).unwrap();
    assert!(control_gradients(&line, 0.5, &vector(&[1.0, 2.0])).is_err());
}

// ---- bad input ----

#[test]
fn t_outside_the_unit_interval_is_rejected() {
    let c = vec![vector(&[0.0]), vector(&[1.0]), vector(&[2.0])];
    for p in all_paths(&c) {
        for t in [
            -1e-12,
            1.0 + 1e-12,
            -3.0,
            7.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let e = p.point(t).unwrap_err();
            assert!(
                matches!(e, Error::InvalidParameter { ref param, .. } if param == "t"),
                "{e}"
            );
            assert!(p.coefficients(t).is_err());
        }
    }
    assert!(check_t(0.0).is_ok() && check_t(1.0).is_ok());
}

#[test]
fn fewer_than_two_controls_is_rejected() {
    let e = Bezier::new(vec![vector(&[1.0])]).unwrap_err().to_string();
    assert!(
        e.contains("controls") && e.contains("at least two") && e.contains("got 1"),
        "{e}"
    );
    assert!(PolyChain::<StateDictF64>::new(vec![]).is_err());
    assert!(Bezier::straight(&vector(&[0.0]), &vector(&[1.0]), 1).is_err());
    assert!(straight_line_controls(&vector(&[0.0]), &vector(&[1.0]), 0).is_err());
}

#[test]
fn endpoints_of_different_structure_are_rejected() {
    let a = model(&[0.0, 1.0, 2.0], [0.0; 4]);
    // Different shape of `w`.
    let b = model(&[0.0, 1.0], [0.0; 4]);
    let e = Linear::new(a.clone(), b.clone()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("`w`") && msg.contains("[3]") && msg.contains("[2]"),
        "{msg}"
    );
    // A missing parameter.
    let c = vector(&[0.0, 1.0, 2.0]);
    let msg = Linear::new(a.clone(), c.clone()).unwrap_err().to_string();
    assert!(msg.contains("`m`"), "{msg}");
    // An extra parameter.
    let msg = Linear::new(c.clone(), a.clone()).unwrap_err().to_string();
    assert!(msg.contains("`m`"), "{msg}");
    // An inner control of another structure: the error names the control and parameter.
    let bad = StateDict::from_pairs([
        ("w", ArrayD::zeros(IxDyn(&[3]))),
        ("m", ArrayD::zeros(IxDyn(&[4]))),
    ])
    .unwrap();
    let msg = Bezier::new(vec![a.clone(), bad.clone(), a.clone()])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("control 1") && msg.contains("`m`"), "{msg}");
    let msg = PolyChain::new(vec![a.clone(), a.clone(), bad])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("control 2") && msg.contains("end point"),
        "{msg}"
    );
}
