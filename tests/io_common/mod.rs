//! Helpers shared by the io integration tests.
#![allow(dead_code)]

use std::path::Path;

use modelfusion::StateDict;
use ndarray::{ArrayD, IxDyn};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A safetensors file made of a header text and `data_len` bytes of data (value `fill`).
pub fn raw_file(header: &str, data_len: usize, fill: u8) -> Vec<u8> {
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header.as_bytes());
    f.extend(std::iter::repeat_n(fill, data_len));
    f
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A random state dict with the given shapes, values uniform in [-scale, scale).
pub fn random_sd(shapes: &[(&str, Vec<usize>)], seed: u64, scale: f32) -> StateDict<ArrayD<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sd = StateDict::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect();
        sd.insert(*name, ArrayD::from_shape_vec(IxDyn(shape), data).unwrap())
            .unwrap();
    }
    sd
}
