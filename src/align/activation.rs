//! Activation matching: one assignment per group on the correlation of hidden features.

use std::collections::BTreeMap;

use ndarray::Array2;

use super::information::{JointHistogram, Ranges, check_bins};
use super::stats::CrossMoments;
use super::{AlignStats, Aligner, Alignment, assignment_score, check_pair};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::objective::Activations;
use crate::perm::{PermutationSet, PermutationSpec};
use crate::progress::{Observer, Progress, Silent};

/// The similarity activation matching maximises.
///
/// The Euclidean matching cost `E||a_A - P a_B||^2` is the cross-correlation in
/// disguise: it expands to `E||a_A||^2 + E||a_B||^2 - 2 sum_i E[a_A,i a_B,P(i)]`, and only
/// the last term depends on `P`, so minimising the distance and maximising
/// [`Cross`](Correlation::Cross) choose the same permutation (tested).
///
/// ```
/// use modelfusion::align::Correlation;
/// assert_eq!(Correlation::default(), Correlation::Cross);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Correlation {
    /// The cross-correlation `E[a_A a_B^T]` (uncentred).
    #[default]
    Cross,
    /// Pearson correlation: centred and divided by both standard deviations.
    Pearson,
    /// Mutual information under a joint Gaussian model of each pair of units:
    /// `-ln(1 - rho^2) / 2` nats of their Pearson correlation `rho`. A monotone function
    /// of `|rho|`, so it also matches units that are anti-correlated.
    GaussianInformation,
    /// Mutual information estimated from joint histograms ([`JointHistogram`]): each
    /// unit's values binned into `bins` equal-width bins over its range in the data (2
    /// to [`MAX_BINS`](super::MAX_BINS)); sees non-linear dependence the correlations miss. Streams the
    /// activation source twice (ranges, then counts).
    BinnedInformation {
        /// Bins per unit.
        bins: usize,
    },
}

/// Activation matching: for every permutation group, streams the features of both models
/// over the batches of an [`Activations`] source (keyed by group name), accumulates their
/// means and cross-covariance in `f64` (batch statistics merged pairwise), and solves one
/// assignment maximising the matched [`Correlation`].
///
/// The activation source lives in the aligner (auxiliary data belongs to the algorithm
/// value). Every batch must give both models the same number of samples, with the
/// group's width as the number of columns.
///
/// An attention group ([`HeadLayout`](crate::perm::HeadLayout), `2 * heads * head_dim`
/// units) takes the queries (`heads * head_dim` columns, head `h`'s dimension `i` at
/// `h * head_dim + i`; rotated or not, the rotary dimensions stay in place) followed by
/// the per-head attention outputs (the inputs of the output projection), side by side.
/// It is matched by the structured solve weight matching uses: heads as blocks (with
/// grouped-query attention, the query heads of one key-value head together), then the
/// dimensions inside each head.
///
/// ```
/// use modelfusion::align::{ActivationMatching, Aligner, Correlation};
/// use modelfusion::perm::{specs::{Architecture, MlpShapes}, PermutationSet};
/// use modelfusion::{Activations, Features, Model, Result, StateDictF32};
/// use ndarray::{Array2, ArrayD, Ix2};
///
/// /// Post-ReLU hidden features of a 1-hidden-layer MLP on fixed inputs.
/// struct Hidden(Array2<f32>);
/// impl Activations<StateDictF32> for Hidden {
///     fn num_batches(&self) -> usize { 1 }
///     fn activations(&self, m: &StateDictF32, _: usize) -> Result<Features<f32>> {
///         let w = m.get("layers.0.weight").unwrap().clone().into_dimensionality::<Ix2>().unwrap();
///         let b = m.get("layers.0.bias").unwrap();
///         let h = (self.0.dot(&w.t()) + b).mapv(|v| v.max(0.0));
///         Ok([("hidden.0".to_string(), h.into_dimensionality::<Ix2>().unwrap())].into())
///     }
/// }
/// let arch = MlpShapes::new(&[5, 12, 2])?;
/// let spec = arch.spec();
/// let a = arch.random_model(0);
/// let planted = PermutationSet::random(&spec, &a, 3)?;
/// let b = spec.apply(&planted, &a)?;
/// let x = Array2::from_shape_fn((64, 5), |(i, j)| ((i * 7 + j * 3) % 11) as f32 / 5.0 - 1.0);
/// let am = ActivationMatching::new(Hidden(x)).with_correlation(Correlation::Pearson);
/// let al = am.align(&a, &b, &spec)?;
/// assert_eq!(al.apply(&spec, &b)?.max_abs_diff(&a)?, 0.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ActivationMatching<A> {
    activations: A,
    correlation: Correlation,
    eps: f64,
}

impl<A> ActivationMatching<A> {
    /// Matching on the [`Correlation::Cross`] of the features `activations` gives.
    ///
    /// ```
    /// use modelfusion::align::{ActivationMatching, Correlation};
    /// let am = ActivationMatching::new(()); // any value; it must implement Activations to align
    /// assert_eq!(am.activations(), &());
    /// ```
    pub fn new(activations: A) -> Self {
        ActivationMatching {
            activations,
            correlation: Correlation::Cross,
            eps: 1e-8,
        }
    }

    /// Chooses the similarity.
    ///
    /// ```
    /// use modelfusion::align::{ActivationMatching, Correlation};
    /// let am = ActivationMatching::new(()).with_correlation(Correlation::Pearson);
    /// # let _ = am;
    /// ```
    pub fn with_correlation(mut self, correlation: Correlation) -> Self {
        self.correlation = correlation;
        self
    }

    /// The activation source.
    ///
    /// ```
    /// let am = modelfusion::align::ActivationMatching::new(5u8);
    /// assert_eq!(*am.activations(), 5);
    /// ```
    pub fn activations(&self) -> &A {
        &self.activations
    }
}

impl<M: Model, A: Activations<M>> Aligner<M> for ActivationMatching<A> {
    fn align(&self, reference: &M, other: &M, spec: &PermutationSpec) -> Result<Alignment> {
        self.align_observed(reference, other, spec, &mut Silent)
    }

    fn align_observed(
        &self,
        reference: &M,
        other: &M,
        spec: &PermutationSpec,
        observer: &mut dyn Observer,
    ) -> Result<Alignment> {
        let sizes = check_pair(reference, other, spec)?;
        let scores: BTreeMap<String, Array2<f64>> = match self.correlation {
            Correlation::BinnedInformation { bins } => group_information(
                &self.activations,
                (reference, other),
                &sizes,
                bins,
                observer,
            )?,
            c => group_moments(
                &self.activations,
                reference,
                other,
                &sizes,
                &sizes,
                observer,
            )?
            .into_iter()
            .map(|(g, cm)| {
                let score = match c {
                    Correlation::Cross => cm.cross_correlation(),
                    _ => cm.correlation(self.eps),
                };
                let score = if c == Correlation::GaussianInformation {
                    score.mapv(|r| -0.5 * (1.0 - (r * r).min(1.0 - 1e-15)).ln())
                } else {
                    score
                };
                (g, score)
            })
            .collect(),
        };
        let mut perms = PermutationSet::new();
        let mut objective = Vec::new();
        for (g, score) in scores {
            let p = super::heads::best_assignment::<f64>(&score, spec.head_layout(&g))?;
            objective.push(assignment_score(&score, &p));
            perms.insert(g, p);
        }
        Ok(Alignment::from_permutations(
            perms,
            AlignStats {
                objective,
                sweeps: 1,
                converged: true,
                ..AlignStats::default()
            },
        )
        .with_spec(spec))
    }
}

/// Streams both models' features over every batch and accumulates, per group, their
/// joint moments (each batch reported to `observer`) (`sizes_a` / `sizes_b`: the groups' widths in each model).
pub(crate) fn group_moments<M: Model, A: Activations<M>>(
    source: &A,
    reference: &M,
    other: &M,
    sizes_a: &BTreeMap<String, usize>,
    sizes_b: &BTreeMap<String, usize>,
    observer: &mut dyn Observer,
) -> Result<BTreeMap<String, CrossMoments>> {
    let mut stats: BTreeMap<String, CrossMoments> = sizes_a
        .iter()
        .map(|(g, &n)| {
            (
                g.clone(),
                CrossMoments::new(n, sizes_b.get(g).copied().unwrap_or(n)),
            )
        })
        .collect();
    stream_pairs(
        source,
        (reference, other),
        &mut stats,
        "activation statistics",
        observer,
        |g, b, cm, xa, xb| {
            cm.update(xa.view(), xb.view())
                .map_err(|e| in_batch(e, g, b))
        },
    )?;
    Ok(stats)
}

/// Adds the batch and group to an error of a moments update.
pub(crate) fn in_batch(e: Error, g: &str, b: usize) -> Error {
    match e {
        Error::InvalidParameter { param, reason } => Error::InvalidParameter {
            param,
            reason: format!("{reason} in batch {b}, group `{g}`"),
        },
        Error::ShapeMismatch {
            what,
            expected,
            got,
        } => Error::ShapeMismatch {
            what: format!("{what} of group `{g}` in batch {b} (the group's width)"),
            expected,
            got,
        },
        other => other,
    }
}

/// Streams both models' features over every batch of `source`: for every group of
/// `state`, calls `update(group, batch, state, reference features, other features)`;
/// reports each batch to `observer` (`what` names the computation when cancelled).
pub(crate) fn stream_pairs<M: Model, A: Activations<M>, S>(
    source: &A,
    (reference, other): (&M, &M),
    state: &mut BTreeMap<String, S>,
    what: &str,
    observer: &mut dyn Observer,
    mut update: impl FnMut(
        &str,
        usize,
        &mut S,
        &ndarray::Array2<crate::objective::Elem<M>>,
        &ndarray::Array2<crate::objective::Elem<M>>,
    ) -> Result<()>,
) -> Result<()> {
    let nb = source.num_batches();
    if nb == 0 {
        return Err(Error::empty("the activation source (it has no batches)"));
    }
    for b in 0..nb {
        let fa = source.activations(reference, b)?;
        let fb = source.activations(other, b)?;
        for (g, s) in state.iter_mut() {
            let (xa, xb) = (
                features_of(&fa, g, b, "reference")?,
                features_of(&fb, g, b, "other")?,
            );
            update(g, b, s, xa, xb)?;
        }
        let report = Progress::Batch {
            done: b + 1,
            total: nb,
        };
        if observer.observe(&report).is_break() {
            return Err(Error::Cancelled {
                what: format!("{what} after batch {} of {nb}", b + 1),
            });
        }
    }
    Ok(())
}

/// Per group, the binned mutual information between the two models' units: one pass
/// over the batches for the units' ranges, one for the joint histograms (both reported
/// to `observer`, `2 * batches` in all).
fn group_information<M: Model, A: Activations<M>>(
    source: &A,
    (reference, other): (&M, &M),
    sizes: &BTreeMap<String, usize>,
    bins: usize,
    observer: &mut dyn Observer,
) -> Result<BTreeMap<String, Array2<f64>>> {
    let nb = source.num_batches();
    if nb == 0 {
        return Err(Error::empty("the activation source (it has no batches)"));
    }
    // Before the first pass over the data, not after it.
    check_bins(bins)?;
    let mut ranges: BTreeMap<&String, (Ranges, Ranges)> = sizes
        .iter()
        .map(|(g, &n)| (g, (Ranges::new(n), Ranges::new(n))))
        .collect();
    let report = |done: usize, observer: &mut dyn Observer| {
        let p = Progress::Batch {
            done,
            total: 2 * nb,
        };
        if observer.observe(&p).is_break() {
            return Err(Error::Cancelled {
                what: format!("binned mutual information after batch {done} of {}", 2 * nb),
            });
        }
        Ok(())
    };
    for b in 0..nb {
        let (fa, fb) = (
            source.activations(reference, b)?,
            source.activations(other, b)?,
        );
        for (g, (ra, rb)) in ranges.iter_mut() {
            let what = |m: &str| format!("features of group `{g}` in batch {b} of the {m} model");
            ra.update(
                features_of(&fa, g, b, "reference")?.view(),
                &what("reference"),
            )?;
            rb.update(features_of(&fb, g, b, "other")?.view(), &what("other"))?;
        }
        report(b + 1, observer)?;
    }
    let mut hists: BTreeMap<&String, JointHistogram> = BTreeMap::new();
    for (g, (ra, rb)) in ranges {
        hists.insert(g, JointHistogram::new(ra.finish(), rb.finish(), bins)?);
    }
    for b in 0..nb {
        let (fa, fb) = (
            source.activations(reference, b)?,
            source.activations(other, b)?,
        );
        for (g, h) in hists.iter_mut() {
            h.update(
                features_of(&fa, g, b, "reference")?.view(),
                features_of(&fb, g, b, "other")?.view(),
            )?;
        }
        report(nb + b + 1, observer)?;
    }
    Ok(hists
        .into_iter()
        .map(|(g, h)| (g.clone(), h.mutual_information()))
        .collect())
}

fn features_of<'f, E>(
    f: &'f crate::objective::Features<E>,
    g: &str,
    b: usize,
    which: &str,
) -> Result<&'f ndarray::Array2<E>> {
    f.get(g).ok_or_else(|| {
        Error::invalid(
            "activations",
            format!("batch {b} of the {which} model has no features for group `{g}`"),
        )
    })
}
