//! A network paired with a data set: the crate's objective traits for the reference
//! networks.

use std::borrow::Cow;

use ndarray::{Array2, Axis, concatenate};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::{Model, StateDict};
use crate::objective::{Activations, Features, Gradient, Objective};
use crate::tensor::{Scalar, Tensor};

use super::data::{Dataset, check_batch_size};
use super::layers::{convert_batch, softmax_cross_entropy};
use super::train::{check_data, reset_running_stats};
use super::{ForwardPass, Mode, Network};

/// A classification task: a network evaluated on a data set in minibatches.
///
/// Implements [`Objective`] (mean cross-entropy over the data set), [`Gradient`] (that
/// loss and its gradient; zero for buffers) and [`Activations`] (features at every
/// permutation group, see [`Network::group_features`]) for the network's parameters
/// (`StateDict<T>` for any tensor type `T`). By default normalisation layers use their
/// running statistics ([`Mode::Eval`]); [`with_mode`](Classification::with_mode)
/// switches to batch statistics, computed per minibatch in data-set order.
///
/// Batches run in parallel (rayon); results are summed in batch order, so they do not
/// depend on the number of threads.
///
/// ```
/// use modelfusion::nn::{data, Classification, Mlp, Network};
/// use modelfusion::{Gradient, Model, Objective, StateDictF32};
///
/// let d = data::digits()?.head(100);
/// let net = Mlp::new(&[64, 16, 10])?;
/// let params: StateDictF32 = net.init(0);
/// let task = Classification::new(&net, &d, 32)?;
/// let loss = task.loss(&params)?;
/// assert!((loss - 10f64.ln()).abs() < 0.5); // about ln(10) at initialisation
/// let (l2, grad) = task.loss_and_gradient(&params)?;
/// assert_eq!(l2, loss);
/// assert_eq!(grad.num_tensors(), params.num_tensors());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Classification<'a, N> {
    net: &'a N,
    data: &'a Dataset,
    batch_size: usize,
    mode: Mode,
    reset_stats: Option<&'a Dataset>,
}

/// Loss and accuracy of a network on a data set.
///
/// ```
/// use modelfusion::nn::{data, Classification, Mlp, Network};
/// let d = data::digits()?.head(50);
/// let net = Mlp::new(&[64, 10])?;
/// let e = Classification::new(&net, &d, 64)?.evaluate(&net.init::<ndarray::ArrayD<f32>>(0))?;
/// assert_eq!(e.samples, 50);
/// assert!((0.0..=1.0).contains(&e.accuracy));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction of samples whose largest logit is their label.
    pub accuracy: f64,
    /// Number of samples evaluated.
    pub samples: usize,
}

impl<'a, N: Network> Classification<'a, N> {
    /// Pairs `net` with `data`, evaluated in batches of `batch_size`. Errors on a zero
    /// batch size, an empty data set, a feature count other than the network's input
    /// width, or more classes than the network has outputs.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp};
    /// let d = data::digits()?;
    /// let wrong = Mlp::new(&[32, 10])?;
    /// let e = Classification::new(&wrong, &d, 64).unwrap_err().to_string();
    /// assert!(e.contains("[1797, 32]") && e.contains("[1797, 64]"), "{e}");
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(net: &'a N, data: &'a Dataset, batch_size: usize) -> Result<Self> {
        check_batch_size(batch_size)?;
        check_data(net, data)?;
        Ok(Classification {
            net,
            data,
            batch_size,
            mode: Mode::Eval,
            reset_stats: None,
        })
    }

    /// The same task with normalisation in `mode` ([`Mode::Train`]: batch statistics of
    /// each minibatch, which then needs at least two samples).
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mode, Mlp};
    /// let d = data::digits()?;
    /// let net = Mlp::new(&[64, 10])?;
    /// let task = Classification::new(&net, &d, 64)?.with_mode(Mode::Train);
    /// assert_eq!(task.mode(), Mode::Train);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// The same task, but every model is first given fresh running statistics computed
    /// on `data` ([`reset_running_stats`](super::reset_running_stats), in this task's
    /// batch size) before its loss, gradient, error rate or logits are computed: the
    /// usual way to evaluate interpolated or merged networks with batch normalisation.
    /// [`Activations`] read the model as given. Costs one extra pass over `data` per
    /// evaluation; a no-op for networks without buffers. Errors when `data` does not fit
    /// the network.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Network, ResMlp};
    /// use modelfusion::{Model, Objective, StateDictF32};
    /// let d = data::digits()?.head(100);
    /// let net = ResMlp::new(64, 16, 32, 1, 10)?;
    /// let mut p: StateDictF32 = net.init(0);
    /// p.get_mut("blocks.0.norm.running_var").unwrap().fill(100.0); // stale statistics
    /// let plain = Classification::new(&net, &d, 50)?;
    /// let reset = plain.clone().with_reset_stats(&d)?;
    /// assert_ne!(plain.loss(&p)?, reset.loss(&p)?);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_reset_stats(mut self, data: &'a Dataset) -> Result<Self> {
        check_data(self.net, data)?;
        self.reset_stats = Some(data);
        Ok(self)
    }

    /// The network.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp};
    /// let (d, net) = (data::digits()?, Mlp::new(&[64, 10])?);
    /// assert_eq!(Classification::new(&net, &d, 8)?.net(), &net);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn net(&self) -> &'a N {
        self.net
    }

    /// The data set.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp};
    /// let (d, net) = (data::digits()?, Mlp::new(&[64, 10])?);
    /// assert_eq!(Classification::new(&net, &d, 8)?.data().len(), 1797);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn data(&self) -> &'a Dataset {
        self.data
    }

    /// The batch size.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp};
    /// let (d, net) = (data::digits()?, Mlp::new(&[64, 10])?);
    /// assert_eq!(Classification::new(&net, &d, 8)?.batch_size(), 8);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// How normalisation layers compute their statistics.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Mode};
    /// let (d, net) = (data::digits()?, Mlp::new(&[64, 10])?);
    /// assert_eq!(Classification::new(&net, &d, 8)?.mode(), Mode::Eval);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Mean cross-entropy and accuracy of `params` over the whole data set. Errors when
    /// `params` does not fit the network or the loss is not finite.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Network};
    /// let (d, net) = (data::digits()?.head(10), Mlp::new(&[64, 10])?);
    /// let e = Classification::new(&net, &d, 4)?.evaluate(&net.init::<ndarray::ArrayD<f64>>(1))?;
    /// assert!(e.loss > 0.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn evaluate<T: Tensor>(&self, params: &StateDict<T>) -> Result<Evaluation> {
        self.evaluate_by(params, |p, b| Ok(self.forward_batch(p, b)?.0))
    }

    /// Mean cross-entropy and accuracy over the data set from `logits(params, b)`, the
    /// logits of batch `b` (`params` after the statistics reset, if the task has one).
    pub(super) fn evaluate_by<T: Tensor>(
        &self,
        params: &StateDict<T>,
        logits: impl Fn(&StateDict<T>, usize) -> Result<Array2<T::Elem>> + Sync,
    ) -> Result<Evaluation> {
        let params = &*self.prepare(params)?;
        let (mut loss, mut correct) = (0.0, 0usize);
        self.ordered_batches(
            |b| {
                let z = logits(params, b)?;
                let labels = self.data.batch(b, self.batch_size)?.1;
                let (sum, _, c) = softmax_cross_entropy(z.view(), labels)?;
                Ok((sum, c))
            },
            |(sum, c)| {
                loss += sum;
                correct += c;
                Ok(())
            },
        )?;
        let n = self.data.len() as f64;
        let loss = self.finite(loss / n)?;
        Ok(Evaluation {
            loss,
            accuracy: correct as f64 / n,
            samples: self.data.len(),
        })
    }

    /// Fraction of samples classified correctly.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Network};
    /// let (d, net) = (data::digits()?.head(10), Mlp::new(&[64, 10])?);
    /// let a = Classification::new(&net, &d, 4)?.accuracy(&net.init::<ndarray::ArrayD<f32>>(1))?;
    /// assert!((0.0..=1.0).contains(&a));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn accuracy<T: Tensor>(&self, params: &StateDict<T>) -> Result<f64> {
        Ok(self.evaluate(params)?.accuracy)
    }

    /// The logits of every sample, in data-set order, `(samples, classes)`: average their
    /// [`softmax`](super::softmax) over models for an output ensemble.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Network};
    /// let (d, net) = (data::digits()?.head(10), Mlp::new(&[64, 10])?);
    /// let z = Classification::new(&net, &d, 4)?.logits(&net.init::<ndarray::ArrayD<f32>>(1))?;
    /// assert_eq!(z.dim(), (10, 10));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn logits<T: Tensor>(&self, params: &StateDict<T>) -> Result<Array2<T::Elem>> {
        let params = &*self.prepare(params)?;
        let mut parts = Vec::with_capacity(self.num_batches());
        self.ordered_batches(
            |b| Ok(self.forward_batch(params, b)?.0),
            |z| {
                parts.push(z);
                Ok(())
            },
        )?;
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        concatenate(Axis(0), &views).map_err(|e| Error::invalid("logits", e.to_string()))
    }

    /// Loss and accuracy of the output ensemble of `models`: the mean of their softmax
    /// probabilities, the baseline every fusion is compared with. The loss is the mean of
    /// `-ln p(label)` under the averaged probabilities.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Network};
    /// use modelfusion::StateDictF32;
    /// let (d, net) = (data::digits()?.head(50), Mlp::new(&[64, 10])?);
    /// let task = Classification::new(&net, &d, 16)?;
    /// let (a, b): (StateDictF32, StateDictF32) = (net.init(0), net.init(1));
    /// let single = task.evaluate(&a)?;
    /// let same = task.evaluate_ensemble(&[&a, &a])?;
    /// assert!((single.loss - same.loss).abs() < 1e-5 && single.accuracy == same.accuracy);
    /// assert!(task.evaluate_ensemble(&[&a, &b])?.loss < 3.0);
    /// assert!(task.evaluate_ensemble::<ndarray::ArrayD<f32>>(&[]).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn evaluate_ensemble<T: Tensor>(&self, models: &[&StateDict<T>]) -> Result<Evaluation> {
        if models.is_empty() {
            return Err(Error::empty("the list of ensemble members"));
        }
        let n = self.data.len();
        let mut probs = Array2::<f64>::zeros((n, self.net.num_classes()));
        for model in models {
            let logits = self.logits(model)?.mapv(|v| v.to_f64_lossless());
            probs += &super::softmax(logits.view());
        }
        probs /= models.len() as f64;
        let predictions = super::predict(probs.view());
        let mut loss = 0.0;
        let mut correct = 0;
        for ((row, &label), &pred) in probs.outer_iter().zip(self.data.y()).zip(&predictions) {
            loss -= row[label].max(f64::MIN_POSITIVE).ln();
            correct += usize::from(pred == label);
        }
        Ok(Evaluation {
            loss: self.finite(loss / n as f64)?,
            accuracy: correct as f64 / n as f64,
            samples: n,
        })
    }

    /// The mean loss and its gradient on one minibatch: batch `step % num_batches()`,
    /// cycling through the data set in order (shuffle it first with
    /// [`Dataset::shuffled`] for a random order). For stochastic training, e.g. as the
    /// per-step gradient of curve fitting:
    /// `|m, step| task.minibatch_loss_and_gradient(m, step)`.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Network};
    /// use modelfusion::{Model, StateDictF32};
    /// let (d, net) = (data::digits()?.shuffled(0), Mlp::new(&[64, 10])?);
    /// let task = Classification::new(&net, &d, 64)?;
    /// let p: StateDictF32 = net.init(0);
    /// let (loss, grad) = task.minibatch_loss_and_gradient(&p, 3)?;
    /// assert!(loss > 0.0 && grad.num_tensors() == 2);
    /// assert_eq!(task.minibatch_loss_and_gradient(&p, 3 + task.num_batches())?.0, loss);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn minibatch_loss_and_gradient<T: Tensor>(
        &self,
        params: &StateDict<T>,
        step: usize,
    ) -> Result<(f64, StateDict<T>)> {
        let b = step % self.num_batches().max(1);
        self.batch_gradient(&*self.prepare(params)?, b)
    }

    /// The mean loss and gradient of batch `b` at `params` as given.
    fn batch_gradient<T: Tensor>(
        &self,
        params: &StateDict<T>,
        b: usize,
    ) -> Result<(f64, StateDict<T>)> {
        let (x, y) = self.data.batch(b, self.batch_size)?;
        let x = convert_batch::<T::Elem>(x);
        let out = self
            .net
            .batch_loss_and_gradient(params, x.view(), y, self.mode)?;
        Ok((self.finite(out.loss)?, out.gradient))
    }

    /// `1 - accuracy` as an [`Objective`] (for loss barriers on the error rate).
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Network};
    /// use modelfusion::{Objective, StateDictF32};
    /// let (d, net) = (data::digits()?.head(10), Mlp::new(&[64, 10])?);
    /// let task = Classification::new(&net, &d, 4)?;
    /// let p: StateDictF32 = net.init(1);
    /// assert_eq!(task.error_rate().loss(&p)?, 1.0 - task.accuracy(&p)?);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn error_rate(&self) -> ErrorRate<'a, N> {
        ErrorRate(self.clone())
    }

    /// The inputs of every linear layer keyed by weight name, as [`Activations`]
    /// (RegMean).
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Network};
    /// use modelfusion::{Activations, StateDictF32};
    /// let (d, net) = (data::digits()?.head(10), Mlp::new(&[64, 8, 10])?);
    /// let inputs = Classification::new(&net, &d, 4)?.layer_inputs();
    /// let f = inputs.activations(&net.init::<ndarray::ArrayD<f32>>(1), 0)?;
    /// assert_eq!(f["layers.1.weight"].dim(), (4, 8));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn layer_inputs(&self) -> LayerInputs<'a, N> {
        LayerInputs(self.clone())
    }

    /// Number of batches the data set is evaluated in.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp};
    /// let (d, net) = (data::digits()?, Mlp::new(&[64, 10])?);
    /// assert_eq!(Classification::new(&net, &d, 1000)?.num_batches(), 2);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn num_batches(&self) -> usize {
        self.data.num_batches(self.batch_size)
    }

    fn forward_batch<T: Tensor>(
        &self,
        params: &StateDict<T>,
        b: usize,
    ) -> Result<ForwardPass<N, T>> {
        let (x, _) = self.data.batch(b, self.batch_size)?;
        let x = convert_batch::<T::Elem>(x);
        self.net.forward(params, x.view(), self.mode)
    }

    /// `params`, with fresh running statistics if the task resets them.
    pub(super) fn prepare<'m, T: Tensor>(
        &self,
        params: &'m StateDict<T>,
    ) -> Result<Cow<'m, StateDict<T>>> {
        match self.reset_stats {
            Some(data) => Ok(Cow::Owned(reset_running_stats(
                self.net,
                params,
                data,
                self.batch_size,
            )?)),
            None => Ok(Cow::Borrowed(params)),
        }
    }

    pub(super) fn finite(&self, loss: f64) -> Result<f64> {
        if loss.is_finite() {
            Ok(loss)
        } else {
            Err(Error::NonFinite {
                what: format!("the loss of the {} on the data set", self.net.describe()),
            })
        }
    }

    /// Runs `map` on every batch, a few in parallel at a time, and feeds the results to
    /// `fold` in batch order (deterministic, bounded memory).
    pub(super) fn ordered_batches<R: Send>(
        &self,
        map: impl Fn(usize) -> Result<R> + Sync,
        mut fold: impl FnMut(R) -> Result<()>,
    ) -> Result<()> {
        let nb = self.num_batches();
        let window = 2 * rayon::current_num_threads().max(1);
        for start in (0..nb).step_by(window) {
            let results: Vec<R> = (start..(start + window).min(nb))
                .into_par_iter()
                .map(&map)
                .collect::<Result<_>>()?;
            for r in results {
                fold(r)?;
            }
        }
        Ok(())
    }
}

impl<N: Network, T: Tensor> Objective<StateDict<T>> for Classification<'_, N> {
    fn loss(&self, model: &StateDict<T>) -> Result<f64> {
        Ok(self.evaluate(model)?.loss)
    }
}

impl<N: Network, T: Tensor> Gradient<StateDict<T>> for Classification<'_, N> {
    fn loss_and_gradient(&self, model: &StateDict<T>) -> Result<(f64, StateDict<T>)> {
        let n = self.data.len() as f64;
        let mut loss = 0.0;
        let mut total: Option<StateDict<T>> = None;
        let model = &*self.prepare(model)?;
        self.ordered_batches(
            |b| {
                let size = self.data.batch(b, self.batch_size)?.1.len() as f64;
                let (batch_loss, grad) = self.batch_gradient(model, b)?;
                Ok((batch_loss, size, grad))
            },
            |(batch_loss, size, grad)| {
                loss += batch_loss * size;
                let w = T::Elem::from_f64_lossy(size / n);
                match total.as_mut() {
                    None => total = Some(grad.scale(size / n)?),
                    Some(acc) => {
                        for (name, g) in grad.iter() {
                            acc.get_mut(name)
                                .ok_or_else(|| Error::MissingParam {
                                    name: name.to_string(),
                                    context: "the accumulated gradient".into(),
                                })?
                                .axpy(w, g)?;
                        }
                    }
                }
                Ok(())
            },
        )?;
        let loss = self.finite(loss / n)?;
        let grad = total.ok_or_else(|| Error::empty("the data set"))?;
        Ok((loss, grad))
    }
}

impl<N: Network, T: Tensor> Activations<StateDict<T>> for Classification<'_, N> {
    fn num_batches(&self) -> usize {
        Classification::num_batches(self)
    }

    fn activations(&self, model: &StateDict<T>, batch: usize) -> Result<Features<T::Elem>> {
        let (_, cache) = self.forward_batch(model, batch)?;
        Ok(self.net.group_features(&cache))
    }
}

/// The error rate `1 - accuracy` of a [`Classification`] task, as an [`Objective`].
/// Build it with [`Classification::error_rate`].
///
/// ```
/// use modelfusion::nn::{data, Classification, Mlp, Network};
/// use modelfusion::{Objective, StateDictF64};
/// let (d, net) = (data::digits()?.head(20), Mlp::new(&[64, 10])?);
/// let err = Classification::new(&net, &d, 8)?.error_rate();
/// let p: StateDictF64 = net.init(0);
/// assert!((0.0..=1.0).contains(&err.loss(&p)?));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ErrorRate<'a, N>(Classification<'a, N>);

impl<N: Network, T: Tensor> Objective<StateDict<T>> for ErrorRate<'_, N> {
    fn loss(&self, model: &StateDict<T>) -> Result<f64> {
        Ok(1.0 - self.0.evaluate(model)?.accuracy)
    }
}

/// The input of every linear layer of a [`Classification`] task's network, keyed by the
/// layer's weight name (`layers.{i}.weight`, `stem.weight`, `blocks.{j}.fc1.weight`,
/// ...), as [`Activations`]: the features RegMean's Gram matrices are built from. Build
/// it with [`Classification::layer_inputs`].
///
/// ```
/// use modelfusion::nn::{data, Classification, Network, ResMlp};
/// use modelfusion::{Activations, StateDictF32};
/// let (d, net) = (data::digits()?.head(20), ResMlp::new(64, 8, 16, 1, 10)?);
/// let inputs = Classification::new(&net, &d, 8)?.layer_inputs();
/// assert_eq!(inputs.num_batches(), 3);
/// let p: StateDictF32 = net.init(0);
/// let f = inputs.activations(&p, 2)?;
/// assert_eq!(f["blocks.0.fc2.weight"].dim(), (4, 16));
/// assert_eq!(f["head.weight"].dim(), (4, 8));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct LayerInputs<'a, N>(Classification<'a, N>);

impl<N: Network> LayerInputs<'_, N> {
    /// Number of batches the data set is read in.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp};
    /// let (d, net) = (data::digits()?, Mlp::new(&[64, 10])?);
    /// assert_eq!(Classification::new(&net, &d, 1000)?.layer_inputs().num_batches(), 2);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn num_batches(&self) -> usize {
        self.0.num_batches()
    }
}

impl<N: Network, T: Tensor> Activations<StateDict<T>> for LayerInputs<'_, N> {
    fn num_batches(&self) -> usize {
        LayerInputs::num_batches(self)
    }

    fn activations(&self, model: &StateDict<T>, batch: usize) -> Result<Features<T::Elem>> {
        let (_, cache) = self.0.forward_batch(model, batch)?;
        Ok(self.0.net.layer_inputs(&cache))
    }
}
