//! # modelfusion
//!
//! Deep model fusion in Rust: align neural networks modulo permutation symmetry, walk
//! between them in weight space, and merge their weights.
//!
//! The public contract is a handful of small traits:
//!
//! | trait | what it is |
//! |---|---|
//! | [`Tensor`] | a dense array of floats (implemented for `ndarray::ArrayD<f32/f64>`) |
//! | [`Model`] | named parameters in a stable order, with model algebra ([`StateDict`] is the ready one) |
//! | [`Objective`], [`Gradient`], [`Activations`] | how a model is evaluated; written by the user |
//! | [`merge::Merger`], [`merge::TensorMerger`] | combine models (whole, or one tensor at a time) |
//! | [`path::PathSampler`] | a path `phi(t)` between models |
//!
//! ```
//! use modelfusion::{Model, StateDict};
//! use ndarray::arr1;
//!
//! let a = StateDict::from_pairs([("w", arr1(&[0.0f32, 1.0]).into_dyn())])?;
//! let b = StateDict::from_pairs([("w", arr1(&[2.0f32, 3.0]).into_dyn())])?;
//! assert_eq!(a.lerp(&b, 0.5)?.get("w").unwrap().as_slice().unwrap(), &[1.0, 2.0]);
//! # Ok::<(), modelfusion::Error>(())
//! ```
#![warn(missing_docs)]

pub mod align;
pub mod barrier;
pub mod error;
#[cfg(feature = "safetensors")]
pub mod io;
pub mod merge;
pub mod model;
#[cfg(feature = "nn")]
pub mod nn;
pub mod objective;
pub mod path;
pub mod perm;
pub mod pipeline;
#[cfg(feature = "plot")]
pub mod plot;
pub mod solve;
pub mod tensor;

pub use error::{Error, Result};
pub use model::{Model, StateDict, StateDictF32, StateDictF64};
pub use objective::{Activations, Features, Gradient, Objective};
pub use solve::{Assignment, TransportPlan, linear_sum_assignment, sinkhorn};
pub use tensor::{Scalar, Tensor};
