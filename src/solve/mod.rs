//! Assignment and transport solvers (placeholder doc, expanded below).

mod lap;
pub(crate) mod simd;

pub use lap::{Assignment, ExactOt, exact_ot_uniform, linear_sum_assignment};
