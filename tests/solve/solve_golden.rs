//! modelfusion::solve against committed scipy / POT answers
//! (tests/golden/solve/gen.py writes tests/golden/solve/golden.json).

use modelfusion::solve::{Sinkhorn, exact_ot_uniform, linear_sum_assignment};
use ndarray::{Array1, Array2};
use serde_json::Value;

fn golden() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/solve/golden.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A matrix; `null` stands for +inf (JSON has no infinity).
fn matrix(v: &Value) -> Array2<f64> {
    let rows: Vec<Vec<f64>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap_or(f64::INFINITY))
                .collect()
        })
        .collect();
    let (n, m) = (rows.len(), rows[0].len());
    Array2::from_shape_vec((n, m), rows.concat()).unwrap()
}

fn vector(v: &Value) -> Array1<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn indices(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn lap_matches_scipy() {
    let g = golden();
    let cases = g["lap"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let c = matrix(&case["cost"]);
        let maximize = case["maximize"].as_bool().unwrap();
        let total = case["total"].as_f64().unwrap();
        let a = linear_sum_assignment(c.view(), maximize).unwrap();
        assert!(
            (a.cost - total).abs() <= 1e-12 * (1.0 + total.abs()),
            "{name}: {} vs {total}",
            a.cost
        );
        if case["unique"].as_bool().unwrap() {
            assert_eq!(a.rows, indices(&case["rows"]), "{name}");
            assert_eq!(a.cols, indices(&case["cols"]), "{name}");
        }
        let c32 = c.mapv(|x| x as f32);
        let a32 = linear_sum_assignment(c32.view(), maximize).unwrap();
        let t32: f64 = a32
            .rows
            .iter()
            .zip(&a32.cols)
            .map(|(&i, &j)| c[[i, j]])
            .sum();
        assert!(
            (t32 - total).abs() <= 1e-5 * (1.0 + total.abs()),
            "{name} f32: {t32} vs {total}"
        );
    }
}

#[test]
fn sinkhorn_matches_pot() {
    let g = golden();
    for case in g["sinkhorn"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (a, b, c) = (
            vector(&case["a"]),
            vector(&case["b"]),
            matrix(&case["cost"]),
        );
        let want = matrix(&case["plan"]);
        let mut s = Sinkhorn::builder()
            .with_reg(case["reg"].as_f64().unwrap())
            .with_tol(1e-13)
            .with_max_iter(200_000);
        if let Some(rm) = case["reg_m"].as_f64() {
            s = s.with_reg_m(rm).with_tol(1e-14);
        }
        let ot = s
            .build()
            .unwrap()
            .solve(a.view(), b.view(), c.view())
            .unwrap();
        assert!(ot.converged, "{name}: error {}", ot.error);
        let diff = (&ot.plan - &want).mapv(f64::abs).sum();
        assert!(diff < 1e-9, "{name}: plan L1 difference {diff}");
        let tc = case["transport_cost"].as_f64().unwrap();
        assert!((ot.cost - tc).abs() < 1e-9, "{name}: {} vs {tc}", ot.cost);
    }
}

#[test]
fn exact_ot_matches_pot_emd() {
    let g = golden();
    for case in g["exact_ot"].as_array().unwrap() {
        let c = matrix(&case["cost"]);
        let emd = case["emd"].as_f64().unwrap();
        let ot = exact_ot_uniform(c.view()).unwrap();
        assert!(
            (ot.cost - emd).abs() < 1e-12 * (1.0 + emd),
            "{} vs {emd}",
            ot.cost
        );
    }
}
