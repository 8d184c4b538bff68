//! Straight-through estimator matching (Ainsworth, Hayase & Srinivasa 2023, "Git
//! Re-Basin", section 3.3): learn a proxy model whose weight-matching projection of B
//! minimises the loss at the midpoint with A.

use std::ops::ControlFlow;

use super::{AlignStats, Aligner, Alignment, WeightMatching, check_pair};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::objective::Gradient;
use crate::optim::{ModelOptimizer, Optimizer};
use crate::perm::{PermutationSet, PermutationSpec};
use crate::progress::{Observer, Progress, Silent};

/// Git Re-Basin's straight-through estimator (STE) matching: trains a proxy model
/// `theta` so that the permutation `P = weight_matching(theta, B)` makes the midpoint
/// `(A + P(B)) / 2` a low-loss model.
///
/// The proxy starts at A. Every step
///
/// 1. computes `P = weight_matching(theta, B)` ([`WeightMatching`], warm-started from
///    the previous step's permutation),
/// 2. evaluates the objective and its gradient `g` at the midpoint `(A + P(B)) / 2`,
/// 3. passes the gradient straight through the projection: the forward pass used
///    `P(B)`, the backward pass treats it as `theta` (the reference's
///    `theta + stop_gradient(P(B) - theta)`), so the proxy's gradient is `g / 2`,
/// 4. takes an optimiser step on the proxy (Adam, learning rate `1e-3`, by default).
///
/// After the last step the permutation is matched once more against the final proxy;
/// that is the result. [`AlignStats::objective`] holds the midpoint loss of every step
/// (the loss *before* that step's update), [`AlignStats::sweeps`] the number of steps.
/// The objective is full-batch ([`Gradient`]); the whole computation depends only on
/// the seed (the group order of weight matching) and the objective.
///
/// ```
/// use modelfusion::align::{Aligner, SteMatching};
/// use modelfusion::nn::{data, Architecture, Classification, Mlp, Network};
/// use modelfusion::{Model, Objective, StateDictF32};
///
/// let d = data::digits()?.head(200);
/// let net = Mlp::new(&[64, 16, 10])?;
/// let (a, b): (StateDictF32, StateDictF32) = (net.init(1), net.init(2));
/// let task = Classification::new(&net, &d, 200)?;
/// let ste = SteMatching::new(task.clone(), 0).with_steps(20)?.with_learning_rate(1e-2)?;
/// let al = ste.align(&a, &b, &net.spec())?;
/// assert_eq!(al.stats().objective.len(), 20);
/// // the result is a permutation: B's function is kept
/// let b_aligned = al.apply(&net.spec(), &b)?;
/// assert!((task.loss(&b_aligned)? - task.loss(&b)?).abs() < 1e-4);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SteMatching<G> {
    objective: G,
    seed: u64,
    steps: usize,
    optimizer: Optimizer,
    max_iter: usize,
}

impl<G> SteMatching<G> {
    /// STE matching on `objective` (evaluated at midpoints), with the weight-matching
    /// group order drawn from `seed`: 100 steps of Adam with learning rate `1e-3`, at
    /// most 100 weight-matching sweeps per step.
    ///
    /// ```
    /// use modelfusion::align::SteMatching;
    /// let ste = SteMatching::new((), 3);
    /// assert_eq!((ste.steps(), ste.seed(), ste.optimizer().lr()), (100, 3, 1e-3));
    /// ```
    pub fn new(objective: G, seed: u64) -> Self {
        SteMatching {
            objective,
            seed,
            steps: 100,
            optimizer: Optimizer::Adam {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            max_iter: 100,
        }
    }

    /// Trains the proxy for `steps` steps (at least 1).
    ///
    /// ```
    /// use modelfusion::align::SteMatching;
    /// assert_eq!(SteMatching::new((), 0).with_steps(5)?.steps(), 5);
    /// assert!(SteMatching::new((), 0).with_steps(0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_steps(mut self, steps: usize) -> Result<Self> {
        self.steps = check_steps(steps)?;
        Ok(self)
    }

    /// Updates the proxy with `optimizer` (checked: a hand-built value with a learning
    /// rate `<= 0` is an error).
    ///
    /// ```
    /// use modelfusion::align::SteMatching;
    /// use modelfusion::optim::Optimizer;
    /// let ste = SteMatching::new((), 0).with_optimizer(Optimizer::sgd(0.1, 0.9)?)?;
    /// assert_eq!(ste.optimizer().lr(), 0.1);
    /// let bad = Optimizer::Sgd { lr: 0.0, momentum: 0.0, nesterov: false };
    /// assert!(SteMatching::new((), 0).with_optimizer(bad).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_optimizer(mut self, optimizer: Optimizer) -> Result<Self> {
        optimizer.validate()?;
        self.optimizer = optimizer;
        Ok(self)
    }

    /// Adam with learning rate `lr` (finite, `> 0`) and the usual defaults.
    ///
    /// ```
    /// use modelfusion::align::SteMatching;
    /// assert_eq!(SteMatching::new((), 0).with_learning_rate(0.01)?.optimizer().lr(), 0.01);
    /// assert!(SteMatching::new((), 0).with_learning_rate(-1.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_learning_rate(self, lr: f64) -> Result<Self> {
        self.with_optimizer(Optimizer::adam(lr)?)
    }

    /// At most `max_iter` weight-matching sweeps per step (at least 1).
    ///
    /// ```
    /// use modelfusion::align::SteMatching;
    /// assert_eq!(SteMatching::new((), 0).with_max_iter(3)?.max_iter(), 3);
    /// assert!(SteMatching::new((), 0).with_max_iter(0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_max_iter(mut self, max_iter: usize) -> Result<Self> {
        WeightMatching::new(self.seed).with_max_iter(max_iter)?;
        self.max_iter = max_iter;
        Ok(self)
    }

    /// Training steps.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::SteMatching::new((), 0).steps(), 100);
    /// ```
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The seed of weight matching's group order.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::SteMatching::new((), 9).seed(), 9);
    /// ```
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The proxy's optimiser.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::SteMatching::new((), 0).optimizer().lr(), 1e-3);
    /// ```
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// Weight-matching sweeps per step, at most.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::SteMatching::new((), 0).max_iter(), 100);
    /// ```
    pub fn max_iter(&self) -> usize {
        self.max_iter
    }

    /// `P = weight_matching(proxy, other)`, warm-started from `init`.
    fn project<M: Model>(
        &self,
        proxy: &M,
        other: &M,
        spec: &PermutationSpec,
        init: Option<PermutationSet>,
    ) -> Result<PermutationSet> {
        let mut wm = WeightMatching::new(self.seed).with_max_iter(self.max_iter)?;
        if let Some(p) = init {
            wm = wm.with_init(p);
        }
        wm.align(proxy, other, spec)?
            .permutations()
            .ok_or_else(|| Error::Objective("weight matching returned a soft map".into()))
    }
}

/// `steps`, unless it is 0.
pub(super) fn check_steps(steps: usize) -> Result<usize> {
    if steps == 0 {
        return Err(Error::invalid("steps", "must be at least 1, got 0"));
    }
    Ok(steps)
}

/// The objective's loss and gradient at `model`, checked: a finite loss, and a gradient
/// with the model's names and shapes.
pub(super) fn checked_gradient<M: Model, G: Gradient<M> + ?Sized>(
    objective: &G,
    model: &M,
    what: &str,
) -> Result<(f64, M)> {
    let (loss, grad) = objective.loss_and_gradient(model)?;
    if !loss.is_finite() {
        return Err(Error::Objective(format!(
            "the loss at {what} is {loss}, not finite"
        )));
    }
    model
        .check_compatible(&grad)
        .map_err(|e| Error::Objective(format!("the gradient at {what} does not fit: {e}")))?;
    Ok((loss, grad))
}

/// Reports step `step` at the midpoint; a stop is [`Error::Cancelled`] naming `who`.
pub(super) fn report_step(
    observer: &mut dyn Observer,
    who: &str,
    step: usize,
    total: usize,
    loss: f64,
) -> Result<()> {
    let report = Progress::Step {
        step,
        total,
        t: 0.5,
        loss,
    };
    match observer.observe(&report) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(Error::Cancelled {
            what: format!("{who} after step {step} of {total}; no alignment returned"),
        }),
    }
}

impl<M: Model, G: Gradient<M>> Aligner<M> for SteMatching<G> {
    fn align(&self, reference: &M, other: &M, spec: &PermutationSpec) -> Result<Alignment> {
        self.align_observed(reference, other, spec, &mut Silent)
    }

    /// Reports every step ([`Progress::Step`] with `t = 0.5` and the midpoint loss); a
    /// stop returns [`Error::Cancelled`].
    ///
    /// ```
    /// use modelfusion::align::{Aligner, SteMatching};
    /// use modelfusion::nn::{data, Architecture, Classification, Mlp, Network};
    /// use modelfusion::progress::{from_fn, Progress};
    /// use modelfusion::StateDictF32;
    /// use std::ops::ControlFlow;
    /// let (d, net) = (data::digits()?.head(50), Mlp::new(&[64, 8, 10])?);
    /// let (a, b): (StateDictF32, StateDictF32) = (net.init(1), net.init(2));
    /// let task = Classification::new(&net, &d, 50)?;
    /// let ste = SteMatching::new(task.clone(), 0).with_steps(10)?;
    /// let r = ste.align_observed(&a, &b, &net.spec(), &mut from_fn(|p| match *p {
    ///     Progress::Step { step: 3, .. } => ControlFlow::Break(()),
    ///     _ => ControlFlow::Continue(()),
    /// }));
    /// assert!(matches!(r, Err(modelfusion::Error::Cancelled { .. })));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn align_observed(
        &self,
        reference: &M,
        other: &M,
        spec: &PermutationSpec,
        observer: &mut dyn Observer,
    ) -> Result<Alignment> {
        check_pair(reference, other, spec)?;
        check_steps(self.steps)?;
        self.optimizer.validate()?;
        let mut proxy = reference.clone();
        let mut optimizer = ModelOptimizer::new(self.optimizer);
        let mut perms = None;
        let mut history = Vec::with_capacity(self.steps);
        for step in 0..self.steps {
            let p = self.project(&proxy, other, spec, perms.take())?;
            let midpoint = reference.lerp(&spec.apply(&p, other)?, 0.5)?;
            let (loss, grad) = checked_gradient(&self.objective, &midpoint, "the midpoint")?;
            // d L((A + theta) / 2) / d theta, with P(B) standing in for theta
            optimizer.step(&mut proxy, &grad.scale(0.5)?, 1.0)?;
            proxy.check_finite("the STE proxy model (lower the learning rate)")?;
            history.push(loss);
            perms = Some(p);
            report_step(observer, "STE matching", step, self.steps, loss)?;
        }
        let perms = self.project(&proxy, other, spec, perms)?;
        let stats = AlignStats {
            objective: history,
            sweeps: self.steps,
            ..AlignStats::default()
        };
        Ok(Alignment::from_permutations(perms, stats).with_spec(spec))
    }
}
