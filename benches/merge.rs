//! Per-tensor merge speed against a plain memory copy of the same inputs.
//!
//! Three 256 MiB f32 tensors (plus a base for TIES). Throughput counts bytes read plus
//! bytes written: memcpy reads and writes 3 x 256 MiB, the weighted average reads
//! 3 x 256 MiB and writes 256 MiB, TIES reads 4 x 256 MiB (with the base) and writes
//! 256 MiB.
//!
//! "fresh_alloc" rows write into a newly allocated output (as `merge_tensor` must, and
//! as a copy into new buffers does); "into_existing" rows write into a buffer that was
//! already touched (`merge_tensor_into`, `copy_from_slice`).
//!
//! Run: `cargo bench --bench merge` (set `MERGE_BENCH_MIB` to change the tensor size).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use modelfusion::StateDict;
use modelfusion::merge::{Average, TaskMerge, TensorMerger, output_buffer};
use ndarray::{ArrayD, IxDyn};
use std::hint::black_box;

fn tensor(n: usize, seed: u32) -> ArrayD<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) - 0.5
        })
        .collect();
    ArrayD::from_shape_vec(IxDyn(&[n]), v).unwrap()
}

fn bench(c: &mut Criterion) {
    let mib: usize = std::env::var("MERGE_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let n = mib * (1 << 20) / 4;
    let bytes = (n * 4) as u64;
    let xs: Vec<ArrayD<f32>> = (1..=3).map(|s| tensor(n, s)).collect();
    let base = tensor(n, 99);
    let refs: Vec<&ArrayD<f32>> = xs.iter().collect();

    let mut g = c.benchmark_group(format!("merge_3x{mib}MiB_f32"));
    g.sample_size(10);

    g.throughput(Throughput::Bytes(6 * bytes));
    let mut dst: Vec<Vec<f32>> = (0..3).map(|_| vec![1.0f32; n]).collect();
    g.bench_function("memcpy_into_existing", |b| {
        b.iter(|| {
            for (d, x) in dst.iter_mut().zip(&xs) {
                d.copy_from_slice(x.as_slice().unwrap());
            }
            black_box(&dst);
        })
    });
    g.bench_function("memcpy_fresh_alloc", |b| {
        b.iter(|| {
            let v: Vec<Vec<f32>> = xs
                .iter()
                .map(|x| {
                    let mut d: Vec<f32> = output_buffer(n);
                    d.copy_from_slice(x.as_slice().unwrap());
                    d
                })
                .collect();
            black_box(v)
        })
    });

    g.throughput(Throughput::Bytes(4 * bytes));
    let avg = Average::weighted(vec![0.2, 0.3, 0.5], true).unwrap();
    g.bench_function("weighted_average_fresh_alloc", |b| {
        b.iter(|| black_box(avg.merge_tensor("w", &refs).unwrap()))
    });
    let mut out = vec![1.0f32; n];
    g.bench_function("weighted_average_into_existing", |b| {
        b.iter(|| {
            avg.merge_tensor_into("w", &refs, &mut out).unwrap();
            black_box(&out);
        })
    });

    g.throughput(Throughput::Bytes(5 * bytes));
    let base_sd = StateDict::from_pairs([("w", base)]).unwrap();
    let ties = TaskMerge::ties(base_sd, 0.2, 1.0).unwrap();
    g.bench_function("ties_density_0.2_fresh_alloc", |b| {
        b.iter(|| black_box(ties.merge_tensor("w", &refs).unwrap()))
    });
    g.bench_function("ties_density_0.2_into_existing", |b| {
        b.iter(|| {
            ties.merge_tensor_into("w", &refs, &mut out).unwrap();
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
