//! `modelfusion spec`, `permute` and `align` end to end on a checkpoint with BatchNorm
//! buffers (I64 `num_batches_tracked`) stored in BF16.
#![cfg(feature = "cli")]

use std::path::Path;
use std::process::Command;

use modelfusion::io::{Checkpoint, Dtype, SaveOptions, save};
use modelfusion::perm::specs::{Architecture, ResNet};
use modelfusion::{Model, RawTensor, StateDict};
use ndarray::ArrayD;

fn run(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_modelfusion"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A CIFAR ResNet-20 (x1) with a `num_batches_tracked` per norm, saved in BF16.
fn resnet_checkpoint(dir: &Path, name: &str, seed: u64) -> StateDict<ArrayD<f32>> {
    let arch = ResNet::resnet20(1, 10);
    let mut sd = arch.random_model(seed);
    let norms: Vec<String> = sd
        .names()
        .filter_map(|n| n.strip_suffix(".running_var").map(str::to_string))
        .collect();
    for (i, n) in norms.iter().enumerate() {
        let count = (1000 * seed + i as u64) as i64;
        sd.insert_raw(
            format!("{n}.num_batches_tracked"),
            RawTensor::new(Dtype::I64, vec![], count.to_le_bytes().to_vec()).unwrap(),
        )
        .unwrap();
    }
    save(&sd, dir.join(name), &SaveOptions::new(Dtype::BF16)).unwrap();
    std::fs::write(dir.join(name).join("tokenizer.json"), "{}").unwrap();
    sd
}

fn same_bytes(a: &Path, b: &Path) -> usize {
    let (ca, cb) = (Checkpoint::open(a).unwrap(), Checkpoint::open(b).unwrap());
    assert_eq!(ca.len(), cb.len());
    for t in ca.tensors() {
        let u = cb.info(t.name()).unwrap();
        assert_eq!(
            (t.dtype(), t.shape()),
            (u.dtype(), u.shape()),
            "{}",
            t.name()
        );
    }
    ca.tensors()
        .iter()
        .filter(|t| ca.raw(t.name()).unwrap() == cb.raw(t.name()).unwrap())
        .count()
}

#[test]
fn spec_permute_align_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    resnet_checkpoint(dir, "a", 1);
    let (ok, out, err) = run(dir, &["spec", "a", "--write", "a.spec.json"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("cifar-resnet") && out.contains("12 groups"),
        "{out}"
    );
    assert!(out.contains("check: sound"), "{out}");

    let (ok, _, err) = run(dir, &["permute", "a", "--seed", "7", "-o", "p"]);
    assert!(ok, "{err}");
    let n = Checkpoint::open(dir.join("a")).unwrap().len();
    let unchanged = same_bytes(&dir.join("a"), &dir.join("p"));
    assert!(unchanged < n / 2, "{unchanged} of {n} unchanged");
    assert!(dir.join("p/tokenizer.json").exists());

    // Aligning the permuted copy back recovers the original byte for byte, I64 included.
    let (ok, _, err) = run(
        dir,
        &[
            "align",
            "a",
            "p",
            "-o",
            "back",
            "--spec",
            "a.spec.json",
            "--no-progress",
        ],
    );
    assert!(ok, "{err}");
    assert!(err.contains("converged"), "{err}");
    assert_eq!(same_bytes(&dir.join("a"), &dir.join("back")), n);
}

#[test]
fn aligning_an_independent_model_keeps_its_buffers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    resnet_checkpoint(dir, "a", 1);
    let b = resnet_checkpoint(dir, "b", 2);
    let (ok, _, err) = run(
        dir,
        &["align", "a", "b", "-o", "b.safetensors", "--restarts", "2"],
    );
    assert!(ok, "{err}");
    let out = Checkpoint::open(dir.join("b.safetensors")).unwrap();
    for (name, raw) in b.raw_tensors() {
        assert_eq!(out.info(name).unwrap().dtype(), Dtype::I64);
        assert_eq!(out.raw(name).unwrap(), raw.bytes(), "{name}");
    }
    assert_eq!(out.info("conv1.weight").unwrap().dtype(), Dtype::BF16);
}

#[test]
fn bad_specs_and_unknown_layouts_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    resnet_checkpoint(dir, "a", 1);
    // A spec file that forgets the head: stream.3 has no consumer.
    std::fs::write(
        dir.join("bad.json"),
        r#"{"modelfusion_spec": 1, "rules": [
          {"group": "s", "producer": ["conv1"], "batch_norm": ["bn1"]}]}"#,
    )
    .unwrap();
    let (ok, _, err) = run(dir, &["permute", "a", "--spec", "bad.json", "-o", "x"]);
    assert!(!ok);
    assert!(
        err.contains("no consumer") && err.contains("layer1.0.conv1.weight"),
        "{err}"
    );
    assert!(!dir.join("x").exists());
    // A spec file with a typo in a key.
    std::fs::write(
        dir.join("typo.json"),
        r#"{"modelfusion_spec": 1, "rules": [{"grop": "s"}]}"#,
    )
    .unwrap();
    let (ok, _, err) = run(dir, &["spec", "a", "--spec", "typo.json"]);
    assert!(
        !ok && err.contains("grop") && err.contains("typo.json"),
        "{err}"
    );
    // An architecture no detector knows.
    let odd =
        StateDict::from_pairs([("embed.table", ArrayD::<f32>::zeros(vec![4, 4, 4]))]).unwrap();
    save(&odd, dir.join("odd"), &SaveOptions::new(Dtype::F32)).unwrap();
    let (ok, _, err) = run(dir, &["spec", "odd"]);
    assert!(
        !ok && err.contains("no known architecture") && err.contains("embed.table"),
        "{err}"
    );
}

#[test]
fn merge_config_align_section_aligns_every_model_to_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    resnet_checkpoint(dir, "a", 1);
    let (ok, _, err) = run(dir, &["permute", "a", "--seed", "3", "-o", "p"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(dir, &["permute", "a", "--seed", "4", "-o", "q"]);
    assert!(ok, "{err}");
    // The base and two permuted copies of it: aligned, every task vector is zero, so
    // the merge is the base byte for byte (I64 buffers included); unaligned it is not.
    let config = |align: &str| {
        format!(
            "merge_method: task_arithmetic\nbase_model: a\n{align}models:\n  - model: p\n    parameters: {{weight: 0.5}}\n  - model: q\n    parameters: {{weight: 0.5}}\n"
        )
    };
    std::fs::write(dir.join("aligned.yml"), config("align: {seed: 1}\n")).unwrap();
    std::fs::write(dir.join("plain.yml"), config("")).unwrap();
    let (ok, _, err) = run(dir, &["merge", "aligned.yml", "m", "--no-progress"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("aligned input 1") && err.contains("aligned input 2"),
        "{err}"
    );
    assert!(err.contains("cifar-resnet"), "{err}");
    let n = Checkpoint::open(dir.join("a")).unwrap().len();
    assert_eq!(same_bytes(&dir.join("a"), &dir.join("m")), n);
    assert!(dir.join("m/tokenizer.json").exists());
    let (ok, _, err) = run(dir, &["merge", "plain.yml", "u", "--no-progress"]);
    assert!(ok, "{err}");
    assert!(same_bytes(&dir.join("a"), &dir.join("u")) < n / 2);
    // Without a base model the first model is the reference.
    std::fs::write(
        dir.join("linear.yml"),
        "merge_method: linear\nalign: {spec: auto}\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: q\n    parameters: {weight: 1}\n",
    )
    .unwrap();
    let (ok, _, err) = run(dir, &["merge", "linear.yml", "l", "--no-progress"]);
    assert!(ok, "{err}");
    assert_eq!(same_bytes(&dir.join("a"), &dir.join("l")), n);
    // Mistakes in the section are named.
    for (section, want) in [
        ("align: {sed: 1}\n", "sed"),
        ("align: {restarts: 0}\n", "align.restarts"),
        ("align: {spec: missing.json}\n", "missing.json"),
    ] {
        std::fs::write(dir.join("bad.yml"), config(section)).unwrap();
        let (ok, _, err) = run(dir, &["merge", "bad.yml", "x", "--no-progress"]);
        assert!(!ok && err.contains(want), "`{want}` not in {err}");
        assert!(!dir.join("x/model.safetensors").exists());
    }
}
