//! Task-vector merging relative to a base model: task arithmetic, TIES, DARE,
//! breadcrumbs and DELLA, as one engine with three orthogonal choices (like mergekit's
//! generalised task arithmetic):
//!
//! 1. how each task vector `tau_i = theta_i - base` is sparsified ([`Sparsification`]),
//! 2. how the sparsified vectors are combined ([`Consensus`]: a weighted sum, or TIES's
//!    sign election with a disjoint mean),
//! 3. the scaling `lambda` of the combined vector added back to the base.
//!
//! Every tensor is processed in blocks that stay in cache: one pass over the inputs for
//! the merge itself, plus one streaming pass for magnitude thresholds (TIES,
//! breadcrumbs) or L1 rescaling (DARE option).

use std::borrow::Cow;

use rand::Rng;

use super::TensorMerger;
use super::kernel::{self, BLOCK, base_tensor, check_count, check_shapes, check_weights};
use super::select::kth_largest_many;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::{Scalar, Tensor};

/// How each task vector is sparsified before combining. `density` is the kept fraction
/// and must be in `(0, 1]`; the number of kept entries of an `n`-element tensor is
/// `k = ceil(density * n)`.
///
/// ```
/// use modelfusion::merge::{Rescale, Sparsification};
/// let s = Sparsification::Random { density: 0.1, seed: 7, rescale: Rescale::InverseDensity };
/// assert!(s.validate().is_ok());
/// assert!(Sparsification::Magnitude { density: 0.0 }.validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sparsification {
    /// Keep everything (task arithmetic).
    None,
    /// TIES's trim: keep the `k` entries of largest magnitude (entries tied with the
    /// `k`-th largest magnitude are all kept).
    Magnitude {
        /// Kept fraction, in `(0, 1]`.
        density: f64,
    },
    /// DARE: keep each entry independently with probability `density`, then rescale.
    /// The random stream of each tensor derives from `(seed, tensor name, model index)`.
    Random {
        /// Keep probability `p`, in `(0, 1]`.
        density: f64,
        /// The caller's seed.
        seed: u64,
        /// How kept entries are rescaled.
        rescale: Rescale,
    },
    /// Model breadcrumbs: drop the largest `floor(gamma * n)` magnitudes (outliers) and
    /// keep the next `k` ones, dropping the small rest.
    Breadcrumbs {
        /// Kept fraction, in `(0, 1]`, with `gamma + density <= 1`.
        density: f64,
        /// Fraction of largest magnitudes dropped, in `[0, 1)`.
        gamma: f64,
    },
    /// DELLA's MagPrune: keep entry `j` with probability
    /// `p_j = density + epsilon * (r_j / (n - 1) - 1/2)`, where `r_j` is its rank by
    /// ascending magnitude in the tensor's task vector (larger magnitudes are kept more
    /// often; the mean keep probability is `density`); kept entries are scaled by
    /// `1 / p_j`.
    Della {
        /// Mean keep probability, in `(0, 1]`.
        density: f64,
        /// Spread of the keep probabilities: they span
        /// `[density - epsilon/2, density + epsilon/2]`, which must lie in `(0, 1]`.
        epsilon: f64,
        /// The caller's seed.
        seed: u64,
    },
}

/// How DARE rescales the entries it keeps.
///
/// ```
/// use modelfusion::merge::Rescale;
/// assert_ne!(Rescale::InverseDensity, Rescale::L1Norm);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rescale {
    /// Multiply kept entries by `1 / density` (the DARE paper).
    InverseDensity,
    /// Multiply the kept entries of each tensor's task vector by
    /// `||tau||_1 / ||kept tau||_1`, so its L1 norm is unchanged (mergekit's option).
    L1Norm,
    /// No rescaling.
    None,
}

/// How the sparsified task vectors are combined.
///
/// ```
/// use modelfusion::merge::Consensus;
/// assert_ne!(Consensus::Sum, Consensus::SignElection);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consensus {
    /// `sum_i w_i tau_i` (task arithmetic, DARE-linear).
    Sum,
    /// TIES: elect `s = sign(sum_i w_i tau_i)` per entry, then the disjoint mean
    /// `sum_i w_i m_i tau_i / sum_i w_i m_i` over the entries whose sign is `s`
    /// (`m_i = [sign(tau_i) = s]`; an empty set gives 0).
    SignElection,
}

fn check_density(density: f64) -> Result<()> {
    if !(density > 0.0 && density <= 1.0) {
        return Err(Error::invalid(
            "density",
            format!("must be in (0, 1], got {density}"),
        ));
    }
    Ok(())
}

impl Sparsification {
    /// Checks the hyperparameters (called by every constructor).
    ///
    /// ```
    /// use modelfusion::merge::Sparsification;
    /// assert!(Sparsification::Breadcrumbs { density: 0.9, gamma: 0.2 }.validate().is_err());
    /// assert!(Sparsification::Della { density: 0.5, epsilon: 0.2, seed: 0 }.validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        match *self {
            Sparsification::None => Ok(()),
            Sparsification::Magnitude { density } | Sparsification::Random { density, .. } => {
                check_density(density)
            }
            Sparsification::Breadcrumbs { density, gamma } => {
                check_density(density)?;
                crate::error::check_unit("gamma", gamma)?;
                if gamma + density > 1.0 {
                    return Err(Error::invalid(
                        "gamma",
                        format!("gamma + density must be <= 1, got {gamma} + {density}"),
                    ));
                }
                Ok(())
            }
            Sparsification::Della {
                density, epsilon, ..
            } => {
                check_density(density)?;
                if !(epsilon >= 0.0
                    && density - epsilon / 2.0 > 0.0
                    && density + epsilon / 2.0 <= 1.0)
                {
                    return Err(Error::invalid(
                        "epsilon",
                        format!(
                            "keep probabilities density +- epsilon/2 must lie in (0, 1], got density {density}, epsilon {epsilon}"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Task-vector merging: `base + lambda * combine_i(sparsify(theta_i - base))`, with the
/// base held in the merger. The models passed to `merge` are the fine-tuned ones.
///
/// Ready configurations: [`task_arithmetic`](TaskMerge::task_arithmetic),
/// [`ties`](TaskMerge::ties), [`dare`](TaskMerge::dare) (DARE-linear; with
/// [`Consensus::SignElection`] it is DARE-TIES), [`breadcrumbs`](TaskMerge::breadcrumbs),
/// [`della`](TaskMerge::della). Weights default to 1 per model.
///
/// The base must hold every parameter of the merged models with the same shape; a
/// missing or mis-shaped base parameter is an error naming it ([`Error::MissingParam`],
/// [`Error::ShapeMismatch`]) raised when that tensor is merged. Parameters only the
/// base has are ignored.
///
/// ```
/// use modelfusion::merge::{Merger, TaskMerge};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let base = StateDict::from_pairs([("w", arr1(&[1.0f64, 1.0, 1.0]).into_dyn())])?;
/// let a = StateDict::from_pairs([("w", arr1(&[2.0, 1.0, 0.5]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[3.0, 1.0, 2.0]).into_dyn())])?;
/// // Task arithmetic: base + 0.5 * (tau_a + tau_b).
/// let ta = TaskMerge::task_arithmetic(base.clone(), 0.5)?.merge(&[&a, &b])?;
/// assert_eq!(ta.get("w").unwrap().as_slice().unwrap(), &[2.5, 1.0, 1.25]);
/// // TIES with density 1: signs +,0,(-0.5 vs +1 -> +); disjoint means 1.5, 0, 1.
/// let ties = TaskMerge::ties(base.clone(), 1.0, 1.0)?.merge(&[&a, &b])?;
/// assert_eq!(ties.get("w").unwrap().as_slice().unwrap(), &[2.5, 1.0, 2.0]);
/// // Hyperparameters are checked up front.
/// assert!(TaskMerge::ties(base, 1.5, 1.0).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct TaskMerge<M> {
    base: M,
    lambda: f64,
    weights: Option<Vec<f64>>,
    sparsification: Sparsification,
    consensus: Consensus,
}

fn check_lambda(lambda: f64) -> Result<()> {
    if !lambda.is_finite() {
        return Err(Error::invalid(
            "lambda",
            format!("must be finite, got {lambda}"),
        ));
    }
    Ok(())
}

impl<M: Model> TaskMerge<M> {
    /// The general form; errors on invalid hyperparameters.
    ///
    /// ```
    /// use modelfusion::merge::{Consensus, Sparsification, TaskMerge};
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// let m = TaskMerge::new(base.clone(), Sparsification::Magnitude { density: 0.5 }, Consensus::Sum, 1.0)?;
    /// assert_eq!(m.lambda(), 1.0);
    /// assert!(TaskMerge::new(base, Sparsification::None, Consensus::Sum, f64::NAN).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(
        base: M,
        sparsification: Sparsification,
        consensus: Consensus,
        lambda: f64,
    ) -> Result<Self> {
        check_lambda(lambda)?;
        sparsification.validate()?;
        Ok(TaskMerge {
            base,
            lambda,
            weights: None,
            sparsification,
            consensus,
        })
    }

    /// Task arithmetic (Ilharco et al. 2023): `base + lambda * sum_i w_i tau_i`
    /// (mergekit's default lambda is 1, FusionBench's 0.3).
    ///
    /// ```
    /// use modelfusion::merge::{Merger, TaskMerge};
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[1.0f32]).into_dyn())])?;
    /// let a = StateDict::from_pairs([("w", arr1(&[3.0f32]).into_dyn())])?;
    /// let m = TaskMerge::task_arithmetic(base.clone(), 0.0)?.merge(&[&a])?;
    /// assert_eq!(m, base); // lambda 0 returns the base
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn task_arithmetic(base: M, lambda: f64) -> Result<Self> {
        Self::new(base, Sparsification::None, Consensus::Sum, lambda)
    }

    /// TIES-merging (Yadav et al. 2023): trim each task vector to its top
    /// `ceil(density * n)` magnitudes, elect signs, disjoint mean, times `lambda`
    /// (paper: density 0.2, lambda 1).
    ///
    /// ```
    /// use modelfusion::merge::TaskMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert!(TaskMerge::ties(base.clone(), 0.2, 1.0).is_ok());
    /// assert!(TaskMerge::ties(base, 0.0, 1.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn ties(base: M, density: f64, lambda: f64) -> Result<Self> {
        Self::new(
            base,
            Sparsification::Magnitude { density },
            Consensus::SignElection,
            lambda,
        )
    }

    /// DARE (Yu et al. 2024) with a plain weighted sum (DARE-linear): keep each entry
    /// with probability `density`, rescale kept entries by `1 / density`. Use
    /// [`with_consensus`](TaskMerge::with_consensus) for DARE-TIES and
    /// [`with_rescale`](TaskMerge::with_rescale) for the L1-matching rescale.
    ///
    /// ```
    /// use modelfusion::merge::{Merger, TaskMerge};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::Array1;
    /// let base = StateDict::from_pairs([("w", Array1::<f32>::zeros(1000).into_dyn())])?;
    /// let a = StateDict::from_pairs([("w", Array1::<f32>::ones(1000).into_dyn())])?;
    /// let dare = TaskMerge::dare(base, 0.25, 42, 1.0)?;
    /// let m = dare.merge(&[&a])?;
    /// assert_eq!(m, dare.merge(&[&a])?); // same seed, same result
    /// let kept = m.get("w").unwrap().iter().filter(|&&x| x != 0.0).count();
    /// assert!(kept > 180 && kept < 320);
    /// assert!(m.get("w").unwrap().iter().all(|&x| x == 0.0 || x == 4.0)); // 1 / 0.25
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn dare(base: M, density: f64, seed: u64, lambda: f64) -> Result<Self> {
        Self::new(
            base,
            Sparsification::Random {
                density,
                seed,
                rescale: Rescale::InverseDensity,
            },
            Consensus::Sum,
            lambda,
        )
    }

    /// Model breadcrumbs (Davari & Belilovsky 2024): drop the top `gamma` fraction of
    /// magnitudes and keep the next `density` fraction (default `gamma = 0.01`), summed.
    ///
    /// ```
    /// use modelfusion::merge::TaskMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert!(TaskMerge::breadcrumbs(base.clone(), 0.9, 0.01, 1.0).is_ok());
    /// assert!(TaskMerge::breadcrumbs(base, 0.9, 1.0, 1.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn breadcrumbs(base: M, density: f64, gamma: f64, lambda: f64) -> Result<Self> {
        Self::new(
            base,
            Sparsification::Breadcrumbs { density, gamma },
            Consensus::Sum,
            lambda,
        )
    }

    /// DELLA (Deep et al. 2024): magnitude-ranked drop probabilities
    /// (see [`Sparsification::Della`]), sign election, disjoint mean.
    ///
    /// ```
    /// use modelfusion::merge::TaskMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert!(TaskMerge::della(base.clone(), 0.5, 0.2, 1, 1.0).is_ok());
    /// assert!(TaskMerge::della(base, 0.5, 1.5, 1, 1.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn della(base: M, density: f64, epsilon: f64, seed: u64, lambda: f64) -> Result<Self> {
        Self::new(
            base,
            Sparsification::Della {
                density,
                epsilon,
                seed,
            },
            Consensus::SignElection,
            lambda,
        )
    }

    /// Sets one weight per model (finite; the number is checked at merge time).
    ///
    /// ```
    /// use modelfusion::merge::TaskMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// let t = TaskMerge::task_arithmetic(base, 1.0)?;
    /// assert!(t.clone().with_weights(vec![0.3, 0.7]).is_ok());
    /// assert!(t.with_weights(vec![f64::INFINITY]).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_weights(mut self, weights: Vec<f64>) -> Result<Self> {
        check_weights(&weights, "weights")?;
        self.weights = Some(weights);
        Ok(self)
    }

    /// Replaces the combination rule (e.g. DARE-TIES, breadcrumbs-TIES).
    ///
    /// ```
    /// use modelfusion::merge::{Consensus, TaskMerge};
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// let dare_ties = TaskMerge::dare(base, 0.5, 1, 1.0)?.with_consensus(Consensus::SignElection);
    /// assert_eq!(dare_ties.consensus(), Consensus::SignElection);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_consensus(mut self, consensus: Consensus) -> Self {
        self.consensus = consensus;
        self
    }

    /// Sets DARE's rescaling; errors unless the sparsification is
    /// [`Sparsification::Random`].
    ///
    /// ```
    /// use modelfusion::merge::{Rescale, TaskMerge};
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert!(TaskMerge::dare(base.clone(), 0.5, 1, 1.0)?.with_rescale(Rescale::L1Norm).is_ok());
    /// assert!(TaskMerge::ties(base, 0.5, 1.0)?.with_rescale(Rescale::L1Norm).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_rescale(mut self, rescale: Rescale) -> Result<Self> {
        match &mut self.sparsification {
            Sparsification::Random { rescale: r, .. } => {
                *r = rescale;
                Ok(self)
            }
            other => Err(Error::invalid(
                "rescale",
                format!("only random (DARE) sparsification rescales, not {other:?}"),
            )),
        }
    }

    /// The base model.
    ///
    /// ```
    /// use modelfusion::merge::TaskMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(TaskMerge::task_arithmetic(base.clone(), 1.0)?.base(), &base);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn base(&self) -> &M {
        &self.base
    }

    /// The scaling of the combined task vector.
    ///
    /// ```
    /// use modelfusion::merge::TaskMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(TaskMerge::task_arithmetic(base, 0.3)?.lambda(), 0.3);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// The sparsification step.
    ///
    /// ```
    /// use modelfusion::merge::{Sparsification, TaskMerge};
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(TaskMerge::ties(base, 0.2, 1.0)?.sparsification(), Sparsification::Magnitude { density: 0.2 });
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn sparsification(&self) -> Sparsification {
        self.sparsification
    }

    /// The combination rule.
    ///
    /// ```
    /// use modelfusion::merge::{Consensus, TaskMerge};
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(TaskMerge::ties(base, 0.2, 1.0)?.consensus(), Consensus::SignElection);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn consensus(&self) -> Consensus {
        self.consensus
    }

    /// The keep mask DARE draws for model `model`'s tensor `name` of `len` elements
    /// (`true` = kept): the same mask [`merge`](super::Merger::merge) uses. Errors unless
    /// the sparsification is [`Sparsification::Random`].
    ///
    /// ```
    /// use modelfusion::merge::TaskMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// let dare = TaskMerge::dare(base, 0.5, 3, 1.0)?;
    /// let m = dare.keep_mask("w", 0, 100)?;
    /// assert_eq!(m, dare.keep_mask("w", 0, 100)?);
    /// assert_ne!(m, dare.keep_mask("w", 1, 100)?); // another model, another stream
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn keep_mask(&self, name: &str, model: usize, len: usize) -> Result<Vec<bool>> {
        let Sparsification::Random { density, seed, .. } = self.sparsification else {
            return Err(Error::invalid(
                "sparsification",
                "keep masks exist only for random (DARE) sparsification",
            ));
        };
        let thr = kernel::keep_threshold(density);
        let mut mask = vec![false; len];
        kernel::for_chunks(&mut mask, |c, _, o| {
            let mut rng = kernel::chunk_rng(seed, name, model, c);
            for m in o.iter_mut() {
                *m = u64::from(rng.next_u32()) < thr;
            }
        });
        Ok(mask)
    }

    /// Merges one tensor with DARE keep masks supplied by the caller (one per model,
    /// `true` = kept) instead of drawn ones; the rescale and consensus still apply.
    /// Errors unless the sparsification is [`Sparsification::Random`] and every mask has
    /// the tensor's length.
    ///
    /// ```
    /// use modelfusion::merge::TaskMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::{arr1, ArrayD};
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f64, 0.0]).into_dyn())])?;
    /// let a = arr1(&[1.0f64, 2.0]).into_dyn();
    /// let dare = TaskMerge::dare(base, 0.5, 0, 1.0)?;
    /// let m: ArrayD<f64> = dare.merge_tensor_with_masks("w", &[&a], &[&[true, false]])?;
    /// assert_eq!(m.as_slice().unwrap(), &[2.0, 0.0]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn merge_tensor_with_masks(
        &self,
        name: &str,
        tensors: &[&M::Tensor],
        masks: &[&[bool]],
    ) -> Result<M::Tensor> {
        if !matches!(self.sparsification, Sparsification::Random { .. }) {
            return Err(Error::invalid(
                "masks",
                "supplied masks replace DARE's random drop; the sparsification is not random",
            ));
        }
        check_shapes(name, tensors)?;
        check_count(masks.len(), tensors.len(), "masks", name)?;
        let n = tensors[0].len();
        if let Some((i, m)) = masks.iter().enumerate().find(|(_, m)| m.len() != n) {
            return Err(Error::shape(
                format!("keep mask {i} of parameter `{name}`"),
                &[n],
                &[m.len()],
            ));
        }
        self.run(name, tensors, Some(masks))
    }

    /// Merges one tensor into a caller-provided buffer (row-major, the tensor's length),
    /// e.g. to reuse one output buffer across a streamed merge. Same result as
    /// [`merge_tensor`](TensorMerger::merge_tensor).
    ///
    /// ```
    /// use modelfusion::merge::TaskMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[1.0f32, 1.0]).into_dyn())])?;
    /// let a = arr1(&[2.0f32, 0.0]).into_dyn();
    /// let mut out = vec![0.0f32; 2];
    /// TaskMerge::task_arithmetic(base, 0.5)?.merge_tensor_into("w", &[&a], &mut out)?;
    /// assert_eq!(out, vec![1.5, 0.5]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn merge_tensor_into(
        &self,
        name: &str,
        tensors: &[&M::Tensor],
        out: &mut [<M::Tensor as Tensor>::Elem],
    ) -> Result<()> {
        self.run_into(name, tensors, None, out)
    }

    fn run(
        &self,
        name: &str,
        tensors: &[&M::Tensor],
        masks: Option<&[&[bool]]>,
    ) -> Result<M::Tensor> {
        check_shapes(name, tensors)?;
        let mut out = kernel::zeros(tensors[0].len());
        self.run_into(name, tensors, masks, &mut out)?;
        kernel::build(tensors[0].shape(), out)
    }

    fn run_into(
        &self,
        name: &str,
        tensors: &[&M::Tensor],
        masks: Option<&[&[bool]]>,
        out: &mut [<M::Tensor as Tensor>::Elem],
    ) -> Result<()> {
        check_shapes(name, tensors)?;
        let shape = tensors[0].shape().to_vec();
        kernel::check_out_len(name, out.len(), tensors[0].len())?;
        let base = base_tensor(&self.base, name, &shape)?;
        let weights = match &self.weights {
            Some(w) => {
                check_count(w.len(), tensors.len(), "weights", name)?;
                w.clone()
            }
            None => vec![1.0; tensors.len()],
        };
        let b = kernel::elems(base);
        let data: Vec<Cow<'_, [<M::Tensor as Tensor>::Elem]>> =
            tensors.iter().map(|t| kernel::elems(*t)).collect();
        let xs: Vec<&[<M::Tensor as Tensor>::Elem]> = data.iter().map(|c| c.as_ref()).collect();
        let ranks = self.magnitude_ranks(b.len());
        let requests: Vec<(usize, usize)> = (0..xs.len())
            .flat_map(|i| ranks.iter().flatten().map(move |&k| (i, k)))
            .collect();
        let thresholds = kth_largest_many(&xs, &b, &requests);
        let per_model = ranks.iter().flatten().count();
        let rules = xs
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let th = &thresholds[i * per_model..(i + 1) * per_model];
                self.rule(name, i, x, &b, masks.map(|m| m[i]), th)
            })
            .collect::<Result<Vec<_>>>()?;
        combine(&xs, &b, &rules, &weights, self.consensus, self.lambda, out);
        Ok(())
    }

    /// The magnitude ranks each task vector of an `n`-element tensor needs:
    /// `[lower, upper]` of the kept band (`None` = no bound).
    fn magnitude_ranks(&self, n: usize) -> [Option<usize>; 2] {
        let k_of = |density: f64| ((density * n as f64).ceil() as usize).clamp(1, n.max(1));
        match self.sparsification {
            _ if n == 0 => [None, None],
            Sparsification::Magnitude { density } => {
                let k = k_of(density);
                [(k < n).then_some(k), None]
            }
            Sparsification::Breadcrumbs { density, gamma } => {
                let g = ((gamma * n as f64).floor() as usize).min(n - 1);
                let k = k_of(density).min(n - g);
                [Some(g + k), (g > 0).then_some(g + 1)]
            }
            _ => [None, None],
        }
    }

    /// How entries of model `i`'s task vector are kept and scaled (`th`: the
    /// thresholds of [`magnitude_ranks`](Self::magnitude_ranks) that exist, in order).
    fn rule<'a, E: Scalar>(
        &self,
        name: &'a str,
        i: usize,
        x: &[E],
        b: &[E],
        mask: Option<&'a [bool]>,
        th: &[E],
    ) -> Result<Rule<'a, E>> {
        let n = x.len();
        let [lo_rank, hi_rank] = self.magnitude_ranks(n);
        Ok(match self.sparsification {
            Sparsification::None => Rule::All,
            _ if n == 0 => Rule::All,
            Sparsification::Magnitude { .. } | Sparsification::Breadcrumbs { .. } => {
                match (lo_rank, hi_rank) {
                    (None, _) => Rule::All,
                    (Some(_), None) => Rule::Above { lo: th[0] },
                    (Some(_), Some(_)) => Rule::Band {
                        lo: th[0],
                        hi: th[1],
                    },
                }
            }
            Sparsification::Random {
                density,
                seed,
                rescale,
            } => {
                let thr = kernel::keep_threshold(density);
                let draw = match mask {
                    Some(m) => Draw::Given(m),
                    None => Draw::Rng { seed, name, thr },
                };
                let scale = match rescale {
                    Rescale::None => 1.0,
                    Rescale::InverseDensity => 1.0 / density,
                    Rescale::L1Norm => {
                        let sums = kernel::sum_chunks(n, 2, |s, e| {
                            let mut keep = draw.chunk(i, s / kernel::PAR_CHUNK, s);
                            let mut acc = vec![0.0, 0.0];
                            for j in s..e {
                                let v = (x[j] - b[j]).abs().to_f64_lossless();
                                acc[0] += v;
                                if keep.next_keep() {
                                    acc[1] += v;
                                }
                            }
                            acc
                        });
                        if sums[1] > 0.0 {
                            sums[0] / sums[1]
                        } else {
                            1.0
                        }
                    }
                };
                Rule::Random {
                    draw,
                    model: i,
                    scale: E::from_f64_lossy(scale),
                }
            }
            Sparsification::Della {
                density,
                epsilon,
                seed,
            } => {
                let mut order: Vec<u32> = Vec::new();
                let mut order64: Vec<usize> = Vec::new();
                let probs = if n <= u32::MAX as usize {
                    order.extend(0..n as u32);
                    order.sort_unstable_by(|&p, &q| cmp_mag(x, b, p as usize, q as usize));
                    ranked_probs(n, density, epsilon, order.iter().map(|&j| j as usize))
                } else {
                    order64.extend(0..n);
                    order64.sort_unstable_by(|&p, &q| cmp_mag(x, b, p, q));
                    ranked_probs(n, density, epsilon, order64.iter().copied())
                };
                Rule::Della {
                    draw: Draw::Rng { seed, name, thr: 0 },
                    model: i,
                    probs,
                }
            }
        })
    }
}

/// Ascending magnitude of `theta - base`, ties broken by index (a total, stable order).
fn cmp_mag<E: Scalar>(x: &[E], b: &[E], p: usize, q: usize) -> std::cmp::Ordering {
    let mp = (x[p] - b[p]).abs();
    let mq = (x[q] - b[q]).abs();
    mp.partial_cmp(&mq)
        .unwrap_or(std::cmp::Ordering::Equal)
        .then(p.cmp(&q))
}

/// DELLA keep probabilities from the ascending-magnitude order.
fn ranked_probs(
    n: usize,
    density: f64,
    epsilon: f64,
    order: impl Iterator<Item = usize>,
) -> Vec<f64> {
    let mut probs = vec![density; n];
    if n > 1 {
        for (rank, j) in order.enumerate() {
            probs[j] = density + epsilon * (rank as f64 / (n - 1) as f64 - 0.5);
        }
    }
    probs
}

/// Where DARE's keep decisions come from.
#[derive(Clone, Copy, Debug)]
enum Draw<'a> {
    Rng { seed: u64, name: &'a str, thr: u64 },
    Given(&'a [bool]),
}

/// The keep decisions of one chunk, consumed in element order.
enum ChunkDraw<'a> {
    Rng(Box<rand_chacha::ChaCha8Rng>, u64),
    Given(std::slice::Iter<'a, bool>),
}

impl ChunkDraw<'_> {
    #[inline]
    fn next_keep(&mut self) -> bool {
        match self {
            ChunkDraw::Rng(rng, thr) => u64::from(rng.next_u32()) < *thr,
            ChunkDraw::Given(it) => it.next().copied().unwrap_or(false),
        }
    }

    #[inline]
    fn next_u32(&mut self) -> u32 {
        match self {
            ChunkDraw::Rng(rng, _) => rng.next_u32(),
            ChunkDraw::Given(it) => {
                if it.next().copied().unwrap_or(false) {
                    0
                } else {
                    u32::MAX
                }
            }
        }
    }
}

impl<'a> Draw<'a> {
    fn chunk(&self, model: usize, chunk: usize, start: usize) -> ChunkDraw<'a> {
        match *self {
            Draw::Rng { seed, name, thr } => {
                ChunkDraw::Rng(Box::new(kernel::chunk_rng(seed, name, model, chunk)), thr)
            }
            Draw::Given(m) => ChunkDraw::Given(m[start..].iter()),
        }
    }
}

/// Per-model keep rule for one tensor.
enum Rule<'a, E> {
    All,
    /// Keep entries with `lo <= |tau|`.
    Above {
        lo: E,
    },
    /// Keep entries with `lo <= |tau| <= hi`.
    Band {
        lo: E,
        hi: E,
    },
    /// Keep at random (or by a given mask), scale kept entries.
    Random {
        draw: Draw<'a>,
        model: usize,
        scale: E,
    },
    /// DELLA: per-entry keep probability, scale kept by its inverse.
    Della {
        draw: Draw<'a>,
        model: usize,
        probs: Vec<f64>,
    },
}

/// `base + lambda * combine(sparsified task vectors)`, blocked and chunk-parallel.
fn combine<E: Scalar>(
    xs: &[&[E]],
    b: &[E],
    rules: &[Rule<'_, E>],
    weights: &[f64],
    consensus: Consensus,
    lambda: f64,
    out: &mut [E],
) {
    let ws: Vec<E> = weights.iter().map(|&w| E::from_f64_lossy(w)).collect();
    let lam = E::from_f64_lossy(lambda);
    kernel::for_chunks(out, |c, start, o| {
        kernel::simd(
            #[inline(always)]
            || combine_chunk(xs, b, rules, &ws, consensus, lam, c, start, o),
        )
    });
}

/// One chunk of [`combine`]: per cache block, the sparsified task vectors go to a
/// scratch buffer, then branch-free loops (models outer, entries inner) combine them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn combine_chunk<E: Scalar>(
    xs: &[&[E]],
    b: &[E],
    rules: &[Rule<'_, E>],
    ws: &[E],
    consensus: Consensus,
    lam: E,
    c: usize,
    start: usize,
    o: &mut [E],
) {
    let m = xs.len();
    let zero = E::zero();
    let mut draws: Vec<Option<ChunkDraw<'_>>> = rules
        .iter()
        .map(|r| match r {
            Rule::Random { draw, model, .. } | Rule::Della { draw, model, .. } => {
                Some(draw.chunk(*model, c, start))
            }
            _ => None,
        })
        .collect();
    let mut scratch = vec![zero; m * BLOCK];
    let mut acc = [zero; 3 * BLOCK];
    let mut ot = [zero; BLOCK];
    let mut off = 0;
    while off < o.len() {
        let len = BLOCK.min(o.len() - off);
        let s = start + off;
        let bb = &b[s..s + len];
        for (i, rule) in rules.iter().enumerate() {
            let d = &mut scratch[i * BLOCK..i * BLOCK + len];
            let x = &xs[i][s..s + len];
            match rule {
                Rule::All => {
                    for ((d, &x), &b) in d.iter_mut().zip(x).zip(bb) {
                        *d = x - b;
                    }
                }
                Rule::Above { lo } => {
                    let lo = *lo;
                    for ((d, &x), &b) in d.iter_mut().zip(x).zip(bb) {
                        let t = x - b;
                        *d = if t.abs() >= lo { t } else { zero };
                    }
                }
                Rule::Band { lo, hi } => {
                    let (lo, hi) = (*lo, *hi);
                    for ((d, &x), &b) in d.iter_mut().zip(x).zip(bb) {
                        let t = x - b;
                        let a = t.abs();
                        *d = if (a >= lo) & (a <= hi) { t } else { zero };
                    }
                }
                Rule::Random { scale, .. } => {
                    if let Some(dr) = draws[i].as_mut() {
                        for ((d, &x), &b) in d.iter_mut().zip(x).zip(bb) {
                            *d = if dr.next_keep() {
                                (x - b) * *scale
                            } else {
                                zero
                            };
                        }
                    }
                }
                Rule::Della { probs, .. } => {
                    let p = &probs[s..s + len];
                    if let Some(dr) = draws[i].as_mut() {
                        for (((d, &x), &b), &p) in d.iter_mut().zip(x).zip(bb).zip(p) {
                            let u = dr.next_u32();
                            *d = if u64::from(u) < kernel::keep_threshold(p) {
                                E::from_f64_lossy((x - b).to_f64_lossless() / p)
                            } else {
                                zero
                            };
                        }
                    }
                }
            }
        }
        let ob = &mut ot[..len];
        let (tot, rest) = acc.split_at_mut(BLOCK);
        let (num, den) = rest.split_at_mut(BLOCK);
        let (tot, num, den) = (&mut tot[..len], &mut num[..len], &mut den[..len]);
        tot.fill(zero);
        for (i, &w) in ws.iter().enumerate() {
            let d = &scratch[i * BLOCK..i * BLOCK + len];
            for (t, &d) in tot.iter_mut().zip(d) {
                *t += w * d;
            }
        }
        match consensus {
            Consensus::Sum => {
                for ((o, &b), &t) in ob.iter_mut().zip(bb).zip(tot.iter()) {
                    *o = b + lam * t;
                }
            }
            Consensus::SignElection => {
                // tot becomes the elected sign g in {-1, 0, 1}; an entry agrees when
                // d * g > 0 (exact: g is +-1 or 0). Sums run over |d| and the sign is
                // restored at the end, which is bitwise the signed disjoint mean.
                let one = E::one();
                for t in tot.iter_mut() {
                    let v = *t;
                    *t = if v > zero {
                        one
                    } else if v < zero {
                        -one
                    } else {
                        zero
                    };
                }
                num.fill(zero);
                den.fill(zero);
                for (i, &w) in ws.iter().enumerate() {
                    let d = &scratch[i * BLOCK..i * BLOCK + len];
                    for (((n, dn), &g), &d) in
                        num.iter_mut().zip(den.iter_mut()).zip(tot.iter()).zip(d)
                    {
                        let a = d * g;
                        let agree = a > zero;
                        *n += if agree { w * a } else { zero };
                        *dn += if agree { w } else { zero };
                    }
                }
                for ((((o, &b), &n), &dn), &g) in ob
                    .iter_mut()
                    .zip(bb)
                    .zip(num.iter())
                    .zip(den.iter())
                    .zip(tot.iter())
                {
                    let merged = if dn != zero { g * (n / dn) } else { zero };
                    *o = b + lam * merged;
                }
            }
        }
        kernel::stream_copy(ob, &mut o[off..off + len]);
        off += len;
    }
    kernel::stream_fence();
}

impl<M: Model> TensorMerger<M::Tensor> for TaskMerge<M> {
    fn merge_tensor(&self, name: &str, tensors: &[&M::Tensor]) -> Result<M::Tensor> {
        self.run(name, tensors, None)
    }
}
