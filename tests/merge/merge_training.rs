//! SWAD, PAPA and HWA (`modelfusion::merge::training`): golden values from the numpy
//! reference in tests/golden/merge/gen_training.py (committed outputs), properties, and
//! bad input.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use crate::golden_json::floats;
use modelfusion::merge::{
    BlockQuantizer, Fge, Hwa, Papa, Rounding, StepConfig, Swad, Swalp, Twa, train_population,
};
use modelfusion::optim::{LrSchedule, ModelOptimizer, Optimizer};
use modelfusion::{Model, Result, StateDict, StateDictF64};
use ndarray::{ArrayD, arr1};
use proptest::prelude::*;
use serde_json::Value;

fn golden() -> Value {
    crate::golden_json::read("training.json")
}

/// A model from a JSON object of flat arrays (names sorted).
fn model(v: &Value) -> StateDictF64 {
    let map: BTreeMap<&String, &Value> = v.as_object().unwrap().iter().collect();
    StateDict::from_pairs(
        map.into_iter()
            .map(|(k, t)| (k.clone(), arr1(&floats(t)).into_dyn())),
    )
    .unwrap()
}

/// The generator's iterate `k`.
fn iterate(k: usize) -> StateDictF64 {
    let k = k as f64;
    StateDict::from_pairs([
        ("b", arr1(&[0.1 * k * k - k]).into_dyn()),
        (
            "w",
            arr1(&[(0.3 * k).sin(), (0.5 * k).cos(), k / 10.0]).into_dyn(),
        ),
    ])
    .unwrap()
}

fn close(a: &StateDictF64, b: &StateDictF64, tol: f64, what: &str) {
    let d = a.max_abs_diff(b).unwrap();
    assert!(d <= tol, "{what}: max abs diff {d:e} > {tol:e}");
}

fn run_swad(
    losses: &[f64],
    lengths: &[usize],
    nc: usize,
    nt: usize,
    r: f64,
) -> Result<modelfusion::merge::SwadAverage<StateDictF64>> {
    let mut swad = Swad::new()
        .with_n_converge(nc)?
        .with_n_tolerance(nt)?
        .with_tolerance_ratio(r)?;
    let mut k = 0;
    for (&loss, &len) in losses.iter().zip(lengths) {
        for _ in 0..len {
            swad.update(&iterate(k))?;
            k += 1;
        }
        swad.evaluate(loss)?;
    }
    swad.average()
}

#[test]
fn swad_matches_the_offline_reference() {
    let g = golden();
    for (c, case) in g["swad"].as_array().unwrap().iter().enumerate() {
        let losses = floats(&case["losses"]);
        let lengths: Vec<usize> = floats(&case["lengths"])
            .iter()
            .map(|&x| x as usize)
            .collect();
        let nc = case["n_converge"].as_u64().unwrap() as usize;
        let nt = case["n_tolerance"].as_u64().unwrap() as usize;
        let r = case["tolerance_ratio"].as_f64().unwrap();
        let got = run_swad(&losses, &lengths, nc, nt, r).unwrap();
        let window = case["window"].as_array().map(|w| {
            (
                w[0].as_u64().unwrap() as usize,
                w[1].as_u64().unwrap() as usize,
            )
        });
        assert_eq!(got.window, window, "case {c}: window");
        assert_eq!(
            got.iterates,
            case["iterates"].as_u64().unwrap() as usize,
            "case {c}"
        );
        close(
            &got.model,
            &model(&case["average"]),
            1e-12,
            &format!("case {c}"),
        );
    }
}

/// Member `j`'s objective at `step`: `sum scale * (w - c)^2 / 2` against the
/// generator's targets.
fn objectives(pop: &Value) -> Vec<impl FnMut(&StateDictF64, usize) -> Result<(f64, StateDictF64)>> {
    let period = pop["period"].as_u64().unwrap() as usize;
    let targets: Vec<Vec<StateDictF64>> = pop["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ts| ts.as_array().unwrap().iter().map(model).collect())
        .collect();
    let scales: Vec<StateDictF64> = pop["scales"]
        .as_array()
        .unwrap()
        .iter()
        .map(model)
        .collect();
    targets
        .into_iter()
        .zip(scales)
        .map(move |(ts, scale)| {
            move |m: &StateDictF64, step: usize| {
                let d = m.sub(&ts[step % period])?;
                let g = d.zip_map(&scale, |_, d, s| Ok(d * s))?;
                Ok((0.5 * g.dot(&d)?, g))
            }
        })
        .collect()
}

#[test]
fn papa_and_hwa_match_the_reference_runs() {
    let g = golden();
    let pop = &g["population"];
    let init = model(&pop["init"]);
    let optimizer = Optimizer::sgd(
        pop["lr"].as_f64().unwrap(),
        pop["momentum"].as_f64().unwrap(),
    )
    .unwrap();
    for (i, run) in pop["runs"].as_array().unwrap().iter().enumerate() {
        let steps = run["steps"].as_u64().unwrap() as usize;
        let config = StepConfig::new(steps, optimizer)
            .unwrap()
            .with_weight_decay(pop["weight_decay"].as_f64().unwrap())
            .unwrap()
            .with_schedule(LrSchedule::Cosine);
        let mut objs = objectives(pop);
        let inits = vec![init.clone(); objs.len()];
        let every = |k: &str| run[k].as_u64().unwrap() as usize;
        let out = match run["rule"].as_str().unwrap() {
            "ema" => Papa::ema(run["alpha"].as_f64().unwrap(), every("every"))
                .unwrap()
                .train(&inits, &mut objs, &config),
            "all" => Papa::all(every("every"))
                .unwrap()
                .train(&inits, &mut objs, &config),
            _ => Hwa::new(every("sync_every"), every("window"))
                .unwrap()
                .train(&inits, &mut objs, &config),
        }
        .unwrap();
        for (j, m) in run["members"].as_array().unwrap().iter().enumerate() {
            close(
                &out.members[j],
                &model(m),
                1e-12,
                &format!("run {i} member {j}"),
            );
        }
        close(
            &out.average,
            &model(&run["average"]),
            1e-12,
            &format!("run {i} average"),
        );
    }
}

#[test]
fn fge_swalp_and_twa_match_the_reference_runs() {
    let g = golden();
    let pop = &g["population"];
    let init = model(&pop["init"]);
    let (lr, momentum) = (
        pop["lr"].as_f64().unwrap(),
        pop["momentum"].as_f64().unwrap(),
    );
    let wd = pop["weight_decay"].as_f64().unwrap();
    let config = |steps: &Value, lr: f64| {
        StepConfig::new(
            steps.as_u64().unwrap() as usize,
            Optimizer::sgd(lr, momentum).unwrap(),
        )
        .unwrap()
        .with_weight_decay(wd)
        .unwrap()
    };
    for (i, run) in pop["fge"].as_array().unwrap().iter().enumerate() {
        let fge = Fge::new(
            run["cycle"].as_u64().unwrap() as usize,
            run["lr_high"].as_f64().unwrap(),
            run["lr_low"].as_f64().unwrap(),
        )
        .unwrap();
        for (s, want) in floats(&run["lr"]).into_iter().enumerate() {
            assert!((fge.lr(s) - want).abs() < 1e-15, "FGE {i} lr at {s}");
        }
        let mut obj = objectives(pop).into_iter().next().unwrap();
        let snaps = fge
            .train(&init, &mut obj, &config(&run["steps"], 0.05))
            .unwrap();
        let want = run["snapshots"].as_array().unwrap();
        assert_eq!(snaps.len(), want.len());
        for (k, w) in want.iter().enumerate() {
            close(
                &snaps[k],
                &model(w),
                1e-12,
                &format!("FGE {i} snapshot {k}"),
            );
        }
    }
    for (i, run) in pop["swalp"].as_array().unwrap().iter().enumerate() {
        let q = BlockQuantizer::new(run["bits"].as_u64().unwrap() as u32)
            .unwrap()
            .with_rounding(Rounding::Nearest);
        let swalp = Swalp::new(
            q,
            run["swa_start"].as_u64().unwrap() as usize,
            run["every"].as_u64().unwrap() as usize,
        )
        .unwrap();
        let mut obj = objectives(pop).into_iter().next().unwrap();
        let out = swalp
            .train(&init, &mut obj, &config(&run["steps"], lr))
            .unwrap();
        assert_eq!(out.count, run["count"].as_u64().unwrap() as usize);
        close(
            &out.last,
            &model(&run["last"]),
            0.0,
            &format!("SWALP {i} last"),
        );
        close(
            &out.average,
            &model(&run["average"]),
            1e-12,
            &format!("SWALP {i} average"),
        );
    }
    for run in pop["twa"].as_array().unwrap() {
        let its: Vec<StateDictF64> = run["iterates"]
            .as_array()
            .unwrap()
            .iter()
            .map(model)
            .collect();
        let refs: Vec<&StateDictF64> = its.iter().collect();
        let twa = Twa::new(&refs).unwrap();
        assert_eq!(twa.dim(), 3);
        let mut obj = objectives(pop).into_iter().next().unwrap();
        let cfg = config(&run["steps"], lr).with_schedule(LrSchedule::Cosine);
        let out = twa.train(&mut obj, &cfg).unwrap();
        close(&out.model, &model(&run["model"]), 1e-10, "TWA");
    }
}

fn sd(values: &[f64]) -> StateDictF64 {
    StateDict::from_pairs([(
        "w",
        ArrayD::from_shape_vec(vec![values.len()], values.to_vec()).unwrap(),
    )])
    .unwrap()
}

fn spread(pop: &[StateDictF64]) -> f64 {
    let refs: Vec<&StateDictF64> = pop.iter().collect();
    let mean = StateDictF64::weighted_sum(&refs, &vec![1.0 / pop.len() as f64; pop.len()]).unwrap();
    pop.iter()
        .map(|m| m.sub(&mean).unwrap().norm().powi(2))
        .sum()
}

fn mean(pop: &[StateDictF64]) -> StateDictF64 {
    let refs: Vec<&StateDictF64> = pop.iter().collect();
    StateDictF64::weighted_sum(&refs, &vec![1.0 / pop.len() as f64; pop.len()]).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// SWAD's online result is the plain mean of the iterates of its window, and the
    /// window obeys the paper's rule: the start's loss is the first minimum of its
    /// n_converge window, every segment inside has a loss under the threshold within
    /// its next n_tolerance, and the end (if before the last segment) has none.
    #[test]
    fn swad_window_rule_and_dense_mean(
        segs in prop::collection::vec((1.0f64..2.0, 1usize..4), 1..30),
        nc in 1usize..5,
        nt in 1usize..7,
        r in 0.0f64..0.5,
    ) {
        let (losses, lengths): (Vec<f64>, Vec<usize>) = segs.into_iter().unzip();
        let got = run_swad(&losses, &lengths, nc, nt, r).unwrap();
        let offsets: Vec<usize> = lengths.iter().scan(0, |s, &l| { *s += l; Some(*s - l) }).collect();
        let n = losses.len();
        match got.window {
            None => {
                for i in 0..(n + 1).saturating_sub(nc) {
                    prop_assert!(losses[i..i + nc].iter().any(|&l| l < losses[i]));
                }
                let last: Vec<StateDictF64> = (0..lengths[n - 1]).map(|j| iterate(offsets[n - 1] + j)).collect();
                let want = mean(&last);
                prop_assert!(got.model.max_abs_diff(&want).unwrap() < 1e-12);
            }
            Some((s, e)) => {
                prop_assert!(s < e && e <= n);
                prop_assert!(losses[s..s + nc].iter().all(|&l| losses[s] <= l));
                for i in 0..s {
                    prop_assert!(i + nc > n || losses[i..i + nc].iter().any(|&l| l < losses[i]));
                }
                let thr = losses[s..s + nc].iter().sum::<f64>() / nc as f64 * (1.0 + r);
                let low = |i: usize| losses[i..(i + nt).min(n)].iter().cloned().fold(f64::INFINITY, f64::min);
                for i in s..e {
                    prop_assert!(low(i) <= thr);
                }
                prop_assert!(e == n || low(e) > thr);
                let its: Vec<StateDictF64> = (offsets[s]..offsets[e - 1] + lengths[e - 1]).map(iterate).collect();
                prop_assert_eq!(got.iterates, its.len());
                prop_assert!(got.model.max_abs_diff(&mean(&its)).unwrap() < 1e-12);
            }
        }
    }

    /// PAPA's pulls keep the population mean; the EMA rule shrinks the spread by
    /// alpha^2, PAPA-all to zero, and PAPA-2 makes each member a midpoint of two
    /// distinct members.
    #[test]
    fn papa_rules_keep_the_mean(
        pop in prop::collection::vec(prop::collection::vec(-5.0f64..5.0, 3), 2..6),
        alpha in 0.0f64..0.99,
        seed in any::<u64>(),
    ) {
        let pop: Vec<StateDictF64> = pop.iter().map(|v| sd(v)).collect();
        let (m0, s0) = (mean(&pop), spread(&pop));
        let mut ema = pop.clone();
        Papa::ema(alpha, 1).unwrap().apply(&mut ema, 0).unwrap();
        prop_assert!(mean(&ema).max_abs_diff(&m0).unwrap() < 1e-9);
        prop_assert!((spread(&ema) - alpha * alpha * s0).abs() < 1e-9 * (1.0 + s0));
        let mut all = pop.clone();
        Papa::all(1).unwrap().apply(&mut all, 0).unwrap();
        prop_assert!(spread(&all) < 1e-18 && mean(&all).max_abs_diff(&m0).unwrap() < 1e-9);
        let mut pairs = pop.clone();
        let papa2 = Papa::pairs(1).unwrap().with_seed(seed);
        papa2.apply(&mut pairs, 3).unwrap();
        for m in &pairs {
            let found = (0..pop.len()).any(|a| (0..pop.len()).any(|b| {
                a != b && m.max_abs_diff(&pop[a].lerp(&pop[b], 0.5).unwrap()).unwrap() < 1e-12
            }));
            prop_assert!(found);
        }
        let mut again = pop.clone();
        papa2.apply(&mut again, 3).unwrap();
        prop_assert_eq!(again, pairs); // seeded
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// FGE's rate stays in [lr_low, lr_high], repeats every cycle, is lowest exactly at
    /// the snapshot step and highest at the cycle's end.
    #[test]
    fn fge_rate_is_a_triangle(half in 1usize..20, high in 0.01f64..1.0, ratio in 0.001f64..1.0) {
        let c = 2 * half;
        let low = high * ratio;
        let fge = Fge::new(c, high, low).unwrap();
        for s in 0..3 * c {
            let r = fge.lr(s);
            prop_assert!(r >= low * (1.0 - 1e-12) && r <= high * (1.0 + 1e-12));
            prop_assert!((r - fge.lr(s + c)).abs() <= 1e-12 * high);
            prop_assert_eq!(fge.is_snapshot(s), s % c == half - 1);
        }
        prop_assert!((fge.lr(half - 1) - low).abs() <= 1e-12 * high);
        prop_assert!((fge.lr(c - 1) - high).abs() <= 1e-12 * high);
    }

    /// Block quantisation: nearest rounding is within half a quantum of the clamped value;
    /// stochastic rounding lands on one of the two neighbouring grid points, is
    /// reproducible for a seed, and is unbiased on average.
    #[test]
    fn block_quantizer_grid(values in prop::collection::vec(-100.0f64..100.0, 1..40), bits in 2u32..12, seed in any::<u64>()) {
        let m = sd(&values);
        let largest = values.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        prop_assume!(largest > 1e-9);
        let delta = 2f64.powi(largest.log2().floor() as i32 - (bits as i32 - 2));
        let top = 2f64.powi(bits as i32 - 1);
        let near = BlockQuantizer::new(bits).unwrap().with_rounding(Rounding::Nearest);
        let qn = near.quantize(&m, 0).unwrap();
        let q = qn.get("w").unwrap();
        for (x, y) in values.iter().zip(q.iter()) {
            let clamped = x.clamp(-top * delta, (top - 1.0) * delta);
            prop_assert!((x - y).abs() <= 0.5 * delta + 1e-12 || (y - clamped).abs() <= 0.5 * delta + 1e-12);
            prop_assert_eq!((y / delta).fract(), 0.0);
        }
        let st = BlockQuantizer::new(bits).unwrap().with_seed(seed);
        let rounds = 400;
        let mut sum = vec![0.0; values.len()];
        for r in 0..rounds {
            let out = st.quantize(&m, r).unwrap();
            for (j, (x, y)) in values.iter().zip(out.get("w").unwrap().iter()).enumerate() {
                let v = x / delta;
                if v < top - 1.0 && v > -top {
                    prop_assert!(*y == delta * v.floor() || *y == delta * v.ceil());
                    sum[j] += y;
                } else {
                    sum[j] += x; // clamped at the grid's end: not unbiased, skip
                }
            }
        }
        prop_assert_eq!(st.quantize(&m, 7).unwrap(), st.quantize(&m, 7).unwrap());
        for (x, s) in values.iter().zip(&sum) {
            // 400 draws of a two-point variable of spread delta: 5 sigma is 0.125 delta.
            prop_assert!((s / rounds as f64 - x).abs() <= 0.13 * delta, "{} vs {}", s / rounds as f64, x);
        }
    }

    /// TWA's result lies in the span of its iterates (here: vectors whose last two
    /// entries are 0), and on a convex quadratic with a small step it does not end
    /// above the loss of their mean (the SWA point).
    #[test]
    fn twa_stays_in_the_span(its in prop::collection::vec(prop::collection::vec(-3.0f64..3.0, 3), 1..4),
                             target in prop::collection::vec(-3.0f64..3.0, 5)) {
        let models: Vec<StateDictF64> = its.iter().map(|v| sd(&[v[0], v[1], v[2], 0.0, 0.0])).collect();
        let refs: Vec<&StateDictF64> = models.iter().collect();
        let twa = Twa::new(&refs);
        prop_assume!(twa.is_ok());
        let twa = twa.unwrap();
        let t = sd(&target);
        let loss = |m: &StateDictF64| 0.5 * m.sub(&t).unwrap().norm().powi(2);
        let mut g = |m: &StateDictF64, _: usize| { let d = m.sub(&t)?; Ok((0.5 * d.norm().powi(2), d)) };
        let run = twa.train(&mut g, &StepConfig::new(50, Optimizer::sgd(0.2, 0.0).unwrap()).unwrap()).unwrap();
        prop_assert!(loss(&run.model) <= loss(twa.center()) + 1e-12);
        prop_assert!(run.model.max_abs_diff(&twa.point(&run.coordinates).unwrap()).unwrap() < 1e-12);
        let w = run.model.get("w").unwrap();
        prop_assert!(w[[3]].abs() < 1e-12 && w[[4]].abs() < 1e-12);
        prop_assert_eq!(run.coordinates.len(), twa.dim());
    }
}

/// A population of one with no pull is plain training with `ModelOptimizer`; HWA with a
/// window of 1 and a step count that is a multiple of its period is PAPA-all.
#[test]
fn compositions_agree() {
    let grad = |c: f64| {
        move |m: &StateDictF64, step: usize| {
            let d = m.sub(&sd(&[c + step as f64 * 0.01, -c]))?;
            Ok((0.5 * d.norm().powi(2), d))
        }
    };
    let init = sd(&[0.0, 1.0]);
    let config = StepConfig::new(12, Optimizer::adam(0.05).unwrap())
        .unwrap()
        .with_schedule(LrSchedule::Cosine);
    let out = train_population(
        std::slice::from_ref(&init),
        &mut [grad(1.0)],
        &config,
        |_, _, _| Ok(ControlFlow::Continue(())),
    )
    .unwrap();
    let mut w = init.clone();
    let mut opt = ModelOptimizer::new(Optimizer::adam(0.05).unwrap());
    let g = grad(1.0);
    for step in 0..12 {
        let (_, gr) = g(&w, step).unwrap();
        opt.step(&mut w, &gr, LrSchedule::Cosine.factor(step, 12))
            .unwrap();
    }
    assert_eq!(out[0], w);
    let inits = [init.clone(), init.clone(), init];
    let hwa = Hwa::new(4, 1)
        .unwrap()
        .train(&inits, &mut [grad(1.0), grad(2.0), grad(3.0)], &config)
        .unwrap();
    let papa = Papa::all(4)
        .unwrap()
        .train(&inits, &mut [grad(1.0), grad(2.0), grad(3.0)], &config)
        .unwrap();
    close(
        &hwa.average,
        &papa.average,
        1e-15,
        "HWA window 1 vs PAPA-all",
    );
    // A stop from the hook ends training after that step.
    let mut seen = 0;
    train_population(
        &inits,
        &mut [grad(1.0), grad(2.0), grad(3.0)],
        &config,
        |s, _, losses| {
            seen = s + 1;
            assert_eq!(losses.len(), 3);
            Ok(if s == 4 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        },
    )
    .unwrap();
    assert_eq!(seen, 5);
}

#[test]
fn bad_input_is_a_clear_error() {
    let msg = |e: modelfusion::Error| e.to_string();
    let ok = |m: &StateDictF64, _: usize| Ok((0.0, m.clone()));
    let config = StepConfig::new(3, Optimizer::sgd(0.1, 0.0).unwrap()).unwrap();
    let a = sd(&[1.0]);
    // Population and objectives.
    let e = train_population(&[a.clone(), a.clone()], &mut [ok], &config, |_, _, _| {
        Ok(ControlFlow::Continue(()))
    });
    assert!(msg(e.unwrap_err()).contains("objectives"));
    let e = train_population(
        &[a.clone(), sd(&[1.0, 2.0])],
        &mut [ok, ok],
        &config,
        |_, _, _| Ok(ControlFlow::Continue(())),
    );
    assert!(msg(e.unwrap_err()).contains("w"));
    let e = train_population(
        &[a.clone(), sd(&[f64::NAN])],
        &mut [ok, ok],
        &config,
        |_, _, _| Ok(ControlFlow::Continue(())),
    );
    assert!(msg(e.unwrap_err()).contains("member 1"));
    let nan = |m: &StateDictF64, _: usize| Ok((f64::NAN, m.clone()));
    let e = train_population(std::slice::from_ref(&a), &mut [nan], &config, |_, _, _| {
        Ok(ControlFlow::Continue(()))
    });
    let e = msg(e.unwrap_err());
    assert!(e.contains("member 0") && e.contains("step 0"), "{e}");
    let short = |_: &StateDictF64, _: usize| Ok((1.0, StateDictF64::new()));
    assert!(
        train_population(
            std::slice::from_ref(&a),
            &mut [short],
            &config,
            |_, _, _| { Ok(ControlFlow::Continue(())) }
        )
        .is_err()
    );
    assert!(msg(StepConfig::new(0, Optimizer::adam(0.1).unwrap()).unwrap_err()).contains("steps"));
    // PAPA and HWA hyperparameters.
    assert!(msg(Papa::ema(1.0, 1).unwrap_err()).contains("alpha"));
    assert!(msg(Papa::ema(f64::NAN, 1).unwrap_err()).contains("alpha"));
    assert!(msg(Papa::pairs(0).unwrap_err()).contains("every"));
    assert!(msg(Hwa::new(0, 1).unwrap_err()).contains("sync_every"));
    assert!(msg(Hwa::new(1, 0).unwrap_err()).contains("window"));
    let mut mixed = vec![a.clone(), sd(&[1.0, 2.0])];
    assert!(Papa::all(1).unwrap().apply(&mut mixed, 0).is_err());
    // SWAD.
    let swad = Swad::<StateDictF64>::new();
    assert!(msg(swad.clone().with_n_converge(0).unwrap_err()).contains("n_converge"));
    assert!(msg(swad.clone().with_n_tolerance(0).unwrap_err()).contains("n_tolerance"));
    assert!(
        msg(swad
            .clone()
            .with_tolerance_ratio(f64::INFINITY)
            .unwrap_err())
        .contains("tolerance_ratio")
    );
    let mut s = swad.clone();
    assert!(msg(s.evaluate(1.0).unwrap_err()).contains("update"));
    assert!(msg(s.average().unwrap_err()).contains("SWAD"));
    s.update(&a).unwrap();
    assert!(msg(s.evaluate(f64::NAN).unwrap_err()).contains("val_loss"));
    assert!(msg(s.evaluate(-0.5).unwrap_err()).contains("val_loss"));
    s.evaluate(1.0).unwrap();
    assert!(s.update(&sd(&[1.0, 2.0])).is_err());
    assert!(s.update(&sd(&[f64::INFINITY])).is_err());
    assert!(msg(s.clone().with_n_converge(2).unwrap_err()).contains("cannot change"));
    // FGE, SWALP, TWA.
    assert!(msg(Fge::new(5, 0.1, 0.01).unwrap_err()).contains("cycle"));
    assert!(msg(Fge::new(4, 0.1, 0.2).unwrap_err()).contains("lr_low"));
    assert!(msg(Fge::new(4, f64::NAN, 0.2).unwrap_err()).contains("lr_high"));
    assert!(msg(BlockQuantizer::new(1).unwrap_err()).contains("bits"));
    let q = BlockQuantizer::new(8).unwrap();
    assert!(q.quantize(&sd(&[f64::NAN]), 0).is_err());
    assert!(msg(Swalp::new(q, 0, 0).unwrap_err()).contains("every"));
    let e = Swalp::new(q, 3, 1)
        .unwrap()
        .train(&a, &mut ok.clone(), &config);
    assert!(msg(e.unwrap_err()).contains("swa_start"));
    assert!(Twa::<StateDictF64>::new(&[]).is_err());
    assert!(msg(Twa::new(&[&sd(&[0.0])]).unwrap_err()).contains("iterates"));
    assert!(Twa::new(&[&a, &sd(&[1.0, 2.0])]).is_err());
    assert!(Twa::new(&[&a, &sd(&[f64::INFINITY])]).is_err());
    let twa = Twa::new(&[&a]).unwrap();
    assert!(msg(twa.point(&[]).unwrap_err()).contains("coordinates"));
    let frozen = config.clone().with_frozen(["w"]);
    assert!(msg(twa.train(&mut ok.clone(), &frozen).unwrap_err()).contains("frozen"));
    assert!(msg(twa.train(&mut nan.clone(), &config).unwrap_err()).contains("TWA"));
    assert!(twa.train(&mut short.clone(), &config).is_err());
}
