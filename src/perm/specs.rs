//! Ready permutation specs for common architectures, with the parameter shapes that go
//! with them.
//!
//! Each architecture is a small value implementing [`Architecture`]: its
//! [`spec`](Architecture::spec), its parameter [`shapes`](Architecture::shapes) (PyTorch
//! layout and naming), and a seeded [`random_model`](Architecture::random_model) for tests
//! and benchmarks.
//!
//! | architecture | parameters | groups |
//! |---|---|---|
//! | [`MlpShapes`] | `layers.{i}.weight` `(out, in)`, `layers.{i}.bias` | `hidden.{i}`: output of every layer but the last |
//! | [`ResMlpShapes`] | `stem.*`, `blocks.{j}.norm.{weight,bias,running_mean,running_var}`, `blocks.{j}.fc1.*`, `blocks.{j}.fc2.*`, `head.*` | `residual` (the stream), `blocks.{j}.hidden` |
//! | [`Vgg`] | `convs.{i}.{weight,bias}` `(out, in, k, k)`, `norms.{i}.{weight,bias,running_mean,running_var}`, `fcs.{j}.{weight,bias}` | `conv.{i}`, `fc.{j}` (all but the last linear layer) |
//! | [`ResNet`] | `conv1.weight`, `bn1.*`, `layer{s}.{b}.{conv1,bn1,conv2,bn2}.*`, `layer{s}.0.shortcut.{0,1}.*`, `linear.*` | `stream.{s}` (one per stage's residual stream), `layer{s}.{b}.inner` |
//!
//! The names match the reference networks of the `nn` module (MLP and residual MLP), so
//! a spec built here applies directly to their state dicts.
//!
//! ```
//! use modelfusion::perm::specs::{Architecture, ResNet};
//! let arch = ResNet::resnet20(1, 10);
//! let model = arch.random_model(0);
//! let sizes = arch.spec().validate(&model).unwrap();
//! assert_eq!(sizes["stream.3"], 64);
//! assert_eq!(sizes.len(), 3 + 9);
//! ```

use ndarray::{ArrayD, IxDyn};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

use super::{PermutationSpec, SpecBuilder};
use crate::error::{Error, Result};
use crate::model::StateDict;

/// An architecture: the permutation spec and the parameter shapes that go together.
pub trait Architecture {
    /// The permutation spec.
    fn spec(&self) -> PermutationSpec;
    /// Every parameter's name and shape, in the network's order.
    fn shapes(&self) -> Vec<(String, Vec<usize>)>;

    /// A model with random parameters, reproducible from `seed`: weights
    /// `N(0, 1/fan_in)`, biases and norm shifts `N(0, 0.01)`, norm scales `1 + N(0, 0.01)`,
    /// running means `N(0, 0.01)`, running variances uniform on `[0.5, 1.5]`.
    ///
    /// ```
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// use modelfusion::Model;
    /// let arch = MlpShapes::new(&[3, 5, 2]).unwrap();
    /// assert_eq!(arch.random_model(1), arch.random_model(1));
    /// assert_eq!(arch.random_model(1).num_elements(), 3 * 5 + 5 + 5 * 2 + 2);
    /// ```
    fn random_model(&self, seed: u64) -> StateDict<ArrayD<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let small = Normal::new(0.0f32, 0.1).unwrap_or_else(|_| unreachable!());
        let var = Uniform::new(0.5f32, 1.5).unwrap_or_else(|_| unreachable!());
        let mut sd = StateDict::new();
        for (name, shape) in self.shapes() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("running_var") {
                (0..n).map(|_| var.sample(&mut rng)).collect()
            } else if shape.len() >= 2 {
                let fan_in: usize = shape[1..].iter().product();
                let std = (1.0 / fan_in.max(1) as f32).sqrt();
                let w = Normal::new(0.0f32, std).unwrap_or_else(|_| unreachable!());
                (0..n).map(|_| w.sample(&mut rng)).collect()
            } else if is_norm_scale(&name) {
                (0..n).map(|_| 1.0 + small.sample(&mut rng)).collect()
            } else {
                (0..n).map(|_| small.sample(&mut rng)).collect()
            };
            let t = ArrayD::from_shape_vec(IxDyn(&shape), data)
                .unwrap_or_else(|_| unreachable!("length computed from the shape"));
            sd.insert(name, t)
                .unwrap_or_else(|_| unreachable!("architectures name each parameter once"));
        }
        sd
    }
}

fn is_norm_scale(name: &str) -> bool {
    (name.contains("norm") || name.contains("bn") || name.contains("shortcut.1"))
        && name.ends_with(".weight")
}

/// The four tensors of a batch-norm layer.
const NORM_PARAMS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

/// The ready specs are consistent by construction.
fn built(b: &SpecBuilder) -> PermutationSpec {
    b.build()
        .unwrap_or_else(|e| unreachable!("ready specs are consistent: {e}"))
}

/// Declares the network's input layer and output layer invariant (their input and
/// output axes are not permuted).
fn ends(b: &mut SpecBuilder, first: &str, last: &str) {
    b.invariant(format!("{first}.weight"))
        .invariant(format!("{last}.weight"))
        .invariant(format!("{last}.bias"));
}

fn check_positive(param: &str, values: &[usize]) -> Result<()> {
    if values.contains(&0) {
        return Err(Error::invalid(
            param,
            format!("sizes must be positive, got {values:?}"),
        ));
    }
    Ok(())
}

/// The spec of an MLP with `num_hidden` hidden layers (`num_hidden + 1` linear layers
/// named `layers.{i}`); groups `hidden.{i}`.
///
/// ```
/// let spec = modelfusion::perm::specs::mlp(2);
/// assert_eq!(spec.group_names().collect::<Vec<_>>(), vec!["hidden.0", "hidden.1"]);
/// ```
pub fn mlp(num_hidden: usize) -> PermutationSpec {
    let mut b = SpecBuilder::new();
    for i in 0..num_hidden {
        let g = format!("hidden.{i}");
        b.producer(&g, &format!("layers.{i}"), true);
        b.consumer(&g, &format!("layers.{}", i + 1));
    }
    ends(&mut b, "layers.0", &format!("layers.{num_hidden}"));
    built(&b)
}

/// The spec of the residual MLP with `num_blocks` blocks; groups `residual` and
/// `blocks.{j}.hidden`.
///
/// ```
/// let spec = modelfusion::perm::specs::res_mlp(2);
/// assert_eq!(spec.num_groups(), 3);
/// assert!(spec.group("residual").unwrap().iter().any(|(p, a)| p == "head.weight" && *a == 1));
/// ```
pub fn res_mlp(num_blocks: usize) -> PermutationSpec {
    let mut b = SpecBuilder::new();
    b.producer("residual", "stem", true);
    for j in 0..num_blocks {
        let blk = format!("blocks.{j}");
        let hidden = format!("{blk}.hidden");
        b.batch_norm("residual", &format!("{blk}.norm"));
        b.consumer("residual", &format!("{blk}.fc1"));
        b.producer(&hidden, &format!("{blk}.fc1"), true);
        b.consumer(&hidden, &format!("{blk}.fc2"));
        b.producer("residual", &format!("{blk}.fc2"), true);
    }
    b.consumer("residual", "head");
    ends(&mut b, "stem", "head");
    built(&b)
}

/// Layer sizes of an MLP: `[in, h1, ..., hk, out]`.
///
/// ```
/// use modelfusion::perm::specs::{Architecture, MlpShapes};
/// let arch = MlpShapes::new(&[784, 512, 512, 10]).unwrap();
/// assert_eq!(arch.shapes()[0], ("layers.0.weight".to_string(), vec![512, 784]));
/// assert!(MlpShapes::new(&[4]).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlpShapes {
    sizes: Vec<usize>,
}

impl MlpShapes {
    /// Validates: at least an input and an output size, all positive.
    pub fn new(sizes: &[usize]) -> Result<Self> {
        if sizes.len() < 2 {
            return Err(Error::invalid(
                "sizes",
                format!("an MLP needs at least input and output sizes, got {sizes:?}"),
            ));
        }
        check_positive("sizes", sizes)?;
        Ok(MlpShapes {
            sizes: sizes.to_vec(),
        })
    }

    /// The layer sizes.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }
}

impl Architecture for MlpShapes {
    fn spec(&self) -> PermutationSpec {
        mlp(self.sizes.len() - 2)
    }
    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.sizes
            .windows(2)
            .enumerate()
            .flat_map(|(i, w)| {
                [
                    (format!("layers.{i}.weight"), vec![w[1], w[0]]),
                    (format!("layers.{i}.bias"), vec![w[1]]),
                ]
            })
            .collect()
    }
}

/// Shapes of the residual MLP: `input -> stem (width) -> blocks (hidden) -> head (classes)`.
///
/// ```
/// use modelfusion::perm::specs::{Architecture, ResMlpShapes};
/// let arch = ResMlpShapes::new(64, 32, 48, 2, 10).unwrap();
/// assert_eq!(arch.shapes().len(), 2 + 2 * 8 + 2);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResMlpShapes {
    /// Input features.
    pub input: usize,
    /// Width of the residual stream.
    pub width: usize,
    /// Width of each block's hidden layer.
    pub hidden: usize,
    /// Number of residual blocks.
    pub blocks: usize,
    /// Output classes.
    pub classes: usize,
}

impl ResMlpShapes {
    /// Validates that every size is positive.
    pub fn new(
        input: usize,
        width: usize,
        hidden: usize,
        blocks: usize,
        classes: usize,
    ) -> Result<Self> {
        check_positive("sizes", &[input, width, hidden, classes])?;
        Ok(ResMlpShapes {
            input,
            width,
            hidden,
            blocks,
            classes,
        })
    }
}

impl Architecture for ResMlpShapes {
    fn spec(&self) -> PermutationSpec {
        res_mlp(self.blocks)
    }
    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, h) = (self.width, self.hidden);
        let mut s = vec![
            ("stem.weight".to_string(), vec![d, self.input]),
            ("stem.bias".to_string(), vec![d]),
        ];
        for j in 0..self.blocks {
            for p in NORM_PARAMS {
                s.push((format!("blocks.{j}.norm.{p}"), vec![d]));
            }
            s.push((format!("blocks.{j}.fc1.weight"), vec![h, d]));
            s.push((format!("blocks.{j}.fc1.bias"), vec![h]));
            s.push((format!("blocks.{j}.fc2.weight"), vec![d, h]));
            s.push((format!("blocks.{j}.fc2.bias"), vec![d]));
        }
        s.push(("head.weight".to_string(), vec![self.classes, d]));
        s.push(("head.bias".to_string(), vec![self.classes]));
        s
    }
}

/// A plain CNN, VGG-like: 3x3 convolutions (with bias) each followed by batch norm and
/// ReLU (pooling has no parameters), global pooling, then linear layers.
///
/// ```
/// use modelfusion::perm::specs::{Architecture, Vgg};
/// let arch = Vgg::vgg16(1, 10);
/// assert_eq!(arch.spec().num_groups(), 13 + 2);
/// assert_eq!(arch.shapes()[0].1, vec![64, 3, 3, 3]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vgg {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels of each convolution.
    pub channels: Vec<usize>,
    /// Output sizes of each linear layer; the last is the number of classes.
    pub fc: Vec<usize>,
    /// Convolution kernel size.
    pub kernel: usize,
}

impl Vgg {
    /// Validates the sizes (at least one convolution and one linear layer).
    pub fn new(
        in_channels: usize,
        channels: &[usize],
        fc: &[usize],
        kernel: usize,
    ) -> Result<Self> {
        if channels.is_empty() || fc.is_empty() {
            return Err(Error::invalid(
                "channels",
                "a VGG needs at least one convolution and one linear layer",
            ));
        }
        check_positive("channels", channels)?;
        check_positive("fc", fc)?;
        check_positive("kernel", &[kernel, in_channels])?;
        Ok(Vgg {
            in_channels,
            channels: channels.to_vec(),
            fc: fc.to_vec(),
            kernel,
        })
    }

    /// VGG-16 for 32x32 RGB inputs: 13 convolutions (64, 64, 128, 128, 256 x3, 512 x6,
    /// times `width`) and linear layers `512w -> 512w -> 512w -> classes`.
    pub fn vgg16(width: usize, classes: usize) -> Self {
        let w = width.max(1);
        let channels = [
            64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
        ]
        .iter()
        .map(|c| c * w)
        .collect();
        Vgg {
            in_channels: 3,
            channels,
            fc: vec![512 * w, 512 * w, classes.max(1)],
            kernel: 3,
        }
    }
}

impl Architecture for Vgg {
    fn spec(&self) -> PermutationSpec {
        let mut b = SpecBuilder::new();
        let nc = self.channels.len();
        for i in 0..nc {
            let g = format!("conv.{i}");
            b.producer(&g, &format!("convs.{i}"), true);
            b.batch_norm(&g, &format!("norms.{i}"));
            if i + 1 < nc {
                b.consumer(&g, &format!("convs.{}", i + 1));
            } else {
                b.consumer(&g, "fcs.0");
            }
        }
        for j in 0..self.fc.len() - 1 {
            let g = format!("fc.{j}");
            b.producer(&g, &format!("fcs.{j}"), true);
            b.consumer(&g, &format!("fcs.{}", j + 1));
        }
        ends(&mut b, "convs.0", &format!("fcs.{}", self.fc.len() - 1));
        built(&b)
    }

    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let k = self.kernel;
        let mut s = Vec::new();
        let mut cin = self.in_channels;
        for (i, &c) in self.channels.iter().enumerate() {
            s.push((format!("convs.{i}.weight"), vec![c, cin, k, k]));
            s.push((format!("convs.{i}.bias"), vec![c]));
            for p in NORM_PARAMS {
                s.push((format!("norms.{i}.{p}"), vec![c]));
            }
            cin = c;
        }
        for (j, &f) in self.fc.iter().enumerate() {
            s.push((format!("fcs.{j}.weight"), vec![f, cin]));
            s.push((format!("fcs.{j}.bias"), vec![f]));
            cin = f;
        }
        s
    }
}

/// A CIFAR-style residual network (He et al. 2016): a 3x3 stem convolution with batch
/// norm, stages of basic blocks (two 3x3 convolutions without bias, each with batch
/// norm), a 1x1 convolution + batch norm shortcut at the first block of every stage but
/// the first (where the stride is 2), global average pooling and a linear head.
///
/// Every stage's residual stream shares one permutation (`stream.{s}`, stages numbered
/// from 1); the stem writes stage 1's stream, the shortcut of stage `s + 1` reads stream
/// `s` and writes stream `s + 1`.
///
/// ```
/// use modelfusion::perm::specs::{Architecture, ResNet};
/// let arch = ResNet::new(3, &[(4, 1), (8, 1)], 10).unwrap();
/// assert!(arch.shapes().iter().any(|(n, s)| n == "layer2.0.shortcut.0.weight" && s == &vec![8, 4, 1, 1]));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResNet {
    /// Input channels.
    pub in_channels: usize,
    /// `(width, blocks)` of every stage.
    pub stages: Vec<(usize, usize)>,
    /// Output classes.
    pub classes: usize,
}

impl ResNet {
    /// Validates the sizes: at least one stage, every stage with at least one block.
    pub fn new(in_channels: usize, stages: &[(usize, usize)], classes: usize) -> Result<Self> {
        if stages.is_empty() {
            return Err(Error::invalid(
                "stages",
                "a ResNet needs at least one stage",
            ));
        }
        for (s, &(w, n)) in stages.iter().enumerate() {
            if w == 0 || n == 0 {
                return Err(Error::invalid(
                    "stages",
                    format!(
                        "stage {} has width {w} and {n} blocks; both must be positive",
                        s + 1
                    ),
                ));
            }
        }
        check_positive("sizes", &[in_channels, classes])?;
        Ok(ResNet {
            in_channels,
            stages: stages.to_vec(),
            classes,
        })
    }

    /// ResNet-20 for RGB inputs: three stages of three blocks, widths 16, 32, 64 times
    /// `width`.
    pub fn resnet20(width: usize, classes: usize) -> Self {
        let w = width.max(1);
        ResNet {
            in_channels: 3,
            stages: vec![(16 * w, 3), (32 * w, 3), (64 * w, 3)],
            classes: classes.max(1),
        }
    }

    fn has_shortcut(&self, stage: usize, block: usize) -> bool {
        stage > 1 && block == 0
    }
}

impl Architecture for ResNet {
    fn spec(&self) -> PermutationSpec {
        let mut b = SpecBuilder::new();
        b.producer("stream.1", "conv1", false);
        b.batch_norm("stream.1", "bn1");
        for (si, &(_, blocks)) in self.stages.iter().enumerate() {
            let s = si + 1;
            let stream = format!("stream.{s}");
            for blk in 0..blocks {
                let l = format!("layer{s}.{blk}");
                let inner = format!("{l}.inner");
                let input = if self.has_shortcut(s, blk) {
                    let prev = format!("stream.{}", s - 1);
                    b.consumer(&prev, &format!("{l}.shortcut.0"));
                    b.producer(&stream, &format!("{l}.shortcut.0"), false);
                    b.batch_norm(&stream, &format!("{l}.shortcut.1"));
                    prev
                } else {
                    stream.clone()
                };
                b.consumer(&input, &format!("{l}.conv1"));
                b.producer(&inner, &format!("{l}.conv1"), false);
                b.batch_norm(&inner, &format!("{l}.bn1"));
                b.consumer(&inner, &format!("{l}.conv2"));
                b.producer(&stream, &format!("{l}.conv2"), false);
                b.batch_norm(&stream, &format!("{l}.bn2"));
            }
        }
        b.consumer(&format!("stream.{}", self.stages.len()), "linear");
        ends(&mut b, "conv1", "linear");
        built(&b)
    }

    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut s = Vec::new();
        let norm = |s: &mut Vec<(String, Vec<usize>)>, layer: &str, c: usize| {
            for p in NORM_PARAMS {
                s.push((format!("{layer}.{p}"), vec![c]));
            }
        };
        let w0 = self.stages[0].0;
        s.push(("conv1.weight".to_string(), vec![w0, self.in_channels, 3, 3]));
        norm(&mut s, "bn1", w0);
        let mut cin = w0;
        for (si, &(w, blocks)) in self.stages.iter().enumerate() {
            let st = si + 1;
            for blk in 0..blocks {
                let l = format!("layer{st}.{blk}");
                s.push((format!("{l}.conv1.weight"), vec![w, cin, 3, 3]));
                norm(&mut s, &format!("{l}.bn1"), w);
                s.push((format!("{l}.conv2.weight"), vec![w, w, 3, 3]));
                norm(&mut s, &format!("{l}.bn2"), w);
                if self.has_shortcut(st, blk) {
                    s.push((format!("{l}.shortcut.0.weight"), vec![w, cin, 1, 1]));
                    norm(&mut s, &format!("{l}.shortcut.1"), w);
                }
                cin = w;
            }
        }
        s.push(("linear.weight".to_string(), vec![self.classes, cin]));
        s.push(("linear.bias".to_string(), vec![self.classes]));
        s
    }
}
