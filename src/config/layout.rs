//! Architecture layouts: per module (a decoder's one `default` module; a
//! vision-language model's text decoder, vision tower and projector; T5's and Whisper's
//! encoder and decoder), which tensors come before the layers, which make up a layer,
//! which follow them, and where the module's layer count is in `config.json`. They are
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

/// Where a module's layer count comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerCount {
    /// The first of these dotted `config.json` paths that is present
    /// (`vision_config.depth`); a sliced module's count is written back to the first of
    /// them present in the output's `config.json` (else the first).
    Key(&'static [&'static str]),
    /// A fixed count (a projector without layers: 0).
    Fixed(usize),
}

/// One module of an architecture: the tensors before its layers, those of one layer
/// (`{layer_prefix}{i}.{suffix}`) and those after them, all with their full names, and
/// where its layer count is. Single-module families have one module, `default`.
#[derive(Debug, PartialEq, Eq)]
pub struct Module {
    /// The module's name in a config's `modules:` (mergekit's: `default`,
    /// `text_decoder`, `vision_tower`, `encoder`, ...).
    pub name: &'static str,
    /// The tensors before the first layer.
    pub pre: &'static [LooseWeight],
    /// Layer tensor names start with this, then the layer index and a dot.
    pub layer_prefix: &'static str,
    /// The tensors of one layer, after `{layer_prefix}{i}.`.
    pub layer: &'static [&'static str],
    /// The entries of [`Module::layer`] a layer may lack (left out of an output layer
    /// when none of its sources has it).
    pub optional: &'static [&'static str],
    /// The tensors after the last layer.
    pub post: &'static [LooseWeight],
    /// Tensors that mergekit's table lists as layer tensors without a layer index
    /// (Qwen2-VL's projector MLP, in a module of two "layers"): it plans them once per
    /// layer and the last one is written, so they are merged once, from the last
    /// slice's sources, at the last layer's gradient position (1).
    pub repeated: &'static [&'static str],
    /// Its layer count.
    pub count: LayerCount,
}

/// An architecture: the `architectures` entries of `config.json` that select it and
/// its modules.
#[derive(Debug, PartialEq, Eq)]
pub struct Layout {
    /// The family, as mergekit names its table (`llama`, `qwen2_vl`, `t5`, ...).
    pub family: &'static str,
    /// The `architectures` entries of `config.json` that select it.
    pub architectures: &'static [&'static str],
    /// Its modules, in mergekit's order.
    pub modules: &'static [Module],
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

const QWEN2_LAYER: &[&str] = &[
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
];

const QWEN3_LAYER: &[&str] = &[
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
];

const EMBED: &[LooseWeight] = &[w("model.embed_tokens.weight")];
const NORM_HEAD: &[LooseWeight] = &[w("model.norm.weight"), TIED_HEAD];
const NUM_HIDDEN_LAYERS: LayerCount = LayerCount::Key(&["num_hidden_layers"]);

/// The one module (`default`) of a decoder whose tensors are `model.layers.{i}.*`.
const fn decoder(layer: &'static [&'static str], post: &'static [LooseWeight]) -> Module {
    Module {
        name: "default",
        pre: EMBED,
        layer_prefix: "model.layers.",
        layer,
        optional: &[],
        post,
        repeated: &[],
        count: NUM_HIDDEN_LAYERS,
    }
}

/// A module without layers (a projector).
const fn flat(name: &'static str, pre: &'static [LooseWeight]) -> Module {
    Module {
        name,
        pre,
        layer_prefix: "",
        layer: &[],
        optional: &[],
        post: &[],
        repeated: &[],
        count: LayerCount::Fixed(0),
    }
}

/// A vision-language model's text decoder: `{prefix}model.embed_tokens.weight`, layers
/// `{prefix}model.layers.{i}`, the final norm and a head tied to the embedding.
macro_rules! text_decoder {
    ($prefix:literal, $layer:expr, $head:literal, $count:expr) => {
        Module {
            name: "text_decoder",
            pre: &[w(concat!($prefix, "model.embed_tokens.weight"))],
            layer_prefix: concat!($prefix, "model.layers."),
            layer: $layer,
            optional: &[],
            post: &[
                w(concat!($prefix, "model.norm.weight")),
                LooseWeight {
                    name: $head,
                    optional: true,
                    tied: Some(concat!($prefix, "model.embed_tokens.weight")),
                },
            ],
            repeated: &[],
            count: $count,
        }
    };
}

/// Qwen2-VL keeps its text keys at the top level of `config.json` (transformers 5
/// writes them under `text_config`); Qwen2.5-VL under `text_config` first.
const QWEN2_VL_TEXT: Module = text_decoder!(
    "",
    QWEN2_LAYER,
    "lm_head.weight",
    LayerCount::Key(&["num_hidden_layers", "text_config.num_hidden_layers"])
);
const QWEN2_5_VL_TEXT: Module = text_decoder!(
    "",
    QWEN2_LAYER,
    "lm_head.weight",
    LayerCount::Key(&["text_config.num_hidden_layers", "num_hidden_layers"])
);

const QWEN2_VL_VISION: &[&str] = &[
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
];

const QWEN2_5_VL_VISION: &[&str] = &[
    "attn.proj.bias",
    "attn.proj.weight",
    "attn.qkv.bias",
    "attn.qkv.weight",
    "mlp.down_proj.bias",
    "mlp.down_proj.weight",
    "mlp.gate_proj.bias",
    "mlp.gate_proj.weight",
    "mlp.up_proj.bias",
    "mlp.up_proj.weight",
    "norm1.weight",
    "norm2.weight",
];

const QWEN3_VL_VISION: &[&str] = &[
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc1.bias",
    "mlp.linear_fc2.weight",
    "mlp.linear_fc2.bias",
];

const QWEN_PATCH: &[LooseWeight] = &[w("visual.patch_embed.proj.weight")];
const DEPTH: LayerCount = LayerCount::Key(&["vision_config.depth"]);

/// The Qwen2-VL / Qwen2.5-VL vision tower: `visual.patch_embed`, `visual.blocks.{i}`.
const fn qwen_vision(layer: &'static [&'static str]) -> Module {
    Module {
        name: "vision_tower",
        pre: QWEN_PATCH,
        layer_prefix: "visual.blocks.",
        layer,
        optional: &[],
        post: &[],
        repeated: &[],
        count: DEPTH,
    }
}

/// The Qwen2-VL / Qwen2.5-VL projector: its norm(s), then the MLP, which mergekit's
/// table lists as the tensors of each of two layers.
const fn qwen_merger(pre: &'static [LooseWeight]) -> Module {
    Module {
        repeated: &[
            "visual.merger.mlp.0.weight",
            "visual.merger.mlp.0.bias",
            "visual.merger.mlp.2.weight",
            "visual.merger.mlp.2.bias",
        ],
        count: LayerCount::Fixed(2),
        ..flat("multi_modal_projector", pre)
    }
}

/// Qwen3-VL (dense and MoE): everything under `model.language_model.` / `model.visual.`.
macro_rules! qwen3_vl {
    ($layer:expr) => {
        &[
            text_decoder!(
                "model.language_model.",
                $layer,
                "lm_head.weight",
                LayerCount::Key(&["text_config.num_hidden_layers"])
            ),
            Module {
                name: "multi_modal_projector",
                pre: &[
                    w("model.visual.merger.norm.weight"),
                    w("model.visual.merger.norm.bias"),
                    w("model.visual.merger.linear_fc1.weight"),
                    w("model.visual.merger.linear_fc1.bias"),
                    w("model.visual.merger.linear_fc2.weight"),
                    w("model.visual.merger.linear_fc2.bias"),
                ],
                layer_prefix: "model.visual.deepstack_merger_list.",
                layer: &[
                    "norm.weight",
                    "norm.bias",
                    "linear_fc1.weight",
                    "linear_fc1.bias",
                    "linear_fc2.weight",
                    "linear_fc2.bias",
                ],
                optional: &[],
                post: &[],
                repeated: &[],
                count: LayerCount::Fixed(3),
            },
            Module {
                name: "vision_tower",
                pre: &[
                    w("model.visual.patch_embed.proj.weight"),
                    w("model.visual.patch_embed.proj.bias"),
                    w("model.visual.pos_embed.weight"),
                ],
                layer_prefix: "model.visual.blocks.",
                layer: QWEN3_VL_VISION,
                optional: &[],
                post: &[],
                repeated: &[],
                count: DEPTH,
            },
        ]
    };
}

/// A T5 stack (`encoder.` or `decoder.`): its embedding (tied to `shared.weight`,
/// usually not stored), `block.{i}` and the final norm. The feed-forward names of both
/// T5 v1.0 (`wi`) and v1.1 (`wi_0`, `wi_1`) are listed, as optional.
macro_rules! t5_stack {
    ($name:literal, $layer:expr, $count:expr) => {
        Module {
            name: $name,
            pre: &[LooseWeight {
                name: concat!($name, ".embed_tokens.weight"),
                optional: true,
                tied: Some("shared.weight"),
            }],
            layer_prefix: concat!($name, ".block."),
            layer: $layer,
            optional: T5_OPTIONAL,
            post: &[w(concat!($name, ".final_layer_norm.weight"))],
            repeated: &[],
            count: $count,
        }
    };
}

const T5_OPTIONAL: &[&str] = &[
    "layer.0.SelfAttention.relative_attention_bias.weight",
    "layer.1.DenseReluDense.wi.weight",
    "layer.1.DenseReluDense.wi_0.weight",
    "layer.1.DenseReluDense.wi_1.weight",
    "layer.2.DenseReluDense.wi.weight",
    "layer.2.DenseReluDense.wi_0.weight",
    "layer.2.DenseReluDense.wi_1.weight",
];

const T5_ENCODER_LAYER: &[&str] = &[
    "layer.0.layer_norm.weight",
    "layer.0.SelfAttention.q.weight",
    "layer.0.SelfAttention.k.weight",
    "layer.0.SelfAttention.v.weight",
    "layer.0.SelfAttention.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight",
    "layer.1.DenseReluDense.wi.weight",
    "layer.1.DenseReluDense.wi_0.weight",
    "layer.1.DenseReluDense.wi_1.weight",
    "layer.1.DenseReluDense.wo.weight",
    "layer.1.layer_norm.weight",
];

const T5_DECODER_LAYER: &[&str] = &[
    "layer.0.layer_norm.weight",
    "layer.0.SelfAttention.q.weight",
    "layer.0.SelfAttention.k.weight",
    "layer.0.SelfAttention.v.weight",
    "layer.0.SelfAttention.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight",
    "layer.1.EncDecAttention.q.weight",
    "layer.1.EncDecAttention.k.weight",
    "layer.1.EncDecAttention.v.weight",
    "layer.1.EncDecAttention.o.weight",
    "layer.1.layer_norm.weight",
    "layer.2.DenseReluDense.wi.weight",
    "layer.2.DenseReluDense.wi_0.weight",
    "layer.2.DenseReluDense.wi_1.weight",
    "layer.2.DenseReluDense.wo.weight",
    "layer.2.layer_norm.weight",
];

const WHISPER_ENCODER_LAYER: &[&str] = &[
    "fc1.bias",
    "fc1.weight",
    "fc2.bias",
    "fc2.weight",
    "final_layer_norm.bias",
    "final_layer_norm.weight",
    "self_attn.k_proj.weight",
    "self_attn.out_proj.bias",
    "self_attn.out_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.q_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn_layer_norm.bias",
    "self_attn_layer_norm.weight",
];

const WHISPER_DECODER_LAYER: &[&str] = &[
    "encoder_attn.k_proj.weight",
    "encoder_attn.out_proj.bias",
    "encoder_attn.out_proj.weight",
    "encoder_attn.q_proj.bias",
    "encoder_attn.q_proj.weight",
    "encoder_attn.v_proj.bias",
    "encoder_attn.v_proj.weight",
    "encoder_attn_layer_norm.bias",
    "encoder_attn_layer_norm.weight",
    "fc1.bias",
    "fc1.weight",
    "fc2.bias",
    "fc2.weight",
    "final_layer_norm.bias",
    "final_layer_norm.weight",
    "self_attn.k_proj.weight",
    "self_attn.out_proj.bias",
    "self_attn.out_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.q_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn_layer_norm.bias",
    "self_attn_layer_norm.weight",
];

const LLAMA4_TEXT_LAYER: &[&str] = &[
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "feed_forward.shared_expert.down_proj.weight",
    "feed_forward.shared_expert.gate_proj.weight",
    "feed_forward.shared_expert.up_proj.weight",
    "feed_forward.experts.down_proj",
    "feed_forward.experts.gate_up_proj",
    "feed_forward.router.weight",
    "feed_forward.down_proj.weight",
    "feed_forward.gate_proj.weight",
    "feed_forward.up_proj.weight",
];

/// The layouts known: mergekit 0.1.5's tables of the same families (its JSON files
/// under `_data/architectures`), restated with full tensor names (its
/// `weight_prefix` written out).
pub const LAYOUTS: &[Layout] = &[
    Layout {
        family: "llama",
        architectures: &["LlamaForCausalLM", "LLaMaForCausalLM"],
        modules: &[decoder(LLAMA_LAYER, NORM_HEAD)],
    },
    Layout {
        family: "mistral",
        architectures: &["MistralForCausalLM"],
        modules: &[decoder(LLAMA_LAYER, NORM_HEAD)],
    },
    Layout {
        family: "qwen2",
        architectures: &["Qwen2ForCausalLM"],
        modules: &[decoder(QWEN2_LAYER, NORM_HEAD)],
    },
    Layout {
        family: "qwen3",
        architectures: &["Qwen3ForCausalLM"],
        modules: &[decoder(QWEN3_LAYER, NORM_HEAD)],
    },
    Layout {
        family: "gemma",
        architectures: &["GemmaForCausalLM"],
        modules: &[decoder(LLAMA_LAYER, &[w("model.norm.weight")])],
    },
    Layout {
        family: "qwen2_vl",
        architectures: &["Qwen2VLForConditionalGeneration"],
        modules: &[
            QWEN2_VL_TEXT,
            qwen_merger(&[w("visual.merger.ln_q.weight"), w("visual.merger.ln_q.bias")]),
            qwen_vision(QWEN2_VL_VISION),
        ],
    },
    Layout {
        family: "qwen2_5_vl",
        architectures: &["Qwen2_5_VLForConditionalGeneration"],
        modules: &[
            QWEN2_5_VL_TEXT,
            qwen_merger(&[w("visual.merger.ln_q.weight")]),
            qwen_vision(QWEN2_5_VL_VISION),
        ],
    },
    Layout {
        family: "qwen3_vl",
        architectures: &["Qwen3VLMoeForConditionalGeneration"],
        modules: qwen3_vl!(&[
            "input_layernorm.weight",
            "mlp.experts.down_proj",
            "mlp.experts.gate_up_proj",
            "mlp.gate.weight",
            "post_attention_layernorm.weight",
            "self_attn.k_norm.weight",
            "self_attn.k_proj.weight",
            "self_attn.q_norm.weight",
            "self_attn.q_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
        ]),
    },
    Layout {
        family: "qwen3_vl_dense",
        architectures: &["Qwen3VLForConditionalGeneration"],
        modules: qwen3_vl!(QWEN3_LAYER),
    },
    Layout {
        family: "mistral3",
        architectures: &["Mistral3ForConditionalGeneration"],
        modules: &[
            text_decoder!(
                "language_model.",
                LLAMA_LAYER,
                "language_model.lm_head.weight",
                LayerCount::Key(&["text_config.num_hidden_layers"])
            ),
            flat(
                "multi_modal_projector",
                &[
                    w("multi_modal_projector.linear_1.weight"),
                    w("multi_modal_projector.linear_2.weight"),
                    w("multi_modal_projector.norm.weight"),
                    w("multi_modal_projector.patch_merger.merging_layer.weight"),
                ],
            ),
            Module {
                name: "vision_tower",
                pre: &[
                    w("vision_tower.patch_conv.weight"),
                    w("vision_tower.ln_pre.weight"),
                ],
                layer_prefix: "vision_tower.transformer.layers.",
                layer: &[
                    "ffn_norm.weight",
                    "feed_forward.down_proj.weight",
                    "feed_forward.gate_proj.weight",
                    "feed_forward.up_proj.weight",
                    "attention_norm.weight",
                    "attention.k_proj.weight",
                    "attention.o_proj.weight",
                    "attention.q_proj.weight",
                    "attention.v_proj.weight",
                ],
                optional: &[],
                post: &[],
                repeated: &[],
                count: LayerCount::Key(&["vision_config.num_hidden_layers"]),
            },
        ],
    },
    Layout {
        family: "gemma3vl",
        architectures: &["Gemma3ForConditionalGeneration"],
        modules: &[
            text_decoder!(
                "language_model.",
                &[
                    "input_layernorm.weight",
                    "self_attn.q_proj.weight",
                    "self_attn.q_norm.weight",
                    "self_attn.k_proj.weight",
                    "self_attn.k_norm.weight",
                    "self_attn.v_proj.weight",
                    "self_attn.o_proj.weight",
                    "post_attention_layernorm.weight",
                    "pre_feedforward_layernorm.weight",
                    "mlp.up_proj.weight",
                    "mlp.gate_proj.weight",
                    "mlp.down_proj.weight",
                    "post_feedforward_layernorm.weight",
                ],
                "language_model.lm_head.weight",
                LayerCount::Key(&["text_config.num_hidden_layers"])
            ),
            flat(
                "multi_modal_projector",
                &[
                    w("multi_modal_projector.mm_input_projection_weight"),
                    w("multi_modal_projector.mm_soft_emb_norm.weight"),
                ],
            ),
            Module {
                name: "vision_tower",
                pre: &[
                    w("vision_tower.vision_model.embeddings.patch_embedding.bias"),
                    w("vision_tower.vision_model.embeddings.patch_embedding.weight"),
                    w("vision_tower.vision_model.embeddings.position_embedding.weight"),
                ],
                layer_prefix: "vision_tower.vision_model.encoder.layers.",
                layer: &[
                    "layer_norm1.bias",
                    "layer_norm1.weight",
                    "layer_norm2.bias",
                    "layer_norm2.weight",
                    "mlp.fc1.bias",
                    "mlp.fc1.weight",
                    "mlp.fc2.bias",
                    "mlp.fc2.weight",
                    "self_attn.k_proj.bias",
                    "self_attn.k_proj.weight",
                    "self_attn.out_proj.bias",
                    "self_attn.out_proj.weight",
                    "self_attn.q_proj.bias",
                    "self_attn.q_proj.weight",
                    "self_attn.v_proj.bias",
                    "self_attn.v_proj.weight",
                ],
                optional: &[],
                post: &[
                    w("vision_tower.vision_model.post_layernorm.bias"),
                    w("vision_tower.vision_model.post_layernorm.weight"),
                ],
                repeated: &[],
                count: LayerCount::Key(&["vision_config.num_hidden_layers"]),
            },
        ],
    },
    Layout {
        family: "llama4",
        architectures: &["Llama4ForConditionalGeneration"],
        modules: &[
            Module {
                optional: LLAMA4_TEXT_LAYER.split_at(6).1,
                ..text_decoder!(
                    "language_model.",
                    LLAMA4_TEXT_LAYER,
                    "language_model.lm_head.weight",
                    LayerCount::Key(&["text_config.num_hidden_layers"])
                )
            },
            flat(
                "multi_modal_projector",
                &[w("multi_modal_projector.linear_1.weight")],
            ),
            Module {
                name: "vision_model",
                pre: &[
                    w("vision_model.class_embedding"),
                    w("vision_model.patch_embedding.linear.weight"),
                    w("vision_model.positional_embedding_vlm"),
                    w("vision_model.layernorm_pre.bias"),
                    w("vision_model.layernorm_pre.weight"),
                ],
                layer_prefix: "vision_model.model.layers.",
                layer: &[
                    "input_layernorm.weight",
                    "input_layernorm.bias",
                    "mlp.fc1.weight",
                    "mlp.fc1.bias",
                    "mlp.fc2.weight",
                    "mlp.fc2.bias",
                    "post_attention_layernorm.weight",
                    "post_attention_layernorm.bias",
                    "self_attn.k_proj.weight",
                    "self_attn.k_proj.bias",
                    "self_attn.o_proj.weight",
                    "self_attn.o_proj.bias",
                    "self_attn.q_proj.weight",
                    "self_attn.q_proj.bias",
                    "self_attn.v_proj.weight",
                    "self_attn.v_proj.bias",
                ],
                optional: &[],
                post: &[
                    w("vision_model.layernorm_post.weight"),
                    w("vision_model.layernorm_post.bias"),
                    w("vision_model.vision_adapter.mlp.fc1.weight"),
                    w("vision_model.vision_adapter.mlp.fc2.weight"),
                ],
                repeated: &[],
                count: LayerCount::Key(&["vision_config.num_hidden_layers"]),
            },
        ],
    },
    Layout {
        family: "t5",
        architectures: &["T5ForConditionalGeneration"],
        modules: &[
            t5_stack!(
                "decoder",
                T5_DECODER_LAYER,
                LayerCount::Key(&["num_decoder_layers"])
            ),
            t5_stack!(
                "encoder",
                T5_ENCODER_LAYER,
                LayerCount::Key(&["num_layers"])
            ),
            Module {
                post: &[LooseWeight {
                    name: "lm_head.weight",
                    optional: true,
                    tied: Some("shared.weight"),
                }],
                ..flat("shared", &[w("shared.weight")])
            },
        ],
    },
    Layout {
        family: "whisper",
        architectures: &["WhisperForConditionalGeneration"],
        modules: &[
            Module {
                name: "decoder",
                pre: &[
                    w("model.decoder.embed_tokens.weight"),
                    w("model.decoder.embed_positions.weight"),
                ],
                layer_prefix: "model.decoder.layers.",
                layer: WHISPER_DECODER_LAYER,
                optional: &[],
                post: &[
                    w("model.decoder.layer_norm.bias"),
                    w("model.decoder.layer_norm.weight"),
                ],
                repeated: &[],
                count: LayerCount::Key(&["decoder_layers"]),
            },
            Module {
                name: "encoder",
                pre: &[
                    w("model.encoder.embed_positions.weight"),
                    w("model.encoder.conv1.bias"),
                    w("model.encoder.conv1.weight"),
                    w("model.encoder.conv2.bias"),
                    w("model.encoder.conv2.weight"),
                ],
                layer_prefix: "model.encoder.layers.",
                layer: WHISPER_ENCODER_LAYER,
                optional: &[],
                post: &[
                    w("model.encoder.layer_norm.bias"),
                    w("model.encoder.layer_norm.weight"),
                ],
                repeated: &[],
                count: LayerCount::Key(&["encoder_layers"]),
            },
        ],
    },
];

/// A checkpoint's layout and the layer count of each of its modules, read from its
/// `config.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelLayout {
    /// The family's tensor lists.
    pub layout: &'static Layout,
    /// The layer count of each of `layout.modules`, in that order.
    pub layers: Vec<usize>,
}

/// The value at dotted path `key` (`vision_config.depth`) of a JSON object.
fn dotted<'v>(config: &'v serde_json::Value, key: &str) -> Option<&'v serde_json::Value> {
    key.split('.').try_fold(config, |v, part| v.get(part))
}

impl Layout {
    /// The layout `config.json` selects through its `architectures` entry, or `None`
    /// when it names none or one not listed in [`LAYOUTS`].
    ///
    /// ```
    /// use modelfusion::config::Layout;
    /// let cfg = serde_json::json!({"architectures": ["Qwen2ForCausalLM"]});
    /// assert_eq!(Layout::of_config(&cfg).unwrap().family, "qwen2");
    /// let vl = serde_json::json!({"architectures": ["Qwen2VLForConditionalGeneration"]});
    /// assert_eq!(Layout::of_config(&vl).unwrap().modules.len(), 3);
    /// assert!(Layout::of_config(&serde_json::json!({})).is_none());
    /// ```
    pub fn of_config(config: &serde_json::Value) -> Option<&'static Layout> {
        let arch = config.get("architectures")?.as_array()?.first()?.as_str()?;
        LAYOUTS.iter().find(|l| l.architectures.contains(&arch))
    }

    /// The index among [`Layout::modules`] of the module called `name`, or an error
    /// (under `key`) listing the layout's modules.
    ///
    /// ```
    /// use modelfusion::config::Layout;
    /// let t5 = Layout::of_config(&serde_json::json!({"architectures": ["T5ForConditionalGeneration"]})).unwrap();
    /// assert_eq!(t5.modules[t5.module_index("encoder", "modules")?].layer_prefix, "encoder.block.");
    /// let err = t5.module_index("vision_tower", "modules").unwrap_err().to_string();
    /// assert!(err.contains("decoder, encoder, shared"), "{err}");
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn module_index(&self, name: &str, key: &str) -> Result<usize> {
        self.modules
            .iter()
            .position(|m| m.name == name)
            .ok_or_else(|| {
                Error::invalid(
                    key,
                    format!(
                        "`{name}` is not a module of the {} architecture; its modules are {}",
                        self.family,
                        self.module_names()
                    ),
                )
            })
    }

    /// The names of the modules, comma-separated (for messages).
    ///
    /// ```
    /// assert_eq!(modelfusion::config::LAYOUTS[0].module_names(), "default");
    /// ```
    pub fn module_names(&self) -> String {
        self.modules
            .iter()
            .map(|m| m.name)
            .collect::<Vec<_>>()
            .join(", ")
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
        self.modules.iter().any(|m| m.has_tensor(name))
    }
}

impl Module {
    /// The name of tensor `suffix` (one of [`Module::layer`]) of layer `i`.
    ///
    /// ```
    /// use modelfusion::config::LAYOUTS;
    /// assert_eq!(LAYOUTS[0].modules[0].layer_tensor(3, "mlp.up_proj.weight"), "model.layers.3.mlp.up_proj.weight");
    /// ```
    pub fn layer_tensor(&self, i: usize, suffix: &str) -> String {
        format!("{}{i}.{suffix}", self.layer_prefix)
    }

    /// Whether `name` is one of this module's tensors, for some layer index.
    ///
    /// ```
    /// use modelfusion::config::LAYOUTS;
    /// assert!(LAYOUTS[0].modules[0].has_tensor("model.layers.2.mlp.up_proj.weight"));
    /// ```
    pub fn has_tensor(&self, name: &str) -> bool {
        if self.pre.iter().chain(self.post).any(|l| l.name == name) || self.repeated.contains(&name)
        {
            return true;
        }
        !self.layer.is_empty()
            && name
                .strip_prefix(self.layer_prefix)
                .and_then(|rest| rest.split_once('.'))
                .is_some_and(|(i, suffix)| {
                    i.parse::<usize>().is_ok() && self.layer.contains(&suffix)
                })
    }

    /// The module's layer count in `config` (a `config.json`), or `None` when none of
    /// its keys holds a whole number.
    ///
    /// ```
    /// use modelfusion::config::Layout;
    /// let vl = Layout::of_config(&serde_json::json!({"architectures": ["Qwen2VLForConditionalGeneration"]})).unwrap();
    /// let cfg = serde_json::json!({"num_hidden_layers": 4, "vision_config": {"depth": 2}});
    /// let counts: Vec<_> = vl.modules.iter().map(|m| m.layers_in(&cfg)).collect();
    /// assert_eq!(counts, [Some(4), Some(2), Some(2)]);
    /// ```
    pub fn layers_in(&self, config: &serde_json::Value) -> Option<usize> {
        match self.count {
            LayerCount::Fixed(n) => Some(n),
            LayerCount::Key(keys) => keys.iter().find_map(|k| {
                dotted(config, k)
                    .and_then(serde_json::Value::as_u64)
                    .and_then(|n| usize::try_from(n).ok())
            }),
        }
    }

    /// Where its layer count comes from, for messages: the `config.json` key(s), after
    /// the module's name unless it is `default`.
    ///
    /// ```
    /// use modelfusion::config::{Layout, LAYOUTS};
    /// assert_eq!(LAYOUTS[0].modules[0].count_label(), "num_hidden_layers");
    /// let vl = Layout::of_config(&serde_json::json!({"architectures": ["Qwen2VLForConditionalGeneration"]})).unwrap();
    /// assert_eq!(vl.modules[2].count_label(), "vision_tower: vision_config.depth");
    /// assert_eq!(vl.modules[1].count_label(), "multi_modal_projector: always 2");
    /// ```
    pub fn count_label(&self) -> String {
        let what = match self.count {
            LayerCount::Key(keys) => keys.join(" or "),
            LayerCount::Fixed(n) => format!("always {n}"),
        };
        match self.name {
            "default" => what,
            name => format!("{name}: {what}"),
        }
    }

    /// The `config.json` key its layer count is written to in `config` (the first of
    /// its keys present there, else the first), or `None` for a fixed count.
    ///
    /// ```
    /// use modelfusion::config::Layout;
    /// let t5 = Layout::of_config(&serde_json::json!({"architectures": ["T5ForConditionalGeneration"]})).unwrap();
    /// let cfg = serde_json::json!({"num_layers": 2});
    /// assert_eq!(t5.modules[0].count_key(&cfg), Some("num_decoder_layers"));
    /// assert_eq!(t5.modules[2].count_key(&cfg), None);
    /// ```
    pub fn count_key(&self, config: &serde_json::Value) -> Option<&'static str> {
        match self.count {
            LayerCount::Fixed(_) => None,
            LayerCount::Key(keys) => keys
                .iter()
                .find(|k| dotted(config, k).is_some())
                .or(keys.first())
                .copied(),
        }
    }
}

impl ModelLayout {
    /// The layout of checkpoint `ck` (`role` names it in errors, `key` is the config key
    /// that needs it): its `config.json` must name a known architecture and hold the
    /// layer count of every module.
    pub fn of(ck: &Checkpoint, role: &str, key: &str) -> Result<ModelLayout> {
        let place = format!("{role} ({})", ck.path().display());
        let config = config_of(ck)?.ok_or_else(|| {
            Error::invalid(
                key,
                format!(
                    "{place} has no config.json: `{key}` needs its `architectures` and layer counts"
                ),
            )
        })?;
        let layout = Layout::of_config(&config).ok_or_else(|| {
            let arch = config.get("architectures").map_or("none".to_string(), |a| a.to_string());
            let known: Vec<&str> = LAYOUTS.iter().flat_map(|l| l.architectures.iter().copied()).collect();
            Error::invalid(
                key,
                format!(
                    "{place}: config.json `architectures` is {arch}; `{key}` knows the layouts of {known:?} (mergekit's definitions; other layouts are not inferred)"
                ),
            )
        })?;
        let layers = layout
            .modules
            .iter()
            .map(|m| {
                m.layers_in(&config).ok_or_else(|| {
                    Error::invalid(
                        key,
                        format!(
                            "{place}: config.json has no whole-number layer count ({}) of the {} architecture",
                            m.count_label(),
                            layout.family
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelLayout { layout, layers })
    }
}
