//! Integration tests: the `io` group, one test binary (see tests/README.md).

#[cfg(feature = "safetensors")]
#[path = "../io_common/mod.rs"]
mod io_common;

mod hostile_inputs;
mod io_errors;
mod io_fuzz;
mod io_golden;
mod io_nonfloat;
mod io_roundtrip;
mod io_stream;
mod outside_evaluators;
