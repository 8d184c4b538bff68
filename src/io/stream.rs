//! Out-of-core merging: run a [`TensorMerger`] tensor by tensor over checkpoints that
//! never need to be in memory together, writing the output as it goes.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use super::dtype::{Dtype, IoScalar};
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
    /// A merger that can pass over a tensor several times chunk by chunk
    /// ([`MappedMerger::merge_chunked`]: TIES and the other magnitude-trimming methods of
    /// a merge config) gets [`TensorChunks`] of `chunk_elems` elements of every source,
    /// read as often as it needs, and writes its output by chunks; for other tensors
    /// and mergers this is [`Chunking::Whole`].
    Passes {
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
    observer: impl Observer,
) -> Result<MergeSummary>
where
    T: IoScalar,
    M: TensorMerger<ArrayD<T>> + Sync + ?Sized,
{
    let plan: Vec<MappedTensor> = check_compatible(inputs)?
        .into_iter()
        .map(|(name, shape)| MappedTensor {
            sources: (0..inputs.len()).map(|i| (i, name.clone())).collect(),
            name,
            shape,
            own_rows: false,
        })
        .collect();
    merge_mapped(inputs, &plan, &ByName(merger), out_dir, options, observer)
}

/// One output tensor of [`merge_mapped`]: its name and shape, and where each of the
/// merger's inputs comes from.
///
/// ```
/// use modelfusion::io::MappedTensor;
/// // Output layer 0 is layer 5 of checkpoint 1.
/// let t = MappedTensor {
///     name: "model.layers.0.mlp.up_proj.weight".into(),
///     shape: vec![8, 4],
///     sources: vec![(1, "model.layers.5.mlp.up_proj.weight".into())],
///     own_rows: false,
/// };
/// assert_eq!(t.sources.len(), 1);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedTensor {
    /// The name written to the output.
    pub name: String,
    /// The shape of every source and of the output.
    pub shape: Vec<usize>,
    /// The merger's inputs in its order: `(checkpoint index, tensor name in it)`; the
    /// same checkpoint may appear more than once, and the count may differ per tensor.
    pub sources: Vec<(usize, String)>,
    /// Whether the sources may have another number of rows (axis 0) than the output,
    /// the rest of their shape being the output's: they are then read whole, in their
    /// own shapes, and the merger maps their rows to the output's (an embedding whose
    /// vocabulary is remapped). `false`: every source has the output's shape.
    pub own_rows: bool,
}

/// A merger of [`merge_mapped`]: gets the position of the tensor in the plan, the
/// tensor's plan entry and its sources' data (whole, or the same chunk of each).
///
/// ```
/// use modelfusion::io::{MappedMerger, MappedTensor};
/// use ndarray::ArrayD;
/// struct First;
/// impl MappedMerger<f32> for First {
///     fn merge_mapped(&self, _: usize, _: &MappedTensor, ts: &[&ArrayD<f32>]) -> modelfusion::Result<ArrayD<f32>> {
///         Ok(ts[0].clone())
///     }
/// }
/// let t = MappedTensor { name: "w".into(), shape: vec![1], sources: vec![(0, "w".into())], own_rows: false };
/// let x = ArrayD::from_elem(vec![1], 2.0f32);
/// assert_eq!(First.merge_mapped(0, &t, &[&x])?, x);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub trait MappedMerger<T>: Sync {
    /// Merges the sources of plan entry `index` (`tensor`).
    fn merge_mapped(
        &self,
        index: usize,
        tensor: &MappedTensor,
        ts: &[&ArrayD<T>],
    ) -> Result<ArrayD<T>>;

    /// Under [`Chunking::Passes`]: merges plan entry `index` from its sources read
    /// chunk by chunk, handing the merged elements to `out(start, elements)`, and
    /// returns `true`; or returns `false` (the default) to get whole tensors through
    /// [`merge_mapped`](Self::merge_mapped) instead.
    fn merge_chunked(
        &self,
        index: usize,
        tensor: &MappedTensor,
        inputs: &TensorChunks<'_, T>,
        out: &crate::merge::ChunkSink<'_, T>,
    ) -> Result<bool> {
        let _ = (index, tensor, inputs, out);
        Ok(false)
    }
}

/// The sources of one tensor of a streamed merge, read chunk by chunk with positioned
/// reads into per-worker buffers that persist across chunks, passes and tensors (see
/// [`Chunking::Passes`]).
///
/// ```
/// use modelfusion::io::{save_file, Checkpoint, Dtype, TensorChunks};
/// use modelfusion::merge::ChunkedInputs;
/// use modelfusion::StateDict;
/// use ndarray::arr1;
/// let p = std::env::temp_dir().join("modelfusion-doc-tensor-chunks.safetensors");
/// save_file(&StateDict::from_pairs([("w", arr1(&[1.0f32, 2.0, 3.0]).into_dyn())])?, &p, Dtype::BF16)?;
/// let ck = Checkpoint::open(&p)?;
/// let chunks = TensorChunks::<f32>::new(vec![(&ck, "w")], 2, 2)?;
/// let sums = chunks.fold_chunks(0..chunks.chunks(), &|| 0.0f32, &|acc, _, xs| {
///     *acc += xs[0].iter().sum::<f32>();
///     Ok(())
/// })?;
/// assert_eq!(sums.iter().sum::<f32>(), 6.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub struct TensorChunks<'a, T> {
    sources: Vec<(&'a Checkpoint, &'a str)>,
    numel: usize,
    chunk: usize,
    pools: Option<&'a [Mutex<Vec<Vec<T>>>]>,
    own: Vec<Mutex<Vec<Vec<T>>>>,
}

impl<'a, T: IoScalar> TensorChunks<'a, T> {
    /// The tensors `sources` (`(checkpoint, tensor name)`, all of one element count)
    /// in chunks of `chunk_elems`, read by up to `workers` threads at once.
    ///
    /// ```
    /// use modelfusion::io::{save_file, Checkpoint, Dtype, TensorChunks};
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let p = std::env::temp_dir().join("modelfusion-doc-tensor-chunks-new.safetensors");
    /// save_file(&StateDict::from_pairs([("w", arr1(&[1.0f32]).into_dyn())])?, &p, Dtype::F32)?;
    /// let ck = Checkpoint::open(&p)?;
    /// assert!(TensorChunks::<f32>::new(vec![(&ck, "w")], 0, 1).is_err());
    /// assert!(TensorChunks::<f32>::new(vec![(&ck, "nope")], 4, 1).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(
        sources: Vec<(&'a Checkpoint, &'a str)>,
        chunk_elems: usize,
        workers: usize,
    ) -> Result<Self> {
        let numel = chunk_source_len(&sources, chunk_elems)?;
        let own = (0..workers.max(1))
            .map(|_| Mutex::new(vec![Vec::new(); sources.len()]))
            .collect();
        Ok(TensorChunks {
            sources,
            numel,
            chunk: chunk_elems,
            pools: None,
            own,
        })
    }

    /// The same sources in chunks of `chunk_elems` (sharing the read buffers), e.g.
    /// the whole rows a merger needs ([`TaskMerge::chunk_elems_for`]).
    ///
    /// [`TaskMerge::chunk_elems_for`]: crate::merge::TaskMerge::chunk_elems_for
    ///
    /// ```
    /// use modelfusion::io::{save_file, Checkpoint, Dtype, TensorChunks};
    /// use modelfusion::merge::ChunkedInputs;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let p = std::env::temp_dir().join("modelfusion-doc-tensor-chunks-re.safetensors");
    /// save_file(&StateDict::from_pairs([("w", arr1(&[1.0f32; 6]).into_dyn())])?, &p, Dtype::F32)?;
    /// let ck = Checkpoint::open(&p)?;
    /// let chunks = TensorChunks::<f32>::new(vec![(&ck, "w")], 4, 1)?;
    /// assert_eq!(chunks.with_chunk_elems(3)?.chunks(), 2);
    /// assert!(chunks.with_chunk_elems(0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_chunk_elems(&self, chunk_elems: usize) -> Result<TensorChunks<'a, T>> {
        if chunk_elems == 0 {
            return Err(Error::invalid("chunk_elems", "must be positive"));
        }
        let own = match self.pools {
            Some(_) => Vec::new(),
            None => (0..self.own.len())
                .map(|_| Mutex::new(vec![Vec::new(); self.sources.len()]))
                .collect(),
        };
        Ok(TensorChunks {
            sources: self.sources.clone(),
            numel: self.numel,
            chunk: chunk_elems,
            pools: self.pools,
            own,
        })
    }

    fn pools(&self) -> &[Mutex<Vec<Vec<T>>>] {
        self.pools.unwrap_or(&self.own)
    }
}

/// The common element count of chunked `sources`, checked.
fn chunk_source_len(sources: &[(&Checkpoint, &str)], chunk_elems: usize) -> Result<usize> {
    if chunk_elems == 0 {
        return Err(Error::invalid("chunk_elems", "must be positive"));
    }
    let mut numel = None;
    for (c, n) in sources {
        let info = c.info(n).ok_or_else(|| Error::MissingParam {
            name: n.to_string(),
            context: c.path().display().to_string(),
        })?;
        let len = info.shape().iter().product::<usize>();
        if *numel.get_or_insert(len) != len {
            return Err(Error::shape(
                format!("tensor `{n}` of {} (a chunked source)", c.path().display()),
                &[numel.unwrap_or(0)],
                &[len],
            ));
        }
    }
    numel.ok_or_else(|| Error::empty("the chunked sources"))
}

impl<T: IoScalar> crate::merge::ChunkedInputs<T> for TensorChunks<'_, T> {
    fn len(&self) -> usize {
        self.numel
    }

    fn inputs(&self) -> usize {
        self.sources.len()
    }

    fn chunk_elems(&self) -> usize {
        self.chunk
    }

    fn fold_chunks<A: Send>(
        &self,
        chunks: std::ops::Range<usize>,
        init: &(dyn Fn() -> A + Sync),
        f: &crate::merge::ChunkFn<'_, A, T>,
    ) -> Result<Vec<A>> {
        let pools = self.pools();
        let workers = pools.len().min(chunks.len()).max(1);
        // Worker `w` takes chunks w, w + workers, ...; its buffers persist.
        (0..workers)
            .into_par_iter()
            .map(|w| {
                let mut pool = pools[w]
                    .lock()
                    .map_err(|_| Error::invalid("merger", "a worker panicked"))?;
                let mut acc = init();
                for j in chunks.clone().skip(w).step_by(workers) {
                    let start = j * self.chunk;
                    let len = self.chunk.min(self.numel - start);
                    for ((c, n), buf) in self.sources.iter().zip(pool.iter_mut()) {
                        // `read_into` writes every element: no zeroing (only the part
                        // a buffer grows by is filled).
                        buf.resize(len, T::zero());
                        c.read_into(n, start, buf)?;
                    }
                    let parts: Vec<&[T]> = pool.iter().map(|b| b.as_slice()).collect();
                    f(&mut acc, start, &parts)?;
                }
                Ok(acc)
            })
            .collect()
    }

    fn read_whole(&self, input: usize, out: &mut [T]) -> Result<()> {
        let (c, n) = self
            .sources
            .get(input)
            .ok_or_else(|| Error::invalid("input", format!("{input} of {}", self.sources.len())))?;
        c.read_into(n, 0, out)
    }
}

/// A [`TensorMerger`] as a [`MappedMerger`]: merges by output name.
struct ByName<'a, M: ?Sized>(&'a M);

impl<T, M> MappedMerger<T> for ByName<'_, M>
where
    T: IoScalar,
    M: TensorMerger<ArrayD<T>> + Sync + ?Sized,
{
    fn merge_mapped(&self, _: usize, t: &MappedTensor, ts: &[&ArrayD<T>]) -> Result<ArrayD<T>> {
        self.0.merge_tensor(&t.name, ts)
    }
}

/// Checks a mapped plan against the headers: every source exists with the output's
/// shape, output names are unique, a non-float tensor has the same dtype in all its
/// sources. Returns the stored dtype of the carried (non-float) tensors, per entry.
pub(crate) fn check_mapped(
    inputs: &[&Checkpoint],
    plan: &[MappedTensor],
) -> Result<Vec<Option<Dtype>>> {
    let mut seen = std::collections::HashSet::new();
    plan.iter()
        .map(|t| {
            if !seen.insert(t.name.as_str()) {
                return Err(Error::invalid(
                    "merge plan",
                    format!("output tensor `{}` is planned twice", t.name),
                ));
            }
            let mut dtype = None;
            if t.sources.is_empty() {
                return Err(Error::empty(format!("the sources of output tensor `{}`", t.name)));
            }
            for (j, (c, src)) in t.sources.iter().enumerate() {
                let ck = inputs.get(*c).ok_or_else(|| {
                    Error::invalid(
                        "merge plan",
                        format!("tensor `{}` names input {c} of {}", t.name, inputs.len()),
                    )
                })?;
                let info = ck.info(src).ok_or_else(|| Error::MissingParam {
                    name: src.clone(),
                    context: format!(
                        "{} (input {c}), source of output tensor `{}`",
                        ck.path().display(),
                        t.name
                    ),
                })?;
                let fits = if t.own_rows {
                    info.shape().len() == t.shape.len() && info.shape()[1..] == t.shape[1..]
                } else {
                    info.shape() == t.shape.as_slice()
                };
                if !fits {
                    return Err(Error::shape(
                        format!(
                            "tensor `{src}` of {} (input {c}), source of output tensor `{}`",
                            ck.path().display(),
                            t.name
                        ),
                        &t.shape,
                        info.shape(),
                    ));
                }
                let d = (!info.dtype().is_float()).then_some(info.dtype());
                if t.own_rows && d.is_some() {
                    return Err(Error::invalid(
                        "merge plan",
                        format!(
                            "output tensor `{}` has rows remapped but its source `{src}` is {} (only float tensors are remapped)",
                            t.name,
                            info.dtype()
                        ),
                    ));
                }
                if j == 0 {
                    dtype = d;
                } else if d != dtype {
                    return Err(Error::invalid(
                        "dtype",
                        format!(
                            "output tensor `{}`: its sources are {} and {} ({} and {}); non-float tensors are carried unchanged and must agree",
                            t.name,
                            inputs[t.sources[0].0].info(&t.sources[0].1).map_or(info.dtype(), |i| i.dtype()),
                            info.dtype(),
                            inputs[t.sources[0].0].path().display(),
                            ck.path().display()
                        ),
                    ));
                }
            }
            Ok(dtype)
        })
        .collect()
}

/// Merges a mapped plan, one output tensor at a time, into the directory `out_dir`: the
/// general form of [`merge_checkpoints`], where each output tensor names its own sources
/// (checkpoint and tensor name), so that outputs may be renamed, duplicated or taken
/// from a subset of the inputs (layer slices, tied weights). Everything else is as in
/// [`merge_checkpoints`]: the plan is checked against the headers before any data is
/// read, memory stays near one tensor per source, non-float tensors are copied from
/// their first source, and the output is written as a transaction.
///
/// ```
/// use modelfusion::io::{load, merge_mapped, save_file, Checkpoint, Dtype, MappedMerger, MappedTensor, SaveOptions, StreamOptions};
/// use modelfusion::progress::Silent;
/// use modelfusion::{Model, StateDict};
/// use ndarray::{arr1, ArrayD};
///
/// struct First;
/// impl MappedMerger<f32> for First {
///     fn merge_mapped(&self, _: usize, _: &MappedTensor, ts: &[&ArrayD<f32>]) -> modelfusion::Result<ArrayD<f32>> {
///         Ok(ts[0].clone())
///     }
/// }
/// let tmp = std::env::temp_dir();
/// let p = tmp.join("modelfusion-doc-mapped.safetensors");
/// save_file(&StateDict::from_pairs([("a", arr1(&[1.0f32]).into_dyn())])?, &p, Dtype::F32)?;
/// let ck = Checkpoint::open(&p)?;
/// // `a` written twice, as `x` and `y`.
/// let plan: Vec<MappedTensor> = ["x", "y"].iter().map(|n| MappedTensor {
///     name: n.to_string(), shape: vec![1], sources: vec![(0, "a".into())], own_rows: false,
/// }).collect();
/// let out = tmp.join("modelfusion-doc-mapped-out");
/// merge_mapped::<f32, _>(&[&ck], &plan, &First, &out, &StreamOptions::new(SaveOptions::new(Dtype::F32)), Silent)?;
/// let back: StateDict<ArrayD<f32>> = load(&out)?;
/// assert_eq!(back.names().collect::<Vec<_>>(), ["x", "y"]);
/// # std::fs::remove_dir_all(&out).ok();
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn merge_mapped<T, M>(
    inputs: &[&Checkpoint],
    plan: &[MappedTensor],
    merger: &M,
    out_dir: impl AsRef<Path>,
    options: &StreamOptions,
    mut observer: impl Observer,
) -> Result<MergeSummary>
where
    T: IoScalar,
    M: MappedMerger<T> + ?Sized,
{
    let out_dir = out_dir.as_ref();
    if inputs.is_empty() {
        return Err(Error::empty("the list of checkpoints to merge"));
    }
    let carried_dtype = check_mapped(inputs, plan)?;
    if let Chunking::Elementwise { chunk_elems: 0 } | Chunking::Passes { chunk_elems: 0 } =
        options.chunking
    {
        return Err(Error::invalid("chunk_elems", "must be positive"));
    }
    check_output_not_input(inputs, out_dir)?;
    let out_dtype = options.save.dtype.parse_float()?;
    let writer = CheckpointWriter::create(
        out_dir,
        plan.iter().zip(&carried_dtype).map(|(t, d)| TensorPlan {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: *d,
        }),
        &options.save,
    )?;
    for (name, contents) in &options.files {
        writer.add_file(name, contents)?;
    }
    let out_bytes =
        |k: usize, numel: usize| numel as u64 * carried_dtype[k].unwrap_or(out_dtype).size() as u64;
    let bytes_total: u64 = plan
        .iter()
        .enumerate()
        .map(|(k, t)| out_bytes(k, t.shape.iter().product()))
        .sum();
    let (mut carried, mut carried_differing) = (Vec::new(), Vec::new());
    let (mut bytes_read, mut bytes_done) = (0u64, 0u64);
    let slots = plan.iter().map(|t| t.sources.len()).max().unwrap_or(0);
    let mut whole_bufs: Vec<Vec<T>> = vec![Vec::new(); slots];
    let pools: Vec<Mutex<Vec<Vec<T>>>> = (0..rayon::current_num_threads().max(1))
        .map(|_| Mutex::new(vec![Vec::new(); slots]))
        .collect();
    for (k, tensor) in plan.iter().enumerate() {
        let (name, shape) = (&tensor.name, &tensor.shape);
        let sources: Vec<(&Checkpoint, &str)> = tensor
            .sources
            .iter()
            .map(|(c, n)| (inputs[*c], n.as_str()))
            .collect();
        let numel: usize = shape.iter().product();
        // Sources with rows of their own are read whole, in their own shapes.
        let chunking = if tensor.own_rows {
            Chunking::Whole
        } else {
            options.chunking
        };
        let chunked = match chunking {
            Chunking::Passes { chunk_elems } if carried_dtype[k].is_none() => {
                let src = TensorChunks {
                    numel: chunk_source_len(&sources, chunk_elems)?,
                    sources: sources.clone(),
                    chunk: chunk_elems,
                    pools: Some(&pools),
                    own: Vec::new(),
                };
                merger.merge_chunked(k, tensor, &src, &|start, d| writer.write(k, start, d))?
            }
            _ => false,
        };
        match chunking {
            _ if chunked => {}
            _ if carried_dtype[k].is_some() => {
                let (first, first_name) = sources[0];
                let raw = first.read_raw(first_name)?;
                if sources[1..]
                    .iter()
                    .any(|(c, n)| c.raw(n).ok() != Some(raw.bytes()))
                {
                    carried_differing.push(name.clone());
                }
                writer.write_raw(k, &raw)?;
                carried.push(name.clone());
            }
            Chunking::Whole | Chunking::Passes { .. } => {
                // Reuse one buffer per source across tensors (no fresh pages per tensor).
                let ts = sources
                    .par_iter()
                    .zip(whole_bufs.par_iter_mut())
                    .map(|((c, n), buf)| {
                        let own = c.info(n).map(|i| i.shape().to_vec());
                        let read = own.as_deref().filter(|_| tensor.own_rows).unwrap_or(shape);
                        read_reusing(c, n, 0, read, buf)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<&ArrayD<T>> = ts.iter().collect();
                let out = merger.merge_mapped(k, tensor, &refs)?;
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
                        let ts = sources
                            .iter()
                            .zip(pool.iter_mut())
                            .map(|((c, n), buf)| read_reusing(c, n, start, &[len], buf))
                            .collect::<Result<Vec<_>>>()?;
                        let refs: Vec<&ArrayD<T>> = ts.iter().collect();
                        let out = merger.merge_mapped(k, tensor, &refs)?;
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
        bytes_read += sources
            .iter()
            .filter_map(|(c, n)| c.info(n))
            .map(|t| t.byte_len() as u64)
            .sum::<u64>();
        bytes_done += out_bytes(k, numel);
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
