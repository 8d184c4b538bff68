//! Writing checkpoints: a writer that knows every tensor's shape up front, so each
//! file's header is written first and tensor data can then be written in any order, from
//! any thread, straight to its final offset.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::ArrayD;
use serde_json::{Map, Value, json};

use super::atomic;
use super::dtype::{Dtype, IoScalar, encode};
use super::guard::read_capped;
use super::header::{INDEX_FILE, MAX_INDEX_SIZE};
use super::reader::{SINGLE_FILE, io_err};
use crate::dtype::RawTensor;
use crate::error::{Error, Result};
use crate::model::StateDict;
use crate::tensor::Tensor;

/// How to save a checkpoint: output dtype, shard size, header metadata.
///
/// ```
/// use modelfusion::io::{Dtype, SaveOptions};
/// let o = SaveOptions::new(Dtype::BF16).with_max_shard_size(5 << 30);
/// assert_eq!(o.dtype, Dtype::BF16);
/// assert_eq!(o.max_shard_size, Some(5 << 30));
/// assert_eq!(o.metadata["format"], "pt");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveOptions {
    /// The stored element type (narrowing rounds to nearest even).
    pub dtype: Dtype,
    /// Largest shard in bytes of tensor data; `None` writes one file. A tensor larger than
    /// this gets a shard of its own.
    pub max_shard_size: Option<u64>,
    /// The `__metadata__` map of every file (defaults to `{"format": "pt"}`, which the
    /// Hugging Face loaders expect).
    pub metadata: BTreeMap<String, String>,
}

impl SaveOptions {
    /// One file of `dtype`, metadata `{"format": "pt"}`.
    ///
    /// ```
    /// let o = modelfusion::io::SaveOptions::new(modelfusion::io::Dtype::F32);
    /// assert_eq!(o.max_shard_size, None);
    /// ```
    pub fn new(dtype: Dtype) -> Self {
        SaveOptions {
            dtype,
            max_shard_size: None,
            metadata: BTreeMap::from([("format".to_string(), "pt".to_string())]),
        }
    }

    /// Sets the largest shard size in bytes.
    ///
    /// ```
    /// let o = modelfusion::io::SaveOptions::new(modelfusion::io::Dtype::F32).with_max_shard_size(1 << 20);
    /// assert_eq!(o.max_shard_size, Some(1 << 20));
    /// ```
    pub fn with_max_shard_size(mut self, bytes: u64) -> Self {
        self.max_shard_size = Some(bytes);
        self
    }
}

/// One tensor of a checkpoint to be written: its name, shape, and stored dtype (`None`:
/// the writer's [`SaveOptions::dtype`]). Built from `(name, shape)` or
/// `(name, shape, dtype)` tuples.
///
/// ```
/// use modelfusion::io::{Dtype, TensorPlan};
/// let p: TensorPlan = ("w", vec![2, 3]).into();
/// assert_eq!(p.dtype, None);
/// let q: TensorPlan = ("steps", vec![], Dtype::I64).into();
/// assert_eq!(q.dtype, Some(Dtype::I64));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorPlan {
    /// The tensor's name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its stored dtype; `None` for the writer's output dtype.
    pub dtype: Option<Dtype>,
}

impl<S: AsRef<str>> From<(S, Vec<usize>)> for TensorPlan {
    fn from((name, shape): (S, Vec<usize>)) -> Self {
        TensorPlan {
            name: name.as_ref().to_string(),
            shape,
            dtype: None,
        }
    }
}

impl<S: AsRef<str>> From<(S, Vec<usize>, Dtype)> for TensorPlan {
    fn from((name, shape, dtype): (S, Vec<usize>, Dtype)) -> Self {
        TensorPlan {
            name: name.as_ref().to_string(),
            shape,
            dtype: Some(dtype),
        }
    }
}

struct OutShard {
    /// Where the file goes once complete.
    path: PathBuf,
    /// The temporary file being written.
    tmp: PathBuf,
    file: File,
    /// The header's JSON length, written into its first 8 bytes by `finish`.
    header_len: u64,
}

/// A file written beside the checkpoint and committed with it.
struct Staged {
    name: String,
    tmp: PathBuf,
}

struct OutTensor {
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
    numel: usize,
    shard: usize,
    /// Absolute byte offset in its file.
    offset: u64,
    written: AtomicUsize,
}

/// A checkpoint being written, with every tensor's name and shape fixed up front.
///
/// [`CheckpointWriter::create`] plans the shards, writes each file's header and sizes the
/// files; [`write`](CheckpointWriter::write) then stores any element range of any tensor
/// at its final place (it takes `&self` and may be called from several threads at once);
/// [`finish`](CheckpointWriter::finish) checks that every element was written and writes
/// the index of a sharded checkpoint, and only then puts the files in place. Dropping an
/// unfinished writer deletes its files.
///
/// **Crash safety.** Every file is written under a temporary dot-name in the output
/// directory (`.model.safetensors.mf-tmp-<pid>-<n>`) whose 8-byte header length stays zero
/// until [`finish`](CheckpointWriter::finish), so a temporary never opens as a checkpoint,
/// even renamed by hand. `finish` fsyncs every file and renames it into place, the index
/// last, fsyncing the directory; a previous result in the directory keeps loading,
/// complete, until the new one replaces it, and its files that the new result does not
/// reuse are removed afterwards. Renames replace links at the final names rather than
/// writing through them. Temporaries of killed runs are removed by the next writer.
///
/// Shards follow the Hugging Face naming: one file is `model.safetensors`; several are
/// `model-00001-of-00003.safetensors`, ... with `model.safetensors.index.json`.
///
/// ```
/// use modelfusion::io::{load, CheckpointWriter, Dtype, SaveOptions};
/// use modelfusion::{Model, StateDict};
/// use ndarray::ArrayD;
///
/// let dir = std::env::temp_dir().join("modelfusion-doc-writer");
/// let w = CheckpointWriter::create(&dir, [("a", vec![2, 2]), ("b", vec![3])], &SaveOptions::new(Dtype::F32))?;
/// w.write(1, 0, &[7.0f32, 8.0, 9.0])?;           // tensors in any order,
/// w.write(0, 2, &[3.0f32, 4.0])?;                // ranges in any order
/// w.write(0, 0, &[1.0f32, 2.0])?;
/// w.finish()?;
/// let sd: StateDict<ArrayD<f32>> = load(&dir)?;
/// assert_eq!(sd.get("a").unwrap().as_slice().unwrap(), &[1.0, 2.0, 3.0, 4.0]);
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub struct CheckpointWriter {
    dir: PathBuf,
    dtype: Dtype,
    shards: Vec<OutShard>,
    tensors: Vec<OutTensor>,
    by_name: HashMap<String, usize>,
    /// `Some` for [`CheckpointWriter::create_file`].
    single: Option<PathBuf>,
    staged: Mutex<Vec<Staged>>,
    index_tmp: Option<PathBuf>,
    finished: bool,
}

impl std::fmt::Debug for CheckpointWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointWriter")
            .field("dir", &self.dir)
            .field("dtype", &self.dtype)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Splits tensors of the given byte sizes into consecutive shards of at most `max` bytes
/// (a tensor larger than `max` alone). Returns each tensor's shard.
fn plan_shards(sizes: &[u64], max: Option<u64>) -> Vec<usize> {
    let mut out = Vec::with_capacity(sizes.len());
    let (mut shard, mut used) = (0usize, 0u64);
    for &s in sizes {
        if let Some(max) = max
            && used > 0
            && used.saturating_add(s) > max
        {
            shard += 1;
            used = 0;
        }
        used = used.saturating_add(s);
        out.push(shard);
    }
    out
}

/// The file name of shard `i` (0-based) of `n`.
fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// Is `name` a file a previous save into the same directory may have left?
fn is_own_output(name: &str) -> bool {
    if name == SINGLE_FILE || name == INDEX_FILE {
        return true;
    }
    let b = name.as_bytes();
    b.len() == "model-00001-of-00003.safetensors".len()
        && name.starts_with("model-")
        && name.ends_with(".safetensors")
        && b[6..11].iter().all(u8::is_ascii_digit)
        && &name[11..15] == "-of-"
        && b[15..20].iter().all(u8::is_ascii_digit)
}

fn header_bytes(
    entries: &[(&str, &[usize], Dtype, u64, u64)],
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut map = Map::new();
    if !metadata.is_empty() {
        map.insert("__metadata__".into(), json!(metadata));
    }
    for &(name, shape, dtype, begin, end) in entries {
        map.insert(
            name.to_string(),
            json!({"dtype": dtype.as_str(), "shape": shape, "data_offsets": [begin, end]}),
        );
    }
    let mut text = Value::Object(map).to_string().into_bytes();
    // Pad with spaces so the data region starts 8-byte aligned, as the reference does.
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out
}

/// The element count and byte size of a tensor, or `None` when either overflows. The byte
/// size follows the reader's rule exactly (`dtype.size()` times each dimension in turn,
/// checked), so the writer refuses precisely the shapes a reader refuses: `[2^62, 0]` of
/// F32 is refused although it holds no element.
fn sizes_of(shape: &[usize], dtype: Dtype) -> Option<(usize, usize)> {
    let nbytes = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))?;
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    Some((numel, nbytes))
}

/// Reserves the file's blocks up front where the filesystem can, so that a full disk
/// fails at once rather than part-way (a sparse file is left where it cannot).
fn preallocate(file: &File, size: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        let Ok(len) = libc::off_t::try_from(size) else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        // SAFETY: a valid open descriptor and in-range lengths; no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOSPC) {
                return Err(e);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, size);
    Ok(())
}

/// The files the checkpoint now in `dir` loads from, when it has an index: the parsed
/// index and the distinct file names of its `weight_map`.
fn old_index(dir: &Path) -> Option<(Value, Vec<String>)> {
    let path = dir.join(INDEX_FILE);
    std::fs::symlink_metadata(&path).ok()?;
    let bytes = read_capped(&path, MAX_INDEX_SIZE, "checkpoint index").ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    let mut files: Vec<String> = Vec::new();
    for f in value.get("weight_map")?.as_object()?.values() {
        let f = f.as_str()?.to_string();
        if !files.contains(&f) {
            files.push(f);
        }
    }
    Some((value, files))
}

thread_local! {
    /// Per-thread staging buffer for converted output (reused: no allocation per write).
    static ENCODE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(unix)]
fn write_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

#[cfg(windows)]
fn write_at(file: &File, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_write(file, buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

impl CheckpointWriter {
    /// Creates the directory `dir` (if needed) and the shard files for `tensors` (names
    /// and shapes, in the order they are stored) as temporaries, writing each file's
    /// header. A previous result in `dir` is left untouched until
    /// [`finish`](CheckpointWriter::finish) has put the new one in place; then the files
    /// it left under the names this writer uses (`model.safetensors`,
    /// `model-NNNNN-of-NNNNN.safetensors`, the index) and the new result does not reuse
    /// are removed, so no stale shard survives; other files are left alone. Temporaries
    /// that killed runs left in `dir` are removed here. A shape whose element count or
    /// byte size overflows is refused, by the same rule the reader applies.
    ///
    /// ```
    /// use modelfusion::io::{CheckpointWriter, Dtype, SaveOptions};
    /// let dir = std::env::temp_dir().join("modelfusion-doc-writer-dup");
    /// let r = CheckpointWriter::create(&dir, [("a", vec![1]), ("a", vec![2])], &SaveOptions::new(Dtype::F32));
    /// assert!(r.is_err()); // duplicate name
    /// ```
    pub fn create<P: Into<TensorPlan>>(
        dir: impl AsRef<Path>,
        tensors: impl IntoIterator<Item = P>,
        options: &SaveOptions,
    ) -> Result<CheckpointWriter> {
        Self::create_impl(dir.as_ref(), None, tensors, options)
    }

    /// Like [`CheckpointWriter::create`] but writes the single file `path` (never sharded:
    /// `options.max_shard_size` is ignored), replaced atomically by `finish`, and touches
    /// no other file (save those added with [`add_file`](CheckpointWriter::add_file)).
    ///
    /// ```
    /// use modelfusion::io::{Checkpoint, CheckpointWriter, Dtype, SaveOptions};
    /// let path = std::env::temp_dir().join("modelfusion-doc-writer-file.safetensors");
    /// let w = CheckpointWriter::create_file(&path, [("a", vec![1])], &SaveOptions::new(Dtype::F16))?;
    /// w.write(0, 0, &[0.5f64])?;
    /// w.finish()?;
    /// assert_eq!(Checkpoint::open(&path)?.read::<f32>("a")?[[0]], 0.5);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn create_file<P: Into<TensorPlan>>(
        path: impl AsRef<Path>,
        tensors: impl IntoIterator<Item = P>,
        options: &SaveOptions,
    ) -> Result<CheckpointWriter> {
        let path = path.as_ref();
        Self::create_impl(atomic::dir_of(path), Some(path), tensors, options)
    }

    fn create_impl<P: Into<TensorPlan>>(
        dir: &Path,
        single: Option<&Path>,
        tensors: impl IntoIterator<Item = P>,
        options: &SaveOptions,
    ) -> Result<CheckpointWriter> {
        let default_dtype = options.dtype.parse_float()?;
        let mut out: Vec<OutTensor> = Vec::new();
        let mut by_name = HashMap::new();
        let mut sizes = Vec::new();
        for plan in tensors {
            let TensorPlan { name, shape, dtype } = plan.into();
            let dtype = dtype.unwrap_or(default_dtype);
            if name == "__metadata__" {
                return Err(Error::invalid("tensor name", "`__metadata__` is reserved"));
            }
            let (numel, nbytes) = sizes_of(&shape, dtype).ok_or_else(|| {
                Error::invalid(
                    "shape",
                    format!("tensor `{name}` of shape {shape:?} ({dtype}) is too large"),
                )
            })?;
            if by_name.insert(name.clone(), out.len()).is_some() {
                return Err(Error::invalid(
                    "tensor name",
                    format!("`{name}` appears twice"),
                ));
            }
            sizes.push(nbytes as u64);
            out.push(OutTensor {
                name,
                shape,
                dtype,
                numel,
                shard: 0,
                offset: 0,
                written: AtomicUsize::new(0),
            });
        }
        if options.max_shard_size == Some(0) {
            return Err(Error::invalid("max_shard_size", "must be positive"));
        }
        let max_shard = if single.is_some() {
            None
        } else {
            options.max_shard_size
        };
        let plan = plan_shards(&sizes, max_shard);
        let nshards = plan.last().map_or(1, |&s| s + 1);
        if single.is_none() {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        }
        atomic::clean_stale_temps(dir)?;
        let mut writer = CheckpointWriter {
            dir: dir.to_path_buf(),
            dtype: default_dtype,
            shards: Vec::with_capacity(nshards),
            tensors: Vec::new(),
            by_name,
            single: single.map(Path::to_path_buf),
            staged: Mutex::new(Vec::new()),
            index_tmp: None,
            finished: false,
        };
        let mut first = 0;
        for s in 0..nshards {
            let last = plan[first..]
                .iter()
                .position(|&p| p != s)
                .map_or(plan.len(), |k| first + k);
            let mut entries = Vec::with_capacity(last - first);
            let mut pos = 0u64;
            for (t, &size) in out[first..last].iter().zip(&sizes[first..last]) {
                let end = pos
                    .checked_add(size)
                    .filter(|&e| usize::try_from(e).is_ok())
                    .ok_or_else(|| {
                        Error::invalid("shape", format!("shard {} would be too large", s + 1))
                    })?;
                entries.push((t.name.as_str(), t.shape.as_slice(), t.dtype, pos, end));
                pos = end;
            }
            let mut header = header_bytes(&entries, &options.metadata);
            let path = match single {
                Some(p) => p.to_path_buf(),
                None => dir.join(shard_name(s, nshards)),
            };
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Error::invalid("output file", path.display().to_string()))?;
            let (tmp, file) = atomic::create_temp(dir, name)?;
            let size = header.len() as u64 + pos;
            // The header length stays zero (an invalid file) until `finish`.
            header[..8].fill(0);
            let res = write_at(&file, &header, 0)
                .and_then(|()| file.set_len(size))
                .and_then(|()| preallocate(&file, size));
            // Registered even on failure, so that dropping the writer removes the file.
            let header_len = (header.len() - 8) as u64;
            writer.shards.push(OutShard {
                path,
                tmp,
                file,
                header_len,
            });
            res.map_err(|e| io_err(&writer.shards[s].tmp, e))?;
            let mut off = header.len() as u64;
            for (t, &size) in out[first..last].iter_mut().zip(&sizes[first..last]) {
                t.shard = s;
                t.offset = off;
                off += size;
            }
            first = last;
        }
        writer.tensors = out;
        Ok(writer)
    }

    /// Number of tensors.
    ///
    /// ```
    /// # use modelfusion::io::{CheckpointWriter, Dtype, SaveOptions};
    /// # let dir = std::env::temp_dir().join("modelfusion-doc-writer-len");
    /// let w = CheckpointWriter::create(&dir, [("a", vec![1])], &SaveOptions::new(Dtype::F32))?;
    /// assert_eq!(w.len(), 1);
    /// assert!(!w.is_empty());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when there are no tensors.
    ///
    /// ```
    /// # use modelfusion::io::{CheckpointWriter, Dtype, SaveOptions};
    /// # let dir = std::env::temp_dir().join("modelfusion-doc-writer-empty");
    /// let w = CheckpointWriter::create(&dir, Vec::<(String, Vec<usize>)>::new(), &SaveOptions::new(Dtype::F32))?;
    /// assert!(w.is_empty());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The position of `name` in the order given to [`CheckpointWriter::create`].
    ///
    /// ```
    /// # use modelfusion::io::{CheckpointWriter, Dtype, SaveOptions};
    /// # let dir = std::env::temp_dir().join("modelfusion-doc-writer-index");
    /// let w = CheckpointWriter::create(&dir, [("a", vec![1]), ("b", vec![1])], &SaveOptions::new(Dtype::F32))?;
    /// assert_eq!(w.index_of("b"), Some(1));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The files being written.
    ///
    /// ```
    /// # use modelfusion::io::{CheckpointWriter, Dtype, SaveOptions};
    /// # let dir = std::env::temp_dir().join("modelfusion-doc-writer-files");
    /// let w = CheckpointWriter::create(&dir, [("a", vec![4]), ("b", vec![4])], &SaveOptions::new(Dtype::F32).with_max_shard_size(16))?;
    /// let names: Vec<_> = w.files().map(|p| p.file_name().unwrap().to_str().unwrap().to_string()).collect();
    /// assert_eq!(names, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// The planned tensor `index`, or an error naming the range.
    fn planned(&self, index: usize) -> Result<&OutTensor> {
        self.tensors.get(index).ok_or_else(|| {
            Error::invalid(
                "index",
                format!(
                    "tensor index {index} out of range (0..{})",
                    self.tensors.len()
                ),
            )
        })
    }

    /// Writes `data` as elements `start..start + data.len()` of tensor `index` (row-major),
    /// converting to the output dtype. Safe to call concurrently for disjoint ranges.
    ///
    /// ```
    /// # use modelfusion::io::{CheckpointWriter, Dtype, SaveOptions};
    /// # let dir = std::env::temp_dir().join("modelfusion-doc-writer-write");
    /// let w = CheckpointWriter::create(&dir, [("a", vec![2])], &SaveOptions::new(Dtype::F32))?;
    /// assert!(w.write(0, 1, &[1.0f32, 2.0]).is_err()); // past the end
    /// assert!(w.write(5, 0, &[1.0f32]).is_err());     // no such tensor
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn write<T: IoScalar>(&self, index: usize, start: usize, data: &[T]) -> Result<()> {
        let t = self.planned(index)?;
        if start.checked_add(data.len()).is_none_or(|e| e > t.numel) {
            return Err(Error::invalid(
                "start",
                format!(
                    "range {start}..{} is outside tensor `{}` of {} elements",
                    start.saturating_add(data.len()),
                    t.name,
                    t.numel
                ),
            ));
        }
        if !t.dtype.is_float() {
            return Err(Error::invalid(
                "tensor",
                format!(
                    "tensor `{}` is stored as {}: write it with `write_raw`",
                    t.name, t.dtype
                ),
            ));
        }
        let shard = &self.shards[t.shard];
        let offset = t.offset + (start * t.dtype.size()) as u64;
        match T::as_bytes_of(data, t.dtype) {
            Some(bytes) => write_at(&shard.file, bytes, offset),
            None => ENCODE_BUF.with(|buf| {
                let mut buf = buf.borrow_mut();
                buf.clear();
                buf.resize(data.len() * t.dtype.size(), 0);
                encode(t.dtype, data, &mut buf)?;
                Ok::<_, Error>(write_at(&shard.file, &buf, offset))
            })?,
        }
        .map_err(|e| io_err(&shard.path, e))?;
        t.written.fetch_add(data.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Writes the whole tensor `index` from stored bytes: `raw` must have the planned
    /// dtype and shape. This is how non-float tensors (and any tensor copied unchanged)
    /// are written.
    ///
    /// ```
    /// use modelfusion::io::{Checkpoint, CheckpointWriter, Dtype, SaveOptions};
    /// use modelfusion::RawTensor;
    /// let path = std::env::temp_dir().join("modelfusion-doc-writer-raw.safetensors");
    /// let w = CheckpointWriter::create_file(&path, [("n", vec![], Dtype::I64)], &SaveOptions::new(Dtype::F32))?;
    /// assert!(w.write(0, 0, &[1.0f32]).is_err()); // not a float tensor
    /// w.write_raw(0, &RawTensor::new(Dtype::I64, vec![], 3i64.to_le_bytes().to_vec())?)?;
    /// w.finish()?;
    /// assert_eq!(Checkpoint::open(&path)?.info("n").unwrap().dtype(), Dtype::I64);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn write_raw(&self, index: usize, raw: &RawTensor) -> Result<()> {
        let t = self.planned(index)?;
        if raw.dtype() != t.dtype || raw.shape() != t.shape.as_slice() {
            return Err(Error::invalid(
                "tensor",
                format!(
                    "tensor `{}` is planned as {} {:?}, got {} {:?}",
                    t.name,
                    t.dtype,
                    t.shape,
                    raw.dtype(),
                    raw.shape()
                ),
            ));
        }
        let shard = &self.shards[t.shard];
        write_at(&shard.file, raw.bytes(), t.offset).map_err(|e| io_err(&shard.path, e))?;
        t.written.store(t.numel, Ordering::Relaxed);
        Ok(())
    }

    /// Writes a whole tensor by name; its shape must be the planned one.
    ///
    /// ```
    /// # use modelfusion::io::{CheckpointWriter, Dtype, SaveOptions};
    /// # let dir = std::env::temp_dir().join("modelfusion-doc-writer-tensor");
    /// let w = CheckpointWriter::create(&dir, [("a", vec![2])], &SaveOptions::new(Dtype::F32))?;
    /// assert!(w.write_tensor("a", &ndarray::ArrayD::<f32>::zeros(vec![3])).is_err());
    /// w.write_tensor("a", &ndarray::ArrayD::<f32>::zeros(vec![2]))?;
    /// w.finish()?;
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn write_tensor<T: IoScalar>(&self, name: &str, tensor: &ArrayD<T>) -> Result<()> {
        let index = self.index_of(name).ok_or_else(|| Error::MissingParam {
            name: name.to_string(),
            context: "the checkpoint being written".into(),
        })?;
        let t = &self.tensors[index];
        if tensor.shape() != t.shape.as_slice() {
            return Err(Error::shape(
                format!("tensor `{name}`"),
                &t.shape,
                tensor.shape(),
            ));
        }
        self.write(index, 0, &flat(tensor))
    }

    /// Writes the file `name` (a plain file name, e.g. `config.json`) with `contents`
    /// beside the checkpoint: staged now as an fsynced temporary and put in place by
    /// [`finish`](CheckpointWriter::finish) together with the weights, before the index.
    /// A checkpoint file name (`model.safetensors`, a shard, the index) or a dot-name is
    /// refused.
    ///
    /// ```
    /// use modelfusion::io::{CheckpointWriter, Dtype, SaveOptions};
    /// let dir = std::env::temp_dir().join("modelfusion-doc-writer-add-file");
    /// let w = CheckpointWriter::create(&dir, [("a", vec![1])], &SaveOptions::new(Dtype::F32))?;
    /// w.add_file("config.json", b"{}")?;
    /// assert!(w.add_file("model.safetensors", b"").is_err());
    /// assert!(w.add_file("../x", b"").is_err());
    /// assert!(!dir.join("config.json").exists()); // not yet
    /// w.write(0, 0, &[1.0f32])?;
    /// w.finish()?;
    /// assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), b"{}");
    /// # std::fs::remove_dir_all(&dir).ok();
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn add_file(&self, name: &str, contents: &[u8]) -> Result<()> {
        let plain = Path::new(name).file_name().and_then(|n| n.to_str()) == Some(name);
        let own = is_own_output(name) || self.single.as_ref().is_some_and(|p| p.ends_with(name));
        if !plain || name.starts_with('.') || own {
            return Err(Error::invalid(
                "side file name",
                format!("`{name}` is not a plain file name beside the checkpoint"),
            ));
        }
        let mut staged = self
            .staged
            .lock()
            .map_err(|_| Error::invalid("side file", "a writer thread panicked"))?;
        if staged.iter().any(|s| s.name == name) {
            return Err(Error::invalid(
                "side file name",
                format!("`{name}` given twice"),
            ));
        }
        let tmp = atomic::stage(&self.dir, name, contents)?;
        staged.push(Staged {
            name: name.to_string(),
            tmp,
        });
        Ok(())
    }

    /// Checks that every element of every tensor was written, completes and fsyncs every
    /// file, and puts them in place (shards and side files, then the index of a sharded
    /// checkpoint, fsyncing the directory); then removes the files of a previous result
    /// that the new one does not reuse. Returns the files written (shards, then the index).
    ///
    /// ```
    /// # use modelfusion::io::{CheckpointWriter, Dtype, SaveOptions};
    /// # let dir = std::env::temp_dir().join("modelfusion-doc-writer-finish");
    /// let w = CheckpointWriter::create(&dir, [("a", vec![2])], &SaveOptions::new(Dtype::F32))?;
    /// w.write(0, 0, &[1.0f32])?;
    /// let err = w.finish().unwrap_err(); // element 1 never written
    /// assert!(err.to_string().contains("`a`"));
    /// assert!(!dir.join("model.safetensors").exists()); // cleaned up
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        for t in &self.tensors {
            let w = t.written.load(Ordering::Relaxed);
            if w != t.numel {
                return Err(Error::invalid(
                    "tensor data",
                    format!("tensor `{}` got {w} of its {} elements", t.name, t.numel),
                ));
            }
        }
        for s in &self.shards {
            write_at(&s.file, &s.header_len.to_le_bytes(), 0)
                .and_then(|()| s.file.sync_all())
                .map_err(|e| io_err(&s.tmp, e))?;
        }
        let mut files: Vec<PathBuf> = self.shards.iter().map(|s| s.path.clone()).collect();
        if self.shards.len() > 1 {
            let total: u64 = self
                .tensors
                .iter()
                .map(|t| (t.numel * t.dtype.size()) as u64)
                .sum();
            let weight_map: Map<String, Value> = self
                .tensors
                .iter()
                .map(|t| {
                    (
                        t.name.clone(),
                        Value::String(shard_name(t.shard, self.shards.len())),
                    )
                })
                .collect();
            let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let text = serde_json::to_string_pretty(&index)
                .map_err(|e| Error::invalid("index", e.to_string()))?;
            self.index_tmp = Some(atomic::stage(
                &self.dir,
                INDEX_FILE,
                (text + "\n").as_bytes(),
            )?);
            files.push(self.dir.join(INDEX_FILE));
        }
        self.commit()?;
        self.finished = true;
        Ok(files)
    }

    /// Puts the completed, fsynced temporaries in place so that the directory loads,
    /// at every moment, either the previous result or the new one, complete.
    fn commit(&mut self) -> Result<()> {
        let dir = self.dir.clone();
        let staged = std::mem::take(
            &mut *self
                .staged
                .lock()
                .map_err(|_| Error::invalid("side file", "a writer thread panicked"))?,
        );
        if self.single.is_some() {
            for s in &staged {
                atomic::rename(&s.tmp, &dir.join(&s.name))?;
            }
            for s in &self.shards {
                atomic::rename(&s.tmp, &s.path)?;
            }
            return atomic::sync_dir(&dir);
        }
        let new_names: Vec<String> = (0..self.shards.len())
            .map(|i| shard_name(i, self.shards.len()))
            .collect();
        // A previous sharded result keeps loading until the new index (or, for a single
        // new file, the old index's removal) switches over. Where the new shards reuse
        // its file names, it is first pointed at backup links of those files.
        let old = old_index(&dir);
        let had_index = std::fs::symlink_metadata(dir.join(INDEX_FILE)).is_ok();
        if let Some((mut value, old_files)) = old {
            let clash: Vec<&String> = old_files.iter().filter(|f| new_names.contains(f)).collect();
            if !clash.is_empty() && self.redirect_old(&mut value, &clash).is_err() {
                // No links possible: the old result stops loading before it is touched.
                let p = dir.join(INDEX_FILE);
                std::fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
                atomic::sync_dir(&dir)?;
            }
        }
        for s in &staged {
            atomic::rename(&s.tmp, &dir.join(&s.name))?;
        }
        for s in &self.shards {
            atomic::rename(&s.tmp, &s.path)?;
        }
        atomic::sync_dir(&dir)?;
        let index = dir.join(INDEX_FILE);
        match self.index_tmp.take() {
            Some(tmp) => atomic::rename(&tmp, &index)?,
            None if had_index => match std::fs::remove_file(&index) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_err(&index, e));
                }
                _ => {}
            },
            None => {}
        }
        atomic::sync_dir(&dir)?;
        // The new result is in place: remove what is left of the previous one.
        let keep: HashSet<&str> = new_names
            .iter()
            .map(String::as_str)
            .chain(self.index_tmp_name())
            .collect();
        for entry in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
            let entry = entry.map_err(|e| io_err(&dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stale = (is_own_output(name) && !keep.contains(name))
                || name.starts_with(atomic::OLD_PREFIX);
            if stale {
                let p = entry.path();
                match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io_err(&p, e));
                    }
                    _ => {}
                }
            }
        }
        atomic::sync_dir(&dir)
    }

    /// The index's name when the new result has one.
    fn index_tmp_name(&self) -> Option<&'static str> {
        (self.shards.len() > 1).then_some(INDEX_FILE)
    }

    /// Points the previous result's index at backup links of the files in `clash`, so
    /// that it keeps loading while the new files take those names.
    fn redirect_old(&self, index: &mut Value, clash: &[&String]) -> Result<()> {
        let mut renamed = HashMap::new();
        for &name in clash {
            let from = self.dir.join(name);
            let to = atomic::backup_path(&self.dir, name);
            std::fs::hard_link(&from, &to).map_err(|e| io_err(&to, e))?;
            let file = to
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
                .ok_or_else(|| Error::invalid("backup", to.display().to_string()))?;
            renamed.insert(name.clone(), file);
        }
        if let Some(map) = index.get_mut("weight_map").and_then(Value::as_object_mut) {
            for f in map.values_mut() {
                if let Some(new) = f.as_str().and_then(|s| renamed.get(s)) {
                    *f = Value::String(new.clone());
                }
            }
        }
        let text = serde_json::to_string_pretty(index)
            .map_err(|e| Error::invalid("index", e.to_string()))?;
        atomic::write_file(&self.dir.join(INDEX_FILE), text.as_bytes())
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.finished {
            for s in &self.shards {
                let _ = std::fs::remove_file(&s.tmp);
            }
            if let Ok(staged) = self.staged.get_mut() {
                for s in staged.iter() {
                    let _ = std::fs::remove_file(&s.tmp);
                }
            }
            if let Some(tmp) = &self.index_tmp {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

/// The elements of `a` in row-major order, borrowed when already contiguous.
pub(crate) fn flat<T: Copy>(a: &ArrayD<T>) -> std::borrow::Cow<'_, [T]> {
    match a.as_slice() {
        Some(s) => s.into(),
        None => a.iter().copied().collect::<Vec<_>>().into(),
    }
}

fn save_with<T: IoScalar>(
    sd: &StateDict<ArrayD<T>>,
    writer: CheckpointWriter,
) -> Result<Vec<PathBuf>> {
    for (i, (_, t)) in sd.iter().enumerate() {
        writer.write(i, 0, &flat(t))?;
    }
    for (j, (_, r)) in sd.raw_tensors().enumerate() {
        writer.write_raw(sd.len() + j, r)?;
    }
    writer.finish()
}

/// The float parameters (in the output dtype), then the raw tensors (in their own).
fn plan_of<T: IoScalar>(sd: &StateDict<ArrayD<T>>) -> Vec<TensorPlan> {
    sd.iter()
        .map(|(n, t)| (n, Tensor::shape(t).to_vec()).into())
        .chain(
            sd.raw_tensors()
                .map(|(n, r)| (n, r.shape().to_vec(), r.dtype()).into()),
        )
        .collect()
}

/// Saves a state dict into the directory `dir` as a Hugging Face style checkpoint (one
/// `model.safetensors`, or shards plus an index when `options.max_shard_size` splits it),
/// in the state dict's order. Returns the files written.
///
/// ```
/// use modelfusion::StateDict;
/// use modelfusion::io::{save, Dtype, SaveOptions};
/// use ndarray::arr1;
///
/// let dir = std::env::temp_dir().join("modelfusion-doc-save");
/// let sd = StateDict::from_pairs([("a", arr1(&[1.0f32; 4]).into_dyn()), ("b", arr1(&[1.0f32; 4]).into_dyn())])?;
/// let files = save(&sd, &dir, &SaveOptions::new(Dtype::F32).with_max_shard_size(16))?;
/// assert_eq!(files.len(), 3); // two shards and the index
/// assert!(dir.join("model.safetensors.index.json").exists());
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn save<T: IoScalar>(
    sd: &StateDict<ArrayD<T>>,
    dir: impl AsRef<Path>,
    options: &SaveOptions,
) -> Result<Vec<PathBuf>> {
    let writer = CheckpointWriter::create(dir, plan_of(sd), options)?;
    save_with(sd, writer)
}

/// Saves a state dict as the single file `path` with elements of `dtype`.
///
/// ```
/// use modelfusion::StateDict;
/// use modelfusion::io::{load, save_file, Dtype};
/// use ndarray::{arr1, ArrayD};
///
/// let path = std::env::temp_dir().join("modelfusion-doc-save-file.safetensors");
/// let sd = StateDict::from_pairs([("w", arr1(&[0.1f32, 0.2]).into_dyn())])?;
/// save_file(&sd, &path, Dtype::F32)?;
/// let back: StateDict<ArrayD<f32>> = load(&path)?;
/// assert_eq!(back, sd);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn save_file<T: IoScalar>(
    sd: &StateDict<ArrayD<T>>,
    path: impl AsRef<Path>,
    dtype: Dtype,
) -> Result<PathBuf> {
    let path = path.as_ref();
    let writer = CheckpointWriter::create_file(path, plan_of(sd), &SaveOptions::new(dtype))?;
    save_with(sd, writer)?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_plan_splits_greedily() {
        assert_eq!(plan_shards(&[4, 4, 4], Some(8)), [0, 0, 1]);
        assert_eq!(plan_shards(&[10, 1, 1], Some(8)), [0, 1, 1]);
        assert_eq!(plan_shards(&[1, 10, 1], Some(8)), [0, 1, 2]);
        assert_eq!(plan_shards(&[1, 10, 1], None), [0, 0, 0]);
        assert_eq!(plan_shards(&[], Some(8)), Vec::<usize>::new());
    }

    #[test]
    fn own_output_names() {
        assert!(is_own_output("model-00001-of-00003.safetensors"));
        assert!(is_own_output("model.safetensors"));
        assert!(is_own_output("model.safetensors.index.json"));
        assert!(!is_own_output("model-0001-of-0003.safetensors"));
        assert!(!is_own_output("config.json"));
        assert!(!is_own_output("model-00001-of-00003.safetensors.bak"));
    }

    #[test]
    fn header_is_padded_to_eight() {
        let h = header_bytes(&[("a", &[1], Dtype::F32, 0, 4)], &BTreeMap::new());
        assert_eq!((h.len() - 8) % 8, 0);
        assert_eq!(
            u64::from_le_bytes(h[..8].try_into().unwrap()) as usize,
            h.len() - 8
        );
    }
}
