//! The loss barrier along a path: how much worse the models between two endpoints are.
//!
//! [`loss_barrier`] evaluates an [`Objective`] (a loss, or an error rate: anything to
//! minimise) at `phi(t)` for every `t` of an explicit grid, optionally refines around the
//! maximum by golden-section search, and reports both definitions in use:
//!
//! - **Frankle et al. (2020)**, also Git Re-Basin's: `max_t L(phi(t)) - (L0 + L1) / 2`.
//!   It can be negative when the whole path is better than the endpoints' mean.
//! - **Interpolated** (Entezari et al. 2022):
//!   `sup_t L(phi(t)) - [(1 - t) L0 + t L1]`, the largest excess over the chord between
//!   the endpoint losses; never negative, since the chord meets the curve at the ends.
//!
//! ```
//! use modelfusion::barrier::{loss_barrier, BarrierConfig};
//! use modelfusion::path::Linear;
//! use modelfusion::{Model, Objective, Result, StateDict, StateDictF64};
//! use ndarray::arr1;
//!
//! /// A double well: L(w) = (w^2 - 1)^2 for a single weight w.
//! struct DoubleWell;
//! impl Objective<StateDictF64> for DoubleWell {
//!     fn loss(&self, m: &StateDictF64) -> Result<f64> {
//!         let w = m.get("w").unwrap()[[0]];
//!         Ok((w * w - 1.0).powi(2))
//!     }
//! }
//! let a = StateDict::from_pairs([("w", arr1(&[-1.0]).into_dyn())])?;
//! let b = StateDict::from_pairs([("w", arr1(&[1.0]).into_dyn())])?;
//! let report = loss_barrier(&Linear::new(a, b)?, &DoubleWell, &BarrierConfig::default())?;
//! assert_eq!(report.frankle, 1.0); // L(0) = 1 at t = 0.5, endpoints at 0
//! assert_eq!(report.frankle_t, 0.5);
//! assert_eq!(report.interpolated, 1.0);
//! assert_eq!(report.curve.len(), 25);
//! # Ok::<(), modelfusion::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::model::Model;
use crate::objective::Objective;
use crate::path::PathSampler;

/// The default number of grid points (Git Re-Basin's 25, endpoints included).
pub const DEFAULT_GRID_POINTS: usize = 25;

/// Where [`loss_barrier`] evaluates the path: a sorted grid of `t` that always holds 0
/// and 1, and the number of golden-section evaluations spent around each maximum.
///
/// A user grid must be non-empty, finite, within `[0, 1]` and strictly increasing; when
/// it lacks 0 or 1 they are added (both barrier definitions need the endpoint values).
///
/// ```
/// use modelfusion::barrier::BarrierConfig;
/// assert_eq!(BarrierConfig::default().grid().len(), 25);
/// assert_eq!(BarrierConfig::uniform(5)?.grid(), &[0.0, 0.25, 0.5, 0.75, 1.0]);
/// let cfg = BarrierConfig::from_grid(vec![0.3, 0.5])?.with_refinement(10);
/// assert_eq!(cfg.grid(), &[0.0, 0.3, 0.5, 1.0]);
/// assert_eq!(cfg.refinement(), 10);
/// assert!(BarrierConfig::from_grid(vec![]).is_err());
/// assert!(BarrierConfig::from_grid(vec![0.5, 0.2]).is_err());
/// assert!(BarrierConfig::from_grid(vec![1.5]).is_err());
/// assert!(BarrierConfig::uniform(1).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct BarrierConfig {
    grid: Vec<f64>,
    refine: usize,
}

impl Default for BarrierConfig {
    /// 25 evenly spaced points, no refinement.
    fn default() -> Self {
        BarrierConfig {
            grid: uniform_grid(DEFAULT_GRID_POINTS),
            refine: 0,
        }
    }
}

fn uniform_grid(n: usize) -> Vec<f64> {
    let last = (n - 1) as f64;
    (0..n).map(|i| i as f64 / last).collect()
}

impl BarrierConfig {
    /// `n >= 2` evenly spaced points `i / (n - 1)`, endpoints included.
    pub fn uniform(n: usize) -> Result<Self> {
        if n < 2 {
            return Err(Error::invalid(
                "grid points",
                format!("need at least 2 (the endpoints), got {n}"),
            ));
        }
        Ok(BarrierConfig {
            grid: uniform_grid(n),
            refine: 0,
        })
    }

    /// An explicit grid; 0 and 1 are added when missing.
    pub fn from_grid(grid: Vec<f64>) -> Result<Self> {
        if grid.is_empty() {
            return Err(Error::empty("the grid of t for the loss barrier"));
        }
        if let Some((i, &t)) = grid
            .iter()
            .enumerate()
            .find(|(_, t)| !(t.is_finite() && (0.0..=1.0).contains(*t)))
        {
            return Err(Error::invalid(
                "grid",
                format!("t must be a finite number in [0, 1], got {t} at index {i}"),
            ));
        }
        if let Some(i) = grid.windows(2).position(|w| w[0] >= w[1]) {
            return Err(Error::invalid(
                "grid",
                format!(
                    "must be strictly increasing, got {} then {} at indices {i} and {}",
                    grid[i],
                    grid[i + 1],
                    i + 1
                ),
            ));
        }
        let mut grid = grid;
        if grid[0] != 0.0 {
            grid.insert(0, 0.0);
        }
        if grid[grid.len() - 1] != 1.0 {
            grid.push(1.0);
        }
        Ok(BarrierConfig { grid, refine: 0 })
    }

    /// Spends up to `evaluations` golden-section evaluations around the grid maximum of
    /// each definition (so up to `2 * evaluations` in all; one set when the two maxima
    /// share a bracket and the endpoint losses are equal).
    pub fn with_refinement(mut self, evaluations: usize) -> Self {
        self.refine = evaluations;
        self
    }

    /// The grid, sorted, with 0 and 1.
    pub fn grid(&self) -> &[f64] {
        &self.grid
    }

    /// Golden-section evaluations per definition.
    pub fn refinement(&self) -> usize {
        self.refine
    }
}

/// The result of [`loss_barrier`]: both barrier definitions, where they peak, and every
/// evaluated point.
#[derive(Clone, Debug, PartialEq)]
pub struct BarrierReport {
    /// Every `(t, L(phi(t)))` evaluated (grid and refinement), sorted by `t`.
    pub curve: Vec<(f64, f64)>,
    /// `L0 = L(phi(0))`.
    pub start: f64,
    /// `L1 = L(phi(1))`.
    pub end: f64,
    /// Frankle's barrier `max_t L(phi(t)) - (L0 + L1) / 2`.
    pub frankle: f64,
    /// The `t` of the maximum of `L(phi(t))` (the smallest such `t` on a plateau).
    pub frankle_t: f64,
    /// The interpolated barrier `sup_t L(phi(t)) - [(1 - t) L0 + t L1]` (>= 0).
    pub interpolated: f64,
    /// The `t` where the interpolated barrier is reached (the smallest on ties).
    pub interpolated_t: f64,
}

impl BarrierReport {
    /// The largest objective value on the curve, `max_t L(phi(t))`.
    ///
    /// ```
    /// use modelfusion::barrier::BarrierReport;
    /// let r = BarrierReport { curve: vec![(0.0, 1.0), (0.5, 3.0), (1.0, 2.0)], start: 1.0,
    ///     end: 2.0, frankle: 1.5, frankle_t: 0.5, interpolated: 1.5, interpolated_t: 0.5 };
    /// assert_eq!(r.max_value(), 3.0);
    /// ```
    pub fn max_value(&self) -> f64 {
        self.frankle + 0.5 * (self.start + self.end)
    }
}

impl std::fmt::Display for BarrierReport {
    /// One line: both barriers with their `t`, the endpoint values and the point count;
    /// a precision (`{:.3}`) applies to every number.
    ///
    /// ```
    /// use modelfusion::barrier::BarrierReport;
    /// let r = BarrierReport { curve: vec![(0.0, 1.0), (0.5, 3.0), (1.0, 2.0)], start: 1.0,
    ///     end: 2.0, frankle: 1.5, frankle_t: 0.5, interpolated: 1.5, interpolated_t: 0.5 };
    /// assert_eq!(
    ///     r.to_string(),
    ///     "barrier 1.5 at t = 0.5 (Frankle), 1.5 at t = 0.5 (interpolated); L0 = 1, L1 = 2, 3 points"
    /// );
    /// assert!(format!("{r:.2}").starts_with("barrier 1.50 at t = 0.50"));
    /// ```
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let num = |x: f64| match f.precision() {
            Some(p) => format!("{x:.p$}"),
            None => x.to_string(),
        };
        write!(
            f,
            "barrier {} at t = {} (Frankle), {} at t = {} (interpolated); L0 = {}, L1 = {}, {} points",
            num(self.frankle),
            num(self.frankle_t),
            num(self.interpolated),
            num(self.interpolated_t),
            num(self.start),
            num(self.end),
            self.curve.len()
        )
    }
}

/// Evaluates `objective` along `path` at the grid of `config` (plus refinement) and
/// reports both barrier definitions. Works for any [`PathSampler`] and any
/// [`Objective`] (loss, error rate, ...).
///
/// Errors: a non-finite objective value (naming `t`), or any error of the path or the
/// objective.
///
/// See the [module documentation](self) for an example.
pub fn loss_barrier<M, P, O>(
    path: &P,
    objective: &O,
    config: &BarrierConfig,
) -> Result<BarrierReport>
where
    M: Model,
    P: PathSampler<M> + ?Sized,
    O: Objective<M> + ?Sized,
{
    let mut curve = Curve {
        points: Vec::with_capacity(config.grid.len() + 2 * config.refine),
        eval: |t: f64| -> Result<f64> {
            let v = objective.loss(&path.point(t)?)?;
            if v.is_finite() {
                Ok(v)
            } else {
                Err(Error::NonFinite {
                    what: format!("the objective's value at t = {t} (got {v})"),
                })
            }
        },
    };
    for &t in &config.grid {
        curve.value(t)?;
    }
    let (l0, l1) = (curve.points[0].1, curve.points[curve.points.len() - 1].1);
    let chord = move |t: f64| (1.0 - t) * l0 + t * l1;
    if config.refine > 0 {
        // Brackets from the grid alone, before any refinement point is added.
        let (i_f, _) = curve.argmax(|_| 0.0);
        let (i_i, _) = curve.argmax(chord);
        let (bracket_f, bracket_i) = (curve.bracket(i_f), curve.bracket(i_i));
        curve.refine(bracket_f, config.refine, |_| 0.0)?;
        if !(i_i == i_f && l0 == l1) {
            curve.refine(bracket_i, config.refine, chord)?;
        }
    }
    Ok(summarise(curve))
}

/// Both barriers of an evaluated curve (sorted, with `t = 0` first and `t = 1` last).
fn summarise<E: FnMut(f64) -> Result<f64>>(curve: Curve<E>) -> BarrierReport {
    let (l0, l1) = (curve.points[0].1, curve.points[curve.points.len() - 1].1);
    let chord = move |t: f64| (1.0 - t) * l0 + t * l1;
    let (i, frankle) = curve.argmax(|_| 0.5 * (l0 + l1));
    let frankle_t = curve.points[i].0;
    let (j, interpolated) = curve.argmax(chord);
    let interpolated_t = curve.points[j].0;
    BarrierReport {
        curve: curve.points,
        start: l0,
        end: l1,
        frankle,
        frankle_t,
        interpolated,
        interpolated_t,
    }
}

impl BarrierReport {
    /// The report of a curve evaluated elsewhere (e.g. losses computed in PyTorch along
    /// the path): `(t, loss)` pairs in any order, with `t` in `[0, 1]`, both `t = 0` and
    /// `t = 1` present, every value finite and no `t` twice.
    ///
    /// ```
    /// use modelfusion::barrier::BarrierReport;
    /// let r = BarrierReport::from_curve([(1.0, 0.2), (0.0, 0.1), (0.5, 1.15)])?;
    /// assert!((r.frankle - 1.0).abs() < 1e-12);
    /// assert_eq!(r.frankle_t, 0.5);
    /// assert!(BarrierReport::from_curve([(0.0, 0.1), (0.5, 1.0)]).is_err()); // no t = 1
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn from_curve(points: impl IntoIterator<Item = (f64, f64)>) -> Result<BarrierReport> {
        let mut points: Vec<(f64, f64)> = points.into_iter().collect();
        for &(t, v) in &points {
            if !(0.0..=1.0).contains(&t) {
                return Err(Error::invalid("t", format!("must be in [0, 1], got {t}")));
            }
            if !v.is_finite() {
                return Err(Error::NonFinite {
                    what: format!("the loss at t = {t} (got {v})"),
                });
            }
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        if let Some(w) = points.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::invalid("t", format!("t = {} appears twice", w[0].0)));
        }
        if points.first().map(|p| p.0) != Some(0.0) || points.last().map(|p| p.0) != Some(1.0) {
            return Err(Error::invalid(
                "points",
                "the curve needs both endpoints, t = 0 and t = 1",
            ));
        }
        Ok(summarise(Curve {
            points,
            eval: |t: f64| -> Result<f64> {
                Err(Error::invalid("t", format!("no value at t = {t}")))
            },
        }))
    }
}

/// Evaluated points, sorted by t, with memoised evaluation.
struct Curve<E> {
    points: Vec<(f64, f64)>,
    eval: E,
}

impl<E: FnMut(f64) -> Result<f64>> Curve<E> {
    fn index_of(&self, t: f64) -> usize {
        self.points.partition_point(|p| p.0 < t)
    }

    fn value(&mut self, t: f64) -> Result<f64> {
        let i = self.index_of(t);
        if let Some(&(ti, v)) = self.points.get(i)
            && ti == t
        {
            return Ok(v);
        }
        let v = (self.eval)(t)?;
        self.points.insert(i, (t, v));
        Ok(v)
    }

    /// Index and value of the largest `L(t) - base(t)` (first one on ties).
    fn argmax(&self, base: impl Fn(f64) -> f64) -> (usize, f64) {
        let mut best = (0, f64::NEG_INFINITY);
        for (i, &(t, v)) in self.points.iter().enumerate() {
            let g = v - base(t);
            if g > best.1 {
                best = (i, g);
            }
        }
        best
    }

    /// The interval between the neighbours of point `i`.
    fn bracket(&self, i: usize) -> (f64, f64) {
        let last = self.points.len() - 1;
        (
            self.points[i.saturating_sub(1)].0,
            self.points[(i + 1).min(last)].0,
        )
    }

    /// Golden-section search for the maximum of `L(t) - base(t)` in `[a, b]`, spending
    /// `budget` evaluations; every point lands on the curve.
    fn refine(
        &mut self,
        (mut a, mut b): (f64, f64),
        budget: usize,
        base: impl Fn(f64) -> f64,
    ) -> Result<()> {
        const R: f64 = 0.618_033_988_749_894_9; // (sqrt(5) - 1) / 2
        let f = |s: &mut Self, t: f64| s.value(t).map(|v| v - base(t));
        let mut x1 = b - R * (b - a);
        let mut x2 = a + R * (b - a);
        let mut f1 = f(self, x1)?;
        if budget < 2 {
            return Ok(());
        }
        let mut f2 = f(self, x2)?;
        for _ in 2..budget {
            if f1 >= f2 {
                b = x2;
                (x2, f2) = (x1, f1);
                x1 = b - R * (b - a);
                f1 = f(self, x1)?;
            } else {
                a = x1;
                (x1, f1) = (x2, f2);
                x2 = a + R * (b - a);
                f2 = f(self, x2)?;
            }
        }
        Ok(())
    }
}
