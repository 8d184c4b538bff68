//! Specs inferred from a checkpoint's tensor names and shapes (and `config.json`).
//!
//! One small detector per family reads the names (PyTorch's `state_dict` naming) and
//! shapes (and, for transformers, `config.json`: `model_type`, head counts) and either builds the spec, says why the family does not fit, or fails with
//! the first tensors it cannot explain; nothing is guessed.
//!
//! | family | names it reads |
//! |---|---|
//! | `modelfusion-res-mlp` | the crate's residual MLP: `stem`, `blocks.{j}.{norm,fc1,fc2}`, `head` |
//! | `modelfusion-vgg` | the crate's VGG: `convs.{i}`, `norms.{i}`, `fcs.{j}` |
//! | `torchvision-resnet`, `cifar-resnet` | `conv1`/`bn1` stem, `layer{s}.{b}.conv{k}`/`bn{k}` blocks (BasicBlock or Bottleneck), `downsample.{0,1}` or `shortcut.{0,1}` projections, `fc` or `linear` head: torchvision ResNet-18..152, the CIFAR ResNet-20 of the REPAIR code and the crate's own [`ResNet`](super::specs::ResNet) |
//! | `llama`, `mistral`, `qwen2` (config `model_type`) | `[model.]embed_tokens`, `layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}`, `norm`, `lm_head` (tied or untied): grouped-query attention and rotary dimensions from `config.json` |
//! | `gpt2` | `[transformer.]wte`, `wpe`, `h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_f`: Conv1D weights `(in, out)`, fused QKV |
//! | `bert`, `roberta` | `[bert.]embeddings.*`, `encoder.layer.{i}.{attention.self.{query,key,value}, attention.output.{dense,LayerNorm}, intermediate.dense, output.{dense,LayerNorm}}`, pooler, masked-LM head (`cls.predictions.*`, `lm_head.*`) |
//! | `distilbert` | `[distilbert.]embeddings.*`, `transformer.layer.{i}.{attention.{q,k,v,out}_lin, sa_layer_norm, ffn.lin{1,2}, output_layer_norm}`, `vocab_{transform,layer_norm,projector}` |
//! | `vit` | `[vit.]embeddings.{cls_token, position_embeddings, patch_embeddings.projection}`, `encoder.layer.{i}.{layernorm_before, attention.attention.{query,key,value}, attention.output.dense, layernorm_after, intermediate.dense, output.dense}`, `layernorm`, `classifier` |
//! | `sequential-mlp`, `named-mlp`, `torchvision-vgg`, `cnn` | convolutions then linear layers, in name order, each optionally followed by a norm: `nn.Sequential` MLPs (`0`, `2`, ...), named MLPs (`fc1`, `fc2`, ...), torchvision VGG (`features.{i}`, `classifier.{j}`, with the flatten factor of the 7x7 pool), the crate's [`MlpShapes`](super::specs::MlpShapes) |
//!
//! ```
//! use modelfusion::perm::infer::infer_spec;
//! let shapes = [
//!     ("0.weight", vec![32, 64]), ("0.bias", vec![32]),
//!     ("2.weight", vec![32, 32]), ("2.bias", vec![32]),
//!     ("4.weight", vec![10, 32]), ("4.bias", vec![10]),
//! ];
//! let found = infer_spec(shapes.iter().map(|(n, s)| (*n, s.as_slice())), None)?;
//! assert_eq!(found.family, "sequential-mlp");
//! assert_eq!(found.spec.num_groups(), 2);
//! assert!(found.reason.contains("3 linear"));
//! # Ok::<(), modelfusion::Error>(())
//! ```

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use super::specs::{Architecture, ResMlpShapes, Vgg};
use super::{PermutationSpec, SpecBuilder, transformers};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::Tensor;

/// A detected family and its spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Inferred {
    /// The family's short name (see the module table).
    pub family: String,
    /// What was found, in words (stages, blocks, layers, flatten factors).
    pub reason: String,
    /// The spec.
    pub spec: PermutationSpec,
}

pub(super) type Shapes = BTreeMap<String, Vec<usize>>;

/// Infers the spec of a model from its (float) parameter names and shapes.
///
/// ```
/// use modelfusion::perm::infer::infer_model_spec;
/// use modelfusion::perm::specs::{Architecture, ResNet};
/// let arch = ResNet::resnet20(2, 10);
/// let found = infer_model_spec(&arch.random_model(0), None)?;
/// assert_eq!(found.spec, arch.spec());
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn infer_model_spec<M: Model>(
    model: &M,
    config: Option<&serde_json::Value>,
) -> Result<Inferred> {
    let shapes: Vec<(&str, &[usize])> = model
        .names()
        .filter_map(|n| model.get(n).map(|t| (n, t.shape())))
        .collect();
    infer_spec(shapes, config)
}

/// Infers the spec from `(name, shape)` pairs of the float tensors (non-float buffers
/// such as `num_batches_tracked` may be included; they are ignored) and, when given, the
/// `config.json` beside the checkpoint. Errors, naming what each detector found wrong
/// (and the first tensors no detector explains), rather than guessing.
pub fn infer_spec<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    config: Option<&serde_json::Value>,
) -> Result<Inferred> {
    let shapes: Shapes = tensors
        .into_iter()
        .filter(|(n, _)| !n.ends_with("num_batches_tracked"))
        .map(|(n, s)| (n.to_string(), s.to_vec()))
        .collect();
    if let Some((config, kind)) = config.and_then(|c| {
        c.get("model_type")
            .and_then(serde_json::Value::as_str)
            .map(|k| (c, k))
    }) {
        if !transformers::MODEL_TYPES.contains(&kind) {
            return Err(Error::Unsupported {
                what: format!("config.json says model_type `{kind}`"),
                reason: format!(
                    "the transformer families read are {:?}; write a spec file for others",
                    transformers::MODEL_TYPES
                ),
            });
        }
        let (spec, family, reason) =
            transformers::detect(&shapes, config, kind).map_err(|e| Error::Spec {
                reason: format!("{kind} detector: {e}"),
            })?;
        explained(&shapes, &spec).map_err(|e| Error::Spec {
            reason: format!("{kind} detector: {e}"),
        })?;
        return Ok(Inferred {
            family,
            reason,
            spec,
        });
    }
    if shapes.is_empty() {
        return Err(Error::empty("the checkpoint's float tensors"));
    }
    let detectors: [(&str, Detector); 4] = [
        ("modelfusion-res-mlp", res_mlp),
        ("modelfusion-vgg", crate_vgg),
        ("resnet", resnet),
        ("chain", chain),
    ];
    let mut why = Vec::new();
    for (detector, detect) in detectors {
        match detect(&shapes) {
            Ok((spec, family, reason)) => {
                explained(&shapes, &spec).map_err(|e| Error::Spec {
                    reason: format!("{detector} detector ({family}): {e}"),
                })?;
                return Ok(Inferred {
                    family: family.to_string(),
                    reason,
                    spec,
                });
            }
            Err(e) => why.push(format!("{detector}: {e}")),
        }
    }
    Err(Error::Spec {
        reason: format!(
            "no known architecture fits these {} tensors ({}: {}); write a spec file (see `modelfusion spec --help`)",
            shapes.len(),
            preview(&shapes.keys().map(String::as_str).collect::<Vec<_>>()),
            why.join("; ")
        ),
    })
}

/// A detector: the spec, the family's name and what was found, or why it does not fit.
type Detector = fn(&Shapes) -> std::result::Result<(PermutationSpec, String, String), String>;

/// Every tensor is in the spec or invariant.
fn explained(shapes: &Shapes, spec: &PermutationSpec) -> std::result::Result<(), String> {
    let mentioned: BTreeSet<&str> = spec.param_names().collect();
    let missing: Vec<&str> = shapes
        .keys()
        .map(String::as_str)
        .filter(|n| !mentioned.contains(n) && !spec.is_invariant(n))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("unexplained tensors {}", preview(&missing)))
    }
}

fn preview(names: &[&str]) -> String {
    let mut s: Vec<String> = names.iter().take(5).map(|n| format!("`{n}`")).collect();
    if names.len() > 5 {
        s.push(format!("... ({} in all)", names.len()));
    }
    s.join(", ")
}

/// Name order with numeric parts compared as numbers (`fc2 < fc10`, `layer1.2 < layer1.10`).
fn natural(a: &str, b: &str) -> Ordering {
    fn parts(s: &str) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut text = String::new();
        let mut num: Option<u64> = None;
        for c in s.chars() {
            match (c.to_digit(10), num) {
                (Some(d), Some(n)) => num = Some(n.saturating_mul(10).saturating_add(d as u64)),
                (Some(d), None) => num = Some(d as u64),
                (None, Some(n)) => {
                    out.push((std::mem::take(&mut text), n));
                    num = None;
                    text.push(c);
                }
                (None, None) => text.push(c),
            }
        }
        out.push((text, num.unwrap_or(0)));
        out
    }
    parts(a).cmp(&parts(b))
}

/// The crate's residual MLP, reconstructed exactly from its shapes.
fn res_mlp(s: &Shapes) -> std::result::Result<(PermutationSpec, String, String), String> {
    let (stem, head) = match (s.get("stem.weight"), s.get("head.weight")) {
        (Some(a), Some(b)) if a.len() == 2 && b.len() == 2 => (a, b),
        _ => return Err("no `stem.weight` and `head.weight`".into()),
    };
    let blocks = (0..)
        .take_while(|j| s.contains_key(&format!("blocks.{j}.fc1.weight")))
        .count();
    let hidden = s
        .get("blocks.0.fc1.weight")
        .map_or(1, |w| w.first().copied().unwrap_or(1));
    let arch =
        ResMlpShapes::new(stem[1], stem[0], hidden, blocks, head[0]).map_err(|e| e.to_string())?;
    exact(s, &arch)?;
    Ok((
        arch.spec(),
        "modelfusion-res-mlp".into(),
        format!(
            "stem {} -> {} blocks of width {} (hidden {hidden}) -> head {}",
            stem[1], blocks, stem[0], head[0]
        ),
    ))
}

/// The crate's VGG, reconstructed exactly from its shapes.
fn crate_vgg(s: &Shapes) -> std::result::Result<(PermutationSpec, String, String), String> {
    let first = s.get("convs.0.weight").ok_or("no `convs.0.weight`")?;
    if first.len() != 4 {
        return Err("`convs.0.weight` is not 4-D".into());
    }
    let channels: Vec<usize> = (0..)
        .map_while(|i| s.get(&format!("convs.{i}.weight")).map(|w| w[0]))
        .collect();
    let fc: Vec<usize> = (0..)
        .map_while(|j| {
            s.get(&format!("fcs.{j}.weight"))
                .and_then(|w| w.first().copied())
        })
        .collect();
    let arch = Vgg::new(first[1], &channels, &fc, first[2]).map_err(|e| e.to_string())?;
    exact(s, &arch)?;
    Ok((
        arch.spec(),
        "modelfusion-vgg".into(),
        format!(
            "{} convolutions {:?} and {} linear layers {:?}",
            channels.len(),
            channels,
            fc.len(),
            fc
        ),
    ))
}

/// The shapes are exactly the architecture's.
fn exact(s: &Shapes, arch: &impl Architecture) -> std::result::Result<(), String> {
    let want: Shapes = arch.shapes().into_iter().collect();
    if &want == s {
        return Ok(());
    }
    let off: Vec<&str> = s
        .iter()
        .filter(|(n, sh)| want.get(*n) != Some(sh))
        .map(|(n, _)| n.as_str())
        .chain(
            want.keys()
                .filter(|n| !s.contains_key(*n))
                .map(String::as_str),
        )
        .collect();
    Err(format!("names or shapes differ at {}", preview(&off)))
}

/// Adds a norm layer `prefix` on `group` in whichever form it has (batch norm with
/// running statistics, layer norm with a bias, RMS norm with a weight only); returns
/// whether one was there.
fn add_norm(b: &mut SpecBuilder, s: &Shapes, group: &str, prefix: &str) -> bool {
    let has = |p: &str| s.contains_key(&format!("{prefix}.{p}"));
    if has("running_mean") {
        b.batch_norm(group, prefix);
    } else if has("weight") && has("bias") {
        b.layer_norm(group, prefix);
    } else if has("weight") {
        b.rms_norm(group, prefix);
    } else {
        return false;
    }
    true
}

fn out_of(s: &Shapes, layer: &str) -> usize {
    s.get(&format!("{layer}.weight"))
        .and_then(|w| w.first().copied())
        .unwrap_or(0)
}

/// Residual networks: stem, stages of blocks, head.
fn resnet(s: &Shapes) -> std::result::Result<(PermutationSpec, String, String), String> {
    match s.get("conv1.weight") {
        Some(w) if w.len() == 4 => {}
        _ => return Err("no 4-D stem `conv1.weight`".into()),
    }
    // (stage, block) -> convs, in order.
    let mut blocks: BTreeMap<(usize, usize), BTreeSet<usize>> = BTreeMap::new();
    for n in s.keys() {
        let Some(rest) = n.strip_prefix("layer") else {
            continue;
        };
        let mut it = rest.split('.');
        let (Some(st), Some(bl), Some(conv)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if let (Ok(st), Ok(bl), Some(k)) = (
            st.parse::<usize>(),
            bl.parse::<usize>(),
            conv.strip_prefix("conv")
                .and_then(|k| k.parse::<usize>().ok()),
        ) {
            blocks.entry((st, bl)).or_default().insert(k);
        }
    }
    if blocks.is_empty() {
        return Err("no `layer{s}.{b}.conv{k}.weight` blocks".into());
    }
    let head = ["fc", "linear"]
        .into_iter()
        .find(|h| s.get(&format!("{h}.weight")).is_some_and(|w| w.len() == 2))
        .ok_or("no 2-D head `fc.weight` or `linear.weight`")?;
    let proj_of = |st: usize, bl: usize| {
        ["downsample", "shortcut"]
            .into_iter()
            .map(|p| format!("layer{st}.{bl}.{p}"))
            .find(|p| {
                s.get(&format!("{p}.0.weight"))
                    .is_some_and(|w| w.len() == 4)
            })
    };
    let mut b = SpecBuilder::new();
    let first_proj = proj_of(1, 0).is_some();
    let mut current = if first_proj {
        "stem".to_string()
    } else {
        "stream.1".to_string()
    };
    let conv_bias = |l: &str| s.contains_key(&format!("{l}.bias"));
    b.producer(&current, "conv1", conv_bias("conv1"));
    add_norm(&mut b, s, &current, "bn1");
    let mut kinds = BTreeSet::new();
    let mut projections = 0;
    for (&(st, bl), convs) in &blocks {
        let l = format!("layer{st}.{bl}");
        let convs: Vec<usize> = convs.iter().copied().collect();
        kinds.insert(convs.len());
        if convs.len() < 2 {
            return Err(format!("block `{l}` has {} convolution(s)", convs.len()));
        }
        let input = current.clone();
        if let Some(p) = proj_of(st, bl) {
            projections += 1;
            current = format!("stream.{st}");
            b.consumer(&input, &format!("{p}.0"));
            b.producer(&current, &format!("{p}.0"), conv_bias(&format!("{p}.0")));
            add_norm(&mut b, s, &current, &format!("{p}.1"));
        }
        let inner = |k: usize| {
            if convs.len() == 2 {
                format!("{l}.inner")
            } else {
                format!("{l}.inner{k}")
            }
        };
        for (i, &k) in convs.iter().enumerate() {
            let conv = format!("{l}.conv{k}");
            let reads = if i == 0 { input.clone() } else { inner(i) };
            let writes = if i + 1 == convs.len() {
                current.clone()
            } else {
                inner(i + 1)
            };
            b.consumer(&reads, &conv);
            b.producer(&writes, &conv, conv_bias(&conv));
            add_norm(&mut b, s, &writes, &format!("{l}.bn{k}"));
        }
    }
    b.consumer(&current, head);
    b.invariant("conv1.weight")
        .invariant(format!("{head}.weight"))
        .invariant(format!("{head}.bias"));
    let spec = b.build().map_err(|e| e.to_string())?;
    let stages: BTreeSet<usize> = blocks.keys().map(|k| k.0).collect();
    let kind = match kinds.iter().copied().collect::<Vec<_>>().as_slice() {
        [2] => "BasicBlocks".to_string(),
        [3] => "Bottlenecks".to_string(),
        k => format!("blocks of {k:?} convolutions"),
    };
    let family = if head == "fc" {
        "torchvision-resnet"
    } else {
        "cifar-resnet"
    };
    Ok((
        spec,
        family.into(),
        format!(
            "stem `conv1` (width {}), {} stages, {} {kind}, {projections} projection shortcut(s), head `{head}`",
            out_of(s, "conv1"),
            stages.len(),
            blocks.len()
        ),
    ))
}

/// Convolutions then linear layers, in name order, each optionally followed by a norm.
fn chain(s: &Shapes) -> std::result::Result<(PermutationSpec, String, String), String> {
    let mut layers: Vec<(&str, &Vec<usize>)> = s
        .iter()
        .filter_map(|(n, sh)| {
            n.strip_suffix(".weight")
                .filter(|_| sh.len() >= 2)
                .map(|l| (l, sh))
        })
        .collect();
    if let Some((l, sh)) = layers.iter().find(|(_, sh)| sh.len() != 2 && sh.len() != 4) {
        return Err(format!(
            "`{l}.weight` has shape {sh:?}, neither linear nor 2-D conv"
        ));
    }
    layers.sort_by(|a, b| {
        (a.1.len() == 2)
            .cmp(&(b.1.len() == 2))
            .then(natural(a.0, b.0))
    });
    if layers.len() < 2 {
        return Err(format!("{} weight layer(s), need at least 2", layers.len()));
    }
    let layer_set: BTreeSet<&str> = layers.iter().map(|(l, _)| *l).collect();
    // Norm layers: 1-D `weight` whose prefix is not a weight layer.
    let norms: Vec<&str> = s
        .iter()
        .filter_map(|(n, sh)| n.strip_suffix(".weight").filter(|_| sh.len() == 1))
        .filter(|p| !layer_set.contains(p))
        .collect();
    let mut norm_of: BTreeMap<&str, &str> = BTreeMap::new();
    for n in &norms {
        let owner = layers
            .iter()
            .filter(|(l, _)| natural(l, n) == Ordering::Less)
            .max_by(|a, b| natural(a.0, b.0))
            .map(|(l, _)| *l)
            .ok_or_else(|| format!("norm `{n}` comes before every weight layer"))?;
        if norm_of.insert(owner, n).is_some() {
            return Err(format!("two norm layers follow `{owner}`"));
        }
    }
    let mut b = SpecBuilder::new();
    let (mut convs, mut linears) = (0usize, 0usize);
    let mut flatten = None;
    for (k, pair) in layers.windows(2).enumerate() {
        let ((l, sh), (next, nsh)) = (pair[0], pair[1]);
        let units = sh[0];
        let is_conv = sh.len() == 4;
        let g = if is_conv {
            convs += 1;
            format!("conv.{}", convs - 1)
        } else if layers.iter().any(|(_, s)| s.len() == 4) {
            linears += 1;
            format!("fc.{}", linears - 1)
        } else {
            linears += 1;
            format!("hidden.{}", linears - 1)
        };
        b.producer(&g, l, s.contains_key(&format!("{l}.bias")));
        if let Some(n) = norm_of.get(l) {
            if s.get(&format!("{n}.weight")).map(|w| w[0]) != Some(units) {
                return Err(format!(
                    "norm `{n}` does not have the {units} units of `{l}`"
                ));
            }
            add_norm(&mut b, s, &g, n);
        }
        let reads = nsh[1];
        if is_conv && nsh.len() == 2 {
            if reads % units != 0 {
                return Err(format!(
                    "`{next}` reads {reads} features, not a multiple of the {units} channels of `{l}`"
                ));
            }
            flatten = Some((next, reads / units));
            b.flatten_consumer(&g, next, reads / units);
        } else if reads == units {
            b.consumer(&g, next);
        } else {
            return Err(format!(
                "`{l}` (layer {k}) writes {units} units but `{next}` reads {reads}"
            ));
        }
    }
    let (first, _) = layers[0];
    let (last, lsh) = layers[layers.len() - 1];
    if let Some(n) = norm_of.get(last) {
        return Err(format!("norm `{n}` follows the output layer `{last}`"));
    }
    b.invariant(format!("{first}.weight"))
        .invariant(format!("{last}.weight"))
        .invariant(format!("{last}.bias"));
    let spec = b.build().map_err(|e| e.to_string())?;
    let convs_total = layers.iter().filter(|(_, s)| s.len() == 4).count();
    let numeric = layers.iter().all(|(l, _)| {
        l.rsplit('.')
            .next()
            .is_some_and(|p| p.parse::<usize>().is_ok())
    });
    let family = if convs_total > 0 {
        if first.starts_with("features.") {
            "torchvision-vgg"
        } else {
            "cnn"
        }
    } else if numeric {
        "sequential-mlp"
    } else {
        "named-mlp"
    };
    Ok((
        spec,
        family.into(),
        format!(
            "{convs_total} convolution(s) and {} linear layer(s) from `{first}` to `{last}` ({} outputs), {} norm(s){}",
            layers.len() - convs_total,
            lsh[0],
            norms.len(),
            flatten
                .map(|(l, f)| format!(", flatten into `{l}` with {f} features per channel"))
                .unwrap_or_default()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perm::specs::{self, MlpShapes, ResNet};

    fn infer_arch(arch: &impl Architecture) -> Inferred {
        let shapes = arch.shapes();
        infer_spec(shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())), None).unwrap()
    }

    #[test]
    fn the_crates_own_networks_are_recognised_exactly() {
        let m = MlpShapes::new(&[64, 32, 32, 10]).unwrap();
        let f = infer_arch(&m);
        assert_eq!(f.spec, m.spec());
        let r = ResMlpShapes::new(8, 16, 24, 3, 5).unwrap();
        assert_eq!(infer_arch(&r).spec, r.spec());
        let v = Vgg::vgg16(1, 10);
        assert_eq!(infer_arch(&v).spec, v.spec());
        let n = ResNet::resnet20(4, 10);
        let f = infer_arch(&n);
        assert_eq!((f.family.as_str(), f.spec), ("cifar-resnet", n.spec()));
        assert_eq!(specs::mlp(2).num_groups(), 2);
    }

    #[test]
    fn natural_order() {
        assert_eq!(natural("fc2", "fc10"), Ordering::Less);
        assert_eq!(natural("features.10", "features.9"), Ordering::Greater);
        assert_eq!(natural("a.1", "a.1.x"), Ordering::Less);
    }

    #[test]
    fn unknown_transformers_and_layouts_are_refused() {
        let cfg = serde_json::json!({"model_type": "mamba"});
        let e = infer_spec([("w", &[2usize, 2][..])], Some(&cfg)).unwrap_err();
        assert!(e.to_string().contains("mamba"), "{e}");
        let cfg = serde_json::json!({"model_type": "llama"});
        let e = infer_spec([("w", &[2usize, 2][..])], Some(&cfg)).unwrap_err();
        assert!(e.to_string().contains("llama detector"), "{e}");
        let e = infer_spec([("embed", &[10usize, 4, 4][..])], None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no known architecture") && e.contains("embed"),
            "{e}"
        );
    }
}
