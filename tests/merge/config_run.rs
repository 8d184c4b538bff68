//! Merge configs run from Rust (`modelfusion::config`): the same results as the merger
//! in memory, stages and tensors reported to the observer, a stop that leaves nothing.
#![cfg(feature = "config")]

use std::ops::ControlFlow;
use std::path::Path;

use modelfusion::config::{Config, RunOptions};
use modelfusion::io::{Dtype, load, save_file};
use modelfusion::merge::{Consensus, Merger, Sparsification, TaskMerge};
use modelfusion::perm::PermutationSet;
use modelfusion::perm::specs::{Architecture, MlpShapes};
use modelfusion::progress::{Observer, Progress, from_fn};
use modelfusion::{Error, Model, StateDictF32};

fn write_models(dir: &Path) -> (StateDictF32, StateDictF32, StateDictF32) {
    let arch = MlpShapes::new(&[6, 16, 16, 3]).unwrap();
    let (base, a, b) = (
        arch.random_model(0),
        arch.random_model(1),
        arch.random_model(2),
    );
    for (name, m) in [("base", &base), ("a", &a), ("b", &b)] {
        save_file(m, dir.join(format!("{name}.safetensors")), Dtype::F32).unwrap();
    }
    (base, a, b)
}

fn config(dir: &Path, body: &str) -> Config {
    let text = body.replace("DIR", &dir.display().to_string());
    Config::from_yaml(&text, Path::new("test.yml")).unwrap()
}

#[test]
fn a_ties_config_matches_the_merger_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (base, a, b) = write_models(dir);
    let c = config(
        dir,
        "merge_method: ties\nbase_model: DIR/base.safetensors\nparameters: {density: 0.5}\nmodels:\n  - model: DIR/a.safetensors\n    parameters: {weight: 0.7}\n  - model: DIR/b.safetensors\n    parameters: {weight: 0.4}\n",
    );
    let plan = c.plan().unwrap();
    assert_eq!(plan.inputs().len(), 3);
    assert_eq!(plan.out_dtype(), Dtype::F32);
    let mut stages = Vec::new();
    let mut tensors = 0;
    let summary = plan
        .run(
            dir.join("out"),
            &RunOptions::new(),
            from_fn(|p| match p {
                Progress::Stage { what, .. } => stages.push(what.to_string()),
                Progress::Tensor { .. } => tensors += 1,
                _ => {}
            }),
        )
        .unwrap();
    assert_eq!(stages, ["merging"]);
    assert_eq!(tensors, summary.merge.tensors);
    let got: StateDictF32 = load(dir.join("out")).unwrap();
    let want = TaskMerge::new(
        base,
        Sparsification::Magnitude { density: 0.5 },
        Consensus::SignElection,
        1.0,
    )
    .unwrap()
    .with_normalize(true)
    .with_weights(vec![0.7, 0.4])
    .unwrap()
    .merge(&[&a, &b])
    .unwrap();
    for name in want.names() {
        let (g, w) = (got.get(name).unwrap(), want.get(name).unwrap());
        let diff = (g - w).mapv(f32::abs).fold(0.0f32, |m, &x| m.max(x));
        assert!(diff <= 1e-6, "{name}: {diff}");
    }
}

#[test]
fn alignment_happens_before_the_merge_and_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (base, _, _) = write_models(dir);
    let arch = MlpShapes::new(&[6, 16, 16, 3]).unwrap();
    let perms = PermutationSet::random(&arch.spec(), &base, 9).unwrap();
    let permuted = arch.spec().apply(&perms, &base).unwrap();
    save_file(&permuted, dir.join("p.safetensors"), Dtype::F32).unwrap();
    let c = config(
        dir,
        "merge_method: linear\nalign: {restarts: 2}\nmodels:\n  - model: DIR/base.safetensors\n    parameters: {weight: 1}\n  - model: DIR/p.safetensors\n    parameters: {weight: 3}\n",
    );
    let mut stages = Vec::new();
    let summary = c
        .run(
            dir.join("out"),
            &RunOptions::new(),
            from_fn(|p| {
                if let Progress::Stage { what, .. } = p {
                    stages.push(what.to_string());
                }
            }),
        )
        .unwrap();
    assert_eq!(stages, ["aligning models[1] to models[0]", "merging"]);
    assert_eq!(summary.aligned.len(), 1);
    let al = &summary.aligned[0];
    assert_eq!(al.input, 1);
    assert!(al.stats.converged);
    assert!(al.stats.moved.values().sum::<usize>() > 0);
    let got: StateDictF32 = load(dir.join("out")).unwrap();
    assert_eq!(got, base);
}

#[test]
fn a_stopped_run_leaves_the_previous_result_and_no_new_one() {
    struct StopAt(usize);
    impl Observer for StopAt {
        fn observe(&mut self, p: &Progress<'_>) -> ControlFlow<()> {
            match p {
                Progress::Tensor { index, .. } if *index + 1 >= self.0 => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_models(dir);
    let c = config(
        dir,
        "merge_method: linear\nmodels:\n  - model: DIR/a.safetensors\n    parameters: {weight: 1}\n  - model: DIR/b.safetensors\n    parameters: {weight: 1}\n",
    );
    let out = dir.join("out");
    c.run(&out, &RunOptions::new(), from_fn(|_| {})).unwrap();
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let heavier = config(
        dir,
        "merge_method: linear\nmodels:\n  - model: DIR/a.safetensors\n    parameters: {weight: 1}\n  - model: DIR/b.safetensors\n    parameters: {weight: 5}\n",
    );
    let mut stop = StopAt(2);
    let err = heavier
        .run(&out, &RunOptions::new(), &mut stop)
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err}");
    assert!(err.to_string().contains("2 of"), "{err}");
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        before
    );
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["model.safetensors"]);
}

#[test]
fn run_options_refuse_zero_sizes() {
    for err in [
        RunOptions::new().with_chunk_elems(0).unwrap_err(),
        RunOptions::new().with_max_shard_size(0).unwrap_err(),
    ] {
        assert!(err.to_string().contains("must be positive"), "{err}");
    }
}
