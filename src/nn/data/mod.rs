//! Labelled data sets for the reference networks: the [`Dataset`] type, the embedded
//! UCI optical digits ([`digits`]), an IDX (MNIST-format) reader ([`read_idx`]) and
//! Fashion-MNIST ([`fashion_mnist`]).
//!
//! ```
//! use modelfusion::nn::data;
//!
//! let all = data::digits()?;
//! assert_eq!((all.len(), all.num_features(), all.num_classes()), (1797, 64, 10));
//! let (train, test) = all.split(0.2, 42)?;
//! assert_eq!(train.len() + test.len(), 1797);
//! # Ok::<(), modelfusion::Error>(())
//! ```

mod digits;
mod idx;

use ndarray::{Array2, ArrayView2, Axis, s};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

pub use digits::digits;
pub use idx::{
    DEFAULT_FASHION_MNIST_DIR, IdxArray, fashion_mnist, load_idx_dataset, parse_idx, read_idx,
};

/// A labelled classification data set: features `x` `(samples, features)` in `f32`,
/// labels `y` in `0..num_classes`.
///
/// The constructor validates it (as many labels as rows, every label in range, finite
/// features), so every `Dataset` is consistent.
///
/// ```
/// use modelfusion::nn::Dataset;
/// use ndarray::array;
///
/// let d = Dataset::new(array![[0.0f32, 1.0], [1.0, 0.0], [0.5, 0.5]], vec![0, 1, 1], 2)?;
/// assert_eq!(d.len(), 3);
/// assert_eq!(d.class_counts(), vec![1, 2]);
/// assert!(Dataset::new(array![[0.0f32]], vec![2], 2).is_err()); // label out of range
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    x: Array2<f32>,
    y: Vec<usize>,
    num_classes: usize,
}

impl Dataset {
    /// A data set from features `(samples, features)`, labels and the number of classes.
    /// Errors when the counts differ, a label is `>= num_classes`, `num_classes` is zero
    /// or a feature is not finite.
    ///
    /// ```
    /// use modelfusion::nn::Dataset;
    /// use ndarray::Array2;
    /// let e = Dataset::new(Array2::zeros((3, 2)), vec![0, 1], 2).unwrap_err();
    /// assert!(e.to_string().contains("3"));
    /// ```
    pub fn new(x: Array2<f32>, y: Vec<usize>, num_classes: usize) -> Result<Self> {
        if num_classes == 0 {
            return Err(Error::invalid("num_classes", "must be positive, got 0"));
        }
        if x.nrows() != y.len() {
            return Err(Error::invalid(
                "y",
                format!("{} labels for {} samples (rows of x)", y.len(), x.nrows()),
            ));
        }
        if let Some((i, &l)) = y.iter().enumerate().find(|&(_, &l)| l >= num_classes) {
            return Err(Error::invalid(
                "y",
                format!("label {l} of sample {i} is out of range for {num_classes} classes"),
            ));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: format!(
                    "features of sample {} (feature {})",
                    i / x.ncols().max(1),
                    i % x.ncols().max(1)
                ),
            });
        }
        Ok(Dataset { x, y, num_classes })
    }

    /// The features, `(samples, features)`.
    ///
    /// ```
    /// assert_eq!(modelfusion::nn::data::digits()?.x().ncols(), 64);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn x(&self) -> &Array2<f32> {
        &self.x
    }

    /// The labels.
    ///
    /// ```
    /// assert_eq!(modelfusion::nn::data::digits()?.y()[0], 0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn y(&self) -> &[usize] {
        &self.y
    }

    /// Number of classes.
    ///
    /// ```
    /// assert_eq!(modelfusion::nn::data::digits()?.num_classes(), 10);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Number of samples.
    ///
    /// ```
    /// assert_eq!(modelfusion::nn::data::digits()?.len(), 1797);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// True when there are no samples.
    ///
    /// ```
    /// use modelfusion::nn::Dataset;
    /// assert!(Dataset::new(ndarray::Array2::zeros((0, 3)), vec![], 2)?.is_empty());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Number of features per sample.
    ///
    /// ```
    /// assert_eq!(modelfusion::nn::data::digits()?.num_features(), 64);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn num_features(&self) -> usize {
        self.x.ncols()
    }

    /// Number of samples per class.
    ///
    /// ```
    /// let counts = modelfusion::nn::data::digits()?.class_counts();
    /// assert_eq!(counts.iter().sum::<usize>(), 1797);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.num_classes];
        for &l in &self.y {
            c[l] += 1;
        }
        c
    }

    /// The samples at `indices`, in that order (repeats allowed); errors on an index out
    /// of range.
    ///
    /// ```
    /// let d = modelfusion::nn::data::digits()?;
    /// let s = d.subset(&[5, 0])?;
    /// assert_eq!(s.y(), &[d.y()[5], d.y()[0]]);
    /// assert!(d.subset(&[1797]).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::invalid(
                "indices",
                format!(
                    "index {bad} out of range for a data set of {} samples",
                    self.len()
                ),
            ));
        }
        Ok(self.select_unchecked(indices))
    }

    /// The first `n` samples (all of them if there are fewer).
    ///
    /// ```
    /// assert_eq!(modelfusion::nn::data::digits()?.head(100).len(), 100);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn head(&self, n: usize) -> Dataset {
        let n = n.min(self.len());
        Dataset {
            x: self.x.slice(s![..n, ..]).to_owned(),
            y: self.y[..n].to_vec(),
            num_classes: self.num_classes,
        }
    }

    /// The samples in a seeded random order.
    ///
    /// ```
    /// let d = modelfusion::nn::data::digits()?;
    /// assert_eq!(d.shuffled(3), d.shuffled(3));
    /// assert_ne!(d.shuffled(3).y(), d.y());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn shuffled(&self, seed: u64) -> Dataset {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        self.select_unchecked(&order)
    }

    /// A seeded, stratified split into `(train, test)`: from each class,
    /// `round(test_fraction * count)` samples go to the test set; both parts are
    /// shuffled. Errors unless `0 < test_fraction < 1` and both parts are non-empty.
    ///
    /// ```
    /// let d = modelfusion::nn::data::digits()?;
    /// let (train, test) = d.split(0.25, 0)?;
    /// assert_eq!(test.len(), 451); // rounded per class
    /// assert_eq!(d.split(0.25, 0)?, (train, test)); // deterministic
    /// assert!(d.split(1.0, 0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn split(&self, test_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(Error::invalid(
                "test_fraction",
                format!("must be in (0, 1), got {test_fraction}"),
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut by_class = vec![Vec::new(); self.num_classes];
        for (i, &l) in self.y.iter().enumerate() {
            by_class[l].push(i);
        }
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for mut idx in by_class {
            idx.shuffle(&mut rng);
            let k = (test_fraction * idx.len() as f64).round() as usize;
            test.extend_from_slice(&idx[..k]);
            train.extend_from_slice(&idx[k..]);
        }
        if train.is_empty() || test.is_empty() {
            return Err(Error::invalid(
                "test_fraction",
                format!(
                    "{test_fraction} of {} samples leaves {} for training and {} for testing; both must be non-empty",
                    self.len(),
                    train.len(),
                    test.len()
                ),
            ));
        }
        train.shuffle(&mut rng);
        test.shuffle(&mut rng);
        Ok((self.select_unchecked(&train), self.select_unchecked(&test)))
    }

    /// Number of batches of (at most) `batch_size` samples.
    ///
    /// ```
    /// assert_eq!(modelfusion::nn::data::digits()?.num_batches(1000), 2);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn num_batches(&self, batch_size: usize) -> usize {
        self.len().div_ceil(batch_size.max(1))
    }

    /// Batch `index` of `batch_size` samples in order (the last may be shorter): features
    /// and labels. Errors on a zero batch size or an index out of range.
    ///
    /// ```
    /// let d = modelfusion::nn::data::digits()?;
    /// let (x, y) = d.batch(1, 1000)?;
    /// assert_eq!((x.nrows(), y.len()), (797, 797));
    /// assert!(d.batch(2, 1000).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn batch(
        &self,
        index: usize,
        batch_size: usize,
    ) -> Result<(ArrayView2<'_, f32>, &[usize])> {
        check_batch_size(batch_size)?;
        let nb = self.num_batches(batch_size);
        if index >= nb {
            return Err(Error::invalid(
                "batch",
                format!(
                    "batch {index} out of range: {} samples make {nb} batches of {batch_size}",
                    self.len()
                ),
            ));
        }
        let start = index * batch_size;
        let end = (start + batch_size).min(self.len());
        Ok((self.x.slice(s![start..end, ..]), &self.y[start..end]))
    }

    /// Every batch in order, as [`batch`](Dataset::batch) returns them.
    ///
    /// ```
    /// let d = modelfusion::nn::data::digits()?;
    /// let total: usize = d.batches(500)?.map(|(_, y)| y.len()).sum();
    /// assert_eq!(total, 1797);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn batches(
        &self,
        batch_size: usize,
    ) -> Result<impl Iterator<Item = (ArrayView2<'_, f32>, &[usize])>> {
        check_batch_size(batch_size)?;
        Ok(self
            .x
            .axis_chunks_iter(Axis(0), batch_size)
            .zip(self.y.chunks(batch_size)))
    }

    fn select_unchecked(&self, indices: &[usize]) -> Dataset {
        Dataset {
            x: self.x.select(Axis(0), indices),
            y: indices.iter().map(|&i| self.y[i]).collect(),
            num_classes: self.num_classes,
        }
    }
}

pub(crate) fn check_batch_size(batch_size: usize) -> Result<()> {
    if batch_size == 0 {
        Err(Error::invalid("batch_size", "must be positive, got 0"))
    } else {
        Ok(())
    }
}
