#!/usr/bin/env python3
"""Writes the safetensors interop fixtures read by tests/io/io_golden.rs.

Run from the repository root with the project venv:

    venv/bin/python tests/golden/io/gen.py

Files are written with Python's `safetensors` package (0.8), the reference
implementation: `safetensors.numpy.save_file` for f16/f32/f64, and the package's
low-level `serialize` with a `TensorSpec` for bf16 (numpy has no bfloat16 type).

Outputs (all small, committed):
  py/f32.safetensors, py/f16.safetensors, py/f64.safetensors, py/bf16.safetensors,
  py/mixed.safetensors, py/sharded/ (two shards + model.safetensors.index.json),
  expected.json  -- per file, per tensor: dtype, shape and every element's value as the
                    bit pattern of an IEEE double (exact, independent of JSON float parsing),
  rounding.json  -- narrowing conversions computed by numpy (f32 -> f16, f64 -> f16) and
                    by integer arithmetic (f32 -> bf16, round to nearest even).
"""
import json
import os

import numpy as np
import safetensors.numpy as stnp
from safetensors import _safetensors_rust as strust

HERE = os.path.dirname(os.path.abspath(__file__))
PY = os.path.join(HERE, "py")
rng = np.random.default_rng(7)


def bf16_bits_from_f32(x):
    """Round-to-nearest-even f32 -> bf16 bit patterns (NaN kept quiet)."""
    x = np.asarray(x, dtype=np.float32)
    b = x.reshape(-1).view(np.uint32).astype(np.uint64)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x.reshape(-1))
    rounded[nan] = ((b[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded.reshape(x.shape)


def bf16_bits_from_f64_exact(x):
    """Correctly rounded (nearest, ties to even) f64 -> bf16 for normal results, by
    exact rational arithmetic: independent of any float-to-float conversion."""
    from fractions import Fraction
    import math
    out = []
    for v in x:
        v = float(v)
        m, e = math.frexp(abs(v))  # abs(v) = m * 2^e, 0.5 <= m < 1
        q = round(Fraction(m) * 256)  # 8 significant bits; round() ties to even
        r = float(Fraction(q, 256) * Fraction(2) ** e)
        bits = int(np.array([np.copysign(r, v)], dtype=np.float32).view(np.uint32)[0]) >> 16
        out.append(bits)
    return out


def bf16_bits_to_f64(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def special(dtype):
    info = np.finfo(dtype)
    vals = [0.0, -0.0, 1.0, -2.5, float(info.max), -float(info.max), float(info.tiny),
            float(info.smallest_subnormal), np.inf, -np.inf]
    return np.array(vals, dtype=dtype)


def f64_bits(a):
    return [int(v) for v in np.asarray(a, dtype=np.float64).reshape(-1).view(np.uint64)]


expected = {}


def record(file, tensors):
    """tensors: name -> (dtype name, shape, values as float64 array)."""
    expected[file] = {
        name: {"dtype": d, "shape": list(shape), "bits": f64_bits(vals)}
        for name, (d, shape, vals) in tensors.items()
    }


def numpy_fixture(file, dtype, dname):
    t = {
        "layer.weight": rng.standard_normal((3, 4)).astype(dtype),
        "layer.bias": rng.standard_normal(4).astype(dtype),
        "special": special(dtype),
        "scalar": np.array(0.125, dtype=dtype),
        "empty": np.zeros((0, 3), dtype=dtype),
    }
    stnp.save_file(t, os.path.join(PY, file), metadata={"format": "pt"})
    record(file, {k: (dname, v.shape, v.astype(np.float64)) for k, v in t.items()})


def bf16_tensors():
    w = bf16_bits_from_f32(rng.standard_normal((2, 5)).astype(np.float32))
    s = bf16_bits_from_f32(np.array([0.0, -0.0, 1.0, -2.5, 3.3895314e38, 1e-40, np.inf, -np.inf],
                                    dtype=np.float32))
    return {"layer.weight": w, "special": s}


def spec(dtype, arr):
    return strust.TensorSpec(dtype=dtype, shape=list(arr.shape), data_ptr=arr.ctypes.data,
                             data_len=arr.nbytes)


def main():
    os.makedirs(os.path.join(PY, "sharded"), exist_ok=True)
    numpy_fixture("f32.safetensors", np.float32, "F32")
    numpy_fixture("f16.safetensors", np.float16, "F16")
    numpy_fixture("f64.safetensors", np.float64, "F64")

    b = bf16_tensors()
    data = strust.serialize({k: spec("bfloat16", v) for k, v in b.items()}, {"format": "pt"})
    with open(os.path.join(PY, "bf16.safetensors"), "wb") as f:
        f.write(bytes(data))
    record("bf16.safetensors", {k: ("BF16", v.shape, bf16_bits_to_f64(v)) for k, v in b.items()})

    m_half = rng.standard_normal(3).astype(np.float16)
    m_bf = bf16_bits_from_f32(rng.standard_normal(3).astype(np.float32))
    m_f32 = rng.standard_normal((2, 2)).astype(np.float32)
    m_f64 = rng.standard_normal(2)
    specs = {"h": spec("float16", m_half), "b": spec("bfloat16", m_bf),
             "s": spec("float32", m_f32), "d": spec("float64", m_f64)}
    with open(os.path.join(PY, "mixed.safetensors"), "wb") as f:
        f.write(bytes(strust.serialize(specs, None)))
    record("mixed.safetensors", {
        "h": ("F16", m_half.shape, m_half.astype(np.float64)),
        "b": ("BF16", m_bf.shape, bf16_bits_to_f64(m_bf)),
        "s": ("F32", m_f32.shape, m_f32.astype(np.float64)),
        "d": ("F64", m_f64.shape, m_f64),
    })

    # A sharded checkpoint in the Hugging Face layout.
    shards = [
        {"embed.weight": rng.standard_normal((4, 2)).astype(np.float16)},
        {"head.weight": rng.standard_normal((2, 4)).astype(np.float16),
         "head.bias": rng.standard_normal(2).astype(np.float16)},
    ]
    weight_map, total, tensors = {}, 0, {}
    for i, s in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        stnp.save_file(s, os.path.join(PY, "sharded", name), metadata={"format": "pt"})
        for k, v in s.items():
            weight_map[k] = name
            total += v.nbytes
            tensors[k] = ("F16", v.shape, v.astype(np.float64))
    with open(os.path.join(PY, "sharded", "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    record("sharded", tensors)

    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)

    # Narrowing conversions: ties, near-ties, overflow, subnormals, random values.
    f32 = np.concatenate([
        np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11,
                  65504.0, 65519.0, 65520.0, 1e5, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-30,
                  -0.0, np.inf, -np.inf, 3.4028235e38], dtype=np.float32),
        (np.arange(0x3F807FFE, 0x3F808003, dtype=np.uint32)).view(np.float32),
        rng.standard_normal(64).astype(np.float32) * np.float32(100.0),
    ])
    f64 = np.concatenate([
        np.array([1.0 + 2.0**-11, 1.0 + 2.0**-11 + 2.0**-40, 65520.0, 2.0**-25 + 2.0**-60,
                  1.0 + 2.0**-8, 1.0 + 2.0**-8 + 2.0**-40, 1.0 + 3 * 2.0**-8,
                  -(1.0 + 2.0**-8 + 2.0**-50)], dtype=np.float64),
        rng.standard_normal(32) * 10.0,
    ])
    rounding = {
        "f32_bits": [int(v) for v in f32.view(np.uint32)],
        "f32_to_f16_bits": [int(v) for v in f32.astype(np.float16).view(np.uint16)],
        "f32_to_bf16_bits": [int(v) for v in bf16_bits_from_f32(f32)],
        "f64_bits": f64_bits(f64),
        "f64_to_f16_bits": [int(v) for v in f64.astype(np.float16).view(np.uint16)],
        "f64_to_bf16_bits": bf16_bits_from_f64_exact(f64),
    }
    with open(os.path.join(HERE, "rounding.json"), "w") as f:
        json.dump(rounding, f, indent=1)


if __name__ == "__main__":
    with np.errstate(over="ignore"):
        main()
