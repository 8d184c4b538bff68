//! Loss planes (Garipov et al. 2018): the affine plane through three models in weight
//! space, and an objective evaluated on a grid in it.

use ndarray::Array2;

use crate::error::{Error, Result, check_finite};
use crate::model::Model;
use crate::objective::Objective;

/// The plane through three models `a`, `b`, `c`: `a + x u + y v`, with `u` the unit
/// vector from `a` to `b` and `v` the unit vector of `c - a` orthogonal to `u`
/// (Gram-Schmidt in the flattened parameter space), so distances in the plane are
/// Euclidean distances between models.
///
/// ```
/// use modelfusion::path::Plane;
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
/// let m = |w: [f64; 3]| StateDict::from_pairs([("w", arr1(&w).into_dyn())]).unwrap();
/// let plane = Plane::through(&m([0.0, 0.0, 1.0]), &m([3.0, 0.0, 1.0]), &m([1.0, 2.0, 1.0]))?;
/// assert_eq!(plane.points(), [(0.0, 0.0), (3.0, 0.0), (1.0, 2.0)]);
/// assert_eq!(plane.point(1.0, 2.0)?, m([1.0, 2.0, 1.0]));
/// // Three models on one line span no plane.
/// assert!(Plane::through(&m([0.0; 3]), &m([1.0, 0.0, 0.0]), &m([2.0, 0.0, 0.0])).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Plane<M> {
    origin: M,
    u: M,
    v: M,
    points: [(f64, f64); 3],
}

impl<M: Model> Plane<M> {
    /// The plane through `a` (the origin), `b` (on the first axis) and `c`.
    ///
    /// Errors when the models do not share names and shapes, hold a non-finite value,
    /// or are collinear (`b` equal to `a`, or `c` on the line through them, to relative
    /// precision 1e-9).
    pub fn through(a: &M, b: &M, c: &M) -> Result<Self> {
        for (m, name) in [(a, "a"), (b, "b"), (c, "c")] {
            a.check_compatible(m)?;
            m.check_finite(&format!("plane model {name}"))?;
        }
        let ab = b.sub(a)?;
        let nb = ab.norm();
        if nb == 0.0 {
            return Err(Error::invalid(
                "models",
                "a and b are equal: the plane has no first axis",
            ));
        }
        let u = ab.scale(1.0 / nb)?;
        let ac = c.sub(a)?;
        let cx = ac.dot(&u)?;
        let perp = ac.sub(&u.scale(cx)?)?;
        let cy = perp.norm();
        if cy <= 1e-9 * nb.max(ac.norm()) {
            return Err(Error::invalid(
                "models",
                format!(
                    "c lies on the line through a and b (distance {cy:e} from it, |b - a| = {nb:e}): three collinear models span no plane"
                ),
            ));
        }
        Ok(Plane {
            origin: a.clone(),
            v: perp.scale(1.0 / cy)?,
            u,
            points: [(0.0, 0.0), (nb, 0.0), (cx, cy)],
        })
    }

    /// The coordinates of `a`, `b` and `c` in the plane.
    pub fn points(&self) -> [(f64, f64); 3] {
        self.points
    }

    /// The model at `(x, y)`: `a + x u + y v`.
    ///
    /// Errors when a coordinate is not finite.
    ///
    /// ```
    /// use modelfusion::path::Plane;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let m = |w: [f64; 2]| StateDict::from_pairs([("w", arr1(&w).into_dyn())]).unwrap();
    /// let plane = Plane::through(&m([0.0, 0.0]), &m([2.0, 0.0]), &m([0.0, 1.0]))?;
    /// assert_eq!(plane.point(0.5, 0.5)?, m([0.5, 0.5]));
    /// assert!(plane.point(f64::NAN, 0.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn point(&self, x: f64, y: f64) -> Result<M> {
        check_finite("x", x)?;
        check_finite("y", y)?;
        M::weighted_sum(&[&self.origin, &self.u, &self.v], &[1.0, x, y])
    }

    /// `n x n` grid axes covering the three models, each axis extended by `margin`
    /// times its span on both sides (Garipov et al. plot with a margin of about 0.2).
    ///
    /// Errors when `n < 2` or `margin` is negative or not finite.
    ///
    /// ```
    /// use modelfusion::path::Plane;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let m = |w: [f64; 2]| StateDict::from_pairs([("w", arr1(&w).into_dyn())]).unwrap();
    /// let plane = Plane::through(&m([0.0, 0.0]), &m([2.0, 0.0]), &m([1.0, 1.0]))?;
    /// let (xs, ys) = plane.grid(5, 0.5)?;
    /// assert_eq!(xs, vec![-1.0, 0.0, 1.0, 2.0, 3.0]);
    /// assert_eq!(ys, vec![-0.5, 0.0, 0.5, 1.0, 1.5]);
    /// assert!(plane.grid(1, 0.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn grid(&self, n: usize, margin: f64) -> Result<(Vec<f64>, Vec<f64>)> {
        if n < 2 {
            return Err(Error::invalid(
                "n",
                format!("{n} grid points per axis; expected at least 2"),
            ));
        }
        check_finite("margin", margin)?;
        if margin < 0.0 {
            return Err(Error::invalid(
                "margin",
                format!("{margin}; expected a non-negative fraction of the span"),
            ));
        }
        let axis = |k: fn(&(f64, f64)) -> f64| {
            let lo = self.points.iter().map(k).fold(f64::INFINITY, f64::min);
            let hi = self.points.iter().map(k).fold(f64::NEG_INFINITY, f64::max);
            let (lo, hi) = (lo - margin * (hi - lo), hi + margin * (hi - lo));
            (0..n)
                .map(|i| lo + (hi - lo) * i as f64 / (n - 1) as f64)
                .collect()
        };
        Ok((axis(|p| p.0), axis(|p| p.1)))
    }
}

/// An objective on a grid of a [`Plane`]: `values[[j, i]]` is the value at
/// `(xs[i], ys[j])`.
#[derive(Clone, Debug, PartialEq)]
pub struct LossSurface {
    /// Grid coordinates along the plane's first axis (from `a` towards `b`).
    pub xs: Vec<f64>,
    /// Grid coordinates along the second axis (towards `c`).
    pub ys: Vec<f64>,
    /// The objective, `(ys.len(), xs.len())`.
    pub values: Array2<f64>,
    /// Where the three models lie.
    pub points: [(f64, f64); 3],
}

/// Evaluates `objective` at every grid point `(xs[i], ys[j])` of `plane`.
///
/// Errors when an axis is empty or holds a non-finite coordinate, or the objective
/// fails (its error is returned as is).
///
/// ```
/// use modelfusion::path::{loss_surface, Plane};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
/// let m = |w: [f64; 2]| StateDict::from_pairs([("w", arr1(&w).into_dyn())]).unwrap();
/// let plane = Plane::through(&m([0.0, 0.0]), &m([1.0, 0.0]), &m([0.0, 1.0]))?;
/// let sq = |x: &StateDict<ndarray::ArrayD<f64>>| -> modelfusion::Result<f64> { Ok(x.norm().powi(2)) };
/// let s = loss_surface(&plane, &sq, &[0.0, 1.0], &[0.0, 2.0])?;
/// let want = ndarray::array![[0.0, 1.0], [4.0, 5.0]]; // x^2 + y^2 at (xs[i], ys[j])
/// assert!(s.values.iter().zip(&want).all(|(v, w)| (v - w).abs() < 1e-12));
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn loss_surface<M: Model, O: Objective<M> + ?Sized>(
    plane: &Plane<M>,
    objective: &O,
    xs: &[f64],
    ys: &[f64],
) -> Result<LossSurface> {
    if xs.is_empty() || ys.is_empty() {
        return Err(Error::empty(format!(
            "the grid ({} x coordinates, {} y coordinates)",
            xs.len(),
            ys.len()
        )));
    }
    let mut values = Array2::zeros((ys.len(), xs.len()));
    for (j, &y) in ys.iter().enumerate() {
        for (i, &x) in xs.iter().enumerate() {
            values[[j, i]] = objective.loss(&plane.point(x, y)?)?;
        }
    }
    Ok(LossSurface {
        xs: xs.to_vec(),
        ys: ys.to_vec(),
        values,
        points: plane.points(),
    })
}
