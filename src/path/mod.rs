//! Paths in weight space between models: `phi(t) = sum_k c_k(t) * theta_k` over control
//! models.

use crate::error::{Error, Result};
use crate::model::Model;

/// A path in weight space written as `phi(t) = sum_k c_k(t) * theta_k` over control
/// models `theta_k`; `phi(0)` and `phi(1)` are the endpoints.
pub trait PathSampler<M: Model> {
    /// The control models, endpoints first and last.
    fn controls(&self) -> &[M];
    /// The coefficients `c_k(t)` for `t` in `[0, 1]`, one per control.
    fn coefficients(&self, t: f64) -> Result<Vec<f64>>;
    /// The model at `t`.
    fn point(&self, t: f64) -> Result<M> {
        let c = self.coefficients(t)?;
        let controls = self.controls();
        if c.len() != controls.len() {
            return Err(Error::invalid(
                "coefficients",
                format!("{} coefficients for {} controls", c.len(), controls.len()),
            ));
        }
        let refs: Vec<&M> = controls.iter().collect();
        M::weighted_sum(&refs, &c)
    }
}
