//! Order statistics of `|theta - base|` in expected linear time without a full copy:
//! a deterministic sample brackets the wanted rank, one streaming pass counts the
//! elements above the bracket and collects those inside it, and `select_nth_unstable`
//! finishes on the (small) bracket. If the bracket misses (adversarial data, many ties),
//! an exact selection over all magnitudes takes over.

use super::kernel::map_chunks;
use crate::tensor::Scalar;

/// Number of sample points used to bracket the rank.
const SAMPLES: usize = 1 << 16;
/// Below this size the magnitudes are copied and selected directly.
const SMALL: usize = 1 << 17;

#[inline]
fn mag<E: Scalar>(t: &[E], b: &[E], i: usize) -> E {
    (t[i] - b[i]).abs()
}

/// The `k`-th largest of `|theta[i] - base[i]|` (`1 <= k <= n`, duplicates counted).
/// NaN magnitudes compare as the largest.
pub(crate) fn kth_largest_abs_diff<E: Scalar>(theta: &[E], base: &[E], k: usize) -> E {
    let n = theta.len();
    debug_assert!(k >= 1 && k <= n && base.len() == n);
    if n <= SMALL {
        return exact(theta, base, k);
    }
    let cmp = |a: &E, b: &E| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Less);
    // Deterministic, evenly spread sample, sorted in descending order.
    let mut sample: Vec<E> = (0..SAMPLES)
        .map(|s| mag(theta, base, (s as u128 * n as u128 / SAMPLES as u128) as usize))
        .collect();
    sample.sort_unstable_by(cmp);
    let q = k as f64 / n as f64;
    let s = SAMPLES as f64;
    let margin = 4.0 * (s * q * (1.0 - q)).sqrt() + 16.0;
    let r = q * s;
    let r_hi = (r - margin).floor();
    let r_lo = (r + margin).ceil();
    let hi = if r_hi < 0.0 {
        E::infinity()
    } else {
        sample[r_hi as usize]
    };
    let lo = if r_lo >= s - 1.0 {
        E::zero()
    } else {
        sample[r_lo as usize]
    };
    if hi.is_nan() || lo.is_nan() {
        return exact(theta, base, k);
    }
    let parts = map_chunks(n, |_, start, end| {
        let mut above = 0usize;
        let mut inside = Vec::new();
        for i in start..end {
            let m = mag(theta, base, i);
            if m > hi {
                above += 1;
            } else if m >= lo {
                inside.push(m);
            } else if m.is_nan() {
                above += 1;
            }
        }
        (above, inside)
    });
    let above: usize = parts.iter().map(|p| p.0).sum();
    let total_inside: usize = parts.iter().map(|p| p.1.len()).sum();
    if above < k && k <= above + total_inside {
        let mut inside: Vec<E> = Vec::with_capacity(total_inside);
        for (_, p) in parts {
            inside.extend(p);
        }
        let idx = k - above - 1;
        let (_, v, _) = inside.select_nth_unstable_by(idx, cmp);
        *v
    } else {
        exact(theta, base, k)
    }
}

fn exact<E: Scalar>(theta: &[E], base: &[E], k: usize) -> E {
    let mut m: Vec<E> = theta.iter().zip(base).map(|(&t, &b)| (t - b).abs()).collect();
    let (_, v, _) = m.select_nth_unstable_by(k - 1, |a, b| {
        b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Less)
    });
    *v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(theta: &[f32], base: &[f32], k: usize) {
        let mut m: Vec<f32> = theta.iter().zip(base).map(|(t, b)| (t - b).abs()).collect();
        m.sort_by(|a, b| b.partial_cmp(a).unwrap());
        assert_eq!(kth_largest_abs_diff(theta, base, k), m[k - 1], "k = {k}");
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
        let base = vec![0.1f32; n];
        for k in [1, 2, n / 5, n / 2, n - 1, n] {
            check(&theta, &base, k);
        }
        // Heavy ties: the bracket misses and the exact path takes over.
        let tied: Vec<f32> = (0..n).map(|i| (i % 3) as f32).collect();
        for k in [1, n / 3, n / 2, n] {
            check(&tied, &vec![0.0; n], k);
        }
        check(&theta[..100], &base[..100], 37);
    }
}
