"""Side-by-side check of modelfusion merge against mergekit 0.1.5 (not part of cargo test).

Setup:  python3 -m venv ../venv-mk && venv-mk/bin/pip install mergekit
Run:    cargo build --release --features cli
        venv-mk/bin/python benches/compare/mergekit_compare.py [--bin target/release/modelfusion]

Makes small Llama-like checkpoints (fp32, fp16, bf16; deltas quantised so magnitudes
tie often), runs `mergekit-yaml` and `modelfusion merge` on the same configs (both
computing in float32, unless a config names its own dtype) and prints the agreement per
method and dtype: max abs and max ulp difference (in the output dtype), and the max
difference in ulps of each tensor's largest magnitude (blind to the huge ulp counts of
values next to 0). `--configs a,b` and `--dtypes float16,...` run a subset. Random
methods (DARE, DELLA) cannot share a random stream with torch: they are compared at
density 1 (deterministic).
"""
import argparse, json, math, os, subprocess, sys, tempfile
import numpy as np
import torch
from safetensors.torch import save_file, load_file

L, H, I, V = 4, 64, 128, 96
CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
       "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": 4,
       "num_key_value_heads": 4, "vocab_size": V, "max_position_embeddings": 128,
       "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32"}


def shapes(L=L, H=H, I=I, V=V):
    s = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"]:
            s[p + f"self_attn.{n}.weight"] = (H, H)
        s[p + "mlp.gate_proj.weight"] = (I, H)
        s[p + "mlp.up_proj.weight"] = (I, H)
        s[p + "mlp.down_proj.weight"] = (H, I)
        s[p + "input_layernorm.weight"] = (H,)
        s[p + "post_attention_layernorm.weight"] = (H,)
    return s


def make(dirname, dtype, seed, base=None, dims=None, cfg=None):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, sh in shapes(**(dims or {})).items():
        if base is None:
            t = torch.randn(sh, generator=g) * 0.05
        else:
            # quantised deltas: many ties in magnitude, as in bf16/fp16 fine-tunes
            t = base[k].float() + torch.randint(-6, 7, sh, generator=g).float() / 512
        out[k] = t.to(dtype).contiguous()
    os.makedirs(dirname, exist_ok=True)
    save_file(out, os.path.join(dirname, "model.safetensors"), metadata={"format": "pt"})
    json.dump(cfg or CFG, open(os.path.join(dirname, "config.json"), "w"))
    return out


def variant(src, dst, edit, tie=False):
    """A copy of checkpoint `src` with its tensors edited (extra or missing tensors)."""
    os.makedirs(dst, exist_ok=True)
    save_file(edit(load_file(os.path.join(src, "model.safetensors"))), os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    json.dump({**CFG, "tie_word_embeddings": tie}, open(os.path.join(dst, "config.json"), "w"))


CONFIGS = {
    "linear": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.7}}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{lambda: 0.8}}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: [0, 0.5, 1]}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, density: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.6}}\n  - model: {c}\n    parameters: {{weight: 0.7, density: [0.2, 0.9]}}\n",
    "ties_nonorm_rescale": "merge_method: ties\nbase_model: {base}\nparameters: {{normalize: false, rescale: true, density: 0.4}}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: [{{filter: mlp, value: 0.3}}, {{value: 1}}]}}\n",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, density: 0.5, gamma: 0.05}}\n  - model: {b}\n    parameters: {{weight: 0.6, density: 0.8}}\n",
    "breadcrumbs_default": "merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 0.6}}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {base}\nparameters: {{density: 0.6, gamma: 0.02}}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 0.8}}\n  - model: {c}\n    parameters: {{weight: 0.5}}\n",
    "dare_ties_d1": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 0.8}}\n",
    "dare_linear_d1": "merge_method: dare_linear\nbase_model: {base}\nparameters: {{normalize: true}}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 0.8}}\n",
    "della_d1": "merge_method: della\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 0.8}}\n",
    "slerp": "merge_method: slerp\nbase_model: {base}\nparameters:\n  t: [{{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}, {{value: 0.4}}]\nmodels:\n  - model: {a}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n",
    "nuslerp": "merge_method: nuslerp\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.7}}\n",
    "nuslerp_base_rows": "merge_method: nuslerp\nbase_model: {base}\nparameters: {{nuslerp_flatten: false, weight: [0.2, 0.8]}}\nmodels:\n  - model: {a}\n  - model: {b}\n    parameters: {{weight: 0.6}}\n",
    "nuslerp_base_columns": "merge_method: nuslerp\nbase_model: {base}\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 2}}\n",
    "multislerp": "merge_method: multislerp\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n  - model: {c}\n    parameters: {{weight: 0.7}}\n",
    "multislerp_base": "merge_method: multislerp\nbase_model: {base}\nparameters: {{normalize_weights: false, eps: 1e-6}}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.4}}\n  - model: {b}\n    parameters: {{weight: [0.2, 0.5]}}\n",
    "karcher": "merge_method: karcher\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n",
    "karcher_iter": "merge_method: karcher\nparameters: {{max_iter: 2, tol: 1e-9}}\nmodels:\n  - model: {a}\n  - model: {b}\n",
    "sce": "merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n",
    "sce_topk": "merge_method: sce\nbase_model: {base}\nparameters: {{select_topk: 0.4}}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {a}\n",
    "arcee_fusion_f64": "merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {a}\ndtype: float64\n",
    "nearswap": "merge_method: nearswap\nbase_model: {base}\nparameters: {{t: 0.004}}\nmodels:\n  - model: {a}\n",
    "ram": "merge_method: ram\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n",
    "ram_epsilon": "merge_method: ram\nbase_model: {base}\nparameters: {{epsilon: 0.005}}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n",
    "ramplus_tl": "merge_method: ramplus_tl\nbase_model: {base}\nparameters: {{epsilon: 0.005, r: 0.5, alpha: 1.5}}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n",
    "ramplus_tl_default": "merge_method: ramplus_tl\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n",
    # Layer slices: a frankenmerge (layers reordered and duplicated), slices merged with
    # a method (gradients over each slice's layers, per-source and per-slice parameters).
    "passthrough_slices": "merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 3]}}]\n  - sources: [{{model: {b}, layer_range: [1, 4]}}]\n  - sources: [{{model: {a}, layer_range: [2, 3]}}]\n",
    "passthrough_scale": "merge_method: passthrough\nslices:\n  - sources: [{{model: {b}, layer_range: [3, 4], parameters: {{scale: [{{filter: o_proj, value: 0.5}}, {{value: 1}}]}}}}]\n  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n",
    "slices_slerp": "merge_method: slerp\nbase_model: {base}\nparameters:\n  t: [{{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}, {{value: 0.4}}]\nslices:\n  - sources: [{{model: {base}, layer_range: [0, 4]}}, {{model: {a}, layer_range: [0, 4]}}]\n",
    "slices_linear": "merge_method: linear\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}\n      - {{model: {b}, layer_range: [2, 4], parameters: {{weight: 0.7}}}}\n    parameters: {{normalize: false}}\n  - sources:\n      - {{model: {b}, layer_range: [0, 3]}}\n      - {{model: {c}, layer_range: [1, 4], parameters: {{weight: 2}}}}\n    parameters: {{weight: [0.2, 0.8]}}\n",
    "slices_ties": "merge_method: ties\nbase_model: {base}\nparameters: {{density: 0.5, weight: 1}}\nslices:\n  - sources: [{{model: {base}, layer_range: [0, 2]}}, {{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [2, 4]}}]\n  - sources: [{{model: {base}, layer_range: [1, 4]}}, {{model: {c}, layer_range: [1, 4], parameters: {{density: [0.2, 0.9]}}}}, {{model: {a}, layer_range: [0, 3]}}]\n",
    # Tensors in some inputs only: rotary inv_freq buffers in one model (outside the
    # architecture: left out), no lm_head in another (tied: read from the embedding).
    "extra_and_tied": "merge_method: linear\nmodels:\n  - model: {rope}\n    parameters: {{weight: 0.4}}\n  - model: {tied}\n    parameters: {{weight: 0.6}}\n",
}


# mergekit's own examples/*.yml (its repository, mid 2026), the Hugging Face names
# replaced by small local checkpoints of 40 layers: `--examples` runs these instead.
EXAMPLES = {
    "arcee_fusion.yml": "models:\n  - model: {model_a}\n  - model: {model_b}\nmerge_method: arcee_fusion\nbase_model: {model_a}\ndtype: bfloat16\n",
    "bio-merge.yml": "models:\n  - model: {mistral_instruct}\n    parameters:\n      density: 0.5\n      weight: 0.5\n  - model: {biomistral}\n    parameters:\n      density: 0.5\n      weight: 0.5\nmerge_method: ties\nbase_model: {mistral}\nparameters:\n  normalize: false\n  int8_mask: true\ndtype: float16\n",
    "gradient-slerp.yml": "slices:\n  - sources:\n      - model: {orca}\n        layer_range: [0, 40]\n      - model: {platypus}\n        layer_range: [0, 40]\nmerge_method: slerp\nbase_model: {orca}\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\ndtype: float16\n",
    "linear.yml": "models:\n  - model: {orca}\n    parameters:\n      weight: 1.0\n  - model: {wizardlm}\n    parameters:\n      weight: 0.3\n  - model: {platypus}\n    parameters:\n      weight: 0.5\nmerge_method: linear\ndtype: float16\n",
    "orcamini-platy-44layer.yml": "slices:\n  - sources:\n    - model: {orca}\n      layer_range: [0, 24]\n  - sources:\n    - model: {platypus}\n      layer_range: [20, 40]\nmerge_method: passthrough\ndtype: float16\n",
    "ties.yml": "models:\n  - model: {orca}\n    parameters:\n      density: [1, 0.7, 0.1]\n      weight: 1.0\n  - model: {platypus}\n    parameters:\n      density: 0.5\n      weight: [0, 0.3, 0.7, 1]\n  - model: {wizardmath}\n    parameters:\n      density: 0.33\n      weight:\n        - filter: mlp\n          value: 0.5\n        - value: 0\nmerge_method: ties\nbase_model: {llama2}\nparameters:\n  normalize: true\n  int8_mask: true\ndtype: float16\n",
}


# Differing vocabularies (`--vocab`): tokenizer.json files (BPE) that share some tokens,
# each model with its own vocab_size; {a} {b} {c} here are models of 13, 16 and 14 rows
# (c with a tied LM head). Rows are compared token by token: mergekit numbers the tokens
# new to the base in hash order (different ids from run to run), modelfusion in a fixed
# order.
VOCAB_CONFIGS = {
    "union_linear": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.3}}\n  - model: {c}\n    parameters: {{weight: 0.2}}\ntokenizer_source: union\n",
    "union_ta_base": "merge_method: task_arithmetic\nbase_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.5}}\n  - model: {c}\n    parameters: {{weight: 0.7}}\ntokenizer_source: union\n",
    "base_ties": "merge_method: ties\nbase_model: {a}\nparameters: {{density: 0.5, weight: 1}}\nmodels:\n  - model: {b}\n  - model: {c}\ntokenizer_source: base\n",
    "model_path": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\ntokenizer_source: {b}\n",
    "tokens_pad": "merge_method: task_arithmetic\nbase_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.5}}\n  - model: {c}\n    parameters: {{weight: 0.5}}\ntokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n    <|im_start|>: {{source: {{kind: model_token, model: {b}, token: xy}}}}\n    b: {{source: {{kind: zero}}, force: true}}\n    zz: {{source: {c}}}\n    <new>: {{source: {{kind: model_token, model: {a}, token_id: 4}}}}\n",
    "slices_union": "merge_method: linear\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2], parameters: {{weight: 0.4}}}}\n      - {{model: {b}, layer_range: [0, 2], parameters: {{weight: 0.6}}}}\ntokenizer_source: union\n",
}


def make_vocab_models(d):
    """Three 2-layer Llama-like checkpoints with tokenizer.json files that differ."""
    def tok(m, vocab, added):
        t = {"version": "1.0", "truncation": None, "padding": None,
             "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True} for c, i in added],
             "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
             "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None, "end_of_word_suffix": None,
                       "fuse_unk": False, "byte_fallback": False, "ignore_merges": False, "vocab": {w: i for i, w in enumerate(vocab)}, "merges": []}}
        json.dump(t, open(os.path.join(d, m, "tokenizer.json"), "w"), indent=2)
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 128}, open(os.path.join(d, m, "tokenizer_config.json"), "w"))
    sp = [("<unk>", 0), ("<s>", 1), ("</s>", 2)]
    base = make(os.path.join(d, "base"), torch.float32, 1, dims={"L": 2, "H": 8, "I": 16, "V": 13})
    for m, V, seed, vocab, added in [
        ("a", 13, 1, ["<unk>", "<s>", "</s>"] + list("abcdefghij"), sp),
        ("b", 16, 2, ["<unk>", "<s>", "</s>"] + list("acegikmoqs") + ["xy", "zz"], sp + [("<|im_start|>", 15)]),
        ("c", 14, 3, ["<unk>", "<s>", "</s>"] + list("jihgfedcba") + ["zz"], sp),
    ]:
        cfg = {**CFG, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "vocab_size": V, "tie_word_embeddings": m == "c"}
        t = make(os.path.join(d, m), torch.float32, seed, dims={"L": 2, "H": 8, "I": 16, "V": V}, cfg=cfg)
        if m == "c":
            save_file({k: v for k, v in t.items() if k != "lm_head.weight"}, os.path.join(d, m, "model.safetensors"), metadata={"format": "pt"})
        tok(m, vocab, added)
    del base


def vocab_of(d):
    t = json.load(open(os.path.join(d, "tokenizer.json")))
    v = dict(t["model"]["vocab"])
    v.update({e["content"]: e["id"] for e in t["added_tokens"]})
    return v


def compare_vocab(args, d, name, text):
    """Runs a config with differing vocabularies through both tools; rows compared by token."""
    mk, mf, err = run_both(args, d, name, text)
    if err:
        return (name, "float32", "error", err, "", "")
    va, vb = vocab_of(mk), vocab_of(mf)
    a, b = load_file(os.path.join(mk, "model.safetensors")), load_file(os.path.join(mf, "model.safetensors"))
    mad, n = 0.0, len(va)
    for k in sorted(set(a) & set(b)):
        if a[k].shape != b[k].shape:
            return (name, "float32", "error", f"{k}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}", "", "")
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            for tok, i in va.items():
                if tok in vb:
                    mad = max(mad, float((a[k][i] - b[k][vb[tok]]).abs().max()))
            if a[k].shape[0] > n:
                mad = max(mad, float((a[k][n:] - b[k][n:]).abs().max()))
        else:
            mad = max(mad, float((a[k] - b[k]).abs().max()))
    sizes = [json.load(open(os.path.join(o, "config.json")))["vocab_size"] for o in (mk, mf)]
    same_ids = sum(va[t] == vb.get(t) for t in va)
    note = f"vocab {len(va)} vs {len(vb)} tokens, same set: {set(va) == set(vb)}, same id: {same_ids}/{len(va)}, vocab_size {sizes[0]} vs {sizes[1]}, {len(set(a) ^ set(b))} unshared tensors"
    print(name, mad, note, file=sys.stderr, flush=True)
    return (name, "float32", f"{mad:.3g}", "-", "-", note)


def make_example_models(d):
    """40-layer Llama-like (Mistral-like for bio-merge) fp16 checkpoints of width 16."""
    dims = {"L": 40, "H": 16, "I": 32, "V": 24}
    cfg = {**CFG, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 40, "vocab_size": 24, "torch_dtype": "float16"}
    mcfg = {**cfg, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    paths = {}
    for base, family, c in [("llama2", ["model_a", "model_b", "orca", "platypus", "wizardlm", "wizardmath"], cfg), ("mistral", ["mistral_instruct", "biomistral"], mcfg)]:
        paths[base] = os.path.join(d, base)
        b = make(paths[base], torch.float16, 1, dims=dims, cfg=c)
        for i, m in enumerate(family):
            paths[m] = os.path.join(d, m)
            make(paths[m], torch.float16, 10 + i, b, dims=dims, cfg=c)
    return paths


def ulps(x, y, dtype):
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    a = x.to(dtype).view(bits).to(torch.int64)
    b = y.to(dtype).view(bits).to(torch.int64)
    # map to a monotone integer line
    top = 1 << (32 if dtype == torch.float32 else 16) - 1
    a = torch.where(a < 0, -top - a, a)
    b = torch.where(b < 0, -top - b, b)
    return int((a - b).abs().max())


def scale_ulps(x, y, dtype):
    """max |x - y| in ulps of the tensor's largest magnitude (blind to the huge ulp
    counts of values next to 0)."""
    top = float(x.float().abs().max())
    if top == 0:
        return 0.0
    ulp = torch.finfo(dtype).eps * 2.0 ** (math.frexp(top)[1] - 1)
    return float((x.float() - y.float()).abs().max()) / ulp


def run_both(args, d, name, text):
    """Writes config `text` and runs both tools on it: their output folders, and the
    tail of the failing one's stderr ("" when both ran)."""
    cfg = os.path.join(d, name + ".yml")
    open(cfg, "w").write(text)
    mk, mf = os.path.join(d, "mk_" + name), os.path.join(d, "mf_" + name)
    r1 = subprocess.run([args.mergekit, cfg, mk, "--allow-crimes", "--lazy-unpickle"], capture_output=True, text=True)
    r2 = subprocess.run([args.bin, "merge", cfg, mf, "--no-progress"], capture_output=True, text=True)
    err = (r1.stderr[-300:] if r1.returncode else "") + (r2.stderr[-300:] if r2.returncode else "")
    if err:
        print(name, "error", err, file=sys.stderr, flush=True)
    return mk, mf, err


def compare(args, d, name, dname, dtype, text):
    """Runs config `text` through both tools and returns its table row."""
    mk, mf, err = run_both(args, d, name, text)
    if err:
        return (name, dname, "error", err, "", "")
    a = {}
    for f in os.listdir(mk):
        if f.endswith(".safetensors"):
            a.update(load_file(os.path.join(mk, f)))
    b = load_file(os.path.join(mf, "model.safetensors"))
    keys = sorted(set(a) & set(b))
    unshared = sorted(set(a) ^ set(b))
    mad = max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)
    mul = max(ulps(a[k], b[k], dtype) for k in keys)
    sul = max(scale_ulps(a[k], b[k], dtype) for k in keys)
    diff = sum(int((a[k] != b[k]).sum()) for k in keys)
    tot = sum(a[k].numel() for k in keys)
    print(name, dname, f"{mad:.3g}", mul, f"{sul:.3g}", diff, tot, file=sys.stderr, flush=True)
    layers = [json.load(open(os.path.join(o, "config.json")))["num_hidden_layers"] for o in (mk, mf)]
    note = (f" (names differ: {unshared[:3]})" if unshared else "") + (f" (num_hidden_layers {layers[0]} vs {layers[1]})" if layers[0] != layers[1] else "")
    return (name, dname, f"{mad:.3g}", str(mul), f"{sul:.3g}", f"{diff}/{tot}, {len(keys)} tensors" + note)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/modelfusion")
    ap.add_argument("--mergekit", default=os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"))
    ap.add_argument("--configs", default="", help="comma-separated subset of the configs (default: all)")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16", help="comma-separated subset of float32,float16,bfloat16")
    ap.add_argument("--examples", action="store_true", help="run mergekit's example configs (as written, dtype included) instead")
    ap.add_argument("--vocab", action="store_true", help="run the configs of differing vocabularies (tokenizer_source, tokenizer) instead")
    args = ap.parse_args()
    only = set(filter(None, args.configs.split(",")))
    unknown = only - set(CONFIGS) - set(EXAMPLES) - set(VOCAB_CONFIGS)
    if unknown:
        sys.exit(f"unknown configs: {sorted(unknown)}; known: {sorted(CONFIGS)}")
    dtypes = args.dtypes.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dname, dtype in [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)]:
            if dname not in dtypes or args.examples or args.vocab:
                continue
            d = os.path.join(tmp, dname)
            base = make(os.path.join(d, "base"), dtype, 1)
            for i, m in enumerate("abc"):
                make(os.path.join(d, m), dtype, 10 + i, base)
            variant(os.path.join(d, "a"), os.path.join(d, "rope"), lambda t: {**t, **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.arange(H // 8, dtype=torch.float32) for i in range(L)}})
            variant(os.path.join(d, "b"), os.path.join(d, "tied"), lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"}, tie=True)
            for name, tpl in CONFIGS.items():
                if only and name not in only:
                    continue
                text = tpl.format(**{m: os.path.join(d, m) for m in ["base", "a", "b", "c", "rope", "tied"]})
                if "dtype:" not in text:
                    text += "dtype: float32\n"
                text += f"out_dtype: {dname}\n"
                rows.append(compare(args, d, name, dname, dtype, text))
        if args.vocab:
            d = os.path.join(tmp, "vocab")
            make_vocab_models(d)
            for name, tpl in VOCAB_CONFIGS.items():
                if only and name not in only:
                    continue
                text = tpl.format(**{m: os.path.join(d, m) for m in "abc"}) + "dtype: float32\n"
                rows.append(compare_vocab(args, d, name, text))
        if args.examples:
            d = os.path.join(tmp, "examples")
            paths = make_example_models(d)
            for name, tpl in EXAMPLES.items():
                if only and name not in only:
                    continue
                text = tpl.format(**paths)
                dname = "bfloat16" if "bfloat16" in text else "float16"
                dtype = dict(float16=torch.float16, bfloat16=torch.bfloat16)[dname]
                # As written (mergekit computes in the example's 16-bit dtype), then
                # with both computing in float32 into the same output dtype.
                rows.append(compare(args, d, name, dname, dtype, text))
                f32 = text.replace(f"dtype: {dname}", f"dtype: float32\nout_dtype: {dname}")
                rows.append(compare(args, d, name.replace(".yml", "_f32.yml"), dname + " (f32 compute)", dtype, f32))
    sys.stdout.flush()
    print("| config | dtype | max abs diff | max ulp diff | max diff in ulps of the tensor's max | elements differing |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
