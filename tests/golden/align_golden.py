#!/usr/bin/env python3
"""Golden values for tests/align/align_golden.rs (numpy + scipy, written independently).

1. Weight matching on a one-hidden-layer MLP [6, 32, 4]: with one permutation group the
   coordinate descent is a single assignment on
   C = W0_A W0_B^T + b0_A b0_B^T + W1_A^T W1_B, maximised (scipy).
2. Streaming statistics: E[x y^T] and the Pearson correlation block between two feature
   sets (numpy.corrcoef).

Run: venv/bin/python tests/golden/align_golden.py > tests/golden/align_golden.txt
"""
import numpy as np
from scipy.optimize import linear_sum_assignment

rng = np.random.default_rng(20260127)


def emit(name, arr):
    arr = np.asarray(arr, dtype=np.float64)
    print(name, " ".join(str(d) for d in arr.shape), "|", " ".join(repr(float(v)) for v in arr.ravel()))


a = {
    "layers.0.weight": rng.standard_normal((32, 6)),
    "layers.0.bias": rng.standard_normal(32) * 0.1,
    "layers.1.weight": rng.standard_normal((4, 32)),
    "layers.1.bias": rng.standard_normal(4) * 0.1,
}
b = {k: rng.standard_normal(v.shape) * (0.1 if k.endswith("bias") else 1.0) for k, v in a.items()}
for k, v in a.items():
    emit("a." + k, v)
for k, v in b.items():
    emit("b." + k, v)
c = (
    a["layers.0.weight"] @ b["layers.0.weight"].T
    + np.outer(a["layers.0.bias"], b["layers.0.bias"])
    + a["layers.1.weight"].T @ b["layers.1.weight"]
)
_, perm = linear_sum_assignment(c, maximize=True)
emit("perm", perm)
aligned = {
    "layers.0.weight": b["layers.0.weight"][perm],
    "layers.0.bias": b["layers.0.bias"][perm],
    "layers.1.weight": b["layers.1.weight"][:, perm],
    "layers.1.bias": b["layers.1.bias"],
}
emit("objective", [sum(float(np.vdot(a[k], aligned[k])) for k in a)])

x = rng.standard_normal((50, 5)) + np.arange(5)
y = x[:, :3] * 0.5 + rng.standard_normal((50, 3))
emit("x", x)
emit("y", y)
emit("cross", x.T @ y / len(x))
emit("pearson", np.corrcoef(x.T, y.T)[:5, 5:])
