//! Multi-module architectures (mergekit's `"kind": "modular"` tables: T5's encoder,
//! decoder and shared embedding; Qwen2-VL's text decoder, vision tower and projector),
//! run end to end on small synthetic checkpoints written from modelfusion's own layout
//! tables: top-level `models` merge every module over its own layers (gradients per
//! module), `modules:` merge each module named from its own models or slices, the
//! layer counts of sliced modules go into `config.json`, and every config mergekit
//! rejects (or that names a module the architecture lacks) is a clear error.
#![cfg(feature = "config")]

use std::path::Path;

use modelfusion::config::{Config, LAYOUTS, Layout, RunOptions};
use modelfusion::io::{Dtype, load, save_file};
use modelfusion::progress::Silent;
use modelfusion::{Model, StateDictF32};
use ndarray::ArrayD;
use proptest::prelude::*;

fn layout(family: &str) -> &'static Layout {
    LAYOUTS.iter().find(|l| l.family == family).unwrap()
}

/// The value of every element of tensor `k` of layer `layer` (90 outside the layers)
/// of module `m` of model `id`, so where an output tensor came from reads off its
/// values.
fn tag(id: f32, m: usize, layer: usize, k: usize) -> f32 {
    id * 100_000.0 + m as f32 * 10_000.0 + layer as f32 * 100.0 + k as f32
}

fn shape(name: &str) -> Vec<usize> {
    if name.contains("norm") || name.ends_with("bias") {
        vec![2]
    } else {
        vec![2, 2]
    }
}

/// Writes model `id` of `family` into `dir/name`: every tensor of the layout's tables
/// (module `m` with `layers[m]` layers), but the optional ones `skip` keeps out, plus
/// `extra` tensors outside the tables; `config` is its `config.json`. Values are
/// [`tag`] plus `jitter` (so that identical models can differ between cases).
#[allow(clippy::too_many_arguments)]
fn write(
    dir: &Path,
    name: &str,
    family: &str,
    id: f32,
    layers: &[usize],
    skip: impl Fn(&str, usize) -> bool,
    extra: &[&str],
    config: serde_json::Value,
) {
    let l = layout(family);
    let mut pairs: Vec<(String, ArrayD<f32>)> = Vec::new();
    for (m, module) in l.modules.iter().enumerate() {
        for (k, w) in module.pre.iter().chain(module.post).enumerate() {
            if !w.optional {
                pairs.push((
                    w.name.into(),
                    ArrayD::from_elem(shape(w.name), tag(id, m, 90, k)),
                ));
            }
        }
        for i in 0..layers[m] {
            for (k, s) in module.layer.iter().enumerate() {
                if module.optional.contains(s) && skip(s, i) {
                    continue;
                }
                let n = module.layer_tensor(i, s);
                pairs.push((n.clone(), ArrayD::from_elem(shape(&n), tag(id, m, i, k))));
            }
        }
    }
    for (m, module) in l.modules.iter().enumerate() {
        for (k, r) in module.repeated.iter().enumerate() {
            pairs.push((
                r.to_string(),
                ArrayD::from_elem(shape(r), tag(id, m, 91, k)),
            ));
        }
    }
    for e in extra {
        pairs.push((e.to_string(), ArrayD::from_elem(vec![2], id)));
    }
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    save_file(
        &StateDictF32::from_pairs(pairs).unwrap(),
        d.join("model.safetensors"),
        Dtype::F32,
    )
    .unwrap();
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
}

/// T5 v1.1 names (`wi_0` / `wi_1`), the relative attention bias in layer 0 only.
fn t5_skip(s: &str, i: usize) -> bool {
    s.ends_with("DenseReluDense.wi.weight") || (s.contains("relative_attention_bias") && i > 0)
}

/// A T5 model with `enc` encoder and `dec` decoder layers (modules: decoder, encoder,
/// shared).
fn t5(dir: &Path, name: &str, id: f32, enc: usize, dec: usize) {
    let cfg = serde_json::json!({"architectures": ["T5ForConditionalGeneration"],
        "num_layers": enc, "num_decoder_layers": dec, "d_model": 2});
    write(dir, name, "t5", id, &[dec, enc, 0], t5_skip, &[], cfg);
}

/// A Qwen2-VL model with `text` decoder layers and `vision` vision blocks (modules:
/// text_decoder, multi_modal_projector, vision_tower) and a rotary buffer outside the
/// tables.
fn qwen2_vl(dir: &Path, name: &str, id: f32, text: usize, vision: usize) {
    let cfg = serde_json::json!({"architectures": ["Qwen2VLForConditionalGeneration"],
        "text_config": {"num_hidden_layers": text}, "vision_config": {"depth": vision}});
    write(
        dir,
        name,
        "qwen2_vl",
        id,
        &[text, 0, vision],
        |_, _| false,
        &["visual.rotary_pos_emb.inv_freq"],
        cfg,
    );
}

fn run(
    dir: &Path,
    body: &str,
) -> modelfusion::Result<(StateDictF32, serde_json::Value, Vec<String>)> {
    let text = body.replace("DIR", &dir.display().to_string());
    let c = Config::from_yaml(&text, Path::new("t.yml"))?;
    let out = dir.join("out");
    let summary = c.run(&out, &RunOptions::new(), Silent)?;
    let m: StateDictF32 = load(&out)?;
    let cfg = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    Ok((m, cfg, summary.dropped))
}

fn value(m: &StateDictF32, name: &str) -> f32 {
    let t = m.get(name).unwrap_or_else(|| panic!("no `{name}`"));
    t.iter().copied().next().unwrap()
}

#[test]
fn top_level_models_merge_every_module_over_its_own_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qwen2_vl(dir, "a", 1.0, 3, 2);
    qwen2_vl(dir, "b", 2.0, 3, 2);
    // b's weight runs 0 -> 2 over each module's own layers: t = i / 2 in the text
    // decoder (3 layers), t = j in the vision tower (2 layers), 0 outside the layers.
    let (m, _, dropped) = run(
        dir,
        "merge_method: linear\nparameters: {normalize: false}\nmodels:\n  - model: DIR/a\n    parameters: {weight: 1}\n  - model: DIR/b\n    parameters: {weight: [0, 2]}\n",
    )
    .unwrap();
    let l = layout("qwen2_vl");
    let want = |mi: usize, layer: usize, k: usize, wb: f32| {
        tag(1.0, mi, layer, k) + wb * tag(2.0, mi, layer, k)
    };
    let text = &l.modules[0];
    for i in 0..3 {
        for (k, s) in text.layer.iter().enumerate() {
            assert_eq!(
                value(&m, &text.layer_tensor(i, s)),
                want(0, i, k, i as f32),
                "{s} {i}"
            );
        }
    }
    let vision = &l.modules[2];
    for j in 0..2 {
        for (k, s) in vision.layer.iter().enumerate() {
            let got = value(&m, &vision.layer_tensor(j, s));
            assert_eq!(got, want(2, j, k, 2.0 * j as f32), "{s} {j}");
        }
    }
    for (mi, module) in l.modules.iter().enumerate() {
        for (k, w) in module.pre.iter().chain(module.post).enumerate() {
            if !w.optional {
                assert_eq!(value(&m, w.name), want(mi, 90, k, 0.0), "{}", w.name);
            }
        }
    }
    // The projector's MLP, listed by mergekit as tensors of each of two "layers", is
    // merged at the last one's position (t = 1).
    for (k, r) in l.modules[1].repeated.iter().enumerate() {
        assert_eq!(value(&m, r), want(1, 91, k, 2.0), "{r}");
    }
    // Exactly the table's tensors: no LM head (tied, absent everywhere), no buffer.
    assert_eq!(m.len(), 2 + 3 * 12 + 6 + 1 + 2 * 12);
    assert!(m.get("lm_head.weight").is_none());
    assert_eq!(dropped, ["visual.rotary_pos_emb.inv_freq"]);
}

#[test]
fn modules_merge_each_module_from_its_own_models_or_slices() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    t5(dir, "a", 1.0, 3, 2);
    t5(dir, "b", 2.0, 3, 2);
    // encoder: a's layers 1..3 then b's layer 0 (a frankenmerge of 3 layers);
    // decoder: a + b with the module's weight gradient over its 2 layers;
    // shared: b alone (its module weight 1, over the top-level 5).
    let (m, cfg, _) = run(
        dir,
        "merge_method: linear\nparameters: {normalize: false, weight: 5}\nmodules:\n  encoder:\n    parameters: {weight: 1}\n    slices:\n      - sources: [{model: DIR/a, layer_range: [1, 3]}]\n      - sources: [{model: DIR/b, layer_range: [0, 1]}]\n  decoder:\n    parameters: {weight: [{filter: EncDecAttention, value: [0, 1]}]}\n    models: [{model: DIR/a}, {model: DIR/b}]\n  shared:\n    parameters: {weight: 1}\n    models: [{model: DIR/b}]\n",
    )
    .unwrap();
    let l = layout("t5");
    let (dec, enc) = (&l.modules[0], &l.modules[1]);
    for (out, (id, src)) in [(1.0, 1), (1.0, 2), (2.0, 0)].iter().enumerate() {
        for (k, s) in enc.layer.iter().enumerate() {
            let name = enc.layer_tensor(out, s);
            if t5_skip(s, *src) {
                // mergekit's rule: an optional tensor no source has is left out (the
                // relative attention bias of source layer 0 goes to output layer 2).
                assert!(m.get(&name).is_none(), "{name}");
                continue;
            }
            assert_eq!(value(&m, &name), tag(*id, 1, *src, k), "{name}");
        }
    }
    assert!(m.get("encoder.block.3.layer.1.layer_norm.weight").is_none());
    // Encoder norm from the last slice's source (b), embedding none (tied, not stored).
    assert_eq!(
        value(&m, "encoder.final_layer_norm.weight"),
        tag(2.0, 1, 90, 1)
    );
    assert!(m.get("encoder.embed_tokens.weight").is_none());
    for i in 0..2 {
        for (k, s) in dec.layer.iter().enumerate() {
            if t5_skip(s, i) {
                continue;
            }
            let w = if s.contains("EncDecAttention") {
                i as f32
            } else {
                5.0
            };
            let got = value(&m, &dec.layer_tensor(i, s));
            assert_eq!(got, w * (tag(1.0, 0, i, k) + tag(2.0, 0, i, k)), "{s} {i}");
        }
    }
    assert_eq!(value(&m, "shared.weight"), tag(2.0, 2, 90, 0));
    // The sliced module's layer count is written where T5 keeps it; the others stay.
    assert_eq!(cfg["num_layers"], 3);
    assert_eq!(cfg["num_decoder_layers"], 2);
}

#[test]
fn modules_left_out_are_not_written_and_vision_slices_set_the_depth() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qwen2_vl(dir, "a", 1.0, 2, 3);
    qwen2_vl(dir, "b", 2.0, 2, 3);
    // Slerp with a gradient t over the vision slice's two layers: t = 0 keeps a's
    // (the base) layer, t = 1 takes b's.
    let (m, cfg, dropped) = run(
        dir,
        "merge_method: slerp\nbase_model: DIR/a\nparameters: {t: [0, 1]}\nmodules:\n  vision_tower:\n    slices:\n      - sources: [{model: DIR/a, layer_range: [1, 3]}, {model: DIR/b, layer_range: [0, 2]}]\n",
    )
    .unwrap();
    let vision = &layout("qwen2_vl").modules[2];
    for (k, s) in vision.layer.iter().enumerate() {
        assert_eq!(
            value(&m, &vision.layer_tensor(0, s)),
            tag(1.0, 2, 1, k),
            "{s}"
        );
        assert_eq!(
            value(&m, &vision.layer_tensor(1, s)),
            tag(2.0, 2, 1, k),
            "{s}"
        );
    }
    assert_eq!(
        value(&m, "visual.patch_embed.proj.weight"),
        tag(1.0, 2, 90, 0)
    );
    assert_eq!(m.len(), 1 + 2 * 12);
    assert!(dropped.contains(&"model.embed_tokens.weight".to_string()));
    assert_eq!(cfg["vision_config"]["depth"], 2);
    assert_eq!(cfg["text_config"]["num_hidden_layers"], 2);
}

#[test]
fn bad_module_configs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    t5(dir, "a", 1.0, 3, 2);
    t5(dir, "short", 2.0, 2, 2);
    qwen2_vl(dir, "v", 1.0, 2, 2);
    let cfg = serde_json::json!({"architectures": ["Qwen2VLForConditionalGeneration"],
        "text_config": {"num_hidden_layers": 2}});
    write(
        dir,
        "nodepth",
        "qwen2_vl",
        1.0,
        &[2, 0, 2],
        |_, _| false,
        &[],
        cfg,
    );
    let llama = dir.join("llama");
    std::fs::create_dir_all(&llama).unwrap();
    crate::config_vocab::write_llama_checkpoint(
        &llama,
        1.0,
        ArrayD::from_elem(vec![3, 2], 1.0),
        None,
        3,
    );
    let cases = [
        (
            "modules:\n  vision_tower: {models: [{model: DIR/a}]}\n",
            "`vision_tower` is not a module of the t5 architecture; its modules are decoder, encoder, shared",
        ),
        (
            "modules:\n  default: {models: [{model: DIR/v}]}\n",
            "its modules are text_decoder, multi_modal_projector, vision_tower",
        ),
        (
            "slices:\n  - sources: [{model: DIR/v, layer_range: [0, 2]}]\n",
            "must use modules: config syntax",
        ),
        (
            "modules:\n  encoder: {models: [{model: DIR/a}, {model: DIR/short}]}\n",
            "`DIR/short` has 2 layers in its encoder module, `DIR/a` has 3",
        ),
        (
            "modules:\n  vision_tower: {slices: [{sources: [{model: DIR/v, layer_range: [1, 3]}]}]}\n",
            "has 2 layers (vision_tower: vision_config.depth), the range of its source 0 ends at 3",
        ),
        (
            "models: [{model: DIR/nodepth}]\n",
            "no whole-number layer count (vision_tower: vision_config.depth)",
        ),
        (
            "models: [{model: DIR/v}]\ntokenizer_source: base\n",
            "single-module architectures only",
        ),
        (
            "modules:\n  text_decoder: {models: [{model: DIR/llama}]}\n",
            "is a llama model, whose one module is `default`",
        ),
        (
            "modules:\n  encoder: {models: [{model: DIR/a}]}\n  decoder: {models: [{model: DIR/v}]}\n",
            "mix architectures",
        ),
    ];
    for (body, want) in cases {
        let text = format!("merge_method: linear\nparameters: {{weight: 1}}\n{body}");
        let err = run(dir, &text).unwrap_err().to_string();
        let want = want.replace("DIR", &dir.display().to_string());
        assert!(err.contains(&want), "`{want}` not in `{err}` for:\n{body}");
        assert!(!dir.join("out").exists(), "{body}");
    }
    let parse_cases = [
        ("modules: {}\n", "`modules`: is empty"),
        (
            "modules:\n  encoder: {parameters: {weight: 1}}\n",
            "modules.encoder needs exactly one of `models` and `slices`",
        ),
        (
            "modules:\n  encoder: {models: [{model: a, parameters: {wieght: 1}}]}\n",
            "modules.encoder.models[0] (a)",
        ),
        (
            "modules:\n  encoder: {slices: [{sources: [{model: a, layer_range: [2, 1]}]}]}\n",
            "modules.encoder.slices[0].sources[0] (a): start is after end",
        ),
        (
            "align: {}\nmodules:\n  encoder: {models: [{model: a}]}\n  decoder: {models: [{model: a}]}\n",
            "`align` works on whole models",
        ),
    ];
    for (body, want) in parse_cases {
        let text = format!("merge_method: linear\nparameters: {{weight: 1}}\n{body}");
        let err = Config::from_yaml(&text, Path::new("t.yml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "`{want}` not in `{err}` for:\n{body}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// Merging copies of one model returns the model, module by module, whichever
    /// form the config takes (top-level `models`, or each module from its own models
    /// or from one slice over all of its layers).
    #[test]
    fn merging_copies_returns_the_model(
        enc in 1usize..4,
        dec in 1usize..4,
        form in 0usize..3,
        method in prop::sample::select(vec!["linear", "ties", "slerp"]),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        t5(dir, "a", 3.0, enc, dec);
        std::fs::create_dir_all(dir.join("b")).unwrap();
        for f in ["model.safetensors", "config.json"] {
            std::fs::copy(dir.join("a").join(f), dir.join("b").join(f)).unwrap();
        }
        let params = match method {
            "linear" => "parameters: {weight: [1, 3]}\n",
            "ties" => "base_model: DIR/a\nparameters: {weight: 1, density: 0.5}\n",
            _ => "base_model: DIR/a\nparameters: {t: [0, 0.7]}\n",
        };
        let models = "models: [{model: DIR/a}, {model: DIR/b}]";
        let body = match form {
            0 => format!("{models}\n"),
            1 => format!("modules:\n  encoder: {{{models}}}\n  decoder: {{{models}}}\n  shared: {{{models}}}\n"),
            _ => format!(
                "modules:\n  encoder: {{slices: [{{sources: [{{model: DIR/a, layer_range: [0, {enc}]}}, {{model: DIR/b, layer_range: [0, {enc}]}}]}}]}}\n  decoder: {{{models}}}\n  shared: {{{models}}}\n"
            ),
        };
        let (m, cfg, _) = run(dir, &format!("merge_method: {method}\n{params}{body}")).unwrap();
        let a: StateDictF32 = load(dir.join("a")).unwrap();
        prop_assert_eq!(m.len(), a.len());
        for (name, t) in a.iter() {
            let got = m.get(name);
            prop_assert!(got.is_some(), "no {}", name);
            let close = got.into_iter().flatten().zip(t).all(|(x, y)| (x - y).abs() <= 1e-6 * y.abs());
            prop_assert!(close, "{} differs", name);
        }
        prop_assert_eq!(&cfg["num_layers"], &serde_json::json!(enc));
    }
}
