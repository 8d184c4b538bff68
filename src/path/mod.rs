//! Paths in weight space between models: `phi(t) = sum_k c_k(t) * theta_k` over control
//! models.
//!
//! A path is one definition, its coefficient function `c(t)`, applied to a list of
//! control models whose first and last entries are the endpoints. The point at `t`
//! ([`PathSampler::point`]) and the gradient of `L(phi(t))` with respect to each control
//! ([`control_gradients`]: `c_k(t) * grad L(phi(t))`) both follow from it.
//!
//! | path | coefficients | controls |
//! |---|---|---|
//! | [`Linear`] | `[1 - t, t]` | exactly 2 |
//! | [`Bezier`] | Bernstein basis `C(n-1,k) t^k (1-t)^(n-1-k)` | any `n >= 2` |
//! | [`PolyChain`] | hat functions `max(0, 1 - abs(t (n-1) - k))` | any `n >= 2` |
//!
//! Every path returns its endpoints bit for bit at `t = 0` and `t = 1`, and rejects `t`
//! outside `[0, 1]` or non-finite. Curve fitting (Garipov et al. 2018) lives in
//! [`fit_curve`]: it trains the inner controls of a [`Bezier`] or [`PolyChain`] between
//! two fixed endpoints.
//!
//! ```
//! use modelfusion::path::{Bezier, Linear, PathSampler};
//! use modelfusion::{Model, StateDict};
//! use ndarray::arr1;
//!
//! let a = StateDict::from_pairs([("w", arr1(&[0.0f64, 0.0]).into_dyn())])?;
//! let bend = StateDict::from_pairs([("w", arr1(&[1.0f64, 2.0]).into_dyn())])?;
//! let b = StateDict::from_pairs([("w", arr1(&[2.0f64, 0.0]).into_dyn())])?;
//! let curve = Bezier::new(vec![a.clone(), bend, b.clone()])?;
//! // A quadratic Bezier passes through 0.25 a + 0.5 bend + 0.25 b at t = 0.5.
//! assert_eq!(curve.point(0.5)?.get("w").unwrap().as_slice().unwrap(), &[1.0, 1.0]);
//! assert_eq!(curve.point(1.0)?, b);
//! let line = Linear::new(a, b)?;
//! assert_eq!(line.coefficients(0.25)?, vec![0.75, 0.25]);
//! # Ok::<(), modelfusion::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::model::Model;

mod curves;
mod fit;
mod plane;

pub use crate::objective::StochasticGradient;
pub use crate::optim::{LrSchedule, ModelOptimizer, Optimizer};
pub use curves::{
    Bezier, ControlCurve, Linear, PolyChain, bernstein, polychain_coefficients,
    straight_line_controls,
};
pub use fit::{
    BendInit, FitConfig, FitResult, FitStep, curve_loss_and_gradients, fit_curve,
    fit_curve_stochastic,
};
pub use plane::{LossSurface, Plane, loss_surface};

/// A path in weight space written as `phi(t) = sum_k c_k(t) * theta_k` over control
/// models `theta_k`; `phi(0)` and `phi(1)` are the endpoints.
///
/// ```
/// use modelfusion::path::{PathSampler, PolyChain};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let m = |x: f64| StateDict::from_pairs([("w", arr1(&[x]).into_dyn())]).unwrap();
/// let chain = PolyChain::new(vec![m(0.0), m(4.0), m(2.0)])?;
/// assert_eq!(chain.controls().len(), 3);
/// assert_eq!(chain.coefficients(0.75)?, vec![0.0, 0.5, 0.5]);
/// assert_eq!(chain.point(0.75)?.get("w").unwrap()[[0]], 3.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub trait PathSampler<M: Model> {
    /// The control models, endpoints first and last.
    fn controls(&self) -> &[M];
    /// The coefficients `c_k(t)` for `t` in `[0, 1]`, one per control.
    fn coefficients(&self, t: f64) -> Result<Vec<f64>>;
    /// The model at `t`.
    ///
    /// When the coefficients select a single control (one coefficient exactly 1, the
    /// others exactly 0, as at the endpoints), that control is returned unchanged, bit
    /// for bit; otherwise the weighted sum of the controls.
    fn point(&self, t: f64) -> Result<M> {
        let c = self.coefficients(t)?;
        let controls = self.controls();
        check_coefficients(&c, controls.len())?;
        if let Some(k) = selected_control(&c) {
            return Ok(controls[k].clone());
        }
        let refs: Vec<&M> = controls.iter().collect();
        M::weighted_sum(&refs, &c)
    }
}

/// Errors unless there is one coefficient per control.
pub(crate) fn check_coefficients(c: &[f64], num_controls: usize) -> Result<()> {
    if c.len() == num_controls {
        Ok(())
    } else {
        Err(Error::invalid(
            "coefficients",
            format!("{} coefficients for {num_controls} controls", c.len()),
        ))
    }
}

/// The index `k` when `c` is the unit vector `e_k` (exactly), else `None`.
fn selected_control(c: &[f64]) -> Option<usize> {
    let k = c.iter().position(|&x| x == 1.0)?;
    c.iter()
        .enumerate()
        .all(|(i, &x)| i == k || x == 0.0)
        .then_some(k)
}

/// Errors unless `t` is finite and within `[0, 1]`.
///
/// ```
/// use modelfusion::path::check_t;
/// assert!(check_t(0.5).is_ok());
/// assert!(check_t(1.5).unwrap_err().to_string().contains("`t`"));
/// assert!(check_t(f64::NAN).is_err());
/// ```
pub fn check_t(t: f64) -> Result<()> {
    if t.is_finite() && (0.0..=1.0).contains(&t) {
        Ok(())
    } else {
        Err(Error::invalid(
            "t",
            format!("must be a finite number in [0, 1], got {t}"),
        ))
    }
}

/// The gradient of `L(phi(t))` with respect to every control of `path`:
/// `c_k(t) * grad`, where `grad` is the gradient of `L` at `phi(t)`.
///
/// ```
/// use modelfusion::path::{control_gradients, Linear};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let m = |x: f64| StateDict::from_pairs([("w", arr1(&[x]).into_dyn())]).unwrap();
/// let line = Linear::new(m(0.0), m(1.0))?;
/// let g = control_gradients(&line, 0.25, &m(8.0))?;
/// assert_eq!(g[0].get("w").unwrap()[[0]], 6.0);
/// assert_eq!(g[1].get("w").unwrap()[[0]], 2.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn control_gradients<M: Model, P: PathSampler<M> + ?Sized>(
    path: &P,
    t: f64,
    grad: &M,
) -> Result<Vec<M>> {
    let c = path.coefficients(t)?;
    if let Some(first) = path.controls().first() {
        first
            .check_compatible(grad)
            .map_err(|e| context(e, "the gradient"))?;
    }
    c.iter().map(|&ck| grad.scale(ck)).collect()
}

/// Validates a list of controls: at least two, every one with the names and shapes of
/// the first endpoint. Errors name the control index and the parameter.
pub(crate) fn validate_controls<M: Model>(controls: &[M]) -> Result<()> {
    if controls.len() < 2 {
        return Err(Error::invalid(
            "controls",
            format!(
                "a path needs at least two controls (the endpoints), got {}",
                controls.len()
            ),
        ));
    }
    let first = &controls[0];
    let last = controls.len() - 1;
    for (k, m) in controls.iter().enumerate().skip(1) {
        let who = if k == last {
            format!("control {k} (the end point)")
        } else {
            format!("control {k}")
        };
        first
            .check_compatible(m)
            .map_err(|e| context(e, &format!("{who} vs control 0 (the start point)")))?;
    }
    Ok(())
}

/// Adds `what` to the message of a structural error.
fn context(e: Error, what: &str) -> Error {
    match e {
        Error::ShapeMismatch {
            what: w,
            expected,
            got,
        } => Error::ShapeMismatch {
            what: format!("{w}, {what}"),
            expected,
            got,
        },
        Error::NameMismatch { detail } => Error::NameMismatch {
            detail: format!("{what}: {detail}"),
        },
        Error::MissingParam { name, context } => Error::MissingParam {
            name,
            context: format!("{context} ({what})"),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{StateDict, StateDictF64};
    use ndarray::arr1;

    /// A user-defined path: a circle arc through the controls' span (coefficients that
    /// are not a partition of unity), or a broken one with the wrong count.
    struct Custom(Vec<StateDictF64>, bool);
    impl PathSampler<StateDictF64> for Custom {
        fn controls(&self) -> &[StateDictF64] {
            &self.0
        }
        fn coefficients(&self, t: f64) -> Result<Vec<f64>> {
            check_t(t)?;
            let a = std::f64::consts::FRAC_PI_2 * t;
            Ok(if self.1 {
                vec![a.cos(), a.sin()]
            } else {
                vec![1.0]
            })
        }
    }

    #[test]
    fn custom_paths() {
        let m = |x: f64| StateDict::from_pairs([("w", arr1(&[x, 1.0 - x]).into_dyn())]).unwrap();
        let arc = Custom(vec![m(1.0), m(0.0)], true);
        let mid = arc.point(0.5).unwrap();
        assert!((mid.norm() - 1.0).abs() < 1e-15);
        assert_eq!(arc.point(0.0).unwrap(), m(1.0));
        let broken = Custom(vec![m(1.0), m(0.0)], false);
        let e = broken.point(0.3).unwrap_err().to_string();
        assert!(e.contains("1 coefficients for 2 controls"), "{e}");
    }

    #[test]
    fn unit_vector_detection() {
        assert_eq!(selected_control(&[1.0, 0.0, 0.0]), Some(0));
        assert_eq!(selected_control(&[0.0, 0.0, 1.0]), Some(2));
        assert_eq!(selected_control(&[0.5, 0.5]), None);
        assert_eq!(selected_control(&[1.0, 1e-300]), None);
        assert_eq!(selected_control(&[]), None);
    }
}
