//! The chunked (bounded-memory) path of the trimming methods against the whole-tensor
//! one: `TaskMerge::merge_chunked` over any chunk size gives exactly `merge_tensor`'s
//! result, in both tie orders, for f32-, bf16- and f16-valued tensors with many ties,
//! for TIES, breadcrumbs, DARE (the same random stream) and DELLA (ranked per row, so
//! streamed in chunks of whole rows), with every rescale; and index tie order keeps
//! what a stable sort keeps.

use std::sync::Mutex;

use std::ops::Range;

use modelfusion::merge::{
    ChunkFn, ChunkedInputs, Consensus, Rescale, SliceChunks, Sparsification, TaskMerge,
    TensorMerger, TieOrder,
};
use modelfusion::{StateDict, StateDictF32};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

/// Values of one "dtype": 0 = f32 (continuous), 1 = bf16 (f32 bits truncated to 16),
/// 2 = f16-like (small integers times 2^-10: heavy ties).
fn values(kind: u8, seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0;
            match kind {
                0 => u * 0.05,
                1 => f32::from_bits((u * 0.05).to_bits() & 0xFFFF_0000),
                _ => (u * 12.0).round() / 1024.0,
            }
        })
        .collect()
}

fn tensor(v: Vec<f32>) -> ArrayD<f32> {
    let n = v.len();
    ArrayD::from_shape_vec(IxDyn(&[n]), v).unwrap()
}

/// `merge_chunked` over `chunk`-element chunks, collected into one vector.
fn chunked(m: &TaskMerge<StateDictF32>, ts: &[&ArrayD<f32>], chunk: usize) -> Vec<f32> {
    let n = ts[0].len();
    let got = Mutex::new(vec![f32::NAN; n]);
    let slices: Vec<&[f32]> = ts.iter().map(|t| t.as_slice().unwrap()).collect();
    let src = SliceChunks::new(slices, chunk).unwrap();
    m.merge_chunked("w", ts[0].shape(), &src, &|start, xs: &[f32]| {
        got.lock().unwrap()[start..start + xs.len()].copy_from_slice(xs);
        Ok(())
    })
    .unwrap();
    got.into_inner().unwrap()
}

fn sparsification(which: u8, density: f64, gamma: f64) -> Sparsification {
    match which {
        0 => Sparsification::Magnitude { density },
        1 => Sparsification::Breadcrumbs { density, gamma },
        _ => Sparsification::Random {
            density,
            seed: (gamma * 1e6) as u64,
        },
    }
}

fn rescale(which: u8) -> Rescale {
    [Rescale::None, Rescale::InverseDensity, Rescale::L1Norm][which as usize % 3]
}

/// Bit patterns of `merge_tensor` and of `merge_chunked` over `chunk`-element chunks.
fn both(
    m: &TaskMerge<StateDictF32>,
    inputs: &[&ArrayD<f32>],
    chunk: usize,
) -> (Vec<u32>, Vec<u32>) {
    let whole: ArrayD<f32> = m.merge_tensor("w", inputs).unwrap();
    let got = chunked(m, inputs, chunk);
    (
        whole.iter().map(|v| v.to_bits()).collect(),
        got.iter().map(|v| v.to_bits()).collect(),
    )
}

/// The entries a stable sort keeps (ties in index order): the top `k` by magnitude, or
/// a breadcrumbs band of ascending positions `lo..hi`.
fn stable_keep(tau: &[f32], sp: Sparsification) -> Vec<bool> {
    let n = tau.len();
    let mut idx: Vec<usize> = (0..n).collect();
    let count = |d: f64| (d * n as f64) as usize;
    let mut keep = vec![false; n];
    match sp {
        Sparsification::Magnitude { density } => {
            let k = if density >= 1.0 {
                n
            } else {
                count(density).max(1).min(n)
            };
            idx.sort_by(|&a, &b| tau[b].abs().partial_cmp(&tau[a].abs()).unwrap());
            idx[..k].iter().for_each(|&i| keep[i] = true);
        }
        Sparsification::Breadcrumbs { density, gamma } => {
            if density >= 1.0 {
                return vec![true; n];
            }
            let target = count(density).min(n);
            let bot = n.saturating_sub(target + count(gamma));
            idx.sort_by(|&a, &b| tau[a].abs().partial_cmp(&tau[b].abs()).unwrap());
            idx[bot..bot + target].iter().for_each(|&i| keep[i] = true);
        }
        _ => unreachable!(),
    }
    keep
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn chunked_equals_whole_tensor(
        kind in 0u8..3,
        seed in any::<u64>(),
        n in 1usize..3000,
        models in 1usize..4,
        which in 0u8..3,
        density in 0.0f64..1.0,
        gamma in 0.0f64..0.2,
        chunk in 1usize..700,
        index in any::<bool>(),
        elect in any::<bool>(),
        held in any::<bool>(),
        rs in 0u8..3,
    ) {
        let base = tensor(values(kind, seed ^ 0xABCD, n));
        let xs: Vec<ArrayD<f32>> = (0..models)
            .map(|i| {
                let d = values(kind, seed.wrapping_add(i as u64 * 7919), n);
                tensor(base.iter().zip(d).map(|(b, d)| b + d).collect())
            })
            .collect();
        let order = if index { TieOrder::Index } else { TieOrder::Torch };
        let consensus = if elect { Consensus::SignElection } else { Consensus::Sum };
        // (DARE at density 0 would rescale by infinity.)
        let density = if which == 2 { density.max(0.01) } else { density };
        let sp = sparsification(which, density, gamma);
        let weights: Vec<f64> = (0..models).map(|i| 0.4 + 0.3 * i as f64).collect();
        let refs: Vec<&ArrayD<f32>> = xs.iter().collect();
        let (m, inputs): (TaskMerge<StateDictF32>, Vec<&ArrayD<f32>>) = if held {
            let b = StateDict::from_pairs([("w", base.clone())]).unwrap();
            (TaskMerge::new(b, sp, consensus, 0.9).unwrap(), refs.clone())
        } else {
            let mut all = vec![&base];
            all.extend(refs.iter().copied());
            (TaskMerge::base_input(sp, consensus, 0.9).unwrap(), all)
        };
        let m = m
            .with_weights(weights)
            .unwrap()
            .with_tie_order(order)
            .with_rescale(rescale(rs))
            .unwrap();
        let (want, got) = both(&m, &inputs, chunk);
        prop_assert_eq!(got, want);
    }

    #[test]
    fn index_order_keeps_a_stable_sorts_entries(
        kind in 0u8..3,
        seed in any::<u64>(),
        n in 1usize..3000,
        which in 0u8..2,
        density in 0.0f64..1.0,
        gamma in 0.0f64..0.2,
        chunk in 1usize..700,
    ) {
        // Nonzero task-vector entries, so that "kept" is visible in the output.
        let tau: Vec<f32> = values(kind, seed, n)
            .into_iter()
            .map(|v| if v == 0.0 { 1.0 / 1024.0 } else { v })
            .collect();
        let x = tensor(tau.clone());
        let base = StateDict::from_pairs([("w", ArrayD::<f32>::zeros(IxDyn(&[n])))]).unwrap();
        let sp = sparsification(which, density, gamma);
        let m = TaskMerge::new(base, sp, Consensus::Sum, 1.0)
            .unwrap()
            .with_tie_order(TieOrder::Index);
        let want = stable_keep(&tau, sp);
        let whole: ArrayD<f32> = m.merge_tensor("w", &[&x]).unwrap();
        let kept: Vec<bool> = whole.iter().map(|v| *v != 0.0).collect();
        prop_assert_eq!(&kept, &want);
        let got = chunked(&m, &[&x], chunk);
        let kept: Vec<bool> = got.iter().map(|v| *v != 0.0).collect();
        prop_assert_eq!(&kept, &want);
    }
}

/// Chunked inputs that refuse to be read whole: a merge over them streams or fails.
struct StreamOnly<'a>(SliceChunks<'a, f32>);

impl ChunkedInputs<f32> for StreamOnly<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn inputs(&self) -> usize {
        self.0.inputs()
    }
    fn chunk_elems(&self) -> usize {
        self.0.chunk_elems()
    }
    fn fold_chunks<A: Send>(
        &self,
        chunks: Range<usize>,
        init: &(dyn Fn() -> A + Sync),
        f: &ChunkFn<'_, A, f32>,
    ) -> modelfusion::Result<Vec<A>> {
        self.0.fold_chunks(chunks, init, f)
    }
    fn read_whole(&self, _: usize, _: &mut [f32]) -> modelfusion::Result<()> {
        Err(modelfusion::Error::invalid(
            "read_whole",
            "not allowed here",
        ))
    }
}

/// `count` tensors of `shape`: a base and models near it (`kind` as in [`values`]).
fn shaped(kind: u8, seed: u64, shape: &[usize], count: usize) -> Vec<ArrayD<f32>> {
    let n: usize = shape.iter().product();
    let base = values(kind, seed ^ 0xABCD, n);
    let mut out = vec![ArrayD::from_shape_vec(IxDyn(shape), base.clone()).unwrap()];
    for i in 0..count {
        let d = values(kind, seed.wrapping_add(i as u64 * 7919), n);
        let x = base.iter().zip(d).map(|(b, d)| b + d).collect();
        out.push(ArrayD::from_shape_vec(IxDyn(shape), x).unwrap());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// DELLA over 1-3-D tensors, per-model densities, any consensus and rescale: chunks
    /// of whole rows (the size `chunk_elems_for` gives) stream, and every chunk size
    /// gives exactly the whole-tensor result.
    #[test]
    fn della_chunked_equals_whole_tensor(
        kind in 0u8..3,
        seed in any::<u64>(),
        dims in proptest::collection::vec(1usize..24, 1..4),
        models in 1usize..4,
        density in 0.05f64..1.0,
        epsilon in 0.0f64..0.05,
        requested in 1usize..700,
        elect in any::<bool>(),
        rs in 0u8..3,
    ) {
        let all = shaped(kind, seed, &dims, models);
        let refs: Vec<&ArrayD<f32>> = all.iter().collect();
        let consensus = if elect { Consensus::SignElection } else { Consensus::Sum };
        let per: Vec<Sparsification> = (0..models)
            .map(|i| Sparsification::Della {
                density: (density * (1.0 - 0.2 * i as f64)).clamp(0.06, 0.94),
                epsilon,
                seed: seed ^ 5,
            })
            .collect();
        let m = TaskMerge::<StateDictF32>::base_input(per[0], consensus, 0.9)
            .unwrap()
            .with_sparsifications(per)
            .unwrap()
            .with_rescale(rescale(rs))
            .unwrap();
        let rows = m.chunk_elems_for(&dims, requested);
        for chunk in [rows, requested] {
            let (want, got) = both(&m, &refs, chunk);
            prop_assert_eq!(got, want, "chunk {}", chunk);
        }
        // Whole rows without the L1 rescale stream: no tensor is read whole.
        if rescale(rs) != Rescale::L1Norm {
            let slices: Vec<&[f32]> = refs.iter().map(|t| t.as_slice().unwrap()).collect();
            let src = StreamOnly(SliceChunks::new(slices, rows).unwrap());
            prop_assert!(m.merge_chunked("w", &dims, &src, &|_, _: &[f32]| Ok(())).is_ok());
        }
    }
}

/// DELLA with the L1 rescale over rows spanning several 65 536-element random streams:
/// chunks of `chunk_elems_for` hold whole rows and whole streams, stream, and give the
/// whole-tensor result bit for bit.
#[test]
fn della_l1_rescale_streams_whole_rows() {
    let shape = [10, 4096, 4];
    let all = shaped(1, 3, &shape, 2);
    let refs: Vec<&ArrayD<f32>> = all.iter().collect();
    let sp = Sparsification::Della {
        density: 0.4,
        epsilon: 0.1,
        seed: 9,
    };
    for rs in [Rescale::L1Norm, Rescale::InverseDensity] {
        let m = TaskMerge::<StateDictF32>::base_input(sp, Consensus::SignElection, 1.0)
            .unwrap()
            .with_rescale(rs)
            .unwrap();
        let chunk = m.chunk_elems_for(&shape, 1 << 16);
        assert_eq!(chunk, 1 << 16);
        assert!(chunk < all[0].len(), "{chunk}");
        let (want, got) = both(&m, &refs, chunk);
        assert!(got == want, "{rs:?} {chunk}");
        let slices: Vec<&[f32]> = refs.iter().map(|t| t.as_slice().unwrap()).collect();
        let src = StreamOnly(SliceChunks::new(slices, chunk).unwrap());
        m.merge_chunked("w", &shape, &src, &|_, _: &[f32]| Ok(()))
            .unwrap();
    }
}

/// A tensor with more tied entries in one histogram bin than are collected: the cut is
/// finished by a histogram of the low bits, and in index order by a counting pass.
#[test]
fn huge_tie_bins_stay_exact() {
    let n = 1_200_000;
    let tau: Vec<f32> = (0..n)
        .map(|i| if i % 5 == 0 { 0.5 } else { 0.25 })
        .collect();
    let x = tensor(tau.clone());
    let base = StateDict::from_pairs([("w", ArrayD::<f32>::zeros(IxDyn(&[n])))]).unwrap();
    for order in [TieOrder::Index, TieOrder::Torch] {
        for density in [0.1, 0.2, 0.55] {
            let m = TaskMerge::new(
                base.clone(),
                Sparsification::Magnitude { density },
                Consensus::Sum,
                1.0,
            )
            .unwrap()
            .with_tie_order(order);
            let whole: ArrayD<f32> = m.merge_tensor("w", &[&x]).unwrap();
            let got = chunked(&m, &[&x], 1 << 16);
            assert!(
                whole
                    .iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{order:?} {density}"
            );
            if order == TieOrder::Index {
                let want = stable_keep(&tau, Sparsification::Magnitude { density });
                assert!(
                    got.iter().zip(&want).all(|(v, k)| (*v != 0.0) == *k),
                    "{density}"
                );
            }
        }
    }
}

/// A non-finite input gives the whole-tensor path's error.
#[test]
fn nonfinite_input_is_the_same_error() {
    let x = tensor(vec![1.0, f32::NAN, 2.0, 3.0]);
    let base = StateDict::from_pairs([("w", ArrayD::<f32>::zeros(IxDyn(&[4])))]).unwrap();
    let m = TaskMerge::ties(base, 0.5, 1.0).unwrap();
    let whole = m.merge_tensor("w", &[&x]).unwrap_err().to_string();
    let src = SliceChunks::new(vec![x.as_slice().unwrap()], 3).unwrap();
    let chunked = m
        .merge_chunked("w", &[4], &src, &|_, _: &[f32]| Ok(()))
        .unwrap_err()
        .to_string();
    assert_eq!(chunked, whole);
    assert!(chunked.contains("`w`"), "{chunked}");
    let wrong = m
        .merge_chunked("w", &[5], &src, &|_, _: &[f32]| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(wrong.contains("[5]") && wrong.contains("[4]"), "{wrong}");
}

/// Tensors of several `PAR_CHUNK` (65 536-element) random streams: DARE draws the whole
/// path's stream from chunks starting anywhere in one, and the L1 rescale sums in a
/// pass of its own when chunks hold whole streams (else reads the tensors whole),
/// bit for bit as `merge_tensor`, for every trimming method and tie order.
#[test]
fn random_streams_and_l1_sums_span_chunks() {
    let n = 200_003;
    let base = tensor(values(1, 11, n));
    let xs: Vec<ArrayD<f32>> = (0..2)
        .map(|i| {
            let d = values(1, 100 + i, n);
            tensor(base.iter().zip(d).map(|(b, d)| b + d).collect())
        })
        .collect();
    let mut inputs = vec![&base];
    inputs.extend(xs.iter());
    for which in 0..3 {
        for rs in 0..3 {
            for order in [TieOrder::Index, TieOrder::Torch] {
                let sp = sparsification(which, 0.3, 0.05);
                let m = TaskMerge::<StateDictF32>::base_input(sp, Consensus::SignElection, 1.0)
                    .unwrap()
                    .with_tie_order(order)
                    .with_rescale(rescale(rs))
                    .unwrap();
                for chunk in [1 << 16, 1 << 17, 70_001, n] {
                    let (want, got) = both(&m, &inputs, chunk);
                    assert!(got == want, "{which} {rs} {order:?} {chunk}");
                }
            }
        }
    }
}
