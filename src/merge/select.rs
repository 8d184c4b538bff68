//! Order statistics of `|theta_i - base|` in expected linear time without a full copy:
//! a deterministic sample brackets each wanted rank, one streaming pass over all models
//! at once (the base is read once) counts the elements above each bracket and collects
//! those inside it, and `select_nth_unstable` finishes on the (small) brackets. If a
//! bracket misses (adversarial data, many ties), an exact selection over all
//! magnitudes takes over for that request.

use rayon::prelude::*;

use super::kernel::map_chunks;
use crate::tensor::Scalar;

/// Number of sample points used to bracket a rank.
const SAMPLES: usize = 1 << 18;
/// Sample points are taken in evenly spread runs of this many neighbours (one cache
/// line of `f32`), so sampling costs a sixteenth of the cache misses of single points;
/// the bracket is widened to six standard deviations for the correlation this allows.
const RUN: usize = 16;
/// Below this size the magnitudes are copied and selected directly.
const SMALL: usize = 1 << 19;
/// Elements per block of the streaming pass.
const SUB: usize = 1024;
/// Elements per bit mask of the streaming pass.
const GROUP: usize = 8;

fn desc<E: Scalar>(a: &E, b: &E) -> std::cmp::Ordering {
    b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Less)
}

/// For every request `(model, k)`, the `k`-th largest of `|xs[model][i] - base[i]|`
/// (`1 <= k <= n`, duplicates counted; NaN compares as the largest).
pub(crate) fn kth_largest_many<E: Scalar>(
    xs: &[&[E]],
    base: &[E],
    requests: &[(usize, usize)],
) -> Vec<E> {
    let n = base.len();
    if n <= SMALL {
        return requests
            .iter()
            .map(|&(m, k)| exact(xs[m], base, k))
            .collect();
    }
    let brackets = brackets(xs, base, requests);
    let parts = map_chunks(n, |_, start, end| {
        super::kernel::simd(
            #[inline(always)]
            || scan_chunk(xs, base, requests, &brackets, start, end),
        )
    });
    requests
        .iter()
        .enumerate()
        .map(|(q, &(m, k))| {
            let above: usize = parts.iter().map(|p| p.0[q]).sum();
            resolve(k, above, parts.iter().map(|p| p.1[q].as_slice()))
                .unwrap_or_else(|| exact(xs[m], base, k))
        })
        .collect()
}

/// A bracket `[lo, hi]` per request `(model, k)` that holds the `k`-th largest
/// magnitude with overwhelming probability, from a deterministic, evenly spread sample
/// (requests in parallel).
fn brackets<E: Scalar>(xs: &[&[E]], base: &[E], requests: &[(usize, usize)]) -> Vec<(E, E)> {
    let n = base.len();
    let s = SAMPLES as f64;
    let runs = SAMPLES / RUN;
    requests
        .par_iter()
        .map(|&(m, k)| {
            let x = xs[m];
            let mut sample: Vec<E> = Vec::with_capacity(SAMPLES);
            for r in 0..runs {
                let i = (r as u128 * (n - RUN) as u128 / runs as u128) as usize;
                sample.extend(
                    x[i..i + RUN]
                        .iter()
                        .zip(&base[i..i + RUN])
                        .map(|(&t, &b)| (t - b).abs()),
                );
            }
            let q = k as f64 / n as f64;
            let margin = 6.0 * (s * q * (1.0 - q)).sqrt() + 16.0;
            let r_hi = (q * s - margin).floor();
            let r_lo = (q * s + margin).ceil();
            let hi = if r_hi < 0.0 {
                E::infinity()
            } else {
                *sample.select_nth_unstable_by(r_hi as usize, desc).1
            };
            let lo = if r_lo >= s - 1.0 {
                E::zero()
            } else {
                *sample.select_nth_unstable_by(r_lo as usize, desc).1
            };
            (lo, hi)
        })
        .collect()
}

/// The `k`-th largest magnitude given `above` magnitudes above the bracket and the
/// ones inside it (in any order); `None` when the bracket missed rank `k`.
fn resolve<'a, E: Scalar>(
    k: usize,
    above: usize,
    inside: impl Iterator<Item = &'a [E]> + Clone,
) -> Option<E> {
    let total: usize = inside.clone().map(<[E]>::len).sum();
    if above < k && k <= above + total {
        let mut all: Vec<E> = Vec::with_capacity(total);
        for p in inside {
            all.extend_from_slice(p);
        }
        let (_, v, _) = all.select_nth_unstable_by(k - above - 1, desc);
        Some(*v)
    } else {
        None
    }
}

/// Per request: the count of magnitudes above its bracket and the ones inside it, over
/// `start..end`.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn scan_chunk<E: Scalar>(
    xs: &[&[E]],
    base: &[E],
    requests: &[(usize, usize)],
    brackets: &[(E, E)],
    start: usize,
    end: usize,
) -> (Vec<usize>, Vec<Vec<E>>) {
    let r = requests.len();
    let mut above = vec![0usize; r];
    let mut inside: Vec<Vec<E>> = vec![Vec::new(); r];
    let mut buf = [E::zero(); SUB];
    let mut s0 = start;
    while s0 < end {
        let len = SUB.min(end - s0);
        let bb = &base[s0..s0 + len];
        for (q, &(m, _)) in requests.iter().enumerate() {
            let (lo, hi) = brackets[q];
            let b = &mut buf[..len];
            for ((v, &t), &bv) in b.iter_mut().zip(&xs[m][s0..s0 + len]).zip(bb) {
                *v = (t - bv).abs();
            }
            // Vectorised count (NaN counts as above); the few groups of `GROUP` with a
            // magnitude inside the bracket are found by a vectorised test and compacted.
            let up: u32 = b.iter().map(|&v| u32::from((v > hi) | v.is_nan())).sum();
            let within = |v: E| (v >= lo) & (v <= hi);
            for g in b.chunks(GROUP) {
                if g.iter().fold(false, |a, &v| a | within(v)) {
                    // branch-free compaction (the slot index never passes the element)
                    let mut kept = [E::zero(); GROUP];
                    let mut c = 0;
                    for &v in g {
                        if let Some(slot) = kept.get_mut(c) {
                            *slot = v;
                        }
                        c += usize::from(within(v));
                    }
                    inside[q].extend_from_slice(&kept[..c]);
                }
            }
            above[q] += up as usize;
        }
        s0 += len;
    }
    (above, inside)
}

fn exact<E: Scalar>(theta: &[E], base: &[E], k: usize) -> E {
    let mut m: Vec<E> = theta
        .iter()
        .zip(base)
        .map(|(&t, &b)| (t - b).abs())
        .collect();
    let (_, v, _) = m.select_nth_unstable_by(k - 1, desc);
    *v
}

/// Per request `(model, v)`: how many magnitudes `|xs[model][i] - base[i]|` are `> v`
/// and how many are `== v` (one parallel pass, chunk order, thread-count independent).
pub(crate) fn count_around<E: Scalar>(
    xs: &[&[E]],
    base: &[E],
    requests: &[(usize, E)],
) -> Vec<(usize, usize)> {
    let parts = map_chunks(base.len(), |_, s, e| {
        super::kernel::simd(
            #[inline(always)]
            || {
                requests
                    .iter()
                    .map(|&(m, v)| {
                        let (mut gt, mut eq) = (0usize, 0usize);
                        for (&x, &b) in xs[m][s..e].iter().zip(&base[s..e]) {
                            let a = (x - b).abs();
                            gt += usize::from(a > v);
                            eq += usize::from(a == v);
                        }
                        (gt, eq)
                    })
                    .collect::<Vec<_>>()
            },
        )
    });
    let mut acc = vec![(0usize, 0usize); requests.len()];
    for p in parts {
        for (a, (g, q)) in acc.iter_mut().zip(p) {
            a.0 += g;
            a.1 += q;
        }
    }
    acc
}

/// Sorts `idx` (a permutation, with `keys[idx[i]]` the key at position `i`) the way
/// libstdc++'s `std::sort` (introsort) does, which is what torch's CPU `sort` /
/// `argsort` calls with a value-only comparator, so ties end where torch leaves them.
/// Only the work that decides which elements land before each position in `cuts`
/// is done: a segment without a cut strictly inside is left unsorted (it holds the
/// right elements already). Afterwards `idx[..p]` is torch's set of the first `p`
/// indices for every `p` in `cuts`. `desc`: descending order (NaN first), else
/// ascending (NaN last).
pub(crate) fn torch_sort_cuts(keys: &[f32], idx: &mut [u32], desc: bool, cuts: &[usize]) {
    let n = idx.len();
    if n < 2 {
        return;
    }
    let comp = |a: u32, b: u32| -> bool {
        let (x, y) = (keys[a as usize], keys[b as usize]);
        if desc {
            (x.is_nan() && !y.is_nan()) || x > y
        } else {
            (!x.is_nan() && y.is_nan()) || x < y
        }
    };
    let depth = 2 * (usize::BITS - 1 - n.leading_zeros()) as usize;
    let needs = |first: usize, last: usize| cuts.iter().any(|&c| first < c && c < last);
    // Segments still to process: (first, last, depth limit).
    let mut stack = vec![(0usize, n, depth)];
    while let Some((first, mut last, mut d)) = stack.pop() {
        while last - first > 16 {
            if !needs(first, last) {
                break;
            }
            if d == 0 {
                heap_sort(&mut idx[first..last], &comp);
                last = first;
                break;
            }
            d -= 1;
            let cut = partition_pivot(idx, first, last, &comp);
            stack.push((cut, last, d));
            last = cut;
        }
        if last > first && last - first <= 16 && needs(first, last) {
            // The final insertion sort is stable within a segment of at most 16.
            insertion_sort(&mut idx[first..last], &comp);
        }
    }
}

fn partition_pivot(
    idx: &mut [u32],
    first: usize,
    last: usize,
    comp: &impl Fn(u32, u32) -> bool,
) -> usize {
    let mid = first + (last - first) / 2;
    let (a, b, c) = (first + 1, mid, last - 1);
    let m = if comp(idx[a], idx[b]) {
        if comp(idx[b], idx[c]) {
            b
        } else if comp(idx[a], idx[c]) {
            c
        } else {
            a
        }
    } else if comp(idx[a], idx[c]) {
        a
    } else if comp(idx[b], idx[c]) {
        c
    } else {
        b
    };
    idx.swap(first, m);
    let pivot = idx[first];
    let (mut lo, mut hi) = (first + 1, last);
    loop {
        while comp(idx[lo], pivot) {
            lo += 1;
        }
        hi -= 1;
        while comp(pivot, idx[hi]) {
            hi -= 1;
        }
        if lo >= hi {
            return lo;
        }
        idx.swap(lo, hi);
        lo += 1;
    }
}

fn insertion_sort(v: &mut [u32], comp: &impl Fn(u32, u32) -> bool) {
    for i in 1..v.len() {
        let val = v[i];
        let mut j = i;
        while j > 0 && comp(val, v[j - 1]) {
            v[j] = v[j - 1];
            j -= 1;
        }
        v[j] = val;
    }
}

/// The indices torch's CPU `topk(keys, k)` selects (in no particular order): libstdc++'s
/// `partial_sort` of the first `k` when `64 k <= n`, else `nth_element` at `k - 1`, with
/// torch's comparator (descending, NaN largest) over `(key, index)` pairs in index
/// order, so keys tied at the cut are split exactly as torch splits them.
pub(crate) fn torch_topk<E: Scalar>(keys: &[E], k: usize) -> Vec<u32> {
    let n = keys.len();
    let mut idx: Vec<u32> = (0..n as u32).collect();
    if k == 0 || k >= n {
        idx.truncate(k);
        return idx;
    }
    let comp = |a: u32, b: u32| -> bool {
        let (x, y) = (keys[a as usize], keys[b as usize]);
        (x.is_nan() && !y.is_nan()) || x > y
    };
    if k * 64 <= n {
        heap_select(&mut idx, k, &comp);
    } else {
        // libstdc++'s __introselect.
        let nth = k - 1;
        let (mut first, mut last) = (0, n);
        let mut depth = 2 * (usize::BITS - 1 - n.leading_zeros()) as usize;
        while last - first > 3 {
            if depth == 0 {
                heap_select(&mut idx[first..last], nth + 1 - first, &comp);
                idx.swap(first, nth);
                idx.truncate(k);
                return idx;
            }
            depth -= 1;
            let cut = partition_pivot(&mut idx, first, last, &comp);
            if cut <= nth {
                first = cut;
            } else {
                last = cut;
            }
        }
        insertion_sort(&mut idx[first..last], &comp);
    }
    idx.truncate(k);
    idx
}

/// libstdc++'s `__make_heap`.
fn make_heap(v: &mut [u32], comp: &impl Fn(u32, u32) -> bool) {
    let len = v.len();
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let val = v[parent];
        adjust_heap(v, parent, len, val, comp);
        if parent == 0 {
            break;
        }
        parent -= 1;
    }
}

/// libstdc++'s `__heap_select(first, first + middle, last)`: afterwards `v[..middle]`
/// holds the `middle` first elements in `comp` order (as a heap).
fn heap_select(v: &mut [u32], middle: usize, comp: &impl Fn(u32, u32) -> bool) {
    make_heap(&mut v[..middle], comp);
    for i in middle..v.len() {
        if comp(v[i], v[0]) {
            let val = v[i];
            v[i] = v[0];
            adjust_heap(&mut v[..middle], 0, middle, val, comp);
        }
    }
}

/// libstdc++'s `__partial_sort(first, last, last)`: make_heap, then sort_heap.
fn heap_sort(v: &mut [u32], comp: &impl Fn(u32, u32) -> bool) {
    let len = v.len();
    if len < 2 {
        return;
    }
    make_heap(v, comp);
    let mut last = len;
    while last > 1 {
        last -= 1;
        let val = v[last];
        v[last] = v[0];
        adjust_heap(&mut v[..last], 0, last, val, comp);
    }
}

fn adjust_heap(
    v: &mut [u32],
    mut hole: usize,
    len: usize,
    val: u32,
    comp: &impl Fn(u32, u32) -> bool,
) {
    let top = hole;
    let mut child = hole;
    while len > 2 && child < (len - 1) / 2 {
        child = 2 * (child + 1);
        if comp(v[child], v[child - 1]) {
            child -= 1;
        }
        v[hole] = v[child];
        hole = child;
    }
    if len >= 2 && len % 2 == 0 && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        v[hole] = v[child - 1];
        hole = child - 1;
    }
    // push_heap
    while hole > top {
        let parent = (hole - 1) / 2;
        if !comp(v[parent], val) {
            break;
        }
        v[hole] = v[parent];
        hole = parent;
    }
    v[hole] = val;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(theta: &[f32], base: &[f32]) -> Vec<f32> {
        let mut m: Vec<f32> = theta.iter().zip(base).map(|(t, b)| (t - b).abs()).collect();
        m.sort_by(|a, b| b.partial_cmp(a).unwrap());
        m
    }

    #[test]
    fn matches_sort_small_and_large() {
        let n = SMALL * 3 + 17;
        let mut x = 0x1234_5678u32;
        let theta: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect();
        let tied: Vec<f32> = (0..n).map(|i| (i % 3) as f32).collect();
        let base = vec![0.1f32; n];
        let ks = [1, 2, n / 5, n / 2, n - 1, n];
        let reqs: Vec<(usize, usize)> = ks.iter().flat_map(|&k| [(0, k), (1, k)]).collect();
        let got = kth_largest_many(&[&theta, &tied], &base, &reqs);
        let (s0, s1) = (sorted(&theta, &base), sorted(&tied, &base));
        for (&(m, k), g) in reqs.iter().zip(got) {
            let want = if m == 0 { s0[k - 1] } else { s1[k - 1] };
            assert_eq!(g, want, "model {m}, k = {k}");
        }
        let small = kth_largest_many(&[&theta[..100]], &base[..100], &[(0, 37)]);
        assert_eq!(small[0], sorted(&theta[..100], &base[..100])[36]);
    }
}
