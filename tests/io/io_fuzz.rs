//! Proptest-driven fuzzing of the safetensors header and shard-index parsers.
//!
//! Properties: arbitrary bytes, mutated valid files, huge declared headers, wrong offsets,
//! overlaps and unknown dtypes give an error or a valid header, never a panic; an accepted
//! header agrees with an independent validity oracle and with the reference `safetensors`
//! crate, and every tensor it lists can be read; and no parse allocates more than a small
//! multiple of the input's size, whatever sizes the input declares (checked with a
//! counting global allocator).
#![cfg(feature = "safetensors")]

use crate::io_common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use io_common::raw_file;
use modelfusion::io::{Header, ShardIndex, decode};
use proptest::prelude::*;

/// Records the largest single allocation made by the current thread while armed.
struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(size: usize) {
    let _ = ARMED.try_with(|a| {
        if a.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made.
fn largest_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    ARMED.with(|a| a.set(true));
    let r = f();
    ARMED.with(|a| a.set(false));
    (r, LARGEST.with(Cell::get))
}

/// Parses `file`, asserting that no allocation exceeds a bound linear in its length.
fn parse_bounded(file: &[u8]) -> modelfusion::Result<Header> {
    let (r, largest) = largest_alloc(|| Header::parse(file, None));
    assert!(
        largest <= 64 * file.len() + 4096,
        "parse of a {}-byte file allocated {largest} bytes at once",
        file.len()
    );
    r
}

/// Every tensor of an accepted header lies inside the file and decodes.
fn check_accepted(file: &[u8], h: &Header) {
    let data_len = file.len() - h_data_start(file);
    let mut total = 0;
    for t in h.tensors() {
        assert_eq!(t.byte_len(), t.numel() * t.dtype().size());
        total += t.byte_len();
    }
    assert_eq!(total, data_len, "accepted header must tile the data region");
    // Tensors tile the data in order, so each slice is at the running offset.
    let mut pos = h_data_start(file);
    for t in h.tensors() {
        let bytes = &file[pos..pos + t.byte_len()];
        if t.dtype().is_float() {
            let mut out = vec![0f32; t.numel()];
            decode(t.dtype(), bytes, &mut out).unwrap();
        } else {
            // Carried as raw bytes: the slice must be exactly the tensor.
            assert_eq!(bytes.len(), t.numel() * t.dtype().size());
        }
        pos += t.byte_len();
    }
}

fn h_data_start(file: &[u8]) -> usize {
    8 + u64::from_le_bytes(file[..8].try_into().unwrap()) as usize
}

/// The reference crate's verdict (it accepts more dtypes; we accept a subset).
fn reference_accepts(file: &[u8]) -> bool {
    safetensors::SafeTensors::deserialize(file).is_ok()
}

#[derive(Clone, Debug)]
struct Entry {
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
    offsets: (u64, u64),
}

const DTYPES: [&str; 7] = ["F16", "BF16", "F32", "F64", "I64", "U8", "F99"];

/// Element sizes of the generated dtypes, written out independently of the crate.
fn dtype_size(d: &str) -> Option<u64> {
    match d {
        "U8" => Some(1),
        "F16" | "BF16" => Some(2),
        "F32" => Some(4),
        "F64" | "I64" => Some(8),
        _ => None,
    }
}

/// Entries laid out contiguously (valid), then optionally perturbed.
fn entries() -> impl Strategy<Value = Vec<Entry>> {
    prop::collection::vec((0usize..4, prop::collection::vec(0u64..5, 0..3)), 0..5).prop_map(
        |specs| {
            let mut pos = 0;
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (d, shape))| {
                    let n: u64 = shape.iter().product::<u64>() * dtype_size(DTYPES[d]).unwrap();
                    let e = Entry {
                        name: format!("t{i}"),
                        dtype: DTYPES[d],
                        shape,
                        offsets: (pos, pos + n),
                    };
                    pos += n;
                    e
                })
                .collect()
        },
    )
}

#[derive(Clone, Debug)]
enum Mutation {
    None,
    Dtype(usize, usize),
    Begin(usize, i64),
    End(usize, i64),
    Dim(usize, u64),
    HugeDim(usize),
    Swap(usize, usize),
    DataDelta(i64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        Just(Mutation::None),
        (0usize..5, 0usize..DTYPES.len()).prop_map(|(i, d)| Mutation::Dtype(i, d)),
        (0usize..5, -9i64..9).prop_map(|(i, k)| Mutation::Begin(i, k)),
        (0usize..5, -9i64..9).prop_map(|(i, k)| Mutation::End(i, k)),
        (0usize..5, 0u64..6).prop_map(|(i, v)| Mutation::Dim(i, v)),
        (0usize..5).prop_map(Mutation::HugeDim),
        (0usize..5, 0usize..5).prop_map(|(i, j)| Mutation::Swap(i, j)),
        (-9i64..9).prop_map(Mutation::DataDelta),
    ]
}

fn shift(x: u64, k: i64) -> u64 {
    x.saturating_add_signed(k)
}

/// Applies a mutation; returns the data length the file should have.
fn apply(es: &mut [Entry], m: &Mutation) -> u64 {
    let data = es.last().map_or(0, |e| e.offsets.1);
    let n = es.len();
    match *m {
        Mutation::None => {}
        Mutation::Dtype(i, d) if n > 0 => es[i % n].dtype = DTYPES[d],
        Mutation::Begin(i, k) if n > 0 => es[i % n].offsets.0 = shift(es[i % n].offsets.0, k),
        Mutation::End(i, k) if n > 0 => es[i % n].offsets.1 = shift(es[i % n].offsets.1, k),
        Mutation::Dim(i, v) if n > 0 => {
            let e = &mut es[i % n];
            if e.shape.is_empty() {
                e.shape.push(v);
            } else {
                e.shape[0] = v;
            }
        }
        Mutation::HugeDim(i) if n > 0 => es[i % n].shape.push(u64::MAX / 3),
        Mutation::Swap(i, j) if n > 0 => {
            let (a, b) = (es[i % n].offsets, es[j % n].offsets);
            es[i % n].offsets = b;
            es[j % n].offsets = a;
        }
        Mutation::DataDelta(k) => return shift(data, k),
        _ => {}
    }
    data
}

fn header_json(es: &[Entry]) -> String {
    let parts: Vec<String> = es
        .iter()
        .map(|e| {
            format!(
                r#""{}":{{"dtype":"{}","shape":{:?},"data_offsets":[{},{}]}}"#,
                e.name, e.dtype, e.shape, e.offsets.0, e.offsets.1
            )
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// An independent statement of validity for generated headers.
fn oracle(es: &[Entry], data_len: u64) -> bool {
    let mut spans = Vec::new();
    for e in es {
        let Some(size) = dtype_size(e.dtype) else {
            return false;
        };
        let Some(bytes) = e.shape.iter().try_fold(size, |a, &d| a.checked_mul(d)) else {
            return false;
        };
        let (b, end) = e.offsets;
        if b > end || end > data_len || end - b != bytes {
            return false;
        }
        spans.push((b, end));
    }
    spans.sort();
    let mut pos = 0;
    for (b, e) in spans {
        if b != pos {
            return false;
        }
        pos = e;
    }
    pos == data_len
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(h) = parse_bounded(&bytes) {
            check_accepted(&bytes, &h);
        }
    }

    #[test]
    fn random_bytes_after_a_plausible_length_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..256),
        declared in 0u64..300,
    ) {
        let mut f = declared.to_le_bytes().to_vec();
        f.push(b'{');
        f.extend_from_slice(&body);
        if let Ok(h) = parse_bounded(&f) {
            check_accepted(&f, &h);
        }
    }

    #[test]
    fn huge_declared_lengths_are_rejected_cheaply(
        declared in prop_oneof![Just(u64::MAX), Just(1u64 << 40), 100_000_001u64..u64::MAX],
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut f = declared.to_le_bytes().to_vec();
        f.extend_from_slice(&body);
        prop_assert!(parse_bounded(&f).is_err());
    }

    #[test]
    fn generated_headers_match_the_oracle(es in entries(), m in mutation()) {
        let mut es = es;
        let data_len = apply(&mut es, &m);
        let json = header_json(&es);
        let f = raw_file(&json, data_len as usize, 0x3c);
        let ours = parse_bounded(&f);
        prop_assert_eq!(ours.is_ok(), oracle(&es, data_len), "{} -> {:?}", json, ours);
        if let Ok(h) = ours {
            check_accepted(&f, &h);
            prop_assert!(reference_accepts(&f), "reference rejects what we accept: {}", json);
            prop_assert_eq!(h.tensors().len(), es.len());
        }
    }

    #[test]
    fn byte_flips_of_a_valid_file_never_panic(
        es in entries(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let data_len = es.last().map_or(0, |e| e.offsets.1);
        let mut f = raw_file(&header_json(&es), data_len as usize, 0);
        for (i, b) in flips {
            let k = i.index(f.len());
            f[k] ^= b;
        }
        if truncate {
            f.truncate(cut.index(f.len() + 1));
        }
        if let Ok(h) = parse_bounded(&f) {
            check_accepted(&f, &h);
        }
    }

    #[test]
    fn shard_index_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let (_, largest) = largest_alloc(|| ShardIndex::parse(&bytes, None));
        prop_assert!(largest <= 64 * bytes.len() + 4096);
    }

    #[test]
    fn shard_index_accepts_only_plain_names(
        names in prop::collection::vec(
            prop_oneof![
                "[a-z]{1,8}\\.safetensors",
                "(\\.\\./|/|[a-z]{1,3}/)[a-z]{1,8}\\.safetensors",
                "[a-z]{1,8}\\.bin",
                Just("..".to_string()),
            ],
            0..5,
        ),
    ) {
        let map: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, f)| format!(r#""t{i}":"{f}""#))
            .collect();
        let json = format!(r#"{{"weight_map":{{{}}}}}"#, map.join(","));
        let ok = names
            .iter()
            .all(|f| !f.contains('/') && f.ends_with(".safetensors") && f != "..");
        let r = ShardIndex::parse(json.as_bytes(), None);
        prop_assert_eq!(r.is_ok(), ok, "{}", json);
        if let Ok(idx) = r {
            prop_assert_eq!(idx.len(), names.len());
            for (i, f) in names.iter().enumerate() {
                prop_assert_eq!(idx.file_of(&format!("t{i}")), Some(f.as_str()));
            }
        }
    }
}
