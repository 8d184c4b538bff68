//! Reference networks with hand-written forward and backward passes, their training, and
//! the data sets they are trained on (feature `nn`, on by default).
//!
//! The networks exist so that every fusion algorithm in the crate can be exercised end to
//! end without a deep-learning framework: train two networks from different seeds, align
//! them, merge them, and measure the loss along the path between them.
//!
//! # Networks
//!
//! Parameters live in a [`StateDict`] (usually [`StateDictF32`](crate::StateDictF32)),
//! in PyTorch layout (a linear weight is `(out, in)`) and with PyTorch-style names, so
//! the ready permutation specs [`perm::specs::mlp`](crate::perm::specs::mlp)`(num_hidden)`
//! and [`perm::specs::res_mlp`](crate::perm::specs::res_mlp)`(num_blocks)` apply to them
//! directly; every network is an [`Architecture`], so `net.spec()` returns its spec and
//! `net.shapes()` its parameter shapes. The networks' methods are generic over the
//! tensor type `T` (any
//! [`Tensor`]; usually `ArrayD<f32>`, or `ArrayD<f64>` for gradient checks), and the
//! architecture value holds no weights: `net.init(seed)` makes a state dict, and every
//! call takes one.
//!
//! **[`Mlp`]**, built from layer sizes `[in, h1, ..., hk, out]`:
//!
//! | parameter | shape |
//! |---|---|
//! | `layers.{i}.weight` | `(sizes[i+1], sizes[i])`, `i = 0..=k` |
//! | `layers.{i}.bias` | `(sizes[i+1])` |
//!
//! ReLU after every layer but the last. Permutation groups: `hidden.{i}` (the output
//! channels of layer `i`) for each hidden layer `i = 0..k`.
//!
//! **[`ResMlp`]**, a residual MLP of width `d` with `B` blocks of hidden width `h`:
//! `x = relu(stem(input))`, then per block `x = x + fc2(relu(fc1(norm(x))))`, then
//! `head(x)`. `norm` is a batch normalisation (eps `1e-5`, running statistics updated with
//! momentum `0.1` in training):
//!
//! | parameter | shape |
//! |---|---|
//! | `stem.weight`, `stem.bias` | `(d, in)`, `(d)` |
//! | `blocks.{j}.norm.weight`, `.bias`, `.running_mean`, `.running_var` | `(d)` each |
//! | `blocks.{j}.fc1.weight`, `blocks.{j}.fc1.bias` | `(h, d)`, `(h)` |
//! | `blocks.{j}.fc2.weight`, `blocks.{j}.fc2.bias` | `(d, h)`, `(d)` |
//! | `head.weight`, `head.bias` | `(classes, d)`, `(classes)` |
//!
//! Permutation groups: `residual` (width `d`: the stem's outputs, every norm parameter
//! and statistic, every `fc1` input and `fc2` output, and the head's input all share one
//! permutation) and `blocks.{j}.hidden` (width `h`). The running statistics are
//! *buffers* ([`Network::is_buffer`]): they are in the state dict, but their gradient is
//! zero and optimisers leave them alone (no momentum, no weight decay).
//!
//! # Evaluating and training
//!
//! [`Classification`] pairs a network with a [`Dataset`] and implements the crate's
//! [`Objective`](crate::Objective) (mean cross-entropy over the data set),
//! [`Gradient`](crate::Gradient) and [`Activations`](crate::Activations) (features keyed
//! by permutation group: post-ReLU units for `hidden.{i}` and `blocks.{j}.hidden`; for
//! `residual`, the stream after the stem and after every block stacked as extra rows).
//! It also gives the logits of the whole data set ([`Classification::logits`]), the
//! output ensemble of several models ([`Classification::evaluate_ensemble`]: averaged
//! [`softmax`] probabilities), one minibatch's gradient
//! ([`Classification::minibatch_loss_and_gradient`], for stochastic training), the
//! error rate ([`ErrorRate`], `1 - accuracy`, for barriers on the error) and the input of
//! every linear layer keyed by its weight's name ([`LayerInputs`], for RegMean and
//! REPAIR). Normalisation uses running statistics unless switched to batch statistics
//! with [`Classification::with_mode`], or recomputed on data for every evaluated model
//! with [`Classification::with_reset_stats`] (for interpolated or merged networks).
//!
//! # Adversarial inputs
//!
//! [`Pgd`] attacks a labelled batch of any network: projected gradient ascent on the
//! cross-entropy in an L-inf or L2 ball ([`Norm`]) through [`Network::input_gradient`],
//! with a seeded random start and clipping to the data range; [`Pgd::fgsm`] is the
//! one-step case. [`Classification::robust`] turns a task into its robust version
//! ([`Robust`]): robust loss and accuracy, the robust error rate ([`RobustErrorRate`])
//! for barriers, and adversarial minibatches as a
//! [`StochasticGradient`](crate::StochasticGradient) (robust mode connectivity with
//! [`path::fit_curve_stochastic`](crate::path::fit_curve_stochastic)).
//! [`TrainConfig::with_attack`] trains adversarially.
//!
//! [`train`] (or [`train_with`], with a per-epoch callback) runs minibatch SGD
//! (momentum, Nesterov, weight decay) or Adam, with seeded shuffling, as configured by a
//! validated [`TrainConfig`]. [`reset_running_stats`] recomputes the norm statistics of
//! an interpolated or merged network on data. Data: the embedded UCI digits ([`data::digits`]),
//! Fashion-MNIST ([`data::fashion_mnist`]) and any IDX files ([`data::read_idx`]).
//!
//! ```
//! use modelfusion::nn::{data, train, Classification, Mlp, Network, Optimizer, TrainConfig};
//! use modelfusion::StateDictF32;
//!
//! let (train_set, test_set) = data::digits()?.split(0.2, 0)?;
//! let net = Mlp::new(&[64, 32, 10])?;
//! let init: StateDictF32 = net.init(1);
//! let config = TrainConfig::new(Optimizer::adam(1e-2)?, 3, 32, 7)?;
//! let trained = train(&net, &init, &train_set, &config)?;
//! assert_eq!(trained.loss_history.len(), 3);
//! let eval = Classification::new(&net, &test_set, 256)?;
//! assert!(eval.accuracy(&trained.params)? > 0.8);
//! # Ok::<(), modelfusion::Error>(())
//! ```

mod attack;
pub mod data;
mod entropy;
mod eval;
mod layers;
mod mlp;
mod res_mlp;
mod train;

use std::fmt::Debug;

use ndarray::{Array1, Array2, ArrayView2, Axis};

use crate::error::{Error, Result};
use crate::model::{Model, StateDict};
use crate::objective::Features;
use crate::tensor::{Scalar, Tensor};

pub use crate::optim::{LrSchedule, Optimizer};
/// Re-exported: every [`Network`] is an [`Architecture`] (shapes and permutation spec).
pub use crate::perm::specs::Architecture;
pub use attack::{Norm, Perturbed, Pgd, Robust, RobustErrorRate};
pub use data::Dataset;
pub use entropy::{Entropy, softmax_entropy};
pub use eval::{Classification, ErrorRate, Evaluation, LayerInputs};
pub use mlp::Mlp;
pub use mlp::MlpCache;
pub use res_mlp::ResMlp;
pub use res_mlp::ResMlpCache;
pub use train::{TrainConfig, Trained, reset_running_stats, train, train_with};

/// How normalisation layers compute their statistics in a forward pass.
///
/// ```
/// use modelfusion::nn::Mode;
/// assert_eq!(Mode::default(), Mode::Eval);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Running statistics (inference).
    #[default]
    Eval,
    /// Batch statistics (training); the forward pass itself changes nothing, the new
    /// running statistics come from [`Network::running_stats_update`].
    Train,
}

/// A network with a hand-written forward and backward pass over `(samples, features)`
/// batches. Implemented by [`Mlp`] and [`ResMlp`]; the objectives in this module are
/// written once against it.
///
/// A network is an [`Architecture`]: its parameter names and shapes
/// ([`shapes`](Architecture::shapes), in state-dict order) and its permutation spec
/// ([`spec`](Architecture::spec)). Required methods describe the rest of the
/// architecture (buffers, permutation group widths) and run one batch forward and
/// backward. The provided ones validate
/// parameters and inputs, and compute logits and a batch's loss and gradient.
///
/// ```
/// use modelfusion::nn::{Mlp, Mode, Network};
/// use ndarray::Array2;
///
/// let net = Mlp::new(&[4, 3, 2])?;
/// let params = net.init::<ndarray::ArrayD<f64>>(0);
/// let x = Array2::from_elem((5, 4), 0.5);
/// let (logits, cache) = net.forward(&params, x.view(), Mode::Eval)?;
/// assert_eq!(logits.dim(), (5, 2));
/// let grads = net.backward(&params, &cache, Array2::ones((5, 2)).view())?;
/// assert_eq!(grads.get("layers.0.weight").map(|g| g.shape().to_vec()), Some(vec![3, 4]));
/// # use modelfusion::Model;
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub trait Network: Architecture + Clone + Debug + Send + Sync {
    /// What a forward pass keeps for the backward pass and for feature extraction.
    type Cache<S: Scalar>: Send;

    /// A short description for error messages, e.g. `MLP [64, 128, 10]`.
    fn describe(&self) -> String;
    /// Number of input features.
    fn input_dim(&self) -> usize;
    /// Number of output classes (logits).
    fn num_classes(&self) -> usize;
    /// Permutation groups `(name, width)`, in order.
    fn groups(&self) -> Vec<(String, usize)>;
    /// True for buffers: state-dict entries that are not trained by gradient (running
    /// statistics). Their gradient is zero and optimisers skip them.
    fn is_buffer(&self, _name: &str) -> bool {
        false
    }
    /// Seeded initialisation: linear layers as PyTorch's `nn.Linear` (uniform in
    /// `±1/sqrt(fan_in)`), norm scales 1, shifts 0, running mean 0, running variance 1.
    /// `T` is the tensor type, usually `ndarray::ArrayD<f32>` or `ArrayD<f64>`.
    fn init<T: Tensor>(&self, seed: u64) -> StateDict<T>;
    /// Runs a batch `x` of shape `(samples, input_dim)` forward; returns the logits
    /// `(samples, num_classes)` and the cache. Validates `params` and `x` first.
    fn forward<T: Tensor>(
        &self,
        params: &StateDict<T>,
        x: ArrayView2<T::Elem>,
        mode: Mode,
    ) -> Result<ForwardPass<Self, T>>;
    /// The gradient of `sum(dlogits * logits)` with respect to every parameter (zero for
    /// buffers), in state-dict order, from a cache of [`forward`](Network::forward) with
    /// the same `params`.
    fn backward<T: Tensor>(
        &self,
        params: &StateDict<T>,
        cache: &Self::Cache<T::Elem>,
        dlogits: ArrayView2<T::Elem>,
    ) -> Result<StateDict<T>>;
    /// The gradient of `sum(dlogits * logits)` with respect to the input batch
    /// `(samples, input_dim)`, from a cache of [`forward`](Network::forward) with the
    /// same `params`: what adversarial attacks ([`Pgd`]) climb. [`Mlp`] and [`ResMlp`]
    /// provide it; the default errors, naming the network.
    ///
    /// ```
    /// use modelfusion::nn::{Mlp, Mode, Network};
    /// use ndarray::{array, ArrayD};
    /// // One linear layer: logits = x W^T + b, so d sum(dlogits * logits) / dx = dlogits W.
    /// let net = Mlp::new(&[2, 2])?;
    /// let p = net.init::<ArrayD<f64>>(0);
    /// let x = array![[0.5, -1.0]];
    /// let (_, cache) = net.forward(&p, x.view(), Mode::Eval)?;
    /// let dx = net.input_gradient(&p, &cache, array![[1.0, 0.0]].view())?;
    /// let w = p.get("layers.0.weight").unwrap();
    /// assert_eq!((dx[[0, 0]], dx[[0, 1]]), (w[[0, 0]], w[[0, 1]]));
    /// # use modelfusion::Model;
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn input_gradient<T: Tensor>(
        &self,
        _params: &StateDict<T>,
        _cache: &Self::Cache<T::Elem>,
        _dlogits: ArrayView2<T::Elem>,
    ) -> Result<Array2<T::Elem>> {
        Err(Error::invalid(
            "network",
            format!("the {} does not provide input gradients", self.describe()),
        ))
    }
    /// The batch statistics of a training-mode forward pass, keyed by the buffer they
    /// feed (`blocks.{j}.norm.running_mean`: the batch mean; `...running_var`: the
    /// unbiased batch variance); empty for networks without buffers or an
    /// evaluation-mode cache.
    fn batch_statistics<S: Scalar>(&self, _cache: &Self::Cache<S>) -> Vec<(String, Array1<S>)> {
        Vec::new()
    }
    /// New values of the buffers after a training-mode forward pass: the momentum update
    /// `(1 - 0.1) * running + 0.1 * batch` of every statistic in
    /// [`batch_statistics`](Network::batch_statistics).
    ///
    /// ```
    /// use modelfusion::nn::{Mode, Network, ResMlp};
    /// use modelfusion::{Model, StateDictF64};
    /// let net = ResMlp::new(2, 2, 2, 1, 2)?;
    /// let p: StateDictF64 = net.init(0);
    /// let x = ndarray::array![[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]];
    /// let (_, cache) = net.forward(&p, x.view(), Mode::Train)?;
    /// let update = net.running_stats_update(&p, &cache)?;
    /// assert_eq!(update.len(), 2);
    /// assert_eq!(update[0].0, "blocks.0.norm.running_mean");
    /// let (_, eval_cache) = net.forward(&p, x.view(), Mode::Eval)?;
    /// assert!(net.running_stats_update(&p, &eval_cache)?.is_empty());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn running_stats_update<T: Tensor>(
        &self,
        params: &StateDict<T>,
        cache: &Self::Cache<T::Elem>,
    ) -> Result<Vec<(String, T)>> {
        let m = T::Elem::from_f64_lossy(layers::BN_MOMENTUM);
        let keep = T::Elem::from_f64_lossy(1.0 - layers::BN_MOMENTUM);
        self.batch_statistics(cache)
            .into_iter()
            .map(|(name, batch)| {
                let old = layers::param1(params, &name)?;
                if old.len() != batch.len() {
                    return Err(Error::shape(
                        format!("buffer `{name}`"),
                        &[batch.len()],
                        old.shape(),
                    ));
                }
                let new = &old * keep + batch * m;
                Ok((name, T::from_array(new.into_dyn())))
            })
            .collect()
    }
    /// Features at every permutation group, `(samples, width)` each: the post-ReLU
    /// hidden units; for a residual stream, the stream after the stem and after every
    /// block, stacked as extra samples (`(samples * (blocks + 1), width)`).
    fn group_features<S: Scalar>(&self, cache: &Self::Cache<S>) -> Features<S>;
    /// The input of every linear layer keyed by its weight's name (e.g.
    /// `layers.0.weight`), `(samples, in)` each.
    fn layer_inputs<S: Scalar>(&self, cache: &Self::Cache<S>) -> Features<S>;

    /// Errors unless `params` holds exactly this network's parameters with the right
    /// shapes; the error names the parameter and both shapes.
    ///
    /// ```
    /// use modelfusion::nn::{Mlp, Network};
    /// use modelfusion::Model;
    /// use ndarray::ArrayD;
    ///
    /// let net = Mlp::new(&[4, 3, 2])?;
    /// let mut params = net.init::<ndarray::ArrayD<f32>>(0);
    /// params.replace("layers.1.weight", ArrayD::zeros(vec![2, 5]))?;
    /// let e = net.check_params(&params).unwrap_err().to_string();
    /// assert!(e.contains("layers.1.weight") && e.contains("[2, 3]") && e.contains("[2, 5]"));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn check_params<T: Tensor>(&self, params: &StateDict<T>) -> Result<()> {
        let expected = self.shapes();
        for (name, shape) in &expected {
            let t = params.get(name).ok_or_else(|| Error::MissingParam {
                name: name.clone(),
                context: format!("the parameters of the {}", self.describe()),
            })?;
            if t.shape() != shape.as_slice() {
                return Err(Error::shape(
                    format!("parameter `{name}` of the {}", self.describe()),
                    shape,
                    t.shape(),
                ));
            }
        }
        if params.len() != expected.len()
            && let Some(extra) = params
                .names()
                .find(|n| !expected.iter().any(|(e, _)| e == n))
        {
            return Err(Error::NameMismatch {
                detail: format!("`{extra}` is not a parameter of the {}", self.describe()),
            });
        }
        Ok(())
    }

    /// Errors unless `x` is a non-empty `(samples, input_dim)` batch.
    ///
    /// ```
    /// use modelfusion::nn::{Mlp, Network};
    /// let net = Mlp::new(&[4, 2])?;
    /// assert!(net.check_input(ndarray::Array2::<f32>::zeros((3, 5)).view()).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn check_input<S: Scalar>(&self, x: ArrayView2<S>) -> Result<()> {
        let (n, f) = x.dim();
        if n == 0 {
            return Err(Error::empty(format!(
                "input batch of the {}",
                self.describe()
            )));
        }
        if f != self.input_dim() {
            return Err(Error::shape(
                format!("input batch (samples, features) of the {}", self.describe()),
                &[n, self.input_dim()],
                &[n, f],
            ));
        }
        Ok(())
    }

    /// Logits of a batch in evaluation mode.
    ///
    /// ```
    /// use modelfusion::nn::{Mlp, Network};
    /// let net = Mlp::new(&[4, 3, 2])?;
    /// let logits = net.logits(&net.init::<ndarray::ArrayD<f32>>(0), ndarray::Array2::zeros((6, 4)).view())?;
    /// assert_eq!(logits.dim(), (6, 2));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn logits<T: Tensor>(
        &self,
        params: &StateDict<T>,
        x: ArrayView2<T::Elem>,
    ) -> Result<Array2<T::Elem>> {
        Ok(self.forward(params, x, Mode::Eval)?.0)
    }

    /// Mean cross-entropy of a labelled batch, its gradient (zero for buffers), the
    /// number of correct predictions and the forward cache.
    ///
    /// ```
    /// use modelfusion::nn::{Mlp, Mode, Network};
    /// let net = Mlp::new(&[4, 3, 2])?;
    /// let x = ndarray::Array2::<f64>::zeros((2, 4));
    /// let step = net.batch_loss_and_gradient(&net.init::<ndarray::ArrayD<f64>>(0), x.view(), &[0, 1], Mode::Train)?;
    /// assert!(step.loss > 0.0);
    /// assert!(net.batch_loss_and_gradient(&net.init::<ndarray::ArrayD<f64>>(0), x.view(), &[0, 2], Mode::Train).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn batch_loss_and_gradient<T: Tensor>(
        &self,
        params: &StateDict<T>,
        x: ArrayView2<T::Elem>,
        labels: &[usize],
        mode: Mode,
    ) -> Result<BatchStep<T, Self::Cache<T::Elem>>> {
        let (logits, cache) = self.forward(params, x, mode)?;
        let (sum, mut dlogits, correct) = layers::softmax_cross_entropy(logits.view(), labels)?;
        let n = labels.len() as f64;
        dlogits.mapv_inplace(|g| g / T::Elem::from_f64_lossy(n));
        let gradient = self.backward(params, &cache, dlogits.view())?;
        Ok(BatchStep {
            loss: sum / n,
            gradient,
            correct,
            cache,
        })
    }

    /// A loss on the logits of a batch other than cross-entropy, and its gradient
    /// through the network: `loss` maps the logits `(samples, classes)` to the loss and
    /// its gradient with respect to them (e.g. [`softmax_entropy`]); returns the loss
    /// and the parameter gradient (zero for buffers).
    ///
    /// ```
    /// use modelfusion::nn::{softmax_entropy, Mlp, Mode, Network};
    /// let net = Mlp::new(&[4, 3, 2])?;
    /// let p = net.init::<ndarray::ArrayD<f64>>(0);
    /// let x = ndarray::Array2::<f64>::ones((5, 4));
    /// let (h, g) = net.batch_logit_loss_and_gradient(&p, x.view(), Mode::Eval, softmax_entropy)?;
    /// assert!(h >= 0.0 && h <= 2f64.ln() + 1e-12);
    /// assert_eq!(g.len(), 4);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn batch_logit_loss_and_gradient<T: Tensor>(
        &self,
        params: &StateDict<T>,
        x: ArrayView2<T::Elem>,
        mode: Mode,
        loss: impl FnOnce(ArrayView2<T::Elem>) -> Result<(f64, Array2<T::Elem>)>,
    ) -> Result<(f64, StateDict<T>)> {
        let (logits, cache) = self.forward(params, x, mode)?;
        let (value, dlogits) = loss(logits.view())?;
        if dlogits.dim() != logits.dim() {
            return Err(Error::shape(
                "the gradient of the logit loss",
                logits.shape(),
                dlogits.shape(),
            ));
        }
        let gradient = self.backward(params, &cache, dlogits.view())?;
        Ok((value, gradient))
    }
}

/// The cross-entropy of every sample of a labelled batch and the gradient of their sum
/// with respect to the batch (see [`Network::input_gradient`]).
pub(crate) fn per_sample_loss_and_input_gradient<N: Network, T: Tensor>(
    net: &N,
    params: &StateDict<T>,
    x: ArrayView2<T::Elem>,
    labels: &[usize],
    mode: Mode,
) -> Result<(Vec<f64>, Array2<T::Elem>)> {
    let (logits, cache) = net.forward(params, x, mode)?;
    let (losses, dlogits, _) = layers::softmax_cross_entropy_per_sample(logits.view(), labels)?;
    let dx = net.input_gradient(params, &cache, dlogits.view())?;
    Ok((losses, dx))
}

/// What the networks' shared backward walk returns: the parameter gradients and, when
/// asked for, the gradient with respect to the input batch.
pub(crate) type BackwardPass<T> = (StateDict<T>, Option<Array2<<T as Tensor>::Elem>>);

/// What [`Network::forward`] of network `N` on tensors `T` returns: the logits
/// `(samples, classes)` and the cache.
pub type ForwardPass<N, T> = (
    Array2<<T as Tensor>::Elem>,
    <N as Network>::Cache<<T as Tensor>::Elem>,
);

/// The result of [`Network::batch_loss_and_gradient`].
///
/// ```
/// use modelfusion::nn::{Mlp, Mode, Network};
/// let net = Mlp::new(&[2, 2])?;
/// let step = net.batch_loss_and_gradient(&net.init::<ndarray::ArrayD<f32>>(0), ndarray::Array2::zeros((1, 2)).view(), &[1], Mode::Eval)?;
/// assert!(step.correct <= 1);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct BatchStep<T: Tensor, C> {
    /// Mean cross-entropy over the batch.
    pub loss: f64,
    /// Gradient of the mean loss, one tensor per parameter.
    pub gradient: StateDict<T>,
    /// Number of samples whose largest logit is their label.
    pub correct: usize,
    /// The forward cache (for running statistics or features).
    pub cache: C,
}

/// Row-wise softmax of logits `(samples, classes)`, computed stably (max subtracted);
/// average these over models for an output ensemble.
///
/// ```
/// let p = modelfusion::nn::softmax(ndarray::array![[0.0f32, 0.0], [1000.0, 0.0]].view());
/// assert_eq!(p[[0, 1]], 0.5);
/// assert_eq!(p[[1, 0]], 1.0);
/// ```
pub fn softmax<S: Scalar>(logits: ArrayView2<S>) -> Array2<S> {
    let mut out = logits.to_owned();
    for mut row in out.axis_iter_mut(Axis(0)) {
        let max = row.fold(S::neg_infinity(), |m, &v| if v > m { v } else { m });
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    out
}

/// Index of the largest logit per sample (the first on ties).
///
/// ```
/// let p = modelfusion::nn::predict(ndarray::array![[0.1f32, 2.0], [3.0, 3.0]].view());
/// assert_eq!(p, vec![1, 0]);
/// ```
pub fn predict<S: Scalar>(logits: ArrayView2<S>) -> Vec<usize> {
    logits
        .outer_iter()
        .map(|row| layers::argmax_row(row).0)
        .collect()
}
