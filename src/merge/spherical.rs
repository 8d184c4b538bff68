//! mergekit's newer spherical interpolations, optionally around a base model:
//! [`NuSlerp`] between two models, one angle per vector, and [`MultiSlerp`] of any
//! number of models, one direction per tensor.

use rayon::prelude::*;

use super::TensorMerger;
use super::kernel::{self, base_tensor, check_shapes};
use crate::error::{Error, Result};
use crate::model::{Model, StateDict};
use crate::tensor::{Scalar, Tensor};

/// The vectors [`NuSlerp`] interpolates between, one angle each (mergekit's
/// `nuslerp_flatten` and `nuslerp_row_wise`).
///
/// ```
/// use modelfusion::merge::SlerpVectors;
/// assert_ne!(SlerpVectors::Whole, SlerpVectors::LastAxis);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlerpVectors {
    /// The whole tensor is one vector (`nuslerp_flatten: true`, mergekit's default).
    Whole,
    /// Every vector along the last axis, i.e. the rows of a matrix
    /// (`nuslerp_flatten: false`).
    LastAxis,
    /// Every vector along axis 0, i.e. the columns of a matrix
    /// (`nuslerp_flatten: false, nuslerp_row_wise: true`).
    FirstAxis,
}

impl SlerpVectors {
    /// `(groups, len, inner)` for `n > 0` elements: element `(g * len + r) * inner + c`
    /// is entry `r` of vector `g * inner + c`.
    fn layout(self, shape: &[usize], n: usize) -> (usize, usize, usize) {
        match (self, shape) {
            (SlerpVectors::Whole, _) | (_, []) => (1, n, 1),
            (SlerpVectors::LastAxis, [.., last]) => (n / last, *last, 1),
            (SlerpVectors::FirstAxis, [first, ..]) => (1, *first, n / first),
        }
    }
}

/// mergekit's NuSLERP `t` from the two models' weights: `w1 / (w0 + w1)`, or `0.5` when
/// `|w0 + w1| < 1e-6`.
///
/// ```
/// assert_eq!(modelfusion::merge::nuslerp_t(1.0, 3.0), 0.75);
/// assert_eq!(modelfusion::merge::nuslerp_t(1.0, -1.0), 0.5);
/// ```
pub fn nuslerp_t(w0: f64, w1: f64) -> f64 {
    let total = w0 + w1;
    if total.abs() < 1e-6 { 0.5 } else { w1 / total }
}

/// NuSLERP (mergekit's `nuslerp`) between two models, per tensor: for every vector
/// (see [`SlerpVectors`]) of `a`, `b` (or of the task vectors `a - base`, `b - base`,
/// the result added back to the base), with
/// `cos = <a, b> / (max(|a|, 1e-7) max(|b|, 1e-7))` and `O = arccos(cos)`:
/// `sin((1 - t) O) / sin O a + sin(t O) / sin O b`, or `(1 - t) a + t b` where
/// `1 - cos^2 <= 1e-16` in the compute precision (collinear).
///
/// mergekit treats a zero vector as orthogonal to the other (`cos = 0`), so a row that
/// one model left at the base comes out scaled by `sin(t pi / 2)` instead of `t`.
/// That is the default; [`with_zero_lerp`](NuSlerp::with_zero_lerp) interpolates
/// linearly there instead (as [`Slerp`](super::Slerp) does).
///
/// ```
/// use modelfusion::merge::{Merger, NuSlerp};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let a = StateDict::from_pairs([("w", arr1(&[1.0f64, 0.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[0.0f64, 1.0]).into_dyn())])?;
/// let mid = NuSlerp::new(0.5)?.merge(&[&a, &b])?;
/// let h = 0.5f64.sqrt();
/// assert!((mid.get("w").unwrap()[[0]] - h).abs() < 1e-12);
/// // Around a base: the task vectors (1, -1) and (-1, 1) are antipodal, O = pi.
/// let base = StateDict::from_pairs([("w", arr1(&[0.0f64, 0.0]).into_dyn())])?;
/// assert!(NuSlerp::with_base(Some(base), 0.5)?.merge(&[&a, &b]).is_ok());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct NuSlerp<M> {
    base: Option<M>,
    t: f64,
    vectors: SlerpVectors,
    zero_lerp: bool,
}

impl<T: Tensor> NuSlerp<StateDict<T>> {
    /// NuSLERP at `t` (finite; outside `[0, 1]` extrapolates, as in mergekit) without a
    /// base, over whole tensors.
    ///
    /// ```
    /// use modelfusion::merge::NuSlerp;
    /// use modelfusion::StateDictF32;
    /// let n: NuSlerp<StateDictF32> = NuSlerp::new(0.3)?;
    /// assert_eq!(n.t(), 0.3);
    /// assert!(NuSlerp::<StateDictF32>::new(f64::NAN).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(t: f64) -> Result<Self> {
        Self::with_base(None, t)
    }
}

impl<M: Model> NuSlerp<M> {
    /// NuSLERP at `t` around `base` (`None`: no base), over whole tensors.
    ///
    /// ```
    /// use modelfusion::merge::NuSlerp;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(NuSlerp::with_base(Some(base), 0.25)?.t(), 0.25);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_base(base: Option<M>, t: f64) -> Result<Self> {
        crate::error::check_finite("t", t)?;
        Ok(NuSlerp {
            base,
            t,
            vectors: SlerpVectors::Whole,
            zero_lerp: false,
        })
    }

    /// Chooses the vectors that get one angle each.
    ///
    /// ```
    /// use modelfusion::merge::{Merger, NuSlerp, SlerpVectors};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr2;
    /// let a = StateDict::from_pairs([("w", arr2(&[[1.0f64, 0.0], [2.0, 0.0]]).into_dyn())])?;
    /// let b = StateDict::from_pairs([("w", arr2(&[[0.0f64, 1.0], [4.0, 0.0]]).into_dyn())])?;
    /// let rows = NuSlerp::new(0.5)?.with_vectors(SlerpVectors::LastAxis).merge(&[&a, &b])?;
    /// // Row 1 is collinear: linear interpolation.
    /// assert_eq!(rows.get("w").unwrap()[[1, 0]], 3.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_vectors(mut self, vectors: SlerpVectors) -> Self {
        self.vectors = vectors;
        self
    }

    /// Interpolates linearly where either vector is zero (instead of mergekit's
    /// `cos = 0`).
    ///
    /// ```
    /// use modelfusion::merge::{Merger, NuSlerp};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let a = StateDict::from_pairs([("w", arr1(&[0.0f64, 0.0]).into_dyn())])?;
    /// let b = StateDict::from_pairs([("w", arr1(&[0.0f64, 2.0]).into_dyn())])?;
    /// let mk = NuSlerp::new(0.5)?.merge(&[&a, &b])?;
    /// assert!((mk.get("w").unwrap()[[1]] - 2.0 * 0.5f64.sqrt()).abs() < 1e-12);
    /// let lerp = NuSlerp::new(0.5)?.with_zero_lerp(true).merge(&[&a, &b])?;
    /// assert_eq!(lerp.get("w").unwrap()[[1]], 1.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_zero_lerp(mut self, zero_lerp: bool) -> Self {
        self.zero_lerp = zero_lerp;
        self
    }

    /// The interpolation parameter.
    ///
    /// ```
    /// use modelfusion::merge::NuSlerp;
    /// assert_eq!(NuSlerp::<modelfusion::StateDictF64>::new(0.7)?.t(), 0.7);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn t(&self) -> f64 {
        self.t
    }

    /// The coefficients of one vector pair from `[<a, b>, |a|^2, |b|^2]`.
    fn coefficients<E: Scalar>(&self, [ab, aa, bb]: [f64; 3]) -> (f64, f64) {
        let t = self.t;
        let (na, nb) = (aa.sqrt(), bb.sqrt());
        if self.zero_lerp && (na == 0.0 || nb == 0.0) {
            return (1.0 - t, t);
        }
        let cos = (ab / (na.max(1e-7) * nb.max(1e-7))).clamp(-1.0, 1.0);
        let c = E::from_f64_lossy(cos);
        if E::one() - c * c <= E::from_f64_lossy(1e-16) {
            return (1.0 - t, t);
        }
        let omega = cos.acos();
        let s = omega.sin();
        (((1.0 - t) * omega).sin() / s, (t * omega).sin() / s)
    }
}

/// `[<a, b>, |a|^2, |b|^2]` of the task vectors of every vector of `layout`, in `f64`.
fn vector_stats<E: Scalar>(
    a: &[E],
    b: &[E],
    base: Option<&[E]>,
    (groups, len, inner): (usize, usize, usize),
) -> Vec<[f64; 3]> {
    let tau =
        |x: &[E], i: usize| x[i].to_f64_lossless() - base.map_or(0.0, |b| b[i].to_f64_lossless());
    let add = |acc: &mut [f64], i: usize| {
        let (p, q) = (tau(a, i), tau(b, i));
        acc[0] += p * q;
        acc[1] += p * p;
        acc[2] += q * q;
    };
    if groups == 1 && inner == 1 {
        let s = kernel::sum_chunks(len, 3, |s, e| {
            let mut acc = vec![0.0; 3];
            (s..e).for_each(|i| add(&mut acc, i));
            acc
        });
        return vec![[s[0], s[1], s[2]]];
    }
    let mut stats = vec![[0.0; 3]; groups * inner];
    stats.par_chunks_mut(inner).enumerate().for_each(|(g, st)| {
        for r in 0..len {
            for (c, acc) in st.iter_mut().enumerate() {
                add(acc, (g * len + r) * inner + c);
            }
        }
    });
    stats
}

/// `base + sum_i c_i (x_i - base)` per element in `f64` (no base: `sum_i c_i x_i`),
/// with coefficient `coef(j, i)` of model `i` at element `j`; `all` holds the `models`
/// models, then the base if there is one.
fn combine_around<T: Tensor>(
    all: &[&T],
    models: usize,
    coef: impl Fn(usize, usize) -> f64 + Sync + Send,
) -> Result<T> {
    kernel::zip_map(all, |j, v| {
        let b = v.get(models).map_or(0.0, |b| b.to_f64_lossless());
        let mut acc = b;
        for (i, x) in v[..models].iter().enumerate() {
            acc += coef(j, i) * (x.to_f64_lossless() - b);
        }
        T::Elem::from_f64_lossy(acc)
    })
}

/// The models followed by the base's tensor `name`, if there is a base.
fn with_base_tensor<'a, M: Model>(
    base: Option<&'a M>,
    name: &str,
    tensors: &[&'a M::Tensor],
) -> Result<Vec<&'a M::Tensor>> {
    let mut all = tensors.to_vec();
    if let Some(b) = base {
        all.push(base_tensor(b, name, tensors[0].shape())?);
    }
    Ok(all)
}

fn base_label<T>(b: Option<&T>) -> Vec<(&'static str, &T)> {
    b.map(|b| ("the base model", b)).into_iter().collect()
}

impl<M: Model> TensorMerger<M::Tensor> for NuSlerp<M> {
    fn merge_tensor(&self, name: &str, tensors: &[&M::Tensor]) -> Result<M::Tensor> {
        check_shapes(name, tensors)?;
        kernel::check_model_count(
            "NuSLERP",
            name,
            tensors.len(),
            2,
            "; use MultiSlerp for more",
        )?;
        let all = with_base_tensor(self.base.as_ref(), name, tensors)?;
        let base = all.get(2).copied();
        let n = tensors[0].len();
        if n == 0 {
            return Ok(tensors[0].clone());
        }
        let shape = tensors[0].shape();
        let layout = self.vectors.layout(shape, n);
        let coef: Vec<(f64, f64)> = {
            let data = kernel::all_elems(&all);
            let bd = data.get(2).map(|c| c.as_ref());
            vector_stats(&data[0], &data[1], bd, layout)
                .into_iter()
                .map(|s| self.coefficients::<<M::Tensor as Tensor>::Elem>(s))
                .collect()
        };
        let (_, len, inner) = layout;
        let out: M::Tensor = combine_around(&all, 2, |j, i| {
            let (c0, c1) = coef[(j / (len * inner)) * inner + j % inner];
            if i == 0 { c0 } else { c1 }
        })?;
        kernel::check_merged(
            name,
            tensors,
            &base_label(base),
            &kernel::elems(&out),
            || kernel::overflow_error("t", self.t, name),
        )?;
        Ok(out)
    }
}

/// Multi-SLERP (mergekit's `multislerp`), per tensor: with `x_i` the models (or their
/// task vectors `theta_i - base`, the result added back to the base), weights `w_i`
/// (normalised to sum 1 unless told otherwise), directions `u_i = x_i / (|x_i| + eps)`
/// and their weighted mean `m = sum_i w_i u_i`, the result is
/// `(sum_i w_i |x_i|) m / |m|`.
///
/// mergekit then projects the `u_i` onto the tangent space at `m / |m|`, averages them
/// there and maps back; the weighted tangent mean is `m - <m, m/|m|> m/|m| = 0`
/// identically, so that step returns `m / |m|` (up to rounding) and is not repeated
/// here. If `|m| < eps`, two models are averaged linearly (`w_0 x_0 + w_1 x_1`) and more
/// are an error (their directions cancel out). A single model is returned unchanged.
///
/// ```
/// use modelfusion::merge::{Merger, MultiSlerp};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let a = StateDict::from_pairs([("w", arr1(&[3.0f64, 0.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[0.0f64, 1.0]).into_dyn())])?;
/// let m = MultiSlerp::new(vec![1.0, 1.0], true)?.merge(&[&a, &b])?;
/// // Mean direction (1, 1) / sqrt 2, mean norm 2.
/// let w = m.get("w").unwrap();
/// assert!((w[[0]] - 2.0f64.sqrt()).abs() < 1e-7 && (w[[1]] - 2.0f64.sqrt()).abs() < 1e-7);
/// assert!(MultiSlerp::<modelfusion::StateDictF64>::new(vec![1.0, -1.0], true).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct MultiSlerp<M> {
    base: Option<M>,
    weights: Vec<f64>,
    eps: f64,
}

impl<T: Tensor> MultiSlerp<StateDict<T>> {
    /// Multi-SLERP with one weight per model, without a base; `normalize`: divide the
    /// weights by their sum (mergekit's `normalize_weights`, default true).
    ///
    /// ```
    /// use modelfusion::merge::MultiSlerp;
    /// use modelfusion::StateDictF32;
    /// let m: MultiSlerp<StateDictF32> = MultiSlerp::new(vec![1.0, 3.0], true)?;
    /// assert_eq!(m.weights(), &[0.25, 0.75]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(weights: Vec<f64>, normalize: bool) -> Result<Self> {
        Self::with_base(None, weights, normalize)
    }
}

impl<M: Model> MultiSlerp<M> {
    /// Multi-SLERP around `base` (`None`: no base); `eps` is mergekit's `1e-8`. Errors
    /// on non-finite weights, or on weights summing to 0 when normalising.
    ///
    /// ```
    /// use modelfusion::merge::MultiSlerp;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// let m = MultiSlerp::with_base(Some(base), vec![2.0, 2.0], false)?;
    /// assert_eq!(m.weights(), &[2.0, 2.0]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_base(base: Option<M>, weights: Vec<f64>, normalize: bool) -> Result<Self> {
        kernel::check_weights(&weights, "weights")?;
        let weights = if normalize {
            let s: f64 = weights.iter().sum();
            if s == 0.0 {
                return Err(Error::invalid(
                    "weights",
                    format!(
                        "sum to 0, so they cannot be normalised (normalize_weights); got {weights:?}"
                    ),
                ));
            }
            weights.iter().map(|w| w / s).collect()
        } else {
            weights
        };
        Ok(MultiSlerp {
            base,
            weights,
            eps: 1e-8,
        })
    }

    /// Sets `eps` (finite, `>= 0`), added to every norm and the threshold below which
    /// the mean direction counts as vanished.
    ///
    /// ```
    /// use modelfusion::merge::MultiSlerp;
    /// let m = MultiSlerp::<modelfusion::StateDictF64>::new(vec![1.0], true)?;
    /// assert!(m.clone().with_eps(1e-6).is_ok());
    /// assert!(m.with_eps(-1.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_eps(mut self, eps: f64) -> Result<Self> {
        kernel::check_nonnegative("eps", eps)?;
        self.eps = eps;
        Ok(self)
    }

    /// The weights, normalised if asked for.
    ///
    /// ```
    /// use modelfusion::merge::MultiSlerp;
    /// let m = MultiSlerp::<modelfusion::StateDictF64>::new(vec![1.0, 1.0], false)?;
    /// assert_eq!(m.weights(), &[1.0, 1.0]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }
}

impl<M: Model> TensorMerger<M::Tensor> for MultiSlerp<M> {
    fn merge_tensor(&self, name: &str, tensors: &[&M::Tensor]) -> Result<M::Tensor> {
        check_shapes(name, tensors)?;
        let k = tensors.len();
        kernel::check_count(self.weights.len(), k, "weights", name)?;
        if k == 1 {
            return Ok(tensors[0].clone());
        }
        let all = with_base_tensor(self.base.as_ref(), name, tensors)?;
        let extra = base_label(all.get(k).copied());
        let g = {
            let data = kernel::all_elems(&all);
            let xs: Vec<&[<M::Tensor as Tensor>::Elem]> =
                data[..k].iter().map(|c| c.as_ref()).collect();
            kernel::gram(&xs, data.get(k).map(|c| c.as_ref()))
        };
        let w = &self.weights;
        let norms: Vec<f64> = (0..k).map(|i| g[i][i].sqrt()).collect();
        let a: Vec<f64> = w
            .iter()
            .zip(&norms)
            .map(|(w, r)| w / (r + self.eps))
            .collect();
        if let Some(i) = (0..k).find(|&i| !(a[i].is_finite() && norms[i].is_finite())) {
            return Err(
                kernel::nonfinite_input(name, tensors, &extra).unwrap_or_else(|| {
                    Error::invalid(
                        "eps",
                        format!(
                            "parameter `{name}` of model {i} has norm {} and eps is {}: its direction is undefined",
                            norms[i], self.eps
                        ),
                    )
                }),
            );
        }
        let mean_sq: f64 = (0..k)
            .flat_map(|i| (0..k).map(move |j| (i, j)))
            .map(|(i, j)| a[i] * a[j] * g[i][j])
            .sum();
        let mean_norm = mean_sq.max(0.0).sqrt();
        let coef: Vec<f64> = if mean_norm < self.eps {
            if k != 2 {
                return Err(Error::Infeasible {
                    reason: format!(
                        "the weighted directions of parameter `{name}` cancel out (e.g. antipodal models with balancing weights); multi-SLERP is undefined, try other weights"
                    ),
                });
            }
            w.clone()
        } else {
            let scale: f64 = w.iter().zip(&norms).map(|(w, r)| w * r).sum::<f64>() / mean_norm;
            a.iter().map(|a| a * scale).collect()
        };
        let out: M::Tensor = combine_around(&all, k, |_, i| coef[i])?;
        kernel::check_merged(name, tensors, &extra, &kernel::elems(&out), || {
            kernel::overflow_error("weights", format!("{w:?}"), name)
        })?;
        Ok(out)
    }
}
