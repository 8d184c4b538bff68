//! The [`Tensor`] trait: a dense, shaped array of floats that fusion algorithms combine.
//!
//! A tensor only has to expose its shape and an [`ndarray`] view of its elements;
//! everything else (element-wise combination, reductions, reordering along an axis,
//! unfolding to a matrix, typed views such as [`Tensor::as_matrix`]) is provided on top
//! of that. Every [`ndarray::ArrayD<T>`] with `T: `[`Scalar`] implements it, so generic
//! code needs no bound beyond `T: Scalar`; a wrapper around another storage (a memory
//! map, a GPU buffer copied to the host) implements the four required methods and gets
//! the rest.
//!
//! ```
//! use modelfusion::Tensor;
//! use ndarray::{ArrayD, IxDyn};
//!
//! let a = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
//! let b = a.map(|x| x * 2.0);
//! assert_eq!(a.dot(&b).unwrap(), 60.0);
//! assert_eq!(a.take(0, &[1, 0]).unwrap().as_slice().unwrap(), &[3.0, 4.0, 1.0, 2.0]);
//! ```

use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use ndarray::{
    Array2, ArrayBase, ArrayD, ArrayView1, ArrayView2, ArrayViewD, ArrayViewMut1, ArrayViewMut2,
    ArrayViewMutD, Axis, Dimension, IxDyn, LinalgScalar, RawData, ScalarOperand, Zip,
};
use num_traits::{Float, FromPrimitive, ToPrimitive};

use crate::error::{Error, Result};

/// The element types modelfusion computes with: `f32` and `f64`.
///
/// ```
/// use modelfusion::Scalar;
/// assert_eq!(<f32 as Scalar>::NAME, "f32");
/// assert_eq!(<f64 as Scalar>::from_f64_lossy(0.5), 0.5);
/// ```
pub trait Scalar:
    Float
    + FromPrimitive
    + ToPrimitive
    + LinalgScalar
    + ScalarOperand
    + Sum
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Debug
    + Display
    + Default
    + Send
    + Sync
    + 'static
{
    /// The type's name, as used in error messages and file headers.
    const NAME: &'static str;
    /// Converts from `f64`, rounding to the nearest representable value.
    fn from_f64_lossy(x: f64) -> Self;
    /// Widens to `f64`.
    fn to_f64_lossless(self) -> f64;
}

impl Scalar for f32 {
    const NAME: &'static str = "f32";
    #[inline]
    fn from_f64_lossy(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn to_f64_lossless(self) -> f64 {
        self as f64
    }
}

impl Scalar for f64 {
    const NAME: &'static str = "f64";
    #[inline]
    fn from_f64_lossy(x: f64) -> Self {
        x
    }
    #[inline]
    fn to_f64_lossless(self) -> f64 {
        self
    }
}

/// A dense array of floats that fusion algorithms can combine.
///
/// Required: [`shape`](Tensor::shape), [`view`](Tensor::view),
/// [`view_mut`](Tensor::view_mut), [`from_array`](Tensor::from_array). Provided
/// operations return errors (never panic) on mismatched shapes or out-of-range axes.
/// Reductions accumulate in `f64` regardless of the element type.
///
/// ```
/// use modelfusion::Tensor;
/// use ndarray::ArrayD;
///
/// let a: ArrayD<f64> = Tensor::from_shape_vec(&[3], vec![3.0, 0.0, 4.0]).unwrap();
/// assert_eq!(a.norm(), 5.0);
/// assert_eq!(a.shape(), &[3]);
/// ```
pub trait Tensor: Clone + Send + Sync + Debug + 'static {
    /// The element type.
    type Elem: Scalar;

    /// The shape, outermost axis first (PyTorch layout for weights: `(out, in, ...)`).
    fn shape(&self) -> &[usize];
    /// A read-only view of the elements.
    fn view(&self) -> ArrayViewD<'_, Self::Elem>;
    /// A mutable view of the elements.
    fn view_mut(&mut self) -> ArrayViewMutD<'_, Self::Elem>;
    /// Builds a tensor from an owned array.
    fn from_array(array: ArrayD<Self::Elem>) -> Self;

    /// Builds a tensor of `shape` from row-major `data`.
    ///
    /// ```
    /// use modelfusion::Tensor;
    /// let r: modelfusion::Result<ndarray::ArrayD<f32>> = Tensor::from_shape_vec(&[2, 2], vec![1.0; 3]);
    /// assert!(r.is_err());
    /// ```
    fn from_shape_vec(shape: &[usize], data: Vec<Self::Elem>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::invalid(
                "data",
                format!("shape {shape:?} needs {n} elements, got {}", data.len()),
            ));
        }
        ArrayD::from_shape_vec(IxDyn(shape), data)
            .map(Self::from_array)
            .map_err(|e| Error::invalid("shape", e.to_string()))
    }

    /// A tensor of zeros with the given shape.
    ///
    /// ```
    /// use modelfusion::Tensor;
    /// let z: ndarray::ArrayD<f32> = Tensor::zeros(&[2, 3]);
    /// assert_eq!(z.len(), 6);
    /// ```
    fn zeros(shape: &[usize]) -> Self {
        Self::from_array(ArrayD::zeros(IxDyn(shape)))
    }

    /// Number of elements.
    fn len(&self) -> usize {
        self.shape().iter().product()
    }

    /// True when the tensor has no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An owned copy of the elements as an ndarray array.
    fn to_array(&self) -> ArrayD<Self::Elem> {
        self.view().to_owned()
    }

    /// Errors unless `other` has the same shape; `what` names the pair in the message.
    fn check_same_shape(&self, other: &Self, what: &str) -> Result<()> {
        if self.shape() == other.shape() {
            Ok(())
        } else {
            Err(Error::shape(what, self.shape(), other.shape()))
        }
    }

    /// Applies `f` to every element.
    fn map(&self, f: impl Fn(Self::Elem) -> Self::Elem + Sync + Send) -> Self {
        Self::from_array(self.view().mapv(f))
    }

    /// Combines two tensors of one shape element by element.
    fn zip_map(
        &self,
        other: &Self,
        f: impl Fn(Self::Elem, Self::Elem) -> Self::Elem + Sync + Send,
    ) -> Result<Self> {
        self.check_same_shape(other, "element-wise operands")?;
        let mut out = self.to_array();
        Zip::from(&mut out)
            .and(&other.view())
            .for_each(|a, &b| *a = f(*a, b));
        Ok(Self::from_array(out))
    }

    /// `self += alpha * x`, in place.
    fn axpy(&mut self, alpha: Self::Elem, x: &Self) -> Result<()> {
        self.check_same_shape(x, "axpy operands")?;
        let xv = x.view();
        Zip::from(&mut self.view_mut())
            .and(&xv)
            .for_each(|a, &b| *a += alpha * b);
        Ok(())
    }

    /// `self *= alpha`, in place.
    fn scale_inplace(&mut self, alpha: Self::Elem) {
        self.view_mut().mapv_inplace(|a| a * alpha);
    }

    /// Sum of element-wise products, accumulated in `f64`.
    fn dot(&self, other: &Self) -> Result<f64> {
        self.check_same_shape(other, "dot operands")?;
        let mut acc = 0.0f64;
        Zip::from(&self.view())
            .and(&other.view())
            .for_each(|&a, &b| acc += a.to_f64_lossless() * b.to_f64_lossless());
        Ok(acc)
    }

    /// Squared Euclidean (Frobenius) norm, accumulated in `f64`.
    fn norm_sq(&self) -> f64 {
        self.view()
            .iter()
            .map(|&a| {
                let a = a.to_f64_lossless();
                a * a
            })
            .sum()
    }

    /// Euclidean (Frobenius) norm.
    fn norm(&self) -> f64 {
        self.norm_sq().sqrt()
    }

    /// True when every element is finite.
    fn all_finite(&self) -> bool {
        self.view().iter().all(|a| a.is_finite())
    }

    /// Reorders the tensor along `axis`: output index `i` holds input index `indices[i]`.
    ///
    /// `indices` need not be a permutation (it can select or repeat), but every entry
    /// must be in range.
    fn take(&self, axis: usize, indices: &[usize]) -> Result<Self> {
        let shape = self.shape();
        if axis >= shape.len() {
            return Err(Error::invalid(
                "axis",
                format!("axis {axis} out of range for a tensor of shape {shape:?}"),
            ));
        }
        if let Some(&bad) = indices.iter().find(|&&i| i >= shape[axis]) {
            return Err(Error::invalid(
                "indices",
                format!(
                    "index {bad} out of range for axis {axis} of length {} (shape {shape:?})",
                    shape[axis]
                ),
            ));
        }
        Ok(Self::from_array(self.view().select(Axis(axis), indices)))
    }

    /// Unfolds the tensor along `axis` into an `(shape[axis], len / shape[axis])` matrix:
    /// row `i` holds every element whose index on `axis` is `i`, in row-major order of
    /// the remaining axes. This is the matrix weight matching multiplies.
    fn unfold(&self, axis: usize) -> Result<Array2<Self::Elem>> {
        let shape = self.shape();
        if axis >= shape.len() {
            return Err(Error::invalid(
                "axis",
                format!("axis {axis} out of range for a tensor of shape {shape:?}"),
            ));
        }
        let rows = shape[axis];
        let cols = self.len().checked_div(rows).unwrap_or(0);
        let mut moved = self.view();
        // Bring `axis` to the front, keeping the others in order.
        for a in (0..axis).rev() {
            moved.swap_axes(a, a + 1);
        }
        let data: Vec<Self::Elem> = moved.iter().copied().collect();
        Array2::from_shape_vec((rows, cols), data)
            .map_err(|e| Error::invalid("axis", e.to_string()))
    }

    /// The tensor as a matrix view (no copy), for code written against [`ArrayView2`]:
    /// a `Linear` weight is `(out, in)`. Errors ([`Error::InvalidParameter`], naming the
    /// rank needed and the shape found) unless the tensor has exactly two axes; a
    /// convolution kernel becomes a matrix with [`unfold`](Tensor::unfold) instead.
    ///
    /// ```
    /// use modelfusion::Tensor;
    /// use ndarray::{arr2, ArrayD, IxDyn};
    ///
    /// let w = arr2(&[[1.0f32, 2.0], [3.0, 4.0]]).into_dyn();
    /// assert_eq!(w.as_matrix()?.dot(&w.as_matrix()?.t())[(0, 1)], 11.0);
    /// let conv = ArrayD::<f32>::zeros(IxDyn(&[8, 3, 3, 3]));
    /// let e = conv.as_matrix().unwrap_err().to_string();
    /// assert!(e.contains("rank-2") && e.contains("[8, 3, 3, 3]"), "{e}");
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn as_matrix(&self) -> Result<ArrayView2<'_, Self::Elem>> {
        with_rank(self.view(), "as_matrix")
    }

    /// The tensor as a mutable matrix view; errors as [`as_matrix`](Tensor::as_matrix).
    ///
    /// ```
    /// use modelfusion::Tensor;
    /// use ndarray::arr2;
    ///
    /// let mut w = arr2(&[[1.0f64, 2.0], [3.0, 4.0]]).into_dyn();
    /// w.as_matrix_mut()?.row_mut(1).fill(0.0);
    /// assert_eq!(w.as_slice().unwrap(), &[1.0, 2.0, 0.0, 0.0]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn as_matrix_mut(&mut self) -> Result<ArrayViewMut2<'_, Self::Elem>> {
        with_rank(self.view_mut(), "as_matrix_mut")
    }

    /// The tensor as a vector view (no copy), e.g. a bias or a norm's scale. Errors
    /// ([`Error::InvalidParameter`], naming the rank needed and the shape found) unless
    /// the tensor has exactly one axis.
    ///
    /// ```
    /// use modelfusion::Tensor;
    /// use ndarray::{arr1, arr2};
    ///
    /// let b = arr1(&[1.0f32, 2.0, 3.0]).into_dyn();
    /// assert_eq!(b.as_vector()?.sum(), 6.0);
    /// let e = arr2(&[[1.0f32]]).into_dyn().as_vector().unwrap_err().to_string();
    /// assert!(e.contains("rank-1") && e.contains("[1, 1]"), "{e}");
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn as_vector(&self) -> Result<ArrayView1<'_, Self::Elem>> {
        with_rank(self.view(), "as_vector")
    }

    /// The tensor as a mutable vector view; errors as [`as_vector`](Tensor::as_vector).
    ///
    /// ```
    /// use modelfusion::Tensor;
    /// use ndarray::arr1;
    ///
    /// let mut b = arr1(&[1.0f32, 2.0]).into_dyn();
    /// b.as_vector_mut()?[0] = 5.0;
    /// assert_eq!(b.as_slice().unwrap(), &[5.0, 2.0]);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn as_vector_mut(&mut self) -> Result<ArrayViewMut1<'_, Self::Elem>> {
        with_rank(self.view_mut(), "as_vector_mut")
    }
}

/// `view` with the fixed rank of `D`; the error names `method`, that rank and the shape.
fn with_rank<S: RawData, D: Dimension>(
    view: ArrayBase<S, IxDyn>,
    method: &str,
) -> Result<ArrayBase<S, D>> {
    let got = view.shape().to_vec();
    view.into_dimensionality().map_err(|_| {
        Error::invalid(
            "tensor",
            format!(
                "{method} needs a rank-{} tensor, got rank {} (shape {got:?})",
                D::NDIM.unwrap_or(0),
                got.len()
            ),
        )
    })
}

/// Every [`ndarray::ArrayD`] of a [`Scalar`] is a tensor, so generic code needs only
/// `T: Scalar` (or [`IoScalar`](crate::io::IoScalar), which implies it):
///
/// ```
/// use modelfusion::{Scalar, Tensor};
/// use ndarray::{arr1, ArrayD};
///
/// fn relative_change<T: Scalar>(a: &ArrayD<T>, b: &ArrayD<T>) -> modelfusion::Result<f64> {
///     let diff = a.zip_map(b, |x, y| x - y)?;
///     Ok(diff.norm() / a.norm())
/// }
/// let a = arr1(&[3.0f32, 4.0]).into_dyn();
/// let b = arr1(&[3.0f32, 3.0]).into_dyn();
/// assert_eq!(relative_change(&a, &b)?, 0.2);
/// # Ok::<(), modelfusion::Error>(())
/// ```
impl<T: Scalar> Tensor for ArrayD<T> {
    type Elem = T;
    fn shape(&self) -> &[usize] {
        (**self).shape()
    }
    fn view(&self) -> ArrayViewD<'_, T> {
        (**self).view()
    }
    fn view_mut(&mut self) -> ArrayViewMutD<'_, T> {
        (**self).view_mut()
    }
    fn from_array(array: ArrayD<T>) -> Self {
        array
    }
    fn to_array(&self) -> ArrayD<T> {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], data: Vec<f64>) -> ArrayD<f64> {
        <ArrayD<f64> as Tensor>::from_shape_vec(shape, data).unwrap()
    }

    #[test]
    fn unfold_moves_axis_to_front() {
        // shape (2, 3): unfold along axis 1 gives the transpose.
        let a = t(&[2, 3], vec![1., 2., 3., 4., 5., 6.]);
        let u = a.unfold(1).unwrap();
        assert_eq!(u.shape(), &[3, 2]);
        assert_eq!(u.row(0).to_vec(), vec![1., 4.]);
        assert_eq!(u.row(2).to_vec(), vec![3., 6.]);
        let u0 = a.unfold(0).unwrap();
        assert_eq!(u0.row(1).to_vec(), vec![4., 5., 6.]);
        // 3-d: (2, 2, 2) along axis 1.
        let b = t(&[2, 2, 2], (0..8).map(f64::from).collect());
        let u1 = b.unfold(1).unwrap();
        assert_eq!(u1.row(0).to_vec(), vec![0., 1., 4., 5.]);
        assert_eq!(u1.row(1).to_vec(), vec![2., 3., 6., 7.]);
    }

    #[test]
    fn errors_on_bad_axis_and_shapes() {
        let a = t(&[2, 3], vec![0.0; 6]);
        let b = t(&[3, 2], vec![0.0; 6]);
        assert!(matches!(a.dot(&b), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(a.unfold(2), Err(Error::InvalidParameter { .. })));
        assert!(matches!(
            a.take(1, &[0, 3]),
            Err(Error::InvalidParameter { .. })
        ));
        let mut c = a.clone();
        assert!(c.axpy(1.0, &b).is_err());
    }

    #[test]
    fn axpy_scale_norm() {
        let mut a = t(&[2], vec![1.0, 2.0]);
        let b = t(&[2], vec![3.0, 4.0]);
        a.axpy(2.0, &b).unwrap();
        assert_eq!(a.as_slice().unwrap(), &[7.0, 10.0]);
        a.scale_inplace(0.5);
        assert_eq!(a.as_slice().unwrap(), &[3.5, 5.0]);
        assert_eq!(b.norm(), 5.0);
        assert!(!t(&[1], vec![f64::NAN]).all_finite());
    }
}
