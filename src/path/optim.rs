//! A small first-order optimiser on model-shaped values (SGD with momentum, Adam), used
//! to train the bends of a curve.

use ndarray::Zip;
use num_traits::Float;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::{Scalar, Tensor};

/// Which update rule to use, with its hyperparameters. Build it with
/// [`Optimizer::sgd`] or [`Optimizer::adam`], which validate the values.
///
/// ```
/// use modelfusion::path::Optimizer;
/// let sgd = Optimizer::sgd(0.1, 0.9)?;
/// assert_eq!(sgd.lr(), 0.1);
/// assert!(Optimizer::sgd(0.1, 1.0).is_err()); // momentum must be in [0, 1)
/// assert!(Optimizer::adam(-1.0).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Optimizer {
    /// Stochastic gradient descent with heavy-ball momentum (PyTorch's convention):
    /// `v = momentum * v + g`, `theta -= lr * v` (Nesterov: `theta -= lr * (g + momentum * v)`).
    Sgd {
        /// Learning rate, > 0.
        lr: f64,
        /// Momentum in `[0, 1)`.
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
    },
    /// Adam (Kingma and Ba 2015) with bias correction.
    Adam {
        /// Learning rate, > 0.
        lr: f64,
        /// Decay of the first moment, in `[0, 1)`.
        beta1: f64,
        /// Decay of the second moment, in `[0, 1)`.
        beta2: f64,
        /// Added to the root of the second moment, > 0.
        eps: f64,
    },
}

impl Optimizer {
    /// SGD with heavy-ball momentum (no Nesterov).
    pub fn sgd(lr: f64, momentum: f64) -> Result<Self> {
        let o = Optimizer::Sgd {
            lr,
            momentum,
            nesterov: false,
        };
        o.validate()?;
        Ok(o)
    }

    /// Adam with `beta1 = 0.9`, `beta2 = 0.999`, `eps = 1e-8`.
    pub fn adam(lr: f64) -> Result<Self> {
        let o = Optimizer::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        o.validate()?;
        Ok(o)
    }

    /// The base learning rate.
    ///
    /// ```
    /// assert_eq!(modelfusion::path::Optimizer::adam(0.01).unwrap().lr(), 0.01);
    /// ```
    pub fn lr(&self) -> f64 {
        match *self {
            Optimizer::Sgd { lr, .. } | Optimizer::Adam { lr, .. } => lr,
        }
    }

    /// Errors naming the first hyperparameter out of range.
    ///
    /// ```
    /// use modelfusion::path::Optimizer;
    /// let bad = Optimizer::Adam { lr: 0.1, beta1: 0.9, beta2: 1.0, eps: 1e-8 };
    /// assert!(bad.validate().unwrap_err().to_string().contains("beta2"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        let positive = |name: &str, x: f64| {
            if x.is_finite() && x > 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(
                    name,
                    format!("must be finite and > 0, got {x}"),
                ))
            }
        };
        let unit = |name: &str, x: f64| {
            if (0.0..1.0).contains(&x) {
                Ok(())
            } else {
                Err(Error::invalid(name, format!("must be in [0, 1), got {x}")))
            }
        };
        match *self {
            Optimizer::Sgd { lr, momentum, .. } => {
                positive("lr", lr)?;
                unit("momentum", momentum)
            }
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                positive("lr", lr)?;
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                positive("eps", eps)
            }
        }
    }
}

/// The state of an [`Optimizer`] for one model-shaped parameter set: momentum buffers
/// (SGD) or first and second moments (Adam), created at the first step.
///
/// ```
/// use modelfusion::path::{ModelOptimizer, Optimizer};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// // Minimise |w|^2 / 2 (gradient w) with plain SGD.
/// let mut w = StateDict::from_pairs([("w", arr1(&[1.0f64, -2.0]).into_dyn())])?;
/// let mut opt = ModelOptimizer::new(Optimizer::sgd(0.5, 0.0)?);
/// for _ in 0..20 {
///     let g = w.clone();
///     opt.step(&mut w, &g, 1.0)?;
/// }
/// assert!(w.norm() < 1e-5);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ModelOptimizer<M> {
    config: Optimizer,
    first: Option<M>,
    second: Option<M>,
    steps: u64,
}

impl<M: Model> ModelOptimizer<M> {
    /// A fresh optimiser (no state yet).
    pub fn new(config: Optimizer) -> Self {
        ModelOptimizer {
            config,
            first: None,
            second: None,
            steps: 0,
        }
    }

    /// Number of steps taken.
    ///
    /// ```
    /// use modelfusion::path::{ModelOptimizer, Optimizer};
    /// let opt: ModelOptimizer<modelfusion::StateDictF32> = ModelOptimizer::new(Optimizer::adam(0.1).unwrap());
    /// assert_eq!(opt.steps(), 0);
    /// ```
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update of `params` against `grad` (same names and shapes), with the learning
    /// rate multiplied by `lr_factor` (a schedule).
    pub fn step(&mut self, params: &mut M, grad: &M, lr_factor: f64) -> Result<()> {
        self.step_scaled(params, grad, 1.0, lr_factor)
    }

    /// [`step`](Self::step) against the gradient `grad_scale * grad`, without forming it
    /// (a curve's control `k` gets `c_k(t)` times the gradient at `phi(t)`).
    ///
    /// ```
    /// use modelfusion::path::{ModelOptimizer, Optimizer};
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
        if !grad_scale.is_finite() {
            return Err(Error::invalid(
                "grad_scale",
                format!("must be finite, got {grad_scale}"),
            ));
        }
        params
            .check_compatible(grad)
            .map_err(|e| Error::invalid("grad", format!("does not fit the parameters: {e}")))?;
        if !(lr_factor.is_finite() && lr_factor >= 0.0) {
            return Err(Error::invalid(
                "lr_factor",
                format!("must be finite and >= 0, got {lr_factor}"),
            ));
        }
        let zeros = || params.try_map(|_, t| Ok(<M::Tensor as Tensor>::zeros(t.shape())));
        if self.first.is_none() {
            self.first = Some(zeros()?);
        }
        if matches!(self.config, Optimizer::Adam { .. }) && self.second.is_none() {
            self.second = Some(zeros()?);
        }
        self.steps += 1;
        let e = <<M::Tensor as Tensor>::Elem as Scalar>::from_f64_lossy;
        let gs = e(grad_scale);
        let names: Vec<String> = params.names().map(str::to_string).collect();
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
                        let g = gs * g;
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
                    let t = self.steps as i32;
                    let c1 = 1.0 - beta1.powi(t);
                    let c2 = 1.0 - beta2.powi(t);
                    let (b1, b2, eps) = (e(beta1), e(beta2), e(eps));
                    let one = e(1.0);
                    let (lr_c, c2) = (e(lr * lr_factor / c1), e(c2));
                    Zip::from(p).and(m).and(s).and(&g).for_each(|p, m, v, &g| {
                        let g = gs * g;
                        *m = b1 * *m + (one - b1) * g;
                        *v = b2 * *v + (one - b2) * g * g;
                        *p -= lr_c * *m / ((*v / c2).sqrt() + eps);
                    });
                }
            }
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
        let mut w = sd(&[1.0]);
        let mut opt = ModelOptimizer::new(Optimizer::sgd(0.1, 0.5).unwrap());
        opt.step(&mut w, &sd(&[2.0]), 1.0).unwrap(); // v = 2, w = 1 - 0.2
        opt.step(&mut w, &sd(&[2.0]), 0.5).unwrap(); // v = 3, w = 0.8 - 0.15
        assert!((w.get("w").unwrap()[[0]] - 0.65).abs() < 1e-15);

        let mut w = sd(&[1.0]);
        let mut opt = ModelOptimizer::new(Optimizer::adam(0.1).unwrap());
        opt.step(&mut w, &sd(&[3.0]), 1.0).unwrap();
        // First Adam step moves by lr * g / (|g| + eps) = 0.1 (up to eps).
        assert!((w.get("w").unwrap()[[0]] - 0.9).abs() < 1e-8);
        assert_eq!(opt.steps(), 1);
    }

    #[test]
    fn scaled_step_is_a_step_on_the_scaled_gradient() {
        for opt in [
            Optimizer::sgd(0.1, 0.9).unwrap(),
            Optimizer::Sgd {
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
            },
            Optimizer::adam(0.1).unwrap(),
        ] {
            let (mut a, mut b) = (sd(&[1.0, -2.0]), sd(&[1.0, -2.0]));
            let (mut oa, mut ob) = (ModelOptimizer::new(opt.clone()), ModelOptimizer::new(opt));
            for i in 0..5 {
                let g = sd(&[0.5 * i as f64, 1.0]);
                oa.step_scaled(&mut a, &g, 0.3, 0.7).unwrap();
                ob.step(&mut b, &g.scale(0.3).unwrap(), 0.7).unwrap();
            }
            assert!(a.max_abs_diff(&b).unwrap() < 1e-15);
        }
        let mut w = sd(&[1.0]);
        let mut o = ModelOptimizer::new(Optimizer::adam(0.1).unwrap());
        assert!(o.step_scaled(&mut w, &sd(&[1.0]), f64::NAN, 1.0).is_err());
    }

    #[test]
    fn bad_inputs() {
        let mut w = sd(&[1.0]);
        let mut opt = ModelOptimizer::new(Optimizer::sgd(0.1, 0.0).unwrap());
        assert!(opt.step(&mut w, &sd(&[1.0, 2.0]), 1.0).is_err());
        assert!(opt.step(&mut w, &sd(&[1.0]), f64::NAN).is_err());
        assert!(Optimizer::sgd(0.0, 0.0).is_err());
        assert!(Optimizer::sgd(f64::INFINITY, 0.0).is_err());
    }
}
