//! The ready paths: [`Linear`], [`Bezier`] and [`PolyChain`].

use crate::error::{Error, Result};
use crate::model::Model;

use super::{PathSampler, check_t, validate_controls};

/// A path whose controls can be replaced: what [`fit_curve`](super::fit_curve) trains.
///
/// The coefficient function `c(t)` of a `ControlCurve` depends only on `t` and the number
/// of controls, never on the controls' values.
///
/// ```
/// use modelfusion::path::{Bezier, ControlCurve, PathSampler};
/// use modelfusion::StateDict;
/// use ndarray::arr1;
///
/// let m = |x: f64| StateDict::from_pairs([("w", arr1(&[x]).into_dyn())]).unwrap();
/// let curve = Bezier::straight(&m(0.0), &m(2.0), 3)?;
/// let bent = curve.with_controls(vec![m(0.0), m(5.0), m(2.0)])?;
/// assert_eq!(bent.controls()[1], m(5.0));
/// assert!(curve.with_controls(vec![m(0.0)]).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub trait ControlCurve<M: Model>: PathSampler<M> + Sized {
    /// The same kind of path over new controls (validated like the constructor).
    fn with_controls(&self, controls: Vec<M>) -> Result<Self>;
}

/// `n` controls evenly spaced on the straight line from `start` to `end`
/// (`theta_k = lerp(start, end, k / (n - 1))`), the endpoints cloned exactly.
///
/// Both the Bezier curve and the polygonal chain over these controls are the straight
/// line itself (Bernstein polynomials reproduce linear functions).
///
/// ```
/// use modelfusion::path::straight_line_controls;
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let m = |x: f64| StateDict::from_pairs([("w", arr1(&[x]).into_dyn())]).unwrap();
/// let c = straight_line_controls(&m(0.0), &m(3.0), 4)?;
/// let xs: Vec<f64> = c.iter().map(|c| c.get("w").unwrap()[[0]]).collect();
/// assert_eq!(xs, vec![0.0, 1.0, 2.0, 3.0]);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn straight_line_controls<M: Model>(start: &M, end: &M, n: usize) -> Result<Vec<M>> {
    if n < 2 {
        return Err(Error::invalid(
            "num_controls",
            format!("a path needs at least two controls (the endpoints), got {n}"),
        ));
    }
    let mut controls = vec![start.clone()];
    for k in 1..n - 1 {
        controls.push(start.lerp(end, k as f64 / (n - 1) as f64)?);
    }
    controls.push(end.clone());
    validate_controls(&controls)?;
    Ok(controls)
}

/// The straight line `phi(t) = (1 - t) theta_0 + t theta_1`.
///
/// ```
/// use modelfusion::path::{Linear, PathSampler};
/// use modelfusion::{Model, StateDict};
/// use ndarray::{arr1, arr2};
///
/// let a = StateDict::from_pairs([("w", arr1(&[0.0f32, 4.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[2.0f32, 0.0]).into_dyn())])?;
/// let line = Linear::new(a.clone(), b)?;
/// assert_eq!(line.point(0.5)?.get("w").unwrap().as_slice().unwrap(), &[1.0, 2.0]);
/// // Endpoints of a different structure are rejected, naming the parameter.
/// let c = StateDict::from_pairs([("w", arr2(&[[0.0f32, 4.0]]).into_dyn())])?;
/// assert!(Linear::new(a, c).unwrap_err().to_string().contains("`w`"));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Linear<M> {
    controls: [M; 2],
}

impl<M: Model> Linear<M> {
    /// The line from `start` to `end`; errors unless both have the same names and shapes.
    pub fn new(start: M, end: M) -> Result<Self> {
        let controls = [start, end];
        validate_controls(&controls)?;
        Ok(Linear { controls })
    }
}

impl<M: Model> PathSampler<M> for Linear<M> {
    fn controls(&self) -> &[M] {
        &self.controls
    }
    fn coefficients(&self, t: f64) -> Result<Vec<f64>> {
        check_t(t)?;
        Ok(vec![1.0 - t, t])
    }
}

impl<M: Model> ControlCurve<M> for Linear<M> {
    fn with_controls(&self, controls: Vec<M>) -> Result<Self> {
        let [start, end]: [M; 2] = controls.try_into().map_err(|c: Vec<M>| {
            Error::invalid(
                "controls",
                format!("a linear path has exactly two controls, got {}", c.len()),
            )
        })?;
        Linear::new(start, end)
    }
}

/// A Bezier curve of any degree: `c_k(t) = C(n-1, k) t^k (1-t)^(n-1-k)` over `n >= 2`
/// controls (the Bernstein basis). With two controls it is [`Linear`]; with three, the
/// quadratic curve of Garipov et al. (2018).
///
/// The basis is evaluated with the de Casteljau recursion
/// `B_{j}^{d+1} = (1-t) B_j^d + t B_{j-1}^d`, which never forms a binomial coefficient
/// (no overflow at high degree) and is exactly `e_0` at `t = 0` and `e_{n-1}` at `t = 1`.
///
/// ```
/// use modelfusion::path::{Bezier, PathSampler};
/// use modelfusion::StateDict;
/// use ndarray::arr1;
///
/// let m = |x: f64| StateDict::from_pairs([("w", arr1(&[x]).into_dyn())]).unwrap();
/// let cubic = Bezier::new(vec![m(0.0), m(1.0), m(1.0), m(0.0)])?;
/// assert_eq!(cubic.coefficients(0.5)?, vec![0.125, 0.375, 0.375, 0.125]);
/// assert!(Bezier::new(vec![m(0.0)]).is_err()); // fewer than two controls
/// assert!(cubic.point(1.5).is_err()); // t outside [0, 1]
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Bezier<M> {
    controls: Vec<M>,
}

impl<M: Model> Bezier<M> {
    /// The curve over `controls` (endpoints first and last); errors when there are fewer
    /// than two or when a control's names or shapes differ from the start point's.
    pub fn new(controls: Vec<M>) -> Result<Self> {
        validate_controls(&controls)?;
        Ok(Bezier { controls })
    }

    /// A curve with `num_controls` controls laid evenly on the straight line from
    /// `start` to `end` (so it *is* the straight line until its bends are trained).
    ///
    /// ```
    /// use modelfusion::path::{Bezier, PathSampler};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let m = |x: f64| StateDict::from_pairs([("w", arr1(&[x]).into_dyn())]).unwrap();
    /// let c = Bezier::straight(&m(0.0), &m(4.0), 3)?;
    /// assert_eq!(c.point(0.25)?.get("w").unwrap()[[0]], 1.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn straight(start: &M, end: &M, num_controls: usize) -> Result<Self> {
        Self::new(straight_line_controls(start, end, num_controls)?)
    }
}

/// The Bernstein basis of degree `n - 1` at `t` (de Casteljau recursion).
///
/// ```
/// use modelfusion::path::bernstein;
/// assert_eq!(bernstein(3, 0.5), vec![0.25, 0.5, 0.25]);
/// assert_eq!(bernstein(4, 0.0), vec![1.0, 0.0, 0.0, 0.0]);
/// assert!(bernstein(0, 0.5).is_empty());
/// ```
pub fn bernstein(n: usize, t: f64) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    let s = 1.0 - t;
    let mut b = vec![0.0; n];
    b[0] = 1.0;
    for d in 1..n {
        // Degree d from degree d - 1, in place from the top down.
        b[d] = t * b[d - 1];
        for j in (1..d).rev() {
            b[j] = s * b[j] + t * b[j - 1];
        }
        b[0] *= s;
    }
    b
}

impl<M: Model> PathSampler<M> for Bezier<M> {
    fn controls(&self) -> &[M] {
        &self.controls
    }
    fn coefficients(&self, t: f64) -> Result<Vec<f64>> {
        check_t(t)?;
        Ok(bernstein(self.controls.len(), t))
    }
}

impl<M: Model> ControlCurve<M> for Bezier<M> {
    fn with_controls(&self, controls: Vec<M>) -> Result<Self> {
        Bezier::new(controls)
    }
}

/// A polygonal chain through its controls, visited at `t = k / (n - 1)`:
/// `c_k(t) = max(0, 1 - abs(t (n-1) - k))`. Every control lies on the path (at its knot
/// the point is that control, bit for bit).
///
/// ```
/// use modelfusion::path::{PathSampler, PolyChain};
/// use modelfusion::StateDict;
/// use ndarray::arr1;
///
/// let m = |x: f64| StateDict::from_pairs([("w", arr1(&[x]).into_dyn())]).unwrap();
/// let chain = PolyChain::new(vec![m(0.0), m(10.0), m(2.0)])?;
/// assert_eq!(chain.point(0.5)?, m(10.0));
/// assert_eq!(chain.coefficients(0.25)?, vec![0.5, 0.5, 0.0]);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct PolyChain<M> {
    controls: Vec<M>,
}

impl<M: Model> PolyChain<M> {
    /// The chain over `controls` (endpoints first and last); errors when there are fewer
    /// than two or when a control's names or shapes differ from the start point's.
    pub fn new(controls: Vec<M>) -> Result<Self> {
        validate_controls(&controls)?;
        Ok(PolyChain { controls })
    }

    /// A chain with `num_controls` controls laid evenly on the straight line from
    /// `start` to `end`.
    ///
    /// ```
    /// use modelfusion::path::{PathSampler, PolyChain};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let m = |x: f64| StateDict::from_pairs([("w", arr1(&[x]).into_dyn())]).unwrap();
    /// let c = PolyChain::straight(&m(0.0), &m(4.0), 3)?;
    /// assert_eq!(c.point(0.5)?.get("w").unwrap()[[0]], 2.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn straight(start: &M, end: &M, num_controls: usize) -> Result<Self> {
        Self::new(straight_line_controls(start, end, num_controls)?)
    }
}

/// The hat-function coefficients of a polygonal chain with `n >= 2` knots at `t`:
/// `max(0, 1 - abs(t (n-1) - k))`, computed on the active segment so that they sum to 1
/// up to one rounding. Within a few ulps of a knot `t = k / (n - 1)`, `t (n - 1)` is
/// taken to be exactly `k` (so the chain passes through every control bit for bit).
///
/// ```
/// use modelfusion::path::polychain_coefficients;
/// assert_eq!(polychain_coefficients(3, 0.25), vec![0.5, 0.5, 0.0]);
/// assert_eq!(polychain_coefficients(3, 1.0), vec![0.0, 0.0, 1.0]);
/// ```
pub fn polychain_coefficients(n: usize, t: f64) -> Vec<f64> {
    let mut c = vec![0.0; n];
    if n < 2 {
        if let Some(c0) = c.first_mut() {
            *c0 = 1.0;
        }
        return c;
    }
    let m = (n - 1) as f64;
    let mut s = t * m;
    // Snap to a knot when `t` is the rounded `k / (n - 1)` (whose product with `n - 1`
    // may miss `k` by an ulp), so that every control is reached exactly.
    let nearest = s.round();
    if (s - nearest).abs() <= 2.0 * f64::EPSILON * m {
        s = nearest;
    }
    // Segment [k, k + 1] holding s; the last knot belongs to the last segment.
    let k = (s.floor().max(0.0) as usize).min(n - 2);
    let frac = s - k as f64;
    c[k] = 1.0 - frac;
    c[k + 1] = frac;
    c
}

impl<M: Model> PathSampler<M> for PolyChain<M> {
    fn controls(&self) -> &[M] {
        &self.controls
    }
    fn coefficients(&self, t: f64) -> Result<Vec<f64>> {
        check_t(t)?;
        Ok(polychain_coefficients(self.controls.len(), t))
    }
}

impl<M: Model> ControlCurve<M> for PolyChain<M> {
    fn with_controls(&self, controls: Vec<M>) -> Result<Self> {
        PolyChain::new(controls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bernstein_matches_binomial_formula() {
        for n in 1..12usize {
            for &t in &[0.0, 0.1, 0.37, 0.5, 0.9, 1.0] {
                let b = bernstein(n, t);
                for (k, &bk) in b.iter().enumerate() {
                    let d = (n - 1) as i32;
                    let binom =
                        (0..k).fold(1.0, |acc, i| acc * (d as f64 - i as f64) / (i + 1) as f64);
                    let want = binom * t.powi(k as i32) * (1.0 - t).powi(d - k as i32);
                    assert!(
                        (bk - want).abs() < 1e-13,
                        "n={n} t={t} k={k}: {bk} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn polychain_matches_hat_formula() {
        for n in 2..9usize {
            for i in 0..=64 {
                let t = i as f64 / 64.0;
                let c = polychain_coefficients(n, t);
                for (k, &ck) in c.iter().enumerate() {
                    let want = (1.0 - (t * (n - 1) as f64 - k as f64).abs()).max(0.0);
                    assert!((ck - want).abs() < 1e-15, "n={n} t={t} k={k}");
                }
            }
        }
    }
}
