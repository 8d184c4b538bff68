//! Integration tests: the `nn` group, one test binary (see tests/README.md).

#[cfg(feature = "nn")]
#[path = "../nn_common/mod.rs"]
mod nn_common;
#[path = "../path_common/mod.rs"]
mod path_common;

mod barrier_props;
mod doc_numbers;
mod nn_attack;
mod nn_data;
mod nn_golden;
mod nn_networks;
mod nn_perm;
mod nn_train;
mod path_bn;
mod path_digits;
mod path_fit;
mod path_plane;
mod path_props;
