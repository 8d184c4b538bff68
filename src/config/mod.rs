//! The mergekit-style YAML merge configuration: parsing, validation against the method's
//! parameter table, and per-tensor parameter resolution.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::align::{AlignStats, Aligner, Alignment, WeightMatching};
use crate::io::{Checkpoint, Dtype, SpecSource, read_capped};
use crate::perm::{PermutationSet, PermutationSpec};
use crate::progress::Observer;
use crate::{Error, Result, StateDictF32};
use serde::Deserialize;

mod layout;
mod methods;
mod run;
mod slow_tokenizer;
mod tokenizer;

pub use layout::{LAYOUTS, LayerCount, Layout, LooseWeight, ModelLayout, Module};
pub use methods::{BaseUse, ConfigMerger, METHODS, MethodSpec, ParamSpec, method_spec};
pub use run::{AlignedInput, MergePlan, RunOptions, RunSummary};
pub use tokenizer::{
    EmbeddingSource, RawTokenizer, TokenEmbedding, TokenRef, TokenizerConfig, TokenizerSource,
    vocabulary,
};

/// A parameter setting, read as mergekit 0.1.5 reads it.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamValue {
    /// A number (`true` / `false` read as 1 / 0; numeric strings such as `"1e-3"` as
    /// numbers).
    Scalar(f64),
    /// `[0, 0.5, 1]`: a gradient, interpolated piecewise linearly over the layer index
    /// (see [`gradient_t`]); an empty list is no value.
    Gradient(Vec<f64>),
    /// `[{filter: "self_attn", value: 0.3}, {value: 0.5}]` (or one such entry without
    /// the list): the first entry in list order whose filter is absent, `"*"` or a
    /// substring of the tensor name applies; when none does, the setting is no value
    /// and the next scope (global parameters, then the default) applies.
    Filtered(Vec<FilterEntry>),
}

/// One entry of a filtered parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct FilterEntry {
    /// Substring of tensor names this value applies to; none or `"*"`: every tensor.
    pub filter: Option<String>,
    /// The value: a scalar or a gradient.
    pub value: ParamValue,
}

/// How a parameter's values are read: numbers interpolate, booleans select.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A real number.
    Float,
    /// A flag (gradient entries are picked, not interpolated, as mergekit does).
    Bool,
}

const FORMS: &str =
    "a number, true/false, a list of numbers (a gradient over layers), or {filter, value} entries";

fn bad_value(key: &str, place: &str, why: &str, got: &serde_json::Value) -> Error {
    Error::invalid(
        key,
        format!("in {place}: {why}; expected {FORMS}; got `{got}`"),
    )
}

fn scalar(key: &str, place: &str, v: &serde_json::Value) -> Result<Option<f64>> {
    use serde_json::Value as V;
    let x = match v {
        V::Bool(b) => f64::from(u8::from(*b)),
        V::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        V::String(t) => match t.trim().parse::<f64>() {
            Ok(x) => x,
            Err(_) => return Err(bad_value(key, place, "a string that is not a number", v)),
        },
        _ => return Ok(None),
    };
    if !x.is_finite() {
        return Err(bad_value(key, place, "values must be finite", v));
    }
    Ok(Some(x))
}

/// A scalar or a gradient (the value of a filter entry, or a whole setting).
fn plain(key: &str, place: &str, v: &serde_json::Value) -> Result<Option<ParamValue>> {
    if let Some(x) = scalar(key, place, v)? {
        return Ok(Some(ParamValue::Scalar(x)));
    }
    if let serde_json::Value::Array(items) = v
        && items.iter().all(|e| !e.is_object() && !e.is_array())
    {
        let xs = items
            .iter()
            .map(|e| {
                scalar(key, place, e)?
                    .ok_or_else(|| bad_value(key, place, "a gradient holds numbers only", e))
            })
            .collect::<Result<Vec<f64>>>()?;
        return Ok(Some(ParamValue::Gradient(xs)));
    }
    Ok(None)
}

fn filter_entry(key: &str, place: &str, v: &serde_json::Value) -> Result<FilterEntry> {
    let serde_json::Value::Object(map) = v else {
        return Err(bad_value(
            key,
            place,
            "a filter list holds {filter, value} entries only",
            v,
        ));
    };
    if let Some(k) = map.keys().find(|k| *k != "filter" && *k != "value") {
        return Err(bad_value(
            key,
            place,
            &format!("unknown key `{k}` in a filter entry (keys: filter, value)"),
            v,
        ));
    }
    let filter = match map.get("filter") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(f)) => Some(f.clone()),
        Some(other) => {
            return Err(bad_value(
                key,
                place,
                &format!("`filter` must be a string, got `{other}`"),
                v,
            ));
        }
    };
    let value = match map.get("value") {
        None => return Err(bad_value(key, place, "a filter entry needs `value`", v)),
        Some(x) => plain(key, place, x)?.ok_or_else(|| {
            bad_value(
                key,
                place,
                "the `value` of a filter entry is a number or a list of numbers",
                x,
            )
        })?,
    };
    Ok(FilterEntry { filter, value })
}

/// Parses one parameter setting, naming the key, the place and the offending value.
pub fn parse_setting(key: &str, place: &str, v: &serde_json::Value) -> Result<ParamValue> {
    if let Some(p) = plain(key, place, v)? {
        return Ok(p);
    }
    match v {
        serde_json::Value::Object(_) => {
            Ok(ParamValue::Filtered(vec![filter_entry(key, place, v)?]))
        }
        serde_json::Value::Array(items) if items.iter().all(|e| e.is_object()) => {
            Ok(ParamValue::Filtered(
                items
                    .iter()
                    .map(|e| filter_entry(key, place, e))
                    .collect::<Result<_>>()?,
            ))
        }
        serde_json::Value::Array(_) => Err(bad_value(
            key,
            place,
            "a list mixes numbers and filter entries",
            v,
        )),
        _ => Err(bad_value(key, place, "not a parameter value", v)),
    }
}

/// mergekit's gradient position of a tensor: `i / (layers - 1)` for a tensor of layer
/// `i` (`1` when there is one layer); `0` for tensors outside the layers (embeddings,
/// the final norm, the LM head), as mergekit plans them. A layer index is the number
/// after a `layers`, `layer`, `h`, `blocks` or `block` segment of the name.
pub fn gradient_t(tensor: &str, layers: usize) -> f64 {
    match layer_index(tensor) {
        Some(i) if layers > 1 => i as f64 / (layers - 1) as f64,
        Some(_) => 1.0,
        None => 0.0,
    }
}

/// The layer index in a tensor name (`model.layers.3.mlp.up_proj.weight` -> 3).
pub fn layer_index(tensor: &str) -> Option<usize> {
    let parts: Vec<&str> = tensor.split('.').collect();
    parts.windows(2).find_map(|w| {
        matches!(w[0], "layers" | "layer" | "h" | "blocks" | "block")
            .then(|| w[1].parse::<usize>().ok())
            .flatten()
    })
}

impl ParamValue {
    /// The value for `tensor` at gradient position `t`, or `None` (no value here).
    pub fn eval(&self, tensor: &str, t: f64, kind: Kind) -> Option<f64> {
        match self {
            ParamValue::Scalar(x) => Some(*x),
            ParamValue::Gradient(v) if v.is_empty() => None,
            ParamValue::Gradient(v) => {
                let last = v.len() - 1;
                let scaled = t * last as f64;
                if kind == Kind::Bool {
                    return Some(v[(scaled as usize).min(last)]);
                }
                let i0 = (scaled as usize).min(last);
                let i1 = (i0 + 1).min(last);
                let frac = scaled - i0 as f64;
                Some((1.0 - frac) * v[i0] + frac * v[i1])
            }
            ParamValue::Filtered(list) => list
                .iter()
                .find(|e| {
                    e.filter
                        .as_deref()
                        .is_none_or(|f| f == "*" || tensor.contains(f))
                })
                .and_then(|e| e.value.eval(tensor, t, kind)),
        }
    }
}

/// `base_model: path` or `base_model: {model: path}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ModelRef {
    /// A path.
    Path(String),
    /// `{model: path}`.
    Entry {
        /// The path.
        model: String,
    },
}

impl ModelRef {
    fn path(&self) -> &str {
        match self {
            ModelRef::Path(p) | ModelRef::Entry { model: p } => p,
        }
    }
}

/// One input model.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Local path of the checkpoint (file or directory).
    pub model: String,
    /// Per-model parameters (fall back to the global ones), as written.
    #[serde(default)]
    pub parameters: BTreeMap<String, serde_json::Value>,
}

/// The YAML document as written.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct RawConfig {
    /// The method, e.g. `linear`, `ties`.
    pub merge_method: String,
    /// The base model of task-vector methods.
    pub base_model: Option<ModelRef>,
    /// The models to merge (whole models).
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    /// Layer slices (instead of `models`): the output's layers, slice after slice.
    pub slices: Option<Vec<RawSlice>>,
    /// Global parameters, as written.
    #[serde(default)]
    pub parameters: BTreeMap<String, serde_json::Value>,
    /// Compute dtype (`float64` computes in f64, anything else in f32); also the output
    /// dtype when `out_dtype` is absent.
    pub dtype: Option<String>,
    /// Output dtype.
    pub out_dtype: Option<String>,
    /// `base`, `union` or a model path: where the output's tokenizer comes from.
    pub tokenizer_source: Option<serde_json::Value>,
    /// The newer form of `tokenizer_source`: `{source, tokens, pad_to_multiple_of}`.
    pub tokenizer: Option<RawTokenizer>,
    /// A Jinja chat template, or `auto`.
    pub chat_template: Option<String>,
    /// mergekit's per-module form: `{NAME: {models | slices, parameters}}`, with
    /// `default` the one module of single-module architectures and `text_decoder`,
    /// `vision_tower`, `encoder`, ... those of multi-module ones ([`LAYOUTS`]).
    pub modules: Option<BTreeMap<String, RawModule>>,
    /// modelfusion's own section: align every model to the base (or first) model first.
    pub align: Option<RawAlign>,
    /// Everything else (reported as an error).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// One module of `modules:` as written: its models or slices, and parameters between
/// the slices' and the top-level ones.
///
/// ```
/// use modelfusion::config::Config;
/// let c = Config::from_yaml(
///     "merge_method: linear\nmodules:\n  default:\n    parameters: {weight: 2}\n    models: [{model: a}, {model: b}]\n",
///     "c.yml".as_ref(),
/// )?;
/// assert_eq!(c.model_param(1, "weight", "w", 0.0)?, 2.0);
/// // Other module names are checked against the checkpoints' architecture when planned.
/// assert!(Config::from_yaml("merge_method: linear\nmodules: {vision: {parameters: {weight: 1}}}\n", "c.yml".as_ref()).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawModule {
    /// The models merged into the module.
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    /// The module's slices (instead of `models`).
    pub slices: Option<Vec<RawSlice>>,
    /// The module's parameters.
    #[serde(default)]
    pub parameters: BTreeMap<String, serde_json::Value>,
}

/// One `slices:` entry as written: its sources (the same number of layers from each),
/// an optional base model and parameters.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawSlice {
    /// The models and layer ranges merged into this slice's layers.
    pub sources: Vec<RawSource>,
    /// This slice's base model (else the top-level one).
    pub base_model: Option<ModelRef>,
    /// Accepted as mergekit 0.1.5 accepts it (and, like it, unused).
    pub residual_weight: Option<f64>,
    /// Parameters of this slice (between the sources' and the top-level ones).
    #[serde(default)]
    pub parameters: BTreeMap<String, serde_json::Value>,
}

/// One source of a slice: `{model, layer_range: [start, end], parameters}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// Local path of the checkpoint.
    pub model: String,
    /// `[start, end]`: layers `start..end` (end excluded), as written.
    pub layer_range: serde_json::Value,
    /// Per-source parameters.
    #[serde(default)]
    pub parameters: BTreeMap<String, serde_json::Value>,
}

/// One validated slice: a merge of its own (its sources are the inputs) and the layer
/// range each input contributes.
#[derive(Clone, Debug)]
pub struct Slice {
    /// The slice's merge: `inputs` are its sources (the base first when the method uses
    /// one), `model_params` their parameters, `slice_params` the slice's.
    pub config: Config,
    /// The `layer_range` of each of `config.inputs`, in that order.
    pub ranges: Vec<(usize, usize)>,
}

impl Slice {
    /// Number of layers the slice contributes (the same from each source).
    ///
    /// ```
    /// use modelfusion::config::Config;
    /// let c = Config::from_yaml(
    ///     "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [2, 5]}]\n",
    ///     "c.yml".as_ref(),
    /// )?;
    /// assert_eq!(c.slices[0].layers(), 3);
    /// assert_eq!(c.slices[0].ranges, [(2, 5)]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn layers(&self) -> usize {
        self.ranges.first().map_or(0, |(a, b)| b - a)
    }
}

/// The `align:` section as written: `spec` (`auto` or a spec file), `seed`,
/// `restarts`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawAlign {
    /// `auto` (inferred from the reference checkpoint) or the path of a spec file.
    pub spec: Option<String>,
    /// Seed of weight matching's group order and restarts.
    pub seed: Option<u64>,
    /// Starting points of the descent (the identity, then random ones).
    pub restarts: Option<usize>,
}

/// How a config aligns its models before merging: weight matching of every model to the
/// base model (or, without one, to the first model), through the spec.
///
/// ```
/// use modelfusion::config::{AlignSettings, Config};
/// use modelfusion::io::SpecSource;
/// let c = Config::from_yaml(
///     "merge_method: linear\nalign: {seed: 3}\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n    parameters: {weight: 1}\n",
///     "c.yml".as_ref(),
/// )?;
/// assert_eq!(c.align, Some(AlignSettings { spec: SpecSource::Auto, seed: 3, restarts: 1 }));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlignSettings {
    /// Where the spec comes from (resolved against the reference checkpoint).
    pub spec: SpecSource,
    /// Seed of the group order (and of random restarts).
    pub seed: u64,
    /// Starting points (at least 1).
    pub restarts: usize,
}

impl AlignSettings {
    /// Weight-matches `other` to `reference` through `spec` with these settings, each
    /// sweep reported to `observer`: the permutation of each group, and the matching's
    /// statistics.
    ///
    /// ```
    /// use modelfusion::config::AlignSettings;
    /// use modelfusion::progress::Silent;
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// let arch = MlpShapes::new(&[3, 8, 2])?;
    /// let a = arch.random_model(0);
    /// let settings = AlignSettings { spec: Default::default(), seed: 0, restarts: 1 };
    /// // A permuted copy of `a` matches back onto `a`.
    /// let b = arch.spec().apply(&modelfusion::perm::PermutationSet::random(&arch.spec(), &a, 5)?, &a)?;
    /// let (perms, stats) = settings.match_models(&a, &b, &arch.spec(), &mut Silent)?;
    /// assert_eq!(arch.spec().apply(&perms, &b)?, a);
    /// assert!(stats.sweeps >= 1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn match_models(
        &self,
        reference: &StateDictF32,
        other: &StateDictF32,
        spec: &PermutationSpec,
        observer: &mut dyn Observer,
    ) -> Result<(PermutationSet, AlignStats)> {
        let alignment = self
            .weight_matching()?
            .align_observed(reference, other, spec, observer)?;
        permutations_of(&alignment)
    }

    /// [`match_models`](Self::match_models) out of core: the two checkpoints are read
    /// group by group ([`WeightMatching::align_checkpoints`]), never loaded; same
    /// results as on the loaded models.
    ///
    /// ```
    /// use modelfusion::config::AlignSettings;
    /// use modelfusion::io::{save_file, Checkpoint, Dtype};
    /// use modelfusion::perm::{specs::{Architecture, MlpShapes}, PermutationSet};
    /// use modelfusion::progress::Silent;
    /// let arch = MlpShapes::new(&[3, 8, 2])?;
    /// let a = arch.random_model(0);
    /// let b = arch.spec().apply(&PermutationSet::random(&arch.spec(), &a, 5)?, &a)?;
    /// let tmp = std::env::temp_dir();
    /// save_file(&a, tmp.join("modelfusion-doc-mc-a.safetensors"), Dtype::F32)?;
    /// save_file(&b, tmp.join("modelfusion-doc-mc-b.safetensors"), Dtype::F32)?;
    /// let ca = Checkpoint::open(tmp.join("modelfusion-doc-mc-a.safetensors"))?;
    /// let cb = Checkpoint::open(tmp.join("modelfusion-doc-mc-b.safetensors"))?;
    /// let settings = AlignSettings { spec: Default::default(), seed: 0, restarts: 1 };
    /// let (perms, _) = settings.match_checkpoints(&ca, &cb, &arch.spec(), &mut Silent)?;
    /// assert_eq!(arch.spec().apply(&perms, &b)?, a);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn match_checkpoints(
        &self,
        reference: &Checkpoint,
        other: &Checkpoint,
        spec: &PermutationSpec,
        observer: &mut dyn Observer,
    ) -> Result<(PermutationSet, AlignStats)> {
        let alignment = self
            .weight_matching()?
            .align_checkpoints(reference, other, spec, observer)?;
        permutations_of(&alignment)
    }

    /// The weight matching these settings run: their seed and restarts, at most 100
    /// sweeps, group costs kept between visits within [`ALIGN_COST_CACHE`] bytes.
    ///
    /// ```
    /// use modelfusion::config::{AlignSettings, ALIGN_COST_CACHE};
    /// let settings = AlignSettings { spec: Default::default(), seed: 7, restarts: 2 };
    /// let wm = settings.weight_matching()?;
    /// assert_eq!((wm.seed(), wm.restarts(), wm.cost_cache()), (7, 2, Some(ALIGN_COST_CACHE)));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn weight_matching(&self) -> Result<WeightMatching> {
        Ok(WeightMatching::new(self.seed)
            .with_restarts(self.restarts)?
            .with_cost_cache(ALIGN_COST_CACHE))
    }

    fn from_raw(raw: &RawAlign) -> Result<AlignSettings> {
        let restarts = raw.restarts.unwrap_or(1);
        if restarts == 0 {
            return Err(Error::invalid(
                "align.restarts",
                "must be at least 1 (the identity start)",
            ));
        }
        Ok(AlignSettings {
            spec: match &raw.spec {
                Some(s) => s.parse()?,
                None => SpecSource::Auto,
            },
            seed: raw.seed.unwrap_or(0),
            restarts,
        })
    }
}

/// Bytes of group cost matrices that config alignments and `modelfusion align` keep
/// between visits by default (256 MiB: every group of ResNet-20 x16 or VGG-16, the
/// residual stream of an LLM; its MLP groups, 254 MB each at 5632 units, are rebuilt at
/// each visit); see [`WeightMatching::with_cost_cache`].
///
/// ```
/// assert_eq!(modelfusion::config::ALIGN_COST_CACHE, 256 << 20);
/// ```
pub const ALIGN_COST_CACHE: usize = 256 << 20;

/// The permutations and statistics of a weight matching.
fn permutations_of(alignment: &Alignment) -> Result<(PermutationSet, AlignStats)> {
    let perms = alignment
        .permutations()
        .ok_or_else(|| Error::invalid("align", "weight matching gave no permutations"))?;
    Ok((perms, alignment.stats().clone()))
}

/// A validated configuration, ready to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// The method's table entry.
    pub method: &'static MethodSpec,
    /// Input checkpoints in the order the merger gets them: the base model first when
    /// the method uses one, then the models.
    pub inputs: Vec<PathBuf>,
    /// Whether `inputs[0]` is the base model.
    pub has_base: bool,
    /// Per-model parameters, for `models` (not the base), validated names.
    pub model_params: Vec<BTreeMap<String, ParamValue>>,
    /// Global parameters.
    pub global_params: BTreeMap<String, ParamValue>,
    /// Compute in f64.
    pub compute_f64: bool,
    /// Output dtype, when the config names one (else the first input's).
    pub out_dtype: Option<Dtype>,
    /// Seed of random methods (set from the command line).
    pub seed: u64,
    /// Alignment before merging, from the `align:` section.
    pub align: Option<AlignSettings>,
    /// Layer slices, in output order (empty for a `models:` config). The top-level
    /// `inputs` are then every model the slices name, once each (the base first).
    pub slices: Vec<Slice>,
    /// Parameters of the slice this config is the merge of (tried after the per-model
    /// ones, before the global ones); empty at the top level.
    pub slice_params: BTreeMap<String, ParamValue>,
    /// The output's vocabulary (`tokenizer_source`, or the `tokenizer:` block): the
    /// embedding and LM-head rows of every input are remapped to it. Without it the
    /// base (or first) model's files are copied and the inputs' rows are merged as
    /// they are.
    pub tokenizer: Option<TokenizerConfig>,
    /// `chat_template` as written (`auto`, or a template).
    pub chat_template: Option<String>,
    /// The modules of a `modules:` config, each a merge of its own (its models or
    /// slices, its parameters over the top-level ones), in name order; empty without
    /// `modules:`. The top-level `inputs` are then every model the modules name, once
    /// each (the base first); `modules: {default: ...}` alone is also the top-level
    /// form (the config is that module's merge).
    pub modules: Vec<ModuleConfig>,
}

/// One module of a `modules:` config.
///
/// ```
/// use modelfusion::config::Config;
/// let c = Config::from_yaml(
///     "merge_method: linear\nparameters: {weight: 1}\nmodules:\n  text_decoder: {models: [{model: a}, {model: b}]}\n  vision_tower:\n    parameters: {weight: 2}\n    slices: [{sources: [{model: b, layer_range: [0, 2]}]}]\n",
///     "c.yml".as_ref(),
/// )?;
/// assert_eq!(c.modules.len(), 2);
/// assert_eq!(c.modules[1].name, "vision_tower");
/// assert_eq!(c.modules[1].config.slices[0].ranges, [(0, 2)]);
/// assert_eq!(c.inputs.len(), 2);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ModuleConfig {
    /// The module's name as written (checked against the checkpoint's architecture
    /// when the config is planned).
    pub name: String,
    /// The module's merge.
    pub config: Config,
}

/// Largest merge config read, in bytes.
const MAX_CONFIG_SIZE: u64 = 16 << 20;

/// mergekit keys modelfusion does not implement, with what to do instead.
const UNSUPPORTED_KEYS: [(&str, &str); 1] = [(
    "parameters_by_layer",
    "per-layer parameters are not supported; use {filter, value} lists",
)];

fn config_err(reason: impl Into<String>) -> Error {
    Error::invalid("config", reason)
}

impl Config {
    /// Parses YAML text (`source` names it in errors) and validates it.
    pub fn from_yaml(text: &str, source: &Path) -> Result<Config> {
        let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| Error::Format {
            format: "merge config YAML",
            path: Some(source.to_path_buf()),
            reason: e.to_string(),
        })?;
        Self::validate(raw)
    }

    /// Reads and validates a config file (at most 16 MiB: a special file such as
    /// `/dev/zero` fails at once). Model paths are used as written: relative ones are
    /// relative to the working directory, as in mergekit.
    ///
    /// ```
    /// use modelfusion::config::Config;
    /// let p = std::env::temp_dir().join("modelfusion-doc-config.yml");
    /// std::fs::write(&p, "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n")?;
    /// assert_eq!(Config::from_file(&p)?.method.name, "linear");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let bytes = read_capped(path, MAX_CONFIG_SIZE, "merge config")?;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::invalid(
                "merge config",
                format!("`{}` is not UTF-8 text: {e}", path.display()),
            )
        })?;
        Self::from_yaml(&text, path)
    }

    /// Validates a parsed config: known method and keys, parameter names allowed for the
    /// method, required parameters present, model count and base model as the method needs.
    pub fn validate(mut raw: RawConfig) -> Result<Config> {
        let Some(modules) = raw.modules.take() else {
            return Self::validate_in(raw, None);
        };
        if !raw.models.is_empty() || raw.slices.is_some() {
            return Err(config_err(
                "`modules` is set with `models` or `slices`; a config has exactly one of them (as in mergekit)",
            ));
        }
        if modules.is_empty() {
            return Err(Error::invalid(
                "modules",
                "is empty; expected module names (`default` for single-module architectures; `text_decoder`, `vision_tower`, ... for multi-module ones), each with `models` or `slices`",
            ));
        }
        let mut parts = Vec::new();
        for (name, m) in modules {
            if m.models.is_empty() == m.slices.is_none() {
                return Err(config_err(format!(
                    "modules.{name} needs exactly one of `models` and `slices` (as in mergekit)"
                )));
            }
            let mut one = raw.clone();
            one.models = m.models;
            one.slices = m.slices;
            let config = Self::validate_in(one, Some((&name, &m.parameters)))?;
            parts.push(ModuleConfig { name, config });
        }
        // `default` alone is the top-level form (the single-module architectures).
        if let [only] = parts.as_slice()
            && only.name == "default"
        {
            let mut top = only.config.clone();
            top.modules = parts;
            return Ok(top);
        }
        if raw.align.is_some() {
            return Err(config_err(
                "`align` works on whole models; it cannot be combined with several `modules`",
            ));
        }
        let mut top = parts[0].config.clone();
        let (inputs, has_base) = every_input(
            top.method,
            raw.base_model.as_ref().map(|b| b.path()),
            parts.iter().map(|p| &p.config),
        );
        top.inputs = inputs;
        top.has_base = has_base;
        top.model_params = Vec::new();
        top.slices = Vec::new();
        top.slice_params = BTreeMap::new();
        top.global_params = shared_params(top.method, &raw.parameters, "parameters")?;
        top.modules = parts;
        Ok(top)
    }

    /// [`Config::validate`] of a config without `modules:`, or of one module (its name
    /// and parameters: they sit between the slices' and the top-level ones).
    fn validate_in(
        raw: RawConfig,
        module: Option<(&str, &BTreeMap<String, serde_json::Value>)>,
    ) -> Result<Config> {
        let scope = module.map_or(String::new(), |(name, _)| format!("modules.{name}."));
        if let Some((k, _)) = raw.other.iter().next() {
            let why = UNSUPPORTED_KEYS
                .iter()
                .find(|(u, _)| u == k)
                .map_or("it is not a key of a mergekit merge config", |(_, w)| w);
            return Err(config_err(format!(
                "unsupported key `{k}`: {why} (keys: merge_method, base_model, models, slices, modules, parameters, dtype, out_dtype, tokenizer_source, tokenizer, chat_template, align)"
            )));
        }
        let method = method_spec(&raw.merge_method)?;
        let compute_f64 = match &raw.dtype {
            Some(d) => d.parse::<Dtype>()? == Dtype::F64,
            None => false,
        };
        let out_dtype = match raw.out_dtype.as_ref().or(raw.dtype.as_ref()) {
            Some(d) => Some(
                d.parse::<Dtype>()?
                    .parse_float()
                    .map_err(|e| Error::invalid("dtype", format!("`{d}`: {e}")))?,
            ),
            None => None,
        };
        let mut global_params = shared_params(method, &raw.parameters, "parameters")?;
        if let Some((_, params)) = module {
            let own = shared_params(method, params, &format!("{scope}parameters"))?;
            for (k, v) in own {
                let below = global_params.remove(&k);
                global_params.insert(k, v.over(below));
            }
        }
        let base = raw.base_model.as_ref().map(|b| b.path().to_string());
        let align = raw
            .align
            .as_ref()
            .map(AlignSettings::from_raw)
            .transpose()?;
        let tokenizer = match (&raw.tokenizer_source, &raw.tokenizer) {
            (Some(_), Some(_)) => {
                return Err(config_err(
                    "both `tokenizer_source` and `tokenizer` are set; mergekit takes one of them",
                ));
            }
            (Some(v), None) => Some(TokenizerConfig::from_source(TokenizerSource::parse(
                v,
                "tokenizer_source",
            )?)),
            (None, Some(t)) => Some(TokenizerConfig::parse_block(&t.block, t.tokens.clone())?),
            (None, None) => None,
        };
        let config = |g: Group, slices: Vec<Slice>, slice_params| Config {
            method,
            inputs: g.inputs,
            has_base: g.has_base,
            model_params: g.params,
            global_params: global_params.clone(),
            compute_f64,
            out_dtype,
            seed: 0,
            align: align.clone(),
            slices,
            slice_params,
            tokenizer: tokenizer.clone(),
            chat_template: raw.chat_template.clone(),
            modules: Vec::new(),
        };
        let Some(raw_slices) = &raw.slices else {
            let entries: Vec<Entry> = raw
                .models
                .iter()
                .enumerate()
                .map(|(i, m)| Entry {
                    model: &m.model,
                    params: &m.parameters,
                    place: format!("{scope}models[{i}] ({})", m.model),
                })
                .collect();
            let empty = BTreeMap::new();
            let g = group(
                method,
                base.as_deref(),
                &entries,
                [&empty, &global_params],
                None,
            )?;
            return Ok(config(g, Vec::new(), BTreeMap::new()));
        };
        if !raw.models.is_empty() {
            return Err(config_err(
                "both `models` and `slices` are set; a config has exactly one of them (as in mergekit)",
            ));
        }
        if raw_slices.is_empty() {
            return Err(config_err("`slices` is empty: list at least one slice"));
        }
        if align.is_some() {
            return Err(config_err(
                "`align` works on whole models; it cannot be combined with `slices`",
            ));
        }
        let mut slices = Vec::new();
        for (si, sl) in raw_slices.iter().enumerate() {
            let place = format!("{scope}slices[{si}]");
            if sl.sources.is_empty() {
                return Err(config_err(format!("{place} has no `sources`")));
            }
            let slice_params =
                shared_params(method, &sl.parameters, &format!("{place}.parameters"))?;
            let sbase = sl.base_model.as_ref().map(|b| b.path()).or(base.as_deref());
            let entries: Vec<Entry> = sl
                .sources
                .iter()
                .enumerate()
                .map(|(j, s)| Entry {
                    model: &s.model,
                    params: &s.parameters,
                    place: format!("{place}.sources[{j}] ({})", s.model),
                })
                .collect();
            let ranges = sl
                .sources
                .iter()
                .zip(&entries)
                .map(|(s, e)| layer_range(&s.layer_range, &e.place))
                .collect::<Result<Vec<_>>>()?;
            let n = ranges[0].1 - ranges[0].0;
            if let Some(((a, b), e)) = ranges.iter().zip(&entries).find(|((a, b), _)| b - a != n) {
                return Err(Error::invalid(
                    "layer_range",
                    format!(
                        "{place}: every source of a slice has the same number of layers; {} has {} ([{a}, {b}]), {} has {n}",
                        e.place,
                        b - a,
                        entries[0].place
                    ),
                ));
            }
            let g = group(
                method,
                sbase,
                &entries,
                [&slice_params, &global_params],
                Some(&place),
            )?;
            let ranges = g.order.iter().map(|&j| ranges[j]).collect();
            slices.push(Slice {
                config: config(g, Vec::new(), slice_params),
                ranges,
            });
        }
        let (inputs, has_base) =
            every_input(method, base.as_deref(), slices.iter().map(|s| &s.config));
        let top = Group {
            inputs,
            has_base,
            params: Vec::new(),
            order: Vec::new(),
        };
        Ok(config(top, slices, BTreeMap::new()))
    }

    /// The value of per-model parameter `name` for model `i` (0-based among `models`,
    /// excluding the base) and tensor `tensor` at gradient position `t`: the model's
    /// setting, else the global one, else the default (mergekit's precedence; a setting
    /// with no value for this tensor falls through).
    pub fn model_param(&self, i: usize, name: &str, tensor: &str, t: f64) -> Result<f64> {
        let scopes = [
            self.model_params[i].get(name),
            self.slice_params.get(name),
            self.global_params.get(name),
        ];
        self.resolve(name, &scopes, tensor, t)
    }

    /// The value of global parameter `name` for tensor `tensor` at gradient position `t`.
    pub fn global_param(&self, name: &str, tensor: &str, t: f64) -> Result<f64> {
        let scopes = [self.slice_params.get(name), self.global_params.get(name)];
        self.resolve(name, &scopes, tensor, t)
    }

    fn resolve(
        &self,
        name: &str,
        scopes: &[Option<&ParamValue>],
        tensor: &str,
        t: f64,
    ) -> Result<f64> {
        let spec = self
            .method
            .model_params
            .iter()
            .chain(self.method.global_params)
            .find(|p| p.name == name);
        let kind = spec.map_or(Kind::Float, |p| p.kind);
        let found = scopes
            .iter()
            .flatten()
            .find_map(|v| v.eval(tensor, t, kind));
        let x = found.or_else(|| spec.and_then(|p| p.default)).ok_or_else(|| Error::MissingParam {
            name: name.to_string(),
            context: format!(
                "the merge config (tensor `{tensor}`: no filter matches it and there is no value to fall back on)"
            ),
        })?;
        Ok(match kind {
            Kind::Bool => f64::from(u8::from(x != 0.0)),
            Kind::Float => x,
        })
    }
}

/// One model of a merge as written: `models[i]` or `slices[s].sources[j]`.
struct Entry<'a> {
    model: &'a str,
    params: &'a BTreeMap<String, serde_json::Value>,
    /// Where it is written, for errors.
    place: String,
}

/// The inputs of one merge (a whole-model config, or one slice).
struct Group {
    inputs: Vec<PathBuf>,
    has_base: bool,
    /// Parameters of each input but the base.
    params: Vec<BTreeMap<String, ParamValue>>,
    /// For a slice: the index among its sources of each input.
    order: Vec<usize>,
}

/// Parses a `parameters:` map of shared scope (top level, or a slice's).
fn shared_params(
    method: &MethodSpec,
    raw: &BTreeMap<String, serde_json::Value>,
    place: &str,
) -> Result<BTreeMap<String, ParamValue>> {
    let mut out = BTreeMap::new();
    for (k, v) in raw {
        if !method.global_params.iter().any(|p| p.name == k)
            && !method.model_params.iter().any(|p| p.name == k)
        {
            return Err(unknown_param(method, k, place));
        }
        out.insert(k.clone(), parse_setting(k, place, v)?);
    }
    Ok(out)
}

/// `layer_range: [start, end]`: two whole numbers, `start <= end`.
fn layer_range(v: &serde_json::Value, place: &str) -> Result<(usize, usize)> {
    let bad = |why: &str| {
        Error::invalid(
            "layer_range",
            format!(
                "in {place}: {why}; expected [start, end] (whole numbers, start <= end, end excluded), got `{v}`"
            ),
        )
    };
    let serde_json::Value::Array(items) = v else {
        return Err(bad("not a list"));
    };
    let ends = items
        .iter()
        .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad("the ends are whole numbers >= 0"))?;
    match ends.as_slice() {
        [a, b] if a <= b => Ok((*a, *b)),
        [_, _] => Err(bad("start is after end")),
        _ => Err(bad("two numbers")),
    }
}

/// Validates the models of one merge: parameter names allowed per model, the base model
/// as the method needs it, the model count, required parameters set somewhere
/// (`scopes`: the slice's, then the global ones). `slice` names the slice of a sliced
/// config, whose base must be one of its sources (mergekit gathers a slice's tensors
/// from its sources only) and whose sources are distinct.
fn group(
    method: &'static MethodSpec,
    base: Option<&str>,
    entries: &[Entry],
    scopes: [&BTreeMap<String, ParamValue>; 2],
    slice: Option<&str>,
) -> Result<Group> {
    if let Some(s) = slice {
        for (j, e) in entries.iter().enumerate() {
            if let Some(d) = entries[..j].iter().find(|d| d.model == e.model) {
                return Err(config_err(format!(
                    "{s}: `{}` is a source twice ({} and {}); mergekit refuses duplicate merge inputs (take its layers in one range, or in two slices)",
                    e.model, d.place, e.place
                )));
            }
        }
    }
    let base = base.filter(|_| method.base != BaseUse::None || slice.is_none());
    let in_slice = |what: &str| match slice {
        Some(s) => format!("{s}: {what}"),
        None => what.to_string(),
    };
    let mut models: Vec<(usize, BTreeMap<String, ParamValue>)> = Vec::new();
    let mut base_index = None;
    for (i, m) in entries.iter().enumerate() {
        let place = &m.place;
        let mut params = BTreeMap::new();
        for (k, v) in m.params {
            if !method.model_params.iter().any(|p| p.name == k) {
                let why = if method.global_params.iter().any(|p| p.name == k) {
                    format!(
                        "{place} (`{k}` is shared by all models: set it under the top-level `parameters`)"
                    )
                } else {
                    place.clone()
                };
                return Err(unknown_param(method, k, &why));
            }
            params.insert(k.clone(), parse_setting(k, place, v)?);
        }
        // mergekit lets the base model appear among the models; its task vector is zero.
        if method.base != BaseUse::None && Some(m.model) == base {
            base_index = Some(i);
            continue;
        }
        models.push((i, params));
    }
    let has_base = match (method.base, base) {
        (BaseUse::Required, None) => {
            return Err(config_err(in_slice(&format!(
                "merge_method `{}` needs `base_model`",
                method.name
            ))));
        }
        (BaseUse::None, Some(b)) => {
            return Err(config_err(format!(
                "merge_method `{}` does not use `base_model` (got `{b}`); list every model under `models`",
                method.name
            )));
        }
        (_, Some(b)) if slice.is_some() && base_index.is_none() => {
            return Err(config_err(in_slice(&format!(
                "the base model `{b}` is not one of the slice's sources; mergekit merges a slice from its sources only, so list it there with the same number of layers"
            ))));
        }
        (_, b) => b.is_some(),
    };
    if models.len() < method.min_models {
        return Err(config_err(in_slice(&format!(
            "merge_method `{}` needs at least {} model(s) besides the base, got {}",
            method.name,
            method.min_models,
            models.len()
        ))));
    }
    if let Some(max) = method.max_models
        && models.len() > max
    {
        return Err(config_err(in_slice(&format!(
            "merge_method `{}` takes at most {max} model(s) besides the base, got {}",
            method.name,
            models.len()
        ))));
    }
    // Required per-model parameters must be set for every model (per model, per slice
    // or globally); whether a filtered one resolves for every tensor is checked per
    // tensor before any data is read (`ConfigMerger::preflight`).
    for (i, params) in &models {
        for p in method.model_params.iter().filter(|p| p.default.is_none()) {
            if !params.contains_key(p.name) && !scopes.iter().any(|s| s.contains_key(p.name)) {
                return Err(Error::MissingParam {
                    name: p.name.to_string(),
                    context: format!(
                        "{} of merge_method `{}` (set it there or under `parameters`)",
                        entries[*i].place, method.name
                    ),
                });
            }
        }
    }
    for p in method.global_params.iter().filter(|p| p.default.is_none()) {
        if !scopes.iter().any(|s| s.contains_key(p.name)) {
            return Err(Error::MissingParam {
                name: p.name.to_string(),
                context: format!("`parameters` of merge_method `{}`", method.name),
            });
        }
    }
    let mut inputs: Vec<PathBuf> = Vec::new();
    let mut order = Vec::new();
    if has_base {
        inputs.extend(base.iter().map(PathBuf::from));
        order.extend(base_index);
    }
    inputs.extend(models.iter().map(|(i, _)| PathBuf::from(entries[*i].model)));
    order.extend(models.iter().map(|(i, _)| *i));
    Ok(Group {
        inputs,
        has_base,
        params: models.into_iter().map(|(_, p)| p).collect(),
        order,
    })
}

/// Every model the merges `groups` name, once, the base first when the method uses
/// one (the inputs of a sliced or multi-module config), and whether it is there.
fn every_input<'c>(
    method: &MethodSpec,
    base: Option<&str>,
    groups: impl Iterator<Item = &'c Config>,
) -> (Vec<PathBuf>, bool) {
    let has_base = method.base != BaseUse::None && base.is_some();
    let mut inputs: Vec<PathBuf> = Vec::new();
    let named = base
        .iter()
        .filter(|_| has_base)
        .map(PathBuf::from)
        .chain(groups.flat_map(|g| g.inputs.iter().cloned()));
    for p in named {
        if !inputs.contains(&p) {
            inputs.push(p);
        }
    }
    (inputs, has_base)
}

impl ParamValue {
    /// This setting over `below` (the next scope's): where this one has no value for
    /// a tensor (no filter matches), `below` applies, as mergekit walks its scopes.
    fn over(self, below: Option<ParamValue>) -> ParamValue {
        let Some(below) = below else { return self };
        match self {
            ParamValue::Gradient(v) if v.is_empty() => below,
            ParamValue::Filtered(mut list) => {
                match below {
                    ParamValue::Filtered(rest) => list.extend(rest),
                    other => list.push(FilterEntry {
                        filter: None,
                        value: other,
                    }),
                }
                ParamValue::Filtered(list)
            }
            other => other,
        }
    }
}

fn unknown_param(method: &MethodSpec, name: &str, place: &str) -> Error {
    let model: Vec<&str> = method.model_params.iter().map(|p| p.name).collect();
    let global: Vec<&str> = method.global_params.iter().map(|p| p.name).collect();
    Error::invalid(
        name,
        format!(
            "unknown parameter in {place} for merge_method `{}` (per-model: {model:?}; global: {global:?})",
            method.name
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::from_yaml(text, Path::new("test.yml"))
    }

    #[test]
    fn linear_config_parses() {
        let c = parse(
            "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 0.3\n  - model: b\n    parameters:\n      weight: [{filter: attn, value: 2}, {value: 1}]\ndtype: float32\nout_dtype: bfloat16\n",
        )
        .unwrap();
        assert_eq!(c.inputs, [PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(c.out_dtype, Some(Dtype::BF16));
        assert!(!c.compute_f64);
        assert_eq!(c.model_param(0, "weight", "x", 0.0).unwrap(), 0.3);
        assert_eq!(c.model_param(1, "weight", "l.attn.q", 0.0).unwrap(), 2.0);
        assert_eq!(c.model_param(1, "weight", "l.mlp", 0.0).unwrap(), 1.0);
        assert_eq!(c.global_param("normalize", "x", 0.0).unwrap(), 1.0);
    }

    #[test]
    fn filters_in_list_order_gradients_and_fallback() {
        let c = parse(
            "merge_method: ties\nbase_model: b\nparameters:\n  weight: 1\n  density: [{filter: mlp, value: 0.2}, {value: [0, 0.5, 1]}]\nmodels:\n  - model: a\n    parameters:\n      density: [{value: 0.9}, {filter: attn, value: 0.1}]\n  - model: c\n    parameters:\n      density: {filter: attn, value: 0.3}\n",
        )
        .unwrap();
        // First entry wins: the default written first applies everywhere.
        assert_eq!(c.model_param(0, "density", "x.attn", 0.0).unwrap(), 0.9);
        // No filter matches `mlp` in model 1: the global setting applies.
        assert_eq!(c.model_param(1, "density", "x.mlp", 0.0).unwrap(), 0.2);
        assert_eq!(c.model_param(1, "density", "x.attn", 0.0).unwrap(), 0.3);
        // Gradient: piecewise linear in t.
        assert_eq!(c.model_param(1, "density", "x.o", 0.25).unwrap(), 0.25);
        assert_eq!(c.model_param(1, "density", "x.o", 1.0).unwrap(), 1.0);
        assert_eq!(gradient_t("model.layers.3.mlp.up.weight", 4), 1.0);
        assert_eq!(gradient_t("model.layers.1.mlp.up.weight", 3), 0.5);
        assert_eq!(gradient_t("lm_head.weight", 3), 0.0);
        let star = parse("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: [{filter: \"*\", value: 2}]\n").unwrap();
        assert_eq!(star.model_param(0, "weight", "q", 0.0).unwrap(), 2.0);
    }

    #[test]
    fn global_parameters_fill_in_per_model_ones() {
        let c = parse("merge_method: linear\nparameters:\n  weight: 0.5\n  normalize: false\nmodels:\n  - model: a\n  - model: b\n").unwrap();
        assert_eq!(c.model_param(1, "weight", "t", 0.0).unwrap(), 0.5);
        assert_eq!(c.global_param("normalize", "t", 0.0).unwrap(), 0.0);
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            ("merge_method: frobnicate\nmodels: []\n", "frobnicate"),
            (
                "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1, densty: 0.5}\n",
                "densty",
            ),
            ("merge_method: linear\nmodels:\n  - model: a\n", "weight"),
            (
                "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [{filter: x, value: abc}]}\n",
                "in models[0] (a): a string that is not a number",
            ),
            (
                "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [{filter: x, valu: 1}]}\n",
                "unknown key `valu`",
            ),
            (
                "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, lambda: 2}\n",
                "shared by all models",
            ),
            ("merge_method: linear\nslices: []\nmodels: []\n", "slices"),
            ("merge_method: linear\nfoo: 1\nmodels: []\n", "`foo`"),
            (
                "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\ndtype: int8\n",
                "int8",
            ),
            (
                "merge_method: linear\nbase_model: x\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
                "base_model",
            ),
            ("merge_method: linear\nmodels: []\n", "at least 1"),
            (
                "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: .nan}\n",
                "finite",
            ),
            ("merge_method: [1]\n", "test.yml"),
            (
                "merge_method: linear\nmodels:\n  - model: a\n    weight: 1\n",
                "weight",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "`{want}` not in `{err}` for:\n{text}");
        }
    }
}
