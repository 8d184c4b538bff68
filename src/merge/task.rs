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
use super::chunked::{ChunkSink, ChunkedInputs, SliceChunks};
use super::kernel::{self, BLOCK, base_tensor, check_count, check_shapes, check_weights};
use super::select::{
    Base, BlockCut, Cut, CutRequest, Cuts, count_around, key, kth_largest_many, stream_cuts,
    torch_sort_cuts,
};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::{Scalar, Tensor};
use rayon::prelude::*;

/// How each task vector is sparsified before combining, as mergekit 0.1.5 does it.
/// `density` is the kept fraction, in `[0, 1]`: 1 keeps everything, 0 nothing.
/// Magnitude orders are those of torch's CPU sort of the f32 magnitudes (libstdc++
/// introsort), so entries tied at a cut are split exactly as mergekit splits them.
///
/// ```
/// use modelfusion::merge::Sparsification;
/// let s = Sparsification::Random { density: 0.1, seed: 7 };
/// assert!(s.validate().is_ok());
/// assert!(Sparsification::Magnitude { density: 1.5 }.validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sparsification {
    /// Keep everything (task arithmetic).
    None,
    /// TIES's trim: keep exactly `k = max(1, floor(density * n))` entries of largest
    /// magnitude (torch's descending sort decides among ties).
    Magnitude {
        /// Kept fraction, in `[0, 1]`.
        density: f64,
    },
    /// DARE: keep each entry independently with probability `density`.
    /// The random stream of each tensor derives from `(seed, tensor name, model index)`.
    Random {
        /// Keep probability `p`, in `[0, 1]`.
        density: f64,
        /// The caller's seed.
        seed: u64,
    },
    /// Model breadcrumbs (mergekit's `magnitude_outliers`): with `t = floor(density n)`
    /// and `g = floor(gamma n)`, keep ascending sorted positions `[b, b + t)` where
    /// `b = max(0, n - t - g)`: the `g` largest magnitudes are dropped (fewer when
    /// `density + gamma > 1`) and the small rest. `density = 1` keeps everything.
    Breadcrumbs {
        /// Kept fraction, in `[0, 1]`.
        density: f64,
        /// Fraction of largest magnitudes dropped, in `[0, 1]`.
        gamma: f64,
    },
    /// DELLA's MagPrune (mergekit's `della_magprune`): magnitudes are ranked along axis
    /// 1 (per row of a matrix; a vector is one row), and entry `j` of a row of `m` is
    /// kept with probability `p_j = density - epsilon + 2 epsilon r_j / (m - 1)`
    /// (`r_j` its 0-based ascending rank). `density = 1` keeps everything.
    Della {
        /// Mean keep probability, in `[0, 1]`.
        density: f64,
        /// Spread of the keep probabilities: they span `[density - epsilon,
        /// density + epsilon]`, which must lie inside `(0, 1)` when `0 < density < 1`.
        epsilon: f64,
        /// The caller's seed.
        seed: u64,
    },
}

/// How the entries a sparsification keeps are rescaled (any sparsification).
///
/// ```
/// use modelfusion::merge::Rescale;
/// assert_ne!(Rescale::InverseDensity, Rescale::L1Norm);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rescale {
    /// Multiply kept entries by `1 / density` (the DARE paper); DELLA divides each by
    /// its own keep probability `p_j` (the DELLA paper).
    InverseDensity,
    /// Multiply the kept entries of each tensor's task vector by
    /// `||tau||_1 / ||kept tau||_1` (both sums rounded to the compute type, and no
    /// rescaling when either is below `1e-7`), so its L1 norm is unchanged: mergekit's
    /// `rescale: true`.
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
    /// `sum_i w_i tau_i` (task arithmetic, DARE-linear); normalised, divided by
    /// `sum_i w_i` (1 when `|sum_i w_i| < 1e-8`).
    Sum,
    /// TIES: elect `s = +1` where `sum_i w_i tau_i >= 0`, else `-1` (mergekit), then
    /// `sum_i m_i w_i tau_i` over the entries whose weighted sign is `s`
    /// (`m_i = [sign(w_i tau_i) = s]`); normalised, divided by `sum_i m_i w_i` (1 when
    /// that is 0): the disjoint mean.
    SignElection,
}

/// Which of the entries tied in magnitude at a trimming cut (TIES, breadcrumbs) the cut
/// keeps, when it falls among them.
///
/// ```
/// use modelfusion::merge::TieOrder;
/// assert_eq!(TieOrder::default(), TieOrder::Torch);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TieOrder {
    /// The order torch's CPU sort leaves them in, as mergekit keeps them (the default):
    /// exact parity, but a tensor whose cut splits tied entries (common in bf16 and
    /// fp16) has torch's sort replayed over all its keys (which tied entries the sort
    /// keeps depends on every key, see docs/mergekit.md), so a
    /// [chunked](TaskMerge::merge_chunked) merge holds two 32-bit values per element of
    /// that tensor (its keys and sort indices, one model at a time) in memory.
    #[default]
    Torch,
    /// Index order (a stable sort): a cut keeps the tied entries of lowest index.
    /// Chunked merges stay in bounded memory for every tensor.
    Index,
}

fn check_density(density: f64) -> Result<()> {
    crate::error::check_fraction("density", density)
}

impl Sparsification {
    /// Checks the hyperparameters (called by every constructor).
    ///
    /// ```
    /// use modelfusion::merge::Sparsification;
    /// assert!(Sparsification::Breadcrumbs { density: 0.9, gamma: 1.2 }.validate().is_err());
    /// assert!(Sparsification::Della { density: 0.5, epsilon: 0.2, seed: 0 }.validate().is_ok());
    /// // mergekit: density +- epsilon must lie inside (0, 1).
    /// assert!(Sparsification::Della { density: 0.5, epsilon: 0.5, seed: 0 }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        match *self {
            Sparsification::None => Ok(()),
            Sparsification::Magnitude { density } | Sparsification::Random { density, .. } => {
                check_density(density)
            }
            Sparsification::Breadcrumbs { density, gamma } => {
                check_density(density)?;
                crate::error::check_fraction("gamma", gamma)
            }
            Sparsification::Della {
                density, epsilon, ..
            } => {
                check_density(density)?;
                let inside = density - epsilon > 0.0 && density + epsilon < 1.0;
                if !(epsilon >= 0.0 && (density <= 0.0 || density >= 1.0 || inside)) {
                    return Err(Error::invalid(
                        "epsilon",
                        format!(
                            "keep probabilities density +- epsilon must lie inside (0, 1) (as mergekit requires), got density {density}, epsilon {epsilon}"
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
    /// `None`: the base is the first tensor of every call.
    base: Option<M>,
    lambda: f64,
    weights: Option<Vec<f64>>,
    sparsification: Sparsification,
    per_model: Option<Vec<Sparsification>>,
    consensus: Consensus,
    rescale: Rescale,
    normalize: Option<bool>,
    tie_order: TieOrder,
}

fn check_lambda(lambda: f64) -> Result<()> {
    crate::error::check_finite("lambda", lambda)
}

impl<M: Model> TaskMerge<M> {
    /// The general form; errors on invalid hyperparameters. Rescaling defaults to the
    /// papers' ([`Rescale::InverseDensity`] for DARE and DELLA, none otherwise), and
    /// normalisation to on for sign election, off for sums.
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
        Self::build(Some(base), sparsification, consensus, lambda)
    }

    fn build(
        base: Option<M>,
        sparsification: Sparsification,
        consensus: Consensus,
        lambda: f64,
    ) -> Result<Self> {
        check_lambda(lambda)?;
        sparsification.validate()?;
        let rescale = match sparsification {
            Sparsification::Random { .. } | Sparsification::Della { .. } => Rescale::InverseDensity,
            _ => Rescale::None,
        };
        Ok(TaskMerge {
            base,
            lambda,
            weights: None,
            sparsification,
            per_model: None,
            consensus,
            rescale,
            normalize: None,
            tie_order: TieOrder::Torch,
        })
    }

    /// The general form with the base model streamed in rather than held: every call
    /// gets the base's tensor first, then the models' (`merge_tensor(name, &[base, a,
    /// b])`, or `merge(&[&base, &a, &b])`), so a streamed merge
    /// ([`merge_checkpoints`](crate::io::merge_checkpoints)) reads the base checkpoint
    /// from disk beside the others. Weights and per-model settings count the models only;
    /// results equal [`new`](Self::new)'s with the same base.
    ///
    /// ```
    /// use modelfusion::merge::{Consensus, Merger, Sparsification, TaskMerge};
    /// use modelfusion::{StateDict, StateDictF64};
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[1.0f64, 1.0, 1.0]).into_dyn())])?;
    /// let a = StateDict::from_pairs([("w", arr1(&[2.0, 1.0, 0.5]).into_dyn())])?;
    /// let b = StateDict::from_pairs([("w", arr1(&[3.0, 1.0, 2.0]).into_dyn())])?;
    /// let held = TaskMerge::ties(base.clone(), 1.0, 1.0)?.merge(&[&a, &b])?;
    /// let streamed = TaskMerge::<StateDictF64>::base_input(
    ///     Sparsification::Magnitude { density: 1.0 }, Consensus::SignElection, 1.0)?;
    /// assert_eq!(streamed.merge(&[&base, &a, &b])?, held);
    /// assert!(streamed.merge(&[&base]).is_err()); // the base and no model
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn base_input(
        sparsification: Sparsification,
        consensus: Consensus,
        lambda: f64,
    ) -> Result<Self> {
        Self::build(None, sparsification, consensus, lambda)
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
    /// `max(1, floor(density * n))` magnitudes, elect signs, disjoint mean, times
    /// `lambda` (paper: density 0.2, lambda 1).
    ///
    /// ```
    /// use modelfusion::merge::TaskMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert!(TaskMerge::ties(base.clone(), 0.2, 1.0).is_ok());
    /// assert!(TaskMerge::ties(base, 1.5, 1.0).is_err());
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
            Sparsification::Random { density, seed },
            Consensus::Sum,
            lambda,
        )
    }

    /// Model breadcrumbs (Davari & Belilovsky 2024): drop the top `gamma` fraction of
    /// magnitudes and keep the next `density` fraction (mergekit's defaults: density 1,
    /// which keeps everything, gamma 0.01), summed.
    ///
    /// ```
    /// use modelfusion::merge::TaskMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert!(TaskMerge::breadcrumbs(base.clone(), 0.9, 0.01, 1.0).is_ok());
    /// assert!(TaskMerge::breadcrumbs(base, 0.9, 1.5, 1.0).is_err());
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
    /// (see [`Sparsification::Della`]), kept entries divided by their keep probability
    /// (the paper; mergekit rescales to the L1 norm: [`Rescale::L1Norm`]), sign
    /// election, disjoint mean.
    ///
    /// ```
    /// use modelfusion::merge::TaskMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert!(TaskMerge::della(base.clone(), 0.5, 0.2, 1, 1.0).is_ok());
    /// assert!(TaskMerge::della(base, 0.5, 0.6, 1, 1.0).is_err());
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

    /// Sets how kept entries are rescaled (any sparsification; see [`Rescale`]).
    /// Never fails today; kept fallible for hyperparameter checks.
    ///
    /// ```
    /// use modelfusion::merge::{Merger, Rescale, TaskMerge};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32, 0.0, 0.0, 0.0]).into_dyn())])?;
    /// let a = StateDict::from_pairs([("w", arr1(&[4.0f32, -1.0, 2.0, 1.0]).into_dyn())])?;
    /// // TIES keeps the top 2 (4 and 2); L1 rescaling scales them by 8 / 6.
    /// let m = TaskMerge::ties(base, 0.5, 1.0)?.with_rescale(Rescale::L1Norm)?.merge(&[&a])?;
    /// let w = m.get("w").unwrap();
    /// assert!((w[[0]] - 16.0 / 3.0).abs() < 1e-6 && w[[1]] == 0.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_rescale(mut self, rescale: Rescale) -> Result<Self> {
        self.rescale = rescale;
        Ok(self)
    }

    /// Sets whether the combined task vector is divided by the weights (the agreeing
    /// weights under sign election; see [`Consensus`]). Default: on for sign election,
    /// off for sums. mergekit's `normalize`.
    ///
    /// ```
    /// use modelfusion::merge::{Merger, TaskMerge};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// let a = StateDict::from_pairs([("w", arr1(&[1.0f32]).into_dyn())])?;
    /// let b = StateDict::from_pairs([("w", arr1(&[3.0f32]).into_dyn())])?;
    /// let ties = TaskMerge::ties(base, 1.0, 1.0)?;
    /// assert_eq!(ties.clone().merge(&[&a, &b])?.get("w").unwrap()[[0]], 2.0); // mean
    /// let sum = ties.with_normalize(false).merge(&[&a, &b])?;
    /// assert_eq!(sum.get("w").unwrap()[[0]], 4.0); // sum of the agreeing deltas
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_normalize(mut self, normalize: bool) -> Self {
        self.normalize = Some(normalize);
        self
    }

    /// Sets which entries tied in magnitude at a trimming cut are kept (see
    /// [`TieOrder`]; default [`TieOrder::Torch`], mergekit's).
    ///
    /// ```
    /// use modelfusion::merge::{Merger, TaskMerge, TieOrder};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32; 4]).into_dyn())])?;
    /// let a = StateDict::from_pairs([("w", arr1(&[1.0f32, 1.0, 1.0, 1.0]).into_dyn())])?;
    /// // Density 0.5 keeps 2 of 4 tied entries: the first two in index order.
    /// let ties = TaskMerge::ties(base, 0.5, 1.0)?.with_tie_order(TieOrder::Index);
    /// assert_eq!(ties.tie_order(), TieOrder::Index);
    /// let m = ties.merge(&[&a])?;
    /// assert_eq!(m.get("w").unwrap().as_slice().unwrap(), &[1.0, 1.0, 0.0, 0.0]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_tie_order(mut self, order: TieOrder) -> Self {
        self.tie_order = order;
        self
    }

    /// Which tied entries a trimming cut keeps.
    ///
    /// ```
    /// use modelfusion::merge::{TaskMerge, TieOrder};
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(TaskMerge::ties(base, 0.2, 1.0)?.tie_order(), TieOrder::Torch);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn tie_order(&self) -> TieOrder {
        self.tie_order
    }

    /// Sets one sparsification per model (e.g. per-model densities), replacing the
    /// shared one; the number is checked at merge time.
    ///
    /// ```
    /// use modelfusion::merge::{Merger, Sparsification, TaskMerge};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32, 0.0]).into_dyn())])?;
    /// let a = StateDict::from_pairs([("w", arr1(&[1.0f32, 2.0]).into_dyn())])?;
    /// let per = vec![Sparsification::Magnitude { density: 0.5 }, Sparsification::None];
    /// let m = TaskMerge::ties(base, 1.0, 1.0)?.with_sparsifications(per)?;
    /// assert!(m.merge(&[&a]).is_err()); // two sparsifications for one model
    /// assert!(m.merge(&[&a, &a]).is_ok());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_sparsifications(mut self, per_model: Vec<Sparsification>) -> Result<Self> {
        per_model.iter().try_for_each(Sparsification::validate)?;
        self.per_model = Some(per_model);
        Ok(self)
    }

    /// The base model.
    ///
    /// ```
    /// use modelfusion::merge::TaskMerge;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert_eq!(TaskMerge::task_arithmetic(base.clone(), 1.0)?.base(), Some(&base));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn base(&self) -> Option<&M> {
        self.base.as_ref()
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
        let Sparsification::Random { density, seed } = self.sparsification_of(model) else {
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
        let models = tensors
            .len()
            .saturating_sub(usize::from(self.base.is_none()));
        if !(0..models).all(|i| matches!(self.sparsification_of(i), Sparsification::Random { .. }))
        {
            return Err(Error::invalid(
                "masks",
                "supplied masks replace DARE's random drop; the sparsification is not random",
            ));
        }
        check_shapes(name, tensors)?;
        check_count(masks.len(), models, "masks", name)?;
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

    /// The chunk size [`merge_chunked`](Self::merge_chunked) needs to stream a tensor
    /// of `shape` near `requested` elements: `requested`, unless a model's DELLA
    /// ranks it (per slab of axis 0, see [`Sparsification::Della`]) and every chunk must
    /// then hold whole slabs (and, with [`Rescale::L1Norm`], whole 65 536-element
    /// ranges): the largest multiple of that unit up to `requested`, at least one unit
    /// (at most the whole tensor).
    ///
    /// ```
    /// use modelfusion::merge::{Sparsification, TaskMerge};
    /// use modelfusion::StateDictF32;
    /// let della = TaskMerge::<StateDictF32>::base_input(
    ///     Sparsification::Della { density: 0.5, epsilon: 0.1, seed: 0 },
    ///     modelfusion::merge::Consensus::Sum,
    ///     1.0,
    /// )?;
    /// assert_eq!(della.chunk_elems_for(&[100, 30], 1000), 990);
    /// assert_eq!(della.chunk_elems_for(&[100, 30], 10), 30);
    /// assert_eq!(della.chunk_elems_for(&[7], 4), 7);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn chunk_elems_for(&self, shape: &[usize], requested: usize) -> usize {
        let della = |s: &Sparsification| matches!(*s, Sparsification::Della { density, .. } if density > 0.0 && density < 1.0);
        let ranks = della(&self.sparsification)
            || self.per_model.as_ref().is_some_and(|p| p.iter().any(della));
        if !ranks {
            return requested;
        }
        let n = shape.iter().product::<usize>().max(1);
        let (len, stride) = della_geometry(shape);
        let mut unit = (len * stride).max(1);
        if self.rescale == Rescale::L1Norm {
            unit = unit / gcd(unit, kernel::PAR_CHUNK) * kernel::PAR_CHUNK;
        }
        if unit >= n {
            return n;
        }
        (requested / unit).max(1) * unit
    }

    /// Merges tensor `name` (of `shape`) from inputs read chunk by chunk (the base's
    /// first when it streams in, see [`base_input`](Self::base_input); then the
    /// models'), handing the merged elements to `out(start, elements)` (chunks in any
    /// order, possibly in parallel). Magnitude trimming ([`Sparsification::Magnitude`],
    /// [`Sparsification::Breadcrumbs`]) finds its cuts with a few passes over the chunks
    /// in bounded memory: a histogram of the magnitudes' high 16 bits per model (kept
    /// per chunk for bins of one value, so a cut splitting tied entries finds its tie
    /// end by reading one chunk), then, for a bin of several values, its entries (or a
    /// histogram of their low bits), then the merge itself. DARE's and DELLA's random
    /// keeps draw the same streams as the whole-tensor path (DELLA ranking each chunk's
    /// slabs of axis 0 on its own, so chunks must hold whole slabs: see
    /// [`chunk_elems_for`](Self::chunk_elems_for)), and [`Rescale::L1Norm`] takes one more
    /// pass for its sums (when the chunk size is a multiple of 65 536 elements or the
    /// tensor is one chunk). The result is exactly
    /// [`merge_tensor`](TensorMerger::merge_tensor)'s. Whole tensors are read instead
    /// (memory as for `merge_tensor`) for DELLA over chunks splitting slabs,
    /// [`Rescale::L1Norm`] over other chunk sizes, inputs holding a NaN or an infinity (the same error as `merge_tensor`'s),
    /// and, in [`TieOrder::Torch`], tensors whose cut splits entries tied in magnitude
    /// (which entries torch's sort keeps depends on every key of the tensor, not only
    /// on the tied entries' positions: see docs/mergekit.md).
    ///
    /// ```
    /// use modelfusion::merge::{Merger, SliceChunks, TaskMerge, TieOrder};
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// use std::sync::Mutex;
    /// let base = StateDict::from_pairs([("w", arr1(&[0.0f32; 6]).into_dyn())])?;
    /// let a = arr1(&[3.0f32, -1.0, 2.0, 0.5, -4.0, 1.0]);
    /// let ties = TaskMerge::ties(base, 0.5, 1.0)?.with_tie_order(TieOrder::Index);
    /// let got = Mutex::new(vec![0.0f32; 6]);
    /// let src = SliceChunks::new(vec![a.as_slice().unwrap()], 4)?;
    /// ties.merge_chunked("w", &[6], &src, &|start, xs: &[f32]| {
    ///     got.lock().unwrap()[start..start + xs.len()].copy_from_slice(xs);
    ///     Ok(())
    /// })?;
    /// assert_eq!(got.into_inner().unwrap(), vec![3.0, 0.0, 2.0, 0.0, -4.0, 0.0]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn merge_chunked<C>(
        &self,
        name: &str,
        shape: &[usize],
        inputs: &C,
        out: &ChunkSink<'_, <M::Tensor as Tensor>::Elem>,
    ) -> Result<()>
    where
        C: ChunkedInputs<<M::Tensor as Tensor>::Elem>,
    {
        let n = inputs.len();
        if shape.iter().product::<usize>() != n {
            return Err(Error::shape(
                format!("parameter `{name}` (chunked inputs)"),
                shape,
                &[n],
            ));
        }
        let held = match &self.base {
            Some(m) => Some(kernel::elems(base_tensor(m, name, shape)?)),
            None => None,
        };
        let models = inputs.inputs().saturating_sub(usize::from(held.is_none()));
        let plans = self.plans(n, models);
        // The L1 sums add per-`PAR_CHUNK` partials in order, so each of those ranges
        // must lie in one input chunk.
        let aligned = inputs.chunk_elems() % kernel::PAR_CHUNK == 0 || inputs.chunks() <= 1;
        // DELLA ranks within slabs: every chunk must hold whole ones.
        let (len, stride) = della_geometry(shape);
        let slabs = inputs.chunks() <= 1 || inputs.chunk_elems() % (len * stride).max(1) == 0;
        let chunkable = models > 0
            && (slabs || plans.iter().all(|p| !matches!(p, Plan::Della)))
            && (self.rescale != Rescale::L1Norm || aligned);
        if !chunkable {
            return self.merge_read_whole(name, shape, inputs, out);
        }
        let weights = self.weights_for(name, models)?;
        let base = Base(held.as_deref());
        let requests = cut_requests(&plans, n);
        let (cuts, split) = if requests.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            match stream_cuts(inputs, base, &requests, self.tie_order == TieOrder::Index)? {
                Cuts::Found(c, s) => (c, s),
                Cuts::Whole => return self.merge_read_whole(name, shape, inputs, out),
            }
        };
        // Models whose cut splits ties in torch's order: their keys gathered whole (one
        // model at a time) and torch's sort replayed over them.
        let mut replayed: Vec<Option<Keep<_>>> = (0..models).map(|_| None).collect();
        for (r, req) in requests.iter().enumerate() {
            if split[r] && replayed[req.model].is_none() {
                let keys = gather_keys(inputs, base, req.model)?;
                replayed[req.model] = Some(replay_plan(plans[req.model], keys));
            }
        }
        let keeps: Vec<_> = cut_keeps(plans, cuts, n, |i| self.della_of(i, shape))
            .into_iter()
            .zip(replayed)
            .map(|(k, r)| r.unwrap_or(k))
            .collect();
        // Without the data, the rules leave the L1 sums to the pass below.
        let mut rules: Vec<_> = keeps
            .into_iter()
            .enumerate()
            .map(|(i, k)| self.rule(name, i, k, &[], &[], None))
            .collect();
        if self.rescale == Rescale::L1Norm {
            self.l1_pass(inputs, base, &mut rules)?;
        }
        let normalize = self
            .normalize
            .unwrap_or(self.consensus == Consensus::SignElection);
        let (ws, lam, sum_div) = mix_constants(&weights, self.lambda);
        let consensus = self.consensus;
        // Per worker: an output buffer, and whether a chunk held a non-finite input.
        let flags = inputs.fold_chunks(
            0..inputs.chunks(),
            &|| (Vec::new(), false),
            &|acc, start, ts| {
                let (b, xs) = base.split(start, ts);
                if acc.1 || !(kernel::all_finite(b) && xs.iter().all(|x| kernel::all_finite(x))) {
                    acc.1 = true;
                    return Ok(());
                }
                let local = chunk_rules(&rules, xs, b, start);
                let rules = local.rules(&rules);
                // Every element is written below: no zeroing of a reused buffer.
                let o = &mut acc.0;
                o.resize(b.len(), num_traits::Zero::zero());
                // Random draws follow the whole path's `PAR_CHUNK` streams: pieces
                // ending at their boundaries.
                let mut off = 0;
                while off < o.len() {
                    let s = start + off;
                    let len = (kernel::PAR_CHUNK - s % kernel::PAR_CHUNK).min(o.len() - off);
                    let piece = &mut o[off..off + len];
                    kernel::simd(
                        #[inline(always)]
                        || {
                            combine_chunk(
                                xs, b, start, &rules, &ws, consensus, normalize, sum_div, lam, s,
                                piece,
                            )
                        },
                    );
                    off += len;
                }
                if !kernel::all_finite(o) {
                    return Err(kernel::overflow_error("lambda", self.lambda, name));
                }
                out(start, o)
            },
        )?;
        if flags.iter().any(|f| f.1) {
            return self.merge_read_whole(name, shape, inputs, out);
        }
        Ok(())
    }

    /// The L1 rescale of every rule that trims, from one pass over the chunks: the
    /// sums of [`l1_partial`] per [`kernel::PAR_CHUNK`] range, added in range order as
    /// the whole-tensor path adds them.
    fn l1_pass<E: Scalar, C: ChunkedInputs<E>>(
        &self,
        inputs: &C,
        base: Base<'_, E>,
        rules: &mut [Rule<'_, E>],
    ) -> Result<()> {
        let trims: Vec<usize> = (0..rules.len())
            .filter(|&i| !matches!(rules[i].keep, Keep::All | Keep::Nothing))
            .collect();
        if trims.is_empty() {
            return Ok(());
        }
        let shared: &[Rule<'_, E>] = rules;
        // DELLA's keeps are recorded (one bit per element) so that the merge pass
        // neither ranks nor draws again; pieces start at multiples of `PAR_CHUNK`.
        let ranked: Vec<bool> = shared
            .iter()
            .map(|r| matches!(r.keep, Keep::DellaRows { .. }))
            .collect();
        type Part = (usize, usize, [f64; 2], Vec<u64>);
        let parts = inputs.fold_chunks(
            0..inputs.chunks(),
            &Vec::new,
            &|acc: &mut Vec<Part>, start, ts| {
                let (b, xs) = base.split(start, ts);
                let local = chunk_rules(shared, xs, b, start);
                let chunk = local.rules(shared);
                for (l, bp) in b.chunks(kernel::PAR_CHUNK).enumerate() {
                    let (s, off) = (start + l * kernel::PAR_CHUNK, l * kernel::PAR_CHUNK);
                    for &i in &trims {
                        let x = &xs[i][off..off + bp.len()];
                        let mut bits = Vec::new();
                        let sums = l1_partial(chunk[i], x, bp, s, ranked[i].then_some(&mut bits));
                        acc.push((s, i, sums, bits));
                    }
                }
                Ok(())
            },
        )?;
        let mut parts: Vec<Part> = parts.into_iter().flatten().collect();
        parts.sort_unstable_by_key(|p| (p.1, p.0));
        let n = inputs.len();
        for &i in &trims {
            let mut sums = [0.0, 0.0];
            let mut bits = if ranked[i] {
                vec![0u64; n.div_ceil(64)]
            } else {
                Vec::new()
            };
            for p in parts.iter_mut().filter(|p| p.1 == i) {
                sums[0] += p.2[0];
                sums[1] += p.2[1];
                if ranked[i] {
                    let w = p.0 / 64;
                    bits[w..w + p.3.len()].copy_from_slice(&p.3);
                    p.3 = Vec::new();
                }
            }
            rules[i].set_l1_scale(&sums);
            if ranked[i] {
                rules[i].keep = Keep::Bits(bits);
            }
        }
        Ok(())
    }

    /// [`merge_chunked`](Self::merge_chunked) for settings that need whole tensors:
    /// reads them, merges as [`merge_tensor`](TensorMerger::merge_tensor) does, and hands
    /// the result out in pieces.
    fn merge_read_whole<C>(
        &self,
        name: &str,
        shape: &[usize],
        inputs: &C,
        out: &ChunkSink<'_, <M::Tensor as Tensor>::Elem>,
    ) -> Result<()>
    where
        C: ChunkedInputs<<M::Tensor as Tensor>::Elem>,
    {
        let n = inputs.len();
        let tensors = (0..inputs.inputs())
            .map(|i| {
                let mut v = kernel::zeros(n);
                inputs.read_whole(i, &mut v)?;
                kernel::build::<M::Tensor>(shape, v)
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&M::Tensor> = tensors.iter().collect();
        let mut merged = kernel::zeros(n);
        self.run_into(name, &refs, None, &mut merged)?;
        drop(tensors);
        const PIECE: usize = 1 << 20;
        merged
            .par_chunks(PIECE)
            .enumerate()
            .try_for_each(|(j, c)| out(j * PIECE, c))
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
        let (base, tensors) = match &self.base {
            Some(m) => (base_tensor(m, name, &shape)?, tensors),
            None => match tensors {
                [base, models @ ..] if !models.is_empty() => (*base, models),
                _ => {
                    return Err(Error::invalid(
                        "tensors",
                        format!(
                            "parameter `{name}`: a merge with the base streamed in needs the base's tensor first, then at least one model's (got {})",
                            tensors.len()
                        ),
                    ));
                }
            },
        };
        let weights = self.weights_for(name, tensors.len())?;
        let b = kernel::elems(base);
        let data: Vec<Cow<'_, [<M::Tensor as Tensor>::Elem]>> =
            tensors.iter().map(|t| kernel::elems(*t)).collect();
        let xs: Vec<&[<M::Tensor as Tensor>::Elem]> = data.iter().map(|c| c.as_ref()).collect();
        // Trimming and sign election could drop a NaN silently: refuse it up front.
        if !(kernel::all_finite(&b) && xs.iter().all(|x| kernel::all_finite(x)))
            && let Some(e) = kernel::nonfinite_input(name, tensors, &[("the base model", base)])
        {
            return Err(e);
        }
        let keeps = self.keeps(&xs, &b, &shape);
        let rules = keeps
            .into_iter()
            .enumerate()
            .map(|(i, keep)| self.rule(name, i, keep, &xs, &b, masks.map(|m| m[i])))
            .collect::<Vec<_>>();
        let normalize = self
            .normalize
            .unwrap_or(self.consensus == Consensus::SignElection);
        combine(
            &xs,
            &b,
            &rules,
            &weights,
            self.consensus,
            normalize,
            self.lambda,
            out,
        );
        // A non-finite result names the input holding a NaN or an infinity, else the
        // setting that made finite inputs overflow.
        kernel::check_merged(name, tensors, &[("the base model", base)], out, || {
            kernel::overflow_error("lambda", self.lambda, name)
        })
    }

    /// The weights of `models` models (1 each by default), with the counts of the
    /// weights and per-model sparsifications checked.
    fn weights_for(&self, name: &str, models: usize) -> Result<Vec<f64>> {
        let weights = match &self.weights {
            Some(w) => {
                check_count(w.len(), models, "weights", name)?;
                w.clone()
            }
            None => vec![1.0; models],
        };
        if let Some(p) = &self.per_model {
            check_count(p.len(), models, "sparsifications", name)?;
        }
        Ok(weights)
    }

    /// The sparsification of model `i`.
    fn sparsification_of(&self, i: usize) -> Sparsification {
        self.per_model
            .as_ref()
            .and_then(|p| p.get(i).copied())
            .unwrap_or(self.sparsification)
    }

    /// Model `i`'s DELLA rule for a tensor of `shape`, ranks unresolved.
    fn della_of<E>(&self, i: usize, shape: &[usize]) -> Keep<E> {
        match self.sparsification_of(i) {
            Sparsification::Della {
                density, epsilon, ..
            } => della_keep(shape, density, epsilon),
            _ => Keep::Nothing,
        }
    }

    /// What each model's sparsification needs for a tensor of `n` elements.
    fn plans(&self, n: usize, models: usize) -> Vec<Plan> {
        let count = |d: f64| (d * n as f64) as usize;
        (0..models)
            .map(|i| match self.sparsification_of(i) {
                Sparsification::None => Plan::All,
                Sparsification::Magnitude { density } => {
                    if density >= 1.0 {
                        Plan::All
                    } else if density <= 0.0 || n == 0 {
                        Plan::Nothing
                    } else {
                        let k = count(density).max(1);
                        if k >= n { Plan::All } else { Plan::Top(k) }
                    }
                }
                Sparsification::Breadcrumbs { density, gamma } => {
                    if density >= 1.0 {
                        return Plan::All;
                    }
                    let target = count(density).min(n);
                    let top = count(gamma);
                    let bot = n.saturating_sub(target + top);
                    if target == 0 {
                        Plan::Nothing
                    } else {
                        Plan::Band(bot, bot + target)
                    }
                }
                Sparsification::Random { density, .. } => {
                    if density >= 1.0 {
                        Plan::All
                    } else {
                        Plan::Random
                    }
                }
                Sparsification::Della { density, .. } => {
                    if density >= 1.0 {
                        Plan::All
                    } else if density <= 0.0 {
                        Plan::Nothing
                    } else {
                        Plan::Della
                    }
                }
            })
            .collect()
    }

    /// The keep rule of every model's task vector for one tensor. Magnitude cuts are
    /// found by fast selection; where entries tied at a cut are split by it, torch's
    /// sort is replayed (see [`torch_sort_cuts`]) to keep exactly mergekit's entries,
    /// or, with [`TieOrder::Index`], the cuts of [`stream_cuts`] keep them in index
    /// order.
    fn keeps<E: Scalar>(&self, xs: &[&[E]], b: &[E], shape: &[usize]) -> Vec<Keep<E>> {
        let n = b.len();
        let plans = self.plans(n, xs.len());
        let della = |i: usize| self.della_of(i, shape);
        if self.tie_order == TieOrder::Index {
            let requests = cut_requests(&plans, n);
            let found = SliceChunks::new(xs.to_vec(), INDEX_CHUNK)
                .and_then(|src| stream_cuts(&src, Base(Some(b)), &requests, true));
            // `Whole` only for non-finite inputs, which the caller has refused.
            if let Ok(Cuts::Found(cuts, _)) = found {
                return cut_keeps(plans, cuts, n, della);
            }
        }
        // Values at the cuts: descending rank k is the k-th largest; ascending position
        // p (the first p smallest) ends at the (n - p + 1)-th largest.
        let mut requests: Vec<(usize, usize)> = Vec::new();
        for (i, p) in plans.iter().enumerate() {
            match *p {
                Plan::Top(k) => requests.push((i, k)),
                Plan::Band(lo, hi) => {
                    if lo > 0 {
                        requests.push((i, n - lo + 1));
                    }
                    if hi < n {
                        requests.push((i, n - hi + 1));
                    }
                }
                _ => {}
            }
        }
        let values = kth_largest_many(xs, b, &requests);
        let counted: Vec<(usize, E)> = requests
            .iter()
            .zip(&values)
            .map(|(&(m, _), &v)| (m, v))
            .collect();
        let counts = count_around(xs, b, &counted);
        let wide = std::mem::size_of::<E>() > 4;
        let mut at = 0;
        let mut next = || {
            let r = (values[at], counts[at]);
            at += 1;
            r
        };
        plans
            .into_iter()
            .enumerate()
            .map(|(i, plan)| match plan {
                Plan::All => Keep::All,
                Plan::Nothing => Keep::Nothing,
                Plan::Random => Keep::Random,
                Plan::Della => della(i),
                Plan::Top(k) => {
                    let (v, (gt, eq)) = next();
                    // All entries tied at the k-th magnitude are kept: no tie to break.
                    if !wide && gt + eq == k {
                        Keep::AtLeast(v)
                    } else {
                        replay_plan(plan, keys_of(xs[i], b))
                    }
                }
                Plan::Band(lo, hi) => {
                    // The first p in ascending order are exactly `<= u` when the
                    // entries `<= u` number p (n - gt of them).
                    let lo_cut = (lo > 0).then(&mut next);
                    let hi_cut = (hi < n).then(&mut next);
                    let clean = |c: Option<(E, (usize, usize))>, p: usize| {
                        c.is_none_or(|(_, (gt, _))| n - gt == p)
                    };
                    if !wide && clean(lo_cut, lo) && clean(hi_cut, hi) {
                        Keep::Band {
                            above: lo_cut.map(|c| c.0),
                            upto: hi_cut.map(|c| c.0),
                        }
                    } else {
                        replay_plan(plan, keys_of(xs[i], b))
                    }
                }
            })
            .collect()
    }

    /// How entries of model `i`'s task vector are kept and scaled.
    fn rule<'a, E: Scalar>(
        &self,
        name: &'a str,
        i: usize,
        keep: Keep<E>,
        xs: &[&[E]],
        b: &[E],
        mask: Option<&'a [bool]>,
    ) -> Rule<'a, E> {
        let sp = self.sparsification_of(i);
        // With the data at hand (the whole-tensor path), DELLA ranks the whole tensor.
        let keep = match xs.get(i) {
            Some(x) => keep.ranked(x, b, 0).unwrap_or(keep),
            None => keep,
        };
        let draw = match sp {
            Sparsification::Random { density, seed } => Some(match mask {
                Some(m) => Draw::Given(m),
                None => Draw::Rng {
                    seed,
                    name,
                    thr: kernel::keep_threshold(density),
                },
            }),
            Sparsification::Della { seed, .. } => Some(Draw::Rng { seed, name, thr: 0 }),
            _ => None,
        };
        let mut rule = Rule {
            keep,
            draw,
            model: i,
            scale: E::one(),
            inverse_p: false,
        };
        if matches!(rule.keep, Keep::All | Keep::Nothing) {
            return rule;
        }
        match self.rescale {
            Rescale::None => {}
            Rescale::InverseDensity => match sp {
                Sparsification::Della { .. } => rule.inverse_p = true,
                Sparsification::Magnitude { density }
                | Sparsification::Breadcrumbs { density, .. }
                | Sparsification::Random { density, .. } => {
                    rule.scale = E::from_f64_lossy(1.0 / density);
                }
                Sparsification::None => {}
            },
            Rescale::L1Norm => {
                // Without the data (a chunked merge), the caller sums in its own pass.
                if let Some(x) = xs.get(i) {
                    let sums = kernel::sum_chunks(b.len(), 2, |s, e| {
                        l1_partial(&rule, &x[s..e], &b[s..e], s, None).to_vec()
                    });
                    rule.set_l1_scale(&sums);
                }
            }
        }
        rule
    }
}

/// What a model's sparsification needs for one tensor, before any data is read.
#[derive(Clone, Copy, Debug)]
enum Plan {
    All,
    Nothing,
    /// The `k` largest magnitudes (torch's descending sort).
    Top(usize),
    /// Ascending sorted positions `lo..hi`.
    Band(usize, usize),
    Random,
    Della,
}

/// Chunk size of the in-memory cut search in index tie order.
const INDEX_CHUNK: usize = 1 << 18;

/// The cuts the plans need, in plan order: the top `k` (descending), and a band's
/// ascending first `lo` and first `hi` (when they are cuts at all).
fn cut_requests(plans: &[Plan], n: usize) -> Vec<CutRequest> {
    let mut out = Vec::new();
    for (model, p) in plans.iter().enumerate() {
        match *p {
            Plan::Top(k) => out.push(CutRequest {
                model,
                desc: true,
                p: k,
            }),
            Plan::Band(lo, hi) => {
                for p in [lo, hi] {
                    if p > 0 && p < n {
                        out.push(CutRequest {
                            model,
                            desc: false,
                            p,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The keep rules of the plans from the cuts of [`cut_requests`] (in its order); DELLA
/// plans get `della(model)`.
fn cut_keeps<E>(
    plans: Vec<Plan>,
    cuts: Vec<Cut>,
    n: usize,
    della: impl Fn(usize) -> Keep<E>,
) -> Vec<Keep<E>> {
    let mut cuts = cuts.into_iter();
    plans
        .into_iter()
        .enumerate()
        .map(|(i, plan)| match plan {
            Plan::All => Keep::All,
            Plan::Nothing => Keep::Nothing,
            Plan::Random => Keep::Random,
            Plan::Della => della(i),
            Plan::Top(_) => Keep::Cuts {
                within: cuts.next(),
                without: None,
            },
            Plan::Band(lo, hi) => {
                // Ascending: the band is the first `hi` without the first `lo`.
                let without = if lo > 0 { cuts.next() } else { None };
                let within = if hi < n { cuts.next() } else { None };
                Keep::Cuts { within, without }
            }
        })
        .collect()
}

/// The sort keys of `x - b` ([`key`]: magnitudes as f32, the way mergekit ranks them).
fn keys_of<E: Scalar>(x: &[E], b: &[E]) -> Vec<f32> {
    x.iter().zip(b).map(|(&x, &b)| key(x, b)).collect()
}

/// The keys of model `model`'s task vector ([`keys_of`]) gathered from the chunks.
fn gather_keys<E: Scalar, C: ChunkedInputs<E>>(
    inputs: &C,
    base: Base<'_, E>,
    model: usize,
) -> Result<Vec<f32>> {
    let keys = std::sync::Mutex::new(vec![0.0f32; inputs.len()]);
    inputs.fold_chunks(0..inputs.chunks(), &|| (), &|_, start, ts| {
        let (b, xs) = base.split(start, ts);
        let part = keys_of(xs[model], b);
        let mut all = keys
            .lock()
            .map_err(|_| Error::invalid("merger", "a worker panicked"))?;
        all[start..start + part.len()].copy_from_slice(&part);
        Ok(())
    })?;
    keys.into_inner()
        .map_err(|_| Error::invalid("merger", "a worker panicked"))
}

/// The keep mask of a trimming plan (top `k` descending, or an ascending band) in
/// torch's order of `keys`, by replaying its sort.
fn replay_plan<E>(plan: Plan, keys: Vec<f32>) -> Keep<E> {
    let n = keys.len();
    let (desc, cuts, lo, hi) = match plan {
        Plan::Top(k) => (true, [k, k], 0, k),
        Plan::Band(lo, hi) => (false, [lo, hi], lo, hi),
        _ => return Keep::All,
    };
    let mut idx: Vec<u32> = (0..n as u32).collect();
    torch_sort_cuts(&keys, &mut idx, desc, &cuts[..if desc { 1 } else { 2 }]);
    drop(keys);
    let mut bits = vec![0u64; n.div_ceil(64)];
    for &j in &idx[lo..hi] {
        bits[j as usize / 64] |= 1 << (j % 64);
    }
    Keep::Bits(bits)
}

/// The geometry of DELLA's ranking (mergekit's `della_magprune`) for a tensor of
/// `shape`: magnitudes are ranked along axis 1, so a slab of `len * stride` elements
/// (one index of axis 0; a 1-D tensor is one slab) holds `stride` independent rankings
/// of `len` entries each. Returns `(len, stride)`.
fn della_geometry(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (*n, 1),
        [_, d1, rest @ ..] => (*d1, rest.iter().product::<usize>()),
    }
}

/// DELLA's ascending 0-based magnitude ranks (ties by index) of `x - b`, which hold
/// whole slabs of [`della_geometry`]'s `(len, stride)`: the same ranks wherever the
/// slabs sit in the tensor, so a chunk of whole slabs ranks on its own.
fn della_ranks<E: Scalar>(x: &[E], b: &[E], len: usize, stride: usize) -> Vec<u32> {
    let mut ranks = vec![0u32; b.len()];
    if len == 0 || stride == 0 {
        return ranks;
    }
    ranks
        .par_chunks_mut(len * stride)
        .enumerate()
        .for_each(|(slab, r)| {
            let off = slab * len * stride;
            let mut order: Vec<u32> = Vec::with_capacity(len);
            for c in 0..stride {
                let at = |p: u32| off + p as usize * stride + c;
                let mag = |p: u32| (x[at(p)] - b[at(p)]).abs();
                order.clear();
                order.extend(0..len as u32);
                order.sort_unstable_by(|&p, &q| {
                    mag(p)
                        .partial_cmp(&mag(q))
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(p.cmp(&q))
                });
                for (rank, &p) in order.iter().enumerate() {
                    r[p as usize * stride + c] = rank as u32;
                }
            }
        });
    ranks
}

/// DELLA's keep rule for a tensor of `shape` before its data is read: keep
/// probabilities `density - epsilon + step * rank`, ranks per slab
/// ([`Keep::DellaRows`], resolved by [`Keep::ranked`]).
fn della_keep<E>(shape: &[usize], density: f64, epsilon: f64) -> Keep<E> {
    let (len, stride) = della_geometry(shape);
    let step = if len > 1 {
        2.0 * epsilon / (len - 1) as f64
    } else {
        0.0
    };
    Keep::DellaRows {
        len,
        stride,
        low: density - epsilon,
        step,
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Which entries of one model's task vector are kept.
enum Keep<E> {
    All,
    Nothing,
    /// `|tau| >= v`.
    AtLeast(E),
    /// `above < |tau| <= upto` (a missing bound is no bound).
    Band {
        above: Option<E>,
        upto: Option<E>,
    },
    /// An explicit mask, one bit per entry.
    Bits(Vec<u64>),
    /// Inside cut `within` (everything when `None`) and outside cut `without`
    /// (nothing excluded when `None`), by [`key`]s and indices.
    Cuts {
        within: Option<Cut>,
        without: Option<Cut>,
    },
    /// At random with probability `density` (or by given masks).
    Random,
    /// At random with probability `low + step * rank`, `ranks` those of elements
    /// `origin..origin + ranks.len()`.
    Della {
        ranks: Vec<u32>,
        origin: usize,
        low: f64,
        step: f64,
    },
    /// DELLA before its ranks are known: ranked per slab of `len * stride` elements
    /// (see [`della_geometry`]) by [`Keep::ranked`] over the whole tensor or over a
    /// chunk of whole slabs. Never reaches [`sparsify_block`] unresolved.
    DellaRows {
        len: usize,
        stride: usize,
        low: f64,
        step: f64,
    },
}

impl<E: Scalar> Keep<E> {
    /// [`Keep::DellaRows`] ranked over elements `origin..origin + b.len()` (whole slabs)
    /// of `x - b`; `None` for every other rule.
    fn ranked(&self, x: &[E], b: &[E], origin: usize) -> Option<Keep<E>> {
        match *self {
            Keep::DellaRows {
                len,
                stride,
                low,
                step,
            } => Some(Keep::Della {
                ranks: della_ranks(x, b, len, stride),
                origin,
                low,
                step,
            }),
            _ => None,
        }
    }
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
    /// The decisions of element `start` on: model `model`'s random stream of the
    /// [`kernel::PAR_CHUNK`]-element chunk holding `start`, from `start`'s word in it (one
    /// word per element), so a piece starting anywhere draws what the whole chunk draws
    /// there. Valid up to the chunk's end.
    fn chunk(&self, model: usize, start: usize) -> ChunkDraw<'a> {
        match *self {
            Draw::Rng { seed, name, thr } => {
                let c = start / kernel::PAR_CHUNK;
                let mut rng = kernel::chunk_rng(seed, name, model, c);
                let word = start - c * kernel::PAR_CHUNK;
                if word > 0 {
                    rng.set_word_pos(word as u128);
                }
                ChunkDraw::Rng(Box::new(rng), thr)
            }
            Draw::Given(m) => ChunkDraw::Given(m[start..].iter()),
        }
    }
}

/// Per-model keep rule for one tensor, with the uniform scale of kept entries (or DELLA's
/// per-entry `1 / p`).
struct Rule<'a, E> {
    keep: Keep<E>,
    draw: Option<Draw<'a>>,
    model: usize,
    scale: E,
    inverse_p: bool,
}

impl<'a, E: Scalar> Rule<'a, E> {
    /// This rule over a chunk of whole DELLA slabs (`x`, `b` from element `start`) with
    /// the chunk's ranks; `None` when the rule needs no data of the chunk.
    fn for_chunk(&self, x: &[E], b: &[E], start: usize) -> Option<Rule<'a, E>> {
        Some(Rule {
            keep: self.keep.ranked(x, b, start)?,
            draw: self.draw,
            model: self.model,
            scale: self.scale,
            inverse_p: self.inverse_p,
        })
    }

    /// mergekit's `rescaled_masked_tensor` from the sums of [`l1_partial`] over the
    /// tensor: the ratio of the two in the compute dtype, unless either is below 1e-7.
    fn set_l1_scale(&mut self, sums: &[f64]) {
        let (before, after) = (E::from_f64_lossy(sums[0]), E::from_f64_lossy(sums[1]));
        let eps = 1e-7;
        if before.to_f64_lossless() >= eps && after.to_f64_lossless() >= eps {
            self.scale = before / after;
        }
    }
}

/// The rules of one input chunk (`xs`, `b` from element `start`): DELLA's ranked over
/// the chunk's slabs, the others as they are ([`ChunkRules::rules`]).
fn chunk_rules<'a, E: Scalar>(
    rules: &[Rule<'a, E>],
    xs: &[&[E]],
    b: &[E],
    start: usize,
) -> ChunkRules<'a, E> {
    ChunkRules(
        rules
            .iter()
            .map(|r| r.for_chunk(xs[r.model], b, start))
            .collect(),
    )
}

/// The chunk's own rules of [`chunk_rules`], where a rule has one.
struct ChunkRules<'a, E>(Vec<Option<Rule<'a, E>>>);

impl<'a, E> ChunkRules<'a, E> {
    /// Every rule of the chunk: its own where it has one, else the tensor's.
    fn rules<'r>(&'r self, tensor: &'r [Rule<'a, E>]) -> Vec<&'r Rule<'a, E>> {
        tensor
            .iter()
            .zip(&self.0)
            .map(|(t, own)| own.as_ref().unwrap_or(t))
            .collect()
    }
}

/// The L1 sums of one [`kernel::PAR_CHUNK`]-element chunk of `rule`'s model (`x` and
/// `b` its elements, from element `s`): of the task vector, and of its kept entries.
/// With `kept` (and `s` a multiple of 64), also the kept entries, one bit each from
/// element `s` (a kept zero of sign `-` included, so that the bits give the same
/// output).
fn l1_partial<E: Scalar>(
    rule: &Rule<'_, E>,
    x: &[E],
    b: &[E],
    s: usize,
    mut kept: Option<&mut Vec<u64>>,
) -> [f64; 2] {
    let mut draw = rule.draw.map(|d| d.chunk(rule.model, s));
    let mut buf = [E::zero(); BLOCK];
    let mut acc = [0.0, 0.0];
    let mut off = 0;
    if let Some(k) = kept.as_deref_mut() {
        debug_assert_eq!(s % 64, 0);
        k.clear();
        k.resize(b.len().div_ceil(64), 0);
    }
    while off < b.len() {
        let len = BLOCK.min(b.len() - off);
        let d = &mut buf[..len];
        let (x, bb) = (&x[off..off + len], &b[off..off + len]);
        sparsify_block(rule, draw.as_mut(), x, bb, s + off, d);
        if let Some(k) = kept.as_deref_mut() {
            for (j, v) in d.iter().enumerate() {
                if *v != E::zero() || v.is_sign_negative() {
                    let g = off + j;
                    k[g / 64] |= 1 << (g % 64);
                }
            }
        }
        for (&x, &bv) in x.iter().zip(bb) {
            acc[0] += (x - bv).abs().to_f64_lossless();
        }
        acc[1] += d.iter().map(|v| v.abs().to_f64_lossless()).sum::<f64>();
        off += len;
    }
    acc
}

/// Writes the kept (unscaled, except DELLA's `1 / p`) task-vector entries of
/// `s..s + d.len()` into `d`, zero elsewhere.
#[inline(always)]
fn sparsify_block<E: Scalar>(
    rule: &Rule<'_, E>,
    draw: Option<&mut ChunkDraw<'_>>,
    x: &[E],
    b: &[E],
    s: usize,
    d: &mut [E],
) {
    let zero = E::zero();
    let end = s + d.len();
    let it = d.iter_mut().zip(x).zip(b);
    match &rule.keep {
        Keep::All => it.for_each(|((d, &x), &b)| *d = x - b),
        Keep::Nothing => d.fill(zero),
        Keep::AtLeast(v) => {
            let v = *v;
            it.for_each(|((d, &x), &b)| {
                let t = x - b;
                *d = if t.abs() >= v { t } else { zero };
            });
        }
        Keep::Band { above, upto } => {
            let lo = above.unwrap_or(-E::one());
            let hi = upto.unwrap_or(E::infinity());
            it.for_each(|((d, &x), &b)| {
                let t = x - b;
                let a = t.abs();
                *d = if (a > lo) & (a <= hi) { t } else { zero };
            });
        }
        Keep::Bits(bits) => {
            for (j, ((d, &x), &b)) in it.enumerate() {
                let g = s + j;
                *d = if (bits[g / 64] >> (g % 64)) & 1 == 1 {
                    x - b
                } else {
                    zero
                };
            }
        }
        Keep::Cuts { within, without } => {
            // Inside the block the index test of each cut is one answer (the usual
            // case): a branch-free loop on the keys alone.
            let block = |c: Option<Cut>, none: BlockCut| c.map_or(Some(none), |c| c.block(s, end));
            if let (Some(i), Some(o)) = (
                block(*within, BlockCut::ALL),
                block(*without, BlockCut::NONE),
            ) {
                it.for_each(|((d, &x), &b)| {
                    let k = key(x, b);
                    *d = if i.holds(k) & !o.holds(k) {
                        x - b
                    } else {
                        zero
                    };
                });
            } else {
                let (within, without) = (*within, *without);
                for (j, ((d, &x), &b)) in it.enumerate() {
                    let (k, g) = (key(x, b), s + j);
                    let keep = within.is_none_or(|c| c.holds(k, g))
                        & !without.is_some_and(|c| c.holds(k, g));
                    *d = if keep { x - b } else { zero };
                }
            }
        }
        Keep::Random => {
            if let Some(dr) = draw {
                it.for_each(|((d, &x), &b)| *d = if dr.next_keep() { x - b } else { zero });
            }
        }
        Keep::Della {
            ranks,
            origin,
            low,
            step,
        } => {
            if let Some(dr) = draw {
                let ranks = &ranks[s - origin..];
                for (j, ((d, &x), &b)) in it.enumerate() {
                    let p = low + step * f64::from(ranks[j]);
                    let u = dr.next_u32();
                    *d = if u64::from(u) < kernel::keep_threshold(p) {
                        if rule.inverse_p {
                            E::from_f64_lossy((x - b).to_f64_lossless() / p)
                        } else {
                            x - b
                        }
                    } else {
                        zero
                    };
                }
            }
        }
        // Resolved by `Keep::ranked` before any block is sparsified.
        Keep::DellaRows { .. } => {
            debug_assert!(false, "DELLA ranks not resolved");
            d.fill(zero);
        }
    }
}

/// `base + lambda * combine(sparsified task vectors)`, blocked and chunk-parallel.
#[allow(clippy::too_many_arguments)]
fn combine<E: Scalar>(
    xs: &[&[E]],
    b: &[E],
    rules: &[Rule<'_, E>],
    weights: &[f64],
    consensus: Consensus,
    normalize: bool,
    lambda: f64,
    out: &mut [E],
) {
    let (ws, lam, sum_div) = mix_constants(weights, lambda);
    let rules: Vec<&Rule<'_, E>> = rules.iter().collect();
    let rules = &rules[..];
    kernel::for_chunks(out, |_, start, o| {
        kernel::simd(
            #[inline(always)]
            || {
                combine_chunk(
                    xs, b, 0, rules, &ws, consensus, normalize, sum_div, lam, start, o,
                )
            },
        )
    });
}

/// The weights and `lambda` in the compute type, and mergekit's divisor of a plain sum
/// (the weights' sum, 1 when about zero).
fn mix_constants<E: Scalar>(weights: &[f64], lambda: f64) -> (Vec<E>, E, E) {
    let ws: Vec<E> = weights.iter().map(|&w| E::from_f64_lossy(w)).collect();
    let mut total = E::zero();
    for &w in &ws {
        total += w;
    }
    let sum_div = if total.to_f64_lossless().abs() < 1e-8 {
        E::one()
    } else {
        total
    };
    (ws, E::from_f64_lossy(lambda), sum_div)
}

/// One chunk of [`combine`], in mergekit's order of operations: per cache block, each
/// model's `w_i * rescale * sparsified tau_i` goes to a scratch buffer, then branch-free
/// loops (models outer, entries inner) combine them. `xs` and `b` start at element
/// `origin` of the tensor, `o` at element `start`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn combine_chunk<E: Scalar>(
    xs: &[&[E]],
    b: &[E],
    origin: usize,
    rules: &[&Rule<'_, E>],
    ws: &[E],
    consensus: Consensus,
    normalize: bool,
    sum_div: E,
    lam: E,
    start: usize,
    o: &mut [E],
) {
    let m = xs.len();
    let zero = E::zero();
    let one = E::one();
    let mut draws: Vec<Option<ChunkDraw<'_>>> = rules
        .iter()
        .map(|r| r.draw.map(|d| d.chunk(r.model, start)))
        .collect();
    let mut scratch = vec![zero; m * BLOCK];
    let mut acc = [zero; 3 * BLOCK];
    let mut ot = [zero; BLOCK];
    let mut off = 0;
    while off < o.len() {
        let len = BLOCK.min(o.len() - off);
        let s = start + off;
        let l = s - origin;
        let bb = &b[l..l + len];
        for (i, rule) in rules.iter().enumerate() {
            let d = &mut scratch[i * BLOCK..i * BLOCK + len];
            sparsify_block(rule, draws[i].as_mut(), &xs[i][l..l + len], bb, s, d);
            let (sc, w) = (rule.scale, ws[i]);
            if sc != one {
                d.iter_mut().for_each(|v| *v *= sc);
            }
            d.iter_mut().for_each(|v| *v *= w);
        }
        let ob = &mut ot[..len];
        let (tot, rest) = acc.split_at_mut(BLOCK);
        let (num, den) = rest.split_at_mut(BLOCK);
        let (tot, num, den) = (&mut tot[..len], &mut num[..len], &mut den[..len]);
        tot.fill(zero);
        for i in 0..m {
            for (t, &d) in tot.iter_mut().zip(&scratch[i * BLOCK..i * BLOCK + len]) {
                *t += d;
            }
        }
        match consensus {
            Consensus::Sum => {
                for ((o, &b), &t) in ob.iter_mut().zip(bb).zip(tot.iter()) {
                    let mixed = if normalize { t / sum_div } else { t };
                    *o = b + lam * mixed;
                }
            }
            Consensus::SignElection => {
                // mergekit's get_mask("sum"): the majority sign is + where the sum is
                // >= 0 (so also where it is 0), - elsewhere; a weighted entry agrees
                // when its sign equals it (zeros never agree).
                for t in tot.iter_mut() {
                    *t = if *t >= zero { one } else { -one };
                }
                num.fill(zero);
                den.fill(zero);
                for (i, &w) in ws.iter().enumerate() {
                    let d = &scratch[i * BLOCK..i * BLOCK + len];
                    for (((n, dn), &g), &d) in
                        num.iter_mut().zip(den.iter_mut()).zip(tot.iter()).zip(d)
                    {
                        let agree = d * g > zero;
                        *n += if agree { d } else { zero };
                        *dn += if agree { w } else { zero };
                    }
                }
                for (((o, &b), &n), &dn) in ob.iter_mut().zip(bb).zip(num.iter()).zip(den.iter()) {
                    let mixed = if normalize {
                        n / if dn == zero { one } else { dn }
                    } else {
                        n
                    };
                    *o = b + lam * mixed;
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
