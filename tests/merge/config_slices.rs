//! `slices:` configs (frankenmerges with `passthrough`, slices merged with a method) and
//! whole-model merges of inputs that do not hold the same tensors, run end to end on
//! small Llama-like checkpoints: the output's tensors are the expected sources, renamed,
//! the copied `config.json` has the output's layer count, and every config mergekit
//! rejects is a clear error before anything is written.
#![cfg(feature = "config")]

use std::path::Path;

use modelfusion::config::{Config, LAYOUTS, RunOptions};
use modelfusion::io::{Dtype, load, save_file};
use modelfusion::progress::Silent;
use modelfusion::{Model, StateDictF32};
use ndarray::ArrayD;

const LAYERS: usize = 4;
/// The tensors of a layer: mergekit's Llama table.
const LAYER: &[&str] = LAYOUTS[0].modules[0].layer;

/// A Llama-like model whose every tensor is filled with `id * 1000 + layer * 10 + k`
/// (`layer` 90 outside the layers), so where an output tensor came from can be read
/// off its values.
fn llama(id: f32) -> StateDictF32 {
    let mut pairs: Vec<(String, ArrayD<f32>)> = vec![
        (
            "model.embed_tokens.weight".into(),
            fill(&[5, 4], id, 90.0, 0.0),
        ),
        ("model.norm.weight".into(), fill(&[4], id, 90.0, 1.0)),
        ("lm_head.weight".into(), fill(&[5, 4], id, 90.0, 2.0)),
    ];
    for l in 0..LAYERS {
        for (k, s) in LAYER.iter().enumerate() {
            let shape: &[usize] = if s.contains("layernorm") {
                &[4]
            } else {
                &[4, 4]
            };
            pairs.push((
                format!("model.layers.{l}.{s}"),
                fill(shape, id, l as f32, k as f32),
            ));
        }
    }
    StateDictF32::from_pairs(pairs).unwrap()
}

fn fill(shape: &[usize], id: f32, layer: f32, k: f32) -> ArrayD<f32> {
    ArrayD::from_elem(shape.to_vec(), id * 1000.0 + layer * 10.0 + k)
}

fn write(dir: &Path, name: &str, m: &StateDictF32, arch: Option<&str>) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    save_file(m, d.join("model.safetensors"), Dtype::F32).unwrap();
    if let Some(arch) = arch {
        let cfg = format!(
            r#"{{"architectures": ["{arch}"], "num_hidden_layers": {LAYERS}, "hidden_size": 4, "torch_dtype": "float32"}}"#
        );
        std::fs::write(d.join("config.json"), cfg).unwrap();
    }
}

fn setup(dir: &Path) {
    for (name, id) in [("base", 1.0), ("a", 2.0), ("b", 3.0), ("c", 4.0)] {
        write(dir, name, &llama(id), Some("LlamaForCausalLM"));
    }
}

fn config(dir: &Path, body: &str) -> Config {
    let text = body.replace("DIR", &dir.display().to_string());
    Config::from_yaml(&text, Path::new("test.yml")).unwrap()
}

fn value(m: &StateDictF32, name: &str) -> f32 {
    let t = m.get(name).unwrap_or_else(|| panic!("no `{name}`"));
    t.iter().copied().next().unwrap()
}

#[test]
fn a_frankenmerge_reorders_duplicates_and_renumbers_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let c = config(
        dir,
        "merge_method: passthrough\nslices:\n  - sources: [{model: DIR/a, layer_range: [0, 3]}]\n  - sources: [{model: DIR/b, layer_range: [1, 4]}]\n  - sources: [{model: DIR/a, layer_range: [2, 3]}]\ndtype: float16\nout_dtype: float32\n",
    );
    let plan = c.plan().unwrap();
    assert_eq!(plan.layers(), Some(7));
    assert_eq!(plan.inputs().len(), 2);
    let summary = plan
        .run(dir.join("out"), &RunOptions::new(), Silent)
        .unwrap();
    assert_eq!(summary.merge.tensors, 3 + 7 * LAYER.len());
    let out: StateDictF32 = load(dir.join("out")).unwrap();
    // Output layer -> (model id, source layer).
    let want = [(2, 0), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3), (2, 2)];
    for (l, (id, src)) in want.iter().enumerate() {
        for (k, s) in LAYER.iter().enumerate() {
            let got = value(&out, &format!("model.layers.{l}.{s}"));
            assert_eq!(got, (*id * 1000 + src * 10 + k) as f32, "layer {l} {s}");
        }
    }
    assert!(out.get("model.layers.7.mlp.up_proj.weight").is_none());
    // Embedding from the first slice's source, norm and head from the last slice's.
    assert_eq!(value(&out, "model.embed_tokens.weight"), 2900.0);
    assert_eq!(value(&out, "model.norm.weight"), 2901.0);
    assert_eq!(value(&out, "lm_head.weight"), 2902.0);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 7);
    assert_eq!(cfg["torch_dtype"], "float32");
    assert_eq!(summary.out_dtype, Dtype::F32);
}

#[test]
fn a_slice_merged_by_a_method_has_gradients_over_its_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    // Slice 0: a[0..2] (weight 1) + b[2..4] (weight [0, 2] over the slice's two layers),
    // not normalised. Slice 1: c[3..4] alone, its weight from the slice's parameters.
    let c = config(
        dir,
        "merge_method: linear\nparameters: {normalize: false, weight: 5}\nslices:\n  - sources:\n      - {model: DIR/a, layer_range: [0, 2], parameters: {weight: 1}}\n      - {model: DIR/b, layer_range: [2, 4], parameters: {weight: [0, 2]}}\n  - sources: [{model: DIR/c, layer_range: [3, 4]}]\n    parameters: {weight: 0.5}\n",
    );
    c.run(dir.join("out"), &RunOptions::new(), Silent).unwrap();
    let out: StateDictF32 = load(dir.join("out")).unwrap();
    for (k, s) in LAYER.iter().enumerate() {
        let k = k as f32;
        let a = |l: f32| 2000.0 + l * 10.0 + k;
        let b = |l: f32| 3000.0 + l * 10.0 + k;
        // Layer 0 of the slice: t = 0, b's weight 0; layer 1: t = 1, weight 2.
        assert_eq!(value(&out, &format!("model.layers.0.{s}")), a(0.0));
        assert_eq!(
            value(&out, &format!("model.layers.1.{s}")),
            a(1.0) + 2.0 * b(3.0)
        );
        assert_eq!(
            value(&out, &format!("model.layers.2.{s}")),
            0.5 * (4000.0 + 30.0 + k)
        );
    }
    // Around the layers, t = 0: the embedding from slice 0 (b's weight 0), the norm
    // from slice 1.
    assert_eq!(value(&out, "model.embed_tokens.weight"), 2900.0);
    assert_eq!(value(&out, "model.norm.weight"), 0.5 * 4901.0);
}

#[test]
fn a_slice_base_model_must_be_a_source_and_task_methods_use_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let c = config(
        dir,
        "merge_method: task_arithmetic\nbase_model: DIR/base\nparameters: {weight: 1}\nslices:\n  - sources: [{model: DIR/a, layer_range: [1, 2]}, {model: DIR/base, layer_range: [0, 1]}]\n",
    );
    assert_eq!(c.slices[0].ranges, [(0, 1), (1, 2)]);
    c.run(dir.join("out"), &RunOptions::new(), Silent).unwrap();
    let out: StateDictF32 = load(dir.join("out")).unwrap();
    // base + (a - base) = a, layer 1 of a.
    assert_eq!(value(&out, "model.layers.0.mlp.up_proj.weight"), 2016.0);
}

#[test]
fn tensors_outside_the_layout_are_left_out_and_a_tied_head_reads_the_embedding() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rope = llama(2.0);
    rope.insert(
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        ArrayD::from_elem(vec![2], 1.0),
    )
    .unwrap();
    let mut tied = llama(3.0);
    tied.remove("lm_head.weight");
    write(dir, "rope", &rope, Some("LlamaForCausalLM"));
    write(dir, "tied", &tied, Some("LlamaForCausalLM"));
    let c = config(
        dir,
        "merge_method: linear\nparameters: {normalize: false}\nmodels:\n  - model: DIR/rope\n    parameters: {weight: 0.5}\n  - model: DIR/tied\n    parameters: {weight: 1}\n",
    );
    let plan = c.plan().unwrap();
    assert_eq!(
        plan.dropped(),
        ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    );
    let summary = plan
        .run(dir.join("out"), &RunOptions::new(), Silent)
        .unwrap();
    assert_eq!(summary.dropped.len(), 1);
    let out: StateDictF32 = load(dir.join("out")).unwrap();
    assert!(
        out.get("model.layers.0.self_attn.rotary_emb.inv_freq")
            .is_none()
    );
    assert_eq!(value(&out, "lm_head.weight"), 0.5 * 2902.0 + 3900.0);
    // Without a known layout the mismatch stays an error naming the tensors.
    write(dir, "rope_plain", &rope, None);
    write(dir, "tied_plain", &tied, None);
    let c = config(
        dir,
        "merge_method: linear\nmodels:\n  - model: DIR/rope_plain\n    parameters: {weight: 1}\n  - model: DIR/tied_plain\n    parameters: {weight: 1}\n",
    );
    let err = c.plan().unwrap_err().to_string();
    assert!(err.contains("inv_freq") && err.contains("lm_head"), "{err}");
}

#[test]
fn configs_mergekit_rejects_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    write(dir, "gpt2", &llama(5.0), Some("GPT2LMHeadModel"));
    write(dir, "plain", &llama(6.0), None);
    write(dir, "mistral", &llama(7.0), Some("MistralForCausalLM"));
    let one = |range: &str| {
        format!(
            "merge_method: passthrough\nslices:\n  - sources: [{{model: DIR/a, layer_range: {range}}}]\n"
        )
    };
    // Errors when the config is read.
    let parse_cases = [
        (one("[3, 1]"), "start is after end"),
        (one("[0]"), "two numbers"),
        (one("[0, -1]"), "whole numbers"),
        (one("\"0-2\""), "not a list"),
        (
            "merge_method: linear\nslices:\n  - sources: [{model: a, layer_range: [0, 2], parameters: {weight: 1}}, {model: b, layer_range: [0, 3], parameters: {weight: 1}}]\n".into(),
            "same number of layers",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n".into(),
            "both `models` and `slices`",
        ),
        ("merge_method: passthrough\nslices: []\n".into(), "`slices` is empty"),
        ("merge_method: passthrough\nslices:\n  - sources: []\n".into(), "slices[0] has no `sources`"),
        (
            "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 2]}]\n".into(),
            "slices[0]: merge_method `passthrough` takes at most 1",
        ),
        (
            "merge_method: linear\nslices:\n  - sources: [{model: a, layer_range: [0, 1], parameters: {weight: 1}}, {model: a, layer_range: [1, 2], parameters: {weight: 1}}]\n".into(),
            "source twice",
        ),
        (
            "merge_method: ties\nbase_model: base\nparameters: {weight: 1}\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n".into(),
            "not one of the slice's sources",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_ranges: [0, 2]}]\n".into(),
            "layer_ranges",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n    parameters: {weight: 1}\n".into(),
            "slices[0].parameters",
        ),
        (
            "merge_method: passthrough\nalign: {}\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n".into(),
            "`align`",
        ),
        (
            "merge_method: linear\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n".into(),
            "slices[0].sources[0] (a)",
        ),
    ];
    for (text, want) in parse_cases {
        let text = text.replace("DIR", &dir.display().to_string());
        let err = Config::from_yaml(&text, Path::new("test.yml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "`{want}` not in `{err}` for:\n{text}");
    }
    // Errors when the inputs are opened, before anything is written.
    let plan_cases = [
        (one("[2, 5]"), "has 4 layers (num_hidden_layers), the range of its source 0 ends at 5"),
        (
            "merge_method: passthrough\nslices:\n  - sources: [{model: DIR/gpt2, layer_range: [0, 2]}]\n".into(),
            "GPT2LMHeadModel",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources: [{model: DIR/plain, layer_range: [0, 2]}]\n".into(),
            "has no config.json",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources: [{model: DIR/a, layer_range: [0, 2]}]\n  - sources: [{model: DIR/mistral, layer_range: [0, 2]}]\n".into(),
            "mix architectures",
        ),
        (
            "merge_method: slerp\nbase_model: DIR/base\nparameters: {t: [0, 2]}\nslices:\n  - sources: [{model: DIR/base, layer_range: [0, 2]}, {model: DIR/a, layer_range: [0, 2]}]\n".into(),
            "slices[0]",
        ),
    ];
    for (text, want) in plan_cases {
        let c = config(dir, &text);
        let err = c
            .run(dir.join("never"), &RunOptions::new(), Silent)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "`{want}` not in `{err}` for:\n{text}");
        assert!(!dir.join("never").exists());
    }
}

fn write_tokenizer(dir: &Path, name: &str, tokens: &[&str], template: Option<&str>) {
    let vocab: Vec<String> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| format!("\"{t}\": {i}"))
        .collect();
    let json = format!(
        r#"{{"model": {{"type": "BPE", "vocab": {{{}}}, "merges": []}}, "added_tokens": []}}"#,
        vocab.join(", ")
    );
    std::fs::write(dir.join(name).join("tokenizer.json"), json).unwrap();
    let cfg = match template {
        Some(t) => serde_json::json!({"model_max_length": 8, "chat_template": t}),
        None => serde_json::json!({"model_max_length": 8}),
    };
    std::fs::write(
        dir.join(name).join("tokenizer_config.json"),
        cfg.to_string(),
    )
    .unwrap();
}

#[test]
fn tokenizer_source_and_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let chat = "{% for m in messages %}{{ m.content }}{% endfor %}";
    let toks = ["a", "b", "c", "d", "<s>"];
    write_tokenizer(dir, "base", &toks, Some(chat));
    write_tokenizer(dir, "a", &toks, Some(chat));
    write_tokenizer(
        dir,
        "b",
        &toks,
        Some("{{ other }} template, longer than 20"),
    );
    write_tokenizer(dir, "c", &["a", "b", "c", "e", "<s>"], None);
    // Shared vocabulary: the rows need no remapping; the tokenizer files, the vocabulary
    // size and the most common chat template are written.
    let c = config(
        dir,
        "merge_method: task_arithmetic\nbase_model: DIR/base\ntokenizer_source: union\nchat_template: auto\nmodels:\n  - model: DIR/a\n    parameters: {weight: 1}\n  - model: DIR/b\n    parameters: {weight: 1}\n",
    );
    let summary = c.run(dir.join("out"), &RunOptions::new(), Silent).unwrap();
    assert!(summary.copied.contains(&"tokenizer.json".to_string()));
    let out = dir.join("out");
    assert_eq!(
        std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(),
        chat
    );
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(tc.get("chat_template").is_none() && tc["model_max_length"] == 8);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 5);
    assert_eq!(modelfusion::config::vocabulary(&out).unwrap().len(), 5);
    // A template written out in the config.
    let c = config(
        dir,
        "merge_method: passthrough\nchat_template: \"{{ bos }}{% for m in messages %}x{% endfor %}\"\nslices:\n  - sources: [{model: DIR/a, layer_range: [0, 1]}]\n",
    );
    c.run(dir.join("out2"), &RunOptions::new(), Silent).unwrap();
    assert!(
        std::fs::read_to_string(dir.join("out2/chat_template.jinja"))
            .unwrap()
            .starts_with("{{ bos }}")
    );
    let rejected_at_run = [
        (
            "merge_method: linear\ntokenizer_source: model:DIR/nowhere\nmodels:\n  - model: DIR/a\n    parameters: {weight: 1}\n",
            "has no tokenizer (tokenizer.json, vocab.json + merges.txt, or tokenizer.model)",
        ),
        (
            "merge_method: linear\nchat_template: chatml\nmodels:\n  - model: DIR/a\n    parameters: {weight: 1}\n",
            "named templates",
        ),
    ];
    for (text, want) in rejected_at_run {
        let err = config(dir, text)
            .run(dir.join("never"), &RunOptions::new(), Silent)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "`{want}` not in `{err}` for:\n{text}");
        assert!(!dir.join("never").exists());
    }
    let rejected = [
        (
            "merge_method: linear\ntokenizer_source: base\ntokenizer: {source: base}\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
            "both `tokenizer_source` and `tokenizer`",
        ),
        (
            "merge_method: linear\ntokenizer: {sauce: union}\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
            "unknown key `sauce`",
        ),
        (
            "merge_method: linear\ntokenizer_source: 3\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
            "expected `base`, `union` or a model",
        ),
        (
            "merge_method: linear\nmodules: {default: {models: []}}\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
            "`modules` is set with `models`",
        ),
    ];
    for (text, want) in rejected {
        let err = Config::from_yaml(text, Path::new("test.yml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "`{want}` not in `{err}` for:\n{text}");
    }
}
