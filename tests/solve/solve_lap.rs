//! Properties and bad-input errors of `solve::linear_sum_assignment`.

use modelfusion::Error;
use modelfusion::solve::{exact_ot_uniform, linear_sum_assignment};
use ndarray::{Array2, array};
use proptest::prelude::*;

/// Brute-force optimum over all injective maps of the smaller side (n <= 8).
fn brute_force(c: &Array2<f64>) -> f64 {
    let (n, m) = c.dim();
    let t = if n <= m { c.clone() } else { c.t().to_owned() };
    let (k, w) = t.dim();
    let mut best = f64::INFINITY;
    let mut used = vec![false; w];
    fn rec(t: &Array2<f64>, i: usize, acc: f64, used: &mut [bool], best: &mut f64) {
        if i == t.nrows() {
            *best = best.min(acc);
            return;
        }
        for j in 0..t.ncols() {
            if !used[j] {
                used[j] = true;
                rec(t, i + 1, acc + t[[i, j]], used, best);
                used[j] = false;
            }
        }
    }
    let _ = k;
    rec(&t, 0, 0.0, &mut used, &mut best);
    best
}

/// Checks the scipy contract: rows sorted and distinct, columns distinct, min(n, m)
/// pairs, and the reported total equals the sum of the chosen entries.
fn check_structure<F: modelfusion::Scalar>(c: &Array2<F>, a: &modelfusion::Assignment<F>) -> f64 {
    let (n, m) = c.dim();
    assert_eq!(a.len(), n.min(m));
    assert!(
        a.rows.windows(2).all(|w| w[0] < w[1]),
        "rows sorted {:?}",
        a.rows
    );
    let mut cols = a.cols.clone();
    cols.sort_unstable();
    cols.dedup();
    assert_eq!(cols.len(), a.len(), "columns distinct");
    assert!(a.rows.iter().all(|&r| r < n) && a.cols.iter().all(|&j| j < m));
    let total: f64 = a
        .rows
        .iter()
        .zip(&a.cols)
        .map(|(&i, &j)| c[[i, j]].to_f64_lossless())
        .sum();
    assert!((total - a.cost.to_f64_lossless()).abs() <= 1e-6 * (1.0 + total.abs()));
    total
}

fn matrix(max_n: usize, int: bool) -> impl Strategy<Value = Array2<f64>> {
    (1..=max_n, 1..=max_n).prop_flat_map(move |(n, m)| {
        let elem = if int {
            (0i32..5).prop_map(f64::from).boxed()
        } else {
            (-10.0f64..10.0).boxed()
        };
        proptest::collection::vec(elem, n * m)
            .prop_map(move |v| Array2::from_shape_vec((n, m), v).unwrap())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn matches_brute_force_f64(c in matrix(7, false)) {
        let a = linear_sum_assignment(c.view(), false).unwrap();
        let total = check_structure(&c, &a);
        prop_assert!((total - brute_force(&c)).abs() < 1e-9);
    }

    #[test]
    fn matches_brute_force_integer_ties_exactly(c in matrix(8, true)) {
        let a = linear_sum_assignment(c.view(), false).unwrap();
        prop_assert_eq!(check_structure(&c, &a), brute_force(&c));
        let c32 = c.mapv(|x| x as f32);
        let a32 = linear_sum_assignment(c32.view(), false).unwrap();
        prop_assert_eq!(check_structure(&c32, &a32), brute_force(&c));
    }

    #[test]
    fn matches_brute_force_f32(c in matrix(7, false)) {
        let c32 = c.mapv(|x| x as f32);
        let exact = brute_force(&c32.mapv(f64::from));
        let a = linear_sum_assignment(c32.view(), false).unwrap();
        let total = check_structure(&c32, &a);
        prop_assert!((total - exact).abs() < 1e-4, "{} vs {}", total, exact);
    }

    #[test]
    fn maximize_is_minimising_the_negation(c in matrix(8, false)) {
        let max = linear_sum_assignment(c.view(), true).unwrap();
        let neg = c.mapv(|x| -x);
        let min = linear_sum_assignment(neg.view(), false).unwrap();
        check_structure(&c, &max);
        prop_assert!((max.cost + min.cost).abs() < 1e-9);
        prop_assert!((max.cost + brute_force(&neg)).abs() < 1e-9);
    }

    #[test]
    fn permuting_rows_and_columns_keeps_the_optimum(
        c in matrix(8, false),
        seed in any::<u64>(),
    ) {
        use rand::{SeedableRng, seq::SliceRandom};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (n, m) = c.dim();
        let mut pr: Vec<usize> = (0..n).collect();
        let mut pc: Vec<usize> = (0..m).collect();
        pr.shuffle(&mut rng);
        pc.shuffle(&mut rng);
        let p = Array2::from_shape_fn((n, m), |(i, j)| c[[pr[i], pc[j]]]);
        let a = linear_sum_assignment(c.view(), false).unwrap();
        let b = linear_sum_assignment(p.view(), false).unwrap();
        prop_assert!((a.cost - b.cost).abs() < 1e-9);
        // the permuted problem's answer, mapped back, is optimal for the original
        let mapped: f64 = b.rows.iter().zip(&b.cols).map(|(&i, &j)| c[[pr[i], pc[j]]]).sum();
        prop_assert!((mapped - a.cost).abs() < 1e-9);
    }

    #[test]
    fn transposing_keeps_the_optimum(c in matrix(8, false)) {
        let a = linear_sum_assignment(c.view(), false).unwrap();
        let t = c.t().to_owned();
        let b = linear_sum_assignment(t.view(), false).unwrap();
        prop_assert!((a.cost - b.cost).abs() < 1e-9);
    }

    #[test]
    fn forbidden_entries_are_avoided(c in matrix(6, false), mask in proptest::collection::vec(any::<bool>(), 36)) {
        let (n, m) = c.dim();
        let mut f = c.clone();
        for (k, x) in f.iter_mut().enumerate() {
            if mask[k % 36] { *x = f64::INFINITY; }
        }
        let best = brute_force(&f);
        match linear_sum_assignment(f.view(), false) {
            Ok(a) => {
                prop_assert!(best.is_finite());
                let total = check_structure(&f, &a);
                prop_assert!((total - best).abs() < 1e-9);
            }
            Err(Error::Infeasible { .. }) => prop_assert!(best.is_infinite(), "{n}x{m}"),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}

#[test]
fn random_larger_instances_agree_with_transpose_and_f32_integers() {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for &(n, m) in &[(100, 100), (64, 200), (200, 64), (257, 257)] {
        let c = Array2::from_shape_fn((n, m), |_| (rng.random::<f64>() * 100.0).floor());
        let a = linear_sum_assignment(c.view(), false).unwrap();
        check_structure(&c, &a);
        let t = c.t().to_owned();
        assert_eq!(a.cost, linear_sum_assignment(t.view(), false).unwrap().cost);
        let c32 = c.mapv(|x| x as f32);
        assert_eq!(
            a.cost as f32,
            linear_sum_assignment(c32.view(), false).unwrap().cost
        );
        // a non-contiguous view gives the same answer
        let big = Array2::from_shape_fn((n, 2 * m), |(i, j)| c[[i, j / 2]]);
        let strided = big.slice(ndarray::s![.., ..;2]);
        assert_eq!(a.cost, linear_sum_assignment(strided, false).unwrap().cost);
    }
}

#[test]
fn permutation_helper() {
    let c = array![[1.0, 0.0, 5.0], [0.0, 1.0, 5.0], [5.0, 5.0, 0.0]];
    let a = linear_sum_assignment(c.view(), false).unwrap();
    assert_eq!(a.permutation().unwrap(), vec![1, 0, 2]);
    let tall = array![[1.0], [0.0]];
    let a = linear_sum_assignment(tall.view(), false).unwrap();
    assert_eq!((a.rows.clone(), a.cols.clone()), (vec![1], vec![0]));
    assert!(a.permutation().is_err());
}

#[test]
fn exact_ot_is_the_assignment_over_n() {
    let c = array![[4.0f64, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]];
    let ot = exact_ot_uniform(c.view()).unwrap();
    assert_eq!(ot.perm, vec![1, 0, 2]);
    assert!((ot.cost - 5.0 / 3.0).abs() < 1e-15);
    let p = ot.plan();
    assert!((p.sum() - 1.0).abs() < 1e-15);
    assert!(matches!(
        exact_ot_uniform(array![[1.0, 2.0]].view()),
        Err(Error::ShapeMismatch { .. })
    ));
}

// ---- bad input ----

#[test]
fn empty_matrices_are_rejected() {
    for shape in [(0, 0), (0, 3), (3, 0)] {
        let c = Array2::<f64>::zeros(shape);
        let e = linear_sum_assignment(c.view(), false).unwrap_err();
        assert!(matches!(e, Error::Empty { .. }), "{e}");
    }
}

#[test]
fn nan_is_rejected_with_its_position() {
    let c = array![[1.0, 2.0], [f64::NAN, 0.0]];
    let e = linear_sum_assignment(c.view(), false).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }));
    assert!(e.to_string().contains("[1, 0]"), "{e}");
    let e = linear_sum_assignment(c.mapv(|x| x as f32).view(), true).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }));
}

#[test]
fn wrong_signed_infinity_is_rejected() {
    let c = array![[1.0, f64::NEG_INFINITY], [0.0, 0.0]];
    let e = linear_sum_assignment(c.view(), false).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    assert!(e.to_string().contains("[0, 1]"));
    let c = array![[1.0, f64::INFINITY], [0.0, 0.0]];
    let e = linear_sum_assignment(c.view(), true).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    // but -inf is the forbidden marker when maximising
    let c = array![[1.0, f64::NEG_INFINITY], [0.0, 0.0]];
    assert_eq!(
        linear_sum_assignment(c.view(), true).unwrap().cols,
        vec![0, 1]
    );
}

#[test]
fn infeasible_patterns_are_reported() {
    let inf = f64::INFINITY;
    let cases = [
        array![[inf, inf], [1.0, 2.0]], // a row of inf
        array![[inf, 1.0], [inf, 2.0]], // a column of inf
        array![[1.0, inf, inf], [2.0, inf, inf], [3.0, 4.0, 5.0]], // Hall's condition
    ];
    for c in cases {
        let e = linear_sum_assignment(c.view(), false).unwrap_err();
        assert!(matches!(e, Error::Infeasible { .. }), "{e}");
        let e = linear_sum_assignment(c.mapv(|x| -x).view(), true).unwrap_err();
        assert!(matches!(e, Error::Infeasible { .. }), "{e}");
        let e = linear_sum_assignment(c.mapv(|x| x as f32).view(), false).unwrap_err();
        assert!(matches!(e, Error::Infeasible { .. }), "{e}");
    }
    // rectangular: a column of inf is fine when there are spare columns
    let c = array![[inf, 1.0, 2.0], [inf, 3.0, 1.0]];
    assert_eq!(linear_sum_assignment(c.view(), false).unwrap().cost, 2.0);
    // but two rows that can only use the same column are not
    let c = array![[inf, 1.0, inf], [inf, 3.0, inf]];
    assert!(matches!(
        linear_sum_assignment(c.view(), false),
        Err(Error::Infeasible { .. })
    ));
    // all-inf matrix
    let c = Array2::from_elem((3, 3), inf);
    assert!(linear_sum_assignment(c.view(), false).is_err());
}

#[test]
fn huge_but_finite_costs_work() {
    let c = array![[1e300, -1e300], [-1e300, 1e300]];
    assert_eq!(
        linear_sum_assignment(c.view(), false).unwrap().cols,
        vec![1, 0]
    );
    let c = array![[f32::MAX, 0.0], [0.0, f32::MAX]];
    assert_eq!(
        linear_sum_assignment(c.view(), false).unwrap().cols,
        vec![1, 0]
    );
}

#[test]
fn batches_match_single_solves_for_any_thread_count() {
    use modelfusion::solve::linear_sum_assignment_batch;
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    // heads of different shapes, f32 similarities maximised as in weight matching
    let shapes = [
        (64, 64),
        (128, 128),
        (5, 9),
        (9, 5),
        (1, 1),
        (200, 200),
        (64, 64),
    ];
    let costs: Vec<Array2<f32>> = shapes
        .iter()
        .map(|&(n, m)| Array2::from_shape_fn((n, m), |_| rng.random::<f32>() - 0.5))
        .collect();
    let views: Vec<_> = costs.iter().map(|c| c.view()).collect();
    let single: Vec<_> = views
        .iter()
        .map(|c| linear_sum_assignment(c.view(), true).unwrap())
        .collect();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let batch = pool
            .install(|| linear_sum_assignment_batch(&views, true))
            .unwrap();
        assert_eq!(batch, single, "{threads} threads");
    }
    assert!(
        linear_sum_assignment_batch::<f64>(&[], false)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn batch_errors_name_the_first_failing_problem() {
    use modelfusion::solve::linear_sum_assignment_batch;
    let ok = array![[1.0, 2.0], [3.0, 4.0]];
    let nan = array![[1.0, f64::NAN], [3.0, 4.0]];
    let infeasible = array![[f64::INFINITY, 1.0], [f64::INFINITY, 2.0]];
    let empty = Array2::<f64>::zeros((0, 3));
    let views = [ok.view(), infeasible.view(), nan.view(), empty.view()];
    let e = linear_sum_assignment_batch(&views, false).unwrap_err();
    assert!(matches!(e, Error::Infeasible { .. }), "{e}");
    assert!(e.to_string().contains("problem 1 of the batch"), "{e}");
    let e = linear_sum_assignment_batch(&views[2..], false).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    assert!(e.to_string().contains("problem 0 of the batch"), "{e}");
    let e = linear_sum_assignment_batch(&views[3..], false).unwrap_err();
    assert!(matches!(e, Error::Empty { .. }), "{e}");
}
