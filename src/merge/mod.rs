//! Merging: combine several models into one.
//!
//! [`Merger`] merges whole models; [`TensorMerger`] merges one parameter at a time,
//! which lets a merge stream over checkpoints that never fit in memory together. Every
//! `TensorMerger` is a `Merger` through a blanket implementation.

use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::Tensor;

/// Merges whole models into one.
pub trait Merger<M: Model> {
    /// The merged model. `models` must be non-empty and mutually compatible.
    fn merge(&self, models: &[&M]) -> Result<M>;
}

/// Merges one named parameter at a time.
pub trait TensorMerger<T: Tensor> {
    /// Merges the tensors that several models hold under `name` (all of one shape).
    fn merge_tensor(&self, name: &str, tensors: &[&T]) -> Result<T>;
}

impl<M: Model, TM: TensorMerger<M::Tensor>> Merger<M> for TM {
    fn merge(&self, models: &[&M]) -> Result<M> {
        let first = *models
            .first()
            .ok_or_else(|| Error::empty("the list of models"))?;
        for m in &models[1..] {
            first.check_compatible(m)?;
        }
        first.try_map(|name, _| {
            let ts = models
                .iter()
                .map(|m| m.require(name, "a model to merge"))
                .collect::<Result<Vec<_>>>()?;
            self.merge_tensor(name, &ts)
        })
    }
}
