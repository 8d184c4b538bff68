//! Storage element types of a checkpoint and the conversions between them.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

pub use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::tensor::Scalar;

/// Element count above which [`decode`] and [`encode`] split their work across threads.
const PAR_MIN: usize = 1 << 17;
/// Elements per parallel piece in [`decode`] and [`encode`].
const PAR_PIECE: usize = 1 << 16;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A float type tensors are read into and written from: `f32` or `f64` (sealed).
///
/// Its methods convert single values; [`decode`] and [`encode`] convert whole buffers.
/// Every conversion to a narrower type rounds to nearest, ties to even, directly from
/// the source type (no double rounding).
///
/// ```
/// use modelfusion::io::IoScalar;
/// // 1 + 2^-8 lies exactly between two bf16 values; the tie goes to the even one (1.0).
/// assert_eq!(<f32 as IoScalar>::to_bf16(1.0 + 1.0 / 256.0).to_bits(), 0x3f80);
/// ```
pub trait IoScalar: Scalar + sealed::Sealed {
    /// From an `f32` (exact for `f32` and `f64`).
    fn cast_from_f32(x: f32) -> Self;
    /// From an `f64`, rounding to nearest even.
    fn cast_from_f64(x: f64) -> Self;
    /// To `f32`, rounding to nearest even.
    fn cast_to_f32(self) -> f32;
    /// To `f64` (exact).
    fn cast_to_f64(self) -> f64;
    /// To `f16`, rounding to nearest even.
    fn to_f16(self) -> f16;
    /// To `bf16`, rounding to nearest even.
    fn to_bf16(self) -> bf16;
    /// The elements as little-endian bytes of `dtype`, without copying, when the
    /// in-memory layout already is that (e.g. `f32` as `F32` on a little-endian machine).
    fn as_bytes_of(src: &[Self], dtype: Dtype) -> Option<&[u8]>;
    /// The mutable counterpart of [`IoScalar::as_bytes_of`]: lets a reader fill the
    /// elements straight from a file.
    fn as_bytes_of_mut(dst: &mut [Self], dtype: Dtype) -> Option<&mut [u8]>;
    /// Widens a slice of `f16` (SIMD where the CPU has it). Lengths must match.
    ///
    /// ```
    /// use modelfusion::io::IoScalar;
    /// let mut out = [0f32; 2];
    /// f32::from_f16_slice(&[modelfusion::io::f16::ONE, modelfusion::io::f16::NEG_ONE], &mut out);
    /// assert_eq!(out, [1.0, -1.0]);
    /// ```
    fn from_f16_slice(src: &[f16], out: &mut [Self]);
    /// Narrows a slice to `f16`, rounding to nearest even (SIMD where the CPU has it).
    /// Lengths must match.
    ///
    /// ```
    /// use modelfusion::io::IoScalar;
    /// let mut out = [modelfusion::io::f16::ZERO; 1];
    /// f64::to_f16_slice(&[1.0 + 2f64.powi(-11) + 2f64.powi(-40)], &mut out);
    /// assert_eq!(out[0].to_bits(), 0x3c01); // correctly rounded, not double-rounded
    /// ```
    fn to_f16_slice(src: &[Self], out: &mut [f16]);
}

impl IoScalar for f32 {
    #[inline]
    fn cast_from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn cast_from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn cast_to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn cast_to_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn to_f16(self) -> f16 {
        f16::from_f32(self)
    }
    #[inline]
    fn to_bf16(self) -> bf16 {
        bf16::from_f32(self)
    }
    fn as_bytes_of(src: &[Self], dtype: Dtype) -> Option<&[u8]> {
        (cfg!(target_endian = "little") && dtype == Dtype::F32).then(|| bytemuck::cast_slice(src))
    }
    fn as_bytes_of_mut(dst: &mut [Self], dtype: Dtype) -> Option<&mut [u8]> {
        (cfg!(target_endian = "little") && dtype == Dtype::F32)
            .then(|| bytemuck::cast_slice_mut(dst))
    }
    fn from_f16_slice(src: &[f16], out: &mut [Self]) {
        src.convert_to_f32_slice(out);
    }
    fn to_f16_slice(src: &[Self], out: &mut [f16]) {
        out.convert_from_f32_slice(src);
    }
}

impl IoScalar for f64 {
    #[inline]
    fn cast_from_f32(x: f32) -> Self {
        x as f64
    }
    #[inline]
    fn cast_from_f64(x: f64) -> Self {
        x
    }
    #[inline]
    fn cast_to_f32(self) -> f32 {
        self as f32
    }
    #[inline]
    fn cast_to_f64(self) -> f64 {
        self
    }
    #[inline]
    fn to_f16(self) -> f16 {
        f16::from_f32(f64_to_f32_round_odd(self))
    }
    #[inline]
    fn to_bf16(self) -> bf16 {
        bf16::from_f32(f64_to_f32_round_odd(self))
    }
    fn as_bytes_of(src: &[Self], dtype: Dtype) -> Option<&[u8]> {
        (cfg!(target_endian = "little") && dtype == Dtype::F64).then(|| bytemuck::cast_slice(src))
    }
    fn as_bytes_of_mut(dst: &mut [Self], dtype: Dtype) -> Option<&mut [u8]> {
        (cfg!(target_endian = "little") && dtype == Dtype::F64)
            .then(|| bytemuck::cast_slice_mut(dst))
    }
    fn from_f16_slice(src: &[f16], out: &mut [Self]) {
        src.convert_to_f64_slice(out);
    }
    fn to_f16_slice(src: &[Self], out: &mut [f16]) {
        // Through round-to-odd f32 (see `to_f16`), then the SIMD f32 path.
        let mut tmp = [0f32; 256];
        for (o, s) in out.chunks_mut(256).zip(src.chunks(256)) {
            let t = &mut tmp[..s.len()];
            for (d, &x) in t.iter_mut().zip(s) {
                *d = f64_to_f32_round_odd(x);
            }
            o.convert_from_f32_slice(t);
        }
    }
}

/// Rounds `x` to `f32` with round-to-odd: exact values stay, inexact ones are truncated
/// toward zero and get their last mantissa bit set. Rounding that result once more to a
/// type with at most 22 mantissa bits (f16, bf16) to nearest even gives the correctly
/// rounded value of `x`; going through a plain `x as f32` instead would round twice
/// (`1 + 2^-11 + 2^-40` would become the f16 tie `1 + 2^-11` and then `1`).
#[inline]
fn f64_to_f32_round_odd(x: f64) -> f32 {
    let r = x as f32;
    if r.is_nan() || r.is_infinite() || r as f64 == x {
        return r;
    }
    let mut bits = r.to_bits();
    if (r as f64).abs() > x.abs() {
        bits -= 1; // one step toward zero: truncation
    }
    f32::from_bits(bits | 1)
}

fn check_lengths(dtype: Dtype, bytes: usize, elems: usize, what: &str) -> Result<()> {
    if !dtype.is_float() {
        return Err(Error::invalid(
            "dtype",
            format!(
                "{dtype} is not a float type: such tensors are carried as raw bytes, not converted"
            ),
        ));
    }
    if elems.checked_mul(dtype.size()) == Some(bytes) {
        Ok(())
    } else {
        Err(Error::invalid(
            what,
            format!(
                "{elems} elements of {dtype} need {} bytes, got {bytes}",
                elems.saturating_mul(dtype.size())
            ),
        ))
    }
}

fn decode_serial<T: IoScalar>(dtype: Dtype, bytes: &[u8], out: &mut [T]) {
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = T::cast_from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
        }
        Dtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                *o = T::cast_from_f64(f64::from_le_bytes(b));
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                let bits = u16::from_le_bytes([c[0], c[1]]);
                *o = T::cast_from_f32(f32::from_bits((bits as u32) << 16));
            }
        }
        Dtype::F16 => match bytemuck::try_cast_slice::<u8, f16>(bytes) {
            Ok(src) if cfg!(target_endian = "little") => T::from_f16_slice(src, out),
            _ => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o =
                        T::cast_from_f32(f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32());
                }
            }
        },
        // `decode` refuses every other dtype before calling this.
        _ => {}
    }
}

fn encode_serial<T: IoScalar>(dtype: Dtype, src: &[T], out: &mut [u8]) {
    match dtype {
        Dtype::F32 => {
            for (c, &x) in out.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&x.cast_to_f32().to_le_bytes());
            }
        }
        Dtype::F64 => {
            for (c, &x) in out.chunks_exact_mut(8).zip(src) {
                c.copy_from_slice(&x.cast_to_f64().to_le_bytes());
            }
        }
        Dtype::BF16 => {
            for (c, &x) in out.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&x.to_bf16().to_bits().to_le_bytes());
            }
        }
        Dtype::F16 => match bytemuck::try_cast_slice_mut::<u8, f16>(out) {
            Ok(dst) if cfg!(target_endian = "little") => T::to_f16_slice(src, dst),
            _ => {
                for (c, &x) in out.chunks_exact_mut(2).zip(src) {
                    c.copy_from_slice(&x.to_f16().to_bits().to_le_bytes());
                }
            }
        },
        // `encode` refuses every other dtype before calling this.
        _ => {}
    }
}

/// Converts little-endian `bytes` holding elements of `dtype` into `out`.
///
/// `dtype` must be a float type and `bytes.len()` must be `out.len() * dtype.size()`. Large buffers are converted in
/// parallel (rayon).
///
/// ```
/// use modelfusion::io::{decode, Dtype};
/// let bytes = [0x80, 0x3f, 0x00, 0xc0]; // bf16 1.0, -2.0
/// let mut out = [0f32; 2];
/// decode(Dtype::BF16, &bytes, &mut out)?;
/// assert_eq!(out, [1.0, -2.0]);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn decode<T: IoScalar>(dtype: Dtype, bytes: &[u8], out: &mut [T]) -> Result<()> {
    check_lengths(dtype, bytes.len(), out.len(), "bytes")?;
    if out.len() < PAR_MIN {
        decode_serial(dtype, bytes, out);
    } else {
        out.par_chunks_mut(PAR_PIECE)
            .zip(bytes.par_chunks(PAR_PIECE * dtype.size()))
            .for_each(|(o, b)| decode_serial(dtype, b, o));
    }
    Ok(())
}

/// Converts `src` into little-endian bytes of `dtype` in `out`, rounding to nearest even.
///
/// `dtype` must be a float type and `out.len()` must be `src.len() * dtype.size()`. Large buffers are converted in
/// parallel (rayon).
///
/// ```
/// use modelfusion::io::{encode, Dtype};
/// let mut out = [0u8; 4];
/// encode(Dtype::F16, &[1.0f32, -2.0], &mut out)?;
/// assert_eq!(out, [0x00, 0x3c, 0x00, 0xc0]);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn encode<T: IoScalar>(dtype: Dtype, src: &[T], out: &mut [u8]) -> Result<()> {
    check_lengths(dtype, out.len(), src.len(), "out")?;
    if src.len() < PAR_MIN {
        encode_serial(dtype, src, out);
    } else {
        out.par_chunks_mut(PAR_PIECE * dtype.size())
            .zip(src.par_chunks(PAR_PIECE))
            .for_each(|(o, s)| encode_serial(dtype, s, o));
    }
    Ok(())
}
