//! The loss barrier: golden values from numpy/scipy, properties, and bad input.

use crate::path_common as common;

use common::{Ring, model, vector};
use modelfusion::barrier::{BarrierConfig, loss_barrier};
use modelfusion::path::{Bezier, Linear, PathSampler, PolyChain};
use modelfusion::{Error, Model, Objective, Result, StateDictF64};
use proptest::prelude::*;

/// `(|w|^2 - 1)^2 + 0.3 w_0`, the objective of tests/golden/path_barrier.py.
struct Golden;
impl Objective<StateDictF64> for Golden {
    fn loss(&self, m: &StateDictF64) -> Result<f64> {
        let w = m.require("w", "model")?;
        Ok((m.norm().powi(2) - 1.0).powi(2) + 0.3 * w[[0]])
    }
}

fn golden(key: &str) -> Vec<Vec<f64>> {
    include_str!("../golden/path_barrier.txt")
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(key))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap())
                .collect()
        })
        .collect()
}

fn golden_curve() -> Bezier<StateDictF64> {
    Bezier::new(vec![
        vector(&[-1.0, 0.0]),
        vector(&[0.2, 0.6]),
        vector(&[1.0, 0.3]),
    ])
    .unwrap()
}

#[test]
fn grid_values_match_numpy() {
    let r = loss_barrier(&golden_curve(), &Golden, &BarrierConfig::default()).unwrap();
    let grid = golden("grid");
    assert_eq!(r.curve.len(), 25);
    for ((t, v), g) in r.curve.iter().zip(&grid) {
        assert!(
            (t - g[0]).abs() < 1e-15 && (v - g[1]).abs() < 1e-13,
            "{t} {v} vs {g:?}"
        );
    }
    let f = &golden("frankle")[0];
    let i = &golden("interpolated")[0];
    assert!((r.frankle - f[0]).abs() < 1e-13 && (r.frankle_t - f[1]).abs() < 1e-15);
    assert!((r.interpolated - i[0]).abs() < 1e-13 && (r.interpolated_t - i[1]).abs() < 1e-15);
    assert_ne!(r.frankle_t, r.interpolated_t);
    assert!((r.max_value() - r.curve.iter().map(|p| p.1).fold(f64::MIN, f64::max)).abs() < 1e-15);
}

#[test]
fn refinement_finds_scipy_maxima() {
    let cfg = BarrierConfig::default().with_refinement(40);
    let r = loss_barrier(&golden_curve(), &Golden, &cfg).unwrap();
    let f = &golden("refined_frankle")[0];
    let i = &golden("refined_interpolated")[0];
    assert!(
        (r.frankle - f[0]).abs() < 1e-10,
        "{} vs {}",
        r.frankle,
        f[0]
    );
    assert!(
        (r.frankle_t - f[1]).abs() < 1e-5,
        "{} vs {}",
        r.frankle_t,
        f[1]
    );
    assert!(
        (r.interpolated - i[0]).abs() < 1e-10,
        "{} vs {}",
        r.interpolated,
        i[0]
    );
    assert!(
        (r.interpolated_t - i[1]).abs() < 1e-5,
        "{} vs {}",
        r.interpolated_t,
        i[1]
    );
    // Refinement only adds points: at most 2 x 40 new evaluations, curve still sorted.
    assert!(r.curve.len() > 25 && r.curve.len() <= 25 + 80);
    assert!(r.curve.windows(2).all(|w| w[0].0 < w[1].0));
    // And the refined barriers are never below the grid ones.
    let plain = loss_barrier(&golden_curve(), &Golden, &BarrierConfig::default()).unwrap();
    assert!(r.frankle >= plain.frankle && r.interpolated >= plain.interpolated);
    // A small budget (one point) is accepted.
    let one = loss_barrier(
        &golden_curve(),
        &Golden,
        &BarrierConfig::default().with_refinement(1),
    )
    .unwrap();
    assert_eq!(one.curve.len(), 27);
}

/// The double well on a line: the maximum at t = 0.5 is missed by a 4-point grid and
/// found by refinement; equal endpoint losses make one refinement enough.
#[test]
fn refinement_recovers_an_off_grid_peak() {
    struct Well;
    impl Objective<StateDictF64> for Well {
        fn loss(&self, m: &StateDictF64) -> Result<f64> {
            let w = m.require("w", "model")?[[0]];
            Ok((w * w - 1.0).powi(2))
        }
    }
    let line = Linear::new(vector(&[-1.0]), vector(&[1.0])).unwrap();
    let coarse = BarrierConfig::uniform(4).unwrap();
    let r = loss_barrier(&line, &Well, &coarse).unwrap();
    assert!(r.frankle < 0.8);
    let r = loss_barrier(&line, &Well, &coarse.clone().with_refinement(30)).unwrap();
    assert!(
        (r.frankle - 1.0).abs() < 1e-10 && (r.frankle_t - 0.5).abs() < 1e-5,
        "{r:?}"
    );
    assert_eq!(r.frankle, r.interpolated);
    assert_eq!(r.curve.len(), 4 + 30);
}

#[test]
fn interpolated_and_frankle_differ_with_unequal_endpoints() {
    // L(phi(t)) = 2t + sin(pi t) on the line from 0 to 1 (L = 2w + sin(pi w)).
    struct F;
    impl Objective<StateDictF64> for F {
        fn loss(&self, m: &StateDictF64) -> Result<f64> {
            let w = m.require("w", "model")?[[0]];
            Ok(2.0 * w + (std::f64::consts::PI * w).sin())
        }
    }
    let line = Linear::new(vector(&[0.0]), vector(&[1.0])).unwrap();
    let r = loss_barrier(
        &line,
        &F,
        &BarrierConfig::uniform(101).unwrap().with_refinement(40),
    )
    .unwrap();
    assert_eq!((r.start, r.end), (0.0, 2.0));
    // Interpolated: max of sin(pi t) = 1 at t = 1/2.
    assert!((r.interpolated - 1.0).abs() < 1e-12 && (r.interpolated_t - 0.5).abs() < 1e-5);
    // Frankle: 2 + pi cos(pi t) = 0.
    let t = (-2.0 / std::f64::consts::PI).acos() / std::f64::consts::PI;
    let want = 2.0 * t + (std::f64::consts::PI * t).sin() - 1.0;
    assert!(
        (r.frankle - want).abs() < 1e-10 && (r.frankle_t - t).abs() < 1e-5,
        "{r:?}"
    );
}

#[test]
fn user_grids_gain_their_endpoints() {
    let line = Linear::new(vector(&[-1.0, 0.0]), vector(&[1.0, 0.0])).unwrap();
    let ring = Ring { c: 0.0, s: 1.0 };
    let r = loss_barrier(
        &line,
        &ring,
        &BarrierConfig::from_grid(vec![0.25, 0.5]).unwrap(),
    )
    .unwrap();
    let ts: Vec<f64> = r.curve.iter().map(|p| p.0).collect();
    assert_eq!(ts, vec![0.0, 0.25, 0.5, 1.0]);
    let r = loss_barrier(
        &line,
        &ring,
        &BarrierConfig::from_grid(vec![0.0, 1.0]).unwrap(),
    )
    .unwrap();
    assert_eq!(r.curve.len(), 2);
    assert_eq!((r.frankle, r.interpolated), (0.0, 0.0));
}

/// An error rate (piecewise constant) works like a loss.
#[test]
fn error_rates_work() {
    struct ErrorRate;
    impl Objective<StateDictF64> for ErrorRate {
        fn loss(&self, m: &StateDictF64) -> Result<f64> {
            // Fraction of 10 thresholds that the single weight falls below.
            let w = m.require("w", "model")?[[0]];
            Ok((0..10).filter(|&i| w.abs() < i as f64 / 10.0).count() as f64 / 10.0)
        }
    }
    let line = Linear::new(vector(&[-1.0]), vector(&[1.0])).unwrap();
    let r = loss_barrier(&line, &ErrorRate, &BarrierConfig::default()).unwrap();
    assert_eq!((r.start, r.end), (0.0, 0.0));
    assert_eq!(r.frankle, 0.9);
    // A plateau: the first t of the maximum is reported (|2t - 1| < 0.1 from 11/24 on).
    assert_eq!(r.frankle_t, 11.0 / 24.0);
}

fn model_strategy() -> impl Strategy<Value = StateDictF64> {
    (
        prop::collection::vec(-2.0f64..2.0, 3),
        prop::collection::vec(-2.0f64..2.0, 4),
    )
        .prop_map(|(w, m)| model(&w, [m[0], m[1], m[2], m[3]]))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Between a model and itself the barrier is 0 on every path (up to the rounding of
    /// the weighted sums).
    #[test]
    fn barrier_of_a_model_with_itself_is_zero(a in model_strategy(), n in 2usize..6, refine in 0usize..8) {
        let ring = Ring { c: 0.3, s: 0.5 };
        let controls = vec![a.clone(); n];
        let paths: Vec<Box<dyn PathSampler<StateDictF64>>> = vec![
            Box::new(Linear::new(a.clone(), a.clone()).unwrap()),
            Box::new(Bezier::new(controls.clone()).unwrap()),
            Box::new(PolyChain::new(controls).unwrap()),
        ];
        let cfg = BarrierConfig::default().with_refinement(refine);
        for p in &paths {
            let r = loss_barrier(p.as_ref(), &ring, &cfg).unwrap();
            let scale = 1.0 + r.start.abs();
            prop_assert!(r.frankle.abs() <= 1e-12 * scale, "{}", r.frankle);
            prop_assert!(r.interpolated.abs() <= 1e-12 * scale && r.interpolated >= 0.0);
            prop_assert_eq!(r.start, r.end);
        }
    }

    /// Both definitions from the curve: Frankle is the largest value minus the endpoint
    /// mean, the interpolated barrier the largest excess over the chord, never negative
    /// and never below Frankle's when the endpoints are equal.
    #[test]
    fn definitions_hold_on_the_curve(a in model_strategy(), b in model_strategy(), bend in model_strategy()) {
        let ring = Ring { c: 0.3, s: 0.5 };
        let curve = Bezier::new(vec![a, bend, b]).unwrap();
        let r = loss_barrier(&curve, &ring, &BarrierConfig::uniform(13).unwrap()).unwrap();
        let (l0, l1) = (r.start, r.end);
        let max = r.curve.iter().map(|p| p.1).fold(f64::MIN, f64::max);
        prop_assert_eq!(r.frankle, max - 0.5 * (l0 + l1));
        let sup = r.curve.iter().map(|&(t, v)| v - ((1.0 - t) * l0 + t * l1)).fold(f64::MIN, f64::max);
        prop_assert_eq!(r.interpolated, sup);
        prop_assert!(r.interpolated >= 0.0);
        prop_assert!(r.frankle >= -0.5 * (l0 - l1).abs() - 1e-12);
        prop_assert!(r.curve.iter().any(|p| p.0 == r.frankle_t));
    }
}

// ---- bad input ----

#[test]
fn bad_grids_are_rejected() {
    let e = BarrierConfig::from_grid(vec![]).unwrap_err();
    assert!(matches!(e, Error::Empty { .. }), "{e}");
    for (g, needle) in [
        (vec![0.0, 1.5], "1.5"),
        (vec![-0.1, 0.5], "-0.1"),
        (vec![0.0, f64::NAN], "NaN"),
        (vec![0.5, 0.5], "increasing"),
        (vec![0.7, 0.2], "increasing"),
    ] {
        let e = BarrierConfig::from_grid(g.clone()).unwrap_err().to_string();
        assert!(e.contains("grid") && e.contains(needle), "{g:?}: {e}");
    }
    for n in [0, 1] {
        assert!(BarrierConfig::uniform(n).is_err());
    }
}

#[test]
fn non_finite_objective_values_name_t() {
    struct NanInTheMiddle;
    impl Objective<StateDictF64> for NanInTheMiddle {
        fn loss(&self, m: &StateDictF64) -> Result<f64> {
            let w = m.require("w", "model")?[[0]];
            Ok(if w.abs() < 0.3 {
                f64::NAN
            } else if w > 0.9 {
                f64::INFINITY
            } else {
                1.0
            })
        }
    }
    let line = Linear::new(vector(&[-0.5]), vector(&[0.5])).unwrap();
    let e = loss_barrier(&line, &NanInTheMiddle, &BarrierConfig::uniform(5).unwrap()).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    assert!(
        e.to_string().contains("t = 0.25") && e.to_string().contains("NaN"),
        "{e}"
    );
    let line = Linear::new(vector(&[0.0]), vector(&[1.0])).unwrap();
    let e = loss_barrier(
        &line,
        &NanInTheMiddle,
        &BarrierConfig::from_grid(vec![0.5]).unwrap(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("t = 0") && e.to_string().contains("NaN"),
        "{e}"
    );
    // The objective's own errors pass through.
    struct Failing;
    impl Objective<StateDictF64> for Failing {
        fn loss(&self, _: &StateDictF64) -> Result<f64> {
            Err(Error::Objective("no data".into()))
        }
    }
    assert!(
        loss_barrier(&line, &Failing, &BarrierConfig::default())
            .unwrap_err()
            .to_string()
            .contains("no data")
    );
}
