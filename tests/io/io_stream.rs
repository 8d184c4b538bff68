//! Streaming merges over checkpoints equal in-memory merges, check names and shapes
//! before reading data, and clean up after failures.
#![cfg(feature = "safetensors")]

use crate::io_common;

use std::sync::atomic::{AtomicUsize, Ordering};

use io_common::random_sd;
use modelfusion::io::{
    Checkpoint, Chunking, Dtype, IoScalar, SaveOptions, StreamOptions, load, merge_checkpoints,
    save,
};
use modelfusion::merge::{Merger, TensorMerger};
use modelfusion::progress::{Progress, Silent, from_fn};
use modelfusion::{Error, Model, Result, StateDict};
use ndarray::ArrayD;
use proptest::prelude::*;

/// Weighted sum: elementwise, so chunking is allowed.
struct Weighted(Vec<f32>);

impl TensorMerger<ArrayD<f32>> for Weighted {
    fn merge_tensor(&self, _: &str, ts: &[&ArrayD<f32>]) -> Result<ArrayD<f32>> {
        let mut out = ts[0] * self.0[0];
        for (t, w) in ts[1..].iter().zip(&self.0[1..]) {
            out.scaled_add(*w, *t);
        }
        Ok(out)
    }
}

/// Subtracts the tensor's mean over the first input: needs whole tensors.
struct Centered;

impl TensorMerger<ArrayD<f64>> for Centered {
    fn merge_tensor(&self, _: &str, ts: &[&ArrayD<f64>]) -> Result<ArrayD<f64>> {
        let mean = ts[0].mean().unwrap_or(0.0);
        let mut out = ts[0].mapv(|x| x - mean);
        for t in &ts[1..] {
            out += *t;
        }
        Ok(out)
    }
}

/// Counts calls and fails or returns a wrong shape on request.
struct Probe {
    calls: AtomicUsize,
    fail_at: Option<usize>,
    wrong_shape: bool,
}

impl Probe {
    fn new() -> Self {
        Probe {
            calls: AtomicUsize::new(0),
            fail_at: None,
            wrong_shape: false,
        }
    }
}

impl TensorMerger<ArrayD<f32>> for Probe {
    fn merge_tensor(&self, name: &str, ts: &[&ArrayD<f32>]) -> Result<ArrayD<f32>> {
        let k = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_at == Some(k) {
            return Err(Error::invalid("probe", format!("failing on `{name}`")));
        }
        if self.wrong_shape {
            return Ok(ArrayD::zeros(vec![7]));
        }
        Ok(ts[0].clone())
    }
}

const SHAPES: [(&str, [usize; 2]); 4] = [
    ("embed", [33, 8]),
    ("l0.w", [8, 8]),
    ("l0.b", [1, 8]),
    ("head", [8, 5]),
];

fn shapes() -> Vec<(&'static str, Vec<usize>)> {
    SHAPES.iter().map(|(n, s)| (*n, s.to_vec())).collect()
}

/// Saves three random models in different dtypes and shardings; returns them as
/// loaded back (i.e. rounded to their stored dtype) with their directory.
fn inputs(seed: u64) -> (tempfile::TempDir, Vec<StateDict<ArrayD<f32>>>) {
    let dir = tempfile::tempdir().unwrap();
    let mut loaded = Vec::new();
    for (i, d) in [Dtype::F32, Dtype::BF16, Dtype::F16]
        .into_iter()
        .enumerate()
    {
        let sd = random_sd(&shapes(), seed + i as u64, 2.0);
        let p = dir.path().join(format!("m{i}"));
        save(&sd, &p, &SaveOptions::new(d).with_max_shard_size(512)).unwrap();
        loaded.push(load(&p).unwrap());
    }
    (dir, loaded)
}

fn open_all(dir: &std::path::Path) -> Vec<Checkpoint> {
    (0..3)
        .map(|i| Checkpoint::open(dir.join(format!("m{i}"))).unwrap())
        .collect()
}

fn rounded(sd: &StateDict<ArrayD<f32>>, d: Dtype) -> StateDict<ArrayD<f32>> {
    sd.try_map(|_, t| {
        Ok(t.mapv(|x| match d {
            Dtype::F16 => x.to_f16().to_f32(),
            Dtype::BF16 => x.to_bf16().to_f32(),
            _ => x,
        }))
    })
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn streamed_equals_in_memory(
        seed in any::<u64>(),
        w in prop::collection::vec(-2.0f32..2.0, 3),
        chunk in prop_oneof![Just(None), (1usize..100).prop_map(Some)],
        d in 0usize..4,
        shard in prop::option::of(64u64..2048),
    ) {
        let (dir, models) = inputs(seed);
        let cks = open_all(dir.path());
        let refs: Vec<&Checkpoint> = cks.iter().collect();
        let merger = Weighted(w);
        let out = dir.path().join("out");
        let mut save_opts = SaveOptions::new(Dtype::FLOATS[d]);
        save_opts.max_shard_size = shard;
        let chunking = chunk.map_or(Chunking::Whole, |c| Chunking::Elementwise { chunk_elems: c });
        let opts = StreamOptions::new(save_opts).with_chunking(chunking);
        let mut last = None;
        let summary = merge_checkpoints::<f32, _>(&refs, &merger, &out, &opts, from_fn(|p| {
            if let Progress::Tensor { index, bytes_done, bytes_total, .. } = *p {
                last = Some((index, bytes_done, bytes_total));
            }
        })).unwrap();
        let got: StateDict<ArrayD<f32>> = load(&out).unwrap();
        let mrefs: Vec<&StateDict<ArrayD<f32>>> = models.iter().collect();
        let want = rounded(&Merger::merge(&merger, &mrefs).unwrap(), Dtype::FLOATS[d]);
        prop_assert_eq!(got, want);
        let (index, bytes_done, bytes_total) = last.unwrap();
        prop_assert_eq!(bytes_done, bytes_total);
        prop_assert_eq!(index + 1, SHAPES.len());
        prop_assert_eq!(summary.bytes_written, bytes_total);
        let numel: u64 = SHAPES.iter().map(|(_, s)| (s[0] * s[1]) as u64).sum();
        prop_assert_eq!(summary.bytes_read, numel * (4 + 2 + 2));
    }
}

#[test]
fn whole_tensor_mergers_see_real_shapes_in_f64() {
    let (dir, models) = inputs(11);
    let cks = open_all(dir.path());
    let refs: Vec<&Checkpoint> = cks.iter().collect();
    let out = dir.path().join("out");
    merge_checkpoints::<f64, _>(
        &refs,
        &Centered,
        &out,
        &StreamOptions::new(SaveOptions::new(Dtype::F64)),
        Silent,
    )
    .unwrap();
    let got: StateDict<ArrayD<f64>> = load(&out).unwrap();
    let m64: Vec<StateDict<ArrayD<f64>>> = models.iter().map(|m| m.cast()).collect();
    let mrefs: Vec<&StateDict<ArrayD<f64>>> = m64.iter().collect();
    assert_eq!(got, Merger::merge(&Centered, &mrefs).unwrap());
}

fn expect_no_output(out: &std::path::Path) {
    let n = std::fs::read_dir(out).map_or(0, |d| d.count());
    assert_eq!(n, 0, "output files left behind");
}

/// Merges input m0 with `other`, which must fail without output; returns the error
/// and how often the merger ran.
fn merge_with(dir: &std::path::Path, other: &StateDict<ArrayD<f32>>) -> (Error, usize) {
    let p = dir.join("other");
    save(other, &p, &SaveOptions::new(Dtype::F32)).unwrap();
    let a = Checkpoint::open(dir.join("m0")).unwrap();
    let b = Checkpoint::open(&p).unwrap();
    let probe = Probe::new();
    let out = dir.join("out");
    let opts = StreamOptions::new(SaveOptions::new(Dtype::F32));
    let err = merge_checkpoints::<f32, _>(&[&a, &b], &probe, &out, &opts, Silent).unwrap_err();
    expect_no_output(&out);
    (err, probe.calls.load(Ordering::SeqCst))
}

#[test]
fn name_mismatch_found_before_any_data() {
    let (dir, _) = inputs(1);
    let sd = random_sd(&shapes(), 5, 1.0);
    let renamed = StateDict::from_pairs(sd.into_iter().map(|(n, t)| {
        (
            if n == "head" {
                "lm_head".to_string()
            } else {
                n
            },
            t,
        )
    }))
    .unwrap();
    let (err, calls) = merge_with(dir.path(), &renamed);
    assert!(matches!(err, Error::NameMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("`head`") && msg.contains("`lm_head`"), "{msg}");
    assert_eq!(calls, 0);
}

#[test]
fn shape_mismatch_found_before_any_data() {
    let (dir, _) = inputs(2);
    let mut sh = shapes();
    sh[3].1 = vec![8, 6];
    let (err, calls) = merge_with(dir.path(), &random_sd(&sh, 5, 1.0));
    let msg = err.to_string();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("`head`") && msg.contains("[8, 5]") && msg.contains("[8, 6]"),
        "{msg}"
    );
    assert_eq!(calls, 0);
}

#[test]
fn merger_failure_removes_partial_output() {
    let (dir, _) = inputs(3);
    let cks = open_all(dir.path());
    let refs: Vec<&Checkpoint> = cks.iter().collect();
    let out = dir.path().join("out");
    let probe = Probe {
        fail_at: Some(2),
        ..Probe::new()
    };
    let err = merge_checkpoints::<f32, _>(
        &refs,
        &probe,
        &out,
        &StreamOptions::new(SaveOptions::new(Dtype::F32).with_max_shard_size(300)),
        Silent,
    )
    .unwrap_err();
    assert!(err.to_string().contains("failing on `l0.b`"), "{err}");
    expect_no_output(&out);
    let probe = Probe {
        wrong_shape: true,
        ..Probe::new()
    };
    let err = merge_checkpoints::<f32, _>(
        &refs,
        &probe,
        &out,
        &StreamOptions::new(SaveOptions::new(Dtype::F32)),
        Silent,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::ShapeMismatch { .. }) && err.to_string().contains("`embed`"),
        "{err}"
    );
    expect_no_output(&out);
}

#[test]
fn refuses_bad_arguments() {
    let (dir, _) = inputs(4);
    let cks = open_all(dir.path());
    let refs: Vec<&Checkpoint> = cks.iter().collect();
    let opts = StreamOptions::new(SaveOptions::new(Dtype::F32));
    // Writing into an input's directory would truncate a mapped file.
    let err =
        merge_checkpoints::<f32, _>(&refs, &Probe::new(), dir.path().join("m1"), &opts, Silent)
            .unwrap_err();
    assert!(err.to_string().contains("holds input file"), "{err}");
    assert!(
        Checkpoint::open(dir.path().join("m1"))
            .unwrap()
            .read::<f32>("embed")
            .is_ok()
    );
    let err = merge_checkpoints::<f32, _>(&[], &Probe::new(), dir.path().join("o"), &opts, Silent)
        .unwrap_err();
    assert!(matches!(err, Error::Empty { .. }));
    let zero = opts
        .clone()
        .with_chunking(Chunking::Elementwise { chunk_elems: 0 });
    assert!(
        merge_checkpoints::<f32, _>(&refs, &Probe::new(), dir.path().join("o"), &zero, Silent)
            .is_err()
    );
}

/// Every task-vector method with its base streamed from disk as the first input gives
/// the in-memory result (base held in the merger) bit for bit.
#[test]
fn task_merges_with_the_base_on_disk_equal_the_in_memory_ones() {
    use modelfusion::merge::{Consensus, Rescale, Sparsification, TaskMerge};
    let (dir, models) = inputs(21);
    let cks = open_all(dir.path());
    let refs: Vec<&Checkpoint> = cks.iter().collect();
    let methods = [
        (Sparsification::None, Consensus::Sum),
        (
            Sparsification::Magnitude { density: 0.3 },
            Consensus::SignElection,
        ),
        (
            Sparsification::Random {
                density: 0.5,
                seed: 4,
            },
            Consensus::Sum,
        ),
        (
            Sparsification::Random {
                density: 0.5,
                seed: 4,
            },
            Consensus::SignElection,
        ),
        (
            Sparsification::Breadcrumbs {
                density: 0.8,
                gamma: 0.05,
            },
            Consensus::Sum,
        ),
        (
            Sparsification::Della {
                density: 0.5,
                epsilon: 0.2,
                seed: 9,
            },
            Consensus::SignElection,
        ),
    ];
    for (k, (sp, consensus)) in methods.into_iter().enumerate() {
        let held = TaskMerge::new(models[0].clone(), sp, consensus, 0.8)
            .unwrap()
            .with_weights(vec![0.6, 0.9])
            .unwrap()
            .with_rescale(Rescale::L1Norm)
            .unwrap();
        let want = Merger::merge(&held, &[&models[1], &models[2]]).unwrap();
        let streamed = TaskMerge::<StateDict<ArrayD<f32>>>::base_input(sp, consensus, 0.8)
            .unwrap()
            .with_weights(vec![0.6, 0.9])
            .unwrap()
            .with_rescale(Rescale::L1Norm)
            .unwrap();
        let out = dir.path().join(format!("out{k}"));
        let opts = StreamOptions::new(SaveOptions::new(Dtype::F32));
        merge_checkpoints::<f32, _>(&refs, &streamed, &out, &opts, Silent).unwrap();
        let got: StateDict<ArrayD<f32>> = load(&out).unwrap();
        assert_eq!(got, want, "{sp:?} {consensus:?}");
        // In memory too, with the base first.
        let again = Merger::merge(&streamed, &[&models[0], &models[1], &models[2]]).unwrap();
        assert_eq!(again, want, "{sp:?} {consensus:?}");
    }
}
