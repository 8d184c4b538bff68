//! AdaMerging, the learned soup and subspace learning: golden runs against the numpy
//! reference (`tests/golden/merge/gen_learned.py`), properties, and bad input.

use crate::golden_json::floats;
use modelfusion::merge::{
    AdaMerging, Granularity, LearnedSoup, Merger, ParamGroups, StepConfig, Subspace, TaskMerge,
};
use modelfusion::nn::{Classification, Dataset, Entropy, Mlp, Network, softmax_entropy};
use modelfusion::optim::Optimizer;
use modelfusion::{Gradient, Model, Objective, Result, StateDict, StateDictF64};
use ndarray::{Array2, ArrayD, IxDyn, arr1};
use proptest::prelude::*;
use serde_json::Value;

const NAMES: [&str; 4] = [
    "layers.0.weight",
    "layers.0.bias",
    "layers.1.weight",
    "layers.1.bias",
];

fn golden() -> Value {
    crate::golden_json::read("learned.json")
}

/// A model from `{name: {shape, data}}`, in the network's parameter order.
fn model(v: &Value) -> StateDictF64 {
    StateDict::from_pairs(NAMES.iter().map(|&n| {
        let shape: Vec<usize> = floats(&v[n]["shape"]).iter().map(|&s| s as usize).collect();
        let t = ArrayD::from_shape_vec(IxDyn(&shape), floats(&v[n]["data"])).unwrap();
        (n, t)
    }))
    .unwrap()
}

fn models(v: &Value) -> Vec<StateDictF64> {
    v.as_array().unwrap().iter().map(model).collect()
}

fn dataset(g: &Value) -> Dataset {
    let rows: Vec<Vec<f64>> = g["x"].as_array().unwrap().iter().map(floats).collect();
    let x = Array2::from_shape_fn((rows.len(), rows[0].len()), |(i, j)| rows[i][j] as f32);
    let y = floats(&g["y"]).iter().map(|&v| v as usize).collect();
    Dataset::new(x, y, 3).unwrap()
}

fn close_all(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}[{i}]: {x} vs {y}");
    }
}

#[test]
fn adamerging_matches_the_reference_run() {
    let g = golden();
    let (data, net) = (dataset(&g), Mlp::new(&[4, 5, 3]).unwrap());
    let a = &g["adamerging"];
    let base = model(&a["base"]);
    let tuned = models(&a["tuned"]);
    let refs: Vec<&StateDictF64> = tuned.iter().collect();
    // Batch size 8 = the whole set: the entropy is full-batch, as in the reference.
    let mut entropy = Entropy::new(&net, &data, 8, 0).unwrap();
    let ada = AdaMerging::new(6, Optimizer::sgd(2.0, 0.0).unwrap())
        .unwrap()
        .with_granularity(Granularity::Tensor);
    let run = ada.merge(&base, &refs, &mut entropy).unwrap();
    close_all(&run.losses, &floats(&a["losses"]), 1e-6, "losses");
    let want: Vec<f64> = a["coefficients"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(floats)
        .collect();
    close_all(
        &run.coefficients.iter().copied().collect::<Vec<_>>(),
        &want,
        1e-6,
        "coefficients",
    );
    assert_eq!(run.groups, NAMES);
    let final_loss = entropy.loss(&run.model).unwrap();
    assert!((final_loss - a["final_loss"].as_f64().unwrap()).abs() < 1e-6);
}

#[test]
fn learned_soup_matches_the_reference_run() {
    let g = golden();
    let (data, net) = (dataset(&g), Mlp::new(&[4, 5, 3]).unwrap());
    let s = &g["soup"];
    let ing = models(&s["ingredients"]);
    let refs: Vec<&StateDictF64> = ing.iter().collect();
    let task = Classification::new(&net, &data, 8).unwrap();
    let mut held_out = |m: &StateDictF64, _: usize| task.loss_and_gradient(m);
    let run = LearnedSoup::new(6, Optimizer::sgd(2.0, 0.0).unwrap())
        .unwrap()
        .cook(&refs, &mut held_out)
        .unwrap();
    close_all(&run.losses, &floats(&s["losses"]), 1e-6, "losses");
    close_all(
        &run.weights.iter().copied().collect::<Vec<_>>(),
        &floats(&s["weights"]),
        1e-6,
        "weights",
    );
}

#[test]
fn subspace_line_matches_the_reference_run() {
    let g = golden();
    let (data, net) = (dataset(&g), Mlp::new(&[4, 5, 3]).unwrap());
    let l = &g["line"];
    let schedule: Vec<Vec<f64>> = l["schedule"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let task = Classification::new(&net, &data, 8).unwrap();
    let mut loss = |m: &StateDictF64, _: usize| task.loss_and_gradient(m);
    let config = StepConfig::new(6, Optimizer::sgd(0.1, 0.9).unwrap()).unwrap();
    let run = Subspace::new(config)
        .with_points(schedule)
        .unwrap()
        .train(&models(&l["inits"]), &mut loss)
        .unwrap();
    close_all(&run.losses, &floats(&l["losses"]), 1e-6, "losses");
    for (i, (got, want)) in run
        .endpoints
        .iter()
        .zip(models(&l["endpoints"]))
        .enumerate()
    {
        let d = got.max_abs_diff(&want).unwrap();
        assert!(d < 1e-6, "endpoint {i}: {d:e}");
    }
}

fn sd(values: &[f64]) -> StateDictF64 {
    StateDict::from_pairs([
        ("a.w", arr1(&values[..values.len() / 2]).into_dyn()),
        ("b.w", arr1(&values[values.len() / 2..]).into_dyn()),
    ])
    .unwrap()
}

/// `|w - c|^2 / 2`, convex, with its gradient.
fn quadratic(c: StateDictF64) -> impl FnMut(&StateDictF64, usize) -> Result<(f64, StateDictF64)> {
    move |m, _| {
        let d = m.sub(&c)?;
        Ok((0.5 * d.norm().powi(2), d))
    }
}

fn vec_of(n: usize) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(-2.0f64..2.0, n)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// With one task and the coefficients fixed, AdaMerging's model is task arithmetic.
    #[test]
    fn one_task_fixed_coefficients_is_task_arithmetic(base in vec_of(6), tuned in vec_of(6), lambda in 0.0f64..1.0) {
        let (base, tuned) = (sd(&base), sd(&tuned));
        let ada = AdaMerging::paper(1).unwrap();
        let m = ada.combine(&base, &[&tuned], Array2::from_elem((1, 1), lambda).view()).unwrap();
        let ta = TaskMerge::task_arithmetic(base.clone(), lambda).unwrap().merge(&[&tuned]).unwrap();
        prop_assert!(m.max_abs_diff(&ta).unwrap() < 1e-12);
        // Layer-wise with every coefficient equal: the same model.
        let lw = ada.clone().with_granularity(Granularity::Tensor);
        let m2 = lw.combine(&base, &[&tuned], Array2::from_elem((1, 2), lambda).view()).unwrap();
        prop_assert!(m2.max_abs_diff(&ta).unwrap() < 1e-12);
    }

    /// On a convex toy (a quadratic in the merged weights), projected gradient descent on
    /// the coefficients with a step under 1/L never raises the loss, and stays clipped.
    #[test]
    fn adamerging_never_raises_a_convex_loss(base in vec_of(6), t1 in vec_of(6), t2 in vec_of(6), target in vec_of(6),
                                             layerwise in any::<bool>()) {
        let (base, t1, t2) = (sd(&base), sd(&t1), sd(&t2));
        let l = t1.sub(&base).unwrap().norm().powi(2) + t2.sub(&base).unwrap().norm().powi(2);
        prop_assume!(l > 1e-6);
        let g = if layerwise { Granularity::Layer } else { Granularity::Model };
        let ada = AdaMerging::new(30, Optimizer::sgd(0.9 / l, 0.0).unwrap()).unwrap().with_granularity(g);
        let run = ada.merge(&base, &[&t1, &t2], &mut quadratic(sd(&target))).unwrap();
        for w in run.losses.windows(2) {
            prop_assert!(w[1] <= w[0] + 1e-12, "{:?}", run.losses);
        }
        let end = quadratic(sd(&target))(&run.model, 0).unwrap().0;
        prop_assert!(end <= run.losses[0] + 1e-12);
        prop_assert!(run.coefficients.iter().all(|c| (0.0..=1.0).contains(c)));
    }

    /// The learned soup of identical ingredients is that ingredient, whatever it learns.
    #[test]
    fn learned_soup_of_copies_is_the_model(w in vec_of(6), target in vec_of(6), k in 1usize..5, layer in any::<bool>()) {
        let m = sd(&w);
        let copies: Vec<&StateDictF64> = std::iter::repeat_n(&m, k).collect();
        let g = if layer { Granularity::Layer } else { Granularity::Model };
        let run = LearnedSoup::new(10, Optimizer::adam(0.3).unwrap()).unwrap().with_granularity(g)
            .cook(&copies, &mut quadratic(sd(&target))).unwrap();
        prop_assert!(run.soup.max_abs_diff(&m).unwrap() < 1e-12);
        for col in run.weights.columns() {
            prop_assert!((col.sum() - 1.0).abs() < 1e-12);
        }
    }

    /// With both endpoints equal and plain SGD, the line's midpoint takes exactly the SGD
    /// step (at half the rate) on a linear loss, for any sampled points, and the sum of
    /// the endpoints always moves by `-lr * grad`.
    #[test]
    fn equal_endpoints_train_like_sgd(w in vec_of(6), a in vec_of(6), seed in any::<u64>(), steps in 1usize..20) {
        let (w0, a) = (sd(&w), sd(&a));
        let lr = 0.1;
        let mut linear = |m: &StateDictF64, _: usize| Ok((m.dot(&a)?, a.clone()));
        let config = StepConfig::new(steps, Optimizer::sgd(lr, 0.0).unwrap()).unwrap();
        let run = Subspace::new(config).with_seed(seed).train(&[w0.clone(), w0.clone()], &mut linear).unwrap();
        let sgd = w0.sub(&a.scale(lr * steps as f64 / 2.0).unwrap()).unwrap();
        prop_assert!(run.midpoint().unwrap().max_abs_diff(&sgd).unwrap() < 1e-10);
        prop_assert!(run.points.iter().all(|p| p.columns().into_iter().all(|c| (c.sum() - 1.0).abs() < 1e-12)));
    }
}

/// The coefficient gradient of a combination agrees with central finite differences of
/// the real entropy through the network, for every granularity.
#[test]
fn coefficient_gradients_match_finite_differences() {
    let net = Mlp::new(&[4, 6, 3]).unwrap();
    let x = Array2::from_shape_fn((10, 4), |(i, j)| ((i * 7 + j * 3) as f32 * 0.37).sin());
    let data = Dataset::new(x, vec![0; 10], 3).unwrap();
    let base: StateDictF64 = net.init(1);
    let taus: Vec<StateDictF64> = (2..4)
        .map(|s| net.init::<ArrayD<f64>>(s).scale(0.5).unwrap())
        .collect();
    let refs: Vec<&StateDictF64> = taus.iter().collect();
    let h = Entropy::new(&net, &data, 10, 0).unwrap();
    for gran in [Granularity::Model, Granularity::Layer, Granularity::Tensor] {
        let groups = ParamGroups::new(&base, gran);
        let c = Array2::from_shape_fn((2, groups.len()), |(i, j)| {
            0.2 + 0.1 * i as f64 + 0.05 * j as f64
        });
        let f = |c: &Array2<f64>| {
            h.loss(&groups.combine(Some(&base), &refs, c.view()).unwrap())
                .unwrap()
        };
        let merged = groups.combine(Some(&base), &refs, c.view()).unwrap();
        let (_, grad) = h.clone().loss_and_gradient_at_full(&merged);
        let g = groups.gradient(&grad, &refs).unwrap();
        for i in 0..2 {
            for j in 0..groups.len() {
                let eps = 1e-6;
                let (mut up, mut down) = (c.clone(), c.clone());
                up[[i, j]] += eps;
                down[[i, j]] -= eps;
                let fd = (f(&up) - f(&down)) / (2.0 * eps);
                assert!(
                    (fd - g[[i, j]]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "{gran:?} [{i}, {j}]: {fd} vs {}",
                    g[[i, j]]
                );
            }
        }
    }
}

/// The full-batch entropy and its gradient (the minibatch of all samples).
trait FullBatch {
    fn loss_and_gradient_at_full(self, m: &StateDictF64) -> (f64, StateDictF64);
}

impl<N: Network> FullBatch for Entropy<'_, N> {
    fn loss_and_gradient_at_full(mut self, m: &StateDictF64) -> (f64, StateDictF64) {
        modelfusion::StochasticGradient::loss_and_gradient_at(&mut self, m, 0).unwrap()
    }
}

/// The entropy's logit gradient agrees with finite differences.
#[test]
fn entropy_gradient_matches_finite_differences() {
    let z = ndarray::array![[0.3f64, -1.2, 2.0], [0.0, 0.0, 0.0], [5.0, 4.9, -3.0]];
    let (h, g) = softmax_entropy(z.view()).unwrap();
    assert!(h > 0.0);
    for i in 0..3 {
        for j in 0..3 {
            let (mut up, mut down) = (z.clone(), z.clone());
            up[[i, j]] += 1e-6;
            down[[i, j]] -= 1e-6;
            let fd = (softmax_entropy(up.view()).unwrap().0
                - softmax_entropy(down.view()).unwrap().0)
                / 2e-6;
            assert!(
                (fd - g[[i, j]]).abs() < 1e-8,
                "[{i}, {j}]: {fd} vs {}",
                g[[i, j]]
            );
        }
    }
}

fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn bad_input_is_a_clear_error() {
    let base = sd(&[0.0, 0.0, 0.0, 0.0]);
    let a = sd(&[1.0, 2.0, 3.0, 4.0]);
    let short = StateDict::from_pairs([
        ("a.w", arr1(&[1.0]).into_dyn()),
        ("b.w", arr1(&[1.0, 2.0]).into_dyn()),
    ])
    .unwrap();
    let renamed = StateDict::from_pairs([
        ("a.w", arr1(&[1.0, 2.0]).into_dyn()),
        ("c.w", arr1(&[1.0, 2.0]).into_dyn()),
    ])
    .unwrap();
    let nan = sd(&[1.0, f64::NAN, 0.0, 0.0]);
    let mut ok = quadratic(sd(&[0.5; 4]));
    let ada = AdaMerging::paper(2).unwrap();

    // AdaMerging.
    assert!(err(ada.merge(&base, &[], &mut ok)).contains("fine-tuned"));
    let e = err(ada.merge(&base, &[&a, &short], &mut ok));
    assert!(e.contains("a.w") && e.contains("member 1"), "{e}");
    assert!(err(ada.merge(&base, &[&renamed], &mut ok)).contains("b.w"));
    assert!(err(ada.merge(&base, &[&nan], &mut ok)).contains("a.w"));
    assert!(err(ada.merge(&nan, &[&a], &mut ok)).contains("base"));
    assert!(err(AdaMerging::new(0, Optimizer::adam(1e-3).unwrap())).contains("steps"));
    let raw = Optimizer::Sgd {
        lr: -1.0,
        momentum: 0.0,
        nesterov: false,
    };
    assert!(err(AdaMerging::new(3, raw)).contains("lr"));
    assert!(err(AdaMerging::paper(3).unwrap().with_init(f64::NAN)).contains("init"));
    assert!(err(AdaMerging::paper(3).unwrap().with_clip(Some((0.5, 0.1)))).contains("clip"));
    let e = err(ada.combine(&base, &[&a], Array2::zeros((2, 1)).view()));
    assert!(
        e.contains("coefficients") && e.contains("[1, 1]") && e.contains("[2, 1]"),
        "{e}"
    );
    assert!(
        err(ada.combine(
            &base,
            &[&a],
            Array2::from_elem((1, 1), f64::INFINITY).view()
        ))
        .contains("finite")
    );
    let mut nan_loss = |_: &StateDictF64, _: usize| Ok((f64::NAN, sd(&[0.0; 4])));
    assert!(err(ada.merge(&base, &[&a], &mut nan_loss)).contains("AdaMerging loss at step 0"));
    let mut bad_grad = |_: &StateDictF64, _: usize| Ok((1.0, short.clone()));
    assert!(err(ada.merge(&base, &[&a], &mut bad_grad)).contains("a.w"));
    let mut nan_grad = |_: &StateDictF64, _: usize| Ok((1.0, nan.clone()));
    assert!(err(ada.merge(&base, &[&a], &mut nan_grad)).contains("gradient"));

    // Learned soup.
    let soup = LearnedSoup::new(2, Optimizer::adam(0.1).unwrap()).unwrap();
    assert!(err(soup.cook(&[], &mut ok)).contains("ingredients"));
    assert!(err(soup.cook(&[&a, &short], &mut ok)).contains("member 1"));
    assert!(err(soup.cook(&[&a, &nan], &mut ok)).contains("member 1"));
    assert!(err(soup.cook(&[&a], &mut nan_loss)).contains("learned soup loss"));
    assert!(err(LearnedSoup::new(0, Optimizer::adam(0.1).unwrap())).contains("steps"));

    // Subspace.
    let line = Subspace::new(StepConfig::new(2, Optimizer::sgd(0.1, 0.0).unwrap()).unwrap());
    assert!(err(line.train(std::slice::from_ref(&a), &mut ok)).contains("two endpoints"));
    assert!(err(line.train::<StateDictF64, _>(&[], &mut ok)).contains("endpoints"));
    assert!(err(line.train(&[a.clone(), short.clone()], &mut ok)).contains("member 1"));
    assert!(err(line.train(&[a.clone(), nan.clone()], &mut ok)).contains("member 1"));
    assert!(
        err(line.train(&[a.clone(), a.clone()], &mut nan_loss)).contains("subspace training loss")
    );
    assert!(err(line.clone().with_points(vec![vec![-0.5, 1.5]])).contains("simplex"));
    assert!(err(line.clone().with_points(vec![vec![f64::NAN, 1.0]])).contains("simplex"));
    let tri = line.clone().with_points(vec![vec![0.2, 0.3, 0.5]]).unwrap();
    assert!(
        err(tri.train(&[a.clone(), a.clone()], &mut ok)).contains("3 coordinates for 2 endpoints")
    );

    // Shared groups and the entropy.
    let groups = ParamGroups::new(&a, Granularity::Layer);
    assert!(err(groups.gradient(&renamed, &[&a])).contains("b.w"));
    assert!(err(groups.scale(&a, arr1(&[1.0]).view())).contains("[1, 2]"));
    assert!(err(softmax_entropy(Array2::<f64>::zeros((0, 3)).view())).contains("empty input"));
    assert!(
        err(softmax_entropy(
            ndarray::array![[1.0, f64::INFINITY]].view()
        ))
        .contains("sample 0")
    );
    let net = Mlp::new(&[4, 3]).unwrap();
    let d = Dataset::new(Array2::zeros((5, 4)), vec![0; 5], 3).unwrap();
    assert!(err(Entropy::new(&net, &d, 0, 0)).contains("batch_size"));
    let wide = Mlp::new(&[5, 3]).unwrap();
    assert!(err(Entropy::new(&wide, &d, 2, 0)).contains("[5, 5]"));
}
