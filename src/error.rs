//! The crate's single error type.
//!
//! Every fallible operation in modelfusion returns [`Result`]. Variants name the
//! parameter, tensor or axis involved and the sizes that disagreed, so that an error
//! message alone tells the caller what to fix.

use std::path::PathBuf;

/// Everything that can go wrong in modelfusion.
///
/// ```
/// use modelfusion::Error;
/// let e = Error::ShapeMismatch {
///     what: "parameter `fc1.weight`".into(),
///     expected: vec![4, 3],
///     got: vec![4, 2],
/// };
/// assert!(e.to_string().contains("fc1.weight"));
/// assert!(e.to_string().contains("[4, 3]"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two tensors (or a tensor and what a spec or method expects) have different shapes.
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// What was being compared, e.g. "parameter `fc1.weight` of model 2".
        what: String,
        /// The shape that was expected.
        expected: Vec<usize>,
        /// The shape that was found.
        got: Vec<usize>,
    },
    /// A named parameter (tensor) is absent where it is needed.
    #[error("parameter `{name}` is missing from {context}")]
    MissingParam {
        /// The parameter's name.
        name: String,
        /// Where it was looked for, e.g. "model 1" or "the permutation spec".
        context: String,
    },
    /// Two models do not hold the same set of parameter names.
    #[error("models have different parameters: {detail}")]
    NameMismatch {
        /// Which names differ.
        detail: String,
    },
    /// A hyperparameter or argument is out of its allowed range.
    #[error("invalid value for `{param}`: {reason}")]
    InvalidParameter {
        /// The parameter's name as the caller knows it.
        param: String,
        /// What is wrong and what range is allowed.
        reason: String,
    },
    /// An input that must not be empty is empty.
    #[error("empty input: {what}")]
    Empty {
        /// What was empty.
        what: String,
    },
    /// A NaN or infinity where finite numbers are required.
    #[error("non-finite value in {what}")]
    NonFinite {
        /// Where it was found (tensor name and index where known).
        what: String,
    },
    /// A problem without a feasible solution (e.g. an assignment blocked by infinite costs).
    #[error("infeasible problem: {reason}")]
    Infeasible {
        /// Why no solution exists.
        reason: String,
    },
    /// An index vector that is not a bijection, or of the wrong length.
    #[error("invalid permutation: {reason}")]
    InvalidPermutation {
        /// What is wrong with it.
        reason: String,
    },
    /// A permutation spec that is inconsistent in itself or does not fit a model.
    #[error("invalid permutation spec: {reason}")]
    Spec {
        /// What is wrong: names the parameter, axis, group and sizes.
        reason: String,
    },
    /// An iterative method stopped at its iteration cap when the caller required convergence.
    #[error("{method} did not converge after {iterations} iterations (error {error:e})")]
    NotConverged {
        /// The method.
        method: String,
        /// Iterations run.
        iterations: usize,
        /// The last value of its stopping criterion.
        error: f64,
    },
    /// A file or stream that does not follow its format.
    #[error("malformed {format} data{}: {reason}", path_suffix(.path))]
    Format {
        /// The format, e.g. "IDX" or "safetensors".
        format: &'static str,
        /// The file, when there is one.
        path: Option<PathBuf>,
        /// What is wrong with it.
        reason: String,
    },
    /// An I/O error, with the path it happened on.
    #[error("I/O error on {}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Valid input that modelfusion does not support (e.g. a packed sub-byte dtype).
    #[error("unsupported: {what}: {reason}")]
    Unsupported {
        /// What was found.
        what: String,
        /// Why it is not supported, and what is.
        reason: String,
    },
    /// A user-supplied objective, gradient or activation source failed.
    #[error("objective failed: {0}")]
    Objective(String),
    /// A feature the call needs is not compiled in.
    #[error("feature `{feature}` is required for {what}")]
    FeatureDisabled {
        /// The cargo feature to enable.
        feature: &'static str,
        /// What needed it.
        what: String,
    },
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" in {}", p.display()),
        None => String::new(),
    }
}

/// Errors naming `name` unless `x` is finite and `> 0`.
pub(crate) fn check_positive(name: &str, x: f64) -> Result<()> {
    if x.is_finite() && x > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            name,
            format!("must be finite and > 0, got {x}"),
        ))
    }
}

/// Errors naming `name` unless `x` is finite and `>= 0`.
pub(crate) fn check_nonnegative(name: &str, x: f64) -> Result<()> {
    if x.is_finite() && x >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            name,
            format!("must be finite and >= 0, got {x}"),
        ))
    }
}

/// Errors naming `name` unless `x` is in `[0, 1]`.
pub(crate) fn check_fraction(name: &str, x: f64) -> Result<()> {
    if (0.0..=1.0).contains(&x) {
        Ok(())
    } else {
        Err(Error::invalid(name, format!("must be in [0, 1], got {x}")))
    }
}

/// Errors naming `name` unless `x` is in `[0, 1)`.
pub(crate) fn check_unit(name: &str, x: f64) -> Result<()> {
    if (0.0..1.0).contains(&x) {
        Ok(())
    } else {
        Err(Error::invalid(name, format!("must be in [0, 1), got {x}")))
    }
}

impl Error {
    /// Shorthand for [`Error::InvalidParameter`].
    ///
    /// ```
    /// let e = modelfusion::Error::invalid("density", "must be in (0, 1], got 1.5");
    /// assert_eq!(e.to_string(), "invalid value for `density`: must be in (0, 1], got 1.5");
    /// ```
    pub fn invalid(param: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidParameter {
            param: param.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Empty`].
    ///
    /// ```
    /// let e = modelfusion::Error::empty("the list of models");
    /// assert_eq!(e.to_string(), "empty input: the list of models");
    /// ```
    pub fn empty(what: impl Into<String>) -> Self {
        Error::Empty { what: what.into() }
    }

    /// Shorthand for [`Error::ShapeMismatch`].
    ///
    /// ```
    /// let e = modelfusion::Error::shape("cost matrix", &[2, 2], &[2, 3]);
    /// assert!(e.to_string().contains("[2, 3]"));
    /// ```
    pub fn shape(what: impl Into<String>, expected: &[usize], got: &[usize]) -> Self {
        Error::ShapeMismatch {
            what: what.into(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        }
    }
}

/// The result type of every fallible modelfusion call.
pub type Result<T, E = Error> = std::result::Result<T, E>;
