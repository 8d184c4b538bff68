//! Function preservation on real candle code: the ready and inferred specs permute
//! candle-nn networks (a CIFAR ResNet, a VGG, an `nn.Sequential`-named MLP) without
//! changing their outputs (1e-5 relative, f32).
#![cfg(feature = "candle")]

use crate::candle_common;

use candle_common::{Layout, digit_images, relative_error};
use modelfusion::candle::candle_core::{DType, Device, Module, Tensor};
use modelfusion::candle::candle_nn::{self, VarBuilder, VarMap};
use modelfusion::candle::{CandleNet, CandleResNet, CandleVgg, to_state_dict_from_varmap};
use modelfusion::perm::infer::infer_model_spec;
use modelfusion::perm::specs::{Architecture, ResNet, Vgg};
use modelfusion::perm::{PermutationSet, PermutationSpec};
use modelfusion::{Model, StateDictF32};

/// Random parameters for the layout a candle builder creates, under `spec`.
fn random_params<N>(
    build: impl Fn(VarBuilder<'static>) -> modelfusion::candle::candle_core::Result<N>,
    spec: &PermutationSpec,
    seed: u64,
) -> StateDictF32 {
    let vm = VarMap::new();
    build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let sd: StateDictF32 = to_state_dict_from_varmap(&vm).unwrap();
    let layout = Layout {
        spec: spec.clone(),
        shapes: sd
            .iter()
            .map(|(n, t)| (n.to_string(), t.shape().to_vec()))
            .collect(),
    };
    layout.random_model(seed)
}

/// Permutes `params` through `spec` with three random permutation sets and checks the
/// candle model's outputs on `x` do not move.
fn assert_preserved<N>(
    build: impl Fn(VarBuilder<'static>) -> modelfusion::candle::candle_core::Result<N> + Clone,
    forward: impl Fn(&N, &Tensor) -> modelfusion::candle::candle_core::Result<Tensor>,
    spec: &PermutationSpec,
    params: &StateDictF32,
    x: &Tensor,
) {
    let report = spec.check(params).unwrap();
    assert!(report.is_sound(), "{report:?}");
    let net = CandleNet::new(build);
    let y = forward(&net.build(params).unwrap(), x).unwrap();
    for seed in 0..3 {
        let perms = PermutationSet::random(spec, params, seed).unwrap();
        let moved = spec.apply(&perms, params).unwrap();
        assert!(moved.max_abs_diff(params).unwrap() > 0.0);
        let y2 = forward(&net.build(&moved).unwrap(), x).unwrap();
        let err = relative_error(&y, &y2);
        assert!(err < 1e-5, "seed {seed}: relative error {err}");
    }
}

#[test]
fn ready_and_inferred_resnet_specs_keep_a_candle_resnet() {
    let arch = ResNet::new(1, &[(6, 2), (8, 2), (10, 1)], 10).unwrap();
    let params = arch.random_model(5);
    let inferred = infer_model_spec(&params, None).unwrap();
    assert_eq!(inferred.spec, arch.spec(), "{}", inferred.reason);
    let x = &digit_images(16, 16)[0];
    let build = move |vb: VarBuilder<'static>| CandleResNet::new(&arch, vb);
    // In evaluation mode (running statistics) and in training mode (batch statistics).
    for train in [false, true] {
        assert_preserved(
            build.clone(),
            move |n: &CandleResNet, x| n.forward_t(x, train),
            &inferred.spec,
            &params,
            x,
        );
    }
}

#[test]
fn ready_and_inferred_vgg_specs_keep_a_candle_vgg() {
    let arch = Vgg::new(1, &[6, 8, 8, 12], &[16, 10], 3).unwrap();
    let params = arch.random_model(2);
    let inferred = infer_model_spec(&params, None).unwrap();
    assert_eq!(inferred.spec, arch.spec(), "{}", inferred.reason);
    let x = &digit_images(16, 16)[0];
    let build = move |vb: VarBuilder<'static>| CandleVgg::new(&arch, &[0, 2], vb);
    assert_preserved(
        build,
        |n: &CandleVgg, x| n.forward_t(x, false),
        &inferred.spec,
        &params,
        x,
    );
}

#[test]
fn inferred_spec_keeps_a_candle_nn_sequential_mlp() {
    // nn.Sequential(Linear, ReLU, Linear, ReLU, Linear) with PyTorch's names 0, 2, 4.
    let build = |vb: VarBuilder<'static>| {
        Ok(candle_nn::seq()
            .add(candle_nn::linear(64, 20, vb.pp(0))?)
            .add(candle_nn::Activation::Relu)
            .add(candle_nn::linear(20, 12, vb.pp(2))?)
            .add(candle_nn::Activation::Relu)
            .add(candle_nn::linear(12, 10, vb.pp(4))?))
    };
    let vm = VarMap::new();
    build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let sd: StateDictF32 = to_state_dict_from_varmap(&vm).unwrap();
    let inferred = infer_model_spec(&sd, None).unwrap();
    assert_eq!(inferred.family, "sequential-mlp");
    let params = random_params(build, &inferred.spec, 1);
    let x = digit_images(20, 20)[0].reshape((20, 64)).unwrap();
    assert_preserved(
        build,
        |n: &candle_nn::Sequential, x| n.forward(x),
        &inferred.spec,
        &params,
        &x,
    );
}
