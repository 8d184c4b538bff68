//! The first programs a user writes against the crate (issue 16): code generic over the
//! element type, `?` on `std::io` in functions returning `modelfusion::Result`, a `main`
//! that returns a `Report`, typed views inside a closure objective, and `StateDict`
//! editing. A regression in any of these patterns is a compile error here, or a failed
//! assertion.

use std::path::Path;

use modelfusion::{Dtype, Error, Model, Objective, RawTensor, Report, Result, Scalar, StateDict};
use modelfusion::{StateDictF64, Tensor};
use ndarray::{ArrayD, IxDyn, arr1, arr2};

/// Generic over `T: Scalar`, with no bound on `ArrayD<T>`: reorders the rows of a
/// weight matrix and returns the reordered tensor with its distance to the original.
fn permute_rows<T: Scalar>(w: &ArrayD<T>, perm: &[usize]) -> Result<(ArrayD<T>, f64)> {
    let p = w.take(0, perm)?;
    let mut diff = p.clone();
    diff.axpy(T::from_f64_lossy(-1.0), w)?;
    Ok((p, diff.norm()))
}

/// Generic over `T: Scalar` on a whole model: `StateDict<ArrayD<T>>` is a `Model` too.
fn midpoint<T: Scalar>(a: &StateDict<ArrayD<T>>, b: &StateDict<ArrayD<T>>) -> Result<f64> {
    let mid = a.lerp(b, 0.5)?;
    mid.dot(a)
}

/// Generic mutation through a typed view: zeroes row `r` of a matrix.
fn zero_row<T: Scalar>(w: &mut ArrayD<T>, r: usize) -> Result<()> {
    w.as_matrix_mut()?.row_mut(r).fill(T::zero());
    Ok(())
}

fn check_generic<T: Scalar>() {
    let w: ArrayD<T> = Tensor::from_shape_vec(
        &[3, 2],
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .map(|&x| T::from_f64_lossy(x))
            .collect(),
    )
    .unwrap();
    let (p, dist) = permute_rows(&w, &[2, 0, 1]).unwrap();
    assert_eq!(
        p.as_matrix().unwrap().row(0).to_vec(),
        [T::from_f64_lossy(5.0), T::from_f64_lossy(6.0)],
        "{}",
        T::NAME
    );
    // Rows differ by (4,4), (-2,-2), (-2,-2): squared norm 32 + 8 + 8.
    assert!((dist - 48f64.sqrt()).abs() < 1e-6, "{} {dist}", T::NAME);
    assert!(permute_rows(&w, &[3, 0, 1]).is_err());

    let a = StateDict::from_pairs([("w", w.clone())]).unwrap();
    let b = StateDict::from_pairs([("w", p)]).unwrap();
    // mid = (1+5, 2+6, 3+1, 4+2, 5+3, 6+4) / 2 = (3, 4, 2, 3, 4, 5); mid . w = 79.
    assert!((midpoint(&a, &b).unwrap() - 79.0).abs() < 1e-6);

    let mut z = w;
    zero_row(&mut z, 1).unwrap();
    assert_eq!(z.norm_sq(), 1.0 + 4.0 + 25.0 + 36.0);
}

#[test]
fn generic_code_over_scalar_needs_no_extra_bound() {
    check_generic::<f32>();
    check_generic::<f64>();
}

#[test]
fn typed_views_name_the_rank_and_the_shape() {
    let conv = ArrayD::<f32>::zeros(IxDyn(&[8, 3, 3, 3]));
    let e = conv.as_matrix().unwrap_err();
    assert!(matches!(e, Error::InvalidParameter { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "invalid value for `tensor`: as_matrix needs a rank-2 tensor, got rank 4 (shape [8, 3, 3, 3])"
    );
    let mut m = arr2(&[[1.0f64, 2.0]]).into_dyn();
    let e = m.as_vector_mut().unwrap_err().to_string();
    assert!(
        e.contains("as_vector_mut needs a rank-1 tensor, got rank 2 (shape [1, 2])"),
        "{e}"
    );
    // A view of a transposed (non-contiguous) array keeps its layout.
    let t = arr2(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]])
        .reversed_axes()
        .into_dyn();
    assert_eq!(t.as_matrix().unwrap().row(2).to_vec(), [3.0, 6.0]);
    assert_eq!(arr1(&[1.0f32, 2.0]).into_dyn().as_vector().unwrap()[1], 2.0);
}

/// A closure objective over the model's own layer: `y = W x + b`, loss `|y|^2`.
#[test]
fn closure_objective_uses_typed_views() {
    let loss = |m: &StateDictF64| -> Result<f64> {
        let w = m.require("fc.weight", "the model")?.as_matrix()?;
        let b = m.require("fc.bias", "the model")?.as_vector()?;
        let y = w.dot(&arr1(&[1.0, 2.0])) + b;
        Ok(y.mapv(|v| v * v).sum())
    };
    fn evaluate<M: Model>(objective: &impl Objective<M>, model: &M) -> Result<f64> {
        objective.loss(model)
    }
    let good = StateDict::from_pairs([
        (
            "fc.weight",
            arr2(&[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).into_dyn(),
        ),
        ("fc.bias", arr1(&[0.0, 1.0, -1.0]).into_dyn()),
    ])
    .unwrap();
    // y = (1, 3, 2).
    assert_eq!(evaluate(&loss, &good).unwrap(), 14.0);
    let flat = StateDict::from_pairs([
        ("fc.weight", arr1(&[1.0, 0.0]).into_dyn()),
        ("fc.bias", arr1(&[0.0]).into_dyn()),
    ])
    .unwrap();
    let e = evaluate(&loss, &flat).unwrap_err().to_string();
    assert!(e.contains("rank-2") && e.contains("[2]"), "{e}");
}

/// `?` on `std::io` in a function returning `modelfusion::Result`.
fn file_len(path: &Path) -> Result<usize> {
    Ok(std::fs::read(path)?.len())
}

#[test]
fn question_mark_on_std_io() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("five.bin");
    std::fs::write(&path, b"12345").unwrap();
    assert_eq!(file_len(&path).unwrap(), 5);
    match file_len(&dir.path().join("missing.bin")) {
        Err(Error::IoUnnamed(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
        other => panic!("expected Error::IoUnnamed, got {other:?}"),
    }
}

/// Shaped like `fn main() -> Result<(), Report>`: reads a file, builds a model from its
/// bytes, and asks for a matrix where there is a vector.
fn main_like(path: &Path) -> std::result::Result<(), Report> {
    let bytes = std::fs::read(path)?;
    let v: ArrayD<f32> = Tensor::from_shape_vec(
        &[bytes.len()],
        bytes.iter().map(|&b| f32::from(b)).collect(),
    )?;
    let sd = StateDict::from_pairs([("w", v)])?;
    sd.require("w", "the model")?.as_matrix()?;
    Ok(())
}

#[test]
fn report_debug_is_the_display_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("three.bin");
    std::fs::write(&path, b"abc").unwrap();
    let r = main_like(&path).unwrap_err();
    let expected =
        "invalid value for `tensor`: as_matrix needs a rank-2 tensor, got rank 1 (shape [3])";
    assert_eq!(format!("{r:?}"), expected);
    assert_eq!(r.to_string(), expected);
    assert!(matches!(r.error(), Error::InvalidParameter { .. }));

    let r = main_like(&dir.path().join("missing.bin")).unwrap_err();
    let debug = format!("{r:?}");
    assert!(debug.starts_with("I/O error: "), "{debug}");
    assert!(
        !debug.contains("IoUnnamed") && !debug.contains("Caused by"),
        "{debug}"
    );
    assert!(format!("{r:#?}").starts_with("IoUnnamed("));
}

/// An error whose message does not include its cause: the report lists the chain.
#[derive(Debug)]
struct BadValue(std::num::ParseIntError);

impl std::fmt::Display for BadValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("unreadable value for `shard_count`")
    }
}

impl std::error::Error for BadValue {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[test]
fn report_lists_causes_not_already_shown() {
    let parse = "x1".parse::<u32>().unwrap_err();
    let e = Error::Io {
        path: "merge.yaml".into(),
        source: std::io::Error::other(BadValue(parse)),
    };
    assert_eq!(
        format!("{:?}", Report::from(e)),
        "I/O error on merge.yaml: unreadable value for `shard_count`\n\n\
         Caused by:\n    invalid digit found in string"
    );
}

#[test]
fn state_dict_editing() {
    let mut sd = StateDict::from_pairs([
        ("module.fc1.weight", arr2(&[[1.0f32, 2.0]]).into_dyn()),
        ("module.fc1.bias", arr1(&[0.5f32]).into_dyn()),
        ("module.bn.weight", arr1(&[1.0f32]).into_dyn()),
        ("module.fc2.weight", arr2(&[[3.0f32]]).into_dyn()),
    ])
    .unwrap();
    let steps = RawTensor::new(Dtype::I64, vec![], 7i64.to_le_bytes().to_vec()).unwrap();
    sd.insert_raw("module.bn.num_batches_tracked", steps)
        .unwrap();
    assert!(
        sd.insert_raw(
            "module.fc1.bias",
            RawTensor::new(Dtype::U8, vec![1], vec![0]).unwrap()
        )
        .is_err()
    );
    assert!(sd.remove("module.fc2.weight"));
    assert!(!sd.remove("module.fc2.weight"));
    sd.rename_with(|n| n.strip_prefix("module.").map(str::to_string))
        .unwrap();
    sd.retain(|n| !n.starts_with("bn.") || n.ends_with("num_batches_tracked"));
    assert_eq!(sd.names().collect::<Vec<_>>(), ["fc1.weight", "fc1.bias"]);
    let raw = sd.raw("bn.num_batches_tracked").unwrap();
    assert_eq!(raw.dtype(), Dtype::I64);
    assert_eq!(sd.raw_tensors().count(), 1);
    assert_eq!(
        sd.require("fc1.weight", "the edited model")
            .unwrap()
            .as_matrix()
            .unwrap()[(0, 1)],
        2.0
    );
}

#[cfg(feature = "safetensors")]
mod checkpoint {
    use std::path::Path;

    use modelfusion::io::{Dtype, IoScalar, SaveOptions, load, save};
    use modelfusion::{Model, Result, StateDict, Tensor};
    use ndarray::{ArrayD, arr1, arr2};

    /// Generic over `T: IoScalar`, with no bound on `ArrayD<T>`: loads a checkpoint in
    /// the caller's element type and returns its classifier's row norms.
    fn row_norms<T: IoScalar>(dir: &Path) -> Result<Vec<f64>> {
        let sd: StateDict<ArrayD<T>> = load(dir)?;
        let w = sd.require("fc.weight", "the checkpoint")?.as_matrix()?;
        Ok(w.rows()
            .into_iter()
            .map(|r| {
                r.iter()
                    .map(|x| x.to_f64_lossless().powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect())
    }

    /// Generic save and reload in the caller's element type.
    fn scaled_copy<T: IoScalar>(src: &Path, dst: &Path, alpha: f64) -> Result<f64> {
        let sd: StateDict<ArrayD<T>> = load(src)?;
        save(&sd.scale(alpha)?, dst, &SaveOptions::new(Dtype::F32))?;
        let back: StateDict<ArrayD<T>> = load(dst)?;
        Ok(back.norm())
    }

    #[test]
    fn generic_over_io_scalar_loads_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDict::from_pairs([
            ("fc.weight", arr2(&[[3.0f32, 4.0], [0.0, 1.0]]).into_dyn()),
            ("fc.bias", arr1(&[0.0f32, 0.0]).into_dyn()),
        ])
        .unwrap();
        save(&sd, dir.path().join("a"), &SaveOptions::new(Dtype::BF16)).unwrap();
        let a = dir.path().join("a");
        assert_eq!(row_norms::<f32>(&a).unwrap(), [5.0, 1.0]);
        assert_eq!(row_norms::<f64>(&a).unwrap(), [5.0, 1.0]);
        // |(3, 4, 0, 1)| = sqrt(26), doubled.
        let n = scaled_copy::<f64>(&a, &dir.path().join("b"), 2.0).unwrap();
        assert!((n - 2.0 * 26f64.sqrt()).abs() < 1e-12, "{n}");
        let e = row_norms::<f32>(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
