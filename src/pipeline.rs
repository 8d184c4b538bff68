//! Fusion pipelines: choose a reference, align every model to it, merge, evaluate.
//!
//! A [`Pipeline`] is generic over the three contracts of the crate: an
//! [`align::Aligner`](crate::align::Aligner) (weight matching, activation matching, OT fusion,
//! or [`align::Identity`](crate::align::Identity) for the naive baseline), a
//! [`merge::Merger`](crate::merge::Merger) (any averaging or task-vector method), and an
//! optional [`Objective`] to score the inputs and the result (lower is better). It
//! returns a [`FusionReport`] with the fused model, the aligned inputs, per-model and
//! fused scores and the aligners' statistics.
//!
//! ```
//! use modelfusion::align::WeightMatching;
//! use modelfusion::merge::Average;
//! use modelfusion::perm::specs::{Architecture, MlpShapes};
//! use modelfusion::perm::PermutationSet;
//! use modelfusion::pipeline::Pipeline;
//! use modelfusion::Model;
//!
//! // Three copies of one network with their hidden units shuffled differently.
//! let arch = MlpShapes::new(&[6, 16, 16, 3])?;
//! let spec = arch.spec();
//! let a = arch.random_model(0);
//! let models: Vec<_> = (1..4)
//!     .map(|s| spec.apply(&PermutationSet::random(&spec, &a, s)?, &a))
//!     .collect::<modelfusion::Result<_>>()?;
//! let report = Pipeline::new(spec, WeightMatching::new(7), Average::uniform()).run(&models)?;
//! // Aligned, the copies coincide, so their average is the network itself (up to rounding).
//! assert!(report.fused.max_abs_diff(&models[0])? < 1e-6);
//! # Ok::<(), modelfusion::Error>(())
//! ```

use crate::align::{AlignStats, Aligner};
use crate::error::{Error, Result};
use crate::merge::Merger;
use crate::model::Model;
use crate::objective::Objective;
use crate::perm::PermutationSpec;

/// Which input model the others are aligned to.
///
/// ```
/// use modelfusion::pipeline::Reference;
/// assert_eq!(Reference::default(), Reference::Index(0));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reference {
    /// The model at this index.
    Index(usize),
    /// The model with the lowest objective (needs an evaluator).
    Best,
}

impl Default for Reference {
    fn default() -> Self {
        Reference::Index(0)
    }
}

/// Reference choice -> alignment -> merge -> evaluation.
///
/// Built with [`new`](Self::new); [`with_reference`](Self::with_reference) and
/// [`with_objective`](Self::with_objective) are optional.
pub struct Pipeline<'a, M, A, G> {
    spec: PermutationSpec,
    aligner: A,
    merger: G,
    reference: Reference,
    evaluator: Option<&'a dyn Objective<M>>,
}

/// What a [`Pipeline`] run produced.
#[derive(Clone, Debug)]
pub struct FusionReport<M> {
    /// Index of the reference model.
    pub reference: usize,
    /// The inputs brought into the reference's basis (the reference itself unchanged).
    pub aligned: Vec<M>,
    /// The aligner's statistics per input (the reference's entry is the default).
    pub align_stats: Vec<AlignStats>,
    /// The merged model.
    pub fused: M,
    /// Objective of every input (when an evaluator was given).
    pub model_scores: Option<Vec<f64>>,
    /// Objective of the merged model (when an evaluator was given).
    pub fused_score: Option<f64>,
}

impl<'a, M, A, G> Pipeline<'a, M, A, G>
where
    M: Model,
    A: Aligner<M>,
    G: Merger<M>,
{
    /// A pipeline aligning with `aligner` over `spec`, then merging with `merger`; the
    /// reference is the first model and nothing is evaluated.
    pub fn new(spec: PermutationSpec, aligner: A, merger: G) -> Self {
        Pipeline {
            spec,
            aligner,
            merger,
            reference: Reference::default(),
            evaluator: None,
        }
    }

    /// Chooses the reference model.
    pub fn with_reference(mut self, reference: Reference) -> Self {
        self.reference = reference;
        self
    }

    /// Scores every input and the result with `objective` (lower is better).
    pub fn with_objective(mut self, objective: &'a dyn Objective<M>) -> Self {
        self.evaluator = Some(objective);
        self
    }

    /// Runs the pipeline on `models` (at least one, all of one architecture).
    ///
    /// Errors: no models, a reference index out of range, [`Reference::Best`] without an
    /// evaluator, and whatever the spec validation, aligner, merger or objective report.
    pub fn run(&self, models: &[M]) -> Result<FusionReport<M>> {
        if models.is_empty() {
            return Err(Error::empty("the list of models to fuse"));
        }
        for (i, m) in models.iter().enumerate() {
            models[0].check_compatible(m).map_err(|e| {
                Error::invalid("models", format!("model {i} does not match model 0: {e}"))
            })?;
        }
        self.spec.validate(&models[0])?;
        let model_scores = self
            .evaluator
            .map(|obj| {
                models
                    .iter()
                    .map(|m| obj.loss(m))
                    .collect::<Result<Vec<f64>>>()
            })
            .transpose()?;
        let reference = match self.reference {
            Reference::Index(i) if i < models.len() => i,
            Reference::Index(i) => {
                return Err(Error::invalid(
                    "reference",
                    format!("index {i} out of range for {} models", models.len()),
                ));
            }
            Reference::Best => {
                let scores = model_scores.as_ref().ok_or_else(|| {
                    Error::invalid("reference", "Reference::Best needs an evaluator")
                })?;
                best_index(scores)
            }
        };
        let target = &models[reference];
        let mut aligned = Vec::with_capacity(models.len());
        let mut align_stats = Vec::with_capacity(models.len());
        for (i, m) in models.iter().enumerate() {
            if i == reference {
                aligned.push(m.clone());
                align_stats.push(AlignStats::default());
            } else {
                let alignment = self.aligner.align(target, m, &self.spec)?;
                aligned.push(alignment.apply(&self.spec, m)?);
                align_stats.push(alignment.stats().clone());
            }
        }
        let refs: Vec<&M> = aligned.iter().collect();
        let fused = self.merger.merge(&refs)?;
        let fused_score = self.evaluator.map(|obj| obj.loss(&fused)).transpose()?;
        Ok(FusionReport {
            reference,
            aligned,
            align_stats,
            fused,
            model_scores,
            fused_score,
        })
    }
}

/// Index of the smallest score (first on ties; NaN never wins).
fn best_index(scores: &[f64]) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for (i, &s) in scores.iter().enumerate() {
        if s.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| s < b) {
            best = Some((i, s));
        }
    }
    best.map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_index_prefers_lowest_and_skips_nan() {
        assert_eq!(best_index(&[3.0, 1.0, 2.0]), 1);
        assert_eq!(best_index(&[f64::NAN, 5.0, 5.0]), 1);
        assert_eq!(best_index(&[f64::NAN]), 0);
    }
}
