//! The reference networks: gradients against finite differences, permutation
//! invariance, features, and errors on bad input.
#![cfg(feature = "nn")]

use crate::nn_common;

use modelfusion::nn::{Architecture, Classification, Mlp, Mode, Network, ResMlp};
use modelfusion::{
    Activations, Error, Gradient, Model, Objective, StateDict, StateDictF32, StateDictF64,
};
use ndarray::{Array2, ArrayD};
use nn_common::*;
use proptest::prelude::*;

/// Compares `grad` with central finite differences of `loss` (in f64) for every element
/// of every parameter not `skip`ped; skipped parameters must have zero gradient.
/// Returns the number of elements checked.
fn check_against_finite_differences(
    params: &StateDictF64,
    grad: &StateDictF64,
    loss: impl Fn(&StateDictF64) -> f64,
    skip: impl Fn(&str) -> bool,
    what: &str,
) -> usize {
    assert_eq!(
        grad.names().collect::<Vec<_>>(),
        params.names().collect::<Vec<_>>()
    );
    let h = 1e-6;
    let mut checked = 0;
    for name in params.names() {
        let g = grad.get(name).unwrap();
        if skip(name) {
            assert!(g.iter().all(|&v| v == 0.0), "buffer {name} has a gradient");
            continue;
        }
        for idx in 0..g.len() {
            let mut plus = params.clone();
            let mut minus = params.clone();
            plus.get_mut(name).unwrap().as_slice_mut().unwrap()[idx] += h;
            minus.get_mut(name).unwrap().as_slice_mut().unwrap()[idx] -= h;
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * h);
            let analytic = g.as_slice().unwrap()[idx];
            assert!(
                (numeric - analytic).abs() < 1e-6 * (1.0 + numeric.abs()),
                "{name}[{idx}] ({what}): numeric {numeric}, analytic {analytic}"
            );
            checked += 1;
        }
    }
    checked
}

/// Checks the gradient of `net`'s mean loss on a random batch.
fn check_batch_gradient<N: Network>(net: &N, params: &StateDictF64, mode: Mode) {
    let x = random_batch::<f64>(7, net.input_dim(), 11);
    let labels: Vec<usize> = (0..7).map(|i| i % net.num_classes()).collect();
    let batch = |p: &StateDictF64| {
        net.batch_loss_and_gradient(p, x.view(), &labels, mode)
            .unwrap()
    };
    let grad = batch(params).gradient;
    let checked = check_against_finite_differences(
        params,
        &grad,
        |p| batch(p).loss,
        |n| net.is_buffer(n),
        &format!("{mode:?}"),
    );
    assert!(checked >= 15, "{checked}");
}

#[test]
fn mlp_gradient_matches_finite_differences() {
    let (mlp, _) = nets();
    check_batch_gradient(&mlp, &mlp.init(3), Mode::Eval);
    let single = Mlp::new(&[4, 3]).unwrap(); // no hidden layer
    check_batch_gradient(&single, &single.init(1), Mode::Eval);
}

#[test]
fn res_mlp_gradient_matches_finite_differences_in_both_modes() {
    let (_, res) = nets();
    let mut params: StateDictF64 = res.init(5);
    randomise_running_stats(&res, &mut params, 9);
    check_batch_gradient(&res, &params, Mode::Train);
    check_batch_gradient(&res, &params, Mode::Eval);
}

#[test]
fn dataset_gradient_matches_finite_differences() {
    // Several batches of unequal size: the data-set gradient is the size-weighted mean.
    let (mlp, res) = nets();
    let data = random_dataset(11, 5, 3, 2);
    let mut rp: StateDictF64 = res.init(1);
    randomise_running_stats(&res, &mut rp, 4);
    let task_m = Classification::new(&mlp, &data, 4).unwrap();
    let task_r = Classification::new(&res, &data, 4).unwrap();
    fn check<O: Gradient<StateDictF64>>(
        task: &O,
        params: &StateDictF64,
        skip: &dyn Fn(&str) -> bool,
    ) {
        let (loss, grad) = task.loss_and_gradient(params).unwrap();
        assert!((loss - task.loss(params).unwrap()).abs() < 1e-12);
        check_against_finite_differences(
            params,
            &grad,
            |p| task.loss(p).unwrap(),
            skip,
            "data set",
        );
    }
    check(&task_m, &mlp.init(0), &|_| false);
    check(&task_r, &rp, &|n| res.is_buffer(n));
    check(&task_r.clone().with_mode(Mode::Train), &rp, &|n| {
        res.is_buffer(n)
    });
}

#[test]
fn init_is_seeded_and_pytorch_like() {
    let net = Mlp::new(&[100, 50, 10]).unwrap();
    let a: StateDictF32 = net.init(1);
    assert_eq!(a, net.init(1));
    assert_ne!(a, net.init(2));
    let w = a.get("layers.0.weight").unwrap();
    let bound = 1.0 / 10.0; // 1 / sqrt(fan_in = 100)
    assert!(w.iter().all(|v| v.abs() <= bound));
    assert!(w.iter().any(|v| v.abs() > 0.9 * bound));
    // f32 and f64 initialisations agree up to rounding.
    let b: StateDictF64 = net.init(1);
    assert!(a.cast::<ArrayD<f64>>().max_abs_diff(&b).unwrap() < 1e-7);
    let res = ResMlp::new(4, 3, 5, 1, 2).unwrap();
    let r: StateDictF32 = res.init(0);
    assert_eq!(
        r.get("blocks.0.norm.running_var")
            .unwrap()
            .iter()
            .sum::<f32>(),
        3.0
    );
    assert_eq!(
        r.get("blocks.0.norm.weight").unwrap().iter().sum::<f32>(),
        3.0
    );
    assert_eq!(
        r.names().collect::<Vec<_>>(),
        res.shapes()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
    );
}

fn perm_strategy(n: usize) -> impl Strategy<Value = Vec<usize>> {
    Just((0..n).collect::<Vec<usize>>()).prop_shuffle()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn permuting_mlp_hidden_units_keeps_outputs(
        p0 in perm_strategy(7), p1 in perm_strategy(6), seed in 0u64..1000,
    ) {
        let (mlp, _) = nets();
        let params: StateDictF32 = mlp.init(seed);
        let permuted = permute(&permute(&params, &mlp_group_axes(&mlp, 0), &p0), &mlp_group_axes(&mlp, 1), &p1);
        prop_assert!(permuted.max_abs_diff(&params).unwrap() > 0.0);
        let x = random_batch::<f32>(9, 5, seed);
        let (a, ca) = mlp.forward(&params, x.view(), Mode::Eval).unwrap();
        let (b, cb) = mlp.forward(&permuted, x.view(), Mode::Eval).unwrap();
        prop_assert!(max_diff(&a, &b) < 1e-5);
        // The features of group hidden.i are permuted by p_i.
        let (fa, fb) = (mlp.group_features(&ca), mlp.group_features(&cb));
        let fa0 = fa["hidden.0"].select(ndarray::Axis(1), &p0);
        prop_assert!(max_diff(&fa0, &fb["hidden.0"]) < 1e-5);
        let fa1 = fa["hidden.1"].select(ndarray::Axis(1), &p1);
        prop_assert!(max_diff(&fa1, &fb["hidden.1"]) < 1e-5);
    }

    #[test]
    fn permuting_res_mlp_channels_keeps_outputs(
        pr in perm_strategy(6), ph0 in perm_strategy(8), ph1 in perm_strategy(8), seed in 0u64..1000,
    ) {
        let (_, res) = nets();
        let mut params: StateDictF32 = res.init(seed);
        randomise_running_stats(&res, &mut params, seed + 1);
        let mut permuted = permute(&params, &res_mlp_group_axes(&res, None), &pr);
        permuted = permute(&permuted, &res_mlp_group_axes(&res, Some(0)), &ph0);
        permuted = permute(&permuted, &res_mlp_group_axes(&res, Some(1)), &ph1);
        let x = random_batch::<f32>(9, 5, seed);
        for mode in [Mode::Eval, Mode::Train] {
            let (a, ca) = res.forward(&params, x.view(), mode).unwrap();
            let (b, cb) = res.forward(&permuted, x.view(), mode).unwrap();
            prop_assert!(max_diff(&a, &b) < 1e-5, "{:?}: {}", mode, max_diff(&a, &b));
            let (fa, fb) = (res.group_features(&ca), res.group_features(&cb));
            let fr = fa["residual"].select(ndarray::Axis(1), &pr);
            prop_assert!(max_diff(&fr, &fb["residual"]) < 1e-5);
            let fh = fa["blocks.1.hidden"].select(ndarray::Axis(1), &ph1);
            prop_assert!(max_diff(&fh, &fb["blocks.1.hidden"]) < 1e-5);
        }
    }
}

#[test]
fn group_features_and_layer_inputs_have_documented_keys_and_shapes() {
    let (mlp, res) = nets();
    let data = random_dataset(10, 5, 3, 0);
    let pm: StateDictF32 = mlp.init(0);
    let pr: StateDictF32 = res.init(0);
    let tm = Classification::new(&mlp, &data, 4).unwrap();
    let tr = Classification::new(&res, &data, 4).unwrap();
    assert_eq!(Activations::<StateDictF32>::num_batches(&tm), 3);
    assert_eq!(tm.num_batches(), 3);
    let f = tm.activations(&pm, 2).unwrap(); // last batch: 2 samples
    let keys: Vec<_> = f.keys().cloned().collect();
    assert_eq!(keys, vec!["hidden.0", "hidden.1"]);
    assert_eq!(f["hidden.1"].dim(), (2, 6));
    assert!(f["hidden.0"].iter().all(|&v| v >= 0.0)); // post-ReLU
    // Group keys match the network's groups.
    let group_names: Vec<String> = res.groups().into_iter().map(|(n, _)| n).collect();
    let fr = tr.activations(&pr, 0).unwrap();
    let mut sorted = group_names.clone();
    sorted.sort();
    assert_eq!(fr.keys().cloned().collect::<Vec<_>>(), sorted);
    assert_eq!(fr["residual"].dim(), (4 * 3, 6)); // stream after stem and 2 blocks
    assert_eq!(fr["blocks.0.hidden"].dim(), (4, 8));
    // Layer inputs: one per weight, the input of that layer.
    let li = tm.layer_inputs().activations(&pm, 0).unwrap();
    assert_eq!(
        li.keys().cloned().collect::<Vec<_>>(),
        vec!["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    );
    let (x, _) = data.batch(0, 4).unwrap();
    assert_eq!(li["layers.0.weight"], x.to_owned());
    assert_eq!(li["layers.1.weight"], f_of(&tm, &pm, 0, "hidden.0"));
    let lr = tr.layer_inputs().activations(&pr, 0).unwrap();
    let weights: Vec<String> = res
        .shapes()
        .into_iter()
        .filter(|(_, s)| s.len() == 2)
        .map(|(n, _)| n)
        .collect();
    let mut sorted = weights;
    sorted.sort();
    assert_eq!(lr.keys().cloned().collect::<Vec<_>>(), sorted);
    for (name, feats) in &lr {
        let in_dim = res.shapes().into_iter().find(|(n, _)| n == name).unwrap().1[1];
        assert_eq!(feats.dim(), (4, in_dim), "{name}");
    }
}

fn f_of(task: &Classification<'_, Mlp>, p: &StateDictF32, b: usize, key: &str) -> Array2<f32> {
    task.activations(p, b).unwrap()[key].clone()
}

#[test]
fn logits_error_rate_and_softmax() {
    let (mlp, _) = nets();
    let data = random_dataset(10, 5, 3, 1);
    let p: StateDictF32 = mlp.init(0);
    let task = Classification::new(&mlp, &data, 3).unwrap();
    let z = task.logits(&p).unwrap();
    assert_eq!(z.dim(), (10, 3));
    assert_eq!(z, mlp.logits(&p, data.x().view()).unwrap());
    let pred = modelfusion::nn::predict(z.view());
    let acc = pred.iter().zip(data.y()).filter(|(a, b)| a == b).count() as f64 / 10.0;
    assert_eq!(task.accuracy(&p).unwrap(), acc);
    assert!((task.error_rate().loss(&p).unwrap() - (1.0 - acc)).abs() < 1e-12);
    let probs = modelfusion::nn::softmax(z.view());
    for row in probs.rows() {
        assert!((row.sum() - 1.0).abs() < 1e-6);
    }
    // Mean cross-entropy equals -mean log p(label).
    let ce: f64 = probs
        .rows()
        .into_iter()
        .zip(data.y())
        .map(|(r, &l)| -(r[l] as f64).ln())
        .sum::<f64>()
        / 10.0;
    assert!((task.loss(&p).unwrap() - ce).abs() < 1e-5);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let (mlp, res) = nets();
    let p: StateDictF32 = mlp.init(0);
    // Wrong input width.
    let x = Array2::<f32>::zeros((4, 6));
    let e = mlp.forward(&p, x.view(), Mode::Eval).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }));
    assert!(
        e.to_string().contains("[4, 5]") && e.to_string().contains("[4, 6]"),
        "{e}"
    );
    // Empty batch.
    assert!(matches!(
        mlp.forward(&p, Array2::<f32>::zeros((0, 5)).view(), Mode::Eval),
        Err(Error::Empty { .. })
    ));
    // Label out of range.
    let x = Array2::<f32>::zeros((2, 5));
    let e = mlp
        .batch_loss_and_gradient(&p, x.view(), &[0, 3], Mode::Eval)
        .unwrap_err();
    assert!(e.to_string().contains("label 3"), "{e}");
    // Wrong number of labels.
    assert!(
        mlp.batch_loss_and_gradient(&p, x.view(), &[0], Mode::Eval)
            .is_err()
    );
    // Missing parameter.
    let missing: StateDictF32 = StateDict::from_pairs(
        p.iter()
            .filter(|(n, _)| *n != "layers.1.bias")
            .map(|(n, t)| (n, t.clone())),
    )
    .unwrap();
    let e = mlp.forward(&missing, x.view(), Mode::Eval).unwrap_err();
    assert!(
        matches!(e, Error::MissingParam { ref name, .. } if name == "layers.1.bias"),
        "{e}"
    );
    // Wrong shape.
    let mut wrong = p.clone();
    wrong
        .replace("layers.2.weight", ArrayD::zeros(vec![3, 7]))
        .unwrap();
    let e = mlp
        .forward(&wrong, x.view(), Mode::Eval)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layers.2.weight") && e.contains("[3, 6]") && e.contains("[3, 7]"),
        "{e}"
    );
    // Extra parameter.
    let mut extra = p.clone();
    extra
        .insert("layers.9.weight", ArrayD::zeros(vec![1]))
        .unwrap();
    let e = mlp.check_params(&extra).unwrap_err().to_string();
    assert!(e.contains("layers.9.weight"), "{e}");
    // A ResMlp's params do not fit the MLP.
    let rp: StateDictF32 = res.init(0);
    assert!(mlp.check_params(&rp).is_err());
    // A batch of one sample cannot use batch statistics.
    let e = res
        .forward(&rp, Array2::<f32>::zeros((1, 5)).view(), Mode::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 2"), "{e}");
    // A data set with the wrong width or too many classes.
    let data = random_dataset(6, 4, 3, 0);
    assert!(Classification::new(&mlp, &data, 2).is_err());
    let data = random_dataset(6, 5, 3, 0);
    assert!(Classification::new(&mlp, &data, 0).is_err());
    let many = modelfusion::nn::Dataset::new(data.x().clone(), data.y().to_vec(), 4).unwrap();
    assert!(Classification::new(&mlp, &many, 2).is_err());
    // NaN parameters give an error, not a NaN loss.
    let mut nan = p.clone();
    nan.get_mut("layers.0.bias").unwrap()[[0]] = f32::NAN;
    let task = Classification::new(&mlp, &data, 2).unwrap();
    assert!(task.loss(&nan).is_err());
    // Architecture errors.
    assert!(Mlp::new(&[3]).is_err());
    assert!(ResMlp::new(3, 4, 0, 1, 2).is_err());
}

#[test]
fn results_do_not_depend_on_the_number_of_threads() {
    let (_, res) = nets();
    let data = random_dataset(50, 5, 3, 3);
    let mut p: StateDictF32 = res.init(0);
    randomise_running_stats(&res, &mut p, 2);
    let task = Classification::new(&res, &data, 4).unwrap();
    let run = || {
        let (loss, grad) = task.loss_and_gradient(&p).unwrap();
        (loss, grad, task.logits(&p).unwrap())
    };
    let parallel = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
        .install(run);
    let serial = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(run);
    assert_eq!(parallel.0.to_bits(), serial.0.to_bits());
    assert_eq!(parallel.1, serial.1);
    assert_eq!(parallel.2, serial.2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// By convexity of -ln, the ensemble's loss is at most the mean of its members'.
    #[test]
    fn ensemble_loss_is_at_most_the_mean_member_loss(s1 in 0u64..1000, s2 in 0u64..1000) {
        let (mlp, _) = nets();
        let data = random_dataset(20, 5, 3, s1 ^ s2);
        let task = Classification::new(&mlp, &data, 8).unwrap();
        let (a, b): (StateDictF64, StateDictF64) = (mlp.init(s1), mlp.init(s2));
        let ens = task.evaluate_ensemble(&[&a, &b]).unwrap();
        let mean = 0.5 * (task.loss(&a).unwrap() + task.loss(&b).unwrap());
        prop_assert!(ens.loss <= mean + 1e-12, "{} > {}", ens.loss, mean);
    }
}
