//! Shared building blocks of the per-tensor mergers: contiguous access, deterministic
//! chunked parallel loops, reductions in a fixed order, and stable random streams.
//!
//! Every loop runs over fixed chunks of [`PAR_CHUNK`] elements, in parallel when the
//! tensor is large, and every reduction combines its per-chunk partial results in chunk
//! order, so results are bit-identical whatever the number of threads.

use std::borrow::Cow;

use ndarray::{ArrayD, IxDyn};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::tensor::{Scalar, Tensor};

/// Elements per parallel work item (and per random stream).
pub(crate) const PAR_CHUNK: usize = 1 << 16;
/// Elements per cache block inside a work item.
pub(crate) const BLOCK: usize = 4096;
/// Below this many elements a loop runs on the calling thread.
const PAR_MIN: usize = 1 << 18;

/// The elements of `t` in row-major order, borrowed when `t` is in standard layout.
pub(crate) fn elems<T: Tensor>(t: &T) -> Cow<'_, [T::Elem]> {
    let v = t.view();
    match v.to_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(v.iter().copied().collect()),
    }
}

/// Builds a tensor of `shape` from row-major data.
pub(crate) fn build<T: Tensor>(shape: &[usize], data: Vec<T::Elem>) -> Result<T> {
    ArrayD::from_shape_vec(IxDyn(shape), data)
        .map(T::from_array)
        .map_err(|e| Error::invalid("shape", e.to_string()))
}

/// A zero-filled output buffer of `n` elements for large merges: the allocator hands
/// out zero pages lazily, and on Linux the buffer is marked for transparent huge pages
/// before its first touch (as numpy does). Where THP is in `madvise` mode this cuts the
/// page faults of a fresh 256 MiB output from 65536 to 128, which otherwise dominate a
/// merge. Every merger allocates its outputs this way; use it for buffers passed to the
/// `merge_tensor_into` methods.
///
/// ```
/// let buf: Vec<f32> = modelfusion::merge::output_buffer(1 << 20);
/// assert_eq!(buf.len(), 1 << 20);
/// assert!(buf.iter().all(|&x| x == 0.0));
/// ```
pub fn output_buffer<E: Scalar>(n: usize) -> Vec<E> {
    zeros(n)
}

pub(crate) use crate::buffer::zeros;

/// Errors unless `tensors` is non-empty and all of one shape; names `name` and the model.
pub(crate) fn check_shapes<T: Tensor>(name: &str, tensors: &[&T]) -> Result<()> {
    let first = tensors
        .first()
        .ok_or_else(|| Error::empty(format!("the list of tensors for parameter `{name}`")))?;
    for (i, t) in tensors.iter().enumerate().skip(1) {
        if t.shape() != first.shape() {
            return Err(Error::shape(
                format!("parameter `{name}` of model {i} (vs model 0)"),
                first.shape(),
                t.shape(),
            ));
        }
    }
    Ok(())
}

/// Errors unless the base's tensor `name` exists and has `shape`.
pub(crate) fn base_tensor<'a, M: crate::model::Model>(
    base: &'a M,
    name: &str,
    shape: &[usize],
) -> Result<&'a M::Tensor> {
    let b = base.require(name, "the base model")?;
    if b.shape() != shape {
        return Err(Error::shape(
            format!("parameter `{name}` of the base model (vs the models to merge)"),
            shape,
            b.shape(),
        ));
    }
    Ok(b)
}

/// Errors unless `weights` are finite and, when given, one per model.
pub(crate) fn check_weights(weights: &[f64], what: &str) -> Result<()> {
    if weights.is_empty() {
        return Err(Error::empty(format!("the list of {what}")));
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(Error::invalid(what, format!("must be finite, got {w}")));
    }
    Ok(())
}

/// Finite, non-negative weights with a positive sum, divided by that sum.
pub(crate) fn normalized_nonnegative(weights: &[f64]) -> Result<Vec<f64>> {
    check_weights(weights, "weights")?;
    let s: f64 = weights.iter().sum();
    if weights.iter().any(|&w| w < 0.0) || s <= 0.0 {
        return Err(Error::invalid(
            "weights",
            format!("must be >= 0 with a positive sum, got {weights:?}"),
        ));
    }
    Ok(weights.iter().map(|w| w / s).collect())
}

/// Errors unless `count` weights were given for `n` models.
pub(crate) fn check_count(count: usize, n: usize, what: &str, name: &str) -> Result<()> {
    if count != n {
        return Err(Error::invalid(
            what,
            format!("{count} given for {n} models (parameter `{name}`)"),
        ));
    }
    Ok(())
}

/// Errors unless an output buffer has the tensor's length.
pub(crate) fn check_out_len(name: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::shape(
            format!("output buffer for parameter `{name}`"),
            &[want],
            &[got],
        ));
    }
    Ok(())
}

/// True when every element of `x` is finite: branch-free (`v * 0` is `0` for a finite
/// `v` and NaN otherwise, summed in 8 lanes so it vectorises), in parallel when large.
pub(crate) fn all_finite<E: Scalar>(x: &[E]) -> bool {
    let chunk_ok = |c: &[E]| {
        let mut acc = [E::zero(); 8];
        let mut it = c.chunks_exact(8);
        for v in &mut it {
            for (a, &b) in acc.iter_mut().zip(v) {
                *a += b * E::zero();
            }
        }
        it.remainder().iter().all(|v| v.is_finite()) && acc.iter().all(|a| a.is_finite())
    };
    map_chunks(x.len(), |_, s, e| chunk_ok(&x[s..e]))
        .into_iter()
        .all(|ok| ok)
}

/// The error for the first of `tensors` (model `i`) or `extra` (labelled, e.g. "the
/// base model") whose tensor `name` holds a NaN or an infinity, if any does.
pub(crate) fn nonfinite_input<T: Tensor>(
    name: &str,
    tensors: &[&T],
    extra: &[(&str, &T)],
) -> Option<Error> {
    let labelled = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("model {i}"), *t))
        .chain(extra.iter().map(|(l, t)| (l.to_string(), *t)));
    for (label, t) in labelled {
        let data = elems(t);
        if let Some(k) = data.iter().position(|v| !num_traits::Float::is_finite(*v)) {
            return Some(Error::NonFinite {
                what: format!("parameter `{name}` of {label} (element {k} is {})", data[k]),
            });
        }
    }
    None
}

/// Errors naming the first of `tensors` (model `i`) or `extra` whose tensor `name`
/// holds a NaN or an infinity: for methods whose masks or thresholds could hide one.
pub(crate) fn require_finite<T: Tensor>(
    name: &str,
    tensors: &[&T],
    extra: &[(&str, &T)],
) -> Result<()> {
    let clean = |t: &T| all_finite(&elems(t));
    if tensors.iter().all(|t| clean(t)) && extra.iter().all(|(_, t)| clean(t)) {
        return Ok(());
    }
    nonfinite_input(name, tensors, extra).map_or(Ok(()), Err)
}

/// The base's tensor `name` for `tensors` (of one shape), once no input holds a NaN
/// or an infinity (they would hide behind masks, thresholds or clamps).
pub(crate) fn finite_base<'a, M: crate::model::Model>(
    base: &'a M,
    name: &str,
    tensors: &[&'a M::Tensor],
) -> Result<&'a M::Tensor> {
    check_shapes(name, tensors)?;
    let b = base_tensor(base, name, tensors[0].shape())?;
    require_finite(name, tensors, &[("the base model", b)])?;
    Ok(b)
}

/// Errors unless `x` is finite and `>= 0`.
pub(crate) fn check_nonnegative(name: &str, x: f64) -> Result<()> {
    if x >= 0.0 && x.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(
            name,
            format!("must be finite and >= 0, got {x}"),
        ))
    }
}

/// Errors unless `method` got exactly `want` models for tensor `name`.
pub(crate) fn check_model_count(
    method: &str,
    name: &str,
    got: usize,
    want: usize,
    hint: &str,
) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(Error::invalid(
        "models",
        format!("{method} merges exactly {want} model(s), got {got} (parameter `{name}`){hint}"),
    ))
}

/// The elements of every tensor (see [`elems`]).
pub(crate) fn all_elems<'a, T: Tensor>(tensors: &[&'a T]) -> Vec<Cow<'a, [T::Elem]>> {
    tensors.iter().map(|t| elems(*t)).collect()
}

/// `out[j] = f(j, v)` with `v[i] = xs[i][j]`, for every element, chunk-parallel.
pub(crate) fn zip_map_into<E, F>(xs: &[&[E]], out: &mut [E], f: F)
where
    E: Scalar,
    F: Fn(usize, &[E]) -> E + Sync + Send,
{
    for_chunks(out, |_, start, o| {
        let mut v = vec![E::zero(); xs.len()];
        for (j, y) in o.iter_mut().enumerate() {
            for (vi, x) in v.iter_mut().zip(xs) {
                *vi = x[start + j];
            }
            *y = f(start + j, &v);
        }
    });
}

/// [`zip_map_into`] over tensors of one shape (checked by callers), as a new tensor.
pub(crate) fn zip_map<T, F>(tensors: &[&T], f: F) -> Result<T>
where
    T: Tensor,
    F: Fn(usize, &[T::Elem]) -> T::Elem + Sync + Send,
{
    let first = tensors
        .first()
        .ok_or_else(|| Error::empty("the list of tensors"))?;
    let data = all_elems(tensors);
    let xs: Vec<&[T::Elem]> = data.iter().map(|c| c.as_ref()).collect();
    let mut out = zeros(first.len());
    zip_map_into(&xs, &mut out, f);
    build(first.shape(), out)
}

/// The Gram matrix `g[i][j] = <x_i - b, x_j - b>` of `xs` (`b = 0` without a base),
/// accumulated in `f64` in chunk order.
pub(crate) fn gram<E: Scalar>(xs: &[&[E]], base: Option<&[E]>) -> Vec<Vec<f64>> {
    let k = xs.len();
    let n = xs.first().map_or(0, |x| x.len());
    let pairs: Vec<(usize, usize)> = (0..k).flat_map(|i| (i..k).map(move |j| (i, j))).collect();
    let upper = sum_chunks(n, pairs.len(), |s, e| {
        let mut acc = vec![0.0; pairs.len()];
        let mut tau = vec![0.0f64; k];
        for idx in s..e {
            let bv = base.map_or(0.0, |b| b[idx].to_f64_lossless());
            for (t, x) in tau.iter_mut().zip(xs) {
                *t = x[idx].to_f64_lossless() - bv;
            }
            for (a, &(i, j)) in acc.iter_mut().zip(&pairs) {
                *a += tau[i] * tau[j];
            }
        }
        acc
    });
    let mut g = vec![vec![0.0; k]; k];
    for (&(i, j), v) in pairs.iter().zip(upper) {
        g[i][j] = v;
        g[j][i] = v;
    }
    g
}

/// Errors unless the merged `out` is finite: names the input that holds a NaN or an
/// infinity (see [`nonfinite_input`]) or, when every input is finite, returns
/// `overflow()` (an error naming the hyperparameter that made the result overflow).
pub(crate) fn check_merged<T: Tensor>(
    name: &str,
    tensors: &[&T],
    extra: &[(&str, &T)],
    out: &[T::Elem],
    overflow: impl FnOnce() -> Error,
) -> Result<()> {
    if all_finite(out) {
        return Ok(());
    }
    Err(nonfinite_input(name, tensors, extra).unwrap_or_else(overflow))
}

/// The error for a merge of finite inputs that overflowed: names `param` and its value.
pub(crate) fn overflow_error(param: &str, value: impl std::fmt::Display, name: &str) -> Error {
    Error::invalid(
        param,
        format!(
            "{value} makes the merge of the finite parameter `{name}` overflow to a non-finite value"
        ),
    )
}

/// Calls `f(chunk_index, start, out_chunk)` for every [`PAR_CHUNK`]-sized chunk of `out`,
/// in parallel when `out` is large.
pub(crate) fn for_chunks<E, F>(out: &mut [E], f: F)
where
    E: Send,
    F: Fn(usize, usize, &mut [E]) + Sync + Send,
{
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(PAR_CHUNK)
            .enumerate()
            .for_each(|(c, o)| f(c, c * PAR_CHUNK, o));
    } else {
        out.chunks_mut(PAR_CHUNK)
            .enumerate()
            .for_each(|(c, o)| f(c, c * PAR_CHUNK, o));
    }
}

/// Maps every chunk range `[start, end)` of `0..n` to a partial result, in parallel when
/// `n` is large; returns the partials in chunk order.
pub(crate) fn map_chunks<A, F>(n: usize, f: F) -> Vec<A>
where
    A: Send,
    F: Fn(usize, usize, usize) -> A + Sync + Send,
{
    let chunks = n.div_ceil(PAR_CHUNK);
    let run = |c: usize| {
        let start = c * PAR_CHUNK;
        f(c, start, (start + PAR_CHUNK).min(n))
    };
    if n >= PAR_MIN {
        (0..chunks).into_par_iter().map(run).collect()
    } else {
        (0..chunks).map(run).collect()
    }
}

/// Sums the `k` partial sums `f(start, end)` over chunk ranges in a fixed order
/// (deterministic for any thread count).
pub(crate) fn sum_chunks<F>(n: usize, k: usize, f: F) -> Vec<f64>
where
    F: Fn(usize, usize) -> Vec<f64> + Sync + Send,
{
    let parts = map_chunks(n, |_, s, e| f(s, e));
    let mut acc = vec![0.0; k];
    for p in parts {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
    acc
}

/// Runs `f` compiled for AVX2 + FMA when the CPU has them (runtime detection), so the
/// loops `f` inlines vectorise 8 `f32` wide instead of the baseline 4. Callers mark the
/// body `#[inline(always)]`. The result is the same either way: FMA contraction is not
/// enabled by Rust, so every operation rounds exactly as in the baseline build.
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features `with_avx2` is compiled for.
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

/// How [`weighted_sum_into`] accumulates `sum_i w_i x_i` (in model order).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Accumulate<E> {
    /// `acc + w_i x_i`, each operation rounded.
    Plain,
    /// mergekit's `linear`: `acc = fma(x_i, w_i, acc)` (torch's `addcmul_`), then the
    /// division by `div` when given. A fused multiply-add rounds once, in hardware or
    /// not, so the result is the same on every CPU.
    Linear {
        /// The divisor (the weights' sum when normalising).
        div: Option<E>,
    },
}

/// `out = sum_i w_i x_i`, one pass over the inputs (blocked so the output stays in
/// cache).
pub(crate) fn weighted_sum_into<E: Scalar>(
    xs: &[&[E]],
    ws: &[E],
    rule: Accumulate<E>,
    out: &mut [E],
) {
    for_chunks(out, |_, start, o| {
        simd(
            #[inline(always)]
            || weighted_sum_chunk(xs, ws, rule, start, o),
        )
    });
}

#[inline(always)]
fn weighted_sum_chunk<E: Scalar>(
    xs: &[&[E]],
    ws: &[E],
    rule: Accumulate<E>,
    start: usize,
    o: &mut [E],
) {
    let mut tmp = [E::zero(); BLOCK];
    let mut off = 0;
    while off < o.len() {
        let len = BLOCK.min(o.len() - off);
        let tb = &mut tmp[..len];
        let s = start + off;
        let x0 = &xs[0][s..s + len];
        let w0 = ws[0];
        for (a, &b) in tb.iter_mut().zip(x0) {
            *a = w0 * b;
        }
        for (x, &w) in xs.iter().zip(ws).skip(1) {
            let xb = &x[s..s + len];
            match rule {
                Accumulate::Plain => tb.iter_mut().zip(xb).for_each(|(a, &b)| *a += w * b),
                Accumulate::Linear { .. } => {
                    tb.iter_mut()
                        .zip(xb)
                        .for_each(|(a, &b)| *a = b.mul_add(w, *a));
                }
            }
        }
        if let Accumulate::Linear { div: Some(d) } = rule {
            tb.iter_mut().for_each(|a| *a /= d);
        }
        stream_copy(tb, &mut o[off..off + len]);
        off += len;
    }
    stream_fence();
}

/// Copies `src` to `dst` (same length) with non-temporal stores where possible: the
/// output is not read back soon, so it skips the read-for-ownership of every line.
#[inline(always)]
pub(crate) fn stream_copy<E: Copy>(src: &[E], dst: &mut [E]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let size = std::mem::size_of::<E>();
        let bytes = std::mem::size_of_val(src);
        let dp = dst.as_mut_ptr() as usize;
        let head = dp.next_multiple_of(16) - dp;
        if src.len() == dst.len() && head % size == 0 && head <= bytes {
            let he = head / size;
            dst[..he].copy_from_slice(&src[..he]);
            let body = (bytes - head) / 16 * 16;
            let sp = src.as_ptr() as *const u8;
            let dpp = dst.as_mut_ptr() as *mut u8;
            let mut off = head;
            while off < head + body {
                // SAFETY: `off + 16 <= bytes` for both slices (same length); the
                // destination address is 16-byte aligned; SSE2 is baseline on x86_64.
                unsafe {
                    let v = _mm_loadu_si128(sp.add(off) as *const __m128i);
                    _mm_stream_si128(dpp.add(off) as *mut __m128i, v);
                }
                off += 16;
            }
            let done = (head + body) / size;
            dst[done..].copy_from_slice(&src[done..]);
            return;
        }
    }
    dst.copy_from_slice(src);
}

/// Orders earlier non-temporal stores before anything that follows.
#[inline(always)]
pub(crate) fn stream_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is baseline on x86_64; a fence has no memory-safety preconditions.
    unsafe {
        std::arch::x86_64::_mm_sfence();
    }
}

/// `sum_i w_i x_i` as a new tensor of the inputs' shape.
pub(crate) fn weighted_sum<T: Tensor>(tensors: &[&T], weights: &[f64]) -> Result<T> {
    let first = tensors
        .first()
        .ok_or_else(|| Error::empty("the list of tensors"))?;
    let mut out = zeros(first.len());
    weighted_sum_tensors_into(tensors, weights, Accumulate::Plain, &mut out);
    build(first.shape(), out)
}

/// `out = sum_i w_i x_i` over tensors of one shape (`out` row-major, checked by
/// callers), with the weights rounded to the element type.
pub(crate) fn weighted_sum_tensors_into<T: Tensor>(
    tensors: &[&T],
    weights: &[f64],
    rule: Accumulate<T::Elem>,
    out: &mut [T::Elem],
) {
    let data: Vec<Cow<'_, [T::Elem]>> = tensors.iter().map(|t| elems(*t)).collect();
    let xs: Vec<&[T::Elem]> = data.iter().map(|c| c.as_ref()).collect();
    let ws: Vec<T::Elem> = weights
        .iter()
        .map(|&w| T::Elem::from_f64_lossy(w))
        .collect();
    weighted_sum_into(&xs, &ws, rule, out);
}

/// FNV-1a over `bytes`, 64-bit.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64's finaliser: a bijective 64-bit mix.
pub(crate) fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of the random stream for (seed, tensor name, model index, chunk index):
/// stable across runs, platforms, thread counts and tensor orders.
pub(crate) fn stream_seed(seed: u64, name: &str, model: usize, chunk: usize) -> u64 {
    let mut h = splitmix(seed ^ fnv1a(name.as_bytes()));
    h = splitmix(h ^ model as u64);
    splitmix(h ^ (chunk as u64).wrapping_mul(0xd6e8_feb8_6659_fd93))
}

/// The random generator of one chunk of one tensor of one model.
pub(crate) fn chunk_rng(seed: u64, name: &str, model: usize, chunk: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(stream_seed(seed, name, model, chunk))
}

/// `u32` threshold so that `rng.next_u32() < t` has probability `p` (`p = 1` always).
pub(crate) fn keep_threshold(p: f64) -> u64 {
    (p.clamp(0.0, 1.0) * 4_294_967_296.0).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable() {
        // FNV-1a test vector.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(stream_seed(1, "w", 0, 0), stream_seed(1, "w", 1, 0));
        assert_ne!(stream_seed(1, "w", 0, 0), stream_seed(1, "v", 0, 0));
        assert_ne!(stream_seed(1, "w", 0, 0), stream_seed(1, "w", 0, 1));
        assert_eq!(stream_seed(7, "w", 2, 3), stream_seed(7, "w", 2, 3));
        assert_eq!(keep_threshold(1.0), 1 << 32);
    }

    #[test]
    fn finiteness_scan_finds_every_position() {
        let n = PAR_MIN + 77;
        let mut x = vec![1.0f32; n];
        assert!(all_finite(&x));
        for i in [0, 5, 8, PAR_CHUNK + 3, n - 1] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                x[i] = bad;
                assert!(!all_finite(&x), "{i} {bad}");
                x[i] = 1.0;
            }
        }
    }

    #[test]
    fn weighted_sum_matches_naive_on_many_chunks() {
        let n = PAR_MIN + 12345;
        let a: Vec<f64> = (0..n).map(|i| (i % 97) as f64).collect();
        let b: Vec<f64> = (0..n).map(|i| (i % 13) as f64 - 3.0).collect();
        let mut out = vec![0.0; n];
        weighted_sum_into(&[&a, &b], &[0.5, 2.0], Accumulate::Plain, &mut out);
        for i in (0..n).step_by(1009) {
            assert_eq!(out[i], 0.5 * a[i] + 2.0 * b[i]);
        }
        let s = sum_chunks(n, 1, |s, e| vec![(s..e).map(|i| a[i]).sum::<f64>()]);
        assert_eq!(s[0], a.iter().sum::<f64>());
    }
}
