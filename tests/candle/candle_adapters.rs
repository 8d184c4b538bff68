//! The candle adapters: conversions bit for bit, the adapter's loss and gradient against
//! candle's own and against the crate's hand-written MLP, and the crate's algorithms
//! (activation matching, REPAIR, curve fitting) run unchanged on a candle MLP.
#![cfg(feature = "candle")]

use std::collections::HashMap;

use modelfusion::align::{ActivationMatching, Aligner, Repair};
use modelfusion::candle::candle_core::{
    DType, Device, Module, Result as CResult, Tensor, safetensors,
};
use modelfusion::candle::candle_nn::{self, Linear, VarBuilder, VarMap};
use modelfusion::candle::{
    CandleNet, load_varmap, to_state_dict, to_state_dict_from_varmap, to_tensors, to_varmap,
};
use modelfusion::nn::{Classification, Mlp, Network, data};
use modelfusion::path::{Bezier, FitConfig, Optimizer, PathSampler, fit_curve};
use modelfusion::perm::PermutationSet;
use modelfusion::perm::specs::{self, Architecture, MlpShapes};
use modelfusion::{Gradient, Model, Objective, StateDictF32, StateDictF64};

/// The tensors serialised by candle's own safetensors writer: equal bytes mean equal
/// dtypes, shapes and bits.
fn serialised(tensors: &HashMap<String, Tensor>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    safetensors::save(tensors, &path).unwrap();
    std::fs::read(path).unwrap()
}

fn varmap_tensors(vm: &VarMap) -> HashMap<String, Tensor> {
    vm.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

/// A VarMap with one variable of every convertible dtype (floats with negative zero,
/// tiny and large magnitudes).
fn mixed_varmap(dev: &Device) -> VarMap {
    let vm = VarMap::new();
    let values: Vec<f32> = (0..20u16)
        .map(|i| f32::from(i * 37 % 19) * 0.37 - 3.1)
        .collect();
    let base = Tensor::from_vec(values, (4, 5), dev).unwrap();
    let with_edges = Tensor::cat(
        &[
            &base.flatten_all().unwrap(),
            &Tensor::new(&[-0.0f32, 1e-30, 6.0e4, -1e-7], dev).unwrap(),
        ],
        0,
    )
    .unwrap();
    let entries = [
        ("a.f32", with_edges.clone()),
        ("b.f16", with_edges.to_dtype(DType::F16).unwrap()),
        ("c.bf16", with_edges.to_dtype(DType::BF16).unwrap()),
        (
            "d.f64",
            (with_edges.to_dtype(DType::F64).unwrap() / 3.0).unwrap(),
        ),
        ("e.i64", Tensor::new(&[-5i64, 0, 1 << 40], dev).unwrap()),
        ("f.u8", Tensor::new(&[0u8, 7, 255], dev).unwrap()),
        (
            "g.u32",
            Tensor::new(&[[1u32, 2], [3, u32::MAX]], dev).unwrap(),
        ),
        ("h.i32", Tensor::new(&[-1i32, i32::MIN], dev).unwrap()),
        ("i.i16", Tensor::new(&[-7i16, 300], dev).unwrap()),
    ];
    {
        let mut data = vm.data().lock().unwrap();
        for (n, t) in entries {
            data.insert(
                n.to_string(),
                modelfusion::candle::candle_core::Var::from_tensor(&t).unwrap(),
            );
        }
    }
    vm
}

#[test]
fn varmap_round_trip_is_bit_identical() {
    let dev = Device::Cpu;
    let vm = mixed_varmap(&dev);
    let before = serialised(&varmap_tensors(&vm));
    let sd: StateDictF64 = to_state_dict_from_varmap(&vm).unwrap();
    assert_eq!(sd.len(), 4); // float parameters
    assert_eq!(sd.raw_tensors().len(), 5); // integers, carried as bytes
    // Into a fresh VarMap of the same layout (zeros), each variable in its own dtype.
    let fresh = VarMap::new();
    {
        let mut data = fresh.data().lock().unwrap();
        for (n, t) in varmap_tensors(&vm) {
            data.insert(
                n,
                modelfusion::candle::candle_core::Var::from_tensor(&t.zeros_like().unwrap())
                    .unwrap(),
            );
        }
    }
    load_varmap(&fresh, &sd).unwrap();
    assert_eq!(serialised(&varmap_tensors(&fresh)), before);
    // And through plain tensors: f32 state dicts keep F16, BF16 and F32 exactly.
    let no_f64: HashMap<String, Tensor> = varmap_tensors(&vm)
        .into_iter()
        .filter(|(n, _)| n != "d.f64")
        .collect();
    let sd32: StateDictF32 = to_state_dict(&no_f64).unwrap();
    let back = to_varmap(&sd32, DType::F32, &dev).unwrap();
    let mut again = varmap_tensors(&back);
    for (n, t) in &no_f64 {
        let dtype = t.dtype();
        let got = again.remove(n).unwrap().to_dtype(dtype).unwrap();
        again.insert(n.clone(), got);
    }
    assert_eq!(serialised(&again), serialised(&no_f64));
    // An F64 tensor does not narrow silently.
    let e = to_state_dict::<f32>(&varmap_tensors(&vm)).unwrap_err();
    assert!(e.to_string().contains("d.f64"), "{e}");
}

#[test]
fn conversion_errors_name_the_tensor() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    candle_nn::linear(3, 2, vb.pp("fc")).unwrap();
    let sd: StateDictF32 = to_state_dict_from_varmap(&vm).unwrap();
    // A wrong shape, a missing variable, an extra tensor.
    let mut wrong = sd.clone();
    wrong
        .replace(
            "fc.weight",
            ndarray::Array2::<f32>::zeros((3, 3)).into_dyn(),
        )
        .unwrap();
    let e = load_varmap(&vm, &wrong).unwrap_err().to_string();
    assert!(e.contains("fc.weight") && e.contains("[2, 3]"), "{e}");
    let mut missing = sd.clone();
    missing.remove("fc.bias");
    let e = load_varmap(&vm, &missing).unwrap_err().to_string();
    assert!(e.contains("fc.bias"), "{e}");
    let mut extra = sd.clone();
    extra
        .insert("other", ndarray::arr1(&[1.0f32]).into_dyn())
        .unwrap();
    let e = load_varmap(&vm, &extra).unwrap_err().to_string();
    assert!(e.contains("other"), "{e}");
    // The variables are unchanged after a refused load.
    let now: StateDictF32 = to_state_dict_from_varmap(&vm).unwrap();
    assert_eq!(now.max_abs_diff(&sd).unwrap(), 0.0);
    // A model asking for a tensor the state dict lacks.
    let net = CandleNet::new(|vb| candle_nn::linear(3, 2, vb.pp("other")));
    let e = net.build::<f32, Linear>(&sd).unwrap_err().to_string();
    assert!(e.contains("other.weight") || e.contains("other"), "{e}");
    // A loss that is not one value.
    let task = CandleNet::new(|vb| candle_nn::linear(3, 2, vb.pp("fc")))
        .loss(1, |m: &Linear, _| Ok(m.weight().clone()))
        .unwrap();
    let e = Objective::loss(&task, &sd).unwrap_err().to_string();
    assert!(e.contains("[2, 3]"), "{e}");
    assert!(to_tensors(&sd, DType::I64, &dev).is_err());
}

/// A candle MLP with the crate's names: `layers.{i}` linear layers, ReLU between.
#[derive(Clone)]
struct CandleMlp(Vec<Linear>);

impl CandleMlp {
    fn new(sizes: &[usize], vb: VarBuilder) -> CResult<Self> {
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| candle_nn::linear(w[0], w[1], vb.pp(format!("layers.{i}"))))
            .collect::<CResult<_>>()?;
        Ok(CandleMlp(layers))
    }

    /// The logits, and the inputs of every layer (keyed by weight name) and every
    /// hidden layer's post-ReLU features (keyed by group).
    fn run(&self, x: &Tensor) -> CResult<(Tensor, Vec<(String, Tensor)>)> {
        let mut h = x.clone();
        let mut feats = Vec::new();
        let n = self.0.len();
        for (i, l) in self.0.iter().enumerate() {
            feats.push((format!("layers.{i}.weight"), h.clone()));
            h = l.forward(&h)?;
            if i + 1 < n {
                h = h.relu()?;
                feats.push((format!("hidden.{i}"), h.clone()));
            }
        }
        Ok((h, feats))
    }
}

struct Digits {
    x: Vec<Tensor>,
    y: Vec<Tensor>,
}

/// `n` digits in batches of `batch` samples, as candle tensors.
fn digits_batches(n: usize, batch: usize) -> (data::Dataset, Digits) {
    let d = data::digits().unwrap().head(n);
    let dev = Device::Cpu;
    let mut x = Vec::new();
    let mut y = Vec::new();
    for (xb, yb) in d.batches(batch).unwrap() {
        let flat: Vec<f32> = xb.iter().copied().collect();
        x.push(Tensor::from_vec(flat, xb.dim(), &dev).unwrap());
        let labels: Vec<u32> = yb.iter().map(|&c| c as u32).collect();
        y.push(Tensor::new(labels.as_slice(), &dev).unwrap());
    }
    (d, Digits { x, y })
}

#[test]
fn loss_and_gradient_equal_candles_own_and_the_crates_mlp() {
    let sizes = [64, 24, 16, 10];
    let (d, batches) = digits_batches(120, 40);
    let nb = batches.x.len();
    let net = Mlp::new(&sizes).unwrap();
    let params: StateDictF64 = net.init(3);
    let data = std::sync::Arc::new(batches);
    let task = {
        let data = data.clone();
        CandleNet::new(move |vb| CandleMlp::new(&sizes, vb))
            .loss(nb, move |m: &CandleMlp, b: usize| {
                let x = data.x[b].to_dtype(m.0[0].weight().dtype())?;
                let logits = m.run(&x)?.0;
                candle_nn::loss::cross_entropy(&logits, &data.y[b])
            })
            .unwrap()
    };
    let (loss, grad) = task.loss_and_gradient(&params).unwrap();
    assert!((loss - Objective::loss(&task, &params).unwrap()).abs() < 1e-12);

    // Candle's own: the model on a VarMap holding the same values, backward per batch.
    let vm = to_varmap(&params, DType::F64, &Device::Cpu).unwrap();
    let model = CandleMlp::new(
        &sizes,
        VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
    )
    .unwrap();
    let mut own_loss = 0.0;
    let mut own: HashMap<String, Tensor> = HashMap::new();
    for b in 0..nb {
        let l = candle_nn::loss::cross_entropy(
            &model
                .run(&data.x[b].to_dtype(DType::F64).unwrap())
                .unwrap()
                .0,
            &data.y[b],
        )
        .unwrap();
        own_loss += l.to_scalar::<f64>().unwrap() / nb as f64;
        let g = l.backward().unwrap();
        for (name, var) in vm.data().lock().unwrap().iter() {
            let gi = (g.get(var.as_tensor()).unwrap() / nb as f64).unwrap();
            let acc = match own.remove(name) {
                Some(a) => (a + gi).unwrap(),
                None => gi,
            };
            own.insert(name.clone(), acc);
        }
    }
    assert!((loss - own_loss).abs() < 1e-12, "{loss} vs {own_loss}");
    let own: StateDictF64 = to_state_dict(&own).unwrap();
    assert!(grad.max_abs_diff(&own).unwrap() < 1e-12);

    // The crate's hand-written MLP (its own forward and backward passes) agrees too.
    let crate_task = Classification::new(&net, &d, 40).unwrap();
    let (crate_loss, crate_grad) = crate_task.loss_and_gradient(&params).unwrap();
    assert!((loss - crate_loss).abs() < 1e-10, "{loss} vs {crate_loss}");
    let scale = crate_grad.norm();
    assert!(grad.max_abs_diff(&crate_grad).unwrap() < 1e-9 * scale.max(1.0));

    // In f32 the adapter works the same way (gradient in f32).
    let p32: StateDictF32 = params.cast();
    let (l32, g32) = task.loss_and_gradient(&p32).unwrap();
    assert!((l32 - loss).abs() < 1e-4);
    assert!(
        g32.cast::<ndarray::ArrayD<f64>>()
            .max_abs_diff(&grad)
            .unwrap()
            < 1e-4
    );
}

#[test]
fn activation_matching_and_repair_run_on_a_candle_mlp() {
    let sizes = [64, 32, 32, 10];
    let (_, batches) = digits_batches(300, 100);
    let nb = batches.x.len();
    let data = std::sync::Arc::new(batches);
    let features = |data: std::sync::Arc<Digits>| {
        CandleNet::new(move |vb| CandleMlp::new(&sizes, vb))
            .features(nb, move |m: &CandleMlp, b| Ok(m.run(&data.x[b])?.1))
            .unwrap()
    };
    let arch = MlpShapes::new(&sizes).unwrap();
    let spec = specs::mlp(2);
    let a = arch.random_model(0);
    // Activation matching undoes a planted permutation exactly.
    let planted = PermutationSet::random(&spec, &a, 11).unwrap();
    let b = spec.apply(&planted, &a).unwrap();
    let al = ActivationMatching::new(features(data.clone()))
        .align(&a, &b, &spec)
        .unwrap();
    assert_eq!(al.apply(&spec, &b).unwrap().max_abs_diff(&a).unwrap(), 0.0);
    // REPAIR (layer inputs keyed by weight name, from the same closure) restores the
    // interpolation of the endpoints' standard deviations.
    let other = arch.random_model(1);
    let mid = a.lerp(&other, 0.5).unwrap();
    let (_, report) = Repair::new(features(data))
        .repair(&a, &other, &mid, 0.5, &spec)
        .unwrap();
    assert_eq!(report.repaired, ["hidden.0", "hidden.1"]);
    assert!(report.std_ratio_before["hidden.1"] < 0.95, "{report:?}");
    let last = report.std_ratio_after["hidden.1"];
    assert!((last - 1.0).abs() < 1e-3, "{report:?}");
}

#[test]
fn curve_fitting_runs_on_a_candle_mlp() {
    let sizes = [64, 16, 10];
    let (_, batches) = digits_batches(200, 100);
    let nb = batches.x.len();
    let data = std::sync::Arc::new(batches);
    let task = CandleNet::new(move |vb| CandleMlp::new(&sizes, vb))
        .loss(nb, move |m: &CandleMlp, b| {
            candle_nn::loss::cross_entropy(&m.run(&data.x[b])?.0, &data.y[b])
        })
        .unwrap();
    let arch = MlpShapes::new(&sizes).unwrap();
    let (a, b) = (arch.random_model(0), arch.random_model(1));
    let curve = Bezier::straight(&a, &b, 3).unwrap();
    let mid_before = Objective::loss(&task, &a.lerp(&b, 0.5).unwrap()).unwrap();
    let cfg = FitConfig::new(60, Optimizer::adam(0.01).unwrap())
        .unwrap()
        .with_seed(0);
    let fit = fit_curve(&curve, &task, &cfg, modelfusion::progress::Silent).unwrap();
    assert_eq!(fit.history.len(), 60);
    let mid_after = Objective::loss(&task, &fit.curve.point(0.5).unwrap()).unwrap();
    assert!(mid_after < mid_before, "{mid_before} -> {mid_after}");
}
