//! OT fusion (Singh & Jaggi 2020): layer-by-layer soft alignment by optimal transport.

use std::collections::{BTreeMap, BTreeSet};

use ndarray::{Array1, Array2, Axis, concatenate};

use super::activation::group_moments;
use super::{AlignStats, Aligner, Alignment, GroupMap, map_axis, validate_both};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::objective::Activations;
use crate::perm::{Permutation, PermutationSpec};
use crate::progress::{Observer, Silent};
use crate::tensor::{Scalar, Tensor};

/// How the transport plan is computed.
///
/// ```
/// use modelfusion::align::Transport;
/// assert_eq!(Transport::default(), Transport::Exact);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Transport {
    /// Exact optimal transport. Supported for equal widths with uniform marginals,
    /// where an optimal plan is a permutation (found by linear assignment), so the
    /// alignment is hard and keeps `other`'s function.
    #[default]
    Exact,
    /// Entropic transport (log-domain Sinkhorn) with regularisation `reg`, relative to
    /// the ground cost normalised to a maximum of 1.
    Sinkhorn {
        /// Entropic regularisation (> 0), e.g. `0.01`.
        reg: f64,
    },
}

/// The mass each unit carries.
///
/// ```
/// use modelfusion::align::Marginals;
/// assert_eq!(Marginals::default(), Marginals::Uniform);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Marginals {
    /// Every unit of a layer carries the same mass.
    #[default]
    Uniform,
    /// Mass proportional to the L1 norm of the unit's incoming weights (its row in
    /// the ground-cost features), or with activations to the root mean square of its
    /// activation, normalised to sum 1.
    Importance,
}

/// Distance between two units' descriptions: input-aligned weight rows, or activation
/// vectors over the samples.
///
/// ```
/// use modelfusion::align::GroundCost;
/// assert_eq!(GroundCost::default(), GroundCost::Euclidean);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GroundCost {
    /// `||a_i - b_j||`.
    #[default]
    Euclidean,
    /// `||a_i - b_j||^2`.
    SquaredEuclidean,
}

/// OT fusion: aligns `other` to `reference` one group at a time, in the order the
/// network computes them.
///
/// For each group, every unit is described by its incoming weights (the rows of the
/// parameters the group permutes on axis 0 — weights, biases, norm parameters —
/// whose other axes belong to groups already aligned, with `other`'s input axes
/// already mapped into the reference basis). A transport plan `T` between the two
/// models' units under the [`GroundCost`] and [`Marginals`] gives the group's
/// [`GroupMap::Transport`]; applied to `other`, each reference unit becomes the
/// barycentre `T^T W / colsum` of `other`'s units (the "barycentric projection"), and
/// the next layer reads them through the same plan.
///
/// Groups are visited so that each one's inputs are aligned first (for a residual
/// stream, which is read and written everywhere, the parameters whose other axes are
/// ready are used).
///
/// [`with_activations`](OtFusion::with_activations) switches to Singh & Jaggi's
/// activation-based variant: each unit is described by its activations over the
/// batches of an [`Activations`] source, and the ground cost is the distance between
/// those vectors, `E[(a_i - b_j)^2]` over the samples (squared or not), computed from
/// streamed moments without storing the activations.
///
/// With [`Transport::Exact`] and equal widths the plan is a permutation and the
/// alignment is hard (it keeps `other`'s function, and equals a permutation alignment);
/// with [`Transport::Sinkhorn`], and whenever the widths differ (fusing a wider MLP into
/// a narrower one), the maps are soft and **the aligned model does not compute
/// `other`'s function in general**: it is meant to be averaged with the reference right
/// away, which [`fuse`](OtFusion::fuse) does.
///
/// ```
/// use modelfusion::align::{Aligner, OtFusion, Transport};
/// use modelfusion::perm::{specs::{Architecture, MlpShapes}, PermutationSet};
/// use modelfusion::Model;
///
/// let arch = MlpShapes::new(&[4, 10, 10, 3])?;
/// let spec = arch.spec();
/// let a = arch.random_model(0);
/// let b = spec.apply(&PermutationSet::random(&spec, &a, 9)?, &a)?;
/// let al = OtFusion::new(Transport::Exact)?.align(&a, &b, &spec)?;
/// assert!(al.is_hard());
/// assert_eq!(al.apply(&spec, &b)?.max_abs_diff(&a)?, 0.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct OtFusion<S = WeightFeatures> {
    transport: Transport,
    marginals: Marginals,
    ground: GroundCost,
    source: S,
}

/// OT fusion's default unit description: incoming weights (see [`OtFusion`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WeightFeatures;

/// OT fusion's activation-based unit description: an [`Activations`] source (see
/// [`OtFusion::with_activations`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ActivationFeatures<A>(pub A);

impl OtFusion {
    /// OT fusion with `transport`, uniform marginals and the Euclidean ground cost.
    /// Errors on a Sinkhorn regularisation that is not finite and positive.
    ///
    /// ```
    /// use modelfusion::align::{OtFusion, Transport};
    /// assert!(OtFusion::new(Transport::Sinkhorn { reg: 0.0 }).is_err());
    /// ```
    pub fn new(transport: Transport) -> Result<Self> {
        if let Transport::Sinkhorn { reg } = transport {
            crate::error::check_positive("reg", reg)?;
        }
        Ok(OtFusion {
            transport,
            marginals: Marginals::Uniform,
            ground: GroundCost::Euclidean,
            source: WeightFeatures,
        })
    }

    /// Describes units by their activations over the batches of `activations` instead
    /// of their weights (keyed by group name, as for
    /// [`ActivationMatching`](super::ActivationMatching)). The ground cost is the
    /// distance between the two units' activation vectors; importance marginals weigh
    /// each unit by the root mean square of its activation. Groups are independent, so
    /// the visiting order is by name.
    ///
    /// ```
    /// use modelfusion::align::{Aligner, OtFusion, Transport};
    /// use modelfusion::perm::{specs::{Architecture, MlpShapes}, PermutationSet};
    /// use modelfusion::{Activations, Features, Model, Result, StateDictF32};
    /// use ndarray::{Array2, Ix2};
    ///
    /// /// Post-ReLU hidden features of a 1-hidden-layer MLP on fixed inputs.
    /// struct Hidden(Array2<f32>);
    /// impl Activations<StateDictF32> for Hidden {
    ///     fn num_batches(&self) -> usize { 1 }
    ///     fn activations(&self, m: &StateDictF32, _: usize) -> Result<Features<f32>> {
    ///         let w = m.get("layers.0.weight").unwrap().clone().into_dimensionality::<Ix2>().unwrap();
    ///         let h = (self.0.dot(&w.t()) + m.get("layers.0.bias").unwrap()).mapv(|v| v.max(0.0));
    ///         Ok([("hidden.0".to_string(), h.into_dimensionality::<Ix2>().unwrap())].into())
    ///     }
    /// }
    /// let arch = MlpShapes::new(&[5, 12, 2])?;
    /// let spec = arch.spec();
    /// let a = arch.random_model(0);
    /// let b = spec.apply(&PermutationSet::random(&spec, &a, 3)?, &a)?;
    /// let x = Array2::from_shape_fn((64, 5), |(i, j)| ((i * 7 + j * 3) % 11) as f32 / 5.0 - 1.0);
    /// let ot = OtFusion::new(Transport::Exact)?.with_activations(Hidden(x));
    /// let al = ot.align(&a, &b, &spec)?;
    /// assert_eq!(al.apply(&spec, &b)?.max_abs_diff(&a)?, 0.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_activations<A>(self, activations: A) -> OtFusion<ActivationFeatures<A>> {
        OtFusion {
            transport: self.transport,
            marginals: self.marginals,
            ground: self.ground,
            source: ActivationFeatures(activations),
        }
    }
}

impl<S> OtFusion<S> {
    /// Chooses the marginals.
    ///
    /// ```
    /// use modelfusion::align::{Marginals, OtFusion, Transport};
    /// let ot = OtFusion::new(Transport::Sinkhorn { reg: 0.05 })?.with_marginals(Marginals::Importance);
    /// # let _ = ot;
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_marginals(mut self, marginals: Marginals) -> Self {
        self.marginals = marginals;
        self
    }

    /// Chooses the ground cost.
    ///
    /// ```
    /// use modelfusion::align::{GroundCost, OtFusion, Transport};
    /// let ot = OtFusion::new(Transport::Exact)?.with_ground_cost(GroundCost::SquaredEuclidean);
    /// # let _ = ot;
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_ground_cost(mut self, ground: GroundCost) -> Self {
        self.ground = ground;
        self
    }

    /// Aligns `other` to `reference` and fuses: `(1 - weight) * aligned + weight *
    /// reference`; the result has the reference's shapes. Returns the fused model and
    /// the alignment.
    ///
    /// ```
    /// use modelfusion::align::{OtFusion, Transport};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// use modelfusion::Model;
    /// // fuse a wider MLP into a narrower one
    /// let narrow = MlpShapes::new(&[4, 8, 3])?;
    /// let wide = MlpShapes::new(&[4, 12, 3])?;
    /// let (a, b) = (narrow.random_model(0), wide.random_model(1));
    /// let ot = OtFusion::new(Transport::Sinkhorn { reg: 0.05 })?;
    /// let (fused, al) = ot.fuse(&a, &b, &narrow.spec(), 0.5)?;
    /// assert_eq!(fused.get("layers.0.weight").unwrap().shape(), &[8, 4]);
    /// assert_eq!(al.get("hidden.0").unwrap().sizes(), (8, 12));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn fuse<M: Model>(
        &self,
        reference: &M,
        other: &M,
        spec: &PermutationSpec,
        weight: f64,
    ) -> Result<(M, Alignment)>
    where
        Self: Aligner<M>,
    {
        crate::error::check_fraction("weight", weight)?;
        let al = self.align(reference, other, spec)?;
        let aligned = al.apply(spec, other)?;
        Ok((aligned.lerp(reference, weight)?, al))
    }

    fn plan(&self, cost: &Array2<f64>, a: &Array1<f64>, b: &Array1<f64>) -> Result<GroupMap> {
        let (n, m) = cost.dim();
        match self.transport {
            Transport::Exact => {
                if n != m || self.marginals != Marginals::Uniform {
                    return Err(Error::invalid(
                        "transport",
                        format!(
                            "exact transport is supported for equal widths with uniform marginals (got {n} vs {m} units, {:?} marginals); use Transport::Sinkhorn",
                            self.marginals
                        ),
                    ));
                }
                let sol = crate::solve::linear_sum_assignment(cost.view(), false)?;
                Ok(GroupMap::Permutation(Permutation::new(sol.permutation()?)?))
            }
            Transport::Sinkhorn { reg } => {
                let max = cost.iter().cloned().fold(0.0f64, f64::max);
                let scaled = if max > 0.0 { cost / max } else { cost.clone() };
                let ot = crate::solve::sinkhorn(a.view(), b.view(), scaled.view(), reg)?;
                Ok(GroupMap::Transport(ot.plan))
            }
        }
    }
}

impl<M: Model> Aligner<M> for OtFusion<WeightFeatures> {
    fn align(&self, reference: &M, other: &M, spec: &PermutationSpec) -> Result<Alignment> {
        let (sa, sb) = check_shapes(reference, other, spec)?;
        super::refuse_heads(spec, "OT fusion on weight features")?;
        let mut done: BTreeMap<String, GroupMap> = BTreeMap::new();
        let mut objective = Vec::new();
        let mut visits = Vec::new();
        let mut remaining: BTreeSet<String> = sa.keys().cloned().collect();
        while !remaining.is_empty() {
            let g = next_group(spec, &remaining, &done);
            let (fa, fb) = features(reference, other, spec, &g, &done)?;
            let cost = ground_cost(&fa, &fb, self.ground);
            let (ma, mb) = match self.marginals {
                Marginals::Uniform => (uniform(sa[&g]), uniform(sb[&g])),
                Marginals::Importance => (importance(&fa), importance(&fb)),
            };
            let map = self.plan(&cost, &ma, &mb)?;
            objective.push(transport_cost(&cost, &map));
            remaining.remove(&g);
            visits.push(g.clone());
            done.insert(g, map);
        }
        Ok(one_pass(done, objective, visits).with_spec(spec))
    }
}

impl<M: Model, A: Activations<M>> Aligner<M> for OtFusion<ActivationFeatures<A>> {
    fn align(&self, reference: &M, other: &M, spec: &PermutationSpec) -> Result<Alignment> {
        self.align_observed(reference, other, spec, &mut Silent)
    }

    fn align_observed(
        &self,
        reference: &M,
        other: &M,
        spec: &PermutationSpec,
        observer: &mut dyn Observer,
    ) -> Result<Alignment> {
        let (sa, sb) = check_shapes(reference, other, spec)?;
        let moments = group_moments(&self.source.0, reference, other, &sa, &sb, observer)?;
        let mut done: BTreeMap<String, GroupMap> = BTreeMap::new();
        let mut objective = Vec::new();
        let mut visits = Vec::new();
        for (g, cm) in moments {
            // E[(a_i - b_j)^2] = E[a_i^2] + E[b_j^2] - 2 E[a_i b_j]
            let second =
                |m: &super::Moments| -> Array1<f64> { m.variance() + m.mean().mapv(|v| v * v) };
            let (qa, qb) = (second(cm.x()), second(cm.y()));
            let cost = distances(&qa, &qb, &cm.cross_correlation(), self.ground);
            let map = match spec.head_layout(&g) {
                // Heads are matched hard (a soft plan would mix heads and break the
                // attention pattern), on the same ground cost.
                Some(layout) => GroupMap::Permutation(super::heads::best_assignment::<f64>(
                    &cost.mapv(|c| -c),
                    Some(layout),
                )?),
                None => {
                    let (ma, mb) = match self.marginals {
                        Marginals::Uniform => (uniform(sa[&g]), uniform(sb[&g])),
                        Marginals::Importance => {
                            (marginal(qa.mapv(f64::sqrt)), marginal(qb.mapv(f64::sqrt)))
                        }
                    };
                    self.plan(&cost, &ma, &mb)?
                }
            };
            objective.push(transport_cost(&cost, &map));
            visits.push(g.clone());
            done.insert(g, map);
        }
        Ok(one_pass(done, objective, visits).with_spec(spec))
    }
}

/// The spec fits both models, they hold the same names, and shapes agree except on
/// permuted axes. Returns both models' group sizes.
fn check_shapes<M: Model>(
    reference: &M,
    other: &M,
    spec: &PermutationSpec,
) -> Result<(BTreeMap<String, usize>, BTreeMap<String, usize>)> {
    let (sa, sb) = validate_both(reference, other, spec)?;
    for name in reference.names() {
        let a = reference.require(name, "the reference model")?;
        let b = other.get(name).ok_or_else(|| Error::NameMismatch {
            detail: format!("`{name}` is in the reference model but not in the other one"),
        })?;
        let permuted: BTreeSet<usize> = spec.param_axes(name).map(|(ax, _)| ax).collect();
        let fits = a.shape().len() == b.shape().len()
            && a.shape()
                .iter()
                .zip(b.shape())
                .enumerate()
                .all(|(ax, (x, y))| x == y || permuted.contains(&ax));
        if !fits {
            return Err(Error::shape(
                format!("parameter `{name}` (reference vs other; only permuted axes may differ)"),
                a.shape(),
                b.shape(),
            ));
        }
    }
    if reference.num_tensors() != other.num_tensors() {
        return Err(Error::NameMismatch {
            detail: format!(
                "the reference model has {} parameters, the other {}",
                reference.num_tensors(),
                other.num_tensors()
            ),
        });
    }
    reference.check_finite("the reference model")?;
    other.check_finite("the other model")?;
    Ok((sa, sb))
}

/// The next group to align: the first (by name) whose axis-0 parameters read only
/// aligned groups; failing that, the one with the most such parameters.
fn next_group(
    spec: &PermutationSpec,
    remaining: &BTreeSet<String>,
    done: &BTreeMap<String, GroupMap>,
) -> String {
    let mut best: Option<(usize, &String)> = None;
    for g in remaining {
        let members = spec.group(g).unwrap_or(&[]);
        let producers: Vec<&(String, usize)> = members.iter().filter(|(_, a)| *a == 0).collect();
        let ready = producers
            .iter()
            .filter(|(p, _)| inputs_ready(spec, p, g, done))
            .count();
        if ready == producers.len() {
            return g.clone();
        }
        if best.is_none_or(|(r, _)| ready > r) {
            best = Some((ready, g));
        }
    }
    best.map(|(_, g)| g.clone())
        .unwrap_or_else(|| remaining.iter().next().cloned().unwrap_or_default())
}

fn inputs_ready(
    spec: &PermutationSpec,
    param: &str,
    group: &str,
    done: &BTreeMap<String, GroupMap>,
) -> bool {
    spec.param_axes(param)
        .all(|(ax, g)| ax == 0 || (g != group && done.contains_key(g)))
}

/// Unit features of group `g` in both models: the ready axis-0 parameters, other axes
/// of `other` mapped into the reference basis, unfolded and concatenated.
fn features<M: Model>(
    reference: &M,
    other: &M,
    spec: &PermutationSpec,
    g: &str,
    done: &BTreeMap<String, GroupMap>,
) -> Result<(Array2<f64>, Array2<f64>)> {
    let mut fa = Vec::new();
    let mut fb = Vec::new();
    for (p, ax) in spec.group(g).unwrap_or(&[]) {
        if *ax != 0 || !inputs_ready(spec, p, g, done) {
            continue;
        }
        let a = reference.require(p, "the reference model")?;
        let mut b = other.require(p, "the other model")?.clone();
        for (oax, og) in spec.param_axes(p) {
            if oax != 0
                && let Some(m) = done.get(og)
            {
                b = map_axis(&b, oax, &m.input_map())?;
            }
        }
        fa.push(a.unfold(0)?.mapv(|x| x.to_f64_lossless()));
        fb.push(b.unfold(0)?.mapv(|x| x.to_f64_lossless()));
    }
    if fa.is_empty() {
        return Err(Error::Spec {
            reason: format!(
                "group `{g}` has no parameter on axis 0 whose other axes are aligned first, so OT fusion has no features to compare"
            ),
        });
    }
    let cat = |v: Vec<Array2<f64>>| -> Result<Array2<f64>> {
        let views: Vec<_> = v.iter().map(|x| x.view()).collect();
        concatenate(Axis(1), &views).map_err(|e| Error::invalid("features", e.to_string()))
    };
    Ok((cat(fa)?, cat(fb)?))
}

fn ground_cost(fa: &Array2<f64>, fb: &Array2<f64>, ground: GroundCost) -> Array2<f64> {
    let na: Array1<f64> = fa.rows().into_iter().map(|r| r.dot(&r)).collect();
    let nb: Array1<f64> = fb.rows().into_iter().map(|r| r.dot(&r)).collect();
    distances(&na, &nb, &fa.dot(&fb.t()), ground)
}

/// Distances from squared norms and inner products:
/// `d_ij^2 = na_i + nb_j - 2 g_ij` (clamped at 0), squared or not per `ground`.
fn distances(
    na: &Array1<f64>,
    nb: &Array1<f64>,
    g: &Array2<f64>,
    ground: GroundCost,
) -> Array2<f64> {
    Array2::from_shape_fn(g.dim(), |(i, j)| {
        let d2 = (na[i] + nb[j] - 2.0 * g[[i, j]]).max(0.0);
        match ground {
            GroundCost::Euclidean => d2.sqrt(),
            GroundCost::SquaredEuclidean => d2,
        }
    })
}

/// The alignment of the group maps computed in `visits` order, with their transport
/// costs as the objective.
fn one_pass(
    done: BTreeMap<String, GroupMap>,
    objective: Vec<f64>,
    visits: Vec<String>,
) -> Alignment {
    Alignment::from_maps(
        done,
        AlignStats {
            objective,
            sweeps: 1,
            converged: true,
            moved: BTreeMap::new(),
            order: vec![visits],
        },
    )
}

fn uniform(n: usize) -> Array1<f64> {
    Array1::from_elem(n, 1.0 / n.max(1) as f64)
}

fn importance(f: &Array2<f64>) -> Array1<f64> {
    marginal(
        f.rows()
            .into_iter()
            .map(|r| r.iter().map(|v| v.abs()).sum::<f64>())
            .collect(),
    )
}

/// Unit masses `w` (plus a floor, so no unit is empty), normalised to sum 1.
fn marginal(w: Array1<f64>) -> Array1<f64> {
    let w = w + 1e-12;
    let s = w.sum();
    w / s
}

fn transport_cost(cost: &Array2<f64>, map: &GroupMap) -> f64 {
    match map {
        GroupMap::Permutation(p) => {
            let n = p.len().max(1) as f64;
            super::assignment_score(cost, p) / n
        }
        GroupMap::Transport(t) => (t * cost).sum(),
    }
}
