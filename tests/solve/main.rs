//! Integration tests: the `solve` group, one test binary (see tests/README.md).

mod solve_golden;
mod solve_lap;
mod solve_sinkhorn;
