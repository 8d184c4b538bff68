//! SCE (Wan et al. 2024, mergekit's `sce`): select the entries where the models differ
//! most, weight each model by its task vector's energy, erase minority signs.

use num_traits::Zero;

use super::TensorMerger;
use super::kernel;
use super::select::torch_topk;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::{Scalar, Tensor};

/// SCE merging around a base, per tensor, as mergekit 0.1.5 computes it. With task
/// vectors `tau_i = theta_i - base` of `k` models:
///
/// 1. **Select** (when `select_topk < 1`): the variance over models
///    `var_j = mean_i (tau_ij - mean_i tau_ij)^2` of every entry; of the `c` entries
///    with `var_j != 0`, the `floor(c * select_topk)` largest are kept in every task
///    vector (computed in `f32` as torch does; ties split as torch's `topk` splits
///    them), the rest zeroed. `select_topk <= 0` keeps nothing.
/// 2. **Calculate**: model weights `e_i = mean_j tau_ij^2 / sum_l mean_j tau_lj^2`, or
///    `1 / k` each when that total is below the uniform threshold (mergekit: `1e-6`).
/// 3. **Erase**: the elected sign `s_j = +1` where `sum_i tau_ij >= 0`, else `-1`; with
///    `m_ij = [sign(tau_ij) = s_j]` the merge is
///    `base + sum_i m_ij e_i tau_ij / max(sum_i m_ij e_i, 1e-6)`.
///
/// mergekit's threshold is absolute, so task vectors with entries around `1e-3` (a
/// mean square of `1e-6`, common for fine-tunes) already get uniform weights;
/// [`with_uniform_below`](Sce::with_uniform_below)`(0.0)` keeps the energy weights
/// unless every task vector is zero.
///
/// ```
/// use modelfusion::merge::{Merger, Sce};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let base = StateDict::from_pairs([("w", arr1(&[0.0f64, 0.0]).into_dyn())])?;
/// let a = StateDict::from_pairs([("w", arr1(&[3.0, 1.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[1.0, -1.0]).into_dyn())])?;
/// // Energies 5 and 1: weights 5/6, 1/6. Entry 0: (5/6 * 3 + 1/6 * 1) / 1 = 8/3.
/// // Entry 1 sums to 0, so + is elected and only model a agrees: 1.
/// let m = Sce::new(base, 1.0)?.merge(&[&a, &b])?;
/// let w = m.get("w").unwrap();
/// assert!((w[[0]] - 8.0 / 3.0).abs() < 1e-12 && (w[[1]] - 1.0).abs() < 1e-12);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Sce<M> {
    base: M,
    select_topk: f64,
    uniform_below: f64,
}

impl<M: Model> Sce<M> {
    /// SCE around `base`, keeping the fraction `select_topk` in `[0, 1]` of the
    /// highest-variance entries (mergekit's default 1: all).
    ///
    /// ```
    /// use modelfusion::merge::Sce;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(Sce::new(base.clone(), 0.5)?.select_topk(), 0.5);
    /// assert!(Sce::new(base, 1.5).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(base: M, select_topk: f64) -> Result<Self> {
        crate::error::check_fraction("select_topk", select_topk)?;
        Ok(Sce {
            base,
            select_topk,
            uniform_below: 1e-6,
        })
    }

    /// Sets the total task-vector energy (`sum_i mean_j tau_ij^2`, finite, `>= 0`)
    /// below which the model weights become uniform: mergekit's `1e-6` by default, `0`
    /// for energy weights whenever some task vector is non-zero.
    ///
    /// ```
    /// use modelfusion::merge::{Merger, Sce};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f64]).into_dyn())])?;
    /// let a = StateDict::from_pairs([("w", arr1(&[3e-4]).into_dyn())])?;
    /// let b = StateDict::from_pairs([("w", arr1(&[1e-4]).into_dyn())])?;
    /// // Energies 9e-8 and 1e-8 are below 1e-6: uniform weights, the mean 2e-4.
    /// let mk = Sce::new(base.clone(), 1.0)?.merge(&[&a, &b])?;
    /// assert!((mk.get("w").unwrap()[[0]] - 2e-4).abs() < 1e-15);
    /// let energy = Sce::new(base, 1.0)?.with_uniform_below(0.0)?.merge(&[&a, &b])?;
    /// assert!((energy.get("w").unwrap()[[0]] - 2.8e-4).abs() < 1e-15);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_uniform_below(mut self, threshold: f64) -> Result<Self> {
        kernel::check_nonnegative("uniform_below", threshold)?;
        self.uniform_below = threshold;
        Ok(self)
    }

    /// The kept fraction of entries.
    ///
    /// ```
    /// use modelfusion::merge::Sce;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(Sce::new(base, 1.0)?.select_topk(), 1.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn select_topk(&self) -> f64 {
        self.select_topk
    }

    /// Which entries step 1 keeps (`None`: all of them).
    fn selection<E: Scalar>(&self, xs: &[&[E]], b: &[E]) -> Option<Vec<bool>> {
        if self.select_topk >= 1.0 {
            return None;
        }
        let n = b.len();
        let mut keep = vec![false; n];
        if self.select_topk <= 0.0 {
            return Some(keep);
        }
        // torch's var(dim=0, unbiased=False) of f32 task vectors: accumulated in f64,
        // rounded once.
        let k = xs.len() as f64;
        let mut var = vec![E::zero(); n];
        kernel::for_chunks(&mut var, |_, s, o| {
            for (j, v) in o.iter_mut().enumerate() {
                let tau = |x: &&[E]| (x[s + j] - b[s + j]).to_f64_lossless();
                let mean = xs.iter().map(tau).sum::<f64>() / k;
                let ss: f64 = xs.iter().map(|x| (tau(x) - mean).powi(2)).sum();
                *v = E::from_f64_lossy(ss / k);
            }
        });
        let nonzero = var.iter().filter(|v| **v != E::zero()).count();
        // `int(count_nonzero * density)`: an f32 product in torch.
        let count = (nonzero as f32 * self.select_topk as f32) as usize;
        for j in torch_topk(&var, count) {
            keep[j as usize] = true;
        }
        Some(keep)
    }
}

impl<M: Model> TensorMerger<M::Tensor> for Sce<M> {
    fn merge_tensor(&self, name: &str, tensors: &[&M::Tensor]) -> Result<M::Tensor> {
        let base = kernel::finite_base(&self.base, name, tensors)?;
        let extra = [("the base model", base)];
        let b = kernel::elems(base);
        let data = kernel::all_elems(tensors);
        let xs: Vec<&[<M::Tensor as Tensor>::Elem]> = data.iter().map(|c| c.as_ref()).collect();
        let keep = self.selection(&xs, &b);
        let kept = |j: usize| keep.as_ref().is_none_or(|m| m[j]);
        let n = b.len();
        let k = xs.len();
        let energy = kernel::sum_chunks(n, k, |s, e| {
            xs.iter()
                .map(|x| {
                    (s..e)
                        .filter(|&j| kept(j))
                        .map(|j| (x[j] - b[j]).to_f64_lossless().powi(2))
                        .sum()
                })
                .collect()
        });
        let energy: Vec<f64> = energy.iter().map(|e| e / n.max(1) as f64).collect();
        let total: f64 = energy.iter().sum();
        let weights: Vec<f64> = if total.abs() < self.uniform_below || total == 0.0 {
            vec![1.0 / k as f64; k]
        } else {
            energy.iter().map(|e| e / total).collect()
        };
        let mut all: Vec<&M::Tensor> = tensors.to_vec();
        all.push(base);
        let zero = <M::Tensor as Tensor>::Elem::zero();
        let out: M::Tensor = kernel::zip_map(&all, |j, v| {
            let (bv, models) = (v[k], &v[..k]);
            if !kept(j) {
                return bv + zero;
            }
            // The elected sign, from the f32 sum of the task vectors as torch sums them.
            let mut sum = zero;
            for &x in models {
                sum += x - bv;
            }
            let plus = sum >= zero;
            let (mut num, mut den) = (0.0, 0.0);
            for (&x, &w) in models.iter().zip(&weights) {
                let tau = x - bv;
                if (plus && tau > zero) || (!plus && tau < zero) {
                    num += w * tau.to_f64_lossless();
                    den += w;
                }
            }
            <M::Tensor as Tensor>::Elem::from_f64_lossy(bv.to_f64_lossless() + num / den.max(1e-6))
        })?;
        kernel::check_merged(name, tensors, &extra, &kernel::elems(&out), || {
            Error::invalid(
                "models",
                format!("the SCE merge of the finite parameter `{name}` overflows"),
            )
        })?;
        Ok(out)
    }
}
