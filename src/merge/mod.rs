//! Merging: combine several models into one.
//!
//! [`Merger`] merges whole models; [`TensorMerger`] merges one parameter at a time,
//! which lets a merge stream over checkpoints that never fit in memory together. Every
//! `TensorMerger` is a `Merger` through a blanket implementation.
//!
//! Auxiliary data (a base model, Fishers, Gram matrices, an objective) lives in the
//! merger value, and hyperparameters are validated when the value is built, so a bad
//! density or decay fails before any tensor is touched. Notation: `theta_i` the models
//! to merge, `w_i` their weights, `tau_i = theta_i - base` their task vectors.
//!
//! | method | type | formula | defaults |
//! |---|---|---|---|
//! | uniform average / uniform soup | [`Average::uniform`] | `mean_i theta_i` | |
//! | weighted average | [`Average::weighted`] | `sum_i w_i theta_i` (`/ sum_i w_i` when normalising; mergekit's order of operations) | normalise: caller's choice |
//! | SWA | [`Swa`] | `avg += (theta - avg) / (n + 1)`, streaming | |
//! | EMA | [`Ema`] | `ema = decay ema + (1 - decay) theta`, streaming | decay in `[0, 1)`, e.g. 0.999 |
//! | LAWA | [`Lawa`] | mean of the last `k` models, streaming | |
//! | SWAG | [`Swag`] | `N(mean, diag/2 + D D^T / (2(K-1)))`, seeded sampling | rank `K` e.g. 20 |
//! | greedy soup | [`GreedySoup`] | add by ascending held-out loss while it strictly improves | |
//! | adversarially-robust soup | [`RobustSoup`] | `(1 - w) theta_clean + w theta_robust`, `w` from a grid by `(1 - tau) clean + tau robust` (Croce et al. 2023) | 11 weights, tau 0.5 |
//! | task arithmetic | [`TaskMerge::task_arithmetic`] | `base + lambda sum_i w_i tau_i` | `w_i = 1` |
//! | TIES | [`TaskMerge::ties`] | trim to exactly the top `max(1, floor(density n))` magnitudes (torch tie order), elect `sign(sum_i w_i tau_i)` (+ at 0), disjoint mean, `* lambda` | paper: density 0.2, lambda 1 |
//! | DARE | [`TaskMerge::dare`] | keep w.p. `density`, scale `1/density` (or match L1), sum or TIES consensus | seeded per (seed, tensor, model) |
//! | breadcrumbs | [`TaskMerge::breadcrumbs`] | drop top `gamma` and the small rest, keep `density` | gamma 0.01 |
//! | DELLA | [`TaskMerge::della`] | keep w.p. `density - epsilon + 2 epsilon rank/(m-1)` per row, scale `1/p` (mergekit: match L1), TIES consensus | |
//! | SLERP | [`Slerp`] | `sin((1-t)O)/sin O a + sin(tO)/sin O b`, lerp if `abs(cos) > 0.9995`; a zero tensor counts as orthogonal (mergekit) unless [`Slerp::with_zero_lerp`] | two models |
//! | multi-model SLERP | [`KarcherMean`] | weighted spherical (Karcher) mean of directions, times the mean norm | tol 1e-10; mergekit `karcher`: [`KarcherMean::mergekit`], 10 iterations, tol 1e-5 |
//! | NuSLERP | [`NuSlerp`] | SLERP per vector ([`SlerpVectors`]: whole tensor, rows, columns) of the models or of their task vectors | two models, optional base, `t` from weights ([`nuslerp_t`]) |
//! | multi-SLERP | [`MultiSlerp`] | `(sum_i w_i abs(x_i)) m / abs(m)`, `m = sum_i w_i x_i / (abs(x_i) + eps)` | optional base, eps 1e-8 |
//! | SCE | [`Sce`] | keep the top `select_topk` variance entries, weights by task-vector energy, TIES sign erase | select_topk 1 |
//! | Arcee Fusion | [`ArceeFusion`] | take the model's entries with importance `abs(p - b) KL(softmax rows) >= q2 + 1.5 (q3 - q1)` | one model |
//! | NearSwap | [`NearSwap`] | `w m + (1 - w) b`, `w = clamp(t / abs(b - m), 0, 1)` | one model |
//! | RAM / RAM+ | [`Ram`] | entries changed by one model kept (RAM+: scaled), by several averaged | epsilon 1e-5; RAM+ r 0.1, alpha 0.2 |
//! | Iso-C | [`IsoC`] (feature `svd`) | weight matrices: `D = sum_i tau_i = U S V^T` -> `mean(S) U V^T`; others: mean `tau`; `base + alpha *` | paper: alpha about 1-1.5 |
//! | TSV-Merge | [`TsvMerge`] (feature `svd`) | weight matrices: top `min(m, n) / T` singular triplets of each `tau_i`, singular vectors concatenated and orthogonalised (polar factors); others: mean `tau`; `base + alpha *` | alpha 1 |
//! | model stock | [`ModelStock`] | `t = N cos / (1 + (N-1) cos)`, `t mean_i theta_i + (1-t) base` | `N >= 2` |
//! | Fisher | [`Fisher`] | `sum_i l_i F_i theta_i / sum_i l_i F_i`, `F_i = max(F_i, floor)` | floor `1e-6` |
//! | RegMean | [`RegMean`] (feature `linalg`) | `W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T`, `G~ = alpha G + (1-alpha) diag G` | alpha 0.9 |
//! | output ensemble | [`Ensemble`] | mean of logits or probabilities | |
//!
//! Averaging during training (a training loop over a [`StochasticGradient`](crate::StochasticGradient)
//! per run, [`train_population`]; results on digits in `docs/averaging.md`):
//!
//! | method | type | what | defaults |
//! |---|---|---|---|
//! | SWAD | [`Swad`] | dense mean of every iterate in the validation-loss valley `[t_s, t_e)` | paper: `n_converge` 3, `n_tolerance` 6, `tolerance_ratio` 0.3 |
//! | PAPA | [`Papa::ema`] | every `k` steps `theta_j = alpha theta_j + (1 - alpha) mean(theta)`; final mean | paper: alpha 0.99 every 10 steps |
//! | PAPA-all / PAPA-2 | [`Papa::all`], [`Papa::pairs`] | every `k` steps each member becomes the mean / the mean of two random members (seeded) | |
//! | HWA | [`Hwa`] | parallel runs averaged every `H` steps (online), mean of the last `I` online averages (offline) | |
//! | FGE | [`Fge`] | triangular cyclical learning rate, snapshots at each cycle's minimum, output ensemble | cycle even |
//! | SWALP | [`Swalp`], [`BlockQuantizer`] | SWA over a run with block-floating-point gradients and weights (stochastic rounding, seeded), mean in full precision | 8 bits |
//! | TWA | [`Twa`] | training inside the span of the iterates (Gram-Schmidt basis), from their mean | |
//! | subspace learning | [`Subspace`] | a line / simplex of endpoints trained in one run: loss at `sum_i alpha_i theta_i`, `alpha` sampled on the simplex (seeded), endpoint `i` gets `alpha_i grad` | global `alpha` (the paper's), or per layer |
//!
//! Learned coefficients (one shared chain rule, [`ParamGroups`]: `dL/dc[i, g] = sum_{t in g} <grad_t, x_{i,t}>`):
//!
//! | method | type | what | defaults |
//! |---|---|---|---|
//! | AdaMerging | [`AdaMerging`] | `base + sum_i lambda[i, g] tau_i`, `lambda` learned by minimising an unsupervised loss (the prediction entropy, [`nn::Entropy`](crate::nn::Entropy)), clipped | paper: init 0.3, clip `[0, 1]`, Adam `1e-3`; task-wise or layer-wise |
//! | learned soup | [`LearnedSoup`] | `sum_i softmax(beta)_i theta_i`, `beta` learned on a held-out labelled loss | uniform start; global or by layer |
//!
//! ## Determinism
//!
//! Per-tensor methods run over contiguous slices in cache-sized blocks, in parallel over
//! fixed chunks of large tensors; every reduction sums its per-chunk parts in chunk
//! order and every random stream (DARE, DELLA, SWAG) is a `ChaCha8Rng` seeded from
//! `(seed, tensor name, model index, chunk index)` through a fixed hash (FNV-1a +
//! SplitMix64), so results do not depend on the thread count or on the order in which
//! tensors are merged.
//!
//! ## Speed
//!
//! The element-wise methods are memory-bound, so they are written to touch memory once:
//! a weighted average reads every input once per output block and writes the block
//! once; TIES/breadcrumbs find their exact magnitude thresholds with one streaming pass
//! over all models (a deterministic sample brackets the rank, the pass counts and
//! collects the bracket, `select_nth_unstable` finishes; an exact selection takes over
//! if a bracket misses) and then merge in a second pass; over inputs read chunk by chunk
//! ([`TaskMerge::merge_chunked`], [`ChunkedInputs`]) they find them with histogram passes
//! instead, never holding a whole tensor. Hot loops are branch-free and
//! are compiled twice, for the baseline and for AVX2 (picked at run time; results are
//! bitwise identical since Rust never contracts to FMA, and the explicit fused
//! multiply-adds of [`Average`] round once on either path). Outputs are written with
//! non-temporal stores (no read-for-ownership) and fresh outputs are allocated through
//! [`output_buffer`] (huge pages on Linux). `merge_tensor_into` methods write into a
//! buffer the caller reuses. Numbers: `docs/benchmarks.md`, section *Merging*.
//!
//! ## RegMean and the `linalg` feature
//!
//! [`RegMean`] always exists so that its Gram matrices can be collected
//! ([`gram_matrices`]), but without the `linalg` feature [`RegMean::new`] returns
//! [`Error::FeatureDisabled`] before any tensor is
//! touched. Build with `--features openblas-system` (Debian: `libopenblas-dev`).
//!
//! ```
//! use modelfusion::merge::{Average, Merger, TaskMerge};
//! use modelfusion::{Model, StateDict};
//! use ndarray::arr1;
//!
//! let base = StateDict::from_pairs([("w", arr1(&[0.0f32, 0.0]).into_dyn())])?;
//! let a = StateDict::from_pairs([("w", arr1(&[1.0f32, -2.0]).into_dyn())])?;
//! let b = StateDict::from_pairs([("w", arr1(&[3.0f32, 2.0]).into_dyn())])?;
//! let avg = Average::uniform().merge(&[&a, &b])?;
//! assert_eq!(avg.get("w").unwrap().as_slice().unwrap(), &[2.0, 0.0]);
//! let ties = TaskMerge::ties(base, 1.0, 1.0)?.merge(&[&a, &b])?;
//! assert_eq!(ties.get("w").unwrap().as_slice().unwrap(), &[2.0, 2.0]); // w[1] sums to 0: mergekit elects +, mean of the + deltas
//! # Ok::<(), modelfusion::Error>(())
//! ```

mod average;
mod chunked;
mod ensemble;
mod fisher;
mod fusion;
mod kernel;
mod learned;
mod ram;
mod regmean;
mod sce;
mod select;
mod slerp;
mod soup;
mod spherical;
mod stock;
mod svd;
mod task;
mod training;

pub use average::{Average, Ema, Lawa, Swa, Swag};
pub use chunked::{ChunkFn, ChunkSink, ChunkedInputs, SliceChunks};
pub use ensemble::{Ensemble, EnsembleMode, Outputs};
pub use fisher::{DEFAULT_FISHER_FLOOR, Fisher, diagonal_fisher};
pub use fusion::{ArceeFusion, FUSION_QUANTILE_SAMPLE, NearSwap};
pub use kernel::output_buffer;
pub use learned::{
    AdaMerging, AdaMergingRun, Granularity, LearnedSoup, LearnedSoupRun, ParamGroups, Subspace,
    SubspaceRun,
};
pub use ram::Ram;
pub use regmean::{DEFAULT_REGMEAN_ALPHA, Grams, RegMean, gram_matrices};
pub use sce::Sce;
pub use slerp::{KarcherMean, SLERP_LERP_THRESHOLD, Slerp};
pub use soup::{GreedySoup, RobustSoup, RobustSoupPoint, RobustSoupReport, SoupReport, SoupStep};
pub use spherical::{MultiSlerp, NuSlerp, SlerpVectors, nuslerp_t};
pub use stock::ModelStock;
pub use svd::{IsoC, TsvMerge};
pub use task::{Consensus, Rescale, Sparsification, TaskMerge, TieOrder};
pub use training::{
    BlockQuantizer, Fge, Hwa, Papa, PapaRule, PopulationAverage, Rounding, StepConfig, Swad,
    SwadAverage, Swalp, SwalpRun, Twa, TwaRun, train_population,
};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::Tensor;

/// Merges whole models into one.
pub trait Merger<M: Model> {
    /// The merged model. `models` must be non-empty and mutually compatible.
    fn merge(&self, models: &[&M]) -> Result<M>;
}

/// Merges one named parameter at a time.
pub trait TensorMerger<T: Tensor> {
    /// Merges the tensors that several models hold under `name` (all of one shape).
    fn merge_tensor(&self, name: &str, tensors: &[&T]) -> Result<T>;
}

impl<M: Model, TM: TensorMerger<M::Tensor>> Merger<M> for TM {
    fn merge(&self, models: &[&M]) -> Result<M> {
        let first = *models
            .first()
            .ok_or_else(|| Error::empty("the list of models"))?;
        for m in &models[1..] {
            first.check_compatible(m)?;
        }
        first.try_map(|name, _| {
            let ts = models
                .iter()
                .map(|m| m.require(name, "a model to merge"))
                .collect::<Result<Vec<_>>>()?;
            self.merge_tensor(name, &ts)
        })
    }
}
