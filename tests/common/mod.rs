//! Independent reference forward passes (inference only) for the architectures of
//! `modelfusion::perm::specs`, written directly from the architecture descriptions, so
//! that tests can check that a permuted network computes the same function.
#![allow(dead_code)]

pub mod golden;

use modelfusion::{Model, StateDictF32};
use ndarray::{Array1, Array2, Array3, ArrayD, Axis, Ix1, Ix2, Ix4};

pub fn p<'a>(m: &'a StateDictF32, name: &str) -> &'a ArrayD<f32> {
    m.get(name).unwrap_or_else(|| panic!("missing {name}"))
}
fn v1(m: &StateDictF32, name: &str) -> Array1<f32> {
    p(m, name).clone().into_dimensionality::<Ix1>().unwrap()
}
fn m2(m: &StateDictF32, name: &str) -> Array2<f32> {
    p(m, name).clone().into_dimensionality::<Ix2>().unwrap()
}
fn relu2(x: Array2<f32>) -> Array2<f32> {
    x.mapv(|v| v.max(0.0))
}
fn linear(m: &StateDictF32, layer: &str, x: &Array2<f32>) -> Array2<f32> {
    x.dot(&m2(m, &format!("{layer}.weight")).t()) + &v1(m, &format!("{layer}.bias"))
}
/// Batch norm (evaluation mode) over the last axis of (n, c).
fn bn2(m: &StateDictF32, layer: &str, x: &Array2<f32>) -> Array2<f32> {
    let (w, b) = (
        v1(m, &format!("{layer}.weight")),
        v1(m, &format!("{layer}.bias")),
    );
    let (rm, rv) = (
        v1(m, &format!("{layer}.running_mean")),
        v1(m, &format!("{layer}.running_var")),
    );
    let scale = &w / &rv.mapv(|v| (v + 1e-5).sqrt());
    (x - &rm) * &scale + &b
}

/// MLP: layers.{i}, ReLU between.
pub fn mlp_forward(m: &StateDictF32, num_layers: usize, x: &Array2<f32>) -> Array2<f32> {
    let mut h = x.clone();
    for i in 0..num_layers {
        h = linear(m, &format!("layers.{i}"), &h);
        if i + 1 < num_layers {
            h = relu2(h);
        }
    }
    h
}

/// Residual MLP in evaluation mode.
pub fn res_mlp_forward(m: &StateDictF32, blocks: usize, x: &Array2<f32>) -> Array2<f32> {
    let mut h = relu2(linear(m, "stem", x));
    for j in 0..blocks {
        let z = bn2(m, &format!("blocks.{j}.norm"), &h);
        let z = relu2(linear(m, &format!("blocks.{j}.fc1"), &z));
        h = h + linear(m, &format!("blocks.{j}.fc2"), &z);
    }
    linear(m, "head", &h)
}

/// One image (c, h, w) through a convolution with padding k/2.
fn conv(
    m: &StateDictF32,
    name: &str,
    bias: Option<&str>,
    x: &Array3<f32>,
    stride: usize,
) -> Array3<f32> {
    let w = p(m, name).clone().into_dimensionality::<Ix4>().unwrap();
    let (o, c, k, _) = w.dim();
    let (_, h, wd) = x.dim();
    let pad = k / 2;
    let (oh, ow) = (
        (h + 2 * pad - k) / stride + 1,
        (wd + 2 * pad - k) / stride + 1,
    );
    let mut out = Array3::<f32>::zeros((o, oh, ow));
    for oc in 0..o {
        for i in 0..oh {
            for j in 0..ow {
                let mut acc = 0.0f32;
                for ic in 0..c {
                    for di in 0..k {
                        for dj in 0..k {
                            let (y, xx) = (
                                (i * stride + di) as isize - pad as isize,
                                (j * stride + dj) as isize - pad as isize,
                            );
                            if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < wd {
                                acc += w[[oc, ic, di, dj]] * x[[ic, y as usize, xx as usize]];
                            }
                        }
                    }
                }
                out[[oc, i, j]] = acc;
            }
        }
    }
    if let Some(b) = bias {
        let b = v1(m, b);
        for oc in 0..o {
            out.index_axis_mut(Axis(0), oc).mapv_inplace(|v| v + b[oc]);
        }
    }
    out
}
fn bn3(m: &StateDictF32, layer: &str, x: &Array3<f32>) -> Array3<f32> {
    let c = x.dim().0;
    let flat = x
        .clone()
        .into_shape_with_order((c, x.len() / c))
        .unwrap()
        .reversed_axes()
        .to_owned();
    let y = bn2(m, layer, &flat);
    y.reversed_axes()
        .as_standard_layout()
        .to_owned()
        .into_shape_with_order(x.dim())
        .unwrap()
}
fn relu3(x: Array3<f32>) -> Array3<f32> {
    x.mapv(|v| v.max(0.0))
}
fn gap(x: &Array3<f32>) -> Array1<f32> {
    x.mean_axis(Axis(2)).unwrap().mean_axis(Axis(1)).unwrap()
}
fn head(m: &StateDictF32, layer: &str, feats: Vec<Array1<f32>>) -> Array2<f32> {
    let n = feats.len();
    let d = feats[0].len();
    let x = Array2::from_shape_fn((n, d), |(i, j)| feats[i][j]);
    linear(m, layer, &x)
}

/// VGG-like CNN on images (n, c, h, w) (as a vector of (c, h, w)).
pub fn vgg_forward(m: &StateDictF32, convs: usize, fcs: usize, xs: &[Array3<f32>]) -> Array2<f32> {
    let feats = xs
        .iter()
        .map(|x| {
            let mut h = x.clone();
            for i in 0..convs {
                h = conv(
                    m,
                    &format!("convs.{i}.weight"),
                    Some(&format!("convs.{i}.bias")),
                    &h,
                    1,
                );
                h = relu3(bn3(m, &format!("norms.{i}"), &h));
            }
            gap(&h)
        })
        .collect();
    let mut h = head(m, "fcs.0", feats);
    for j in 1..fcs {
        h = linear(m, &format!("fcs.{j}"), &relu2(h));
    }
    h
}

/// CIFAR ResNet on images.
pub fn resnet_forward(
    m: &StateDictF32,
    stages: &[(usize, usize)],
    xs: &[Array3<f32>],
) -> Array2<f32> {
    let feats = xs
        .iter()
        .map(|x| {
            let mut h = relu3(bn3(m, "bn1", &conv(m, "conv1.weight", None, x, 1)));
            for (si, &(_, blocks)) in stages.iter().enumerate() {
                let s = si + 1;
                for b in 0..blocks {
                    let l = format!("layer{s}.{b}");
                    let stride = if s > 1 && b == 0 { 2 } else { 1 };
                    let z = relu3(bn3(
                        m,
                        &format!("{l}.bn1"),
                        &conv(m, &format!("{l}.conv1.weight"), None, &h, stride),
                    ));
                    let z = bn3(
                        m,
                        &format!("{l}.bn2"),
                        &conv(m, &format!("{l}.conv2.weight"), None, &z, 1),
                    );
                    let sc = if s > 1 && b == 0 {
                        bn3(
                            m,
                            &format!("{l}.shortcut.1"),
                            &conv(m, &format!("{l}.shortcut.0.weight"), None, &h, 2),
                        )
                    } else {
                        h.clone()
                    };
                    h = relu3(z + sc);
                }
            }
            gap(&h)
        })
        .collect();
    head(m, "linear", feats)
}

pub fn max_abs(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Standard normal `(n, d)` inputs, seeded.
pub fn gaussian_inputs(n: usize, d: usize, seed: u64) -> Array2<f32> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let nd = rand_distr::StandardNormal;
    Array2::from_shape_fn((n, d), |_| nd.sample(&mut rng))
}

/// `n` standard normal images `(c, hw, hw)`, seeded.
pub fn gaussian_images(n: usize, c: usize, hw: usize, seed: u64) -> Vec<Array3<f32>> {
    let flat = gaussian_inputs(n, c * hw * hw, seed);
    flat.outer_iter()
        .map(|r| r.to_owned().into_shape_with_order((c, hw, hw)).unwrap())
        .collect()
}

/// `model` plus independent `N(0, std^2)` noise on every element, seeded.
pub fn with_noise(model: &StateDictF32, std: f32, seed: u64) -> StateDictF32 {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let nd = rand_distr::Normal::new(0.0f32, std).unwrap();
    model
        .try_map(|_, t| Ok(t.mapv(|v| v + nd.sample(&mut rng))))
        .unwrap()
}

/// The one-hidden-layer MLP `prefix.layers.{0,1}.{weight,bias}` of a golden table.
pub fn golden_mlp(
    g: &std::collections::BTreeMap<String, ArrayD<f64>>,
    prefix: &str,
) -> modelfusion::StateDictF64 {
    modelfusion::StateDictF64::from_pairs(
        [
            "layers.0.weight",
            "layers.0.bias",
            "layers.1.weight",
            "layers.1.bias",
        ]
        .map(|n| (n, g[&format!("{prefix}.{n}")].clone())),
    )
    .expect("distinct names")
}
