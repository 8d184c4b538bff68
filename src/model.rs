//! The [`Model`] trait (named parameters in a stable order), the ready implementation
//! [`StateDict`], and model algebra.
//!
//! Model algebra treats a model as one long vector: `add`, `sub`, `scale`, `lerp`,
//! `weighted_sum`, `dot`, `norm`, `cosine`. Two models combine only when they hold the
//! same parameter names with the same shapes; otherwise the error names the first
//! parameter that differs. Parameters are matched by name, so two models whose
//! parameters are stored in different orders still combine; results follow the order of
//! the left operand.
//!
//! ```
//! use modelfusion::{Model, StateDict};
//! use ndarray::{arr1, ArrayD};
//!
//! let a = StateDict::from_pairs([("w", arr1(&[1.0f32, 2.0]).into_dyn())]).unwrap();
//! let b = StateDict::from_pairs([("w", arr1(&[3.0f32, 6.0]).into_dyn())]).unwrap();
//! let mid = a.lerp(&b, 0.5).unwrap();
//! assert_eq!(mid.get("w").unwrap().as_slice().unwrap(), &[2.0, 4.0]);
//! assert_eq!(a.dot(&b).unwrap(), 15.0);
//! ```

use std::collections::HashMap;
use std::fmt::Debug;

use ndarray::ArrayD;

use crate::dtype::RawTensor;
use crate::error::{Error, Result};
use crate::tensor::{Scalar, Tensor};

/// Named parameters in a stable order: a network's weights as fusion algorithms see them.
///
/// Required: [`names`](Model::names), [`get`](Model::get), [`get_mut`](Model::get_mut)
/// and [`try_map`](Model::try_map) (a new model of the same structure from a function of
/// each tensor). Everything else, the whole of model algebra included, is provided.
///
/// ```
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let m = StateDict::from_pairs([("b", arr1(&[1.0f64]).into_dyn()), ("a", arr1(&[2.0]).into_dyn())]).unwrap();
/// assert_eq!(m.names().collect::<Vec<_>>(), vec!["b", "a"]); // insertion order
/// let doubled = m.try_map(|_, t| Ok(t * 2.0)).unwrap();
/// assert_eq!(doubled.get("a").unwrap()[[0]], 4.0);
/// ```
pub trait Model: Clone + Send + Sync + Debug + 'static {
    /// The tensor type of every parameter.
    type Tensor: Tensor;

    /// Parameter names, in the model's stable order.
    fn names(&self) -> impl Iterator<Item = &str>;
    /// The parameter called `name`, if any.
    fn get(&self, name: &str) -> Option<&Self::Tensor>;
    /// The parameter called `name`, mutably, if any.
    fn get_mut(&mut self, name: &str) -> Option<&mut Self::Tensor>;
    /// A new model with the same names in the same order, whose tensor `name` is
    /// `f(name, tensor)`. Shapes may change (e.g. when fusing into a narrower model).
    fn try_map<F>(&self, f: F) -> Result<Self>
    where
        F: FnMut(&str, &Self::Tensor) -> Result<Self::Tensor>;

    /// Number of parameters (tensors).
    fn num_tensors(&self) -> usize {
        self.names().count()
    }

    /// Total number of scalar elements over all parameters.
    fn num_elements(&self) -> usize {
        self.names()
            .filter_map(|n| self.get(n))
            .map(Tensor::len)
            .sum()
    }

    /// The parameter called `name`, or an error naming it and `context`.
    fn require(&self, name: &str, context: &str) -> Result<&Self::Tensor> {
        self.get(name).ok_or_else(|| Error::MissingParam {
            name: name.to_string(),
            context: context.to_string(),
        })
    }

    /// Errors unless `other` has exactly the same parameter names with the same shapes.
    fn check_compatible(&self, other: &Self) -> Result<()> {
        let mine = self.num_tensors();
        let theirs = other.num_tensors();
        for name in self.names() {
            let a = self.get(name).ok_or_else(|| Error::MissingParam {
                name: name.to_string(),
                context: "the left model".into(),
            })?;
            let b = other.get(name).ok_or_else(|| Error::NameMismatch {
                detail: format!("`{name}` is in the left model but not in the right one"),
            })?;
            if a.shape() != b.shape() {
                return Err(Error::shape(
                    format!("parameter `{name}` (left vs right model)"),
                    a.shape(),
                    b.shape(),
                ));
            }
        }
        if mine != theirs {
            let extra = other
                .names()
                .find(|n| self.get(n).is_none())
                .unwrap_or_default()
                .to_string();
            return Err(Error::NameMismatch {
                detail: format!(
                    "the left model has {mine} parameters, the right one {theirs} (`{extra}` only in the right)"
                ),
            });
        }
        Ok(())
    }

    /// Errors naming the first parameter with a NaN or infinite element.
    fn check_finite(&self, context: &str) -> Result<()> {
        for name in self.names() {
            if let Some(t) = self.get(name)
                && !t.all_finite()
            {
                return Err(Error::NonFinite {
                    what: format!("parameter `{name}` of {context}"),
                });
            }
        }
        Ok(())
    }

    /// Combines two compatible models tensor by tensor.
    fn zip_map<F>(&self, other: &Self, mut f: F) -> Result<Self>
    where
        F: FnMut(&str, &Self::Tensor, &Self::Tensor) -> Result<Self::Tensor>,
    {
        self.check_compatible(other)?;
        self.try_map(|name, a| {
            let b = other.require(name, "the right model")?;
            f(name, a, b)
        })
    }

    /// `self + other`.
    fn add(&self, other: &Self) -> Result<Self> {
        self.zip_map(other, |_, a, b| a.zip_map(b, |x, y| x + y))
    }

    /// `self - other`.
    fn sub(&self, other: &Self) -> Result<Self> {
        self.zip_map(other, |_, a, b| a.zip_map(b, |x, y| x - y))
    }

    /// `alpha * self`. A non-finite `alpha`, and an `alpha` that makes a finite
    /// parameter overflow, are [`Error::InvalidParameter`] naming `alpha` (and the
    /// parameter); non-finite elements already in `self` are carried as they are.
    ///
    /// ```
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let a = StateDict::from_pairs([("w", arr1(&[2.0f32]).into_dyn())])?;
    /// assert_eq!(a.scale(0.5)?.get("w").unwrap()[[0]], 1.0);
    /// assert!(a.scale(f64::NAN).unwrap_err().to_string().contains("alpha"));
    /// assert!(a.scale(1e308).unwrap_err().to_string().contains("`w`"));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn scale(&self, alpha: f64) -> Result<Self> {
        if !alpha.is_finite() {
            return Err(Error::invalid(
                "alpha",
                format!("must be finite, got {alpha}"),
            ));
        }
        let a32 = <<Self::Tensor as Tensor>::Elem as Scalar>::from_f64_lossy(alpha);
        self.try_map(|name, a| overflow_guard("alpha", alpha, name, &[a], a.map(|x| x * a32)))
    }

    /// `(1 - t) * self + t * other`; `t = 0` returns `self` and `t = 1` returns `other`
    /// exactly.
    fn lerp(&self, other: &Self, t: f64) -> Result<Self> {
        crate::error::check_finite("t", t)?;
        if t == 0.0 || t == 1.0 {
            self.check_compatible(other)?;
            return Ok(if t == 0.0 {
                self.clone()
            } else {
                other.clone()
            });
        }
        let s = <<Self::Tensor as Tensor>::Elem as Scalar>::from_f64_lossy(1.0 - t);
        let te = <<Self::Tensor as Tensor>::Elem as Scalar>::from_f64_lossy(t);
        self.zip_map(other, |name, a, b| {
            overflow_guard("t", t, name, &[a, b], a.zip_map(b, |x, y| s * x + te * y)?)
        })
    }

    /// `sum_i weights[i] * models[i]` (no normalisation).
    ///
    /// ```
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let a = StateDict::from_pairs([("w", arr1(&[1.0f64]).into_dyn())]).unwrap();
    /// let b = StateDict::from_pairs([("w", arr1(&[3.0f64]).into_dyn())]).unwrap();
    /// let s = StateDict::weighted_sum(&[&a, &b], &[0.5, 2.0]).unwrap();
    /// assert_eq!(s.get("w").unwrap()[[0]], 6.5);
    /// ```
    fn weighted_sum(models: &[&Self], weights: &[f64]) -> Result<Self> {
        let first = *models
            .first()
            .ok_or_else(|| Error::empty("the list of models"))?;
        if models.len() != weights.len() {
            return Err(Error::invalid(
                "weights",
                format!("{} weights for {} models", weights.len(), models.len()),
            ));
        }
        if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
            return Err(Error::invalid(
                "weights",
                format!("must be finite, got {w}"),
            ));
        }
        for (i, m) in models.iter().enumerate().skip(1) {
            first
                .check_compatible(m)
                .map_err(|e| mismatch_context(e, "model 0", &format!("model {i}")))?;
        }
        let ws: Vec<<Self::Tensor as Tensor>::Elem> =
            weights.iter().map(|&w| Scalar::from_f64_lossy(w)).collect();
        first.try_map(|name, t0| {
            let mut acc = t0.map(|x| x * ws[0]);
            let mut inputs = vec![t0];
            for (m, &w) in models.iter().zip(&ws).skip(1) {
                let t = m.require(name, "a model")?;
                acc.axpy(w, t)?;
                inputs.push(t);
            }
            let largest = weights.iter().fold(0.0f64, |s, w| s.max(w.abs()));
            overflow_guard("weights", largest, name, &inputs, acc)
        })
    }

    /// Inner product of the two models seen as vectors (accumulated in `f64`).
    fn dot(&self, other: &Self) -> Result<f64> {
        self.check_compatible(other)?;
        let mut acc = 0.0;
        for name in self.names() {
            acc += self
                .require(name, "the left model")?
                .dot(other.require(name, "the right model")?)?;
        }
        Ok(acc)
    }

    /// Euclidean norm of the model seen as a vector.
    fn norm(&self) -> f64 {
        self.names()
            .filter_map(|n| self.get(n))
            .map(Tensor::norm_sq)
            .sum::<f64>()
            .sqrt()
    }

    /// Cosine similarity of the two models seen as vectors; errors when either is zero.
    fn cosine(&self, other: &Self) -> Result<f64> {
        let d = self.dot(other)?;
        let (na, nb) = (self.norm(), other.norm());
        if na == 0.0 || nb == 0.0 {
            return Err(Error::invalid(
                "models",
                "cosine similarity is undefined for a zero model",
            ));
        }
        Ok(d / (na * nb))
    }

    /// Largest absolute element-wise difference between two compatible models.
    fn max_abs_diff(&self, other: &Self) -> Result<f64> {
        self.check_compatible(other)?;
        let mut worst = 0.0f64;
        for name in self.names() {
            let a = self.require(name, "the left model")?.view();
            let b = other.require(name, "the right model")?;
            for (x, y) in a.iter().zip(b.view().iter()) {
                let d = (x.to_f64_lossless() - y.to_f64_lossless()).abs();
                if d.is_nan() {
                    return Ok(f64::NAN);
                }
                worst = worst.max(d);
            }
        }
        Ok(worst)
    }
}

/// An ordered map from parameter names to tensors: the ready [`Model`].
///
/// Names are unique; iteration follows insertion order. Beside its float parameters a
/// state dict may hold non-float tensors ([`RawTensor`]: `num_batches_tracked`, masks),
/// which are carried unchanged: model algebra and mergers skip them, and every model
/// built by [`Model::try_map`] (a merge result, an aligned model) gets the source
/// model's copy (for a merge: the first or base model's).
///
/// ```
/// use modelfusion::{Model, StateDict};
/// use ndarray::ArrayD;
///
/// let mut sd: StateDict<ArrayD<f32>> = StateDict::new();
/// sd.insert("fc.weight", ArrayD::zeros(vec![3, 2])).unwrap();
/// sd.insert("fc.bias", ArrayD::zeros(vec![3])).unwrap();
/// assert!(sd.insert("fc.bias", ArrayD::zeros(vec![3])).is_err()); // duplicate name
/// assert_eq!(sd.num_elements(), 9);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct StateDict<T> {
    names: Vec<String>,
    tensors: Vec<T>,
    index: HashMap<String, usize>,
    /// Non-float tensors, carried unchanged (not parameters: model algebra skips them).
    raw: Vec<(String, RawTensor)>,
}

impl<T> Default for StateDict<T> {
    fn default() -> Self {
        StateDict {
            names: Vec::new(),
            tensors: Vec::new(),
            index: HashMap::new(),
            raw: Vec::new(),
        }
    }
}

impl<T: Tensor> StateDict<T> {
    /// An empty state dict.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a state dict from `(name, tensor)` pairs, in order; errors on a repeated name.
    ///
    /// ```
    /// use modelfusion::StateDict;
    /// use ndarray::{arr1, ArrayD};
    /// let r = StateDict::from_pairs([("a", arr1(&[1.0f32]).into_dyn()), ("a", arr1(&[2.0f32]).into_dyn())]);
    /// assert!(r.is_err());
    /// ```
    pub fn from_pairs<S: Into<String>>(pairs: impl IntoIterator<Item = (S, T)>) -> Result<Self> {
        let mut sd = Self::new();
        for (name, t) in pairs {
            sd.insert(name, t)?;
        }
        Ok(sd)
    }

    fn check_free(&self, name: &str) -> Result<()> {
        if self.index.contains_key(name) || self.raw(name).is_some() {
            return Err(Error::invalid(
                "name",
                format!("parameter `{name}` is already present"),
            ));
        }
        Ok(())
    }

    /// Appends a parameter; errors if the name is taken (by a parameter or a raw tensor).
    pub fn insert(&mut self, name: impl Into<String>, tensor: T) -> Result<()> {
        let name = name.into();
        self.check_free(&name)?;
        self.index.insert(name.clone(), self.names.len());
        self.names.push(name);
        self.tensors.push(tensor);
        Ok(())
    }

    /// Replaces the tensor of an existing parameter, returning the old one.
    ///
    /// ```
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let mut sd = StateDict::from_pairs([("w", arr1(&[1.0f64]).into_dyn())]).unwrap();
    /// let old = sd.replace("w", arr1(&[5.0]).into_dyn()).unwrap();
    /// assert_eq!(old[[0]], 1.0);
    /// assert!(sd.replace("missing", arr1(&[0.0]).into_dyn()).is_err());
    /// ```
    pub fn replace(&mut self, name: &str, tensor: T) -> Result<T> {
        let i = *self.index.get(name).ok_or_else(|| Error::MissingParam {
            name: name.to_string(),
            context: "the state dict".into(),
        })?;
        Ok(std::mem::replace(&mut self.tensors[i], tensor))
    }

    /// Appends a non-float tensor (carried unchanged: never merged, never part of model
    /// algebra, copied by [`Model::try_map`] into every model built from this one). Errors
    /// if the name is taken.
    ///
    /// ```
    /// use modelfusion::{Dtype, Model, RawTensor, StateDict};
    /// use ndarray::{arr1, ArrayD};
    /// let mut sd = StateDict::from_pairs([("bn.weight", arr1(&[1.0f32]).into_dyn())])?;
    /// sd.insert_raw("bn.num_batches_tracked", RawTensor::new(Dtype::I64, vec![], 7i64.to_le_bytes().to_vec())?)?;
    /// let doubled = sd.scale(2.0)?;
    /// assert_eq!(doubled.raw("bn.num_batches_tracked"), sd.raw("bn.num_batches_tracked"));
    /// assert_eq!(doubled.num_tensors(), 1); // raw tensors are not parameters
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn insert_raw(&mut self, name: impl Into<String>, tensor: RawTensor) -> Result<()> {
        let name = name.into();
        self.check_free(&name)?;
        self.raw.push((name, tensor));
        Ok(())
    }

    /// The non-float tensor called `name`, if any.
    pub fn raw(&self, name: &str) -> Option<&RawTensor> {
        self.raw.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The non-float tensors, in insertion order.
    pub fn raw_tensors(&self) -> impl ExactSizeIterator<Item = (&str, &RawTensor)> {
        self.raw.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Removes and returns every non-float tensor (leaving only float parameters).
    ///
    /// ```
    /// use modelfusion::{Dtype, RawTensor, StateDict};
    /// use ndarray::ArrayD;
    /// let mut sd: StateDict<ArrayD<f32>> = StateDict::new();
    /// sd.insert_raw("mask", RawTensor::new(Dtype::BOOL, vec![1], vec![1])?)?;
    /// assert_eq!(sd.take_raw().len(), 1);
    /// assert_eq!(sd.raw_tensors().len(), 0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn take_raw(&mut self) -> Vec<(String, RawTensor)> {
        std::mem::take(&mut self.raw)
    }

    /// Removes the parameter or raw tensor `name`; returns whether it was present.
    ///
    /// ```
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let mut sd = StateDict::from_pairs([("a", arr1(&[1.0f32]).into_dyn()), ("b", arr1(&[2.0f32]).into_dyn())])?;
    /// assert!(sd.remove("a"));
    /// assert!(!sd.remove("a"));
    /// assert_eq!(sd.names().collect::<Vec<_>>(), ["b"]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn remove(&mut self, name: &str) -> bool {
        let before = (self.names.len(), self.raw.len());
        self.retain(|n| n != name);
        before != (self.names.len(), self.raw.len())
    }

    /// Keeps only the parameters and raw tensors whose name satisfies `keep`, in order.
    ///
    /// ```
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// let mut sd = StateDict::from_pairs([("bn.weight", arr1(&[1.0f32]).into_dyn()), ("fc.weight", arr1(&[2.0f32]).into_dyn())])?;
    /// sd.retain(|n| n.starts_with("fc."));
    /// assert_eq!(sd.names().collect::<Vec<_>>(), ["fc.weight"]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn retain(&mut self, keep: impl FnMut(&str) -> bool) {
        *self = std::mem::take(self).partition(keep).0;
    }

    /// Splits the state dict in two by name, keeping the order: the parameters and raw
    /// tensors whose name satisfies `pred`, then the rest. With
    /// [`PermutationSpec::param_names`](crate::perm::PermutationSpec::param_names) it
    /// separates what a spec permutes from what it leaves alone; raw (non-float) tensors
    /// are set apart by [`take_raw`](Self::take_raw).
    ///
    /// ```
    /// use modelfusion::{Model, StateDict};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// let arch = MlpShapes::new(&[2, 3, 1])?;
    /// let spec = arch.spec();
    /// let mut model = arch.random_model(0);
    /// model.insert("temperature", ndarray::arr1(&[1.0f32]).into_dyn())?;
    /// let permuted: std::collections::BTreeSet<&str> = spec.param_names().collect();
    /// let n = model.len();
    /// let (inside, outside) = model.partition(|n| permuted.contains(n));
    /// assert_eq!(inside.len() + outside.len(), n);
    /// // The output bias and the extra parameter are outside every group.
    /// assert_eq!(outside.names().collect::<Vec<_>>(), ["layers.1.bias", "temperature"]);
    /// assert!(inside.names().all(|p| permuted.contains(p)));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn partition(self, mut pred: impl FnMut(&str) -> bool) -> (Self, Self) {
        let (mut yes, mut no) = (Self::default(), Self::default());
        for (n, t) in self.names.into_iter().zip(self.tensors) {
            let side = if pred(&n) { &mut yes } else { &mut no };
            side.index.insert(n.clone(), side.names.len());
            side.names.push(n);
            side.tensors.push(t);
        }
        for (n, r) in self.raw {
            if pred(&n) { &mut yes } else { &mut no }.raw.push((n, r));
        }
        (yes, no)
    }

    /// Renames every parameter and raw tensor by `f` (`None` keeps the name); errors,
    /// changing nothing, when two names would collide.
    ///
    /// ```
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::arr1;
    /// // A checkpoint saved from `nn.DataParallel` has every name prefixed by `module.`.
    /// let mut sd = StateDict::from_pairs([("module.fc.weight", arr1(&[1.0f32]).into_dyn())])?;
    /// sd.rename_with(|n| n.strip_prefix("module.").map(str::to_string))?;
    /// assert_eq!(sd.names().collect::<Vec<_>>(), ["fc.weight"]);
    /// let mut two = StateDict::from_pairs([("a", arr1(&[1.0f32]).into_dyn()), ("b", arr1(&[2.0f32]).into_dyn())])?;
    /// assert!(two.rename_with(|_| Some("c".into())).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn rename_with(&mut self, mut f: impl FnMut(&str) -> Option<String>) -> Result<()> {
        let new_names: Vec<String> = self
            .names
            .iter()
            .map(|n| f(n).unwrap_or_else(|| n.clone()))
            .collect();
        let new_raw: Vec<String> = self
            .raw
            .iter()
            .map(|(n, _)| f(n).unwrap_or_else(|| n.clone()))
            .collect();
        let mut seen = std::collections::HashSet::new();
        for (old, new) in self
            .names
            .iter()
            .chain(self.raw.iter().map(|(n, _)| n))
            .zip(new_names.iter().chain(&new_raw))
        {
            if !seen.insert(new.as_str()) {
                return Err(Error::invalid(
                    "rename",
                    format!("renaming `{old}` to `{new}` collides with another tensor"),
                ));
            }
        }
        self.index = new_names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        self.names = new_names;
        for ((n, _), new) in self.raw.iter_mut().zip(new_raw) {
            *n = new;
        }
        Ok(())
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// `(name, tensor)` pairs in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &T)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(self.tensors.iter())
    }

    /// `(name, tensor)` pairs in order, tensors mutable.
    pub fn iter_mut(&mut self) -> impl ExactSizeIterator<Item = (&str, &mut T)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(self.tensors.iter_mut())
    }

    /// Converts every tensor to another element type (e.g. `f32` to `f64`).
    ///
    /// ```
    /// use modelfusion::{Model, StateDict};
    /// use ndarray::{arr1, ArrayD};
    /// let a = StateDict::from_pairs([("w", arr1(&[0.5f32]).into_dyn())]).unwrap();
    /// let b: StateDict<ArrayD<f64>> = a.cast();
    /// assert_eq!(b.get("w").unwrap()[[0]], 0.5);
    /// ```
    pub fn cast<U: Tensor>(&self) -> StateDict<U> {
        StateDict {
            names: self.names.clone(),
            tensors: self
                .tensors
                .iter()
                .map(|t| {
                    U::from_array(
                        t.view()
                            .mapv(|x| U::Elem::from_f64_lossy(x.to_f64_lossless())),
                    )
                })
                .collect(),
            index: self.index.clone(),
            raw: self.raw.clone(),
        }
    }
}

/// Yields the float parameters; raw tensors are dropped (take them first with
/// [`StateDict::take_raw`]).
impl<T: Tensor> IntoIterator for StateDict<T> {
    type Item = (String, T);
    type IntoIter = std::iter::Zip<std::vec::IntoIter<String>, std::vec::IntoIter<T>>;
    fn into_iter(self) -> Self::IntoIter {
        self.names.into_iter().zip(self.tensors)
    }
}

impl<T: Tensor> Model for StateDict<T> {
    type Tensor = T;

    fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    fn get(&self, name: &str) -> Option<&T> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut T> {
        self.index.get(name).map(|&i| &mut self.tensors[i])
    }

    fn try_map<F>(&self, mut f: F) -> Result<Self>
    where
        F: FnMut(&str, &T) -> Result<T>,
    {
        let tensors = self
            .iter()
            .map(|(n, t)| f(n, t))
            .collect::<Result<Vec<T>>>()?;
        Ok(StateDict {
            names: self.names.clone(),
            tensors,
            index: self.index.clone(),
            raw: self.raw.clone(),
        })
    }

    fn num_tensors(&self) -> usize {
        self.len()
    }
}

/// The common concrete model type: `f32` tensors.
pub type StateDictF32 = StateDict<ArrayD<f32>>;
/// `f64` tensors.
pub type StateDictF64 = StateDict<ArrayD<f64>>;

/// `out` unless it holds a non-finite element although every input is finite: then
/// the parameter `param` (whose largest magnitude is `value`) made tensor `name`
/// overflow, which is an [`Error::InvalidParameter`] naming both.
fn overflow_guard<T: Tensor>(
    param: &str,
    value: f64,
    name: &str,
    inputs: &[&T],
    out: T,
) -> Result<T> {
    if out.all_finite() || inputs.iter().any(|t| !t.all_finite()) {
        Ok(out)
    } else {
        Err(Error::invalid(
            param,
            format!("{value:e} makes the finite parameter `{name}` overflow to a non-finite value"),
        ))
    }
}

/// A structural mismatch found by `check_compatible` between the model labelled `first`
/// and the one labelled `other`, with both labels added to its message; other errors
/// pass through.
pub(crate) fn mismatch_context(e: Error, first: &str, other: &str) -> Error {
    match e {
        Error::ShapeMismatch {
            what,
            expected,
            got,
        } => Error::ShapeMismatch {
            what: format!("{what} of {other}"),
            expected,
            got,
        },
        Error::NameMismatch { detail } => Error::NameMismatch {
            detail: format!("{first} vs {other}: {detail}"),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr1;

    fn sd(pairs: &[(&str, &[f64])]) -> StateDictF64 {
        StateDict::from_pairs(pairs.iter().map(|(n, v)| (*n, arr1(v).into_dyn()))).unwrap()
    }

    #[test]
    fn mismatches_are_named() {
        let a = sd(&[("w", &[1.0, 2.0]), ("b", &[0.0])]);
        let b = sd(&[("w", &[1.0, 2.0]), ("c", &[0.0])]);
        let e = a.add(&b).unwrap_err().to_string();
        assert!(e.contains("`b`"), "{e}");
        let c = sd(&[("w", &[1.0]), ("b", &[0.0])]);
        let e = a.add(&c).unwrap_err().to_string();
        assert!(
            e.contains("`w`") && e.contains("[2]") && e.contains("[1]"),
            "{e}"
        );
        let d = sd(&[("w", &[1.0, 2.0]), ("b", &[0.0]), ("x", &[1.0])]);
        let e = a.add(&d).unwrap_err().to_string();
        assert!(e.contains("`x`"), "{e}");
    }

    #[test]
    fn order_independent_matching() {
        let a = sd(&[("w", &[1.0]), ("b", &[2.0])]);
        let b = sd(&[("b", &[3.0]), ("w", &[4.0])]);
        let s = a.add(&b).unwrap();
        assert_eq!(s.names().collect::<Vec<_>>(), vec!["w", "b"]);
        assert_eq!(s.get("w").unwrap()[[0]], 5.0);
        assert_eq!(s.get("b").unwrap()[[0]], 5.0);
    }

    #[test]
    fn weighted_sum_errors() {
        let a = sd(&[("w", &[1.0])]);
        assert!(StateDictF64::weighted_sum(&[], &[]).is_err());
        assert!(StateDictF64::weighted_sum(&[&a], &[1.0, 2.0]).is_err());
        assert!(StateDictF64::weighted_sum(&[&a], &[f64::NAN]).is_err());
    }

    #[test]
    fn cosine_and_finite() {
        let a = sd(&[("w", &[1.0, 0.0])]);
        let b = sd(&[("w", &[0.0, 2.0])]);
        assert_eq!(a.cosine(&b).unwrap(), 0.0);
        assert!(a.cosine(&a.scale(0.0).unwrap()).is_err());
        let n = sd(&[("w", &[1.0, f64::INFINITY])]);
        assert!(
            n.check_finite("model B")
                .unwrap_err()
                .to_string()
                .contains("model B")
        );
    }
}
