//! Averaging: uniform and weighted averages of whole models, and streaming averagers that
//! take one model at a time (SWA, EMA, LAWA, SWAG).

use std::collections::VecDeque;

use ndarray::Zip;
use rand::RngExt;
use rand_distr::StandardNormal;

use super::kernel::{self, check_count, check_shapes, check_weights};
use super::{Merger, TensorMerger};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::{Scalar, Tensor};

/// Uniform or weighted average of models, `sum_i w_i theta_i` (divided by `sum_i w_i`
/// when normalising). A uniform average of fine-tuned ingredients is a *uniform soup*.
///
/// Runs in one pass over the inputs per output block, in parallel over large tensors.
///
/// ```
/// use modelfusion::merge::{Average, Merger};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let a = StateDict::from_pairs([("w", arr1(&[0.0f32, 4.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[2.0f32, 0.0]).into_dyn())])?;
/// let mean = Average::uniform().merge(&[&a, &b])?;
/// assert_eq!(mean.get("w").unwrap().as_slice().unwrap(), &[1.0, 2.0]);
/// let w = Average::weighted(vec![3.0, 1.0], true)?.merge(&[&a, &b])?;
/// assert_eq!(w.get("w").unwrap().as_slice().unwrap(), &[0.5, 3.0]);
/// // Weights that sum to zero cannot be normalised.
/// assert!(Average::weighted(vec![1.0, -1.0], true).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Average {
    /// The weights as given (`None`: uniform).
    weights: Option<Vec<f64>>,
    /// Divide by the weights' sum.
    normalize: bool,
}

impl Average {
    /// The plain mean of all inputs (uniform soup).
    ///
    /// ```
    /// use modelfusion::merge::{Average, TensorMerger};
    /// use ndarray::{arr1, ArrayD};
    /// let (a, b) = (arr1(&[1.0f64]).into_dyn(), arr1(&[3.0f64]).into_dyn());
    /// let m: ArrayD<f64> = Average::uniform().merge_tensor("w", &[&a, &b])?;
    /// assert_eq!(m[[0]], 2.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn uniform() -> Self {
        Average {
            weights: None,
            normalize: false,
        }
    }

    /// `sum_i w_i theta_i`, divided by `sum_i w_i` when `normalize` (the usual choice,
    /// mergekit's default). Errors on an empty or non-finite weight list, and on weights
    /// summing to zero when normalising. Computed as mergekit's `linear` computes it, so
    /// that results agree to the bit: the weights rounded to the element type, the
    /// products accumulated in model order by fused multiply-adds (torch's `addcmul_`),
    /// the sum divided by the element-type sum of the weights.
    ///
    /// ```
    /// use modelfusion::merge::Average;
    /// assert!(Average::weighted(vec![], false).is_err());
    /// assert!(Average::weighted(vec![f64::NAN], false).is_err());
    /// assert!(Average::weighted(vec![2.0, -2.0], false).is_ok()); // a plain sum is fine
    /// ```
    pub fn weighted(weights: Vec<f64>, normalize: bool) -> Result<Self> {
        check_weights(&weights, "weights")?;
        if normalize {
            let s: f64 = weights.iter().sum();
            if s == 0.0 || !s.is_finite() {
                return Err(Error::invalid(
                    "weights",
                    format!("sum to {s}; cannot normalise (weights {weights:?})"),
                ));
            }
        }
        Ok(Average {
            weights: Some(weights),
            normalize,
        })
    }

    /// The effective weights for `n` models (after normalisation).
    ///
    /// ```
    /// use modelfusion::merge::Average;
    /// assert_eq!(Average::uniform().weights_for(4)?, vec![0.25; 4]);
    /// assert!(Average::weighted(vec![1.0], true)?.weights_for(2).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn weights_for(&self, n: usize) -> Result<Vec<f64>> {
        match &self.weights {
            None if n == 0 => Err(Error::empty("the list of models")),
            None => Ok(vec![1.0 / n as f64; n]),
            Some(w) => {
                check_count(w.len(), n, "weights", "any")?;
                let s: f64 = if self.normalize { w.iter().sum() } else { 1.0 };
                Ok(w.iter().map(|w| w / s).collect())
            }
        }
    }

    /// The weights to multiply by and the divisor (in the element type) for `n` models.
    fn coefficients<E: Scalar>(&self, name: &str, n: usize) -> Result<(Vec<f64>, Option<E>)> {
        match &self.weights {
            Some(w) if self.normalize => {
                check_count(w.len(), n, "weights", name)?;
                let mut div = E::zero();
                for &x in w {
                    div += E::from_f64_lossy(x);
                }
                if div == E::zero() || !div.is_finite() {
                    return Err(Error::invalid(
                        "weights",
                        format!(
                            "sum to {div} in {}; cannot normalise (weights {w:?})",
                            E::NAME
                        ),
                    ));
                }
                Ok((w.clone(), Some(div)))
            }
            _ => Ok((self.weights_for(n).map_err(|e| rename(e, name))?, None)),
        }
    }
}

impl Average {
    /// Merges one tensor into a caller-provided buffer (row-major, the tensor's length),
    /// e.g. to reuse one output buffer across a streamed merge. Same result as
    /// [`merge_tensor`](TensorMerger::merge_tensor).
    ///
    /// ```
    /// use modelfusion::merge::Average;
    /// use ndarray::arr1;
    /// let (a, b) = (arr1(&[1.0f32, 2.0]).into_dyn(), arr1(&[3.0f32, 4.0]).into_dyn());
    /// let mut out = vec![0.0f32; 2];
    /// Average::uniform().merge_tensor_into("w", &[&a, &b], &mut out)?;
    /// assert_eq!(out, vec![2.0, 3.0]);
    /// assert!(Average::uniform().merge_tensor_into("w", &[&a, &b], &mut [0.0f32; 3]).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn merge_tensor_into<T: Tensor>(
        &self,
        name: &str,
        tensors: &[&T],
        out: &mut [T::Elem],
    ) -> Result<()> {
        check_shapes(name, tensors)?;
        kernel::check_out_len(name, out.len(), tensors[0].len())?;
        let (w, div) = self.coefficients(name, tensors.len())?;
        kernel::weighted_sum_tensors_into(tensors, &w, kernel::Accumulate::Linear { div }, out);
        check_average(name, tensors, &w, out)
    }
}

impl<T: Tensor> TensorMerger<T> for Average {
    fn merge_tensor(&self, name: &str, tensors: &[&T]) -> Result<T> {
        check_shapes(name, tensors)?;
        check_shapes(name, tensors)?;
        let mut out = kernel::zeros(tensors[0].len());
        self.merge_tensor_into(name, tensors, &mut out)?;
        kernel::build(tensors[0].shape(), out)
    }
}

/// Errors unless a weighted average is finite: names the input holding a NaN or an
/// infinity, or the weights that made finite inputs overflow.
fn check_average<T: Tensor>(name: &str, tensors: &[&T], w: &[f64], out: &[T::Elem]) -> Result<()> {
    kernel::check_merged(name, tensors, &[], out, || {
        let largest = w.iter().fold(0.0f64, |s, x| s.max(x.abs()));
        kernel::overflow_error(
            "weights",
            format!("a weight of magnitude {largest:e}"),
            name,
        )
    })
}

fn rename(e: Error, name: &str) -> Error {
    match e {
        Error::InvalidParameter { param, reason } => Error::InvalidParameter {
            param,
            reason: reason.replace("`any`", &format!("`{name}`")),
        },
        other => other,
    }
}

/// `acc += a * (x - acc)` over every parameter (running means, EMA).
pub(crate) fn blend_into<M: Model>(acc: &mut M, x: &M, a: f64) -> Result<()> {
    acc.check_compatible(x)?;
    let a = <<M::Tensor as Tensor>::Elem as Scalar>::from_f64_lossy(a);
    let names: Vec<String> = acc.names().map(str::to_string).collect();
    for name in names {
        let src = x.require(&name, "the new model")?;
        let dst = acc.get_mut(&name).ok_or_else(|| Error::MissingParam {
            name: name.clone(),
            context: "the running average".into(),
        })?;
        Zip::from(&mut dst.view_mut())
            .and(&src.view())
            .par_for_each(|d, &s| *d += a * (s - *d));
    }
    Ok(())
}

/// Stochastic weight averaging: the running mean of the models seen so far,
/// `avg += (theta - avg) / (n + 1)`, without keeping them.
///
/// ```
/// use modelfusion::merge::Swa;
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let mut swa = Swa::new();
/// for v in [1.0f64, 2.0, 6.0] {
///     swa.update(&StateDict::from_pairs([("w", arr1(&[v]).into_dyn())])?)?;
/// }
/// assert_eq!(swa.count(), 3);
/// assert_eq!(swa.average().unwrap().get("w").unwrap()[[0]], 3.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Swa<M> {
    mean: Option<M>,
    count: usize,
}

impl<M: Model> Default for Swa<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Model> Swa<M> {
    /// An empty average.
    ///
    /// ```
    /// let swa = modelfusion::merge::Swa::<modelfusion::StateDictF32>::new();
    /// assert!(swa.average().is_none());
    /// ```
    pub fn new() -> Self {
        Swa {
            mean: None,
            count: 0,
        }
    }

    /// Adds one model to the average; errors if it does not match the earlier ones.
    ///
    /// ```
    /// use modelfusion::merge::Swa;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let mut swa = Swa::new();
    /// swa.update(&StateDict::from_pairs([("w", arr1(&[1.0f32]).into_dyn())])?)?;
    /// assert!(swa.update(&StateDict::from_pairs([("v", arr1(&[1.0f32]).into_dyn())])?).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn update(&mut self, model: &M) -> Result<()> {
        model.check_finite(&format!("the model of SWA update {}", self.count))?;
        match &mut self.mean {
            None => self.mean = Some(model.clone()),
            Some(mean) => blend_into(mean, model, 1.0 / (self.count as f64 + 1.0))?,
        }
        self.count += 1;
        Ok(())
    }

    /// Number of models averaged so far.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Swa::<modelfusion::StateDictF64>::new().count(), 0);
    /// ```
    pub fn count(&self) -> usize {
        self.count
    }

    /// The current average, `None` before the first update.
    ///
    /// ```
    /// use modelfusion::merge::Swa;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let mut swa = Swa::new();
    /// let m = StateDict::from_pairs([("w", arr1(&[1.0f32]).into_dyn())])?;
    /// swa.update(&m)?;
    /// assert_eq!(swa.average(), Some(&m));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn average(&self) -> Option<&M> {
        self.mean.as_ref()
    }
}

/// Exponential moving average: `ema = decay * ema + (1 - decay) * theta`, started at
/// the first model. `decay` must be in `[0, 1)` (0.999 is common).
///
/// ```
/// use modelfusion::merge::Ema;
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let mut ema = Ema::new(0.5)?;
/// for v in [0.0f64, 4.0] {
///     ema.update(&StateDict::from_pairs([("w", arr1(&[v]).into_dyn())])?)?;
/// }
/// assert_eq!(ema.average().unwrap().get("w").unwrap()[[0]], 2.0);
/// assert!(Ema::<modelfusion::StateDictF64>::new(1.0).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Ema<M> {
    decay: f64,
    ema: Option<M>,
    count: usize,
}

impl<M: Model> Ema<M> {
    /// An empty EMA; errors unless `0 <= decay < 1`.
    ///
    /// ```
    /// use modelfusion::merge::Ema;
    /// assert!(Ema::<modelfusion::StateDictF32>::new(-0.1).is_err());
    /// assert!(Ema::<modelfusion::StateDictF32>::new(0.999).is_ok());
    /// ```
    pub fn new(decay: f64) -> Result<Self> {
        crate::error::check_unit("decay", decay)?;
        Ok(Ema {
            decay,
            ema: None,
            count: 0,
        })
    }

    /// Folds one model into the average.
    ///
    /// ```
    /// use modelfusion::merge::Ema;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let mut ema = Ema::new(0.9)?;
    /// ema.update(&StateDict::from_pairs([("w", arr1(&[1.0f32]).into_dyn())])?)?;
    /// assert_eq!(ema.count(), 1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn update(&mut self, model: &M) -> Result<()> {
        model.check_finite(&format!("the model of EMA update {}", self.count))?;
        match &mut self.ema {
            None => self.ema = Some(model.clone()),
            Some(e) => blend_into(e, model, 1.0 - self.decay)?,
        }
        self.count += 1;
        Ok(())
    }

    /// Number of models folded in.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Ema::<modelfusion::StateDictF32>::new(0.5)?.count(), 0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn count(&self) -> usize {
        self.count
    }

    /// The current average, `None` before the first update.
    ///
    /// ```
    /// assert!(modelfusion::merge::Ema::<modelfusion::StateDictF32>::new(0.5)?.average().is_none());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn average(&self) -> Option<&M> {
        self.ema.as_ref()
    }
}

/// Latest weight averaging: the uniform mean of the last `k` models seen (it keeps those
/// `k` models).
///
/// ```
/// use modelfusion::merge::Lawa;
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let mut lawa = Lawa::new(2)?;
/// for v in [100.0f64, 1.0, 3.0] {
///     lawa.update(&StateDict::from_pairs([("w", arr1(&[v]).into_dyn())])?)?;
/// }
/// assert_eq!(lawa.average()?.get("w").unwrap()[[0]], 2.0);
/// assert!(Lawa::<modelfusion::StateDictF64>::new(0).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Lawa<M> {
    k: usize,
    window: VecDeque<M>,
}

impl<M: Model> Lawa<M> {
    /// An empty window of size `k >= 1`.
    ///
    /// ```
    /// assert!(modelfusion::merge::Lawa::<modelfusion::StateDictF32>::new(5).is_ok());
    /// ```
    pub fn new(k: usize) -> Result<Self> {
        if k == 0 {
            return Err(Error::invalid("k", "the window must hold at least 1 model"));
        }
        Ok(Lawa {
            k,
            window: VecDeque::with_capacity(k),
        })
    }

    /// Adds a model, dropping the oldest one beyond `k`; errors if it does not match
    /// the models in the window.
    ///
    /// ```
    /// use modelfusion::merge::Lawa;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let mut l = Lawa::new(1)?;
    /// l.update(&StateDict::from_pairs([("w", arr1(&[1.0f32]).into_dyn())])?)?;
    /// assert!(l.update(&StateDict::from_pairs([("w", arr1(&[1.0f32, 2.0]).into_dyn())])?).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn update(&mut self, model: &M) -> Result<()> {
        model.check_finite("the model given to LAWA")?;
        if let Some(first) = self.window.front() {
            first.check_compatible(model)?;
        }
        if self.window.len() == self.k {
            self.window.pop_front();
        }
        self.window.push_back(model.clone());
        Ok(())
    }

    /// Number of models in the window.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Lawa::<modelfusion::StateDictF32>::new(3)?.len(), 0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.window.len()
    }

    /// True before the first update.
    ///
    /// ```
    /// assert!(modelfusion::merge::Lawa::<modelfusion::StateDictF32>::new(3)?.is_empty());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }

    /// The mean of the models in the window; errors when it is empty.
    ///
    /// ```
    /// assert!(modelfusion::merge::Lawa::<modelfusion::StateDictF32>::new(3)?.average().is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn average(&self) -> Result<M> {
        let models: Vec<&M> = self.window.iter().collect();
        Average::uniform().merge(&models)
    }
}

/// SWAG (Maddox et al. 2019): a Gaussian over the SWA iterates with a diagonal plus
/// low-rank covariance,
/// `Sigma = diag(mean(theta^2) - mean(theta)^2) / 2 + D D^T / (2 (K - 1))`, where the
/// `K <= max_rank` columns of `D` are the last deviations `theta_i - mean_i` (running
/// mean after step `i`). Sampling draws
/// `mean + scale * (sqrt(diag) * z1 / sqrt(2) + D z2 / sqrt(2 (K - 1)))`, `z1, z2 ~ N(0, I)`;
/// the low-rank term needs `K >= 2` deviations and is left out before that.
///
/// ```
/// use modelfusion::merge::Swag;
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let mut swag = Swag::new(5)?;
/// for v in [1.0f64, 2.0, 3.0] {
///     swag.update(&StateDict::from_pairs([("w", arr1(&[v, -v]).into_dyn())])?)?;
/// }
/// assert_eq!(swag.mean().unwrap().get("w").unwrap()[[0]], 2.0);
/// let var = swag.variance()?;
/// assert!((var.get("w").unwrap()[[0]] - 2.0 / 3.0).abs() < 1e-12);
/// let s1 = swag.sample(42, 1.0)?;
/// assert_eq!(s1, swag.sample(42, 1.0)?); // seeded
/// assert_eq!(&swag.sample(7, 0.0)?, swag.mean().unwrap()); // scale 0 gives the mean
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Swag<M> {
    max_rank: usize,
    count: usize,
    mean: Option<M>,
    sq_mean: Option<M>,
    deviations: VecDeque<M>,
}

impl<M: Model> Swag<M> {
    /// An empty SWAG posterior keeping at most `max_rank` deviation columns (0 gives the
    /// diagonal-only SWAG; the paper uses 20).
    ///
    /// ```
    /// assert!(modelfusion::merge::Swag::<modelfusion::StateDictF32>::new(20).is_ok());
    /// ```
    pub fn new(max_rank: usize) -> Result<Self> {
        Ok(Swag {
            max_rank,
            count: 0,
            mean: None,
            sq_mean: None,
            deviations: VecDeque::with_capacity(max_rank),
        })
    }

    /// Folds one iterate into the moments and the deviation window.
    ///
    /// ```
    /// use modelfusion::merge::Swag;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let mut s = Swag::new(2)?;
    /// s.update(&StateDict::from_pairs([("w", arr1(&[1.0f32]).into_dyn())])?)?;
    /// assert_eq!(s.count(), 1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn update(&mut self, model: &M) -> Result<()> {
        model.check_finite(&format!("the model of SWAG update {}", self.count))?;
        let sq = model.try_map(|_, t| Ok(t.map(|x| x * x)))?;
        sq.check_finite(&format!(
            "the squares (second moment) of the model of SWAG update {}: an element is too large to square",
            self.count
        ))?;
        match (&mut self.mean, &mut self.sq_mean) {
            (Some(mean), Some(sq_mean)) => {
                let a = 1.0 / (self.count as f64 + 1.0);
                blend_into(mean, model, a)?;
                blend_into(sq_mean, &sq, a)?;
            }
            _ => {
                self.mean = Some(model.clone());
                self.sq_mean = Some(sq);
            }
        }
        self.count += 1;
        if self.max_rank > 0 {
            if let Some(mean) = &self.mean {
                if self.deviations.len() == self.max_rank {
                    self.deviations.pop_front();
                }
                self.deviations.push_back(model.sub(mean)?);
            }
        }
        Ok(())
    }

    /// Number of iterates seen.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Swag::<modelfusion::StateDictF32>::new(2)?.count(), 0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn count(&self) -> usize {
        self.count
    }

    /// The SWA mean, `None` before the first update.
    ///
    /// ```
    /// assert!(modelfusion::merge::Swag::<modelfusion::StateDictF32>::new(2)?.mean().is_none());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn mean(&self) -> Option<&M> {
        self.mean.as_ref()
    }

    /// The stored deviation columns, oldest first.
    ///
    /// ```
    /// assert!(modelfusion::merge::Swag::<modelfusion::StateDictF32>::new(2)?.deviations().is_empty());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn deviations(&self) -> &VecDeque<M> {
        &self.deviations
    }

    /// The diagonal variance `max(mean(theta^2) - mean(theta)^2, 0)`; errors before the
    /// first update.
    ///
    /// ```
    /// assert!(modelfusion::merge::Swag::<modelfusion::StateDictF32>::new(2)?.variance().is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn variance(&self) -> Result<M> {
        let (mean, sq) = self.moments()?;
        sq.zip_map(mean, |_, s, m| {
            s.zip_map(m, |s2, m1| {
                let v = s2 - m1 * m1;
                if v > <<M::Tensor as Tensor>::Elem as num_traits::Zero>::zero() {
                    v
                } else {
                    num_traits::Zero::zero()
                }
            })
        })
    }

    fn moments(&self) -> Result<(&M, &M)> {
        match (&self.mean, &self.sq_mean) {
            (Some(m), Some(s)) => Ok((m, s)),
            _ => Err(Error::empty("the SWAG iterates (call update first)")),
        }
    }

    /// One sample from the SWAG Gaussian, reproducible for `seed` (independent of thread
    /// count and parameter order). `scale` multiplies the covariance's square root
    /// (0 returns the mean).
    ///
    /// ```
    /// use modelfusion::merge::Swag;
    /// assert!(Swag::<modelfusion::StateDictF32>::new(2)?.sample(0, 1.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn sample(&self, seed: u64, scale: f64) -> Result<M> {
        crate::error::check_nonnegative("scale", scale)?;
        let var = self.variance()?;
        let (mean, _) = self.moments()?;
        if scale == 0.0 {
            return Ok(mean.clone());
        }
        let k = self.deviations.len();
        let z2: Vec<f64> = if k >= 2 {
            let mut rng = kernel::chunk_rng(seed, "\u{0}swag-low-rank", 0, 0);
            (0..k)
                .map(|_| rng.sample::<f64, _>(StandardNormal))
                .collect()
        } else {
            Vec::new()
        };
        let c_low = if k >= 2 {
            scale / (2.0 * (k as f64 - 1.0)).sqrt()
        } else {
            0.0
        };
        let c_diag = scale / 2f64.sqrt();
        type E<M> = <<M as Model>::Tensor as Tensor>::Elem;
        mean.try_map(|name, mt| {
            let m = kernel::elems(mt);
            let v = var.require(name, "the SWAG variance")?;
            let v = kernel::elems(v);
            let devs = self
                .deviations
                .iter()
                .map(|d| d.require(name, "a SWAG deviation").map(kernel::elems))
                .collect::<Result<Vec<_>>>()?;
            let mut out: Vec<E<M>> = kernel::zeros(m.len());
            kernel::for_chunks(&mut out, |c, start, o| {
                let mut rng = kernel::chunk_rng(seed, name, 0, c);
                for (j, x) in o.iter_mut().enumerate() {
                    let i = start + j;
                    let z: f64 = rng.sample(StandardNormal);
                    let mut val =
                        m[i].to_f64_lossless() + c_diag * v[i].to_f64_lossless().sqrt() * z;
                    if !z2.is_empty() {
                        let low: f64 = devs
                            .iter()
                            .zip(&z2)
                            .map(|(d, &zk)| d[i].to_f64_lossless() * zk)
                            .sum();
                        val += c_low * low;
                    }
                    *x = E::<M>::from_f64_lossy(val);
                }
            });
            if !kernel::all_finite(&out) {
                return Err(Error::invalid(
                    "scale",
                    format!("{scale:e} makes the SWAG sample of parameter `{name}` overflow to a non-finite value"),
                ));
            }
            kernel::build(mt.shape(), out)
        })
    }
}
