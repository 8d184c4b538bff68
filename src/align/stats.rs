//! Streaming first and second moments of features, merged batch by batch (Chan, Golub &
//! LeVeque's pairwise update), accumulated in `f64`.

use ndarray::{Array1, Array2, ArrayView2, Axis};

use crate::error::{Error, Result};
use crate::tensor::Scalar;

/// Per-column mean and variance of a stream of `(samples, features)` batches.
///
/// ```
/// use modelfusion::align::Moments;
/// use ndarray::array;
/// let mut m = Moments::new(2);
/// m.update(array![[1.0f32, 0.0], [3.0, 0.0]].view())?;
/// m.update(array![[5.0f32, 6.0]].view())?;
/// assert_eq!(m.count(), 3);
/// assert!((m.mean()[0] - 3.0).abs() < 1e-12);
/// assert!((m.variance()[0] - 8.0 / 3.0).abs() < 1e-12); // population variance
/// assert!(m.update(array![[1.0f32]].view()).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    n: usize,
    mean: Array1<f64>,
    m2: Array1<f64>,
}

impl Moments {
    /// Empty moments over `features` columns.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::Moments::new(3).count(), 0);
    /// ```
    pub fn new(features: usize) -> Self {
        Moments {
            n: 0,
            mean: Array1::zeros(features),
            m2: Array1::zeros(features),
        }
    }

    /// Adds a batch; errors when its column count differs or it holds a non-finite value.
    ///
    /// ```
    /// let mut m = modelfusion::align::Moments::new(1);
    /// m.update(ndarray::array![[2.0f64], [4.0]].view())?;
    /// assert_eq!(m.mean()[0], 3.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn update<E: Scalar>(&mut self, batch: ArrayView2<E>) -> Result<()> {
        if batch.ncols() != self.mean.len() {
            return Err(Error::shape(
                "feature batch (samples, features)",
                &[batch.nrows(), self.mean.len()],
                &[batch.nrows(), batch.ncols()],
            ));
        }
        let x = to_f64(batch, "feature batch")?;
        let m = x.nrows();
        if m == 0 {
            return Ok(());
        }
        let bmean = x
            .mean_axis(Axis(0))
            .unwrap_or_else(|| Array1::zeros(x.ncols()));
        let centred = &x - &bmean;
        let bm2 = centred.mapv(|v| v * v).sum_axis(Axis(0));
        let (n1, n2) = (self.n as f64, m as f64);
        let n = n1 + n2;
        let delta = &bmean - &self.mean;
        self.m2 = &self.m2 + &bm2 + &(delta.mapv(|d| d * d) * (n1 * n2 / n));
        self.mean = &self.mean + &(delta * (n2 / n));
        self.n += m;
        Ok(())
    }

    /// Samples seen.
    ///
    /// ```
    /// let mut m = modelfusion::align::Moments::new(1);
    /// m.update(ndarray::array![[1.0f32], [1.0]].view())?;
    /// assert_eq!(m.count(), 2);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn count(&self) -> usize {
        self.n
    }

    /// Per-column mean.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::Moments::new(2).mean().len(), 2);
    /// ```
    pub fn mean(&self) -> &Array1<f64> {
        &self.mean
    }

    /// Per-column population variance (zero before any sample).
    ///
    /// ```
    /// let mut m = modelfusion::align::Moments::new(1);
    /// m.update(ndarray::array![[1.0f64], [3.0]].view())?;
    /// assert_eq!(m.variance()[0], 1.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn variance(&self) -> Array1<f64> {
        if self.n == 0 {
            return Array1::zeros(self.mean.len());
        }
        self.m2.mapv(|v| (v / self.n as f64).max(0.0))
    }
}

/// Streaming means, variances and cross-covariance of two feature streams observed on
/// the same samples: `x` with `p` columns, `y` with `q` columns.
///
/// ```
/// use modelfusion::align::CrossMoments;
/// use ndarray::array;
/// let mut c = CrossMoments::new(1, 1);
/// c.update(array![[1.0f64], [2.0]].view(), array![[2.0f64], [4.0]].view())?;
/// c.update(array![[3.0f64]].view(), array![[6.0f64]].view())?;
/// assert!((c.correlation(0.0)[[0, 0]] - 1.0).abs() < 1e-12);
/// assert!((c.cross_correlation()[[0, 0]] - 28.0 / 3.0).abs() < 1e-12); // E[x y]
/// // mismatched sample counts
/// assert!(c.update(array![[1.0f64]].view(), array![[1.0f64], [2.0]].view()).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct CrossMoments {
    x: Moments,
    y: Moments,
    cross: Array2<f64>,
}

impl CrossMoments {
    /// Empty moments for `p` and `q` columns.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::CrossMoments::new(2, 3).covariance().dim(), (2, 3));
    /// ```
    pub fn new(p: usize, q: usize) -> Self {
        CrossMoments {
            x: Moments::new(p),
            y: Moments::new(q),
            cross: Array2::zeros((p, q)),
        }
    }

    /// Adds a batch of paired samples; errors when the sample counts or column counts
    /// differ from what was set up, or on a non-finite value.
    ///
    /// ```
    /// let mut c = modelfusion::align::CrossMoments::new(1, 1);
    /// c.update(ndarray::array![[1.0f64], [3.0]].view(), ndarray::array![[2.0f64], [0.0]].view())?;
    /// assert_eq!(c.covariance()[[0, 0]], -1.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn update<E: Scalar>(&mut self, x: ArrayView2<E>, y: ArrayView2<E>) -> Result<()> {
        if x.nrows() != y.nrows() {
            return Err(Error::invalid(
                "activations",
                format!(
                    "the two models' batches have different sample counts ({} vs {})",
                    x.nrows(),
                    y.nrows()
                ),
            ));
        }
        let (p, q) = self.cross.dim();
        if x.ncols() != p || y.ncols() != q {
            return Err(Error::shape(
                "feature batches (columns of x, columns of y)",
                &[p, q],
                &[x.ncols(), y.ncols()],
            ));
        }
        let m = x.nrows();
        if m == 0 {
            return Ok(());
        }
        let xf = to_f64(x, "activations of the reference model")?;
        let yf = to_f64(y, "activations of the other model")?;
        let mx = xf.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(p));
        let my = yf.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(q));
        let xc = &xf - &mx;
        let yc = &yf - &my;
        let bcross = xc.t().dot(&yc);
        let (n1, n2) = (self.x.n as f64, m as f64);
        let n = n1 + n2;
        let dx = &mx - &self.x.mean;
        let dy = &my - &self.y.mean;
        let outer = outer(&dx, &dy) * (n1 * n2 / n);
        self.cross = &self.cross + &bcross + &outer;
        self.x.update(x)?;
        self.y.update(y)?;
        Ok(())
    }

    /// Samples seen.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::CrossMoments::new(1, 1).count(), 0);
    /// ```
    pub fn count(&self) -> usize {
        self.x.n
    }

    /// The moments of `x` alone.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::CrossMoments::new(2, 1).x().mean().len(), 2);
    /// ```
    pub fn x(&self) -> &Moments {
        &self.x
    }

    /// The moments of `y` alone.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::CrossMoments::new(2, 1).y().mean().len(), 1);
    /// ```
    pub fn y(&self) -> &Moments {
        &self.y
    }

    /// Population cross-covariance `E[(x - mx)(y - my)^T]`, `(p, q)`.
    ///
    /// ```
    /// let mut c = modelfusion::align::CrossMoments::new(1, 1);
    /// c.update(ndarray::array![[0.0f64], [2.0]].view(), ndarray::array![[0.0f64], [2.0]].view())?;
    /// assert_eq!(c.covariance()[[0, 0]], 1.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn covariance(&self) -> Array2<f64> {
        let n = self.x.n.max(1) as f64;
        &self.cross / n
    }

    /// Cross-correlation `E[x y^T]`, `(p, q)`.
    ///
    /// ```
    /// let mut c = modelfusion::align::CrossMoments::new(1, 1);
    /// c.update(ndarray::array![[1.0f64], [3.0]].view(), ndarray::array![[1.0f64], [1.0]].view())?;
    /// assert_eq!(c.cross_correlation()[[0, 0]], 2.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn cross_correlation(&self) -> Array2<f64> {
        self.covariance() + outer(&self.x.mean, &self.y.mean)
    }

    /// Pearson correlation `cov / (std_x std_y^T)`, with `eps` added to each standard
    /// deviation (constant features correlate 0 with everything).
    ///
    /// ```
    /// let mut c = modelfusion::align::CrossMoments::new(1, 1);
    /// c.update(ndarray::array![[1.0f64], [3.0]].view(), ndarray::array![[5.0f64], [1.0]].view())?;
    /// assert!((c.correlation(0.0)[[0, 0]] + 1.0).abs() < 1e-12);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn correlation(&self, eps: f64) -> Array2<f64> {
        let sx = self.x.variance().mapv(|v| v.sqrt() + eps);
        let sy = self.y.variance().mapv(|v| v.sqrt() + eps);
        let mut c = self.covariance();
        for ((i, j), v) in c.indexed_iter_mut() {
            *v /= sx[i] * sy[j];
        }
        c
    }
}

fn outer(a: &Array1<f64>, b: &Array1<f64>) -> Array2<f64> {
    Array2::from_shape_fn((a.len(), b.len()), |(i, j)| a[i] * b[j])
}

/// Widens a batch to `f64`, erroring on a non-finite value.
pub(crate) fn to_f64<E: Scalar>(x: ArrayView2<E>, what: &str) -> Result<Array2<f64>> {
    let out = x.mapv(|v| v.to_f64_lossless());
    if let Some(((i, j), _)) = out.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: format!("{what} at (sample {i}, feature {j})"),
        });
    }
    Ok(out)
}
