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
    #[error("shape mismatch for {}: expected {expected:?}, got {got:?}", esc(.what))]
    ShapeMismatch {
        /// What was being compared, e.g. "parameter `fc1.weight` of model 2".
        what: String,
        /// The shape that was expected.
        expected: Vec<usize>,
        /// The shape that was found.
        got: Vec<usize>,
    },
    /// A named parameter (tensor) is absent where it is needed.
    #[error("parameter `{}` is missing from {}", esc(.name), esc(.context))]
    MissingParam {
        /// The parameter's name.
        name: String,
        /// Where it was looked for, e.g. "model 1" or "the permutation spec".
        context: String,
    },
    /// Two models do not hold the same set of parameter names.
    #[error("models have different parameters: {}", esc(.detail))]
    NameMismatch {
        /// Which names differ.
        detail: String,
    },
    /// A hyperparameter or argument is out of its allowed range.
    #[error("invalid value for `{}`: {}", esc(.param), esc(.reason))]
    InvalidParameter {
        /// The parameter's name as the caller knows it.
        param: String,
        /// What is wrong and what range is allowed.
        reason: String,
    },
    /// An input that must not be empty is empty.
    #[error("empty input: {}", esc(.what))]
    Empty {
        /// What was empty.
        what: String,
    },
    /// A NaN or infinity where finite numbers are required.
    #[error("non-finite value in {}", esc(.what))]
    NonFinite {
        /// Where it was found (tensor name and index where known).
        what: String,
    },
    /// A problem without a feasible solution (e.g. an assignment blocked by infinite costs).
    #[error("infeasible problem: {}", esc(.reason))]
    Infeasible {
        /// Why no solution exists.
        reason: String,
    },
    /// An index vector that is not a bijection, or of the wrong length.
    #[error("invalid permutation: {}", esc(.reason))]
    InvalidPermutation {
        /// What is wrong with it.
        reason: String,
    },
    /// A permutation spec that is inconsistent in itself or does not fit a model.
    #[error("invalid permutation spec: {}", esc(.reason))]
    Spec {
        /// What is wrong: names the parameter, axis, group and sizes.
        reason: String,
    },
    /// An iterative method stopped at its iteration cap when the caller required convergence.
    #[error("{} did not converge after {iterations} iterations (error {error:e})", esc(.method))]
    NotConverged {
        /// The method.
        method: String,
        /// Iterations run.
        iterations: usize,
        /// The last value of its stopping criterion.
        error: f64,
    },
    /// A file or stream that does not follow its format.
    #[error("malformed {format} data{}: {}", path_suffix(.path), esc(.reason))]
    Format {
        /// The format, e.g. "IDX" or "safetensors".
        format: &'static str,
        /// The file, when there is one.
        path: Option<PathBuf>,
        /// What is wrong with it.
        reason: String,
    },
    /// An I/O error, with the path it happened on.
    #[error("I/O error on {}: {}", esc_path(.path), esc(&.source.to_string()))]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An I/O error without a path, from `?` on a [`std::io::Error`] (the crate's own
    /// file operations report [`Error::Io`], naming the path).
    ///
    /// ```
    /// fn read_config(path: &str) -> modelfusion::Result<String> {
    ///     let bytes = std::fs::read(path)?; // std::io::Error -> Error::IoUnnamed
    ///     Ok(String::from_utf8_lossy(&bytes).into_owned())
    /// }
    /// let e = read_config("/nonexistent/modelfusion.yaml").unwrap_err();
    /// assert!(matches!(e, modelfusion::Error::IoUnnamed(_)));
    /// assert!(e.to_string().starts_with("I/O error: "), "{e}");
    /// ```
    #[error("I/O error: {}", esc(&.0.to_string()))]
    IoUnnamed(#[from] std::io::Error),
    /// Valid input that modelfusion does not support (e.g. a packed sub-byte dtype).
    #[error("unsupported: {what}: {reason}")]
    Unsupported {
        /// What was found.
        what: String,
        /// Why it is not supported, and what is.
        reason: String,
    },
    /// A user-supplied objective, gradient or activation source failed.
    #[error("objective failed: {}", esc(.0))]
    Objective(String),
    /// An [`Observer`](crate::progress::Observer) stopped the computation.
    #[error("cancelled by the progress observer: {}", esc(.what))]
    Cancelled {
        /// What was stopped, and what was left behind (e.g. nothing written).
        what: String,
    },
    /// A feature the call needs is not compiled in.
    #[error("feature `{feature}` is required for {}", esc(.what))]
    FeatureDisabled {
        /// The cargo feature to enable.
        feature: &'static str,
        /// What needed it.
        what: String,
    },
}

/// Displays a name, path or reason with its control characters escaped, so that a
/// hostile tensor or file name cannot inject terminal escape sequences (or a NUL) into
/// a message: C0/C1 controls and DEL print as `\0`, `\t`, `\n`, `\r` or `\u{XX}`, and
/// the Unicode bidirectional overrides (U+202A..U+202E, U+2066..U+2069) as `\u{XXXX}`.
/// Everything else, including other non-ASCII text, prints as it is.
///
/// ```
/// use modelfusion::error::Escaped;
/// assert_eq!(Escaped("a\x1b[31mb\0").to_string(), "a\\u{1b}[31mb\\0");
/// assert_eq!(Escaped("layers.0.weight").to_string(), "layers.0.weight");
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Escaped<'a>(pub &'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(needs_escape) {
            f.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or('?');
            match c {
                '\0' => f.write_str("\\0")?,
                '\t' => f.write_str("\\t")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                c => write!(f, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

fn esc(s: &str) -> Escaped<'_> {
    Escaped(s)
}

fn esc_path(p: &std::path::Path) -> String {
    Escaped(&p.to_string_lossy()).to_string()
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" in {}", esc_path(p)),
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

/// Errors naming `name` unless `x` is finite.
pub(crate) fn check_finite(name: &str, x: f64) -> Result<()> {
    if x.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(name, format!("must be finite, got {x}")))
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

/// An [`Error`] for `main` to return: its `Debug` form (what Rust prints when `main`
/// returns `Err`) is the error's `Display` message followed by its chain of causes, as
/// `anyhow` prints, instead of the derived `Debug` of the enum. `?` converts anything
/// that converts into an [`Error`] (a [`std::io::Error`] included).
///
/// A cause whose message the level above already shows in full (as [`Error::Io`] shows
/// its `std::io::Error`) is not repeated. `{:#?}` prints the derived `Debug` of the
/// error, for debugging.
///
/// ```
/// use modelfusion::{Report, Tensor};
///
/// fn main() -> Result<(), Report> {
///     let dir = std::env::current_dir()?; // a std::io::Error converts
///     let w = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 3]));
///     let rows = w.as_matrix()?.nrows(); // so does a modelfusion::Error
///     println!("{rows} rows, in {}", dir.display());
///     Ok(())
/// }
/// ```
///
/// What `main` prints for an `Err`:
///
/// ```
/// use modelfusion::{Error, Report};
/// use std::io::{Error as IoError, ErrorKind};
///
/// let e = Report::from(Error::invalid("density", "must be in [0, 1], got 1.5"));
/// assert_eq!(format!("{e:?}"), "invalid value for `density`: must be in [0, 1], got 1.5");
/// let e = Report::from(Error::Io { path: "a.safetensors".into(), source: IoError::from(ErrorKind::NotFound) });
/// assert_eq!(format!("{e:?}"), "I/O error on a.safetensors: entity not found"); // the cause once
/// assert!(format!("{e:#?}").starts_with("Io {"));
/// ```
pub struct Report(Error);

impl Report {
    /// The error inside.
    ///
    /// ```
    /// let r = modelfusion::Report::from(modelfusion::Error::empty("models"));
    /// assert!(matches!(r.error(), modelfusion::Error::Empty { .. }));
    /// ```
    pub fn error(&self) -> &Error {
        &self.0
    }

    /// Unwraps the error, e.g. to match on it.
    ///
    /// ```
    /// let r = modelfusion::Report::from(modelfusion::Error::empty("models"));
    /// assert_eq!(r.into_error().to_string(), "empty input: models");
    /// ```
    pub fn into_error(self) -> Error {
        self.0
    }
}

impl<E: Into<Error>> From<E> for Report {
    fn from(e: E) -> Self {
        Report(e.into())
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if f.alternate() {
            return std::fmt::Debug::fmt(&self.0, f);
        }
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut causes = Vec::new();
        let mut next = std::error::Error::source(&self.0);
        while let Some(cause) = next {
            let text = esc(&cause.to_string()).to_string();
            if !shown.contains(&text) {
                causes.push(text.clone());
            }
            shown = text;
            next = cause.source();
        }
        match causes.as_slice() {
            [] => Ok(()),
            [one] => write!(f, "\n\nCaused by:\n    {one}"),
            many => {
                f.write_str("\n\nCaused by:")?;
                for (i, c) in many.iter().enumerate() {
                    write!(f, "\n    {i}: {c}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_in_every_message() {
        let hostile = "w\x1b[31mred\0nul\u{202e}";
        let errors = [
            Error::shape(hostile, &[1], &[2]),
            Error::MissingParam {
                name: hostile.into(),
                context: hostile.into(),
            },
            Error::invalid(hostile, hostile),
            Error::NonFinite {
                what: hostile.into(),
            },
            Error::Format {
                format: "safetensors",
                path: Some(PathBuf::from(hostile)),
                reason: hostile.into(),
            },
            Error::Io {
                path: PathBuf::from(hostile),
                source: std::io::Error::other(hostile),
            },
            Error::IoUnnamed(std::io::Error::other(hostile)),
            Error::Objective(hostile.into()),
        ];
        for e in errors {
            let s = e.to_string();
            let report = format!("{:?}", Report::from(e));
            for s in [s, report] {
                assert!(
                    !s.contains('\x1b') && !s.contains('\0') && !s.contains('\u{202e}'),
                    "{s:?}"
                );
                assert!(s.contains("w\\u{1b}[31mred\\0nul\\u{202e}"), "{s}");
            }
        }
    }
}
