//! Properties of every merger in `modelfusion::merge`.

use approx::assert_abs_diff_eq;
use modelfusion::merge::{
    Average, Consensus, Ema, Ensemble, EnsembleMode, Fisher, GreedySoup, KarcherMean, Lawa, Merger,
    ModelStock, Slerp, Swa, Swag, TaskMerge,
};
use modelfusion::{Model, Objective, Result, StateDict, StateDictF32, StateDictF64};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

const NAMES: [&str; 3] = ["fc.weight", "fc.bias", "head.weight"];
const SHAPES: [&[usize]; 3] = [&[3, 4], &[3], &[2, 3]];
const SIZE: usize = 12 + 3 + 6;

fn build(values: &[f64]) -> StateDictF64 {
    let mut off = 0;
    StateDict::from_pairs(NAMES.iter().zip(SHAPES).map(|(n, s)| {
        let len: usize = s.iter().product();
        let t = ArrayD::from_shape_vec(IxDyn(s), values[off..off + len].to_vec()).unwrap();
        off += len;
        (*n, t)
    }))
    .unwrap()
}

fn vals() -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(-10.0f64..10.0, SIZE)
}

fn models(k: std::ops::Range<usize>) -> impl Strategy<Value = Vec<StateDictF64>> {
    prop::collection::vec(vals(), k).prop_map(|vs| vs.iter().map(|v| build(v)).collect())
}

fn close(a: &StateDictF64, b: &StateDictF64, tol: f64) -> bool {
    a.max_abs_diff(b).unwrap() <= tol
}

fn refs(ms: &[StateDictF64]) -> Vec<&StateDictF64> {
    ms.iter().collect()
}

/// A permutation of 0..n from a seed (Fisher-Yates with an LCG).
fn perm(n: usize, seed: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let mut s = seed | 1;
    for i in (1..n).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        p.swap(i, (s >> 33) as usize % (i + 1));
    }
    p
}

/// Merging with permuted inputs (and weights permuted alongside) gives the same model.
fn check_perm<F: Fn(&[&StateDictF64], &[f64]) -> StateDictF64>(
    ms: &[StateDictF64],
    w: &[f64],
    seed: u64,
    f: F,
    tol: f64,
) {
    let p = perm(ms.len(), seed);
    let a = f(&refs(ms), w);
    let pm: Vec<&StateDictF64> = p.iter().map(|&i| &ms[i]).collect();
    let pw: Vec<f64> = p.iter().map(|&i| w[i]).collect();
    let b = f(&pm, &pw);
    assert!(
        close(&a, &b, tol),
        "permutation changed the merge by {}",
        a.max_abs_diff(&b).unwrap()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn averages_of_copies_and_permutations(ms in models(2..5), v in vals(), k in 1usize..5, seed in any::<u64>(),
                                          w in prop::collection::vec(0.1f64..3.0, 4)) {
        let x = build(&v);
        let copies = vec![x.clone(); k];
        prop_assert!(close(&Average::uniform().merge(&refs(&copies)).unwrap(), &x, 1e-12));
        let n = ms.len();
        let w = &w[..n];
        check_perm(&ms, w, seed, |m, w| Average::weighted(w.to_vec(), true).unwrap().merge(m).unwrap(), 1e-12);
        // Normalised weighted average = weighted sum / total.
        let s: f64 = w.iter().sum();
        let direct = StateDictF64::weighted_sum(&refs(&ms), &w.iter().map(|x| x / s).collect::<Vec<_>>()).unwrap();
        prop_assert!(close(&Average::weighted(w.to_vec(), true).unwrap().merge(&refs(&ms)).unwrap(), &direct, 1e-12));
    }

    #[test]
    fn task_vector_family(base in vals(), ms in models(1..4), seed in any::<u64>(), lambda in 0.1f64..2.0,
                          density in 0.05f64..1.0, w in prop::collection::vec(0.1f64..3.0, 3)) {
        let base = build(&base);
        let r = refs(&ms);
        let n = ms.len();
        let w = &w[..n];
        // lambda 0 returns the base exactly, for every method.
        for m in [
            TaskMerge::task_arithmetic(base.clone(), 0.0).unwrap(),
            TaskMerge::ties(base.clone(), density, 0.0).unwrap(),
            TaskMerge::dare(base.clone(), density, seed, 0.0).unwrap(),
            TaskMerge::breadcrumbs(base.clone(), density.min(0.9), 0.1, 0.0).unwrap(),
            TaskMerge::della(base.clone(), 0.5, 0.4, seed, 0.0).unwrap(),
        ] {
            prop_assert_eq!(&m.merge(&r).unwrap(), &base);
        }
        // Task arithmetic is base + lambda * sum tau.
        let ta = TaskMerge::task_arithmetic(base.clone(), lambda).unwrap().merge(&r).unwrap();
        let mut want = base.clone();
        for m in &ms {
            want = want.add(&m.sub(&base).unwrap().scale(lambda).unwrap()).unwrap();
        }
        prop_assert!(close(&ta, &want, 1e-9));
        // TIES with density 1 and one model: base + lambda * tau.
        let one = TaskMerge::ties(base.clone(), 1.0, lambda).unwrap().merge(&[&ms[0]]).unwrap();
        let want = base.add(&ms[0].sub(&base).unwrap().scale(lambda).unwrap()).unwrap();
        prop_assert!(close(&one, &want, 1e-9));
        // Copies of one model: TIES and breadcrumbs-with-everything return it (lambda 1).
        let copies = vec![ms[0].clone(); 3];
        let t = TaskMerge::ties(base.clone(), 1.0, 1.0).unwrap().merge(&refs(&copies)).unwrap();
        prop_assert!(close(&t, &ms[0], 1e-9));
        let bc = TaskMerge::breadcrumbs(base.clone(), 1.0, 0.0, 1.0 / 3.0).unwrap().merge(&refs(&copies)).unwrap();
        prop_assert!(close(&bc, &ms[0], 1e-9));
        // TIES keeps exactly ceil(density * n) entries of a single task vector (distinct magnitudes).
        let single = TaskMerge::ties(base.clone(), density, 1.0).unwrap().merge(&[&ms[0]]).unwrap();
        for name in NAMES {
            let len = single.get(name).unwrap().len();
            let changed = single.get(name).unwrap().iter().zip(base.get(name).unwrap().iter()).filter(|(a, b)| a != b).count();
            let k = ((density * len as f64).ceil() as usize).clamp(1, len);
            prop_assert!(changed <= k, "`{}`: {} changed, k = {}", name, changed, k);
        }
        // Permutation invariance (weights permuted alongside).
        check_perm(&ms, w, seed, |m, w| TaskMerge::ties(base.clone(), density, lambda).unwrap().with_weights(w.to_vec()).unwrap().merge(m).unwrap(), 1e-9);
        check_perm(&ms, w, seed, |m, w| TaskMerge::task_arithmetic(base.clone(), lambda).unwrap().with_weights(w.to_vec()).unwrap().merge(m).unwrap(), 1e-9);
    }

    #[test]
    fn slerp_and_karcher(a in vals(), b in vals(), t in 0.0f64..1.0) {
        let (a, b) = (build(&a), build(&b));
        prop_assert_eq!(&Slerp::new(0.0).unwrap().merge(&[&a, &b]).unwrap(), &a);
        prop_assert_eq!(&Slerp::new(1.0).unwrap().merge(&[&a, &b]).unwrap(), &b);
        let ab = Slerp::new(t).unwrap().merge(&[&a, &b]).unwrap();
        let ba = Slerp::new(1.0 - t).unwrap().merge(&[&b, &a]).unwrap();
        prop_assert!(close(&ab, &ba, 1e-9));
        prop_assert!(close(&Slerp::new(t).unwrap().merge(&[&a, &a]).unwrap(), &a, 1e-9));
        // Karcher mean of two equal-norm tensors with weights (1 - t, t) is SLERP at t.
        let b2 = b.try_map(|n, tb| {
            let ta = a.get(n).unwrap();
            let s = (modelfusion::Tensor::norm(ta) / modelfusion::Tensor::norm(tb)).max(1e-300);
            Ok(tb * s)
        }).unwrap();
        let s = Slerp::new(t).unwrap().merge(&[&a, &b2]).unwrap();
        let k = KarcherMean::weighted(vec![1.0 - t, t]).unwrap().merge(&[&a, &b2]).unwrap();
        // Nearly collinear tensors make SLERP lerp instead, which is off the sphere.
        let collinear = NAMES.iter().any(|n| {
            let (x, y) = (a.get(n).unwrap(), b2.get(n).unwrap());
            modelfusion::Tensor::dot(x, y).unwrap().abs() > 0.999 * modelfusion::Tensor::norm(x) * modelfusion::Tensor::norm(y)
        });
        if !collinear {
            prop_assert!(close(&s, &k, 1e-7), "karcher vs slerp {}", s.max_abs_diff(&k).unwrap());
        }
        let copies = [&a, &a, &a];
        prop_assert!(close(&KarcherMean::uniform().merge(&copies).unwrap(), &a, 1e-9));
    }

    #[test]
    fn model_stock_properties(base in vals(), ms in models(2..5), x in vals(), seed in any::<u64>()) {
        let base = build(&base);
        let x = build(&x);
        // Copies of one fine-tuned model: cos = 1, t = 1, the model comes back.
        let copies = vec![x.clone(); 3];
        prop_assert!(close(&ModelStock::new(base.clone()).merge(&refs(&copies)).unwrap(), &x, 1e-9));
        let w = vec![1.0; ms.len()];
        check_perm(&ms, &w, seed, |m, _| ModelStock::new(base.clone()).merge(m).unwrap(), 1e-9);
    }

    #[test]
    fn fisher_properties(ms in models(1..4), fs in prop::collection::vec(prop::collection::vec(0.0f64..5.0, SIZE), 3), x in vals(), seed in any::<u64>()) {
        let n = ms.len();
        let fishers: Vec<StateDictF64> = fs.iter().take(n).map(|f| build(f)).collect();
        let x = build(&x);
        let copies = vec![x.clone(); n];
        prop_assert!(close(&Fisher::new(fishers.clone()).unwrap().merge(&refs(&copies)).unwrap(), &x, 1e-9));
        // Equal Fishers give the uniform average.
        let same = vec![fishers[0].clone(); n];
        let got = Fisher::new(same).unwrap().merge(&refs(&ms)).unwrap();
        prop_assert!(close(&got, &Average::uniform().merge(&refs(&ms)).unwrap(), 1e-9));
        // Permuting models and Fishers together.
        let p = perm(n, seed);
        let a = Fisher::new(fishers.clone()).unwrap().merge(&refs(&ms)).unwrap();
        let pf: Vec<StateDictF64> = p.iter().map(|&i| fishers[i].clone()).collect();
        let pm: Vec<&StateDictF64> = p.iter().map(|&i| &ms[i]).collect();
        prop_assert!(close(&a, &Fisher::new(pf).unwrap().merge(&pm).unwrap(), 1e-9));
    }

    #[test]
    fn streaming_averagers(ms in models(1..7), decay in 0.0f64..0.99, k in 1usize..4) {
        let mut swa = Swa::new();
        let mut ema = Ema::new(decay).unwrap();
        let mut lawa = Lawa::new(k).unwrap();
        for m in &ms {
            swa.update(m).unwrap();
            ema.update(m).unwrap();
            lawa.update(m).unwrap();
        }
        prop_assert!(close(swa.average().unwrap(), &Average::uniform().merge(&refs(&ms)).unwrap(), 1e-9));
        // EMA closed form: decay^(n-1) theta_0 + sum_{j>=1} (1 - decay) decay^(n-1-j) theta_j.
        let n = ms.len();
        let w: Vec<f64> = (0..n)
            .map(|j| if j == 0 { decay.powi(n as i32 - 1) } else { (1.0 - decay) * decay.powi((n - 1 - j) as i32) })
            .collect();
        let closed = StateDictF64::weighted_sum(&refs(&ms), &w).unwrap();
        prop_assert!(close(ema.average().unwrap(), &closed, 1e-9));
        let last = &ms[n.saturating_sub(k)..];
        prop_assert!(close(&lawa.average().unwrap(), &Average::uniform().merge(&refs(last)).unwrap(), 1e-9));
        // SWAG's mean is the SWA mean.
        let mut swag = Swag::new(3).unwrap();
        for m in &ms { swag.update(m).unwrap(); }
        prop_assert!(close(swag.mean().unwrap(), swa.average().unwrap(), 1e-9));
    }
}

#[test]
fn dare_is_deterministic_and_independent_of_order_and_threads() {
    let n = 300_000; // above the parallel threshold: several chunks, run in parallel
    let mk = |s: u64| {
        let mut x = s;
        ArrayD::from_shape_fn(IxDyn(&[n]), |_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
    };
    let base = StateDict::from_pairs([("a", mk(1)), ("b", mk(2))]).unwrap();
    let m1 = StateDict::from_pairs([("a", mk(3)), ("b", mk(4))]).unwrap();
    let m2 = StateDict::from_pairs([("a", mk(5)), ("b", mk(6))]).unwrap();
    // The same parameters stored in the other order.
    let swap = |m: &StateDictF32| {
        StateDict::from_pairs([
            ("b", m.get("b").unwrap().clone()),
            ("a", m.get("a").unwrap().clone()),
        ])
        .unwrap()
    };
    for consensus in [Consensus::Sum, Consensus::SignElection] {
        let dare = TaskMerge::dare(base.clone(), 0.3, 77, 1.0)
            .unwrap()
            .with_consensus(consensus);
        let run = |threads: usize, ms: [&StateDictF32; 2]| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| dare.merge(&ms).unwrap())
        };
        let a = run(1, [&m1, &m2]);
        let b = run(2, [&m1, &m2]);
        assert_eq!(a, b, "thread count changed DARE");
        let (s1, s2) = (swap(&m1), swap(&m2));
        let c = run(2, [&s1, &s2]);
        assert_eq!(a.get("a"), c.get("a"));
        assert_eq!(a.get("b"), c.get("b"));
        // Another seed gives another result.
        let other = TaskMerge::dare(base.clone(), 0.3, 78, 1.0)
            .unwrap()
            .with_consensus(consensus)
            .merge(&[&m1, &m2])
            .unwrap();
        assert_ne!(a, other);
        // The drawn mask is the one merge uses.
        let mask0 = dare.keep_mask("a", 0, n).unwrap();
        let mask1 = dare.keep_mask("a", 1, n).unwrap();
        let kept = mask0.iter().filter(|&&k| k).count() as f64 / n as f64;
        assert!((kept - 0.3).abs() < 0.01, "keep rate {kept}");
        let ts = [m1.get("a").unwrap(), m2.get("a").unwrap()];
        let with = dare
            .merge_tensor_with_masks("a", &ts, &[&mask0, &mask1])
            .unwrap();
        assert_eq!(&with, a.get("a").unwrap());
    }
    // TIES on large tensors (sampled threshold path) is also thread-count independent and keeps k.
    let ties = TaskMerge::ties(base.clone(), 0.2, 1.0).unwrap();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| ties.merge(&[&m1]).unwrap());
    let two = ties.merge(&[&m1]).unwrap();
    assert_eq!(one, two);
    let changed = one
        .get("a")
        .unwrap()
        .iter()
        .zip(base.get("a").unwrap().iter())
        .filter(|(x, y)| x != y)
        .count();
    assert_eq!(changed, (0.2 * n as f64).ceil() as usize);
}

#[test]
fn dare_rescale_preserves_expectation_and_l1() {
    let n = 200_000;
    let base = StateDict::from_pairs([("w", ArrayD::<f64>::zeros(IxDyn(&[n])))]).unwrap();
    let m = StateDict::from_pairs([(
        "w",
        ArrayD::from_shape_fn(IxDyn(&[n]), |i| 1.0 + (i[0] % 7) as f64),
    )])
    .unwrap();
    let mean = |x: &StateDictF64| x.get("w").unwrap().mean().unwrap();
    let inv = TaskMerge::dare(base.clone(), 0.25, 5, 1.0)
        .unwrap()
        .merge(&[&m])
        .unwrap();
    assert!((mean(&inv) / mean(&m) - 1.0).abs() < 0.02);
    let l1 = TaskMerge::dare(base, 0.25, 5, 1.0)
        .unwrap()
        .with_rescale(modelfusion::merge::Rescale::L1Norm)
        .unwrap()
        .merge(&[&m])
        .unwrap();
    assert_abs_diff_eq!(mean(&l1), mean(&m), epsilon = 1e-9);
}

#[test]
fn della_keeps_large_entries_more_often() {
    let n = 100_000;
    let base = StateDict::from_pairs([("w", ArrayD::<f64>::zeros(IxDyn(&[n])))]).unwrap();
    let m = StateDict::from_pairs([(
        "w",
        ArrayD::from_shape_fn(IxDyn(&[n]), |i| (i[0] + 1) as f64),
    )])
    .unwrap();
    let d = TaskMerge::della(base, 0.5, 0.4, 3, 1.0)
        .unwrap()
        .merge(&[&m])
        .unwrap();
    let w = d.get("w").unwrap();
    let kept = |r: std::ops::Range<usize>| {
        r.clone().filter(|&i| w[[i]] != 0.0).count() as f64 / r.len() as f64
    };
    let (low, high) = (kept(0..n / 10), kept(n - n / 10..n));
    assert!((low - 0.14).abs() < 0.03, "low {low}");
    assert!((high - 0.86).abs() < 0.03, "high {high}");
    // Kept entries are rescaled by 1 / p_j: the expectation is preserved.
    let ratio = w.sum() / m.get("w").unwrap().sum();
    assert!((ratio - 1.0).abs() < 0.02, "ratio {ratio}");
}

#[test]
fn swag_sample_moments() {
    let mut swag = Swag::new(4).unwrap();
    let pts = [
        [0.0f64, 1.0],
        [2.0, -1.0],
        [1.0, 3.0],
        [3.0, 1.0],
        [4.0, 0.0],
    ];
    for p in pts {
        swag.update(&StateDict::from_pairs([("w", ndarray::arr1(&p).into_dyn())]).unwrap())
            .unwrap();
    }
    let var = swag.variance().unwrap();
    let devs: Vec<StateDictF64> = swag.deviations().iter().cloned().collect();
    let kk = devs.len() as f64;
    let samples: Vec<StateDictF64> = (0..20000).map(|s| swag.sample(s, 1.0).unwrap()).collect();
    for j in 0..2 {
        let xs: Vec<f64> = samples.iter().map(|s| s.get("w").unwrap()[[j]]).collect();
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64;
        let low: f64 = devs.iter().map(|d| d.get("w").unwrap()[[j]].powi(2)).sum();
        let want = var.get("w").unwrap()[[j]] / 2.0 + low / (2.0 * (kk - 1.0));
        assert!(
            (m - swag.mean().unwrap().get("w").unwrap()[[j]]).abs() < 0.05,
            "mean {m}"
        );
        assert!((v / want - 1.0).abs() < 0.05, "var {v} vs {want}");
    }
}

struct Dist(StateDictF64);
impl Objective<StateDictF64> for Dist {
    fn loss(&self, m: &StateDictF64) -> Result<f64> {
        Ok(m.sub(&self.0)?.norm())
    }
}

#[test]
fn greedy_soup_report() {
    let target = build(&[1.0; SIZE]);
    let ing: Vec<StateDictF64> = [0.0, 2.5, 1.4, 30.0, 0.9]
        .iter()
        .map(|&v| build(&[v; SIZE]))
        .collect();
    let report = GreedySoup::new(Dist(target)).cook(&refs(&ing)).unwrap();
    assert_eq!(report.order, vec![4, 2, 0, 1, 3]);
    assert_eq!(report.kept[0], 4);
    assert_eq!(report.steps.len(), 4);
    let kept: Vec<&StateDictF64> = report.kept.iter().map(|&i| &ing[i]).collect();
    assert!(close(
        &report.soup,
        &Average::uniform().merge(&kept).unwrap(),
        1e-12
    ));
    assert!(report.score <= report.ingredient_scores[4]);
    assert!(!report.kept.contains(&3));
    // Every kept step strictly improved on the one before.
    let mut best = report.ingredient_scores[4];
    for s in &report.steps {
        assert_eq!(s.kept, s.candidate_score < best);
        if s.kept {
            best = s.candidate_score;
        }
    }
    assert_eq!(best, report.score);
}

#[test]
fn ensemble_of_copies_is_the_model() {
    let a = ndarray::array![[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]];
    for mode in [EnsembleMode::Logits, EnsembleMode::Probabilities] {
        let e = Ensemble::new(mode);
        let one = e.combine(&[a.view()]).unwrap();
        let three = e.combine(&[a.view(), a.view(), a.view()]).unwrap();
        assert!((&one - &three).iter().all(|d| d.abs() < 1e-12));
    }
}

#[cfg(feature = "linalg")]
#[test]
fn regmean_copies_and_identity_grams() {
    use modelfusion::merge::{Grams, RegMean};
    let ms: Vec<StateDictF64> = (0..3)
        .map(|s| {
            build(
                &(0..SIZE)
                    .map(|i| ((i * 7 + s * 13) % 11) as f64 - 5.0)
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let g = |d: usize, s: f64| -> ndarray::Array2<f64> {
        ndarray::Array2::from_shape_fn(
            (d, d),
            |(i, j)| if i == j { 2.0 + s * i as f64 } else { 0.3 * s },
        )
    };
    let grams: Vec<Grams> = (0..3)
        .map(|s| {
            [
                ("fc.weight".to_string(), g(4, s as f64)),
                ("head.weight".to_string(), g(3, s as f64)),
            ]
            .into()
        })
        .collect();
    let copies = vec![ms[0].clone(); 3];
    let r = RegMean::new(grams.clone(), 0.9).unwrap();
    assert!(close(&r.merge(&refs(&copies)).unwrap(), &ms[0], 1e-9));
    // Identical scalar-multiple-of-identity Grams: the plain mean.
    let eye: Vec<Grams> = (0..3)
        .map(|_| {
            [
                ("fc.weight".to_string(), ndarray::Array2::eye(4)),
                ("head.weight".to_string(), ndarray::Array2::eye(3)),
            ]
            .into()
        })
        .collect();
    let got = RegMean::new(eye, 0.5).unwrap().merge(&refs(&ms)).unwrap();
    assert!(close(
        &got,
        &Average::uniform().merge(&refs(&ms)).unwrap(),
        1e-9
    ));
    // A singular Gram (an input that is always zero) still solves (pseudo-inverse).
    let mut sing = grams;
    for gs in &mut sing {
        let m = gs.get_mut("fc.weight").unwrap();
        m.row_mut(0).fill(0.0);
        m.column_mut(0).fill(0.0);
    }
    assert!(
        RegMean::new(sing, 0.9)
            .unwrap()
            .merge(&refs(&ms))
            .unwrap()
            .check_finite("merged")
            .is_ok()
    );
}

/// Large tensors take the single-pass TIES path (sampled brackets, fix-ups); it must
/// agree with a direct implementation (sort, trim, elect, disjoint mean).
#[test]
fn ties_large_tensor_matches_direct_implementation() {
    let n = 400_000;
    let mut s = 12345u64;
    let mut rnd = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let base: Vec<f32> = (0..n).map(|_| rnd()).collect();
    let xs: Vec<Vec<f32>> = (0..3).map(|_| (0..n).map(|_| rnd()).collect()).collect();
    let w = [0.5f32, 1.0, 2.0];
    for (density, consensus) in [
        (0.2, Consensus::SignElection),
        (0.05, Consensus::Sum),
        (0.7, Consensus::SignElection),
    ] {
        let k = (density * n as f64).ceil() as usize;
        let trimmed: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| {
                let tau: Vec<f32> = x.iter().zip(&base).map(|(a, b)| a - b).collect();
                let mut mags: Vec<f32> = tau.iter().map(|t| t.abs()).collect();
                mags.sort_by(|a, b| b.partial_cmp(a).unwrap());
                let th = mags[k - 1];
                tau.iter()
                    .map(|&t| if t.abs() >= th { t } else { 0.0 })
                    .collect()
            })
            .collect();
        let want: Vec<f32> = (0..n)
            .map(|j| {
                let tot: f32 = (0..3).map(|i| w[i] * trimmed[i][j]).sum();
                let merged = match consensus {
                    Consensus::Sum => tot,
                    Consensus::SignElection => {
                        let (mut num, mut den) = (0.0f32, 0.0f32);
                        for i in 0..3 {
                            let d = trimmed[i][j];
                            if d != 0.0 && (d > 0.0) == (tot > 0.0) && tot != 0.0 {
                                num += w[i] * d;
                                den += w[i];
                            }
                        }
                        if den != 0.0 { num / den } else { 0.0 }
                    }
                };
                base[j] + merged
            })
            .collect();
        let sd = |v: &Vec<f32>| {
            StateDict::from_pairs([("w", ArrayD::from_shape_vec(IxDyn(&[n]), v.clone()).unwrap())])
                .unwrap()
        };
        let models: Vec<StateDictF32> = xs.iter().map(sd).collect();
        let got = TaskMerge::new(
            base_sd(&base),
            modelfusion::merge::Sparsification::Magnitude { density },
            consensus,
            1.0,
        )
        .unwrap()
        .with_weights(w.iter().map(|&x| x as f64).collect())
        .unwrap()
        .merge(&models.iter().collect::<Vec<_>>())
        .unwrap();
        let g = got.get("w").unwrap();
        let worst = g
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "density {density}: max diff {worst}");
    }
}

fn base_sd(v: &[f32]) -> StateDictF32 {
    StateDict::from_pairs([(
        "w",
        ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap(),
    )])
    .unwrap()
}
