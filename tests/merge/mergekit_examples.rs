//! mergekit's own example configs (`examples/` of its repository, rewritten here with
//! the Hugging Face names replaced by small local checkpoints of 40 layers) run end to
//! end: every one plans, runs and writes the tensors and layer count it asks for.
#![cfg(feature = "config")]

use std::path::Path;

use modelfusion::StateDictF32;
use modelfusion::config::{Config, LAYOUTS, RunOptions};
use modelfusion::io::{Checkpoint, Dtype, save_file};
use modelfusion::progress::Silent;
use ndarray::ArrayD;

const LAYERS: usize = 40;
/// The tensors of a layer: mergekit's Llama table.
const LAYER: &[&str] = LAYOUTS[0].modules[0].layer;

/// A 40-layer Llama-like (or Mistral-like) checkpoint of width 2, values from `seed`.
fn write(dir: &Path, name: &str, arch: &str, seed: u32) {
    let mut x = seed;
    let mut next = move || {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        (x >> 16) as f32 / 65_536.0 - 0.5
    };
    let mut t = |shape: &[usize]| ArrayD::from_shape_fn(shape.to_vec(), |_| next());
    let mut pairs = vec![
        ("model.embed_tokens.weight".to_string(), t(&[3, 2])),
        ("model.norm.weight".to_string(), t(&[2])),
        ("lm_head.weight".to_string(), t(&[3, 2])),
    ];
    for l in 0..LAYERS {
        for s in LAYER {
            let shape: &[usize] = if s.contains("layernorm") {
                &[2]
            } else {
                &[2, 2]
            };
            pairs.push((format!("model.layers.{l}.{s}"), t(shape)));
        }
    }
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    save_file(
        &StateDictF32::from_pairs(pairs).unwrap(),
        d.join("model.safetensors"),
        Dtype::BF16,
    )
    .unwrap();
    let cfg = format!(
        r#"{{"architectures": ["{arch}"], "num_hidden_layers": {LAYERS}, "torch_dtype": "bfloat16"}}"#
    );
    std::fs::write(d.join("config.json"), cfg).unwrap();
}

/// mergekit's `examples/*.yml` with each model name replaced by `DIR/<name>`, and the
/// tensors and layers each output must have.
const EXAMPLES: [(&str, &str, usize); 6] = [
    (
        "arcee_fusion.yml",
        "models:\n  - model: DIR/model_a\n  - model: DIR/model_b\nmerge_method: arcee_fusion\nbase_model: DIR/model_a\ndtype: bfloat16\n",
        LAYERS,
    ),
    (
        "bio-merge.yml",
        "models:\n  - model: DIR/Mistral-7B-Instruct-v0.2\n    parameters:\n      density: 0.5\n      weight: 0.5\n  - model: DIR/BioMistral-7B\n    parameters:\n      density: 0.5\n      weight: 0.5\nmerge_method: ties\nbase_model: DIR/Mistral-7B-v0.1\nparameters:\n  normalize: false\n  int8_mask: true\ndtype: float16\n",
        LAYERS,
    ),
    (
        "gradient-slerp.yml",
        "slices:\n  - sources:\n      - model: DIR/orca_mini_v3_13b\n        layer_range: [0, 40]\n      - model: DIR/Platypus2-13B\n        layer_range: [0, 40]\nmerge_method: slerp\nbase_model: DIR/orca_mini_v3_13b\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5 # fallback for rest of tensors\ndtype: float16\n",
        LAYERS,
    ),
    (
        "linear.yml",
        "models:\n  - model: DIR/orca_mini_v3_13b\n    parameters:\n      weight: 1.0\n  - model: DIR/WizardLM-13B-V1.2\n    parameters:\n      weight: 0.3\n  - model: DIR/Platypus2-13B\n    parameters:\n      weight: 0.5\nmerge_method: linear\ndtype: float16\n",
        LAYERS,
    ),
    (
        "orcamini-platy-44layer.yml",
        "slices:\n  - sources:\n    - model: DIR/orca_mini_v3_13b\n      layer_range: [0, 24]\n  - sources:\n    - model: DIR/Platypus2-13B\n      layer_range: [20, 40]\nmerge_method: passthrough\ndtype: float16\n",
        44,
    ),
    (
        "ties.yml",
        "models:\n  - model: DIR/orca_mini_v3_13b\n    parameters:\n      density: [1, 0.7, 0.1] # density gradient\n      weight: 1.0\n  - model: DIR/Platypus2-13B\n    parameters:\n      density: 0.5\n      weight: [0, 0.3, 0.7, 1] # weight gradient\n  - model: DIR/WizardMath-13B-V1.0\n    parameters:\n      density: 0.33\n      weight:\n        - filter: mlp\n          value: 0.5\n        - value: 0\nmerge_method: ties\nbase_model: DIR/Llama-2-13B-fp16\nparameters:\n  normalize: true\n  int8_mask: true\ndtype: float16\n",
        LAYERS,
    ),
];

#[test]
fn every_mergekit_example_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let llama = [
        "model_a",
        "model_b",
        "orca_mini_v3_13b",
        "Platypus2-13B",
        "WizardLM-13B-V1.2",
        "WizardMath-13B-V1.0",
        "Llama-2-13B-fp16",
    ];
    let mistral = [
        "Mistral-7B-Instruct-v0.2",
        "BioMistral-7B",
        "Mistral-7B-v0.1",
    ];
    for (i, name) in llama.iter().enumerate() {
        write(dir, name, "LlamaForCausalLM", i as u32 + 1);
    }
    for (i, name) in mistral.iter().enumerate() {
        write(dir, name, "MistralForCausalLM", i as u32 + 100);
    }
    for (file, yaml, layers) in EXAMPLES {
        let text = yaml.replace("DIR", &dir.display().to_string());
        let config =
            Config::from_yaml(&text, Path::new(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let out = dir.join(format!("out-{file}"));
        let summary = config
            .run(&out, &RunOptions::new(), Silent)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(summary.merge.tensors, 3 + layers * LAYER.len(), "{file}");
        let ck = Checkpoint::open(&out).unwrap();
        assert!(
            ck.info(&format!("model.layers.{}.mlp.up_proj.weight", layers - 1))
                .is_some()
        );
        let want = if yaml.contains("bfloat16") {
            Dtype::BF16
        } else {
            Dtype::F16
        };
        assert!(ck.tensors().iter().all(|t| t.dtype() == want), "{file}");
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["num_hidden_layers"], layers, "{file}");
    }
}
