//! Weight matching for specs with attention groups (see
//! [`HeadLayout`](crate::perm::HeadLayout)): every group's cost `C[u, v]` (the gain of
//! sending unit `v` of B to position `u`) is built from the current permutations of the
//! other groups, then plain groups solve one assignment and attention groups a
//! structured one: for every pair of key-value heads, the best within-head matchings of
//! the query-key and value-output dimensions (one assignment each, with the rotary
//! dimensions held in place; with grouped-query attention alternated with the assignment
//! of the query heads inside the group), then one assignment of key-value heads over
//! those pair scores.

use ndarray::{Array2, ArrayView2, Axis, s};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::{AlignStats, assignment_score, max_assignment_as};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::objective::Elem;
use crate::perm::{HeadLayout, HeadSlot, Permutation, PermutationSet, PermutationSpec};
use crate::solve::linear_sum_assignment_batch;
use crate::tensor::{Scalar, Tensor};

/// `other`'s parameter `name` with every permuted axis but `skip` reordered by `perms`,
/// as an `f64` matrix unfolded along `skip`.
fn unfolded_other<T: Tensor>(
    spec: &PermutationSpec,
    perms: &PermutationSet,
    name: &str,
    t: &T,
    skip: usize,
) -> Result<Array2<f64>> {
    let mut cur = t.view().mapv(|x| x.to_f64_lossless());
    for (axis, g) in spec.param_axes(name) {
        if axis == skip {
            continue;
        }
        if let Some(p) = perms.get(g) {
            let idx = spec.axis_indices(name, axis, p);
            cur = cur.select(Axis(axis), &idx);
        }
    }
    unfold(cur, skip)
}

fn unfold(a: ndarray::ArrayD<f64>, axis: usize) -> Result<Array2<f64>> {
    let rows = a.shape()[axis];
    let mut moved = a;
    moved.swap_axes(0, axis);
    let std = moved.as_standard_layout().into_owned();
    let cols = std.len() / rows.max(1);
    let shape = std.shape().to_vec();
    std.into_shape_with_order((rows, cols))
        .map_err(|_| Error::shape("unfolded parameter", &[rows, cols], &shape))
}

/// Group `g`'s cost `C[u, v]`: `sum_i C[i, perm[i]]` is the part of `sum <A, pi(B)>` that
/// depends on `g`'s permutation, given the others in `perms`.
fn group_cost<M: Model>(
    spec: &PermutationSpec,
    a: &M,
    b: &M,
    perms: &PermutationSet,
    g: &str,
    units: usize,
) -> Result<Array2<f64>> {
    let mut cost = Array2::<f64>::zeros((units, units));
    for (param, axis) in spec.group(g).unwrap_or(&[]) {
        if spec.is_passive(param) {
            continue;
        }
        let ta = a.require(param, "the reference model")?;
        let tb = b.require(param, "the other model")?;
        let ua = unfold(ta.view().mapv(|x| x.to_f64_lossless()), *axis)?;
        let ub = unfolded_other(spec, perms, param, tb, *axis)?;
        let m = ua.dot(&ub.t());
        match spec.head_slot(param, *axis) {
            Some((slot, layout)) => scatter_slot(&mut cost, m.view(), slot, &layout),
            None => {
                let r = spec.rule(param, *axis).repeat;
                for u in 0..units {
                    for v in 0..units {
                        cost[[u, v]] += (0..r).map(|k| m[[u * r + k, v * r + k]]).sum::<f64>();
                    }
                }
            }
        }
    }
    Ok(cost)
}

/// Adds a slot's `M = A B^T` (over the axis' entries) into the group cost: query and
/// output entries are units of their half; a key or value entry of key-value head `g`
/// reads the unit of the first query head of its group, and matches any unit whose head
/// belongs to the key-value head it is compared with.
fn scatter_slot(cost: &mut Array2<f64>, m: ArrayView2<f64>, slot: HeadSlot, l: &HeadLayout) {
    let (d, r) = (l.head_dim(), l.group_size());
    let hd = l.heads() * d;
    let kvd = l.kv_heads() * d;
    let query = |cost: &mut Array2<f64>, m: ArrayView2<f64>, half: usize| {
        let mut c = cost.slice_mut(s![half * hd..(half + 1) * hd, half * hd..(half + 1) * hd]);
        c += &m;
    };
    let kv = |cost: &mut Array2<f64>, m: ArrayView2<f64>, half: usize| {
        for j in 0..kvd {
            let u = half * hd + (j / d) * r * d + j % d;
            for v in 0..hd {
                cost[[u, half * hd + v]] += m[[j, (v / d / r) * d + v % d]];
            }
        }
    };
    match slot {
        HeadSlot::Query => query(cost, m, 0),
        HeadSlot::Output => query(cost, m, 1),
        HeadSlot::Key => kv(cost, m, 0),
        HeadSlot::Value => kv(cost, m, 1),
        HeadSlot::FusedQkv => {
            query(cost, m.slice(s![..hd, ..hd]), 0);
            kv(cost, m.slice(s![hd..hd + kvd, hd..hd + kvd]), 0);
            kv(cost, m.slice(s![hd + kvd.., hd + kvd..]), 1);
        }
    }
}

/// The best within-head permutation of half `half` for output key-value head `g`
/// matched with input key-value head `gi`, its query heads paired by `rho`; the first
/// `fixed` dimensions stay in place.
fn within(
    cost: &Array2<f64>,
    l: &HeadLayout,
    half: usize,
    (g, gi): (usize, usize),
    rho: &[usize],
    fixed: usize,
) -> Result<(Permutation, f64)> {
    let (d, r) = (l.head_dim(), l.group_size());
    let base = half * l.heads() * d;
    let mut sum = Array2::<f64>::zeros((d, d));
    for (j, &k) in rho.iter().enumerate() {
        let (ro, co) = (base + (g * r + j) * d, base + (gi * r + k) * d);
        sum += &cost.slice(s![ro..ro + d, co..co + d]);
    }
    let mut idx: Vec<usize> = (0..d).collect();
    if fixed < d {
        let free = sum.slice(s![fixed.., fixed..]).to_owned();
        let t = max_assignment_as::<f64>(&free)?;
        for (i, &j) in t.as_slice().iter().enumerate() {
            idx[fixed + i] = fixed + j;
        }
    }
    let p = Permutation::new(idx)?;
    let score = assignment_score(&sum, &p);
    Ok((p, score))
}

/// The structured permutation of an attention group that (approximately, exactly
/// without grouped-query attention) maximises `sum_u cost[u, perm[u]]`.
fn solve_heads(cost: &Array2<f64>, l: &HeadLayout) -> Result<Permutation> {
    let (kv, r, d) = (l.kv_heads(), l.group_size(), l.head_dim());
    let hd = l.heads() * d;
    // Per pair of key-value heads: query-head pairing, within-head maps, score.
    let mut pairs: Vec<(Vec<usize>, Permutation, Permutation, f64)> = Vec::new();
    for g in 0..kv {
        for gi in 0..kv {
            let mut rho: Vec<usize> = (0..r).collect();
            if r > 1 {
                // Start from the best within-head matching of each query-head pair: the
                // fixed (rotary) dimensions on the diagonal, the free ones by assignment.
                let mut pair = Array2::<f64>::zeros((r, r));
                let mut blocks = Vec::new();
                for jk in 0..r * r {
                    let (ro, co) = ((g * r + jk / r) * d, (gi * r + jk % r) * d);
                    for h in [0, 1] {
                        let f = if h == 0 { l.rotary_dim() } else { 0 };
                        let (ro, co) = (h * hd + ro, h * hd + co);
                        pair[[jk / r, jk % r]] +=
                            (0..f).map(|i| cost[[ro + i, co + i]]).sum::<f64>();
                        if f < d {
                            blocks.push((jk, cost.slice(s![ro + f..ro + d, co + f..co + d])));
                        }
                    }
                }
                let views: Vec<ArrayView2<f64>> = blocks.iter().map(|b| b.1).collect();
                let best = linear_sum_assignment_batch(&views, true)?;
                for ((jk, _), a) in blocks.iter().zip(&best) {
                    pair[[jk / r, jk % r]] += a.cost;
                }
                rho = max_assignment_as::<f64>(&pair)?.as_slice().to_vec();
            }
            let mut best = None;
            for _ in 0..10 {
                let (qk, s0) = within(cost, l, 0, (g, gi), &rho, l.rotary_dim())?;
                let (vo, s1) = within(cost, l, 1, (g, gi), &rho, 0)?;
                let done = best.as_ref().is_some_and(
                    |(_, _, _, s): &(Vec<usize>, Permutation, Permutation, f64)| *s >= s0 + s1,
                );
                if done {
                    break;
                }
                best = Some((rho.clone(), qk.clone(), vo.clone(), s0 + s1));
                if r == 1 {
                    break;
                }
                // Re-pair the query heads given the within-head maps.
                let mut pair = Array2::<f64>::zeros((r, r));
                for j in 0..r {
                    for k in 0..r {
                        for (h, t) in [(0, &qk), (1, &vo)] {
                            let (ro, co) = (h * hd + (g * r + j) * d, h * hd + (gi * r + k) * d);
                            pair[[j, k]] += (0..d)
                                .map(|i| cost[[ro + i, co + t.as_slice()[i]]])
                                .sum::<f64>();
                        }
                    }
                }
                rho = max_assignment_as::<f64>(&pair)?.as_slice().to_vec();
            }
            if let Some(b) = best {
                pairs.push(b);
            }
        }
    }
    let score = Array2::from_shape_fn((kv, kv), |(g, gi)| pairs[g * kv + gi].3);
    let sigma = max_assignment_as::<f64>(&score)?;
    let mut heads = Vec::with_capacity(l.heads());
    let (mut qk, mut vo) = (Vec::with_capacity(kv), Vec::with_capacity(kv));
    for (g, &gi) in sigma.as_slice().iter().enumerate() {
        let (rho, q, v, _) = &pairs[g * kv + gi];
        heads.extend(rho.iter().map(|&k| gi * r + k));
        qk.push(q.clone());
        vo.push(v.clone());
    }
    l.compose(&Permutation::new(heads)?, &qk, &vo)
}

/// The permutation of a group maximising `sum_u score[u, perm[u]]`: one assignment
/// (solved in precision `E`) for a plain group, the structured head matching for an
/// attention group (`layout`). Shared by every aligner that solves hard matchings
/// (weight matching, activation matching, OT fusion's attention groups).
pub(super) fn best_assignment<E: Scalar>(
    score: &Array2<f64>,
    layout: Option<HeadLayout>,
) -> Result<Permutation> {
    match layout {
        Some(l) => solve_heads(score, &l),
        None => max_assignment_as::<E>(score),
    }
}

/// `sum <A, pi(B)>` over the parameters that are not passive.
fn objective<M: Model>(
    spec: &PermutationSpec,
    a: &M,
    b: &M,
    perms: &PermutationSet,
) -> Result<f64> {
    let mut total = 0.0;
    for name in a.names() {
        if spec.is_passive(name) {
            continue;
        }
        let ta = a.require(name, "the reference model")?;
        let tb = b.require(name, "the other model")?;
        total += match spec.permute_tensor(perms, name, tb)? {
            Some(moved) => ta.dot(&moved)?,
            None => ta.dot(tb)?,
        };
    }
    Ok(total)
}

/// Coordinate descent over the groups (order drawn from `seed`) from `perms`, at most
/// `max_iter` sweeps, each reported to `on_sweep(sweep, objective, groups changed)`;
/// returns the permutations and the statistics (objective before the first sweep and
/// after each, visiting orders, convergence).
pub(super) fn descend<M: Model>(
    spec: &PermutationSpec,
    (a, b): (&M, &M),
    sizes: &std::collections::BTreeMap<String, usize>,
    mut perms: PermutationSet,
    (seed, max_iter): (u64, usize),
    mut on_sweep: impl FnMut(usize, f64, usize) -> Result<()>,
) -> Result<(PermutationSet, AlignStats)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<&String> = sizes.keys().collect();
    let mut stats = AlignStats {
        objective: vec![self::objective(spec, a, b, &perms)?],
        ..AlignStats::default()
    };
    for sweep in 0..max_iter {
        order.shuffle(&mut rng);
        stats.sweeps = sweep + 1;
        stats
            .order
            .push(order.iter().map(|g| g.to_string()).collect());
        let (mut progress, mut changed) = (false, 0);
        for g in &order {
            let cost = group_cost(spec, a, b, &perms, g, sizes[*g])?;
            let new = best_assignment::<Elem<M>>(&cost, spec.head_layout(g))?;
            let old = perms
                .get(g)
                .cloned()
                .unwrap_or_else(|| Permutation::identity(sizes[*g]));
            let (new_score, old_score) =
                (assignment_score(&cost, &new), assignment_score(&cost, &old));
            if new_score > old_score + 1e-12 {
                progress = true;
            }
            if new_score >= old_score && new != old {
                changed += 1;
                perms.insert(g.as_str(), new);
            }
        }
        let value = self::objective(spec, a, b, &perms)?;
        stats.objective.push(value);
        on_sweep(sweep, value, changed)?;
        if !progress {
            stats.converged = true;
            break;
        }
    }
    Ok((perms, stats))
}
