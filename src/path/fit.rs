//! Curve fitting (Garipov et al. 2018): train the inner controls ("bends") of a curve
//! between two fixed endpoints so that the whole curve has low loss.
//!
//! Each step draws `t ~ U(0, 1)` from a seeded ChaCha8 generator, evaluates the
//! objective at `phi(t)`, and moves every inner control `k` along
//! `c_k(t) * (grad L(phi(t)) + weight_decay * phi(t))`.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result, check_nonnegative};
use crate::model::Model;
use crate::objective::{Gradient, StochasticGradient};
use crate::tensor::{Scalar, Tensor};

use super::curves::{ControlCurve, straight_line_controls};
use super::{PathSampler, check_coefficients, validate_controls};
use crate::optim::{LrSchedule, ModelOptimizer, Optimizer};
use crate::progress::{Observer, Progress};

/// Where the bends start.
///
/// ```
/// use modelfusion::path::BendInit;
/// assert_eq!(BendInit::default(), BendInit::StraightLine);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BendInit {
    /// Evenly spaced on the straight line between the endpoints (the reference's
    /// choice): the untrained curve is the line.
    #[default]
    StraightLine,
    /// The inner controls of the curve passed to [`fit_curve`], as they are.
    Given,
}

/// Settings of [`fit_curve`], validated when built.
///
/// ```
/// use modelfusion::path::{BendInit, FitConfig, LrSchedule, Optimizer};
/// let cfg = FitConfig::new(500, Optimizer::sgd(0.05, 0.9)?)?
///     .with_weight_decay(5e-4)?
///     .with_schedule(LrSchedule::Garipov)
///     .with_init(BendInit::StraightLine)
///     .with_seed(7);
/// assert_eq!(cfg.steps(), 500);
/// assert!(FitConfig::new(0, Optimizer::adam(0.1)?).is_err());
/// assert!(cfg.with_weight_decay(-1.0).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct FitConfig {
    steps: usize,
    optimizer: Optimizer,
    schedule: LrSchedule,
    weight_decay: f64,
    init: BendInit,
    seed: u64,
    frozen: Vec<String>,
}

impl FitConfig {
    /// `steps` optimisation steps (> 0) with `optimizer`; constant learning rate, no
    /// weight decay, bends from the straight line, seed 0.
    pub fn new(steps: usize, optimizer: Optimizer) -> Result<Self> {
        if steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1, got 0"));
        }
        optimizer.validate()?;
        Ok(FitConfig {
            steps,
            optimizer,
            schedule: LrSchedule::Constant,
            weight_decay: 0.0,
            init: BendInit::StraightLine,
            seed: 0,
            frozen: Vec::new(),
        })
    }

    /// Adds `weight_decay / 2 * |phi(t)|^2` to the loss at each step (>= 0, finite).
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Result<Self> {
        check_nonnegative("weight_decay", weight_decay)?;
        self.weight_decay = weight_decay;
        Ok(self)
    }

    /// The learning-rate schedule.
    pub fn with_schedule(mut self, schedule: LrSchedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Where the bends start.
    pub fn with_init(mut self, init: BendInit) -> Self {
        self.init = init;
        self
    }

    /// The seed of the ChaCha8 generator that draws `t`.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Parameters that are not trained: their values in the bends stay where the
    /// initialisation put them (on the straight line by default), they get no weight
    /// decay. Use it for buffers such as batch-norm running statistics. Every name must
    /// be a parameter of the model ([`fit_curve`] checks).
    ///
    /// ```
    /// use modelfusion::path::{FitConfig, Optimizer};
    /// let cfg = FitConfig::new(10, Optimizer::adam(0.1)?)?.with_frozen(["bn.running_mean", "bn.running_var"]);
    /// assert_eq!(cfg.frozen().len(), 2);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_frozen<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.frozen = names.into_iter().map(Into::into).collect();
        self
    }

    /// The parameters that are not trained.
    pub fn frozen(&self) -> &[String] {
        &self.frozen
    }

    /// Number of steps.
    pub fn steps(&self) -> usize {
        self.steps
    }
    /// The optimiser.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }
    /// The learning-rate schedule.
    pub fn schedule(&self) -> LrSchedule {
        self.schedule
    }
    /// The weight decay on `phi(t)`.
    pub fn weight_decay(&self) -> f64 {
        self.weight_decay
    }
    /// Where the bends start.
    pub fn init(&self) -> BendInit {
        self.init
    }
    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

/// One step of a fit: what the observer saw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FitStep {
    /// The step, from 0.
    pub step: usize,
    /// The `t` drawn.
    pub t: f64,
    /// The objective's loss at `phi(t)` (without the weight-decay term).
    pub loss: f64,
}

/// What [`fit_curve`] returns.
#[derive(Clone, Debug)]
pub struct FitResult<C> {
    /// The trained curve (same endpoints, trained bends).
    pub curve: C,
    /// Every step taken, in order.
    pub history: Vec<FitStep>,
    /// True when the observer stopped the run before `steps`.
    pub stopped_early: bool,
}

/// The loss of the curve objective at `t` and its gradient with respect to every
/// control: `L(phi(t)) + weight_decay / 2 * |phi(t)|^2` and
/// `c_k(t) * (grad L(phi(t)) + weight_decay * phi(t))`.
///
/// Returns `(total loss, objective loss, per-control gradients)`; the gradients of the
/// endpoints are included (fitting ignores them). The objective is evaluated as at
/// training step `step`.
///
/// ```
/// use modelfusion::path::{curve_loss_and_gradients, Bezier};
/// use modelfusion::{Model, StateDict, StateDictF64};
/// use ndarray::arr1;
///
/// let m = |x: f64| StateDict::from_pairs([("w", arr1(&[x]).into_dyn())]).unwrap();
/// let curve = Bezier::new(vec![m(0.0), m(2.0), m(0.0)])?;
/// // L(w) = w^2 / 2, so grad L = w; phi(0.5) = 1.
/// let mut obj = |w: &StateDictF64, _| Ok((0.5 * w.norm().powi(2), w.clone()));
/// let (total, loss, g) = curve_loss_and_gradients(&curve, 0.5, &mut obj, 0, 0.0)?;
/// assert_eq!((total, loss), (0.5, 0.5));
/// assert_eq!(g[1].get("w").unwrap()[[0]], 0.5); // c_1(0.5) = 0.5
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn curve_loss_and_gradients<M, P, S>(
    path: &P,
    t: f64,
    objective: &mut S,
    step: usize,
    weight_decay: f64,
) -> Result<(f64, f64, Vec<M>)>
where
    M: Model,
    P: PathSampler<M> + ?Sized,
    S: StochasticGradient<M> + ?Sized,
{
    let c = path.coefficients(t)?;
    let (total, loss, grad) =
        curve_step(&c, path.controls(), t, objective, step, weight_decay, &[])?;
    let grads = c
        .iter()
        .map(|&ck| grad.scale(ck))
        .collect::<Result<Vec<M>>>()?;
    Ok((total, loss, grads))
}

/// The loss at `phi(t)` (with and without the weight-decay term) and the gradient of the
/// total with respect to `phi(t)`; control `k`'s gradient is `c[k]` times it. Frozen
/// parameters get a zero gradient and no weight decay.
fn curve_step<M, S>(
    c: &[f64],
    controls: &[M],
    t: f64,
    objective: &mut S,
    step: usize,
    weight_decay: f64,
    frozen: &[String],
) -> Result<(f64, f64, M)>
where
    M: Model,
    S: StochasticGradient<M> + ?Sized,
{
    check_coefficients(c, controls.len())?;
    let refs: Vec<&M> = controls.iter().collect();
    let point = M::weighted_sum(&refs, c)?;
    let (loss, mut grad) = objective.loss_and_gradient_at(&point, step)?;
    if !loss.is_finite() {
        return Err(Error::NonFinite {
            what: format!("the objective's loss at step {step}, t = {t} (got {loss})"),
        });
    }
    point.check_compatible(&grad).map_err(|e| {
        Error::invalid(
            "objective",
            format!("its gradient does not fit the model: {e}"),
        )
    })?;
    grad.check_finite(&format!("the objective's gradient at step {step}, t = {t}"))?;
    let mut total = loss;
    let names: Vec<String> = point.names().map(str::to_string).collect();
    let wd = <<M::Tensor as Tensor>::Elem as Scalar>::from_f64_lossy(weight_decay);
    for name in &names {
        let p = point.require(name, "the point")?;
        let g = grad.get_mut(name).ok_or_else(|| Error::MissingParam {
            name: name.clone(),
            context: "the gradient".into(),
        })?;
        if frozen.iter().any(|f| f == name) {
            g.view_mut().fill(Scalar::from_f64_lossy(0.0));
        } else if weight_decay > 0.0 {
            total += 0.5 * weight_decay * p.norm_sq();
            g.axpy(wd, p)?;
        }
    }
    Ok((total, loss, grad))
}

/// Trains the inner controls of `curve` (its endpoints stay fixed, bit for bit) to
/// minimise `E_{t ~ U(0,1)} L(phi(t))` by stochastic gradient steps: one `t` per step
/// drawn from ChaCha8 seeded with [`FitConfig::seed`], the full-batch objective
/// `objective` evaluated at `phi(t)`. For minibatches, see [`fit_curve_stochastic`].
///
/// After each step `observer` sees [`Progress::Step`] with the objective's loss at
/// `phi(t)` (before the update); returning `ControlFlow::Break(())` stops the run (see
/// [`progress`](crate::progress); pass [`Silent`](crate::progress::Silent) to watch
/// nothing).
///
/// Errors: a curve with fewer than three controls (nothing to train), a non-finite loss
/// or gradient (naming the step and `t`), a gradient whose structure differs from the
/// model's.
///
/// ```
/// use modelfusion::barrier::{loss_barrier, BarrierConfig};
/// use modelfusion::path::{fit_curve, Bezier, FitConfig, Linear, Optimizer};
/// use modelfusion::progress::Silent;
/// use modelfusion::{Gradient, Model, Objective, Result, StateDict, StateDictF64};
/// use ndarray::arr1;
///
/// /// A ring-shaped valley: L(w) = (|w|^2 - 1)^2, minima on the unit circle.
/// struct Ring;
/// impl Objective<StateDictF64> for Ring {
///     fn loss(&self, m: &StateDictF64) -> Result<f64> {
///         Ok((m.norm().powi(2) - 1.0).powi(2))
///     }
/// }
/// impl Gradient<StateDictF64> for Ring {
///     fn loss_and_gradient(&self, m: &StateDictF64) -> Result<(f64, StateDictF64)> {
///         let r = m.norm().powi(2) - 1.0;
///         Ok((r * r, m.scale(4.0 * r)?))
///     }
/// }
/// let a = StateDict::from_pairs([("w", arr1(&[-1.0, 0.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[1.0, 0.0]).into_dyn())])?;
/// let line = Linear::new(a.clone(), b.clone())?;
/// // Start the bend slightly off the line to break the symmetry.
/// let c = StateDict::from_pairs([("w", arr1(&[0.0, 0.1]).into_dyn())])?;
/// let curve = Bezier::new(vec![a, c, b])?;
/// let cfg = FitConfig::new(2000, Optimizer::adam(0.01)?)?
///     .with_init(modelfusion::path::BendInit::Given)
///     .with_seed(1);
/// let fit = fit_curve(&curve, &Ring, &cfg, Silent)?;
/// let before = loss_barrier(&line, &Ring, &BarrierConfig::default())?;
/// let after = loss_barrier(&fit.curve, &Ring, &BarrierConfig::default())?;
/// assert!(after.frankle < 0.25 * before.frankle);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn fit_curve<M, C, G>(
    curve: &C,
    objective: &G,
    config: &FitConfig,
    observer: impl Observer,
) -> Result<FitResult<C>>
where
    M: Model,
    C: ControlCurve<M>,
    G: Gradient<M> + ?Sized,
{
    let mut full = |m: &M, _step: usize| objective.loss_and_gradient(m);
    fit_curve_stochastic(curve, &mut full, config, observer)
}

/// [`fit_curve`] with an objective that changes from step to step: at step `s` the
/// loss and gradient come from `objective.loss_and_gradient_at(phi(t), s)` (e.g. the
/// `s`-th minibatch). Everything else is as in [`fit_curve`].
///
/// ```
/// use std::ops::ControlFlow;
/// use modelfusion::path::{fit_curve_stochastic, FitConfig, Optimizer, PolyChain};
/// use modelfusion::progress::{from_fn, Progress};
/// use modelfusion::{Model, StateDict, StateDictF64};
/// use ndarray::arr1;
///
/// let m = |x: f64, y: f64| StateDict::from_pairs([("w", arr1(&[x, y]).into_dyn())]).unwrap();
/// let chain = PolyChain::straight(&m(0.0, 0.0), &m(2.0, 0.0), 3)?;
/// // Two "minibatches" pulling the middle towards (1, 1) and (1, -1) in turn: loss
/// // |w - x_s|^2 / 2. The middle settles near (1, 0) on average.
/// let mut batches = |w: &StateDictF64, step: usize| {
///     let d = w.sub(&m(1.0, if step % 2 == 0 { 1.0 } else { -1.0 }))?;
///     Ok((0.5 * d.norm().powi(2), d))
/// };
/// let cfg = FitConfig::new(300, Optimizer::sgd(0.1, 0.0)?)?;
/// let mut seen = 0;
/// let fit = fit_curve_stochastic(&chain, &mut batches, &cfg, from_fn(|p| match *p {
///     Progress::Step { step, .. } => {
///         seen = step + 1;
///         if step == 99 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
///     }
///     _ => ControlFlow::Continue(()),
/// }))?;
/// assert!(fit.stopped_early && seen == 100 && fit.history.len() == 100);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn fit_curve_stochastic<M, C, S>(
    curve: &C,
    objective: &mut S,
    config: &FitConfig,
    mut observer: impl Observer,
) -> Result<FitResult<C>>
where
    M: Model,
    C: ControlCurve<M>,
    S: StochasticGradient<M> + ?Sized,
{
    let given = curve.controls();
    validate_controls(given)?;
    let n = given.len();
    if n < 3 {
        return Err(Error::invalid(
            "curve",
            format!("needs at least one inner control to train, got {n} controls"),
        ));
    }
    if let Some(name) = config.frozen.iter().find(|f| given[0].get(f).is_none()) {
        return Err(Error::MissingParam {
            name: name.clone(),
            context: "the curve's models (listed as frozen in the fit config)".into(),
        });
    }
    let mut controls = match config.init {
        BendInit::StraightLine => straight_line_controls(&given[0], &given[n - 1], n)?,
        BendInit::Given => given.to_vec(),
    };
    let mut optims: Vec<ModelOptimizer<M>> = (1..n - 1)
        .map(|_| ModelOptimizer::new(config.optimizer))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut history = Vec::with_capacity(config.steps);
    let mut stopped_early = false;
    for step in 0..config.steps {
        let t: f64 = rng.random();
        let c = curve.coefficients(t)?;
        let (_, loss, grad) = curve_step(
            &c,
            &controls,
            t,
            objective,
            step,
            config.weight_decay,
            &config.frozen,
        )?;
        let lr_factor = config.schedule.factor(step, config.steps);
        for (k, opt) in (1..n - 1).zip(&mut optims) {
            opt.step_scaled(&mut controls[k], &grad, c[k], lr_factor)?;
        }
        history.push(FitStep { step, t, loss });
        let report = Progress::Step {
            step,
            total: config.steps,
            t,
            loss,
        };
        if observer.observe(&report).is_break() {
            stopped_early = step + 1 < config.steps;
            break;
        }
    }
    Ok(FitResult {
        curve: curve.with_controls(controls)?,
        history,
        stopped_early,
    })
}
