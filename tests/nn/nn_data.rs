//! Data sets: the IDX reader (well-formed and malformed files, gzipped and raw), the
//! embedded digits, Fashion-MNIST, and the Dataset helpers.
#![cfg(feature = "nn")]

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::{Compression, write::GzEncoder};
use modelfusion::Error;
use modelfusion::nn::Dataset;
use modelfusion::nn::data::{self, fashion_mnist, load_idx_dataset, parse_idx, read_idx};
use ndarray::{Array2, array};

/// An IDX header for unsigned bytes with the given dimensions.
fn header(dims: &[u32]) -> Vec<u8> {
    let mut h = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        h.extend_from_slice(&d.to_be_bytes());
    }
    h
}

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = header(dims);
    v.extend_from_slice(data);
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("modelfusion-nn-data-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The error's message for `bytes`, asserting that both the raw and the gzipped input
/// give a format error.
fn format_err(bytes: &[u8]) -> String {
    let gz = parse_idx(&gzip(bytes));
    assert!(matches!(gz, Err(Error::Format { .. })), "gzipped: {gz:?}");
    match parse_idx(bytes) {
        Err(e @ Error::Format { .. }) => e.to_string(),
        other => panic!("expected a format error, got {other:?}"),
    }
}

#[test]
fn well_formed_files_parse_gzipped_or_raw() {
    let bytes = idx(&[2, 2, 3], &[0, 51, 102, 153, 204, 255, 1, 2, 3, 4, 5, 6]);
    let a = parse_idx(&bytes).unwrap();
    assert_eq!(a, parse_idx(&gzip(&bytes)).unwrap());
    assert_eq!(a.dims, vec![2, 2, 3]);
    let images = a.into_images().unwrap();
    assert_eq!(images.dim(), (2, 6));
    assert_eq!(images.row(0).to_vec(), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
    let labels = parse_idx(&idx(&[3], &[9, 0, 4]))
        .unwrap()
        .into_labels()
        .unwrap();
    assert_eq!(labels, vec![9, 0, 4]);
}

#[test]
fn malformed_files_are_format_errors() {
    // Bad magic.
    let mut bad = idx(&[1], &[0]);
    bad[0] = 0x12;
    assert!(format_err(&bad).contains("bad magic"));
    // Unsupported element type (float, 0x0D).
    let mut float = idx(&[1], &[0, 0, 0, 0]);
    float[2] = 0x0d;
    assert!(format_err(&float).contains("unsupported element type 0x0d"));
    // Zero dimensions.
    assert!(format_err(&[0, 0, 8, 0]).contains("0 dimensions"));
    // Truncated inside the magic and inside the dimension sizes.
    assert!(format_err(&[0, 0]).contains("truncated header"));
    assert!(format_err(&header(&[5, 5])[..9]).contains("truncated header"));
    assert!(format_err(&[]).contains("truncated header"));
    // Truncated body.
    let e = format_err(&idx(&[2, 3], &[1, 2, 3, 4]));
    assert!(
        e.contains("truncated data") && e.contains("6 bytes") && e.contains("found 4"),
        "{e}"
    );
    // More data than declared.
    assert!(format_err(&idx(&[2], &[1, 2, 3])).contains("more data"));
    // An absurd declared size: the product overflows.
    let e = format_err(&header(&[u32::MAX, u32::MAX, u32::MAX]));
    assert!(e.contains("absurd"), "{e}");
    // A huge declared size that does not overflow is reported as truncated without
    // allocating it (2^32 * 2^32 / 4 bytes would not fit in memory).
    let e = format_err(&idx(&[u32::MAX, u32::MAX], &[1, 2, 3]));
    assert!(e.contains("truncated data") && e.contains("found 3"), "{e}");
    // Corrupt gzip stream.
    let mut gz = gzip(&idx(&[4], &[1, 2, 3, 4]));
    let n = gz.len();
    gz.truncate(n - 6);
    assert!(matches!(parse_idx(&gz), Err(Error::Format { .. })));
}

#[test]
fn dimension_mismatches_are_errors() {
    // Labels read as images and images read as labels.
    assert!(
        parse_idx(&idx(&[2], &[1, 2]))
            .unwrap()
            .into_images()
            .is_err()
    );
    assert!(
        parse_idx(&idx(&[1, 2], &[1, 2]))
            .unwrap()
            .into_labels()
            .is_err()
    );
    // Image and label counts differ.
    let dir = temp_dir("mismatch");
    std::fs::write(dir.join("img"), idx(&[3, 1, 2], &[0; 6])).unwrap();
    std::fs::write(dir.join("lbl"), gzip(&idx(&[2], &[0, 1]))).unwrap();
    let e = load_idx_dataset(&dir.join("img"), &dir.join("lbl"), 10).unwrap_err();
    assert!(matches!(e, Error::Format { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("2 labels for 3 images") && msg.contains("lbl"),
        "{msg}"
    );
    // A label beyond the number of classes.
    std::fs::write(dir.join("lbl3"), idx(&[3], &[0, 1, 10])).unwrap();
    let e = load_idx_dataset(&dir.join("img"), &dir.join("lbl3"), 10).unwrap_err();
    assert!(e.to_string().contains("label 10"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn file_errors_name_the_path() {
    let dir = temp_dir("paths");
    let path = dir.join("broken-idx1-ubyte.gz");
    std::fs::write(&path, gzip(&idx(&[4], &[1, 2]))).unwrap();
    let e = read_idx(&path).unwrap_err().to_string();
    assert!(
        e.contains("broken-idx1-ubyte.gz") && e.contains("truncated"),
        "{e}"
    );
    let e = read_idx(&dir.join("absent")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes a tiny Fashion-MNIST look-alike: `gz` picks compressed or raw file names.
fn write_fake_fashion(dir: &Path, gz: bool) {
    let files = [
        (
            "train-images-idx3-ubyte",
            idx(&[3, 2, 2], &[0, 255, 0, 255, 1, 2, 3, 4, 9, 9, 9, 9]),
        ),
        ("train-labels-idx1-ubyte", idx(&[3], &[1, 9, 0])),
        (
            "t10k-images-idx3-ubyte",
            idx(&[1, 2, 2], &[255, 255, 255, 255]),
        ),
        ("t10k-labels-idx1-ubyte", idx(&[1], &[5])),
    ];
    for (name, bytes) in files {
        if gz {
            std::fs::write(dir.join(format!("{name}.gz")), gzip(&bytes)).unwrap();
        } else {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}

#[test]
fn fashion_mnist_reads_gz_or_raw_names_and_reports_absence() {
    for gz in [true, false] {
        let dir = temp_dir(if gz { "fashion-gz" } else { "fashion-raw" });
        write_fake_fashion(&dir, gz);
        let (train, test) = fashion_mnist(Some(&dir)).unwrap();
        assert_eq!((train.len(), test.len(), train.num_features()), (3, 1, 4));
        assert_eq!(train.y(), &[1, 9, 0]);
        assert_eq!(test.x()[[0, 3]], 1.0);
        std::fs::remove_file(dir.join(if gz {
            "t10k-labels-idx1-ubyte.gz"
        } else {
            "t10k-labels-idx1-ubyte"
        }))
        .unwrap();
        let e = fashion_mnist(Some(&dir)).unwrap_err();
        assert!(matches!(e, Error::Io { .. }));
        assert!(
            e.to_string().contains("t10k-labels-idx1-ubyte")
                && e.to_string().contains("dataset-fashion-mnist"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn fashion_mnist_from_debian_package_when_installed() {
    let dir = Path::new(data::DEFAULT_FASHION_MNIST_DIR);
    if !dir.join("train-images-idx3-ubyte.gz").exists()
        && !dir.join("train-images-idx3-ubyte").exists()
    {
        println!(
            "skipped: Fashion-MNIST is not installed under {} (apt-get install dataset-fashion-mnist)",
            dir.display()
        );
        return;
    }
    let (train, test) = fashion_mnist(None).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!((train.num_features(), train.num_classes()), (784, 10));
    assert_eq!(train.class_counts(), vec![6000; 10]);
    assert_eq!(test.class_counts(), vec![1000; 10]);
    assert!(train.x().iter().all(|&v| (0.0..=1.0).contains(&v)));
}

#[test]
fn embedded_digits_are_the_uci_set() {
    let d = data::digits().unwrap();
    assert_eq!((d.len(), d.num_features(), d.num_classes()), (1797, 64, 10));
    assert_eq!(
        d.class_counts(),
        vec![178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    );
    // The first image (a zero), first row: 0 0 5 13 9 1 0 0 (scaled by 1/16).
    let first: Vec<f32> = d.x().row(0).iter().take(8).copied().collect();
    assert_eq!(
        first,
        vec![
            0.0,
            0.0,
            5.0 / 16.0,
            13.0 / 16.0,
            9.0 / 16.0,
            1.0 / 16.0,
            0.0,
            0.0
        ]
    );
    assert_eq!(&d.y()[..5], &[0, 1, 2, 3, 4]);
    assert!(d.x().iter().all(|&v| (0.0..=1.0).contains(&v)));
}

#[test]
fn split_is_seeded_stratified_and_complete() {
    let d = data::digits().unwrap();
    let (train, test) = d.split(0.2, 7).unwrap();
    assert_eq!(d.split(0.2, 7).unwrap(), (train.clone(), test.clone()));
    assert_ne!(d.split(0.2, 8).unwrap().1, test);
    assert_eq!(train.len() + test.len(), d.len());
    for (c, (&tc, &all)) in test
        .class_counts()
        .iter()
        .zip(&d.class_counts())
        .enumerate()
    {
        assert_eq!(tc, (0.2 * all as f64).round() as usize, "class {c}");
    }
    // Every sample lands in exactly one part: compare multisets of rows via sums.
    let total: f64 = d.x().iter().map(|&v| v as f64).sum();
    let parts: f64 = train
        .x()
        .iter()
        .chain(test.x().iter())
        .map(|&v| v as f64)
        .sum();
    assert!((total - parts).abs() < 1e-6 * total);
    for bad in [0.0, 1.0, -0.1, f64::NAN] {
        assert!(d.split(bad, 0).is_err());
    }
    // Too few samples for a non-empty test part.
    let tiny = d.head(3);
    assert!(tiny.split(0.01, 0).is_err());
}

#[test]
fn dataset_validation_and_batching() {
    assert!(Dataset::new(Array2::zeros((2, 2)), vec![0], 2).is_err());
    assert!(Dataset::new(Array2::zeros((1, 2)), vec![0], 0).is_err());
    assert!(Dataset::new(array![[f32::NAN, 0.0]], vec![0], 1).is_err());
    let e = Dataset::new(Array2::zeros((2, 1)), vec![0, 5], 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 5") && e.contains("3 classes"), "{e}");
    let d = Dataset::new(
        Array2::from_shape_fn((5, 2), |(i, j)| (i * 2 + j) as f32),
        vec![0, 1, 0, 1, 0],
        2,
    )
    .unwrap();
    assert_eq!(d.num_batches(2), 3);
    let (x, y) = d.batch(2, 2).unwrap();
    assert_eq!((x.nrows(), y), (1, &[0usize][..]));
    assert_eq!(x[[0, 1]], 9.0);
    assert!(d.batch(0, 0).is_err());
    assert!(d.batches(0).is_err());
    let sizes: Vec<usize> = d.batches(2).unwrap().map(|(x, _)| x.nrows()).collect();
    assert_eq!(sizes, vec![2, 2, 1]);
    let s = d.shuffled(1);
    assert_eq!(s.len(), 5);
    let mut ys = s.y().to_vec();
    ys.sort();
    assert_eq!(ys, vec![0, 0, 0, 1, 1]);
    assert_eq!(d.subset(&[4, 4]).unwrap().x()[[1, 0]], 8.0);
    assert!(d.subset(&[5]).is_err());
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary bytes never panic; success implies a consistent file.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(a) = parse_idx(&bytes) {
                prop_assert_eq!(a.dims.iter().product::<usize>(), a.data.len());
                prop_assert_eq!(4 + 4 * a.dims.len() + a.data.len(), bytes.len());
            }
            let _ = parse_idx(&gzip(&bytes));
        }

        /// Well-formed files round-trip, raw and gzipped; cutting or extending the body
        /// is a format error.
        #[test]
        fn round_trip_and_length_errors(
            dims in proptest::collection::vec(1u32..5, 1..4),
            seed in any::<u8>(),
            cut in 1usize..4,
        ) {
            let len: usize = dims.iter().map(|&d| d as usize).product();
            let body: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            let bytes = idx(&dims, &body);
            let a = parse_idx(&bytes).unwrap();
            prop_assert_eq!(&a.dims, &dims.iter().map(|&d| d as usize).collect::<Vec<_>>());
            prop_assert_eq!(&a.data, &body);
            prop_assert_eq!(parse_idx(&gzip(&bytes)).unwrap(), a);
            let short = &bytes[..bytes.len() - cut.min(bytes.len())];
            let short_is_format = matches!(parse_idx(short), Err(Error::Format { .. }));
            prop_assert!(short_is_format);
            let mut long = bytes.clone();
            long.extend(std::iter::repeat_n(0u8, cut));
            let long_is_format = matches!(parse_idx(&long), Err(Error::Format { .. }));
            prop_assert!(long_is_format);
        }
    }
}
