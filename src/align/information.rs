//! Mutual information between the units of two models, for activation matching: a
//! plug-in estimate on equal-width bins, accumulated batch by batch.

use ndarray::{Array1, Array2, ArrayView2, Zip};

use super::stats::to_f64;
use crate::error::{Error, Result};
use crate::tensor::Scalar;

/// The largest number of bins per unit [`JointHistogram`] accepts (its tables hold
/// `bins^2 * x_units * y_units` counts).
pub const MAX_BINS: usize = 64;

/// Joint histograms of every pair `(x unit i, y unit j)` of two feature streams, each
/// unit binned into `bins` equal-width bins over a given range, and the plug-in mutual
/// information (in nats) they estimate:
/// `I(i, j) = sum_{s,t} p_ij(s,t) ln(p_ij(s,t) / (p_i(s) p_j(t)))`.
///
/// Values below a unit's range fall in its first bin, values at or above its upper end
/// in its last; a unit whose range is empty (a constant feature) has all its mass in one
/// bin and shares no information with anything. The counts of one batch are `bins^2`
/// products of 0/1 indicator matrices, so a batch costs `bins^2` times a
/// cross-correlation's work; the tables take `bins^2 * x_units * y_units * 8` bytes.
///
/// ```
/// use modelfusion::align::JointHistogram;
/// use ndarray::{array, Array1};
/// let x = array![[0.0f64, 5.0], [1.0, 5.0], [2.0, 5.0], [3.0, 5.0]];
/// let lo = Array1::from(vec![0.0, 5.0]);
/// let hi = Array1::from(vec![3.0, 5.0]);
/// let mut h = JointHistogram::new((lo.clone(), hi.clone()), (lo, hi), 2)?;
/// h.update(x.view(), x.view())?;
/// let mi = h.mutual_information();
/// assert!((mi[[0, 0]] - 2f64.ln()).abs() < 1e-12); // one bit: two equally likely bins
/// assert_eq!(mi[[1, 1]], 0.0); // a constant unit
/// assert!(JointHistogram::new((array![0.0], array![1.0]), (array![0.0], array![1.0]), 1).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct JointHistogram {
    bins: usize,
    x: (Array1<f64>, Array1<f64>),
    y: (Array1<f64>, Array1<f64>),
    n: usize,
    /// `bins * bins` tables `(x units, y units)`, table `s * bins + t` counting samples
    /// with x unit `i` in bin `s` and y unit `j` in bin `t`.
    joint: Vec<Array2<f64>>,
}

impl JointHistogram {
    /// Empty histograms over the ranges `(lower, upper)` of every x and y unit, with
    /// `bins` bins per unit (2 to [`MAX_BINS`]).
    ///
    /// Errors when `bins` is out of range, a range has a non-finite end or a lower end
    /// above its upper end, or a range's two arrays differ in length.
    ///
    /// ```
    /// use modelfusion::align::JointHistogram;
    /// use ndarray::array;
    /// let e = JointHistogram::new((array![1.0], array![0.0]), (array![0.0], array![1.0]), 4);
    /// assert!(e.unwrap_err().to_string().contains("x unit 0"));
    /// ```
    pub fn new(
        x: (Array1<f64>, Array1<f64>),
        y: (Array1<f64>, Array1<f64>),
        bins: usize,
    ) -> Result<Self> {
        check_bins(bins)?;
        for (which, (lo, hi)) in [("x", &x), ("y", &y)] {
            if lo.len() != hi.len() {
                return Err(Error::shape(
                    format!("upper ends of the {which} ranges (one per unit)"),
                    &[lo.len()],
                    &[hi.len()],
                ));
            }
            if let Some(i) =
                (0..lo.len()).find(|&i| !(lo[i].is_finite() && hi[i].is_finite() && lo[i] <= hi[i]))
            {
                return Err(Error::invalid(
                    "range",
                    format!(
                        "{which} unit {i} has range [{}, {}]; expected finite ends, lower <= upper",
                        lo[i], hi[i]
                    ),
                ));
            }
        }
        let joint = vec![Array2::zeros((x.0.len(), y.0.len())); bins * bins];
        Ok(JointHistogram {
            bins,
            x,
            y,
            n: 0,
            joint,
        })
    }

    /// Adds a batch of paired samples (`(samples, x units)` and `(samples, y units)`).
    ///
    /// Errors when the sample counts or unit counts differ from the histograms', or a
    /// value is not finite.
    ///
    /// ```
    /// use modelfusion::align::JointHistogram;
    /// use ndarray::array;
    /// let r = (array![0.0], array![1.0]);
    /// let mut h = JointHistogram::new(r.clone(), r, 2)?;
    /// assert!(h.update(array![[0.5f32]].view(), array![[0.5f32], [0.1]].view()).is_err());
    /// h.update(array![[0.5f32]].view(), array![[0.5f32]].view())?;
    /// assert_eq!(h.count(), 1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn update<E: Scalar>(&mut self, x: ArrayView2<E>, y: ArrayView2<E>) -> Result<()> {
        if x.nrows() != y.nrows() {
            return Err(Error::shape(
                "y feature batch (samples, units): one sample per x sample",
                &[x.nrows(), y.ncols()],
                &[y.nrows(), y.ncols()],
            ));
        }
        for (which, b, lo) in [("x", &x, &self.x.0), ("y", &y, &self.y.0)] {
            if b.ncols() != lo.len() {
                return Err(Error::shape(
                    format!("{which} feature batch (samples, units)"),
                    &[b.nrows(), lo.len()],
                    &[b.nrows(), b.ncols()],
                ));
            }
        }
        let (bx, by) = (
            self.bin_indices(&to_f64(x, "x feature batch")?, true),
            self.bin_indices(&to_f64(y, "y feature batch")?, false),
        );
        // Indicator matrices, one per bin: exact 0/1 products, counts below 2^24 per
        // batch are exact in f32.
        let indicators = |b: &Array2<usize>| -> Vec<Array2<f32>> {
            (0..self.bins)
                .map(|s| b.mapv(|k| if k == s { 1.0 } else { 0.0 }))
                .collect()
        };
        let (ix, iy) = (indicators(&bx), indicators(&by));
        for (s, xs) in ix.iter().enumerate() {
            for (t, yt) in iy.iter().enumerate() {
                let c = xs.t().dot(yt);
                Zip::from(&mut self.joint[s * self.bins + t])
                    .and(&c)
                    .for_each(|acc, &v| *acc += f64::from(v));
            }
        }
        self.n += x.nrows();
        Ok(())
    }

    fn bin_indices(&self, v: &Array2<f64>, is_x: bool) -> Array2<usize> {
        let (lo, hi) = if is_x { &self.x } else { &self.y };
        let top = self.bins - 1;
        Array2::from_shape_fn(v.dim(), |(n, i)| {
            let w = hi[i] - lo[i];
            if w <= 0.0 {
                return 0;
            }
            let k = ((v[[n, i]] - lo[i]) / w * self.bins as f64).floor();
            if k <= 0.0 { 0 } else { (k as usize).min(top) }
        })
    }

    /// Samples seen.
    pub fn count(&self) -> usize {
        self.n
    }

    /// The plug-in mutual information `(x units, y units)`, in nats (0 before any
    /// sample).
    pub fn mutual_information(&self) -> Array2<f64> {
        let (nx, ny) = (self.x.0.len(), self.y.0.len());
        let mut mi = Array2::<f64>::zeros((nx, ny));
        if self.n == 0 {
            return mi;
        }
        let n = self.n as f64;
        // Marginal counts: a unit's bin count is the same whatever partner it is paired with.
        let margin_x = Array2::from_shape_fn((self.bins, nx), |(s, i)| {
            (0..self.bins)
                .map(|t| {
                    self.joint[s * self.bins + t]
                        .get((i, 0))
                        .copied()
                        .unwrap_or(0.0)
                })
                .sum::<f64>()
        });
        let margin_y = Array2::from_shape_fn((self.bins, ny), |(t, j)| {
            (0..self.bins)
                .map(|s| {
                    self.joint[s * self.bins + t]
                        .get((0, j))
                        .copied()
                        .unwrap_or(0.0)
                })
                .sum::<f64>()
        });
        for s in 0..self.bins {
            for t in 0..self.bins {
                Zip::indexed(&mut mi)
                    .and(&self.joint[s * self.bins + t])
                    .for_each(|(i, j), acc, &c| {
                        if c > 0.0 {
                            *acc += c / n * (c * n / (margin_x[[s, i]] * margin_y[[t, j]])).ln();
                        }
                    });
            }
        }
        // Rounding can leave tiny negative sums for independent units.
        mi.mapv_inplace(|v| v.max(0.0));
        mi
    }
}

/// Errors unless `bins` is between 2 and [`MAX_BINS`].
pub(crate) fn check_bins(bins: usize) -> Result<()> {
    if !(2..=MAX_BINS).contains(&bins) {
        return Err(Error::invalid(
            "bins",
            format!("{bins}; expected 2 to {MAX_BINS} bins per unit"),
        ));
    }
    Ok(())
}

/// Per-unit `(min, max)` over a stream of batches.
#[derive(Clone, Debug)]
pub(crate) struct Ranges {
    lo: Array1<f64>,
    hi: Array1<f64>,
}

impl Ranges {
    pub(crate) fn new(units: usize) -> Self {
        Ranges {
            lo: Array1::from_elem(units, f64::INFINITY),
            hi: Array1::from_elem(units, f64::NEG_INFINITY),
        }
    }

    pub(crate) fn update<E: Scalar>(&mut self, batch: ArrayView2<E>, what: &str) -> Result<()> {
        if batch.ncols() != self.lo.len() {
            return Err(Error::shape(
                format!("{what} (samples, units)"),
                &[batch.nrows(), self.lo.len()],
                &[batch.nrows(), batch.ncols()],
            ));
        }
        let b = to_f64(batch, what)?;
        for row in b.rows() {
            Zip::from(&mut self.lo)
                .and(&mut self.hi)
                .and(&row)
                .for_each(|lo, hi, &v| {
                    *lo = lo.min(v);
                    *hi = hi.max(v);
                });
        }
        Ok(())
    }

    /// The ranges (an empty range `[0, 0]` for a unit never seen).
    pub(crate) fn finish(self) -> (Array1<f64>, Array1<f64>) {
        let seen = |v: f64| if v.is_finite() { v } else { 0.0 };
        (self.lo.mapv(seen), self.hi.mapv(seen))
    }
}
