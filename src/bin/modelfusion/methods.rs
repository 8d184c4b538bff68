//! The merge methods the command line knows: their parameters (mergekit names and
//! defaults) and the tensor merger each config becomes.

use modelfusion::io::IoScalar;
use modelfusion::merge::{Average, Consensus, ModelStock, Rescale, Slerp, TaskMerge, TensorMerger};
use modelfusion::{Error, Result, StateDict, Tensor};
use ndarray::ArrayD;

use crate::config::Config;

/// A parameter of a method: its mergekit name and default (`None` = required).
#[derive(Debug)]
pub struct ParamSpec {
    /// The name.
    pub name: &'static str,
    /// The default value, if optional.
    pub default: Option<f64>,
}

const fn req(name: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        default: None,
    }
}

const fn opt(name: &'static str, default: f64) -> ParamSpec {
    ParamSpec {
        name,
        default: Some(default),
    }
}

/// Whether a method takes a base model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseUse {
    /// Never.
    None,
    /// Always.
    Required,
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

// Global parameters. Methods that sum task vectors default to `normalize: false` and
// those with TIES sign election to `true` (the disjoint mean always divides by the
// agreeing weights, so `false` is refused for them).
const SUM_GLOBALS: &[ParamSpec] = &[
    opt("normalize", 0.0),
    opt("lambda", 1.0),
    opt("int8_mask", 0.0),
];
const SIGN_GLOBALS: &[ParamSpec] = &[
    opt("normalize", 1.0),
    opt("lambda", 1.0),
    opt("int8_mask", 0.0),
];
const DARE_SUM_GLOBALS: &[ParamSpec] = &[
    opt("normalize", 0.0),
    opt("lambda", 1.0),
    opt("rescale", 1.0),
    opt("int8_mask", 0.0),
];
const DARE_SIGN_GLOBALS: &[ParamSpec] = &[
    opt("normalize", 1.0),
    opt("lambda", 1.0),
    opt("rescale", 1.0),
    opt("int8_mask", 0.0),
];
const SPARSE_MODEL: &[ParamSpec] = &[req("weight"), opt("density", 1.0)];
const CRUMBS_MODEL: &[ParamSpec] = &[req("weight"), opt("density", 0.9), opt("gamma", 0.01)];
const DELLA_MODEL: &[ParamSpec] = &[req("weight"), opt("density", 1.0), opt("epsilon", 0.15)];

/// A sparsifying task-vector method: base model required, one model or more, whole tensors.
const fn task_method(
    name: &'static str,
    model_params: &'static [ParamSpec],
    global_params: &'static [ParamSpec],
) -> MethodSpec {
    MethodSpec {
        name,
        base: BaseUse::Required,
        min_models: 1,
        max_models: None,
        model_params,
        global_params,
        elementwise: false,
    }
}

/// Every method the command line runs, with mergekit's names and defaults.
pub const METHODS: &[MethodSpec] = &[
    MethodSpec {
        name: "linear",
        base: BaseUse::None,
        min_models: 1,
        max_models: None,
        model_params: &[req("weight")],
        global_params: &[opt("normalize", 1.0)],
        elementwise: true,
    },
    MethodSpec {
        name: "task_arithmetic",
        base: BaseUse::Required,
        min_models: 1,
        max_models: None,
        model_params: &[req("weight")],
        global_params: SUM_GLOBALS,
        elementwise: true,
    },
    task_method("ties", SPARSE_MODEL, SIGN_GLOBALS),
    task_method("dare_ties", SPARSE_MODEL, DARE_SIGN_GLOBALS),
    task_method("dare_linear", SPARSE_MODEL, DARE_SUM_GLOBALS),
    task_method("breadcrumbs", CRUMBS_MODEL, SUM_GLOBALS),
    task_method("breadcrumbs_ties", CRUMBS_MODEL, SIGN_GLOBALS),
    task_method("della", DELLA_MODEL, SIGN_GLOBALS),
    task_method("della_linear", DELLA_MODEL, SUM_GLOBALS),
    MethodSpec {
        name: "slerp",
        base: BaseUse::Required,
        min_models: 1,
        max_models: Some(1),
        model_params: &[],
        global_params: &[req("t")],
        elementwise: false,
    },
    MethodSpec {
        name: "model_stock",
        base: BaseUse::Required,
        min_models: 2,
        max_models: None,
        model_params: &[],
        global_params: &[opt("filter_wise", 0.0)],
        elementwise: false,
    },
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
/// name (so `{filter, value}` lists apply) and the matching `modelfusion::merge` merger
/// is built for each tensor; methods with a base model get it as a one-tensor state dict.
pub struct ConfigMerger<'a> {
    config: &'a Config,
}

impl<'a> ConfigMerger<'a> {
    /// Wraps a validated config.
    pub fn new(config: &'a Config) -> Self {
        ConfigMerger { config }
    }

    /// Runs the merger on one-element stand-ins (base 0, model `i` = `i + 1`) for every
    /// tensor name, so that bad hyperparameters (a density of 0, a `t` outside [0, 1],
    /// per-model values the method cannot take) fail before any data is read.
    pub fn preflight<'n>(&self, names: impl IntoIterator<Item = &'n str>) -> Result<()> {
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
        for name in names {
            self.merge_tensor(name, &refs)
                .map_err(|e| Error::invalid("config", format!("for tensor `{name}`: {e}")))?;
        }
        Ok(())
    }
}

impl<T> TensorMerger<ArrayD<T>> for ConfigMerger<'_>
where
    T: IoScalar,
    ArrayD<T>: Tensor<Elem = T>,
{
    fn merge_tensor(&self, name: &str, ts: &[&ArrayD<T>]) -> Result<ArrayD<T>> {
        let c = self.config;
        let models = if c.has_base { &ts[1..] } else { ts };
        let per_model = |p: &str| {
            (0..models.len())
                .map(|i| c.model_param(i, p, name))
                .collect::<Result<Vec<f64>>>()
        };
        // Parameters modelfusion's mergers take once per tensor, not per model.
        let shared = |p: &str| -> Result<f64> {
            let v = per_model(p)?;
            match v.iter().find(|&&x| x != v[0]) {
                Some(other) => Err(Error::invalid(
                    p,
                    format!(
                        "differs between models for tensor `{name}` ({} vs {other}); `{}` takes one value per tensor",
                        v[0], c.method.name
                    ),
                )),
                None => Ok(v[0]),
            }
        };
        let global = |p: &str| c.global_param(p, name);
        let method = c.method.name;
        if method == "linear" {
            return Average::weighted(per_model("weight")?, global("normalize")? != 0.0)?
                .merge_tensor(name, models);
        }
        // A base-model method: `ts[0]` is the base.
        let base = StateDict::from_pairs([(name, ts[0].clone())])?;
        let tm = match method {
            "slerp" => return Slerp::new(global("t")?)?.merge_tensor(name, ts),
            "model_stock" => return ModelStock::new(base).merge_tensor(name, models),
            "task_arithmetic" => TaskMerge::task_arithmetic(base, global("lambda")?)?,
            "ties" => TaskMerge::ties(base, shared("density")?, global("lambda")?)?,
            "dare_ties" | "dare_linear" => {
                let rescale = if global("rescale")? != 0.0 {
                    Rescale::L1Norm
                } else {
                    Rescale::None
                };
                TaskMerge::dare(base, shared("density")?, c.seed, global("lambda")?)?
                    .with_rescale(rescale)?
            }
            "breadcrumbs" | "breadcrumbs_ties" => TaskMerge::breadcrumbs(
                base,
                shared("density")?,
                shared("gamma")?,
                global("lambda")?,
            )?,
            "della" | "della_linear" => TaskMerge::della(
                base,
                shared("density")?,
                shared("epsilon")?,
                c.seed,
                global("lambda")?,
            )?,
            other => {
                return Err(Error::invalid(
                    "merge_method",
                    format!("`{other}` has no implementation"),
                ));
            }
        };
        // TIES sign election for ties, dare_ties, breadcrumbs_ties and della; sums otherwise.
        let tm = tm.with_consensus(
            if matches!(method, "ties" | "dare_ties" | "breadcrumbs_ties" | "della") {
                Consensus::SignElection
            } else {
                Consensus::Sum
            },
        );
        let mut w = per_model("weight")?;
        let normalize = global("normalize")? != 0.0;
        match tm.consensus() {
            Consensus::Sum if normalize => {
                let total: f64 = w.iter().sum();
                if total.abs() < 1e-12 {
                    return Err(Error::invalid(
                        "weight",
                        format!("weights sum to {total} for tensor `{name}`; cannot normalize"),
                    ));
                }
                w.iter_mut().for_each(|x| *x /= total);
            }
            Consensus::SignElection if !normalize => {
                return Err(Error::invalid(
                    "normalize",
                    format!(
                        "`{method}` always normalises (its disjoint mean divides by the agreeing weights); remove `normalize: false`"
                    ),
                ));
            }
            _ => {}
        }
        tm.with_weights(w)?.merge_tensor(name, models)
    }
}
