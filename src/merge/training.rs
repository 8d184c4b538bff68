//! Averaging during training: SWAD (dense averaging inside the validation-loss valley),
//! PAPA (a population pulled toward its mean), HWA (online averaging of parallel runs
//! plus an offline sliding window), FGE (snapshots of a cyclical learning rate), SWALP
//! (SWA over low-precision training), TWA (training inside the span of the iterates),
//! and the lockstep training loop they share.
//!
//! The pieces compose with any [`Model`]: gradients come from a [`StochasticGradient`]
//! per population member (its own data order), steps from the crate's
//! [`ModelOptimizer`]. Running statistics (batch-norm buffers) are averaged like every
//! other parameter; recompute them afterwards (`nn::reset_running_stats`, `BnReset`).

use std::collections::VecDeque;
use std::ops::ControlFlow;

use rand::RngExt;

use super::Merger;
use super::average::{Average, Lawa, blend_into};
use super::kernel;
use crate::error::{Error, Result, check_nonnegative, check_unit};
use crate::model::Model;
use crate::objective::StochasticGradient;
use crate::optim::{LrSchedule, ModelOptimizer, Optimizer};
use crate::tensor::{Scalar, Tensor};

/// How a population is trained: the number of steps, the optimiser (one state per
/// member), L2 weight decay, the learning-rate schedule and frozen parameters (buffers).
///
/// ```
/// use modelfusion::merge::StepConfig;
/// use modelfusion::optim::{LrSchedule, Optimizer};
/// let c = StepConfig::new(100, Optimizer::sgd(0.1, 0.9)?)?
///     .with_weight_decay(1e-4)?
///     .with_schedule(LrSchedule::Cosine);
/// assert_eq!((c.steps(), c.weight_decay()), (100, 1e-4));
/// assert!(StepConfig::new(0, Optimizer::sgd(0.1, 0.9)?).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct StepConfig {
    steps: usize,
    optimizer: Optimizer,
    weight_decay: f64,
    schedule: LrSchedule,
    frozen: Vec<String>,
}

impl StepConfig {
    /// `steps >= 1` steps of `optimizer` (validated), no weight decay, a constant rate.
    ///
    /// ```
    /// use modelfusion::merge::StepConfig;
    /// use modelfusion::optim::Optimizer;
    /// let raw = Optimizer::Sgd { lr: -1.0, momentum: 0.0, nesterov: false };
    /// assert!(StepConfig::new(10, raw).unwrap_err().to_string().contains("lr"));
    /// ```
    pub fn new(steps: usize, optimizer: Optimizer) -> Result<Self> {
        optimizer.validate()?;
        if steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1, got 0"));
        }
        Ok(StepConfig {
            steps,
            optimizer,
            weight_decay: 0.0,
            schedule: LrSchedule::Constant,
            frozen: Vec::new(),
        })
    }

    /// Sets the L2 weight decay; errors unless it is finite and `>= 0`.
    ///
    /// ```
    /// use modelfusion::merge::StepConfig;
    /// use modelfusion::optim::Optimizer;
    /// assert!(StepConfig::new(1, Optimizer::adam(0.1)?)?.with_weight_decay(f64::NAN).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Result<Self> {
        check_nonnegative("weight_decay", weight_decay)?;
        self.weight_decay = weight_decay;
        Ok(self)
    }

    /// Sets the learning-rate schedule (its factor at step `s` of `steps`).
    ///
    /// ```
    /// use modelfusion::merge::StepConfig;
    /// use modelfusion::optim::{LrSchedule, Optimizer};
    /// let c = StepConfig::new(1, Optimizer::adam(0.1)?)?.with_schedule(LrSchedule::Cosine);
    /// assert_eq!(c.schedule(), LrSchedule::Cosine);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_schedule(mut self, schedule: LrSchedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Parameters that get no update (buffers); their gradient entries are ignored.
    ///
    /// ```
    /// use modelfusion::merge::StepConfig;
    /// use modelfusion::optim::Optimizer;
    /// let c = StepConfig::new(1, Optimizer::adam(0.1)?)?.with_frozen(["bn.running_mean"]);
    /// assert_eq!(c.frozen(), ["bn.running_mean"]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_frozen<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.frozen = names.into_iter().map(Into::into).collect();
        self
    }

    /// Number of steps.
    ///
    /// ```
    /// use modelfusion::merge::StepConfig;
    /// assert_eq!(StepConfig::new(7, modelfusion::optim::Optimizer::adam(0.1)?)?.steps(), 7);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The optimiser.
    ///
    /// ```
    /// use modelfusion::merge::StepConfig;
    /// use modelfusion::optim::Optimizer;
    /// let o = Optimizer::adam(0.1)?;
    /// assert_eq!(StepConfig::new(1, o)?.optimizer(), o);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn optimizer(&self) -> Optimizer {
        self.optimizer
    }

    /// The L2 weight decay.
    ///
    /// ```
    /// use modelfusion::merge::StepConfig;
    /// assert_eq!(StepConfig::new(1, modelfusion::optim::Optimizer::adam(0.1)?)?.weight_decay(), 0.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    /// The learning-rate schedule.
    ///
    /// ```
    /// use modelfusion::merge::StepConfig;
    /// use modelfusion::optim::LrSchedule;
    /// let c = StepConfig::new(1, modelfusion::optim::Optimizer::adam(0.1)?)?;
    /// assert_eq!(c.schedule(), LrSchedule::Constant);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn schedule(&self) -> LrSchedule {
        self.schedule
    }

    /// The frozen parameters.
    ///
    /// ```
    /// use modelfusion::merge::StepConfig;
    /// assert!(StepConfig::new(1, modelfusion::optim::Optimizer::adam(0.1)?)?.frozen().is_empty());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn frozen(&self) -> &[String] {
        &self.frozen
    }
}

/// Trains every member of a population in lockstep: at step `s` member `j` takes one
/// optimiser step against `objectives[j].loss_and_gradient_at(member, s)` (its own
/// optimiser state), then `after_step(s, members, losses)` sees the whole population and
/// may change it (pull it toward its mean, average it, record iterates for SWAD);
/// `ControlFlow::Break` stops training after that step. A population of one is plain
/// training. Returns the members after the last step.
///
/// Errors on an empty population, a count of objectives that differs from the count of
/// members, members that do not match each other, a non-finite member or a non-finite
/// loss (naming the member and step).
///
/// ```
/// use std::ops::ControlFlow;
/// use modelfusion::merge::{train_population, StepConfig};
/// use modelfusion::optim::Optimizer;
/// use modelfusion::{Model, StateDict, StateDictF64};
/// use ndarray::arr1;
///
/// // Minimise |w - c_j|^2 / 2 for two targets c_0 = 1, c_1 = 3.
/// let target = |c: f64| move |m: &StateDictF64, _step: usize| {
///     let d = m.sub(&StateDict::from_pairs([("w", arr1(&[c]).into_dyn())])?)?;
///     Ok((0.5 * d.norm().powi(2), d))
/// };
/// let init = StateDict::from_pairs([("w", arr1(&[0.0]).into_dyn())])?;
/// let config = StepConfig::new(200, Optimizer::sgd(0.1, 0.0)?)?;
/// let mut objectives = [target(1.0), target(3.0)];
/// let mut calls = 0;
/// let out = train_population(&[init.clone(), init], &mut objectives, &config, |_, _, _| {
///     calls += 1;
///     Ok(ControlFlow::Continue(()))
/// })?;
/// assert_eq!(calls, 200);
/// assert!((out[1].get("w").unwrap()[[0]] - 3.0).abs() < 1e-6);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn train_population<M, S>(
    inits: &[M],
    objectives: &mut [S],
    config: &StepConfig,
    after_step: impl FnMut(usize, &mut [M], &[f64]) -> Result<ControlFlow<()>>,
) -> Result<Vec<M>>
where
    M: Model,
    S: StochasticGradient<M>,
{
    let schedule = config.schedule;
    train_with_rate(
        inits,
        objectives,
        config,
        |step| schedule.factor(step, config.steps),
        after_step,
    )
}

/// [`train_population`] with the learning-rate factor of each step given by `lr_factor`.
fn train_with_rate<M, S>(
    inits: &[M],
    objectives: &mut [S],
    config: &StepConfig,
    lr_factor: impl Fn(usize) -> f64,
    mut after_step: impl FnMut(usize, &mut [M], &[f64]) -> Result<ControlFlow<()>>,
) -> Result<Vec<M>>
where
    M: Model,
    S: StochasticGradient<M>,
{
    check_population(inits, "inits")?;
    if objectives.len() != inits.len() {
        return Err(Error::invalid(
            "objectives",
            format!(
                "{} objectives for {} population members (one each)",
                objectives.len(),
                inits.len()
            ),
        ));
    }
    config.optimizer.validate()?;
    let mut members = inits.to_vec();
    let mut optimizers: Vec<ModelOptimizer<M>> = members
        .iter()
        .map(|_| {
            ModelOptimizer::new(config.optimizer)
                .with_weight_decay(config.weight_decay)
                .map(|o| o.with_frozen(config.frozen.iter().cloned()))
        })
        .collect::<Result<_>>()?;
    let mut losses = vec![0.0; members.len()];
    for step in 0..config.steps {
        let lr_factor = lr_factor(step);
        for (j, ((member, opt), objective)) in members
            .iter_mut()
            .zip(&mut optimizers)
            .zip(objectives.iter_mut())
            .enumerate()
        {
            let (loss, grad) = objective.loss_and_gradient_at(member, step)?;
            if !loss.is_finite() {
                return Err(Error::NonFinite {
                    what: format!(
                        "training loss of population member {j} at step {step} ({loss}; learning rate {} too high?)",
                        config.optimizer.lr()
                    ),
                });
            }
            opt.step(member, &grad, lr_factor)?;
            losses[j] = loss;
        }
        if after_step(step, &mut members, &losses)?.is_break() {
            break;
        }
    }
    Ok(members)
}

/// Errors unless `members` is non-empty, finite, and every member matches the first.
fn check_population<M: Model>(members: &[M], what: &str) -> Result<()> {
    let first = members
        .first()
        .ok_or_else(|| Error::empty(format!("the population (`{what}`)")))?;
    for (j, m) in members.iter().enumerate() {
        first.check_compatible(m)?;
        m.check_finite(&format!("population member {j} (`{what}`)"))?;
    }
    Ok(())
}

fn check_at_least_one(param: &str, n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid(param, "must be at least 1, got 0"));
    }
    Ok(())
}

/// SWAD (Cha et al. 2021): dense averaging of every iterate inside the window that the
/// validation loss picks, its *loss valley*.
///
/// Training is cut into segments: [`update`](Swad::update) adds an iterate to the current
/// segment, [`evaluate`](Swad::evaluate) closes it with the validation loss `l_i` of the
/// model at its end. The window of segments `[t_s, t_e)` is the paper's:
///
/// - start `t_s`: the first segment whose loss is the minimum of the `n_converge`
///   losses starting there (`l_s <= l_{s+1..s+n_converge}`; the first minimum wins ties);
/// - threshold `(1 + tolerance_ratio) * mean(l_s, ..., l_{s+n_converge-1})`;
/// - end `t_e`: the first segment `i > t_s` from which the next `n_tolerance` losses all
///   exceed the threshold (the valley is dead). At the end of training the windows that
///   run past the last segment are cut short; when the valley never dies `t_e` is the
///   number of segments.
///
/// The result is the plain mean of every iterate in segments `t_s..t_e` (decided online,
/// keeping at most `max(n_converge, n_tolerance)` segment means). Before the start is
/// found, [`average`](Swad::average) returns the last segment's mean, as the reference
/// code returns its last model. Defaults are the paper's: `n_converge = 3`,
/// `n_tolerance = 6`, `tolerance_ratio = 0.3`. The reference code also reaches back
/// before `t_s` when `n_tolerance > n_converge` (and then counts segment `t_s` twice);
/// this follows the paper's definition instead. Validation losses must be finite and
/// `>= 0` (a cross-entropy).
///
/// ```
/// use modelfusion::merge::Swad;
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let mut swad = Swad::new().with_n_converge(2)?.with_n_tolerance(2)?.with_tolerance_ratio(0.1)?;
/// // One iterate per segment, w = segment index; the loss falls, flattens, then rises.
/// for (i, loss) in [5.0, 3.0, 2.0, 2.1, 2.05, 4.0, 5.0, 6.0].into_iter().enumerate() {
///     swad.update(&StateDict::from_pairs([("w", arr1(&[i as f64]).into_dyn())])?)?;
///     swad.evaluate(loss)?;
/// }
/// let avg = swad.average()?;
/// assert_eq!(avg.window, Some((2, 5))); // segments 2, 3, 4
/// assert_eq!(avg.model.get("w").unwrap()[[0]], 3.0);
/// assert_eq!(avg.iterates, 3);
/// assert!(swad.evaluate(f64::NAN).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Swad<M> {
    n_converge: usize,
    n_tolerance: usize,
    tolerance_ratio: f64,
    /// Running mean of the open segment and its iterate count.
    current: Option<(M, usize)>,
    /// Closed segments still needed: (index, mean, iterates).
    kept: VecDeque<(usize, M, usize)>,
    /// Validation loss of every closed segment.
    losses: Vec<f64>,
    start: Option<usize>,
    threshold: f64,
    /// Next segment to decide on (after the start is found).
    next: usize,
    end: Option<usize>,
    /// Dense mean of the segments `start..next`, and its iterate count.
    acc: Option<(M, usize)>,
}

/// What [`Swad::average`] returns: the averaged model, the window of segments
/// `[start, end)` (`None` before the loss valley is found: the model is then the last
/// segment's mean) and the number of iterates averaged.
///
/// ```
/// use modelfusion::merge::Swad;
/// use modelfusion::StateDict;
/// use ndarray::arr1;
/// let mut swad = Swad::new();
/// swad.update(&StateDict::from_pairs([("w", arr1(&[1.0f32]).into_dyn())])?)?;
/// swad.evaluate(1.0)?;
/// let avg = swad.average()?; // 1 segment, fewer than n_converge = 3: not converged
/// assert_eq!((avg.window, avg.iterates), (None, 1));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SwadAverage<M> {
    /// The SWAD model.
    pub model: M,
    /// Segments `[start, end)` averaged; `None` when no valley was found.
    pub window: Option<(usize, usize)>,
    /// Number of iterates in the average.
    pub iterates: usize,
}

impl<M: Model> Default for Swad<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Model> Swad<M> {
    /// An empty SWAD with the paper's defaults (`n_converge = 3`, `n_tolerance = 6`,
    /// `tolerance_ratio = 0.3`).
    ///
    /// ```
    /// let s = modelfusion::merge::Swad::<modelfusion::StateDictF32>::new();
    /// assert_eq!((s.n_converge(), s.n_tolerance(), s.tolerance_ratio()), (3, 6, 0.3));
    /// ```
    pub fn new() -> Self {
        Swad {
            n_converge: 3,
            n_tolerance: 6,
            tolerance_ratio: 0.3,
            current: None,
            kept: VecDeque::new(),
            losses: Vec::new(),
            start: None,
            threshold: f64::INFINITY,
            next: 0,
            end: None,
            acc: None,
        }
    }

    /// Sets the number of losses the start must be the minimum of (`>= 1`). Errors once
    /// a segment has been closed (the rule cannot change mid-run).
    ///
    /// ```
    /// assert!(modelfusion::merge::Swad::<modelfusion::StateDictF32>::new().with_n_converge(0).is_err());
    /// ```
    pub fn with_n_converge(mut self, n_converge: usize) -> Result<Self> {
        check_at_least_one("n_converge", n_converge)?;
        self.check_unstarted("n_converge")?;
        self.n_converge = n_converge;
        Ok(self)
    }

    /// Sets the number of consecutive losses above the threshold that end the window
    /// (`>= 1`). Errors once a segment has been closed.
    ///
    /// ```
    /// assert!(modelfusion::merge::Swad::<modelfusion::StateDictF32>::new().with_n_tolerance(0).is_err());
    /// ```
    pub fn with_n_tolerance(mut self, n_tolerance: usize) -> Result<Self> {
        check_at_least_one("n_tolerance", n_tolerance)?;
        self.check_unstarted("n_tolerance")?;
        self.n_tolerance = n_tolerance;
        Ok(self)
    }

    /// Sets how far above the valley's mean loss a loss counts as overfitting (finite,
    /// `>= 0`). Errors once a segment has been closed.
    ///
    /// ```
    /// assert!(modelfusion::merge::Swad::<modelfusion::StateDictF32>::new().with_tolerance_ratio(-0.1).is_err());
    /// ```
    pub fn with_tolerance_ratio(mut self, tolerance_ratio: f64) -> Result<Self> {
        check_nonnegative("tolerance_ratio", tolerance_ratio)?;
        self.check_unstarted("tolerance_ratio")?;
        self.tolerance_ratio = tolerance_ratio;
        Ok(self)
    }

    fn check_unstarted(&self, param: &str) -> Result<()> {
        if !self.losses.is_empty() {
            return Err(Error::invalid(
                param,
                format!(
                    "cannot change after {} segments were evaluated",
                    self.losses.len()
                ),
            ));
        }
        Ok(())
    }

    /// The convergence window.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Swad::<modelfusion::StateDictF32>::new().n_converge(), 3);
    /// ```
    pub fn n_converge(&self) -> usize {
        self.n_converge
    }

    /// The tolerance window.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Swad::<modelfusion::StateDictF32>::new().n_tolerance(), 6);
    /// ```
    pub fn n_tolerance(&self) -> usize {
        self.n_tolerance
    }

    /// The tolerance ratio.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Swad::<modelfusion::StateDictF32>::new().tolerance_ratio(), 0.3);
    /// ```
    pub fn tolerance_ratio(&self) -> f64 {
        self.tolerance_ratio
    }

    /// Number of segments closed so far.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Swad::<modelfusion::StateDictF32>::new().segments(), 0);
    /// ```
    pub fn segments(&self) -> usize {
        self.losses.len()
    }

    /// The first segment of the window, once found.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Swad::<modelfusion::StateDictF32>::new().start(), None);
    /// ```
    pub fn start(&self) -> Option<usize> {
        self.start
    }

    /// The segment that ended the window (exclusive), once the valley is dead; later
    /// iterates and losses are ignored.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Swad::<modelfusion::StateDictF32>::new().end(), None);
    /// ```
    pub fn end(&self) -> Option<usize> {
        self.end
    }

    /// Adds one iterate to the open segment (ignored once the valley is dead). Errors
    /// on a non-finite model or one that does not match the earlier iterates.
    ///
    /// ```
    /// use modelfusion::merge::Swad;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let mut s = Swad::new();
    /// s.update(&StateDict::from_pairs([("w", arr1(&[1.0f32]).into_dyn())])?)?;
    /// assert!(s.update(&StateDict::from_pairs([("v", arr1(&[1.0f32]).into_dyn())])?).is_err());
    /// assert!(s.update(&StateDict::from_pairs([("w", arr1(&[f32::NAN]).into_dyn())])?).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn update(&mut self, iterate: &M) -> Result<()> {
        if self.end.is_some() {
            return Ok(());
        }
        iterate.check_finite(&format!(
            "the SWAD iterate of segment {}",
            self.losses.len()
        ))?;
        match &mut self.current {
            Some((mean, n)) => {
                blend_into(mean, iterate, 1.0 / (*n as f64 + 1.0))?;
                *n += 1;
            }
            None => {
                if let Some((_, first, _)) = self.kept.front() {
                    first.check_compatible(iterate)?;
                }
                self.current = Some((iterate.clone(), 1));
            }
        }
        Ok(())
    }

    /// Closes the open segment with the validation loss of the model at its end (finite,
    /// `>= 0`) and advances the window rule (ignored once the valley is dead). Errors
    /// on a bad loss or an empty segment.
    ///
    /// ```
    /// use modelfusion::merge::Swad;
    /// let mut s = Swad::<modelfusion::StateDictF32>::new();
    /// assert!(s.evaluate(1.0).unwrap_err().to_string().contains("update"));
    /// assert!(s.evaluate(-1.0).is_err());
    /// ```
    pub fn evaluate(&mut self, val_loss: f64) -> Result<()> {
        check_nonnegative("val_loss", val_loss)?;
        if self.end.is_some() {
            return Ok(());
        }
        let i = self.losses.len();
        let (mean, n) = self.current.take().ok_or_else(|| {
            Error::empty(format!(
                "the iterates of SWAD segment {i} (call update before evaluate)"
            ))
        })?;
        self.kept.push_back((i, mean, n));
        self.losses.push(val_loss);
        let nc = self.n_converge;
        if self.start.is_none() && i + 1 >= nc {
            let window = &self.losses[i + 1 - nc..];
            if window.iter().all(|&l| window[0] <= l) {
                let s = i + 1 - nc;
                self.start = Some(s);
                self.next = s;
                let mean = window.iter().sum::<f64>() / nc as f64;
                self.threshold = mean * (1.0 + self.tolerance_ratio);
            }
        }
        if self.start.is_some() {
            while self.end.is_none() && self.next + self.n_tolerance <= self.losses.len() {
                self.decide_next(self.n_tolerance)?;
            }
        }
        self.trim();
        Ok(())
    }

    /// Decides on segment `next` with the losses `next..next + len` (cut at the last
    /// segment): ends the window, or adds the segment to the average.
    fn decide_next(&mut self, len: usize) -> Result<()> {
        let upto = (self.next + len).min(self.losses.len());
        let lowest = self.losses[self.next..upto]
            .iter()
            .fold(f64::INFINITY, |a, &b| a.min(b));
        if lowest > self.threshold {
            self.end = Some(self.next);
            return Ok(());
        }
        let (_, seg, n) = self
            .kept
            .iter()
            .find(|(idx, _, _)| *idx == self.next)
            .ok_or_else(|| Error::empty(format!("the kept SWAD segment {}", self.next)))?;
        add_segment(&mut self.acc, seg, *n)?;
        self.next += 1;
        Ok(())
    }

    /// Drops the segment means no longer needed.
    fn trim(&mut self) {
        let keep_from = match (self.start, self.end) {
            (_, Some(_)) => usize::MAX,
            (Some(_), None) => self.next,
            (None, None) => (self.losses.len() + 1).saturating_sub(self.n_converge.max(1)),
        };
        while self.kept.front().is_some_and(|(i, _, _)| *i < keep_from) {
            self.kept.pop_front();
        }
    }

    /// The SWAD model over the segments closed so far, deciding the pending segments
    /// with windows cut at the last one (as at the end of training). Errors before the
    /// first segment is closed.
    ///
    /// ```
    /// assert!(modelfusion::merge::Swad::<modelfusion::StateDictF32>::new().average().is_err());
    /// ```
    pub fn average(&self) -> Result<SwadAverage<M>> {
        let Some(start) = self.start else {
            let (_, model, iterates) = self
                .kept
                .back()
                .ok_or_else(|| Error::empty("the SWAD segments (call update and evaluate)"))?;
            return Ok(SwadAverage {
                model: model.clone(),
                window: None,
                iterates: *iterates,
            });
        };
        let mut rest = self.clone();
        while rest.end.is_none() && rest.next < rest.losses.len() {
            rest.decide_next(rest.n_tolerance)?;
        }
        let end = rest.end.unwrap_or(rest.next);
        let (model, iterates) = rest
            .acc
            .ok_or_else(|| Error::empty("the SWAD window (no segment under the threshold)"))?;
        Ok(SwadAverage {
            model,
            window: Some((start, end)),
            iterates,
        })
    }
}

/// Folds a segment mean of `n` iterates into a dense running mean.
fn add_segment<M: Model>(acc: &mut Option<(M, usize)>, seg: &M, n: usize) -> Result<()> {
    match acc {
        Some((mean, count)) => {
            *count += n;
            blend_into(mean, seg, n as f64 / *count as f64)
        }
        None => {
            *acc = Some((seg.clone(), n));
            Ok(())
        }
    }
}

/// How PAPA pulls a population toward each other.
///
/// ```
/// use modelfusion::merge::PapaRule;
/// assert_ne!(PapaRule::All, PapaRule::Pairs);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum PapaRule {
    /// PAPA: every member moves toward the population mean,
    /// `theta_j = alpha * theta_j + (1 - alpha) * mean(theta)`.
    Ema {
        /// Weight kept on the member itself, in `[0, 1)` (the paper: 0.99 every 10 steps).
        alpha: f64,
    },
    /// PAPA-all: every member is replaced by the population mean.
    All,
    /// PAPA-2: every member is replaced by the mean of two distinct members drawn at
    /// random (seeded) from the population before the round.
    Pairs,
}

/// PAPA (Jolicoeur-Martineau et al. 2023): a population of models trained in parallel
/// (different data orders), pulled toward each other every `every` steps, and averaged
/// at the end.
///
/// ```
/// use modelfusion::merge::Papa;
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let sd = |v: f64| StateDict::from_pairs([("w", arr1(&[v]).into_dyn())]).unwrap();
/// let mut pop = vec![sd(0.0), sd(4.0)];
/// let papa = Papa::ema(0.5, 10)?;
/// assert!(!papa.pull(3, &mut pop)?); // not a multiple of 10 steps
/// assert!(papa.pull(9, &mut pop)?);  // after step 9 (the 10th)
/// assert_eq!(pop[0].get("w").unwrap()[[0]], 1.0); // 0.5 * 0 + 0.5 * 2
/// assert!(Papa::ema(1.0, 10).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Papa {
    rule: PapaRule,
    every: usize,
    seed: u64,
}

/// The result of a population run: the members after training and their uniform mean.
///
/// ```
/// use modelfusion::merge::{Papa, StepConfig};
/// use modelfusion::optim::Optimizer;
/// use modelfusion::{Model, StateDict, StateDictF64};
/// use ndarray::arr1;
/// let grad = |m: &StateDictF64, _: usize| Ok((0.5 * m.norm().powi(2), m.clone()));
/// let init = StateDict::from_pairs([("w", arr1(&[1.0]).into_dyn())])?;
/// let run = Papa::all(5)?.train(&[init.clone(), init], &mut [grad, grad],
///     &StepConfig::new(10, Optimizer::sgd(0.1, 0.0)?)?)?;
/// assert_eq!(run.members.len(), 2);
/// assert!(run.average.norm() < 1.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct PopulationAverage<M> {
    /// The members after the last step.
    pub members: Vec<M>,
    /// The final average (PAPA: the members' mean; HWA: the offline window's mean).
    pub average: M,
}

impl Papa {
    /// PAPA: pull every member toward the mean with weight `alpha` in `[0, 1)` kept on
    /// itself, every `every >= 1` steps.
    ///
    /// ```
    /// assert!(modelfusion::merge::Papa::ema(0.99, 0).is_err());
    /// ```
    pub fn ema(alpha: f64, every: usize) -> Result<Self> {
        check_unit("alpha", alpha)?;
        Self::with_rule(PapaRule::Ema { alpha }, every)
    }

    /// PAPA-all: replace every member by the mean every `every >= 1` steps.
    ///
    /// ```
    /// assert!(modelfusion::merge::Papa::all(1).is_ok());
    /// ```
    pub fn all(every: usize) -> Result<Self> {
        Self::with_rule(PapaRule::All, every)
    }

    /// PAPA-2: replace every member by the mean of two random members every
    /// `every >= 1` steps (seed 0; see [`with_seed`](Papa::with_seed)).
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Papa::pairs(3)?.every(), 3);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn pairs(every: usize) -> Result<Self> {
        Self::with_rule(PapaRule::Pairs, every)
    }

    fn with_rule(rule: PapaRule, every: usize) -> Result<Self> {
        check_at_least_one("every", every)?;
        Ok(Papa {
            rule,
            every,
            seed: 0,
        })
    }

    /// Sets the seed of PAPA-2's pairs (round `r` draws from a stream keyed by
    /// `(seed, r)`).
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Papa::pairs(3)?.with_seed(7).seed(), 7);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The rule.
    ///
    /// ```
    /// use modelfusion::merge::{Papa, PapaRule};
    /// assert_eq!(Papa::all(2)?.rule(), PapaRule::All);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn rule(&self) -> PapaRule {
        self.rule
    }

    /// Steps between pulls.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Papa::all(2)?.every(), 2);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn every(&self) -> usize {
        self.every
    }

    /// The seed of PAPA-2's pairs.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Papa::all(2)?.seed(), 0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Applies the rule after training step `step` (0-based) when `step + 1` is a
    /// multiple of `every`; returns whether it did.
    ///
    /// ```
    /// use modelfusion::merge::Papa;
    /// let mut pop: Vec<modelfusion::StateDictF32> = vec![];
    /// assert!(Papa::all(1)?.pull(0, &mut pop).is_err()); // empty population
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn pull<M: Model>(&self, step: usize, population: &mut [M]) -> Result<bool> {
        if (step + 1) % self.every != 0 {
            return Ok(false);
        }
        self.apply(population, ((step + 1) / self.every) as u64)?;
        Ok(true)
    }

    /// Applies the rule once (`round` keys PAPA-2's draw). A population of one is left
    /// as it is.
    ///
    /// ```
    /// use modelfusion::merge::Papa;
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let sd = |v: f64| StateDict::from_pairs([("w", arr1(&[v]).into_dyn())]).unwrap();
    /// let mut pop = vec![sd(0.0), sd(2.0), sd(10.0)];
    /// Papa::pairs(1)?.with_seed(3).apply(&mut pop, 0)?;
    /// for m in &pop { // each is the mean of two of 0, 2, 10
    ///     assert!([1.0, 5.0, 6.0].contains(&m.get("w").unwrap()[[0]]));
    /// }
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn apply<M: Model>(&self, population: &mut [M], round: u64) -> Result<()> {
        check_population(population, "population")?;
        let n = population.len();
        if n == 1 {
            return Ok(());
        }
        match self.rule {
            PapaRule::Ema { alpha } => {
                check_unit("alpha", alpha)?;
                let mean = population_mean(population)?;
                for m in population.iter_mut() {
                    blend_into(m, &mean, 1.0 - alpha)?;
                }
            }
            PapaRule::All => {
                let mean = population_mean(population)?;
                population.iter_mut().for_each(|m| *m = mean.clone());
            }
            PapaRule::Pairs => {
                let old = population.to_vec();
                let mut rng = kernel::chunk_rng(self.seed, "\u{0}papa-pairs", 0, round as usize);
                for m in population.iter_mut() {
                    let a = rng.random_range(0..n);
                    let b = (a + 1 + rng.random_range(0..n - 1)) % n;
                    *m = old[a].lerp(&old[b], 0.5)?;
                }
            }
        }
        Ok(())
    }

    /// Trains the population with [`train_population`], pulling after every step as
    /// [`pull`](Papa::pull) says, and returns the members and their mean.
    ///
    /// ```
    /// use modelfusion::merge::{Papa, StepConfig};
    /// use modelfusion::optim::Optimizer;
    /// use modelfusion::{Model, StateDict, StateDictF64};
    /// use ndarray::arr1;
    /// let init = StateDict::from_pairs([("w", arr1(&[1.0]).into_dyn())])?;
    /// let g = |m: &StateDictF64, _: usize| Ok((0.0, m.clone()));
    /// let cfg = StepConfig::new(3, Optimizer::sgd(0.1, 0.0)?)?;
    /// assert!(Papa::all(1)?.train(&[init.clone(), init], &mut [g], &cfg).is_err()); // 2 members, 1 objective
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn train<M, S>(
        &self,
        inits: &[M],
        objectives: &mut [S],
        config: &StepConfig,
    ) -> Result<PopulationAverage<M>>
    where
        M: Model,
        S: StochasticGradient<M>,
    {
        let members = train_population(inits, objectives, config, |step, pop, _| {
            self.pull(step, pop)?;
            Ok(ControlFlow::Continue(()))
        })?;
        let average = population_mean(&members)?;
        Ok(PopulationAverage { members, average })
    }
}

fn population_mean<M: Model>(members: &[M]) -> Result<M> {
    let refs: Vec<&M> = members.iter().collect();
    Average::uniform().merge(&refs)
}

/// HWA (hierarchical weight averaging, Gu et al. 2022): `K` runs trained in parallel
/// are averaged every `sync_every` steps and restart from that average (online
/// averaging, PAPA-all); the final model is the mean of the last `window` online
/// averages (offline sliding-window averaging, as [`Lawa`]). When the step count is
/// not a multiple of `sync_every`, a last online average is taken after the last step.
///
/// ```
/// use modelfusion::merge::{Hwa, StepConfig};
/// use modelfusion::optim::Optimizer;
/// use modelfusion::{Model, StateDict, StateDictF64};
/// use ndarray::arr1;
///
/// // Two runs on |w - c|^2 / 2 with c = 1 and c = 3: their average converges to 2.
/// let target = |c: f64| move |m: &StateDictF64, _: usize| {
///     let d = m.sub(&StateDict::from_pairs([("w", arr1(&[c]).into_dyn())])?)?;
///     Ok((0.5 * d.norm().powi(2), d))
/// };
/// let init = StateDict::from_pairs([("w", arr1(&[0.0]).into_dyn())])?;
/// let run = Hwa::new(5, 3)?.train(&[init.clone(), init], &mut [target(1.0), target(3.0)],
///     &StepConfig::new(100, Optimizer::sgd(0.1, 0.0)?)?)?;
/// assert!((run.average.get("w").unwrap()[[0]] - 2.0).abs() < 1e-3);
/// assert!(Hwa::new(0, 3).is_err() && Hwa::new(5, 0).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hwa {
    sync_every: usize,
    window: usize,
}

impl Hwa {
    /// Online averaging every `sync_every >= 1` steps, offline mean of the last
    /// `window >= 1` online averages.
    ///
    /// ```
    /// assert!(modelfusion::merge::Hwa::new(10, 5).is_ok());
    /// ```
    pub fn new(sync_every: usize, window: usize) -> Result<Self> {
        check_at_least_one("sync_every", sync_every)?;
        check_at_least_one("window", window)?;
        Ok(Hwa { sync_every, window })
    }

    /// Steps between online averages.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Hwa::new(10, 5)?.sync_every(), 10);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn sync_every(&self) -> usize {
        self.sync_every
    }

    /// Online averages in the offline window.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Hwa::new(10, 5)?.window(), 5);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn window(&self) -> usize {
        self.window
    }

    /// Trains the runs with [`train_population`] and returns the members (all equal to
    /// the last online average) and the offline average.
    ///
    /// ```
    /// use modelfusion::merge::{Hwa, StepConfig};
    /// use modelfusion::optim::Optimizer;
    /// use modelfusion::StateDictF64;
    /// let cfg = StepConfig::new(3, Optimizer::sgd(0.1, 0.0)?)?;
    /// let none: [StateDictF64; 0] = [];
    /// let mut objectives: [fn(&StateDictF64, usize) -> modelfusion::Result<(f64, StateDictF64)>; 0] = [];
    /// assert!(Hwa::new(2, 2)?.train(&none, &mut objectives, &cfg).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn train<M, S>(
        &self,
        inits: &[M],
        objectives: &mut [S],
        config: &StepConfig,
    ) -> Result<PopulationAverage<M>>
    where
        M: Model,
        S: StochasticGradient<M>,
    {
        let online = Papa::all(self.sync_every)?;
        let mut offline = Lawa::new(self.window)?;
        let mut last_synced = 0;
        let mut members = train_population(inits, objectives, config, |step, pop, _| {
            if online.pull(step, pop)? {
                offline.update(&pop[0])?;
                last_synced = step + 1;
            }
            Ok(ControlFlow::Continue(()))
        })?;
        if last_synced != config.steps {
            online.apply(&mut members, 0)?;
            offline.update(&members[0])?;
        }
        let average = offline.average()?;
        Ok(PopulationAverage { members, average })
    }
}

/// Fast geometric ensembling (Garipov et al. 2018): from a trained model, a cyclical
/// learning rate of period `cycle` (even, `>= 2`) steps, going linearly from `lr_high`
/// down to `lr_low` in the first half of each cycle and back up in the second; a
/// snapshot is taken at every cycle's minimum (after the step at `lr_low`). The
/// snapshots form an output ensemble ([`Ensemble`](super::Ensemble)).
///
/// With the paper's 1-based iteration `i` and `t = (((i - 1) mod c) + 1) / c`, the rate
/// is `(1 - 2t) lr_high + 2t lr_low` for `t <= 1/2` and `(2 - 2t) lr_low + (2t - 1) lr_high`
/// after; the snapshot is taken at `t = 1/2`. Training uses a [`StepConfig`]'s
/// optimiser, weight decay and frozen parameters with the rate replaced by this one
/// (its schedule is not used).
///
/// ```
/// use modelfusion::merge::{Ensemble, EnsembleMode, Fge, Outputs, StepConfig};
/// use modelfusion::optim::Optimizer;
/// use modelfusion::{Model, Result, StateDict, StateDictF64};
/// use ndarray::{arr1, Array2};
///
/// let fge = Fge::new(4, 0.1, 0.01)?;
/// assert!((fge.lr(0) - 0.055).abs() < 1e-15); // t = 1/4: halfway down
/// assert!((fge.lr(1) - 0.01).abs() < 1e-15 && fge.is_snapshot(1)); // t = 1/2
/// assert!((fge.lr(3) - 0.1).abs() < 1e-15); // t = 1: back at the top
/// // Snapshots of a run on |w - 1|^2 / 2 from w = 0, ensembled on their outputs.
/// let g = |m: &StateDictF64, _: usize| {
///     let d = m.sub(&StateDict::from_pairs([("w", arr1(&[1.0]).into_dyn())])?)?;
///     Ok((0.5 * d.norm().powi(2), d))
/// };
/// let init = StateDict::from_pairs([("w", arr1(&[0.0]).into_dyn())])?;
/// let snaps = fge.train(&init, &mut g.clone(), &StepConfig::new(12, Optimizer::sgd(0.1, 0.0)?)?)?;
/// assert_eq!(snaps.len(), 3);
/// struct Id;
/// impl Outputs<StateDictF64> for Id {
///     fn outputs(&self, m: &StateDictF64) -> Result<Array2<f64>> {
///         Ok(Array2::from_elem((1, 1), m.get("w").unwrap()[[0]]))
///     }
/// }
/// let refs: Vec<&StateDictF64> = snaps.iter().collect();
/// let out = Ensemble::new(EnsembleMode::Logits).predict(&refs, &Id)?;
/// assert!(out[[0, 0]] > 0.0 && out[[0, 0]] < 1.0);
/// assert!(Fge::new(3, 0.1, 0.01).is_err()); // odd cycle
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fge {
    cycle: usize,
    lr_high: f64,
    lr_low: f64,
}

impl Fge {
    /// A cycle of `cycle` steps (even, `>= 2`) between `lr_high` and `lr_low`
    /// (`0 < lr_low <= lr_high`, finite; the paper: 5e-2 and 5e-4 with SGD).
    ///
    /// ```
    /// use modelfusion::merge::Fge;
    /// assert!(Fge::new(0, 0.1, 0.01).is_err());
    /// assert!(Fge::new(4, 0.01, 0.1).unwrap_err().to_string().contains("lr_low"));
    /// assert!(Fge::new(4, 0.1, 0.0).is_err());
    /// ```
    pub fn new(cycle: usize, lr_high: f64, lr_low: f64) -> Result<Self> {
        if cycle < 2 || cycle % 2 != 0 {
            return Err(Error::invalid(
                "cycle",
                format!(
                    "must be even and at least 2 steps (the snapshot is at its middle), got {cycle}"
                ),
            ));
        }
        crate::error::check_positive("lr_high", lr_high)?;
        crate::error::check_positive("lr_low", lr_low)?;
        if lr_low > lr_high {
            return Err(Error::invalid(
                "lr_low",
                format!("must not exceed lr_high ({lr_low} > {lr_high})"),
            ));
        }
        Ok(Fge {
            cycle,
            lr_high,
            lr_low,
        })
    }

    /// Steps per cycle.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Fge::new(4, 0.1, 0.01)?.cycle(), 4);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn cycle(&self) -> usize {
        self.cycle
    }

    /// The learning rate at step `step` (0-based).
    ///
    /// ```
    /// let fge = modelfusion::merge::Fge::new(2, 0.1, 0.01)?;
    /// assert_eq!((fge.lr(0), fge.lr(1)), (0.01, 0.1));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn lr(&self, step: usize) -> f64 {
        let t = ((step % self.cycle) + 1) as f64 / self.cycle as f64;
        if t <= 0.5 {
            (1.0 - 2.0 * t) * self.lr_high + 2.0 * t * self.lr_low
        } else {
            (2.0 - 2.0 * t) * self.lr_low + (2.0 * t - 1.0) * self.lr_high
        }
    }

    /// Whether the model after step `step` (0-based) is a snapshot (the cycle's middle).
    ///
    /// ```
    /// let fge = modelfusion::merge::Fge::new(4, 0.1, 0.01)?;
    /// assert_eq!((0..8).filter(|&s| fge.is_snapshot(s)).collect::<Vec<_>>(), vec![1, 5]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn is_snapshot(&self, step: usize) -> bool {
        step % self.cycle + 1 == self.cycle / 2
    }

    /// Trains from `init` for `config.steps()` steps at this rate and returns the
    /// snapshots, oldest first. Errors as [`train_population`] does.
    ///
    /// ```
    /// use modelfusion::merge::{Fge, StepConfig};
    /// use modelfusion::optim::Optimizer;
    /// use modelfusion::{StateDict, StateDictF64};
    /// use ndarray::arr1;
    /// let init = StateDict::from_pairs([("w", arr1(&[0.0]).into_dyn())])?;
    /// let nan = |m: &StateDictF64, _: usize| Ok((f64::NAN, m.clone()));
    /// let cfg = StepConfig::new(4, Optimizer::sgd(0.1, 0.0)?)?;
    /// assert!(Fge::new(2, 0.1, 0.01)?.train(&init, &mut nan.clone(), &cfg).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn train<M, S>(&self, init: &M, objective: &mut S, config: &StepConfig) -> Result<Vec<M>>
    where
        M: Model,
        S: StochasticGradient<M>,
    {
        let base = config.optimizer.lr();
        let mut snapshots = Vec::new();
        train_with_rate(
            std::slice::from_ref(init),
            std::slice::from_mut(objective),
            config,
            |step| self.lr(step) / base,
            |step, pop, _| {
                if self.is_snapshot(step) {
                    snapshots.push(pop[0].clone());
                }
                Ok(ControlFlow::Continue(()))
            },
        )?;
        Ok(snapshots)
    }
}

/// How [`BlockQuantizer`] rounds to its grid.
///
/// ```
/// use modelfusion::merge::Rounding;
/// assert_ne!(Rounding::Nearest, Rounding::Stochastic);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// Down or up with probability given by the distance (unbiased), seeded.
    Stochastic,
    /// To the nearest grid point, ties away from zero (deterministic).
    Nearest,
}

/// Block floating point with one shared exponent per tensor (SWALP's format): a tensor
/// with largest magnitude `m` gets the quantum `delta = 2^(floor(log2 m) - (bits - 2))`
/// and every element becomes `delta * clamp(round(x / delta), -2^(bits-1), 2^(bits-1) - 1)`,
/// `bits` bits per element (sign included). A zero tensor stays zero. Stochastic rounding
/// draws from a stream keyed by `(seed, tensor name, round, chunk)`, so results do not
/// depend on thread count or tensor order.
///
/// ```
/// use modelfusion::merge::{BlockQuantizer, Rounding};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let q = BlockQuantizer::new(4)?.with_rounding(Rounding::Nearest);
/// // max 3.0: exponent 1, quantum 2^(1 - 2) = 0.5, codes in [-8, 7]
/// let m = StateDict::from_pairs([("w", arr1(&[3.0f64, 0.3, -1.1]).into_dyn())])?;
/// let out = q.quantize(&m, 0)?;
/// assert_eq!(out.get("w").unwrap().as_slice().unwrap(), &[3.0, 0.5, -1.0]);
/// let s = BlockQuantizer::new(4)?.with_seed(9).quantize(&m, 0)?;
/// assert!([0.0, 0.5].contains(&s.get("w").unwrap()[[1]])); // down or up
/// assert!(BlockQuantizer::new(1).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQuantizer {
    bits: u32,
    rounding: Rounding,
    seed: u64,
}

impl BlockQuantizer {
    /// `bits` per element, 2 to 24 (SWALP: 8), stochastic rounding with seed 0.
    ///
    /// ```
    /// assert!(modelfusion::merge::BlockQuantizer::new(25).is_err());
    /// ```
    pub fn new(bits: u32) -> Result<Self> {
        if !(2..=24).contains(&bits) {
            return Err(Error::invalid(
                "bits",
                format!("must be between 2 and 24 (sign included), got {bits}"),
            ));
        }
        Ok(BlockQuantizer {
            bits,
            rounding: Rounding::Stochastic,
            seed: 0,
        })
    }

    /// Sets the rounding.
    ///
    /// ```
    /// use modelfusion::merge::{BlockQuantizer, Rounding};
    /// assert_eq!(BlockQuantizer::new(8)?.with_rounding(Rounding::Nearest).rounding(), Rounding::Nearest);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_rounding(mut self, rounding: Rounding) -> Self {
        self.rounding = rounding;
        self
    }

    /// Sets the seed of stochastic rounding.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::BlockQuantizer::new(8)?.with_seed(3).seed(), 3);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Bits per element.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::BlockQuantizer::new(8)?.bits(), 8);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// The rounding.
    ///
    /// ```
    /// use modelfusion::merge::{BlockQuantizer, Rounding};
    /// assert_eq!(BlockQuantizer::new(8)?.rounding(), Rounding::Stochastic);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn rounding(&self) -> Rounding {
        self.rounding
    }

    /// The seed.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::BlockQuantizer::new(8)?.seed(), 0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Quantises every tensor of `model`; `round` keys the random stream (use a new one
    /// for every call of a run). Errors on a non-finite element.
    ///
    /// ```
    /// use modelfusion::merge::BlockQuantizer;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let m = StateDict::from_pairs([("w", arr1(&[f32::NAN]).into_dyn())])?;
    /// assert!(BlockQuantizer::new(8)?.quantize(&m, 0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn quantize<M: Model>(&self, model: &M, round: u64) -> Result<M> {
        model.check_finite("the model to quantise")?;
        type E<M> = <<M as Model>::Tensor as Tensor>::Elem;
        model.try_map(|name, t| {
            let x = kernel::elems(t);
            let largest = x
                .iter()
                .fold(0.0f64, |a, &v| a.max(v.to_f64_lossless().abs()));
            let mut out: Vec<E<M>> = kernel::zeros(x.len());
            if largest > 0.0 {
                let delta = 2f64.powi(largest.log2().floor() as i32 - (self.bits as i32 - 2));
                let top = 2f64.powi(self.bits as i32 - 1);
                kernel::for_chunks(&mut out, |c, start, o| {
                    let mut rng = kernel::chunk_rng(self.seed, name, round as usize, c);
                    for (j, y) in o.iter_mut().enumerate() {
                        let v = x[start + j].to_f64_lossless() / delta;
                        let code = match self.rounding {
                            Rounding::Nearest => v.round(),
                            Rounding::Stochastic => (v + rng.random::<f64>()).floor(),
                        };
                        *y = E::<M>::from_f64_lossy(delta * code.clamp(-top, top - 1.0));
                    }
                });
            }
            kernel::build(t.shape(), out)
        })
    }
}

/// SWALP (Yang et al. 2019): SWA over a low-precision training run. Every gradient and
/// every iterate is quantised by a [`BlockQuantizer`] (the optimiser's momentum stays in
/// the model's precision; activations are the objective's business, it may quantise
/// them with the same quantiser), and from step `swa_start` on, every `every`-th
/// low-precision iterate is added to a running mean kept in full precision.
///
/// Rounds of the quantiser's stream: 0 for the initial model, `2 s + 1` for the
/// gradient of step `s`, `2 s + 2` for the iterate after it.
///
/// ```
/// use modelfusion::merge::{BlockQuantizer, StepConfig, Swalp};
/// use modelfusion::optim::Optimizer;
/// use modelfusion::{Model, StateDict, StateDictF64};
/// use ndarray::arr1;
///
/// let g = |m: &StateDictF64, _: usize| {
///     let d = m.sub(&StateDict::from_pairs([("w", arr1(&[0.3, -0.7]).into_dyn())])?)?;
///     Ok((0.5 * d.norm().powi(2), d))
/// };
/// let init = StateDict::from_pairs([("w", arr1(&[1.0, 1.0]).into_dyn())])?;
/// let swalp = Swalp::new(BlockQuantizer::new(4)?.with_seed(1), 50, 1)?;
/// let run = swalp.train(&init, &mut g.clone(), &StepConfig::new(200, Optimizer::sgd(0.1, 0.0)?)?)?;
/// assert_eq!(run.count, 150);
/// // The low-precision iterates sit on a grid of quantum 1/8; their mean is finer.
/// let w = run.average.get("w").unwrap();
/// assert!((w[[0]] - 0.3).abs() < 0.1 && (w[[1]] + 0.7).abs() < 0.1);
/// assert!(Swalp::new(BlockQuantizer::new(8)?, 0, 0).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Swalp {
    quantizer: BlockQuantizer,
    swa_start: usize,
    every: usize,
}

/// The result of [`Swalp::train`]: the last low-precision iterate, the full-precision
/// average of the collected ones, and how many were averaged.
///
/// ```
/// use modelfusion::merge::{BlockQuantizer, StepConfig, Swalp};
/// use modelfusion::optim::Optimizer;
/// use modelfusion::{StateDict, StateDictF64};
/// use ndarray::arr1;
/// let g = |m: &StateDictF64, _: usize| Ok((0.0, m.clone()));
/// let init = StateDict::from_pairs([("w", arr1(&[1.0]).into_dyn())])?;
/// let run = Swalp::new(BlockQuantizer::new(8)?, 0, 2)?
///     .train(&init, &mut g.clone(), &StepConfig::new(4, Optimizer::sgd(0.1, 0.0)?)?)?;
/// assert_eq!(run.count, 2); // steps 0 and 2
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SwalpRun<M> {
    /// The last low-precision iterate.
    pub last: M,
    /// The full-precision mean of the collected iterates.
    pub average: M,
    /// Number of iterates averaged.
    pub count: usize,
}

impl Swalp {
    /// Averaging from step `swa_start` (0-based) every `every >= 1` steps.
    ///
    /// ```
    /// use modelfusion::merge::{BlockQuantizer, Swalp};
    /// assert_eq!(Swalp::new(BlockQuantizer::new(8)?, 10, 2)?.every(), 2);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(quantizer: BlockQuantizer, swa_start: usize, every: usize) -> Result<Self> {
        check_at_least_one("every", every)?;
        Ok(Swalp {
            quantizer,
            swa_start,
            every,
        })
    }

    /// The quantiser.
    ///
    /// ```
    /// use modelfusion::merge::{BlockQuantizer, Swalp};
    /// assert_eq!(Swalp::new(BlockQuantizer::new(8)?, 0, 1)?.quantizer().bits(), 8);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn quantizer(&self) -> &BlockQuantizer {
        &self.quantizer
    }

    /// The first step averaged.
    ///
    /// ```
    /// use modelfusion::merge::{BlockQuantizer, Swalp};
    /// assert_eq!(Swalp::new(BlockQuantizer::new(8)?, 5, 1)?.swa_start(), 5);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn swa_start(&self) -> usize {
        self.swa_start
    }

    /// Steps between averaged iterates.
    ///
    /// ```
    /// use modelfusion::merge::{BlockQuantizer, Swalp};
    /// assert_eq!(Swalp::new(BlockQuantizer::new(8)?, 5, 3)?.every(), 3);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn every(&self) -> usize {
        self.every
    }

    /// Trains in low precision from `init` (quantised first) and averages. Errors as
    /// [`train_population`] does, and when `swa_start` is not below the step count.
    ///
    /// ```
    /// use modelfusion::merge::{BlockQuantizer, StepConfig, Swalp};
    /// use modelfusion::optim::Optimizer;
    /// use modelfusion::{StateDict, StateDictF64};
    /// use ndarray::arr1;
    /// let g = |m: &StateDictF64, _: usize| Ok((0.0, m.clone()));
    /// let init = StateDict::from_pairs([("w", arr1(&[1.0]).into_dyn())])?;
    /// let cfg = StepConfig::new(4, Optimizer::sgd(0.1, 0.0)?)?;
    /// assert!(Swalp::new(BlockQuantizer::new(8)?, 4, 1)?.train(&init, &mut g.clone(), &cfg).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn train<M, S>(
        &self,
        init: &M,
        objective: &mut S,
        config: &StepConfig,
    ) -> Result<SwalpRun<M>>
    where
        M: Model,
        S: StochasticGradient<M>,
    {
        if self.swa_start >= config.steps {
            return Err(Error::invalid(
                "swa_start",
                format!(
                    "step {} is not below the {} training steps: nothing to average",
                    self.swa_start, config.steps
                ),
            ));
        }
        let q = self.quantizer;
        let start = q.quantize(init, 0)?;
        let mut low = |m: &M, step: usize| -> Result<(f64, M)> {
            let (loss, grad) = objective.loss_and_gradient_at(m, step)?;
            Ok((loss, q.quantize(&grad, 2 * step as u64 + 1)?))
        };
        let mut swa = super::Swa::new();
        let last = train_population(
            std::slice::from_ref(&start),
            std::slice::from_mut(&mut low),
            config,
            |step, pop, _| {
                pop[0] = q.quantize(&pop[0], 2 * step as u64 + 2)?;
                if step >= self.swa_start && (step - self.swa_start) % self.every == 0 {
                    swa.update(&pop[0])?;
                }
                Ok(ControlFlow::Continue(()))
            },
        )?;
        let count = swa.count();
        let average = swa
            .average()
            .cloned()
            .ok_or_else(|| Error::empty("the SWALP iterates"))?;
        let last = last
            .into_iter()
            .next()
            .ok_or_else(|| Error::empty("the SWALP run"))?;
        Ok(SwalpRun {
            last,
            average,
            count,
        })
    }
}

/// TWA (trainable weight averaging, Li et al. 2022): the weights are trained inside the
/// span of collected iterates. The iterates are orthonormalised (Gram-Schmidt, twice
/// for stability; directions whose residual falls under `1e-6` of the iterate's norm
/// are dropped), training starts at their uniform mean (the SWA point) and moves along
/// the projected gradient: with basis `q_k` and coordinates `c`,
/// `w = mean + sum_k c_k q_k`, and the optimiser steps `c` against
/// `<q_k, grad L(w) + weight_decay w>`. The trajectory of `w` does not depend on the
/// basis for SGD (Adam's per-coordinate scaling does).
///
/// ```
/// use modelfusion::merge::{StepConfig, Twa};
/// use modelfusion::optim::Optimizer;
/// use modelfusion::{Model, StateDict, StateDictF64};
/// use ndarray::arr1;
///
/// let sd = |v: [f64; 3]| StateDict::from_pairs([("w", arr1(&v).into_dyn())]).unwrap();
/// // Iterates spanning the plane z = 0; the loss pulls toward (1, 2, 3).
/// let (a, b) = (sd([1.0, 0.0, 0.0]), sd([0.0, 1.0, 0.0]));
/// let twa = Twa::new(&[&a, &b])?;
/// assert_eq!(twa.dim(), 2);
/// let target = sd([1.0, 2.0, 3.0]);
/// let mut g = |m: &StateDictF64, _: usize| {
///     let d = m.sub(&target)?;
///     Ok((0.5 * d.norm().powi(2), d))
/// };
/// let run = twa.train(&mut g, &StepConfig::new(200, Optimizer::sgd(0.1, 0.0)?)?)?;
/// // The best point of the plane: (1, 2, 0).
/// assert!(run.model.sub(&sd([1.0, 2.0, 0.0]))?.norm() < 1e-6);
/// assert!(Twa::<StateDictF64>::new(&[]).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Twa<M> {
    center: M,
    basis: Vec<M>,
}

/// The result of [`Twa::train`]: the trained model, its coordinates in the basis, and
/// the training loss of every step.
///
/// ```
/// use modelfusion::merge::{StepConfig, Twa};
/// use modelfusion::optim::Optimizer;
/// use modelfusion::{Model, StateDict, StateDictF64};
/// use ndarray::arr1;
/// let a = StateDict::from_pairs([("w", arr1(&[1.0, 1.0]).into_dyn())])?;
/// let mut g = |m: &StateDictF64, _: usize| Ok((0.5 * m.norm().powi(2), m.clone()));
/// let run = Twa::new(&[&a])?.train(&mut g, &StepConfig::new(3, Optimizer::sgd(0.1, 0.0)?)?)?;
/// assert_eq!((run.coordinates.len(), run.losses.len()), (1, 3));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct TwaRun<M> {
    /// The trained model.
    pub model: M,
    /// Its coordinates along the orthonormal basis, from the mean.
    pub coordinates: Vec<f64>,
    /// The training loss at every step (before its update).
    pub losses: Vec<f64>,
}

impl<M: Model> Twa<M> {
    /// The subspace spanned by `iterates` (at least one, all matching and finite).
    ///
    /// ```
    /// use modelfusion::merge::Twa;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let a = StateDict::from_pairs([("w", arr1(&[1.0f64, 2.0]).into_dyn())])?;
    /// let twice = a.scale(2.0)?;
    /// assert_eq!(Twa::new(&[&a, &twice])?.dim(), 1); // dependent directions are dropped
    /// let other = StateDict::from_pairs([("v", arr1(&[1.0f64]).into_dyn())])?;
    /// assert!(Twa::new(&[&a, &other]).is_err());
    /// # use modelfusion::Model;
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(iterates: &[&M]) -> Result<Self> {
        let first = *iterates
            .first()
            .ok_or_else(|| Error::empty("the TWA iterates"))?;
        for (i, m) in iterates.iter().enumerate() {
            first.check_compatible(m)?;
            m.check_finite(&format!("TWA iterate {i}"))?;
        }
        let center = Average::uniform().merge(iterates)?;
        let mut basis: Vec<M> = Vec::new();
        for m in iterates {
            let size = m.norm();
            let mut r = (*m).clone();
            for _ in 0..2 {
                for q in &basis {
                    let c = q.dot(&r)?;
                    r = r.sub(&q.scale(c)?)?;
                }
            }
            let n = r.norm();
            if n > 1e-6 * size && n > 0.0 {
                basis.push(r.scale(1.0 / n)?);
            }
        }
        if basis.is_empty() {
            return Err(Error::invalid(
                "iterates",
                "span no direction (every iterate is zero)",
            ));
        }
        Ok(Twa { center, basis })
    }

    /// Dimension of the subspace.
    ///
    /// ```
    /// use modelfusion::merge::Twa;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let a = StateDict::from_pairs([("w", arr1(&[1.0f64, 0.0]).into_dyn())])?;
    /// let b = StateDict::from_pairs([("w", arr1(&[0.0f64, 1.0]).into_dyn())])?;
    /// assert_eq!(Twa::new(&[&a, &b])?.dim(), 2);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn dim(&self) -> usize {
        self.basis.len()
    }

    /// The uniform mean of the iterates (where training starts).
    ///
    /// ```
    /// use modelfusion::merge::Twa;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let a = StateDict::from_pairs([("w", arr1(&[1.0f64, 0.0]).into_dyn())])?;
    /// let b = StateDict::from_pairs([("w", arr1(&[0.0f64, 1.0]).into_dyn())])?;
    /// assert_eq!(Twa::new(&[&a, &b])?.center().get("w").unwrap()[[0]], 0.5);
    /// # use modelfusion::Model;
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn center(&self) -> &M {
        &self.center
    }

    /// The point `mean + sum_k coordinates_k q_k`; errors unless there is one
    /// coordinate per basis direction.
    ///
    /// ```
    /// use modelfusion::merge::Twa;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let a = StateDict::from_pairs([("w", arr1(&[2.0f64, 0.0]).into_dyn())])?;
    /// let twa = Twa::new(&[&a])?;
    /// assert_eq!(twa.point(&[1.0])?.get("w").unwrap()[[0]], 3.0);
    /// assert!(twa.point(&[1.0, 2.0]).is_err());
    /// # use modelfusion::Model;
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn point(&self, coordinates: &[f64]) -> Result<M> {
        if coordinates.len() != self.basis.len() {
            return Err(Error::invalid(
                "coordinates",
                format!(
                    "{} coordinates for a {}-dimensional subspace",
                    coordinates.len(),
                    self.basis.len()
                ),
            ));
        }
        let mut models: Vec<&M> = vec![&self.center];
        models.extend(self.basis.iter());
        let mut weights = vec![1.0];
        weights.extend_from_slice(coordinates);
        M::weighted_sum(&models, &weights)
    }

    /// Trains the coordinates from 0 (the mean) for `config.steps()` steps with its
    /// optimiser and schedule; `config`'s weight decay acts on `w` before projection.
    /// Errors on frozen parameters (a direction of the span moves every parameter:
    /// take buffers out of the models first), on a non-finite loss, and on a gradient
    /// that does not match the model.
    ///
    /// ```
    /// use modelfusion::merge::{StepConfig, Twa};
    /// use modelfusion::optim::Optimizer;
    /// use modelfusion::{StateDict, StateDictF64};
    /// use ndarray::arr1;
    /// let a = StateDict::from_pairs([("w", arr1(&[1.0]).into_dyn())])?;
    /// let mut g = |m: &StateDictF64, _: usize| Ok((0.0, m.clone()));
    /// let cfg = StepConfig::new(3, Optimizer::sgd(0.1, 0.0)?)?.with_frozen(["w"]);
    /// assert!(Twa::new(&[&a])?.train(&mut g, &cfg).unwrap_err().to_string().contains("frozen"));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn train<S: StochasticGradient<M>>(
        &self,
        objective: &mut S,
        config: &StepConfig,
    ) -> Result<TwaRun<M>> {
        if !config.frozen.is_empty() {
            return Err(Error::invalid(
                "frozen",
                format!(
                    "TWA moves every parameter along the span; {:?} cannot stay frozen (take them out of the models)",
                    config.frozen
                ),
            ));
        }
        let r = self.basis.len();
        let coords = |c: Vec<f64>| {
            crate::model::StateDict::from_pairs([(
                "coordinates",
                ndarray::Array1::from(c).into_dyn(),
            )])
        };
        let mut optimizer = ModelOptimizer::new(config.optimizer);
        let mut c = coords(vec![0.0; r])?;
        let mut losses = Vec::with_capacity(config.steps);
        for step in 0..config.steps {
            let current: Vec<f64> = c
                .get("coordinates")
                .map(|t| t.iter().copied().collect())
                .unwrap_or_default();
            let w = self.point(&current)?;
            let (loss, grad) = objective.loss_and_gradient_at(&w, step)?;
            if !loss.is_finite() {
                return Err(Error::NonFinite {
                    what: format!("TWA training loss at step {step} ({loss})"),
                });
            }
            w.check_compatible(&grad)?;
            let g = self
                .basis
                .iter()
                .map(|q| Ok(q.dot(&grad)? + config.weight_decay * q.dot(&w)?))
                .collect::<Result<Vec<f64>>>()?;
            optimizer.step(
                &mut c,
                &coords(g)?,
                config.schedule.factor(step, config.steps),
            )?;
            losses.push(loss);
        }
        let coordinates: Vec<f64> = c
            .get("coordinates")
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default();
        Ok(TwaRun {
            model: self.point(&coordinates)?,
            coordinates,
            losses,
        })
    }
}
