//! Transformers: structured (attention-head) permutations keep the function of a small
//! LLaMA-like decoder written here (grouped-query attention, rotary embeddings, QKV
//! biases, tied or untied head); specs inferred from the Hugging Face fixtures of
//! `tests/golden/transformers/gen.py` validate, and weight matching recovers planted
//! structured permutations exactly; bad input fails with clear errors.

use std::path::PathBuf;

use modelfusion::align::{Aligner, WeightMatching};
use modelfusion::io::{Checkpoint, infer_checkpoint_spec, load};
use modelfusion::perm::infer::infer_spec;
use modelfusion::perm::{HeadLayout, HeadSlot, Permutation, PermutationSet, PermutationSpec};
use modelfusion::{Activations, Features, Model, StateDict, StateDictF32};
use ndarray::{Array1, Array2, ArrayD, Axis, Ix1, Ix2};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

type Sd = StateDict<ArrayD<f64>>;

#[derive(Clone, Copy, Debug)]
struct Cfg {
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
    inter: usize,
    rotary: usize,
    bias: bool,
    tied: bool,
}

impl Cfg {
    fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": if self.bias { "qwen2" } else { "llama" },
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv,
            "head_dim": self.head_dim,
            "partial_rotary_factor": self.rotary as f64 / self.head_dim as f64,
            "tie_word_embeddings": self.tied,
        })
    }

    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, q, kv) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv * self.head_dim,
        );
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for i in 0..self.layers {
            let l = format!("model.layers.{i}");
            let a = format!("{l}.self_attn");
            v.push((format!("{l}.input_layernorm.weight"), vec![h]));
            v.push((format!("{a}.q_proj.weight"), vec![q, h]));
            v.push((format!("{a}.k_proj.weight"), vec![kv, h]));
            v.push((format!("{a}.v_proj.weight"), vec![kv, h]));
            if self.bias {
                v.push((format!("{a}.q_proj.bias"), vec![q]));
                v.push((format!("{a}.k_proj.bias"), vec![kv]));
                v.push((format!("{a}.v_proj.bias"), vec![kv]));
            }
            v.push((format!("{a}.o_proj.weight"), vec![h, q]));
            v.push((format!("{l}.post_attention_layernorm.weight"), vec![h]));
            v.push((format!("{l}.mlp.gate_proj.weight"), vec![self.inter, h]));
            v.push((format!("{l}.mlp.up_proj.weight"), vec![self.inter, h]));
            v.push((format!("{l}.mlp.down_proj.weight"), vec![h, self.inter]));
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tied {
            v.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        v
    }

    fn random(&self, seed: u64) -> Sd {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = Normal::new(0.0, 0.3).unwrap();
        StateDict::from_pairs(self.shapes().into_iter().map(|(name, shape)| {
            let norm = name.ends_with("norm.weight");
            let t = ArrayD::from_shape_simple_fn(shape, || {
                n.sample(&mut rng) + if norm { 1.0 } else { 0.0 }
            });
            (name, t)
        }))
        .unwrap()
    }

    fn spec(&self) -> PermutationSpec {
        let shapes = self.shapes();
        let cfg = self.config();
        infer_spec(
            shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())),
            Some(&cfg),
        )
        .unwrap()
        .spec
    }
}

fn mat(m: &Sd, name: &str) -> Array2<f64> {
    m.get(name)
        .unwrap()
        .view()
        .into_dimensionality::<Ix2>()
        .unwrap()
        .to_owned()
}

fn vec1(m: &Sd, name: &str) -> Array1<f64> {
    m.get(name)
        .unwrap()
        .view()
        .into_dimensionality::<Ix1>()
        .unwrap()
        .to_owned()
}

fn rms(x: &Array2<f64>, w: &Array1<f64>) -> Array2<f64> {
    let mut y = x.clone();
    for mut row in y.rows_mut() {
        let s = (row.mapv(|v| v * v).mean().unwrap() + 1e-6).sqrt();
        row.zip_mut_with(w, |v, &g| *v = *v / s * g);
    }
    y
}

/// Hugging Face `rotate_half` rotary embedding on the first `rot` dims of every head.
fn rope(x: &mut Array2<f64>, heads: usize, d: usize, rot: usize) {
    let half = rot / 2;
    for (p, mut row) in x.rows_mut().into_iter().enumerate() {
        for h in 0..heads {
            for i in 0..half {
                let theta = p as f64 * 100f64.powf(-((2 * i) as f64) / rot as f64);
                let (a, b) = (row[h * d + i], row[h * d + i + half]);
                row[h * d + i] = a * theta.cos() - b * theta.sin();
                row[h * d + i + half] = b * theta.cos() + a * theta.sin();
            }
        }
    }
}

fn linear(x: &Array2<f64>, m: &Sd, layer: &str) -> Array2<f64> {
    let mut y = x.dot(&mat(m, &format!("{layer}.weight")).t());
    if m.get(&format!("{layer}.bias")).is_some() {
        y += &vec1(m, &format!("{layer}.bias"));
    }
    y
}

/// Logits of a token sequence (causal attention).
fn forward(c: &Cfg, m: &Sd, tokens: &[usize]) -> Vec<f64> {
    forward_with_features(c, m, tokens).0
}

/// Logits and the features of every group of the inferred spec: `residual` (the
/// residual stream before and after every block, stacked), `layers.{i}.attn` (the
/// rotated queries, then the per-head attention outputs, side by side) and
/// `layers.{i}.mlp` (the gated products).
fn forward_with_features(c: &Cfg, m: &Sd, tokens: &[usize]) -> (Vec<f64>, Features<f64>) {
    let embed = mat(m, "model.embed_tokens.weight");
    let mut x = embed.select(Axis(0), tokens);
    let mut features = Features::new();
    let mut stream = vec![x.clone()];
    let (d, r, n) = (c.head_dim, c.heads / c.kv, tokens.len());
    for i in 0..c.layers {
        let l = format!("model.layers.{i}");
        let a = format!("{l}.self_attn");
        let xn = rms(&x, &vec1(m, &format!("{l}.input_layernorm.weight")));
        let mut q = linear(&xn, m, &format!("{a}.q_proj"));
        let mut k = linear(&xn, m, &format!("{a}.k_proj"));
        let v = linear(&xn, m, &format!("{a}.v_proj"));
        rope(&mut q, c.heads, d, c.rotary);
        rope(&mut k, c.kv, d, c.rotary);
        let mut att = Array2::<f64>::zeros((n, c.heads * d));
        for h in 0..c.heads {
            let g = h / r;
            for p in 0..n {
                let scores: Vec<f64> = (0..=p)
                    .map(|t| {
                        (0..d)
                            .map(|j| q[[p, h * d + j]] * k[[t, g * d + j]])
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = w.iter().sum();
                for j in 0..d {
                    att[[p, h * d + j]] = (0..=p).map(|t| w[t] / z * v[[t, g * d + j]]).sum();
                }
            }
        }
        x += &linear(&att, m, &format!("{a}.o_proj"));
        features.insert(
            format!("layers.{i}.attn"),
            ndarray::concatenate![Axis(1), q, att],
        );
        let xn = rms(
            &x,
            &vec1(m, &format!("{l}.post_attention_layernorm.weight")),
        );
        let gate = linear(&xn, m, &format!("{l}.mlp.gate_proj")).mapv(|z| z / (1.0 + (-z).exp()));
        let up = linear(&xn, m, &format!("{l}.mlp.up_proj"));
        let gated = gate * up;
        x += &linear(&gated, m, &format!("{l}.mlp.down_proj"));
        features.insert(format!("layers.{i}.mlp"), gated);
        stream.push(x.clone());
    }
    let views: Vec<_> = stream.iter().map(|x| x.view()).collect();
    features.insert(
        "residual".to_string(),
        ndarray::concatenate(Axis(0), &views).unwrap(),
    );
    let xn = rms(&x, &vec1(m, "model.norm.weight"));
    let head = if c.tied {
        embed
    } else {
        mat(m, "lm_head.weight")
    };
    (xn.dot(&head.t()).into_iter().collect(), features)
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

const TOKENS: [usize; 6] = [3, 1, 4, 1, 5, 9];

fn cfg_strategy() -> impl Strategy<Value = Cfg> {
    (
        prop::sample::select(vec![(2usize, 1usize), (2, 2), (4, 1), (4, 2), (4, 4)]),
        prop::sample::select(vec![4usize, 6]),
        0usize..3,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|((heads, kv), head_dim, rot, bias, tied)| Cfg {
            vocab: 11,
            hidden: 8,
            layers: 2,
            heads,
            kv,
            head_dim,
            inter: 10,
            rotary: [0, 2, head_dim][rot],
            bias,
            tied,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Every permitted permutation (heads, KV groups, within-head dims, residual stream,
    /// MLP) leaves the logits unchanged.
    #[test]
    fn permitted_permutations_keep_the_logits(c in cfg_strategy(), seed in 0u64..1000) {
        let m = c.random(seed);
        let spec = c.spec();
        spec.require_sound(&m).unwrap();
        let perms = PermutationSet::random(&spec, &m, seed + 1).unwrap();
        prop_assert!(!perms.is_identity());
        let permuted = spec.apply(&perms, &m).unwrap();
        prop_assert!(permuted.max_abs_diff(&m).unwrap() > 0.0);
        let d = max_diff(&forward(&c, &m, &TOKENS), &forward(&c, &permuted, &TOKENS));
        prop_assert!(d < 1e-9, "logits differ by {d} for {c:?}");
    }
}

fn llama(rotary: usize) -> Cfg {
    Cfg {
        vocab: 11,
        hidden: 8,
        layers: 1,
        heads: 4,
        kv: 2,
        head_dim: 4,
        inter: 10,
        rotary,
        bias: false,
        tied: false,
    }
}

/// A permutation of group `layers.0.attn` built from raw indices (unchecked), the
/// others identity.
fn with_attention(spec: &PermutationSpec, m: &Sd, attn: Vec<usize>) -> PermutationSet {
    let mut set = PermutationSet::identity(spec, m).unwrap();
    set.insert("layers.0.attn", Permutation::new(attn).unwrap());
    set
}

/// Applies a raw (possibly unstructured) permutation `attn` of layer 0's attention
/// group to its Q, K, V rows and O columns, as the layout's slots define them (an
/// independent oracle: `apply` and `permute_tensor` refuse such permutations).
fn apply_raw(c: &Cfg, m: &Sd, attn: &[usize]) -> Sd {
    let (d, r, hd) = (c.head_dim, c.heads / c.kv, c.heads * c.head_dim);
    let kv = |half: usize| -> Vec<usize> {
        (0..c.kv * d)
            .map(|j| {
                let src = attn[half * hd + (j / d) * r * d + j % d] - half * hd;
                (src / d / r) * d + src % d
            })
            .collect()
    };
    let q: Vec<usize> = attn[..hd].to_vec();
    let o: Vec<usize> = attn[hd..].iter().map(|u| u - hd).collect();
    let a = "model.layers.0.self_attn";
    let moves = [
        (format!("{a}.q_proj.weight"), 0, q),
        (format!("{a}.k_proj.weight"), 0, kv(0)),
        (format!("{a}.v_proj.weight"), 0, kv(1)),
        (format!("{a}.o_proj.weight"), 1, o),
    ];
    m.try_map(|name, t| {
        Ok(match moves.iter().find(|(n, _, _)| n == name) {
            Some((_, axis, idx)) => t.select(Axis(*axis), idx),
            None => t.clone(),
        })
    })
    .unwrap()
}

#[test]
fn rotary_pairs_moved_are_refused_and_would_change_the_logits() {
    let c = llama(4);
    let (m, spec) = (c.random(1), c.spec());
    let layout = spec.head_layout("layers.0.attn").unwrap();
    assert_eq!(layout.rotary_dim(), 4);
    // The same permutation of rotary pair indices in both halves of every head (pairs
    // (0, 2) and (1, 3) swap places), value-output dims untouched.
    let within = [1, 0, 3, 2];
    let units = layout.units();
    let half = units / 2;
    let attn: Vec<usize> = (0..units)
        .map(|u| {
            if u < half {
                u / 4 * 4 + within[u % 4]
            } else {
                u
            }
        })
        .collect();
    let perms = with_attention(&spec, &m, attn);
    let e = spec.apply(&perms, &m).unwrap_err().to_string();
    assert!(e.contains("layers.0.attn") && e.contains("rotary"), "{e}");
    // Why: each pair is rotated by its slot's frequency, so the logits change.
    let k = "model.layers.0.self_attn.k_proj.weight";
    let e = spec
        .permute_tensor(&perms, k, m.get(k).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("rotary"), "{e}");
    let moved = apply_raw(&c, &m, perms.get("layers.0.attn").unwrap().as_slice());
    let d = max_diff(&forward(&c, &m, &TOKENS), &forward(&c, &moved, &TOKENS));
    assert!(
        d > 1e-3,
        "moving rotary pairs changed the logits by only {d}"
    );
    // Without rotary embeddings the same permutation is permitted and keeps them.
    let c0 = llama(0);
    let (m0, spec0) = (c0.random(1), c0.spec());
    let p0 = spec0.apply(&perms, &m0).unwrap();
    assert!(max_diff(&forward(&c0, &m0, &TOKENS), &forward(&c0, &p0, &TOKENS)) < 1e-9);
}

#[test]
fn gqa_grouping_violations_are_refused_and_would_change_the_logits() {
    let c = llama(0);
    let (m, spec) = (c.random(2), c.spec());
    // Query heads 0 and 1 share KV head 0; swap query heads 1 and 2 (across groups).
    let heads = [0usize, 2, 1, 3];
    let d = 4;
    let attn: Vec<usize> = (0..32)
        .map(|u| (u / 16) * 16 + heads[(u % 16) / d] * d + u % d)
        .collect();
    let perms = with_attention(&spec, &m, attn);
    let e = spec.apply(&perms, &m).unwrap_err().to_string();
    assert!(e.contains("key-value head"), "{e}");
    let moved = apply_raw(&c, &m, perms.get("layers.0.attn").unwrap().as_slice());
    assert!(max_diff(&forward(&c, &m, &TOKENS), &forward(&c, &moved, &TOKENS)) > 1e-3);
    // Within-head permutations that differ between query heads of one KV head.
    let attn: Vec<usize> = (0..32)
        .map(|u| {
            if u == 4 {
                5
            } else if u == 5 {
                4
            } else {
                u
            }
        })
        .collect();
    let e = spec
        .apply(&with_attention(&spec, &m, attn), &m)
        .unwrap_err()
        .to_string();
    assert!(e.contains("different query-key within-head"), "{e}");
}

#[test]
fn configs_that_disagree_with_shapes_are_named() {
    let c = llama(4);
    let shapes = c.shapes();
    let list = || shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice()));
    let mut cfg = c.config();
    cfg["num_key_value_heads"] = 4.into();
    let e = infer_spec(list(), Some(&cfg)).unwrap_err().to_string();
    assert!(
        e.contains("k_proj.weight") && e.contains("4 key-value heads"),
        "{e}"
    );
    let mut cfg = c.config();
    cfg["num_attention_heads"] = 3.into();
    let e = infer_spec(list(), Some(&cfg)).unwrap_err().to_string();
    assert!(e.contains("kv_heads") || e.contains("divide"), "{e}");
    let mut cfg = c.config();
    cfg["hidden_size"] = 16.into();
    let e = infer_spec(list(), Some(&cfg)).unwrap_err().to_string();
    assert!(
        e.contains("hidden_size") && e.contains("embed_tokens"),
        "{e}"
    );
    let tied = Cfg { tied: true, ..c };
    let tied_shapes = tied.shapes();
    let mut cfg = tied.config();
    cfg["tie_word_embeddings"] = false.into();
    let e = infer_spec(
        tied_shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())),
        Some(&cfg),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("untied") && e.contains("lm_head.weight"), "{e}");
    let e = infer_spec(
        list().filter(|(n, _)| !n.contains("v_proj")),
        Some(&c.config()),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("v_proj"), "{e}");
    assert!(HeadLayout::new(4, 2, 4).unwrap().slot_len(HeadSlot::Key) == 8);
}

#[test]
fn spec_files_round_trip_attention_groups() {
    let spec = llama(2).spec();
    let back = PermutationSpec::from_json(&spec.to_json().unwrap()).unwrap();
    assert_eq!(back, spec);
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/transformers")
        .join(name)
}

const FAMILIES: [(&str, &str); 8] = [
    ("llama", "llama"),
    ("mistral", "mistral"),
    ("qwen2", "qwen2"),
    ("gpt2", "gpt2"),
    ("bert", "bert"),
    ("roberta", "roberta"),
    ("distilbert", "distilbert"),
    ("vit", "vit"),
];

#[test]
fn hugging_face_fixtures_infer_sound_specs_and_planted_permutations_are_recovered() {
    for (dir, family) in FAMILIES {
        let path = fixture(dir).join("model.safetensors");
        let found = infer_checkpoint_spec(&Checkpoint::open(&path).unwrap())
            .unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert_eq!(found.family, family, "{}", found.reason);
        let model: StateDictF32 = load(&path).unwrap();
        let spec = &found.spec;
        spec.require_sound(&model)
            .unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert!(spec.has_heads());
        for seed in [1, 2] {
            let planted = PermutationSet::random(spec, &model, seed).unwrap();
            let b = spec.apply(&planted, &model).unwrap();
            let al = WeightMatching::new(0).align(&model, &b, spec).unwrap();
            assert_eq!(
                al.permutations().unwrap(),
                planted.inverse(),
                "{dir} seed {seed}: not recovered"
            );
            let obj = &al.stats().objective;
            assert!(
                obj.windows(2).all(|w| w[1] >= w[0] - 1e-9),
                "{dir}: {obj:?}"
            );
        }
    }
}

#[test]
fn weight_matching_two_models_keeps_the_function_and_refuses_other_aligners() {
    let c = Cfg {
        vocab: 11,
        hidden: 8,
        layers: 2,
        heads: 4,
        kv: 2,
        head_dim: 4,
        inter: 10,
        rotary: 2,
        bias: true,
        tied: false,
    };
    let (a, b, spec) = (c.random(10), c.random(11), c.spec());
    let al = WeightMatching::new(3)
        .with_restarts(2)
        .unwrap()
        .align(&a, &b, &spec)
        .unwrap();
    let obj = &al.stats().objective;
    assert!(obj.windows(2).all(|w| w[1] >= w[0] - 1e-9), "{obj:?}");
    assert!(obj.last() > obj.first(), "{obj:?}");
    let aligned = spec.apply(&al.permutations().unwrap(), &b).unwrap();
    let d = max_diff(&forward(&c, &b, &TOKENS), &forward(&c, &aligned, &TOKENS));
    assert!(d < 1e-9, "aligned B computes another function ({d})");
    let closer = a.sub(&aligned).unwrap().norm();
    assert!(closer < a.sub(&b).unwrap().norm());
    use modelfusion::align::{OtFusion, Transport};
    let e = OtFusion::new(Transport::Exact)
        .unwrap()
        .align(&a, &b, &spec)
        .unwrap_err();
    assert!(e.to_string().contains("attention group"), "{e}");
}

/// The features of a few token sequences, one batch each, through the decoder above.
#[derive(Clone)]
struct Sequences(Cfg, Vec<Vec<usize>>);

impl Sequences {
    fn new(c: Cfg, batches: usize, len: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let tokens = (0..batches)
            .map(|_| {
                (0..len)
                    .map(|_| rand::RngExt::random_range(&mut rng, 0..c.vocab))
                    .collect()
            })
            .collect();
        Sequences(c, tokens)
    }
}

impl Activations<Sd> for Sequences {
    fn num_batches(&self) -> usize {
        self.1.len()
    }

    fn activations(&self, m: &Sd, batch: usize) -> modelfusion::Result<Features<f64>> {
        Ok(forward_with_features(&self.0, m, &self.1[batch]).1)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10))]

    /// Activation matching (both correlations) and exact OT fusion on the features of
    /// every group recover a planted structured permutation (heads, KV groups, rotary
    /// dimensions held, residual stream, MLP) exactly; Sinkhorn OT keeps the heads hard.
    #[test]
    fn activation_matching_and_ot_recover_planted_structured_permutations(
        c in cfg_strategy(),
        seed in 0u64..1000,
    ) {
        use modelfusion::align::{ActivationMatching, Correlation, GroupMap, OtFusion, Transport};
        let (a, spec) = (c.random(seed), c.spec());
        let planted = PermutationSet::random(&spec, &a, seed + 1).unwrap();
        let b = spec.apply(&planted, &a).unwrap();
        let source = Sequences::new(c, 3, 8, seed + 2);
        for corr in [Correlation::Cross, Correlation::Pearson] {
            let al = ActivationMatching::new(source.clone())
                .with_correlation(corr)
                .align(&a, &b, &spec)
                .unwrap();
            let d = al.apply(&spec, &b).unwrap().max_abs_diff(&a).unwrap();
            prop_assert!(d == 0.0, "{corr:?}: aligned B differs from A by {d} for {c:?}");
        }
        let exact = OtFusion::new(Transport::Exact)
            .unwrap()
            .with_activations(source.clone())
            .align(&a, &b, &spec)
            .unwrap();
        prop_assert_eq!(exact.apply(&spec, &b).unwrap().max_abs_diff(&a).unwrap(), 0.0);
        let soft = OtFusion::new(Transport::Sinkhorn { reg: 0.05 })
            .unwrap()
            .with_activations(source)
            .align(&a, &b, &spec)
            .unwrap();
        prop_assert!(!soft.is_hard());
        for g in spec.group_names().filter(|g| spec.head_layout(g).is_some()) {
            prop_assert_eq!(soft.get(g), exact.get(g), "group {}", g);
        }
        let fused = soft.apply(&spec, &b).unwrap();
        prop_assert!(fused.max_abs_diff(&a).unwrap().is_finite());
        // Soft maps that are scaled permutation matrices act as the permutations, next to
        // hard head maps gathered slot by slot.
        let maps = exact
            .iter()
            .map(|(g, m)| {
                let m = match (m, spec.head_layout(g)) {
                    (GroupMap::Permutation(p), None) => {
                        GroupMap::Transport(GroupMap::Permutation(p.clone()).output_map() / p.len() as f64)
                    }
                    _ => m.clone(),
                };
                (g.to_string(), m)
            })
            .collect();
        let mixed = modelfusion::align::Alignment::from_maps(maps, Default::default());
        prop_assert_eq!(mixed.apply(&spec, &b).unwrap().max_abs_diff(&a).unwrap(), 0.0);
    }
}

#[test]
fn soft_maps_on_attention_groups_are_refused() {
    use modelfusion::align::{Alignment, GroupMap};
    let c = llama(2);
    let (m, spec) = (c.random(3), c.spec());
    let id = Alignment::identity(&spec, &m).unwrap();
    let maps = id
        .iter()
        .map(|(g, map)| {
            let map = if g == "layers.0.attn" {
                GroupMap::Transport(map.output_map() / map.sizes().0 as f64)
            } else {
                map.clone()
            };
            (g.to_string(), map)
        })
        .collect();
    let e = Alignment::from_maps(maps, Default::default())
        .apply(&spec, &m)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layers.0.attn") && e.contains("attention heads"),
        "{e}"
    );
}
