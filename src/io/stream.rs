//! Out-of-core merging: run a [`TensorMerger`] tensor by tensor over checkpoints that
//! never need to be in memory together, writing the output as it goes.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use super::dtype::IoScalar;
use super::reader::Checkpoint;
use super::writer::{CheckpointWriter, SaveOptions, TensorPlan, flat};
use crate::error::{Error, Result};
use crate::merge::TensorMerger;
use crate::progress::{Observer, Progress};

/// How a streaming merge hands tensors to the merger.
///
/// ```
/// use modelfusion::io::Chunking;
/// assert_eq!(Chunking::default(), Chunking::Whole);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Chunking {
    /// Each call gets whole tensors of their real shapes. Right for every merger; memory
    /// is about one tensor per input plus the output.
    #[default]
    Whole,
    /// Each call gets the same flat (1-D) range of `chunk_elems` elements of every input,
    /// and chunks run in parallel. Only valid for mergers that act elementwise with the
    /// same rule everywhere in a tensor (linear, task arithmetic, any weighted sum);
    /// methods with per-tensor statistics (TIES top-k, DARE rescaling, SLERP angles,
    /// model stock cosines) need [`Chunking::Whole`]. Memory is a few chunks per thread,
    /// independent of tensor sizes.
    Elementwise {
        /// Elements per chunk (e.g. `1 << 18`).
        chunk_elems: usize,
    },
}

/// Options of [`merge_checkpoints`].
///
/// ```
/// use modelfusion::io::{Chunking, Dtype, SaveOptions, StreamOptions};
/// let o = StreamOptions::new(SaveOptions::new(Dtype::BF16)).with_chunking(Chunking::Elementwise { chunk_elems: 1 << 18 });
/// assert_eq!(o.save.dtype, Dtype::BF16);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    /// Output dtype, sharding and metadata.
    pub save: SaveOptions,
    /// How tensors are handed to the merger.
    pub chunking: Chunking,
    /// Files written beside the merged checkpoint, as `(file name, contents)` (e.g. from
    /// [`side_files`](crate::io::side_files)); they are committed with the weights, before
    /// the index (see [`CheckpointWriter::add_file`]).
    pub files: Vec<(String, Vec<u8>)>,
}

impl StreamOptions {
    /// Whole-tensor merging with the given save options.
    ///
    /// ```
    /// use modelfusion::io::{Chunking, Dtype, SaveOptions, StreamOptions};
    /// assert_eq!(StreamOptions::new(SaveOptions::new(Dtype::F32)).chunking, Chunking::Whole);
    /// ```
    pub fn new(save: SaveOptions) -> Self {
        StreamOptions {
            save,
            chunking: Chunking::Whole,
            files: Vec::new(),
        }
    }

    /// Sets the files written beside the merged checkpoint.
    ///
    /// ```
    /// use modelfusion::io::{Dtype, SaveOptions, StreamOptions};
    /// let o = StreamOptions::new(SaveOptions::new(Dtype::F32)).with_files(vec![("config.json".into(), b"{}".to_vec())]);
    /// assert_eq!(o.files.len(), 1);
    /// ```
    pub fn with_files(mut self, files: Vec<(String, Vec<u8>)>) -> Self {
        self.files = files;
        self
    }

    /// Sets the chunking.
    ///
    /// ```
    /// use modelfusion::io::{Chunking, Dtype, SaveOptions, StreamOptions};
    /// let o = StreamOptions::new(SaveOptions::new(Dtype::F32)).with_chunking(Chunking::Elementwise { chunk_elems: 64 });
    /// assert_eq!(o.chunking, Chunking::Elementwise { chunk_elems: 64 });
    /// ```
    pub fn with_chunking(mut self, chunking: Chunking) -> Self {
        self.chunking = chunking;
        self
    }
}

/// Reports a tensor written into `out` by a streamed `what` (a merge, a permuted copy);
/// an observer's stop becomes [`Error::Cancelled`] (the caller's writer, dropped
/// unfinished, then removes its temporaries).
pub(crate) fn report_tensor(
    observer: &mut impl Observer,
    what: &str,
    out: &Path,
    report: Progress<'_>,
) -> Result<()> {
    if observer.observe(&report).is_continue() {
        return Ok(());
    }
    let (done, total) = match report {
        Progress::Tensor { index, total, .. } => (index + 1, total),
        _ => (0, 0),
    };
    Err(Error::Cancelled {
        what: format!(
            "{what} into {} stopped after {done} of {total} tensors; nothing was written there (previous contents are kept)",
            out.display()
        ),
    })
}

/// What a finished streaming merge did.
///
/// ```
/// let s = modelfusion::io::MergeSummary { tensors: 1, bytes_read: 12, bytes_written: 4, files: vec![], carried: vec![], carried_differing: vec![] };
/// assert_eq!(s.tensors, 1);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeSummary {
    /// Tensors merged (float tensors; the carried ones are listed in `carried`).
    pub tensors: usize,
    /// Non-float tensors (e.g. `num_batches_tracked`), copied unchanged from the first
    /// input (the base model, for methods that have one).
    pub carried: Vec<String>,
    /// Those of `carried` whose bytes differ among the inputs (the first input's were
    /// kept).
    pub carried_differing: Vec<String>,
    /// Tensor bytes read from all inputs.
    pub bytes_read: u64,
    /// Tensor bytes written.
    pub bytes_written: u64,
    /// Files written (shards, then the index if sharded).
    pub files: Vec<PathBuf>,
}

/// Checks, from the headers alone, that all inputs hold the same tensor names with the
/// same shapes, and returns `(name, shape)` in the first input's order. Float dtypes may
/// differ among inputs; a non-float tensor (carried, not merged) must have the same dtype
/// in every input.
///
/// ```
/// use modelfusion::StateDict;
/// use modelfusion::io::{check_compatible, save_file, Checkpoint, Dtype};
/// use ndarray::{arr1, arr2};
///
/// let tmp = std::env::temp_dir();
/// let a = StateDict::from_pairs([("w", arr1(&[1.0f32, 2.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr2(&[[1.0f32, 2.0]]).into_dyn())])?;
/// save_file(&a, tmp.join("modelfusion-doc-cc-a.safetensors"), Dtype::F32)?;
/// save_file(&b, tmp.join("modelfusion-doc-cc-b.safetensors"), Dtype::F32)?;
/// let ca = Checkpoint::open(tmp.join("modelfusion-doc-cc-a.safetensors"))?;
/// let cb = Checkpoint::open(tmp.join("modelfusion-doc-cc-b.safetensors"))?;
/// assert_eq!(check_compatible(&[&ca, &ca])?, vec![("w".to_string(), vec![2])]);
/// let err = check_compatible(&[&ca, &cb]).unwrap_err().to_string();
/// assert!(err.contains("`w`") && err.contains("[1, 2]"), "{err}");
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn check_compatible(inputs: &[&Checkpoint]) -> Result<Vec<(String, Vec<usize>)>> {
    let first = inputs
        .first()
        .ok_or_else(|| Error::empty("the list of checkpoints to merge"))?;
    for (k, other) in inputs.iter().enumerate().skip(1) {
        let missing: Vec<&str> = first
            .tensors()
            .iter()
            .map(|t| t.name())
            .filter(|n| other.info(n).is_none())
            .collect();
        let extra: Vec<&str> = other
            .tensors()
            .iter()
            .map(|t| t.name())
            .filter(|n| first.info(n).is_none())
            .collect();
        if !missing.is_empty() || !extra.is_empty() {
            return Err(Error::NameMismatch {
                detail: format!(
                    "{} (input {k}) lacks {} of the tensors of {} (input 0) {} and has {} others {}",
                    other.path().display(),
                    missing.len(),
                    first.path().display(),
                    preview(&missing),
                    extra.len(),
                    preview(&extra)
                ),
            });
        }
        for t in first.tensors() {
            // Present: checked just above.
            let o = other.info(t.name()).ok_or_else(|| Error::MissingParam {
                name: t.name().to_string(),
                context: other.path().display().to_string(),
            })?;
            if (o.dtype() != t.dtype()) && !(o.dtype().is_float() && t.dtype().is_float()) {
                return Err(Error::invalid(
                    "dtype",
                    format!(
                        "tensor `{}` is {} in {} (input 0) but {} in {} (input {k}); non-float tensors are carried unchanged and must agree",
                        t.name(),
                        t.dtype(),
                        first.path().display(),
                        o.dtype(),
                        other.path().display()
                    ),
                ));
            }
            if o.shape() != t.shape() {
                return Err(Error::shape(
                    format!(
                        "tensor `{}` of {} (input {k}) against {} (input 0)",
                        t.name(),
                        other.path().display(),
                        first.path().display()
                    ),
                    t.shape(),
                    o.shape(),
                ));
            }
        }
    }
    Ok(first
        .tensors()
        .iter()
        .map(|t| (t.name().to_string(), t.shape().to_vec()))
        .collect())
}

fn preview(names: &[&str]) -> String {
    const SHOW: usize = 5;
    let mut s = names
        .iter()
        .take(SHOW)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOW {
        s.push_str(", ...");
    }
    format!("[{s}]")
}

/// Refuses to write into a file that is one of the inputs (it is memory-mapped).
fn check_output_not_input(inputs: &[&Checkpoint], out_dir: &Path) -> Result<()> {
    let Ok(out) = out_dir.canonicalize() else {
        return Ok(()); // does not exist yet, so it holds no input
    };
    for c in inputs {
        for f in c.files() {
            if f.parent()
                .and_then(|p| p.canonicalize().ok())
                .is_some_and(|p| p == out)
            {
                return Err(Error::invalid(
                    "output directory",
                    format!("{} holds input file {}", out_dir.display(), f.display()),
                ));
            }
        }
    }
    Ok(())
}

/// Merges checkpoints with `merger`, one tensor at a time, into the directory `out_dir`.
///
/// All names and shapes are checked from the headers ([`check_compatible`]) before any
/// tensor data is read; the output files and their headers are then laid out up front
/// and each merged tensor (or chunk, see [`Chunking`]) is converted to the output dtype
/// and written at its final offset. Inputs are read straight from their memory maps and
/// converted to `T` (`f32` or `f64`) whatever their stored dtype. With
/// [`Chunking::Whole`], resident memory is about one tensor per input plus the merged
/// one; with [`Chunking::Elementwise`] a few chunks per thread. `progress` is called after
/// each tensor. The merger gets the inputs in the order given (a base model, if the
/// method has one, is wherever the merger expects it). Non-float tensors (integers,
/// booleans, 8-bit floats) are never merged: they are copied, bit for bit and in their
/// dtype, from the first input, and listed in [`MergeSummary::carried`] (with those that
/// differ among the inputs in [`MergeSummary::carried_differing`]). The output is written
/// as a transaction (see [`CheckpointWriter`]): a previous result in `out_dir` stays in
/// place until the new one is complete, and on error or a kill nothing partial is left
/// that loads as a checkpoint (an error also removes the temporaries).
///
/// ```
/// use modelfusion::merge::TensorMerger;
/// use modelfusion::io::{load, merge_checkpoints, save_file, Checkpoint, Dtype, SaveOptions, StreamOptions};
/// use modelfusion::progress::from_fn;
/// use modelfusion::{Model, Result, StateDict, Tensor};
/// use ndarray::{arr1, ArrayD};
///
/// struct Mean;
/// impl TensorMerger<ArrayD<f32>> for Mean {
///     fn merge_tensor(&self, _name: &str, ts: &[&ArrayD<f32>]) -> Result<ArrayD<f32>> {
///         let mut out = ts[0].clone();
///         for t in &ts[1..] { out += *t; }
///         Ok(out / ts.len() as f32)
///     }
/// }
///
/// let tmp = std::env::temp_dir();
/// let (pa, pb) = (tmp.join("modelfusion-doc-mc-a.safetensors"), tmp.join("modelfusion-doc-mc-b.safetensors"));
/// save_file(&StateDict::from_pairs([("w", arr1(&[1.0f32, 2.0]).into_dyn())])?, &pa, Dtype::F32)?;
/// save_file(&StateDict::from_pairs([("w", arr1(&[3.0f32, 6.0]).into_dyn())])?, &pb, Dtype::BF16)?;
/// let (a, b) = (Checkpoint::open(&pa)?, Checkpoint::open(&pb)?);
/// let out = tmp.join("modelfusion-doc-mc-out");
/// let mut seen = 0;
/// let summary = merge_checkpoints::<f32, _>(&[&a, &b], &Mean, &out,
///     &StreamOptions::new(SaveOptions::new(Dtype::F16)), from_fn(|_| seen += 1))?;
/// assert_eq!((summary.tensors, seen), (1, 1));
/// let merged: StateDict<ArrayD<f32>> = load(&out)?;
/// assert_eq!(merged.get("w").unwrap().as_slice().unwrap(), &[2.0, 4.0]);
/// # std::fs::remove_dir_all(&out).ok();
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn merge_checkpoints<T, M>(
    inputs: &[&Checkpoint],
    merger: &M,
    out_dir: impl AsRef<Path>,
    options: &StreamOptions,
    mut observer: impl Observer,
) -> Result<MergeSummary>
where
    T: IoScalar,
    M: TensorMerger<ArrayD<T>> + Sync + ?Sized,
{
    let out_dir = out_dir.as_ref();
    let plan = check_compatible(inputs)?;
    if let Chunking::Elementwise { chunk_elems: 0 } = options.chunking {
        return Err(Error::invalid("chunk_elems", "must be positive"));
    }
    check_output_not_input(inputs, out_dir)?;
    let first = inputs[0];
    // The stored dtype of carried (non-float) tensors; `None` for merged ones.
    let carried_dtype = |name: &str| {
        first
            .info(name)
            .map(|t| t.dtype())
            .filter(|d| !d.is_float())
    };
    let out_dtype = options.save.dtype.parse_float()?;
    let writer = CheckpointWriter::create(
        out_dir,
        plan.iter().map(|(n, s)| TensorPlan {
            name: n.clone(),
            shape: s.clone(),
            dtype: carried_dtype(n),
        }),
        &options.save,
    )?;
    for (name, contents) in &options.files {
        writer.add_file(name, contents)?;
    }
    let out_bytes = |name: &str, numel: usize| {
        numel as u64 * carried_dtype(name).unwrap_or(out_dtype).size() as u64
    };
    let bytes_total: u64 = plan
        .iter()
        .map(|(n, s)| out_bytes(n, s.iter().product()))
        .sum();
    let (mut carried, mut carried_differing) = (Vec::new(), Vec::new());
    let (mut bytes_read, mut bytes_done) = (0u64, 0u64);
    let mut whole_bufs: Vec<Vec<T>> = vec![Vec::new(); inputs.len()];
    let pools: Vec<Mutex<Vec<Vec<T>>>> = (0..rayon::current_num_threads().max(1))
        .map(|_| Mutex::new(vec![Vec::new(); inputs.len()]))
        .collect();
    for (k, (name, shape)) in plan.iter().enumerate() {
        let numel: usize = shape.iter().product();
        match options.chunking {
            _ if carried_dtype(name).is_some() => {
                let raw = first.read_raw(name)?;
                if inputs[1..]
                    .iter()
                    .any(|c| c.raw(name).ok() != Some(raw.bytes()))
                {
                    carried_differing.push(name.clone());
                }
                writer.write_raw(k, &raw)?;
                carried.push(name.clone());
            }
            Chunking::Whole => {
                // Reuse one buffer per input across tensors (no fresh pages per tensor).
                let ts = inputs
                    .par_iter()
                    .zip(whole_bufs.par_iter_mut())
                    .map(|(c, buf)| read_reusing(c, name, 0, shape, buf))
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<&ArrayD<T>> = ts.iter().collect();
                let out = merger.merge_tensor(name, &refs)?;
                for (buf, t) in whole_bufs.iter_mut().zip(ts) {
                    *buf = t.into_raw_vec_and_offset().0;
                }
                if out.shape() != shape.as_slice() {
                    return Err(Error::shape(
                        format!("merged tensor `{name}` (the merger's output)"),
                        shape,
                        out.shape(),
                    ));
                }
                write_par(&writer, k, &out)?;
            }
            Chunking::Elementwise { chunk_elems } => {
                let nchunks = numel.div_ceil(chunk_elems);
                let workers = pools.len().min(nchunks);
                // Worker `w` takes chunks w, w + workers, ...; its buffers persist.
                (0..workers).into_par_iter().try_for_each(|w| {
                    let mut pool = pools[w]
                        .lock()
                        .map_err(|_| Error::invalid("merger", "a worker panicked"))?;
                    for j in (w..nchunks).step_by(workers) {
                        let start = j * chunk_elems;
                        let len = chunk_elems.min(numel - start);
                        let ts = inputs
                            .iter()
                            .zip(pool.iter_mut())
                            .map(|(c, buf)| read_reusing(c, name, start, &[len], buf))
                            .collect::<Result<Vec<_>>>()?;
                        let refs: Vec<&ArrayD<T>> = ts.iter().collect();
                        let out = merger.merge_tensor(name, &refs)?;
                        for (buf, t) in pool.iter_mut().zip(ts) {
                            *buf = t.into_raw_vec_and_offset().0;
                        }
                        if out.shape() != [len] {
                            return Err(Error::shape(
                                format!(
                                    "merged chunk {j} of tensor `{name}` (the merger's output)"
                                ),
                                &[len],
                                out.shape(),
                            ));
                        }
                        writer.write(k, start, &flat(&out))?;
                    }
                    Ok(())
                })?;
            }
        }
        bytes_read += inputs
            .iter()
            .filter_map(|c| c.info(name))
            .map(|t| t.byte_len() as u64)
            .sum::<u64>();
        bytes_done += out_bytes(name, numel);
        report_tensor(
            &mut observer,
            "merge",
            out_dir,
            Progress::Tensor {
                index: k,
                total: plan.len(),
                name,
                bytes_done,
                bytes_total,
            },
        )?;
    }
    let files = writer.finish()?;
    Ok(MergeSummary {
        tensors: plan.len() - carried.len(),
        carried,
        carried_differing,
        bytes_read,
        bytes_written: bytes_done,
        files,
    })
}

/// Reads `shape.product()` elements of `name` from `start` into the vector taken out of
/// `buf` (reusing its allocation); hand the array's vector back to `buf` afterwards.
fn read_reusing<T: IoScalar>(
    c: &Checkpoint,
    name: &str,
    start: usize,
    shape: &[usize],
    buf: &mut Vec<T>,
) -> Result<ArrayD<T>> {
    let mut v = std::mem::take(buf);
    v.clear();
    v.resize(shape.iter().product(), T::zero());
    c.read_into(name, start, &mut v)?;
    ArrayD::from_shape_vec(IxDyn(shape), v).map_err(|e| Error::invalid("shape", e.to_string()))
}

/// Elements per parallel write of a whole merged tensor.
const WRITE_PIECE: usize = 1 << 20;

fn write_par<T: IoScalar>(w: &CheckpointWriter, k: usize, a: &ArrayD<T>) -> Result<()> {
    flat(a)
        .par_chunks(WRITE_PIECE)
        .enumerate()
        .try_for_each(|(j, c)| w.write(k, j * WRITE_PIECE, c))
}
