//! A candle model as an objective, a gradient and an activation source.

use candle_core::{DType, Device, Tensor as CTensor};
use candle_nn::VarBuilder;
use ndarray::{Array2, ArrayD, Ix2};

use super::{CandleScalar, candle_error, model_tensors, to_array};
use crate::error::{Error, Result};
use crate::model::{Model, StateDict};
use crate::objective::{Activations, Features, Gradient, Objective};

/// A candle model given by the closure that builds it from a `VarBuilder`: the bridge
/// from the crate's state dicts to candle.
///
/// Every evaluation builds the model from the state dict at hand
/// (`VarBuilder::from_tensors`, so a parameter the model asks for and the state dict
/// lacks, or a shape that differs, is an error naming it; the state dict may hold
/// parameters the model does not read, their gradient is zero). The parameters are
/// given to the model in `dtype` (by default the state dict's element type) on `device`
/// (by default the CPU). [`loss`](Self::loss) and [`features`](Self::features) add what
/// to compute with the built model.
///
/// ```
/// use modelfusion::candle::{candle_core::{Device, Tensor, D}, candle_nn::{self, Module}, CandleNet, to_state_dict_from_varmap};
/// use modelfusion::{Gradient, Objective, StateDictF32};
///
/// let dev = Device::Cpu;
/// let x = Tensor::new(&[[1.0f32, 2.0], [0.5, -1.0]], &dev)?;
/// let y = Tensor::new(&[0u32, 1], &dev)?;
/// let net = CandleNet::new(|vb| candle_nn::linear(2, 2, vb.pp("fc")));
/// let task = net.loss(1, move |m: &candle_nn::Linear, _batch| {
///     candle_nn::loss::cross_entropy(&m.forward(&x)?, &y)
/// })?;
/// // a model to evaluate: any state dict with `fc.weight` (2, 2) and `fc.bias` (2)
/// let vm = candle_nn::VarMap::new();
/// candle_nn::linear(2, 2, candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &dev).pp("fc"))?;
/// let params: StateDictF32 = to_state_dict_from_varmap(&vm)?;
/// let (loss, grad) = task.loss_and_gradient(&params)?;
/// assert!((loss - task.loss(&params)?).abs() < 1e-6);
/// assert_eq!(grad.get("fc.weight").unwrap().shape(), &[2, 2]);
/// # use modelfusion::Model;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct CandleNet<B> {
    build: B,
    dtype: Option<DType>,
    device: Device,
}

impl<B> CandleNet<B> {
    /// The model `build` makes (any `Fn(VarBuilder) -> candle_core::Result<N>`, such as
    /// `|vb| candle_transformers::models::resnet::resnet18(10, vb)`), on the CPU.
    ///
    /// ```
    /// use modelfusion::candle::{candle_nn, CandleNet};
    /// let net = CandleNet::new(|vb| candle_nn::linear(4, 2, vb.pp("fc")));
    /// # let _ = net;
    /// ```
    pub fn new<N>(build: B) -> Self
    where
        B: Fn(VarBuilder<'static>) -> candle_core::Result<N>,
    {
        CandleNet {
            build,
            dtype: None,
            device: Device::Cpu,
        }
    }

    /// Runs the model on `device`.
    ///
    /// ```
    /// use modelfusion::candle::{candle_core::Device, candle_nn, CandleNet};
    /// let net = CandleNet::new(|vb| candle_nn::linear(4, 2, vb.pp("fc"))).with_device(Device::Cpu);
    /// assert!(net.device().is_cpu());
    /// ```
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Gives the model its parameters in `dtype` (a float dtype; the gradient still comes
    /// back in the state dict's element type).
    ///
    /// ```
    /// use modelfusion::candle::{candle_core::DType, candle_nn, CandleNet};
    /// let net = CandleNet::new(|vb| candle_nn::linear(4, 2, vb.pp("fc")));
    /// assert!(net.clone().with_dtype(DType::U8).is_err());
    /// assert_eq!(net.with_dtype(DType::BF16)?.dtype(), Some(DType::BF16));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_dtype(mut self, dtype: DType) -> Result<Self> {
        super::check_float_dtype(dtype)?;
        self.dtype = Some(dtype);
        Ok(self)
    }

    /// The device the model runs on.
    ///
    /// ```
    /// use modelfusion::candle::{candle_nn, CandleNet};
    /// assert!(CandleNet::new(|vb| candle_nn::linear(1, 1, vb)).device().is_cpu());
    /// ```
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the model's parameters are given in (`None`: the state dict's).
    ///
    /// ```
    /// use modelfusion::candle::{candle_nn, CandleNet};
    /// assert_eq!(CandleNet::new(|vb| candle_nn::linear(1, 1, vb)).dtype(), None);
    /// ```
    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    /// Builds the candle model from `params`.
    ///
    /// ```
    /// use modelfusion::candle::{candle_nn::{self, Module}, candle_core::{Device, Tensor}, CandleNet};
    /// use modelfusion::StateDict;
    /// let net = CandleNet::new(|vb| candle_nn::linear_no_bias(2, 1, vb.pp("fc")));
    /// let params = StateDict::from_pairs([("fc.weight", ndarray::arr2(&[[1.0f32, 2.0]]).into_dyn())])?;
    /// let m = net.build(&params)?;
    /// let y = m.forward(&Tensor::new(&[[3.0f32, 4.0]], &Device::Cpu)?)?;
    /// assert_eq!(y.to_vec2::<f32>()?, [[11.0]]);
    /// let empty = StateDict::<ndarray::ArrayD<f32>>::new();
    /// assert!(net.build(&empty).unwrap_err().to_string().contains("fc.weight"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn build<T: CandleScalar, N>(&self, params: &StateDict<ArrayD<T>>) -> Result<N>
    where
        B: Fn(VarBuilder<'static>) -> candle_core::Result<N>,
    {
        Ok(self.build_with(params, false)?.0)
    }

    /// The model and, with `track`, its parameters as autograd variables.
    fn build_with<T: CandleScalar, N>(
        &self,
        params: &StateDict<ArrayD<T>>,
        track: bool,
    ) -> Result<(N, super::Vars)>
    where
        B: Fn(VarBuilder<'static>) -> candle_core::Result<N>,
    {
        let (tensors, vars) = model_tensors(params, &self.device, track)?;
        let dtype = self.dtype.unwrap_or(T::candle_dtype());
        let vb = VarBuilder::from_tensors(tensors, dtype, &self.device);
        let net = (self.build)(vb).map_err(candle_error("building the model"))?;
        Ok((net, vars))
    }

    /// The objective "mean over `num_batches` batches of `loss(model, batch)`", with its
    /// gradient from candle's autograd: a [`CandleLoss`]. `loss` returns a scalar
    /// tensor (one element); `num_batches` must be positive.
    ///
    /// ```
    /// use modelfusion::candle::{candle_nn, CandleNet};
    /// let net = CandleNet::new(|vb| candle_nn::linear(1, 1, vb));
    /// assert!(net.clone().loss(0, |m: &candle_nn::Linear, _| m.weight().sum_all()).is_err());
    /// assert!(net.loss(2, |m: &candle_nn::Linear, _| m.weight().sum_all()).is_ok());
    /// ```
    pub fn loss<N, L>(self, num_batches: usize, loss: L) -> Result<CandleLoss<B, L>>
    where
        B: Fn(VarBuilder<'static>) -> candle_core::Result<N>,
        L: Fn(&N, usize) -> candle_core::Result<CTensor>,
    {
        check_batches(num_batches)?;
        Ok(CandleLoss {
            net: self,
            loss,
            num_batches,
        })
    }

    /// The activation source "named features `features(model, batch)` returns", over
    /// `num_batches` batches: a [`CandleActivations`]. A returned tensor of rank 2 is
    /// `(samples, features)`; a higher rank is channel-first, `(batch, channels,
    /// positions...)` as candle's convolutions write it, and every position counts as a
    /// sample (`(batch * positions, channels)`).
    ///
    /// ```
    /// use modelfusion::candle::{candle_nn, CandleNet};
    /// let net = CandleNet::new(|vb| candle_nn::linear(1, 1, vb));
    /// let acts = net.features(1, |m: &candle_nn::Linear, _| Ok(vec![("w".to_string(), m.weight().clone())]))?;
    /// # let _ = acts;
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn features<N, F>(self, num_batches: usize, features: F) -> Result<CandleActivations<B, F>>
    where
        B: Fn(VarBuilder<'static>) -> candle_core::Result<N>,
        F: Fn(&N, usize) -> candle_core::Result<Vec<(String, CTensor)>>,
    {
        check_batches(num_batches)?;
        Ok(CandleActivations {
            net: self,
            features,
            num_batches,
        })
    }
}

fn check_batches(num_batches: usize) -> Result<()> {
    if num_batches == 0 {
        Err(Error::invalid("num_batches", "must be positive"))
    } else {
        Ok(())
    }
}

/// A candle model's loss as an [`Objective`] and a [`Gradient`]: built by
/// [`CandleNet::loss`]. The value is the mean of the per-batch losses; the gradient is
/// candle's, averaged the same way, with zeros for parameters the loss does not read
/// (and raw tensors carried unchanged).
///
/// ```
/// // see `CandleNet`
/// use modelfusion::candle::{candle_nn, CandleNet, CandleLoss};
/// let task = CandleNet::new(|vb| candle_nn::linear(1, 1, vb)).loss(1, |m: &candle_nn::Linear, _| m.weight().sum_all())?;
/// assert_eq!(task.num_batches(), 1);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct CandleLoss<B, L> {
    net: CandleNet<B>,
    loss: L,
    num_batches: usize,
}

impl<B, L> CandleLoss<B, L> {
    /// The number of batches the loss averages.
    ///
    /// ```
    /// use modelfusion::candle::{candle_nn, CandleNet};
    /// let task = CandleNet::new(|vb| candle_nn::linear(1, 1, vb)).loss(3, |m: &candle_nn::Linear, _| m.weight().sum_all())?;
    /// assert_eq!(task.num_batches(), 3);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn num_batches(&self) -> usize {
        self.num_batches
    }

    /// The model adapter.
    ///
    /// ```
    /// use modelfusion::candle::{candle_nn, CandleNet};
    /// let task = CandleNet::new(|vb| candle_nn::linear(1, 1, vb)).loss(1, |m: &candle_nn::Linear, _| m.weight().sum_all())?;
    /// assert!(task.net().device().is_cpu());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn net(&self) -> &CandleNet<B> {
        &self.net
    }

    /// The batch's loss as an `f64`, checked to be one finite value.
    fn batch_loss<N>(&self, net: &N, batch: usize) -> Result<(CTensor, f64)>
    where
        L: Fn(&N, usize) -> candle_core::Result<CTensor>,
    {
        let what = format_args!("the loss of batch {batch}");
        let t = (self.loss)(net, batch).map_err(candle_error(what))?;
        if t.elem_count() != 1 {
            return Err(Error::invalid(
                "loss",
                format!(
                    "batch {batch} returned a tensor of shape {:?}; a loss is one value",
                    t.dims()
                ),
            ));
        }
        let v = t
            .flatten_all()
            .and_then(|x| x.to_dtype(DType::F64))
            .and_then(|x| x.to_vec1::<f64>())
            .map_err(candle_error(what))?[0];
        if !v.is_finite() {
            return Err(Error::NonFinite {
                what: format!("the candle model's loss on batch {batch}"),
            });
        }
        Ok((t, v))
    }
}

impl<T, B, N, L> Objective<StateDict<ArrayD<T>>> for CandleLoss<B, L>
where
    T: CandleScalar,
    B: Fn(VarBuilder<'static>) -> candle_core::Result<N>,
    L: Fn(&N, usize) -> candle_core::Result<CTensor>,
{
    fn loss(&self, model: &StateDict<ArrayD<T>>) -> Result<f64> {
        let net = self.net.build(model)?;
        let mut total = 0.0;
        for b in 0..self.num_batches {
            total += self.batch_loss(&net, b)?.1;
        }
        Ok(total / self.num_batches as f64)
    }
}

impl<T, B, N, L> Gradient<StateDict<ArrayD<T>>> for CandleLoss<B, L>
where
    T: CandleScalar,
    B: Fn(VarBuilder<'static>) -> candle_core::Result<N>,
    L: Fn(&N, usize) -> candle_core::Result<CTensor>,
{
    fn loss_and_gradient(
        &self,
        model: &StateDict<ArrayD<T>>,
    ) -> Result<(f64, StateDict<ArrayD<T>>)> {
        let (net, vars) = self.net.build_with(model, true)?;
        let scale = T::from_f64_lossy(1.0 / self.num_batches as f64);
        let mut total = 0.0;
        let mut sums: Vec<Option<ArrayD<T>>> = vec![None; vars.len()];
        for b in 0..self.num_batches {
            let (t, v) = self.batch_loss(&net, b)?;
            total += v;
            let grads = t
                .backward()
                .map_err(candle_error(format_args!("backward pass of batch {b}")))?;
            for ((name, var), sum) in vars.iter().zip(sums.iter_mut()) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    let g = to_array::<T>(g, &format!("the gradient of `{name}`"))?;
                    match sum {
                        Some(s) => s.zip_mut_with(&g, |a, &b| *a += b),
                        None => *sum = Some(g),
                    }
                }
            }
        }
        let mut by_name: std::collections::HashMap<&str, ArrayD<T>> = vars
            .iter()
            .zip(sums)
            .filter_map(|((n, _), s)| s.map(|s| (n.as_str(), s.mapv(|x| x * scale))))
            .collect();
        let grad = model.try_map(|name, t| {
            Ok(by_name
                .remove(name)
                .unwrap_or_else(|| ArrayD::zeros(t.shape())))
        })?;
        Ok((total / self.num_batches as f64, grad))
    }
}

/// A candle model's named features as an [`Activations`] source: built by
/// [`CandleNet::features`].
///
/// ```
/// use modelfusion::candle::{candle_core::{Device, Tensor}, candle_nn::{self, Module}, CandleNet};
/// use modelfusion::{Activations, StateDict};
/// let x = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu)?;
/// let acts = CandleNet::new(|vb| candle_nn::linear_no_bias(2, 1, vb.pp("fc")))
///     .features(1, move |m: &candle_nn::Linear, _| Ok(vec![("out".to_string(), m.forward(&x)?)]))?;
/// let params = StateDict::from_pairs([("fc.weight", ndarray::arr2(&[[1.0f32, 1.0]]).into_dyn())])?;
/// let f = acts.activations(&params, 0)?;
/// assert_eq!(f["out"], ndarray::arr2(&[[3.0f32], [7.0], [11.0]]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct CandleActivations<B, F> {
    net: CandleNet<B>,
    features: F,
    num_batches: usize,
}

impl<B, F> CandleActivations<B, F> {
    /// The model adapter.
    ///
    /// ```
    /// use modelfusion::candle::{candle_nn, CandleNet};
    /// let a = CandleNet::new(|vb| candle_nn::linear(1, 1, vb)).features(1, |m: &candle_nn::Linear, _| Ok(vec![]))?;
    /// assert!(a.net().device().is_cpu());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn net(&self) -> &CandleNet<B> {
        &self.net
    }
}

/// `(samples, features)` from a rank-2 tensor, or from a channel-first one by moving the
/// channels last and counting every position as a sample.
fn feature_matrix<T: CandleScalar>(key: &str, t: &CTensor) -> Result<Array2<T>> {
    let what = format!("feature `{key}`");
    let a = to_array::<T>(t, &what)?;
    let rank = a.ndim();
    if rank < 2 {
        return Err(Error::invalid(
            key,
            format!(
                "a feature tensor has rank 2 or more, got shape {:?}",
                a.shape()
            ),
        ));
    }
    let channels = a.shape()[1];
    let order: Vec<usize> = std::iter::once(0)
        .chain(2..rank)
        .chain(std::iter::once(1))
        .collect();
    let moved = a.permuted_axes(order).as_standard_layout().into_owned();
    let samples = moved.len() / channels.max(1);
    moved
        .into_shape_with_order((samples, channels))
        .map_err(|e| Error::invalid(key, e.to_string()))?
        .into_dimensionality::<Ix2>()
        .map_err(|e| Error::invalid(key, e.to_string()))
}

impl<T, B, N, F> Activations<StateDict<ArrayD<T>>> for CandleActivations<B, F>
where
    T: CandleScalar,
    B: Fn(VarBuilder<'static>) -> candle_core::Result<N>,
    F: Fn(&N, usize) -> candle_core::Result<Vec<(String, CTensor)>>,
{
    fn num_batches(&self) -> usize {
        self.num_batches
    }

    fn activations(&self, model: &StateDict<ArrayD<T>>, batch: usize) -> Result<Features<T>> {
        if batch >= self.num_batches {
            return Err(Error::invalid(
                "batch",
                format!("{batch} is out of range ({} batches)", self.num_batches),
            ));
        }
        let net = self.net.build(model)?;
        let named = (self.features)(&net, batch)
            .map_err(candle_error(format_args!("the features of batch {batch}")))?;
        let mut out = Features::new();
        for (key, t) in named {
            let m = feature_matrix::<T>(&key, &t)?;
            if out.insert(key.clone(), m).is_some() {
                return Err(Error::invalid(
                    "features",
                    format!("batch {batch} returned `{key}` twice"),
                ));
            }
        }
        Ok(out)
    }
}
