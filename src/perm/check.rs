//! Checking a spec beyond shapes: what a hand-written spec typically gets wrong, and a
//! test of the law every spec must obey (a permuted network computes the same function).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::{ModelShapes, PermutationSet, PermutationSpec, Role, Shapes};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::Tensor;

/// A likely mistake in a permutation spec, found by [`PermutationSpec::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpecIssue {
    /// A parameter the spec does not mention has axes of a group's size: probably a
    /// forgotten bias, norm or consumer. Declare it invariant if it really is not
    /// permuted.
    Unlisted {
        /// The parameter.
        param: String,
        /// Its shape.
        shape: Vec<usize>,
        /// `(axis, group)` for every axis whose length equals a group's size.
        matches: Vec<(usize, String)>,
    },
    /// A parameter the spec mentions has another axis, in no group, of a group's size
    /// (e.g. a consumer of a square matrix put on the wrong axis).
    UnlistedAxis {
        /// The parameter.
        param: String,
        /// The axis no group permutes.
        axis: usize,
        /// Groups of that size.
        groups: Vec<String>,
    },
    /// A layer's weight produces a group but its bias, present in the model with the
    /// group's size, is not in the group.
    MissingBias {
        /// The group.
        group: String,
        /// The producing weight.
        weight: String,
        /// The bias left out.
        bias: String,
    },
    /// No parameter of the group produces its units (the permutation would reorder the
    /// network's inputs).
    NoProducer {
        /// The group.
        group: String,
    },
    /// No parameter of the group consumes its units (the permutation would reorder the
    /// network's outputs, or a consumer is on the wrong axis).
    NoConsumer {
        /// The group.
        group: String,
    },
}

impl fmt::Display for SpecIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecIssue::Unlisted {
                param,
                shape,
                matches,
            } => {
                let m: Vec<String> = matches
                    .iter()
                    .map(|(a, g)| format!("axis {a} has the size of group `{g}`"))
                    .collect();
                write!(
                    f,
                    "parameter `{param}` (shape {shape:?}) is not in the spec but {}",
                    m.join(", ")
                )
            }
            SpecIssue::UnlistedAxis {
                param,
                axis,
                groups,
            } => write!(
                f,
                "axis {axis} of `{param}` is in no group but has the size of group(s) {}",
                quoted(groups)
            ),
            SpecIssue::MissingBias {
                group,
                weight,
                bias,
            } => write!(
                f,
                "`{weight}` produces group `{group}` but its bias `{bias}` is not in the group"
            ),
            SpecIssue::NoProducer { group } => {
                write!(
                    f,
                    "group `{group}` has no producer (no layer writes its units)"
                )
            }
            SpecIssue::NoConsumer { group } => write!(
                f,
                "group `{group}` has no consumer (no layer reads its units; is a consumer on the wrong axis?)"
            ),
        }
    }
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What [`PermutationSpec::check`] found: each group's size and every issue.
///
/// ```
/// use modelfusion::perm::{PermutationSpec, SpecIssue};
/// use modelfusion::StateDict;
/// use ndarray::ArrayD;
///
/// // `0.bias` was forgotten.
/// let model = StateDict::from_pairs([
///     ("0.weight", ArrayD::<f32>::zeros(vec![8, 4])),
///     ("0.bias", ArrayD::zeros(vec![8])),
///     ("2.weight", ArrayD::zeros(vec![3, 8])),
/// ])?;
/// let spec = PermutationSpec::from_groups([("h", vec![("0.weight", 0), ("2.weight", 1)])])?
///     .with_invariant(["0.weight", "2.weight"]);
/// let report = spec.check(&model)?;
/// assert!(!report.is_sound());
/// assert!(matches!(&report.issues[0], SpecIssue::MissingBias { bias, .. } if bias == "0.bias"));
/// assert!(spec.require_sound(&model).unwrap_err().to_string().contains("0.bias"));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecReport {
    /// Units of every group.
    pub sizes: BTreeMap<String, usize>,
    /// Likely mistakes, in a stable order.
    pub issues: Vec<SpecIssue>,
}

impl SpecReport {
    /// True when no issue was found.
    pub fn is_sound(&self) -> bool {
        self.issues.is_empty()
    }
}

impl fmt::Display for SpecReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for i in &self.issues {
            writeln!(f, "{i}")?;
        }
        Ok(())
    }
}

/// Issues shown in an error before "and N more".
const SHOW_ISSUES: usize = 8;

impl PermutationSpec {
    /// Checks the spec against a model: shapes as [`validate`](Self::validate) (a
    /// mismatch is an error), then the likely mistakes ([`SpecIssue`]): parameters not in
    /// the spec with a channel axis (axis 0 or 1, PyTorch layout) of a group's size,
    /// unlisted channel axes of a group's size, a
    /// producer whose bias is left out, groups without producer or consumer. Parameters
    /// declared [invariant](Self::with_invariant) are exempt from the first two.
    pub fn check<M: Model>(&self, model: &M) -> Result<SpecReport> {
        self.check_shapes(&ModelShapes(model))
    }

    /// [`check`](Self::check) on names and shapes alone (a checkpoint's header).
    pub(crate) fn check_shapes(&self, model: &dyn Shapes) -> Result<SpecReport> {
        let sizes = self.validate_shapes(model)?;
        let mut by_size: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (g, &n) in &sizes {
            by_size.entry(n).or_default().push(g.clone());
        }
        let mut issues = Vec::new();
        for (g, members) in self.groups() {
            let mut produce = false;
            let mut consume = false;
            for (p, axis) in members {
                let ndim = model.shape_of(p).map_or(0, <[usize]>::len);
                match self.role(p, *axis, ndim) {
                    Role::Produce => {
                        produce = true;
                        if let Some(layer) = p.strip_suffix(".weight") {
                            let bias = format!("{layer}.bias");
                            let in_group = members.iter().any(|(q, a)| *q == bias && *a == 0);
                            if !in_group
                                && model
                                    .shape_of(&bias)
                                    .is_some_and(|b| b.len() == 1 && Some(&b[0]) == sizes.get(g))
                            {
                                issues.push(SpecIssue::MissingBias {
                                    group: g.to_string(),
                                    weight: p.clone(),
                                    bias,
                                });
                            }
                        }
                    }
                    Role::Consume => consume = true,
                    Role::Follow => {}
                }
            }
            if !produce {
                issues.push(SpecIssue::NoProducer {
                    group: g.to_string(),
                });
            }
            if !consume {
                issues.push(SpecIssue::NoConsumer {
                    group: g.to_string(),
                });
            }
        }
        for name in model.param_names() {
            if self.is_invariant(name) {
                continue;
            }
            let Some(shape) = model.shape_of(name) else {
                continue;
            };
            let listed: BTreeSet<usize> = self.param_axes(name).map(|(a, _)| a).collect();
            // Channel axes only: axes 0 and 1 (PyTorch layout); the kernel axes of a
            // convolution are not units.
            let hits: Vec<(usize, Vec<String>)> = shape
                .iter()
                .enumerate()
                .take(2)
                .filter(|(a, _)| !listed.contains(a))
                .filter_map(|(a, n)| by_size.get(n).map(|gs| (a, gs.clone())))
                .collect();
            if hits.is_empty() {
                continue;
            }
            if listed.is_empty() {
                issues.push(SpecIssue::Unlisted {
                    param: name.to_string(),
                    shape: shape.to_vec(),
                    matches: hits
                        .into_iter()
                        .flat_map(|(a, gs)| gs.into_iter().map(move |g| (a, g)))
                        .collect(),
                });
            } else {
                for (axis, groups) in hits {
                    issues.push(SpecIssue::UnlistedAxis {
                        param: name.to_string(),
                        axis,
                        groups,
                    });
                }
            }
        }
        Ok(SpecReport { sizes, issues })
    }

    /// [`check`](Self::check), as an error naming every issue (the first few) unless the
    /// spec is sound; returns the group sizes. [`apply`](Self::apply) and the aligners
    /// call this.
    pub fn require_sound<M: Model>(&self, model: &M) -> Result<BTreeMap<String, usize>> {
        self.require_sound_shapes(&ModelShapes(model))
    }

    /// [`require_sound`](Self::require_sound) on names and shapes alone (a checkpoint's
    /// header).
    pub(crate) fn require_sound_shapes(
        &self,
        model: &dyn Shapes,
    ) -> Result<BTreeMap<String, usize>> {
        let report = self.check_shapes(model)?;
        if report.is_sound() {
            return Ok(report.sizes);
        }
        let n = report.issues.len();
        let mut shown: Vec<String> = report
            .issues
            .iter()
            .take(SHOW_ISSUES)
            .map(ToString::to_string)
            .collect();
        if n > SHOW_ISSUES {
            shown.push(format!("and {} more", n - SHOW_ISSUES));
        }
        Err(Error::Spec {
            reason: format!(
                "{n} issue(s): {}; declare parameters that are deliberately not permuted with `with_invariant` (spec files: `invariant:`)",
                shown.join("; ")
            ),
        })
    }

    /// Applies `perms` without refusing [`check`](Self::check) issues; groups without a
    /// permutation are left alone. Used to diagnose a spec, and by
    /// [`apply`](Self::apply) once it has checked the spec and the permutations.
    pub(super) fn apply_unchecked<M: Model>(&self, perms: &PermutationSet, model: &M) -> Result<M> {
        model.try_map(|name, t| {
            Ok(self
                .permute_tensor(perms, name, t)?
                .unwrap_or_else(|| t.clone()))
        })
    }

    /// One parameter `name` with `perms` applied along every axis the spec gives it
    /// (`None` when no group of `perms` touches it), as [`apply`](Self::apply) does for
    /// each parameter of a model. Checks nothing but the axes' lengths: use it where
    /// tensors arrive one at a time (a streamed merge of aligned checkpoints), after
    /// checking the spec against the whole model once.
    ///
    /// ```
    /// use modelfusion::perm::{Permutation, PermutationSet, PermutationSpec};
    /// use ndarray::arr2;
    /// let spec = PermutationSpec::from_groups([("h", vec![("w1", 0), ("w2", 1)])])?;
    /// let mut perms = PermutationSet::new();
    /// perms.insert("h", Permutation::new(vec![1, 0])?);
    /// let w2 = arr2(&[[1.0f32, 2.0]]).into_dyn();
    /// let moved = spec.permute_tensor(&perms, "w2", &w2)?.unwrap();
    /// assert_eq!(moved, arr2(&[[2.0f32, 1.0]]).into_dyn());
    /// assert!(spec.permute_tensor(&perms, "other", &w2)?.is_none());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn permute_tensor<T: Tensor>(
        &self,
        perms: &PermutationSet,
        name: &str,
        t: &T,
    ) -> Result<Option<T>> {
        let mut out: Option<T> = None;
        for (axis, g) in self.param_axes(name) {
            if let Some(p) = perms.get(g) {
                if let Some((_, layout)) = self.head_slot(name, axis) {
                    layout.check(p).map_err(|e| Error::InvalidPermutation {
                        reason: format!("attention group `{g}` (axis {axis} of `{name}`): {e}"),
                    })?;
                }
                let idx = self.axis_indices(name, axis, p);
                out = Some(out.as_ref().unwrap_or(t).take(axis, &idx)?);
            }
        }
        Ok(out)
    }
}

/// The outcome of [`check_function_preserved`].
#[derive(Clone, Debug, PartialEq)]
pub struct FunctionCheck {
    /// Largest absolute output difference with every group permuted at once.
    pub max_abs_diff: f64,
    /// The tolerance it was checked against.
    pub tolerance: f64,
    /// Groups that change the outputs by more than the tolerance when permuted alone,
    /// with that difference (empty when the check passed).
    pub broken_groups: Vec<(String, f64)>,
}

impl FunctionCheck {
    /// True when the permuted model's outputs are within the tolerance.
    pub fn passed(&self) -> bool {
        self.max_abs_diff <= self.tolerance
    }
}

/// Tests the law a spec must obey: permuting a model through it leaves the function
/// unchanged. Applies a random permutation (from `seed`) to every group, runs the
/// user's `forward` on the original and the permuted model, and compares the outputs
/// (any flat vector: logits on a fixed batch, say). When they differ by more than `tol`,
/// every group is tried alone, and those that break the function are reported.
///
/// The spec's [`check`](PermutationSpec::check) issues are not refused here (this is how
/// a broken spec is diagnosed); shape mismatches are errors.
///
/// ```
/// use modelfusion::perm::{check_function_preserved, PermutationSpec};
/// use modelfusion::{Model, StateDict};
/// use ndarray::{Array1, Array2, ArrayD};
///
/// // y = W2 relu(W1 x + b1) on a fixed input x.
/// let forward = |m: &StateDict<ArrayD<f64>>| -> modelfusion::Result<Vec<f64>> {
///     let w1 = m.get("0.weight").unwrap().view().into_dimensionality::<ndarray::Ix2>().unwrap();
///     let b1 = m.get("0.bias").unwrap().view().into_dimensionality::<ndarray::Ix1>().unwrap();
///     let w2 = m.get("2.weight").unwrap().view().into_dimensionality::<ndarray::Ix2>().unwrap();
///     let x = Array1::from_vec(vec![1.0, -2.0, 0.5]);
///     let h = (w1.dot(&x) + b1).mapv(|v| v.max(0.0));
///     Ok(w2.dot(&h).to_vec())
/// };
/// let m = StateDict::from_pairs([
///     ("0.weight", Array2::from_shape_fn((6, 3), |(i, j)| (i * 3 + j) as f64 * 0.1 - 0.8).into_dyn()),
///     ("0.bias", Array1::from_shape_fn(6, |i| i as f64 * 0.05).into_dyn()),
///     ("2.weight", Array2::from_shape_fn((2, 6), |(i, j)| (i + j) as f64 * 0.2 - 0.5).into_dyn()),
/// ])?;
/// let good = PermutationSpec::from_groups([("h", vec![("0.weight", 0), ("0.bias", 0), ("2.weight", 1)])])?;
/// assert!(check_function_preserved(&good, &m, forward, 0, 1e-12)?.passed());
/// // The bias forgotten: the check fails and blames the group.
/// let bad = PermutationSpec::from_groups([("h", vec![("0.weight", 0), ("2.weight", 1)])])?;
/// let r = check_function_preserved(&bad, &m, forward, 0, 1e-12)?;
/// assert!(!r.passed());
/// assert_eq!(r.broken_groups[0].0, "h");
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn check_function_preserved<M, F>(
    spec: &PermutationSpec,
    model: &M,
    mut forward: F,
    seed: u64,
    tol: f64,
) -> Result<FunctionCheck>
where
    M: Model,
    F: FnMut(&M) -> Result<Vec<f64>>,
{
    if !(tol.is_finite() && tol >= 0.0) {
        return Err(Error::invalid(
            "tol",
            format!("must be finite and >= 0, got {tol}"),
        ));
    }
    let reference = forward(model)?;
    let mut diff_under = |perms: &PermutationSet| -> Result<f64> {
        let out = forward(&spec.apply_unchecked(perms, model)?)?;
        if out.len() != reference.len() {
            return Err(Error::shape(
                "forward output (permuted vs original model)",
                &[reference.len()],
                &[out.len()],
            ));
        }
        Ok(out
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(
                0.0,
                |m: f64, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
            ))
    };
    let all = PermutationSet::random(spec, model, seed)?;
    let max_abs_diff = diff_under(&all)?;
    let mut broken_groups = Vec::new();
    if max_abs_diff > tol {
        for (g, p) in all.iter() {
            let mut one = PermutationSet::new();
            one.insert(g, p.clone());
            let d = diff_under(&one)?;
            if d > tol {
                broken_groups.push((g.to_string(), d));
            }
        }
    }
    Ok(FunctionCheck {
        max_abs_diff,
        tolerance: tol,
        broken_groups,
    })
}
