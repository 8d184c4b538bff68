//! Hostile inputs to the library: special files, duplicates, extreme solver settings,
//! non-finite tensors. Each case is a clear error (or a documented correct result),
//! and every case that could hang runs under a timeout.
#![cfg(feature = "safetensors")]

use crate::io_common;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use io_common::{random_sd, raw_file, write};
use modelfusion::io::{
    Checkpoint, Dtype, Header, INDEX_FILE, SaveOptions, ShardIndex, read_capped, save,
};
use modelfusion::merge::{
    Average, Ema, Ensemble, EnsembleMode, Fisher, KarcherMean, Lawa, Merger, ModelStock, Slerp,
    Swa, Swag,
};
use modelfusion::solve::{REG_REL_FLOOR, Sinkhorn, sinkhorn, sinkhorn_operator};
use modelfusion::{Error, Model, StateDict};
use ndarray::{Array1, Array2, ArrayD, Axis, arr1};

/// Runs `f` on another thread and panics if it does not return within `secs` seconds.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not return within {secs} s"))
}

/// Opens `path` as a checkpoint under a timeout; returns the error message.
fn open_err(path: &Path) -> String {
    let p = path.to_path_buf();
    let shown = p.display().to_string();
    within(10, &format!("Checkpoint::open({shown})"), move || {
        Checkpoint::open(&p).map(|_| ()).unwrap_err().to_string()
    })
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo")
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

fn small_sd() -> StateDict<ArrayD<f32>> {
    random_sd(&[("a", vec![4]), ("b", vec![2, 3])], 7, 1.0)
}

fn sharded(dir: &Path) -> PathBuf {
    let p = dir.join("ck");
    save(
        &small_sd(),
        &p,
        &SaveOptions::new(Dtype::F32).with_max_shard_size(16),
    )
    .unwrap();
    assert!(p.join(INDEX_FILE).is_file());
    p
}

// ---------------------------------------------------------------- special files

#[cfg(unix)]
#[test]
fn fifo_as_checkpoint_file_is_refused_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.safetensors");
    mkfifo(&f);
    let msg = open_err(&f);
    assert!(
        msg.contains("FIFO") && msg.contains("not a regular file"),
        "{msg}"
    );
    // The same FIFO found as a directory's single file.
    let msg = open_err(dir.path());
    assert!(msg.contains("FIFO"), "{msg}");
}

#[cfg(unix)]
#[test]
fn fifo_as_shard_named_in_an_index_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = sharded(dir.path());
    let shard = std::fs::read_dir(&p)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|f| f.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    mkfifo(&shard);
    let msg = open_err(&p);
    assert!(msg.contains("FIFO"), "{msg}");
}

#[cfg(unix)]
#[test]
fn index_that_is_a_fifo_a_directory_or_dev_zero_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = sharded(dir.path());
    let idx = p.join(INDEX_FILE);
    std::fs::remove_file(&idx).unwrap();
    mkfifo(&idx);
    let msg = open_err(&p);
    assert!(
        msg.contains("FIFO") && msg.contains("checkpoint index"),
        "{msg}"
    );

    std::fs::remove_file(&idx).unwrap();
    std::fs::create_dir(&idx).unwrap();
    let msg = open_err(&p);
    assert!(msg.contains("a directory"), "{msg}");

    std::fs::remove_dir(&idx).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &idx).unwrap();
    let msg = open_err(&p);
    assert!(msg.contains("character device"), "{msg}");

    // A dangling link at the index path is an error too, not "no index".
    std::fs::remove_file(&idx).unwrap();
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &idx).unwrap();
    let msg = open_err(&p);
    assert!(msg.contains(INDEX_FILE), "{msg}");
}

#[cfg(unix)]
#[test]
fn read_capped_refuses_devices_fifos_and_oversize_files() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("cfg.yml");
    mkfifo(&fifo);
    let msg = within(10, "read_capped(fifo)", move || {
        read_capped(&fifo, 1 << 20, "merge config")
            .unwrap_err()
            .to_string()
    });
    assert!(
        msg.contains("FIFO") && msg.contains("merge config"),
        "{msg}"
    );
    let msg = within(10, "read_capped(/dev/zero)", || {
        read_capped("/dev/zero", 1 << 20, "merge config")
            .unwrap_err()
            .to_string()
    });
    assert!(msg.contains("character device"), "{msg}");
    let big = write(dir.path(), "big.yml", &vec![b'#'; 4096]);
    let msg = read_capped(&big, 4095, "merge config")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("limit of 4095 bytes"), "{msg}");
    assert_eq!(read_capped(&big, 4096, "merge config").unwrap().len(), 4096);
}

// ---------------------------------------------------------------- strict parsing

fn header_err(json: &str, data: usize) -> String {
    Header::parse(&raw_file(json, data, 0), None)
        .unwrap_err()
        .to_string()
}

#[test]
fn duplicate_metadata_tensor_names_and_fields_are_refused() {
    let msg = header_err(r#"{"__metadata__":{"a":"1"},"__metadata__":{"a":"2"}}"#, 0);
    assert!(msg.contains("duplicate `__metadata__`"), "{msg}");
    let msg = header_err(r#"{"__metadata__":{"a":"1","a":"2"}}"#, 0);
    assert!(msg.contains("duplicate key `a`"), "{msg}");
    let msg = header_err(
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        8,
    );
    assert!(
        msg.contains("`w`") && msg.contains("more than once"),
        "{msg}"
    );
    let msg = header_err(
        r#"{"w":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}"#,
        4,
    );
    assert!(
        msg.contains("`w`") && msg.contains("duplicate key `dtype`"),
        "{msg}"
    );
    // Unique names still parse, in file order.
    let ok = Header::parse(
        &raw_file(
            r#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            8,
            0,
        ),
        None,
    )
    .unwrap();
    let names: Vec<_> = ok.tensors().iter().map(|t| t.name()).collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn duplicate_weight_map_keys_are_refused() {
    let msg = ShardIndex::parse(
        br#"{"weight_map":{"a":"x.safetensors","a":"y.safetensors"}}"#,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("duplicate key `a`"), "{msg}");
    let msg = ShardIndex::parse(
        br#"{"weight_map":{"a":"x.safetensors"},"weight_map":{"b":"x.safetensors"}}"#,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("duplicate"), "{msg}");
}

#[test]
fn empty_weight_map_beside_shards_is_not_an_empty_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let p = sharded(dir.path());
    std::fs::write(p.join(INDEX_FILE), br#"{"metadata":{},"weight_map":{}}"#).unwrap();
    let msg = open_err(&p);
    assert!(
        msg.contains("lists no tensors") && msg.contains("2 *.safetensors"),
        "{msg}"
    );
}

#[test]
fn control_characters_in_tensor_and_file_names_are_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let json =
        "{\"evil\\u001b[31m\\u0000\":{\"dtype\":\"Q8\",\"shape\":[1],\"data_offsets\":[0,1]}}";
    let p = write(dir.path(), "bad\x1b[2J.safetensors", &raw_file(json, 1, 0));
    let msg = Checkpoint::open(&p).unwrap_err().to_string();
    assert!(!msg.contains('\x1b') && !msg.contains('\0'), "{msg:?}");
    assert!(
        msg.contains("evil\\u{1b}[31m\\0") && msg.contains("bad\\u{1b}[2J"),
        "{msg}"
    );
}

// ---------------------------------------------------------------- Sinkhorn

fn uniform(n: usize) -> Array1<f64> {
    Array1::from_elem(n, 1.0 / n as f64)
}

fn assert_invalid(r: modelfusion::Result<impl std::fmt::Debug>, param: &str) -> String {
    match r {
        Err(e @ Error::InvalidParameter { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("`{param}`")), "{msg}");
            msg
        }
        other => panic!("expected an invalid `{param}`, got {other:?}"),
    }
}

#[test]
fn sinkhorn_subnormal_reg_is_refused() {
    let m = Array2::from_shape_fn((4, 4), |(i, j)| (i as f64 - j as f64).abs());
    let (a, b) = (uniform(4), uniform(4));
    let msg = assert_invalid(sinkhorn(a.view(), b.view(), m.view(), 5e-324), "reg");
    assert!(msg.contains("5e-324") && msg.contains("floor"), "{msg}");
    // all-zero costs: only the absolute floor applies
    let z = Array2::<f64>::zeros((3, 3));
    assert_invalid(
        sinkhorn(uniform(3).view(), uniform(3).view(), z.view(), 5e-324),
        "reg",
    );
    let ok = sinkhorn(uniform(3).view(), uniform(3).view(), z.view(), 1e-300).unwrap();
    assert!(ok.plan.iter().all(|p| (p - 1.0 / 9.0).abs() < 1e-12));
}

#[test]
fn sinkhorn_huge_costs_are_refused_or_solved() {
    let n = 8;
    let m = Array2::from_shape_fn((n, n), |(i, j)| -1e100 * (i as f64 - j as f64).abs());
    let (a, b) = (uniform(n), uniform(n));
    let msg = assert_invalid(sinkhorn(a.view(), b.view(), m.view(), 0.01), "reg");
    assert!(msg.contains("cost scale"), "{msg}");
    // with a reg above the floor the plan is finite and meets both marginals
    let reg = 1e100;
    let ot = Sinkhorn::builder()
        .with_reg(reg)
        .build()
        .unwrap()
        .solve(a.view(), b.view(), m.view())
        .unwrap();
    assert!(ot.plan.iter().all(|p| p.is_finite()));
    for (r, want) in ot.plan.sum_axis(Axis(1)).iter().zip(&a) {
        assert!((r - want).abs() < 1e-6, "{r}");
    }
    // a cost range that overflows f64 (would loop forever in epsilon scaling)
    let m = Array2::from_shape_fn((2, 2), |(i, j)| if i == j { 1.7e308 } else { -1.7e308 });
    let msg = within(
        10,
        "epsilon-scaled sinkhorn on costs of +-1.7e308",
        move || {
            Sinkhorn::builder()
                .with_reg(1e300)
                .with_epsilon_scaling(true)
                .build()
                .unwrap()
                .solve(uniform(2).view(), uniform(2).view(), m.view())
                .unwrap_err()
                .to_string()
        },
    );
    assert!(msg.contains("`cost`") && msg.contains("overflows"), "{msg}");
}

#[test]
fn sinkhorn_extreme_warm_starts_are_refused() {
    let m = Array2::from_shape_fn((3, 3), |(i, j)| (i as f64 - j as f64).powi(2));
    let (a, b) = (uniform(3), uniform(3));
    let s = Sinkhorn::builder().with_reg(0.1).build().unwrap();
    let f = arr1(&[1e308, -1e308, 0.0]);
    let g = arr1(&[-1e308, 1e308, 0.0]);
    let msg = assert_invalid(
        s.solve_warm(a.view(), b.view(), m.view(), f.view(), g.view()),
        "f",
    );
    assert!(msg.contains("overflow"), "{msg}");
    // a moderate warm start still converges to the cold answer
    let cold = s.solve(a.view(), b.view(), m.view()).unwrap();
    let warm = s
        .solve_warm(
            a.view(),
            b.view(),
            m.view(),
            (&cold.f + 5.0).view(),
            (&cold.g - 5.0).view(),
        )
        .unwrap();
    assert!((&warm.plan - &cold.plan).iter().all(|d| d.abs() < 1e-8));
}

#[test]
fn sinkhorn_operator_tiny_tau_is_refused() {
    let s = Array2::from_shape_fn((4, 4), |(i, j)| ((i * 7 + j * 3) % 5) as f64);
    let msg = assert_invalid(sinkhorn_operator(s.view(), 1e-300, 20), "tau");
    assert!(msg.contains("1e-300"), "{msg}");
    // at the floor's scale the result is still a proper soft permutation
    let p = sinkhorn_operator(s.view(), REG_REL_FLOOR * 4.0 * 1e3, 50).unwrap();
    for c in p.sum_axis(Axis(0)) {
        assert!((c - 1.0).abs() < 1e-9, "{c}");
    }
}

// ---------------------------------------------------------------- mergers

type Sd = StateDict<ArrayD<f64>>;

fn sd(vals: &[f64]) -> Sd {
    StateDict::from_pairs([
        ("ok", arr1(&[1.0, 2.0]).into_dyn()),
        ("w", arr1(vals).into_dyn()),
    ])
    .unwrap()
}

fn assert_nonfinite<T: std::fmt::Debug>(r: modelfusion::Result<T>, mentions: &[&str]) {
    match r {
        Err(e @ Error::NonFinite { .. }) => {
            let msg = e.to_string();
            for m in mentions {
                assert!(msg.contains(m), "`{m}` not in: {msg}");
            }
        }
        other => panic!("expected a non-finite error, got {other:?}"),
    }
}

#[test]
fn model_stock_names_the_model_with_a_nan() {
    let base = sd(&[0.0, 0.0, 0.0]);
    let a = sd(&[1.0, 0.5, 0.0]);
    let b = sd(&[0.5, f64::NAN, 1.0]);
    let r = ModelStock::new(base.clone()).merge(&[&a, &b]);
    assert_nonfinite(r, &["`w`", "model 1", "element 1"]);
    let bad_base = sd(&[0.0, f64::INFINITY, 0.0]);
    let r = ModelStock::new(bad_base).merge(&[&a, &sd(&[0.5, 0.2, 1.0])]);
    assert_nonfinite(r, &["`w`", "the base model"]);
}

#[test]
fn averages_refuse_nan_inputs_and_overflowing_weights() {
    let a = sd(&[1.0, 2.0, 3.0]);
    let b = sd(&[1.0, f64::NAN, 3.0]);
    assert_nonfinite(Average::uniform().merge(&[&a, &b]), &["`w`", "model 1"]);
    let w = Average::weighted(vec![1e308, 1e308], false).unwrap();
    let e = w.merge(&[&a, &a]).unwrap_err().to_string();
    assert!(
        e.contains("`weights`") && e.contains("`ok`") && e.contains("overflow"),
        "{e}"
    );
    // streaming averages refuse the model before it touches the state
    let mut swa = Swa::new();
    swa.update(&a).unwrap();
    assert_nonfinite(swa.update(&b), &["`w`", "SWA update 1"]);
    assert_eq!(swa.average().unwrap(), &a);
    let mut ema = Ema::new(0.9).unwrap();
    assert_nonfinite(ema.update(&b), &["`w`", "EMA"]);
    let mut lawa = Lawa::new(2).unwrap();
    assert_nonfinite(lawa.update(&b), &["`w`", "LAWA"]);
}

#[test]
fn swag_refuses_non_finite_samples_and_squares() {
    let mut swag = Swag::new(2).unwrap();
    swag.update(&sd(&[1.0, 2.0, 3.0])).unwrap();
    swag.update(&sd(&[2.0, 1.0, 5.0])).unwrap();
    swag.update(&sd(&[0.0, 4.0, 2.0])).unwrap();
    assert!(
        swag.sample(1, 1.0)
            .unwrap()
            .get("w")
            .unwrap()
            .iter()
            .all(|x| x.is_finite())
    );
    let e = swag.sample(1, 1e308).unwrap_err().to_string();
    assert!(e.contains("`scale`") && e.contains("overflow"), "{e}");
    let mut swag = Swag::new(2).unwrap();
    assert_nonfinite(
        swag.update(&sd(&[1e200, 0.0, 0.0])),
        &["too large to square"],
    );
}

#[test]
fn slerp_karcher_fisher_and_ensemble_name_non_finite_inputs() {
    let a = sd(&[1.0, 2.0, 3.0]);
    let b = sd(&[3.0, f64::NEG_INFINITY, 1.0]);
    assert_nonfinite(
        Slerp::new(0.5).unwrap().merge(&[&a, &b]),
        &["`w`", "model 1"],
    );
    assert_nonfinite(KarcherMean::uniform().merge(&[&b, &a]), &["`w`", "model 0"]);
    let fisher = Fisher::new(vec![sd(&[1.0; 3]), sd(&[1.0; 3])]).unwrap();
    assert_nonfinite(fisher.merge(&[&a, &b]), &["`w`", "model 1"]);
    let ok = arr1(&[0.0, 1.0]).insert_axis(Axis(0));
    let bad = arr1(&[f64::NAN, 1.0]).insert_axis(Axis(0));
    let r = Ensemble::new(EnsembleMode::Probabilities).combine(&[ok.view(), bad.view()]);
    assert_nonfinite(r, &["outputs of model 1", "[0, 0]"]);
}

#[cfg(feature = "linalg")]
#[test]
fn regmean_names_a_non_finite_weight() {
    use modelfusion::merge::RegMean;
    let g = std::collections::BTreeMap::from([("w".to_string(), Array2::<f64>::eye(3))]);
    let rm = RegMean::new(vec![g.clone(), g], 0.9).unwrap();
    let a: Sd = StateDict::from_pairs([("w", Array2::<f64>::eye(3).into_dyn())]).unwrap();
    let mut bad = Array2::<f64>::eye(3);
    bad[[1, 2]] = f64::NAN;
    let b: Sd = StateDict::from_pairs([("w", bad.into_dyn())]).unwrap();
    assert_nonfinite(rm.merge(&[&a, &b]), &["`w`", "model 1"]);
}

#[test]
fn model_algebra_refuses_non_finite_settings_and_overflow() {
    let a = sd(&[1.0, 2.0, 3.0]);
    let e = a.scale(f64::NAN).unwrap_err().to_string();
    assert!(e.contains("`alpha`") && e.contains("NaN"), "{e}");
    let e = a.scale(1e308).unwrap_err().to_string();
    assert!(e.contains("`alpha`") && e.contains("`ok`"), "{e}");
    let e = a
        .lerp(&sd(&[3.0, 1.0, 1.0]), 1e308)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`t`") && e.contains("overflow"), "{e}");
    let e = Sd::weighted_sum(&[&a, &a], &[1e308, 1e308])
        .unwrap_err()
        .to_string();
    assert!(e.contains("`weights`"), "{e}");
    // a NaN already in the data is carried by scale (documented), not blamed on alpha
    assert!(
        sd(&[f64::NAN, 1.0, 1.0])
            .scale(2.0)
            .unwrap()
            .get("w")
            .unwrap()[[0]]
        .is_nan()
    );
}
