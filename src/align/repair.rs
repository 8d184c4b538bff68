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

/// The mean of `std / target` over the channels with a positive target (1 if none).
fn ratio_mean(std: &Array1<f64>, target: &Array1<f64>) -> f64 {
    let ratios: Vec<f64> = std
        .iter()
        .zip(target)
        .filter(|(_, t)| **t > 0.0)
        .map(|(s, t)| s / t)
        .collect();
    if ratios.is_empty() {
        1.0
    } else {
        ratios.iter().sum::<f64>() / ratios.len() as f64
    }
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

/// REPAIR on layer outputs, with the residual-stream treatment of Jordan et al. (2022):
/// for networks whose layers are not plain linear maps of a known input (convolutions,
/// batch norms) and whose channels live in residual streams written by several layers.
///
/// Each registered layer `L` must be affine in `L.weight` (scaled along axis 0) and
/// `L.bias` (a linear or convolution layer with a bias, or a batch norm's affine part):
/// its output `f` is then reset to `alpha * f + c` per channel by scaling `L.weight`
/// and `L.bias` by `alpha` and adding `c` to `L.bias`. The features source (an
/// [`Activations`] keyed by name, e.g. a `candle::CandleNet::features` (feature `candle`)
/// closure) returns every layer's output under the layer's name, and for a stream
/// write the stream right after the addition under the stream key.
///
/// - A **plain layer** ([`with_layer`](Self::with_layer)): the output's per-channel mean
///   and standard deviation become the interpolation `(1 - t) * stat_A + t * stat_B` of
///   the endpoints' (REPAIR's reset of a BatchNorm or convolution output).
/// - A **stream write** ([`with_stream_write`](Self::with_stream_write)): the layer adds
///   its output to a residual stream, `s = p + f` (`p` is what earlier layers wrote).
///   Here the **stream's** statistics are reset to the interpolation of the endpoints'
///   stream statistics: `alpha >= 0` solves `var(p + alpha f) = target_var` per channel
///   (a quadratic; the variance-minimising `alpha` where the target is out of reach,
///   counted in the report), and `c` sets the stream's mean. The paper inserts a
///   correction layer after each residual addition; solving for the last writer's scale
///   instead keeps the architecture (and so the spec and every checkpoint name).
///
/// Layers are corrected in registration order, each measured after the earlier
/// corrections, so register them in forward order: every reset point then keeps its
/// statistics (later layers do not feed back).
///
/// ```
/// use modelfusion::align::OutputRepair;
/// use modelfusion::{Activations, Features, Model, Result, StateDict, StateDictF64};
/// use ndarray::{Array2, Ix2};
///
/// /// s = x + (x W^T + b) on fixed data: one layer writing into a stream.
/// struct Res(Array2<f64>);
/// impl Activations<StateDictF64> for Res {
///     fn num_batches(&self) -> usize { 1 }
///     fn activations(&self, m: &StateDictF64, _: usize) -> Result<Features<f64>> {
///         let w = m.get("fc.weight").unwrap().view().into_dimensionality::<Ix2>().unwrap();
///         let f = self.0.dot(&w.t()) + m.get("fc.bias").unwrap().view().into_dimensionality::<ndarray::Ix1>().unwrap();
///         Ok([("stream".to_string(), &self.0 + &f), ("fc".to_string(), f)].into())
///     }
/// }
/// let x = Array2::from_shape_fn((100, 3), |(i, j)| ((i * 7 + j * 5) % 11) as f64 - 5.0);
/// let model = |s: f64| StateDict::from_pairs([
///     ("fc.weight", Array2::from_shape_fn((3, 3), |(i, j)| s * (i as f64 - j as f64)).into_dyn()),
///     ("fc.bias", ndarray::arr1(&[s, 0.0, -s]).into_dyn())]);
/// let (a, b) = (model(1.0)?, model(-0.5)?);
/// let mid = a.lerp(&b, 0.5)?;
/// let repair = OutputRepair::new(Res(x)).with_stream_write("fc", "stream")?;
/// let (fixed, report) = repair.repair(&a, &b, &mid, 0.5)?;
/// assert_eq!(report.repaired, ["fc"]);
/// assert!((report.std_ratio_after["fc"] - 1.0).abs() < 1e-6);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct OutputRepair<A> {
    features: A,
    writes: Vec<Write>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Write {
    layer: String,
    stream: Option<String>,
}

/// What [`OutputRepair::repair`] did.
///
/// ```
/// let r = modelfusion::align::OutputRepairReport::default();
/// assert!(r.repaired.is_empty() && r.unreachable.is_empty());
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutputRepairReport {
    /// Layers rescaled, in correction order.
    pub repaired: Vec<String>,
    /// Per layer, the mean over channels of `std / target_std` of the reset point (the
    /// layer's output, or the stream for a stream write) before its correction.
    pub std_ratio_before: BTreeMap<String, f64>,
    /// The same ratio measured after all corrections.
    pub std_ratio_after: BTreeMap<String, f64>,
    /// Stream writes with channels whose target variance was out of reach (the stream's
    /// other writers alone exceed it; the variance-minimising scale was used), and those
    /// channels. Their means are still reset.
    pub unreachable: BTreeMap<String, Vec<usize>>,
}

/// The endpoints' reset-point statistics (mean and standard deviation per channel),
/// measured once by [`OutputRepair::endpoints`] for [`OutputRepair::repair_with`].
///
/// ```
/// use modelfusion::align::OutputEndpoints;
/// fn takes(_: &OutputEndpoints) {}
/// ```
#[derive(Clone, Debug)]
pub struct OutputEndpoints {
    shapes: Vec<(String, Vec<usize>)>,
    writes: Vec<Write>,
    producers: Vec<Producer>,
    a: Vec<(Array1<f64>, Array1<f64>)>,
    b: Vec<(Array1<f64>, Array1<f64>)>,
}

/// Moments of one reset point over the data: the layer output `f`, and for a stream
/// write the rest of the stream `p = s - f` and the stream `s`.
/// Variances at or below this are constant channels: shifted, never rescaled.
const CONSTANT_VAR: f64 = 1e-24;

struct PointStats {
    f: Moments,
    p: Option<Moments>,
    s: Option<Moments>,
}

impl PointStats {
    /// Mean and standard deviation of the reset point (`s` for a stream write, else `f`).
    fn target_point(&self) -> (Array1<f64>, Array1<f64>) {
        let m = self.s.as_ref().unwrap_or(&self.f);
        (m.mean().clone(), m.variance().mapv(f64::sqrt))
    }
}

impl<A> OutputRepair<A> {
    /// Output REPAIR with features from `features`; register layers with
    /// [`with_layer`](Self::with_layer) and [`with_stream_write`](Self::with_stream_write).
    ///
    /// ```
    /// let r = modelfusion::align::OutputRepair::new(()).with_layer("bn1")?;
    /// assert_eq!(r.layers().collect::<Vec<_>>(), ["bn1"]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(features: A) -> Self {
        OutputRepair {
            features,
            writes: Vec::new(),
        }
    }

    fn with_write(mut self, layer: &str, stream: Option<&str>) -> Result<Self> {
        if layer.is_empty() {
            return Err(Error::invalid("layer", "must not be empty"));
        }
        if self.writes.iter().any(|w| w.layer == layer) {
            return Err(Error::invalid(
                "layer",
                format!("`{layer}` is registered twice"),
            ));
        }
        if let Some(s) = stream
            && (s == layer || self.writes.iter().any(|w| w.layer == s))
        {
            return Err(Error::invalid(
                "stream",
                format!("stream key `{s}` is also a layer name"),
            ));
        }
        self.writes.push(Write {
            layer: layer.to_string(),
            stream: stream.map(str::to_string),
        });
        Ok(self)
    }

    /// Registers a layer whose output is reset on its own. Errors on an empty or
    /// repeated name.
    ///
    /// ```
    /// let r = modelfusion::align::OutputRepair::new(()).with_layer("bn1")?;
    /// assert!(r.with_layer("bn1").is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_layer(self, layer: &str) -> Result<Self> {
        self.with_write(layer, None)
    }

    /// Registers a layer that adds its output to a residual stream; `stream` is the
    /// features key of the stream right after the addition. Errors on an empty or
    /// repeated layer name, or a stream key equal to a layer name.
    ///
    /// ```
    /// use modelfusion::align::OutputRepair;
    /// let r = OutputRepair::new(()).with_layer("bn1")?.with_stream_write("layer1.0.bn2", "layer1.0")?;
    /// assert_eq!(r.layers().count(), 2);
    /// assert!(r.with_stream_write("x", "bn1").is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_stream_write(self, layer: &str, stream: &str) -> Result<Self> {
        self.with_write(layer, Some(stream))
    }

    /// The registered layers, in correction order.
    ///
    /// ```
    /// let r = modelfusion::align::OutputRepair::new(());
    /// assert_eq!(r.layers().count(), 0);
    /// ```
    pub fn layers(&self) -> impl Iterator<Item = &str> {
        self.writes.iter().map(|w| w.layer.as_str())
    }

    /// Repairs `merged`, the point at `t` of the path from `a` to `b` (aligned to one
    /// basis): two passes over the data for the endpoints, one per registered layer,
    /// and one for the report. Errors on a `t` outside `[0, 1]`, no registered layer,
    /// models that differ in names or shapes, a layer without `weight` and `bias`, a
    /// missing feature key, widths that disagree, or non-finite statistics.
    ///
    /// Equivalent to [`endpoints`](Self::endpoints) followed by
    /// [`repair_with`](Self::repair_with); use those to repair many points of one path
    /// (the endpoints are then measured once, not at every `t`).
    ///
    /// ```
    /// // see the type-level example
    /// # let _ = modelfusion::align::OutputRepair::new(());
    /// ```
    pub fn repair<M: Model>(
        &self,
        a: &M,
        b: &M,
        merged: &M,
        t: f64,
    ) -> Result<(M, OutputRepairReport)>
    where
        A: Activations<M>,
    {
        crate::error::check_fraction("t", t)?;
        a.check_compatible(merged)?;
        let ends = self.endpoints(a, b)?;
        self.repair_with(&ends, merged, t)
    }

    /// Measures the statistics of every registered reset point on the endpoints `a`
    /// and `b` once (two passes over the data), for [`repair_with`](Self::repair_with).
    /// Errors as [`repair`](Self::repair) does on the layers and the endpoints.
    ///
    /// ```
    /// use modelfusion::align::OutputRepair;
    /// use modelfusion::{Activations, Features, Model, Result, StateDict, StateDictF64};
    /// use ndarray::{Array2, Ix1, Ix2};
    ///
    /// /// A linear layer `fc` on fixed data.
    /// struct Out(Array2<f64>);
    /// impl Activations<StateDictF64> for Out {
    ///     fn num_batches(&self) -> usize { 1 }
    ///     fn activations(&self, m: &StateDictF64, _: usize) -> Result<Features<f64>> {
    ///         let w = m.get("fc.weight").unwrap().view().into_dimensionality::<Ix2>().unwrap();
    ///         let b = m.get("fc.bias").unwrap().view().into_dimensionality::<Ix1>().unwrap();
    ///         Ok([("fc".to_string(), self.0.dot(&w.t()) + b)].into())
    ///     }
    /// }
    /// let x = Array2::from_shape_fn((50, 2), |(i, j)| ((i * 3 + j * 7) % 5) as f64 - 2.0);
    /// let model = |s: f64| StateDict::from_pairs([
    ///     ("fc.weight", Array2::from_shape_fn((2, 2), |(i, j)| s * (1 + i + 2 * j) as f64).into_dyn()),
    ///     ("fc.bias", ndarray::arr1(&[s, -s]).into_dyn())]);
    /// let (a, b) = (model(1.0)?, model(-0.5)?);
    /// let repair = OutputRepair::new(Out(x)).with_layer("fc")?;
    /// let ends = repair.endpoints(&a, &b)?; // measured once for the whole path
    /// for t in [0.25, 0.5, 0.75] {
    ///     let (fixed, report) = repair.repair_with(&ends, &a.lerp(&b, t)?, t)?;
    ///     assert!((report.std_ratio_after["fc"] - 1.0).abs() < 1e-9);
    ///     let again = repair.repair(&a, &b, &a.lerp(&b, t)?, t)?.0;
    ///     assert_eq!(fixed.max_abs_diff(&again)?, 0.0);
    /// }
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn endpoints<M: Model>(&self, a: &M, b: &M) -> Result<OutputEndpoints>
    where
        A: Activations<M>,
    {
        if self.writes.is_empty() {
            return Err(Error::empty(
                "the layers to repair (register them with `with_layer` / `with_stream_write`)",
            ));
        }
        a.check_compatible(b)?;
        let producers: Vec<Producer> = self
            .writes
            .iter()
            .enumerate()
            .map(|(k, w)| affine_layer(a, &w.layer, k))
            .collect::<Result<_>>()?;
        let all: Vec<usize> = (0..self.writes.len()).collect();
        let points = |m: &M| -> Result<Vec<(Array1<f64>, Array1<f64>)>> {
            Ok(self
                .measure(m, &all, &producers)?
                .iter()
                .map(PointStats::target_point)
                .collect())
        };
        Ok(OutputEndpoints {
            shapes: a
                .names()
                .map(|n| {
                    (
                        n.to_string(),
                        a.get(n).map_or(vec![], |t| t.shape().to_vec()),
                    )
                })
                .collect(),
            writes: self.writes.clone(),
            producers: producers.clone(),
            a: points(a)?,
            b: points(b)?,
        })
    }

    /// Repairs `merged`, the point at `t` of the path between the endpoints measured by
    /// [`endpoints`](Self::endpoints): one pass over the data per registered layer, and
    /// one for the report. Errors on a `t` outside `[0, 1]`, endpoints measured for
    /// other layers, a `merged` whose names or shapes differ from the endpoints', a
    /// missing feature key, widths that disagree, or non-finite statistics.
    ///
    /// ```
    /// // see `endpoints`
    /// # let _ = modelfusion::align::OutputRepair::new(());
    /// ```
    pub fn repair_with<M: Model>(
        &self,
        ends: &OutputEndpoints,
        merged: &M,
        t: f64,
    ) -> Result<(M, OutputRepairReport)>
    where
        A: Activations<M>,
    {
        crate::error::check_fraction("t", t)?;
        if ends.writes != self.writes {
            return Err(Error::invalid(
                "endpoints",
                "measured for other registered layers than this repair's",
            ));
        }
        let same = merged
            .names()
            .eq(ends.shapes.iter().map(|(n, _)| n.as_str()))
            && ends
                .shapes
                .iter()
                .all(|(n, s)| merged.get(n).is_some_and(|t| t.shape() == s.as_slice()));
        if !same {
            return Err(Error::NameMismatch {
                detail: "the merged model's parameters or shapes differ from the endpoints'".into(),
            });
        }
        merged.check_finite("the merged model")?;
        let producers = &ends.producers;
        let all: Vec<usize> = (0..self.writes.len()).collect();
        let targets: Vec<(Array1<f64>, Array1<f64>)> = ends
            .a
            .iter()
            .zip(&ends.b)
            .map(|((ma, da), (mb, db))| (ma * (1.0 - t) + mb * t, da * (1.0 - t) + db * t))
            .collect();
        let mut model = merged.clone();
        let mut report = OutputRepairReport::default();
        for (k, p) in producers.iter().enumerate() {
            let st = self.measure(&model, &[k], producers)?.remove(0);
            let (tm, ts) = &targets[k];
            let (_, std_now) = st.target_point();
            report
                .std_ratio_before
                .insert(p.group.clone(), ratio_mean(&std_now, ts));
            let (alpha, shift_to, missed) = solve_reset(&st, tm, ts);
            if !missed.is_empty() {
                report.unreachable.insert(p.group.clone(), missed);
            }
            rescale(&mut model, p, &alpha, st.f.mean(), &shift_to)?;
            report.repaired.push(p.group.clone());
        }
        for ((p, st), (_, ts)) in producers
            .iter()
            .zip(self.measure(&model, &all, producers)?)
            .zip(&targets)
        {
            let (_, std) = st.target_point();
            report
                .std_ratio_after
                .insert(p.group.clone(), ratio_mean(&std, ts));
        }
        Ok((model, report))
    }

    /// One pass over the data: the statistics of the reset points `which`.
    fn measure<M: Model>(
        &self,
        model: &M,
        which: &[usize],
        producers: &[Producer],
    ) -> Result<Vec<PointStats>>
    where
        A: Activations<M>,
    {
        let nb = self.features.num_batches();
        if nb == 0 {
            return Err(Error::empty("the features source (it has no batches)"));
        }
        let mut out: Vec<PointStats> = which
            .iter()
            .map(|&k| {
                let c = model.get(&producers[k].bias).map_or(0, Tensor::len);
                let stream = self.writes[k].stream.is_some();
                PointStats {
                    f: Moments::new(c),
                    p: stream.then(|| Moments::new(c)),
                    s: stream.then(|| Moments::new(c)),
                }
            })
            .collect();
        for batch in 0..nb {
            let feats = self.features.activations(model, batch)?;
            let get = |key: &str, what: &str| {
                feats.get(key).ok_or_else(|| {
                    Error::invalid(
                        "features",
                        format!("batch {batch} has no {what} keyed `{key}`"),
                    )
                })
            };
            for (&k, st) in which.iter().zip(out.iter_mut()) {
                let w = &self.writes[k];
                let f = super::stats::to_f64(get(&w.layer, "layer output")?.view(), &w.layer)?;
                st.f.update(f.view())?;
                if let (Some(key), Some(pm), Some(sm)) = (&w.stream, st.p.as_mut(), st.s.as_mut()) {
                    let s = super::stats::to_f64(get(key, "stream")?.view(), key)?;
                    if s.dim() != f.dim() {
                        return Err(Error::shape(
                            format!(
                                "stream `{key}` vs the output of `{}` in batch {batch}",
                                w.layer
                            ),
                            &[f.nrows(), f.ncols()],
                            &[s.nrows(), s.ncols()],
                        ));
                    }
                    pm.update((&s - &f).view())?;
                    sm.update(s.view())?;
                }
            }
        }
        Ok(out)
    }
}

/// The producer `{layer}.weight` / `{layer}.bias` of an output reset, checked.
fn affine_layer<M: Model>(model: &M, layer: &str, position: usize) -> Result<Producer> {
    let weight = format!("{layer}.weight");
    let bias = format!("{layer}.bias");
    let w = model.require(
        &weight,
        "the model (an output-repaired layer needs a weight)",
    )?;
    let b = model.require(&bias, "the model (an output-repaired layer needs a bias)")?;
    if b.shape().len() != 1 || w.shape().first() != b.shape().first() {
        return Err(Error::shape(
            format!("`{bias}` (one entry per output channel of `{weight}`)"),
            &[w.shape().first().copied().unwrap_or(0)],
            b.shape(),
        ));
    }
    Ok(Producer {
        group: layer.to_string(),
        weight,
        bias,
        position,
    })
}

/// Per channel: the scale `alpha`, the target mean of the layer's output (so that the
/// reset point's mean is the target), and the channels whose target variance was out of
/// reach. A constant output channel keeps its scale (only its mean moves).
fn solve_reset(
    st: &PointStats,
    target_mean: &Array1<f64>,
    target_std: &Array1<f64>,
) -> (Array1<f64>, Array1<f64>, Vec<usize>) {
    let var_f = st.f.variance();
    let Some((p, s)) = st.p.as_ref().zip(st.s.as_ref()) else {
        let alpha = Array1::from_shape_fn(var_f.len(), |i| {
            if var_f[i] <= CONSTANT_VAR {
                1.0
            } else {
                target_std[i] / var_f[i].sqrt()
            }
        });
        return (alpha, target_mean.clone(), Vec::new());
    };
    let (var_p, var_s) = (p.variance(), s.variance());
    let mut missed = Vec::new();
    let alpha = Array1::from_shape_fn(var_f.len(), |i| {
        if var_f[i] <= CONSTANT_VAR {
            return 1.0;
        }
        let cov = 0.5 * (var_s[i] - var_p[i] - var_f[i]);
        let goal = target_std[i] * target_std[i];
        let disc = cov * cov - var_f[i] * (var_p[i] - goal);
        if disc < 0.0 {
            missed.push(i);
            return (-cov / var_f[i]).max(0.0);
        }
        let root = (-cov + disc.sqrt()) / var_f[i];
        if root < 0.0 {
            missed.push(i);
        }
        root.max(0.0)
    });
    (alpha, target_mean - p.mean(), missed)
}

/// Recomputes the running statistics of every batch norm of an (interpolated) model from
/// data, as PyTorch's `torch.optim.swa_utils.update_bn` does: the plain baseline of
/// REPAIR. A batch norm is every `L` with `L.running_mean` and `L.running_var` (1-D, of
/// one size); the inputs source (an [`Activations`]) returns each one's **input** under
/// `L`, computed with batch statistics (training mode), `(samples, channels)` (a
/// convolution's positions count as samples). The running mean becomes the
/// sample-weighted mean of the batch means, the running variance that of the unbiased
/// batch variances (batches of one sample are skipped); every other parameter is
/// unchanged.
///
/// ```
/// use modelfusion::align::BnReset;
/// use modelfusion::{Activations, Features, Model, Result, StateDict, StateDictF64};
/// use ndarray::{arr1, arr2};
///
/// struct Input; // the batch norm `bn` sees the same 3 samples every batch
/// impl Activations<StateDictF64> for Input {
///     fn num_batches(&self) -> usize { 2 }
///     fn activations(&self, _: &StateDictF64, _: usize) -> Result<Features<f64>> {
///         Ok([("bn".to_string(), arr2(&[[1.0], [2.0], [6.0]]))].into())
///     }
/// }
/// let m = StateDict::from_pairs([("bn.running_mean", arr1(&[0.0]).into_dyn()),
///                                ("bn.running_var", arr1(&[1.0]).into_dyn())])?;
/// let (fresh, reset) = BnReset::new(Input).reset(&m)?;
/// assert_eq!(reset, ["bn"]);
/// assert_eq!(fresh.get("bn.running_mean").unwrap()[[0]], 3.0);
/// assert_eq!(fresh.get("bn.running_var").unwrap()[[0]], 7.0); // unbiased
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct BnReset<A> {
    inputs: A,
}

impl<A> BnReset<A> {
    /// The reset with batch-norm inputs from `inputs`.
    ///
    /// ```
    /// let r = modelfusion::align::BnReset::new(());
    /// # let _ = r;
    /// ```
    pub fn new(inputs: A) -> Self {
        BnReset { inputs }
    }

    /// `model` with fresh running statistics, and the batch norms reset (in model order;
    /// none: the model comes back unchanged). Errors on a missing input key, a width
    /// that differs from the norm's, or no batch of at least two samples.
    ///
    /// ```
    /// // see the type-level example
    /// # let _ = modelfusion::align::BnReset::new(());
    /// ```
    pub fn reset<M: Model>(&self, model: &M) -> Result<(M, Vec<String>)>
    where
        A: Activations<M>,
    {
        let norms: Vec<(String, usize)> = model
            .names()
            .filter_map(|n| n.strip_suffix(".running_mean"))
            .filter_map(|l| {
                let (m, v) = (
                    model.get(&format!("{l}.running_mean"))?,
                    model.get(&format!("{l}.running_var"))?,
                );
                (m.shape().len() == 1 && m.shape() == v.shape()).then(|| (l.to_string(), m.len()))
            })
            .collect();
        if norms.is_empty() {
            return Ok((model.clone(), Vec::new()));
        }
        // Per norm: sample-weighted sums of batch means and unbiased variances, samples.
        let mut sums: Vec<(Array1<f64>, Array1<f64>, usize)> = norms
            .iter()
            .map(|(_, c)| (Array1::zeros(*c), Array1::zeros(*c), 0))
            .collect();
        for batch in 0..self.inputs.num_batches() {
            let feats = self.inputs.activations(model, batch)?;
            for ((layer, c), (sm, sv, total)) in norms.iter().zip(sums.iter_mut()) {
                let x = feats.get(layer).ok_or_else(|| {
                    Error::invalid(
                        "inputs",
                        format!("batch {batch} has no batch-norm input keyed `{layer}`"),
                    )
                })?;
                if x.ncols() != *c {
                    return Err(Error::shape(
                        format!(
                            "input of batch norm `{layer}` in batch {batch} (samples, channels)"
                        ),
                        &[x.nrows(), *c],
                        &[x.nrows(), x.ncols()],
                    ));
                }
                let n = x.nrows();
                if n < 2 {
                    continue;
                }
                let mut m = Moments::new(*c);
                m.update(x.view())?;
                let nf = n as f64;
                *sm = &*sm + &(m.mean() * nf);
                *sv = &*sv + &(m.variance() * (nf * nf / (nf - 1.0)));
                *total += n;
            }
        }
        let conv = |x: f64| <<M::Tensor as Tensor>::Elem as Scalar>::from_f64_lossy(x);
        let mut out = model.clone();
        for ((layer, _), (sm, sv, total)) in norms.iter().zip(&sums) {
            if *total == 0 {
                return Err(Error::invalid(
                    "inputs",
                    format!(
                        "recomputing the statistics of `{layer}` needs batches of at least 2 samples"
                    ),
                ));
            }
            for (suffix, acc) in [("running_mean", sm), ("running_var", sv)] {
                let name = format!("{layer}.{suffix}");
                let t = out.get_mut(&name).ok_or_else(|| Error::MissingParam {
                    name: name.clone(),
                    context: "the model".into(),
                })?;
                for (x, &v) in t.view_mut().iter_mut().zip(acc) {
                    *x = conv(v / *total as f64);
                }
            }
        }
        Ok((out, norms.into_iter().map(|(l, _)| l).collect()))
    }
}
