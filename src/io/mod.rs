//! Real checkpoints: safetensors files in and out, and merges that stream over them.
//!
//! * [`load`] / [`save`] / [`save_file`]: a [`StateDict`](crate::StateDict) of `f32` or
//!   `f64` tensors from or to a `.safetensors` file or a Hugging Face style sharded
//!   directory (`model-00001-of-0000N.safetensors` + `model.safetensors.index.json`),
//!   stored as F16, BF16, F32 or F64 ([`Dtype`]); narrowing rounds to nearest even.
//!   Tensors of every other dtype (I64 `num_batches_tracked`, BOOL masks, U8 tables,
//!   8-bit floats) load as [`RawTensor`](crate::RawTensor)s and are written back with
//!   their dtype, bit for bit.
//! * [`Checkpoint`]: a lazily read, memory-mapped checkpoint. Opening it validates the
//!   headers ([`Header::parse`], [`ShardIndex::parse`]) and reads no tensor data;
//!   tensors (or ranges of them) are then read one at a time.
//! * [`CheckpointWriter`]: lays out the output files from names and shapes alone, then
//!   accepts tensor data in any order and from several threads.
//! * [`merge_checkpoints`]: runs any [`TensorMerger`](crate::merge::TensorMerger) over N
//!   checkpoints tensor by tensor, so memory stays near one tensor per input.
//!
//! Every malformed file is an [`Error::Format`](crate::Error::Format) naming the file and
//! the tensor, never a panic, and no declared size is allocated before it is checked
//! against the file.
//!
//! The `modelfusion` binary (feature `cli`) runs these merges from a mergekit-style YAML
//! config (`merge_method`, `base_model`, `models: [{model, parameters}]`, `parameters`,
//! `dtype`, `out_dtype`; parameter values may be `[{filter: NAME_PART, value: X},
//! {value: DEFAULT}]` lists):
//!
//! ```text
//! $ cat merge.yml
//! merge_method: linear
//! models:
//!   - {model: ./a, parameters: {weight: 0.7}}
//!   - {model: ./b, parameters: {weight: 0.3}}
//! out_dtype: bfloat16
//! $ modelfusion merge merge.yml ./merged --max-shard-size 5G
//! $ modelfusion inspect ./merged
//! ```
//!
//! ```
//! use modelfusion::{Model, StateDict};
//! use modelfusion::io::{load, save, Dtype, SaveOptions};
//! use ndarray::{arr1, ArrayD};
//!
//! let dir = std::env::temp_dir().join("modelfusion-doc-io");
//! let sd = StateDict::from_pairs([("w", arr1(&[1.0f32, 1.0 + 1.0 / 256.0]).into_dyn())])?;
//! save(&sd, &dir, &SaveOptions::new(Dtype::BF16))?;
//! let back: StateDict<ArrayD<f32>> = load(&dir)?;
//! // 1 + 2^-8 is a tie between bf16 neighbours 1 and 1 + 2^-7: it rounds to even, 1.
//! assert_eq!(back.get("w").unwrap().as_slice().unwrap(), &[1.0, 1.0]);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), modelfusion::Error>(())
//! ```

mod align;
mod atomic;
mod dtype;
mod features;
mod guard;
mod header;
mod permute;
mod reader;
mod stream;
mod writer;

pub use dtype::{Dtype, IoScalar, decode, encode};
pub use features::SavedActivations;
pub use guard::read_capped;
/// The 16-bit float types of the `half` crate, as stored in F16 and BF16 tensors.
pub use half::{bf16, f16};
pub use header::{Header, INDEX_FILE, MAX_HEADER_SIZE, MAX_INDEX_SIZE, ShardIndex, TensorInfo};
pub use permute::{
    PermutedSummary, SIDE_FILES, SpecSource, config_of, copy_side_files, infer_checkpoint_spec,
    side_files, write_permuted,
};
pub use reader::{Checkpoint, SINGLE_FILE, load};
pub(crate) use stream::check_mapped;
pub use stream::{
    Chunking, MappedMerger, MappedTensor, MergeSummary, StreamOptions, TensorChunks,
    check_compatible, merge_checkpoints, merge_mapped,
};
pub use writer::{CheckpointWriter, SaveOptions, TensorPlan, save, save_file};
