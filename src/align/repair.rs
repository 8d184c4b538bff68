//! REPAIR (Jordan et al. 2022): reset the statistics of an interpolated network.

use std::collections::BTreeMap;

use ndarray::{Array1, Array2, Ix1, Ix2};

use super::stats::Moments;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::objective::Activations;
use crate::perm::PermutationSpec;
use crate::tensor::{Scalar, Tensor};

/// REPAIR: after interpolating two aligned networks, reset each unit's pre-activation
/// mean and standard deviation to the interpolation of the endpoints' statistics.
///
/// Interpolating two networks shrinks the variance of hidden units (their weights are
/// averages of weakly correlated vectors), and the shrinkage compounds with depth.
/// For every permutation group with a single producing linear layer `name.weight`
/// `(units, in)` (with `name.bias` in the group too), REPAIR measures the pre-activations
/// `z = x W^T + b` on data — `x` from an [`Activations`] source keyed by **weight name**
/// (the layer's input, e.g. [`nn::LayerInputs`](crate::nn::LayerInputs)) — for both
/// endpoints and for the interpolated model, then rescales the layer:
/// `W' = W * (target_std / std)` row-wise and `b' = (b - mean) * (target_std / std) +
/// target_mean`, with `target = (1 - t) * stat_A + t * stat_B`. Groups are corrected in
/// the order their layers appear in the model, each measured after the earlier
/// corrections. Groups without a single producing layer (a residual stream written by
/// several layers) are left alone and listed in the report.
///
/// ```
/// use modelfusion::align::Repair;
/// use modelfusion::perm::specs::{Architecture, MlpShapes};
/// use modelfusion::{Activations, Features, Model, Result, StateDictF32};
/// use ndarray::{Array2, Ix2};
///
/// /// Inputs of every linear layer of a 1-hidden-layer MLP on fixed data.
/// struct Inputs(Array2<f32>);
/// impl Activations<StateDictF32> for Inputs {
///     fn num_batches(&self) -> usize { 1 }
///     fn activations(&self, m: &StateDictF32, _: usize) -> Result<Features<f32>> {
///         let w = m.get("layers.0.weight").unwrap().clone().into_dimensionality::<Ix2>().unwrap();
///         let h = (self.0.dot(&w.t()) + m.get("layers.0.bias").unwrap()).mapv(|v| v.max(0.0));
///         Ok([("layers.0.weight".to_string(), self.0.clone()),
///             ("layers.1.weight".to_string(), h.into_dimensionality::<Ix2>().unwrap())].into())
///     }
/// }
/// let arch = MlpShapes::new(&[6, 16, 2])?;
/// let (a, b) = (arch.random_model(0), arch.random_model(1));
/// let mid = a.lerp(&b, 0.5)?;
/// let x = Array2::from_shape_fn((200, 6), |(i, j)| ((i * 13 + j * 7) % 17) as f32 / 8.0 - 1.0);
/// let (fixed, report) = Repair::new(Inputs(x)).repair(&a, &b, &mid, 0.5, &arch.spec())?;
/// assert_eq!(report.repaired, vec!["hidden.0".to_string()]);
/// assert!(report.std_ratio_after["hidden.0"] > 0.99 && report.std_ratio_after["hidden.0"] < 1.01);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Repair<A> {
    inputs: A,
    eps: f64,
}

/// What [`Repair::repair`] did.
///
/// ```
/// let r = modelfusion::align::RepairReport::default();
/// assert!(r.repaired.is_empty() && r.skipped.is_empty());
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RepairReport {
    /// Groups whose producing layer was rescaled, in correction order.
    pub repaired: Vec<String>,
    /// Groups left alone (no single producing linear layer with a bias).
    pub skipped: Vec<String>,
    /// Per repaired group, the mean over units of `std / target_std` before correction
    /// (below 1: variance collapse).
    pub std_ratio_before: BTreeMap<String, f64>,
    /// The same ratio measured after all corrections (about 1 for the last group; earlier
    /// groups too unless later layers feed back).
    pub std_ratio_after: BTreeMap<String, f64>,
}

/// The endpoints' pre-activation statistics, measured once by [`Repair::endpoints`].
///
/// ```
/// use modelfusion::align::Endpoints;
/// fn takes(_: &Endpoints) {}
/// ```
#[derive(Clone, Debug)]
pub struct Endpoints {
    names: Vec<String>,
    producers: Vec<Producer>,
    skipped: Vec<String>,
    stats_a: Vec<(Array1<f64>, Array1<f64>)>,
    stats_b: Vec<(Array1<f64>, Array1<f64>)>,
}

#[derive(Clone, Debug)]
struct Producer {
    group: String,
    weight: String,
    bias: String,
    position: usize,
}

impl<A> Repair<A> {
    /// REPAIR with layer inputs from `inputs` (keyed by weight name).
    ///
    /// ```
    /// let r = modelfusion::align::Repair::new(()); // `()` stands for an Activations source
    /// # let _ = r;
    /// ```
    pub fn new(inputs: A) -> Self {
        Repair { inputs, eps: 1e-5 }
    }

    /// Repairs `merged`, the point at `t` of the path from `a` to `b` (both already
    /// aligned to one basis). Errors on a `t` outside `[0, 1]`, models that do not fit
    /// `spec` or each other, a missing input key, or non-finite statistics.
    ///
    /// Equivalent to [`endpoints`](Self::endpoints) followed by
    /// [`repair_with`](Self::repair_with); use those to repair many points of one path.
    ///
    /// ```
    /// // see the type-level example of `Repair`
    /// use modelfusion::align::Repair;
    /// # let _ = Repair::new(());
    /// ```
    pub fn repair<M: Model>(
        &self,
        a: &M,
        b: &M,
        merged: &M,
        t: f64,
        spec: &PermutationSpec,
    ) -> Result<(M, RepairReport)>
    where
        A: Activations<M>,
    {
        let ends = self.endpoints(a, b, spec)?;
        self.repair_with(&ends, merged, t)
    }

    /// Measures the endpoints' pre-activation statistics once (two passes over the data).
    ///
    /// ```
    /// # use modelfusion::align::Repair;
    /// // repair many points of one path: measure the endpoints once
    /// // let ends = repair.endpoints(&a, &b, &spec)?;
    /// // for t in ts { let (m, _) = repair.repair_with(&ends, &a.lerp(&b, t)?, t)?; }
    /// # let _ = Repair::new(());
    /// ```
    pub fn endpoints<M: Model>(&self, a: &M, b: &M, spec: &PermutationSpec) -> Result<Endpoints>
    where
        A: Activations<M>,
    {
        super::check_pair(a, b, spec)?;
        let (producers, skipped) = producers(a, spec);
        let stats_a = self.stats(a, &producers)?;
        let stats_b = self.stats(b, &producers)?;
        Ok(Endpoints {
            names: a.names().map(str::to_string).collect(),
            producers,
            skipped,
            stats_a,
            stats_b,
        })
    }

    /// Repairs `merged`, the point at `t` of the path between the endpoints measured by
    /// [`endpoints`](Self::endpoints): one pass over the data per repaired group, and
    /// one more for the report.
    ///
    /// ```
    /// # use modelfusion::align::Repair;
    /// // see `endpoints` and the type-level example
    /// # let _ = Repair::new(());
    /// ```
    pub fn repair_with<M: Model>(
        &self,
        ends: &Endpoints,
        merged: &M,
        t: f64,
    ) -> Result<(M, RepairReport)>
    where
        A: Activations<M>,
    {
        crate::error::check_fraction("t", t)?;
        if !merged.names().eq(ends.names.iter().map(String::as_str)) {
            return Err(Error::NameMismatch {
                detail: "the merged model's parameters differ from the endpoints'".into(),
            });
        }
        merged.check_finite("the merged model")?;
        let producers = &ends.producers;
        let targets: Vec<(Array1<f64>, Array1<f64>)> = ends
            .stats_a
            .iter()
            .zip(&ends.stats_b)
            .map(|((ma, sa), (mb, sb))| (ma * (1.0 - t) + mb * t, sa * (1.0 - t) + sb * t))
            .collect();
        let mut model = merged.clone();
        let mut report = RepairReport {
            skipped: ends.skipped.clone(),
            ..RepairReport::default()
        };
        for (k, p) in producers.iter().enumerate() {
            let (mean, std) = self.stats(&model, std::slice::from_ref(p))?.remove(0);
            let (tm, ts) = &targets[k];
            report
                .std_ratio_before
                .insert(p.group.clone(), ratio_mean(&std, ts));
            let scale = ts / &std;
            rescale(&mut model, p, &scale, &mean, tm)?;
            report.repaired.push(p.group.clone());
        }
        let after = self.stats(&model, producers)?;
        for (p, ((_, std), (_, ts))) in producers.iter().zip(after.iter().zip(&targets)) {
            report
                .std_ratio_after
                .insert(p.group.clone(), ratio_mean(std, ts));
        }
        Ok((model, report))
    }

    /// Pre-activation mean and standard deviation of each producer's units.
    fn stats<M: Model>(
        &self,
        model: &M,
        producers: &[Producer],
    ) -> Result<Vec<(Array1<f64>, Array1<f64>)>>
    where
        A: Activations<M>,
    {
        let nb = self.inputs.num_batches();
        if nb == 0 {
            return Err(Error::empty("the activation source (it has no batches)"));
        }
        let layers: Vec<(Array2<f64>, Array1<f64>)> = producers
            .iter()
            .map(|p| {
                let w = to_f64_2(model.require(&p.weight, "the model")?)?;
                let b = model
                    .require(&p.bias, "the model")?
                    .view()
                    .mapv(|x| x.to_f64_lossless())
                    .into_dimensionality::<Ix1>()
                    .map_err(|e| Error::invalid(p.bias.as_str(), e.to_string()))?;
                Ok((w, b))
            })
            .collect::<Result<_>>()?;
        let mut moments: Vec<Moments> = layers
            .iter()
            .map(|(w, _)| Moments::new(w.nrows()))
            .collect();
        for batch in 0..nb {
            let f = self.inputs.activations(model, batch)?;
            for ((p, (w, b)), m) in producers.iter().zip(&layers).zip(moments.iter_mut()) {
                let x = f.get(&p.weight).ok_or_else(|| {
                    Error::invalid(
                        "inputs",
                        format!("batch {batch} has no layer input keyed `{}`", p.weight),
                    )
                })?;
                if x.ncols() != w.ncols() {
                    return Err(Error::shape(
                        format!("input of `{}` in batch {batch} (samples, in)", p.weight),
                        &[x.nrows(), w.ncols()],
                        &[x.nrows(), x.ncols()],
                    ));
                }
                let xf = super::stats::to_f64(x.view(), &format!("input of `{}`", p.weight))?;
                let z = xf.dot(&w.t()) + b;
                m.update(z.view())?;
            }
        }
        Ok(moments
            .into_iter()
            .map(|m| {
                let std = m.variance().mapv(|v| (v + self.eps).sqrt());
                (m.mean().clone(), std)
            })
            .collect())
    }
}

/// Groups with exactly one 2-D `*.weight` on axis 0 whose `*.bias` is in the group too,
/// in model order; the others are skipped.
fn producers<M: Model>(model: &M, spec: &PermutationSpec) -> (Vec<Producer>, Vec<String>) {
    let position: BTreeMap<&str, usize> = model.names().enumerate().map(|(i, n)| (n, i)).collect();
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for (g, members) in spec.groups() {
        let weights: Vec<&str> = members
            .iter()
            .filter(|(p, ax)| {
                *ax == 0
                    && p.ends_with(".weight")
                    && model.get(p).is_some_and(|t| t.shape().len() == 2)
            })
            .map(|(p, _)| p.as_str())
            .collect();
        let single = match weights.as_slice() {
            [w] => {
                let bias = format!("{}.bias", w.trim_end_matches(".weight"));
                members
                    .iter()
                    .any(|(p, ax)| *p == bias && *ax == 0)
                    .then(|| Producer {
                        group: g.to_string(),
                        weight: w.to_string(),
                        bias,
                        position: position.get(w).copied().unwrap_or(usize::MAX),
                    })
            }
            _ => None,
        };
        match single {
            Some(p) => found.push(p),
            None => skipped.push(g.to_string()),
        }
    }
    found.sort_by_key(|p| p.position);
    (found, skipped)
}

fn to_f64_2<T: Tensor>(t: &T) -> Result<Array2<f64>> {
    t.view()
        .mapv(|x| x.to_f64_lossless())
        .into_dimensionality::<Ix2>()
        .map_err(|e| Error::invalid("weight", e.to_string()))
}

fn ratio_mean(std: &Array1<f64>, target: &Array1<f64>) -> f64 {
    let n = std.len().max(1) as f64;
    std.iter().zip(target).map(|(s, t)| s / t).sum::<f64>() / n
}

fn rescale<M: Model>(
    model: &mut M,
    p: &Producer,
    scale: &Array1<f64>,
    mean: &Array1<f64>,
    target_mean: &Array1<f64>,
) -> Result<()> {
    if let Some(bad) = scale.iter().find(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: format!("REPAIR scale {bad} for group `{}`", p.group),
        });
    }
    let conv = |x: f64| <<M::Tensor as Tensor>::Elem as Scalar>::from_f64_lossy(x);
    let w = model
        .get_mut(&p.weight)
        .ok_or_else(|| Error::MissingParam {
            name: p.weight.clone(),
            context: "the merged model".into(),
        })?;
    for (mut row, &s) in w.view_mut().outer_iter_mut().zip(scale) {
        row.mapv_inplace(|x| conv(x.to_f64_lossless() * s));
    }
    let b = model.get_mut(&p.bias).ok_or_else(|| Error::MissingParam {
        name: p.bias.clone(),
        context: "the merged model".into(),
    })?;
    for (i, x) in b.view_mut().iter_mut().enumerate() {
        *x = conv((x.to_f64_lossless() - mean[i]) * scale[i] + target_mean[i]);
    }
    Ok(())
}
