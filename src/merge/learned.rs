//! Learned mixing coefficients: AdaMerging (Yang et al. 2024), the learned soup
//! (Wortsman et al. 2022) and subspace learning (Wortsman et al. 2021).
//!
//! All three train a weighted combination `offset + sum_i c[i, g(t)] x_i` of parameter
//! sets `x_i` (task vectors, soup ingredients, subspace endpoints), where `g(t)` is the
//! coefficient group of tensor `t` ([`Granularity`]). One shared piece,
//! [`ParamGroups`], builds the combination and the chain rule: the gradient of a loss
//! with respect to `c[i, g]` is `sum_{t in g} <dL/dtheta_t, x_{i,t}>`, the inner
//! product of the parameter gradient with member `i`, restricted to the group's
//! tensors.
//!
//! Subspace learning lives here rather than beside [`train_population`](super::train_population):
//! its members (the endpoints) share one loss evaluation per step at a sampled point
//! instead of taking independent steps, so it reuses [`StepConfig`] and the crate's
//! optimiser, but not the lockstep loop.

use std::collections::HashMap;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::training::StepConfig;
use crate::error::{Error, Result, check_finite};
use crate::model::{Model, StateDict, StateDictF64, mismatch_context};
use crate::objective::StochasticGradient;
use crate::optim::{ModelOptimizer, Optimizer};
use crate::tensor::{Scalar, Tensor};

/// How many coefficients each member gets.
///
/// ```
/// use modelfusion::merge::{Granularity, ParamGroups};
/// use modelfusion::StateDict;
/// use ndarray::arr1;
/// let m = StateDict::from_pairs([
///     ("layers.0.weight", arr1(&[1.0f32]).into_dyn()),
///     ("layers.0.bias", arr1(&[1.0f32]).into_dyn()),
///     ("layers.1.weight", arr1(&[1.0f32]).into_dyn()),
/// ])?;
/// assert_eq!(ParamGroups::new(&m, Granularity::Model).len(), 1);
/// assert_eq!(ParamGroups::new(&m, Granularity::Tensor).len(), 3);
/// assert_eq!(ParamGroups::new(&m, Granularity::Layer).names(), ["layers.0", "layers.1"]);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Granularity {
    /// One coefficient per member for the whole model (task-wise AdaMerging, the learned
    /// soup, a global subspace `alpha`).
    Model,
    /// One coefficient per member per tensor (layer-wise AdaMerging as in the authors'
    /// code: one `lambda` per parameter tensor).
    Tensor,
    /// One coefficient per member per layer: tensors whose names agree up to the last
    /// `.` (`layers.0.weight` and `layers.0.bias`) share one.
    Layer,
}

/// The coefficient groups of a model's tensors, and the weighted combinations and
/// coefficient gradients over them.
///
/// Coefficients are an `(members, groups)` matrix `c`; [`combine`](ParamGroups::combine)
/// returns `offset + sum_i c[i, g(t)] x_i` tensor by tensor and
/// [`gradient`](ParamGroups::gradient) the matrix `G[i, g] = sum_{t in g} <grad_t, x_{i,t}>`,
/// which is `dL/dc` when `grad` is the loss gradient at the combination.
///
/// ```
/// use modelfusion::merge::{Granularity, ParamGroups};
/// use modelfusion::{Model, StateDict};
/// use ndarray::{arr1, arr2};
/// let a = StateDict::from_pairs([("u", arr1(&[1.0f64, 2.0]).into_dyn()), ("v", arr1(&[3.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("u", arr1(&[0.0f64, 1.0]).into_dyn()), ("v", arr1(&[-1.0]).into_dyn())])?;
/// let groups = ParamGroups::new(&a, Granularity::Tensor);
/// let c = arr2(&[[1.0, 0.5], [2.0, 0.0]]); // a: u 1, v 0.5; b: u 2, v 0
/// let m = groups.combine(None, &[&a, &b], c.view())?;
/// assert_eq!(m.get("u").unwrap().as_slice().unwrap(), &[1.0, 4.0]);
/// assert_eq!(m.get("v").unwrap()[[0]], 1.5);
/// let g = groups.gradient(&m, &[&a, &b])?; // <m_u, a_u> = 9, <m_v, a_v> = 4.5, ...
/// assert_eq!(g, arr2(&[[9.0, 4.5], [4.0, -1.5]]));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ParamGroups {
    names: Vec<String>,
    of_tensor: HashMap<String, usize>,
}

impl ParamGroups {
    /// The groups of `model`'s tensors at `granularity`, in the model's tensor order.
    ///
    /// ```
    /// use modelfusion::merge::{Granularity, ParamGroups};
    /// use modelfusion::StateDict;
    /// let m = StateDict::from_pairs([("w", ndarray::arr1(&[1.0f32]).into_dyn())])?;
    /// assert_eq!(ParamGroups::new(&m, Granularity::Model).names(), ["model"]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new<M: Model>(model: &M, granularity: Granularity) -> Self {
        let mut names: Vec<String> = Vec::new();
        let mut of_tensor = HashMap::new();
        for t in model.names() {
            let key = match granularity {
                Granularity::Model => "model".to_string(),
                Granularity::Tensor => t.to_string(),
                Granularity::Layer => t.rsplit_once('.').map_or(t, |(l, _)| l).to_string(),
            };
            let g = match names.iter().position(|n| *n == key) {
                Some(g) => g,
                None => {
                    names.push(key);
                    names.len() - 1
                }
            };
            of_tensor.insert(t.to_string(), g);
        }
        ParamGroups { names, of_tensor }
    }

    /// Number of groups.
    ///
    /// ```
    /// use modelfusion::merge::{Granularity, ParamGroups};
    /// assert!(ParamGroups::new(&modelfusion::StateDictF32::new(), Granularity::Model).is_empty());
    /// ```
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are no groups (a model without tensors).
    ///
    /// ```
    /// use modelfusion::merge::{Granularity, ParamGroups};
    /// assert_eq!(ParamGroups::new(&modelfusion::StateDictF32::new(), Granularity::Tensor).len(), 0);
    /// ```
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The group names (`model`, tensor names, or layer prefixes).
    ///
    /// ```
    /// use modelfusion::merge::{Granularity, ParamGroups};
    /// let m = modelfusion::StateDict::from_pairs([("a.w", ndarray::arr1(&[1.0f32]).into_dyn())])?;
    /// assert_eq!(ParamGroups::new(&m, Granularity::Layer).names(), ["a"]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The group of tensor `name`; errors naming a tensor the groups were not built on.
    ///
    /// ```
    /// use modelfusion::merge::{Granularity, ParamGroups};
    /// let m = modelfusion::StateDict::from_pairs([("w", ndarray::arr1(&[1.0f32]).into_dyn())])?;
    /// let g = ParamGroups::new(&m, Granularity::Tensor);
    /// assert_eq!(g.group_of("w")?, 0);
    /// assert!(g.group_of("v").unwrap_err().to_string().contains("`v`"));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn group_of(&self, name: &str) -> Result<usize> {
        self.of_tensor
            .get(name)
            .copied()
            .ok_or_else(|| Error::NameMismatch {
                detail: format!("tensor `{name}` is not in the coefficient groups"),
            })
    }

    /// Errors unless `coefficients` is a finite `(members, groups)` matrix.
    fn check_coefficients(&self, coefficients: ArrayView2<f64>, members: usize) -> Result<()> {
        let want = [members, self.len()];
        if coefficients.shape() != want {
            return Err(Error::shape(
                "coefficients (members, groups)",
                &want,
                coefficients.shape(),
            ));
        }
        if let Some(c) = coefficients.iter().find(|c| !c.is_finite()) {
            return Err(Error::invalid(
                "coefficients",
                format!("must be finite, got {c}"),
            ));
        }
        Ok(())
    }

    /// `offset + sum_i c[i, g(t)] members[i]` for every tensor `t` (`offset` zero when
    /// `None`). Errors on no members, members or an offset that do not match the groups'
    /// tensors, or a coefficient matrix of the wrong shape or with non-finite entries.
    ///
    /// ```
    /// use modelfusion::merge::{Granularity, ParamGroups};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::{arr1, arr2};
    /// let a = StateDict::from_pairs([("w", arr1(&[2.0f64]).into_dyn())])?;
    /// let g = ParamGroups::new(&a, Granularity::Model);
    /// let m = g.combine(Some(&a), &[&a], arr2(&[[0.5]]).view())?;
    /// assert_eq!(m.get("w").unwrap()[[0]], 3.0);
    /// assert!(g.combine(None, &[&a], arr2(&[[0.5, 1.0]]).view()).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn combine<M: Model>(
        &self,
        offset: Option<&M>,
        members: &[&M],
        coefficients: ArrayView2<f64>,
    ) -> Result<M> {
        let first = check_members(members, "the members to combine")?;
        self.check_model(first, "member 0")?;
        if let Some(o) = offset {
            first.check_compatible(o)?;
        }
        self.check_coefficients(coefficients, members.len())?;
        let e = <<M::Tensor as Tensor>::Elem as Scalar>::from_f64_lossy;
        first.try_map(|name, t0| {
            let g = self.group_of(name)?;
            let mut acc = match offset {
                Some(o) => o.require(name, "the offset")?.clone(),
                None => <M::Tensor as Tensor>::zeros(t0.shape()),
            };
            for (i, m) in members.iter().enumerate() {
                acc.axpy(e(coefficients[[i, g]]), m.require(name, "a member")?)?;
            }
            Ok(acc)
        })
    }

    /// `G[i, g] = sum_{t in g} <grad_t, members[i]_t>` (accumulated in `f64`): the
    /// gradient with respect to the coefficients of a combination at which `grad` is the
    /// parameter gradient. Errors on no members or mismatched models.
    ///
    /// ```
    /// use modelfusion::merge::{Granularity, ParamGroups};
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let a = StateDict::from_pairs([("w", arr1(&[1.0f64, 2.0]).into_dyn())])?;
    /// let g = ParamGroups::new(&a, Granularity::Model).gradient(&a, &[&a])?;
    /// assert_eq!(g[[0, 0]], 5.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn gradient<M: Model>(&self, grad: &M, members: &[&M]) -> Result<Array2<f64>> {
        let first = check_members(members, "the members of the combination")?;
        self.check_model(first, "member 0")?;
        first.check_compatible(grad)?;
        let mut out = Array2::zeros((members.len(), self.len()));
        for name in grad.names() {
            let g = self.group_of(name)?;
            let gt = grad.require(name, "the gradient")?;
            for (i, m) in members.iter().enumerate() {
                out[[i, g]] += gt.dot(m.require(name, "a member")?)?;
            }
        }
        Ok(out)
    }

    /// `model` with every tensor `t` scaled by `factors[g(t)]`. Errors on a factor count
    /// other than the group count, non-finite factors or a model the groups do not fit.
    ///
    /// ```
    /// use modelfusion::merge::{Granularity, ParamGroups};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let a = StateDict::from_pairs([("u", arr1(&[1.0f64]).into_dyn()), ("v", arr1(&[1.0]).into_dyn())])?;
    /// let g = ParamGroups::new(&a, Granularity::Tensor);
    /// let s = g.scale(&a, arr1(&[2.0, 3.0]).view())?;
    /// assert_eq!((s.get("u").unwrap()[[0]], s.get("v").unwrap()[[0]]), (2.0, 3.0));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn scale<M: Model>(&self, model: &M, factors: ArrayView1<f64>) -> Result<M> {
        self.check_model(model, "the model to scale")?;
        let col = factors.insert_axis(ndarray::Axis(0));
        self.check_coefficients(col, 1)?;
        let e = <<M::Tensor as Tensor>::Elem as Scalar>::from_f64_lossy;
        model.try_map(|name, t| {
            let f = e(factors[self.group_of(name)?]);
            Ok(t.map(move |x| x * f))
        })
    }

    /// Errors unless `model` has exactly the tensors the groups were built on.
    fn check_model<M: Model>(&self, model: &M, what: &str) -> Result<()> {
        for name in model.names() {
            self.group_of(name).map_err(|_| Error::NameMismatch {
                detail: format!("tensor `{name}` of {what} is not in the coefficient groups"),
            })?;
        }
        if model.num_tensors() != self.of_tensor.len() {
            return Err(Error::NameMismatch {
                detail: format!(
                    "{what} has {} tensors, the coefficient groups were built on {}",
                    model.num_tensors(),
                    self.of_tensor.len()
                ),
            });
        }
        Ok(())
    }
}

/// Errors unless `members` is non-empty, mutually compatible and finite; returns the
/// first.
fn check_members<'a, M: Model>(members: &[&'a M], what: &str) -> Result<&'a M> {
    let first = *members.first().ok_or_else(|| Error::empty(what))?;
    for (i, m) in members.iter().enumerate() {
        first
            .check_compatible(m)
            .map_err(|e| mismatch_context(e, "member 0", &format!("member {i} ({what})")))?;
        m.check_finite(&format!("member {i} ({what})"))?;
    }
    Ok(first)
}

/// The coefficient matrix as a one-tensor model, for the crate's optimisers.
fn as_model(c: Array2<f64>) -> Result<StateDictF64> {
    StateDict::from_pairs([("coefficients", c.into_dyn())])
}

/// The coefficient matrix of a one-tensor model made by [`as_model`].
fn as_matrix(m: &StateDictF64) -> Result<Array2<f64>> {
    m.require("coefficients", "the coefficient model")?
        .clone()
        .into_dimensionality()
        .map_err(|e| Error::invalid("coefficients", e.to_string()))
}

/// Gradient descent on a coefficient matrix with the crate's optimiser: step `s` gets
/// the loss and `dL/dc` from `loss_and_gradient(s, c)`, steps, then `project`s the
/// coefficients (clipping). Returns the final coefficients and every step's loss.
fn descend(
    init: Array2<f64>,
    steps: usize,
    optimizer: Optimizer,
    mut loss_and_gradient: impl FnMut(usize, &Array2<f64>) -> Result<(f64, Array2<f64>)>,
    project: impl Fn(&mut ndarray::ArrayD<f64>),
) -> Result<(Array2<f64>, Vec<f64>)> {
    let mut c = as_model(init)?;
    let mut opt = ModelOptimizer::new(optimizer);
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let (loss, grad) = loss_and_gradient(step, &as_matrix(&c)?)?;
        losses.push(loss);
        opt.step(&mut c, &as_model(grad)?, 1.0)?;
        if let Some(t) = c.get_mut("coefficients") {
            project(t);
        }
    }
    Ok((as_matrix(&c)?, losses))
}

/// Calls the objective and errors on a non-finite loss or a gradient that does not fit.
fn evaluate<M: Model, S: StochasticGradient<M>>(
    objective: &mut S,
    model: &M,
    step: usize,
    what: &str,
) -> Result<(f64, M)> {
    let (loss, grad) = objective.loss_and_gradient_at(model, step)?;
    if !loss.is_finite() {
        return Err(Error::NonFinite {
            what: format!("the {what} loss at step {step} ({loss}; learning rate too high?)"),
        });
    }
    model.check_compatible(&grad)?;
    grad.check_finite(&format!("the {what} gradient at step {step}"))?;
    Ok((loss, grad))
}

/// Validates a coefficient optimiser and a step count.
fn check_training(steps: usize, optimizer: Optimizer) -> Result<()> {
    optimizer.validate()?;
    if steps == 0 {
        return Err(Error::invalid("steps", "must be at least 1, got 0"));
    }
    Ok(())
}

/// AdaMerging (Yang et al. 2024): task arithmetic `base + sum_i lambda[i, g(t)] tau_i`
/// (`tau_i = theta_i - base`) whose coefficients are learned by minimising an
/// unsupervised loss, in the paper the Shannon entropy of the merged model's predictions
/// on unlabelled test inputs ([`nn::Entropy`](crate::nn::Entropy) gives it for the
/// crate's networks; with one head per task, sum the entropies of the merged backbone
/// with each head). Task-wise ([`Granularity::Model`]) or layer-wise
/// ([`Granularity::Tensor`], as the authors' code, or [`Granularity::Layer`])
/// coefficients start at the paper's `0.3` and are clipped to `[0, 1]` after every step
/// (both configurable). The default optimiser is the paper's Adam with rate `1e-3`.
///
/// The objective sees the merged model and the step index (its minibatch: seed the
/// batches there); its gradient is mapped to the coefficients by [`ParamGroups`].
///
/// ```
/// use modelfusion::merge::{AdaMerging, Granularity};
/// use modelfusion::optim::Optimizer;
/// use modelfusion::{Model, StateDict, StateDictF64};
/// use ndarray::arr1;
///
/// let base = StateDict::from_pairs([("w", arr1(&[0.0, 0.0]).into_dyn())])?;
/// let a = StateDict::from_pairs([("w", arr1(&[1.0, 0.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[0.0, 1.0]).into_dyn())])?;
/// // A toy loss |w - (0.5, 0.8)|^2 / 2: the best coefficients are 0.5 and 0.8.
/// let target = StateDict::from_pairs([("w", arr1(&[0.5, 0.8]).into_dyn())])?;
/// let mut loss = |m: &StateDictF64, _step: usize| {
///     let d = m.sub(&target)?;
///     Ok((0.5 * d.norm().powi(2), d))
/// };
/// let ada = AdaMerging::new(200, Optimizer::sgd(0.5, 0.0)?)?;
/// let run = ada.merge(&base, &[&a, &b], &mut loss)?;
/// assert!((run.coefficients[[0, 0]] - 0.5).abs() < 1e-6);
/// assert!((run.coefficients[[1, 0]] - 0.8).abs() < 1e-6);
/// assert!(run.losses[0] > *run.losses.last().unwrap());
/// assert!(AdaMerging::new(0, Optimizer::adam(1e-3)?).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct AdaMerging {
    steps: usize,
    optimizer: Optimizer,
    granularity: Granularity,
    init: f64,
    clip: Option<(f64, f64)>,
}

/// The result of [`AdaMerging::merge`].
///
/// ```
/// use modelfusion::merge::AdaMerging;
/// use modelfusion::optim::Optimizer;
/// use modelfusion::{Model, StateDict, StateDictF64};
/// let base = StateDict::from_pairs([("w", ndarray::arr1(&[0.0]).into_dyn())])?;
/// let a = StateDict::from_pairs([("w", ndarray::arr1(&[1.0]).into_dyn())])?;
/// let mut zero = |m: &StateDictF64, _: usize| Ok((0.0, m.scale(0.0)?));
/// let run = AdaMerging::new(3, Optimizer::adam(1e-3)?)?.merge(&base, &[&a], &mut zero)?;
/// assert_eq!((run.losses.len(), run.groups, run.coefficients[[0, 0]]), (3, vec!["model".to_string()], 0.3));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct AdaMergingRun<M> {
    /// The merged model at the learned coefficients.
    pub model: M,
    /// The learned coefficients, `(tasks, groups)`.
    pub coefficients: Array2<f64>,
    /// The group names (columns of `coefficients`).
    pub groups: Vec<String>,
    /// The objective at the start of every step (`losses[0]`: at the initial coefficients).
    pub losses: Vec<f64>,
}

impl AdaMerging {
    /// `steps >= 1` steps of `optimizer` (validated) on task-wise coefficients starting
    /// at `0.3`, clipped to `[0, 1]`.
    ///
    /// ```
    /// use modelfusion::merge::AdaMerging;
    /// use modelfusion::optim::Optimizer;
    /// let raw = Optimizer::Sgd { lr: f64::NAN, momentum: 0.0, nesterov: false };
    /// assert!(AdaMerging::new(10, raw).unwrap_err().to_string().contains("lr"));
    /// ```
    pub fn new(steps: usize, optimizer: Optimizer) -> Result<Self> {
        check_training(steps, optimizer)?;
        Ok(AdaMerging {
            steps,
            optimizer,
            granularity: Granularity::Model,
            init: 0.3,
            clip: Some((0.0, 1.0)),
        })
    }

    /// The paper's setup: `steps` of Adam with rate `1e-3`.
    ///
    /// ```
    /// let a = modelfusion::merge::AdaMerging::paper(500)?;
    /// assert_eq!(a.optimizer().lr(), 1e-3);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn paper(steps: usize) -> Result<Self> {
        Self::new(steps, Optimizer::adam(1e-3)?)
    }

    /// Sets the coefficient granularity (task-wise: [`Granularity::Model`]).
    ///
    /// ```
    /// use modelfusion::merge::{AdaMerging, Granularity};
    /// let a = AdaMerging::paper(1)?.with_granularity(Granularity::Tensor);
    /// assert_eq!(a.granularity(), Granularity::Tensor);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_granularity(mut self, granularity: Granularity) -> Self {
        self.granularity = granularity;
        self
    }

    /// Sets the initial coefficient (finite; the paper's `0.3`).
    ///
    /// ```
    /// assert!(modelfusion::merge::AdaMerging::paper(1)?.with_init(f64::INFINITY).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_init(mut self, init: f64) -> Result<Self> {
        check_finite("init", init)?;
        self.init = init;
        Ok(self)
    }

    /// Sets the clipping range applied after every step (`None`: no clipping); errors
    /// unless `lo <= hi`, both finite.
    ///
    /// ```
    /// use modelfusion::merge::AdaMerging;
    /// assert!(AdaMerging::paper(1)?.with_clip(Some((1.0, 0.0))).is_err());
    /// assert_eq!(AdaMerging::paper(1)?.with_clip(None)?.clip(), None);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_clip(mut self, clip: Option<(f64, f64)>) -> Result<Self> {
        if let Some((lo, hi)) = clip {
            check_finite("clip (low)", lo)?;
            check_finite("clip (high)", hi)?;
            if lo > hi {
                return Err(Error::invalid(
                    "clip",
                    format!("low {lo} is above high {hi}"),
                ));
            }
        }
        self.clip = clip;
        Ok(self)
    }

    /// The number of steps.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::AdaMerging::paper(7)?.steps(), 7);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The optimiser of the coefficients.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::AdaMerging::paper(7)?.optimizer().lr(), 1e-3);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn optimizer(&self) -> Optimizer {
        self.optimizer
    }

    /// The coefficient granularity.
    ///
    /// ```
    /// use modelfusion::merge::{AdaMerging, Granularity};
    /// assert_eq!(AdaMerging::paper(1)?.granularity(), Granularity::Model);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// The initial coefficient.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::AdaMerging::paper(1)?.init(), 0.3);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn init(&self) -> f64 {
        self.init
    }

    /// The clipping range.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::AdaMerging::paper(1)?.clip(), Some((0.0, 1.0)));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn clip(&self) -> Option<(f64, f64)> {
        self.clip
    }

    /// The task vectors `theta_i - base` and their groups; errors on no fine-tuned
    /// models or models that do not match the base.
    fn task_vectors<M: Model>(&self, base: &M, finetuned: &[&M]) -> Result<(Vec<M>, ParamGroups)> {
        check_members(finetuned, "the fine-tuned models")?;
        base.check_finite("the base model")?;
        let taus = finetuned
            .iter()
            .enumerate()
            .map(|(i, m)| {
                base.check_compatible(m).map_err(|e| {
                    Error::invalid(
                        "finetuned",
                        format!("model {i} does not match the base: {e}"),
                    )
                })?;
                m.sub(base)
            })
            .collect::<Result<Vec<M>>>()?;
        Ok((taus, ParamGroups::new(base, self.granularity)))
    }

    /// The merged model `base + sum_i c[i, g(t)] (theta_i - base)` at given coefficients
    /// `(tasks, groups)` (with one group per task and every coefficient `lambda`, task
    /// arithmetic). Errors on bad models or coefficients of the wrong shape.
    ///
    /// ```
    /// use modelfusion::merge::AdaMerging;
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::{arr1, arr2};
    /// let base = StateDict::from_pairs([("w", arr1(&[1.0f64]).into_dyn())])?;
    /// let a = StateDict::from_pairs([("w", arr1(&[3.0f64]).into_dyn())])?;
    /// let m = AdaMerging::paper(1)?.combine(&base, &[&a], arr2(&[[0.5]]).view())?;
    /// assert_eq!(m.get("w").unwrap()[[0]], 2.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn combine<M: Model>(
        &self,
        base: &M,
        finetuned: &[&M],
        coefficients: ArrayView2<f64>,
    ) -> Result<M> {
        let (taus, groups) = self.task_vectors(base, finetuned)?;
        let refs: Vec<&M> = taus.iter().collect();
        groups.combine(Some(base), &refs, coefficients)
    }

    /// Learns the coefficients by minimising `objective` at the merged model for
    /// [`steps`](AdaMerging::steps) steps (step `s` calls
    /// `objective.loss_and_gradient_at(merged, s)`). Errors on no fine-tuned models,
    /// models that do not match the base or each other, non-finite models, a non-finite
    /// loss or a gradient that does not match the models.
    ///
    /// ```
    /// use modelfusion::merge::AdaMerging;
    /// use modelfusion::{Model, StateDictF64};
    /// let mut loss = |m: &StateDictF64, _: usize| Ok((0.0, m.clone()));
    /// let base = StateDictF64::new();
    /// assert!(AdaMerging::paper(1)?.merge(&base, &[], &mut loss).unwrap_err().to_string().contains("fine-tuned"));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn merge<M: Model, S: StochasticGradient<M>>(
        &self,
        base: &M,
        finetuned: &[&M],
        objective: &mut S,
    ) -> Result<AdaMergingRun<M>> {
        check_training(self.steps, self.optimizer)?;
        let (taus, groups) = self.task_vectors(base, finetuned)?;
        let refs: Vec<&M> = taus.iter().collect();
        let init = Array2::from_elem((taus.len(), groups.len()), self.init);
        let (coefficients, losses) = descend(
            init,
            self.steps,
            self.optimizer,
            |step, c| {
                let merged = groups.combine(Some(base), &refs, c.view())?;
                let (loss, grad) = evaluate(objective, &merged, step, "AdaMerging")?;
                Ok((loss, groups.gradient(&grad, &refs)?))
            },
            |c| {
                if let Some((lo, hi)) = self.clip {
                    c.mapv_inplace(|x| x.clamp(lo, hi));
                }
            },
        )?;
        Ok(AdaMergingRun {
            model: groups.combine(Some(base), &refs, coefficients.view())?,
            coefficients,
            groups: groups.names().to_vec(),
            losses,
        })
    }
}

/// Column-wise softmax of `(members, groups)` logits.
fn softmax_columns(logits: &Array2<f64>) -> Array2<f64> {
    let mut w = logits.clone();
    for mut col in w.columns_mut() {
        let max = col.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        col.mapv_inplace(|v| (v - max).exp());
        let sum = col.sum();
        col.mapv_inplace(|v| v / sum);
    }
    w
}

/// The learned soup (Wortsman et al. 2022): the soup `sum_i w_i theta_i` with mixing
/// weights `w = softmax(beta)` (over the ingredients, per group) whose logits `beta`
/// are learned by gradient descent on a held-out labelled loss. The logits start at
/// zero (the uniform soup); [`Granularity::Model`] is the paper's learned soup,
/// [`Granularity::Tensor`]/[`Granularity::Layer`] its "by layer" variant. Through the
/// softmax, `dL/dbeta_{i,g} = w_{i,g} (G_{i,g} - sum_k w_{k,g} G_{k,g})` with `G` from
/// [`ParamGroups::gradient`]. The paper also learns a temperature for the logits'
/// scale; that is left out (the mixing weights do not depend on it).
///
/// ```
/// use modelfusion::merge::LearnedSoup;
/// use modelfusion::optim::Optimizer;
/// use modelfusion::{Model, StateDict, StateDictF64};
/// use ndarray::arr1;
///
/// let a = StateDict::from_pairs([("w", arr1(&[0.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[1.0]).into_dyn())])?;
/// // Held-out loss (w - 0.8)^2 / 2: the best soup is 0.2 a + 0.8 b.
/// let mut loss = |m: &StateDictF64, _: usize| {
///     let d = m.get("w").unwrap()[[0]] - 0.8;
///     Ok((0.5 * d * d, StateDict::from_pairs([("w", arr1(&[d]).into_dyn())])?))
/// };
/// let run = LearnedSoup::new(500, Optimizer::sgd(4.0, 0.0)?)?.cook(&[&a, &b], &mut loss)?;
/// assert!((run.weights[[1, 0]] - 0.8).abs() < 1e-3);
/// assert!((run.soup.get("w").unwrap()[[0]] - 0.8).abs() < 1e-3);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LearnedSoup {
    steps: usize,
    optimizer: Optimizer,
    granularity: Granularity,
}

/// The result of [`LearnedSoup::cook`].
///
/// ```
/// use modelfusion::merge::LearnedSoup;
/// use modelfusion::optim::Optimizer;
/// use modelfusion::{Model, StateDict, StateDictF64};
/// let a = StateDict::from_pairs([("w", ndarray::arr1(&[1.0]).into_dyn())])?;
/// let mut zero = |m: &StateDictF64, _: usize| Ok((0.0, m.scale(0.0)?));
/// let run = LearnedSoup::new(2, Optimizer::adam(0.1)?)?.cook(&[&a, &a], &mut zero)?;
/// assert_eq!(run.weights[[0, 0]], 0.5);
/// assert_eq!(run.losses.len(), 2);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LearnedSoupRun<M> {
    /// The soup at the learned weights.
    pub soup: M,
    /// The mixing weights `(ingredients, groups)`; every column sums to 1.
    pub weights: Array2<f64>,
    /// The group names (columns of `weights`).
    pub groups: Vec<String>,
    /// The held-out loss at the start of every step.
    pub losses: Vec<f64>,
}

impl LearnedSoup {
    /// `steps >= 1` steps of `optimizer` (validated) on one logit per ingredient.
    ///
    /// ```
    /// use modelfusion::merge::LearnedSoup;
    /// use modelfusion::optim::Optimizer;
    /// assert!(LearnedSoup::new(0, Optimizer::adam(0.1)?).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(steps: usize, optimizer: Optimizer) -> Result<Self> {
        check_training(steps, optimizer)?;
        Ok(LearnedSoup {
            steps,
            optimizer,
            granularity: Granularity::Model,
        })
    }

    /// Sets the granularity of the mixing weights.
    ///
    /// ```
    /// use modelfusion::merge::{Granularity, LearnedSoup};
    /// let s = LearnedSoup::new(1, modelfusion::optim::Optimizer::adam(0.1)?)?.with_granularity(Granularity::Layer);
    /// assert_eq!(s.granularity(), Granularity::Layer);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_granularity(mut self, granularity: Granularity) -> Self {
        self.granularity = granularity;
        self
    }

    /// The number of steps.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::LearnedSoup::new(4, modelfusion::optim::Optimizer::adam(0.1)?)?.steps(), 4);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The optimiser of the logits.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::LearnedSoup::new(4, modelfusion::optim::Optimizer::adam(0.1)?)?.optimizer().lr(), 0.1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn optimizer(&self) -> Optimizer {
        self.optimizer
    }

    /// The granularity of the mixing weights.
    ///
    /// ```
    /// use modelfusion::merge::{Granularity, LearnedSoup};
    /// assert_eq!(LearnedSoup::new(4, modelfusion::optim::Optimizer::adam(0.1)?)?.granularity(), Granularity::Model);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// Learns the mixing weights on `objective` (the held-out loss of the soup; step `s`
    /// calls `objective.loss_and_gradient_at(soup, s)`). Errors on no ingredients,
    /// mismatched or non-finite ingredients, a non-finite loss or a gradient that does
    /// not match.
    ///
    /// ```
    /// use modelfusion::merge::LearnedSoup;
    /// use modelfusion::{StateDict, StateDictF64};
    /// let a = StateDict::from_pairs([("w", ndarray::arr1(&[1.0]).into_dyn())])?;
    /// let b = StateDict::from_pairs([("v", ndarray::arr1(&[1.0]).into_dyn())])?;
    /// let mut l = |m: &StateDictF64, _: usize| Ok((0.0, m.clone()));
    /// let s = LearnedSoup::new(1, modelfusion::optim::Optimizer::adam(0.1)?)?;
    /// assert!(s.cook(&[&a, &b], &mut l).unwrap_err().to_string().contains("member 1"));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn cook<M: Model, S: StochasticGradient<M>>(
        &self,
        ingredients: &[&M],
        objective: &mut S,
    ) -> Result<LearnedSoupRun<M>> {
        check_training(self.steps, self.optimizer)?;
        let first = check_members(ingredients, "the soup ingredients")?;
        let groups = ParamGroups::new(first, self.granularity);
        let init = Array2::zeros((ingredients.len(), groups.len()));
        let (beta, losses) = descend(
            init,
            self.steps,
            self.optimizer,
            |step, beta| {
                let w = softmax_columns(beta);
                let soup = groups.combine(None, ingredients, w.view())?;
                let (loss, grad) = evaluate(objective, &soup, step, "learned soup")?;
                let g = groups.gradient(&grad, ingredients)?;
                let mean = (&w * &g).sum_axis(ndarray::Axis(0));
                Ok((loss, &w * &(&g - &mean.insert_axis(ndarray::Axis(0)))))
            },
            |_| {},
        )?;
        let weights = softmax_columns(&beta);
        Ok(LearnedSoupRun {
            soup: groups.combine(None, ingredients, weights.view())?,
            weights,
            groups: groups.names().to_vec(),
            losses,
        })
    }
}

/// Subspace learning (Wortsman et al. 2021, *Learning Neural Network Subspaces*): a line
/// (2 endpoints) or simplex (`k` endpoints) of networks trained in one run. Every step
/// samples a point `alpha` uniformly on the simplex (seeded: `alpha ~ U[0, 1]` for a
/// line, `Dirichlet(1, ..., 1)` for more endpoints), evaluates the loss at
/// `sum_i alpha_i theta_i`, and sends `alpha_i * grad` to endpoint `i` (the chain rule),
/// each endpoint with its own optimiser state, weight decay and frozen parameters from
/// the [`StepConfig`].
///
/// `alpha` is global (one per step, [`Granularity::Model`]: the paper's main setup) by
/// default; [`Granularity::Tensor`]/[`Granularity::Layer`] sample one per group (the
/// paper's layer-wise variant). The paper's optional cosine-similarity regulariser
/// between endpoints is not included. A schedule of points can replace the sampling
/// ([`with_points`](Subspace::with_points)).
///
/// ```
/// use modelfusion::merge::{StepConfig, Subspace};
/// use modelfusion::optim::Optimizer;
/// use modelfusion::{Model, StateDict, StateDictF64};
/// use ndarray::arr1;
///
/// // Loss |w - 1|^2 / 2: the whole line moves to 1.
/// let mut loss = |m: &StateDictF64, _: usize| {
///     let d = m.sub(&StateDict::from_pairs([("w", arr1(&[1.0]).into_dyn())])?)?;
///     Ok((0.5 * d.norm().powi(2), d))
/// };
/// let a = StateDict::from_pairs([("w", arr1(&[0.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[3.0]).into_dyn())])?;
/// let line = Subspace::new(StepConfig::new(500, Optimizer::sgd(0.5, 0.0)?)?).with_seed(7);
/// let run = line.train(&[a, b], &mut loss)?;
/// assert!((run.midpoint()?.get("w").unwrap()[[0]] - 1.0).abs() < 1e-2);
/// assert_eq!(run.points.len(), 500);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Subspace {
    config: StepConfig,
    seed: u64,
    granularity: Granularity,
    points: Option<Vec<Vec<f64>>>,
}

/// The result of [`Subspace::train`]: the endpoints, the loss and point of every step.
///
/// ```
/// use modelfusion::merge::{StepConfig, Subspace};
/// use modelfusion::{Model, StateDict, StateDictF64};
/// let a = StateDict::from_pairs([("w", ndarray::arr1(&[0.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", ndarray::arr1(&[2.0]).into_dyn())])?;
/// let mut zero = |m: &StateDictF64, _: usize| Ok((0.0, m.scale(0.0)?));
/// let run = Subspace::new(StepConfig::new(1, modelfusion::optim::Optimizer::sgd(0.1, 0.0)?)?)
///     .train(&[a, b], &mut zero)?;
/// assert_eq!(run.midpoint()?.get("w").unwrap()[[0]], 1.0);
/// assert_eq!(run.point(&[0.25, 0.75])?.get("w").unwrap()[[0]], 1.5);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SubspaceRun<M> {
    /// The trained endpoints.
    pub endpoints: Vec<M>,
    /// The training loss of every step (at that step's point).
    pub losses: Vec<f64>,
    /// The point of every step, `(endpoints, groups)`.
    pub points: Vec<Array2<f64>>,
}

impl<M: Model> SubspaceRun<M> {
    /// The network at barycentric coordinates `alpha` (one per endpoint, finite; not
    /// required to sum to 1).
    ///
    /// ```
    /// use modelfusion::merge::SubspaceRun;
    /// use modelfusion::StateDict;
    /// let a = StateDict::from_pairs([("w", ndarray::arr1(&[1.0f64]).into_dyn())])?;
    /// let run = SubspaceRun { endpoints: vec![a.clone(), a], losses: vec![], points: vec![] };
    /// assert!(run.point(&[1.0]).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn point(&self, alpha: &[f64]) -> Result<M> {
        let refs: Vec<&M> = self.endpoints.iter().collect();
        M::weighted_sum(&refs, alpha)
    }

    /// The centre of the subspace (the line's midpoint), `mean_i theta_i`.
    ///
    /// ```
    /// use modelfusion::merge::SubspaceRun;
    /// use modelfusion::StateDict;
    /// let run = SubspaceRun::<modelfusion::StateDictF64> { endpoints: vec![], losses: vec![], points: vec![] };
    /// assert!(run.midpoint().is_err());
    /// # let _ = StateDict::<ndarray::ArrayD<f64>>::new();
    /// ```
    pub fn midpoint(&self) -> Result<M> {
        let k = self.endpoints.len();
        if k == 0 {
            return Err(Error::empty("the subspace endpoints"));
        }
        self.point(&vec![1.0 / k as f64; k])
    }
}

impl Subspace {
    /// Trains as `config` says (steps, optimiser, weight decay, schedule, frozen
    /// parameters), global `alpha`, seed 0.
    ///
    /// ```
    /// use modelfusion::merge::{Granularity, StepConfig, Subspace};
    /// let s = Subspace::new(StepConfig::new(3, modelfusion::optim::Optimizer::adam(0.1)?)?);
    /// assert_eq!((s.seed(), s.granularity()), (0, Granularity::Model));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(config: StepConfig) -> Self {
        Subspace {
            config,
            seed: 0,
            granularity: Granularity::Model,
            points: None,
        }
    }

    /// Sets the seed of the sampled points.
    ///
    /// ```
    /// use modelfusion::merge::{StepConfig, Subspace};
    /// let s = Subspace::new(StepConfig::new(3, modelfusion::optim::Optimizer::adam(0.1)?)?).with_seed(5);
    /// assert_eq!(s.seed(), 5);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets whether `alpha` is global or sampled per tensor / layer.
    ///
    /// ```
    /// use modelfusion::merge::{Granularity, StepConfig, Subspace};
    /// let s = Subspace::new(StepConfig::new(3, modelfusion::optim::Optimizer::adam(0.1)?)?)
    ///     .with_granularity(Granularity::Layer);
    /// assert_eq!(s.granularity(), Granularity::Layer);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_granularity(mut self, granularity: Granularity) -> Self {
        self.granularity = granularity;
        self
    }

    /// Replaces the sampling with a fixed schedule of global points (step `s` uses
    /// `points[s % len]`); errors on an empty schedule or a point that is not on the
    /// simplex (finite, `>= 0`, summing to 1 within `1e-9`). Its length must match the
    /// endpoint count at [`train`](Subspace::train).
    ///
    /// ```
    /// use modelfusion::merge::{StepConfig, Subspace};
    /// let s = Subspace::new(StepConfig::new(3, modelfusion::optim::Optimizer::adam(0.1)?)?);
    /// assert!(s.clone().with_points(vec![vec![0.5, 0.5]]).is_ok());
    /// assert!(s.clone().with_points(vec![vec![0.5, 0.6]]).unwrap_err().to_string().contains("simplex"));
    /// assert!(s.with_points(vec![]).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_points(mut self, points: Vec<Vec<f64>>) -> Result<Self> {
        if points.is_empty() {
            return Err(Error::empty("the schedule of subspace points"));
        }
        for (s, p) in points.iter().enumerate() {
            let sum: f64 = p.iter().sum();
            if p.iter().any(|a| !a.is_finite() || *a < 0.0) || (sum - 1.0).abs() > 1e-9 {
                return Err(Error::invalid(
                    "points",
                    format!("point {s} {p:?} is not on the simplex (>= 0, summing to 1)"),
                ));
            }
        }
        self.points = Some(points);
        Ok(self)
    }

    /// The seed.
    ///
    /// ```
    /// use modelfusion::merge::{StepConfig, Subspace};
    /// assert_eq!(Subspace::new(StepConfig::new(3, modelfusion::optim::Optimizer::adam(0.1)?)?).seed(), 0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The granularity of `alpha`.
    ///
    /// ```
    /// use modelfusion::merge::{Granularity, StepConfig, Subspace};
    /// let s = Subspace::new(StepConfig::new(3, modelfusion::optim::Optimizer::adam(0.1)?)?);
    /// assert_eq!(s.granularity(), Granularity::Model);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// The training configuration.
    ///
    /// ```
    /// use modelfusion::merge::{StepConfig, Subspace};
    /// let s = Subspace::new(StepConfig::new(3, modelfusion::optim::Optimizer::adam(0.1)?)?);
    /// assert_eq!(s.config().steps(), 3);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn config(&self) -> &StepConfig {
        &self.config
    }

    /// The point of step `step`: `(endpoints, groups)`, every column on the simplex.
    fn sample(&self, rng: &mut ChaCha8Rng, step: usize, k: usize, groups: usize) -> Array2<f64> {
        if let Some(points) = &self.points {
            let p = Array1::from(points[step % points.len()].clone());
            let mut out = Array2::zeros((k, groups));
            for mut col in out.columns_mut() {
                col.assign(&p);
            }
            return out;
        }
        let cols = if self.granularity == Granularity::Model {
            1
        } else {
            groups
        };
        let mut draws = Array2::zeros((k, cols));
        for mut col in draws.columns_mut() {
            if k == 2 {
                let a: f64 = rng.random();
                col[0] = a;
                col[1] = 1.0 - a;
            } else {
                col.mapv_inplace(|_| -(1.0 - rng.random::<f64>()).ln());
                let s = col.sum();
                col.mapv_inplace(|v| v / s);
            }
        }
        if cols == groups {
            return draws;
        }
        Array2::from_shape_fn((k, groups), |(i, _)| draws[[i, 0]])
    }

    /// Trains the subspace from `inits` (at least two endpoints, usually independent
    /// initialisations) on `objective` (step `s` calls
    /// `objective.loss_and_gradient_at(point, s)`). Errors on fewer than two endpoints,
    /// mismatched or non-finite endpoints, a point schedule whose length is not the
    /// endpoint count, a non-finite loss or a gradient that does not match.
    ///
    /// ```
    /// use modelfusion::merge::{StepConfig, Subspace};
    /// use modelfusion::{StateDict, StateDictF64};
    /// let a = StateDict::from_pairs([("w", ndarray::arr1(&[0.0]).into_dyn())])?;
    /// let mut l = |m: &StateDictF64, _: usize| Ok((0.0, m.clone()));
    /// let s = Subspace::new(StepConfig::new(1, modelfusion::optim::Optimizer::sgd(0.1, 0.0)?)?);
    /// assert!(s.train(&[a], &mut l).unwrap_err().to_string().contains("two endpoints"));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn train<M: Model, S: StochasticGradient<M>>(
        &self,
        inits: &[M],
        objective: &mut S,
    ) -> Result<SubspaceRun<M>> {
        let refs: Vec<&M> = inits.iter().collect();
        let first = check_members(&refs, "the subspace endpoints")?;
        let k = inits.len();
        if k < 2 {
            return Err(Error::invalid(
                "inits",
                format!("a subspace needs at least two endpoints, got {k}"),
            ));
        }
        if let Some(p) = self
            .points
            .as_ref()
            .and_then(|ps| ps.iter().find(|p| p.len() != k))
        {
            return Err(Error::invalid(
                "points",
                format!("a point of {} coordinates for {k} endpoints", p.len()),
            ));
        }
        self.config.optimizer().validate()?;
        let groups = ParamGroups::new(first, self.granularity);
        let mut endpoints = inits.to_vec();
        let mut optimizers: Vec<ModelOptimizer<M>> = (0..k)
            .map(|_| {
                ModelOptimizer::new(self.config.optimizer())
                    .with_weight_decay(self.config.weight_decay())
                    .map(|o| o.with_frozen(self.config.frozen().iter().cloned()))
            })
            .collect::<Result<_>>()?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let steps = self.config.steps();
        let (mut losses, mut points) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
        for step in 0..steps {
            let alpha = self.sample(&mut rng, step, k, groups.len());
            let refs: Vec<&M> = endpoints.iter().collect();
            let at = groups.combine(None, &refs, alpha.view())?;
            let (loss, grad) = evaluate(objective, &at, step, "subspace training")?;
            let lr_factor = self.config.schedule().factor(step, steps);
            for (i, (end, opt)) in endpoints.iter_mut().zip(&mut optimizers).enumerate() {
                let g = groups.scale(&grad, alpha.row(i))?;
                opt.step(end, &g, lr_factor)?;
            }
            losses.push(loss);
            points.push(alpha);
        }
        Ok(SubspaceRun {
            endpoints,
            losses,
            points,
        })
    }
}
