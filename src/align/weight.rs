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
use crate::objective::Elem;
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
        let perms: Vec<Permutation> = match &self.init {
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
        };
        if spec.has_heads() {
            let init: PermutationSet = groups.iter().cloned().zip(perms).collect();
            return self.align_structured(reference, other, spec, &sizes, init, observer);
        }
        let problem = Problem::new(reference, other, spec, &groups)?;
        let mut best = self.descend::<M>(&problem, &groups, perms, self.seed, 0, observer)?;
        for r in 1..self.restarts {
            let start_seed = self.seed ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut rng = ChaCha8Rng::seed_from_u64(start_seed);
            let start = groups
                .iter()
                .map(|g| Permutation::random(sizes[g], rng.random()))
                .collect();
            let run = self.descend::<M>(&problem, &groups, start, start_seed, r, observer)?;
            if run.1.objective.last() > best.1.objective.last() {
                best = run;
            }
        }
        let set: PermutationSet = groups.into_iter().zip(best.0).collect();
        Ok(Alignment::from_permutations(set, best.1).with_spec(spec))
    }
}

impl WeightMatching {
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
    /// from `seed`, each sweep reported to `observer`; returns the final permutations and
    /// the run's statistics.
    fn descend<M: Model>(
        &self,
        problem: &Problem<'_, Elem<M>>,
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
        problem.update_objective(None, &perms, &mut parts);
        let mut objective = vec![problem.objective(&parts)];
        let mut order: Vec<usize> = (0..groups.len()).collect();
        let mut converged = false;
        let mut sweeps = 0;
        let mut visits = Vec::new();
        while sweeps < self.max_iter {
            sweeps += 1;
            order.shuffle(&mut rng);
            visits.push(order.iter().map(|&g| groups[g].clone()).collect());
            let mut progress = false;
            let before = perms.clone();
            for &g in &order {
                let (c, changed) = problem.update_cost(g, &perms, &mut cache[g], &mut scratch)?;
                if !changed {
                    // Same cost as at the last visit, which solved it and kept the better
                    // of the solution and the permutation: solving again changes nothing.
                    continue;
                }
                let new = max_assignment_as::<Elem<M>>(c)?;
                let old_score = assignment_score(c, &perms[g]);
                let new_score = assignment_score(c, &new);
                if new_score > old_score + 1e-12 {
                    progress = true;
                }
                // An assignment solved in f32 may lose to the current one by rounding:
                // keep the better of the two, so the objective never decreases.
                if new_score >= old_score {
                    perms[g] = new;
                }
            }
            problem.update_objective(Some(&before), &perms, &mut parts);
            let value = problem.objective(&parts);
            objective.push(value);
            let report = Progress::Sweep {
                start,
                sweep: sweeps - 1,
                objective: value,
                changed: before.iter().zip(&perms).filter(|(b, p)| b != p).count(),
            };
            if observer.observe(&report).is_break() {
                return Err(Error::Cancelled {
                    what: format!("weight matching in sweep {sweeps} of start {start}"),
                });
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

/// A parameter of both models in standard layout.
struct Param<'a, E: Scalar> {
    a: CowArray<'a, E, IxDyn>,
    b: CowArray<'a, E, IxDyn>,
    shape: Vec<usize>,
    /// `(axis, group index)` for every permuted axis.
    axes: Vec<(usize, usize)>,
}

impl<E: Scalar> Param<'_, E> {
    fn a(&self) -> &[E] {
        self.a.as_slice().unwrap_or(&[])
    }
    fn b(&self) -> &[E] {
        self.b.as_slice().unwrap_or(&[])
    }
}

/// One `(param, axis)` of a group: `C += A_(axis) (pi(B))_(axis)^T`.
struct Term {
    param: usize,
    axis: usize,
    /// `(other axis, group index)` for every other permuted axis of the parameter.
    others: Vec<(usize, usize)>,
}

/// A group's cost matrix and the permutations of other groups it was built with.
#[derive(Clone)]
struct GroupCache {
    cost: Array2<f64>,
    /// Per term, per other axis, the permutation the cost currently reflects.
    seen: Vec<Vec<Permutation>>,
}

struct Problem<'a, E: Scalar> {
    params: Vec<Param<'a, E>>,
    /// Terms of each group, by group index.
    terms: Vec<Vec<Term>>,
    sizes: Vec<usize>,
    /// `sum <A, B>` over parameters no group touches (constant).
    fixed: f64,
}

impl<'a, E: Scalar> Problem<'a, E> {
    fn new<M: Model>(
        reference: &'a M,
        other: &'a M,
        spec: &PermutationSpec,
        groups: &[String],
    ) -> Result<Self>
    where
        M::Tensor: Tensor<Elem = E>,
    {
        let index: BTreeMap<&str, usize> = groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.as_str(), i))
            .collect();
        let mut terms: Vec<Vec<Term>> = groups.iter().map(|_| Vec::new()).collect();
        let mut sizes = vec![0; groups.len()];
        let mut params = Vec::new();
        let mut fixed = 0.0;
        for name in reference.names() {
            if spec.is_passive(name) {
                // Permuted with its group but not matched (running statistics, ties).
                continue;
            }
            let a = reference.require(name, "the reference model")?;
            let b = other.require(name, "the other model")?;
            // An axis with repeat factor r (a flatten) is split into (units, r): a pure
            // reshape of the row-major data, after which the group permutes whole axes.
            let mut shape = Vec::with_capacity(a.shape().len() + 1);
            let mut axes: Vec<(usize, usize)> = Vec::new();
            let groups_of: BTreeMap<usize, &str> = spec.param_axes(name).collect();
            for (ax, &len) in a.shape().iter().enumerate() {
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
            if axes.is_empty() {
                fixed += a.dot(b)?;
                continue;
            }
            for &(ax, gi) in &axes {
                sizes[gi] = shape[ax];
                terms[gi].push(Term {
                    param: params.len(),
                    axis: ax,
                    others: axes.iter().copied().filter(|&(o, _)| o != ax).collect(),
                });
            }
            params.push(Param {
                a: standard(a.view()),
                b: standard(b.view()),
                shape,
                axes,
            });
        }
        Ok(Problem {
            params,
            terms,
            sizes,
            fixed,
        })
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
    /// in parallel, each in fixed-size row chunks summed in a fixed order.
    fn update_objective(
        &self,
        before: Option<&[Permutation]>,
        perms: &[Permutation],
        parts: &mut [f64],
    ) {
        self.params
            .par_iter()
            .zip(parts.par_iter_mut())
            .for_each(|(p, part)| {
                let Some(before) = before else {
                    return self.update_objective_param(p, None, perms, part);
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
                    return;
                }
                if fraction >= 0.5 {
                    // Two reads of the moved part cost about as much as one of all.
                    return self.update_objective_param(p, None, perms, part);
                }
                self.update_objective_param(p, Some((before, &moved)), perms, part);
            });
    }

    /// `update_objective` for one parameter: afresh, or by changes from `before` on the
    /// `moved` positions of each of its axes.
    fn update_objective_param(
        &self,
        p: &Param<'_, E>,
        changes: Option<(&[Permutation], &[Vec<usize>])>,
        perms: &[Permutation],
        part: &mut f64,
    ) {
        let mut sel: Vec<Option<&[usize]>> = vec![None; p.shape.len()];
        let Some((before, moved)) = changes else {
            for &(ax, g) in &p.axes {
                sel[ax] = Some(perms[g].as_slice());
            }
            *part = dot_reads(p.a(), p.b(), &Reads::new(&p.shape, 0, &sel));
            return;
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
            let mut only_j = vec![None; p.shape.len()];
            only_j[ax] = Some(j.as_slice());
            let mut buf = Vec::new();
            let a_j = unfold(p.a(), &p.shape, 0, &only_j, &mut buf);
            let mut cur = sel.clone();
            cur[ax] = Some(&new_idx);
            let gain = dot_reads(a_j, p.b(), &Reads::new(&p.shape, 0, &cur));
            cur[ax] = Some(&old_idx);
            let loss = dot_reads(a_j, p.b(), &Reads::new(&p.shape, 0, &cur));
            *part += gain - loss;
            sel[ax] = Some(perms[g].as_slice());
        }
    }

    /// Brings group `g`'s cost matrix up to date with `perms`; returns it and whether it
    /// changed since the previous call (always on the first). Terms are added one after
    /// the other in a fixed order, each with its operands and product computed in
    /// parallel.
    fn update_cost<'c>(
        &self,
        g: usize,
        perms: &[Permutation],
        cache: &'c mut Option<GroupCache>,
        scratch: &mut Scratch<E>,
    ) -> Result<(&'c Array2<f64>, bool)> {
        let n = self.sizes[g];
        let terms = &self.terms[g];
        let current = |t: &Term| -> Vec<Permutation> {
            t.others.iter().map(|&(_, og)| perms[og].clone()).collect()
        };
        let changed = match cache {
            None => {
                let mut cost = Array2::<f64>::zeros((n, n));
                for t in terms {
                    self.add_full_term(&mut cost, t, perms, scratch);
                }
                *cache = Some(GroupCache {
                    cost,
                    seen: terms.iter().map(current).collect(),
                });
                true
            }
            Some(gc) => {
                let mut changed = false;
                for (t, seen) in terms.iter().zip(gc.seen.iter_mut()) {
                    changed |= self.add_delta_term(&mut gc.cost, t, seen, perms, scratch);
                    *seen = current(t);
                }
                changed
            }
        };
        cache
            .as_ref()
            .map(|gc| (&gc.cost, changed))
            .ok_or_else(|| Error::invalid("cache", "internal: group cache missing"))
    }

    /// `cost += A_(axis) (B with the other axes permuted)_(axis)^T`.
    fn add_full_term(
        &self,
        cost: &mut Array2<f64>,
        t: &Term,
        perms: &[Permutation],
        scratch: &mut Scratch<E>,
    ) {
        let p = &self.params[t.param];
        let mut sel = vec![None; p.shape.len()];
        for &(ax, g) in &t.others {
            sel[ax] = Some(perms[g].as_slice());
        }
        let none = vec![None; p.shape.len()];
        let a = unfold(p.a(), &p.shape, t.axis, &none, &mut scratch.a);
        let b = unfold(p.b(), &p.shape, t.axis, &sel, &mut scratch.b);
        add_product(cost, a, b, &mut scratch.prod);
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
    ) -> bool {
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
            let mut only_j = vec![None; p.shape.len()];
            if moved.len() < nw.len() {
                only_j[ax] = Some(moved.as_slice());
            }
            let a_j = unfold(p.a(), &p.shape, t.axis, &only_j, &mut scratch.a);
            sel[ax] = Some(&new_idx);
            let reads = Reads::new(&p.shape, t.axis, &sel);
            let diff = resized(&mut scratch.b, reads.rows * reads.rest);
            fill(&reads, p.b(), diff, copy_run);
            sel[ax] = Some(&old_idx);
            fill(&Reads::new(&p.shape, t.axis, &sel), p.b(), diff, |d, s| {
                for (x, &y) in d.iter_mut().zip(s) {
                    *x -= y;
                }
            });
            add_product(cost, a_j, diff, &mut scratch.prod);
            changed = true;
            state[k] = new;
        }
        changed
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

/// `<x, data read through reads>` in `f64`, for `x` in the reads' output order; rows
/// in parallel chunks summed in order.
fn dot_reads<E: Scalar>(x: &[E], data: &[E], reads: &Reads) -> f64 {
    let rows = rows_per_task(reads.rows, reads.rest);
    let chunks: Vec<f64> = (0..reads.rows.div_ceil(rows))
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
    chunks.iter().sum()
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

/// Buffers reused from term to term: the two operands and their product.
struct Scratch<E> {
    a: Vec<E>,
    b: Vec<E>,
    prod: Vec<E>,
}

impl<E> Default for Scratch<E> {
    fn default() -> Self {
        Scratch {
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
        let problem = Problem::new(&a, &b, &spec, &groups).unwrap();
        let start: Vec<Permutation> = groups
            .iter()
            .map(|g| Permutation::identity(sizes[g]))
            .collect();
        let mut parts = vec![0.0; problem.params.len()];
        problem.update_objective(None, &start, &mut parts);
        // few units moved (by changes) and many (afresh), in two steps
        let mut perms = start.clone();
        let mut s = perms[0].as_slice().to_vec();
        s.swap(0, 3);
        perms[0] = Permutation::new(s).unwrap();
        perms[1] = Permutation::random(sizes[&groups[1]], 7);
        problem.update_objective(Some(&start), &perms, &mut parts);
        let mut fresh = vec![0.0; parts.len()];
        problem.update_objective(None, &perms, &mut fresh);
        for (x, y) in parts.iter().zip(&fresh) {
            assert!((x - y).abs() <= 1e-12 * y.abs().max(1.0), "{x} vs {y}");
        }
    }
}
