//! The merge methods the command line knows: their parameters (mergekit names and
//! defaults) and the tensor merger each config becomes.

use modelfusion::io::IoScalar;
use modelfusion::merge::TensorMerger;
use modelfusion::{Error, Result, Tensor};
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
    /// Implemented in this build.
    pub available: bool,
}

const TASK_GLOBALS: &[ParamSpec] = &[
    opt("normalize", 1.0),
    opt("lambda", 1.0),
    opt("int8_mask", 0.0),
];
const DARE_GLOBALS: &[ParamSpec] = &[
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
        available: false,
    }
}

/// Every method the config format names. Those with `available: false` are recognised
/// (so their configs validate) but not yet wired to an implementation.
pub const METHODS: &[MethodSpec] = &[
    MethodSpec {
        name: "linear",
        base: BaseUse::None,
        min_models: 1,
        max_models: None,
        model_params: &[req("weight")],
        global_params: &[opt("normalize", 1.0)],
        elementwise: true,
        available: true,
    },
    MethodSpec {
        name: "task_arithmetic",
        base: BaseUse::Required,
        min_models: 1,
        max_models: None,
        model_params: &[req("weight")],
        global_params: &[
            opt("normalize", 0.0),
            opt("lambda", 1.0),
            opt("int8_mask", 0.0),
        ],
        elementwise: true,
        available: false,
    },
    task_method("ties", SPARSE_MODEL, TASK_GLOBALS),
    task_method("dare_ties", SPARSE_MODEL, DARE_GLOBALS),
    task_method("dare_linear", SPARSE_MODEL, DARE_GLOBALS),
    task_method("breadcrumbs", CRUMBS_MODEL, TASK_GLOBALS),
    task_method("breadcrumbs_ties", CRUMBS_MODEL, TASK_GLOBALS),
    task_method("della", DELLA_MODEL, TASK_GLOBALS),
    task_method("della_linear", DELLA_MODEL, TASK_GLOBALS),
    MethodSpec {
        name: "slerp",
        base: BaseUse::Required,
        min_models: 1,
        max_models: Some(1),
        model_params: &[],
        global_params: &[req("t")],
        elementwise: false,
        available: false,
    },
    MethodSpec {
        name: "model_stock",
        base: BaseUse::Required,
        min_models: 2,
        max_models: None,
        model_params: &[],
        global_params: &[opt("filter_wise", 0.0)],
        elementwise: false,
        available: false,
    },
];

/// The table entry of `name`, or an error listing the known methods.
pub fn method_spec(name: &str) -> Result<&'static MethodSpec> {
    let m = METHODS.iter().find(|m| m.name == name).ok_or_else(|| {
        let known: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
        Error::invalid(
            "merge_method",
            format!("unknown method `{name}`; known: {}", known.join(", ")),
        )
    })?;
    if !m.available {
        let ready: Vec<&str> = METHODS
            .iter()
            .filter(|m| m.available)
            .map(|m| m.name)
            .collect();
        return Err(Error::invalid(
            "merge_method",
            format!(
                "`{name}` is not implemented in this build yet; available: {}",
                ready.join(", ")
            ),
        ));
    }
    Ok(m)
}

/// The tensor merger a validated config describes; parameters are resolved per tensor
/// name (so `{filter, value}` lists apply).
pub struct ConfigMerger<'a> {
    config: &'a Config,
}

impl<'a> ConfigMerger<'a> {
    /// Wraps a validated config.
    pub fn new(config: &'a Config) -> Self {
        ConfigMerger { config }
    }

    /// Runs the merger on one-element stand-ins (base 0, model `i` = `i + 1`) for every
    /// tensor name, so that bad hyperparameters fail before any data is read.
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

    /// `sum_i w_i x_i`, divided by `sum_i w_i` when `normalize` is set.
    // TEMPORARY: stands in for `modelfusion::merge`'s linear merger until that lands.
    fn linear<T>(&self, name: &str, ts: &[&ArrayD<T>]) -> Result<ArrayD<T>>
    where
        T: IoScalar,
        ArrayD<T>: Tensor<Elem = T>,
    {
        let c = self.config;
        let w = (0..ts.len())
            .map(|i| c.model_param(i, "weight", name))
            .collect::<Result<Vec<f64>>>()?;
        let total: f64 = w.iter().sum();
        let scale = if c.global_param("normalize", name)? != 0.0 {
            if total.abs() < 1e-12 {
                return Err(Error::invalid(
                    "weight",
                    format!("weights sum to {total} for tensor `{name}`; cannot normalize"),
                ));
            }
            1.0 / total
        } else {
            1.0
        };
        let mut out = ts[0].mapv(|x| x * T::from_f64_lossy(w[0] * scale));
        for (t, wi) in ts[1..].iter().zip(&w[1..]) {
            out.scaled_add(T::from_f64_lossy(wi * scale), *t);
        }
        Ok(out)
    }
}

impl<T> TensorMerger<ArrayD<T>> for ConfigMerger<'_>
where
    T: IoScalar,
    ArrayD<T>: Tensor<Elem = T>,
{
    fn merge_tensor(&self, name: &str, tensors: &[&ArrayD<T>]) -> Result<ArrayD<T>> {
        match self.config.method.name {
            "linear" => self.linear(name, tensors),
            other => Err(Error::invalid(
                "merge_method",
                format!("`{other}` is not implemented in this build yet"),
            )),
        }
    }
}
