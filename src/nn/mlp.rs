//! The multi-layer perceptron.

use ndarray::{Array2, ArrayView2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::StateDict;
use crate::objective::Features;
use crate::perm::PermutationSpec;
use crate::perm::specs::{Architecture, MlpShapes};
use crate::tensor::{Scalar, Tensor};

use super::layers::{self, linear, linear_backward, param1, param2};
use super::{BackwardPass, ForwardPass, Mode, Network};

/// A fully connected ReLU network built from layer sizes `[in, h1, ..., hk, out]`.
///
/// Parameters `layers.{i}.weight` `(sizes[i+1], sizes[i])` and `layers.{i}.bias`
/// `(sizes[i+1])` for `i = 0..=k`; ReLU after every layer but the last; permutation
/// groups `hidden.{i}` for `i = 0..k`.
///
/// ```
/// use modelfusion::nn::{Mlp, Network};
/// use modelfusion::perm::specs::Architecture;
/// let net = Mlp::new(&[64, 128, 128, 10])?;
/// assert_eq!(net.num_hidden(), 2);
/// assert_eq!(net.groups(), vec![("hidden.0".to_string(), 128), ("hidden.1".to_string(), 128)]);
/// assert_eq!(net.shapes()[2], ("layers.1.weight".to_string(), vec![128, 128]));
/// assert_eq!(net.spec().num_groups(), 2); // the ready spec `perm::specs::mlp(2)`
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mlp {
    shapes: MlpShapes,
}

/// What [`Mlp::forward`](Network::forward) keeps: the input of every layer.
#[derive(Clone, Debug)]
pub struct MlpCache<S> {
    /// `inputs[i]` is the input of layer `i`: the batch for `i = 0`, the post-ReLU
    /// output of layer `i - 1` otherwise.
    inputs: Vec<Array2<S>>,
}

impl Mlp {
    /// An MLP with the given layer sizes (input, hidden..., output); errors unless there
    /// are at least two sizes, all positive.
    ///
    /// ```
    /// use modelfusion::nn::Mlp;
    /// assert!(Mlp::new(&[784, 512, 10]).is_ok());
    /// assert!(Mlp::new(&[784]).is_err());
    /// assert!(Mlp::new(&[784, 0, 10]).is_err());
    /// ```
    pub fn new(sizes: &[usize]) -> Result<Self> {
        Ok(Mlp {
            shapes: MlpShapes::new(sizes)?,
        })
    }

    /// The layer sizes `[in, h1, ..., out]`.
    ///
    /// ```
    /// assert_eq!(modelfusion::nn::Mlp::new(&[3, 2])?.sizes(), &[3, 2]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn sizes(&self) -> &[usize] {
        self.shapes.sizes()
    }

    /// Number of hidden layers (permutation groups).
    ///
    /// ```
    /// assert_eq!(modelfusion::nn::Mlp::new(&[3, 2])?.num_hidden(), 0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn num_hidden(&self) -> usize {
        self.sizes().len() - 2
    }

    fn num_layers(&self) -> usize {
        self.sizes().len() - 1
    }

    /// The parameter gradients of `sum(dlogits * logits)` and, with `need_input`, its
    /// gradient with respect to the input batch.
    fn backward_pass<T: Tensor>(
        &self,
        params: &StateDict<T>,
        cache: &MlpCache<T::Elem>,
        dlogits: ArrayView2<T::Elem>,
        need_input: bool,
    ) -> Result<BackwardPass<T>> {
        let layers_n = self.num_layers();
        if cache.inputs.len() != layers_n {
            return Err(Error::invalid(
                "cache",
                format!("{} layer inputs for {layers_n} layers", cache.inputs.len()),
            ));
        }
        let n = cache.inputs[0].nrows();
        let expected = [n, self.num_classes()];
        if dlogits.shape() != expected {
            return Err(Error::shape("dlogits", &expected, dlogits.shape()));
        }
        let mut grads = Vec::with_capacity(layers_n);
        let mut dz = dlogits.to_owned();
        let mut dinput = None;
        for i in (0..layers_n).rev() {
            let w = param2(params, &format!("layers.{i}.weight"))?;
            let (dw, db, dx) =
                linear_backward(dz.view(), cache.inputs[i].view(), w, i > 0 || need_input);
            grads.push((T::from_array(dw.into_dyn()), T::from_array(db.into_dyn())));
            match dx {
                Some(mut dx) if i > 0 => {
                    layers::relu_backward_inplace(&mut dx, cache.inputs[i].view());
                    dz = dx;
                }
                dx => dinput = dx,
            }
        }
        let mut out = StateDict::new();
        for (i, (dw, db)) in grads.into_iter().rev().enumerate() {
            out.insert(format!("layers.{i}.weight"), dw)?;
            out.insert(format!("layers.{i}.bias"), db)?;
        }
        Ok((out, dinput))
    }
}

/// The ready permutation spec [`perm::specs::mlp`](crate::perm::specs::mlp) and the
/// parameter shapes.
impl Architecture for Mlp {
    fn spec(&self) -> PermutationSpec {
        self.shapes.spec()
    }

    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.shapes.shapes()
    }
}

impl Network for Mlp {
    type Cache<S: Scalar> = MlpCache<S>;

    fn describe(&self) -> String {
        format!("MLP {:?}", self.sizes())
    }

    fn input_dim(&self) -> usize {
        self.sizes()[0]
    }

    fn num_classes(&self) -> usize {
        self.sizes()[self.sizes().len() - 1]
    }

    fn groups(&self) -> Vec<(String, usize)> {
        (0..self.num_hidden())
            .map(|i| (format!("hidden.{i}"), self.sizes()[i + 1]))
            .collect()
    }

    fn init<T: Tensor>(&self, seed: u64) -> StateDict<T> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = StateDict::new();
        for i in 0..self.num_layers() {
            // Names are distinct by construction, so insertion cannot fail.
            let _ = layers::init_linear(
                &mut params,
                &format!("layers.{i}"),
                self.sizes()[i + 1],
                self.sizes()[i],
                &mut rng,
            );
        }
        params
    }

    fn forward<T: Tensor>(
        &self,
        params: &StateDict<T>,
        x: ArrayView2<T::Elem>,
        _mode: Mode,
    ) -> Result<ForwardPass<Self, T>> {
        self.check_params(params)?;
        self.check_input(x)?;
        let mut inputs = Vec::with_capacity(self.num_layers());
        let mut h = x.to_owned();
        for i in 0..self.num_layers() {
            let w = param2(params, &format!("layers.{i}.weight"))?;
            let b = param1(params, &format!("layers.{i}.bias"))?;
            let mut out = linear(h.view(), w, b);
            if i + 1 < self.num_layers() {
                layers::relu_inplace(&mut out);
            }
            inputs.push(h);
            h = out;
        }
        Ok((h, MlpCache { inputs }))
    }

    fn backward<T: Tensor>(
        &self,
        params: &StateDict<T>,
        cache: &MlpCache<T::Elem>,
        dlogits: ArrayView2<T::Elem>,
    ) -> Result<StateDict<T>> {
        Ok(self.backward_pass(params, cache, dlogits, false)?.0)
    }

    fn input_gradient<T: Tensor>(
        &self,
        params: &StateDict<T>,
        cache: &MlpCache<T::Elem>,
        dlogits: ArrayView2<T::Elem>,
    ) -> Result<Array2<T::Elem>> {
        self.backward_pass(params, cache, dlogits, true)?
            .1
            .ok_or_else(|| Error::invalid("cache", "no input gradient was computed"))
    }

    fn group_features<S: Scalar>(&self, cache: &MlpCache<S>) -> Features<S> {
        (0..self.num_hidden())
            .filter_map(|i| {
                let h = cache.inputs.get(i + 1)?;
                Some((format!("hidden.{i}"), h.clone()))
            })
            .collect()
    }

    fn layer_inputs<S: Scalar>(&self, cache: &MlpCache<S>) -> Features<S> {
        cache
            .inputs
            .iter()
            .enumerate()
            .map(|(i, x)| (format!("layers.{i}.weight"), x.clone()))
            .collect()
    }
}
