//! The golden-file format of the Python reference scripts: one array a line,
//! `name dim dim ... | value value ...` (row-major). Shared by the integration tests
//! (through `common`) and by unit tests (`#[path]`), so it depends on ndarray only.

use std::collections::BTreeMap;

use ndarray::{ArrayD, IxDyn};

/// Every array of a golden file, by name.
pub fn golden_table(text: &str) -> BTreeMap<String, ArrayD<f64>> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let (head, values) = line
                .split_once(" | ")
                .unwrap_or_else(|| panic!("golden line without ` | `: {line}"));
            let mut parts = head.split_whitespace();
            let name = parts.next().expect("a name").to_string();
            let shape: Vec<usize> = parts.map(|d| d.parse().expect("a dimension")).collect();
            let data: Vec<f64> = values
                .split_whitespace()
                .map(|v| v.parse().expect("a number"))
                .collect();
            let array = ArrayD::from_shape_vec(IxDyn(&shape), data)
                .unwrap_or_else(|e| panic!("golden array `{name}`: {e}"));
            (name, array)
        })
        .collect()
}
