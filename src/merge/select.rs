//! Order statistics of `|theta_i - base|` in expected linear time without a full copy:
//! a deterministic sample brackets each wanted rank, one streaming pass over all models
//! at once (the base is read once) counts the elements above each bracket and collects
//! those inside it, and `select_nth_unstable` finishes on the (small) brackets. If a
//! bracket misses (adversarial data, many ties), an exact selection over all
//! magnitudes takes over for that request.

use rayon::prelude::*;

use super::chunked::ChunkedInputs;
use super::kernel::{all_finite, map_chunks};
use crate::error::{Error, Result};
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

/// The sort key mergekit ranks task-vector entries by: `|x - b|` rounded to `f32`.
#[inline(always)]
pub(crate) fn key<E: Scalar>(x: E, b: E) -> f32 {
    (x - b).abs().to_f64_lossless() as f32
}

/// One wanted cut of a model's magnitude order: the first `p` (`0 < p < n`) positions
/// of the descending (`desc`) or ascending order of the keys `|x - base|` ([`key`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CutRequest {
    pub model: usize,
    pub desc: bool,
    pub p: usize,
}

/// Where a cut falls: its first `p` positions hold every key before `v` (greater when
/// descending, smaller when ascending) and the keys equal to `v` at indices below
/// `tie_end`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Cut {
    pub desc: bool,
    pub v: f32,
    pub tie_end: usize,
}

impl Cut {
    /// Whether the entry at `index` with key `key` is among the cut's first positions.
    #[inline(always)]
    pub(crate) fn holds(&self, key: f32, index: usize) -> bool {
        let before = if self.desc {
            key > self.v
        } else {
            key < self.v
        };
        before | ((key == self.v) & (index < self.tie_end))
    }
}

impl Cut {
    /// The cut over indices `start..end` as a test of keys alone, when the index test
    /// has one answer there.
    #[inline(always)]
    pub(crate) fn block(&self, start: usize, end: usize) -> Option<BlockCut> {
        let ties = if end <= self.tie_end {
            true
        } else if start >= self.tie_end {
            false
        } else {
            return None;
        };
        // Ascending cuts compare negated keys.
        let sign = if self.desc { 1.0 } else { -1.0 };
        Some(BlockCut {
            sign,
            v: self.v,
            ties,
        })
    }
}

/// A [`Cut`] over a range of indices on one side of its tie end: key `k` is held when
/// `sign * k > sign * v`, or `k == v` and `ties`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockCut {
    sign: f32,
    v: f32,
    ties: bool,
}

impl BlockCut {
    /// Holds every (non-negative) key.
    pub(crate) const ALL: BlockCut = BlockCut {
        sign: 1.0,
        v: -1.0,
        ties: false,
    };
    /// Holds no key.
    pub(crate) const NONE: BlockCut = BlockCut {
        sign: 1.0,
        v: f32::INFINITY,
        ties: false,
    };

    /// Whether key `k` is held.
    #[inline(always)]
    pub(crate) fn holds(&self, k: f32) -> bool {
        (self.sign * k > self.sign * self.v) | ((k == self.v) & self.ties)
    }
}

/// Where the base tensor of a chunked merge is: held whole by the merger, or the first
/// chunked input (the models follow it).
#[derive(Clone, Copy)]
pub(crate) struct Base<'a, E>(pub Option<&'a [E]>);

impl<'a, E> Base<'a, E> {
    /// The base's and the models' parts of the chunk at `start`.
    #[inline]
    pub(crate) fn split<'c>(&self, start: usize, ts: &'c [&'c [E]]) -> (&'c [E], &'c [&'c [E]])
    where
        'a: 'c,
    {
        match self.0 {
            Some(h) => (&h[start..start + ts[0].len()], ts),
            None => (ts[0], &ts[1..]),
        }
    }
}

/// What [`stream_cuts`] found.
pub(crate) enum Cuts {
    /// One cut per request, and per request whether (torch's tie order) the cut splits
    /// entries tied at its key: which of them torch's sort keeps depends on every key
    /// of the tensor, so only a replay of the sort decides (the cut's `tie_end` is then
    /// meaningless).
    Found(Vec<Cut>, Vec<bool>),
    /// The whole tensors are needed: an input holds a non-finite value.
    Whole,
}

/// Bins of the first pass: the high 16 bits of a non-negative `f32`.
const HI_BINS: usize = 1 << 15;
/// Bins of the second pass: the low 16 bits.
const LO_BINS: usize = 1 << 16;
/// At most this many entries of a bin are collected (with their indices) to finish a
/// cut; a fuller bin is finished by a histogram of its low bits.
const COLLECT_CAP: usize = 1 << 19;

/// Finds every requested cut in bounded memory with passes over the chunks: a histogram
/// of the keys' high 16 bits per model (with the OR and AND of each bin's low bits, so
/// a bin of one value, usual for bf16 and f16 deltas, is known exactly), then, for a
/// bin of several values, either its entries (with their indices, at most
/// [`COLLECT_CAP`]) or a histogram of its low 16 bits, which fixes the cut's key. With
/// `index_order`, entries tied at a cut are taken in index order (a cut splitting ties
/// in a bin of one value finds its tie end from the first pass's per-chunk counts and
/// a read of one chunk; a histogram-finished one takes a counting pass first);
/// otherwise a split tie is marked for a replay of torch's sort. Returns
/// [`Cuts::Whole`] when an input holds a non-finite value.
pub(crate) fn stream_cuts<E: Scalar, C: ChunkedInputs<E>>(
    inputs: &C,
    base: Base<'_, E>,
    requests: &[CutRequest],
    index_order: bool,
) -> Result<Cuts> {
    let n = inputs.len();
    let all = 0..inputs.chunks();
    let mut models: Vec<usize> = requests.iter().map(|r| r.model).collect();
    models.sort_unstable();
    models.dedup();
    let nm = models.len();
    // Pass 1: finiteness of every input, then per chunk and model a histogram of the
    // keys' high bits with each bin's low bits OR-ed together and, negated, OR-ed
    // again (no bit differs: every key of the bin is one value), kept per chunk (the
    // chunk's tie counts, see [`Pass1`]) and summed.
    let parts = inputs.fold_chunks(
        all.clone(),
        &|| Pass1 {
            count: vec![0u64; nm * HI_BINS],
            mix: vec![0u32; nm * HI_BINS],
            local: vec![0u64; HI_BINS],
            records: Vec::new(),
            nonfinite: false,
        },
        &|acc, start, ts| {
            let (b, xs) = base.split(start, ts);
            if acc.nonfinite || !(all_finite(b) && xs.iter().all(|x| all_finite(x))) {
                acc.nonfinite = true;
                return Ok(());
            }
            let mut per_model = Vec::with_capacity(nm);
            for (j, &m) in models.iter().enumerate() {
                per_model.push(acc.histogram(j, xs[m], b));
            }
            acc.records.push((start / inputs.chunk_elems(), per_model));
            Ok(())
        },
    )?;
    if parts.iter().any(|p| p.nonfinite) {
        return Ok(Cuts::Whole);
    }
    let mut hist = vec![0usize; nm * HI_BINS];
    let mut mix = vec![0u32; nm * HI_BINS];
    let mut records: Vec<(usize, Vec<Option<Vec<u64>>>)> = Vec::new();
    for p in parts {
        for i in 0..nm * HI_BINS {
            hist[i] += p.count[i] as usize;
            mix[i] |= p.mix[i];
        }
        records.extend(p.records);
    }
    records.sort_unstable_by_key(|r| r.0);
    // Per request: the bin holding position p, the count before it and its count.
    // Also: the bin's one low-bit pattern, when it has only one.
    let mut single: Vec<Option<u16>> = Vec::with_capacity(requests.len());
    let located: Vec<(u32, usize, usize)> = requests
        .iter()
        .map(|r| {
            let j = models.iter().position(|&m| m == r.model).unwrap_or(0);
            let h = &hist[j * HI_BINS..(j + 1) * HI_BINS];
            let at = locate(h, r.desc, r.p);
            let x = mix[j * HI_BINS + at.0 as usize];
            single.push((x & (x >> 16) & 0xFFFF == 0).then_some(x as u16));
            at
        })
        .collect();
    // Pass 2 (for bins of several values): collect the bin, or histogram its low bits.
    let mut q = 0;
    let mode: Vec<Mode> = located
        .iter()
        .zip(&single)
        .map(|(&(_, _, c), s)| match s {
            Some(lo) => Mode::Single(*lo),
            None if c > COLLECT_CAP => {
                q += 1;
                Mode::Low(q - 1)
            }
            None => Mode::Collect,
        })
        .collect();
    let nlo = q;
    let nr = requests.len();
    let second = mode.iter().any(|m| !matches!(m, Mode::Single(_)));
    let chunks2 = if second { all.clone() } else { 0..0 };
    let parts = inputs.fold_chunks(
        chunks2,
        &|| (vec![Vec::new(); nr], vec![0u32; nlo * LO_BINS]),
        &|acc, start, ts| {
            let (b, xs) = base.split(start, ts);
            for (r, req) in requests.iter().enumerate() {
                let hb = located[r].0;
                let x = xs[req.model];
                match mode[r] {
                    Mode::Single(_) => {}
                    Mode::Collect => {
                        let got = &mut acc.0[r];
                        for (j, (&xv, &bv)) in x.iter().zip(b).enumerate() {
                            let k = key(xv, bv).to_bits();
                            if k >> 16 == hb {
                                got.push((start + j, k as u16));
                            }
                        }
                    }
                    Mode::Low(q) => {
                        let h = &mut acc.1[q * LO_BINS..(q + 1) * LO_BINS];
                        for (&xv, &bv) in x.iter().zip(b) {
                            let k = key(xv, bv).to_bits();
                            if k >> 16 == hb {
                                h[(k & 0xFFFF) as usize] += 1;
                            }
                        }
                    }
                }
            }
            Ok(())
        },
    )?;
    let mut cuts = Vec::with_capacity(nr);
    let mut split = vec![false; nr];
    // Requests whose ties are split and must be found in index order: (request, rank,
    // the tied entries per chunk when the first pass counted them).
    let mut pending: Vec<(usize, usize, Option<ChunkCounts>)> = Vec::new();
    for (r, req) in requests.iter().enumerate() {
        let (hb, before, _) = located[r];
        let rank = req.p - before; // 1-based position inside the bin
        let (lo, before_v, eq, tie_end) = match mode[r] {
            Mode::Single(lo) => (lo, before, located[r].2, None),
            Mode::Collect => {
                let mut got: Vec<(usize, u16)> = Vec::new();
                for p in &parts {
                    got.extend_from_slice(&p.0[r]);
                }
                if req.desc {
                    got.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                } else {
                    got.sort_unstable_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
                }
                let &(at, lo) = got.get(rank - 1).ok_or_else(changed)?;
                let first = got.partition_point(|e| if req.desc { e.1 > lo } else { e.1 < lo });
                let eq = got[first..].iter().take_while(|e| e.1 == lo).count();
                (lo, before + first, eq, Some(at + 1))
            }
            Mode::Low(q) => {
                let mut h = vec![0usize; LO_BINS];
                for p in &parts {
                    for (a, &c) in h.iter_mut().zip(&p.1[q * LO_BINS..(q + 1) * LO_BINS]) {
                        *a += c as usize;
                    }
                }
                let (lo, inside, eq) = locate(&h, req.desc, rank);
                (lo as u16, before + inside, eq, None)
            }
        };
        let v = f32::from_bits((hb << 16) | u32::from(lo));
        let tie_end = if before_v + eq == req.p {
            n
        } else if !index_order {
            split[r] = true;
            n
        } else if let Some(t) = tie_end {
            t
        } else {
            let slot = models.iter().position(|&m| m == req.model).unwrap_or(0);
            let counts = matches!(mode[r], Mode::Single(_))
                .then(|| chunk_counts(&records, slot, hb))
                .flatten();
            pending.push((r, req.p - before_v, counts));
            0
        };
        cuts.push(Cut {
            desc: req.desc,
            v,
            tie_end,
        });
    }
    for (r, rank, counts) in pending {
        let m = requests[r].model;
        let v = cuts[r].v;
        cuts[r].tie_end = tie_index(inputs, base, m, v, rank, counts)? + 1;
    }
    Ok(Cuts::Found(cuts, split))
}

/// Most bins one chunk's record of one model holds; a chunk whose keys fill more keeps
/// no record (a cut splitting ties in a bin of one value then takes a counting pass).
const RECORD_CAP: usize = 4096;
/// Elements per histogram piece (the count of a bin must fit 32 bits).
const PIECE: usize = u32::MAX as usize;

/// The first pass's per-worker state: per model slot and bin, the count and the low
/// bits' mix (OR of the low 16 bits, OR of their negation above), summed over the
/// chunks the worker read; and per chunk (index) and model slot, its record: the
/// chunk's nonzero bins as `bin << 32 | count` in bin order (`None` past
/// [`RECORD_CAP`]), which gives the count of a bin of one value in every chunk without
/// a pass of its own.
struct Pass1 {
    count: Vec<u64>,
    mix: Vec<u32>,
    /// One chunk's histogram, `count << 32 | mix` per bin, zero between chunks.
    local: Vec<u64>,
    records: Vec<(usize, Vec<Option<Vec<u64>>>)>,
    nonfinite: bool,
}

impl Pass1 {
    /// Histograms the keys `|x - b|` into model slot `j`'s totals; returns the chunk's
    /// record.
    fn histogram<E: Scalar>(&mut self, j: usize, x: &[E], b: &[E]) -> Option<Vec<u64>> {
        let mut record = Some(Vec::new());
        for (xp, bp) in x.chunks(PIECE).zip(b.chunks(PIECE)) {
            let local = &mut self.local[..HI_BINS];
            super::kernel::simd(
                #[inline(always)]
                || {
                    for (&xv, &bv) in xp.iter().zip(bp) {
                        let k = key(xv, bv).to_bits();
                        let lo = k & 0xFFFF;
                        let e = &mut local[(k >> 16) as usize & (HI_BINS - 1)];
                        *e = (*e | u64::from(lo | ((!lo & 0xFFFF) << 16))) + (1 << 32);
                    }
                },
            );
            let count = &mut self.count[j * HI_BINS..(j + 1) * HI_BINS];
            let mix = &mut self.mix[j * HI_BINS..(j + 1) * HI_BINS];
            let mut flush = |bin: usize, rec: &mut Option<Vec<u64>>| {
                let e = std::mem::take(&mut local[bin]);
                if e != 0 {
                    count[bin] += e >> 32;
                    mix[bin] |= e as u32;
                    if let Some(r) = rec {
                        r.push(((bin as u64) << 32) | (e >> 32));
                    }
                }
            };
            // Visit the touched bins: a short piece's own keys, else every bin.
            if xp.len() < HI_BINS / 8 {
                for (&xv, &bv) in xp.iter().zip(bp) {
                    flush(
                        (key(xv, bv).to_bits() >> 16) as usize & (HI_BINS - 1),
                        &mut record,
                    );
                }
                if let Some(r) = &mut record {
                    r.sort_unstable();
                }
            } else {
                for bin in 0..HI_BINS {
                    flush(bin, &mut record);
                }
            }
            if record.as_ref().is_some_and(|r| r.len() > RECORD_CAP) || x.len() > PIECE {
                record = None;
            }
        }
        record
    }
}

/// `(chunk index, count)` per chunk, in chunk order.
type ChunkCounts = Vec<(usize, usize)>;

/// Per chunk, in chunk order, `(chunk, count)` of bin `bin` of model slot `j`, from the
/// first pass's records; `None` when a chunk has none.
fn chunk_counts(
    records: &[(usize, Vec<Option<Vec<u64>>>)],
    j: usize,
    bin: u32,
) -> Option<ChunkCounts> {
    records
        .iter()
        .map(|(chunk, per_model)| {
            let r = per_model.get(j)?.as_ref()?;
            let at = r.partition_point(|&e| (e >> 32) < u64::from(bin));
            let c = r.get(at).filter(|&&e| e >> 32 == u64::from(bin));
            Some((*chunk, c.map_or(0, |&e| (e & 0xFFFF_FFFF) as usize)))
        })
        .collect()
}

/// How the second pass finishes a cut.
#[derive(Clone, Copy)]
enum Mode {
    /// Not at all: every key of the bin has these low bits.
    Single(u16),
    /// Collects the bin's entries.
    Collect,
    /// Histograms the bin's low bits (slot `q`).
    Low(usize),
}

/// The bin holding 1-based position `p` of a histogram read from the top (`desc`) or
/// the bottom: `(bin, entries before it, entries in it)`.
fn locate(h: &[usize], desc: bool, p: usize) -> (u32, usize, usize) {
    let mut cum = 0;
    let order: Box<dyn Iterator<Item = usize>> = if desc {
        Box::new((0..h.len()).rev())
    } else {
        Box::new(0..h.len())
    };
    let mut last = 0;
    for i in order {
        last = i;
        if cum + h[i] >= p {
            return (i as u32, cum, h[i]);
        }
        cum += h[i];
    }
    (last as u32, cum, 0)
}

/// The index of the `rank`-th (1-based) entry of model `m` whose key is `v`, in index
/// order: from the count of such entries per chunk (`counts`, `(chunk, count)`, else
/// a counting pass finds them), a read of the one chunk holding it.
fn tie_index<E: Scalar, C: ChunkedInputs<E>>(
    inputs: &C,
    base: Base<'_, E>,
    m: usize,
    v: f32,
    rank: usize,
    counts: Option<ChunkCounts>,
) -> Result<usize> {
    let ce = inputs.chunk_elems();
    let counts = match counts {
        Some(c) => c,
        None => {
            let parts = inputs.fold_chunks(0..inputs.chunks(), &Vec::new, &|acc, start, ts| {
                let (b, xs) = base.split(start, ts);
                let c = xs[m]
                    .iter()
                    .zip(b)
                    .filter(|(x, bv)| key(**x, **bv) == v)
                    .count();
                acc.push((start / ce, c));
                Ok(())
            })?;
            let mut counts: Vec<(usize, usize)> = parts.into_iter().flatten().collect();
            counts.sort_unstable();
            counts
        }
    };
    let mut left = rank;
    for (chunk, c) in counts {
        if left <= c {
            let found = inputs.fold_chunks(chunk..chunk + 1, &|| None, &|acc, start, ts| {
                let (b, xs) = base.split(start, ts);
                *acc = xs[m]
                    .iter()
                    .zip(b)
                    .enumerate()
                    .filter(|(_, (x, bv))| key(**x, **bv) == v)
                    .nth(left - 1)
                    .map(|(j, _)| start + j);
                Ok(())
            })?;
            if let Some(i) = found.into_iter().flatten().next() {
                return Ok(i);
            }
            break;
        }
        left -= c;
    }
    Err(changed())
}

/// The error for inputs that read differently in two passes.
fn changed() -> Error {
    Error::invalid(
        "chunked inputs",
        "the tensors changed between passes (entries counted in one pass were not found in the next)",
    )
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
