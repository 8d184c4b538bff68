//! Crash safety of everything the crate writes (issue 12): merges killed with SIGKILL at
//! several points, a full disk (a small tmpfs, skipped where it cannot be mounted), a
//! failing re-merge over a good result, links in the output directory, and the writer's
//! shape rule. Afterwards the output directory loads either the previous result or the
//! new one, complete; no temporary opens as a checkpoint; the inputs are unchanged.
#![cfg(all(feature = "cli", unix))]

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use modelfusion::io::{Checkpoint, CheckpointWriter, Dtype, SaveOptions, save};
use modelfusion::{RawTensor, StateDict};
use ndarray::ArrayD;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_modelfusion"))
}

/// A model of `n` tensors of `rows x 1024` f32 values derived from `seed`.
fn model(n: usize, rows: usize, seed: f32) -> StateDict<ArrayD<f32>> {
    StateDict::from_pairs((0..n).map(|i| {
        let t = ArrayD::from_shape_fn(vec![rows, 1024], |ix| {
            seed + (i * 7 + ix[0] * 3 + ix[1]) as f32 * 1e-3
        });
        (format!("model.layers.{i}.mlp.weight"), t)
    }))
    .unwrap()
}

/// Writes the inputs `a` (with config.json and tokenizer.json) and `b` under `root`.
fn inputs(root: &Path, n: usize, rows: usize, tokenizer_bytes: usize) {
    save(
        &model(n, rows, 0.0),
        root.join("a"),
        &SaveOptions::new(Dtype::F32),
    )
    .unwrap();
    save(
        &model(n, rows, 1.0),
        root.join("b"),
        &SaveOptions::new(Dtype::F32),
    )
    .unwrap();
    std::fs::write(
        root.join("a/config.json"),
        r#"{"architectures":["X"],"torch_dtype":"float32"}"#,
    )
    .unwrap();
    std::fs::write(root.join("a/tokenizer.json"), vec![b'x'; tokenizer_bytes]).unwrap();
}

/// Writes a linear merge config of `a` and `b` with weight `w` on `a` as `name`.
fn config(root: &Path, name: &str, w: f64) -> PathBuf {
    let p = root.join(name);
    std::fs::write(
        &p,
        format!(
            "merge_method: linear\nmodels:\n  - {{model: ./a, parameters: {{weight: {w}}}}}\n  - {{model: ./b, parameters: {{weight: {}}}}}\nout_dtype: float32\n",
            1.0 - w
        ),
    )
    .unwrap();
    p
}

fn merge_cmd(root: &Path, config: &str, out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.current_dir(root)
        .args(["merge", config])
        .arg(out)
        .args(["--no-progress"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Runs a merge to completion: (success, stderr).
fn merge(root: &Path, config: &str, out: &Path, extra: &[&str]) -> (bool, String) {
    let o = merge_cmd(root, config, out, extra).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// A digest of the checkpoint at `path` (every tensor's name, dtype, shape and bytes),
/// independent of how it is sharded; `None` when it does not open.
fn digest(path: &Path) -> Option<u64> {
    let ck = Checkpoint::open(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut names: Vec<&str> = ck.tensors().iter().map(|t| t.name()).collect();
    names.sort_unstable();
    for n in names {
        let t = ck.info(n)?;
        (n, t.dtype().as_str(), t.shape()).hash(&mut h);
        ck.raw(n).ok()?.hash(&mut h);
    }
    Some(h.finish())
}

/// Every file's bytes under `dir` (recursively), by path.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        }
    }
    out
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Whether every tensor of `part` is, byte for byte, the same tensor of `whole`.
fn is_part_of(part: &Checkpoint, whole: &Path) -> bool {
    let Ok(whole) = Checkpoint::open(whole) else {
        return false;
    };
    part.tensors()
        .iter()
        .all(|t| whole.raw(t.name()).ok() == part.raw(t.name()).ok())
}

/// No temporary opens as a checkpoint, even under a `.safetensors` name, unless it is a
/// complete, fsynced shard waiting for its rename (a kill during the commit): then it
/// is, byte for byte, part of one of the `complete` results.
fn assert_no_partial_opens(dir: &Path, complete: &[&Path]) {
    for name in names(dir) {
        if !name.contains(".mf-tmp-") {
            continue;
        }
        let p = dir.join(&name);
        let renamed = dir.join("renamed-by-hand.safetensors");
        std::fs::copy(&p, &renamed).unwrap();
        for q in [&p, &renamed] {
            if let Ok(ck) = Checkpoint::open(q) {
                assert!(
                    complete.iter().any(|w| is_part_of(&ck, w)),
                    "temporary {name} opens and is not a complete shard"
                );
            }
        }
        std::fs::remove_file(&renamed).unwrap();
    }
}

fn assert_clean(dir: &Path) {
    let left: Vec<String> = names(dir)
        .into_iter()
        .filter(|n| n.contains(".mf-tmp-") || n.starts_with(".mf-old-"))
        .collect();
    assert!(
        left.is_empty(),
        "left behind in {}: {left:?}",
        dir.display()
    );
}

#[test]
fn killed_merges_leave_the_old_or_the_new_result() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    // Two inputs of 24 MB each: a merge takes a few hundred milliseconds.
    inputs(root, 12, 512, 1 << 20);
    config(root, "half.yml", 0.5);
    config(root, "tilt.yml", 0.3);
    let before = snapshot(&root.join("a"));
    let before_b = snapshot(&root.join("b"));
    let shard = ["--max-shard-size", "8M"];
    // The two possible results, each computed once without interruption.
    let (ok, err) = merge(root, "half.yml", &root.join("ref-half"), &[]);
    assert!(ok, "{err}");
    let (ok, err) = merge(root, "tilt.yml", &root.join("ref-tilt"), &shard);
    assert!(ok, "{err}");
    let d_half = digest(&root.join("ref-half")).unwrap();
    let d_tilt = digest(&root.join("ref-tilt")).unwrap();
    assert_ne!(d_half, d_tilt);
    let out = root.join("out");
    let (ok, err) = merge(root, "half.yml", &out, &shard);
    assert!(ok, "{err}");

    let mut interrupted = 0;
    let mut saw_temps = 0;
    for (k, delay_ms) in [0u64, 15, 40, 80, 130, 200, 300, 450]
        .into_iter()
        .enumerate()
    {
        let current = digest(&out).expect("the output loads before the run");
        let (target_cfg, target) = if current == d_half {
            ("tilt.yml", d_tilt)
        } else {
            ("half.yml", d_half)
        };
        // Alternate the layout: same shard names (3 shards) or one file.
        let extra: &[&str] = if k % 2 == 0 { &shard } else { &[] };
        let mut child = merge_cmd(root, target_cfg, &out, extra).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let finished = child.try_wait().unwrap().is_some();
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
        let now = digest(&out);
        assert!(
            now == Some(current) || now == Some(target),
            "after a kill at {delay_ms} ms the output is neither the old nor the new result: {:?}",
            names(&out)
        );
        if now == Some(current) && !finished {
            interrupted += 1;
        }
        if names(&out).iter().any(|n| n.contains(".mf-tmp-")) {
            saw_temps += 1;
        }
        assert_no_partial_opens(&out, &[&root.join("ref-half"), &root.join("ref-tilt")]);
    }
    eprintln!("{interrupted} of 8 kills interrupted a merge; {saw_temps} left temporaries");
    assert!(interrupted > 0, "no kill landed during a merge");
    // The next run completes and removes the killed runs' temporaries.
    let (ok, err) = merge(root, "tilt.yml", &out, &shard);
    assert!(ok, "{err}");
    assert_eq!(digest(&out), Some(d_tilt));
    assert_clean(&out);
    assert_eq!(snapshot(&root.join("a")), before, "input a changed");
    assert_eq!(snapshot(&root.join("b")), before_b, "input b changed");
}

#[test]
fn failing_remerge_keeps_the_previous_result() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    inputs(root, 6, 8, 64);
    config(root, "half.yml", 0.5);
    let out = root.join("out");
    let (ok, err) = merge(root, "half.yml", &out, &["--max-shard-size", "64K"]);
    assert!(ok, "{err}");
    let good = digest(&out).unwrap();
    let good_files = snapshot(&out);
    // A third input whose last tensor is NaN: the re-merge fails after writing others.
    let last = "model.layers.5.mlp.weight";
    let bad = StateDict::from_pairs(model(6, 8, 2.0).iter().map(|(n, t)| {
        let t = if n == last {
            t.mapv(|_| f32::NAN)
        } else {
            t.clone()
        };
        (n.to_string(), t)
    }))
    .unwrap();
    save(&bad, root.join("nan"), &SaveOptions::new(Dtype::F32)).unwrap();
    std::fs::write(
        root.join("bad.yml"),
        "merge_method: linear\nmodels:\n  - {model: ./a, parameters: {weight: 0.5}}\n  - {model: ./nan, parameters: {weight: 0.5}}\n",
    )
    .unwrap();
    for extra in [&["--max-shard-size", "64K"][..], &[]] {
        let (ok, err) = merge(root, "bad.yml", &out, extra);
        assert!(!ok && err.contains(last), "{err}");
        assert_eq!(digest(&out), Some(good));
        assert_eq!(snapshot(&out), good_files, "the previous result changed");
        assert_clean(&out);
    }
    // Layout changes replace the previous result whole, with no stale shard left.
    config(root, "tilt.yml", 0.3);
    let (ok, err) = merge(root, "tilt.yml", &out, &[]);
    assert!(ok, "{err}");
    let tilt = digest(&out).unwrap();
    assert_ne!(tilt, good);
    assert_eq!(
        names(&out),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    let (ok, err) = merge(root, "half.yml", &out, &["--max-shard-size", "64K"]);
    assert!(ok, "{err}");
    assert_eq!(digest(&out), Some(good));
    assert!(!out.join("model.safetensors").exists());
    assert_clean(&out);
}

#[test]
fn links_in_the_output_are_replaced_not_written_through() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    inputs(root, 4, 8, 64);
    config(root, "half.yml", 0.5);
    let before = snapshot(&root.join("a"));
    for (kind, out) in [
        ("hard", root.join("out-hard")),
        ("sym", root.join("out-sym")),
    ] {
        std::fs::create_dir(&out).unwrap();
        for name in names(&root.join("a")) {
            let src = root.join("a").join(&name);
            if kind == "hard" {
                std::fs::hard_link(&src, out.join(&name)).unwrap(); // cp -al
            } else {
                std::os::unix::fs::symlink(&src, out.join(&name)).unwrap(); // cp -as
            }
        }
        for extra in [&[][..], &["--max-shard-size", "64K"]] {
            let (ok, err) = merge(root, "half.yml", &out, extra);
            assert!(ok, "{kind}: {err}");
            assert_eq!(snapshot(&root.join("a")), before, "{kind}: input a changed");
            assert!(digest(&out).is_some());
            let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
            assert!(cfg.contains("float32"), "{cfg}");
            assert_eq!(
                std::fs::read(out.join("tokenizer.json")).unwrap(),
                vec![b'x'; 64]
            );
            for name in names(&out) {
                let m = std::fs::symlink_metadata(out.join(&name)).unwrap();
                assert!(!m.is_symlink(), "{kind}: {name} is still a link");
            }
            assert_clean(&out);
        }
    }
    // Permuted (and aligned) checkpoints and their side files take the same path.
    let mlp = root.join("mlp");
    let shapes = [
        ("fc1.weight", vec![4, 3]),
        ("fc1.bias", vec![4]),
        ("fc2.weight", vec![2, 4]),
        ("fc2.bias", vec![2]),
    ];
    let sd = StateDict::from_pairs(
        shapes
            .into_iter()
            .map(|(n, s)| (n, ArrayD::from_shape_fn(s, |ix| (ix[0] * 5 + 1) as f32))),
    )
    .unwrap();
    save(&sd, &mlp, &SaveOptions::new(Dtype::F32)).unwrap();
    std::fs::write(mlp.join("tokenizer.json"), "{}").unwrap();
    let before = snapshot(&mlp);
    let out = root.join("out-permute");
    std::fs::create_dir(&out).unwrap();
    for name in names(&mlp) {
        std::os::unix::fs::symlink(mlp.join(&name), out.join(&name)).unwrap();
    }
    let o = bin()
        .arg("permute")
        .arg(&mlp)
        .args(["--seed", "1", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(snapshot(&mlp), before, "permute changed its input");
    assert_ne!(digest(&out), digest(&mlp));
    for name in names(&out) {
        assert!(
            !std::fs::symlink_metadata(out.join(&name))
                .unwrap()
                .is_symlink()
        );
    }
    assert_clean(&out);
}

/// A small tmpfs mounted for the test (root only); unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, bytes: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_keeps_the_previous_result() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    // Weights of 1 MiB per model and a 1 MiB tokenizer.
    inputs(root, 4, 64, 1 << 20);
    config(root, "half.yml", 0.5);
    config(root, "tilt.yml", 0.3);
    let before = snapshot(&root.join("a"));
    for (what, size) in [("weights", 2_600_000u64), ("side files", 3_400_000)] {
        let Some(fs) = Tmpfs::mount(&root.join(format!("small-{size}")), size) else {
            eprintln!(
                "skipping full_disk_keeps_the_previous_result: cannot mount a tmpfs (needs root)"
            );
            return;
        };
        let out = fs.0.join("out");
        let (ok, err) = merge(root, "half.yml", &out, &[]);
        assert!(ok, "{err}");
        let good = snapshot(&out);
        // Room for some of the new result next to the old one, not all of it.
        let (ok, err) = merge(root, "tilt.yml", &out, &[]);
        assert!(!ok, "{what}: a merge onto a full disk succeeded");
        assert!(err.contains(&*fs.0.to_string_lossy()), "{what}: {err}");
        assert_eq!(snapshot(&out), good, "{what}: the previous result changed");
        assert_clean(&out);
        // Into an empty directory: nothing is left at all.
        let fresh = fs.0.join("fresh");
        let (ok, _) = merge(root, "tilt.yml", &fresh, &[]);
        assert!(!ok, "{what}: a merge onto a full disk succeeded");
        assert!(Checkpoint::open(&fresh).is_err());
        assert!(names(&fresh).is_empty(), "{what}: left {:?}", names(&fresh));
    }
    assert_eq!(snapshot(&root.join("a")), before);
}

#[test]
fn unfinished_files_never_open_and_stale_ones_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SaveOptions::new(Dtype::F32).with_max_shard_size(8);
    let w = CheckpointWriter::create(dir.path(), [("a", vec![2]), ("b", vec![2])], &opts).unwrap();
    w.write(0, 0, &[1.0f32, 2.0]).unwrap();
    w.write(1, 0, &[3.0f32, 4.0]).unwrap();
    // Complete data, not yet finished: nothing loads, the temporaries do not open.
    assert!(Checkpoint::open(dir.path()).is_err());
    assert_no_partial_opens(dir.path(), &[]);
    assert_eq!(
        names(dir.path())
            .iter()
            .filter(|n| n.contains(".mf-tmp-"))
            .count(),
        2
    );
    // What a killed run (a dead pid) leaves is removed by the next writer.
    let stale = dir.path().join(".model.safetensors.mf-tmp-0-7");
    std::fs::write(&stale, b"partial").unwrap();
    drop(w);
    assert_eq!(names(dir.path()), [".model.safetensors.mf-tmp-0-7"]);
    let w = CheckpointWriter::create(dir.path(), [("a", vec![1])], &opts).unwrap();
    assert!(!stale.exists());
    w.write(0, 0, &[1.0f32]).unwrap();
    w.finish().unwrap();
    assert_eq!(names(dir.path()), ["model.safetensors"]);
}

#[test]
fn the_writer_refuses_exactly_the_shapes_the_reader_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let huge = 1usize << 62;
    let f32_opts = SaveOptions::new(Dtype::F32);
    // 4 * 2^62 overflows before the zero: the reader refuses it, so does the writer.
    let err = CheckpointWriter::create(dir.path(), [("z", vec![huge, 0])], &f32_opts).unwrap_err();
    assert!(err.to_string().contains("`z`"), "{err}");
    assert!(CheckpointWriter::create(dir.path(), [("z", vec![0, huge, 4])], &f32_opts).is_ok());
    // 1 * 2^62 * 0 does not overflow: both accept it.
    let path = dir.path().join("u8.safetensors");
    let w =
        CheckpointWriter::create_file(&path, [("z", vec![huge, 0], Dtype::U8)], &f32_opts).unwrap();
    w.write_raw(
        0,
        &RawTensor::new(Dtype::U8, vec![huge, 0], Vec::new()).unwrap(),
    )
    .unwrap();
    w.finish().unwrap();
    let ck = Checkpoint::open(&path).unwrap();
    assert_eq!(ck.info("z").unwrap().shape(), &[huge, 0]);
}
