//! A branch-free `exp` for `f64` that LLVM vectorises (the solvers' inner loops are
//! exp-bound; `f64::exp` is a libm call that blocks vectorisation).
//!
//! Range reduction `x = k ln2 + r` with `|r| <= ln2 / 2` (Cody–Waite split of ln 2),
//! degree-12 Taylor polynomial for `exp(r)` (truncation error below 2e-16), and the
//! factor `2^k` written straight into the exponent bits. Inputs below `-708` give `0`
//! (the true value is below `3e-308`), inputs above `709` give `exp(709)`.

/// `exp(x)` to within a few ulp for `x` in `[-708, 709]`; see the module docs.
#[inline(always)]
pub(crate) fn exp(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO, LN2_HI with trailing zero bits so that k * LN2_HI is exact
    const LN2_HI: f64 = 0.693_147_180_369_123_8;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // adding 1.5 * 2^52 rounds to an integer held in the low mantissa bits
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    let xc = x.clamp(-708.0, 709.0);
    let shifted = xc * LOG2E + SHIFT;
    let k = shifted.to_bits() as i64 - SHIFT.to_bits() as i64;
    let kf = shifted - SHIFT;
    let r = (xc - kf * LN2_HI) - kf * LN2_LO;
    // Horner form of sum_{i<=12} r^i / i!
    let mut p = 1.0 / 479_001_600.0;
    p = p * r + 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f64::from_bits(((k + 1023) << 52) as u64);
    let y = p * scale;
    if x < -708.0 { 0.0 } else { y }
}

#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn matches_std_exp() {
        let mut worst = 0.0f64;
        let mut x = -708.0;
        while x < 709.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.012_345_678_9;
        }
        for &x in &[
            0.0, -0.0, 1e-300, -1e-12, 1e-12, 0.5, -0.5, 1.0, -1.0, 700.0, -700.0,
        ] {
            let (a, b) = (exp(x), f64::exp(x));
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 1e-15, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-800.0), 0.0);
        assert_eq!(exp(f64::NEG_INFINITY), 0.0);
        assert!(exp(800.0).is_finite());
    }
}
