//! Decoder layouts: which tensors come before the layers, which make up a layer and
//! which follow them, for the architectures whose layers a config can slice. They are
//! mergekit 0.1.5's architecture definitions of the same families (its JSON files under
//! `_data/architectures`), restated as tables.

use crate::io::{Checkpoint, config_of};
use crate::{Error, Result};

/// One tensor outside the layers (before or after them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LooseWeight {
    /// The tensor name.
    pub name: &'static str,
    /// Whether a checkpoint may lack it (it is then left out when no source has it).
    pub optional: bool,
    /// A tensor read in its place from a checkpoint that lacks it (a tied LM head reads
    /// the embedding).
    pub tied: Option<&'static str>,
}

const fn w(name: &'static str) -> LooseWeight {
    LooseWeight {
        name,
        optional: false,
        tied: None,
    }
}

/// The LM head tied to the embedding, optional (mergekit's Llama-like definitions).
const TIED_HEAD: LooseWeight = LooseWeight {
    name: "lm_head.weight",
    optional: true,
    tied: Some("model.embed_tokens.weight"),
};

/// A decoder family whose layers are `{layer_prefix}{i}.{suffix}`.
#[derive(Debug, PartialEq, Eq)]
pub struct Layout {
    /// The family, as mergekit names it (`llama`, `mistral`, `qwen2`, ...).
    pub family: &'static str,
    /// The `architectures` entries of `config.json` that select it.
    pub architectures: &'static [&'static str],
    /// The tensors before the first layer.
    pub pre: &'static [LooseWeight],
    /// Layer tensor names start with this, then the layer index and a dot.
    pub layer_prefix: &'static str,
    /// The tensors of one layer, after `{layer_prefix}{i}.`.
    pub layer: &'static [&'static str],
    /// The tensors after the last layer.
    pub post: &'static [LooseWeight],
}

const LLAMA_LAYER: &[&str] = &[
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.up_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.down_proj.weight",
];

const EMBED: &[LooseWeight] = &[w("model.embed_tokens.weight")];
const NORM_HEAD: &[LooseWeight] = &[w("model.norm.weight"), TIED_HEAD];

/// The layouts known, with mergekit 0.1.5's tensor lists.
pub const LAYOUTS: &[Layout] = &[
    Layout {
        family: "llama",
        architectures: &["LlamaForCausalLM", "LLaMaForCausalLM"],
        pre: EMBED,
        layer_prefix: "model.layers.",
        layer: LLAMA_LAYER,
        post: NORM_HEAD,
    },
    Layout {
        family: "mistral",
        architectures: &["MistralForCausalLM"],
        pre: EMBED,
        layer_prefix: "model.layers.",
        layer: LLAMA_LAYER,
        post: NORM_HEAD,
    },
    Layout {
        family: "qwen2",
        architectures: &["Qwen2ForCausalLM"],
        pre: EMBED,
        layer_prefix: "model.layers.",
        layer: &[
            "input_layernorm.weight",
            "mlp.down_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "post_attention_layernorm.weight",
            "self_attn.k_proj.bias",
            "self_attn.k_proj.weight",
            "self_attn.o_proj.weight",
            "self_attn.q_proj.bias",
            "self_attn.q_proj.weight",
            "self_attn.v_proj.bias",
            "self_attn.v_proj.weight",
        ],
        post: NORM_HEAD,
    },
    Layout {
        family: "qwen3",
        architectures: &["Qwen3ForCausalLM"],
        pre: EMBED,
        layer_prefix: "model.layers.",
        layer: &[
            "input_layernorm.weight",
            "mlp.down_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "post_attention_layernorm.weight",
            "self_attn.k_norm.weight",
            "self_attn.k_proj.weight",
            "self_attn.q_norm.weight",
            "self_attn.q_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
        ],
        post: NORM_HEAD,
    },
    Layout {
        family: "gemma",
        architectures: &["GemmaForCausalLM"],
        pre: EMBED,
        layer_prefix: "model.layers.",
        layer: LLAMA_LAYER,
        post: &[w("model.norm.weight")],
    },
];

/// A checkpoint's layout and layer count, read from its `config.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelLayout {
    /// The family's tensor lists.
    pub layout: &'static Layout,
    /// `num_hidden_layers` of its `config.json`.
    pub layers: usize,
}

impl Layout {
    /// The layout `config.json` selects through its `architectures` entry, or `None`
    /// when it names none or one not listed in [`LAYOUTS`].
    ///
    /// ```
    /// use modelfusion::config::Layout;
    /// let cfg = serde_json::json!({"architectures": ["Qwen2ForCausalLM"]});
    /// assert_eq!(Layout::of_config(&cfg).unwrap().family, "qwen2");
    /// assert!(Layout::of_config(&serde_json::json!({})).is_none());
    /// ```
    pub fn of_config(config: &serde_json::Value) -> Option<&'static Layout> {
        let arch = config.get("architectures")?.as_array()?.first()?.as_str()?;
        LAYOUTS.iter().find(|l| l.architectures.contains(&arch))
    }

    /// The name of tensor `suffix` (one of [`Layout::layer`]) of layer `i`.
    ///
    /// ```
    /// use modelfusion::config::LAYOUTS;
    /// assert_eq!(LAYOUTS[0].layer_tensor(3, "mlp.up_proj.weight"), "model.layers.3.mlp.up_proj.weight");
    /// ```
    pub fn layer_tensor(&self, i: usize, suffix: &str) -> String {
        format!("{}{i}.{suffix}", self.layer_prefix)
    }

    /// Whether `name` is one of this layout's tensors, for some layer index.
    ///
    /// ```
    /// use modelfusion::config::LAYOUTS;
    /// assert!(LAYOUTS[0].has_tensor("model.layers.7.self_attn.q_proj.weight"));
    /// assert!(!LAYOUTS[0].has_tensor("model.layers.7.self_attn.rotary_emb.inv_freq"));
    /// assert!(LAYOUTS[0].has_tensor("lm_head.weight"));
    /// ```
    pub fn has_tensor(&self, name: &str) -> bool {
        if self.pre.iter().chain(self.post).any(|l| l.name == name) {
            return true;
        }
        name.strip_prefix(self.layer_prefix)
            .and_then(|rest| rest.split_once('.'))
            .is_some_and(|(i, suffix)| i.parse::<usize>().is_ok() && self.layer.contains(&suffix))
    }
}

impl ModelLayout {
    /// The layout of checkpoint `ck` (`role` names it in errors): its `config.json`
    /// must name a known architecture and hold `num_hidden_layers`.
    pub fn of(ck: &Checkpoint, role: &str) -> Result<ModelLayout> {
        let place = format!("{role} ({})", ck.path().display());
        let config = config_of(ck)?.ok_or_else(|| {
            Error::invalid(
                "slices",
                format!(
                    "{place} has no config.json: layer slices need its `architectures` and `num_hidden_layers`"
                ),
            )
        })?;
        let layout = Layout::of_config(&config).ok_or_else(|| {
            let arch = config.get("architectures").map_or("none".to_string(), |a| a.to_string());
            let known: Vec<&str> = LAYOUTS.iter().flat_map(|l| l.architectures.iter().copied()).collect();
            Error::invalid(
                "slices",
                format!(
                    "{place}: config.json `architectures` is {arch}; layer slices know the layouts of {known:?} (mergekit's definitions; other layouts are not inferred)"
                ),
            )
        })?;
        let layers = config
            .get("num_hidden_layers")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| {
                Error::invalid(
                    "slices",
                    format!("{place}: config.json has no whole-number `num_hidden_layers`"),
                )
            })?;
        Ok(ModelLayout {
            layout,
            layers: usize::try_from(layers).map_err(|_| {
                Error::invalid(
                    "num_hidden_layers",
                    format!("{place}: {layers} is too large"),
                )
            })?,
        })
    }
}
