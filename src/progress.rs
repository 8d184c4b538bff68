//! Progress of long computations, reported to one shared [`Observer`] trait.
//!
//! Streaming merges and permuted copies report each tensor written
//! ([`Progress::Tensor`]), weight matching each sweep ([`Progress::Sweep`]) and each
//! group visited in it ([`Progress::Group`]), activation
//! statistics each batch ([`Progress::Batch`]), curve fitting each step
//! ([`Progress::Step`]), and a merge config run its stages
//! ([`Progress::Stage`]). Pass [`Silent`] to ignore them, a closure wrapped by
//! [`from_fn`], or a type of your own implementing [`Observer`] (by value, or `&mut`
//! to keep what it collected). Returning [`ControlFlow::Break`] stops the computation:
//! a stopped fit returns what it has, a stopped streaming write returns
//! [`Error::Cancelled`](crate::Error::Cancelled) and leaves no partial output.
//!
//! ```
//! use std::ops::ControlFlow;
//! use modelfusion::progress::{from_fn, Observer, Progress};
//!
//! // A closure that only looks.
//! let mut tensors = 0;
//! let mut count = from_fn(|p| {
//!     if let Progress::Tensor { .. } = p {
//!         tensors += 1;
//!     }
//! });
//! let report = Progress::Tensor { index: 0, total: 1, name: "w", bytes_done: 4, bytes_total: 4 };
//! assert!(count.observe(&report).is_continue());
//! drop(count);
//! assert_eq!(tensors, 1);
//!
//! // A closure that stops fitting after ten steps.
//! let mut stop = from_fn(|p| match p {
//!     Progress::Step { step, .. } if *step + 1 >= 10 => ControlFlow::Break(()),
//!     _ => ControlFlow::Continue(()),
//! });
//! assert!(stop.observe(&Progress::Step { step: 9, total: 100, t: 0.5, loss: 1.0 }).is_break());
//! ```

use std::ops::ControlFlow;

/// One report of a long computation's progress.
///
/// ```
/// use modelfusion::progress::Progress;
/// let p = Progress::Tensor { index: 0, total: 2, name: "w", bytes_done: 8, bytes_total: 16 };
/// assert_eq!(p.fraction(), Some(0.5));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Progress<'a> {
    /// A streamed checkpoint write (merge or permuted copy) finished a tensor.
    Tensor {
        /// Index of the tensor just written (0-based).
        index: usize,
        /// Tensors in all.
        total: usize,
        /// Its name.
        name: &'a str,
        /// Output bytes written so far.
        bytes_done: u64,
        /// Output bytes in all.
        bytes_total: u64,
    },
    /// Weight matching finished a sweep over every group.
    Sweep {
        /// The starting point (0: the identity, then the random restarts).
        start: usize,
        /// The sweep within this start, from 0.
        sweep: usize,
        /// The objective (sum of inner products over the spec) after the sweep.
        objective: f64,
        /// Groups whose permutation changed in this sweep.
        changed: usize,
    },
    /// Weight matching visited a group within a sweep (solved its assignment, or skipped
    /// it because nothing its cost depends on changed since its last visit).
    Group {
        /// The starting point (0: the identity, then the random restarts).
        start: usize,
        /// The sweep within this start, from 0.
        sweep: usize,
        /// The visit within the sweep (0-based).
        index: usize,
        /// Groups visited per sweep.
        total: usize,
        /// The group's name.
        name: &'a str,
        /// Its units (the assignment's size).
        units: usize,
        /// Whether its assignment was solved (`false`: skipped, nothing changed).
        solved: bool,
    },
    /// Activation statistics took in a batch (activation matching, OT fusion on
    /// activations).
    Batch {
        /// Batches done.
        done: usize,
        /// Batches in all.
        total: usize,
    },
    /// Curve fitting took a step.
    Step {
        /// The step, from 0.
        step: usize,
        /// Steps planned.
        total: usize,
        /// The position on the curve drawn for this step.
        t: f64,
        /// The objective's loss there.
        loss: f64,
    },
    /// A multi-stage run (a merge config) starts a stage.
    Stage {
        /// Index of the stage (0-based).
        index: usize,
        /// Stages in all.
        total: usize,
        /// What it does, e.g. `aligning models[1] to the base`.
        what: &'a str,
    },
}

impl Progress<'_> {
    /// The fraction done where the report says (tensor bytes, fitting steps, stages, the
    /// groups of a weight-matching sweep); `None` for a weight-matching sweep, whose
    /// count is not known in advance.
    ///
    /// ```
    /// use modelfusion::progress::Progress;
    /// assert_eq!(Progress::Step { step: 9, total: 10, t: 0.1, loss: 0.0 }.fraction(), Some(1.0));
    /// let g = Progress::Group { start: 0, sweep: 2, index: 0, total: 4, name: "mlp.0", units: 5632, solved: true };
    /// assert_eq!(g.fraction(), Some(0.25));
    /// assert_eq!(Progress::Sweep { start: 0, sweep: 3, objective: 1.0, changed: 2 }.fraction(), None);
    /// ```
    pub fn fraction(&self) -> Option<f64> {
        let ratio = |done: f64, total: f64| Some(if total > 0.0 { done / total } else { 1.0 });
        match *self {
            Progress::Tensor {
                bytes_done,
                bytes_total,
                ..
            } => ratio(bytes_done as f64, bytes_total as f64),
            Progress::Step { step, total, .. } => ratio((step + 1) as f64, total as f64),
            Progress::Stage { index, total, .. } => ratio(index as f64, total as f64),
            Progress::Batch { done, total } => ratio(done as f64, total as f64),
            Progress::Group { index, total, .. } => ratio((index + 1) as f64, total as f64),
            Progress::Sweep { .. } => None,
        }
    }
}

/// What a long computation reports to: [`Silent`], a closure through [`from_fn`], or a
/// type of your own (passed by value or as `&mut`).
///
/// ```
/// use std::ops::ControlFlow;
/// use modelfusion::progress::{Observer, Progress};
/// struct Count(usize);
/// impl Observer for Count {
///     fn observe(&mut self, _: &Progress<'_>) -> ControlFlow<()> {
///         self.0 += 1;
///         ControlFlow::Continue(())
///     }
/// }
/// fn run(mut o: impl Observer) {
///     let _ = o.observe(&Progress::Stage { index: 0, total: 1, what: "x" });
/// }
/// let mut count = Count(0);
/// run(&mut count);
/// run(&mut count);
/// assert_eq!(count.0, 2);
/// ```
pub trait Observer {
    /// Sees one report; [`ControlFlow::Break`] asks the computation to stop.
    fn observe(&mut self, progress: &Progress<'_>) -> ControlFlow<()>;
}

impl<O: Observer + ?Sized> Observer for &mut O {
    fn observe(&mut self, progress: &Progress<'_>) -> ControlFlow<()> {
        (**self).observe(progress)
    }
}

/// The observer that ignores every report.
///
/// ```
/// use modelfusion::progress::{Observer, Progress, Silent};
/// assert!(Silent.observe(&Progress::Sweep { start: 0, sweep: 0, objective: 0.0, changed: 0 }).is_continue());
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

impl Observer for Silent {
    fn observe(&mut self, _: &Progress<'_>) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// What an observing closure returns: `()` (never stop) or a [`ControlFlow`].
pub trait Flow {
    /// As a [`ControlFlow`].
    fn into_flow(self) -> ControlFlow<()>;
}

impl Flow for () {
    fn into_flow(self) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

impl Flow for ControlFlow<()> {
    fn into_flow(self) -> ControlFlow<()> {
        self
    }
}

/// An observer calling `f` on every report; `f` returns `()`, or a [`ControlFlow`] to
/// be able to stop the computation.
///
/// ```
/// use modelfusion::progress::{from_fn, Observer, Progress};
/// let mut last = None;
/// let mut o = from_fn(|p| last = p.fraction());
/// let _ = o.observe(&Progress::Stage { index: 1, total: 2, what: "merging" });
/// drop(o);
/// assert_eq!(last, Some(0.5));
/// ```
pub fn from_fn<F, R>(f: F) -> FromFn<F>
where
    F: FnMut(&Progress<'_>) -> R,
    R: Flow,
{
    FromFn(f)
}

/// The observer [`from_fn`] makes.
#[derive(Clone, Copy, Debug)]
pub struct FromFn<F>(F);

impl<F, R> Observer for FromFn<F>
where
    F: FnMut(&Progress<'_>) -> R,
    R: Flow,
{
    fn observe(&mut self, progress: &Progress<'_>) -> ControlFlow<()> {
        (self.0)(progress).into_flow()
    }
}
