//! Checkpoint I/O throughput: dtype conversion, loading, and a streaming linear merge.
//!
//! `cargo bench --bench io` (the end-to-end 3 x 1 GiB comparison with `cp` is
//! benches/compare/io_bench.sh).

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use modelfusion::io::{
    Checkpoint, Chunking, Dtype, SaveOptions, StreamOptions, decode, encode, load,
    merge_checkpoints, save,
};
use modelfusion::merge::TensorMerger;
use modelfusion::progress::Silent;
use modelfusion::{Result, StateDict};
use ndarray::{ArrayD, IxDyn};

const N: usize = 1 << 24; // 16 Mi elements: 64 MiB of f32

fn conversions(c: &mut Criterion) {
    let xs: Vec<f32> = (0..N).map(|i| ((i % 1000) as f32 - 500.0) * 1e-3).collect();
    let mut g = c.benchmark_group("convert");
    g.throughput(Throughput::Elements(N as u64));
    for d in Dtype::FLOATS {
        let mut bytes = vec![0u8; N * d.size()];
        g.bench_function(format!("encode f32 -> {d}"), |b| {
            b.iter(|| encode(d, &xs, &mut bytes).unwrap())
        });
        let mut out = vec![0f32; N];
        g.bench_function(format!("decode {d} -> f32"), |b| {
            b.iter(|| decode(d, &bytes, &mut out).unwrap())
        });
    }
    g.finish();
}

struct Linear(Vec<f32>);

impl TensorMerger<ArrayD<f32>> for Linear {
    fn merge_tensor(&self, _: &str, ts: &[&ArrayD<f32>]) -> Result<ArrayD<f32>> {
        let mut out = ts[0] * self.0[0];
        for (t, w) in ts[1..].iter().zip(&self.0[1..]) {
            out.scaled_add(*w, *t);
        }
        Ok(out)
    }
}

fn streaming(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let side = 2048;
    for m in 0..3 {
        let mut sd = StateDict::new();
        for t in 0..4 {
            let data: Vec<f32> = (0..side * side)
                .map(|i| ((i * (m + 1) + t) % 997) as f32 * 1e-3)
                .collect();
            sd.insert(
                format!("layer{t}.weight"),
                ArrayD::from_shape_vec(IxDyn(&[side, side]), data).unwrap(),
            )
            .unwrap();
        }
        save(
            &sd,
            dir.path().join(format!("m{m}")),
            &SaveOptions::new(Dtype::F32),
        )
        .unwrap();
    }
    let cks: Vec<Checkpoint> = (0..3)
        .map(|m| Checkpoint::open(dir.path().join(format!("m{m}"))).unwrap())
        .collect();
    let refs: Vec<&Checkpoint> = cks.iter().collect();
    let merger = Linear(vec![0.5, 0.3, 0.2]);
    let bytes = 4 * (4 * side * side * 4) as u64; // 3 read + 1 written
    let mut g = c.benchmark_group("stream");
    g.throughput(Throughput::Bytes(bytes));
    for (label, chunking) in [
        (
            "linear 3 x 64 MiB f32, elementwise chunks",
            Chunking::Elementwise {
                chunk_elems: 1 << 18,
            },
        ),
        ("linear 3 x 64 MiB f32, whole tensors", Chunking::Whole),
    ] {
        let opts = StreamOptions::new(SaveOptions::new(Dtype::F32)).with_chunking(chunking);
        let out = dir.path().join("out");
        g.bench_function(label, |b| {
            b.iter(|| merge_checkpoints::<f32, _>(&refs, &merger, &out, &opts, Silent).unwrap())
        });
    }
    g.throughput(Throughput::Bytes((4 * side * side * 4) as u64));
    g.bench_function("load 64 MiB f32 into a StateDict", |b| {
        b.iter(|| load::<f32>(dir.path().join("m0")).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = conversions, streaming
}
criterion_main!(benches);
