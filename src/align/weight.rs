//! Weight matching (Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin"), coordinate
//! descent over permutation groups.

use std::collections::BTreeMap;

use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewD, Axis};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::{AlignStats, Aligner, Alignment, assignment_score, check_pair, max_assignment};
use crate::error::{Error, Result};
use crate::model::Model;
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
/// the assignment maximising `sum_i C_p[i, perm[i]]`, and takes it. It stops after a
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
}

impl WeightMatching {
    /// Weight matching with the group order drawn from `seed`, at most 100 sweeps,
    /// starting from the identity.
    pub fn new(seed: u64) -> Self {
        WeightMatching {
            seed,
            max_iter: 100,
            init: None,
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

    /// The seed of the group order.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The sweep cap.
    pub fn max_iter(&self) -> usize {
        self.max_iter
    }
}

impl<M: Model> Aligner<M> for WeightMatching {
    fn align(&self, reference: &M, other: &M, spec: &PermutationSpec) -> Result<Alignment> {
        let sizes = check_pair(reference, other, spec)?;
        let groups: Vec<String> = sizes.keys().cloned().collect();
        let mut perms: Vec<Permutation> = match &self.init {
            None => groups.iter().map(|g| Permutation::identity(sizes[g])).collect(),
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
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut cache: Vec<Option<GroupCache>> = vec![None; groups.len()];
        let mut objective = vec![problem.objective(&perms)?];
        let mut order: Vec<usize> = (0..groups.len()).collect();
        let mut converged = false;
        let mut sweeps = 0;
        while sweeps < self.max_iter {
            sweeps += 1;
            order.shuffle(&mut rng);
            let mut progress = false;
            for &g in &order {
                let c = problem.update_cost(g, &perms, &mut cache[g])?;
                let new = max_assignment(c)?;
                let old_score = assignment_score(c, &perms[g]);
                let new_score = assignment_score(c, &new);
                if new_score > old_score + 1e-12 {
                    progress = true;
                }
                perms[g] = new;
            }
            objective.push(problem.objective(&perms)?);
            if !progress {
                converged = true;
                break;
            }
        }
        let set: PermutationSet = groups.into_iter().zip(perms).collect();
        Ok(Alignment::from_permutations(
            set,
            AlignStats {
                objective,
                sweeps,
                converged,
                moved: BTreeMap::new(),
            },
        ))
    }
}

/// One `(param, axis)` of a group: `C += A_(axis) (pi(B))_(axis)^T`.
struct Term<'a, E> {
    a: ArrayViewD<'a, E>,
    b: ArrayViewD<'a, E>,
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

struct Problem<'a, E> {
    /// Terms of each group, by group index.
    terms: Vec<Vec<Term<'a, E>>>,
    sizes: Vec<usize>,
    /// Every parameter the spec permutes: `(A, B, [(axis, group index)])`.
    params: Vec<(ArrayViewD<'a, E>, ArrayViewD<'a, E>, Vec<(usize, usize)>)>,
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
        let mut terms: Vec<Vec<Term<'a, E>>> = groups.iter().map(|_| Vec::new()).collect();
        let mut sizes = vec![0; groups.len()];
        let mut params = Vec::new();
        let mut fixed = 0.0;
        for name in reference.names() {
            let a = reference.require(name, "the reference model")?;
            let b = other.require(name, "the other model")?;
            let axes: Vec<(usize, usize)> = spec
                .param_axes(name)
                .map(|(ax, g)| {
                    index.get(g).map(|&gi| (ax, gi)).ok_or_else(|| Error::Spec {
                        reason: format!("group `{g}` of `{name}` is unknown"),
                    })
                })
                .collect::<Result<_>>()?;
            if axes.is_empty() {
                fixed += a.dot(b)?;
                continue;
            }
            let (av, bv) = (a.view(), b.view());
            for &(ax, gi) in &axes {
                sizes[gi] = a.shape()[ax];
                terms[gi].push(Term {
                    a: av.clone(),
                    b: bv.clone(),
                    axis: ax,
                    others: axes.iter().copied().filter(|&(o, _)| o != ax).collect(),
                });
            }
            params.push((av, bv, axes));
        }
        Ok(Problem {
            terms,
            sizes,
            params,
            fixed,
        })
    }

    /// `sum_params <A, pi(B)>` in `f64`.
    fn objective(&self, perms: &[Permutation]) -> Result<f64> {
        let parts: Vec<f64> = self
            .params
            .par_iter()
            .map(|(a, b, axes)| {
                let sel: Vec<(usize, &[usize])> = axes
                    .iter()
                    .map(|&(ax, g)| (ax, perms[g].as_slice()))
                    .collect();
                let pb = gather(b.view(), &sel);
                a.iter()
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
        let current = |t: &Term<E>| -> Vec<Permutation> {
            t.others.iter().map(|&(_, og)| perms[og].clone()).collect()
        };
        match cache {
            None => {
                let parts: Vec<Array2<E>> = terms
                    .par_iter()
                    .map(|t| full_term(t, perms))
                    .collect();
                let mut cost = Array2::<f64>::zeros((n, n));
                for p in parts {
                    cost.zip_mut_with(&p, |c, &x| *c += x.to_f64_lossless());
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
                    .map(|(t, seen)| delta_term(t, seen, perms))
                    .collect();
                for p in parts.into_iter().flatten() {
                    gc.cost.zip_mut_with(&p, |c, &x| *c += x.to_f64_lossless());
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
}

/// Copies `t` with each `(axis, indices)` selection applied in turn.
fn gather<E: Scalar>(t: ArrayViewD<E>, sel: &[(usize, &[usize])]) -> ArrayD<E> {
    let mut out: Option<ArrayD<E>> = None;
    for &(ax, idx) in sel {
        out = Some(match &out {
            None => t.select(Axis(ax), idx),
            Some(o) => o.select(Axis(ax), idx),
        });
    }
    out.unwrap_or_else(|| t.to_owned())
}

/// A view of `t` unfolded along `axis` (copied only when `axis` is not the first axis
/// or the array is not in standard layout).
fn unfold<E: Scalar>(t: ArrayViewD<E>, axis: usize) -> Array2<E> {
    let n = t.shape()[axis];
    let rest = t.len().checked_div(n).unwrap_or(0);
    let mut v = t;
    for a in (0..axis).rev() {
        v.swap_axes(a, a + 1);
    }
    let std = v.as_standard_layout();
    std.into_owned()
        .into_shape_with_order((n, rest))
        .unwrap_or_else(|_| unreachable!("standard layout reshapes"))
}

/// `A_(axis) B_(axis)^T` for two equally shaped arrays, without copying axis-0 inputs in
/// standard layout.
fn product<E: Scalar>(a: ArrayViewD<E>, b: ArrayViewD<E>, axis: usize) -> Array2<E> {
    let n = a.shape()[axis];
    let m = b.shape()[axis];
    let rest = a.len().checked_div(n).unwrap_or(0);
    if axis == 0 && a.is_standard_layout() && b.is_standard_layout() {
        let a2: ArrayView2<E> = a
            .into_shape_with_order((n, rest))
            .unwrap_or_else(|_| unreachable!("standard layout reshapes"));
        let b2: ArrayView2<E> = b
            .into_shape_with_order((m, rest))
            .unwrap_or_else(|_| unreachable!("standard layout reshapes"));
        return a2.dot(&b2.t());
    }
    let (a2, b2) = (unfold(a, axis), unfold(b, axis));
    a2.dot(&b2.t())
}

fn full_term<E: Scalar>(t: &Term<E>, perms: &[Permutation]) -> Array2<E> {
    let sel: Vec<(usize, &[usize])> = t
        .others
        .iter()
        .map(|&(ax, g)| (ax, perms[g].as_slice()))
        .collect();
    if sel.is_empty() {
        return product(t.a.view(), t.b.view(), t.axis);
    }
    let pb = gather(t.b.view(), &sel);
    product(t.a.view(), pb.view(), t.axis)
}

/// The change of a term since it was computed with `seen`, or `None` if nothing it
/// depends on moved. One other axis at a time: positions whose index changed contribute
/// `A_J (B_new,J - B_old,J)^T`; the remaining axes use the permutations already
/// accounted for (updated ones new, others old).
fn delta_term<E: Scalar>(
    t: &Term<E>,
    seen: &[Permutation],
    perms: &[Permutation],
) -> Option<Array2<E>> {
    let mut state: Vec<&Permutation> = seen.iter().collect();
    let mut total: Option<Array2<E>> = None;
    for (k, &(ax, g)) in t.others.iter().enumerate() {
        let new = &perms[g];
        if *new == *state[k] {
            continue;
        }
        let moved: Vec<usize> = (0..new.len())
            .filter(|&j| new.as_slice()[j] != state[k].as_slice()[j])
            .collect();
        let new_idx: Vec<usize> = moved.iter().map(|&j| new.as_slice()[j]).collect();
        let old_idx: Vec<usize> = moved.iter().map(|&j| state[k].as_slice()[j]).collect();
        // Selections on the other axes with the permutations accounted for so far.
        let rest_sel: Vec<(usize, &[usize])> = t
            .others
            .iter()
            .enumerate()
            .filter(|&(k2, _)| k2 != k)
            .map(|(k2, &(ax2, _))| (ax2, state[k2].as_slice()))
            .collect();
        let a_j = t.a.select(Axis(ax), &moved);
        let mut b_new = t.b.select(Axis(ax), &new_idx);
        let b_old = t.b.select(Axis(ax), &old_idx);
        b_new.zip_mut_with(&b_old, |x, &y| *x -= y);
        let diff = gather(b_new.view(), &rest_sel);
        let d = product(a_j.view(), diff.view(), t.axis);
        match total.as_mut() {
            None => total = Some(d),
            Some(acc) => *acc += &d,
        }
        state[k] = new;
    }
    total
}
