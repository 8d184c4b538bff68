//! Storage element types ([`Dtype`]) and tensors of any of them held as raw bytes
//! ([`RawTensor`]).
//!
//! A real checkpoint holds more than float weights: BatchNorm's `num_batches_tracked`
//! is `I64`, attention masks are `BOOL`, quantisation tables are `U8`. Fusion never does
//! arithmetic on such tensors, but it must carry them, bit for bit, from the input to the
//! output. [`RawTensor`] is that carrier: a dtype, a shape and the little-endian bytes,
//! with the one operation a permutation needs (a gather along an axis).
//!
//! ```
//! use modelfusion::dtype::{Dtype, RawTensor};
//! let steps = RawTensor::new(Dtype::I64, vec![], 1234i64.to_le_bytes().to_vec())?;
//! assert_eq!(steps.numel(), 1);
//! assert!(!steps.dtype().is_float());
//! assert!(RawTensor::new(Dtype::I64, vec![2], vec![0; 8]).is_err()); // 2 x 8 bytes needed
//! # Ok::<(), modelfusion::Error>(())
//! ```

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The element type of a tensor as stored in a safetensors file.
///
/// Every byte-sized dtype of the format is known. The four float types ([`is_float`](
/// Self::is_float): F16, BF16, F32, F64) are read into `f32`/`f64` tensors and merged;
/// every other dtype (integers, booleans, 8-bit floats, complex) is carried unchanged as a
/// [`RawTensor`]. The packed sub-byte types (F4, F6_E2M3, F6_E3M2) are valid
/// safetensors but not supported (a clear error, never "malformed").
///
/// ```
/// use modelfusion::dtype::Dtype;
/// let d: Dtype = "bfloat16".parse()?;
/// assert_eq!(d, Dtype::BF16);
/// assert_eq!(d.size(), 2);
/// assert_eq!(d.as_str(), "BF16");
/// assert_eq!("int64".parse::<Dtype>()?, Dtype::I64);
/// assert!(Dtype::I64.parse_float().is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
pub enum Dtype {
    /// IEEE 754 half precision.
    F16,
    /// bfloat16 (the upper half of an `f32`).
    BF16,
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 double precision.
    F64,
    /// Booleans, one byte each.
    BOOL,
    /// Unsigned 8-bit integers.
    U8,
    /// Signed 8-bit integers.
    I8,
    /// Unsigned 16-bit integers.
    U16,
    /// Signed 16-bit integers.
    I16,
    /// Unsigned 32-bit integers.
    U32,
    /// Signed 32-bit integers.
    I32,
    /// Unsigned 64-bit integers.
    U64,
    /// Signed 64-bit integers (PyTorch's `long`, e.g. `num_batches_tracked`).
    I64,
    /// 8-bit float, 5 exponent bits.
    F8_E5M2,
    /// 8-bit float, 4 exponent bits.
    F8_E4M3,
    /// 8-bit scale type (exponent only).
    F8_E8M0,
    /// 8-bit float, 4 exponent bits, no negative zero.
    F8_E4M3FNUZ,
    /// 8-bit float, 5 exponent bits, no negative zero.
    F8_E5M2FNUZ,
    /// Complex numbers with `f32` parts.
    C64,
}

impl Dtype {
    /// The float dtypes that load into `f32`/`f64` tensors.
    ///
    /// ```
    /// assert_eq!(modelfusion::dtype::Dtype::FLOATS.len(), 4);
    /// ```
    pub const FLOATS: [Dtype; 4] = [Dtype::F16, Dtype::BF16, Dtype::F32, Dtype::F64];

    /// Every supported dtype.
    ///
    /// ```
    /// use modelfusion::dtype::Dtype;
    /// assert!(Dtype::ALL.contains(&Dtype::I64));
    /// assert_eq!(Dtype::ALL.iter().filter(|d| d.is_float()).count(), 4);
    /// ```
    pub const ALL: [Dtype; 19] = [
        Dtype::F16,
        Dtype::BF16,
        Dtype::F32,
        Dtype::F64,
        Dtype::BOOL,
        Dtype::U8,
        Dtype::I8,
        Dtype::U16,
        Dtype::I16,
        Dtype::U32,
        Dtype::I32,
        Dtype::U64,
        Dtype::I64,
        Dtype::F8_E5M2,
        Dtype::F8_E4M3,
        Dtype::F8_E8M0,
        Dtype::F8_E4M3FNUZ,
        Dtype::F8_E5M2FNUZ,
        Dtype::C64,
    ];

    /// Bytes per element.
    ///
    /// ```
    /// use modelfusion::dtype::Dtype;
    /// assert_eq!(Dtype::F64.size(), 8);
    /// assert_eq!(Dtype::BOOL.size(), 1);
    /// ```
    pub fn size(self) -> usize {
        match self {
            Dtype::BOOL
            | Dtype::U8
            | Dtype::I8
            | Dtype::F8_E5M2
            | Dtype::F8_E4M3
            | Dtype::F8_E8M0
            | Dtype::F8_E4M3FNUZ
            | Dtype::F8_E5M2FNUZ => 1,
            Dtype::F16 | Dtype::BF16 | Dtype::U16 | Dtype::I16 => 2,
            Dtype::F32 | Dtype::U32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::U64 | Dtype::I64 | Dtype::C64 => 8,
        }
    }

    /// True for the float types that are read into `f32`/`f64` and merged (F16, BF16,
    /// F32, F64); every other dtype is carried unchanged.
    ///
    /// ```
    /// use modelfusion::dtype::Dtype;
    /// assert!(Dtype::BF16.is_float());
    /// assert!(!Dtype::F8_E4M3.is_float()); // carried, not merged
    /// ```
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }

    /// The name used in safetensors headers (`"F16"`, `"I64"`, `"BOOL"`, ...).
    ///
    /// ```
    /// assert_eq!(modelfusion::dtype::Dtype::F8_E4M3.as_str(), "F8_E4M3");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::BOOL => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::U16 => "U16",
            Dtype::I16 => "I16",
            Dtype::U32 => "U32",
            Dtype::I32 => "I32",
            Dtype::U64 => "U64",
            Dtype::I64 => "I64",
            Dtype::F8_E5M2 => "F8_E5M2",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::F8_E8M0 => "F8_E8M0",
            Dtype::F8_E4M3FNUZ => "F8_E4M3FNUZ",
            Dtype::F8_E5M2FNUZ => "F8_E5M2FNUZ",
            Dtype::C64 => "C64",
        }
    }

    /// PyTorch's name (`torch.<name>`), as `config.json`'s `torch_dtype` spells it.
    ///
    /// ```
    /// assert_eq!(modelfusion::dtype::Dtype::BF16.torch_name(), "bfloat16");
    /// ```
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            Dtype::F32 => "float32",
            Dtype::F64 => "float64",
            Dtype::BOOL => "bool",
            Dtype::U8 => "uint8",
            Dtype::I8 => "int8",
            Dtype::U16 => "uint16",
            Dtype::I16 => "int16",
            Dtype::U32 => "uint32",
            Dtype::I32 => "int32",
            Dtype::U64 => "uint64",
            Dtype::I64 => "int64",
            Dtype::F8_E5M2 => "float8_e5m2",
            Dtype::F8_E4M3 => "float8_e4m3fn",
            Dtype::F8_E8M0 => "float8_e8m0fnu",
            Dtype::F8_E4M3FNUZ => "float8_e4m3fnuz",
            Dtype::F8_E5M2FNUZ => "float8_e5m2fnuz",
            Dtype::C64 => "complex64",
        }
    }

    /// The dtype of a safetensors header name, exactly as the format spells it.
    ///
    /// ```
    /// use modelfusion::dtype::Dtype;
    /// assert_eq!(Dtype::from_header("BF16"), Some(Dtype::BF16));
    /// assert_eq!(Dtype::from_header("I64"), Some(Dtype::I64));
    /// assert_eq!(Dtype::from_header("bf16"), None);
    /// ```
    pub fn from_header(s: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// True for the names the safetensors format defines but modelfusion does not
    /// support (the packed sub-byte floats).
    ///
    /// ```
    /// assert!(modelfusion::dtype::Dtype::is_unsupported_header("F4"));
    /// assert!(!modelfusion::dtype::Dtype::is_unsupported_header("F32"));
    /// ```
    pub fn is_unsupported_header(s: &str) -> bool {
        matches!(s, "F4" | "F6_E2M3" | "F6_E3M2")
    }

    /// `self` if it is a float type (an output dtype for merged tensors), else an error
    /// naming it.
    ///
    /// ```
    /// use modelfusion::dtype::Dtype;
    /// assert_eq!(Dtype::F16.parse_float()?, Dtype::F16);
    /// assert!(Dtype::U8.parse_float().unwrap_err().to_string().contains("U8"));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn parse_float(self) -> Result<Dtype> {
        if self.is_float() {
            Ok(self)
        } else {
            Err(Error::invalid(
                "dtype",
                format!("{self} is not a float type; expected one of F16, BF16, F32, F64"),
            ))
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dtype {
    type Err = Error;

    /// Accepts header names (`F16`, `I64`), PyTorch/mergekit names (`float16`,
    /// `bfloat16`, `float32`, `float64`, `half`, `float`, `double`, `int64`, `long`,
    /// `bool`, ..., with or without `torch.`) and short names (`f16`, `bf16`, `fp16`,
    /// `f32`, `fp32`, `f64`, `fp64`), case-insensitively.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        let lower = lower.strip_prefix("torch.").unwrap_or(&lower);
        let short = match lower {
            "fp16" | "half" => Some(Dtype::F16),
            "float" | "fp32" => Some(Dtype::F32),
            "double" | "fp64" => Some(Dtype::F64),
            "long" => Some(Dtype::I64),
            "int" => Some(Dtype::I32),
            "short" => Some(Dtype::I16),
            _ => None,
        };
        short
            .or_else(|| {
                Dtype::ALL.into_iter().find(|d| {
                    d.as_str().eq_ignore_ascii_case(lower) || d.torch_name() == lower
                })
            })
            .ok_or_else(|| {
                Error::invalid(
                    "dtype",
                    format!(
                        "unknown dtype `{s}`; expected one of float16, bfloat16, float32, float64 (or a safetensors name such as I64)"
                    ),
                )
            })
    }
}

/// A tensor of any [`Dtype`] held as little-endian bytes: what a checkpoint's non-float
/// tensors (`num_batches_tracked`, masks, index tables) are carried as.
///
/// ```
/// use modelfusion::dtype::{Dtype, RawTensor};
/// // A 2 x 3 table of u8, permuted along axis 1.
/// let t = RawTensor::new(Dtype::U8, vec![2, 3], vec![0, 1, 2, 10, 11, 12])?;
/// let p = t.take(1, &[2, 0, 1])?;
/// assert_eq!(p.bytes(), &[2, 0, 1, 12, 10, 11]);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl fmt::Debug for RawTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawTensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// The element count of `shape` times `size` bytes, or `None` on overflow.
pub(crate) fn byte_size(shape: &[usize], size: usize) -> Option<usize> {
    shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d))
}

impl RawTensor {
    /// Validates that `bytes` holds exactly `shape.product()` elements of `dtype`.
    ///
    /// ```
    /// use modelfusion::dtype::{Dtype, RawTensor};
    /// assert!(RawTensor::new(Dtype::BOOL, vec![3], vec![1, 0, 1]).is_ok());
    /// assert!(RawTensor::new(Dtype::I32, vec![usize::MAX, 2], vec![]).is_err());
    /// ```
    pub fn new(dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Self> {
        match byte_size(&shape, dtype.size()) {
            Some(n) if n == bytes.len() => Ok(RawTensor {
                dtype,
                shape,
                bytes,
            }),
            Some(n) => Err(Error::invalid(
                "bytes",
                format!(
                    "shape {shape:?} of {dtype} needs {n} bytes, got {}",
                    bytes.len()
                ),
            )),
            None => Err(Error::invalid(
                "shape",
                format!("shape {shape:?} of {dtype} overflows"),
            )),
        }
    }

    /// The element type.
    ///
    /// ```
    /// # use modelfusion::dtype::{Dtype, RawTensor};
    /// assert_eq!(RawTensor::new(Dtype::I8, vec![1], vec![7])?.dtype(), Dtype::I8);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The shape, outermost axis first.
    ///
    /// ```
    /// # use modelfusion::dtype::{Dtype, RawTensor};
    /// assert_eq!(RawTensor::new(Dtype::I8, vec![1, 2], vec![7, 8])?.shape(), &[1, 2]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The stored bytes, little-endian elements in row-major order.
    ///
    /// ```
    /// # use modelfusion::dtype::{Dtype, RawTensor};
    /// let t = RawTensor::new(Dtype::I16, vec![1], 300i16.to_le_bytes().to_vec())?;
    /// assert_eq!(i16::from_le_bytes([t.bytes()[0], t.bytes()[1]]), 300);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Number of elements (1 for a scalar).
    ///
    /// ```
    /// # use modelfusion::dtype::{Dtype, RawTensor};
    /// assert_eq!(RawTensor::new(Dtype::U8, vec![2, 2], vec![0; 4])?.numel(), 4);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The tensor reordered along `axis`: output index `i` on that axis takes input
    /// index `idx[i]` (gather, as [`crate::Tensor::take`]); `idx` must have the axis'
    /// length and stay in range. Bytes move, nothing is converted.
    ///
    /// ```
    /// # use modelfusion::dtype::{Dtype, RawTensor};
    /// let t = RawTensor::new(Dtype::I64, vec![2], [5i64.to_le_bytes(), 6i64.to_le_bytes()].concat())?;
    /// assert_eq!(t.take(0, &[1, 0])?.bytes()[0], 6);
    /// assert!(t.take(1, &[0]).is_err()); // no axis 1
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn take(&self, axis: usize, idx: &[usize]) -> Result<RawTensor> {
        let n = *self.shape.get(axis).ok_or_else(|| {
            Error::invalid(
                "axis",
                format!("axis {axis} of a tensor of shape {:?}", self.shape),
            )
        })?;
        if idx.len() != n {
            return Err(Error::invalid(
                "idx",
                format!("{} indices for axis {axis} of length {n}", idx.len()),
            ));
        }
        if let Some(&bad) = idx.iter().find(|&&i| i >= n) {
            return Err(Error::invalid(
                "idx",
                format!("index {bad} out of range for axis {axis} of length {n}"),
            ));
        }
        let outer: usize = self.shape[..axis].iter().product();
        let inner: usize = self.shape[axis + 1..].iter().product::<usize>() * self.dtype.size();
        let mut out = Vec::with_capacity(self.bytes.len());
        for o in 0..outer {
            let base = o * n * inner;
            for &i in idx {
                let s = base + i * inner;
                out.extend_from_slice(&self.bytes[s..s + inner]);
            }
        }
        Ok(RawTensor {
            dtype: self.dtype,
            shape: self.shape.clone(),
            bytes: out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_header(d.as_str()), Some(d));
            assert_eq!(d.as_str().parse::<Dtype>().unwrap(), d);
            assert_eq!(d.torch_name().parse::<Dtype>().unwrap(), d);
        }
        assert!("float7".parse::<Dtype>().is_err());
    }

    #[test]
    fn take_moves_rows_of_multibyte_elements() {
        let vals: Vec<u8> = (0..6i32).flat_map(|v| v.to_le_bytes()).collect();
        let t = RawTensor::new(Dtype::I32, vec![3, 2], vals).unwrap();
        let p = t.take(0, &[2, 0, 1]).unwrap();
        let got: Vec<i32> = p
            .bytes()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(got, [4, 5, 0, 1, 2, 3]);
        assert!(t.take(0, &[0, 0, 5]).is_err());
    }
}
