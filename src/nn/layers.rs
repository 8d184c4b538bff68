//! Layer primitives shared by the reference networks: parameter access, linear layers,
//! ReLU, batch normalisation, softmax cross-entropy and PyTorch-style initialisation.
//! Every function works on `(samples, features)` matrices.

use ndarray::{
    Array1, Array2, ArrayD, ArrayView, ArrayView1, ArrayView2, Axis, Dimension, Ix1, Ix2, Zip,
};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::{Model, StateDict};
use crate::tensor::{Scalar, Tensor};

/// Momentum of the running-statistics update (PyTorch's default).
pub(crate) const BN_MOMENTUM: f64 = 0.1;
/// Added to the variance before the square root (PyTorch's default).
pub(crate) const BN_EPS: f64 = 1e-5;

/// The parameter `name` viewed with dimension `D` (`Ix2` for a weight matrix, `Ix1` for a
/// bias, a norm scale or a running statistic).
fn param<'a, T: Tensor, D: Dimension>(
    params: &'a StateDict<T>,
    name: &str,
) -> Result<ArrayView<'a, T::Elem, D>> {
    let t = params.require(name, "the network parameters")?;
    t.view().into_dimensionality::<D>().map_err(|_| {
        Error::invalid(
            name,
            format!(
                "expected {} axes, got shape {:?}",
                D::NDIM.unwrap_or(0),
                t.shape()
            ),
        )
    })
}

/// The 2-d parameter `name` (a weight matrix).
pub(crate) fn param2<'a, T: Tensor>(
    params: &'a StateDict<T>,
    name: &str,
) -> Result<ArrayView2<'a, T::Elem>> {
    param::<T, Ix2>(params, name)
}

/// The 1-d parameter `name`.
pub(crate) fn param1<'a, T: Tensor>(
    params: &'a StateDict<T>,
    name: &str,
) -> Result<ArrayView1<'a, T::Elem>> {
    param::<T, Ix1>(params, name)
}

/// `x W^T + b`.
pub(crate) fn linear<S: Scalar>(x: ArrayView2<S>, w: ArrayView2<S>, b: ArrayView1<S>) -> Array2<S> {
    let mut y = x.dot(&w.t());
    y += &b;
    y
}

/// Gradients of a linear layer `y = x W^T + b`: `(d weight, d bias, d input)`, the last
/// only when `need_input` is set.
pub(crate) fn linear_backward<S: Scalar>(
    dy: ArrayView2<S>,
    x: ArrayView2<S>,
    w: ArrayView2<S>,
    need_input: bool,
) -> (Array2<S>, Array1<S>, Option<Array2<S>>) {
    let dw = dy.t().dot(&x);
    let db = dy.sum_axis(Axis(0));
    let dx = need_input.then(|| dy.dot(&w));
    (dw, db, dx)
}

/// `max(x, 0)` in place (NaN stays NaN).
pub(crate) fn relu_inplace<S: Scalar>(x: &mut Array2<S>) {
    x.mapv_inplace(|v| if v < S::zero() { S::zero() } else { v });
}

/// Masks the gradient `d` by the ReLU's output `out` (zero where the unit was off).
pub(crate) fn relu_backward_inplace<S: Scalar>(d: &mut Array2<S>, out: ArrayView2<S>) {
    Zip::from(d).and(out).for_each(|g, &o| {
        if o <= S::zero() {
            *g = S::zero();
        }
    });
}

/// What a batch-norm layer keeps for its backward pass.
#[derive(Clone, Debug)]
pub(crate) struct BnCache<S> {
    /// The normalised input `(x - mean) / sqrt(var + eps)`.
    pub xhat: Array2<S>,
    /// `1 / sqrt(var + eps)` per channel.
    pub inv_std: Array1<S>,
    /// Whether batch statistics were used (training mode).
    pub batch_stats: bool,
    /// The batch mean (training mode only).
    pub mean: Array1<S>,
    /// The biased batch variance (training mode only).
    pub var: Array1<S>,
}

/// Batch normalisation over the sample axis. In training mode (`batch_stats`) the batch
/// statistics are used; otherwise the running ones.
pub(crate) fn batch_norm<S: Scalar>(
    x: ArrayView2<S>,
    gamma: ArrayView1<S>,
    beta: ArrayView1<S>,
    running_mean: ArrayView1<S>,
    running_var: ArrayView1<S>,
    batch_stats: bool,
    name: &str,
) -> Result<(Array2<S>, BnCache<S>)> {
    let eps = S::from_f64_lossy(BN_EPS);
    let n = x.nrows();
    let (mean, var) = if batch_stats {
        if n < 2 {
            return Err(Error::invalid(
                "batch",
                format!(
                    "batch normalisation `{name}` with batch statistics needs at least 2 samples per batch, got {n}"
                ),
            ));
        }
        let mean = x.sum_axis(Axis(0)) / S::from_f64_lossy(n as f64);
        let centred = &x - &mean;
        let var = centred.mapv(|v| v * v).sum_axis(Axis(0)) / S::from_f64_lossy(n as f64);
        (mean, var)
    } else {
        (running_mean.to_owned(), running_var.to_owned())
    };
    if var.iter().any(|&v| v + eps <= S::zero()) {
        return Err(Error::invalid(
            format!("{name}.running_var"),
            "variance plus eps must be positive",
        ));
    }
    let inv_std = var.mapv(|v| S::one() / (v + eps).sqrt());
    let xhat = (&x - &mean) * &inv_std;
    let y = &xhat * &gamma + beta;
    Ok((
        y,
        BnCache {
            xhat,
            inv_std,
            batch_stats,
            mean,
            var,
        },
    ))
}

/// Gradients of a batch-norm layer: `(d gamma, d beta, d input)`.
pub(crate) fn batch_norm_backward<S: Scalar>(
    dy: ArrayView2<S>,
    gamma: ArrayView1<S>,
    cache: &BnCache<S>,
) -> (Array1<S>, Array1<S>, Array2<S>) {
    let dbeta = dy.sum_axis(Axis(0));
    let dgamma = (&dy * &cache.xhat).sum_axis(Axis(0));
    let dxhat = &dy * &gamma;
    let dx = if cache.batch_stats {
        // dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        let n = S::from_f64_lossy(dy.nrows() as f64);
        let mean_d = dxhat.sum_axis(Axis(0)) / n;
        let mean_dx = (&dxhat * &cache.xhat).sum_axis(Axis(0)) / n;
        (dxhat - &mean_d - &cache.xhat * &mean_dx) * &cache.inv_std
    } else {
        dxhat * &cache.inv_std
    };
    (dgamma, dbeta, dx)
}

/// The batch mean and unbiased batch variance (as PyTorch's running statistics use)
/// of a training-mode cache; `None` for an evaluation-mode one.
pub(crate) fn batch_statistics<S: Scalar>(cache: &BnCache<S>) -> Option<(Array1<S>, Array1<S>)> {
    if !cache.batch_stats {
        return None;
    }
    let n = cache.xhat.nrows() as f64;
    let unbias = S::from_f64_lossy(n / (n - 1.0));
    Some((cache.mean.clone(), cache.var.mapv(|v| v * unbias)))
}

/// Softmax cross-entropy of a batch: returns the summed loss (f64), the gradient of the
/// summed loss with respect to the logits, and the number of correct predictions.
/// Errors on a label out of range.
pub(crate) fn softmax_cross_entropy<S: Scalar>(
    logits: ArrayView2<S>,
    labels: &[usize],
) -> Result<(f64, Array2<S>, usize)> {
    let (losses, grad, correct) = softmax_cross_entropy_per_sample(logits, labels)?;
    Ok((losses.iter().sum(), grad, correct))
}

/// As [`softmax_cross_entropy`], with the loss of every sample instead of their sum.
pub(crate) fn softmax_cross_entropy_per_sample<S: Scalar>(
    logits: ArrayView2<S>,
    labels: &[usize],
) -> Result<(Vec<f64>, Array2<S>, usize)> {
    let (n, c) = logits.dim();
    if labels.len() != n {
        return Err(Error::invalid(
            "labels",
            format!("{} labels for a batch of {n} samples", labels.len()),
        ));
    }
    let mut grad = Array2::<S>::zeros((n, c));
    let mut losses = Vec::with_capacity(n);
    let mut correct = 0usize;
    for (i, (row, &label)) in logits.outer_iter().zip(labels).enumerate() {
        if label >= c {
            return Err(Error::invalid(
                "labels",
                format!("label {label} of sample {i} is out of range for {c} classes"),
            ));
        }
        let (argmax, max) = argmax_row(row);
        if !max.is_finite() {
            return Err(Error::NonFinite {
                what: format!("logits of sample {i}"),
            });
        }
        let sum: f64 = row.iter().map(|&z| (z.to_f64_lossless() - max).exp()).sum();
        let lse = max + sum.ln();
        losses.push(lse - row[label].to_f64_lossless());
        if argmax == label {
            correct += 1;
        }
        for (g, &z) in grad.row_mut(i).iter_mut().zip(row) {
            *g = S::from_f64_lossy((z.to_f64_lossless() - lse).exp());
        }
        grad[[i, label]] -= S::one();
    }
    Ok((losses, grad, correct))
}

/// Index and value (as f64) of the largest entry; the first one on ties. NaNs are
/// ignored (a row of NaNs gives index 0 and negative infinity).
pub(crate) fn argmax_row<S: Scalar>(row: ArrayView1<S>) -> (usize, f64) {
    let mut best = (0, f64::NEG_INFINITY);
    for (j, &z) in row.iter().enumerate() {
        let z = z.to_f64_lossless();
        if z > best.1 {
            best = (j, z);
        }
    }
    best
}

/// PyTorch's default `nn.Linear` initialisation: weight and bias uniform in
/// `(-1/sqrt(fan_in), 1/sqrt(fan_in))` (Kaiming-uniform with `a = sqrt(5)`).
pub(crate) fn init_linear<T: Tensor>(
    params: &mut StateDict<T>,
    prefix: &str,
    out: usize,
    fan_in: usize,
    rng: &mut ChaCha8Rng,
) -> Result<()> {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    let mut draw = |shape: &[usize]| -> T {
        T::from_array(ArrayD::from_shape_simple_fn(shape, || {
            T::Elem::from_f64_lossy((rng.random::<f64>() * 2.0 - 1.0) * bound)
        }))
    };
    let w = draw(&[out, fan_in]);
    let b = draw(&[out]);
    params.insert(format!("{prefix}.weight"), w)?;
    params.insert(format!("{prefix}.bias"), b)
}

/// Converts a batch of `f32` inputs to the network's scalar type.
pub(crate) fn convert_batch<S: Scalar>(x: ArrayView2<f32>) -> Array2<S> {
    x.mapv(|v| S::from_f64_lossy(f64::from(v)))
}

/// The rows `rows` of `x` (all in range), converted to the network's scalar type, in
/// one copy.
pub(crate) fn gather_rows<S: Scalar>(x: ArrayView2<f32>, rows: &[usize]) -> Array2<S> {
    Array2::from_shape_fn((rows.len(), x.ncols()), |(i, j)| {
        S::from_f64_lossy(f64::from(x[[rows[i], j]]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn cross_entropy_is_stable_and_correct() {
        let logits = array![[1000.0f64, 0.0], [0.0, 0.0]];
        let (loss, grad, correct) = softmax_cross_entropy(logits.view(), &[0, 1]).unwrap();
        assert!((loss - 2f64.ln()).abs() < 1e-12, "{loss}");
        assert_eq!(correct, 1); // a tie picks class 0
        assert!((grad[[1, 1]] + 0.5).abs() < 1e-12);
        assert!(grad[[0, 0]].abs() < 1e-12);
        let e = softmax_cross_entropy(logits.view(), &[0, 2]).unwrap_err();
        assert!(e.to_string().contains("label 2"), "{e}");
    }

    #[test]
    fn batch_norm_normalises_and_needs_two_samples() {
        let x = array![[1.0f64, 2.0], [3.0, 6.0]];
        let ones = Array1::ones(2);
        let zeros = Array1::zeros(2);
        let (y, cache) = batch_norm(
            x.view(),
            ones.view(),
            zeros.view(),
            zeros.view(),
            ones.view(),
            true,
            "bn",
        )
        .unwrap();
        assert!((y[[0, 0]] + 1.0).abs() < 1e-4 && (y[[1, 1]] - 1.0).abs() < 1e-4);
        let (m, v) = batch_statistics(&cache).unwrap();
        // mean (2, 4), unbiased variance (2, 8)
        assert!((m[0] - 2.0).abs() < 1e-12 && (m[1] - 4.0).abs() < 1e-12);
        assert!((v[0] - 2.0).abs() < 1e-12 && (v[1] - 8.0).abs() < 1e-12);
        let one = array![[1.0f64, 2.0]];
        assert!(
            batch_norm(
                one.view(),
                ones.view(),
                zeros.view(),
                zeros.view(),
                ones.view(),
                true,
                "bn"
            )
            .is_err()
        );
    }
}
