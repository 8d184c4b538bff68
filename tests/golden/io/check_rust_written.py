#!/usr/bin/env python3
"""Checks that the checkpoints modelfusion wrote (tests/golden/io/rust/, regenerated and
byte-compared by tests/io/io_golden.rs) load in Python's `safetensors` package with the
expected values: the f32 fixture py/f32.safetensors converted by numpy (f16, f64) or by
integer round-to-nearest-even (bf16). Exits non-zero on any mismatch.

    venv/bin/python tests/golden/io/check_rust_written.py
"""
import json
import os
import sys

import numpy as np
import safetensors.numpy as stnp
from safetensors import _safetensors_rust as strust

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen import bf16_bits_from_f32  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RUST = os.path.join(HERE, "rust")


def raw_tensors(path):
    """name -> (dtype, shape, bytes) through the package's own parser."""
    with open(path, "rb") as f:
        data = f.read()
    return {name: (t["dtype"], t["shape"], bytes(t["data"])) for name, t in strust.deserialize(data)}


def main():
    np.seterr(over="ignore")
    source = stnp.load_file(os.path.join(HERE, "py", "f32.safetensors"))
    failures = 0
    checked = 0

    def check(where, name, got_bits, want_bits):
        nonlocal failures, checked
        checked += 1
        if not np.array_equal(got_bits, want_bits):
            failures += 1
            print(f"MISMATCH {where} {name}: {got_bits} != {want_bits}")

    for dname, np_dtype in [("f16", np.float16), ("f32", np.float32), ("f64", np.float64)]:
        path = os.path.join(RUST, f"{dname}.safetensors")
        loaded = stnp.load_file(path)  # numpy loader (checks the header and dtypes)
        assert set(loaded) == set(source), (path, set(loaded) ^ set(source))
        for name, src in source.items():
            want = src.astype(np_dtype)
            assert loaded[name].dtype == np_dtype and loaded[name].shape == src.shape, (path, name)
            check(path, name, loaded[name].view(f"u{np_dtype().itemsize}"), want.view(f"u{np_dtype().itemsize}"))

    def check_bf16(path, tensors):
        for name, (dtype, shape, data) in tensors.items():
            src = source[name]
            assert dtype == "BF16" and tuple(shape) == src.shape, (path, name, dtype, shape)
            check(path, name, np.frombuffer(data, dtype="<u2").reshape(src.shape),
                  bf16_bits_from_f32(src).reshape(src.shape))

    path = os.path.join(RUST, "bf16.safetensors")
    t = raw_tensors(path)
    assert set(t) == set(source)
    check_bf16(path, t)

    sharded = os.path.join(RUST, "sharded")
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], files
    seen = {}
    for fname in files:
        t = raw_tensors(os.path.join(sharded, fname))
        for name in t:
            assert index["weight_map"][name] == fname, (name, fname)
        check_bf16(os.path.join(sharded, fname), t)
        seen.update(t)
    assert set(seen) == set(source) == set(index["weight_map"])
    total = sum(len(d) for (_, _, d) in seen.values())
    assert index["metadata"]["total_size"] == total, (index["metadata"], total)

    # safe_open (the lazy reader transformers uses) also reads the metadata.
    with strust.safe_open(os.path.join(RUST, "f32.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}, f.metadata()

    print(f"{checked} tensors checked, {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
