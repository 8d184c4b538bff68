//! Save/load round trips for every dtype and sharding, and round-to-nearest-even on
//! specific bit patterns.
#![cfg(feature = "safetensors")]

use crate::io_common;

use io_common::random_sd;
use modelfusion::io::{
    Checkpoint, CheckpointWriter, Dtype, INDEX_FILE, IoScalar, SaveOptions, decode, encode, load,
    save, save_file,
};
use modelfusion::{Model, StateDict};
use ndarray::ArrayD;
use proptest::prelude::*;

fn all_bytes(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn shapes() -> impl Strategy<Value = Vec<Vec<usize>>> {
    prop::collection::vec(prop::collection::vec(0usize..5, 0..4), 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Loading what was saved gives each value rounded once to the dtype; saving the
    /// loaded values again reproduces the files byte for byte.
    #[test]
    fn save_load_save_is_identical(
        shapes in shapes(),
        seed in any::<u64>(),
        d in 0usize..4,
        shard in prop::option::of(1u64..64),
    ) {
        let dtype = Dtype::FLOATS[d];
        let named: Vec<(String, Vec<usize>)> =
            shapes.into_iter().enumerate().map(|(i, s)| (format!("layer{i}.w"), s)).collect();
        let refs: Vec<(&str, Vec<usize>)> = named.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
        let sd = random_sd(&refs, seed, 1e3);
        let mut opts = SaveOptions::new(dtype);
        opts.max_shard_size = shard;
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        save(&sd, a.path(), &opts).unwrap();
        let back: StateDict<ArrayD<f32>> = load(a.path()).unwrap();
        let names: Vec<&str> = back.names().collect();
        let want: Vec<&str> = sd.names().collect();
        prop_assert_eq!(names, want);
        for (name, t) in sd.iter() {
            let got = back.get(name).unwrap();
            prop_assert_eq!(got.shape(), t.shape());
            for (x, y) in t.iter().zip(got.iter()) {
                let r = match dtype {
                    Dtype::F16 => x.to_f16().to_f32(),
                    Dtype::BF16 => x.to_bf16().to_f32(),
                    _ => *x,
                };
                prop_assert_eq!(r.to_bits(), y.to_bits());
            }
        }
        save(&back, b.path(), &opts).unwrap();
        prop_assert_eq!(all_bytes(a.path()), all_bytes(b.path()));
        // f64 through the same file: identical stored bytes too.
        let back64: StateDict<ArrayD<f64>> = load(a.path()).unwrap();
        let c = tempfile::tempdir().unwrap();
        save(&back64, c.path(), &opts).unwrap();
        prop_assert_eq!(all_bytes(a.path()), all_bytes(c.path()));
        // Sharding: no shard above the limit unless it holds a single non-empty tensor.
        let ck = Checkpoint::open(a.path()).unwrap();
        if let Some(max) = shard {
            for f in ck.files() {
                let h = modelfusion::io::Header::parse(&std::fs::read(f).unwrap(), None).unwrap();
                let bytes: usize = h.tensors().iter().map(|t| t.byte_len()).sum();
                let nonempty = h.tensors().iter().filter(|t| t.byte_len() > 0).count();
                prop_assert!(bytes as u64 <= max || nonempty == 1);
            }
        } else {
            prop_assert_eq!(ck.files().count(), 1);
            prop_assert!(!a.path().join(INDEX_FILE).exists());
        }
    }

    /// Decoding then encoding any bytes of a dtype gives the same bytes back (NaN
    /// payloads excepted: they must stay NaN).
    #[test]
    fn decode_encode_is_identity(d in 0usize..4, raw in prop::collection::vec(any::<u8>(), 0..64)) {
        let dtype = Dtype::FLOATS[d];
        let n = raw.len() / dtype.size();
        let raw = &raw[..n * dtype.size()];
        let mut vals = vec![0f64; n];
        decode(dtype, raw, &mut vals).unwrap();
        let mut back = vec![0u8; raw.len()];
        encode(dtype, &vals, &mut back).unwrap();
        for (i, v) in vals.iter().enumerate() {
            let (a, b) = (&raw[i * dtype.size()..(i + 1) * dtype.size()], &back[i * dtype.size()..(i + 1) * dtype.size()]);
            if !v.is_nan() {
                prop_assert_eq!(a, b);
            }
        }
        // And through f32 for the narrow types.
        if dtype != Dtype::F64 {
            let mut v32 = vec![0f32; n];
            decode(dtype, raw, &mut v32).unwrap();
            encode(dtype, &v32, &mut back).unwrap();
            for (i, v) in v32.iter().enumerate() {
                if !v.is_nan() {
                    prop_assert_eq!(&raw[i * dtype.size()..(i + 1) * dtype.size()], &back[i * dtype.size()..(i + 1) * dtype.size()]);
                }
            }
        }
    }
}

#[test]
fn bf16_rounds_to_nearest_even() {
    // (f32 bits, bf16 bits)
    let cases: [(u32, u16); 10] = [
        (0x3F80_8000, 0x3F80), // 1 + 2^-8: tie, even neighbour below
        (0x3F81_8000, 0x3F82), // tie, even neighbour above
        (0x3F80_8001, 0x3F81), // just above the tie
        (0x3F80_7FFF, 0x3F80), // just below
        (0xBF80_8000, 0xBF80), // negative tie
        (0x7F7F_FFFF, 0x7F80), // f32::MAX rounds up to +inf
        (0x7F7F_7FFF, 0x7F7F), // stays finite
        (0x8000_0000, 0x8000), // -0
        (0x0000_8000, 0x0000), // subnormal tie to even (0)
        (0x0001_8000, 0x0002), // subnormal tie to even (2)
    ];
    for (x, want) in cases {
        assert_eq!(f32::from_bits(x).to_bf16().to_bits(), want, "{x:#010x}");
        assert_eq!(
            (f32::from_bits(x) as f64).to_bf16().to_bits(),
            want,
            "{x:#010x} via f64"
        );
    }
    assert!(f32::NAN.to_bf16().is_nan());
    // f64 just above a bf16 tie must round up (no double rounding through f32).
    assert_eq!(
        (1.0f64 + 2f64.powi(-8) + 2f64.powi(-40))
            .to_bf16()
            .to_bits(),
        0x3F81
    );
}

#[test]
fn f16_rounds_to_nearest_even() {
    // (value, f16 bits)
    let cases: [(f64, u16); 10] = [
        (1.0 + 2f64.powi(-11), 0x3C00),       // tie, even below
        (1.0 + 3.0 * 2f64.powi(-11), 0x3C02), // tie, even above
        (65504.0, 0x7BFF),                    // max
        (65519.0, 0x7BFF),                    // below the overflow tie
        (65520.0, 0x7C00),                    // tie at the top rounds to +inf
        (2f64.powi(-24), 0x0001),             // smallest subnormal
        (2f64.powi(-25), 0x0000),             // tie with 0: even
        (3.0 * 2f64.powi(-26), 0x0001),       // above the tie
        (-0.0, 0x8000),
        (f64::NEG_INFINITY, 0xFC00),
    ];
    for (x, want) in cases {
        assert_eq!((x as f32).to_f16().to_bits(), want, "{x} via f32");
        assert_eq!(x.to_f16().to_bits(), want, "{x} via f64");
    }
    // The f64 double-rounding trap: just above a tie.
    assert_eq!(
        (1.0 + 2f64.powi(-11) + 2f64.powi(-40)).to_f16().to_bits(),
        0x3C01
    );
    assert!(f64::NAN.to_f16().is_nan());
}

#[test]
fn large_buffers_convert_like_small_ones() {
    // Above the parallel threshold the result must equal the serial element rule.
    let n = 300_000;
    let xs: Vec<f32> = (0..n).map(|i| (i as f32 - 150_000.0) * 0.37).collect();
    for d in Dtype::FLOATS {
        let mut bytes = vec![0u8; n * d.size()];
        encode(d, &xs, &mut bytes).unwrap();
        let mut back = vec![0f32; n];
        decode(d, &bytes, &mut back).unwrap();
        for (i, (x, y)) in xs.iter().zip(&back).enumerate().step_by(997) {
            let want = match d {
                Dtype::F16 => x.to_f16().to_f32(),
                Dtype::BF16 => x.to_bf16().to_f32(),
                _ => *x,
            };
            assert_eq!(want.to_bits(), y.to_bits(), "{d} #{i}");
        }
    }
}

#[test]
fn unaligned_buffers_convert_like_aligned_ones() {
    let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.013).collect();
    for d in Dtype::FLOATS {
        let n = xs.len() * d.size();
        let mut aligned = vec![0u8; n];
        encode(d, &xs, &mut aligned).unwrap();
        let mut storage = vec![0u8; n + 1];
        encode(d, &xs, &mut storage[1..]).unwrap();
        assert_eq!(&storage[1..], aligned.as_slice(), "{d} encode");
        let (mut a, mut b) = (vec![0f64; xs.len()], vec![0f64; xs.len()]);
        decode(d, &aligned, &mut a).unwrap();
        decode(d, &storage[1..], &mut b).unwrap();
        assert_eq!(a, b, "{d} decode");
    }
}

#[test]
fn conversion_length_errors() {
    let mut out = [0f32; 2];
    assert!(decode(Dtype::F32, &[0u8; 7], &mut out).is_err());
    assert!(encode(Dtype::BF16, &[1.0f32], &mut [0u8; 3]).is_err());
}

#[test]
fn dtype_names() {
    for (s, d) in [
        ("float16", Dtype::F16),
        ("torch.bfloat16", Dtype::BF16),
        ("FP32", Dtype::F32),
        ("double", Dtype::F64),
    ] {
        assert_eq!(s.parse::<Dtype>().unwrap(), d);
    }
    let err = "int4".parse::<Dtype>().unwrap_err().to_string();
    assert!(err.contains("int4") && err.contains("bfloat16"), "{err}");
}

#[test]
fn writer_rejects_bad_plans_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let o = SaveOptions::new(Dtype::F32);
    assert!(CheckpointWriter::create(dir.path(), [("__metadata__", vec![1])], &o).is_err());
    assert!(CheckpointWriter::create(dir.path(), [("a", vec![usize::MAX, 2])], &o).is_err());
    assert!(
        CheckpointWriter::create(
            dir.path(),
            [("a", vec![1])],
            &SaveOptions::new(Dtype::F32).with_max_shard_size(0)
        )
        .is_err()
    );
    // Dropped unfinished: files removed.
    let w = CheckpointWriter::create(
        dir.path(),
        [("a", vec![4]), ("b", vec![4])],
        &o.clone().with_max_shard_size(16),
    )
    .unwrap();
    assert_eq!(w.files().count(), 2);
    drop(w);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn saving_again_replaces_stale_shards_only() {
    let dir = tempfile::tempdir().unwrap();
    let sd = random_sd(&[("a", vec![8]), ("b", vec![8]), ("c", vec![8])], 3, 1.0);
    save(
        &sd,
        dir.path(),
        &SaveOptions::new(Dtype::F32).with_max_shard_size(32),
    )
    .unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    save(&sd, dir.path(), &SaveOptions::new(Dtype::F32)).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors"]);
    let back: StateDict<ArrayD<f32>> = load(dir.path()).unwrap();
    assert_eq!(back, sd);
}

#[test]
fn single_file_save_keeps_order_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let sd = random_sd(&[("z", vec![2]), ("a", vec![]), ("m", vec![0, 3])], 9, 1.0);
    save_file(&sd, &p, Dtype::F64).unwrap();
    let ck = Checkpoint::open(&p).unwrap();
    let names: Vec<&str> = ck.tensors().iter().map(|t| t.name()).collect();
    assert_eq!(names, ["z", "a", "m"]);
    assert_eq!(ck.metadata()["format"], "pt");
    // The reference crate reads it too.
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("a").unwrap().shape(), &[] as &[usize]);
    assert_eq!(st.tensor("m").unwrap().shape(), &[0, 3]);
}
