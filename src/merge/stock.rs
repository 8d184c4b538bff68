//! Model stock (Jang et al. 2024): interpolate between the base and the average of the
//! fine-tuned models by a ratio computed from the angle between their task vectors.

use super::TensorMerger;
use super::kernel::{self, base_tensor, check_shapes};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::Tensor;

/// Model stock, per tensor (as mergekit): with task vectors `tau_i = theta_i - base` of
/// `N >= 2` fine-tuned models, `cos` the mean pairwise cosine of the `tau_i` (a pair
/// with a zero task vector counts as cosine 0),
/// `t = N cos / (1 + (N - 1) cos)` and the merge `t * mean_i(theta_i) + (1 - t) * base`.
///
/// ```
/// use modelfusion::merge::{Merger, ModelStock};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let base = StateDict::from_pairs([("w", arr1(&[0.0f64, 0.0]).into_dyn())])?;
/// let a = StateDict::from_pairs([("w", arr1(&[1.0, 0.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[0.0, 1.0]).into_dyn())])?;
/// // Orthogonal task vectors: cos = 0, t = 0, the base comes back.
/// let m = ModelStock::new(base.clone()).merge(&[&a, &b])?;
/// assert_eq!(m, base);
/// assert!(ModelStock::new(base).merge(&[&a]).is_err()); // needs >= 2 models
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ModelStock<M> {
    base: M,
}

impl<M: Model> ModelStock<M> {
    /// Model stock around `base` (the pre-trained model).
    ///
    /// ```
    /// use modelfusion::merge::ModelStock;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(ModelStock::new(base.clone()).base(), &base);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(base: M) -> Self {
        ModelStock { base }
    }

    /// The base model.
    ///
    /// ```
    /// use modelfusion::merge::ModelStock;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(ModelStock::new(base).base().len(), 1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn base(&self) -> &M {
        &self.base
    }

    /// The interpolation ratio `t` model stock uses for tensor `name` of `tensors`.
    ///
    /// ```
    /// use modelfusion::merge::ModelStock;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f64, 0.0]).into_dyn())])?;
    /// let a = arr1(&[1.0f64, 1.0]).into_dyn();
    /// let b = arr1(&[2.0f64, 2.0]).into_dyn();
    /// assert!((ModelStock::new(base).ratio("w", &[&a, &b])? - 1.0).abs() < 1e-12);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn ratio(&self, name: &str, tensors: &[&M::Tensor]) -> Result<f64> {
        check_shapes(name, tensors)?;
        let k = tensors.len();
        if k < 2 {
            return Err(Error::invalid(
                "models",
                format!(
                    "model stock needs at least 2 fine-tuned models, got {k} (parameter `{name}`)"
                ),
            ));
        }
        let base = base_tensor(&self.base, name, tensors[0].shape())?;
        let b = kernel::elems(base);
        let data = kernel::all_elems(tensors);
        let xs: Vec<&[<M::Tensor as Tensor>::Elem]> = data.iter().map(|c| c.as_ref()).collect();
        let g = kernel::gram(&xs, Some(&b));
        if g.iter().flatten().any(|x| !x.is_finite()) {
            return Err(
                kernel::nonfinite_input(name, tensors, &[("the base model", base)]).unwrap_or_else(|| {
                    Error::invalid(
                        "models",
                        format!("the task vectors of parameter `{name}` are too large: their inner products overflow"),
                    )
                }),
            );
        }
        let mut cos_sum = 0.0;
        let mut count = 0usize;
        for i in 0..k {
            for j in i + 1..k {
                let d = g[i][i].sqrt() * g[j][j].sqrt();
                cos_sum += if d > 0.0 { g[i][j] / d } else { 0.0 };
                count += 1;
            }
        }
        let cos = cos_sum / count as f64;
        let nf = k as f64;
        let t = nf * cos / (1.0 + (nf - 1.0) * cos);
        if !t.is_finite() {
            return Err(Error::Infeasible {
                reason: format!(
                    "model stock ratio is undefined for parameter `{name}` (mean cosine {cos} of {k} task vectors)"
                ),
            });
        }
        Ok(t)
    }
}

impl<M: Model> TensorMerger<M::Tensor> for ModelStock<M> {
    fn merge_tensor(&self, name: &str, tensors: &[&M::Tensor]) -> Result<M::Tensor> {
        let t = self.ratio(name, tensors)?;
        let base = base_tensor(&self.base, name, tensors[0].shape())?;
        let k = tensors.len() as f64;
        let mut all: Vec<&M::Tensor> = tensors.to_vec();
        all.push(base);
        let mut w = vec![t / k; tensors.len()];
        w.push(1.0 - t);
        let out: M::Tensor = kernel::weighted_sum(&all, &w)?;
        kernel::check_merged(
            name,
            tensors,
            &[("the base model", base)],
            &kernel::elems(&out),
            || kernel::overflow_error("t", format!("the model stock ratio {t:e}"), name),
        )?;
        Ok(out)
    }
}
