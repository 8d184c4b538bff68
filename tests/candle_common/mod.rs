//! Shared by the candle tests: digits as 8x8 images, random parameters for any layout.
#![allow(dead_code)]

use modelfusion::candle::candle_core::{Device, Tensor};
use modelfusion::nn::data;
use modelfusion::perm::PermutationSpec;
use modelfusion::perm::specs::Architecture;

/// The first `n` digits as `(batch, 1, 8, 8)` images, in batches of `batch`.
pub fn digit_images(n: usize, batch: usize) -> Vec<Tensor> {
    let d = data::digits().unwrap().head(n);
    d.batches(batch)
        .unwrap()
        .map(|(xb, _)| {
            let flat: Vec<f32> = xb.iter().copied().collect();
            Tensor::from_vec(flat, (xb.nrows(), 1, 8, 8), &Device::Cpu).unwrap()
        })
        .collect()
}

/// [`digit_images`] in f64.
pub fn digit_images_f64(n: usize, batch: usize) -> Vec<Tensor> {
    digit_images(n, batch)
        .iter()
        .map(|t| {
            t.to_dtype(modelfusion::candle::candle_core::DType::F64)
                .unwrap()
        })
        .collect()
}

/// Any layout (names and shapes) with a spec, so that `random_model` fills it.
pub struct Layout {
    pub spec: PermutationSpec,
    pub shapes: Vec<(String, Vec<usize>)>,
}

impl Architecture for Layout {
    fn spec(&self) -> PermutationSpec {
        self.spec.clone()
    }

    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.shapes.clone()
    }
}

/// `max |a - b| / max |a|` over two tensors of one shape.
pub fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs())) as f64;
    diff / scale.max(1e-30)
}
