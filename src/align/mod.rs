//! Alignment: bringing model B into model A's basis.
//!
//! Two networks trained from different seeds compute similar functions with their hidden
//! units in different orders. An [`Aligner`] finds, for every permutation group of a
//! [`PermutationSpec`], the map that reorders (or softly recombines) B's units to match
//! A's; the result, an [`Alignment`], applies to B through the same spec.
//!
//! | aligner | what it matches | result |
//! |---|---|---|
//! | [`WeightMatching`] | weights: Git Re-Basin coordinate descent on `sum <A, pi(B)>` | hard permutations |
//! | [`ActivationMatching`] | hidden activations on data: one assignment per group on their cross- or Pearson correlation | hard permutations |
//! | [`OtFusion`] | rows of input-aligned weights, layer by layer (Singh & Jaggi 2020): exact transport or Sinkhorn | soft transport maps (hard for exact transport with equal widths) |
//! | [`SteMatching`] | a task loss at the midpoint: a proxy model trained through weight matching with a straight-through gradient (Git Re-Basin) | hard permutations |
//! | [`SinkhornRebasin`] | a task loss at the midpoint, or `||A - P(B)||^2`: Sinkhorn soft permutations trained end to end, hardened (Peña et al. 2023) | hard permutations |
//! | [`Identity`] | nothing: the naive baseline | identity permutations |
//!
//! [`ZipIt`] (Stoica et al. 2023) is not an aligner: it pairs correlated features
//! within and across the two models and merges them with merge / unmerge matrices
//! ([`Zip::merge`]), or zips only the first layers of an MLP ([`Zip::partial_mlp`]).
//!
//! A hard alignment keeps B's function exactly: `alignment.apply(spec, &b)` computes the
//! same outputs as `b` (the spec must describe the network correctly; the ready specs of
//! [`perm::specs`](crate::perm::specs) do). A soft alignment (a transport map that is not
//! a permutation) replaces each of A's units by a barycentre of B's units, which does
//! **not** preserve B's function in general; it is meant to be merged with A right away
//! ([`OtFusion::fuse`]).
//!
//! After interpolating two aligned networks, hidden units often lose variance; [`Repair`]
//! (Jordan et al. 2022) resets each unit's pre-activation mean and standard deviation to
//! the interpolation of the endpoints'. [`align_to_reference`] and [`align_to_mean`]
//! align many models at once so that they can be averaged.
//!
//! ```
//! use modelfusion::align::{Aligner, WeightMatching};
//! use modelfusion::perm::{specs::{Architecture, MlpShapes}, PermutationSet};
//! use modelfusion::Model;
//!
//! let arch = MlpShapes::new(&[6, 16, 16, 3])?;
//! let spec = arch.spec();
//! let a = arch.random_model(0);
//! // B is A with its hidden units shuffled: weight matching undoes the shuffle.
//! let b = spec.apply(&PermutationSet::random(&spec, &a, 1)?, &a)?;
//! let alignment = WeightMatching::new(7).align(&a, &b, &spec)?;
//! let aligned = alignment.apply(&spec, &b)?;
//! assert_eq!(aligned.max_abs_diff(&a)?, 0.0);
//! # Ok::<(), modelfusion::Error>(())
//! ```

mod activation;
mod heads;
mod information;
mod multi;
mod ot;
mod repair;
mod sinkhorn;
mod stats;
mod ste;
pub(crate) mod weight;
mod zipit;

use std::collections::BTreeMap;

use ndarray::{Array2, ArrayD, Axis, IxDyn};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::perm::{Permutation, PermutationSet, PermutationSpec, Role};
use crate::tensor::{Scalar, Tensor};

pub use activation::{ActivationMatching, Correlation};
pub use information::{JointHistogram, MAX_BINS};
pub use multi::{MultiAlignment, align_to_mean, align_to_reference};
pub use ot::{ActivationFeatures, GroundCost, Marginals, OtFusion, Transport, WeightFeatures};
pub use repair::{
    BnReset, Endpoints, OutputEndpoints, OutputRepair, OutputRepairReport, Repair, RepairReport,
};
pub use sinkhorn::{MidpointLoss, RebasinLoss, SinkhornRebasin, WeightDistance};
pub use stats::{CrossMoments, Moments};
pub use ste::SteMatching;
pub use weight::WeightMatching;
pub use zipit::{GroupZip, PartialZip, Zip, ZipIt};

use crate::progress::Observer;
#[cfg(doc)]
use crate::progress::Progress;

/// Finds the alignment that brings `other` into the basis of `reference`.
///
/// Auxiliary data (activations, seeds, solver options) lives in the aligner value, not
/// in the call, so every aligner is used the same way.
///
/// ```
/// use modelfusion::align::{Aligner, Identity};
/// use modelfusion::perm::specs::{Architecture, MlpShapes};
///
/// let arch = MlpShapes::new(&[4, 8, 2])?;
/// let (a, b) = (arch.random_model(0), arch.random_model(1));
/// let alignment = Identity.align(&a, &b, &arch.spec())?;
/// assert!(alignment.permutations().unwrap().is_identity());
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub trait Aligner<M: Model> {
    /// The alignment of `other` to `reference` for the groups of `spec`.
    fn align(&self, reference: &M, other: &M, spec: &PermutationSpec) -> Result<Alignment>;

    /// [`align`](Self::align), reporting progress to `observer`: activation-based
    /// aligners report each batch of statistics ([`Progress::Batch`]), weight matching
    /// each sweep ([`Progress::Sweep`]); a [`ControlFlow::Break`](std::ops::ControlFlow)
    /// stops with [`Error::Cancelled`]. The default reports
    /// nothing and calls `align`.
    ///
    /// ```
    /// use modelfusion::align::{ActivationMatching, Aligner};
    /// use modelfusion::objective::{Activations, Features};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// use modelfusion::progress::{from_fn, Progress};
    /// use modelfusion::{Model, Result, StateDictF32};
    ///
    /// /// The first layer's pre-activations on a fixed batch, as the group `hidden.0`.
    /// struct FirstLayer(ndarray::Array2<f32>);
    /// impl Activations<StateDictF32> for FirstLayer {
    ///     fn num_batches(&self) -> usize { 3 }
    ///     fn activations(&self, m: &StateDictF32, _: usize) -> Result<Features<f32>> {
    ///         let w = m.get("layers.0.weight").unwrap().view().into_dimensionality::<ndarray::Ix2>().unwrap();
    ///         Ok(Features::from([("hidden.0".to_string(), self.0.dot(&w.t()))]))
    ///     }
    /// }
    /// let arch = MlpShapes::new(&[3, 5, 2])?;
    /// let (a, b) = (arch.random_model(0), arch.random_model(1));
    /// let x = ndarray::Array2::from_shape_fn((8, 3), |(i, j)| (i * 3 + j) as f32 / 10.0);
    /// let mut batches = Vec::new();
    /// let aligner = ActivationMatching::new(FirstLayer(x));
    /// aligner.align_observed(&a, &b, &arch.spec(), &mut from_fn(|p| {
    ///     if let Progress::Batch { done, total } = *p { batches.push((done, total)) }
    /// }))?;
    /// assert_eq!(batches, [(1, 3), (2, 3), (3, 3)]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn align_observed(
        &self,
        reference: &M,
        other: &M,
        spec: &PermutationSpec,
        observer: &mut dyn Observer,
    ) -> Result<Alignment> {
        let _ = observer;
        self.align(reference, other, spec)
    }
}

/// How one permutation group of `other` is mapped onto `reference`'s units.
///
/// ```
/// use modelfusion::align::GroupMap;
/// use modelfusion::perm::Permutation;
/// let m = GroupMap::Permutation(Permutation::new(vec![1, 0]).unwrap());
/// assert_eq!(m.output_map()[[0, 1]], 1.0);
/// assert_eq!(m.sizes(), (2, 2));
/// // a soft plan: reference unit 0 takes half of each of other's two units
/// let t = GroupMap::Transport(ndarray::array![[0.25, 0.25], [0.0, 0.5]]);
/// assert_eq!(t.output_map()[[0, 0]], 0.5);
/// assert_eq!(t.input_map()[[0, 0]], 1.0);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum GroupMap {
    /// A hard reordering: aligned unit `i` is `other`'s unit `perm[i]`.
    Permutation(Permutation),
    /// A transport plan `T`, `(reference units, other units)`, with row sums `a`
    /// (reference marginal) and column sums `b` (other's marginal). Along an output axis
    /// (axis 0: a layer's units, their biases and norm statistics) aligned unit `i` is
    /// the barycentre `sum_j T[i, j] / a_i * x_j`; along an input axis (axes >= 1: the
    /// weights that read the units) it is `sum_j T[i, j] / b_j * x_j`, which keeps each
    /// of other's units' total contribution (so a unit split over several reference
    /// units, or several merged into one, still adds up).
    Transport(Array2<f64>),
}

impl GroupMap {
    /// The map applied along output axes (axis 0), `(reference units, other units)`: a
    /// permutation matrix, or the plan with rows normalised to sum 1.
    ///
    /// ```
    /// use modelfusion::align::GroupMap;
    /// let t = GroupMap::Transport(ndarray::array![[0.3, 0.1], [0.0, 0.6]]);
    /// assert!((t.output_map()[[0, 0]] - 0.75).abs() < 1e-12);
    /// ```
    pub fn output_map(&self) -> Array2<f64> {
        match self {
            GroupMap::Permutation(p) => permutation_matrix(p),
            GroupMap::Transport(t) => normalised(t, Axis(1)),
        }
    }

    /// The map applied along input axes (axes >= 1), `(reference units, other units)`:
    /// a permutation matrix, or the plan with columns normalised to sum 1.
    ///
    /// ```
    /// use modelfusion::align::GroupMap;
    /// let t = GroupMap::Transport(ndarray::array![[0.3, 0.1], [0.0, 0.6]]);
    /// assert!((t.input_map()[[0, 1]] - 1.0 / 7.0).abs() < 1e-12);
    /// ```
    pub fn input_map(&self) -> Array2<f64> {
        match self {
            GroupMap::Permutation(p) => permutation_matrix(p),
            GroupMap::Transport(t) => normalised(t, Axis(0)),
        }
    }

    /// `(reference units, other units)`.
    ///
    /// ```
    /// use modelfusion::align::GroupMap;
    /// assert_eq!(GroupMap::Transport(ndarray::Array2::zeros((2, 5))).sizes(), (2, 5));
    /// ```
    pub fn sizes(&self) -> (usize, usize) {
        match self {
            GroupMap::Permutation(p) => (p.len(), p.len()),
            GroupMap::Transport(m) => m.dim(),
        }
    }

    /// The permutation, for a hard map.
    ///
    /// ```
    /// use modelfusion::align::GroupMap;
    /// use modelfusion::perm::Permutation;
    /// assert!(GroupMap::Permutation(Permutation::identity(3)).permutation().is_some());
    /// assert!(GroupMap::Transport(ndarray::Array2::eye(3)).permutation().is_none());
    /// ```
    pub fn permutation(&self) -> Option<&Permutation> {
        match self {
            GroupMap::Permutation(p) => Some(p),
            GroupMap::Transport(_) => None,
        }
    }
}

/// `t` with every lane along `axis` scaled to sum 1 (`Axis(1)`: rows, `Axis(0)`:
/// columns); all-zero lanes stay zero.
fn normalised(t: &Array2<f64>, axis: Axis) -> Array2<f64> {
    let mut m = t.clone();
    for mut lane in m.lanes_mut(axis) {
        let s: f64 = lane.sum();
        if s > 0.0 {
            lane.mapv_inplace(|v| v / s);
        }
    }
    m
}

fn permutation_matrix(p: &Permutation) -> Array2<f64> {
    let n = p.len();
    let mut m = Array2::zeros((n, n));
    for (i, &j) in p.as_slice().iter().enumerate() {
        m[[i, j]] = 1.0;
    }
    m
}

/// What an aligner did: objective values, sweeps, how many units each group moved.
///
/// ```
/// use modelfusion::align::AlignStats;
/// let s = AlignStats::default();
/// assert_eq!(s.sweeps, 0);
/// assert!(s.objective.is_empty());
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AlignStats {
    /// The aligner's objective: for weight matching `sum <A, pi(B)>` before the first
    /// sweep and after every sweep (never decreasing); for activation matching and OT
    /// fusion one value per group in visiting order (matched correlation, transport
    /// cost).
    pub objective: Vec<f64>,
    /// Sweeps over the groups (1 for one-shot aligners).
    pub sweeps: usize,
    /// True when the method stopped by its own criterion rather than an iteration cap.
    pub converged: bool,
    /// Per group, the number of units not mapped to themselves (hard maps only).
    pub moved: BTreeMap<String, usize>,
    /// The groups in the order they were visited, one list per sweep (weight matching
    /// and OT fusion; empty for aligners that visit groups independently).
    pub order: Vec<Vec<String>>,
}

/// The result of an [`Aligner`]: one [`GroupMap`] per permutation group, and statistics.
///
/// ```
/// use modelfusion::align::{Aligner, Alignment, Identity};
/// use modelfusion::perm::specs::{Architecture, MlpShapes};
/// use modelfusion::Model;
///
/// let arch = MlpShapes::new(&[4, 8, 2])?;
/// let (a, b) = (arch.random_model(0), arch.random_model(1));
/// let al = Identity.align(&a, &b, &arch.spec())?;
/// assert!(al.is_hard());
/// assert_eq!(al.apply(&arch.spec(), &b)?, b);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Alignment {
    maps: BTreeMap<String, GroupMap>,
    stats: AlignStats,
    /// The spec it was made for (set by every aligner of the crate).
    spec: Option<PermutationSpec>,
}

impl Alignment {
    /// An alignment of hard permutations, with statistics (the `moved` counts are filled
    /// in from the permutations).
    ///
    /// ```
    /// use modelfusion::align::{Alignment, AlignStats};
    /// use modelfusion::perm::{Permutation, PermutationSet};
    /// let mut set = PermutationSet::new();
    /// set.insert("h", Permutation::new(vec![1, 0, 2]).unwrap());
    /// let al = Alignment::from_permutations(set, AlignStats::default());
    /// assert_eq!(al.stats().moved["h"], 2);
    /// ```
    pub fn from_permutations(perms: PermutationSet, mut stats: AlignStats) -> Self {
        let maps: BTreeMap<String, GroupMap> = perms
            .iter()
            .map(|(g, p)| (g.to_string(), GroupMap::Permutation(p.clone())))
            .collect();
        stats.moved = perms
            .iter()
            .map(|(g, p)| (g.to_string(), p.num_moved()))
            .collect();
        Alignment {
            maps,
            stats,
            spec: None,
        }
    }

    /// An alignment from arbitrary group maps.
    ///
    /// ```
    /// use modelfusion::align::{Alignment, AlignStats, GroupMap};
    /// use std::collections::BTreeMap;
    /// let mut maps = BTreeMap::new();
    /// maps.insert("h".to_string(), GroupMap::Transport(ndarray::Array2::eye(3)));
    /// let al = Alignment::from_maps(maps, AlignStats::default());
    /// assert!(!al.is_hard());
    /// ```
    pub fn from_maps(maps: BTreeMap<String, GroupMap>, mut stats: AlignStats) -> Self {
        stats.moved = maps
            .iter()
            .filter_map(|(g, m)| m.permutation().map(|p| (g.clone(), p.num_moved())))
            .collect();
        Alignment {
            maps,
            stats,
            spec: None,
        }
    }

    /// Remembers `spec` as the one the alignment was made for, so that
    /// [`apply_to`](Self::apply_to) needs only the model. The crate's aligners do this
    /// themselves.
    ///
    /// ```
    /// use modelfusion::align::{Alignment, AlignStats};
    /// use modelfusion::perm::{PermutationSet, specs::{Architecture, MlpShapes}};
    /// let arch = MlpShapes::new(&[2, 3, 1])?;
    /// let a = arch.random_model(0);
    /// let al = Alignment::from_permutations(PermutationSet::random(&arch.spec(), &a, 1)?, AlignStats::default())
    ///     .with_spec(&arch.spec());
    /// assert_eq!(al.spec(), Some(&arch.spec()));
    /// assert_eq!(al.apply_to(&a)?, al.apply(&arch.spec(), &a)?);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_spec(mut self, spec: &PermutationSpec) -> Self {
        self.spec = Some(spec.clone());
        self
    }

    /// The spec the alignment was made for, when known.
    ///
    /// ```
    /// use modelfusion::align::{Aligner, Identity};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// let arch = MlpShapes::new(&[2, 3, 1])?;
    /// let a = arch.random_model(0);
    /// assert_eq!(Identity.align(&a, &a, &arch.spec())?.spec(), Some(&arch.spec()));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn spec(&self) -> Option<&PermutationSpec> {
        self.spec.as_ref()
    }

    /// [`apply`](Self::apply) through the spec the alignment was made with: brings
    /// `model` (the `other` of [`Aligner::align`]) into the reference basis. Errors for an
    /// alignment built by hand without [`with_spec`](Self::with_spec).
    ///
    /// ```
    /// use modelfusion::align::{Aligner, WeightMatching};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// let arch = MlpShapes::new(&[3, 6, 2])?;
    /// let (a, b) = (arch.random_model(0), arch.random_model(1));
    /// let aligned = WeightMatching::new(0).align(&a, &b, &arch.spec())?.apply_to(&b)?;
    /// # use modelfusion::Model;
    /// assert_eq!(aligned.get("layers.1.bias"), b.get("layers.1.bias"));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn apply_to<M: Model>(&self, model: &M) -> Result<M> {
        let spec = self.spec.as_ref().ok_or_else(|| Error::Spec {
            reason: "the alignment does not know its spec (built by hand without `with_spec`); use `apply(&spec, model)`".into(),
        })?;
        self.apply(spec, model)
    }

    /// The identity alignment for every group of `spec`, sized from `model`.
    ///
    /// ```
    /// use modelfusion::align::Alignment;
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// let arch = MlpShapes::new(&[2, 3, 1])?;
    /// let al = Alignment::identity(&arch.spec(), &arch.random_model(0))?;
    /// assert!(al.permutations().unwrap().is_identity());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn identity<M: Model>(spec: &PermutationSpec, model: &M) -> Result<Self> {
        Ok(Self::from_permutations(
            PermutationSet::identity(spec, model)?,
            AlignStats {
                sweeps: 0,
                converged: true,
                ..AlignStats::default()
            },
        ))
    }

    /// The map of `group`.
    ///
    /// ```
    /// use modelfusion::align::{Aligner, WeightMatching};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// let arch = MlpShapes::new(&[3, 6, 2])?;
    /// let (a, b) = (arch.random_model(0), arch.random_model(1));
    /// let al = WeightMatching::new(0).align(&a, &b, &arch.spec())?;
    /// assert_eq!(al.get("hidden.0").unwrap().sizes(), (6, 6));
    /// assert!(al.get("nope").is_none());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn get(&self, group: &str) -> Option<&GroupMap> {
        self.maps.get(group)
    }

    /// `(group, map)` pairs, sorted by group.
    ///
    /// ```
    /// use modelfusion::align::{Aligner, WeightMatching};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// let arch = MlpShapes::new(&[3, 6, 2])?;
    /// let (a, b) = (arch.random_model(0), arch.random_model(1));
    /// let al = WeightMatching::new(0).align(&a, &b, &arch.spec())?;
    /// assert_eq!(al.iter().map(|(g, _)| g).collect::<Vec<_>>(), vec!["hidden.0"]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (&str, &GroupMap)> {
        self.maps.iter().map(|(g, m)| (g.as_str(), m))
    }

    /// Statistics of the run that produced the alignment.
    ///
    /// ```
    /// use modelfusion::align::{Aligner, WeightMatching};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// let arch = MlpShapes::new(&[3, 6, 2])?;
    /// let (a, b) = (arch.random_model(0), arch.random_model(1));
    /// let al = WeightMatching::new(0).align(&a, &b, &arch.spec())?;
    /// assert!(al.stats().converged && al.stats().sweeps >= 1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn stats(&self) -> &AlignStats {
        &self.stats
    }

    /// True when every group's map is a permutation.
    ///
    /// ```
    /// use modelfusion::align::{Aligner, WeightMatching};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// let arch = MlpShapes::new(&[3, 6, 2])?;
    /// let (a, b) = (arch.random_model(0), arch.random_model(1));
    /// let al = WeightMatching::new(0).align(&a, &b, &arch.spec())?;
    /// assert!(al.is_hard());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn is_hard(&self) -> bool {
        self.maps.values().all(|m| m.permutation().is_some())
    }

    /// The permutations, when the alignment is hard.
    ///
    /// ```
    /// use modelfusion::align::{Aligner, WeightMatching};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// let arch = MlpShapes::new(&[3, 6, 2])?;
    /// let (a, b) = (arch.random_model(0), arch.random_model(1));
    /// let al = WeightMatching::new(0).align(&a, &b, &arch.spec())?;
    /// assert_eq!(al.permutations().unwrap().len(), 1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn permutations(&self) -> Option<PermutationSet> {
        self.maps
            .iter()
            .map(|(g, m)| m.permutation().map(|p| (g.clone(), p.clone())))
            .collect()
    }

    /// Brings `model` (the `other` of [`Aligner::align`]) into the reference basis.
    ///
    /// Hard maps reorder every axis their group permutes (the result computes the same
    /// function as `model`); soft maps multiply each such axis by the map, which changes
    /// the group's size to the reference's. Parameters outside the spec are copied.
    ///
    /// Errors when the spec does not fit the model, a group has no map, or a map's size
    /// does not match its group in `model`.
    ///
    /// ```
    /// use modelfusion::align::{Aligner, WeightMatching};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// let arch = MlpShapes::new(&[3, 6, 2])?;
    /// let (a, b) = (arch.random_model(0), arch.random_model(1));
    /// let al = WeightMatching::new(0).align(&a, &b, &arch.spec())?;
    /// let aligned = al.apply(&arch.spec(), &b)?; // same function as b, in a's basis
    /// assert_eq!(aligned.get("layers.1.bias"), b.get("layers.1.bias"));
    /// # use modelfusion::Model;
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn apply<M: Model>(&self, spec: &PermutationSpec, model: &M) -> Result<M> {
        let sizes = spec.require_sound(model)?;
        for (g, &size) in &sizes {
            let m = self.maps.get(g).ok_or_else(|| Error::Spec {
                reason: format!("the alignment has no map for group `{g}`"),
            })?;
            if m.sizes().1 != size {
                return Err(Error::shape(
                    format!(
                        "map of group `{g}` (reference units, other units) vs the model's group size"
                    ),
                    &[m.sizes().0, size],
                    &[m.sizes().0, m.sizes().1],
                ));
            }
        }
        if let Some(perms) = self.permutations() {
            return spec.apply(&perms, model);
        }
        // Hard maps gather along their axes (head slots and repeat factors included);
        // soft ones multiply, which needs plain axes.
        let soft = |g: &str| matches!(self.maps.get(g), Some(GroupMap::Transport(_)));
        if let Some(g) = spec
            .groups()
            .find(|(g, axes)| {
                soft(g)
                    && (spec.head_layout(g).is_some()
                        || axes.iter().any(|(p, a)| spec.rule(p, *a).repeat > 1))
            })
            .map(|(g, _)| g)
        {
            return Err(Error::Spec {
                reason: format!(
                    "a soft (transport) map cannot act on group `{g}`: its axes are flattened (repeat factors above 1) or structured (attention heads); align it with a permutation"
                ),
            });
        }
        let matrices: BTreeMap<&str, (Array2<f64>, Array2<f64>)> = self
            .maps
            .iter()
            .filter(|(_, m)| matches!(m, GroupMap::Transport(_)))
            .map(|(g, m)| (g.as_str(), (m.output_map(), m.input_map())))
            .collect();
        model.try_map(|name, t| {
            let mut out: Option<M::Tensor> = None;
            for (axis, g) in spec.param_axes(name) {
                let cur = out.as_ref().unwrap_or(t);
                let next = match (self.maps.get(g), matrices.get(g)) {
                    (Some(GroupMap::Permutation(p)), _) => {
                        cur.take(axis, &spec.axis_indices(name, axis, p))?
                    }
                    (_, Some((mo, mi))) => {
                        let m = match spec.role(name, axis, t.shape().len()) {
                            Role::Consume => mi,
                            Role::Produce | Role::Follow => mo,
                        };
                        map_axis(cur, axis, m)?
                    }
                    _ => {
                        return Err(Error::Spec {
                            reason: format!("the alignment has no map for group `{g}`"),
                        });
                    }
                };
                out = Some(next);
            }
            Ok(out.unwrap_or_else(|| t.clone()))
        })
    }
}

/// `t` with axis `axis` replaced by `m` times it: output index `i` on that axis is
/// `sum_j m[i, j] * t[.., j, ..]`.
pub(crate) fn map_axis<T: Tensor>(t: &T, axis: usize, m: &Array2<f64>) -> Result<T> {
    let shape = t.shape().to_vec();
    let n = *shape.get(axis).ok_or_else(|| {
        Error::invalid(
            "axis",
            format!("axis {axis} out of range for shape {shape:?}"),
        )
    })?;
    if m.ncols() != n {
        return Err(Error::shape(
            format!("map applied to axis {axis}"),
            &[m.nrows(), n],
            &[m.nrows(), m.ncols()],
        ));
    }
    let u = t.unfold(axis)?.mapv(|x| x.to_f64_lossless());
    let prod = m.dot(&u);
    let mut front = shape.clone();
    front.remove(axis);
    front.insert(0, m.nrows());
    let data: Vec<T::Elem> = prod.iter().map(|&x| T::Elem::from_f64_lossy(x)).collect();
    let arr = ArrayD::from_shape_vec(IxDyn(&front), data)
        .map_err(|e| Error::invalid("map", e.to_string()))?;
    // Move axis 0 back to `axis`.
    let mut order: Vec<usize> = (1..shape.len()).collect();
    order.insert(axis, 0);
    let moved = arr.permuted_axes(IxDyn(&order));
    Ok(T::from_array(moved.as_standard_layout().into_owned()))
}

/// Checks that `spec` fits both models and that they agree on every group size; returns
/// the sizes.
/// Aligners without a structured solve refuse attention groups (their permutations
/// would break the head structure).
pub(crate) fn refuse_heads(spec: &PermutationSpec, aligner: &str) -> Result<()> {
    match spec.group_names().find(|g| spec.head_layout(g).is_some()) {
        Some(g) => Err(Error::Unsupported {
            what: format!("{aligner} on attention group `{g}`"),
            reason: "structured (attention-head) groups are matched by WeightMatching, ActivationMatching and OtFusion::with_activations (hard head matching)".into(),
        }),
        None => Ok(()),
    }
}

pub(crate) fn check_pair<M: Model>(
    reference: &M,
    other: &M,
    spec: &PermutationSpec,
) -> Result<BTreeMap<String, usize>> {
    let (sa, sb) = validate_both(reference, other, spec)?;
    reference.check_compatible(other)?;
    reference.check_finite("the reference model")?;
    other.check_finite("the other model")?;
    debug_assert_eq!(sa, sb);
    Ok(sa)
}

/// Validates `spec` against both models (errors say which); returns both size maps.
pub(crate) fn validate_both<M: Model>(
    reference: &M,
    other: &M,
    spec: &PermutationSpec,
) -> Result<(BTreeMap<String, usize>, BTreeMap<String, usize>)> {
    let sa = spec
        .require_sound(reference)
        .map_err(|e| context(e, "the reference model"))?;
    let sb = spec
        .require_sound(other)
        .map_err(|e| context(e, "the other model"))?;
    Ok((sa, sb))
}

/// Adds which model a spec error is about.
pub(crate) fn context(e: Error, which: &str) -> Error {
    match e {
        Error::Spec { reason } => Error::Spec {
            reason: format!("{reason} (checking {which})"),
        },
        other => other,
    }
}

/// The naive baseline: every group maps to itself.
///
/// ```
/// use modelfusion::align::{Aligner, Identity};
/// use modelfusion::perm::specs::{Architecture, MlpShapes};
/// let arch = MlpShapes::new(&[3, 5, 2])?;
/// let a = arch.random_model(0);
/// let al = Identity.align(&a, &arch.random_model(1), &arch.spec())?;
/// assert_eq!(al.stats().moved["hidden.0"], 0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Identity;

impl<M: Model> Aligner<M> for Identity {
    fn align(&self, reference: &M, other: &M, spec: &PermutationSpec) -> Result<Alignment> {
        check_pair(reference, other, spec)?;
        Ok(Alignment::identity(spec, reference)?.with_spec(spec))
    }
}

/// Solves a maximising assignment on a square score matrix in precision `E` (the
/// models' own: `f32` assignments are faster, and as exact as the `f32` weights the
/// scores come from); returns the permutation (`perm[i]` is the column of row `i`).
pub(crate) fn max_assignment_as<E: Scalar>(score: &Array2<f64>) -> Result<Permutation> {
    let s = score.mapv(E::from_f64_lossy);
    let a = crate::solve::linear_sum_assignment(s.view(), true)?;
    Permutation::new(a.permutation()?)
}

/// `sum_i score[i, perm[i]]`.
pub(crate) fn assignment_score(score: &Array2<f64>, perm: &Permutation) -> f64 {
    perm.as_slice()
        .iter()
        .enumerate()
        .map(|(i, &j)| score[[i, j]])
        .sum()
}
