//! Integration tests: the `merge` group, one test binary (see tests/README.md).

mod config_modules;
mod config_run;
mod config_slices;
mod config_slow_tokenizers;
mod config_vocab;
mod golden_json;
mod merge_chunked;
mod merge_errors;
mod merge_golden;
mod merge_learned;
mod merge_properties;
mod merge_robust_soup;
mod merge_svd;
mod merge_training;
mod mergekit_examples;
mod mergekit_golden;
mod mergekit_methods;
