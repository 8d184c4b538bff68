//! The adversarially-robust soup (`merge::RobustSoup`): a formula golden on quadratic
//! objectives, properties of the trade-off curve, and errors.

use modelfusion::merge::RobustSoup;
use modelfusion::{Model, StateDict, StateDictF64};
use ndarray::arr1;
use proptest::prelude::*;

fn vector(v: &[f64]) -> StateDictF64 {
    StateDict::from_pairs([("w", arr1(v).into_dyn())]).unwrap()
}

fn dist2(m: &StateDictF64, to: &StateDictF64) -> f64 {
    m.sub(to).unwrap().norm().powi(2)
}

/// clean(theta) = |theta - a|^2 and robust(theta) = |theta - b|^2 on the soup
/// theta(w) = (1 - w) a + w b give clean = w^2 D, robust = (1 - w)^2 D, D = |a - b|^2;
/// the score (1 - tau) w^2 D + tau (1 - w)^2 D is smallest at w = tau.
#[test]
fn quadratic_objectives_follow_the_formula() {
    let (a, b) = (vector(&[1.0, -2.0, 0.5]), vector(&[3.0, 0.0, -1.0]));
    let d = dist2(&a, &b);
    for tau in [0.0, 0.2, 0.5, 0.7, 1.0] {
        let clean = |m: &StateDictF64| Ok(dist2(m, &a));
        let robust = |m: &StateDictF64| Ok(dist2(m, &b));
        let report = RobustSoup::new(clean, robust)
            .with_grid((0..=20).map(|i| f64::from(i) / 20.0).collect())
            .unwrap()
            .with_trade_off(tau)
            .unwrap()
            .cook(&a, &b)
            .unwrap();
        for p in &report.points {
            let w = p.weight;
            assert!((p.clean - w * w * d).abs() < 1e-12, "{p:?}");
            assert!((p.robust - (1.0 - w).powi(2) * d).abs() < 1e-12, "{p:?}");
            let score = (1.0 - tau) * w * w * d + tau * (1.0 - w).powi(2) * d;
            assert!((p.score - score).abs() < 1e-12, "{p:?}");
        }
        assert!(
            (report.weight - tau).abs() < 1e-12,
            "tau {tau}: weight {}",
            report.weight
        );
        let want = a.lerp(&b, tau).unwrap();
        assert!(dist2(&report.soup, &want) < 1e-20);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The ingredients come back bit for bit at weights 0 and 1; the chosen soup has the
    /// smallest score on the grid and is the soup at the chosen weight; trade-off 0
    /// (1) picks a soup with the best clean (robust) objective.
    #[test]
    fn the_chosen_soup_minimises_the_score(
        a in prop::collection::vec(-3.0f64..3.0, 3),
        b in prop::collection::vec(-3.0f64..3.0, 3),
        c in prop::collection::vec(-3.0f64..3.0, 3),
        tau in 0.0f64..=1.0,
        n in 2usize..12,
    ) {
        let (a, b, c) = (vector(&a), vector(&b), vector(&c));
        // Non-convex objectives of the soup: distances to a third point and a bumpy term.
        let clean = |m: &StateDictF64| Ok(dist2(m, &c).sqrt() + (3.0 * m.norm()).sin());
        let robust = |m: &StateDictF64| Ok(dist2(m, &b).sqrt().min(1.0 + dist2(m, &a)));
        let grid: Vec<f64> = (0..n).map(|i| i as f64 / (n - 1) as f64).collect();
        let soup = RobustSoup::new(clean, robust).with_grid(grid).unwrap();
        let report = soup.clone().with_trade_off(tau).unwrap().cook(&a, &b).unwrap();
        prop_assert_eq!(report.points.len(), n);
        prop_assert_eq!(report.points[0].clean, clean(&a).unwrap());
        prop_assert_eq!(report.points[n - 1].robust, robust(&b).unwrap());
        let best = report.points.iter().map(|p| p.score).fold(f64::INFINITY, f64::min);
        let chosen = report.points.iter().find(|p| p.weight == report.weight).unwrap();
        prop_assert_eq!(chosen.score, best);
        prop_assert_eq!(
            report.soup,
            modelfusion::path::PathSampler::point(
                &modelfusion::path::Linear::new(a.clone(), b.clone()).unwrap(),
                report.weight
            ).unwrap()
        );
        for (extreme, pick) in [(0.0, 0usize), (1.0, 1)] {
            let r = soup.clone().with_trade_off(extreme).unwrap().cook(&a, &b).unwrap();
            let value = |p: &modelfusion::merge::RobustSoupPoint| if pick == 0 { p.clean } else { p.robust };
            let min = r.points.iter().map(value).fold(f64::INFINITY, f64::min);
            let chosen = r.points.iter().find(|p| p.weight == r.weight).unwrap();
            prop_assert_eq!(value(chosen), min);
        }
    }
}

#[test]
fn robust_soup_refuses_bad_input() {
    let zero = |_: &StateDictF64| Ok(0.0);
    let msg = |r: modelfusion::Result<RobustSoup<_, _>>| r.err().map(|e| e.to_string()).unwrap();
    assert!(msg(RobustSoup::new(zero, zero).with_grid(vec![])).contains("grid"));
    assert!(msg(RobustSoup::new(zero, zero).with_grid(vec![0.2, 1.5])).contains("grid"));
    assert!(msg(RobustSoup::new(zero, zero).with_grid(vec![0.6, 0.3])).contains("increasing"));
    assert!(msg(RobustSoup::new(zero, zero).with_trade_off(-0.1)).contains("trade_off"));
    assert!(msg(RobustSoup::new(zero, zero).with_trade_off(f64::NAN)).contains("trade_off"));
    let a = vector(&[1.0, 2.0]);
    assert!(
        RobustSoup::new(zero, zero)
            .cook(&a, &vector(&[1.0]))
            .is_err()
    );
    let nan = |_: &StateDictF64| Ok(f64::NAN);
    let e = RobustSoup::new(zero, nan)
        .cook(&a, &a)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("robust objective") && e.contains("weight 0"),
        "{e}"
    );
    let failing = |_: &StateDictF64| Err(modelfusion::Error::invalid("objective", "boom"));
    assert!(RobustSoup::new(failing, zero).cook(&a, &a).is_err());
}
