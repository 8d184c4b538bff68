//! The results the docs report are the results their commands print.
//!
//! Each test runs one of the crate's example programs (cargo builds the examples for
//! `cargo test`), reads the numbers it prints, and compares them with the numbers
//! `README.md` and `docs/` report for that command. A documented number that no longer
//! matches what its command prints fails here, naming the file, the row and both values.
//! The demos are deterministic (fixed seeds; results do not depend on the thread count).
//!
//! The quick demos (embedded digits, a few seconds) run in every `cargo test`; the
//! Fashion-MNIST demo (minutes) is `#[ignore]`d:
//! `cargo test --release --test nn doc_numbers -- --ignored` (needs
//! `apt-get install -y dataset-fashion-mnist`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The crate root (where README.md and docs/ are).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the example `name` (built by `cargo test` beside this test's binary) with
/// `args`, returns what it printed.
fn run_example(name: &str, args: &[&str]) -> String {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/doc_numbers-<hash> -> target/<profile>/examples/<name>
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("examples").join(name))
        .expect("the target directory");
    assert!(
        bin.exists(),
        "{} is not built: run the whole `cargo test` (which builds the examples) or \
         `cargo build --examples` with the same profile first",
        bin.display()
    );
    let out = Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A number as a document writes it: its value and how many decimals it shows.
#[derive(Clone, Copy, Debug)]
struct Written {
    value: f64,
    decimals: i32,
}

/// Every decimal number in `text`, in order (signs are not read: the docs write none).
fn numbers(text: &str) -> Vec<Written> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let mut decimals = 0;
            if i + 1 < b.len() && b[i] == b'.' && b[i + 1].is_ascii_digit() {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                    decimals += 1;
                }
            }
            let value = text[start..i].parse().expect("digits parse");
            out.push(Written { value, decimals });
        } else {
            i += 1;
        }
    }
    out
}

/// Whether `measured` rounds to what the document wrote, allowing one unit in the last
/// written digit and 0.5 % of the value for platform-dependent rounding.
fn agrees(doc: Written, measured: f64) -> bool {
    let unit = 10f64.powi(-doc.decimals);
    (doc.value - measured).abs() <= unit + 0.005 * measured.abs()
}

/// Compares documented numbers with measured ones, pairwise; `what` names where.
fn check(what: &str, doc: &[Written], measured: &[f64]) {
    assert_eq!(
        doc.len(),
        measured.len(),
        "{what}: the document writes {} numbers ({doc:?}), the command printed {} ({measured:?})",
        doc.len(),
        measured.len()
    );
    for (i, (d, &m)) in doc.iter().zip(measured).enumerate() {
        assert!(
            agrees(*d, m),
            "{what}: number {} is documented as {} but the command now prints {m}; \
             re-run the command and update the document",
            i + 1,
            d.value
        );
    }
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// The part of `doc` under the heading that starts with `heading`, up to the next
/// heading of the same or a higher level.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let level = heading.chars().take_while(|&c| c == '#').count();
    let start = doc
        .find(&format!("\n{heading}"))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("no heading `{heading}`"));
    let body = &doc[start..];
    let mut at = body.find('\n').map_or(body.len(), |i| i + 1);
    for line in body[at..].split_inclusive('\n') {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            return &body[..at];
        }
        at += line.len();
    }
    body
}

/// The cells of the table row of `text` whose first cell is `label`, or starts with
/// `label` followed by ` (`.
fn row<'a>(text: &'a str, label: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix('|'))
        .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>())
        .find(|cells| {
            cells.first().is_some_and(|c| {
                *c == label || c.strip_prefix(label).is_some_and(|r| r.starts_with(" ("))
            })
        })
        .unwrap_or_else(|| panic!("no table row `{label}` in:\n{text}"))
}

/// The paragraph of `text` that starts with `start`.
fn paragraph<'a>(text: &'a str, start: &str) -> &'a str {
    let at = text
        .find(start)
        .unwrap_or_else(|| panic!("no paragraph starting `{start}`"));
    let rest = &text[at..];
    &rest[..rest.find("\n\n").unwrap_or(rest.len())]
}

/// The numbers the command printed after `start` on the line that starts with it (after
/// leading spaces) and continues with `then`, e.g. a curve's name padded to a column and
/// then `barrier`.
fn printed(out: &str, start: &str, then: &str) -> Vec<f64> {
    let rest = out
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix(start))
        .find_map(|r| r.trim_start().strip_prefix(then))
        .unwrap_or_else(|| panic!("the command printed no line `{start} .. {then}`:\n{out}"));
    numbers(rest).iter().map(|w| w.value).collect()
}

/// The barrier table and the endpoints sentence of one data set's section of
/// docs/rebasin.md against one run of the rebasin demo; returns the run's
/// `(naive barrier, weight-matched barrier)`.
fn rebasin_matches_docs(heading: &str, args: &[&str]) -> (f64, f64) {
    let out = run_example("rebasin", args);
    let doc = read("docs/rebasin.md");
    let sec = section(&doc, heading);
    let mut barriers = Vec::new();
    for curve in [
        "naive",
        "weight matching",
        "activation matching",
        "weight matching + REPAIR",
    ] {
        // `  weight matching   barrier 0.0370  (   3.2% of naive)   accuracy drop   0.84 points`
        let m = printed(&out, curve, "barrier");
        let cells = row(sec, curve);
        let doc_nums: Vec<Written> = cells[1..4].iter().flat_map(|c| numbers(c)).collect();
        check(
            &format!("docs/rebasin.md `{heading}`, row `{curve}`"),
            &doc_nums,
            &m,
        );
        barriers.push(m[0]);
    }
    check(
        &format!("docs/rebasin.md `{heading}`, endpoints"),
        &numbers(paragraph(sec, "Endpoints:")),
        &printed(&out, "endpoints:", ""),
    );
    (barriers[0], barriers[1])
}

/// The README's results row whose first cell starts with `label` against `measured`
/// (the numbers of its second cell, in order).
fn readme_row(label: &str, measured: &[f64]) {
    let readme = read("README.md");
    let cells = readme
        .lines()
        .find(|l| l.starts_with(&format!("| {label}")))
        .unwrap_or_else(|| panic!("README.md has no results row `{label}`"))
        .split('|')
        .map(str::trim)
        .collect::<Vec<_>>();
    check(
        &format!("README.md results row `{label}`"),
        &numbers(cells[2]),
        measured,
    );
}

/// The README's barrier row `label`: `WM vs naive (pct%)`.
fn readme_barrier_row(label: &str, naive: f64, wm: f64) {
    readme_row(label, &[wm, naive, 100.0 * wm / naive]);
}

/// The numbers of the cells after the first of the table row `label` that a command
/// printed (as markdown).
fn printed_row(out: &str, label: &str) -> Vec<f64> {
    row(out, label)[1..]
        .iter()
        .flat_map(|c| numbers(c))
        .map(|w| w.value)
        .collect()
}

/// Every row `label` of the table in `heading` of the document `rel` against the same
/// row of the table the command printed.
fn doc_rows_match(out: &str, rel: &str, heading: &str, labels: &[&str]) {
    let doc = read(rel);
    let sec = section(&doc, heading);
    for &label in labels {
        let doc_nums: Vec<Written> = row(sec, label)[1..]
            .iter()
            .flat_map(|c| numbers(c))
            .collect();
        check(
            &format!("{rel} `{heading}`, row `{label}`"),
            &doc_nums,
            &printed_row(out, label),
        );
    }
}

/// The last number of a vector (a printed row's mean).
fn last(v: &[f64]) -> f64 {
    v[v.len() - 1]
}

#[test]
fn rebasin_digits_numbers_are_the_documented_ones() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let svg = dir.path().join("rebasin.svg");
    let (naive, wm) =
        rebasin_matches_docs("### UCI digits", &["--out", svg.to_str().expect("utf-8")]);
    readme_barrier_row("same on the embedded digits", naive, wm);
}

#[test]
#[ignore = "trains two Fashion-MNIST MLPs: minutes; needs dataset-fashion-mnist"]
fn rebasin_fashion_mnist_numbers_are_the_documented_ones() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let svg = dir.path().join("rebasin.svg");
    let (naive, wm) = rebasin_matches_docs(
        "### Fashion-MNIST",
        &["--fashion-mnist", "--out", svg.to_str().expect("utf-8")],
    );
    readme_barrier_row("Git Re-Basin, Fashion-MNIST", naive, wm);
}

#[test]
#[ignore = "trains STE matching and differentiable re-basin on digits: about two minutes"]
fn rebasin_ste_numbers_are_the_documented_ones() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let svg = dir.path().join("rebasin.svg");
    let out = run_example(
        "rebasin",
        &[
            "--ste",
            "--no-repair",
            "--out",
            svg.to_str().expect("utf-8"),
        ],
    );
    let doc = read("docs/rebasin.md");
    let heading = "### STE matching and differentiable re-basin";
    let sec = section(&doc, heading);
    for curve in ["weight matching", "STE matching", "Sinkhorn re-basin"] {
        let cells = row(sec, curve);
        let doc_nums: Vec<Written> = cells[1..4].iter().flat_map(|c| numbers(c)).collect();
        check(
            &format!("docs/rebasin.md `{heading}`, row `{curve}`"),
            &doc_nums,
            &printed(&out, curve, "barrier"),
        );
    }
}

#[test]
fn fuse_numbers_are_the_documented_ones() {
    let out = run_example("fuse", &[]);
    let naive = printed(&out, "naive average", "");
    let wm = printed(&out, "weight-matched average", "");
    // `test loss L, accuracy A%` (weight-matched: `(ref R) test loss ...`): accuracy last.
    readme_row("three digits MLPs fused", &[last(&naive), last(&wm)]);
}

#[test]
fn zipit_numbers_are_the_documented_ones() {
    let out = run_example("zipit", &[]);
    // `  ZipIt! full (alpha = 1)   95.82  95.82  95.54  | mean  95.73 %`: the mean last.
    let mean = |name: &str| last(&printed(&out, name, ""));
    readme_row(
        "digits MLP 3x128, midpoint test accuracy (3 pairs)",
        &[
            mean("ZipIt! full (alpha = 1)"),
            mean("ZipIt! partial k = 1"),
            mean("activation matching"),
            mean("weight matching"),
        ],
    );
}

#[test]
fn robust_numbers_are_the_documented_ones() {
    let out = run_example("robust", &[]);
    let curves = ["line", "plain curve", "robust curve"];
    doc_rows_match(
        &out,
        "docs/connectivity.md",
        "## Robust mode connectivity",
        &curves,
    );
    let stats = ["interpolated", "recomputed at every point"];
    doc_rows_match(
        &out,
        "docs/connectivity.md",
        "## Batch-norm statistics along a path",
        &stats,
    );
    let weights = [
        "0.0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1.0",
    ];
    doc_rows_match(
        &out,
        "docs/averaging.md",
        "## Adversarially-robust soup",
        &weights,
    );
    // Columns: clean loss / error barrier, robust loss / error barrier, robust error at 0.5.
    let robust_error_barriers: Vec<f64> = curves.iter().map(|c| printed_row(&out, c)[3]).collect();
    readme_row("digits MLP, PGD-20 L-inf 0.1", &robust_error_barriers);
    let loss_barriers: Vec<f64> = stats.iter().map(|c| printed_row(&out, c)[0]).collect();
    readme_row("digits ResMlp line", &loss_barriers);
    let soup: Vec<f64> = ["0.0", "0.4", "1.0"]
        .iter()
        .flat_map(|w| printed_row(&out, w))
        .collect();
    readme_row("digits robust soup", &soup);
}

#[test]
fn adamerging_numbers_are_the_documented_ones() {
    let out = run_example("adamerging", &[]);
    let mean = |name: &str| last(&printed_row(&out, name));
    let arithmetic = ["0.3", "0.5", "1"]
        .iter()
        .map(|l| mean(&format!("task arithmetic, lambda {l}")))
        .fold(f64::NEG_INFINITY, f64::max);
    readme_row(
        "digits, tasks 0-4 / 5-9 merged",
        &[
            mean("AdaMerging layer-wise"),
            mean("AdaMerging task-wise"),
            arithmetic,
        ],
    );
    readme_row(
        "digits, soups of 5 fine-tuned runs",
        &[
            mean("learned soup"),
            mean("greedy soup"),
            mean("uniform soup"),
        ],
    );
    readme_row(
        "digits MLP, 3 seeds: learned line",
        &[
            mean("learned line, midpoint"),
            mean("learned line, midpoint, twice the steps"),
            mean("SWA"),
            mean("plain"),
        ],
    );
}

#[test]
fn the_number_reader_reads_what_the_docs_write() {
    let n = numbers("| 0.0370 vs 1.1415 (3.2%) | 28.1 points, 3x256");
    let v: Vec<(f64, i32)> = n.iter().map(|w| (w.value, w.decimals)).collect();
    assert_eq!(
        v,
        [
            (0.037, 4),
            (1.1415, 4),
            (3.2, 1),
            (28.1, 1),
            (3.0, 0),
            (256.0, 0)
        ]
    );
    assert!(agrees(n[0], 0.03704));
    assert!(!agrees(n[1], 1.2008), "a 5% change is caught");
    assert!(!agrees(
        Written {
            value: 0.0052,
            decimals: 4
        },
        0.0055
    ));
}

/// docs/benchmarks.md's `train_mlp` table: the row of `data` against one run.
fn train_mlp_matches_docs(data: &str, args: &[&str]) {
    let out = run_example("train_mlp", args);
    // `model 0 (MLP [..]): final training loss L, test loss L, test accuracy A% (T s)`
    let model = |seed: &str| {
        let v = printed(&out, &format!("model {seed} "), "");
        v[v.len() - 2]
    };
    let measured = [
        model("0"),
        model("1"),
        last(&printed(&out, "output ensemble of both:", "")),
        last(&printed(&out, "naive midpoint", "")),
    ];
    let doc = read("docs/benchmarks.md");
    let cells = row(section(&doc, "## nn (reference networks)"), data);
    check(
        &format!("docs/benchmarks.md `train_mlp` row `{data}`, test accuracies"),
        &numbers(cells[4]),
        &measured[..numbers(cells[4]).len()],
    );
}

#[test]
fn train_mlp_digits_numbers_are_the_documented_ones() {
    train_mlp_matches_docs("digits", &[]);
}

#[test]
#[ignore = "trains two Fashion-MNIST MLPs: minutes; needs dataset-fashion-mnist"]
fn train_mlp_fashion_mnist_numbers_are_the_documented_ones() {
    train_mlp_matches_docs("Fashion-MNIST", &["fashion"]);
}
