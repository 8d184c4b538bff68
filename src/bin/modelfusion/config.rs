//! The mergekit-style YAML merge configuration: parsing, validation against the method's
//! parameter table, and per-tensor parameter resolution.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use modelfusion::io::Dtype;
use modelfusion::{Error, Result};
use serde::Deserialize;

use crate::methods::{BaseUse, MethodSpec, method_spec};

/// A parameter value: a scalar, or per-tensor values selected by name filters.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ParamValue {
    /// `true` / `false` (read as 1 / 0).
    Bool(bool),
    /// A number.
    Number(f64),
    /// `[{filter: "self_attn", value: 0.3}, {value: 0.5}]`: the first entry whose
    /// filter is a substring of the tensor name, else the entry without a filter.
    Filtered(Vec<FilterEntry>),
    /// A list of plain numbers: mergekit's layer gradients (not supported).
    Gradient(Vec<f64>),
}

/// One entry of a filtered parameter.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterEntry {
    /// Substring of tensor names this value applies to; none = the default.
    pub filter: Option<String>,
    /// The value.
    pub value: ScalarValue,
}

/// A scalar in a filter entry.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ScalarValue {
    /// Boolean.
    Bool(bool),
    /// Number.
    Number(f64),
}

impl ScalarValue {
    fn get(self) -> f64 {
        match self {
            ScalarValue::Bool(b) => f64::from(u8::from(b)),
            ScalarValue::Number(x) => x,
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
    /// Per-model parameters (fall back to the global ones).
    #[serde(default)]
    pub parameters: BTreeMap<String, ParamValue>,
}

/// The YAML document as written.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct RawConfig {
    /// The method, e.g. `linear`, `ties`.
    pub merge_method: String,
    /// The base model of task-vector methods.
    pub base_model: Option<ModelRef>,
    /// The models to merge.
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    /// Global parameters.
    #[serde(default)]
    pub parameters: BTreeMap<String, ParamValue>,
    /// Compute dtype (`float64` computes in f64, anything else in f32); also the output
    /// dtype when `out_dtype` is absent.
    pub dtype: Option<String>,
    /// Output dtype.
    pub out_dtype: Option<String>,
    /// Everything else (reported as an error).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
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
}

/// mergekit keys modelfusion does not implement, with what to do instead.
const UNSUPPORTED_KEYS: [(&str, &str); 6] = [
    (
        "slices",
        "layer slicing (frankenmerges) is not supported; merge whole models",
    ),
    (
        "tokenizer_source",
        "tokenizer merging is not supported; the base (or first) model's tokenizer files are copied",
    ),
    (
        "tokenizer",
        "tokenizer merging is not supported; the base (or first) model's tokenizer files are copied",
    ),
    (
        "chat_template",
        "chat templates are not handled; edit tokenizer_config.json afterwards",
    ),
    ("modules", "per-module configs are not supported"),
    (
        "parameters_by_layer",
        "per-layer parameters are not supported; use {filter, value} lists",
    ),
];

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

    /// Validates a parsed config: known method and keys, parameter names allowed for the
    /// method, required parameters present, model count and base model as the method needs.
    pub fn validate(raw: RawConfig) -> Result<Config> {
        if let Some((k, _)) = raw.other.iter().next() {
            let why = UNSUPPORTED_KEYS
                .iter()
                .find(|(u, _)| u == k)
                .map_or("it is not a key of a mergekit merge config", |(_, w)| w);
            return Err(config_err(format!(
                "unsupported key `{k}`: {why} (keys: merge_method, base_model, models, parameters, dtype, out_dtype)"
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
        for (k, v) in &raw.parameters {
            if !method.global_params.iter().any(|p| p.name == k)
                && !method.model_params.iter().any(|p| p.name == k)
            {
                return Err(unknown_param(method, k, "parameters"));
            }
            check_value(k, v, "parameters")?;
        }
        let base = raw.base_model.as_ref().map(|b| b.path().to_string());
        let mut models: Vec<&ModelEntry> = Vec::new();
        for (i, m) in raw.models.iter().enumerate() {
            for (k, v) in &m.parameters {
                if !method.model_params.iter().any(|p| p.name == k) {
                    return Err(unknown_param(
                        method,
                        k,
                        &format!("models[{i}] ({})", m.model),
                    ));
                }
                check_value(k, v, &format!("models[{i}]"))?;
            }
            // mergekit lets the base model appear in `models`; its task vector is zero.
            if method.base != BaseUse::None && Some(&m.model) == base.as_ref() {
                continue;
            }
            models.push(m);
        }
        let has_base = match (method.base, &base) {
            (BaseUse::Required, None) => {
                return Err(config_err(format!(
                    "merge_method `{}` needs `base_model`",
                    method.name
                )));
            }
            (BaseUse::None, Some(b)) => {
                return Err(config_err(format!(
                    "merge_method `{}` does not use `base_model` (got `{b}`); list every model under `models`",
                    method.name
                )));
            }
            (_, b) => b.is_some(),
        };
        if models.len() < method.min_models {
            return Err(config_err(format!(
                "merge_method `{}` needs at least {} model(s) besides the base, got {}",
                method.name,
                method.min_models,
                models.len()
            )));
        }
        if let Some(max) = method.max_models
            && models.len() > max
        {
            return Err(config_err(format!(
                "merge_method `{}` takes at most {max} model(s) besides the base, got {}",
                method.name,
                models.len()
            )));
        }
        // Required per-model parameters must resolve for every model (per model or
        // globally); filtered values need a default entry.
        for (i, m) in models.iter().enumerate() {
            for p in method.model_params.iter().filter(|p| p.default.is_none()) {
                let v = m
                    .parameters
                    .get(p.name)
                    .or_else(|| raw.parameters.get(p.name));
                match v {
                    None => {
                        return Err(Error::MissingParam {
                            name: p.name.to_string(),
                            context: format!(
                                "models[{i}] ({}) of merge_method `{}` (set it there or under `parameters`)",
                                m.model, method.name
                            ),
                        });
                    }
                    Some(ParamValue::Filtered(list)) if list.iter().all(|e| e.filter.is_some()) => {
                        return Err(config_err(format!(
                            "parameter `{}` of models[{i}] has filters but no default entry ({{value: ...}} without `filter`)",
                            p.name
                        )));
                    }
                    _ => {}
                }
            }
        }
        for p in method.global_params.iter().filter(|p| p.default.is_none()) {
            if !raw.parameters.contains_key(p.name) {
                return Err(Error::MissingParam {
                    name: p.name.to_string(),
                    context: format!("`parameters` of merge_method `{}`", method.name),
                });
            }
        }
        let mut inputs: Vec<PathBuf> = Vec::new();
        if has_base {
            inputs.extend(base.iter().map(PathBuf::from));
        }
        inputs.extend(models.iter().map(|m| PathBuf::from(&m.model)));
        Ok(Config {
            method,
            inputs,
            has_base,
            model_params: models.iter().map(|m| m.parameters.clone()).collect(),
            global_params: raw.parameters,
            compute_f64,
            out_dtype,
            seed: 0,
        })
    }

    /// The value of per-model parameter `name` for model `i` (0-based among `models`,
    /// excluding the base) and tensor `tensor`: model value, else global, else default.
    pub fn model_param(&self, i: usize, name: &str, tensor: &str) -> Result<f64> {
        let v = self.model_params[i]
            .get(name)
            .or_else(|| self.global_params.get(name));
        self.resolve(name, v, tensor)
    }

    /// The value of global parameter `name` for tensor `tensor`.
    pub fn global_param(&self, name: &str, tensor: &str) -> Result<f64> {
        self.resolve(name, self.global_params.get(name), tensor)
    }

    fn resolve(&self, name: &str, v: Option<&ParamValue>, tensor: &str) -> Result<f64> {
        let default = self
            .method
            .model_params
            .iter()
            .chain(self.method.global_params)
            .find(|p| p.name == name)
            .and_then(|p| p.default);
        let missing = || Error::MissingParam {
            name: name.to_string(),
            context: format!("the merge config (tensor `{tensor}`)"),
        };
        match v {
            None => default.ok_or_else(missing),
            Some(ParamValue::Bool(b)) => Ok(f64::from(u8::from(*b))),
            Some(ParamValue::Number(x)) => Ok(*x),
            Some(ParamValue::Filtered(list)) => list
                .iter()
                .find(|e| {
                    e.filter
                        .as_ref()
                        .is_some_and(|f| tensor.contains(f.as_str()))
                })
                .or_else(|| list.iter().find(|e| e.filter.is_none()))
                .map(|e| e.value.get())
                .or(default)
                .ok_or_else(missing),
            Some(ParamValue::Gradient(_)) => {
                Err(Error::invalid(name, "gradient lists are not supported"))
            }
        }
    }
}

fn check_value(name: &str, v: &ParamValue, place: &str) -> Result<()> {
    let finite = |x: f64| {
        if x.is_finite() {
            Ok(())
        } else {
            Err(Error::invalid(
                name,
                format!("in {place} must be finite, got {x}"),
            ))
        }
    };
    match v {
        ParamValue::Bool(_) => Ok(()),
        ParamValue::Number(x) => finite(*x),
        ParamValue::Filtered(list) => list.iter().try_for_each(|e| finite(e.value.get())),
        ParamValue::Gradient(_) => Err(Error::invalid(
            name,
            format!(
                "in {place}: gradient lists (values interpolated across layers) are not supported; use [{{filter: NAME_PART, value: X}}, {{value: DEFAULT}}]"
            ),
        )),
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
        assert_eq!(c.model_param(0, "weight", "x").unwrap(), 0.3);
        assert_eq!(c.model_param(1, "weight", "l.attn.q").unwrap(), 2.0);
        assert_eq!(c.model_param(1, "weight", "l.mlp").unwrap(), 1.0);
        assert_eq!(c.global_param("normalize", "x").unwrap(), 1.0);
    }

    #[test]
    fn global_parameters_fill_in_per_model_ones() {
        let c = parse("merge_method: linear\nparameters:\n  weight: 0.5\n  normalize: false\nmodels:\n  - model: a\n  - model: b\n").unwrap();
        assert_eq!(c.model_param(1, "weight", "t").unwrap(), 0.5);
        assert_eq!(c.global_param("normalize", "t").unwrap(), 0.0);
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
                "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [0, 1]}\n",
                "gradient",
            ),
            (
                "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [{filter: x, value: 1}]}\n",
                "no default",
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
