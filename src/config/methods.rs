//! The merge methods the command line knows: their parameters (mergekit names and
//! defaults) and the tensor merger each config becomes.

use std::sync::OnceLock;

use crate::io::{IoScalar, TensorChunks};
use crate::merge::{
    ArceeFusion, Average, Consensus, KarcherMean, ModelStock, MultiSlerp, NearSwap, NuSlerp, Ram,
    Rescale, Sce, Slerp, SlerpVectors, Sparsification, TaskMerge, TensorMerger, TieOrder,
    nuslerp_t,
};
use crate::{Error, Result, StateDict};
use ndarray::ArrayD;

use super::{Config, Kind, gradient_t, layer_index};

/// A parameter of a method: its mergekit name, kind and default (`None` = required).
#[derive(Debug)]
pub struct ParamSpec {
    /// The name.
    pub name: &'static str,
    /// Number or flag.
    pub kind: Kind,
    /// The default value, if optional (flags: 0 or 1).
    pub default: Option<f64>,
}

const fn req(name: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        kind: Kind::Float,
        default: None,
    }
}

const fn opt(name: &'static str, default: f64) -> ParamSpec {
    ParamSpec {
        name,
        kind: Kind::Float,
        default: Some(default),
    }
}

const fn flag(name: &'static str, default: bool) -> ParamSpec {
    ParamSpec {
        name,
        kind: Kind::Bool,
        default: Some(if default { 1.0 } else { 0.0 }),
    }
}

/// Whether a method takes a base model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseUse {
    /// Never.
    None,
    /// Always.
    Required,
    /// If the config names one (then the models' task vectors are merged).
    Optional,
}

/// One merge method.
#[derive(Debug)]
pub struct MethodSpec {
    /// mergekit's name.
    pub name: &'static str,
    /// Base model use.
    pub base: BaseUse,
    /// Fewest models besides the base.
    pub min_models: usize,
    /// Most models besides the base.
    pub max_models: Option<usize>,
    /// Parameters set per model (or globally as a fallback).
    pub model_params: &'static [ParamSpec],
    /// Parameters set only globally.
    pub global_params: &'static [ParamSpec],
    /// Acts elementwise with one rule per tensor, so tensors may be streamed in chunks.
    pub elementwise: bool,
}

/// mergekit's shared parameters of a generalised task-arithmetic method, with its
/// per-method defaults of `normalize` and `rescale` (mergekit's registry).
const fn gta_globals(normalize: bool, rescale: bool) -> [ParamSpec; 4] {
    [
        flag("int8_mask", false),
        flag("normalize", normalize),
        flag("rescale", rescale),
        opt("lambda", 1.0),
    ]
}
const TA_GLOBALS: &[ParamSpec] = &gta_globals(false, false);
/// [`gta_globals`] of a magnitude-trimming method, with modelfusion's
/// `index_tie_break` (entries tied at a cut kept in index order: [`TieOrder::Index`]).
const fn trim_globals(normalize: bool, rescale: bool) -> [ParamSpec; 5] {
    let [a, b, c, d] = gta_globals(normalize, rescale);
    [a, b, c, d, flag("index_tie_break", false)]
}
const TIES_GLOBALS: &[ParamSpec] = &trim_globals(true, false);
const DARE_GLOBALS: &[ParamSpec] = &gta_globals(false, true);
const CRUMBS_GLOBALS: &[ParamSpec] = &trim_globals(false, false);
const DELLA_GLOBALS: &[ParamSpec] = &gta_globals(true, true);
const DELLA_LINEAR_GLOBALS: &[ParamSpec] = &gta_globals(false, true);
const SPARSE_MODEL: &[ParamSpec] = &[req("weight"), opt("density", 1.0)];
const CRUMBS_MODEL: &[ParamSpec] = &[req("weight"), opt("density", 1.0), opt("gamma", 0.01)];
const DELLA_MODEL: &[ParamSpec] = &[req("weight"), opt("density", 1.0), opt("epsilon", 0.15)];

/// A generalised task-arithmetic method: base model required, one model or more.
const fn task_method(
    name: &'static str,
    model_params: &'static [ParamSpec],
    global_params: &'static [ParamSpec],
    elementwise: bool,
) -> MethodSpec {
    MethodSpec {
        name,
        base: BaseUse::Required,
        min_models: 1,
        max_models: None,
        model_params,
        global_params,
        elementwise,
    }
}

/// A method whose parameters are all shared (set under the top-level `parameters`).
const fn shared_only(
    name: &'static str,
    base: BaseUse,
    models: (usize, Option<usize>),
    global_params: &'static [ParamSpec],
    elementwise: bool,
) -> MethodSpec {
    MethodSpec {
        name,
        base,
        min_models: models.0,
        max_models: models.1,
        model_params: &[],
        global_params,
        elementwise,
    }
}

/// Every method the command line runs, with mergekit 0.1.5's names and defaults.
/// Parameters mergekit does not have: slerp and nuslerp `lerp_zero`, sce `uniform_below`,
/// arcee_fusion `exact_quantiles` (each switches off a mergekit quirk; see the
/// library types).
pub const METHODS: &[MethodSpec] = &[
    MethodSpec {
        name: "linear",
        base: BaseUse::None,
        min_models: 1,
        max_models: None,
        model_params: &[req("weight")],
        global_params: &[flag("normalize", true)],
        elementwise: true,
    },
    task_method("task_arithmetic", SPARSE_MODEL, TA_GLOBALS, true),
    task_method("ties", SPARSE_MODEL, TIES_GLOBALS, false),
    task_method("dare_ties", SPARSE_MODEL, DARE_GLOBALS, false),
    task_method("dare_linear", SPARSE_MODEL, DARE_GLOBALS, false),
    task_method("breadcrumbs", CRUMBS_MODEL, CRUMBS_GLOBALS, false),
    task_method("breadcrumbs_ties", CRUMBS_MODEL, CRUMBS_GLOBALS, false),
    task_method("della", DELLA_MODEL, DELLA_GLOBALS, false),
    task_method("della_linear", DELLA_MODEL, DELLA_LINEAR_GLOBALS, false),
    MethodSpec {
        name: "slerp",
        base: BaseUse::Required,
        min_models: 1,
        max_models: Some(1),
        model_params: &[],
        global_params: &[req("t"), flag("lerp_zero", false)],
        elementwise: false,
    },
    MethodSpec {
        name: "model_stock",
        base: BaseUse::Required,
        min_models: 2,
        max_models: None,
        model_params: &[],
        global_params: &[flag("filter_wise", false)],
        elementwise: false,
    },
    MethodSpec {
        name: "nuslerp",
        base: BaseUse::Optional,
        min_models: 2,
        max_models: Some(2),
        model_params: &[req("weight")],
        global_params: &[
            flag("nuslerp_row_wise", false),
            flag("nuslerp_flatten", true),
            flag("lerp_zero", false),
        ],
        elementwise: false,
    },
    MethodSpec {
        name: "multislerp",
        base: BaseUse::Optional,
        min_models: 1,
        max_models: None,
        model_params: &[req("weight")],
        global_params: &[flag("normalize_weights", true), opt("eps", 1e-8)],
        elementwise: false,
    },
    shared_only(
        "karcher",
        BaseUse::None,
        (1, None),
        &[opt("max_iter", 10.0), opt("tol", 1e-5)],
        false,
    ),
    shared_only(
        "sce",
        BaseUse::Required,
        (1, None),
        &[
            flag("int8_mask", false),
            opt("select_topk", 1.0),
            opt("uniform_below", 1e-6),
        ],
        false,
    ),
    shared_only(
        "arcee_fusion",
        BaseUse::Required,
        (1, Some(1)),
        &[flag("exact_quantiles", false)],
        false,
    ),
    shared_only(
        "nearswap",
        BaseUse::Required,
        (1, Some(1)),
        &[req("t")],
        true,
    ),
    shared_only(
        "ram",
        BaseUse::Required,
        (1, None),
        &[opt("epsilon", 1e-5)],
        true,
    ),
    // mergekit's `scale` is optional with no default (no scaling); 1 is the same.
    MethodSpec {
        name: "passthrough",
        base: BaseUse::None,
        min_models: 1,
        max_models: Some(1),
        model_params: &[opt("scale", 1.0)],
        global_params: &[],
        elementwise: true,
    },
    shared_only(
        "ramplus_tl",
        BaseUse::Required,
        (1, None),
        &[opt("r", 0.1), opt("alpha", 0.2), opt("epsilon", 1e-5)],
        false,
    ),
];

/// The table entry of `name`, or an error listing the known methods.
pub fn method_spec(name: &str) -> Result<&'static MethodSpec> {
    METHODS.iter().find(|m| m.name == name).ok_or_else(|| {
        let known: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
        Error::invalid(
            "merge_method",
            format!("unknown method `{name}`; known: {}", known.join(", ")),
        )
    })
}

/// The tensor merger a validated config describes. Parameters are resolved per tensor
/// name and gradient position (so filters and gradients apply) and the matching
/// `modelfusion::merge` merger is built for each tensor; task-vector methods get the base
/// as the first tensor ([`TaskMerge::base_input`]), the other methods with a base model get
/// it as a one-tensor state dict.
#[derive(Debug)]
pub struct ConfigMerger<'a> {
    config: &'a Config,
    /// Number of layers (for gradients), from the tensor names seen by `preflight`.
    layers: OnceLock<usize>,
}

impl<'a> ConfigMerger<'a> {
    /// Wraps a validated config.
    pub fn new(config: &'a Config) -> Self {
        ConfigMerger {
            config,
            layers: OnceLock::new(),
        }
    }

    /// The config it merges by.
    pub(crate) fn config(&self) -> &'a Config {
        self.config
    }

    /// Counts the layers among the tensor names (gradient positions depend on it), then
    /// runs the merger on one-element stand-ins (base 0, model `i` = `i + 1`) for every
    /// tensor name, so that bad hyperparameters (a density outside [0, 1], a `t` outside
    /// [0, 1], a filtered value that resolves to nothing) fail before any data is read.
    pub fn preflight<'n>(&self, names: impl IntoIterator<Item = &'n str> + Clone) -> Result<()> {
        let layers = names
            .clone()
            .into_iter()
            .filter_map(layer_index)
            .max()
            .map_or(0, |m| m + 1);
        let _ = self.layers.set(layers);
        self.preflight_at(names.into_iter().map(|n| (n, gradient_t(n, layers))))
    }

    /// [`ConfigMerger::preflight`] for tensors at given gradient positions (a slice's
    /// layers).
    ///
    /// ```
    /// use modelfusion::config::{Config, ConfigMerger};
    /// let c = Config::from_yaml("merge_method: slerp\nbase_model: a\nparameters: {t: [0, 2]}\nmodels:\n  - model: b\n", "c.yml".as_ref())?;
    /// let m = ConfigMerger::new(&c);
    /// assert!(m.preflight_at([("w", 0.5)]).is_ok());
    /// // t = 2 at the end of the gradient: outside [0, 1].
    /// assert!(m.preflight_at([("w", 1.0)]).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn preflight_at<'n>(
        &self,
        tensors: impl IntoIterator<Item = (&'n str, f64)>,
    ) -> Result<()> {
        let k = self.config.inputs.len();
        let dummies: Vec<ArrayD<f32>> = (0..k)
            .map(|i| {
                let v = if self.config.has_base {
                    i as f32
                } else {
                    i as f32 + 1.0
                };
                ArrayD::from_elem(vec![1], v)
            })
            .collect();
        let refs: Vec<&ArrayD<f32>> = dummies.iter().collect();
        for (name, t) in tensors {
            self.merge_at(name, t, &refs)
                .map_err(|e| Error::invalid("config", format!("for tensor `{name}`: {e}")))?;
        }
        Ok(())
    }
}

/// Model stock with `filter_wise: true` (mergekit): one ratio per vector along the last
/// axis (a 1-D tensor is one vector).
fn model_stock_rows<T>(name: &str, base: &ArrayD<T>, models: &[&ArrayD<T>]) -> Result<ArrayD<T>>
where
    T: IoScalar,
{
    let shape = base.shape().to_vec();
    let row = shape.last().copied().unwrap_or(1).max(1);
    let flat = |a: &ArrayD<T>| a.iter().copied().collect::<Vec<T>>();
    let b = flat(base);
    let ms: Vec<Vec<T>> = models.iter().map(|m| flat(m)).collect();
    let mut out = Vec::with_capacity(b.len());
    for start in (0..b.len()).step_by(row) {
        let piece = |v: &[T]| ArrayD::from_shape_vec(vec![row], v[start..start + row].to_vec());
        let err = |e: ndarray::ShapeError| Error::invalid("shape", e.to_string());
        let base_row = StateDict::from_pairs([(name, piece(&b).map_err(err)?)])?;
        let rows = ms
            .iter()
            .map(|m| piece(m).map_err(err))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&ArrayD<T>> = rows.iter().collect();
        out.extend(
            ModelStock::new(base_row)
                .merge_tensor(name, &refs)?
                .iter()
                .copied(),
        );
    }
    ArrayD::from_shape_vec(shape, out).map_err(|e| Error::invalid("shape", e.to_string()))
}

/// A count parameter (`max_iter`): a whole number >= 0, as mergekit's integer type.
fn count_param(key: &str, x: f64) -> Result<usize> {
    if x >= 0.0 && x.fract() == 0.0 && x <= u32::MAX as f64 {
        Ok(x as usize)
    } else {
        Err(Error::invalid(
            key,
            format!("in `parameters`: expected a whole number >= 0, got {x}"),
        ))
    }
}

/// The error for a method given the wrong number of models.
fn config_count(method: &str, want: usize, got: usize) -> Error {
    Error::invalid(
        "models",
        format!("merge_method `{method}` merges exactly {want} models besides the base, got {got}"),
    )
}

impl<T> TensorMerger<ArrayD<T>> for ConfigMerger<'_>
where
    T: IoScalar,
{
    fn merge_tensor(&self, name: &str, ts: &[&ArrayD<T>]) -> Result<ArrayD<T>> {
        self.merge_at(name, self.position(name), ts)
    }
}

impl ConfigMerger<'_> {
    /// Merges tensor `name` at gradient position `t` (a slice's layers have positions
    /// of their own, see [`Slice`](super::Slice)); [`TensorMerger::merge_tensor`]
    /// takes `t` from the name.
    ///
    /// ```
    /// use modelfusion::config::{Config, ConfigMerger};
    /// use ndarray::ArrayD;
    /// let c = Config::from_yaml("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [1, 3]}\n  - model: b\n    parameters: {weight: 1}\n", "c.yml".as_ref())?;
    /// let (a, b) = (ArrayD::from_elem(vec![1], 0.0f32), ArrayD::from_elem(vec![1], 4.0f32));
    /// // At t = 1 the weights are 3 and 1.
    /// assert_eq!(ConfigMerger::new(&c).merge_at("w", 1.0, &[&a, &b])?[0], 1.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn merge_at<T: IoScalar>(
        &self,
        name: &str,
        t: f64,
        ts: &[&ArrayD<T>],
    ) -> Result<ArrayD<T>> {
        self.merge_sourced(name, &[], t, ts)
    }

    /// [`ConfigMerger::merge_at`] where the inputs' tensors have names of their own
    /// (`sources`, one per input, the base's first; empty: `name`): per-model
    /// parameters are resolved against the input's tensor name and shared ones against
    /// `name`, as mergekit resolves them (a filter `layers.5.` on a source of a slice
    /// matches that source's layer 5, whatever output layer it becomes).
    ///
    /// ```
    /// use modelfusion::config::{Config, ConfigMerger};
    /// use ndarray::ArrayD;
    /// let c = Config::from_yaml("merge_method: linear\nparameters: {normalize: false}\nmodels:\n  - model: a\n    parameters: {weight: [{filter: layers.5., value: 3}, {value: 1}]}\n", "c.yml".as_ref())?;
    /// let a = ArrayD::from_elem(vec![1], 1.0f32);
    /// let m = ConfigMerger::new(&c);
    /// // Output layer 0, read from layer 5 of `a`: the filter matches the source's name.
    /// assert_eq!(m.merge_sourced("model.layers.0.w", &["model.layers.5.w"], 0.0, &[&a])?[0], 3.0);
    /// assert_eq!(m.merge_at("model.layers.0.w", 0.0, &[&a])?[0], 1.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn merge_sourced<T: IoScalar>(
        &self,
        name: &str,
        sources: &[&str],
        t: f64,
        ts: &[&ArrayD<T>],
    ) -> Result<ArrayD<T>> {
        let c = self.config;
        let models = if c.has_base { &ts[1..] } else { ts };
        let skip = usize::from(c.has_base);
        let per_model = |p: &str| {
            (0..models.len())
                .map(|i| c.model_param(i, p, sources.get(i + skip).copied().unwrap_or(name), t))
                .collect::<Result<Vec<f64>>>()
        };
        let global = |p: &str| c.global_param(p, name, t);
        let method = c.method.name;
        if method == "passthrough" {
            let scale = per_model("scale")?;
            return match (models, scale.as_slice()) {
                ([m], [s]) if *s == 1.0 => Ok((*m).clone()),
                ([m], [s]) => {
                    // In the compute dtype, as torch multiplies by a Python float.
                    let s = T::from_f64_lossy(*s);
                    Ok(m.mapv(|x| x * s))
                }
                _ => Err(config_count("passthrough", 1, models.len())),
            };
        }
        if method == "linear" {
            return Average::weighted(per_model("weight")?, global("normalize")? != 0.0)?
                .merge_tensor(name, models);
        }
        let base_of = || -> Result<Option<StateDict<ArrayD<T>>>> {
            c.has_base
                .then(|| StateDict::from_pairs([(name, ts[0].clone())]))
                .transpose()
        };
        let flag = |p: &str| Ok::<bool, Error>(global(p)? != 0.0);
        match method {
            "nuslerp" => {
                let t = match per_model("weight")?.as_slice() {
                    [w0, w1] => nuslerp_t(*w0, *w1),
                    w => return Err(config_count("nuslerp", 2, w.len())),
                };
                let vectors = match (flag("nuslerp_flatten")?, flag("nuslerp_row_wise")?) {
                    (true, _) => SlerpVectors::Whole,
                    (false, true) => SlerpVectors::FirstAxis,
                    (false, false) => SlerpVectors::LastAxis,
                };
                return NuSlerp::with_base(base_of()?, t)?
                    .with_vectors(vectors)
                    .with_zero_lerp(flag("lerp_zero")?)
                    .merge_tensor(name, models);
            }
            "multislerp" => {
                return MultiSlerp::with_base(
                    base_of()?,
                    per_model("weight")?,
                    flag("normalize_weights")?,
                )?
                .with_eps(global("eps")?)?
                .merge_tensor(name, models);
            }
            "karcher" => {
                return KarcherMean::mergekit(
                    count_param("max_iter", global("max_iter")?)?,
                    global("tol")?,
                )?
                .merge_tensor(name, models);
            }
            _ => {}
        }
        // A base-model method: `ts[0]` is the base.
        if method == "model_stock" && global("filter_wise")? != 0.0 && ts[0].ndim() > 1 {
            return model_stock_rows(name, ts[0], models);
        }
        // The base as a one-tensor model, for the mergers that hold theirs.
        let held = || StateDict::from_pairs([(name, ts[0].clone())]);
        match method {
            "slerp" => {
                return Slerp::new(global("t")?)?
                    .with_zero_lerp(flag("lerp_zero")?)
                    .merge_tensor(name, ts);
            }
            "model_stock" => return ModelStock::new(held()?).merge_tensor(name, models),
            "sce" => {
                return Sce::new(held()?, global("select_topk")?)?
                    .with_uniform_below(global("uniform_below")?)?
                    .merge_tensor(name, models);
            }
            "arcee_fusion" => {
                return ArceeFusion::new(held()?, c.seed)
                    .with_exact_quantiles(flag("exact_quantiles")?)
                    .merge_tensor(name, models);
            }
            "nearswap" => {
                return NearSwap::new(held()?, global("t")?)?.merge_tensor(name, models);
            }
            "ram" => return Ram::new(held()?, global("epsilon")?)?.merge_tensor(name, models),
            "ramplus_tl" => {
                return Ram::plus(held()?, global("r")?, global("alpha")?, global("epsilon")?)?
                    .merge_tensor(name, models);
            }
            _ => {}
        }
        self.task_merge::<T>(name, t, models.len())?
            .merge_tensor(name, ts)
    }

    /// The gradient position of tensor `name` (from its layer index).
    pub(crate) fn position(&self, name: &str) -> f64 {
        gradient_t(name, self.layers.get().copied().unwrap_or(0))
    }

    /// Merges tensor `name` (of `shape`, at gradient position `t`) of a task-vector
    /// method from chunked inputs (the base first), writing through `out`
    /// ([`TaskMerge::merge_chunked`]: magnitude trimming in bounded memory); returns
    /// `false`, doing nothing, for the other methods.
    pub(crate) fn merge_chunked_at<T: IoScalar>(
        &self,
        name: &str,
        t: f64,
        shape: &[usize],
        inputs: &TensorChunks<'_, T>,
        out: &crate::merge::ChunkSink<'_, T>,
    ) -> Result<bool> {
        let c = self.config;
        let task = matches!(
            c.method.name,
            "task_arithmetic"
                | "ties"
                | "dare_ties"
                | "dare_linear"
                | "breadcrumbs"
                | "breadcrumbs_ties"
                | "della"
                | "della_linear"
        );
        if !task {
            return Ok(false);
        }
        use crate::merge::ChunkedInputs;
        let models = inputs.inputs().saturating_sub(1);
        let merger = self.task_merge::<T>(name, t, models)?;
        // DELLA streams by whole rows.
        let chunk = merger.chunk_elems_for(shape, inputs.chunk_elems());
        if chunk == inputs.chunk_elems() {
            merger.merge_chunked(name, shape, inputs, out)?;
        } else {
            merger.merge_chunked(name, shape, &inputs.with_chunk_elems(chunk)?, out)?;
        }
        Ok(true)
    }

    /// The task-vector merger of a generalised task-arithmetic method for tensor
    /// `name` at gradient position `t`, with `models` models besides the base.
    fn task_merge<T: IoScalar>(
        &self,
        name: &str,
        t: f64,
        models: usize,
    ) -> Result<TaskMerge<StateDict<ArrayD<T>>>> {
        let c = self.config;
        let per_model = |p: &str| {
            (0..models)
                .map(|i| c.model_param(i, p, name, t))
                .collect::<Result<Vec<f64>>>()
        };
        let global = |p: &str| c.global_param(p, name, t);
        let method = c.method.name;
        let density = per_model("density")?;
        let param = |p: &str| -> Result<Vec<f64>> {
            if c.method.model_params.iter().any(|s| s.name == p) {
                per_model(p)
            } else {
                Ok(vec![0.0; models])
            }
        };
        let (gamma, epsilon) = (param("gamma")?, param("epsilon")?);
        let seed = c.seed;
        let sparsifications = (0..models)
            .map(|i| {
                let d = density[i];
                let sp = match method {
                    "task_arithmetic" => Sparsification::None,
                    "ties" => Sparsification::Magnitude { density: d },
                    "dare_ties" | "dare_linear" => Sparsification::Random { density: d, seed },
                    "breadcrumbs" | "breadcrumbs_ties" => Sparsification::Breadcrumbs {
                        density: d,
                        gamma: gamma[i],
                    },
                    "della" | "della_linear" => Sparsification::Della {
                        density: d,
                        epsilon: epsilon[i],
                        seed,
                    },
                    other => {
                        return Err(Error::invalid(
                            "merge_method",
                            format!("`{other}` has no implementation"),
                        ));
                    }
                };
                sp.validate().map_err(|e| {
                    let path = c.inputs[i + usize::from(c.has_base)].display();
                    Error::invalid("config", format!("models[{i}] ({path}): {e}"))
                })?;
                Ok(sp)
            })
            .collect::<Result<Vec<_>>>()?;
        // TIES sign election for ties, dare_ties, breadcrumbs_ties and della; sums otherwise.
        let consensus = if matches!(method, "ties" | "dare_ties" | "breadcrumbs_ties" | "della") {
            Consensus::SignElection
        } else {
            Consensus::Sum
        };
        let rescale = if global("rescale")? != 0.0 {
            Rescale::L1Norm
        } else {
            Rescale::None
        };
        let tie_order = if c
            .method
            .global_params
            .iter()
            .any(|p| p.name == "index_tie_break")
            && global("index_tie_break")? != 0.0
        {
            TieOrder::Index
        } else {
            TieOrder::Torch
        };
        // The base streams in as `ts[0]`: no copy of it per tensor.
        Ok(TaskMerge::<StateDict<ArrayD<T>>>::base_input(
            Sparsification::None,
            consensus,
            global("lambda")?,
        )?
        .with_sparsifications(sparsifications)?
        .with_rescale(rescale)?
        .with_normalize(global("normalize")? != 0.0)
        .with_weights(per_model("weight")?)?
        .with_tie_order(tie_order))
    }
}
