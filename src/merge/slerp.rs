//! Spherical interpolation: [`Slerp`] between two models and the weighted spherical
//! (Karcher) mean [`KarcherMean`] of any number, both per tensor.

use super::TensorMerger;
use super::kernel::{self, check_shapes};
use crate::error::{Error, Result};
use crate::tensor::{Scalar, Tensor};

/// Above this `|cos|` between the two tensors SLERP falls back to linear interpolation
/// (mergekit's threshold).
pub const SLERP_LERP_THRESHOLD: f64 = 0.9995;

/// SLERP between exactly two models, per tensor (as mergekit):
/// with `Omega = arccos(cos(a, b))`,
/// `slerp(a, b; t) = sin((1 - t) Omega) / sin(Omega) * a + sin(t Omega) / sin(Omega) * b`,
/// falling back to `(1 - t) a + t b` when `|cos| > 0.9995`. `t = 0` returns `a` and
/// `t = 1` returns `b` exactly.
///
/// Like mergekit, a tensor of norm `<= 1e-8` is divided by 1 instead of its norm, so a
/// zero tensor counts as orthogonal to the other (`cos = 0`) and the other comes out
/// scaled by `sin(t pi / 2)` (or `sin((1 - t) pi / 2)`) rather than `t`;
/// [`with_zero_lerp`](Slerp::with_zero_lerp) interpolates linearly there instead.
///
/// ```
/// use modelfusion::merge::{Merger, Slerp};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let a = StateDict::from_pairs([("w", arr1(&[1.0f64, 0.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[0.0f64, 1.0]).into_dyn())])?;
/// let mid = Slerp::new(0.5)?.merge(&[&a, &b])?;
/// let h = 0.5f64.sqrt();
/// assert!((mid.get("w").unwrap()[[0]] - h).abs() < 1e-12 && (mid.get("w").unwrap()[[1]] - h).abs() < 1e-12);
/// assert!(Slerp::new(1.5).is_err());
/// assert!(Slerp::new(0.5)?.merge(&[&a]).is_err()); // needs two models
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slerp {
    t: f64,
    zero_lerp: bool,
}

impl Slerp {
    /// SLERP at `t` in `[0, 1]`.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Slerp::new(0.3)?.t(), 0.3);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(t: f64) -> Result<Self> {
        crate::error::check_fraction("t", t)?;
        Ok(Slerp {
            t,
            zero_lerp: false,
        })
    }

    /// Interpolates linearly when either tensor is zero (instead of mergekit's
    /// `cos = 0`).
    ///
    /// ```
    /// use modelfusion::merge::{Merger, Slerp};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let a = StateDict::from_pairs([("w", arr1(&[0.0f64, 0.0]).into_dyn())])?;
    /// let b = StateDict::from_pairs([("w", arr1(&[0.0f64, 2.0]).into_dyn())])?;
    /// let mk = Slerp::new(0.5)?.merge(&[&a, &b])?;
    /// assert!((mk.get("w").unwrap()[[1]] - 2.0 * 0.5f64.sqrt()).abs() < 1e-7);
    /// let lerp = Slerp::new(0.5)?.with_zero_lerp(true).merge(&[&a, &b])?;
    /// assert_eq!(lerp.get("w").unwrap()[[1]], 1.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_zero_lerp(mut self, zero_lerp: bool) -> Self {
        self.zero_lerp = zero_lerp;
        self
    }

    /// The interpolation parameter.
    ///
    /// ```
    /// assert_eq!(modelfusion::merge::Slerp::new(1.0)?.t(), 1.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn t(&self) -> f64 {
        self.t
    }

    /// The coefficients `(c_a, c_b)` SLERP applies to two tensors with cosine `cos`
    /// (`None`: interpolate linearly, as [`with_zero_lerp`](Slerp::with_zero_lerp) does
    /// when either tensor is zero).
    ///
    /// ```
    /// use modelfusion::merge::Slerp;
    /// let s = Slerp::new(0.25)?;
    /// assert_eq!(s.coefficients(Some(1.0)), (0.75, 0.25)); // collinear: lerp
    /// assert_eq!(s.coefficients(None), (0.75, 0.25));
    /// let (ca, cb) = s.coefficients(Some(0.0));
    /// assert!((ca - (0.75f64 * std::f64::consts::FRAC_PI_2).sin()).abs() < 1e-15);
    /// assert!((cb - (0.25f64 * std::f64::consts::FRAC_PI_2).sin()).abs() < 1e-15);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn coefficients(&self, cos: Option<f64>) -> (f64, f64) {
        let t = self.t;
        match cos {
            Some(c) if c.abs() <= SLERP_LERP_THRESHOLD => {
                let omega = c.clamp(-1.0, 1.0).acos();
                let so = omega.sin();
                (((1.0 - t) * omega).sin() / so, (t * omega).sin() / so)
            }
            _ => (1.0 - t, t),
        }
    }
}

/// `[a.b, a.a, b.b]` accumulated in `f64` in a fixed order.
fn dot_norms<E: Scalar>(a: &[E], b: &[E]) -> (f64, f64, f64) {
    let s = kernel::sum_chunks(a.len(), 3, |st, e| {
        let mut acc = vec![0.0; 3];
        for (&x, &y) in a[st..e].iter().zip(&b[st..e]) {
            let (x, y) = (x.to_f64_lossless(), y.to_f64_lossless());
            acc[0] += x * y;
            acc[1] += x * x;
            acc[2] += y * y;
        }
        acc
    });
    (s[0], s[1], s[2])
}

impl<T: Tensor> TensorMerger<T> for Slerp {
    fn merge_tensor(&self, name: &str, tensors: &[&T]) -> Result<T> {
        check_shapes(name, tensors)?;
        kernel::check_model_count(
            "SLERP",
            name,
            tensors.len(),
            2,
            "; use KarcherMean for more",
        )?;
        let a = kernel::elems(tensors[0]);
        let b = kernel::elems(tensors[1]);
        let (ab, aa, bb) = dot_norms(&a, &b);
        // mergekit: norms <= 1e-8 are replaced by 1.
        let norm = |x: f64| if x.sqrt() > 1e-8 { x.sqrt() } else { 1.0 };
        let cos = if self.zero_lerp && (aa == 0.0 || bb == 0.0) {
            None
        } else {
            Some(ab / (norm(aa) * norm(bb)))
        };
        let (ca, cb) = self.coefficients(cos);
        let out: T = kernel::weighted_sum(tensors, &[ca, cb])?;
        kernel::check_merged(name, tensors, &[], &kernel::elems(&out), || {
            kernel::overflow_error("t", self.t, name)
        })?;
        Ok(out)
    }
}

/// Multi-model SLERP as the weighted Karcher (Frechet) mean on the unit sphere, per
/// tensor: directions `u_i = theta_i / |theta_i|`, the mean direction `m` minimising
/// `sum_i w_i arccos(<m, u_i>)^2`, found by Riemannian gradient steps
/// `m <- exp_m(sum_i w_i log_m(u_i))` from the normalised Euclidean mean, and the
/// result `(sum_i w_i |theta_i|) m`. Weights are normalised to sum to 1. For two
/// tensors of equal norm with weights `(1 - t, t)` this is [`Slerp`] at `t`.
///
/// Two rule sets:
/// - strict ([`uniform`](KarcherMean::uniform), [`weighted`](KarcherMean::weighted)):
///   a tensor with a zero input falls back to the weighted linear average; directions
///   whose Euclidean mean vanishes (e.g. antipodal) are an error, and so is hitting the
///   iteration cap before the step falls below the tolerance;
/// - mergekit's `karcher` ([`mergekit`](KarcherMean::mergekit)): equal weights; inputs
///   of norm `<= tol` drop out of the direction (their norms still count in the
///   scale; all of them small gives zeros), a vanishing Euclidean mean starts from the
///   first direction, directions within `tol` radians of the mean add no step, and the
///   last iterate is returned when the cap is hit.
///
/// A single model is returned unchanged.
///
/// ```
/// use modelfusion::merge::{KarcherMean, Merger};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let a = StateDict::from_pairs([("w", arr1(&[2.0f64, 0.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[0.0f64, 2.0]).into_dyn())])?;
/// let m = KarcherMean::uniform().merge(&[&a, &b])?;
/// let h = 2.0 * 0.5f64.sqrt();
/// assert!((m.get("w").unwrap()[[0]] - h).abs() < 1e-9 && (m.get("w").unwrap()[[1]] - h).abs() < 1e-9);
/// assert!(KarcherMean::weighted(vec![1.0, -1.0]).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct KarcherMean {
    weights: Option<Vec<f64>>,
    max_iter: usize,
    tol: f64,
    mergekit: bool,
}

impl KarcherMean {
    /// Equal weights; tolerance `1e-10` on the step length (radians), 100 iterations.
    ///
    /// ```
    /// let k = modelfusion::merge::KarcherMean::uniform();
    /// # let _ = k;
    /// ```
    pub fn uniform() -> Self {
        KarcherMean {
            weights: None,
            max_iter: 100,
            tol: 1e-10,
            mergekit: false,
        }
    }

    /// Non-negative weights (normalised to sum 1), one per model; errors if negative,
    /// non-finite or all zero.
    ///
    /// ```
    /// assert!(modelfusion::merge::KarcherMean::weighted(vec![0.0, 0.0]).is_err());
    /// ```
    pub fn weighted(weights: Vec<f64>) -> Result<Self> {
        Ok(KarcherMean {
            weights: Some(kernel::normalized_nonnegative(&weights)?),
            ..Self::uniform()
        })
    }

    /// mergekit 0.1.5's `karcher` (equal weights; defaults `max_iter: 10`,
    /// `tol: 1e-5`): at most `max_iter` steps (0: the normalised Euclidean mean of the
    /// directions), `tol > 0` both the stopping step length and the smallest norm and
    /// angle that count, and no error at the cap (see the type's rules).
    ///
    /// ```
    /// use modelfusion::merge::{KarcherMean, Merger};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    ///
    /// let a = StateDict::from_pairs([("w", arr1(&[3.0f64, 0.0]).into_dyn())])?;
    /// let z = StateDict::from_pairs([("w", arr1(&[0.0f64, 0.0]).into_dyn())])?;
    /// // The zero tensor has no direction; its norm 0 still halves the scale.
    /// let m = KarcherMean::mergekit(10, 1e-5)?.merge(&[&a, &z])?;
    /// assert_eq!(m.get("w").unwrap().as_slice().unwrap(), &[1.5, 0.0]);
    /// assert!(KarcherMean::mergekit(10, 0.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn mergekit(max_iter: usize, tol: f64) -> Result<Self> {
        check_tol(tol)?;
        Ok(KarcherMean {
            weights: None,
            max_iter,
            tol,
            mergekit: true,
        })
    }

    /// Sets the stopping tolerance (`> 0`) and the iteration cap (`>= 1`); the merge
    /// errors with [`Error::NotConverged`] if the cap is hit (strict rules).
    ///
    /// ```
    /// use modelfusion::merge::KarcherMean;
    /// assert!(KarcherMean::uniform().with_tolerance(1e-8, 50).is_ok());
    /// assert!(KarcherMean::uniform().with_tolerance(0.0, 50).is_err());
    /// ```
    pub fn with_tolerance(mut self, tol: f64, max_iter: usize) -> Result<Self> {
        check_tol(tol)?;
        if max_iter == 0 && !self.mergekit {
            return Err(Error::invalid(
                "max_iter",
                "must be >= 1 (strict rules stop with an error at the cap), got 0",
            ));
        }
        self.tol = tol;
        self.max_iter = max_iter;
        Ok(self)
    }
}

fn check_tol(tol: f64) -> Result<()> {
    if tol > 0.0 && tol.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(
            "tol",
            format!("must be a finite number > 0, got {tol}"),
        ))
    }
}

impl<T: Tensor> TensorMerger<T> for KarcherMean {
    fn merge_tensor(&self, name: &str, tensors: &[&T]) -> Result<T> {
        check_shapes(name, tensors)?;
        let k = tensors.len();
        let w = match &self.weights {
            Some(w) => {
                kernel::check_count(w.len(), k, "weights", name)?;
                w.clone()
            }
            None => vec![1.0 / k as f64; k],
        };
        if k == 1 {
            return Ok(tensors[0].clone());
        }
        let data = kernel::all_elems(tensors);
        let xs: Vec<&[T::Elem]> = data.iter().map(|c| c.as_ref()).collect();
        let n = xs[0].len();
        let norms: Vec<f64> = xs
            .iter()
            .map(|x| {
                kernel::sum_chunks(n, 1, |s, e| {
                    vec![x[s..e].iter().map(|v| v.to_f64_lossless().powi(2)).sum()]
                })[0]
                    .sqrt()
            })
            .collect();
        if norms.iter().any(|r| !r.is_finite()) {
            return Err(
                kernel::nonfinite_input(name, tensors, &[]).unwrap_or_else(|| {
                    Error::invalid(
                        "models",
                        format!(
                            "the norms of parameter `{name}` overflow f64 (elements too large)"
                        ),
                    )
                }),
            );
        }
        // The weights of the directions: every model (strict), or mergekit's models of
        // norm > tol, renormalised.
        let dw: Vec<f64> = if self.mergekit {
            let valid: Vec<f64> = w
                .iter()
                .zip(&norms)
                .map(|(&wi, &r)| if r > self.tol { wi } else { 0.0 })
                .collect();
            let s: f64 = valid.iter().sum();
            if s == 0.0 {
                return kernel::build(tensors[0].shape(), kernel::zeros(n));
            }
            valid.iter().map(|v| v / s).collect()
        } else {
            if n == 0 || norms.contains(&0.0) {
                return kernel::weighted_sum(tensors, &w);
            }
            w.clone()
        };
        // Start at the normalised Euclidean mean of the directions.
        let coef: Vec<f64> = dw
            .iter()
            .zip(&norms)
            .map(|(w, r)| if *w > 0.0 { w / r } else { 0.0 })
            .collect();
        let mut m = vec![0.0f64; n];
        kernel::for_chunks(&mut m, |_, s, o| {
            for (j, v) in o.iter_mut().enumerate() {
                *v = xs
                    .iter()
                    .zip(&coef)
                    .map(|(x, c)| c * x[s + j].to_f64_lossless())
                    .sum();
            }
        });
        let mn = norm(&m);
        if self.mergekit && mn < self.tol {
            let first = dw.iter().position(|&w| w > 0.0).unwrap_or(0);
            for (v, x) in m.iter_mut().zip(xs[first]) {
                *v = x.to_f64_lossless() / norms[first];
            }
        } else if mn < 1e-12 {
            return Err(Error::Infeasible {
                reason: format!(
                    "the directions of parameter `{name}` cancel out (e.g. antipodal); their spherical mean is undefined"
                ),
            });
        } else {
            m.iter_mut().for_each(|v| *v /= mn);
        }
        // Directions this close to the mean add nothing (mergekit) or their limit w_i.
        let close = if self.mergekit { self.tol } else { 1e-12 };
        let mut converged = false;
        let mut step = f64::INFINITY;
        for _ in 0..self.max_iter {
            // cos_i = <m, u_i>; log_m(u_i) = theta_i / sin theta_i (u_i - cos_i m).
            let cos: Vec<f64> = xs
                .iter()
                .zip(&norms)
                .zip(&dw)
                .map(|((x, r), &wi)| {
                    if wi > 0.0 {
                        (dot_f64(&m, x) / r).clamp(-1.0, 1.0)
                    } else {
                        1.0
                    }
                })
                .collect();
            let a: Vec<f64> = cos
                .iter()
                .zip(&dw)
                .map(|(&c, &wi)| {
                    let th = c.acos();
                    match (th < close, self.mergekit) {
                        (true, true) => 0.0,
                        (true, false) => wi,
                        (false, _) => wi * th / th.sin(),
                    }
                })
                .collect();
            let ua: Vec<f64> = a
                .iter()
                .zip(&norms)
                .map(|(&a, r)| if a == 0.0 { 0.0 } else { a / r })
                .collect();
            let shift: f64 = a.iter().zip(&cos).map(|(a, c)| a * c).sum();
            // v = sum_i a_i u_i - shift * m, computed chunk-wise.
            let mut v = vec![0.0f64; n];
            kernel::for_chunks(&mut v, |_, s, o| {
                for (j, out) in o.iter_mut().enumerate() {
                    let i = s + j;
                    let mut acc = -shift * m[i];
                    for (x, c) in xs.iter().zip(&ua) {
                        if *c != 0.0 {
                            acc += c * x[i].to_f64_lossless();
                        }
                    }
                    *out = acc;
                }
            });
            step = norm(&v);
            if step < self.tol {
                converged = true;
                break;
            }
            let (c, sn) = (step.cos(), step.sin() / step);
            kernel::for_chunks(&mut m, |_, s, o| {
                for (j, mv) in o.iter_mut().enumerate() {
                    *mv = c * *mv + sn * v[s + j];
                }
            });
            let mn = norm(&m);
            if !self.mergekit || mn > self.tol {
                m.iter_mut().for_each(|v| *v /= mn);
            }
        }
        if !converged && !self.mergekit {
            return Err(Error::NotConverged {
                method: format!("Karcher mean of parameter `{name}`"),
                iterations: self.max_iter,
                error: step,
            });
        }
        let r: f64 = w.iter().zip(&norms).map(|(w, r)| w * r).sum();
        let out: Vec<T::Elem> = m.iter().map(|&v| T::Elem::from_f64_lossy(r * v)).collect();
        kernel::check_merged(name, tensors, &[], &out, || {
            kernel::overflow_error("weights", format!("{w:?}"), name)
        })?;
        kernel::build(tensors[0].shape(), out)
    }
}

fn dot_f64<E: Scalar>(m: &[f64], x: &[E]) -> f64 {
    kernel::sum_chunks(m.len(), 1, |s, e| {
        vec![
            m[s..e]
                .iter()
                .zip(&x[s..e])
                .map(|(a, b)| a * b.to_f64_lossless())
                .sum(),
        ]
    })[0]
}

fn norm(v: &[f64]) -> f64 {
    dot_f64(v, v).sqrt()
}
