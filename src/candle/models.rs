//! The crate's ready convolutional architectures ([`perm::specs::ResNet`] and
//! [`perm::specs::Vgg`]) as candle models, under exactly the parameter names of their
//! specs, with the taps fusion algorithms read (group features, batch-norm inputs and
//! outputs, residual sums).
//!
//! [`perm::specs::ResNet`]: crate::perm::specs::ResNet
//! [`perm::specs::Vgg`]: crate::perm::specs::Vgg

use candle_core::{DType, Module, Result as CResult, Tensor as CTensor, Var};
use candle_nn::{Conv2dConfig, Linear, VarBuilder};
use rayon::prelude::*;

use crate::perm::specs;

/// Named intermediate tensors of one forward pass (each `(batch, channels, h, w)` or
/// `(batch, features)`), for [`CandleNet::features`](super::CandleNet::features).
///
/// ```
/// let t = modelfusion::candle::Taps::default();
/// assert!(t.groups.is_empty() && t.norm_inputs.is_empty());
/// ```
#[derive(Clone, Debug, Default)]
pub struct Taps {
    /// Post-ReLU features of every permutation group, keyed by group name (a residual
    /// stream's entries, one per block of its stage, concatenated along the batch).
    pub groups: Vec<(String, CTensor)>,
    /// The input of every batch norm, keyed by its name (for [`BnReset`](crate::align::BnReset)).
    pub norm_inputs: Vec<(String, CTensor)>,
    /// The output of every batch norm, keyed by its name (for
    /// [`OutputRepair`](crate::align::OutputRepair)).
    pub norm_outputs: Vec<(String, CTensor)>,
    /// Every residual sum before its ReLU, keyed `layer{s}.{b}.sum` (the stream keys of
    /// [`CandleResNet::repair_layers`]).
    pub sums: Vec<(String, CTensor)>,
}

impl Taps {
    fn norm(&mut self, name: &str, bn: &Norm, x: &CTensor, train: bool) -> CResult<CTensor> {
        let y = bn.forward_t(x, train)?;
        self.norm_inputs.push((name.to_string(), x.clone()));
        self.norm_outputs.push((name.to_string(), y.clone()));
        Ok(y)
    }
}

/// A 2-D convolution (square kernel, zero padding `k / 2`) evaluated as an im2col
/// custom op ([`Im2Col`]) and one candle `matmul`, so that candle's autograd
/// differentiates it through the matrix product. The result is candle's `conv2d` up to
/// rounding (tested, outputs and gradients). The point is the backward pass: candle
/// 0.10's CPU backend computes a `conv2d`'s input gradient with a direct
/// `conv_transpose2d` loop and its weight gradient with a `conv2d` whose kernel is the
/// whole image; on a ResNet-20 stage-1 layer this backward pass is about 1.7 times
/// faster (`docs/benchmarks.md`).
struct Conv {
    weight: CTensor,
    bias: Option<CTensor>,
    stride: usize,
}

impl Conv {
    /// The layer `vb` (`weight` `(cout, cin, k, k)`, `bias` `(cout)` if `bias`), with
    /// candle_nn's initialisation and names.
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> CResult<Self> {
        let cfg = Conv2dConfig {
            padding: k / 2,
            stride,
            ..Default::default()
        };
        let c = if bias {
            candle_nn::conv2d(cin, cout, k, cfg, vb)
        } else {
            candle_nn::conv2d_no_bias(cin, cout, k, cfg, vb)
        }?;
        Ok(Conv {
            weight: c.weight().clone(),
            bias: c.bias().cloned(),
            stride,
        })
    }
}

impl Module for Conv {
    fn forward(&self, x: &CTensor) -> CResult<CTensor> {
        let (b, c, h, w) = x.dims4()?;
        let (cout, cin, k, _) = self.weight.dims4()?;
        if c != cin {
            candle_core::bail!("conv: input has {c} channels, the weight {cin}")
        }
        if h == 0 || w == 0 {
            candle_core::bail!("conv: empty {h} x {w} input")
        }
        let op = Im2Col {
            dims: (b, c, h, w),
            k,
            stride: self.stride,
        };
        let (oh, ow) = op.out_hw();
        let cols = x.contiguous()?.apply_op1(op)?;
        let wm = self.weight.reshape((cout, c * k * k))?;
        let y = wm.matmul(&cols)?.reshape((cout, b, oh, ow))?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(&bias.reshape((cout, 1, 1, 1))?)?,
            None => y,
        };
        // A (b, cout, oh, ow) view of the (cout, b, oh, ow) product: the batch norm that
        // follows every convolution here works in the channel-major layout anyway, so
        // no copy is made in either direction.
        y.transpose(0, 1)
    }
}

/// im2col of a contiguous `(b, c, h, w)` input for a `k x k` kernel with zero padding
/// `k / 2` and stride `stride`: the `(c k k, b oh ow)` matrix whose row `(ci, ky, kx)`
/// holds the input pixel each output position sees through that kernel tap (0 in the
/// padding). Its backward pass is the adjoint scatter-add, col2im ([`Col2Im`]).
#[derive(Clone, Copy)]
struct Im2Col {
    dims: (usize, usize, usize, usize),
    k: usize,
    stride: usize,
}

impl Im2Col {
    fn out_hw(&self) -> (usize, usize) {
        let (_, _, h, w) = self.dims;
        let (k, s, p) = (self.k, self.stride, self.k / 2);
        ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1)
    }

    /// Columns per row of the column matrix (`b oh ow`).
    fn n(&self) -> usize {
        let (oh, ow) = self.out_hw();
        self.dims.0 * oh * ow
    }

    /// Calls `f(col, input, len)` for every run of column entries `col..col + len` that
    /// read the input entries `input, input + stride, ...` (one output row of one kernel
    /// tap; entries in the padding are skipped), over input channels `channels` and
    /// images `images`.
    fn runs(
        &self,
        channels: std::ops::Range<usize>,
        images: std::ops::Range<usize>,
        mut f: impl FnMut(usize, usize, usize),
    ) {
        let (_, c, h, w) = self.dims;
        let (k, s, p) = (self.k, self.stride, self.k / 2);
        let (oh, ow) = self.out_hw();
        let n = self.n();
        for ci in channels {
            for ky in 0..k {
                for kx in 0..k {
                    let row = ((ci * k + ky) * k + kx) * n;
                    // output columns ox whose input column ox s + kx - p is in 0..w
                    let lo = p.saturating_sub(kx).div_ceil(s);
                    let hi = match (w + p).checked_sub(kx + 1) {
                        Some(last) => (last / s + 1).min(ow),
                        None => 0,
                    };
                    if lo >= hi {
                        continue;
                    }
                    for bi in images.clone() {
                        for oy in 0..oh {
                            let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&y| y < h) else {
                                continue;
                            };
                            let input = ((bi * c + ci) * h + iy) * w + lo * s + kx - p;
                            f(row + (bi * oh + oy) * ow + lo, input, hi - lo);
                        }
                    }
                }
            }
        }
    }

    /// The column matrix of `x`, one kernel tap row block per input channel in parallel.
    fn cols<T: Copy + Default + Send + Sync>(&self, x: &[T]) -> Vec<T> {
        let (_, c, _, _) = self.dims;
        let (kk, n, s) = (self.k * self.k, self.n(), self.stride);
        let mut out = vec![T::default(); c * kk * n];
        out.par_chunks_mut(kk * n)
            .enumerate()
            .for_each(|(ci, chunk)| {
                self.runs(ci..ci + 1, 0..self.dims.0, |o, i, len| {
                    let o = o - ci * kk * n;
                    if s == 1 {
                        chunk[o..o + len].copy_from_slice(&x[i..i + len]);
                    } else {
                        for (j, v) in chunk[o..o + len].iter_mut().enumerate() {
                            *v = x[i + j * s];
                        }
                    }
                })
            });
        out
    }

    /// The adjoint of [`cols`](Self::cols): every column entry added to the input entry
    /// it read, one image in parallel.
    fn col2im<T: Copy + Default + Send + Sync + std::ops::AddAssign>(&self, g: &[T]) -> Vec<T> {
        let (b, c, h, w) = self.dims;
        let s = self.stride;
        let mut out = vec![T::default(); b * c * h * w];
        out.par_chunks_mut(c * h * w)
            .enumerate()
            .for_each(|(bi, chunk)| {
                self.runs(0..c, bi..bi + 1, |o, i, len| {
                    let i = i - bi * c * h * w;
                    for (j, v) in g[o..o + len].iter().enumerate() {
                        chunk[i + j * s] += *v;
                    }
                })
            });
        out
    }
}

/// Applies `f` to the contiguous f16, f32 or f64 data of `storage`, keeping the dtype.
fn float_map(
    what: &str,
    storage: &candle_core::CpuStorage,
    layout: &candle_core::Layout,
    f32s: impl Fn(&[f32]) -> Vec<f32>,
    f64s: impl Fn(&[f64]) -> Vec<f64>,
    f16s: impl Fn(&[half::f16]) -> Vec<half::f16>,
) -> CResult<candle_core::CpuStorage> {
    use candle_core::CpuStorage as S;
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: the input must be contiguous")
    };
    Ok(match storage {
        S::F32(x) => S::F32(f32s(&x[start..end])),
        S::F64(x) => S::F64(f64s(&x[start..end])),
        S::F16(x) => S::F16(f16s(&x[start..end])),
        _ => candle_core::bail!(
            "{what}: an f16, f32 or f64 input only (candle 0.10 has no bf16 matmul on the CPU)"
        ),
    })
}

impl candle_core::CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> CResult<(candle_core::CpuStorage, candle_core::Shape)> {
        let (_, c, _, _) = self.dims;
        let shape = candle_core::Shape::from((c * self.k * self.k, self.n()));
        let out = float_map(
            "im2col",
            storage,
            layout,
            |x| self.cols(x),
            |x| self.cols(x),
            |x| self.cols(x),
        )?;
        Ok((out, shape))
    }

    fn bwd(&self, _arg: &CTensor, _res: &CTensor, grad: &CTensor) -> CResult<Option<CTensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im(*self))?))
    }
}

/// col2im, the backward pass of [`Im2Col`], as an op on the gradient's storage (no
/// copy out of candle); it is not differentiated itself.
struct Col2Im(Im2Col);

impl candle_core::CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> CResult<(candle_core::CpuStorage, candle_core::Shape)> {
        let op = &self.0;
        let out = float_map(
            "col2im",
            storage,
            layout,
            |g| op.col2im(g),
            |g| op.col2im(g),
            |g| op.col2im(g),
        )?;
        Ok((out, candle_core::Shape::from(op.dims)))
    }
}

/// A batch norm (`weight`, `bias`, `running_mean`, `running_var` under candle_nn's
/// names, initialisation, eps 1e-5 and momentum 0.1) whose training-mode pass is one
/// fused op ([`BnTrain`]) instead of candle_nn's chain of broadcast ops (about eight
/// passes over the activations forward and more backward); outputs, running
/// statistics and gradients are candle_nn's `BatchNorm`'s up to rounding (tested).
struct Norm {
    weight: CTensor,
    bias: CTensor,
    running_mean: Var,
    running_var: Var,
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

impl Norm {
    fn new(c: usize, vb: VarBuilder) -> CResult<Self> {
        use candle_nn::Init;
        let running_mean = vb.get_with_hints(c, "running_mean", Init::Const(0.))?;
        let running_var = vb.get_with_hints(c, "running_var", Init::Const(1.))?;
        Ok(Norm {
            weight: vb.get_with_hints(c, "weight", Init::Const(1.))?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.))?,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
        })
    }

    /// Normalises a `(b, c, h, w)` input with batch statistics (`train`, updating the
    /// running ones) or the running statistics.
    fn forward_t(&self, x: &CTensor, train: bool) -> CResult<CTensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.weight.dim(0)? {
            candle_core::bail!(
                "batch norm: input has {c} channels, the norm {}",
                self.weight.dim(0)?
            )
        }
        if !train {
            let scale = (&self.weight / (self.running_var.as_tensor() + BN_EPS)?.sqrt()?)?;
            let shift = (&self.bias - (self.running_mean.as_tensor() * &scale)?)?;
            let dims = (1, c, 1, 1);
            return x
                .broadcast_mul(&scale.reshape(dims)?)?
                .broadcast_add(&shift.reshape(dims)?);
        }
        let dtype = x.dtype();
        let inner = match dtype {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        let n = b * h * w;
        // Channel-major (c, b h w): a view, no copy, of a convolution's output here.
        let xc = x
            .to_dtype(inner)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((c, n))?;
        let (wt, bt) = (self.weight.to_dtype(inner)?, self.bias.to_dtype(inner)?);
        let packed = xc.apply_op3(&wt, &bt, BnTrain)?;
        let y = packed.narrow(0, 0, c * n)?.reshape((c, b, h, w))?;
        let mean = packed.narrow(0, c * n, c)?.detach();
        let var = packed.narrow(0, c * n + c, c)?.detach();
        let unbiased = if n > 1 {
            n as f64 / (n - 1) as f64
        } else {
            1.0
        };
        let rm = self.running_mean.as_tensor();
        let rv = self.running_var.as_tensor();
        self.running_mean
            .set(&((rm * (1.0 - BN_MOMENTUM))? + (mean.to_dtype(rm.dtype())? * BN_MOMENTUM)?)?)?;
        self.running_var.set(
            &((rv * (1.0 - BN_MOMENTUM))?
                + (var.to_dtype(rv.dtype())? * (BN_MOMENTUM * unbiased))?)?,
        )?;
        y.to_dtype(dtype)?.transpose(0, 1)
    }
}

/// Training-mode batch norm of a contiguous `(c, n)` input with weight and bias `(c)`:
/// `y = (x - mean) / sqrt(var + eps) * weight + bias` per row, batch mean and (biased)
/// variance per row. The result is packed flat: `y` (`c n`), then the means and the
/// variances (`c` each), so that one op returns what the running statistics need.
struct BnTrain;

/// Per row of `x`: mean and `1 / sqrt(var + eps)` (two passes, f64 accumulators).
fn row_stats<T: candle_core::WithDType>(row: &[T]) -> (f64, f64, f64) {
    let n = row.len().max(1) as f64;
    let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, var, 1.0 / (var + BN_EPS).sqrt())
}

fn slice<'a, T: candle_core::WithDType>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> CResult<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("batch norm: {what} must be contiguous")
    };
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

/// A batch-norm kernel: input `(c, n)`, weight `(c)` and `third` (bias or gradient),
/// each contiguous, as f32 or f64 slices; the result packs `c n + 2 c` values.
type Kernel<T> = fn(&[T], &[T], &[T]) -> Vec<T>;

/// Runs `single` or `double` (the same kernel at f32 and f64) on the three operands of a
/// batch-norm custom op, by the input's dtype.
fn packed_op3(
    ops: [(&candle_core::CpuStorage, &candle_core::Layout); 3],
    third: &str,
    single: Kernel<f32>,
    double: Kernel<f64>,
) -> CResult<(candle_core::CpuStorage, candle_core::Shape)> {
    use candle_core::CpuStorage as S;
    let [(s1, l1), (s2, l2), (s3, l3)] = ops;
    let (c, n) = l1.shape().dims2()?;
    let out = match s1 {
        S::F32(_) => S::F32(single(
            slice(s1, l1, "the input")?,
            slice(s2, l2, "the weight")?,
            slice(s3, l3, third)?,
        )),
        S::F64(_) => S::F64(double(
            slice(s1, l1, "the input")?,
            slice(s2, l2, "the weight")?,
            slice(s3, l3, third)?,
        )),
        _ => candle_core::bail!("batch norm: an f32 or f64 input only"),
    };
    Ok((out, candle_core::Shape::from(c * n + 2 * c)))
}

impl BnTrain {
    fn fwd<T: candle_core::WithDType + Send + Sync>(x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let c = w.len();
        let n = x.len() / c.max(1);
        let mut out = vec![T::from_f64(0.0); c * n + 2 * c];
        let (y, stats) = out.split_at_mut(c * n);
        let moments: Vec<(f64, f64)> = y
            .par_chunks_mut(n.max(1))
            .zip(x.par_chunks(n.max(1)))
            .enumerate()
            .map(|(ci, (yr, xr))| {
                let (mean, var, inv) = row_stats(xr);
                let (g, beta) = (w[ci].to_f64(), b[ci].to_f64());
                let (scale, shift) = (g * inv, beta - mean * g * inv);
                for (o, v) in yr.iter_mut().zip(xr) {
                    *o = T::from_f64(v.to_f64() * scale + shift);
                }
                (mean, var)
            })
            .collect();
        for (ci, (mean, var)) in moments.into_iter().enumerate() {
            stats[ci] = T::from_f64(mean);
            stats[c + ci] = T::from_f64(var);
        }
        out
    }

    /// Gradients packed as `dx` (`c n`), `dweight`, `dbias` (`c` each) from the input,
    /// the weight and the output gradient `dy` (the first `c n` entries of `g`).
    fn bwd<T: candle_core::WithDType + Send + Sync>(x: &[T], w: &[T], g: &[T]) -> Vec<T> {
        let c = w.len();
        let n = x.len() / c.max(1);
        let dy = &g[..c * n];
        let mut out = vec![T::from_f64(0.0); c * n + 2 * c];
        let (dx, rest) = out.split_at_mut(c * n);
        let sums: Vec<(f64, f64)> = dx
            .par_chunks_mut(n.max(1))
            .zip(x.par_chunks(n.max(1)).zip(dy.par_chunks(n.max(1))))
            .enumerate()
            .map(|(ci, (dxr, (xr, dyr)))| {
                let (mean, _, inv) = row_stats(xr);
                let f = |v: &T| v.to_f64();
                let (mut sdy, mut sdyx) = (0.0, 0.0);
                for (v, d) in xr.iter().zip(dyr) {
                    sdy += f(d);
                    sdyx += f(d) * (f(v) - mean) * inv;
                }
                let nf = n as f64;
                let k = f(&w[ci]) * inv;
                for ((o, v), d) in dxr.iter_mut().zip(xr).zip(dyr) {
                    let xhat = (f(v) - mean) * inv;
                    *o = T::from_f64(k * (f(d) - sdy / nf - xhat * sdyx / nf));
                }
                (sdyx, sdy)
            })
            .collect();
        for (ci, (dw, db)) in sums.into_iter().enumerate() {
            rest[ci] = T::from_f64(dw);
            rest[c + ci] = T::from_f64(db);
        }
        out
    }
}

impl candle_core::CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> CResult<(candle_core::CpuStorage, candle_core::Shape)> {
        packed_op3(
            [(s1, l1), (s2, l2), (s3, l3)],
            "the bias",
            Self::fwd,
            Self::fwd,
        )
    }

    fn bwd(
        &self,
        x: &CTensor,
        w: &CTensor,
        _b: &CTensor,
        _res: &CTensor,
        grad: &CTensor,
    ) -> CResult<(Option<CTensor>, Option<CTensor>, Option<CTensor>)> {
        let (c, n) = x.dims2()?;
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &BnTrainBwd)?;
        Ok((
            Some(packed.narrow(0, 0, c * n)?.reshape((c, n))?),
            Some(packed.narrow(0, c * n, c)?),
            Some(packed.narrow(0, c * n + c, c)?),
        ))
    }
}

/// The backward pass of [`BnTrain`] (not differentiated itself).
struct BnTrainBwd;

impl candle_core::CustomOp3 for BnTrainBwd {
    fn name(&self) -> &'static str {
        "batch-norm-train-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> CResult<(candle_core::CpuStorage, candle_core::Shape)> {
        packed_op3(
            [(s1, l1), (s2, l2), (s3, l3)],
            "the gradient",
            BnTrain::bwd,
            BnTrain::bwd,
        )
    }
}

struct Block {
    name: String,
    conv1: Conv,
    bn1: Norm,
    conv2: Conv,
    bn2: Norm,
    shortcut: Option<(Conv, Norm)>,
}

/// A CIFAR-style ResNet ([`specs::ResNet`]: ResNet-20 and friends) in candle: a 3x3 stem
/// convolution with batch norm and ReLU, basic blocks `relu(bn2(conv2(relu(bn1(conv1
/// x)))) + shortcut(x))` (the first block of every later stage halves the resolution
/// and projects the shortcut with a 1x1 convolution and batch norm), global average
/// pooling and a linear head. Its parameters are exactly `arch.shapes()`, so
/// `arch.spec()` permutes it.
///
/// ```
/// use modelfusion::candle::{candle_core::{DType, Device, Tensor}, candle_nn, CandleResNet, to_state_dict_from_varmap};
/// use modelfusion::perm::specs::{Architecture, ResNet};
/// use modelfusion::StateDictF32;
/// let arch = ResNet::new(1, &[(4, 1), (8, 1)], 10)?;
/// let vm = candle_nn::VarMap::new();
/// let net = CandleResNet::new(&arch, candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// let x = Tensor::zeros((2, 1, 8, 8), DType::F32, &Device::Cpu)?;
/// assert_eq!(net.forward_t(&x, false)?.dims(), &[2, 10]);
/// let sd: StateDictF32 = to_state_dict_from_varmap(&vm)?;
/// assert!(arch.spec().check(&sd)?.is_sound());
/// assert_eq!(net.repair_layers()[0], ("bn1".to_string(), None));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct CandleResNet {
    conv1: Conv,
    bn1: Norm,
    blocks: Vec<(usize, Block)>,
    linear: Linear,
}

impl CandleResNet {
    /// Builds the network of `arch` from `vb` (names as [`specs::ResNet`]'s).
    ///
    /// ```
    /// // see the type-level example
    /// # let _ = modelfusion::candle::CandleResNet::new;
    /// ```
    pub fn new(arch: &specs::ResNet, vb: VarBuilder) -> CResult<Self> {
        let w0 = arch.stages[0].0;
        let conv1 = Conv::new(arch.in_channels, w0, 3, 1, false, vb.pp("conv1"))?;
        let bn1 = Norm::new(w0, vb.pp("bn1"))?;
        let mut blocks = Vec::new();
        let mut cin = w0;
        for (si, &(w, n)) in arch.stages.iter().enumerate() {
            let s = si + 1;
            for b in 0..n {
                let name = format!("layer{s}.{b}");
                let v = vb.pp(&name);
                let down = s > 1 && b == 0;
                let stride = if down { 2 } else { 1 };
                let shortcut = if down {
                    Some((
                        Conv::new(cin, w, 1, stride, false, v.pp("shortcut").pp(0))?,
                        Norm::new(w, v.pp("shortcut").pp(1))?,
                    ))
                } else {
                    None
                };
                blocks.push((
                    s,
                    Block {
                        conv1: Conv::new(cin, w, 3, stride, false, v.pp("conv1"))?,
                        bn1: Norm::new(w, v.pp("bn1"))?,
                        conv2: Conv::new(w, w, 3, 1, false, v.pp("conv2"))?,
                        bn2: Norm::new(w, v.pp("bn2"))?,
                        shortcut,
                        name,
                    },
                ));
                cin = w;
            }
        }
        let linear = candle_nn::linear(cin, arch.classes, vb.pp("linear"))?;
        Ok(CandleResNet {
            conv1,
            bn1,
            blocks,
            linear,
        })
    }

    /// The logits; `train` normalises with batch statistics (and updates the running
    /// ones, as candle's batch norm does).
    ///
    /// ```
    /// // see the type-level example
    /// # let _ = modelfusion::candle::CandleResNet::forward_t;
    /// ```
    pub fn forward_t(&self, x: &CTensor, train: bool) -> CResult<CTensor> {
        Ok(self.forward_taps(x, train)?.0)
    }

    /// The logits and the [`Taps`] of one forward pass.
    ///
    /// ```
    /// use modelfusion::candle::{candle_core::{DType, Device, Tensor}, candle_nn, CandleResNet};
    /// use modelfusion::perm::specs::ResNet;
    /// let vm = candle_nn::VarMap::new();
    /// let net = CandleResNet::new(&ResNet::new(1, &[(4, 2)], 3)?, candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    /// let (_, taps) = net.forward_taps(&Tensor::ones((2, 1, 4, 4), DType::F32, &Device::Cpu)?, false)?;
    /// assert_eq!(taps.groups.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["layer1.0.inner", "layer1.1.inner", "stream.1"]);
    /// assert_eq!(taps.sums.len(), 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_taps(&self, x: &CTensor, train: bool) -> CResult<(CTensor, Taps)> {
        let mut taps = Taps::default();
        let mut h = taps
            .norm("bn1", &self.bn1, &self.conv1.forward(x)?, train)?
            .relu()?;
        let mut streams: Vec<(usize, Vec<CTensor>)> = vec![(1, vec![h.clone()])];
        for (s, blk) in &self.blocks {
            let n = &blk.name;
            let inner = taps
                .norm(
                    &format!("{n}.bn1"),
                    &blk.bn1,
                    &blk.conv1.forward(&h)?,
                    train,
                )?
                .relu()?;
            taps.groups.push((format!("{n}.inner"), inner.clone()));
            let out = taps.norm(
                &format!("{n}.bn2"),
                &blk.bn2,
                &blk.conv2.forward(&inner)?,
                train,
            )?;
            let skip = match &blk.shortcut {
                Some((c, b)) => taps.norm(&format!("{n}.shortcut.1"), b, &c.forward(&h)?, train)?,
                None => h.clone(),
            };
            let sum = (out + skip)?;
            taps.sums.push((format!("{n}.sum"), sum.clone()));
            h = sum.relu()?;
            match streams.last_mut() {
                Some((last, list)) if last == s => list.push(h.clone()),
                _ => streams.push((*s, vec![h.clone()])),
            }
        }
        for (s, list) in streams {
            taps.groups
                .push((format!("stream.{s}"), CTensor::cat(&list, 0)?));
        }
        let logits = self.linear.forward(&h.mean((2, 3))?)?;
        Ok((logits, taps))
    }

    /// The layers [`OutputRepair`](crate::align::OutputRepair) resets, in forward order:
    /// `(batch norm, None)` for a norm reset on its own, `(batch norm, Some(sum key))`
    /// for the last norm writing a residual sum (`bn2` of every block).
    ///
    /// ```
    /// // see the type-level example
    /// # let _ = modelfusion::candle::CandleResNet::repair_layers;
    /// ```
    pub fn repair_layers(&self) -> Vec<(String, Option<String>)> {
        let mut out = vec![("bn1".to_string(), None)];
        for (_, blk) in &self.blocks {
            let n = &blk.name;
            out.push((format!("{n}.bn1"), None));
            if blk.shortcut.is_some() {
                out.push((format!("{n}.shortcut.1"), None));
            }
            out.push((format!("{n}.bn2"), Some(format!("{n}.sum"))));
        }
        out
    }
}

/// A VGG-style network ([`specs::Vgg`]) in candle: `convs.{i}` (with bias) each followed
/// by batch norm `norms.{i}` and ReLU, a 2x2 max pool after the convolutions listed in
/// `pools`, global average pooling, and linear layers `fcs.{j}` with ReLU between.
///
/// ```
/// use modelfusion::candle::{candle_core::{DType, Device, Tensor}, candle_nn, CandleVgg};
/// use modelfusion::perm::specs::Vgg;
/// let arch = Vgg::new(1, &[4, 8], &[6, 3], 3)?;
/// let vm = candle_nn::VarMap::new();
/// let net = CandleVgg::new(&arch, &[0], candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// let (y, taps) = net.forward_taps(&Tensor::ones((2, 1, 8, 8), DType::F32, &Device::Cpu)?, false)?;
/// assert_eq!(y.dims(), &[2, 3]);
/// assert_eq!(taps.groups.len(), 3); // conv.0, conv.1, fc.0
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct CandleVgg {
    convs: Vec<(Conv, Norm, bool)>,
    fcs: Vec<Linear>,
}

impl CandleVgg {
    /// Builds the network of `arch` from `vb`, pooling after the convolutions `pools`.
    ///
    /// ```
    /// // see the type-level example
    /// # let _ = modelfusion::candle::CandleVgg::new;
    /// ```
    pub fn new(arch: &specs::Vgg, pools: &[usize], vb: VarBuilder) -> CResult<Self> {
        let mut convs = Vec::new();
        let mut cin = arch.in_channels;
        for (i, &c) in arch.channels.iter().enumerate() {
            convs.push((
                Conv::new(cin, c, arch.kernel, 1, true, vb.pp(format!("convs.{i}")))?,
                Norm::new(c, vb.pp(format!("norms.{i}")))?,
                pools.contains(&i),
            ));
            cin = c;
        }
        let mut fcs = Vec::new();
        for (j, &f) in arch.fc.iter().enumerate() {
            fcs.push(candle_nn::linear(cin, f, vb.pp(format!("fcs.{j}")))?);
            cin = f;
        }
        Ok(CandleVgg { convs, fcs })
    }

    /// The logits and the [`Taps`] of one forward pass (`sums` stays empty).
    ///
    /// ```
    /// // see the type-level example
    /// # let _ = modelfusion::candle::CandleVgg::forward_taps;
    /// ```
    pub fn forward_taps(&self, x: &CTensor, train: bool) -> CResult<(CTensor, Taps)> {
        let mut taps = Taps::default();
        let mut h = x.clone();
        for (i, (c, b, pool)) in self.convs.iter().enumerate() {
            h = taps
                .norm(&format!("norms.{i}"), b, &c.forward(&h)?, train)?
                .relu()?;
            taps.groups.push((format!("conv.{i}"), h.clone()));
            if *pool {
                h = h.max_pool2d(2)?;
            }
        }
        h = h.mean((2, 3))?;
        let last = self.fcs.len() - 1;
        for (j, l) in self.fcs.iter().enumerate() {
            h = l.forward(&h)?;
            if j < last {
                h = h.relu()?;
                taps.groups.push((format!("fc.{j}"), h.clone()));
            }
        }
        Ok((h, taps))
    }

    /// The logits.
    ///
    /// ```
    /// // see the type-level example
    /// # let _ = modelfusion::candle::CandleVgg::forward_t;
    /// ```
    pub fn forward_t(&self, x: &CTensor, train: bool) -> CResult<CTensor> {
        Ok(self.forward_taps(x, train)?.0)
    }

    /// The batch norms [`OutputRepair`](crate::align::OutputRepair) resets, in forward
    /// order (`norms.{i}`; none writes a stream).
    ///
    /// ```
    /// // see the type-level example
    /// # let _ = modelfusion::candle::CandleVgg::repair_layers;
    /// ```
    pub fn repair_layers(&self) -> Vec<(String, Option<String>)> {
        (0..self.convs.len())
            .map(|i| (format!("norms.{i}"), None))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use proptest::prelude::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn norm(t: &CTensor) -> f32 {
        t.sqr()
            .and_then(|n| n.sum_all()?.to_scalar::<f32>())
            .unwrap()
            .sqrt()
    }

    fn rel(a: &CTensor, b: &CTensor) -> f32 {
        let d = (a - b).and_then(|d| d.sqr()?.sum_all()?.to_scalar::<f32>());
        let n = b.sqr().and_then(|n| n.sum_all()?.to_scalar::<f32>());
        d.unwrap().sqrt() / n.unwrap().sqrt().max(1e-12)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// `Conv` equals candle's own `conv2d`, outputs and all three gradients.
        #[test]
        fn conv_matches_candle_conv2d(
            b in 1usize..4, cin in 1usize..5, cout in 1usize..5, hw in 3usize..10,
            k in prop::sample::select(vec![1usize, 3, 5]), stride in 1usize..3,
            bias in any::<bool>(), seed in 0u64..1000,
        ) {
            let dev = Device::Cpu;
            let vm = candle_nn::VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
            let ours = Conv::new(cin, cout, k, stride, bias, vb.pp("c")).unwrap();
            let cfg = Conv2dConfig { padding: k / 2, stride, ..Default::default() };
            let theirs = candle_nn::Conv2d::new(ours.weight.clone(), ours.bias.clone(), cfg);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut randn = |dims: &[usize]| {
                let v: Vec<f32> = (0..dims.iter().product()).map(|_| rng.random_range(-1.0..1.0)).collect();
                CTensor::from_vec(v, dims, &dev).unwrap()
            };
            let x = Var::from_tensor(&randn(&[b, cin, hw, hw])).unwrap();
            let y = ours.forward(&x).unwrap();
            let y0 = theirs.forward(&x).unwrap();
            prop_assert_eq!(y.dims(), y0.dims());
            prop_assert!(rel(&y, &y0) < 1e-5, "output {}", rel(&y, &y0));
            let r = randn(y0.dims());
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g0 = (&y0 * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let mut wrt = vec![x.as_tensor().clone(), ours.weight.clone()];
            wrt.extend(ours.bias.clone());
            // A gradient entry is a sum of products that can cancel, so its relative
            // error alone is ill-conditioned: accept a difference within f32 summation
            // error of the terms' scale, `|r| (|x| + |w| + 1)` (Cauchy-Schwarz).
            let scale = norm(&r) * (norm(&x) + norm(&ours.weight) + 1.0);
            for t in &wrt {
                let (a, e) = (g.get(t).unwrap(), g0.get(t).unwrap());
                let diff = rel(a, e) * norm(e).max(1e-12);
                prop_assert!(
                    rel(a, e) < 1e-5 || diff < 1e-6 * scale,
                    "gradient {:?}: relative {}, absolute {diff} against scale {scale}",
                    t.dims(),
                    rel(a, e)
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// `Norm` equals candle_nn's `BatchNorm`: outputs in both modes, the running
        /// statistics after a training pass, and the input, weight and bias gradients,
        /// on a contiguous input and on a convolution-like channel-major view.
        #[test]
        fn norm_matches_candle_batch_norm(
            b in 2usize..4, c in 1usize..5, hw in 2usize..6, seed in 0u64..1000,
            channel_major in any::<bool>(),
        ) {
            use candle_core::ModuleT;
            let dev = Device::Cpu;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut randn = |dims: &[usize], lo: f32, hi: f32| {
                let v: Vec<f32> = (0..dims.iter().product()).map(|_| rng.random_range(lo..hi)).collect();
                CTensor::from_vec(v, dims, &dev).unwrap()
            };
            let mut vm = candle_nn::VarMap::new();
            let ours = Norm::new(c, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
            for (name, lo, hi) in [("weight", -1.5, 1.5), ("bias", -1.0, 1.0), ("running_mean", -1.0, 1.0), ("running_var", 0.5, 2.0)] {
                vm.set_one(name, randn(&[c], lo, hi)).unwrap();
            }
            let theirs = candle_nn::BatchNorm::new(
                c,
                ours.running_mean.as_tensor().copy().unwrap(),
                ours.running_var.as_tensor().copy().unwrap(),
                ours.weight.clone(),
                ours.bias.clone(),
                BN_EPS,
            ).unwrap();
            let (xv, x) = if channel_major {
                let v = Var::from_tensor(&randn(&[c, b, hw, hw], -2.0, 3.0)).unwrap();
                let x = v.as_tensor().transpose(0, 1).unwrap();
                (v, x)
            } else {
                let v = Var::from_tensor(&randn(&[b, c, hw, hw], -2.0, 3.0)).unwrap();
                let x = v.as_tensor().clone();
                (v, x)
            };
            let y0 = theirs.forward_t(&x, false).unwrap();
            prop_assert!(rel(&ours.forward_t(&x, false).unwrap(), &y0) < 1e-5);
            let y = ours.forward_t(&x, true).unwrap();
            let y0 = theirs.forward_t(&x, true).unwrap();
            prop_assert_eq!(y.dims(), y0.dims());
            prop_assert!(rel(&y, &y0) < 1e-5, "output {}", rel(&y, &y0));
            prop_assert!(rel(ours.running_mean.as_tensor(), theirs.running_mean()) < 1e-5);
            prop_assert!(rel(ours.running_var.as_tensor(), theirs.running_var()) < 1e-5);
            let r = randn(y0.dims(), -1.0, 1.0);
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g0 = (&y0 * &r).unwrap().sum_all().unwrap().backward().unwrap();
            // The input gradient is a difference of nearly equal terms (it sums to zero
            // per channel), so candle's f32 sums leave it less accurate.
            for (t, tol) in [(xv.as_tensor(), 1e-3), (&ours.weight, 1e-4), (&ours.bias, 1e-4)] {
                let (a, e) = (g.get(t).unwrap(), g0.get(t).unwrap());
                prop_assert!(rel(a, e) < tol, "gradient {:?}: {}", t.dims(), rel(a, e));
            }
        }
    }

    /// The other float dtypes go through the same op (f64 to 1e-12 of the largest output,
    /// f16 to its rounding); bf16 (candle has no CPU bf16 matmul) and integer inputs are
    /// errors.
    #[test]
    fn conv_dtypes() {
        let dev = Device::Cpu;
        let x64 = CTensor::arange(0f64, 2. * 3. * 5. * 5., &dev)
            .and_then(|x| (x.reshape((2, 3, 5, 5))? * 0.01)?.sin())
            .unwrap();
        let w64 = CTensor::arange(0f64, 4. * 3. * 9., &dev)
            .and_then(|w| (w.reshape((4, 3, 3, 3))? * 0.1)?.cos())
            .unwrap();
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F16, 1e-2)] {
            let (x, w) = (x64.to_dtype(dt).unwrap(), w64.to_dtype(dt).unwrap());
            let ours = Conv {
                weight: w.clone(),
                bias: None,
                stride: 2,
            };
            let y = ours.forward(&x).unwrap().to_dtype(DType::F64).unwrap();
            let y0 = candle_nn::Conv2d::new(w64.clone(), None, cfg)
                .forward(&x64)
                .unwrap();
            let max = |t: &CTensor| {
                t.abs()
                    .and_then(|a| a.max_all()?.to_scalar::<f64>())
                    .unwrap()
            };
            assert!(max(&(&y - &y0).unwrap()) < tol * max(&y0), "{dt:?}");
        }
        for dt in [DType::BF16, DType::U32] {
            let ours = Conv {
                weight: w64.to_dtype(dt).unwrap(),
                bias: None,
                stride: 1,
            };
            assert!(ours.forward(&x64.to_dtype(dt).unwrap()).is_err(), "{dt:?}");
        }
    }
}
