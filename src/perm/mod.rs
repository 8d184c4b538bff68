//! Permutation symmetry: [`Permutation`]s, [`PermutationSpec`]s that say which axes of
//! which parameters a permutation acts on, and ready specs for common architectures.
//!
//! Hidden units of a network can be reordered without changing the function it
//! computes: for a hidden layer with permutation `P`, `W_l -> P W_l`, `b_l -> P b_l`,
//! `W_{l+1} -> W_{l+1} P^T`. A [`PermutationSpec`] records, for each permutation
//! *group*, every `(parameter, axis)` it reorders (PyTorch layout: a weight is
//! `(out, in, ...)`, so a group permutes axis 0 of the layer that produces it and axis
//! 1 of the layers that consume it). A [`PermutationSet`] holds one permutation per
//! group and applies them all to a model.
//!
//! ```
//! use modelfusion::perm::{specs::{self, Architecture}, PermutationSet};
//! use modelfusion::Model;
//!
//! let arch = specs::MlpShapes::new(&[4, 8, 8, 3]).unwrap();
//! let model = arch.random_model(7);
//! let spec = arch.spec();
//! let perms = PermutationSet::random(&spec, &model, 42).unwrap();
//! let permuted = spec.apply(&perms, &model).unwrap();
//! let back = spec.apply(&perms.inverse(), &permuted).unwrap();
//! assert_eq!(back.max_abs_diff(&model).unwrap(), 0.0);
//! ```

mod builder;
mod check;
mod file;
mod heads;
pub mod infer;
pub mod specs;
mod transformers;

pub use builder::SpecBuilder;
pub use check::{FunctionCheck, SpecIssue, SpecReport, check_function_preserved};
pub use file::SPEC_FILE_VERSION;
pub use heads::{HeadLayout, HeadPermutation, HeadSlot};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::Tensor;

/// A model's parameter names and shapes, all a shape check reads: a [`Model`], or a
/// checkpoint's header.
pub(crate) trait Shapes {
    /// The parameter names, in the model's order.
    fn param_names(&self) -> Vec<&str>;
    /// The shape of parameter `name`, if the model has it.
    fn shape_of(&self, name: &str) -> Option<&[usize]>;
}

/// A [`Model`]'s shapes.
pub(crate) struct ModelShapes<'m, M>(pub(crate) &'m M);

impl<M: Model> Shapes for ModelShapes<'_, M> {
    fn param_names(&self) -> Vec<&str> {
        self.0.names().collect()
    }
    fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.0.get(name).map(Tensor::shape)
    }
}

/// A bijection of `0..n`, stored as gather indices: applied to an axis, output position
/// `i` takes input position `perm[i]` (as [`Tensor::take`] does).
///
/// ```
/// use modelfusion::perm::Permutation;
/// let p = Permutation::new(vec![2, 0, 1]).unwrap();
/// assert_eq!(p.apply_to(&['a', 'b', 'c']).unwrap(), vec!['c', 'a', 'b']);
/// assert!(p.then(&p.inverse()).unwrap().is_identity());
/// assert!(Permutation::new(vec![0, 0, 1]).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Permutation {
    idx: Vec<usize>,
}

impl Permutation {
    /// Validates that `idx` is a bijection of `0..idx.len()`.
    pub fn new(idx: Vec<usize>) -> Result<Self> {
        let n = idx.len();
        let mut seen = vec![false; n];
        for (pos, &i) in idx.iter().enumerate() {
            if i >= n {
                return Err(Error::InvalidPermutation {
                    reason: format!("entry {i} at position {pos} is out of range for length {n}"),
                });
            }
            if std::mem::replace(&mut seen[i], true) {
                return Err(Error::InvalidPermutation {
                    reason: format!("entry {i} appears twice (second time at position {pos})"),
                });
            }
        }
        Ok(Permutation { idx })
    }

    /// The identity on `0..n`.
    ///
    /// ```
    /// assert!(modelfusion::perm::Permutation::identity(4).is_identity());
    /// ```
    pub fn identity(n: usize) -> Self {
        Permutation {
            idx: (0..n).collect(),
        }
    }

    /// A uniformly random permutation of `0..n`, reproducible from `seed`.
    ///
    /// ```
    /// use modelfusion::perm::Permutation;
    /// assert_eq!(Permutation::random(10, 3), Permutation::random(10, 3));
    /// ```
    pub fn random(n: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Self::random_with(n, &mut rng)
    }

    fn random_with(n: usize, rng: &mut ChaCha8Rng) -> Self {
        let mut idx: Vec<usize> = (0..n).collect();
        idx.shuffle(rng);
        Permutation { idx }
    }

    /// Length `n`.
    pub fn len(&self) -> usize {
        self.idx.len()
    }

    /// True for the permutation of the empty set.
    pub fn is_empty(&self) -> bool {
        self.idx.is_empty()
    }

    /// The gather indices.
    pub fn as_slice(&self) -> &[usize] {
        &self.idx
    }

    /// True when `perm[i] == i` for all `i`.
    pub fn is_identity(&self) -> bool {
        self.idx.iter().enumerate().all(|(i, &j)| i == j)
    }

    /// The inverse: applying `p` then `p.inverse()` restores the original order.
    pub fn inverse(&self) -> Self {
        let mut inv = vec![0; self.idx.len()];
        for (i, &j) in self.idx.iter().enumerate() {
            inv[j] = i;
        }
        Permutation { idx: inv }
    }

    /// The permutation equal to applying `self` first and `next` second.
    ///
    /// ```
    /// use modelfusion::perm::Permutation;
    /// let p = Permutation::new(vec![1, 2, 0]).unwrap();
    /// let q = Permutation::new(vec![0, 2, 1]).unwrap();
    /// let x = ['a', 'b', 'c'];
    /// let pq = p.then(&q).unwrap();
    /// assert_eq!(pq.apply_to(&x).unwrap(), q.apply_to(&p.apply_to(&x).unwrap()).unwrap());
    /// assert!(p.then(&Permutation::identity(2)).is_err());
    /// ```
    pub fn then(&self, next: &Permutation) -> Result<Self> {
        if self.len() != next.len() {
            return Err(Error::InvalidPermutation {
                reason: format!(
                    "cannot compose permutations of lengths {} and {}",
                    self.len(),
                    next.len()
                ),
            });
        }
        Ok(Permutation {
            idx: next.idx.iter().map(|&j| self.idx[j]).collect(),
        })
    }

    /// Reorders a slice: output `i` is `items[perm[i]]`; errors when the lengths differ.
    /// For tensors use [`Tensor::take`].
    pub fn apply_to<T: Clone>(&self, items: &[T]) -> Result<Vec<T>> {
        if items.len() != self.len() {
            return Err(Error::InvalidPermutation {
                reason: format!(
                    "permutation of length {} applied to {} items",
                    self.len(),
                    items.len()
                ),
            });
        }
        Ok(self.idx.iter().map(|&i| items[i].clone()).collect())
    }

    /// Number of positions `i` with `perm[i] != i`.
    ///
    /// ```
    /// let p = modelfusion::perm::Permutation::new(vec![1, 0, 2]).unwrap();
    /// assert_eq!(p.num_moved(), 2);
    /// ```
    pub fn num_moved(&self) -> usize {
        self.idx
            .iter()
            .enumerate()
            .filter(|&(i, &j)| i != j)
            .count()
    }
}

/// What a `(parameter, axis)` pair does for its group's units.
///
/// ```
/// use modelfusion::perm::Role;
/// assert_eq!(Role::infer(0, 2), Role::Produce); // rows of a weight `(out, in)`
/// assert_eq!(Role::infer(1, 4), Role::Consume); // input channels of a conv
/// assert_eq!(Role::infer(0, 1), Role::Follow);  // a bias or norm vector
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The axis indexes the units a layer writes (axis 0 of a PyTorch weight).
    Produce,
    /// The axis indexes the units a layer reads (axis 1 of a PyTorch weight).
    Consume,
    /// A per-unit vector that moves with its units (bias, norm scale and shift, running
    /// statistics).
    Follow,
}

impl Role {
    /// The PyTorch-layout convention: axis 0 of a tensor with two or more axes produces,
    /// any other axis of such a tensor consumes, a 1-D tensor follows.
    pub fn infer(axis: usize, ndim: usize) -> Role {
        match (axis, ndim) {
            (_, 0 | 1) => Role::Follow,
            (0, _) => Role::Produce,
            _ => Role::Consume,
        }
    }

    /// Lower-case name (`produce`, `consume`, `follow`).
    ///
    /// ```
    /// assert_eq!(modelfusion::perm::Role::Consume.as_str(), "consume");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Produce => "produce",
            Role::Consume => "consume",
            Role::Follow => "follow",
        }
    }
}

/// How a group acts on one `(parameter, axis)`: its [`Role`] (when declared; otherwise
/// inferred from the tensor's shape, see [`Role::infer`]) and its repeat factor.
///
/// A repeat factor `r > 1` says the axis holds `r` consecutive entries per unit, as the
/// first linear layer after a flatten does: channel `c` of a `(C, H, W)` feature map
/// becomes features `c*H*W .. (c+1)*H*W`, so `r = H*W` and the axis has `C * r` entries.
///
/// ```
/// use modelfusion::perm::{AxisRule, Role};
/// let r = AxisRule { role: Some(Role::Consume), repeat: 49 };
/// assert_eq!(r.repeat, 49);
/// assert_eq!(AxisRule::default().repeat, 1);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AxisRule {
    /// The declared role (`None`: inferred from the shape).
    pub role: Option<Role>,
    /// Entries per unit along the axis (1 for a plain axis).
    pub repeat: usize,
}

impl Default for AxisRule {
    fn default() -> Self {
        AxisRule {
            role: None,
            repeat: 1,
        }
    }
}

/// Which `(parameter, axis)` pairs each permutation group reorders.
///
/// Built from either direction — group to axes ([`from_groups`](Self::from_groups)) or
/// parameter to per-axis group ([`from_axes`](Self::from_axes)) — or with the
/// vocabulary of [`SpecBuilder`] (producers, consumers, norms, flatten, tied and
/// invariant parameters), and checked for consistency (an axis belongs to at most one
/// group). [`validate`](Self::validate) checks it against a model's shapes;
/// [`check`](Self::check) also looks for what a hand-written spec typically gets wrong
/// (a forgotten bias, a consumer on the wrong axis, a group that no layer reads), and
/// [`PermutationSpec::apply`] and every aligner refuse a spec with such issues.
///
/// Besides the groups a spec records:
/// - *invariant* parameters: their axes outside any group are deliberately left alone
///   (the network's input and output axes), so [`check`](Self::check) does not report
///   them;
/// - *passive* parameters: permuted with their group but left out of weight matching's
///   objective (BatchNorm running statistics, which the reference Git Re-Basin code does
///   not match; a parameter tied to another, which would count twice).
///
/// ```
/// use modelfusion::perm::PermutationSpec;
/// // A 2-layer MLP: one hidden group.
/// let spec = PermutationSpec::from_axes([
///     ("fc1.weight", vec![Some("h"), None]),
///     ("fc1.bias", vec![Some("h")]),
///     ("fc2.weight", vec![None, Some("h")]),
/// ]).unwrap();
/// assert_eq!(spec.group("h").unwrap().len(), 3);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PermutationSpec {
    groups: BTreeMap<String, Vec<(String, usize)>>,
    params: BTreeMap<String, BTreeMap<usize, String>>,
    /// Rules that differ from the default (inferred role, repeat 1).
    rules: BTreeMap<(String, usize), AxisRule>,
    invariant: BTreeSet<String>,
    passive: BTreeSet<String>,
    /// Attention groups: their head layout.
    heads: BTreeMap<String, HeadLayout>,
    /// The slot of every `(param, axis)` of an attention group.
    slots: BTreeMap<(String, usize), HeadSlot>,
}

/// Parameter name suffixes of running statistics, passive in specs built from lists.
const STATISTICS: [&str; 2] = ["running_mean", "running_var"];

impl PermutationSpec {
    /// Builds a spec from `group -> [(param, axis)]` lists (Git Re-Basin's
    /// `perm_to_axes`). Errors when an axis is claimed twice or a group is empty. Roles
    /// are inferred from shapes ([`Role::infer`]); parameters named `*running_mean` or
    /// `*running_var` are passive.
    ///
    /// ```
    /// use modelfusion::perm::PermutationSpec;
    /// let spec = PermutationSpec::from_groups([
    ///     ("h", vec![("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]),
    /// ]).unwrap();
    /// assert_eq!(spec.axes("fc2.weight").unwrap(), vec![None, Some("h")]);
    /// let bad = PermutationSpec::from_groups([("a", vec![("w", 0)]), ("b", vec![("w", 0)])]);
    /// assert!(bad.is_err());
    /// ```
    pub fn from_groups<G, P>(groups: impl IntoIterator<Item = (G, Vec<(P, usize)>)>) -> Result<Self>
    where
        G: Into<String>,
        P: Into<String>,
    {
        let mut spec = PermutationSpec::default();
        for (g, members) in groups {
            let g = g.into();
            if members.is_empty() {
                return Err(Error::Spec {
                    reason: format!("group `{g}` lists no (parameter, axis) pairs"),
                });
            }
            if spec.groups.contains_key(&g) {
                return Err(Error::Spec {
                    reason: format!("group `{g}` is defined twice"),
                });
            }
            for (p, axis) in members {
                spec.claim(&g, p.into(), axis, AxisRule::default())?;
            }
        }
        Ok(spec.with_default_passive().canonical())
    }

    /// Builds a spec from `param -> [group or none, per axis]` (Git Re-Basin's
    /// `axes_to_perm`). Roles and passive parameters as for
    /// [`from_groups`](Self::from_groups).
    pub fn from_axes<P, G>(params: impl IntoIterator<Item = (P, Vec<Option<G>>)>) -> Result<Self>
    where
        P: Into<String>,
        G: Into<String>,
    {
        let mut spec = PermutationSpec::default();
        for (p, axes) in params {
            let p = p.into();
            if spec.params.contains_key(&p) {
                return Err(Error::Spec {
                    reason: format!("parameter `{p}` is listed twice"),
                });
            }
            for (axis, g) in axes.into_iter().enumerate() {
                if let Some(g) = g {
                    spec.claim(&g.into(), p.clone(), axis, AxisRule::default())?;
                }
            }
        }
        Ok(spec.with_default_passive().canonical())
    }

    fn with_default_passive(mut self) -> Self {
        let stats: Vec<String> = self
            .params
            .keys()
            .filter(|p| STATISTICS.iter().any(|s| p.ends_with(s)))
            .cloned()
            .collect();
        self.passive.extend(stats);
        self
    }

    /// Sorts every group's members, so that equal specs compare equal however built.
    fn canonical(mut self) -> Self {
        for members in self.groups.values_mut() {
            members.sort();
        }
        self
    }

    fn claim(&mut self, group: &str, param: String, axis: usize, rule: AxisRule) -> Result<()> {
        if rule.repeat == 0 {
            return Err(Error::Spec {
                reason: format!("axis {axis} of `{param}` has repeat factor 0"),
            });
        }
        let axes = self.params.entry(param.clone()).or_default();
        if let Some(other) = axes.get(&axis) {
            return Err(Error::Spec {
                reason: format!(
                    "axis {axis} of `{param}` is claimed by both group `{other}` and group `{group}`"
                ),
            });
        }
        axes.insert(axis, group.to_string());
        if rule != AxisRule::default() {
            self.rules.insert((param.clone(), axis), rule);
        }
        self.groups
            .entry(group.to_string())
            .or_default()
            .push((param, axis));
        Ok(())
    }

    /// Declares parameters invariant: their axes outside every group are deliberately
    /// not permuted (e.g. the input axis of the first layer and the outputs of the last),
    /// so [`check`](Self::check) does not report them as forgotten.
    ///
    /// ```
    /// use modelfusion::perm::PermutationSpec;
    /// let spec = PermutationSpec::from_groups([("h", vec![("a.weight", 0)])])?
    ///     .with_invariant(["head.bias"]);
    /// assert!(spec.is_invariant("head.bias"));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_invariant<S: Into<String>>(mut self, params: impl IntoIterator<Item = S>) -> Self {
        self.invariant.extend(params.into_iter().map(Into::into));
        self
    }

    /// Declares parameters passive: permuted with their groups, but left out of weight
    /// matching's objective.
    ///
    /// ```
    /// use modelfusion::perm::PermutationSpec;
    /// let spec = PermutationSpec::from_groups([("h", vec![("bn.running_mean", 0), ("bn.scale", 0)])])?;
    /// assert!(spec.is_passive("bn.running_mean")); // by name, in specs built from lists
    /// assert!(spec.with_passive(["bn.scale"]).is_passive("bn.scale"));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_passive<S: Into<String>>(mut self, params: impl IntoIterator<Item = S>) -> Self {
        self.passive.extend(params.into_iter().map(Into::into));
        self
    }

    /// Whether `param` was declared invariant.
    pub fn is_invariant(&self, param: &str) -> bool {
        self.invariant.contains(param)
    }

    /// Whether `param` is passive (permuted, not matched).
    pub fn is_passive(&self, param: &str) -> bool {
        self.passive.contains(param)
    }

    /// The invariant parameters, sorted.
    pub fn invariant_params(&self) -> impl Iterator<Item = &str> {
        self.invariant.iter().map(String::as_str)
    }

    /// The passive parameters, sorted.
    pub fn passive_params(&self) -> impl Iterator<Item = &str> {
        self.passive.iter().map(String::as_str)
    }

    /// The rule of `(param, axis)`: declared role and repeat factor.
    ///
    /// ```
    /// use modelfusion::perm::{PermutationSpec, Role};
    /// let spec = PermutationSpec::from_groups([("h", vec![("w", 0)])])?;
    /// assert_eq!(spec.rule("w", 0).role, None);
    /// assert_eq!(spec.rule("w", 0).repeat, 1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn rule(&self, param: &str, axis: usize) -> AxisRule {
        self.rules
            .get(&(param.to_string(), axis))
            .copied()
            .unwrap_or_default()
    }

    /// The role of `(param, axis)`: the declared one, else inferred from `ndim`.
    pub fn role(&self, param: &str, axis: usize, ndim: usize) -> Role {
        self.rule(param, axis)
            .role
            .unwrap_or_else(|| Role::infer(axis, ndim))
    }

    /// True when some axis has a repeat factor above 1 (a flatten).
    pub fn has_repeats(&self) -> bool {
        self.rules.values().any(|r| r.repeat > 1)
    }

    /// Group names, sorted.
    pub fn group_names(&self) -> impl Iterator<Item = &str> {
        self.groups.keys().map(String::as_str)
    }

    /// Number of groups.
    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    /// The `(param, axis)` pairs of a group.
    pub fn group(&self, name: &str) -> Option<&[(String, usize)]> {
        self.groups.get(name).map(Vec::as_slice)
    }

    /// Every group with its `(param, axis)` pairs, sorted by group name.
    pub fn groups(&self) -> impl Iterator<Item = (&str, &[(String, usize)])> {
        self.groups.iter().map(|(g, m)| (g.as_str(), m.as_slice()))
    }

    /// Parameters the spec mentions, sorted.
    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.params.keys().map(String::as_str)
    }

    /// The per-axis groups of a parameter, up to its highest permuted axis (`None` for an
    /// axis no group reorders); `None` if the spec does not mention it.
    pub fn axes(&self, param: &str) -> Option<Vec<Option<&str>>> {
        let axes = self.params.get(param)?;
        let len = axes.keys().next_back().map_or(0, |&a| a + 1);
        Some((0..len).map(|a| axes.get(&a).map(String::as_str)).collect())
    }

    /// The `(axis, group)` pairs of a parameter, by axis.
    pub fn param_axes(&self, param: &str) -> impl Iterator<Item = (usize, &str)> {
        self.params
            .get(param)
            .into_iter()
            .flat_map(|m| m.iter().map(|(&a, g)| (a, g.as_str())))
    }

    /// Checks the spec against a model's shapes: every parameter it names exists, every
    /// permuted axis exists and is a multiple of its repeat factor, and all axes of one
    /// group have the same number of units. Returns each group's size. This is the
    /// shape check only; [`check`](Self::check) looks for likely mistakes too.
    ///
    /// ```
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// let arch = MlpShapes::new(&[4, 6, 2]).unwrap();
    /// let sizes = arch.spec().validate(&arch.random_model(0)).unwrap();
    /// assert_eq!(sizes["hidden.0"], 6);
    /// ```
    pub fn validate<M: Model>(&self, model: &M) -> Result<BTreeMap<String, usize>> {
        self.validate_shapes(&ModelShapes(model))
    }

    /// [`validate`](Self::validate) on names and shapes alone (a checkpoint's header).
    pub(crate) fn validate_shapes(&self, model: &dyn Shapes) -> Result<BTreeMap<String, usize>> {
        let mut sizes = BTreeMap::new();
        for (g, members) in &self.groups {
            let mut first: Option<(&str, usize, usize)> = None;
            for (p, axis) in members {
                let shape = model.shape_of(p).ok_or_else(|| Error::Spec {
                    reason: format!(
                        "group `{g}` names parameter `{p}`, which the model does not have"
                    ),
                })?;
                let len = *shape.get(*axis).ok_or_else(|| Error::Spec {
                    reason: format!(
                        "group `{g}` permutes axis {axis} of `{p}`, which has shape {shape:?}"
                    ),
                })?;
                if let Some(layout) = self.heads.get(g) {
                    let slot = self.slots.get(&(p.clone(), *axis)).copied();
                    let want = slot.map(|s| layout.slot_len(s));
                    if want != Some(len) {
                        return Err(Error::Spec {
                            reason: format!(
                                "attention group `{g}` ({} heads, {} key-value heads, head_dim {}) expects {} entries on axis {axis} of `{p}` ({}), which has shape {shape:?}",
                                layout.heads(),
                                layout.kv_heads(),
                                layout.head_dim(),
                                want.map_or("a slot".to_string(), |w| w.to_string()),
                                slot.map_or("no slot declared", HeadSlot::as_str)
                            ),
                        });
                    }
                    first.get_or_insert((p, *axis, layout.units()));
                    continue;
                }
                let repeat = self.rule(p, *axis).repeat;
                if len % repeat != 0 {
                    return Err(Error::Spec {
                        reason: format!(
                            "group `{g}` permutes axis {axis} of `{p}` (shape {shape:?}) in blocks of {repeat}, which do not divide its length {len}"
                        ),
                    });
                }
                let units = len / repeat;
                match first {
                    None => first = Some((p, *axis, units)),
                    Some((p0, a0, l0)) if l0 != units => {
                        return Err(Error::Spec {
                            reason: format!(
                                "group `{g}` has size {l0} on axis {a0} of `{p0}` but size {units} on axis {axis} of `{p}` (shape {shape:?}{})",
                                if repeat > 1 {
                                    format!(", blocks of {repeat}")
                                } else {
                                    String::new()
                                }
                            ),
                        });
                    }
                    Some(_) => {}
                }
            }
            if let Some((_, _, len)) = first {
                sizes.insert(g.clone(), len);
            }
        }
        Ok(sizes)
    }

    /// The gather indices that permutation `p` of `(param, axis)`'s group induces on the
    /// axis itself (expanded by the axis' repeat factor).
    pub fn axis_indices(&self, param: &str, axis: usize, p: &Permutation) -> Vec<usize> {
        if let Some((slot, layout)) = self.head_slot(param, axis) {
            return layout.slot_indices(slot, p);
        }
        let r = self.rule(param, axis).repeat;
        if r == 1 {
            return p.as_slice().to_vec();
        }
        p.as_slice()
            .iter()
            .flat_map(|&u| u * r..(u + 1) * r)
            .collect()
    }

    /// Applies one permutation per group to every axis the group reorders; parameters
    /// the spec does not mention are copied unchanged.
    ///
    /// Errors when the spec does not fit the model or has issues ([`check`](Self::check):
    /// a forgotten parameter, a group no layer reads or writes), a group has no
    /// permutation in `perms` (or `perms` has one for a group the spec does not have),
    /// or a permutation's length differs from its group's size.
    pub fn apply<M: Model>(&self, perms: &PermutationSet, model: &M) -> Result<M> {
        let sizes = self.require_sound(model)?;
        for (g, &size) in &sizes {
            let p = perms.get(g).ok_or_else(|| Error::Spec {
                reason: format!("no permutation given for group `{g}`"),
            })?;
            if p.len() != size {
                return Err(Error::InvalidPermutation {
                    reason: format!(
                        "permutation for group `{g}` has length {}, the group has size {size}",
                        p.len()
                    ),
                });
            }
        }
        if let Some((g, _)) = perms.iter().find(|(g, _)| !sizes.contains_key(*g)) {
            return Err(Error::Spec {
                reason: format!(
                    "a permutation is given for group `{g}`, which the spec does not have"
                ),
            });
        }
        self.check_structure(perms)?;
        // Every group has its permutation (checked above).
        self.apply_unchecked(perms, model)
    }
}

impl PermutationSpec {
    /// The head layout of an attention group (`None` for a plain group).
    ///
    /// ```
    /// use modelfusion::perm::{HeadLayout, HeadSlot, Role, SpecBuilder};
    /// let layout = HeadLayout::new(2, 1, 4)?;
    /// let mut b = SpecBuilder::new();
    /// b.attention("attn", layout)
    ///     .head_param("attn", "q.weight", 0, Role::Produce, HeadSlot::Query)
    ///     .head_param("attn", "k.weight", 0, Role::Produce, HeadSlot::Key)
    ///     .head_param("attn", "v.weight", 0, Role::Produce, HeadSlot::Value)
    ///     .head_param("attn", "o.weight", 1, Role::Consume, HeadSlot::Output);
    /// let spec = b.build()?;
    /// assert_eq!(spec.head_layout("attn"), Some(layout));
    /// assert_eq!(spec.head_slot("k.weight", 0).map(|s| s.0), Some(HeadSlot::Key));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn head_layout(&self, group: &str) -> Option<HeadLayout> {
        self.heads.get(group).copied()
    }

    /// The slot of `(param, axis)` in its attention group, with the group's layout.
    pub fn head_slot(&self, param: &str, axis: usize) -> Option<(HeadSlot, HeadLayout)> {
        let slot = *self.slots.get(&(param.to_string(), axis))?;
        let group = self.params.get(param)?.get(&axis)?;
        Some((slot, *self.heads.get(group)?))
    }

    /// True when some group is an attention group.
    pub fn has_heads(&self) -> bool {
        !self.heads.is_empty()
    }

    /// Checks that the permutation of every attention group in `perms` is structured
    /// (see [`HeadLayout::check`]); the error names the group.
    ///
    /// ```
    /// use modelfusion::perm::{HeadLayout, HeadSlot, Permutation, PermutationSet, Role, SpecBuilder};
    /// let mut b = SpecBuilder::new();
    /// b.attention("attn", HeadLayout::new(2, 2, 2)?)
    ///     .head_param("attn", "qkv.weight", 0, Role::Produce, HeadSlot::FusedQkv)
    ///     .head_param("attn", "o.weight", 1, Role::Consume, HeadSlot::Output);
    /// let spec = b.build()?;
    /// let mut perms = PermutationSet::new();
    /// perms.insert("attn", Permutation::new(vec![1, 0, 2, 3, 4, 5, 6, 7])?); // fine: no RoPE
    /// assert!(spec.check_structure(&perms).is_ok());
    /// perms.insert("attn", Permutation::new(vec![4, 1, 2, 3, 0, 5, 6, 7])?);
    /// assert!(spec.check_structure(&perms).unwrap_err().to_string().contains("`attn`"));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn check_structure(&self, perms: &PermutationSet) -> Result<()> {
        for (g, layout) in &self.heads {
            if let Some(p) = perms.get(g) {
                layout.check(p).map_err(|e| Error::InvalidPermutation {
                    reason: format!("attention group `{g}`: {e}"),
                })?;
            }
        }
        Ok(())
    }

    /// Every attention group has a slot on each member, and every slot is in one.
    fn check_heads(&self) -> Result<()> {
        for (g, members) in &self.groups {
            let attention = self.heads.contains_key(g);
            for (p, a) in members {
                let slotted = self.slots.contains_key(&(p.clone(), *a));
                if attention && !slotted {
                    return Err(Error::Spec {
                        reason: format!(
                            "axis {a} of `{p}` is in attention group `{g}` but has no head slot (query, key, value, output or fused_qkv)"
                        ),
                    });
                }
                if !attention && slotted {
                    return Err(Error::Spec {
                        reason: format!(
                            "axis {a} of `{p}` has a head slot but group `{g}` has no head layout"
                        ),
                    });
                }
                if slotted && self.rule(p, *a).repeat != 1 {
                    return Err(Error::Spec {
                        reason: format!(
                            "axis {a} of `{p}` in attention group `{g}` has a repeat factor"
                        ),
                    });
                }
            }
        }
        if let Some(g) = self.heads.keys().find(|g| !self.groups.contains_key(*g)) {
            return Err(Error::Spec {
                reason: format!("attention group `{g}` has a head layout but no members"),
            });
        }
        Ok(())
    }
}

impl fmt::Display for PermutationSpec {
    /// One line per group: `group: param[axis], ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (g, members) in &self.groups {
            let list: Vec<String> = members.iter().map(|(p, a)| format!("{p}[{a}]")).collect();
            writeln!(f, "{g}: {}", list.join(", "))?;
        }
        Ok(())
    }
}

/// One [`Permutation`] per group, by group name.
///
/// ```
/// use modelfusion::perm::{Permutation, PermutationSet};
/// let mut set = PermutationSet::new();
/// set.insert("h", Permutation::new(vec![1, 0]).unwrap());
/// assert!(!set.is_identity());
/// assert!(set.then(&set.inverse()).unwrap().is_identity());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PermutationSet {
    perms: BTreeMap<String, Permutation>,
}

impl PermutationSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The identity for every group of `spec`, sized from `model`.
    pub fn identity<M: Model>(spec: &PermutationSpec, model: &M) -> Result<Self> {
        Ok(PermutationSet {
            perms: spec
                .validate(model)?
                .into_iter()
                .map(|(g, n)| (g, Permutation::identity(n)))
                .collect(),
        })
    }

    /// A uniformly random permutation for every group of `spec`, reproducible from
    /// `seed` (groups drawn in sorted name order from one stream); attention groups get a
    /// uniformly random structured one ([`HeadLayout`]).
    pub fn random<M: Model>(spec: &PermutationSpec, model: &M, seed: u64) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Ok(PermutationSet {
            perms: spec
                .validate(model)?
                .into_iter()
                .map(|(g, n)| {
                    let p = match spec.head_layout(&g) {
                        Some(layout) => layout.random_with(&mut rng),
                        None => Permutation::random_with(n, &mut rng),
                    };
                    (g, p)
                })
                .collect(),
        })
    }

    /// Sets the permutation of `group`, returning the previous one.
    pub fn insert(&mut self, group: impl Into<String>, perm: Permutation) -> Option<Permutation> {
        self.perms.insert(group.into(), perm)
    }

    /// The permutation of `group`.
    pub fn get(&self, group: &str) -> Option<&Permutation> {
        self.perms.get(group)
    }

    /// `(group, permutation)` pairs, sorted by group.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Permutation)> {
        self.perms.iter().map(|(g, p)| (g.as_str(), p))
    }

    /// Number of groups.
    pub fn len(&self) -> usize {
        self.perms.len()
    }

    /// True when the set holds no group.
    pub fn is_empty(&self) -> bool {
        self.perms.is_empty()
    }

    /// True when every permutation is the identity.
    pub fn is_identity(&self) -> bool {
        self.perms.values().all(Permutation::is_identity)
    }

    /// The inverse of every permutation.
    pub fn inverse(&self) -> Self {
        PermutationSet {
            perms: self
                .perms
                .iter()
                .map(|(g, p)| (g.clone(), p.inverse()))
                .collect(),
        }
    }

    /// Group-wise composition: applying the result equals applying `self`, then `next`.
    /// Both sets must have the same groups with the same lengths.
    pub fn then(&self, next: &PermutationSet) -> Result<Self> {
        if self.perms.len() != next.perms.len() {
            return Err(Error::InvalidPermutation {
                reason: format!(
                    "cannot compose sets of {} and {} groups",
                    self.perms.len(),
                    next.perms.len()
                ),
            });
        }
        self.perms
            .iter()
            .map(|(g, p)| {
                let q = next.perms.get(g).ok_or_else(|| Error::InvalidPermutation {
                    reason: format!("group `{g}` is missing from the second set"),
                })?;
                Ok((g.clone(), p.then(q)?))
            })
            .collect::<Result<BTreeMap<_, _>>>()
            .map(|perms| PermutationSet { perms })
    }
}

impl FromIterator<(String, Permutation)> for PermutationSet {
    fn from_iter<I: IntoIterator<Item = (String, Permutation)>>(iter: I) -> Self {
        PermutationSet {
            perms: iter.into_iter().collect(),
        }
    }
}
