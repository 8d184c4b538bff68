//! Hugging Face transformer checkpoints: specs from tensor names, shapes and
//! `config.json` (see [`super::infer`]).
//!
//! Every family has one residual-stream group (`residual`: embeddings, every block's
//! input and output projections, norms, the final norm, the LM head), one attention
//! group per layer (`layers.{i}.attn`, structured: see [`super::HeadLayout`]) and one
//! MLP group per layer (`layers.{i}.mlp`).

use serde_json::Value;

use super::infer::Shapes;
use super::{HeadLayout, HeadSlot, PermutationSpec, Role, SpecBuilder};

type Found = std::result::Result<(PermutationSpec, String, String), String>;

const RESIDUAL: &str = "residual";

/// The model types this module reads.
pub(super) const MODEL_TYPES: [&str; 8] = [
    "llama",
    "mistral",
    "qwen2",
    "gpt2",
    "bert",
    "roberta",
    "distilbert",
    "vit",
];

/// A spec under construction over a checkpoint's shapes.
struct Tx<'a> {
    b: SpecBuilder,
    s: &'a Shapes,
    /// GPT-2's Conv1D layers store weights `(in, out)`.
    conv1d: bool,
}

impl Tx<'_> {
    fn has(&self, name: &str) -> bool {
        self.s.contains_key(name)
    }

    fn need(&self, name: &str) -> std::result::Result<&Vec<usize>, String> {
        self.s.get(name).ok_or_else(|| format!("no `{name}`"))
    }

    /// Axes of a linear layer's weight: (output axis, input axis).
    fn axes(&self) -> (usize, usize) {
        if self.conv1d { (1, 0) } else { (0, 1) }
    }

    fn role(&mut self, group: &str, param: String, axis: usize, role: Role) {
        self.b.param(
            group,
            param,
            axis,
            super::AxisRule {
                role: Some(role),
                repeat: 1,
            },
        );
    }

    /// `layer` writes `group` (and its bias, when present).
    fn writes(&mut self, group: &str, layer: &str) -> std::result::Result<(), String> {
        let w = format!("{layer}.weight");
        self.need(&w)?;
        let (out, _) = self.axes();
        self.role(group, w, out, Role::Produce);
        let bias = format!("{layer}.bias");
        if self.has(&bias) {
            self.role(group, bias, 0, Role::Follow);
        }
        Ok(())
    }

    /// `layer` reads `group`.
    fn reads(&mut self, group: &str, layer: &str) -> std::result::Result<(), String> {
        let w = format!("{layer}.weight");
        self.need(&w)?;
        let (_, inp) = self.axes();
        self.role(group, w, inp, Role::Consume);
        Ok(())
    }

    /// An embedding table `(entries, hidden)` writes the residual stream.
    fn embedding(&mut self, name: &str) -> std::result::Result<(), String> {
        self.need(name)?;
        self.role(RESIDUAL, name.to_string(), 1, Role::Produce);
        self.b.invariant(name);
        Ok(())
    }

    fn norm(&mut self, prefix: &str) -> std::result::Result<(), String> {
        if self.has(&format!("{prefix}.bias")) {
            self.b.layer_norm(RESIDUAL, prefix);
        } else if self.has(&format!("{prefix}.weight")) {
            self.b.rms_norm(RESIDUAL, prefix);
        } else {
            return Err(format!("no norm `{prefix}.weight`"));
        }
        Ok(())
    }

    /// An MLP: `up` layers write its group, `down` reads it; `up` read and `down` writes
    /// the residual stream.
    fn mlp(&mut self, group: &str, up: &[String], down: &str) -> std::result::Result<(), String> {
        for l in up {
            self.reads(RESIDUAL, l)?;
            self.writes(group, l)?;
        }
        self.reads(group, down)?;
        self.writes(RESIDUAL, down)
    }

    /// Separate q, k, v, o layers: q/k/v read the residual stream, o writes it.
    fn attention(
        &mut self,
        group: &str,
        layout: HeadLayout,
        qkvo: [&str; 4],
    ) -> std::result::Result<(), String> {
        let [q, k, v, o] = qkvo;
        for (l, slot) in [
            (q, HeadSlot::Query),
            (k, HeadSlot::Key),
            (v, HeadSlot::Value),
        ] {
            let shape = self.need(&format!("{l}.weight"))?;
            config_fits(
                &layout,
                slot,
                &format!("{l}.weight"),
                shape.first().copied().unwrap_or(0),
            )?;
            self.reads(RESIDUAL, l)?;
        }
        let bias = [q, k, v].map(|l| self.has(&format!("{l}.bias")));
        if bias.iter().any(|&b| b != bias[0]) {
            return Err(format!("only some of `{q}`, `{k}`, `{v}` have a bias"));
        }
        self.b.attention_layers(group, layout, qkvo, bias[0]);
        self.writes(RESIDUAL, o)
    }

    /// One block's attention (group `layers.{i}.attn`), the norm between attention and
    /// MLP, and the MLP (group `layers.{i}.mlp`).
    fn block(
        &mut self,
        i: usize,
        layout: HeadLayout,
        qkvo: [String; 4],
        mid_norm: &str,
        (up, down): (&[String], &str),
    ) -> std::result::Result<(), String> {
        let [q, k, v, o] = &qkvo;
        self.attention(
            &format!("layers.{i}.attn"),
            layout,
            [q, k, v, o].map(String::as_str),
        )?;
        self.norm(mid_norm)?;
        self.mlp(&format!("layers.{i}.mlp"), up, down)
    }

    fn finish(
        self,
        family: &str,
        reason: String,
    ) -> std::result::Result<(PermutationSpec, String, String), String> {
        let spec = self.b.build().map_err(|e| e.to_string())?;
        Ok((spec, family.to_string(), reason))
    }
}

/// The config's head layout disagrees with a tensor's length.
fn config_fits(
    layout: &HeadLayout,
    slot: HeadSlot,
    param: &str,
    len: usize,
) -> std::result::Result<(), String> {
    let want = layout.slot_len(slot);
    if want == len {
        return Ok(());
    }
    Err(format!(
        "config.json gives {} attention heads, {} key-value heads and head_dim {}, so `{param}` should have {want} {} entries, but it has {len}",
        layout.heads(),
        layout.kv_heads(),
        layout.head_dim(),
        slot.as_str()
    ))
}

fn int(config: &Value, keys: &[&str]) -> Option<usize> {
    keys.iter()
        .find_map(|k| config.get(k).and_then(Value::as_u64))
        .and_then(|v| usize::try_from(v).ok())
}

fn need_int(config: &Value, keys: &[&str]) -> std::result::Result<usize, String> {
    int(config, keys).ok_or_else(|| format!("config.json has no integer `{}`", keys[0]))
}

/// The prefix before `suffix` of the one tensor name ending so (`model.`, `bert.`, ``).
fn prefix_of(s: &Shapes, suffix: &str) -> std::result::Result<String, String> {
    s.keys()
        .find_map(|n| n.strip_suffix(suffix))
        .map(str::to_string)
        .ok_or_else(|| format!("no tensor named `...{suffix}`"))
}

fn layout_from(
    config: &Value,
    hidden: usize,
    heads_keys: &[&str],
) -> std::result::Result<HeadLayout, String> {
    let heads = need_int(config, heads_keys)?;
    if heads == 0 {
        return Err(format!("config.json says `{}` = 0", heads_keys[0]));
    }
    let kv = int(config, &["num_key_value_heads"]).unwrap_or(heads);
    let head_dim = int(config, &["head_dim"]).unwrap_or(hidden / heads);
    HeadLayout::new(heads, kv, head_dim).map_err(|e| format!("config.json: {e}"))
}

fn layers(config: &Value, keys: &[&str]) -> std::result::Result<usize, String> {
    let n = need_int(config, keys)?;
    if n == 0 {
        return Err(format!("config.json says `{}` = 0", keys[0]));
    }
    Ok(n)
}

/// What every family reads first: the name prefix (`model.`, `bert.`, ...), the token
/// embedding, `hidden_size`, the layer count and the head layout, checked against the
/// embedding's shape.
struct Base {
    p: String,
    embed: String,
    hidden: usize,
    n: usize,
    layout: HeadLayout,
}

/// [`Base`] from the embedding's name suffix and the config keys (each with its
/// aliases) of the hidden size, the layer count and the head count.
fn base(
    s: &Shapes,
    config: &Value,
    embed_suffix: &str,
    [hidden_keys, layer_keys, head_keys]: [&[&str]; 3],
) -> std::result::Result<Base, String> {
    let p = prefix_of(s, embed_suffix)?;
    let embed = format!("{p}{embed_suffix}");
    let hidden = hidden_size(config, hidden_keys, s, &embed)?;
    Ok(Base {
        n: layers(config, layer_keys)?,
        layout: layout_from(config, hidden, head_keys)?,
        p,
        embed,
        hidden,
    })
}

impl<'a> Tx<'a> {
    fn new(s: &'a Shapes, conv1d: bool) -> Self {
        Tx {
            b: SpecBuilder::new(),
            s,
            conv1d,
        }
    }
}

/// Detects the family named by `config.json`'s `model_type`.
pub(super) fn detect(s: &Shapes, config: &Value, model_type: &str) -> Found {
    match model_type {
        "llama" | "mistral" | "qwen2" => llama(s, config, model_type),
        "gpt2" => gpt2(s, config),
        "bert" | "roberta" => bert(s, config, model_type),
        "distilbert" => distilbert(s, config),
        "vit" => vit(s, config),
        other => Err(format!(
            "model_type `{other}` is not one of {MODEL_TYPES:?}"
        )),
    }
}

fn hidden_size(
    config: &Value,
    keys: &[&str],
    s: &Shapes,
    embed: &str,
) -> std::result::Result<usize, String> {
    let hidden = need_int(config, keys)?;
    if let Some(sh) = s.get(embed).filter(|sh| sh.last() != Some(&hidden)) {
        return Err(format!(
            "config.json says `{}` = {hidden} but `{embed}` has shape {sh:?}",
            keys[0]
        ));
    }
    Ok(hidden)
}

/// LLaMA, Mistral, Qwen2: RMSNorm, rotary embeddings, grouped-query attention, gated MLP.
fn llama(s: &Shapes, config: &Value, family: &str) -> Found {
    let Base {
        p,
        embed,
        hidden,
        n,
        mut layout,
    } = base(
        s,
        config,
        "embed_tokens.weight",
        [
            &["hidden_size"],
            &["num_hidden_layers"],
            &["num_attention_heads"],
        ],
    )?;
    let partial = config
        .get("partial_rotary_factor")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    let rotary = ((layout.head_dim() as f64 * partial).round() as usize) & !1;
    layout = layout
        .with_rotary_dim(rotary.min(layout.head_dim()))
        .map_err(|e| format!("config.json: {e}"))?;
    let mut t = Tx::new(s, false);
    t.embedding(&embed)?;
    for i in 0..n {
        let l = format!("{p}layers.{i}");
        t.norm(&format!("{l}.input_layernorm"))?;
        let a = format!("{l}.self_attn");
        let m = format!("{l}.mlp");
        t.block(
            i,
            layout,
            ["q_proj", "k_proj", "v_proj", "o_proj"].map(|x| format!("{a}.{x}")),
            &format!("{l}.post_attention_layernorm"),
            (
                &[format!("{m}.gate_proj"), format!("{m}.up_proj")],
                &format!("{m}.down_proj"),
            ),
        )?;
    }
    t.norm(&format!("{p}norm"))?;
    let tied = lm_head(&mut t, "lm_head.weight", &embed, config)?;
    let reason = format!(
        "{n} decoder layers, hidden {hidden}, {} heads ({} key-value) of {} dims, rotary on {}, {tied}",
        layout.heads(),
        layout.kv_heads(),
        layout.head_dim(),
        layout.rotary_dim()
    );
    t.finish(family, reason)
}

/// The LM head: untied (its own weight reads the residual stream), tied and saved (a
/// passive copy of the embedding), or tied and left out of the checkpoint.
fn lm_head(
    t: &mut Tx<'_>,
    head: &str,
    embed: &str,
    config: &Value,
) -> std::result::Result<&'static str, String> {
    let tied = config
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    if !t.has(head) {
        return if tied {
            Ok("LM head tied to the embedding")
        } else {
            Err(format!(
                "config.json says the embeddings are untied but there is no `{head}`"
            ))
        };
    }
    t.b.invariant(head);
    if tied {
        t.b.tied(head, embed);
        Ok("LM head tied to the embedding (saved as a copy)")
    } else {
        t.role(RESIDUAL, head.to_string(), 1, Role::Consume);
        Ok("untied LM head")
    }
}

/// GPT-2: Conv1D layers (weights `(in, out)`), fused `c_attn`, learned positions.
fn gpt2(s: &Shapes, config: &Value) -> Found {
    let Base {
        p,
        embed: wte,
        hidden,
        n,
        layout,
    } = base(
        s,
        config,
        "wte.weight",
        [
            &["n_embd", "hidden_size"],
            &["n_layer", "num_hidden_layers"],
            &["n_head", "num_attention_heads"],
        ],
    )?;
    let mut t = Tx::new(s, true);
    t.embedding(&wte)?;
    t.embedding(&format!("{p}wpe.weight"))?;
    for i in 0..n {
        let l = format!("{p}h.{i}");
        t.norm(&format!("{l}.ln_1"))?;
        let g = format!("layers.{i}.attn");
        let qkv = format!("{l}.attn.c_attn");
        let shape = t.need(&format!("{qkv}.weight"))?;
        config_fits(
            &layout,
            HeadSlot::FusedQkv,
            &format!("{qkv}.weight"),
            shape.get(1).copied().unwrap_or(0),
        )?;
        t.reads(RESIDUAL, &qkv)?;
        t.b.attention(&g, layout).head_param(
            &g,
            format!("{qkv}.weight"),
            1,
            Role::Produce,
            HeadSlot::FusedQkv,
        );
        if t.has(&format!("{qkv}.bias")) {
            t.b.head_param(
                &g,
                format!("{qkv}.bias"),
                0,
                Role::Follow,
                HeadSlot::FusedQkv,
            );
        }
        let proj = format!("{l}.attn.c_proj");
        t.need(&format!("{proj}.weight"))?;
        t.b.head_param(
            &g,
            format!("{proj}.weight"),
            0,
            Role::Consume,
            HeadSlot::Output,
        );
        t.writes(RESIDUAL, &proj)?;
        t.norm(&format!("{l}.ln_2"))?;
        t.mlp(
            &format!("layers.{i}.mlp"),
            &[format!("{l}.mlp.c_fc")],
            &format!("{l}.mlp.c_proj"),
        )?;
    }
    t.norm(&format!("{p}ln_f"))?;
    let tied = lm_head(&mut t, "lm_head.weight", &wte, config)?;
    let reason = format!(
        "{n} blocks, hidden {hidden}, {} heads of {} dims, fused c_attn, {tied}",
        layout.heads(),
        layout.head_dim()
    );
    t.finish("gpt2", reason)
}

/// A hidden-to-hidden transform before a tied decoder (BERT's and DistilBERT's MLM
/// heads): both axes are the residual stream, then a LayerNorm.
fn mlm_transform(t: &mut Tx<'_>, dense: &str, norm: &str) -> std::result::Result<(), String> {
    t.reads(RESIDUAL, dense)?;
    t.writes(RESIDUAL, dense)?;
    t.norm(norm)
}

/// A tied (or untied) decoder over the vocabulary and its invariant bias.
fn decoder(
    t: &mut Tx<'_>,
    weight: &str,
    biases: &[String],
    embed: &str,
    config: &Value,
) -> std::result::Result<(), String> {
    lm_head(t, weight, embed, config)?;
    for b in biases {
        if t.has(b) {
            t.b.invariant(b.as_str());
        }
    }
    Ok(())
}

/// BERT and RoBERTa encoders (post-norm), with a masked-LM head or a pooler if present.
fn bert(s: &Shapes, config: &Value, family: &str) -> Found {
    let Base {
        p,
        embed: words,
        hidden,
        n,
        layout,
    } = base(
        s,
        config,
        "embeddings.word_embeddings.weight",
        [
            &["hidden_size"],
            &["num_hidden_layers"],
            &["num_attention_heads"],
        ],
    )?;
    let mut t = Tx::new(s, false);
    t.embedding(&words)?;
    for e in ["position_embeddings", "token_type_embeddings"] {
        let name = format!("{p}embeddings.{e}.weight");
        if t.has(&name) {
            t.embedding(&name)?;
        }
    }
    t.norm(&format!("{p}embeddings.LayerNorm"))?;
    for i in 0..n {
        let l = format!("{p}encoder.layer.{i}");
        let a = format!("{l}.attention");
        t.block(
            i,
            layout,
            ["self.query", "self.key", "self.value", "output.dense"].map(|x| format!("{a}.{x}")),
            &format!("{a}.output.LayerNorm"),
            (
                &[format!("{l}.intermediate.dense")],
                &format!("{l}.output.dense"),
            ),
        )?;
        t.norm(&format!("{l}.output.LayerNorm"))?;
    }
    let mut heads = Vec::new();
    pooler(&mut t, &format!("{p}pooler.dense"), &mut heads)?;
    for (dense, norm, dec, biases) in [
        (
            "cls.predictions.transform.dense",
            "cls.predictions.transform.LayerNorm",
            "cls.predictions.decoder.weight",
            vec!["cls.predictions.bias", "cls.predictions.decoder.bias"],
        ),
        (
            "lm_head.dense",
            "lm_head.layer_norm",
            "lm_head.decoder.weight",
            vec!["lm_head.bias", "lm_head.decoder.bias"],
        ),
    ] {
        if t.has(&format!("{dense}.weight")) {
            mlm_transform(&mut t, dense, norm)?;
            let biases: Vec<String> = biases.into_iter().map(str::to_string).collect();
            decoder(&mut t, dec, &biases, &words, config)?;
            heads.push("masked-LM head");
        }
    }
    let reason = encoder_reason(n, hidden, &layout, &heads);
    t.finish(family, reason)
}

/// What an encoder detector found, in words.
fn encoder_reason(n: usize, hidden: usize, layout: &HeadLayout, heads: &[&str]) -> String {
    format!(
        "{n} encoder layers, hidden {hidden}, {} heads of {} dims{}",
        layout.heads(),
        layout.head_dim(),
        heads.iter().map(|h| format!(", {h}")).collect::<String>()
    )
}

/// A pooler reads the residual stream; its output is the model's (invariant).
fn pooler(
    t: &mut Tx<'_>,
    dense: &str,
    found: &mut Vec<&'static str>,
) -> std::result::Result<(), String> {
    if t.has(&format!("{dense}.weight")) {
        t.reads(RESIDUAL, dense)?;
        t.b.invariant(format!("{dense}.weight"))
            .invariant(format!("{dense}.bias"));
        found.push("pooler");
    }
    Ok(())
}

/// DistilBERT (post-norm), with its masked-LM head if present.
fn distilbert(s: &Shapes, config: &Value) -> Found {
    let Base {
        p,
        embed: words,
        hidden,
        n,
        layout,
    } = base(
        s,
        config,
        "embeddings.word_embeddings.weight",
        [
            &["dim", "hidden_size"],
            &["n_layers", "num_hidden_layers"],
            &["n_heads", "num_attention_heads"],
        ],
    )?;
    let mut t = Tx::new(s, false);
    t.embedding(&words)?;
    let pos = format!("{p}embeddings.position_embeddings.weight");
    if t.has(&pos) {
        t.embedding(&pos)?;
    }
    t.norm(&format!("{p}embeddings.LayerNorm"))?;
    for i in 0..n {
        let l = format!("{p}transformer.layer.{i}");
        t.block(
            i,
            layout,
            ["q_lin", "k_lin", "v_lin", "out_lin"].map(|x| format!("{l}.attention.{x}")),
            &format!("{l}.sa_layer_norm"),
            (&[format!("{l}.ffn.lin1")], &format!("{l}.ffn.lin2")),
        )?;
        t.norm(&format!("{l}.output_layer_norm"))?;
    }
    let mut heads = Vec::new();
    if t.has("vocab_transform.weight") {
        mlm_transform(&mut t, "vocab_transform", "vocab_layer_norm")?;
        decoder(
            &mut t,
            "vocab_projector.weight",
            &["vocab_projector.bias".to_string()],
            &words,
            config,
        )?;
        heads.push("masked-LM head");
    }
    let reason = encoder_reason(n, hidden, &layout, &heads);
    t.finish("distilbert", reason)
}

/// ViT: patch-embedding convolution, class token and position embeddings on the last
/// axis, pre-norm encoder layers, final norm, classifier or pooler.
fn vit(s: &Shapes, config: &Value) -> Found {
    let p = prefix_of(s, "embeddings.patch_embeddings.projection.weight")?;
    let patch = format!("{p}embeddings.patch_embeddings.projection");
    let hidden = need_int(config, &["hidden_size"])?;
    let n = layers(config, &["num_hidden_layers"])?;
    let layout = layout_from(config, hidden, &["num_attention_heads"])?;
    let mut t = Tx::new(s, false);
    let w = t.need(&format!("{patch}.weight"))?;
    if w.first() != Some(&hidden) {
        return Err(format!(
            "config.json says `hidden_size` = {hidden} but `{patch}.weight` has shape {w:?}"
        ));
    }
    t.writes(RESIDUAL, &patch)?;
    t.b.invariant(format!("{patch}.weight"));
    for e in ["cls_token", "position_embeddings"] {
        let name = format!("{p}embeddings.{e}");
        let sh = t.need(&name)?;
        if sh.len() != 3 {
            return Err(format!("`{name}` has shape {sh:?}, expected 3 axes"));
        }
        t.role(RESIDUAL, name.clone(), 2, Role::Follow);
        t.b.invariant(name);
    }
    for i in 0..n {
        let l = format!("{p}encoder.layer.{i}");
        t.norm(&format!("{l}.layernorm_before"))?;
        let a = format!("{l}.attention");
        t.block(
            i,
            layout,
            [
                "attention.query",
                "attention.key",
                "attention.value",
                "output.dense",
            ]
            .map(|x| format!("{a}.{x}")),
            &format!("{l}.layernorm_after"),
            (
                &[format!("{l}.intermediate.dense")],
                &format!("{l}.output.dense"),
            ),
        )?;
    }
    t.norm(&format!("{p}layernorm"))?;
    let mut heads = Vec::new();
    pooler(&mut t, &format!("{p}pooler.dense"), &mut heads)?;
    if t.has("classifier.weight") {
        t.reads(RESIDUAL, "classifier")?;
        t.b.invariant("classifier.weight")
            .invariant("classifier.bias");
        heads.push("classifier");
    }
    let reason = encoder_reason(n, hidden, &layout, &heads);
    t.finish("vit", reason)
}
