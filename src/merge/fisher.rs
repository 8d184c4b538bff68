//! Fisher merging (Matena & Raffel 2022): a per-entry weighted average with diagonal
//! Fisher information as weights, and the estimation of diagonal Fishers from gradients.

use super::TensorMerger;
use super::average::blend_into;
use super::kernel::{self, check_count, check_shapes, check_weights};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::objective::Gradient;
use crate::tensor::{Scalar, Tensor};

/// Default floor on Fisher entries (Matena & Raffel's `1e-6`).
pub const DEFAULT_FISHER_FLOOR: f64 = 1e-6;

/// The empirical diagonal Fisher of `model`: the mean over `objectives` (typically one
/// per sample or per small batch of the log-likelihood loss) of the squared gradient,
/// `F = (1/B) sum_b grad_b^2`. Errors when there is no objective or a gradient does not
/// match the model.
///
/// ```
/// use modelfusion::merge::diagonal_fisher;
/// use modelfusion::{Gradient, Model, Objective, Result, StateDict, StateDictF64};
/// use ndarray::arr1;
///
/// /// Loss 0.5 * c * |w|^2: gradient c * w.
/// struct Quad(f64);
/// impl Objective<StateDictF64> for Quad {
///     fn loss(&self, m: &StateDictF64) -> Result<f64> { Ok(0.5 * self.0 * m.norm().powi(2)) }
/// }
/// impl Gradient<StateDictF64> for Quad {
///     fn loss_and_gradient(&self, m: &StateDictF64) -> Result<(f64, StateDictF64)> {
///         Ok((self.loss(m)?, m.scale(self.0)?))
///     }
/// }
/// let m = StateDict::from_pairs([("w", arr1(&[1.0, 2.0]).into_dyn())])?;
/// let f = diagonal_fisher(&m, [&Quad(1.0), &Quad(3.0)])?;
/// // mean of (1*w)^2 and (3*w)^2 = 5 w^2
/// assert_eq!(f.get("w").unwrap().as_slice().unwrap(), &[5.0, 20.0]);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn diagonal_fisher<'a, M, G, I>(model: &M, objectives: I) -> Result<M>
where
    M: Model,
    G: Gradient<M> + ?Sized + 'a,
    I: IntoIterator<Item = &'a G>,
{
    let mut fisher: Option<M> = None;
    for (b, obj) in objectives.into_iter().enumerate() {
        let (_, grad) = obj.loss_and_gradient(model)?;
        model.check_compatible(&grad).map_err(|e| {
            Error::Objective(format!(
                "gradient of objective {b} does not match the model: {e}"
            ))
        })?;
        let sq = grad.try_map(|_, g| Ok(g.map(|x| x * x)))?;
        match &mut fisher {
            None => fisher = Some(sq),
            Some(f) => blend_into(f, &sq, 1.0 / (b as f64 + 1.0))?,
        }
    }
    fisher.ok_or_else(|| Error::empty("the list of gradient objectives for the Fisher"))
}

/// Fisher merging: per entry,
/// `theta = sum_i l_i F_i theta_i / sum_i l_i F_i`, with `F_i` each model's diagonal
/// Fisher (optionally divided by its global norm `|F_i|`), floored at `floor`
/// (`max(F_i, floor)`, default `1e-6`) so the denominator never vanishes, and
/// coefficients `l_i` (default 1). The Fishers are held in the merger, one per model to
/// merge, in the same order.
///
/// ```
/// use modelfusion::merge::{Fisher, Merger};
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
///
/// let a = StateDict::from_pairs([("w", arr1(&[0.0f64, 0.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", arr1(&[4.0f64, 4.0]).into_dyn())])?;
/// let fa = StateDict::from_pairs([("w", arr1(&[3.0f64, 1.0]).into_dyn())])?;
/// let fb = StateDict::from_pairs([("w", arr1(&[1.0f64, 1.0]).into_dyn())])?;
/// let m = Fisher::new(vec![fa, fb])?.merge(&[&a, &b])?;
/// assert_eq!(m.get("w").unwrap().as_slice().unwrap(), &[1.0, 2.0]);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Fisher<M> {
    fishers: Vec<M>,
    scales: Vec<f64>,
    coefficients: Option<Vec<f64>>,
    floor: f64,
}

impl<M: Model> Fisher<M> {
    /// Fisher merging with the given diagonal Fishers (one per model, mutually
    /// compatible, finite and non-negative).
    ///
    /// ```
    /// use modelfusion::merge::Fisher;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let f = StateDict::from_pairs([("w", arr1(&[-1.0f32]).into_dyn())])?;
    /// assert!(Fisher::new(vec![f]).is_err()); // negative entry
    /// assert!(Fisher::<modelfusion::StateDictF32>::new(vec![]).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(fishers: Vec<M>) -> Result<Self> {
        let first = fishers
            .first()
            .ok_or_else(|| Error::empty("the list of Fisher matrices"))?;
        for (i, f) in fishers.iter().enumerate() {
            first.check_compatible(f)?;
            f.check_finite(&format!("Fisher {i}"))?;
            for name in f.names() {
                if let Some(t) = f.get(name)
                    && t.view()
                        .iter()
                        .any(|&x| x < <<M::Tensor as Tensor>::Elem as num_traits::Zero>::zero())
                {
                    return Err(Error::invalid(
                        "fishers",
                        format!("Fisher {i} has a negative entry in parameter `{name}`"),
                    ));
                }
            }
        }
        let scales = vec![1.0; fishers.len()];
        Ok(Fisher {
            fishers,
            scales,
            coefficients: None,
            floor: DEFAULT_FISHER_FLOOR,
        })
    }

    /// Sets the model coefficients `l_i` (finite, `>= 0`, not all zero, one per Fisher).
    ///
    /// ```
    /// use modelfusion::merge::Fisher;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let f = StateDict::from_pairs([("w", arr1(&[1.0f32]).into_dyn())])?;
    /// let fm = Fisher::new(vec![f.clone(), f])?;
    /// assert!(fm.clone().with_coefficients(vec![1.0, 2.0]).is_ok());
    /// assert!(fm.clone().with_coefficients(vec![1.0]).is_err());
    /// assert!(fm.with_coefficients(vec![0.0, 0.0]).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_coefficients(mut self, coefficients: Vec<f64>) -> Result<Self> {
        check_weights(&coefficients, "coefficients")?;
        check_count(
            coefficients.len(),
            self.fishers.len(),
            "coefficients",
            "any",
        )?;
        if coefficients.iter().any(|&c| c < 0.0) || coefficients.iter().all(|&c| c == 0.0) {
            return Err(Error::invalid(
                "coefficients",
                format!("must be >= 0 and not all zero, got {coefficients:?}"),
            ));
        }
        self.coefficients = Some(coefficients);
        Ok(self)
    }

    /// Sets the floor (finite, `> 0`).
    ///
    /// ```
    /// use modelfusion::merge::Fisher;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let f = StateDict::from_pairs([("w", arr1(&[1.0f32]).into_dyn())])?;
    /// assert!(Fisher::new(vec![f.clone()])?.with_floor(1e-8).is_ok());
    /// assert!(Fisher::new(vec![f])?.with_floor(0.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_floor(mut self, floor: f64) -> Result<Self> {
        crate::error::check_positive("floor", floor)?;
        self.floor = floor;
        Ok(self)
    }

    /// Divides each Fisher by its global Euclidean norm before flooring (so models with
    /// larger Fishers do not dominate); errors if a Fisher is zero.
    ///
    /// ```
    /// use modelfusion::merge::Fisher;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let z = StateDict::from_pairs([("w", arr1(&[0.0f32]).into_dyn())])?;
    /// assert!(Fisher::new(vec![z])?.normalized().is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn normalized(mut self) -> Result<Self> {
        for (i, f) in self.fishers.iter().enumerate() {
            let n = f.norm();
            if n == 0.0 {
                return Err(Error::invalid(
                    "fishers",
                    format!("Fisher {i} is zero and cannot be normalised"),
                ));
            }
            self.scales[i] = 1.0 / n;
        }
        Ok(self)
    }

    /// The Fishers, in model order.
    ///
    /// ```
    /// use modelfusion::merge::Fisher;
    /// use modelfusion::StateDict;
    /// use ndarray::arr1;
    /// let f = StateDict::from_pairs([("w", arr1(&[1.0f32]).into_dyn())])?;
    /// assert_eq!(Fisher::new(vec![f])?.fishers().len(), 1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn fishers(&self) -> &[M] {
        &self.fishers
    }
}

impl<M: Model> TensorMerger<M::Tensor> for Fisher<M> {
    fn merge_tensor(&self, name: &str, tensors: &[&M::Tensor]) -> Result<M::Tensor> {
        check_shapes(name, tensors)?;
        check_count(self.fishers.len(), tensors.len(), "fishers", name)?;
        type E<M> = <<M as Model>::Tensor as Tensor>::Elem;
        let shape = tensors[0].shape();
        let fs = self
            .fishers
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let t = f.require(name, &format!("Fisher {i}"))?;
                if t.shape() != shape {
                    return Err(Error::shape(
                        format!("Fisher {i} of parameter `{name}`"),
                        shape,
                        t.shape(),
                    ));
                }
                Ok(kernel::elems(t))
            })
            .collect::<Result<Vec<_>>>()?;
        let xs: Vec<_> = tensors.iter().map(|t| kernel::elems(*t)).collect();
        let coef: Vec<E<M>> = (0..tensors.len())
            .map(|i| {
                let l = self.coefficients.as_ref().map_or(1.0, |c| c[i]);
                E::<M>::from_f64_lossy(l)
            })
            .collect();
        let scales: Vec<E<M>> = self
            .scales
            .iter()
            .map(|&s| E::<M>::from_f64_lossy(s))
            .collect();
        let floor = E::<M>::from_f64_lossy(self.floor);
        let mut out: Vec<E<M>> = kernel::zeros(xs[0].len());
        kernel::for_chunks(&mut out, |_, s, o| {
            for (j, v) in o.iter_mut().enumerate() {
                let i = s + j;
                let mut num = E::<M>::zero();
                let mut den = E::<M>::zero();
                for m in 0..xs.len() {
                    let f = num_traits::Float::max(fs[m][i] * scales[m], floor) * coef[m];
                    num += f * xs[m][i];
                    den += f;
                }
                *v = if den > E::<M>::zero() {
                    num / den
                } else {
                    xs[0][i]
                };
            }
        });
        kernel::check_merged(name, tensors, &[], &out, || {
            kernel::overflow_error(
                "coefficients",
                format!(
                    "{:?} (with Fisher scales {:?})",
                    self.coefficients, self.scales
                ),
                name,
            )
        })?;
        kernel::build(shape, out)
    }
}

use num_traits::Zero as _;
