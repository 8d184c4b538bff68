//! Adapters for [candle](https://github.com/huggingface/candle) models (feature `candle`).
//!
//! Two halves:
//! - **Conversions** between a [`StateDict`] and candle's `VarMap` or
//!   `HashMap<String, candle_core::Tensor>`, under the names candle's `VarBuilder` uses
//!   (`vb.pp("layer1").pp(0)` reads `layer1.0.weight`, the PyTorch `state_dict` names).
//!   Float tensors (F16, BF16, F32, F64) become the state dict's element type and go
//!   back to their own dtype, bit for bit (an F64 tensor needs a `StateDict<ArrayD<f64>>`:
//!   narrowing it to `f32` is refused); integer tensors (U8, U32, I16, I32, I64) are
//!   carried as [`RawTensor`]s, byte for byte.
//! - **Adapters** ([`CandleNet`]) that turn a candle model, given as the closure that
//!   builds it from a `VarBuilder`, into an [`Objective`](crate::Objective) and a
//!   [`Gradient`](crate::Gradient) (candle's autograd) with [`CandleNet::loss`], and into
//!   an [`Activations`](crate::Activations) source with [`CandleNet::features`]. Curve
//!   fitting, barriers, activation matching, REPAIR, soups and Fisher then run on candle
//!   models unchanged.
//!
//! - **Models**: the crate's ready convolutional architectures as candle networks
//!   ([`CandleResNet`], [`CandleVgg`]) under their specs' names, with the taps the
//!   data-driven algorithms read ([`Taps`]).
//!
//! `candle_core` and `candle_nn` are re-exported so that user code names the versions
//! this crate was built with.
//!
//! ```
//! use modelfusion::candle::{candle_core::{DType, Device}, candle_nn, to_state_dict_from_varmap, load_varmap};
//! use modelfusion::{Model, StateDictF32};
//!
//! let varmap = candle_nn::VarMap::new();
//! let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let _layer = candle_nn::linear(3, 2, vb.pp("fc"))?;
//! let sd: StateDictF32 = to_state_dict_from_varmap(&varmap)?;
//! assert_eq!(sd.names().collect::<Vec<_>>(), ["fc.bias", "fc.weight"]);
//! let doubled = sd.scale(2.0)?;
//! load_varmap(&varmap, &doubled)?; // back into the model's own variables
//! let back: StateDictF32 = to_state_dict_from_varmap(&varmap)?;
//! assert_eq!(back.max_abs_diff(&doubled)?, 0.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod adapter;
mod models;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor as CTensor, Var, WithDType};
use candle_nn::VarMap;
use ndarray::ArrayD;

pub use adapter::{CandleActivations, CandleLoss, CandleNet};
pub use candle_core;
pub use candle_nn;
/// candle-transformers' model implementations (feature `candle-transformers`), the
/// version this crate was built with. [`CandleNet::build`] evaluates a state dict through
/// any of them; `tests/candle/candle_transformers.rs` checks the inferred specs on LLaMA,
/// Mistral, Qwen2, BERT, RoBERTa, DistilBERT, ViT and ResNet this way.
///
/// ```
/// use modelfusion::candle::candle_core::{DType, Device, Module, Tensor};
/// use modelfusion::candle::candle_nn::{VarBuilder, VarMap};
/// use modelfusion::candle::candle_transformers::models::resnet;
/// use modelfusion::candle::{CandleNet, to_state_dict_from_varmap};
/// use modelfusion::perm::{PermutationSet, infer::infer_model_spec};
/// use modelfusion::StateDictF32;
///
/// // torchvision's ResNet-18 names, as candle-transformers builds them.
/// let vm = VarMap::new();
/// resnet::resnet18(10, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// let params: StateDictF32 = to_state_dict_from_varmap(&vm)?;
/// let spec = infer_model_spec(&params, None)?.spec;
/// let permuted = spec.apply(&PermutationSet::random(&spec, &params, 0)?, &params)?;
///
/// let net = CandleNet::new(|vb| resnet::resnet18(10, vb));
/// let x = Tensor::ones((1, 3, 32, 32), DType::F32, &Device::Cpu)?;
/// let y: Vec<f32> = net.build(&params)?.forward(&x)?.flatten_all()?.to_vec1()?;
/// let z: Vec<f32> = net.build(&permuted)?.forward(&x)?.flatten_all()?.to_vec1()?;
/// let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
/// assert!(y.iter().zip(&z).all(|(a, b)| (a - b).abs() <= 1e-5 * scale));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[cfg(feature = "candle-transformers")]
pub use candle_transformers;
pub use models::{CandleResNet, CandleVgg, Taps};

use crate::dtype::{Dtype, RawTensor};
use crate::error::{Error, Result};
use crate::model::{Model, StateDict};
use crate::tensor::Scalar;

/// The float types a candle tensor converts to and from: `f32` and `f64`.
///
/// ```
/// use modelfusion::candle::{candle_core::DType, CandleScalar};
/// assert_eq!(<f32 as CandleScalar>::candle_dtype(), DType::F32);
/// ```
pub trait CandleScalar: Scalar + WithDType {
    /// The candle dtype of `Self`.
    fn candle_dtype() -> DType {
        <Self as WithDType>::DTYPE
    }
}

impl CandleScalar for f32 {}
impl CandleScalar for f64 {}

/// An error from candle, naming what was being done.
pub(crate) fn candle_error(
    what: impl std::fmt::Display,
) -> impl FnOnce(candle_core::Error) -> Error {
    move |e| {
        // Without the backtrace candle appends when `RUST_BACKTRACE` is set.
        let text = e.to_string();
        let message = text.split("\n   0: ").next().unwrap_or_default().trim_end();
        Error::Objective(format!("candle, {what}: {message}"))
    }
}

/// The crate's dtype of a candle integer dtype (the ones carried as raw bytes).
fn raw_dtype(d: DType) -> Option<Dtype> {
    Some(match d {
        DType::U8 => Dtype::U8,
        DType::U32 => Dtype::U32,
        DType::I16 => Dtype::I16,
        DType::I32 => Dtype::I32,
        DType::I64 => Dtype::I64,
        _ => return None,
    })
}

/// The candle dtype of a raw tensor's dtype, where candle has one.
fn candle_raw_dtype(d: Dtype) -> Option<DType> {
    [DType::U8, DType::U32, DType::I16, DType::I32, DType::I64]
        .into_iter()
        .find(|&c| raw_dtype(c) == Some(d))
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

fn le_bytes<D: WithDType>(
    t: &CTensor,
    bytes: impl Fn(D) -> Vec<u8>,
) -> candle_core::Result<Vec<u8>> {
    Ok(t.flatten_all()?
        .to_vec1::<D>()?
        .into_iter()
        .flat_map(bytes)
        .collect())
}

/// One candle tensor as a float array (`Ok(Ok(..))`) or raw integer bytes (`Ok(Err(..))`).
fn convert_one<T: CandleScalar>(
    name: &str,
    t: &CTensor,
) -> Result<std::result::Result<ArrayD<T>, RawTensor>> {
    let shape = t.dims().to_vec();
    let dtype = t.dtype();
    if is_float(dtype) {
        if dtype == DType::F64 && T::candle_dtype() != DType::F64 {
            return Err(Error::invalid(
                name,
                "an F64 tensor would lose precision in an f32 state dict; convert into a StateDict<ArrayD<f64>>",
            ));
        }
        return Ok(Ok(to_array(t, &format!("tensor `{name}`"))?));
    }
    let raw = raw_dtype(dtype).ok_or_else(|| Error::Unsupported {
        what: format!("tensor `{name}` of candle dtype {dtype:?}"),
        reason: "only F16, BF16, F32, F64 and the integer dtypes U8, U32, I16, I32, I64 convert"
            .into(),
    })?;
    let bytes = match dtype {
        DType::U8 => le_bytes::<u8>(t, |v| vec![v]),
        DType::U32 => le_bytes::<u32>(t, |v| v.to_le_bytes().to_vec()),
        DType::I16 => le_bytes::<i16>(t, |v| v.to_le_bytes().to_vec()),
        DType::I32 => le_bytes::<i32>(t, |v| v.to_le_bytes().to_vec()),
        _ => le_bytes::<i64>(t, |v| v.to_le_bytes().to_vec()),
    }
    .map_err(candle_error(format_args!("reading tensor `{name}`")))?;
    Ok(Err(RawTensor::new(raw, shape, bytes)?))
}

/// A state dict from named candle tensors, in name order (a `HashMap` has none). Float
/// tensors become `T` (exactly: F16 and BF16 widen, F64 needs `T = f64`); integer
/// tensors are carried as [`RawTensor`]s. Errors name the tensor.
///
/// ```
/// use std::collections::HashMap;
/// use modelfusion::candle::{candle_core::{DType, Device, Tensor}, to_state_dict};
/// use modelfusion::{Model, StateDictF32};
/// let dev = Device::Cpu;
/// let tensors = HashMap::from([
///     ("w".to_string(), Tensor::new(&[1.5f32, -2.0], &dev)?.to_dtype(DType::BF16)?),
///     ("steps".to_string(), Tensor::new(&[7i64], &dev)?),
/// ]);
/// let sd: StateDictF32 = to_state_dict(&tensors)?;
/// assert_eq!(sd.get("w").unwrap().as_slice().unwrap(), &[1.5, -2.0]);
/// assert_eq!(sd.raw("steps").unwrap().bytes(), &7i64.to_le_bytes());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn to_state_dict<T: CandleScalar>(
    tensors: &HashMap<String, CTensor>,
) -> Result<StateDict<ArrayD<T>>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut sd = StateDict::new();
    for name in names {
        match convert_one::<T>(name, &tensors[name])? {
            Ok(a) => sd.insert(name.clone(), a)?,
            Err(raw) => sd.insert_raw(name.clone(), raw)?,
        }
    }
    Ok(sd)
}

/// A state dict from the variables of a `VarMap`, as [`to_state_dict`].
///
/// ```
/// use modelfusion::candle::{candle_core::{DType, Device}, candle_nn, to_state_dict_from_varmap};
/// use modelfusion::{Model, StateDictF32};
/// let vm = candle_nn::VarMap::new();
/// let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// candle_nn::conv2d(1, 4, 3, Default::default(), vb.pp("conv"))?;
/// let sd: StateDictF32 = to_state_dict_from_varmap(&vm)?;
/// assert_eq!(sd.get("conv.weight").unwrap().shape(), &[4, 1, 3, 3]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn to_state_dict_from_varmap<T: CandleScalar>(varmap: &VarMap) -> Result<StateDict<ArrayD<T>>> {
    let tensors: HashMap<String, CTensor> = lock(varmap)?
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    to_state_dict(&tensors)
}

fn lock(varmap: &VarMap) -> Result<std::sync::MutexGuard<'_, HashMap<String, Var>>> {
    varmap.data().lock().map_err(|_| {
        Error::invalid(
            "varmap",
            "its lock is poisoned (a thread panicked holding it)",
        )
    })
}

/// One state-dict float tensor as a candle tensor of `dtype` on `device`.
fn float_tensor<T: CandleScalar>(
    name: &str,
    a: &ArrayD<T>,
    dtype: DType,
    device: &Device,
) -> Result<CTensor> {
    let data: Vec<T> = a.iter().copied().collect();
    CTensor::from_vec(data, a.shape(), device)
        .and_then(|t| t.to_dtype(dtype))
        .map_err(candle_error(format_args!("building tensor `{name}`")))
}

/// One raw tensor as a candle tensor of its own dtype.
fn raw_tensor(name: &str, r: &RawTensor, device: &Device) -> Result<CTensor> {
    let dtype = candle_raw_dtype(r.dtype()).ok_or_else(|| Error::Unsupported {
        what: format!("tensor `{name}` of dtype {}", r.dtype()),
        reason: "candle has no such dtype (U8, U32, I16, I32 and I64 convert)".into(),
    })?;
    CTensor::from_raw_buffer(r.bytes(), dtype, r.shape(), device)
        .map_err(candle_error(format_args!("building tensor `{name}`")))
}

fn check_float_dtype(dtype: DType) -> Result<()> {
    if is_float(dtype) {
        Ok(())
    } else {
        Err(Error::invalid(
            "dtype",
            format!("{dtype:?} is not a float dtype (F16, BF16, F32, F64)"),
        ))
    }
}

/// Named candle tensors from a state dict: float parameters as `dtype` (a float dtype)
/// on `device`, raw tensors in their own dtype.
///
/// ```
/// use modelfusion::candle::{candle_core::{DType, Device}, to_tensors};
/// use modelfusion::StateDict;
/// let sd = StateDict::from_pairs([("w", ndarray::arr1(&[0.5f32, 1.0]).into_dyn())])?;
/// let ts = to_tensors(&sd, DType::F16, &Device::Cpu)?;
/// assert_eq!(ts["w"].dtype(), DType::F16);
/// assert!(to_tensors(&sd, DType::U8, &Device::Cpu).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn to_tensors<T: CandleScalar>(
    sd: &StateDict<ArrayD<T>>,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, CTensor>> {
    check_float_dtype(dtype)?;
    let mut out = HashMap::with_capacity(sd.len() + sd.raw_tensors().len());
    for (name, a) in sd.iter() {
        out.insert(name.to_string(), float_tensor(name, a, dtype, device)?);
    }
    for (name, r) in sd.raw_tensors() {
        out.insert(name.to_string(), raw_tensor(name, r, device)?);
    }
    Ok(out)
}

/// A new `VarMap` holding the state dict, as [`to_tensors`] converts it.
///
/// ```
/// use modelfusion::candle::{candle_core::{DType, Device}, candle_nn, to_varmap};
/// use modelfusion::StateDict;
/// let sd = StateDict::from_pairs([("fc.weight", ndarray::Array2::<f32>::eye(2).into_dyn()),
///                                 ("fc.bias", ndarray::arr1(&[0.0f32, 1.0]).into_dyn())])?;
/// let vm = to_varmap(&sd, DType::F32, &Device::Cpu)?;
/// let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// assert!(candle_nn::linear(2, 2, vb.pp("fc")).is_ok()); // reads the stored values
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn to_varmap<T: CandleScalar>(
    sd: &StateDict<ArrayD<T>>,
    dtype: DType,
    device: &Device,
) -> Result<VarMap> {
    let tensors = to_tensors(sd, dtype, device)?;
    let varmap = VarMap::new();
    {
        let mut data = lock(&varmap)?;
        for (name, t) in tensors {
            let var = Var::from_tensor(&t)
                .map_err(candle_error(format_args!("making `{name}` a variable")))?;
            data.insert(name, var);
        }
    }
    Ok(varmap)
}

/// Sets every variable of `varmap` from the state dict, each in the variable's own dtype
/// and on its own device, so a model built on the `VarMap` now computes with these
/// values. Errors, before changing anything, when a variable is missing from the state
/// dict, a shape differs, or the state dict holds a tensor the `VarMap` lacks.
///
/// ```
/// use modelfusion::candle::{candle_core::{DType, Device}, candle_nn, load_varmap};
/// use modelfusion::StateDict;
/// let vm = candle_nn::VarMap::new();
/// let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// candle_nn::linear_no_bias(2, 1, vb.pp("fc"))?;
/// let ok = StateDict::from_pairs([("fc.weight", ndarray::arr2(&[[1.0f32, 2.0]]).into_dyn())])?;
/// load_varmap(&vm, &ok)?;
/// let wrong = StateDict::from_pairs([("fc.weight", ndarray::arr2(&[[1.0f32]]).into_dyn())])?;
/// assert!(load_varmap(&vm, &wrong).unwrap_err().to_string().contains("fc.weight"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load_varmap<T: CandleScalar>(varmap: &VarMap, sd: &StateDict<ArrayD<T>>) -> Result<()> {
    let data = lock(varmap)?;
    for name in sd.names().chain(sd.raw_tensors().map(|(n, _)| n)) {
        if !data.contains_key(name) {
            return Err(Error::NameMismatch {
                detail: format!("`{name}` is in the state dict but not in the VarMap"),
            });
        }
    }
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut values = Vec::with_capacity(names.len());
    for name in names {
        let var = &data[name];
        let value = if let Some(a) = sd.get(name) {
            if a.shape() != var.dims() {
                return Err(Error::shape(
                    format!("`{name}` (VarMap vs state dict)"),
                    var.dims(),
                    a.shape(),
                ));
            }
            float_tensor(name, a, var.dtype(), var.device())?
        } else if let Some(r) = sd.raw(name) {
            if r.shape() != var.dims() {
                return Err(Error::shape(
                    format!("`{name}` (VarMap vs state dict)"),
                    var.dims(),
                    r.shape(),
                ));
            }
            raw_tensor(name, r, var.device())?
                .to_dtype(var.dtype())
                .map_err(candle_error(format_args!("converting `{name}`")))?
        } else {
            return Err(Error::MissingParam {
                name: name.to_string(),
                context: "the state dict loaded into the VarMap".into(),
            });
        };
        values.push((var, value));
    }
    for (var, value) in values {
        var.set(&value)
            .map_err(candle_error("setting a variable of the VarMap"))?;
    }
    Ok(())
}

/// Autograd variables by parameter name, in the model's order.
pub(crate) type Vars = Vec<(String, Var)>;

/// The model's float parameters as candle tensors of their own element type (`T`),
/// beside its raw tensors; with `track`, the float ones are variables (autograd leaves),
/// returned in `vars` in the model's name order.
pub(crate) fn model_tensors<T: CandleScalar>(
    model: &StateDict<ArrayD<T>>,
    device: &Device,
    track: bool,
) -> Result<(HashMap<String, CTensor>, Vars)> {
    let mut tensors = HashMap::with_capacity(model.len());
    let mut vars = Vec::new();
    for (name, a) in model.iter() {
        let t = float_tensor(name, a, T::candle_dtype(), device)?;
        let t = if track {
            let var = Var::from_tensor(&t)
                .map_err(candle_error(format_args!("making `{name}` a variable")))?;
            let t = var.as_tensor().clone();
            vars.push((name.to_string(), var));
            t
        } else {
            t
        };
        tensors.insert(name.to_string(), t);
    }
    for (name, r) in model.raw_tensors() {
        tensors.insert(name.to_string(), raw_tensor(name, r, device)?);
    }
    Ok((tensors, vars))
}

/// A candle tensor as an array of `T` with its shape.
pub(crate) fn to_array<T: CandleScalar>(t: &CTensor, what: &str) -> Result<ArrayD<T>> {
    let shape = t.dims().to_vec();
    let data = t
        .to_dtype(T::candle_dtype())
        .and_then(|x| x.flatten_all())
        .and_then(|x| x.to_vec1::<T>())
        .map_err(candle_error(format_args!("reading {what}")))?;
    ArrayD::from_shape_vec(shape, data).map_err(|e| Error::invalid(what, e.to_string()))
}
