//! The UCI optical recognition of handwritten digits data set, embedded.

use std::io::Read;

use flate2::read::GzDecoder;
use ndarray::Array2;

use super::Dataset;
use crate::error::{Error, Result};

/// The gzipped CSV: 1797 rows of 64 pixel counts (0..=16) and a label (0..=9).
static DIGITS_CSV_GZ: &[u8] = include_bytes!("../../../data/digits.csv.gz");

const SIDE: usize = 8;
const FEATURES: usize = SIDE * SIDE;
const CLASSES: usize = 10;
const MAX_VALUE: f32 = 16.0;

/// The UCI optical digits, embedded in the crate: 1797 images of 8x8 = 64 features
/// (pixel counts `0..=16` scaled to `[0, 1]`), 10 classes, in the original order. Split
/// it with [`Dataset::split`].
///
/// Source: E. Alpaydin and C. Kaynak, *Optical Recognition of Handwritten Digits*, UCI
/// Machine Learning Repository (1998), CC BY 4.0; this copy is the one scikit-learn
/// ships (`sklearn/datasets/data/digits.csv.gz`). See `data/README.md`.
///
/// ```
/// let d = modelfusion::nn::data::digits()?;
/// assert_eq!(d.len(), 1797);
/// assert_eq!(d.class_counts()[0], 178);
/// assert!(d.x().iter().all(|&v| (0.0..=1.0).contains(&v)));
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn digits() -> Result<Dataset> {
    let mut text = String::new();
    GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| digits_error(format!("cannot decompress: {e}")))?;
    parse_digits_csv(&text)
}

fn digits_error(reason: String) -> Error {
    Error::Format {
        format: "digits CSV",
        path: None,
        reason,
    }
}

/// Parses rows of 64 values in `0..=16` followed by a label.
fn parse_digits_csv(text: &str) -> Result<Dataset> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (line_no, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != FEATURES + 1 {
            return Err(digits_error(format!(
                "line {}: expected {} fields, got {}",
                line_no + 1,
                FEATURES + 1,
                fields.len()
            )));
        }
        for (col, field) in fields.iter().enumerate() {
            let v: f32 = field.trim().parse().map_err(|_| {
                digits_error(format!(
                    "line {}, field {}: `{field}` is not a number",
                    line_no + 1,
                    col + 1
                ))
            })?;
            let limit = if col < FEATURES {
                MAX_VALUE
            } else {
                (CLASSES - 1) as f32
            };
            if !(0.0..=limit).contains(&v) || v.fract() != 0.0 {
                return Err(digits_error(format!(
                    "line {}, field {}: {v} is not an integer in 0..={limit}",
                    line_no + 1,
                    col + 1
                )));
            }
            if col < FEATURES {
                pixels.push(v / MAX_VALUE);
            } else {
                labels.push(v as usize);
            }
        }
    }
    let x = Array2::from_shape_vec((labels.len(), FEATURES), pixels)
        .map_err(|e| digits_error(e.to_string()))?;
    Dataset::new(x, labels, CLASSES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_rows_are_rejected() {
        let row: String = std::iter::repeat_n("16", 64).collect::<Vec<_>>().join(",");
        assert_eq!(parse_digits_csv(&format!("{row},3\n")).unwrap().y(), &[3]);
        assert!(parse_digits_csv(&format!("{row},10")).is_err());
        assert!(parse_digits_csv(&format!("{row},x")).is_err());
        assert!(parse_digits_csv(&row).is_err());
        assert!(parse_digits_csv(&format!("{},3", row.replacen("16", "17", 1))).is_err());
        assert!(parse_digits_csv(&format!("{},3", row.replacen("16", "1.5", 1))).is_err());
    }
}
