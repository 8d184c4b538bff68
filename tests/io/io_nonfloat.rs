//! Non-float tensors (I64 `num_batches_tracked`, BOOL masks, U8 tables, 8-bit floats)
//! load, survive merging and saving bit for bit, and keep their dtype.

#![cfg(feature = "safetensors")]

use modelfusion::io::{
    Checkpoint, Dtype, SaveOptions, StreamOptions, load, merge_checkpoints, save, save_file,
};
use modelfusion::merge::{Average, Merger};
use modelfusion::progress::Silent;
use modelfusion::{Model, RawTensor, StateDict};
use ndarray::{ArrayD, arr1};

/// A safetensors file written by hand (as PyTorch would), so that the reader is tested
/// against the format rather than against the crate's own writer.
fn handmade(entries: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = String::from("{");
    let mut data = Vec::new();
    for (i, (name, dtype, shape, bytes)) in entries.iter().enumerate() {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{},{}]}}"#,
            data.len(),
            data.len() + bytes.len()
        ));
        data.extend_from_slice(bytes);
    }
    header.push('}');
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&data);
    file
}

fn every_dtype() -> Vec<(&'static str, &'static str, Vec<usize>, Vec<u8>)> {
    let f32s: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    vec![
        ("bn.weight", "F32", vec![2], f32s),
        (
            "bn.num_batches_tracked",
            "I64",
            vec![],
            123_456_789_012i64.to_le_bytes().to_vec(),
        ),
        ("mask", "BOOL", vec![3], vec![1, 0, 1]),
        ("table", "U8", vec![2, 2], vec![0, 255, 7, 9]),
        ("i8", "I8", vec![2], vec![0x80, 0x7f]),
        ("i16", "I16", vec![1], (-300i16).to_le_bytes().to_vec()),
        ("u16", "U16", vec![1], 65535u16.to_le_bytes().to_vec()),
        ("i32", "I32", vec![1], (-7i32).to_le_bytes().to_vec()),
        ("u32", "U32", vec![1], u32::MAX.to_le_bytes().to_vec()),
        ("u64", "U64", vec![1], u64::MAX.to_le_bytes().to_vec()),
        ("f8", "F8_E4M3", vec![2], vec![0x38, 0xff]),
        ("f8b", "F8_E5M2", vec![1], vec![0x7c]),
        ("c64", "C64", vec![1], vec![1, 2, 3, 4, 5, 6, 7, 8]),
    ]
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mf-nonfloat-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_byte_sized_dtype_loads_and_saves_bit_exactly() {
    let dir = tmp("all");
    let entries = every_dtype();
    let path = dir.join("in.safetensors");
    std::fs::write(&path, handmade(&entries)).unwrap();
    let sd: StateDict<ArrayD<f32>> = load(&path).unwrap();
    assert_eq!(sd.num_tensors(), 1);
    assert_eq!(sd.raw_tensors().len(), entries.len() - 1);
    for (name, dtype, shape, bytes) in &entries[1..] {
        let r = sd.raw(name).unwrap();
        assert_eq!(r.dtype().as_str(), *dtype);
        assert_eq!(r.shape(), shape.as_slice());
        assert_eq!(r.bytes(), bytes.as_slice(), "{name}");
    }
    // Saving (to bf16 floats) keeps every raw tensor's dtype and bytes.
    let out = dir.join("out");
    save(&sd, &out, &SaveOptions::new(Dtype::BF16)).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(ck.info("bn.weight").unwrap().dtype(), Dtype::BF16);
    for (name, dtype, shape, bytes) in &entries[1..] {
        let info = ck.info(name).unwrap();
        assert_eq!(
            (info.dtype().as_str(), info.shape()),
            (*dtype, shape.as_slice())
        );
        assert_eq!(ck.raw(name).unwrap(), bytes.as_slice());
    }
    // Reading a non-float tensor as floats is a clear error naming it.
    let err = ck.read::<f32>("mask").unwrap_err().to_string();
    assert!(err.contains("`mask`") && err.contains("BOOL"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sub_byte_dtypes_are_unsupported_not_malformed() {
    let dir = tmp("f4");
    let path = dir.join("f4.safetensors");
    std::fs::write(&path, handmade(&[("q", "F4", vec![2], vec![0x12])])).unwrap();
    let err = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(err.contains("unsupported") && err.contains("F4"), "{err}");
    assert!(!err.contains("malformed"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

fn with_counter(w: f32, count: i64) -> StateDict<ArrayD<f32>> {
    let mut sd = StateDict::from_pairs([("bn.weight", arr1(&[w, 2.0 * w]).into_dyn())]).unwrap();
    sd.insert_raw(
        "bn.num_batches_tracked",
        RawTensor::new(Dtype::I64, vec![], count.to_le_bytes().to_vec()).unwrap(),
    )
    .unwrap();
    sd
}

#[test]
fn in_memory_merges_carry_the_first_models_raw_tensors() {
    let (a, b) = (with_counter(1.0, 100), with_counter(3.0, 900));
    let m = Average::uniform().merge(&[&a, &b]).unwrap();
    assert_eq!(m.get("bn.weight").unwrap()[[0]], 2.0);
    assert_eq!(
        m.raw("bn.num_batches_tracked"),
        a.raw("bn.num_batches_tracked")
    );
}

#[test]
fn streamed_merges_carry_and_report_raw_tensors() {
    let dir = tmp("stream");
    let (pa, pb) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    save_file(&with_counter(1.0, 100), &pa, Dtype::F32).unwrap();
    save_file(&with_counter(3.0, 900), &pb, Dtype::F16).unwrap();
    let (ca, cb) = (
        Checkpoint::open(&pa).unwrap(),
        Checkpoint::open(&pb).unwrap(),
    );
    let out = dir.join("out");
    let s = merge_checkpoints::<f32, _>(
        &[&ca, &cb],
        &Average::uniform(),
        &out,
        &StreamOptions::new(SaveOptions::new(Dtype::BF16)),
        Silent,
    )
    .unwrap();
    assert_eq!(s.tensors, 1);
    assert_eq!(s.carried, ["bn.num_batches_tracked"]);
    assert_eq!(s.carried_differing, ["bn.num_batches_tracked"]);
    let merged = Checkpoint::open(&out).unwrap();
    let info = merged.info("bn.num_batches_tracked").unwrap();
    assert_eq!(info.dtype(), Dtype::I64);
    assert_eq!(
        merged.raw("bn.num_batches_tracked").unwrap(),
        &100i64.to_le_bytes()
    );
    assert_eq!(merged.read::<f32>("bn.weight").unwrap()[[1]], 4.0);

    // A non-float tensor whose dtype differs among inputs is refused before any write.
    let mut c = with_counter(1.0, 1);
    c.take_raw();
    c.insert_raw(
        "bn.num_batches_tracked",
        RawTensor::new(Dtype::I32, vec![], 1i32.to_le_bytes().to_vec()).unwrap(),
    )
    .unwrap();
    let pc = dir.join("c.safetensors");
    save_file(&c, &pc, Dtype::F32).unwrap();
    let cc = Checkpoint::open(&pc).unwrap();
    let err = merge_checkpoints::<f32, _>(
        &[&ca, &cc],
        &Average::uniform(),
        dir.join("out2"),
        &StreamOptions::new(SaveOptions::new(Dtype::F32)),
        Silent,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("num_batches_tracked") && err.contains("I64") && err.contains("I32"),
        "{err}"
    );
    assert!(!dir.join("out2").join("model.safetensors").exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn output_dtype_must_be_a_float_type() {
    let dir = tmp("outdtype");
    let err = save(&with_counter(1.0, 1), &dir, &SaveOptions::new(Dtype::I64))
        .unwrap_err()
        .to_string();
    assert!(err.contains("I64") && err.contains("float"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
