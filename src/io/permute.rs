//! Checkpoint-level alignment: the spec of a checkpoint on disk, a permuted copy written
//! tensor by tensor in each tensor's own dtype, and the files that travel beside the
//! weights (config, tokenizer).

use std::path::{Path, PathBuf};

use super::atomic;
use super::guard::read_capped;
use super::reader::{Checkpoint, io_err};
use super::stream::report_tensor;
use super::writer::{CheckpointWriter, SaveOptions, TensorPlan};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::perm::infer::{Inferred, infer_spec};
use crate::perm::{PermutationSet, PermutationSpec};
use crate::progress::{Observer, Progress};

/// Files copied from a checkpoint's directory next to a merged or aligned one, when
/// present.
///
/// ```
/// assert!(modelfusion::io::SIDE_FILES.contains(&"tokenizer.json"));
/// ```
pub const SIDE_FILES: [&str; 10] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

/// Largest `config.json` read for spec inference.
const MAX_CONFIG: u64 = 16 << 20;

/// The `config.json` beside a checkpoint (in its directory, or beside its file), if any.
///
/// ```
/// use modelfusion::{StateDict, io::{save_file, Checkpoint, Dtype, config_of}};
/// let dir = std::env::temp_dir().join("modelfusion-doc-config-of");
/// std::fs::create_dir_all(&dir).unwrap();
/// let p = dir.join("model.safetensors");
/// save_file(&StateDict::<ndarray::ArrayD<f32>>::new(), &p, Dtype::F32)?;
/// std::fs::write(dir.join("config.json"), r#"{"hidden_size": 8}"#).unwrap();
/// assert_eq!(config_of(&Checkpoint::open(&p)?)?.unwrap()["hidden_size"], 8);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn config_of(ck: &Checkpoint) -> Result<Option<serde_json::Value>> {
    let dir = if ck.path().is_dir() {
        ck.path().to_path_buf()
    } else {
        ck.path().parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let p = dir.join("config.json");
    let Ok(meta) = std::fs::metadata(&p) else {
        return Ok(None);
    };
    if !meta.is_file() || meta.len() > MAX_CONFIG {
        return Err(Error::invalid(
            "config.json",
            format!(
                "{} is not a regular file of at most {MAX_CONFIG} bytes",
                p.display()
            ),
        ));
    }
    let text = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Format {
            format: "JSON",
            path: Some(p),
            reason: e.to_string(),
        })
}

/// Where a checkpoint's permutation spec comes from: inferred from its tensors and
/// `config.json`, or read from a spec file. Parses from `auto` or a path.
///
/// ```
/// use modelfusion::io::SpecSource;
/// assert_eq!("auto".parse::<SpecSource>()?, SpecSource::Auto);
/// assert_eq!("spec.json".parse::<SpecSource>()?, SpecSource::File("spec.json".into()));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SpecSource {
    /// Inferred by [`infer_checkpoint_spec`].
    #[default]
    Auto,
    /// A spec file ([`PermutationSpec::load`]).
    File(PathBuf),
}

impl std::str::FromStr for SpecSource {
    type Err = Error;

    fn from_str(s: &str) -> Result<SpecSource> {
        match s.trim() {
            "" => Err(Error::invalid(
                "spec",
                "empty; expected `auto` or the path of a spec file",
            )),
            "auto" => Ok(SpecSource::Auto),
            _ => Ok(SpecSource::File(PathBuf::from(s))),
        }
    }
}

impl std::fmt::Display for SpecSource {
    /// `auto`, or the spec file's path.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpecSource::Auto => f.write_str("auto"),
            SpecSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl SpecSource {
    /// The spec for `ck`, with where it came from (`torchvision-resnet (why)` or
    /// `spec file PATH`).
    ///
    /// ```
    /// use modelfusion::io::{save_file, Checkpoint, Dtype, SpecSource};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// let p = std::env::temp_dir().join("modelfusion-doc-spec-source.safetensors");
    /// save_file(&MlpShapes::new(&[3, 4, 2])?.random_model(0), &p, Dtype::F32)?;
    /// let (spec, origin) = SpecSource::Auto.resolve(&Checkpoint::open(&p)?)?;
    /// assert_eq!(spec.num_groups(), 1);
    /// assert!(origin.contains("mlp"), "{origin}");
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn resolve(&self, ck: &Checkpoint) -> Result<(PermutationSpec, String)> {
        match self {
            SpecSource::Auto => {
                let found = infer_checkpoint_spec(ck)?;
                Ok((found.spec, format!("{} ({})", found.family, found.reason)))
            }
            SpecSource::File(path) => Ok((
                PermutationSpec::load(path)?,
                format!("spec file {}", path.display()),
            )),
        }
    }
}

/// Infers the spec of a checkpoint on disk from its float tensors' names and shapes and
/// its `config.json` (see [`crate::perm::infer`]); reads no tensor data.
pub fn infer_checkpoint_spec(ck: &Checkpoint) -> Result<Inferred> {
    let config = config_of(ck)?;
    infer_spec(
        ck.tensors()
            .iter()
            .filter(|t| t.dtype().is_float())
            .map(|t| (t.name(), t.shape())),
        config.as_ref(),
    )
}

/// What [`write_permuted`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PermutedSummary {
    /// Tensors written.
    pub tensors: usize,
    /// Tensors whose bytes a permutation moved.
    pub permuted: usize,
    /// Files written (shards, then the index if sharded).
    pub files: Vec<PathBuf>,
}

/// Writes `ck` with `perms` applied through `spec` into `out` (a directory, or a single
/// `.safetensors` file when `out` ends so), one tensor at a time. Every tensor keeps its
/// stored dtype and is moved byte for byte (a permutation converts nothing, so the result
/// is exact in F16, BF16 or any other dtype); tensors the spec does not mention, integer
/// buffers among them, are copied unchanged; the header metadata is kept.
/// `max_shard_size` shards a directory output. The spec must be sound for the
/// checkpoint's shapes and `perms` must hold exactly its groups.
pub fn write_permuted(
    ck: &Checkpoint,
    spec: &PermutationSpec,
    perms: &PermutationSet,
    out: &Path,
    max_shard_size: Option<u64>,
    mut observer: impl Observer,
) -> Result<PermutedSummary> {
    for (g, members) in spec.groups() {
        let p = perms.get(g).ok_or_else(|| Error::Spec {
            reason: format!("no permutation given for group `{g}`"),
        })?;
        for (param, axis) in members {
            let info = ck.info(param).ok_or_else(|| Error::Spec {
                reason: format!(
                    "group `{g}` names `{param}`, which {} does not hold",
                    ck.path().display()
                ),
            })?;
            let len = info.shape().get(*axis).copied().unwrap_or(0);
            let want = match spec.head_slot(param, *axis) {
                Some((slot, layout)) if p.len() == layout.units() => layout.slot_len(slot),
                Some(_) => usize::MAX,
                None => p.len() * spec.rule(param, *axis).repeat,
            };
            if len != want {
                return Err(Error::Spec {
                    reason: format!(
                        "permutation of group `{g}` (length {}) does not fit axis {axis} of `{param}` (shape {:?})",
                        p.len(),
                        info.shape()
                    ),
                });
            }
        }
    }
    if let Some((g, _)) = perms.iter().find(|(g, _)| spec.group(g).is_none()) {
        return Err(Error::Spec {
            reason: format!("a permutation is given for group `{g}`, which the spec does not have"),
        });
    }
    spec.check_structure(perms)?;
    let plan = ck.tensors().iter().map(|t| TensorPlan {
        name: t.name().to_string(),
        shape: t.shape().to_vec(),
        dtype: Some(t.dtype()),
    });
    let mut options = SaveOptions::new(Dtype::F32);
    options.metadata = ck.metadata().clone();
    options.max_shard_size = max_shard_size;
    let single = out.extension().is_some_and(|e| e == "safetensors");
    let writer = if single {
        CheckpointWriter::create_file(out, plan, &options)?
    } else {
        CheckpointWriter::create(out, plan, &options)?
    };
    let n = ck.len();
    let bytes_total: u64 = ck.tensors().iter().map(|t| t.byte_len() as u64).sum();
    let (mut permuted, mut bytes_done) = (0, 0u64);
    for (k, t) in ck.tensors().iter().enumerate() {
        let mut raw = ck.read_raw(t.name())?;
        for (axis, g) in spec.param_axes(t.name()) {
            if let Some(p) = perms.get(g) {
                raw = raw.take(axis, &spec.axis_indices(t.name(), axis, p))?;
            }
        }
        if spec.param_axes(t.name()).next().is_some() {
            permuted += 1;
        }
        writer.write_raw(k, &raw)?;
        bytes_done += t.byte_len() as u64;
        report_tensor(
            &mut observer,
            "permuted copy",
            out,
            Progress::Tensor {
                index: k,
                total: n,
                name: t.name(),
                bytes_done,
                bytes_total,
            },
        )?;
    }
    let files = writer.finish()?;
    Ok(PermutedSummary {
        tensors: n,
        permuted,
        files,
    })
}

/// Largest side file read (tokenizers are tens of megabytes at most).
const MAX_SIDE_FILE: u64 = 1 << 30;

/// The [`SIDE_FILES`] present in `from` (a checkpoint directory; none for a single file),
/// read into memory as `(name, contents)`, with `torch_dtype` in `config.json` set to
/// `dtype` when given. Each is read through [`read_capped`](crate::io::read_capped), so a
/// special file there is an error naming it.
///
/// ```
/// use modelfusion::io::{side_files, Dtype};
/// let dir = std::env::temp_dir().join("modelfusion-doc-side-files");
/// std::fs::create_dir_all(&dir).unwrap();
/// std::fs::write(dir.join("config.json"), r#"{"torch_dtype": "float32"}"#).unwrap();
/// let files = side_files(&dir, Some(Dtype::BF16))?;
/// assert_eq!(files[0].0, "config.json");
/// assert!(String::from_utf8_lossy(&files[0].1).contains("bfloat16"));
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn side_files(from: &Path, dtype: Option<Dtype>) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    if !from.is_dir() {
        return Ok(files);
    }
    for name in SIDE_FILES {
        let src = from.join(name);
        if !src.is_file() {
            continue;
        }
        let mut bytes = read_capped(&src, MAX_SIDE_FILE, name)?;
        if let (true, Some(d)) = (name == "config.json", dtype)
            && let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && let Some(obj) = v.as_object_mut()
        {
            obj.insert("torch_dtype".into(), d.torch_name().into());
            let s = serde_json::to_string_pretty(&v)
                .map_err(|e| Error::invalid("config.json", e.to_string()))?;
            bytes = (s + "\n").into_bytes();
        }
        files.push((name.to_string(), bytes));
    }
    Ok(files)
}

/// Copies the [`SIDE_FILES`] present in `from` (a checkpoint directory; nothing for a
/// single file) into `out` (a directory, or beside `out` when it is a `.safetensors`
/// file), setting `torch_dtype` in `config.json` to `dtype` when given. Returns the names
/// copied. Each file is replaced atomically (temporary file, fsync, rename): a link at
/// the destination is replaced, never written through, and a failure leaves the previous
/// file whole.
///
/// ```
/// use modelfusion::io::copy_side_files;
/// let from = std::env::temp_dir().join("modelfusion-doc-copy-side-from");
/// let out = std::env::temp_dir().join("modelfusion-doc-copy-side-out");
/// std::fs::create_dir_all(&from).unwrap();
/// std::fs::create_dir_all(&out).unwrap();
/// std::fs::write(from.join("tokenizer.json"), "{}").unwrap();
/// assert_eq!(copy_side_files(&from, &out, None)?, ["tokenizer.json"]);
/// assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), b"{}");
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn copy_side_files(from: &Path, out: &Path, dtype: Option<Dtype>) -> Result<Vec<String>> {
    let out_dir = if out.extension().is_some_and(|e| e == "safetensors") {
        atomic::dir_of(out).to_path_buf()
    } else {
        out.to_path_buf()
    };
    let mut copied = Vec::new();
    for (name, bytes) in side_files(from, dtype)? {
        atomic::write_file(&out_dir.join(&name), &bytes)?;
        copied.push(name);
    }
    Ok(copied)
}
