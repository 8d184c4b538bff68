//! Running a validated config: inputs opened and checked, models aligned when the config
//! asks for it, tensors merged and streamed to disk.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ndarray::ArrayD;

use super::tokenizer::{OutputVocab, RowRemap, edit_json, resolve_template, set_template};
use super::{
    AlignSettings, Config, ConfigMerger, LAYOUTS, Layout, LooseWeight, ModelLayout, Module, Slice,
    layer_index,
};
use crate::align::AlignStats;
use crate::io::{
    Checkpoint, Chunking, Dtype, IoScalar, MappedMerger, MappedTensor, MergeSummary, SaveOptions,
    StreamOptions, TensorChunks, bf16, check_compatible, check_mapped, config_of, f16,
    merge_mapped, side_files,
};
use crate::merge::TensorMerger;
use crate::perm::{PermutationSet, PermutationSpec};
use crate::progress::{Observer, Progress};
use crate::{Error, Result};

/// The choices of a run that are not part of the config: output sharding, chunking,
/// side files and the non-finite check.
///
/// ```
/// use modelfusion::config::RunOptions;
/// let o = RunOptions::new().with_max_shard_size(1 << 30)?.with_copy_files(false);
/// assert_eq!(o.max_shard_size(), Some(1 << 30));
/// assert!(RunOptions::new().with_chunk_elems(0).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    max_shard_size: Option<u64>,
    chunk_elems: usize,
    copy_files: bool,
    allow_nonfinite: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            max_shard_size: None,
            chunk_elems: 1 << 18,
            copy_files: true,
            allow_nonfinite: false,
        }
    }
}

impl RunOptions {
    /// One output file, chunks of 2^18 elements for elementwise and task-vector methods, side files
    /// (`config.json`, tokenizer files) copied from the base or first model, merged
    /// tensors with NaN or infinite values refused.
    ///
    /// ```
    /// let o = modelfusion::config::RunOptions::new();
    /// assert!(o.copy_files() && !o.allow_nonfinite());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Shards the output: at most `bytes` of tensor data per file (a larger tensor gets
    /// a shard of its own). Zero is an error.
    ///
    /// ```
    /// assert!(modelfusion::config::RunOptions::new().with_max_shard_size(0).is_err());
    /// ```
    pub fn with_max_shard_size(mut self, bytes: u64) -> Result<Self> {
        if bytes == 0 {
            return Err(Error::invalid("max_shard_size", "must be positive"));
        }
        self.max_shard_size = Some(bytes);
        Ok(self)
    }

    /// Elements per chunk for elementwise methods (linear, task arithmetic without
    /// trimming) and for the passes of the task-vector methods over their inputs (TIES,
    /// breadcrumbs: [`Chunking::Passes`]). Zero is an error.
    ///
    /// ```
    /// let o = modelfusion::config::RunOptions::new().with_chunk_elems(1024)?;
    /// assert_eq!(o.chunk_elems(), 1024);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_chunk_elems(mut self, elems: usize) -> Result<Self> {
        if elems == 0 {
            return Err(Error::invalid("chunk_elems", "must be positive"));
        }
        self.chunk_elems = elems;
        Ok(self)
    }

    /// Whether `config.json` and the tokenizer files of the base (or first) model are
    /// copied beside the output (default: yes).
    ///
    /// ```
    /// assert!(!modelfusion::config::RunOptions::new().with_copy_files(false).copy_files());
    /// ```
    pub fn with_copy_files(mut self, copy: bool) -> Self {
        self.copy_files = copy;
        self
    }

    /// Whether merged tensors holding NaN or infinite values are written (default: the
    /// run stops with an error naming the tensor, and writes nothing).
    ///
    /// ```
    /// assert!(modelfusion::config::RunOptions::new().with_allow_nonfinite(true).allow_nonfinite());
    /// ```
    pub fn with_allow_nonfinite(mut self, allow: bool) -> Self {
        self.allow_nonfinite = allow;
        self
    }

    /// The largest shard, if sharded.
    pub fn max_shard_size(&self) -> Option<u64> {
        self.max_shard_size
    }
    /// Elements per chunk for elementwise methods and task-vector passes.
    pub fn chunk_elems(&self) -> usize {
        self.chunk_elems
    }
    /// Whether side files are copied.
    pub fn copy_files(&self) -> bool {
        self.copy_files
    }
    /// Whether non-finite merged values are written.
    pub fn allow_nonfinite(&self) -> bool {
        self.allow_nonfinite
    }
}

/// What aligning one input did.
#[derive(Clone, Debug, PartialEq)]
pub struct AlignedInput {
    /// Index of the input among [`Config::inputs`].
    pub input: usize,
    /// Where the spec came from (the inferred family, or the spec file).
    pub spec_origin: String,
    /// Weight matching's statistics (sweeps, objective, units moved per group).
    pub stats: AlignStats,
    /// Units in all of the spec's groups.
    pub units: usize,
}

/// What a finished run did.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSummary {
    /// The streaming merge's summary (tensors, bytes, files, carried buffers).
    pub merge: MergeSummary,
    /// Side files copied beside the output.
    pub copied: Vec<String>,
    /// Inputs aligned to the reference before merging (empty without `align:`).
    pub aligned: Vec<AlignedInput>,
    /// Merged values beyond the output dtype's range (stored as infinity), and the
    /// first tensor holding one.
    pub overflow: Option<(u64, String)>,
    /// The output dtype.
    pub out_dtype: Dtype,
    /// Input tensors left out of the output: those outside the architecture's layout
    /// (see [`MergePlan::dropped`]).
    pub dropped: Vec<String>,
}

impl RunSummary {
    /// A warning line for values that overflowed a float16 or bfloat16 output, if any
    /// did.
    ///
    /// ```
    /// use modelfusion::config::RunSummary;
    /// use modelfusion::io::{Dtype, MergeSummary};
    /// let merge = MergeSummary { tensors: 1, bytes_read: 0, bytes_written: 0, files: vec![], carried: vec![], carried_differing: vec![] };
    /// let s = RunSummary { merge, copied: vec![], aligned: vec![], overflow: Some((3, "w".into())), out_dtype: Dtype::F16, dropped: vec![] };
    /// assert!(s.overflow_warning().unwrap().contains("3 merged value(s)"));
    /// ```
    pub fn overflow_warning(&self) -> Option<String> {
        let (n, first) = self.overflow.as_ref()?;
        Some(format!(
            "warning: {n} merged value(s) exceed the {} maximum ({}) and are stored as infinity (first in tensor `{}`); consider out_dtype: float32",
            self.out_dtype.torch_name(),
            narrow_max(self.out_dtype).unwrap_or(f64::INFINITY),
            crate::error::Escaped(first)
        ))
    }
}

/// Largest finite value of `dtype`, when it is narrower than `f32`.
fn narrow_max(dtype: Dtype) -> Option<f64> {
    match dtype {
        Dtype::F16 => Some(f64::from(f16::MAX)),
        Dtype::BF16 => Some(f64::from(bf16::MAX)),
        _ => None,
    }
}

/// A validated config with its inputs opened and their headers checked against each
/// other and the method's parameters: what a run will read and write. Made by
/// [`Config::plan`]; reads no tensor data.
#[derive(Debug)]
pub struct MergePlan<'c> {
    config: &'c Config,
    inputs: Vec<Checkpoint>,
    tensors: Vec<(String, Vec<usize>)>,
    mapped: Vec<MappedTensor>,
    /// Per output tensor: its merger among `groups`, and its gradient position when it
    /// is not taken from the name (a slice's layers, the tensors around them).
    place: Vec<Placed>,
    groups: Vec<ConfigMerger<'c>>,
    dropped: Vec<String>,
    /// The layer counts written into the output's `config.json` (key, count).
    counts: Vec<(String, usize)>,
    /// The output vocabulary, when the config names one.
    vocab: Option<OutputVocab>,
    /// Per output tensor: how its sources' rows map to the output vocabulary's (the
    /// embedding and the LM head, with a vocabulary).
    remaps: Vec<Option<RowRemap>>,
    chat_template: Option<String>,
    out_dtype: Dtype,
}

/// The tensors of a whole-model merge: every tensor of the inputs when they hold the
/// same ones; when the first input's `config.json` names a known [`Layout`], the
/// layout's tensors only, as mergekit writes them (the others, such as rotary
/// `inv_freq` buffers, are dropped and returned), with a tied LM head read from the
/// embedding of an input that has none.
fn whole_model_plan(inputs: &[&Checkpoint]) -> Result<(Vec<MappedTensor>, Vec<String>)> {
    let identity = |ts: Vec<(String, Vec<usize>)>| {
        ts.into_iter()
            .map(|(name, shape)| MappedTensor {
                sources: (0..inputs.len()).map(|i| (i, name.clone())).collect(),
                name,
                shape,
                own_rows: false,
            })
            .collect()
    };
    // A config.json that does not parse is no layout (it is copied as it is).
    let Some(layout) = config_of(inputs[0])
        .ok()
        .flatten()
        .as_ref()
        .and_then(Layout::of_config)
    else {
        return Ok((identity(check_compatible(inputs)?), Vec::new()));
    };
    let mut names: Vec<&str> = Vec::new();
    for c in inputs {
        for t in c.tensors() {
            if !names.contains(&t.name()) {
                names.push(t.name());
            }
        }
    }
    let (mut plan, mut dropped) = (Vec::new(), Vec::new());
    for name in names {
        if !layout.has_tensor(name) {
            dropped.push(name.to_string());
            continue;
        }
        let loose = layout
            .modules
            .iter()
            .flat_map(|m| m.pre.iter().chain(m.post))
            .find(|l| l.name == name);
        let sources = inputs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let tied = loose.and_then(|l| l.tied).filter(|t| c.info(t).is_some());
                match (c.info(name), tied) {
                    (Some(_), _) => Ok((i, name.to_string())),
                    (None, Some(t)) => Ok((i, t.to_string())),
                    (None, None) => Err(Error::NameMismatch {
                        detail: format!(
                            "tensor `{name}` of the {} layout is in some inputs but not in {} (input {i}){}",
                            layout.family,
                            c.path().display(),
                            if loose.is_some_and(|l| l.optional) {
                                " (an optional tensor is merged only when every input has it)"
                            } else {
                                ""
                            }
                        ),
                    }),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let (c, src) = &sources[0];
        let shape = inputs[*c]
            .info(src)
            .map(|t| t.shape().to_vec())
            .unwrap_or_default();
        plan.push(MappedTensor {
            name: name.to_string(),
            shape,
            sources,
            own_rows: false,
        });
    }
    Ok((plan, dropped))
}

/// The tensors whose rows are the vocabulary's (mergekit's `vocabulary_axis: 0`
/// weights of the layouts it knows): remapped when a config names a vocabulary.
const VOCAB_TENSORS: [&str; 2] = ["model.embed_tokens.weight", "lm_head.weight"];

/// A tensor's merger (index among the plan's groups) and gradient position (`None`:
/// from the name).
type Placed = (usize, Option<f64>);

/// The planned tensors of a layered merge: the output tensors, where each is merged,
/// the mergers (with a label for errors), and the layer counts written into the
/// output's `config.json`.
struct LayeredPlan<'c> {
    mapped: Vec<MappedTensor>,
    place: Vec<Placed>,
    groups: Vec<(ConfigMerger<'c>, String)>,
    counts: Vec<(String, usize)>,
}

/// One slice of a module's merge: its merger (index among the plan's groups), its
/// merge, and the layer range of each of the merge's inputs, in their order.
struct ModuleSlice<'c> {
    group: usize,
    config: &'c Config,
    ranges: Vec<(usize, usize)>,
}

/// What the tensors of a layered merge are planned from: the top-level config (whose
/// `inputs` are the opened checkpoints, in order) and each input's layout.
struct Planning<'a> {
    config: &'a Config,
    inputs: &'a [Checkpoint],
    layouts: &'a [ModelLayout],
}

impl<'c> LayeredPlan<'c> {
    fn new() -> Self {
        LayeredPlan {
            mapped: Vec::new(),
            place: Vec::new(),
            groups: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// A new merger over `config`, labelled `label`; its index.
    fn group(&mut self, config: &'c Config, label: String) -> usize {
        self.groups.push((ConfigMerger::new(config), label));
        self.groups.len() - 1
    }

    /// The merges of `slices` as module slices, each with its own merger labelled
    /// `{key}[i]`.
    fn slices(&mut self, slices: &'c [Slice], key: &str) -> Vec<ModuleSlice<'c>> {
        slices
            .iter()
            .enumerate()
            .map(|(si, s)| ModuleSlice {
                group: self.group(&s.config, format!("{key}[{si}]")),
                config: &s.config,
                ranges: s.ranges.clone(),
            })
            .collect()
    }
}

impl Planning<'_> {
    /// The layouts of every input: the same known one for all (`key` needs them).
    fn layouts(inputs: &[Checkpoint], key: &str) -> Result<Vec<ModelLayout>> {
        let layouts = inputs
            .iter()
            .map(|c| ModelLayout::of(c, &format!("a model of `{key}`"), key))
            .collect::<Result<Vec<_>>>()?;
        let first = layouts[0].layout;
        if let Some((c, l)) = inputs.iter().zip(&layouts).find(|(_, l)| l.layout != first) {
            return Err(Error::invalid(
                key,
                format!(
                    "{} is a {} model, {} a {} one; mergekit refuses to mix architectures (without --allow-crimes) and so does modelfusion",
                    c.path().display(),
                    l.layout.family,
                    inputs[0].path().display(),
                    first.family
                ),
            ));
        }
        Ok(layouts)
    }

    /// The index among the opened inputs of the checkpoint at `p`.
    fn input_of(&self, p: &Path) -> Result<usize> {
        self.config
            .inputs
            .iter()
            .position(|q| q == p)
            .ok_or_else(|| Error::invalid("config", format!("`{}` was not opened", p.display())))
    }

    fn missing(&self, i: usize, name: &str, place: &str) -> Error {
        Error::MissingParam {
            name: name.to_string(),
            context: format!(
                "{} ({place}; the {} layout needs it)",
                self.inputs[i].path().display(),
                self.layouts[i].layout.family
            ),
        }
    }

    fn mapped(&self, name: String, sources: Vec<(usize, String)>) -> MappedTensor {
        MappedTensor {
            shape: self.inputs[sources[0].0]
                .info(&sources[0].1)
                .map(|t| t.shape().to_vec())
                .unwrap_or_default(),
            name,
            sources,
            own_rows: false,
        }
    }

    /// The tensors before or after the layers, from `slice`'s sources: a tensor read in
    /// place of a missing one when tied; an optional one that no source holds under its
    /// own name is left out (mergekit's rule).
    fn loose(
        &self,
        weights: &[LooseWeight],
        slice: &ModuleSlice<'_>,
        place: &str,
        out: &mut LayeredPlan<'_>,
    ) -> Result<()> {
        for w in weights {
            let found = slice
                .config
                .inputs
                .iter()
                .map(|p| {
                    let i = self.input_of(p)?;
                    let name = std::iter::once(w.name)
                        .chain(w.tied)
                        .find(|n| self.inputs[i].info(n).is_some());
                    Ok((i, name))
                })
                .collect::<Result<Vec<_>>>()?;
            if w.optional && found.iter().all(|(_, n)| *n != Some(w.name)) {
                continue;
            }
            let sources = found
                .into_iter()
                .map(|(i, n)| {
                    n.map(|n| (i, n.to_string()))
                        .ok_or_else(|| self.missing(i, w.name, place))
                })
                .collect::<Result<Vec<_>>>()?;
            out.mapped.push(self.mapped(w.name.to_string(), sources));
            out.place.push((slice.group, Some(0.0)));
        }
        Ok(())
    }

    /// The tensors of module `mi` merged slice by slice, in mergekit's order: the
    /// tensors before the layers from the first slice's sources, each slice's layers
    /// renumbered from 0 (gradient position `i / (n - 1)` within the slice, 1 for a
    /// one-layer slice), the tensors after the layers from the last slice's sources
    /// (position 0). `scope` names the slices in errors. Returns the output's layer
    /// count.
    fn module(
        &self,
        mi: usize,
        scope: &str,
        slices: &[ModuleSlice<'_>],
        out: &mut LayeredPlan<'_>,
    ) -> Result<usize> {
        let module = &self.layouts[0].layout.modules[mi];
        let (Some(first), Some(last)) = (slices.first(), slices.last()) else {
            return Ok(0);
        };
        self.loose(
            module.pre,
            first,
            &format!("{scope}, before the layers"),
            out,
        )?;
        let mut out_layer = 0;
        for (si, sl) in slices.iter().enumerate() {
            let place = format!("{scope}[{si}]");
            let opened = sl
                .config
                .inputs
                .iter()
                .map(|p| self.input_of(p))
                .collect::<Result<Vec<_>>>()?;
            for (k, (&i, (_, end))) in opened.iter().zip(&sl.ranges).enumerate() {
                let have = self.layouts[i].layers[mi];
                if *end > have {
                    return Err(Error::invalid(
                        "layer_range",
                        format!(
                            "{place}: `{}` has {have} layers ({}), the range of its source {k} ends at {end}",
                            self.inputs[i].path().display(),
                            module.count_label()
                        ),
                    ));
                }
            }
            let n = sl.ranges.first().map_or(0, |(a, b)| b - a);
            for idx in 0..n {
                let t = if n > 1 {
                    idx as f64 / (n - 1) as f64
                } else {
                    1.0
                };
                for suffix in module.layer {
                    let names: Vec<(usize, String)> = opened
                        .iter()
                        .zip(&sl.ranges)
                        .map(|(&i, (start, _))| (i, module.layer_tensor(start + idx, suffix)))
                        .collect();
                    if module.optional.contains(suffix)
                        && names.iter().all(|(i, n)| self.inputs[*i].info(n).is_none())
                    {
                        continue;
                    }
                    if let Some((i, n)) = names
                        .iter()
                        .find(|(i, n)| self.inputs[*i].info(n).is_none())
                    {
                        return Err(self.missing(*i, n, &place));
                    }
                    out.mapped
                        .push(self.mapped(module.layer_tensor(out_layer, suffix), names));
                    out.place.push((sl.group, Some(t)));
                }
                out_layer += 1;
            }
        }
        if out_layer > 0 {
            for name in module.repeated {
                let sources = last
                    .config
                    .inputs
                    .iter()
                    .map(|p| {
                        let i = self.input_of(p)?;
                        match self.inputs[i].info(name) {
                            Some(_) => Ok((i, name.to_string())),
                            None => Err(self.missing(i, name, scope)),
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                out.mapped.push(self.mapped(name.to_string(), sources));
                out.place.push((last.group, Some(1.0)));
            }
        }
        self.loose(
            module.post,
            last,
            &format!("{scope}, after the layers"),
            out,
        )?;
        Ok(out_layer)
    }

    /// The slices of a module merged from whole models (`models:`): one slice over each
    /// model's layers of the module, all of the same count (mergekit's rule).
    fn whole_module<'c>(
        &self,
        mi: usize,
        config: &'c Config,
        label: String,
        out: &mut LayeredPlan<'c>,
    ) -> Result<Vec<ModuleSlice<'c>>> {
        let module = &self.layouts[0].layout.modules[mi];
        let counts = config
            .inputs
            .iter()
            .map(|p| Ok((p, self.layouts[self.input_of(p)?].layers[mi])))
            .collect::<Result<Vec<_>>>()?;
        if let Some((p, n)) = counts.iter().find(|(_, n)| *n != counts[0].1) {
            return Err(Error::invalid(
                "config",
                format!(
                    "{label}: `{}` has {n} layers in its {} module, `{}` has {}; mergekit merges `models` as one slice over each model's layers, which needs the same count (use slices with `layer_range`)",
                    p.display(),
                    module.name,
                    counts[0].0.display(),
                    counts[0].1
                ),
            ));
        }
        let group = out.group(config, label);
        Ok(vec![ModuleSlice {
            group,
            config,
            ranges: counts.iter().map(|(_, n)| (0, *n)).collect(),
        }])
    }
}

/// The tensors of a top-level `slices:` config over a single-module layout.
fn sliced_plan<'c>(config: &'c Config, inputs: &[Checkpoint]) -> Result<LayeredPlan<'c>> {
    let layouts = Planning::layouts(inputs, "slices")?;
    let cx = Planning {
        config,
        inputs,
        layouts: &layouts,
    };
    let layout = layouts[0].layout;
    if layout.modules.len() != 1 {
        return Err(Error::invalid(
            "slices",
            format!(
                "{} is a {} model, whose modules are {}; top-level `slices` are for single-module architectures (mergekit: \"Model has multiple modules, must use modules: config syntax to work with slices\"), so write `modules: {{NAME: {{slices: [...]}}}}`",
                inputs[0].path().display(),
                layout.family,
                layout.module_names()
            ),
        ));
    }
    let mut out = LayeredPlan::new();
    let slices = out.slices(&config.slices, "slices");
    let n = cx.module(0, "slices", &slices, &mut out)?;
    out.counts
        .extend(count_key(inputs, &layout.modules[0])?.map(|k| (k, n)));
    Ok(out)
}

/// The `config.json` key the output's layer count of `module` goes to (the first
/// input's `config.json` is the one copied).
fn count_key(inputs: &[Checkpoint], module: &Module) -> Result<Option<String>> {
    let cfg = config_of(&inputs[0])?.unwrap_or_default();
    Ok(module.count_key(&cfg).map(str::to_string))
}

/// The tensors of a config over a multi-module layout: with top-level `models`, every
/// module merged from them over its own layers; with `modules:`, each module named
/// merged as its own `models` or `slices` (the other modules are left out, as mergekit
/// leaves them). Top-level `slices` and vocabularies are refused.
fn modular_plan<'c>(config: &'c Config, inputs: &[Checkpoint]) -> Result<LayeredPlan<'c>> {
    let layouts = Planning::layouts(inputs, "modules")?;
    let layout = layouts[0].layout;
    if !config.slices.is_empty() {
        return sliced_plan(config, inputs);
    }
    if config.tokenizer.is_some() {
        return Err(Error::invalid(
            "tokenizer_source",
            format!(
                "{} is a {} model (modules {}); output vocabularies are supported for single-module architectures only",
                inputs[0].path().display(),
                layout.family,
                layout.module_names()
            ),
        ));
    }
    let cx = Planning {
        config,
        inputs,
        layouts: &layouts,
    };
    let mut out = LayeredPlan::new();
    let parts: Vec<(usize, &'c Config, String)> = if config.modules.is_empty() {
        (0..layout.modules.len())
            .map(|mi| {
                (
                    mi,
                    config,
                    format!("models (module {})", layout.modules[mi].name),
                )
            })
            .collect()
    } else {
        config
            .modules
            .iter()
            .map(|m| {
                let mi = layout.module_index(&m.name, "modules")?;
                Ok((mi, &m.config, format!("modules.{}", m.name)))
            })
            .collect::<Result<Vec<_>>>()?
    };
    for (mi, part, label) in parts {
        let key = format!("{label}.slices");
        let slices = if part.slices.is_empty() {
            cx.whole_module(mi, part, label, &mut out)?
        } else {
            out.slices(&part.slices, &key)
        };
        let n = cx.module(mi, &key, &slices, &mut out)?;
        if !part.slices.is_empty() {
            let module = &layout.modules[mi];
            out.counts
                .extend(count_key(inputs, module)?.map(|k| (k, n)));
        }
    }
    Ok(out)
}

/// The input tensors none of `mapped` reads (left out of the output).
fn unread(inputs: &[Checkpoint], mapped: &[MappedTensor]) -> Vec<String> {
    let read: std::collections::HashSet<&str> = mapped
        .iter()
        .flat_map(|t| t.sources.iter().map(|(_, n)| n.as_str()))
        .collect();
    let mut out: Vec<String> = Vec::new();
    for c in inputs {
        for t in c.tensors() {
            if !read.contains(t.name()) && !out.iter().any(|n| n == t.name()) {
                out.push(t.name().to_string());
            }
        }
    }
    out
}

impl Config {
    /// Opens the inputs, checks that they hold the tensors the merge reads (the same
    /// tensors with the same shapes for whole models; the layout's layers for
    /// `slices`) and that every parameter resolves for every tensor (bad
    /// hyperparameters fail here, before any data is read).
    ///
    /// ```
    /// use modelfusion::config::Config;
    /// let c = Config::from_yaml("merge_method: linear\nmodels:\n  - model: /nonexistent\n    parameters: {weight: 1}\n", "c.yml".as_ref())?;
    /// let err = c.plan().unwrap_err().to_string();
    /// assert!(err.contains("models[0]") && err.contains("does not exist"), "{err}");
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn plan(&self) -> Result<MergePlan<'_>> {
        let inputs = self
            .inputs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if !p.exists() {
                    return Err(Error::invalid(
                        self.input_role(i),
                        format!(
                            "`{}` does not exist (modelfusion reads local checkpoints only; download Hugging Face repos first)",
                            p.display()
                        ),
                    ));
                }
                Checkpoint::open(p)
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Checkpoint> = inputs.iter().collect();
        let layout = config_of(&inputs[0])
            .ok()
            .flatten()
            .as_ref()
            .and_then(Layout::of_config);
        let multi = layout.is_some_and(|l| l.modules.len() > 1);
        if !multi && self.modules.iter().any(|m| m.name != "default") {
            return Err(self.unknown_modules(layout, &inputs[0]));
        }
        let layered = if multi {
            Some(modular_plan(self, &inputs)?)
        } else if !self.slices.is_empty() {
            Some(sliced_plan(self, &inputs)?)
        } else {
            None
        };
        let (mut mapped, place, groups, dropped, counts) = match layered {
            None => {
                let (mapped, dropped) = whole_model_plan(&refs)?;
                let merger = ConfigMerger::new(self);
                merger.preflight(mapped.iter().map(|t| t.name.as_str()))?;
                let place = vec![(0, None); mapped.len()];
                (mapped, place, vec![merger], dropped, Vec::new())
            }
            Some(p) => {
                for (g, (merger, label)) in p.groups.iter().enumerate() {
                    merger
                        .preflight_at(
                            p.mapped
                                .iter()
                                .zip(&p.place)
                                .filter(|(_, (h, _))| *h == g)
                                .map(|(t, (_, at))| (t.name.as_str(), at.unwrap_or(0.0))),
                        )
                        .map_err(|e| Error::invalid("config", format!("{label}: {e}")))?;
                }
                let dropped = if multi {
                    unread(&inputs, &p.mapped)
                } else {
                    Vec::new()
                };
                let groups = p.groups.into_iter().map(|(m, _)| m).collect();
                (p.mapped, p.place, groups, dropped, p.counts)
            }
        };
        let (vocab, remaps) = match &self.tokenizer {
            Some(settings) => {
                let v = OutputVocab::build(settings, &self.inputs, 0)?;
                let remaps = self.remaps(&v, &inputs, &mut mapped, &place, &groups)?;
                (Some(v), remaps)
            }
            None => (None, vec![None; mapped.len()]),
        };
        check_mapped(&refs, &mapped)?;
        let chat_template = match &self.chat_template {
            Some(v) => resolve_template(v, &self.inputs)?,
            None => None,
        };
        let out_dtype = self
            .out_dtype
            .or_else(|| {
                inputs[0]
                    .tensors()
                    .iter()
                    .map(|t| t.dtype())
                    .find(|d| d.is_float())
            })
            .unwrap_or(Dtype::F32);
        Ok(MergePlan {
            config: self,
            tensors: mapped
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect(),
            inputs,
            mapped,
            place,
            groups,
            dropped,
            counts,
            vocab,
            remaps,
            chat_template,
            out_dtype,
        })
    }

    /// Plans and runs the config into `out` (a directory), reporting stages and tensors
    /// to `observer`: the same as `self.plan()?.run(out, options, observer)`.
    ///
    /// ```
    /// use modelfusion::config::{Config, RunOptions};
    /// use modelfusion::io::{load, save, Dtype, SaveOptions};
    /// use modelfusion::progress::Silent;
    /// use modelfusion::{Model, StateDict, StateDictF32};
    /// use ndarray::arr1;
    ///
    /// let dir = std::env::temp_dir().join("modelfusion-doc-config-run");
    /// let m = |x: f32| StateDict::from_pairs([("w", arr1(&[x, 2.0 * x]).into_dyn())]).unwrap();
    /// save(&m(1.0), dir.join("a"), &SaveOptions::new(Dtype::F32))?;
    /// save(&m(3.0), dir.join("b"), &SaveOptions::new(Dtype::F32))?;
    /// let yaml = format!(
    ///     "merge_method: linear\nmodels:\n  - model: {0}/a\n    parameters: {{weight: 1}}\n  - model: {0}/b\n    parameters: {{weight: 1}}\n",
    ///     dir.display()
    /// );
    /// let config = Config::from_yaml(&yaml, "merge.yml".as_ref())?;
    /// let summary = config.run(dir.join("merged"), &RunOptions::new(), Silent)?;
    /// assert_eq!(summary.merge.tensors, 1);
    /// let merged: StateDictF32 = load(dir.join("merged"))?;
    /// assert_eq!(merged.get("w").unwrap().as_slice().unwrap(), &[2.0, 4.0]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn run(
        &self,
        out: impl AsRef<Path>,
        options: &RunOptions,
        observer: impl Observer,
    ) -> Result<RunSummary> {
        self.plan()?.run(out, options, observer)
    }

    /// The row remaps of the embedding and LM head (every tensor of
    /// [`VOCAB_TENSORS`]) to vocabulary `v`, their plan entries given the output's
    /// rows and sources read in their own shapes; `None` for the other tensors.
    fn remaps(
        &self,
        v: &OutputVocab,
        inputs: &[Checkpoint],
        mapped: &mut [MappedTensor],
        place: &[Placed],
        groups: &[ConfigMerger<'_>],
    ) -> Result<Vec<Option<RowRemap>>> {
        mapped
            .iter_mut()
            .zip(place)
            .map(|(t, (g, _))| {
                if !VOCAB_TENSORS.contains(&t.name.as_str()) {
                    return Ok(None);
                }
                let group = groups[*g].config();
                let base = group
                    .has_base
                    .then(|| self.inputs.iter().position(|p| *p == group.inputs[0]))
                    .flatten();
                let (srcs, rows): (Vec<usize>, Vec<usize>) = t
                    .sources
                    .iter()
                    .map(|(i, n)| {
                        let rows = inputs[*i].info(n).and_then(|x| x.shape().first().copied());
                        (*i, rows.unwrap_or(0))
                    })
                    .unzip();
                let r = v.remap(&t.name, &srcs, &rows, base)?;
                if let Some(s) = t.shape.first_mut() {
                    *s = v.rows();
                }
                t.own_rows = true;
                Ok(Some(r))
            })
            .collect()
    }

    /// The error for module names other than `default` on a checkpoint whose
    /// architecture has one module (or is not known).
    fn unknown_modules(&self, layout: Option<&'static Layout>, first: &Checkpoint) -> Error {
        let names: Vec<&str> = self.modules.iter().map(|m| m.name.as_str()).collect();
        let multi: Vec<&str> = LAYOUTS
            .iter()
            .filter(|l| l.modules.len() > 1)
            .flat_map(|l| l.architectures.iter().copied())
            .collect();
        let what = match layout {
            Some(l) => format!(
                "is a {} model, whose one module is `default` (write `modules: {{default: {{models | slices, parameters}}}}` or put `models` / `slices` at the top level)",
                l.family
            ),
            None => "names no architecture modelfusion knows in its config.json `architectures`"
                .to_string(),
        };
        Error::invalid(
            "modules",
            format!(
                "got modules {names:?}, but `{}` {what}; the multi-module architectures known are {multi:?}",
                first.path().display()
            ),
        )
    }

    fn input_role(&self, i: usize) -> String {
        if self.has_base && i == 0 {
            "base_model".to_string()
        } else {
            format!("models[{}]", i - usize::from(self.has_base))
        }
    }
}

impl MergePlan<'_> {
    /// The opened inputs, in the merger's order (the base first when the method has one).
    pub fn inputs(&self) -> &[Checkpoint] {
        &self.inputs
    }

    /// The merged tensors' names and shapes, in output order (non-float buffers
    /// included: they are carried from the first input).
    pub fn tensors(&self) -> &[(String, Vec<usize>)] {
        &self.tensors
    }

    /// The output tensors with the input tensors each is merged from (renamed layers
    /// of `slices`; a tied LM head read from the embedding).
    pub fn mapped(&self) -> &[MappedTensor] {
        &self.mapped
    }

    /// Input tensors the output leaves out, as mergekit does: when the first input's
    /// `config.json` names a known [`Layout`], the tensors outside it (rotary
    /// `inv_freq` buffers and the like; mergekit writes its architecture's tensors
    /// only).
    pub fn dropped(&self) -> &[String] {
        &self.dropped
    }

    /// The output's layer count, for top-level `slices` (written as `num_hidden_layers`
    /// into the copied `config.json`, as mergekit does).
    pub fn layers(&self) -> Option<usize> {
        self.counts
            .first()
            .filter(|_| !self.config.slices.is_empty())
            .map(|(_, n)| *n)
    }

    /// The layer counts written into the copied `config.json`: for top-level `slices`
    /// the output's (`num_hidden_layers`), for each module of `modules:` merged from
    /// slices its own (`vision_config.depth`, `num_decoder_layers`, ...), as mergekit
    /// writes them.
    pub fn layer_counts(&self) -> &[(String, usize)] {
        &self.counts
    }

    /// The output dtype: the config's `out_dtype` (or `dtype`), else the first input's
    /// first float dtype.
    pub fn out_dtype(&self) -> Dtype {
        self.out_dtype
    }

    /// Bytes of tensor data the output will hold (non-float buffers counted in the
    /// output dtype; they are a rounding error).
    pub fn out_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64 * self.out_dtype.size() as u64)
            .sum()
    }

    /// Runs the plan: aligns every model to the base (or first) model when the config
    /// has an `align:` section (weight matching, the permutations applied to each
    /// tensor as it streams by, so nothing aligned is written to disk), then merges
    /// tensor by tensor into `out`. The output is written as a transaction: on an error
    /// (a non-finite merged value, a stopped observer) nothing is left that loads as a
    /// checkpoint and a previous result in `out` is kept.
    pub fn run(
        &self,
        out: impl AsRef<Path>,
        options: &RunOptions,
        mut observer: impl Observer,
    ) -> Result<RunSummary> {
        let out = out.as_ref();
        let config = self.config;
        let (aligned, alignment) = match &config.align {
            Some(settings) => {
                let (aligned, perms) = self.align_inputs(settings, &mut observer)?;
                (aligned, Some(perms))
            }
            None => (Vec::new(), None),
        };
        let stages = 1 + aligned.len();
        if observer
            .observe(&Progress::Stage {
                index: stages - 1,
                total: stages,
                what: "merging",
            })
            .is_break()
        {
            return Err(cancelled(out, "before merging"));
        }
        let mut save = SaveOptions::new(self.out_dtype);
        save.max_shard_size = options.max_shard_size;
        // Permutations apply to whole tensors, so an aligned merge is not chunked.
        let chunk_elems = options.chunk_elems;
        let chunking = match (config.method.elementwise, alignment.is_none()) {
            (_, false) => Chunking::Whole,
            (true, true) => Chunking::Elementwise { chunk_elems },
            (false, true) => Chunking::Passes { chunk_elems },
        };
        let side = if options.copy_files {
            let mut side = side_files(&config.inputs[0], Some(self.out_dtype))?;
            for (key, n) in &self.counts {
                set_config_key(&mut side, key, *n)?;
            }
            if let Some(v) = &self.vocab {
                // The tokenizer files of the vocabulary, the rest from the base (or first).
                side.retain(|(n, _)| {
                    matches!(n.as_str(), "config.json" | "generation_config.json")
                });
                side.extend(v.side_files()?);
                set_config_key(&mut side, "vocab_size", v.rows())?;
            }
            if let Some(t) = &self.chat_template {
                set_template(&mut side, t)?;
            }
            side
        } else {
            Vec::new()
        };
        let copied: Vec<String> = side.iter().map(|(n, _)| n.clone()).collect();
        let stream = StreamOptions::new(save)
            .with_chunking(chunking)
            .with_files(side);
        let checked = Checked {
            groups: &self.groups,
            place: &self.place,
            remaps: &self.remaps,
            aligned: alignment.as_ref(),
            allow_nonfinite: options.allow_nonfinite,
            out_dtype: self.out_dtype,
            overflowed: AtomicU64::new(0),
            first_overflow: Mutex::new(None),
        };
        let refs: Vec<&Checkpoint> = self.inputs.iter().collect();
        let merge = if config.compute_f64 {
            merge_mapped::<f64, _>(&refs, &self.mapped, &checked, out, &stream, &mut observer)?
        } else {
            merge_mapped::<f32, _>(&refs, &self.mapped, &checked, out, &stream, &mut observer)?
        };
        let n = checked.overflowed.load(Ordering::Relaxed);
        let first = checked
            .first_overflow
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        Ok(RunSummary {
            merge,
            copied,
            aligned,
            overflow: first.filter(|_| n > 0).map(|f| (n, f)),
            out_dtype: self.out_dtype,
            dropped: self.dropped.clone(),
        })
    }

    /// Weight-matches every input but the reference (the base, or the first model) to
    /// it; the spec is resolved from the reference checkpoint.
    fn align_inputs(
        &self,
        settings: &AlignSettings,
        observer: &mut impl Observer,
    ) -> Result<(Vec<AlignedInput>, AlignedInputs)> {
        let reference = &self.inputs[0];
        let (spec, origin) = settings.spec.resolve(reference)?;
        let total = self.inputs.len();
        let (mut summaries, mut perms) = (Vec::new(), vec![None]);
        for (i, ck) in self.inputs.iter().enumerate().skip(1) {
            let what = format!(
                "aligning {} to {}",
                self.config.input_role(i),
                self.config.input_role(0)
            );
            if observer
                .observe(&Progress::Stage {
                    index: i - 1,
                    total,
                    what: &what,
                })
                .is_break()
            {
                return Err(cancelled(ck.path(), "while aligning"));
            }
            let (p, stats) = settings
                .match_checkpoints(reference, ck, &spec, observer)
                .map_err(|e| {
                    Error::invalid("align", format!("{what} ({}): {e}", ck.path().display()))
                })?;
            summaries.push(AlignedInput {
                input: i,
                spec_origin: origin.clone(),
                stats,
                units: p.iter().map(|(_, q)| q.len()).sum(),
            });
            perms.push(Some(p));
        }
        Ok((summaries, AlignedInputs { spec, perms }))
    }
}

/// Sets `key` (a dotted path: `vision_config.depth`) in the `config.json` among
/// `side` (a sliced merge's layer counts, the vocabulary size, as mergekit writes them).
fn set_config_key(side: &mut [(String, Vec<u8>)], key: &str, value: usize) -> Result<()> {
    edit_json(side, "config.json", |obj| {
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap_or(key);
        let mut at = obj;
        for p in parts {
            let next = at
                .entry(p)
                .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
            match next.as_object_mut() {
                Some(o) => at = o,
                None => return,
            }
        }
        at.insert(last.into(), value.into());
    })
}

fn cancelled(place: &Path, when: &str) -> Error {
    Error::Cancelled {
        what: format!(
            "merge config run {when} ({}); nothing was written",
            place.display()
        ),
    }
}

/// The permutation of each input (none for the reference) and the spec they act
/// through.
#[derive(Debug)]
struct AlignedInputs {
    spec: PermutationSpec,
    perms: Vec<Option<PermutationSet>>,
}

/// The config's merger, fed the aligned inputs when the config aligns, with every
/// merged tensor checked before it is written: non-finite values are an error (unless
/// allowed), finite values the output dtype cannot hold (above the float16 / bfloat16
/// maximum: stored as infinity) are counted for a warning.
struct Checked<'a, M> {
    groups: &'a [M],
    place: &'a [Placed],
    remaps: &'a [Option<RowRemap>],
    aligned: Option<&'a AlignedInputs>,
    allow_nonfinite: bool,
    out_dtype: Dtype,
    overflowed: AtomicU64,
    first_overflow: Mutex<Option<String>>,
}

impl<M> Checked<'_, M> {
    /// Whether `x` (finite, above the dtype's maximum) is stored as an infinity.
    fn becomes_infinite(&self, x: f64) -> bool {
        match self.out_dtype {
            Dtype::F16 => f16::from_f64(x).is_infinite(),
            Dtype::BF16 => bf16::from_f64(x).is_infinite(),
            _ => false,
        }
    }

    /// Counts the non-finite values of merged elements `out` and the finite ones the
    /// output dtype stores as infinities.
    fn count<T: IoScalar>(&self, out: &[T]) -> (u64, u64) {
        let max = narrow_max(self.out_dtype).unwrap_or(f64::INFINITY);
        let (mut nonfinite, mut overflow) = (0u64, 0u64);
        for &x in out {
            let v = x.to_f64_lossless();
            if !v.is_finite() {
                nonfinite += 1;
            } else if v.abs() > max && self.becomes_infinite(v) {
                overflow += 1;
            }
        }
        (nonfinite, overflow)
    }

    /// Errors on non-finite merged values (unless allowed) and records overflows, for
    /// tensor `name` of `len` elements.
    fn settle(&self, name: &str, len: usize, nonfinite: u64, overflow: u64) -> Result<()> {
        if nonfinite > 0 && !self.allow_nonfinite {
            return Err(Error::NonFinite {
                what: format!(
                    "merged tensor `{name}` ({nonfinite} of {len} values are NaN or infinite); nothing more is written, allow non-finite values (--allow-nonfinite) to write them anyway"
                ),
            });
        }
        if overflow > 0 {
            self.overflowed.fetch_add(overflow, Ordering::Relaxed);
            if let Ok(mut first) = self.first_overflow.lock() {
                first.get_or_insert_with(|| name.to_string());
            }
        }
        Ok(())
    }
}

impl<T: IoScalar> MappedMerger<T> for Checked<'_, ConfigMerger<'_>> {
    fn merge_mapped(
        &self,
        k: usize,
        tensor: &MappedTensor,
        ts: &[&ArrayD<T>],
    ) -> Result<ArrayD<T>> {
        let name = tensor.name.as_str();
        let (g, at) = self.place[k];
        let merger = &self.groups[g];
        let remapped = match &self.remaps[k] {
            Some(r) => Some(r.apply(ts)?),
            None => None,
        };
        let remapped_refs: Option<Vec<&ArrayD<T>>> = remapped.as_ref().map(|v| v.iter().collect());
        let ts = remapped_refs.as_deref().unwrap_or(ts);
        // Per-model filters match the source's name: a layer's in the source model (a
        // tied LM head read from the embedding is still `lm_head`, as in mergekit).
        let sources: Vec<&str> = tensor
            .sources
            .iter()
            .map(|(_, n)| {
                if layer_index(n).is_some() {
                    n.as_str()
                } else {
                    name
                }
            })
            .collect();
        let merge = |ts: &[&ArrayD<T>]| match at {
            Some(t) => merger.merge_sourced(name, &sources, t, ts),
            None => merger.merge_tensor(name, ts),
        };
        let out = match self.aligned {
            Some(al) => {
                let moved = ts
                    .iter()
                    .zip(&al.perms)
                    .map(|(t, p)| match p {
                        Some(p) => al.spec.permute_tensor(p, name, *t),
                        None => Ok(None),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let inputs: Vec<&ArrayD<T>> = ts
                    .iter()
                    .zip(&moved)
                    .map(|(t, m)| m.as_ref().unwrap_or(t))
                    .collect();
                merge(&inputs)?
            }
            None => merge(ts)?,
        };
        let contiguous = out.as_slice_memory_order().map(|s| self.count(s));
        let (nonfinite, overflow) =
            contiguous.unwrap_or_else(|| self.count(&out.iter().copied().collect::<Vec<_>>()));
        self.settle(name, out.len(), nonfinite, overflow)?;
        Ok(out)
    }

    fn merge_chunked(
        &self,
        k: usize,
        tensor: &MappedTensor,
        inputs: &TensorChunks<'_, T>,
        out: &crate::merge::ChunkSink<'_, T>,
    ) -> Result<bool> {
        if self.aligned.is_some() {
            return Ok(false);
        }
        let name = tensor.name.as_str();
        let (g, at) = self.place[k];
        let merger = &self.groups[g];
        let t = at.unwrap_or_else(|| merger.position(name));
        let (nonfinite, overflow) = (AtomicU64::new(0), AtomicU64::new(0));
        let checked = |start: usize, d: &[T]| {
            let (a, b) = self.count(d);
            nonfinite.fetch_add(a, Ordering::Relaxed);
            overflow.fetch_add(b, Ordering::Relaxed);
            out(start, d)
        };
        if !merger.merge_chunked_at(name, t, &tensor.shape, inputs, &checked)? {
            return Ok(false);
        }
        self.settle(
            name,
            tensor.shape.iter().product(),
            nonfinite.load(Ordering::Relaxed),
            overflow.load(Ordering::Relaxed),
        )?;
        Ok(true)
    }
}
