//! A small LLaMA-style decoder in candle-nn with Hugging Face `LlamaForCausalLM`
//! parameter names, so that the crate's inferred `llama` spec applies to it unchanged:
//! RMSNorm, rotary embeddings (`rotate_half` layout, every head dimension rotated),
//! grouped-query causal attention, a SwiGLU MLP and an untied LM head.
//!
//! Shared by `examples/transformer_barrier` and `tests/candle/candle_decoder.rs`.

use modelfusion::StateDictF32;
use modelfusion::candle::candle_core::{D, DType, Device, Error, Result, Tensor};
use modelfusion::candle::candle_nn::{Embedding, Linear, Module, VarBuilder};
use modelfusion::perm::PermutationSpec;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// The sizes of the decoder.
#[derive(Clone, Copy, Debug)]
pub struct DecoderConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
}

const ROPE_THETA: f64 = 10_000.0;
const RMS_EPS: f64 = 1e-5;

impl DecoderConfig {
    /// The Hugging Face `config.json` of this decoder (what spec inference reads).
    pub fn hf_config(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": ROPE_THETA,
            "rms_norm_eps": RMS_EPS,
            "tie_word_embeddings": false,
        })
    }

    /// Every parameter's name and shape, in Hugging Face's order.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, q, kv, m) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        );
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for i in 0..self.layers {
            let l = format!("model.layers.{i}");
            v.extend([
                (format!("{l}.input_layernorm.weight"), vec![h]),
                (format!("{l}.self_attn.q_proj.weight"), vec![q, h]),
                (format!("{l}.self_attn.k_proj.weight"), vec![kv, h]),
                (format!("{l}.self_attn.v_proj.weight"), vec![kv, h]),
                (format!("{l}.self_attn.o_proj.weight"), vec![h, q]),
                (format!("{l}.post_attention_layernorm.weight"), vec![h]),
                (format!("{l}.mlp.gate_proj.weight"), vec![m, h]),
                (format!("{l}.mlp.up_proj.weight"), vec![m, h]),
                (format!("{l}.mlp.down_proj.weight"), vec![h, m]),
            ]);
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        v.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        v
    }

    /// Seeded initial parameters: every matrix normal with standard deviation `std`
    /// (Hugging Face's `initializer_range` is 0.02), norms at one.
    pub fn init(&self, seed: u64, std: f32) -> modelfusion::Result<StateDictF32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, std)
            .map_err(|e| modelfusion::Error::invalid("std", e.to_string()))?;
        StateDictF32::from_pairs(self.shapes().into_iter().map(|(name, shape)| {
            let t = if shape.len() == 1 {
                ndarray::ArrayD::ones(shape)
            } else {
                ndarray::ArrayD::from_shape_simple_fn(shape, || normal.sample(&mut rng))
            };
            (name, t)
        }))
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + RMS_EPS)?.sqrt()?;
    x.broadcast_div(&scale)?.broadcast_mul(weight)
}

/// `x * cos + rotate_half(x) * sin` on `(batch, heads, seq, head_dim)`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, d / 2)?,
        x.narrow(D::Minus1, d / 2, d / 2)?,
    );
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

struct Block {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// What one forward pass records for activation matching, named by the spec's groups.
pub struct Taps {
    /// `residual`: the hidden states at every block boundary (the embeddings, then every
    /// block's output), stacked along the samples.
    pub residual: Tensor,
    /// `layers.{i}.attn`: the rotated queries, then the per-head attention outputs,
    /// side by side (`(tokens, 2 * heads * head_dim)`).
    pub attn: Vec<Tensor>,
    /// `layers.{i}.mlp`: the gated products `silu(gate) * up`.
    pub mlp: Vec<Tensor>,
}

impl Taps {
    /// The features as `(group, (samples, features))` pairs.
    pub fn into_features(self) -> Vec<(String, Tensor)> {
        let mut out = vec![("residual".to_string(), self.residual)];
        for (i, (a, m)) in self.attn.into_iter().zip(self.mlp).enumerate() {
            out.push((format!("layers.{i}.attn"), a));
            out.push((format!("layers.{i}.mlp"), m));
        }
        out
    }
}

/// The decoder (`LlamaForCausalLM`).
pub struct Decoder {
    cfg: DecoderConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
}

impl Decoder {
    /// Reads the parameters from `vb` (Hugging Face names).
    pub fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let linear = |vb: &VarBuilder, name: &str, i: usize, o: usize| -> Result<Linear> {
            Ok(Linear::new(
                vb.get((o, i), &format!("{name}.weight"))?,
                None,
            ))
        };
        let (h, q, kv, m) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
            cfg.intermediate,
        );
        let model = vb.pp("model");
        let embed = Embedding::new(model.get((cfg.vocab, h), "embed_tokens.weight")?, h);
        let blocks = (0..cfg.layers)
            .map(|i| {
                let l = model.pp(format!("layers.{i}"));
                Ok(Block {
                    input_norm: l.get(h, "input_layernorm.weight")?,
                    q: linear(&l, "self_attn.q_proj", h, q)?,
                    k: linear(&l, "self_attn.k_proj", h, kv)?,
                    v: linear(&l, "self_attn.v_proj", h, kv)?,
                    o: linear(&l, "self_attn.o_proj", q, h)?,
                    post_norm: l.get(h, "post_attention_layernorm.weight")?,
                    gate: linear(&l, "mlp.gate_proj", h, m)?,
                    up: linear(&l, "mlp.up_proj", h, m)?,
                    down: linear(&l, "mlp.down_proj", m, h)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Decoder {
            cfg: *cfg,
            embed,
            blocks,
            norm: model.get(h, "norm.weight")?,
            lm_head: linear(&vb, "lm_head", h, cfg.vocab)?,
        })
    }

    /// Logits `(batch, seq, vocab)` of token ids `(batch, seq)` (`u32`).
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        Ok(self.run(tokens, false)?.0)
    }

    /// Logits and the features of every group of the inferred spec.
    pub fn forward_taps(&self, tokens: &Tensor) -> Result<(Tensor, Taps)> {
        let (logits, taps) = self.run(tokens, true)?;
        let taps = taps.ok_or_else(|| Error::Msg("the forward pass recorded no taps".into()))?;
        Ok((logits, taps))
    }

    fn run(&self, tokens: &Tensor, taps: bool) -> Result<(Tensor, Option<Taps>)> {
        let c = &self.cfg;
        let (b, t) = tokens.dims2()?;
        let dev = tokens.device();
        let (d, r) = (c.head_dim, c.heads / c.kv_heads);
        let (cos, sin) = rotary(t, d, dev)?;
        let mask = causal_mask(t, dev)?;
        let mut x = self.embed.forward(tokens)?;
        let flat = |x: &Tensor| x.reshape((b * t, ()));
        let mut stream = vec![];
        let (mut attn_taps, mut mlp_taps) = (vec![], vec![]);
        for blk in &self.blocks {
            if taps {
                stream.push(flat(&x)?);
            }
            let xn = rms_norm(&x, &blk.input_norm)?;
            let heads = |lin: &Linear, n: usize| -> Result<Tensor> {
                lin.forward(&xn)?
                    .reshape((b, t, n, d))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = rope(&heads(&blk.q, c.heads)?, &cos, &sin)?;
            let k = rope(&heads(&blk.k, c.kv_heads)?, &cos, &sin)?;
            let v = heads(&blk.v, c.kv_heads)?;
            // grouped-query attention: query head h reads key-value head h / r
            let repeat = |x: Tensor| -> Result<Tensor> {
                x.unsqueeze(2)?
                    .expand((b, c.kv_heads, r, t, d))?
                    .reshape((b, c.heads, t, d))
            };
            let (k, v) = (repeat(k)?, repeat(v)?);
            let scores =
                (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?.broadcast_add(&mask)?;
            let probs = modelfusion::candle::candle_nn::ops::softmax(&scores, D::Minus1)?;
            let att = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, t, c.heads * d))?;
            x = (x + blk.o.forward(&att)?)?;
            let xn = rms_norm(&x, &blk.post_norm)?;
            let gated = (blk.gate.forward(&xn)?.silu()? * blk.up.forward(&xn)?)?;
            x = (&x + blk.down.forward(&gated)?)?;
            if taps {
                let q = q.transpose(1, 2)?.reshape((b * t, c.heads * d))?;
                attn_taps.push(Tensor::cat(&[&q, &flat(&att)?], 1)?);
                mlp_taps.push(flat(&gated)?);
            }
        }
        let taps = if taps {
            stream.push(flat(&x)?);
            Some(Taps {
                residual: Tensor::cat(&stream, 0)?,
                attn: attn_taps,
                mlp: mlp_taps,
            })
        } else {
            None
        };
        let logits = self.lm_head.forward(&rms_norm(&x, &self.norm)?)?;
        Ok((logits, taps))
    }
}

/// `cos` and `sin` of `position * theta_i`, `(seq, head_dim)`, each frequency twice
/// (Hugging Face's `rotate_half` layout).
fn rotary(t: usize, d: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let mut angles = Vec::with_capacity(t * d);
    for p in 0..t {
        for j in 0..d {
            let i = j % (d / 2);
            angles.push(p as f64 * ROPE_THETA.powf(-((2 * i) as f64) / d as f64));
        }
    }
    let a = Tensor::from_vec(angles, (t, d), dev)?.to_dtype(DType::F32)?;
    Ok((a.cos()?, a.sin()?))
}

fn causal_mask(t: usize, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t * t)
        .map(|k| {
            if k % t > k / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(m, (t, t), dev)
}

/// `spec` with its attention groups held at the identity: their parameters' head axes
/// leave every group (declared invariant), everything else is kept (roles, passive and
/// tied parameters). Weight matching on it aligns the residual stream and the MLPs only.
pub fn without_heads(spec: &PermutationSpec) -> modelfusion::Result<PermutationSpec> {
    let mut file: serde_json::Value = serde_json::from_str(&spec.to_json()?)
        .map_err(|e| modelfusion::Error::invalid("spec", e.to_string()))?;
    let rules = file["rules"]
        .as_array_mut()
        .ok_or_else(|| modelfusion::Error::invalid("spec", "a spec file without rules"))?;
    let mut held = vec![];
    rules.retain(|rule| {
        if rule.get("heads").is_none() {
            return true;
        }
        held.extend(
            rule["params"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| p["param"].clone()),
        );
        false
    });
    rules.push(serde_json::json!({ "invariant": held }));
    PermutationSpec::from_json(&file.to_string())
}
