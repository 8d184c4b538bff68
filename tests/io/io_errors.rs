//! Every malformed checkpoint is an `Error::Format` naming the file and the tensor.
#![cfg(feature = "safetensors")]

use crate::io_common;

use io_common::{random_sd, raw_file, write};
use modelfusion::Error;
use modelfusion::io::{Checkpoint, Dtype, INDEX_FILE, SaveOptions, save};

/// Opens `bytes` written as a file and returns the error message; asserts it is a
/// format error naming the file and every string of `mentions`.
fn open_err(bytes: &[u8], mentions: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "bad.safetensors", bytes);
    let err = Checkpoint::open(&p).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("bad.safetensors"), "{msg}");
    for m in mentions {
        assert!(msg.contains(m), "`{m}` not in: {msg}");
    }
    msg
}

const ONE: &str = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;

#[test]
fn valid_file_opens() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "ok.safetensors", &raw_file(ONE, 8, 0));
    let ck = Checkpoint::open(&p).unwrap();
    assert_eq!(
        ck.read::<f32>("w").unwrap().as_slice().unwrap(),
        &[0.0, 0.0]
    );
}

#[test]
fn too_short_file() {
    open_err(&[1, 2, 3], &["shorter than the 8-byte"]);
    open_err(&[], &["0 bytes"]);
}

#[test]
fn huge_declared_header() {
    let mut f = u64::MAX.to_le_bytes().to_vec();
    f.extend_from_slice(b"{}");
    open_err(&f, &["exceeds the limit"]);
    let mut f = (100_000_001u64).to_le_bytes().to_vec();
    f.extend_from_slice(b"{}");
    open_err(&f, &["exceeds the limit"]);
}

#[test]
fn header_past_end_of_file() {
    let mut f = raw_file(ONE, 8, 0);
    f[..8].copy_from_slice(&1000u64.to_le_bytes());
    open_err(&f, &["runs past the end"]);
}

#[test]
fn header_not_json_object() {
    open_err(&raw_file("[1, 2]   ", 0, 0), &["does not start with"]);
    open_err(&raw_file("{\"w\": ", 0, 0), &["not valid JSON"]);
    let mut f = raw_file("{\"a\":\"\u{e9}\"}", 0, 0);
    f[13] = 0xff; // invalid UTF-8 inside the string
    open_err(&f, &["UTF-8"]);
}

#[test]
fn unknown_dtype() {
    open_err(
        &raw_file(
            r#"{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,8]}}"#,
            8,
            0,
        ),
        &["tensor `w`", "`Q4`"],
    );
    open_err(
        &raw_file(r#"{"w":{"shape":[1],"data_offsets":[0,4]}}"#, 4, 0),
        &["tensor `w`", "dtype"],
    );
}

#[test]
fn shape_and_byte_length_disagree() {
    open_err(
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
            0,
        ),
        &["tensor `w`", "needs 12 bytes", "span 8"],
    );
    open_err(
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}"#,
            8,
            0,
        ),
        &["tensor `w`", "shape"],
    );
    open_err(
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,8]}}"#,
            8,
            0,
        ),
        &["tensor `w`", "overflows"],
    );
}

#[test]
fn offsets_out_of_range_or_reversed() {
    open_err(
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
            8,
            0,
        ),
        &["tensor `w`", "past the end of the data"],
    );
    open_err(
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#,
            8,
            0,
        ),
        &["tensor `w`", "reversed"],
    );
    open_err(
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}}"#,
            8,
            0,
        ),
        &["tensor `w`", "data_offsets"],
    );
    open_err(
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551615]}}"#,
            8,
            0,
        ),
        &["tensor `w`"],
    );
}

#[test]
fn overlapping_tensors() {
    open_err(
        &raw_file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
            0,
        ),
        &["overlaps", "`a`", "`b`"],
    );
    // Two names over the same bytes.
    open_err(
        &raw_file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[4],"data_offsets":[0,8]}}"#,
            8,
            0,
        ),
        &["overlaps"],
    );
}

#[test]
fn gaps_and_trailing_bytes() {
    open_err(
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
            0,
        ),
        &["gap of 4", "`w`"],
    );
    open_err(&raw_file(ONE, 12, 0), &["trailing"]);
}

#[test]
fn bad_metadata() {
    open_err(
        &raw_file(r#"{"__metadata__":{"a":1}}"#, 0, 0),
        &["__metadata__", "`a`"],
    );
    open_err(&raw_file(r#"{"__metadata__":[]}"#, 0, 0), &["__metadata__"]);
}

#[test]
fn missing_file_is_io_error_with_path() {
    let err = Checkpoint::open("/definitely/not/here.safetensors").unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("/definitely/not/here.safetensors"));
}

#[test]
fn missing_tensor_and_bad_range() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "ok.safetensors", &raw_file(ONE, 8, 0));
    let ck = Checkpoint::open(&p).unwrap();
    let err = ck.read::<f32>("nope").unwrap_err();
    assert!(matches!(err, Error::MissingParam { .. }) && err.to_string().contains("nope"));
    let mut out = [0f32; 3];
    assert!(ck.read_into("w", 0, &mut out).is_err());
    assert!(ck.read_into("w", usize::MAX, &mut out[..1]).is_err());
}

fn sharded_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let sd = random_sd(&[("a", vec![4]), ("b", vec![4]), ("c", vec![2])], 1, 1.0);
    save(
        &sd,
        dir.path(),
        &SaveOptions::new(Dtype::F32).with_max_shard_size(32),
    )
    .unwrap();
    dir
}

fn sharded_err(dir: &std::path::Path, mentions: &[&str]) {
    let err = Checkpoint::open(dir).unwrap_err();
    let msg = err.to_string();
    for m in mentions {
        assert!(msg.contains(m), "`{m}` not in: {msg}");
    }
}

#[test]
fn sharded_directory_opens() {
    let dir = sharded_dir();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.files().count(), 2);
    assert_eq!(ck.len(), 3);
}

#[test]
fn index_naming_a_missing_shard() {
    let dir = sharded_dir();
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    sharded_err(dir.path(), &["model-00002-of-00002.safetensors"]);
}

#[test]
fn index_placing_a_tensor_in_the_wrong_shard() {
    let dir = sharded_dir();
    let p = dir.path().join(INDEX_FILE);
    let text = std::fs::read_to_string(&p).unwrap();
    let text = text.replace(
        r#""c": "model-00002-of-00002.safetensors""#,
        r#""c": "model-00001-of-00002.safetensors""#,
    );
    std::fs::write(&p, text).unwrap();
    sharded_err(dir.path(), &["`c`", "does not hold it"]);
}

#[test]
fn index_missing_or_inventing_tensors() {
    let dir = sharded_dir();
    let p = dir.path().join(INDEX_FILE);
    let orig = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, orig.replace(r#""c": "#, r#""zzz": "#)).unwrap();
    sharded_err(dir.path(), &["`c`", "missing from the index"]);
    let extra = orig.replace(
        r#""weight_map": {"#,
        r#""weight_map": {"ghost": "model-00001-of-00002.safetensors","#,
    );
    std::fs::write(&p, extra).unwrap();
    sharded_err(dir.path(), &["`ghost`", "does not hold it"]);
}

#[test]
fn index_with_path_traversal_or_garbage() {
    let dir = sharded_dir();
    let p = dir.path().join(INDEX_FILE);
    std::fs::write(&p, r#"{"weight_map":{"a":"../x.safetensors"}}"#).unwrap();
    sharded_err(dir.path(), &["../x.safetensors", "plain"]);
    std::fs::write(&p, r#"{"weight_map":{"a":"/etc/x.safetensors"}}"#).unwrap();
    sharded_err(dir.path(), &["plain"]);
    std::fs::write(&p, "not json").unwrap();
    sharded_err(dir.path(), &[INDEX_FILE, "JSON"]);
    std::fs::write(&p, r#"{"metadata":{}}"#).unwrap();
    sharded_err(dir.path(), &["weight_map"]);
}

#[test]
fn directory_without_index() {
    let dir = sharded_dir();
    std::fs::remove_file(dir.path().join(INDEX_FILE)).unwrap();
    sharded_err(dir.path(), &["2 *.safetensors files", INDEX_FILE]);
    let empty = tempfile::tempdir().unwrap();
    sharded_err(empty.path(), &["neither"]);
    // A lone file of any name is taken.
    let one = tempfile::tempdir().unwrap();
    write(one.path(), "weights.safetensors", &raw_file(ONE, 8, 0));
    assert_eq!(Checkpoint::open(one.path()).unwrap().len(), 1);
}

#[test]
fn duplicate_tensor_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "s1.safetensors", &raw_file(ONE, 8, 0));
    write(dir.path(), "s2.safetensors", &raw_file(ONE, 8, 0));
    std::fs::write(
        dir.path().join(INDEX_FILE),
        r#"{"weight_map":{"w":"s1.safetensors","x":"s2.safetensors"}}"#,
    )
    .unwrap();
    sharded_err(dir.path(), &["`w`"]);
}
