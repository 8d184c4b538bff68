//! The candle LLaMA-style decoder of `examples/transformer_barrier` (Hugging Face names,
//! RMSNorm, RoPE, GQA, SwiGLU): the spec inferred from its names and config keeps its
//! logits under every permitted structured permutation, computed by candle (f32);
//! activation matching on its candle features recovers a planted permutation exactly;
//! the residual + MLP spec (attention held at identity) keeps the function too.
#![cfg(all(feature = "candle", feature = "nn"))]

#[path = "../../examples/transformer_barrier/decoder.rs"]
mod decoder;

use std::sync::Arc;

use decoder::{Decoder, DecoderConfig, without_heads};
use modelfusion::align::{ActivationMatching, Aligner, WeightMatching};
use modelfusion::candle::CandleNet;
use modelfusion::candle::candle_core::{Device, Tensor};
use modelfusion::perm::infer::infer_model_spec;
use modelfusion::perm::{PermutationSet, PermutationSpec};
use modelfusion::{Model, StateDictF32};
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CFG: DecoderConfig = DecoderConfig {
    vocab: 13,
    hidden: 16,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    head_dim: 4,
    intermediate: 24,
};

/// Random parameters large enough for the logits to depend on everything, with norm
/// weights away from one.
fn params(seed: u64) -> StateDictF32 {
    let base = CFG.init(seed, 0.4).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
    base.try_map(|_, t| {
        Ok(if t.ndim() == 1 {
            t.mapv(|v| v + rng.random_range(-0.5f32..0.5))
        } else {
            t.clone()
        })
    })
    .unwrap()
}

fn spec() -> PermutationSpec {
    let found = infer_model_spec(&params(0), Some(&CFG.hf_config())).unwrap();
    assert_eq!(found.family, "llama", "{}", found.reason);
    assert!(found.spec.has_heads());
    found.spec
}

fn tokens(seed: u64, batch: usize, len: usize) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ids: Vec<u32> = (0..batch * len)
        .map(|_| rng.random_range(0..CFG.vocab as u32))
        .collect();
    Tensor::from_vec(ids, (batch, len), &Device::Cpu).unwrap()
}

fn logits(p: &StateDictF32, x: &Tensor) -> Vec<f32> {
    let net: Decoder = CandleNet::new(|vb| Decoder::new(&CFG, vb))
        .build(p)
        .unwrap();
    net.forward(x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest difference relative to the largest logit.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Every permitted permutation (heads, KV groups, within-head dims outside the
    /// rotary pairs, residual stream, MLP) leaves candle's logits unchanged (1e-5
    /// relative, f32); the permutation moves the parameters.
    #[test]
    fn permitted_permutations_keep_candle_logits(seed in 0u64..1000) {
        let (p, spec) = (params(seed), spec());
        let perms = PermutationSet::random(&spec, &p, seed + 1).unwrap();
        let permuted = spec.apply(&perms, &p).unwrap();
        prop_assert!(permuted.max_abs_diff(&p).unwrap() > 0.1);
        let x = tokens(seed, 3, 9);
        let (before, after) = (logits(&p, &x), logits(&permuted, &x));
        let d = rel_diff(&before, &after);
        prop_assert!(d < 1e-5, "logits differ by {d} (relative)");
    }
}

#[test]
fn activation_matching_on_candle_features_recovers_a_planted_permutation() {
    let (a, spec) = (params(3), spec());
    let planted = PermutationSet::random(&spec, &a, 4).unwrap();
    let b = spec.apply(&planted, &a).unwrap();
    let xs = Arc::new(vec![tokens(5, 2, 12), tokens(6, 2, 12)]);
    let features = CandleNet::new(|vb| Decoder::new(&CFG, vb))
        .features(2, move |n: &Decoder, k| {
            Ok(n.forward_taps(&xs[k])?.1.into_features())
        })
        .unwrap();
    let al = ActivationMatching::new(features)
        .align(&a, &b, &spec)
        .unwrap();
    assert_eq!(al.permutations().unwrap(), planted.inverse());
    assert_eq!(al.apply(&spec, &b).unwrap().max_abs_diff(&a).unwrap(), 0.0);
}

#[test]
fn the_residual_and_mlp_spec_holds_attention_at_identity_and_keeps_the_function() {
    let spec = spec();
    let restricted = without_heads(&spec).unwrap();
    assert!(!restricted.has_heads());
    let names = |s: &PermutationSpec| s.group_names().map(str::to_string).collect::<Vec<_>>();
    let expected: Vec<String> = names(&spec)
        .into_iter()
        .filter(|g| spec.head_layout(g).is_none())
        .collect();
    assert_eq!(names(&restricted), expected);
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(restricted.axes(q).unwrap(), vec![None, Some("residual")]);
    let (a, b) = (params(7), params(8));
    restricted.require_sound(&a).unwrap();
    let al = WeightMatching::new(0).align(&a, &b, &restricted).unwrap();
    let aligned = al.apply(&restricted, &b).unwrap();
    for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        let name = format!("model.layers.1.self_attn.{p}.weight");
        let (before, after) = (b.get(&name).unwrap(), aligned.get(&name).unwrap());
        // the head axis is untouched: only the residual axis may move
        let axis = usize::from(p != "o_proj");
        let sums = |t: &ndarray::ArrayD<f32>| t.sum_axis(ndarray::Axis(axis));
        let d = (&sums(before) - &sums(after)).mapv(f32::abs).sum();
        assert!(d < 1e-4, "{name}: its head axis moved ({d})");
    }
    let x = tokens(9, 2, 10);
    let d = rel_diff(&logits(&b, &x), &logits(&aligned, &x));
    assert!(d < 1e-5, "aligned B computes another function ({d})");
}

/// Negative control: the same permutation of rotary pair indices on the query and key
/// rows of every head (pairs `(0, 2)` and `(1, 3)` trade places; the spec refuses it)
/// keeps every query-key dot product without RoPE, so only the rotary frequencies can
/// tell it apart: candle's logits change, the decoder does rotate by position.
#[test]
fn moving_rotary_pairs_changes_candle_logits() {
    let p = params(11);
    let within = [1usize, 0, 3, 2];
    let d = CFG.head_dim;
    let moved = p
        .try_map(|name, t| {
            Ok(
                if name.starts_with("model.layers.0.self_attn.")
                    && (name.contains("q_proj") || name.contains("k_proj"))
                {
                    let rows: Vec<usize> = (0..t.shape()[0])
                        .map(|r| r / d * d + within[r % d])
                        .collect();
                    t.select(ndarray::Axis(0), &rows)
                } else {
                    t.clone()
                },
            )
        })
        .unwrap();
    let x = tokens(12, 2, 10);
    let d = rel_diff(&logits(&p, &x), &logits(&moved, &x));
    assert!(
        d > 1e-3,
        "moving rotary pairs changed the logits by only {d}"
    );
}
