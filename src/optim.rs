//! First-order optimisers on model-shaped values: SGD with (Nesterov) momentum and Adam,
//! with optional L2 weight decay, frozen parameters and a learning-rate schedule.
//!
//! One implementation serves every training loop of the crate: the reference networks'
//! minibatch training ([`nn::train`](crate::nn)) and the fitting of curve bends
//! ([`path::fit_curve`](crate::path)). Both re-export these types.
//!
//! ```
//! use modelfusion::optim::{LrSchedule, ModelOptimizer, Optimizer};
//! use modelfusion::{Model, StateDict};
//! use ndarray::arr1;
//!
//! // Minimise |w|^2 / 2 (gradient w) with Adam and a cosine schedule.
//! let mut w = StateDict::from_pairs([("w", arr1(&[1.0f64, -2.0]).into_dyn())])?;
//! let mut opt = ModelOptimizer::new(Optimizer::adam(0.1)?);
//! for step in 0..200 {
//!     let g = w.clone();
//!     opt.step(&mut w, &g, LrSchedule::Cosine.factor(step, 200))?;
//! }
//! assert!(w.norm() < 1e-2);
//! # Ok::<(), modelfusion::Error>(())
//! ```

use ndarray::Zip;
use num_traits::Float;

use crate::error::{Error, Result, check_nonnegative, check_positive, check_unit};
use crate::model::Model;
use crate::tensor::{Scalar, Tensor};

/// Which update rule to use, with its hyperparameters. Build it with [`Optimizer::sgd`],
/// [`Optimizer::nesterov`], [`Optimizer::adam`] or [`Optimizer::adam_with`], which
/// validate the values; the consumers validate a hand-built value again.
///
/// ```
/// use modelfusion::optim::Optimizer;
/// let sgd = Optimizer::sgd(0.1, 0.9)?;
/// assert_eq!(sgd.lr(), 0.1);
/// assert!(Optimizer::sgd(0.1, 1.0).is_err()); // momentum must be in [0, 1)
/// assert!(Optimizer::adam(-1.0).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Optimizer {
    /// Stochastic gradient descent with heavy-ball momentum (PyTorch's form:
    /// `buf = momentum * buf + g; p -= lr * buf`, or with Nesterov
    /// `p -= lr * (g + momentum * buf)`).
    Sgd {
        /// Learning rate, `> 0`.
        lr: f64,
        /// Momentum in `[0, 1)`.
        momentum: f64,
        /// Nesterov momentum (needs `momentum > 0`).
        nesterov: bool,
    },
    /// Adam (Kingma and Ba 2015) with bias correction, in PyTorch's form:
    /// `p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`.
    Adam {
        /// Learning rate, `> 0`.
        lr: f64,
        /// Decay of the first moment, in `[0, 1)`.
        beta1: f64,
        /// Decay of the second moment, in `[0, 1)`.
        beta2: f64,
        /// Added to the denominator, `> 0`.
        eps: f64,
    },
}

impl Optimizer {
    /// SGD with heavy-ball momentum (`momentum = 0` is plain SGD).
    ///
    /// ```
    /// assert!(modelfusion::optim::Optimizer::sgd(0.1, 1.0).is_err());
    /// ```
    pub fn sgd(lr: f64, momentum: f64) -> Result<Self> {
        Optimizer::Sgd {
            lr,
            momentum,
            nesterov: false,
        }
        .validated()
    }

    /// SGD with Nesterov momentum (`momentum > 0`).
    ///
    /// ```
    /// use modelfusion::optim::Optimizer;
    /// assert!(Optimizer::nesterov(0.1, 0.9).is_ok());
    /// assert!(Optimizer::nesterov(0.1, 0.0).is_err());
    /// ```
    pub fn nesterov(lr: f64, momentum: f64) -> Result<Self> {
        Optimizer::Sgd {
            lr,
            momentum,
            nesterov: true,
        }
        .validated()
    }

    /// Adam with the usual defaults `beta1 = 0.9`, `beta2 = 0.999`, `eps = 1e-8`.
    ///
    /// ```
    /// assert!(modelfusion::optim::Optimizer::adam(f64::NAN).is_err());
    /// ```
    pub fn adam(lr: f64) -> Result<Self> {
        Self::adam_with(lr, 0.9, 0.999, 1e-8)
    }

    /// Adam with every hyperparameter given.
    ///
    /// ```
    /// assert!(modelfusion::optim::Optimizer::adam_with(1e-3, 0.9, 0.99, 0.0).is_err());
    /// ```
    pub fn adam_with(lr: f64, beta1: f64, beta2: f64, eps: f64) -> Result<Self> {
        Optimizer::Adam {
            lr,
            beta1,
            beta2,
            eps,
        }
        .validated()
    }

    fn validated(self) -> Result<Self> {
        self.validate()?;
        Ok(self)
    }

    /// The base learning rate.
    ///
    /// ```
    /// assert_eq!(modelfusion::optim::Optimizer::adam(0.01)?.lr(), 0.01);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn lr(&self) -> f64 {
        match *self {
            Optimizer::Sgd { lr, .. } | Optimizer::Adam { lr, .. } => lr,
        }
    }

    /// Errors naming the first hyperparameter out of range.
    ///
    /// ```
    /// use modelfusion::optim::Optimizer;
    /// let bad = Optimizer::Adam { lr: 0.1, beta1: 0.9, beta2: 1.0, eps: 1e-8 };
    /// assert!(bad.validate().unwrap_err().to_string().contains("beta2"));
    /// let bad = Optimizer::Sgd { lr: -1.0, momentum: 0.0, nesterov: false };
    /// assert!(bad.validate().unwrap_err().to_string().contains("lr"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_positive("lr", self.lr())?;
        match *self {
            Optimizer::Sgd {
                momentum, nesterov, ..
            } => {
                check_unit("momentum", momentum)?;
                if nesterov && momentum == 0.0 {
                    return Err(Error::invalid(
                        "momentum",
                        "Nesterov momentum needs momentum > 0",
                    ));
                }
                Ok(())
            }
            Optimizer::Adam {
                beta1, beta2, eps, ..
            } => {
                check_unit("beta1", beta1)?;
                check_unit("beta2", beta2)?;
                check_positive("eps", eps)
            }
        }
    }
}

/// How the learning rate changes over a run; [`factor`](LrSchedule::factor) multiplies
/// the base rate at a step.
///
/// ```
/// use modelfusion::optim::LrSchedule;
/// assert_eq!(LrSchedule::default(), LrSchedule::Constant);
/// assert_eq!(LrSchedule::Constant.factor(70, 100), 1.0);
/// assert_eq!(LrSchedule::Garipov.factor(10, 100), 1.0);
/// assert!((LrSchedule::Garipov.factor(95, 100) - 0.01).abs() < 1e-12);
/// assert!((LrSchedule::Cosine.factor(50, 100) - 0.5).abs() < 1e-12);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LrSchedule {
    /// The base rate throughout.
    #[default]
    Constant,
    /// Cosine decay from the base rate to 0: `(1 + cos(pi * step / steps)) / 2`.
    Cosine,
    /// The schedule of Garipov et al.'s curve-fitting code: the base rate for the first
    /// half, then linear decay to 1% of it at 90% of the run, 1% after.
    Garipov,
}

impl LrSchedule {
    /// The factor at step `step` (0-based) of `steps`.
    ///
    /// ```
    /// use modelfusion::optim::LrSchedule;
    /// assert_eq!(LrSchedule::Cosine.factor(0, 10), 1.0);
    /// assert!(LrSchedule::Cosine.factor(9, 10) < 0.05);
    /// ```
    pub fn factor(&self, step: usize, steps: usize) -> f64 {
        let frac = if steps == 0 {
            0.0
        } else {
            step as f64 / steps as f64
        };
        match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()),
            LrSchedule::Garipov => {
                if frac <= 0.5 {
                    1.0
                } else if frac <= 0.9 {
                    1.0 - (frac - 0.5) / 0.4 * 0.99
                } else {
                    0.01
                }
            }
        }
    }
}

/// An [`Optimizer`] with its state for one model-shaped parameter set: momentum buffers
/// (SGD) or first and second moments (Adam), created at the first step. Optionally an
/// L2 weight decay (`weight_decay * p` added to the gradient, as PyTorch's
/// `weight_decay`) and frozen parameters (buffers such as running statistics), which
/// get no update and need no gradient (one given is ignored).
///
/// ```
/// use modelfusion::optim::{ModelOptimizer, Optimizer};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// // Minimise |w|^2 / 2 (gradient w) with plain SGD; `n` is frozen.
/// let mut w = StateDict::from_pairs([
///     ("w", arr1(&[1.0f64, -2.0]).into_dyn()),
///     ("n", arr1(&[3.0f64]).into_dyn()),
/// ])?;
/// let mut opt = ModelOptimizer::new(Optimizer::sgd(0.5, 0.0)?).with_frozen(["n"]);
/// for _ in 0..20 {
///     let g = StateDict::from_pairs([("w", w.get("w").unwrap().clone())])?;
///     opt.step(&mut w, &g, 1.0)?;
/// }
/// assert!(w.get("w").unwrap().iter().all(|x| x.abs() < 1e-5));
/// assert_eq!(w.get("n").unwrap()[[0]], 3.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ModelOptimizer<M> {
    config: Optimizer,
    weight_decay: f64,
    frozen: Vec<String>,
    first: Option<M>,
    second: Option<M>,
    steps: u64,
}

impl<M: Model> ModelOptimizer<M> {
    /// A fresh optimiser (no state yet, no weight decay, nothing frozen).
    pub fn new(config: Optimizer) -> Self {
        ModelOptimizer {
            config,
            weight_decay: 0.0,
            frozen: Vec::new(),
            first: None,
            second: None,
            steps: 0,
        }
    }

    /// Sets the L2 weight decay; errors unless it is finite and `>= 0`.
    ///
    /// ```
    /// use modelfusion::optim::{ModelOptimizer, Optimizer};
    /// let o: ModelOptimizer<modelfusion::StateDictF32> = ModelOptimizer::new(Optimizer::adam(0.1)?);
    /// assert!(o.with_weight_decay(-1.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Result<Self> {
        check_nonnegative("weight_decay", weight_decay)?;
        self.weight_decay = weight_decay;
        Ok(self)
    }

    /// Parameters that are never updated (and need no gradient).
    pub fn with_frozen<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.frozen = names.into_iter().map(Into::into).collect();
        self
    }

    /// The update rule.
    pub fn config(&self) -> &Optimizer {
        &self.config
    }

    /// Number of steps taken.
    ///
    /// ```
    /// use modelfusion::optim::{ModelOptimizer, Optimizer};
    /// let opt: ModelOptimizer<modelfusion::StateDictF32> = ModelOptimizer::new(Optimizer::adam(0.1)?);
    /// assert_eq!(opt.steps(), 0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update of `params` against `grad`, with the learning rate multiplied by
    /// `lr_factor` (a schedule). `grad` holds every parameter that is not frozen, with
    /// its shape, and no other name; entries of frozen parameters are ignored.
    pub fn step(&mut self, params: &mut M, grad: &M, lr_factor: f64) -> Result<()> {
        self.step_scaled(params, grad, 1.0, lr_factor)
    }

    /// [`step`](Self::step) against the gradient `grad_scale * grad`, without forming it
    /// (a curve's control `k` gets `c_k(t)` times the gradient at `phi(t)`).
    ///
    /// ```
    /// use modelfusion::optim::{ModelOptimizer, Optimizer};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let mut w = StateDict::from_pairs([("w", arr1(&[1.0f64]).into_dyn())])?;
    /// let mut opt = ModelOptimizer::new(Optimizer::sgd(0.5, 0.0)?);
    /// let g = w.clone();
    /// opt.step_scaled(&mut w, &g, 0.5, 1.0)?; // w -= 0.5 * (0.5 * g)
    /// assert_eq!(w.get("w").unwrap()[[0]], 0.75);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn step_scaled(
        &mut self,
        params: &mut M,
        grad: &M,
        grad_scale: f64,
        lr_factor: f64,
    ) -> Result<()> {
        self.config.validate()?;
        if !grad_scale.is_finite() {
            return Err(Error::invalid(
                "grad_scale",
                format!("must be finite, got {grad_scale}"),
            ));
        }
        check_nonnegative("lr_factor", lr_factor)?;
        self.check_gradient(params, grad)?;
        let zeros = || params.try_map(|_, t| Ok(<M::Tensor as Tensor>::zeros(t.shape())));
        if self.first.is_none() {
            self.first = Some(zeros()?);
        }
        if matches!(self.config, Optimizer::Adam { .. }) && self.second.is_none() {
            self.second = Some(zeros()?);
        }
        self.steps += 1;
        let e = <<M::Tensor as Tensor>::Elem as Scalar>::from_f64_lossy;
        let (gs, wd) = (e(grad_scale), e(self.weight_decay));
        let names: Vec<String> = grad
            .names()
            .filter(|n| !self.is_frozen(n))
            .map(str::to_string)
            .collect();
        for name in &names {
            let g = grad.require(name, "the gradient")?.view();
            let p = params
                .get_mut(name)
                .ok_or_else(|| missing(name, "the parameters"))?
                .view_mut();
            let m = self
                .first
                .as_mut()
                .and_then(|s| s.get_mut(name))
                .ok_or_else(|| missing(name, "the optimiser state"))?
                .view_mut();
            match self.config {
                Optimizer::Sgd {
                    lr,
                    momentum,
                    nesterov,
                } => {
                    let (lr, mu) = (e(lr * lr_factor), e(momentum));
                    Zip::from(p).and(m).and(&g).for_each(|p, v, &g| {
                        let g = gs * g + wd * *p;
                        *v = mu * *v + g;
                        let d = if nesterov { g + mu * *v } else { *v };
                        *p -= lr * d;
                    });
                }
                Optimizer::Adam {
                    lr,
                    beta1,
                    beta2,
                    eps,
                } => {
                    let s = self
                        .second
                        .as_mut()
                        .and_then(|s| s.get_mut(name))
                        .ok_or_else(|| missing(name, "the optimiser state"))?
                        .view_mut();
                    let t = i32::try_from(self.steps).unwrap_or(i32::MAX);
                    let step_size = e(lr * lr_factor / (1.0 - beta1.powi(t)));
                    let c2_sqrt = e((1.0 - beta2.powi(t)).sqrt());
                    let (b1, b2, eps) = (e(beta1), e(beta2), e(eps));
                    let one = e(1.0);
                    Zip::from(p).and(m).and(s).and(&g).for_each(|p, m, v, &g| {
                        let g = gs * g + wd * *p;
                        *m = b1 * *m + (one - b1) * g;
                        *v = b2 * *v + (one - b2) * g * g;
                        *p -= step_size * *m / (v.sqrt() / c2_sqrt + eps);
                    });
                }
            }
        }
        Ok(())
    }

    fn is_frozen(&self, name: &str) -> bool {
        self.frozen.iter().any(|f| f == name)
    }

    /// Errors unless `grad` has every parameter that is not frozen, with its shape, and
    /// no name that is not a parameter.
    fn check_gradient(&self, params: &M, grad: &M) -> Result<()> {
        for name in params.names() {
            if self.is_frozen(name) {
                continue;
            }
            let p = params.require(name, "the parameters")?;
            let g = grad.require(name, "the gradient")?;
            if g.shape() != p.shape() {
                return Err(Error::shape(
                    format!("gradient of parameter `{name}` (vs the parameter)"),
                    p.shape(),
                    g.shape(),
                ));
            }
        }
        if let Some(extra) = grad.names().find(|n| params.get(n).is_none()) {
            return Err(Error::invalid(
                "grad",
                format!("has an entry `{extra}` that is not a parameter"),
            ));
        }
        Ok(())
    }
}

fn missing(name: &str, context: &str) -> Error {
    Error::MissingParam {
        name: name.to_string(),
        context: context.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StateDict;
    use crate::model::StateDictF64;
    use ndarray::arr1;

    fn sd(x: &[f64]) -> StateDictF64 {
        StateDict::from_pairs([("w", arr1(x).into_dyn())]).unwrap()
    }

    /// Hand-computed steps against the textbook update rules.
    #[test]
    fn updates_follow_the_rules() {
        let run = |o: Optimizer, wd: f64, grads: &[(f64, f64)]| {
            let mut w = sd(&[1.0]);
            let mut opt = ModelOptimizer::new(o).with_weight_decay(wd).unwrap();
            for &(g, f) in grads {
                opt.step(&mut w, &sd(&[g]), f).unwrap();
            }
            w.get("w").unwrap()[[0]]
        };
        // v = 2, w = 1 - 0.2; v = 0.5 * 2 + 2 = 3, w = 0.8 - 0.5 * 0.1 * 3
        let sgd = Optimizer::sgd(0.1, 0.5).unwrap();
        assert!((run(sgd, 0.0, &[(2.0, 1.0), (2.0, 0.5)]) - 0.65).abs() < 1e-15);
        // Nesterov: buf = 1, d = 1 + 0.5 * 1, w = 1 - 0.15
        let nag = Optimizer::nesterov(0.1, 0.5).unwrap();
        assert!((run(nag, 0.0, &[(1.0, 1.0)]) - 0.85).abs() < 1e-15);
        // Weight decay 1 doubles the gradient w = 1: w = 1 - 0.1 * 2.
        let plain = Optimizer::sgd(0.1, 0.0).unwrap();
        assert!((run(plain, 1.0, &[(1.0, 1.0)]) - 0.8).abs() < 1e-15);
        // Adam's first step moves by lr * g / (|g| + eps) = 0.1 (up to eps).
        let adam = Optimizer::adam(0.1).unwrap();
        assert!((run(adam, 0.0, &[(3.0, 1.0)]) - 0.9).abs() < 1e-8);
    }

    #[test]
    fn scaled_step_is_a_step_on_the_scaled_gradient() {
        for opt in [
            Optimizer::sgd(0.1, 0.9).unwrap(),
            Optimizer::nesterov(0.1, 0.9).unwrap(),
            Optimizer::adam(0.1).unwrap(),
        ] {
            let (mut a, mut b) = (sd(&[1.0, -2.0]), sd(&[1.0, -2.0]));
            let (mut oa, mut ob) = (ModelOptimizer::new(opt), ModelOptimizer::new(opt));
            for i in 0..5 {
                let g = sd(&[0.5 * i as f64, 1.0]);
                oa.step_scaled(&mut a, &g, 0.3, 0.7).unwrap();
                ob.step(&mut b, &g.scale(0.3).unwrap(), 0.7).unwrap();
            }
            assert!(a.max_abs_diff(&b).unwrap() < 1e-15);
            assert_eq!(oa.steps(), 5);
        }
    }

    #[test]
    fn bad_inputs() {
        let mut w = sd(&[1.0]);
        let mut opt = ModelOptimizer::new(Optimizer::sgd(0.1, 0.0).unwrap());
        let e = opt.step(&mut w, &sd(&[1.0, 2.0]), 1.0).unwrap_err();
        assert!(e.to_string().contains("`w`"), "{e}");
        assert!(opt.step(&mut w, &sd(&[1.0]), f64::NAN).is_err());
        assert!(opt.step_scaled(&mut w, &sd(&[1.0]), f64::NAN, 1.0).is_err());
        let extra = StateDict::from_pairs([
            ("w", arr1(&[1.0]).into_dyn()),
            ("x", arr1(&[1.0]).into_dyn()),
        ])
        .unwrap();
        assert!(opt.step(&mut w, &extra, 1.0).is_err());
        let mut frozen = ModelOptimizer::new(Optimizer::sgd(0.1, 0.0).unwrap()).with_frozen(["w"]);
        frozen.step(&mut w, &sd(&[1.0]), 1.0).unwrap();
        assert_eq!(w, sd(&[1.0]));
        let raw = Optimizer::Sgd {
            lr: 0.0,
            momentum: 0.0,
            nesterov: false,
        };
        assert!(
            ModelOptimizer::new(raw)
                .step(&mut w, &sd(&[1.0]), 1.0)
                .is_err()
        );
        assert!(Optimizer::sgd(f64::INFINITY, 0.0).is_err());
    }
}
