//! ZipIt! (Stoica et al. 2023): merging correlated features within and across two
//! models with merge and unmerge matrices.

use std::collections::BTreeMap;

use ndarray::{Array2, ArrayD, ArrayView2, Axis, concatenate, s};

use super::activation::{in_batch, stream_pairs};
use super::stats::CrossMoments;
use super::{check_pair, map_axis, refuse_heads};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::objective::Activations;
use crate::perm::specs::{Architecture, MlpShapes};
use crate::perm::{Permutation, PermutationSet, PermutationSpec, Role};
use crate::progress::{Observer, Silent};
use crate::tensor::{Scalar, Tensor};

/// ZipIt!: merges two models of the same architecture feature by feature, pairing
/// correlated units across the models *and within each model*.
///
/// For every permutation group of the spec (width `n` in both models) it streams the
/// group's features of both models over the batches of an [`Activations`] source (the
/// same source [`ActivationMatching`](super::ActivationMatching) reads), accumulates the
/// covariance of the `2n` concatenated features (`[A's units, B's units]`, in `f64`) and
/// its Pearson correlation `C`, then matches greedily: the pair of still unmatched
/// features with the highest score is merged first, until all `2n` features form `n`
/// pairs ([`GroupZip::from_correlation`]). A cross-model pair scores `C[i, j]`, a
/// within-model pair `alpha * C[i, j]`.
///
/// Options (the paper's Section 4.3; what is implemented):
/// - `alpha` in `[0, 1]` ([`with_alpha`](Self::with_alpha), default 1): the penalty on
///   within-model pairs; `alpha = 0` forbids them, and ZipIt! is then greedy permutation
///   matching followed by averaging ([`Zip::permutations`]).
/// - `beta` in `[0, 1]` ([`with_beta`](Self::with_beta), default 1): the same-model
///   budget: at most `floor(beta * n / 2)` within-model pairs per model (a fraction
///   `beta` of a model's units may be merged with units of the same model).
/// - Each feature is merged exactly once (pairs): the paper's repeated merging of
///   already merged features (its `alpha` as a repeated-match penalty) is not
///   implemented.
///
/// Each group's pairs give a merge matrix `M` (`n x 2n`: merged unit `k` is the mean of
/// its two features) and an unmerge matrix `U` (`2n x n`: both features are read back
/// as the merged one), `M U = I`. [`Zip::merge`] applies them to the weights (full
/// zipping, any spec without attention heads); [`Zip::partial_mlp`] zips only the first
/// `k` layers of an MLP and keeps two tails whose logits are averaged.
///
/// A unit that is constant on the data (a dead ReLU) has no correlation: by default an
/// error names it; [`with_constant_units`](Self::with_constant_units) accepts such units
/// as uncorrelated with everything (score 0), as the reference implementation's clamped
/// standard deviation does.
///
/// ```
/// use modelfusion::align::ZipIt;
/// use modelfusion::perm::{specs::{Architecture, MlpShapes}, PermutationSet};
/// use modelfusion::{Activations, Features, Model, Result, StateDictF32};
/// use ndarray::{Array2, Ix2};
///
/// /// Post-ReLU hidden features of a 1-hidden-layer MLP on fixed inputs.
/// struct Hidden(Array2<f32>);
/// impl Activations<StateDictF32> for Hidden {
///     fn num_batches(&self) -> usize { 1 }
///     fn activations(&self, m: &StateDictF32, _: usize) -> Result<Features<f32>> {
///         let w = m.get("layers.0.weight").unwrap().clone().into_dimensionality::<Ix2>().unwrap();
///         let h = (self.0.dot(&w.t()) + m.get("layers.0.bias").unwrap()).mapv(|v| v.max(0.0));
///         Ok([("hidden.0".to_string(), h.into_dimensionality::<Ix2>().unwrap())].into())
///     }
/// }
/// let arch = MlpShapes::new(&[5, 12, 2])?;
/// let spec = arch.spec();
/// let a = arch.random_model(0);
/// let b = spec.apply(&PermutationSet::random(&spec, &a, 3)?, &a)?; // a shuffled copy
/// let x = Array2::from_shape_fn((64, 5), |(i, j)| ((i * 7 + j * 3) % 11) as f32 / 5.0 - 1.0);
/// let zip = ZipIt::new(Hidden(x)).zip(&a, &b, &spec)?;
/// assert_eq!(zip.get("hidden.0").unwrap().within(), (0, 0)); // every unit found its twin
/// assert!(zip.merge(&a, &b)?.max_abs_diff(&a)? < 1e-6);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ZipIt<A> {
    activations: A,
    alpha: f64,
    beta: f64,
    constant_units: bool,
}

impl<A> ZipIt<A> {
    /// ZipIt! on the features `activations` gives, within-model pairs allowed
    /// (`alpha = 1`, `beta = 1`), constant units refused.
    ///
    /// ```
    /// let z = modelfusion::align::ZipIt::new(());
    /// assert_eq!((z.alpha(), z.beta()), (1.0, 1.0));
    /// ```
    pub fn new(activations: A) -> Self {
        ZipIt {
            activations,
            alpha: 1.0,
            beta: 1.0,
            constant_units: false,
        }
    }

    /// The within-model penalty: within-model pairs score `alpha` times their
    /// correlation; `0` forbids them. Errors outside `[0, 1]`.
    ///
    /// ```
    /// use modelfusion::align::ZipIt;
    /// assert_eq!(ZipIt::new(()).with_alpha(0.0)?.alpha(), 0.0);
    /// assert!(ZipIt::new(()).with_alpha(1.5).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_alpha(mut self, alpha: f64) -> Result<Self> {
        self.alpha = check_unit("alpha", alpha)?;
        Ok(self)
    }

    /// The same-model budget: at most `floor(beta * n / 2)` within-model pairs per
    /// model in a group of width `n`. Errors outside `[0, 1]`.
    ///
    /// ```
    /// use modelfusion::align::ZipIt;
    /// assert_eq!(ZipIt::new(()).with_beta(0.25)?.beta(), 0.25);
    /// assert!(ZipIt::new(()).with_beta(f64::NAN).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_beta(mut self, beta: f64) -> Result<Self> {
        self.beta = check_unit("beta", beta)?;
        Ok(self)
    }

    /// Whether units constant over the data are accepted (as uncorrelated with every
    /// other unit) instead of being an error.
    ///
    /// ```
    /// let z = modelfusion::align::ZipIt::new(()).with_constant_units(true);
    /// # let _ = z;
    /// ```
    pub fn with_constant_units(mut self, accept: bool) -> Self {
        self.constant_units = accept;
        self
    }

    /// The within-model penalty.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::ZipIt::new(()).alpha(), 1.0);
    /// ```
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The same-model budget.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::ZipIt::new(()).beta(), 1.0);
    /// ```
    pub fn beta(&self) -> f64 {
        self.beta
    }

    /// The activation source.
    ///
    /// ```
    /// assert_eq!(*modelfusion::align::ZipIt::new(7u8).activations(), 7);
    /// ```
    pub fn activations(&self) -> &A {
        &self.activations
    }

    /// Matches every group of `spec` between `a` and `b` (see the type's docs).
    ///
    /// Errors when the spec does not fit both models or has attention groups, the
    /// models differ in shape or hold a non-finite value, the source has no batches, a
    /// batch lacks a group or has the wrong width, fewer than two samples were seen, or
    /// a unit is constant (unless accepted).
    ///
    /// ```
    /// use modelfusion::align::ZipIt;
    /// use modelfusion::nn::{data, Classification, Mlp, Network};
    /// use modelfusion::perm::specs::Architecture;
    /// use modelfusion::StateDictF32;
    /// let d = data::digits()?.head(200);
    /// let net = Mlp::new(&[64, 16, 10])?;
    /// let (a, b): (StateDictF32, StateDictF32) = (net.init(0), net.init(1));
    /// let task = Classification::new(&net, &d, 100)?;
    /// let zip = ZipIt::new(task).with_constant_units(true).zip(&a, &b, &net.spec())?;
    /// assert_eq!(zip.get("hidden.0").unwrap().merge().dim(), (16, 32));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn zip<M: Model>(&self, a: &M, b: &M, spec: &PermutationSpec) -> Result<Zip>
    where
        A: Activations<M>,
    {
        self.zip_observed(a, b, spec, &mut Silent)
    }

    /// [`zip`](Self::zip), reporting every batch of statistics to `observer`
    /// ([`Progress::Batch`](crate::progress::Progress::Batch)); a break cancels.
    ///
    /// ```
    /// use modelfusion::align::ZipIt;
    /// use modelfusion::nn::{data, Classification, Mlp, Network};
    /// use modelfusion::perm::specs::Architecture;
    /// use modelfusion::progress::from_fn;
    /// use modelfusion::StateDictF32;
    /// let d = data::digits()?.head(200);
    /// let net = Mlp::new(&[64, 16, 10])?;
    /// let (a, b): (StateDictF32, StateDictF32) = (net.init(0), net.init(1));
    /// let z = ZipIt::new(Classification::new(&net, &d, 50)?).with_constant_units(true);
    /// let mut n = 0;
    /// z.zip_observed(&a, &b, &net.spec(), &mut from_fn(|_| n += 1))?;
    /// assert_eq!(n, 4);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn zip_observed<M: Model>(
        &self,
        a: &M,
        b: &M,
        spec: &PermutationSpec,
        observer: &mut dyn Observer,
    ) -> Result<Zip>
    where
        A: Activations<M>,
    {
        refuse_heads(spec, "ZipIt!")?;
        let sizes = check_pair(a, b, spec)?;
        let mut joint: BTreeMap<String, CrossMoments> = sizes
            .iter()
            .map(|(g, &n)| (g.clone(), CrossMoments::new(2 * n, 2 * n)))
            .collect();
        stream_pairs(
            &self.activations,
            (a, b),
            &mut joint,
            "ZipIt! statistics",
            observer,
            |g, batch, cm, xa, xb| {
                let n = cm.count_columns() / 2;
                for (x, which) in [(xa, "reference"), (xb, "other")] {
                    if x.ncols() != n {
                        return Err(Error::shape(
                            format!(
                                "features (samples, units) of group `{g}` in batch {batch} of the {which} model (the group's width)"
                            ),
                            &[x.nrows(), n],
                            &[x.nrows(), x.ncols()],
                        ));
                    }
                }
                if xa.nrows() != xb.nrows() {
                    return Err(Error::invalid(
                        "activations",
                        format!(
                            "the two models' batches have different sample counts ({} vs {}) in batch {batch}, group `{g}`",
                            xa.nrows(),
                            xb.nrows()
                        ),
                    ));
                }
                let x = concatenate(Axis(1), &[xa.view(), xb.view()])
                    .map_err(|e| Error::invalid("activations", e.to_string()))?;
                cm.update(x.view(), x.view())
                    .map_err(|e| in_batch(e, g, batch))
            },
        )?;
        let mut groups = BTreeMap::new();
        for (g, cm) in joint {
            let corr = self.correlation(&g, &cm)?;
            let gz = GroupZip::from_correlation(corr.view(), self.alpha, self.beta)?;
            groups.insert(g, gz);
        }
        Ok(Zip {
            groups,
            spec: spec.clone(),
        })
    }

    /// The Pearson correlation of a group's `2n` joint features; constant units are an
    /// error or uncorrelated.
    fn correlation(&self, g: &str, cm: &CrossMoments) -> Result<Array2<f64>> {
        if cm.count() < 2 {
            return Err(Error::invalid(
                "activations",
                format!(
                    "group `{g}`: ZipIt! needs at least 2 samples for correlations, got {}",
                    cm.count()
                ),
            ));
        }
        let moments = cm.x();
        let n = moments.mean().len() / 2;
        let std = moments.variance().mapv(f64::sqrt);
        let constant: Vec<usize> = (0..2 * n)
            .filter(|&i| std[i] <= 1e-12 * (1.0 + moments.mean()[i].abs()))
            .collect();
        if let Some(&i) = constant.first().filter(|_| !self.constant_units) {
            let (which, unit) = if i < n {
                ("reference", i)
            } else {
                ("other", i - n)
            };
            return Err(Error::invalid(
                "activations",
                format!(
                    "unit {unit} of group `{g}` is constant over the data in the {which} model ({} constant units in all), so it has no correlation; use `with_constant_units(true)` to treat such units as uncorrelated",
                    constant.len()
                ),
            ));
        }
        let mut corr = cm.correlation(0.0);
        for &i in &constant {
            corr.row_mut(i).fill(0.0);
            corr.column_mut(i).fill(0.0);
        }
        Ok(corr)
    }
}

impl CrossMoments {
    fn count_columns(&self) -> usize {
        self.x().mean().len()
    }
}

fn check_unit(param: &str, v: f64) -> Result<f64> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(Error::invalid(
            param,
            format!("must lie in [0, 1], got {v}"),
        ))
    }
}

/// One group's ZipIt! matching: `n` pairs of the `2n` features `[A's units, B's
/// units]`, with the merge matrix `M` (`n x 2n`) and unmerge matrix `U` (`2n x n`).
///
/// Merged unit `k` is the `k`-th pair in the order of its smaller member, so with only
/// cross-model pairs merged unit `k` is A's unit `k` and B's unit `perm[k]`.
///
/// ```
/// use modelfusion::align::GroupZip;
/// use ndarray::array;
/// // features a0, a1, b0, b1: a0 ~ b1 and a1 ~ b0
/// let c = array![
///     [1.0, 0.1, 0.2, 0.9],
///     [0.1, 1.0, 0.8, 0.3],
///     [0.2, 0.8, 1.0, 0.0],
///     [0.9, 0.3, 0.0, 1.0],
/// ];
/// let z = GroupZip::from_correlation(c.view(), 1.0, 1.0)?;
/// assert_eq!(z.pairs(), &[(0, 3), (1, 2)]);
/// assert_eq!(z.permutation().unwrap().as_slice(), &[1, 0]);
/// assert_eq!(z.merge()[[0, 0]], 0.5);
/// assert_eq!(z.unmerge()[[3, 0]], 1.0);
/// assert_eq!(z.merge().dot(z.unmerge()), ndarray::Array2::<f64>::eye(2));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct GroupZip {
    width: usize,
    pairs: Vec<(usize, usize)>,
    merge: Array2<f64>,
    unmerge: Array2<f64>,
    mean_correlation: f64,
}

impl GroupZip {
    /// Greedy ZipIt! matching on the correlation `corr` (`2n x 2n`, only its upper
    /// triangle is read) of `[A's units, B's units]`: candidate pairs `(i < j)` sorted
    /// by score (cross-model `corr[i, j]`, within-model `alpha * corr[i, j]`, none when
    /// `alpha = 0`; ties by `(i, j)`), each taken when both features are still
    /// unmatched and, for a within-model pair, its model has budget left
    /// (`floor(beta * n / 2)` pairs).
    ///
    /// Errors on a non-square or odd-sized matrix, an empty one, a non-finite entry, or
    /// `alpha` / `beta` outside `[0, 1]`.
    ///
    /// ```
    /// use modelfusion::align::GroupZip;
    /// use ndarray::array;
    /// // a0 ~ a1 strongly: merged within A when allowed (and B's two units then pair up)
    /// let c = array![
    ///     [1.0, 0.95, 0.5, 0.4],
    ///     [0.95, 1.0, 0.3, 0.5],
    ///     [0.5, 0.3, 1.0, 0.2],
    ///     [0.4, 0.5, 0.2, 1.0],
    /// ];
    /// assert_eq!(GroupZip::from_correlation(c.view(), 1.0, 1.0)?.pairs(), &[(0, 1), (2, 3)]);
    /// assert_eq!(GroupZip::from_correlation(c.view(), 1.0, 1.0)?.within(), (1, 1));
    /// assert_eq!(GroupZip::from_correlation(c.view(), 0.0, 1.0)?.pairs(), &[(0, 2), (1, 3)]);
    /// assert!(GroupZip::from_correlation(c.view(), 2.0, 1.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn from_correlation(corr: ArrayView2<f64>, alpha: f64, beta: f64) -> Result<Self> {
        let alpha = check_unit("alpha", alpha)?;
        let beta = check_unit("beta", beta)?;
        let (r, c) = corr.dim();
        if r != c || r % 2 != 0 {
            return Err(Error::shape(
                "ZipIt! correlation matrix (2n x 2n over both models' units)",
                &[2 * (r / 2).max(1), 2 * (r / 2).max(1)],
                &[r, c],
            ));
        }
        if r == 0 {
            return Err(Error::empty(
                "the ZipIt! correlation matrix (a group of width 0)",
            ));
        }
        if let Some(((i, j), v)) = corr.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: format!("the ZipIt! correlation matrix at ({i}, {j}): {v}"),
            });
        }
        let n = r / 2;
        let model = |i: usize| usize::from(i >= n);
        let mut candidates: Vec<(f64, usize, usize)> = Vec::new();
        for i in 0..r {
            for j in i + 1..r {
                if model(i) != model(j) {
                    candidates.push((corr[[i, j]], i, j));
                } else if alpha > 0.0 {
                    candidates.push((alpha * corr[[i, j]], i, j));
                }
            }
        }
        candidates.sort_by(|x, y| y.0.total_cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2))));
        let mut budget = [((beta * n as f64) / 2.0 + 1e-9).floor() as usize; 2];
        let mut matched = vec![false; r];
        let mut pairs = Vec::with_capacity(n);
        for (_, i, j) in candidates {
            if matched[i] || matched[j] {
                continue;
            }
            if model(i) == model(j) {
                if budget[model(i)] == 0 {
                    continue;
                }
                budget[model(i)] -= 1;
            }
            matched[i] = true;
            matched[j] = true;
            pairs.push((i, j));
            if pairs.len() == n {
                break;
            }
        }
        if pairs.len() != n {
            return Err(Error::Infeasible {
                reason: format!(
                    "ZipIt! matched only {} of {n} pairs (within-model budget exhausted)",
                    pairs.len()
                ),
            });
        }
        pairs.sort_unstable();
        let mut merge = Array2::zeros((n, r));
        let mut unmerge = Array2::zeros((r, n));
        for (k, &(i, j)) in pairs.iter().enumerate() {
            merge[[k, i]] = 0.5;
            merge[[k, j]] = 0.5;
            unmerge[[i, k]] = 1.0;
            unmerge[[j, k]] = 1.0;
        }
        let mean_correlation = pairs.iter().map(|&(i, j)| corr[[i, j]]).sum::<f64>() / n as f64;
        Ok(GroupZip {
            width: n,
            pairs,
            merge,
            unmerge,
            mean_correlation,
        })
    }

    /// The group's width `n` in each model.
    ///
    /// ```
    /// let z = modelfusion::align::GroupZip::from_correlation(ndarray::Array2::eye(4).view(), 1.0, 1.0)?;
    /// assert_eq!(z.width(), 2);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn width(&self) -> usize {
        self.width
    }

    /// The pairs `(i, j)`, `i < j`, of indices into `[A's units, B's units]`, in merged
    /// unit order.
    ///
    /// ```
    /// let z = modelfusion::align::GroupZip::from_correlation(ndarray::Array2::eye(2).view(), 1.0, 1.0)?;
    /// assert_eq!(z.pairs(), &[(0, 1)]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn pairs(&self) -> &[(usize, usize)] {
        &self.pairs
    }

    /// The merge matrix `M`, `(n, 2n)`: merged unit `k` is the mean of its pair.
    ///
    /// ```
    /// let z = modelfusion::align::GroupZip::from_correlation(ndarray::Array2::eye(2).view(), 1.0, 1.0)?;
    /// assert_eq!(z.merge(), ndarray::array![[0.5, 0.5]]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn merge(&self) -> &Array2<f64> {
        &self.merge
    }

    /// The unmerge matrix `U`, `(2n, n)`: both members of a pair read the merged unit.
    ///
    /// ```
    /// let z = modelfusion::align::GroupZip::from_correlation(ndarray::Array2::eye(2).view(), 1.0, 1.0)?;
    /// assert_eq!(z.unmerge(), ndarray::array![[1.0], [1.0]]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn unmerge(&self) -> &Array2<f64> {
        &self.unmerge
    }

    /// The number of within-model pairs in A and in B (always equal: both models
    /// contribute `n` units to `n` pairs).
    ///
    /// ```
    /// let z = modelfusion::align::GroupZip::from_correlation(ndarray::Array2::eye(4).view(), 0.0, 1.0)?;
    /// assert_eq!(z.within(), (0, 0));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn within(&self) -> (usize, usize) {
        let n = self.width;
        let count = |m: usize| {
            self.pairs
                .iter()
                .filter(|&&(i, j)| usize::from(i >= n) == m && usize::from(j >= n) == m)
                .count()
        };
        (count(0), count(1))
    }

    /// The mean correlation of the merged pairs.
    ///
    /// ```
    /// let z = modelfusion::align::GroupZip::from_correlation(ndarray::Array2::ones((2, 2)).view(), 1.0, 1.0)?;
    /// assert_eq!(z.mean_correlation(), 1.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn mean_correlation(&self) -> f64 {
        self.mean_correlation
    }

    /// The permutation of B's units onto A's (`perm[k]`: B's unit merged with A's unit
    /// `k`), when every pair is cross-model.
    ///
    /// ```
    /// let z = modelfusion::align::GroupZip::from_correlation(ndarray::Array2::eye(2).view(), 1.0, 1.0)?;
    /// assert_eq!(z.permutation().unwrap().as_slice(), &[0]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn permutation(&self) -> Option<Permutation> {
        let n = self.width;
        if self.within() != (0, 0) {
            return None;
        }
        Permutation::new(self.pairs.iter().map(|&(_, j)| j - n).collect()).ok()
    }

    /// Model `m`'s block of `M`, `(n, n)`.
    fn merge_block(&self, m: usize) -> Array2<f64> {
        let n = self.width;
        self.merge.slice(s![.., m * n..(m + 1) * n]).to_owned()
    }

    /// The transpose of model `m`'s block of `U`, `(n merged, n own)`: the map along a
    /// consuming axis.
    fn unmerge_map(&self, m: usize) -> Array2<f64> {
        let n = self.width;
        self.unmerge
            .slice(s![m * n..(m + 1) * n, ..])
            .t()
            .to_owned()
    }
}

/// The ZipIt! matching of every group of a spec ([`ZipIt::zip`]), which merges the two
/// models it was computed for.
///
/// ```
/// use modelfusion::align::{Zip, ZipIt};
/// # use modelfusion::nn::{data, Classification, Mlp, Network};
/// # use modelfusion::perm::specs::Architecture;
/// # use modelfusion::StateDictF32;
/// # let d = data::digits()?.head(100);
/// # let net = Mlp::new(&[64, 8, 10])?;
/// # let (a, b): (StateDictF32, StateDictF32) = (net.init(0), net.init(1));
/// let zip: Zip = ZipIt::new(Classification::new(&net, &d, 100)?)
///     .with_constant_units(true)
///     .zip(&a, &b, &net.spec())?;
/// assert_eq!(zip.iter().count(), 1);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Zip {
    groups: BTreeMap<String, GroupZip>,
    spec: PermutationSpec,
}

/// A partially zipped MLP ([`Zip::partial_mlp`]): the first `zipped` hidden layers
/// shared, then both models' remaining layers side by side, their logits averaged. It
/// is an ordinary MLP of layer sizes `sizes` (build it with `nn::Mlp::new(&sizes)`).
///
/// ```
/// use modelfusion::align::PartialZip;
/// let p = PartialZip { sizes: vec![4, 3, 10, 2], model: (), zipped: 1 };
/// assert_eq!(p.sizes[2], 10); // two tails of width 5
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct PartialZip<M> {
    /// Layer sizes `[in, h_1, .., h_k, 2 h_{k+1}, .., 2 h_depth, out]`.
    pub sizes: Vec<usize>,
    /// The parameters, `layers.{i}.weight` and `layers.{i}.bias`.
    pub model: M,
    /// The number of zipped hidden layers `k`.
    pub zipped: usize,
}

impl Zip {
    /// The matching of `group`.
    ///
    /// ```
    /// # use modelfusion::align::ZipIt;
    /// # use modelfusion::nn::{data, Classification, Mlp, Network};
    /// # use modelfusion::perm::specs::Architecture;
    /// # use modelfusion::StateDictF32;
    /// # let d = data::digits()?.head(100);
    /// # let net = Mlp::new(&[64, 8, 10])?;
    /// # let (a, b): (StateDictF32, StateDictF32) = (net.init(0), net.init(1));
    /// let zip = ZipIt::new(Classification::new(&net, &d, 100)?).with_constant_units(true).zip(&a, &b, &net.spec())?;
    /// assert_eq!(zip.get("hidden.0").unwrap().width(), 8);
    /// assert!(zip.get("nope").is_none());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn get(&self, group: &str) -> Option<&GroupZip> {
        self.groups.get(group)
    }

    /// `(group, matching)` pairs, sorted by group.
    ///
    /// ```
    /// # use modelfusion::align::ZipIt;
    /// # use modelfusion::nn::{data, Classification, Mlp, Network};
    /// # use modelfusion::perm::specs::Architecture;
    /// # use modelfusion::StateDictF32;
    /// # let d = data::digits()?.head(100);
    /// # let net = Mlp::new(&[64, 8, 8, 10])?;
    /// # let (a, b): (StateDictF32, StateDictF32) = (net.init(0), net.init(1));
    /// let zip = ZipIt::new(Classification::new(&net, &d, 100)?).with_constant_units(true).zip(&a, &b, &net.spec())?;
    /// assert_eq!(zip.iter().map(|(g, _)| g).collect::<Vec<_>>(), ["hidden.0", "hidden.1"]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (&str, &GroupZip)> {
        self.groups.iter().map(|(g, z)| (g.as_str(), z))
    }

    /// The spec the matching was made for.
    ///
    /// ```
    /// # use modelfusion::align::ZipIt;
    /// # use modelfusion::nn::{data, Classification, Mlp, Network};
    /// # use modelfusion::perm::specs::Architecture;
    /// # use modelfusion::StateDictF32;
    /// # let d = data::digits()?.head(100);
    /// # let net = Mlp::new(&[64, 8, 10])?;
    /// # let (a, b): (StateDictF32, StateDictF32) = (net.init(0), net.init(1));
    /// let zip = ZipIt::new(Classification::new(&net, &d, 100)?).with_constant_units(true).zip(&a, &b, &net.spec())?;
    /// assert_eq!(zip.spec(), &net.spec());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn spec(&self) -> &PermutationSpec {
        &self.spec
    }

    /// The permutations of B onto A, when no group has a within-model pair (always the
    /// case with `alpha = 0`): merging is then averaging A with the permuted B.
    ///
    /// ```
    /// # use modelfusion::align::ZipIt;
    /// # use modelfusion::nn::{data, Classification, Mlp, Network};
    /// # use modelfusion::perm::specs::Architecture;
    /// # use modelfusion::{Model, StateDictF32};
    /// # let d = data::digits()?.head(100);
    /// # let net = Mlp::new(&[64, 8, 10])?;
    /// # let (a, b): (StateDictF32, StateDictF32) = (net.init(0), net.init(1));
    /// let zip = ZipIt::new(Classification::new(&net, &d, 100)?)
    ///     .with_alpha(0.0)?.with_constant_units(true).zip(&a, &b, &net.spec())?;
    /// let perms = zip.permutations().unwrap();
    /// let averaged = a.lerp(&net.spec().apply(&perms, &b)?, 0.5)?;
    /// assert!(zip.merge(&a, &b)?.max_abs_diff(&averaged)? < 1e-6);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn permutations(&self) -> Option<PermutationSet> {
        self.groups
            .iter()
            .map(|(g, z)| z.permutation().map(|p| (g.clone(), p)))
            .collect()
    }

    /// Full zipping: the merged model. Along every grouped axis, a producing or
    /// following axis (a layer's outputs, its bias, norm parameters and statistics) is
    /// merged with `M` (`M_A x_A + M_B x_B`), a consuming axis (a layer's inputs) is
    /// unmerged with `U` (`x_A U_A`, `x_B U_B`; expanded over a flatten's repeat factor);
    /// a parameter with only consuming axes (the output layer) averages the two
    /// unmerged models, and a parameter outside the groups is averaged.
    ///
    /// Norm statistics are merged like the units they follow, which is an
    /// approximation: reset batch-norm statistics on data afterwards. Errors when the
    /// spec does not fit the models, they differ, or a group's width is not the one
    /// matched.
    ///
    /// ```
    /// # use modelfusion::align::ZipIt;
    /// # use modelfusion::nn::{data, Classification, Mlp, Network};
    /// # use modelfusion::perm::specs::Architecture;
    /// # use modelfusion::{Model, StateDictF32};
    /// # let d = data::digits()?.head(100);
    /// # let net = Mlp::new(&[64, 8, 10])?;
    /// # let (a, b): (StateDictF32, StateDictF32) = (net.init(0), net.init(1));
    /// let zip = ZipIt::new(Classification::new(&net, &d, 100)?).with_constant_units(true).zip(&a, &b, &net.spec())?;
    /// let merged = zip.merge(&a, &b)?;
    /// assert_eq!(merged.get("layers.0.weight").unwrap().shape(), &[8, 64]);
    /// assert!(zip.merge(&a, &net.init::<ndarray::ArrayD<f32>>(2)).is_ok()); // any pair of that shape
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn merge<M: Model>(&self, a: &M, b: &M) -> Result<M> {
        self.check_models(a, b)?;
        a.try_map(|name, ta| {
            let tb = b.require(name, "the other model")?;
            let ndim = ta.shape().len();
            let axes: Vec<(usize, &str)> = self.spec.param_axes(name).collect();
            let outputs = axes
                .iter()
                .any(|&(ax, _)| self.spec.role(name, ax, ndim) != Role::Consume);
            let weight = if outputs { 1.0 } else { 0.5 };
            let mut sum: Option<ArrayD<f64>> = None;
            for (m, t) in [(0, ta), (1, tb)] {
                let mut cur = t.view().mapv(|v| v.to_f64_lossless());
                for &(axis, g) in &axes {
                    cur = self.map_one(name, axis, g, m, ndim, &cur)?;
                }
                cur.mapv_inplace(|v| v * weight);
                sum = Some(match sum {
                    Some(s) => s + cur,
                    None => cur,
                });
            }
            let out = sum.unwrap_or_else(|| ArrayD::zeros(ta.shape()));
            Ok(M::Tensor::from_array(out.mapv(
                <<M::Tensor as Tensor>::Elem as Scalar>::from_f64_lossy,
            )))
        })
    }

    /// Model `m`'s tensor `cur` with axis `axis` (in group `g`) merged or unmerged.
    fn map_one(
        &self,
        name: &str,
        axis: usize,
        g: &str,
        m: usize,
        ndim: usize,
        cur: &ArrayD<f64>,
    ) -> Result<ArrayD<f64>> {
        let gz = self.groups.get(g).ok_or_else(|| Error::Spec {
            reason: format!("the ZipIt! matching has no group `{g}`"),
        })?;
        let map = match self.spec.role(name, axis, ndim) {
            Role::Consume => gz.unmerge_map(m),
            Role::Produce | Role::Follow => gz.merge_block(m),
        };
        let r = self.spec.rule(name, axis).repeat;
        let map = if r > 1 { repeat_map(&map, r) } else { map };
        map_axis(cur, axis, &map)
    }

    fn check_models<M: Model>(&self, a: &M, b: &M) -> Result<BTreeMap<String, usize>> {
        refuse_heads(&self.spec, "ZipIt!")?;
        let sizes = check_pair(a, b, &self.spec)?;
        for (g, &n) in &sizes {
            let gz = self.groups.get(g).ok_or_else(|| Error::Spec {
                reason: format!("the ZipIt! matching has no group `{g}`"),
            })?;
            if gz.width != n {
                return Err(Error::shape(
                    format!("group `{g}` of the models vs the ZipIt! matching (units)"),
                    &[gz.width],
                    &[n],
                ));
            }
        }
        Ok(sizes)
    }

    /// Partial zipping of an MLP (the crate's layout: `layers.{i}.weight` `(out, in)`
    /// and `layers.{i}.bias`, groups `hidden.{i}`, as `nn::Mlp` and
    /// [`perm::specs::mlp`](crate::perm::specs::mlp)): the first `k` hidden layers are
    /// zipped, the rest stay per model. Layer `k` of each model reads the shared
    /// features through its `U` block; the later layers of both models run side by side
    /// (block-diagonal weights); the output layer averages the two models' logits.
    ///
    /// `k = depth` (every hidden layer) gives the same function as [`merge`](Self::merge);
    /// `k = 0` is the output ensemble averaging logits. Errors when `k > depth`, the
    /// models are not such MLPs, or the matching lacks one of the first `k` groups.
    ///
    /// ```
    /// # use modelfusion::align::ZipIt;
    /// # use modelfusion::nn::{data, Classification, Mlp, Network};
    /// # use modelfusion::perm::specs::Architecture;
    /// # use modelfusion::StateDictF32;
    /// # let d = data::digits()?.head(100);
    /// let net = Mlp::new(&[64, 8, 6, 10])?;
    /// # let (a, b): (StateDictF32, StateDictF32) = (net.init(0), net.init(1));
    /// let zip = ZipIt::new(Classification::new(&net, &d, 100)?).with_constant_units(true).zip(&a, &b, &net.spec())?;
    /// let partial = zip.partial_mlp(&a, &b, 1)?;
    /// assert_eq!(partial.sizes, [64, 8, 12, 10]);
    /// let wide = Mlp::new(&partial.sizes)?;
    /// let acc = Classification::new(&wide, &d, 100)?.accuracy(&partial.model)?;
    /// assert!((0.0..=1.0).contains(&acc));
    /// assert!(zip.partial_mlp(&a, &b, 3).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn partial_mlp<M: Model>(&self, a: &M, b: &M, k: usize) -> Result<PartialZip<M>> {
        a.check_compatible(b)?;
        let sizes = mlp_sizes(a)?;
        let depth = sizes.len() - 2;
        if k > depth {
            return Err(Error::invalid(
                "k",
                format!(
                    "partial zipping zips the first k of the MLP's {depth} hidden layers; k = {k} is out of 0..={depth}"
                ),
            ));
        }
        a.check_finite("the reference model")?;
        b.check_finite("the other model")?;
        let zips: Vec<&GroupZip> = (0..k)
            .map(|i| {
                let g = format!("hidden.{i}");
                let gz = self.groups.get(&g).ok_or_else(|| Error::Spec {
                    reason: format!(
                        "partial zipping of the first {k} layers needs group `{g}`, which the ZipIt! matching lacks"
                    ),
                })?;
                if gz.width != sizes[i + 1] {
                    return Err(Error::shape(
                        format!("group `{g}` of the MLP vs the ZipIt! matching (units)"),
                        &[gz.width],
                        &[sizes[i + 1]],
                    ));
                }
                Ok(gz)
            })
            .collect::<Result<_>>()?;
        let last = depth; // index of the output layer
        let mut out_sizes = sizes.clone();
        for s in out_sizes.iter_mut().take(last + 1).skip(k + 1) {
            *s *= 2;
        }
        let f64_of = |t: &M::Tensor| t.view().mapv(|v| v.to_f64_lossless());
        let model = a.try_map(|name, ta| {
            let tb = b.require(name, "the other model")?;
            let (layer, is_weight) = parse_layer(name)?;
            let (mut xa, mut xb) = (f64_of(ta), f64_of(tb));
            // Merged producers (layers before k) and unmerged inputs (layers up to k).
            if layer > 0 && layer <= k {
                let gz = zips[layer - 1];
                if is_weight {
                    xa = map_axis(&xa, 1, &gz.unmerge_map(0))?;
                    xb = map_axis(&xb, 1, &gz.unmerge_map(1))?;
                }
            }
            let out = if layer < k {
                let gz = zips[layer];
                map_axis(&xa, 0, &gz.merge_block(0))? + map_axis(&xb, 0, &gz.merge_block(1))?
            } else if layer == last {
                let (xa, xb) = (xa * 0.5, xb * 0.5);
                if layer == k || !is_weight {
                    xa + xb
                } else {
                    concatenate(Axis(1), &[xa.view(), xb.view()])
                        .map_err(|e| Error::invalid("model", e.to_string()))?
                }
            } else if layer == k || !is_weight {
                concatenate(Axis(0), &[xa.view(), xb.view()])
                    .map_err(|e| Error::invalid("model", e.to_string()))?
            } else {
                block_diagonal(&xa, &xb)
            };
            Ok(M::Tensor::from_array(out.mapv(
                <<M::Tensor as Tensor>::Elem as Scalar>::from_f64_lossy,
            )))
        })?;
        Ok(PartialZip {
            sizes: out_sizes,
            model,
            zipped: k,
        })
    }
}

/// `map` expanded over a repeat factor: unit `u` covers indices `u * r .. (u + 1) * r`.
fn repeat_map(map: &Array2<f64>, r: usize) -> Array2<f64> {
    let (p, q) = map.dim();
    Array2::from_shape_fn((p * r, q * r), |(i, j)| {
        if i % r == j % r {
            map[[i / r, j / r]]
        } else {
            0.0
        }
    })
}

fn block_diagonal(a: &ArrayD<f64>, b: &ArrayD<f64>) -> ArrayD<f64> {
    let (ra, ca) = (a.shape()[0], a.shape()[1]);
    let (rb, cb) = (b.shape()[0], b.shape()[1]);
    let mut out = Array2::zeros((ra + rb, ca + cb));
    for ((i, j), v) in out.indexed_iter_mut() {
        if i < ra && j < ca {
            *v = a[[i, j]];
        } else if i >= ra && j >= ca {
            *v = b[[i - ra, j - ca]];
        }
    }
    out.into_dyn()
}

const MLP_LAYOUT: &str = "partial zipping needs the crate's MLP layout (`layers.{i}.weight` (out, in) and `layers.{i}.bias` for i = 0..=depth, as nn::Mlp)";

fn parse_layer(name: &str) -> Result<(usize, bool)> {
    let bad = || Error::Unsupported {
        what: format!("parameter `{name}`"),
        reason: MLP_LAYOUT.into(),
    };
    let rest = name.strip_prefix("layers.").ok_or_else(bad)?;
    let (i, kind) = rest.split_once('.').ok_or_else(bad)?;
    let i: usize = i.parse().map_err(|_| bad())?;
    match kind {
        "weight" => Ok((i, true)),
        "bias" => Ok((i, false)),
        _ => Err(bad()),
    }
}

/// The layer sizes of a model in the MLP layout; errors naming what does not fit.
fn mlp_sizes<M: Model>(a: &M) -> Result<Vec<usize>> {
    let mut layers = 0;
    for name in a.names() {
        layers = layers.max(parse_layer(name)?.0 + 1);
    }
    let weight = |i: usize| a.require(&format!("layers.{i}.weight"), "the model");
    let mut sizes = Vec::with_capacity(layers + 1);
    for i in 0..layers {
        let shape = weight(i)?.shape();
        if shape.len() != 2 {
            return Err(Error::Unsupported {
                what: format!("`layers.{i}.weight` of shape {shape:?}"),
                reason: MLP_LAYOUT.into(),
            });
        }
        if i == 0 {
            sizes.push(shape[1]);
        }
        sizes.push(shape[0]);
    }
    let shapes = MlpShapes::new(&sizes)?;
    let expected = shapes.shapes();
    if expected.len() != a.num_tensors() {
        return Err(Error::Unsupported {
            what: format!(
                "a model of {} tensors ({} expected for sizes {sizes:?})",
                a.num_tensors(),
                expected.len()
            ),
            reason: MLP_LAYOUT.into(),
        });
    }
    for (name, shape) in expected {
        let got = a.require(&name, "the model")?.shape();
        if got != shape.as_slice() {
            return Err(Error::shape(
                format!("`{name}` of an MLP {sizes:?}"),
                &shape,
                got,
            ));
        }
    }
    Ok(sizes)
}
