//! Integration tests: the `candle` group, one test binary (see tests/README.md).

#[cfg(feature = "candle")]
#[path = "../candle_common/mod.rs"]
mod candle_common;
#[path = "../repair_common/mod.rs"]
mod repair_common;

mod candle_adapters;
mod candle_decoder;
mod candle_repair;
mod candle_specs;
mod candle_transformers;
