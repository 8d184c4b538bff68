//! Interop with Python's `safetensors` package (the reference implementation).
//!
//! * Files written by Python (tests/golden/io/gen.py) load with the expected values.
//! * Narrowing conversions match numpy's (f16) and integer round-to-nearest-even (bf16).
//! * Files written by modelfusion are byte-identical to the committed ones in
//!   tests/golden/io/rust/, which tests/golden/io/check_rust_written.py loads in Python.
//!   Set `MODELFUSION_BLESS=1` to rewrite them.
#![cfg(feature = "safetensors")]

use std::path::{Path, PathBuf};

use modelfusion::io::{Checkpoint, Dtype, IoScalar, SaveOptions, load, save, save_file};
use modelfusion::{Model, StateDict};
use ndarray::ArrayD;
use serde_json::Value;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/io")
}

fn json(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(golden().join(name)).unwrap()).unwrap()
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn python_written_files_load_with_expected_values() {
    let expected = json("expected.json");
    let files = expected.as_object().unwrap();
    assert_eq!(files.len(), 6);
    for (file, tensors) in files {
        let path = golden().join("py").join(file);
        let ck = Checkpoint::open(&path).unwrap();
        assert_eq!(ck.len(), tensors.as_object().unwrap().len(), "{file}");
        let sd64: StateDict<ArrayD<f64>> = load(&path).unwrap();
        let sd32: StateDict<ArrayD<f32>> = load(&path).unwrap();
        for (name, t) in tensors.as_object().unwrap() {
            let info = ck.info(name).unwrap();
            assert_eq!(
                info.dtype().as_str(),
                t["dtype"].as_str().unwrap(),
                "{file}/{name}"
            );
            let shape: Vec<usize> = u64s(&t["shape"]).into_iter().map(|x| x as usize).collect();
            assert_eq!(info.shape(), shape.as_slice(), "{file}/{name}");
            let want: Vec<f64> = u64s(&t["bits"]).into_iter().map(f64::from_bits).collect();
            let got64 = sd64.get(name).unwrap();
            assert_eq!(got64.shape(), shape.as_slice());
            let got64: Vec<u64> = got64.iter().map(|x| x.to_bits()).collect();
            let want64: Vec<u64> = want.iter().map(|x| x.to_bits()).collect();
            assert_eq!(got64, want64, "{file}/{name} as f64");
            if info.dtype() != Dtype::F64 {
                // Every value of a narrower type is exact in f32.
                let got32: Vec<u32> = sd32
                    .get(name)
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                let want32: Vec<u32> = want.iter().map(|&x| (x as f32).to_bits()).collect();
                assert_eq!(got32, want32, "{file}/{name} as f32");
            }
        }
    }
}

#[test]
fn python_sharded_checkpoint_lists_its_files() {
    let ck = Checkpoint::open(golden().join("py/sharded")).unwrap();
    assert_eq!(ck.files().count(), 2);
    assert_eq!(ck.len(), 3);
    assert_eq!(ck.metadata().get("format").map(String::as_str), Some("pt"));
}

fn check_narrowing<T: IoScalar>(inputs: &[T], f16_bits: &[u64], bf16_bits: &[u64], what: &str) {
    for (i, &x) in inputs.iter().enumerate() {
        assert_eq!(
            x.to_f16().to_bits() as u64,
            f16_bits[i],
            "{what} #{i} {x} -> f16"
        );
        assert_eq!(
            x.to_bf16().to_bits() as u64,
            bf16_bits[i],
            "{what} #{i} {x} -> bf16"
        );
    }
    // The buffer conversion agrees with the scalar one.
    let mut bytes = vec![0u8; inputs.len() * 2];
    modelfusion::io::encode(Dtype::F16, inputs, &mut bytes).unwrap();
    let got: Vec<u64> = bytes
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u64)
        .collect();
    assert_eq!(got, f16_bits, "{what} buffer -> f16");
}

#[test]
fn narrowing_matches_numpy_round_to_nearest_even() {
    let r = json("rounding.json");
    let f32s: Vec<f32> = u64s(&r["f32_bits"])
        .into_iter()
        .map(|b| f32::from_bits(b as u32))
        .collect();
    check_narrowing(
        &f32s,
        &u64s(&r["f32_to_f16_bits"]),
        &u64s(&r["f32_to_bf16_bits"]),
        "f32",
    );
    let f64s: Vec<f64> = u64s(&r["f64_bits"])
        .into_iter()
        .map(f64::from_bits)
        .collect();
    check_narrowing(
        &f64s,
        &u64s(&r["f64_to_f16_bits"]),
        &u64s(&r["f64_to_bf16_bits"]),
        "f64",
    );
}

/// The source of the Rust-written fixtures: the Python f32 fixture.
fn rust_source() -> StateDict<ArrayD<f32>> {
    load(golden().join("py/f32.safetensors")).unwrap()
}

fn write_rust_fixtures(dir: &Path) {
    let sd = rust_source();
    for d in Dtype::FLOATS {
        save_file(
            &sd,
            dir.join(format!("{}.safetensors", d.as_str().to_lowercase())),
            d,
        )
        .unwrap();
    }
    // Two shards of at most 32 bytes of bf16 data each, plus the index.
    save(
        &sd,
        dir.join("sharded"),
        &SaveOptions::new(Dtype::BF16).with_max_shard_size(32),
    )
    .unwrap();
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn rust_written_files_match_committed_bytes() {
    let committed = golden().join("rust");
    if std::env::var_os("MODELFUSION_BLESS").is_some() {
        std::fs::create_dir_all(&committed).unwrap();
        write_rust_fixtures(&committed);
    }
    let tmp = tempfile::tempdir().unwrap();
    write_rust_fixtures(tmp.path());
    let ours = files_under(tmp.path());
    let theirs = files_under(&committed);
    assert_eq!(ours.len(), 7, "{ours:?}");
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(
            a.strip_prefix(tmp.path()).unwrap(),
            b.strip_prefix(&committed).unwrap()
        );
        assert!(
            std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
            "{} differs",
            b.display()
        );
    }
    // And they load back to the source values (rounded per dtype).
    let sd = rust_source();
    for d in Dtype::FLOATS {
        let back: StateDict<ArrayD<f32>> =
            load(committed.join(format!("{}.safetensors", d.as_str().to_lowercase()))).unwrap();
        for (name, t) in sd.iter() {
            let b = back.get(name).unwrap();
            for (x, y) in t.iter().zip(b.iter()) {
                let want = match d {
                    Dtype::F16 => x.to_f16().to_f32(),
                    Dtype::BF16 => x.to_bf16().to_f32(),
                    _ => *x,
                };
                assert_eq!(want.to_bits(), y.to_bits(), "{d} {name}");
            }
        }
    }
}
