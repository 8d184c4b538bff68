//! Data-free merges through the singular value decomposition of task vectors: Iso-C
//! (isotropic merging) and TSV-Merge (task singular vectors).
//!
//! Both treat every 2-D parameter (a weight matrix) through an SVD and every other
//! parameter (biases, norms, convolution kernels) as the mean of the task vectors, then
//! add `alpha` times the result to the base. The decompositions are computed in `f64`
//! by the pure-Rust [faer](https://docs.rs/faer) crate (feature `svd`; no system
//! library); without the feature the constructors return [`Error::FeatureDisabled`].

use super::TensorMerger;
use super::kernel;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::{Scalar, Tensor};

/// Errors unless the `svd` feature is on; `what` names the method.
fn require_feature(what: &str) -> Result<()> {
    if cfg!(feature = "svd") {
        Ok(())
    } else {
        Err(Error::FeatureDisabled {
            feature: "svd",
            what: what.to_string(),
        })
    }
}

/// Isotropic merging, Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model
/// Merging with Common and Task-Specific Subspaces").
///
/// For a weight matrix, the task vectors' sum `D = sum_i tau_i = U S V^T` is replaced by
/// `mean(S) U V^T`: every direction of the summed update gets the same singular value,
/// so the tasks that only own small singular directions are not drowned by the
/// dominant ones. Any other parameter gets the mean of the task vectors. The merge is
/// `base + alpha * that`. The paper tunes `alpha` on held-out data (values around 1 to
/// 1.5 for 8 tasks).
///
/// Requires the `svd` feature; without it [`IsoC::new`] returns
/// [`Error::FeatureDisabled`].
///
/// ```
/// use modelfusion::merge::{IsoC, Merger};
/// use modelfusion::{Model, StateDict};
/// use ndarray::array;
/// let base = StateDict::from_pairs([("w", array![[0.0f64, 0.0], [0.0, 0.0]].into_dyn())])?;
/// let a = StateDict::from_pairs([("w", array![[3.0f64, 0.0], [0.0, 0.0]].into_dyn())])?;
/// let b = StateDict::from_pairs([("w", array![[0.0f64, 0.0], [0.0, 1.0]].into_dyn())])?;
/// if cfg!(feature = "svd") {
///     // D = diag(3, 1): both directions get the mean singular value, 2.
///     let m = IsoC::new(base, 1.0)?.merge(&[&a, &b])?;
///     let w = m.get("w").unwrap();
///     assert!((w[[0, 0]] - 2.0).abs() < 1e-12 && (w[[1, 1]] - 2.0).abs() < 1e-12);
/// } else {
///     assert!(IsoC::new(base, 1.0).is_err());
/// }
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct IsoC<M> {
    base: M,
    alpha: f64,
}

impl<M: Model> IsoC<M> {
    /// Iso-C around `base` with scale `alpha` (finite).
    ///
    /// ```
    /// use modelfusion::merge::IsoC;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("b", arr1(&[0.0f32]).into_dyn())])?;
    /// assert!(IsoC::new(base, f64::NAN).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(base: M, alpha: f64) -> Result<Self> {
        crate::error::check_finite("alpha", alpha)?;
        require_feature("Iso-C (an SVD per weight matrix)")?;
        Ok(IsoC { base, alpha })
    }

    /// The scale of the merged update.
    ///
    /// ```
    /// use modelfusion::merge::IsoC;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("b", arr1(&[0.0f32]).into_dyn())])?;
    /// if let Ok(m) = IsoC::new(base, 1.5) { assert_eq!(m.alpha(), 1.5); }
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
}

/// TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference
/// in Model Merging").
///
/// For a weight matrix of rank bound `r = min(rows, cols)` and `T` models, each task
/// vector keeps its top `k = floor(r / T)` singular triplets `tau_i ~ U_i S_i V_i^T`.
/// The kept left and right singular vectors of all tasks are concatenated,
/// `U = [U_1 .. U_T]`, `V = [V_1 .. V_T]`, and decorrelated by replacing each with its
/// closest matrix with orthonormal columns (the polar factor `P Q^T` of `U = P Sigma
/// Q^T`, as the authors' code does through a second SVD); the update is
/// `U_perp diag(S_1 .. S_T) V_perp^T`. Any other parameter gets the mean of the task
/// vectors. The merge is `base + alpha * that` (the paper uses `alpha = 1`).
///
/// A weight matrix with `min(rows, cols) < T` leaves no singular triplet per task and is
/// an error naming it. When the kept singular vectors are linearly dependent (for
/// example identical task vectors) the orthogonalisation is not unique: the result is
/// then one valid choice, which may differ from another SVD implementation's.
///
/// Requires the `svd` feature; without it [`TsvMerge::new`] returns
/// [`Error::FeatureDisabled`].
///
/// ```
/// use modelfusion::merge::{Merger, TsvMerge};
/// use modelfusion::{Model, StateDict};
/// use ndarray::array;
/// let base = StateDict::from_pairs([("w", array![[0.0f64, 0.0], [0.0, 0.0]].into_dyn())])?;
/// let a = StateDict::from_pairs([("w", array![[3.0f64, 0.0], [0.0, 0.5]].into_dyn())])?;
/// let b = StateDict::from_pairs([("w", array![[0.0f64, 0.0], [0.0, 1.0]].into_dyn())])?;
/// if cfg!(feature = "svd") {
///     // Each task keeps its top direction: 3 e1 e1^T and 1 e2 e2^T, already orthogonal.
///     let m = TsvMerge::new(base, 1.0)?.merge(&[&a, &b])?;
///     let w = m.get("w").unwrap();
///     assert!((w[[0, 0]] - 3.0).abs() < 1e-12 && (w[[1, 1]] - 1.0).abs() < 1e-12);
///     assert!(w[[0, 1]].abs() < 1e-12 && w[[1, 0]].abs() < 1e-12);
/// }
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct TsvMerge<M> {
    base: M,
    alpha: f64,
}

impl<M: Model> TsvMerge<M> {
    /// TSV-Merge around `base` with scale `alpha` (finite).
    ///
    /// ```
    /// use modelfusion::merge::TsvMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("b", arr1(&[0.0f32]).into_dyn())])?;
    /// assert!(TsvMerge::new(base, f64::INFINITY).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(base: M, alpha: f64) -> Result<Self> {
        crate::error::check_finite("alpha", alpha)?;
        require_feature("TSV-Merge (an SVD per task vector and weight matrix)")?;
        Ok(TsvMerge { base, alpha })
    }

    /// The scale of the merged update.
    ///
    /// ```
    /// use modelfusion::merge::TsvMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("b", arr1(&[0.0f32]).into_dyn())])?;
    /// if let Ok(m) = TsvMerge::new(base, 0.5) { assert_eq!(m.alpha(), 0.5); }
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
}

/// How a method turns the task vectors of one weight matrix into its update.
type MatrixRule = fn(&str, &[Vec<f64>], usize, usize) -> Result<Vec<f64>>;

/// `base + alpha * update` per tensor: `rule` for 2-D parameters, the mean task vector
/// for the rest; computed in `f64`, rounded once to the tensors' type.
fn merge_with<M: Model>(
    base: &M,
    alpha: f64,
    name: &str,
    tensors: &[&M::Tensor],
    rule: MatrixRule,
) -> Result<M::Tensor> {
    let b = kernel::finite_base(base, name, tensors)?;
    let bv = kernel::elems(b);
    let taus: Vec<Vec<f64>> = tensors
        .iter()
        .map(|t| {
            kernel::elems(*t)
                .iter()
                .zip(bv.iter())
                .map(|(&x, &y)| x.to_f64_lossless() - y.to_f64_lossless())
                .collect()
        })
        .collect();
    let shape = b.shape().to_vec();
    let update = match shape[..] {
        [rows, cols] if rows > 0 && cols > 0 => rule(name, &taus, rows, cols)?,
        _ => {
            let k = taus.len() as f64;
            (0..bv.len())
                .map(|j| taus.iter().map(|t| t[j]).sum::<f64>() / k)
                .collect()
        }
    };
    let data: Vec<<M::Tensor as Tensor>::Elem> = bv
        .iter()
        .zip(&update)
        .map(|(&y, &u)| {
            <M::Tensor as Tensor>::Elem::from_f64_lossy(y.to_f64_lossless() + alpha * u)
        })
        .collect();
    let extra = [("the base model", b)];
    kernel::check_merged(name, tensors, &extra, &data, || {
        kernel::overflow_error("alpha", alpha, name)
    })?;
    kernel::build(&shape, data)
}

impl<M: Model> TensorMerger<M::Tensor> for IsoC<M> {
    fn merge_tensor(&self, name: &str, tensors: &[&M::Tensor]) -> Result<M::Tensor> {
        merge_with(&self.base, self.alpha, name, tensors, linalg::iso_c)
    }
}

impl<M: Model> TensorMerger<M::Tensor> for TsvMerge<M> {
    fn merge_tensor(&self, name: &str, tensors: &[&M::Tensor]) -> Result<M::Tensor> {
        merge_with(&self.base, self.alpha, name, tensors, linalg::tsv)
    }
}

#[cfg(feature = "svd")]
mod linalg {
    use faer::{Mat, MatRef};

    use crate::error::{Error, Result};

    /// The thin SVD `(U, s, V)` of the row-major `rows x cols` matrix `x`.
    fn svd(name: &str, x: MatRef<'_, f64>) -> Result<(Mat<f64>, Vec<f64>, Mat<f64>)> {
        let d = x.thin_svd().map_err(|e| {
            Error::invalid(
                "models",
                format!(
                    "the SVD of a {} x {} matrix for parameter `{name}` did not converge ({e:?})",
                    x.nrows(),
                    x.ncols()
                ),
            )
        })?;
        let s = d.S().column_vector().iter().copied().collect();
        Ok((d.U().to_owned(), s, d.V().to_owned()))
    }

    fn matrix(x: &[f64], rows: usize, cols: usize) -> Mat<f64> {
        Mat::from_fn(rows, cols, |i, j| x[i * cols + j])
    }

    /// `sum_k u_k s_k v_k^T` over the columns of `u` and `v`, row-major.
    fn compose(u: MatRef<'_, f64>, s: &[f64], v: MatRef<'_, f64>) -> Vec<f64> {
        let mut us = u.to_owned();
        for (k, &sk) in s.iter().enumerate() {
            for i in 0..us.nrows() {
                us[(i, k)] *= sk;
            }
        }
        let prod = &us * v.transpose();
        let (rows, cols) = (prod.nrows(), prod.ncols());
        (0..rows * cols)
            .map(|at| prod[(at / cols, at % cols)])
            .collect()
    }

    /// The polar factor `P Q^T` of `x = P Sigma Q^T`: the closest matrix with
    /// orthonormal columns.
    fn polar(name: &str, x: MatRef<'_, f64>) -> Result<Mat<f64>> {
        let (p, _, q) = svd(name, x)?;
        Ok(&p * q.transpose())
    }

    pub(super) fn iso_c(
        name: &str,
        taus: &[Vec<f64>],
        rows: usize,
        cols: usize,
    ) -> Result<Vec<f64>> {
        let sum: Vec<f64> = (0..rows * cols)
            .map(|j| taus.iter().map(|t| t[j]).sum())
            .collect();
        let (u, s, v) = svd(name, matrix(&sum, rows, cols).as_ref())?;
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        Ok(compose(u.as_ref(), &vec![mean; s.len()], v.as_ref()))
    }

    pub(super) fn tsv(name: &str, taus: &[Vec<f64>], rows: usize, cols: usize) -> Result<Vec<f64>> {
        let t = taus.len();
        let k = rows.min(cols) / t;
        if k == 0 {
            return Err(Error::invalid(
                "models",
                format!(
                    "TSV-Merge keeps floor(min(rows, cols) / models) singular vectors per model: \
                     parameter `{name}` is {rows} x {cols} and there are {t} models, which leaves none"
                ),
            ));
        }
        let mut u = Mat::<f64>::zeros(rows, t * k);
        let mut v = Mat::<f64>::zeros(cols, t * k);
        let mut s = Vec::with_capacity(t * k);
        for (i, tau) in taus.iter().enumerate() {
            let (ui, si, vi) = svd(name, matrix(tau, rows, cols).as_ref())?;
            for c in 0..k {
                for r in 0..rows {
                    u[(r, i * k + c)] = ui[(r, c)];
                }
                for r in 0..cols {
                    v[(r, i * k + c)] = vi[(r, c)];
                }
            }
            s.extend_from_slice(&si[..k]);
        }
        let pu = polar(name, u.as_ref())?;
        let pv = polar(name, v.as_ref())?;
        Ok(compose(pu.as_ref(), &s, pv.as_ref()))
    }
}

#[cfg(not(feature = "svd"))]
mod linalg {
    use crate::error::Result;

    // Unreachable: the constructors refuse to build a merger without the feature.
    pub(super) fn iso_c(_: &str, _: &[Vec<f64>], _: usize, _: usize) -> Result<Vec<f64>> {
        super::require_feature("Iso-C").map(|()| Vec::new())
    }

    pub(super) fn tsv(_: &str, _: &[Vec<f64>], _: usize, _: usize) -> Result<Vec<f64>> {
        super::require_feature("TSV-Merge").map(|()| Vec::new())
    }
}
