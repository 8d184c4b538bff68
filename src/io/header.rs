//! Validating parsers for the safetensors header and the sharded-checkpoint index.
//!
//! Nothing here trusts a declared size: the header length is checked against the file
//! length and a hard cap before anything is read, every offset against the data size,
//! every shape against its byte range (with overflow-checked arithmetic), and the tensors
//! must tile the data region exactly (no overlap, no gap), as the format requires.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use super::dtype::Dtype;
use crate::error::{Error, Result};

/// Largest header accepted, in bytes (the same cap as the reference implementation).
///
/// ```
/// assert_eq!(modelfusion::io::MAX_HEADER_SIZE, 100_000_000);
/// ```
pub const MAX_HEADER_SIZE: u64 = 100_000_000;
/// Largest index file (`model.safetensors.index.json`) accepted, in bytes.
///
/// ```
/// assert!(modelfusion::io::MAX_INDEX_SIZE >= 1 << 20);
/// ```
pub const MAX_INDEX_SIZE: u64 = 256 << 20;

/// The file name of a sharded checkpoint's index.
///
/// ```
/// assert_eq!(modelfusion::io::INDEX_FILE, "model.safetensors.index.json");
/// ```
pub const INDEX_FILE: &str = "model.safetensors.index.json";

pub(crate) fn format_err(path: Option<&Path>, reason: impl Into<String>) -> Error {
    Error::Format {
        format: "safetensors",
        path: path.map(Path::to_path_buf),
        reason: reason.into(),
    }
}

/// One tensor's entry in a safetensors header.
///
/// ```
/// use modelfusion::io::{Dtype, Header};
/// let json = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
/// let mut file = (json.len() as u64).to_le_bytes().to_vec();
/// file.extend_from_slice(json);
/// file.extend_from_slice(&[0u8; 8]);
/// let h = Header::parse(&file, None)?;
/// let t = &h.tensors()[0];
/// assert_eq!((t.name(), t.dtype(), t.shape()), ("w", Dtype::F32, &[2usize][..]));
/// assert_eq!(t.numel(), 2);
/// assert_eq!(t.byte_len(), 8);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub(crate) name: String,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    /// Byte offset relative to the start of the data region of its file.
    pub(crate) begin: usize,
    pub(crate) end: usize,
    /// Which file of a checkpoint holds it (0 for a single file).
    pub(crate) shard: usize,
}

impl TensorInfo {
    /// The tensor's name.
    ///
    /// ```
    /// # use modelfusion::io::Header;
    /// # let json = br#"{"w":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#;
    /// # let mut f = (json.len() as u64).to_le_bytes().to_vec(); f.extend_from_slice(json); f.extend_from_slice(&[0; 4]);
    /// assert_eq!(Header::parse(&f, None)?.tensors()[0].name(), "w");
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stored element type.
    ///
    /// ```
    /// # use modelfusion::io::{Dtype, Header};
    /// # let json = br#"{"w":{"dtype":"F16","shape":[],"data_offsets":[0,2]}}"#;
    /// # let mut f = (json.len() as u64).to_le_bytes().to_vec(); f.extend_from_slice(json); f.extend_from_slice(&[0; 2]);
    /// assert_eq!(Header::parse(&f, None)?.tensors()[0].dtype(), Dtype::F16);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The shape, outermost axis first.
    ///
    /// ```
    /// # use modelfusion::io::Header;
    /// # let json = br#"{"w":{"dtype":"F16","shape":[1,2],"data_offsets":[0,4]}}"#;
    /// # let mut f = (json.len() as u64).to_le_bytes().to_vec(); f.extend_from_slice(json); f.extend_from_slice(&[0; 4]);
    /// assert_eq!(Header::parse(&f, None)?.tensors()[0].shape(), &[1, 2]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements (the product of the shape; 1 for a scalar).
    ///
    /// ```
    /// # use modelfusion::io::Header;
    /// # let json = br#"{"w":{"dtype":"F16","shape":[3,2],"data_offsets":[0,12]}}"#;
    /// # let mut f = (json.len() as u64).to_le_bytes().to_vec(); f.extend_from_slice(json); f.extend_from_slice(&[0; 12]);
    /// assert_eq!(Header::parse(&f, None)?.tensors()[0].numel(), 6);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn numel(&self) -> usize {
        // Validated not to overflow when the header was parsed.
        self.shape.iter().product()
    }

    /// Stored size in bytes.
    ///
    /// ```
    /// # use modelfusion::io::Header;
    /// # let json = br#"{"w":{"dtype":"F16","shape":[3,2],"data_offsets":[0,12]}}"#;
    /// # let mut f = (json.len() as u64).to_le_bytes().to_vec(); f.extend_from_slice(json); f.extend_from_slice(&[0; 12]);
    /// assert_eq!(Header::parse(&f, None)?.tensors()[0].byte_len(), 12);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn byte_len(&self) -> usize {
        self.end - self.begin
    }
}

/// A validated safetensors header: tensors in file order and the `__metadata__` map.
///
/// ```
/// use modelfusion::io::Header;
/// // A header that declares more bytes than the file holds is an error, not an allocation.
/// let mut file = u64::MAX.to_le_bytes().to_vec();
/// file.extend_from_slice(b"{}");
/// let err = Header::parse(&file, None).unwrap_err();
/// assert!(err.to_string().contains("header"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub(crate) tensors: Vec<TensorInfo>,
    pub(crate) metadata: BTreeMap<String, String>,
    /// Byte offset of the data region in the file (8 + header length).
    pub(crate) data_start: usize,
}

impl Header {
    /// Parses and validates the header of a whole safetensors file held in `file`
    /// (typically a memory map). `path` only names the file in error messages.
    ///
    /// Errors ([`Error::Format`]) on: a file shorter than 8 bytes, a declared header
    /// length above [`MAX_HEADER_SIZE`] or beyond the end of the file, a header that is
    /// not a UTF-8 JSON object, an unknown or unsupported dtype, a malformed shape or
    /// offset pair, a shape whose byte size overflows or differs from its byte range,
    /// offsets beyond the data, and tensors that overlap or leave gaps.
    ///
    /// ```
    /// use modelfusion::io::Header;
    /// let json = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
    ///                 "b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    /// let mut file = (json.len() as u64).to_le_bytes().to_vec();
    /// file.extend_from_slice(json);
    /// file.extend_from_slice(&[0u8; 12]);
    /// let err = Header::parse(&file, None).unwrap_err().to_string();
    /// assert!(err.contains("overlap"), "{err}");
    /// ```
    pub fn parse(file: &[u8], path: Option<&Path>) -> Result<Header> {
        let err = |reason: String| format_err(path, reason);
        if file.len() < 8 {
            return Err(err(format!(
                "file is {} bytes, shorter than the 8-byte header length",
                file.len()
            )));
        }
        let mut len8 = [0u8; 8];
        len8.copy_from_slice(&file[..8]);
        let n = u64::from_le_bytes(len8);
        let avail = (file.len() - 8) as u64;
        if n > MAX_HEADER_SIZE {
            return Err(err(format!(
                "declared header length {n} exceeds the limit of {MAX_HEADER_SIZE} bytes"
            )));
        }
        if n > avail {
            return Err(err(format!(
                "declared header length {n} runs past the end of the file ({avail} bytes after the length)"
            )));
        }
        let n = n as usize;
        let text = &file[8..8 + n];
        if text.first() != Some(&b'{') {
            return Err(err("header does not start with `{`".into()));
        }
        let text = std::str::from_utf8(text)
            .map_err(|e| err(format!("header is not valid UTF-8: {e}")))?;
        let data_len = file.len() - 8 - n;
        // Entries are validated one at a time as the JSON streams by (no `Value` tree
        // of the whole header), so memory stays near the size of the result.
        let (mut failure, mut context) = (None, None);
        let mut de = serde_json::Deserializer::from_str(text.trim_end_matches(' '));
        let parsed = HeaderSeed {
            data_len,
            path,
            failure: &mut failure,
            context: &mut context,
        }
        .deserialize(&mut de)
        .and_then(|entries| de.end().map(|()| entries));
        let (mut tensors, metadata) = match (parsed, failure, context) {
            (_, Some(e), _) => return Err(e),
            // well-formed JSON of the wrong shape (or a duplicate key) inside an entry
            (Err(e), None, Some(ctx)) if e.classify() == serde_json::error::Category::Data => {
                return Err(err(format!("{ctx}: {e}")));
            }
            (Err(e), None, _) => return Err(err(format!("header is not valid JSON: {e}"))),
            (Ok(entries), None, _) => entries,
        };
        check_layout(&mut tensors, data_len, path)?;
        Ok(Header {
            tensors,
            metadata,
            data_start: 8 + n,
        })
    }

    /// The tensors, in the order of their data in the file.
    ///
    /// ```
    /// # use modelfusion::io::Header;
    /// let f = [2u8, 0, 0, 0, 0, 0, 0, 0, b'{', b'}'];
    /// assert!(Header::parse(&f, None)?.tensors().is_empty());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The free-form `__metadata__` string map (empty when absent).
    ///
    /// ```
    /// # use modelfusion::io::Header;
    /// let json = br#"{"__metadata__":{"format":"pt"}}"#;
    /// let mut f = (json.len() as u64).to_le_bytes().to_vec();
    /// f.extend_from_slice(json);
    /// assert_eq!(Header::parse(&f, None)?.metadata()["format"], "pt");
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
}

fn as_usize_array(v: &Value) -> Option<Vec<usize>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_u64().and_then(|u| usize::try_from(u).ok()))
        .collect()
}

type Entries = (Vec<TensorInfo>, BTreeMap<String, String>);

/// A JSON object whose keys must be unique: serde_json's own map keeps the last of
/// duplicate keys, while the safetensors format (like the reference parser) refuses them.
struct UniqueMap<V>(BTreeMap<String, V>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Vis<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(k) = map.next_key::<String>()? {
                    if out.contains_key(&k) {
                        return Err(de::Error::custom(format!("duplicate key `{k}`")));
                    }
                    let v = map.next_value()?;
                    out.insert(k, v);
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(Vis(std::marker::PhantomData))
    }
}

/// Streams the top-level header object: each entry is validated as soon as it is read.
/// A validation error is parked in `failure` (serde's error type cannot carry ours);
/// `context` names the entry being read when serde_json itself fails.
struct HeaderSeed<'a> {
    data_len: usize,
    path: Option<&'a Path>,
    failure: &'a mut Option<Error>,
    context: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for HeaderSeed<'_> {
    type Value = Entries;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Entries, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HeaderSeed<'_> {
    type Value = Entries;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Entries, A::Error> {
        let path = self.path;
        let mut fail = |e: Error| {
            *self.failure = Some(e);
            de::Error::custom("invalid header entry")
        };
        let mut metadata = None;
        let mut tensors = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            if name == "__metadata__" {
                if metadata.is_some() {
                    return Err(fail(format_err(path, "duplicate `__metadata__` entry")));
                }
                *self.context = Some("`__metadata__` is not a JSON object with unique keys".into());
                let m = map.next_value::<UniqueMap<Value>>()?;
                metadata = Some(parse_metadata(m, path).map_err(&mut fail)?);
                continue;
            }
            *self.context = Some(format!(
                "tensor `{name}`: entry is not a JSON object with unique keys"
            ));
            let entry = map.next_value::<UniqueMap<Value>>()?;
            tensors.push(parse_entry(name, &entry.0, self.data_len, path).map_err(&mut fail)?);
        }
        Ok((tensors, metadata.unwrap_or_default()))
    }
}

fn parse_metadata(m: UniqueMap<Value>, path: Option<&Path>) -> Result<BTreeMap<String, String>> {
    m.0.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            _ => Err(format_err(
                path,
                format!("`__metadata__` value of `{k}` is not a string"),
            )),
        })
        .collect()
}

fn parse_entry(
    name: String,
    entry: &BTreeMap<String, Value>,
    data_len: usize,
    path: Option<&Path>,
) -> Result<TensorInfo> {
    let terr = |reason: String| format_err(path, format!("tensor `{name}`: {reason}"));
    let dtype_name = entry
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| terr("missing string field `dtype`".into()))?;
    let dtype = match Dtype::from_header(dtype_name) {
        Some(d) => d,
        None if Dtype::is_unsupported_header(dtype_name) => {
            return Err(Error::Unsupported {
                what: format!(
                    "tensor `{name}`{} has dtype {dtype_name}",
                    path.map(|p| format!(" of {}", p.display()))
                        .unwrap_or_default()
                ),
                reason: "packed sub-byte dtypes (F4, F6_E2M3, F6_E3M2) are valid safetensors but modelfusion cannot carry them yet".into(),
            });
        }
        None => return Err(terr(format!("unknown dtype `{dtype_name}`"))),
    };
    let shape = entry
        .get("shape")
        .and_then(as_usize_array)
        .ok_or_else(|| terr("`shape` is not an array of non-negative integers".into()))?;
    let offsets = entry
        .get("data_offsets")
        .and_then(as_usize_array)
        .filter(|o| o.len() == 2)
        .ok_or_else(|| terr("`data_offsets` is not a pair of non-negative integers".into()))?;
    let (begin, end) = (offsets[0], offsets[1]);
    if begin > end {
        return Err(terr(format!("data_offsets [{begin}, {end}] are reversed")));
    }
    if end > data_len {
        return Err(terr(format!(
            "data_offsets [{begin}, {end}] run past the end of the data ({data_len} bytes)"
        )));
    }
    let nbytes = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
    if nbytes != end - begin {
        return Err(terr(format!(
            "shape {shape:?} of {dtype} needs {nbytes} bytes but data_offsets [{begin}, {end}] span {}",
            end - begin
        )));
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        begin,
        end,
        shard: 0,
    })
}

/// Refuses duplicate names, then sorts by offset and checks that the tensors tile the
/// data region exactly.
fn check_layout(tensors: &mut [TensorInfo], data_len: usize, path: Option<&Path>) -> Result<()> {
    let mut by_name: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    by_name.sort_unstable();
    if let Some(w) = by_name.windows(2).find(|w| w[0] == w[1]) {
        return Err(format_err(
            path,
            format!("tensor `{}` appears more than once in the header", w[0]),
        ));
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut pos = 0usize;
    let mut prev: Option<&str> = None;
    for t in tensors.iter() {
        if t.begin < pos {
            return Err(format_err(
                path,
                format!(
                    "tensor `{}` (bytes {}..{}) overlaps tensor `{}` (ending at {pos})",
                    t.name,
                    t.begin,
                    t.end,
                    prev.unwrap_or("?")
                ),
            ));
        }
        if t.begin > pos {
            return Err(format_err(
                path,
                format!(
                    "gap of {} unindexed bytes before tensor `{}` (bytes {}..{})",
                    t.begin - pos,
                    t.name,
                    t.begin,
                    t.end
                ),
            ));
        }
        pos = t.end;
        prev = Some(&t.name);
    }
    if pos != data_len {
        return Err(format_err(
            path,
            format!(
                "tensors cover {pos} bytes but the data region holds {data_len} (trailing unindexed bytes)"
            ),
        ));
    }
    Ok(())
}

/// A validated sharded-checkpoint index (`model.safetensors.index.json`): which file
/// holds each tensor.
///
/// ```
/// use modelfusion::io::ShardIndex;
/// let json = br#"{"metadata":{"total_size":8},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#;
/// let idx = ShardIndex::parse(json, None)?;
/// assert_eq!(idx.files(), &["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
/// assert_eq!(idx.file_of("b"), Some("model-00002-of-00002.safetensors"));
/// assert!(ShardIndex::parse(br#"{"weight_map":{"a":"../etc/passwd"}}"#, None).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardIndex {
    files: Vec<String>,
    weight_map: BTreeMap<String, usize>,
}

impl ShardIndex {
    /// Parses an index file's bytes. Shard names must be plain file names (no directory
    /// part) ending in `.safetensors`; `path` only names the file in error messages.
    ///
    /// ```
    /// use modelfusion::io::ShardIndex;
    /// assert!(ShardIndex::parse(b"[]", None).is_err());
    /// assert!(ShardIndex::parse(br#"{"weight_map":{"a":3}}"#, None).is_err());
    /// ```
    pub fn parse(bytes: &[u8], path: Option<&Path>) -> Result<ShardIndex> {
        let err = |reason: String| Error::Format {
            format: "safetensors index",
            path: path.map(Path::to_path_buf),
            reason,
        };
        if bytes.len() as u64 > MAX_INDEX_SIZE {
            return Err(err(format!(
                "index is {} bytes, above the limit of {MAX_INDEX_SIZE}",
                bytes.len()
            )));
        }
        // Only `weight_map` is read; its keys must be unique (a duplicate is refused,
        // where serde_json's map would keep the last), and so must the top-level keys.
        #[derive(Deserialize)]
        struct RawIndex {
            weight_map: Option<UniqueMap<Value>>,
            #[serde(flatten)]
            _rest: UniqueMap<de::IgnoredAny>,
        }
        let raw: RawIndex =
            serde_json::from_slice(bytes).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let map = raw
            .weight_map
            .ok_or_else(|| err("missing object `weight_map`".into()))?
            .0;
        let mut files: Vec<String> = Vec::new();
        let mut weight_map = BTreeMap::new();
        for (name, file) in &map {
            let file = file
                .as_str()
                .ok_or_else(|| err(format!("weight_map entry `{name}` is not a string")))?;
            let plain = Path::new(file).file_name().and_then(|f| f.to_str()) == Some(file);
            if !plain || !file.ends_with(".safetensors") {
                return Err(err(format!(
                    "weight_map entry `{name}` names `{file}`, which is not a plain `*.safetensors` file name"
                )));
            }
            let i = match files.iter().position(|f| f == file) {
                Some(i) => i,
                None => {
                    files.push(file.to_string());
                    files.len() - 1
                }
            };
            weight_map.insert(name.clone(), i);
        }
        // Stable file order: by name (HF shard names sort in shard order).
        let mut order: Vec<usize> = (0..files.len()).collect();
        order.sort_by(|&a, &b| files[a].cmp(&files[b]));
        let mut rank = vec![0; files.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i] = r;
        }
        let files_sorted = order.iter().map(|&i| files[i].clone()).collect();
        for v in weight_map.values_mut() {
            *v = rank[*v];
        }
        Ok(ShardIndex {
            files: files_sorted,
            weight_map,
        })
    }

    /// The shard file names, sorted.
    ///
    /// ```
    /// # use modelfusion::io::ShardIndex;
    /// let idx = ShardIndex::parse(br#"{"weight_map":{}}"#, None)?;
    /// assert!(idx.files().is_empty());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn files(&self) -> &[String] {
        &self.files
    }

    /// The shard file that holds `name`, if the index lists it.
    ///
    /// ```
    /// # use modelfusion::io::ShardIndex;
    /// let idx = ShardIndex::parse(br#"{"weight_map":{"a":"x.safetensors"}}"#, None)?;
    /// assert_eq!(idx.file_of("a"), Some("x.safetensors"));
    /// assert_eq!(idx.file_of("b"), None);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn file_of(&self, name: &str) -> Option<&str> {
        self.weight_map.get(name).map(|&i| self.files[i].as_str())
    }

    /// Number of tensors listed.
    ///
    /// ```
    /// # use modelfusion::io::ShardIndex;
    /// let idx = ShardIndex::parse(br#"{"weight_map":{"a":"x.safetensors"}}"#, None)?;
    /// assert_eq!(idx.len(), 1);
    /// assert!(!idx.is_empty());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.weight_map.len()
    }

    /// True when the index lists no tensor.
    ///
    /// ```
    /// # use modelfusion::io::ShardIndex;
    /// assert!(ShardIndex::parse(br#"{"weight_map":{}}"#, None)?.is_empty());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.weight_map.is_empty()
    }

    /// `(tensor name, shard file)` pairs, by tensor name.
    ///
    /// ```
    /// # use modelfusion::io::ShardIndex;
    /// let idx = ShardIndex::parse(br#"{"weight_map":{"b":"y.safetensors","a":"x.safetensors"}}"#, None)?;
    /// let pairs: Vec<_> = idx.iter().collect();
    /// assert_eq!(pairs, [("a", "x.safetensors"), ("b", "y.safetensors")]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.weight_map
            .iter()
            .map(|(n, &i)| (n.as_str(), self.files[i].as_str()))
    }

    pub(crate) fn shard_of(&self, name: &str) -> Option<usize> {
        self.weight_map.get(name).copied()
    }
}
