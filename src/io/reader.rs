//! Lazy, memory-mapped reading of single-file and sharded safetensors checkpoints.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use super::dtype::{IoScalar, decode};
use super::guard::{open_regular, read_capped};
use super::header::{Header, INDEX_FILE, ShardIndex, TensorInfo, format_err};
use crate::dtype::RawTensor;
use crate::error::{Error, Result};
use crate::model::StateDict;

/// The single-file name a checkpoint directory without an index holds.
///
/// ```
/// assert_eq!(modelfusion::io::SINGLE_FILE, "model.safetensors");
/// ```
pub const SINGLE_FILE: &str = "model.safetensors";

/// Elements per piece when reading a large tensor in parallel.
const READ_PIECE: usize = 1 << 18;
/// Elements decoded per positioned read when the stored dtype differs from `T`.
const DECODE_PIECE: usize = 1 << 16;

thread_local! {
    static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_read(file, buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

struct Shard {
    path: PathBuf,
    file: File,
    map: Mmap,
    data_start: usize,
}

/// An opened checkpoint: one `.safetensors` file or a sharded directory, memory-mapped.
///
/// Opening reads and validates only the headers (and the index of a sharded directory);
/// tensor data is read on demand, one tensor (or a range of one) at a time, straight
/// from the memory map into the requested float type. This is what the streaming merge
/// ([`merge_checkpoints`](super::merge_checkpoints)) runs on.
///
/// The files must not be modified while the checkpoint is open (a memory map reflects
/// changes made by other processes).
///
/// ```
/// use modelfusion::StateDict;
/// use modelfusion::io::{save, Checkpoint, Dtype, SaveOptions};
/// use ndarray::arr2;
///
/// let dir = std::env::temp_dir().join("modelfusion-doc-checkpoint");
/// let sd = StateDict::from_pairs([("w", arr2(&[[1.0f32, 2.0], [3.0, 4.0]]).into_dyn())])?;
/// save(&sd, &dir, &SaveOptions::new(Dtype::BF16))?;
///
/// let ck = Checkpoint::open(&dir)?;
/// let info = ck.info("w").unwrap();
/// assert_eq!((info.dtype(), info.shape()), (Dtype::BF16, &[2usize, 2][..]));
/// let w = ck.read::<f64>("w")?;
/// assert_eq!(w[[1, 0]], 3.0);
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub struct Checkpoint {
    root: PathBuf,
    shards: Vec<Shard>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("root", &self.root)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn map_file(path: &Path) -> Result<(Shard, Header)> {
    let (file, len) = open_regular(path, "checkpoint file")?;
    if len < 8 {
        return Err(format_err(
            Some(path),
            format!("file is {len} bytes, shorter than the 8-byte header length"),
        ));
    }
    // SAFETY: the map is read-only; the documented contract of `Checkpoint` is that the
    // file is not modified while open. A concurrent truncation could fault (as for any
    // memory-mapped reader), which is outside what safe code can rule out.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
    let header = Header::parse(&map, Some(path))?;
    let data_start = header.data_start;
    let shard = Shard {
        path: path.to_path_buf(),
        file,
        map,
        data_start,
    };
    Ok((shard, header))
}

impl Checkpoint {
    /// Opens a checkpoint: a `.safetensors` file, or a directory holding either
    /// `model.safetensors.index.json` (sharded), `model.safetensors`, or exactly one
    /// `*.safetensors` file.
    ///
    /// Every header is validated (see [`Header::parse`]); for a sharded directory, the
    /// index and the shard headers must list the same tensors, each in the file the index
    /// names, and no tensor may appear in two shards.
    ///
    /// ```
    /// use modelfusion::io::Checkpoint;
    /// let err = Checkpoint::open("/nonexistent/model.safetensors").unwrap_err();
    /// assert!(err.to_string().contains("/nonexistent/model.safetensors"));
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
        if !meta.is_dir() {
            return Self::from_files(path, &[path.to_path_buf()], None);
        }
        // Anything at the index's (or the single file's) path is read, so that a
        // directory, device or FIFO there is an error rather than silently skipped.
        let index_path = path.join(INDEX_FILE);
        let found = || -> Result<Vec<PathBuf>> {
            let mut found = Vec::new();
            for entry in std::fs::read_dir(path).map_err(|e| io_err(path, e))? {
                let p = entry.map_err(|e| io_err(path, e))?.path();
                if p.extension().is_some_and(|e| e == "safetensors") && p.is_file() {
                    found.push(p);
                }
            }
            Ok(found)
        };
        if std::fs::symlink_metadata(&index_path).is_ok() {
            let bytes = read_capped(
                &index_path,
                super::header::MAX_INDEX_SIZE,
                "checkpoint index",
            )?;
            let index = ShardIndex::parse(&bytes, Some(&index_path))?;
            if index.is_empty() {
                let shards = found()?;
                if !shards.is_empty() {
                    return Err(format_err(
                        Some(&index_path),
                        format!(
                            "the index lists no tensors but the directory holds {} *.safetensors file(s)",
                            shards.len()
                        ),
                    ));
                }
            }
            let files: Vec<PathBuf> = index.files().iter().map(|f| path.join(f)).collect();
            return Self::from_files(path, &files, Some((&index, &index_path)));
        }
        let single = path.join(SINGLE_FILE);
        if std::fs::symlink_metadata(&single).is_ok() {
            return Self::from_files(path, &[single], None);
        }
        let found = found()?;
        match found.as_slice() {
            [one] => Self::from_files(path, std::slice::from_ref(one), None),
            [] => Err(format_err(
                Some(path),
                format!("directory holds neither {INDEX_FILE} nor any *.safetensors file"),
            )),
            _ => Err(format_err(
                Some(path),
                format!(
                    "directory holds {} *.safetensors files but no {INDEX_FILE} saying how they form one checkpoint",
                    found.len()
                ),
            )),
        }
    }

    fn from_files(
        root: &Path,
        files: &[PathBuf],
        index: Option<(&ShardIndex, &Path)>,
    ) -> Result<Checkpoint> {
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        let mut metadata = BTreeMap::new();
        for (si, f) in files.iter().enumerate() {
            let (shard, header) = map_file(f)?;
            for mut t in header.tensors {
                if let Some((idx, ipath)) = index {
                    match idx.shard_of(&t.name) {
                        Some(s) if s == si => {}
                        Some(s) => {
                            return Err(format_err(
                                Some(ipath),
                                format!(
                                    "tensor `{}` is in {} but the index places it in {}",
                                    t.name,
                                    f.display(),
                                    idx.files()[s]
                                ),
                            ));
                        }
                        None => {
                            return Err(format_err(
                                Some(ipath),
                                format!(
                                    "tensor `{}` of {} is missing from the index",
                                    t.name,
                                    f.display()
                                ),
                            ));
                        }
                    }
                }
                t.shard = si;
                if by_name.insert(t.name.clone(), tensors.len()).is_some() {
                    return Err(format_err(
                        Some(f),
                        format!("tensor `{}` appears in more than one shard", t.name),
                    ));
                }
                tensors.push(t);
            }
            if si == 0 {
                metadata = header.metadata;
            }
            shards.push(shard);
        }
        if let Some((idx, ipath)) = index
            && let Some((name, file)) = idx.iter().find(|(n, _)| !by_name.contains_key(*n))
        {
            return Err(format_err(
                Some(ipath),
                format!("the index places tensor `{name}` in {file}, which does not hold it"),
            ));
        }
        Ok(Checkpoint {
            root: root.to_path_buf(),
            shards,
            tensors,
            by_name,
            metadata,
        })
    }

    /// The path it was opened from.
    ///
    /// ```
    /// # use modelfusion::{StateDict, io::{save_file, Checkpoint, Dtype}};
    /// # let p = std::env::temp_dir().join("modelfusion-doc-path.safetensors");
    /// # save_file(&StateDict::<ndarray::ArrayD<f32>>::new(), &p, Dtype::F32)?;
    /// assert_eq!(Checkpoint::open(&p)?.path(), p.as_path());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The files it consists of (one for a single-file checkpoint).
    ///
    /// ```
    /// # use modelfusion::{StateDict, io::{save_file, Checkpoint, Dtype}};
    /// # let p = std::env::temp_dir().join("modelfusion-doc-files.safetensors");
    /// # save_file(&StateDict::<ndarray::ArrayD<f32>>::new(), &p, Dtype::F32)?;
    /// assert_eq!(Checkpoint::open(&p)?.files().count(), 1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// The tensors, shard by shard in file order.
    ///
    /// ```
    /// # use modelfusion::{StateDict, io::{save_file, Checkpoint, Dtype}};
    /// # let p = std::env::temp_dir().join("modelfusion-doc-tensors.safetensors");
    /// let sd = StateDict::from_pairs([("b", ndarray::arr1(&[1.0f32]).into_dyn()), ("a", ndarray::arr1(&[2.0f32]).into_dyn())])?;
    /// save_file(&sd, &p, Dtype::F32)?;
    /// let names: Vec<_> = Checkpoint::open(&p)?.tensors().iter().map(|t| t.name().to_string()).collect();
    /// assert_eq!(names, ["b", "a"]); // saving keeps the state dict's order
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Number of tensors.
    ///
    /// ```
    /// # use modelfusion::{StateDict, io::{save_file, Checkpoint, Dtype}};
    /// # let p = std::env::temp_dir().join("modelfusion-doc-len.safetensors");
    /// # save_file(&StateDict::<ndarray::ArrayD<f32>>::new(), &p, Dtype::F32)?;
    /// let ck = Checkpoint::open(&p)?;
    /// assert_eq!(ck.len(), 0);
    /// assert!(ck.is_empty());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when it holds no tensor.
    ///
    /// See [`Checkpoint::len`].
    ///
    /// ```
    /// # use modelfusion::{StateDict, io::{save_file, Checkpoint, Dtype}};
    /// # let p = std::env::temp_dir().join("modelfusion-doc-empty.safetensors");
    /// # save_file(&StateDict::<ndarray::ArrayD<f32>>::new(), &p, Dtype::F32)?;
    /// assert!(Checkpoint::open(&p)?.is_empty());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The header entry of `name`.
    ///
    /// ```
    /// # use modelfusion::{StateDict, io::{save_file, Checkpoint, Dtype}};
    /// # let p = std::env::temp_dir().join("modelfusion-doc-info.safetensors");
    /// # save_file(&StateDict::<ndarray::ArrayD<f32>>::new(), &p, Dtype::F32)?;
    /// assert!(Checkpoint::open(&p)?.info("nope").is_none());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The `__metadata__` map of the first file.
    ///
    /// ```
    /// # use modelfusion::{StateDict, io::{save_file, Checkpoint, Dtype}};
    /// # let p = std::env::temp_dir().join("modelfusion-doc-meta.safetensors");
    /// # save_file(&StateDict::<ndarray::ArrayD<f32>>::new(), &p, Dtype::F32)?;
    /// assert_eq!(Checkpoint::open(&p)?.metadata().get("format").map(String::as_str), Some("pt"));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn require(&self, name: &str) -> Result<&TensorInfo> {
        self.info(name).ok_or_else(|| Error::MissingParam {
            name: name.to_string(),
            context: format!("checkpoint {}", self.root.display()),
        })
    }

    /// The entry of `name`, which must be a float tensor.
    fn require_float(&self, name: &str) -> Result<&TensorInfo> {
        let t = self.require(name)?;
        if !t.dtype.is_float() {
            return Err(Error::invalid(
                "tensor",
                format!(
                    "tensor `{name}` of {} is {} (not a float type): read it with `Checkpoint::read_raw`",
                    self.root.display(),
                    t.dtype
                ),
            ));
        }
        Ok(t)
    }

    /// Reads tensor `name` of any dtype as a [`RawTensor`] (bytes copied unchanged).
    ///
    /// ```
    /// # use modelfusion::{Dtype, RawTensor, StateDict, io::{save_file, Checkpoint}};
    /// # let p = std::env::temp_dir().join("modelfusion-doc-read-raw.safetensors");
    /// let mut sd: StateDict<ndarray::ArrayD<f32>> = StateDict::new();
    /// sd.insert_raw("steps", RawTensor::new(Dtype::I64, vec![], 9i64.to_le_bytes().to_vec())?)?;
    /// save_file(&sd, &p, Dtype::F32)?;
    /// let ck = Checkpoint::open(&p)?;
    /// assert_eq!(ck.read_raw("steps")?.bytes(), &9i64.to_le_bytes());
    /// assert!(ck.read::<f32>("steps").is_err()); // not a float tensor
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn read_raw(&self, name: &str) -> Result<RawTensor> {
        let t = self.require(name)?;
        RawTensor::new(
            t.dtype,
            t.shape.clone(),
            self.bytes_of(t, 0, t.numel()).to_vec(),
        )
    }

    /// The stored bytes of `name` (little-endian elements of its dtype), borrowed from
    /// the memory map.
    ///
    /// ```
    /// # use modelfusion::{StateDict, io::{save_file, Checkpoint, Dtype}};
    /// # let p = std::env::temp_dir().join("modelfusion-doc-raw.safetensors");
    /// let sd = StateDict::from_pairs([("w", ndarray::arr1(&[1.0f32]).into_dyn())])?;
    /// save_file(&sd, &p, Dtype::F16)?;
    /// assert_eq!(Checkpoint::open(&p)?.raw("w")?, &[0x00, 0x3c]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn raw(&self, name: &str) -> Result<&[u8]> {
        let t = self.require(name)?;
        Ok(self.bytes_of(t, 0, t.numel()))
    }

    fn bytes_of(&self, t: &TensorInfo, start: usize, len: usize) -> &[u8] {
        let s = &self.shards[t.shard];
        let size = t.dtype.size();
        let b = s.data_start + t.begin + start * size;
        &s.map[b..b + len * size]
    }

    /// Reads the whole tensor `name`, converted to `T`.
    ///
    /// ```
    /// # use modelfusion::{StateDict, io::{save_file, Checkpoint, Dtype}};
    /// # let p = std::env::temp_dir().join("modelfusion-doc-read.safetensors");
    /// let sd = StateDict::from_pairs([("w", ndarray::arr1(&[0.1f64, 2.0]).into_dyn())])?;
    /// save_file(&sd, &p, Dtype::F64)?;
    /// let w = Checkpoint::open(&p)?.read::<f64>("w")?;
    /// assert_eq!(w.as_slice().unwrap(), &[0.1, 2.0]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn read<T: IoScalar>(&self, name: &str) -> Result<ArrayD<T>> {
        let t = self.require_float(name)?;
        let mut data = vec![T::zero(); t.numel()];
        self.read_range(t, 0, &mut data)?;
        ArrayD::from_shape_vec(IxDyn(&t.shape), data)
            .map_err(|e| Error::invalid("shape", e.to_string()))
    }

    /// Reads elements `start..start + out.len()` of `name` (row-major) into `out`.
    ///
    /// Data is read with positioned reads (`pread`), not through the memory map, so a
    /// streaming reader's resident memory is only its own buffers.
    ///
    /// ```
    /// # use modelfusion::{StateDict, io::{save_file, Checkpoint, Dtype}};
    /// # let p = std::env::temp_dir().join("modelfusion-doc-read-into.safetensors");
    /// let sd = StateDict::from_pairs([("w", ndarray::arr1(&[1.0f32, 2.0, 3.0]).into_dyn())])?;
    /// save_file(&sd, &p, Dtype::BF16)?;
    /// let ck = Checkpoint::open(&p)?;
    /// let mut out = [0f32; 2];
    /// ck.read_into("w", 1, &mut out)?;
    /// assert_eq!(out, [2.0, 3.0]);
    /// assert!(ck.read_into("w", 2, &mut out).is_err()); // past the end
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn read_into<T: IoScalar>(&self, name: &str, start: usize, out: &mut [T]) -> Result<()> {
        let t = self.require_float(name)?;
        let n = t.numel();
        if start.checked_add(out.len()).is_none_or(|e| e > n) {
            return Err(Error::invalid(
                "start",
                format!(
                    "range {start}..{} is outside tensor `{name}` of {n} elements",
                    start.saturating_add(out.len())
                ),
            ));
        }
        self.read_range(t, start, out)
    }

    /// Reads a checked element range of `t`, in parallel pieces when it is large.
    fn read_range<T: IoScalar>(&self, t: &TensorInfo, start: usize, out: &mut [T]) -> Result<()> {
        if out.len() < 2 * READ_PIECE {
            return self.read_piece(t, start, out);
        }
        out.par_chunks_mut(READ_PIECE)
            .enumerate()
            .try_for_each(|(j, piece)| self.read_piece(t, start + j * READ_PIECE, piece))
    }

    /// Reads a checked element range of `t`: straight into `out` when the stored layout
    /// is `T`'s, else through a per-thread byte buffer and [`decode`].
    fn read_piece<T: IoScalar>(&self, t: &TensorInfo, start: usize, out: &mut [T]) -> Result<()> {
        let s = &self.shards[t.shard];
        let size = t.dtype.size();
        let off = (s.data_start + t.begin + start * size) as u64;
        let io = |e| io_err(&s.path, e);
        if let Some(dst) = T::as_bytes_of_mut(out, t.dtype) {
            return read_at(&s.file, dst, off).map_err(io);
        }
        BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            let mut done = 0;
            while done < out.len() {
                let n = (out.len() - done).min(DECODE_PIECE);
                buf.resize(n * size, 0);
                read_at(&s.file, &mut buf, off + (done * size) as u64).map_err(io)?;
                decode(t.dtype, &buf, &mut out[done..done + n])?;
                done += n;
            }
            Ok(())
        })
    }

    /// Reads every tensor into a [`StateDict`], in [`Checkpoint::tensors`] order: float
    /// tensors converted to `T`, every other dtype (e.g. `I64` `num_batches_tracked`) as
    /// a [`RawTensor`], bit for bit.
    ///
    /// ```
    /// # use modelfusion::{Model, StateDict, io::{save_file, Checkpoint, Dtype}};
    /// # let p = std::env::temp_dir().join("modelfusion-doc-to-sd.safetensors");
    /// let sd = StateDict::from_pairs([("w", ndarray::arr1(&[1.0f32]).into_dyn())])?;
    /// save_file(&sd, &p, Dtype::F32)?;
    /// assert_eq!(Checkpoint::open(&p)?.to_state_dict::<f32>()?, sd);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn to_state_dict<T: IoScalar>(&self) -> Result<StateDict<ArrayD<T>>> {
        let mut sd = StateDict::new();
        for t in &self.tensors {
            if t.dtype.is_float() {
                sd.insert(t.name.clone(), self.read::<T>(&t.name)?)?;
            } else {
                sd.insert_raw(t.name.clone(), self.read_raw(&t.name)?)?;
            }
        }
        Ok(sd)
    }
}

/// Reads a whole (small) file, refusing anything above the index size limit.
/// Loads a checkpoint (a `.safetensors` file or a sharded directory, see
/// [`Checkpoint::open`]) into a [`StateDict`] of `T` (`f32` or `f64`), converting from
/// whatever float type each tensor is stored in; non-float tensors are kept as
/// [`RawTensor`]s (see [`Checkpoint::to_state_dict`]).
///
/// ```
/// use modelfusion::{Model, StateDict};
/// use modelfusion::io::{load, save, Dtype, SaveOptions};
/// use ndarray::{arr1, ArrayD};
///
/// let dir = std::env::temp_dir().join("modelfusion-doc-load");
/// let sd = StateDict::from_pairs([("a", arr1(&[1.5f32; 4]).into_dyn()), ("b", arr1(&[2.0f32; 4]).into_dyn())])?;
/// save(&sd, &dir, &SaveOptions::new(Dtype::F16).with_max_shard_size(8))?; // two shards
/// let back: StateDict<ArrayD<f32>> = load(&dir)?;
/// assert_eq!(back, sd);
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn load<T: IoScalar>(path: impl AsRef<Path>) -> Result<StateDict<ArrayD<T>>> {
    Checkpoint::open(path)?.to_state_dict()
}
