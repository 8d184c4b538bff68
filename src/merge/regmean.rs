//! RegMean (Jin et al. 2023): merge each linear layer by the closed-form minimiser of
//! the summed regression losses on every model's layer inputs.
//!
//! Solving needs LAPACK: build with the `linalg` feature and a backend (e.g.
//! `--features openblas-system`). Without it, [`gram_matrices`] still works but
//! [`RegMean::new`] returns [`Error::FeatureDisabled`], so a merge that cannot run fails
//! before any tensor is touched.

use std::collections::BTreeMap;

use ndarray::Array2;

use super::TensorMerger;
use super::kernel::{self, check_count, check_shapes};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::objective::Activations;
use crate::tensor::{Scalar, Tensor};

/// Gram matrices `G = X^T X / n` of each linear layer's inputs, keyed by the layer's
/// weight parameter name (`(in, in)`, in `f64`).
pub type Grams = BTreeMap<String, Array2<f64>>;

/// Default off-diagonal scaling of RegMean (the paper's range is 0.9 to 0.95).
pub const DEFAULT_REGMEAN_ALPHA: f64 = 0.9;

/// Accumulates `G = X^T X / n` over every batch of `activations` (keys: weight
/// parameter names; columns: that layer's inputs; `n` = total rows per key). Errors on
/// no batches, no rows, or a key whose column count changes between batches.
///
/// ```
/// use modelfusion::merge::gram_matrices;
/// use modelfusion::{Activations, Features, Result, StateDict, StateDictF64};
/// use ndarray::array;
///
/// struct Inputs;
/// impl Activations<StateDictF64> for Inputs {
///     fn num_batches(&self) -> usize { 2 }
///     fn activations(&self, _: &StateDictF64, b: usize) -> Result<Features<f64>> {
///         let x = if b == 0 { array![[1.0, 0.0]] } else { array![[0.0, 2.0]] };
///         Ok([("fc.weight".to_string(), x)].into())
///     }
/// }
/// let g = gram_matrices(&StateDict::new(), &Inputs)?;
/// assert_eq!(g["fc.weight"], array![[0.5, 0.0], [0.0, 2.0]]);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn gram_matrices<M: Model, A: Activations<M> + ?Sized>(
    model: &M,
    activations: &A,
) -> Result<Grams> {
    let nb = activations.num_batches();
    if nb == 0 {
        return Err(Error::empty("the activation batches for RegMean"));
    }
    let mut sums: BTreeMap<String, (Array2<f64>, usize)> = BTreeMap::new();
    for b in 0..nb {
        for (key, x) in activations.activations(model, b)? {
            let x = x.mapv(|v| v.to_f64_lossless());
            let g = x.t().dot(&x);
            match sums.get_mut(&key) {
                Some((acc, n)) => {
                    if acc.dim() != g.dim() {
                        return Err(Error::shape(
                            format!("layer inputs of `{key}` in batch {b}"),
                            &[acc.nrows()],
                            &[g.nrows()],
                        ));
                    }
                    *acc += &g;
                    *n += x.nrows();
                }
                None => {
                    sums.insert(key, (g, x.nrows()));
                }
            }
        }
    }
    sums.into_iter()
        .map(|(k, (g, n))| {
            if n == 0 {
                return Err(Error::empty(format!("the layer inputs of `{k}`")));
            }
            Ok((k, g / n as f64))
        })
        .collect()
}

/// RegMean: for every weight `W` (`(out, in)`) that has Gram matrices,
/// `W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T` with `G~ = alpha G + (1 - alpha) diag(G)`
/// (off-diagonals scaled by `alpha`); every other parameter is the plain mean. The
/// system is solved by Cholesky, falling back to an SVD pseudo-inverse when the summed
/// Gram matrix is singular (e.g. an input that is always zero).
///
/// Requires the `linalg` feature; without it [`RegMean::new`] returns
/// [`Error::FeatureDisabled`].
///
/// ```
/// use modelfusion::merge::RegMean;
/// use ndarray::array;
/// let g: modelfusion::merge::Grams = [("fc.weight".to_string(), array![[1.0, 0.0], [0.0, 1.0]])].into();
/// let r = RegMean::new(vec![g.clone(), g], 0.9);
/// if cfg!(feature = "linalg") {
///     assert!(r.is_ok());
/// } else {
///     assert!(matches!(r, Err(modelfusion::Error::FeatureDisabled { .. })));
/// }
/// ```
#[derive(Clone, Debug)]
pub struct RegMean {
    grams: Vec<Grams>,
    alpha: f64,
}

impl RegMean {
    /// RegMean with one set of Gram matrices per model (same keys and sizes for every
    /// model, square, finite) and `alpha` in `[0, 1]`.
    ///
    /// ```
    /// use modelfusion::merge::RegMean;
    /// use ndarray::array;
    /// let g: modelfusion::merge::Grams = [("w".to_string(), array![[1.0, 0.0]])].into();
    /// assert!(RegMean::new(vec![g], 0.9).is_err()); // not square (or feature off)
    /// assert!(RegMean::new(vec![], 0.9).is_err());
    /// ```
    pub fn new(grams: Vec<Grams>, alpha: f64) -> Result<Self> {
        crate::error::check_fraction("alpha", alpha)?;
        let first = grams
            .first()
            .ok_or_else(|| Error::empty("the list of Gram matrices"))?;
        for (i, g) in grams.iter().enumerate() {
            if g.len() != first.len() || g.keys().zip(first.keys()).any(|(a, b)| a != b) {
                return Err(Error::NameMismatch {
                    detail: format!(
                        "Gram matrices of model {i} have keys {:?}, model 0 has {:?}",
                        g.keys().collect::<Vec<_>>(),
                        first.keys().collect::<Vec<_>>()
                    ),
                });
            }
            for (k, m) in g {
                let d0 = first[k].nrows();
                if m.nrows() != m.ncols() || m.nrows() != d0 {
                    return Err(Error::shape(
                        format!("Gram matrix of `{k}` for model {i}"),
                        &[d0, d0],
                        m.shape(),
                    ));
                }
                if m.iter().any(|v| !v.is_finite()) {
                    return Err(Error::NonFinite {
                        what: format!("Gram matrix of `{k}` for model {i}"),
                    });
                }
            }
        }
        if !cfg!(feature = "linalg") {
            return Err(Error::FeatureDisabled {
                feature: "linalg",
                what: "RegMean's linear solves".into(),
            });
        }
        Ok(RegMean { grams, alpha })
    }

    /// The off-diagonal scaling.
    ///
    /// ```
    /// # #[cfg(feature = "linalg")] {
    /// use modelfusion::merge::RegMean;
    /// use ndarray::array;
    /// let g: modelfusion::merge::Grams = [("w".to_string(), array![[1.0]])].into();
    /// assert_eq!(RegMean::new(vec![g], 0.95).unwrap().alpha(), 0.95);
    /// # }
    /// ```
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The regularised, summed Gram matrix and right-hand side of layer `name`.
    fn system<T: Tensor>(&self, name: &str, tensors: &[&T]) -> Result<(Array2<f64>, Array2<f64>)> {
        let shape = tensors[0].shape();
        let d = self.grams[0][name].nrows();
        if shape.len() != 2 || shape[1] != d {
            return Err(Error::shape(
                format!("weight `{name}` (RegMean expects (out, in) with in = Gram size)"),
                &[shape.first().copied().unwrap_or(0), d],
                shape,
            ));
        }
        let mut a = Array2::<f64>::zeros((d, d));
        let mut rhs = Array2::<f64>::zeros((d, shape[0]));
        for (g, t) in self.grams.iter().zip(tensors) {
            let mut gt = g[name].mapv(|v| v * self.alpha);
            for k in 0..d {
                gt[[k, k]] = g[name][[k, k]];
            }
            let w = t.unfold(0)?.mapv(|v| v.to_f64_lossless()); // (out, in)
            rhs += &gt.dot(&w.t());
            a += &gt;
        }
        Ok((a, rhs))
    }
}

#[cfg(feature = "linalg")]
fn solve_spd(a: &Array2<f64>, b: &Array2<f64>) -> Result<Array2<f64>> {
    use ndarray_linalg::{FactorizeC, JobSvd, SVDDC, SolveC, UPLO};
    if let Ok(f) = a.factorizec(UPLO::Lower) {
        let mut x = Array2::<f64>::zeros(b.raw_dim());
        for (j, col) in b.columns().into_iter().enumerate() {
            let sol = f.solvec(&col.to_owned()).map_err(|e| Error::Infeasible {
                reason: format!("RegMean solve: {e}"),
            })?;
            x.column_mut(j).assign(&sol);
        }
        return Ok(x);
    }
    // Singular: Moore-Penrose pseudo-inverse through the SVD.
    let (u, s, vt) = a.svddc(JobSvd::All).map_err(|e| Error::Infeasible {
        reason: format!("RegMean SVD: {e}"),
    })?;
    let (u, vt) = match (u, vt) {
        (Some(u), Some(vt)) => (u, vt),
        _ => {
            return Err(Error::Infeasible {
                reason: "RegMean SVD returned no singular vectors".into(),
            });
        }
    };
    let smax = s.iter().cloned().fold(0.0, f64::max);
    let cut = smax * a.nrows() as f64 * f64::EPSILON;
    let mut utb = u.t().dot(b);
    for (i, mut row) in utb.rows_mut().into_iter().enumerate() {
        let si = s[i];
        let inv = if si > cut { 1.0 / si } else { 0.0 };
        row.mapv_inplace(|v| v * inv);
    }
    Ok(vt.t().dot(&utb))
}

#[cfg(not(feature = "linalg"))]
fn solve_spd(_: &Array2<f64>, _: &Array2<f64>) -> Result<Array2<f64>> {
    Err(Error::FeatureDisabled {
        feature: "linalg",
        what: "RegMean's linear solves".into(),
    })
}

impl<T: Tensor> TensorMerger<T> for RegMean {
    fn merge_tensor(&self, name: &str, tensors: &[&T]) -> Result<T> {
        check_shapes(name, tensors)?;
        check_count(tensors.len(), self.grams.len(), "Gram matrix sets", name)?;
        if !self.grams[0].contains_key(name) {
            return super::Average::uniform().merge_tensor(name, tensors);
        }
        let (a, rhs) = self.system(name, tensors)?;
        let wt = solve_spd(&a, &rhs)?; // (in, out)
        let w = wt.t().mapv(T::Elem::from_f64_lossy);
        let data: Vec<T::Elem> = w.iter().copied().collect();
        kernel::check_merged(name, tensors, &[], &data, || {
            Error::invalid(
                "grams",
                format!(
                    "the RegMean solve for parameter `{name}` overflows (ill-conditioned Gram matrices)"
                ),
            )
        })?;
        kernel::build(tensors[0].shape(), data)
    }
}
