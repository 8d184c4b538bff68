//! Reinforced Agent Merging (mergekit's `ram` and `ramplus_tl`): task-vector entries
//! changed by one model are kept whole, entries changed by several are averaged.

use num_traits::{Float, Zero};

use super::TensorMerger;
use super::kernel;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::{Scalar, Tensor};

/// RAM around a base, per tensor, as mergekit 0.1.5 computes it. With task vectors
/// `tau_ij = theta_ij - base_j`, an entry *contributes* when `|tau_ij| > epsilon`, and
/// `c_j` models contribute to entry `j`. The merge is `base + sum_i tau_ij [i
/// contributes] (u_j l_i + [c_j > 1] / c_j)` where `u_j = [c_j = 1]`: an entry only one
/// model changed keeps that model's change, one several changed gets their mean.
///
/// `l_i = 1` for RAM; RAM+ tensor-local ([`plus`](Ram::plus)) rescales every model's
/// unique entries by `l_i = 1 + r clamp(s_i / max(u_i, epsilon), 0, alpha)`, where
/// `s_i` and `u_i` count the entries model `i` shares with others and has alone.
/// Computed in the tensors' precision in torch's order.
///
/// ```
/// use modelfusion::merge::{Merger, Ram};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let base = StateDict::from_pairs([("w", arr1(&[0.0f64, 0.0, 0.0]).into_dyn())])?;
/// let a = StateDict::from_pairs([("w", arr1(&[2.0, 1.0, 0.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[4.0, 0.0, 0.0]).into_dyn())])?;
/// let m = Ram::new(base.clone(), 1e-5)?.merge(&[&a, &b])?;
/// assert_eq!(m.get("w").unwrap().as_slice().unwrap(), &[3.0, 1.0, 0.0]);
/// // RAM+: a shares 1 entry and has 1 alone: l_a = 1 + 0.1 * min(1, 0.2) = 1.02.
/// let p = Ram::plus(base, 0.1, 0.2, 1e-5)?.merge(&[&a, &b])?;
/// assert!((p.get("w").unwrap()[[1]] - 1.02).abs() < 1e-12);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Ram<M> {
    base: M,
    epsilon: f64,
    /// RAM+: `(r, alpha)`.
    plus: Option<(f64, f64)>,
}

impl<M: Model> Ram<M> {
    /// RAM around `base`; entries with `|tau| <= epsilon` (finite, `>= 0`; mergekit's
    /// default `1e-5`) do not contribute.
    ///
    /// ```
    /// use modelfusion::merge::Ram;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(Ram::new(base.clone(), 1e-5)?.epsilon(), 1e-5);
    /// assert!(Ram::new(base, -1.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(base: M, epsilon: f64) -> Result<Self> {
        kernel::check_nonnegative("epsilon", epsilon)?;
        Ok(Ram {
            base,
            epsilon,
            plus: None,
        })
    }

    /// RAM+ tensor-local (mergekit's `ramplus_tl`, defaults `r: 0.1`, `alpha: 0.2`,
    /// `epsilon: 1e-5`): `r` finite, `alpha >= 0`, `epsilon > 0` (it also bounds the
    /// divisor `max(u_i, epsilon)`).
    ///
    /// ```
    /// use modelfusion::merge::Ram;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert!(Ram::plus(base.clone(), 0.1, 0.2, 1e-5).is_ok());
    /// assert!(Ram::plus(base, 0.1, 0.2, 0.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn plus(base: M, r: f64, alpha: f64, epsilon: f64) -> Result<Self> {
        crate::error::check_finite("r", r)?;
        kernel::check_nonnegative("alpha", alpha)?;
        if !(epsilon > 0.0 && epsilon.is_finite()) {
            return Err(Error::invalid(
                "epsilon",
                format!(
                    "must be finite and > 0 (RAM+ divides by max(count, epsilon)), got {epsilon}"
                ),
            ));
        }
        Ok(Ram {
            base,
            epsilon,
            plus: Some((r, alpha)),
        })
    }

    /// The contribution threshold.
    ///
    /// ```
    /// use modelfusion::merge::Ram;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(Ram::new(base, 0.0)?.epsilon(), 0.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// RAM+'s unique-entry scales `l_i` (all 1 for RAM): one pass counting, per model,
    /// the entries it shares and the ones it has alone.
    fn scales<E: Scalar>(&self, xs: &[&[E]], b: &[E], eps: E) -> Vec<E> {
        let k = xs.len();
        let Some((r, alpha)) = self.plus else {
            return vec![E::one(); k];
        };
        let counts = kernel::sum_chunks(b.len(), 2 * k, |s, e| {
            let mut acc = vec![0.0; 2 * k];
            let mut nz = vec![false; k];
            for j in s..e {
                for (z, x) in nz.iter_mut().zip(xs) {
                    *z = (x[j] - b[j]).abs() > eps;
                }
                let c = nz.iter().filter(|z| **z).count();
                let slot = if c == 1 { k } else { 0 };
                for (i, _) in nz.iter().enumerate().filter(|(_, z)| **z) {
                    acc[slot + i] += 1.0;
                }
            }
            acc
        });
        // torch: f32 counts, rho = shared / max(unique, eps), 1 + r clamp(rho, 0, alpha).
        (0..k)
            .map(|i| {
                let shared = E::from_f64_lossy(counts[i]);
                let unique = E::from_f64_lossy(counts[k + i]);
                let rho = shared / unique.max(eps);
                E::one() + E::from_f64_lossy(r) * rho.max(E::zero()).min(E::from_f64_lossy(alpha))
            })
            .collect()
    }
}

impl<M: Model> TensorMerger<M::Tensor> for Ram<M> {
    fn merge_tensor(&self, name: &str, tensors: &[&M::Tensor]) -> Result<M::Tensor> {
        // A NaN never counts as contributing (`|NaN| > eps` is false): refused.
        let base = kernel::finite_base(&self.base, name, tensors)?;
        let extra = [("the base model", base)];
        let k = tensors.len();
        let eps = <M::Tensor as Tensor>::Elem::from_f64_lossy(self.epsilon);
        let scales = {
            let b = kernel::elems(base);
            let data = kernel::all_elems(tensors);
            let xs: Vec<&[<M::Tensor as Tensor>::Elem]> = data.iter().map(|c| c.as_ref()).collect();
            self.scales(&xs, &b, eps)
        };
        let mut all: Vec<&M::Tensor> = tensors.to_vec();
        all.push(base);
        let out: M::Tensor = kernel::zip_map(&all, |_, v| {
            let (bv, models) = (v[k], &v[..k]);
            let zero = <M::Tensor as Tensor>::Elem::zero();
            let c = models.iter().filter(|&&x| (x - bv).abs() > eps).count();
            let div = <M::Tensor as Tensor>::Elem::from_f64_lossy(c.max(1) as f64);
            let mut sum = zero;
            for (&x, &l) in models.iter().zip(&scales) {
                let tau = x - bv;
                if tau.abs() > eps {
                    sum += if c == 1 { tau * l } else { tau / div };
                }
            }
            bv + sum
        })?;
        kernel::check_merged(name, tensors, &extra, &kernel::elems(&out), || {
            Error::invalid(
                "models",
                format!("the RAM merge of the finite parameter `{name}` overflows"),
            )
        })?;
        Ok(out)
    }
}
