#!/usr/bin/env python3
"""Writes N synthetic checkpoints of about SIZE bytes each for benches/compare/io_bench.sh.

    io_gen.py OUT_DIR DTYPE(f32|bf16) N SIZE_MIB

Each checkpoint is a directory with one model.safetensors of 4096 x 4096 tensors
(64 MiB in f32, 32 MiB in bf16) named like a transformer's layers, written with Python's
safetensors package. Values are random normal * 0.02, different per model (seeded).
"""
import os
import sys

import numpy as np
from safetensors import _safetensors_rust as strust


def main():
    out, dtype, n, size_mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    side = 4096
    elem = {"f32": 4, "bf16": 2}[dtype]
    per = side * side * elem
    count = max(1, (size_mib << 20) // per)
    for m in range(n):
        rng = np.random.default_rng(1000 + m)
        d = os.path.join(out, f"{dtype}-m{m}")
        os.makedirs(d, exist_ok=True)
        arrays, specs = {}, {}
        for i in range(count):
            name = f"model.layers.{i // 4}.{['q', 'k', 'v', 'o'][i % 4]}_proj.weight"
            a = (rng.standard_normal((side, side), dtype=np.float32) * np.float32(0.02))
            if dtype == "bf16":
                a = (a.view(np.uint32) >> 16).astype(np.uint16)  # truncation is fine for data
            arrays[name] = a
            specs[name] = strust.TensorSpec(
                dtype={"f32": "float32", "bf16": "bfloat16"}[dtype],
                shape=[side, side], data_ptr=a.ctypes.data, data_len=a.nbytes)
        strust.serialize_file(specs, os.path.join(d, "model.safetensors"), {"format": "pt"})
        print(d, count, "tensors", count * per, "bytes")


if __name__ == "__main__":
    main()
