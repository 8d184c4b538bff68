//! Integration tests: the `align` group, one test binary (see tests/README.md).

#[path = "../common/mod.rs"]
mod common;
#[path = "../repair_common/mod.rs"]
mod repair_common;

mod align_golden;
mod align_information;
mod align_nn;
mod align_out_of_core;
mod align_props;
mod align_ste;
mod align_zipit;
mod api_ergonomics;
mod perm;
mod pipeline;
mod repair_streams;
mod spec_infer;
mod transformers;
