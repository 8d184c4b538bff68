//! The `modelfusion` binary on hostile inputs: devices, FIFOs and oversize configs are
//! refused at once, non-finite merged output is refused unless `--allow-nonfinite`, and
//! float16 overflow is reported with a count. Every run is bounded by a timeout.
#![cfg(feature = "cli")]

use crate::io_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use io_common::{random_sd, raw_file, write};
use modelfusion::io::{Dtype, SaveOptions, load, save};
use modelfusion::{Model, StateDict};
use ndarray::ArrayD;

/// Runs the binary with `args` in `dir`; kills it and fails if it runs past `secs`.
/// Returns (success, stderr).
fn run(dir: &Path, args: &[&str], secs: u64) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelfusion"))
        .current_dir(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("modelfusion {args:?} did not finish within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(unix)]
#[test]
fn merge_dev_zero_errors_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, err) = run(dir.path(), &["merge", "/dev/zero", "out"], 10);
    assert!(!ok);
    assert!(
        err.contains("merge config") && err.contains("character device"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists());
}

#[cfg(unix)]
#[test]
fn merge_config_that_is_a_fifo_errors_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("merge.yml");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let (ok, err) = run(dir.path(), &["merge", "merge.yml", "out"], 10);
    assert!(!ok);
    assert!(err.contains("FIFO"), "{err}");
}

#[test]
fn oversize_config_is_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(dir.path().join("merge.yml")).unwrap();
    f.set_len(300 << 20).unwrap(); // sparse: costs no disk
    let start = Instant::now();
    let (ok, err) = run(dir.path(), &["merge", "merge.yml", "out"], 10);
    assert!(!ok);
    assert!(err.contains("above the limit of 16777216 bytes"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn control_characters_in_names_are_escaped_on_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let json =
        "{\"x\\u001b]0;pwned\\u0007\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,3]}}";
    write(dir.path(), "m.safetensors", &raw_file(json, 3, 0));
    let (ok, err) = run(dir.path(), &["inspect", "m.safetensors"], 10);
    assert!(!ok);
    assert!(!err.contains('\x1b') && !err.contains('\x07'), "{err:?}");
    assert!(err.contains("x\\u{1b}]0;pwned\\u{7}"), "{err}");
}

fn one_model(dir: &Path, name: &str, scale: f32) {
    let sd = random_sd(&[("w", vec![64]), ("v", vec![8, 4])], 3, scale);
    save(&sd, dir.join(name), &SaveOptions::new(Dtype::F32)).unwrap();
}

#[test]
fn float16_overflow_is_reported_with_a_count() {
    let dir = tempfile::tempdir().unwrap();
    one_model(dir.path(), "m0", 1.0);
    let m0: StateDict<ArrayD<f32>> = load(dir.path().join("m0")).unwrap();
    let weight = 1e5f32;
    let want: usize = m0
        .names()
        .map(|n| {
            m0.get(n)
                .unwrap()
                .iter()
                .filter(|&&x| half::f16::from_f32(x * weight).is_infinite())
                .count()
        })
        .sum();
    assert!(want > 0);
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: m0\n    parameters: {{weight: {weight}}}\nparameters: {{normalize: false}}\nout_dtype: float16\n"
    );
    std::fs::write(dir.path().join("merge.yml"), yaml).unwrap();
    let (ok, err) = run(
        dir.path(),
        &["merge", "merge.yml", "out", "--no-progress"],
        60,
    );
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!(
            "warning: {want} merged value(s) exceed the float16 maximum (65504)"
        )),
        "{err}"
    );
    // within range: no warning
    let yaml = "merge_method: linear\nmodels:\n  - model: m0\n    parameters: {weight: 1}\nout_dtype: float16\n";
    std::fs::write(dir.path().join("merge.yml"), yaml).unwrap();
    let (ok, err) = run(
        dir.path(),
        &["merge", "merge.yml", "out2", "--no-progress"],
        60,
    );
    assert!(ok, "{err}");
    assert!(!err.contains("warning"), "{err}");
}

#[test]
fn non_finite_output_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    one_model(dir.path(), "base", 1.0);
    one_model(dir.path(), "m1", 2.0);
    let yaml = "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: m1\n    parameters: {weight: 1}\nparameters: {lambda: 1e308}\ndtype: float32\n";
    std::fs::write(dir.path().join("merge.yml"), yaml).unwrap();
    let (ok, err) = run(
        dir.path(),
        &["merge", "merge.yml", "out", "--no-progress"],
        60,
    );
    assert!(!ok, "{err}");
    assert!(
        err.contains("lambda") || err.contains("--allow-nonfinite"),
        "the error names the setting or the flag: {err}"
    );
    let (ok, err) = run(
        dir.path(),
        &[
            "merge",
            "merge.yml",
            "out2",
            "--no-progress",
            "--allow-nonfinite",
        ],
        60,
    );
    if ok {
        let out: StateDict<ArrayD<f32>> = load(dir.path().join("out2")).unwrap();
        assert!(
            out.names()
                .any(|n| out.get(n).unwrap().iter().any(|x| !x.is_finite()))
        );
    } else {
        // the method itself refuses the setting (a library-level guard), naming it
        assert!(err.contains("lambda"), "{err}");
    }
}
