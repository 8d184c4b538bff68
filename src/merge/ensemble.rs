//! Output ensembles: the baseline every weight fusion is compared with. An ensemble
//! runs every model and averages their outputs; it costs `N` forward passes where a
//! merged model costs one.

use ndarray::{Array2, Axis};

use super::kernel::normalized_nonnegative;
use crate::error::{Error, Result};
use crate::model::Model;

/// A model's outputs on a fixed data set: `(samples, classes)` logits. Implemented by
/// the caller (or the `nn` module) for their networks.
///
/// ```
/// use modelfusion::merge::Outputs;
/// use modelfusion::{Result, StateDictF64};
/// use ndarray::{array, Array2};
/// struct Fixed;
/// impl Outputs<StateDictF64> for Fixed {
///     fn outputs(&self, _: &StateDictF64) -> Result<Array2<f64>> { Ok(array![[1.0, 0.0]]) }
/// }
/// assert_eq!(Fixed.outputs(&StateDictF64::new())?.dim(), (1, 2));
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub trait Outputs<M: Model> {
    /// The logits of `model` on every sample, `(samples, classes)`.
    fn outputs(&self, model: &M) -> Result<Array2<f64>>;
}

/// What an [`Ensemble`] averages.
///
/// ```
/// use modelfusion::merge::EnsembleMode;
/// assert_ne!(EnsembleMode::Logits, EnsembleMode::Probabilities);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnsembleMode {
    /// The (weighted) mean of the logits.
    Logits,
    /// The (weighted) mean of the softmax probabilities (rows sum to 1).
    Probabilities,
}

/// An output ensemble: the weighted mean of several models' outputs (weights default to
/// uniform and are normalised).
///
/// ```
/// use modelfusion::merge::{Ensemble, EnsembleMode};
/// use ndarray::array;
/// let a = array![[2.0, 0.0], [0.0, 1.0]];
/// let b = array![[0.0, 0.0], [0.0, 3.0]];
/// let e = Ensemble::new(EnsembleMode::Logits).combine(&[a.view(), b.view()])?;
/// assert_eq!(e, array![[1.0, 0.0], [0.0, 2.0]]);
/// let p = Ensemble::new(EnsembleMode::Probabilities).combine(&[a.view(), b.view()])?;
/// assert!((p.row(0).sum() - 1.0).abs() < 1e-12);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Ensemble {
    mode: EnsembleMode,
    weights: Option<Vec<f64>>,
}

impl Ensemble {
    /// A uniform ensemble averaging in `mode`.
    ///
    /// ```
    /// let e = modelfusion::merge::Ensemble::new(modelfusion::merge::EnsembleMode::Logits);
    /// # let _ = e;
    /// ```
    pub fn new(mode: EnsembleMode) -> Self {
        Ensemble {
            mode,
            weights: None,
        }
    }

    /// Per-model weights (finite, `>= 0`, positive sum; normalised).
    ///
    /// ```
    /// use modelfusion::merge::{Ensemble, EnsembleMode};
    /// assert!(Ensemble::new(EnsembleMode::Logits).with_weights(vec![1.0, 3.0]).is_ok());
    /// assert!(Ensemble::new(EnsembleMode::Logits).with_weights(vec![0.0]).is_err());
    /// ```
    pub fn with_weights(mut self, weights: Vec<f64>) -> Result<Self> {
        self.weights = Some(normalized_nonnegative(&weights)?);
        Ok(self)
    }

    /// Combines output matrices of one shape `(samples, classes)`.
    ///
    /// ```
    /// use modelfusion::merge::{Ensemble, EnsembleMode};
    /// use ndarray::array;
    /// let e = Ensemble::new(EnsembleMode::Logits);
    /// assert!(e.combine(&[]).is_err());
    /// assert!(e.combine(&[array![[1.0]].view(), array![[1.0, 2.0]].view()]).is_err());
    /// ```
    pub fn combine(&self, outputs: &[ndarray::ArrayView2<'_, f64>]) -> Result<Array2<f64>> {
        let first = outputs
            .first()
            .ok_or_else(|| Error::empty("the list of model outputs"))?;
        let k = outputs.len();
        let w = match &self.weights {
            Some(w) if w.len() != k => {
                return Err(Error::invalid(
                    "weights",
                    format!("{} weights for {k} models", w.len()),
                ));
            }
            Some(w) => w.clone(),
            None => vec![1.0 / k as f64; k],
        };
        let mut acc = Array2::<f64>::zeros(first.raw_dim());
        for (i, (o, wi)) in outputs.iter().zip(&w).enumerate() {
            if o.dim() != first.dim() {
                return Err(Error::shape(
                    format!("outputs of model {i} (vs model 0)"),
                    first.shape(),
                    o.shape(),
                ));
            }
            if let Some(k) = o.iter().position(|v| !v.is_finite()) {
                let c = o.ncols().max(1);
                return Err(Error::NonFinite {
                    what: format!(
                        "outputs of model {i} at [{}, {}] ({})",
                        k / c,
                        k % c,
                        o.iter().nth(k).copied().unwrap_or(f64::NAN)
                    ),
                });
            }
            match self.mode {
                EnsembleMode::Logits => acc.scaled_add(*wi, o),
                EnsembleMode::Probabilities => acc.scaled_add(*wi, &softmax_rows(o)),
            }
        }
        Ok(acc)
    }

    /// Runs every model through `source` and combines the outputs.
    ///
    /// ```
    /// use modelfusion::merge::{Ensemble, EnsembleMode, Outputs};
    /// use modelfusion::{Model, Result, StateDict, StateDictF64};
    /// use ndarray::{arr1, Array2};
    /// /// Logits = the model's single parameter, as one row.
    /// struct Id;
    /// impl Outputs<StateDictF64> for Id {
    ///     fn outputs(&self, m: &StateDictF64) -> Result<Array2<f64>> {
    ///         let w = m.get("w").unwrap();
    ///         Ok(Array2::from_shape_vec((1, w.len()), w.iter().copied().collect()).unwrap())
    ///     }
    /// }
    /// let a = StateDict::from_pairs([("w", arr1(&[1.0, 3.0]).into_dyn())])?;
    /// let b = StateDict::from_pairs([("w", arr1(&[3.0, 1.0]).into_dyn())])?;
    /// let out = Ensemble::new(EnsembleMode::Logits).predict(&[&a, &b], &Id)?;
    /// assert_eq!(out.row(0).to_vec(), vec![2.0, 2.0]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn predict<M: Model, O: Outputs<M> + ?Sized>(
        &self,
        models: &[&M],
        source: &O,
    ) -> Result<Array2<f64>> {
        let outs = models
            .iter()
            .map(|m| source.outputs(m))
            .collect::<Result<Vec<_>>>()?;
        let views: Vec<_> = outs.iter().map(|o| o.view()).collect();
        self.combine(&views)
    }
}

/// Row-wise softmax, shifted by the row maximum for stability.
fn softmax_rows(x: &ndarray::ArrayView2<'_, f64>) -> Array2<f64> {
    let mut p = x.to_owned();
    for mut row in p.axis_iter_mut(Axis(0)) {
        let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        row.mapv_inplace(|v| (v - mx).exp());
        let s = row.sum();
        row.mapv_inplace(|v| v / s);
    }
    p
}
