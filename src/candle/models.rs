//! The crate's ready convolutional architectures ([`perm::specs::ResNet`] and
//! [`perm::specs::Vgg`]) as candle models, under exactly the parameter names of their
//! specs, with the taps fusion algorithms read (group features, batch-norm inputs and
//! outputs, residual sums).
//!
//! [`perm::specs::ResNet`]: crate::perm::specs::ResNet
//! [`perm::specs::Vgg`]: crate::perm::specs::Vgg

use candle_core::{Module, ModuleT, Result as CResult, Tensor as CTensor};
use candle_nn::{BatchNorm, Conv2dConfig, Linear, VarBuilder};

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
    fn norm(&mut self, name: &str, bn: &BatchNorm, x: &CTensor, train: bool) -> CResult<CTensor> {
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
        y.transpose(0, 1)?.contiguous()
    }
}

/// im2col of a contiguous `(b, c, h, w)` input for a `k x k` kernel with zero padding
/// `k / 2` and stride `stride`: the `(c k k, b oh ow)` matrix whose row `(ci, ky, kx)`
/// holds the input pixel each output position sees through that kernel tap (0 in the
/// padding). Its backward pass is the adjoint scatter-add (col2im).
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

    /// Calls `f(col index, input index)` for every column entry that reads the input
    /// (entries in the padding are skipped), in column order.
    fn for_each(&self, mut f: impl FnMut(usize, usize)) {
        let (b, c, h, w) = self.dims;
        let (k, s, p) = (self.k, self.stride, self.k / 2);
        let (oh, ow) = self.out_hw();
        let n = b * oh * ow;
        for ci in 0..c {
            for ky in 0..k {
                for kx in 0..k {
                    let row = ((ci * k + ky) * k + kx) * n;
                    for bi in 0..b {
                        for oy in 0..oh {
                            let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&y| y < h) else {
                                continue;
                            };
                            let base = ((bi * c + ci) * h + iy) * w;
                            let col = row + (bi * oh + oy) * ow;
                            for ox in 0..ow {
                                if let Some(ix) = (ox * s + kx).checked_sub(p).filter(|&x| x < w) {
                                    f(col + ox, base + ix);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn cols<T: Copy + Default>(&self, x: &[T]) -> Vec<T> {
        let (b, c, _, _) = self.dims;
        let (oh, ow) = self.out_hw();
        let mut out = vec![T::default(); c * self.k * self.k * b * oh * ow];
        self.for_each(|o, i| out[o] = x[i]);
        out
    }

    fn col2im<T: Copy + Default + std::ops::AddAssign>(&self, g: &[T]) -> Vec<T> {
        let (b, c, h, w) = self.dims;
        let mut out = vec![T::default(); b * c * h * w];
        self.for_each(|o, i| out[i] += g[o]);
        out
    }
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
        use candle_core::CpuStorage as S;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("im2col: the input must be contiguous")
        };
        let (b, c, _, _) = self.dims;
        let (oh, ow) = self.out_hw();
        let shape = candle_core::Shape::from((c * self.k * self.k, b * oh * ow));
        Ok(match storage {
            S::F32(x) => (S::F32(self.cols(&x[start..end])), shape),
            S::F64(x) => (S::F64(self.cols(&x[start..end])), shape),
            S::F16(x) => (S::F16(self.cols(&x[start..end])), shape),
            _ => candle_core::bail!(
                "im2col: an f16, f32 or f64 input only (candle 0.10 has no bf16 matmul on the CPU)"
            ),
        })
    }

    fn bwd(&self, arg: &CTensor, _res: &CTensor, grad: &CTensor) -> CResult<Option<CTensor>> {
        let g = grad.flatten_all()?;
        let out = match arg.dtype() {
            candle_core::DType::F32 => {
                CTensor::from_vec(self.col2im(&g.to_vec1::<f32>()?), arg.shape(), arg.device())
            }
            candle_core::DType::F64 => {
                CTensor::from_vec(self.col2im(&g.to_vec1::<f64>()?), arg.shape(), arg.device())
            }
            candle_core::DType::F16 => CTensor::from_vec(
                self.col2im(&g.to_vec1::<half::f16>()?),
                arg.shape(),
                arg.device(),
            ),
            d => candle_core::bail!("im2col: dtype {d:?} (a float dtype only)"),
        }?;
        Ok(Some(out))
    }
}

fn bn(c: usize, vb: VarBuilder) -> CResult<BatchNorm> {
    candle_nn::batch_norm(c, 1e-5, vb)
}

struct Block {
    name: String,
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    shortcut: Option<(Conv, BatchNorm)>,
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
    bn1: BatchNorm,
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
        let bn1 = bn(w0, vb.pp("bn1"))?;
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
                        bn(w, v.pp("shortcut").pp(1))?,
                    ))
                } else {
                    None
                };
                blocks.push((
                    s,
                    Block {
                        conv1: Conv::new(cin, w, 3, stride, false, v.pp("conv1"))?,
                        bn1: bn(w, v.pp("bn1"))?,
                        conv2: Conv::new(w, w, 3, 1, false, v.pp("conv2"))?,
                        bn2: bn(w, v.pp("bn2"))?,
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
    convs: Vec<(Conv, BatchNorm, bool)>,
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
                bn(c, vb.pp(format!("norms.{i}")))?,
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
            for t in &wrt {
                let (a, e) = (g.get(t).unwrap(), g0.get(t).unwrap());
                prop_assert!(rel(a, e) < 1e-5, "gradient {:?}: {}", t.dims(), rel(a, e));
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
