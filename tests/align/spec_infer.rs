//! Spec inference on real architectures' tensor tables, recorded from PyTorch by
//! `tests/golden/specs/gen.py` (torchvision ResNet-18/34/50/101/152 and VGG-11/13/16/19
//! with and without BN, the REPAIR CIFAR ResNet-20, `nn.Sequential` and named MLPs),
//! and the bad-spec cases every checker must catch.

use std::collections::BTreeMap;

use modelfusion::perm::infer::infer_spec;
use modelfusion::perm::specs::{Architecture, MlpShapes, ResNet};
use modelfusion::perm::{PermutationSet, PermutationSpec, SpecIssue};
use modelfusion::{Model, StateDict};
use ndarray::ArrayD;
use serde_json::Value;

const TABLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/specs/tables");

/// Group counts of the permutation specs that `gen.py` writes independently in PyTorch
/// (`check_torch.py` counts the tensors each must move).
const EXPECTED_GROUPS: [(&str, usize); 17] = [
    ("cifar_resnet20", 12),
    ("cifar_resnet20_k1", 12),
    ("mlp_named", 2),
    ("mlp_named_mixed", 2),
    ("mlp_seq", 2),
    ("mlp_seq_bn", 2),
    ("resnet18", 12),
    ("resnet50", 37),
    ("tv_resnet34", 20),
    ("tv_resnet101", 71),
    ("tv_resnet152", 105),
    ("tv_vgg13", 12),
    ("tv_vgg16", 15),
    ("tv_vgg16_bn", 15),
    ("tv_vgg19", 18),
    ("vgg11_bn_small", 10),
    ("vgg11_small", 10),
];

fn table(name: &str) -> (String, Vec<(String, String, Vec<usize>)>) {
    let text = std::fs::read_to_string(format!("{TABLES}/{name}.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let tensors = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t[0].as_str().unwrap().to_string(),
                t[1].as_str().unwrap().to_string(),
                t[2].as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
            )
        })
        .collect();
    (v["family"].as_str().unwrap().to_string(), tensors)
}

/// A zero model with the table's float tensors (shapes only matter here).
fn zeros(tensors: &[(String, String, Vec<usize>)]) -> StateDict<ArrayD<f32>> {
    StateDict::from_pairs(
        tensors
            .iter()
            .filter(|(_, d, _)| d.starts_with('F') || d == "BF16")
            .map(|(n, _, s)| (n.clone(), ArrayD::zeros(s.clone()))),
    )
    .unwrap()
}

#[test]
fn every_recorded_architecture_is_detected_with_the_reference_group_count() {
    for (name, groups) in EXPECTED_GROUPS {
        let (family, tensors) = table(name);
        let found = infer_spec(
            tensors.iter().map(|(n, _, s)| (n.as_str(), s.as_slice())),
            None,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(found.family, family, "{name}: {}", found.reason);
        assert_eq!(found.spec.num_groups(), groups, "{name}: {}", found.spec);
        // Sound on the real shapes, and a file round trip gives it back.
        let model = zeros(&tensors);
        let report = found.spec.check(&model).unwrap();
        assert!(report.is_sound(), "{name}: {report}");
        let back = PermutationSpec::from_json(&found.spec.to_json().unwrap()).unwrap();
        assert_eq!(back, found.spec, "{name}");
    }
}

#[test]
fn vgg_flatten_factor_and_bottleneck_streams() {
    let (_, vgg) = table("tv_vgg16");
    let found = infer_spec(vgg.iter().map(|(n, _, s)| (n.as_str(), s.as_slice())), None).unwrap();
    // 512 channels of a 7x7 map feed classifier.0's 25088 inputs.
    assert_eq!(found.spec.rule("classifier.0.weight", 1).repeat, 49);
    assert!(found.reason.contains("49"), "{}", found.reason);
    let (_, r50) = table("resnet50");
    let found = infer_spec(r50.iter().map(|(n, _, s)| (n.as_str(), s.as_slice())), None).unwrap();
    // The stem writes its own group (layer1.0 projects 64 -> 256 channels), read by
    // layer1.0's first conv and its downsample.
    let stem: Vec<_> = found.spec.group("stem").unwrap().to_vec();
    assert!(stem.contains(&("layer1.0.downsample.0.weight".to_string(), 1)));
    assert!(stem.contains(&("layer1.0.conv1.weight".to_string(), 1)));
    assert!(found.spec.is_passive("layer4.2.bn3.running_var"));
    assert!(found.reason.contains("Bottlenecks"), "{}", found.reason);
}

#[test]
fn unknown_layouts_fail_naming_tensors() {
    // The flax layout of the Git Re-Basin code is not PyTorch's: no detector guesses.
    let (_, flax) = table("rebasin_resnet20");
    let err = infer_spec(
        flax.iter().map(|(n, _, s)| (n.as_str(), s.as_slice())),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no known architecture"), "{err}");
    assert!(err.contains('`'), "{err}");
}

fn mlp_model() -> StateDict<ArrayD<f32>> {
    // 8 -> 8 -> 8 -> 3: square hidden matrices, where wrong axes are easy to miss.
    MlpShapes::new(&[8, 8, 8, 3]).unwrap().random_model(0)
}

fn issues(spec: &PermutationSpec, model: &StateDict<ArrayD<f32>>) -> Vec<SpecIssue> {
    spec.check(model).unwrap().issues
}

fn refused(spec: &PermutationSpec, model: &StateDict<ArrayD<f32>>, mentions: &[&str]) {
    let perms = PermutationSet::identity(spec, model).unwrap();
    let err = spec.apply(&perms, model).unwrap_err().to_string();
    for m in mentions {
        assert!(err.contains(m), "`{m}` not in: {err}");
    }
    let al = modelfusion::align::WeightMatching::new(0);
    let err = modelfusion::align::Aligner::align(&al, model, model, spec)
        .unwrap_err()
        .to_string();
    assert!(err.contains(mentions[0]), "{err}");
}

fn base_groups() -> Vec<(&'static str, Vec<(&'static str, usize)>)> {
    vec![
        (
            "h0",
            vec![
                ("layers.0.weight", 0),
                ("layers.0.bias", 0),
                ("layers.1.weight", 1),
            ],
        ),
        (
            "h1",
            vec![
                ("layers.1.weight", 0),
                ("layers.1.bias", 0),
                ("layers.2.weight", 1),
            ],
        ),
    ]
}

fn spec_of(groups: Vec<(&'static str, Vec<(&'static str, usize)>)>) -> PermutationSpec {
    PermutationSpec::from_groups(groups)
        .unwrap()
        .with_invariant(["layers.0.weight", "layers.2.weight", "layers.2.bias"])
}

#[test]
fn the_right_hand_spec_is_sound() {
    let model = mlp_model();
    assert!(issues(&spec_of(base_groups()), &model).is_empty());
    // Without the invariant declarations the input and output layers are reported.
    let plain = PermutationSpec::from_groups(base_groups()).unwrap();
    let found = issues(&plain, &model);
    assert!(
        found.iter().any(|i| matches!(i, SpecIssue::UnlistedAxis { param, axis: 1, .. } if param == "layers.0.weight")),
        "{found:?}"
    );
}

#[test]
fn a_missing_bias_is_refused() {
    let mut g = base_groups();
    g[0].1.retain(|(p, _)| *p != "layers.0.bias");
    let spec = spec_of(g);
    let model = mlp_model();
    let found = issues(&spec, &model);
    assert!(
        found
            .iter()
            .any(|i| matches!(i, SpecIssue::MissingBias { bias, .. } if bias == "layers.0.bias"))
    );
    refused(&spec, &model, &["layers.0.bias"]);
}

#[test]
fn a_consumer_on_the_wrong_axis_of_a_square_matrix_is_refused() {
    // h1's consumer `layers.2.weight` is (3, 8): fine. Put h0's consumer on axis 0 of the
    // square `layers.1.weight` instead of axis 1 (and h1 on axis 1): shapes all agree.
    let g = vec![
        (
            "h0",
            vec![
                ("layers.0.weight", 0),
                ("layers.0.bias", 0),
                ("layers.1.weight", 0),
            ],
        ),
        (
            "h1",
            vec![
                ("layers.1.weight", 1),
                ("layers.1.bias", 0),
                ("layers.2.weight", 1),
            ],
        ),
    ];
    let spec = spec_of(g);
    let model = mlp_model();
    assert!(
        spec.validate(&model).is_ok(),
        "the shapes alone cannot tell"
    );
    let found = issues(&spec, &model);
    assert!(
        found.contains(&SpecIssue::NoConsumer { group: "h0".into() }),
        "{found:?}"
    );
    assert!(
        found.contains(&SpecIssue::NoProducer { group: "h1".into() }),
        "{found:?}"
    );
    refused(&spec, &model, &["h0"]);
}

#[test]
fn a_group_with_no_consumer_is_refused() {
    let mut g = base_groups();
    g[1].1.retain(|(p, _)| *p != "layers.2.weight");
    let spec = spec_of(g);
    let model = mlp_model();
    assert!(issues(&spec, &model).contains(&SpecIssue::NoConsumer { group: "h1".into() }));
    refused(&spec, &model, &["h1", "no consumer"]);
}

#[test]
fn an_unlisted_parameter_of_a_groups_size_is_refused() {
    let mut model = mlp_model();
    model.insert("extra.scale", ArrayD::zeros(vec![8])).unwrap();
    let spec = spec_of(base_groups());
    let found = issues(&spec, &model);
    assert!(
        found
            .iter()
            .any(|i| matches!(i, SpecIssue::Unlisted { param, .. } if param == "extra.scale")),
        "{found:?}"
    );
    refused(&spec, &model, &["extra.scale"]);
    // Declared invariant, it is accepted.
    let ok = spec.with_invariant(["extra.scale"]);
    assert!(ok.check(&model).unwrap().is_sound());
}

#[test]
fn weight_matching_leaves_running_statistics_out_of_the_objective() {
    // Reference objective (Git Re-Basin): sum over weights only of <A, pi(B)>. With the
    // running statistics scaled up 1000x in B, the permutations must not change.
    let arch = ResNet::resnet20(1, 10);
    let spec = arch.spec();
    let a = arch.random_model(1);
    let b = arch.random_model(2);
    let loud = b
        .try_map(|n, t| {
            Ok(if n.contains("running") {
                t * 1000.0
            } else {
                t.clone()
            })
        })
        .unwrap();
    let wm = modelfusion::align::WeightMatching::new(3);
    let p1 = modelfusion::align::Aligner::align(&wm, &a, &b, &spec).unwrap();
    let p2 = modelfusion::align::Aligner::align(&wm, &a, &loud, &spec).unwrap();
    assert_eq!(p1.permutations(), p2.permutations());
    // The objective equals the weights-only sum computed independently here.
    let aligned = p1.apply(&spec, &b).unwrap();
    let mut by_name: BTreeMap<&str, f64> = BTreeMap::new();
    for n in a.names().filter(|n| !n.contains("running")) {
        let (x, y) = (a.get(n).unwrap(), aligned.get(n).unwrap());
        by_name.insert(n, x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum());
    }
    let want: f64 = by_name.values().sum();
    let got = *p1.stats().objective.last().unwrap();
    assert!(
        (got - want).abs() < 1e-6 * want.abs().max(1.0),
        "{got} vs {want}"
    );
}
