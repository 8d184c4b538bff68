//! Losses on logits other than cross-entropy: the Shannon entropy of the predictions
//! (AdaMerging's unsupervised objective), and the objective that evaluates it on an
//! unlabelled data set in seeded minibatches.

use ndarray::{Array2, ArrayView2};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::StateDict;
use crate::objective::{Objective, StochasticGradient};
use crate::tensor::{Scalar, Tensor};

use super::data::{Dataset, check_batch_size};
use super::layers::{argmax_row, convert_batch, gather_rows};
use super::train::check_data;
use super::{Mode, Network};

/// Mean Shannon entropy `H = -sum_c p_c ln p_c` of the row-wise softmax `p` of logits
/// `(samples, classes)`, and its gradient with respect to the logits,
/// `dH_n/dz_j = -p_j (ln p_j + H_n) / samples`. Computed stably (log-sum-exp). Errors
/// on an empty batch or non-finite logits (naming the sample).
///
/// ```
/// use modelfusion::nn::softmax_entropy;
/// use ndarray::array;
/// let (h, g) = softmax_entropy(array![[0.0f64, 0.0], [100.0, 0.0]].view())?;
/// assert!((h - 2f64.ln() / 2.0).abs() < 1e-12); // ln 2 for the uniform row, 0 for the sure one
/// assert!(g[[0, 0]].abs() < 1e-12); // the uniform row is a stationary point
/// assert!(softmax_entropy(array![[f64::NAN, 0.0]].view()).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn softmax_entropy<S: Scalar>(logits: ArrayView2<S>) -> Result<(f64, Array2<S>)> {
    let (n, c) = logits.dim();
    if n == 0 || c == 0 {
        return Err(Error::empty("the logits of the entropy (samples, classes)"));
    }
    let mut grad = Array2::<S>::zeros((n, c));
    let mut total = 0.0f64;
    for (i, row) in logits.outer_iter().enumerate() {
        let (_, max) = argmax_row(row);
        if !max.is_finite() || row.iter().any(|z| !z.to_f64_lossless().is_finite()) {
            return Err(Error::NonFinite {
                what: format!("logits of sample {i}"),
            });
        }
        let lse = max
            + row
                .iter()
                .map(|&z| (z.to_f64_lossless() - max).exp())
                .sum::<f64>()
                .ln();
        let logp: Vec<f64> = row.iter().map(|&z| z.to_f64_lossless() - lse).collect();
        let h: f64 = -logp.iter().map(|&l| l.exp() * l).sum::<f64>();
        total += h;
        for (g, &l) in grad.row_mut(i).iter_mut().zip(&logp) {
            *g = S::from_f64_lossy(-l.exp() * (l + h) / n as f64);
        }
    }
    Ok((total / n as f64, grad))
}

/// The prediction entropy of a network on unlabelled inputs (the labels of the data set
/// are ignored), AdaMerging's objective: [`Objective`] is the mean entropy over the whole
/// data set; [`StochasticGradient`] the mean entropy and its gradient on a minibatch of
/// `batch_size` samples drawn without replacement at every step, seeded by
/// `(seed, step)` (the same step always sees the same batch). Buffers get a zero
/// gradient; normalisation uses running statistics unless switched with
/// [`with_mode`](Entropy::with_mode).
///
/// ```
/// use modelfusion::nn::{data, Entropy, Mlp, Network};
/// use modelfusion::{Model, Objective, StateDictF32, StochasticGradient};
/// let d = data::digits()?.head(100);
/// let net = Mlp::new(&[64, 16, 10])?;
/// let p: StateDictF32 = net.init(0);
/// let mut h = Entropy::new(&net, &d, 32, 7)?;
/// assert!(h.loss(&p)? <= 10f64.ln() + 1e-6);
/// let (l, g) = h.loss_and_gradient_at(&p, 3)?;
/// assert_eq!(h.loss_and_gradient_at(&p, 3)?.0, l); // seeded per step
/// assert_eq!(g.num_tensors(), p.num_tensors());
/// assert!(Entropy::new(&net, &d, 0, 7).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Entropy<'a, N> {
    net: &'a N,
    data: &'a Dataset,
    batch_size: usize,
    seed: u64,
    mode: Mode,
}

impl<'a, N: Network> Entropy<'a, N> {
    /// The entropy of `net` on `data` in minibatches of `batch_size` (at most the data
    /// set's size is used) seeded by `seed`. Errors on a zero batch size, an empty data
    /// set or one whose feature count is not the network's input width.
    ///
    /// ```
    /// use modelfusion::nn::{data, Entropy, Mlp};
    /// let d = data::digits()?;
    /// let e = Entropy::new(&Mlp::new(&[32, 10])?, &d, 64, 0).unwrap_err().to_string();
    /// assert!(e.contains("[1797, 32]"), "{e}");
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(net: &'a N, data: &'a Dataset, batch_size: usize, seed: u64) -> Result<Self> {
        check_batch_size(batch_size)?;
        check_data(net, data)?;
        Ok(Entropy {
            net,
            data,
            batch_size,
            seed,
            mode: Mode::Eval,
        })
    }

    /// The same objective with normalisation in `mode`.
    ///
    /// ```
    /// use modelfusion::nn::{data, Entropy, Mlp, Mode};
    /// let d = data::digits()?;
    /// let net = Mlp::new(&[64, 10])?;
    /// assert_eq!(Entropy::new(&net, &d, 8, 0)?.with_mode(Mode::Train).mode(), Mode::Train);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// The normalisation mode.
    ///
    /// ```
    /// use modelfusion::nn::{data, Entropy, Mlp, Mode};
    /// let d = data::digits()?;
    /// assert_eq!(Entropy::new(&Mlp::new(&[64, 10])?, &d, 8, 0)?.mode(), Mode::Eval);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The sample indices of step `step`'s minibatch (distinct, in draw order).
    ///
    /// ```
    /// use modelfusion::nn::{data, Entropy, Mlp};
    /// let d = data::digits()?.head(10);
    /// let net = Mlp::new(&[64, 10])?;
    /// let h = Entropy::new(&net, &d, 4, 1)?;
    /// let b = h.batch_indices(0);
    /// assert_eq!(b.len(), 4);
    /// assert!(b.iter().all(|&i| i < 10));
    /// assert_eq!(h.batch_indices(0), b);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn batch_indices(&self, step: usize) -> Vec<usize> {
        let n = self.data.len();
        let k = self.batch_size.min(n);
        let stream = self.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut rng = ChaCha8Rng::seed_from_u64(stream);
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = rng.random_range(i..n);
            idx.swap(i, j);
        }
        idx.truncate(k);
        idx
    }

    /// Mean entropy and its gradient on the given rows.
    fn on_rows<T: Tensor>(
        &self,
        params: &StateDict<T>,
        rows: &[usize],
    ) -> Result<(f64, StateDict<T>)> {
        let x = gather_rows::<T::Elem>(self.data.x().view(), rows);
        self.net
            .batch_logit_loss_and_gradient(params, x.view(), self.mode, softmax_entropy)
    }
}

impl<N: Network, T: Tensor> Objective<StateDict<T>> for Entropy<'_, N> {
    fn loss(&self, model: &StateDict<T>) -> Result<f64> {
        let mut total = 0.0;
        for (x, _) in self.data.batches(self.batch_size)? {
            let x = convert_batch::<T::Elem>(x);
            let (logits, _) = self.net.forward(model, x.view(), self.mode)?;
            total += softmax_entropy(logits.view())?.0 * x.nrows() as f64;
        }
        Ok(total / self.data.len() as f64)
    }
}

impl<N: Network, T: Tensor> StochasticGradient<StateDict<T>> for Entropy<'_, N> {
    fn loss_and_gradient_at(
        &mut self,
        model: &StateDict<T>,
        step: usize,
    ) -> Result<(f64, StateDict<T>)> {
        self.on_rows(model, &self.batch_indices(step))
    }
}
