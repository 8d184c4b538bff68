//! Assignment and transport solvers: the numeric core of alignment.
//!
//! Nothing here knows about models; everything takes dense `ndarray` matrices of `f32`
//! or `f64`.
//!
//! | function | problem |
//! |---|---|
//! | [`linear_sum_assignment`] | min (or max) cost matching of rows to columns, rectangular allowed (scipy's contract) |
//! | [`linear_sum_assignment_batch`] | many independent assignment problems (e.g. attention heads) in parallel |
//! | [`exact_ot_uniform`] | exact optimal transport between equal uniform histograms (a permutation / n) |
//! | [`sinkhorn`], [`Sinkhorn`] | entropic optimal transport, balanced, log-domain stabilised |
//! | [`sinkhorn_unbalanced`] | entropic transport with KL-relaxed marginals (`reg_m`) |
//! | [`sinkhorn_operator`] | soft permutation from a score matrix with temperature `tau` |
//!
//! # Linear assignment
//! A Jonker–Volgenant solver. With `n` rows and `m >= n` columns (a wider problem is
//! transposed first):
//! 1. *Column reduction* (square problems): `v_j = min_i c_ij`, each column offered to
//!    its cheapest row; *reduction transfer* gives each singly-assigned row the slack
//!    to its second-best column.
//! 2. *Augmenting row reduction*, two passes: every free row takes the column of its
//!    smallest reduced cost `c_ij - v_j`, lowering that column's dual to the gap to the
//!    second smallest and displacing its previous row (a bounded auction step; the
//!    total work per pass is capped, so it cannot cycle).
//! 3. *Shortest augmenting paths* for the rows still free: Dijkstra over columns on
//!    reduced costs, then a dual update of the settled columns and an augmentation.
//!    Unlike the classical list-based implementation, every relaxation scans the
//!    whole cost row (settled columns carry a dual of `-inf` so they never improve):
//!    the scan reads the row contiguously, is branch-free and is auto-vectorised, and
//!    it also tracks the nearest *free* column, so a search stops as soon as one is at
//!    the current distance. Distances and predecessors are double-buffered so that the
//!    compiler emits plain vector stores.
//!
//! The hot loops are compiled twice, for the portable baseline and for AVX2 + FMA,
//! picked at run time (`MODELFUSION_SIMD=portable` forces the baseline). `f32`
//! matrices are solved in `f32` (half the memory traffic). Square `f64` matrices of
//! size 1024 and up are first solved rounded to `f32`; that assignment and its duals
//! then warm-start the `f64` solve, which keeps every row whose column minimises its
//! exact reduced cost and re-augments the others, so the answer is exactly optimal
//! for the `f64` matrix while most memory traffic was at half width. Integer-valued
//! costs are solved exactly in both types. Maximising negates the costs inside the
//! kernel (a compile-time flag), so a row-major input is never copied. Forbidden pairs
//! are `+inf` (`-inf` when maximising); a problem they make infeasible is reported,
//! never looped on.
//!
//! # Sinkhorn
//! The plan is `P_ij = exp((f_i + g_j - M_ij) / reg)`. Iterating on `f`, `g` with
//! log-sum-exp costs an `exp` per entry per half-iteration; instead the potentials are
//! absorbed into a kernel `K_ij = exp((f_i + g_j - M_ij) / reg)` and the iterations
//! update scalings `u = a / (K v)`, `v = b / (K^T u)` (balanced; powers
//! `reg_m / (reg_m + reg)` of them when unbalanced), which is the same iteration in
//! another basis. Both half-iterations share one pass over `K`: each row gives
//! `(K v)_i`, hence `u_i`, and is immediately accumulated into `K^T u`. When a scaling
//! leaves `[1e-30, 1e30]` it is absorbed into the potentials and the kernel rebuilt
//! (with a vectorised `exp`); when a row or column underflows (tiny `reg`, poor start)
//! the solver makes an exact log-domain iteration instead, so it is stable for `reg`
//! down to `1e-3` and below on costs in `[0, 1]`. Epsilon scaling (optional) solves a
//! sequence of decreasing regularisers, warm-starting each from the last.
//!
//! The balanced stopping rule is the L1 marginal violation `sum_i |P 1 - a|_i` (the
//! column marginals are exact after each iteration), measured for free inside the next
//! pass; the reported `error` is `|P 1 - a|_1 + |P^T 1 - b|_1` of the returned plan.
//! Rows are processed in blocks fixed by the shape, in parallel with rayon for large
//! problems, and the per-block partial sums are combined in block order: results are
//! bit-identical for any number of threads.
//!
//! ```
//! use modelfusion::solve::{linear_sum_assignment, sinkhorn};
//! use ndarray::array;
//!
//! let cost = array![[0.0f64, 1.0], [1.0, 0.0]];
//! assert_eq!(linear_sum_assignment(cost.view(), false)?.cols, vec![0, 1]);
//!
//! let ot = sinkhorn(array![0.5, 0.5].view(), array![0.5, 0.5].view(), cost.view(), 0.01)?;
//! assert!((ot.plan[[0, 0]] - 0.5).abs() < 1e-9);
//! # Ok::<(), modelfusion::Error>(())
//! ```

mod fastexp;
mod lap;
pub(crate) mod simd;
mod sinkhorn;

pub use lap::{
    Assignment, ExactOt, exact_ot_uniform, linear_sum_assignment, linear_sum_assignment_batch,
};
pub use sinkhorn::{
    REG_REL_FLOOR, Sinkhorn, SinkhornBuilder, TransportPlan, sinkhorn, sinkhorn_operator,
    sinkhorn_unbalanced,
};
