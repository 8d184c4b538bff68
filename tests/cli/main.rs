//! Integration tests: the `cli` group, one test binary (see tests/README.md).

#[cfg(feature = "safetensors")]
#[path = "../io_common/mod.rs"]
mod io_common;

mod cli_align;
mod cli_hostile;
mod cli_merge;
mod crash_safety;
