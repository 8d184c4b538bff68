#!/usr/bin/env python3
"""Writes two Llama-like bf16 checkpoints (sharded) and their spec file for the out-of-core
weight matching benchmark (docs/benchmarks.md, "Out-of-core weight matching").

    venv/bin/python benches/compare/llama_pair_gen.py OUT_DIR [--hidden 2048]
        [--inter 5632] [--layers 8] [--vocab 32000] [--shard-mib 400] [--noise 0.5]

OUT_DIR/a: random normal * 0.02 weights (RMSNorm weights 1 + noise), seed 0, untied
lm_head. OUT_DIR/b: a with a planted permutation of the residual stream and of every
layer's MLP units, plus `noise` times independent normal noise of the same scale (seed 1).
OUT_DIR/spec.json: residual stream + one MLP group per layer, attention heads unpermuted
(q/k/v/o declared invariant). OUT_DIR/planted.json: the planted permutations as gather
indices (b = a read through them). Default sizes: 542M parameters, about 1.1 GB per model.
"""
import argparse
import json
import os

import numpy as np
from safetensors import _safetensors_rust as strust


def to_bf16(x):
    """float32 -> bf16 bits (uint16), round to nearest even."""
    u = x.astype(np.float32).view(np.uint32)
    u = u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))
    return (u >> 16).astype(np.uint16)


def shapes(h, f, layers, vocab):
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (h, h)),
            (f"{p}.self_attn.v_proj.weight", (h, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (f, h)),
            (f"{p}.mlp.up_proj.weight", (f, h)),
            (f"{p}.mlp.down_proj.weight", (h, f)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return out


def axes_of(name):
    """(axis, group) pairs the spec permutes (heads unpermuted)."""
    layer = name.split(".")[2] if name.startswith("model.layers.") else None
    if name.endswith("norm.weight"):
        return [(0, "residual")]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return [(1, "residual")]
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        return [(1, "residual")]
    if name.endswith("o_proj.weight"):
        return [(0, "residual")]
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return [(0, f"mlp.{layer}"), (1, "residual")]
    if name.endswith("down_proj.weight"):
        return [(0, "residual"), (1, f"mlp.{layer}")]
    raise ValueError(name)


def spec_file(layers):
    ls = f"0..{layers}"
    attn = [f"model.layers.{{i}}.self_attn.{x}_proj" for x in "qkv"]
    return {
        "modelfusion_spec": 1,
        "family": "llama-residual-mlp",
        "rules": [
            {"group": "residual", "consumer": ["model.embed_tokens", "lm_head"],
             "rms_norm": ["model.norm"]},
            {"for": {"i": ls}, "group": "residual",
             "consumer": attn + ["model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"],
             "producer": ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"],
             "rms_norm": ["model.layers.{i}.input_layernorm",
                          "model.layers.{i}.post_attention_layernorm"]},
            {"for": {"i": ls}, "group": "mlp.{i}",
             "producer": ["model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"],
             "consumer": ["model.layers.{i}.mlp.down_proj"]},
            {"for": {"i": ls}, "invariant": [f"model.layers.{{i}}.self_attn.{x}_proj.weight"
                                              for x in "qkvo"]},
        ],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mib", type=int, default=400)
    ap.add_argument("--noise", type=float, default=0.5)
    args = ap.parse_args()
    h, f, layers = args.hidden, args.inter, args.layers
    ra, rb, rp = (np.random.default_rng(s) for s in (0, 1, 2))
    planted = {"residual": rp.permutation(h)}
    for i in range(layers):
        planted[f"mlp.{i}"] = rp.permutation(f)
    names = shapes(h, f, layers, args.vocab)
    shard_bytes = args.shard_mib << 20
    # Assign tensors to shards in order.
    shards, cur, size = [], [], 0
    for name, shape in names:
        n = int(np.prod(shape)) * 2
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    total = sum(int(np.prod(s)) * 2 for _, s in names)
    for side in ("a", "b"):
        os.makedirs(os.path.join(args.out, side), exist_ok=True)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {"a": {}, "b": {}}
        for name, shape in shard:
            x = ra.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            if name.endswith("norm.weight"):
                x += np.float32(1.0)
            y = x
            for axis, g in axes_of(name):
                y = np.take(y, planted[g], axis=axis)
            y = y + np.float32(args.noise * 0.02) * rb.standard_normal(shape, dtype=np.float32)
            arrays["a"][name] = to_bf16(x)
            arrays["b"][name] = to_bf16(y)
            weight_map[name] = fname
        for side in ("a", "b"):
            specs = {
                name: strust.TensorSpec(dtype="bfloat16", shape=list(arr.shape),
                                        data_ptr=arr.ctypes.data, data_len=arr.nbytes)
                for name, arr in arrays[side].items()
            }
            strust.serialize_file(specs, os.path.join(args.out, side, fname), {"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": f,
              "num_hidden_layers": layers, "vocab_size": args.vocab, "num_attention_heads": 16,
              "num_key_value_heads": 16, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    for side in ("a", "b"):
        with open(os.path.join(args.out, side, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh)
        with open(os.path.join(args.out, side, "config.json"), "w") as fh:
            json.dump(config, fh)
    with open(os.path.join(args.out, "spec.json"), "w") as fh:
        json.dump(spec_file(layers), fh, indent=1)
    with open(os.path.join(args.out, "planted.json"), "w") as fh:
        json.dump({g: p.tolist() for g, p in planted.items()}, fh)
    params = sum(int(np.prod(s)) for _, s in names)
    print(f"{params} parameters, {total} bytes per model, {len(shards)} shards, in {args.out}")


if __name__ == "__main__":
    main()
