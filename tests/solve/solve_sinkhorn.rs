//! Properties and bad-input errors of the Sinkhorn solvers.

use modelfusion::Error;
use modelfusion::solve::{
    Sinkhorn, exact_ot_uniform, sinkhorn, sinkhorn_operator, sinkhorn_unbalanced,
};
use ndarray::{Array1, Array2, Axis, array};
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_problem(n: usize, m: usize, seed: u64) -> (Array1<f64>, Array1<f64>, Array2<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut a = Array1::from_shape_fn(n, |_| rng.random::<f64>() + 0.05);
    let mut b = Array1::from_shape_fn(m, |_| rng.random::<f64>() + 0.05);
    a /= a.sum();
    b /= b.sum();
    let c = Array2::from_shape_fn((n, m), |_| rng.random::<f64>());
    (a, b, c)
}

fn marginal_l1(p: &Array2<f64>, a: &Array1<f64>, b: &Array1<f64>) -> f64 {
    (&p.sum_axis(Axis(1)) - a).mapv(f64::abs).sum()
        + (&p.sum_axis(Axis(0)) - b).mapv(f64::abs).sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn marginals_are_met_to_tolerance(n in 1usize..20, m in 1usize..20, seed in any::<u64>(),
                                      reg in prop::sample::select(vec![1.0, 0.2, 0.05])) {
        let (a, b, c) = random_problem(n, m, seed);
        let tol = 1e-8;
        let s = Sinkhorn::builder().with_reg(reg).with_tol(tol).with_max_iter(100_000).build().unwrap();
        let ot = s.solve(a.view(), b.view(), c.view()).unwrap();
        prop_assert!(ot.converged, "{} iterations, error {}", ot.iterations, ot.error);
        let e = marginal_l1(&ot.plan, &a, &b);
        prop_assert!(e <= 2.0 * tol, "marginal error {e}");
        prop_assert!((e - ot.error).abs() < 1e-12);
        // the plan is exp((f + g - M) / reg)
        for i in 0..n {
            for j in 0..m {
                let want = ((ot.f[i] + ot.g[j] - c[[i, j]]) / reg).exp();
                prop_assert!((ot.plan[[i, j]] - want).abs() <= 1e-12 + 1e-9 * want);
            }
        }
        let cost: f64 = (&ot.plan * &c).sum();
        prop_assert!((cost - ot.cost).abs() < 1e-12);
    }

    #[test]
    fn epsilon_scaling_reaches_the_same_plan(seed in any::<u64>()) {
        let (a, b, c) = random_problem(12, 9, seed);
        let base = Sinkhorn::builder().with_reg(0.05).with_tol(1e-11).with_max_iter(100_000);
        let p1 = base.clone().build().unwrap().solve(a.view(), b.view(), c.view()).unwrap();
        let p2 = base.with_epsilon_scaling(true).build().unwrap().solve(a.view(), b.view(), c.view()).unwrap();
        prop_assert!(p1.converged && p2.converged);
        prop_assert!((&p1.plan - &p2.plan).mapv(f64::abs).sum() < 1e-8);
    }
}

#[test]
fn one_by_one_closed_form() {
    let ot = sinkhorn(
        array![2.0f64].view(),
        array![2.0].view(),
        array![[0.7]].view(),
        0.3,
    )
    .unwrap();
    assert!((ot.plan[[0, 0]] - 2.0).abs() < 1e-12);
    assert!((ot.cost - 1.4).abs() < 1e-12);
    // f + g = reg ln 2 + M
    assert!((ot.f[0] + ot.g[0] - (0.3 * 2f64.ln() + 0.7)).abs() < 1e-12);
}

/// For 2x2, P = [[x, a0 - x], [b0 - x, a1 - b0 + x]] with
/// P00 P11 / (P01 P10) = exp(-(M00 + M11 - M01 - M10) / reg): a quadratic in x.
#[test]
fn two_by_two_closed_form() {
    let (a, b) = (array![0.3f64, 0.7], array![0.6f64, 0.4]);
    let m = array![[0.1f64, 0.9], [0.4, 0.2]];
    for reg in [1.0, 0.3, 0.1] {
        let kappa = (-(m[[0, 0]] + m[[1, 1]] - m[[0, 1]] - m[[1, 0]]) / reg).exp();
        // x (a1 - b0 + x) = kappa (a0 - x)(b0 - x)
        let (a0, a1, b0) = (a[0], a[1], b[0]);
        let qa = 1.0 - kappa;
        let qb = (a1 - b0) + kappa * (a0 + b0);
        let qc = -kappa * a0 * b0;
        let x = (-qb + (qb * qb - 4.0 * qa * qc).sqrt()) / (2.0 * qa);
        let want = array![[x, a0 - x], [b0 - x, a1 - b0 + x]];
        let s = Sinkhorn::builder()
            .with_reg(reg)
            .with_tol(1e-13)
            .build()
            .unwrap();
        let ot = s.solve(a.view(), b.view(), m.view()).unwrap();
        assert!(ot.converged);
        assert!(
            (&ot.plan - &want).mapv(f64::abs).sum() < 1e-11,
            "reg {reg}: {:?} vs {want:?}",
            ot.plan
        );
    }
}

#[test]
fn converges_to_exact_ot_as_reg_shrinks() {
    // Sinkhorn itself slows down sharply as reg -> 0 (POT's sinkhorn_log does not reach
    // 1e-9 within 200k iterations on this kind of 8x8 problem at reg = 0.01), so the
    // small-reg runs use a looser tolerance; the entropic gap is at most 2 reg ln n.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let n = 8;
    let c = Array2::from_shape_fn((n, n), |_| rng.random::<f64>());
    let exact = exact_ot_uniform(c.view()).unwrap().cost;
    let u = Array1::from_elem(n, 1.0 / n as f64);
    let mut gaps = Vec::new();
    for reg in [0.1, 0.03, 0.01, 0.003, 0.001] {
        let s = Sinkhorn::builder()
            .with_reg(reg)
            .with_tol(1e-7)
            .with_max_iter(100_000)
            .build()
            .unwrap();
        let ot = s.solve(u.view(), u.view(), c.view()).unwrap();
        assert!(ot.error < 1e-5, "reg {reg}: error {}", ot.error);
        let gap = ot.cost - exact;
        assert!(gap > -1e-5, "entropic cost below the exact optimum: {gap}");
        assert!(
            gap <= 2.0 * reg * (n as f64).ln() + 1e-5,
            "reg {reg}: gap {gap}"
        );
        gaps.push(gap);
    }
    assert!(gaps.windows(2).all(|w| w[1] <= w[0] + 1e-5), "{gaps:?}");
    assert!(gaps[4] < 1e-3, "{gaps:?}");
}

#[test]
fn stable_at_tiny_reg_on_a_larger_problem() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let n = 60;
    let c = Array2::from_shape_fn((n, n), |_| rng.random::<f64>());
    let u = Array1::from_elem(n, 1.0 / n as f64);
    // K = exp(-M / reg) underflows almost entirely in f64 at this reg
    let s = Sinkhorn::builder()
        .with_reg(1e-3)
        .with_tol(1e-4)
        .with_max_iter(20_000)
        .build()
        .unwrap();
    let ot = s.solve(u.view(), u.view(), c.view()).unwrap();
    assert!(ot.plan.iter().all(|x| x.is_finite() && *x >= 0.0));
    assert!(ot.f.iter().chain(ot.g.iter()).all(|x| x.is_finite()));
    assert!(ot.converged, "error {}", ot.error);
    let exact = exact_ot_uniform(c.view()).unwrap().cost;
    assert!(
        (ot.cost - exact).abs() < 2e-3 * (n as f64).ln(),
        "{} vs {exact}",
        ot.cost
    );
}

#[test]
fn iteration_cap_is_reported_not_an_error() {
    let (a, b, c) = random_problem(10, 10, 5);
    let s = Sinkhorn::builder()
        .with_reg(0.01)
        .with_tol(1e-14)
        .with_max_iter(3)
        .build()
        .unwrap();
    let ot = s.solve(a.view(), b.view(), c.view()).unwrap();
    assert!(!ot.converged);
    assert_eq!(ot.iterations, 3);
    assert!(ot.error > 1e-14);
}

#[test]
fn warm_start_from_the_solution_converges_at_once() {
    let (a, b, c) = random_problem(15, 11, 9);
    let s = Sinkhorn::builder()
        .with_reg(0.1)
        .with_tol(1e-9)
        .build()
        .unwrap();
    let cold = s.solve(a.view(), b.view(), c.view()).unwrap();
    assert!(cold.iterations > 3);
    let warm = s
        .solve_warm(a.view(), b.view(), c.view(), cold.f.view(), cold.g.view())
        .unwrap();
    assert!(warm.converged);
    assert!(warm.iterations <= 1, "{}", warm.iterations);
    assert!((&warm.plan - &cold.plan).mapv(f64::abs).sum() < 1e-8);
}

#[test]
fn zero_mass_points_get_no_mass() {
    let a = array![0.5, 0.0, 0.5];
    let b = array![0.25, 0.75];
    let c = array![[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]];
    let ot = sinkhorn(a.view(), b.view(), c.view(), 0.1).unwrap();
    assert!(ot.converged);
    assert_eq!(ot.plan.row(1).sum(), 0.0);
    assert_eq!(ot.f[1], f64::NEG_INFINITY);
}

#[test]
fn f32_inputs_give_f32_outputs() {
    let (a, b, c) = random_problem(6, 7, 1);
    let (a, b, c) = (
        a.mapv(|x| x as f32),
        b.mapv(|x| x as f32),
        c.mapv(|x| x as f32),
    );
    let ot = sinkhorn(a.view(), b.view(), c.view(), 0.1).unwrap();
    let p64 = ot.plan.mapv(f64::from);
    assert!(marginal_l1(&p64, &a.mapv(f64::from), &b.mapv(f64::from)) < 1e-6);
}

#[test]
fn unbalanced_matches_its_fixed_point() {
    // at the solution u = (a / K v)^phi, v = (b / K^T u)^phi with K = exp(-M / reg)
    let (mut a, b, c) = random_problem(9, 6, 4);
    a *= 3.0;
    let (reg, reg_m) = (0.1, 0.5);
    let ot = sinkhorn_unbalanced(a.view(), b.view(), c.view(), reg, reg_m).unwrap();
    assert!(ot.converged);
    let phi = reg_m / (reg_m + reg);
    // row sums r_i = u_i (K v)_i; fixed point: ln u = phi (ln a - ln Kv) => r = a^phi u^(1-1/phi) ...
    // equivalently f_i = phi * (reg ln a_i - reg ln sum_j exp((g_j - M_ij)/reg))
    for i in 0..9 {
        let lse: f64 = (0..6)
            .map(|j| ((ot.g[j] - c[[i, j]]) / reg).exp())
            .sum::<f64>()
            .ln();
        let want = phi * reg * (a[i].ln() - lse);
        assert!((ot.f[i] - want).abs() < 1e-6, "{} vs {want}", ot.f[i]);
    }
    // less mass than the larger side, more than none
    let mass = ot.plan.sum();
    assert!(mass > b.sum() && mass < a.sum(), "{mass}");
}

#[test]
fn operator_is_doubly_stochastic_and_sharpens() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let n = 10;
    let s = Array2::from_shape_fn((n, n), |_| rng.random::<f64>());
    let p = sinkhorn_operator(s.view(), 0.1, 200).unwrap();
    for c in p.sum_axis(Axis(0)) {
        assert!((c - 1.0).abs() < 1e-12);
    }
    for r in p.sum_axis(Axis(1)) {
        assert!((r - 1.0).abs() < 1e-6);
    }
    // as tau -> 0 it approaches the maximising permutation
    let perm = modelfusion::solve::linear_sum_assignment(s.view(), true)
        .unwrap()
        .cols;
    let sharp = sinkhorn_operator(s.view(), 0.002, 2000).unwrap();
    for (i, &j) in perm.iter().enumerate() {
        assert!(sharp[[i, j]] > 0.9, "row {i}: {}", sharp[[i, j]]);
    }
    // rectangular: rows sum to 1, columns to rows / cols
    let r = sinkhorn_operator(s.slice(ndarray::s![..4, ..]), 1.0, 50).unwrap();
    for c in r.sum_axis(Axis(0)) {
        assert!((c - 0.4).abs() < 1e-12);
    }
    // f32
    let p32 = sinkhorn_operator(s.mapv(|x| x as f32).view(), 0.1, 200).unwrap();
    assert!((p32.mapv(f64::from) - &p).mapv(f64::abs).sum() < 1e-4);
}

#[test]
fn thread_count_does_not_change_results() {
    let (a, b, c) = random_problem(300, 280, 17);
    let s = Sinkhorn::builder()
        .with_reg(0.02)
        .with_tol(1e-9)
        .build()
        .unwrap();
    let run = |t: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
            .install(|| s.solve(a.view(), b.view(), c.view()).unwrap())
    };
    let (p1, p2) = (run(1), run(2));
    assert_eq!(p1.iterations, p2.iterations);
    assert_eq!(p1.plan, p2.plan);
    assert_eq!(p1.f, p2.f);
    let o1 = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| sinkhorn_operator(c.view(), 0.05, 10).unwrap());
    let o2 = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
        .install(|| sinkhorn_operator(c.view(), 0.05, 10).unwrap());
    assert_eq!(o1, o2);
}

// ---- bad input ----

#[test]
fn bad_parameters_are_rejected_by_the_builder() {
    for reg in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = Sinkhorn::builder().with_reg(reg).build().unwrap_err();
        assert!(e.to_string().contains("`reg`"), "{e}");
    }
    for tol in [0.0, -1e-9, f64::NAN] {
        let e = Sinkhorn::builder().with_tol(tol).build().unwrap_err();
        assert!(e.to_string().contains("`tol`"), "{e}");
    }
    let e = Sinkhorn::builder().with_max_iter(0).build().unwrap_err();
    assert!(e.to_string().contains("`max_iter`"), "{e}");
    for rm in [0.0, -2.0, f64::NAN] {
        let e = Sinkhorn::builder().with_reg_m(rm).build().unwrap_err();
        assert!(e.to_string().contains("`reg_m`"), "{e}");
    }
    let e = sinkhorn(
        array![1.0].view(),
        array![1.0].view(),
        array![[1.0]].view(),
        0.0,
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidParameter { .. }));
    let s = array![[1.0]];
    assert!(matches!(
        sinkhorn_operator(s.view(), 0.0, 5),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        sinkhorn_operator(s.view(), 1.0, 0),
        Err(Error::InvalidParameter { .. })
    ));
}

#[test]
fn bad_inputs_are_rejected() {
    let s = Sinkhorn::builder().build().unwrap();
    let (a, b, c) = random_problem(3, 4, 0);
    // mismatched marginal lengths
    let e = s.solve(b.view(), b.view(), c.view()).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { .. }) && e.to_string().contains("`a`"),
        "{e}"
    );
    let e = s.solve(a.view(), a.view(), c.view()).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { .. }) && e.to_string().contains("`b`"),
        "{e}"
    );
    // empty
    let e = s
        .solve(
            Array1::<f64>::zeros(0).view(),
            b.view(),
            Array2::zeros((0, 4)).view(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::Empty { .. }), "{e}");
    // NaN / inf in the cost
    let mut cn = c.clone();
    cn[[1, 2]] = f64::NAN;
    let e = s.solve(a.view(), b.view(), cn.view()).unwrap_err();
    assert!(
        matches!(e, Error::NonFinite { .. }) && e.to_string().contains("[1, 2]"),
        "{e}"
    );
    cn[[1, 2]] = f64::INFINITY;
    assert!(matches!(
        s.solve(a.view(), b.view(), cn.view()),
        Err(Error::NonFinite { .. })
    ));
    // NaN / inf / negative in the marginals
    let mut an = a.clone();
    an[0] = f64::NAN;
    assert!(matches!(
        s.solve(an.view(), b.view(), c.view()),
        Err(Error::NonFinite { .. })
    ));
    an[0] = f64::INFINITY;
    assert!(matches!(
        s.solve(an.view(), b.view(), c.view()),
        Err(Error::NonFinite { .. })
    ));
    let mut bn = b.clone();
    bn[1] = -0.1;
    let e = s.solve(a.view(), bn.view(), c.view()).unwrap_err();
    assert!(
        matches!(e, Error::InvalidParameter { .. }) && e.to_string().contains(">= 0"),
        "{e}"
    );
    // zero total mass
    let z = Array1::<f64>::zeros(3);
    assert!(matches!(
        s.solve(z.view(), b.view(), c.view()),
        Err(Error::InvalidParameter { .. })
    ));
    // unequal masses in the balanced problem (but fine unbalanced)
    let a2 = &a * 2.0;
    let e = s.solve(a2.view(), b.view(), c.view()).unwrap_err();
    assert!(e.to_string().contains("sum(a)"), "{e}");
    assert!(sinkhorn_unbalanced(a2.view(), b.view(), c.view(), 0.1, 1.0).is_ok());
    // a tiny relative mismatch (rounding) is accepted
    let a3 = &a * (1.0 + 1e-9);
    assert!(s.solve(a3.view(), b.view(), c.view()).is_ok());
    // bad warm-start potentials
    let f = Array1::<f64>::zeros(2);
    let g = Array1::<f64>::zeros(4);
    assert!(matches!(
        s.solve_warm(a.view(), b.view(), c.view(), f.view(), g.view()),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut f = Array1::<f64>::zeros(3);
    f[0] = f64::NAN;
    assert!(matches!(
        s.solve_warm(a.view(), b.view(), c.view(), f.view(), g.view()),
        Err(Error::NonFinite { .. })
    ));
    // operator: empty and NaN
    assert!(matches!(
        sinkhorn_operator(Array2::<f64>::zeros((0, 2)).view(), 1.0, 3),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        sinkhorn_operator(cn.view(), 1.0, 3),
        Err(Error::NonFinite { .. })
    ));
}
