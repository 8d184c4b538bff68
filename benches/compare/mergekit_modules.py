"""Multi-module architectures, modelfusion merge side by side with mergekit 0.1.5 (not
part of cargo test).

Setup:  python3 -m venv venv-mk && venv-mk/bin/pip install mergekit==0.1.5
Run:    cargo build --release --features cli
        venv-mk/bin/python benches/compare/mergekit_modules.py [--bin target/release/modelfusion]

Makes tiny random checkpoints with transformers (T5 v1.1: 3 encoder and 2 decoder
layers, d_model 32; Qwen2-VL and Qwen2.5-VL: 3 text layers, 2 vision blocks, hidden
32), a base and two fine-tunes (the base plus deltas quantised to multiples of 2^-9),
saved by `save_pretrained` in float32 and bfloat16. Runs `mergekit-yaml` and
`modelfusion merge` on each config (top-level `models` with linear, ties and a gradient
slerp `t`; `modules:` with per-module models and parameters; `modules:` with
per-module slices and `layer_range`), both computing in float32, and prints per family,
config and dtype: the tensors compared, max abs and max ulp difference (in the output
dtype), the tensors only one output holds, and whether the layer counts in the written
`config.json` agree. `--families t5,...` and `--dtypes float32` run a subset.
"""
import argparse, json, os, sys, tempfile

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mergekit_compare import run_both, ulps  # noqa: E402


def t5_model():
    from transformers import T5Config, T5ForConditionalGeneration

    c = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2,
                 num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    return T5ForConditionalGeneration(c)


def qwen_vl_model(kind):
    import transformers

    conf, model = {
        "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
        "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    }[kind]
    vision = dict(depth=2, hidden_size=32, num_heads=4, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    if kind == "qwen2_vl":
        vision.update(embed_dim=32, mlp_ratio=2)
    else:
        vision.update(intermediate_size=64, out_hidden_size=32, fullatt_block_indexes=[1])
    c = getattr(transformers, conf)(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0,
                         eos_token_id=1, pad_token_id=0),
        vision_config=vision, image_token_id=60, video_token_id=61, vision_start_token_id=62,
        vision_end_token_id=63)
    return getattr(transformers, model)(c)


FAMILIES = {"t5": t5_model, "qwen2_vl": lambda: qwen_vl_model("qwen2_vl"),
            "qwen2_5_vl": lambda: qwen_vl_model("qwen2_5_vl")}

# Per family: the modules: sections (per-module models, per-module slices).
T5_MODULES = {
    "modules_models": "parameters: {{weight: 1}}\nmodules:\n  encoder:\n    parameters: {{weight: [0.2, 0.8]}}\n    models: [{{model: {a}}}, {{model: {b}, parameters: {{weight: 0.5}}}}]\n  decoder:\n    models: [{{model: {b}}}, {{model: {base}}}]\n  shared:\n    models: [{{model: {a}}}]\n",
    "modules_slices": "parameters: {{weight: 1}}\nmodules:\n  encoder:\n    slices:\n      - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 2]}}]\n        parameters: {{weight: [1, 3]}}\n      - sources: [{{model: {base}, layer_range: [1, 3]}}]\n  decoder:\n    models: [{{model: {a}}}, {{model: {b}}}]\n  shared:\n    models: [{{model: {b}}}]\n",
}
VL_MODULES = {
    "modules_models": "parameters: {{weight: 1}}\nmodules:\n  text_decoder:\n    parameters: {{weight: [{{filter: mlp, value: [0.2, 0.8]}}]}}\n    models: [{{model: {a}}}, {{model: {b}, parameters: {{weight: 0.5}}}}]\n  vision_tower:\n    models: [{{model: {b}}}, {{model: {base}}}]\n  multi_modal_projector:\n    models: [{{model: {a}}}]\n",
    "modules_slices": "parameters: {{weight: 1}}\nmodules:\n  text_decoder:\n    models: [{{model: {a}}}, {{model: {b}}}]\n  vision_tower:\n    slices:\n      - sources: [{{model: {a}, layer_range: [1, 2]}}, {{model: {b}, layer_range: [0, 1]}}]\n      - sources: [{{model: {base}, layer_range: [0, 2]}}]\n        parameters: {{weight: [1, 3]}}\n  multi_modal_projector:\n    models: [{{model: {b}}}]\n",
}
CONFIGS = {
    "models_linear": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.7}}\n",
    "models_ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, density: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: [0.2, 0.9]}}\n",
    "models_slerp_gradient": "merge_method: slerp\nbase_model: {base}\nparameters: {{t: [0, 0.3, 1]}}\nmodels:\n  - model: {a}\n",
}


def make(d, family, dtype):
    """base, a, b of `family` under `d`: `a` and `b` are the base plus quantised deltas."""
    paths = {}
    torch.manual_seed(0)
    model = FAMILIES[family]()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(["base", "a", "b"]):
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    delta = torch.randint(-6, 7, p.shape, generator=g).float() / 512 if i else 0
                    p.copy_(base[k] + delta)
        paths[name] = os.path.join(d, name)
        model.to(dtype).save_pretrained(paths[name])
        model.to(torch.float32)
        if family == "qwen2_vl":
            # Qwen2-VL's configs on the Hub keep the text keys at the top level, where
            # mergekit 0.1.5's table reads `num_hidden_layers` (transformers 5 writes
            # them under `text_config` only).
            f = os.path.join(paths[name], "config.json")
            cfg = json.load(open(f))
            cfg["num_hidden_layers"] = cfg["text_config"]["num_hidden_layers"]
            json.dump(cfg, open(f, "w"), indent=2)
    return paths


def load_dir(d):
    out = {}
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def layer_counts(d):
    """The layer-count keys of a config.json (nested ones too)."""
    cfg = json.load(open(os.path.join(d, "config.json")))
    keys = ["num_layers", "num_decoder_layers", "num_hidden_layers", "depth"]
    found = {k: cfg[k] for k in keys if k in cfg}
    for sub in ["text_config", "vision_config"]:
        found.update({f"{sub}.{k}": v for k, v in cfg.get(sub, {}).items() if k in keys})
    return found


def compare(args, d, family, name, dname, dtype, text):
    mk, mf, err = run_both(args, d, f"{family}_{name}_{dname}", text)
    if err:
        return (family, name, dname, "error", "", "", err.strip().splitlines()[-1][:120], "")
    a, b = load_dir(mk), load_dir(mf)
    keys = sorted(set(a) & set(b))
    only = sorted(set(a) ^ set(b))
    mad = max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)
    mul = max(ulps(a[k], b[k], dtype) for k in keys)
    la, lb = layer_counts(mk), layer_counts(mf)
    only_txt = ", ".join(f"{k} ({'mergekit' if k in a else 'modelfusion'})" for k in only) or "none"
    counts = "same" if la == lb else f"mergekit {la}, modelfusion {lb}"
    print(family, name, dname, len(keys), mad, mul, only_txt, counts, file=sys.stderr, flush=True)
    return (family, name, dname, str(len(keys)), f"{mad:.3g}", str(mul), only_txt, counts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/modelfusion")
    ap.add_argument("--mergekit", default=os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"))
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            for dname in args.dtypes.split(","):
                dtype = getattr(torch, dname)
                d = os.path.join(tmp, family, dname)
                paths = make(d, family, dtype)
                modules = T5_MODULES if family == "t5" else VL_MODULES
                configs = {**CONFIGS, **{k: "merge_method: linear\n" + v for k, v in modules.items()}}
                for name, tpl in configs.items():
                    text = tpl.format(**paths) + f"dtype: float32\nout_dtype: {dname}\n"
                    rows.append(compare(args, d, family, name, dname, dtype, text))
    print("| family | config | dtype | tensors compared | max abs diff | max ulp diff | tensors only in one output | layer counts in config.json |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
