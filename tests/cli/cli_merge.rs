//! The `modelfusion` binary end to end: YAML config in, merged checkpoint out, and
//! clear errors before any heavy work.
#![cfg(feature = "cli")]

use crate::io_common;

use std::path::Path;
use std::process::Command;

use io_common::random_sd;
use modelfusion::io::{Checkpoint, Dtype, IoScalar, SaveOptions, load, save};
use modelfusion::{Model, StateDict};
use ndarray::ArrayD;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_modelfusion"))
}

/// Runs `modelfusion merge CONFIG OUT` with `yaml` in `dir`; returns (success, stderr).
fn merge(dir: &Path, yaml: &str, extra: &[&str]) -> (bool, String) {
    let cfg = dir.join("merge.yml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = bin()
        .current_dir(dir)
        .args(["merge", "merge.yml", "out"])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SHAPES: [(&str, [usize; 2]); 3] = [
    ("model.layers.0.self_attn.q_proj.weight", [16, 8]),
    ("model.layers.0.mlp.up_proj.weight", [24, 8]),
    ("lm_head.weight", [10, 8]),
];

fn setup() -> (tempfile::TempDir, Vec<StateDict<ArrayD<f32>>>) {
    let dir = tempfile::tempdir().unwrap();
    let shapes: Vec<(&str, Vec<usize>)> = SHAPES.iter().map(|(n, s)| (*n, s.to_vec())).collect();
    let mut models = Vec::new();
    for (i, d) in [Dtype::F32, Dtype::BF16, Dtype::F16]
        .into_iter()
        .enumerate()
    {
        let p = dir.path().join(format!("m{i}"));
        save(
            &random_sd(&shapes, 40 + i as u64, 1.0),
            &p,
            &SaveOptions::new(d),
        )
        .unwrap();
        models.push(load(&p).unwrap());
    }
    std::fs::write(
        dir.path().join("m0/config.json"),
        r#"{"architectures":["X"],"torch_dtype":"float32"}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("m0/tokenizer.json"), "{}").unwrap();
    (dir, models)
}

const LINEAR: &str = "merge_method: linear
models:
  - model: m0
    parameters:
      weight: [{filter: self_attn, value: 2.0}, {value: 1.0}]
  - model: m1
    parameters:
      weight: 1.0
  - model: m2
parameters:
  weight: 2.0
dtype: float32
out_dtype: bfloat16
";

#[test]
fn linear_merge_matches_the_formula() {
    let (dir, models) = setup();
    let (ok, err) = merge(dir.path(), LINEAR, &["--max-shard-size", "600"]);
    assert!(ok, "{err}");
    assert!(err.contains("merged 3 tensors"), "{err}");
    let out = dir.path().join("out");
    let ck = Checkpoint::open(&out).unwrap();
    assert!(ck.files().count() > 1, "sharded output expected");
    assert!(ck.tensors().iter().all(|t| t.dtype() == Dtype::BF16));
    let got: StateDict<ArrayD<f32>> = load(&out).unwrap();
    for (name, _) in SHAPES {
        let w0 = if name.contains("self_attn") {
            2.0f32
        } else {
            1.0
        };
        let ws = [w0, 1.0, 2.0];
        let total: f32 = ws.iter().sum();
        let t: Vec<&ArrayD<f32>> = models.iter().map(|m| m.get(name).unwrap()).collect();
        let g = got.get(name).unwrap();
        for k in 0..g.len() {
            // The same operation order as the merger: scale by w/total, then accumulate.
            let mut acc = t[0].as_slice().unwrap()[k] * (ws[0] / total);
            for j in 1..3 {
                acc += (ws[j] / total) * t[j].as_slice().unwrap()[k];
            }
            let want = acc.to_bf16().to_f32();
            let have = g.as_slice().unwrap()[k];
            assert!(
                (want - have).abs() <= 1e-2 * want.abs().max(1e-3),
                "{name}[{k}]: {want} vs {have}"
            );
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert!(out.join("tokenizer.json").exists());
}

#[test]
fn float64_compute_and_default_output_dtype() {
    let (dir, _) = setup();
    let yaml = "merge_method: linear\nmodels:\n  - model: m0\n    parameters: {weight: 1}\n  - model: m0\n    parameters: {weight: 1}\ndtype: float64\n";
    let (ok, err) = merge(dir.path(), yaml, &["--no-copy-files"]);
    assert!(ok, "{err}");
    let out = dir.path().join("out");
    assert!(!out.join("config.json").exists());
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(ck.tensors()[0].dtype(), Dtype::F64);
    // Averaging a model with itself returns it exactly.
    let a: StateDict<ArrayD<f64>> = load(dir.path().join("m0")).unwrap();
    let b: StateDict<ArrayD<f64>> = load(&out).unwrap();
    assert_eq!(a, b);
}

#[test]
fn dry_run_writes_nothing() {
    let (dir, _) = setup();
    let (ok, err) = merge(dir.path(), LINEAR, &["--dry-run"]);
    assert!(ok, "{err}");
    assert!(err.contains("3 tensors") && err.contains("BF16"), "{err}");
    assert!(!dir.path().join("out").exists());
}

#[test]
fn errors_before_any_work() {
    let (dir, _) = setup();
    let other = dir.path().join("bad");
    let mut sh: Vec<(&str, Vec<usize>)> = SHAPES.iter().map(|(n, s)| (*n, s.to_vec())).collect();
    sh[2].1 = vec![12, 8];
    save(
        &random_sd(&sh, 1, 1.0),
        &other,
        &SaveOptions::new(Dtype::F32),
    )
    .unwrap();
    let cases = [
        (
            "merge_method: blend\nmodels: [{model: m0}]\n",
            vec!["unknown method `blend`", "linear"],
        ),
        (
            "merge_method: linear\nmodels:\n  - model: m0\n    parameters: {weight: 1, density: 0.5}\n",
            vec!["density", "linear"],
        ),
        (
            "merge_method: linear\nmodels:\n  - model: m0\n    parameters: {weight: 1}\n  - model: nowhere\n    parameters: {weight: 1}\n",
            vec!["models[1]", "nowhere", "does not exist"],
        ),
        (
            "merge_method: linear\nmodels:\n  - model: m0\n    parameters: {weight: 1}\n  - model: bad\n    parameters: {weight: 1}\n",
            vec!["lm_head.weight", "[10, 8]", "[12, 8]"],
        ),
        (
            "merge_method: linear\nmodels:\n  - model: m0\n",
            vec!["weight", "models[0]"],
        ),
        (
            "merge_method: linear\nmodels: [{model: m0, parameters: {weight: 1}}]\nout_dtype: int4\n",
            vec!["int4"],
        ),
        ("merge_method: [oops\n", vec!["merge.yml"]),
        ("merge_method: linear\nslices: []\n", vec!["slices"]),
        (
            "merge_method: linear\nmodels:\n  - model: m0\n    parameters: {weight: 1}\n  - model: m0\n    parameters: {weight: -1}\n",
            vec!["sum to 0"],
        ),
    ];
    for (yaml, wants) in cases {
        let (ok, err) = merge(dir.path(), yaml, &[]);
        assert!(!ok, "should fail:\n{yaml}");
        for w in wants {
            assert!(err.contains(w), "`{w}` not in `{err}` for:\n{yaml}");
        }
        let leftovers = std::fs::read_dir(dir.path().join("out")).map_or(0, |d| d.count());
        assert_eq!(leftovers, 0, "output left behind for:\n{yaml}");
    }
    let out = bin()
        .args(["merge", "/no/such/config.yml", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/config.yml"));
}

#[test]
fn inspect_lists_tensors() {
    let (dir, _) = setup();
    let out = bin()
        .arg("inspect")
        .arg(dir.path().join("m1"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("lm_head.weight\tBF16\t[10, 8]"), "{text}");
    let out = bin().args(["inspect", "/no/such/model"]).output().unwrap();
    assert!(!out.status.success());
}

/// Every method through the binary equals the library's in-memory merge of the same
/// (loaded) models: the streaming path and the per-tensor base change nothing.
#[test]
fn every_method_matches_the_in_memory_merge() {
    use modelfusion::merge::{
        ArceeFusion, Average, Consensus, KarcherMean, Merger, ModelStock, MultiSlerp, NearSwap,
        NuSlerp, Ram, Rescale, Sce, Slerp, SlerpVectors, TaskMerge,
    };
    let (dir, models) = setup();
    let (base, a, b) = (&models[0], &models[1], &models[2]);
    type Sd = StateDict<ArrayD<f32>>;
    let two = |w: [f64; 2]| {
        format!(
            "base_model: m0\nmodels:\n  - model: m1\n    parameters: {{weight: {}, density: 0.5}}\n  - model: m2\n    parameters: {{weight: {}, density: 0.5}}\nout_dtype: float32\n",
            w[0], w[1]
        )
    };
    let cases: Vec<(String, Sd)> = vec![
        (
            format!("merge_method: ties\nparameters: {{lambda: 0.8}}\n{}", two([0.7, 0.3])),
            TaskMerge::ties(base.clone(), 0.5, 0.8).unwrap().with_weights(vec![0.7, 0.3]).unwrap().merge(&[a, b]).unwrap(),
        ),
        (
            format!("merge_method: task_arithmetic\n{}", two([0.7, 0.3]).replace(", density: 0.5", "")),
            TaskMerge::task_arithmetic(base.clone(), 1.0).unwrap().with_weights(vec![0.7, 0.3]).unwrap().merge(&[a, b]).unwrap(),
        ),
        (
            format!("merge_method: dare_ties\n{}", two([1.0, 1.0])),
            TaskMerge::dare(base.clone(), 0.5, 9, 1.0).unwrap().with_rescale(Rescale::L1Norm).unwrap()
                .with_consensus(Consensus::SignElection).with_normalize(false).with_weights(vec![1.0, 1.0]).unwrap().merge(&[a, b]).unwrap(),
        ),
        (
            format!("merge_method: dare_linear\n{}", two([1.0, 3.0])),
            TaskMerge::dare(base.clone(), 0.5, 9, 1.0).unwrap().with_rescale(Rescale::L1Norm).unwrap()
                .with_weights(vec![1.0, 3.0]).unwrap().merge(&[a, b]).unwrap(),
        ),
        (
            format!("merge_method: dare_linear\nparameters: {{normalize: true}}\n{}", two([1.0, 3.0])),
            TaskMerge::dare(base.clone(), 0.5, 9, 1.0).unwrap().with_rescale(Rescale::L1Norm).unwrap()
                .with_weights(vec![0.25, 0.75]).unwrap().merge(&[a, b]).unwrap(),
        ),
        (
            format!("merge_method: breadcrumbs\n{}", two([0.5, 0.5])),
            TaskMerge::breadcrumbs(base.clone(), 0.5, 0.01, 1.0).unwrap().with_weights(vec![0.5, 0.5]).unwrap().merge(&[a, b]).unwrap(),
        ),
        (
            format!("merge_method: della\nparameters: {{epsilon: 0.1}}\n{}", two([0.5, 0.5])),
            TaskMerge::della(base.clone(), 0.5, 0.1, 9, 1.0).unwrap().with_rescale(Rescale::L1Norm).unwrap().with_weights(vec![0.5, 0.5]).unwrap().merge(&[a, b]).unwrap(),
        ),
        (
            "merge_method: slerp\nbase_model: m0\nmodels: [{model: m1}]\nparameters: {t: 0.3}\nout_dtype: float32\n".to_string(),
            Slerp::new(0.3).unwrap().merge(&[base, a]).unwrap(),
        ),
        (
            "merge_method: model_stock\nbase_model: m0\nmodels: [{model: m1}, {model: m2}]\nout_dtype: float32\n".to_string(),
            ModelStock::new(base.clone()).merge(&[a, b]).unwrap(),
        ),
        (
            "merge_method: linear\nmodels:\n  - {model: m0, parameters: {weight: 1}}\n  - {model: m2, parameters: {weight: 3}}\nout_dtype: float32\n".to_string(),
            Average::weighted(vec![1.0, 3.0], true).unwrap().merge(&[base, b]).unwrap(),
        ),
        (
            format!("merge_method: nuslerp\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true, lerp_zero: true}}\n{}", two([1.0, 3.0])).replace(", density: 0.5", ""),
            NuSlerp::with_base(Some(base.clone()), 0.75).unwrap().with_vectors(SlerpVectors::FirstAxis).with_zero_lerp(true).merge(&[a, b]).unwrap(),
        ),
        (
            "merge_method: nuslerp\nmodels:\n  - {model: m1, parameters: {weight: 1}}\n  - {model: m2, parameters: {weight: 1}}\nout_dtype: float32\n".to_string(),
            NuSlerp::new(0.5).unwrap().merge(&[a, b]).unwrap(),
        ),
        (
            format!("merge_method: multislerp\nparameters: {{eps: 1e-6}}\n{}", two([1.0, 3.0])).replace(", density: 0.5", ""),
            MultiSlerp::with_base(Some(base.clone()), vec![1.0, 3.0], true).unwrap().with_eps(1e-6).unwrap().merge(&[a, b]).unwrap(),
        ),
        (
            "merge_method: karcher\nparameters: {max_iter: 3}\nmodels: [{model: m0}, {model: m1}, {model: m2}]\nout_dtype: float32\n".to_string(),
            KarcherMean::mergekit(3, 1e-5).unwrap().merge(&[base, a, b]).unwrap(),
        ),
        (
            "merge_method: sce\nbase_model: m0\nmodels: [{model: m1}, {model: m2}]\nparameters: {select_topk: 0.3}\nout_dtype: float32\n".to_string(),
            Sce::new(base.clone(), 0.3).unwrap().merge(&[a, b]).unwrap(),
        ),
        (
            "merge_method: arcee_fusion\nbase_model: m0\nmodels: [{model: m1}]\nout_dtype: float32\n".to_string(),
            ArceeFusion::new(base.clone(), 9).merge(&[a]).unwrap(),
        ),
        (
            "merge_method: nearswap\nbase_model: m0\nmodels: [{model: m2}]\nparameters: {t: 0.5}\nout_dtype: float32\n".to_string(),
            NearSwap::new(base.clone(), 0.5).unwrap().merge(&[b]).unwrap(),
        ),
        (
            "merge_method: ram\nbase_model: m0\nmodels: [{model: m1}, {model: m2}]\nparameters: {epsilon: 0.5}\nout_dtype: float32\n".to_string(),
            Ram::new(base.clone(), 0.5).unwrap().merge(&[a, b]).unwrap(),
        ),
        (
            "merge_method: ramplus_tl\nbase_model: m0\nmodels: [{model: m1}, {model: m2}]\nparameters: {epsilon: 0.5, r: 0.3}\nout_dtype: float32\n".to_string(),
            Ram::plus(base.clone(), 0.3, 0.2, 0.5).unwrap().merge(&[a, b]).unwrap(),
        ),
    ];
    for (yaml, want) in cases {
        let (ok, err) = merge(dir.path(), &yaml, &["--seed", "9", "--chunk-elems", "7"]);
        assert!(ok, "{err}\n{yaml}");
        let got: StateDict<ArrayD<f32>> = load(dir.path().join("out")).unwrap();
        assert_eq!(got, want, "{yaml}");
    }
}

#[test]
fn bad_hyperparameters_fail_before_writing() {
    let (dir, _) = setup();
    let cases = [
        (
            "merge_method: ties\nbase_model: m0\nmodels: [{model: m1, parameters: {weight: 1, density: 1.5}}]\n",
            "density",
        ),
        (
            "merge_method: slerp\nbase_model: m0\nmodels: [{model: m1}]\nparameters: {t: .nan}\n",
            "t",
        ),
        (
            "merge_method: della\nbase_model: m0\nmodels:\n  - {model: m1, parameters: {weight: 1, density: 0.5, epsilon: 0.5}}\n",
            "epsilon",
        ),
        (
            "merge_method: ties\nbase_model: m0\nmodels: [{model: m1, parameters: {weight: [{filter: mlp, value: x}]}}]\n",
            "not a number",
        ),
        (
            "merge_method: model_stock\nbase_model: m0\nmodels: [{model: m1}]\n",
            "at least 2",
        ),
        (
            "merge_method: slerp\nmodels: [{model: m1}]\nparameters: {t: 0.5}\n",
            "base_model",
        ),
        (
            "merge_method: karcher\nmodels: [{model: m1}, {model: m2}]\nparameters: {max_iter: 2.5}\n",
            "max_iter",
        ),
        (
            "merge_method: sce\nbase_model: m0\nmodels: [{model: m1}]\nparameters: {select_topk: -0.1}\n",
            "select_topk",
        ),
        (
            "merge_method: nearswap\nbase_model: m0\nmodels: [{model: m1}]\n",
            "`t`",
        ),
        (
            "merge_method: nuslerp\nmodels: [{model: m1, parameters: {weight: 1}}]\n",
            "at least 2",
        ),
        (
            "merge_method: multislerp\nmodels:\n  - {model: m1, parameters: {weight: 1}}\n  - {model: m2, parameters: {weight: -1}}\n",
            "normalise",
        ),
        (
            "merge_method: ramplus_tl\nbase_model: m0\nmodels: [{model: m1}]\nparameters: {epsilon: 0}\n",
            "epsilon",
        ),
    ];
    for (yaml, want) in cases {
        let (ok, err) = merge(dir.path(), yaml, &[]);
        assert!(!ok, "should fail:\n{yaml}");
        assert!(err.contains(want), "`{want}` not in `{err}` for:\n{yaml}");
        assert!(
            !dir.path().join("out").exists(),
            "output created for:\n{yaml}"
        );
    }
}
