//! The residual MLP with batch normalisation.

use ndarray::{Array1, Array2, ArrayD, ArrayView2, concatenate};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::StateDict;
use crate::objective::Features;
use crate::perm::PermutationSpec;
use crate::perm::specs::{Architecture, ResMlpShapes};
use crate::tensor::{Scalar, Tensor};

use super::layers::{self, BnCache, linear, linear_backward, param1, param2};
use super::{BackwardPass, ForwardPass, Mode, Network};

/// A residual MLP: `x = relu(stem(input))`; per block
/// `x = x + fc2(relu(fc1(norm(x))))` with a batch-norm `norm`; logits `head(x)`.
///
/// Parameters (width `d`, block hidden width `h`): `stem.weight` `(d, in)`,
/// `stem.bias`; per block `j`: `blocks.{j}.norm.weight`, `.bias`, `.running_mean`,
/// `.running_var` (all `(d)`), `blocks.{j}.fc1.weight` `(h, d)`, `blocks.{j}.fc1.bias`,
/// `blocks.{j}.fc2.weight` `(d, h)`, `blocks.{j}.fc2.bias`; `head.weight`
/// `(classes, d)`, `head.bias`. Groups: `residual` (width `d`) and
/// `blocks.{j}.hidden` (width `h`). The running statistics are buffers.
///
/// ```
/// use modelfusion::nn::{Network, ResMlp};
/// use modelfusion::perm::specs::Architecture;
/// let net = ResMlp::new(64, 32, 64, 2, 10)?;
/// assert_eq!(net.groups()[0], ("residual".to_string(), 32));
/// assert_eq!(net.groups()[2], ("blocks.1.hidden".to_string(), 64));
/// assert!(net.is_buffer("blocks.0.norm.running_var"));
/// assert!(!net.is_buffer("blocks.0.norm.weight"));
/// assert_eq!(net.shapes().len(), 2 + 2 * 8 + 2);
/// assert_eq!(net.spec().num_groups(), 3); // the ready spec `perm::specs::res_mlp(2)`
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResMlp {
    input_dim: usize,
    width: usize,
    hidden: usize,
    num_blocks: usize,
    num_classes: usize,
}

/// What [`ResMlp::forward`](Network::forward) keeps.
#[derive(Clone, Debug)]
pub struct ResMlpCache<S> {
    input: Array2<S>,
    /// The residual stream after the stem (`streams[0]`) and after every block.
    streams: Vec<Array2<S>>,
    blocks: Vec<BlockCache<S>>,
}

#[derive(Clone, Debug)]
struct BlockCache<S> {
    norm: BnCache<S>,
    /// The norm's output (input of fc1).
    normed: Array2<S>,
    /// relu(fc1(normed)) (input of fc2).
    hidden: Array2<S>,
}

impl ResMlp {
    /// A residual MLP with `input_dim` inputs, residual width `width`, `num_blocks`
    /// blocks of hidden width `hidden`, and `num_classes` outputs. Every size must be
    /// positive except `num_blocks`, which may be zero.
    ///
    /// ```
    /// use modelfusion::nn::ResMlp;
    /// assert!(ResMlp::new(64, 32, 64, 2, 10).is_ok());
    /// assert!(ResMlp::new(64, 0, 64, 2, 10).is_err());
    /// ```
    pub fn new(
        input_dim: usize,
        width: usize,
        hidden: usize,
        num_blocks: usize,
        num_classes: usize,
    ) -> Result<Self> {
        // Validates every size but the number of blocks.
        ResMlpShapes::new(input_dim, width, hidden, num_blocks, num_classes)?;
        Ok(ResMlp {
            input_dim,
            width,
            hidden,
            num_blocks,
            num_classes,
        })
    }

    /// Width `d` of the residual stream.
    ///
    /// ```
    /// assert_eq!(modelfusion::nn::ResMlp::new(4, 8, 16, 1, 3)?.width(), 8);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn width(&self) -> usize {
        self.width
    }

    /// Hidden width `h` of every block.
    ///
    /// ```
    /// assert_eq!(modelfusion::nn::ResMlp::new(4, 8, 16, 1, 3)?.hidden(), 16);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Number of residual blocks.
    ///
    /// ```
    /// assert_eq!(modelfusion::nn::ResMlp::new(4, 8, 16, 1, 3)?.num_blocks(), 1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}

const NORM_BUFFERS: [&str; 2] = ["running_mean", "running_var"];

impl ResMlp {
    fn arch(&self) -> ResMlpShapes {
        ResMlpShapes {
            input: self.input_dim,
            width: self.width,
            hidden: self.hidden,
            blocks: self.num_blocks,
            classes: self.num_classes,
        }
    }

    /// The parameter gradients of `sum(dlogits * logits)` (zero for buffers) and, with
    /// `need_input`, its gradient with respect to the input batch.
    fn backward_pass<T: Tensor>(
        &self,
        params: &StateDict<T>,
        cache: &ResMlpCache<T::Elem>,
        dlogits: ArrayView2<T::Elem>,
        need_input: bool,
    ) -> Result<BackwardPass<T>> {
        if cache.blocks.len() != self.num_blocks || cache.streams.len() != self.num_blocks + 1 {
            return Err(Error::invalid(
                "cache",
                format!(
                    "a cache of {} blocks for a network of {}",
                    cache.blocks.len(),
                    self.num_blocks
                ),
            ));
        }
        let expected = [cache.input.nrows(), self.num_classes];
        if dlogits.shape() != expected {
            return Err(Error::shape("dlogits", &expected, dlogits.shape()));
        }
        let mut grads: Vec<(String, ArrayD<T::Elem>)> = Vec::new();
        let last = &cache.streams[self.num_blocks];
        let (dw, db, ds) =
            linear_backward(dlogits, last.view(), param2(params, "head.weight")?, true);
        grads.push(("head.weight".into(), dw.into_dyn()));
        grads.push(("head.bias".into(), db.into_dyn()));
        let mut ds = ds.unwrap_or_default();
        for j in (0..self.num_blocks).rev() {
            let pre = format!("blocks.{j}");
            let bc = &cache.blocks[j];
            let (dw2, db2, da) = linear_backward(
                ds.view(),
                bc.hidden.view(),
                param2(params, &format!("{pre}.fc2.weight"))?,
                true,
            );
            let mut da = da.unwrap_or_default();
            layers::relu_backward_inplace(&mut da, bc.hidden.view());
            let (dw1, db1, dn) = linear_backward(
                da.view(),
                bc.normed.view(),
                param2(params, &format!("{pre}.fc1.weight"))?,
                true,
            );
            let dn = dn.unwrap_or_default();
            let (dgamma, dbeta, dsn) = layers::batch_norm_backward(
                dn.view(),
                param1(params, &format!("{pre}.norm.weight"))?,
                &bc.norm,
            );
            ds += &dsn;
            grads.push((format!("{pre}.fc2.bias"), db2.into_dyn()));
            grads.push((format!("{pre}.fc2.weight"), dw2.into_dyn()));
            grads.push((format!("{pre}.fc1.bias"), db1.into_dyn()));
            grads.push((format!("{pre}.fc1.weight"), dw1.into_dyn()));
            grads.push((format!("{pre}.norm.bias"), dbeta.into_dyn()));
            grads.push((format!("{pre}.norm.weight"), dgamma.into_dyn()));
        }
        layers::relu_backward_inplace(&mut ds, cache.streams[0].view());
        let (dw, db, dinput) = linear_backward(
            ds.view(),
            cache.input.view(),
            param2(params, "stem.weight")?,
            need_input,
        );
        grads.push(("stem.bias".into(), db.into_dyn()));
        grads.push(("stem.weight".into(), dw.into_dyn()));
        // Reassemble in state-dict order; buffers get zeros.
        let mut by_name: std::collections::HashMap<String, ArrayD<T::Elem>> =
            grads.into_iter().collect();
        let mut out = StateDict::new();
        for (name, shape) in self.shapes() {
            let g = by_name
                .remove(&name)
                .map_or_else(|| T::zeros(&shape), T::from_array);
            out.insert(name, g)?;
        }
        Ok((out, dinput))
    }
}

/// The ready permutation spec [`perm::specs::res_mlp`](crate::perm::specs::res_mlp) and
/// the parameter shapes.
impl Architecture for ResMlp {
    fn spec(&self) -> PermutationSpec {
        self.arch().spec()
    }

    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.arch().shapes()
    }
}

impl Network for ResMlp {
    type Cache<S: Scalar> = ResMlpCache<S>;

    fn describe(&self) -> String {
        format!(
            "residual MLP (in {}, width {}, hidden {}, {} blocks, {} classes)",
            self.input_dim, self.width, self.hidden, self.num_blocks, self.num_classes
        )
    }

    fn input_dim(&self) -> usize {
        self.input_dim
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn groups(&self) -> Vec<(String, usize)> {
        std::iter::once(("residual".to_string(), self.width))
            .chain((0..self.num_blocks).map(|j| (format!("blocks.{j}.hidden"), self.hidden)))
            .collect()
    }

    fn is_buffer(&self, name: &str) -> bool {
        name.strip_prefix("blocks.")
            .and_then(|rest| rest.split_once(".norm."))
            .is_some_and(|(j, p)| {
                j.parse::<usize>().is_ok_and(|j| j < self.num_blocks) && NORM_BUFFERS.contains(&p)
            })
    }

    fn init<T: Tensor>(&self, seed: u64) -> StateDict<T> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut p = StateDict::new();
        let d = self.width;
        // Names are distinct by construction, so insertion cannot fail.
        let _ = layers::init_linear(&mut p, "stem", d, self.input_dim, &mut rng);
        for j in 0..self.num_blocks {
            for (name, value) in [
                ("weight", <T::Elem as Scalar>::from_f64_lossy(1.0)),
                ("bias", <T::Elem as Scalar>::from_f64_lossy(0.0)),
                ("running_mean", <T::Elem as Scalar>::from_f64_lossy(0.0)),
                ("running_var", <T::Elem as Scalar>::from_f64_lossy(1.0)),
            ] {
                let t = T::from_array(ArrayD::from_elem(vec![d], value));
                let _ = p.insert(format!("blocks.{j}.norm.{name}"), t);
            }
            let _ =
                layers::init_linear(&mut p, &format!("blocks.{j}.fc1"), self.hidden, d, &mut rng);
            let _ =
                layers::init_linear(&mut p, &format!("blocks.{j}.fc2"), d, self.hidden, &mut rng);
        }
        let _ = layers::init_linear(&mut p, "head", self.num_classes, d, &mut rng);
        p
    }

    fn forward<T: Tensor>(
        &self,
        params: &StateDict<T>,
        x: ArrayView2<T::Elem>,
        mode: Mode,
    ) -> Result<ForwardPass<Self, T>> {
        self.check_params(params)?;
        self.check_input(x)?;
        let mut s = linear(
            x,
            param2(params, "stem.weight")?,
            param1(params, "stem.bias")?,
        );
        layers::relu_inplace(&mut s);
        let mut streams = Vec::with_capacity(self.num_blocks + 1);
        let mut blocks = Vec::with_capacity(self.num_blocks);
        for j in 0..self.num_blocks {
            let pre = format!("blocks.{j}");
            let (normed, norm) = layers::batch_norm(
                s.view(),
                param1(params, &format!("{pre}.norm.weight"))?,
                param1(params, &format!("{pre}.norm.bias"))?,
                param1(params, &format!("{pre}.norm.running_mean"))?,
                param1(params, &format!("{pre}.norm.running_var"))?,
                mode == Mode::Train,
                &format!("{pre}.norm"),
            )?;
            let mut hidden = linear(
                normed.view(),
                param2(params, &format!("{pre}.fc1.weight"))?,
                param1(params, &format!("{pre}.fc1.bias"))?,
            );
            layers::relu_inplace(&mut hidden);
            let out = linear(
                hidden.view(),
                param2(params, &format!("{pre}.fc2.weight"))?,
                param1(params, &format!("{pre}.fc2.bias"))?,
            );
            let next = &s + &out;
            streams.push(s);
            s = next;
            blocks.push(BlockCache {
                norm,
                normed,
                hidden,
            });
        }
        let logits = linear(
            s.view(),
            param2(params, "head.weight")?,
            param1(params, "head.bias")?,
        );
        streams.push(s);
        Ok((
            logits,
            ResMlpCache {
                input: x.to_owned(),
                streams,
                blocks,
            },
        ))
    }

    fn backward<T: Tensor>(
        &self,
        params: &StateDict<T>,
        cache: &ResMlpCache<T::Elem>,
        dlogits: ArrayView2<T::Elem>,
    ) -> Result<StateDict<T>> {
        Ok(self.backward_pass(params, cache, dlogits, false)?.0)
    }

    fn input_gradient<T: Tensor>(
        &self,
        params: &StateDict<T>,
        cache: &ResMlpCache<T::Elem>,
        dlogits: ArrayView2<T::Elem>,
    ) -> Result<Array2<T::Elem>> {
        self.backward_pass(params, cache, dlogits, true)?
            .1
            .ok_or_else(|| Error::invalid("cache", "no input gradient was computed"))
    }

    fn batch_statistics<S: Scalar>(&self, cache: &ResMlpCache<S>) -> Vec<(String, Array1<S>)> {
        let mut out = Vec::new();
        for (j, bc) in cache.blocks.iter().enumerate() {
            if let Some((m, v)) = layers::batch_statistics(&bc.norm) {
                out.push((format!("blocks.{j}.norm.running_mean"), m));
                out.push((format!("blocks.{j}.norm.running_var"), v));
            }
        }
        out
    }

    fn group_features<S: Scalar>(&self, cache: &ResMlpCache<S>) -> Features<S> {
        let mut f = Features::new();
        let views: Vec<ArrayView2<S>> = cache.streams.iter().map(|s| s.view()).collect();
        if let Ok(stacked) = concatenate(ndarray::Axis(0), &views) {
            f.insert("residual".to_string(), stacked);
        }
        for (j, bc) in cache.blocks.iter().enumerate() {
            f.insert(format!("blocks.{j}.hidden"), bc.hidden.clone());
        }
        f
    }

    fn layer_inputs<S: Scalar>(&self, cache: &ResMlpCache<S>) -> Features<S> {
        let mut f = Features::new();
        f.insert("stem.weight".to_string(), cache.input.clone());
        for (j, bc) in cache.blocks.iter().enumerate() {
            f.insert(format!("blocks.{j}.fc1.weight"), bc.normed.clone());
            f.insert(format!("blocks.{j}.fc2.weight"), bc.hidden.clone());
        }
        if let Some(last) = cache.streams.last() {
            f.insert("head.weight".to_string(), last.clone());
        }
        f
    }
}
