//! `tokenizer_source` / `tokenizer:` with differing vocabularies, run end to end on small
//! Llama-like checkpoints with their own `tokenizer.json`: the output vocabulary is
//! mergekit's (base ids kept, new tokens appended), every input's embedding and LM-head
//! rows are remapped to it before merging (own row, else the base's, the one model's,
//! the mean, zeros, or the `tokens:` choice; padding rows the mean), the tokenizer files
//! and `vocab_size` are written; bad tokenizer settings and `modules:` are clear errors.
//! Per-source filters of a slice match the source's tensor names (mergekit's rule).
#![cfg(feature = "config")]

use std::path::Path;

use modelfusion::config::{Config, RunOptions};
use modelfusion::io::{Dtype, load, save_file};
use modelfusion::progress::Silent;
use modelfusion::{Model, StateDictF32};
use ndarray::ArrayD;

const LAYER: &[&str] = modelfusion::config::LAYOUTS[0].modules[0].layer;

/// A one-layer Llama-like checkpoint in `d`: the embedding `embed`, the LM head `head`
/// (tied to the embedding without one), every other tensor `id`, and its `config.json`
/// with `vocab_size`.
pub(crate) fn write_llama_checkpoint(
    d: &Path,
    id: f32,
    embed: ArrayD<f32>,
    head: Option<ArrayD<f32>>,
    vocab_size: usize,
) {
    let tied = head.is_none();
    let mut pairs = vec![
        ("model.embed_tokens.weight".to_string(), embed),
        (
            "model.norm.weight".to_string(),
            ArrayD::from_elem(vec![2], id),
        ),
    ];
    pairs.extend(head.map(|h| ("lm_head.weight".to_string(), h)));
    for s in LAYER {
        let shape = if s.contains("layernorm") {
            vec![2]
        } else {
            vec![2, 2]
        };
        pairs.push((format!("model.layers.0.{s}"), ArrayD::from_elem(shape, id)));
    }
    save_file(
        &StateDictF32::from_pairs(pairs).unwrap(),
        d.join("model.safetensors"),
        Dtype::F32,
    )
    .unwrap();
    let cfg = serde_json::json!({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1,
        "hidden_size": 2, "vocab_size": vocab_size, "tie_word_embeddings": tied});
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
}

/// A one-layer Llama-like model `id` with `vocab` tokens; embedding row `r` is
/// `id * 100 + r`, LM-head row `r` is `-(id * 100 + r)`, every other tensor `id`.
fn write(dir: &Path, name: &str, id: f32, vocab: &[&str], added: &[(&str, usize)], tied: bool) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let v = vocab.len() + added.iter().filter(|(t, _)| !vocab.contains(t)).count();
    let rows =
        |sign: f32| ArrayD::from_shape_fn(vec![v, 2], |ix| sign * (id * 100.0 + ix[0] as f32));
    let head = (!tied).then(|| rows(-1.0));
    write_llama_checkpoint(&d, id, rows(1.0), head, v);
    let vocab_map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i.into()))
        .collect();
    let added: Vec<serde_json::Value> = added
        .iter()
        .map(|(t, i)| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tok = serde_json::json!({"version": "1.0", "added_tokens": added,
        "model": {"type": "BPE", "vocab": vocab_map, "merges": []}});
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        d.join("tokenizer_config.json"),
        r#"{"tokenizer_class": "PreTrainedTokenizerFast"}"#,
    )
    .unwrap();
    std::fs::write(d.join("tokenizer.model"), "stale").unwrap();
}

/// a: `<s> x y z` (4 rows); b: `<s> y w` plus added `<im>` (4 rows); c: `<s> z y w`
/// (3 rows, tied head).
fn setup(dir: &Path) {
    write(dir, "a", 1.0, &["<s>", "x", "y", "z"], &[("<s>", 0)], false);
    write(
        dir,
        "b",
        2.0,
        &["<s>", "y", "w"],
        &[("<s>", 0), ("<im>", 3)],
        false,
    );
    write(dir, "c", 3.0, &["<s>", "z", "y", "w"], &[("<s>", 0)], true);
}

fn run(
    dir: &Path,
    body: &str,
) -> modelfusion::Result<(StateDictF32, serde_json::Value, serde_json::Value)> {
    let text = body.replace("DIR", &dir.display().to_string());
    let c = Config::from_yaml(&text, Path::new("t.yml"))?;
    let out = dir.join("out");
    c.run(&out, &RunOptions::new(), Silent)?;
    let m: StateDictF32 = load(&out)?;
    let read = |f: &str| serde_json::from_slice(&std::fs::read(out.join(f)).unwrap()).unwrap();
    Ok((m, read("tokenizer.json"), read("config.json")))
}

fn row(m: &StateDictF32, name: &str, r: usize) -> f32 {
    m.get(name).unwrap()[[r, 0]]
}

/// token -> id of a tokenizer.json.
fn ids(tok: &serde_json::Value) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = tok["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, i)| (t.clone(), i.as_u64().unwrap()))
        .collect();
    for e in tok["added_tokens"].as_array().unwrap() {
        let t = e["content"].as_str().unwrap().to_string();
        if !v.iter().any(|(u, _)| *u == t) {
            v.push((t, e["id"].as_u64().unwrap()));
        }
    }
    v.sort_by_key(|(_, i)| *i);
    v
}

#[test]
fn union_remaps_rows_as_mergekit_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    // Base a: its tokens keep their ids; w (from b) and <im> (b's added token) follow.
    let (m, tok, cfg) = run(
        dir,
        "merge_method: task_arithmetic\nbase_model: DIR/a\nmodels:\n  - model: DIR/b\n    parameters: {weight: 1}\n  - model: DIR/c\n    parameters: {weight: 1}\ntokenizer_source: union\n",
    )
    .unwrap();
    let want = ["<s>", "x", "y", "z", "w", "<im>"];
    let got: Vec<String> = ids(&tok).into_iter().map(|(t, _)| t).collect();
    assert_eq!(got, want);
    assert_eq!(cfg["vocab_size"], 6);
    let e = "model.embed_tokens.weight";
    // Output = a + (b - a) + (c - a) with each input's rows remapped:
    // <s>: all have it (rows 0): 100 + 100 + 200 = 400... = b + c - a.
    let tri = |a: f32, b: f32, c: f32| b + c - a;
    assert_eq!(row(&m, e, 0), tri(100.0, 200.0, 300.0));
    // x: a only -> every model gets a's row 1 (the one model's).
    assert_eq!(row(&m, e, 1), 101.0);
    // y: all have it: a 2, b 1, c 2.
    assert_eq!(row(&m, e, 2), tri(102.0, 201.0, 302.0));
    // z: a and c have it; the base has it, so b gets a's row.
    assert_eq!(row(&m, e, 3), tri(103.0, 103.0, 301.0));
    // w: b (2) and c (3), not the base: a gets their mean.
    let mean = (202.0 + 303.0) / 2.0;
    assert_eq!(row(&m, e, 4), tri(mean, 202.0, 303.0));
    // <im>: b only.
    assert_eq!(row(&m, e, 5), 203.0);
    // c's tied head is its embedding: y row 2 of c's embedding (302).
    let h = "lm_head.weight";
    assert_eq!(row(&m, h, 2), tri(-102.0, -201.0, 302.0));
    // The vocabulary changed: tokenizer.model (stale now) is not written.
    assert!(!dir.join("out/tokenizer.model").exists());
    assert!(dir.join("out/tokenizer_config.json").exists());
}

#[test]
fn base_and_model_sources_and_tokens_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    // The base's vocabulary: b's and c's rows of a's tokens, zeros... no: x is a's only.
    let (m, tok, _) = run(
        dir,
        "merge_method: linear\nmodels:\n  - model: DIR/a\n    parameters: {weight: 1}\n  - model: DIR/b\n    parameters: {weight: 1}\nparameters: {normalize: false}\ntokenizer_source: base\n",
    )
    .unwrap();
    assert_eq!(ids(&tok).len(), 4);
    // y: a row 2 + b row 1; x: a's row for both.
    assert_eq!(row(&m, "model.embed_tokens.weight", 2), 102.0 + 201.0);
    assert_eq!(row(&m, "model.embed_tokens.weight", 1), 2.0 * 101.0);
    // The vocabulary unchanged: a's files copied as they are.
    assert!(dir.join("out/tokenizer.model").exists());
    // model:PATH, `tokens:` and padding to a multiple of 3: b's 4 tokens, 6 rows.
    let (m, tok, cfg) = run(
        dir,
        "merge_method: linear\nmodels:\n  - model: DIR/a\n    parameters: {weight: 1}\n  - model: DIR/b\n    parameters: {weight: 1}\nparameters: {normalize: false}\ntokenizer:\n  source: model:DIR/b\n  pad_to_multiple_of: 3\n  tokens:\n    <im>: {source: {kind: model_token, model: DIR/a, token: z}}\n    \"y\": {source: {kind: zero}, force: true}\n",
    )
    .unwrap();
    let got: Vec<String> = ids(&tok).into_iter().map(|(t, _)| t).collect();
    assert_eq!(got, ["<s>", "y", "w", "<im>"]);
    assert_eq!(cfg["vocab_size"], 6);
    let e = "model.embed_tokens.weight";
    let rows: Vec<f32> = (0..6).map(|r| row(&m, e, r)).collect();
    // <s>: 100 + 200; y: forced zeros; w: b's row for a too; <im>: a's z row (103), b's own.
    let (ma, mb) = (
        (100.0 + 0.0 + 202.0 + 103.0) / 4.0,
        (200.0 + 0.0 + 202.0 + 203.0) / 4.0,
    );
    assert_eq!(rows, [300.0, 0.0, 404.0, 306.0, ma + mb, ma + mb]);
}

#[test]
fn bad_tokenizer_settings_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let head = "merge_method: linear\nmodels:\n  - model: DIR/a\n    parameters: {weight: 1}\n  - model: DIR/b\n    parameters: {weight: 1}\n";
    let cases = [
        ("tokenizer_source: 3\n", "tokenizer_source"),
        (
            "tokenizer: {source: union, pad_to_multiple_of: 0}\n",
            "tokenizer.pad_to_multiple_of",
        ),
        (
            "tokenizer: {source: union, pad_to_multiple_of: 2.5}\n",
            "whole number",
        ),
        ("tokenizer: {sauce: union}\n", "unknown key `sauce`"),
        ("tokenizer: {tokens: [a]}\n", "tokenizer.tokens"),
        ("tokenizer: {tokens: {q: {force: true}}}\n", "no `source`"),
        (
            "tokenizer: {tokens: {q: {source: {kind: one}}}}\n",
            "unknown source kind",
        ),
        (
            "tokenizer: {tokens: {q: {source: {kind: model_token, model: DIR/a}}}}\n",
            "exactly one of `token`",
        ),
        (
            "tokenizer: {tokens: {q: {source: {kind: zero}, force: 2}}}\n",
            "`force` is true or false",
        ),
        (
            "tokenizer: {tokens: {q: {source: DIR/b}}}\n",
            "lacks the token",
        ),
        (
            "tokenizer: {tokens: {q: {source: DIR/nowhere}}}\n",
            "not a source",
        ),
        (
            "tokenizer: {tokens: {q: {source: {kind: model_token, model: DIR/a, token_id: 9}}}}\n",
            "out of range",
        ),
        (
            "tokenizer: {tokens: {q: {source: {kind: model_token, model: DIR/a, token: nope}}}}\n",
            "`nope` is not in the vocabulary",
        ),
        (
            "tokenizer_source: union\ntokenizer: {source: base}\n",
            "both",
        ),
        (
            "tokenizer: {tokens: {y: {source: {kind: zero}}}}\n",
            "quote `tokens` keys",
        ),
    ];
    for (tail, want) in cases {
        let err = run(dir, &format!("{head}{tail}")).unwrap_err().to_string();
        assert!(err.contains(want), "`{want}` not in `{err}` for {tail}");
        assert!(!dir.join("out").exists(), "{tail}");
    }
}

#[test]
fn modules_default_is_the_top_level_form() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    // Module parameters sit between the models' and the top-level ones: the filtered
    // module weight falls back to the top-level weight where no filter matches.
    let (m, _, _) = run(
        dir,
        "merge_method: linear\nparameters: {normalize: false, weight: 2}\nmodules:\n  default:\n    parameters: {weight: [{filter: mlp, value: 3}]}\n    models:\n      - model: DIR/a\n      - model: DIR/b\n        parameters: {weight: 1}\ntokenizer_source: union\n",
    )
    .unwrap();
    assert_eq!(
        m.get("model.layers.0.mlp.up_proj.weight").unwrap()[[0, 0]],
        3.0 + 2.0
    );
    assert_eq!(
        m.get("model.layers.0.self_attn.q_proj.weight").unwrap()[[0, 0]],
        2.0 + 2.0
    );
    for (body, want) in [
        (
            "modules:\n  text_decoder: {models: [{model: DIR/a}]}\n  vision_tower: {models: [{model: DIR/b}]}\n",
            "`default`",
        ),
        (
            "modules:\n  default: {parameters: {weight: 1}}\n",
            "exactly one of `models` and `slices`",
        ),
        (
            "models: [{model: DIR/a}]\nmodules:\n  default: {models: [{model: DIR/a}]}\n",
            "`modules` is set with",
        ),
    ] {
        let err = run(
            dir,
            &format!("merge_method: linear\nparameters: {{weight: 1}}\n{body}"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(want), "`{want}` not in `{err}`");
    }
}

#[test]
fn per_source_filters_in_slices_match_the_source_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (n, id) in [("p", 1.0), ("q", 2.0)] {
        let d = dir.join(n);
        std::fs::create_dir_all(&d).unwrap();
        let mut pairs = vec![
            (
                "model.embed_tokens.weight".to_string(),
                ArrayD::from_elem(vec![3, 2], id),
            ),
            (
                "model.norm.weight".to_string(),
                ArrayD::from_elem(vec![2], id),
            ),
            (
                "lm_head.weight".to_string(),
                ArrayD::from_elem(vec![3, 2], id),
            ),
        ];
        for l in 0..3 {
            for s in LAYER {
                let shape = if s.contains("layernorm") {
                    vec![2]
                } else {
                    vec![2, 2]
                };
                pairs.push((
                    format!("model.layers.{l}.{s}"),
                    ArrayD::from_elem(shape, id),
                ));
            }
        }
        save_file(
            &StateDictF32::from_pairs(pairs).unwrap(),
            d.join("model.safetensors"),
            Dtype::F32,
        )
        .unwrap();
        std::fs::write(
            d.join("config.json"),
            r#"{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3}"#,
        )
        .unwrap();
    }
    // p's layer 2 becomes output layer 0: the filter `layers.2.` names the source's
    // layer (mergekit resolves per-model parameters against the input's tensor name).
    let body = "merge_method: linear\nparameters: {normalize: false}\nslices:\n  - sources:\n      - {model: DIR/p, layer_range: [2, 3], parameters: {weight: [{filter: layers.2., value: 5}, {value: 1}]}}\n      - {model: DIR/q, layer_range: [0, 1], parameters: {weight: 1}}\n";
    let text = body.replace("DIR", &dir.display().to_string());
    let c = Config::from_yaml(&text, Path::new("t.yml")).unwrap();
    c.run(
        dir.join("out"),
        &RunOptions::new().with_copy_files(false),
        Silent,
    )
    .unwrap();
    let m: StateDictF32 = load(dir.join("out")).unwrap();
    assert_eq!(
        m.get("model.layers.0.mlp.up_proj.weight").unwrap()[[0, 0]],
        5.0 + 2.0
    );
    assert_eq!(m.get("model.norm.weight").unwrap()[0], 1.0 + 2.0);
}
