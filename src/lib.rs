//! # modelfusion
//!
//! Deep model fusion in Rust: align neural networks modulo permutation symmetry, walk
//! between them in weight space, and merge their weights.
//!
//! ## The contract
//!
//! | trait | what it is |
//! |---|---|
//! | [`Tensor`] | a dense array of floats (implemented for `ndarray::ArrayD<f32/f64>`) |
//! | [`Model`] | named parameters in a stable order, with model algebra ([`StateDict`] is the ready one) |
//! | [`Objective`], [`Gradient`], [`Activations`] | how a model is evaluated; written by the user (or taken from [`nn`]) |
//! | [`align::Aligner`] | brings model B into model A's basis: [`align::WeightMatching`], [`align::ActivationMatching`], [`align::OtFusion`], [`align::Identity`] |
//! | [`merge::Merger`], [`merge::TensorMerger`] | combine models, whole or one tensor at a time (and so streamed over checkpoints) |
//! | [`path::PathSampler`] | a path `phi(t) = sum_k c_k(t) theta_k`: [`path::Linear`], [`path::Bezier`], [`path::PolyChain`] |
//!
//! ## A tour
//!
//! - [`perm`]: permutation specs say which axes of which parameters a hidden unit's
//!   permutation reorders; [`perm::specs`] has them for MLPs, residual MLPs, VGG and
//!   ResNet-20, and every spec is checked against the model's shapes.
//! - [`solve`]: the numeric core: [`linear_sum_assignment`] (Jonker-Volgenant, scipy's
//!   contract) and [`sinkhorn`] (log-domain stabilised, balanced and unbalanced).
//! - [`align`]: Git Re-Basin weight and activation matching, OT fusion, REPAIR.
//! - [`path`] and [`barrier`]: paths between models, curve fitting, loss barriers on an
//!   explicit grid; [`plot`] draws the curves as SVG.
//! - [`merge`]: averaging (SWA, EMA, LAWA, SWAG, soups), task vectors (task arithmetic,
//!   TIES, DARE, breadcrumbs, DELLA), SLERP, model stock, Fisher, RegMean, ensembles.
//! - [`pipeline`]: reference choice -> align -> merge -> evaluate.
//! - [`optim`]: SGD (momentum, Nesterov) and Adam on model-shaped values, with weight
//!   decay, frozen parameters and learning-rate schedules (used by `nn` and `path`).
//! - [`io`]: safetensors checkpoints (f32, f64, f16, bf16), sharding, streaming merges.
//! - [`nn`]: reference networks with hand-written backward passes and data sets, to run
//!   all of the above end to end without a deep-learning framework.
//!
//! ## Example: undo a permutation, then average
//!
//! Two copies of one network whose hidden units are shuffled compute the same function,
//! but their naive average does not. Weight matching finds the shuffle, and the aligned
//! average is the network again.
//!
//! ```
//! use modelfusion::align::{Aligner, WeightMatching};
//! use modelfusion::perm::specs::{Architecture, MlpShapes};
//! use modelfusion::perm::PermutationSet;
//! use modelfusion::Model;
//!
//! let arch = MlpShapes::new(&[64, 128, 128, 10])?;
//! let spec = arch.spec();
//! let a = arch.random_model(0);
//! let b = spec.apply(&PermutationSet::random(&spec, &a, 1)?, &a)?;
//! assert!(a.sub(&b)?.norm() > 1.0); // far apart in weight space
//!
//! let alignment = WeightMatching::new(42).align(&a, &b, &spec)?;
//! let b_aligned = alignment.apply(&spec, &b)?;
//! assert_eq!(b_aligned.max_abs_diff(&a)?, 0.0); // the shuffle is undone exactly
//! let mid = a.lerp(&b_aligned, 0.5)?;
//! assert!(mid.max_abs_diff(&a)? < 1e-6);
//! # Ok::<(), modelfusion::Error>(())
//! ```
//!
//! ## Features
//!
//! `nn`, `safetensors` and `plot` are on by default; `linalg` (with a LAPACK backend such
//! as `openblas-system`) enables RegMean; `cli` builds the `modelfusion` command-line tool.
//! Every random choice takes a caller's seed; results do not depend on the thread count.
#![warn(missing_docs)]

pub mod align;
pub mod barrier;
mod buffer;
pub mod dtype;
pub mod error;
#[cfg(feature = "safetensors")]
pub mod io;
pub mod merge;
pub mod model;
#[cfg(feature = "nn")]
pub mod nn;
pub mod objective;
pub mod optim;
pub mod path;
pub mod perm;
pub mod pipeline;
#[cfg(feature = "plot")]
pub mod plot;
pub mod solve;
pub mod tensor;

pub use dtype::{Dtype, RawTensor};
pub use error::{Error, Result};
pub use model::{Model, StateDict, StateDictF32, StateDictF64};
pub use objective::{Activations, Features, Gradient, Objective};
pub use solve::{Assignment, TransportPlan, linear_sum_assignment, sinkhorn};
pub use tensor::{Scalar, Tensor};
