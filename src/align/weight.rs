//! Weight matching (Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin"), coordinate
//! descent over permutation groups.

use std::collections::BTreeMap;

use ndarray::{Array2, ArrayView2, ArrayViewD, CowArray, IxDyn};
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::{AlignStats, Aligner, Alignment, assignment_score, check_pair, max_assignment_as};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::perm::{Permutation, PermutationSet, PermutationSpec};
use crate::progress::{Observer, Progress, Silent};
use crate::tensor::{Scalar, Tensor};

/// Git Re-Basin weight matching: maximises `sum_params <A, pi(B)>` over one permutation
/// per group by coordinate descent.
///
/// Starting from the identity (or [`with_init`](Self::with_init)), every sweep visits
/// the groups in a random order drawn from the seed. For group `p` it builds
///
/// `C_p = sum over (param, axis) in p of  A[param]_(axis) * (B[param] with every other
/// permuted axis reordered by its current permutation)_(axis)^T`
///
/// (`X_(axis)`: the tensor unfolded along `axis` into a `(units, rest)` matrix), solves
/// the assignment maximising `sum_i C_p[i, perm[i]]` (in the models' precision), and
/// takes it unless it scores below the current permutation. The objective is over
/// weights only: passive parameters ([`PermutationSpec::is_passive`]: BatchNorm running
/// statistics, tied copies) are permuted with their group when the alignment is applied
/// but left out of the sums, as in the reference implementation, whose objective has no
/// running statistics. Axes with a repeat factor (a flatten) are matched per unit,
/// summing over the unit's block. It stops after a
/// sweep in which no group gained more than `1e-12`, or after
/// [`max_iter`](Self::with_max_iter) sweeps.
///
/// Implementation: each group's `C_p` is built once in full and then kept up to date:
/// when a permutation that a term depends on has changed since the term was last
/// computed, only the units that moved contribute a correction
/// `A_J (B_new,J - B_old,J)^T`, so later sweeps, where few units move, cost a fraction
/// of the first. Each term's operands are read through the permutations and unfolded in
/// one pass (no permuted copy of a whole model is made), multiplied in the models' own
/// precision (`f32` or `f64`, `ndarray`'s GEMM, in blocks of rows on all threads) and
/// added into the `f64` cost matrix. A group whose cost did not change since its last
/// visit is not solved again (the answer would be the same). The objective after each
/// sweep is updated per parameter from the units that moved. Results depend only on the
/// seed, not on the number of threads (terms are summed in a fixed order, and the
/// blocking does not change any sum).
///
/// ```
/// use modelfusion::align::{Aligner, WeightMatching};
/// use modelfusion::perm::{specs::{Architecture, ResMlpShapes}, PermutationSet};
/// use modelfusion::Model;
///
/// let arch = ResMlpShapes::new(8, 16, 24, 2, 3)?;
/// let spec = arch.spec();
/// let a = arch.random_model(0);
/// let planted = PermutationSet::random(&spec, &a, 5)?;
/// let b = spec.apply(&planted, &a)?;
/// let al = WeightMatching::new(1).with_max_iter(50)?.align(&a, &b, &spec)?;
/// assert_eq!(al.permutations().unwrap(), planted.inverse());
/// let obj = &al.stats().objective;
/// assert!(obj.windows(2).all(|w| w[1] >= w[0]));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct WeightMatching {
    seed: u64,
    max_iter: usize,
    init: Option<PermutationSet>,
    restarts: usize,
    cost_cache: Option<usize>,
}

impl WeightMatching {
    /// Weight matching with the group order drawn from `seed`, at most 100 sweeps,
    /// starting from the identity.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::WeightMatching::new(3).max_iter(), 100);
    /// ```
    pub fn new(seed: u64) -> Self {
        WeightMatching {
            seed,
            max_iter: 100,
            init: None,
            restarts: 1,
            cost_cache: None,
        }
    }

    /// At most `max_iter` sweeps (at least 1).
    ///
    /// ```
    /// use modelfusion::align::WeightMatching;
    /// assert!(WeightMatching::new(0).with_max_iter(0).is_err());
    /// ```
    pub fn with_max_iter(mut self, max_iter: usize) -> Result<Self> {
        if max_iter == 0 {
            return Err(Error::invalid("max_iter", "must be at least 1, got 0"));
        }
        self.max_iter = max_iter;
        Ok(self)
    }

    /// Starts from `init` instead of the identity (checked against the spec and models
    /// when aligning).
    ///
    /// ```
    /// use modelfusion::align::{Aligner, WeightMatching};
    /// use modelfusion::perm::{specs::{Architecture, MlpShapes}, PermutationSet};
    /// let arch = MlpShapes::new(&[3, 5, 2])?;
    /// let a = arch.random_model(0);
    /// let wrong = PermutationSet::new(); // no permutation for hidden.0
    /// let r = WeightMatching::new(0).with_init(wrong).align(&a, &a, &arch.spec());
    /// assert!(r.is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_init(mut self, init: PermutationSet) -> Self {
        self.init = Some(init);
        self
    }

    /// Runs the descent from `restarts` starting points (at least 1) and keeps the one
    /// that ends with the highest objective (the earliest on a tie); the statistics are
    /// those of that run. The first start is the identity (or
    /// [`with_init`](Self::with_init)), every other one a random permutation drawn from
    /// the seed. Coordinate descent can stop in a local optimum, more often on narrow
    /// layers (measured: 32 of 900 planted permutations of 8- to 16-unit MLPs missed
    /// from the identity, none with 4 starts); restarts trade time for that risk.
    ///
    /// ```
    /// use modelfusion::align::WeightMatching;
    /// assert_eq!(WeightMatching::new(0).with_restarts(4)?.restarts(), 4);
    /// assert!(WeightMatching::new(0).with_restarts(0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_restarts(mut self, restarts: usize) -> Result<Self> {
        if restarts == 0 {
            return Err(Error::invalid("restarts", "must be at least 1, got 0"));
        }
        self.restarts = restarts;
        Ok(self)
    }

    /// The number of starting points.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::WeightMatching::new(0).restarts(), 1);
    /// ```
    pub fn restarts(&self) -> usize {
        self.restarts
    }

    /// Keeps the cost matrices of groups between visits only within `bytes` (8 bytes per
    /// entry: `n * n * 8` for a group of `n` units), smallest groups first; the others
    /// are rebuilt in full at every visit whose inputs changed instead of being updated
    /// by the units that moved. The default keeps every group. The results depend on
    /// the budget (a rebuilt cost is rounded differently from an updated one), never on
    /// where the weights come from: the same budget gives the same permutations, sweeps
    /// and objective in memory and out of core
    /// ([`align_checkpoints`](Self::align_checkpoints)). An LLM's MLP group of 14336
    /// units needs 1.6 GB for its cost.
    ///
    /// ```
    /// use modelfusion::align::{Aligner, WeightMatching};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// use modelfusion::perm::PermutationSet;
    /// let arch = MlpShapes::new(&[4, 16, 16, 2])?;
    /// let a = arch.random_model(0);
    /// let planted = PermutationSet::random(&arch.spec(), &a, 5)?;
    /// let b = arch.spec().apply(&planted, &a)?;
    /// // No cost kept: every visit rebuilds its group's cost, the answer is the same.
    /// let wm = WeightMatching::new(1).with_cost_cache(0);
    /// assert_eq!(wm.cost_cache(), Some(0));
    /// assert_eq!(wm.align(&a, &b, &arch.spec())?.permutations().unwrap(), planted.inverse());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_cost_cache(mut self, bytes: usize) -> Self {
        self.cost_cache = Some(bytes);
        self
    }

    /// The cost cache budget in bytes (`None`: unbounded).
    ///
    /// ```
    /// assert_eq!(modelfusion::align::WeightMatching::new(0).cost_cache(), None);
    /// ```
    pub fn cost_cache(&self) -> Option<usize> {
        self.cost_cache
    }

    /// The seed of the group order.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::WeightMatching::new(3).seed(), 3);
    /// ```
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The sweep cap.
    ///
    /// ```
    /// let wm = modelfusion::align::WeightMatching::new(0).with_max_iter(7)?;
    /// assert_eq!(wm.max_iter(), 7);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn max_iter(&self) -> usize {
        self.max_iter
    }
}

impl<M: Model> Aligner<M> for WeightMatching {
    fn align(&self, reference: &M, other: &M, spec: &PermutationSpec) -> Result<Alignment> {
        self.align_observed(reference, other, spec, &mut Silent)
    }

    /// Reports every sweep of every start ([`Progress::Sweep`]: start, sweep, objective,
    /// groups changed); a stop returns [`Error::Cancelled`].
    ///
    /// ```
    /// use modelfusion::align::{Aligner, WeightMatching};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// use modelfusion::progress::{from_fn, Progress};
    /// let arch = MlpShapes::new(&[4, 16, 16, 2])?;
    /// let (a, b) = (arch.random_model(0), arch.random_model(1));
    /// let mut sweeps = Vec::new();
    /// let al = WeightMatching::new(0).with_restarts(2)?.align_observed(&a, &b, &arch.spec(), &mut from_fn(|p| {
    ///     if let Progress::Sweep { start, objective, .. } = *p { sweeps.push((start, objective)) }
    /// }))?;
    /// assert!(sweeps.iter().any(|s| s.0 == 1));
    /// assert!(sweeps.iter().any(|s| s.1 == *al.stats().objective.last().unwrap()));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn align_observed(
        &self,
        reference: &M,
        other: &M,
        spec: &PermutationSpec,
        observer: &mut dyn Observer,
    ) -> Result<Alignment> {
        let sizes = check_pair(reference, other, spec)?;
        let groups: Vec<String> = sizes.keys().cloned().collect();
        if spec.has_heads() {
            let init: PermutationSet = groups
                .iter()
                .cloned()
                .zip(self.starts(&groups, &sizes)?)
                .collect();
            return self.align_structured(reference, other, spec, &sizes, init, observer);
        }
        let layout = Layout::new(
            reference
                .names()
                .map(|n| (n, reference.get(n).map_or(&[][..], Tensor::shape))),
            spec,
            &groups,
            BLOCK,
        )?;
        let source = InMemory::new(reference, other, &layout)?;
        self.align_source(layout, &source, &groups, &sizes, spec, observer)
    }
}

impl WeightMatching {
    /// The first start: the caller's `init` (checked against the groups), or the
    /// identities.
    fn starts(
        &self,
        groups: &[String],
        sizes: &BTreeMap<String, usize>,
    ) -> Result<Vec<Permutation>> {
        Ok(match &self.init {
            None => groups
                .iter()
                .map(|g| Permutation::identity(sizes[g]))
                .collect(),
            Some(init) => groups
                .iter()
                .map(|g| {
                    let p = init.get(g).ok_or_else(|| {
                        Error::invalid("init", format!("no permutation for group `{g}`"))
                    })?;
                    if p.len() != sizes[g] {
                        return Err(Error::invalid(
                            "init",
                            format!(
                                "permutation for group `{g}` has length {}, the group has size {}",
                                p.len(),
                                sizes[g]
                            ),
                        ));
                    }
                    Ok(p.clone())
                })
                .collect::<Result<_>>()?,
        })
    }

    /// The whole matching (starts, restarts, the best run) over parameters laid out by
    /// `layout` whose data `source` provides; `sizes` are the groups' sizes, `groups`
    /// their names in index order. The in-memory and the out-of-core aligners both end
    /// here.
    pub(crate) fn align_source<E: Scalar>(
        &self,
        layout: Layout,
        source: &dyn Source<E>,
        groups: &[String],
        sizes: &BTreeMap<String, usize>,
        spec: &PermutationSpec,
        observer: &mut dyn Observer,
    ) -> Result<Alignment> {
        if spec.has_heads() {
            return Err(Error::invalid(
                "spec",
                "weight matching of checkpoints read out of core does not handle attention \
                 groups yet: load both models, or use a spec without heads",
            ));
        }
        let perms = self.starts(groups, sizes)?;
        let problem = Problem::new(layout, source, self.cost_cache)?;
        let mut best = self.descend(&problem, groups, perms, self.seed, 0, observer)?;
        for r in 1..self.restarts {
            let start_seed = self.seed ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut rng = ChaCha8Rng::seed_from_u64(start_seed);
            let start = groups
                .iter()
                .map(|g| Permutation::random(sizes[g], rng.random()))
                .collect();
            let run = self.descend(&problem, groups, start, start_seed, r, observer)?;
            if run.1.objective.last() > best.1.objective.last() {
                best = run;
            }
        }
        let set: PermutationSet = groups.iter().cloned().zip(best.0).collect();
        Ok(Alignment::from_permutations(set, best.1).with_spec(spec))
    }

    /// Weight matching for a spec with attention groups (see [`super::heads`]): each
    /// group's cost is rebuilt from the models at every visit, attention groups solve
    /// a structured assignment; restarts begin from random structured permutations.
    fn align_structured<M: Model>(
        &self,
        reference: &M,
        other: &M,
        spec: &PermutationSpec,
        sizes: &BTreeMap<String, usize>,
        init: PermutationSet,
        observer: &mut dyn Observer,
    ) -> Result<Alignment> {
        spec.check_structure(&init)
            .map_err(|e| Error::invalid("init", e.to_string()))?;
        let mut best: Option<(PermutationSet, AlignStats)> = None;
        for r in 0..self.restarts {
            let (seed, from) = if r == 0 {
                (self.seed, init.clone())
            } else {
                let s = self.seed ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                (s, PermutationSet::random(spec, reference, s)?)
            };
            let run = super::heads::descend(
                spec,
                (reference, other),
                sizes,
                from,
                (seed, self.max_iter),
                |sweep, objective, changed| {
                    let report = Progress::Sweep {
                        start: r,
                        sweep,
                        objective,
                        changed,
                    };
                    if observer.observe(&report).is_break() {
                        return Err(Error::Cancelled {
                            what: format!("weight matching in sweep {} of start {r}", sweep + 1),
                        });
                    }
                    Ok(())
                },
            )?;
            if best
                .as_ref()
                .is_none_or(|b| run.1.objective.last() > b.1.objective.last())
            {
                best = Some(run);
            }
        }
        let (set, stats) = best.ok_or_else(|| Error::invalid("restarts", "must be at least 1"))?;
        Ok(Alignment::from_permutations(set, stats).with_spec(spec))
    }

    /// Coordinate descent from `perms` (start number `start`) with the group order drawn
    /// from `seed`, each group visit and each sweep reported to `observer`; returns the
    /// final permutations and the run's statistics.
    fn descend<E: Scalar>(
        &self,
        problem: &Problem<'_, E>,
        groups: &[String],
        mut perms: Vec<Permutation>,
        seed: u64,
        start: usize,
        observer: &mut dyn Observer,
    ) -> Result<(Vec<Permutation>, AlignStats)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut cache: Vec<Option<GroupCache>> = vec![None; groups.len()];
        let mut scratch = Scratch::default();
        // `<A, pi(B)>` per parameter, recomputed for the parameters of the groups that
        // moved in a sweep.
        let mut parts = vec![0.0; problem.params.len()];
        problem.update_objective(None, &perms, &mut parts)?;
        let mut objective = vec![problem.objective(&parts)];
        let mut order: Vec<usize> = (0..groups.len()).collect();
        let mut converged = false;
        let mut sweeps = 0;
        let mut visits = Vec::new();
        let stop = |what: String| Error::Cancelled {
            what: format!("weight matching in {what} of start {start}"),
        };
        while sweeps < self.max_iter {
            sweeps += 1;
            order.shuffle(&mut rng);
            visits.push(order.iter().map(|&g| groups[g].clone()).collect());
            let mut progress = false;
            let before = perms.clone();
            for (step, &g) in order.iter().enumerate() {
                // `None`: the same cost as at the last visit, which solved it and kept
                // the better of the solution and the permutation: solving again changes
                // nothing.
                let solved = match problem.update_cost(g, &perms, &mut cache[g], &mut scratch)? {
                    None => false,
                    Some(c) => {
                        let new = max_assignment_as::<E>(c)?;
                        let old_score = assignment_score(c, &perms[g]);
                        let new_score = assignment_score(c, &new);
                        if new_score > old_score + 1e-12 {
                            progress = true;
                        }
                        // An assignment solved in f32 may lose to the current one by
                        // rounding: keep the better of the two, so the objective never
                        // decreases.
                        if new_score >= old_score {
                            perms[g] = new;
                        }
                        true
                    }
                };
                if !problem.keep[g]
                    && let Some(gc) = &mut cache[g]
                {
                    gc.cost = None;
                }
                let report = Progress::Group {
                    start,
                    sweep: sweeps - 1,
                    index: step,
                    total: order.len(),
                    name: &groups[g],
                    units: problem.sizes[g],
                    solved,
                };
                if observer.observe(&report).is_break() {
                    return Err(stop(format!("group `{}` of sweep {sweeps}", groups[g])));
                }
            }
            problem.update_objective(Some(&before), &perms, &mut parts)?;
            let value = problem.objective(&parts);
            objective.push(value);
            let report = Progress::Sweep {
                start,
                sweep: sweeps - 1,
                objective: value,
                changed: before.iter().zip(&perms).filter(|(b, p)| b != p).count(),
            };
            if observer.observe(&report).is_break() {
                return Err(stop(format!("sweep {sweeps}")));
            }
            if !progress {
                converged = true;
                break;
            }
        }
        Ok((
            perms,
            AlignStats {
                objective,
                sweeps,
                converged,
                moved: BTreeMap::new(),
                order: visits,
            },
        ))
    }
}

/// Which model a parameter's data is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// The reference (`A`).
    Reference,
    /// The model aligned to it (`B`).
    Other,
}

/// Rows (indices along axis 0, the outermost) of a parameter to read.
#[derive(Clone, Debug)]
pub(crate) enum Lead<'l> {
    /// These rows, in order.
    Range(std::ops::Range<usize>),
    /// These rows, in this order (any order, repeats allowed).
    List(&'l [usize]),
}

/// Where the parameters' elements come from: both models in memory, or two checkpoints
/// read on demand. The matching only ever asks for rows of one parameter at a time, at
/// most [`Layout`]'s block of elements per request (whole parameters for a term
/// unfolded along axis 0).
pub(crate) trait Source<E: Scalar>: Sync {
    /// Rows `lead` of parameter `param` (as numbered by the [`Layout`], `row` elements per
    /// row, row-major) of model `side`. Returns `(data, None)` with the rows stacked in
    /// the order asked, in `buf` or borrowed; or `(whole, Some(rows))`: the whole
    /// parameter, to be read through the row selection `rows` (only for a `List`).
    fn rows<'d, 'l>(
        &'d self,
        side: Side,
        param: usize,
        row: usize,
        lead: Lead<'l>,
        buf: &'d mut Vec<E>,
    ) -> Result<(&'d [E], Option<&'l [usize]>)>;

    /// Whether parameters may be read in parallel (in memory: yes; out of core, one at
    /// a time keeps memory at one parameter's blocks).
    fn parallel(&self) -> bool;
}

/// Both models in memory, in standard layout.
pub(crate) struct InMemory<'a, E: Scalar> {
    a: Vec<CowArray<'a, E, IxDyn>>,
    b: Vec<CowArray<'a, E, IxDyn>>,
}

impl<'a, E: Scalar> InMemory<'a, E> {
    pub(crate) fn new<M: Model>(reference: &'a M, other: &'a M, layout: &Layout) -> Result<Self>
    where
        M::Tensor: Tensor<Elem = E>,
    {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for p in &layout.params {
            a.push(standard(
                reference.require(&p.name, "the reference model")?.view(),
            ));
            b.push(standard(other.require(&p.name, "the other model")?.view()));
        }
        Ok(InMemory { a, b })
    }
}

impl<E: Scalar> Source<E> for InMemory<'_, E> {
    fn rows<'d, 'l>(
        &'d self,
        side: Side,
        param: usize,
        row: usize,
        lead: Lead<'l>,
        _buf: &'d mut Vec<E>,
    ) -> Result<(&'d [E], Option<&'l [usize]>)> {
        let t = match side {
            Side::Reference => &self.a[param],
            Side::Other => &self.b[param],
        };
        let data = t.as_slice().unwrap_or(&[]);
        Ok(match lead {
            Lead::Range(r) => (&data[r.start * row..r.end * row], None),
            Lead::List(l) => (data, Some(l)),
        })
    }

    fn parallel(&self) -> bool {
        true
    }
}

/// A matched parameter: its name, its shape with repeat axes split, its permuted axes.
pub(crate) struct ParamInfo {
    pub(crate) name: String,
    shape: Vec<usize>,
    /// `(axis, group index)` for every permuted axis (none: a constant of the objective).
    axes: Vec<(usize, usize)>,
    /// Length of axis 0 (1 for a scalar).
    lead: usize,
    /// Elements per index of axis 0.
    row: usize,
    /// Rows of axis 0 read at a time where the computation allows blocks.
    block: usize,
}

/// The parameters the matching reads (every parameter of the reference but the passive
/// ones, in its order) and each group's terms.
pub(crate) struct Layout {
    pub(crate) params: Vec<ParamInfo>,
    /// Terms of each group, by group index.
    terms: Vec<Vec<Term>>,
    sizes: Vec<usize>,
}

/// Elements of a parameter read at a time (where the computation allows blocks): 64 MB
/// of `f32`. Below it a parameter is one block, so the blocking changes no result on
/// models whose tensors are smaller; above it, in memory and out of core block alike.
pub(crate) const BLOCK: usize = 1 << 24;

impl Layout {
    /// The layout of parameters `names` (name and shape, in the reference's order) for
    /// `spec`'s `groups` (the validated group names, by index), reading at most
    /// `block` elements at a time where it can.
    pub(crate) fn new<'n>(
        names: impl Iterator<Item = (&'n str, &'n [usize])>,
        spec: &PermutationSpec,
        groups: &[String],
        block: usize,
    ) -> Result<Self> {
        let index: BTreeMap<&str, usize> = groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.as_str(), i))
            .collect();
        let mut terms: Vec<Vec<Term>> = groups.iter().map(|_| Vec::new()).collect();
        let mut sizes = vec![0; groups.len()];
        let mut params = Vec::new();
        for (name, full) in names {
            if spec.is_passive(name) {
                // Permuted with its group but not matched (running statistics, ties).
                continue;
            }
            // An axis with repeat factor r (a flatten) is split into (units, r): a pure
            // reshape of the row-major data, after which the group permutes whole axes.
            let mut shape = Vec::with_capacity(full.len() + 1);
            let mut axes: Vec<(usize, usize)> = Vec::new();
            let groups_of: BTreeMap<usize, &str> = spec.param_axes(name).collect();
            for (ax, &len) in full.iter().enumerate() {
                match groups_of.get(&ax) {
                    Some(g) => {
                        let gi = *index.get(g).ok_or_else(|| Error::Spec {
                            reason: format!("group `{g}` of `{name}` is unknown"),
                        })?;
                        let r = spec.rule(name, ax).repeat;
                        axes.push((shape.len(), gi));
                        shape.push(len / r);
                        if r > 1 {
                            shape.push(r);
                        }
                    }
                    None => shape.push(len),
                }
            }
            for &(ax, gi) in &axes {
                sizes[gi] = shape[ax];
                terms[gi].push(Term {
                    param: params.len(),
                    axis: ax,
                    others: axes.iter().copied().filter(|&(o, _)| o != ax).collect(),
                });
            }
            let lead = shape.first().copied().unwrap_or(1);
            let row = shape.get(1..).map_or(1, |s| s.iter().product());
            params.push(ParamInfo {
                name: name.to_string(),
                block: block_rows(lead, row, block),
                shape,
                axes,
                lead,
                row,
            });
        }
        Ok(Layout {
            params,
            terms,
            sizes,
        })
    }
}

/// Rows of axis 0 per block for a `lead x row` parameter: all of them when they fit in
/// `block` elements, else a multiple of the objective's rows per task, so that blocks
/// split no task and the objective's sums do not depend on the blocking.
fn block_rows(lead: usize, row: usize, block: usize) -> usize {
    if lead.saturating_mul(row) <= block {
        return lead.max(1);
    }
    let task = (CHUNK / row.max(1)).max(1);
    ((block / row.max(1)) / task * task).max(task)
}

/// Consecutive ranges of `per` of `0..count`.
fn blocks(count: usize, per: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let per = per.max(1);
    (0..count.div_ceil(per)).map(move |b| b * per..((b + 1) * per).min(count))
}

/// One `(param, axis)` of a group: `C += A_(axis) (pi(B))_(axis)^T`.
struct Term {
    param: usize,
    axis: usize,
    /// `(other axis, group index)` for every other permuted axis of the parameter.
    others: Vec<(usize, usize)>,
}

/// A group's cost matrix (kept between visits when the cache budget allows) and the
/// permutations of other groups it was built with.
#[derive(Clone)]
struct GroupCache {
    cost: Option<Array2<f64>>,
    /// Per term, per other axis, the permutation the cost currently reflects.
    seen: Vec<Vec<Permutation>>,
}

struct Problem<'s, E: Scalar> {
    params: Vec<ParamInfo>,
    terms: Vec<Vec<Term>>,
    sizes: Vec<usize>,
    /// Whether each group's cost is kept between visits.
    keep: Vec<bool>,
    /// `sum <A, B>` over parameters no group touches (constant).
    fixed: f64,
    source: &'s dyn Source<E>,
}

/// Rows of one operand read from the source: the data, its shape (the block's, or the
/// whole parameter's when read through a selection) and the selection of axis 0.
type Fetched<'d, 'l, E> = (&'d [E], Vec<usize>, Option<&'l [usize]>);

impl<'s, E: Scalar> Problem<'s, E> {
    /// The problem over `layout` reading from `source`, keeping the costs of the
    /// smallest groups that fit in `budget` bytes (all without one).
    fn new(layout: Layout, source: &'s dyn Source<E>, budget: Option<usize>) -> Result<Self> {
        let Layout {
            params,
            terms,
            sizes,
        } = layout;
        let mut keep = vec![budget.is_none(); sizes.len()];
        if let Some(mut left) = budget {
            let mut by_size: Vec<usize> = (0..sizes.len()).collect();
            by_size.sort_by_key(|&g| (sizes[g], g));
            for g in by_size {
                let bytes = sizes[g].saturating_mul(sizes[g]).saturating_mul(8);
                if bytes > left {
                    break;
                }
                left -= bytes;
                keep[g] = true;
            }
        }
        let mut problem = Problem {
            params,
            terms,
            sizes,
            keep,
            fixed: 0.0,
            source,
        };
        let (mut abuf, mut bbuf) = (Vec::new(), Vec::new());
        let mut fixed = 0.0;
        for (i, p) in problem.params.iter().enumerate() {
            if !p.axes.is_empty() {
                continue;
            }
            // In order, as `Tensor::dot`.
            let mut acc = 0.0f64;
            for block in blocks(p.lead, p.block) {
                let (a, ..) = problem.fetch(Side::Reference, i, None, block.clone(), &mut abuf)?;
                let (b, ..) = problem.fetch(Side::Other, i, None, block, &mut bbuf)?;
                for (&x, &y) in a.iter().zip(b) {
                    acc += x.to_f64_lossless() * y.to_f64_lossless();
                }
            }
            fixed += acc;
        }
        problem.fixed = fixed;
        Ok(problem)
    }

    /// Output rows `block` along axis 0 of `side`'s parameter `p`, reading input rows
    /// `sel0[block]` (`None`: the same rows).
    fn fetch<'d, 'l>(
        &'d self,
        side: Side,
        p: usize,
        sel0: Option<&'l [usize]>,
        block: std::ops::Range<usize>,
        buf: &'d mut Vec<E>,
    ) -> Result<Fetched<'d, 'l, E>> {
        let info = &self.params[p];
        let n = block.len();
        let lead = match sel0 {
            None => Lead::Range(block),
            Some(s) => Lead::List(&s[block]),
        };
        let (data, sel) = self.source.rows(side, p, info.row, lead, buf)?;
        let mut shape = info.shape.clone();
        if sel.is_none()
            && let Some(first) = shape.first_mut()
        {
            *first = n;
        }
        Ok((data, shape, sel))
    }

    /// `sum_params <A, pi(B)>` from the per-parameter values of
    /// [`update_objective`](Self::update_objective).
    fn objective(&self, parts: &[f64]) -> f64 {
        self.fixed + parts.iter().sum::<f64>()
    }

    /// Brings `parts[i] = <A_i, pi(B_i)>` (in `f64`, read through the permutations
    /// without a permuted copy) from the permutations `before` to `perms`; `before` is
    /// `None` for a fresh computation. A parameter whose permutations changed on few
    /// units gets the change of its value, one changed axis at a time: with `J` the
    /// positions whose index changed, `<A_J, B_new,J - B_old,J>`. Parameters are computed
    /// in parallel where the source allows, each in fixed-size row chunks summed in a
    /// fixed order.
    fn update_objective(
        &self,
        before: Option<&[Permutation]>,
        perms: &[Permutation],
        parts: &mut [f64],
    ) -> Result<()> {
        let one = |(i, part): (usize, &mut f64)| -> Result<()> {
            let p = &self.params[i];
            if p.axes.is_empty() {
                return Ok(());
            }
            let Some(before) = before else {
                return self.update_objective_param(i, None, perms, part);
            };
            let moved: Vec<Vec<usize>> = p
                .axes
                .iter()
                .map(|&(_, g)| {
                    let (nw, od) = (perms[g].as_slice(), before[g].as_slice());
                    (0..nw.len()).filter(|&j| nw[j] != od[j]).collect()
                })
                .collect();
            let fraction: f64 = p
                .axes
                .iter()
                .zip(&moved)
                .map(|(&(ax, _), m)| m.len() as f64 / p.shape[ax].max(1) as f64)
                .sum();
            if fraction == 0.0 {
                return Ok(());
            }
            if fraction >= 0.5 {
                // Two reads of the moved part cost about as much as one of all.
                return self.update_objective_param(i, None, perms, part);
            }
            self.update_objective_param(i, Some((before, &moved)), perms, part)
        };
        if self.source.parallel() {
            parts.par_iter_mut().enumerate().try_for_each(one)
        } else {
            parts.iter_mut().enumerate().try_for_each(one)
        }
    }

    /// `update_objective` for parameter `i`: afresh, or by changes from `before` on the
    /// `moved` positions of each of its axes.
    fn update_objective_param(
        &self,
        i: usize,
        changes: Option<(&[Permutation], &[Vec<usize>])>,
        perms: &[Permutation],
        part: &mut f64,
    ) -> Result<()> {
        let p = &self.params[i];
        let (mut abuf, mut bbuf, mut unfolded) = (Vec::new(), Vec::new(), Vec::new());
        let mut sel: Vec<Option<&[usize]>> = vec![None; p.shape.len()];
        let Some((before, moved)) = changes else {
            for &(ax, g) in &p.axes {
                sel[ax] = Some(perms[g].as_slice());
            }
            let s0 = sel.first_mut().and_then(Option::take);
            let mut chunks = Vec::new();
            for block in blocks(p.lead, p.block) {
                let (a, ..) = self.fetch(Side::Reference, i, None, block.clone(), &mut abuf)?;
                let (b, shape, b0) = self.fetch(Side::Other, i, s0, block, &mut bbuf)?;
                let mut cur = sel.clone();
                cur[0] = b0;
                dot_reads(a, b, &Reads::new(&shape, 0, &cur), &mut chunks);
            }
            *part = chunks.iter().sum();
            return Ok(());
        };
        for &(ax, g) in &p.axes {
            sel[ax] = Some(before[g].as_slice());
        }
        for (&(ax, g), j) in p.axes.iter().zip(moved) {
            if j.is_empty() {
                continue;
            }
            let new_idx: Vec<usize> = j.iter().map(|&i| perms[g].as_slice()[i]).collect();
            let old_idx: Vec<usize> = j.iter().map(|&i| before[g].as_slice()[i]).collect();
            // Output rows along axis 0: the moved positions when axis 0 moved, else all.
            let s0 = sel[0];
            let (count, a0, new0, old0) = if ax == 0 {
                (
                    j.len(),
                    Some(j.as_slice()),
                    Some(&new_idx[..]),
                    Some(&old_idx[..]),
                )
            } else {
                (p.lead, None, s0, s0)
            };
            let (mut gains, mut losses) = (Vec::new(), Vec::new());
            for block in blocks(count, p.block) {
                let (a, shape, asel0) =
                    self.fetch(Side::Reference, i, a0, block.clone(), &mut abuf)?;
                let mut only_j = vec![None; p.shape.len()];
                only_j[0] = asel0;
                if ax != 0 {
                    only_j[ax] = Some(j.as_slice());
                }
                let a_j = unfold(a, &shape, 0, &only_j, &mut unfolded);
                for (b0, idx, out) in [(new0, &new_idx, &mut gains), (old0, &old_idx, &mut losses)]
                {
                    let (b, shape, bsel0) =
                        self.fetch(Side::Other, i, b0, block.clone(), &mut bbuf)?;
                    let mut cur = sel.clone();
                    cur[0] = bsel0;
                    if ax != 0 {
                        cur[ax] = Some(idx);
                    }
                    dot_reads(a_j, b, &Reads::new(&shape, 0, &cur), out);
                }
            }
            let gain: f64 = gains.iter().sum();
            let loss: f64 = losses.iter().sum();
            *part += gain - loss;
            sel[ax] = Some(perms[g].as_slice());
        }
        Ok(())
    }

    /// Brings group `g`'s cost matrix up to date with `perms`; returns it, or `None`
    /// when nothing it depends on changed since the previous call (never on the first).
    /// A kept cost is updated by the units that moved; one not kept is rebuilt. Terms
    /// are added one after the other in a fixed order, each with its operands and
    /// product computed in parallel.
    fn update_cost<'c>(
        &self,
        g: usize,
        perms: &[Permutation],
        cache: &'c mut Option<GroupCache>,
        scratch: &mut Scratch<E>,
    ) -> Result<Option<&'c Array2<f64>>> {
        let n = self.sizes[g];
        let terms = &self.terms[g];
        let current = |t: &Term| -> Vec<Permutation> {
            t.others.iter().map(|&(_, og)| perms[og].clone()).collect()
        };
        let changed = match cache {
            Some(GroupCache {
                cost: Some(cost),
                seen,
            }) => {
                let mut changed = false;
                for (t, seen) in terms.iter().zip(seen.iter_mut()) {
                    changed |= self.add_delta_term(cost, t, seen, perms, scratch)?;
                    *seen = current(t);
                }
                changed
            }
            _ => {
                let stale = cache.as_ref().is_none_or(|gc| {
                    terms
                        .iter()
                        .zip(&gc.seen)
                        .any(|(t, seen)| current(t) != *seen)
                });
                if stale {
                    let mut cost = Array2::<f64>::zeros((n, n));
                    for t in terms {
                        self.add_full_term(&mut cost, t, perms, scratch)?;
                    }
                    *cache = Some(GroupCache {
                        cost: Some(cost),
                        seen: terms.iter().map(current).collect(),
                    });
                }
                stale
            }
        };
        Ok(cache
            .as_ref()
            .and_then(|gc| gc.cost.as_ref())
            .filter(|_| changed))
    }

    /// `cost += A_(axis) (B with the other axes permuted)_(axis)^T`, in blocks of rows
    /// of axis 0 unless the term unfolds along it.
    fn add_full_term(
        &self,
        cost: &mut Array2<f64>,
        t: &Term,
        perms: &[Permutation],
        scratch: &mut Scratch<E>,
    ) -> Result<()> {
        let p = &self.params[t.param];
        let mut sel = vec![None; p.shape.len()];
        for &(ax, g) in &t.others {
            sel[ax] = Some(perms[g].as_slice());
        }
        let s0 = sel[0].take();
        let per = if t.axis == 0 { p.lead } else { p.block };
        for block in blocks(p.lead, per) {
            let (a, ashape, a0) = self.fetch(
                Side::Reference,
                t.param,
                None,
                block.clone(),
                &mut scratch.ra,
            )?;
            let (b, bshape, b0) = self.fetch(Side::Other, t.param, s0, block, &mut scratch.rb)?;
            let mut none = vec![None; p.shape.len()];
            none[0] = a0;
            let a = unfold(a, &ashape, t.axis, &none, &mut scratch.a);
            sel[0] = b0;
            let b = unfold(b, &bshape, t.axis, &sel, &mut scratch.b);
            add_product(cost, a, b, &mut scratch.prod);
        }
        Ok(())
    }

    /// Adds the change of a term since it was computed with `seen`; returns whether
    /// anything it depends on moved. One other axis at a time: positions `J` whose index
    /// changed contribute `A_J (B_new,J - B_old,J)^T`; the remaining axes use the
    /// permutations already accounted for (updated ones new, others old).
    fn add_delta_term(
        &self,
        cost: &mut Array2<f64>,
        t: &Term,
        seen: &[Permutation],
        perms: &[Permutation],
        scratch: &mut Scratch<E>,
    ) -> Result<bool> {
        let p = &self.params[t.param];
        let mut state: Vec<&Permutation> = seen.iter().collect();
        let mut changed = false;
        for (k, &(ax, g)) in t.others.iter().enumerate() {
            let new = &perms[g];
            if *new == *state[k] {
                continue;
            }
            let (nw, od) = (new.as_slice(), state[k].as_slice());
            let moved: Vec<usize> = (0..nw.len()).filter(|&j| nw[j] != od[j]).collect();
            let new_idx: Vec<usize> = moved.iter().map(|&j| nw[j]).collect();
            let old_idx: Vec<usize> = moved.iter().map(|&j| od[j]).collect();
            let mut sel: Vec<Option<&[usize]>> = vec![None; p.shape.len()];
            for (k2, &(ax2, _)) in t.others.iter().enumerate() {
                if k2 != k {
                    sel[ax2] = Some(state[k2].as_slice());
                }
            }
            let partial = moved.len() < nw.len();
            // Output rows along axis 0: the moved positions when axis 0 moved, else all.
            let s0 = sel[0].take();
            let (count, a0, new0, old0) = if ax == 0 {
                let a0 = partial.then_some(moved.as_slice());
                (moved.len(), a0, Some(&new_idx[..]), Some(&old_idx[..]))
            } else {
                (p.lead, None, s0, s0)
            };
            let per = if t.axis == 0 { count } else { p.block };
            for block in blocks(count, per) {
                let (a, ashape, asel0) =
                    self.fetch(Side::Reference, t.param, a0, block.clone(), &mut scratch.ra)?;
                let mut only_j = vec![None; p.shape.len()];
                only_j[0] = asel0;
                if ax != 0 && partial {
                    only_j[ax] = Some(moved.as_slice());
                }
                let a_j = unfold(a, &ashape, t.axis, &only_j, &mut scratch.a);
                let (b, bshape, b0) =
                    self.fetch(Side::Other, t.param, new0, block.clone(), &mut scratch.rb)?;
                sel[0] = b0;
                if ax != 0 {
                    sel[ax] = Some(&new_idx);
                }
                let reads = Reads::new(&bshape, t.axis, &sel);
                let diff = resized(&mut scratch.b, reads.rows * reads.rest);
                fill(&reads, b, diff, copy_run);
                let (b, bshape, b0) =
                    self.fetch(Side::Other, t.param, old0, block, &mut scratch.rb)?;
                sel[0] = b0;
                if ax != 0 {
                    sel[ax] = Some(&old_idx);
                }
                fill(&Reads::new(&bshape, t.axis, &sel), b, diff, |d, s| {
                    for (x, &y) in d.iter_mut().zip(s) {
                        *x -= y;
                    }
                });
                add_product(cost, a_j, diff, &mut scratch.prod);
            }
            changed = true;
            state[k] = new;
        }
        Ok(changed)
    }
}

fn standard<E: Scalar>(v: ArrayViewD<'_, E>) -> CowArray<'_, E, IxDyn> {
    if v.is_standard_layout() {
        CowArray::from(v)
    } else {
        CowArray::from(v.as_standard_layout().into_owned())
    }
}

/// Elements per parallel task when reading a parameter (fixed: the objective's chunks
/// are summed in order, so it does not depend on the number of threads).
const CHUNK: usize = 1 << 16;

/// A dot product in `f64` over pieces of any length, in `DOT_LANES` independent
/// accumulators (whole groups of `DOT_LANES` elements lane by lane, the rest of a piece
/// to the next lane in turn, so that short pieces, down to single elements, still fill
/// every lane).
#[derive(Default)]
struct Dot {
    acc: [f64; DOT_LANES],
    lane: usize,
}

const DOT_LANES: usize = 8;

impl Dot {
    fn add<E: Scalar>(&mut self, x: &[E], y: &[E]) {
        let (xc, yc) = (x.chunks_exact(DOT_LANES), y.chunks_exact(DOT_LANES));
        let (xr, yr) = (xc.remainder(), yc.remainder());
        for (xs, ys) in xc.zip(yc) {
            for l in 0..DOT_LANES {
                self.acc[l] += xs[l].to_f64_lossless() * ys[l].to_f64_lossless();
            }
        }
        for (&x, &y) in xr.iter().zip(yr) {
            self.acc[self.lane] += x.to_f64_lossless() * y.to_f64_lossless();
            self.lane = (self.lane + 1) % DOT_LANES;
        }
    }

    fn sum(&self) -> f64 {
        self.acc.iter().sum()
    }
}

/// How an unfolded, permuted operand reads a row-major tensor: output row `i` (index `i`
/// on the unfolding axis) and column `j` (the other axes in order) read input element
/// `base[i] + offset(j)`, visited as `rows x (rest / run)` contiguous runs of `run`
/// elements (the trailing axes that are neither the unfolding axis nor read through a
/// selection).
struct Reads {
    /// Output rows (the length of the unfolding axis after its selection).
    rows: usize,
    /// Output columns per row.
    rest: usize,
    /// Elements per contiguous run.
    run: usize,
    /// Input offset of each output row.
    base: Vec<usize>,
    /// Input offsets along each axis between the unfolding axis and the run, in order.
    middle: Vec<Vec<usize>>,
}

impl Reads {
    /// `sel[axis]`: `None` reads the axis as is, `Some(idx)` makes output index `i` read
    /// input index `idx[i]` (the output axis then has `idx.len()` entries).
    fn new(shape: &[usize], axis: usize, sel: &[Option<&[usize]>]) -> Self {
        let nd = shape.len();
        let mut stride = vec![1; nd];
        for d in (0..nd.saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1];
        }
        let offsets = |d: usize| -> Vec<usize> {
            match sel[d] {
                None => (0..shape[d]).map(|i| i * stride[d]).collect(),
                Some(idx) => idx.iter().map(|&i| i * stride[d]).collect(),
            }
        };
        let tail = (0..=nd)
            .rev()
            .take_while(|&s| s == nd || (s != axis && sel[s].is_none()))
            .last()
            .unwrap_or(nd);
        let run = shape[tail..].iter().product();
        let middle: Vec<Vec<usize>> = (0..tail).filter(|&d| d != axis).map(offsets).collect();
        let rest = run * middle.iter().map(Vec::len).product::<usize>();
        let base = offsets(axis);
        Reads {
            rows: base.len(),
            rest,
            run,
            base,
            middle,
        }
    }

    /// Calls `f(input offset)` for every run of the output rows `rows`, in output order.
    fn for_each(&self, rows: std::ops::Range<usize>, mut f: impl FnMut(usize)) {
        fn walk(tables: &[Vec<usize>], at: usize, f: &mut impl FnMut(usize)) {
            match tables.split_first() {
                None => f(at),
                Some((t, rest)) => {
                    for &o in t {
                        walk(rest, at + o, f);
                    }
                }
            }
        }
        for &b in &self.base[rows] {
            walk(&self.middle, b, &mut f);
        }
    }
}

/// `<x, data read through reads>` in `f64`, for `x` in the reads' output order: rows
/// in parallel chunks, whose sums are appended to `chunks` in order (summed in order by
/// the caller, so that a parameter read in blocks of whole chunks sums the same).
fn dot_reads<E: Scalar>(x: &[E], data: &[E], reads: &Reads, chunks: &mut Vec<f64>) {
    let rows = rows_per_task(reads.rows, reads.rest);
    let sums: Vec<f64> = (0..reads.rows.div_ceil(rows))
        .into_par_iter()
        .map(|c| {
            let range = c * rows..((c + 1) * rows).min(reads.rows);
            let mut at = range.start * reads.rest;
            let mut dot = Dot::default();
            reads.for_each(range, |src| {
                dot.add(&x[at..at + reads.run], &data[src..src + reads.run]);
                at += reads.run;
            });
            dot.sum()
        })
        .collect();
    chunks.extend(sums);
}

/// Rows handled by one parallel task when reading a `rows x rest` unfolding.
fn rows_per_task(rows: usize, rest: usize) -> usize {
    (CHUNK / rest.max(1)).clamp(1, rows.max(1))
}

/// Row-major `data` of `shape`, read through `sel` (see [`Reads::new`]) and unfolded
/// along `axis` into a `(rows, rest)` row-major matrix in `buf`, in one pass (rows in
/// parallel); `data` itself when that is the unfolding.
fn unfold<'d, E: Scalar>(
    data: &'d [E],
    shape: &[usize],
    axis: usize,
    sel: &[Option<&[usize]>],
    buf: &'d mut Vec<E>,
) -> &'d [E] {
    if sel.iter().all(Option::is_none) && shape[..axis].iter().all(|&d| d == 1) {
        return data;
    }
    let reads = Reads::new(shape, axis, sel);
    let out = resized(buf, reads.rows * reads.rest);
    fill(&reads, data, out, copy_run);
    out
}

/// Buffers reused from term to term: rows read from the source, the two operands and
/// their product.
struct Scratch<E> {
    ra: Vec<E>,
    rb: Vec<E>,
    a: Vec<E>,
    b: Vec<E>,
    prod: Vec<E>,
}

impl<E> Default for Scratch<E> {
    fn default() -> Self {
        Scratch {
            ra: Vec::new(),
            rb: Vec::new(),
            a: Vec::new(),
            b: Vec::new(),
            prod: Vec::new(),
        }
    }
}

/// `buf` holding `len` elements (of no particular value): reallocated (zeroed, huge
/// pages where possible) only when it is too small, so that page faults are paid once.
fn resized<E: Scalar>(buf: &mut Vec<E>, len: usize) -> &mut [E] {
    if buf.capacity() < len {
        *buf = crate::buffer::zeros(len);
    } else {
        buf.resize(len, E::zero());
    }
    buf
}

/// `dst.copy_from_slice(src)`, without a library call for the short runs of
/// convolution kernels (`memcpy` of 36 bytes cost more than the copy).
fn copy_run<E: Copy>(dst: &mut [E], src: &[E]) {
    if dst.len() > 32 {
        return dst.copy_from_slice(src);
    }
    let (mut d, mut s) = (dst.chunks_exact_mut(4), src.chunks_exact(4));
    for (d, s) in (&mut d).zip(&mut s) {
        d.copy_from_slice(s);
    }
    for (d, &s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = s;
    }
}

/// Combines every element `reads` takes from `data` with its place in `out` (the
/// unfolded matrix) by `op`, rows in parallel.
fn fill<E: Scalar>(reads: &Reads, data: &[E], out: &mut [E], op: impl Fn(&mut [E], &[E]) + Sync) {
    let rows = rows_per_task(reads.rows, reads.rest);
    out.par_chunks_mut(rows * reads.rest.max(1))
        .enumerate()
        .for_each(|(c, chunk)| {
            let range = c * rows..((c + 1) * rows).min(reads.rows);
            let mut at = 0;
            reads.for_each(range, |src| {
                op(&mut chunk[at..at + reads.run], &data[src..src + reads.run]);
                at += reads.run;
            });
        });
}

/// `cost += a b^T` for row-major `a` and `b` with one row per row of `cost` each: the
/// product in the operands' precision (in `prod`), added in `f64`, in blocks of rows computed in
/// parallel. The GEMM kernel sums each entry in an order that does not depend on the
/// blocking (tested), so the result does not depend on the number of threads.
fn add_product<E: Scalar>(cost: &mut Array2<f64>, a: &[E], b: &[E], prod: &mut Vec<E>) {
    let n = cost.nrows();
    let k = a.len().checked_div(n).unwrap_or(0);
    let Some(c) = cost.as_slice_mut() else {
        unreachable!("cost matrices are standard layout")
    };
    if k == 0 || c.is_empty() {
        return;
    }
    let m = c.len() / n;
    let b2 = ArrayView2::from_shape((m, k), b).unwrap_or_else(|_| unreachable!("sizes agree"));
    // Each block packs B again: about two blocks per thread, of at least 64 rows.
    let blocks = (2 * rayon::current_num_threads()).min(n / 64).max(1);
    let rows = n.div_ceil(blocks);
    resized(prod, n * m)
        .par_chunks_mut(rows * m)
        .zip(c.par_chunks_mut(rows * m))
        .zip(a.par_chunks(rows * k))
        .for_each(|((p, c), a)| {
            let r = a.len() / k;
            let a2 =
                ArrayView2::from_shape((r, k), a).unwrap_or_else(|_| unreachable!("sizes agree"));
            let mut p2 = ndarray::ArrayViewMut2::from_shape((r, m), p)
                .unwrap_or_else(|_| unreachable!("sizes agree"));
            ndarray::linalg::general_mat_mul(E::one(), &a2, &b2.t(), E::zero(), &mut p2);
            for (c, &p) in c.iter_mut().zip(p.iter()) {
                *c += p.to_f64_lossless();
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngExt;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| rng.random::<f32>() - 0.5).collect()
    }

    /// Element `idx` (a multi-index) of row-major `data` of `shape`.
    fn at(data: &[f32], shape: &[usize], idx: &[usize]) -> f32 {
        let flat = idx.iter().zip(shape).fold(0, |acc, (&i, &d)| acc * d + i);
        data[flat]
    }

    #[test]
    fn unfold_reads_through_selections_along_any_axis() {
        let shape = [3, 4, 2, 5];
        let data = random(shape.iter().product(), 1);
        let p1 = [2, 0, 3, 1];
        let p3 = [4, 1];
        for axis in 0..4 {
            for sel in [
                [None, None, None, None],
                [None, Some(&p1[..]), None, None],
                [None, Some(&p1[..]), None, Some(&p3[..])],
                [
                    Some(&[1usize, 2][..]),
                    None,
                    Some(&[1usize, 0][..]),
                    Some(&p3[..]),
                ],
            ] {
                let mut buf = Vec::new();
                let got = unfold(&data, &shape, axis, &sel, &mut buf);
                // Output shape after the selections, the axis first.
                let out: Vec<usize> = (0..4)
                    .map(|d| sel[d].map_or(shape[d], <[usize]>::len))
                    .collect();
                let others: Vec<usize> = (0..4).filter(|&d| d != axis).collect();
                let mut want = Vec::new();
                for i in 0..out[axis] {
                    let mut idx = [0usize; 4];
                    let rest: usize = others.iter().map(|&d| out[d]).product();
                    for r in 0..rest {
                        let mut rem = r;
                        for &d in others.iter().rev() {
                            idx[d] = rem % out[d];
                            rem /= out[d];
                        }
                        idx[axis] = i;
                        let src: Vec<usize> = (0..4)
                            .map(|d| sel[d].map_or(idx[d], |s| s[idx[d]]))
                            .collect();
                        want.push(at(&data, &shape, &src));
                    }
                }
                assert_eq!(got, &want[..], "axis {axis}, selection {sel:?}");
            }
        }
    }

    #[test]
    fn products_do_not_depend_on_blocking_or_threads() {
        // add_product splits the rows into blocks by the number of threads; the GEMM
        // kernel must sum each entry in the same order whatever the blocking, or
        // alignments would depend on the thread count.
        let (n, k) = (300, 700);
        let (a, b) = (random(n * k, 2), random(n * k, 3));
        let whole = {
            let a2 = ArrayView2::from_shape((n, k), &a[..]).unwrap();
            let b2 = ArrayView2::from_shape((n, k), &b[..]).unwrap();
            a2.dot(&b2.t()).mapv(f64::from)
        };
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut cost = Array2::<f64>::zeros((n, n));
            pool.install(|| add_product(&mut cost, &a, &b, &mut Vec::new()));
            assert_eq!(cost, whole, "{threads} threads");
        }
    }

    #[test]
    fn objective_by_changes_matches_a_fresh_computation() {
        use crate::perm::specs::{Architecture, Vgg};
        let arch = Vgg::new(3, &[8, 16, 16], &[12, 5], 3).unwrap();
        let (a, b) = (arch.random_model(0), arch.random_model(1));
        let spec = arch.spec();
        let sizes = check_pair(&a, &b, &spec).unwrap();
        let groups: Vec<String> = sizes.keys().cloned().collect();
        let layout = Layout::new(
            a.names().map(|n| (n, a.get(n).unwrap().shape())),
            &spec,
            &groups,
            BLOCK,
        )
        .unwrap();
        let source = InMemory::new(&a, &b, &layout).unwrap();
        let problem = Problem::new(layout, &source, None).unwrap();
        let start: Vec<Permutation> = groups
            .iter()
            .map(|g| Permutation::identity(sizes[g]))
            .collect();
        let mut parts = vec![0.0; problem.params.len()];
        problem.update_objective(None, &start, &mut parts).unwrap();
        // few units moved (by changes) and many (afresh), in two steps
        let mut perms = start.clone();
        let mut s = perms[0].as_slice().to_vec();
        s.swap(0, 3);
        perms[0] = Permutation::new(s).unwrap();
        perms[1] = Permutation::random(sizes[&groups[1]], 7);
        problem
            .update_objective(Some(&start), &perms, &mut parts)
            .unwrap();
        let mut fresh = vec![0.0; parts.len()];
        problem.update_objective(None, &perms, &mut fresh).unwrap();
        for (x, y) in parts.iter().zip(&fresh) {
            assert!((x - y).abs() <= 1e-12 * y.abs().max(1.0), "{x} vs {y}");
        }
    }
}
