//! Runtime choice of the instruction set for the solvers' hot loops.
//!
//! The loops are written once, in plain Rust that LLVM auto-vectorises, and compiled
//! twice: for the portable baseline (SSE2 on x86-64) and, on x86-64, with AVX2 + FMA
//! enabled. The choice is made once per process from `is_x86_feature_detected!`; the
//! environment variable `MODELFUSION_SIMD=portable` forces the portable path.

use std::sync::OnceLock;

/// The instruction set a kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Whatever the build target guarantees (SSE2 on x86-64).
    Portable,
    /// x86-64 with AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

/// The best instruction set this CPU supports (cached), honouring `MODELFUSION_SIMD`.
pub(crate) fn best() -> Isa {
    static BEST: OnceLock<Isa> = OnceLock::new();
    *BEST.get_or_init(|| {
        if std::env::var("MODELFUSION_SIMD").is_ok_and(|v| v.eq_ignore_ascii_case("portable")) {
            return Isa::Portable;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// Every instruction set usable on this CPU (for tests that compare the paths).
#[cfg(test)]
pub(crate) fn available() -> Vec<Isa> {
    let mut v = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push(Isa::Avx2);
        }
    }
    v
}
