//! Merges of one model into its base, entry by entry: [`ArceeFusion`] keeps the changes
//! that matter most, [`NearSwap`] takes the model's values where they are close to the
//! base's.

use rand::Rng;
use rayon::prelude::*;

use num_traits::{Float, One, Zero};

use super::TensorMerger;
use super::kernel;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::{Scalar, Tensor};

/// mergekit estimates the quantiles of larger tensors from this many entries.
pub const FUSION_QUANTILE_SAMPLE: usize = 1_000_000;

/// Arcee Fusion (mergekit's `arcee_fusion`), per tensor, merging one model `p` into the
/// base `b`. Every row (vector along the last axis; a vector is one row) gets the
/// divergence `KL_r = sum (P + 1e-8) ln((P + 1e-8) / (Q + 1e-8))` of the softmaxes
/// `P` of `p`'s row and `Q` of `b`'s; entry importances are `|p - b| KL_r`. With `q1`,
/// `q2`, `q3` the sorted importances at positions `floor(q (m - 1))` for
/// `q = 0.25, 0.5, 0.75` (`m` of them), entries with importance
/// `>= q2 + 1.5 (q3 - q1)` take `p`'s value, the rest keep the base's.
///
/// Like mergekit, a tensor of more than [`FUSION_QUANTILE_SAMPLE`] entries takes its
/// quantiles from that many entries drawn with replacement: from a stream seeded by
/// `(seed, tensor name)` here (mergekit's torch stream cannot be replayed), so results
/// are reproducible but not mergekit's bits; [`with_exact_quantiles`] uses every entry.
///
/// [`with_exact_quantiles`]: ArceeFusion::with_exact_quantiles
///
/// ```
/// use modelfusion::merge::{ArceeFusion, Merger};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr2;
///
/// let base = StateDict::from_pairs([("w", arr2(&[[0.0f64; 4]; 4]).into_dyn())])?;
/// let mut p = arr2(&[[0.0f64; 4]; 4]);
/// p[[2, 1]] = 1.0; // one changed entry: the only non-zero importance
/// let model = StateDict::from_pairs([("w", p.clone().into_dyn())])?;
/// let m = ArceeFusion::new(base, 0).merge(&[&model])?;
/// assert_eq!(m.get("w").unwrap(), &p.into_dyn());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ArceeFusion<M> {
    base: M,
    seed: u64,
    exact: bool,
}

impl<M: Model> ArceeFusion<M> {
    /// Arcee Fusion into `base`; `seed` seeds the quantile samples of large tensors.
    ///
    /// ```
    /// use modelfusion::merge::ArceeFusion;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert!(!ArceeFusion::new(base, 7).exact_quantiles());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(base: M, seed: u64) -> Self {
        ArceeFusion {
            base,
            seed,
            exact: false,
        }
    }

    /// Takes the quantiles of every tensor from all its entries (no sampling).
    ///
    /// ```
    /// use modelfusion::merge::ArceeFusion;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert!(ArceeFusion::new(base, 0).with_exact_quantiles(true).exact_quantiles());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_exact_quantiles(mut self, exact: bool) -> Self {
        self.exact = exact;
        self
    }

    /// Whether quantiles use every entry.
    ///
    /// ```
    /// use modelfusion::merge::ArceeFusion;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert!(!ArceeFusion::new(base, 0).with_exact_quantiles(false).exact_quantiles());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn exact_quantiles(&self) -> bool {
        self.exact
    }

    /// `q2 + 1.5 (q3 - q1)` of the importances (sampled as mergekit when large).
    fn threshold<E: Scalar>(&self, name: &str, importance: &[E]) -> E {
        let n = importance.len();
        let mut pool: Vec<E> = if self.exact || n <= FUSION_QUANTILE_SAMPLE {
            importance.to_vec()
        } else {
            let mut rng = kernel::chunk_rng(self.seed, name, 0, 0);
            (0..FUSION_QUANTILE_SAMPLE)
                .map(|_| importance[((u128::from(rng.next_u64()) * n as u128) >> 64) as usize])
                .collect()
        };
        let last = pool.len() - 1;
        let mut at = |pos: usize| {
            *pool
                .select_nth_unstable_by(pos, |a, b| {
                    a.to_f64_lossless().total_cmp(&b.to_f64_lossless())
                })
                .1
        };
        // torch: sorted[(q * (m - 1)).long()], exact for these q.
        let (q1, q2, q3) = (at(last / 4), at(last / 2), at(3 * last / 4));
        q2 + E::from_f64_lossy(1.5) * (q3 - q1)
    }
}

/// `sum (p + 1e-8) ln((p + 1e-8) / (q + 1e-8))` of the softmaxes of `x` and `y`.
fn softmax_kl<E: Scalar>(x: &[E], y: &[E]) -> f64 {
    let softmax = |v: &[E]| {
        let max = v
            .iter()
            .map(|a| a.to_f64_lossless())
            .fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = v
            .iter()
            .map(|a| (a.to_f64_lossless() - max).exp())
            .collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(move |a| a / s + 1e-8)
    };
    softmax(x)
        .zip(softmax(y))
        .map(|(p, q)| p * (p / q).ln())
        .sum()
}

impl<M: Model> TensorMerger<M::Tensor> for ArceeFusion<M> {
    fn merge_tensor(&self, name: &str, tensors: &[&M::Tensor]) -> Result<M::Tensor> {
        // A NaN would silently move the thresholds: refused.
        let base = kernel::finite_base(&self.base, name, tensors)?;
        kernel::check_model_count("Arcee Fusion", name, tensors.len(), 1, "")?;
        let shape = tensors[0].shape();
        let extra = [("the base model", base)];
        let n = base.len();
        if n == 0 {
            return Ok(base.clone());
        }
        let row = shape.last().copied().unwrap_or(1);
        let (b, p) = (kernel::elems(base), kernel::elems(tensors[0]));
        let kl: Vec<<M::Tensor as Tensor>::Elem> = (0..n / row)
            .into_par_iter()
            .map(|r| {
                let span = r * row..(r + 1) * row;
                Scalar::from_f64_lossy(softmax_kl(&p[span.clone()], &b[span]))
            })
            .collect();
        let mut importance = vec![<M::Tensor as Tensor>::Elem::zero(); n];
        kernel::for_chunks(&mut importance, |_, s, o| {
            for (j, v) in o.iter_mut().enumerate() {
                let i = s + j;
                *v = (p[i] - b[i]).abs() * kl[i / row];
            }
        });
        let threshold = self.threshold(name, &importance);
        let one = <M::Tensor as Tensor>::Elem::one();
        let zero = <M::Tensor as Tensor>::Elem::zero();
        let out: M::Tensor = kernel::zip_map(&[base, tensors[0]], |j, v| {
            let keep = if importance[j] >= threshold {
                one
            } else {
                zero
            };
            v[0] + (v[1] - v[0]) * keep
        })?;
        kernel::check_merged(name, tensors, &extra, &kernel::elems(&out), || {
            Error::invalid(
                "models",
                format!("the difference of model and base overflows in parameter `{name}`"),
            )
        })?;
        Ok(out)
    }
}

/// NearSwap (mergekit's `nearswap`), elementwise, merging one model `m` into the base
/// `b`: `w = clamp(t / max(|b - m|, 1e-6), 0, 1)` and `w m + (1 - w) b`, so entries
/// within `t` of the base take the model's value and farther ones move towards it by
/// `t / |b - m|`. Computed in the tensors' precision in torch's order
/// (`w = (1 / d) t`).
///
/// ```
/// use modelfusion::merge::{Merger, NearSwap};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let base = StateDict::from_pairs([("w", arr1(&[0.0f64, 0.0]).into_dyn())])?;
/// let m = StateDict::from_pairs([("w", arr1(&[0.5, 4.0]).into_dyn())])?;
/// let out = NearSwap::new(base, 1.0)?.merge(&[&m])?;
/// // |0.5| <= t: swapped in; |4| > t: w = 1/4, 0.25 * 4 = 1.
/// assert_eq!(out.get("w").unwrap().as_slice().unwrap(), &[0.5, 1.0]);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct NearSwap<M> {
    base: M,
    t: f64,
}

impl<M: Model> NearSwap<M> {
    /// NearSwap into `base` with distance `t` (finite, `>= 0`; mergekit requires it).
    ///
    /// ```
    /// use modelfusion::merge::NearSwap;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(NearSwap::new(base.clone(), 1e-4)?.t(), 1e-4);
    /// assert!(NearSwap::new(base, -1.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(base: M, t: f64) -> Result<Self> {
        kernel::check_nonnegative("t", t)?;
        Ok(NearSwap { base, t })
    }

    /// The swap distance.
    ///
    /// ```
    /// use modelfusion::merge::NearSwap;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(NearSwap::new(base, 0.5)?.t(), 0.5);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn t(&self) -> f64 {
        self.t
    }
}

/// One NearSwap entry, base `a`, model `b`, in `E` arithmetic as torch orders it.
#[inline]
fn nearswap<E: Scalar>(a: E, b: E, t: f64) -> E {
    let (zero, one) = (E::zero(), E::one());
    let d = (a - b).abs().max(E::from_f64_lossy(1e-6));
    let w = (one / d * E::from_f64_lossy(t)).max(zero).min(one);
    w * b + (one - w) * a
}

impl<M: Model> TensorMerger<M::Tensor> for NearSwap<M> {
    fn merge_tensor(&self, name: &str, tensors: &[&M::Tensor]) -> Result<M::Tensor> {
        let base = kernel::finite_base(&self.base, name, tensors)?;
        kernel::check_model_count("NearSwap", name, tensors.len(), 1, "")?;
        let out: M::Tensor =
            kernel::zip_map(&[base, tensors[0]], |_, v| nearswap(v[0], v[1], self.t))?;
        kernel::check_merged(name, tensors, &[], &kernel::elems(&out), || {
            kernel::overflow_error("t", self.t, name)
        })?;
        Ok(out)
    }
}
