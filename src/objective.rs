//! What a model is evaluated with. The user (or the [`nn`](crate::nn) module) implements
//! these; fusion algorithms consume them.
//!
//! - [`Objective`]: a scalar to minimise (a loss, or an error rate) of a model.
//! - [`Gradient`]: the loss together with its gradient, a model-shaped value.
//! - [`Activations`]: hidden features of a model over a data set, batch by batch,
//!   keyed by permutation group (activation matching, REPAIR) or by layer (RegMean).
//!
//! ```
//! use modelfusion::{Model, Objective, StateDict, Result};
//! use ndarray::{arr1, ArrayD};
//!
//! /// Squared distance to a target point: a toy objective.
//! struct Dist(StateDict<ArrayD<f64>>);
//! impl Objective<StateDict<ArrayD<f64>>> for Dist {
//!     fn loss(&self, m: &StateDict<ArrayD<f64>>) -> Result<f64> {
//!         Ok(m.sub(&self.0)?.norm().powi(2))
//!     }
//! }
//! let target = StateDict::from_pairs([("w", arr1(&[1.0, 2.0]).into_dyn())]).unwrap();
//! let obj = Dist(target.clone());
//! assert_eq!(obj.loss(&target).unwrap(), 0.0);
//! ```

use std::collections::BTreeMap;

use ndarray::Array2;

use crate::error::Result;
use crate::model::Model;
use crate::tensor::Tensor;

/// The element type of a model's tensors.
pub type Elem<M> = <<M as Model>::Tensor as Tensor>::Elem;

/// A scalar to minimise, evaluated on a whole model (typically the mean loss over a data
/// set, or an error rate).
pub trait Objective<M: Model> {
    /// The value at `model`. Implementations return an error rather than a NaN.
    fn loss(&self, model: &M) -> Result<f64>;
}

/// Any closure `Fn(&M) -> Result<f64>` is an objective: the way to plug in a loss
/// computed elsewhere (a PyTorch evaluation run through a subprocess, a cached table).
///
/// ```
/// use modelfusion::{Model, Objective, StateDict};
/// use ndarray::arr1;
/// let norm2 = |m: &StateDict<ndarray::ArrayD<f64>>| Ok(m.norm().powi(2));
/// let m = StateDict::from_pairs([("w", arr1(&[3.0, 4.0]).into_dyn())])?;
/// assert_eq!(norm2.loss(&m)?, 25.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
impl<M: Model, F: Fn(&M) -> Result<f64>> Objective<M> for F {
    fn loss(&self, model: &M) -> Result<f64> {
        self(model)
    }
}

/// An objective with its gradient: the gradient has the model's own structure (one
/// tensor per parameter, same names and shapes).
pub trait Gradient<M: Model>: Objective<M> {
    /// The value and its gradient at `model`.
    fn loss_and_gradient(&self, model: &M) -> Result<(f64, M)>;
}

/// An objective that changes from step to step (minibatches): the loss and gradient of
/// `model` for training step `step`. Curve fitting and the training-time averagers of
/// [`merge`](crate::merge) (SWAD, PAPA, HWA) take one.
///
/// Closures `FnMut(&M, usize) -> Result<(f64, M)>` are stochastic gradients; so is any
/// type that implements the trait (e.g. a data loader holding a network and a data
/// set, cycling through minibatches by `step`). A full-batch [`Gradient`] needs none of
/// this: pass it to [`path::fit_curve`](crate::path::fit_curve); use
/// [`path::fit_curve_stochastic`](crate::path::fit_curve_stochastic) with a stochastic one.
///
/// ```
/// use modelfusion::StochasticGradient;
/// use modelfusion::{Model, StateDict, StateDictF64};
/// use ndarray::arr1;
///
/// // Loss |w - x_s|^2 / 2 against a different target x_s at every step.
/// let targets = [1.0, 3.0];
/// let mut per_step = |m: &StateDictF64, step: usize| {
///     let x = StateDict::from_pairs([("w", arr1(&[targets[step % 2]]).into_dyn())])?;
///     let d = m.sub(&x)?;
///     Ok((0.5 * d.norm().powi(2), d))
/// };
/// let w = StateDict::from_pairs([("w", arr1(&[2.0]).into_dyn())])?;
/// assert_eq!(per_step.loss_and_gradient_at(&w, 0)?.0, 0.5);
/// assert_eq!(per_step.loss_and_gradient_at(&w, 1)?.1.get("w").unwrap()[[0]], -1.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub trait StochasticGradient<M: Model> {
    /// The loss and its gradient at `model` for training step `step` (counted from 0).
    fn loss_and_gradient_at(&mut self, model: &M, step: usize) -> Result<(f64, M)>;
}

impl<M: Model, F: FnMut(&M, usize) -> Result<(f64, M)>> StochasticGradient<M> for F {
    fn loss_and_gradient_at(&mut self, model: &M, step: usize) -> Result<(f64, M)> {
        self(model, step)
    }
}

/// Features of one batch keyed by name; each matrix is `(samples, features)`.
pub type Features<E> = BTreeMap<String, Array2<E>>;

/// Hidden features of a model over a data set, one batch at a time, so that statistics
/// (means, covariances, Gram matrices) can be accumulated without holding every
/// activation at once.
///
/// Keys name what the features belong to: for activation matching and REPAIR, the
/// permutation group whose channels the columns are (for a convolution, spatial
/// positions count as samples); for RegMean, the weight parameter whose layer input the
/// columns are.
pub trait Activations<M: Model> {
    /// Number of batches in the data set.
    fn num_batches(&self) -> usize;
    /// The features of `model` on batch `batch` (`0 <= batch < num_batches()`). Every
    /// batch returns the same keys with the same number of columns.
    fn activations(&self, model: &M, batch: usize) -> Result<Features<Elem<M>>>;
}
