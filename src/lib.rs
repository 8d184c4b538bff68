//! # modelfusion
//!
//! Deep model fusion in Rust: align neural networks modulo permutation symmetry, walk
//! between them in weight space, and merge their weights.
//!
//! ## The contract
//!
//! | trait | what it is |
//! |---|---|
//! | [`Tensor`] | a dense array of floats (implemented for every `ndarray::ArrayD<T>` with `T:` [`Scalar`]) |
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
//!   ResNet-20, [`perm::infer`] detects them in PyTorch checkpoints, [`perm::SpecBuilder`]
//!   and spec files write new ones, and every spec is checked against the model (a
//!   forgotten bias or a consumer on the wrong axis is an error).
//! - [`solve`]: the numeric core: [`linear_sum_assignment`] (Jonker-Volgenant, scipy's
//!   contract) and [`sinkhorn`] (log-domain stabilised, balanced and unbalanced).
//! - [`align`]: Git Re-Basin weight and activation matching, OT fusion, REPAIR, and
//!   ZipIt! ([`align::ZipIt`]: merging correlated features within and across models,
//!   fully or for the first layers only).
//! - [`path`] and [`barrier`]: paths between models, curve fitting, loss barriers on an
//!   explicit grid; [`plot`] draws the curves as SVG.
//! - [`merge`]: averaging (SWA, EMA, LAWA, SWAG, soups), task vectors (task arithmetic,
//!   TIES, DARE, breadcrumbs, DELLA), SLERP, model stock, Fisher, RegMean, ensembles;
//!   learned coefficients (AdaMerging, the learned soup, subspace learning) on one
//!   shared chain rule, `merge::ParamGroups`.
//! - [`pipeline`]: reference choice -> align -> merge -> evaluate.
//! - [`optim`]: SGD (momentum, Nesterov) and Adam on model-shaped values, with weight
//!   decay, frozen parameters and learning-rate schedules (used by `nn` and `path`).
//! - [`io`]: safetensors checkpoints (f16, bf16, f32, f64 merged; every other dtype
//!   carried bit for bit), sharding, streaming merges, permuted copies of checkpoints.
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
//! ## Walkthrough: your own checkpoint
//!
//! A PyTorch `state_dict` saved with `safetensors.torch.save_file` loads as it is: names
//! as PyTorch writes them, BatchNorm's `num_batches_tracked` (I64) carried as a
//! [`RawTensor`]. The spec is inferred from names and shapes ([`perm::infer`]), checked,
//! and the aligned model written back in each tensor's own dtype.
//!
//! ```
//! use modelfusion::align::{Aligner, WeightMatching};
//! use modelfusion::io::{infer_checkpoint_spec, load, save, write_permuted, Checkpoint, Dtype, SaveOptions};
//! use modelfusion::progress::Silent;
//! use modelfusion::perm::PermutationSet;
//! use modelfusion::{Model, RawTensor, StateDict, StateDictF32};
//! use ndarray::{Array1, Array2};
//!
//! // Stand-in for `torch.save`: an nn.Sequential(Linear, BatchNorm1d, ReLU, Linear).
//! let dir = std::env::temp_dir().join(format!("modelfusion-guide-{}", std::process::id()));
//! let mut sd = StateDict::from_pairs([
//!     ("0.weight", Array2::from_shape_fn((16, 8), |(i, j)| ((i * 8 + j) % 7) as f32 - 3.0).into_dyn()),
//!     ("0.bias", Array1::from_shape_fn(16, |i| i as f32 * 0.1).into_dyn()),
//!     ("1.weight", Array1::from_elem(16, 1.0f32).into_dyn()),
//!     ("1.bias", Array1::from_elem(16, 0.0f32).into_dyn()),
//!     ("1.running_mean", Array1::from_shape_fn(16, |i| i as f32).into_dyn()),
//!     ("1.running_var", Array1::from_elem(16, 2.0f32).into_dyn()),
//!     ("3.weight", Array2::from_shape_fn((4, 16), |(i, j)| ((i + 3 * j) % 5) as f32).into_dyn()),
//!     ("3.bias", Array1::from_elem(4, 0.5f32).into_dyn()),
//! ])?;
//! sd.insert_raw("1.num_batches_tracked", RawTensor::new(Dtype::I64, vec![], 42i64.to_le_bytes().to_vec())?)?;
//! save(&sd, dir.join("a"), &SaveOptions::new(Dtype::BF16))?;
//!
//! let ck = Checkpoint::open(dir.join("a"))?;
//! let found = infer_checkpoint_spec(&ck)?;
//! assert_eq!(found.family, "sequential-mlp");
//! let a: StateDictF32 = load(dir.join("a"))?;
//! assert!(found.spec.check(&a)?.is_sound());
//!
//! // A shuffled copy (what `modelfusion permute` writes), then aligned back.
//! let perms = PermutationSet::random(&found.spec, &a, 7)?;
//! write_permuted(&ck, &found.spec, &perms, &dir.join("b"), None, Silent)?;
//! let b: StateDictF32 = load(dir.join("b"))?;
//! let alignment = WeightMatching::new(0).align(&a, &b, &found.spec)?;
//! let back = alignment.apply(&found.spec, &b)?;
//! assert_eq!(back.max_abs_diff(&a)?, 0.0);
//! assert_eq!(back.raw("1.num_batches_tracked"), a.raw("1.num_batches_tracked"));
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), modelfusion::Error>(())
//! ```
//!
//! ## Walkthrough: your own objective
//!
//! Any closure `Fn(&M) -> Result<f64>` is an [`Objective`], so a loss computed anywhere
//! (a held-out set in Rust, a PyTorch evaluation behind a subprocess) drives barriers,
//! greedy soups and curve fitting; a curve evaluated entirely elsewhere becomes a report
//! with [`barrier::BarrierReport::from_curve`], and saved features feed activation
//! matching through [`io::SavedActivations`].
//!
//! ```
//! use modelfusion::barrier::{loss_barrier, BarrierConfig};
//! use modelfusion::path::Linear;
//! use modelfusion::{Model, StateDict};
//! use ndarray::arr1;
//!
//! let a = StateDict::from_pairs([("w", arr1(&[1.0f64, 0.0]).into_dyn())])?;
//! let b = StateDict::from_pairs([("w", arr1(&[0.0f64, 1.0]).into_dyn())])?;
//! // A loss with minima at both endpoints: 1 - |w|^2 is largest between them.
//! let loss = |m: &StateDict<ndarray::ArrayD<f64>>| Ok(1.0 - m.norm().powi(2));
//! let report = loss_barrier(&Linear::new(a, b)?, &loss, &BarrierConfig::uniform(5)?)?;
//! assert!((report.frankle - 0.5).abs() < 1e-12 && report.frankle_t == 0.5);
//! # Ok::<(), modelfusion::Error>(())
//! ```
//!
//! ## Walkthrough: your own merge config
//!
//! [`config`] reads mergekit's YAML (methods, per-model and global parameters, filters,
//! gradients over layers, `dtype` / `out_dtype`), checks every input header and every
//! hyperparameter before reading data, and streams the merge to disk; an `align:`
//! section weight-matches every model to the base (or first) model first. Progress and
//! stopping go through one [`progress::Observer`].
//!
//! ```
//! # #[cfg(feature = "config")] {
//! use modelfusion::config::{Config, RunOptions};
//! use modelfusion::io::{load, save_file, Dtype};
//! use modelfusion::perm::{specs::{Architecture, MlpShapes}, PermutationSet};
//! use modelfusion::progress::{from_fn, Progress};
//! use modelfusion::{Model, StateDictF32};
//!
//! let dir = std::env::temp_dir().join("modelfusion-doc-walkthrough-config");
//! # std::fs::create_dir_all(&dir).ok();
//! let arch = MlpShapes::new(&[4, 8, 2])?;
//! let base = arch.random_model(0);
//! // A fine-tune that is also shuffled: without alignment its task vector is noise.
//! let tuned = arch.spec().apply(&PermutationSet::random(&arch.spec(), &base, 3)?, &base.scale(1.1)?)?;
//! save_file(&base, dir.join("base.safetensors"), Dtype::F32)?;
//! save_file(&tuned, dir.join("tuned.safetensors"), Dtype::F32)?;
//! let yaml = format!(
//!     "merge_method: task_arithmetic\nbase_model: {0}/base.safetensors\nalign: {{seed: 0}}\n\
//!      models:\n  - model: {0}/tuned.safetensors\n    parameters: {{weight: 0.5}}\n",
//!     dir.display()
//! );
//! let config = Config::from_yaml(&yaml, "merge.yml".as_ref())?;
//! let mut stages = Vec::new();
//! let summary = config.run(dir.join("out"), &RunOptions::new(), from_fn(|p| {
//!     if let Progress::Stage { what, .. } = p { stages.push(what.to_string()) }
//! }))?;
//! assert_eq!(stages, ["aligning models[0] to base_model", "merging"]);
//! let merged: StateDictF32 = load(dir.join("out"))?;
//! // base + 0.5 * (aligned tuned - base) = 1.05 * base
//! assert!(merged.max_abs_diff(&base.scale(1.05)?)? < 1e-6);
//! # assert_eq!(summary.aligned.len(), 1);
//! # std::fs::remove_dir_all(&dir).ok();
//! # }
//! # Ok::<(), modelfusion::Error>(())
//! ```
//!
//! ## Generic code, typed views and errors
//!
//! `T: `[`Scalar`] (or `io::IoScalar` for code that loads and saves) is the only bound
//! generic code needs: `ArrayD<T>` is then a [`Tensor`] and `StateDict<ArrayD<T>>` a
//! [`Model`]. [`Tensor::as_matrix`] and [`Tensor::as_vector`] give `ArrayView2` /
//! `ArrayView1` views, with an error naming the rank and shape otherwise. `?` converts a
//! `std::io::Error` into an [`Error`], and a `main` returning `Result<(), `[`Report`]`>`
//! prints the message (and causes) rather than the enum's `Debug` form.
//!
//! ```
//! use modelfusion::{Model, Report, Scalar, StateDict, Tensor};
//! use ndarray::{arr1, arr2, ArrayD};
//!
//! /// `W x` for the layer `name`, for either float type.
//! fn forward<T: Scalar>(m: &StateDict<ArrayD<T>>, name: &str, x: &[T]) -> modelfusion::Result<Vec<T>> {
//!     let w = m.require(name, "the model")?.as_matrix()?;
//!     Ok(w.dot(&ndarray::ArrayView1::from(x)).to_vec())
//! }
//!
//! fn main() -> Result<(), Report> {
//!     let m = StateDict::from_pairs([("fc", arr2(&[[1.0f32, 2.0], [0.0, 1.0]]).into_dyn())])?;
//!     assert_eq!(forward(&m, "fc", &[1.0, 1.0])?, [3.0, 1.0]);
//!     let m = StateDict::from_pairs([("fc", arr1(&[1.0f64, 2.0]).into_dyn())])?;
//!     let e = forward(&m, "fc", &[1.0]).unwrap_err();
//!     assert!(e.to_string().contains("rank-2") && e.to_string().contains("shape [2]"));
//!     Ok(())
//! }
//! ```
//!
//! ## Features
//!
//! `nn`, `safetensors`, `plot` and `config` are on by default; `linalg` (with a LAPACK backend such
//! as `openblas-system`) enables RegMean; `cli` builds the `modelfusion` command-line tool.
//! Every random choice takes a caller's seed; results do not depend on the thread count.
#![warn(missing_docs)]

pub mod align;
pub mod barrier;
mod buffer;
#[cfg(feature = "candle")]
pub mod candle;
#[cfg(feature = "config")]
pub mod config;
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
pub mod progress;
pub mod solve;
pub mod tensor;

pub use dtype::{Dtype, RawTensor};
pub use error::{Error, Report, Result};
pub use model::{Model, StateDict, StateDictF32, StateDictF64};
pub use objective::{Activations, Features, Gradient, Objective, StochasticGradient};
pub use solve::{Assignment, TransportPlan, linear_sum_assignment, sinkhorn};
pub use tensor::{Scalar, Tensor};
