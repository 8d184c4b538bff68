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
/// Implementation: each group's `C_p` is built once in full (its terms in parallel,
/// products by `ndarray`'s `dot` in the models' own precision, `f32` or `f64`) and then
/// kept up to date: when a permutation that a term depends on has changed since the
/// term was last computed, only the units that moved contribute a correction
/// `A_J (B_new,J - B_old,J)^T`, so later sweeps, where few units move, cost a fraction
/// of the first. No permuted copy of a whole model is ever made. Results depend only on
/// the seed, not on the number of threads (terms are summed in a fixed order).
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
        let problem = Problem::new(reference, other, spec, &groups)?;
        let mut best = self.descend::<M>(&problem, &groups, perms, self.seed)?;
        for r in 1..self.restarts {
            let start_seed = self.seed ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut rng = ChaCha8Rng::seed_from_u64(start_seed);
            let start = groups
                .iter()
                .map(|g| Permutation::random(sizes[g], rng.random()))
                .collect();
            let run = self.descend::<M>(&problem, &groups, start, start_seed)?;
            if run.1.objective.last() > best.1.objective.last() {
                best = run;
            }
        }
        let set: PermutationSet = groups.into_iter().zip(best.0).collect();
        Ok(Alignment::from_permutations(set, best.1).with_spec(spec))
    }
}

impl WeightMatching {
    /// Coordinate descent from `perms` with the group order drawn from `seed`; returns
    /// the final permutations and the run's statistics.
    fn descend<M: Model>(
        &self,
        problem: &Problem<'_, Elem<M>>,
        groups: &[String],
        mut perms: Vec<Permutation>,
        seed: u64,
    ) -> Result<(Vec<Permutation>, AlignStats)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut cache: Vec<Option<GroupCache>> = vec![None; groups.len()];
        let mut objective = vec![problem.objective(&perms)?];
        let mut order: Vec<usize> = (0..groups.len()).collect();
        let mut converged = false;
        let mut sweeps = 0;
        let mut visits = Vec::new();
        while sweeps < self.max_iter {
            sweeps += 1;
            order.shuffle(&mut rng);
            visits.push(order.iter().map(|&g| groups[g].clone()).collect());
            let mut progress = false;
            for &g in &order {
                let c = problem.update_cost(g, &perms, &mut cache[g])?;
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
            objective.push(problem.objective(&perms)?);
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

    /// `sum_params <A, pi(B)>` in `f64`.
    fn objective(&self, perms: &[Permutation]) -> Result<f64> {
        let parts: Vec<f64> = self
            .params
            .par_iter()
            .map(|p| {
                let sel: Vec<(usize, &[usize])> = p
                    .axes
                    .iter()
                    .map(|&(ax, g)| (ax, perms[g].as_slice()))
                    .collect();
                let (pb, _) = gather(p.b(), &p.shape, &sel);
                p.a()
                    .iter()
                    .zip(pb.iter())
                    .map(|(&x, &y)| x.to_f64_lossless() * y.to_f64_lossless())
                    .sum::<f64>()
            })
            .collect();
        Ok(self.fixed + parts.iter().sum::<f64>())
    }

    /// Brings group `g`'s cost matrix up to date with `perms` and returns it.
    fn update_cost<'c>(
        &self,
        g: usize,
        perms: &[Permutation],
        cache: &'c mut Option<GroupCache>,
    ) -> Result<&'c Array2<f64>> {
        let n = self.sizes[g];
        let terms = &self.terms[g];
        let current = |t: &Term| -> Vec<Permutation> {
            t.others.iter().map(|&(_, og)| perms[og].clone()).collect()
        };
        match cache {
            None => {
                let parts: Vec<Array2<E>> =
                    terms.par_iter().map(|t| self.full_term(t, perms)).collect();
                let mut cost = Array2::<f64>::zeros((n, n));
                for p in parts {
                    add_into(&mut cost, &p);
                }
                *cache = Some(GroupCache {
                    cost,
                    seen: terms.iter().map(current).collect(),
                });
            }
            Some(gc) => {
                let parts: Vec<Option<Array2<E>>> = terms
                    .par_iter()
                    .zip(gc.seen.par_iter())
                    .map(|(t, seen)| self.delta_term(t, seen, perms))
                    .collect();
                for p in parts.into_iter().flatten() {
                    add_into(&mut gc.cost, &p);
                }
                for (t, seen) in terms.iter().zip(gc.seen.iter_mut()) {
                    *seen = current(t);
                }
            }
        }
        cache
            .as_ref()
            .map(|gc| &gc.cost)
            .ok_or_else(|| Error::invalid("cache", "internal: group cache missing"))
    }

    fn full_term(&self, t: &Term, perms: &[Permutation]) -> Array2<E> {
        let p = &self.params[t.param];
        let sel: Vec<(usize, &[usize])> = t
            .others
            .iter()
            .map(|&(ax, g)| (ax, perms[g].as_slice()))
            .collect();
        let (pb, shape) = gather(p.b(), &p.shape, &sel);
        product(p.a(), &pb, &shape, t.axis)
    }

    /// The change of a term since it was computed with `seen`, or `None` if nothing it
    /// depends on moved. One other axis at a time: positions whose index changed
    /// contribute `A_J (B_new,J - B_old,J)^T`; the remaining axes use the permutations
    /// already accounted for (updated ones new, others old).
    fn delta_term(
        &self,
        t: &Term,
        seen: &[Permutation],
        perms: &[Permutation],
    ) -> Option<Array2<E>> {
        let p = &self.params[t.param];
        let mut state: Vec<&Permutation> = seen.iter().collect();
        let mut total: Option<Array2<E>> = None;
        for (k, &(ax, g)) in t.others.iter().enumerate() {
            let new = &perms[g];
            if *new == *state[k] {
                continue;
            }
            let (nw, od) = (new.as_slice(), state[k].as_slice());
            let moved: Vec<usize> = (0..nw.len()).filter(|&j| nw[j] != od[j]).collect();
            let new_idx: Vec<usize> = moved.iter().map(|&j| nw[j]).collect();
            let old_idx: Vec<usize> = moved.iter().map(|&j| od[j]).collect();
            let rest_sel: Vec<(usize, &[usize])> = t
                .others
                .iter()
                .enumerate()
                .filter(|&(k2, _)| k2 != k)
                .map(|(k2, &(ax2, _))| (ax2, state[k2].as_slice()))
                .collect();
            let (a_j, shape_j) = gather(p.a(), &p.shape, &[(ax, &moved)]);
            let (mut b_new, _) = gather(p.b(), &p.shape, &[(ax, &new_idx)]);
            let (b_old, _) = gather(p.b(), &p.shape, &[(ax, &old_idx)]);
            for (x, &y) in b_new.iter_mut().zip(&b_old) {
                *x -= y;
            }
            let (diff, _) = gather(&b_new, &shape_j, &rest_sel);
            let d = product(&a_j, &diff, &shape_j, t.axis);
            match total.as_mut() {
                None => total = Some(d),
                Some(acc) => *acc += &d,
            }
            state[k] = new;
        }
        total
    }
}

fn standard<E: Scalar>(v: ArrayViewD<'_, E>) -> CowArray<'_, E, IxDyn> {
    if v.is_standard_layout() {
        CowArray::from(v)
    } else {
        CowArray::from(v.as_standard_layout().into_owned())
    }
}

fn add_into<E: Scalar>(acc: &mut Array2<f64>, x: &Array2<E>) {
    match (acc.as_slice_mut(), x.as_slice()) {
        (Some(a), Some(b)) => {
            for (c, &v) in a.iter_mut().zip(b) {
                *c += v.to_f64_lossless();
            }
        }
        _ => acc.zip_mut_with(x, |c, &v| *c += v.to_f64_lossless()),
    }
}

/// `(outer, n, inner)` of a row-major shape split at `axis`.
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

/// Row-major `data` of `shape` with each `(axis, indices)` selection applied in turn
/// (output index `i` on `axis` takes input index `indices[i]`); returns the data and
/// its shape.
fn gather<E: Copy>(data: &[E], shape: &[usize], sel: &[(usize, &[usize])]) -> (Vec<E>, Vec<usize>) {
    let mut cur: Option<Vec<E>> = None;
    let mut shape = shape.to_vec();
    for &(axis, idx) in sel {
        let src: &[E] = cur.as_deref().unwrap_or(data);
        let (outer, n, inner) = split(&shape, axis);
        let mut out = Vec::with_capacity(outer * idx.len() * inner);
        for o in 0..outer {
            let base = o * n * inner;
            if inner == 1 {
                out.extend(idx.iter().map(|&i| src[base + i]));
            } else {
                for &i in idx {
                    out.extend_from_slice(&src[base + i * inner..base + (i + 1) * inner]);
                }
            }
        }
        shape[axis] = idx.len();
        cur = Some(out);
    }
    (cur.unwrap_or_else(|| data.to_vec()), shape)
}

/// Row-major `data` of `shape` unfolded along `axis` into `(shape[axis], rest)`.
fn unfold<E: Copy>(data: &[E], shape: &[usize], axis: usize) -> Vec<E> {
    let (outer, n, inner) = split(shape, axis);
    let mut out = Vec::with_capacity(data.len());
    for i in 0..n {
        for o in 0..outer {
            let at = o * n * inner + i * inner;
            out.extend_from_slice(&data[at..at + inner]);
        }
    }
    out
}

/// `A_(axis) B_(axis)^T` for two row-major arrays of one shape.
fn product<E: Scalar>(a: &[E], b: &[E], shape: &[usize], axis: usize) -> Array2<E> {
    let n = shape[axis];
    let rest = a.len().checked_div(n).unwrap_or(0);
    let (ua, ub);
    let (a, b) = if axis == 0 {
        (a, b)
    } else {
        ua = unfold(a, shape, axis);
        ub = unfold(b, shape, axis);
        (ua.as_slice(), ub.as_slice())
    };
    let a2 = ArrayView2::from_shape((n, rest), a).unwrap_or_else(|_| unreachable!("sizes agree"));
    let b2 = ArrayView2::from_shape((n, rest), b).unwrap_or_else(|_| unreachable!("sizes agree"));
    a2.dot(&b2.t())
}
