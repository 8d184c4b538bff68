//! Out-of-core weight matching (`WeightMatching::align_checkpoints`): the same results
//! as in memory, read from sharded BF16/F16 checkpoints, and a planted permutation of a
//! small Llama-like model recovered and undone by a streamed write.

use modelfusion::align::{Aligner, Alignment, WeightMatching};
use modelfusion::io::{Checkpoint, Dtype, SaveOptions, load, save, write_permuted};
use modelfusion::perm::specs::{Architecture, MlpShapes, ResNet, Vgg};
use modelfusion::perm::{PermutationSet, PermutationSpec};
use modelfusion::progress::{Progress, Silent, from_fn};
use modelfusion::{Model, StateDict, StateDictF32};
use ndarray::ArrayD;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Saves `a` and `b` (sharded, `dtype`) under `dir` and returns the checkpoints and the
/// models as loaded back in `f32`.
fn saved(
    dir: &std::path::Path,
    a: &StateDictF32,
    b: &StateDictF32,
    dtype: Dtype,
) -> (Checkpoint, Checkpoint, StateDictF32, StateDictF32) {
    // About three shards.
    let elems: usize = a.names().map(|n| a.get(n).unwrap().len()).sum();
    let opts = SaveOptions::new(dtype).with_max_shard_size((elems * dtype.size() / 3) as u64);
    save(a, dir.join("a"), &opts).unwrap();
    save(b, dir.join("b"), &opts).unwrap();
    let (ca, cb) = (
        Checkpoint::open(dir.join("a")).unwrap(),
        Checkpoint::open(dir.join("b")).unwrap(),
    );
    assert!(
        ca.files().count() >= 3,
        "the test wants a sharded checkpoint"
    );
    (
        ca,
        cb,
        load(dir.join("a")).unwrap(),
        load(dir.join("b")).unwrap(),
    )
}

/// Permutations and statistics (objective per sweep, sweeps, visiting order) agree
/// exactly.
fn assert_same(x: &Alignment, y: &Alignment, what: &str) {
    assert_eq!(x.permutations(), y.permutations(), "{what}: permutations");
    assert_eq!(x.stats(), y.stats(), "{what}: statistics");
}

#[test]
fn checkpoints_give_the_in_memory_results_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let vgg = Vgg::new(3, &[8, 16, 16], &[12, 5], 3).unwrap();
    let resnet = ResNet::resnet20(1, 10);
    let mlp = MlpShapes::new(&[20, 48, 48, 48, 7]).unwrap();
    let cases: Vec<(&str, PermutationSpec, StateDictF32, StateDictF32, Dtype)> = vec![
        (
            "vgg bf16",
            vgg.spec(),
            vgg.random_model(0),
            vgg.random_model(1),
            Dtype::BF16,
        ),
        (
            "resnet f16",
            resnet.spec(),
            resnet.random_model(2),
            resnet.random_model(3),
            Dtype::F16,
        ),
        (
            "mlp f32",
            mlp.spec(),
            mlp.random_model(4),
            mlp.random_model(5),
            Dtype::F32,
        ),
    ];
    for (k, (name, spec, a, b, dtype)) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(k.to_string());
        let (ca, cb, la, lb) = saved(&dir, &a, &b, dtype);
        for wm in [
            WeightMatching::new(3),
            WeightMatching::new(4).with_cost_cache(0),
            // Keeps the small groups only.
            WeightMatching::new(5).with_cost_cache(20 * 20 * 8 * 3),
            WeightMatching::new(6).with_restarts(2).unwrap(),
        ] {
            let what = format!("{name}, {wm:?}");
            let memory = wm.align(&la, &lb, &spec).unwrap();
            let disk = wm.align_checkpoints(&ca, &cb, &spec, &mut Silent).unwrap();
            assert_same(&memory, &disk, &what);
            assert!(memory.stats().sweeps >= 2, "{what}: too easy a test");
        }
    }
}

#[test]
fn group_reports_come_before_each_sweep_and_a_stop_cancels() {
    let tmp = tempfile::tempdir().unwrap();
    let arch = MlpShapes::new(&[6, 16, 16, 16, 3]).unwrap();
    let (ca, cb, ..) = saved(
        tmp.path(),
        &arch.random_model(0),
        &arch.random_model(1),
        Dtype::BF16,
    );
    let mut log = Vec::new();
    let al = WeightMatching::new(0)
        .align_checkpoints(
            &ca,
            &cb,
            &arch.spec(),
            &mut from_fn(|p| match *p {
                Progress::Group {
                    sweep,
                    index,
                    total,
                    ..
                } => log.push((sweep, Some(index), total)),
                Progress::Sweep { sweep, .. } => log.push((sweep, None, 0)),
                _ => {}
            }),
        )
        .unwrap();
    let sweeps = al.stats().sweeps;
    assert_eq!(log.len(), sweeps * 4);
    for (s, chunk) in log.chunks(4).enumerate() {
        assert_eq!(
            chunk,
            &[
                (s, Some(0), 3),
                (s, Some(1), 3),
                (s, Some(2), 3),
                (s, None, 0)
            ]
        );
    }
    let stopped = WeightMatching::new(0).align_checkpoints(
        &ca,
        &cb,
        &arch.spec(),
        &mut from_fn(|p| match p {
            Progress::Group { .. } => std::ops::ControlFlow::Break(()),
            _ => std::ops::ControlFlow::Continue(()),
        }),
    );
    let err = stopped.unwrap_err().to_string();
    assert!(err.contains("group `hidden."), "{err}");
}

#[test]
fn bad_checkpoints_are_errors_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let arch = MlpShapes::new(&[6, 16, 3]).unwrap();
    let mut b = arch.random_model(1);
    b.get_mut("layers.1.weight").unwrap()[[0, 2]] = f32::NAN;
    let (ca, cb, ..) = saved(tmp.path(), &arch.random_model(0), &b, Dtype::BF16);
    let err = WeightMatching::new(0)
        .align_checkpoints(&ca, &cb, &arch.spec(), &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layers.1.weight") && err.contains("b"),
        "{err}"
    );
    // A checkpoint whose shapes differ from the reference's.
    let other = MlpShapes::new(&[6, 12, 3]).unwrap();
    let dir = tmp.path().join("narrow");
    save(&other.random_model(0), &dir, &SaveOptions::new(Dtype::BF16)).unwrap();
    let narrow = Checkpoint::open(&dir).unwrap();
    let err = WeightMatching::new(0)
        .align_checkpoints(&ca, &narrow, &arch.spec(), &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("narrow") && err.contains("layers.0.weight"),
        "{err}"
    );
}

/// A Llama-like model: embedding, `layers` blocks (RMSNorms, q/k/v/o, gate/up/down), a
/// final norm and an untied head.
fn llama(hidden: usize, inter: usize, layers: usize, vocab: usize, seed: u64) -> StateDictF32 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = |shape: &[usize], norm: bool| -> ArrayD<f32> {
        ArrayD::from_shape_fn(shape.to_vec(), |_| {
            let x = rng.random::<f32>() - 0.5;
            if norm { 1.0 + 0.1 * x } else { x }
        })
    };
    let mut pairs = vec![(
        "model.embed_tokens.weight".to_string(),
        t(&[vocab, hidden], false),
    )];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        pairs.push((format!("{p}.input_layernorm.weight"), t(&[hidden], true)));
        for x in ["q", "k", "v", "o"] {
            pairs.push((
                format!("{p}.self_attn.{x}_proj.weight"),
                t(&[hidden, hidden], false),
            ));
        }
        pairs.push((
            format!("{p}.post_attention_layernorm.weight"),
            t(&[hidden], true),
        ));
        pairs.push((
            format!("{p}.mlp.gate_proj.weight"),
            t(&[inter, hidden], false),
        ));
        pairs.push((
            format!("{p}.mlp.up_proj.weight"),
            t(&[inter, hidden], false),
        ));
        pairs.push((
            format!("{p}.mlp.down_proj.weight"),
            t(&[hidden, inter], false),
        ));
    }
    pairs.push(("model.norm.weight".to_string(), t(&[hidden], true)));
    pairs.push(("lm_head.weight".to_string(), t(&[vocab, hidden], false)));
    StateDict::from_pairs(pairs).unwrap()
}

/// The spec file of `benches/compare/llama_pair_gen.py`: the residual stream and one
/// MLP group per layer, attention heads unpermuted.
fn llama_spec(layers: usize) -> PermutationSpec {
    PermutationSpec::from_json(&format!(
        r#"{{"modelfusion_spec": 1, "rules": [
          {{"group": "residual", "consumer": ["model.embed_tokens", "lm_head"], "rms_norm": ["model.norm"]}},
          {{"for": {{"i": "0..{layers}"}}, "group": "residual",
            "consumer": ["model.layers.{{i}}.self_attn.q_proj", "model.layers.{{i}}.self_attn.k_proj",
                         "model.layers.{{i}}.self_attn.v_proj", "model.layers.{{i}}.mlp.gate_proj",
                         "model.layers.{{i}}.mlp.up_proj"],
            "producer": ["model.layers.{{i}}.self_attn.o_proj", "model.layers.{{i}}.mlp.down_proj"],
            "rms_norm": ["model.layers.{{i}}.input_layernorm", "model.layers.{{i}}.post_attention_layernorm"]}},
          {{"for": {{"i": "0..{layers}"}}, "group": "mlp.{{i}}",
            "producer": ["model.layers.{{i}}.mlp.gate_proj", "model.layers.{{i}}.mlp.up_proj"],
            "consumer": ["model.layers.{{i}}.mlp.down_proj"]}},
          {{"for": {{"i": "0..{layers}"}}, "invariant": ["model.layers.{{i}}.self_attn.q_proj.weight",
            "model.layers.{{i}}.self_attn.k_proj.weight", "model.layers.{{i}}.self_attn.v_proj.weight",
            "model.layers.{{i}}.self_attn.o_proj.weight"]}}]}}"#
    ))
    .unwrap()
}

#[test]
fn planted_permutation_of_a_sharded_bf16_llama_is_recovered_and_undone() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = llama_spec(3);
    let a = llama(24, 40, 3, 50, 0);
    let planted = PermutationSet::random(&spec, &a, 9).unwrap();
    let b = spec.apply(&planted, &a).unwrap();
    let (ca, cb, la, lb) = saved(tmp.path(), &a, &b, Dtype::BF16);
    let wm = WeightMatching::new(1).with_cost_cache(0);
    let al = wm.align_checkpoints(&ca, &cb, &spec, &mut Silent).unwrap();
    assert_same(&wm.align(&la, &lb, &spec).unwrap(), &al, "llama");
    let perms = al.permutations().unwrap();
    assert_eq!(perms, planted.inverse());
    // The aligned checkpoint, streamed: the reference's bytes, so the same function.
    let out = tmp.path().join("aligned");
    let bytes: usize = cb.tensors().iter().map(|t| t.byte_len()).sum();
    write_permuted(&cb, &spec, &perms, &out, Some(bytes as u64 / 3), Silent).unwrap();
    let aligned = Checkpoint::open(&out).unwrap();
    assert!(aligned.files().count() >= 3);
    for t in ca.tensors() {
        assert_eq!(
            aligned.raw(t.name()).unwrap(),
            ca.raw(t.name()).unwrap(),
            "{}",
            t.name()
        );
    }
}

#[test]
fn noisy_planted_llama_in_f16_is_recovered() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = llama_spec(2);
    let a = llama(32, 48, 2, 64, 3);
    let noise = llama(32, 48, 2, 64, 4);
    let noisy = a
        .try_map(|n, t| Ok(t + &(noise.get(n).unwrap() * 0.3f32)))
        .unwrap();
    let planted = PermutationSet::random(&spec, &a, 11).unwrap();
    let b = spec.apply(&planted, &noisy).unwrap();
    let (ca, cb, ..) = saved(tmp.path(), &a, &b, Dtype::F16);
    let al = WeightMatching::new(2)
        .align_checkpoints(&ca, &cb, &spec, &mut Silent)
        .unwrap();
    assert_eq!(al.permutations().unwrap(), planted.inverse());
    let obj = &al.stats().objective;
    assert!(obj.windows(2).all(|w| w[1] >= w[0]), "{obj:?}");
}
