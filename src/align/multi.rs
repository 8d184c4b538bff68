//! Aligning many models at once, so that they can be averaged.

use super::{Aligner, Alignment};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::perm::PermutationSpec;

/// Several models brought into one basis.
///
/// ```
/// use modelfusion::align::{align_to_reference, Identity};
/// use modelfusion::perm::specs::{Architecture, MlpShapes};
/// let arch = MlpShapes::new(&[3, 4, 2])?;
/// let (a, b) = (arch.random_model(0), arch.random_model(1));
/// let m = align_to_reference(&Identity, &a, &[&b], &arch.spec())?;
/// assert_eq!(m.models.len(), 2);
/// assert_eq!(m.models[1], b);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct MultiAlignment<M> {
    /// The aligned models, in input order (for [`align_to_reference`] the reference
    /// first, unchanged).
    pub models: Vec<M>,
    /// The alignment of each input model (identity for the reference).
    pub alignments: Vec<Alignment>,
    /// Rounds over all models ([`align_to_mean`]), 1 for [`align_to_reference`].
    pub iterations: usize,
    /// True when a round changed no alignment (always true for [`align_to_reference`]).
    pub converged: bool,
}

/// Aligns every model of `others` to `reference`. The result lists the reference first,
/// then the aligned others.
///
/// ```
/// use modelfusion::align::{align_to_reference, WeightMatching};
/// use modelfusion::perm::specs::{Architecture, MlpShapes};
/// let arch = MlpShapes::new(&[3, 6, 2])?;
/// let ms: Vec<_> = (0..3).map(|s| arch.random_model(s)).collect();
/// let r = align_to_reference(&WeightMatching::new(0), &ms[0], &[&ms[1], &ms[2]], &arch.spec())?;
/// assert_eq!(r.alignments.len(), 3);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn align_to_reference<M: Model, A: Aligner<M> + ?Sized>(
    aligner: &A,
    reference: &M,
    others: &[&M],
    spec: &PermutationSpec,
) -> Result<MultiAlignment<M>> {
    let mut models = vec![reference.clone()];
    let mut alignments = vec![Alignment::identity(spec, reference)?];
    for (i, m) in others.iter().enumerate() {
        let al = aligner
            .align(reference, m, spec)
            .map_err(|e| in_model(e, i + 1))?;
        models.push(al.apply(spec, *m)?);
        alignments.push(al);
    }
    Ok(MultiAlignment {
        models,
        alignments,
        iterations: 1,
        converged: true,
    })
}

/// Aligns `models` to each other (Git Re-Basin's "merge many"): each round, every model
/// in turn is aligned to the mean of the others' current aligned versions; stops after
/// a round that changes no alignment, or after `max_iter` rounds. Needs at least two
/// models.
///
/// ```
/// use modelfusion::align::{align_to_mean, WeightMatching};
/// use modelfusion::perm::{specs::{Architecture, MlpShapes}, PermutationSet};
/// use modelfusion::Model;
/// let arch = MlpShapes::new(&[5, 12, 3])?;
/// let spec = arch.spec();
/// let a = arch.random_model(0);
/// // three shuffled copies of one model end up identical
/// let copies: Vec<_> = (1..4).map(|s| spec.apply(&PermutationSet::random(&spec, &a, s).unwrap(), &a).unwrap()).collect();
/// let refs: Vec<_> = copies.iter().collect();
/// let m = align_to_mean(&WeightMatching::new(0), &refs, &spec, 10)?;
/// assert!(m.converged);
/// assert_eq!(m.models[1].max_abs_diff(&m.models[0])?, 0.0);
/// assert_eq!(m.models[2].max_abs_diff(&m.models[0])?, 0.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn align_to_mean<M: Model, A: Aligner<M> + ?Sized>(
    aligner: &A,
    models: &[&M],
    spec: &PermutationSpec,
    max_iter: usize,
) -> Result<MultiAlignment<M>> {
    if models.len() < 2 {
        return Err(Error::invalid(
            "models",
            format!(
                "aligning to the mean needs at least 2 models, got {}",
                models.len()
            ),
        ));
    }
    if max_iter == 0 {
        return Err(Error::invalid("max_iter", "must be at least 1, got 0"));
    }
    let mut aligned: Vec<M> = models.iter().map(|m| (*m).clone()).collect();
    let mut alignments: Vec<Alignment> = models
        .iter()
        .map(|m| Alignment::identity(spec, *m))
        .collect::<Result<_>>()?;
    let w = 1.0 / (models.len() - 1) as f64;
    let mut iterations = 0;
    let mut converged = false;
    while iterations < max_iter {
        iterations += 1;
        let mut changed = false;
        for i in 0..models.len() {
            let rest: Vec<&M> = aligned
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, m)| m)
                .collect();
            let mean = M::weighted_sum(&rest, &vec![w; rest.len()])?;
            let al = aligner
                .align(&mean, models[i], spec)
                .map_err(|e| in_model(e, i))?;
            if !same_maps(&al, &alignments[i]) {
                changed = true;
            }
            aligned[i] = al.apply(spec, models[i])?;
            alignments[i] = al;
        }
        if !changed {
            converged = true;
            break;
        }
    }
    Ok(MultiAlignment {
        models: aligned,
        alignments,
        iterations,
        converged,
    })
}

fn same_maps(a: &Alignment, b: &Alignment) -> bool {
    a.iter().eq(b.iter())
}

fn in_model(e: Error, i: usize) -> Error {
    match e {
        Error::InvalidParameter { param, reason } => Error::InvalidParameter {
            param,
            reason: format!("{reason} (model {i})"),
        },
        Error::Spec { reason } => Error::Spec {
            reason: format!("{reason} (model {i})"),
        },
        other => other,
    }
}
