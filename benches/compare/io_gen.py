#!/usr/bin/env python3
"""Writes N synthetic checkpoints for benches/compare/io_bench.sh.

    io_gen.py OUT_DIR DTYPE(f32|bf16) N SIZE_MIB [LAYOUT]

LAYOUT `square` (the default): each checkpoint is a directory with one model.safetensors
of about SIZE_MIB of 4096 x 4096 tensors (64 MiB in f32, 32 MiB in bf16) named like a
transformer's layers; values are random normal * 0.02, independent per model (seeded).

LAYOUT `llama`: a Llama-like checkpoint mergekit can read (SIZE_MIB is ignored):
hidden 2048, intermediate 5632, 8 layers, vocabulary 32000, untied LM head, 542M
parameters (1.08 GB in bf16), with a `config.json` (LlamaForCausalLM). Model 0 is the
base (random normal * 0.02, norms 1 + that); model m > 0 is the base plus
0.002 * random normal (a fine-tune-sized delta; in bf16 many deltas tie in magnitude).
Arrays are written with Python's safetensors package.
"""
import json
import os
import sys

import numpy as np
from safetensors import _safetensors_rust as strust

H, I, L, V = 2048, 5632, 8, 32000


def llama_shapes():
    out = [("model.embed_tokens.weight", (V, H))]
    for i in range(L):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (H,))]
        out += [(f"{p}.self_attn.{n}_proj.weight", (H, H)) for n in "qkvo"]
        out += [(f"{p}.post_attention_layernorm.weight", (H,)),
                (f"{p}.mlp.gate_proj.weight", (I, H)), (f"{p}.mlp.up_proj.weight", (I, H)),
                (f"{p}.mlp.down_proj.weight", (H, I))]
    return out + [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]


def to_bf16(a):
    """float32 -> bf16 bits (uint16), round to nearest even."""
    u = a.astype(np.float32).view(np.uint32)
    return ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)


def tensors(layout, dtype, m, size_mib):
    """(name, float32 array) of model m."""
    if layout == "square":
        rng = np.random.default_rng(1000 + m)
        side = 4096
        count = max(1, (size_mib << 20) // (side * side * {"f32": 4, "bf16": 2}[dtype]))
        for i in range(count):
            name = f"model.layers.{i // 4}.{['q', 'k', 'v', 'o'][i % 4]}_proj.weight"
            yield name, rng.standard_normal((side, side), dtype=np.float32) * np.float32(0.02)
        return
    base, noise = np.random.default_rng(7), np.random.default_rng(2000 + m)
    for name, shape in llama_shapes():
        a = base.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        if name.endswith("norm.weight"):
            a += np.float32(1)
        if m > 0:
            a += noise.standard_normal(shape, dtype=np.float32) * np.float32(0.002)
        yield name, a


def main():
    out, dtype, n, size_mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    layout = sys.argv[5] if len(sys.argv) > 5 else "square"
    for m in range(n):
        d = os.path.join(out, f"{dtype}-m{m}")
        os.makedirs(d, exist_ok=True)
        arrays, specs = {}, {}
        for name, a in tensors(layout, dtype, m, size_mib):
            if dtype == "bf16":
                a = to_bf16(a)
            arrays[name] = a
            specs[name] = strust.TensorSpec(
                dtype={"f32": "float32", "bf16": "bfloat16"}[dtype],
                shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes)
        strust.serialize_file(specs, os.path.join(d, "model.safetensors"), {"format": "pt"})
        if layout == "llama":
            cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L,
                   "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": V,
                   "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False,
                   "torch_dtype": {"f32": "float32", "bf16": "bfloat16"}[dtype]}
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg, f)
        print(d, len(arrays), "tensors", sum(a.nbytes for a in arrays.values()), "bytes")


if __name__ == "__main__":
    main()
